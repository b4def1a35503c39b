//! Log output: JSON (or text) lines on stdout, scrubbed, never blocking.
//!
//! Every formatted line passes through [`Scrubber`] before it is written: the
//! configured `log.scrub_patterns` and, by default, any standalone run of
//! 13–19 digits that passes the Luhn check (a card number) become
//! `*REDACTED*`. This is the last line of defence; the first is that no code
//! path logs a sensitive value at all (see `access_log`).
//!
//! Lines go through a bounded in-memory queue to a writer thread
//! (`tracing-appender`), so a slow or blocked stdout cannot stall requests;
//! lines that do not fit are dropped and counted. The writer thread writes
//! in batches ([`Batched`]): one `write` per burst of lines, not per line.

use std::borrow::Cow;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use regex::bytes::Regex;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};
use crate::secret::REDACTED;

/// Replaces card-number-like digit runs and configured patterns.
#[derive(Debug, Clone)]
pub struct Scrubber {
    patterns: Vec<Regex>,
    card_numbers: bool,
}

impl Scrubber {
    pub fn new(settings: &LogSettings) -> Self {
        let patterns = settings
            .scrub_patterns
            .iter()
            .map(|re| Regex::new(re.as_str()).expect("pattern compiled when config was loaded"))
            .collect();
        Scrubber {
            patterns,
            card_numbers: settings.scrub_card_numbers,
        }
    }

    /// The line with every match replaced by `*REDACTED*`.
    pub fn scrub<'a>(&self, line: &'a [u8]) -> Cow<'a, [u8]> {
        let mut out = Cow::Borrowed(line);
        if self.card_numbers {
            if let Some(replaced) = redact_card_numbers(&out) {
                out = Cow::Owned(replaced);
            }
        }
        for re in &self.patterns {
            if re.is_match(&out) {
                let replaced = re.replace_all(&out, REDACTED.as_bytes()).into_owned();
                out = Cow::Owned(replaced);
            }
        }
        out
    }
}

/// Replaces each standalone run of 13–19 ASCII digits that passes the Luhn
/// check; `None` if there is none. Standalone: not touching a letter, digit
/// or `_` on either side (so a SID such as `CA4111…` is kept), and not the
/// fraction of a decimal number such as `1.0805019999999999` (a run right
/// after `<digit>.`). A `.` after the run (end of a sentence) is a boundary.
fn redact_card_numbers(line: &[u8]) -> Option<Vec<u8>> {
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < line.len() {
        if !line[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < line.len() && line[i].is_ascii_digit() {
            i += 1;
        }
        let run = &line[start..i];
        // A digit run right after `<digit>.` is the fraction of a decimal.
        let after_decimal_point =
            start >= 2 && line[start - 1] == b'.' && line[start - 2].is_ascii_digit();
        let left_ok = start == 0 || !(is_word(line[start - 1]) || after_decimal_point);
        let right_ok = line.get(i).is_none_or(|b| !is_word(*b));
        if (13..=19).contains(&run.len()) && left_ok && right_ok && luhn_valid(run) {
            let buf = out.get_or_insert_with(|| Vec::with_capacity(line.len()));
            buf.extend_from_slice(&line[copied..start]);
            buf.extend_from_slice(REDACTED.as_bytes());
            copied = i;
        }
    }
    out.map(|mut buf| {
        buf.extend_from_slice(&line[copied..]);
        buf
    })
}

/// The Luhn (mod 10) check over ASCII digits.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let Some(mut v) = (*d as char).to_digit(10) else {
            return false;
        };
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// A `MakeWriter` that scrubs each formatted event before handing it on.
#[derive(Clone)]
pub struct ScrubbingMakeWriter<M> {
    inner: M,
    scrubber: Arc<Scrubber>,
}

impl<M> ScrubbingMakeWriter<M> {
    pub fn new(inner: M, scrubber: Arc<Scrubber>) -> Self {
        ScrubbingMakeWriter { inner, scrubber }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for ScrubbingMakeWriter<M> {
    type Writer = ScrubbingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubbingWriter {
            inner: self.inner.make_writer(),
            scrubber: self.scrubber.clone(),
        }
    }
}

/// Receives one formatted event per `write` call (tracing-subscriber formats
/// the whole line into a buffer first) and writes its scrubbed form.
pub struct ScrubbingWriter<W> {
    inner: W,
    scrubber: Arc<Scrubber>,
}

impl<W: Write> Write for ScrubbingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write_all(&self.scrubber.scrub(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The writer thread's output: lines are collected in memory and written
/// with one `write` when the queue runs empty (`tracing-appender` calls
/// `flush` then), instead of one `write` per line.
///
/// After each such write the thread pauses for [`BATCH_WINDOW`]. While it
/// sleeps, request threads queue their lines without waking it; woken per
/// line, it cost a futex wake-up, a context switch and a `write` for every
/// request (and `crossbeam`'s receive loop spins with `sched_yield` before
/// it sleeps). A line therefore reaches stdout at most about
/// `BATCH_WINDOW` after it was queued. Memory stays bounded by the queue.
struct Batched<W: Write> {
    out: W,
    buf: Vec<u8>,
}

/// How long the writer thread lets the next burst of lines collect.
const BATCH_WINDOW: Duration = Duration::from_millis(2);
/// Written out as soon as this much is collected, even mid-burst.
const BATCH_BYTES: usize = 64 * 1024;

impl<W: Write> Batched<W> {
    fn new(out: W) -> Self {
        Batched {
            out,
            buf: Vec::with_capacity(BATCH_BYTES),
        }
    }

    fn write_out(&mut self) -> io::Result<()> {
        let result = self.out.write_all(&self.buf);
        // Lines that could not be written (EPIPE, a closed stdout) are
        // dropped, like lines that do not fit in the queue.
        self.buf.clear();
        result
    }
}

impl<W: Write> Write for Batched<W> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(line);
        if self.buf.len() >= BATCH_BYTES {
            self.write_out()?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let written = self.write_out().and_then(|()| self.out.flush());
        std::thread::sleep(BATCH_WINDOW);
        written
    }
}

impl<W: Write> Drop for Batched<W> {
    fn drop(&mut self) {
        let _ = self.write_out();
        let _ = self.out.flush();
    }
}

/// Keeps the writer thread alive; dropping it flushes the queue.
pub struct LogHandle {
    _guard: WorkerGuard,
    dropped: ErrorCounter,
}

impl LogHandle {
    /// Lines dropped because stdout could not keep up.
    pub fn dropped_lines(&self) -> usize {
        self.dropped.dropped_lines()
    }
}

/// Installs the global subscriber writing to stdout. Call once, at start-up.
pub fn init(settings: &LogSettings) -> LogHandle {
    init_with(settings, io::stdout())
}

/// Installs the global subscriber writing scrubbed lines to `out` through
/// the bounded non-blocking queue. The demo passes a capturing writer.
pub fn init_with<W: Write + Send + 'static>(settings: &LogSettings, out: W) -> LogHandle {
    let (writer, guard): (NonBlocking, WorkerGuard) =
        tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .thread_name("ivrguard-log")
            .finish(Batched::new(out));
    let dropped = writer.error_counter();
    let make_writer = ScrubbingMakeWriter::new(writer, Arc::new(Scrubber::new(settings)));
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(make_writer);
    // A second init in one process keeps the first subscriber.
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
    LogHandle {
        _guard: guard,
        dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrubber(patterns: &[&str]) -> Scrubber {
        Scrubber {
            patterns: patterns.iter().map(|p| Regex::new(p).unwrap()).collect(),
            card_numbers: true,
        }
    }

    #[test]
    fn luhn_accepts_test_cards_and_rejects_neighbours() {
        assert!(luhn_valid(b"4111111111111111"));
        assert!(luhn_valid(b"378282246310005"));
        assert!(!luhn_valid(b"4111111111111112"));
        assert!(!luhn_valid(b""));
    }

    #[test]
    fn scrubs_standalone_card_numbers_only() {
        let s = scrubber(&[]);
        let cases: &[(&str, &str)] = &[
            (r#"{"msg":"4111111111111111"}"#, r#"{"msg":"*REDACTED*"}"#),
            ("card 4111111111111111 end", "card *REDACTED* end"),
            // Not Luhn-valid: kept.
            ("n 4111111111111112", "n 4111111111111112"),
            // Inside a longer token such as a SID: kept.
            ("CA4111111111111111", "CA4111111111111111"),
            ("x4111111111111111y", "x4111111111111111y"),
            // Too short / too long.
            ("123456789012", "123456789012"),
            ("41111111111111111111111", "41111111111111111111111"),
            // The fraction of a decimal number is not a card number, even
            // when its digits pass Luhn (a latency, a timestamp).
            (
                r#"{"latency_ms":1.4111111111111111}"#,
                r#"{"latency_ms":1.4111111111111111}"#,
            ),
            // But a sentence may end right after one, and lines may start with one.
            ("paid with 4111111111111111.", "paid with *REDACTED*."),
            ("4111111111111111 at start", "*REDACTED* at start"),
            (
                "two 4111111111111111,378282246310005",
                "two *REDACTED*,*REDACTED*",
            ),
            ("snake_4111111111111111", "snake_4111111111111111"),
        ];
        for (input, want) in cases {
            assert_eq!(
                String::from_utf8_lossy(&s.scrub(input.as_bytes())),
                *want,
                "{input}"
            );
        }
    }

    #[test]
    fn batched_writes_lines_when_flushed_or_dropped() {
        let mut out = Vec::new();
        let mut batched = Batched::new(&mut out);
        batched.write_all(b"one\n").unwrap();
        batched.write_all(b"two\n").unwrap();
        assert!(batched.out.is_empty(), "nothing written before a flush");
        batched.flush().unwrap();
        assert_eq!(batched.out.as_slice(), b"one\ntwo\n");
        batched.write_all(b"three\n").unwrap();
        drop(batched);
        assert_eq!(out, b"one\ntwo\nthree\n");
    }

    #[test]
    fn applies_configured_patterns() {
        let s = scrubber(&["secret-[a-z]+"]);
        assert_eq!(&*s.scrub(b"a secret-canary b"), b"a *REDACTED* b");
    }
}
