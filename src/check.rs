//! `ivrguard check`'s warnings: a configuration that loads, and so is
//! usable, but that will most likely not work on the day (found in review:
//! each of these passed `check` and then failed every call). One line each,
//! on stderr; the exit code stays 0. Like every message about the config,
//! a warning names the key and never quotes a secret.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::config::Settings;

/// How long `check` waits for the app to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The host names of the shipped examples and the README.
const PLACEHOLDER_HOSTS: [&str; 2] = ["example.com", "example.org"];

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
        let signing = [
            Some(&twilio.auth_token),
            twilio.secondary_auth_token.as_ref(),
        ]
        .into_iter()
        .flatten()
        .chain(twilio.shared_keys.iter().map(|(_, secret)| secret));
        if signing
            .into_iter()
            .any(|secret| bool::from(secret.expose().ct_eq(app.expose())))
        {
            out.push(
                "upstream.auth_token: the same as a Twilio signing secret, so the app holds \
                 it after all; give the app a token of its own (ivrguard keygen)"
                    .to_string(),
            );
        }
    }
    if !settings.upstream.fallback_twiml.contains("<Response") {
        out.push(
            "upstream.fallback_twiml: not TwiML (no <Response>): when the app fails, Twilio \
             would refuse it and play its own error"
                .to_string(),
        );
    }
    out
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
    const KEY: &str = "a154eb4c759711bc2538a7cc021e9e9f17dd8aa63151c62ca28a82a4a404203d";

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
