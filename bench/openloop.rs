//! A small load tool for `bench/run.sh`, for what `wrk` cannot do here.
//!
//! Every command but `startup` sends the raw HTTP/1.1 requests of a file
//! that holds them one after another (`bench/bodies.py` writes it: 1,000
//! distinct signed webhooks), cycling through them.
//!
//! - `check`: sends each request once on one keep-alive connection and
//!   fails unless every answer is a 2xx whose body contains EXPECT, so a
//!   target that refuses a body, or answers with something else (ivrguard's
//!   fallback TwiML is a 200 too), stops the run before it is timed.
//! - `rate`: open-loop load at a fixed rate, latency without coordinated
//!   omission. Each connection follows its own schedule (wrk2's model): a
//!   request that could not start on time because the connection was still
//!   busy is timed from when it *should* have started, so a stall shows up
//!   in every request it delayed. A request that starts late only because
//!   this tool's sleep overshot is timed from when it really started: that
//!   lateness is the tool's, not the server's. One thread per connection,
//!   blocking sockets, keep-alive (so the sends stay spread as scheduled;
//!   see [`rate`]); its CPU per request is printed (oha costs ~100 µs per
//!   request on this machine, perf notes §A4). With HISTOGRAM_FILE, every
//!   latency is also written there (whole µs, `us count` lines), so that
//!   `pool` can take percentiles over all rounds' samples.
//! - `pool`: percentiles over the samples of several histogram files.
//! - `hold`: opens N keep-alive connections, sends one request on each, and
//!   keeps them open, so the script can read the proxy's memory meanwhile.
//! - `startup`: runs a command and reports the time until a URL answers 200.
//!
//! ```text
//! openloop check   IP:PORT REQUESTS_FILE EXPECT
//! openloop rate    IP:PORT REQUESTS_FILE RATE CONNECTIONS SECONDS [HISTOGRAM_FILE]
//! openloop pool    HISTOGRAM_FILE...
//! openloop hold    IP:PORT REQUESTS_FILE CONNECTIONS SECONDS
//! openloop startup URL TIMEOUT_MS COMMAND [ARG]...
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("check") if args.len() == 4 => check(&args[1..]),
        Some("rate") if args.len() == 6 || args.len() == 7 => rate(&args[1..]),
        Some("pool") if args.len() >= 2 => pool(&args[1..]),
        Some("hold") if args.len() == 5 => hold(&args[1..]),
        Some("startup") if args.len() >= 4 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))
            .and_then(|runtime| runtime.block_on(startup(&args[1..]))),
        _ => Err("usage: see the header of bench/openloop.rs".to_string()),
    };
    if let Err(e) = result {
        eprintln!("openloop: {e}");
        std::process::exit(1);
    }
}

/// One raw HTTP/1.1 request, head and body, as it goes on the wire.
type Raw = Arc<[u8]>;

/// The target's address and the requests to send it.
fn target(addr: &str, requests_file: &str) -> Result<(SocketAddr, Vec<Raw>), String> {
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr}: {e} (use IP:port)"))?;
    let file = std::fs::read(requests_file).map_err(|e| format!("{requests_file}: {e}"))?;
    let requests = split_requests(&file).map_err(|e| format!("{requests_file}: {e}"))?;
    Ok((addr, requests))
}

/// Cuts requests written one after another into one each: a head, then
/// as many body bytes as its `Content-Length` says.
fn split_requests(mut data: &[u8]) -> Result<Vec<Raw>, String> {
    let mut requests = Vec::new();
    while !data.is_empty() {
        let which = requests.len() + 1;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let head = match request.parse(data) {
            Ok(httparse::Status::Complete(head)) => head,
            Ok(httparse::Status::Partial) => return Err(format!("request {which} is cut short")),
            Err(e) => return Err(format!("request {which}: {e}")),
        };
        let length = content_length(request.headers)
            .ok_or(format!("request {which} has no Content-Length"))?;
        let end = head + length;
        if end > data.len() {
            return Err(format!("request {which}'s body is cut short"));
        }
        requests.push(data[..end].into());
        data = &data[end..];
    }
    match requests.is_empty() {
        true => Err("no requests".to_string()),
        false => Ok(requests),
    }
}

/// A message's `Content-Length`, if it has one that is a number.
fn content_length(headers: &[httparse::Header]) -> Option<usize> {
    let header = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))?;
    std::str::from_utf8(header.value).ok()?.trim().parse().ok()
}

fn check(args: &[String]) -> Result<(), String> {
    let (addr, requests) = target(&args[0], &args[1])?;
    let expect = args[2].as_bytes();
    let mut stream = connect_blocking(addr)?;
    let (mut buf, mut body) = (vec![0u8; 16 * 1024], Vec::new());
    let mut good = 0;
    for request in &requests {
        body.clear();
        match exchange_blocking(&mut stream, request, &mut buf, Some(&mut body)) {
            Ok(true) if body.windows(expect.len()).any(|w| w == expect) => good += 1,
            Ok(_) => {}
            // The connection is unusable after an I/O error.
            Err(_) => stream = connect_blocking(addr)?,
        }
    }
    println!("CHECK requests={} good={good}", requests.len());
    match good == requests.len() {
        true => Ok(()),
        false => Err(format!(
            "{addr}: {} of {} requests did not get a 2xx containing {:?}",
            requests.len() - good,
            requests.len(),
            args[2]
        )),
    }
}

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
    let (addr, requests) = target(&args[0], &args[1])?;
    let rate: f64 = args[2].parse().map_err(|_| "RATE must be a number")?;
    let connections: usize = args[3].parse().map_err(|_| "CONNECTIONS")?;
    let seconds: f64 = args[4].parse().map_err(|_| "SECONDS")?;
    let period = Duration::from_secs_f64(connections as f64 / rate);
    let per_connection = (seconds * rate / connections as f64).floor() as u64;
    let requests: Arc<[Raw]> = requests.into();

    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        streams.push(connect_blocking(addr)?);
    }
    let cpu_before = cpu_time();
    let start = Instant::now() + Duration::from_millis(20);
    let threads: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut stream)| {
            let requests = requests.clone();
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
                    // Together the connections go through the requests in
                    // turn: connection i sends i, i + C, i + 2C, ...
                    let request = &requests[(i + k as usize * connections) % requests.len()];
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
                    let ok = exchange_blocking(&mut stream, request, &mut buf, None);
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
    if let Some(file) = args.get(5) {
        let lines: String = histogram(&latencies)
            .iter()
            .map(|(us, count)| format!("{us} {count}\n"))
            .collect();
        std::fs::write(file, lines).map_err(|e| format!("{file}: {e}"))?;
    }
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
    sorted[rank(p, sorted.len() as u64) as usize] as f64 / 1e6
}

/// The index of the `p`th percentile among `n` sorted samples.
fn rank(p: f64, n: u64) -> u64 {
    ((p / 100.0) * n.saturating_sub(1) as f64).round() as u64
}

/// Sorted nanoseconds counted by whole microsecond: (µs, count), ascending.
fn histogram(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut buckets: Vec<(u64, u64)> = Vec::new();
    for &ns in sorted {
        match buckets.last_mut() {
            Some((us, count)) if *us == ns / 1000 => *count += 1,
            _ => buckets.push((ns / 1000, 1)),
        }
    }
    buckets
}

/// Percentiles over every sample of the histogram files `rate` wrote (a
/// target's rounds, pooled as the perf notes' protocol asks), at the
/// histograms' whole-µs resolution.
fn pool(files: &[String]) -> Result<(), String> {
    let buckets = read_histograms(files)?;
    let pct = |p| pooled_percentile_ms(&buckets, p);
    println!(
        "POOLED samples={} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} p999_ms={:.3}",
        buckets.values().sum::<u64>(),
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(99.9)
    );
    Ok(())
}

/// The files' `us count` lines, added up by µs.
fn read_histograms(files: &[String]) -> Result<BTreeMap<u64, u64>, String> {
    let mut buckets = BTreeMap::<u64, u64>::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
        for line in text.lines() {
            let parsed = line
                .split_once(' ')
                .and_then(|(us, n)| Some((us.parse::<u64>().ok()?, n.parse::<u64>().ok()?)));
            let (us, count) = parsed.ok_or(format!("{file}: not `us count`: {line:?}"))?;
            *buckets.entry(us).or_default() += count;
        }
    }
    Ok(buckets)
}

/// The `p`th percentile, in milliseconds, of the samples counted by µs in
/// `buckets` (nearest rank, as [`percentile_ms`]); NaN if there is none.
fn pooled_percentile_ms(buckets: &BTreeMap<u64, u64>, p: f64) -> f64 {
    let rank = rank(p, buckets.values().sum());
    let mut seen = 0;
    buckets
        .iter()
        .find(|(_, &count)| {
            seen += count;
            seen > rank
        })
        .map_or(f64::NAN, |(&us, _)| us as f64 / 1e3)
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
/// `Content-Length`; the servers measured all send one), appending its body
/// to `body` if given: `Ok(true)` for a 2xx, `Ok(false)` for any other
/// status, `Err` when the connection is no longer usable.
fn exchange_blocking(
    stream: &mut std::net::TcpStream,
    request: &[u8],
    buf: &mut [u8],
    mut body: Option<&mut Vec<u8>>,
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
                let length = content_length(response.headers)
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
    if let Some(body) = body.as_deref_mut() {
        body.extend_from_slice(&buf[head..filled]);
    }
    while remaining > 0 {
        let chunk = remaining.min(buf.len());
        let read = match stream.read(&mut buf[..chunk])? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n => n,
        };
        remaining -= read;
        if let Some(body) = body.as_deref_mut() {
            body.extend_from_slice(&buf[..read]);
        }
    }
    Ok(ok)
}

fn hold(args: &[String]) -> Result<(), String> {
    let (addr, requests) = target(&args[0], &args[1])?;
    let connections: usize = args[2].parse().map_err(|_| "CONNECTIONS")?;
    let seconds: f64 = args[3].parse().map_err(|_| "SECONDS")?;
    let mut streams = Vec::with_capacity(connections);
    let mut buf = vec![0u8; 16 * 1024];
    let mut ok = 0;
    for i in 0..connections {
        let mut stream = connect_blocking(addr)?;
        if let Ok(true) =
            exchange_blocking(&mut stream, &requests[i % requests.len()], &mut buf, None)
        {
            ok += 1;
        }
        streams.push(stream);
    }
    println!("HELD connections={connections} ok={ok}");
    std::thread::sleep(Duration::from_secs_f64(seconds));
    drop(streams);
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
    /// `answer`, written in two parts so the head arrives split: whether it
    /// was a 2xx, and the body read.
    fn answered(answer: &'static [u8]) -> std::io::Result<(bool, Vec<u8>)> {
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
        let mut body = Vec::new();
        let result = exchange_blocking(
            &mut stream,
            b"GET / HTTP/1.1\r\n\r\n",
            &mut buf,
            Some(&mut body),
        );
        server.join().unwrap();
        result.map(|ok| (ok, body))
    }

    #[test]
    fn splits_requests_written_one_after_another_by_their_content_length() {
        let first = "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\na=1&b=2";
        // A body that looks like the start of a request is still body.
        let second = "POST /b HTTP/1.1\r\ncontent-length: 16\r\n\r\nPOST /c HTTP/1.1";
        let requests = split_requests([first, second].concat().as_bytes()).unwrap();
        assert_eq!(requests.len(), 2);
        assert_eq!(&*requests[0], first.as_bytes());
        assert_eq!(&*requests[1], second.as_bytes());
    }

    #[test]
    fn refuses_a_requests_file_it_cannot_cut_exactly() {
        for (file, why) in [
            ("", "no requests"),
            (
                "POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nshort",
                "body is cut short",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\n\r\n",
                "has no Content-Length",
            ),
            ("POST / HTTP/1.1\r\nContent-Length: 0\r\n", "cut short"),
        ] {
            let error = split_requests(file.as_bytes()).unwrap_err();
            assert!(error.contains(why), "{file:?}: {error}");
        }
    }

    #[test]
    fn pooled_percentiles_are_those_of_all_samples_together() {
        // Two rounds with different spreads: pooling is not the mean of
        // their percentiles.
        let round = |from: u64, step: u64, n: u64| -> Vec<u64> {
            (0..n).map(|i| (from + i * step) * 1000 + 999).collect()
        };
        let (a, b) = (round(100, 1, 900), round(150, 7, 300));
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for (name, samples) in [("a", &a), ("b", &b)] {
            let path = dir.path().join(name);
            let lines: String = histogram(samples)
                .iter()
                .map(|(us, n)| format!("{us} {n}\n"))
                .collect();
            std::fs::write(&path, lines).unwrap();
            files.push(path.to_str().unwrap().to_string());
        }
        let mut all: Vec<u64> = a.iter().chain(&b).map(|ns| ns / 1000 * 1000).collect();
        all.sort_unstable();
        let buckets = read_histograms(&files).unwrap();
        assert_eq!(buckets.values().sum::<u64>(), 1200);
        for p in [50.0, 90.0, 99.0, 99.9] {
            let (pooled, expected) = (pooled_percentile_ms(&buckets, p), percentile_ms(&all, p));
            assert!(
                (pooled - expected).abs() < 1e-9,
                "p{p}: {pooled} != {expected}"
            );
        }
        assert!(pool(&files).is_ok());
    }

    #[test]
    fn reads_a_whole_response_split_across_reads_and_larger_than_the_buffer() {
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n\
            0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789";
        let (ok, body) = answered(answer).unwrap();
        assert!(ok);
        assert_eq!(body, answer[answer.len() - 100..]);
    }

    #[test]
    fn a_status_outside_2xx_is_a_failed_request_on_a_usable_connection() {
        let answer = answered(b"HTTP/1.1 503 Unavailable\r\ncontent-length: 2\r\n\r\nno");
        assert_eq!(answer.unwrap(), (false, b"no".to_vec()));
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
