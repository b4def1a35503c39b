// Test driver for examples/decrypt/node/decrypt.js (run by
// tests/decrypt_snippets.rs): the key in $SNIPPET_KEY, one hex value per
// stdin line; prints "ok <plaintext>" or "err <message>" per line.
const readline = require("readline");
const path = require("path");
const { decrypt } = require(path.join(__dirname, "..", "..", "examples", "decrypt", "node", "decrypt.js"));

const key = process.env.SNIPPET_KEY;
const lines = readline.createInterface({ input: process.stdin });
lines.on("line", (line) => {
  try {
    console.log("ok " + decrypt(line, key));
  } catch (e) {
    console.log("err " + e.message);
  }
});
