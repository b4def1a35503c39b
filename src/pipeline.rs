//! One request, top to bottom.
//!
//! ```text
//! receive ─▶ verify ─▶ rewrite ─▶ re-sign ─▶ forward ─▶ log
//! ```
//!
//! 1. **receive**: check the request head, read the body under the size
//!    limit, decide how it is signed (form, JSON with `bodySHA256`, none).
//! 2. **verify**: rebuild the URL Twilio called and check
//!    `X-Twilio-Signature` (see [`crate::signature`]).
//! 3. **rewrite**: encrypt every configured field in the query and the form
//!    body; every other byte stays as received (see [`crate::form`]).
//! 4. **re-sign**: a fresh signature over the rewritten request, so an app
//!    that validates Twilio signatures keeps working unchanged.
//! 5. **forward**: send it to the app; on failure, the fallback.
//! 6. **log**: one redacted access line ([`crate::access_log`]).
//!
//! Every stage returns `Result<_, Rejection>`; [`Rejection::into_response`]
//! is the only place a failure becomes HTTP. Nothing reaches the app unless
//! every stage before `forward` succeeded.

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::access_log::{AccessRecord, CallSid, SignatureOutcome};
use crate::body::{self, ProxyBody};
use crate::cipher::FieldCipher;
use crate::config::Settings;
use crate::form::{self, FieldSet, FormPair};
use crate::json_body;
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;
use crate::mismatch;
use crate::rejection::Rejection;
use crate::signature::{self, SignatureError, Verifier};
use crate::upstream::{self, Fallback, Upstream};

/// Everything a request needs, built once from the validated settings: HMAC
/// keys and the AES key schedule are prepared here, not per request.
pub struct Proxy {
    verifier: Verifier,
    cipher: Arc<FieldCipher>,
    fields: FieldSet,
    /// Shared with the proxy a reload replaces when `[upstream]` is the
    /// same: its pools and its `max_connections` slots carry on.
    upstream: Arc<Upstream>,
    fallback: Fallback,
    origin: OriginRule,
    max_body_bytes: usize,
    request_timeout: Duration,
    rewrite_host: bool,
    metrics: Arc<Metrics>,
    /// The listener's TLS (`server.tls_*_file`), here so that a reload
    /// swaps the certificate with everything else.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Where the scheme and host of the signed URL come from.
#[derive(Debug, Clone)]
enum OriginRule {
    /// `twilio.public_url`: `scheme://host[:port]` as Twilio calls it.
    /// Built once, header values included.
    Fixed(Origin),
    /// `X-Forwarded-Proto`/`X-Forwarded-Host` from a trusted proxy; without
    /// `X-Forwarded-Proto`, the connection's scheme.
    Forwarded(&'static str),
    /// The connection (`"http"`, or `"https"` on the TLS listener) and the
    /// `Host` header.
    Direct(&'static str),
}

impl Proxy {
    pub fn new(settings: &Settings, cipher: Arc<FieldCipher>, metrics: Arc<Metrics>) -> Self {
        let twilio = &settings.twilio;
        let origin = match &twilio.public_url {
            Some(url) => OriginRule::Fixed(Origin::new(&url.scheme, url.host_port.clone())),
            None => {
                let scheme = match settings.server.tls {
                    Some(_) => "https",
                    None => "http",
                };
                match settings.server.trust_forwarded_headers {
                    true => OriginRule::Forwarded(scheme),
                    false => OriginRule::Direct(scheme),
                }
            }
        };
        Proxy {
            verifier: Verifier::new(
                &twilio.auth_token,
                twilio.secondary_auth_token.as_ref(),
                &twilio.shared_keys,
            )
            .signing_for_app_with(settings.upstream.auth_token.as_ref()),
            cipher,
            fields: FieldSet::new(settings.encryption.fields.iter().cloned()),
            upstream: Arc::new(Upstream::new(&settings.upstream, settings.server.workers)),
            fallback: Fallback::new(
                settings.upstream.on_error,
                &settings.upstream.fallback_twiml,
            ),
            origin,
            max_body_bytes: settings.server.max_body_bytes,
            request_timeout: settings.server.request_timeout,
            rewrite_host: settings.upstream.rewrite_host,
            metrics,
            tls: settings
                .server
                .tls
                .as_ref()
                .map(|tls| tls.config.clone().into()),
        }
    }

    /// Takes over `previous`'s connections to the app: its pools, and the
    /// slots that bound them to `upstream.max_connections` (a reload that
    /// started new ones let the app see the cap once more per reload).
    pub fn keep_upstream_of(&mut self, previous: &Proxy) {
        self.upstream = previous.upstream.clone();
    }

    /// `server.request_timeout_ms`, as loaded.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub fn cipher(&self) -> &FieldCipher {
        &self.cipher
    }

    pub fn cipher_arc(&self) -> Arc<FieldCipher> {
        self.cipher.clone()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Connections open to the app now, across the workers' pools.
    pub fn upstream_connections_open(&self) -> usize {
        self.upstream.connections_open()
    }

    pub fn metrics_arc(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The TLS listener's acceptor, with the current certificate.
    pub fn tls(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        self.tls.as_ref()
    }

    /// The whole request path. Never fails: every outcome is a response.
    ///
    /// The request head is boxed before anything awaits. An `async fn`
    /// keeps each argument twice (as received and as its own local), and a
    /// local it borrows stays in its state across every later `.await`; at
    /// 224 bytes a head, that was 1.6 KiB of the 2.8 KiB each request in
    /// flight held (`-Zprint-type-sizes`). Boxed, each copy is a pointer.
    pub fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        let (parts, body) = request.into_parts();
        self.respond(Box::new(parts), body, peer)
    }

    async fn respond(
        self: Arc<Self>,
        parts: Box<Parts>,
        body: Incoming,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let deadline = Instant::now() + self.request_timeout;
        let mut log = AccessRecord::start(&parts, peer, &self.fields, std::time::Instant::now());
        // Declared after `log`, so dropped before it: an unanswered request
        // is counted before its access line is written.
        let unanswered = Unanswered(Some(self.metrics()));

        let result = tokio::time::timeout_at(
            deadline,
            self.process(parts, body, peer, deadline, &mut log),
        )
        .await
        .unwrap_or(Err(Rejection::Deadline));

        let answer = result.map_err(|rejection| {
            self.count_rejection(&rejection, &mut log);
            rejection.into_response(&self.fallback)
        });
        let status = match &answer {
            Ok((response, _)) => response.status(),
            Err(response) => response.status(),
        };
        let latency = log.started().elapsed();
        let outcome = match (log.reason, log.app_refused) {
            (Some(reason), _) => reason,
            (None, true) => crate::metrics::APP_REFUSED,
            (None, false) => crate::metrics::FORWARDED,
        };
        self.metrics.request(outcome, latency.as_secs_f64());
        unanswered.answered();
        log.emit(status.as_u16(), latency);
        match answer {
            Err(response) => response,
            // The app's connection stays busy (and its slot taken) until
            // the body has been read. The body holds this request's handle
            // on the proxy (no other), to say if it breaks off.
            Ok((response, in_flight)) => {
                let call_sid = log.call_sid();
                let failed = move |why| self.response_body_failed(why, call_sid);
                response.map(|app| body::with_deadline(app, deadline, in_flight, failed))
            }
        }
    }

    /// The app's body failed after its head and the access line went out
    /// (`why`: `broken`, `deadline`): the caller got a response cut short,
    /// which Twilio plays as an application error. Found in review: this
    /// was logged and counted as a success.
    fn response_body_failed(&self, why: &'static str, call_sid: Option<CallSid>) {
        self.metrics.upstream_error(crate::metrics::RESPONSE_BODY);
        static BROKEN: LogLimit = LogLimit::new(mismatch::EVERY);
        if BROKEN.due() {
            tracing::warn!(
                reason = why,
                call_sid = call_sid.as_ref().map(CallSid::as_str),
                "the app's response broke off after its head was forwarded: the caller got it \
                 cut short (its access line shows the status only). At most one such line per \
                 10 s; each is counted in upstream_errors_total{{kind=\"response_body\"}}"
            );
        }
    }

    async fn process(
        &self,
        parts: Box<Parts>,
        body: Incoming,
        peer: SocketAddr,
        deadline: Instant,
        log: &mut AccessRecord,
    ) -> Result<(Response<Incoming>, upstream::InFlight), Rejection> {
        // 1. receive
        check_head(&parts)?;
        // What the signature headers alone say, before the body is read:
        // a request without a usable signature costs no more.
        if let Err(e) = self.verifier.check_headers(&parts.headers) {
            log.signature = SignatureOutcome::Invalid(e.reason());
            return Err(Rejection::Signature(e));
        }
        // The same deadline, but the caller's: a body still not in by then
        // is `body_timeout` (the fallback, or 408), not an app failure
        // (found in review: it was logged and counted as the app's
        // timeout, a 504, though the app was never asked).
        let body = tokio::time::timeout_at(deadline, read_body(body, &parts, self.max_body_bytes))
            .await
            .map_err(|_| Rejection::BodyTimeout)??;

        // 2.–4. verify, rewrite, re-sign
        let request = self.prepare(*parts, body, peer, log)?;

        // 5. forward
        let (mut response, in_flight) = self
            .upstream
            .send(request)
            .await
            .map_err(Rejection::Upstream)?;
        if response.status().is_informational() || response.status().as_u16() > 599 {
            // hyper hands over only a `101`, and ivrguard asked for no
            // upgrade (it strips `Upgrade`); a status past 599 has no
            // meaning (RFC 9110 §15): either way the app broke the protocol.
            return Err(Rejection::Upstream(upstream::UpstreamError::Failed));
        }
        log.upstream_status = Some(response.status().as_u16());
        self.metrics.upstream_response(response.status().as_u16());
        if matches!(response.status().as_u16(), 401 | 403) {
            // The request was Twilio's and was re-signed: the app refusing it
            // is a configuration mismatch between ivrguard and the app.
            log.app_refused = true;
            // Every request is refused until the configuration is fixed:
            // one line per interval, the rest counted in the metrics
            // (`outcome="app_refused"`).
            static APP_REFUSED: LogLimit = LogLimit::new(mismatch::EVERY);
            if APP_REFUSED.due() {
                tracing::warn!(
                    status = response.status().as_u16(),
                    "the app refused a request ivrguard verified and re-signed: the app must \
                     validate with the token ivrguard signs with (upstream.auth_token_env/_file, \
                     or without it the primary twilio.auth_token_env/_file) and \
                     rebuild the URL ivrguard signed (X-Forwarded-Proto + X-Forwarded-Host + path; \
                     see upstream.rewrite_host). At most one such line per 10 s; each request \
                     has its access line (upstream_status)"
                );
            }
        }
        // Framed anew for the caller: hyper writes our HTTP version and the
        // length of the body as it was decoded (found in review: an app's
        // `HTTP/1.0` status line reached HTTP/1.1 callers).
        *response.version_mut() = http::Version::HTTP_11;
        let no_content = response.status() == 204;
        let headers = response.headers_mut();
        if headers.contains_key(header::TRANSFER_ENCODING) || no_content {
            // RFC 9112 §6.3: with both, Transfer-Encoding framed the body
            // and a proxy removes Content-Length; a 204 has none. The app's
            // `Content-Length: 3` on a chunked body cut the caller's TwiML
            // to 3 bytes (found in review).
            headers.remove(header::CONTENT_LENGTH);
        }
        // The app's hop-by-hop headers describe its connection to us, not ours to Twilio.
        upstream::strip_hop_by_hop(response.headers_mut());
        Ok((response, in_flight))
    }

    /// Stages 2–4 on a received request: verify, rewrite, re-sign, and the
    /// request to forward. Pure CPU work, no I/O (`benches/pipeline.rs`
    /// measures it on its own).
    pub fn prepare(
        &self,
        parts: Parts,
        body: Bytes,
        peer: SocketAddr,
        log: &mut AccessRecord,
    ) -> Result<Request<Full<Bytes>>, Rejection> {
        let signed = SignedContent::classify(&parts, &body)?;

        // 2. verify
        let origin = self.origin(&parts)?;
        let request_target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let url = [origin.origin.as_str(), request_target].concat();
        // Decoded copies of escaped non-sensitive values.
        let (mut body_arena, mut query_arena) = (form::Arena::default(), form::Arena::default());
        let mut body_pairs = match signed {
            SignedContent::Form => form::parse_in(&body, &mut body_arena, &self.fields)
                .map_err(Rejection::MalformedForm)?,
            SignedContent::None | SignedContent::BodyHash => Vec::new(),
        };
        let mut query_pairs = match parts.uri.query() {
            Some(q) => form::parse_in(q.as_bytes(), &mut query_arena, &self.fields)
                .map_err(Rejection::MalformedForm)?,
            None => Vec::new(),
        };
        // Sorted where they are: the verifier reads them in place.
        sort_for_signing(&mut body_pairs);
        let verified = self.verify(&url, &parts, &body, &body_pairs, signed);
        if matches!(verified, Err(SignatureError::Mismatch)) && mismatch::due() {
            mismatch::explain(&self.origin_offered(&parts, &origin), |origin| {
                let url = [origin, request_target].concat();
                self.verify(&url, &parts, &body, &body_pairs, signed)
                    .is_ok()
            });
        }
        log.signature = match &verified {
            Ok(verified) => SignatureOutcome::Valid(verified.key),
            Err(e) => SignatureOutcome::Invalid(e.reason()),
        };
        let verified = verified.map_err(Rejection::Signature)?;
        match verified.key {
            signature::KeyUsed::Primary => {}
            signature::KeyUsed::Secondary => self.metrics.signature_not_primary("secondary"),
            signature::KeyUsed::SharedKey => self.metrics.signature_not_primary("shared_key"),
        }
        if let Some(sid) = find(&body_pairs, "CallSid").or_else(|| find(&query_pairs, "CallSid")) {
            log.set_call_sid(sid);
        }

        // 3. rewrite
        let new_query = parts
            .uri
            .query()
            .and_then(|q| self.encrypt(q.as_bytes(), &mut query_pairs, log))
            .map(|rewritten| rewritten.bytes);
        let mut query: Option<Cow<'_, str>> = match new_query {
            Some(q) => Some(Cow::Owned(
                String::from_utf8(q).expect("a str query with hex spliced in is UTF-8"),
            )),
            None => parts.uri.query().map(Cow::Borrowed),
        };
        let forwarded_body = match signed {
            SignedContent::Form => match self.encrypt(&body, &mut body_pairs, log) {
                Some(rewritten) => {
                    if !still_sorted(&body_pairs, rewritten.encrypted()) {
                        sort_for_signing(&mut body_pairs);
                    }
                    Bytes::from(rewritten.bytes)
                }
                None => body.clone(),
            },
            SignedContent::BodyHash if !body.is_empty() => match self.encrypt_json(&body, log)? {
                Some(json) => {
                    // The app checks `bodySHA256` against what it receives.
                    let hash = hex::encode(Sha256::digest(&json));
                    query = query.map(|q| Cow::Owned(with_body_hash(&q, &hash)));
                    Bytes::from(json)
                }
                None => body.clone(),
            },
            SignedContent::BodyHash | SignedContent::None => body.clone(),
        };
        let path = parts.uri.path();
        let query_unchanged = matches!(query, None | Some(Cow::Borrowed(_)));
        let path_and_query = match query.as_deref() {
            // As received, when that is exactly `path?query`.
            q if query_unchanged && is_target(request_target, path, q) => {
                Cow::Borrowed(request_target)
            }
            Some(q) => Cow::Owned([path, "?", q].concat()),
            None => Cow::Borrowed(path),
        };

        // 4. re-sign
        let signature = if path_and_query == request_target {
            self.verifier.sign_after(&verified, &url, &body_pairs)
        } else {
            let signed_url = [origin.origin.as_str(), &path_and_query].concat();
            self.verifier
                .sign_after(&verified, &signed_url, &body_pairs)
        };

        let uri = match (&path_and_query, parts.uri.path_and_query()) {
            (Cow::Borrowed(target), Some(received)) if *target == received.as_str() => {
                self.upstream.uri_reusing(received)
            }
            _ => self.upstream.uri_for(&path_and_query),
        }
        .map_err(|_| Rejection::Upstream(upstream::UpstreamError::Failed))?;
        // They may borrow `parts`, which moves next.
        drop((path_and_query, query_pairs));
        self.upstream_request(parts, uri, forwarded_body, signature, peer, &origin)
    }

    fn origin(&self, parts: &Parts) -> Result<Cow<'_, Origin>, Rejection> {
        match &self.origin {
            OriginRule::Fixed(origin) => Ok(Cow::Borrowed(origin)),
            OriginRule::Forwarded(scheme) => {
                let proto = single_header(parts, "x-forwarded-proto")?.unwrap_or(scheme);
                if !proto.eq_ignore_ascii_case("http") && !proto.eq_ignore_ascii_case("https") {
                    return Err(Rejection::BadForwardedHeaders);
                }
                let host = match single_header(parts, "x-forwarded-host")? {
                    Some(host) => host.to_owned(),
                    None => request_host(parts)?,
                };
                Ok(Cow::Owned(Origin::new(proto, host)))
            }
            OriginRule::Direct(scheme) => Ok(Cow::Owned(Origin::new(scheme, request_host(parts)?))),
        }
    }

    /// What the request offers to rebuild its URL from, for
    /// [`mismatch::explain`].
    fn origin_offered<'a>(&self, parts: &'a Parts, used: &'a Origin) -> mismatch::Request<'a> {
        let (source, connection_scheme) = match self.origin {
            OriginRule::Fixed(_) => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                (mismatch::Source::PublicUrl, scheme)
            }
            OriginRule::Forwarded(scheme) => (mismatch::Source::Forwarded, scheme),
            OriginRule::Direct(scheme) => (mismatch::Source::Request, scheme),
        };
        let header = |name| single_header(parts, name).ok().flatten();
        mismatch::Request {
            used: &used.origin,
            source,
            connection_scheme,
            host: header("host"),
            forwarded_proto: header("x-forwarded-proto"),
            forwarded_host: header("x-forwarded-host"),
        }
    }

    fn verify<'u>(
        &self,
        url: &'u str,
        parts: &Parts,
        body: &[u8],
        params: &[FormPair<'_>],
        signed: SignedContent,
    ) -> Result<signature::Verified<'u>, signature::SignatureError> {
        // `bodySHA256` is checked whenever present, whatever the content
        // type: after the signature over the URL that carries it.
        let body_hash = signature::body_sha256_param(parts.uri.query().unwrap_or(""))?;
        // Only form bodies contribute parameters; otherwise `params` is empty.
        debug_assert!(signed == SignedContent::Form || params.is_empty());
        let verified = self
            .verifier
            .verify_resumable(url, params, &parts.headers, |name| {
                // Rewrite changes the values of these, nothing else.
                self.fields.contains(name)
            })?;
        match body_hash {
            Some(expected) if !signature::body_hash_matches(body, expected) => {
                Err(signature::SignatureError::BodyHashMismatch)
            }
            _ => Ok(verified),
        }
    }

    /// Encrypts configured fields of one urlencoded string; `None` if none.
    fn encrypt<'a>(
        &self,
        raw: &'a [u8],
        pairs: &mut [FormPair<'a>],
        log: &mut AccessRecord,
    ) -> Option<form::Rewritten> {
        let rewritten = form::rewrite(raw, pairs, &self.fields, |plain, out| {
            self.cipher.encrypt_hex_into(plain, out)
        })?;
        self.metrics.fields_encrypted(rewritten.count());
        for name in rewritten.names(pairs) {
            log.add_encrypted(name);
        }
        Some(rewritten)
    }

    /// Encrypts configured fields inside a `bodySHA256`-signed JSON body. A
    /// body that is not JSON cannot be inspected, so it is refused (415).
    fn encrypt_json(
        &self,
        body: &[u8],
        log: &mut AccessRecord,
    ) -> Result<Option<Vec<u8>>, Rejection> {
        let rewritten =
            json_body::rewrite(body, &self.fields, |plain| self.cipher.encrypt_hex(plain))
                .map_err(|_| Rejection::UnsupportedMediaType)?;
        Ok(rewritten.map(|rw| {
            self.metrics.fields_encrypted(rw.count);
            for name in &rw.fields {
                log.add_encrypted(name);
            }
            rw.bytes
        }))
    }

    fn upstream_request(
        &self,
        parts: Parts,
        uri: http::Uri,
        body: Bytes,
        signature: String,
        peer: SocketAddr,
        origin: &Origin,
    ) -> Result<Request<Full<Bytes>>, Rejection> {
        let mut headers = parts.headers;
        upstream::strip_hop_by_hop(&mut headers);
        if parts.version == http::Version::HTTP_2 {
            upstream::join_cookies(&mut headers);
        }
        headers.remove(signature::SETTINGS_HEADER);
        // hyper answered the caller's `100-continue` when the body was
        // read; the app gets the whole body at once, with nothing to expect.
        headers.remove(header::EXPECT);
        headers.insert(
            signature::SIGNATURE_HEADER,
            HeaderValue::try_from(signature).expect("base64 is a valid header value"),
        );
        // Up to four headers are added below: one allocation, not several.
        headers.reserve(4);
        if !body.is_empty() || headers.contains_key(header::CONTENT_LENGTH) {
            let length = HeaderValue::from_str(itoa::Buffer::new().format(body.len()))
                .expect("digits are a valid header value");
            headers.insert(header::CONTENT_LENGTH, length);
        }
        if self.rewrite_host || !headers.contains_key(header::HOST) {
            // (HTTP/2 carries the host in :authority; the app gets it as
            // Host.) Failing that, the app's own authority: HTTP/1.1 needs one.
            if let Some(v) = origin.host_value.as_ref().or(self.upstream.host()) {
                headers.insert(header::HOST, v.clone());
            }
        }
        let keep_chain = matches!(self.origin, OriginRule::Forwarded(_));
        upstream::set_forwarded(
            &mut headers,
            peer,
            origin.scheme_value.clone(),
            origin.host_value.clone(),
            keep_chain,
        );

        let mut request = Request::new(Full::new(body));
        *request.method_mut() = parts.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }

    fn count_rejection(&self, rejection: &Rejection, log: &mut AccessRecord) {
        log.reason = Some(rejection.reason());
        match rejection {
            Rejection::Signature(e) => self.metrics.signature_failure(e.reason()),
            Rejection::Upstream(e) => app_failed(&self.metrics, e.kind()),
            Rejection::Deadline => app_failed(&self.metrics, crate::metrics::DEADLINE),
            Rejection::MalformedForm(_)
            | Rejection::BodyTooLarge
            | Rejection::BodyRead
            | Rejection::UnsupportedMediaType
            | Rejection::UnsupportedTransferCoding
            | Rejection::MethodNotAllowed
            | Rejection::BadHost
            | Rejection::AbsoluteTarget
            | Rejection::NotOriginForm
            | Rejection::BadConnectionHeader
            | Rejection::BodyTimeout
            | Rejection::BadForwardedHeaders => {}
        }
    }
}

/// Counts a request in `requests_total` if it is dropped before it is
/// answered, as its access line does (`unanswered`, or `panic`).
struct Unanswered<'m>(Option<&'m Metrics>);

impl Unanswered<'_> {
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(metrics) = self.0 {
            metrics.unanswered(std::thread::panicking());
        }
    }
}

/// The app could not be reached or did not answer (`kind`, the metric's
/// label): counted, and logged at WARN at most once per 10 s. Each request
/// has its access line at INFO; with `log.level = "warn"` an outage left no
/// line at all (found in review).
fn app_failed(metrics: &Metrics, kind: &'static str) {
    metrics.upstream_error(kind);
    static FAILED: LogLimit = LogLimit::new(mismatch::EVERY);
    if FAILED.due() {
        tracing::warn!(
            kind,
            "the app did not answer: callers get upstream.on_error's answer (the fallback \
             TwiML, or 502/504). At most one such line per 10 s; each request has its access \
             line, and upstream_errors_total{{kind}} counts them"
        );
    }
}

/// The origin (`scheme://host[:port]`) a request was signed for, and the
/// header values the app is told it by (`X-Forwarded-Proto`/`-Host`, `Host`
/// when rewritten); a value that cannot be a header value is left out.
#[derive(Debug, Clone)]
struct Origin {
    origin: String,
    scheme_value: Option<HeaderValue>,
    host_value: Option<HeaderValue>,
}

impl Origin {
    fn new(scheme: &str, host: String) -> Self {
        let scheme = scheme.to_ascii_lowercase();
        Origin {
            origin: format!("{scheme}://{host}"),
            scheme_value: HeaderValue::try_from(scheme).ok(),
            host_value: HeaderValue::try_from(host).ok(),
        }
    }
}

/// Whether `target` (a request target as received) is exactly `path`
/// followed by `?query`, so it can be forwarded and signed as it is.
fn is_target(target: &str, path: &str, query: Option<&str>) -> bool {
    match query {
        Some(query) => {
            target
                .strip_prefix(path)
                .and_then(|rest| rest.strip_prefix('?'))
                == Some(query)
        }
        None => target == path,
    }
}

/// How the request body is covered by the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignedContent {
    /// `application/x-www-form-urlencoded`: parameters are signed.
    Form,
    /// The URL carries `bodySHA256`: the body is covered by its hash.
    BodyHash,
    /// No body (GET webhooks: everything is in the signed URL).
    None,
}

impl SignedContent {
    /// A body ivrguard cannot inspect for sensitive fields is refused (415)
    /// rather than forwarded with plaintext in it. The app reads a body by
    /// its `Content-Type` and `Content-Encoding`, so ivrguard reads it the
    /// same way or not at all.
    fn classify(parts: &Parts, body: &[u8]) -> Result<Self, Rejection> {
        // Twilio never compresses a webhook; an app that inflates a body
        // would read what ivrguard could not.
        if has_content_coding(parts) {
            return Err(Rejection::UnsupportedMediaType);
        }
        let mut content_types = parts.headers.get_all(header::CONTENT_TYPE).iter();
        let media_type = content_types.next().map(|v| essence(v.as_bytes()));
        if content_types.next().is_some() {
            // Which one the app reads is anyone's guess.
            return Err(Rejection::UnsupportedMediaType);
        }
        // A duplicated `bodySHA256` also lands here; `verify` refuses it.
        let has_body_hash = !matches!(
            signature::body_sha256_param(parts.uri.query().unwrap_or("")),
            Ok(None)
        );
        if has_body_hash {
            // Twilio adds `bodySHA256` to JSON requests only, and only JSON
            // is rewritten under it: a form-typed body signed this way
            // would reach the app's form parser as it was sent.
            return match body.is_empty() || media_type.is_some_and(is_json) {
                true => Ok(SignedContent::BodyHash),
                false => Err(Rejection::UnsupportedMediaType),
            };
        }
        let is_form = media_type
            .is_some_and(|t| t.eq_ignore_ascii_case(b"application/x-www-form-urlencoded"));
        match (is_form, body.is_empty()) {
            (true, _) => Ok(SignedContent::Form),
            (false, true) => Ok(SignedContent::None),
            (false, false) => Err(Rejection::UnsupportedMediaType),
        }
    }
}

/// A media type without its parameters: `application/json` of
/// `application/json; charset=utf-8`.
fn essence(content_type: &[u8]) -> &[u8] {
    let until_parameters = content_type.split(|b| *b == b';').next();
    until_parameters.unwrap_or_default().trim_ascii()
}

/// `application/json` or a structured `application/…+json` type.
fn is_json(media_type: &[u8]) -> bool {
    let lower = media_type.to_ascii_lowercase();
    lower == b"application/json"
        || (lower.starts_with(b"application/") && lower.ends_with(b"+json"))
}

/// Whether `Content-Encoding` names any coding but `identity`.
fn has_content_coding(parts: &Parts) -> bool {
    codings(parts, header::CONTENT_ENCODING).any(|c| !c.eq_ignore_ascii_case(b"identity"))
}

/// The codings a comma-separated header lists, in all its copies.
fn codings(parts: &Parts, name: header::HeaderName) -> impl Iterator<Item = &[u8]> {
    let values = parts.headers.get_all(name).into_iter();
    values
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty())
}

/// Twilio sends GET and POST; nothing else is a webhook. HTTP/1 requests in
/// absolute form (`POST http://host/…`) are refused: their target and `Host`
/// could disagree about which URL was signed.
fn check_head(parts: &Parts) -> Result<(), Rejection> {
    if parts.method != Method::GET && parts.method != Method::POST {
        return Err(Rejection::MethodNotAllowed);
    }
    if parts.version <= http::Version::HTTP_11 && parts.uri.scheme().is_some() {
        return Err(Rejection::AbsoluteTarget);
    }
    // RFC 9112 §3.2: a GET or POST target is a path (origin form). hyper
    // also takes `host:port` (CONNECT's form) and `*` (OPTIONS's), which
    // were signed over `public_url` alone, then failed as an app error
    // (502) or reached the app as `*` (found in review).
    if !parts.uri.path().starts_with('/') {
        return Err(Rejection::NotOriginForm);
    }
    // RFC 9110 §7.6.1: `Connection` lists hop-by-hop headers; one that
    // names a header the request is read by would have it stripped before
    // the app reads the request (found in review: `Connection:
    // Content-Type` sent a verified form without its type).
    if codings(parts, header::CONNECTION).any(|name| {
        END_TO_END
            .iter()
            .any(|end_to_end| name.eq_ignore_ascii_case(end_to_end.as_str().as_bytes()))
    }) {
        return Err(Rejection::BadConnectionHeader);
    }
    // RFC 9112 §6.1: 501 for a transfer coding not understood. hyper takes
    // any list that ends in `chunked` and removes only that one, so a
    // `gzip, chunked` body would be read, and forwarded, still gzipped.
    // Chunked twice is refused too (§7.1: never more than once).
    let mut transfer = codings(parts, header::TRANSFER_ENCODING);
    let chunked_once = transfer
        .next()
        .is_none_or(|c| c.eq_ignore_ascii_case(b"chunked"));
    if !chunked_once || transfer.next().is_some() {
        return Err(Rejection::UnsupportedTransferCoding);
    }
    // RFC 9112 §3.2: 400 for an HTTP/1.1 request without `Host` and for any
    // request with more than one, even when `public_url` makes the signed
    // URL independent of it: the app must not get an ambiguous request.
    // And one that is a host, even when `public_url` is set and it is not
    // read: it reaches the app (found in review: `a b`, `a, b` went
    // through).
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(Rejection::BadHost),
        (None, _) if parts.version == http::Version::HTTP_11 => return Err(Rejection::BadHost),
        (Some(host), None) if host_text(host.as_bytes()).is_none() => {
            return Err(Rejection::BadHost)
        }
        _ => {}
    }
    Ok(())
}

/// The headers a request is read by, which `Connection` must not name.
const END_TO_END: [header::HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::HOST,
];

/// A `Host` value (or an HTTP/2 authority) as text, if it is one host:
/// visible ASCII, trimmed, not empty, no list, no path, no userinfo.
fn host_text(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let usable = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'/' | b'@'));
    usable.then_some(text)
}

/// Reads the whole body, refusing more than `limit` bytes — at once when
/// `Content-Length` already says so.
async fn read_body(body: Incoming, parts: &Parts, limit: usize) -> Result<Bytes, Rejection> {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Rejection::BodyTooLarge);
    }
    body::collect_within(body, limit)
        .await
        .map_err(|e| match e {
            body::CollectError::TooLarge => Rejection::BodyTooLarge,
            body::CollectError::Read => Rejection::BodyRead,
        })
}

/// The `Host` (HTTP/1.1) or `:authority` (HTTP/2) of the request.
fn request_host(parts: &Parts) -> Result<String, Rejection> {
    if let Some(host) = single_header(parts, "host")? {
        return Ok(host.to_owned());
    }
    // HTTP/2 without `Host`: `:authority`, which may carry userinfo or
    // anything `Host` may not (found in review).
    parts
        .uri
        .authority()
        .and_then(|a| host_text(a.as_str().as_bytes()))
        .map(str::to_owned)
        .ok_or(Rejection::BadHost)
}

/// A header that must appear at most once, as visible ASCII.
fn single_header<'a>(parts: &'a Parts, name: &str) -> Result<Option<&'a str>, Rejection> {
    // (A non-ASCII `Host` was logged as bad_forwarded_headers: review.)
    let refused = match name {
        "host" => Rejection::BadHost,
        _ => Rejection::BadForwardedHeaders,
    };
    let mut values = parts.headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(refused);
    }
    host_text(first.as_bytes()).map(Some).ok_or(refused)
}

/// A parsed pair is signed by its decoded name and value.
impl signature::Param for FormPair<'_> {
    fn name(&self) -> &str {
        &self.name
    }

    fn value(&self) -> &str {
        &self.value
    }
}

/// Sorts pairs in the order Twilio signs them: by name, then value (byte
/// order). An equal pair next to another is counted once when hashed, so
/// they need no dedup.
fn sort_for_signing(pairs: &mut [FormPair<'_>]) {
    pairs.sort_unstable_by(|a, b| {
        (a.name.as_ref(), a.value.as_ref()).cmp(&(b.name.as_ref(), b.value.as_ref()))
    });
}

/// Whether pairs sorted for signing still are after the rewrite replaced
/// the values at `changed`. Names did not change, so only a changed pair
/// next to one of the same name can be out of place (or no longer equal to
/// it): then they are sorted again.
fn still_sorted(pairs: &[FormPair<'_>], changed: &[usize]) -> bool {
    changed.iter().all(|&i| {
        let name = pairs.get(i).map(|pair| &pair.name);
        let shares_name = |neighbour: Option<usize>| {
            neighbour
                .and_then(|j| pairs.get(j))
                .is_some_and(|pair| Some(&pair.name) == name)
        };
        !shares_name(i.checked_sub(1)) && !shares_name(i.checked_add(1))
    })
}

/// `query` with the value of `bodySHA256` replaced by `hash`.
fn with_body_hash(query: &str, hash: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((signature::BODY_SHA256_PARAM, _)) => {
                format!("{}={hash}", signature::BODY_SHA256_PARAM)
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn find<'p>(pairs: &'p [FormPair<'_>], name: &str) -> Option<&'p str> {
    pairs
        .iter()
        .find(|p| p.name == name)
        .map(|p| p.value.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request dropped unanswered counts once, under `panic` if a panic
    /// dropped it; an answered one is counted where it was answered.
    #[test]
    fn a_request_dropped_unanswered_is_counted_by_why() {
        let metrics = Metrics::new();
        drop(Unanswered(Some(&metrics)));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _request = Unanswered(Some(&metrics));
            panic!("a handler's bug");
        }));
        assert!(panicked.is_err());
        Unanswered(Some(&metrics)).answered();
        let text = metrics.render(crate::metrics::Sampled::default());
        for series in [
            r#"ivrguard_requests_total{outcome="unanswered"} 1"#,
            r#"ivrguard_requests_total{outcome="panic"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == series), "no {series} in\n{text}");
        }
    }

    fn sorted(input: &[u8]) -> Vec<FormPair<'_>> {
        let mut pairs = form::parse(input).expect("valid form");
        sort_for_signing(&mut pairs);
        pairs
    }

    #[test]
    fn sorts_by_name_then_value_in_byte_order() {
        let pairs = sorted(b"b=1&a=2&B=0&a=1&a=1");
        let order: Vec<(&str, &str)> = pairs
            .iter()
            .map(|p| (p.name.as_ref(), p.value.as_ref()))
            .collect();
        assert_eq!(
            order,
            [("B", "0"), ("a", "1"), ("a", "1"), ("a", "2"), ("b", "1")]
        );
    }

    #[test]
    fn an_http2_authority_is_a_host_only_if_host_may_be_it() {
        let host_of = |uri: &str| {
            let (parts, ()) = http::Request::post(uri)
                .version(http::Version::HTTP_2)
                .body(())
                .unwrap()
                .into_parts();
            request_host(&parts)
        };
        assert_eq!(
            host_of("https://ivr.example.com:8443/x").unwrap(),
            "ivr.example.com:8443"
        );
        // Found in review: userinfo went on as the app's Host and X-Forwarded-Host.
        assert_eq!(
            host_of("https://user@ivr.example.com/x"),
            Err(Rejection::BadHost)
        );
        assert_eq!(
            host_of("/x"),
            Err(Rejection::BadHost),
            "no authority at all"
        );
    }

    #[test]
    fn only_a_changed_pair_beside_its_own_name_needs_sorting_again() {
        // Sorted: A=1, Digits=1, Digits=2, Z=3.
        let pairs = sorted(b"Z=3&Digits=2&A=1&Digits=1");
        assert!(still_sorted(&pairs, &[]));
        assert!(still_sorted(&pairs, &[0, 3]), "names unique at both ends");
        assert!(!still_sorted(&pairs, &[1]), "the next pair shares its name");
        assert!(
            !still_sorted(&pairs, &[2]),
            "the pair before shares its name"
        );
        let pairs = sorted(b"Digits=9&A=1&Z=3");
        assert!(still_sorted(&pairs, &[1]));
    }
}
