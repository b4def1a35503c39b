//! A small load tool for `bench/run.sh`, for what `wrk` cannot do here.
//!
//! - `rate`: open-loop load at a fixed rate, latency without coordinated
//!   omission. Each connection follows its own schedule (wrk2's model): a
//!   request that could not start on time because the connection was still
//!   busy is timed from when it *should* have started, so a stall shows up
//!   in every request it delayed. A request that starts late only because
//!   this tool's timer woke late (tokio's timer ticks in whole
//!   milliseconds) is timed from when it really started: that lateness is
//!   the tool's, not the server's. One thread, hyper's HTTP/1.1 client,
//!   keep-alive; about 5–10 µs of CPU per request (printed), against ~100
//!   µs for `oha` on this machine (perf notes §A4).
//! - `hold`: opens N keep-alive connections, sends one request on each, and
//!   keeps them open, so the script can read the proxy's memory meanwhile.
//! - `startup`: runs a command and reports the time until a URL answers 200.
//!
//! ```text
//! openloop rate    URL BODY_FILE RATE CONNECTIONS SECONDS [HEADER: VALUE]...
//! openloop hold    URL BODY_FILE CONNECTIONS SECONDS [HEADER: VALUE]...
//! openloop startup URL TIMEOUT_MS COMMAND [ARG]...
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type Sender = SendRequest<Full<Bytes>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match args.first().map(String::as_str) {
        Some("rate") if args.len() >= 6 => runtime.block_on(rate(&args[1..])),
        Some("hold") if args.len() >= 5 => runtime.block_on(hold(&args[1..])),
        Some("startup") if args.len() >= 4 => runtime.block_on(startup(&args[1..])),
        _ => Err("usage: see the header of bench/openloop.rs".to_string()),
    };
    if let Err(e) = result {
        eprintln!("openloop: {e}");
        std::process::exit(1);
    }
}

/// Target address, path and extra headers of the request to send.
struct Target {
    addr: SocketAddr,
    uri: Uri,
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Target {
    fn parse(url: &str, body_file: &str, headers: &[String]) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let authority = uri.authority().ok_or("URL needs host:port")?;
        let addr: SocketAddr = authority
            .as_str()
            .parse()
            .map_err(|e| format!("{authority}: {e} (use IP:port)"))?;
        let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let body = std::fs::read(body_file).map_err(|e| format!("{body_file}: {e}"))?;
        let headers = headers
            .iter()
            .map(|h| {
                let (name, value) = h.split_once(':').ok_or(format!("header {h:?}"))?;
                Ok((
                    HeaderName::try_from(name.trim()).map_err(|e| e.to_string())?,
                    HeaderValue::try_from(value.trim()).map_err(|e| e.to_string())?,
                ))
            })
            .collect::<Result<_, String>>()?;
        Ok(Target {
            addr,
            uri: path.parse().map_err(|e| format!("{path}: {e}"))?,
            body: Bytes::from(body),
            headers,
        })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        request
    }

    async fn connect(&self) -> Result<Sender, String> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

/// Sends one request; true for a 2xx with its whole body read.
async fn exchange(sender: &mut Sender, request: Request<Full<Bytes>>) -> bool {
    if sender.ready().await.is_err() {
        return false;
    }
    match sender.send_request(request).await {
        Ok(response) => {
            let ok = response.status().is_success();
            response.into_body().collect().await.is_ok() && ok
        }
        Err(_) => false,
    }
}

/// Per connection: latencies (ns) and failures.
struct Samples {
    latencies: Vec<u64>,
    errors: u64,
}

async fn rate(args: &[String]) -> Result<(), String> {
    let target = Target::parse(&args[0], &args[1], &args[5..])?;
    let rate: f64 = args[2].parse().map_err(|_| "RATE must be a number")?;
    let connections: usize = args[3].parse().map_err(|_| "CONNECTIONS")?;
    let seconds: f64 = args[4].parse().map_err(|_| "SECONDS")?;
    let target = std::sync::Arc::new(target);
    let period = Duration::from_secs_f64(connections as f64 / rate);
    let per_connection = (seconds * rate / connections as f64).floor() as u64;

    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(target.connect().await?);
    }
    let cpu_before = cpu_time();
    let start = Instant::now() + Duration::from_millis(20);
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, mut sender)| {
            let target = target.clone();
            // Stagger the connections evenly over one period.
            let first = start + period.mul_f64(i as f64 / connections as f64);
            tokio::spawn(async move {
                let mut samples = Samples {
                    latencies: Vec::with_capacity(per_connection as usize),
                    errors: 0,
                };
                let mut previous_done = Instant::now();
                for k in 0..per_connection {
                    let intended = first + period.mul_f64(k as f64);
                    let busy_past_due = previous_done > intended;
                    tokio::time::sleep_until(intended.into()).await;
                    let sent = Instant::now();
                    let ok = exchange(&mut sender, target.request()).await;
                    let done = Instant::now();
                    previous_done = done;
                    if !ok {
                        samples.errors += 1;
                        if let Ok(fresh) = target.connect().await {
                            sender = fresh;
                        }
                        continue;
                    }
                    let from = if busy_past_due { intended } else { sent };
                    samples
                        .latencies
                        .push(done.duration_since(from).as_nanos() as u64);
                }
                samples
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let samples = task.await.map_err(|e| e.to_string())?;
        latencies.extend(samples.latencies);
        errors += samples.errors;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_time() - cpu_before;
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (latencies.len() - 1) as f64).round() as usize;
        latencies[i] as f64 / 1e6
    };
    let total = latencies.len() as u64 + errors;
    println!(
        "RESULT requests={} errors={} achieved_rps={:.0} p50_ms={:.3} p90_ms={:.3} \
         p99_ms={:.3} p999_ms={:.3} max_ms={:.3} client_cpu_us_per_req={:.1}",
        total,
        errors,
        total as f64 / elapsed,
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(99.9),
        latencies.last().map_or(f64::NAN, |&n| n as f64 / 1e6),
        cpu.as_secs_f64() * 1e6 / total.max(1) as f64,
    );
    Ok(())
}

async fn hold(args: &[String]) -> Result<(), String> {
    let target = Target::parse(&args[0], &args[1], &args[4..])?;
    let connections: usize = args[2].parse().map_err(|_| "CONNECTIONS")?;
    let seconds: f64 = args[3].parse().map_err(|_| "SECONDS")?;
    let mut senders = Vec::with_capacity(connections);
    let mut ok = 0;
    for _ in 0..connections {
        let mut sender = target.connect().await?;
        if exchange(&mut sender, target.request()).await {
            ok += 1;
        }
        senders.push(sender);
    }
    println!("HELD connections={connections} ok={ok}");
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    drop(senders);
    Ok(())
}

async fn startup(args: &[String]) -> Result<(), String> {
    let uri: Uri = args[0].parse().map_err(|e| format!("{}: {e}", args[0]))?;
    let timeout = Duration::from_millis(args[1].parse().map_err(|_| "TIMEOUT_MS")?);
    let addr: SocketAddr = uri
        .authority()
        .ok_or("URL needs host:port")?
        .as_str()
        .parse()
        .map_err(|e| format!("{e}"))?;
    let started = Instant::now();
    let mut child = std::process::Command::new(&args[2])
        .args(&args[3..])
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", args[2]))?;
    let ready = loop {
        if started.elapsed() > timeout {
            break None;
        }
        if let Ok(stream) = TcpStream::connect(addr).await {
            if let Ok((mut sender, conn)) =
                http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
            {
                tokio::spawn(conn);
                let request = Request::get(uri.clone())
                    .body(Empty::new())
                    .expect("GET request");
                if let Ok(response) = sender.send_request(request).await {
                    if response.status() == StatusCode::OK {
                        break Some(started.elapsed());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    match ready {
        Some(t) => {
            println!("READY ms={:.2}", t.as_secs_f64() * 1e3);
            Ok(())
        }
        None => Err(format!("not ready within {timeout:?}")),
    }
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) in ")".
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat: indices 11 and 12 here.
    let per_second = 100; // USER_HZ on Linux
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / per_second)
}
