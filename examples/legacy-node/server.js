// A legacy two-step IVR, written the way many are: Express, Twilio's Node
// SDK, careless logging, and no idea that card digits are sensitive.
//
// It is the flow of Twilio's "Protect Twilio Voice Input with Encryption and
// Redaction" article with the encryption taken OUT: the app asks for the
// last four card digits, carries the answer in the next <Gather action> URL,
// asks for a PIN, and sends both to the bank service. It contains no key and
// no crypto code. Put ivrguard in front of it and what it receives, logs,
// carries in URLs and sends to the bank is ciphertext; only the bank service
// (examples/bank-service) decrypts. Nothing in this file changes for that:
// Twilio's webhook URL points at ivrguard instead of at the app.
//
// Environment:
//   TWILIO_AUTH_TOKEN  the token ivrguard signs with (read by twilio.webhook()):
//                      upstream.auth_token (its own), or without it the
//                      account's auth token
//   PORT               where to listen (default 3000; 0 = any free port)
//   HOST               interface to listen on (default: all)
//   BANK_URL           the bank service (default http://127.0.0.1:4000)
"use strict";

const express = require("express");
const twilio = require("twilio");

const VoiceResponse = twilio.twiml.VoiceResponse;
const PORT = Number(process.env.PORT ?? 3000);
const HOST = process.env.HOST || undefined;
const BANK_URL = process.env.BANK_URL || "http://127.0.0.1:4000";

const app = express();

// The app runs behind a proxy (ivrguard, and perhaps a TLS terminator before
// it), so take the scheme Twilio used from X-Forwarded-Proto. twilio.webhook()
// rebuilds the URL Twilio signed from req.protocol and the Host header.
app.set("trust proxy", true);
app.use(express.urlencoded({ extended: false }));

// Careless legacy logging: every request's parameters, as received. Behind
// ivrguard, Digits (and everything derived from it) is ciphertext here.
app.use((req, res, next) => {
  console.log(`${new Date().toISOString()} ${req.method} ${req.originalUrl} params=${JSON.stringify(req.body ?? {})}`);
  next();
});

// Counts requests that passed twilio.webhook(): the tests check it.
let validated = 0;

// Validation exactly as Twilio's docs show: twilio.webhook() answers 403
// to a request whose X-Twilio-Signature does not match.
app.post("/voice", twilio.webhook(), async (req, res) => {
  validated += 1;
  console.log(`twilio.webhook(): signature valid (request #${validated})`);

  const twiml = new VoiceResponse();
  const step = req.query.step || "getLast4CC";

  switch (step) {
    case "getLast4CC":
      gatherLast4Card(twiml);
      break;
    case "getPin":
      gatherPin(twiml, req.body.Digits);
      break;
    case "processData":
      await processGatheredData(twiml, req.query.cardDigits, req.body.Digits);
      break;
    default:
      twiml.say("Sorry, something went wrong. Goodbye.");
      twiml.hangup();
  }

  res.type("text/xml").send(twiml.toString());
});

function gatherLast4Card(twiml) {
  const gather = twiml.gather({
    action: "/voice?step=getPin",
    method: "POST",
    input: "dtmf",
    timeout: 10,
    numDigits: 4,
  });
  gather.say("Please enter the last 4 digits of your payment card number.");
  // No input: start over.
  twiml.redirect({ method: "POST" }, "/voice");
}

function gatherPin(twiml, cardDigits) {
  const gather = twiml.gather({
    action: `/voice?step=processData&cardDigits=${cardDigits}`,
    method: "POST",
    input: "dtmf",
    timeout: 10,
    numDigits: 4,
  });
  gather.say("Please enter your unique 4 digit identification number.");
  twiml.redirect({ method: "POST" }, "/voice");
}

async function processGatheredData(twiml, cardLast4, pin) {
  try {
    const response = await fetch(`${BANK_URL}/accounts/lookup`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ cardLast4, pin }),
      signal: AbortSignal.timeout(5000),
    });
    if (!response.ok) {
      throw new Error(`bank answered ${response.status}`);
    }
    const account = await response.json();
    twiml.say(`Thank you. Your account number is ${account.account} and your balance is ${account.balance}.`);
  } catch (e) {
    console.error(`bank lookup failed: ${e.message}`);
    twiml.say("We were not able to locate you in our system. Goodbye.");
  }
  twiml.hangup();
}

const server = app.listen(PORT, HOST, (error) => {
  if (error) {
    // Express 5 hands a failed listen (the port taken) to this callback.
    console.error(`legacy-node cannot listen: ${error.message}`);
    process.exit(1);
  }
  const { address, port } = server.address();
  console.log(`legacy-node listening on http://${address.includes(":") ? `[${address}]` : address}:${port}`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeIdleConnections();
  });
}
