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
    /// The files the config on disk names, each with the hash of its
    /// contents, as they were just before the last reload read them (so a
    /// change made during a read is a change at the next poll). The list
    /// comes from the TOML on disk, not from the running settings: a new
    /// config that names a secret file the running one does not (a
    /// secondary token whose Secret arrives after the ConfigMap) has that
    /// file watched while its reload is refused (found in review: such a
    /// reload was never tried again).
    files: Vec<(PathBuf, [u8; 32])>,
    /// Whether the last reload was refused: a later one that loads is
    /// logged even if nothing changed, so the refusal is seen to be over.
    refused: bool,
    /// Whether a reload ran since start. The running settings were loaded
    /// before `files` was hashed, so the first poll reloads anyway: a
    /// Secret updated while ivrguard started is not missed (found in
    /// review). Silent if nothing changed.
    reloaded_once: bool,
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
            "server.max_connections_per_client",
            "changing it",
            new.max_connections_per_client != old.max_connections_per_client,
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
    /// `running` was loaded from `path` just before.
    pub fn new(path: &Path, shared: SharedProxy, running: Settings) -> Self {
        let files = hashed(Settings::named_files(path, &config::process_env()));
        Reloader {
            path: path.to_owned(),
            shared,
            running,
            files,
            refused: false,
            reloaded_once: false,
        }
    }

    /// Loads, validates and swaps in a new proxy; on error the old one
    /// stays. The log settings are applied by [`Reloader::apply_log`],
    /// once the caller has logged the reload.
    pub fn reload(&mut self) -> Result<Reloaded, String> {
        let now = hashed(self.named_files());
        let previous = std::mem::replace(&mut self.files, now);
        let result = self.try_reload(&previous);
        self.refused = result.is_err();
        self.reloaded_once = true;
        result
    }

    fn named_files(&self) -> Vec<PathBuf> {
        Settings::named_files(&self.path, &config::process_env())
    }

    fn try_reload(&mut self, previous: &[(PathBuf, [u8; 32])]) -> Result<Reloaded, String> {
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
        let mut changed = changed_keys(&self.running, &settings);
        changed.extend(renewed_tls_files(&settings, previous, &self.files));
        let reloaded = Reloaded {
            changed,
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

    /// Whether the poll should reload: the config file, or a file it names
    /// now, changed since the last reload (refused or not) read them; and
    /// once after start.
    pub fn due(&self) -> bool {
        !self.reloaded_once || hashed(self.named_files()) != self.files
    }

    /// Reloads on SIGHUP (`hangup`), and on change every `poll` if set.
    /// Runs until the task is dropped.
    pub async fn watch(mut self, poll: Option<Duration>, mut hangup: crate::signals::Listener) {
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
                () = hangup.next() => "sighup",
                () = poll_tick => {
                    if !self.due() {
                        continue;
                    }
                    "file_changed"
                }
            };
            let was_refused = self.refused;
            match self.reload() {
                // A poll that found the files touched but saying the same
                // (or the first poll, at start) is not news.
                Ok(reloaded)
                    if reloaded.changed.is_empty() && trigger != "sighup" && !was_refused =>
                {
                    self.apply_log();
                }
                Ok(reloaded) => {
                    self.shared.load().metrics().config_reload(true);
                    // The new scrubbing first, so that every line after
                    // "reloaded", that one included, follows it (found by a
                    // test under load: the line was logged before it, so a
                    // request answered right after could still be logged
                    // with the old patterns).
                    crate::logging::apply_scrubbing(&self.running.log);
                    // Logged at whichever level shows it: before a level
                    // that hides INFO applies, or after one that shows it
                    // again (found in review: `level = "warn"` hid the line
                    // saying it was applied, and the access lines stopped
                    // with no word why).
                    let shown_now = tracing::enabled!(tracing::Level::INFO);
                    if shown_now {
                        log_reloaded(trigger, &reloaded);
                    }
                    crate::logging::apply_level(&self.running.log);
                    if !shown_now {
                        log_reloaded(trigger, &reloaded);
                    }
                    // After the new settings apply: a reader who sees these
                    // knows later lines follow them.
                    for warning in &reloaded.warnings {
                        tracing::warn!(trigger, "configuration warning: {warning}");
                    }
                }
                // Every refusal is logged: each comes from a change (or a
                // SIGHUP), so a rotation refused because of an unrelated
                // refused key is not silent.
                Err(error) => {
                    self.shared.load().metrics().config_reload(false);
                    tracing::error!(trigger, %error, "configuration reload refused; the running configuration stays")
                }
            }
            crate::heap_release::after_code_ran_once("reload").await;
        }
    }
}

/// The reload's line, with the keys that changed (the caller picks the
/// moment: before or after the new `log.level` applies).
fn log_reloaded(trigger: &str, reloaded: &Reloaded) {
    let changed = match reloaded.changed.is_empty() {
        true => "nothing".to_string(),
        false => reloaded.changed.join(", "),
    };
    tracing::info!(trigger, changed = %changed, "configuration reloaded");
}

/// `server.tls_cert_file`/`_key_file` when the file is the same but its
/// contents changed (a renewal): `describe` shows only the paths.
fn renewed_tls_files(
    new: &Settings,
    before: &[(PathBuf, [u8; 32])],
    after: &[(PathBuf, [u8; 32])],
) -> Vec<String> {
    let Some(tls) = &new.server.tls else {
        return Vec::new();
    };
    let hash_in = |files: &[(PathBuf, [u8; 32])], path: &PathBuf| {
        files.iter().find(|(p, _)| p == path).map(|(_, hash)| *hash)
    };
    [
        ("server.tls_cert_file", &tls.cert_file),
        ("server.tls_key_file", &tls.key_file),
    ]
    .into_iter()
    .filter(|(_, path)| {
        let (was, is) = (hash_in(before, path), hash_in(after, path));
        was.is_some() && was != is
    })
    .map(|(key, _)| key.to_string())
    .collect()
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
    let (o, n) = (&old.upstream, &new.upstream);
    if let (Some(os), Some(ns), Some(source)) = (&o.auth_token, &n.auth_token, &n.auth_token_source)
    {
        values.push((
            secret("upstream", "auth_token", source),
            o.auth_token_source == n.auth_token_source && !os.same_as(ns),
        ));
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

/// Each file with the SHA-256 of its contents. An unreadable file hashes
/// as empty, so its disappearance is a change.
fn hashed(files: Vec<PathBuf>) -> Vec<(PathBuf, [u8; 32])> {
    files
        .into_iter()
        .map(|file| {
            // Secrets and the TLS key pass through here: zeroed after hashing.
            let content = zeroize::Zeroizing::new(
                crate::config_file::read(&file, crate::config_file::CONFIG_LIMIT)
                    .unwrap_or_default(),
            );
            let hash = Sha256::digest(&content).into();
            (file, hash)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Settings from one small config, with `overrides` as
    /// `IVRGUARD__…` variables.
    fn load(overrides: &[(&str, &str)]) -> Settings {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ivrguard.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:9901\"\n\
             [upstream]\nurl = \"http://127.0.0.1:3000\"\n\
             [twilio]\nauth_token_env = \"TOKEN\"\n\
             [encryption]\nkey_env = \"KEY\"\n",
        )
        .unwrap();
        let mut env: HashMap<String, String> = HashMap::from([
            ("TOKEN".into(), "0123456789abcdef0123456789abcdef".into()),
            (
                "KEY".into(),
                "a154eb4c759711bc2538a7cc021e9e9f17dd8aa63151c62ca28a82a4a404203d".into(),
            ),
        ]);
        env.extend(
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        Settings::load(&path, &env).expect("a valid config")
    }

    /// README, `server.reload_poll_interval_ms`: each key the listeners
    /// and workers read once is refused by a reload, naming it.
    #[test]
    fn a_reload_changing_what_is_read_at_start_is_refused_naming_the_key() {
        let running = load(&[]);
        for (variable, value, key) in [
            (
                "IVRGUARD__SERVER__LISTEN",
                "127.0.0.1:8081",
                "server.listen",
            ),
            (
                "IVRGUARD__SERVER__ADMIN_LISTEN",
                "127.0.0.1:9902",
                "server.admin_listen",
            ),
            ("IVRGUARD__SERVER__WORKERS", "7", "server.workers"),
            (
                "IVRGUARD__SERVER__MAX_CONNECTIONS",
                "100",
                "server.max_connections",
            ),
            (
                "IVRGUARD__SERVER__MAX_CONNECTIONS_PER_CLIENT",
                "4",
                "server.max_connections_per_client",
            ),
            (
                "IVRGUARD__SERVER__HEADER_READ_TIMEOUT_MS",
                "4000",
                "server.header_read_timeout_ms",
            ),
            (
                "IVRGUARD__SERVER__DRAIN_TIMEOUT_MS",
                "5000",
                "server.drain_timeout_ms",
            ),
            (
                "IVRGUARD__SERVER__RELOAD_POLL_INTERVAL_MS",
                "1000",
                "server.reload_poll_interval_ms",
            ),
            ("IVRGUARD__SERVER__HTTP2", "true", "server.http2"),
            ("IVRGUARD__LOG__FORMAT", "text", "log.format"),
        ] {
            let refusal = needs_restart(&load(&[(variable, value)]), &running)
                .unwrap_or_else(|| panic!("a reload would apply {variable}"));
            assert!(refusal.contains(key), "{variable}: {refusal}");
            assert!(refusal.ends_with("needs a restart"), "{refusal}");
        }
    }

    /// ... and every other key is applied.
    #[test]
    fn a_reload_changing_other_keys_is_applied() {
        let running = load(&[]);
        assert_eq!(needs_restart(&load(&[]), &running), None);
        for (variable, value) in [
            ("IVRGUARD__LOG__LEVEL", "debug"),
            ("IVRGUARD__SERVER__MAX_BODY_BYTES", "2048"),
            ("IVRGUARD__SERVER__REQUEST_TIMEOUT_MS", "12000"),
            ("IVRGUARD__UPSTREAM__TIMEOUT_MS", "5000"),
            ("IVRGUARD__UPSTREAM__URL", "http://127.0.0.1:3001"),
            ("IVRGUARD__TWILIO__PUBLIC_URL", "https://ivr.example.com"),
            ("IVRGUARD__ENCRYPTION__FIELDS", "Digits"),
        ] {
            let refusal = needs_restart(&load(&[(variable, value)]), &running);
            assert_eq!(refusal, None, "{variable}");
        }
    }
}
