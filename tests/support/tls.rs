//! TLS for the tests of ivrguard's TLS listener: a throw-away CA made at
//! test time (rcgen, ring) that issues certificates for [`HOST`], PEM files
//! replaced the way a Kubernetes Secret update replaces them, and clients
//! that verify ivrguard's certificate against that CA.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio_rustls::TlsConnector;

use super::client::{self, HttpResponse, RawRequest};
use super::proxy::HOST;

/// A certificate authority that exists for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    der: CertificateDer<'static>,
}

/// A server certificate for [`HOST`] and its private key.
pub struct Leaf {
    /// The chain as a server's PEM file holds it: this certificate, then the CA's.
    pub chain_pem: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
    /// What a client sees as the server's certificate.
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "ivrguard test CA");
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
            der: cert.der().clone(),
        }
    }

    /// A new certificate for [`HOST`], with a new key.
    pub fn issue(&self) -> Leaf {
        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(vec![HOST.to_string()]).expect("server params");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A client that trusts only this CA and offers `alpn` (TLS 1.2 and 1.3).
    pub fn client(&self, alpn: &[&[u8]]) -> TlsConnector {
        self.client_with(alpn, rustls::DEFAULT_VERSIONS)
    }

    /// The same, offering only `versions`.
    pub fn client_with(
        &self,
        alpn: &[&[u8]],
        versions: &[&'static SupportedProtocolVersion],
    ) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).expect("CA certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("ring supports these versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

impl Leaf {
    /// Writes the chain and the key, each to a temporary name renamed into
    /// place (as a Kubernetes Secret update does), the key last.
    pub fn write(&self, cert_path: &Path, key_path: &Path) {
        for (path, text) in [(cert_path, &self.chain_pem), (key_path, &self.key_pem)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).expect("write PEM");
            std::fs::rename(&tmp, path).expect("rename PEM into place");
        }
    }

    /// The base64 lines of the private key: what no output may contain.
    pub fn key_lines(&self) -> Vec<&str> {
        self.key_pem
            .lines()
            .filter(|l| !l.starts_with("-----") && !l.is_empty())
            .collect()
    }
}

/// Connects to `addr` and completes the handshake, verifying the
/// certificate for [`HOST`].
pub async fn connect(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(HOST).expect("a DNS name");
    connector.connect(name, tcp).await
}

/// The certificate the server presented.
pub fn peer_certificate(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
        .clone()
        .into_owned()
}

/// Sends `request` on a new TLS connection (HTTP/1.1) and reads the
/// response; also returns the certificate the server presented.
pub async fn send(
    addr: SocketAddr,
    connector: &TlsConnector,
    request: &RawRequest,
) -> (HttpResponse, CertificateDer<'static>) {
    let mut stream = connect(addr, connector).await.expect("TLS handshake");
    let cert = peer_certificate(&stream);
    stream
        .write_all(&request.to_bytes())
        .await
        .expect("write the request");
    (client::read_response(stream).await, cert)
}
