//! Shared helpers for the black-box tests in `tests/proxy_integration.rs`.
//!
//! - [`backend`]: the capture backend, an in-process hyper server on
//!   `127.0.0.1:0` that records every request (and every raw byte) it gets;
//! - [`proxy`]: runs the real `ivrguard` binary with a temporary config and
//!   random secrets, and reads its stdout/stderr;
//! - [`client`]: a raw HTTP/1.1 client, so tests can send exactly the bytes
//!   they mean (duplicate headers, malformed bodies, odd methods);
//! - [`twilio`]: an independent Twilio signer, form codec and AES-GCM
//!   decrypter, written here without using ivrguard's own modules;
//! - [`canary`]: per-run canaries and the "no leak in any encoding" grep.
//! - [`harness`]: a capture backend with the real proxy in front of it.
//! - [`webhook`]: Twilio-signed form POSTs and GETs for the proxy.
//! - [`tls`]: a CA made at test time, certificates for the TLS listener,
//!   and clients that verify them.

// Not every test binary that includes this module uses every helper.
#![allow(dead_code)]

pub mod backend;
pub mod canary;
pub mod client;
pub mod harness;
pub mod proxy;
pub mod tls;
pub mod twilio;
pub mod webhook;
