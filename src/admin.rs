//! The admin listener: `/healthz` (alive), `/readyz` (config and secrets
//! loaded and the proxy listening; 503 while draining), `/metrics`
//! (Prometheus text). Bind it to loopback or a pod-internal port.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::body::{self, ProxyBody};
use crate::metrics::{Format, Sampled};
use crate::reload::SharedProxy;
use crate::server::Readiness;
use crate::write_stall::WriteStallLimit;

/// What the admin endpoints read.
pub struct AdminState {
    pub proxy: SharedProxy,
    pub readiness: Arc<Readiness>,
    pub dropped_log_lines: Box<dyn Fn() -> u64 + Send + Sync>,
    /// The callers' connection slots (`server.max_connections`).
    pub connection_slots: Arc<crate::server::Slots>,
}

/// At most this many admin connections at once; more are closed at once.
/// Probes and scrapes need a handful.
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A head within this, and no write waits longer than this.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the admin endpoints until the task is dropped. HTTP/1.1 only
/// (probes and Prometheus speak it), with the same guards as the main
/// listener against clients that hold a connection: a head timeout, a
/// write-stall limit and a connection cap (found in review: slow readers
/// here could take every descriptor the main listener needed).
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_TIMEOUT);
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // e.g. EMFILE: back off instead of spinning (found in review:
            // 74 % CPU while a health probe waited), as the main listener.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &request)) }
            });
            let stream = WriteStallLimit::new(stream, ADMIN_TIMEOUT);
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn route(state: &AdminState, request: &Request<Incoming>) -> Response<ProxyBody> {
    // HEAD as GET: hyper sends the head without the body (load balancers'
    // health checks use HEAD; it was 405).
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if state.readiness.is_ready() => {
            text(StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        "/metrics" => {
            let proxy = state.proxy.load();
            let accept = request.headers().get(header::ACCEPT);
            let format = Format::accepted(accept.map(header::HeaderValue::as_bytes));
            let (open_fds, max_fds) = Sampled::fds();
            let sampled = Sampled {
                encryptions: proxy.cipher().encryptions(),
                dropped_log_lines: (state.dropped_log_lines)(),
                upstream_connections_open: proxy.upstream_connections_open() as u64,
                connections_open: state.connection_slots.open() as u64,
                connections_max: state.connection_slots.max() as u64,
                open_fds,
                max_fds,
            };
            let rendered = proxy.metrics().render_as(sampled, format);
            text(StatusCode::OK, format.content_type(), rendered.into())
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
