// The downstream "bank" service of the examples: the ONLY place where a
// caller's card digits and PIN exist in plaintext after ivrguard.
//
// The legacy IVR apps (examples/legacy-node, examples/legacy-python) never
// see plaintext: ivrguard encrypts `Digits` before forwarding each webhook,
// the apps pass the ciphertext along unchanged, and this service decrypts it
// with the key ivrguard encrypts with (the same 64 hex characters as
// ivrguard's `encryption.key_env`).
//
// The decryption is the `decrypt` function of Twilio's "Protect Twilio Voice
// Input with Encryption and Redaction" article, with its bug fixed: the key
// is read as hex (`Buffer.from(key, "hex")`), as its `encrypt` does.
//
//   POST /accounts/lookup   {"cardLast4": "<hex>", "pin": "<hex>"}
//     200 {"account": "AC12345678", "balance": "12.55"}  for card 1234 + PIN 4321
//     404 "No data found"                                 for anything else
//     400 {"error": ...}                                   for a value that does not decrypt
//
// Environment: IVRGUARD_KEY (required), IVRGUARD_KEY_NEXT and
// IVRGUARD_KEY_PREVIOUS (during a key rotation), PORT (default 4000), HOST
// (default: all interfaces). Dependencies: none (Node's built-in `http` and `crypto`).
"use strict";

const crypto = require("crypto");
const http = require("http");
const fs = require("fs");

const ALGORITHM = {
  BLOCK_CIPHER: "aes-256-gcm",
  AUTH_TAG_BYTE_SIZE: 16,
  IV_BYTE_SIZE: 12,
};

function decrypt(cipherText, key) {
  cipherText = Buffer.from(cipherText, "hex");

  const authTag = cipherText.subarray(-ALGORITHM.AUTH_TAG_BYTE_SIZE);
  const nonce = cipherText.subarray(0, ALGORITHM.IV_BYTE_SIZE);
  const encryptedMessage = cipherText.subarray(ALGORITHM.IV_BYTE_SIZE, -ALGORITHM.AUTH_TAG_BYTE_SIZE);

  const decipher = crypto.createDecipheriv(ALGORITHM.BLOCK_CIPHER, Buffer.from(key, "hex"), nonce, {
    authTagLength: ALGORITHM.AUTH_TAG_BYTE_SIZE,
  });

  decipher.setAuthTag(authTag);
  return decipher.update(encryptedMessage, "", "utf8") + decipher.final("utf8");
}

// The key ivrguard encrypts with, and during a key rotation (README,
// "Rotating the auth token and the key without downtime") the one it will
// switch to (IVRGUARD_KEY_NEXT) or the one it used before
// (IVRGUARD_KEY_PREVIOUS). The wire format names no key: each is tried in
// turn, and AES-GCM's tag makes a wrong key fail, never yield garbage.
const KEYS = ["IVRGUARD_KEY", "IVRGUARD_KEY_NEXT", "IVRGUARD_KEY_PREVIOUS"]
  .filter((name) => name === "IVRGUARD_KEY" || process.env[name])
  .map((name) => {
    const key = process.env[name] || "";
    if (!/^[0-9a-fA-F]{64}$/.test(key)) {
      console.error(`bank-service: ${name} must hold 64 hex characters (ivrguard keygen)`);
      process.exit(1);
    }
    return key;
  });

function decryptWithAnyKey(cipherText) {
  for (const key of KEYS) {
    try {
      return decrypt(cipherText, key);
    } catch {
      // The next key, if any.
    }
  }
  throw new Error("no key decrypts it");
}
const PORT = Number(process.env.PORT ?? 4000);
const HOST = process.env.HOST || undefined;

// Test hook, never set in production: the end-to-end tests
// (tests/legacy_apps.rs) read what was decrypted from this file to check that
// the bank received exactly what the caller typed. It is the one deliberate
// plaintext sink, and it is off unless this variable names a file.
const RECORD_FILE = process.env.BANK_TEST_RECORD_FILE || "";

// The seed's hard-coded customer.
const CUSTOMER = { cardLast4: "1234", pin: "4321", account: "AC12345678", balance: "12.55" };
const MAX_BODY_BYTES = 16 * 1024;

function send(res, status, type, body) {
  res.writeHead(status, { "Content-Type": type });
  res.end(body);
}

function lookup(body, res) {
  let request;
  try {
    request = JSON.parse(body);
  } catch {
    return send(res, 400, "application/json", JSON.stringify({ error: "body is not JSON" }));
  }
  let cardLast4;
  let pin;
  try {
    cardLast4 = decryptWithAnyKey(String(request.cardLast4 ?? ""));
    pin = decryptWithAnyKey(String(request.pin ?? ""));
  } catch {
    // Never echo the input: it may be a plaintext value sent by mistake.
    console.log("bank-service: lookup refused: a value did not decrypt");
    return send(res, 400, "application/json", JSON.stringify({ error: "a value did not decrypt" }));
  }
  if (RECORD_FILE) {
    fs.appendFileSync(RECORD_FILE, JSON.stringify({ cardLast4, pin }) + "\n");
  }
  if (cardLast4 === CUSTOMER.cardLast4 && pin === CUSTOMER.pin) {
    console.log("bank-service: lookup: found");
    return send(res, 200, "application/json", JSON.stringify({ account: CUSTOMER.account, balance: CUSTOMER.balance }));
  }
  console.log("bank-service: lookup: no data found");
  return send(res, 404, "text/plain", "No data found");
}

const server = http.createServer((req, res) => {
  if (req.method !== "POST" || req.url !== "/accounts/lookup") {
    return send(res, 404, "text/plain", "Not found");
  }
  const chunks = [];
  let size = 0;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) {
      send(res, 413, "text/plain", "Too large");
      req.destroy();
    } else {
      chunks.push(chunk);
    }
  });
  req.on("end", () => {
    if (!res.headersSent) lookup(Buffer.concat(chunks).toString("utf8"), res);
  });
});

server.listen(PORT, HOST, () => {
  const { address, port } = server.address();
  console.log(`bank-service listening on http://${address.includes(":") ? `[${address}]` : address}:${port}`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeIdleConnections();
  });
}
