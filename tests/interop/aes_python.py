"""AES-256-GCM with pyca/cryptography's AESGCM, in ivrguard's wire format.

usage: python aes_python.py encrypt|decrypt   (JSON on stdin, JSON on stdout)
  stdin:  {"key": <64 hex chars>, "values": [string, ...]}
  stdout: {"results": [{"ok": true, "value": string} | {"ok": false, "error": string}, ...]}

Wire format (SPEC section 4, the Twilio blog's Node code): lowercase hex of
nonce(12) || ciphertext || tag(16), no associated data. AESGCM.decrypt takes
ciphertext || tag, which is exactly what follows the nonce.
"""

import json
import os
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def encrypt(plain, key):
    nonce = os.urandom(12)
    return (nonce + AESGCM(key).encrypt(nonce, plain.encode("utf-8"), None)).hex()


def decrypt(hex_text, key):
    raw = bytes.fromhex(hex_text)
    if len(raw) < 12 + 16:
        raise ValueError("shorter than nonce + tag")
    return AESGCM(key).decrypt(raw[:12], raw[12:], None).decode("utf-8")


def main():
    ops = {"encrypt": encrypt, "decrypt": decrypt}
    if len(sys.argv) != 2 or sys.argv[1] not in ops:
        sys.exit("usage: python aes_python.py encrypt|decrypt < {key, values}")
    op = ops[sys.argv[1]]
    doc = json.load(sys.stdin)
    key = bytes.fromhex(doc["key"])
    results = []
    for value in doc["values"]:
        try:
            results.append({"ok": True, "value": op(value, key)})
        except Exception as err:  # noqa: BLE001 - reported to the test
            results.append({"ok": False, "error": "%s: %s" % (type(err).__name__, err)})
    sys.stdout.write(json.dumps({"results": results}) + "\n")


if __name__ == "__main__":
    main()
