//! ivrguard: a reverse-proxy sidecar for Twilio voice webhooks.
//!
//! One request's path, top to bottom, is in [`pipeline`]. The pure,
//! byte-level components it calls — [`signature`], [`form`], [`cipher`] —
//! do no I/O and are tested exhaustively on their own.

pub mod cipher;
pub mod config;
pub mod form;
pub mod secret;
pub mod signature;
