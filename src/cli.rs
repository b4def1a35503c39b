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
    /// Config file for `run` (plain `ivrguard`), `check` and `health`
    /// (default: $IVRGUARD_CONFIG, then config/ivrguard.toml)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `--config` after the subcommand, for the three that read the config
/// (not a global option: `keygen --help` does not offer one it ignores).
#[derive(Debug, Default, clap::Args)]
pub struct ConfigFile {
    /// Config file (default: $IVRGUARD_CONFIG, then config/ivrguard.toml)
    #[arg(long = "config", value_name = "FILE")]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy until SIGTERM/SIGINT, then drain and exit 0
    Run(ConfigFile),
    /// Validate the config and the secrets it names; print the effective config (secrets redacted)
    Check(ConfigFile),
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
        #[command(flatten)]
        config: ConfigFile,
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
    /// What to do: plain `ivrguard` (with or without `--config`) runs.
    pub fn subcommand(&self) -> &Command {
        const RUN: Command = Command::Run(ConfigFile { path: None });
        self.command.as_ref().unwrap_or(&RUN)
    }

    /// The config path: `--config` (after the subcommand, else before it),
    /// then `$IVRGUARD_CONFIG` (empty counts as unset, as everywhere in the
    /// config), then the default.
    pub fn config_path(&self) -> PathBuf {
        let after = match self.subcommand() {
            Command::Run(file) | Command::Check(file) | Command::Health { config: file, .. } => {
                file.path.as_ref()
            }
            _ => None,
        };
        after
            .or(self.config.as_ref())
            .cloned()
            .or_else(|| {
                std::env::var_os("IVRGUARD_CONFIG")
                    .filter(|path| !path.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from("config/ivrguard.toml"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ivrguard").chain(args.iter().copied()))
    }

    #[test]
    fn config_is_read_before_or_after_the_subcommands_that_use_it() {
        for args in [
            &["--config", "a.toml"][..],
            &["run", "--config", "a.toml"],
            &["--config", "a.toml", "run"],
            &["check", "--config", "a.toml"],
            &["--config", "a.toml", "check"],
            &["health", "--config", "a.toml"],
            &["health", "--url", "http://x/healthz", "--config", "a.toml"],
            // After the subcommand wins.
            &["--config", "b.toml", "check", "--config", "a.toml"],
        ] {
            let cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(cli.config_path(), PathBuf::from("a.toml"), "{args:?}");
        }
        assert!(matches!(parse(&[]).unwrap().subcommand(), Command::Run(_)));
    }

    #[test]
    fn subcommands_that_read_no_config_do_not_offer_config() {
        for name in ["keygen", "encrypt", "decrypt", "sign", "demo"] {
            let mut cli = <Cli as CommandFactory>::command();
            let sub = cli.find_subcommand_mut(name).unwrap();
            let help = sub.render_long_help().to_string();
            assert!(!help.contains("--config"), "{name}: {help}");
            assert!(parse(&[name, "--config", "a.toml"]).is_err(), "{name}");
        }
        for name in ["run", "check", "health"] {
            let mut cli = <Cli as CommandFactory>::command();
            let help = cli
                .find_subcommand_mut(name)
                .unwrap()
                .render_long_help()
                .to_string();
            assert!(help.contains("--config <FILE>"), "{name}: {help}");
        }
    }
}
