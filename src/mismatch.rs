//! Why Twilio's signature did not match: one WARN line for the operator.
//!
//! A mismatch is nearly always configuration, not an attack: the URL
//! ivrguard rebuilds is not the one Twilio signed (TLS ended at a load
//! balancer, a port, a stale `twilio.public_url`), or the token is not the
//! one that signed. The access line says only `mismatch`, and every cause
//! gave the same line (found in review). So on a mismatch, this module
//! tries the other origins the request itself suggests: the other scheme,
//! the `X-Forwarded-Proto`/`-Host` a proxy set, the `Host` header. It
//! says which origin ivrguard used, where that came from, and which other
//! one matches, if any.
//!
//! A match proves only that a holder of the token signed that URL, so it is
//! safe to print; the answer stays 403 whatever is found. Origins are
//! built from header values that are visible ASCII ([`http::HeaderValue`]'s
//! `to_str`), so they cannot break a log line. At most one line per
//! [`EVERY`]: a flood of unsigned requests costs one line, and a few HMACs,
//! per interval.

use std::time::Duration;

use crate::log_limit::LogLimit;

/// The shortest time between two explanations.
pub const EVERY: Duration = Duration::from_secs(10);

/// Headers longer than this are not tried (no real host is).
const MAX_ORIGIN: usize = 300;

/// Where the origin of the signed URL comes from (`pipeline::OriginRule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    PublicUrl,
    /// Trusted `X-Forwarded-Proto`/`-Host` (`server.trust_forwarded_headers`).
    Forwarded,
    /// The connection's scheme and the `Host` header.
    Request,
}

impl Source {
    fn describe(self) -> &'static str {
        match self {
            Source::PublicUrl => "twilio.public_url",
            Source::Forwarded => "the trusted X-Forwarded-Proto and X-Forwarded-Host",
            Source::Request => "the request's Host header (twilio.public_url is not set)",
        }
    }
}

/// What the request offers to rebuild its URL from.
#[derive(Debug)]
pub struct Request<'a> {
    /// The origin ivrguard verified against, `scheme://host[:port]`.
    pub used: &'a str,
    pub source: Source,
    /// `http`, or `https` on the TLS listener.
    pub connection_scheme: &'static str,
    pub host: Option<&'a str>,
    pub forwarded_proto: Option<&'a str>,
    pub forwarded_host: Option<&'a str>,
}

/// Whether an explanation may be logged now; at most one per [`EVERY`].
pub fn due() -> bool {
    static LIMIT: LogLimit = LogLimit::new(EVERY);
    LIMIT.due()
}

/// Logs why the signature may not have matched. `matches` says whether
/// the signature verifies with another origin (the request's path and
/// query after it, as verified).
pub fn explain(request: &Request<'_>, matches: impl Fn(&str) -> bool) {
    let found = other_origins(request)
        .into_iter()
        .find(|(origin, _)| matches(origin));
    let used = request.used;
    let from = request.source.describe();
    match found {
        Some((origin, why)) => tracing::warn!(
            origin = used,
            origin_from = from,
            matching_origin = origin.as_str(),
            "signature mismatch: ivrguard verified against {used} (from {from}), but the \
             signature matches {origin} ({why}): set twilio.public_url = \"{origin}\""
        ),
        None => tracing::warn!(
            origin = used,
            origin_from = from,
            "signature mismatch: ivrguard verified against {used} (from {from}) and no other \
             origin the request suggests matches. Check the auth token (the primary token of \
             the account, or sub-account, that owns the number), then the path and query \
             (a proxy that adds, strips or rewrites them) against the request URL in Twilio's \
             console (Monitor > Logs > Errors)"
        ),
    }
}

/// The origins to try besides the one used, each with why it is a
/// candidate; none twice, none equal to the one used.
fn other_origins(r: &Request<'_>) -> Vec<(String, &'static str)> {
    let used_scheme = r
        .used
        .split_once("://")
        .map_or("http", |(scheme, _)| scheme);
    let used_host = r.used.split_once("://").map_or("", |(_, host)| host);
    let other_scheme = if used_scheme == "https" {
        "http"
    } else {
        "https"
    };
    let mut tries: Vec<(String, &'static str)> = Vec::new();
    let mut add = |scheme: &str, host: &str, why: &'static str| {
        let origin = format!("{}://{host}", scheme.to_ascii_lowercase());
        if !host.is_empty()
            && origin.len() <= MAX_ORIGIN
            && origin != r.used
            && !tries.iter().any(|(o, _)| *o == origin)
        {
            tries.push((origin, why));
        }
    };
    if r.source != Source::Forwarded {
        if let Some(proto) = r.forwarded_proto {
            let host = r.forwarded_host.or(r.host).unwrap_or(used_host);
            add(
                proto,
                host,
                "from X-Forwarded-Proto/Host, which are not trusted: a proxy in front ends TLS",
            );
        } else if let Some(host) = r.forwarded_host {
            add(
                used_scheme,
                host,
                "from X-Forwarded-Host, which is not trusted",
            );
        }
    }
    add(other_scheme, used_host, "Twilio calls the other scheme");
    if let Some(host) = r.host {
        let why = match r.source {
            Source::PublicUrl => "from the Host header: twilio.public_url is not what Twilio calls",
            _ => "the connection's scheme and the Host header",
        };
        add(used_scheme, host, why);
        add(r.connection_scheme, host, why);
    }
    tries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(used: &'a str, source: Source) -> Request<'a> {
        Request {
            used,
            source,
            connection_scheme: "http",
            host: Some("10.0.0.5:8080"),
            forwarded_proto: None,
            forwarded_host: None,
        }
    }

    #[test]
    fn tries_the_other_scheme_the_forwarded_origin_and_the_host() {
        let mut r = request("http://10.0.0.5:8080", Source::Request);
        r.forwarded_proto = Some("HTTPS");
        r.forwarded_host = Some("ivr.example.com");
        let origins: Vec<String> = other_origins(&r).into_iter().map(|(o, _)| o).collect();
        assert_eq!(
            origins,
            ["https://ivr.example.com", "https://10.0.0.5:8080"]
        );

        let r = request("https://ivr.example.com", Source::PublicUrl);
        let origins: Vec<String> = other_origins(&r).into_iter().map(|(o, _)| o).collect();
        assert_eq!(
            origins,
            [
                "http://ivr.example.com",
                "https://10.0.0.5:8080",
                "http://10.0.0.5:8080"
            ]
        );
    }

    #[test]
    fn trusted_forwarded_headers_are_not_tried_again_and_long_hosts_are_skipped() {
        let mut r = request("https://ivr.example.com", Source::Forwarded);
        r.forwarded_proto = Some("https");
        r.forwarded_host = Some("ivr.example.com");
        let long = "h".repeat(MAX_ORIGIN);
        r.host = Some(&long);
        let origins: Vec<String> = other_origins(&r).into_iter().map(|(o, _)| o).collect();
        assert_eq!(origins, ["http://ivr.example.com"]);
    }
}
