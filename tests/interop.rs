//! Interoperability: ivrguard against Twilio's real, published SDKs and real
//! crypto libraries, not against our own idea of them.
//!
//! - **Field cipher** (SPEC §4): what `ivrguard encrypt` prints decrypts with
//!   Node's built-in `crypto` (the Twilio blog's AES code, `seeds/001`) and
//!   with Python's `cryptography` (AESGCM); what they encrypt, `ivrguard
//!   decrypt` reads.
//! - **Signatures** (SPEC §3): `ivrguard sign` agrees with the Python SDK
//!   (`twilio==9.13.0`) and the Node SDK (npm `twilio@6.2.0`).
//! - **The proxy end to end**: a simulated Twilio signs webhooks with one SDK
//!   and sends them to the real `ivrguard` binary, in front of a Python app
//!   (`tests/interop/backend.py`) that validates what it receives with the
//!   Python SDK and decrypts the fields with `cryptography`; the same
//!   forwarded requests are then validated again with the Node SDK
//!   (`validate_requests.js`). Covered: a POST whose action URL has a query,
//!   a GET (fields in the query), repeated params, UTF-8 speech, a field in
//!   the action URL, an empty value, the secondary token, a signature over
//!   `:443`, and SharedKey signing (HMAC-SHA256/SHA1, Python SDK only).
//!   Forged requests must get 403 and never reach the app; no plaintext or
//!   secret may reach ivrguard's logs; SIGTERM exits 0.
//!
//! The scripts live in `tests/interop/`; their dependencies are installed
//! project-locally by `./tests/run.sh` (a venv and `node_modules`). If they
//! are missing these tests fail and say so: they never skip.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const IVRGUARD: &str = env!("CARGO_BIN_EXE_ivrguard");
/// `twilio.public_url`: the origin Twilio signs for.
const PUBLIC_URL: &str = "https://ivr.example.com";
const PUBLIC_HOST: &str = "ivr.example.com";
/// `encryption.fields` in every proxy these tests start.
const FIELDS: [&str; 2] = ["Digits", "SpeechResult"];
/// The most any single step may take: a process start, a script, a request.
const STEP: Duration = Duration::from_secs(30);
const SETUP_HINT: &str = "run ./tests/run.sh once: it creates tests/interop/.venv \
     (pip install -r tests/interop/requirements.txt) and tests/interop/node_modules (npm ci)";

// ---------------------------------------------------------------------------
// Tools: the pinned Python venv and Node packages, checked once.
// ---------------------------------------------------------------------------

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("interop")
}

/// `tests/interop/.venv/bin/python`, after checking it has the pinned SDK.
fn python() -> PathBuf {
    static CHECK: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let checked = CHECK.get_or_init(|| {
        let python = interop_dir().join(".venv").join("bin").join("python");
        if !python.exists() {
            return Err(format!("{} is missing", python.display()));
        }
        let mut cmd = Command::new(&python);
        cmd.args([
            "-c",
            "import cryptography, prometheus_client, twilio; \
             assert twilio.__version__ == '9.13.0', twilio.__version__",
        ]);
        let out = run(cmd, b"", "python import check");
        if !out.status.success() {
            return Err(format!(
                "the venv lacks the pinned packages: {}",
                out.stderr.trim()
            ));
        }
        Ok(python)
    });
    match checked {
        Ok(path) => path.clone(),
        Err(why) => panic!("Python interop environment not ready: {why}. {SETUP_HINT}"),
    }
}

/// A `node` command with `tests/interop` as cwd and NODE_PATH, after
/// checking the pinned `twilio` package is installed there.
fn node() -> Command {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let checked = CHECK.get_or_init(|| {
        let package = interop_dir().join("node_modules").join("twilio").join("package.json");
        if !package.exists() {
            return Err(format!("{} is missing", package.display()));
        }
        let mut cmd = node_command();
        cmd.args([
            "-e",
            "const v = require('twilio/package.json').version; \
             if (v !== '6.2.0') { console.error('twilio ' + v + ' installed, 6.2.0 pinned'); process.exit(1) }",
        ]);
        let out = run(cmd, b"", "node package check");
        if !out.status.success() {
            return Err(out.stderr.trim().to_owned());
        }
        Ok(())
    });
    if let Err(why) = checked {
        panic!("Node interop environment not ready: {why}. {SETUP_HINT}");
    }
    node_command()
}

fn node_command() -> Command {
    let dir = interop_dir();
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .env("NODE_PATH", dir.join("node_modules"));
    cmd
}

fn python_script(name: &str) -> Command {
    let mut cmd = Command::new(python());
    cmd.current_dir(interop_dir()).arg(interop_dir().join(name));
    cmd
}

fn node_script(name: &str) -> Command {
    let mut cmd = node();
    cmd.arg(interop_dir().join(name));
    cmd
}

/// `ivrguard` with an environment that cannot override the test's config.
fn ivrguard() -> Command {
    let mut cmd = Command::new(IVRGUARD);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IVRGUARD") {
            cmd.env_remove(&name);
        }
    }
    cmd
}

// ---------------------------------------------------------------------------
// Processes: every wait has a deadline, every child dies with its handle.
// ---------------------------------------------------------------------------

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn read_all_in_background(mut from: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = from.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `cmd` to completion with `input` on stdin, killing it after [`STEP`].
fn run(mut cmd: Command, input: &[u8], what: &str) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = KillOnDrop(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}")),
    );
    let mut stdin = child.0.stdin.take().expect("stdin is piped");
    let input = input.to_vec();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let stdout = read_all_in_background(child.0.stdout.take().expect("stdout is piped"));
    let stderr = read_all_in_background(child.0.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.0.kill();
            let _ = child.0.wait();
            let err = stderr.join().unwrap_or_default();
            panic!("{what}: still running after {STEP:?}, killed; stderr:\n{err}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Runs a JSON-in/JSON-out helper script and returns its parsed stdout.
fn run_json(cmd: Command, input: &Value, what: &str) -> Value {
    let out = run(cmd, input.to_string().as_bytes(), what);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        out.stderr
    );
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            out.stdout, out.stderr
        )
    })
}

/// A long-running child whose stdout lines arrive on a channel.
struct Service {
    name: &'static str,
    child: KillOnDrop,
    lines: Receiver<String>,
    stdout_log: Arc<Mutex<Vec<String>>>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Service {
    fn start(name: &'static str, mut cmd: Command) -> Service {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = KillOnDrop(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}")),
        );
        let stdout = child.0.stdout.take().expect("stdout is piped");
        let stderr = read_all_in_background(child.0.stderr.take().expect("stderr is piped"));
        let (tx, lines) = mpsc::channel();
        let stdout_log = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&stdout_log);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                log.lock().expect("log lock").push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Service {
            name,
            child,
            lines,
            stdout_log,
            stderr: Some(stderr),
        }
    }

    /// The next stdout line that is JSON and satisfies `wanted`.
    fn wait_for_json(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Ok(value) = serde_json::from_str::<Value>(&line) {
                        if wanted(&value) {
                            return value;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {what} within {STEP:?}\n{}", self.diagnostics())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.0.wait();
                    panic!("exited before {what}\n{}", self.diagnostics())
                }
            }
        }
    }

    fn stdout_text(&self) -> String {
        self.stdout_log.lock().expect("log lock").join("\n")
    }

    fn diagnostics(&mut self) -> String {
        let _ = self.child.0.kill();
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{stderr}",
            self.stdout_text()
        )
    }

    /// SIGTERM, then the exit status (within [`STEP`]) and the full stderr.
    fn terminate(&mut self) -> (ExitStatus, String) {
        let pid = self.child.0.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill(1)");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + STEP;
        let status = loop {
            if let Some(status) = self.child.0.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: still running {STEP:?} after SIGTERM",
                self.name
            );
            thread::sleep(Duration::from_millis(20));
        };
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (status, stderr)
    }
}

/// Finds `key` anywhere in a JSON value (the log format may nest fields).
fn find_key<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    match value {
        Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|v| find_key(v, key))),
        Value::Array(items) => items.iter().find_map(|v| find_key(v, key)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Secrets and sample values, fresh per run.
// ---------------------------------------------------------------------------

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes
}

fn random_hex(n_bytes: usize) -> String {
    hex::encode(random_bytes(n_bytes))
}

fn random_digits(n: usize) -> String {
    random_bytes(n)
        .iter()
        .map(|b| char::from(b'0' + b % 10))
        .collect()
}

/// Values an IVR really collects, plus the awkward ones.
fn sample_values() -> Vec<String> {
    let long = "0123456789 ".repeat(100);
    [
        "1234",
        "1234", // the same value twice must give two different ciphertexts
        "0",
        "4111111111111111",
        "#",
        "Quiero pagar mi factura, número 4 👍",
        "日本語の音声認識テスト",
        "Zoë said «ça va?» 🇲🇽🎉",
        "  leading and trailing spaces  ",
        "a b+c&d=e%20f'g\"h",
        "tab\tinside",
        long.as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

// ---------------------------------------------------------------------------
// The ivrguard CLI.
// ---------------------------------------------------------------------------

/// `ivrguard encrypt|decrypt --key-env VAR`: one value per line in and out.
fn ivrguard_cipher(mode: &str, key: &str, values: &[String]) -> Output {
    let mut cmd = ivrguard();
    cmd.args([mode, "--key-env", "INTEROP_KEY"])
        .env("INTEROP_KEY", key);
    let mut input = values.join("\n");
    input.push('\n');
    run(cmd, input.as_bytes(), &format!("ivrguard {mode}"))
}

fn ivrguard_cipher_lines(mode: &str, key: &str, values: &[String]) -> Vec<String> {
    let out = ivrguard_cipher(mode, key, values);
    assert!(
        out.status.success(),
        "ivrguard {mode} failed ({}):\n{}",
        out.status,
        out.stderr
    );
    let lines: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    assert_eq!(
        lines.len(),
        values.len(),
        "ivrguard {mode}: {} input lines gave {} output lines:\n{}",
        values.len(),
        lines.len(),
        out.stdout
    );
    lines
}

fn script_cipher(
    cmd: Command,
    key: &str,
    values: &[String],
    what: &str,
) -> Vec<Result<String, String>> {
    let out = run_json(cmd, &json!({ "key": key, "values": values }), what);
    out["results"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no results in {out}"))
        .iter()
        .map(|r| match r["ok"].as_bool() {
            Some(true) => Ok(r["value"].as_str().expect("value").to_owned()),
            _ => Err(r["error"].as_str().unwrap_or("?").to_owned()),
        })
        .collect()
}

fn node_aes(mode: &str, key: &str, values: &[String]) -> Vec<Result<String, String>> {
    let mut cmd = node_script("aes_node.js");
    cmd.arg(mode);
    script_cipher(cmd, key, values, &format!("aes_node.js {mode}"))
}

fn python_aes(mode: &str, key: &str, values: &[String]) -> Vec<Result<String, String>> {
    let mut cmd = python_script("aes_python.py");
    cmd.arg(mode);
    script_cipher(cmd, key, values, &format!("aes_python.py {mode}"))
}

/// Checks the wire format of one ciphertext: lowercase hex of
/// nonce(12) ‖ ciphertext(len) ‖ tag(16).
fn assert_wire_format(ciphertext: &str, plaintext: &str) {
    assert!(
        !ciphertext.is_empty()
            && ciphertext
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "not lowercase hex: {ciphertext:?}"
    );
    assert_eq!(
        ciphertext.len(),
        2 * (12 + plaintext.len() + 16),
        "hex length of the ciphertext of a {}-byte value",
        plaintext.len()
    );
}

/// Flips one hex digit of the tag (the last character).
fn tamper(ciphertext: &str) -> String {
    let mut s = ciphertext.to_owned();
    let last = s.pop().expect("non-empty ciphertext");
    s.push(if last == '0' { '1' } else { '0' });
    s
}

// ---------------------------------------------------------------------------
// 1. Node's built-in crypto (the Twilio blog's AES function).
// ---------------------------------------------------------------------------

#[test]
fn node_crypto_decrypts_what_ivrguard_encrypt_prints() {
    let key = random_hex(32);
    let values = sample_values();
    let ciphertexts = ivrguard_cipher_lines("encrypt", &key, &values);
    for (ct, value) in ciphertexts.iter().zip(&values) {
        assert_wire_format(ct, value);
    }
    assert_ne!(
        ciphertexts[0], ciphertexts[1],
        "the same value encrypted twice must use fresh nonces"
    );
    assert_ne!(ciphertexts[0][..24], ciphertexts[1][..24], "nonce reused");

    let decrypted = node_aes("decrypt", &key, &ciphertexts);
    for ((result, value), ct) in decrypted.iter().zip(&values).zip(&ciphertexts) {
        assert_eq!(
            result.as_deref(),
            Ok(value.as_str()),
            "Node could not decrypt {ct}"
        );
    }

    // The check above can fail: Node refuses a forged tag and a wrong key.
    let forged = vec![tamper(&ciphertexts[0])];
    assert!(
        node_aes("decrypt", &key, &forged)[0].is_err(),
        "Node accepted a forged tag"
    );
    let other_key = random_hex(32);
    assert!(
        node_aes("decrypt", &other_key, &ciphertexts[..1])[0].is_err(),
        "Node decrypted with the wrong key"
    );
}

#[test]
fn ivrguard_decrypt_reads_what_the_seed_node_encrypt_writes() {
    let key = random_hex(32);
    let values = sample_values();
    let ciphertexts: Vec<String> = node_aes("encrypt", &key, &values)
        .into_iter()
        .map(|r| r.expect("the seed's encrypt works"))
        .collect();
    for (ct, value) in ciphertexts.iter().zip(&values) {
        assert_wire_format(ct, value);
    }
    let plaintexts = ivrguard_cipher_lines("decrypt", &key, &ciphertexts);
    assert_eq!(plaintexts, values);
}

/// During a key rotation (README): ciphertexts the seed's Node code made
/// under the old key and under the new one, mixed, are all decrypted by one
/// `ivrguard decrypt` given both keys; a third key's fails.
#[test]
fn ivrguard_decrypt_with_two_keys_reads_either_during_a_rotation() {
    let (old, new, other) = (random_hex(32), random_hex(32), random_hex(32));
    let values = sample_values();
    let made = |key: &str, values: &[String]| -> Vec<String> {
        node_aes("encrypt", key, values)
            .into_iter()
            .map(|r| r.expect("the seed's encrypt works"))
            .collect()
    };
    let (under_old, under_new) = (made(&old, &values), made(&new, &values));
    let mixed: Vec<String> = under_old
        .iter()
        .zip(&under_new)
        .enumerate()
        .map(|(i, (o, n))| if i % 2 == 0 { o.clone() } else { n.clone() })
        .collect();
    let mut cmd = ivrguard();
    cmd.args(["decrypt", "--key-env", "NEW_KEY", "--key-env", "OLD_KEY"])
        .env("NEW_KEY", &new)
        .env("OLD_KEY", &old);
    let mut input = mixed.join("\n");
    input.push('\n');
    let out = run(cmd, input.as_bytes(), "ivrguard decrypt with two keys");
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), values);

    let mut cmd = ivrguard();
    cmd.args(["decrypt", "--key-env", "NEW_KEY", "--key-env", "OTHER_KEY"])
        .env("NEW_KEY", &new)
        .env("OTHER_KEY", &other);
    let line = format!("{}\n", under_old[0]);
    let out = run(cmd, line.as_bytes(), "ivrguard decrypt, neither key");
    assert!(
        !out.status.success(),
        "a ciphertext under neither key decrypted"
    );
    assert!(
        out.stderr.contains("failed authentication"),
        "{}",
        out.stderr
    );
}

#[test]
fn ivrguard_decrypt_refuses_a_forged_node_ciphertext() {
    let key = random_hex(32);
    let secret = random_digits(8);
    let ct = node_aes("encrypt", &key, std::slice::from_ref(&secret))
        .remove(0)
        .expect("encrypt");
    for (label, bad, bad_key) in [
        ("forged tag", tamper(&ct), key.clone()),
        ("wrong key", ct.clone(), random_hex(32)),
    ] {
        let out = ivrguard_cipher("decrypt", &bad_key, &[bad]);
        assert!(
            !out.status.success(),
            "ivrguard decrypt of a {label} exited 0; stdout: {:?}",
            out.stdout
        );
        assert!(
            !out.stdout.contains(&secret) && !out.stderr.contains(&secret),
            "{label}: plaintext printed"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Python `cryptography` (AESGCM).
// ---------------------------------------------------------------------------

#[test]
fn python_cryptography_decrypts_what_ivrguard_encrypt_prints() {
    let key = random_hex(32);
    let values = sample_values();
    let ciphertexts = ivrguard_cipher_lines("encrypt", &key, &values);
    let decrypted = python_aes("decrypt", &key, &ciphertexts);
    for ((result, value), ct) in decrypted.iter().zip(&values).zip(&ciphertexts) {
        assert_eq!(
            result.as_deref(),
            Ok(value.as_str()),
            "AESGCM could not decrypt {ct}"
        );
    }
    assert!(
        python_aes("decrypt", &key, &[tamper(&ciphertexts[0])])[0].is_err(),
        "AESGCM accepted a forged tag"
    );
}

#[test]
fn ivrguard_decrypt_reads_what_python_cryptography_encrypts() {
    let key = random_hex(32);
    let values = sample_values();
    let ciphertexts: Vec<String> = python_aes("encrypt", &key, &values)
        .into_iter()
        .map(|r| r.expect("AESGCM encrypt works"))
        .collect();
    assert_eq!(ivrguard_cipher_lines("decrypt", &key, &ciphertexts), values);
}

/// Found in review: the proxy encrypts decoded values, so a `%0A` in a
/// `SpeechResult` is a line break in the plaintext, and `decrypt` printed
/// two lines for one. Now such a line is an error (exit 1), with the
/// plaintext withheld, after the lines before it.
#[test]
fn decrypt_refuses_a_plaintext_that_one_output_line_cannot_carry() {
    let key = random_hex(32);
    let values: Vec<String> = ["1234", "my pin is\n9137", "esc\u{1b}[2Jcode", "4321"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let ciphertexts: Vec<String> = python_aes("encrypt", &key, &values)
        .into_iter()
        .map(|r| r.expect("AESGCM encrypt works"))
        .collect();
    for bad in [1, 2] {
        let input = [ciphertexts[0].clone(), ciphertexts[bad].clone()];
        let out = ivrguard_cipher("decrypt", &key, &input);
        assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
        assert_eq!(out.stdout, "1234\n");
        assert!(out.stderr.contains("line 2:"), "{}", out.stderr);
        assert!(!out.stderr.contains("9137") && !out.stderr.contains("code"));
    }
    // A tab is one line still.
    let tab = ivrguard_cipher_lines(
        "decrypt",
        &key,
        &python_aes("encrypt", &key, &["a\tb".to_string()])
            .into_iter()
            .map(|r| r.unwrap())
            .collect::<Vec<_>>(),
    );
    assert_eq!(tab, ["a\tb"]);
}

/// A closed or full stdout is one error line and exit 1, not a panic (exit
/// 101), for every command that prints (found in review: `demo | head`).
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let key = random_hex(32);
    for args in [
        &["keygen"][..],
        &["demo"],
        &[
            "sign",
            "--token-env",
            "INTEROP_KEY",
            "--url",
            "https://x.example/",
        ],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let mut cmd = ivrguard();
        cmd.args(args).env("INTEROP_KEY", &key);
        cmd.stdout(full).stderr(Stdio::piped()).stdin(Stdio::null());
        let out = cmd.output().expect("run ivrguard");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("writing stdout"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panic"), "{args:?}: {stderr}");
    }
}

/// `--param` without `=` is a usage error (exit 2), like clap's own.
#[test]
fn sign_param_without_equals_is_a_usage_error() {
    let mut cmd = ivrguard();
    cmd.args([
        "sign",
        "--token-env",
        "INTEROP_KEY",
        "--url",
        "https://x.example/",
        "--param",
        "Digits",
    ])
    .env("INTEROP_KEY", random_hex(16));
    let out = run(cmd, b"", "ivrguard sign");
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("NAME=VALUE"), "{}", out.stderr);
}

/// Found in review: `--url /ivr` or `--url ivr.example.com/ivr` printed a
/// signature that could never match; a usage error now (exit 2).
#[test]
fn sign_url_must_be_the_whole_url() {
    for (url, says) in [
        ("/ivr", "http:// or https://"),
        ("ivr.example.com/ivr", "http:// or https://"),
        ("https://", "a host"),
        ("https:///ivr", "a host"),
    ] {
        let mut cmd = ivrguard();
        cmd.args(["sign", "--token-env", "INTEROP_KEY", "--url", url])
            .env("INTEROP_KEY", random_hex(16));
        let out = run(cmd, b"", "ivrguard sign");
        assert_eq!(out.status.code(), Some(2), "{url}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{url}: {}", out.stderr);
    }
}

#[test]
fn keygen_prints_a_key_that_node_and_python_accept() {
    let keygen = || {
        let out = run(
            {
                let mut cmd = ivrguard();
                cmd.arg("keygen");
                cmd
            },
            b"",
            "ivrguard keygen",
        );
        assert!(
            out.status.success(),
            "ivrguard keygen failed:\n{}",
            out.stderr
        );
        out.stdout.trim_end_matches('\n').to_owned()
    };
    let (a, b) = (keygen(), keygen());
    for key in [&a, &b] {
        assert_eq!(key.len(), 64, "keygen printed {key:?}");
        assert!(
            key.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
            "not lowercase hex: {key:?}"
        );
    }
    assert_ne!(a, b, "two keygen runs printed the same key");

    let values = vec!["2468".to_owned(), "número 👍".to_owned()];
    let cts = ivrguard_cipher_lines("encrypt", &a, &values);
    let via_node: Vec<_> = node_aes("decrypt", &a, &cts)
        .into_iter()
        .map(|r| r.expect("node decrypt"))
        .collect();
    let via_python: Vec<_> = python_aes("decrypt", &a, &cts)
        .into_iter()
        .map(|r| r.expect("python decrypt"))
        .collect();
    assert_eq!(via_node, values);
    assert_eq!(via_python, values);
}

// ---------------------------------------------------------------------------
// `ivrguard sign` against both SDKs.
// ---------------------------------------------------------------------------

#[test]
fn sign_subcommand_agrees_with_python_and_node_sdks() {
    struct SignCase {
        token: String,
        url: &'static str,
        params: Vec<(&'static str, String)>,
        /// A published vector, when there is one.
        expected: Option<&'static str>,
    }
    let token = random_hex(16);
    let docs_params = vec![
        ("CallSid", "CA1234567890ABCDE".to_owned()),
        ("Caller", "+14158675309".to_owned()),
        ("Digits", "1234".to_owned()),
        ("From", "+14158675309".to_owned()),
        ("To", "+18005551212".to_owned()),
    ];
    let cases = vec![
        // The Python SDK's own vector (test_request_validator.py, also in twilio-node).
        SignCase {
            token: "12345".into(),
            url: "https://mycompany.com/myapp.php?foo=1&bar=2",
            params: docs_params.clone(),
            expected: Some("RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        },
        SignCase {
            token: token.clone(),
            url: "https://ivr.example.com/ivr?step=getPin&x=a%20b",
            params: docs_params,
            expected: None,
        },
        SignCase {
            token: token.clone(),
            url: "https://ivr.example.com/ivr/speech",
            params: vec![
                (
                    "SpeechResult",
                    "Quiero pagar mi factura, número 4 👍".into(),
                ),
                ("CallerName", "José Ñandú".into()),
                ("Empty", String::new()),
                ("Equation", "a=b&c".into()),
            ],
            expected: None,
        },
        SignCase {
            token: token.clone(),
            url: "https://ivr.example.com/ivr",
            params: vec![
                ("Digits", "5678".into()),
                ("Digits", "1234".into()),
                ("Digits", "1234".into()),
                ("AccountSid", "AC0001".into()),
            ],
            expected: None,
        },
        SignCase {
            token: token.clone(),
            url: "https://ivr.example.com/ivr?name=William+O'hara&Digits=1234&From=%2B14155550100",
            params: vec![],
            expected: None,
        },
    ];

    let input = |c: &SignCase| json!({ "url": c.url, "params": c.params.iter().map(|(k, v)| [*k, v.as_str()]).collect::<Vec<_>>() });
    let mut python_sigs = Vec::new();
    let mut node_sigs = Vec::new();
    for c in &cases {
        let doc = json!({ "token": c.token, "cases": [input(c)] });
        python_sigs.push(
            run_json(python_script("sign_sdks.py"), &doc, "sign_sdks.py")["signatures"][0].clone(),
        );
        node_sigs.push(
            run_json(node_script("sign_sdks.js"), &doc, "sign_sdks.js")["signatures"][0].clone(),
        );
    }

    for ((c, py), js) in cases.iter().zip(&python_sigs).zip(&node_sigs) {
        let mut cmd = ivrguard();
        cmd.args(["sign", "--token-env", "INTEROP_TOKEN", "--url", c.url])
            .env("INTEROP_TOKEN", &c.token);
        for (name, value) in &c.params {
            cmd.arg("--param").arg(format!("{name}={value}"));
        }
        let out = run(cmd, b"", "ivrguard sign");
        assert!(
            out.status.success(),
            "ivrguard sign failed for {}:\n{}",
            c.url,
            out.stderr
        );
        let ours = out.stdout.trim();
        assert_eq!(py, js, "the two SDKs disagree on {} {:?}", c.url, c.params);
        assert_eq!(
            Some(ours),
            py.as_str(),
            "ivrguard sign vs Python SDK for {} {:?}",
            c.url,
            c.params
        );
        if let Some(expected) = c.expected {
            assert_eq!(ours, expected, "published vector for {}", c.url);
        }
    }
}

// ---------------------------------------------------------------------------
// 3 and 4. The proxy end to end, SDK-signed on the way in, SDK-validated on
// the way out.
// ---------------------------------------------------------------------------

/// The app: `backend.py` (Python SDK validation, AESGCM decryption).
fn start_backend(token: &str, key: &str) -> (Service, String) {
    let mut cmd = python_script("backend.py");
    cmd.env("TWILIO_AUTH_TOKEN", token)
        .env("IVRGUARD_KEY", key)
        .env("IVRGUARD_FIELDS", FIELDS.join(","))
        .env("PYTHONUNBUFFERED", "1");
    let mut backend = Service::start("backend.py", cmd);
    let ready = backend.wait_for_json("listening line", |v| v["event"] == "listening");
    let addr = ready["listen"].as_str().expect("listen address").to_owned();
    (backend, addr)
}

/// One run's secrets, all random.
struct Secrets {
    token: String,
    /// Also accepted, as during a token rotation.
    secondary: String,
    /// The secret of the SharedKey [`SHARED_KEY_ID`].
    shared: String,
    /// The AES-256 key, 64 hex characters.
    key: String,
}

/// The SharedKey id configured in `[[twilio.shared_keys]]`.
const SHARED_KEY_ID: &str = "webhooks_sharedkey_interop";

impl Secrets {
    fn generate() -> Secrets {
        Secrets {
            token: random_hex(16),
            secondary: random_hex(16),
            shared: random_hex(24),
            key: random_hex(32),
        }
    }
}

/// The real binary in front of `upstream`, listening on 127.0.0.1:0.
/// The proxy, its address and its admin listener's.
fn start_ivrguard(dir: &Path, secrets: &Secrets, upstream: &str) -> (Service, String, String) {
    let fields = FIELDS
        .iter()
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
url = "http://{upstream}"

[twilio]
auth_token_env = "TWILIO_AUTH_TOKEN"
secondary_auth_token_env = "TWILIO_AUTH_TOKEN_SECONDARY"
public_url = "{PUBLIC_URL}"

[[twilio.shared_keys]]
id = "{SHARED_KEY_ID}"
secret_env = "TWILIO_SHARED_KEY_SECRET"

[encryption]
key_env = "IVRGUARD_KEY"
fields = [{fields}]

[log]
format = "json"
"#
    );
    let path = dir.join("ivrguard.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = ivrguard();
    cmd.arg("run")
        .arg("--config")
        .arg(&path)
        .current_dir(dir)
        .env("TWILIO_AUTH_TOKEN", &secrets.token)
        .env("TWILIO_AUTH_TOKEN_SECONDARY", &secrets.secondary)
        .env("TWILIO_SHARED_KEY_SECRET", &secrets.shared)
        .env("IVRGUARD_KEY", &secrets.key);
    let mut proxy = Service::start("ivrguard", cmd);
    let ready = proxy.wait_for_json("\"ivrguard listening\" line", |v| {
        find_key(v, "message").and_then(Value::as_str) == Some("ivrguard listening")
    });
    let addr = find_key(&ready, "listen")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no \"listen\" in the start-up line {ready}"))
        .to_owned();
    let admin = find_key(&ready, "admin_listen")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no \"admin_listen\" in the start-up line {ready}"))
        .to_owned();
    (proxy, addr, admin)
}

/// One webhook, as the simulated Twilio sends it.
struct Webhook {
    id: &'static str,
    method: &'static str,
    /// The action URL's path and query (GET params are appended by the client).
    path: String,
    params: Vec<(&'static str, String)>,
    /// How the client signs it (`sign` in twilio_client.*); `{}` = correctly.
    sign: Value,
    /// Whether ivrguard must forward it (else: 403, never reaches the app).
    forwarded: bool,
}

impl Webhook {
    fn call_sid(&self) -> &str {
        &self
            .params
            .iter()
            .find(|(k, _)| *k == "CallSid")
            .expect("every case has a CallSid")
            .1
    }

    /// Every configured field the request carries, in wire order, as
    /// (where, name, plaintext): first the action URL's own query, then the
    /// params (appended to the query for a GET, in the body for a POST).
    fn sensitive(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut fields = Vec::new();
        let query = self.path.split_once('?').map_or("", |(_, q)| q);
        for segment in segments(query) {
            let (name, value) = segment.split_once('=').unwrap_or((segment, ""));
            if let Some(field) = FIELDS.iter().find(|f| **f == name) {
                assert!(
                    value.bytes().all(|b| b.is_ascii_alphanumeric()),
                    "test bug: keep field values in action URLs free of escapes"
                );
                fields.push(("query", *field, value.to_owned()));
            }
        }
        let params_go_to = if self.method == "GET" {
            "query"
        } else {
            "body"
        };
        for (name, value) in &self.params {
            if FIELDS.contains(name) {
                fields.push((params_go_to, *name, value.clone()));
            }
        }
        fields
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "method": self.method,
            "path": self.path,
            "params": self.params.iter().map(|(k, v)| [*k, v.as_str()]).collect::<Vec<_>>(),
            "sign": self.sign,
        })
    }
}

fn pairs(params: &[(&'static str, String)]) -> Vec<[String; 2]> {
    params
        .iter()
        .map(|(k, v)| [(*k).to_owned(), v.clone()])
        .collect()
}

/// The webhooks an end-to-end run sends, with fresh secrets in them.
fn webhooks(account: &str, signer: Signer) -> Vec<Webhook> {
    let call = || format!("CA{}", random_hex(16));
    let base = |digits: &str| -> Vec<(&'static str, String)> {
        vec![
            ("AccountSid", account.to_owned()),
            ("ApiVersion", "2010-04-01".into()),
            ("CallSid", call()),
            ("CallStatus", "in-progress".into()),
            ("Called", "+18005550199".into()),
            ("CallerCity", String::new()),
            ("Digits", digits.to_owned()),
            ("Direction", "inbound".into()),
            ("FinishedOnKey", "#".into()),
            ("From", "+14155550100".into()),
            ("To", "+18005550199".into()),
        ]
    };
    let canary = random_hex(6);
    let speech = format!("Quiero pagar mi factura {canary} número 4 👍 ¿sí?");
    let get_speech = format!("my pin is {} thanks {}", random_digits(6), random_hex(6));
    // A kilobyte of speech, as the load test's second set: escapes every
    // few bytes, and plain runs of 16 bytes and more between them, so that
    // the decoder's 16-byte steps meet both and the value spans many.
    let long_speech = format!(
        "{}referencia{}{}CUENTA {} ¿sí? 👍",
        "mi número de cuenta es el que termina en cuatro dos, envíen la tarjeta \
         a la nueva dirección en la Calle Mayor de Málaga, "
            .repeat(6),
        random_digits(24),
        random_hex(20),
        random_digits(16),
    );
    let (rep_a, rep_b) = (random_digits(8), random_digits(8));
    let valid = json!({});
    let query_digits_path = format!(
        "/ivr/caf%C3%A9?step=processData&Digits={}&n=%E2%9C%93&empty=&flag",
        random_digits(8)
    );
    let mut cases = vec![
        Webhook {
            id: "post-action-url-with-query",
            method: "POST",
            path: "/ivr?step=getPin&x=a%20b".into(),
            params: base(&random_digits(8)),
            sign: valid.clone(),
            forwarded: true,
        },
        Webhook {
            id: "post-raw-apostrophe-in-query",
            method: "POST",
            path: "/ivr?step=processData&name=William+O'hara".into(),
            params: base(&random_digits(8)),
            sign: valid.clone(),
            forwarded: true,
        },
        Webhook {
            // The blog's pattern: a value carried in the next action URL.
            // Fields in a POST's query are encrypted too, empty values too.
            id: "post-field-in-action-url-and-empty-digits",
            method: "POST",
            path: query_digits_path,
            params: base(""),
            sign: valid.clone(),
            forwarded: true,
        },
        Webhook {
            id: "get-webhook-params-in-query",
            method: "GET",
            path: "/ivr/gather?step=pin".into(),
            params: vec![
                ("AccountSid", account.to_owned()),
                ("CallSid", call()),
                ("Digits", random_digits(8)),
                ("From", "+14155550100".into()),
                ("SpeechResult", get_speech),
                ("Confidence", "0.91".into()),
            ],
            sign: valid.clone(),
            forwarded: true,
        },
        Webhook {
            id: "post-repeated-params",
            method: "POST",
            path: "/ivr/repeat".into(),
            params: vec![
                ("CallSid", call()),
                ("Tag", "zeta".into()),
                ("Digits", rep_a.clone()),
                ("Tag", "alpha".into()),
                ("Digits", rep_b),
                ("Digits", rep_a),
                ("Tag", "zeta".into()),
            ],
            sign: valid.clone(),
            forwarded: true,
        },
        Webhook {
            id: "post-utf8-speech-result",
            method: "POST",
            path: "/ivr/speech?lang=es-MX".into(),
            params: vec![
                ("AccountSid", account.to_owned()),
                ("CallSid", call()),
                ("CallerName", "José Ñandú 🎉".into()),
                ("Confidence", "0.93".into()),
                ("Language", "es-MX".into()),
                ("SpeechResult", speech),
            ],
            sign: valid.clone(),
            forwarded: true,
        },
        Webhook {
            id: "post-kilobyte-speech-result",
            method: "POST",
            path: "/ivr/speech?lang=es-ES".into(),
            params: vec![
                ("AccountSid", account.to_owned()),
                ("CallSid", call()),
                ("Confidence", "0.88".into()),
                ("SpeechResult", long_speech),
            ],
            sign: valid.clone(),
            forwarded: true,
        },
        Webhook {
            id: "refused-unsigned",
            method: "POST",
            path: "/ivr?step=getPin".into(),
            params: base(&random_digits(8)),
            sign: json!({ "token": "none" }),
            forwarded: false,
        },
        Webhook {
            id: "refused-wrong-token",
            method: "POST",
            path: "/ivr?step=getPin".into(),
            params: base(&random_digits(8)),
            sign: json!({ "token": "wrong" }),
            forwarded: false,
        },
        {
            let sent = base(&random_digits(8));
            let mut signed = sent.clone();
            for (k, v) in signed.iter_mut() {
                if *k == "Digits" {
                    *v = random_digits(8);
                }
            }
            Webhook {
                id: "refused-tampered-digits",
                method: "POST",
                path: "/ivr?step=getPin".into(),
                params: sent,
                sign: json!({ "params": pairs(&signed) }),
                forwarded: false,
            }
        },
        Webhook {
            id: "refused-signed-for-other-path",
            method: "POST",
            path: "/ivr?step=getPin".into(),
            params: base(&random_digits(8)),
            sign: json!({ "path": "/ivr?step=processData" }),
            forwarded: false,
        },
        {
            let sid = call();
            let sent = vec![("CallSid", sid.clone()), ("Digits", random_digits(8))];
            let signed = vec![("CallSid", sid), ("Digits", random_digits(8))];
            Webhook {
                id: "refused-get-tampered-query",
                method: "GET",
                path: "/ivr/gather?step=pin".into(),
                params: sent,
                sign: json!({ "params": pairs(&signed) }),
                forwarded: false,
            }
        },
        Webhook {
            // Token rotation: Twilio already signs with the new token.
            id: "post-signed-with-secondary-token",
            method: "POST",
            path: "/ivr?step=getPin".into(),
            params: base(&random_digits(8)),
            sign: json!({ "token": "secondary" }),
            forwarded: true,
        },
        Webhook {
            // The SDKs accept a signature over the URL with the default port.
            id: "post-signed-over-url-with-default-port",
            method: "POST",
            path: "/ivr?step=getPin".into(),
            params: base(&random_digits(8)),
            sign: json!({ "origin": format!("{PUBLIC_URL}:443") }),
            forwarded: true,
        },
    ];
    if let Signer::PythonSdk = signer {
        // SharedKey signing exists in twilio-python 9.13.0, not in npm 6.2.0.
        let shared = |algorithm: &str| {
            json!({
                "token": "shared",
                "algorithm": algorithm,
                "settings": format!("key={SHARED_KEY_ID},algorithm={algorithm}"),
            })
        };
        cases.extend([
            Webhook {
                id: "post-shared-key-hmac-sha256",
                method: "POST",
                path: "/ivr?step=getPin".into(),
                params: base(&random_digits(8)),
                sign: shared("HMAC_SHA256"),
                forwarded: true,
            },
            Webhook {
                // Spelt as twilio-python still reads it: its own
                // `compute_signature` upper-cases the algorithm, and Twilio
                // may add elements to this beta header.
                id: "post-shared-key-lenient-settings-header",
                method: "POST",
                path: "/ivr?step=getPin".into(),
                params: base(&random_digits(8)),
                sign: json!({
                    "token": "shared",
                    "algorithm": "hmac_sha256",
                    "settings": format!(" key = {SHARED_KEY_ID} , algorithm=hmac_sha256,version=2,"),
                }),
                forwarded: true,
            },
            Webhook {
                id: "get-shared-key-hmac-sha1",
                method: "GET",
                path: "/ivr/gather?step=pin".into(),
                params: vec![("CallSid", call()), ("Digits", random_digits(8))],
                sign: shared("HMAC_SHA1"),
                forwarded: true,
            },
            Webhook {
                // The settings header names a key: no fallback to the token.
                id: "refused-shared-key-header-but-token-signature",
                method: "POST",
                path: "/ivr?step=getPin".into(),
                params: base(&random_digits(8)),
                sign: json!({
                    "token": "primary",
                    "settings": format!("key={SHARED_KEY_ID},algorithm=HMAC_SHA1"),
                }),
                forwarded: false,
            },
            Webhook {
                id: "refused-shared-key-unknown-id",
                method: "POST",
                path: "/ivr?step=getPin".into(),
                params: base(&random_digits(8)),
                sign: json!({
                    "token": "shared",
                    "algorithm": "HMAC_SHA256",
                    "settings": "key=webhooks_sharedkey_unknown,algorithm=HMAC_SHA256",
                }),
                forwarded: false,
            },
            Webhook {
                id: "refused-shared-key-unknown-algorithm",
                method: "POST",
                path: "/ivr?step=getPin".into(),
                params: base(&random_digits(8)),
                sign: json!({
                    "token": "shared",
                    "algorithm": "HMAC_SHA1",
                    "settings": format!("key={SHARED_KEY_ID},algorithm=HMAC_MD5"),
                }),
                forwarded: false,
            },
        ]);
    }
    // Last: once the app has this one, it has had every earlier request.
    cases.push(Webhook {
        id: "sentinel",
        method: "POST",
        path: "/ivr/done".into(),
        params: base(&random_digits(8)),
        sign: valid,
        forwarded: true,
    });
    cases
}

/// Splits a query or form body into its raw `&`-separated segments.
fn segments(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('&').collect()
    }
}

/// Every segment forwarded byte-for-byte, except a configured field's value,
/// which must be replaced by a ciphertext in the wire format.
fn assert_rewritten(id: &str, sent: &str, received: &str, plaintexts: &[&String]) {
    let (sent, received) = (segments(sent), segments(received));
    assert_eq!(
        sent.len(),
        received.len(),
        "{id}: parameter count changed: {sent:?} -> {received:?}"
    );
    let mut plaintexts = plaintexts.iter();
    for (s, r) in sent.iter().zip(&received) {
        let name = s.split('=').next().unwrap_or_default();
        if FIELDS.contains(&name) {
            let plaintext = plaintexts
                .next()
                .unwrap_or_else(|| panic!("test bug: {id} sent an unlisted field {s:?}"));
            let (r_name, r_value) = r
                .split_once('=')
                .unwrap_or_else(|| panic!("{id}: {r:?} has no value"));
            assert_eq!(r_name, name, "{id}: field renamed or reordered");
            assert_wire_format(r_value, plaintext);
        } else {
            assert_eq!(
                s, r,
                "{id}: a non-sensitive parameter was not forwarded byte-for-byte"
            );
        }
    }
    assert!(
        plaintexts.next().is_none(),
        "test bug: {id}: fields listed but not sent"
    );
}

fn header<'a>(record: &'a Value, name: &str) -> Option<&'a str> {
    record["headers"][name].as_str()
}

#[derive(Clone, Copy, Debug)]
enum Signer {
    /// `twilio_client.py`: `RequestValidator.compute_signature`, twilio==9.13.0.
    PythonSdk,
    /// `twilio_client.js`: `twilio.getExpectedTwilioSignature`, npm twilio 6.2.0.
    NodeSdk,
}

/// Sends every [`webhooks`] case through a real ivrguard to `backend.py`
/// and checks the whole chain; see the module docs.
fn webhooks_signed_by_sdk_pass_through_and_validate_downstream(signer: Signer) {
    let secrets = Secrets::generate();
    let (token, key) = (&secrets.token, &secrets.key);
    let account = format!("AC{}", random_hex(16));
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut backend, backend_addr) = start_backend(token, key);
    let (mut proxy, proxy_addr, admin_addr) = start_ivrguard(dir.path(), &secrets, &backend_addr);

    let cases = webhooks(&account, signer);
    let doc = json!({
        "target": proxy_addr,
        "public_url": PUBLIC_URL,
        "cases": cases.iter().map(Webhook::to_json).collect::<Vec<_>>(),
    });
    let mut client = match signer {
        Signer::PythonSdk => python_script("twilio_client.py"),
        Signer::NodeSdk => node_script("twilio_client.js"),
    };
    client
        .env("TWILIO_AUTH_TOKEN", token)
        .env("TWILIO_AUTH_TOKEN_SECONDARY", &secrets.secondary)
        .env("TWILIO_SHARED_KEY_SECRET", &secrets.shared);
    let out = run(
        client,
        doc.to_string().as_bytes(),
        &format!("{signer:?} client"),
    );
    assert!(
        out.status.success(),
        "{signer:?} client failed ({}):\n{}",
        out.status,
        out.stderr
    );
    let results: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("client line {l:?}: {e}")))
        .collect();
    assert_eq!(
        results.len(),
        cases.len(),
        "client answered {} of {} cases",
        results.len(),
        cases.len()
    );

    // Everything the app received, up to and including the sentinel.
    let sentinel = cases.last().expect("cases").call_sid().to_owned();
    let mut records = Vec::new();
    loop {
        let record = backend.wait_for_json("forwarded request", |v| v["event"] == "request");
        let done = record["call_sid"] == sentinel.as_str();
        records.push(record);
        if done {
            break;
        }
    }

    for (case, result) in cases.iter().zip(&results) {
        assert_eq!(result["id"], case.id, "results out of order");
        let id = case.id;
        let arrived: Vec<&Value> = records
            .iter()
            .filter(|r| r["call_sid"] == case.call_sid())
            .collect();
        if !case.forwarded {
            assert_eq!(
                result["status"], 403,
                "{id}: a forged request must get 403, got {result}"
            );
            assert!(
                arrived.is_empty(),
                "{id}: a forged request reached the app: {arrived:?}"
            );
            continue;
        }
        assert_eq!(
            result["status"], 200,
            "{id}: ivrguard refused an SDK-signed webhook: {result}"
        );
        assert!(
            result["body"]
                .as_str()
                .unwrap_or_default()
                .contains("backend ok"),
            "{id}: the app's TwiML did not come back: {result}"
        );
        assert_eq!(
            arrived.len(),
            1,
            "{id}: expected exactly one forwarded request, got {arrived:?}"
        );
        let rec = arrived[0];
        assert_eq!(rec["method"], case.method, "{id}: method");
        assert_eq!(
            header(rec, "host"),
            Some(PUBLIC_HOST),
            "{id}: Host not preserved"
        );
        assert_eq!(
            header(rec, "x-forwarded-proto"),
            Some("https"),
            "{id}: X-Forwarded-Proto"
        );
        assert_eq!(
            header(rec, "x-forwarded-host"),
            Some(PUBLIC_HOST),
            "{id}: X-Forwarded-Host"
        );
        assert_eq!(
            rec["url"],
            format!("{PUBLIC_URL}{}", rec["path"].as_str().unwrap_or_default()),
            "{id}: rebuilt URL"
        );
        assert_eq!(
            rec["sdk_valid"], true,
            "{id}: Python SDK rejects ivrguard's re-signed request: {rec}"
        );

        // Byte-identical forwarding apart from the encrypted values.
        let sent_path = result["path"].as_str().expect("path");
        let got_path = rec["path"].as_str().expect("path");
        let (sent_route, sent_query) = sent_path.split_once('?').unwrap_or((sent_path, ""));
        let (got_route, got_query) = got_path.split_once('?').unwrap_or((got_path, ""));
        assert_eq!(sent_route, got_route, "{id}: path changed");
        let fields = case.sensitive();
        let in_query: Vec<&String> = fields
            .iter()
            .filter(|f| f.0 == "query")
            .map(|f| &f.2)
            .collect();
        let in_body: Vec<&String> = fields
            .iter()
            .filter(|f| f.0 == "body")
            .map(|f| &f.2)
            .collect();
        assert_rewritten(id, sent_query, got_query, &in_query);
        if case.method == "GET" {
            assert_eq!(rec["body"], "", "{id}: a GET grew a body");
        } else {
            assert_rewritten(
                id,
                result["sent_body"].as_str().expect("sent_body"),
                rec["body"].as_str().expect("body"),
                &in_body,
            );
        }
        for (_, name, plain) in fields.iter().filter(|f| !f.2.is_empty()) {
            for place in ["path", "body"] {
                assert!(
                    !rec[place]
                        .as_str()
                        .unwrap_or_default()
                        .contains(plain.as_str()),
                    "{id}: plaintext {name} in the forwarded {place}"
                );
            }
        }

        // Decrypted by the app with `cryptography`, in wire order.
        let expected: Vec<Value> = fields
            .iter()
            .map(|(place, name, plain)| {
                json!({"where": place, "name": name, "plaintext": plain, "error": null})
            })
            .collect();
        assert_eq!(
            rec["decrypted"],
            Value::Array(expected),
            "{id}: AESGCM decryption in the app"
        );
    }
    let unexpected: Vec<&Value> = records
        .iter()
        .filter(|r| {
            !cases
                .iter()
                .any(|c| c.forwarded && r["call_sid"] == c.call_sid())
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "the app received requests nobody sent validly: {unexpected:?}"
    );

    // The same forwarded requests, validated by a Node/Express app.
    let node_view = run_json(
        node_script("validate_requests.js"),
        &json!({ "token": token, "key": key, "fields": FIELDS, "records": records }),
        "validate_requests.js",
    );
    let node_view = node_view.as_array().expect("an array");
    assert_eq!(node_view.len(), records.len());
    for (rec, node) in records.iter().zip(node_view) {
        let sid = &rec["call_sid"];
        assert_eq!(
            node["validate_request"], true,
            "Node twilio.validateRequest rejects the re-signed request {sid}: {rec}"
        );
        assert_eq!(
            node["validate_incoming"], true,
            "Node twilio.validateIncomingRequest (Express behind a proxy) rejects {sid}"
        );
        assert_eq!(
            node["decrypted"], rec["decrypted"],
            "Node crypto and Python AESGCM disagree for {sid}"
        );
    }

    // The metrics, as Prometheus scrapes them (OpenMetrics) and as other
    // scrapers do (text 0.0.4), each read by the official Python client's
    // parser for it: the same counts in both, every counter typed (as 0.0.4
    // the counters were declared under another name than their samples',
    // and the parser typed them `unknown`).
    let mut scrape = python_script("scrape_metrics.py");
    scrape.arg(&admin_addr);
    let scraped = run_json(scrape, &Value::Null, "scrape_metrics.py");
    let forwarded = records.len() as f64;
    for (format, content_type) in [
        (
            "openmetrics",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        ("text", "text/plain; version=0.0.4; charset=utf-8"),
    ] {
        let view = &scraped[format];
        assert_eq!(view["content_type"], content_type, "{format}");
        let families = view["families"].as_object().expect("families");
        let untyped: Vec<&String> = families
            .iter()
            .filter(|(_, f)| f["type"] == "unknown")
            .map(|(name, _)| name)
            .collect();
        assert!(untyped.is_empty(), "{format}: untyped {untyped:?}");
        let value = |family: &str, label: &str, wanted: &str| -> f64 {
            let f = &families[family];
            let samples = f["samples"].as_array().expect("samples");
            samples
                .iter()
                .filter(|s| s[1][label] == wanted || label.is_empty())
                .filter(|s| !s[0].as_str().unwrap_or("").ends_with("_created"))
                .map(|s| s[2].as_f64().expect("a value"))
                .sum()
        };
        assert_eq!(families["ivrguard_requests"]["type"], "counter", "{format}");
        assert_eq!(
            value("ivrguard_requests", "", ""),
            cases.len() as f64,
            "{format}"
        );
        assert_eq!(
            value("ivrguard_requests", "outcome", "forwarded"),
            forwarded
        );
        assert_eq!(
            value("ivrguard_upstream_responses", "class", "2xx"),
            forwarded
        );
        assert_eq!(value("ivrguard_upstream_errors", "kind", "connect"), 0.0);
        let latency = &families["ivrguard_request_duration_seconds"];
        assert_eq!(latency["type"], "histogram", "{format}");
        let count = latency["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .find(|s| s[0] == "ivrguard_request_duration_seconds_count")
            .map(|s| s[2].as_f64().expect("a count"));
        assert_eq!(count, Some(cases.len() as f64), "{format}");
    }

    // Clean shutdown, and nothing sensitive in ivrguard's own output.
    let (status, stderr) = proxy.terminate();
    assert!(
        status.success(),
        "ivrguard exited with {status} after SIGTERM; stderr:\n{stderr}"
    );
    let logs = format!("{}\n{stderr}", proxy.stdout_text());
    for case in &cases {
        for (_, name, value) in case.sensitive().iter().filter(|f| !f.2.is_empty()) {
            assert!(
                !logs.contains(value.as_str()),
                "{}: plaintext {name} in ivrguard's logs:\n{logs}",
                case.id
            );
        }
    }
    assert!(
        [token, key, &secrets.secondary, &secrets.shared]
            .iter()
            .all(|secret| !logs.contains(secret.as_str())),
        "a secret in ivrguard's logs"
    );
    drop(backend);
}

#[test]
fn python_sdk_signed_webhooks_pass_and_validate_in_both_sdks_after_rewrite() {
    webhooks_signed_by_sdk_pass_through_and_validate_downstream(Signer::PythonSdk);
}

#[test]
fn node_sdk_signed_webhooks_pass_and_validate_in_both_sdks_after_rewrite() {
    webhooks_signed_by_sdk_pass_through_and_validate_downstream(Signer::NodeSdk);
}
