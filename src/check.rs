//! `ivrguard check`'s warnings: a configuration that loads, and so is
//! usable, but that will most likely not work on the day (found in review:
//! each of these passed `check` and then failed every call). One line each,
//! on stderr; the exit code stays 0. Like every message about the config,
//! a warning names the key and never quotes a secret.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::config::{SecretSource, Settings, TwilioSettings};
use crate::secret::Secret;

/// How long `check` waits for the app to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The host names of the shipped examples and the README.
const PLACEHOLDER_HOSTS: [&str; 2] = ["example.com", "example.org"];

/// Encryption keys anyone can read: the one the seed article (Twilio's
/// "Protect Twilio Voice Input with Encryption and Redaction") publishes.
const PUBLISHED_KEYS: [&str; 1] =
    ["a154eb4c759711bc2538a7cc021e9e9f17dd8aa63151c62ca28a82a4a404203d"];

/// Every warning for `settings`, without touching the network.
pub fn warnings(settings: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    let twilio = &settings.twilio;
    match &twilio.public_url {
        Some(url) => {
            let host = url
                .host_port
                .rsplit_once(':')
                .map_or(url.host_port.as_str(), |(h, _)| h);
            if PLACEHOLDER_HOSTS
                .iter()
                .any(|p| host == *p || host.ends_with(&format!(".{p}")))
            {
                out.push(
                    "twilio.public_url: still the example's host; set the scheme://host[:port] \
                     of the webhook URL configured at Twilio"
                        .to_string(),
                );
            }
        }
        None if !settings.server.trust_forwarded_headers && settings.server.tls.is_none() => out
            .push(
                "twilio.public_url is not set: the signed URL is rebuilt as http:// + the Host \
                 header, so Twilio must call ivrguard over plain http. Behind a load balancer \
                 or tunnel that ends TLS, set public_url (or server.trust_forwarded_headers)"
                    .to_string(),
            ),
        None => {}
    }
    if !looks_like_auth_token(twilio.auth_token.expose()) {
        out.push(
            "twilio.auth_token: not 32 hexadecimal characters, as Twilio's auth tokens are \
             (an Account SID or an API key secret signs no webhook)"
                .to_string(),
        );
    }
    if let Some(app) = &settings.upstream.auth_token {
        if twilio_secrets(twilio).any(|secret| bool::from(secret.expose().ct_eq(app.expose()))) {
            out.push(
                "upstream.auth_token: the same as a Twilio signing secret, so the app holds \
                 it after all; give the app a token of its own (ivrguard keygen)"
                    .to_string(),
            );
        }
    }
    if let Some(why) = weak_key(settings) {
        out.push(format!(
            "encryption.key: {why}: whoever knows it decrypts every value the app receives; \
             make one with `ivrguard keygen`"
        ));
    }
    out.extend(open_secret_files(settings).into_iter().map(|key| {
        format!(
            "{key}: the file is readable by every user of the machine; make it readable by \
             ivrguard's user alone (chmod 0400, or a Secret volume's defaultMode 0400/0440)"
        )
    }));
    if !settings.upstream.fallback_twiml.contains("<Response") {
        out.push(
            "upstream.fallback_twiml: not TwiML (no <Response>): when the app fails, Twilio \
             would refuse it and play its own error"
                .to_string(),
        );
    }
    out
}

/// Why the encryption key is one an attacker may know, if it is.
fn weak_key(settings: &Settings) -> Option<&'static str> {
    let hex = settings.encryption.key.to_hex();
    let hex = hex.as_bytes();
    if PUBLISHED_KEYS
        .iter()
        .any(|key| key.as_bytes().eq_ignore_ascii_case(hex))
    {
        return Some("the seed article's published test key");
    }
    if hex.chunks(2).all(|byte| byte == &hex[..2]) {
        return Some("one byte repeated 32 times");
    }
    // (The app's token is refused at load if it is the key.)
    twilio_secrets(&settings.twilio)
        .any(|secret| secret.expose().eq_ignore_ascii_case(hex))
        .then_some("the same text as a signing token")
}

/// The secrets Twilio's webhooks are verified with.
fn twilio_secrets(twilio: &TwilioSettings) -> impl Iterator<Item = &Secret> {
    [
        Some(&twilio.auth_token),
        twilio.secondary_auth_token.as_ref(),
    ]
    .into_iter()
    .flatten()
    .chain(twilio.shared_keys.iter().map(|(_, secret)| secret))
}

/// The config keys of secret files that every user may read (mode `o+r`).
fn open_secret_files(settings: &Settings) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let twilio = &settings.twilio;
    let named = [
        ("twilio.auth_token", Some(&twilio.auth_token_source)),
        (
            "twilio.secondary_auth_token",
            twilio.secondary_auth_token_source.as_ref(),
        ),
        (
            "upstream.auth_token",
            settings.upstream.auth_token_source.as_ref(),
        ),
        ("encryption.key", Some(&settings.encryption.key_source)),
    ];
    let shared = twilio
        .shared_key_sources
        .iter()
        .enumerate()
        .map(|(i, (_, source))| (format!("twilio.shared_keys[{i}].secret"), Some(source)));
    let mut files: Vec<(String, PathBuf)> = named
        .into_iter()
        .map(|(base, source)| (base.to_string(), source))
        .chain(shared)
        .filter_map(|(base, source)| match source? {
            SecretSource::File(path) => Some((format!("{base}_file"), path.clone())),
            SecretSource::Env(_) => None,
        })
        .collect();
    if let Some(tls) = &settings.server.tls {
        files.push(("server.tls_key_file".to_string(), tls.key_file.clone()));
    }
    files
        .into_iter()
        .filter(|(_, path)| {
            std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
        })
        .map(|(key, _)| key)
        .collect()
}

/// Whether the app accepts a TCP connection now; a warning if not.
pub fn upstream_warning(settings: &Settings) -> Option<String> {
    let authority = settings.upstream.authority.as_str();
    let addrs = match authority.to_socket_addrs() {
        Ok(addrs) => addrs.collect::<Vec<_>>(),
        Err(_) => {
            return Some("upstream.url: its host name does not resolve here".to_string());
        }
    };
    let reached = addrs
        .iter()
        .any(|addr| TcpStream::connect_timeout(addr, CONNECT_TIMEOUT).is_ok());
    (!reached).then(|| {
        "upstream.url: nothing accepts a connection there now (is the app running?); \
         until it does, every call gets the fallback"
            .to_string()
    })
}

/// 32 hexadecimal characters: the shape of a Twilio auth token.
fn looks_like_auth_token(token: &[u8]) -> bool {
    token.len() == 32 && token.iter().all(u8::is_ascii_hexdigit)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashMap;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";
    /// A key no one has published.
    const KEY: &str = "5d0c3b2a91e8f7c6b5a4d3e2f1c0b9a8f7e6d5c4b3a29180706f5e4d3c2b1a09";

    fn settings(twilio: &str, upstream: &str, token: &str) -> Settings {
        settings_with(twilio, upstream, token, &[])
    }

    fn settings_with(twilio: &str, upstream: &str, token: &str, vars: &[(&str, &str)]) -> Settings {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ivrguard.toml");
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\n{upstream}\n\
             [twilio]\nauth_token_env = \"T\"\n{twilio}\n[encryption]\nkey_env = \"K\"\n"
        );
        std::fs::write(&path, toml).unwrap();
        let mut env = HashMap::from([
            ("T".to_string(), token.to_string()),
            ("K".to_string(), KEY.to_string()),
        ]);
        env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Settings::load(&path, &env).unwrap()
    }

    #[test]
    fn a_working_config_has_no_warning() {
        let s = settings(
            "public_url = \"https://ivr.bank.test\"",
            "url = \"http://127.0.0.1:3000\"",
            TOKEN,
        );
        assert_eq!(warnings(&s), Vec::<String>::new());
    }

    #[test]
    fn placeholder_host_plain_http_token_shape_and_fallback_are_warned_of() {
        let up = "url = \"http://127.0.0.1:3000\"";
        let s = settings("public_url = \"https://ivr.example.com:8443\"", up, TOKEN);
        assert!(warnings(&s)[0].starts_with("twilio.public_url: still the example's"));
        let s = settings("", up, TOKEN);
        assert!(warnings(&s)[0].starts_with("twilio.public_url is not set"));
        let sid = format!("AC{TOKEN}");
        let s = settings("public_url = \"https://ivr.bank.test\"", up, &sid);
        let w = warnings(&s);
        assert!(w[0].starts_with("twilio.auth_token: not 32"), "{w:?}");
        assert!(!w[0].contains(TOKEN), "never the value");
        let s = settings(
            "public_url = \"https://ivr.bank.test\"",
            &format!("{up}\nfallback_twiml = \"sorry\""),
            TOKEN,
        );
        assert!(warnings(&s)[0].starts_with("upstream.fallback_twiml: not TwiML"));
    }

    #[test]
    fn an_app_token_equal_to_the_twilio_token_is_warned_of() {
        let public = "public_url = \"https://ivr.bank.test\"";
        let up = "url = \"http://127.0.0.1:3000\"\nauth_token_env = \"A\"";
        let own = settings_with(public, up, TOKEN, &[("A", "a-token-of-the-apps-own")]);
        assert_eq!(warnings(&own), Vec::<String>::new());
        let same = settings_with(public, up, TOKEN, &[("A", TOKEN)]);
        let w = warnings(&same);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("upstream.auth_token: the same as"),
            "{w:?}"
        );
        assert!(!w[0].contains(TOKEN), "never the value");
    }

    #[test]
    fn a_published_or_degenerate_key_or_one_equal_to_a_token_is_warned_of() {
        let public = "public_url = \"https://ivr.bank.test\"";
        let up = "url = \"http://127.0.0.1:3000\"\nauth_token_env = \"A\"";
        let seed = PUBLISHED_KEYS[0].to_uppercase();
        let zeros = "00".repeat(32);
        for (key, token, why) in [
            (
                seed.as_str(),
                TOKEN,
                "the seed article's published test key",
            ),
            (zeros.as_str(), TOKEN, "one byte repeated 32 times"),
            (KEY, KEY, "the same text as a signing token"),
        ] {
            let s = settings_with(public, up, token, &[("K", key), ("A", "the-app-token")]);
            let w = warnings(&s);
            let expected = format!("encryption.key: {why}: ");
            assert!(w.iter().any(|w| w.starts_with(&expected)), "{why}: {w:?}");
            assert!(w
                .iter()
                .all(|w| !w.to_lowercase().contains(&key.to_lowercase())));
        }
    }

    #[test]
    fn secret_files_every_user_can_read_are_warned_of() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, KEY).unwrap();
        let twilio = format!(
            "public_url = \"https://ivr.bank.test\"\n[encryption]\nkey_file = {:?}",
            key_file.display().to_string()
        );
        let load = |mode: u32| {
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(mode)).unwrap();
            let path = dir.path().join("ivrguard.toml");
            let toml = format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n\
                 [twilio]\nauth_token_env = \"T\"\n{twilio}\n"
            );
            std::fs::write(&path, toml).unwrap();
            let env = HashMap::from([("T".to_string(), TOKEN.to_string())]);
            warnings(&Settings::load(&path, &env).unwrap())
        };
        let w = load(0o644);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("encryption.key_file: the file is readable by every user"),
            "{w:?}"
        );
        assert_eq!(load(0o440), Vec::<String>::new());
        assert_eq!(load(0o400), Vec::<String>::new());
    }

    #[test]
    fn an_app_that_accepts_connections_gets_no_warning() {
        let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("url = \"http://{}\"", app.local_addr().unwrap());
        let s = settings("public_url = \"https://ivr.bank.test\"", &url, TOKEN);
        assert_eq!(upstream_warning(&s), None);
        drop(app);
        let warning = upstream_warning(&s).expect("nothing listens any more");
        assert!(
            warning.starts_with("upstream.url: nothing accepts"),
            "{warning}"
        );
    }
}
