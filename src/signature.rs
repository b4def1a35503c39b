//! Twilio request signatures: URL candidates, the string-to-sign, the HMAC.
//!
//! This module owns the question "did Twilio sign this request?" and nothing
//! else: it does no I/O and never sees a socket. The pipeline hands it the URL
//! Twilio requested (rebuilt from `public_url` or trusted headers plus the raw
//! path and query), the decoded form parameters (none for a GET or a JSON
//! body), and the request headers.
//!
//! The rules are those of Twilio's SDKs, byte for byte (SPEC §3; the research
//! behind each rule is `notes/twilio-signatures.md` in the shared notes):
//!
//! - string-to-sign = URL + for each distinct name in byte order, for each
//!   distinct value of it in byte order, name + value (twilio-python
//!   `request_validator.py` `compute_signature`; Node and PHP agree);
//! - base64 of HMAC-SHA1 keyed with the auth token, or HMAC-SHA256/SHA1 keyed
//!   with a SharedKey when `X-Twilio-Webhooks-Signature-Settings` names one
//!   (twilio-python 9.13.0, `get_signature_algorithm`);
//! - the URL is tried as given, without its port, and with the default port,
//!   by string surgery on the authority only: no URL library, because
//!   re-serialising (case-folding the host, re-encoding `'`) is exactly the
//!   bug that broke twilio-node 5.0.4+.
//!
//! Secrets are keyed into HMAC states once, at start-up ([`SigningKey`]); a
//! request only clones a prepared state. Every comparison with the header is
//! constant-time (`Mac::verify_slice`, `subtle`).

use std::borrow::Cow;
use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::header::{HeaderMap, HeaderName};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::secret::{Secret, REDACTED};

/// The header carrying the signature. A `HeaderName`, so a lookup or an
/// insert needs no parse of the name.
pub const SIGNATURE_HEADER: HeaderName = HeaderName::from_static("x-twilio-signature");
/// The header naming the SharedKey and algorithm of a shared-key signature.
pub const SETTINGS_HEADER: HeaderName =
    HeaderName::from_static("x-twilio-webhooks-signature-settings");

/// The query parameter Twilio adds to JSON webhooks (\[SEC\] "A few notes").
pub const BODY_SHA256_PARAM: &str = "bodySHA256";

/// Twilio's signing algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// `HMAC_SHA1`: the auth-token scheme, and the default for SharedKeys.
    HmacSha1,
    /// `HMAC_SHA256`: SharedKeys only (Public Beta).
    HmacSha256,
}

impl Algorithm {
    /// The name used in the settings header, e.g. `"HMAC_SHA256"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::HmacSha1 => "HMAC_SHA1",
            Algorithm::HmacSha256 => "HMAC_SHA256",
        }
    }

    /// Length of the raw MAC: 20 bytes for SHA-1, 32 for SHA-256.
    fn tag_len(self) -> usize {
        match self {
            Algorithm::HmacSha1 => 20,
            Algorithm::HmacSha256 => 32,
        }
    }

    /// Length of the MAC in padded standard base64: 28 or 44 characters.
    fn encoded_len(self) -> usize {
        self.tag_len().div_ceil(3) * 4
    }
}

/// Keyed HMAC states for one secret, prepared once at start-up.
///
/// Both algorithms are keyed up front so a request pays only for cloning a
/// state, never for key setup. `Debug` prints `*REDACTED*`.
#[derive(Clone)]
pub struct SigningKey {
    sha1: Hmac<Sha1>,
    sha256: Hmac<Sha256>,
}

impl SigningKey {
    /// Keys both HMAC states with the secret's bytes.
    pub fn new(secret: &Secret) -> Self {
        SigningKey {
            sha1: Hmac::<Sha1>::new_from_slice(secret.expose())
                .expect("HMAC accepts keys of any length"),
            sha256: Hmac::<Sha256>::new_from_slice(secret.expose())
                .expect("HMAC accepts keys of any length"),
        }
    }

    /// Constant-time check of `tag` against HMAC(pieces… ++ pairs).
    fn verify<P: Param>(
        &self,
        algorithm: Algorithm,
        url: &[&str; 3],
        pairs: &[P],
        tag: &[u8],
    ) -> bool {
        match algorithm {
            Algorithm::HmacSha1 => mac_over(self.sha1.clone(), url, pairs)
                .verify_slice(tag)
                .is_ok(),
            Algorithm::HmacSha256 => mac_over(self.sha256.clone(), url, pairs)
                .verify_slice(tag)
                .is_ok(),
        }
    }

    /// [`SigningKey::verify`] for HMAC-SHA1 over `url ++ pairs`, also
    /// returning the keyed state after `url ++ pairs[..resume_at]` for
    /// [`Verifier::sign_after`].
    fn verify_sha1_keeping<P: Param>(
        &self,
        url: &str,
        pairs: &[P],
        resume_at: usize,
        tag: &[u8],
    ) -> (bool, Hmac<Sha1>) {
        let resume_at = resume_at.min(pairs.len());
        let shared = pairs.get(..resume_at).unwrap_or_default();
        let mac = mac_over(self.sha1.clone(), &[url, "", ""], shared);
        let kept = mac.clone();
        let matched = feed(mac, pairs, resume_at).verify_slice(tag).is_ok();
        (matched, kept)
    }

    /// base64(HMAC(url ++ pairs)).
    fn sign<P: Param>(&self, algorithm: Algorithm, url: &str, pairs: &[P]) -> String {
        let url = [url, "", ""];
        match algorithm {
            Algorithm::HmacSha1 => STANDARD.encode(
                mac_over(self.sha1.clone(), &url, pairs)
                    .finalize()
                    .into_bytes(),
            ),
            Algorithm::HmacSha256 => STANDARD.encode(
                mac_over(self.sha256.clone(), &url, pairs)
                    .finalize()
                    .into_bytes(),
            ),
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// One parameter as signed: (name, value), decoded.
pub type Pair<'p> = (&'p str, &'p str);

/// A parameter as it is signed: its decoded name and value. Lets the
/// verifier read the pipeline's parsed pairs where they are, sorted in
/// place, instead of a copy of them.
pub trait Param {
    fn name(&self) -> &str;
    fn value(&self) -> &str;

    /// The same parameter as `other`: an equal pair counts once.
    fn same_as(&self, other: &Self) -> bool {
        self.name() == other.name() && self.value() == other.value()
    }
}

impl Param for Pair<'_> {
    fn name(&self) -> &str {
        self.0
    }

    fn value(&self) -> &str {
        self.1
    }
}

/// Feeds a URL given as pieces, then the pairs, into a keyed MAC.
fn mac_over<M: Mac, P: Param>(mut mac: M, url: &[&str; 3], pairs: &[P]) -> M {
    for piece in url {
        mac.update(piece.as_bytes());
    }
    feed(mac, pairs, 0)
}

/// Feeds `name ++ value` of `pairs[from..]`, each pair equal to the one
/// before it skipped (`pairs` is in signing order, [`in_signing_order`]
/// without the dedup): the parameter part of the string-to-sign, hashed in
/// place rather than copied into one string.
fn feed<M: Mac, P: Param>(mut mac: M, pairs: &[P], from: usize) -> M {
    let mut previous = from.checked_sub(1).and_then(|i| pairs.get(i));
    for pair in pairs.get(from..).unwrap_or_default() {
        if !previous.is_some_and(|previous| previous.same_as(pair)) {
            mac.update(pair.name().as_bytes());
            mac.update(pair.value().as_bytes());
        }
        previous = Some(pair);
    }
    mac
}

/// The URLs Twilio may have signed for one request URL, in order: the URL as
/// given; the URL with its port removed (if it has one); the URL with the
/// default port added (`:443` if the scheme is `https`, compared
/// ASCII-case-insensitively, else `:80`) if it has none.
///
/// String surgery on the authority only: IPv6-literal aware (`[::1]:8443`),
/// userinfo aware, never re-encodes or case-folds anything. Duplicates are
/// removed. Input is `scheme://authority/path?query` (the path may be
/// empty); anything without `://`, or with an unterminated IPv6 literal, has
/// only itself as a candidate.
pub fn url_candidates(url: &str) -> Vec<Cow<'_, str>> {
    let mut candidates = Vec::with_capacity(2);
    candidates.push(Cow::Borrowed(url));
    if let Some(pieces) = port_variant(url) {
        let variant = pieces.concat();
        if variant != url {
            candidates.push(Cow::Owned(variant));
        }
    }
    candidates
}

/// The second candidate of [`url_candidates`] as three pieces to concatenate
/// (so `verify` can feed them to the MAC without allocating).
fn port_variant(url: &str) -> Option<[&str; 3]> {
    let (head, has_port, tail) = split_port(url)?;
    Some(if has_port {
        [head, "", tail]
    } else {
        [head, default_port(url), tail]
    })
}

/// `":443"` for an `https` URL (scheme compared ASCII-case-insensitively, as
/// Node 6.2.0 and Python's lower-casing `urlparse` do), else `":80"`.
fn default_port(url: &str) -> &'static str {
    let is_https = url
        .get(..8)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("https://"));
    if is_https {
        ":443"
    } else {
        ":80"
    }
}

/// Splits `url` into (everything up to the end of the host, whether a
/// `:port` follows the host, everything after the authority). `None` when
/// `url` does not start with `scheme://` or its IPv6 literal is unterminated.
fn split_port(url: &str) -> Option<(&str, bool, &str)> {
    let scheme_len = url.find("://")?;
    // RFC 3986 scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), so a
    // "://" inside a path or query is never mistaken for the scheme's.
    let scheme = url.get(..scheme_len)?;
    let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !valid_scheme {
        return None;
    }
    let authority_start = scheme_len + 3;
    let after_scheme = url.get(authority_start..)?;
    let authority_len = after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len());
    let authority_end = authority_start + authority_len;
    let authority = url.get(authority_start..authority_end)?;

    // The host starts after the last '@' (userinfo cannot contain a raw '@').
    let host_start = authority.rfind('@').map_or(0, |at| at + 1);
    let host_port = authority.get(host_start..)?;
    let port_at = if host_port.starts_with('[') {
        // IPv6 literal: a port can only follow the closing bracket.
        let close = host_port.find(']')?;
        match host_port.get(close + 1..)? {
            "" => None,
            rest if rest.starts_with(':') => Some(close + 1),
            _ => return None,
        }
    } else {
        host_port.find(':')
    };

    let tail = url.get(authority_end..)?;
    match port_at {
        None => Some((url.get(..authority_end)?, false, tail)),
        Some(offset) => Some((
            url.get(..authority_start + host_start + offset)?,
            true,
            tail,
        )),
    }
}

/// Appends the string-to-sign: `url` then, for each distinct name in byte
/// order, for each distinct value of that name in byte order, name followed by
/// value (twilio-python `sorted(set(params))` / `sorted(set(values))`; Node
/// and PHP agree: duplicates count once).
///
/// Byte order of UTF-8 is code-point order, which is Python's; JS/Java sort
/// UTF-16 units and differ only for astral characters, never in real Twilio
/// parameter names.
pub fn string_to_sign<K: AsRef<str>, V: AsRef<str>>(
    url: &str,
    params: &[(K, V)],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(url.as_bytes());
    for (name, value) in sorted_pairs(params) {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(value.as_bytes());
    }
}

/// The parameters in signing order: sorted by name, then value (byte
/// order), one copy of each distinct pair ([`in_signing_order`]).
/// References, not copies.
fn sorted_pairs<K: AsRef<str>, V: AsRef<str>>(params: &[(K, V)]) -> Vec<Pair<'_>> {
    let mut pairs: Vec<Pair<'_>> = params
        .iter()
        .map(|(name, value)| (name.as_ref(), value.as_ref()))
        .collect();
    in_signing_order(&mut pairs);
    pairs
}

/// Puts decoded pairs in the order Twilio signs them: sorted by name, then
/// by value (byte order, as `(name, value)` tuples sort), each distinct
/// pair once (duplicates count once in every SDK). What
/// [`Verifier::verify_resumable`] and [`Verifier::sign_after`] take; they
/// also take pairs that are only sorted, since they skip a pair equal to
/// the one before it.
pub fn in_signing_order(pairs: &mut Vec<Pair<'_>>) {
    pairs.sort_unstable();
    pairs.dedup();
}

/// base64 (standard, padded) of HMAC(key, string_to_sign(url, params)) with
/// the given algorithm, over exactly `url` (no port candidates).
pub fn compute<K: AsRef<str>, V: AsRef<str>>(
    key: &SigningKey,
    algorithm: Algorithm,
    url: &str,
    params: &[(K, V)],
) -> String {
    key.sign(algorithm, url, &sorted_pairs(params))
}

/// A parsed `X-Twilio-Webhooks-Signature-Settings` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignatureSettings<'a> {
    /// The SharedKey id, exactly as sent (ids are not secret).
    pub key_id: &'a str,
    /// The algorithm; `HmacSha1` when the header names none.
    pub algorithm: Algorithm,
}

/// What a settings header says: `Ok(None)` is the auth-token scheme.
pub type ParsedSettings<'a> = Result<Option<SignatureSettings<'a>>, SignatureError>;

/// Parses `X-Twilio-Webhooks-Signature-Settings: key=<id>,algorithm=<alg>`.
///
/// As lenient as twilio-python 9.13.0 (`get_signature_algorithm`) where
/// that cannot change which secret is trusted, so that Twilio adding an
/// element to this (beta) header does not turn every webhook into a 403:
///
/// - the value is a comma-separated list of `name=value` elements; spaces
///   and tabs around elements, names and values are ignored, and so are
///   empty elements;
/// - elements other than `key` and `algorithm` (names are case-sensitive),
///   and elements without `=`, are ignored;
/// - `key` is taken verbatim and must not be empty or hold `=`, a space or
///   a tab; `key` or `algorithm` twice is
///   [`SignatureError::MalformedSettings`] (which would win is ambiguous);
/// - `algorithm` is `HMAC_SHA1` or `HMAC_SHA256` in any case (Python
///   upper-cases it); any other value is [`SignatureError::UnknownAlgorithm`];
///   empty or absent, it is `HMAC_SHA1`, as in Python;
/// - with neither `key` nor `algorithm` (an empty header), it is
///   `Ok(None)`: the auth-token scheme, as in Python and as if the header
///   were absent. With an algorithm but no key, no secret can be chosen:
///   [`SignatureError::MalformedSettings`].
pub fn parse_settings_header(value: &[u8]) -> ParsedSettings<'_> {
    let text = std::str::from_utf8(value).map_err(|_| SignatureError::MalformedSettings)?;
    let (mut key_id, mut algorithm) = (None, None);
    for element in text.split(',') {
        let Some((name, value)) = element.split_once('=') else {
            continue;
        };
        let value = value.trim_matches([' ', '\t']);
        let slot = match name.trim_matches([' ', '\t']) {
            "key" if value.is_empty() || value.contains(['=', ' ', '\t']) => {
                return Err(SignatureError::MalformedSettings)
            }
            "key" => &mut key_id,
            "algorithm" if value.is_empty() => continue,
            "algorithm" => &mut algorithm,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(SignatureError::MalformedSettings);
        }
    }
    let Some(key_id) = key_id else {
        return match algorithm {
            None => Ok(None),
            Some(_) => Err(SignatureError::MalformedSettings),
        };
    };
    let algorithm = match algorithm {
        None => Algorithm::HmacSha1,
        Some(name) if name.eq_ignore_ascii_case("HMAC_SHA1") => Algorithm::HmacSha1,
        Some(name) if name.eq_ignore_ascii_case("HMAC_SHA256") => Algorithm::HmacSha256,
        Some(_) => return Err(SignatureError::UnknownAlgorithm),
    };
    Ok(Some(SignatureSettings { key_id, algorithm }))
}

/// The raw value of the `bodySHA256` query parameter, if present.
///
/// `query` is the raw query string without `?`. The name is matched exactly
/// (Twilio never percent-encodes it) and the value is returned raw: hex needs
/// no encoding, and an encoded value simply fails [`body_hash_matches`]. The
/// name without `=` counts as present with an empty value (it then fails the
/// hash check). Twice or more is [`SignatureError::DuplicateBodyHash`]: the
/// SDKs disagree on which copy wins (Python/Java/Go first, Ruby/PHP/C# last).
pub fn body_sha256_param(query: &str) -> Result<Option<&str>, SignatureError> {
    let mut found = None;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name == BODY_SHA256_PARAM && found.replace(value).is_some() {
            return Err(SignatureError::DuplicateBodyHash);
        }
    }
    Ok(found)
}

/// Constant-time: lowercase hex SHA-256 of `body` == `expected_hex`.
///
/// Case-sensitive, as in every SDK (they all produce and compare lowercase).
pub fn body_hash_matches(body: &[u8], expected_hex: &str) -> bool {
    let digest = Sha256::digest(body);
    let mut hex_digest = [0u8; 64];
    hex::encode_to_slice(digest, &mut hex_digest)
        .expect("64 bytes hold the hex of a 32-byte digest");
    // `ct_eq` on slices of different lengths is false; the length is public.
    hex_digest.ct_eq(expected_hex.as_bytes()).into()
}

/// Which secret validated the request (for the access log and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyUsed {
    /// The primary auth token.
    Primary,
    /// The secondary auth token (rotation window).
    Secondary,
    /// The SharedKey named by the settings header.
    SharedKey,
}

/// Why a request's signature was refused. Messages name the header or the
/// check, never a secret, a signature or a parameter value.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// No `X-Twilio-Signature` header.
    #[error("the request has no X-Twilio-Signature header")]
    Missing,
    /// The header appears more than once (never "any one matches").
    #[error("the X-Twilio-Signature header appears more than once")]
    Duplicate,
    /// Empty, not canonical standard base64, or the wrong decoded length for
    /// the algorithm (20 / 32 bytes); a comma-joined value is malformed.
    #[error("the X-Twilio-Signature header is not a well-formed signature")]
    Malformed,
    /// Well-formed, but no secret and URL candidate matches.
    #[error("the X-Twilio-Signature header does not match the request")]
    Mismatch,
    /// The settings header names a key id that is not configured.
    #[error("the signature settings name a shared key that is not configured")]
    UnknownKeyId,
    /// The settings header names an algorithm other than HMAC_SHA1/HMAC_SHA256.
    #[error("the signature settings name an unsupported algorithm")]
    UnknownAlgorithm,
    /// The settings header is unparsable or appears more than once.
    #[error("the X-Twilio-Webhooks-Signature-Settings header is malformed")]
    MalformedSettings,
    /// The `bodySHA256` query parameter appears more than once.
    #[error("the bodySHA256 query parameter appears more than once")]
    DuplicateBodyHash,
    /// The body's SHA-256 differs from the signed `bodySHA256` value.
    #[error("the request body does not match the signed bodySHA256")]
    BodyHashMismatch,
}

impl SignatureError {
    /// Every error, in declaration order (the metric's label values).
    pub const ALL: [SignatureError; 9] = [
        SignatureError::Missing,
        SignatureError::Duplicate,
        SignatureError::Malformed,
        SignatureError::Mismatch,
        SignatureError::UnknownKeyId,
        SignatureError::UnknownAlgorithm,
        SignatureError::MalformedSettings,
        SignatureError::DuplicateBodyHash,
        SignatureError::BodyHashMismatch,
    ];

    /// Short snake_case label: the access-log field and the metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::Missing => "missing",
            SignatureError::Duplicate => "duplicate",
            SignatureError::Malformed => "malformed",
            SignatureError::Mismatch => "mismatch",
            SignatureError::UnknownKeyId => "unknown_key_id",
            SignatureError::UnknownAlgorithm => "unknown_algorithm",
            SignatureError::MalformedSettings => "malformed_settings",
            SignatureError::DuplicateBodyHash => "duplicate_body_hash",
            SignatureError::BodyHashMismatch => "body_hash_mismatch",
        }
    }
}

/// A successful verification: which key matched, and what re-signing the
/// request ([`Verifier::sign_after`]) can reuse of the work.
pub struct Verified<'u> {
    pub key: KeyUsed,
    resume: Option<Resume<'u>>,
}

/// Where re-signing can start from: the keyed HMAC-SHA1 state after the
/// URL the primary token verified and the first `at` pairs, those
/// whose names sort before the first name the caller said may change (see
/// [`Verifier::verify_resumable`]). Those pairs are the same in the
/// rewritten request, so re-signing hashes only the pairs from there on:
/// for the 1 KB `<Gather>` webhook, everything from `Digits` on (about a
/// quarter of the bytes). The result is exactly HMAC(key, new string).
struct Resume<'u> {
    url: &'u str,
    /// The pairs' length when no signed name may change: all are in `state`.
    at: usize,
    state: Hmac<Sha1>,
}

impl fmt::Debug for Verified<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The states are keyed: print nothing of them.
        f.debug_struct("Verified")
            .field("key", &self.key)
            .field("resumable", &self.resume.is_some())
            .finish()
    }
}

/// All signing secrets: the primary auth token, an optional secondary token
/// (rotation), and SharedKeys by id. `Debug` shows only the key ids.
pub struct Verifier {
    primary: SigningKey,
    secondary: Option<SigningKey>,
    shared: Vec<(String, SigningKey)>,
    /// The app's own token (`upstream.auth_token`), when it has one:
    /// forwarded requests are signed with it instead of the primary. It
    /// verifies nothing.
    app: Option<SigningKey>,
}

impl Verifier {
    /// Prepares keyed HMAC states for every secret. Shared key ids are
    /// expected to be unique (config validates them); if one repeats, the
    /// first entry is used.
    pub fn new(
        primary: &Secret,
        secondary: Option<&Secret>,
        shared_keys: &[(String, Secret)],
    ) -> Self {
        Verifier {
            primary: SigningKey::new(primary),
            secondary: secondary.map(SigningKey::new),
            shared: shared_keys
                .iter()
                .map(|(id, secret)| (id.clone(), SigningKey::new(secret)))
                .collect(),
            app: None,
        }
    }

    /// Signs what [`Verifier::sign_after`] signs with `app_token` instead
    /// of the primary token (`upstream.auth_token`), so that the app never
    /// holds the Twilio auth token.
    pub fn signing_for_app_with(mut self, app_token: Option<&Secret>) -> Self {
        self.app = app_token.map(SigningKey::new);
        self
    }

    /// The key forwarded requests are signed with.
    fn app_key(&self) -> &SigningKey {
        self.app.as_ref().unwrap_or(&self.primary)
    }

    /// Verifies the request's `X-Twilio-Signature` over each
    /// [`url_candidates`]`(url)` with the given params.
    ///
    /// Without a settings header: HMAC-SHA1 with the primary, then the
    /// secondary token. With one: only the named SharedKey with the named
    /// algorithm; an unknown id or algorithm is an error, never a fall-back to
    /// the auth token. Checks, in order: signature header present and single,
    /// settings header single and valid, signature canonical base64 of the
    /// algorithm's length, then a constant-time match.
    pub fn verify<K: AsRef<str>, V: AsRef<str>>(
        &self,
        url: &str,
        params: &[(K, V)],
        headers: &HeaderMap,
    ) -> Result<KeyUsed, SignatureError> {
        self.verify_resumable(url, &sorted_pairs(params), headers, |_| true)
            .map(|verified| verified.key)
    }

    /// [`Verifier::verify`] for params already in signing order
    /// ([`in_signing_order`]), also returning what [`Verifier::sign_after`]
    /// can reuse when the primary token matched the URL as given.
    /// `may_change(name)` says which parameters the caller may change before
    /// re-signing: only the values of those.
    pub fn verify_resumable<'u, P: Param>(
        &self,
        url: &'u str,
        pairs: &[P],
        headers: &HeaderMap,
        may_change: impl Fn(&str) -> bool,
    ) -> Result<Verified<'u>, SignatureError> {
        let mut tag = [0u8; DECODE_BUF_LEN];
        let (keys, algorithm, tag) = self.read_headers(headers, &mut tag)?;

        let as_given = [url, "", ""];
        // The port variant is only needed when the URL as given fails.
        let mut variant = None;
        for (key, used) in keys.iter().flatten() {
            let verified = |resume| Verified { key: *used, resume };
            if *used == KeyUsed::Primary && self.app.is_none() {
                // Always HMAC-SHA1: the case re-signing can resume from
                // (when it signs with this key too).
                let at = pairs
                    .iter()
                    .position(|pair| may_change(pair.name()))
                    .unwrap_or(pairs.len());
                let (matched, state) = key.verify_sha1_keeping(url, pairs, at, tag);
                if matched {
                    return Ok(verified(Some(Resume { url, at, state })));
                }
            } else if key.verify(algorithm, &as_given, pairs, tag) {
                return Ok(verified(None));
            }
            if let Some(candidate) = variant.get_or_insert_with(|| port_variant(url)) {
                if key.verify(algorithm, candidate, pairs, tag) {
                    return Ok(verified(None));
                }
            }
        }
        Err(SignatureError::Mismatch)
    }

    /// What the headers alone say, before any body is read: whether a
    /// signature is there once, well-formed, and (with the settings header)
    /// for a key id that is configured. The pipeline asks before it reads
    /// and parses the body: a request that fails here costs no more
    /// (found in review: an unsigned 64 KB form was read, decoded and
    /// sorted, 17 times the work of a genuine webhook, to be refused).
    pub fn check_headers(&self, headers: &HeaderMap) -> Result<(), SignatureError> {
        self.read_headers(headers, &mut [0u8; DECODE_BUF_LEN])
            .map(|_| ())
    }

    /// The keys to try, the algorithm and the decoded tag, from the
    /// signature and settings headers.
    #[allow(clippy::type_complexity)]
    fn read_headers<'t>(
        &self,
        headers: &HeaderMap,
        tag: &'t mut [u8; DECODE_BUF_LEN],
    ) -> Result<([Option<(&SigningKey, KeyUsed)>; 2], Algorithm, &'t [u8]), SignatureError> {
        let mut signatures = headers.get_all(&SIGNATURE_HEADER).iter();
        let signature = signatures.next().ok_or(SignatureError::Missing)?;
        if signatures.next().is_some() {
            return Err(SignatureError::Duplicate);
        }

        let mut settings_values = headers.get_all(&SETTINGS_HEADER).iter();
        let settings = match settings_values.next() {
            None => None,
            Some(_) if settings_values.next().is_some() => {
                return Err(SignatureError::MalformedSettings)
            }
            Some(value) => parse_settings_header(value.as_bytes())?,
        };

        // Without settings: the auth tokens, primary first. With settings:
        // only the named SharedKey; never the tokens.
        let (keys, algorithm) = match settings {
            None => (
                [
                    Some((&self.primary, KeyUsed::Primary)),
                    self.secondary.as_ref().map(|key| (key, KeyUsed::Secondary)),
                ],
                Algorithm::HmacSha1,
            ),
            Some(settings) => {
                let key = self
                    .shared
                    .iter()
                    .find(|(id, _)| id == settings.key_id)
                    .map(|(_, key)| key)
                    .ok_or(SignatureError::UnknownKeyId)?;
                ([Some((key, KeyUsed::SharedKey)), None], settings.algorithm)
            }
        };

        let tag = decode_signature(signature.as_bytes(), algorithm, tag)?;
        Ok((keys, algorithm, tag))
    }

    /// The signature Twilio would send: primary token, HMAC-SHA1, over
    /// exactly `url` (no candidates). Used by `ivrguard sign`.
    pub fn sign<K: AsRef<str>, V: AsRef<str>>(&self, url: &str, params: &[(K, V)]) -> String {
        compute(&self.primary, Algorithm::HmacSha1, url, params)
    }

    /// The signature of a forwarded request: HMAC-SHA1 over `url` and
    /// `pairs` (in signing order, [`in_signing_order`]) with the app's token
    /// if it has one, else the primary ([`Verifier::sign`]'s result).
    ///
    /// With the primary, for params that are the verified ones with only
    /// values changed whose names `may_change` accepted (what the
    /// pipeline's rewrite does), over the same `url`: it hashes only the
    /// pairs from the first such name on. For any other `url`, or with the
    /// app's own token, it signs from the start.
    ///
    /// If `pairs` broke that rule, the signature would not match what is
    /// forwarded and the app would refuse the request; it never signs
    /// anything else. Debug builds check the result against a signature
    /// computed from the start.
    pub fn sign_after<P: Param>(&self, verified: &Verified<'_>, url: &str, pairs: &[P]) -> String {
        // The resumed state is keyed with the primary: never with an app token.
        let resumable = verified.resume.as_ref().filter(|_| self.app.is_none());
        let mac = match resumable.filter(|resume| resume.url == url) {
            Some(resume) => feed(resume.state.clone(), pairs, resume.at),
            None => mac_over(self.app_key().sha1.clone(), &[url, "", ""], pairs),
        };
        let signature = STANDARD.encode(mac.finalize().into_bytes());
        debug_assert_eq!(
            signature,
            self.app_key().sign(Algorithm::HmacSha1, url, pairs),
            "re-signing resumed wrongly"
        );
        signature
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.shared.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Verifier")
            .field("primary", &self.primary)
            .field("secondary", &self.secondary)
            .field("shared_key_ids", &ids)
            .field("app_token", &self.app)
            .finish()
    }
}

/// Room `decode_slice` asks for when decoding 44 base64 characters (its
/// conservative estimate, one byte more than the 32-byte SHA-256 MAC).
const DECODE_BUF_LEN: usize = 33;

/// Strictly decodes the header: exactly the padded length for `algorithm`,
/// canonical standard base64 (no trailing bits, no URL-safe alphabet, no
/// whitespace), decoding to exactly the MAC length.
fn decode_signature<'b>(
    header: &[u8],
    algorithm: Algorithm,
    buf: &'b mut [u8; DECODE_BUF_LEN],
) -> Result<&'b [u8], SignatureError> {
    if header.len() != algorithm.encoded_len() {
        return Err(SignatureError::Malformed);
    }
    let decoded = STANDARD
        .decode_slice(header, buf)
        .map_err(|_| SignatureError::Malformed)?;
    if decoded != algorithm.tag_len() {
        return Err(SignatureError::Malformed);
    }
    buf.get(..decoded).ok_or(SignatureError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    /// Twilio's SDK test fixture: token, URL, params and the signature every
    /// SDK asserts (twilio-python tests/unit/test_request_validator.py:16-38).
    const TOKEN: &str = "12345";
    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";
    const PARAMS: [(&str, &str); 5] = [
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", "+14158675309"),
        ("Digits", "1234"),
        ("From", "+14158675309"),
        ("To", "+18005551212"),
    ];
    const SIG: &str = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
    /// The same request signed over `…mycompany.com:443/…` (every SDK's tests).
    const SIG_443: &str = "kvajT1Ptam85bY51eRf/AJRuM3w=";

    /// A SharedKey and its signatures over URL+PARAMS, computed with
    /// twilio-python 9.13.0 `RequestValidator("shared-secret-canary")
    /// .compute_signature(URL, PARAMS, algorithm)` (and cross-checked with
    /// Python's hmac module).
    const SHARED_ID: &str = "webhooks_sharedkey_1";
    const SHARED_SECRET: &str = "shared-secret-canary";
    const SHARED_SHA256: &str = "dbBd8cNRIAWbn2Xy/YaC0tfkBbaC25GBHn6j6le+JM4=";
    const SHARED_SHA256_443: &str = "j9EB0Vv4v3KclgYlcl1cwR9wV7BPBF4mIQ2EBGPPFKc=";
    const SHARED_SHA1: &str = "rWCmijEpZlVQE1LzkwhodDJuSqQ=";

    fn secret(s: &str) -> Secret {
        Secret::from(s.to_string())
    }

    fn token_only() -> Verifier {
        Verifier::new(&secret(TOKEN), None, &[])
    }

    fn with_shared_key() -> Verifier {
        Verifier::new(
            &secret("primary-token"),
            Some(&secret("secondary-token")),
            &[(SHARED_ID.to_string(), secret(SHARED_SECRET))],
        )
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("test header name"),
                HeaderValue::from_bytes(value).expect("test header value"),
            );
        }
        map
    }

    fn signed(signature: &str) -> HeaderMap {
        headers(&[("X-Twilio-Signature", signature.as_bytes())])
    }

    fn shared_signed(settings: &str, signature: &str) -> HeaderMap {
        headers(&[
            ("X-Twilio-Signature", signature.as_bytes()),
            ("X-Twilio-Webhooks-Signature-Settings", settings.as_bytes()),
        ])
    }

    // ---- url_candidates ------------------------------------------------

    #[test]
    fn url_candidates_table() {
        let cases: &[(&str, &[&str])] = &[
            (
                "https://h.example/p",
                &["https://h.example/p", "https://h.example:443/p"],
            ),
            (
                "http://h.example/p",
                &["http://h.example/p", "http://h.example:80/p"],
            ),
            (
                "HTTPS://h.example/p",
                &["HTTPS://h.example/p", "HTTPS://h.example:443/p"],
            ),
            (
                "HtTp://h.example/p",
                &["HtTp://h.example/p", "HtTp://h.example:80/p"],
            ),
            (
                "wss://h.example/p",
                &["wss://h.example/p", "wss://h.example:80/p"],
            ),
            (
                "https://h.example:8443/p?q=1",
                &["https://h.example:8443/p?q=1", "https://h.example/p?q=1"],
            ),
            (
                "https://h.example:443/p",
                &["https://h.example:443/p", "https://h.example/p"],
            ),
            (
                "http://h.example:80/p",
                &["http://h.example:80/p", "http://h.example/p"],
            ),
            // Empty path, query straight after the authority, no path at all.
            (
                "https://h.example",
                &["https://h.example", "https://h.example:443"],
            ),
            (
                "https://h.example?x=1",
                &["https://h.example?x=1", "https://h.example:443?x=1"],
            ),
            (
                "https://h.example:8443?x=1",
                &["https://h.example:8443?x=1", "https://h.example?x=1"],
            ),
            // Colons after the authority are not ports.
            (
                "https://h.example/a:1?t=10:30",
                &[
                    "https://h.example/a:1?t=10:30",
                    "https://h.example:443/a:1?t=10:30",
                ],
            ),
            // `//` in the path stays (java-double-slash-443).
            (
                "https://h.example:443//p",
                &["https://h.example:443//p", "https://h.example//p"],
            ),
            // Not a URL, or an unterminated IPv6 literal: only itself.
            ("h.example/p", &["h.example/p"]),
            (
                "/p?next=https://h.example:1/x",
                &["/p?next=https://h.example:1/x"],
            ),
            ("://h.example/p", &["://h.example/p"]),
            ("1http://h.example/p", &["1http://h.example/p"]),
            (
                "svc+ws.v2-x://h.example/p",
                &["svc+ws.v2-x://h.example/p", "svc+ws.v2-x://h.example:80/p"],
            ),
            // An empty port is still a port: removed, nothing added.
            (
                "https://h.example:/p",
                &["https://h.example:/p", "https://h.example/p"],
            ),
            ("", &[""]),
            ("https://[::1/p", &["https://[::1/p"]),
            ("https://[::1]x/p", &["https://[::1]x/p"]),
        ];
        for (url, expected) in cases {
            let got = url_candidates(url);
            assert_eq!(&got, expected, "url_candidates({url:?})");
        }
    }

    #[test]
    fn ipv6_port_removed() {
        let got = url_candidates("https://[::1]:8443/x");
        assert_eq!(got, ["https://[::1]:8443/x", "https://[::1]/x"]);
        let got = url_candidates("http://[2001:db8::7]/x?a=b");
        assert_eq!(
            got,
            [
                "http://[2001:db8::7]/x?a=b",
                "http://[2001:db8::7]:80/x?a=b"
            ]
        );
    }

    #[test]
    fn userinfo_kept_and_not_mistaken_for_a_port() {
        // twilio-python turns the first into "https://user/x" (its bug).
        let got = url_candidates("https://user:pass@h.example:8443/x");
        assert_eq!(
            got,
            [
                "https://user:pass@h.example:8443/x",
                "https://user:pass@h.example/x"
            ]
        );
        let got = url_candidates("https://user:pass@h.example/x");
        assert_eq!(
            got,
            [
                "https://user:pass@h.example/x",
                "https://user:pass@h.example:443/x"
            ]
        );
        let got = url_candidates("https://us:er@[::1]:9/x");
        assert_eq!(got, ["https://us:er@[::1]:9/x", "https://us:er@[::1]/x"]);
    }

    #[test]
    fn port_candidates_keep_percent_encoding_and_case() {
        let url = "https://MyHost.Example:8443/a%2Fb/%7euser?x=%27&y=a+b&z=O'hara";
        let got = url_candidates(url);
        assert_eq!(
            got,
            [
                url,
                "https://MyHost.Example/a%2Fb/%7euser?x=%27&y=a+b&z=O'hara"
            ]
        );
        // And verification really uses that byte-identical variant.
        let v = token_only();
        let sig = v.sign(
            "https://MyHost.Example/a%2Fb/%7euser?x=%27&y=a+b&z=O'hara",
            &PARAMS,
        );
        assert_eq!(v.verify(url, &PARAMS, &signed(&sig)), Ok(KeyUsed::Primary));
        let decoded = v.sign(
            "https://MyHost.Example/a/b/~user?x='&y=a b&z=O'hara",
            &PARAMS,
        );
        assert_eq!(
            v.verify(url, &PARAMS, &signed(&decoded)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn first_candidate_is_borrowed_input() {
        let url = "https://h.example/p";
        assert!(matches!(url_candidates(url).first(), Some(Cow::Borrowed(u)) if *u == url));
    }

    // ---- string_to_sign / compute ----------------------------------------

    type Params<'a> = &'a [(&'a str, &'a str)];

    fn sts(url: &str, params: &[(&str, &str)]) -> String {
        let mut out = Vec::new();
        string_to_sign(url, params, &mut out);
        String::from_utf8(out).expect("inputs are UTF-8")
    }

    #[test]
    fn string_to_sign_table() {
        let cases: &[(&str, Params, &str)] = &[
            // Twilio docs worked example ([SEC] "Explore the algorithm yourself").
            (
                "https://example.com/myapp.php?foo=1&bar=2",
                &[("Digits", "1234"), ("To", "+18005551212"), ("From", "+14158675310"), ("Caller", "+14158675310"), ("CallSid", "CA1234567890ABCDE")],
                "https://example.com/myapp.php?foo=1&bar=2CallSidCA1234567890ABCDECaller+14158675310Digits1234From+14158675310To+18005551212",
            ),
            ("https://h/p", &[], "https://h/p"),
            // Repeated name: distinct values, sorted (Python/Node/PHP).
            ("u", &[("Digits", "5678"), ("Digits", "1234"), ("Digits", "1234")], "uDigits1234Digits5678"),
            // Empty values contribute the name only, and are kept.
            ("u", &[("b", ""), ("a", "1"), ("b", "")], "ua1b"),
            // Byte order: upper case before lower case; a prefix sorts first.
            ("u", &[("b", "1"), ("B", "2"), ("ab", "3"), ("a", "4")], "uB2a4ab3b1"),
            // Sorting by name first, not by the concatenation "name+value".
            ("u", &[("ab", "c"), ("a", "bd")], "uabdabc"),
            // Same value under different names is not a duplicate.
            ("u", &[("x", "1"), ("y", "1")], "ux1y1"),
        ];
        for (url, params, expected) in cases {
            assert_eq!(
                sts(url, params),
                *expected,
                "string_to_sign({url:?}, {params:?})"
            );
        }
    }

    #[test]
    fn string_to_sign_appends_without_clearing() {
        let mut out = b"prefix|".to_vec();
        string_to_sign("u", &[("a", "1")], &mut out);
        assert_eq!(out, b"prefix|ua1");
    }

    #[test]
    fn astral_names_sort_in_code_point_order_like_python() {
        // U+FF5E < U+1F600 by code point (Python, Rust); UTF-16 order (JS,
        // Java, C#) puts the surrogate pair D83D.. first.
        assert_eq!(
            sts("u", &[("\u{1F600}", "1"), ("\u{FF5E}", "2")]),
            "u\u{FF5E}2\u{1F600}1"
        );
    }

    #[test]
    fn compute_matches_sdk_and_docs_signatures() {
        let token = SigningKey::new(&secret(TOKEN));
        let shared = SigningKey::new(&secret(SHARED_SECRET));
        let docs_params = [
            ("Digits", "1234"),
            ("To", "+18005551212"),
            ("From", "+14158675310"),
            ("Caller", "+14158675310"),
            ("CallSid", "CA1234567890ABCDE"),
        ];
        let cases: &[(&SigningKey, Algorithm, &str, Params, &str)] = &[
            (&token, Algorithm::HmacSha1, URL, &PARAMS, SIG),
            (
                &token,
                Algorithm::HmacSha1,
                "https://mycompany.com:443/myapp.php?foo=1&bar=2",
                &PARAMS,
                SIG_443,
            ),
            (
                &token,
                Algorithm::HmacSha1,
                "https://example.com/myapp.php?foo=1&bar=2",
                &docs_params,
                "L/OH5YylLD5NRKLltdqwSvS0BnU=",
            ),
            (&shared, Algorithm::HmacSha256, URL, &PARAMS, SHARED_SHA256),
            (&shared, Algorithm::HmacSha1, URL, &PARAMS, SHARED_SHA1),
        ];
        for (key, algorithm, url, params, expected) in cases {
            assert_eq!(
                compute(key, *algorithm, url, params),
                *expected,
                "{algorithm:?} {url}"
            );
        }
    }

    #[test]
    fn compute_is_exact_url_without_candidates() {
        let v = token_only();
        assert_eq!(v.sign(URL, &PARAMS), SIG);
        assert_eq!(
            v.sign("https://mycompany.com:443/myapp.php?foo=1&bar=2", &PARAMS),
            SIG_443
        );
        assert_ne!(
            v.sign(URL, &PARAMS),
            v.sign("https://mycompany.com:443/myapp.php?foo=1&bar=2", &PARAMS)
        );
    }

    #[test]
    fn keyed_state_is_reused_not_consumed() {
        let key = SigningKey::new(&secret(TOKEN));
        let first = compute(&key, Algorithm::HmacSha1, URL, &PARAMS);
        let second = compute(&key, Algorithm::HmacSha1, URL, &PARAMS);
        assert_eq!((first.as_str(), second.as_str()), (SIG, SIG));
    }

    // ---- verify: auth tokens ---------------------------------------------

    #[test]
    fn accepts_sdk_signature() {
        assert_eq!(
            token_only().verify(URL, &PARAMS, &signed(SIG)),
            Ok(KeyUsed::Primary)
        );
    }

    #[test]
    fn header_name_is_case_insensitive() {
        let h = headers(&[("x-TWILIO-signature", SIG.as_bytes())]);
        assert_eq!(token_only().verify(URL, &PARAMS, &h), Ok(KeyUsed::Primary));
    }

    #[test]
    fn port_candidates_accept_both_forms() {
        let v = token_only();
        let cases = [
            // Request arrives on :1234, signed without a port (voice over https).
            (
                "https://mycompany.com:1234/myapp.php?foo=1&bar=2",
                SIG,
                Ok(KeyUsed::Primary),
            ),
            // Request has no port, Twilio signed with :443.
            (URL, SIG_443, Ok(KeyUsed::Primary)),
            // Request on :443, signed without.
            (
                "https://mycompany.com:443/myapp.php?foo=1&bar=2",
                SIG,
                Ok(KeyUsed::Primary),
            ),
            // :443 signature never matches an http URL (default is :80 there).
            (
                "http://mycompany.com/myapp.php?foo=1&bar=2",
                SIG_443,
                Err(SignatureError::Mismatch),
            ),
        ];
        for (url, sig, expected) in cases {
            assert_eq!(
                v.verify(url, &PARAMS, &signed(sig)),
                expected,
                "{url} / {sig}"
            );
        }
    }

    #[test]
    fn rejects_signature_over_other_path() {
        let v = token_only();
        let other = v.sign("https://mycompany.com/other.php?foo=1&bar=2", &PARAMS);
        assert_eq!(
            v.verify(URL, &PARAMS, &signed(&other)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn rejects_tampered_params_and_query() {
        let v = token_only();
        let mut tampered = PARAMS;
        tampered[2] = ("Digits", "9999");
        let cases: [(&str, &[(&str, &str)]); 5] = [
            (URL, &tampered),
            (URL, &PARAMS[..4]),
            (URL, &[]),
            ("https://mycompany.com/myapp.php?foo=1&bar=3", &PARAMS),
            ("https://mycompany.com/myapp.php?bar=2&foo=1", &PARAMS),
        ];
        for (url, params) in cases {
            assert_eq!(
                v.verify(url, params, &signed(SIG)),
                Err(SignatureError::Mismatch),
                "{url} {params:?}"
            );
        }
    }

    #[test]
    fn host_case_is_significant() {
        // twilio-csharp RequestValidatorTest.cs:37-107: a lower-case-host
        // signature must fail for a mixed-case request URL.
        let v = token_only();
        let url = "https://MyCompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            v.verify(url, &PARAMS, &signed("g9IN/x4Cft2g517EjYvEvM/W7LU=")),
            Ok(KeyUsed::Primary)
        );
        assert_eq!(
            v.verify(url, &PARAMS, &signed(SIG)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn secondary_token_accepted_during_rotation() {
        let v = Verifier::new(&secret("new-primary"), Some(&secret(TOKEN)), &[]);
        assert_eq!(v.verify(URL, &PARAMS, &signed(SIG)), Ok(KeyUsed::Secondary));
        let primary_sig = v.sign(URL, &PARAMS);
        assert_eq!(
            v.verify(URL, &PARAMS, &signed(&primary_sig)),
            Ok(KeyUsed::Primary)
        );
        // Without the secondary configured, the old token's signature fails.
        let v = Verifier::new(&secret("new-primary"), None, &[]);
        assert_eq!(
            v.verify(URL, &PARAMS, &signed(SIG)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn secondary_token_with_port_candidate() {
        let v = Verifier::new(&secret("new-primary"), Some(&secret(TOKEN)), &[]);
        assert_eq!(
            v.verify(URL, &PARAMS, &signed(SIG_443)),
            Ok(KeyUsed::Secondary)
        );
    }

    #[test]
    fn sign_uses_primary_token() {
        let v = Verifier::new(&secret(TOKEN), Some(&secret("other")), &[]);
        assert_eq!(v.sign(URL, &PARAMS), SIG);
    }

    // ---- verify: header shape ----------------------------------------------

    #[test]
    fn missing_signature_header() {
        assert_eq!(
            token_only().verify(URL, &PARAMS, &HeaderMap::new()),
            Err(SignatureError::Missing)
        );
        let only_settings = headers(&[("X-Twilio-Webhooks-Signature-Settings", b"key=a")]);
        assert_eq!(
            token_only().verify(URL, &PARAMS, &only_settings),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn duplicate_signature_header_rejected_even_if_one_valid() {
        let v = token_only();
        for pair in [[SIG, "bogus"], ["bogus", SIG], [SIG, SIG]] {
            let h = headers(&[
                ("X-Twilio-Signature", pair[0].as_bytes()),
                ("x-twilio-signature", pair[1].as_bytes()),
            ]);
            assert_eq!(
                v.verify(URL, &PARAMS, &h),
                Err(SignatureError::Duplicate),
                "{pair:?}"
            );
        }
    }

    #[test]
    fn malformed_signatures_rejected_before_any_mac() {
        let v = token_only();
        let nineteen = STANDARD.encode([7u8; 19]);
        let twenty_one = STANDARD.encode([7u8; 21]);
        let sha256_len = STANDARD.encode([7u8; 32]);
        assert_eq!(
            (nineteen.len(), twenty_one.len()),
            (28, 28),
            "same length as a real one"
        );
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            (&SIG[..27], "27 chars (padding dropped)"),
            (&format!("{SIG}="), "29 chars"),
            (&nineteen, "base64 of 19 bytes"),
            (&twenty_one, "base64 of 21 bytes"),
            (&sha256_len, "SHA-256 length without settings"),
            (
                "RSOYDt4T1cUTdK1PDd93/VVr8B9=",
                "non-canonical trailing bits",
            ),
            ("RSOYDt4T1cUTdK1PDd93_VVr8B8=", "URL-safe alphabet"),
            ("RSOYDt4T1cUTdK1PDd93 VVr8B8=", "embedded space"),
            (
                "RSOYDt4T1cUTdK1PDd93/VVr8B8 ",
                "trailing space instead of padding",
            ),
            ("RSOYDt4T1cUTdK1PDd93/VVr8B==", "wrong padding"),
            (&format!("{SIG},{SIG}"), "comma-joined duplicates"),
            (&format!("{SIG}, bogus"), "comma-joined with junk"),
            ("WRONG_SIGNATURE", "node-wrong"),
        ];
        for (header, why) in cases {
            assert_eq!(
                v.verify(URL, &PARAMS, &signed(header)),
                Err(SignatureError::Malformed),
                "{why}"
            );
        }
    }

    #[test]
    fn one_char_case_flipped_is_a_mismatch() {
        let v = token_only();
        for i in 0..SIG.len() {
            let mut flipped = SIG.as_bytes().to_vec();
            let Some(c) = flipped.get_mut(i) else {
                continue;
            };
            if !c.is_ascii_alphabetic() {
                continue;
            }
            c.make_ascii_lowercase();
            if *c == SIG.as_bytes()[i] {
                c.make_ascii_uppercase();
            }
            let flipped = String::from_utf8(flipped).expect("ASCII");
            // Still canonical base64 of 20 bytes unless the flip touched the
            // last data character's padding bits.
            let result = v.verify(URL, &PARAMS, &signed(&flipped));
            assert!(
                matches!(
                    result,
                    Err(SignatureError::Mismatch | SignatureError::Malformed)
                ),
                "{flipped}: {result:?}"
            );
        }
        assert_eq!(
            v.verify(URL, &PARAMS, &signed("rSOYDt4T1cUTdK1PDd93/VVr8B8=")),
            Err(SignatureError::Mismatch)
        );
    }

    // ---- verify: shared keys -----------------------------------------------

    #[test]
    fn shared_key_sha256_accepted() {
        let v = with_shared_key();
        let cases = [
            (URL, SHARED_SHA256),
            (
                "https://mycompany.com:8443/myapp.php?foo=1&bar=2",
                SHARED_SHA256,
            ),
            (URL, SHARED_SHA256_443),
        ];
        for (url, sig) in cases {
            let h = shared_signed("key=webhooks_sharedkey_1,algorithm=HMAC_SHA256", sig);
            assert_eq!(v.verify(url, &PARAMS, &h), Ok(KeyUsed::SharedKey), "{url}");
        }
    }

    #[test]
    fn shared_key_sha1_accepted_with_explicit_or_default_algorithm() {
        let v = with_shared_key();
        for settings in [
            "key=webhooks_sharedkey_1,algorithm=HMAC_SHA1",
            "key=webhooks_sharedkey_1",
        ] {
            let h = shared_signed(settings, SHARED_SHA1);
            assert_eq!(
                v.verify(URL, &PARAMS, &h),
                Ok(KeyUsed::SharedKey),
                "{settings}"
            );
        }
    }

    #[test]
    fn shared_key_unknown_id_never_falls_back_to_token() {
        // The signature is valid for the primary token, but the settings name
        // a key we do not hold: that must fail, not try the token.
        let v = Verifier::new(
            &secret(TOKEN),
            None,
            &[(SHARED_ID.to_string(), secret(SHARED_SECRET))],
        );
        let h = shared_signed("key=someone_elses_key,algorithm=HMAC_SHA1", SIG);
        assert_eq!(
            v.verify(URL, &PARAMS, &h),
            Err(SignatureError::UnknownKeyId)
        );
        // Key ids are compared exactly.
        let h = shared_signed(
            "key=WEBHOOKS_SHAREDKEY_1,algorithm=HMAC_SHA256",
            SHARED_SHA256,
        );
        assert_eq!(
            v.verify(URL, &PARAMS, &h),
            Err(SignatureError::UnknownKeyId)
        );
        // No shared keys configured at all.
        let h = shared_signed("key=webhooks_sharedkey_1,algorithm=HMAC_SHA1", SIG);
        assert_eq!(
            token_only().verify(URL, &PARAMS, &h),
            Err(SignatureError::UnknownKeyId)
        );
    }

    #[test]
    fn settings_header_excludes_the_auth_token() {
        // A token signature with settings naming a real shared key: only the
        // shared key is tried.
        let v = Verifier::new(
            &secret(TOKEN),
            None,
            &[(SHARED_ID.to_string(), secret(SHARED_SECRET))],
        );
        let h = shared_signed("key=webhooks_sharedkey_1,algorithm=HMAC_SHA1", SIG);
        assert_eq!(v.verify(URL, &PARAMS, &h), Err(SignatureError::Mismatch));
        assert_eq!(v.verify(URL, &PARAMS, &signed(SIG)), Ok(KeyUsed::Primary));
    }

    #[test]
    fn shared_key_unknown_algorithm_rejected() {
        let v = with_shared_key();
        for alg in ["HMAC_MD5", "HMAC_SHA512", "SHA256", "HMAC-SHA256"] {
            let h = shared_signed(
                &format!("key=webhooks_sharedkey_1,algorithm={alg}"),
                SHARED_SHA256,
            );
            assert_eq!(
                v.verify(URL, &PARAMS, &h),
                Err(SignatureError::UnknownAlgorithm),
                "{alg}"
            );
        }
        // twilio-python upper-cases the name.
        let h = shared_signed(
            "key=webhooks_sharedkey_1,algorithm=hmac_sha256",
            SHARED_SHA256,
        );
        assert_eq!(v.verify(URL, &PARAMS, &h), Ok(KeyUsed::SharedKey));
    }

    #[test]
    fn shared_key_algorithm_decides_signature_length() {
        let v = with_shared_key();
        let h = shared_signed(
            "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256",
            SHARED_SHA1,
        );
        assert_eq!(v.verify(URL, &PARAMS, &h), Err(SignatureError::Malformed));
        let h = shared_signed(
            "key=webhooks_sharedkey_1,algorithm=HMAC_SHA1",
            SHARED_SHA256,
        );
        assert_eq!(v.verify(URL, &PARAMS, &h), Err(SignatureError::Malformed));
    }

    #[test]
    fn shared_key_wrong_secret_or_other_key_mismatch() {
        let v = Verifier::new(
            &secret(TOKEN),
            None,
            &[
                ("k1".to_string(), secret("not-the-secret")),
                ("k2".to_string(), secret(SHARED_SECRET)),
            ],
        );
        let h = shared_signed("key=k1,algorithm=HMAC_SHA256", SHARED_SHA256);
        assert_eq!(v.verify(URL, &PARAMS, &h), Err(SignatureError::Mismatch));
        let h = shared_signed("key=k2,algorithm=HMAC_SHA256", SHARED_SHA256);
        assert_eq!(v.verify(URL, &PARAMS, &h), Ok(KeyUsed::SharedKey));
    }

    #[test]
    fn duplicate_settings_header_is_malformed() {
        let v = with_shared_key();
        let h = headers(&[
            ("X-Twilio-Signature", SHARED_SHA256.as_bytes()),
            (
                "X-Twilio-Webhooks-Signature-Settings",
                b"key=webhooks_sharedkey_1,algorithm=HMAC_SHA256",
            ),
            (
                "X-Twilio-Webhooks-Signature-Settings",
                b"key=webhooks_sharedkey_1,algorithm=HMAC_SHA256",
            ),
        ]);
        assert_eq!(
            v.verify(URL, &PARAMS, &h),
            Err(SignatureError::MalformedSettings)
        );
    }

    #[test]
    fn empty_settings_header_means_the_auth_token_as_in_python() {
        // As if the header were absent, which anyone could arrange.
        let v = token_only();
        assert_eq!(
            v.verify(URL, &PARAMS, &shared_signed("", SIG)),
            Ok(KeyUsed::Primary)
        );
        assert_eq!(
            v.verify(URL, &PARAMS, &shared_signed(" , ", SHARED_SHA256)),
            Err(SignatureError::Malformed),
            "a SHA-256 signature is not an auth-token (SHA-1) one"
        );
    }

    // ---- parse_settings_header ---------------------------------------------

    #[test]
    fn settings_header_parsing_table() {
        use Algorithm::{HmacSha1, HmacSha256};
        use SignatureError::{MalformedSettings as Bad, UnknownAlgorithm as Unknown};
        let ok = |key_id, algorithm| Ok(Some(SignatureSettings { key_id, algorithm }));
        let cases: &[(&[u8], ParsedSettings<'_>)] = &[
            (b"key=abc,algorithm=HMAC_SHA256", ok("abc", HmacSha256)),
            (b"key=abc,algorithm=HMAC_SHA1", ok("abc", HmacSha1)),
            (b"algorithm=HMAC_SHA256,key=abc", ok("abc", HmacSha256)),
            (b"key=abc", ok("abc", HmacSha1)),
            (
                b"key=webhooks_sharedkey_1.v2-x",
                ok("webhooks_sharedkey_1.v2-x", HmacSha1),
            ),
            // Whitespace around elements, names and values; empty elements
            // (twilio-python strips them all).
            (b"key=abc, algorithm=HMAC_SHA256", ok("abc", HmacSha256)),
            (b" key=abc ,\talgorithm=HMAC_SHA256 ", ok("abc", HmacSha256)),
            (
                b"key = abc , algorithm = HMAC_SHA256",
                ok("abc", HmacSha256),
            ),
            (b"key=abc,", ok("abc", HmacSha1)),
            (b",key=abc,,algorithm=HMAC_SHA256,", ok("abc", HmacSha256)),
            // Elements it does not know are ignored (Twilio may add some),
            // names are exact, and an empty algorithm is no algorithm.
            (
                b"key=abc,algorithm=HMAC_SHA256,version=2",
                ok("abc", HmacSha256),
            ),
            (b"key=abc,Algorithm=HMAC_SHA256", ok("abc", HmacSha1)),
            (b"key=abc,flag,algorithm=HMAC_SHA256", ok("abc", HmacSha256)),
            (b"key=abc,algorithm=", ok("abc", HmacSha1)),
            // Algorithm names in any case, as Python upper-cases them.
            (b"key=abc,algorithm=hmac_sha256", ok("abc", HmacSha256)),
            (b"key=abc,algorithm=Hmac_Sha1", ok("abc", HmacSha1)),
            // Neither key nor algorithm: the auth-token scheme.
            (b"", Ok(None)),
            (b"   ", Ok(None)),
            (b",", Ok(None)),
            (b"version=2", Ok(None)),
            (b"Key=abc", Ok(None)),
            // An algorithm without a key names no secret.
            (b"algorithm=HMAC_SHA256", Err(Bad)),
            (b"Key=abc,algorithm=HMAC_SHA1", Err(Bad)),
            // The key id: not empty, no '=', no inner whitespace.
            (b"key=,algorithm=HMAC_SHA256", Err(Bad)),
            (b"key= ", Err(Bad)),
            (b"key=a b", Err(Bad)),
            (b"key=a=b", Err(Bad)),
            (b"key=abc;algorithm=HMAC_SHA256", Err(Bad)),
            // Each of the two at most once: which would win is ambiguous.
            (b"key=abc,key=abc", Err(Bad)),
            (b"key=abc,algorithm=HMAC_SHA1,algorithm=HMAC_SHA1", Err(Bad)),
            (b"key=\xff\xfe", Err(Bad)),
            // Only the two algorithms.
            (b"key=abc,algorithm=HMAC_SHA512", Err(Unknown)),
            (b"key=abc,algorithm=HMAC-SHA256", Err(Unknown)),
            (b"key=abc,algorithm=MD5", Err(Unknown)),
        ];
        for (value, expected) in cases {
            assert_eq!(
                &parse_settings_header(value),
                expected,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
    }

    // ---- bodySHA256 -------------------------------------------------------

    const JSON_BODY: &[u8] = br#"{"property": "value", "boolean": true}"#;
    const JSON_HEX: &str = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";

    #[test]
    fn body_sha256_param_table() {
        use SignatureError::DuplicateBodyHash as Dup;
        let cases: &[(&str, Result<Option<&str>, SignatureError>)] = &[
            ("", Ok(None)),
            ("foo=1&bar=2", Ok(None)),
            ("bodySHA256=abc", Ok(Some("abc"))),
            ("foo=1&bodySHA256=abc&bar=2", Ok(Some("abc"))),
            ("bodySHA256=", Ok(Some(""))),
            ("bodySHA256", Ok(Some(""))),
            ("bodySHA256=a=b", Ok(Some("a=b"))),
            // Raw value, not decoded.
            ("bodySHA256=ab%63", Ok(Some("ab%63"))),
            // Name is exact: no prefix/suffix/case variants, no decoding.
            ("xbodySHA256=abc", Ok(None)),
            ("bodySHA2567=abc", Ok(None)),
            ("bodysha256=abc", Ok(None)),
            ("body%53HA256=abc", Ok(None)),
            ("foo=bodySHA256", Ok(None)),
            // Duplicates: same or different values, with or without '='.
            ("bodySHA256=abc&bodySHA256=abc", Err(Dup)),
            ("bodySHA256=abc&x=1&bodySHA256=def", Err(Dup)),
            ("bodySHA256&bodySHA256=abc", Err(Dup)),
        ];
        for (query, expected) in cases {
            assert_eq!(&body_sha256_param(query), expected, "{query:?}");
        }
    }

    #[test]
    fn body_hash_table() {
        let upper = JSON_HEX.to_ascii_uppercase();
        let cases: &[(&[u8], &str, bool)] = &[
            (JSON_BODY, JSON_HEX, true),
            // Case-sensitive, like every SDK.
            (JSON_BODY, &upper, false),
            (JSON_BODY, &JSON_HEX[..63], false),
            (JSON_BODY, &format!("{JSON_HEX}0"), false),
            (JSON_BODY, "", false),
            (JSON_BODY, "WRONG_HASH", false),
            (
                b"{\"property\": \"value\", \"boolean\": false}",
                JSON_HEX,
                false,
            ),
            (
                b"",
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                true,
            ),
            (
                b"{}",
                "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
                true,
            ),
        ];
        for (body, hex, expected) in cases {
            assert_eq!(body_hash_matches(body, hex), *expected, "{hex}");
        }
    }

    #[test]
    fn body_scheme_signs_url_with_empty_params() {
        // twilio-python test_request_validator.py: validate(url_with_hash, body, sig).
        let url = format!("{URL}&bodySHA256={JSON_HEX}");
        let v = token_only();
        let none: [(&str, &str); 0] = [];
        assert_eq!(
            v.verify(&url, &none, &signed("a9nBmqA0ju/hNViExpshrM61xv4=")),
            Ok(KeyUsed::Primary)
        );
        let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
        assert_eq!(body_sha256_param(query), Ok(Some(JSON_HEX)));
        assert!(body_hash_matches(JSON_BODY, JSON_HEX));
    }

    // ---- errors and redaction ---------------------------------------------

    const ALL_ERRORS: [SignatureError; 9] = SignatureError::ALL;

    #[test]
    fn reasons_are_the_contract_labels() {
        let got: Vec<&str> = ALL_ERRORS.iter().map(SignatureError::reason).collect();
        assert_eq!(
            got,
            [
                "missing",
                "duplicate",
                "malformed",
                "mismatch",
                "unknown_key_id",
                "unknown_algorithm",
                "malformed_settings",
                "duplicate_body_hash",
                "body_hash_mismatch"
            ]
        );
    }

    #[test]
    fn errors_reveal_no_secret_or_signature() {
        // Errors produced from requests built around canaries carry none of
        // them (SignatureError has no fields; this guards against adding one).
        let v = with_shared_key();
        let expected = v.sign(URL, &PARAMS);
        let near_miss = "rSOYDt4T1cUTdK1PDd93/VVr8B8=";
        let settings = |s: &str, sig: &str| shared_signed(s, sig);
        let requests = [
            HeaderMap::new(),
            headers(&[
                ("X-Twilio-Signature", near_miss.as_bytes()),
                ("X-Twilio-Signature", expected.as_bytes()),
            ]),
            signed(&format!("{expected},{near_miss}")),
            signed(near_miss),
            settings("key=someone_elses_key,algorithm=HMAC_SHA256", near_miss),
            settings("key=webhooks_sharedkey_1,algorithm=HMAC_CANARY", near_miss),
            settings("key=webhooks_sharedkey_1,canary=1", near_miss),
        ];
        let mut produced: Vec<SignatureError> = requests
            .iter()
            .filter_map(|h| v.verify(URL, &PARAMS, h).err())
            .collect();
        produced.extend(body_sha256_param("bodySHA256=c0ffee&bodySHA256=canary").err());
        produced.extend(ALL_ERRORS);
        let canaries = [
            "primary-token",
            "secondary-token",
            SHARED_SECRET,
            expected.as_str(),
            near_miss,
            "someone_elses_key",
            "CANARY",
            "canary",
            "c0ffee",
            "1234",
        ];
        for error in &produced {
            let text = format!("{error} {error:?} {}", error.reason());
            for canary in canaries {
                assert!(!text.contains(canary), "{error:?} mentions {canary:?}");
            }
        }
        assert_eq!(
            produced.len(),
            8 + ALL_ERRORS.len(),
            "every request produced an error"
        );
    }

    #[test]
    fn debug_redacts_secrets() {
        let v = with_shared_key();
        let text = format!("{v:?} {:?}", SigningKey::new(&secret(SHARED_SECRET)));
        for canary in ["primary-token", "secondary-token", SHARED_SECRET] {
            assert!(!text.contains(canary), "{text}");
        }
        assert!(text.contains(REDACTED));
        assert_eq!(format!("{:?}", SigningKey::new(&secret("x"))), REDACTED);
    }

    // ---- no panics on any input ------------------------------------------

    proptest! {
        #[test]
        fn url_candidates_never_panic_and_start_with_input(url in ".{0,64}") {
            let got = url_candidates(&url);
            prop_assert!(!got.is_empty() && got.len() <= 2);
            prop_assert_eq!(got[0].as_ref(), url.as_str());
            if let Some(other) = got.get(1) {
                prop_assert_ne!(other.as_ref(), url.as_str());
            }
        }

        #[test]
        fn candidates_of_real_urls_toggle_only_the_port(
            scheme in "(https?|HTTPS|wss)",
            userinfo in "([a-z]{1,5}(:[a-z]{1,5})?@)?",
            host in "([a-z0-9.-]{1,12}|\\[[0-9a-f:]{2,12}\\])",
            port in "(:[0-9]{1,5})?",
            rest in "(/[a-zA-Z0-9%:@/._~+-]{0,16})?(\\?[a-zA-Z0-9%:@/=&+']{0,16})?",
        ) {
            let url = format!("{scheme}://{userinfo}{host}{port}{rest}");
            let without = format!("{scheme}://{userinfo}{host}{rest}");
            let default = if scheme.eq_ignore_ascii_case("https") { ":443" } else { ":80" };
            let expected = if port.is_empty() {
                format!("{scheme}://{userinfo}{host}{default}{rest}")
            } else {
                without
            };
            let got = url_candidates(&url);
            prop_assert_eq!(got.len(), 2);
            prop_assert_eq!(got[1].as_ref(), expected.as_str());
        }

        #[test]
        fn verify_never_panics(
            url in ".{0,48}",
            signature in proptest::collection::vec(any::<u8>(), 0..64),
            settings in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
            params in proptest::collection::vec((".{0,8}", ".{0,8}"), 0..4),
        ) {
            let mut h = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_bytes(&signature) {
                h.insert(SIGNATURE_HEADER, value);
            }
            if let Some(Ok(value)) = settings.map(|s| HeaderValue::from_bytes(&s)) {
                h.insert(SETTINGS_HEADER, value);
            }
            let _ = with_shared_key().verify(&url, &params, &h);
        }

        #[test]
        fn parsers_never_panic(value in proptest::collection::vec(any::<u8>(), 0..64), query in ".{0,64}") {
            let _ = parse_settings_header(&value);
            let _ = body_sha256_param(&query);
            let _ = body_hash_matches(&value, &query);
        }

        #[test]
        fn verify_accepts_what_sign_produces(
            path in "/[a-zA-Z0-9%'+/._~-]{0,16}",
            params in proptest::collection::vec(("[A-Za-z]{1,6}", ".{0,8}"), 0..6),
        ) {
            let v = token_only();
            let url = format!("https://h.example{path}");
            let sig = v.sign(&url, &params);
            prop_assert_eq!(v.verify(&url, &params, &signed(&sig)), Ok(KeyUsed::Primary));
            // Reordering the parameters does not change the signature.
            let mut reversed = params.clone();
            reversed.reverse();
            prop_assert_eq!(v.sign(&url, &reversed), sig);
        }

        #[test]
        fn sign_after_equals_sign_whatever_changed(
            params in proptest::collection::vec(("[A-Da-d]{1,3}", "[a-z0-9]{0,300}"), 0..12),
            repeated in 0usize..4,
            edits in proptest::collection::vec((0usize..12, "[a-z0-9]{0,80}"), 0..3),
            other_url in proptest::bool::ANY,
            dedup in proptest::bool::ANY,
        ) {
            // Some pairs sent twice, which count once.
            let mut params = params;
            params.extend(params.iter().take(repeated).cloned().collect::<Vec<_>>());
            // Pairs in signing order, or only sorted (equal neighbours are
            // skipped when hashed): the pipeline passes the latter.
            fn in_order(params: &[(String, String)], dedup: bool) -> Vec<Pair<'_>> {
                let mut pairs: Vec<Pair<'_>> =
                    params.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                pairs.sort_unstable();
                if dedup {
                    pairs.dedup();
                }
                pairs
            }
            let v = token_only();
            let url = "https://h.example/ivr?step=1";
            // Names starting with `B` or `c` stand for the sensitive ones.
            let may_change = |name: &str| name.starts_with(['B', 'c']);
            let verified = v
                .verify_resumable(url, &in_order(&params, dedup), &signed(&v.sign(url, &params)), may_change)
                .expect("what sign produced verifies");
            prop_assert_eq!(verified.key, KeyUsed::Primary);
            // What the pipeline does: values of those names replaced
            // (ciphertext, which may make duplicates distinct or distinct
            // values equal), and sometimes the URL changed (query rewritten).
            let mut changed = params.clone();
            for (index, value) in &edits {
                if let Some(pair) = changed.get_mut(*index).filter(|pair| may_change(&pair.0)) {
                    pair.1 = value.clone();
                }
            }
            let new_url = if other_url { "https://h.example/ivr?step=2" } else { url };
            prop_assert_eq!(
                v.sign_after(&verified, new_url, &in_order(&changed, dedup)),
                v.sign(new_url, &changed)
            );
        }
    }

    #[test]
    fn with_an_app_token_forwarded_requests_are_signed_with_it_and_it_verifies_nothing() {
        let primary = secret("primary-token");
        let v = Verifier::new(&primary, None, &[]).signing_for_app_with(Some(&secret(TOKEN)));
        let pairs = sorted_pairs(&PARAMS);
        let by_primary = compute(
            &SigningKey::new(&primary),
            Algorithm::HmacSha1,
            URL,
            &PARAMS,
        );
        let verified = v
            .verify_resumable(URL, &pairs, &signed(&by_primary), |_| true)
            .expect("Twilio's token verifies");
        assert_eq!(verified.key, KeyUsed::Primary);
        assert!(
            verified.resume.is_none(),
            "no state of the primary to resume"
        );
        // Twilio's SDK fixture: "12345" over URL and PARAMS is SIG.
        assert_eq!(v.sign_after(&verified, URL, &pairs), SIG);
        assert_eq!(
            v.verify_resumable(URL, &pairs, &signed(SIG), |_| true)
                .map(|v| v.key),
            Err(SignatureError::Mismatch),
            "a request signed with the app's token is refused"
        );
        // A state another verifier kept with the primary is not resumed.
        let plain = Verifier::new(&primary, None, &[]);
        let kept = plain
            .verify_resumable(URL, &pairs, &signed(&by_primary), |_| true)
            .expect("verifies");
        assert!(kept.resume.is_some());
        assert_eq!(v.sign_after(&kept, URL, &pairs), SIG);
        // `ivrguard sign` signs as Twilio does, with the primary.
        assert_eq!(v.sign(URL, &PARAMS), by_primary);
        let shown = format!("{v:?}");
        assert!(
            !shown.contains(TOKEN) && shown.contains("app_token: Some"),
            "{shown}"
        );
    }

    #[test]
    fn verify_keeps_resumable_state_only_for_the_primary_over_the_url_as_given() {
        let v = with_shared_key();
        let primary = secret("primary-token");
        let sign_with = |token: &Secret, url: &str| {
            compute(&SigningKey::new(token), Algorithm::HmacSha1, url, &PARAMS)
        };
        let by_primary = v
            .verify_resumable(
                URL,
                &sorted_pairs(&PARAMS),
                &signed(&sign_with(&primary, URL)),
                |_| true,
            )
            .unwrap();
        assert!(by_primary.resume.is_some());
        let port_url = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        let by_port_variant = v
            .verify_resumable(
                URL,
                &sorted_pairs(&PARAMS),
                &signed(&sign_with(&primary, port_url)),
                |_| true,
            )
            .unwrap();
        assert_eq!(by_port_variant.key, KeyUsed::Primary);
        assert!(by_port_variant.resume.is_none());
        let secondary = secret("secondary-token");
        let by_secondary = v
            .verify_resumable(
                URL,
                &sorted_pairs(&PARAMS),
                &signed(&sign_with(&secondary, URL)),
                |_| true,
            )
            .unwrap();
        assert_eq!(by_secondary.key, KeyUsed::Secondary);
        assert!(by_secondary.resume.is_none());
        // Without an app token, re-signing uses the primary token, resumable
        // or not.
        for verified in [&by_primary, &by_port_variant, &by_secondary] {
            assert_eq!(
                v.sign_after(verified, URL, &sorted_pairs(&PARAMS)),
                sign_with(&primary, URL)
            );
        }
        let shown = format!("{by_primary:?}");
        assert!(!shown.contains("primary-token") && shown.contains("resumable: true"));
    }
}
