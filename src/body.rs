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

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use tokio::time::{Instant, Sleep};

/// Errors a response body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every response ivrguard sends carries.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Why [`collect_within`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectError {
    TooLarge,
    Read,
}

/// Reads `body` whole, refusing more than `limit` bytes. A body that comes
/// in one frame (a webhook sent with its head) is kept as it came. Of one
/// that comes in several, frames of [`KEEP_FRAME`] bytes or more are kept
/// as they came and smaller ones are copied out as they arrive, then the
/// parts are joined.
///
/// Collecting every frame as it came held each one's whole read block:
/// hyper cuts a frame out of an 8 KiB block and reads the next into a new
/// one, so a body trickled a byte per TCP segment held 8 KiB per byte
/// (found in review: 196,590 bytes uploaded took RSS from 7 MB to 789 MB).
/// Copying every frame instead doubled what a caller holding a whole body
/// costs (its frames' blocks are hyper's read buffer, which it keeps).
pub async fn collect_within<B>(mut body: B, limit: usize) -> Result<Bytes, CollectError>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut first: Option<Bytes> = None;
    let mut parts = Parts::default();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| CollectError::Read)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(CollectError::TooLarge);
        }
        if total == data.len() && parts.is_empty() && first.is_none() {
            first = Some(data);
            continue;
        }
        if let Some(earlier) = first.take() {
            parts.add(earlier);
        }
        parts.add(data);
    }
    Ok(match first {
        Some(only) => only,
        None => parts.joined(total),
    })
}

/// Frames at least this long are kept as they came, not copied: the read
/// block one holds is at most about 8 KiB / this many times its bytes.
const KEEP_FRAME: usize = 4096;

/// A body's frames in order: the long ones as they came, runs of short
/// ones copied into one buffer each.
#[derive(Default)]
struct Parts {
    kept: Vec<Bytes>,
    short: BytesMut,
}

impl Parts {
    fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.short.is_empty()
    }

    fn add(&mut self, data: Bytes) {
        if data.len() < KEEP_FRAME {
            self.short.extend_from_slice(&data);
            return;
        }
        if !self.short.is_empty() {
            self.kept.push(self.short.split().freeze());
        }
        self.kept.push(data);
    }

    fn joined(mut self, total: usize) -> Bytes {
        if !self.short.is_empty() {
            self.kept.push(self.short.split().freeze());
        }
        match self.kept.len() {
            0 => Bytes::new(),
            1 => self.kept.remove(0),
            _ => {
                let mut out = BytesMut::with_capacity(total);
                self.kept
                    .iter()
                    .for_each(|part| out.extend_from_slice(part));
                out.freeze()
            }
        }
    }
}

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
        // The deadline first: a body with a frame always ready (a large one
        // already in the socket buffers, for a caller reading slowly but
        // steadily) never let the timer be looked at (found in review: cut
        // at 7-12 s against a 3 s deadline).
        if Instant::now() >= self.sleep.deadline() {
            self.report("deadline");
            return Poll::Ready(Some(Err(Box::new(DeadlineExceeded))));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    fn body_of(frames: Vec<Result<Bytes, &'static str>>) -> impl Body<Data = Bytes> + Unpin {
        let frames = frames.into_iter().map(|f| f.map(Frame::data));
        StreamBody::new(futures_util::stream::iter(frames))
    }

    /// One frame (the body came with its head): kept as it came, no copy.
    #[tokio::test]
    async fn a_body_in_one_frame_is_not_copied() {
        let frame = Bytes::from(b"Digits=1234&CallSid=CA1".to_vec());
        let got = collect_within(body_of(vec![Ok(frame.clone())]), 64).await;
        assert_eq!(got.map(|b| b.as_ptr()), Ok(frame.as_ptr()));
    }

    /// A byte per frame, each cut out of an 8 KiB block as hyper cuts them:
    /// the bytes are copied out, so no block outlives its frame.
    #[tokio::test]
    async fn a_trickled_body_keeps_none_of_its_frames_blocks() {
        let text = b"AccountSid=AC1&Digits=4242&SpeechResult=yes";
        let blocks: Vec<Bytes> = text
            .iter()
            .map(|b| {
                let mut block = vec![0u8; 8192];
                block[0] = *b;
                Bytes::from(block)
            })
            .collect();
        let frames = blocks.iter().map(|block| Ok(block.slice(..1))).collect();
        let got = collect_within(body_of(frames), 64).await.unwrap();
        assert_eq!(&got[..], text);
        let inside = |block: &Bytes| {
            let range = block.as_ptr() as usize..block.as_ptr() as usize + block.len();
            range.contains(&(got.as_ptr() as usize))
        };
        assert!(
            !blocks.iter().any(inside),
            "the result is one of the blocks"
        );
    }

    /// Long and short frames mixed: joined in order.
    #[tokio::test]
    async fn long_and_short_frames_join_in_order() {
        let pieces: Vec<Vec<u8>> = vec![
            vec![b'a'; 1],
            vec![b'b'; KEEP_FRAME],
            vec![b'c'; 1],
            vec![b'd'; 2],
            vec![b'e'; KEEP_FRAME + 7],
            vec![b'f'; 3],
        ];
        let frames = pieces.iter().map(|p| Ok(Bytes::from(p.clone()))).collect();
        let got = collect_within(body_of(frames), 1 << 20).await.unwrap();
        assert_eq!(got, pieces.concat());
    }

    /// A body whose next frame is always ready still ends at the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_body_always_ready_ends_at_the_deadline() {
        let endless = StreamBody::new(futures_util::stream::repeat_with(|| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"<Say>")))
        }));
        let (tx, failed) = std::sync::mpsc::channel();
        let deadline = Instant::now() + std::time::Duration::from_secs(3);
        let mut body = with_deadline(endless, deadline, (), move |why| {
            let _ = tx.send(why);
        });
        assert!(body.frame().await.unwrap().is_ok(), "before the deadline");
        tokio::time::advance(std::time::Duration::from_secs(4)).await;
        let after = body.frame().await.expect("a frame or an error");
        assert!(after.is_err(), "a frame after the deadline");
        assert_eq!(failed.try_recv(), Ok("deadline"));
    }

    #[tokio::test]
    async fn past_the_limit_or_a_read_error_is_refused() {
        let two = || {
            vec![
                Ok(Bytes::from_static(b"abc")),
                Ok(Bytes::from_static(b"de")),
            ]
        };
        assert_eq!(collect_within(body_of(two()), 5).await.unwrap(), "abcde");
        assert_eq!(
            collect_within(body_of(two()), 4).await,
            Err(CollectError::TooLarge)
        );
        let broken = vec![Ok(Bytes::from_static(b"abc")), Err("reset")];
        assert_eq!(
            collect_within(body_of(broken), 64).await,
            Err(CollectError::Read)
        );
        assert_eq!(collect_within(body_of(vec![]), 64).await.unwrap(), "");
    }
}
