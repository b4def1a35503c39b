//! The README's Java and Go decrypt snippets decrypt what ivrguard encrypts.
//!
//! The snippets are the files `examples/decrypt/java/IvrguardDecrypt.java`
//! and `examples/decrypt/go/decrypt.go`, shown whole in README.md (checked
//! here too, so the README cannot drift from what is tested). Each is
//! compiled with a small driver from `tests/snippets/` and fed values that
//! `ivrguard encrypt` produced, plus forged and malformed ones.
//!
//! `javac`/`java` (`default-jdk-headless`) and `go` (`golang-go`) are
//! installed by `./tests/run.sh` when missing; without them these tests fail
//! and say so. Everything runs offline (`GOPROXY=off`; the snippets use only
//! the standard libraries).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rand::Rng;
use tempfile::TempDir;

const IVRGUARD: &str = env!("CARGO_BIN_EXE_ivrguard");
/// Compiling and running one snippet (a cold JVM or Go build cache included).
const LIMIT: Duration = Duration::from_secs(120);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd` with `input` on stdin; panics unless it exits 0 within [`LIMIT`].
fn run(mut cmd: Command, input: &str, what: &str) -> String {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "{what}: cannot start {cmd:?}: {e}. ./tests/run.sh installs it \
             (apt-get install default-jdk-headless golang-go)"
        )
    });
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_owned();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {LIMIT:?}, killed");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    assert!(status.success(), "{what} failed ({status}):\n{err}\n{out}");
    out
}

/// The tool, or a failure that says how to get it.
fn tool(name: &str, package: &str) -> Command {
    let found = Command::new(name)
        .arg(match name {
            "go" => "version",
            "node" => "--version",
            _ => "-version",
        })
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{name}` not found: run ./tests/run.sh (it installs it) or apt-get install {package}"
    );
    Command::new(name)
}

fn sample_values() -> Vec<String> {
    let digits: String = (0..6)
        .map(|_| char::from(b'0' + rand::thread_rng().gen_range(0..10u8)))
        .collect();
    [
        "1234",
        "4321",
        "0",
        "#",
        "Zoë said «ça va?» 🇲🇽",
        "a b+c&d=e%20f",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([digits, "9".repeat(500)])
    .collect()
}

/// `ivrguard encrypt` of each value, with a fresh key.
fn encrypt(values: &[String]) -> (String, Vec<String>) {
    let key = hex::encode(rand::thread_rng().gen::<[u8; 32]>());
    let mut cmd = Command::new(IVRGUARD);
    cmd.args(["encrypt", "--key-env", "SNIPPET_KEY"])
        .env("SNIPPET_KEY", &key);
    let out = run(cmd, &(values.join("\n") + "\n"), "ivrguard encrypt");
    let lines: Vec<String> = out.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), values.len(), "{out}");
    (key, lines)
}

/// Feeds the driver genuine values, then forged and malformed ones, and
/// checks every answer.
fn check_driver(mut driver: impl FnMut(&str, &str) -> String, language: &str) {
    let values = sample_values();
    let (key, ciphertexts) = encrypt(&values);
    let mut forged = ciphertexts[0].clone();
    let last = forged.pop().expect("non-empty");
    forged.push(if last == '0' { '1' } else { '0' });
    let mut input: Vec<String> = ciphertexts.clone();
    input.extend([
        forged,                          // tag altered
        ciphertexts[1][..40].to_owned(), // shorter than nonce + tag
        "zz".repeat(40),                 // not hex
    ]);
    let out = driver(&key, &(input.join("\n") + "\n"));
    let answers: Vec<&str> = out.lines().collect();
    assert_eq!(
        answers.len(),
        input.len(),
        "{language}: one answer per line:\n{out}"
    );
    for (answer, value) in answers.iter().zip(&values) {
        assert_eq!(*answer, format!("ok {value}"), "{language} snippet");
    }
    for answer in &answers[values.len()..] {
        assert!(
            answer.starts_with("err "),
            "{language} accepted a bad value: {answer}"
        );
    }

    // The wrong key fails too.
    let other_key = hex::encode(rand::thread_rng().gen::<[u8; 32]>());
    let out = driver(&other_key, &(ciphertexts[0].clone() + "\n"));
    assert!(
        out.starts_with("err "),
        "{language} decrypted with the wrong key: {out}"
    );
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).expect("read README.md")
}

/// The README must show the snippet file exactly as tested.
fn assert_in_readme(snippet: &Path) {
    let code = std::fs::read_to_string(snippet).expect("read snippet");
    assert!(
        readme().contains(code.trim_end()),
        "README.md does not show {} as it is (copy the file into its code block)",
        snippet.display()
    );
}

#[test]
fn java_snippet_decrypts_what_ivrguard_encrypts() {
    let snippet = root().join("examples/decrypt/java/IvrguardDecrypt.java");
    let classes = TempDir::new().expect("temp dir");
    let mut javac = tool("javac", "default-jdk-headless");
    javac
        .arg("-d")
        .arg(classes.path())
        .arg(&snippet)
        .arg(root().join("tests/snippets/DecryptCli.java"));
    run(javac, "", "javac");
    let java = |key: &str, input: &str| {
        let mut cmd = tool("java", "default-jdk-headless");
        cmd.arg("-cp")
            .arg(classes.path())
            .arg("DecryptCli")
            .env("SNIPPET_KEY", key);
        run(cmd, input, "java DecryptCli")
    };
    check_driver(java, "Java");
    assert_in_readme(&snippet);
}

#[test]
fn go_snippet_decrypts_what_ivrguard_encrypts() {
    let snippet = root().join("examples/decrypt/go/decrypt.go");
    let module = TempDir::new().expect("temp dir");
    let m = module.path();
    std::fs::create_dir(m.join("decrypt")).expect("mkdir");
    std::fs::copy(&snippet, m.join("decrypt/decrypt.go")).expect("copy snippet");
    std::fs::copy(
        root().join("tests/snippets/decrypt_cli.go"),
        m.join("main.go"),
    )
    .expect("copy driver");
    std::fs::write(m.join("go.mod"), "module snippettest\n\ngo 1.19\n").expect("go.mod");
    let mut build = tool("go", "golang-go");
    build
        .args(["build", "-o", "decrypt-cli", "."])
        .current_dir(m)
        .env("GOPATH", m.join("gopath"))
        .env("GOCACHE", m.join("gocache"))
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local");
    run(build, "", "go build");
    let cli = m.join("decrypt-cli");
    let go = |key: &str, input: &str| {
        let mut cmd = Command::new(&cli);
        cmd.env("SNIPPET_KEY", key);
        run(cmd, input, "decrypt-cli (Go)")
    };
    check_driver(go, "Go");
    assert_in_readme(&snippet);
}

#[test]
fn node_snippet_decrypts_what_ivrguard_encrypts() {
    let snippet = root().join("examples/decrypt/node/decrypt.js");
    let node = |key: &str, input: &str| {
        let mut cmd = tool("node", "nodejs");
        cmd.arg(root().join("tests/snippets/decrypt_cli.js"))
            .env("SNIPPET_KEY", key);
        run(cmd, input, "node decrypt_cli.js")
    };
    check_driver(node, "Node");
    assert_in_readme(&snippet);
}

#[test]
fn python_snippet_decrypts_what_ivrguard_encrypts() {
    let snippet = root().join("examples/decrypt/python/decrypt.py");
    let python = root().join("tests/interop/.venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./tests/run.sh (it installs `cryptography` there)",
        python.display()
    );
    let py = |key: &str, input: &str| {
        let mut cmd = Command::new(&python);
        cmd.arg(root().join("tests/snippets/decrypt_cli.py"))
            .env("SNIPPET_KEY", key);
        run(cmd, input, "python decrypt_cli.py")
    };
    check_driver(py, "Python");
    assert_in_readme(&snippet);
}
