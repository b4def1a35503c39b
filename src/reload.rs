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
    /// The watched files as they were when the running settings were read
    /// (hashed before reading them, so a change during the read is seen).
    fingerprint: [u8; 32],
    /// Why the last reload was refused, while it stands. The poll then
    /// tries again every tick, whatever the fingerprint says: the new
    /// config may name a file the running one does not (a secondary token
    /// whose Secret arrives after the ConfigMap), which the fingerprint
    /// does not cover (found in review: such a reload was never retried).
    /// A refusal is logged again only when its reason changes.
    refusal: Option<String>,
}

/// A reload that was applied.
#[derive(Debug)]
pub struct Reloaded {
    /// The keys whose values changed, in config order (a secret is named by
    /// its `_env`/`_file` key; its value is never shown). Empty when the
    /// files were read anew and said the same.
    pub changed: Vec<String>,
    /// What `check` would warn about in the new settings.
    pub warnings: Vec<String>,
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
        let fingerprint = fingerprint(&watched_files(path, &running));
        Reloader {
            path: path.to_owned(),
            shared,
            running,
            fingerprint,
            refusal: None,
        }
    }

    /// Loads, validates and swaps in a new proxy; on error the old one
    /// stays, and the error is kept until a reload succeeds. The log
    /// settings are applied by [`Reloader::apply_log`], after the caller
    /// has logged the reload.
    pub fn reload(&mut self) -> Result<Reloaded, String> {
        let result = self.try_reload();
        self.refusal = result.as_ref().err().cloned();
        result
    }

    fn try_reload(&mut self) -> Result<Reloaded, String> {
        let files = watched_files(&self.path, &self.running);
        let before = fingerprint(&files);
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
        let new_files = watched_files(&self.path, &settings);
        // The same files: their state before the read, so a change made
        // while they were read is a change at the next poll. Other files
        // (rare: a secret or certificate moved): hashed now.
        self.fingerprint = match new_files == files {
            true => before,
            false => fingerprint(&new_files),
        };
        let reloaded = Reloaded {
            changed: changed_keys(&self.running, &settings),
            warnings: crate::check::warnings(&settings),
        };
        self.running = settings;
        Ok(reloaded)
    }

    /// Applies the running `[log]` settings (level, scrubbing) to the lines
    /// logged from now on.
    pub fn apply_log(&self) {
        crate::logging::apply(&self.running.log);
    }

    /// Whether the poll should reload: the config file or a file it names
    /// changed since the last (re)load, or the last reload was refused.
    pub fn due(&self) -> bool {
        self.refusal.is_some()
            || fingerprint(&watched_files(&self.path, &self.running)) != self.fingerprint
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
                    if !self.due() {
                        continue;
                    }
                    "file_changed"
                }
            };
            let refused_before = self.refusal.clone();
            match self.reload() {
                Ok(reloaded) => {
                    log_reloaded(trigger, &reloaded);
                    self.apply_log();
                    for warning in &reloaded.warnings {
                        tracing::warn!(trigger, "configuration warning: {warning}");
                    }
                }
                // The poll retries a refused reload every tick: the same
                // refusal again is not news. A SIGHUP is always answered.
                Err(error) if trigger != "sighup" && refused_before.as_ref() == Some(&error) => {}
                Err(error) => {
                    tracing::error!(trigger, %error, "configuration reload refused; the running configuration stays")
                }
            }
        }
    }
}

/// The reload's line. Logged before the new level applies, so a level
/// that hides INFO lines does not hide its own reload (found in review:
/// `level = "warn"` silenced the line saying it was applied, and the
/// access lines stopped with no word why).
fn log_reloaded(trigger: &str, reloaded: &Reloaded) {
    let changed = match reloaded.changed.is_empty() {
        true => "nothing".to_string(),
        false => reloaded.changed.join(", "),
    };
    tracing::info!(trigger, changed = %changed, "configuration reloaded");
}

/// The keys whose effective values differ between `old` and `new`, by
/// their [`Settings::describe`] lines (which show where each secret comes
/// from, not what it is), then the secrets read from the same place whose
/// values changed.
fn changed_keys(old: &Settings, new: &Settings) -> Vec<String> {
    let (old_lines, new_lines) = (keyed_lines(&old.describe()), keyed_lines(&new.describe()));
    let mut changed: Vec<String> = new_lines
        .iter()
        .filter(|line| !old_lines.contains(line))
        .map(|(key, _)| key.clone())
        .collect();
    for (key, _) in &old_lines {
        if !new_lines.iter().any(|(k, _)| k == key) && !changed.contains(key) {
            changed.push(key.clone());
        }
    }
    // A secret set or unset: `# secondary_auth_token is not set` on one
    // side, `secondary_auth_token_file = …` on the other; name the latter.
    let named = changed.clone();
    changed.retain(|key| {
        !named
            .iter()
            .any(|other| other.starts_with(&format!("{key}_")))
    });
    let secret = |table: &str, name: &str, source: &SecretSource| {
        let suffix = match source {
            SecretSource::Env(_) => "env",
            SecretSource::File(_) => "file",
        };
        format!("{table}.{name}_{suffix}")
    };
    let (o, n) = (&old.twilio, &new.twilio);
    let mut values = vec![(
        secret("twilio", "auth_token", &n.auth_token_source),
        o.auth_token_source == n.auth_token_source && !o.auth_token.same_as(&n.auth_token),
    )];
    if let (Some(os), Some(ns), Some(source)) = (
        &o.secondary_auth_token,
        &n.secondary_auth_token,
        &n.secondary_auth_token_source,
    ) {
        values.push((
            secret("twilio", "secondary_auth_token", source),
            o.secondary_auth_token_source == n.secondary_auth_token_source && !os.same_as(ns),
        ));
    }
    for (i, ((id, ns), (_, source))) in n.shared_keys.iter().zip(&n.shared_key_sources).enumerate()
    {
        let before = o
            .shared_keys
            .iter()
            .zip(&o.shared_key_sources)
            .find(|((oid, _), _)| oid == id);
        if let Some(((_, os), (_, old_source))) = before {
            values.push((
                secret(&format!("twilio.shared_keys[{i}]"), "secret", source),
                old_source == source && !os.same_as(ns),
            ));
        }
    }
    values.push((
        secret("encryption", "key", &new.encryption.key_source),
        old.encryption.key_source == new.encryption.key_source
            && !old.encryption.key.same_as(&new.encryption.key),
    ));
    for (key, value_changed) in values {
        if value_changed && !changed.contains(&key) {
            changed.push(key);
        }
    }
    changed
}

/// `describe`'s lines keyed by `table.key` (`twilio.shared_keys[0].id`);
/// a `# key is not set` comment counts as that key's line.
fn keyed_lines(described: &str) -> Vec<(String, String)> {
    let mut table = String::new();
    let mut arrays: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for line in described.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            let index = arrays.iter().filter(|a| *a == name).count();
            arrays.push(name.to_string());
            table = format!("{name}[{index}]");
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = name.to_string();
        } else {
            let key = match line.strip_prefix("# ") {
                Some(comment) => comment.split_whitespace().next().unwrap_or_default(),
                None => line.split(" = ").next().unwrap_or_default(),
            };
            out.push((format!("{table}.{key}"), line.to_string()));
        }
    }
    out
}

/// The config file, every `*_file` secret it names and the TLS certificate
/// and key.
fn watched_files(path: &Path, settings: &Settings) -> Vec<PathBuf> {
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
    files
}

/// SHA-256 over `files`' contents. Unreadable files hash as absent, so
/// their disappearance is a change.
fn fingerprint(files: &[PathBuf]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for file in files {
        // Secrets and the TLS key pass through here: zeroed after hashing.
        let content = zeroize::Zeroizing::new(
            crate::config_file::read(file, crate::config_file::CONFIG_LIMIT).unwrap_or_default(),
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
