"""A call simulator that plays Twilio for the end-to-end tests in
tests/legacy_apps.rs.

For each scripted call it does what Twilio's voice platform does with a
webhook URL: POSTs the call's parameters, signed with the real Python SDK
(`RequestValidator(token).compute_signature(url, params)` from
twilio==9.13.0), parses the TwiML answer, speaks the <Say>s, answers each
<Gather> with the caller's next input, follows <Gather action> and
<Redirect> URLs (relative or absolute, query strings included, verbatim),
and stops at <Hangup/>, at the end of a document, or at an HTTP error.

Input, one JSON document on stdin:

    {"connect": {"host": "127.0.0.1", "port": 8080,
                 "tls_ca_file": null | "/path/ca.pem"},   # TLS, verified with this CA
     "account_sid": "AC...",
     "calls": [{"id": "right-pin",
                "url": "https://ivr.example.com/voice",  # the number's voice webhook
                "inputs": ["1234", "4321#", null],       # one per <Gather>; null = no input
                "sign_url": optional, sign the FIRST webhook for this URL instead
                "headers": optional, extra headers on the FIRST webhook}]}

The auth token comes from the environment (TWILIO_AUTH_TOKEN). Every
connection goes to `connect` (never to the URL's host, which is only signed
and sent as Host / TLS server name), so the whole run stays on loopback.
Without `tls_ca_file` the connection is plain HTTP whatever the URL's scheme:
the TLS terminator in front of ivrguard is left out.

Output: one JSON line per call:

    {"id", "outcome": "hangup"|"end"|"http_error"|"too_many_steps",
     "said": [every <Say> text, in order], "inputs_left": n,
     "steps": [{"method", "url", "status", "content_type", "body",
                "said", "digits"?, "finished_on_key"?}]}
"""

import http.client
import json
import os
import secrets
import socket
import ssl
import sys
import xml.etree.ElementTree as ET
from urllib.parse import urlencode, urljoin, urlsplit

from twilio.request_validator import RequestValidator

TIMEOUT_SECONDS = 15  # Twilio's own webhook timeout
MAX_STEPS = 12
CALLER = "+14155550100"
IVR_NUMBER = "+18005550199"


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed address, with the URL's host as TLS server name (SNI
    and certificate check), the way a client reaches a host via DNS."""

    def __init__(self, address, server_name, context):
        super().__init__(address[0], address[1], timeout=TIMEOUT_SECONDS, context=context)
        self._server_name = server_name
        self._tls_context = context

    def connect(self):
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._tls_context.wrap_socket(sock, server_hostname=self._server_name)


class Caller:
    def __init__(self, connect, account_sid, token):
        self.address = (connect["host"], int(connect["port"]))
        ca_file = connect.get("tls_ca_file")
        self.tls = None
        if ca_file:
            self.tls = ssl.create_default_context(cafile=ca_file)
        self.account_sid = account_sid
        self.validator = RequestValidator(token)

    def base_params(self, call_sid, status):
        """The parameters Twilio sends with every voice webhook of an inbound
        call (geographic fields empty, as for many numbers)."""
        return [
            ("AccountSid", self.account_sid),
            ("ApiVersion", "2010-04-01"),
            ("CallSid", call_sid),
            ("CallStatus", status),
            ("Called", IVR_NUMBER),
            ("CalledCity", ""),
            ("CalledCountry", "US"),
            ("CalledState", ""),
            ("CalledZip", ""),
            ("Caller", CALLER),
            ("CallerCity", "SAN FRANCISCO"),
            ("CallerCountry", "US"),
            ("CallerState", "CA"),
            ("CallerZip", "94103"),
            ("Direction", "inbound"),
            ("From", CALLER),
            ("FromCity", "SAN FRANCISCO"),
            ("FromCountry", "US"),
            ("FromState", "CA"),
            ("FromZip", "94103"),
            ("To", IVR_NUMBER),
            ("ToCity", ""),
            ("ToCountry", "US"),
            ("ToState", ""),
            ("ToZip", ""),
        ]

    def send(self, method, url, params, sign_url=None, headers=None):
        """One webhook, sent and signed the way Twilio does it."""
        if method == "GET":
            # Twilio appends the form-encoded parameters to the URL's query
            # and signs that URL with no parameters.
            url, sign_url = with_query(url, params), sign_url and with_query(sign_url, params)
            signature = self.validator.compute_signature(sign_url or url, {})
            body = None
        else:
            signature = self.validator.compute_signature(sign_url or url, MultiDict(params))
            body = urlencode(params).encode("ascii")
        parts = urlsplit(url)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")

        if self.tls is not None:
            conn = PinnedHTTPSConnection(self.address, parts.hostname, self.tls)
        else:
            conn = http.client.HTTPConnection(self.address[0], self.address[1], timeout=TIMEOUT_SECONDS)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", parts.netloc)
            conn.putheader("User-Agent", "TwilioProxy/1.1")
            conn.putheader("Accept", "*/*")
            conn.putheader("Cache-Control", "max-age=259200")
            conn.putheader("I-Twilio-Idempotency-Token", secrets.token_hex(16))
            conn.putheader("X-Twilio-Signature", signature)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Type", "application/x-www-form-urlencoded; charset=UTF-8")
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type", ""), resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def call(self, script):
        call_sid = "CA" + secrets.token_hex(16)
        inputs = list(script.get("inputs", []))
        method, url = "POST", script["url"]
        extra = []  # Digits/FinishedOnKey/msg for a Gather action
        status = "ringing"
        sign_url, headers = script.get("sign_url"), script.get("headers")
        result = {"id": script["id"], "said": [], "steps": []}

        for _ in range(MAX_STEPS):
            params = self.base_params(call_sid, status) + extra
            code, content_type, body = self.send(method, url, params, sign_url, headers)
            sign_url, headers = None, None
            status = "in-progress"
            step = {"method": method, "url": url, "status": code, "content_type": content_type, "body": body, "said": []}
            for name, value in extra:
                if name == "Digits":
                    step["digits"] = value
                if name == "FinishedOnKey":
                    step["finished_on_key"] = value
            result["steps"].append(step)
            if code != 200:
                result["outcome"] = "http_error"
                break
            try:
                verbs = list(ET.fromstring(body))
            except ET.ParseError as e:
                step["error"] = "not TwiML: %s" % e
                result["outcome"] = "http_error"
                break

            next_request = None
            for verb in verbs:
                if verb.tag == "Say":
                    self.say(verb, step, result)
                elif verb.tag == "Pause":
                    pass
                elif verb.tag == "Gather":
                    for nested in verb:
                        if nested.tag == "Say":
                            self.say(nested, step, result)
                    typed = inputs.pop(0) if inputs else None
                    if typed is None:
                        continue  # timeout: Twilio goes on with the next verb
                    digits, finished_on_key = typed, ""
                    if typed.endswith(verb.get("finishOnKey", "#")):
                        digits, finished_on_key = typed[:-1], typed[-1]
                    next_request = (
                        verb.get("method", "POST").upper(),
                        urljoin(url, verb.get("action", url)),
                        [("Digits", digits), ("FinishedOnKey", finished_on_key), ("msg", "Gather End")],
                    )
                    break
                elif verb.tag == "Redirect":
                    next_request = (verb.get("method", "POST").upper(), urljoin(url, (verb.text or "").strip()), [])
                    break
                elif verb.tag == "Hangup":
                    result["outcome"] = "hangup"
                    break
                else:
                    step["error"] = "verb not simulated: %s" % verb.tag
                    result["outcome"] = "http_error"
                    break
            if "outcome" in result:
                break
            if next_request is None:
                result["outcome"] = "end"  # the call ends after the last verb
                break
            method, url, extra = next_request
        else:
            result["outcome"] = "too_many_steps"

        result["inputs_left"] = len(inputs)
        return result

    @staticmethod
    def say(verb, step, result):
        text = (verb.text or "").strip()
        step["said"].append(text)
        result["said"].append(text)


def with_query(url, params):
    if not params:
        return url
    return url + ("&" if "?" in url else "?") + urlencode(params)


class MultiDict:
    """A Flask-like multi-value mapping, as RequestValidator expects."""

    def __init__(self, pairs):
        self._pairs = list(pairs)

    def __iter__(self):
        return iter(dict.fromkeys(name for name, _ in self._pairs))

    def __bool__(self):
        return bool(self._pairs)

    def getall(self, name):
        return [value for n, value in self._pairs if n == name]


def main():
    doc = json.load(sys.stdin)
    caller = Caller(doc["connect"], doc["account_sid"], os.environ["TWILIO_AUTH_TOKEN"])
    for script in doc["calls"]:
        sys.stdout.write(json.dumps(caller.call(script)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
