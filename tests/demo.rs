//! `ivrguard demo` end to end: the real binary, its real output.
//!
//! The demo runs once (shared by the tests below, killed after 30 s) and the
//! tests read what it printed: the access-log lines, the bank's answer, and
//! where the digits the caller typed show up — only on the caller's lines.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

const DEMO_TIMEOUT: Duration = Duration::from_secs(30);
/// The card digits and PIN the demo caller types.
const TYPED: [&str; 2] = ["1234", "4321"];

struct DemoRun {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn demo() -> &'static DemoRun {
    static RUN: OnceLock<DemoRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ivrguard"))
            .arg("demo")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the ivrguard binary");
        let stdout = read_in_background(child.stdout.take().expect("stdout is piped"));
        let stderr = read_in_background(child.stderr.take().expect("stderr is piped"));
        let deadline = Instant::now() + DEMO_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("poll the demo process") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`ivrguard demo` did not finish within {DEMO_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        DemoRun {
            status,
            stdout: stdout.join().expect("stdout reader"),
            stderr: stderr.join().expect("stderr reader"),
        }
    })
}

fn read_in_background(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut out = Vec::new();
        let _ = pipe.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// A successful run, or a failure that shows what the demo said.
fn ok_demo() -> &'static DemoRun {
    let run = demo();
    assert!(
        run.status.success(),
        "`ivrguard demo` exited with {}\n--- stdout\n{}\n--- stderr\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    run
}

/// The access-log JSON objects the demo printed, in order.
fn access_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("access log"))
        .map(|json| {
            // SPEC §6: one JSON object per request, scrubbing included.
            serde_json::from_str(json.trim())
                .unwrap_or_else(|e| panic!("an access line is not valid JSON ({e}): {json}"))
        })
        .collect()
}

/// Whether `token` occurs in `text` as a whole word (not inside a longer
/// run of letters, digits and dots): random hex, SIDs, ports and latencies
/// contain the same four digits by chance now and then, and are not leaks.
fn contains_token(text: &str, token: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
        .any(|word| word == token)
}

#[test]
fn demo_exits_zero_and_the_bank_answers_the_caller() {
    let run = ok_demo();
    assert!(
        run.stdout
            .contains("caller heard        \"Thank you. Your account number is AC12345678 and your balance is 12.55\""),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("<Hangup/>"), "{}", run.stdout);
    assert!(!run.stdout.contains("[FAILED]"), "{}", run.stdout);
}

#[test]
fn access_lines_show_valid_signatures_and_encrypted_digits() {
    let run = ok_demo();
    let lines = access_lines(&run.stdout);
    assert_eq!(
        lines.len(),
        4,
        "three webhooks of the call and one forged one:\n{}",
        run.stdout
    );
    let (call, forged) = lines.split_at(3);
    for line in call {
        assert_eq!(line["signature"], "valid", "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["upstream_status"], 200, "{line}");
    }
    // The two answers to <Gather> carried Digits, and only its name is logged.
    assert_eq!(call[0]["encrypted_fields"], "", "{}", call[0]);
    for line in &call[1..] {
        let fields = line["encrypted_fields"]
            .as_str()
            .expect("encrypted_fields is a string");
        assert!(fields.split(',').any(|f| f == "Digits"), "{line}");
    }
    let forged = &forged[0];
    assert_eq!(forged["signature"], "mismatch", "{forged}");
    assert_eq!(forged["status"], 403, "{forged}");
    assert_eq!(forged["query"], "step=getPin&Digits=*REDACTED*", "{forged}");
}

#[test]
fn typed_digits_appear_only_on_the_callers_lines() {
    let run = ok_demo();
    for digits in TYPED {
        let caller_lines = run
            .stdout
            .lines()
            .filter(|l| l.trim_start().starts_with("caller pressed") && contains_token(l, digits))
            .count();
        assert_eq!(
            caller_lines, 1,
            "the caller's line for {digits}:\n{}",
            run.stdout
        );
    }
    for line in run.stdout.lines() {
        let trimmed = line.trim_start();
        let allowed = trimmed.starts_with("caller pressed")
            || trimmed.starts_with("[ok] the backend never saw");
        if !allowed {
            for digits in TYPED {
                assert!(
                    !contains_token(line, digits),
                    "{digits} printed outside the caller's lines: {line}"
                );
            }
        }
    }
    // What the backend got is ciphertext, shortened.
    let backend_digits: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("Digits = "))
        .collect();
    assert_eq!(backend_digits.len(), 2, "{}", run.stdout);
    for line in backend_digits {
        assert!(line.ends_with("(64 hex chars)"), "{line}");
    }
    assert!(
        !run.stderr.contains("1234") && !run.stderr.contains("4321"),
        "{}",
        run.stderr
    );
}

#[test]
fn prints_no_secret() {
    // The only long hex the demo may print is ciphertext the backend put in
    // its own URL (`encryptedCardDigits=`); an auth token (32 hex) or key
    // (64 hex) anywhere else would be a secret on screen.
    let run = ok_demo();
    for line in run.stdout.lines().chain(run.stderr.lines()) {
        let bytes = line.as_bytes();
        let mut start = 0;
        while start < bytes.len() {
            let end = bytes[start..]
                .iter()
                .position(|b| !b.is_ascii_alphanumeric())
                .map_or(bytes.len(), |n| start + n);
            let word = &bytes[start..end];
            // Lowercase, as the token and key are generated; SIDs (`CA…`) are
            // not secrets and start with capitals.
            if word.len() >= 32 && word.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                assert!(
                    bytes[..start].ends_with(b"encryptedCardDigits="),
                    "long hex printed: {line}"
                );
            }
            start = end + 1;
        }
    }
}
