//! The properties the fuzz targets check, one public function per target.
//!
//! Each function takes arbitrary bytes and panics (an `assert!`) when a
//! property is violated; "it did not panic" is the least it checks. The same
//! functions run in two places:
//!
//! - `fuzz/fuzz_targets/<name>.rs`, under `cargo +nightly fuzz run <name>`;
//! - `tests/fuzz_corpus.rs` in the main crate (stable `cargo test`), which
//!   replays every file under `fuzz/corpus/<name>/`.
//!
//! So this file uses only what both builds have: `ivrguard` and its own
//! dependencies (`serde_json`, `sha2`, `base64`, `bytes`, `form_urlencoded`,
//! `hmac`, `http`, `http-body-util`, `sha1`) plus `tempfile`.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use ivrguard::access_log::AccessRecord;
use ivrguard::cipher::{FieldCipher, FieldKey};
use ivrguard::config::Settings;
use ivrguard::form::{self, FieldSet};
use ivrguard::json_body;
use ivrguard::metrics::Metrics;
use ivrguard::pipeline::Proxy;
use ivrguard::rejection::Rejection;
use ivrguard::secret::REDACTED;
use ivrguard::signature::{self, Algorithm, SignatureError, SignatureSettings};
use sha2::{Digest, Sha256};

/// A fixed key: the properties hold for any key, and a fixed one keeps the
/// fuzzer deterministic apart from the random nonces.
const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn cipher() -> &'static FieldCipher {
    static CIPHER: OnceLock<FieldCipher> = OnceLock::new();
    CIPHER.get_or_init(|| {
        FieldCipher::new(&FieldKey::from_hex(KEY_HEX).expect("KEY_HEX is 64 hex digits"))
    })
}

/// Sensitive names: two real ones, and short or unusual ones a fuzzer finds
/// quickly (`a`), that only match after decoding (`x y` from `x+y` or
/// `x%20y`), or that are not ASCII.
fn fields() -> &'static FieldSet {
    static FIELDS: OnceLock<FieldSet> = OnceLock::new();
    FIELDS.get_or_init(|| FieldSet::new(["Digits", "SpeechResult", "a", "x y", "\u{e9}"]))
}

// ---------------------------------------------------------------------------
// form_rewrite
// ---------------------------------------------------------------------------

/// `form::parse` → `form::rewrite` (real cipher) → `form::redacted`:
///
/// - `redacted` equals a naive reference on every input, and never contains
///   a sensitive value that does not also occur in a non-sensitive part;
/// - for a form that parses: the rewritten bytes parse again, into the same
///   number of pairs with the same names; every non-sensitive `&`-segment is
///   byte-identical and in place; every sensitive one is its raw name, `=`
///   and lowercase hex that decrypts to the decoded original; the pairs
///   handed back hold exactly what the application will parse; `count()` and
///   `names()` are right; `None` only when nothing is sensitive;
/// - `signature::string_to_sign` over the decoded pairs equals a reference.
pub fn form_rewrite(data: &[u8]) {
    let fields = fields();
    check_redacted(data, fields);

    let Ok(mut pairs) = form::parse(data) else {
        return;
    };
    let original: Vec<(String, String)> = pairs
        .iter()
        .map(|p| (p.name.to_string(), p.value.to_string()))
        .collect();
    check_string_to_sign(&original);
    let sensitive: Vec<bool> = original.iter().map(|(n, _)| fields.contains(n)).collect();

    let cipher = cipher();
    let rewritten = form::rewrite(data, &mut pairs, fields, |plain, out| {
        cipher.encrypt_hex_into(plain, out)
    });
    let Some(rw) = rewritten else {
        assert!(
            !sensitive.contains(&true),
            "rewrite returned None for a form with a sensitive pair"
        );
        return;
    };

    assert_eq!(
        rw.count(),
        sensitive.iter().filter(|s| **s).count(),
        "count"
    );
    let expected_names: Vec<&str> = original
        .iter()
        .zip(&sensitive)
        .filter(|(_, s)| **s)
        .map(|((name, _), _)| name.as_str())
        .collect();
    let names: Vec<&str> = rw.names(&pairs).collect();
    assert_eq!(names, expected_names, "names");

    let again = form::parse(&rw.bytes).expect("the rewritten form parses");
    assert_eq!(again.len(), original.len(), "pair count after rewrite");
    for (((name, value), sent), held) in original.iter().zip(&again).zip(&pairs) {
        assert_eq!(sent.name, *name, "names are kept");
        assert_eq!(
            (held.name.as_ref(), held.value.as_ref()),
            (sent.name.as_ref(), sent.value.as_ref()),
            "the pairs handed back hold what is forwarded"
        );
        if fields.contains(name) {
            assert!(is_lower_hex(sent.value.as_bytes()), "ciphertext is hex");
            let plain = cipher
                .decrypt_hex(sent.value.as_bytes())
                .expect("the ciphertext decrypts");
            assert_eq!(
                plain.as_slice(),
                value.as_bytes(),
                "decrypts to the original"
            );
        } else {
            assert_eq!(sent.value, *value, "non-sensitive values are kept");
        }
    }

    // Byte for byte, segment by segment (hex has no '&', so the segments of
    // input and output correspond one to one, empty ones included).
    let segments_in: Vec<&[u8]> = data.split(|b| *b == b'&').collect();
    let segments_out: Vec<&[u8]> = rw.bytes.split(|b| *b == b'&').collect();
    assert_eq!(segments_in.len(), segments_out.len(), "segment count");
    let mut names = original.iter().map(|(n, _)| n);
    for (raw_in, raw_out) in segments_in.iter().zip(&segments_out) {
        if raw_in.is_empty() {
            assert!(raw_out.is_empty(), "empty segments stay empty");
            continue;
        }
        let name = names
            .next()
            .expect("one decoded pair per non-empty segment");
        if fields.contains(name) {
            let raw_name = raw_in.split(|b| *b == b'=').next().unwrap_or_default();
            let value = raw_out
                .strip_prefix(raw_name)
                .and_then(|rest| rest.strip_prefix(b"="))
                .expect("a sensitive segment keeps its raw name, then '='");
            assert!(is_lower_hex(value), "a sensitive segment ends in hex");
        } else {
            assert_eq!(raw_in, raw_out, "non-sensitive segments are byte-identical");
        }
    }
}

fn is_lower_hex(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `+` → space, `%XX` → byte, then UTF-8; `None` for a bad `%` or bad UTF-8.
fn reference_decode(raw: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = raw.get(i + 1..i + 3)?;
                let text = std::str::from_utf8(hex).ok()?;
                if !text.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(text, 16).ok()?);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// What `form::redacted` promises, written the naive way: split on `&`, then
/// on the first `=`; a value is shown (lossily) only when its name is
/// harmless.
fn reference_redacted(input: &[u8], fields: &FieldSet) -> String {
    let mut out = String::new();
    for (k, segment) in input.split(|b| *b == b'&').enumerate() {
        if k > 0 {
            out.push('&');
        }
        let (name, value) = split_eq(segment);
        out.push_str(&String::from_utf8_lossy(name));
        if let Some(value) = value {
            out.push('=');
            if harmless_name(name, fields) {
                out.push_str(&String::from_utf8_lossy(value));
            } else {
                out.push_str(REDACTED);
            }
        }
    }
    out
}

fn split_eq(segment: &[u8]) -> (&[u8], Option<&[u8]>) {
    match segment.iter().position(|b| *b == b'=') {
        Some(eq) => (&segment[..eq], Some(&segment[eq + 1..])),
        None => (segment, None),
    }
}

/// A name is harmless when its raw bytes are UTF-8 (as `form::parse`
/// requires of the whole input) and decode to a name that is not sensitive.
fn harmless_name(raw_name: &[u8], fields: &FieldSet) -> bool {
    std::str::from_utf8(raw_name).is_ok()
        && reference_decode(raw_name).is_some_and(|name| !fields.contains(&name))
}

/// `redacted` equals the reference, and leaks no sensitive value.
///
/// The leak check does not lean on the reference. The output is made of the
/// input's names, its harmless values, `&`, `=` and the marker, so a value
/// can show up legitimately only inside one of those pieces, or across
/// pieces if it contains `&`, `=` or `*`, or inside the marker itself. Such
/// values are skipped (as are values under 4 characters); any other
/// sensitive value — raw or decoded — must not appear anywhere.
fn check_redacted(input: &[u8], fields: &FieldSet) {
    let out = form::redacted(input, fields);
    assert_eq!(out, reference_redacted(input, fields), "redacted");

    let mut harmless_pieces: Vec<String> = Vec::new();
    let mut secrets: Vec<String> = Vec::new();
    for segment in input.split(|b| *b == b'&') {
        let (name, value) = split_eq(segment);
        harmless_pieces.push(String::from_utf8_lossy(name).into_owned());
        let Some(value) = value else { continue };
        if harmless_name(name, fields) {
            harmless_pieces.push(String::from_utf8_lossy(value).into_owned());
        } else {
            secrets.push(String::from_utf8_lossy(value).into_owned());
            secrets.extend(reference_decode(value));
        }
    }
    for secret in &secrets {
        let checkable = secret.chars().count() >= 4
            && !secret.contains(['&', '=', '*'])
            && !REDACTED.contains(secret.as_str())
            && !harmless_pieces.iter().any(|p| p.contains(secret.as_str()));
        if checkable {
            assert!(
                !out.contains(secret.as_str()),
                "redacted() shows a sensitive value"
            );
        }
    }
}

/// The string-to-sign is the URL, then each distinct (name, value) pair in
/// byte order, name then value.
fn check_string_to_sign(pairs: &[(String, String)]) {
    const URL: &str = "https://example.com/ivr?x=1";
    let mut got = Vec::new();
    signature::string_to_sign(URL, pairs, &mut got);
    let distinct: BTreeSet<(&str, &str)> = pairs
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let mut expected = URL.as_bytes().to_vec();
    for (name, value) in distinct {
        expected.extend_from_slice(name.as_bytes());
        expected.extend_from_slice(value.as_bytes());
    }
    assert_eq!(got, expected, "string_to_sign");
}

// ---------------------------------------------------------------------------
// signature_settings
// ---------------------------------------------------------------------------

/// `signature::parse_settings_header`, `body_sha256_param` and
/// `body_hash_matches` on arbitrary bytes:
///
/// - the settings parser agrees with a reference written from its doc
///   comment, error kind included; an accepted header round-trips (written
///   back in either element order, with spaces, empty and unknown elements
///   and a lower-case algorithm, it parses to the same settings) and its key
///   id has no `,`, `=`, space or tab;
/// - `body_sha256_param` agrees with a reference (none / one / more than one
///   `bodySHA256` segment);
/// - `body_hash_matches` accepts the input's own SHA-256 and refuses the
///   input itself as a hash (unless it is that hash).
pub fn signature_settings(data: &[u8]) {
    let parsed = signature::parse_settings_header(data);
    assert_eq!(parsed, reference_settings(data), "parse_settings_header");
    if let Ok(Some(settings)) = parsed {
        assert!(!settings.key_id.is_empty());
        assert!(!settings.key_id.contains([',', '=', ' ', '\t']));
        let (id, alg) = (settings.key_id, settings.algorithm.as_str());
        let mut spellings = vec![
            format!("key={id},algorithm={alg}"),
            format!("algorithm={alg},key={id}"),
            format!(" key={id} ,\talgorithm={alg} "),
            format!("key = {id},, algorithm = {},version=2,", alg.to_lowercase()),
        ];
        if settings.algorithm == Algorithm::HmacSha1 {
            spellings.push(format!("key={id}"));
        }
        for header in &spellings {
            assert_eq!(
                signature::parse_settings_header(header.as_bytes()),
                Ok(Some(settings)),
                "settings round-trip"
            );
        }
    }

    let query = String::from_utf8_lossy(data);
    assert_eq!(
        signature::body_sha256_param(&query),
        reference_body_sha256(&query),
        "body_sha256_param"
    );

    let digest = hex_lower(&Sha256::digest(data));
    assert!(signature::body_hash_matches(data, &digest));
    assert!(signature::body_hash_matches(data, &query) == (query == digest));
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The settings grammar of `parse_settings_header`'s doc comment, written
/// element by element with byte offsets rather than `split_once`.
fn reference_settings(value: &[u8]) -> signature::ParsedSettings<'_> {
    use SignatureError::{MalformedSettings, UnknownAlgorithm};
    let text = std::str::from_utf8(value).map_err(|_| MalformedSettings)?;
    let blank = |c: char| c == ' ' || c == '\t';
    let mut key: Option<&str> = None;
    let mut algorithm: Option<&str> = None;
    for element in text.split(',') {
        let Some(eq) = element.find('=') else {
            continue;
        };
        let name = element[..eq].trim_matches(blank);
        let value = element[eq + 1..].trim_matches(blank);
        let slot = match name {
            "key" => {
                if value.is_empty() || value.contains(['=', ' ', '\t']) {
                    return Err(MalformedSettings);
                }
                &mut key
            }
            "algorithm" if !value.is_empty() => &mut algorithm,
            _ => continue,
        };
        if slot.is_some() {
            return Err(MalformedSettings);
        }
        *slot = Some(value);
    }
    let upper = algorithm.map(str::to_ascii_uppercase);
    match (key, upper.as_deref()) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(MalformedSettings),
        (Some(key_id), None | Some("HMAC_SHA1")) => Ok(Some(SignatureSettings {
            key_id,
            algorithm: Algorithm::HmacSha1,
        })),
        (Some(key_id), Some("HMAC_SHA256")) => Ok(Some(SignatureSettings {
            key_id,
            algorithm: Algorithm::HmacSha256,
        })),
        (Some(_), Some(_)) => Err(UnknownAlgorithm),
    }
}

fn reference_body_sha256(query: &str) -> Result<Option<&str>, SignatureError> {
    let values: Vec<&str> = query
        .split('&')
        .filter_map(|segment| match segment.find('=') {
            Some(eq) => {
                (&segment[..eq] == signature::BODY_SHA256_PARAM).then(|| &segment[eq + 1..])
            }
            None => (segment == signature::BODY_SHA256_PARAM).then_some(""),
        })
        .collect();
    match values.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        _ => Err(SignatureError::DuplicateBodyHash),
    }
}

// ---------------------------------------------------------------------------
// url_candidates
// ---------------------------------------------------------------------------

/// `signature::url_candidates` on the input as a string, and on
/// `https://` + input when the input has no `://`:
///
/// - the first candidate is the URL itself, there are at most two, and they
///   differ;
/// - a second candidate differs from the URL only in the authority's port:
///   the same scheme, userinfo and host bytes before it, the same path,
///   query and fragment bytes after it, and either the port removed or
///   `:443` (https) / `:80` added where there was none;
/// - the result equals a reference implementation.
pub fn url_candidates(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_url(&text);
    if !text.contains("://") {
        check_url(&format!("https://{text}"));
    }
}

fn check_url(url: &str) {
    let candidates = signature::url_candidates(url);
    let first = candidates.first().expect("at least the URL itself");
    assert_eq!(first, url, "first candidate is the URL as given");
    assert!(candidates.len() <= 2, "at most two candidates");

    let reference = reference_port_variant(url);
    match (candidates.get(1), &reference) {
        (None, None) => {}
        (None, Some(variant)) => assert_eq!(variant.joined(), url, "missing port variant"),
        (Some(_), None) => panic!("a port variant of a URL without a recognisable authority"),
        (Some(second), Some(variant)) => {
            assert_ne!(second, url, "duplicate candidate");
            assert_eq!(*second, variant.joined(), "port variant");
            // Only the port changed: prefix and tail are the URL's own bytes.
            let (old_port, new_port) = (variant.old_port, variant.new_port);
            assert_eq!(url, format!("{}{old_port}{}", variant.head, variant.tail));
            assert!(old_port.is_empty() != new_port.is_empty());
            assert!(old_port.is_empty() || old_port.starts_with(':'));
            assert!(matches!(new_port, "" | ":443" | ":80"));
            assert!(second.starts_with(variant.head) && second.ends_with(variant.tail));
        }
    }
}

/// A URL cut around its port: `head` (scheme, `://`, userinfo, host),
/// `old_port` (`:…` or empty), `tail` (path, query, fragment); and the port
/// the other candidate has instead.
struct PortVariant<'a> {
    head: &'a str,
    old_port: &'a str,
    new_port: &'static str,
    tail: &'a str,
}

impl PortVariant<'_> {
    fn joined(&self) -> String {
        format!("{}{}{}", self.head, self.new_port, self.tail)
    }
}

/// RFC 3986 shapes, written independently of `signature::split_port`.
fn reference_port_variant(url: &str) -> Option<PortVariant<'_>> {
    let scheme_end = url.find("://")?;
    let scheme = &url[..scheme_end];
    let mut scheme_chars = scheme.chars();
    if !scheme_chars.next()?.is_ascii_alphabetic()
        || !scheme_chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return None;
    }
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let authority_end = authority_start + rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &url[authority_start..authority_end];
    let host_start = authority_start + authority.rfind('@').map_or(0, |at| at + 1);
    let host_port = &url[host_start..authority_end];
    let host_len = if host_port.starts_with('[') {
        let close = host_port.find(']')?;
        let after = &host_port[close + 1..];
        if !after.is_empty() && !after.starts_with(':') {
            return None;
        }
        close + 1
    } else {
        host_port.find(':').unwrap_or(host_port.len())
    };
    let port_start = host_start + host_len;
    let old_port = &url[port_start..authority_end];
    let new_port = match (old_port.is_empty(), scheme.eq_ignore_ascii_case("https")) {
        (false, _) => "",
        (true, true) => ":443",
        (true, false) => ":80",
    };
    Some(PortVariant {
        head: &url[..port_start],
        old_port,
        new_port,
        tail: &url[authority_end..],
    })
}

// ---------------------------------------------------------------------------
// config_load
// ---------------------------------------------------------------------------

/// Secret values in the fixed environment, and override values that are
/// always invalid: none may ever appear in an error, in `Debug` of the
/// settings, or in `describe()`. Lower case and `-` make them neither a
/// quotable variable name nor (without `/` or `.`) a quotable path.
const CANARIES: &[&str] = &[
    "tok-canary-yx81q",
    "tok2-canary-kp4w",
    "shk-canary-vb6z",
    "pad-canary-mm3j",
    "nl-canary-rt5s",
    "keycanary-not-hex-wq2",
    "c0ffee15c0ffee15c0ffee",
    KEY_CANARY,
    "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1A0",
    "level-canary-hd2",
    "bytes-canary-jf9",
    "literal-canary-lc7",
    "unknown-canary-np8",
    "url-canary-pu3",
    "regex-canary-rg1",
];

/// A valid key (so configs can load), and a canary: its hex must never show.
const KEY_CANARY: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";

/// The environment: secrets always; `IVRGUARD__…` overrides chosen by the
/// bits of `selector` (the input's first byte), the good ones so that small
/// files can load, the bad ones to check that errors do not quote them.
fn config_env(selector: u8) -> HashMap<String, String> {
    let mut env: Vec<(&str, &str)> = vec![
        ("TWILIO_AUTH_TOKEN", "tok-canary-yx81q"),
        ("TWILIO_AUTH_TOKEN_SECONDARY", "tok2-canary-kp4w"),
        ("TWILIO_WEBHOOK_KEY_1", "shk-canary-vb6z"),
        ("PADDED_TOKEN", " pad-canary-mm3j "),
        ("NEWLINE_TOKEN", "nl-canary-rt5s\n"),
        ("EMPTY_TOKEN", ""),
        ("IVRGUARD_KEY", KEY_CANARY),
        (
            "UPPER_KEY",
            "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1A0",
        ),
        ("BAD_KEY", "keycanary-not-hex-wq2"),
        ("SHORT_KEY", "c0ffee15c0ffee15c0ffee"),
    ];
    let overrides: [&[(&str, &str)]; 8] = [
        &[("IVRGUARD__UPSTREAM__URL", "http://127.0.0.1:3000")],
        &[("IVRGUARD__ENCRYPTION__FIELDS", "Digits, SpeechResult")],
        &[
            ("IVRGUARD__TWILIO__AUTH_TOKEN_ENV", "TWILIO_AUTH_TOKEN"),
            ("IVRGUARD__ENCRYPTION__KEY_ENV", "IVRGUARD_KEY"),
        ],
        &[("IVRGUARD__LOG__LEVEL", "level-canary-hd2")],
        &[("IVRGUARD__SERVER__MAX_BODY_BYTES", "bytes-canary-jf9")],
        &[("IVRGUARD__TWILIO__AUTH_TOKEN", "literal-canary-lc7")],
        &[("IVRGUARD__NOPE__KEY", "unknown-canary-np8")],
        &[
            ("IVRGUARD__TWILIO__PUBLIC_URL", "ftp://url-canary-pu3"),
            ("IVRGUARD__LOG__SCRUB_PATTERNS", "(regex-canary-rg1"),
        ],
    ];
    for (bit, vars) in overrides.iter().enumerate() {
        if selector & (1 << bit) != 0 {
            env.extend_from_slice(vars);
        }
    }
    env.into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Inputs the harness will not run: a file can name secret *files*, and
/// reading `/dev/zero` or `/dev/stdin` would exhaust memory or hang the
/// fuzzer rather than find anything. TOML escapes (`\u…`, `\x…`) and
/// line-ending backslashes could spell such a path, or a canary, without the
/// bytes appearing in the input, so those are skipped too.
fn hazardous(toml: &[u8]) -> bool {
    let has = |needle: &[u8]| toml.windows(needle.len()).any(|w| w == needle);
    has(b"/dev")
        || has(b"/proc")
        || has(b"/sys")
        || toml.windows(2).any(|w| {
            w[0] == b'\\' && matches!(w[1], b'u' | b'U' | b'x' | b' ' | b'\t' | b'\r' | b'\n')
        })
}

/// Whether the input itself spells (part of) `canary`: then it may show up
/// legitimately, e.g. as a path in "cannot read …".
fn input_mentions(input: &[u8], canary: &str) -> bool {
    let canary = canary.to_ascii_lowercase();
    let input = input.to_ascii_lowercase();
    canary
        .as_bytes()
        .windows(6)
        .any(|w| input.windows(6).any(|i| i == w))
}

fn scratch_path(name: &str) -> PathBuf {
    thread_local! {
        static DIR: tempfile::TempDir = tempfile::Builder::new()
            .prefix("ivrguard-fuzz-")
            .tempdir()
            .expect("a scratch directory");
    }
    DIR.with(|dir| dir.path().join(name))
}

/// `config::Settings::load` on the input (after its first byte, which picks
/// the environment overrides) as the TOML file:
///
/// - it returns (no panic), and an error's `Display` is one line: no
///   control characters;
/// - no canary — a secret's value, or a bad override's value — appears in an
///   error's `Display` or `Debug`, or in `Debug`/`describe()` of loaded
///   settings, unless the input itself spells it;
/// - loaded settings round-trip: `describe()` loads back, under the same
///   environment, into settings that describe themselves identically.
pub fn config_load(data: &[u8]) {
    let Some((&selector, toml)) = data.split_first() else {
        return;
    };
    if hazardous(toml) {
        return;
    }
    let env = config_env(selector);
    let canaries: Vec<&str> = CANARIES
        .iter()
        .copied()
        .filter(|c| !input_mentions(toml, c))
        .collect();
    let assert_clean = |what: &str, text: &str| {
        for canary in &canaries {
            assert!(
                !text
                    .to_ascii_lowercase()
                    .contains(&canary.to_ascii_lowercase()),
                "{what} contains a secret or an override's value"
            );
        }
    };

    let path = scratch_path("ivrguard.toml");
    std::fs::write(&path, toml).expect("writing the scratch config");
    match Settings::load(&path, &env) {
        Err(error) => {
            let shown = error.to_string();
            assert!(
                !shown.chars().any(char::is_control),
                "a config error is one line without control characters"
            );
            assert_clean("a config error", &shown);
            assert_clean("a config error's Debug", &format!("{error:?}"));
        }
        Ok(settings) => {
            assert_clean("Debug of the settings", &format!("{settings:?}"));
            let described = settings.describe();
            assert_clean("describe()", &described);
            let again_path = scratch_path("described.toml");
            std::fs::write(&again_path, &described).expect("writing the scratch config");
            let again = Settings::load(&again_path, &env)
                .unwrap_or_else(|e| panic!("describe() output does not load back: {e}"));
            assert_eq!(again.describe(), described, "describe() round-trip");
        }
    }
}

// ---------------------------------------------------------------------------
// json_rewrite
// ---------------------------------------------------------------------------

/// `json_body::rewrite` (real cipher) on arbitrary bytes:
///
/// - not JSON (by `serde_json`) ⇔ `Err`, or the JSON nests deeper than the
///   walk allows;
/// - `Ok(None)` ⇔ no string or number sits under a sensitive key (as its
///   value, or anywhere inside an array or object that is);
/// - otherwise the output is JSON of the same shape, key order kept; each
///   such string or number became a hex string that decrypts to the
///   string's bytes or the number's text as sent (it occurs in the input);
///   everything else is equal;
///   `count` and `fields` are right.
pub fn json_rewrite(data: &[u8]) {
    use serde_json::Value;
    let fields = fields();
    let cipher = cipher();
    let result = json_body::rewrite(data, fields, |plain| cipher.encrypt_hex(plain));
    let original: Result<Value, _> = serde_json::from_slice(data);
    let Ok(original) = original else {
        assert!(result.is_err(), "rewrite accepted what serde_json refuses");
        return;
    };
    let mut expected = JsonExpect::default();
    json_expect(&original, fields, None, 0, &mut expected);
    // A repeated key: the parsed value holds fewer keys than the text spells.
    let repeated_key = held_keys(&original) != spelled_keys(data);
    let rewritten = match result {
        Err(_) => {
            assert!(
                expected.too_deep || repeated_key,
                "rewrite refused JSON of allowed depth without a repeated key"
            );
            return;
        }
        Ok(rewritten) => rewritten,
    };
    assert!(!expected.too_deep, "rewrite accepted JSON nested too deep");
    assert!(
        !repeated_key,
        "rewrite accepted JSON with a key repeated in an object"
    );
    let Some(rw) = rewritten else {
        assert_eq!(
            expected.count, 0,
            "rewrite returned None with sensitive values"
        );
        return;
    };
    assert_eq!(rw.count, expected.count, "count");
    assert_eq!(rw.fields, expected.fields, "fields");
    let out: Value = serde_json::from_slice(&rw.bytes).expect("the output is JSON");
    json_compare(data, &original, &out, fields, None, cipher);
}

/// Deepest nesting `json_body` walks before refusing (its `MAX_DEPTH`).
const JSON_MAX_DEPTH: usize = 64;

#[derive(Default)]
struct JsonExpect {
    count: usize,
    fields: Vec<String>,
    too_deep: bool,
}

/// The configured key a value sits under: `under` if already inside one,
/// else `key` if it is configured.
fn json_under<'k>(under: Option<&'k str>, key: &'k str, fields: &FieldSet) -> Option<&'k str> {
    under.or_else(|| fields.contains(key).then_some(key))
}

/// Object keys in a parsed value, at every depth.
fn held_keys(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Object(map) => map.len() + map.values().map(held_keys).sum::<usize>(),
        serde_json::Value::Array(items) => items.iter().map(held_keys).sum(),
        _ => 0,
    }
}

/// Object keys as the text spells them, counted while streaming (JSON that
/// parses): more than [`held_keys`] exactly when an object repeats one.
fn spelled_keys(data: &[u8]) -> usize {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::cell::Cell;

    /// How `arbitrary_precision` hands a number to a visitor: a map with
    /// this one key.
    const NUMBER_TOKEN: &str = "$serde_json::private::Number";

    #[derive(Clone, Copy)]
    struct Count<'c>(&'c Cell<usize>);
    impl<'de> DeserializeSeed<'de> for Count<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Count<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
            while items.next_element_seed(self)?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                if key != NUMBER_TOKEN {
                    self.0.set(self.0.get() + 1);
                }
                map.next_value_seed(self)?;
            }
            Ok(())
        }
    }
    let count = Cell::new(0);
    Count(&count)
        .deserialize(&mut serde_json::Deserializer::from_slice(data))
        .expect("JSON that serde_json parsed");
    count.get()
}

/// What the walk should find: every value it visits is at `depth`; every
/// string and number under a configured key (`under`) is sensitive.
fn json_expect(
    value: &serde_json::Value,
    fields: &FieldSet,
    under: Option<&str>,
    depth: usize,
    out: &mut JsonExpect,
) {
    use serde_json::Value;
    if depth > JSON_MAX_DEPTH {
        out.too_deep = true;
        return;
    }
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                json_expect(v, fields, json_under(under, key, fields), depth + 1, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                json_expect(item, fields, under, depth + 1, out);
            }
        }
        Value::Number(_) | Value::String(_) => {
            if let Some(name) = under {
                out.count += 1;
                if !out.fields.iter().any(|f| f == name) {
                    out.fields.push(name.to_owned());
                }
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

fn json_compare(
    input: &[u8],
    original: &serde_json::Value,
    out: &serde_json::Value,
    fields: &FieldSet,
    under: Option<&str>,
    cipher: &FieldCipher,
) {
    use serde_json::Value;
    match (original, out) {
        (Value::Object(a), Value::Object(b)) => {
            assert!(a.keys().eq(b.keys()), "keys and their order are kept");
            for ((key, va), vb) in a.iter().zip(b.values()) {
                let under = json_under(under, key, fields);
                json_compare(input, va, vb, fields, under, cipher);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "array length");
            for (va, vb) in a.iter().zip(b) {
                json_compare(input, va, vb, fields, under, cipher);
            }
        }
        (va @ (Value::String(_) | Value::Number(_)), vb) if under.is_some() => {
            let plain = match va {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let hex = vb.as_str().expect("a sensitive value becomes a string");
            assert!(is_lower_hex(hex.as_bytes()), "ciphertext is hex");
            let got = cipher.decrypt_hex(hex.as_bytes()).expect("it decrypts");
            assert_eq!(got.as_slice(), plain.as_bytes(), "decrypts to the value");
            if va.is_number() {
                // The app must get the digits the caller sent: the number's
                // text is in the input (serde_json spells an exponent
                // `e+3`/`e-3`, the input may say `E3`).
                assert!(
                    number_spellings(&plain)
                        .iter()
                        .any(|t| input.windows(t.len()).any(|w| w == t.as_bytes())),
                    "a sensitive number decrypts to text that is not in the input"
                );
            }
        }
        (a, b) => assert_eq!(a, b, "non-sensitive values are kept"),
    }
}

/// `text` and the other ways JSON can spell its exponent.
fn number_spellings(text: &str) -> Vec<String> {
    let mut out = vec![text.to_string()];
    if let Some((mantissa, exponent)) = text.split_once('e') {
        let digits = exponent.strip_prefix('+');
        for e in ["e", "E"] {
            out.push(format!("{mantissa}{e}{exponent}"));
            if let Some(digits) = digits {
                out.push(format!("{mantissa}{e}{digits}"));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// pipeline_prepare
// ---------------------------------------------------------------------------

/// The auth token of the `pipeline_prepare` harness (not a secret).
const PREPARE_TOKEN: &str = "fuzz-auth-token-0001";
const PREPARE_ORIGIN: &str = "https://example.com";

/// A `Proxy` as `ivrguard run` builds it: `public_url` [`PREPARE_ORIGIN`],
/// the harness's sensitive names, the real cipher with [`KEY_HEX`].
fn proxy() -> &'static (Proxy, FieldSet) {
    static PROXY: OnceLock<(Proxy, FieldSet)> = OnceLock::new();
    PROXY.get_or_init(|| {
        let names = ["Digits", "SpeechResult", "a", "x y", "\u{e9}"];
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"http://127.0.0.1:9\"\n\
             [twilio]\nauth_token_env = \"FUZZ_TOKEN\"\npublic_url = \"{PREPARE_ORIGIN}\"\n\
             [encryption]\nkey_env = \"FUZZ_KEY\"\nfields = {names:?}\n"
        );
        let path = scratch_path("prepare.toml");
        std::fs::write(&path, toml).expect("writing the scratch config");
        let env = HashMap::from([
            ("FUZZ_TOKEN".to_string(), PREPARE_TOKEN.to_string()),
            ("FUZZ_KEY".to_string(), KEY_HEX.to_string()),
        ]);
        let settings = Settings::load(&path, &env).expect("the harness config loads");
        let fields = FieldSet::new(settings.encryption.fields.iter().cloned());
        let cipher = Arc::new(FieldCipher::new(&settings.encryption.key));
        let proxy = Proxy::new(&settings, cipher, Arc::new(Metrics::new()));
        (proxy, fields)
    })
}

/// Twilio's signature, computed independently of `ivrguard::signature`:
/// the URL, then each distinct decoded `(name, value)` pair in byte order,
/// HMAC-SHA1 with the token, base64.
fn reference_signature(url: &str, pairs: &[(String, String)]) -> String {
    use base64::Engine;
    use hmac::Mac;
    let distinct: BTreeSet<&(String, String)> = pairs.iter().collect();
    let mut mac = <hmac::Hmac<sha1::Sha1> as Mac>::new_from_slice(PREPARE_TOKEN.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(url.as_bytes());
    for (name, value) in distinct {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// An independent decoder (the `url` crate's): only compared on input
/// `form::parse` accepts, where both must agree.
fn reference_pairs(input: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(input)
        .map(|(n, v)| (n.into_owned(), v.into_owned()))
        .collect()
}

/// What the app must be able to read back from one forwarded form (body or
/// query): the same pairs in the same order, each sensitive value as hex
/// that decrypts to the value Twilio sent, everything else unchanged.
fn check_forwarded(what: &str, sent: &[(String, String)], forwarded: &[(String, String)]) {
    let fields = &proxy().1;
    assert_eq!(sent.len(), forwarded.len(), "{what}: number of pairs");
    for ((name, value), (got_name, got_value)) in sent.iter().zip(forwarded) {
        assert_eq!(name, got_name, "{what}: names and their order");
        if fields.contains(name) {
            let plain = cipher()
                .decrypt_hex(got_value.as_bytes())
                .unwrap_or_else(|_| panic!("{what}: a sensitive value is not our ciphertext"));
            assert!(
                plain.as_slice() == value.as_bytes(),
                "{what}: decrypts to another value"
            );
        } else {
            assert_eq!(
                value, got_value,
                "{what}: a value that is not sensitive changed"
            );
        }
    }
}

/// `Proxy::prepare`, the whole pure request path, on a signed webhook. The
/// input is the query string, a line break, then the form body (no line
/// break: a body and no query). The request carries the signature Twilio
/// would send, computed by [`reference_signature`]:
///
/// - `form::parse` refuses the body or the query ⇔ `prepare` answers
///   `MalformedForm`; where it accepts, it decodes as `form_urlencoded` does;
/// - otherwise `prepare` accepts, and the request for the app carries the
///   same pairs in body and query (sensitive values as ciphertext of the
///   originals), an exact `Content-Length`, and an `X-Twilio-Signature`
///   equal to the reference signature over the URL and body the app gets.
///   That last check covers the resumed HMAC of `Verifier::sign_after`,
///   which release builds do not compare with a full computation.
pub fn pipeline_prepare(data: &[u8]) {
    let (query, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (Some(&data[..at]), &data[at + 1..]),
        None => (None, data),
    };
    let target = match query {
        Some(query) => match std::str::from_utf8(query) {
            Ok(query) => format!("/ivr?{query}"),
            Err(_) => return,
        },
        None => "/ivr".to_string(),
    };
    // What hyper would refuse before ivrguard sees it.
    let Ok(uri) = target.parse::<http::Uri>() else {
        return;
    };
    let Some(path_and_query) = uri.path_and_query().map(|pq| pq.as_str().to_owned()) else {
        return;
    };
    let url = format!("{PREPARE_ORIGIN}{path_and_query}");
    let body_parsed = form::parse(body);
    let query_parsed = uri.query().map(|q| form::parse(q.as_bytes()));
    let accepted = body_parsed.is_ok() && !matches!(query_parsed, Some(Err(_)));
    let sent_body = reference_pairs(body);
    if let Ok(pairs) = &body_parsed {
        let ours: Vec<(String, String)> = pairs
            .iter()
            .map(|p| (p.name.to_string(), p.value.to_string()))
            .collect();
        assert_eq!(ours, sent_body, "form::parse and form_urlencoded disagree");
    }
    let signature = reference_signature(&url, &sent_body);

    let (parts, ()) = http::Request::post(uri.clone())
        .header("host", "example.com")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-length", body.len())
        .header("x-twilio-signature", signature)
        .body(())
        .expect("a valid request head")
        .into_parts();
    let (proxy, fields) = proxy();
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 40000));
    let mut log = AccessRecord::start(&parts, peer, fields, std::time::Instant::now());
    let result = proxy.prepare(parts, Bytes::copy_from_slice(body), peer, &mut log);
    let request = match result {
        Err(Rejection::MalformedForm(_)) if !accepted => return,
        Err(rejection) => panic!(
            "prepare refused a correctly signed request ({}), form::parse {}",
            rejection.reason(),
            if accepted { "accepts it" } else { "refuses it" }
        ),
        Ok(_) if !accepted => panic!("prepare accepted a form that form::parse refuses"),
        Ok(request) => request,
    };

    let (head, forwarded) = request.into_parts();
    let forwarded = forwarded_bytes(forwarded);
    assert_eq!(
        head.headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(forwarded.len().to_string().as_str()),
        "Content-Length of the forwarded body"
    );
    let forwarded_pq = head
        .uri
        .path_and_query()
        .expect("a target")
        .as_str()
        .to_owned();
    let forwarded_pairs = reference_pairs(&forwarded);
    check_forwarded("body", &sent_body, &forwarded_pairs);
    let sent_query = uri
        .query()
        .map(|q| reference_pairs(q.as_bytes()))
        .unwrap_or_default();
    let forwarded_query = head
        .uri
        .query()
        .map(|q| reference_pairs(q.as_bytes()))
        .unwrap_or_default();
    check_forwarded("query", &sent_query, &forwarded_query);
    let app_signature = head
        .headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .expect("the forwarded request is signed");
    let app_url = format!("{PREPARE_ORIGIN}{forwarded_pq}");
    assert_eq!(
        app_signature,
        reference_signature(&app_url, &forwarded_pairs),
        "the app's signature is not Twilio's over what the app receives"
    );
}

/// The bytes of a forwarded body (a `Full`: one frame, ready at once).
fn forwarded_bytes(body: http_body_util::Full<Bytes>) -> Vec<u8> {
    use http_body_util::BodyExt;
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut collect = std::pin::pin!(body.collect());
    match collect.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(Ok(collected)) => collected.to_bytes().to_vec(),
        std::task::Poll::Ready(Err(never)) => match never {},
        std::task::Poll::Pending => unreachable!("a Full body is ready at once"),
    }
}
