//! Start-up and shutdown: build the proxy from validated settings, bind the
//! listeners, serve until SIGTERM/SIGINT, drain, exit.
//!
//! Serving is thread-per-core: `server.workers` threads (one per CPU by
//! default), each with a single-threaded event loop, its own `SO_REUSEPORT`
//! socket on the listen address (it keeps every connection it accepts) and
//! its own pool of connections to the app. No request moves between threads, so
//! none waits for a wake-up from another core (measured: `bench/RESULTS.md`).
//!
//! [`start`] is also what the demo and the integration tests use, so they
//! exercise the same wiring as production, on `127.0.0.1:0`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::config::{ServerSettings, Settings};
use crate::heap_release;
use crate::metrics::Metrics;
use crate::reload::{self, Reloader, SharedProxy};
use crate::server::{self, Readiness};

/// A running proxy (and admin listener, if configured).
pub struct Started {
    pub addr: SocketAddr,
    /// The proxy in use; [`crate::reload::Reloader`] swaps it.
    pub proxy: SharedProxy,
    pub admin_addr: Option<SocketAddr>,
    pub readiness: Arc<Readiness>,
    stop: Option<oneshot::Sender<()>>,
    served: JoinHandle<bool>,
    admin: Option<JoinHandle<()>>,
    heap_release: JoinHandle<()>,
}

impl Started {
    /// Stops accepting, drains, and returns whether the drain finished in time.
    pub async fn stop(mut self) -> bool {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.wait().await
    }

    /// Waits until the server has stopped (after a signal or [`Self::stop`]).
    pub async fn wait(mut self) -> bool {
        let drained = (&mut self.served).await.unwrap_or(false);
        if let Some(admin) = self.admin.take() {
            admin.abort();
        }
        self.heap_release.abort();
        drained
    }
}

/// Binds the listeners and serves until `shutdown` resolves or
/// [`Started::stop`] is called.
pub async fn start(
    settings: &Settings,
    dropped_log_lines: Box<dyn Fn() -> u64 + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Started, String> {
    let proxy = reload::initial(settings, Arc::new(Metrics::new()));
    let readiness = Arc::new(Readiness::default());

    let listen = settings.server.listen;
    let cannot = |e: std::io::Error| format!("server.listen: cannot listen on {listen}: {e}");
    alone_on(listen).map_err(cannot)?;
    let listener = bind(listen).map_err(cannot)?;
    // The address actually bound: with port 0, the other workers' sockets
    // must join this one's port.
    let addr = listener
        .local_addr()
        .map_err(|e| format!("server.listen: {e}"))?;

    // One slot per callers' connection, shared by all workers.
    let slots = Arc::new(server::Slots::new(
        settings.server.max_connections,
        settings.server.max_connections_per_client,
    ));
    let (admin, admin_addr) = match settings.server.admin_listen {
        Some(admin_listen) => {
            let admin_listener = TcpListener::bind(admin_listen).await.map_err(|e| {
                format!("server.admin_listen: cannot listen on {admin_listen}: {e}")
            })?;
            let admin_addr = admin_listener
                .local_addr()
                .map_err(|e| format!("server.admin_listen: {e}"))?;
            let state = Arc::new(AdminState {
                proxy: proxy.clone(),
                readiness: readiness.clone(),
                dropped_log_lines,
                connection_slots: slots.clone(),
            });
            (
                Some(tokio::spawn(admin::serve(admin_listener, state))),
                Some(admin_addr),
            )
        }
        None => (None, None),
    };

    // Workers 1.. run on their own threads, each with its own socket on the
    // same port; this task is worker 0. One stop signal reaches them all.
    let (stop_workers, workers_stop) = watch::channel(false);
    let mut workers = Vec::new();
    for index in 1..settings.server.workers {
        let socket = bind(addr).and_then(|l| l.into_std()).map_err(cannot)?;
        let worker = Worker {
            index,
            listener: socket,
            proxy: proxy.clone(),
            settings: settings.server.clone(),
            readiness: readiness.clone(),
            slots: slots.clone(),
            stop: workers_stop.clone(),
        };
        workers.push(worker.spawn()?);
    }

    // Memory a burst of connections took goes back once they have closed.
    let heap_release = tokio::spawn(heap_release::after_bursts(slots.clone(), proxy.clone()));

    let (stop, stopped) = oneshot::channel::<()>();
    let server_settings = settings.server.clone();
    let ready = readiness.clone();
    let shared = proxy.clone();
    let served = tokio::spawn(async move {
        let either = async move {
            tokio::select! {
                () = shutdown => {},
                _ = stopped => {},
            }
            let _ = stop_workers.send(true);
        };
        let drained = server::serve(listener, proxy, &server_settings, ready, slots, either).await;
        let others = tokio::task::spawn_blocking(move || {
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap_or(false))
                .fold(true, |all, one| all & one)
        })
        .await
        .unwrap_or(false);
        drained & others
    });
    let admin_text = admin_addr.map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(listen = %addr, admin_listen = %admin_text, "ivrguard listening");
    Ok(Started {
        addr,
        proxy: shared,
        admin_addr,
        readiness,
        stop: Some(stop),
        served,
        admin,
        heap_release,
    })
}

/// One worker's listening socket. Every worker binds the same address with
/// `SO_REUSEPORT`, so the kernel spreads new connections across them by a
/// hash of the client's address and port: even on average, not for a few
/// connections (wrk's 32 split from 16/18 to 21/12 here; handing connections
/// over to even that out was measured and not kept, `bench/RESULTS.md`).
/// One shared socket would be worse: whichever thread wakes first takes a
/// whole burst. The kernel backlog (1,024) holds connections past
/// `server.max_connections` until one ends.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket_for(addr)?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Fails if a socket already listens on `addr`. [`bind`]'s `SO_REUSEPORT`
/// lets any process of the same user join a port: a second ivrguard (an old
/// one left running, with another config) started without a word and took
/// about half the calls (found in review). A socket without it cannot bind
/// where another listens, so it is bound first, then closed. Port 0 is
/// always free.
fn alone_on(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = socket_for(addr)?;
    probe.set_reuseaddr(true)?; // connections in TIME_WAIT do not count
    match probe.bind(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(std::io::Error::new(
            e.kind(),
            "another process already listens there (an ivrguard still running?)",
        )),
        other => other,
    }
}

/// A TCP socket of `addr`'s family.
fn socket_for(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
}

/// A worker after the first: its own thread and single-threaded event loop,
/// serving the connections it accepts on its own socket.
struct Worker {
    index: usize,
    listener: std::net::TcpListener,
    proxy: SharedProxy,
    settings: ServerSettings,
    readiness: Arc<Readiness>,
    slots: Arc<server::Slots>,
    stop: watch::Receiver<bool>,
}

impl Worker {
    /// Starts the thread; joining it says whether its drain finished in time.
    fn spawn(self) -> Result<std::thread::JoinHandle<bool>, String> {
        std::thread::Builder::new()
            .name(format!("ivrguard-w{}", self.index))
            .spawn(move || self.run())
            .map_err(|e| format!("cannot start a worker thread: {e}"))
    }

    fn run(self) -> bool {
        crate::worker::set_index(self.index);
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(crate::log_handoff::hand_over)
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, worker = self.index, "cannot start a worker's event loop");
                return false;
            }
        };
        let _deferral = crate::log_handoff::Deferral::on_this_thread();
        runtime.block_on(async move {
            let listener = match TcpListener::from_std(self.listener) {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::error!(error = %e, worker = self.index, "cannot use the listener");
                    return false;
                }
            };
            let mut stop = self.stop;
            let stopped = async move {
                // A dropped sender (worker 0 gone) stops this worker too.
                let _ = stop.wait_for(|stop| *stop).await;
            };
            server::serve(
                listener,
                self.proxy,
                &self.settings,
                self.readiness,
                self.slots,
                stopped,
            )
            .await
        })
    }
}

/// `ivrguard run`: the production entry point. `path` is where `settings`
/// came from; SIGHUP (and the optional poll) reload from it.
pub fn run(path: &Path, settings: Settings) -> Result<(), String> {
    let log = Arc::new(crate::logging::init(&settings.log));
    // This thread is worker 0; `start` adds the others (`server.workers`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(crate::log_handoff::hand_over)
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let dropped = {
        let log = log.clone();
        Box::new(move || log.dropped_lines() as u64)
    };
    let deferral = crate::log_handoff::Deferral::on_this_thread();
    let drained = runtime.block_on(async {
        let log = log.clone();
        // Caught from here on, before anything serves (signals.rs).
        let mut signals = crate::signals::Shutdown::install();
        let hangup = crate::signals::hangup();
        let shutdown = async move {
            signals.next().await;
            tracing::info!("shutdown signal received; draining (a second signal exits at once)");
            tokio::spawn(async move {
                signals.next().await;
                tracing::warn!("second shutdown signal; exiting without draining");
                // `exit` runs no destructors: the queued lines, this one
                // included, are written first (they were lost), after the
                // lines every worker holds (log_handoff: one buffer).
                crate::log_handoff::hand_over();
                log.finish();
                std::process::exit(1);
            });
        };
        let started = start(&settings, dropped, shutdown).await?;
        // What `check` warns about, in the log too: `run` and reloads never
        // printed it (found in review: a pasted Account SID as the token was
        // taken without a word, and the app refused every call).
        for warning in crate::check::warnings(&settings) {
            tracing::warn!("configuration warning: {warning}");
        }
        let reloader = Reloader::new(path, started.proxy.clone(), settings.clone());
        let watcher = tokio::spawn(reloader.watch(settings.server.reload_poll_interval, hangup));
        // Start-up's code has run.
        tokio::spawn(crate::heap_release::after_code_ran_once("start-up"));
        let drained = started.wait().await;
        watcher.abort();
        Ok::<bool, String>(drained)
    })?;
    drop(deferral);
    if drained {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!("drain timeout reached with requests still in flight; exiting");
    }
    Ok(())
}
