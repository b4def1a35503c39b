"""Twilio signatures computed by the Python SDK (twilio==9.13.0).

stdin:  {"token": ..., "cases": [{"url": ..., "params": [[name, value], ...]}]}
stdout: {"signatures": [base64, ...]}

Params go in as a Flask-like MultiDict so repeated names keep every value,
which RequestValidator de-duplicates and sorts.
"""

import json
import sys

from twilio.request_validator import RequestValidator


class MultiDict:
    def __init__(self, pairs):
        self._pairs = [tuple(p) for p in pairs]

    def __iter__(self):
        return iter([name for name, _ in self._pairs])

    def __bool__(self):
        return bool(self._pairs)

    def getall(self, name):
        return [value for n, value in self._pairs if n == name]


doc = json.load(sys.stdin)
validator = RequestValidator(doc["token"])
sigs = [validator.compute_signature(c["url"], MultiDict(c["params"])) for c in doc["cases"]]
sys.stdout.write(json.dumps({"signatures": sigs}) + "\n")
