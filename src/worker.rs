//! Which worker thread the current code runs on.
//!
//! `ivrguard run` serves from `server.workers` threads, each with its own
//! single-threaded event loop (see [`crate::run`]): a connection, and every
//! request on it, stays on the thread that accepted it. Per-worker state,
//! such as the pool of connections to the app, is picked by this index, so
//! a request does not wait on another thread (the one exception: when
//! `upstream.max_connections` is reached and only another worker's pool
//! has an idle connection, see [`crate::upstream_connections`]). Threads
//! that are not workers (tests, the demo) are worker 0.

use std::cell::Cell;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as worker `index`.
pub fn set_index(index: usize) {
    INDEX.with(|i| i.set(index));
}

/// The current thread's worker index; 0 outside the worker threads.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}
