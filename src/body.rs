//! The response body type, and a body wrapper that enforces a deadline.
//!
//! Upstream responses are streamed back unchanged, but a backend that sends
//! its headers and then stalls must not hold the caller past the request
//! deadline: [`with_deadline`] ends such a body with an error at that instant.

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
/// upstream slot the body occupies) is dropped with the body.
pub fn with_deadline<B, G>(inner: B, deadline: Instant, guard: G) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    G: Send + Unpin + 'static,
{
    Deadline {
        inner,
        sleep: Box::pin(tokio::time::sleep_until(deadline)),
        _guard: guard,
    }
    .boxed_unsync()
}

#[derive(Debug, thiserror::Error)]
#[error("response body exceeded the request deadline")]
struct DeadlineExceeded;

struct Deadline<B, G> {
    inner: B,
    sleep: Pin<Box<Sleep>>,
    _guard: G,
}

impl<B, G: Unpin> Body for Deadline<B, G>
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
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(DeadlineExceeded)))),
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
