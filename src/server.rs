//! Listeners and connection lifecycle: accept under a connection limit,
//! serve HTTP/1.1 (and HTTP/2, when `server.http2` is on) with header-read
//! timeouts, catch panics at the service boundary, drain on SIGTERM/SIGINT.
//!
//! hyper's `header_read_timeout` does nothing without a timer, so both
//! protocol builders get `TokioTimer`. For HTTP/1 the same timeout also ends
//! idle keep-alive connections: it restarts whenever hyper waits for the next
//! request head.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::body::ProxyBody;
use crate::config::ServerSettings;
use crate::drain::{self, Drain, Streams};
use crate::pipeline::Proxy;
use crate::reload::SharedProxy;
use crate::tls;
use crate::write_stall::WriteStallLimit;

/// Shared readiness: true once listening, false as soon as draining starts.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// More request headers than this: 431. (hyper's default, made explicit.)
pub const MAX_HEADERS: usize = 100;
/// The HTTP/1 read buffer, which bounds the request head: a head that does
/// not fit gets 431. Twilio's webhook heads are well under 2 KiB.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Requests in flight on one HTTP/2 connection (`server.http2`).
pub const MAX_HTTP2_STREAMS: u32 = 32;

/// The HTTP connection builders with ivrguard's limits. hyper's own, one
/// per protocol: the protocol is known before a connection is served
/// ([`protocol`] peeks at plain TCP, [`tls::accept`] reads the TLS stream).
///
/// Not hyper-util's auto builder, for three reasons measured here:
/// - it hands hyper the 24 bytes it sniffed as a read of their own, and
///   hyper, wanting 8 KiB free before the next read, doubles the
///   connection's read buffer to 16 KiB for the rest of its life (8 MiB per
///   1,000 connections; valgrind massif);
/// - every connection's task is sized for an HTTP/2 connection (1.5 KiB)
///   even though almost all are HTTP/1 (0.7 KiB);
/// - it cannot set `max_header_size`, so the head limit depended on how the
///   bytes happened to arrive: one read could take in a 100 KiB head whole.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(settings: &ServerSettings) -> Self {
        let mut http1 = http1::Builder::new();
        // `max_headers` stays hyper's default (MAX_HEADERS): setting it at
        // all moves the header array to the heap, one allocation per request.
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_header_size(MAX_HEAD_BYTES)
            .max_buf_size(MAX_HEAD_BYTES)
            // A client that half-closes after its request still gets the
            // answer. Off, hyper reads mid-request to look for that FIN, and
            // the read takes a second 8 KiB buffer for every request in
            // flight (the first is still pinned by the request's headers).
            .half_close(true)
            .writev(false)
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(settings.header_read_timeout))
            .keep_alive_timeout(settings.header_read_timeout)
            // Each stream may hold a whole body before it is verified, so
            // a connection holds at most this many `max_body_bytes`.
            .max_concurrent_streams(MAX_HTTP2_STREAMS)
            .max_header_list_size(MAX_HEAD_BYTES as u32);
        Builders { http1, http2 }
    }
}

/// The callers' connection slots (`server.max_connections`), shared by all
/// workers. A worker takes a slot before it accepts (past the limit, new
/// connections wait in the kernel's backlog), so a slot is held by each
/// connection and by each worker waiting to accept.
///
/// With `server.max_connections_per_client`, also how many each peer
/// address holds: one client alone cannot take every slot (found in
/// review: 5,000 connections from one address that sent nothing, or a body
/// a byte a second, kept Twilio's webhooks waiting seconds, 14 % of them
/// past Twilio's 15 s).
#[derive(Debug)]
pub struct Slots {
    permits: Arc<Semaphore>,
    max: usize,
    /// Slots held by workers waiting to accept, not by connections.
    accepting: AtomicUsize,
    /// The most connections open at once since [`Slots::take_peak`].
    peak: AtomicUsize,
    per_client: Option<usize>,
    clients: Mutex<HashMap<IpAddr, usize>>,
}

/// The client an address stands for: an IPv6 client holds at least a /64
/// (found in review: keyed by the whole address, one IPv6 client could
/// take every slot), and an IPv4-mapped address is its IPv4 one.
fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
        v4 => v4,
    }
}

/// The peer holds `server.max_connections_per_client` connections already.
#[derive(Debug)]
pub struct AtLimit;

/// A connection counted against its peer's `max_connections_per_client`
/// until it is dropped.
pub struct Client {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Drop for Client {
    fn drop(&mut self) {
        let mut clients = self.slots.clients();
        if let Some(open) = clients.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                clients.remove(&self.ip);
            }
        }
    }
}

impl Slots {
    pub fn new(max: usize, per_client: Option<usize>) -> Self {
        Slots {
            permits: Arc::new(Semaphore::new(max)),
            max,
            accepting: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            per_client,
            clients: Default::default(),
        }
    }

    fn clients(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a connection from `ip` against its limit: `Err` if the peer
    /// holds as many as it may; `Ok(None)` without a limit.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Option<Client>, AtLimit> {
        let Some(limit) = self.per_client else {
            return Ok(None);
        };
        let ip = client_of(ip);
        let mut clients = self.clients();
        let open = clients.entry(ip).or_insert(0);
        if *open >= limit {
            return Err(AtLimit);
        }
        *open += 1;
        Ok(Some(Client {
            slots: self.clone(),
            ip,
        }))
    }

    /// Callers' connections open now.
    pub fn open(&self) -> usize {
        let taken = self.max.saturating_sub(self.permits.available_permits());
        taken.saturating_sub(self.accepting.load(Ordering::Relaxed))
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// The most connections open at once since the last call, and those
    /// open now (heap_release.rs).
    pub fn take_peak(&self) -> (usize, usize) {
        let open = self.open();
        (self.peak.swap(open, Ordering::Relaxed).max(open), open)
    }

    /// Notes the connections open now towards [`Slots::take_peak`].
    fn note_peak(&self) {
        self.peak.fetch_max(self.open(), Ordering::Relaxed);
    }

    /// Counts the caller's slot as a worker's until the guard is dropped.
    fn accepting(&self) -> Accepting<'_> {
        self.accepting.fetch_add(1, Ordering::Relaxed);
        Accepting(&self.accepting)
    }
}

struct Accepting<'a>(&'a AtomicUsize);

impl Drop for Accepting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `proxy` on `listener` until `shutdown` resolves, then stops
/// accepting and waits up to `drain_timeout` for in-flight requests.
/// Returns false if the drain timed out. Every connection holds one of
/// `slots` (`server.max_connections`, shared by all workers).
pub async fn serve(
    listener: TcpListener,
    proxy: SharedProxy,
    settings: &ServerSettings,
    readiness: Arc<Readiness>,
    slots: Arc<Slots>,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let builders = Arc::new(Builders::new(settings));
    let drain = Drain::default();
    tokio::pin!(shutdown);
    readiness.set(true);
    loop {
        // Back-pressure: past max_connections, stop accepting until one ends
        // (the kernel backlog holds new ones) instead of collapsing.
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = slots.permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let accepting = slots.accepting();
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // e.g. EMFILE: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        drop(accepting);
        let Ok(client) = slots.admit(peer.ip()) else {
            // Closed at once; its slot serves the next caller.
            refused_per_client(&proxy.load(), peer);
            drop(stream);
            continue;
        };
        slots.note_peak();
        // The connection's slot and its count against its peer: both freed
        // as the connection ends.
        let permit = (permit, client);
        let _ = stream.set_nodelay(true);
        // TLS and the request timeout as they are now (a reload changes
        // them for new connections only). A client that takes none of what
        // we write for a request timeout is gone, or hostile, and its
        // connection ends (write_stall.rs).
        let (tls, write_stall, metrics) = {
            let now = proxy.load();
            let tls = now
                .tls()
                .map(|acceptor| (acceptor.clone(), now.metrics_arc()));
            (tls, now.request_timeout(), now.metrics_arc())
        };
        let proxy = proxy.clone();
        // For HTTP/2's idle limit: what the connection has in flight.
        let streams = Streams::default();
        let counted = streams.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            // A snapshot: a reload does not change a request in flight.
            let proxy = proxy.load_full();
            // Boxed: hyper keeps a slot the size of this future in every
            // connection for its whole life, idle or not; boxed, that memory
            // exists only while a request is in flight.
            counted.count(Box::pin(guarded(proxy, request, peer).map(ok)))
        });
        let builders = builders.clone();
        let watcher = drain.watcher();
        let first_bytes_timeout = settings.header_read_timeout;
        // An HTTP/2 connection with nothing begun or in flight for this long
        // (up to twice it) is shut down (drain.rs); hyper's pings only end
        // one whose peer stops answering.
        let h2_idle = Some((streams, settings.header_read_timeout));
        let http2 = settings.http2;
        tokio::spawn(async move {
            // The bytes that tell HTTP/1 from HTTP/2 get the header-read
            // timeout: a client that connects and sends nothing must not hold
            // a connection slot for ever. (A drain waits for this watcher: at
            // most that timeout.) Client resets and timeouts end the
            // connection's future with an error; they are not ours to report.
            if let Some((acceptor, metrics)) = tls {
                // Boxed: the TLS session and the connection over it take
                // 4.3 KiB, and inline they would size every plain
                // connection's task the same.
                Box::pin(async move {
                    // The handshake and the first bytes, under the same timeout.
                    let accepted =
                        tls::accept(&acceptor, stream, first_bytes_timeout, &metrics).await;
                    match accepted {
                        Some(stream) if stream.is_http2() && !http2 => drop(stream),
                        Some(stream) if stream.is_http2() => {
                            let stream = WriteStallLimit::new(stream, write_stall);
                            let conn = builders
                                .http2
                                .serve_connection(TokioIo::new(stream), service);
                            let _ = drain::serve(
                                conn,
                                |conn| conn.graceful_shutdown(),
                                watcher,
                                h2_idle,
                                write_stall,
                            )
                            .await;
                        }
                        Some(stream) => {
                            let stream = WriteStallLimit::new(stream, write_stall);
                            let conn = builders
                                .http1
                                .serve_connection(TokioIo::new(stream), service);
                            let ended = drain::serve(
                                conn,
                                |conn| conn.graceful_shutdown(),
                                watcher,
                                None,
                                write_stall,
                            )
                            .await;
                            report_refused_head(ended, &metrics, peer);
                        }
                        None => {}
                    }
                })
                .await;
                drop(permit);
                return;
            }
            let known = tokio::time::timeout(first_bytes_timeout, protocol(&stream)).await;
            let stream = WriteStallLimit::new(stream, write_stall);
            match known {
                Ok(Some(Protocol::Http1)) => {
                    let conn = builders
                        .http1
                        .serve_connection(TokioIo::new(stream), service);
                    let ended = drain::serve(
                        conn,
                        |conn| conn.graceful_shutdown(),
                        watcher,
                        None,
                        write_stall,
                    )
                    .await;
                    report_refused_head(ended, &metrics, peer);
                }
                // HTTP/2 is off (`server.http2`): the preface gets no answer.
                Ok(Some(Protocol::Http2)) if !http2 => {}
                Ok(Some(Protocol::Http2)) => {
                    // Boxed, as rare: inline it would size every connection's task.
                    Box::pin(async move {
                        let conn = builders
                            .http2
                            .serve_connection(TokioIo::new(stream), service);
                        let _ = drain::serve(
                            conn,
                            |conn| conn.graceful_shutdown(),
                            watcher,
                            h2_idle,
                            write_stall,
                        )
                        .await;
                    })
                    .await;
                }
                Ok(None) | Err(_) => {}
            }
            drop(permit);
        });
    }
    readiness.set(false);
    drop(listener);
    // One line per worker, each with its own connections.
    let worker = crate::worker::index();
    tracing::info!(worker, in_flight_connections = drain.count(), "draining");
    tokio::time::timeout(settings.drain_timeout, drain.shutdown())
        .await
        .is_ok()
}

/// A connection closed on arrival: its peer holds
/// `server.max_connections_per_client` already.
fn refused_per_client(proxy: &crate::pipeline::Proxy, peer: SocketAddr) {
    proxy.metrics().connection_refused();
    static REFUSED: crate::log_limit::LogLimit =
        crate::log_limit::LogLimit::new(crate::mismatch::EVERY);
    if REFUSED.due() {
        let peer = crate::access_log::ip_text(peer.ip());
        tracing::warn!(
            peer,
            "a client holds server.max_connections_per_client connections: its new ones are \
             closed as they arrive. At most one such line per 10 s; \
             connections_refused_total counts them"
        );
    }
}

/// Logs and counts a request head hyper refused on an HTTP/1 connection:
/// it answered 400 (or 431) itself and the pipeline never ran, so no
/// access line was written for it (found in review). Other ends of a
/// connection (the client left, a timeout) are not requests.
fn report_refused_head(
    ended: Option<Result<(), hyper::Error>>,
    metrics: &crate::metrics::Metrics,
    peer: SocketAddr,
) {
    let Some(Err(error)) = ended else {
        return;
    };
    let reason = if error.is_parse_too_large() {
        crate::metrics::HEAD_TOO_LARGE
    } else if error.is_parse() {
        crate::metrics::MALFORMED_HEAD
    } else {
        return;
    };
    metrics.refused_head(reason);
    // The peer as the access line gives it; nothing of the request.
    let peer = crate::access_log::ip_text(peer.ip());
    tracing::info!(target: "ivrguard::access", reason, peer, "request head refused");
}

/// The protocol a plain-TCP client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// With prior knowledge: the connection opens with the HTTP/2 preface.
    Http2,
}

/// Waits, without consuming anything, until the client has sent enough to
/// tell HTTP/1 from the HTTP/2 preface: a byte that differs from it, or all
/// of it. `None` if the connection ends first.
async fn protocol(stream: &tokio::net::TcpStream) -> Option<Protocol> {
    const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    loop {
        match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) if buf[..n] != H2_PREFACE[..n] => return Some(Protocol::Http1),
            Ok(n) if n == buf.len() => return Some(Protocol::Http2),
            // A prefix of the preface: peek returns at once while those
            // bytes sit unread, so wait a little before looking again.
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Runs the pipeline; a panic becomes a 500 and a metric, never a crash.
/// The panic hook installed in `main` prints no payload, so no request data
/// reaches stderr either.
///
/// Plain functions returning combinators, not `async fn`s or blocks: those
/// keep their arguments (here the request) in their own state as well as
/// in the future they await. See [`Proxy::handle`].
fn guarded(
    proxy: Arc<Proxy>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> impl Future<Output = Response<ProxyBody>> {
    let metrics = proxy.metrics_arc();
    catch_panic(proxy.handle(request, peer), metrics)
}

/// What hyper's service must return; a named fn, as a closure or `Ok` here
/// trips over the lifetime of the boxed error type.
fn ok(response: Response<ProxyBody>) -> Result<Response<ProxyBody>, Infallible> {
    Ok(response)
}

/// `handler`'s response, or a 500 (counted in `metrics`) if it panics.
pub fn catch_panic(
    handler: impl Future<Output = Response<ProxyBody>>,
    metrics: Arc<crate::metrics::Metrics>,
) -> impl Future<Output = Response<ProxyBody>> {
    AssertUnwindSafe(handler)
        .catch_unwind()
        .map(move |result| match result {
            Ok(response) => response,
            Err(_) => {
                metrics.panic();
                tracing::error!(reason = "panic", "request handler panicked; answered 500");
                crate::rejection::plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal Server Error\n",
                )
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// One client per IPv4 address, per IPv6 /64, an IPv4-mapped address
    /// counted as its IPv4 one; a connection that ends frees its place.
    #[test]
    fn a_client_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let slots = Arc::new(Slots::new(100, Some(2)));
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let first = slots.admit(ip("2001:db8:1:2::1")).unwrap();
        let second = slots.admit(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert!(slots.admit(ip("2001:db8:1:2:abcd::7")).is_err(), "same /64");
        assert!(slots.admit(ip("2001:db8:1:3::1")).is_ok(), "another /64");
        let v4 = slots.admit(ip("192.0.2.7")).unwrap();
        let _mapped = slots.admit(ip("::ffff:192.0.2.7")).unwrap();
        assert!(
            slots.admit(ip("192.0.2.7")).is_err(),
            "mapped counts as IPv4"
        );
        drop((first, second, v4));
        assert!(slots.admit(ip("2001:db8:1:2::5")).is_ok());
        assert!(Arc::new(Slots::new(1, None))
            .admit(ip("192.0.2.7"))
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn a_panicking_handler_becomes_a_counted_500_without_its_message() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let handler = async {
            if std::hint::black_box(true) {
                panic!("request data canary-4111111111111111");
            }
            crate::rejection::plain(StatusCode::OK, "ok")
        };
        let response = catch_panic(handler, metrics.clone()).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(!String::from_utf8_lossy(&body).contains("canary"));
        assert!(metrics
            .render(crate::metrics::Sampled::default())
            .contains("ivrguard_panics_total 1"));
    }
}
