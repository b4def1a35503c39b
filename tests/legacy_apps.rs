//! Real legacy apps behind ivrguard, driven by complete simulated calls
//! (issue 3).
//!
//! ```text
//! call_simulator.py ──signed──▶ [nginx, TLS] ──▶ ivrguard ──▶ wiretap ──▶ legacy app ──▶ bank-service
//!  (plays Twilio: twilio          (optional)      (real binary)  (records    (examples/legacy-node   (examples/
//!   9.13.0 RequestValidator)                                      every byte)  or legacy-python)       bank-service)
//! ```
//!
//! - `tests/legacy/call_simulator.py` signs every webhook with the Python SDK
//!   exactly as Twilio does, follows `<Gather action>` and `<Redirect>` URLs
//!   and stops at `<Hangup/>`.
//! - The apps are unchanged legacy code: Express with `twilio.webhook()` and
//!   Flask with `RequestValidator` in a decorator; both log every parameter
//!   they receive and hold no key. The bank service alone decrypts.
//! - The wiretap is a TCP relay between ivrguard and the app that keeps every
//!   byte the app was sent, so "the app never received plaintext" is checked
//!   on the wire, not only in the app's own logs.
//!
//! Every process is killed when its handle drops, every wait has a deadline,
//! and everything listens on 127.0.0.1 only. The Node and Python dependencies
//! are installed project-locally by `./tests/run.sh`, which also installs
//! nginx and openssl when they are missing. Without them these tests fail and
//! say why; they never skip.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rand::Rng;
use regex::Regex;
use serde_json::{json, Value};
use tempfile::TempDir;

const IVRGUARD: &str = env!("CARGO_BIN_EXE_ivrguard");
/// The phone number's voice webhook as configured at Twilio.
const VOICE_URL: &str = "https://ivr.example.com/voice";
const PUBLIC_URL: &str = "https://ivr.example.com";
const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
/// The bank's one customer (the seed's test values).
const CARD: &str = "1234";
const PIN: &str = "4321";
const BALANCE: &str = "Thank you. Your account number is AC12345678 and your balance is 12.55.";
const REFUSAL: &str = "We were not able to locate you in our system. Goodbye.";
/// Hex length of one encrypted 4-digit value: nonce(12) ‖ 4 bytes ‖ tag(16).
const CIPHERTEXT_HEX_LEN: usize = 2 * (12 + 4 + 16);
/// The longest any single wait may take: a process start, a line, a call.
const STEP: Duration = Duration::from_secs(30);
const SETUP_HINT: &str = "run ./tests/run.sh once: it installs the examples' dependencies \
    (npm ci in examples/legacy-node, a venv in examples/legacy-python/.venv), \
    tests/interop/.venv (the simulator's twilio SDK), nginx and openssl";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} not found at {}: {SETUP_HINT}",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------
// Processes: output collected on threads, killed on drop, waits with deadlines.
// ---------------------------------------------------------------------------

/// A long-running child. Its stdout and stderr are kept in full and also
/// arrive line by line on a channel (for readiness lines).
struct Proc {
    name: String,
    child: Child,
    output: Arc<Mutex<String>>,
    lines: Receiver<String>,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}. {SETUP_HINT}"));
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        collect_lines(child.stdout.take().expect("piped"), &output, tx.clone());
        collect_lines(child.stderr.take().expect("piped"), &output, tx);
        Proc {
            name: name.to_owned(),
            child,
            output,
            lines,
        }
    }

    /// Waits for the first line for which `parse` returns something.
    fn wait_for<T>(&mut self, what: &str, parse: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(found) = parse(&line) {
                        return found;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: no {what} within {STEP:?}\n{}",
                        self.name,
                        self.output()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    panic!("{}: exited before {what}\n{}", self.name, self.output())
                }
            }
        }
    }

    /// Waits for a line announcing `listening on http://127.0.0.1:PORT`.
    fn wait_listening(&mut self) -> SocketAddr {
        let re = Regex::new(r"listening on http://(127\.0\.0\.1:\d+)").expect("regex");
        self.wait_for("'listening on' line", |line| {
            re.captures(line).map(|c| c[1].parse().expect("address"))
        })
    }

    /// Everything the process wrote so far, stdout and stderr interleaved.
    fn output(&self) -> String {
        self.output.lock().expect("output lock").clone()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect_lines(from: impl Read + Send + 'static, into: &Arc<Mutex<String>>, tx: Sender<String>) {
    let into = Arc::clone(into);
    thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            {
                let mut all = into.lock().expect("output lock");
                all.push_str(&line);
                all.push('\n');
            }
            let _ = tx.send(line);
        }
    });
}

/// Runs `cmd` to completion with `input` on stdin; killed after `limit`.
fn run_to_end(mut cmd: Command, input: &[u8], what: &str, limit: Duration) -> (String, String) {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}. {SETUP_HINT}"));
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_vec();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let read = |from: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let mut from = from;
            let _ = from.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped")));
    let stderr = read(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what}: still running after {limit:?}, killed\n{}",
                stderr.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    let (out, err) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    assert!(status.success(), "{what} failed ({status}):\n{err}\n{out}");
    (out, err)
}

/// A command with an empty environment but `PATH`: nothing from the
/// developer's shell (a real `TWILIO_AUTH_TOKEN`, `IVRGUARD__…`) leaks in.
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd
}

/// A port that was free a moment ago, for programs that cannot report the
/// one they bound (nginx).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

// ---------------------------------------------------------------------------
// The wiretap: a TCP relay that records every byte sent to the app.
// ---------------------------------------------------------------------------

struct Wiretap {
    addr: SocketAddr,
    sent: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl Wiretap {
    fn start(target: SocketAddr) -> Wiretap {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind wiretap");
        let addr = listener.local_addr().expect("wiretap address");
        let sent = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (record, stopped) = (Arc::clone(&sent), Arc::clone(&stop));
        thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let record = Arc::clone(&record);
                thread::spawn(move || relay(client, target, &record));
            }
        });
        Wiretap { addr, sent, stop }
    }

    fn bytes(&self) -> Vec<u8> {
        self.sent.lock().expect("wiretap lock").clone()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// How many HTTP requests the app was sent.
    fn requests(&self) -> usize {
        // Not anchored to a line start: on a kept-alive connection the next
        // request line follows the previous body directly.
        Regex::new(r"(?:GET|POST) /\S* HTTP/1\.1\r\n")
            .expect("regex")
            .find_iter(&self.text())
            .count()
    }
}

impl Drop for Wiretap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn relay(client: TcpStream, target: SocketAddr, record: &Mutex<Vec<u8>>) {
    let Ok(app) = TcpStream::connect_timeout(&target, STEP) else {
        return;
    };
    let (Ok(mut client_in), Ok(mut app_out)) = (client.try_clone(), app.try_clone()) else {
        return;
    };
    let (mut app_in, mut client_out) = (app, client);
    let back = thread::spawn(move || {
        let _ = std::io::copy(&mut app_in, &mut client_out);
        let _ = client_out.shutdown(Shutdown::Write);
    });
    let mut buf = [0u8; 16 * 1024];
    loop {
        match client_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                record
                    .lock()
                    .expect("wiretap lock")
                    .extend_from_slice(&buf[..n]);
                if app_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = app_out.shutdown(Shutdown::Write);
    let _ = back.join();
}

// ---------------------------------------------------------------------------
// The actors.
// ---------------------------------------------------------------------------

struct Secrets {
    /// The Twilio auth token.
    token: String,
    key_hex: String,
    /// The app's own token (`upstream.auth_token`), if it has one.
    app_token: Option<String>,
}

impl Secrets {
    fn generate() -> Secrets {
        let mut rng = rand::thread_rng();
        Secrets {
            token: hex::encode(rng.gen::<[u8; 16]>()),
            key_hex: hex::encode(rng.gen::<[u8; 32]>()),
            app_token: None,
        }
    }

    /// With a token of the app's own, made by `ivrguard keygen` as the
    /// README says.
    fn with_app_token() -> Secrets {
        let output = clean_command(IVRGUARD)
            .arg("keygen")
            .output()
            .expect("run ivrguard keygen");
        assert!(output.status.success(), "ivrguard keygen: {output:?}");
        let token = String::from_utf8(output.stdout).expect("UTF-8");
        Secrets {
            app_token: Some(token.trim_end().to_owned()),
            ..Secrets::generate()
        }
    }

    /// The token the app validates with.
    fn app_facing(&self) -> &str {
        self.app_token.as_deref().unwrap_or(&self.token)
    }
}

/// Four random digits unlike the customer's, starting with 5–9 so they
/// cannot be mistaken for a year in a log timestamp.
fn wrong_digits() -> String {
    let mut rng = rand::thread_rng();
    loop {
        let d: String = std::iter::once(char::from(b'5' + rng.gen_range(0..5u8)))
            .chain((0..3).map(|_| char::from(b'0' + rng.gen_range(0..10u8))))
            .collect();
        if d != CARD && d != PIN {
            return d;
        }
    }
}

/// `examples/bank-service`, recording what it decrypted to a file.
struct Bank {
    proc: Proc,
    addr: SocketAddr,
    record: PathBuf,
}

impl Bank {
    fn start(dir: &Path, secrets: &Secrets) -> Bank {
        Bank::start_with_keys(dir, &[("IVRGUARD_KEY", &secrets.key_hex)])
    }

    /// With `keys` as its key variables (`IVRGUARD_KEY`, and during a
    /// rotation `IVRGUARD_KEY_NEXT`/`_PREVIOUS`).
    fn start_with_keys(dir: &Path, keys: &[(&str, &str)]) -> Bank {
        let record = dir.join("bank-decrypted.jsonl");
        let mut cmd = clean_command("node");
        cmd.arg(require(
            root().join("examples/bank-service/server.js"),
            "the bank service",
        ))
        .env("PORT", "0")
        .env("HOST", "127.0.0.1")
        .env("BANK_TEST_RECORD_FILE", &record);
        for (name, key) in keys {
            cmd.env(name, key);
        }
        let mut proc = Proc::spawn("bank-service", cmd);
        let addr = proc.wait_listening();
        Bank { proc, addr, record }
    }

    /// The (card, PIN) pairs the bank decrypted, in order.
    fn decrypted(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(&self.record).unwrap_or_default();
        text.lines()
            .map(|line| {
                let v: Value = serde_json::from_str(line).expect("bank record is JSON");
                (
                    v["cardLast4"].as_str().expect("cardLast4").to_owned(),
                    v["pin"].as_str().expect("pin").to_owned(),
                )
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum AppKind {
    /// `examples/legacy-node`: Express + `twilio.webhook()`.
    Express,
    /// `examples/legacy-python`: Flask + `RequestValidator` in a decorator.
    Flask,
}

struct LegacyApp {
    kind: AppKind,
    proc: Proc,
    addr: SocketAddr,
}

impl LegacyApp {
    fn start(kind: AppKind, token: &str, bank: SocketAddr) -> LegacyApp {
        let mut cmd = match kind {
            AppKind::Express => {
                let dir = root().join("examples/legacy-node");
                require(
                    dir.join("node_modules/express"),
                    "examples/legacy-node/node_modules",
                );
                let mut cmd = clean_command("node");
                cmd.arg(dir.join("server.js")).current_dir(dir);
                cmd
            }
            AppKind::Flask => {
                let dir = root().join("examples/legacy-python");
                let python = require(dir.join(".venv/bin/python"), "the legacy-python venv");
                let mut cmd = clean_command(python);
                cmd.arg(dir.join("app.py"))
                    .current_dir(dir)
                    .env("PYTHONUNBUFFERED", "1")
                    .env("PYTHONDONTWRITEBYTECODE", "1")
                    .env("PYTHONIOENCODING", "utf-8");
                cmd
            }
        };
        cmd.env("PORT", "0")
            .env("HOST", "127.0.0.1")
            .env("TWILIO_AUTH_TOKEN", token)
            .env("BANK_URL", format!("http://{bank}"));
        let mut proc = Proc::spawn(&format!("{kind:?} app"), cmd);
        let addr = proc.wait_listening();
        LegacyApp { kind, proc, addr }
    }

    /// How many requests passed the app's own signature validation (each
    /// app logs one line per request that `twilio.webhook()` /
    /// `RequestValidator` accepted).
    fn validated(&self) -> usize {
        let marker = match self.kind {
            AppKind::Express => "twilio.webhook(): signature valid",
            AppKind::Flask => "RequestValidator: signature valid",
        };
        self.proc.output().matches(marker).count()
    }
}

/// Where ivrguard takes the origin of the signed URL from.
#[derive(Clone, Copy)]
enum OriginFrom {
    /// `twilio.public_url = PUBLIC_URL`.
    PublicUrl,
    /// No `public_url`; `server.trust_forwarded_headers` as given.
    Request { trust_forwarded: bool },
}

struct Ivrguard {
    proc: Proc,
    addr: SocketAddr,
}

impl Ivrguard {
    fn start(dir: &Path, upstream: SocketAddr, origin: OriginFrom, secrets: &Secrets) -> Ivrguard {
        let (public_url, trust) = match origin {
            OriginFrom::PublicUrl => (format!("public_url = \"{PUBLIC_URL}\"\n"), false),
            OriginFrom::Request { trust_forwarded } => (String::new(), trust_forwarded),
        };
        let app_token = match secrets.app_token {
            Some(_) => "auth_token_env = \"APP_AUTH_TOKEN\"\n",
            None => "",
        };
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntrust_forwarded_headers = {trust}\n\
             [upstream]\nurl = \"http://{upstream}\"\non_error = \"status\"\n{app_token}\
             [twilio]\nauth_token_env = \"TWILIO_AUTH_TOKEN\"\n{public_url}\
             [encryption]\nkey_env = \"IVRGUARD_KEY\"\n\
             [log]\nformat = \"json\"\n"
        );
        let path = dir.join(format!("ivrguard-{}.toml", rand::thread_rng().gen::<u32>()));
        std::fs::write(&path, config).expect("write ivrguard config");
        let mut cmd = clean_command(IVRGUARD);
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .env("TWILIO_AUTH_TOKEN", &secrets.token)
            .env("IVRGUARD_KEY", &secrets.key_hex);
        if let Some(token) = &secrets.app_token {
            cmd.env("APP_AUTH_TOKEN", token);
        }
        let mut proc = Proc::spawn("ivrguard", cmd);
        let addr = proc.wait_for("'ivrguard listening' line", |line| {
            let v: Value = serde_json::from_str(line).ok()?;
            (v["message"] == "ivrguard listening").then(|| {
                v["listen"]
                    .as_str()
                    .expect("listen field")
                    .parse()
                    .expect("listen address")
            })
        });
        Ivrguard { proc, addr }
    }

    /// The access-log records so far.
    fn access_lines(&self) -> Vec<Value> {
        self.proc
            .output()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "access")
            .collect()
    }

    /// Waits until `n` access lines were written (they go through a queue).
    fn wait_access_lines(&mut self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + STEP;
        loop {
            let lines = self.access_lines();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{} access lines after {STEP:?}, {n} expected:\n{}",
                lines.len(),
                self.proc.output()
            );
            // Wake on the next line rather than polling.
            let _ = self.proc.lines.recv_timeout(Duration::from_millis(200));
        }
    }
}

/// nginx from the distribution, as a foreground child with its own prefix:
/// TLS on 127.0.0.1 with a fresh self-signed certificate for
/// `ivr.example.com`, proxying to ivrguard with `X-Forwarded-Proto` and
/// `X-Forwarded-Host` set (overwritten) the usual way.
struct Nginx {
    _proc: Proc,
    port: u16,
    ca_file: PathBuf,
}

impl Nginx {
    fn start(dir: &Path, upstream: SocketAddr) -> Nginx {
        let nginx = ["nginx", "/usr/sbin/nginx"]
            .into_iter()
            .find(|p| Command::new(p).arg("-v").output().is_ok())
            .unwrap_or_else(|| panic!("nginx not found (apt-get install nginx). {SETUP_HINT}"));
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(prefix.join("logs")).expect("nginx prefix");
        let (cert, key) = (prefix.join("cert.pem"), prefix.join("key.pem"));
        let mut openssl = clean_command("openssl");
        openssl
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .arg("ec_paramgen_curve:prime256v1")
            .args(["-nodes", "-days", "1", "-subj", "/CN=ivr.example.com"])
            .args(["-addext", "subjectAltName=DNS:ivr.example.com"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert);
        run_to_end(openssl, b"", "openssl req (self-signed certificate)", STEP);

        // A port can be taken between free_port() and nginx's bind: retry.
        for _attempt in 0..5 {
            let port = free_port();
            let p = prefix.display();
            let conf = format!(
                r#"daemon off;
master_process off;
worker_processes 1;
pid {p}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log {p}/logs/access.log;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name ivr.example.com;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"#,
                cert = cert.display(),
                key = key.display(),
            );
            let conf_path = prefix.join("nginx.conf");
            std::fs::write(&conf_path, conf).expect("write nginx.conf");
            let mut cmd = clean_command(nginx);
            cmd.arg("-p")
                .arg(&prefix)
                .arg("-e")
                .arg("stderr")
                .arg("-c")
                .arg(&conf_path);
            let mut proc = Proc::spawn("nginx", cmd);
            let deadline = Instant::now() + STEP;
            loop {
                if let Some(status) = proc.exited() {
                    let out = proc.output();
                    if out.contains("Address already in use") {
                        break; // next attempt
                    }
                    panic!("nginx exited ({status}):\n{out}");
                }
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    return Nginx {
                        _proc: proc,
                        port,
                        ca_file: cert,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "nginx not accepting on {addr} after {STEP:?}:\n{}",
                    proc.output()
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("nginx: no free port after 5 attempts");
    }
}

// ---------------------------------------------------------------------------
// The simulated Twilio.
// ---------------------------------------------------------------------------

/// One call's script: the caller's answer to each `<Gather>` (`None`: no
/// input, the Gather times out).
fn call(id: &str, url: &str, inputs: &[Option<&str>]) -> Value {
    json!({ "id": id, "url": url, "inputs": inputs })
}

/// Plays the calls through `connect` (TLS when `ca_file` is given) and
/// returns each call's result, keyed by id.
fn simulate(
    connect: SocketAddr,
    ca_file: Option<&Path>,
    token: &str,
    calls: &[Value],
) -> BTreeMap<String, Value> {
    let python = require(
        root().join("tests/interop/.venv/bin/python"),
        "the simulator's Python (tests/interop/.venv)",
    );
    let mut cmd = clean_command(python);
    cmd.arg(root().join("tests/legacy/call_simulator.py"))
        .env("TWILIO_AUTH_TOKEN", token)
        .env("PYTHONIOENCODING", "utf-8")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let doc = json!({
        "connect": {
            "host": connect.ip().to_string(),
            "port": connect.port(),
            "tls_ca_file": ca_file.map(|p| p.display().to_string()),
        },
        "account_sid": ACCOUNT_SID,
        "calls": calls,
    });
    let limit = STEP * 2;
    let (out, _) = run_to_end(cmd, doc.to_string().as_bytes(), "call_simulator.py", limit);
    let results: BTreeMap<String, Value> = out
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("simulator output is not JSON ({e}): {l}"));
            (v["id"].as_str().expect("id").to_owned(), v)
        })
        .collect();
    assert_eq!(results.len(), calls.len(), "one result per call:\n{out}");
    results
}

fn steps(result: &Value) -> &Vec<Value> {
    result["steps"].as_array().expect("steps")
}

fn last_said(result: &Value) -> &str {
    result["said"]
        .as_array()
        .and_then(|s| s.last())
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// The call went all the way: every webhook answered 200 with TwiML, every
/// input was used, the IVR hung up after saying `expected`.
fn assert_completed(result: &Value, expected: &str) {
    let id = &result["id"];
    for step in steps(result) {
        assert_eq!(
            step["status"], 200,
            "call {id}: {} {} answered {}: {}",
            step["method"], step["url"], step["status"], step["body"]
        );
    }
    assert_eq!(result["outcome"], "hangup", "call {id}: {result:#}");
    assert_eq!(result["inputs_left"], 0, "call {id}: unused inputs");
    assert_eq!(last_said(result), expected, "call {id}: {result:#}");
}

// ---------------------------------------------------------------------------
// Leak checks.
// ---------------------------------------------------------------------------

/// Whether `needle` occurs in `hay` as a token of its own, not inside a
/// longer run of letters and digits (a ciphertext's hex or a SID may contain
/// "1234" by chance; a logged plaintext `Digits` value stands alone).
fn contains_standalone(hay: &str, needle: &str) -> bool {
    let bytes = hay.as_bytes();
    hay.match_indices(needle).any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + needle.len()).copied();
        !before.is_some_and(|b| b.is_ascii_alphanumeric())
            && !after.is_some_and(|b| b.is_ascii_alphanumeric())
    })
}

fn assert_no_plaintext(surface: &str, text: &str, typed: &[&str]) {
    for digits in typed {
        assert!(
            !contains_standalone(text, digits),
            "{surface} contains the caller's plaintext digits {digits:?}:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------
// 1. Complete calls through ivrguard to each legacy app.
// ---------------------------------------------------------------------------

/// Complete calls through ivrguard to the app. With `own_token`, the app
/// validates with a token of its own (`upstream.auth_token`) and never
/// holds the Twilio auth token; without, with the Twilio token (the
/// default).
fn complete_calls(kind: AppKind, own_token: bool) {
    let dir = TempDir::new().expect("temp dir");
    let secrets = match own_token {
        true => Secrets::with_app_token(),
        false => Secrets::generate(),
    };
    let bank = Bank::start(dir.path(), &secrets);
    let app = LegacyApp::start(kind, secrets.app_facing(), bank.addr);
    let tap = Wiretap::start(app.addr);
    let mut guard = Ivrguard::start(dir.path(), tap.addr, OriginFrom::PublicUrl, &secrets);

    let (wrong_card, wrong_pin) = (wrong_digits(), wrong_digits());
    let pin_with_hash = format!("{PIN}#");
    let calls = [
        call("right", VOICE_URL, &[Some(CARD), Some(PIN)]),
        // Silence first (the <Redirect> after the Gather starts over), then
        // a PIN ended with '#' (FinishedOnKey=#).
        call(
            "right-after-silence",
            VOICE_URL,
            &[None, Some(CARD), Some(&pin_with_hash)],
        ),
        call("wrong", VOICE_URL, &[Some(&wrong_card), Some(&wrong_pin)]),
        call("wrong-pin", VOICE_URL, &[Some(CARD), Some(&wrong_pin)]),
    ];
    let results = simulate(guard.addr, None, &secrets.token, &calls);

    // The callers heard the right things.
    assert_completed(&results["right"], BALANCE);
    assert_completed(&results["right-after-silence"], BALANCE);
    assert_completed(&results["wrong"], REFUSAL);
    assert_completed(&results["wrong-pin"], REFUSAL);
    let redirected = steps(&results["right-after-silence"]);
    assert!(
        redirected.len() == 4 && redirected[1]["url"] == VOICE_URL && redirected[1].get("digits").is_none(),
        "the silent Gather should fall through to <Redirect>{VOICE_URL}</Redirect>: {redirected:#?}"
    );
    assert_eq!(redirected[3]["finished_on_key"], "#");

    // Every webhook passed ivrguard and then the app's own validation.
    let webhooks: usize = results.values().map(|r| steps(r).len()).sum();
    assert_eq!(webhooks, 3 + 4 + 3 + 3);
    let access = guard.wait_access_lines(webhooks);
    assert_eq!(access.len(), webhooks, "one access line per webhook");
    for line in &access {
        assert_eq!(line["signature"], "valid", "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["upstream_status"], 200, "{line}");
    }
    let with_digits = access
        .iter()
        .filter(|l| {
            l["encrypted_fields"]
                .as_str()
                .is_some_and(|f| f.contains("Digits"))
        })
        .count();
    assert_eq!(
        with_digits,
        2 + 2 + 2 + 2,
        "Digits encrypted on every Gather action"
    );
    assert_eq!(
        app.validated(),
        webhooks,
        "the app's own signature validation must pass on every webhook:\n{}",
        app.proc.output()
    );
    assert_eq!(tap.requests(), webhooks, "requests the app was sent");

    // What the app received: Digits as ciphertext, the card's ciphertext
    // carried in the next action URL, never the digits themselves.
    let wire = tap.text();
    let digits_re = Regex::new(r"(?:^|&)Digits=([^&\r\n]*)").expect("regex");
    let sent_digits: Vec<&str> = wire
        .split("\r\n\r\n")
        .flat_map(|chunk| {
            digits_re
                .captures_iter(chunk)
                .map(|c| c.get(1).expect("group").as_str())
        })
        .collect();
    assert_eq!(
        sent_digits.len(),
        with_digits,
        "Digits values on the wire:\n{wire}"
    );
    for value in &sent_digits {
        assert!(
            value.len() == CIPHERTEXT_HEX_LEN && value.bytes().all(|b| b.is_ascii_hexdigit()),
            "the app was sent Digits={value}, not a ciphertext"
        );
    }
    assert!(
        wire.contains("step=processData&cardDigits="),
        "the card's ciphertext rides in the next action URL:\n{wire}"
    );
    let typed = [CARD, PIN, wrong_card.as_str(), wrong_pin.as_str()];
    assert_no_plaintext("the bytes sent to the app", &wire, &typed);
    assert_no_plaintext("the app's stdout/stderr", &app.proc.output(), &typed);
    assert_no_plaintext("ivrguard's stdout/stderr", &guard.proc.output(), &typed);
    assert_no_plaintext("the bank's stdout/stderr", &bank.proc.output(), &typed);

    // The bank, and only the bank, saw the plaintext: exactly what was typed.
    let expected: Vec<(String, String)> = [
        (CARD, PIN),
        (CARD, PIN),
        (wrong_card.as_str(), wrong_pin.as_str()),
        (CARD, wrong_pin.as_str()),
    ]
    .iter()
    .map(|(c, p)| (c.to_string(), p.to_string()))
    .collect();
    assert_eq!(
        bank.decrypted(),
        expected,
        "what the bank decrypted, call by call"
    );

    if let Some(app_token) = &secrets.app_token {
        // The app's token opens nothing: a webhook signed with it is
        // refused by ivrguard, and the app is sent nothing more.
        let forged = simulate(
            guard.addr,
            None,
            app_token,
            &[call("app-token", VOICE_URL, &[Some(CARD), Some(PIN)])],
        );
        let forged = &forged["app-token"];
        assert_eq!(steps(forged).len(), 1, "{forged:#}");
        assert_eq!(steps(forged)[0]["status"], 403, "{forged:#}");
        let access = guard.wait_access_lines(webhooks + 1);
        assert_eq!(
            access[webhooks]["signature"], "mismatch",
            "{:#}",
            access[webhooks]
        );
        assert_eq!(tap.requests(), webhooks, "requests the app was sent");
    }
}

#[test]
fn express_app_with_its_own_token_completes_calls_and_never_sees_digits() {
    complete_calls(AppKind::Express, true);
}

#[test]
fn express_app_with_twilio_webhook_completes_calls_and_never_sees_digits() {
    complete_calls(AppKind::Express, false);
}

#[test]
fn flask_app_with_request_validator_completes_calls_and_never_sees_digits() {
    complete_calls(AppKind::Flask, false);
}

// ---------------------------------------------------------------------------
// 2. A TLS-terminating nginx in front; ivrguard trusts its X-Forwarded-*.
// ---------------------------------------------------------------------------

fn behind_tls_proxy(kind: AppKind) {
    let dir = TempDir::new().expect("temp dir");
    let secrets = Secrets::generate();
    let bank = Bank::start(dir.path(), &secrets);
    let app = LegacyApp::start(kind, &secrets.token, bank.addr);
    let tap = Wiretap::start(app.addr);
    let mut guard = Ivrguard::start(
        dir.path(),
        tap.addr,
        OriginFrom::Request {
            trust_forwarded: true,
        },
        &secrets,
    );
    let nginx = Nginx::start(dir.path(), guard.addr);
    let nginx_addr = SocketAddr::from(([127, 0, 0, 1], nginx.port));

    // A caller forging X-Forwarded-Host to match a signature made for
    // another URL: nginx overwrites the header, so the URL ivrguard checks
    // is still https://ivr.example.com/voice.
    let mut forged = call("forged-forwarded-host", VOICE_URL, &[]);
    forged["sign_url"] = json!("https://evil.example/voice");
    forged["headers"] = json!({ "X-Forwarded-Host": "evil.example" });
    let calls = [call("right", VOICE_URL, &[Some(CARD), Some(PIN)]), forged];
    let results = simulate(nginx_addr, Some(&nginx.ca_file), &secrets.token, &calls);

    // The SDK-signed https URL verifies at ivrguard, and at the app, which
    // rebuilds it from the X-Forwarded-Proto ivrguard sends.
    assert_completed(&results["right"], BALANCE);
    let forged_steps = steps(&results["forged-forwarded-host"]);
    assert_eq!(forged_steps.len(), 1);
    assert_eq!(forged_steps[0]["status"], 403, "{forged_steps:#?}");

    let access = guard.wait_access_lines(4);
    let (valid, refused): (Vec<&Value>, Vec<&Value>) =
        access.iter().partition(|l| l["signature"] == "valid");
    assert_eq!(valid.len(), 3, "{access:#?}");
    assert!(
        valid.iter().all(|l| l["upstream_status"] == 200),
        "{access:#?}"
    );
    assert_eq!(refused.len(), 1, "{access:#?}");
    assert_eq!(refused[0]["signature"], "mismatch", "{access:#?}");
    assert_eq!(refused[0]["status"], 403, "{access:#?}");

    assert_eq!(app.validated(), 3, "{}", app.proc.output());
    assert_eq!(
        tap.requests(),
        3,
        "the forged request never reached the app"
    );
    let wire = tap.text().to_ascii_lowercase();
    assert_eq!(
        wire.matches("x-forwarded-proto: https\r\n").count(),
        3,
        "{wire}"
    );
    assert_eq!(
        wire.matches("x-forwarded-host: ivr.example.com\r\n")
            .count(),
        3,
        "{wire}"
    );
    assert!(!wire.contains("evil.example"), "{wire}");
    assert_no_plaintext("the bytes sent to the app", &tap.text(), &[CARD, PIN]);
    assert_no_plaintext("the app's stdout/stderr", &app.proc.output(), &[CARD, PIN]);
    assert_eq!(bank.decrypted(), vec![(CARD.to_owned(), PIN.to_owned())]);
}

#[test]
fn behind_tls_nginx_express_app_verifies_the_sdk_signed_https_url() {
    behind_tls_proxy(AppKind::Express);
}

#[test]
fn behind_tls_nginx_flask_app_verifies_the_sdk_signed_https_url() {
    behind_tls_proxy(AppKind::Flask);
}

// ---------------------------------------------------------------------------
// 3. Forwarded headers NOT trusted: a forged X-Forwarded-Host changes nothing.
// ---------------------------------------------------------------------------

#[test]
fn untrusted_forwarded_host_cannot_change_the_signed_url() {
    let dir = TempDir::new().expect("temp dir");
    let secrets = Secrets::generate();
    let bank = Bank::start(dir.path(), &secrets);
    let app = LegacyApp::start(AppKind::Express, &secrets.token, bank.addr);
    let tap = Wiretap::start(app.addr);
    let mut untrusting = Ivrguard::start(
        dir.path(),
        tap.addr,
        OriginFrom::Request {
            trust_forwarded: false,
        },
        &secrets,
    );
    // The control: the same forged request against an ivrguard that trusts
    // the headers (deployed without a proxy that overwrites them).
    let mut trusting = Ivrguard::start(
        dir.path(),
        tap.addr,
        OriginFrom::Request {
            trust_forwarded: true,
        },
        &secrets,
    );

    // Signed for another URL, with headers claiming that URL.
    let forged = || {
        let mut c = call("forged", "http://ivr.example.com/voice", &[]);
        c["sign_url"] = json!("https://evil.example/voice");
        c["headers"] = json!({
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
        });
        c
    };
    // Without public_url or trusted headers the signed URL is the
    // connection's scheme (http) and the Host header.
    let honest = call(
        "honest",
        "http://ivr.example.com/voice",
        &[Some(CARD), Some(PIN)],
    );
    let results = simulate(untrusting.addr, None, &secrets.token, &[honest, forged()]);
    assert_completed(&results["honest"], BALANCE);
    let refused = steps(&results["forged"]);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["status"], 403, "{refused:#?}");
    let access = untrusting.wait_access_lines(4);
    let forged_line = access
        .iter()
        .find(|l| l["signature"] != "valid")
        .unwrap_or_else(|| panic!("no refused request in {access:#?}"));
    assert_eq!(forged_line["signature"], "mismatch", "{forged_line}");
    assert_eq!(forged_line["status"], 403, "{forged_line}");
    assert!(forged_line["upstream_status"].is_null(), "{forged_line}");
    assert_eq!(
        tap.requests(),
        3,
        "the forged request never reached the app"
    );
    assert!(!tap.text().contains("evil.example"));

    // Control: trusted, the forged header does change the URL ivrguard
    // checks, and the forgery passes ivrguard.
    let control = simulate(trusting.addr, None, &secrets.token, &[forged()]);
    let fooled = trusting.wait_access_lines(1);
    assert_eq!(
        fooled[0]["signature"], "valid",
        "trusting ivrguard should have checked https://evil.example/voice: {fooled:#?} {control:#?}"
    );
    assert_eq!(bank.decrypted(), vec![(CARD.to_owned(), PIN.to_owned())]);
}

// ---------------------------------------------------------------------------
// 4. ivrguard and the app disagree on the token: the app refuses, and
//    ivrguard's log says so.
// ---------------------------------------------------------------------------

fn app_refuses_a_different_token(kind: AppKind) {
    let dir = TempDir::new().expect("temp dir");
    let secrets = Secrets::generate();
    let app_token = Secrets::generate().token;
    let bank = Bank::start(dir.path(), &secrets);
    let app = LegacyApp::start(kind, &app_token, bank.addr);
    let tap = Wiretap::start(app.addr);
    let mut guard = Ivrguard::start(dir.path(), tap.addr, OriginFrom::PublicUrl, &secrets);

    let results = simulate(
        guard.addr,
        None,
        &secrets.token,
        &[call("right", VOICE_URL, &[Some(CARD), Some(PIN)])],
    );
    let result = &results["right"];
    assert_eq!(result["outcome"], "http_error", "{result:#}");
    assert_eq!(steps(result).len(), 1, "{result:#}");
    assert_eq!(steps(result)[0]["status"], 403, "{result:#}");
    assert_eq!(app.validated(), 0);
    assert_eq!(tap.requests(), 1);

    // ivrguard accepted Twilio's signature, forwarded, and logged that the
    // app answered 403: the operator sees the app, not Twilio, refused.
    let access = guard.wait_access_lines(1);
    assert_eq!(access.len(), 1, "{access:#?}");
    let line = &access[0];
    assert_eq!(line["signature"], "valid", "{line}");
    assert_eq!(line["status"], 403, "{line}");
    assert_eq!(line["upstream_status"], 403, "{line}");
    // ...and says what to fix, in a WARN line written before the access line.
    let warning = guard
        .proc
        .output()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| !m.starts_with("configuration warning"))
        })
        .unwrap_or_else(|| panic!("no WARN line:\n{}", guard.proc.output()));
    let message = warning["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("the app refused a request ivrguard verified and re-signed")
            && message.contains("twilio.auth_token_env"),
        "{warning}"
    );
    assert_eq!(warning["status"], 403, "{warning}");
}

#[test]
fn express_app_with_another_token_answers_403_and_ivrguard_logs_upstream_403() {
    app_refuses_a_different_token(AppKind::Express);
}

#[test]
fn flask_app_with_another_token_answers_403_and_ivrguard_logs_upstream_403() {
    app_refuses_a_different_token(AppKind::Flask);
}

// ---------------------------------------------------------------------------
// 5. A key rotation with compose: the bank decrypts with the key ivrguard
//    uses and, meanwhile, the next or the previous one.
// ---------------------------------------------------------------------------

/// `ivrguard encrypt` of `plain` with `key_hex`.
fn encrypted_by_ivrguard(key_hex: &str, plain: &str) -> String {
    let mut cmd = clean_command(IVRGUARD);
    cmd.args(["encrypt", "--key-env", "ROTATION_KEY"])
        .env("ROTATION_KEY", key_hex);
    let (out, _) = run_to_end(
        cmd,
        format!("{plain}\n").as_bytes(),
        "ivrguard encrypt",
        STEP,
    );
    out.trim().to_owned()
}

/// The status of the bank's lookup for the two ciphertexts.
fn bank_lookup(bank: &Bank, card: &str, pin: &str) -> u16 {
    let body = format!(r#"{{"cardLast4":"{card}","pin":"{pin}"}}"#);
    let mut stream = TcpStream::connect_timeout(&bank.addr, STEP).expect("bank accepts");
    stream.set_read_timeout(Some(STEP)).expect("timeout");
    write!(
        stream,
        "POST /accounts/lookup HTTP/1.1\r\nHost: bank\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"))
}

/// Found in review: the bank read one key, and compose gave it the same
/// `IVRGUARD_KEY` as ivrguard, so the README's step "give every decrypting
/// service the new key in addition to the old one" could not be done.
#[test]
fn the_bank_decrypts_with_the_next_or_previous_key_during_a_rotation() {
    let dir = TempDir::new().expect("temp dir");
    let (old, new, unrelated) = (
        Secrets::generate(),
        Secrets::generate(),
        Secrets::generate(),
    );
    let lookup_with = |bank: &Bank, key: &Secrets| {
        let card = encrypted_by_ivrguard(&key.key_hex, "1234");
        let pin = encrypted_by_ivrguard(&key.key_hex, "4321");
        bank_lookup(bank, &card, &pin)
    };

    // Step 1: ivrguard still uses the old key; the bank knows the next.
    // Step 2: ivrguard switched; the bank still reads what the old key made.
    let steps = [
        [
            ("IVRGUARD_KEY", &old.key_hex),
            ("IVRGUARD_KEY_NEXT", &new.key_hex),
        ],
        [
            ("IVRGUARD_KEY", &new.key_hex),
            ("IVRGUARD_KEY_PREVIOUS", &old.key_hex),
        ],
    ];
    let mut decrypted = Vec::new();
    for keys in steps {
        let keys = keys.map(|(name, key)| (name, key.as_str()));
        let bank = Bank::start_with_keys(dir.path(), &keys);
        assert_eq!(lookup_with(&bank, &old), 200, "{:?}", keys.map(|k| k.0));
        assert_eq!(lookup_with(&bank, &new), 200, "{:?}", keys.map(|k| k.0));
        assert_eq!(
            lookup_with(&bank, &unrelated),
            400,
            "{:?}",
            keys.map(|k| k.0)
        );
        decrypted = bank.decrypted();
    }
    // Both banks wrote to the same record: two lookups each, nothing else.
    assert!(
        decrypted.len() == 4
            && decrypted
                .iter()
                .all(|d| d == &("1234".to_owned(), "4321".to_owned())),
        "{decrypted:?}"
    );
}

#[test]
fn standalone_digit_check_tells_plaintext_from_hex() {
    assert!(contains_standalone("params={\"Digits\":\"1234\"}", "1234"));
    assert!(contains_standalone("Digits=1234&x", "1234"));
    assert!(contains_standalone("1234", "1234"));
    assert!(!contains_standalone("Digits=ab1234cd", "1234"));
    assert!(!contains_standalone("CA1234", "1234"));
    assert!(!contains_standalone("12345", "1234"));
}
