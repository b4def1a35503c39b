//! The signals ivrguard acts on: SIGTERM and SIGINT drain it (a second one
//! exits at once), SIGHUP reloads its configuration.
//!
//! Each is caught from when its listener is made; before that, its default
//! action ends the process. So all are made before serving starts, and the
//! shutdown listeners are kept for the second signal (found in review: a
//! SIGHUP before the reloader's task first ran ended the process, and a
//! second SIGTERM before its task ran was swallowed).

/// One signal's listener: never fires if it could not be installed (rather
/// than, say, start a drain at once).
pub struct Listener(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

impl Listener {
    #[cfg(unix)]
    fn install(kind: tokio::signal::unix::SignalKind) -> Self {
        Listener(tokio::signal::unix::signal(kind).ok())
    }

    /// Resolves on the next delivery of the signal.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = self.0.as_mut() {
            if signal.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}

/// SIGHUP.
pub fn hangup() -> Listener {
    #[cfg(unix)]
    return Listener::install(tokio::signal::unix::SignalKind::hangup());
    #[cfg(not(unix))]
    Listener()
}

/// SIGTERM and SIGINT.
pub struct Shutdown {
    #[cfg(unix)]
    term: Listener,
    #[cfg(unix)]
    int: Listener,
}

impl Shutdown {
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::SignalKind;
            Shutdown {
                term: Listener::install(SignalKind::terminate()),
                int: Listener::install(SignalKind::interrupt()),
            }
        }
        #[cfg(not(unix))]
        Shutdown {}
    }

    /// Resolves on the next SIGTERM or SIGINT.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            () = self.term.next() => {},
            () = self.int.next() => {},
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
