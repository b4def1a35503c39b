//! The access-log record: one JSON line per request, built only from values
//! that are safe to print.
//!
//! [`AccessRecord`] never holds a request; it holds the method, the path, a
//! query string whose sensitive values were replaced by `*REDACTED*` before
//! they got here, fixed-label outcomes, and a `CallSid` only if it has the
//! shape of one. That is what makes "nothing plaintext in the log" a property
//! of a type rather than of every call site.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http::request::Parts;
use http::Method;

use crate::form::{self, FieldSet};

/// What the signature stage decided, as the log prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureOutcome {
    /// The request never reached verification.
    NotChecked,
    Valid(crate::signature::KeyUsed),
    Invalid(&'static str),
}

impl SignatureOutcome {
    pub fn label(&self) -> &'static str {
        use crate::signature::KeyUsed;
        match self {
            SignatureOutcome::NotChecked => "not_checked",
            SignatureOutcome::Valid(KeyUsed::Primary) => "valid",
            SignatureOutcome::Valid(KeyUsed::Secondary) => "valid_secondary",
            SignatureOutcome::Valid(KeyUsed::SharedKey) => "valid_shared_key",
            SignatureOutcome::Invalid(reason) => reason,
        }
    }
}

/// One request's access-log line.
#[derive(Debug)]
pub struct AccessRecord {
    method: Method,
    path: String,
    query: String,
    peer: SocketAddr,
    pub signature: SignatureOutcome,
    call_sid: Option<CallSid>,
    /// Distinct encrypted names, comma-separated, in order of first
    /// appearance: the log's `encrypted_fields` as it is printed.
    encrypted_fields: String,
    pub upstream_status: Option<u16>,
    pub reason: Option<&'static str>,
    /// The app answered 401/403 to a verified, re-signed request.
    pub app_refused: bool,
    /// When the request's head was handed over.
    started: Instant,
    /// Whether the line was written. A record dropped without it is a
    /// request that ended unanswered (an HTTP/2 client reset its stream,
    /// the drain timeout cut it at shutdown) or whose handler panicked: its
    /// line is written then, so every request has one (found in review:
    /// requests cut at the drain timeout left no trace).
    written: bool,
}

impl AccessRecord {
    /// Starts a record from the request head, handed over at `started`.
    /// The query is redacted here, before it is stored.
    pub fn start(parts: &Parts, peer: SocketAddr, fields: &FieldSet, started: Instant) -> Self {
        AccessRecord {
            // The standard methods are constants: no copy.
            method: parts.method.clone(),
            path: bounded(parts.uri.path().to_owned(), b'/'),
            query: parts
                .uri
                .query()
                .map(|q| bounded(form::redacted(q.as_bytes(), fields), b'&'))
                .unwrap_or_default(),
            peer,
            signature: SignatureOutcome::NotChecked,
            call_sid: None,
            encrypted_fields: String::new(),
            upstream_status: None,
            reason: None,
            app_refused: false,
            started,
            written: false,
        }
    }

    /// When the request's head was handed over.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records `value` as the CallSid only if it looks like one
    /// (`CA` + 32 hex digits); anything else is not logged.
    pub fn set_call_sid(&mut self, value: &str) {
        if let Some(sid) = CallSid::parse(value) {
            self.call_sid = Some(sid);
        }
    }

    /// The CallSid, if the request had one of the right shape.
    pub fn call_sid(&self) -> Option<CallSid> {
        self.call_sid
    }

    /// Adds an encrypted field's name, unless it is listed already.
    pub fn add_encrypted(&mut self, name: &str) {
        if self
            .encrypted_fields
            .split(',')
            .any(|listed| listed == name)
        {
            return;
        }
        if !self.encrypted_fields.is_empty() {
            self.encrypted_fields.push(',');
        }
        self.encrypted_fields.push_str(name);
    }

    /// Writes the line for the answer sent with `status`.
    pub fn emit(&mut self, status: u16, latency: Duration) {
        self.write(Some(status), latency, self.reason);
        self.written = true;
    }

    /// Text fields are passed as `&str`, not `%Display`: the formatter then
    /// copies them instead of running `fmt` machinery. A `None` status is
    /// left out of the line.
    fn write(&self, status: Option<u16>, latency: Duration, reason: Option<&'static str>) {
        // A method may be any token up to the head's 64 KiB (found in
        // review: one of 60,000 bytes made a 60 KB line).
        let method = match self.method.as_str() {
            method if method.len() <= 24 => method,
            _ => "[long method]",
        };
        tracing::info!(
            target: "ivrguard::access",
            method,
            path = self.path.as_str(),
            query = self.query.as_str(),
            peer = ip_text(self.peer.ip()).as_str(),
            status,
            upstream_status = self.upstream_status,
            // Whole microseconds: short numbers, never a long digit run.
            latency_ms = latency.as_micros() as f64 / 1000.0,
            signature = self.signature.label(),
            call_sid = self.call_sid.as_ref().map(CallSid::as_str),
            encrypted_fields = self.encrypted_fields.as_str(),
            reason,
            "access"
        );
    }
}

/// The line of a request that got no answer from the pipeline: `panic`
/// with the 500 the server answers instead, or `unanswered` with no status.
impl Drop for AccessRecord {
    fn drop(&mut self) {
        // (The clock is read only for a line that will be written.)
        if self.written || !tracing::enabled!(target: "ivrguard::access", tracing::Level::INFO) {
            return;
        }
        let latency = self.started.elapsed();
        match std::thread::panicking() {
            true => self.write(Some(500), latency, Some(crate::metrics::PANIC)),
            false => self.write(None, latency, Some(crate::metrics::UNANSWERED)),
        }
    }
}

/// The most of a path or a (redacted) query an access line carries.
/// Twilio's are far shorter; a caller's 60 KiB path made 124 KB lines, and
/// the log queue, bounded in lines, held 1 GB of them while stdout stalled
/// (found in review).
pub const LOGGED_MAX: usize = 1024;

/// `text`, cut to at most [`LOGGED_MAX`] bytes with the length it had
/// noted: `…[61440 bytes]`. Cut right after a `delimiter` (`/` in a path,
/// `&` in a query), so every segment or parameter logged is whole: a card
/// number or a dashed one a `scrub_patterns` entry matches, cut short,
/// would slip past the rule that redacts it (found in review).
fn bounded(mut text: String, delimiter: u8) -> String {
    if text.len() <= LOGGED_MAX {
        return text;
    }
    let total = text.len();
    // A delimiter is ASCII: the cut is a char boundary.
    let cut = text.as_bytes()[..LOGGED_MAX]
        .iter()
        .rposition(|&b| b == delimiter)
        .map_or(0, |at| at + 1);
    text.truncate(cut);
    text.push_str("\u{2026}[");
    text.push_str(itoa::Buffer::new().format(total));
    text.push_str(" bytes]");
    text
}

/// A `CallSid` as it is logged: `CA` and 32 hex digits, held inline.
#[derive(PartialEq, Clone, Copy)]
pub struct CallSid([u8; 34]);

impl CallSid {
    /// `Some` only for a value of exactly that shape.
    fn parse(value: &str) -> Option<Self> {
        let sid: [u8; 34] = value.as_bytes().try_into().ok()?;
        let (prefix, digits) = sid.split_at(2);
        (prefix == b"CA" && digits.iter().all(u8::is_ascii_hexdigit)).then_some(CallSid(sid))
    }

    pub fn as_str(&self) -> &str {
        // ASCII, checked in `parse`.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for CallSid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The address as `Display` writes it; IPv4 by hand, because `Ipv4Addr`'s
/// `Display` (padding support) cost ~1,400 instructions per access line.
/// An IPv4 text is allocated at its exact length, so a header value made
/// from it takes the string's buffer as it is (`Bytes` would otherwise
/// allocate a second block to track the spare room).
pub(crate) fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut text = [0u8; 15];
            let mut len = 0;
            let mut put = |digit: u8| {
                if let Some(slot) = text.get_mut(len) {
                    *slot = digit;
                    len += 1;
                }
            };
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    put(b'.');
                }
                if octet >= 100 {
                    put(b'0' + octet / 100);
                }
                if octet >= 10 {
                    put(b'0' + octet / 10 % 10);
                }
                put(b'0' + octet % 10);
            }
            // ASCII digits and dots.
            String::from(
                std::str::from_utf8(text.get(..len).unwrap_or_default()).unwrap_or_default(),
            )
        }
        IpAddr::V6(v6) => v6.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn long_paths_and_queries_are_cut_between_segments() {
        assert_eq!(bounded("/ivr/gather".into(), b'/'), "/ivr/gather");
        let exact = "a".repeat(LOGGED_MAX);
        assert_eq!(bounded(exact.clone(), b'/'), exact);
        // A segment across the cut is left out whole, not cut short: a
        // card number, or a dashed one a user's pattern must see whole.
        for value in ["4111111111111111", "4111-1111-1111-1111", "123-45-6789"] {
            let long = format!("{}/{value}/{}", "x/".repeat(507), "y".repeat(5000));
            let cut = bounded(long.clone(), b'/');
            let expected = format!("{}/\u{2026}[{} bytes]", "x/".repeat(507), long.len());
            assert_eq!(cut, expected);
        }
        let query = format!("{}&SSN=123-45-6789&b=2", "a=1&".repeat(253));
        let cut = bounded(query.clone(), b'&');
        let expected = format!("{}&\u{2026}[{} bytes]", "a=1&".repeat(253), query.len());
        assert_eq!(cut, expected);
        // No delimiter before the cut: nothing of it is logged; no char split.
        assert_eq!(bounded("€".repeat(2000), b'/'), "\u{2026}[6000 bytes]");
    }

    #[test]
    fn ip_text_matches_display() {
        for octet in 0..=255u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(octet, 0, 255 - octet, octet / 3));
            assert_eq!(ip_text(ip), ip.to_string());
        }
        let text = ip_text(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(text.capacity(), text.len(), "exact length");
        for ip in [
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped()),
            "2001:db8::7".parse().unwrap(),
        ] {
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    fn record() -> AccessRecord {
        let (parts, ()) = http::Request::post("/ivr?x=1")
            .body(())
            .unwrap()
            .into_parts();
        let fields = FieldSet::new(["Digits".to_string()]);
        AccessRecord::start(
            &parts,
            SocketAddr::from(([127, 0, 0, 1], 1)),
            &fields,
            Instant::now(),
        )
    }

    #[test]
    fn lists_each_encrypted_name_once_in_order_of_first_appearance() {
        let mut log = record();
        for name in ["SpeechResult", "Digits", "SpeechResult", "Digit", "Digits"] {
            log.add_encrypted(name);
        }
        assert_eq!(log.encrypted_fields, "SpeechResult,Digits,Digit");
    }

    #[test]
    fn keeps_a_call_sid_only_of_the_right_shape() {
        let good = "CA9f8e7d6c5b4a39281706f5e4d3c2b1a0";
        for bad in [
            "",
            "CA9f8e7d6c5b4a39281706f5e4d3c2b1a",
            "CA9f8e7d6c5b4a39281706f5e4d3c2b1a00",
            "XX9f8e7d6c5b4a39281706f5e4d3c2b1a0",
            "CA9f8e7d6c5b4a39281706f5e4d3c2b1aZ",
            "CA9f8e7d6c5b4a39281706f5e4d3c2b1é",
        ] {
            let mut log = record();
            log.set_call_sid(bad);
            assert_eq!(log.call_sid, None, "{bad}");
        }
        let mut log = record();
        log.set_call_sid(good);
        assert_eq!(log.call_sid.as_ref().map(CallSid::as_str), Some(good));
        assert_eq!(log.method, Method::POST);
    }
}
