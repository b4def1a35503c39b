//! Scanning and rewriting `application/x-www-form-urlencoded` bytes.
//!
//! A Twilio webhook carries its parameters either in a form body or in the
//! raw query string (GET). This module owns three jobs on those bytes, all
//! pure and without I/O:
//!
//! - [`parse`] splits and strictly decodes the pairs, in order, repeats kept,
//!   so the signature can be checked over the decoded values.
//! - [`rewrite`] replaces the value of every sensitive pair with ciphertext
//!   and copies **every other byte unchanged** — order, `+` versus `%20`,
//!   upper- or lower-case escapes, empty segments. Re-encoding the whole form
//!   through a library would normalise those bytes, and the application's own
//!   signature check (re-signed by us) and its logs would then see a request
//!   Twilio never sent (STYLE habit 5, "bytes in, bytes out").
//! - [`redacted`] renders the string for a log line with sensitive values
//!   replaced by [`REDACTED`].
//!
//! Decoding is strict: a `%` without two hex digits, or decoded bytes that
//! are not UTF-8, is an error, and the pipeline answers 400 without
//! forwarding anything (SPEC §5). Twilio only ever sends well-formed,
//! percent-encoded UTF-8, so strictness costs genuine requests nothing; it
//! spares us guessing what a lenient decoder (Python's `parse_qsl` keeps a
//! stray `%`, replaces bad UTF-8 with U+FFFD) would have signed.
//!
//! Field names match exactly and case-sensitively on the *decoded* name:
//! `Dig%69ts` is `Digits`, but `digits` and `DIGITS` are not. Twilio sends
//! its parameter names in one fixed case, and the signature covers them, so
//! a case variant can only come from someone other than Twilio, whose request
//! fails verification anyway.
//!
//! Speed (perf notes §A3: `form_urlencoded::parse` alone took 4.2–4.7 µs of
//! a 3 µs budget): the input is validated as UTF-8 once and scanned once,
//! eight bytes per step; a name or value is decoded only when it contains
//! `%` or `+`, everything else is borrowed from the input. The pipeline
//! decodes into one caller-owned [`Arena`] per form ([`parse_in`]): one
//! allocation for all escaped parts instead of one each. Sensitive values
//! are the exception: each is decoded into a string of its own, which
//! [`rewrite`] wipes once it is encrypted.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use wide::u8x16;
use zeroize::Zeroize;

use crate::cipher::{NONCE_LEN, TAG_LEN};
use crate::secret::REDACTED;

/// The most pairs [`parse`] accepts in one form.
///
/// Bounds the CPU and memory a hostile body can cost us (perf notes §B5.1
/// I13): a real Twilio webhook has 20–40 parameters, and a form at the limit
/// of 1,000 `Digits=…` pairs is still processed in linear time. A body with
/// more pairs (e.g. 10,000 × `a=1`) is refused with
/// [`FormError::TooManyParams`] as soon as pair 1,001 is seen. Empty
/// segments (`&&`) are not pairs and do not count.
pub const MAX_PARAMS: usize = 1000;

/// The sensitive fields shipped in the default configuration: every Voice
/// webhook parameter that carries what the caller typed or said, or payment
/// data (Twilio notes §8). Each may arrive in a form body or, for
/// `method="GET"` and `<Redirect>` URLs, in the query string.
///
/// - `Digits` — the keys the caller pressed at a `<Gather>` (PINs, card and
///   account numbers, dates of birth). Also sent by `<Record>` (the key that
///   ended the recording), where encrypting it costs nothing.
/// - `SpeechResult` — the transcription of what the caller said at a
///   `<Gather input="speech">`; callers speak numbers too.
/// - `UnstableSpeechResult`, `StableSpeechResult` — partial transcriptions
///   sent to `partialResultCallback` while the caller is still speaking.
/// - `TranscriptionText` — `<Record transcribe>`'s transcription callback.
/// - `TranscriptionData` — real-time `<Start><Transcription>` content (a JSON
///   string with the transcript); Twilio states that feature is not PCI
///   compliant, so anything said is in it.
/// - `PaymentCardNumber` — `<Pay>`/Payments API; Twilio masks it to the last
///   four digits, but a masked PAN is still cardholder data.
/// - `SecurityCode` — `<Pay>`; Twilio redacts it, kept in case a connector
///   or a future change does not.
/// - `ExpirationDate` — `<Pay>`; sent in **plaintext** (MMYY).
/// - `PaymentCardPostalCode` — `<Pay>`; sent in **plaintext**.
/// - `BankAccountNumber` — `<Pay>` ACH; the last two digits are visible.
/// - `BankRoutingNumber` — `<Pay>` ACH; sent **in full**.
/// - `PaymentToken` — `<Pay>` tokenisation: the token can be charged, so it
///   is as valuable as the card it stands for.
///
/// Deliberately not listed (operators may add them): `Confidence`,
/// `PaymentCardType`, `BankAccountType`, `PaymentConfirmationCode`,
/// `ProfileId`, `Result` and the error fields, which describe rather than
/// carry caller data; `From`/`Caller` and their geo fields, which are
/// personal data the application normally needs to route the call; and
/// `RecordingUrl`, which the application must fetch to use.
pub const DEFAULT_FIELDS: &[&str] = &[
    "Digits",
    "SpeechResult",
    "UnstableSpeechResult",
    "StableSpeechResult",
    "TranscriptionText",
    "TranscriptionData",
    "PaymentCardNumber",
    "SecurityCode",
    "ExpirationDate",
    "PaymentCardPostalCode",
    "BankAccountNumber",
    "BankRoutingNumber",
    "PaymentToken",
];

/// The configured sensitive parameter names: exact, case-sensitive match on
/// the **decoded** name (so `Dig%69ts` counts as `Digits`; `digits` does not).
#[derive(Clone, Debug)]
pub struct FieldSet {
    /// Distinct names in configuration order.
    names: Vec<Box<str>>,
    /// Bit `min(len, 63)` is set when some name has that byte length: most
    /// webhook parameter names are rejected by one AND, without comparing
    /// strings (`contains` runs for every pair of every request).
    lengths: u64,
}

impl FieldSet {
    /// The set of `names`; duplicates are kept once.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        let mut set = FieldSet {
            names: Vec::new(),
            lengths: 0,
        };
        for name in names {
            let name: String = name.into();
            if !set.names.iter().any(|n| **n == *name) {
                set.lengths |= length_bit(name.len());
                set.names.push(name.into_boxed_str());
            }
        }
        set
    }

    /// Whether `name` (already decoded) is one of the sensitive names.
    pub fn contains(&self, name: &str) -> bool {
        self.lengths & length_bit(name.len()) != 0 && self.names.iter().any(|n| **n == *name)
    }

    /// The names, in configuration order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|n| &**n)
    }
}

fn length_bit(len: usize) -> u64 {
    1u64 << len.min(63)
}

/// Why a form could not be decoded. Never carries any of the input's bytes,
/// so it can be logged as is.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum FormError {
    /// A `%` not followed by two hex digits.
    #[error("malformed form encoding: '%' must be followed by two hex digits")]
    BadPercentEncoding,
    /// Decoded bytes that are not UTF-8 (e.g. `%FF`, truncated `%E2%82`,
    /// overlong `%C0%AF`), or raw bytes that are not.
    #[error("malformed form encoding: a decoded name or value is not valid UTF-8")]
    InvalidUtf8,
    /// More than [`MAX_PARAMS`] pairs.
    #[error("form has more than {MAX_PARAMS} parameters")]
    TooManyParams,
}

/// One `name=value` pair of an `application/x-www-form-urlencoded` string
/// (a body, or a raw query string without its `?`).
///
/// `Debug` prints the name and [`REDACTED`] in place of the value, so a pair
/// can never leak through `{:?}`.
pub struct FormPair<'a> {
    /// Decoded (`+` → space, `%XX`); borrowed from the input when it needed
    /// no decoding.
    pub name: Cow<'a, str>,
    /// Decoded; `""` for a pair without `=`. After [`rewrite`], the
    /// ciphertext hex for a sensitive pair.
    pub value: Cow<'a, str>,
    /// Byte span of the raw value in the input: what [`rewrite`] replaces.
    /// Empty, right after the name, for a pair without `=`.
    value_span: Range<usize>,
    /// Whether the pair had an `=` (a sensitive pair without one gains it).
    has_eq: bool,
    /// Whether `name` / `value` were decoded (they then borrow the arena).
    name_decoded: bool,
    value_decoded: bool,
    /// Whether `value` is the ciphertext [`rewrite`] put there (its
    /// plaintext already wiped).
    encrypted: bool,
}

/// A value of its own is a sensitive one Twilio escaped, decoded (or any
/// escaped value from [`parse`]): wiped here, so a request refused after
/// parsing (a wrong signature) does not leave the caller's digits in freed
/// memory (found in review; only [`rewrite`] wiped them). The ciphertext
/// [`rewrite`] leaves is not: it is what the app receives, and wiping is
/// byte by byte (a 900-character `SpeechResult` is 1.8 KB of hex).
impl Drop for FormPair<'_> {
    fn drop(&mut self) {
        if let (Cow::Owned(value), false) = (&mut self.value, self.encrypted) {
            value.zeroize();
        }
    }
}

/// Room for the decoded copies of one form's escaped names and values
/// ([`parse_in`]). Sensitive values are never put here (see [`parse_in`]),
/// so it holds nothing that needs wiping.
#[derive(Default)]
pub struct Arena(Vec<u8>);

impl fmt::Debug for Arena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Debug for FormPair<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FormPair")
            .field("name", &self.name)
            .field("value", &REDACTED)
            .finish()
    }
}

/// Splits `input` into decoded pairs, in order, repeats kept; decoded names
/// and values are owned by their pair. [`parse_in`] is the same parse with
/// them in one shared buffer (what the pipeline uses).
///
/// - `&` separates pairs; empty segments (`&&`, a leading or trailing `&`)
///   are skipped, as Python's `parse_qsl` and Node's `querystring` do.
/// - The first `=` separates name and value: `a=b=c` is `a` = `b=c`, `=x` is
///   `""` = `x`, and `Digits` alone is `Digits` = `""`.
/// - `+` decodes to a space, `%XX` (either case) to its byte; the result must
///   be UTF-8. See [`FormError`] for what is refused. When an input has
///   several faults, which one is reported is unspecified.
///
/// For tests, fuzzing and benchmarks: no value is treated as sensitive.
pub fn parse(input: &[u8]) -> Result<Vec<FormPair<'_>>, FormError> {
    let mut arena = Arena::default();
    let pairs = parse_in(input, &mut arena, &FieldSet::new::<_, &str>([]))?;
    let own = |text: Cow<'_, str>, decoded: bool| match (text, decoded) {
        (Cow::Borrowed(text), true) => Cow::Owned(text.to_owned()),
        (Cow::Borrowed(text), false) => Cow::Borrowed(str_in(input, text)),
        (Cow::Owned(text), _) => Cow::Owned(text),
    };
    Ok(pairs
        .into_iter()
        .map(|mut pair| FormPair {
            name: own(std::mem::take(&mut pair.name), pair.name_decoded),
            value: own(std::mem::take(&mut pair.value), pair.value_decoded),
            value_span: pair.value_span.clone(),
            has_eq: pair.has_eq,
            name_decoded: pair.name_decoded,
            value_decoded: pair.value_decoded,
            encrypted: false,
        })
        .collect())
}

/// `text`, a slice of `input`, with the lifetime of `input`.
fn str_in<'i>(input: &'i [u8], text: &str) -> &'i str {
    let start = (text.as_ptr() as usize).wrapping_sub(input.as_ptr() as usize);
    input
        .get(start..start + text.len())
        .and_then(|bytes| std::str::from_utf8(bytes).ok())
        .expect("undecoded parts are slices of the input")
}

/// [`parse`], decoding escaped names and values into `arena`: one
/// allocation (the input's length, an upper bound of everything decoded)
/// for a form with any escape, none for a form without.
///
/// The decoded value of a pair named in `sensitive` is not put in the
/// arena but owned by its pair, so that [`rewrite`] can wipe it once it is
/// encrypted; one that fails to decode is wiped before the error returns.
pub fn parse_in<'a>(
    input: &'a [u8],
    arena: &'a mut Arena,
    sensitive: &FieldSet,
) -> Result<Vec<FormPair<'a>>, FormError> {
    // One validation of the whole input: '&' and '=' are ASCII, so every
    // name and value cut at them is valid UTF-8 too, and is borrowed without
    // a second check.
    let text = std::str::from_utf8(input).map_err(|_| FormError::InvalidUtf8)?;
    // A guess (Twilio's pairs average 40 bytes) that saves most regrowth.
    let mut pairs = Vec::with_capacity((input.len() / 32 + 1).min(MAX_PARAMS));
    let mut room = Room::Unclaimed(arena, input.len());
    for segment in Segments::new(input) {
        if segment.is_empty() {
            continue;
        }
        if pairs.len() == MAX_PARAMS {
            return Err(FormError::TooManyParams);
        }
        let name = str_part(text, segment.name());
        let name = match segment.name_escaped {
            true => room.decode(name)?,
            false => name,
        };
        let value = str_part(text, segment.value());
        let value = match segment.value_escaped {
            false => Cow::Borrowed(value),
            true if sensitive.contains(name) => Cow::Owned(decode_owned(value)?),
            true => Cow::Borrowed(room.decode(value)?),
        };
        pairs.push(FormPair {
            name: Cow::Borrowed(name),
            value,
            value_span: segment.value(),
            has_eq: segment.eq.is_some(),
            name_decoded: segment.name_escaped,
            value_decoded: segment.value_escaped,
            encrypted: false,
        });
    }
    Ok(pairs)
}

/// What is left of the arena for decoded parts. Each decoded part takes
/// the front of it, so earlier parts stay borrowed while later ones are
/// written.
enum Room<'a> {
    /// Not sized yet: most query strings have nothing to decode.
    Unclaimed(&'a mut Arena, usize),
    Free(&'a mut [u8]),
}

impl<'a> Room<'a> {
    /// Decodes `raw` (`+`, `%XX`) into the front of the room.
    fn decode(&mut self, raw: &str) -> Result<&'a str, FormError> {
        let free = match std::mem::replace(self, Room::Free(&mut [])) {
            Room::Unclaimed(arena, len) => {
                arena.0.clear();
                arena.0.resize(len, 0);
                arena.0.as_mut_slice()
            }
            Room::Free(free) => free,
        };
        // Decoding never lengthens: each part fits in what its raw bytes
        // left free.
        let written = decode_into(raw.as_bytes(), free)?;
        let (part, rest) = free.split_at_mut(written);
        *self = Room::Free(rest);
        std::str::from_utf8(part).map_err(|_| FormError::InvalidUtf8)
    }
}

/// A span that [`Segments`] cut out of `text`.
fn str_part(text: &str, span: Range<usize>) -> &str {
    text.get(span)
        .expect("segments are cut at ASCII bytes inside the input: char boundaries")
}

/// One `&`-separated segment of the input, as byte offsets, and what the
/// scan learnt about it on the way.
struct Segment {
    start: usize,
    /// The first `=`, if any.
    eq: Option<usize>,
    end: usize,
    /// Whether the name / the value contains `%` or `+` (needs decoding).
    name_escaped: bool,
    value_escaped: bool,
}

impl Segment {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn name(&self) -> Range<usize> {
        self.start..self.eq.unwrap_or(self.end)
    }

    /// The raw value; for a segment without `=`, empty, right after the name.
    fn value(&self) -> Range<usize> {
        self.eq.map_or(self.end, |eq| eq + 1)..self.end
    }
}

/// Every `&`-separated segment of the input, empty ones included (`""` is
/// one empty segment, as with `split`).
///
/// This scan is the whole per-byte cost of a parse. It looks at 64 bytes
/// per step: [`Marks`] are bit masks of the block's `&`, `=`, `%` and `+`
/// bytes, made with 16-byte SIMD compares (the `wide` crate: SSE2 on
/// x86-64, NEON on aarch64, portable code elsewhere; no `unsafe` here), and
/// only the `&` and first `=` of a segment are visited one by one.
struct Segments<'a> {
    input: &'a [u8],
    /// Where the next segment starts; `None` once the last one was returned.
    next: Option<usize>,
    /// Offset of the block `marks` describes.
    base: usize,
    /// The block's marks, with those before `next` cleared.
    marks: Marks,
}

impl<'a> Segments<'a> {
    fn new(input: &'a [u8]) -> Self {
        Segments {
            input,
            next: Some(0),
            base: 0,
            marks: Marks::of_block(input, 0),
        }
    }
}

impl Iterator for Segments<'_> {
    type Item = Segment;

    // Inlined into its two callers: out of line, the 48-byte segment came
    // back through memory and the caller's loads of it stalled on the
    // stores (perf: half of `parse_in`'s samples on one instruction);
    // `stage/form_parse` 0.96–1.00 → 0.73–0.82 µs.
    #[inline(always)]
    fn next(&mut self) -> Option<Segment> {
        let start = self.next?;
        let mut segment = Segment {
            start,
            eq: None,
            end: self.input.len(),
            name_escaped: false,
            value_escaped: false,
        };
        let mut escaped = false; // whether the part being scanned has '%'/'+'
        loop {
            let marks = &mut self.marks;
            // After the segment's first '=', later ones are plain value bytes.
            let mut stops = match segment.eq {
                None => marks.amps | marks.eqs,
                Some(_) => marks.amps,
            };
            while stops != 0 {
                let bit = stops.trailing_zeros();
                let below = (1u64 << bit) - 1;
                let through = below | (1u64 << bit);
                // Escapes are not visited one by one: only whether a part
                // has any matters.
                escaped |= marks.escapes & below != 0;
                marks.escapes &= !below;
                let offset = self.base + bit as usize;
                if marks.amps & (1u64 << bit) != 0 {
                    marks.amps &= !through;
                    marks.eqs &= !through;
                    segment.end = offset;
                    self.next = Some(offset + 1);
                    finish(&mut segment, escaped);
                    return Some(segment);
                }
                marks.eqs &= !through;
                segment.eq = Some(offset);
                segment.name_escaped = escaped;
                escaped = false;
                stops = marks.amps;
            }
            escaped |= marks.escapes != 0;
            self.base += BLOCK;
            if self.base >= self.input.len() {
                break;
            }
            self.marks = Marks::of_block(self.input, self.base);
        }
        self.next = None;
        finish(&mut segment, escaped);
        Some(segment)
    }
}

/// Records the flag of the part that ended with the segment.
fn finish(segment: &mut Segment, escaped: bool) {
    if segment.eq.is_some() {
        segment.value_escaped = escaped;
    } else {
        segment.name_escaped = escaped;
    }
}

/// Bytes per [`Marks`] block.
const BLOCK: usize = 64;

/// Where one 64-byte block's `&`, `=` and escapes (`%`, `+`) are: bit `k`
/// of each mask is byte `k` of the block.
#[derive(Clone, Copy, Default)]
struct Marks {
    amps: u64,
    eqs: u64,
    escapes: u64,
}

impl Marks {
    /// The marks of the block of `input` at `base`, zero-padded past the
    /// end (zero is none of the special bytes).
    fn of_block(input: &[u8], base: usize) -> Marks {
        let rest = input.get(base..).unwrap_or_default();
        match rest.first_chunk::<BLOCK>() {
            Some(block) => Marks::of(block),
            None => {
                let mut padded = [0u8; BLOCK];
                padded.iter_mut().zip(rest).for_each(|(d, s)| *d = *s);
                Marks::of(&padded)
            }
        }
    }

    fn of(block: &[u8; BLOCK]) -> Marks {
        let (amp, eq) = (u8x16::splat(b'&'), u8x16::splat(b'='));
        let (percent, plus) = (u8x16::splat(b'%'), u8x16::splat(b'+'));
        let mut marks = Marks::default();
        for (k, lane) in block.as_chunks::<16>().0.iter().enumerate() {
            let bytes = u8x16::new(*lane);
            let shift = 16 * k;
            marks.amps |= u64::from(bytes.simd_eq(amp).to_bitmask()) << shift;
            marks.eqs |= u64::from(bytes.simd_eq(eq).to_bitmask()) << shift;
            let escapes = bytes.simd_eq(percent) | bytes.simd_eq(plus);
            marks.escapes |= u64::from(escapes.to_bitmask()) << shift;
        }
        marks
    }
}

/// Decodes `+` and `%XX` of `raw` into the front of `out`, returning how
/// many bytes were written. `out` must be at least as long as `raw`.
///
/// 16 bytes per step, with 16-byte SIMD compares (`wide`, as the scan in
/// [`Segments`]). Plain steps are passed over and copied later with the
/// run they belong to, in one copy (a `CallToken` is 600 bytes of mostly
/// plain text). A step with an escape is stored whole, its `+`s turned
/// into spaces on the way (a spoken `SpeechResult` has one every few
/// bytes), and counts up to its first `%`, whose `XX` is decoded next;
/// what it stored past that is overwritten by the next steps, or lies
/// past the length returned.
fn decode_into(raw: &[u8], out: &mut [u8]) -> Result<usize, FormError> {
    let (percent, plus, space) = (u8x16::splat(b'%'), u8x16::splat(b'+'), u8x16::splat(b' '));
    // Decoded up to `read`; `read..scan` is plain, still to be copied.
    let (mut read, mut written, mut scan) = (0, 0, 0);
    while let Some(&lane) = raw.get(scan..).and_then(<[u8]>::first_chunk::<16>) {
        let bytes = u8x16::new(lane);
        let (percents, pluses) = (bytes.simd_eq(percent), bytes.simd_eq(plus));
        if (percents | pluses).to_bitmask() == 0 {
            scan += 16;
            continue;
        }
        if scan > read {
            out.get_mut(written..written + scan - read)
                .expect(DECODED_FITS)
                .copy_from_slice(&raw[read..scan]);
            (written, read) = (written + scan - read, scan);
        }
        // `written <= read`: the 16 bytes fit, as `out` is as long as `raw`.
        out.get_mut(written..written + 16)
            .expect(DECODED_FITS)
            .copy_from_slice(pluses.bitselect(space, bytes).as_array());
        let plain = match percents.to_bitmask() {
            0 => 16,
            first => first.trailing_zeros() as usize,
        };
        (read, written) = (read + plain, written + plain);
        if plain < 16 {
            let &[b'%', hi, lo] = raw.get(read..read + 3).unwrap_or_default() else {
                return Err(FormError::BadPercentEncoding);
            };
            *out.get_mut(written).expect(DECODED_FITS) = hex_pair(hi, lo)?;
            (read, written) = (read + 3, written + 1);
        }
        scan = read;
    }
    // The last plain run and the last 15 bytes or fewer.
    let mut rest = raw.get(read..).unwrap_or_default();
    loop {
        let at = rest.iter().position(|&b| b == b'%' || b == b'+');
        let (plain, tail) = rest.split_at(at.unwrap_or(rest.len()));
        out.get_mut(written..written + plain.len())
            .expect(DECODED_FITS)
            .copy_from_slice(plain);
        written += plain.len();
        let (byte, tail) = match *tail {
            [] => return Ok(written),
            [b'+', ref tail @ ..] => (b' ', tail),
            [b'%', hi, lo, ref tail @ ..] => (hex_pair(hi, lo)?, tail),
            _ => return Err(FormError::BadPercentEncoding),
        };
        *out.get_mut(written).expect(DECODED_FITS) = byte;
        written += 1;
        rest = tail;
    }
}

/// `raw` decoded into a string of its own; on an error, what was decoded
/// is wiped first (it may be a caller's input).
fn decode_owned(raw: &str) -> Result<String, FormError> {
    let mut out = vec![0; raw.len()];
    match decode_into(raw.as_bytes(), &mut out) {
        Ok(len) => {
            out.truncate(len);
            String::from_utf8(out).map_err(|err| {
                err.into_bytes().zeroize();
                FormError::InvalidUtf8
            })
        }
        Err(err) => {
            out.zeroize();
            Err(err)
        }
    }
}

const DECODED_FITS: &str = "a decoded part is never longer than its raw bytes";

fn hex_pair(hi: u8, lo: u8) -> Result<u8, FormError> {
    match (hex_value(hi), hex_value(lo)) {
        (Some(hi), Some(lo)) => Ok((hi << 4) | lo),
        _ => Err(FormError::BadPercentEncoding),
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The result of [`rewrite`].
pub struct Rewritten {
    /// The input with every sensitive value replaced by ciphertext.
    pub bytes: Vec<u8>,
    /// Where in `pairs` the encrypted pairs are, in input order.
    encrypted: Vec<usize>,
}

impl Rewritten {
    /// Number of values encrypted, repeats counted (for the metric).
    pub fn count(&self) -> usize {
        self.encrypted.len()
    }

    /// Where in `pairs` (the slice [`rewrite`] was given) the encrypted
    /// pairs are, in input order.
    pub fn encrypted(&self) -> &[usize] {
        &self.encrypted
    }

    /// The names of the encrypted pairs, in input order, repeats included
    /// (for the access log). `pairs` is the slice [`rewrite`] was given.
    pub fn names<'s, 'p: 's>(
        &'s self,
        pairs: &'p [FormPair<'_>],
    ) -> impl Iterator<Item = &'p str> + 's {
        self.encrypted
            .iter()
            .filter_map(|&i| pairs.get(i))
            .map(|p| p.name.as_ref())
    }
}

impl fmt::Debug for Rewritten {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `bytes` holds the non-sensitive values in plaintext (caller data
        // such as `From`); keep them out of `{:?}` as well.
        f.debug_struct("Rewritten")
            .field("bytes", &format_args!("<{} bytes>", self.bytes.len()))
            .field("count", &self.count())
            .finish()
    }
}

/// Encrypts every pair of `input` whose decoded name is in `fields`.
///
/// `pairs` must be what [`parse`] returned for this same `input` (in any
/// order). In the output, each sensitive pair's raw value becomes
/// `encrypt(decoded value)`: the callback appends lowercase hex, which needs
/// no percent-encoding. A sensitive pair without `=` gains `=` + ciphertext.
/// Every other byte of `input` is copied unchanged. The pair's `value` in
/// `pairs` is replaced by the same hex (the plaintext it held is zeroized if
/// it was a decoded copy), so the caller can re-sign from `pairs` without
/// parsing again.
///
/// Returns `None`, touching nothing, when no pair is sensitive: the caller
/// forwards the original bytes.
pub fn rewrite<'a>(
    input: &'a [u8],
    pairs: &mut [FormPair<'a>],
    fields: &FieldSet,
    mut encrypt: impl FnMut(&[u8], &mut Vec<u8>),
) -> Option<Rewritten> {
    let first = pairs.iter().position(|p| fields.contains(&p.name))?;
    let mut sensitive: Vec<usize> = pairs
        .iter()
        .enumerate()
        .skip(first)
        .filter(|(_, p)| fields.contains(&p.name))
        .map(|(i, _)| i)
        .collect();
    // In input order, whatever order the caller left `pairs` in.
    sensitive.sort_unstable_by_key(|&i| pairs.get(i).map_or(0, |p| p.value_span.start));

    // Exact for the cipher's wire format (each raw value replaced by the hex
    // of nonce || ciphertext || tag, plus '=' where there was none): a
    // vector filled to its capacity becomes `Bytes` without another
    // allocation. A different callback only costs a reallocation.
    let replaced: usize = sensitive
        .iter()
        .filter_map(|&i| pairs.get(i))
        .map(|p| p.value_span.len())
        .sum();
    let added: usize = sensitive
        .iter()
        .filter_map(|&i| pairs.get(i))
        .map(|p| usize::from(!p.has_eq) + 2 * (NONCE_LEN + p.value.len() + TAG_LEN))
        .sum();
    let mut out = Vec::with_capacity(input.len().saturating_sub(replaced) + added);
    let mut copied = 0;
    for &i in &sensitive {
        let pair = pairs
            .get_mut(i)
            .expect("indices were taken from this slice");
        let before = input
            .get(copied..pair.value_span.start)
            .expect("pairs must come from parse() of this same input");
        out.extend_from_slice(before);
        if !pair.has_eq {
            out.push(b'=');
        }
        let hex_start = out.len();
        encrypt(pair.value.as_bytes(), &mut out);
        let hex = out.get(hex_start..).unwrap_or_default();
        debug_assert!(
            hex.iter().all(u8::is_ascii_hexdigit),
            "encrypt must append hex only"
        );
        // ASCII: one check, not the lossy decoder's scan for bad sequences.
        let hex = std::str::from_utf8(hex).unwrap_or_default().to_owned();
        if let Cow::Owned(plain) = &mut pair.value {
            plain.zeroize();
        }
        pair.value = Cow::Owned(hex);
        pair.encrypted = true;
        copied = pair.value_span.end;
    }
    out.extend_from_slice(
        input
            .get(copied..)
            .expect("pairs must come from parse() of this same input"),
    );
    Some(Rewritten {
        bytes: out,
        encrypted: sensitive,
    })
}

/// The form for a log line: each sensitive pair's value replaced by
/// [`REDACTED`], its name kept as received; every other byte as received.
///
/// Never fails, on any input. A pair whose name cannot be decoded (bad `%`,
/// not UTF-8) has its value redacted too: we cannot tell it is harmless.
/// Bytes that are not UTF-8 become U+FFFD.
pub fn redacted(input: &[u8], fields: &FieldSet) -> String {
    let mut out = String::with_capacity(input.len());
    for (k, segment) in Segments::new(input).enumerate() {
        if k > 0 {
            out.push('&');
        }
        let name = input.get(segment.name()).unwrap_or_default();
        let name_text = std::str::from_utf8(name);
        push_lossy(&mut out, name_text, name);
        if segment.eq.is_some() {
            out.push('=');
            let sensitive = match (name_text, segment.name_escaped) {
                (Ok(name), false) => fields.contains(name),
                (Ok(name), true) => decode_owned(name).map_or(true, |name| fields.contains(&name)),
                (Err(_), _) => true,
            };
            if sensitive {
                out.push_str(REDACTED);
            } else {
                let value = input.get(segment.value()).unwrap_or_default();
                push_lossy(&mut out, std::str::from_utf8(value), value);
            }
        }
    }
    out
}

/// Appends `bytes`, already checked as `text`, with U+FFFD for bad bytes.
fn push_lossy(out: &mut String, text: Result<&str, std::str::Utf8Error>, bytes: &[u8]) {
    match text {
        Ok(text) => out.push_str(text),
        Err(_) => out.push_str(&String::from_utf8_lossy(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cipher::{FieldCipher, FieldKey};

    fn digits() -> FieldSet {
        FieldSet::new(DEFAULT_FIELDS.iter().copied())
    }

    /// A deterministic stand-in for the cipher: "e0" + hex of the plaintext,
    /// so expected outputs can be written out byte for byte.
    fn fake_encrypt(plain: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(b"e0");
        out.extend_from_slice(hex::encode(plain).as_bytes());
    }

    fn fake(plain: &str) -> String {
        format!("e0{}", hex::encode(plain))
    }

    /// Decoded (name, value) pairs, or why not.
    type Decoded = Result<Vec<(String, String)>, FormError>;

    /// What [`parse_in`] decodes, `Digits` sensitive (decoded apart).
    fn decoded_in(input: &[u8]) -> Decoded {
        let mut arena = Arena::default();
        parse_in(input, &mut arena, &digits()).map(|pairs| {
            pairs
                .iter()
                .map(|p| (p.name.to_string(), p.value.to_string()))
                .collect()
        })
    }

    fn decoded(input: &[u8]) -> Decoded {
        parse(input).map(|pairs| {
            pairs
                .into_iter()
                .map(|p| (p.name.to_string(), p.value.to_string()))
                .collect()
        })
    }

    /// The rewritten input, and the names of the encrypted pairs in input
    /// order.
    fn rewrite_fake(input: &[u8], fields: &FieldSet) -> Option<(String, Vec<String>)> {
        let mut pairs = parse(input).unwrap();
        let out = rewrite(input, &mut pairs, fields, fake_encrypt)?;
        let names = out.names(&pairs).map(str::to_owned).collect();
        Some((String::from_utf8(out.bytes).unwrap(), names))
    }

    #[test]
    fn decodes_the_table_of_edge_cases() {
        use FormError::*;
        let ok = |pairs: &[(&str, &str)]| -> Decoded {
            Ok(pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect())
        };
        let cases: &[(&[u8], Decoded)] = &[
            // '+' is a space, %2B a plus, %20 a space.
            (b"a+b=c+d", ok(&[("a b", "c d")])),
            (b"a=%2B", ok(&[("a", "+")])),
            (b"a=%20", ok(&[("a", " ")])),
            (b"a=1+%2B+%20", ok(&[("a", "1 +  ")])),
            (b"%2B=+", ok(&[("+", " ")])),
            // Bad escapes, in names and values, at the end and mid-string.
            (b"a=%", Err(BadPercentEncoding)),
            (b"a=%G1", Err(BadPercentEncoding)),
            (b"a=%1G", Err(BadPercentEncoding)),
            (b"a=%1", Err(BadPercentEncoding)),
            (b"a=%%41", Err(BadPercentEncoding)),
            (b"a=x%2&b=1", Err(BadPercentEncoding)),
            (b"%=a", Err(BadPercentEncoding)),
            (b"ok=1&Dig%6=1", Err(BadPercentEncoding)),
            (b"Digits%", Err(BadPercentEncoding)),
            // Decoded bytes that are not UTF-8.
            (b"a=%E2%82", Err(InvalidUtf8)),
            (b"a=%E2%82&b=1", Err(InvalidUtf8)),
            (b"a=%FF", Err(InvalidUtf8)),
            (b"a=%C0%AF", Err(InvalidUtf8)),
            (b"a=%ED%A0%80", Err(InvalidUtf8)), // a UTF-16 surrogate
            (b"%FF=a", Err(InvalidUtf8)),
            (b"a=\xff", Err(InvalidUtf8)), // raw, not escaped
            (b"\xc3=1", Err(InvalidUtf8)),
            // NUL is valid UTF-8.
            (b"a=%00", ok(&[("a", "\0")])),
            // Splitting.
            (b"a=b=c", ok(&[("a", "b=c")])),
            (b"a=%3D=c", ok(&[("a", "==c")])),
            (b"a%3Db=c", ok(&[("a=b", "c")])),
            (b"a=b%26c", ok(&[("a", "b&c")])),
            (b"&&&", ok(&[])),
            (b"", ok(&[])),
            (b"=x", ok(&[("", "x")])),
            (b"=", ok(&[("", "")])),
            (b"Digits", ok(&[("Digits", "")])),
            (b"Digits=", ok(&[("Digits", "")])),
            (b"&a=1&&b&c=&", ok(&[("a", "1"), ("b", ""), ("c", "")])),
            (b"a=1&a=2&a=1", ok(&[("a", "1"), ("a", "2"), ("a", "1")])),
            // Unicode, %-encoded and raw; escapes in either case.
            (b"s=%F0%9F%98%80", ok(&[("s", "\u{1F600}")])),
            (b"s=e%CC%81", ok(&[("s", "e\u{301}")])),
            (
                b"s=%D7%A9%D7%9C%D7%95%D7%9D+%E2%80%8F1",
                ok(&[("s", "\u{5E9}\u{5DC}\u{5D5}\u{5DD} \u{200F}1")]),
            ),
            (b"s=%c3%a9", ok(&[("s", "\u{E9}")])),
            (b"s=%C3%A9", ok(&[("s", "\u{E9}")])),
            (b"s=%c3%A9", ok(&[("s", "\u{E9}")])),
            (
                "s=\u{E9}+\u{1F600}".as_bytes(),
                ok(&[("s", "\u{E9} \u{1F600}")]),
            ),
            (b"Dig%69ts=1%32", ok(&[("Digits", "12")])),
        ];
        for (input, expected) in cases {
            let input_text = String::from_utf8_lossy(input);
            assert_eq!(&decoded(input), expected, "input {input_text:?}");
        }
    }

    #[test]
    fn borrows_what_needs_no_decoding_and_owns_what_does() {
        let pairs = parse(b"CallSid=CA12&From=%2B1415&a+b=\xc3\xa9").unwrap();
        assert!(matches!(pairs[0].name, Cow::Borrowed("CallSid")));
        assert!(matches!(pairs[0].value, Cow::Borrowed("CA12")));
        assert!(matches!(pairs[1].name, Cow::Borrowed("From")));
        assert!(matches!(&pairs[1].value, Cow::Owned(v) if v == "+1415"));
        assert!(matches!(&pairs[2].name, Cow::Owned(n) if n == "a b"));
        assert!(matches!(pairs[2].value, Cow::Borrowed("\u{E9}")));
    }

    #[test]
    fn parse_in_decodes_into_the_arena_and_keeps_sensitive_values_apart() {
        let input = b"CallSid=CA12&From=%2B1415&a+b=%C3%A9&Digits=1%2A2&Digits";
        let mut arena = Arena::default();
        let pairs = parse_in(input, &mut arena, &digits()).unwrap();
        let in_input = |text: &str| {
            let (at, base) = (text.as_ptr() as usize, input.as_ptr() as usize);
            at >= base && at + text.len() <= base + input.len()
        };
        // (text, where it lives): input, arena, or owned by the pair.
        let place = |text: &Cow<'_, str>| match text {
            Cow::Borrowed(t) if in_input(t) => "input",
            Cow::Borrowed(_) => "arena",
            Cow::Owned(_) => "owned",
        };
        let seen: Vec<(&str, &str, &str, &str)> = pairs
            .iter()
            .map(|p| (&*p.name, place(&p.name), &*p.value, place(&p.value)))
            .collect();
        assert_eq!(
            seen,
            [
                ("CallSid", "input", "CA12", "input"),
                ("From", "input", "+1415", "arena"),
                ("a b", "arena", "\u{E9}", "arena"),
                // Sensitive and decoded: rewrite wipes it after encrypting.
                ("Digits", "input", "1*2", "owned"),
                ("Digits", "input", "", "input"),
            ]
        );
    }

    proptest::proptest! {
        /// Any pairs `form_urlencoded` (the `url` crate's encoder) writes,
        /// with empty segments sprinkled in, decode back exactly.
        #[test]
        fn parse_in_decodes_what_form_urlencoded_encodes(
            pairs in proptest::collection::vec((".{0,12}", ".{0,40}"), 0..12),
            empty_segments in proptest::collection::vec(0usize..12, 0..4),
        ) {
            let mut encoded: Vec<String> = pairs
                .iter()
                .map(|(name, value)| {
                    form_urlencoded::Serializer::new(String::new())
                        .append_pair(name, value)
                        .finish()
                })
                .collect();
            for at in empty_segments {
                encoded.insert(at.min(encoded.len()), String::new());
            }
            let input = encoded.join("&");
            proptest::prop_assert_eq!(decoded_in(input.as_bytes()), Ok(pairs));
        }

        /// Long values, mostly plain, with escapes anywhere. The decoder
        /// looks for escapes 16 bytes at a time and copies plain runs whole:
        /// runs that end inside a lane, span several lanes or end in the
        /// last 15 bytes all decode, for `Digits` (decoded into a value of
        /// its own) as for the arena. The strategy above, mostly
        /// multi-byte characters, rarely makes runs longer than 8 bytes.
        #[test]
        fn parse_in_decodes_long_mostly_plain_values(
            pairs in proptest::collection::vec(
                ("Digits|[A-Za-z]{1,8}", "[a-z0-9 +%/=&\u{e9}]{0,300}"),
                0..6,
            ),
        ) {
            let input = pairs
                .iter()
                .fold(form_urlencoded::Serializer::new(String::new()), |mut s, (n, v)| {
                    s.append_pair(n, v);
                    s
                })
                .finish();
            proptest::prop_assert_eq!(decoded_in(input.as_bytes()), Ok(pairs));
        }
    }

    /// `raw` decoded one byte at a time, as the form encoding defines it:
    /// the oracle for [`decode_into`]'s 16-byte steps.
    fn decoded_bytewise(raw: &[u8]) -> Result<Vec<u8>, FormError> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(&b) = raw.get(at) {
            let (byte, width) = match b {
                b'+' => (b' ', 1),
                b'%' => match raw.get(at + 1..at + 3) {
                    Some(xx) if xx.iter().all(u8::is_ascii_hexdigit) => {
                        let xx = std::str::from_utf8(xx).unwrap();
                        (u8::from_str_radix(xx, 16).unwrap(), 3)
                    }
                    _ => return Err(FormError::BadPercentEncoding),
                },
                b => (b, 1),
            };
            out.push(byte);
            at += width;
        }
        Ok(out)
    }

    proptest::proptest! {
        /// Escapes, good and bad, anywhere in and across the 16-byte
        /// steps and the last bytes: `decode_into` agrees with the
        /// byte-wise oracle, errors included.
        #[test]
        fn decode_into_agrees_with_decoding_byte_by_byte(
            tokens in proptest::collection::vec(
                proptest::prop_oneof![
                    24 => "[a-z0-9]{1,3}",
                    8 => proptest::strategy::Just("+".to_string()),
                    7 => "%[0-9a-fA-F]{2}",
                    // Bad, mostly: `%` with fewer than two hex digits.
                    1 => "%[0-9ag+%]{0,2}",
                ],
                0..40,
            ),
        ) {
            let raw = tokens.concat();
            let mut out = vec![0; raw.len()];
            let decoded = decode_into(raw.as_bytes(), &mut out).map(|n| out[..n].to_vec());
            proptest::prop_assert_eq!(decoded, decoded_bytewise(raw.as_bytes()));
        }
    }

    #[test]
    fn accepts_max_params_and_rejects_one_more() {
        let at_limit = vec!["a=1"; MAX_PARAMS].join("&");
        assert_eq!(parse(at_limit.as_bytes()).unwrap().len(), MAX_PARAMS);
        let over = vec!["Digits=1"; MAX_PARAMS + 1].join("&");
        assert_eq!(
            parse(over.as_bytes()).unwrap_err(),
            FormError::TooManyParams
        );
        let ten_thousand = vec!["a=1"; 10_000].join("&");
        assert_eq!(
            parse(ten_thousand.as_bytes()).unwrap_err(),
            FormError::TooManyParams
        );
    }

    #[test]
    fn empty_segments_do_not_count_towards_max_params() {
        let input = vec!["a=1"; MAX_PARAMS].join("&&&");
        assert_eq!(
            parse(format!("&&{input}&&").as_bytes()).unwrap().len(),
            MAX_PARAMS
        );
    }

    #[test]
    fn keeps_untouched_params_byte_identical_and_in_order() {
        let input = "&CallSid=CA1&From=%2b1415+x&Digits=1234&Caller=a%2BB%20c&&To=%2B1&x&=y&";
        let (out, rw) = rewrite_fake(input.as_bytes(), &digits()).unwrap();
        assert_eq!(
            out,
            format!(
                "&CallSid=CA1&From=%2b1415+x&Digits={}&Caller=a%2BB%20c&&To=%2B1&x&=y&",
                fake("1234")
            )
        );
        assert_eq!(rw, ["Digits"]);
    }

    #[test]
    fn encrypts_every_repeated_sensitive_param() {
        let (out, rw) = rewrite_fake(b"Digits=1&a=x&Digits=2&Digits=1", &digits()).unwrap();
        assert_eq!(
            out,
            format!(
                "Digits={}&a=x&Digits={}&Digits={}",
                fake("1"),
                fake("2"),
                fake("1")
            )
        );
        assert_eq!(rw, ["Digits"; 3]);
    }

    #[test]
    fn encrypts_percent_encoded_field_name_and_decoded_value() {
        let (out, rw) = rewrite_fake(b"Dig%69ts=12%33+4&Speech%52esult=a", &digits()).unwrap();
        assert_eq!(
            out,
            format!("Dig%69ts={}&Speech%52esult={}", fake("123 4"), fake("a"))
        );
        assert_eq!(rw, ["Digits", "SpeechResult"]);
    }

    #[test]
    fn does_not_encrypt_case_variants_of_a_field_name() {
        // Exact, case-sensitive match: Twilio sends `Digits`, and the
        // signature covers the name, so a variant is not Twilio's.
        let (out, rw) = rewrite_fake(b"digits=1&DIGITS=2&Digits=3", &digits()).unwrap();
        assert_eq!(out, format!("digits=1&DIGITS=2&Digits={}", fake("3")));
        assert_eq!(rw, ["Digits"]);
        assert!(rewrite_fake(b"digits=1&DIGITS=2&digitS=3", &digits()).is_none());
    }

    #[test]
    fn sensitive_pair_without_equals_gains_equals_and_ciphertext() {
        let (out, rw) = rewrite_fake(b"a=1&Digits&b=2&SecurityCode", &digits()).unwrap();
        assert_eq!(
            out,
            format!("a=1&Digits={}&b=2&SecurityCode={}", fake(""), fake(""))
        );
        assert_eq!(rw, ["Digits", "SecurityCode"]);
    }

    #[test]
    fn encrypts_an_empty_sensitive_value() {
        let (out, _) = rewrite_fake(b"Digits=&a=1", &digits()).unwrap();
        assert_eq!(out, format!("Digits={}&a=1", fake("")));
    }

    #[test]
    fn encrypts_a_value_containing_equals_whole() {
        let (out, _) = rewrite_fake(b"Digits=1=2%3D3", &digits()).unwrap();
        assert_eq!(out, format!("Digits={}", fake("1=2=3")));
    }

    #[test]
    fn returns_none_when_nothing_sensitive() {
        let input = b"CallSid=CA1&From=%2B1&digits=1";
        let mut pairs = parse(input).unwrap();
        let mut calls = 0;
        let rw = rewrite(input, &mut pairs, &digits(), |_, _| calls += 1);
        assert!(rw.is_none());
        assert_eq!(calls, 0);
        assert_eq!(pairs[1].value, "+1");
        assert_eq!(pairs[2].value, "1");
        assert!(rewrite(b"", &mut [], &digits(), fake_encrypt).is_none());
    }

    #[test]
    fn ciphertext_decrypts_back_to_the_decoded_original() {
        let cipher = FieldCipher::new(&FieldKey::generate());
        let input = b"From=%2B1&SpeechResult=my+pin%2B%F0%9F%98%80+e%CC%81&Digits=0042";
        let mut pairs = parse(input).unwrap();
        let rw = rewrite(input, &mut pairs, &digits(), |p, out| {
            cipher.encrypt_hex_into(p, out)
        })
        .unwrap();
        let again = parse(&rw.bytes).unwrap();
        assert_eq!(again[0].value, "+1");
        let speech = cipher.decrypt_hex(again[1].value.as_bytes()).unwrap();
        assert_eq!(speech.as_slice(), "my pin+\u{1F600} e\u{301}".as_bytes());
        let digits = cipher.decrypt_hex(again[2].value.as_bytes()).unwrap();
        assert_eq!(digits.as_slice(), b"0042");
        assert!(!String::from_utf8_lossy(&rw.bytes).contains("0042"));
    }

    #[test]
    fn rewritten_bytes_fill_their_allocation_exactly() {
        // So `Bytes::from` takes the vector over without allocating again.
        let cipher = FieldCipher::new(&FieldKey::generate());
        for input in [
            &b"a=1&Digits=4242&b=2"[..],
            b"Digits&SpeechResult=my+pin+%F0%9F%98%80&Digits=",
            b"x=%41&Digits=1%2A2&Digits=1%2A2&z",
        ] {
            let mut pairs = parse(input).unwrap();
            let rw = rewrite(input, &mut pairs, &digits(), |p, out| {
                cipher.encrypt_hex_into(p, out)
            })
            .unwrap();
            assert_eq!(rw.bytes.len(), rw.bytes.capacity(), "{input:?}");
        }
    }

    #[test]
    fn pairs_hold_the_forwarded_ciphertext_after_rewrite() {
        // The caller re-signs from `pairs`: they must equal what the
        // application will parse from the forwarded bytes.
        let cipher = FieldCipher::new(&FieldKey::generate());
        let input = b"Digits&a=%41&Digits=9&TranscriptionText=hi+there";
        let mut pairs = parse(input).unwrap();
        let rw = rewrite(input, &mut pairs, &digits(), |p, out| {
            cipher.encrypt_hex_into(p, out)
        })
        .unwrap();
        let forwarded = parse(&rw.bytes).unwrap();
        assert_eq!(forwarded.len(), pairs.len());
        for (sent, held) in forwarded.iter().zip(&pairs) {
            assert_eq!((&sent.name, &sent.value), (&held.name, &held.value));
        }
        assert!(matches!(pairs[1].value, Cow::Owned(ref v) if v == "A"));
    }

    #[test]
    fn names_encrypted_pairs_in_input_order() {
        let (_, rw) = rewrite_fake(
            b"SpeechResult=a&Digits=1&SpeechResult=b&Digits=2&x=1",
            &digits(),
        )
        .unwrap();
        assert_eq!(rw, ["SpeechResult", "Digits", "SpeechResult", "Digits"]);
    }

    #[test]
    fn rewrites_in_input_order_even_when_pairs_were_reordered() {
        let input = b"Digits=2&a=1&Digits=1&SpeechResult=x";
        let mut pairs = parse(input).unwrap();
        pairs.sort_by(|a, b| (&a.name, &a.value).cmp(&(&b.name, &b.value)));
        let rw = rewrite(input, &mut pairs, &digits(), fake_encrypt).unwrap();
        let names: Vec<&str> = rw.names(&pairs).collect();
        assert_eq!(names, ["Digits", "Digits", "SpeechResult"]);
        assert_eq!(
            String::from_utf8(rw.bytes).unwrap(),
            format!(
                "Digits={}&a=1&Digits={}&SpeechResult={}",
                fake("2"),
                fake("1"),
                fake("x")
            )
        );
    }

    #[test]
    fn redacts_sensitive_values_and_keeps_the_rest_as_received() {
        let input = b"&CallSid=CA1&Digits=1234&From=%2B1+x&Dig%69ts=9876\
                      &SpeechResult=my+pin+is+4321&&x&Digits&a=b=c&Digits=55=66";
        let out = redacted(input, &digits());
        assert_eq!(
            out,
            "&CallSid=CA1&Digits=*REDACTED*&From=%2B1+x&Dig%69ts=*REDACTED*\
             &SpeechResult=*REDACTED*&&x&Digits&a=b=c&Digits=*REDACTED*"
        );
        for canary in ["1234", "9876", "4321", "55", "66"] {
            assert!(!out.contains(canary), "{canary} leaked");
        }
    }

    #[test]
    fn redacts_the_value_when_the_name_cannot_be_decoded() {
        let out = redacted(b"Digits%=1234&%FF=5678&%G1=9999&\xff=1111&ok=1", &digits());
        assert_eq!(
            out,
            "Digits%=*REDACTED*&%FF=*REDACTED*&%G1=*REDACTED*&\u{FFFD}=*REDACTED*&ok=1"
        );
    }

    #[test]
    fn redacted_replaces_invalid_utf8_and_keeps_bad_escapes_verbatim() {
        let out = redacted(b"a=\xff%G1%0D%0A&Digits=\xfe1", &digits());
        assert_eq!(out, "a=\u{FFFD}%G1%0D%0A&Digits=*REDACTED*");
    }

    #[test]
    fn redacted_leaves_case_variants_like_rewrite_does() {
        // Same exact-match rule as `rewrite`: the log shows what was
        // forwarded.
        assert_eq!(redacted(b"digits=1", &digits()), "digits=1");
    }

    #[test]
    fn debug_of_a_pair_or_rewrite_never_prints_values() {
        let input = b"Digits=1234&From=%2B15550001";
        let mut pairs = parse(input).unwrap();
        let shown = format!("{pairs:?}");
        assert!(shown.contains("Digits") && shown.contains(REDACTED));
        assert!(!shown.contains("1234") && !shown.contains("15550001"));
        let rw = rewrite(input, &mut pairs, &digits(), fake_encrypt).unwrap();
        let shown = format!("{rw:?}");
        assert!(shown.contains("count: 1"), "{shown}");
        assert!(!shown.contains("15550001") && !shown.contains(&fake("1234")));
    }

    #[test]
    fn errors_never_carry_input() {
        for input in [&b"Digits=4111%G1"[..], b"Digits=4111%FF"] {
            let err = parse(input).unwrap_err();
            assert!(!format!("{err} {err:?}").contains("4111"));
        }
    }

    #[test]
    fn field_set_matches_exact_decoded_names_only() {
        let long = "L".repeat(70);
        let set = FieldSet::new(["Digits", "", "Digits", long.as_str()]);
        assert_eq!(set.names().collect::<Vec<_>>(), ["Digits", "", &long]);
        assert!(set.contains("Digits") && set.contains("") && set.contains(&long));
        assert!(!set.contains("digits") && !set.contains("Digit") && !set.contains("Digitz"));
        assert!(!set.contains(&"L".repeat(64)));
        assert!(!FieldSet::new(Vec::<String>::new()).contains(""));
    }

    #[test]
    fn default_fields_cover_gather_transcription_and_pay_inputs() {
        let set = digits();
        assert_eq!(set.names().count(), DEFAULT_FIELDS.len(), "duplicate");
        for name in [
            "Digits",
            "SpeechResult",
            "UnstableSpeechResult",
            "StableSpeechResult",
            "TranscriptionText",
            "TranscriptionData",
            "ExpirationDate",
            "PaymentCardPostalCode",
            "BankRoutingNumber",
            "PaymentCardNumber",
            "SecurityCode",
            "BankAccountNumber",
            "PaymentToken",
        ] {
            assert!(set.contains(name), "{name}");
        }
    }
}
