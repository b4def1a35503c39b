//! Log lines a worker writes reach the writer thread's queue when the
//! worker goes idle, not one by one.
//!
//! Putting a line on `tracing-appender`'s queue wakes the writer thread
//! when it sleeps (a futex wake-up, and on two CPUs often a context switch
//! away from the worker). At low rates it sleeps between any two requests,
//! so every request paid that wake-up, and paid it before its response was
//! sent: the access line is logged with the response's head.
//!
//! So on the worker threads ([`Deferral::on_this_thread`]) a line is kept
//! in a small per-thread buffer, and the buffer goes to the queue when the
//! worker's event loop is about to wait for I/O (its `on_thread_park` hook
//! calls [`hand_over`]), by then the response is on its way. Also when
//! [`MAX_LINES`] or [`MAX_BYTES`] are held (a busy worker that does not
//! wait), and when the deferral ends (the worker stops, or unwinds). Lines
//! go to the queue one by one, so its bound and its count of dropped lines
//! mean what they did. Threads without a deferral (the admin server, tests,
//! the demo) write straight to the queue.

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::fmt::MakeWriter;

/// A worker hands over its lines once it holds this many.
pub const MAX_LINES: usize = 32;
/// Or once they add up to this many bytes; a longer line goes straight on.
pub const MAX_BYTES: usize = 16 * 1024;

thread_local! {
    static DEFERRING: Cell<bool> = const { Cell::new(false) };
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
}

/// The lines a thread holds, and where they go.
#[derive(Default)]
struct Pending {
    /// The writer the lines are for, by its [`DeferringMakeWriter`]'s id.
    target: Option<(u64, Box<dyn Write>)>,
    bytes: Vec<u8>,
    /// Where each line ends in `bytes`.
    ends: Vec<usize>,
}

impl Pending {
    fn hand_over(&mut self) {
        if let Some((_, target)) = self.target.as_mut() {
            let mut start = 0;
            for &end in &self.ends {
                // A line the queue cannot take is dropped and counted there.
                let _ = target.write_all(&self.bytes[start..end]);
                start = end;
            }
        }
        self.bytes.clear();
        self.ends.clear();
        // One long burst's buffer is not kept for the thread's life.
        if self.bytes.capacity() > MAX_BYTES {
            self.bytes = Vec::new();
        }
    }
}

/// Hands the current thread's held lines to the queue, in order. The
/// workers' event loops call it before they wait (`on_thread_park`).
pub fn hand_over() {
    // Never re-entered (the targets log nothing); if it were, the lines
    // stay held until the next call instead of panicking.
    PENDING.with(|pending| {
        if let Ok(mut pending) = pending.try_borrow_mut() {
            pending.hand_over();
        }
    });
}

/// Holds the current thread's lines until [`hand_over`], while it lives.
/// Ending it (dropped, also when unwinding) hands over what is held.
pub struct Deferral(());

impl Deferral {
    pub fn on_this_thread() -> Deferral {
        DEFERRING.with(|d| d.set(true));
        Deferral(())
    }
}

impl Drop for Deferral {
    fn drop(&mut self) {
        DEFERRING.with(|d| d.set(false));
        hand_over();
    }
}

/// Wraps the queue's writer: each formatted line is held on a deferring
/// thread, written straight on any other.
#[derive(Clone)]
pub struct DeferringMakeWriter<W> {
    inner: W,
    id: u64,
}

impl<W> DeferringMakeWriter<W> {
    pub fn new(inner: W) -> Self {
        static IDS: AtomicU64 = AtomicU64::new(0);
        DeferringMakeWriter {
            inner,
            id: IDS.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl<'a, W: Write + Clone + 'static> MakeWriter<'a> for DeferringMakeWriter<W> {
    type Writer = DeferringWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        DeferringWriter { maker: self }
    }
}

/// Receives one formatted line per `write` call.
pub struct DeferringWriter<'a, W> {
    maker: &'a DeferringMakeWriter<W>,
}

impl<W: Write + Clone + 'static> DeferringWriter<'_, W> {
    /// Holds `line`; false when it must be written straight on instead.
    fn hold(&self, line: &[u8]) -> bool {
        if !DEFERRING.with(Cell::get) || line.len() > MAX_BYTES {
            return false;
        }
        PENDING.with(|pending| {
            let Ok(mut pending) = pending.try_borrow_mut() else {
                return false;
            };
            if pending.target.as_ref().map(|(id, _)| *id) != Some(self.maker.id) {
                // Lines for another writer (a test's second subscriber) go
                // first, to it.
                pending.hand_over();
                pending.target = Some((self.maker.id, Box::new(self.maker.inner.clone())));
            }
            if pending.bytes.len() + line.len() > MAX_BYTES {
                pending.hand_over();
            }
            pending.bytes.extend_from_slice(line);
            let end = pending.bytes.len();
            pending.ends.push(end);
            if pending.ends.len() >= MAX_LINES {
                pending.hand_over();
            }
            true
        })
    }
}

impl<W: Write + Clone + 'static> Write for DeferringWriter<'_, W> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if self.hold(line) {
            return Ok(line.len());
        }
        // Held lines go before this one, so a thread's lines keep order.
        hand_over();
        self.maker.inner.clone().write_all(line)?;
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects what reaches "the queue", one entry per write.
    #[derive(Clone, Default)]
    struct Queue(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Queue {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Queue {
        fn lines(&self) -> Vec<String> {
            let lines = self.0.lock().unwrap();
            lines
                .iter()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect()
        }
    }

    fn write_line(maker: &DeferringMakeWriter<Queue>, line: &str) {
        maker.make_writer().write_all(line.as_bytes()).unwrap();
    }

    // Each test runs on a thread of its own: the deferral is per thread.
    fn on_a_thread(test: impl FnOnce() + Send + 'static) {
        std::thread::spawn(test).join().unwrap();
    }

    #[test]
    fn without_a_deferral_lines_go_straight_to_the_queue() {
        on_a_thread(|| {
            let queue = Queue::default();
            let maker = DeferringMakeWriter::new(queue.clone());
            write_line(&maker, "one\n");
            assert_eq!(queue.lines(), ["one\n"]);
        });
    }

    #[test]
    fn held_lines_reach_the_queue_one_by_one_in_order_on_hand_over() {
        on_a_thread(|| {
            let queue = Queue::default();
            let maker = DeferringMakeWriter::new(queue.clone());
            let deferral = Deferral::on_this_thread();
            write_line(&maker, "one\n");
            write_line(&maker, "two\n");
            assert!(queue.lines().is_empty(), "held until the worker idles");
            hand_over();
            assert_eq!(queue.lines(), ["one\n", "two\n"]);
            write_line(&maker, "three\n");
            drop(deferral);
            assert_eq!(queue.lines(), ["one\n", "two\n", "three\n"]);
            write_line(&maker, "four\n");
            assert_eq!(queue.lines().len(), 4, "no deferral any more");
        });
    }

    #[test]
    fn a_busy_worker_hands_over_at_max_lines_and_max_bytes() {
        on_a_thread(|| {
            let queue = Queue::default();
            let maker = DeferringMakeWriter::new(queue.clone());
            let _deferral = Deferral::on_this_thread();
            for i in 0..MAX_LINES - 1 {
                write_line(&maker, &format!("{i}\n"));
            }
            assert!(queue.lines().is_empty());
            write_line(&maker, "last\n");
            assert_eq!(queue.lines().len(), MAX_LINES);
            assert_eq!(queue.lines()[MAX_LINES - 1], "last\n");

            let half = "x".repeat(MAX_BYTES / 2);
            write_line(&maker, &half);
            write_line(&maker, &half);
            assert_eq!(queue.lines().len(), MAX_LINES, "exactly MAX_BYTES is held");
            write_line(&maker, "y");
            assert_eq!(
                queue.lines().len(),
                MAX_LINES + 2,
                "over it, the held go on"
            );
            hand_over();
            assert_eq!(queue.lines().last().unwrap(), "y");
        });
    }

    #[test]
    fn a_line_too_long_to_hold_goes_straight_on_after_the_held_ones() {
        on_a_thread(|| {
            let queue = Queue::default();
            let maker = DeferringMakeWriter::new(queue.clone());
            let _deferral = Deferral::on_this_thread();
            write_line(&maker, "short\n");
            let long = "z".repeat(MAX_BYTES + 1);
            write_line(&maker, &long);
            assert_eq!(queue.lines(), ["short\n".to_string(), long]);
        });
    }

    #[test]
    fn lines_held_for_one_writer_go_to_it_before_another_writes() {
        on_a_thread(|| {
            let (first, second) = (Queue::default(), Queue::default());
            let (a, b) = (
                DeferringMakeWriter::new(first.clone()),
                DeferringMakeWriter::new(second.clone()),
            );
            let _deferral = Deferral::on_this_thread();
            write_line(&a, "for a\n");
            write_line(&b, "for b\n");
            assert_eq!(first.lines(), ["for a\n"]);
            hand_over();
            assert_eq!(second.lines(), ["for b\n"]);
        });
    }

    #[test]
    fn a_thread_that_unwinds_hands_over_what_it_held() {
        let queue = Queue::default();
        let maker = DeferringMakeWriter::new(queue.clone());
        let unwound = std::thread::spawn(move || {
            let _deferral = Deferral::on_this_thread();
            write_line(&maker, "before the panic\n");
            panic!("a worker unwinds");
        })
        .join();
        assert!(unwound.is_err());
        assert_eq!(queue.lines(), ["before the panic\n"]);
    }
}
