//! Start-up and shutdown: build the proxy from validated settings, bind the
//! listeners, serve until SIGTERM/SIGINT, drain, exit.
//!
//! [`start`] is also what the demo and the integration tests use, so they
//! exercise the same wiring as production, on `127.0.0.1:0`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::config::Settings;
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

    let listener = TcpListener::bind(settings.server.listen)
        .await
        .map_err(|e| {
            format!(
                "server.listen: cannot listen on {}: {e}",
                settings.server.listen
            )
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("server.listen: {e}"))?;

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
            });
            (
                Some(tokio::spawn(admin::serve(admin_listener, state))),
                Some(admin_addr),
            )
        }
        None => (None, None),
    };

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
        };
        server::serve(listener, proxy, &server_settings, ready, either).await
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
    })
}

/// `ivrguard run`: the production entry point. `path` is where `settings`
/// came from; SIGHUP (and the optional poll) reload from it.
pub fn run(path: &Path, settings: Settings) -> Result<(), String> {
    let log = Arc::new(crate::logging::init(&settings.log));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let dropped = {
        let log = log.clone();
        Box::new(move || log.dropped_lines() as u64)
    };
    let drained = runtime.block_on(async {
        let shutdown = async {
            server::shutdown_signal().await;
            tracing::info!("shutdown signal received; draining (a second signal exits at once)");
            tokio::spawn(async {
                server::shutdown_signal().await;
                tracing::warn!("second shutdown signal; exiting without draining");
                std::process::exit(1);
            });
        };
        let started = start(&settings, dropped, shutdown).await?;
        let reloader = Reloader::new(path, started.proxy.clone(), settings.clone());
        let watcher = tokio::spawn(reloader.watch(settings.server.reload_poll_interval));
        let drained = started.wait().await;
        watcher.abort();
        Ok::<bool, String>(drained)
    })?;
    if drained {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!("drain timeout reached with requests still in flight; exiting");
    }
    Ok(())
}
