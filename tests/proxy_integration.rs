//! Black-box tests of the real `ivrguard` binary.
//!
//! Each test starts its own capture backend (in-process, `127.0.0.1:0`) and
//! its own `ivrguard run` with fresh random secrets, sends raw HTTP/1.1
//! requests, and checks three things (notes/perf-reliability.md §B5): the
//! status the caller got, exactly what the application received, and the
//! access-log line. Signatures and ciphertexts are checked with code in
//! `support::twilio` that does not use ivrguard's own signer or cipher.
//!
//! The last test, [`no_canary_or_secret_leaks_on_any_surface`], drives every
//! path with per-run canaries and greps every byte ivrguard produced, and
//! every byte the application received, for them and for the secrets.

mod support;

use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;

use support::backend::{closed_port_url, Backend, Behaviour, Captured, BACKEND_TWIML};
use support::canary::{assert_no_leak, find_leaks, luhn_valid, text_needles, Canaries};
use support::client::{self, HttpResponse, RawRequest};
use support::harness::{harness, random_sid, Harness};
use support::proxy::{
    run_check, Proxy, ProxyConfig, Secrets, FALLBACK_TWIML, HOST, KEY_VAR, PUBLIC_URL,
    SHARED_KEY_ID, TOKEN_VAR,
};
use support::twilio::{
    decrypt_field, form_decode, form_encode, join_raw, sha256_hex, signature, signature_sha256,
};
use support::webhook::{form_post, sign_form, sign_url, signed_get, signed_post, FORM};

const SENSITIVE: [&str; 2] = ["Digits", "SpeechResult"];

// ---------------------------------------------------------------- helpers

/// The raw (already encoded) pieces of a realistic `<Gather>` webhook, with
/// non-sensitive values in deliberately mixed encodings that must reach the
/// app byte for byte: `%2B`, a lower-case `%2b`, `+` and `%20` for spaces.
fn gather_pieces(digits: &str, speech: &str, call_sid: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AccountSid", random_sid("AC")),
        ("CallSid", call_sid.to_owned()),
        ("From", "%2B15551230000".to_owned()),
        ("To", "%2b15557654321".to_owned()),
        ("Digits", form_encode(digits)),
        ("CallerName", "Jane+Doe%20Jr".to_owned()),
        ("SpeechResult", form_encode(speech)),
        ("Confidence", "0.92".to_owned()),
        ("Direction", "inbound".to_owned()),
    ]
}

fn split_pieces(raw: &str) -> Vec<(&str, &str)> {
    raw.split('&')
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

/// The forwarded form (body or query) has the same names in the same
/// order; sensitive values decrypt to the decoded original; every other
/// piece is byte-identical.
fn assert_rewritten(sent: &str, received: &str, key: &[u8; 32]) {
    let sent = split_pieces(sent);
    let got = split_pieces(received);
    let names = |p: &[(&str, &str)]| p.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>();
    assert_eq!(
        names(&got),
        names(&sent),
        "names or order changed: {received}"
    );
    for ((name, sent_value), (_, got_value)) in sent.iter().zip(&got) {
        if SENSITIVE.contains(name) {
            assert_ne!(got_value, sent_value, "{name} forwarded in plaintext");
            let plain = decrypt_field(key, got_value);
            let expected = &form_decode(&format!("{name}={sent_value}"))[0].1;
            assert_eq!(
                String::from_utf8(plain).unwrap(),
                *expected,
                "{name} decrypts to what was sent"
            );
        } else {
            assert_eq!(got_value, sent_value, "{name} not forwarded byte for byte");
        }
    }
}

/// The app got a signature it can verify: `token` (the primary, or the
/// app's own) over the public URL of the rewritten target and the rewritten
/// form parameters.
fn assert_resigned(request: &Captured, token: &str) {
    let params = if request
        .header("content-type")
        .is_some_and(|ct| ct.starts_with(FORM))
    {
        form_decode(request.body_str())
    } else {
        Vec::new()
    };
    let expected = signature(token, &Proxy::public(&request.target), &params);
    assert_eq!(
        request.header("x-twilio-signature"),
        Some(expected.as_str()),
        "re-signed with the token the app validates with"
    );
}

fn field<'a>(line: &'a Value, name: &str) -> &'a Value {
    &line[name]
}

fn absent(line: &Value, name: &str) -> bool {
    line.get(name).is_none_or(Value::is_null)
}

fn encrypted_fields(line: &Value) -> Vec<String> {
    let mut fields: Vec<String> = line["encrypted_fields"]
        .as_str()
        .unwrap_or("")
        .split(',')
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .collect();
    fields.sort();
    fields
}

/// A refusal: status, a short body, nothing forwarded, and one access line
/// with that status, the signature outcome and the reason.
async fn assert_refused(
    h: &Harness,
    response: &HttpResponse,
    status: u16,
    signature: &str,
    reason: &str,
) {
    assert_eq!(response.status, status, "body: {}", response.text());
    assert!(
        response.body.len() < 64,
        "refusal body is short: {}",
        response.text()
    );
    let line = h.proxy.only_access().await;
    assert_eq!(h.backend.count(), 0, "nothing reaches the app");
    assert_eq!(field(&line, "status"), status, "{line}");
    assert_eq!(field(&line, "signature"), signature, "{line}");
    assert_eq!(field(&line, "reason"), reason, "{line}");
    assert!(absent(&line, "upstream_status"), "{line}");
}

// ------------------------------------------------------- forwarding a form

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_path_prefix_goes_in_front_of_every_target() {
    let h = harness(Behaviour::Twiml, |config| {
        config.upstream_url.push_str("/legacy")
    })
    .await;
    let token = h.proxy.secrets.token.clone();
    let canaries = Canaries::generate();

    // A form whose target is forwarded as received, under the prefix.
    let body = join_raw(&gather_pieces(
        &canaries.pin,
        &canaries.speech,
        &random_sid("CA"),
    ));
    let post = signed_post(&token, "/ivr/gather?attempt=1", &body);
    assert_eq!(client::send(h.proxy.addr, &post).await.status, 200);
    // A GET whose query carries the caller's digits, rewritten.
    let get_target = format!("/ivr/gather?Digits={}&step=2", canaries.pin);
    let get = signed_get(&token, &get_target);
    assert_eq!(client::send(h.proxy.addr, &get).await.status, 200);

    let got = h.backend.wait_for_requests(2).await;
    assert_eq!(got[0].target, "/legacy/ivr/gather?attempt=1");
    assert_rewritten(&body, got[0].body_str(), &h.proxy.secrets.key());
    let query = got[1]
        .target
        .strip_prefix("/legacy/ivr/gather?")
        .expect("the prefix, then the path and the rewritten query");
    // Decrypted, not searched for the PIN: 4 digits turn up by chance in
    // 64 hex characters of ciphertext about once in a thousand runs.
    let (_, sent_query) = get_target.split_once('?').expect("a query");
    assert_rewritten(sent_query, query, &h.proxy.secrets.key());
    // The app is told the public URL was signed (README, `upstream.url`).
    for (r, public) in [
        (&got[0], "/ivr/gather?attempt=1".to_string()),
        (&got[1], got[1].target.replacen("/legacy", "", 1)),
    ] {
        let params = match r.method.as_str() {
            "POST" => form_decode(r.body_str()),
            _ => Vec::new(),
        };
        assert_eq!(
            r.header("x-twilio-signature"),
            Some(signature(&token, &Proxy::public(&public), &params).as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_signed_form_with_fields_encrypted_and_resigned() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let canaries = Canaries::generate();
    let sid = random_sid("CA");
    let body = join_raw(&gather_pieces(&canaries.pin, &canaries.speech, &sid));
    let path = "/ivr/gather?attempt=1";
    let request = signed_post(&h.proxy.secrets.token, path, &body)
        .header("Connection", "close, X-Hop")
        .header("X-Hop", "hop-value")
        .header("Keep-Alive", "timeout=5")
        .header("Proxy-Connection", "keep-alive")
        .header("Expect", "100-continue")
        .header("X-Custom", "kept");

    let response = client::send(h.proxy.addr, &request).await;

    assert_eq!(response.status, 200, "{}", response.text());
    // ivrguard answers the `Expect` itself and sends the app the whole
    // body with no `Expect` (its `100` would be a second interim answer).
    assert!(response.raw.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"));
    assert_eq!(response.text(), BACKEND_TWIML);
    let got = h.backend.requests();
    assert_eq!(got.len(), 1, "exactly one request reaches the app");
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, path);
    assert_rewritten(&body, r.body_str(), &h.proxy.secrets.key());
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    assert_resigned(r, &h.proxy.secrets.token);
    assert_eq!(r.header("content-type"), Some(FORM));
    assert_eq!(r.header("host"), Some(HOST));
    assert_eq!(r.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(r.header("x-forwarded-proto"), Some("https"));
    assert_eq!(r.header("x-forwarded-host"), Some(HOST));
    assert_eq!(r.header("x-custom"), Some("kept"));
    for hop in ["x-hop", "keep-alive", "proxy-connection", "expect"] {
        assert!(
            r.header_all(hop).is_empty(),
            "hop-by-hop header {hop} forwarded"
        );
    }
    let plaintext = find_leaks(&h.backend.raw_bytes(), &canaries.needles());
    assert!(
        plaintext.is_empty(),
        "plaintext reached the app: {plaintext:#?}"
    );

    let line = h.proxy.only_access().await;
    assert_eq!(line["target"], "ivrguard::access");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/ivr/gather");
    assert_eq!(line["query"], "attempt=1");
    assert_eq!(line["peer"], "127.0.0.1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["upstream_status"], 200);
    assert_eq!(line["signature"], "valid");
    assert_eq!(line["call_sid"], sid.as_str());
    assert_eq!(encrypted_fields(&line), ["Digits", "SpeechResult"]);
    assert!(line["latency_ms"].is_number(), "{line}");
    assert!(absent(&line, "reason"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypts_sensitive_field_in_post_query_and_body() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let canaries = Canaries::generate();
    let body = join_raw(&gather_pieces(
        &canaries.card,
        &canaries.speech,
        &random_sid("CA"),
    ));
    let path = format!("/ivr/pay?Digits={}&step=card", canaries.pin);

    let response = client::send(
        h.proxy.addr,
        &signed_post(&h.proxy.secrets.token, &path, &body),
    )
    .await;

    assert_eq!(response.status, 200, "{}", response.text());
    let r = &h.backend.wait_for_requests(1).await[0];
    assert_eq!(r.path(), "/ivr/pay");
    assert_rewritten(
        path.split_once('?').unwrap().1,
        r.query().expect("query kept"),
        &h.proxy.secrets.key(),
    );
    assert_rewritten(&body, r.body_str(), &h.proxy.secrets.key());
    assert_resigned(r, &h.proxy.secrets.token);
    let line = h.proxy.only_access().await;
    assert_eq!(line["query"], "Digits=*REDACTED*&step=card");
    assert_eq!(encrypted_fields(&line), ["Digits", "SpeechResult"]);
}

// --------------------------------------------------------------- refusals

/// Behind a trusted proxy (no `public_url`), `X-Forwarded-Proto` and
/// `-Host` that do not name one origin are refused before the signature
/// is checked: 400 `bad_forwarded_headers`, nothing at the app. One that is
/// missing falls back: the listener's scheme, the `Host` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_trusted_forwarded_headers_are_refused_and_missing_ones_fall_back() {
    let h = harness(Behaviour::Twiml, |config| {
        config.public_url = None;
        config.trust_forwarded_headers = true;
    })
    .await;
    let token = h.proxy.secrets.token.clone();
    let body = format!("CallSid={}&Digits=1234", random_sid("CA"));
    // Signed for https://ivr.example.com/ivr, the URL Twilio called.
    let post = || signed_post(&token, "/ivr", &body);

    let unusable = [
        vec![
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Proto", "https"),
        ],
        vec![("X-Forwarded-Proto", "ftp")],
        vec![("X-Forwarded-Proto", "https, http")],
        vec![("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "")],
        vec![
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "ivr.example.com, evil.example"),
        ],
    ];
    for (i, headers) in unusable.iter().enumerate() {
        let request = headers
            .iter()
            .fold(post(), |request, (name, value)| request.header(name, value));
        let response = client::send(h.proxy.addr, &request).await;
        assert_eq!(response.status, 400, "{headers:?}: {}", response.text());
        let line = &h.proxy.wait_access(i + 1).await[i];
        assert_eq!(
            line["reason"], "bad_forwarded_headers",
            "{headers:?}: {line}"
        );
        assert_eq!(line["signature"], "not_checked", "{headers:?}: {line}");
    }
    assert_eq!(h.backend.count(), 0, "nothing reaches the app");

    // Proto given, host missing: `Host`. The same request is accepted.
    let request = post().header("X-Forwarded-Proto", "https");
    assert_eq!(client::send(h.proxy.addr, &request).await.status, 200);
    // Neither: the listener's scheme (http), so Twilio's https signature
    // does not match.
    let response = client::send(h.proxy.addr, &post()).await;
    assert_eq!(response.status, 403, "{}", response.text());
    let lines = h.proxy.wait_access(unusable.len() + 2).await;
    assert_eq!(lines[unusable.len()]["signature"], "valid");
    assert_eq!(lines[unusable.len() + 1]["signature"], "mismatch");
    assert_eq!(h.backend.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_unsigned_request_and_forwards_nothing() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let canaries = Canaries::generate();
    let body = join_raw(&gather_pieces(
        &canaries.pin,
        &canaries.speech,
        &random_sid("CA"),
    ));

    let response = client::send(h.proxy.addr, &form_post("/ivr/gather", &body, None)).await;

    assert_eq!(response.text().trim(), "Forbidden");
    assert_refused(&h, &response, 403, "missing", "missing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_body_tampered_by_one_byte() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    let sig = sign_form(&h.proxy.secrets.token, "/ivr/gather", &body);
    let tampered = body.replace("Confidence=0.92", "Confidence=0.93");
    assert_eq!(tampered.len(), body.len());

    let response = client::send(
        h.proxy.addr,
        &form_post("/ivr/gather", &tampered, Some(&sig)),
    )
    .await;

    assert_refused(&h, &response, 403, "mismatch", "mismatch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_signature_made_with_another_token() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    let other = Secrets::generate().token;

    let response = client::send(h.proxy.addr, &signed_post(&other, "/ivr/gather", &body)).await;

    assert_refused(&h, &response, 403, "mismatch", "mismatch").await;
}

/// Found in review: every cause of a mismatch (TLS ended in front, a
/// port, a wrong token) gave the same access line, so an operator could not
/// tell what to fix. A WARN line now says which origin ivrguard used, from
/// where, and which other origin the request suggests matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatch_is_explained_once_per_interval_naming_the_origin_that_matches() {
    // No public_url, forwarded headers not trusted: TLS ends at a load
    // balancer, which says so in X-Forwarded-Proto, and Twilio signed https.
    let h = harness(Behaviour::Twiml, |c| c.public_url = None).await;
    let c = Canaries::generate();
    let body = join_raw(&gather_pieces(&c.pin, "yes", &random_sid("CA")));
    let through_the_balancer = || {
        signed_post(&h.proxy.secrets.token, "/ivr/gather", &body)
            .header("X-Forwarded-Proto", "https")
    };
    for _ in 0..2 {
        let response = client::send(h.proxy.addr, &through_the_balancer()).await;
        assert_eq!(response.status, 403);
    }
    h.proxy.wait_access(2).await;
    let explained: Vec<Value> = h
        .proxy
        .log_lines()
        .into_iter()
        .filter(|l| l["level"] == "WARN" && l["origin"].is_string())
        .collect();
    assert_eq!(explained.len(), 1, "one per interval: {explained:#?}");
    let line = &explained[0];
    assert_eq!(line["origin"], "http://ivr.example.com", "{line}");
    assert_eq!(line["matching_origin"], PUBLIC_URL, "{line}");
    let message = line["message"].as_str().unwrap();
    assert!(message.contains("X-Forwarded-Proto"), "{message}");
    assert!(
        message.contains(r#"twilio.public_url = "https://ivr.example.com""#),
        "{message}"
    );
    assert!(h.backend.requests().is_empty(), "the answer stays 403");

    // A wrong token: no origin matches, and the line says what to check.
    let h2 = harness(Behaviour::Twiml, |_| {}).await;
    let other = Secrets::generate().token;
    let response = client::send(h2.proxy.addr, &signed_post(&other, "/ivr/gather", &body)).await;
    assert_eq!(response.status, 403);
    h2.proxy.wait_access(1).await;
    let line = h2
        .proxy
        .log_lines()
        .into_iter()
        .find(|l| l["level"] == "WARN" && l["origin"].is_string())
        .expect("an explanation");
    assert_eq!(line["origin"], PUBLIC_URL, "{line}");
    assert_eq!(line["origin_from"], "twilio.public_url", "{line}");
    assert!(line.get("matching_origin").is_none(), "{line}");
    assert!(
        line["message"].as_str().unwrap().contains("auth token"),
        "{line}"
    );
    for proxy in [&h.proxy, &h2.proxy] {
        assert_no_leak("stdout", &proxy.stdout(), &c, &proxy.secrets);
    }
}

/// Found in review: an app that refuses what ivrguard re-signed (another
/// token) refuses every call, and the WARN line saying what to fix was
/// written once per request (71 lines in 3 s at one call per 40 ms). Now
/// once per interval, like the mismatch explanation; each request keeps its
/// access line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_refusing_is_warned_once_per_interval_and_every_request_is_logged() {
    let h = harness(Behaviour::Status(403), |_| {}).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    for _ in 0..3 {
        let request = signed_post(&h.proxy.secrets.token, "/ivr/gather", &body);
        assert_eq!(client::send(h.proxy.addr, &request).await.status, 403);
    }
    let access = h.proxy.wait_access(3).await;
    assert!(
        access.iter().all(|l| l["upstream_status"] == 403),
        "{access:#?}"
    );
    let warned: Vec<Value> = h
        .proxy
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the app refused a request"))
        })
        .collect();
    assert_eq!(warned.len(), 1, "one per interval: {warned:#?}");
    assert_eq!(warned[0]["level"], "WARN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_signature_over_other_path() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    let sig = sign_form(&h.proxy.secrets.token, "/ivr/other", &body);

    let response = client::send(h.proxy.addr, &form_post("/ivr/gather", &body, Some(&sig))).await;

    assert_refused(&h, &response, 403, "mismatch", "mismatch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_duplicate_signature_headers_in_any_order() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    let valid = sign_form(&h.proxy.secrets.token, "/ivr/gather", &body);
    let invalid = sign_form(&Secrets::generate().token, "/ivr/gather", &body);

    for (first, second) in [(&valid, &valid), (&valid, &invalid), (&invalid, &valid)] {
        let request =
            form_post("/ivr/gather", &body, Some(first)).header("X-Twilio-Signature", second);
        let response = client::send(h.proxy.addr, &request).await;
        assert_eq!(response.status, 403, "{}", response.text());
    }

    let lines = h.proxy.wait_access(3).await;
    assert_eq!(h.backend.count(), 0, "nothing reaches the app");
    for line in &lines {
        assert_eq!(line["status"], 403, "{line}");
        assert_eq!(line["signature"], "duplicate", "{line}");
    }
}

// -------------------------------------------------------- accepted variants

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_secondary_token_and_resigns_with_primary() {
    let h = harness(Behaviour::Twiml, |c| c.secondary = true).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));

    let request = signed_post(&h.proxy.secrets.secondary, "/ivr/gather", &body);
    let response = client::send(h.proxy.addr, &request).await;

    assert_eq!(response.status, 200, "{}", response.text());
    let r = &h.backend.wait_for_requests(1).await[0];
    assert_resigned(r, &h.proxy.secrets.token);
    let line = h.proxy.only_access().await;
    assert_eq!(line["signature"], "valid_secondary");
    assert_eq!(line["status"], 200);
}

/// With `upstream.auth_token`, the app is given a token of its own and
/// never the Twilio auth token: what it gets is signed with its token, and
/// its token opens nothing at ivrguard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_app_token_the_forwarded_request_is_signed_with_it() {
    let app_token = random_sid("app");
    let token_file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(token_file.path(), format!("{app_token}\n")).expect("write token");
    let path = token_file.path().display().to_string();
    let h = harness(Behaviour::Twiml, |c| {
        c.upstream_extra.push(format!("auth_token_file = {path:?}"));
    })
    .await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));

    let response = client::send(
        h.proxy.addr,
        &signed_post(&h.proxy.secrets.token, "/ivr/gather", &body),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let r = &h.backend.wait_for_requests(1).await[0];
    assert_resigned(r, &app_token);

    let forged = client::send(h.proxy.addr, &signed_post(&app_token, "/ivr/gather", &body)).await;
    assert_eq!(forged.status, 403, "the app's token is not Twilio's");
    let lines = h.proxy.wait_access(2).await;
    assert_eq!(lines[1]["signature"], "mismatch", "{}", lines[1]);
    assert_eq!(
        h.backend.requests().len(),
        1,
        "nothing more reached the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_reordered_params_and_forwards_them_in_received_order() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let pieces = gather_pieces("1234", "yes please", &random_sid("CA"));
    let in_order = join_raw(&pieces);
    let reversed: Vec<_> = pieces.iter().rev().cloned().collect();
    let reversed = join_raw(&reversed);
    // One signature for both: Twilio's algorithm sorts the parameters.
    let sig = sign_form(&h.proxy.secrets.token, "/ivr/gather", &in_order);
    assert_eq!(
        sig,
        sign_form(&h.proxy.secrets.token, "/ivr/gather", &reversed)
    );

    for body in [&in_order, &reversed] {
        let response =
            client::send(h.proxy.addr, &form_post("/ivr/gather", body, Some(&sig))).await;
        assert_eq!(response.status, 200, "{}", response.text());
    }

    let got = h.backend.wait_for_requests(2).await;
    assert_rewritten(&in_order, got[0].body_str(), &h.proxy.secrets.key());
    assert_rewritten(&reversed, got[1].body_str(), &h.proxy.secrets.key());
    assert_resigned(&got[0], &h.proxy.secrets.token);
    assert_resigned(&got[1], &h.proxy.secrets.token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypts_digits_in_get_query_and_redacts_it_in_log() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let canaries = Canaries::generate();
    let sid = random_sid("CA");
    let query = format!("CallSid={sid}&Digits={}&From=%2B15551230000", canaries.pin);
    let target = format!("/ivr/gather?{query}");

    let response = client::send(h.proxy.addr, &signed_get(&h.proxy.secrets.token, &target)).await;

    assert_eq!(response.status, 200, "{}", response.text());
    let r = &h.backend.wait_for_requests(1).await[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.path(), "/ivr/gather");
    assert_rewritten(
        &query,
        r.query().expect("query forwarded"),
        &h.proxy.secrets.key(),
    );
    assert_resigned(r, &h.proxy.secrets.token);
    assert!(r.body.is_empty());
    let line = h.proxy.only_access().await;
    assert_eq!(line["method"], "GET");
    assert_eq!(
        line["query"],
        format!("CallSid={sid}&Digits=*REDACTED*&From=%2B15551230000").as_str()
    );
    assert_eq!(line["call_sid"], sid.as_str());
    assert_eq!(line["signature"], "valid");
    assert_eq!(encrypted_fields(&line), ["Digits"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypts_every_occurrence_of_a_repeated_field() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let sid = random_sid("CA");
    // The same value twice (counted once by the signature) and another.
    let body = format!("CallSid={sid}&Digits=4321&Digits=8765&Digits=4321&To=%2B1555");

    let response = client::send(
        h.proxy.addr,
        &signed_post(&h.proxy.secrets.token, "/ivr/gather", &body),
    )
    .await;

    assert_eq!(response.status, 200, "{}", response.text());
    let r = &h.backend.wait_for_requests(1).await[0];
    assert_rewritten(&body, r.body_str(), &h.proxy.secrets.key());
    let ciphertexts: Vec<&str> = split_pieces(r.body_str())
        .into_iter()
        .filter(|(n, _)| *n == "Digits")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(ciphertexts.len(), 3);
    assert_ne!(
        ciphertexts[0], ciphertexts[2],
        "equal values get fresh nonces"
    );
    assert_resigned(r, &h.proxy.secrets.token);
    let line = h.proxy.only_access().await;
    assert_eq!(encrypted_fields(&line), ["Digits"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypts_chunked_body_and_forwards_it_with_content_length() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let canaries = Canaries::generate();
    let body = join_raw(&gather_pieces(
        &canaries.pin,
        &canaries.speech,
        &random_sid("CA"),
    ));
    let (first, second) = body.split_at(body.find("Digits=").unwrap() + 9);
    let chunked = format!(
        "{:x}\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\n\r\n",
        first.len(),
        second.len()
    );
    let request = RawRequest::new("POST", "/ivr/gather", HOST)
        .header("Content-Type", FORM)
        .header("Transfer-Encoding", "chunked")
        .header(
            "X-Twilio-Signature",
            sign_form(&h.proxy.secrets.token, "/ivr/gather", &body),
        )
        .body(chunked);

    let response = client::send(h.proxy.addr, &request).await;

    assert_eq!(response.status, 200, "{}", response.text());
    let r = &h.backend.wait_for_requests(1).await[0];
    assert_rewritten(&body, r.body_str(), &h.proxy.secrets.key());
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    assert!(
        r.header_all("transfer-encoding").is_empty(),
        "forwarded with a Content-Length only"
    );
    assert_resigned(r, &h.proxy.secrets.token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_shared_key_signatures_and_strips_settings_header() {
    let h = harness(Behaviour::Twiml, |c| c.shared_key = true).await;
    let secrets = &h.proxy.secrets;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    let url = Proxy::public("/ivr/gather");
    let params = form_decode(&body);
    let settings = |key: &str, algorithm: &str| format!("key={key},algorithm={algorithm}");
    let cases = [
        (
            settings(SHARED_KEY_ID, "HMAC_SHA256"),
            signature_sha256(&secrets.shared_key, &url, &params),
            200,
            "valid_shared_key",
        ),
        (
            settings(SHARED_KEY_ID, "HMAC_SHA1"),
            signature(&secrets.shared_key, &url, &params),
            200,
            "valid_shared_key",
        ),
        (
            settings("webhooks_sharedkey_9", "HMAC_SHA256"),
            signature_sha256(&secrets.shared_key, &url, &params),
            403,
            "unknown_key_id",
        ),
        (
            settings(SHARED_KEY_ID, "HMAC_MD5"),
            signature_sha256(&secrets.shared_key, &url, &params),
            403,
            "unknown_algorithm",
        ),
        // With a settings header the auth token is never tried.
        (
            settings(SHARED_KEY_ID, "HMAC_SHA1"),
            signature(&secrets.token, &url, &params),
            403,
            "mismatch",
        ),
        // As lenient as twilio-python where that cannot change the secret
        // (found in review): whitespace, empty and unknown elements, the
        // algorithm in any case; an empty header is the auth-token scheme.
        (
            format!(" key = {SHARED_KEY_ID} ,, algorithm = hmac_sha256 ,version=2,"),
            signature_sha256(&secrets.shared_key, &url, &params),
            200,
            "valid_shared_key",
        ),
        (
            String::new(),
            signature(&secrets.token, &url, &params),
            200,
            "valid",
        ),
    ];

    for (settings, sig, status, _) in &cases {
        let request = form_post("/ivr/gather", &body, Some(sig))
            .header("X-Twilio-Webhooks-Signature-Settings", settings);
        let response = client::send(h.proxy.addr, &request).await;
        assert_eq!(response.status, *status, "{settings}: {}", response.text());
    }

    let lines = h.proxy.wait_access(cases.len()).await;
    for (line, (settings, _, status, outcome)) in lines.iter().zip(&cases) {
        assert_eq!(line["status"], *status, "{settings}: {line}");
        assert_eq!(line["signature"], *outcome, "{settings}: {line}");
    }
    let got = h.backend.requests();
    assert_eq!(got.len(), 4, "only the four valid requests reach the app");
    for r in &got {
        assert!(
            r.header_all("x-twilio-webhooks-signature-settings")
                .is_empty(),
            "settings header forwarded"
        );
        assert_resigned(r, &secrets.token);
    }
}

// ------------------------------------------------------ bodySHA256 (JSON)

fn json_event() -> String {
    format!(
        r#"{{"AccountSid":"{}","CallSid":"{}","StatusCallbackEvent":"call-completed"}}"#,
        random_sid("AC"),
        random_sid("CA")
    )
}

fn json_post(target: &str, body: &str, token: &str) -> RawRequest {
    RawRequest::new("POST", target, HOST)
        .header("Content-Type", "application/json")
        .header("X-Twilio-Signature", sign_url(token, target))
        .body(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_json_body_with_matching_body_sha256_unchanged() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = json_event();
    let target = format!("/events?bodySHA256={}", sha256_hex(body.as_bytes()));

    let response = client::send(
        h.proxy.addr,
        &json_post(&target, &body, &h.proxy.secrets.token),
    )
    .await;

    assert_eq!(response.status, 200, "{}", response.text());
    let r = &h.backend.wait_for_requests(1).await[0];
    assert_eq!(r.target, target);
    assert_eq!(r.body_str(), body, "JSON body forwarded unchanged");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_resigned(r, &h.proxy.secrets.token);
    let line = h.proxy.only_access().await;
    assert_eq!(line["signature"], "valid");
    assert_eq!(line["status"], 200);
    assert!(encrypted_fields(&line).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypts_sensitive_keys_in_body_sha256_json_and_rehashes() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let canaries = Canaries::generate();
    let sid = random_sid("CA");
    // Under a configured key, every string and number is encrypted, in
    // arrays and objects too (found in review: those reached the app).
    let body = format!(
        r#"{{"CallSid":"{sid}","Digits":"{pin}","nested":{{"SpeechResult":"{speech}","n":[1,2]}},"more":[{{"Digits":["{pin}",{pin}]}},{{"SpeechResult":{{"transcript":"{speech}","confidence":0.93,"final":true}}}}]}}"#,
        pin = canaries.pin,
        speech = canaries.speech
    );
    let target = format!("/events?bodySHA256={}", sha256_hex(body.as_bytes()));

    let response = client::send(
        h.proxy.addr,
        &json_post(&target, &body, &h.proxy.secrets.token),
    )
    .await;

    assert_eq!(response.status, 200, "{}", response.text());
    let r = &h.backend.wait_for_requests(1).await[0];
    let got: Value = serde_json::from_slice(&r.body).expect("the app gets JSON");
    let key = h.proxy.secrets.key();
    let decrypt =
        |v: &Value| String::from_utf8(decrypt_field(&key, v.as_str().expect("a string"))).unwrap();
    assert_eq!(decrypt(&got["Digits"]), canaries.pin);
    assert_eq!(decrypt(&got["nested"]["SpeechResult"]), canaries.speech);
    assert_eq!(got["CallSid"], sid.as_str());
    assert_eq!(got["nested"]["n"], serde_json::json!([1, 2]));
    let more = &got["more"];
    assert_eq!(decrypt(&more[0]["Digits"][0]), canaries.pin);
    assert_eq!(decrypt(&more[0]["Digits"][1]), canaries.pin);
    assert_eq!(
        decrypt(&more[1]["SpeechResult"]["transcript"]),
        canaries.speech
    );
    assert_eq!(decrypt(&more[1]["SpeechResult"]["confidence"]), "0.93");
    assert_eq!(more[1]["SpeechResult"]["final"], true);
    // The app can still check the body against a signed bodySHA256.
    assert_eq!(r.path(), "/events");
    assert_eq!(
        r.query(),
        Some(format!("bodySHA256={}", sha256_hex(&r.body)).as_str())
    );
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    assert_resigned(r, &h.proxy.secrets.token);
    let plaintext = find_leaks(&h.backend.raw_bytes(), &canaries.needles());
    assert!(
        plaintext.is_empty(),
        "plaintext reached the app: {plaintext:#?}"
    );
    let line = h.proxy.only_access().await;
    assert_eq!(line["signature"], "valid");
    assert_eq!(encrypted_fields(&line), ["Digits", "SpeechResult"]);
}

/// Found in review: serde_json keeps the last of a repeated key, other
/// parsers the first. With `null` last nothing was encrypted and the body
/// went through as sent, the caller's digits in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_body_sha256_json_body_with_a_repeated_key() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let c = Canaries::generate();
    let token = h.proxy.secrets.token.clone();
    for body in [
        format!(r#"{{"CallSid":"CA1","Digits":"{}","Digits":null}}"#, c.pin),
        format!(r#"{{"Digits":"{}","Dig\u0069ts":[]}}"#, c.pin),
    ] {
        let target = format!("/events?bodySHA256={}", sha256_hex(body.as_bytes()));
        let request = RawRequest::new("POST", &target, HOST)
            .header("X-Twilio-Signature", sign_url(&token, &target))
            .header("Content-Type", "application/json")
            .body(&body);
        let response = client::send(h.proxy.addr, &request).await;
        assert_eq!(response.status, 415, "{body}: {}", response.text());
    }
    let lines = h.proxy.wait_access(2).await;
    for line in &lines {
        assert_eq!(line["signature"], "valid", "{line}");
        assert_eq!(line["reason"], "unsupported_media_type", "{line}");
    }
    assert!(h.backend.requests().is_empty(), "nothing reaches the app");
    assert_no_leak("stdout", &h.proxy.stdout(), &c, &h.proxy.secrets);
}

/// Found in review: with `bodySHA256` the body was read as JSON whatever
/// its type, so a body that is JSON to ivrguard but a form to the app
/// (`"&Digits=1234&"`) went through as sent, with its form type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_body_sha256_body_that_is_not_typed_as_json() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let c = Canaries::generate();
    let body = format!(r#""&Digits={}&""#, c.pin);
    let target = format!("/events?bodySHA256={}", sha256_hex(body.as_bytes()));
    let token = h.proxy.secrets.token.clone();
    let typed = |content_type: Option<&str>| {
        let request = RawRequest::new("POST", &target, HOST)
            .header("X-Twilio-Signature", sign_url(&token, &target))
            .body(&body);
        match content_type {
            Some(t) => request.header("Content-Type", t),
            None => request,
        }
    };

    for content_type in [Some(FORM), Some("text/plain"), None] {
        let response = client::send(h.proxy.addr, &typed(content_type)).await;
        assert_eq!(
            response.status,
            415,
            "{content_type:?}: {}",
            response.text()
        );
    }
    // JSON types, structured ones included, are read as JSON.
    for content_type in [
        "application/json",
        "Application/JSON; charset=utf-8",
        "application/vnd.twilio.event+json",
    ] {
        let response = client::send(h.proxy.addr, &typed(Some(content_type))).await;
        assert_eq!(response.status, 200, "{content_type}: {}", response.text());
    }

    let lines = h.proxy.wait_access(6).await;
    for line in &lines[..3] {
        assert_eq!(line["reason"], "unsupported_media_type", "{line}");
    }
    // The three JSON bodies are a JSON string without configured keys:
    // forwarded as they are, and read by the app as JSON.
    let received = h.backend.wait_for_requests(3).await;
    assert_eq!(
        received.len(),
        3,
        "only the JSON-typed requests reach the app"
    );
}

/// Found in review: a deflated body went through unread, and an app that
/// inflates bodies (Express does) read a plaintext `Digits` in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_body_in_any_coding_or_with_two_types() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    for coding in ["gzip", "deflate", "identity, br", "x-custom"] {
        let request = signed_post(&h.proxy.secrets.token, "/ivr/gather", &body)
            .header("Content-Encoding", coding);
        let response = client::send(h.proxy.addr, &request).await;
        assert_eq!(response.status, 415, "{coding}: {}", response.text());
    }
    // Two types: which one the app reads is anyone's guess.
    let request = signed_post(&h.proxy.secrets.token, "/ivr/gather", &body)
        .header("Content-Type", "text/plain");
    let response = client::send(h.proxy.addr, &request).await;
    assert_eq!(response.status, 415, "two types: {}", response.text());
    // A transfer coding other than chunked: 501 (RFC 9112 §6.1); hyper
    // would remove the chunking and leave the gzip (found in review).
    let request = form_post(
        "/ivr/gather",
        "",
        Some(&sign_form(&h.proxy.secrets.token, "/ivr/gather", &body)),
    )
    .header("Transfer-Encoding", "gzip, chunked")
    .body(format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()));
    let response = client::send(h.proxy.addr, &request).await;
    assert_eq!(response.status, 501, "gzip, chunked: {}", response.text());
    // Chunked twice (RFC 9112 §7.1: never more than once).
    let mut twice = request.clone();
    for (name, value) in &mut twice.headers {
        if name == "Transfer-Encoding" {
            *value = b"chunked, chunked".to_vec();
        }
    }
    let response = client::send(h.proxy.addr, &twice).await;
    assert_eq!(
        response.status,
        501,
        "chunked, chunked: {}",
        response.text()
    );
    // `identity` is no coding at all.
    let request = signed_post(&h.proxy.secrets.token, "/ivr/gather", &body)
        .header("Content-Encoding", "identity");
    let response = client::send(h.proxy.addr, &request).await;
    assert_eq!(response.status, 200, "{}", response.text());

    let lines = h.proxy.wait_access(8).await;
    for line in &lines[..5] {
        assert_eq!(line["reason"], "unsupported_media_type", "{line}");
    }
    for line in &lines[5..7] {
        assert_eq!(line["reason"], "unsupported_transfer_coding", "{line}");
    }
    assert_eq!(h.backend.wait_for_requests(1).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_json_body_with_wrong_body_sha256() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = json_event();
    let target = format!("/events?bodySHA256={}", sha256_hex(b"another body"));

    let response = client::send(
        h.proxy.addr,
        &json_post(&target, &body, &h.proxy.secrets.token),
    )
    .await;

    assert_refused(
        &h,
        &response,
        403,
        "body_hash_mismatch",
        "body_hash_mismatch",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_duplicated_body_sha256_param() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = json_event();
    let hash = sha256_hex(body.as_bytes());
    let target = format!("/events?bodySHA256={hash}&bodySHA256={hash}");

    let response = client::send(
        h.proxy.addr,
        &json_post(&target, &body, &h.proxy.secrets.token),
    )
    .await;

    assert_refused(
        &h,
        &response,
        403,
        "duplicate_body_hash",
        "duplicate_body_hash",
    )
    .await;
}

// ------------------------------------------------ bodies and methods refused

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_text_plain_body_with_415() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = "Digits=1234&CallSid=CA00000000000000000000000000000000";
    let request = RawRequest::new("POST", "/ivr/gather", HOST)
        .header("Content-Type", "text/plain")
        .header(
            "X-Twilio-Signature",
            sign_url(&h.proxy.secrets.token, "/ivr/gather"),
        )
        .body(body);

    let response = client::send(h.proxy.addr, &request).await;

    assert_refused(&h, &response, 415, "not_checked", "unsupported_media_type").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_malformed_form_encoding_with_400() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    // A bad escape, and an escape that decodes to invalid UTF-8.
    for body in ["Digits=1234&Note=%G1", "Digits=1234&Note=%FF"] {
        let sig = signature(&h.proxy.secrets.token, &Proxy::public("/ivr/gather"), &[]);
        let response =
            client::send(h.proxy.addr, &form_post("/ivr/gather", body, Some(&sig))).await;
        assert_eq!(response.status, 400, "{body}: {}", response.text());
    }

    let lines = h.proxy.wait_access(2).await;
    assert_eq!(h.backend.count(), 0, "nothing reaches the app");
    for line in &lines {
        assert_eq!(line["status"], 400, "{line}");
        assert_eq!(line["reason"], "malformed_form", "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_body_over_limit_with_413() {
    let h = harness(Behaviour::Twiml, |c| c.max_body_bytes = 1024).await;
    let mut pieces = gather_pieces("1234", "yes", &random_sid("CA"));
    pieces.push(("Pad", "x".repeat(1100)));
    let body = join_raw(&pieces);
    let request = signed_post(&h.proxy.secrets.token, "/ivr/gather", &body);

    let response = client::send(h.proxy.addr, &request).await;

    assert_refused(&h, &response, 413, "not_checked", "body_too_large").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_chunked_body_over_limit_with_413() {
    let h = harness(Behaviour::Twiml, |c| c.max_body_bytes = 1024).await;
    let mut pieces = gather_pieces("1234", "yes", &random_sid("CA"));
    pieces.push(("Pad", "x".repeat(1100)));
    let body = join_raw(&pieces);
    // No Content-Length to refuse on: the limit must hold while reading.
    let (first, second) = body.split_at(600);
    let request = RawRequest::new("POST", "/ivr/gather", HOST)
        .header("Content-Type", FORM)
        .header("Transfer-Encoding", "chunked")
        .header(
            "X-Twilio-Signature",
            sign_form(&h.proxy.secrets.token, "/ivr/gather", &body),
        )
        .body(format!(
            "{:x}\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\n\r\n",
            first.len(),
            second.len()
        ));

    let response = client::send(h.proxy.addr, &request).await;

    assert_refused(&h, &response, 413, "not_checked", "body_too_large").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_form_content_type_variants() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    let variants = [
        "application/x-www-form-urlencoded; charset=UTF-8",
        "Application/X-WWW-Form-Urlencoded",
        "application/x-www-form-urlencoded;charset=utf-8",
    ];

    for content_type in variants {
        let request = RawRequest::new("POST", "/ivr/gather", HOST)
            .header("Content-Type", content_type)
            .header(
                "X-Twilio-Signature",
                sign_form(&h.proxy.secrets.token, "/ivr/gather", &body),
            )
            .body(&body);
        let response = client::send(h.proxy.addr, &request).await;
        assert_eq!(response.status, 200, "{content_type}: {}", response.text());
    }

    let got = h.backend.wait_for_requests(variants.len()).await;
    for (r, content_type) in got.iter().zip(variants) {
        assert_eq!(r.header("content-type"), Some(content_type));
        assert_rewritten(&body, r.body_str(), &h.proxy.secrets.key());
        let params = form_decode(r.body_str());
        let expected = signature(&h.proxy.secrets.token, &Proxy::public(&r.target), &params);
        assert_eq!(r.header("x-twilio-signature"), Some(expected.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_put_with_405() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    let mut request = signed_post(&h.proxy.secrets.token, "/ivr/gather", &body);
    request.method = "PUT".to_owned();

    let response = client::send(h.proxy.addr, &request).await;

    assert_refused(&h, &response, 405, "not_checked", "method_not_allowed").await;
}

// ------------------------------------------------------- upstream failures

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_fallback_twiml_when_upstream_down() {
    let mut config = ProxyConfig::new(closed_port_url());
    config.upstream_timeout_ms = 5_000;
    let proxy = Proxy::start(&config).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));

    let response = client::send(
        proxy.addr,
        &signed_post(&proxy.secrets.token, "/ivr/gather", &body),
    )
    .await;
    // The outage has a WARN line, seen with `log.level = "warn"` too, once
    // for the three requests (found in review: only the INFO access lines).
    let again = signed_post(&proxy.secrets.token, "/ivr/gather", &body);
    let (second, third) = tokio::join!(
        client::send(proxy.addr, &again),
        client::send(proxy.addr, &again)
    );
    assert_eq!((second.status, third.status), (200, 200));
    let warned: Vec<Value> = proxy
        .log_lines()
        .into_iter()
        .filter(|l| l["level"] == "WARN" && l.get("kind").is_some())
        .collect();
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert_eq!(warned[0]["kind"], "connect", "{warned:#?}");

    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("text/xml")),
        "{:?}",
        response.headers
    );
    assert_eq!(response.text(), FALLBACK_TWIML);
    let line = &proxy.wait_access(3).await[0];
    assert_eq!(line["status"], 200);
    assert_eq!(line["signature"], "valid");
    assert_eq!(line["reason"], "upstream_connect_error");
    assert!(absent(line, "upstream_status"), "{line}");
    let metrics = client::get(proxy.admin_addr.expect("admin listener"), "/metrics")
        .await
        .text();
    assert!(
        metrics.contains(r#"ivrguard_upstream_errors_total{kind="connect"} 3"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_502_when_upstream_down_and_on_error_is_status() {
    let mut config = ProxyConfig::new(closed_port_url());
    config.on_error = "status";
    let proxy = Proxy::start(&config).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));

    let response = client::send(
        proxy.addr,
        &signed_post(&proxy.secrets.token, "/ivr/gather", &body),
    )
    .await;

    assert_eq!(response.status, 502, "{}", response.text());
    let line = proxy.only_access().await;
    assert_eq!(line["status"], 502);
    assert_eq!(line["reason"], "upstream_connect_error");
}

/// Sends one signed request to a backend that answers after `delay`, with
/// `upstream.timeout_ms = 300`; returns the response, the backend's record
/// of the request, when the response arrived, and the access line.
async fn call_slow_upstream(
    on_error: &'static str,
    delay: Duration,
) -> (HttpResponse, Captured, Instant, Value) {
    let h = harness(Behaviour::Delay(delay), |c| {
        c.upstream_timeout_ms = 300;
        c.on_error = on_error;
    })
    .await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    let response = client::send(
        h.proxy.addr,
        &signed_post(&h.proxy.secrets.token, "/ivr/gather", &body),
    )
    .await;
    let answered = Instant::now();
    let arrived = h.backend.wait_for_requests(1).await.remove(0);
    let line = h.proxy.only_access().await;
    (response, arrived, answered, line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_fallback_before_slow_upstream_would_have_answered() {
    let delay = Duration::from_secs(2);
    let (response, request, answered, line) = call_slow_upstream("twiml", delay).await;

    assert_eq!(response.status, 200);
    assert_eq!(response.text(), FALLBACK_TWIML);
    assert!(
        answered < request.arrived + delay,
        "the fallback came {:?} after the app got the request, not before its {delay:?} delay ended",
        answered - request.arrived
    );
    assert_eq!(line["reason"], "upstream_timeout");
    assert!(absent(&line, "upstream_status"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_504_when_upstream_slow_and_on_error_is_status() {
    let delay = Duration::from_secs(2);
    let (response, request, answered, line) = call_slow_upstream("status", delay).await;

    assert_eq!(response.status, 504, "{}", response.text());
    assert!(
        answered < request.arrived + delay,
        "504 only after the app's delay"
    );
    assert_eq!(line["reason"], "upstream_timeout");
}

// ------------------------------------------------------------- operations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_and_metrics() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let admin = h.proxy.admin_addr.expect("admin listener");
    assert_eq!(client::get(admin, "/healthz").await.status, 200);
    assert_eq!(client::get(admin, "/readyz").await.status, 200);
    // HEAD as GET, without the body (a load balancer's check; it was 405).
    for path in ["/healthz", "/readyz"] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
        let request = RawRequest::new("HEAD", path, "admin").to_bytes();
        stream.write_all(&request).await.unwrap();
        let mut raw = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw));
        read.await.expect("answered and closed").unwrap();
        let raw = String::from_utf8_lossy(&raw);
        assert!(raw.starts_with("HTTP/1.1 200 "), "HEAD {path}: {raw:?}");
        assert!(
            raw.ends_with("\r\n\r\n"),
            "HEAD {path} has no body: {raw:?}"
        );
    }
    let canaries = Canaries::generate();
    let body = join_raw(&gather_pieces(
        &canaries.pin,
        &canaries.speech,
        &random_sid("CA"),
    ));
    let ok = client::send(
        h.proxy.addr,
        &signed_post(&h.proxy.secrets.token, "/ivr/gather", &body),
    )
    .await;
    assert_eq!(ok.status, 200);
    let refused = client::send(h.proxy.addr, &form_post("/ivr/gather", &body, None)).await;
    assert_eq!(refused.status, 403);
    h.proxy.wait_access(2).await;

    let response = client::get(admin, "/metrics").await;

    assert_eq!(response.status, 200);
    let metrics = response.text();
    for expected in [
        r#"ivrguard_requests_total{outcome="forwarded"} 1"#,
        r#"ivrguard_signature_failures_total{reason="missing"} 1"#,
        "ivrguard_fields_encrypted_total 2",
        "ivrguard_encryptions_current_key 2",
        "ivrguard_request_duration_seconds_count",
        // Text format 0.0.4: a counter is declared by its samples' name,
        // and every label value is there before its first increment.
        "# TYPE ivrguard_upstream_errors_total counter",
        r#"ivrguard_upstream_errors_total{kind="connect"} 0"#,
        r#"ivrguard_upstream_responses_total{class="2xx"} 1"#,
    ] {
        assert!(
            metrics.contains(expected),
            "/metrics lacks {expected:?}:\n{metrics}"
        );
    }
    assert_no_leak(
        "/metrics",
        response.raw.as_slice(),
        &canaries,
        &h.proxy.secrets,
    );

    // Callers' connections, against server.max_connections (4,096 by
    // default): three held open are three (the requests above have closed
    // theirs, which takes a moment to be seen).
    // Not the slots the workers hold while they wait to accept.
    assert!(
        metrics.contains("ivrguard_connections_max 4096\n"),
        "{metrics}"
    );
    let reads = |wanted: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let metrics = client::get(admin, "/metrics").await.text();
            if metrics.contains(wanted) {
                return;
            }
            assert!(Instant::now() < deadline, "no {wanted:?} in\n{metrics}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    reads("ivrguard_connections_open 0\n").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(h.proxy.addr).await.unwrap());
    }
    reads("ivrguard_connections_open 3\n").await;
    drop(held);
}

/// README: a line reaches stdout within a few milliseconds of its
/// request's answer. Each worker hands the lines held over when it goes
/// idle; one that did not (found in review: no test noticed) would leave a
/// line waiting for another worker's hand-over, up to the 2 s tick. Ten
/// connections, so both workers serve some; 1 s is hundreds of times the
/// usual delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_access_line_is_written_soon_after_its_answer() {
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    for i in 1..=10 {
        let post = signed_post(&h.proxy.secrets.token, "/ivr/gather", &body);
        let response = client::send(h.proxy.addr, &post).await;
        assert_eq!(response.status, 200, "{}", response.text());
        let answered = Instant::now();
        h.proxy.wait_access(i).await;
        let waited = answered.elapsed();
        assert!(
            waited < Duration::from_secs(1),
            "access line {i} written {waited:?} after its answer"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_valid_json() {
    // 200 requests: the card-number scrubber once rewrote a latency_ms
    // fraction that passed the Luhn check into `0.*REDACTED*` (a few % of
    // lines); 200 clean lines in a row are then very unlikely.
    let h = harness(Behaviour::Twiml, |_| {}).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    for i in 0..200 {
        let request = if i % 2 == 0 {
            signed_post(&h.proxy.secrets.token, "/ivr/gather", &body)
        } else {
            form_post("/ivr/gather", &body, None)
        };
        client::send(h.proxy.addr, &request).await;
    }
    h.proxy.wait_access(200).await;

    let invalid = h.proxy.invalid_json_lines();
    assert!(
        invalid.is_empty(),
        "{} stdout lines are not JSON:\n{}",
        invalid.len(),
        invalid.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_completes_in_flight_request_and_exits_zero() {
    drains_on("TERM").await;
}

/// Ctrl-C in a terminal (README, Operations: SIGTERM or SIGINT drains).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_as_sigterm_does() {
    drains_on("INT").await;
}

/// A request in flight when `signal` arrives gets the app's answer, and
/// ivrguard then exits 0.
async fn drains_on(signal: &str) {
    let delay = Duration::from_millis(500);
    let mut h = harness(Behaviour::Delay(delay), |_| {}).await;
    let body = join_raw(&gather_pieces("1234", "yes", &random_sid("CA")));
    let request = signed_post(&h.proxy.secrets.token, "/ivr/gather", &body);
    let addr = h.proxy.addr;
    let in_flight = tokio::spawn(async move { client::send(addr, &request).await });
    let arrived = h.backend.wait_for_requests(1).await.remove(0).arrived;

    h.proxy.signal(signal);
    let signalled = Instant::now();
    let response = in_flight.await.expect("client task");

    assert!(
        signalled < arrived + delay,
        "SIG{signal} was sent while the request was in flight"
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.text(),
        BACKEND_TWIML,
        "the app's answer, not a fallback"
    );
    let status = h.proxy.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIG{signal}; stderr:\n{}",
        h.proxy.stderr_text()
    );
    let line = h.proxy.only_access().await;
    assert_eq!(line["status"], 200);
    assert_eq!(line["upstream_status"], 200);
}

// ------------------------------------------------------------ config check

fn check_config() -> String {
    ProxyConfig::new(closed_port_url()).toml()
}

fn stderr_lines(output: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn check_names_missing_key_variable() {
    let secrets = Secrets::generate();
    let output = run_check(&check_config(), &[(TOKEN_VAR, &secrets.token)]);

    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let lines = stderr_lines(&output);
    assert_eq!(lines.len(), 1, "one error line: {lines:#?}");
    assert!(
        lines[0].contains(KEY_VAR),
        "the error names {KEY_VAR}: {}",
        lines[0]
    );
}

/// Found in review: an empty `IVRGUARD_CONFIG` was read as the path "";
/// empty counts as unset, so `config/ivrguard.toml` is used. And `check`
/// refuses what `run` could not start: the admin listener on `listen`.
#[test]
fn check_treats_an_empty_ivrguard_config_as_unset_and_refuses_one_address_twice() {
    let secrets = Secrets::generate();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    let toml = check_config().replacen(
        "\nlisten = \"127.0.0.1:0\"",
        "\nlisten = \"127.0.0.1:18085\"",
        1,
    );
    std::fs::write(dir.path().join("config/ivrguard.toml"), &toml).unwrap();
    let check = |toml: Option<&str>| {
        if let Some(toml) = toml {
            std::fs::write(dir.path().join("config/ivrguard.toml"), toml).unwrap();
        }
        std::process::Command::new(env!("CARGO_BIN_EXE_ivrguard"))
            .arg("check")
            .current_dir(dir.path())
            .env_clear()
            .envs(secrets.env(false))
            .env("IVRGUARD_CONFIG", "")
            .output()
            .unwrap()
    };
    let output = check(None);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("127.0.0.1:18085"));

    let admin_on_listen = toml.replace(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"127.0.0.1:18085\"",
    );
    assert_ne!(admin_on_listen, toml, "the config has an admin listener");
    let output = check(Some(&admin_on_listen));
    assert_eq!(output.status.code(), Some(1));
    let lines = stderr_lines(&output);
    assert!(lines[0].contains("server.admin_listen"), "{lines:?}");
}

#[test]
fn check_names_short_key_variable_without_its_value() {
    let secrets = Secrets::generate();
    let short = &secrets.key_hex[..63];
    let output = run_check(
        &check_config(),
        &[(TOKEN_VAR, &secrets.token), (KEY_VAR, short)],
    );

    assert_eq!(output.status.code(), Some(1));
    let lines = stderr_lines(&output);
    assert_eq!(lines.len(), 1, "one error line: {lines:#?}");
    assert!(
        lines[0].contains(KEY_VAR),
        "the error names {KEY_VAR}: {}",
        lines[0]
    );
    let all = [output.stdout.as_slice(), output.stderr.as_slice()].concat();
    let leaks = find_leaks(&all, &text_needles("the 63-character key", short));
    assert!(leaks.is_empty(), "{leaks:#?}");
    assert_no_leak("check output", &all, &Canaries::generate(), &secrets);
}

/// Found in review: a token file saved by a Windows editor (a UTF-8 byte
/// order mark before the token), or holding two lines, was taken whole —
/// a token no signature matches — with exit 0 and a shape warning at most.
/// It is refused in one line naming the key and the file, quoting none of
/// the file.
#[test]
fn check_refuses_a_token_file_with_a_byte_order_mark_or_two_lines() {
    let secrets = Secrets::generate();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("twilio-auth-token");
    let mut config = ProxyConfig::new(closed_port_url());
    config.auth_token_file = Some(path.clone());
    for (contents, why) in [
        (format!("\u{feff}{}\n", secrets.token), "byte order mark"),
        (
            format!("{}\n{}\n", secrets.token, secrets.secondary),
            "control character",
        ),
    ] {
        std::fs::write(&path, &contents).unwrap();
        let output = run_check(&config.toml(), &[(KEY_VAR, &secrets.key_hex)]);
        assert_eq!(output.status.code(), Some(1), "{contents:?}");
        let lines = stderr_lines(&output);
        assert_eq!(lines.len(), 1, "one error line: {lines:#?}");
        assert!(
            lines[0].starts_with(&format!(
                "ivrguard: twilio.auth_token_file: {} ",
                path.display()
            )) && lines[0].contains(why),
            "{lines:?}"
        );
        let all = [output.stdout.as_slice(), output.stderr.as_slice()].concat();
        assert_no_leak("check output", &all, &Canaries::generate(), &secrets);
    }
}

#[test]
fn check_prints_effective_config_without_secrets() {
    let secrets = Secrets::generate();
    let config = check_config();
    let upstream = config
        .lines()
        .find(|l| l.starts_with("url = "))
        .unwrap()
        .to_owned();
    let upstream = upstream.trim_start_matches("url = ").trim_matches('"');
    let env: Vec<(&str, String)> = secrets.env(false);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let output = run_check(&config, &env);

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(upstream),
        "effective config shows upstream.url:\n{stdout}"
    );
    assert!(
        stdout.contains(KEY_VAR),
        "effective config names the key variable:\n{stdout}"
    );
    // Usable, so exit 0, but warned of (found in review: each passed
    // `check` and then failed every call): the example's public host, and
    // an app that accepts no connection.
    let warnings = stderr_lines(&output);
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(
        warnings[0].starts_with("ivrguard: warning: twilio.public_url: still the example's host")
    );
    assert!(warnings[1].starts_with("ivrguard: warning: upstream.url: nothing accepts"));
    let all = [output.stdout.as_slice(), output.stderr.as_slice()].concat();
    assert_no_leak("check output", &all, &Canaries::generate(), &secrets);
}

// ------------------------------------------------------------- the canaries

#[test]
fn canary_grep_finds_planted_canaries_in_every_encoding() {
    let canaries = Canaries::generate();
    let secrets = Secrets::generate();
    assert_eq!(canaries.card.len(), 16);
    assert!(
        canaries.card.starts_with("4111") && luhn_valid(canaries.card.as_bytes()),
        "{}",
        canaries.card
    );
    assert!(luhn_valid(b"4111111111111111") && !luhn_valid(b"4111111111111112"));
    assert_eq!(canaries.pin.len(), 4);
    assert!(canaries.speech.starts_with("canary-"));

    let needles = [canaries.needles(), secrets.needles()].concat();
    // Each needle, planted in a log-like line, is found.
    for needle in &needles {
        let mut haystack = br#"{"level":"INFO","message":"x","value":""#.to_vec();
        haystack.extend_from_slice(&needle.bytes);
        haystack.extend_from_slice(br#""}"#);
        assert!(
            !find_leaks(&haystack, &needles).is_empty(),
            "{} not found when planted",
            needle.label
        );
    }

    // Encodings produced independently of the needle list are found too.
    let b64 =
        |bytes: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes);
    let speech_with_spaces = format!("my {} please", canaries.speech);
    let mut planted: Vec<(String, Vec<u8>)> = vec![
        (
            "pin in a form body".into(),
            format!("CallSid=CA1&Digits={}&x=1", canaries.pin).into_bytes(),
        ),
        (
            "pin as a JSON string".into(),
            format!(r#"{{"Digits":"{}"}}"#, canaries.pin).into_bytes(),
        ),
        (
            "pin as a JSON number".into(),
            format!(r#"{{"Digits":{}}}"#, canaries.pin).into_bytes(),
        ),
        (
            "pin in a text log".into(),
            format!("got digits {} from caller", canaries.pin).into_bytes(),
        ),
        (
            "card in a query".into(),
            format!("GET /x?Digits={}&y=2", canaries.card).into_bytes(),
        ),
        (
            "card spaced".into(),
            format!(
                "card {} {} {} {}",
                &canaries.card[..4],
                &canaries.card[4..8],
                &canaries.card[8..12],
                &canaries.card[12..]
            )
            .into_bytes(),
        ),
        (
            "speech form-encoded with +".into(),
            format!("SpeechResult={}", form_encode(&speech_with_spaces)).into_bytes(),
        ),
        (
            "speech URL-encoded with %20".into(),
            format!(
                "SpeechResult={}",
                form_encode(&speech_with_spaces).replace('+', "%20")
            )
            .into_bytes(),
        ),
        (
            "speech JSON".into(),
            serde_json::json!({ "speech": speech_with_spaces })
                .to_string()
                .into_bytes(),
        ),
        (
            "speech Debug".into(),
            format!("{:?}", ("SpeechResult", &canaries.speech)).into_bytes(),
        ),
        (
            "speech hex".into(),
            format!("body={}", hex::encode(format!("x={}", canaries.speech))).into_bytes(),
        ),
        (
            "token in an error".into(),
            format!("invalid token {}", secrets.token).into_bytes(),
        ),
        (
            "token hex".into(),
            hex::encode(secrets.token.as_bytes()).into_bytes(),
        ),
        (
            "key hex upper".into(),
            format!("key={}", secrets.key_hex.to_ascii_uppercase()).into_bytes(),
        ),
        (
            "key raw bytes".into(),
            [b"\x00\x01".as_slice(), &secrets.key(), b"\xff"].concat(),
        ),
        (
            "half a key".into(),
            format!("key starts {}…", &secrets.key_hex[..32]).into_bytes(),
        ),
    ];
    // Base64 of the value inside a longer blob, at every alignment.
    for prefix in ["", "a", "ab", "abc"] {
        for value in [
            &canaries.card,
            &canaries.pin,
            &canaries.speech,
            &secrets.token,
            &secrets.key_hex,
        ] {
            // A 4-digit value spans too few base64 characters at the other
            // two alignments to grep for without false positives.
            if value == &canaries.pin && prefix.len() % 3 != 0 {
                continue;
            }
            let blob = b64(format!("{prefix}{{\"v\":\"{value}\"}}").as_bytes());
            planted.push((
                format!("base64 after {prefix:?} of {value}"),
                format!("x-data: {blob}").into_bytes(),
            ));
        }
    }
    for prefix in 0..3 {
        let blob = b64(&[vec![7u8; prefix], secrets.key().to_vec(), vec![9u8; 5]].concat());
        planted.push((
            format!("base64 of the raw key at offset {prefix}"),
            blob.into_bytes(),
        ));
    }
    for (what, haystack) in &planted {
        assert!(
            !find_leaks(haystack, &needles).is_empty(),
            "{what} not found in {:?}",
            String::from_utf8_lossy(haystack)
        );
    }

    // And what legitimately appears — ciphertexts of the canaries, an access
    // line, SIDs, timestamps, latencies — is not a leak.
    let clean = format!(
        r#"{{"timestamp":"2026-11-23T10:22:33.123456Z","level":"INFO","message":"access","query":"Digits=*REDACTED*","latency_ms":12.3456,"call_sid":"{}","peer":"127.0.0.1"}}
Digits={}&SpeechResult={}&X=4{}4"#,
        random_sid("CA"),
        seal(&secrets.key(), canaries.pin.as_bytes()),
        seal(&secrets.key(), canaries.speech.as_bytes()),
        canaries.pin,
    );
    let noise = find_leaks(clean.as_bytes(), &needles);
    assert!(noise.is_empty(), "false positives: {noise:#?}");
}

/// AES-256-GCM in ivrguard's wire format, for the negative control only.
fn seal(key: &[u8; 32], plaintext: &[u8]) -> String {
    use aes_gcm::aead::Aead;
    use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
    let nonce: [u8; 12] = rand::thread_rng().gen();
    let sealed = Aes256Gcm::new_from_slice(key)
        .unwrap()
        .encrypt(Nonce::from_slice(&nonce), plaintext)
        .unwrap();
    hex::encode([nonce.as_slice(), &sealed].concat())
}

/// Every configured field's value the app received: in the query, in a
/// form body, or under a JSON key at any depth.
fn sensitive_values(r: &Captured) -> Vec<(String, String)> {
    fn walk(v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match v {
                        Value::String(s) if SENSITIVE.contains(&k.as_str()) => {
                            out.push((k.clone(), s.clone()))
                        }
                        other => walk(other, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    let mut pieces = split_pieces(r.query().unwrap_or(""));
    let content_type = r.header("content-type").unwrap_or("");
    if content_type.starts_with(FORM) {
        pieces.extend(split_pieces(r.body_str()));
    } else if content_type.starts_with("application/json") {
        walk(
            &serde_json::from_slice(&r.body).expect("JSON body"),
            &mut out,
        );
    }
    for (name, value) in pieces {
        if SENSITIVE.contains(&name) {
            out.push((name.to_owned(), value.to_owned()));
        }
    }
    out
}

/// Everything one leak-test run collected, by surface.
#[derive(Default)]
struct Surfaces {
    collected: Vec<(String, Vec<u8>)>,
    sent: Vec<u8>,
    /// Requests sent with [`Surfaces::expect`].
    expected: usize,
}

impl Surfaces {
    fn add(&mut self, name: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.collected.push((name.into(), bytes.into()));
    }

    /// Sends `request`, keeping both the request (for the positive control)
    /// and the whole response (a surface).
    async fn send(&mut self, proxy: &Proxy, what: &str, request: &RawRequest) -> HttpResponse {
        self.sent.extend_from_slice(&request.to_bytes());
        self.sent.push(b'\n');
        let response = client::send(proxy.addr, request).await;
        self.add(format!("response to {what}"), response.raw.clone());
        response
    }

    /// [`Surfaces::send`], asserting the status.
    async fn expect(&mut self, proxy: &Proxy, what: &str, request: RawRequest, status: u16) {
        let response = self.send(proxy, what, &request).await;
        assert_eq!(response.status, status, "{what}: {}", response.text());
        self.expected += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_canary_or_secret_leaks_on_any_surface() {
    let c = Canaries::generate();
    let secrets = Secrets::generate();
    let mut s = Surfaces::default();
    let token = secrets.token.clone();
    let sid = random_sid("CA");
    let traced = |upstream: String| {
        let mut config = ProxyConfig::new(upstream);
        config.log_level = Some("trace");
        config.secondary = true;
        config.shared_key = true;
        config.max_body_bytes = 4096;
        // HTTP/2 too, for its libraries' log lines (below).
        config.server_extra.push("http2 = true".into());
        config
    };
    let pin_form = join_raw(&gather_pieces(&c.pin, &c.speech, &sid));
    let card_form = join_raw(&gather_pieces(
        &c.card,
        &format!("my card is {}", c.card),
        &sid,
    ));
    let both_query = format!(
        "/ivr/gather?CallSid={sid}&Digits={}&SpeechResult={}",
        c.card,
        form_encode(&c.speech)
    );

    // A: a healthy app, every path.
    let backend = Backend::start(Behaviour::Twiml).await;
    let mut a = Proxy::start_with(&traced(backend.url()), secrets.clone()).await;
    s.expect(
        &a,
        "signed POST (pin)",
        signed_post(&token, "/ivr/gather", &pin_form),
        200,
    )
    .await;
    s.expect(
        &a,
        "signed POST (card)",
        signed_post(&token, "/ivr/pay?attempt=1", &card_form),
        200,
    )
    .await;
    s.expect(
        &a,
        "secondary-signed POST",
        signed_post(&secrets.secondary, "/ivr/gather", &pin_form),
        200,
    )
    .await;
    let reordered = {
        let mut pieces = gather_pieces(&c.pin, &c.speech, &sid);
        pieces.reverse();
        join_raw(&pieces)
    };
    s.expect(
        &a,
        "reordered POST",
        signed_post(&token, "/ivr/gather", &reordered),
        200,
    )
    .await;
    s.expect(&a, "signed GET", signed_get(&token, &both_query), 200)
        .await;
    let json = json_event();
    let json_target = format!("/events?bodySHA256={}", sha256_hex(json.as_bytes()));
    s.expect(
        &a,
        "JSON bodySHA256",
        json_post(&json_target, &json, &token),
        200,
    )
    .await;
    let json_canary = format!(
        r#"{{"CallSid":"{sid}","Digits":"{}","SpeechResult":"{}"}}"#,
        c.card, c.speech
    );
    let json_canary_target = format!("/events?bodySHA256={}", sha256_hex(json_canary.as_bytes()));
    s.expect(
        &a,
        "JSON bodySHA256 with sensitive keys",
        json_post(&json_canary_target, &json_canary, &token),
        200,
    )
    .await;
    let forwarded = 7;
    s.expect(
        &a,
        "unsigned POST",
        form_post("/ivr/gather", &card_form, None),
        403,
    )
    .await;
    let tampered = form_post(
        "/ivr/gather",
        &pin_form.replace("0.92", "0.93"),
        Some(&sign_form(&token, "/ivr/gather", &pin_form)),
    );
    s.expect(&a, "tampered POST", tampered, 403).await;
    s.expect(
        &a,
        "other token",
        signed_post(&Secrets::generate().token, "/ivr/gather", &card_form),
        403,
    )
    .await;
    let other_path = form_post(
        "/ivr/gather",
        &pin_form,
        Some(&sign_form(&token, "/ivr/other", &pin_form)),
    );
    s.expect(&a, "other path", other_path, 403).await;
    let dup = signed_post(&token, "/ivr/gather", &card_form).header(
        "X-Twilio-Signature",
        sign_form(&token, "/ivr/gather", &card_form),
    );
    s.expect(&a, "duplicate signature", dup, 403).await;
    s.expect(
        &a,
        "unsigned GET",
        RawRequest::new("GET", &both_query, HOST),
        403,
    )
    .await;
    let bad_query = format!(
        "/ivr/gather?Digits={}&SpeechResult={}&Note=%G1",
        c.pin, c.speech
    );
    s.expect(&a, "malformed query", signed_get(&token, &bad_query), 400)
        .await;
    let json_canary = format!(r#"{{"Digits":"{}","SpeechResult":"{}"}}"#, c.card, c.speech);
    let wrong_hash = format!("/events?bodySHA256={}", sha256_hex(b"other"));
    s.expect(
        &a,
        "JSON wrong hash",
        json_post(&wrong_hash, &json_canary, &token),
        403,
    )
    .await;
    let hash = sha256_hex(json_canary.as_bytes());
    s.expect(
        &a,
        "JSON duplicate hash",
        json_post(
            &format!("/events?bodySHA256={hash}&bodySHA256={hash}"),
            &json_canary,
            &token,
        ),
        403,
    )
    .await;
    let text_plain = RawRequest::new("POST", "/ivr/gather", HOST)
        .header("Content-Type", "text/plain")
        .header("X-Twilio-Signature", sign_url(&token, "/ivr/gather"))
        .body(&pin_form);
    s.expect(&a, "text/plain", text_plain, 415).await;
    let malformed = format!("Digits={}&SpeechResult={}&Note=%G1", c.card, c.speech);
    s.expect(
        &a,
        "malformed %G1",
        form_post(
            "/ivr/gather",
            &malformed,
            Some(&sign_url(&token, "/ivr/gather")),
        ),
        400,
    )
    .await;
    let bad_utf8 = format!("Digits={}&SpeechResult={}%FF", c.pin, c.speech);
    s.expect(
        &a,
        "invalid UTF-8",
        form_post(
            "/ivr/gather",
            &bad_utf8,
            Some(&sign_url(&token, "/ivr/gather")),
        ),
        400,
    )
    .await;
    let mut oversized = gather_pieces(&c.card, &c.speech, &sid);
    oversized.push((
        "Pad",
        format!("{}+", c.speech).repeat(4096 / c.speech.len() + 1),
    ));
    let oversized = join_raw(&oversized);
    s.expect(
        &a,
        "oversized body",
        signed_post(&token, "/ivr/gather", &oversized),
        413,
    )
    .await;
    let mut put = signed_post(&token, "/ivr/gather", &pin_form);
    put.method = "PUT".into();
    s.expect(&a, "PUT", put, 405).await;
    let shared = |key_id: &str| {
        let sig = signature_sha256(
            &secrets.shared_key,
            &Proxy::public("/ivr/gather"),
            &form_decode(&card_form),
        );
        form_post("/ivr/gather", &card_form, Some(&sig)).header(
            "X-Twilio-Webhooks-Signature-Settings",
            format!("key={key_id},algorithm=HMAC_SHA256"),
        )
    };
    s.expect(&a, "shared-key POST", shared(SHARED_KEY_ID), 200)
        .await;
    s.expect(&a, "unknown shared key id", shared("webhooks_x"), 403)
        .await;
    // Log injection: CR LF, a fake JSON line and an ANSI escape in the query.
    let injection = format!(
        "/ivr/gather?Note=%0D%0A%7B%22level%22%3A%22ERROR%22%7D%1B%5B31m%5C&Digits={}&SpeechResult={}",
        c.pin, c.speech
    );
    s.expect(&a, "log injection GET", signed_get(&token, &injection), 200)
        .await;
    let (head, tail) = pin_form.split_at(pin_form.find("Digits=").unwrap() + 9);
    let chunked = RawRequest::new("POST", "/ivr/gather", HOST)
        .header("Content-Type", FORM)
        .header("Transfer-Encoding", "chunked")
        .header(
            "X-Twilio-Signature",
            sign_form(&token, "/ivr/gather", &pin_form),
        )
        .body(format!(
            "{:x}\r\n{head}\r\n{:x}\r\n{tail}\r\n0\r\n\r\n",
            head.len(),
            tail.len()
        ));
    s.expect(&a, "chunked POST", chunked, 200).await;
    // HTTP/2 pseudo-headers that are not a valid URI are refused inside the
    // h2 library, which describes them, value and all, in its own debug
    // events: they never reach ivrguard's access log (no line is expected).
    for (pseudo, value) in [
        (":path", format!("/ivr/gather?Digits={}&x=a b", c.pin)),
        (":authority", format!("{HOST}/{} x", c.speech)),
    ] {
        let mut fields = vec![
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", HOST),
            (":path", "/ivr/gather"),
        ];
        fields.retain(|(name, _)| *name != pseudo);
        fields.push((pseudo, &value));
        s.sent.extend_from_slice(value.as_bytes());
        let answer = client::h2_raw_headers(a.addr, &fields).await;
        s.add(format!("HTTP/2 answer to a malformed {pseudo}"), answer);
    }
    let forwarded = forwarded + 3;
    let sent_to_a = s.expected;
    let admin = a.admin_addr.expect("admin listener");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = client::get(admin, path).await;
        assert_eq!(response.status, 200, "{path}");
        s.add(format!("A {path}"), response.raw);
    }

    // Every request reached the log; only the valid ones reached the app,
    // and every sensitive value there decrypts to a canary.
    let lines = a.wait_access(sent_to_a).await;
    assert_eq!(lines.len(), sent_to_a, "one access line per request");
    let received = backend.wait_for_requests(forwarded).await;
    assert_eq!(
        received.len(),
        forwarded,
        "only the validly signed requests reach the app"
    );
    let canary_values = [
        c.pin.clone(),
        c.card.clone(),
        c.speech.clone(),
        format!("my card is {}", c.card),
    ];
    let mut decrypted = 0;
    for r in &received {
        for (name, value) in sensitive_values(r) {
            let plain = String::from_utf8(decrypt_field(&secrets.key(), &value)).unwrap();
            assert!(
                canary_values.contains(&plain),
                "{name} decrypts to {plain:?}"
            );
            decrypted += 1;
        }
    }
    assert_eq!(
        decrypted,
        2 * (forwarded - 1),
        "two sensitive values in every forwarded request but the plain JSON event"
    );

    // B: the app is down (fallback TwiML). C: the app is too slow (504).
    let mut b = Proxy::start_with(&traced(closed_port_url()), secrets.clone()).await;
    let response = s
        .send(
            &b,
            "B: POST, app down",
            &signed_post(&token, "/ivr/gather", &card_form),
        )
        .await;
    assert_eq!(response.text(), FALLBACK_TWIML);
    let response = s
        .send(&b, "B: GET, app down", &signed_get(&token, &both_query))
        .await;
    assert_eq!(response.text(), FALLBACK_TWIML);
    b.wait_access(2).await;
    s.add(
        "B /metrics",
        client::get(b.admin_addr.unwrap(), "/metrics").await.raw,
    );

    let slow = Backend::start(Behaviour::Delay(Duration::from_millis(1000))).await;
    let mut slow_config = traced(slow.url());
    slow_config.upstream_timeout_ms = 300;
    slow_config.on_error = "status";
    let mut cc = Proxy::start_with(&slow_config, secrets.clone()).await;
    let response = s
        .send(
            &cc,
            "C: POST, app slow",
            &signed_post(&token, "/ivr/gather", &pin_form),
        )
        .await;
    assert_eq!(response.status, 504);
    cc.wait_access(1).await;
    s.add(
        "C /metrics",
        client::get(cc.admin_addr.unwrap(), "/metrics").await.raw,
    );

    // Shut everything down so every log line is flushed, then collect.
    for (name, proxy) in [("A", &mut a), ("B", &mut b), ("C", &mut cc)] {
        let status = proxy.stop().await;
        assert_eq!(status.code(), Some(0), "{name} exit status");
        let stdout = proxy.stdout();
        let invalid = proxy.invalid_json_lines();
        assert!(
            invalid.is_empty(),
            "{name}: stdout lines that are not one JSON object: {invalid:#?}"
        );
        s.add(format!("{name} stdout"), stdout);
        s.add(format!("{name} stderr"), proxy.stderr());
    }
    s.add("app A: every byte received", backend.raw_bytes());
    s.add("app C: every byte received", slow.raw_bytes());

    // `ivrguard check`: success, a missing key and a malformed key.
    let check_env = secrets.env(true);
    let check_env: Vec<(&str, &str)> = check_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let config = traced(closed_port_url()).toml();
    let out = run_check(&config, &check_env);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.add("check (ok)", [out.stdout, out.stderr].concat());
    let out = run_check(&config, &check_env[..1]);
    assert_eq!(out.status.code(), Some(1));
    s.add("check (missing key)", [out.stdout, out.stderr].concat());
    let bad_key = [
        (TOKEN_VAR, secrets.token.as_str()),
        (KEY_VAR, &secrets.key_hex[..63]),
    ];
    let out = run_check(&config, &bad_key);
    assert_eq!(out.status.code(), Some(1));
    s.add("check (63-char key)", [out.stdout, out.stderr].concat());

    // Positive control: the same grep finds every canary in what we sent.
    let sent_hits = find_leaks(&s.sent, &c.needles()).join("\n");
    for label in ["card raw", "pin raw", "speech raw"] {
        assert!(
            sent_hits.contains(label),
            "the grep does not find {label} in the requests sent"
        );
    }
    let total: usize = s.collected.iter().map(|(_, b)| b.len()).sum();
    assert!(
        total > 10_000,
        "suspiciously little output collected ({total} bytes)"
    );
    for (surface, bytes) in &s.collected {
        assert_no_leak(surface, bytes, &c, &secrets);
    }
}

/// Behind an ingress that rewrites `Host`, an app that rebuilds the URL
/// from `Host` (Express with `twilio.webhook()`) needs the signed host.
#[tokio::test]
async fn rewrite_host_sends_the_signed_host_and_default_keeps_the_received_one() {
    for (rewrite, expected_host) in [(false, "app-internal.svc:8080"), (true, HOST)] {
        let h = harness(Behaviour::Twiml, |c| {
            c.upstream_extra.push(format!("rewrite_host = {rewrite}"))
        })
        .await;
        let path = "/ivr?step=1";
        let body = "CallSid=CA0123456789abcdef0123456789abcdef&Digits=1234";
        let request = RawRequest::new("POST", path, "app-internal.svc:8080")
            .header("Content-Type", FORM)
            .header(
                "X-Twilio-Signature",
                sign_form(&h.proxy.secrets.token, path, body),
            )
            .body(body);
        let response = client::send(h.proxy.addr, &request).await;
        assert_eq!(response.status, 200, "{}", response.text());
        let got = h.backend.requests();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].header("host"),
            Some(expected_host),
            "rewrite_host = {rewrite}"
        );
        // Either way the signature is over public_url, which the app can rebuild.
        assert_eq!(got[0].header("x-forwarded-host"), Some(HOST));
        assert_resigned(&got[0], &h.proxy.secrets.token);
    }
}

/// Listening sockets in `/proc/net/tcp` on `port` (state 0A = LISTEN).
fn listening_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1).is_some_and(|a| a.ends_with(&local)) && fields.get(3) == Some(&"0A")
        })
        .count()
}

/// Thread-per-core: each of `server.workers` threads has its own socket on
/// the one port (the kernel spreads connections across them) and its own
/// thread; concurrent callers on many connections are all served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_each_listen_on_the_port_and_all_callers_are_served() {
    let h = harness(Behaviour::Twiml, |c| c.workers = 3).await;
    assert_eq!(listening_sockets(h.proxy.addr.port()), 3);
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", h.proxy.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect();
    for worker in ["ivrguard-w1", "ivrguard-w2"] {
        assert!(
            threads.iter().any(|t| t == worker),
            "{worker} in {threads:?}"
        );
    }

    let token = h.proxy.secrets.token.clone();
    let addr = h.proxy.addr;
    let callers = (0..48).map(|i| {
        let body = join_raw(&gather_pieces(&format!("{i:04}"), "yes", &random_sid("CA")));
        let request = signed_post(&token, "/ivr/gather", &body);
        async move { client::send(addr, &request).await }
    });
    for response in futures_util::future::join_all(callers).await {
        assert_eq!(
            (response.status, response.text().as_str()),
            (200, BACKEND_TWIML)
        );
    }
    assert_eq!(h.backend.count(), 48);
}
