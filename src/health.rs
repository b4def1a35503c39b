//! `ivrguard health`: is a running ivrguard alive? For container health
//! checks in an image with no shell and no curl:
//! `HEALTHCHECK CMD ["/ivrguard", "health"]`.
//!
//! It sends one `GET /healthz` to the admin listener named by
//! `server.admin_listen` in the same config `run` reads (file, then
//! `IVRGUARD__…` overrides), or to `--url`. A wildcard bind address
//! (`0.0.0.0`, `::`) is probed on loopback. A `200` within [`TIMEOUT`] is
//! healthy (exit 0); anything else — refused, no answer in time, another
//! status — is one line on stderr and exit 1.
//!
//! Only `server.admin_listen` is read from the config: not its secrets,
//! so the check neither needs them nor fails while a secret file holds a
//! change a reload refused (the running process keeps serving with the
//! old one, and is healthy). Kubernetes probes do not need this command;
//! they call `/healthz` and `/readyz` over HTTP themselves.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::{self, Settings};
use crate::resolve::Resolver;

/// How long the whole probe may take: connect, request, response head.
/// Well inside Docker's default health-check timeout (30 s), and short
/// enough that a hung process is reported as such.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Where the probe goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    host: String,
    port: u16,
    path: String,
}

impl Target {
    /// `http://<addr>/healthz`, a wildcard address replaced by loopback.
    pub fn admin(addr: SocketAddr) -> Target {
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Target {
            host: ip.to_string(),
            port: addr.port(),
            path: "/healthz".to_string(),
        }
    }

    /// A `--url`: `http://host[:port][/path]`; no path means `/healthz`.
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url
            .parse()
            .map_err(|_| format!("--url {url:?} is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("--url {url:?}: only http:// is supported"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("--url {url:?} has no host"))?;
        if authority.as_str().contains('@') {
            // Not quoted: the URL holds a password.
            return Err("--url: user:password is not supported".to_string());
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") | Some("/") => "/healthz".to_string(),
            Some(p) => p.to_string(),
        };
        Ok(Target {
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(80),
            path,
        })
    }

    /// `host:port` as it goes in a URL and the `Host` header.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.path)
    }
}

/// The command: probe `--url`, or the admin listener of the config at
/// `config_path`. Prints one line on success; the error is the line for
/// stderr.
pub fn run(config_path: &Path, url: Option<&str>) -> Result<(), String> {
    let target = match url {
        Some(url) => Target::parse(url)?,
        None => {
            let admin = Settings::load_admin_listen(config_path, &config::process_env())
                .map_err(|e| e.to_string())?;
            let addr = admin.ok_or_else(|| {
                format!(
                    "server.admin_listen is not set in {}: no admin listener to ask (set it, or pass --url)",
                    config_path.display()
                )
            })?;
            Target::admin(addr)
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("health: cannot start the runtime: {e}"))?;
    runtime.block_on(probe(&target, TIMEOUT))?;
    // Healthy whether or not the line can be written (a probe's stdout
    // may be closed).
    let _ = writeln!(std::io::stdout(), "healthy: {target} answered 200");
    Ok(())
}

/// One `GET`; `Ok` only for `200 OK` within `timeout`.
pub async fn probe(target: &Target, timeout: Duration) -> Result<(), String> {
    let status = tokio::time::timeout(timeout, get(target))
        .await
        .map_err(|_| format!("unhealthy: {target} did not answer within {timeout:?}"))?
        .map_err(|e| format!("unhealthy: {target}: {e}"))?;
    if status == StatusCode::OK {
        Ok(())
    } else {
        Err(format!("unhealthy: {target} answered {status}"))
    }
}

async fn get(target: &Target) -> Result<StatusCode, String> {
    let ips = Resolver::new()
        .lookup(&target.host)
        .await
        .map_err(|e| e.to_string())?;
    let mut last_error = None;
    let mut stream = None;
    for ip in ips {
        match TcpStream::connect(SocketAddr::new(ip, target.port)).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let stream = stream.ok_or_else(|| match last_error {
        Some(e) => format!("cannot connect: {e}"),
        None => "cannot connect: no address".to_string(),
    })?;

    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(connection);
    let request = Request::get(target.path.as_str())
        .header(header::HOST, target.authority())
        .header(header::USER_AGENT, "ivrguard-health")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    Ok(response.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-shot server answering every connection with `response`, or
    /// never answering when it is `None`.
    async fn server(response: Option<&'static str>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
                    match response {
                        Some(r) => {
                            let _ = stream.write_all(r.as_bytes()).await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(30)).await,
                    }
                });
            }
        });
        addr
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
    const UNAVAILABLE: &str = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";

    #[tokio::test]
    async fn healthy_on_200() {
        let addr = server(Some(OK)).await;
        probe(&Target::admin(addr), TIMEOUT).await.unwrap();
    }

    #[tokio::test]
    async fn unhealthy_on_another_status_naming_it() {
        let addr = server(Some(UNAVAILABLE)).await;
        let err = probe(&Target::admin(addr), TIMEOUT).await.unwrap_err();
        assert!(err.contains("503"), "{err}");
    }

    #[tokio::test]
    async fn unhealthy_when_nothing_listens() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = probe(&Target::admin(addr), TIMEOUT).await.unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
    }

    #[tokio::test]
    async fn unhealthy_when_the_answer_does_not_come_in_time() {
        let addr = server(None).await;
        let started = std::time::Instant::now();
        let err = probe(&Target::admin(addr), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("did not answer"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_url_with_a_password_is_refused_without_quoting_it() {
        let error = Target::parse("http://user:pw-canary-77@127.0.0.1:9901/x").unwrap_err();
        assert!(error.contains("user:password"), "{error}");
        assert!(!error.contains("pw-canary-77"), "{error}");
    }

    #[test]
    fn wildcard_admin_address_is_probed_on_loopback() {
        let t = Target::admin("0.0.0.0:9901".parse().unwrap());
        assert_eq!(t.to_string(), "http://127.0.0.1:9901/healthz");
        let t = Target::admin("[::]:9901".parse().unwrap());
        assert_eq!(t.to_string(), "http://[::1]:9901/healthz");
        let t = Target::admin("10.0.0.5:9901".parse().unwrap());
        assert_eq!(t.to_string(), "http://10.0.0.5:9901/healthz");
    }

    #[test]
    fn url_override_defaults_port_and_path() {
        let t = Target::parse("http://ivrguard").unwrap();
        assert_eq!(t.to_string(), "http://ivrguard:80/healthz");
        let t = Target::parse("http://[::1]:9901/").unwrap();
        assert_eq!(t.to_string(), "http://[::1]:9901/healthz");
        let t = Target::parse("http://127.0.0.1:9901/readyz").unwrap();
        assert_eq!(t.to_string(), "http://127.0.0.1:9901/readyz");
    }

    #[test]
    fn url_override_refuses_what_it_cannot_probe() {
        for url in [
            "https://127.0.0.1:9901/healthz",
            "127.0.0.1:9901",
            "http://user:pw@127.0.0.1:9901/",
            "not a url",
        ] {
            assert!(Target::parse(url).is_err(), "{url}");
        }
    }
}
