//! The application stand-in for `docker/test.sh`: a careless legacy app.
//!
//! It listens on `$HOST:$PORT` (default `0.0.0.0:3000`, like
//! `examples/legacy-node`), prints one line per request to stdout — method,
//! target, the `X-Twilio-Signature` it got (or `absent`), and the raw body —
//! and answers a little TwiML. Printing the body is the point: it is what a
//! legacy app's logs hold, and the container test reads those logs to check
//! that only ciphertext arrived.
//!
//! Standard library only, so it builds statically in seconds and runs in a
//! `FROM scratch` image (no base image can be pulled on the test machines).
//! One request per connection (`Connection: close`); no signal handling, so
//! the test stops it with a short timeout.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

const TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Say>captured</Say></Response>";
const MAX_BODY: usize = 1 << 20;

fn main() {
    let host = std::env::var("HOST").unwrap_or_else(|_| "0.0.0.0".to_string());
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".to_string());
    let listener = match TcpListener::bind(format!("{host}:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("test-backend: cannot listen on {host}:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!("test-backend listening on {host}:{port}");
    for stream in listener.incoming().flatten() {
        thread::spawn(move || {
            if let Err(e) = serve(stream) {
                eprintln!("test-backend: {e}");
            }
        });
    }
}

fn serve(stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut content_length = 0usize;
    let mut signature: Option<String> = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.trim().parse().unwrap_or(0),
            "x-twilio-signature" => signature = Some(value.trim().to_string()),
            _ => {}
        }
    }
    let mut body = vec![0u8; content_length.min(MAX_BODY)];
    reader.read_exact(&mut body)?;

    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("-");
    let target = parts.next().unwrap_or("-");
    println!(
        "request {method} {target} signature={} body={}",
        signature.as_deref().unwrap_or("absent"),
        String::from_utf8_lossy(&body)
    );
    io::stdout().flush()?;

    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 200 OK\r\ncontent-type: text/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{TWIML}",
        TWIML.len()
    )?;
    out.flush()
}
