// AES-256-GCM with Node's built-in crypto, exactly as the Twilio blog post's
// AES function does it (seeds/001_d2c0890b74c382fa.txt), so ivrguard's field
// cipher can be checked against it. No npm packages needed.
//
// usage: node aes_node.js encrypt|decrypt   (JSON on stdin, JSON on stdout)
//   stdin:  {"key": <64 hex chars>, "values": [string, ...]}
//   stdout: {"results": [{"ok": true, "value": string} | {"ok": false, "error": string}, ...]}
// encrypt turns plaintexts into lowercase hex of nonce(12) || ciphertext || tag(16);
// decrypt turns such hex back into UTF-8 plaintext.
"use strict";

const crypto = require("crypto");

const ALGORITHM = {
  BLOCK_CIPHER: "aes-256-gcm",
  AUTH_TAG_BYTE_SIZE: 16,
  IV_BYTE_SIZE: 12,
};

// The seed's encrypt, verbatim apart from formatting.
function encrypt(plainText, key) {
  const nonce = crypto.randomBytes(ALGORITHM.IV_BYTE_SIZE);
  const cipher = crypto.createCipheriv(ALGORITHM.BLOCK_CIPHER, Buffer.from(key, "hex"), nonce, {
    authTagLength: ALGORITHM.AUTH_TAG_BYTE_SIZE,
  });
  const cipherText = Buffer.concat([nonce, cipher.update(plainText), cipher.final(), cipher.getAuthTag()]);
  return cipherText.toString("hex");
}

// The seed's decrypt, with its bug fixed: the seed passes Buffer.from(key),
// i.e. the 64 ASCII characters of the hex string, which is not a 32-byte key.
function decrypt(cipherText, key) {
  cipherText = Buffer.from(cipherText, "hex");
  const authTag = cipherText.subarray(-16);
  const nonce = cipherText.subarray(0, 12);
  const encryptedMessage = cipherText.subarray(12, -16);
  const decipher = crypto.createDecipheriv(ALGORITHM.BLOCK_CIPHER, Buffer.from(key, "hex"), nonce, {
    authTagLength: ALGORITHM.AUTH_TAG_BYTE_SIZE,
  });
  decipher.setAuthTag(authTag);
  return decipher.update(encryptedMessage, undefined, "utf8") + decipher.final("utf8");
}

const mode = process.argv[2];
const op = { encrypt, decrypt }[mode];
if (!op) {
  console.error("usage: node aes_node.js encrypt|decrypt < {key, values}");
  process.exit(2);
}
const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
const results = input.values.map((v) => {
  try {
    return { ok: true, value: op(v, input.key) };
  } catch (err) {
    return { ok: false, error: String(err && err.message ? err.message : err) };
  }
});
process.stdout.write(JSON.stringify({ results }) + "\n");
