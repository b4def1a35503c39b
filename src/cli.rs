//! The command line (SPEC §1, a contract): `run`, `check`, `keygen`,
//! `encrypt`, `decrypt`, `sign`, `demo`, `health`. Plain `ivrguard --config FILE` runs.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ivrguard",
    version,
    about = "Verifies Twilio webhook signatures and encrypts caller input before your IVR app sees it"
)]
pub struct Cli {
    /// Config file (default: $IVRGUARD_CONFIG, then config/ivrguard.toml)
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy until SIGTERM/SIGINT, then drain and exit 0
    Run,
    /// Validate the config and the secrets it names; print the effective config (secrets redacted)
    Check,
    /// Print a fresh random 32-byte key as 64 lowercase hex characters
    Keygen,
    /// Encrypt each stdin line with the key in $VAR; one hex ciphertext per line
    Encrypt {
        /// Name of the environment variable holding the 64-hex-character key
        #[arg(long, value_name = "VAR")]
        key_env: String,
    },
    /// Decrypt each stdin line (hex ciphertext) with the key in $VAR
    Decrypt {
        /// Name of the environment variable holding the 64-hex-character key.
        /// Repeat it during a key rotation: each line is decrypted with the
        /// first key whose tag matches (a wrong key never yields garbage)
        #[arg(long, value_name = "VAR", required = true)]
        key_env: Vec<String>,
    },
    /// Print the X-Twilio-Signature Twilio would send for a request
    Sign {
        /// Name of the environment variable holding the auth token
        #[arg(long, value_name = "VAR")]
        token_env: String,
        /// The full URL Twilio calls, query string included
        #[arg(long, value_parser = absolute_url)]
        url: String,
        /// A POST parameter, NAME=VALUE (not URL-encoded); repeatable
        #[arg(long = "param", value_name = "NAME=VALUE", value_parser = name_value)]
        params: Vec<(String, String)>,
    },
    /// Zero-setup tour: sample IVR backend + ivrguard + a simulated Twilio caller
    Demo,
    /// Exit 0 if the admin listener's /healthz answers 200 within 2 s (container health checks)
    Health {
        /// Probe this URL instead of http://<server.admin_listen>/healthz from the config
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
}

/// `--param NAME=VALUE`; without `=` it is a usage error (exit 2), as
/// clap's own.
fn name_value(arg: &str) -> Result<(String, String), String> {
    arg.split_once('=')
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| "expected NAME=VALUE".to_owned())
}

/// `--url`: the whole `http://` or `https://` URL Twilio calls. A path
/// alone or a URL without its scheme was signed, and could never match
/// (found in review); a usage error (exit 2).
fn absolute_url(arg: &str) -> Result<String, String> {
    let rest = ["http://", "https://"]
        .iter()
        .find_map(|scheme| {
            arg.get(..scheme.len())
                .filter(|s| s.eq_ignore_ascii_case(scheme))
                .map(|_| &arg[scheme.len()..])
        })
        .ok_or("expected the whole URL Twilio calls, from http:// or https://")?;
    match rest.split(['/', '?', '#']).next() {
        Some(host) if !host.is_empty() => Ok(arg.to_owned()),
        _ => Err("expected a host after the scheme".to_owned()),
    }
}

impl Cli {
    /// The config path: `--config`, then `$IVRGUARD_CONFIG` (empty counts as
    /// unset, as everywhere in the config), then the default.
    pub fn config_path(&self) -> PathBuf {
        self.config
            .clone()
            .or_else(|| {
                std::env::var_os("IVRGUARD_CONFIG")
                    .filter(|path| !path.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from("config/ivrguard.toml"))
    }
}
