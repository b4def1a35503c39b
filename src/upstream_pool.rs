//! One worker's connections to the app: hyper's HTTP/1 client connections
//! (`hyper::client::conn::http1`), and those idle between requests.
//!
//! Pooled here rather than by hyper-util's client, which per request
//! locked a map of pools hashed by (scheme, authority), built a connect
//! future in case none was idle, and spawned a task that waited for the
//! connection to be ready again before putting it back. Here each worker
//! has its own pool, a deque behind a lock no other thread takes unless
//! `upstream.max_connections` is reached ([`crate::upstream_connections`]);
//! a request's connection goes back when its response body is done
//! ([`Lent`]), and the next request waits for it to be ready (its
//! connection task finishing the previous response). That took about 6 %
//! of the instructions of a whole request (`bench/RESULTS.md`).
//!
//! What the pool keeps from hyper-util's:
//! - the most recently used idle connection first, the likeliest still open;
//! - a connection idle for `upstream.pool_idle_timeout_ms` is never used
//!   again and is closed then ([`Pool::reap`]), so an app that closes idle
//!   connections later than that never closes one under a request;
//! - past `upstream.pool_max_idle_per_host` idle, a returned connection is
//!   closed;
//! - a request a reused connection did not send (it had closed) is sent on
//!   another one; a request that was sent is never sent twice.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::server::MAX_HEAD_BYTES;
use crate::upstream::UpstreamError;
use crate::upstream_connections::{CappedConnector, Slot};

type Sender = SendRequest<Full<Bytes>>;

/// One worker's connections to the app.
pub struct Pool {
    connector: CappedConnector,
    idle: Mutex<Idle>,
    idle_timeout: Duration,
    max_idle: usize,
}

/// The idle connections, oldest first, and whether a task is closing them
/// as they expire.
#[derive(Default)]
struct Idle {
    senders: VecDeque<(Sender, Instant)>,
    reaping: bool,
}

impl Idle {
    /// Drops (so closes) the connections idle for `timeout` at `now`.
    fn expire(&mut self, now: Instant, timeout: Duration) {
        while self
            .senders
            .front()
            .is_some_and(|(_, since)| now.saturating_duration_since(*since) >= timeout)
        {
            self.senders.pop_front();
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.lock().senders.len())
            .finish()
    }
}

impl Pool {
    pub fn new(connector: CappedConnector, idle_timeout: Duration, max_idle: usize) -> Arc<Self> {
        Arc::new(Pool {
            connector,
            idle: Mutex::default(),
            idle_timeout,
            max_idle,
        })
    }

    /// Sends `request` on an idle connection, or a new one, and waits for
    /// the response head. The caller bounds the wait.
    pub async fn send(self: &Arc<Self>, mut request: Request<Full<Bytes>>) -> Attempt {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                None => match self.connector.slot(|| self.idle() > 0).await {
                    Ok(Slot::Free(slot)) => match self.connect(slot).await {
                        Ok(sender) => (sender, false),
                        Err(_) => return Attempt::NotConnected(request),
                    },
                    Ok(Slot::IdleAgain) => return Attempt::Unsent(request),
                    Err(_) => return Attempt::Failed(UpstreamError::Connect),
                },
            };
            // A reused connection may still be finishing its last response.
            if sender.ready().await.is_err() {
                match reused {
                    true => continue,
                    false => return Attempt::Failed(UpstreamError::Failed),
                }
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lent = Lent {
                        sender: Some(sender),
                        pool: self.clone(),
                    };
                    return Attempt::Sent(response, lent);
                }
                // Not sent: the connection closed first.
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Attempt::Failed(UpstreamError::Failed),
                },
            }
        }
    }

    /// Connections idle now.
    pub fn idle(&self) -> usize {
        self.lock().senders.len()
    }

    /// The most recently used idle connection that has not expired or
    /// closed.
    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.lock();
        idle.expire(Instant::now(), self.idle_timeout);
        std::iter::from_fn(|| idle.senders.pop_back())
            .map(|(sender, _)| sender)
            .find(|sender| !sender.is_closed())
    }

    /// A new connection in `slot`, its task spawned on the current worker.
    async fn connect(&self, slot: OwnedSemaphorePermit) -> Result<Sender, UpstreamError> {
        let io = self
            .connector
            .connect(slot)
            .await
            .map_err(|_| UpstreamError::Connect)?;
        // The app's response head is held to the limit callers' heads are
        // (64 KiB): with hyper's default buffer (about 400 KiB) each of
        // `upstream.max_connections` could hold that much of a runaway
        // app's headers. Past it the response is an upstream error.
        let (sender, connection) = http1::Builder::new()
            .max_header_size(MAX_HEAD_BYTES)
            .max_buf_size(MAX_HEAD_BYTES)
            .handshake(io)
            .await
            .map_err(|_| UpstreamError::Connect)?;
        // Its errors reach the request it was serving; it ends when the
        // connection closes, or when it is idle and its sender is dropped.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Keeps `sender` for the next request, unless its connection closed
    /// or `max_idle` are kept already (then dropping it closes it).
    fn put(self: &Arc<Self>, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.senders.len() >= self.max_idle {
            return;
        }
        idle.senders.push_back((sender, Instant::now()));
        // Outside a runtime (only in unit tests) nothing closes idle
        // connections in the background; `checkout` still skips them.
        if !idle.reaping {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                idle.reaping = true;
                runtime.spawn(Pool::reap(Arc::downgrade(self)));
            }
        }
        drop(idle);
        self.connector.turned_idle();
    }

    /// Closes each idle connection when it expires; ends when none is idle
    /// or the pool is gone (a reload replaced it).
    async fn reap(pool: Weak<Pool>) {
        loop {
            let next = {
                let Some(pool) = pool.upgrade() else { return };
                let mut idle = pool.lock();
                idle.expire(Instant::now(), pool.idle_timeout);
                match idle.senders.front() {
                    Some((_, since)) => *since + pool.idle_timeout,
                    None => {
                        idle.reaping = false;
                        return;
                    }
                }
            };
            tokio::time::sleep_until(next).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Idle> {
        // Nothing panics while holding it; if it did, the deque is intact.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How [`Pool::send`] ended.
#[derive(Debug)]
pub enum Attempt {
    /// The response head, and the connection it came on.
    Sent(Response<Incoming>, Lent),
    /// Not sent: a connection turned idle while this request waited for a
    /// slot, maybe in another pool. Pick a pool again.
    Unsent(Request<Full<Bytes>>),
    /// Not sent: a new connection could not be opened (refused, timed
    /// out, no such name).
    NotConnected(Request<Full<Bytes>>),
    Failed(UpstreamError),
}

/// A request's connection, back to its pool when dropped: when the
/// response body has been read, or dropped (hyper then closes the
/// connection, and a checkout skips it).
#[derive(Debug)]
pub struct Lent {
    sender: Option<Sender>,
    pool: Arc<Pool>,
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.put(sender);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The pool through [`Upstream::send`], against an app on
    //! `127.0.0.1:0` that reports each connection it accepts and each one
    //! that closes.

    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::FutureExt;
    use http::Request;
    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use hyper_util::client::legacy::connect::HttpConnector;

    use super::{Attempt, Pool};
    use crate::config::{OnUpstreamError, UpstreamSettings};
    use crate::resolve::Resolver;
    use crate::upstream::{InFlight, Upstream};
    use crate::upstream_connections::Connections;

    /// What the app saw: a connection opened or closed.
    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Opened,
        Closed,
    }

    /// An app answering every request (no body) with `ok`, on every
    /// connection until the peer closes it. `close_after_one`: it closes
    /// each connection after its first response.
    async fn app(close_after_one: bool) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                let _ = seen.send(Seen::Opened);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).await.is_err() {
                                break;
                            }
                        }
                        if close_after_one {
                            break;
                        }
                    }
                    let _ = seen.send(Seen::Closed);
                });
            }
        });
        (addr, events)
    }

    fn upstream(addr: std::net::SocketAddr, tune: impl FnOnce(&mut UpstreamSettings)) -> Upstream {
        let authority: http::uri::Authority = addr.to_string().parse().unwrap();
        let mut settings = UpstreamSettings {
            scheme_authority: format!("http://{authority}"),
            authority,
            path_prefix: String::new(),
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 8,
            max_connections: 8,
            rewrite_host: false,
            on_error: OnUpstreamError::Status,
            fallback_twiml: String::new(),
            auth_token: None,
            auth_token_source: None,
        };
        tune(&mut settings);
        Upstream::new(&settings, 1)
    }

    fn get(upstream: &Upstream) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = upstream.uri_for("/").unwrap();
        request
            .headers_mut()
            .insert(http::header::HOST, upstream.host().unwrap().clone());
        request
    }

    /// One request, its body read; the connection goes back to the pool.
    async fn call(upstream: &Upstream) {
        let (response, in_flight) = upstream.send(get(upstream)).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
        drop(in_flight);
    }

    async fn next(events: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
        tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("the app saw nothing within 5 s")
            .expect("the app is running")
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_is_read() {
        let (addr, mut events) = app(false).await;
        let upstream = upstream(addr, |_| {});
        for _ in 0..3 {
            call(&upstream).await;
        }
        assert_eq!(next(&mut events).await, Seen::Opened);
        assert!(
            events.try_recv().is_err(),
            "one connection for three requests"
        );
        assert_eq!(upstream.connections_open(), 1);
    }

    /// One call; the app then sees its connection close (for the reason
    /// the test sets up) with no request to notice it, and the next call
    /// gets a new connection, without an error.
    async fn closed_after_one_call_then_replaced(
        close_after_one: bool,
        tune: impl FnOnce(&mut UpstreamSettings),
    ) {
        let (addr, mut events) = app(close_after_one).await;
        let upstream = upstream(addr, tune);
        call(&upstream).await;
        assert_eq!(next(&mut events).await, Seen::Opened);
        assert_eq!(next(&mut events).await, Seen::Closed);
        call(&upstream).await;
        assert_eq!(next(&mut events).await, Seen::Opened);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_when_it_expires_and_never_used_after() {
        closed_after_one_call_then_replaced(false, |s| {
            s.pool_idle_timeout = Duration::from_millis(50);
        })
        .await;
    }

    #[tokio::test]
    async fn past_the_idle_limit_a_returned_connection_is_closed() {
        closed_after_one_call_then_replaced(false, |s| s.pool_max_idle_per_host = 0).await;
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_replaced_without_an_error() {
        closed_after_one_call_then_replaced(true, |_| {}).await;
    }

    /// Past `max_connections`, a request waits for the busy connection and
    /// then uses it: no second connection, no timeout.
    #[tokio::test]
    async fn past_max_connections_a_request_waits_for_the_busy_connection() {
        let (addr, mut events) = app(false).await;
        let upstream = upstream(addr, |s| {
            s.max_connections = 1;
            s.timeout = Duration::from_secs(2);
        });
        // Busy: its response body not read yet.
        let (first, in_flight): (_, InFlight) = upstream.send(get(&upstream)).await.unwrap();
        assert_eq!(next(&mut events).await, Seen::Opened);
        let mut second = std::pin::pin!(upstream.send(get(&upstream)));
        assert!(
            second.as_mut().now_or_never().is_none(),
            "the second request waits while the only connection is busy"
        );
        let body = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
        drop(in_flight);
        let (response, _in_flight) = second.await.expect("sent once the first was done");
        assert_eq!(response.status(), 200);
        assert!(events.try_recv().is_err(), "no second connection");
    }

    /// A request waiting for a slot (every one taken by open connections)
    /// stops waiting as soon as a connection turns idle, to pick a pool
    /// again; it does not wait for the slot until the timeout.
    #[tokio::test]
    async fn a_wait_for_a_slot_ends_when_a_connection_turns_idle() {
        let (addr, mut events) = app(false).await;
        let connections = Connections::new(1, 1, Duration::from_secs(30));
        let app_uri: http::Uri = format!("http://{addr}").parse().unwrap();
        let pool = Pool::new(
            connections.connector(
                0,
                HttpConnector::new_with_resolver(Resolver::new()),
                app_uri,
                Duration::from_secs(2),
            ),
            Duration::from_secs(60),
            8,
        );
        let request = || {
            let mut request = Request::new(Full::new(Bytes::new()));
            *request.uri_mut() = "/".parse().unwrap();
            request
                .headers_mut()
                .insert(http::header::HOST, http::HeaderValue::from_static("app"));
            request
        };
        let Attempt::Sent(first, lent) = pool.send(request()).await else {
            panic!("the first request is sent");
        };
        assert_eq!(next(&mut events).await, Seen::Opened);
        let mut second = std::pin::pin!(pool.send(request()));
        assert!(
            second.as_mut().now_or_never().is_none(),
            "waiting for a slot"
        );
        first.into_body().collect().await.unwrap();
        drop(lent);
        let woken = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("woken when the connection turned idle, long before the slot wait ends");
        assert!(matches!(woken, Attempt::Unsent(_)), "{woken:?}");
        assert_eq!(pool.idle(), 1);
        assert!(matches!(pool.send(request()).await, Attempt::Sent(..)));
        assert!(events.try_recv().is_err(), "no second connection");
    }
}
