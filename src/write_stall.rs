//! A bound on how long a client may leave ivrguard's writes waiting.
//!
//! hyper has no write timeout. A client that sends requests (pipelined, or
//! one asking for a large answer) and then stops reading fills the socket
//! buffers, and the connection waits for it for ever, holding one of
//! `server.max_connections` and, mid-response, an upstream slot whose
//! deadline only acts when hyper polls the body. [`WriteStallLimit`] fails
//! a write (and so the connection) that has made no progress for the
//! limit; any progress, even one byte, starts the wait again.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The connection under a [`WriteStallLimit`], which can be made to end
/// with a reset. A stalled connection is cut that way: closed normally, its
/// FIN waits behind the bytes the client never took, and the kernel keeps
/// retrying them (`FIN-WAIT-1`) long after ivrguard let go, while the
/// client learns of the cut only at its next zero-window probe, seconds
/// apart and doubling (seen: over 25 s, with 217 KB still queued).
pub trait ResetWhenClosed {
    /// Makes closing the connection send a reset and drop what is unsent.
    fn reset_when_closed(&self);
}

impl ResetWhenClosed for tokio::net::TcpStream {
    fn reset_when_closed(&self) {
        // Not fatal if refused: the connection then ends with a FIN.
        let _ = self.set_zero_linger();
    }
}

/// `inner`, with writes that fail after `limit` without progress.
#[derive(Debug)]
pub struct WriteStallLimit<S> {
    inner: S,
    limit: Duration,
    /// Set while a write waits; boxed, as it is rare and most connections
    /// never need one.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S: ResetWhenClosed> WriteStallLimit<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        WriteStallLimit {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After the inner write returned `Pending`: still `Pending` (and woken
    /// when the limit passes), or the error once it has.
    fn wait<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.inner.reset_when_closed();
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took nothing we wrote for the write-stall limit",
                )))
            }
        }
    }

    /// The inner write's result; its waiting is bounded.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => self.wait(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStallLimit<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin + ResetWhenClosed> AsyncWrite for WriteStallLimit<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bounded(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bounded(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.bounded(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.bounded(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    impl ResetWhenClosed for tokio::io::DuplexStream {
        fn reset_when_closed(&self) {}
    }

    /// Over TCP, the cut reaches a client that reads nothing at once, as a
    /// reset: closed with a FIN instead, the FIN waited behind the unsent
    /// bytes and the client learnt nothing for tens of seconds.
    #[tokio::test]
    async fn a_connection_cut_for_a_stalled_write_is_reset() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let client = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut limited = WriteStallLimit::new(server, Duration::from_millis(200));
        let chunk = vec![0; 64 * 1024];
        let error = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Err(e) = limited.write_all(&chunk).await {
                    return e;
                }
            }
        })
        .await
        .expect("the stalled write failed");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        drop(limited);

        let reset = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(e) = client.take_error().unwrap() {
                    return e;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the client saw the connection reset");
        assert_eq!(reset.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_reads_fails_at_the_limit_and_progress_restarts_the_wait() {
        // A 64-byte pipe: the reader's end decides when writes progress.
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut limited = WriteStallLimit::new(ours, Duration::from_secs(5));
        limited.write_all(&[1; 64]).await.expect("fits the pipe");

        // The reader takes 32 bytes 4 s into the wait: progress, so the
        // next wait starts afresh and the write is not failed at 5 s.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let mut half = [0; 32];
            tokio::io::AsyncReadExt::read_exact(&mut theirs, &mut half)
                .await
                .unwrap();
            theirs // kept open, never read again
        });
        let started = tokio::time::Instant::now();
        let error = limited
            .write_all(&[2; 64])
            .await
            .expect_err("nobody reads the rest");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        // 32 bytes went in at 4 s; the other 32 waited 5 s more.
        assert_eq!(started.elapsed(), Duration::from_secs(9));
        drop(reader.await.unwrap());
    }
}
