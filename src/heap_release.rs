//! Hands the memory a burst of connections took back to the system once
//! those connections have closed.
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
}
