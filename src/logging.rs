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
//! in batches (`Batched`): one `write` per burst of lines, not per line.
//! The worker threads' lines go on the queue, in the order written, when
//! a worker goes idle (`log_handoff`), so the writer thread is not woken
//! before a response.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use regex::bytes::Regex;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, WorkerGuard};
use tracing_subscriber::filter::{filter_fn, FilterFn};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};
use crate::log_handoff::DeferringMakeWriter;
use crate::log_limit::LogLimit;
use crate::secret::REDACTED;

/// Replaces card-number-like digit runs and configured patterns.
#[derive(Debug, Clone)]
pub struct Scrubber {
    patterns: Vec<Regex>,
    /// All of `patterns` at once: which JSON values any of them matches is
    /// one search per value, not one per pattern.
    any: regex::bytes::RegexSet,
    card_numbers: bool,
    /// Lines are JSON objects ([`JsonLines`]): patterns apply to string
    /// values only, see [`Scrubber::scrub`].
    json: bool,
}

impl Scrubber {
    pub fn new(settings: &LogSettings) -> Self {
        let patterns: Vec<&str> = settings
            .scrub_patterns
            .iter()
            .map(|re| re.as_str())
            .collect();
        Scrubber::of(
            &patterns,
            settings.scrub_card_numbers,
            settings.format == LogFormat::Json,
        )
    }

    fn of(patterns: &[&str], card_numbers: bool, json: bool) -> Self {
        const COMPILED: &str = "pattern compiled when config was loaded";
        Scrubber {
            patterns: patterns
                .iter()
                .map(|re| Regex::new(re).expect(COMPILED))
                .collect(),
            any: regex::bytes::RegexSet::new(patterns).expect(COMPILED),
            card_numbers,
            json,
        }
    }

    /// The line with every match replaced by `*REDACTED*`.
    ///
    /// `log.scrub_patterns` apply to what can carry request data: in a
    /// JSON line, each string value (decoded, then encoded again), not the
    /// keys, numbers or the `timestamp`; in a text line, all but the
    /// leading timestamp. Applied to the whole line, a PIN pattern such as
    /// `\b\d{4}\b` redacted the year of every timestamp and the digits of
    /// a `"latency_ms":1234.5`, and the line was no longer JSON (found in
    /// review). The card-number rule needs no such care: it replaces only
    /// standalone Luhn-valid digit runs.
    pub fn scrub<'a>(&self, line: &'a [u8]) -> Cow<'a, [u8]> {
        let mut out = Cow::Borrowed(line);
        if self.card_numbers && has_long_digit_run(&out) {
            if let Some(replaced) = redact_card_numbers(&out) {
                out = Cow::Owned(replaced);
            }
        }
        if self.patterns.is_empty() {
            return out;
        }
        let replaced = match self.json {
            // A line that is not the JSON expected (never seen) is scrubbed
            // whole: more redacted, never less.
            true => self
                .scrub_json_strings(&out)
                .unwrap_or_else(|| self.apply_patterns(&out)),
            false => self.scrub_after_timestamp(&out),
        };
        match replaced {
            Some(replaced) => Cow::Owned(replaced),
            None => out,
        }
    }

    /// `text` with every pattern's matches replaced; `None` if none matched.
    fn apply_patterns(&self, text: &[u8]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for re in &self.patterns {
            let current = out.as_deref().unwrap_or(text);
            if re.is_match(current) {
                out = Some(re.replace_all(current, REDACTED.as_bytes()).into_owned());
            }
        }
        out
    }

    /// A text line: its first word is the timestamp when it looks like one
    /// (`2026-11-25T09:30:00.123456Z`).
    fn scrub_after_timestamp(&self, line: &[u8]) -> Option<Vec<u8>> {
        let word = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
        let stamp = &line[..word];
        let skip = match stamp.len() >= 20 && stamp[4] == b'-' && stamp.ends_with(b"Z") {
            true => word,
            false => 0,
        };
        let rest = self.apply_patterns(&line[skip..])?;
        Some([&line[..skip], &rest].concat())
    }

    /// A JSON line as [`JsonLines`] writes it: each string that is a value
    /// (not a key, not the `timestamp`'s) is decoded, scrubbed and encoded
    /// again where it stands. `Some(None)`: nothing matched; `None`: a
    /// string could not be read.
    fn scrub_json_strings(&self, line: &[u8]) -> Option<Option<Vec<u8>>> {
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        let mut key: &[u8] = b"";
        let mut i = 0;
        while let Some(open) = line[i..].iter().position(|&b| b == b'"').map(|p| i + p) {
            let close = string_end(line, open + 1)?;
            let raw = &line[open + 1..close];
            i = close + 1;
            let is_key = line[i..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b':');
            if is_key {
                key = raw;
                continue;
            }
            if key == b"timestamp" {
                continue;
            }
            let decoded: Cow<'_, [u8]> = match raw.contains(&b'\\') {
                false => Cow::Borrowed(raw),
                true => {
                    let quoted = &line[open..=close];
                    let text: String = serde_json::from_slice(quoted).ok()?;
                    Cow::Owned(text.into_bytes())
                }
            };
            if !self.any.is_match(&decoded) {
                continue;
            }
            let Some(scrubbed) = self.apply_patterns(&decoded) else {
                continue;
            };
            let mut encoded = String::new();
            write_json_str(&mut encoded, &String::from_utf8_lossy(&scrubbed)).ok()?;
            let buf = out.get_or_insert_with(|| Vec::with_capacity(line.len()));
            buf.extend_from_slice(&line[copied..open]);
            buf.extend_from_slice(encoded.as_bytes());
            copied = close + 1;
        }
        Some(out.map(|mut buf| {
            buf.extend_from_slice(&line[copied..]);
            buf
        }))
    }
}

/// The index of the `"` that closes the JSON string whose contents start at
/// `from` (escapes skipped); `None` if the string is not closed.
fn string_end(line: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < line.len() {
        match line[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// Replaces each standalone run of 13–19 ASCII digits that passes the Luhn
/// check; `None` if there is none. Standalone: not touching a letter, digit
/// or `_` on either side (so a SID such as `CA4111…` is kept), and not the
/// fraction of a decimal number such as `1.0805019999999999` (a run right
/// after `<digit>.`). A `.` after the run (end of a sentence) is a boundary,
/// and so is an escape before it (see [`after_escape`]).
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
        let (start, escaped) = match after_escape(line, start) {
            Some(end) if end >= i => continue, // the digits were the escape's
            Some(end) => (end, true),
            None => (start, false),
        };
        let run = &line[start..i];
        // A digit run right after `<digit>.` is the fraction of a decimal.
        let after_decimal_point =
            start >= 2 && line[start - 1] == b'.' && line[start - 2].is_ascii_digit();
        let left_ok = escaped || start == 0 || !(is_word(line[start - 1]) || after_decimal_point);
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

/// Where a digit run that begins at `start` really begins, when an escape
/// comes right before it or it begins inside one: the escape stands for one
/// character, a boundary. The query and path are logged percent-encoded,
/// so a caller's `card 4111…` is `card%204111…`, where the run `204111…`
/// begins with the escape's hex digits, and `:4111…` is `%3A4111…`, a
/// letter before the run; JSON writes a line break before it as `\n`, and
/// a control character as `\u001b`. Such a run was never redacted (found
/// in review). Treating every escape as a boundary may redact a run after
/// an escaped letter too: the safe side.
fn after_escape(line: &[u8], start: usize) -> Option<usize> {
    for (intro, hex) in [(&b"%"[..], 2), (&b"\\u"[..], 4)] {
        // How many of the escape's hex digits come before `start`.
        for before in 0..=hex {
            let Some(open) = start.checked_sub(before + intro.len()) else {
                continue;
            };
            let end = open + intro.len() + hex;
            if line[open..].starts_with(intro)
                && line
                    .get(open + intro.len()..end)
                    .is_some_and(|digits| digits.iter().all(u8::is_ascii_hexdigit))
            {
                return Some(end);
            }
        }
    }
    let json_escape = start >= 2 && line[start - 2] == b'\\' && b"nrt".contains(&line[start - 1]);
    json_escape.then_some(start)
}

/// Whether `line` has a run of 13 or more ASCII digits, the shortest card
/// number: [`redact_card_numbers`] can only change such a line. Most lines
/// have none, and this check reads eight bytes per step where that scan
/// reads one (callgrind: ~5,100 instructions per access line before).
fn has_long_digit_run(line: &[u8]) -> bool {
    // One bit per byte of the last 64 bytes, in input order: the newest
    // byte in the lowest bit.
    let mut window = 0u64;
    let mut last = [0u8; 8]; // zero padding is not a digit
    let tail = line.chunks_exact(8).remainder();
    last.iter_mut().zip(tail).for_each(|(byte, &b)| *byte = b);
    let words = line
        .chunks_exact(8)
        .map(|chunk| u64::from_le_bytes(chunk.try_into().expect("chunks of eight bytes")))
        .chain((!tail.is_empty()).then(|| u64::from_le_bytes(last)));
    for word in words {
        // 0x80 in each byte that is '0'..='9': no carries between bytes, as
        // the low seven bits plus 0x50 (or 0x46) stay below 0x100.
        let low = word & 0x7f7f_7f7f_7f7f_7f7f;
        let digits = (low + 0x5050_5050_5050_5050)
            & !(low + 0x4646_4646_4646_4646)
            & !word
            & 0x8080_8080_8080_8080;
        // Gather those bits, first byte of the chunk as the highest bit.
        let gathered = ((digits >> 7).wrapping_mul(0x8040_2010_0804_0201) >> 56) as u8;
        window = (window << 8) | u64::from(gathered);
        // A bit survives the shifts only where 13 consecutive bits are set.
        let mut run = window & (window << 1); // runs of 2
        run &= run << 2; // 4
        run &= run << 4; // 8
        run &= run << 5; // 13
        if run != 0 {
            return true;
        }
    }
    false
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
/// The scrubber sits in a slot that a reload refills
/// ([`ScrubbingMakeWriter::scrubber_slot`]).
#[derive(Clone)]
pub struct ScrubbingMakeWriter<M> {
    inner: M,
    scrubber: Arc<ArcSwap<Scrubber>>,
}

impl<M> ScrubbingMakeWriter<M> {
    pub fn new(inner: M, scrubber: Arc<Scrubber>) -> Self {
        ScrubbingMakeWriter {
            inner,
            scrubber: Arc::new(ArcSwap::new(scrubber)),
        }
    }

    /// Where the scrubber in use is: storing another one there applies it
    /// to every line formatted from then on.
    pub fn scrubber_slot(&self) -> Arc<ArcSwap<Scrubber>> {
        self.scrubber.clone()
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for ScrubbingMakeWriter<M> {
    type Writer = ScrubbingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubbingWriter {
            inner: self.inner.make_writer(),
            scrubber: self.scrubber.load_full(),
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
/// After each such write, while lines keep coming ([`lines_flowing`]), the
/// thread pauses for [`BATCH_WINDOW`]. While it sleeps, request threads
/// queue their lines without waking it; woken per line, it cost a futex
/// wake-up, a context switch and a `write` for every request (and
/// `crossbeam`'s receive loop spins with `sched_yield` before it sleeps).
/// A line therefore reaches stdout at most about `BATCH_WINDOW` after it
/// was queued. Memory stays bounded by the queue.
struct Batched<W: Write> {
    out: W,
    buf: Vec<u8>,
    /// When the last write-out ended.
    last: Option<Instant>,
    /// Lines dropped so far, and how many the log has been told of.
    dropped: Arc<Dropped>,
    told: usize,
    /// When a WARN line saying lines were dropped was last logged.
    last_told: Option<Instant>,
    /// A [`FLUSH_MARKER`] came: say so after the next write-out (after the
    /// one that follows, if that one told of dropped lines).
    marker: bool,
    /// The last write-out that wrote anything went through: stdout is read.
    writing: bool,
}

/// Lines dropped: those the full queue refused (tracing-appender counts
/// them) and those a failed write lost ([`Batched`] counts them).
#[derive(Default)]
struct Dropped {
    queue: std::sync::OnceLock<ErrorCounter>,
    unwritten: AtomicUsize,
    /// [`FLUSH_MARKER`]s the full queue refused: not lines, not counted.
    markers_refused: AtomicUsize,
    /// Set once the writer has written everything queued before a
    /// [`FLUSH_MARKER`].
    marker_reached: std::sync::Mutex<bool>,
    marker_written: std::sync::Condvar,
}

impl Dropped {
    fn refused_by_queue(&self) -> usize {
        self.queue.get().map_or(0, ErrorCounter::dropped_lines)
    }

    fn total(&self) -> usize {
        let queue = self
            .refused_by_queue()
            .saturating_sub(self.markers_refused.load(Ordering::Relaxed));
        queue.saturating_add(self.unwritten.load(Ordering::Relaxed))
    }

    fn lock_reached(&self) -> std::sync::MutexGuard<'_, bool> {
        self.marker_reached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What [`LogHandle::finish`] puts on the queue behind the lines to write:
/// the writer writes everything before it, then says so. No formatted
/// line is this (each ends with a line break).
const FLUSH_MARKER: &[u8] = b"\0ivrguard: written up to here\0";

/// At most one WARN line saying lines were dropped per this long.
const TELL_DROPPED_EVERY: Duration = Duration::from_secs(10);

/// How long the writer thread lets the next burst of lines collect.
const BATCH_WINDOW: Duration = Duration::from_millis(2);

/// Whether lines keep coming: the previous write-out ended less than two
/// [`BATCH_WINDOW`]s ago. Only then does the writer thread pause after a
/// write-out. Lines further apart than that (below about 250 a second)
/// would each cost the pause's timer wake-up on top of the wake-up that
/// brings the line; without the pause the thread waits for the next line.
fn lines_flowing(previous: Option<Instant>, now: Instant) -> bool {
    previous.is_some_and(|previous| now.saturating_duration_since(previous) < 2 * BATCH_WINDOW)
}
/// Written out as soon as this much is collected, even mid-burst.
const BATCH_BYTES: usize = 64 * 1024;

impl<W: Write> Batched<W> {
    fn new(out: W, dropped: Arc<Dropped>) -> Self {
        Batched {
            out,
            buf: Vec::with_capacity(BATCH_BYTES),
            last: None,
            dropped,
            told: 0,
            last_told: None,
            marker: false,
            writing: false,
        }
    }

    /// Writes the collected lines. Lines that could not be written (EPIPE:
    /// the log reader went away) are dropped and counted, like lines that
    /// do not fit in the queue; a line cut short counts as dropped. Found
    /// in review: with stdout closed every line was lost, silently, and
    /// `log_lines_dropped_total` stayed at 0.
    fn write_out(&mut self) -> io::Result<()> {
        let mut written = 0;
        let result = loop {
            let Some(rest) = self.buf.get(written..).filter(|rest| !rest.is_empty()) else {
                break Ok(());
            };
            match self.out.write(rest) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        match &result {
            Ok(()) if written > 0 => self.writing = true,
            Ok(()) => {}
            Err(e) => {
                self.writing = false;
                let lost = self.buf.get(written..).unwrap_or_default();
                let lines = lost.iter().filter(|&&b| b == b'\n').count();
                self.dropped.unwritten.fetch_add(lines, Ordering::Relaxed);
                say_lines_are_dropped(e);
            }
        }
        self.buf.clear();
        result
    }

    /// Lines dropped since the log last said so: a WARN line says how
    /// many, so the gap is in the audit trail itself, not only in
    /// `log_lines_dropped_total` (found in review). Called by a flush once
    /// a write went through (stdout is read again) and no line was refused
    /// during it. The line goes on the queue; if that refuses it, it is
    /// dropped like any line, and the lines are told by the next WARN line,
    /// at most one per [`TELL_DROPPED_EVERY`]. Returns whether one was
    /// logged.
    fn tell_of_dropped_lines(&mut self) -> bool {
        let total = self.dropped.total();
        let due = self
            .last_told
            .is_none_or(|last| last.elapsed() >= TELL_DROPPED_EVERY);
        if total <= self.told || !due {
            return false;
        }
        let refused = self.dropped.refused_by_queue();
        tracing::warn!(
            dropped_lines = total - self.told,
            dropped_lines_total = total,
            "log lines were dropped: stdout did not keep up, or could not be written"
        );
        // Another thread's line refused at the same instant looks like
        // this one's refusal: the next try waits its 10 s all the same
        // (found in review: the same lines were told at every flush).
        self.last_told = Some(Instant::now());
        if self.dropped.refused_by_queue() == refused {
            self.told = total;
        }
        true
    }
}

/// Says on stderr, at most once per [`WRITE_FAILED_EVERY`], that stdout
/// cannot be written: nothing else would (the log is the very thing that
/// fails). Only the writer thread calls it, so a stalled stderr stalls
/// no request. The error is the system's (`Broken pipe`), no request data.
fn say_lines_are_dropped(error: &io::Error) {
    static LIMIT: LogLimit = LogLimit::new(WRITE_FAILED_EVERY);
    if LIMIT.due() {
        let _ = writeln!(
            io::stderr(),
            "ivrguard: writing the log to stdout failed ({error}): log lines are dropped and \
             counted in ivrguard_log_lines_dropped_total"
        );
    }
}

/// At most one such notice on stderr per this long.
const WRITE_FAILED_EVERY: Duration = Duration::from_secs(60);

/// A failed write is dealt with here (its lines counted, stderr told), and
/// not reported to tracing-appender's writer thread: given an error by the
/// `flush` after a batch, its loop forgets the shutdown message that batch
/// ended with, and exiting waited its full second for it (found in review:
/// 6 exits in 10 took 1 s instead of 10 ms with stdout closed).
impl<W: Write> Write for Batched<W> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if line == FLUSH_MARKER {
            self.marker = true;
            // The exit: lines dropped are told now, not 10 s on.
            self.last_told = None;
            return Ok(line.len());
        }
        self.buf.extend_from_slice(line);
        if self.buf.len() >= BATCH_BYTES {
            let _ = self.write_out();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let refused_before = self.dropped.refused_by_queue();
        if self.write_out().is_ok() {
            let _ = self.out.flush();
        }
        // Lines refused while this write-out ran: it blocked on stdout and
        // the queue filled behind it, so a WARN line now would be refused
        // too, and the next try wait its 10 s (seen in CI: no WARN line
        // within 5 s of stdout being read again). The flush that follows,
        // once the queue has run empty, tells instead.
        let queue_filled = self.dropped.refused_by_queue() != refused_before;
        let told = self.writing && !queue_filled && self.tell_of_dropped_lines();
        // tracing-appender flushes once the queue is empty: everything
        // queued before the marker is written (or was lost, and counted).
        // A WARN line just told went on the queue behind the marker: the
        // next flush comes once it is written (found in review: the exit
        // came first, and the log never said lines were dropped).
        if !told && std::mem::take(&mut self.marker) {
            *self.dropped.lock_reached() = true;
            self.dropped.marker_written.notify_all();
        }
        let now = Instant::now();
        let flowing = lines_flowing(self.last, now);
        self.last = Some(now);
        if flowing {
            std::thread::sleep(BATCH_WINDOW);
        }
        Ok(())
    }
}

impl<W: Write> Drop for Batched<W> {
    fn drop(&mut self) {
        let _ = self.write_out();
        let _ = self.out.flush();
    }
}

/// The JSON line format: the object `tracing_subscriber`'s
/// `.json().flatten_event(true)` writes — `timestamp`, `level`, the event's
/// fields in order, `target` — written straight into the line buffer.
///
/// tracing-subscriber's own JSON formatter goes through `serde_json` and an
/// adaptor that re-checks every fragment as UTF-8; for an access line that
/// came to ~25,000 instructions, several times the rest of the request's
/// own work. Values are encoded as it encodes them: strings escaped as
/// `serde_json` does, integers and booleans bare, floats in their shortest
/// round-trip form (`null` if not finite), `Debug`/`Display` values as
/// strings. Spans are not written (the JSON format never showed them).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer, SystemTime::now())?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(meta.level().as_str())?;
        writer.write_char('"')?;
        let mut fields = JsonFields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        write_json_str(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct JsonFields<'w, W: fmt::Write> {
    out: &'w mut W,
    result: fmt::Result,
}

impl<W: fmt::Write> JsonFields<'_, W> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                self.out.write_str(",\"")?;
                JsonEscaped(&mut *self.out).write_str(field.name())?;
                self.out.write_str("\":")?;
                value(self.out)
            })();
        }
    }
}

impl<W: fmt::Write> Visit for JsonFields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| write_json_str(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| {
            out.write_char('"')?;
            write!(JsonEscaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| write_decimal(out, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| {
            if value < 0 {
                out.write_char('-')?;
            }
            write_decimal(out, value.unsigned_abs())
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // `{:?}` is the shortest round-trip form and keeps `.0` on whole
        // numbers, as serde_json (ryu) writes them.
        self.field(field, |out| {
            if value.is_finite() {
                write!(out, "{value:?}")
            } else {
                out.write_str("null")
            }
        });
    }
}

/// `value` in decimal, without going through `fmt`.
fn write_decimal(out: &mut impl fmt::Write, mut value: u64) -> fmt::Result {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        start -= 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    let text = digits.get(start..).unwrap_or_default();
    out.write_str(std::str::from_utf8(text).expect("ASCII digits"))
}

/// `value` as a JSON string, quotes included.
fn write_json_str(out: &mut impl fmt::Write, value: &str) -> fmt::Result {
    out.write_char('"')?;
    JsonEscaped(out).write_str(value)?;
    out.write_char('"')
}

/// Escapes what it is given as the inside of a JSON string, as `serde_json`
/// does: `"` and `\`, the short forms `\b \f \n \r \t`, every other control
/// character as `\u00XX`; everything else as is.
struct JsonEscaped<'w, W: fmt::Write>(&'w mut W);

impl<W: fmt::Write> fmt::Write for JsonEscaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let needs_escape = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
        let Some(first) = s.bytes().position(needs_escape) else {
            return self.0.write_str(s);
        };
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate().skip(first) {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0x00..=0x1f => "",
                _ => continue,
            };
            // Every byte that needs escaping is ASCII: char boundaries.
            self.0.write_str(s.get(plain..i).unwrap_or_default())?;
            if escape.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                self.0.write_str("\\u00")?;
                self.0.write_char(char::from(HEX[usize::from(b >> 4)]))?;
                self.0.write_char(char::from(HEX[usize::from(b & 0xf)]))?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(s.get(plain..).unwrap_or_default())
    }
}

/// `time` as tracing-subscriber writes it: RFC 3339, UTC, microseconds,
/// e.g. `2026-11-23T10:22:33.123456Z`.
fn write_timestamp(out: &mut impl fmt::Write, time: SystemTime) -> fmt::Result {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let second_of_day = secs % 86_400;
    let micros = since_epoch.subsec_micros();
    if year > 9999 {
        let (h, m, s) = (
            second_of_day / 3600,
            second_of_day / 60 % 60,
            second_of_day % 60,
        );
        return write!(
            out,
            "+{year}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{micros:06}Z"
        );
    }
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut text[0..4], year);
    put_digits(&mut text[5..7], month);
    put_digits(&mut text[8..10], day);
    put_digits(&mut text[11..13], second_of_day / 3600);
    put_digits(&mut text[14..16], second_of_day / 60 % 60);
    put_digits(&mut text[17..19], second_of_day % 60);
    put_digits(&mut text[20..26], u64::from(micros));
    out.write_str(std::str::from_utf8(&text).expect("digits and separators are ASCII"))
}

/// Writes `value` as decimal digits filling `slot` (zero-padded).
fn put_digits(slot: &mut [u8], mut value: u64) {
    for digit in slot.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// (year, month, day) of the proleptic Gregorian calendar for a count of
/// days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Keeps the writer thread alive; dropping it flushes the queue, for at
/// most [`LOG_FLUSH_TIMEOUT`].
pub struct LogHandle {
    guard: std::sync::Mutex<Option<WorkerGuard>>,
    dropped: Arc<Dropped>,
    /// Puts [`FLUSH_MARKER`] on the queue.
    marker: NonBlocking,
}

/// How long exiting waits for the queued lines to be written: a log
/// reader that has stalled cannot hold the exit (found in review: waiting
/// on tracing-appender's guard, which `println!`s to the very stdout that
/// is not read, blocked the exit for as long as the reader stalled). See
/// [`LogHandle::finish`].
pub const LOG_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

impl Drop for LogHandle {
    fn drop(&mut self) {
        self.finish();
    }
}

impl LogHandle {
    /// Writes out the queued lines, waiting at most [`LOG_FLUSH_TIMEOUT`];
    /// lines logged after it are not written. For an exit that runs no
    /// destructors (the second shutdown signal), and for the drop.
    ///
    /// tracing-appender's guard is not what waits: with the queue full it
    /// gives up sending its shutdown message after 0.1 s and `println!`s
    /// that it did, to stdout, blocking until stdout moves; then it
    /// returned, and the exit came with the queued lines unwritten (found
    /// in review: a log reader back 0.8 s after SIGTERM got 387 of ~8,500
    /// lines, that message among them). A [`FLUSH_MARKER`] goes on the
    /// queue behind them instead, and the writer says when it got there.
    /// The guard is never dropped: the process is exiting.
    pub fn finish(&self) {
        let guard = self
            .guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(guard) = guard else {
            return;
        };
        std::mem::forget(guard);
        let deadline = Instant::now() + LOG_FLUSH_TIMEOUT;
        // The queue refuses the marker while it is full, and nothing
        // signals room in it: try again each millisecond, until the
        // deadline. (A line another thread had refused at the same
        // instant is taken for the marker: one line less counted.)
        let mut marker = self.marker.clone();
        loop {
            let refused = self.dropped.refused_by_queue();
            let _ = marker.write(FLUSH_MARKER);
            if self.dropped.refused_by_queue() == refused {
                break;
            }
            self.dropped.markers_refused.fetch_add(1, Ordering::Relaxed);
            if Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut reached = self.dropped.lock_reached();
        while !*reached {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            reached = self
                .dropped
                .marker_written
                .wait_timeout(reached, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Lines dropped because stdout could not keep up (the queue was
    /// full) or could not be written (a closed stdout).
    pub fn dropped_lines(&self) -> usize {
        self.dropped.total()
    }
}

/// Lines held for a slow or blocked stdout before new ones are dropped (and
/// counted): about 3 MiB of access lines, so a stalled log reader cannot
/// push the process past its memory budget (tracing-appender's default is
/// 128,000 lines, measured at +38 MiB).
pub const LOG_QUEUE_LINES: usize = 8_192;

/// Installs the global subscriber writing to stdout. Call once, at start-up.
pub fn init(settings: &LogSettings) -> LogHandle {
    init_with(settings, io::stdout())
}

/// Other crates' events and spans at `info` and above only, whatever
/// `log.level` asks for. Below that, the HTTP libraries describe what the
/// peer sent: h2 logs a `:path` it refuses, query and all, at `debug`,
/// before ivrguard has seen the request, let alone redacted it. ivrguard's
/// own events (targets `ivrguard` and `ivrguard::…`) follow `log.level`.
pub fn dependencies_at_info() -> FilterFn<fn(&Metadata<'_>) -> bool> {
    filter_fn(|meta| *meta.level() <= Level::INFO || is_ours(meta.target()))
}

fn is_ours(target: &str) -> bool {
    target
        .strip_prefix("ivrguard")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

/// What a reload can change in the installed subscriber: the scrubber and
/// the level filter (`log.scrub_*`, `log.level`). `log.format` picks the
/// subscriber's type, so changing it needs a restart (`reload.rs`).
struct LogControl {
    scrubber: Arc<ArcSwap<Scrubber>>,
    set_level: Box<dyn Fn(EnvFilter) -> Result<(), reload::Error> + Send + Sync>,
}

/// Set once, by the [`init_with`] whose subscriber was installed.
static LOG_CONTROL: std::sync::OnceLock<LogControl> = std::sync::OnceLock::new();

/// Applies `log.scrub_patterns`, `log.scrub_card_numbers` and `log.level`
/// from reloaded settings to every line logged from now on (found in
/// review: a reload said "reloaded" and kept the old ones, so a scrub
/// pattern added after a leak was not applied). A no-op before [`init`].
pub fn apply(settings: &LogSettings) {
    apply_scrubbing(settings);
    apply_level(settings);
}

/// The scrubbing half of [`apply`].
pub fn apply_scrubbing(settings: &LogSettings) {
    if let Some(control) = LOG_CONTROL.get() {
        control.scrubber.store(Arc::new(Scrubber::new(settings)));
    }
}

/// The level half of [`apply`].
pub fn apply_level(settings: &LogSettings) {
    // The level was checked when the settings were loaded.
    if let (Some(control), Ok(filter)) = (LOG_CONTROL.get(), EnvFilter::try_new(&settings.level)) {
        let _ = (control.set_level)(filter);
    }
}

/// Installs the global subscriber writing scrubbed lines to `out` through
/// the bounded non-blocking queue. The demo passes a capturing writer.
pub fn init_with<W: Write + Send + 'static>(settings: &LogSettings, out: W) -> LogHandle {
    let (writer, handle) = queue_to(out);
    let make_writer = ScrubbingMakeWriter::new(
        DeferringMakeWriter::new(writer),
        Arc::new(Scrubber::new(settings)),
    );
    let scrubber = make_writer.scrubber_slot();
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(make_writer);
    // A second init in one process keeps the first subscriber (and its
    // control).
    // The two formats make subscribers of two types: one body for both.
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let level = builder.reload_handle();
            let set_level: Box<dyn Fn(EnvFilter) -> _ + Send + Sync> =
                Box::new(move |filter| level.reload(filter));
            builder
                .finish()
                .with(dependencies_at_info())
                .try_init()
                .map(|()| set_level)
        }};
    }
    let installed = match settings.format {
        LogFormat::Json => install!(builder.event_format(JsonLines)),
        LogFormat::Text => install!(builder.with_ansi(false)),
    };
    if let Ok(set_level) = installed {
        let _ = LOG_CONTROL.set(LogControl {
            scrubber,
            set_level,
        });
    }
    handle
}

/// The bounded queue, and the writer thread that writes it to `out`.
fn queue_to<W: Write + Send + 'static>(out: W) -> (NonBlocking, LogHandle) {
    let dropped = Arc::new(Dropped::default());
    let (writer, guard): (NonBlocking, WorkerGuard) =
        tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(LOG_QUEUE_LINES)
            .thread_name("ivrguard-log")
            .finish(Batched::new(out, dropped.clone()));
    let _ = dropped.queue.set(writer.error_counter());
    let handle = LogHandle {
        guard: std::sync::Mutex::new(Some(guard)),
        dropped,
        marker: writer.clone(),
    };
    (writer, handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrubber(patterns: &[&str]) -> Scrubber {
        Scrubber::of(patterns, true, false)
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
            // After an escape, as the query and path are logged (found in
            // review): the escape's hex digits are kept, the number is not.
            (
                "note=my%20card%204111111111111111",
                "note=my%20card%20*REDACTED*",
            ),
            ("note=%3A4111111111111111&x=1", "note=%3A*REDACTED*&x=1"),
            ("note=%2B4111111111111111", "note=%2B*REDACTED*"),
            ("note=card%0A4111111111111111", "note=card%0A*REDACTED*"),
            ("%204111111111111111", "%20*REDACTED*"),
            (
                r#"{"m":"card\n4111111111111111"}"#,
                r#"{"m":"card\n*REDACTED*"}"#,
            ),
            (
                r#"{"m":"\u001b4111111111111111"}"#,
                r#"{"m":"\u001b*REDACTED*"}"#,
            ),
            (
                r#"{"m":"\u00194111111111111111"}"#,
                r#"{"m":"\u0019*REDACTED*"}"#,
            ),
            // The digits of an escape alone are no number; a SID stays.
            ("%2012", "%2012"),
            ("%20CA4111111111111111", "%20CA4111111111111111"),
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
        let mut batched = Batched::new(&mut out, Arc::default());
        batched.write_all(b"one\n").unwrap();
        batched.write_all(b"two\n").unwrap();
        assert!(batched.out.is_empty(), "nothing written before a flush");
        batched.flush().unwrap();
        assert_eq!(batched.out.as_slice(), b"one\ntwo\n");
        batched.write_all(b"three\n").unwrap();
        drop(batched);
        assert_eq!(out, b"one\ntwo\nthree\n");
    }

    /// Takes `room` bytes, then fails as a closed pipe does.
    struct ClosingPipe {
        room: usize,
    }

    impl Write for ClosingPipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match self.room.min(buf.len()) {
                0 => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
                n => {
                    self.room -= n;
                    Ok(n)
                }
            }
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_a_failed_write_lost_are_counted_a_cut_one_included() {
        let dropped = Arc::new(Dropped::default());
        let unwritten = || dropped.unwritten.load(Ordering::Relaxed);
        // The first line and half the second get through.
        let mut batched = Batched::new(ClosingPipe { room: 6 }, dropped.clone());
        for line in ["one\n", "two\n", "three\n"] {
            batched.write_all(line.as_bytes()).unwrap();
        }
        batched.flush().expect("handled here, not reported");
        assert_eq!(unwritten(), 2);
        batched.write_all(b"four\n").unwrap();
        batched.flush().expect("handled here, not reported");
        assert_eq!(unwritten(), 3);
        assert!(batched.buf.is_empty(), "nothing kept to write again");
    }

    #[test]
    fn the_marker_is_not_written_and_is_reached_at_the_next_flush() {
        let dropped = Arc::new(Dropped::default());
        let mut out = Vec::new();
        let mut batched = Batched::new(&mut out, dropped.clone());
        batched.write_all(b"one\n").unwrap();
        batched.write_all(FLUSH_MARKER).unwrap();
        assert!(!*dropped.lock_reached(), "not before the write-out");
        batched.flush().unwrap();
        assert!(*dropped.lock_reached());
        drop(batched);
        assert_eq!(out, b"one\n");
    }

    /// What the subscriber of [`warned_lines`] writes: the line, and (to
    /// play another thread's line refused at that instant) one more write
    /// to a queue that is full.
    struct AlsoRefused {
        out: Capture,
        full: NonBlocking,
    }

    impl Write for AlsoRefused {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.full.write(b"another thread's line\n");
            self.out.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A queue holding one line whose writer thread is blocked: every
    /// further line is refused, and counted. The sender releases it.
    fn a_full_queue() -> (NonBlocking, WorkerGuard, std::sync::mpsc::Sender<()>) {
        struct Blocked(std::sync::mpsc::Receiver<()>);
        impl Write for Blocked {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                let _ = self.0.recv_timeout(Duration::from_secs(10));
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (release, blocked) = std::sync::mpsc::channel();
        let (mut queue, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(1)
            .finish(Blocked(blocked));
        let counter = queue.error_counter();
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter.dropped_lines() == 0 {
            assert!(Instant::now() < deadline, "the queue never refused a line");
            let _ = queue.write(b"filler\n");
        }
        (queue, guard, release)
    }

    /// The WARN lines `flushes` make `batched` log.
    fn warned_lines(batched: &mut Batched<Vec<u8>>, full: NonBlocking, flushes: usize) -> usize {
        let out = Capture::default();
        let writer = AlsoRefused {
            out: out.clone(),
            full,
        };
        let writer = std::sync::Mutex::new(writer);
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(writer)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..flushes {
                batched.write_all(b"a line\n").unwrap();
                batched.flush().unwrap();
            }
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.matches("log lines were dropped").count()
    }

    /// At most one WARN line per `TELL_DROPPED_EVERY`, as documented, also
    /// when another thread's line is refused while the WARN line goes on
    /// the queue: that was taken for the WARN line's refusal, and the
    /// same lines were told again at every flush.
    #[test]
    fn a_line_refused_with_the_warn_line_does_not_repeat_it() {
        let (full, _guard, _release) = a_full_queue();
        let dropped = Arc::new(Dropped::default());
        let _ = dropped.queue.set(full.error_counter());
        dropped.unwritten.store(5, Ordering::Relaxed);
        let mut batched = Batched::new(Vec::new(), dropped.clone());
        assert_eq!(warned_lines(&mut batched, full, 3), 1);
    }

    /// Found in CI: stdout was read again while the writer's flush was
    /// blocked on it, and the queue had filled behind that flush; the WARN
    /// line it logged then was refused, and the next try waited 10 s. A
    /// flush whose write-out saw lines refused leaves the telling to the
    /// next one, which comes once the queue has run empty.
    #[test]
    fn a_flush_that_blocked_while_lines_were_refused_tells_at_the_next() {
        /// Stdout that, while `refusing`, takes as long as it takes the
        /// queue to refuse a line (another thread's) behind it.
        struct SlowStdout {
            full: NonBlocking,
            refusing: Arc<std::sync::atomic::AtomicBool>,
        }
        impl Write for SlowStdout {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.refusing.load(Ordering::Relaxed) {
                    let _ = self.full.write(b"another thread's line\n");
                }
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (full, _guard, _release) = a_full_queue();
        let dropped = Arc::new(Dropped::default());
        let _ = dropped.queue.set(full.error_counter());
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stdout = SlowStdout {
            full,
            refusing: refusing.clone(),
        };
        let mut batched = Batched::new(stdout, dropped.clone());
        let out = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(std::sync::Mutex::new(out.clone()))
            .finish();
        let warned = || {
            let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            text.matches("log lines were dropped").count()
        };
        tracing::subscriber::with_default(subscriber, || {
            batched.write_all(b"a line\n").unwrap();
            batched.flush().unwrap();
            assert_eq!(warned(), 0, "not while the queue was refusing lines");
            refusing.store(false, Ordering::Relaxed);
            batched.write_all(b"a line\n").unwrap();
            batched.flush().unwrap();
            assert_eq!(warned(), 1, "at the next flush");
        });
        assert!(dropped.total() > 0);
    }

    /// The exit's marker: the WARN line saying lines were dropped is
    /// written before `finish` returns (it went on the queue behind the
    /// marker, and the exit came before it was written), and is not held
    /// back by the 10 s since the last one.
    #[test]
    fn at_the_marker_the_warn_line_is_told_and_written_first() {
        let (full, _guard, _release) = a_full_queue();
        let dropped = Arc::new(Dropped::default());
        let mut batched = Batched::new(Vec::new(), dropped.clone());
        dropped.unwritten.store(5, Ordering::Relaxed);
        assert_eq!(warned_lines(&mut batched, full.clone(), 1), 1);
        dropped.unwritten.store(8, Ordering::Relaxed);
        batched.write_all(FLUSH_MARKER).unwrap();
        assert_eq!(
            warned_lines(&mut batched, full.clone(), 1),
            1,
            "told at once"
        );
        assert!(!*dropped.lock_reached(), "the WARN line is not written yet");
        assert_eq!(warned_lines(&mut batched, full, 1), 0);
        assert!(*dropped.lock_reached());
    }

    #[test]
    fn finish_waits_for_the_lines_queued_before_it() {
        let out = Capture::default();
        let (mut queue, handle) = queue_to(out.clone());
        for i in 0..1000 {
            queue.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        handle.finish();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1000);
        assert_eq!(handle.dropped_lines(), 0);
    }

    #[test]
    fn the_writer_pauses_only_while_lines_keep_coming() {
        let now = Instant::now();
        let ago = |ms| now.checked_sub(Duration::from_millis(ms));
        assert!(!lines_flowing(None, now), "the first write-out");
        assert!(lines_flowing(ago(1), now), "a write-out 1 ms before");
        assert!(lines_flowing(ago(3), now), "3 ms before: still a burst");
        assert!(!lines_flowing(ago(4), now), "two windows before: not");
        assert!(
            !lines_flowing(ago(5), now),
            "200 a second: lines 5 ms apart"
        );
        assert!(lines_flowing(Some(now), now));
    }

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn some_events() {
        tracing::info!(
            target: "ivrguard::access",
            method = "POST",
            query = %"step=\"x\"\n\tDigits=*REDACTED*",
            peer = %std::net::Ipv4Addr::LOCALHOST,
            status = 200u16,
            upstream_status = Some(502u16),
            call_sid = None::<&str>,
            latency_ms = 1.9,
            whole = 2.0,
            tiny = 0.000_412,
            not_a_number = f64::NAN,
            delta = -3i64,
            lowest = i64::MIN,
            highest = u64::MAX,
            zero = 0u64,
            flag = true,
            listed = ?["a", "b\\c"],
            "access"
        );
        tracing::warn!(
            count = 5u64,
            "plain {} message with \u{1}, \u{1f}, \u{7f} and \u{e9}",
            5
        );
        tracing::error!(reason = "panic", "request handler panicked; answered 500");
    }

    fn without_timestamps(lines: &[u8]) -> String {
        let text = String::from_utf8(lines.to_vec()).unwrap();
        let re = regex::Regex::new(r#""timestamp":"[^"]*""#).unwrap();
        re.replace_all(&text, r#""timestamp":"T""#).into_owned()
    }

    #[test]
    fn json_lines_match_tracing_subscribers_json_format() {
        let ours = Capture::default();
        let theirs = Capture::default();
        let ours_writer = ours.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(move || ours_writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, some_events);
        let theirs_writer = theirs.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(move || theirs_writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, some_events);
        let ours = without_timestamps(&ours.0.lock().unwrap());
        let theirs = without_timestamps(&theirs.0.lock().unwrap());
        assert_eq!(ours.lines().count(), 3, "{ours}");
        assert_eq!(ours, theirs);
        for line in ours.lines() {
            serde_json::from_str::<serde_json::Value>(line).expect("valid JSON");
        }
    }

    #[test]
    fn other_crates_log_at_info_and_above_only_whatever_the_level() {
        let out = Capture::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_env_filter(EnvFilter::new("trace"))
            .with_writer(move || writer.clone())
            .finish()
            .with(dependencies_at_info());
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "h2::server", "dropped: h2 debug");
            tracing::trace!(target: "hyper::proto::h1::io", "dropped: hyper trace");
            tracing::debug!(target: "ivrguardian", "dropped: a crate named alike");
            tracing::info!(target: "hyper_util::client", "kept: dependency info");
            tracing::warn!(target: "h2::proto", "kept: dependency warn");
            tracing::trace!(target: "ivrguard", "kept: ours at trace");
            tracing::debug!(target: "ivrguard::upstream", "kept: ours at debug");
            tracing::trace!("kept: this module's own target");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("dropped"), "{text}");
        assert_eq!(text.matches("kept").count(), 5, "{text}");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let cases: &[(u64, u32, &str)] = &[
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (68_169_600, 7, "1972-02-29T00:00:00.000007Z"),
            (951_782_400, 123_456, "2000-02-29T00:00:00.123456Z"),
            (1_709_164_800, 999_999, "2024-02-29T00:00:00.999999Z"),
            (1_763_942_400, 500_000, "2025-11-24T00:00:00.500000Z"),
            (4_102_444_799, 1, "2099-12-31T23:59:59.000001Z"),
            (253_402_300_799, 0, "9999-12-31T23:59:59.000000Z"),
        ];
        for &(secs, micros, expected) in cases {
            let time = UNIX_EPOCH + Duration::new(secs, micros * 1000);
            let mut out = String::new();
            write_timestamp(&mut out, time).unwrap();
            assert_eq!(out, expected, "{secs}");
        }
    }

    #[test]
    fn long_digit_run_check_agrees_with_a_byte_by_byte_count() {
        let longest_run = |line: &[u8]| {
            let (mut best, mut current) = (0, 0);
            for b in line {
                current = if b.is_ascii_digit() { current + 1 } else { 0 };
                best = best.max(current);
            }
            best
        };
        // Runs of 12, 13 and 14 digits at every offset of a word, and bytes
        // next to '0' and '9' ('/', ':') that must not count as digits.
        let mut lines: Vec<Vec<u8>> = Vec::new();
        for len in [12, 13, 14] {
            for offset in 0..20 {
                let mut line = vec![b'x'; offset];
                line.extend(std::iter::repeat_n(b'7', len));
                line.extend_from_slice(b"/:y");
                lines.push(line);
            }
        }
        lines.push(b"123456/89012:4567".to_vec());
        lines.push("\u{e9}4111111111111111\u{e9}".as_bytes().to_vec());
        lines.push(b"".to_vec());
        for line in &lines {
            assert_eq!(
                has_long_digit_run(line),
                longest_run(line) >= 13,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        for b in 0..=255u8 {
            let line = [b; 13];
            assert_eq!(has_long_digit_run(&line), b.is_ascii_digit(), "byte {b}");
        }
    }

    proptest::proptest! {
        #[test]
        fn long_digit_run_check_never_misses_a_card_length_run(
            line in proptest::collection::vec(
                proptest::prop_oneof![3 => b'0'..=b'9', 1 => proptest::num::u8::ANY],
                0..80,
            )
        ) {
            let mut longest = 0;
            let mut current = 0;
            for b in &line {
                current = if b.is_ascii_digit() { current + 1 } else { 0 };
                longest = longest.max(current);
            }
            proptest::prop_assert_eq!(has_long_digit_run(&line), longest >= 13);
        }
    }

    /// A JSON line keeps its shape whatever the patterns match: they apply
    /// to string values (decoded), not to keys, numbers or the timestamp.
    #[test]
    fn patterns_apply_to_json_string_values_only() {
        let s = Scrubber::of(&[r"\b\d{4}\b", "status"], true, true);
        let line = concat!(
            r#"{"timestamp":"2026-11-25T09:30:00.123456Z","level":"INFO","#,
            r#""message":"pin 1234 said","status":200,"latency_ms":1234.5,"#,
            r#""path":"/a\"4321\"b\\","target":"ivrguard::access"}"#,
            "\n"
        );
        let out = s.scrub(line.as_bytes());
        let value: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
        assert_eq!(value["timestamp"], "2026-11-25T09:30:00.123456Z");
        assert_eq!(value["message"], "pin *REDACTED* said");
        assert_eq!(value["status"], 200, "a key is not scrubbed");
        assert_eq!(value["latency_ms"].to_string(), "1234.5");
        assert_eq!(value["path"], "/a\"*REDACTED*\"b\\");
        assert_eq!(value["target"], "ivrguard::access");
        assert!(out.ends_with(b"}\n"));
        // Nothing matched: the line itself.
        let quiet = br#"{"timestamp":"2026-11-25T09:30:00Z","message":"ok"}"#;
        assert!(matches!(s.scrub(quiet), Cow::Borrowed(_)));
        // Not the JSON expected (an unclosed string): scrubbed whole.
        assert_eq!(
            &*s.scrub(br#"{"message":"pin 1234"#),
            br#"{"message":"pin *REDACTED*"#
        );
    }

    #[test]
    fn patterns_skip_a_text_lines_timestamp() {
        let s = scrubber(&[r"\b\d{4}\b"]);
        let line = b"2026-11-25T09:30:00.123456Z  INFO ivrguard: pin 1234 latency_ms=2026";
        assert_eq!(
            &*s.scrub(line),
            b"2026-11-25T09:30:00.123456Z  INFO ivrguard: pin *REDACTED* latency_ms=*REDACTED*"
        );
    }

    proptest::proptest! {
        /// Whatever a logged value holds, the scrubbed JSON line is JSON
        /// with the same keys, and the value no longer matches.
        #[test]
        fn scrubbed_json_lines_stay_json(value in "[ -~\\n\\t\u{e9}\u{2028}]{0,40}") {
            let s = Scrubber::of(&[r"[0-9]+", r#"""#, r"\\"], true, true);
            let mut line = String::from(r#"{"timestamp":"2026-11-25T09:30:00Z","v":"#);
            write_json_str(&mut line, &value).unwrap();
            line.push_str(",\"n\":12}\n");
            let out = s.scrub(line.as_bytes());
            let parsed: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
            let v = parsed["v"].as_str().unwrap();
            proptest::prop_assert!(!v.contains(|c: char| c.is_ascii_digit() || c == '"' || c == '\\'));
            proptest::prop_assert_eq!(parsed["n"].as_u64(), Some(12));
            proptest::prop_assert_eq!(parsed["timestamp"].as_str(), Some("2026-11-25T09:30:00Z"));
        }
    }

    #[test]
    fn applies_configured_patterns() {
        let s = scrubber(&["secret-[a-z]+"]);
        assert_eq!(&*s.scrub(b"a secret-canary b"), b"a *REDACTED* b");
    }
}
