//! Ending connections well: all of them when the server drains (SIGTERM),
//! and an HTTP/2 connection on its own when it has been idle.
//!
//! Either way the connection is asked to shut down gracefully (hyper's
//! `graceful_shutdown`: HTTP/1 closes after the response in progress,
//! HTTP/2 sends GOAWAY and finishes its open streams); it is dropped only
//! if it has not finished a request timeout later.
//!
//! HTTP/2 needs the idle limit because nothing else ends an idle HTTP/2
//! connection: hyper's keep-alive pings only close one whose peer stops
//! answering, so a peer that answers could hold a `max_connections` slot
//! for ever with nothing in flight (found in review). HTTP/1 needs none:
//! hyper's header-read timeout runs while a keep-alive connection waits for
//! its next request. (hyper-util's graceful watcher, used here before,
//! cannot take a second reason to shut down: its connection trait is
//! sealed.)

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Tells every connection to drain, and waits for them.
pub struct Drain {
    tx: watch::Sender<()>,
}

/// One connection's end of a [`Drain`]: the drain waits until it is gone.
pub struct Watcher(watch::Receiver<()>);

impl Default for Drain {
    fn default() -> Self {
        Drain {
            tx: watch::channel(()).0,
        }
    }
}

impl Drain {
    pub fn watcher(&self) -> Watcher {
        Watcher(self.tx.subscribe())
    }

    /// Connections not finished yet.
    pub fn count(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Asks every connection to shut down gracefully and waits until all
    /// have ended.
    pub async fn shutdown(self) {
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}

/// Serves `conn` to its end. When the drain starts, or when `idle` (if
/// given) says the connection has had nothing to do, `shut_down` asks it to
/// finish gracefully, and it is served until it has, for `grace` at most:
/// then it is dropped, and `None` returned.
///
/// The grace is the request timeout, by which every request in progress
/// has been answered. Without it, an HTTP/2 peer that never opens its
/// flow-control window held its connection for ever (found in review):
/// the request was done, so the connection counted as idle and was asked
/// to shut down, but hyper waited to send the response body it had no
/// window for, while the peer answered every ping and the socket stayed
/// empty, so the write-stall limit never fired either.
pub async fn serve<C: Future>(
    conn: C,
    shut_down: impl FnOnce(Pin<&mut C>),
    watcher: Watcher,
    idle: Option<(Streams, Duration)>,
    grace: Duration,
) -> Option<C::Output> {
    let Watcher(mut drain) = watcher;
    let mut conn = pin!(conn);
    let idle = async {
        match idle {
            Some((streams, limit)) => streams.idle_for(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        ended = conn.as_mut() => return Some(ended),
        // A closed channel (the server gone) drains too.
        _ = drain.changed() => {}
        () = idle => {}
    }
    shut_down(conn.as_mut());
    let ended = tokio::time::timeout(grace, conn).await.ok();
    drop(drain); // the drain counts this connection until here
    ended
}

/// The requests one connection has in flight, and a count of every begin
/// and end.
#[derive(Clone, Default)]
pub struct Streams(Arc<Counts>);

#[derive(Default)]
struct Counts {
    open: AtomicUsize,
    changes: AtomicU64,
}

/// One request in flight; dropping it (answered or cancelled) ends it.
struct Open(Streams);

impl Drop for Open {
    fn drop(&mut self) {
        self.0 .0.open.fetch_sub(1, Ordering::Relaxed);
        self.0 .0.changes.fetch_add(1, Ordering::Relaxed);
    }
}

/// A request's future that counts as in flight until it is done or
/// dropped.
pub struct Counted<F> {
    future: F,
    _open: Open,
}

impl<F: Future + Unpin> Future for Counted<F> {
    type Output = F::Output;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        Pin::new(&mut self.future).poll(cx)
    }
}

impl Streams {
    /// `future`, counted while it runs.
    pub fn count<F>(&self, future: F) -> Counted<F> {
        Counted {
            future,
            _open: self.begin(),
        }
    }

    fn begin(&self) -> Open {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        self.0.changes.fetch_add(1, Ordering::Relaxed);
        Open(self.clone())
    }

    /// Resolves once a whole `limit` has passed with no request in flight,
    /// begun or ended: after between one and two `limit`s of idleness.
    async fn idle_for(&self, limit: Duration) {
        let mut ticks = tokio::time::interval(limit);
        ticks.tick().await; // the first tick is immediate
        let mut changes = self.0.changes.load(Ordering::Relaxed);
        loop {
            ticks.tick().await;
            let now = self.0.changes.load(Ordering::Relaxed);
            if now == changes && self.0.open.load(Ordering::Relaxed) == 0 {
                return;
            }
            changes = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_needs_a_whole_period_with_nothing_begun_or_open() {
        let streams = Streams::default();
        let limit = Duration::from_secs(10);
        let started = tokio::time::Instant::now();
        streams.idle_for(limit).await;
        assert_eq!(started.elapsed(), limit);

        // A request in flight holds it off; its end counts as activity.
        let held = streams.count(std::future::ready(()));
        let idle = streams.idle_for(limit);
        let mut idle = pin!(idle);
        let at = tokio::time::Instant::now();
        tokio::select! {
            () = &mut idle => panic!("idle with a request in flight"),
            () = tokio::time::sleep(limit * 5) => {}
        }
        drop(held);
        idle.await;
        let waited = at.elapsed();
        assert!(waited >= limit * 6 && waited <= limit * 7, "{waited:?}");
    }

    #[tokio::test]
    async fn shutdown_waits_for_every_watcher() {
        let drain = Drain::default();
        let watcher = drain.watcher();
        assert_eq!(drain.count(), 1);
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
        let conn = async move {
            let _ = ended_rx.await;
        };
        let served = tokio::spawn(serve(
            conn,
            move |_| {
                let _ = ended_tx.send(());
            },
            watcher,
            None,
            Duration::from_secs(5),
        ));
        drain.shutdown().await;
        assert_eq!(served.await.unwrap(), Some(()));
    }

    /// A connection that does not finish once asked to is dropped after
    /// the grace.
    #[tokio::test(start_paused = true)]
    async fn a_connection_that_does_not_finish_is_dropped_after_the_grace() {
        let drain = Drain::default();
        let grace = Duration::from_secs(14);
        let conn = std::future::pending::<()>();
        let served = tokio::spawn(serve(conn, |_| {}, drain.watcher(), None, grace));
        let started = tokio::time::Instant::now();
        drain.shutdown().await;
        assert_eq!(served.await.unwrap(), None);
        assert_eq!(started.elapsed(), grace);
    }
}
