//! Upstream host names, resolved without the C library.
//!
//! The container image is one statically linked glibc binary in an empty
//! (`scratch`) image. Static glibc cannot load the NSS modules behind
//! `getaddrinfo` (`/etc/hosts`, DNS), so hyper-util's default resolver fails
//! there for every name — `http://app:3000` as a compose service, a
//! Kubernetes Service name — exactly the deployments a sidecar is for.
//! [`Resolver`] does what a libc in the container would do, in Rust
//! (hickory): `/etc/hosts` first, then the name servers, search domains and
//! `ndots` of `/etc/resolv.conf`, answers cached for their TTL but for
//! [`MAX_CACHE_TTL`] at most.
//!
//! - IP-literal upstreams never get here: hyper-util's connector parses an
//!   IP host itself, so `http://127.0.0.1:3000` costs no lookup and no
//!   resolver set-up.
//! - The resolver is set up on the first lookup. If `/etc/resolv.conf`
//!   cannot be read, lookups go through `getaddrinfo` as before this module
//!   existed (fine with a dynamic libc; inside `scratch` it fails, and the
//!   request gets the upstream fallback answer).
//! - Name servers are asked one at a time, in the order of
//!   `/etc/resolv.conf`, as the C library does; an answer that the name does
//!   not exist ends the lookup. hickory's default — two servers at once,
//!   fastest first — broke a container on two podman networks: each
//!   network's DNS knows only its own containers, and the one that did not
//!   know the app's name answered first.
//! - Each name server has its own hickory resolver, and a server that does
//!   not answer within [`PER_SERVER_TIMEOUT`] is passed over for the next
//!   (the last one has the timeout of `/etc/resolv.conf`).
//!   One hickory resolver asking them in turn gives the whole list the one
//!   timeout its first server's query also has, so a silent first server
//!   meant the second was never asked (found in review). The whole lookup
//!   is bounded by `upstream.connect_timeout_ms` (upstream_connections.rs).
//! - The connection pool reuses connections, so lookups happen only when a
//!   new connection to the app is opened.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hickory_resolver::config::{ResolverConfig, ResolverOpts, ServerOrderingStrategy};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::TokioResolver;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use tower::Service;

/// Resolves host names for the upstream connector
/// (`HttpConnector::new_with_resolver`). Cheap to clone; clones share the
/// resolver and its cache.
#[derive(Clone, Default)]
pub struct Resolver {
    backend: Arc<OnceLock<Backend>>,
}

enum Backend {
    /// `/etc/hosts` and `/etc/resolv.conf`, read by hickory: a resolver
    /// per name server, in the file's order (one with none, for the hosts
    /// file alone, when it names none).
    Hickory(Vec<TokioResolver>),
    /// `getaddrinfo` on a blocking thread: only when the system
    /// configuration could not be read.
    Gai(GaiResolver),
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match self.backend.get() {
            None => "not set up yet",
            Some(Backend::Hickory(_)) => "hickory (/etc/hosts, /etc/resolv.conf)",
            Some(Backend::Gai(_)) => "getaddrinfo",
        };
        f.debug_struct("Resolver")
            .field("backend", &backend)
            .finish()
    }
}

impl Resolver {
    /// A resolver reading the system configuration on its first lookup.
    pub fn new() -> Self {
        Self::default()
    }

    /// A resolver with given hickory resolvers, asked in order (tests: a
    /// hosts file and no name servers).
    pub fn with_hickory(resolvers: Vec<TokioResolver>) -> Self {
        let backend = OnceLock::new();
        let _ = backend.set(Backend::Hickory(resolvers));
        Resolver {
            backend: Arc::new(backend),
        }
    }

    /// The addresses of `host`, in the order to try them. An IP literal is
    /// returned as is.
    pub async fn lookup(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let ips: Vec<IpAddr> = match self.backend() {
            Backend::Hickory(resolvers) => in_turn(resolvers, host)
                .await
                .map_err(|e| io::Error::other(format!("resolving {host}: {e}")))?,
            Backend::Gai(gai) => {
                let name = Name::from_str(host).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}"))
                })?;
                gai.clone().call(name).await?.map(|a| a.ip()).collect()
            }
        };
        if ips.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("resolving {host}: no addresses"),
            ));
        }
        Ok(ips)
    }

    fn backend(&self) -> &Backend {
        self.backend.get_or_init(|| {
            match hickory_resolver::system_conf::read_system_conf()
                .and_then(|(config, options)| one_per_server(config, &options))
            {
                Ok(resolvers) => Backend::Hickory(resolvers),
                Err(_) => Backend::Gai(GaiResolver::new()),
            }
        })
    }
}

/// How long an answer is kept, whatever its TTL. A recreated app
/// container comes back on a new address under the same name, and compose's
/// DNS gives 600 s TTLs (podman's 86,400 s): ivrguard kept connecting to the
/// old address for that long, every call getting the fallback (found in
/// review). The C library keeps nothing; lookups happen only when a new
/// connection to the app is opened, so a short cache costs little.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(2);
/// "No such name" is kept for less: the app may be starting.
const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// How long one name server has to answer before the next is asked. A
/// name server beside the app answers in milliseconds; the C library's 5 s
/// would leave no time for a second within `upstream.connect_timeout_ms`.
pub const PER_SERVER_TIMEOUT: Duration = Duration::from_millis(500);

/// A resolver per name server of `config`, in its order (see the module
/// docs for why), each set up by [`system_like`] from `options`; one with
/// no name server, for the hosts file alone, if `config` names none.
fn one_per_server(
    config: ResolverConfig,
    options: &ResolverOpts,
) -> Result<Vec<TokioResolver>, NetError> {
    let (domain, search, servers) = config.into_parts();
    let configs: Vec<ResolverConfig> = match servers.is_empty() {
        true => vec![ResolverConfig::from_parts(domain, search, vec![])],
        false => servers
            .into_iter()
            .map(|server| ResolverConfig::from_parts(domain.clone(), search.clone(), vec![server]))
            .collect(),
    };
    let last = configs.len() - 1;
    configs
        .into_iter()
        .enumerate()
        .map(|(i, config)| {
            let mut builder =
                TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
            *builder.options_mut() = options.clone();
            system_like(builder.options_mut(), i < last);
            builder.build()
        })
        .collect()
}

/// One name server's resolver: answers kept for [`MAX_CACHE_TTL`] at
/// most. One with a `next` server to fall back on has
/// [`PER_SERVER_TIMEOUT`] to answer, once; the last keeps the timeout and
/// attempts of `/etc/resolv.conf` (within `upstream.connect_timeout_ms`),
/// so a lone name server is given as long as before.
fn system_like(options: &mut ResolverOpts, next: bool) {
    options.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
    options.num_concurrent_reqs = 1;
    if next {
        options.timeout = options.timeout.min(PER_SERVER_TIMEOUT);
        options.attempts = 1;
    }
    options.positive_max_ttl = Some(MAX_CACHE_TTL);
    options.negative_max_ttl = Some(MAX_NEGATIVE_TTL);
}

/// `host`'s addresses from the first of `resolvers` whose server answers:
/// one that says the name has no address ends the lookup, as in the C
/// library; one that does not answer, or fails, passes to the next.
async fn in_turn(resolvers: &[TokioResolver], host: &str) -> Result<Vec<IpAddr>, NetError> {
    let mut failed = NetError::NoConnections;
    for resolver in resolvers {
        match resolver.lookup_ip(host).await {
            Ok(found) => return Ok(found.iter().collect()),
            Err(e) if is_an_answer(&e) => return Err(e),
            Err(e) => failed = e,
        }
    }
    Err(failed)
}

/// Whether `e` is a name server's answer (no such name, or no address for
/// it), not its silence or failure.
fn is_an_answer(e: &NetError) -> bool {
    matches!(
        e,
        NetError::Dns(DnsError::NoRecordsFound(NoRecords {
            response_code: ResponseCode::NXDomain | ResponseCode::NoError,
            ..
        }))
    )
}

/// The shape hyper-util's connector asks for: a `Service<Name>` returning
/// socket addresses (the connector puts the port in).
impl Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolver = self.clone();
        Box::pin(async move {
            let ips = resolver.lookup(name.as_str()).await?;
            let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            Ok(addrs.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    use std::net::Ipv4Addr;
    use std::sync::Mutex;

    use bytes::Bytes;
    use hickory_resolver::config::{NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::proto::op::{Message, ResponseCode};
    use hickory_resolver::proto::rr::rdata::{A, SOA};
    use hickory_resolver::proto::rr::{Name as DnsName, RData, Record, RecordType};
    use hickory_resolver::Hosts;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UdpSocket;

    /// A resolver that knows only the names in `hosts` (hosts-file syntax)
    /// and has no name server: nothing leaves the machine.
    fn hosts_only(hosts: &str) -> Resolver {
        let mut table = Hosts::default();
        table.read_hosts_conf(hosts.as_bytes()).unwrap();
        let mut resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], vec![]),
            TokioRuntimeProvider::default(),
        )
        .build()
        .unwrap();
        resolver.set_hosts(Arc::new(table));
        Resolver::with_hickory(vec![resolver])
    }

    #[tokio::test]
    async fn resolves_a_name_from_the_hosts_table() {
        let r = hosts_only("10.1.2.3 legacy-app legacy-app.internal\n");
        let ips = r.lookup("legacy-app").await.unwrap();
        assert_eq!(ips, ["10.1.2.3".parse::<IpAddr>().unwrap()]);
        let ips = r.lookup("legacy-app.internal").await.unwrap();
        assert_eq!(ips, ["10.1.2.3".parse::<IpAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn unknown_name_is_an_error_naming_the_host() {
        let r = hosts_only("10.1.2.3 legacy-app\n");
        let err = r.lookup("other-app").await.unwrap_err();
        assert!(err.to_string().contains("other-app"), "{err}");
    }

    #[tokio::test]
    async fn ip_literals_are_returned_without_a_lookup() {
        // No hosts, no name servers: only the literal path can answer.
        let r = hosts_only("");
        assert_eq!(
            r.lookup("127.0.0.1").await.unwrap(),
            ["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            r.lookup("::1").await.unwrap(),
            ["::1".parse::<IpAddr>().unwrap()]
        );
    }

    /// A DNS server on 127.0.0.1 (UDP) that knows `known` (A `ip`, as it is
    /// at each query, with podman's TTL of a day), answering it after
    /// `delay`, and says NXDOMAIN at once to anything else, and to `known`
    /// while `ip` is `None` (the container is not up yet), with an SOA
    /// record that allows caching that for a day: one podman network's DNS.
    async fn network_dns(
        known: &'static str,
        delay: Duration,
        ip: Arc<Mutex<Option<Ipv4Addr>>>,
    ) -> SocketAddr {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let socket = socket.clone();
                let ip = *ip.lock().unwrap();
                tokio::spawn(async move {
                    let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
                    answer.metadata.recursion_desired = query.metadata.recursion_desired;
                    answer.metadata.recursion_available = true;
                    let question = query.queries[0].clone();
                    answer.add_query(question.clone());
                    match ip {
                        Some(ip) if question.name().to_ascii() == format!("{known}.") => {
                            tokio::time::sleep(delay).await;
                            if question.query_type() == RecordType::A {
                                answer.add_answer(Record::from_rdata(
                                    question.name().clone(),
                                    DAY,
                                    RData::A(A(ip)),
                                ));
                            }
                        }
                        _ => {
                            answer.metadata.response_code = ResponseCode::NXDomain;
                            let zone = DnsName::from_ascii("dns.podman.").unwrap();
                            let soa = SOA::new(zone.clone(), zone.clone(), 1, 1, 1, 1, DAY);
                            answer.add_authority(Record::from_rdata(zone, DAY, RData::SOA(soa)));
                        }
                    }
                    let _ = socket.send_to(&answer.to_vec().unwrap(), peer).await;
                });
            }
        });
        addr
    }

    /// A container on two podman networks gets both networks' DNS servers;
    /// only the first knows the app. The second's quick NXDOMAIN must not
    /// win: servers are asked in order, as glibc does.
    #[tokio::test]
    async fn asks_name_servers_in_order_like_the_c_library() {
        let app_ip = Arc::new(Mutex::new(Some(Ipv4Addr::new(10, 1, 2, 3))));
        let knows_app = network_dns("legacy-app", Duration::from_millis(100), app_ip).await;
        let other_ip = Arc::new(Mutex::new(Some(Ipv4Addr::new(10, 9, 9, 9))));
        let other_network = network_dns("ivrguard", Duration::ZERO, other_ip).await;
        let resolver = system_like_resolver(&[knows_app, other_network]);
        for _ in 0..3 {
            let ips = resolver.lookup("legacy-app").await.unwrap();
            assert_eq!(ips, [IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))]);
        }
    }

    /// podman's DNS TTL, for answers and for "no such name".
    const DAY: u32 = 86_400;

    /// A resolver asking `servers`, set up as for the system configuration.
    fn system_like_resolver(servers: &[SocketAddr]) -> Resolver {
        let servers = servers
            .iter()
            .map(|addr| {
                let mut server = NameServerConfig::udp(addr.ip());
                server.connections[0].port = addr.port();
                server
            })
            .collect();
        let config = ResolverConfig::from_parts(None, vec![], servers);
        Resolver::with_hickory(one_per_server(config, &ResolverOpts::default()).unwrap())
    }

    /// The first name server does not answer: the second is asked once
    /// [`PER_SERVER_TIMEOUT`] has passed, well within the default
    /// `upstream.connect_timeout_ms` (found in review: it was never asked).
    /// An answer that the name does not exist is not passed over.
    #[tokio::test]
    async fn a_silent_name_server_is_passed_over_for_the_next() {
        let ip = |last| Arc::new(Mutex::new(Some(Ipv4Addr::new(10, 1, 2, last))));
        let silent = network_dns("legacy-app", Duration::from_secs(30), ip(1)).await;
        let answers = network_dns("legacy-app", Duration::ZERO, ip(3)).await;
        let resolver = system_like_resolver(&[silent, answers]);
        let started = std::time::Instant::now();
        let ips = resolver.lookup("legacy-app").await.unwrap();
        assert_eq!(ips, [IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))]);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1500),
            "answered after {took:?}"
        );

        let unknown = network_dns("legacy-app", Duration::ZERO, Arc::new(Mutex::new(None))).await;
        let resolver = system_like_resolver(&[unknown, answers]);
        assert!(
            resolver.lookup("legacy-app").await.is_err(),
            "a server that says no such name was passed over"
        );
    }

    /// The app's container is recreated and comes back on a new address,
    /// under a DNS TTL of a day: new connections reach the new address
    /// within `MAX_CACHE_TTL`, not a day later.
    #[tokio::test]
    async fn a_moved_app_is_found_again_within_the_cache_limit() {
        let app_ip = Arc::new(Mutex::new(Some(Ipv4Addr::new(10, 1, 2, 3))));
        let dns = network_dns("legacy-app", Duration::ZERO, app_ip.clone()).await;
        let resolver = system_like_resolver(&[dns]);
        let first = resolver.lookup("legacy-app").await.unwrap();
        assert_eq!(first, [IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))]);
        *app_ip.lock().unwrap() = Some(Ipv4Addr::new(10, 1, 2, 9));
        let moved = std::time::Instant::now();
        loop {
            let ips = resolver.lookup("legacy-app").await.unwrap();
            if ips == [IpAddr::V4(Ipv4Addr::new(10, 1, 2, 9))] {
                break;
            }
            assert!(
                moved.elapsed() < MAX_CACHE_TTL + Duration::from_secs(3),
                "still {ips:?} {:?} after the app moved",
                moved.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// ivrguard starts before the app's container: the name is unknown at
    /// first, and the DNS allows caching that for a day. Once the app is
    /// up it is found within `MAX_NEGATIVE_TTL`, not a day later.
    #[tokio::test]
    async fn an_app_that_was_not_up_yet_is_found_within_the_negative_cache_limit() {
        let app_ip = Arc::new(Mutex::new(None));
        let dns = network_dns("legacy-app", Duration::ZERO, app_ip.clone()).await;
        let resolver = system_like_resolver(&[dns]);
        assert!(resolver.lookup("legacy-app").await.is_err());
        *app_ip.lock().unwrap() = Some(Ipv4Addr::new(10, 1, 2, 3));
        let up = std::time::Instant::now();
        while resolver.lookup("legacy-app").await.is_err() {
            assert!(
                up.elapsed() < MAX_NEGATIVE_TTL + Duration::from_secs(3),
                "still no such name {:?} after the app came up",
                up.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            up.elapsed() >= Duration::from_millis(500),
            "the miss was not cached: the cap is not exercised"
        );
    }

    /// A name server that does not answer in time: a new connection to the
    /// app fails within `upstream.connect_timeout_ms`, the lookup included
    /// (found in review: `HttpConnector` bounds only the TCP connect, so
    /// the lookup ran into hickory's own 5 s timeouts, and the request
    /// until `upstream.timeout_ms`).
    #[tokio::test]
    async fn a_lookup_is_bounded_by_the_connect_timeout() {
        let ip = Arc::new(Mutex::new(Some(Ipv4Addr::new(127, 0, 0, 1))));
        let slow = network_dns("legacy-app", Duration::from_secs(30), ip).await;
        let connections = crate::upstream_connections::Connections::new(1, 1, Duration::ZERO);
        let connector = connections.connector(
            0,
            HttpConnector::new_with_resolver(system_like_resolver(&[slow])),
            "http://legacy-app:9".parse().unwrap(),
            Duration::from_millis(300),
        );
        let slot = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let connected = connector.connect(slot).await;
        let took = started.elapsed();
        assert!(connected.is_err(), "connected through a silent name server");
        assert!(took < Duration::from_secs(2), "gave up after {took:?}");
    }

    /// The wiring `upstream.rs` relies on: the connector asks this resolver
    /// for a name and connects to the answer, on the URL's port.
    #[tokio::test]
    async fn connector_reaches_a_named_upstream_through_the_resolver() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await.unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await
                .unwrap();
        });
        let connector = HttpConnector::new_with_resolver(hosts_only("127.0.0.1 legacy-app\n"));
        let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(connector);
        let response = client
            .get(format!("http://legacy-app:{port}/ivr").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }
}
