// Twilio signatures computed by the Node SDK (npm twilio 6.2.0):
// twilio.getExpectedTwilioSignature(token, url, params), with params shaped
// the way express.urlencoded builds them (a repeated name -> an array).
//
// stdin:  {"token": ..., "cases": [{"url": ..., "params": [[name, value], ...]}]}
// stdout: {"signatures": [base64, ...]}
"use strict";

const twilio = require("twilio");

function toParamObject(pairs) {
  const obj = {};
  for (const [k, v] of pairs) {
    if (!Object.prototype.hasOwnProperty.call(obj, k)) obj[k] = v;
    else if (Array.isArray(obj[k])) obj[k].push(v);
    else obj[k] = [obj[k], v];
  }
  return obj;
}

const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
const signatures = input.cases.map((c) => twilio.getExpectedTwilioSignature(input.token, c.url, toParamObject(c.params)));
process.stdout.write(JSON.stringify({ signatures }) + "\n");
