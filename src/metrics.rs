//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! Labels come only from fixed allow-lists (`outcome`, `reason`, `kind`):
//! never a path, a parameter, a header or any other request data.
//!
//! What every request touches (its outcome counter, the latency histogram,
//! the encrypted-fields counter) is sharded by worker ([`crate::worker`]):
//! each worker adds to its own cache line, with no lock and no hashing of
//! labels, and `/metrics` sums the shards. prometheus-client's `Histogram`
//! takes a write lock per observation and `Family::get_or_create` a read
//! lock plus a hash of the labels; both stay only for rare events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];

/// The outcome of most requests: its counter is resolved once.
const FORWARDED: &str = "forwarded";

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, ShardedCounter>,
    forwarded: ShardedCounter,
    signature_failures: Family<Labels, Counter>,
    fields_encrypted: ShardedCounter,
    upstream_errors: Family<Labels, Counter>,
    panics: Counter,
    tls_handshake_failures: Family<Labels, Counter>,
    latency: LatencyHistogram,
    encryptions_this_key: Gauge,
    log_lines_dropped: Gauge,
    upstream_connections_open: Gauge,
    signatures_not_primary: Family<Labels, Counter>,
    config_reloads: Family<Labels, Counter>,
    config_reload_refused: Gauge,
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
        let requests = Family::<Labels, ShardedCounter>::default();
        registry.register("requests", "Requests by outcome", requests.clone());
        let forwarded = requests.get_or_create(&[("outcome", FORWARDED)]).clone();
        let signature_failures = Family::<Labels, Counter>::default();
        registry.register(
            "signature_failures",
            "Requests refused by signature verification, by reason",
            signature_failures.clone(),
        );
        let fields_encrypted = ShardedCounter::default();
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
        let latency = LatencyHistogram::default();
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
        let upstream_connections_open = Gauge::default();
        registry.register(
            "upstream_connections_open",
            "Connections open to the app, idle ones included (at most upstream.max_connections)",
            upstream_connections_open.clone(),
        );
        let signatures_not_primary = Family::<Labels, Counter>::default();
        registry.register(
            "signatures_not_primary",
            "Requests whose signature matched a key other than the primary auth token (key: secondary, shared_key); \
             during a token rotation, how much is still signed with the token being replaced",
            signatures_not_primary.clone(),
        );
        let config_reloads = Family::<Labels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result (applied, refused)",
            config_reloads.clone(),
        );
        let config_reload_refused = Gauge::default();
        registry.register(
            "config_reload_refused",
            "1 while the last reload was refused (the files on disk differ from what is running), else 0",
            config_reload_refused.clone(),
        );
        Metrics {
            registry,
            requests,
            forwarded,
            signature_failures,
            fields_encrypted,
            upstream_errors,
            panics,
            tls_handshake_failures,
            latency,
            encryptions_this_key,
            log_lines_dropped,
            upstream_connections_open,
            signatures_not_primary,
            config_reloads,
            config_reload_refused,
        }
    }

    /// A request accepted with the secondary token or a shared key.
    pub fn signature_not_primary(&self, key: &'static str) {
        self.signatures_not_primary
            .get_or_create(&[("key", key)])
            .inc();
    }

    /// A reload, applied or refused.
    pub fn config_reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.config_reloads
            .get_or_create(&[("result", result)])
            .inc();
        self.config_reload_refused.set(i64::from(!applied));
    }

    pub fn request(&self, outcome: &'static str, latency_seconds: f64) {
        if outcome == FORWARDED {
            self.forwarded.inc_by(1);
        } else {
            self.requests
                .get_or_create(&[("outcome", outcome)])
                .inc_by(1);
        }
        self.latency.observe(latency_seconds);
    }

    /// A request whose head hyper refused (it answered 400, 414 or 431
    /// itself, before the pipeline ran): counted under `outcome`, with no
    /// latency.
    pub fn refused_head(&self, outcome: &'static str) {
        self.requests
            .get_or_create(&[("outcome", outcome)])
            .inc_by(1);
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

    /// Prometheus text format, with the gauges sampled now.
    pub fn render(&self, now: Sampled) -> String {
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.encryptions_this_key.set(gauge(now.encryptions));
        self.log_lines_dropped.set(gauge(now.dropped_log_lines));
        self.upstream_connections_open
            .set(gauge(now.upstream_connections_open));
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The gauges' values, read when `/metrics` is rendered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sampled {
    /// Values encrypted with the current key.
    pub encryptions: u64,
    pub dropped_log_lines: u64,
    pub upstream_connections_open: u64,
}

/// Shards per sharded metric: workers beyond this share shards (still
/// without locks, only with cache-line traffic).
const SHARDS: usize = 8;

/// One worker's part of a metric, alone on its cache lines.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Shard<T>(T);

/// The calling worker's shard.
fn shard<T>(shards: &[Shard<T>; SHARDS]) -> &T {
    &shards[crate::worker::index() % SHARDS].0
}

/// A counter each worker adds to on its own shard.
#[derive(Clone, Debug, Default)]
struct ShardedCounter(Arc<[Shard<AtomicU64>; SHARDS]>);

impl ShardedCounter {
    fn inc_by(&self, v: u64) {
        shard(&self.0).fetch_add(v, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<(), _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Upper bounds of the latency buckets, in seconds: 0.25 ms doubling to
/// about 8.2 s (the same buckets as before sharding), then +Inf.
const LATENCY_BOUNDS: [f64; 16] = {
    let mut bounds = [0.000_25; 16];
    let mut i = 1;
    while i < bounds.len() {
        bounds[i] = bounds[i - 1] * 2.0;
        i += 1;
    }
    bounds
};

/// One worker's counts: per bucket (the last is +Inf; the total count is
/// their sum) and the sum in nanoseconds (an integer, so it can be added
/// atomically).
#[derive(Debug, Default)]
struct LatencyCounts {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

/// The request latency histogram, sharded like [`ShardedCounter`].
#[derive(Clone, Debug, Default)]
struct LatencyHistogram(Arc<[Shard<LatencyCounts>; SHARDS]>);

impl LatencyHistogram {
    fn observe(&self, seconds: f64) {
        let counts = shard(&self.0);
        let bucket = LATENCY_BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BOUNDS.len());
        if let Some(b) = counts.buckets.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        // Saturating float-to-int conversion: a negative or NaN latency adds 0.
        let nanos = (seconds * 1e9) as u64;
        counts.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let total = |pick: &dyn Fn(&LatencyCounts) -> &AtomicU64| -> u64 {
            self.0
                .iter()
                .map(|s| pick(&s.0).load(Ordering::Relaxed))
                .sum()
        };
        // Per bucket, not cumulative: the encoder accumulates.
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain([f64::MAX])
            .enumerate()
            .map(|(i, bound)| {
                let n =
                    total(&|c: &LatencyCounts| c.buckets.get(i).expect("one per bound and +Inf"));
                (bound, n)
            })
            .collect();
        // The count is the buckets' sum, so a scrape never shows count != +Inf.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = total(&|c| &c.sum_nanos) as f64 / 1e9;
        encoder.encode_histogram::<()>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
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
        let text = m.render(Sampled {
            encryptions: 7,
            upstream_connections_open: 3,
            ..Sampled::default()
        });
        assert!(
            text.contains(r#"ivrguard_requests_total{outcome="forwarded"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"ivrguard_signature_failures_total{reason="mismatch"} 1"#));
        assert!(text.contains("ivrguard_fields_encrypted_total 3"));
        assert!(text.contains(r#"ivrguard_upstream_errors_total{kind="connect"} 1"#));
        assert!(text.contains(r#"ivrguard_tls_handshake_failures_total{reason="timeout"} 1"#));
        assert!(text.contains("ivrguard_encryptions_current_key 7"));
        assert!(text.contains("ivrguard_upstream_connections_open 3"));
        assert!(text.contains("ivrguard_request_duration_seconds_bucket"));
    }

    /// The sharded histogram renders what prometheus-client's own
    /// `Histogram` renders for the same observations, spread over workers.
    #[test]
    fn sharded_histogram_renders_like_prometheus_clients() {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        let observations = [
            0.0,
            0.000_1,
            0.000_25,
            0.000_250_1,
            0.001,
            0.003,
            0.5,
            8.192,
            9.0,
            1e6,
        ];
        let reference = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        let ours = LatencyHistogram::default();
        std::thread::scope(|scope| {
            for (worker, chunk) in observations.chunks(3).enumerate() {
                let ours = ours.clone();
                scope.spawn(move || {
                    crate::worker::set_index(worker * 5); // 0, 5, 10 (shares shard 2), 15
                    chunk.iter().for_each(|v| ours.observe(*v));
                });
            }
        });
        observations.iter().for_each(|v| reference.observe(*v));
        let render = |metric: Box<dyn FnOnce(&mut Registry)>| {
            let mut registry = Registry::default();
            metric(&mut registry);
            let mut out = String::new();
            encode(&mut out, &registry).unwrap();
            out
        };
        let ours = render(Box::new(move |r| r.register("lat", "h", ours)));
        let reference = render(Box::new(move |r| r.register("lat", "h", reference)));
        let lines = |text: &str, skip_sum: bool| -> Vec<String> {
            text.lines()
                .filter(|l| !(skip_sum && l.starts_with("lat_sum")))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(lines(&ours, true), lines(&reference, true));
        assert!(ours.contains("lat_count 10"), "{ours}");
        let sum = |text: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with("lat_sum")).unwrap();
            line.split(' ').nth(1).unwrap().parse().unwrap()
        };
        assert!((sum(&ours) - sum(&reference)).abs() < 1e-6, "{ours}");
    }

    #[test]
    fn sharded_counters_sum_every_worker() {
        let m = Metrics::new();
        std::thread::scope(|scope| {
            for worker in 0..12 {
                let m = &m;
                scope.spawn(move || {
                    crate::worker::set_index(worker);
                    for _ in 0..100 {
                        m.request("forwarded", 0.001);
                    }
                    m.request("mismatch", 0.001);
                    m.fields_encrypted(2);
                });
            }
        });
        let text = m.render(Sampled::default());
        assert!(
            text.contains(r#"ivrguard_requests_total{outcome="forwarded"} 1200"#),
            "{text}"
        );
        assert!(
            text.contains(r#"ivrguard_requests_total{outcome="mismatch"} 12"#),
            "{text}"
        );
        assert!(
            text.contains("ivrguard_fields_encrypted_total 24"),
            "{text}"
        );
        assert!(
            text.contains("ivrguard_request_duration_seconds_count 1212"),
            "{text}"
        );
    }
}
