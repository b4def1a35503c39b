//! Reloading config and secrets while serving.
//!
//! The proxy in use sits in an [`ArcSwap`]: each request takes a snapshot
//! when it starts, so a reload never changes a request in flight. A reload
//! (SIGHUP, or a change seen by the optional poll of the config file and
//! `*_file` secrets) loads and validates everything first; only a complete,
//! valid new [`Proxy`] replaces the old one. A bad config is logged (one
//! line naming the key, never a value) and the old one keeps serving.
//!
//! The TLS listener's certificate and key are reloaded like the rest (their
//! files are in the poll's fingerprint, so a renewed certificate in a
//! Kubernetes Secret is picked up): new connections get the new certificate,
//! open ones keep theirs.
//!
//! Listener addresses cannot move without a restart, nor can the listener
//! switch between plain HTTP and TLS; a reload that changes them is refused
//! the same way, as is one that changes `log.format`. The other `[log]` keys
//! (level, scrub patterns, card numbers) are applied to the lines logged
//! after the reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::cipher::FieldCipher;
use crate::config::{self, SecretSource, Settings};
use crate::metrics::Metrics;
use crate::pipeline::Proxy;

/// The proxy requests are served with, swapped atomically on reload.
pub type SharedProxy = Arc<ArcSwap<Proxy>>;

/// Builds the first proxy.
pub fn initial(settings: &Settings, metrics: Arc<Metrics>) -> SharedProxy {
    let cipher = Arc::new(FieldCipher::new(&settings.encryption.key));
    Arc::new(ArcSwap::from_pointee(Proxy::new(settings, cipher, metrics)))
}

/// Everything a reload needs to know about the running instance.
pub struct Reloader {
    path: PathBuf,
    shared: SharedProxy,
    running: Settings,
    fingerprint: [u8; 32],
    /// The files' state when a reload was last refused: not retried (or
    /// logged again) until they change once more.
    refused: Option<[u8; 32]>,
}

/// Why `new` cannot be applied by a reload, if it cannot: what the
/// listeners and workers read once, when they start (found in review: a
/// reload said "reloaded" and kept the old values of some of these).
fn needs_restart(new: &Settings, old: &Settings) -> Option<String> {
    let log_format_changed = new.log.format != old.log.format;
    let (new, old) = (&new.server, &old.server);
    let fixed = [
        (
            "server.listen/server.admin_listen",
            "changing a listener",
            new.listen != old.listen || new.admin_listen != old.admin_listen,
        ),
        (
            "server.workers",
            "changing the number of workers",
            new.workers != old.workers,
        ),
        (
            "server.tls_cert_file/server.tls_key_file",
            "turning TLS on or off",
            new.tls.is_some() != old.tls.is_some(),
        ),
        (
            "server.header_read_timeout_ms",
            "changing it",
            new.header_read_timeout != old.header_read_timeout,
        ),
        (
            "server.drain_timeout_ms",
            "changing it",
            new.drain_timeout != old.drain_timeout,
        ),
        (
            "server.max_connections",
            "changing it",
            new.max_connections != old.max_connections,
        ),
        (
            "server.reload_poll_interval_ms",
            "changing it",
            new.reload_poll_interval != old.reload_poll_interval,
        ),
        ("server.http2", "changing it", new.http2 != old.http2),
        // The other `[log]` keys are applied (`logging::apply`).
        ("log.format", "changing it", log_format_changed),
    ];
    let (key, what, _) = fixed.iter().find(|(_, _, changed)| *changed)?;
    Some(format!("{key}: {what} needs a restart"))
}

impl Reloader {
    pub fn new(path: &Path, shared: SharedProxy, running: Settings) -> Self {
        let fingerprint = fingerprint(path, &running);
        Reloader {
            path: path.to_owned(),
            shared,
            running,
            fingerprint,
            refused: None,
        }
    }

    /// Loads, validates and swaps in a new proxy; on error the old one stays.
    pub fn reload(&mut self) -> Result<(), String> {
        let result = self.try_reload();
        self.refused = result
            .is_err()
            .then(|| fingerprint(&self.path, &self.running));
        result
    }

    fn try_reload(&mut self) -> Result<(), String> {
        let settings =
            Settings::load(&self.path, &config::process_env()).map_err(|e| e.to_string())?;
        if let Some(refusal) = needs_restart(&settings, &self.running) {
            return Err(refusal);
        }
        let current = self.shared.load();
        // Same key: keep the cipher, so its encryption count carries on.
        let cipher = if settings
            .encryption
            .key
            .same_as(&self.running.encryption.key)
        {
            current.cipher_arc()
        } else {
            Arc::new(FieldCipher::new(&settings.encryption.key))
        };
        let mut proxy = Proxy::new(&settings, cipher, current.metrics_arc());
        if settings.upstream.same_connections(&self.running.upstream) {
            proxy.keep_upstream_of(&current);
        }
        self.shared.store(Arc::new(proxy));
        crate::logging::apply(&settings.log);
        self.fingerprint = fingerprint(&self.path, &settings);
        self.running = settings;
        Ok(())
    }

    /// Whether the config file or a `*_file` secret changed since the last
    /// (re)load.
    pub fn changed(&self) -> bool {
        let now = fingerprint(&self.path, &self.running);
        now != self.fingerprint && Some(now) != self.refused
    }

    /// Reloads on SIGHUP, and on change every `poll` if set. Runs until the
    /// task is dropped.
    pub async fn watch(mut self, poll: Option<Duration>) {
        let mut hangup = hangup_signal();
        let mut ticker = poll.map(tokio::time::interval);
        loop {
            let poll_tick = async {
                match ticker.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let trigger = tokio::select! {
                () = next(&mut hangup) => "sighup",
                () = poll_tick => {
                    if !self.changed() {
                        continue;
                    }
                    "file_changed"
                }
            };
            match self.reload() {
                Ok(()) => tracing::info!(trigger, "configuration reloaded"),
                Err(error) => {
                    tracing::error!(trigger, %error, "configuration reload refused; the running configuration stays")
                }
            }
        }
    }
}

/// SHA-256 over the config file, every `*_file` secret it names and the TLS
/// certificate and key.
/// Unreadable files hash as absent, so their disappearance is a change.
fn fingerprint(path: &Path, settings: &Settings) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut files = vec![path.to_owned()];
    let twilio = &settings.twilio;
    let sources = std::iter::once(&twilio.auth_token_source)
        .chain(twilio.secondary_auth_token_source.iter())
        .chain(twilio.shared_key_sources.iter().map(|(_, s)| s))
        .chain(std::iter::once(&settings.encryption.key_source));
    files.extend(sources.filter_map(|s| match s {
        SecretSource::File(p) => Some(p.clone()),
        SecretSource::Env(_) => None,
    }));
    if let Some(tls) = &settings.server.tls {
        files.extend([tls.cert_file.clone(), tls.key_file.clone()]);
    }
    for file in files {
        // Secrets and the TLS key pass through here: zeroed after hashing.
        let content = zeroize::Zeroizing::new(
            crate::config_file::read(&file, crate::config_file::CONFIG_LIMIT).unwrap_or_default(),
        );
        hasher.update((content.len() as u64).to_le_bytes());
        hasher.update(Sha256::digest(&content));
    }
    hasher.finalize().into()
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

async fn next(hangup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(signal) = hangup.as_mut() {
        signal.recv().await;
        return;
    }
    let _ = hangup;
    std::future::pending::<()>().await
}
