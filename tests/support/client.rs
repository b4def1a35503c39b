//! A raw HTTP/1.1 client: the request is written exactly as built (duplicate
//! headers, odd methods, malformed bodies and all), one request per
//! connection, and the whole response is read until the server closes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request, serialised byte for byte as built.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl RawRequest {
    /// A request with `Host: host` and nothing else yet.
    pub fn new(method: &str, target: &str, host: &str) -> Self {
        RawRequest {
            method: method.to_owned(),
            target: target.to_owned(),
            headers: vec![("Host".to_owned(), host.as_bytes().to_vec())],
            body: Vec::new(),
        }
    }

    /// Adds a header (repeat the call for a repeated header).
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers
            .push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    /// Sets the body; `Content-Length` is added when serialising.
    pub fn body(mut self, body: impl AsRef<[u8]>) -> Self {
        self.body = body.as_ref().to_vec();
        self
    }

    /// The bytes on the wire. Adds `Content-Length` (for a body or a POST)
    /// unless the request has its own framing header, and `Connection:
    /// close` unless it has a `Connection` header.
    pub fn to_bytes(&self) -> Vec<u8> {
        let has = |name: &str| {
            self.headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(name))
        };
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target).into_bytes();
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        let framed = has("content-length") || has("transfer-encoding");
        if !framed && (!self.body.is_empty() || self.method != "GET") {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        if !has("connection") {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

/// A parsed response, plus every byte received.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub raw: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` on a fresh connection and reads the response until the
/// server closes the connection (10 s at most).
pub async fn send(addr: SocketAddr, request: &RawRequest) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect to ivrguard");
    // The server may answer (413, 400) and close before reading a large
    // body; a failed write is then not an error, the answer is what counts.
    let _ = stream.write_all(&request.to_bytes()).await;
    read_response(stream).await
}

/// Reads a whole response from `stream` (TCP, or TLS) until EOF (or a reset
/// after bytes arrived) and parses it.
pub async fn read_response(mut stream: impl AsyncRead + Unpin) -> HttpResponse {
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if !raw.is_empty() => {
                    eprintln!("read ended with {e} after {} bytes", raw.len());
                    break;
                }
                Err(e) => panic!("reading the response: {e}"),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "no complete response within 10 s; got so far: {:?}",
        String::from_utf8_lossy(&raw)
    );
    parse_response(raw)
}

fn parse_response(raw: Vec<u8>) -> HttpResponse {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "response has no header end: {:?}",
                String::from_utf8_lossy(&raw)
            )
        });
    let head = std::str::from_utf8(&raw[..head_end]).expect("response head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    if (100..200).contains(&status) && status != 101 {
        // An interim answer (`100 Continue`): the final one follows, as a
        // client reads it. `raw` keeps both.
        let mut last = parse_response(raw[head_end + 4..].to_vec());
        last.raw = raw;
        return last;
    }
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (n, v) = line.split_once(':').expect("header line has a colon");
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let rest = &raw[head_end + 4..];
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else if let Some((_, len)) = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        let len: usize = len.parse().expect("numeric Content-Length");
        assert!(
            rest.len() >= len,
            "body shorter ({}) than Content-Length {len}",
            rest.len()
        );
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    HttpResponse {
        status,
        headers,
        body,
        raw,
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&rest[..line_end]).expect("chunk size is ASCII");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// `GET path` (for the admin listener).
pub async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    send(addr, &RawRequest::new("GET", path, &addr.to_string())).await
}

/// Splits `raw` into the complete responses it holds, in order, and returns
/// them with the bytes left over (an incomplete response). Responses are
/// framed by `Content-Length` or chunked encoding; one with neither runs to
/// the end of `raw`. For pipelined requests on one connection.
pub fn split_responses(raw: &[u8]) -> (Vec<HttpResponse>, &[u8]) {
    let mut responses = Vec::new();
    let mut rest = raw;
    while let Some((response, used)) = parse_one(rest) {
        responses.push(response);
        rest = &rest[used..];
    }
    (responses, rest)
}

/// One complete response at the start of `raw` and its length on the wire;
/// `None` if `raw` does not start with a complete, well-formed response.
fn parse_one(raw: &[u8]) -> Option<(HttpResponse, usize)> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            line.split_once(':')
                .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        })
        .collect::<Option<_>>()?;
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let start = head_end + 4;
    let (body, end) =
        if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            let mut body = Vec::new();
            let mut at = start;
            loop {
                let line_len = raw[at..].windows(2).position(|w| w == b"\r\n")?;
                let size_text = std::str::from_utf8(&raw[at..at + line_len]).ok()?;
                let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
                at += line_len + 2;
                if size == 0 {
                    // No trailers in these tests: the final CRLF follows.
                    if raw.len() < at + 2 {
                        return None;
                    }
                    break (body, at + 2);
                }
                if raw.len() < at + size + 2 {
                    return None;
                }
                body.extend_from_slice(&raw[at..at + size]);
                at += size + 2;
            }
        } else if let Some(len) = find("content-length") {
            let len: usize = len.parse().ok()?;
            if raw.len() < start + len {
                return None;
            }
            (raw[start..start + len].to_vec(), start + len)
        } else {
            (raw[start..].to_vec(), raw.len())
        };
    Some((
        HttpResponse {
            status,
            headers,
            body,
            raw: raw[..end].to_vec(),
        },
        end,
    ))
}

/// Sends one HTTP/2 (cleartext, prior knowledge) request of just `fields`
/// (pseudo-headers first, as given) and no body, written by hand so that
/// values no HTTP library would send (a space in `:path`) go out as they
/// are: the preface, an empty SETTINGS frame, and one HEADERS frame
/// (END_STREAM | END_HEADERS) whose HPACK block is literal fields, never
/// indexed, no Huffman coding. Returns every byte the server sent until it
/// closed the connection or 2 s passed.
pub async fn h2_raw_headers(addr: SocketAddr, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x10); // literal header field never indexed, new name
        hpack_string(&mut block, name.as_bytes());
        hpack_string(&mut block, value.as_bytes());
    }
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_frame(&mut bytes, 0x4, 0, 0, &[]); // SETTINGS
    h2_frame(&mut bytes, 0x1, 0x5, 1, &block); // HEADERS, stream 1
    let mut stream = TcpStream::connect(addr).await.expect("connect to ivrguard");
    stream.write_all(&bytes).await.expect("send the h2 request");
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            received.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    received
}

/// An HPACK string literal without Huffman coding: the length as an
/// integer with a 7-bit prefix (RFC 7541 §5.1), then the bytes.
fn hpack_string(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut len = bytes.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len % 0x80) as u8 | 0x80);
            len /= 0x80;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(bytes);
}

/// One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload.
fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}
