//! The connections to the app, counted across the workers' pools, so that
//! `upstream.max_connections` is a bound on open connections, not only on
//! requests in flight.
//!
//! Each worker has its own pool ([`crate::upstream::Upstream`]), so that a
//! request never waits on another thread. Bounding each pool to its share
//! of the slots would starve a busy worker while the other's sit idle, and
//! bounding only requests in flight let every pool keep up to
//! `max_connections` open: with two workers, twice the limit reached a
//! legacy app that counts its connections. So:
//!
//! - every connection to the app takes a slot ([`CappedConnector`]) for its
//!   whole life; past `max_connections`, a new one waits for a slot (within
//!   `upstream.timeout_ms`, which bounds the whole exchange anyway), and its
//!   slot is freed when it closes. Meanwhile hyper's pool hands the request
//!   the first of its own connections that turns idle;
//! - a request goes to its own worker's pool while that pool has an idle
//!   connection or a slot is free; when neither holds, to the pool with the
//!   most idle connections ([`Connections::pick`]). Only then does a request
//!   cross threads.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::Service;

use crate::resolve::Resolver;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The slots and, per worker, its open and busy connections.
#[derive(Debug)]
pub struct Connections {
    /// One permit per open connection to the app.
    slots: Arc<Semaphore>,
    /// Each in an `Arc` of its own: a request's [`Busy`] holds its pool's,
    /// so the count every request takes is not shared by the workers.
    workers: Vec<Arc<WorkerCounts>>,
    /// How long a new connection may wait for a slot.
    wait: Duration,
}

/// One worker's pool, counted. Aligned so that two workers' counters never
/// share a cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct WorkerCounts {
    /// Connections open in this pool.
    open: AtomicUsize,
    /// Requests sent through this pool and not finished.
    busy: AtomicUsize,
}

impl Connections {
    pub fn new(max_connections: usize, workers: usize, wait: Duration) -> Arc<Self> {
        Arc::new(Connections {
            slots: Arc::new(Semaphore::new(max_connections)),
            workers: (0..workers.max(1)).map(|_| Arc::default()).collect(),
            wait,
        })
    }

    /// The connector of `worker`'s pool.
    pub fn connector(
        self: &Arc<Self>,
        worker: usize,
        inner: HttpConnector<Resolver>,
    ) -> CappedConnector {
        CappedConnector {
            inner,
            connections: self.clone(),
            worker,
        }
    }

    /// The pool a request on worker `own` should use: its own while that
    /// has an idle connection or a slot is free, else the one with the most
    /// idle connections (if none has any, its own, which waits for a slot).
    pub fn pick(&self, own: usize) -> usize {
        let own = own % self.workers.len();
        if self.slots.available_permits() > 0 || self.idle(own) > 0 {
            return own;
        }
        (0..self.workers.len())
            .map(|worker| (self.idle(worker), worker))
            .filter(|(idle, _)| *idle > 0)
            .max()
            .map_or(own, |(_, worker)| worker)
    }

    /// Counts a request on `worker`'s pool until the guard drops.
    pub fn busy(&self, worker: usize) -> Busy {
        let counts = self.workers[worker].clone();
        counts.busy.fetch_add(1, Relaxed);
        Busy(counts)
    }

    /// Connections open across all pools.
    pub fn open(&self) -> usize {
        self.workers.iter().map(|w| w.open.load(Relaxed)).sum()
    }

    fn idle(&self, worker: usize) -> usize {
        let counts = &self.workers[worker];
        counts
            .open
            .load(Relaxed)
            .saturating_sub(counts.busy.load(Relaxed))
    }
}

/// A request counted on a pool; see [`Connections::busy`].
#[derive(Debug)]
pub struct Busy(Arc<WorkerCounts>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Relaxed);
    }
}

/// hyper's HTTP connector, taking a slot before each connection.
#[derive(Clone)]
pub struct CappedConnector {
    inner: HttpConnector<Resolver>,
    connections: Arc<Connections>,
    worker: usize,
}

impl Service<Uri> for CappedConnector {
    type Response = CappedConnection;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<CappedConnection, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.inner.call(dst);
        let connections = self.connections.clone();
        let worker = self.worker;
        Box::pin(async move {
            let slot =
                tokio::time::timeout(connections.wait, connections.slots.clone().acquire_owned())
                    .await
                    .map_err(|_| "every connection slot to the app stayed taken")?
                    .expect("the semaphore is never closed");
            let io = connecting.await?;
            let counts = connections.workers[worker].clone();
            counts.open.fetch_add(1, Relaxed);
            Ok(CappedConnection {
                io,
                _slot: slot,
                counts,
            })
        })
    }
}

/// A connection to the app holding its slot; closing it frees the slot.
pub struct CappedConnection {
    io: TokioIo<TcpStream>,
    _slot: OwnedSemaphorePermit,
    /// Its pool's counts, where it is counted open.
    counts: Arc<WorkerCounts>,
}

impl Drop for CappedConnection {
    fn drop(&mut self) {
        self.counts.open.fetch_sub(1, Relaxed);
    }
}

impl Connection for CappedConnection {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for CappedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for CappedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(connections: &Connections, worker: usize, open: usize, busy: usize) {
        connections.workers[worker].open.store(open, Relaxed);
        connections.workers[worker].busy.store(busy, Relaxed);
    }

    #[test]
    fn a_request_stays_on_its_worker_while_a_slot_is_free() {
        let connections = Connections::new(4, 2, Duration::from_secs(1));
        counts(&connections, 1, 3, 0);
        assert_eq!(connections.pick(0), 0);
    }

    #[test]
    fn with_every_slot_taken_a_request_goes_where_a_connection_is_idle() {
        let connections = Connections::new(0, 3, Duration::from_secs(1));
        counts(&connections, 0, 2, 2);
        counts(&connections, 1, 1, 0);
        counts(&connections, 2, 3, 1);
        assert_eq!(connections.pick(0), 2, "the pool with the most idle");
        counts(&connections, 0, 2, 1);
        assert_eq!(connections.pick(0), 0, "its own pool has one idle");
        counts(&connections, 1, 0, 0);
        counts(&connections, 2, 1, 1);
        counts(&connections, 0, 1, 1);
        assert_eq!(connections.pick(0), 0, "nothing idle anywhere: its own");
    }

    #[test]
    fn a_busy_guard_counts_until_dropped() {
        let connections = Connections::new(1, 2, Duration::from_secs(1));
        let busy = connections.busy(1);
        assert_eq!(connections.workers[1].busy.load(Relaxed), 1);
        drop(busy);
        assert_eq!(connections.workers[1].busy.load(Relaxed), 0);
    }
}
