//! At most one line per interval for a warning that can come with every
//! request (a signature mismatch, the app refusing what ivrguard
//! re-signed): a flood of such requests costs one line per interval, not
//! one per request (found in review: 71 identical lines in 3 s).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A time before which no line is due, for one kind of warning. Lives in a
/// `static`; the clock starts with the first call.
pub struct LogLimit {
    every_ms: u64,
    start: OnceLock<Instant>,
    next_ms: AtomicU64,
}

impl LogLimit {
    pub const fn new(every: Duration) -> Self {
        LogLimit {
            every_ms: every.as_millis() as u64,
            start: OnceLock::new(),
            next_ms: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now: the first call, then once the
    /// interval has passed since the last line; one caller wins a race.
    pub fn due(&self) -> bool {
        let now = self.start.get_or_init(Instant::now).elapsed();
        self.due_at(now.as_millis() as u64)
    }

    fn due_at(&self, now_ms: u64) -> bool {
        let next = self.next_ms.load(Ordering::Relaxed);
        now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + self.every_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_line_per_interval() {
        let limit = LogLimit::new(Duration::from_secs(10));
        assert!(limit.due_at(0));
        assert!(!limit.due_at(1));
        assert!(!limit.due_at(9_999));
        assert!(limit.due_at(10_000));
        assert!(!limit.due_at(10_001));
        assert!(limit.due_at(25_000), "a quiet spell: due at once");
    }

    #[test]
    fn the_first_call_is_due_and_the_next_is_not() {
        let limit = LogLimit::new(Duration::from_secs(10));
        assert!(limit.due());
        assert!(!limit.due());
    }
}
