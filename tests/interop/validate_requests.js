// Checks requests that ivrguard forwarded (as captured by backend.py) the way
// a Node/Express app would: with the real npm `twilio` 6.2.0 SDK and Node's
// built-in crypto.
//
// stdin: {"token": ..., "key": <64 hex>, "fields": [...], "records": [<backend.py records>]}
// stdout: one JSON array, per record:
//   {call_sid,
//    validate_request:  twilio.validateRequest(token, sig, url, params),
//    validate_incoming: twilio.validateIncomingRequest(req, token) with an
//                       Express-like req behind a proxy (trust proxy: protocol
//                       from X-Forwarded-Proto, host from Host),
//    decrypted: [{where, name, plaintext, error}]}
// where url is the URL backend.py rebuilt and params is what
// express.urlencoded({extended: false}) gives (querystring.parse) for a form
// POST, {} for a GET.
"use strict";

const crypto = require("crypto");
const querystring = require("querystring");
const twilio = require("twilio");

// The seed's decrypt (seeds/001), with its key bug fixed: the key is hex.
function decrypt(cipherText, key) {
  const buf = Buffer.from(cipherText, "hex");
  if (buf.toString("hex") !== cipherText) throw new Error("not lowercase hex");
  if (buf.length < 28) throw new Error("shorter than nonce + tag");
  const authTag = buf.subarray(-16);
  const nonce = buf.subarray(0, 12);
  const encrypted = buf.subarray(12, -16);
  const decipher = crypto.createDecipheriv("aes-256-gcm", Buffer.from(key, "hex"), nonce, { authTagLength: 16 });
  decipher.setAuthTag(authTag);
  return decipher.update(encrypted, undefined, "utf8") + decipher.final("utf8");
}

function pairs(qs) {
  if (!qs) return [];
  return qs.split("&").filter((s) => s.length > 0).map((seg) => {
    const eq = seg.indexOf("=");
    const dec = (s) => querystring.unescape(s.replace(/\+/g, " "));
    return eq === -1 ? [dec(seg), ""] : [dec(seg.slice(0, eq)), dec(seg.slice(eq + 1))];
  });
}

const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
const out = input.records.map((r) => {
  const isForm = r.method === "POST" && (r.headers["content-type"] || "").startsWith("application/x-www-form-urlencoded");
  const params = isForm ? querystring.parse(r.body) : {};
  const signature = r.headers["x-twilio-signature"] || "";
  const validateRequest = twilio.validateRequest(input.token, signature, r.url, params);

  const req = {
    protocol: r.headers["x-forwarded-proto"],
    headers: r.headers,
    originalUrl: r.path,
    body: params,
    header: (name) => r.headers[name.toLowerCase()],
  };
  const validateIncoming = twilio.validateIncomingRequest(req, input.token);

  const qIndex = r.path.indexOf("?");
  const decrypted = [];
  for (const [where, list] of [["query", pairs(qIndex === -1 ? "" : r.path.slice(qIndex + 1))], ["body", isForm ? pairs(r.body) : []]]) {
    for (const [name, value] of list) {
      if (!input.fields.includes(name)) continue;
      try {
        decrypted.push({ where, name, plaintext: decrypt(value, input.key), error: null });
      } catch (err) {
        decrypted.push({ where, name, plaintext: null, error: String(err) });
      }
    }
  }
  return { call_sid: r.call_sid, validate_request: validateRequest, validate_incoming: validateIncoming, decrypted };
});
process.stdout.write(JSON.stringify(out) + "\n");
