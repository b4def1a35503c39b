// A simulated Twilio that signs its webhooks with the real Node SDK
// (`twilio.getExpectedTwilioSignature`, npm twilio 6.2.0, pinned in
// package.json / package-lock.json).
//
// Same stdin/stdout protocol as twilio_client.py: one JSON document with
// {target, public_url, cases: [{id, method, path, params, sign}]} in, one JSON
// line {id, status, body, signature, path, sent_body} per case out; `sign`
// takes token primary|secondary|wrong|none, origin, path, params (no SharedKey
// signing: the Node SDK 6.2.0 does not implement it).
//
// Differences from the Python client, on purpose: the body and the GET query
// are encoded with encodeURIComponent (space -> %20, not '+'), and the params
// handed to the signer are the object Express's urlencoded parser would build
// (a repeated name becomes an array).
"use strict";

const http = require("http");
const twilio = require("twilio");

const TIMEOUT_MS = 15000;

function encodePairs(pairs) {
  return pairs.map(([k, v]) => encodeURIComponent(k) + "=" + encodeURIComponent(v)).join("&");
}

function withParamsInQuery(path, pairs) {
  if (pairs.length === 0) return path;
  return path + (path.includes("?") ? "&" : "?") + encodePairs(pairs);
}

// What `querystring.parse` / express.urlencoded({extended: false}) produce.
function toParamObject(pairs) {
  const obj = {};
  for (const [k, v] of pairs) {
    if (!Object.prototype.hasOwnProperty.call(obj, k)) obj[k] = v;
    else if (Array.isArray(obj[k])) obj[k].push(v);
    else obj[k] = [obj[k], v];
  }
  return obj;
}

function send(target, publicHost, method, path, headers, body) {
  const [host, port] = [target.slice(0, target.lastIndexOf(":")), target.slice(target.lastIndexOf(":") + 1)];
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host, port: Number(port), method, path, headers: { Host: publicHost, ...headers }, timeout: TIMEOUT_MS, agent: false },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString("utf8") }));
      },
    );
    req.on("timeout", () => req.destroy(new Error(`no answer within ${TIMEOUT_MS} ms`)));
    req.on("error", reject);
    if (body) req.write(body);
    req.end();
  });
}

async function main() {
  const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
  const publicUrl = input.public_url;
  const publicHost = new URL(publicUrl).host;
  const token = process.env.TWILIO_AUTH_TOKEN;
  const tokens = {
    primary: token,
    secondary: process.env.TWILIO_AUTH_TOKEN_SECONDARY,
    wrong: (token[0] === "0" ? "1" : "0") + token.slice(1),
  };

  for (const c of input.cases) {
    const sign = c.sign || {};
    const signedOrigin = sign.origin !== undefined ? sign.origin : publicUrl;
    const signedPath = sign.path !== undefined ? sign.path : c.path;
    const signedParams = sign.params !== undefined ? sign.params : c.params;
    let path, signedUrl, signParams, body;
    if (c.method === "GET") {
      path = withParamsInQuery(c.path, c.params);
      signedUrl = signedOrigin + withParamsInQuery(signedPath, signedParams);
      signParams = {};
      body = "";
    } else {
      path = c.path;
      signedUrl = signedOrigin + signedPath;
      signParams = toParamObject(signedParams);
      body = encodePairs(c.params);
    }
    const tokenChoice = sign.token || "primary";
    if (tokenChoice !== "none" && !tokens[tokenChoice]) throw new Error(`case ${c.id}: no secret for token ${tokenChoice} (npm twilio 6.2.0 has no SharedKey signing)`);
    const signature = tokenChoice === "none" ? null : twilio.getExpectedTwilioSignature(tokens[tokenChoice], signedUrl, signParams);

    const headers = { "User-Agent": "TwilioProxy/1.1", Accept: "*/*" };
    if (signature !== null) headers["X-Twilio-Signature"] = signature;
    if (c.method === "POST") {
      headers["Content-Type"] = "application/x-www-form-urlencoded";
      headers["Content-Length"] = Buffer.byteLength(body);
    }
    const res = await send(input.target, publicHost, c.method, path, headers, c.method === "POST" ? body : null);
    process.stdout.write(JSON.stringify({ id: c.id, status: res.status, body: res.body, signature, path, sent_body: body }) + "\n");
  }
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
