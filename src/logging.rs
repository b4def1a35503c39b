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
//! lines that do not fit are dropped and counted.

use std::io::{self, Write};
use std::sync::Arc;

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
    card_numbers: Option<Regex>,
}

impl Scrubber {
    pub fn new(settings: &LogSettings) -> Self {
        let patterns = settings
            .scrub_patterns
            .iter()
            .map(|re| Regex::new(re.as_str()).expect("pattern compiled when config was loaded"))
            .collect();
        let card_numbers = settings
            .scrub_card_numbers
            .then(|| Regex::new(r"\b[0-9]{13,19}\b").expect("static pattern"));
        Scrubber {
            patterns,
            card_numbers,
        }
    }

    /// The line with every match replaced by `*REDACTED*`.
    pub fn scrub<'a>(&self, line: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        let mut out = std::borrow::Cow::Borrowed(line);
        if let Some(cards) = &self.card_numbers {
            if cards.find_iter(&out).any(|m| luhn_valid(m.as_bytes())) {
                let replaced = cards.replace_all(&out, |c: &regex::bytes::Captures<'_>| {
                    let digits = &c[0];
                    if luhn_valid(digits) {
                        REDACTED.as_bytes().to_vec()
                    } else {
                        digits.to_vec()
                    }
                });
                out = std::borrow::Cow::Owned(replaced.into_owned());
            }
        }
        for re in &self.patterns {
            if re.is_match(&out) {
                let replaced = re.replace_all(&out, REDACTED.as_bytes()).into_owned();
                out = std::borrow::Cow::Owned(replaced);
            }
        }
        out
    }
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
    !digits.is_empty() && sum % 10 == 0
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
            .finish(out);
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
            card_numbers: Some(Regex::new(r"\b[0-9]{13,19}\b").unwrap()),
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
    fn applies_configured_patterns() {
        let s = scrubber(&["secret-[a-z]+"]);
        assert_eq!(&*s.scrub(b"a secret-canary b"), b"a *REDACTED* b");
    }
}
