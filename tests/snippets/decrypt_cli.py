"""Test driver for examples/decrypt/python/decrypt.py (run by
tests/decrypt_snippets.rs): the key in $SNIPPET_KEY, one hex value per stdin
line; prints "ok <plaintext>" or "err <message>" per line."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "decrypt", "python"))
from decrypt import decrypt  # noqa: E402

key = os.environ["SNIPPET_KEY"]
for line in sys.stdin:
    try:
        print("ok " + decrypt(line.rstrip("\n"), key), flush=True)
    except Exception as e:  # the driver reports every failure as one line
        print("err " + type(e).__name__, flush=True)
