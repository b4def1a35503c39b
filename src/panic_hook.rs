//! What a panic prints: where it happened, never its message (a message
//! could carry request data).

use std::io::Write;

/// Installs the hook, for every subcommand (`main`).
pub fn install() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        // Not `eprintln!`: it panics when stderr cannot be written (EPIPE:
        // its reader went away), and a panic inside the hook aborts the
        // process, though the panic it reports was caught (a request's:
        // answered 500). Found in review: SIGABRT.
        let _ = writeln!(
            std::io::stderr(),
            "ivrguard: internal error (panic) at {location}; details withheld"
        );
    }));
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    const CHILD: &str = "IVRGUARD_TEST_PANIC_HOOK_CHILD";

    /// A panic caught where it happened (a request's: answered 500) must
    /// not end the process when stderr cannot be written (EPIPE: its
    /// reader went away). This test runs itself again in a child whose
    /// stderr is a pipe with no reader; the child installs the hook and
    /// catches a panic.
    #[test]
    fn a_caught_panic_with_stderr_closed_does_not_end_the_process() {
        if std::env::var_os(CHILD).is_some() {
            super::install();
            let caught = std::panic::catch_unwind(|| panic!("caught"));
            assert!(caught.is_err());
            return;
        }
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "panic_hook::tests::a_caught_panic_with_stderr_closed_does_not_end_the_process",
                "--test-threads=1",
                // Else libtest captures what the test writes to stderr.
                "--nocapture",
            ])
            .env(CHILD, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(writer)
            .spawn()
            .expect("run the test binary again");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the child") {
                break status;
            }
            assert!(Instant::now() < deadline, "the child still runs after 30 s");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(status.success(), "the child ended with {status}");
    }
}
