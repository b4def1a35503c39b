//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! Labels come only from fixed allow-lists (`outcome`, `reason`, `kind`):
//! never a path, a parameter, a header or any other request data. Every
//! value of every list is there, at zero, from the start: a series that
//! appeared with its first increment was invisible to `increase()` and
//! `rate()`, so the first outage after a restart raised no alert (found in
//! review).
//!
//! Two text formats, as the scraper asks (`Accept`): OpenMetrics 1.0 for
//! Prometheus (which asks for it), else the Prometheus text format 0.0.4,
//! whose counters are declared under their `_total` name (the OpenMetrics
//! body sent as 0.0.4, as before, declared `ivrguard_requests` and sampled
//! `ivrguard_requests_total`: promtool failed it, and Prometheus' metadata
//! lost the counters' type).
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
pub const FORWARDED: &str = "forwarded";
/// The app answered 401 or 403 to a request ivrguard verified and re-signed.
pub const APP_REFUSED: &str = "app_refused";
/// Outcomes of a request head hyper refused itself (400 or 431, 414).
pub const HEAD_TOO_LARGE: &str = "head_too_large";
pub const MALFORMED_HEAD: &str = "malformed_head";
/// Outcomes of a request the pipeline never answered (its access line
/// says the same): an HTTP/2 client reset its stream or the drain timeout
/// cut it, or its handler panicked (the server answered 500).
pub const UNANSWERED: &str = "unanswered";
pub const PANIC: &str = "panic";
/// The `kind` of an app that did not answer within the request deadline.
pub const DEADLINE: &str = "deadline";
/// The `kind` of an app's response that broke off after its head.
pub const RESPONSE_BODY: &str = "response_body";
/// The `class` label of the app's answers.
const STATUS_CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// The two text formats `/metrics` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (`application/openmetrics-text`), what Prometheus
    /// asks for.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain`), for every other
    /// scraper and for people.
    Text,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn accepted(accept: Option<&[u8]>) -> Format {
        const OPENMETRICS: &[u8] = b"application/openmetrics-text";
        // A media range naming it, without `q=0` (which refuses it).
        let asks = |range: &[u8]| {
            let mut params = range.split(|&b| b == b';').map(<[u8]>::trim_ascii);
            params
                .next()
                .is_some_and(|media| media.eq_ignore_ascii_case(OPENMETRICS))
                && !params.any(|p| {
                    p.strip_prefix(b"q=")
                        .is_some_and(|q| q.iter().all(|&b| b == b'0' || b == b'.'))
                })
        };
        match accept {
            Some(accept) if accept.split(|&b| b == b',').any(asks) => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

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
    log_lines_dropped: Counter,
    upstream_connections_open: Gauge,
    connections_open: Gauge,
    connections_max: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    connections_refused: Counter,
    signatures_not_primary: Family<Labels, Counter>,
    config_reloads: Family<Labels, Counter>,
    config_reload_refused: Gauge,
    /// Per class of [`STATUS_CLASSES`], resolved once: every forwarded
    /// request adds to one.
    upstream_responses: [ShardedCounter; 4],
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
        let requests: Family<Labels, ShardedCounter> =
            registered(&mut registry, "requests", "Requests by outcome");
        let forwarded = requests.get_or_create(&[("outcome", FORWARDED)]).clone();
        let signature_failures: Family<Labels, Counter> = registered(
            &mut registry,
            "signature_failures",
            "Requests refused by signature verification, by reason",
        );
        let fields_encrypted: ShardedCounter = registered(
            &mut registry,
            "fields_encrypted",
            "Parameter values encrypted",
        );
        let upstream_errors: Family<Labels, Counter> = registered(
            &mut registry,
            "upstream_errors",
            "Upstream failures, by kind",
        );
        let panics: Counter = registered(
            &mut registry,
            "panics",
            "Requests that panicked (answered 500)",
        );
        let tls_handshake_failures: Family<Labels, Counter> = registered(
            &mut registry,
            "tls_handshake_failures",
            "TLS handshakes on the listener that failed, by reason",
        );
        let latency: LatencyHistogram = registered(
            &mut registry,
            "request_duration_seconds",
            "Time from request head to response head",
        );
        let encryptions_this_key: Gauge = registered(
            &mut registry,
            "encryptions_current_key",
            "Values encrypted with the current key since start-up (NIST SP 800-38D bound: 2^32 per key)",
        );
        // A counter: the number only grows, and `rate()` and `increase()`
        // treat a counter's restart from zero as a reset (a gauge's drop
        // would read as a negative rate).
        let log_lines_dropped: Counter = registered(
            &mut registry,
            "log_lines_dropped",
            "Log lines dropped because stdout could not keep up",
        );
        let upstream_connections_open: Gauge = registered(
            &mut registry,
            "upstream_connections_open",
            "Connections open to the app, idle ones included (at most upstream.max_connections)",
        );
        let connections_open: Gauge = registered(
            &mut registry,
            "connections_open",
            "Callers' connections open, idle keep-alive ones included (at most connections_max: \
             past it, new ones wait in the kernel's backlog)",
        );
        let connections_max: Gauge = registered(
            &mut registry,
            "connections_max",
            "server.max_connections: callers' connections served at once",
        );
        let open_fds: Gauge = registered(
            &mut registry,
            "open_fds",
            "File descriptors the process has open (connections, the app's, files); other \
             users cannot list /proc/<pid>/fd: ivrguard is non-dumpable",
        );
        let max_fds: Gauge = registered(
            &mut registry,
            "max_fds",
            "The process's limit on open file descriptors (RLIMIT_NOFILE, soft)",
        );
        let connections_refused: Counter = registered(
            &mut registry,
            "connections_refused",
            "Connections closed on arrival: their peer held server.max_connections_per_client",
        );
        let signatures_not_primary: Family::<Labels, Counter> = registered(
            &mut registry,
            "signatures_not_primary",
            "Requests whose signature matched a key other than the primary auth token (key: secondary, shared_key); \
             during a token rotation, how much is still signed with the token being replaced",
        );
        let config_reloads: Family<Labels, Counter> = registered(
            &mut registry,
            "config_reloads",
            "Configuration reloads, by result (applied, refused)",
        );
        let config_reload_refused: Gauge = registered(
            &mut registry,
            "config_reload_refused",
            "1 while the last reload was refused (the files on disk differ from what is running), else 0",
        );
        let responses: Family<Labels, ShardedCounter> = registered(
            &mut registry,
            "upstream_responses",
            "Responses from the app, by status class (class: 2xx, 3xx, 4xx, 5xx)",
        );

        // Every label value, at zero (see the module's documentation).
        let outcomes = crate::rejection::Rejection::all()
            .map(|r| r.reason())
            .chain([FORWARDED, APP_REFUSED, HEAD_TOO_LARGE, MALFORMED_HEAD])
            .chain([UNANSWERED, PANIC]);
        create_each(&requests, "outcome", outcomes);
        let reasons = crate::signature::SignatureError::ALL.map(|e| e.reason());
        create_each(&signature_failures, "reason", reasons);
        let kinds = crate::upstream::UpstreamError::ALL.map(|e| e.kind());
        create_each(
            &upstream_errors,
            "kind",
            kinds.into_iter().chain([DEADLINE, RESPONSE_BODY]),
        );
        let failures = crate::tls::HandshakeFailure::ALL.map(|f| f.reason());
        create_each(&tls_handshake_failures, "reason", failures);
        create_each(&signatures_not_primary, "key", ["secondary", "shared_key"]);
        create_each(&config_reloads, "result", ["applied", "refused"]);
        let upstream_responses =
            STATUS_CLASSES.map(|class| responses.get_or_create(&[("class", class)]).clone());
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
            connections_open,
            connections_max,
            open_fds,
            max_fds,
            connections_refused,
            signatures_not_primary,
            config_reloads,
            config_reload_refused,
            upstream_responses,
        }
    }

    /// An answer from the app (any status it may send, 200 to 599).
    pub fn upstream_response(&self, status: u16) {
        let class = match status {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            _ => 3,
        };
        self.upstream_responses[class].inc_by(1);
    }

    /// A connection closed on arrival (`server.max_connections_per_client`).
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
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

    /// A request the pipeline never answered: [`PANIC`] if it ended in a
    /// panic, else [`UNANSWERED`]. With no latency: there was no answer
    /// to time.
    pub fn unanswered(&self, panicked: bool) {
        let outcome = if panicked { PANIC } else { UNANSWERED };
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

    /// The Prometheus text format 0.0.4, with the gauges sampled now.
    pub fn render(&self, now: Sampled) -> String {
        self.render_as(now, Format::Text)
    }

    /// `format`, with the gauges sampled now.
    pub fn render_as(&self, now: Sampled, format: Format) -> String {
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.encryptions_this_key.set(gauge(now.encryptions));
        // The queue's own count, never lower than the last one read (two
        // scrapes at once may read it in either order).
        self.log_lines_dropped
            .inner()
            .fetch_max(now.dropped_log_lines, Ordering::Relaxed);
        self.upstream_connections_open
            .set(gauge(now.upstream_connections_open));
        self.connections_open.set(gauge(now.connections_open));
        self.connections_max.set(gauge(now.connections_max));
        self.open_fds.set(gauge(now.open_fds));
        self.max_fds.set(gauge(now.max_fds));
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        match format {
            Format::OpenMetrics => out,
            Format::Text => text_format(&out),
        }
    }
}

/// A new metric registered as `ivrguard_<name>`, with its help text.
fn registered<M>(registry: &mut Registry, name: &str, help: &str) -> M
where
    M: prometheus_client::registry::Metric + Default + Clone,
{
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

/// The series of each of `values` of `label` in `family`, at zero.
fn create_each<M, I>(family: &Family<Labels, M>, label: &'static str, values: I)
where
    M: EncodeMetric + TypedMetric + Default,
    I: IntoIterator<Item = &'static str>,
{
    for value in values {
        drop(family.get_or_create(&[(label, value)]));
    }
}

/// prometheus-client's OpenMetrics text as the Prometheus text format
/// 0.0.4: a counter's `# HELP`/`# TYPE` name its samples' `_total` name, and
/// the OpenMetrics-only `# UNIT` and `# EOF` lines are left out. Nothing
/// else differs for the metrics here (no exemplars, no `_created`).
fn text_format(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let declared = ["# HELP ", "# TYPE "].into_iter().find_map(|intro| {
            let rest = line.strip_prefix(intro)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(&name).then_some((intro, name, tail))
        });
        match declared {
            Some((intro, name, tail)) => {
                out.push_str(intro);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The gauges' values, read when `/metrics` is rendered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sampled {
    /// Values encrypted with the current key.
    pub encryptions: u64,
    pub dropped_log_lines: u64,
    pub upstream_connections_open: u64,
    /// Callers' connections open, and the most that may be.
    pub connections_open: u64,
    pub connections_max: u64,
    /// This process's open file descriptors and their limit
    /// ([`Sampled::fds`]).
    pub open_fds: u64,
    pub max_fds: u64,
}

impl Sampled {
    /// This process's open file descriptors (`/proc/self/fd`, without the
    /// one listing it; 0 where there is none) and its soft limit on them.
    pub fn fds() -> (u64, u64) {
        let open =
            std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count().saturating_sub(1));
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        (open as u64, limit.current.unwrap_or(u64::MAX))
    }
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
/// about 8.2 s, then 10, 12, 14 and 15 s, then +Inf. The last ones hold the
/// requests that wait for the app's timeout (10 s by default), the request
/// deadline (14 s) and Twilio's own 15 s: with 8.2 s the top bound, the
/// 99th percentile of a slow app read 8.192 s (found in review).
const LATENCY_BOUNDS: [f64; 20] = {
    let mut bounds = [0.000_25; 20];
    let mut i = 1;
    while i < 16 {
        bounds[i] = bounds[i - 1] * 2.0;
        i += 1;
    }
    bounds[16] = 10.0;
    bounds[17] = 12.0;
    bounds[18] = 14.0;
    bounds[19] = 15.0;
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
            connections_open: 5,
            connections_max: 4096,
            open_fds: 17,
            max_fds: 1024,
            ..Sampled::default()
        });
        assert!(text.contains("ivrguard_open_fds 17\n"), "{text}");
        assert!(text.contains("ivrguard_max_fds 1024\n"), "{text}");
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
        assert!(text.contains("ivrguard_connections_open 5\n"));
        assert!(text.contains("ivrguard_connections_max 4096\n"));
        assert!(text.contains("ivrguard_request_duration_seconds_bucket"));
    }

    /// Dropped log lines are a counter (`rate()` works on it) that shows the
    /// queue's count and never goes back, whatever order scrapes read it in.
    #[test]
    fn dropped_log_lines_are_a_counter_that_never_goes_back() {
        let m = Metrics::new();
        let render = |dropped_log_lines, format| {
            let now = Sampled {
                dropped_log_lines,
                ..Sampled::default()
            };
            m.render_as(now, format)
        };
        // (The count, the format, the lines it must have.) The last scrape
        // read the count before the one above rendered it.
        for (count, format, lines) in [
            (
                0,
                Format::Text,
                [
                    "# TYPE ivrguard_log_lines_dropped_total counter",
                    "ivrguard_log_lines_dropped_total 0",
                ],
            ),
            (
                42,
                Format::OpenMetrics,
                [
                    "# TYPE ivrguard_log_lines_dropped counter",
                    "ivrguard_log_lines_dropped_total 42",
                ],
            ),
            (
                40,
                Format::Text,
                [
                    "# TYPE ivrguard_log_lines_dropped_total counter",
                    "ivrguard_log_lines_dropped_total 42",
                ],
            ),
        ] {
            let text = render(count, format);
            for line in lines {
                assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
            }
        }
    }

    /// Every label value is a series from the start, at zero, so the first
    /// increment is an increase Prometheus sees.
    #[test]
    fn every_label_value_is_a_series_at_zero_from_the_start() {
        let text = Metrics::new().render(Sampled::default());
        for series in [
            r#"ivrguard_requests_total{outcome="forwarded"} 0"#,
            r#"ivrguard_requests_total{outcome="upstream_connect_error"} 0"#,
            r#"ivrguard_requests_total{outcome="mismatch"} 0"#,
            r#"ivrguard_requests_total{outcome="app_refused"} 0"#,
            r#"ivrguard_requests_total{outcome="malformed_head"} 0"#,
            r#"ivrguard_requests_total{outcome="unanswered"} 0"#,
            r#"ivrguard_requests_total{outcome="panic"} 0"#,
            r#"ivrguard_signature_failures_total{reason="body_hash_mismatch"} 0"#,
            r#"ivrguard_upstream_errors_total{kind="deadline"} 0"#,
            r#"ivrguard_tls_handshake_failures_total{reason="peer_alert"} 0"#,
            r#"ivrguard_signatures_not_primary_total{key="shared_key"} 0"#,
            r#"ivrguard_config_reloads_total{result="refused"} 0"#,
            r#"ivrguard_upstream_responses_total{class="5xx"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == series), "no {series} in\n{text}");
        }
        let outcomes = text
            .lines()
            .filter(|l| l.starts_with("ivrguard_requests_total{"))
            .count();
        assert_eq!(outcomes, crate::rejection::Rejection::all().count() + 6);
    }

    #[test]
    fn text_format_declares_counters_by_their_sample_name() {
        let m = Metrics::new();
        m.upstream_response(503);
        let text = m.render_as(Sampled::default(), Format::Text);
        assert!(
            text.contains("# HELP ivrguard_requests_total Requests by outcome"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE ivrguard_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE ivrguard_panics_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE ivrguard_request_duration_seconds histogram\n"));
        assert!(text.contains("# TYPE ivrguard_upstream_connections_open gauge\n"));
        assert!(text.contains(r#"ivrguard_upstream_responses_total{class="5xx"} 1"#));
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        let open = m.render_as(Sampled::default(), Format::OpenMetrics);
        assert!(
            open.contains("# TYPE ivrguard_requests counter\n"),
            "{open}"
        );
        assert!(open.ends_with("# EOF\n"), "{open}");
        // The samples are the same.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&text), samples(&open));
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        let asked = |accept: &str| Format::accepted(Some(accept.as_bytes()));
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(asked(prometheus), Format::OpenMetrics);
        assert_eq!(asked("Application/OpenMetrics-Text"), Format::OpenMetrics);
        assert_eq!(asked("text/plain"), Format::Text);
        assert_eq!(
            asked("application/openmetrics-text;q=0, text/plain"),
            Format::Text
        );
        assert_eq!(
            asked("text/plain, application/openmetrics-text; q=0.0"),
            Format::Text
        );
        assert_eq!(
            asked("application/openmetrics-text;q=0.5"),
            Format::OpenMetrics
        );
        assert_eq!(asked("*/*"), Format::Text);
        assert_eq!(Format::accepted(None), Format::Text);
    }

    /// The sharded histogram renders what prometheus-client's own
    /// `Histogram` renders for the same observations, spread over workers.
    #[test]
    fn sharded_histogram_renders_like_prometheus_clients() {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        let bounds: Vec<f64> = exponential_buckets(0.000_25, 2.0, 16)
            .chain([10.0, 12.0, 14.0, 15.0])
            .collect();
        assert_eq!(bounds, LATENCY_BOUNDS);
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
            12.5,
            14.99,
            15.0,
            1e6,
        ];
        let reference = Histogram::new(bounds.into_iter());
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
        assert!(ours.contains("lat_count 13"), "{ours}");
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
