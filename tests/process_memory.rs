//! What leaves ivrguard's memory without a log line (src/memory_guard.rs):
//! the real binary, run as a user without privileges, against a process of
//! that same user, and killed by a signal that dumps core.
//!
//! When the tests run as root they start the proxy as `nobody` (65534), so
//! that root's `CAP_SYS_PTRACE`, which may read any process, is not the
//! reader; otherwise the proxy runs as the tests' own user.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, RwLock};
use std::time::{Duration, Instant};

use support::proxy::{ProxyConfig, Secrets};

const NOBODY: u32 = 65534;

/// This process's effective uid: the owner of its own `/proc` entry.
fn euid() -> u32 {
    std::fs::metadata("/proc/self").expect("/proc/self").uid()
}

/// Held for writing while the binary is copied, for reading while a child
/// is forked. A child forked while another test's copy is open for writing
/// holds that descriptor until it execs, and exec'ing the copy meanwhile
/// fails with ETXTBSY, "Text file busy" (seen once in about 40 runs, each
/// beside 11 other test processes).
static COPYING_OR_FORKING: RwLock<()> = RwLock::new(());

/// `spawn` (anything that forks), never while the binary is being copied.
fn fork<T>(spawn: impl FnOnce() -> T) -> T {
    let _forking = COPYING_OR_FORKING.read().unwrap_or_else(|e| e.into_inner());
    spawn()
}

/// A directory with the binary and a config the proxy's user can read.
struct Install {
    _dir: tempfile::TempDir,
    binary: PathBuf,
    config: PathBuf,
}

/// Copies the binary (its own directory may not be open to `nobody`) and
/// writes the config, both readable by anyone; no secret is in either.
fn install() -> Install {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let binary = dir.path().join("ivrguard");
    {
        let _copying = COPYING_OR_FORKING
            .write()
            .unwrap_or_else(|e| e.into_inner());
        std::fs::copy(env!("CARGO_BIN_EXE_ivrguard"), &binary).expect("copy binary");
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))
            .expect("chmod binary");
    }
    let config = dir.path().join("ivrguard.toml");
    std::fs::write(&config, ProxyConfig::new("http://127.0.0.1:9").toml()).expect("config");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))
        .expect("chmod config");
    Install {
        _dir: dir,
        binary,
        config,
    }
}

/// Runs `command` as `nobody` when this process is root.
fn unprivileged(command: &mut Command) -> &mut Command {
    if euid() == 0 {
        command.uid(NOBODY).gid(NOBODY);
    }
    command
}

/// A child process, killed if a failed assertion leaves it running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `command` (an `ivrguard run`) and waits at most 10 s for its
/// "ivrguard listening" line.
fn start(command: &mut Command) -> Running {
    let mut child = fork(|| {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
    })
    .expect("spawn ivrguard");
    let stdout = child.stdout.take().expect("piped stdout");
    let (listening, seen) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.contains("\"ivrguard listening\"") {
                let _ = listening.send(());
            }
        }
    });
    let mut child = Running(child);
    if seen.recv_timeout(Duration::from_secs(10)).is_err() {
        panic!(
            "ivrguard did not log \"ivrguard listening\" within 10 s (exit: {:?})",
            child.0.try_wait()
        );
    }
    child
}

/// Waits at most 10 s for `child` to end.
fn wait(child: &mut Running) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            panic!("process {} did not exit within 10 s", child.0.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(pid: u32, name: &str) {
    let status = fork(|| {
        Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
    })
    .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

/// The value of `field` (e.g. "Uid") in `/proc/<pid>/status`.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// Runs `sh -c script` as the proxy's user; its output and whether it
/// succeeded.
fn as_proxy_user(script: &str) -> (bool, String) {
    let output = fork(|| {
        unprivileged(Command::new("sh").args(["-c", script]))
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .output()
    })
    .expect("run sh");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

#[test]
fn a_process_of_the_same_user_cannot_read_its_secrets_or_memory() {
    let install = install();
    let secrets = Secrets::generate();
    let mut proxy = start(
        unprivileged(
            Command::new(&install.binary)
                .arg("run")
                .arg("--config")
                .arg(&install.config),
        )
        .env_clear()
        .envs(secrets.env(false)),
    );
    let pid = proxy.0.id();

    // The proxy is not root, so root's privileges are not what stops the
    // reader below.
    let uid = status_field(pid, "Uid");
    assert!(
        !uid.starts_with("0\t"),
        "the proxy runs as root ({uid}); the test needs it unprivileged"
    );
    if euid() == 0 {
        // Root may read it, and finds the auth token there: what a reader
        // of the same user would get if it could.
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("root reads environ");
        assert!(
            String::from_utf8_lossy(&environ).contains(&secrets.token),
            "the token's variable is in the proxy's environment"
        );
    }

    let (read, output) = as_proxy_user(&format!("cat /proc/{pid}/environ"));
    assert!(
        !read && !output.contains(&secrets.token),
        "a process of the proxy's own user read its environment, auth token included"
    );
    assert!(
        output.contains("Permission denied"),
        "refused for want of permission, not for another reason: {output}"
    );
    // Opening `mem` is what a memory reader (or a debugger) needs first.
    let (opened, output) = as_proxy_user(&format!("exec 3</proc/{pid}/mem"));
    assert!(
        !opened && output.contains("Permission denied"),
        "a process of the proxy's own user opened its memory: {output}"
    );
    // What stays readable by other users (README, Operations): RSS, CPU
    // and limits can still be watched from outside.
    let (watched, output) = as_proxy_user(&format!(
        "cat /proc/{pid}/status /proc/{pid}/stat /proc/{pid}/limits >/dev/null"
    ));
    assert!(
        watched,
        "status, stat and limits must stay readable: {output}"
    );
    // No core file, whatever the signal: the limit is 0 and stays 0.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core limit line");
    assert_eq!(
        core.split_whitespace().collect::<Vec<_>>()[4..6],
        ["0", "0"],
        "{core}"
    );

    signal(pid, "TERM");
    assert!(wait(&mut proxy).success(), "drains and exits 0");
}

/// Whether a process started by `sh` with no core limit, in `dir`, and then
/// sent `SIGABRT`, dumped core (the status says so, or a `core*` file).
fn dumps_core(dir: &Path, exec: &str, wait_for_listening: bool) -> bool {
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            &format!("ulimit -c unlimited 2>/dev/null; exec {exec}"),
        ])
        .current_dir(dir);
    let mut child = if wait_for_listening {
        let secrets = Secrets::generate();
        start(command.env_clear().envs(secrets.env(false)))
    } else {
        Running(fork(|| command.stdout(Stdio::null()).spawn()).expect("spawn control"))
    };
    let pid = child.0.id();
    if !wait_for_listening {
        // The control has exec'd `sleep` once its command line says so.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep"))
        {
            assert!(Instant::now() < deadline, "control did not start sleep");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    signal(pid, "ABRT");
    let status = wait(&mut child);
    assert_eq!(status.signal(), Some(6), "killed by SIGABRT: {status}");
    let files = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("core"));
    status.core_dumped() || files
}

#[test]
fn a_crash_dumps_no_core_even_with_the_core_limit_lifted() {
    let install = install();
    let control_dir = tempfile::tempdir().expect("temp dir");
    let proxy_dir = tempfile::tempdir().expect("temp dir");
    // On this machine, does a process with no core limit dump core?
    let control = dumps_core(control_dir.path(), "sleep 30", false);
    let exec = format!(
        "{:?} run --config {:?}",
        install.binary.display().to_string(),
        install.config.display().to_string()
    );
    assert!(
        !dumps_core(proxy_dir.path(), &exec, true),
        "ivrguard dumped core when it crashed"
    );
    if !control {
        // The kernel dumps no core here at all (core_pattern, or a hard
        // limit this user cannot lift): the test above showed nothing, and
        // the limit and the non-dumpable state are checked by the other test.
        eprintln!("note: this machine dumps no core for any process; see the other test");
    }
    drop(install);
}
