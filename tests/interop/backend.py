"""The application behind ivrguard, as a Python developer would write it.

A threaded http.server on 127.0.0.1:0 that, for every request it receives:

- rebuilds the public URL the way an app behind a TLS-terminating proxy does
  (X-Forwarded-Proto + "://" + X-Forwarded-Host (else Host) + raw path);
- validates X-Twilio-Signature with the real Twilio SDK
  (twilio.request_validator.RequestValidator, pinned in requirements.txt):
  POST -> every form parameter (repeats kept, blanks kept), GET -> URL only,
  with the algorithm get_signature_algorithm() reads from the
  X-Twilio-Webhooks-Signature-Settings header, if one was forwarded;
- decrypts every configured sensitive field it finds, in the query and in the
  form body, with `cryptography`'s AESGCM (wire format: hex of
  nonce(12) || ciphertext || tag(16));
- answers 200 with a little TwiML and prints one JSON record per request on
  stdout, for the Rust test (tests/interop.rs) to check.

Environment: TWILIO_AUTH_TOKEN, IVRGUARD_KEY (64 hex), IVRGUARD_FIELDS
(comma-separated field names). The first stdout line is
{"event": "listening", "listen": "127.0.0.1:PORT"}.
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twilio.request_validator import (
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)

TOKEN = os.environ["TWILIO_AUTH_TOKEN"]
KEY = bytes.fromhex(os.environ["IVRGUARD_KEY"])
FIELDS = [f for f in os.environ.get("IVRGUARD_FIELDS", "Digits").split(",") if f]
TWIML = b'<?xml version="1.0" encoding="UTF-8"?><Response><Say>backend ok</Say></Response>'

_print_lock = threading.Lock()


def emit(record):
    with _print_lock:
        sys.stdout.write(json.dumps(record, ensure_ascii=True) + "\n")
        sys.stdout.flush()


class MultiDict:
    """What Flask/Werkzeug hands an app: one name, possibly many values.

    RequestValidator.get_values() calls getall(), as it does for Flask.
    """

    def __init__(self, pairs):
        self._pairs = list(pairs)

    def __iter__(self):
        return iter([name for name, _ in self._pairs])

    def __bool__(self):
        return bool(self._pairs)

    def getall(self, name):
        return [value for n, value in self._pairs if n == name]


def decrypt_field(value):
    """Decrypt one hex ciphertext; (plaintext, None) or (None, error)."""
    try:
        raw = bytes.fromhex(value)
        if value != value.lower():
            return None, "ciphertext is not lowercase hex"
        if len(raw) < 12 + 16:
            return None, "ciphertext shorter than nonce + tag"
        plain = AESGCM(KEY).decrypt(raw[:12], raw[12:], None)
        return plain.decode("utf-8"), None
    except Exception as err:  # noqa: BLE001 - reported to the test, which fails
        return None, "%s: %s" % (type(err).__name__, err)


def read_body(handler):
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                # trailers end with an empty line
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


class Handler(BaseHTTPRequestHandler):
    # keep-alive, as a real app server would (ivrguard pools connections)
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - stdout is for records
        pass

    def handle_any(self):
        body = read_body(self)
        headers = {k.lower(): v for k, v in self.headers.items()}
        proto = self.headers.get("X-Forwarded-Proto", "http")
        host = self.headers.get("X-Forwarded-Host") or self.headers.get("Host", "")
        url = "%s://%s%s" % (proto, host, self.path)
        signature = self.headers.get("X-Twilio-Signature", "")

        body_text = body.decode("utf-8", errors="replace")
        query = urlsplit(self.path).query
        query_params = parse_qsl(query, keep_blank_values=True)
        form_params = []
        content_type = self.headers.get("Content-Type", "")
        if self.command == "POST" and content_type.startswith("application/x-www-form-urlencoded"):
            form_params = parse_qsl(body_text, keep_blank_values=True)

        # What the app would do: POST -> form params, GET -> the URL alone;
        # the algorithm as the 9.x SDK picks it (HMAC_SHA1 unless a
        # X-Twilio-Webhooks-Signature-Settings header names another). The app
        # knows only the auth token: ivrguard re-signs with it.
        algorithm = get_signature_algorithm(self.headers.get(SIGNATURE_SETTINGS_HEADER))
        validator = RequestValidator(TOKEN)
        sdk_valid = validator.validate(url, MultiDict(form_params), signature, algorithm)

        decrypted = []
        for where, params in (("query", query_params), ("body", form_params)):
            for name, value in params:
                if name in FIELDS:
                    plain, error = decrypt_field(value)
                    decrypted.append({"where": where, "name": name, "plaintext": plain, "error": error})

        call_sid = None
        for name, value in query_params + form_params:
            if name == "CallSid":
                call_sid = value
        emit(
            {
                "event": "request",
                "call_sid": call_sid,
                "method": self.command,
                "path": self.path,
                "url": url,
                "headers": headers,
                "body": body_text,
                "body_bytes": len(body),
                "signature": signature,
                "sdk_valid": sdk_valid,
                "decrypted": decrypted,
            }
        )

        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(TWIML)))
        self.end_headers()
        self.wfile.write(TWIML)

    do_GET = handle_any
    do_POST = handle_any


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    emit({"event": "listening", "listen": "%s:%d" % (host, port)})
    server.serve_forever()


if __name__ == "__main__":
    main()
