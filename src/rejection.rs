//! `Rejection`: every way a request can fail, mapped to HTTP in one place.
//!
//! Each variant has a public answer (status and a short body that reveals
//! nothing) and a log reason (a fixed snake_case label). The `match`es below
//! have no `_` arm, so a new variant cannot be added without deciding both.
//! No variant carries request bytes, so neither side can leak them.

use bytes::Bytes;
use http::{header, Response, StatusCode};

use crate::body::{self, ProxyBody};
use crate::form::FormError;
use crate::signature::SignatureError;
use crate::upstream::{Fallback, UpstreamError};

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    #[error("signature verification failed: {0}")]
    Signature(SignatureError),
    #[error("malformed form encoding: {0}")]
    MalformedForm(FormError),
    #[error("request body larger than the configured limit")]
    BodyTooLarge,
    #[error("request body could not be read")]
    BodyRead,
    #[error("content type cannot be inspected for sensitive fields")]
    UnsupportedMediaType,
    #[error("transfer coding other than chunked")]
    UnsupportedTransferCoding,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No `Host` (nor an authority in the target), two, or one that is not
    /// visible ASCII.
    #[error("request has no usable Host")]
    BadHost,
    #[error("absolute-form request target")]
    AbsoluteTarget,
    /// An authority-form (`host:port`) or asterisk-form (`*`) target: no
    /// path to sign or forward.
    #[error("request target is not a path")]
    NotOriginForm,
    /// `Connection` names a header the request is read by
    /// (`Content-Type`, `Content-Length`, `Transfer-Encoding`, `Host`):
    /// stripping it as hop-by-hop would forward a request read otherwise
    /// than it was verified.
    #[error("Connection names an end-to-end header")]
    BadConnectionHeader,
    /// The caller had not sent the whole body by the deadline: not the
    /// app's failure, so not counted as one.
    #[error("request body not received within the request deadline")]
    BodyTimeout,
    #[error("forwarded headers are trusted but missing or ambiguous")]
    BadForwardedHeaders,
    #[error("request did not complete within the request deadline")]
    Deadline,
    #[error("upstream failed: {0}")]
    Upstream(UpstreamError),
}

impl Rejection {
    /// Every reason a request can be refused for (the values of the
    /// `outcome` label besides `forwarded` and `app_refused`), one variant
    /// for each; a test checks each variant of the enum has its reasons here.
    pub fn all() -> impl Iterator<Item = Rejection> {
        let plain = [
            Rejection::MalformedForm(FormError::BadPercentEncoding),
            Rejection::BodyTooLarge,
            Rejection::BodyRead,
            Rejection::UnsupportedMediaType,
            Rejection::UnsupportedTransferCoding,
            Rejection::MethodNotAllowed,
            Rejection::BadHost,
            Rejection::AbsoluteTarget,
            Rejection::NotOriginForm,
            Rejection::BadConnectionHeader,
            Rejection::BodyTimeout,
            Rejection::BadForwardedHeaders,
            Rejection::Deadline,
        ];
        (SignatureError::ALL.into_iter().map(Rejection::Signature))
            .chain(plain)
            .chain(UpstreamError::ALL.into_iter().map(Rejection::Upstream))
    }

    /// The fixed label written to the access log and used as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Signature(e) => e.reason(),
            Rejection::MalformedForm(_) => "malformed_form",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::BodyRead => "body_read_error",
            Rejection::UnsupportedMediaType => "unsupported_media_type",
            Rejection::UnsupportedTransferCoding => "unsupported_transfer_coding",
            Rejection::MethodNotAllowed => "method_not_allowed",
            Rejection::BadHost => "bad_host",
            Rejection::AbsoluteTarget => "absolute_target",
            Rejection::NotOriginForm => "bad_target",
            Rejection::BadConnectionHeader => "bad_connection_header",
            Rejection::BodyTimeout => "body_timeout",
            Rejection::BadForwardedHeaders => "bad_forwarded_headers",
            Rejection::Deadline => "deadline",
            Rejection::Upstream(e) => e.reason(),
        }
    }

    /// The answer the client gets.
    pub fn into_response(self, fallback: &Fallback) -> Response<ProxyBody> {
        let (status, text) = match self {
            Rejection::Signature(_) => (StatusCode::FORBIDDEN, "Forbidden\n"),
            Rejection::MalformedForm(_) => (StatusCode::BAD_REQUEST, "Bad Request\n"),
            Rejection::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large\n"),
            Rejection::BodyRead => (StatusCode::BAD_REQUEST, "Bad Request\n"),
            Rejection::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported Media Type\n",
            ),
            Rejection::UnsupportedTransferCoding => {
                (StatusCode::NOT_IMPLEMENTED, "Not Implemented\n")
            }
            Rejection::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n"),
            Rejection::BadHost => (StatusCode::BAD_REQUEST, "Bad Request\n"),
            Rejection::AbsoluteTarget
            | Rejection::NotOriginForm
            | Rejection::BadConnectionHeader => (StatusCode::BAD_REQUEST, "Bad Request\n"),
            // Like the app's timeout, the caller hears the fallback (a
            // Twilio request slowed by the network still gets TwiML in
            // time), but the status, when one is answered, is the
            // caller's: 408, connection closed (RFC 9110 §15.5.9; the rest
            // of the body is not read).
            Rejection::BodyTimeout => {
                let mut response =
                    fallback.twiml_or(StatusCode::REQUEST_TIMEOUT, "Request Timeout\n");
                response.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
                return response;
            }
            Rejection::BadForwardedHeaders => (StatusCode::BAD_REQUEST, "Bad Request\n"),
            // The deadline and upstream failures are the caller's problem only
            // in that they hear the fallback; Twilio gets an answer in time.
            Rejection::Deadline => return fallback.response(UpstreamError::Timeout),
            Rejection::Upstream(e) => return fallback.response(e),
        };
        plain(status, text)
    }
}

/// A short `text/plain` response.
pub fn plain(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which variant `r` is: a `match` without a `_` arm, so a new variant
    /// must be named here, and [`VARIANTS`] raised with it.
    fn variant(r: &Rejection) -> usize {
        match r {
            Rejection::Signature(_) => 0,
            Rejection::MalformedForm(_) => 1,
            Rejection::BodyTooLarge => 2,
            Rejection::BodyRead => 3,
            Rejection::UnsupportedMediaType => 4,
            Rejection::UnsupportedTransferCoding => 5,
            Rejection::MethodNotAllowed => 6,
            Rejection::BadHost => 7,
            Rejection::AbsoluteTarget => 8,
            Rejection::NotOriginForm => 9,
            Rejection::BadConnectionHeader => 10,
            Rejection::BodyTimeout => 11,
            Rejection::BadForwardedHeaders => 12,
            Rejection::Deadline => 13,
            Rejection::Upstream(_) => 14,
        }
    }
    const VARIANTS: usize = 15;

    /// `all` (the metric's label values, created at zero) names every
    /// variant, and no reason twice.
    #[test]
    fn all_has_every_variant_and_each_reason_once() {
        let variants: std::collections::HashSet<usize> =
            Rejection::all().map(|r| variant(&r)).collect();
        assert_eq!(variants.len(), VARIANTS);
        let reasons: Vec<&str> = Rejection::all().map(|r| r.reason()).collect();
        let distinct: std::collections::HashSet<&str> = reasons.iter().copied().collect();
        assert_eq!(distinct.len(), reasons.len(), "{reasons:?}");
        assert_eq!(
            reasons.len(),
            SignatureError::ALL.len() + 13 + UpstreamError::ALL.len()
        );
    }
}
