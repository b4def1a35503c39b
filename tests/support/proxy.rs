//! Runs the real `ivrguard` binary: writes a config to a temp dir, starts
//! `ivrguard run --config …` with fresh random secrets in a clean
//! environment, collects stdout and stderr on background threads, and takes
//! the listening addresses from the start-up log line (the readiness
//! signal). Dropping a [`Proxy`] kills the process; [`Proxy::stop`] sends
//! SIGTERM and returns the exit status.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;

use super::canary::{byte_needles, text_needles, Needle};

/// The origin every test's webhooks are signed for (`twilio.public_url`).
pub const PUBLIC_URL: &str = "https://ivr.example.com";
/// The `Host` the test client sends.
pub const HOST: &str = "ivr.example.com";
/// The configured fallback TwiML.
pub const FALLBACK_TWIML: &str = "<Response><Say>ivrguard fallback</Say><Hangup/></Response>";

pub const TOKEN_VAR: &str = "TWILIO_AUTH_TOKEN";
pub const SECONDARY_VAR: &str = "TWILIO_AUTH_TOKEN_SECONDARY";
pub const KEY_VAR: &str = "IVRGUARD_KEY";
pub const SHARED_KEY_VAR: &str = "TWILIO_WEBHOOK_KEY_1";
/// The id of the one shared key configured when `ProxyConfig::shared_key`.
pub const SHARED_KEY_ID: &str = "webhooks_sharedkey_1";

/// One run's secrets, drawn at random.
#[derive(Debug, Clone)]
pub struct Secrets {
    /// Primary auth token: 32 lowercase hex characters, like Twilio's.
    pub token: String,
    pub secondary: String,
    /// The secret of the webhook signing key [`SHARED_KEY_ID`].
    pub shared_key: String,
    /// The AES-256 key as 64 lowercase hex characters.
    pub key_hex: String,
}

impl Secrets {
    pub fn generate() -> Self {
        let mut rng = rand::thread_rng();
        Secrets {
            token: hex::encode(rng.gen::<[u8; 16]>()),
            secondary: hex::encode(rng.gen::<[u8; 16]>()),
            shared_key: hex::encode(rng.gen::<[u8; 24]>()),
            key_hex: hex::encode(rng.gen::<[u8; 32]>()),
        }
    }

    pub fn key(&self) -> [u8; 32] {
        hex::decode(&self.key_hex)
            .expect("hex key")
            .try_into()
            .expect("32 bytes")
    }

    /// Every encoding of every secret, and of halves of them (a log that
    /// prints half a key has leaked half a key).
    pub fn needles(&self) -> Vec<Needle> {
        let mut needles = Vec::new();
        for (label, value) in [
            ("auth token", &self.token),
            ("secondary token", &self.secondary),
            ("shared key", &self.shared_key),
        ] {
            needles.extend(text_needles(label, value));
            needles.extend(text_needles(
                &format!("{label} upper-case"),
                &value.to_ascii_uppercase(),
            ));
            let (a, b) = value.split_at(value.len() / 2);
            needles.extend(text_needles(&format!("{label} first half"), a));
            needles.extend(text_needles(&format!("{label} second half"), b));
        }
        needles.extend(text_needles("key hex", &self.key_hex));
        needles.extend(text_needles("key HEX", &self.key_hex.to_ascii_uppercase()));
        let (a, b) = self.key_hex.split_at(32);
        needles.extend(text_needles("key hex first half", a));
        needles.extend(text_needles("key hex second half", b));
        needles.extend(byte_needles("key", &self.key()));
        needles
    }

    /// The environment `ivrguard` reads its secrets from.
    pub fn env(&self, with_secondary: bool) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (TOKEN_VAR, self.token.clone()),
            (KEY_VAR, self.key_hex.clone()),
            (SHARED_KEY_VAR, self.shared_key.clone()),
        ];
        if with_secondary {
            env.push((SECONDARY_VAR, self.secondary.clone()));
        }
        env
    }
}

/// The knobs the tests turn; everything else is the contract's example.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub upstream_url: String,
    pub public_url: Option<String>,
    pub on_error: &'static str,
    pub upstream_timeout_ms: u64,
    pub max_body_bytes: usize,
    pub drain_timeout_ms: u64,
    pub secondary: bool,
    /// Configure `[[twilio.shared_keys]]` with [`SHARED_KEY_ID`].
    pub shared_key: bool,
    pub log_level: Option<&'static str>,
    pub fields: Vec<&'static str>,
    /// `server.request_timeout_ms` (must stay above `upstream_timeout_ms`).
    pub request_timeout_ms: u64,
    /// Extra `key = value` lines for `[server]`, e.g.
    /// `"header_read_timeout_ms = 500"` (keys not set above only).
    pub server_extra: Vec<String>,
    /// `server.trust_forwarded_headers`.
    pub trust_forwarded_headers: bool,
    /// `server.workers`: 2 by default, so every test runs the thread-per-core
    /// path whatever the machine's CPU count.
    pub workers: usize,
    /// Extra `key = value` lines for `[upstream]`, e.g.
    /// `"pool_idle_timeout_ms = 1000"`.
    pub upstream_extra: Vec<String>,
    /// Read the primary auth token from this file
    /// (`twilio.auth_token_file`) instead of [`TOKEN_VAR`].
    pub auth_token_file: Option<PathBuf>,
    /// Read the AES key from this file (`encryption.key_file`) instead of
    /// [`KEY_VAR`].
    pub key_file: Option<PathBuf>,
}

impl ProxyConfig {
    pub fn new(upstream_url: impl Into<String>) -> Self {
        ProxyConfig {
            upstream_url: upstream_url.into(),
            public_url: Some(PUBLIC_URL.to_owned()),
            on_error: "twiml",
            upstream_timeout_ms: 10_000,
            max_body_bytes: 65_536,
            drain_timeout_ms: 10_000,
            secondary: false,
            shared_key: false,
            log_level: None,
            fields: vec!["Digits", "SpeechResult"],
            request_timeout_ms: 14_000,
            server_extra: Vec::new(),
            trust_forwarded_headers: false,
            workers: 2,
            upstream_extra: Vec::new(),
            auth_token_file: None,
            key_file: None,
        }
    }

    pub fn toml(&self) -> String {
        let mut twilio = match &self.auth_token_file {
            Some(path) => format!("auth_token_file = {:?}\n", path.display().to_string()),
            None => format!("auth_token_env = \"{TOKEN_VAR}\"\n"),
        };
        if self.secondary {
            twilio.push_str(&format!("secondary_auth_token_env = \"{SECONDARY_VAR}\"\n"));
        }
        if let Some(url) = &self.public_url {
            twilio.push_str(&format!("public_url = \"{url}\"\n"));
        }
        if self.shared_key {
            twilio.push_str(&format!(
                "\n[[twilio.shared_keys]]\nid = \"{SHARED_KEY_ID}\"\nsecret_env = \"{SHARED_KEY_VAR}\"\n"
            ));
        }
        let fields: Vec<String> = self.fields.iter().map(|f| format!("\"{f}\"")).collect();
        let level = self
            .log_level
            .map(|l| format!("level = \"{l}\"\n"))
            .unwrap_or_default();
        format!(
            r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
trust_forwarded_headers = {trust_forwarded}
workers = {workers}
max_body_bytes = {max_body}
request_timeout_ms = {request_timeout}
drain_timeout_ms = {drain}
{server_extra}
[upstream]
url = "{upstream}"
timeout_ms = {timeout}
connect_timeout_ms = {connect}
on_error = "{on_error}"
fallback_twiml = "{FALLBACK_TWIML}"
{upstream_extra}
[twilio]
{twilio}
[encryption]
{key_source}
fields = [{fields}]

[log]
format = "json"
{level}"#,
            max_body = self.max_body_bytes,
            trust_forwarded = self.trust_forwarded_headers,
            workers = self.workers,
            request_timeout = self.request_timeout_ms,
            drain = self.drain_timeout_ms,
            server_extra = extra_lines(&self.server_extra),
            upstream_extra = extra_lines(&self.upstream_extra),
            upstream = self.upstream_url,
            timeout = self.upstream_timeout_ms,
            // Config requires connect_timeout_ms <= timeout_ms.
            connect = self.upstream_timeout_ms.min(2000),
            on_error = self.on_error,
            fields = fields.join(", "),
            key_source = match &self.key_file {
                Some(path) => format!("key_file = {:?}", path.display().to_string()),
                None => format!("key_env = \"{KEY_VAR}\""),
            },
        )
    }
}

fn extra_lines(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// What the reader of ivrguard's stdout does (see [`Proxy::pause_stdout`]).
const STDOUT_READ: u8 = 0;
const STDOUT_PAUSED: u8 = 1;
const STDOUT_CLOSED: u8 = 2;

/// A running `ivrguard run`.
pub struct Proxy {
    child: Child,
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub secrets: Secrets,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    stdout_mode: Arc<AtomicU8>,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts the binary with fresh secrets.
    pub async fn start(config: &ProxyConfig) -> Proxy {
        Proxy::start_with(config, Secrets::generate()).await
    }

    /// Starts the binary with `secrets` and waits (10 s at most) for its
    /// "ivrguard listening" line.
    pub async fn start_with(config: &ProxyConfig, secrets: Secrets) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_config(&dir, &config.toml());
        let mut child = Command::new(env!("CARGO_BIN_EXE_ivrguard"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env_clear()
            .envs(secrets.env(config.secondary))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ivrguard");
        let stdout: Arc<Mutex<Vec<u8>>> = Arc::default();
        let stderr: Arc<Mutex<Vec<u8>>> = Arc::default();
        let stdout_mode: Arc<AtomicU8> = Arc::default();
        let readers = vec![
            pump_controlled(
                child.stdout.take().expect("piped stdout"),
                stdout.clone(),
                stdout_mode.clone(),
            ),
            pump(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        let mut proxy = Proxy {
            child,
            addr: "0.0.0.0:0".parse().expect("placeholder address"),
            admin_addr: None,
            secrets,
            stdout,
            stderr,
            readers,
            stdout_mode,
            config_path: path,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = proxy
                .log_lines()
                .into_iter()
                .find(|l| l["message"] == "ivrguard listening")
            {
                let listen = line["listen"].as_str().expect("listen is a string");
                proxy.addr = listen
                    .parse()
                    .unwrap_or_else(|_| panic!("listen {listen:?} is not an address"));
                let admin = line["admin_listen"].as_str().unwrap_or("");
                proxy.admin_addr = (!admin.is_empty()).then(|| {
                    admin
                        .parse()
                        .unwrap_or_else(|_| panic!("admin_listen {admin:?} is not an address"))
                });
                return proxy;
            }
            if let Ok(Some(status)) = proxy.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "ivrguard exited with {status} before listening\nstderr:\n{}\nstdout:\n{}",
                    proxy.stderr_text(),
                    proxy.stdout_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "ivrguard did not log \"ivrguard listening\" within 10 s\nstderr:\n{}\nstdout:\n{}",
                    proxy.stderr_text(),
                    proxy.stdout_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file the process was started with (rewrite it, then
    /// SIGHUP, to test a reload).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Stops reading ivrguard's stdout (after the read in progress), so the
    /// pipe fills up and its writes block: a stalled log consumer. Until
    /// [`Proxy::resume_stdout`], [`Proxy::log_lines`] sees nothing new and
    /// [`Proxy::wait_exit`] cannot finish.
    pub fn pause_stdout(&self) {
        self.stdout_mode.store(STDOUT_PAUSED, Ordering::SeqCst);
    }

    pub fn resume_stdout(&self) {
        self.stdout_mode.store(STDOUT_READ, Ordering::SeqCst);
    }

    /// Closes the read end of ivrguard's stdout once the read in progress
    /// returns (at ivrguard's next write), so later writes fail with EPIPE:
    /// a log consumer that went away.
    pub fn close_stdout(&self) {
        self.stdout_mode.store(STDOUT_CLOSED, Ordering::SeqCst);
    }

    /// `PUBLIC_URL` + `path_and_query`: the URL Twilio signs.
    pub fn public(path_and_query: &str) -> String {
        format!("{PUBLIC_URL}{path_and_query}")
    }

    pub fn stdout(&self) -> Vec<u8> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> Vec<u8> {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout()).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr()).into_owned()
    }

    /// The complete stdout lines that parse as JSON objects (see
    /// [`Proxy::invalid_json_lines`] for the others).
    pub fn log_lines(&self) -> Vec<Value> {
        let out = self.stdout();
        out.split(|b| *b == b'\n')
            .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// The complete, non-empty stdout lines that are not a JSON object as
    /// written.
    pub fn invalid_json_lines(&self) -> Vec<String> {
        let out = self.stdout();
        let complete = match out.iter().rposition(|b| *b == b'\n') {
            Some(end) => &out[..end],
            None => &[][..],
        };
        complete
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .filter(|line| !serde_json::from_slice::<Value>(line).is_ok_and(|v| v.is_object()))
            .map(|line| String::from_utf8_lossy(line).into_owned())
            .collect()
    }

    /// The access-log lines so far.
    pub fn access_lines(&self) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|l| l["message"] == "access")
            .collect()
    }

    /// Waits (5 s at most) for at least `n` access lines; the log is written
    /// by a background thread, so a line can trail its response.
    pub async fn wait_access(&self, n: usize) -> Vec<Value> {
        self.wait_log("access", n).await
    }

    /// Waits (5 s at most) for at least `n` log lines whose message is
    /// `message`, and returns them all.
    pub async fn wait_log(&self, message: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines: Vec<Value> = self
                .log_lines()
                .into_iter()
                .filter(|l| l["message"] == message)
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} {message:?} lines within 5 s; stdout:\n{}\nstderr:\n{}",
                lines.len(),
                self.stdout_text(),
                self.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The single access line (waits for it; fails if there are more).
    pub async fn only_access(&self) -> Value {
        let lines = self.wait_access(1).await;
        assert_eq!(lines.len(), 1, "expected one access line, got {lines:#?}");
        lines.into_iter().next().expect("one line")
    }

    /// Sends SIGTERM, waits (15 s at most) for the exit, and for stdout and
    /// stderr to be complete.
    pub async fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit().await
    }

    /// Waits (15 s at most) for the process to exit on its own (after a
    /// signal sent earlier), and for stdout and stderr to be complete.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for ivrguard") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "ivrguard still running after 15 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        while !self.readers.iter().all(JoinHandle::is_finished) {
            assert!(
                Instant::now() < deadline,
                "ivrguard's output pipes still open after 15 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        status
    }

    /// The exit status if the process has already exited; `None` while it
    /// runs. Does not wait.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("poll ivrguard")
    }

    /// Sends `SIG<name>` with kill(1) (no libc in the dev-dependencies).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pump(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => into.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

/// Like [`pump`], but obeys `mode`: paused (stop reading, keep the pipe
/// open) or closed (drop the read end).
fn pump_controlled(
    mut from: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
    mode: Arc<AtomicU8>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match mode.load(Ordering::SeqCst) {
                STDOUT_CLOSED => break,
                STDOUT_PAUSED => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                _ => {}
            }
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => into.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

fn write_config(dir: &tempfile::TempDir, toml: &str) -> PathBuf {
    let path = dir.path().join("ivrguard.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

/// Runs `ivrguard check --config FILE` with exactly `env` as the
/// environment.
pub fn run_check(toml: &str, env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(&dir, toml);
    Command::new(env!("CARGO_BIN_EXE_ivrguard"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run ivrguard check")
}
