//! The optional TLS listener, for deployments without an ingress:
//! certificate chain and private key from PEM files, TLS 1.2 and 1.3 only,
//! ALPN `http/1.1` (and `h2` with `server.http2`), rustls with the `ring`
//! provider.
//!
//! - **Loading** ([`server_config`]) is part of validating the config
//!   (config.rs): a missing, malformed or mismatched certificate or key stops
//!   start-up, or is refused by a reload, with one line naming the key.
//! - **Reloading**: the built `ServerConfig` travels in the proxy snapshot a
//!   reload swaps (reload.rs). Each new connection uses the certificate that
//!   is current when it is accepted; open connections keep theirs.
//! - **Accepting** ([`accept`]): the handshake and the first bytes of HTTP
//!   must arrive within `server.header_read_timeout_ms`, as the first bytes
//!   must on the plain listener, so a silent client cannot hold a connection
//!   slot. A failed handshake is logged at debug level and counted in
//!   `ivrguard_tls_handshake_failures_total{reason}` with a fixed reason,
//!   never rustls's message, which can quote what the peer sent.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::metrics::Metrics;

/// Which of the two files a [`LoadError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemFile {
    /// `server.tls_cert_file`.
    Certificate,
    /// `server.tls_key_file`.
    Key,
}

/// Why the certificate and key cannot be used. The message never quotes
/// the files: the key file is a secret, and a PEM parser's error can hold
/// a piece of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadError {
    NotPem(PemFile),
    NoCertificate,
    NoKey,
    BadCertificate,
    UnusableKey,
    KeyMismatch,
}

impl LoadError {
    /// The file at fault.
    pub fn file(self) -> PemFile {
        match self {
            LoadError::NotPem(file) => file,
            LoadError::NoCertificate | LoadError::BadCertificate => PemFile::Certificate,
            LoadError::NoKey | LoadError::UnusableKey | LoadError::KeyMismatch => PemFile::Key,
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoadError::NotPem(_) => "is not valid PEM (a section is unterminated or its base64 is broken)",
            LoadError::NoCertificate => "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            LoadError::NoKey => "holds no PEM private key (PKCS#8 \"PRIVATE KEY\", PKCS#1 \"RSA PRIVATE KEY\" or SEC1 \"EC PRIVATE KEY\"; encrypted keys are not supported)",
            LoadError::BadCertificate => "starts with a certificate that is not valid X.509",
            LoadError::UnusableKey => "holds a private key rustls cannot use (supported: RSA of 2048 bits or more, ECDSA P-256/P-384, Ed25519)",
            LoadError::KeyMismatch => "does not match the certificate: the first certificate in server.tls_cert_file must be the server's own, issued for this key",
        })
    }
}

/// Builds the TLS server configuration from the PEM texts of the
/// certificate chain (server's certificate first) and the private key.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    http2: bool,
) -> Result<Arc<ServerConfig>, LoadError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| LoadError::NotPem(PemFile::Certificate))?;
    if certs.is_empty() {
        return Err(LoadError::NoCertificate);
    }
    // Other sections (a certificate in the same file) are skipped.
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => LoadError::NoKey,
        _ => LoadError::NotPem(PemFile::Key),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        // Also checks that the key matches the first certificate.
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => LoadError::KeyMismatch,
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                LoadError::BadCertificate
            }
            _ => LoadError::UnusableKey,
        })?;
    // server.rs serves what the client chose; rustls picks the first of
    // these that the client offers. `h2` only when `server.http2` is on.
    config.alpn_protocols = match http2 {
        true => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        false => vec![b"http/1.1".to_vec()],
    };
    Ok(Arc::new(config))
}

/// Why a TLS connection ended before any HTTP: the fixed reasons of the log
/// line and of the metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not finished within `server.header_read_timeout_ms`.
    Timeout,
    /// The client's bytes are not a valid TLS handshake (plain HTTP, say).
    Malformed,
    /// No protocol version, cipher suite or ALPN protocol in common.
    Incompatible,
    /// The client aborted with an alert, e.g. because it does not trust the
    /// certificate.
    PeerAlert,
    /// The connection closed or was reset during the handshake.
    Disconnected,
    /// Any other TLS error.
    Other,
}

impl HandshakeFailure {
    /// Every failure (the metric's label values).
    pub const ALL: [HandshakeFailure; 6] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Malformed,
        HandshakeFailure::Incompatible,
        HandshakeFailure::PeerAlert,
        HandshakeFailure::Disconnected,
        HandshakeFailure::Other,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Malformed => "malformed",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::PeerAlert => "peer_alert",
            HandshakeFailure::Disconnected => "disconnected",
            HandshakeFailure::Other => "other",
        }
    }

    fn of(error: &io::Error) -> Self {
        // tokio-rustls hands rustls's errors over inside an `io::Error`.
        match error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(
                rustls::Error::InvalidMessage(_)
                | rustls::Error::InappropriateMessage { .. }
                | rustls::Error::InappropriateHandshakeMessage { .. },
            ) => HandshakeFailure::Malformed,
            Some(rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol) => {
                HandshakeFailure::Incompatible
            }
            Some(rustls::Error::AlertReceived(_)) => HandshakeFailure::PeerAlert,
            Some(_) => HandshakeFailure::Other,
            None => HandshakeFailure::Disconnected,
        }
    }
}

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Completes the TLS handshake on `stream` and reads the first bytes of
/// HTTP, all within `timeout`. `None` when the connection is done: a failed
/// handshake (logged and counted in `metrics`), or a client that sent no
/// request in time or closed.
///
/// The bytes that tell HTTP/1 from the HTTP/2 preface are read here, under
/// the same timeout as the handshake, and handed out again first. (On the
/// plain listener server.rs peeks at them; a TLS stream cannot be peeked.)
pub async fn accept(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
    metrics: &Metrics,
) -> Option<TlsConnection> {
    let deadline = Instant::now() + timeout;
    let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream)).await;
    let mut stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return failed(HandshakeFailure::of(&error), metrics),
        Err(_) => return failed(HandshakeFailure::Timeout, metrics),
    };
    let mut first = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    let first_bytes = tokio::time::timeout_at(deadline, async {
        loop {
            match stream.read(&mut first[len..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => len += n,
            }
            if len == first.len() || first[..len] != H2_PREFACE[..len] {
                return true;
            }
        }
    })
    .await;
    first_bytes.unwrap_or(false).then_some(TlsConnection {
        first,
        first_len: len,
        first_read: 0,
        error: None,
        stream,
    })
}

fn failed(failure: HandshakeFailure, metrics: &Metrics) -> Option<TlsConnection> {
    tracing::debug!(reason = failure.reason(), "TLS handshake failed");
    metrics.tls_handshake_failure(failure.reason());
    None
}

/// An accepted TLS connection. Reads return the bytes [`accept`] already
/// read, then the rest of the stream.
pub struct TlsConnection {
    first: [u8; H2_PREFACE.len()],
    first_len: usize,
    first_read: usize,
    /// An error met while reading past the first bytes, for the next read.
    error: Option<io::Error>,
    stream: TlsStream<TcpStream>,
}

impl TlsConnection {
    /// Whether the client opened with the HTTP/2 preface (after ALPN `h2`,
    /// or with prior knowledge).
    pub fn is_http2(&self) -> bool {
        self.first[..self.first_len] == H2_PREFACE[..]
    }
}

impl crate::write_stall::ResetWhenClosed for TlsConnection {
    fn reset_when_closed(&self) {
        self.stream.get_ref().0.reset_when_closed();
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.first_read < this.first_len {
            let rest = &this.first[this.first_read..this.first_len];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.first_read += n;
            // The rest of the request in the same read, if it is there: a
            // read of only these few bytes would make hyper double its
            // 8 KiB read buffer for the connection's life. An error now is
            // the next read's to report.
            if buf.remaining() > 0 {
                if let Poll::Ready(Err(e)) = Pin::new(&mut this.stream).poll_read(cx, buf) {
                    this.error = Some(e);
                }
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ALL` (the metric's label values, created at zero) names each
    /// failure once: the `match` has no `_` arm, so a new one must be named.
    #[test]
    fn all_lists_every_failure_once() {
        let index = |f: &HandshakeFailure| match f {
            HandshakeFailure::Timeout => 0,
            HandshakeFailure::Malformed => 1,
            HandshakeFailure::Incompatible => 2,
            HandshakeFailure::PeerAlert => 3,
            HandshakeFailure::Disconnected => 4,
            HandshakeFailure::Other => 5,
        };
        let listed: Vec<usize> = HandshakeFailure::ALL.iter().map(index).collect();
        assert_eq!(listed, [0, 1, 2, 3, 4, 5]);
    }

    /// A self-signed certificate for `localhost` and its PKCS#8 key, as PEM.
    fn pkcs8_pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    const RSA_CERT: &[u8] = include_bytes!("../tests/data/tls/rsa.crt");
    const RSA_PKCS1_KEY: &[u8] = include_bytes!("../tests/data/tls/rsa-pkcs1.key");
    const EC_CERT: &[u8] = include_bytes!("../tests/data/tls/ec.crt");
    const EC_SEC1_KEY: &[u8] = include_bytes!("../tests/data/tls/ec-sec1.key");

    #[test]
    fn loads_pkcs8_pkcs1_and_sec1_keys_and_offers_h2_only_when_on() {
        let (cert, key) = pkcs8_pair();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(
            String::from_utf8_lossy(RSA_PKCS1_KEY).starts_with("-----BEGIN RSA PRIVATE KEY-----")
        );
        assert!(String::from_utf8_lossy(EC_SEC1_KEY).starts_with("-----BEGIN EC PRIVATE KEY-----"));
        for (cert, key) in [
            (cert.as_bytes(), key.as_bytes()),
            (RSA_CERT, RSA_PKCS1_KEY),
            (EC_CERT, EC_SEC1_KEY),
        ] {
            let config = server_config(cert, key, true).unwrap();
            assert_eq!(
                config.alpn_protocols,
                [b"h2".to_vec(), b"http/1.1".to_vec()]
            );
            let config = server_config(cert, key, false).unwrap();
            assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        }
        // Certificate and key in one file, in either order.
        let (cert, key) = pkcs8_pair();
        let both = format!("{key}{cert}");
        assert!(server_config(both.as_bytes(), both.as_bytes(), false).is_ok());
    }

    #[test]
    fn refuses_what_cannot_serve() {
        let (cert, key) = pkcs8_pair();
        let (_, other_key) = pkcs8_pair();
        let pem = |label: &str, base64: &str| {
            format!("-----BEGIN {label}-----\n{base64}\n-----END {label}-----\n")
        };
        let garbage_cert = pem("CERTIFICATE", "Q0FOQVJZIG5vdCBERVI="); // "CANARY not DER"
        let garbage_key = pem("PRIVATE KEY", "Q0FOQVJZIG5vdCBERVI=");
        let cases: [(&str, &[u8], &[u8], LoadError); 9] = [
            (
                "no PEM at all",
                b"CANARY",
                key.as_bytes(),
                LoadError::NoCertificate,
            ),
            (
                "a key, no certificate",
                key.as_bytes(),
                key.as_bytes(),
                LoadError::NoCertificate,
            ),
            (
                "broken base64",
                b"-----BEGIN CERTIFICATE-----\nCANARY!!\n-----END CERTIFICATE-----\n",
                key.as_bytes(),
                LoadError::NotPem(PemFile::Certificate),
            ),
            (
                "not X.509",
                garbage_cert.as_bytes(),
                key.as_bytes(),
                LoadError::BadCertificate,
            ),
            (
                "a certificate, no key",
                cert.as_bytes(),
                cert.as_bytes(),
                LoadError::NoKey,
            ),
            (
                "unterminated key",
                cert.as_bytes(),
                b"-----BEGIN PRIVATE KEY-----\nCANARY\n",
                LoadError::NotPem(PemFile::Key),
            ),
            (
                "not a key",
                cert.as_bytes(),
                garbage_key.as_bytes(),
                LoadError::UnusableKey,
            ),
            (
                "another key",
                cert.as_bytes(),
                other_key.as_bytes(),
                LoadError::KeyMismatch,
            ),
            (
                "an RSA key for an EC certificate",
                EC_CERT,
                RSA_PKCS1_KEY,
                LoadError::KeyMismatch,
            ),
        ];
        for (what, cert, key, expected) in cases {
            assert_eq!(
                server_config(cert, key, false).err(),
                Some(expected),
                "{what}"
            );
        }
    }

    #[test]
    fn handshake_failures_have_fixed_reasons() {
        let tls = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let cases = [
            (
                tls(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                "malformed",
            ),
            (
                tls(rustls::Error::PeerIncompatible(
                    rustls::PeerIncompatible::Tls12NotOffered,
                )),
                "incompatible",
            ),
            (tls(rustls::Error::NoApplicationProtocol), "incompatible"),
            (
                tls(rustls::Error::AlertReceived(
                    rustls::AlertDescription::UnknownCA,
                )),
                "peer_alert",
            ),
            (tls(rustls::Error::General("CANARY".into())), "other"),
            (
                io::Error::from(io::ErrorKind::UnexpectedEof),
                "disconnected",
            ),
            (
                io::Error::from(io::ErrorKind::ConnectionReset),
                "disconnected",
            ),
        ];
        for (error, reason) in cases {
            assert_eq!(HandshakeFailure::of(&error).reason(), reason, "{error}");
        }
    }
}
