//! Log lines a worker writes reach the writer thread's queue when a
//! worker goes idle, not one by one, and in the order they were written.
//!
//! Putting a line on `tracing-appender`'s queue wakes the writer thread
//! when it sleeps (a futex wake-up, and on two CPUs often a context switch
//! away from the worker). At low rates it sleeps between any two requests,
//! so every request paid that wake-up, and paid it before its response was
//! sent: the access line is logged with the response's head.
//!
//! So on the worker threads ([`Deferral::on_this_thread`]) a line is held
//! in a buffer all threads writing to the same queue share, and the buffer
//! goes to the queue when a worker's event loop is about to wait for I/O
//! (its `on_thread_park` hook calls [`hand_over`]), by then the response
//! is on its way. Also when [`MAX_LINES`] or [`MAX_BYTES`] are held (busy
//! workers that do not wait), and when a deferral ends (a worker stops, or
//! unwinds). Lines go to the queue one by one, so its bound and its count
//! of dropped lines mean what they did.
//!
//! One buffer, not one per thread: lines reach the queue in the order they
//! were written, whichever thread wrote them. With a buffer per thread a
//! line could wait in one worker's buffer while a later request's line,
//! from another worker that went idle first, was written out before it
//! (seen in a test: two webhooks sent one after the other, their access
//! lines out of order). Threads without a deferral (the admin server,
//! reloads, tests, the demo) hand over what is held, then write their line.

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing_subscriber::fmt::MakeWriter;

/// Lines are handed over once this many are held.
pub const MAX_LINES: usize = 32;
/// Or once they add up to this many bytes; a longer line goes straight on.
pub const MAX_BYTES: usize = 16 * 1024;

thread_local! {
    static DEFERRING: Cell<bool> = const { Cell::new(false) };
    /// The buffer this thread last held a line in: what [`hand_over`]
    /// hands over.
    static HELD_IN: RefCell<Option<Arc<dyn HandOver>>> = const { RefCell::new(None) };
    /// Whether this thread holds a hold's lock.
    static LOCKING: Cell<bool> = const { Cell::new(false) };
}

/// A buffer of held lines, whatever queue it is for.
trait HandOver: Send + Sync {
    fn hand_over(&self);
}

/// The lines held for one queue, shared by every thread writing to it.
struct Hold<W> {
    /// How many lines are held: read without the lock, so that a worker
    /// going idle with nothing held takes no lock.
    count: AtomicUsize,
    lines: Mutex<Held<W>>,
}

struct Held<W> {
    queue: W,
    bytes: Vec<u8>,
    /// Where each line ends in `bytes`.
    ends: Vec<usize>,
}

impl<W: Write> Held<W> {
    fn hand_over(&mut self) {
        let mut start = 0;
        for &end in &self.ends {
            // A line the queue cannot take is dropped and counted there.
            let _ = self.queue.write_all(&self.bytes[start..end]);
            start = end;
        }
        self.bytes.clear();
        self.ends.clear();
        // One long burst's buffer is not kept for the process's life.
        if self.bytes.capacity() > MAX_BYTES {
            self.bytes = Vec::new();
        }
    }
}

impl<W> Hold<W> {
    /// The held lines, locked; `None` on a thread that already holds a
    /// hold's lock. That would be a line logged from inside the queue's
    /// `write`, which logs nothing: it is dropped rather than deadlock.
    fn lock(&self) -> Option<Locked<'_, W>> {
        if LOCKING.with(|locking| locking.replace(true)) {
            return None;
        }
        // Nothing panics while holding it; if something did, the lines
        // are still whole (each is appended with its end at once).
        let guard = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        Some(Locked(guard))
    }
}

struct Locked<'a, W>(MutexGuard<'a, Held<W>>);

impl<W> Drop for Locked<'_, W> {
    fn drop(&mut self) {
        LOCKING.with(|locking| locking.set(false));
    }
}

impl<W> std::ops::Deref for Locked<'_, W> {
    type Target = Held<W>;
    fn deref(&self) -> &Held<W> {
        &self.0
    }
}

impl<W> std::ops::DerefMut for Locked<'_, W> {
    fn deref_mut(&mut self) -> &mut Held<W> {
        &mut self.0
    }
}

impl<W: Write + Send> HandOver for Hold<W> {
    fn hand_over(&self) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(mut held) = self.lock() {
            held.hand_over();
            self.count.store(0, Ordering::Release);
        }
    }
}

/// Hands the lines held where this thread last held one to the queue, in
/// order, other threads' included. The workers' event loops call it
/// before they wait (`on_thread_park`).
pub fn hand_over() {
    // Never re-entered (the queue logs nothing); if it were, the lines
    // stay held until the next call instead of panicking.
    HELD_IN.with(|held_in| {
        if let Ok(held_in) = held_in.try_borrow() {
            if let Some(hold) = held_in.as_ref() {
                hold.hand_over();
            }
        }
    });
}

/// Holds the lines the current thread writes until [`hand_over`], while
/// it lives. Ending it (dropped, also when unwinding) hands over what is
/// held.
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
/// thread, written straight on any other (after the held ones).
pub struct DeferringMakeWriter<W> {
    hold: Arc<Hold<W>>,
}

impl<W> Clone for DeferringMakeWriter<W> {
    fn clone(&self) -> Self {
        DeferringMakeWriter {
            hold: self.hold.clone(),
        }
    }
}

impl<W> DeferringMakeWriter<W> {
    pub fn new(queue: W) -> Self {
        DeferringMakeWriter {
            hold: Arc::new(Hold {
                count: AtomicUsize::new(0),
                lines: Mutex::new(Held {
                    queue,
                    bytes: Vec::new(),
                    ends: Vec::new(),
                }),
            }),
        }
    }
}

impl<'a, W: Write + Send + 'static> MakeWriter<'a> for DeferringMakeWriter<W> {
    type Writer = DeferringWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        DeferringWriter { maker: self }
    }
}

/// Receives one formatted line per `write` call.
pub struct DeferringWriter<'a, W> {
    maker: &'a DeferringMakeWriter<W>,
}

impl<W: Write + Send + 'static> DeferringWriter<'_, W> {
    /// Makes the hold this thread's: the one its [`hand_over`] empties.
    /// Lines held for another queue (a test's second subscriber) go to it
    /// first.
    fn remember_hold(&self) {
        let hold = &self.maker.hold;
        let previous = HELD_IN.with(|held_in| {
            let Ok(mut held_in) = held_in.try_borrow_mut() else {
                return None;
            };
            let same = held_in
                .as_ref()
                .is_some_and(|h| std::ptr::addr_eq(Arc::as_ptr(h), Arc::as_ptr(hold)));
            if same {
                return None;
            }
            held_in.replace(hold.clone())
        });
        if let Some(previous) = previous {
            previous.hand_over();
        }
    }
}

impl<W: Write + Send + 'static> Write for DeferringWriter<'_, W> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let hold = &self.maker.hold;
        let deferring = DEFERRING.with(Cell::get) && line.len() <= MAX_BYTES;
        if deferring {
            self.remember_hold();
        }
        let Some(mut held) = hold.lock() else {
            return Ok(line.len());
        };
        if !deferring {
            // Held lines go before this one: the queue keeps their order.
            held.hand_over();
            hold.count.store(0, Ordering::Release);
            held.queue.write_all(line)?;
            return Ok(line.len());
        }
        if held.bytes.len() + line.len() > MAX_BYTES {
            held.hand_over();
        }
        held.bytes.extend_from_slice(line);
        let end = held.bytes.len();
        held.ends.push(end);
        if held.ends.len() >= MAX_LINES {
            held.hand_over();
        }
        hold.count.store(held.ends.len(), Ordering::Release);
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

    fn write_line<W: Write + Send + 'static>(maker: &DeferringMakeWriter<W>, line: &str) {
        maker.make_writer().write_all(line.as_bytes()).unwrap();
    }

    // Each test runs on a thread of its own: the deferral, and which hold a
    // thread hands over, are per thread.
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

    /// A worker that has written `line` and stays busy (never idle, so it
    /// hands nothing over) until the returned closure lets it end.
    fn busy_worker_holding(
        maker: &DeferringMakeWriter<Queue>,
        line: &'static str,
    ) -> impl FnOnce() {
        let (held, held_rx) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let maker = maker.clone();
        let worker = std::thread::spawn(move || {
            let _deferral = Deferral::on_this_thread();
            write_line(&maker, line);
            held.send(()).unwrap();
            release_rx.recv().unwrap();
        });
        held_rx.recv().unwrap();
        move || {
            release.send(()).unwrap();
            worker.join().unwrap();
        }
    }

    /// Two workers, one after the other, as for two webhooks sent in
    /// turn: the second goes idle first. Its hand-over takes the first's
    /// line too, ahead of its own.
    #[test]
    fn lines_from_two_threads_reach_the_queue_in_the_order_written() {
        let queue = Queue::default();
        let maker = DeferringMakeWriter::new(queue.clone());
        let release_first = busy_worker_holding(&maker, "first request\n");
        on_a_thread({
            let maker = maker.clone();
            move || {
                let _deferral = Deferral::on_this_thread();
                write_line(&maker, "second request\n");
                hand_over();
            }
        });
        assert_eq!(queue.lines(), ["first request\n", "second request\n"]);
        release_first();
        assert_eq!(queue.lines().len(), 2, "nothing handed over twice");
    }

    #[test]
    fn a_straight_write_goes_after_the_lines_other_threads_hold() {
        let queue = Queue::default();
        let maker = DeferringMakeWriter::new(queue.clone());
        let release_worker = busy_worker_holding(&maker, "held by a worker\n");
        on_a_thread({
            let maker = maker.clone();
            move || write_line(&maker, "from the admin thread\n")
        });
        assert_eq!(
            queue.lines(),
            ["held by a worker\n", "from the admin thread\n"]
        );
        release_worker();
    }

    /// A queue whose `write` logs through the writer it sits behind.
    #[derive(Clone, Default)]
    struct LoggingQueue {
        lines: Queue,
        maker: Arc<std::sync::OnceLock<DeferringMakeWriter<LoggingQueue>>>,
    }

    impl Write for LoggingQueue {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(maker) = self.maker.get() {
                maker.make_writer().write_all(b"from inside the queue\n")?;
            }
            self.lines.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_logged_from_inside_the_queue_is_dropped_not_deadlocked() {
        let queue = LoggingQueue::default();
        let maker = DeferringMakeWriter::new(queue.clone());
        queue.maker.set(maker.clone()).ok().unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            write_line(&maker, "straight\n");
            let deferral = Deferral::on_this_thread();
            write_line(&maker, "held\n");
            drop(deferral);
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the re-entrant write returned");
        assert_eq!(queue.lines.lines(), ["straight\n", "held\n"]);
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
