#!/usr/bin/env python3
"""Distinct signed webhooks for bench/run.sh (perf notes, section A5).

Writes N pre-signed Twilio <Gather> POSTs as raw HTTP/1.1 requests, one
after another in one file, for wrk's Lua `request()` and bench/openloop.rs
to cycle through:

  gather: the 1 KB DTMF webhook of bench/webhook.form, each with its own
          CallSid, Digits (16 digits, card-like) and
          I-Twilio-Idempotency-Token;
  speech: about 2 KB, the same call parameters with a SpeechResult (a
          spoken address and account number, with commas, an apostrophe
          and accented letters, so it is percent-encoded) and Confidence
          instead of Digits.

Each is signed here with the standard library (HMAC-SHA1 over the URL and
the decoded parameters sorted by name, base64), not by ivrguard: run.sh
then checks that ivrguard accepts every one. Deterministic (seeded), so
two runs send the same bytes.

  bench/bodies.py SET COUNT TOKEN URL OUT_FILE
"""

import base64
import hashlib
import hmac
import os
import random
import sys
import urllib.parse

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "webhook.form")

WORDS = (
    "my account number is the one ending in please send the card to "
    "the new address on Calle Mayor in Málaga apartment B floor two "
    "and the postcode is twenty nine thousand fifteen I'd like to pay "
    "the full balance today from my savings account yes that's right "
    "José Núñez speaking calling about the payment due this Friday"
).split()


def speech(rng, target_len):
    """A run of spoken words, about target_len characters, with commas."""
    words = []
    while len(" ".join(words)) < target_len:
        word = rng.choice(WORDS)
        if rng.random() < 0.08:
            word += ","
        words.append(word)
    return " ".join(words).rstrip(",") + "."


def signature(token, url, pairs):
    """Twilio's X-Twilio-Signature: base64(HMAC-SHA1(token, URL + each
    name and value, sorted by name)). The bodies have no repeated name."""
    data = url + "".join(name + value for name, value in sorted(pairs))
    digest = hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def bodies(kind, count, rng):
    with open(TEMPLATE, encoding="ascii") as f:
        template = urllib.parse.parse_qsl(f.read(), keep_blank_values=True, strict_parsing=True)
    for _ in range(count):
        call_sid = "CA" + "%032x" % rng.getrandbits(128)
        pairs = []
        for name, value in template:
            if name == "CallSid":
                value = call_sid
            if kind == "gather" and name == "Digits":
                value = "".join(rng.choice("0123456789") for _ in range(16))
            if kind == "speech" and name in ("Digits", "FinishedOnKey"):
                continue
            pairs.append((name, value))
        if kind == "speech":
            pairs.append(("Confidence", "0.%d" % rng.randint(80, 99)))
            pairs.append(("SpeechResult", speech(rng, rng.randint(880, 960))))
            pairs.sort()
        yield pairs


def main():
    if len(sys.argv) != 6 or sys.argv[1] not in ("gather", "speech"):
        sys.exit(__doc__.split("\n\n")[-1].strip())
    kind, count, token, url, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    parsed = urllib.parse.urlsplit(url)
    target = parsed.path + ("?" + parsed.query if parsed.query else "")
    rng = random.Random(f"ivrguard-bench-{kind}")
    sizes = []
    with open(out, "wb") as f:
        for pairs in bodies(kind, count, rng):
            body = urllib.parse.urlencode(pairs).encode("ascii")
            token_id = "%08x-%04x-4%03x-%04x-%012x" % (
                rng.getrandbits(32),
                rng.getrandbits(16),
                rng.getrandbits(12),
                0x8000 | rng.getrandbits(14),
                rng.getrandbits(48),
            )
            head = (
                f"POST {target} HTTP/1.1\r\n"
                f"Host: {parsed.hostname}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"X-Twilio-Signature: {signature(token, url, pairs)}\r\n"
                "User-Agent: TwilioProxy/1.1\r\n"
                f"I-Twilio-Idempotency-Token: {token_id}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "\r\n"
            )
            f.write(head.encode("ascii") + body)
            sizes.append(len(body))
    print(f"{out}: {count} {kind} requests, bodies {min(sizes)}-{max(sizes)} bytes")


if __name__ == "__main__":
    main()
