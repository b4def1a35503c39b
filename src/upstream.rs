//! The application behind ivrguard: the requests to it, their timeouts,
//! and what the caller hears when the application fails. The connections
//! are pooled per worker ([`crate::upstream_pool`]) and counted across
//! workers ([`crate::upstream_connections`]).
//!
//! Pool settings answer two traps (notes/perf-reliability §0.5): there is
//! no connect timeout unless set, and hyper-util's default 90 s pool idle
//! time outlives a Node app's 5 s keep-alive, so a reused connection can be
//! closed under us. The idle time here defaults to 4 s.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::body::{self, ProxyBody};
use crate::config::{OnUpstreamError, UpstreamSettings};
use crate::resolve::Resolver;
use crate::upstream_connections::{Busy, Connections};
use crate::upstream_pool::{Attempt, Lent, Pool};

/// How the upstream failed. Fixed labels; no upstream bytes.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    #[error("could not connect")]
    Connect,
    #[error("no response within the upstream timeout")]
    Timeout,
    #[error("connection failed before a response")]
    Failed,
}

impl UpstreamError {
    /// Every kind (the metric's label values).
    pub const ALL: [UpstreamError; 3] = [
        UpstreamError::Connect,
        UpstreamError::Timeout,
        UpstreamError::Failed,
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamError::Connect => "upstream_connect_error",
            UpstreamError::Timeout => "upstream_timeout",
            UpstreamError::Failed => "upstream_error",
        }
    }

    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Failed => "failed",
        }
    }
}

/// What the caller gets when the upstream fails.
#[derive(Debug, Clone)]
pub struct Fallback {
    on_error: OnUpstreamError,
    twiml: Bytes,
}

impl Fallback {
    pub fn new(on_error: OnUpstreamError, twiml: &str) -> Self {
        Fallback {
            on_error,
            twiml: Bytes::copy_from_slice(twiml.as_bytes()),
        }
    }

    /// 200 `text/xml` TwiML, or 502/504, per `upstream.on_error`.
    pub fn response(&self, error: UpstreamError) -> Response<ProxyBody> {
        match error {
            UpstreamError::Timeout => {
                self.twiml_or(StatusCode::GATEWAY_TIMEOUT, "Gateway Timeout\n")
            }
            UpstreamError::Connect | UpstreamError::Failed => {
                self.twiml_or(StatusCode::BAD_GATEWAY, "Bad Gateway\n")
            }
        }
    }

    /// 200 `text/xml` TwiML with `upstream.on_error = "twiml"` (the caller
    /// hears it), else `status` with `text`.
    pub fn twiml_or(&self, status: StatusCode, text: &'static str) -> Response<ProxyBody> {
        match self.on_error {
            OnUpstreamError::Twiml => {
                let mut response = Response::new(body::full(self.twiml.clone()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/xml; charset=utf-8"),
                );
                response
            }
            OnUpstreamError::Status => crate::rejection::plain(status, text),
        }
    }
}

/// The app's connections and where requests go.
pub struct Upstream {
    /// One pool per worker thread ([`crate::worker`]): a worker's requests
    /// use connections whose tasks run on that worker, unless
    /// [`Connections::pick`] sends them where an idle one is.
    pools: Vec<Arc<Pool>>,
    /// The connections open to the app, at most `upstream.max_connections`
    /// across all the pools.
    connections: Arc<Connections>,
    /// The app URL's path prefix (`""` for none), put in front of every
    /// request target.
    prefix: String,
    /// The app's authority, the `Host` of a request that has none.
    host: Option<HeaderValue>,
    timeout: Duration,
    /// How long a request keeps trying to get a connection when new ones
    /// fail (`upstream.connect_timeout_ms`).
    connect_timeout: Duration,
    /// One permit per request in flight to the app (`upstream.max_connections`,
    /// as many as there are connection slots). The slots alone would bound
    /// connections, but a burst would then queue for slots, each request
    /// with a pool picked before any of them waited. Here they wait in
    /// turn, and a request picks its pool when it can be sent.
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("host", &self.host)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Upstream {
    /// `workers` pools (at least one); `max_connections` bounds all of them
    /// together, both requests in flight and open connections.
    pub fn new(settings: &UpstreamSettings, workers: usize) -> Self {
        let connections = Connections::new(settings.max_connections, workers, settings.timeout);
        // `http://authority`, validated with the config.
        let app: http::Uri = settings
            .scheme_authority
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("http://invalid."));
        let pool = |worker| {
            // Host names go through our resolver, not getaddrinfo: see resolve.rs.
            let mut connector = HttpConnector::new_with_resolver(Resolver::new());
            connector.set_connect_timeout(Some(settings.connect_timeout));
            connector.set_nodelay(true);
            connector.enforce_http(true);
            Pool::new(
                connections.connector(worker, connector, app.clone(), settings.connect_timeout),
                settings.pool_idle_timeout,
                settings.pool_max_idle_per_host,
            )
        };
        Upstream {
            pools: (0..workers.max(1)).map(pool).collect(),
            host: app
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
            connections,
            prefix: settings.path_prefix.clone(),
            timeout: settings.timeout,
            connect_timeout: settings.connect_timeout,
            in_flight: Arc::new(Semaphore::new(settings.max_connections)),
        }
    }

    /// Connections open to the app now, idle ones included.
    pub fn connections_open(&self) -> usize {
        self.connections.open()
    }

    /// The app's authority, as a `Host` value.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// The request target (origin form) at the app for a request's path
    /// and query.
    pub fn uri_for(&self, path_and_query: &str) -> Result<http::Uri, http::Error> {
        let mut s = String::with_capacity(self.prefix.len() + path_and_query.len());
        s.push_str(&self.prefix);
        s.push_str(path_and_query);
        Ok(http::Uri::try_from(s)?)
    }

    /// [`Upstream::uri_for`] a request target as hyper parsed it: without
    /// a prefix, the same (a reference count, not a new string and parse).
    pub fn uri_reusing(&self, target: &PathAndQuery) -> Result<http::Uri, http::Error> {
        if !self.prefix.is_empty() {
            return self.uri_for(target.as_str());
        }
        Ok(http::Uri::from(target.clone()))
    }

    /// Sends `request` and waits for the response head within the timeout,
    /// which includes waiting for a free slot when `max_connections`
    /// requests are in flight. The returned [`InFlight`] holds that slot:
    /// keep it until the response body has been read, since the connection
    /// is busy until then.
    pub fn send(
        &self,
        mut request: Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<(Response<Incoming>, InFlight), UpstreamError>> + Send + '_
    {
        // Not an `async fn`: that would hold the request three times over
        // while it waits (as received, as its local, in `exchange`).
        let exchange = async move {
            let permit = self
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            // When a new connection fails, nothing was sent: the request
            // waits for one of the pool's to turn idle, or tries to connect
            // again, for up to `upstream.connect_timeout_ms` in all. An app
            // restarting (its listener closed while its open connections
            // finish, or not up yet) costs the caller a pause, not the
            // fallback (found in review).
            let started = Instant::now();
            let mut refused = false;
            loop {
                let worker = self.connections.pick(crate::worker::index(), refused);
                let busy = self.connections.busy(worker);
                match self.pools[worker].send(request).await {
                    Attempt::Sent(response, lent) => {
                        return Ok((response, InFlight(lent, busy, permit)))
                    }
                    Attempt::Unsent(unsent) => request = unsent,
                    Attempt::NotConnected(unsent) => {
                        let left = self.connect_timeout.saturating_sub(started.elapsed());
                        if left.is_zero() {
                            return Err(UpstreamError::Connect);
                        }
                        let pause = left.min(CONNECT_RETRY_PAUSE);
                        self.connections.idle_again_within(pause).await;
                        (request, refused) = (unsent, true);
                    }
                    Attempt::Failed(e) => return Err(e),
                }
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .map(|result| result.unwrap_or(Err(UpstreamError::Timeout)))
    }
}

/// A request's connection, its count on the pool it went through, and its
/// slot among `upstream.max_connections`; freed on drop, in that order: a
/// request that gets the slot next must find the connection idle in its
/// pool, and counted so.
#[derive(Debug)]
pub struct InFlight(
    #[allow(dead_code)] Lent,
    #[allow(dead_code)] Busy,
    #[allow(dead_code)] OwnedSemaphorePermit,
);

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1). A
/// `static`: a `const` array of `HeaderName`s is built and dropped again at
/// every use.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, not nine lookups.
    let any = headers
        .keys()
        .any(|name| name == header::UPGRADE || HOP_BY_HOP.contains(name));
    if !any {
        return;
    }
    // Only the names present and not removed below anyway: for the
    // `Connection: keep-alive` or `close` of nearly every message, nothing
    // is collected, so nothing is allocated (a `HeaderName` of its own and
    // the vector, on every response from an app that keeps connections).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| {
            headers.contains_key(*name)
                && !HOP_BY_HOP
                    .iter()
                    .any(|hop| hop.as_str().eq_ignore_ascii_case(name))
        })
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Joins the `Cookie` fields of an HTTP/2 request, which may carry one per
/// cookie (RFC 9113 §8.2.3), into the one field HTTP/1.1 allows (RFC 6265
/// §5.4), in their order and with `"; "` between them, as RFC 9113 says a
/// proxy must: an app that reads the first `Cookie` line only would lose
/// the rest of the call's session.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    // Valid header values joined by "; " are one; kept as they were if not.
    if let Ok(joined) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, joined);
    }
}

/// How long a request whose new connection failed waits before trying
/// again, unless a connection turns idle first.
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(100);

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets `X-Forwarded-For/-Proto/-Host` for the application. `proto` and
/// `host` come ready-made (the fixed public URL's are built once).
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: SocketAddr,
    proto: Option<HeaderValue>,
    host: Option<HeaderValue>,
    keep_chain: bool,
) {
    let peer_ip = crate::access_log::ip_text(peer.ip());
    // Looked up only when the chain is kept (a trusted proxy in front).
    let prior = keep_chain
        .then(|| headers.get(&X_FORWARDED_FOR))
        .flatten()
        .and_then(|v| v.to_str().ok());
    let chain = match prior {
        Some(prior) => format!("{prior}, {peer_ip}"),
        None => peer_ip,
    };
    if let Ok(v) = HeaderValue::try_from(chain) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if let Some(v) = proto {
        headers.insert(X_FORWARDED_PROTO, v);
    }
    if let Some(v) = host {
        headers.insert(X_FORWARDED_HOST, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ALL` (the metric's label values, created at zero) names each kind
    /// once: the `match` has no `_` arm, so a new one must be named here.
    #[test]
    fn all_lists_every_kind_once() {
        let index = |e: &UpstreamError| match e {
            UpstreamError::Connect => 0,
            UpstreamError::Timeout => 1,
            UpstreamError::Failed => 2,
        };
        let listed: Vec<usize> = UpstreamError::ALL.iter().map(index).collect();
        assert_eq!(listed, [0, 1, 2]);
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("close , x-other"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("2"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-twilio-signature", HeaderValue::from_static("abc"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-twilio-signature"));
    }

    #[test]
    fn forwarded_for_chain_only_when_trusted() {
        let peer: SocketAddr = "10.0.0.7:5555".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        let values = || {
            (
                Some(HeaderValue::from_static("https")),
                Some(HeaderValue::from_static("ivr.example.com")),
            )
        };
        let (proto, host) = values();
        set_forwarded(&mut h, peer, proto, host, false);
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "ivr.example.com");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        let (proto, host) = values();
        set_forwarded(&mut h, peer, proto, host, true);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.7");
    }
}
