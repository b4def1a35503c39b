//! The capture backend: stands in for the IVR application behind ivrguard.
//!
//! It records every request it receives (method, raw path and query,
//! headers, body, arrival time) and, separately, every raw byte read from
//! every connection, so a test can check both what the app parsed and that
//! no plaintext crossed the wire at all.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the backend answers when it is healthy.
pub const BACKEND_TWIML: &str = "<Response><Say>backend ok</Say></Response>";

/// How the backend answers.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// 200 `text/xml` with [`BACKEND_TWIML`] at once.
    Twiml,
    /// The same, after this delay (counted from when the request was recorded).
    Delay(Duration),
    /// This status, with the same body: an app that refuses (401/403) or fails.
    Status(u16),
}

/// One request as the backend received it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub method: String,
    /// The request target exactly as received: path and raw query.
    pub target: String,
    /// Header names in lower case with their raw values.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
    pub arrived: Instant,
}

impl Captured {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// Every value of `name` (case-insensitive), in received order.
    pub fn header_all(&self, name: &str) -> Vec<&[u8]> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// The single value of `name`; panics if it appears more than once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.header_all(name);
        assert!(all.len() <= 1, "backend got {} `{name}` headers", all.len());
        all.first()
            .map(|v| std::str::from_utf8(v).expect("header value is UTF-8"))
    }

    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).expect("backend body is UTF-8")
    }
}

/// The raw bytes read from each connection, one buffer per connection.
type ConnectionLogs = Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>;

/// A running capture backend. Dropping it stops accepting connections.
pub struct Backend {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Captured>>>,
    raw: ConnectionLogs,
    task: JoinHandle<()>,
}

impl Backend {
    /// Starts a backend on `127.0.0.1:0` in the current tokio runtime.
    pub async fn start(behaviour: Behaviour) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind capture backend");
        let addr = listener.local_addr().expect("backend address");
        let requests: Arc<Mutex<Vec<Captured>>> = Arc::default();
        let raw: ConnectionLogs = Arc::default();
        let task = {
            let requests = requests.clone();
            let raw = raw.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let log: Arc<Mutex<Vec<u8>>> = Arc::default();
                    raw.lock().unwrap().push(log.clone());
                    let requests = requests.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request: Request<Incoming>| {
                            handle(request, requests.clone(), behaviour)
                        });
                        let io = TokioIo::new(TeeStream { inner: stream, log });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            })
        };
        Backend {
            addr,
            requests,
            raw,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, for `upstream.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.raw.lock().unwrap().len()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn requests(&self) -> Vec<Captured> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until at least `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) -> Vec<Captured> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "backend got {} of {n} requests within 10 s",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Every byte read from every connection, connections separated by a
    /// newline (so a needle cannot straddle two connections).
    pub fn raw_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for conn in self.raw.lock().unwrap().iter() {
            all.extend_from_slice(&conn.lock().unwrap());
            all.push(b'\n');
        }
        all
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    request: Request<Incoming>,
    requests: Arc<Mutex<Vec<Captured>>>,
    behaviour: Behaviour,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.to_string(), |pq| pq.as_str().to_owned());
    let headers = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    requests.lock().unwrap().push(Captured {
        method: parts.method.as_str().to_owned(),
        target,
        headers,
        body,
        arrived: Instant::now(),
    });
    if let Behaviour::Delay(delay) = behaviour {
        tokio::time::sleep(delay).await;
    }
    let status = match behaviour {
        Behaviour::Status(status) => status,
        Behaviour::Twiml | Behaviour::Delay(_) => 200,
    };
    let response = Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from_static(BACKEND_TWIML.as_bytes())))
        .expect("static response");
    Ok(response)
}

/// A TCP stream that copies everything it reads into `log`.
struct TeeStream {
    inner: TcpStream,
    log: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for TeeStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.log
                .lock()
                .unwrap()
                .extend_from_slice(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for TeeStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `http://127.0.0.1:PORT` for a port with nothing listening on it: an
/// "upstream down". The port stays bound (never listening) for the rest of
/// the test process, so a parallel test cannot be given it by `bind(:0)`:
/// freeing it made two tests fail now and then.
pub fn closed_port_url() -> String {
    let socket = tokio::net::TcpSocket::new_v4().expect("a throw-away socket");
    socket
        .bind("127.0.0.1:0".parse().expect("loopback"))
        .expect("bind a throw-away port");
    let addr = socket.local_addr().expect("throw-away address");
    // Bound, not listening: connecting is refused. Kept until the process ends.
    std::mem::forget(socket);
    format!("http://{addr}")
}
