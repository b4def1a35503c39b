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
//!   slot is freed when it closes. A connection that turns idle meanwhile,
//!   in any pool, ends the wait ([`Connections::turned_idle`]): the request
//!   picks a pool again and uses it;
//! - a request goes to its own worker's pool while that pool has an idle
//!   connection or a slot is free; when neither holds, to the pool with the
//!   most idle connections ([`Connections::pick`]). Only then does a request
//!   cross threads.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

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
    /// Requests waiting for a slot, and what wakes them when a connection
    /// turns idle.
    waiting: AtomicUsize,
    idle_again: Notify,
}

/// How a wait for a slot ended.
#[derive(Debug)]
pub enum Slot {
    /// A slot for a new connection.
    Free(OwnedSemaphorePermit),
    /// A connection is idle, or turned idle during the wait, maybe in
    /// another pool: pick again.
    IdleAgain,
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
            waiting: AtomicUsize::new(0),
            idle_again: Notify::new(),
        })
    }

    /// Waits until a connection turns idle in any pool, or `pause` passes.
    pub async fn idle_again_within(&self, pause: Duration) {
        let (idle_again, _registered) = self.wait_for_idle();
        let _ = tokio::time::timeout(pause, idle_again).await;
    }

    /// A wait for the next [`Connections::turned_idle`], counted among the
    /// waiters while the guard lives. It sees every call from now on:
    /// `notify_waiters` reaches a `Notified` from its creation, polled or
    /// not.
    fn wait_for_idle(&self) -> (tokio::sync::futures::Notified<'_>, Waiting<'_>) {
        let idle_again = self.idle_again.notified();
        self.waiting.fetch_add(1, SeqCst);
        (idle_again, Waiting(&self.waiting))
    }

    /// A connection went back to its pool: wakes the requests waiting for a
    /// slot, if any (one load otherwise).
    pub fn turned_idle(&self) {
        if self.waiting.load(SeqCst) > 0 {
            self.idle_again.notify_waiters();
        }
    }

    /// A slot for a new connection, waiting (up to the connection wait)
    /// while every one is taken, unless a connection turns idle first.
    /// `idle_here` says whether the waiting pool has one now: asked after
    /// this wait is registered, so a connection put back in between is seen
    /// one way or the other.
    pub async fn slot(&self, idle_here: impl Fn() -> bool) -> Result<Slot, BoxError> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(Slot::Free(slot));
        }
        let (idle_again, _registered) = self.wait_for_idle();
        tokio::pin!(idle_again);
        if idle_here() {
            return Ok(Slot::IdleAgain);
        }
        tokio::select! {
            biased;
            slot = tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()) => {
                let slot = slot.map_err(|_| "every connection slot to the app stayed taken")?;
                Ok(Slot::Free(slot.expect("the semaphore is never closed")))
            }
            () = idle_again => Ok(Slot::IdleAgain),
        }
    }

    /// The connector of `worker`'s pool to the app at `app`
    /// (`http://authority`).
    pub fn connector(
        self: &Arc<Self>,
        worker: usize,
        inner: HttpConnector<Resolver>,
        app: Uri,
        connect_timeout: Duration,
    ) -> CappedConnector {
        CappedConnector {
            inner,
            app,
            connect_timeout,
            connections: self.clone(),
            worker,
        }
    }

    /// The pool a request on worker `own` should use: its own while that
    /// has an idle connection or a slot is free, else the one with the most
    /// idle connections (if none has any, its own, which waits for a slot).
    /// `not_connecting`: a new connection just failed for this request, so
    /// a free slot does not count; an idle connection in any pool is better.
    pub fn pick(&self, own: usize, not_connecting: bool) -> usize {
        let own = own % self.workers.len();
        let may_connect = self.slots.available_permits() > 0 && !not_connecting;
        if may_connect || self.idle(own) > 0 {
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

/// One request counted among those waiting for a slot, until dropped.
struct Waiting<'c>(&'c AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
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

/// hyper-util's HTTP connector to the app, taking a slot before each
/// connection.
#[derive(Clone)]
pub struct CappedConnector {
    inner: HttpConnector<Resolver>,
    /// The app's `http://authority`.
    app: Uri,
    /// `upstream.connect_timeout_ms`, for the name lookup and the TCP
    /// connect together.
    connect_timeout: Duration,
    connections: Arc<Connections>,
    worker: usize,
}

impl CappedConnector {
    /// See [`Connections::slot`].
    pub async fn slot(&self, idle_here: impl Fn() -> bool) -> Result<Slot, BoxError> {
        self.connections.slot(idle_here).await
    }

    /// A new connection to the app in `slot`.
    pub async fn connect(&self, slot: OwnedSemaphorePermit) -> Result<CappedConnection, BoxError> {
        // `HttpConnector` bounds the TCP connect only: a name server that
        // never answers held each new connection until `upstream.timeout_ms`,
        // logged as the app being slow (found in review).
        let connecting = self.inner.clone().oneshot(self.app.clone());
        let io = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| "no connection to the app within upstream.connect_timeout_ms")??;
        let counts = self.connections.workers[self.worker].clone();
        counts.open.fetch_add(1, Relaxed);
        Ok(CappedConnection {
            io,
            _slot: slot,
            counts,
        })
    }

    /// See [`Connections::turned_idle`].
    pub fn turned_idle(&self) {
        self.connections.turned_idle();
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
        assert_eq!(connections.pick(0, false), 0);
    }

    #[test]
    fn with_every_slot_taken_a_request_goes_where_a_connection_is_idle() {
        let connections = Connections::new(0, 3, Duration::from_secs(1));
        counts(&connections, 0, 2, 2);
        counts(&connections, 1, 1, 0);
        counts(&connections, 2, 3, 1);
        assert_eq!(connections.pick(0, false), 2, "the pool with the most idle");
        counts(&connections, 0, 2, 1);
        assert_eq!(connections.pick(0, false), 0, "its own pool has one idle");
        counts(&connections, 1, 0, 0);
        counts(&connections, 2, 1, 1);
        counts(&connections, 0, 1, 1);
        assert_eq!(
            connections.pick(0, false),
            0,
            "nothing idle anywhere: its own"
        );
    }

    #[test]
    fn after_a_refused_connection_an_idle_one_anywhere_beats_a_free_slot() {
        let connections = Connections::new(4, 2, Duration::from_secs(1));
        counts(&connections, 1, 1, 0);
        assert_eq!(connections.pick(0, false), 0, "a free slot: its own");
        assert_eq!(connections.pick(0, true), 1, "refused: the idle one");
        counts(&connections, 1, 1, 1);
        assert_eq!(connections.pick(0, true), 0, "none idle: try its own again");
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
