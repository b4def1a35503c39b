//! Configuration: one TOML file plus `IVRGUARD__SECTION__KEY` overrides,
//! parsed once at start-up into a validated [`Settings`].
//!
//! After [`Settings::load`] returns, nothing downstream re-checks anything:
//! addresses are `SocketAddr`s, timeouts `Duration`s, the upstream is a
//! parsed authority plus path prefix, secrets are [`Secret`]s and the
//! encryption key a [`FieldKey`] (SPEC §2; STYLE "parse, don't validate").
//!
//! # Sources, in increasing precedence
//!
//! 1. Built-in defaults — every key has one except `upstream.url`, the
//!    primary auth token and the encryption key.
//! 2. The TOML file. A missing file is an error naming the path.
//! 3. Environment variables `IVRGUARD__<SECTION>__<KEY>`, e.g.
//!    `IVRGUARD__UPSTREAM__URL` or `IVRGUARD__TWILIO__AUTH_TOKEN_ENV`
//!    (sections and keys are separated by a double underscore, so the
//!    single underscores inside key names survive). Numbers and booleans are
//!    parsed from the text (by the `config` crate, which also takes
//!    `yes`/`on`/`1` and `no`/`off`/`0` for booleans). In the file, each
//!    value must have its TOML type: `"2048"` for a number, `"yes"` for a
//!    boolean or `5` for text is an error naming the key. `encryption.fields` is comma-separated
//!    (`Digits,SpeechResult`); `log.scrub_patterns` takes **one** pattern,
//!    because regular expressions contain commas (join several with `|`).
//!    `[[twilio.shared_keys]]` can only be written in the file.
//!
//! The environment is a parameter, not read from the process, so tests need
//! no `set_var`; `main` passes [`process_env()`].
//!
//! An empty string counts as "not set" for every string key, in the file and
//! in the environment: `IVRGUARD__TWILIO__PUBLIC_URL=` turns `public_url` off,
//! and an empty `upstream.url` is reported as missing.
//!
//! # Secrets
//!
//! Auth tokens, shared-key secrets and the encryption key come only from an
//! environment variable (`*_env` names it) or a file (`*_file`, e.g. a
//! Kubernetes Secret mount). Writing one literally (`auth_token = "…"`) is an
//! error, and so is setting both `_env` and `_file`. One rule for every
//! secret, wherever it comes from:
//!
//! - exactly one trailing line ending (`\n` or `\r\n`) is removed — what
//!   `echo`, editors and `kubectl create secret --from-file` leave behind;
//! - the rest must be non-empty, must not begin or end with whitespace
//!   (Unicode's, a no-break space included), must not begin with a byte
//!   order mark and must hold no control character (line break, tab, NUL).
//!   No token or key has any of these, so rather than trimming silently
//!   (or accepting and failing every signature), start-up stops and says
//!   so.
//!
//! The TLS listener's private key (`server.tls_key_file`) is a secret read
//! from a file too, but PEM: it is parsed as such (src/tls.rs), not
//! trimmed, and only ever held inside the TLS configuration.
//!
//! Errors name the variable or file, except when the name itself looks like
//! a secret (not an `UPPER_CASE` variable name; a path without `/` or `.`;
//! 16+ hex digits): a token pasted into `auth_token_env` is then reported
//! without being printed.
//!
//! # Errors
//!
//! A [`ConfigError`] is one line that names the key (and the variable or
//! path involved) and never a value: not a secret, and not the offending
//! text of any other key either, since a secret pasted into the wrong key is
//! exactly the mistake being reported. Errors from the `config` crate, which
//! do quote values, are rebuilt from their parts here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use config::{Value, ValueKind};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

use crate::cipher::FieldKey;
use crate::config_file;
use crate::secret::{Secret, REDACTED};
use crate::tls::PemFile;

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "IVRGUARD__";

/// Twilio gives up on a webhook after 15 s (error 11205); our answer,
/// fallback TwiML included, must be out before then.
pub const TWILIO_WEBHOOK_TIMEOUT: Duration = Duration::from_millis(15_000);

const MIN_BODY_BYTES: u64 = 1024;
const MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;

// Defaults. `config/ivrguard.toml` shows the same values; a test keeps the
// two in step.
const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
const DEFAULT_MAX_BODY_BYTES: u64 = 65_536;
const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 14_000;
const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_MAX_CONNECTIONS: u64 = 4_096;
const MAX_WORKERS: u64 = 256;

/// One worker per CPU this process may use (cgroup CPU limits included).
fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(MAX_WORKERS as usize)
}
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
const DEFAULT_UPSTREAM_TIMEOUT_MS: u64 = 10_000;
/// Below Node's 5 s `keepAliveTimeout`, so the pool never reuses a
/// connection the app is about to close (perf notes §0.5, fault F5).
const DEFAULT_POOL_IDLE_TIMEOUT_MS: u64 = 4_000;
const DEFAULT_POOL_MAX_IDLE_PER_HOST: u64 = 64;
/// Requests in flight to the app at once. A legacy app serves a few at a
/// time; more connections only queue inside it (and cost memory here).
const DEFAULT_UPSTREAM_MAX_CONNECTIONS: u64 = 64;
const DEFAULT_FALLBACK_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Say>We are sorry, we cannot take your call right now. Please try again later.</Say><Hangup/></Response>";
/// The sensitive parameters encrypted when `encryption.fields` is not set:
/// [`crate::form::DEFAULT_FIELDS`], where each is explained.
use crate::form::DEFAULT_FIELDS;
const DEFAULT_LOG_LEVEL: &str = "info";

// ---------------------------------------------------------------------------
// Validated settings
// ---------------------------------------------------------------------------

/// The whole validated configuration. `Debug` is safe to print: secrets and
/// the key redact themselves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub twilio: TwilioSettings,
    pub encryption: EncryptionSettings,
    pub log: LogSettings,
}

/// `[server]`: the listener Twilio's requests arrive on.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    /// `/healthz`, `/readyz`, `/metrics`; `None` when not configured.
    pub admin_listen: Option<SocketAddr>,
    /// Take scheme and host from `X-Forwarded-Proto`/`-Host` when
    /// `twilio.public_url` is unset.
    pub trust_forwarded_headers: bool,
    /// Larger bodies get 413. Between 1 KiB and 16 MiB.
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    /// Overall deadline per request; below [`TWILIO_WEBHOOK_TIMEOUT`].
    pub request_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_connections: usize,
    /// Connections open at once from one peer address; more are closed as
    /// they arrive. `None`: no such limit.
    pub max_connections_per_client: Option<usize>,
    /// Worker threads, each with its own event loop and its own pool of
    /// connections to the app, taking connections from the one listener.
    pub workers: usize,
    /// Re-read the config file and `*_file` secrets this often and reload
    /// when they changed (Kubernetes Secret rotation). `None`: SIGHUP only.
    pub reload_poll_interval: Option<Duration>,
    /// Serve TLS on `listen`; `None`: plain HTTP (TLS ends at an ingress).
    pub tls: Option<TlsSettings>,
    /// Also serve HTTP/2 (prior knowledge on plain TCP, ALPN `h2` with TLS).
    /// Off by default: Twilio sends HTTP/1.1, and an HTTP/2 connection can
    /// stay open idle while its peer answers pings, and carry many bodies
    /// at once.
    pub http2: bool,
}

/// `server.tls_cert_file` and `server.tls_key_file`, loaded and checked.
#[derive(Clone)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Built from the two files: certificate chain, private key, TLS 1.2
    /// and 1.3, ALPN `h2` and `http/1.1` (see [`crate::tls`]).
    pub config: Arc<tokio_rustls::rustls::ServerConfig>,
}

/// The paths only: the configuration holds the private key.
impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("config", &REDACTED)
            .finish()
    }
}

/// `[upstream]`: the application behind ivrguard.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// `http://host[:port]`, e.g. `"http://127.0.0.1:3000"`.
    pub scheme_authority: String,
    pub authority: http::uri::Authority,
    /// `""` or `"/prefix"`, without a trailing slash.
    pub path_prefix: String,
    pub connect_timeout: Duration,
    /// Below `server.request_timeout`.
    pub timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Requests (and so connections) in flight to the app at once; more
    /// wait, within `timeout`, for one to finish.
    pub max_connections: usize,
    /// Send the signed URL's host as `Host` instead of the received one.
    pub rewrite_host: bool,
    pub on_error: OnUpstreamError,
    pub fallback_twiml: String,
    /// `upstream.auth_token`: the app's own token, which forwarded requests
    /// are signed with; without it, they are signed with
    /// `twilio.auth_token`, which the app must then hold.
    pub auth_token: Option<Secret>,
    pub auth_token_source: Option<SecretSource>,
}

impl UpstreamSettings {
    /// Whether `other` describes the same connections to the app: a reload
    /// that keeps them keeps the pools and their slots.
    pub fn same_connections(&self, other: &UpstreamSettings) -> bool {
        // Every field is named, so a new one does not compile until it is
        // sorted into "shapes the connections" or "read per request".
        let UpstreamSettings {
            scheme_authority,
            authority: _, // part of `scheme_authority`
            path_prefix,
            connect_timeout,
            timeout,
            pool_idle_timeout,
            pool_max_idle_per_host,
            max_connections,
            rewrite_host: _,
            on_error: _,
            fallback_twiml: _,
            auth_token: _,
            auth_token_source: _,
        } = self;
        *scheme_authority == other.scheme_authority
            && *path_prefix == other.path_prefix
            && *connect_timeout == other.connect_timeout
            && *timeout == other.timeout
            && *pool_idle_timeout == other.pool_idle_timeout
            && *pool_max_idle_per_host == other.pool_max_idle_per_host
            && *max_connections == other.max_connections
    }
}

/// What the caller gets when the application cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUpstreamError {
    /// HTTP 200 `text/xml` with `upstream.fallback_twiml`: the caller hears it.
    Twiml,
    /// 502 (unreachable, reset) or 504 (timeout).
    Status,
}

/// `twilio.public_url`: the origin Twilio calls, used for the signed URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl {
    /// Exactly as configured, minus one trailing `/`: `"https://ivr.example.com"`.
    pub origin: String,
    /// `"http"` or `"https"`.
    pub scheme: String,
    /// `"ivr.example.com"` or `"ivr.example.com:8443"`, as configured.
    pub host_port: String,
}

/// Where a secret was read from. Names a variable or a path, never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable, by name.
    Env(String),
    /// A file, e.g. a Kubernetes Secret mount.
    File(PathBuf),
}

/// `[twilio]`: what signature verification needs.
#[derive(Debug, Clone)]
pub struct TwilioSettings {
    pub public_url: Option<PublicUrl>,
    pub auth_token: Secret,
    pub auth_token_source: SecretSource,
    /// Also accepted while the primary token is being rotated.
    pub secondary_auth_token: Option<Secret>,
    pub secondary_auth_token_source: Option<SecretSource>,
    /// Webhook signing keys by id, in configuration order; ids are unique.
    pub shared_keys: Vec<(String, Secret)>,
    /// Where each shared key's secret came from, in the same order.
    pub shared_key_sources: Vec<(String, SecretSource)>,
}

/// `[encryption]`: the field cipher's key and the parameters it encrypts.
#[derive(Debug, Clone)]
pub struct EncryptionSettings {
    pub key: FieldKey,
    pub key_source: SecretSource,
    /// Parameter names, exact and case-sensitive; never empty, no empty name.
    pub fields: Vec<String>,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (SPEC §6).
    Json,
    /// Human-readable lines, for a terminal.
    Text,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, already checked to parse.
    pub level: String,
    /// Extra patterns; every match in every log line becomes `*REDACTED*`.
    pub scrub_patterns: Vec<regex::Regex>,
    /// Also redact standalone 13–19 digit Luhn-valid runs (card numbers).
    pub scrub_card_numbers: bool,
}

/// Why the configuration cannot be used: one line naming the key (`config`
/// when no single key is at fault), never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    key: String,
    message: String,
}

impl ConfigError {
    /// Control characters (a newline in a path, say) are escaped so the
    /// error is always one line.
    fn new(key: impl AsRef<str>, message: impl AsRef<str>) -> Self {
        ConfigError {
            key: one_line(key.as_ref()),
            message: one_line(message.as_ref()),
        }
    }

    /// The offending key, e.g. `"upstream.url"`, or `"config"`.
    pub fn key(&self) -> &str {
        &self.key
    }
}

fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The process environment as a map for [`Settings::load`]. Variables whose
/// name or value is not UTF-8 are left out (no config value or secret can
/// use them).
pub fn process_env() -> ProcessEnv {
    ProcessEnv(
        std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .collect(),
    )
}

/// A copy of the environment, which holds the secrets' variables: their
/// values are wiped when it is dropped. A reload poll makes one at every
/// tick; unwiped, each left the tokens and the key in freed memory (found
/// in review).
pub struct ProcessEnv(HashMap<String, String>);

impl std::ops::Deref for ProcessEnv {
    type Target = HashMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for ProcessEnv {
    fn drop(&mut self) {
        for value in self.0.values_mut() {
            value.zeroize();
        }
    }
}

impl std::fmt::Debug for ProcessEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Settings {
    /// Reads the TOML file at `path`, applies the `IVRGUARD__…` overrides in
    /// `env`, reads the secrets it names (from `env` or from files) and
    /// validates everything.
    pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Settings, ConfigError> {
        let raw = RawConfig::read(path, env)?;

        let server = server_settings(raw.server)?;
        let upstream = upstream_settings(raw.upstream, env)?;
        if upstream.timeout >= server.request_timeout {
            return Err(ConfigError::new(
                "upstream.timeout_ms",
                "must be less than server.request_timeout_ms, to leave time for the fallback answer",
            ));
        }
        let twilio = twilio_settings(raw.twilio, env)?;
        let encryption = encryption_settings(raw.encryption, env)?;
        if let (Some(token), Some(source)) = (&upstream.auth_token, &upstream.auth_token_source) {
            // Both are 64 hex characters from `ivrguard keygen`, easily
            // swapped (found in review): the app would hold the key.
            if token
                .expose()
                .eq_ignore_ascii_case(encryption.key.to_hex().as_bytes())
            {
                return Err(ConfigError::new(
                    source.key("upstream.auth_token"),
                    "holds the encryption key (encryption.key): the app would get the key; \
                     give it a token of its own (ivrguard keygen)",
                ));
            }
        }
        Ok(Settings {
            server,
            upstream,
            twilio,
            encryption,
            log: log_settings(raw.log)?,
        })
    }

    /// `server.admin_listen` of the config at `path` (file, then
    /// `IVRGUARD__…` overrides), and nothing else: no secret, certificate or
    /// other key is read or checked. For `ivrguard health`, which must say
    /// whether the running process answers even while the files on disk
    /// hold a change a reload refused (found in review: an emptied key file
    /// made the health check fail while the proxy served every call).
    ///
    /// Read leniently: the TOML need only parse, and only this key is
    /// looked at, so a change elsewhere that a reload refused (an unknown
    /// key, a number where a URL goes) does not fail the check either
    /// (found in review). An override variable wins, as in [`Self::load`].
    pub fn load_admin_listen(
        path: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        const KEY: &str = "server.admin_listen";
        let overridden = env
            .iter()
            .filter(|(name, _)| override_key(name).as_deref() == Some(KEY))
            .map(|(_, value)| value.clone())
            .next();
        let value = match overridden {
            Some(value) => value,
            None => {
                // The position only: the parser's message quotes the line,
                // which may hold a pasted secret (found in review).
                let table: toml::Table = read_text(path)?
                    .parse()
                    .map_err(|e| syntax_error(path, &e))?;
                let server = table.get("server").and_then(toml::Value::as_table);
                match server.and_then(|s| s.get("admin_listen")) {
                    None => String::new(),
                    Some(toml::Value::String(value)) => value.clone(),
                    Some(_) => return Err(ConfigError::new(KEY, "must be a string")),
                }
            }
        };
        non_empty(Some(value))
            .map(|addr| socket_addr(KEY, &addr))
            .transpose()
    }

    /// The files the config at `path` names as it is on disk now: itself,
    /// every `*_file` secret, the TLS certificate and key. Only the TOML
    /// is read (no secret); a config that does not parse names itself
    /// only. The reload poll watches these, so a secret file that a new
    /// config names is watched before the config loads.
    pub fn named_files(path: &Path, env: &HashMap<String, String>) -> Vec<PathBuf> {
        let mut files = vec![path.to_owned()];
        let Ok(raw) = RawConfig::read(path, env) else {
            return files;
        };
        let shared = list(raw.twilio.shared_keys, "", StringAsList::Refuse)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|value| section::<RawSharedKey>(Some(value), "", env).ok())
            .map(|key| key.secret_file);
        let named = [
            raw.upstream.auth_token_file,
            raw.twilio.auth_token_file,
            raw.twilio.secondary_auth_token_file,
            raw.encryption.key_file,
            raw.server.tls_cert_file,
            raw.server.tls_key_file,
        ];
        files.extend(
            named
                .into_iter()
                .chain(shared)
                .filter_map(non_empty)
                .map(PathBuf::from),
        );
        files
    }

    /// The effective configuration as TOML, for `ivrguard check`. Secrets
    /// appear only as the variable or file they were read from, followed by
    /// `*REDACTED*`. The output loads back into the same settings.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        let s = &self.server;
        out.push("[server]".to_string());
        out.push(format!("listen = {}", toml_str(&s.listen.to_string())));
        match s.admin_listen {
            Some(addr) => out.push(format!("admin_listen = {}", toml_str(&addr.to_string()))),
            None => out.push("# admin_listen is not set: no admin listener".to_string()),
        }
        out.push(format!(
            "trust_forwarded_headers = {}",
            s.trust_forwarded_headers
        ));
        out.push(format!("max_body_bytes = {}", s.max_body_bytes));
        out.push(format!(
            "header_read_timeout_ms = {}",
            s.header_read_timeout.as_millis()
        ));
        out.push(format!(
            "request_timeout_ms = {}",
            s.request_timeout.as_millis()
        ));
        out.push(format!(
            "drain_timeout_ms = {}",
            s.drain_timeout.as_millis()
        ));
        out.push(format!("max_connections = {}", s.max_connections));
        out.push(format!(
            "max_connections_per_client = {}",
            s.max_connections_per_client.unwrap_or(0)
        ));
        out.push(format!("workers = {}", s.workers));
        out.push(format!(
            "reload_poll_interval_ms = {}",
            s.reload_poll_interval.map_or(0, |d| d.as_millis())
        ));
        out.push(format!("http2 = {}", s.http2));
        match &s.tls {
            Some(tls) => {
                out.push(format!(
                    "tls_cert_file = {}",
                    toml_str(&tls.cert_file.to_string_lossy())
                ));
                out.push(secret_line(
                    "tls_key",
                    &SecretSource::File(tls.key_file.clone()),
                ));
            }
            None => out.push(
                "# tls_cert_file and tls_key_file are not set: plain HTTP on listen".to_string(),
            ),
        }

        let u = &self.upstream;
        out.push(String::new());
        out.push("[upstream]".to_string());
        out.push(format!(
            "url = {}",
            toml_str(&format!("{}{}", u.scheme_authority, u.path_prefix))
        ));
        out.push(format!(
            "connect_timeout_ms = {}",
            u.connect_timeout.as_millis()
        ));
        out.push(format!("timeout_ms = {}", u.timeout.as_millis()));
        out.push(format!(
            "pool_idle_timeout_ms = {}",
            u.pool_idle_timeout.as_millis()
        ));
        out.push(format!(
            "pool_max_idle_per_host = {}",
            u.pool_max_idle_per_host
        ));
        out.push(format!("max_connections = {}", u.max_connections));
        out.push(format!("rewrite_host = {}", u.rewrite_host));
        let on_error = match u.on_error {
            OnUpstreamError::Twiml => "twiml",
            OnUpstreamError::Status => "status",
        };
        out.push(format!("on_error = {}", toml_str(on_error)));
        out.push(format!("fallback_twiml = {}", toml_str(&u.fallback_twiml)));
        match &u.auth_token_source {
            Some(source) => out.push(secret_line("auth_token", source)),
            None => out.push(
                "# auth_token is not set: forwarded requests are signed with twilio.auth_token, \
                 so the app holds the Twilio auth token (which also opens Twilio's REST API)"
                    .to_string(),
            ),
        }

        let t = &self.twilio;
        out.push(String::new());
        out.push("[twilio]".to_string());
        out.push(secret_line("auth_token", &t.auth_token_source));
        match &t.secondary_auth_token_source {
            Some(source) => out.push(secret_line("secondary_auth_token", source)),
            None => out.push("# secondary_auth_token is not set".to_string()),
        }
        match &t.public_url {
            Some(url) => out.push(format!("public_url = {}", toml_str(&url.origin))),
            None => out.push(
                "# public_url is not set: the signed URL's origin comes from the request"
                    .to_string(),
            ),
        }
        for (id, source) in &t.shared_key_sources {
            out.push(String::new());
            out.push("[[twilio.shared_keys]]".to_string());
            out.push(format!("id = {}", toml_str(id)));
            out.push(secret_line("secret", source));
        }

        let e = &self.encryption;
        out.push(String::new());
        out.push("[encryption]".to_string());
        out.push(secret_line("key", &e.key_source));
        out.push(format!(
            "fields = {}",
            toml_list(e.fields.iter().map(String::as_str))
        ));

        let l = &self.log;
        out.push(String::new());
        out.push("[log]".to_string());
        let format = match l.format {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        };
        out.push(format!("format = {}", toml_str(format)));
        out.push(format!("level = {}", toml_str(&l.level)));
        out.push(format!(
            "scrub_patterns = {}",
            toml_list(l.scrub_patterns.iter().map(regex::Regex::as_str))
        ));
        out.push(format!("scrub_card_numbers = {}", l.scrub_card_numbers));
        out.push(String::new());
        out.join("\n")
    }
}

fn secret_line(name: &str, source: &SecretSource) -> String {
    match source {
        SecretSource::Env(var) => format!("{name}_env = {}  # set, {REDACTED}", toml_str(var)),
        SecretSource::File(path) => format!(
            "{name}_file = {}  # read, {REDACTED}",
            toml_str(&path.to_string_lossy())
        ),
    }
}

/// A TOML basic string.
fn toml_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let items: Vec<String> = items.map(toml_str).collect();
    format!("[{}]", items.join(", "))
}

// ---------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------

impl SecretSource {
    /// The config key that named this source, e.g. `twilio.auth_token_env`
    /// for base `twilio.auth_token`.
    fn key(&self, base: &str) -> String {
        match self {
            SecretSource::Env(_) => format!("{base}_env"),
            SecretSource::File(_) => format!("{base}_file"),
        }
    }

    /// "environment variable X" or the path, for messages — unless the name
    /// looks like a secret. Pasting the token itself into `auth_token_env`
    /// is a classic mistake, and the error that catches it ("… is not set")
    /// must not print it.
    fn what(&self) -> String {
        match self {
            SecretSource::Env(var) if quotable_var(var) => format!("environment variable {var}"),
            SecretSource::Env(_) => "the environment variable it names (name withheld: not an UPPER_CASE variable name, so it may be the secret itself)".to_string(),
            SecretSource::File(path) => file_what(path),
        }
    }
}

/// A file's path for messages, unless it looks like a secret (see
/// [`SecretSource::what`]).
fn file_what(path: &Path) -> String {
    if quotable_path(path) {
        path.display().to_string()
    } else {
        "the file it names (path withheld: no '/' or '.', so it may be the secret itself)"
            .to_string()
    }
}

/// A conventional variable name (`TWILIO_AUTH_TOKEN`), and not a long run of
/// hex digits (an uppercase key).
fn quotable_var(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_uppercase() || c == '_')
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !hex_run(name)
}

/// A path has a `/` or a `.`; a token or key has neither.
fn quotable_path(path: &Path) -> bool {
    let text = path.to_string_lossy();
    text.contains(['/', '.']) && !hex_run(&text)
}

/// Whether a key name could be a pasted secret rather than a typo: 16
/// characters or more and not only lower-case letters and `_`, as every key
/// of ivrguard's is (tokens and keys are hex or base64, with digits).
fn pasted_secret(name: &str) -> bool {
    name.len() >= 16 && !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

fn hex_run(text: &str) -> bool {
    text.len() >= 16 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Reads a secret (auth token, shared-key secret) under the rule in the
/// module docs. `key` names it in errors (a config key, or a CLI flag such
/// as `--token-env`).
pub fn read_secret(
    source: &SecretSource,
    key: &str,
    env: &HashMap<String, String>,
) -> Result<Secret, ConfigError> {
    let mut bytes = read_secret_bytes(source, key, env)?;
    Ok(Secret::new(std::mem::take(&mut *bytes)))
}

/// Reads an encryption key (64 hex characters, either case) under the same
/// rule as [`read_secret`].
pub fn read_key(
    source: &SecretSource,
    key: &str,
    env: &HashMap<String, String>,
) -> Result<FieldKey, ConfigError> {
    let bytes = read_secret_bytes(source, key, env)?;
    let parsed = match std::str::from_utf8(&bytes) {
        Ok(text) => FieldKey::from_hex(text),
        Err(_) => Err(crate::cipher::KeyError::NotHex),
    };
    parsed.map_err(|e| {
        let name = match source {
            SecretSource::Env(var) if quotable_var(var) => var.clone(),
            SecretSource::File(path) if quotable_path(path) => path.display().to_string(),
            _ => source.what(),
        };
        ConfigError::new(key, format!("{name} {e}; `ivrguard keygen` makes one"))
    })
}

fn read_secret_bytes(
    source: &SecretSource,
    key: &str,
    env: &HashMap<String, String>,
) -> Result<Zeroizing<Vec<u8>>, ConfigError> {
    let mut bytes = match source {
        SecretSource::Env(var) => match env.get(var) {
            Some(value) => Zeroizing::new(value.as_bytes().to_vec()),
            None => {
                return Err(ConfigError::new(
                    key,
                    format!("{} is not set", source.what()),
                ));
            }
        },
        SecretSource::File(path) => Zeroizing::new(
            config_file::read(path, config_file::SECRET_LIMIT).map_err(|e| {
                ConfigError::new(key, format!("cannot read {}: {e}", source.what()))
            })?,
        ),
    };
    let len = bytes.len();
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(len - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.truncate(len - 1);
    }
    if bytes.is_empty() {
        return Err(ConfigError::new(key, format!("{} is empty", source.what())));
    }
    // A byte order mark, as Windows editors save one (UTF-8, or UTF-16,
    // whose every other byte is then NUL): invisible, so refused by name
    // rather than taken as part of the secret (found in review: a token
    // file saved with one was read as a token no signature matches).
    if [&[0xEF, 0xBB, 0xBF][..], &[0xFF, 0xFE], &[0xFE, 0xFF]]
        .iter()
        .any(|bom| bytes.starts_with(bom))
    {
        return Err(ConfigError::new(
            key,
            format!(
                "{} begins with a byte order mark (saved as UTF-8 with BOM or UTF-16?): save it as plain text",
                source.what()
            ),
        ));
    }
    // Unicode whitespace too, when the secret is UTF-8: a no-break space
    // pasted at the end is as invisible as a space (found in review).
    let padded = match std::str::from_utf8(&bytes) {
        Ok(text) => text.starts_with(char::is_whitespace) || text.ends_with(char::is_whitespace),
        Err(_) => {
            let ascii = |b: Option<&u8>| b.is_some_and(u8::is_ascii_whitespace);
            ascii(bytes.first()) || ascii(bytes.last())
        }
    };
    if padded {
        return Err(ConfigError::new(
            key,
            format!(
                "{} has leading or trailing whitespace (only one trailing newline is removed)",
                source.what()
            ),
        ));
    }
    // No token or key holds a line break, tab or NUL: a file of two
    // lines, or a binary one, is not one secret (found in review: taken
    // whole, it failed every signature).
    if bytes.iter().any(u8::is_ascii_control) {
        return Err(ConfigError::new(
            key,
            format!(
                "{} holds a control character (a line break, tab or NUL) inside: a secret is one line of text",
                source.what()
            ),
        ));
    }
    Ok(bytes)
}

/// Turns the `_env`/`_file` pair (and the refused literal) of secret `base`
/// into where to read it from.
fn secret_source(
    base: &str,
    literal: bool,
    env_var: Option<String>,
    file: Option<String>,
) -> Result<Option<SecretSource>, ConfigError> {
    if literal {
        return Err(ConfigError::new(
            base,
            format!(
                "secrets must not be config values (in the file or an IVRGUARD__ variable); set {base}_env (or _file) to the name of a variable holding it"
            ),
        ));
    }
    match (non_empty(env_var), non_empty(file)) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            format!("{base}_env, {base}_file"),
            "set only one of the two",
        )),
        (Some(var), None) => Ok(Some(SecretSource::Env(var))),
        (None, Some(path)) => Ok(Some(SecretSource::File(PathBuf::from(path)))),
        (None, None) => Ok(None),
    }
}

fn required_secret_source(
    base: &str,
    what: &str,
    literal: bool,
    env_var: Option<String>,
    file: Option<String>,
) -> Result<SecretSource, ConfigError> {
    secret_source(base, literal, env_var, file)?.ok_or_else(|| {
        ConfigError::new(
            format!("{base}_env"),
            format!("required: the name of the environment variable holding {what} (or set {base}_file to a file holding it)"),
        )
    })
}

// ---------------------------------------------------------------------------
// Raw layer: what the file and the environment say, before validation
// ---------------------------------------------------------------------------
//
// Every field is optional (defaults are applied while validating) and every
// struct denies unknown fields. Lists are kept as `config::Value` so that
// their errors can name the element. Literal secrets are caught by name with
// `IgnoredAny`, which never holds the value.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoot {
    server: Option<Value>,
    upstream: Option<Value>,
    twilio: Option<Value>,
    encryption: Option<Value>,
    log: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    trust_forwarded_headers: Option<bool>,
    max_body_bytes: Option<u64>,
    header_read_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
    max_connections: Option<u64>,
    max_connections_per_client: Option<u64>,
    workers: Option<u64>,
    reload_poll_interval_ms: Option<u64>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    http2: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<String>,
    connect_timeout_ms: Option<u64>,
    timeout_ms: Option<u64>,
    pool_idle_timeout_ms: Option<u64>,
    pool_max_idle_per_host: Option<u64>,
    max_connections: Option<u64>,
    rewrite_host: Option<bool>,
    on_error: Option<String>,
    fallback_twiml: Option<String>,
    auth_token: Option<IgnoredAny>,
    auth_token_env: Option<String>,
    auth_token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTwilio {
    auth_token: Option<IgnoredAny>,
    auth_token_env: Option<String>,
    auth_token_file: Option<String>,
    secondary_auth_token: Option<IgnoredAny>,
    secondary_auth_token_env: Option<String>,
    secondary_auth_token_file: Option<String>,
    public_url: Option<String>,
    shared_keys: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSharedKey {
    id: Option<String>,
    secret: Option<IgnoredAny>,
    secret_env: Option<String>,
    secret_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncryption {
    key: Option<IgnoredAny>,
    key_env: Option<String>,
    key_file: Option<String>,
    fields: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
    scrub_patterns: Option<Value>,
    scrub_card_numbers: Option<bool>,
}

struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
    twilio: RawTwilio,
    encryption: RawEncryption,
    log: RawLog,
}

impl RawConfig {
    /// The file at `path`, with the `IVRGUARD__…` overrides in `env`.
    fn read(path: &Path, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        RawConfig::parse(&read_text(path)?, path, env)
    }

    fn parse(text: &str, path: &Path, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        // Only the overrides go to the `config` crate, not every secret in
        // the environment.
        let overrides: config::Map<String, String> = env
            .iter()
            .filter(|(name, _)| is_override(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        let merged = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
                    .prefix_separator("__")
                    .separator("__")
                    .source(Some(overrides)),
            )
            .build()
            .map_err(|e| syntax_error(path, &e))?;
        let root: RawRoot = merged
            .try_deserialize()
            .map_err(|e| deserialize_error("", e, env))?;
        let raw = RawConfig {
            server: section(root.server, "server", env)?,
            upstream: section(root.upstream, "upstream", env)?,
            twilio: section(root.twilio, "twilio", env)?,
            encryption: section(root.encryption, "encryption", env)?,
            log: section(root.log, "log", env)?,
        };
        // After the type checks, which name wrong types better.
        strict_toml(text)?;
        Ok(raw)
    }
}

/// What the `config` crate would let through silently: a key in another
/// case (it lowercases keys, so `LISTEN` would be read as `listen`, and a
/// second spelling of one key ignored), a decimal number (it rounds
/// `max_body_bytes = 1023.9` to a whole one), and a value of the wrong TOML
/// type that it converts (`max_body_bytes = "2048"`, `id = 5`). Every
/// ivrguard key is lower case and no setting is a decimal. A file that is
/// not TOML is left to the `config` crate, which says where.
fn strict_toml(text: &str) -> Result<(), ConfigError> {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    strict_table(&table, "")?;
    let sections = [
        (
            "server",
            strict_types::<RawServer> as fn(&toml::Table, &str) -> _,
        ),
        ("upstream", strict_types::<RawUpstream>),
        ("twilio", strict_types::<RawTwilio>),
        ("encryption", strict_types::<RawEncryption>),
        ("log", strict_types::<RawLog>),
    ];
    for (name, check) in sections {
        if let Some(toml::Value::Table(section)) = table.get(name) {
            check(section, name)?;
        }
    }
    let shared_keys = table
        .get("twilio")
        .and_then(|twilio| twilio.get("shared_keys"))
        .and_then(toml::Value::as_array);
    for (i, item) in shared_keys.into_iter().flatten().enumerate() {
        if let toml::Value::Table(item) = item {
            strict_types::<RawSharedKey>(item, &format!("twilio.shared_keys[{i}]"))?;
        }
    }
    Ok(())
}

/// Each key of `section` read on its own into `T` by the `toml` crate,
/// which converts nothing: the first whose TOML type is not the one `T`
/// wants is named (never its value).
fn strict_types<T: DeserializeOwned>(section: &toml::Table, path: &str) -> Result<(), ConfigError> {
    for (key, value) in section {
        let one = toml::Table::from_iter([(key.clone(), value.clone())]);
        let Err(e) = T::deserialize(toml::Value::Table(one)) else {
            continue;
        };
        // Unknown keys in a shared key are named later, as such.
        if !e.message().starts_with("unknown field") {
            return Err(ConfigError::new(
                format!("{path}.{key}"),
                "has the wrong TOML type: numbers and true/false are written without quotes, text in quotes",
            ));
        }
    }
    Ok(())
}

fn strict_table(table: &toml::Table, prefix: &str) -> Result<(), ConfigError> {
    for (key, value) in table {
        let path = match prefix {
            "" => key.clone(),
            prefix => format!("{prefix}.{key}"),
        };
        if key.chars().any(|c| c.is_ascii_uppercase()) {
            // Named by where it is, not by itself: a pasted secret can
            // land where a key goes.
            const WHY: &str = "TOML keys are case-sensitive; ivrguard's are all lower case";
            return Err(match prefix {
                "" => ConfigError::new(
                    "config",
                    format!("a section name is not lower case ({WHY})"),
                ),
                prefix => ConfigError::new(
                    prefix,
                    format!("holds a key that is not lower case ({WHY})"),
                ),
            });
        }
        strict_value(value, &path)?;
    }
    Ok(())
}

fn strict_value(value: &toml::Value, path: &str) -> Result<(), ConfigError> {
    match value {
        toml::Value::Table(table) => strict_table(table, path),
        toml::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| strict_value(item, &format!("{path}[{i}]"))),
        toml::Value::Float(_) => Err(ConfigError::new(
            path,
            "expected a whole number, found a decimal number",
        )),
        _ => Ok(()),
    }
}

/// The config file's text, within its size limit.
fn read_text(path: &Path) -> Result<String, ConfigError> {
    let cannot = |e: &dyn std::fmt::Display| {
        ConfigError::new("config", format!("cannot read {}: {e}", path.display()))
    };
    let bytes = config_file::read(path, config_file::CONFIG_LIMIT).map_err(|e| cannot(&e))?;
    String::from_utf8(bytes).map_err(|_| cannot(&"not UTF-8 text"))
}

fn is_override(name: &str) -> bool {
    name.get(..ENV_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(ENV_PREFIX))
}

/// The config key an override variable sets, as the `config` crate maps it.
fn override_key(name: &str) -> Option<String> {
    is_override(name).then(|| name[ENV_PREFIX.len()..].to_lowercase().replace("__", "."))
}

fn section<T: DeserializeOwned + Default>(
    value: Option<Value>,
    name: &str,
    env: &HashMap<String, String>,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(T::default()),
        Some(value) if matches!(value.kind, ValueKind::Table(_)) => value
            .try_deserialize()
            .map_err(|e| deserialize_error(name, e, env)),
        Some(value) => Err(ConfigError::new(
            name,
            format!(
                "expected a table ([{name}]), found {}",
                kind_name(&value.kind)
            ),
        )),
    }
}

/// A TOML syntax error: the position only. The parser's own message quotes
/// the offending line, which may hold a pasted secret.
fn syntax_error(path: &Path, error: &dyn std::fmt::Display) -> ConfigError {
    let text = error.to_string();
    let position = text
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("TOML parse error at "))
        .filter(|pos| {
            pos.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == ',')
        });
    match position {
        Some(position) => ConfigError::new(
            "config",
            format!("{} is not valid TOML ({position})", path.display()),
        ),
        None => ConfigError::new("config", format!("{} is not valid TOML", path.display())),
    }
}

/// Rebuilds a `config`-crate deserialization error without the value it
/// quotes. `prefix` is the section the error happened in ("" at the root).
fn deserialize_error(
    prefix: &str,
    error: config::ConfigError,
    env: &HashMap<String, String>,
) -> ConfigError {
    let join = |key: &str| match (prefix.is_empty(), key.is_empty()) {
        (true, _) => key.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{key}"),
    };
    match error {
        config::ConfigError::Type {
            key,
            unexpected,
            expected,
            ..
        } => {
            // Every number in the config is a count or milliseconds.
            let expected = if expected.contains("integer") {
                "a whole number (0 or more)"
            } else {
                expected
            };
            let key = join(key.as_deref().unwrap_or(""));
            let found = unexpected_name(&unexpected);
            let message = match override_var(&key, env) {
                Some(var) => {
                    format!("expected {expected}, found {found} (from environment variable {var})")
                }
                None => format!("expected {expected}, found {found}"),
            };
            ConfigError::new(key, message)
        }
        config::ConfigError::Message(message) => match unknown_field(&message) {
            Some(field) => {
                let suggestion = closest_field(field, &message).map(|name| join(&name));
                unknown_key(&join(field), suggestion.as_deref(), env)
            }
            None => ConfigError::new(
                if prefix.is_empty() { "config" } else { prefix },
                "a value has the wrong type",
            ),
        },
        _ => ConfigError::new(
            if prefix.is_empty() { "config" } else { prefix },
            "could not be read",
        ),
    }
}

/// The field name in serde's "unknown field `x`, expected …" message.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    let end = rest
        .find("`, expected")
        .or_else(|| rest.find("`, there are no fields"))?;
    Some(&rest[..end])
}

/// Of the names serde's message lists after "expected" (in backticks), the
/// one `field` most likely meant: at most two edits away (a letter missing,
/// extra, wrong or two swapped) and fewer than half its length, so `urll`
/// finds `url` and `timeout` finds nothing. Ties go to the first listed.
/// A key that exists only to be refused (a secret written in the file:
/// `auth_token`, `key`, …) is never the answer; its `_env` key is (found in
/// review: `auth_tokn` was pointed at `auth_token`, which is refused).
fn closest_field(field: &str, message: &str) -> Option<String> {
    let (_, expected) = message.split_once("`, expected ")?;
    let limit = 2.min(field.chars().count().saturating_sub(1) / 2);
    let closest = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|name| (strsim::damerau_levenshtein(field, name), name))
        .filter(|(distance, _)| (1..=limit).contains(distance))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, name)| name)?;
    Some(match LITERAL_SECRET_KEYS.contains(&closest) {
        true => format!("{closest}_env"),
        false => closest.to_string(),
    })
}

/// The keys that hold a secret written in the file, refused wherever
/// they appear (secrets come from `_env` or `_file` keys).
const LITERAL_SECRET_KEYS: [&str; 4] = ["auth_token", "secondary_auth_token", "secret", "key"];

/// The override variable that sets `key`, if one does (the first by name,
/// should several spellings do).
fn override_var<'e>(key: &str, env: &'e HashMap<String, String>) -> Option<&'e String> {
    env.keys()
        .filter(|name| override_key(name).as_deref() == Some(key))
        .min()
}

fn unknown_key(key: &str, meant: Option<&str>, env: &HashMap<String, String>) -> ConfigError {
    let (table, name) = key.rsplit_once('.').unwrap_or(("", key));
    if pasted_secret(name) {
        // Named by where it is, not by itself (found in review: a token
        // pasted as `<token> = 1` was quoted back).
        let from = match override_var(key, env) {
            Some(_) => " (from an IVRGUARD__ environment variable)",
            None => "",
        };
        return ConfigError::new(
            if table.is_empty() { "config" } else { table },
            format!(
                "holds an unknown key that looks like a secret, so it is not shown{from}: \
                 secrets go in environment variables or files"
            ),
        );
    }
    let from = match override_var(key, env) {
        Some(var) => format!(" (from environment variable {var})"),
        None => String::new(),
    };
    let meant = match meant {
        Some(meant) => format!("; did you mean {meant:?}?"),
        None => String::new(),
    };
    ConfigError::new("config", format!("unknown key {key:?}{from}{meant}"))
}

/// What kind of value the `config` crate found, without the value. Its
/// `Unexpected` type is not exported, so this reads the kind off the front
/// of its `Display` ("string \"…\"", "64-bit integer `…`"); the text is
/// never returned.
fn unexpected_name(unexpected: &impl std::fmt::Display) -> &'static str {
    let text = Zeroizing::new(unexpected.to_string());
    let (kind, value) = text.split_once(['`', '"']).unwrap_or((text.as_str(), ""));
    match kind.trim() {
        "boolean" => "a boolean",
        "string" => "a string",
        "floating point" => "a fractional number",
        "unit value" => "nothing",
        "sequence" => "a list",
        "map" => "a table",
        kind if kind.ends_with("integer") && value.starts_with('-') => "a negative number",
        kind if kind.ends_with("integer") => "a number out of range",
        _ => "a value of another type",
    }
}

fn kind_name(kind: &ValueKind) -> &'static str {
    match kind {
        ValueKind::Nil => "nothing",
        ValueKind::Boolean(_) => "a boolean",
        ValueKind::I64(_) | ValueKind::I128(_) | ValueKind::U64(_) | ValueKind::U128(_) => {
            "a number"
        }
        ValueKind::Float(_) => "a fractional number",
        ValueKind::String(_) => "a string",
        ValueKind::Table(_) => "a table",
        ValueKind::Array(_) => "a list",
    }
}

/// The empty-string rule: `""` is the same as not set.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

// ---------------------------------------------------------------------------
// Validation, section by section
// ---------------------------------------------------------------------------

fn server_settings(raw: RawServer) -> Result<ServerSettings, ConfigError> {
    let listen = non_empty(raw.listen).unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if !(MIN_BODY_BYTES..=MAX_BODY_BYTES).contains(&max_body_bytes) {
        return Err(ConfigError::new(
            "server.max_body_bytes",
            format!("must be between {MIN_BODY_BYTES} (1 KiB) and {MAX_BODY_BYTES} (16 MiB)"),
        ));
    }
    let request_timeout = millis(
        "server.request_timeout_ms",
        raw.request_timeout_ms,
        DEFAULT_REQUEST_TIMEOUT_MS,
    )?;
    if request_timeout >= TWILIO_WEBHOOK_TIMEOUT {
        return Err(ConfigError::new(
            "server.request_timeout_ms",
            format!(
                "must be less than {} (Twilio's webhook timeout), so the fallback answer reaches Twilio in time",
                TWILIO_WEBHOOK_TIMEOUT.as_millis()
            ),
        ));
    }
    let http2 = raw.http2.unwrap_or(false);
    let listen = socket_addr("server.listen", &listen)?;
    let admin_listen = non_empty(raw.admin_listen)
        .map(|addr| socket_addr("server.admin_listen", &addr))
        .transpose()?;
    if admin_listen == Some(listen) && listen.port() != 0 {
        // `check` must not pass what `run` cannot start.
        return Err(ConfigError::new(
            "server.admin_listen",
            format!("must differ from server.listen ({listen})"),
        ));
    }
    Ok(ServerSettings {
        listen,
        admin_listen,
        trust_forwarded_headers: raw.trust_forwarded_headers.unwrap_or(false),
        max_body_bytes: to_usize("server.max_body_bytes", max_body_bytes)?,
        header_read_timeout: millis(
            "server.header_read_timeout_ms",
            raw.header_read_timeout_ms,
            DEFAULT_HEADER_READ_TIMEOUT_MS,
        )?,
        request_timeout,
        drain_timeout: millis(
            "server.drain_timeout_ms",
            raw.drain_timeout_ms,
            DEFAULT_DRAIN_TIMEOUT_MS,
        )?,
        max_connections: positive(
            "server.max_connections",
            raw.max_connections,
            DEFAULT_MAX_CONNECTIONS,
        )?,
        max_connections_per_client: match raw.max_connections_per_client.unwrap_or(0) {
            0 => None,
            n => Some(to_usize("server.max_connections_per_client", n)?),
        },
        workers: match raw.workers {
            None => default_workers(),
            Some(n @ 1..=MAX_WORKERS) => to_usize("server.workers", n)?,
            Some(_) => {
                return Err(ConfigError::new(
                    "server.workers",
                    "must be between 1 and 256 (leave it out for one per CPU)",
                ))
            }
        },
        // 0 (the default) turns polling off; SIGHUP always reloads.
        reload_poll_interval: match raw.reload_poll_interval_ms.unwrap_or(0) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        },
        tls: tls_settings(raw.tls_cert_file, raw.tls_key_file, http2)?,
        http2,
    })
}

/// `server.tls_cert_file` and `server.tls_key_file`: both or neither. Reads
/// and checks both files; errors name the key and the file, never what is
/// in it.
fn tls_settings(
    cert_file: Option<String>,
    key_file: Option<String>,
    http2: bool,
) -> Result<Option<TlsSettings>, ConfigError> {
    const CERT: &str = "server.tls_cert_file";
    const KEY: &str = "server.tls_key_file";
    let (cert_file, key_file) = match (non_empty(cert_file), non_empty(key_file)) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (PathBuf::from(cert), PathBuf::from(key)),
        (Some(_), None) => {
            return Err(ConfigError::new(
                KEY,
                "required when server.tls_cert_file is set: the file holding the certificate's private key (PEM)",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                CERT,
                "required when server.tls_key_file is set: the file holding the certificate chain (PEM)",
            ))
        }
    };
    let read = |path: &Path, key: &str| {
        config_file::read(path, config_file::PEM_LIMIT)
            .map(Zeroizing::new)
            .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", file_what(path))))
    };
    let (cert, key) = (read(&cert_file, CERT)?, read(&key_file, KEY)?);
    let config = crate::tls::server_config(&cert, &key, http2).map_err(|e| match e.file() {
        PemFile::Certificate => ConfigError::new(CERT, format!("{} {e}", file_what(&cert_file))),
        PemFile::Key => ConfigError::new(KEY, format!("{} {e}", file_what(&key_file))),
    })?;
    Ok(Some(TlsSettings {
        cert_file,
        key_file,
        config,
    }))
}

fn upstream_settings(
    raw: RawUpstream,
    env: &HashMap<String, String>,
) -> Result<UpstreamSettings, ConfigError> {
    let url = non_empty(raw.url).ok_or_else(|| {
        ConfigError::new(
            "upstream.url",
            "required: the application's address, e.g. http://127.0.0.1:3000",
        )
    })?;
    let (authority, path_prefix) = upstream_url(&url)?;
    let connect_timeout = millis(
        "upstream.connect_timeout_ms",
        raw.connect_timeout_ms,
        DEFAULT_CONNECT_TIMEOUT_MS,
    )?;
    let timeout = millis(
        "upstream.timeout_ms",
        raw.timeout_ms,
        DEFAULT_UPSTREAM_TIMEOUT_MS,
    )?;
    if connect_timeout > timeout {
        return Err(ConfigError::new(
            "upstream.connect_timeout_ms",
            "must not be more than upstream.timeout_ms",
        ));
    }
    let on_error = match non_empty(raw.on_error).as_deref() {
        None | Some("twiml") => OnUpstreamError::Twiml,
        Some("status") => OnUpstreamError::Status,
        Some(_) => {
            return Err(ConfigError::new(
                "upstream.on_error",
                "must be \"twiml\" (200 with upstream.fallback_twiml) or \"status\" (502/504)",
            ))
        }
    };
    let auth_token_source = secret_source(
        "upstream.auth_token",
        raw.auth_token.is_some(),
        raw.auth_token_env,
        raw.auth_token_file,
    )?;
    let auth_token = auth_token_source
        .as_ref()
        .map(|source| read_secret(source, &source.key("upstream.auth_token"), env))
        .transpose()?;
    Ok(UpstreamSettings {
        scheme_authority: format!("http://{}", authority.as_str()),
        authority,
        path_prefix,
        connect_timeout,
        timeout,
        pool_idle_timeout: millis(
            "upstream.pool_idle_timeout_ms",
            raw.pool_idle_timeout_ms,
            DEFAULT_POOL_IDLE_TIMEOUT_MS,
        )?,
        pool_max_idle_per_host: to_usize(
            "upstream.pool_max_idle_per_host",
            raw.pool_max_idle_per_host
                .unwrap_or(DEFAULT_POOL_MAX_IDLE_PER_HOST),
        )?,
        max_connections: positive(
            "upstream.max_connections",
            raw.max_connections,
            DEFAULT_UPSTREAM_MAX_CONNECTIONS,
        )?,
        rewrite_host: raw.rewrite_host.unwrap_or(false),
        on_error,
        fallback_twiml: non_empty(raw.fallback_twiml)
            .unwrap_or_else(|| DEFAULT_FALLBACK_TWIML.to_string()),
        auth_token,
        auth_token_source,
    })
}

fn twilio_settings(
    raw: RawTwilio,
    env: &HashMap<String, String>,
) -> Result<TwilioSettings, ConfigError> {
    let auth_token_source = required_secret_source(
        "twilio.auth_token",
        "the Twilio auth token",
        raw.auth_token.is_some(),
        raw.auth_token_env,
        raw.auth_token_file,
    )?;
    let secondary_auth_token_source = secret_source(
        "twilio.secondary_auth_token",
        raw.secondary_auth_token.is_some(),
        raw.secondary_auth_token_env,
        raw.secondary_auth_token_file,
    )?;
    let public_url = non_empty(raw.public_url)
        .map(|url| public_url(&url))
        .transpose()?;

    let mut shared_key_sources: Vec<(String, SecretSource)> = Vec::new();
    for (i, value) in list(raw.shared_keys, "twilio.shared_keys", StringAsList::Refuse)?
        .into_iter()
        .enumerate()
    {
        let base = format!("twilio.shared_keys[{i}]");
        let raw: RawSharedKey = section(Some(value), &base, env)?;
        let id = non_empty(raw.id).ok_or_else(|| {
            ConfigError::new(
                format!("{base}.id"),
                "required: the key id Twilio sends in X-Twilio-Webhooks-Signature-Settings",
            )
        })?;
        if id.contains(|c: char| c.is_whitespace() || c.is_control() || c == ',' || c == '=') {
            return Err(ConfigError::new(
                format!("{base}.id"),
                "must not contain whitespace, ',' or '=' (it is matched in key=<id>,algorithm=…)",
            ));
        }
        if shared_key_sources.iter().any(|(other, _)| *other == id) {
            return Err(ConfigError::new(
                format!("{base}.id"),
                "repeats the id of an earlier twilio.shared_keys entry",
            ));
        }
        let source = required_secret_source(
            &format!("{base}.secret"),
            "this key's secret",
            raw.secret.is_some(),
            raw.secret_env,
            raw.secret_file,
        )?;
        shared_key_sources.push((id, source));
    }

    let auth_token = read_secret(
        &auth_token_source,
        &auth_token_source.key("twilio.auth_token"),
        env,
    )?;
    let secondary_auth_token = secondary_auth_token_source
        .as_ref()
        .map(|source| read_secret(source, &source.key("twilio.secondary_auth_token"), env))
        .transpose()?;
    let mut shared_keys = Vec::with_capacity(shared_key_sources.len());
    for (i, (id, source)) in shared_key_sources.iter().enumerate() {
        let key = source.key(&format!("twilio.shared_keys[{i}].secret"));
        shared_keys.push((id.clone(), read_secret(source, &key, env)?));
    }
    Ok(TwilioSettings {
        public_url,
        auth_token,
        auth_token_source,
        secondary_auth_token,
        secondary_auth_token_source,
        shared_keys,
        shared_key_sources,
    })
}

fn encryption_settings(
    raw: RawEncryption,
    env: &HashMap<String, String>,
) -> Result<EncryptionSettings, ConfigError> {
    let key_source = required_secret_source(
        "encryption.key",
        "the 64-hex-character encryption key",
        raw.key.is_some(),
        raw.key_env,
        raw.key_file,
    )?;
    let fields = match raw.fields {
        None => DEFAULT_FIELDS.iter().map(|f| f.to_string()).collect(),
        Some(value) => {
            let mut fields = Vec::new();
            for (i, item) in list(Some(value), "encryption.fields", StringAsList::Commas)?
                .into_iter()
                .enumerate()
            {
                let name = string_item(item, &format!("encryption.fields[{i}]"))?;
                if name.is_empty() {
                    return Err(ConfigError::new(
                        format!("encryption.fields[{i}]"),
                        "is an empty name",
                    ));
                }
                if name.trim() != name {
                    return Err(ConfigError::new(
                        format!("encryption.fields[{i}]"),
                        "has spaces around it: names match exactly, and Twilio's have none",
                    ));
                }
                fields.push(name);
            }
            if let Some((i, twilio)) = near_miss(&fields) {
                return Err(ConfigError::new(
                    format!("encryption.fields[{i}]"),
                    format!(
                        "differs only in case from Twilio's \"{twilio}\", which would go to \
                         the app unencrypted: names match exactly (write \"{twilio}\", or both)"
                    ),
                ));
            }
            if fields.is_empty() {
                return Err(ConfigError::new(
                    "encryption.fields",
                    "must name at least one parameter to encrypt",
                ));
            }
            fields
        }
    };
    Ok(EncryptionSettings {
        key: read_key(&key_source, &key_source.key("encryption.key"), env)?,
        key_source,
        fields,
    })
}

/// A configured name that is one of Twilio's sensitive parameters in
/// another case (`digits`, `SPEECHRESULT`), while Twilio's own spelling is
/// not listed: its index and Twilio's name. Names match exactly, so such a
/// list encrypts nothing Twilio sends under that name (found in review:
/// `fields = ["digits"]` passed `check` and the PIN reached the app).
fn near_miss(fields: &[String]) -> Option<(usize, &'static str)> {
    fields.iter().enumerate().find_map(|(i, name)| {
        let twilio = DEFAULT_FIELDS
            .iter()
            .find(|twilio| twilio.eq_ignore_ascii_case(name) && *twilio != name)?;
        (!fields.iter().any(|f| f == twilio)).then_some((i, *twilio))
    })
}

fn log_settings(raw: RawLog) -> Result<LogSettings, ConfigError> {
    let format = match non_empty(raw.format).as_deref() {
        None | Some("json") => LogFormat::Json,
        Some("text") => LogFormat::Text,
        Some(_) => {
            return Err(ConfigError::new(
                "log.format",
                "must be \"json\" or \"text\"",
            ))
        }
    };
    let level = non_empty(raw.level).unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
    log_level(&level)?;
    let mut scrub_patterns = Vec::new();
    for (i, item) in list(
        raw.scrub_patterns,
        "log.scrub_patterns",
        StringAsList::OneItem,
    )?
    .into_iter()
    .enumerate()
    {
        let key = format!("log.scrub_patterns[{i}]");
        let pattern = string_item(item, &key)?;
        // The pattern itself is not quoted back: it may spell out what it hides.
        let re = regex::Regex::new(&pattern).map_err(|_| {
            ConfigError::new(
                &key,
                "is not a valid regular expression (syntax: https://docs.rs/regex/latest/regex/#syntax)",
            )
        })?;
        if re.is_match("") {
            return Err(ConfigError::new(
                &key,
                "matches the empty string, so it would redact between every character",
            ));
        }
        scrub_patterns.push(re);
    }
    Ok(LogSettings {
        format,
        level,
        scrub_patterns,
        scrub_card_numbers: raw.scrub_card_numbers.unwrap_or(true),
    })
}

/// `log.level` must parse as an `EnvFilter`, and a bare word must be a level:
/// `EnvFilter` reads `infoo` or `warning` as a *target* and would silently
/// turn every other log line off.
fn log_level(level: &str) -> Result<(), ConfigError> {
    const WHY: &str = "must be a tracing filter such as \"info\" or \"ivrguard=debug,warn\"";
    tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|_| ConfigError::new("log.level", WHY))?;
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare_word = !directive.contains(['=', '[', ':']);
        if bare_word
            && directive
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(ConfigError::new(
                "log.level",
                format!("{WHY}; a directive without '=' must be one of off, error, warn, info, debug, trace"),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Small parsers
// ---------------------------------------------------------------------------

fn millis(key: &str, value: Option<u64>, default: u64) -> Result<Duration, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError::new(key, "must be more than 0 (milliseconds)")),
        ms => Ok(Duration::from_millis(ms)),
    }
}

fn positive(key: &str, value: Option<u64>, default: u64) -> Result<usize, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError::new(key, "must be more than 0")),
        n => to_usize(key, n),
    }
}

fn to_usize(key: &str, value: u64) -> Result<usize, ConfigError> {
    usize::try_from(value).map_err(|_| ConfigError::new(key, "is too large for this platform"))
}

fn socket_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        ConfigError::new(
            key,
            "must be an IP address and port such as 0.0.0.0:8080 or [::]:8080 (host names are not resolved)",
        )
    })
}

/// How a list key reads a plain string, which is how an environment
/// variable writes a list.
#[derive(Clone, Copy)]
enum StringAsList {
    /// Comma-separated items, each trimmed (`encryption.fields`).
    Commas,
    /// The string is the one item (`log.scrub_patterns`: regexes have commas).
    OneItem,
    /// Not accepted (`twilio.shared_keys`, a list of tables).
    Refuse,
}

/// A list value: a TOML array, or a string read per `strings`.
fn list(value: Option<Value>, key: &str, strings: StringAsList) -> Result<Vec<Value>, ConfigError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    match (value.kind, strings) {
        (ValueKind::Array(items), _) => Ok(items),
        (ValueKind::String(text), StringAsList::Commas) => Ok(text
            .split(',')
            .map(|item| Value::new(None, item.trim()))
            .collect()),
        (ValueKind::String(text), StringAsList::OneItem) => Ok(vec![Value::new(None, text)]),
        // A string in the file, or any environment variable (found in
        // review: "expected a list, found a string" did not say what to do).
        (ValueKind::String(_), StringAsList::Refuse) => Err(ConfigError::new(
            key,
            "expected a list of tables (`[[twilio.shared_keys]]` in the config file: \
             an environment variable cannot set it), found a string",
        )),
        (other, _) => Err(ConfigError::new(
            key,
            format!("expected a list, found {}", kind_name(&other)),
        )),
    }
}

fn string_item(value: Value, key: &str) -> Result<String, ConfigError> {
    match value.kind {
        ValueKind::String(text) => Ok(text),
        other => Err(ConfigError::new(
            key,
            format!("expected a string, found {}", kind_name(&other)),
        )),
    }
}

/// Checks what `http::uri::Authority` lets through: no userinfo, a host, and
/// a port (if any) that is 1–65535.
fn check_authority(key: &str, authority: &http::uri::Authority) -> Result<(), ConfigError> {
    let text = authority.as_str();
    if text.contains('@') {
        return Err(ConfigError::new(
            key,
            "must not contain a user name or password",
        ));
    }
    if authority.host().is_empty() {
        return Err(ConfigError::new(key, "has no host"));
    }
    let after_host = match text.rfind(']') {
        Some(end) if text.starts_with('[') => &text[end + 1..],
        _ => text.find(':').map_or("", |i| &text[i..]),
    };
    if let Some(port) = after_host.strip_prefix(':') {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p != 0);
        if !valid {
            return Err(ConfigError::new(key, "has an invalid port (1-65535)"));
        }
    } else if !after_host.is_empty() {
        return Err(ConfigError::new(key, "has an invalid host"));
    }
    Ok(())
}

/// `upstream.url`: `http://host[:port][/prefix]` → (authority, prefix).
fn upstream_url(text: &str) -> Result<(http::uri::Authority, String), ConfigError> {
    const KEY: &str = "upstream.url";
    let shape = |problem: &str| {
        ConfigError::new(
            KEY,
            format!("{problem}; expected http://host[:port][/prefix], e.g. http://127.0.0.1:3000"),
        )
    };
    let lower = text.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(ConfigError::new(
            KEY,
            "https:// upstreams are not supported yet; the application runs beside ivrguard, use http://",
        ));
    }
    if !lower.starts_with("http://") {
        return Err(shape("must start with http://"));
    }
    if text.contains(['?', '#']) {
        return Err(shape("must not have a query or fragment"));
    }
    let uri: http::Uri = text.parse().map_err(|_| shape("is not a valid URL"))?;
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| shape("has no host"))?;
    check_authority(KEY, &authority)?;
    Ok((authority, uri.path().trim_end_matches('/').to_string()))
}

/// `twilio.public_url`: `scheme://host[:port]`, nothing else.
fn public_url(text: &str) -> Result<PublicUrl, ConfigError> {
    const KEY: &str = "twilio.public_url";
    let shape = |problem: &str| {
        ConfigError::new(
            KEY,
            format!("{problem}; expected scheme://host[:port] as Twilio calls it, e.g. https://ivr.example.com"),
        )
    };
    let scheme = if text.starts_with("https://") {
        "https"
    } else if text.starts_with("http://") {
        "http"
    } else {
        return Err(shape("must start with https:// or http:// (lowercase)"));
    };
    if text.contains(['?', '#']) {
        return Err(shape("must not have a query or fragment"));
    }
    let uri: http::Uri = text.parse().map_err(|_| shape("is not a valid URL"))?;
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| shape("has no host"))?;
    check_authority(KEY, &authority)?;
    let origin = text.strip_suffix('/').unwrap_or(text);
    if origin.len() != scheme.len() + 3 + authority.as_str().len() {
        return Err(shape(
            "must not have a path (the request's path is appended to it)",
        ));
    }
    Ok(PublicUrl {
        origin: origin.to_string(),
        scheme: scheme.to_string(),
        host_port: authority.as_str().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const KEY_HEX: &str = "a154eb4c759711bc2538a7cc021e9e9f17dd8aa63151c62ca28a82a4a404203d";
    const TOKEN: &str = "CANARYTOKEN0123456789abcdef01234";

    const MINIMAL: &str = r#"
[upstream]
url = "http://127.0.0.1:3000"

[twilio]
auth_token_env = "TWILIO_AUTH_TOKEN"

[encryption]
key_env = "IVRGUARD_KEY"
"#;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut map: HashMap<String, String> =
            [("TWILIO_AUTH_TOKEN", TOKEN), ("IVRGUARD_KEY", KEY_HEX)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        for (k, v) in pairs {
            map.insert(k.to_string(), v.to_string());
        }
        map
    }

    fn file(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents).unwrap();
        f
    }

    /// `ivrguard health` reads a config that may not parse: its error names
    /// the position, never the line (found in review: the parser's message
    /// quoted a half-pasted token to the container's health log).
    #[test]
    fn admin_listen_read_never_quotes_the_config() {
        let canary = "SUPERSECRETCANARY0123456789";
        let broken = format!("[server]\nadmin_listen = \"127.0.0.1:9\"\nauth_token = \"{canary}\n");
        let f = file(broken.as_bytes());
        let err = Settings::load_admin_listen(f.path(), &env(&[])).unwrap_err();
        let text = err.to_string();
        assert!(
            !text.contains(canary) && !text.contains("SUPERSECRET"),
            "{text}"
        );
        assert!(text.contains("is not valid TOML (line 3, column"), "{text}");
        let lenient = format!("{MINIMAL}\n[server]\nadmin_listen = \"127.0.0.1:9\"\nodd = 1\n");
        let f = file(lenient.as_bytes());
        let addr = Settings::load_admin_listen(f.path(), &env(&[])).unwrap();
        assert_eq!(addr, Some("127.0.0.1:9".parse().unwrap()));
    }

    fn load(toml: &str, env: &HashMap<String, String>) -> Result<Settings, ConfigError> {
        let f = file(toml.as_bytes());
        Settings::load(f.path(), env)
    }

    /// Loads expecting an error; checks it is one line and quotes no canary.
    fn error(toml: &str, env: &HashMap<String, String>) -> ConfigError {
        let err = load(toml, env).expect_err("config should be refused");
        let text = err.to_string();
        assert!(
            !text.contains('\n') && !text.contains('\r'),
            "multi-line: {text:?}"
        );
        assert!(!text.contains("CANARY"), "value echoed: {text}");
        assert!(!text.contains(KEY_HEX), "key echoed: {text}");
        err
    }

    fn with(extra_section_lines: &[(&str, &str)]) -> String {
        // Inserts `line` right after `[section]` in MINIMAL, adding the
        // section when MINIMAL has none.
        let mut toml = MINIMAL.to_string();
        for (section, line) in extra_section_lines {
            let header = format!("[{section}]\n");
            match toml.find(&header) {
                Some(at) => toml.insert_str(at + header.len(), &format!("{line}\n")),
                None => toml.push_str(&format!("\n{header}{line}\n")),
            }
        }
        toml
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let s = load(MINIMAL, &env(&[])).unwrap();
        assert_eq!(s.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(s.server.admin_listen, None);
        assert!(!s.server.trust_forwarded_headers);
        assert_eq!(s.server.max_body_bytes, 65_536);
        assert_eq!(s.server.header_read_timeout, Duration::from_millis(5_000));
        assert!(!s.server.http2, "HTTP/2 is off by default");
        assert_eq!(s.server.request_timeout, Duration::from_millis(14_000));
        assert_eq!(s.server.drain_timeout, Duration::from_millis(10_000));
        assert_eq!(s.server.max_connections, 4_096);
        assert_eq!(s.server.workers, default_workers());
        assert!(s.server.workers >= 1);
        assert_eq!(s.upstream.scheme_authority, "http://127.0.0.1:3000");
        assert_eq!(s.upstream.authority.as_str(), "127.0.0.1:3000");
        assert_eq!(s.upstream.path_prefix, "");
        assert_eq!(s.upstream.connect_timeout, Duration::from_millis(2_000));
        assert_eq!(s.upstream.timeout, Duration::from_millis(10_000));
        assert_eq!(s.upstream.pool_idle_timeout, Duration::from_millis(4_000));
        assert_eq!(s.upstream.pool_max_idle_per_host, 64);
        assert_eq!(s.upstream.max_connections, 64);
        assert_eq!(s.upstream.on_error, OnUpstreamError::Twiml);
        assert!(s.upstream.fallback_twiml.contains("<Hangup/>"));
        assert_eq!(s.twilio.public_url, None);
        assert_eq!(s.twilio.auth_token.expose(), TOKEN.as_bytes());
        assert_eq!(
            s.twilio.auth_token_source,
            SecretSource::Env("TWILIO_AUTH_TOKEN".into())
        );
        assert!(s.twilio.secondary_auth_token.is_none());
        assert!(s.twilio.shared_keys.is_empty());
        assert_eq!(s.encryption.key.to_hex().as_str(), KEY_HEX);
        assert_eq!(s.encryption.fields, DEFAULT_FIELDS);
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.log.level, "info");
        assert!(s.log.scrub_patterns.is_empty());
        assert!(s.log.scrub_card_numbers);
    }

    #[test]
    fn every_key_is_read_from_the_file() {
        let toml = r#"
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19901"
trust_forwarded_headers = true
max_body_bytes = 2048
header_read_timeout_ms = 1001
request_timeout_ms = 9000
drain_timeout_ms = 1002
max_connections = 7
workers = 3
http2 = true

[upstream]
url = "http://app.internal:8000/legacy/"
connect_timeout_ms = 1004
timeout_ms = 8000
pool_idle_timeout_ms = 1005
pool_max_idle_per_host = 0
max_connections = 3
on_error = "status"
fallback_twiml = "<Response/>"

[twilio]
auth_token_env = "TWILIO_AUTH_TOKEN"
secondary_auth_token_env = "SECOND"
public_url = "https://ivr.example.com:8443/"

[[twilio.shared_keys]]
id = "webhooks_sharedkey_1"
secret_env = "SHARED1"

[encryption]
key_env = "IVRGUARD_KEY"
fields = ["Digits", "Custom"]

[log]
format = "text"
level = "ivrguard=debug,warn"
scrub_patterns = ['\bPIN[0-9]{4}\b']
scrub_card_numbers = false
"#;
        let s = load(toml, &env(&[("SECOND", "CANARY2"), ("SHARED1", "CANARY3")])).unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(
            s.server.admin_listen,
            Some("127.0.0.1:19901".parse().unwrap())
        );
        assert!(s.server.trust_forwarded_headers);
        assert_eq!(s.server.max_body_bytes, 2048);
        assert_eq!(s.server.header_read_timeout, Duration::from_millis(1001));
        assert_eq!(s.server.request_timeout, Duration::from_millis(9000));
        assert_eq!(s.server.drain_timeout, Duration::from_millis(1002));
        assert_eq!(s.server.max_connections, 7);
        assert_eq!(s.server.workers, 3);
        assert!(s.server.http2);
        assert_eq!(s.upstream.scheme_authority, "http://app.internal:8000");
        assert_eq!(s.upstream.path_prefix, "/legacy");
        assert_eq!(s.upstream.connect_timeout, Duration::from_millis(1004));
        assert_eq!(s.upstream.timeout, Duration::from_millis(8000));
        assert_eq!(s.upstream.pool_idle_timeout, Duration::from_millis(1005));
        assert_eq!(s.upstream.pool_max_idle_per_host, 0);
        assert_eq!(s.upstream.max_connections, 3);
        assert_eq!(s.upstream.on_error, OnUpstreamError::Status);
        assert_eq!(s.upstream.fallback_twiml, "<Response/>");
        assert_eq!(
            s.twilio.public_url,
            Some(PublicUrl {
                origin: "https://ivr.example.com:8443".into(),
                scheme: "https".into(),
                host_port: "ivr.example.com:8443".into(),
            })
        );
        assert_eq!(s.twilio.secondary_auth_token.unwrap().expose(), b"CANARY2");
        assert_eq!(s.twilio.shared_keys.len(), 1);
        assert_eq!(s.twilio.shared_keys[0].0, "webhooks_sharedkey_1");
        assert_eq!(s.twilio.shared_keys[0].1.expose(), b"CANARY3");
        assert_eq!(s.encryption.fields, ["Digits", "Custom"]);
        assert_eq!(s.log.format, LogFormat::Text);
        assert_eq!(s.log.level, "ivrguard=debug,warn");
        assert!(s.log.scrub_patterns[0].is_match("x PIN1234 y"));
        assert!(!s.log.scrub_card_numbers);
    }

    #[test]
    fn environment_override_wins_over_the_file() {
        let s = load(
            MINIMAL,
            &env(&[("IVRGUARD__UPSTREAM__URL", "http://10.0.0.9:4000/app")]),
        )
        .unwrap();
        assert_eq!(s.upstream.scheme_authority, "http://10.0.0.9:4000");
        assert_eq!(s.upstream.path_prefix, "/app");
    }

    #[test]
    fn environment_override_keeps_underscores_inside_key_names() {
        let e = env(&[
            ("IVRGUARD__TWILIO__AUTH_TOKEN_ENV", "OTHER_TOKEN"),
            ("OTHER_TOKEN", "CANARYOTHER"),
        ]);
        let s = load(MINIMAL, &e).unwrap();
        assert_eq!(s.twilio.auth_token.expose(), b"CANARYOTHER");
        assert_eq!(
            s.twilio.auth_token_source,
            SecretSource::Env("OTHER_TOKEN".into())
        );
    }

    #[test]
    fn environment_overrides_parse_numbers_and_booleans() {
        let e = env(&[
            ("IVRGUARD__SERVER__MAX_BODY_BYTES", "2048"),
            ("IVRGUARD__SERVER__TRUST_FORWARDED_HEADERS", "true"),
            ("IVRGUARD__UPSTREAM__ON_ERROR", "status"),
        ]);
        let s = load(MINIMAL, &e).unwrap();
        assert_eq!(s.server.max_body_bytes, 2048);
        assert!(s.server.trust_forwarded_headers);
        assert_eq!(s.upstream.on_error, OnUpstreamError::Status);
    }

    #[test]
    fn fields_in_another_case_than_twilios_or_with_spaces_are_refused() {
        for (list, key, says) in [
            (
                r#"["digits"]"#,
                "encryption.fields[0]",
                r#"Twilio's "Digits""#,
            ),
            (
                r#"["Digits", "SPEECHRESULT"]"#,
                "encryption.fields[1]",
                r#"Twilio's "SpeechResult""#,
            ),
            (r#"["Digits "]"#, "encryption.fields[0]", "spaces around it"),
            (r#"[" Pin"]"#, "encryption.fields[0]", "spaces around it"),
        ] {
            let toml = with(&[("encryption", &format!("fields = {list}"))]);
            let err = error(&toml, &env(&[]));
            assert_eq!(err.key(), key, "{list}");
            assert!(err.to_string().contains(says), "{list}: {err}");
        }
        let env_list = env(&[("IVRGUARD__ENCRYPTION__FIELDS", "Digits,speechresult")]);
        let err = error(MINIMAL, &env_list);
        assert_eq!(err.key(), "encryption.fields[1]");
        // Both spellings listed: the other one is meant.
        let toml = with(&[("encryption", r#"fields = ["digits", "Digits", "Pin"]"#)]);
        let s = load(&toml, &env(&[])).unwrap();
        assert_eq!(s.encryption.fields, ["digits", "Digits", "Pin"]);
    }

    #[test]
    fn fields_override_is_a_comma_separated_list() {
        let toml = with(&[("encryption", r#"fields = ["Digits"]"#)]);
        let s = load(
            &toml,
            &env(&[("IVRGUARD__ENCRYPTION__FIELDS", "SpeechResult, Pin")]),
        )
        .unwrap();
        assert_eq!(s.encryption.fields, ["SpeechResult", "Pin"]);
        let err = error(&toml, &env(&[("IVRGUARD__ENCRYPTION__FIELDS", "Digits,")]));
        assert_eq!(err.key(), "encryption.fields[1]");
    }

    #[test]
    fn scrub_pattern_override_is_one_pattern_commas_included() {
        let s = load(
            MINIMAL,
            &env(&[("IVRGUARD__LOG__SCRUB_PATTERNS", r"\bacct[0-9]{6,8}\b")]),
        )
        .unwrap();
        assert_eq!(s.log.scrub_patterns.len(), 1);
        assert!(s.log.scrub_patterns[0].is_match("acct1234567"));
    }

    #[test]
    fn shared_keys_from_the_environment_are_refused_saying_where_they_go() {
        let err = error(
            MINIMAL,
            &env(&[("IVRGUARD__TWILIO__SHARED_KEYS", "id=k1,secret_env=K1")]),
        );
        assert_eq!(err.key(), "twilio.shared_keys");
        assert!(
            err.to_string()
                .contains("an environment variable cannot set it"),
            "{err}"
        );
    }

    #[test]
    fn empty_override_unsets_an_optional_key() {
        let toml = with(&[("twilio", r#"public_url = "https://ivr.example.com""#)]);
        assert!(load(&toml, &env(&[])).unwrap().twilio.public_url.is_some());
        let s = load(&toml, &env(&[("IVRGUARD__TWILIO__PUBLIC_URL", "")])).unwrap();
        assert_eq!(s.twilio.public_url, None);
        let err = error(MINIMAL, &env(&[("IVRGUARD__UPSTREAM__URL", "")]));
        assert_eq!(err.key(), "upstream.url");
        assert!(err.to_string().contains("required"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = error(&with(&[("upstream", r#"urll = "x""#)]), &env(&[]));
        assert_eq!(
            err.to_string(),
            r#"config: unknown key "upstream.urll"; did you mean "upstream.url"?"#
        );
        let err = error(
            &format!("{MINIMAL}\n[serverr]\nlisten = \"x\"\n"),
            &env(&[]),
        );
        assert_eq!(
            err.to_string(),
            r#"config: unknown key "serverr"; did you mean "server"?"#
        );
        let toml = format!("{MINIMAL}\n[[twilio.shared_keys]]\nid = \"k\"\nsecret_env = \"S\"\nsecert_file = \"x\"\n");
        let err = error(&toml, &env(&[("S", "CANARY")]));
        assert_eq!(
            err.to_string(),
            r#"config: unknown key "twilio.shared_keys[0].secert_file"; did you mean "twilio.shared_keys[0].secret_file"?"#
        );
        let err = error(MINIMAL, &env(&[("IVRGUARD__UPSTREAM__TIMEOUT", "5")]));
        assert_eq!(
            err.to_string(),
            r#"config: unknown key "upstream.timeout" (from environment variable IVRGUARD__UPSTREAM__TIMEOUT)"#,
            "nothing is two edits from it"
        );
        let err = error(&with(&[("server", r#"listn = "x""#)]), &env(&[]));
        assert_eq!(
            err.to_string(),
            r#"config: unknown key "server.listn"; did you mean "server.listen"?"#
        );
        // A secret's key is never suggested, only its `_env` key.
        let err = error(&with(&[("twilio", r#"auth_tokn = "x""#)]), &env(&[]));
        assert_eq!(
            err.to_string(),
            r#"config: unknown key "twilio.auth_tokn"; did you mean "twilio.auth_token_env"?"#
        );
        // Short names get no guess: two edits turn `ab` into most anything.
        let err = error(&with(&[("log", "lv = 1")]), &env(&[]));
        assert_eq!(err.to_string(), r#"config: unknown key "log.lv""#);
    }

    #[test]
    fn an_unknown_key_that_looks_like_a_secret_is_not_quoted() {
        const TOKEN: &str = "0f3c2a9bCANARY5d6e7f8091a2b3c4d5";
        let toml = with(&[("twilio", &format!("{} = 1", TOKEN.to_lowercase()))]);
        let err = error(&toml, &env(&[]));
        assert_eq!(err.key(), "twilio");
        assert!(!err.to_string().contains("canary"), "{err}");
        let toml = with(&[("encryption", &format!("\"{KEY_HEX}\" = true"))]);
        assert_eq!(error(&toml, &env(&[])).key(), "encryption");
        let var = format!("IVRGUARD__ENCRYPTION__{KEY_HEX}");
        let err = error(MINIMAL, &env(&[(var.as_str(), "1")]));
        assert_eq!(err.key(), "encryption");
        assert!(
            err.to_string().contains("IVRGUARD__ environment variable"),
            "{err}"
        );
        // A typo is still quoted, to be found quickly.
        let err = error(
            &with(&[("upstream", r#"pool_idle_timeout = 1"#)]),
            &env(&[]),
        );
        assert!(
            err.to_string().contains("upstream.pool_idle_timeout"),
            "{err}"
        );
    }

    #[test]
    fn keys_in_another_case_and_decimal_numbers_are_refused() {
        // Found in review: the `config` crate lowercases keys and rounds
        // decimals, so these passed (and `LISTEN` beside `listen` was
        // silently ignored).
        let upper = MINIMAL.replacen("[upstream]", "[UPSTREAM]", 1);
        assert_ne!(upper, MINIMAL);
        let err = error(&upper, &env(&[]));
        assert_eq!(err.key(), "config");
        assert!(
            err.to_string().contains("section name is not lower case"),
            "{err}"
        );
        let err = error(&with(&[("server", "Max_Body_Bytes = 2048")]), &env(&[]));
        assert_eq!(err.key(), "server");
        assert!(err.to_string().contains("not lower case"), "{err}");
        assert!(!err.to_string().contains("Max_Body"), "{err}");
        let err = error(&with(&[("server", "max_body_bytes = 1023.9")]), &env(&[]));
        assert_eq!(err.key(), "server.max_body_bytes");
        assert!(!err.to_string().contains("1023"), "{err}");
        let toml =
            format!("{MINIMAL}\n[[twilio.shared_keys]]\nid = \"k\"\nsecret_env = \"S\"\nx = 1.5\n");
        let err = error(&toml, &env(&[("S", "CANARY")]));
        assert_eq!(err.key(), "twilio.shared_keys[0].x");
        // Whole numbers and lower-case keys are fine.
        assert!(load(&with(&[("server", "max_body_bytes = 2048")]), &env(&[])).is_ok());
    }

    #[test]
    fn values_of_the_wrong_toml_type_in_the_file_are_refused() {
        // Found in review: the `config` crate converted these silently.
        let cases = [
            (
                "server",
                r#"max_body_bytes = "2048""#,
                "server.max_body_bytes",
            ),
            ("server", r#"http2 = "yes""#, "server.http2"),
            (
                "upstream",
                r#"rewrite_host = "true""#,
                "upstream.rewrite_host",
            ),
            ("log", "level = 5", "log.level"),
            ("upstream", "on_error = true", "upstream.on_error"),
        ];
        for (section, line, key) in cases {
            let err = error(&with(&[(section, line)]), &env(&[]));
            assert_eq!(err.key(), key, "{line}: {err}");
            assert!(err.to_string().contains("wrong TOML type"), "{err}");
        }
        let toml = format!("{MINIMAL}\n[[twilio.shared_keys]]\nid = 7\nsecret_env = \"S\"\n");
        let err = error(&toml, &env(&[("S", "CANARY")]));
        assert_eq!(err.key(), "twilio.shared_keys[0].id");
        // The same values unquoted load, and overrides stay text.
        let fine = with(&[
            ("server", "max_body_bytes = 2048\nhttp2 = true"),
            ("upstream", "rewrite_host = true"),
        ]);
        let settings = load(&fine, &env(&[("IVRGUARD__SERVER__MAX_BODY_BYTES", "4096")])).unwrap();
        assert_eq!(settings.server.max_body_bytes, 4096);
        assert!(settings.server.http2);
    }

    #[test]
    fn literal_secrets_are_refused_without_echoing_them() {
        let cases = [
            (
                "twilio",
                r#"auth_token = "CANARY-LITERAL""#,
                "twilio.auth_token",
            ),
            (
                "twilio",
                r#"secondary_auth_token = "CANARY-LITERAL""#,
                "twilio.secondary_auth_token",
            ),
            ("encryption", r#"key = "CANARY-LITERAL""#, "encryption.key"),
            (
                "upstream",
                r#"auth_token = "CANARY-LITERAL""#,
                "upstream.auth_token",
            ),
        ];
        for (section, line, key) in cases {
            let err = error(&with(&[(section, line)]), &env(&[]));
            assert_eq!(err.key(), key, "{line}");
            assert_eq!(
                err.to_string(),
                format!("{key}: secrets must not be config values (in the file or an IVRGUARD__ variable); set {key}_env (or _file) to the name of a variable holding it")
            );
        }
        let toml =
            format!("{MINIMAL}\n[[twilio.shared_keys]]\nid = \"k\"\nsecret = \"CANARY-LITERAL\"\n");
        assert_eq!(
            error(&toml, &env(&[])).key(),
            "twilio.shared_keys[0].secret"
        );
        // Also when the literal comes from an override variable.
        let err = error(
            MINIMAL,
            &env(&[("IVRGUARD__ENCRYPTION__KEY", "CANARY-LITERAL")]),
        );
        assert_eq!(err.key(), "encryption.key");
    }

    #[test]
    fn missing_or_empty_secret_variables_are_named() {
        let mut e = env(&[]);
        e.remove("TWILIO_AUTH_TOKEN");
        let err = error(MINIMAL, &e);
        assert_eq!(
            err.to_string(),
            "twilio.auth_token_env: environment variable TWILIO_AUTH_TOKEN is not set"
        );
        let err = error(MINIMAL, &env(&[("TWILIO_AUTH_TOKEN", "")]));
        assert_eq!(
            err.to_string(),
            "twilio.auth_token_env: environment variable TWILIO_AUTH_TOKEN is empty"
        );
        let err = error(MINIMAL, &env(&[("IVRGUARD_KEY", "")]));
        assert_eq!(
            err.to_string(),
            "encryption.key_env: environment variable IVRGUARD_KEY is empty"
        );
    }

    #[test]
    fn a_secret_pasted_as_a_variable_name_or_path_is_not_echoed() {
        let token = "0123456789abcdef0123456789abcdef";
        let toml = MINIMAL.replace("\"TWILIO_AUTH_TOKEN\"", &toml_str(token));
        let err = load(&toml, &env(&[])).unwrap_err().to_string();
        assert!(!err.contains(token), "{err}");
        assert!(
            err.starts_with(
                "twilio.auth_token_env: the environment variable it names (name withheld"
            ),
            "{err}"
        );
        let toml = MINIMAL.replace("\"IVRGUARD_KEY\"", &toml_str(&KEY_HEX.to_uppercase()));
        let err = load(&toml, &env(&[])).unwrap_err().to_string();
        assert!(!err.contains(&KEY_HEX.to_uppercase()[..16]), "{err}");
        let toml = MINIMAL.replace(
            "key_env = \"IVRGUARD_KEY\"",
            &format!("key_file = {}", toml_str(KEY_HEX)),
        );
        let err = load(&toml, &env(&[])).unwrap_err().to_string();
        assert!(!err.contains(&KEY_HEX[..16]), "{err}");
        assert!(
            err.starts_with("encryption.key_file: cannot read the file it names (path withheld"),
            "{err}"
        );
    }

    #[test]
    fn secret_keys_are_required() {
        let toml = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n[encryption]\nkey_env = \"IVRGUARD_KEY\"\n";
        let err = error(toml, &env(&[]));
        assert_eq!(err.key(), "twilio.auth_token_env");
        assert!(err.to_string().contains("twilio.auth_token_file"), "{err}");
        let toml = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n[twilio]\nauth_token_env = \"TWILIO_AUTH_TOKEN\"\n";
        assert_eq!(error(toml, &env(&[])).key(), "encryption.key_env");
        let toml = format!("{MINIMAL}\n[[twilio.shared_keys]]\nid = \"k\"\n");
        assert_eq!(
            error(&toml, &env(&[])).key(),
            "twilio.shared_keys[0].secret_env"
        );
    }

    #[test]
    fn both_env_and_file_for_one_secret_are_refused() {
        let err = error(
            &with(&[("twilio", r#"auth_token_file = "/run/secrets/t""#)]),
            &env(&[]),
        );
        assert_eq!(
            err.to_string(),
            "twilio.auth_token_env, twilio.auth_token_file: set only one of the two"
        );
        let err = error(
            &with(&[("encryption", r#"key_file = "/run/secrets/k""#)]),
            &env(&[]),
        );
        assert_eq!(err.key(), "encryption.key_env, encryption.key_file");
    }

    #[test]
    fn encryption_key_length_and_alphabet_are_checked_without_echo() {
        let cases = [
            (&KEY_HEX[..63], "encryption.key_env: IVRGUARD_KEY must be 64 hex characters (a 32-byte key), found 63 characters; `ivrguard keygen` makes one"),
            (&format!("{KEY_HEX}0")[..], "encryption.key_env: IVRGUARD_KEY must be 64 hex characters (a 32-byte key), found 65 characters; `ivrguard keygen` makes one"),
            (&format!("{}g", &KEY_HEX[..63])[..], "encryption.key_env: IVRGUARD_KEY must be 64 hex characters (a 32-byte key), found a non-hex character; `ivrguard keygen` makes one"),
            // 64 characters, one of them not ASCII (found in review: "found 64 characters").
            (&format!("{}é", &KEY_HEX[..63])[..], "encryption.key_env: IVRGUARD_KEY must be 64 hex characters (a 32-byte key), found a non-hex character; `ivrguard keygen` makes one"),
        ];
        for (value, expected) in cases {
            let err = load(MINIMAL, &env(&[("IVRGUARD_KEY", value)])).unwrap_err();
            assert_eq!(err.to_string(), expected);
            assert!(!err.to_string().contains(&value[..16]));
        }
        let upper = load(MINIMAL, &env(&[("IVRGUARD_KEY", &KEY_HEX.to_uppercase())])).unwrap();
        assert_eq!(upper.encryption.key.to_hex().as_str(), KEY_HEX);
    }

    #[test]
    fn key_file_may_end_with_one_newline() {
        for ending in ["", "\n", "\r\n"] {
            let key = file(format!("{KEY_HEX}{ending}").as_bytes());
            let toml = format!(
                "[upstream]\nurl = \"http://127.0.0.1:3000\"\n[twilio]\nauth_token_env = \"TWILIO_AUTH_TOKEN\"\n[encryption]\nkey_file = {}\n",
                toml_str(&key.path().to_string_lossy())
            );
            let s = load(&toml, &env(&[])).unwrap();
            assert_eq!(s.encryption.key.to_hex().as_str(), KEY_HEX, "{ending:?}");
            assert_eq!(
                s.encryption.key_source,
                SecretSource::File(key.path().to_path_buf())
            );
        }
        for bad in ["\n\n", " \n", "\t", " "] {
            let key = file(format!("{KEY_HEX}{bad}").as_bytes());
            let toml = format!(
                "[upstream]\nurl = \"http://127.0.0.1:3000\"\n[twilio]\nauth_token_env = \"TWILIO_AUTH_TOKEN\"\n[encryption]\nkey_file = {}\n",
                toml_str(&key.path().to_string_lossy())
            );
            let err = error(&toml, &env(&[]));
            assert_eq!(err.key(), "encryption.key_file");
            assert!(err.to_string().contains("whitespace"), "{err}");
            assert!(
                err.to_string().contains(&*key.path().to_string_lossy()),
                "{err}"
            );
        }
    }

    #[test]
    fn env_key_follows_the_same_newline_rule() {
        let s = load(MINIMAL, &env(&[("IVRGUARD_KEY", &format!("{KEY_HEX}\n"))])).unwrap();
        assert_eq!(s.encryption.key.to_hex().as_str(), KEY_HEX);
        let err = error(MINIMAL, &env(&[("IVRGUARD_KEY", &format!(" {KEY_HEX}"))]));
        assert_eq!(
            err.to_string(),
            "encryption.key_env: environment variable IVRGUARD_KEY has leading or trailing whitespace (only one trailing newline is removed)"
        );
        let err = error(MINIMAL, &env(&[("TWILIO_AUTH_TOKEN", "CANARY \n")]));
        assert_eq!(err.key(), "twilio.auth_token_env");
    }

    /// Found in review: a secret file saved with a byte order mark (UTF-8
    /// or UTF-16), ending in a no-break space, or of two lines was taken
    /// whole: a token no signature matches, with a warning at most (only
    /// the primary token's shape is checked). Each is refused, naming the
    /// key and the file, never the bytes.
    #[test]
    fn invisible_or_multi_line_secrets_are_refused_naming_the_key() {
        let cases: [(&[u8], &str); 7] = [
            (b"\xEF\xBB\xBFCANARYTOKEN\n", "byte order mark"),
            (b"\xFF\xFEC\0A\0N\0A\0R\0Y\0", "byte order mark"),
            ("CANARYTOKEN\u{a0}\n".as_bytes(), "whitespace"),
            ("\u{2003}CANARYTOKEN".as_bytes(), "whitespace"),
            (b"CANARYTOKEN\nCANARYOTHER\n", "control character"),
            (b"CANARY\tTOKEN", "control character"),
            (b"CANARY\0TOKEN\n", "control character"),
        ];
        for (contents, why) in cases {
            let secret = file(contents);
            let toml = with(&[(
                "twilio",
                &format!(
                    "secondary_auth_token_file = {}",
                    toml_str(&secret.path().to_string_lossy())
                ),
            )]);
            let err = error(&toml, &env(&[]));
            assert_eq!(
                err.key(),
                "twilio.secondary_auth_token_file",
                "{contents:?}"
            );
            assert!(err.to_string().contains(why), "{contents:?}: {err}");
            assert!(
                err.to_string().contains(&*secret.path().to_string_lossy()),
                "{err}"
            );
        }
        // The key too, by variable.
        let err = error(
            MINIMAL,
            &env(&[("IVRGUARD_KEY", &format!("\u{feff}{KEY_HEX}"))]),
        );
        assert_eq!(
            err.to_string(),
            "encryption.key_env: environment variable IVRGUARD_KEY begins with a byte order mark (saved as UTF-8 with BOM or UTF-16?): save it as plain text"
        );
        // What an ordinary secret holds still loads.
        let token = file("CANARY-tök/+=_.~\n".as_bytes());
        let toml = MINIMAL.replace(
            "auth_token_env = \"TWILIO_AUTH_TOKEN\"",
            &format!(
                "auth_token_file = {}",
                toml_str(&token.path().to_string_lossy())
            ),
        );
        let s = load(&toml, &env(&[])).unwrap();
        assert_eq!(s.twilio.auth_token.expose(), "CANARY-tök/+=_.~".as_bytes());
    }

    #[test]
    fn token_file_loses_one_trailing_newline() {
        let token = file(b"CANARYFILETOKEN\n");
        let toml = format!(
            "[upstream]\nurl = \"http://127.0.0.1:3000\"\n[twilio]\nauth_token_file = {}\n[encryption]\nkey_env = \"IVRGUARD_KEY\"\n",
            toml_str(&token.path().to_string_lossy())
        );
        let s = load(&toml, &env(&[])).unwrap();
        assert_eq!(s.twilio.auth_token.expose(), b"CANARYFILETOKEN");
    }

    #[test]
    fn unreadable_secret_file_names_key_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-secret");
        let toml = with(&[(
            "twilio",
            &format!(
                "secondary_auth_token_file = {}",
                toml_str(&path.to_string_lossy())
            ),
        )]);
        let err = error(&toml, &env(&[]));
        assert_eq!(err.key(), "twilio.secondary_auth_token_file");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        // A newline in the path does not break the one-line rule.
        let toml = with(&[(
            "twilio",
            r#"secondary_auth_token_file = "/nonexistent/a\nb""#,
        )]);
        let err = error(&toml, &env(&[]));
        assert!(err.to_string().contains(r"/nonexistent/a\nb"), "{err}");
    }

    /// `Settings::load` on another thread, given at most 10 s: a read that
    /// blocks fails the test instead of hanging it.
    fn load_within_10s(path: &Path, env: HashMap<String, String>) -> Result<Settings, ConfigError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(Settings::load(&path, &env));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("loading the config must not block")
    }

    #[test]
    fn oversized_secret_file_is_refused_naming_the_key() {
        let token_file = |len: usize| {
            let token = file(&vec![b'C'; len]);
            let toml = MINIMAL.replace(
                "auth_token_env = \"TWILIO_AUTH_TOKEN\"",
                &format!(
                    "auth_token_file = {}",
                    toml_str(&token.path().to_string_lossy())
                ),
            );
            (token, toml)
        };
        let (_token, toml) = token_file((64 << 10) + 1);
        let err = error(&toml, &env(&[]));
        assert_eq!(err.key(), "twilio.auth_token_file");
        assert!(err.to_string().ends_with(": larger than 64 KiB"), "{err}");
        // 64 KiB exactly is read (and then judged as a token).
        let (_token, toml) = token_file(64 << 10);
        let settings = load(&toml, &env(&[])).unwrap();
        assert_eq!(settings.twilio.auth_token.expose().len(), 64 << 10);
    }

    #[test]
    fn files_that_are_not_regular_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("secret-fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        let fifo_text = toml_str(&fifo.to_string_lossy());
        let cases = [
            (
                format!(
                    "{MINIMAL}\n[[twilio.shared_keys]]\nid = \"k\"\nsecret_file = {fifo_text}\n"
                ),
                "twilio.shared_keys[0].secret_file",
            ),
            (
                with(&[(
                    "twilio",
                    &format!("secondary_auth_token_file = {fifo_text}"),
                )]),
                "twilio.secondary_auth_token_file",
            ),
            (
                with(&[(
                    "server",
                    &format!("tls_cert_file = {fifo_text}\ntls_key_file = {fifo_text}"),
                )]),
                "server.tls_cert_file",
            ),
            (
                MINIMAL.replace("key_env = \"IVRGUARD_KEY\"", "key_file = \"/dev/zero\""),
                "encryption.key_file",
            ),
        ];
        for (toml, key) in cases {
            let config = file(toml.as_bytes());
            let err = load_within_10s(config.path(), env(&[])).unwrap_err();
            assert_eq!(err.key(), key, "{toml}");
            assert!(err.to_string().ends_with(": not a regular file"), "{err}");
        }
        // The config file itself.
        let err = load_within_10s(&fifo, env(&[])).unwrap_err();
        assert_eq!(err.key(), "config");
        assert!(err.to_string().ends_with(": not a regular file"), "{err}");
    }

    #[test]
    fn missing_config_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ivrguard.toml");
        let err = Settings::load(&path, &env(&[])).unwrap_err();
        assert_eq!(err.key(), "config");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn toml_syntax_errors_give_the_position_not_the_line() {
        let toml = format!("{MINIMAL}\n[twilio2]\nauth_token = CANARY-unquoted\n");
        let err = error(&toml, &env(&[]));
        assert_eq!(err.key(), "config");
        assert!(err.to_string().contains("not valid TOML (line "), "{err}");
    }

    #[test]
    fn wrong_types_name_the_key_and_not_the_value() {
        let cases = [
            (
                "server",
                r#"max_body_bytes = "CANARY-text""#,
                "server.max_body_bytes",
            ),
            (
                "server",
                r#"trust_forwarded_headers = "CANARY-text""#,
                "server.trust_forwarded_headers",
            ),
            ("server", "max_connections = -5", "server.max_connections"),
            (
                "upstream",
                r#"connect_timeout_ms = { CANARY = "CANARY-text" }"#,
                "upstream.connect_timeout_ms",
            ),
            (
                "twilio",
                r#"public_url = { CANARY = "CANARY-text" }"#,
                "twilio.public_url",
            ),
            (
                "upstream",
                r#"timeout_ms = ["CANARY-text"]"#,
                "upstream.timeout_ms",
            ),
            (
                "encryption",
                r#"fields = [1, "CANARY-text"]"#,
                "encryption.fields[0]",
            ),
            ("encryption", "fields = true", "encryption.fields"),
            (
                "log",
                r#"scrub_card_numbers = "CANARY-text""#,
                "log.scrub_card_numbers",
            ),
            (
                "twilio",
                r#"shared_keys = "CANARY-text""#,
                "twilio.shared_keys",
            ),
        ];
        for (section, line, key) in cases {
            let err = error(&with(&[(section, line)]), &env(&[]));
            assert_eq!(err.key(), key, "{line}: {err}");
            assert!(err.to_string().contains("expected"), "{err}");
        }
        let err = error(
            MINIMAL,
            &env(&[("IVRGUARD__SERVER__MAX_CONNECTIONS", "CANARY-text")]),
        );
        assert_eq!(
            err.to_string(),
            "server.max_connections: expected a whole number (0 or more), found a string (from environment variable IVRGUARD__SERVER__MAX_CONNECTIONS)"
        );
        let toml = MINIMAL.replace(
            r#"url = "http://127.0.0.1:3000""#,
            r#"url = ["CANARY-text"]"#,
        );
        assert_eq!(error(&toml, &env(&[])).key(), "upstream.url");
        let err = error("server = 5\n", &env(&[]));
        assert_eq!(
            err.to_string(),
            "server: expected a table ([server]), found a number"
        );
    }

    #[test]
    fn bad_upstream_urls_are_refused() {
        let cases = [
            ("https://127.0.0.1:3000", "not supported yet"),
            ("127.0.0.1:3000", "must start with http://"),
            ("ftp://127.0.0.1", "must start with http://"),
            ("http://127.0.0.1:3000/?CANARY=1", "query"),
            ("http://127.0.0.1:3000/#CANARY", "fragment"),
            ("http://user:CANARY@127.0.0.1:3000", "user name or password"),
            ("http://127.0.0.1:99999", "invalid port"),
            ("http://127.0.0.1:0", "invalid port"),
            ("http://127.0.0.1:", "invalid port"),
            ("http://127.0.0.1:30a0", "invalid port"),
            ("http://", "expected http://host"),
            ("http://:3000", "has no host"),
            ("http://CANARY space", "not a valid URL"),
        ];
        for (url, problem) in cases {
            let err = error(MINIMAL, &env(&[("IVRGUARD__UPSTREAM__URL", url)]));
            assert_eq!(err.key(), "upstream.url", "{url}");
            assert!(err.to_string().contains(problem), "{url}: {err}");
        }
        for (url, authority, prefix) in [
            ("http://[::1]:3000", "[::1]:3000", ""),
            ("HTTP://localhost/", "localhost", ""),
            ("http://app/a/b//", "app", "/a/b"),
        ] {
            let s = load(MINIMAL, &env(&[("IVRGUARD__UPSTREAM__URL", url)])).unwrap();
            assert_eq!(s.upstream.scheme_authority, format!("http://{authority}"));
            assert_eq!(s.upstream.path_prefix, prefix);
        }
    }

    #[test]
    fn public_url_is_an_origin_only() {
        for (url, origin, scheme, host_port) in [
            (
                "https://ivr.example.com",
                "https://ivr.example.com",
                "https",
                "ivr.example.com",
            ),
            (
                "https://ivr.example.com/",
                "https://ivr.example.com",
                "https",
                "ivr.example.com",
            ),
            (
                "http://10.0.0.1:8080",
                "http://10.0.0.1:8080",
                "http",
                "10.0.0.1:8080",
            ),
        ] {
            let s = load(MINIMAL, &env(&[("IVRGUARD__TWILIO__PUBLIC_URL", url)])).unwrap();
            assert_eq!(
                s.twilio.public_url,
                Some(PublicUrl {
                    origin: origin.into(),
                    scheme: scheme.into(),
                    host_port: host_port.into()
                })
            );
        }
        for url in [
            "https://ivr.example.com/voice",
            "https://ivr.example.com//",
            "https://ivr.example.com?a=1",
            "https://ivr.example.com/#x",
            "https://u:CANARY@ivr.example.com",
            "HTTPS://ivr.example.com",
            "ivr.example.com",
            "wss://ivr.example.com",
            "https://",
        ] {
            let err = error(MINIMAL, &env(&[("IVRGUARD__TWILIO__PUBLIC_URL", url)]));
            assert_eq!(err.key(), "twilio.public_url", "{url}");
        }
    }

    #[test]
    fn timeouts_must_fit_inside_twilios_budget() {
        let err = error(&with(&[("upstream", "timeout_ms = 14000")]), &env(&[]));
        assert_eq!(err.key(), "upstream.timeout_ms");
        let err = error(
            &with(&[("server", "request_timeout_ms = 15000")]),
            &env(&[]),
        );
        assert_eq!(err.key(), "server.request_timeout_ms");
        assert!(err.to_string().contains("15000"));
        let ok = with(&[
            ("server", "request_timeout_ms = 14999"),
            ("upstream", "timeout_ms = 14998"),
        ]);
        assert!(load(&ok, &env(&[])).is_ok());
        let err = error(
            &with(&[("upstream", "connect_timeout_ms = 11000")]),
            &env(&[]),
        );
        assert_eq!(err.key(), "upstream.connect_timeout_ms");
        for (section, key) in [
            ("server", "header_read_timeout_ms"),
            ("server", "drain_timeout_ms"),
            ("upstream", "connect_timeout_ms"),
            ("upstream", "pool_idle_timeout_ms"),
            ("server", "max_connections"),
            ("server", "workers"),
            ("upstream", "max_connections"),
        ] {
            let err = error(&with(&[(section, &format!("{key} = 0"))]), &env(&[]));
            assert_eq!(err.key(), format!("{section}.{key}"));
        }
    }

    #[test]
    fn body_limit_is_between_1_kib_and_16_mib() {
        for (value, ok) in [
            (1023, false),
            (1024, true),
            (16 * 1024 * 1024, true),
            (16 * 1024 * 1024 + 1, false),
        ] {
            let result = load(
                &with(&[("server", &format!("max_body_bytes = {value}"))]),
                &env(&[]),
            );
            assert_eq!(result.is_ok(), ok, "{value}");
            if let Err(err) = result {
                assert_eq!(err.key(), "server.max_body_bytes");
            }
        }
    }

    #[test]
    fn enumerations_and_addresses_are_checked() {
        let cases = [
            ("upstream", r#"on_error = "CANARY""#, "upstream.on_error"),
            ("log", r#"format = "CANARY""#, "log.format"),
            ("log", r#"level = "infoo""#, "log.level"),
            ("log", r#"level = "warning,ivrguard=debug""#, "log.level"),
            ("log", r#"level = "ivrguard=[""#, "log.level"),
            ("server", r#"listen = "localhost:8080""#, "server.listen"),
            (
                "server",
                r#"admin_listen = "CANARY""#,
                "server.admin_listen",
            ),
        ];
        for (section, line, key) in cases {
            assert_eq!(
                error(&with(&[(section, line)]), &env(&[])).key(),
                key,
                "{line}"
            );
        }
        for level in [
            "debug",
            "WARN",
            "ivrguard=debug,warn",
            "ivrguard::pipeline=trace",
            "off",
        ] {
            let toml = with(&[("log", &format!("level = {}", toml_str(level)))]);
            assert!(load(&toml, &env(&[])).is_ok(), "{level}");
        }
    }

    #[test]
    fn bad_scrub_patterns_are_named_by_index() {
        let toml = with(&[("log", r#"scrub_patterns = ['\d{4}', 'CANARY(']"#)]);
        let err = error(&toml, &env(&[]));
        assert_eq!(err.key(), "log.scrub_patterns[1]");
        assert!(
            err.to_string().contains("not a valid regular expression"),
            "{err}"
        );
        let toml = with(&[("log", r#"scrub_patterns = ['x*']"#)]);
        assert_eq!(error(&toml, &env(&[])).key(), "log.scrub_patterns[0]");
    }

    #[test]
    fn shared_key_ids_are_unique_and_well_formed() {
        let two = |a: &str, b: &str| {
            format!("{MINIMAL}\n[[twilio.shared_keys]]\nid = {}\nsecret_env = \"S1\"\n[[twilio.shared_keys]]\nid = {}\nsecret_env = \"S2\"\n", toml_str(a), toml_str(b))
        };
        let e = env(&[("S1", "CANARY1"), ("S2", "CANARY2")]);
        let s = load(&two("k1", "k2"), &e).unwrap();
        assert_eq!(
            s.twilio
                .shared_keys
                .iter()
                .map(|(id, _)| id.as_str())
                .collect::<Vec<_>>(),
            ["k1", "k2"]
        );
        assert_eq!(s.twilio.shared_keys[1].1.expose(), b"CANARY2");
        let err = error(&two("k1", "k1"), &e);
        assert_eq!(err.key(), "twilio.shared_keys[1].id");
        assert!(err.to_string().contains("repeats"), "{err}");
        assert_eq!(error(&two("k1", ""), &e).key(), "twilio.shared_keys[1].id");
        assert_eq!(
            error(&two("k,1", "k2"), &e).key(),
            "twilio.shared_keys[0].id"
        );
        let err = error(&two("k1", "k2"), &env(&[("S1", "CANARY1")]));
        assert_eq!(
            err.to_string(),
            "twilio.shared_keys[1].secret_env: environment variable S2 is not set"
        );
    }

    #[test]
    fn describe_and_debug_name_sources_but_never_secrets() {
        let token_file = file(b"CANARY-FILE-TOKEN\n");
        let toml = format!(
            "{MINIMAL}\n[[twilio.shared_keys]]\nid = \"k1\"\nsecret_file = {}\n",
            toml_str(&token_file.path().to_string_lossy())
        )
        .replace(
            "[twilio]\n",
            "[twilio]\nsecondary_auth_token_env = \"SECOND\"\n",
        );
        let without_app_token = load(&toml, &env(&[("SECOND", "CANARY-SECOND")]))
            .unwrap()
            .describe();
        assert!(
            without_app_token.contains(
                "# auth_token is not set: forwarded requests are signed with twilio.auth_token"
            ),
            "{without_app_token}"
        );
        let toml = toml.replace(
            "[upstream]\n",
            "[upstream]\nauth_token_env = \"APP_TOKEN\"\n",
        );
        let s = load(
            &toml,
            &env(&[("SECOND", "CANARY-SECOND"), ("APP_TOKEN", "CANARY-APP")]),
        )
        .unwrap();
        assert_eq!(
            s.upstream.auth_token.as_ref().map(|t| t.expose()),
            Some(&b"CANARY-APP"[..])
        );
        let text = s.describe();
        assert!(
            text.contains("auth_token_env = \"APP_TOKEN\"  # set, *REDACTED*"),
            "{text}"
        );
        // It loads back (the app's token has its own variable).
        let again = load(
            &text,
            &env(&[("SECOND", "CANARY-SECOND"), ("APP_TOKEN", "CANARY-APP")]),
        )
        .unwrap();
        assert_eq!(again.describe(), text);
        let missing = error(&toml, &env(&[("SECOND", "CANARY-SECOND")]));
        assert_eq!(
            missing.to_string(),
            "upstream.auth_token_env: environment variable APP_TOKEN is not set"
        );
        let debug = format!("{s:?}");
        for out in [&text, &debug] {
            for secret in [
                TOKEN,
                "CANARY-APP",
                "CANARY-SECOND",
                "CANARY-FILE-TOKEN",
                KEY_HEX,
                &KEY_HEX.to_uppercase(),
            ] {
                assert!(!out.contains(secret), "{secret} leaked");
            }
        }
        assert!(
            text.contains("auth_token_env = \"TWILIO_AUTH_TOKEN\"  # set, *REDACTED*"),
            "{text}"
        );
        assert!(
            text.contains("secondary_auth_token_env = \"SECOND\"  # set, *REDACTED*"),
            "{text}"
        );
        assert!(text.contains(&format!(
            "secret_file = {}  # read, *REDACTED*",
            toml_str(&token_file.path().to_string_lossy())
        )));
        assert!(
            text.contains("key_env = \"IVRGUARD_KEY\"  # set, *REDACTED*"),
            "{text}"
        );
    }

    #[test]
    fn an_app_token_that_is_the_encryption_key_is_refused() {
        let toml = with(&[("upstream", r#"auth_token_env = "APP_TOKEN""#)]);
        for same in [KEY_HEX.to_string(), KEY_HEX.to_uppercase()] {
            let err = error(&toml, &env(&[("APP_TOKEN", &same)]));
            assert_eq!(err.key(), "upstream.auth_token_env");
            assert!(
                err.to_string().contains("holds the encryption key"),
                "{err}"
            );
            assert!(
                !err.to_string().to_lowercase().contains(KEY_HEX),
                "never the value"
            );
        }
        assert!(load(&toml, &env(&[("APP_TOKEN", "a-token-of-its-own")])).is_ok());
    }

    #[test]
    fn named_files_lists_every_secret_file_for_the_reload_poll() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ivrguard.toml");
        let toml = with(&[("upstream", r#"auth_token_file = "/run/app-token""#)]).replace(
            "auth_token_env = \"TWILIO_AUTH_TOKEN\"",
            "auth_token_file = \"/run/twilio-token\"",
        );
        std::fs::write(&path, toml).unwrap();
        let files = Settings::named_files(&path, &env(&[]));
        for expected in ["/run/app-token", "/run/twilio-token"] {
            assert!(
                files.contains(&PathBuf::from(expected)),
                "{expected}: {files:?}"
            );
        }
        assert_eq!(files[0], path);
    }

    #[test]
    fn describe_loads_back_into_the_same_settings() {
        let toml = with(&[
            ("log", r#"scrub_patterns = ['\bacct "[0-9]{6}\b']"#),
            ("upstream", r#"url = "http://app:8000/legacy""#),
            (
                "upstream",
                r#"fallback_twiml = "<Response><Say>Sorry \"caller\"</Say></Response>""#,
            ),
            ("twilio", r#"public_url = "https://ivr.example.com""#),
        ])
        .replace("url = \"http://127.0.0.1:3000\"\n", "");
        let e = env(&[]);
        let first = load(&toml, &e).unwrap().describe();
        let second = load(&first, &e).unwrap().describe();
        assert_eq!(first, second);
        assert!(
            first.contains(r#"url = "http://app:8000/legacy""#),
            "{first}"
        );
    }

    /// A self-signed certificate for `localhost` and its PKCS#8 key, as
    /// PEM files.
    fn tls_files() -> (tempfile::NamedTempFile, tempfile::NamedTempFile) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (
            file(cert.pem().as_bytes()),
            file(key.serialize_pem().as_bytes()),
        )
    }

    fn with_tls(cert: &Path, key: &Path) -> String {
        with(&[
            (
                "server",
                &format!("tls_cert_file = {}", toml_str(&cert.to_string_lossy())),
            ),
            (
                "server",
                &format!("tls_key_file = {}", toml_str(&key.to_string_lossy())),
            ),
        ])
    }

    /// The base64 lines of a PEM file: what no error or output may show.
    fn pem_body(pem: &Path) -> Vec<String> {
        std::fs::read_to_string(pem)
            .unwrap()
            .lines()
            .filter(|line| !line.starts_with("-----") && !line.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn tls_needs_both_files_or_neither() {
        let (cert, key) = tls_files();
        assert!(load(MINIMAL, &env(&[])).unwrap().server.tls.is_none());
        let s = load(&with_tls(cert.path(), key.path()), &env(&[])).unwrap();
        let tls = s.server.tls.expect("TLS is on");
        assert_eq!(tls.cert_file, cert.path());
        assert_eq!(tls.key_file, key.path());
        // From the environment, like every key.
        let cert_path = cert.path().to_string_lossy();
        let key_path = key.path().to_string_lossy();
        let e = env(&[
            ("IVRGUARD__SERVER__TLS_CERT_FILE", &cert_path),
            ("IVRGUARD__SERVER__TLS_KEY_FILE", &key_path),
        ]);
        assert!(load(MINIMAL, &e).unwrap().server.tls.is_some());
        // "" is not set.
        let e = env(&[
            ("IVRGUARD__SERVER__TLS_CERT_FILE", ""),
            ("IVRGUARD__SERVER__TLS_KEY_FILE", ""),
        ]);
        let s = load(&with_tls(cert.path(), key.path()), &e).unwrap();
        assert!(s.server.tls.is_none());
        // One without the other names the missing one.
        for (var, missing) in [
            ("IVRGUARD__SERVER__TLS_CERT_FILE", "server.tls_key_file"),
            ("IVRGUARD__SERVER__TLS_KEY_FILE", "server.tls_cert_file"),
        ] {
            let err = error(MINIMAL, &env(&[(var, &cert_path)]));
            assert_eq!(err.key(), missing);
            assert!(err.to_string().contains("required when"), "{err}");
        }
    }

    #[test]
    fn tls_file_errors_name_the_key_and_never_the_contents() {
        let (cert, key) = tls_files();
        let (_, other_key) = tls_files();
        let missing = cert.path().with_extension("missing");
        let not_pem = file(b"CANARY: not a certificate\n");
        let broken = file(b"-----BEGIN PRIVATE KEY-----\nCANARY\n");
        let cases: [(&Path, &Path, &str, &str); 6] = [
            (&missing, key.path(), "server.tls_cert_file", "cannot read"),
            (
                not_pem.path(),
                key.path(),
                "server.tls_cert_file",
                "holds no PEM certificate",
            ),
            (
                key.path(),
                key.path(),
                "server.tls_cert_file",
                "holds no PEM certificate",
            ),
            (
                cert.path(),
                cert.path(),
                "server.tls_key_file",
                "holds no PEM private key",
            ),
            (
                cert.path(),
                broken.path(),
                "server.tls_key_file",
                "is not valid PEM",
            ),
            (
                cert.path(),
                other_key.path(),
                "server.tls_key_file",
                "does not match the certificate",
            ),
        ];
        let secrets: Vec<String> = [key.path(), other_key.path()]
            .into_iter()
            .flat_map(pem_body)
            .collect();
        for (cert_path, key_path, name, problem) in cases {
            let err = error(&with_tls(cert_path, key_path), &env(&[]));
            let text = err.to_string();
            assert_eq!(err.key(), name, "{text}");
            assert!(text.contains(problem), "{text}");
            let at_fault = if name == "server.tls_cert_file" {
                cert_path
            } else {
                key_path
            };
            assert!(
                text.contains(&*at_fault.to_string_lossy()),
                "names the file: {text}"
            );
            for line in &secrets {
                assert!(!text.contains(line.as_str()), "key material in: {text}");
            }
        }
    }

    #[test]
    fn tls_key_never_shows_and_describe_loads_back() {
        let (cert, key) = tls_files();
        let s = load(&with_tls(cert.path(), key.path()), &env(&[])).unwrap();
        let text = s.describe();
        let debug = format!("{s:?}");
        for line in pem_body(key.path()) {
            assert!(
                !text.contains(&line) && !debug.contains(&line),
                "key leaked"
            );
        }
        assert!(
            text.contains(&format!(
                "tls_key_file = {}  # read, *REDACTED*",
                toml_str(&key.path().to_string_lossy())
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "tls_cert_file = {}",
                toml_str(&cert.path().to_string_lossy())
            )),
            "{text}"
        );
        let again = load(&text, &env(&[])).unwrap().describe();
        assert_eq!(text, again);
        let plain = load(MINIMAL, &env(&[])).unwrap().describe();
        assert!(
            plain.contains("# tls_cert_file and tls_key_file are not set"),
            "{plain}"
        );
    }

    #[test]
    fn errors_are_one_line_even_for_hostile_names() {
        let err = ConfigError::new("a\nb", "c\r\nd\u{1b}[31m");
        assert_eq!(err.to_string(), r"a\nb: c\r\nd\u{1b}[31m");
    }
}
