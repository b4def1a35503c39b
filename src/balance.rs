//! Spreading client connections evenly over the workers.
//!
//! Each worker accepts on its own `SO_REUSEPORT` socket (see [`crate::run`]).
//! The kernel picks the socket by a hash of the client's address and port,
//! which is even only on average: 32 connections measured here split 18/14,
//! 20/12 or 21/11 between two workers, and the worker with more waits
//! longer for CPU on each request, so p99 follows the unlucky side. Every
//! connection stays on one worker for its whole life, so the imbalance
//! lasts as long as the connections do (a Twilio region's keep-alive pool,
//! a load generator's).
//!
//! The rule here: the worker that accepts a connection keeps it unless
//! another serving worker has fewer open connections; then it hands the
//! socket over to the one with the fewest, through that worker's inbox, and
//! that worker serves it like one it accepted. A hand-off costs one
//! cross-thread wake-up when the connection opens; requests on it never
//! leave the worker that serves it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::sync::OwnedSemaphorePermit;

/// A connection on its way to the worker that will serve it, with the
/// connection slot it holds (`server.max_connections`).
pub struct Arrival {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub permit: OwnedSemaphorePermit,
    pub open: Open,
}

/// A socket handed from one worker to another: not registered with either
/// event loop while in transit.
struct Handed {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    open: Open,
}

/// A worker not accepting connections (not started yet, or draining): no
/// connection is handed to it.
const NOT_SERVING: usize = usize::MAX;

/// The workers' open-connection counts and inboxes.
pub struct Balance {
    open: Box<[AtomicUsize]>,
    inboxes: Box<[mpsc::UnboundedSender<Handed>]>,
}

impl std::fmt::Debug for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balance")
            .field("open", &self.open_connections())
            .finish()
    }
}

/// One worker's end: its index, and where connections handed to it arrive.
pub struct Seat {
    balance: Arc<Balance>,
    index: usize,
    inbox: mpsc::UnboundedReceiver<Handed>,
}

impl Balance {
    /// The shared state for `workers` workers and each worker's seat.
    pub fn new(workers: usize) -> (Arc<Self>, Vec<Seat>) {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let balance = Arc::new(Self {
            open: (0..workers)
                .map(|_| AtomicUsize::new(NOT_SERVING))
                .collect(),
            inboxes: senders.into_boxed_slice(),
        });
        let seats = receivers
            .into_iter()
            .enumerate()
            .map(|(index, inbox)| Seat {
                balance: balance.clone(),
                index,
                inbox,
            })
            .collect();
        (balance, seats)
    }

    /// Open client connections per worker; `None` for a worker not serving.
    pub fn open_connections(&self) -> Vec<Option<usize>> {
        self.open
            .iter()
            .map(|open| match open.load(Ordering::Relaxed) {
                NOT_SERVING => None,
                n => Some(n),
            })
            .collect()
    }

    /// The worker that should serve a connection `here` accepted: `here`
    /// unless another serving worker has fewer open connections. Counts the
    /// connection on that worker at once, so that connections accepted at
    /// the same moment by two workers do not both go to the same one.
    fn place(self: &Arc<Self>, here: usize) -> (usize, Open) {
        let count = |i: usize| self.open[i].load(Ordering::Relaxed);
        let mut best = here;
        for i in 0..self.open.len() {
            if count(i) < count(best) {
                best = i;
            }
        }
        (best, self.count_on(best))
    }

    fn count_on(self: &Arc<Self>, worker: usize) -> Open {
        self.open[worker].fetch_add(1, Ordering::Relaxed);
        Open {
            balance: self.clone(),
            worker,
        }
    }
}

/// One open connection, counted on its worker until dropped.
pub struct Open {
    balance: Arc<Balance>,
    worker: usize,
}

impl Drop for Open {
    fn drop(&mut self) {
        // A worker that stopped serving stays at NOT_SERVING.
        let _ = self.balance.open[self.worker].fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |n| (n != NOT_SERVING).then(|| n.saturating_sub(1)),
        );
    }
}

impl Seat {
    /// Marks this worker as serving: connections may be handed to it.
    pub fn serving(&self) {
        self.balance.open[self.index].store(0, Ordering::Relaxed);
    }

    /// Marks this worker as not serving (draining): no more hand-offs.
    /// Connections already in its inbox are closed with it.
    pub fn leaving(&mut self) {
        self.balance.open[self.index].store(NOT_SERVING, Ordering::Relaxed);
        self.inbox.close();
    }

    /// The next connection handed over by another worker. Pending for ever
    /// if there is only one worker.
    pub async fn handed(&mut self) -> Option<Arrival> {
        loop {
            let handed = self.inbox.recv().await?;
            match TcpStream::from_std(handed.stream) {
                Ok(stream) => {
                    return Some(Arrival {
                        stream,
                        peer: handed.peer,
                        permit: handed.permit,
                        open: handed.open,
                    })
                }
                Err(e) => tracing::warn!(error = %e, "cannot take over a connection"),
            }
        }
    }

    /// A connection this worker accepted: back to serve here, or `None` if
    /// it went to a worker with fewer open connections.
    pub fn place(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Option<Arrival> {
        let (worker, open) = self.balance.place(self.index);
        if worker == self.index {
            return Some(Arrival {
                stream,
                peer,
                permit,
                open,
            });
        }
        // Leaves this event loop; the other worker's registers it again.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand over a connection");
                return None;
            }
        };
        let handed = Handed {
            stream,
            peer,
            permit,
            open,
        };
        match self.balance.inboxes[worker].send(handed) {
            Ok(()) => None,
            // That worker is leaving: serve it here after all.
            Err(mpsc::error::SendError(handed)) => {
                let open = self.balance.count_on(self.index);
                match TcpStream::from_std(handed.stream) {
                    Ok(stream) => Some(Arrival {
                        stream,
                        peer,
                        permit: handed.permit,
                        open,
                    }),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot take back a connection");
                        None
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving(workers: usize) -> (Arc<Balance>, Vec<Seat>) {
        let (balance, seats) = Balance::new(workers);
        seats.iter().for_each(Seat::serving);
        (balance, seats)
    }

    #[test]
    fn a_worker_keeps_a_connection_unless_another_has_fewer() {
        let (balance, _seats) = serving(3);
        // All at 0: a tie keeps the connection where it was accepted.
        let (first, _a) = balance.place(1);
        assert_eq!(first, 1);
        // Worker 1 has one more than 0 and 2: the lowest index with fewest.
        let (second, _b) = balance.place(1);
        assert_eq!(second, 0);
        let (third, _c) = balance.place(1);
        assert_eq!(third, 2);
        assert_eq!(balance.open_connections(), [Some(1), Some(1), Some(1)]);
    }

    #[test]
    fn a_closed_connection_is_uncounted() {
        let (balance, _seats) = serving(2);
        let (_, open) = balance.place(0);
        assert_eq!(balance.open_connections(), [Some(1), Some(0)]);
        drop(open);
        assert_eq!(balance.open_connections(), [Some(0), Some(0)]);
    }

    #[test]
    fn nothing_goes_to_a_worker_not_serving() {
        let (balance, mut seats) = Balance::new(2);
        seats[0].serving();
        // Worker 1 has not started: worker 0 keeps everything.
        let opened: Vec<_> = (0..3).map(|_| balance.place(0)).collect();
        assert!(opened.iter().all(|(worker, _)| *worker == 0));
        seats[1].serving();
        assert_eq!(balance.place(0).0, 1);
        // Draining: its count stays "not serving" as its connections close.
        seats[0].leaving();
        drop(opened);
        assert_eq!(balance.open_connections(), [None, Some(0)]);
        assert_eq!(balance.place(1).0, 1);
    }
}
