"""A legacy two-step IVR in Flask, written the way many are: Twilio's Python
SDK, request validation in a decorator (as Twilio's docs show), careless
logging, and no idea that card digits are sensitive.

The flow is that of Twilio's "Protect Twilio Voice Input with Encryption and
Redaction" article with the encryption taken OUT: ask for the last four card
digits, carry the answer in the next <Gather action> URL, ask for a PIN, send
both to the bank service. There is no key and no crypto code here. Behind
ivrguard, everything this app receives, logs, puts in URLs and sends to the
bank is ciphertext; only the bank service (examples/bank-service) decrypts.
Nothing in this file changes for that: Twilio's webhook URL points at
ivrguard instead of at the app.

Environment:
  TWILIO_AUTH_TOKEN  the token ivrguard signs with: upstream.auth_token (its own),
                     or without it the account's auth token
  PORT               where to listen (default 5000; 0 = any free port)
  HOST               interface to listen on (default 0.0.0.0)
  BANK_URL           the bank service (default http://127.0.0.1:4000)
"""

import json
import logging
import os
import urllib.error
import urllib.request
from functools import wraps

from flask import Flask, Response, abort, request, url_for
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Gather, VoiceResponse
from werkzeug.middleware.proxy_fix import ProxyFix

BANK_URL = os.environ.get("BANK_URL", "http://127.0.0.1:4000")

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("legacy-python")

app = Flask(__name__)
# The app runs behind a proxy (ivrguard, and perhaps a TLS terminator before
# it): take the scheme and host Twilio used from X-Forwarded-Proto/-Host, so
# request.url is the URL Twilio signed.
app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)

# Counts requests that passed validation: the tests check it.
validated = 0


def validate_twilio_request(f):
    """Validates that incoming requests genuinely originated from Twilio
    (the decorator of Twilio's "Secure your Flask App" guide)."""

    @wraps(f)
    def decorated_function(*args, **kwargs):
        global validated
        validator = RequestValidator(os.environ.get("TWILIO_AUTH_TOKEN"))
        request_valid = validator.validate(
            request.url, request.form, request.headers.get("X-TWILIO-SIGNATURE", "")
        )
        if request_valid:
            validated += 1
            log.info("RequestValidator: signature valid (request #%d)", validated)
            return f(*args, **kwargs)
        log.warning("RequestValidator: signature INVALID for %s", request.url)
        return abort(403)

    return decorated_function


@app.before_request
def log_everything():
    # Careless legacy logging: every request's parameters, as received.
    log.info("%s %s params=%s", request.method, request.full_path, json.dumps(request.values.to_dict(flat=False)))


@app.route("/voice", methods=["POST"])
@validate_twilio_request
def voice():
    response = VoiceResponse()
    step = request.args.get("step", "getLast4CC")
    if step == "getLast4CC":
        gather_last4_card(response)
    elif step == "getPin":
        gather_pin(response, request.form.get("Digits", ""))
    elif step == "processData":
        process_gathered_data(response, request.args.get("cardDigits", ""), request.form.get("Digits", ""))
    else:
        response.say("Sorry, something went wrong. Goodbye.")
        response.hangup()
    return Response(str(response), mimetype="text/xml")


def gather_last4_card(response):
    gather = Gather(
        action=url_for("voice", step="getPin", _external=True),
        method="POST",
        input="dtmf",
        timeout=10,
        num_digits=4,
    )
    gather.say("Please enter the last 4 digits of your payment card number.")
    response.append(gather)
    # No input: start over.
    response.redirect(url_for("voice", _external=True), method="POST")


def gather_pin(response, card_digits):
    gather = Gather(
        action=url_for("voice", step="processData", cardDigits=card_digits, _external=True),
        method="POST",
        input="dtmf",
        timeout=10,
        num_digits=4,
    )
    gather.say("Please enter your unique 4 digit identification number.")
    response.append(gather)
    response.redirect(url_for("voice", _external=True), method="POST")


def process_gathered_data(response, card_last4, pin):
    lookup = urllib.request.Request(
        BANK_URL + "/accounts/lookup",
        data=json.dumps({"cardLast4": card_last4, "pin": pin}).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(lookup, timeout=5) as answer:
            account = json.load(answer)
        response.say(
            "Thank you. Your account number is %s and your balance is %s." % (account["account"], account["balance"])
        )
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        log.error("bank lookup failed: %s", e)
        response.say("We were not able to locate you in our system. Goodbye.")
    response.hangup()


if __name__ == "__main__":
    from werkzeug.serving import make_server

    host = os.environ.get("HOST", "0.0.0.0")
    server = make_server(host, int(os.environ.get("PORT", "5000")), app, threaded=True)
    print("legacy-python listening on http://%s:%d" % (host, server.server_port), flush=True)
    server.serve_forever()
