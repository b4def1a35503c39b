//! What Twilio and the application do, written independently of ivrguard:
//! the `X-Twilio-Signature` algorithm (HMAC-SHA1 over the URL and the sorted
//! parameters), `application/x-www-form-urlencoded` encoding and decoding,
//! the `bodySHA256` hash, and AES-256-GCM decryption of the wire format
//! `hex(nonce(12) ‖ ciphertext ‖ tag(16))`.
//!
//! None of this calls into the `ivrguard` crate, so a bug shared between
//! ivrguard's signer or cipher and these tests cannot hide itself.

use aes_gcm::aead::Aead;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// base64(HMAC-SHA1(token, url + name₁value₁ + …)) with the parameters
/// sorted by name, then value; a repeated (name, value) pair counts once.
pub fn signature(token: &str, url: &str, params: &[(String, String)]) -> String {
    let mac = <Hmac<Sha1> as Mac>::new_from_slice(token.as_bytes()).expect("any key length");
    let tag = mac.chain_update(string_to_sign(url, params)).finalize();
    STANDARD.encode(tag.into_bytes())
}

/// The same string signed with HMAC-SHA256 (shared-key signing with
/// `algorithm=HMAC_SHA256`).
pub fn signature_sha256(secret: &str, url: &str, params: &[(String, String)]) -> String {
    let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("any key length");
    let tag = mac.chain_update(string_to_sign(url, params)).finalize();
    STANDARD.encode(tag.into_bytes())
}

fn string_to_sign(url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<(&str, &str)> = params
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut data = url.to_owned();
    for (name, value) in sorted {
        data.push_str(name);
        data.push_str(value);
    }
    data
}

/// Percent-encodes one name or value the way HTML forms do: unreserved
/// bytes kept, space as `+`, everything else `%XX` (upper case).
pub fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Like [`form_encode`] but with space as `%20` (URL-style).
pub fn url_encode(text: &str) -> String {
    form_encode(text).replace('+', "%20")
}

/// Joins already-encoded `(name, value)` pieces into a body or query.
pub fn join_raw(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Decodes a urlencoded body or query into `(name, value)` pairs, in order.
/// Panics on input that is not valid encoding: the tests only decode what
/// they built or what ivrguard forwarded, and both must be valid.
pub fn form_decode(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("escape is ASCII");
                out.push(u8::from_str_radix(hex, 16).expect("escape is hex"));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).expect("decoded form is UTF-8")
}

/// Lowercase hex SHA-256, as Twilio puts in `bodySHA256`.
pub fn sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Decrypts one field value in ivrguard's wire format with the `aes-gcm`
/// crate directly. Panics (naming the problem) if it is not lowercase hex of
/// nonce ‖ ciphertext ‖ tag under `key`.
pub fn decrypt_field(key: &[u8; 32], text: &str) -> Vec<u8> {
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "ciphertext is not lowercase hex: {text:?}"
    );
    let bytes = hex::decode(text).expect("ciphertext is hex");
    assert!(
        bytes.len() >= 12 + 16,
        "ciphertext shorter than nonce + tag: {} bytes",
        bytes.len()
    );
    let (nonce, sealed) = bytes.split_at(12);
    Aes256Gcm::new_from_slice(key)
        .expect("32-byte key")
        .decrypt(Nonce::from_slice(nonce), sealed)
        .expect("ciphertext authenticates under the test key")
}
