//! The shipped `config/ivrguard.toml` loads, documents every key, shows the
//! real defaults, and its commented-out optional blocks are valid.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use ivrguard::config::{LogFormat, OnUpstreamError, SecretSource, Settings};

const KEY_HEX: &str = "a154eb4c759711bc2538a7cc021e9e9f17dd8aa63151c62ca28a82a4a404203d";
const TOKEN: &str = "CANARY-primary-token";

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ivrguard.toml")
}

fn example_text() -> String {
    std::fs::read_to_string(example_path()).unwrap()
}

fn env(extra: &[(&str, &str)]) -> HashMap<String, String> {
    [("TWILIO_AUTH_TOKEN", TOKEN), ("IVRGUARD_KEY", KEY_HEX)]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load_text(toml: &str, env: &HashMap<String, String>) -> Settings {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(toml.as_bytes()).unwrap();
    Settings::load(f.path(), env).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn shipped_example_loads_with_its_variables_set() {
    let s = Settings::load(&example_path(), &env(&[])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.server.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(
        s.server.admin_listen,
        Some("127.0.0.1:9901".parse().unwrap())
    );
    assert_eq!(s.upstream.scheme_authority, "http://127.0.0.1:3000");
    assert_eq!(s.upstream.on_error, OnUpstreamError::Twiml);
    assert_eq!(s.twilio.auth_token.expose(), TOKEN.as_bytes());
    assert_eq!(
        s.twilio.public_url.as_ref().unwrap().origin,
        "https://ivr.example.com"
    );
    assert_eq!(s.encryption.key.to_hex().as_str(), KEY_HEX);
    assert_eq!(s.log.format, LogFormat::Json);
}

#[test]
fn shipped_example_refuses_to_start_without_its_variables() {
    let mut e = env(&[]);
    e.remove("IVRGUARD_KEY");
    let err = Settings::load(&example_path(), &e).unwrap_err();
    assert_eq!(
        err.to_string(),
        "encryption.key_env: environment variable IVRGUARD_KEY is not set"
    );
}

#[test]
fn shipped_example_optional_blocks_are_valid_when_uncommented() {
    let text = example_text()
        .replace(
            "#   secondary_auth_token_env = ",
            "secondary_auth_token_env = ",
        )
        .replace("#   [[twilio.shared_keys]]", "[[twilio.shared_keys]]")
        .replace("#   id = ", "id = ")
        .replace("#   secret_env = ", "secret_env = ");
    // [[twilio.shared_keys]] is the last thing in [twilio], so uncommented
    // it is still valid TOML.
    let e = env(&[
        ("TWILIO_AUTH_TOKEN_SECONDARY", "CANARY-second"),
        ("TWILIO_WEBHOOK_KEY_1", "CANARY-shared"),
    ]);
    let s = load_text(&text, &e);
    assert_eq!(
        s.twilio.secondary_auth_token_source,
        Some(SecretSource::Env("TWILIO_AUTH_TOKEN_SECONDARY".into()))
    );
    assert_eq!(s.twilio.shared_keys.len(), 1);
    assert_eq!(s.twilio.shared_keys[0].0, "webhooks_sharedkey_1");
    assert_eq!(s.twilio.shared_keys[0].1.expose(), b"CANARY-shared");
}

#[test]
fn shipped_example_tls_lines_are_valid_when_uncommented() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["ivr.example.com".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_path = dir.path().join("tls.crt");
    let key_path = dir.path().join("tls.key");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let text = example_text()
        .replace(
            "#   tls_cert_file = \"/run/secrets/tls/tls.crt\"",
            &format!("tls_cert_file = {:?}", cert_path.display().to_string()),
        )
        .replace(
            "#   tls_key_file = \"/run/secrets/tls/tls.key\"",
            &format!("tls_key_file = {:?}", key_path.display().to_string()),
        );
    let tls = load_text(&text, &env(&[])).server.tls.expect("TLS is on");
    assert_eq!((tls.cert_file, tls.key_file), (cert_path, key_path));
}

#[test]
fn shipped_example_shows_the_real_defaults() {
    // Only the required keys: everything else falls back to the defaults.
    let minimal = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n\
                   [twilio]\nauth_token_env = \"TWILIO_AUTH_TOKEN\"\n\
                   [encryption]\nkey_env = \"IVRGUARD_KEY\"\n";
    let defaults = load_text(minimal, &env(&[])).describe();
    let example = Settings::load(&example_path(), &env(&[]))
        .unwrap()
        .describe();
    let lines = |text: &str| -> BTreeSet<String> { text.lines().map(str::to_string).collect() };
    let differing: BTreeSet<String> = lines(&defaults)
        .symmetric_difference(&lines(&example))
        .cloned()
        .collect();
    // The example switches on the two optional keys; nothing else differs.
    for line in &differing {
        assert!(
            line.starts_with("admin_listen")
                || line.starts_with("# admin_listen")
                || line.starts_with("public_url")
                || line.starts_with("# public_url"),
            "example and defaults differ on: {line}"
        );
    }
    assert_eq!(differing.len(), 4, "{differing:?}");
}

#[test]
fn shipped_example_mentions_every_key() {
    let text = example_text();
    let keys = [
        "listen",
        "admin_listen",
        "trust_forwarded_headers",
        "max_body_bytes",
        "header_read_timeout_ms",
        "request_timeout_ms",
        "drain_timeout_ms",
        "max_connections",
        "max_connections_per_client",
        "workers",
        "reload_poll_interval_ms",
        "http2",
        "tls_cert_file",
        "tls_key_file",
        "url",
        "connect_timeout_ms",
        "timeout_ms",
        "pool_idle_timeout_ms",
        "pool_max_idle_per_host",
        "rewrite_host",
        "on_error",
        "fallback_twiml",
        "auth_token_env",
        "auth_token_file",
        "secondary_auth_token_env",
        "secondary_auth_token_file",
        "public_url",
        "[[twilio.shared_keys]]",
        "id",
        "secret_env",
        "secret_file",
        "key_env",
        "key_file",
        "fields",
        "format",
        "level",
        "scrub_patterns",
        "scrub_card_numbers",
    ];
    for key in keys {
        let written = text.lines().any(|line| {
            let line = line.trim_start_matches(['#', ' ']);
            line == key || line.starts_with(&format!("{key} = "))
        });
        assert!(written, "config/ivrguard.toml does not show {key}");
    }
}

/// The config the README's quick start shows ("Put ivrguard in front of your
/// app", step 2) loads with the three variables its step 3 exports, and
/// signs what it forwards with the app's own token.
#[test]
fn readme_quick_start_config_loads_with_its_variables() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let step = readme
        .split_once("2. Write a config")
        .expect("README's quick start, step 2")
        .1;
    let block = step
        .split_once("```toml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a toml block in step 2")
        .0;
    let toml: String = block
        .lines()
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    let app_token = "4c5f0a2e9b7d41c3a8e6f1d2b3c4a5e6f7081920a1b2c3d4e5f60718293a4b5c";
    let s = load_text(&toml, &env(&[("APP_TOKEN", app_token)]));
    assert_eq!(s.upstream.scheme_authority, "http://127.0.0.1:3000");
    assert_eq!(
        s.upstream.auth_token.as_ref().map(|t| t.expose().to_vec()),
        Some(app_token.as_bytes().to_vec())
    );
    let exports = step
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("step 3's commands")
        .0;
    for variable in ["TWILIO_AUTH_TOKEN", "IVRGUARD_KEY", "APP_TOKEN"] {
        assert!(
            exports.contains(&format!("{variable}=")),
            "step 3 does not export {variable}"
        );
    }
}
