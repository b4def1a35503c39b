//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! Labels come only from fixed allow-lists (`outcome`, `reason`, `kind`):
//! never a path, a parameter, a header or any other request data.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    signature_failures: Family<Labels, Counter>,
    fields_encrypted: Counter,
    upstream_errors: Family<Labels, Counter>,
    panics: Counter,
    tls_handshake_failures: Family<Labels, Counter>,
    latency: Histogram,
    encryptions_this_key: Gauge,
    log_lines_dropped: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ivrguard");
        let requests = Family::<Labels, Counter>::default();
        registry.register("requests", "Requests by outcome", requests.clone());
        let signature_failures = Family::<Labels, Counter>::default();
        registry.register(
            "signature_failures",
            "Requests refused by signature verification, by reason",
            signature_failures.clone(),
        );
        let fields_encrypted = Counter::default();
        registry.register(
            "fields_encrypted",
            "Parameter values encrypted",
            fields_encrypted.clone(),
        );
        let upstream_errors = Family::<Labels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream failures, by kind",
            upstream_errors.clone(),
        );
        let panics = Counter::default();
        registry.register(
            "panics",
            "Requests that panicked (answered 500)",
            panics.clone(),
        );
        let tls_handshake_failures = Family::<Labels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the listener that failed, by reason",
            tls_handshake_failures.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head",
            latency.clone(),
        );
        let encryptions_this_key = Gauge::default();
        registry.register(
            "encryptions_current_key",
            "Values encrypted with the current key since start-up (NIST SP 800-38D bound: 2^32 per key)",
            encryptions_this_key.clone(),
        );
        let log_lines_dropped = Gauge::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because stdout could not keep up",
            log_lines_dropped.clone(),
        );
        Metrics {
            registry,
            requests,
            signature_failures,
            fields_encrypted,
            upstream_errors,
            panics,
            tls_handshake_failures,
            latency,
            encryptions_this_key,
            log_lines_dropped,
        }
    }

    pub fn request(&self, outcome: &'static str, latency_seconds: f64) {
        self.requests.get_or_create(&[("outcome", outcome)]).inc();
        self.latency.observe(latency_seconds);
    }

    pub fn signature_failure(&self, reason: &'static str) {
        self.signature_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn fields_encrypted(&self, count: usize) {
        self.fields_encrypted.inc_by(count as u64);
    }

    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors.get_or_create(&[("kind", kind)]).inc();
    }

    pub fn panic(&self) {
        self.panics.inc();
    }

    pub fn tls_handshake_failure(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Prometheus text format. `encryptions` and `dropped` are sampled now.
    pub fn render(&self, encryptions: u64, dropped_log_lines: u64) -> String {
        self.encryptions_this_key
            .set(i64::try_from(encryptions).unwrap_or(i64::MAX));
        self.log_lines_dropped
            .set(i64::try_from(dropped_log_lines).unwrap_or(i64::MAX));
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_fixed_labels() {
        let m = Metrics::new();
        m.request("forwarded", 0.001);
        m.signature_failure("mismatch");
        m.fields_encrypted(3);
        m.upstream_error("connect");
        m.tls_handshake_failure("timeout");
        let text = m.render(7, 0);
        assert!(
            text.contains(r#"ivrguard_requests_total{outcome="forwarded"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"ivrguard_signature_failures_total{reason="mismatch"} 1"#));
        assert!(text.contains("ivrguard_fields_encrypted_total 3"));
        assert!(text.contains(r#"ivrguard_upstream_errors_total{kind="connect"} 1"#));
        assert!(text.contains(r#"ivrguard_tls_handshake_failures_total{reason="timeout"} 1"#));
        assert!(text.contains("ivrguard_encryptions_current_key 7"));
        assert!(text.contains("ivrguard_request_duration_seconds_bucket"));
    }
}
