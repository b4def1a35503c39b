//! The access-log record: one JSON line per request, built only from values
//! that are safe to print.
//!
//! [`AccessRecord`] never holds a request; it holds the method, the path, a
//! query string whose sensitive values were replaced by `*REDACTED*` before
//! they got here, fixed-label outcomes, and a `CallSid` only if it has the
//! shape of one. That is what makes "nothing plaintext in the log" a property
//! of a type rather than of every call site.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::request::Parts;

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
    method: String,
    path: String,
    query: String,
    peer: SocketAddr,
    pub signature: SignatureOutcome,
    pub call_sid: Option<String>,
    pub encrypted_fields: Vec<String>,
    pub upstream_status: Option<u16>,
    pub reason: Option<&'static str>,
    /// The app answered 401/403 to a verified, re-signed request.
    pub app_refused: bool,
}

impl AccessRecord {
    /// Starts a record from the request head. The query is redacted here,
    /// before it is stored.
    pub fn start(parts: &Parts, peer: SocketAddr, fields: &FieldSet) -> Self {
        AccessRecord {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts
                .uri
                .query()
                .map(|q| form::redacted(q.as_bytes(), fields))
                .unwrap_or_default(),
            peer,
            signature: SignatureOutcome::NotChecked,
            call_sid: None,
            encrypted_fields: Vec::new(),
            upstream_status: None,
            reason: None,
            app_refused: false,
        }
    }

    /// Records `value` as the CallSid only if it looks like one
    /// (`CA` + 32 hex digits); anything else is not logged.
    pub fn set_call_sid(&mut self, value: &str) {
        let b = value.as_bytes();
        if b.len() == 34 && b.starts_with(b"CA") && b[2..].iter().all(u8::is_ascii_hexdigit) {
            self.call_sid = Some(value.to_owned());
        }
    }

    /// Adds encrypted field names, each listed once.
    pub fn add_encrypted(&mut self, names: Vec<String>) {
        for name in names {
            if !self.encrypted_fields.contains(&name) {
                self.encrypted_fields.push(name);
            }
        }
    }

    /// Writes the line. Text fields are passed as `&str`, not `%Display`:
    /// the formatter then copies them instead of running `fmt` machinery.
    pub fn emit(&self, status: u16, latency: Duration) {
        let fields = self.encrypted_fields.join(",");
        tracing::info!(
            target: "ivrguard::access",
            method = self.method.as_str(),
            path = self.path.as_str(),
            query = self.query.as_str(),
            peer = ip_text(self.peer.ip()).as_str(),
            status,
            upstream_status = self.upstream_status,
            // Whole microseconds: short numbers, never a long digit run.
            latency_ms = latency.as_micros() as f64 / 1000.0,
            signature = self.signature.label(),
            call_sid = self.call_sid.as_deref(),
            encrypted_fields = fields.as_str(),
            reason = self.reason,
            "access"
        );
    }
}

/// The address as `Display` writes it; IPv4 by hand, because `Ipv4Addr`'s
/// `Display` (padding support) cost ~1,400 instructions per access line.
pub(crate) fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                if octet >= 100 {
                    text.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    text.push(char::from(b'0' + octet / 10 % 10));
                }
                text.push(char::from(b'0' + octet % 10));
            }
            text
        }
        IpAddr::V6(v6) => v6.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ip_text_matches_display() {
        for octet in 0..=255u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(octet, 0, 255 - octet, octet / 3));
            assert_eq!(ip_text(ip), ip.to_string());
        }
        for ip in [
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped()),
            "2001:db8::7".parse().unwrap(),
        ] {
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }
}
