//! Hands the memory a burst of connections took back to the system once
//! those connections have closed, and the pages of code that ran once.
//!
//! glibc's allocator keeps what a thread frees in that thread's arena and
//! gives back only free space at the top of a heap, which other live
//! allocations seldom leave free. Each connection holds hyper's 8 KiB read
//! and write buffers, so after a burst of 1,000 callers ivrguard stayed at
//! 28 MiB, 20 MiB of it free heap, for as long as it ran (measured, before
//! this: `bench/RESULTS.md`): a pod's memory never came down after a
//! campaign or an outage's retry storm. `malloc_trim(0)` gives every free
//! page of every arena back (`madvise`): 11 MiB after the same burst.
//!
//! It walks the arenas under their locks, so it is not called per
//! connection or per request: every [`TICK`], the connection counts are
//! looked at, and it runs, on a blocking thread, only when [`CLOSED`]
//! connections (the callers' and the app's) have ended since the last look,
//! or every connection has. In steady traffic it does not run.

use std::sync::Arc;
use std::time::Duration;

use crate::reload::SharedProxy;
use crate::server::Slots;

/// How often the connection counts are looked at.
pub const TICK: Duration = Duration::from_secs(2);

/// Connections that must have ended since the last look for a release.
const CLOSED: usize = 32;

/// Looks at the connection counts every [`TICK`] and releases the heap's
/// free pages when [`due`]; runs until the task is aborted.
pub async fn after_bursts(slots: Arc<Slots>, proxy: SharedProxy) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut upstream_before = 0;
    loop {
        tick.tick().await;
        let (callers_peak, callers) = slots.take_peak();
        let upstream = proxy.load().upstream_connections_open();
        if due(callers_peak, callers, upstream_before, upstream) {
            let started = std::time::Instant::now();
            let released = tokio::task::spawn_blocking(release).await.unwrap_or(false);
            tracing::debug!(
                released,
                took_us = started.elapsed().as_micros() as u64,
                callers_peak,
                callers,
                "freed heap pages handed back to the system"
            );
        }
        upstream_before = upstream;
    }
}

/// Whether enough connections ended since the last look: the most callers'
/// connections open since then against those open now, and the app's
/// connections then and now.
fn due(callers_peak: usize, callers: usize, upstream_before: usize, upstream: usize) -> bool {
    let closed = callers_peak.saturating_sub(callers) + upstream_before.saturating_sub(upstream);
    closed >= CLOSED || (closed > 0 && callers == 0 && upstream == 0)
}

/// Gives the free pages of every malloc arena back; whether any were.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release() -> bool {
    // SAFETY: `malloc_trim` takes a byte count and works only on glibc's
    // own free lists, under the arenas' locks; no pointer or invariant of
    // ours is involved.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other C libraries (musl) have no such call; nothing is done there.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() -> bool {
    false
}

/// After code that runs once (start-up, a reload): drops the resident
/// pages of the process's own machine code ([`release_code`]), on a
/// blocking thread.
pub async fn after_code_ran_once(what: &'static str) {
    let started = std::time::Instant::now();
    let released = tokio::task::spawn_blocking(release_code)
        .await
        .unwrap_or(false);
    tracing::debug!(
        released,
        took_us = started.elapsed().as_micros() as u64,
        after = what,
        "code pages released"
    );
}

/// Drops this process's resident pages of its own machine code (the
/// executable's `r-xp` segments; the mappings stay). The code that start-up
/// runs once (the command line, the config, TLS and logging set-up: 1.3 MiB
/// of pages here) stays resident, and counted in RSS, for the process's
/// life otherwise; the code requests run is faulted back in from the page
/// cache, a minor fault per 64 KiB, the next time it runs. The pages stay
/// in the page cache, charged to the memory cgroup as file cache (which
/// the kernel can reclaim), not as the process's own. Whether anything was
/// released. A debugger's or uprobe's breakpoint set in the code before
/// this call is dropped with it.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn release_code() -> bool {
    let (Ok(exe), Ok(maps)) = (
        std::fs::read_link("/proc/self/exe"),
        std::fs::read_to_string("/proc/self/maps"),
    ) else {
        return false;
    };
    let mut released = false;
    for (start, end) in code_ranges(&maps, &exe.to_string_lossy()) {
        // SAFETY: [start, end) is a whole read-only, executable, private
        // mapping of the executable file, as the kernel lists it.
        // MADV_DONTNEED drops its page-table entries, and each page is
        // faulted back in from the file's page cache when next executed:
        // the mapping stays, so no code becomes unexecutable. The process
        // never writes there; a page a debugger or uprobe wrote (a
        // copy-on-write breakpoint) reverts to the file's bytes, the
        // original code. No Rust object lives there.
        released |= unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) == 0
        };
    }
    released
}

#[cfg(not(target_os = "linux"))]
pub fn release_code() -> bool {
    false
}

/// The address ranges of `exe`'s `r-xp` mappings in a `/proc/<pid>/maps`
/// text.
fn code_ranges(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let perms = fields.next()?;
            let path = fields.nth(3)?.trim_start();
            if perms != "r-xp" || path != exe {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (start < end).then_some((start, end))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_when_enough_connections_ended_or_all_did() {
        // A burst of callers ended; some still open.
        assert!(due(1000, 40, 64, 64));
        // The app's idle connections were closed by the pool.
        assert!(due(10, 10, 64, 0));
        // Steady traffic: a few come and go.
        assert!(!due(50, 40, 10, 8));
        // One caller came and went, and nothing is open now.
        assert!(due(1, 0, 1, 0));
        // Quiet since the last look: nothing to give back.
        assert!(!due(0, 0, 0, 0));
        // Exactly CLOSED.
        assert!(due(CLOSED, 0, 0, 1));
        assert!(!due(CLOSED - 1, 0, 0, 1));
    }

    #[test]
    fn code_ranges_are_the_executables_read_execute_mappings_only() {
        let maps = "\
55d0c0000000-55d0c0100000 r--p 00000000 fd:01 123 /usr/bin/ivrguard
55d0c0100000-55d0c0800000 r-xp 00100000 fd:01 123 /usr/bin/ivrguard
55d0c0800000-55d0c0900000 r--p 00800000 fd:01 123 /usr/bin/ivrguard
55d0c0900000-55d0c0910000 rw-p 00900000 fd:01 123 /usr/bin/ivrguard
55d0c1000000-55d0c1100000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 r-xp 00028000 fd:01 456 /usr/lib/libc.so.6
7f0000200000-7f0000300000 r-xp 00000000 fd:01 789 /usr/bin/ivrguard-other
7f0000400000-7f0000500000 r-xp 00000000 fd:01 123 /usr/bin/ivrguard (deleted)
zzzz-7f0000600000 r-xp 00000000 fd:01 123 /usr/bin/ivrguard
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
";
        assert_eq!(
            code_ranges(maps, "/usr/bin/ivrguard"),
            [(0x55d0c0100000, 0x55d0c0800000)]
        );
        // A binary replaced on disk while running: the kernel says so in
        // both places.
        assert_eq!(
            code_ranges(maps, "/usr/bin/ivrguard (deleted)"),
            [(0x7f0000400000, 0x7f0000500000)]
        );
        assert!(code_ranges(maps, "/nonexistent").is_empty());
    }

    /// This test process's own code, as its `/proc/self/smaps` counts it.
    fn own_code_rss_kib() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_string_lossy();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_code = false;
        let mut total = 0;
        for line in smaps.lines() {
            if let Some(rss) = line.strip_prefix("Rss:") {
                if in_code {
                    total += rss.trim().trim_end_matches(" kB").parse::<u64>().unwrap();
                }
            } else if line.split(' ').nth(1).is_some_and(|p| p.len() == 4) {
                in_code = line.contains(" r-xp ") && line.ends_with(&*exe);
            }
        }
        total
    }

    #[test]
    fn releasing_the_code_lowers_its_rss_and_the_code_still_runs() {
        let before = own_code_rss_kib();
        assert!(before > 0, "the test binary's code is mapped");
        assert!(
            release_code(),
            "the test binary's code was found and released"
        );
        let after = own_code_rss_kib();
        assert!(
            after < before,
            "code RSS {before} KiB before, {after} KiB after"
        );
        // Code runs again after it (this test's own, and the parser's).
        assert_eq!(code_ranges("", "x"), []);
    }
}
