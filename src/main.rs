//! Thin entry point: parse the command line, dispatch, map errors to exit
//! codes (0 success, 1 failure with one line on stderr, 2 usage).

#![deny(unsafe_code)]

use std::io::{BufRead, Write};
use std::process::ExitCode;

use clap::Parser;

use ivrguard::cipher::{FieldCipher, FieldKey};
use ivrguard::cli::{Cli, Command};
use ivrguard::config::{self, SecretSource, Settings};
use ivrguard::secret::Secret;
use ivrguard::signature::Verifier;

fn main() -> ExitCode {
    ivrguard::panic_hook::install();
    // Before any secret is read: no core dump, no reading by other processes.
    if let Err(message) = ivrguard::memory_guard::seal() {
        eprintln!("ivrguard: {message}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let result = match cli.subcommand() {
        Command::Run(_) => load(&cli).and_then(|s| ivrguard::run::run(&cli.config_path(), s)),
        Command::Check(_) => load(&cli).and_then(|s| {
            warn(ivrguard::check::warnings(&s).into_iter().chain(ivrguard::check::upstream_warning(&s)));
            out(&s.describe())
        }),
        Command::Keygen => out(&format!("{}\n", FieldKey::generate().to_hex().as_str())),
        Command::Encrypt { key_env } => {
            cipher_from_env(key_env).and_then(|c| lines(|l| Ok(c.encrypt_hex(l.as_bytes()))))
        }
        Command::Decrypt { key_env } => ciphers_from_env(key_env).and_then(|ciphers| {
            lines(|l| {
                let plain = decrypt_with_any(&ciphers, l.as_bytes())?;
                let text = String::from_utf8(plain.to_vec())
                    .map_err(|_| "decrypt: plaintext is not UTF-8".to_string())?;
                // One line out per line in: a value with a line break (the
                // proxy encrypts decoded values, so `%0A` is one) would
                // shift every later line, and other control characters
                // reach the terminal.
                match text.chars().any(|c| c.is_control() && c != '\t') {
                    true => Err("decrypt: the plaintext holds a line break or another control character, which one output line cannot carry".to_string()),
                    false => Ok(text),
                }
            })
        }),
        Command::Sign {
            token_env,
            url,
            params,
        } => sign(token_env, url, params),
        Command::Demo => ivrguard::demo::run(),
        Command::Health { url, .. } => ivrguard::health::run(&cli.config_path(), url.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ivrguard: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `check`'s warnings, one line each on stderr (a closed stderr is no
/// reason to fail the check).
fn warn(warnings: impl Iterator<Item = String>) {
    let mut stderr = std::io::stderr().lock();
    for warning in warnings {
        let _ = writeln!(stderr, "ivrguard: warning: {warning}");
    }
}

fn load(cli: &Cli) -> Result<Settings, String> {
    Settings::load(&cli.config_path(), &config::process_env()).map_err(|e| e.to_string())
}

/// Secrets named on the command line follow the config's rules (one
/// trailing newline removed; empty or padded values refused; errors name the
/// variable, never the value).
fn env_secret(var: &str, flag: &str) -> Result<Secret, String> {
    config::read_secret(
        &SecretSource::Env(var.to_owned()),
        flag,
        &config::process_env(),
    )
    .map_err(|e| e.to_string())
}

fn cipher_from_env(var: &str) -> Result<FieldCipher, String> {
    let key = config::read_key(
        &SecretSource::Env(var.to_owned()),
        "--key-env",
        &config::process_env(),
    )
    .map_err(|e| e.to_string())?;
    Ok(FieldCipher::new(&key))
}

/// One cipher per `--key-env`, in the order given.
fn ciphers_from_env(vars: &[String]) -> Result<Vec<FieldCipher>, String> {
    vars.iter().map(|var| cipher_from_env(var)).collect()
}

/// The plaintext under the first key whose tag matches; the first key's
/// error (a malformed line fails the same way under every key) if none does.
fn decrypt_with_any(
    ciphers: &[FieldCipher],
    line: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    let mut first_error = None;
    for cipher in ciphers {
        match cipher.decrypt_hex(line) {
            Ok(plain) => return Ok(plain),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(match first_error {
        Some(e) => format!("decrypt: {e}"),
        None => "decrypt: no key".to_string(),
    })
}

/// Applies `f` to each stdin line, one output line each.
fn lines(f: impl Fn(&str) -> Result<String, String>) -> Result<(), String> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for (n, line) in stdin.lock().lines().enumerate() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        let result = f(line.trim_end_matches('\r')).map_err(|e| format!("line {}: {e}", n + 1))?;
        writeln!(out, "{result}").map_err(|e| format!("writing stdout: {e}"))?;
    }
    Ok(())
}

fn sign(token_env: &str, url: &str, params: &[(String, String)]) -> Result<(), String> {
    let token = env_secret(token_env, "--token-env")?;
    let pairs: Vec<(&str, &str)> = params
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    out(&format!(
        "{}\n",
        Verifier::new(&token, None, &[]).sign(url, &pairs)
    ))
}

/// Writes to stdout; a closed or full stdout (`ivrguard keygen | true`) is
/// an error line and exit 1, not a panic.
fn out(text: &str) -> Result<(), String> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("writing stdout: {e}"))
}
