//! ivrguard: a reverse-proxy sidecar for Twilio voice webhooks.
//!
//! One request's path, top to bottom, is in [`pipeline`]. The pure,
//! byte-level components it calls — [`signature`], [`form`], [`cipher`] —
//! do no I/O and are tested exhaustively on their own.
//!
//! No `unsafe` code, but for two calls into the C library that have no safe
//! wrapper (`malloc_trim` and `madvise`, in [`heap_release`]); the lint
//! below keeps it that way.

#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod body;
pub mod check;
pub mod cipher;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod demo;
pub mod drain;
pub mod form;
pub mod health;
pub mod heap_release;
pub mod json_body;
pub mod log_handoff;
pub mod log_limit;
pub mod logging;
pub mod memory_guard;
pub mod metrics;
pub mod mismatch;
pub mod panic_hook;
pub mod pipeline;
pub mod rejection;
pub mod reload;
pub mod resolve;
pub mod run;
pub mod secret;
pub mod server;
pub mod signals;
pub mod signature;
pub mod tls;
pub mod upstream;
pub mod upstream_connections;
pub mod upstream_pool;
pub mod worker;
pub mod write_stall;
