//! The response body type, and a body wrapper that enforces a deadline.
//!
//! Upstream responses are streamed back unchanged, but a backend that sends
//! its headers and then stalls must not hold the caller past the request
//! deadline: [`with_deadline`] ends such a body with an error at that instant.
//! Either way, or when the app's body breaks off, the caller has a response
//! cut short after its head (and its access line) went out: the wrapper
//! says so once, to whoever made it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use tokio::time::{Instant, Sleep};

/// Errors a response body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every response ivrguard sends carries.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete, in-memory body.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Streams `inner` but fails it once `deadline` passes. `guard` (e.g. the
/// upstream slot the body occupies) is dropped with the body. `failed` is
/// called once if the body ends in an error: `"deadline"`, or `"broken"`
/// when `inner` failed (the app closed or reset its connection mid-body).
/// Not when the caller leaves first: the body is then dropped unfinished.
pub fn with_deadline<B, G, F>(inner: B, deadline: Instant, guard: G, failed: F) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    G: Send + Unpin + 'static,
    F: FnOnce(&'static str) + Send + Unpin + 'static,
{
    Deadline {
        inner,
        sleep: Box::pin(tokio::time::sleep_until(deadline)),
        _guard: guard,
        failed: Some(failed),
    }
    .boxed_unsync()
}

#[derive(Debug, thiserror::Error)]
#[error("response body exceeded the request deadline")]
struct DeadlineExceeded;

struct Deadline<B, G, F> {
    inner: B,
    sleep: Pin<Box<Sleep>>,
    _guard: G,
    failed: Option<F>,
}

impl<B, G, F: FnOnce(&'static str)> Deadline<B, G, F> {
    fn report(&mut self, why: &'static str) {
        if let Some(failed) = self.failed.take() {
            failed(why);
        }
    }
}

impl<B, G: Unpin, F: FnOnce(&'static str) + Unpin> Body for Deadline<B, G, F>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            if matches!(frame, Some(Err(_))) {
                self.report("broken");
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.report("deadline");
                Poll::Ready(Some(Err(Box::new(DeadlineExceeded))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
