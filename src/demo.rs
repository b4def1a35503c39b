//! `ivrguard demo`: one simulated phone call through a real ivrguard, on
//! loopback only, with throw-away secrets.
//!
//! Three actors run in this process, and ivrguard between two of them is the
//! same code `ivrguard run` uses ([`crate::run::start`]):
//!
//! ```text
//! simulated Twilio ──signed webhook──▶ ivrguard ──ciphertext, re-signed──▶ sample IVR backend ──▶ "bank"
//!   (caller's digits)                  (verify, encrypt, log)              (the seed's two-step flow)  (holds the key)
//! ```
//!
//! The backend is the IVR of `seeds/001_…`: it asks for the last four card
//! digits, carries the answer it received in the next `<Gather action>` URL
//! as `encryptedCardDigits`, asks for a PIN, and hands both values to a bank
//! function that decrypts them. The backend validates every
//! `X-Twilio-Signature` it receives, as a Twilio app would.
//!
//! The demo checks what it shows: the backend never receives the digits the
//! caller typed, every signature check in the backend passes, the access
//! log holds no caller input, the bank recognises the caller, and a forged
//! webhook is refused before it reaches the backend. Any failure is an
//! error (exit 1). Secrets are generated for the run and never printed;
//! every wait has a timeout.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::RngCore;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::cipher::{FieldCipher, FieldKey};
use crate::config::Settings;
use crate::secret::Secret;
use crate::signature::{Verifier, SIGNATURE_HEADER};

/// What the caller types: the card digits and PIN the demo bank knows.
const CALLER_INPUT: [&str; 2] = ["1234", "4321"];
/// What the forger puts in its query.
const FORGED_DIGITS: &str = "9999";
/// The bank's one customer (the seed's hard-coded test values).
const ACCOUNT: &str = "AC12345678";
const BALANCE: &str = "12.55";
const CALLER_NUMBER: &str = "+14155550100";
const IVR_NUMBER: &str = "+14155550199";
/// The voice webhook of the demo phone number.
const VOICE_WEBHOOK_PATH: &str = "/ivr";

/// Names of the variables the demo config points at. They live only in the
/// map handed to [`Settings::load`], never in the process environment.
const TOKEN_VAR: &str = "IVRGUARD_DEMO_AUTH_TOKEN";
const KEY_VAR: &str = "IVRGUARD_DEMO_KEY";
const APP_TOKEN_VAR: &str = "IVRGUARD_DEMO_APP_TOKEN";

/// The whole tour; far more than it needs (well under a second).
const TOUR_TIMEOUT: Duration = Duration::from_secs(20);
/// One webhook round trip.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the log thread may take to write an access line.
const LOG_LINE_TIMEOUT: Duration = Duration::from_secs(3);
/// Stopping ivrguard (drain) at the end.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// At most this many webhooks per call (the flow needs three).
const MAX_WEBHOOKS: usize = 6;
/// Lowercase hex length of a 4-character value in the wire format:
/// 2 × (12-byte nonce + 4 bytes + 16-byte tag).
const FOUR_DIGIT_CIPHERTEXT_HEX_LEN: usize = 64;

const SAY_CARD: &str = "Please enter the last 4 digits of your payment card.";
const SAY_PIN: &str = "Please enter your 4 digit PIN.";
const SAY_REFUSED: &str = "We were not able to locate you in our system. Goodbye.";

/// `println!` that returns an error instead of panicking when stdout is
/// gone (`ivrguard demo | head`): exit 1 with one line, not a panic.
macro_rules! say {
    ($($arg:tt)*) => {
        writeln!(io::stdout(), $($arg)*).map_err(|e| format!("writing stdout: {e}"))?
    };
}

/// `ivrguard demo`: runs the tour and prints it. `Err` (exit 1) if anything
/// it demonstrates did not hold.
pub fn run() -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("demo: cannot start the async runtime: {e}"))?;
    let result = runtime.block_on(async {
        tokio::time::timeout(TOUR_TIMEOUT, tour())
            .await
            .unwrap_or_else(|_| Err(format!("demo: did not finish within {TOUR_TIMEOUT:?}")))
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The throw-away secrets of one run. Not `Debug`: nothing prints them.
struct Secrets {
    /// Twilio's auth token: the simulated Twilio signs with it, and only
    /// ivrguard verifies with it.
    token: Secret,
    /// The app's own token (`upstream.auth_token`), which ivrguard signs
    /// what it forwards with.
    app_token: Secret,
    key: FieldKey,
}

impl Secrets {
    fn generate() -> Self {
        Secrets {
            token: random_token(),
            app_token: random_token(),
            key: FieldKey::generate(),
        }
    }

    fn verifier(&self) -> Verifier {
        Verifier::new(&self.token, None, &[])
    }

    fn app_verifier(&self) -> Verifier {
        Verifier::new(&self.app_token, None, &[])
    }

    /// The environment [`Settings::load`] reads the secrets from.
    fn env(&self) -> HashMap<String, String> {
        let token = String::from_utf8_lossy(self.token.expose()).into_owned();
        let app_token = String::from_utf8_lossy(self.app_token.expose()).into_owned();
        HashMap::from([
            (TOKEN_VAR.to_owned(), token),
            (APP_TOKEN_VAR.to_owned(), app_token),
            (KEY_VAR.to_owned(), self.key.to_hex().to_string()),
        ])
    }
}

/// A random auth token, shaped like Twilio's (32 hex characters).
fn random_token() -> Secret {
    let mut raw = Zeroizing::new([0u8; 16]);
    rand::rngs::OsRng.fill_bytes(raw.as_mut());
    Secret::from(hex::encode(raw.as_ref()))
}

async fn tour() -> Result<(), String> {
    let secrets = Secrets::generate();

    // 1. The sample IVR backend, then ivrguard in front of it.
    let backend = Backend::new(secrets.app_verifier(), Bank::new(&secrets.key));
    let backend_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("demo: cannot listen on 127.0.0.1: {e}"))?;
    let backend_addr = backend_listener
        .local_addr()
        .map_err(|e| format!("demo: {e}"))?;
    let backend_task = tokio::spawn(serve_backend(backend_listener, backend.clone()));

    let toml = demo_config(backend_addr);
    let settings = load_settings(&toml, &secrets.env())?;
    let logs = LogCapture::default();
    let log_handle = crate::logging::init_with(&settings.log, logs.clone());
    let started = crate::run::start(&settings, Box::new(|| 0), std::future::pending()).await?;
    let origin = format!("http://{}", started.addr);
    backend
        .public_origin
        .set(origin.clone())
        .map_err(|_| "demo: origin set twice".to_string())?;

    print_intro(backend_addr, started.addr, &toml)?;

    // 2. The call, then a forged webhook.
    let caller = Caller::new(origin, secrets.verifier());
    let outcome = async {
        let heard = call(&caller, &backend, &logs).await?;
        let forged_refused = forged_webhook(&caller, &backend, &logs).await?;
        Ok::<_, String>((heard, forged_refused))
    }
    .await;

    // 3. Stop everything, whatever happened.
    drop(caller);
    let drained = tokio::time::timeout(STOP_TIMEOUT, started.stop())
        .await
        .unwrap_or(false);
    backend_task.abort();
    drop(log_handle);
    let (heard, forged_refused) = outcome?;
    if !drained {
        return Err("demo: ivrguard did not stop in time".into());
    }

    // 4. Check and summarise.
    summarise(&backend, &logs, &heard, forged_refused)
}

/// The ivrguard configuration of the demo: the same keys a real deployment
/// uses, with the secrets' variable names pointing into the demo's own map.
fn demo_config(backend: SocketAddr) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
drain_timeout_ms = 2000

[upstream]
url = "http://{backend}"
# The app's own token: ivrguard signs what it forwards with it.
auth_token_env = "{APP_TOKEN_VAR}"

[twilio]
auth_token_env = "{TOKEN_VAR}"
# public_url is not set: the signed URL is http:// + the Host header.

[encryption]
key_env = "{KEY_VAR}"
fields = ["Digits", "SpeechResult"]

[log]
format = "json"
"#
    )
}

/// Writes the config to a fresh file (it holds no secret, only variable
/// names), loads it, and removes it.
fn load_settings(toml: &str, env: &HashMap<String, String>) -> Result<Settings, String> {
    let path = temp_path();
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut file| file.write_all(toml.as_bytes()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&path);
        return Err(format!("demo: cannot write {}: {e}", path.display()));
    }
    let loaded = Settings::load(&path, env);
    let _ = std::fs::remove_file(&path);
    loaded.map_err(|e| format!("demo: the demo configuration is invalid: {e}"))
}

fn temp_path() -> PathBuf {
    let mut nonce = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut nonce);
    std::env::temp_dir().join(format!(
        "ivrguard-demo-{}-{}.toml",
        std::process::id(),
        hex::encode(nonce)
    ))
}

// ---------------------------------------------------------------------------
// The call
// ---------------------------------------------------------------------------

/// Follows the IVR from the incoming call to `<Hangup/>`, printing each
/// step. Returns what the caller heard last.
async fn call(
    caller: &Caller,
    backend: &Backend,
    logs: &LogCapture,
) -> Result<Vec<String>, String> {
    say!(
        "The call {} from {CALLER_NUMBER} to {IVR_NUMBER}",
        caller.call_sid
    );
    let mut inputs = CALLER_INPUT.iter();
    let mut action = VOICE_WEBHOOK_PATH.to_owned();
    let mut digits: Option<&str> = None;
    for step in 1..=MAX_WEBHOOKS {
        say!();
        match digits {
            None => say!("Step {step}: the call comes in"),
            Some(typed) => {
                say!("Step {step}: the caller answers the <Gather>");
                say!("  caller pressed      {typed}   (plaintext: the caller's own phone keypad)");
            }
        }
        let (status, twiml) = caller.post(&action, digits).await?;
        let twiml = Twiml::parse(&twiml);
        say!(
            "  Twilio -> ivrguard  POST {}   {}, signed with the auth token",
            display_target(&action),
            if digits.is_some() {
                "Digits as typed"
            } else {
                "call details"
            },
        );
        if status != StatusCode::OK {
            if let Ok(line) = logs.wait_for_access_line(step).await {
                say!("  access log          {line}");
            }
            return Err(format!(
                "demo: ivrguard answered {status} to a correctly signed webhook"
            ));
        }
        print_backend_side(backend, step)?;
        let line = logs.wait_for_access_line(step).await?;
        say!("  access log          {line}");
        for say in &twiml.says {
            say!("  caller heard        \"{say}\"");
        }
        match twiml.gather_action {
            Some(next) if !twiml.hangup => {
                action = next;
                digits = Some(
                    inputs
                        .next()
                        .ok_or("demo: the IVR asked for more input than the caller has")?,
                );
            }
            _ => {
                say!("  call ends           <Hangup/>");
                return Ok(twiml.says);
            }
        }
    }
    Err(format!(
        "demo: the call did not end after {MAX_WEBHOOKS} webhooks"
    ))
}

/// Prints what the backend received for webhook number `step`.
fn print_backend_side(backend: &Backend, step: usize) -> Result<(), String> {
    let received = backend.received();
    let got = received
        .get(step - 1)
        .ok_or_else(|| format!("demo: the backend did not receive webhook {step}"))?;
    say!(
        "  backend received    {} {}",
        got.method,
        display_target(&got.target)
    );
    match &got.digits {
        Some(digits) => say!("                      Digits = {}", shorten(digits)),
        None => say!("                      (no caller input in this request)"),
    }
    let check = match got.signature {
        Ok(()) => "valid, with its own token (ivrguard re-signed the rewritten request)".to_owned(),
        Err(reason) => format!("FAILED ({reason})"),
    };
    say!("                      its own X-Twilio-Signature check: {check}");
    if let Some(verdict) = &got.bank_verdict {
        say!("  bank (holds the key) {verdict}");
    }
    Ok(())
}

/// Sends a GET webhook with `Digits` in its query, signed with a token that
/// is not the account's. True if ivrguard refused it, the backend received
/// nothing, and the access log shows the query redacted.
async fn forged_webhook(
    caller: &Caller,
    backend: &Backend,
    logs: &LogCapture,
) -> Result<bool, String> {
    say!();
    say!("And a forged webhook: a GET with Digits in its query, signed with a wrong auth token");
    let before = backend.received().len();
    let forger = Caller {
        verifier: Arc::new(Verifier::new(&random_token(), None, &[])),
        ..caller.clone()
    };
    let target = format!("{VOICE_WEBHOOK_PATH}?step=getPin&Digits={FORGED_DIGITS}");
    let (status, _) = forger.get(&target).await?;
    let line = logs.wait_for_access_line(before + 1).await?;
    let after = backend.received().len();
    say!("  forger -> ivrguard  GET {target}   answered {status}");
    say!(
        "  backend received    {}",
        if after == before {
            "nothing"
        } else {
            "THE FORGED REQUEST"
        }
    );
    say!("  access log          {line}");
    // Refused before the backend, and its query redacted in the log.
    Ok(status == StatusCode::FORBIDDEN && after == before && line.contains("Digits=*REDACTED*"))
}

// ---------------------------------------------------------------------------
// Checks and summary
// ---------------------------------------------------------------------------

fn summarise(
    backend: &Backend,
    logs: &LogCapture,
    heard: &[String],
    forged_refused: bool,
) -> Result<(), String> {
    let received = backend.received();
    let n = received.len();
    let no_plaintext = n > 0
        && !received
            .iter()
            .any(|r| CALLER_INPUT.iter().any(|d| r.contains_token(d)))
        && received
            .iter()
            .flat_map(|r| r.digits.iter().chain(&r.encrypted_card_digits))
            .all(|v| is_four_char_ciphertext(v));
    let valid = received.iter().filter(|r| r.signature.is_ok()).count();
    let log_clean = !logs.lines().iter().any(|line| {
        CALLER_INPUT
            .iter()
            .chain([&FORGED_DIGITS])
            .any(|d| contains_token(line, d))
    });
    let answers = received.iter().filter(|r| r.digits.is_some()).count();
    let encrypted_logged = logs
        .lines()
        .iter()
        .filter(|line| is_access_line(line))
        .filter(|line| {
            string_field(line, "encrypted_fields")
                .is_some_and(|f| f.split(',').any(|f| f == "Digits"))
        })
        .count();
    let found = backend.bank.verdicts().last().is_some_and(Option::is_some)
        && heard.iter().any(|say| say.contains(BALANCE));

    let checks = [
        (
            no_plaintext,
            format!(
                "the backend never saw {} or {} in plaintext: not in the target, headers or body of any of the {n} requests it received, only ciphertext",
                CALLER_INPUT[0], CALLER_INPUT[1]
            ),
        ),
        (
            n > 0 && valid == n,
            format!("every X-Twilio-Signature check in the backend passed ({valid} of {n}): ivrguard re-signs what it rewrites"),
        ),
        (
            log_clean && encrypted_logged == answers,
            format!(
                "ivrguard's access log names Digits in encrypted_fields for the {answers} answers and shows no caller input"
            ),
        ),
        (
            forged_refused,
            "a forged webhook got 403, never reached the backend, and its Digits were *REDACTED* in the log".to_owned(),
        ),
        (
            found,
            if found {
                format!("the bank's verdict: account {ACCOUNT}, balance {BALANCE} (only the bank, which holds the key, decrypted the input)")
            } else {
                "the bank's verdict: it did not recognise the caller".to_owned()
            },
        ),
    ];
    say!();
    say!("Summary");
    for (ok, text) in &checks {
        say!("  [{}] {text}", if *ok { "ok" } else { "FAILED" });
    }
    say!();
    say!("To run ivrguard in front of your own app, see README.md, \"Put ivrguard in front of your app\":");
    say!("  ivrguard keygen  ->  a config like the one above  ->  ivrguard run --config FILE");

    match checks.iter().filter(|(ok, _)| !ok).count() {
        0 => Ok(()),
        failed => Err(format!(
            "demo: {failed} check(s) failed, see [FAILED] above"
        )),
    }
}

fn print_intro(backend: SocketAddr, ivrguard: SocketAddr, toml: &str) -> Result<(), String> {
    say!("ivrguard demo: a simulated Twilio call through ivrguard, on this machine only");
    say!();
    say!("  sample IVR backend  http://{backend}   the two-step IVR of the Twilio encrypted-<Gather> guide");
    say!("  ivrguard            http://{ivrguard}   verifies, encrypts Digits, re-signs, forwards to the backend");
    say!("  simulated Twilio    signs each webhook like Twilio and follows the TwiML it gets back");
    say!("  secrets             a random Twilio auth token, the app's own token and an AES-256 key, generated for this run, never printed");
    say!();
    say!("ivrguard's configuration for this run:");
    for line in toml.lines() {
        say!("  | {line}");
    }
    say!();
    Ok(())
}

/// `9f3a1c…a0e27b (64 hex chars)` for long values; short ones as they are.
fn shorten(value: &str) -> String {
    let n = value.chars().count();
    if n <= 16 {
        return value.to_owned();
    }
    let head: String = value.chars().take(6).collect();
    let tail: String = value.chars().skip(n - 6).collect();
    if value.bytes().all(|b| b.is_ascii_hexdigit()) {
        format!("{head}…{tail} ({n} hex chars)")
    } else {
        format!("{head}…{tail} ({n} chars)")
    }
}

/// A request target with long query values shortened, for display.
fn display_target(target: &str) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) => format!("{name}={}", shorten(value)),
            None => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

/// Whether `token` occurs in `text` as a whole word: not inside a longer
/// run of letters, digits and dots. So `Digits=1234&` matches, while hex
/// ciphertext, SIDs, port numbers and timestamps that merely contain the
/// same four digits (as random hex does, now and then) do not.
fn contains_token(text: &str, token: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
        .any(|word| word == token)
}

fn is_four_char_ciphertext(value: &str) -> bool {
    value.len() == FOUR_DIGIT_CIPHERTEXT_HEX_LEN
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

// ---------------------------------------------------------------------------
// The simulated Twilio caller
// ---------------------------------------------------------------------------

/// Sends webhooks the way Twilio does for one call.
#[derive(Clone)]
struct Caller {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    /// `http://<ivrguard>`: the URL Twilio is configured with.
    origin: String,
    verifier: Arc<Verifier>,
    account_sid: String,
    call_sid: String,
}

impl Caller {
    fn new(origin: String, verifier: Verifier) -> Self {
        Caller {
            client: Client::builder(TokioExecutor::new()).build_http(),
            origin,
            verifier: Arc::new(verifier),
            account_sid: random_sid("AC"),
            call_sid: random_sid("CA"),
        }
    }

    /// POSTs one webhook to `target` (a path and query on ivrguard), as
    /// Twilio does for a call and for each `<Gather>` answer, and returns the
    /// status and TwiML.
    async fn post(
        &self,
        target: &str,
        digits: Option<&str>,
    ) -> Result<(StatusCode, String), String> {
        let mut params: Vec<(&str, &str)> = vec![
            ("AccountSid", &self.account_sid),
            ("ApiVersion", "2010-04-01"),
            ("CallSid", &self.call_sid),
            (
                "CallStatus",
                if digits.is_some() {
                    "in-progress"
                } else {
                    "ringing"
                },
            ),
            ("Called", IVR_NUMBER),
            ("Caller", CALLER_NUMBER),
            ("Direction", "inbound"),
            ("From", CALLER_NUMBER),
            ("To", IVR_NUMBER),
        ];
        if let Some(digits) = digits {
            // numDigits reached: no finishing key.
            params.extend([
                ("Digits", digits),
                ("FinishedOnKey", ""),
                ("msg", "Gather End"),
            ]);
        }
        let url = format!("{}{target}", self.origin);
        let signature = self.verifier.sign(&url, &params);
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&params)
            .finish();
        let request = Request::post(&url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(USER_AGENT, "TwilioProxy/1.1")
            .header(SIGNATURE_HEADER, signature)
            .body(Full::new(Bytes::from(body)));
        self.send(request).await
    }

    /// A GET webhook: everything, `Digits` included, in the signed URL.
    async fn get(&self, target: &str) -> Result<(StatusCode, String), String> {
        let url = format!("{}{target}", self.origin);
        let signature = self.verifier.sign::<&str, &str>(&url, &[]);
        let request = Request::get(&url)
            .header(USER_AGENT, "TwilioProxy/1.1")
            .header(SIGNATURE_HEADER, signature)
            .body(Full::new(Bytes::new()));
        self.send(request).await
    }

    async fn send(
        &self,
        request: http::Result<Request<Full<Bytes>>>,
    ) -> Result<(StatusCode, String), String> {
        let request =
            request.map_err(|e| format!("demo: cannot build the webhook request: {e}"))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("demo: webhook failed: {e}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("demo: reading the TwiML failed: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(WEBHOOK_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("demo: no answer to the webhook within {WEBHOOK_TIMEOUT:?}"))?
    }
}

/// A Twilio-shaped SID: the prefix and 32 lowercase hex digits.
fn random_sid(prefix: &str) -> String {
    let mut raw = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut raw);
    format!("{prefix}{}", hex::encode(raw))
}

/// The parts of a TwiML answer the caller acts on.
struct Twiml {
    says: Vec<String>,
    gather_action: Option<String>,
    hangup: bool,
}

impl Twiml {
    /// Simple scanning, enough for the TwiML the sample backend writes.
    fn parse(xml: &str) -> Self {
        let mut says = Vec::new();
        let mut rest = xml;
        while let Some((_, after)) = rest.split_once("<Say>") {
            let Some((text, after)) = after.split_once("</Say>") else {
                break;
            };
            says.push(xml_unescape(text));
            rest = after;
        }
        let gather_action = xml
            .split_once("<Gather ")
            .and_then(|(_, gather)| gather.split_once("action=\""))
            .and_then(|(_, value)| value.split_once('"'))
            .map(|(action, _)| xml_unescape(action));
        Twiml {
            says,
            gather_action,
            hangup: xml.contains("<Hangup/>"),
        }
    }
}

fn xml_unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

// ---------------------------------------------------------------------------
// The sample IVR backend and its bank
// ---------------------------------------------------------------------------

/// One request as the backend received it.
struct Received {
    method: String,
    /// Path and query.
    target: String,
    headers: Vec<(String, String)>,
    body: String,
    /// The form parameters, decoded (query then body).
    params: Vec<(String, String)>,
    digits: Option<String>,
    encrypted_card_digits: Option<String>,
    signature: Result<(), &'static str>,
    bank_verdict: Option<String>,
}

impl Received {
    /// Whether `token` appears anywhere in the request as received: target,
    /// header values, body, and the percent-decoded parameters.
    fn contains_token(&self, token: &str) -> bool {
        let raw = [self.target.as_str(), self.body.as_str()];
        raw.into_iter()
            .chain(self.headers.iter().map(|(_, v)| v.as_str()))
            .any(|t| contains_token(t, token))
            || self
                .params
                .iter()
                .any(|(n, v)| contains_token(n, token) || contains_token(v, token))
    }
}

/// The app behind ivrguard. Knows its own token (to validate what ivrguard
/// signs), but neither Twilio's auth token nor the key: only [`Bank`] has
/// that.
#[derive(Clone)]
struct Backend {
    verifier: Arc<Verifier>,
    /// `http://<ivrguard>`: the public URL the app validates signatures
    /// against, set once ivrguard has bound its port.
    public_origin: Arc<OnceLock<String>>,
    bank: Arc<Bank>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Backend {
    fn new(verifier: Verifier, bank: Bank) -> Self {
        Backend {
            verifier: Arc::new(verifier),
            public_origin: Arc::new(OnceLock::new()),
            bank: Arc::new(bank),
            received: Arc::default(),
        }
    }

    fn received(&self) -> MutexGuard<'_, Vec<Received>> {
        self.received.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The seed's `encrypted-gather` function, steps `getLast4CC` →
    /// `getPin` → `processData`.
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let body = match tokio::time::timeout(WEBHOOK_TIMEOUT, body.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            _ => return text(StatusCode::BAD_REQUEST, "Bad Request"),
        };
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let query: Vec<(String, String)> =
            form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();

        let url = format!(
            "{}{target}",
            self.public_origin.get().map_or("", String::as_str)
        );
        let signature = self
            .verifier
            .verify(&url, &form, &parts.headers)
            .map(|_| ())
            .map_err(|e| e.reason());

        let get = |params: &[(String, String)], name: &str| {
            params
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let step = get(&query, "step");
        let digits = get(&form, "Digits");
        let encrypted_card_digits = get(&query, "encryptedCardDigits");
        let mut bank_verdict = None;

        let twiml = match (&signature, step.as_deref(), &digits) {
            (Err(_), _, _) => None,
            (Ok(()), None, _) => Some(gather("/ivr?step=getPin", SAY_CARD)),
            (Ok(()), Some("getPin"), Some(card)) => {
                let action = format!("/ivr?step=processData&encryptedCardDigits={card}");
                Some(gather(&action, SAY_PIN))
            }
            (Ok(()), Some("processData"), Some(pin)) => {
                let account = encrypted_card_digits
                    .as_deref()
                    .and_then(|card| self.bank.lookup(card, pin));
                bank_verdict = Some(match &account {
                    Some(a) => format!(
                        "decrypted both values: a customer -> account {}, balance {}",
                        a.number, a.balance
                    ),
                    None => "decrypted both values: no such customer".to_owned(),
                });
                Some(match account {
                    Some(a) => say_and_hang_up(&format!(
                        "Thank you. Your account number is {} and your balance is {}",
                        a.number, a.balance
                    )),
                    None => say_and_hang_up(SAY_REFUSED),
                })
            }
            (Ok(()), _, _) => Some(say_and_hang_up(SAY_REFUSED)),
        };

        let headers = header_list(&parts.headers);
        self.received().push(Received {
            method: parts.method.to_string(),
            target,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            params: query.into_iter().chain(form).collect(),
            digits,
            encrypted_card_digits,
            signature,
            bank_verdict,
        });
        match twiml {
            Some(xml) => {
                let mut response = Response::new(Full::new(Bytes::from(xml)));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, http::HeaderValue::from_static("text/xml"));
                response
            }
            // What an app that validates signatures answers.
            None => text(StatusCode::FORBIDDEN, "Forbidden"),
        }
    }
}

fn header_list(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn gather(action: &str, prompt: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><Response><Gather action="{}" method="POST" numDigits="4" timeout="10"><Say>{}</Say></Gather></Response>"#,
        xml_escape(action),
        xml_escape(prompt)
    )
}

fn say_and_hang_up(text: &str) -> String {
    let mut xml = String::from(r#"<?xml version="1.0" encoding="UTF-8"?><Response>"#);
    let _ = write!(xml, "<Say>{}</Say><Hangup/></Response>", xml_escape(text));
    xml
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

/// Accepts connections until the task is aborted (which aborts every
/// connection with it).
async fn serve_backend(listener: TcpListener, backend: Backend) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let backend = backend.clone();
        let service = service_fn(move |request| {
            let backend = backend.clone();
            async move { Ok::<_, Infallible>(backend.handle(request).await) }
        });
        connections.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// The downstream "bank" of the seed's `decrypt-gather` function: the only
/// place that holds the key, so the only place the plaintext exists after
/// ivrguard.
struct Bank {
    cipher: FieldCipher,
    verdicts: Mutex<Vec<Option<Account>>>,
}

#[derive(Clone)]
struct Account {
    number: &'static str,
    balance: &'static str,
}

impl Bank {
    fn new(key: &FieldKey) -> Self {
        Bank {
            cipher: FieldCipher::new(key),
            verdicts: Mutex::default(),
        }
    }

    /// The account for these encrypted card digits and PIN, if any.
    fn lookup(&self, encrypted_card_digits: &str, encrypted_pin: &str) -> Option<Account> {
        let card = self.cipher.decrypt_hex(encrypted_card_digits.as_bytes());
        let pin = self.cipher.decrypt_hex(encrypted_pin.as_bytes());
        let account = match (card, pin) {
            (Ok(card), Ok(pin))
                if card.as_slice() == CALLER_INPUT[0].as_bytes()
                    && pin.as_slice() == CALLER_INPUT[1].as_bytes() =>
            {
                Some(Account {
                    number: ACCOUNT,
                    balance: BALANCE,
                })
            }
            _ => None,
        };
        self.verdicts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(account.clone());
        account
    }

    fn verdicts(&self) -> Vec<Option<Account>> {
        self.verdicts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

// ---------------------------------------------------------------------------
// ivrguard's log, captured
// ---------------------------------------------------------------------------

/// The writer ivrguard's logging writes to in the demo: the real, scrubbed
/// lines, kept so the demo can print the access lines where they belong.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Every complete line so far.
    fn lines(&self) -> Vec<String> {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let complete = bytes
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(&bytes[..0], |end| &bytes[..end]);
        String::from_utf8_lossy(complete)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The `n`-th access line (1-based), waiting for the log thread to write it.
    async fn wait_for_access_line(&self, n: usize) -> Result<String, String> {
        let deadline = Instant::now() + LOG_LINE_TIMEOUT;
        loop {
            if let Some(line) = self
                .lines()
                .into_iter()
                .filter(|l| is_access_line(l))
                .nth(n - 1)
            {
                return Ok(line);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "demo: access log line {n} was not written within {LOG_LINE_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Found by text rather than by parsing: the demo prints the line as
/// ivrguard wrote it, whatever it is.
fn is_access_line(line: &str) -> bool {
    string_field(line, "target") == Some("ivrguard::access")
}

/// The value of `"name":"value"` in a JSON log line (values without escapes).
fn string_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let (_, rest) = line.split_once(&format!("\"{name}\":\""))?;
    rest.split_once('"').map(|(value, _)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_token_matches_whole_words_only() {
        let cases: &[(&str, bool)] = &[
            ("Digits=1234&x=1", true),
            ("Digits=1234", true),
            ("caller pressed 1234", true),
            (r#"{"q":"1234"}"#, true),
            ("a1234f0c", false),
            ("127.0.0.1:41234", false),
            ("latency 0.1234", false),
            ("CA0123456789abcdef", false),
            ("12345", false),
        ];
        for (text, want) in cases {
            assert_eq!(contains_token(text, "1234"), *want, "{text}");
        }
    }

    #[test]
    fn twiml_parse_follows_gather_and_unescapes_action() {
        let xml = gather("/ivr?step=processData&encryptedCardDigits=ab12", SAY_PIN);
        assert!(xml.contains("step=processData&amp;encryptedCardDigits=ab12"));
        let twiml = Twiml::parse(&xml);
        assert_eq!(
            twiml.gather_action.as_deref(),
            Some("/ivr?step=processData&encryptedCardDigits=ab12")
        );
        assert_eq!(twiml.says, [SAY_PIN]);
        assert!(!twiml.hangup);

        let end = Twiml::parse(&say_and_hang_up(SAY_REFUSED));
        assert_eq!(end.gather_action, None);
        assert_eq!(end.says, [SAY_REFUSED]);
        assert!(end.hangup);
    }

    #[test]
    fn string_field_reads_log_values() {
        let line = r#"{"message":"access","encrypted_fields":"Digits","latency_ms":1.*REDACTED*,"target":"ivrguard::access"}"#;
        assert!(is_access_line(line));
        assert_eq!(string_field(line, "encrypted_fields"), Some("Digits"));
        assert_eq!(string_field(line, "missing"), None);
        assert!(!is_access_line(
            r#"{"message":"ivrguard listening","target":"ivrguard::run"}"#
        ));
    }

    #[test]
    fn shorten_keeps_short_values_and_marks_hex_length() {
        assert_eq!(shorten("getPin"), "getPin");
        let hex = "9f3a1c".to_owned() + &"0".repeat(52) + "a0e27b";
        assert_eq!(shorten(&hex), "9f3a1c…a0e27b (64 hex chars)");
    }

    #[test]
    fn bank_knows_only_the_seed_customer() {
        let key = FieldKey::generate();
        let cipher = FieldCipher::new(&key);
        let bank = Bank::new(&key);
        let card = cipher.encrypt_hex(CALLER_INPUT[0].as_bytes());
        let pin = cipher.encrypt_hex(CALLER_INPUT[1].as_bytes());
        let wrong = cipher.encrypt_hex(b"0000");
        assert!(bank.lookup(&card, &pin).is_some());
        assert!(bank.lookup(&card, &wrong).is_none());
        assert!(bank.lookup(&pin, &card).is_none());
        assert!(bank.lookup("not hex", &pin).is_none());
    }
}
