//! Twilio-signed webhook requests to the proxy under test, signed with the
//! independent signer in [`super::twilio`] for the URL Twilio would call
//! ([`super::proxy::Proxy::public`]).

use super::client::RawRequest;
use super::proxy::{Proxy, HOST};
use super::twilio::{form_decode, signature};

pub const FORM: &str = "application/x-www-form-urlencoded";

/// Twilio's signature for a form POST to `path_and_query` with `body`.
pub fn sign_form(token: &str, path_and_query: &str, body: &str) -> String {
    signature(token, &Proxy::public(path_and_query), &form_decode(body))
}

/// Twilio's signature for a request whose parameters are all in the URL
/// (GET webhooks, and `bodySHA256` JSON bodies).
pub fn sign_url(token: &str, path_and_query: &str) -> String {
    signature(token, &Proxy::public(path_and_query), &[])
}

/// A form POST, with `X-Twilio-Signature` when `signature` is given.
pub fn form_post(path_and_query: &str, body: &str, signature: Option<&str>) -> RawRequest {
    let request = RawRequest::new("POST", path_and_query, HOST).header("Content-Type", FORM);
    match signature {
        Some(sig) => request.header("X-Twilio-Signature", sig),
        None => request,
    }
    .body(body)
}

/// A form POST signed as Twilio signs it.
pub fn signed_post(token: &str, path_and_query: &str, body: &str) -> RawRequest {
    form_post(
        path_and_query,
        body,
        Some(&sign_form(token, path_and_query, body)),
    )
}

/// A GET signed as Twilio signs it.
pub fn signed_get(token: &str, path_and_query: &str) -> RawRequest {
    RawRequest::new("GET", path_and_query, HOST)
        .header("X-Twilio-Signature", sign_url(token, path_and_query))
}
