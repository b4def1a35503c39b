//! The admin listener: `/healthz` (alive), `/readyz` (config and secrets
//! loaded and the proxy listening; 503 while draining), `/metrics`
//! (Prometheus text). Bind it to loopback or a pod-internal port.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::body::{self, ProxyBody};
use crate::metrics::Sampled;
use crate::reload::SharedProxy;
use crate::server::Readiness;

/// What the admin endpoints read.
pub struct AdminState {
    pub proxy: SharedProxy,
    pub readiness: Arc<Readiness>,
    pub dropped_log_lines: Box<dyn Fn() -> u64 + Send + Sync>,
}

/// Serves the admin endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(5));
    let builder = Arc::new(builder);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // e.g. EMFILE: back off instead of spinning (found in review:
            // 74 % CPU while a health probe waited), as the main listener.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &request)) }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(state: &AdminState, request: &Request<Incoming>) -> Response<ProxyBody> {
    if request.method() != Method::GET {
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
            let rendered = proxy.metrics().render(Sampled {
                encryptions: proxy.cipher().encryptions(),
                dropped_log_lines: (state.dropped_log_lines)(),
                upstream_connections_open: proxy.upstream_connections_open() as u64,
            });
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                rendered.into(),
            )
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
