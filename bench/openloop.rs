//! A small load tool for `bench/run.sh`, for what `wrk` cannot do here.
//!
//! - `rate`: open-loop load at a fixed rate, latency without coordinated
//!   omission. Each connection follows its own schedule (wrk2's model): a
//!   request that could not start on time because the connection was still
//!   busy is timed from when it *should* have started, so a stall shows up
//!   in every request it delayed. A request that starts late only because
//!   this tool's sleep overshot is timed from when it really started: that
//!   lateness is the tool's, not the server's. One thread per connection,
//!   blocking sockets, keep-alive (so the sends stay spread as scheduled;
//!   see [`rate`]); its CPU per request is printed (oha costs ~100 µs per
//!   request on this machine, perf notes §A4).
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
        Some("rate") if args.len() >= 6 => rate(&args[1..]),
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

    /// The request as bytes on the wire, for [`rate`]'s blocking sockets.
    fn raw_request(&self) -> Vec<u8> {
        let mut wire = format!("POST {} HTTP/1.1\r\n", self.uri).into_bytes();
        if !self
            .headers
            .iter()
            .any(|(name, _)| name == http::header::HOST)
        {
            wire.extend_from_slice(format!("Host: {}\r\n", self.addr).as_bytes());
        }
        for (name, value) in &self.headers {
            for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
                wire.extend_from_slice(part);
            }
        }
        wire.extend_from_slice(format!("Content-Length: {}\r\n\r\n", self.body.len()).as_bytes());
        wire.extend_from_slice(&self.body);
        wire
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
    /// From the intended send time always (wrk2's model), for comparison.
    from_intended: Vec<u64>,
    /// How late each send started (ns): the tool's own lateness.
    lags: Vec<u64>,
    errors: u64,
}

/// How long a socket read or write may wait before the request counts as
/// failed.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Each connection runs on a thread of its own, with blocking sockets and
/// `thread::sleep` to wait for its next send time. A sleep overshoots
/// (about 0.08-0.1 ms at the median on the 2-vCPU bench machine, more when
/// the server under test keeps the cores busy): that lateness is not in the
/// latencies, so it is reported (`send_lag_*`, `late_over_100us`), with the
/// p99 timed from the intended time always (`wrk2_p99_ms`). (The first
/// version used tokio, whose timer fires in whole milliseconds: at
/// 10,000/s it sent ten requests at once every millisecond, and what it
/// measured was mostly how fast a burst of ten drains.)
fn rate(args: &[String]) -> Result<(), String> {
    let target = Target::parse(&args[0], &args[1], &args[5..])?;
    let rate: f64 = args[2].parse().map_err(|_| "RATE must be a number")?;
    let connections: usize = args[3].parse().map_err(|_| "CONNECTIONS")?;
    let seconds: f64 = args[4].parse().map_err(|_| "SECONDS")?;
    let period = Duration::from_secs_f64(connections as f64 / rate);
    let per_connection = (seconds * rate / connections as f64).floor() as u64;
    let request: std::sync::Arc<[u8]> = target.raw_request().into();

    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        streams.push(connect_blocking(target.addr)?);
    }
    let cpu_before = cpu_time();
    let start = Instant::now() + Duration::from_millis(20);
    let threads: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut stream)| {
            let (request, addr) = (request.clone(), target.addr);
            // Stagger the connections evenly over one period.
            let first = start + period.mul_f64(i as f64 / connections as f64);
            std::thread::spawn(move || {
                let mut samples = Samples {
                    latencies: Vec::with_capacity(per_connection as usize),
                    from_intended: Vec::with_capacity(per_connection as usize),
                    lags: Vec::with_capacity(per_connection as usize),
                    errors: 0,
                };
                let mut buf = vec![0u8; 16 * 1024];
                let mut previous_done = Instant::now();
                for k in 0..per_connection {
                    let intended = first + period.mul_f64(k as f64);
                    let busy_past_due = previous_done > intended;
                    let now = Instant::now();
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    let sent = Instant::now();
                    samples
                        .lags
                        .push(sent.saturating_duration_since(intended).as_nanos() as u64);
                    let ok = exchange_blocking(&mut stream, &request, &mut buf);
                    let done = Instant::now();
                    previous_done = done;
                    if !matches!(ok, Ok(true)) {
                        samples.errors += 1;
                        // The connection is unusable after an I/O error.
                        if ok.is_err() {
                            if let Ok(fresh) = connect_blocking(addr) {
                                stream = fresh;
                            }
                        }
                        continue;
                    }
                    samples
                        .from_intended
                        .push(done.duration_since(intended).as_nanos() as u64);
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
    let mut from_intended = Vec::new();
    let mut lags = Vec::new();
    let mut errors = 0;
    for thread in threads {
        let samples = thread.join().map_err(|_| "a connection thread panicked")?;
        latencies.extend(samples.latencies);
        from_intended.extend(samples.from_intended);
        lags.extend(samples.lags);
        errors += samples.errors;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_time() - cpu_before;
    latencies.sort_unstable();
    from_intended.sort_unstable();
    lags.sort_unstable();
    let pct = |p: f64| percentile_ms(&latencies, p);
    let total = latencies.len() as u64 + errors;
    println!(
        "RESULT requests={} errors={} achieved_rps={:.0} p50_ms={:.3} p90_ms={:.3} \
         p99_ms={:.3} p999_ms={:.3} max_ms={:.3} client_cpu_us_per_req={:.1} \
         send_lag_p50_ms={:.3} send_lag_p99_ms={:.3} late_over_100us={} wrk2_p99_ms={:.3}",
        total,
        errors,
        total as f64 / elapsed,
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(99.9),
        latencies.last().map_or(f64::NAN, |&n| n as f64 / 1e6),
        cpu.as_secs_f64() * 1e6 / total.max(1) as f64,
        percentile_ms(&lags, 50.0),
        percentile_ms(&lags, 99.0),
        lags.iter().filter(|&&l| l > 100_000).count(),
        percentile_ms(&from_intended, 99.0),
    );
    Ok(())
}

/// The `p`th percentile of `sorted` nanoseconds, in milliseconds (nearest
/// rank); NaN if there is none.
fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i] as f64 / 1e6
}

fn connect_blocking(addr: SocketAddr) -> Result<std::net::TcpStream, String> {
    let stream = std::net::TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    Ok(stream)
}

/// Sends `request` and reads one response (its length from
/// `Content-Length`; the servers measured all send one): `Ok(true)` for a
/// 2xx, `Ok(false)` for any other status, `Err` when the connection is no
/// longer usable.
fn exchange_blocking(
    stream: &mut std::net::TcpStream,
    request: &[u8],
    buf: &mut [u8],
) -> std::io::Result<bool> {
    use std::io::{Error, ErrorKind, Read, Write};
    stream.write_all(request)?;
    let mut filled = 0;
    let (head, length, ok) = loop {
        if filled == buf.len() {
            return Err(Error::other("response head larger than the buffer"));
        }
        match stream.read(&mut buf[filled..])? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf[..filled]).map_err(Error::other)? {
            httparse::Status::Partial => continue,
            httparse::Status::Complete(head) => {
                let length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .ok_or_else(|| Error::other("response without Content-Length"))?;
                let ok = response.code.is_some_and(|code| (200..300).contains(&code));
                break (head, length, ok);
            }
        }
    };
    // Requests are not pipelined: nothing may follow this response's body.
    let mut remaining = match (head + length).checked_sub(filled) {
        Some(remaining) => remaining,
        None => return Err(Error::other("bytes after the response")),
    };
    while remaining > 0 {
        let chunk = remaining.min(buf.len());
        match stream.read(&mut buf[..chunk])? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n => remaining -= n,
        }
    }
    Ok(ok)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// `exchange_blocking` against a server that answers each request with
    /// `answer`, written in two parts so the head arrives split.
    fn answered(answer: &'static [u8]) -> std::io::Result<bool> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut request = [0u8; 256];
            let _ = socket.read(&mut request).unwrap();
            let (first, rest) = answer.split_at(answer.len() / 3);
            socket.write_all(first).unwrap();
            socket.flush().unwrap();
            std::thread::sleep(Duration::from_millis(5));
            socket.write_all(rest).unwrap();
        });
        let mut stream = connect_blocking(addr).unwrap();
        let mut buf = vec![0u8; 64];
        let result = exchange_blocking(&mut stream, b"GET / HTTP/1.1\r\n\r\n", &mut buf);
        server.join().unwrap();
        result
    }

    #[test]
    fn the_raw_request_carries_the_headers_a_host_and_the_body_length() {
        let body = std::env::temp_dir().join(format!("openloop-test-{}", std::process::id()));
        std::fs::write(&body, b"a=1&b=2").unwrap();
        let headers = ["X-Twilio-Signature: abc=".to_string()];
        let target = Target::parse(
            "http://127.0.0.1:9/ivr?x=1",
            body.to_str().unwrap(),
            &headers,
        );
        std::fs::remove_file(&body).unwrap();
        assert_eq!(
            String::from_utf8(target.unwrap().raw_request()).unwrap(),
            "POST /ivr?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nx-twilio-signature: abc=\r\n\
             Content-Length: 7\r\n\r\na=1&b=2"
        );
    }

    #[test]
    fn reads_a_whole_response_split_across_reads_and_larger_than_the_buffer() {
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n\
            0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789";
        assert!(answered(answer).unwrap());
    }

    #[test]
    fn a_status_outside_2xx_is_a_failed_request_on_a_usable_connection() {
        assert!(!answered(b"HTTP/1.1 503 Unavailable\r\ncontent-length: 2\r\n\r\nno").unwrap());
    }

    #[test]
    fn refuses_responses_it_cannot_frame() {
        assert!(
            answered(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").is_err()
        );
        assert!(answered(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA").is_err());
        assert!(answered(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nshort").is_err());
    }
}
