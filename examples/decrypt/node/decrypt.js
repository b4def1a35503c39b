const crypto = require("crypto");

// Decrypts one value ivrguard encrypted: lowercase hex of
// nonce (12 bytes) || ciphertext || tag (16 bytes), AES-256-GCM, key as 64 hex characters.
function decrypt(hexValue, hexKey) {
  const raw = Buffer.from(hexValue, "hex");
  if (raw.length < 28 || raw.length * 2 !== hexValue.length) {
    throw new Error("not an ivrguard ciphertext");
  }
  const nonce = raw.subarray(0, 12);
  const tag = raw.subarray(raw.length - 16);
  const ciphertext = raw.subarray(12, raw.length - 16);
  const decipher = crypto.createDecipheriv("aes-256-gcm", Buffer.from(hexKey, "hex"), nonce, {
    authTagLength: 16,
  });
  decipher.setAuthTag(tag);
  return Buffer.concat([decipher.update(ciphertext), decipher.final()]).toString("utf8");
}

module.exports = { decrypt };
