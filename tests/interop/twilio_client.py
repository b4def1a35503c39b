"""A simulated Twilio that signs its webhooks with the real Python SDK.

Reads one JSON document on stdin:

    {"target": "127.0.0.1:PORT",            # where ivrguard listens
     "public_url": "https://ivr.example.com",
     "cases": [{"id": ..., "method": "POST"|"GET", "path": "/ivr?step=1",
                "params": [[name, value], ...],
                "sign": {"token": "primary"|"secondary"|"shared"|"wrong"|"none",
                         "algorithm": optional "HMAC_SHA1"|"HMAC_SHA256",
                         "settings": optional X-Twilio-Webhooks-Signature-Settings value,
                         "origin": optional other scheme://host[:port] to sign,
                         "path": optional other path to sign,
                         "params": optional other params to sign}}]}

and, for each case in order, sends the request the way Twilio does and prints
one JSON line: {"id", "status", "body", "signature", "path"}.

Signing is RequestValidator(token).compute_signature(url, params) from
twilio==9.13.0, the function Twilio's own docs use to explain the scheme:
- POST: url = public_url + path (action URL, query included, verbatim);
  params = the form parameters (a MultiDict, so repeated names keep all values);
  body = urllib.parse.urlencode(params) (space -> '+', UTF-8).
- GET: Twilio appends the form-encoded params to the action URL's query and
  signs that URL with no params.

Secrets come from the environment: TWILIO_AUTH_TOKEN (primary),
TWILIO_AUTH_TOKEN_SECONDARY and TWILIO_SHARED_KEY_SECRET (a SharedKey's
secret, for "token": "shared"), the last two only if a case uses them.
"""

import http.client
import json
import os
import sys
from urllib.parse import urlencode, urlsplit

from twilio.request_validator import RequestValidator

TIMEOUT_SECONDS = 15


class MultiDict:
    """A Flask-like multi-value mapping, as RequestValidator.get_values expects."""

    def __init__(self, pairs):
        self._pairs = [tuple(p) for p in pairs]

    def __iter__(self):
        return iter([name for name, _ in self._pairs])

    def __bool__(self):
        return bool(self._pairs)

    def getall(self, name):
        return [value for n, value in self._pairs if n == name]


def with_params_in_query(path, params):
    if not params:
        return path
    return path + ("&" if "?" in path else "?") + urlencode(params)


def main():
    doc = json.load(sys.stdin)
    host, port = doc["target"].rsplit(":", 1)
    public_url = doc["public_url"]
    public_host = urlsplit(public_url).netloc
    token = os.environ["TWILIO_AUTH_TOKEN"]
    tokens = {
        "primary": token,
        "secondary": os.environ.get("TWILIO_AUTH_TOKEN_SECONDARY"),
        "shared": os.environ.get("TWILIO_SHARED_KEY_SECRET"),
        "wrong": ("1" if token[0] == "0" else "0") + token[1:],
    }

    for case in doc["cases"]:
        method = case["method"]
        params = [tuple(p) for p in case["params"]]
        sign = case.get("sign", {})
        signed_origin = sign.get("origin", public_url)
        signed_path = sign.get("path", case["path"])
        signed_params = [tuple(p) for p in sign.get("params", case["params"])]

        if method == "GET":
            path = with_params_in_query(case["path"], params)
            signed_url = signed_origin + with_params_in_query(signed_path, signed_params)
            signature_params = {}
            body = b""
        else:
            path = case["path"]
            signed_url = signed_origin + signed_path
            signature_params = MultiDict(signed_params)
            body = urlencode(params).encode("ascii")

        token_choice = sign.get("token", "primary")
        signature = None
        if token_choice != "none":
            secret = tokens[token_choice]
            if secret is None:
                sys.exit("case %s: no secret for token %r in the environment" % (case["id"], token_choice))
            signature = RequestValidator(secret).compute_signature(
                signed_url, signature_params, sign.get("algorithm")
            )

        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_SECONDS)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", public_host)
            conn.putheader("User-Agent", "TwilioProxy/1.1")
            conn.putheader("Accept", "*/*")
            if signature is not None:
                conn.putheader("X-Twilio-Signature", signature)
            if "settings" in sign:
                conn.putheader("X-Twilio-Webhooks-Signature-Settings", sign["settings"])
            if method == "POST":
                conn.putheader("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if method == "POST" else None)
            resp = conn.getresponse()
            status = resp.status
            resp_body = resp.read().decode("utf-8", errors="replace")
        finally:
            conn.close()

        sys.stdout.write(
            json.dumps(
                {
                    "id": case["id"],
                    "status": status,
                    "body": resp_body,
                    "signature": signature,
                    "path": path,
                    "sent_body": body.decode("ascii"),
                }
            )
            + "\n"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
