//! Keeps the process's memory to itself. Every subcommand calls [`seal`]
//! first, before it reads a secret.
//!
//! ivrguard holds the auth tokens and the AES key for its whole life, and
//! each caller's digits for the length of a request (hyper's read buffers
//! hold the form as sent). Two ways that memory leaves the process without
//! a log line are closed here:
//!
//! - **A core dump.** A crash (`SIGSEGV`, `SIGABRT`, `SIGQUIT`) would write
//!   the whole heap to a core file or to the host's crash collector. The
//!   core size limit is set to 0, hard and soft, so no file is written and
//!   the limit cannot be raised again.
//! - **Another process of the same user** (the legacy app in a pod that
//!   shares its process namespace, or anything else running under the same
//!   uid): while a process is "dumpable" such a process can read its
//!   `/proc/<pid>/environ` (where the secrets' environment variables are),
//!   `/proc/<pid>/mem`, or attach a debugger. On Linux the process is made
//!   non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`, as OpenSSH and gpg-agent
//!   do): those files become root's, reachable only with `CAP_SYS_PTRACE`,
//!   and the kernel writes no core for it whatever the limit or
//!   `core_pattern`.
//!
//! What it costs an operator: no core file to debug a crash with, and
//! `gdb -p` or `perf -p` need root. A panic prints its location (never its
//! message) and the process goes on or exits as it would have.

/// Forbids core dumps and, on Linux, makes the process non-dumpable. An
/// error is one line naming the call that failed: a security component
/// that could not seal itself does not start.
pub fn seal() -> Result<(), String> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    setrlimit(Resource::Core, none)
        .map_err(|e| format!("cannot forbid core dumps (setrlimit RLIMIT_CORE 0): {e}"))?;
    #[cfg(target_os = "linux")]
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| {
            format!("cannot make the process non-dumpable (prctl PR_SET_DUMPABLE 0): {e}")
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_leaves_no_core_limit_and_a_non_dumpable_process() {
        // The test binary seals itself: nothing else in it needs a core.
        seal().expect("seal");
        let limit = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!((limit.current, limit.maximum), (Some(0), Some(0)));
        #[cfg(target_os = "linux")]
        assert_eq!(
            rustix::process::dumpable_behavior().expect("PR_GET_DUMPABLE"),
            rustix::process::DumpableBehavior::NotDumpable
        );
        // Sealed twice (a subcommand after another in one process): fine.
        seal().expect("seal again");
    }
}
