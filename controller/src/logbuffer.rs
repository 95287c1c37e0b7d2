//! The controller's own log lines (the access log and everything else
//! `tracing` writes) reach stderr through a buffer.
//!
//! A `write` system call per line was about 5 % of a cached hit's CPU at
//! high concurrency (docs/benchmarks.md). So, as nginx's `access_log …
//! buffer= flush=`, lines at INFO and below collect in memory and a thread
//! of their own writes them out [`FLUSH_AFTER`] after the first of them
//! (at once when [`FLUSH_AT`] bytes are waiting). A WARN or ERROR line goes
//! out at once, after what was waiting, so a failure's report never waits
//! and lines stay in order. What is left when the controller stops is
//! written by the [`FlushGuard`]; a process killed outright loses at most
//! the last few milliseconds of INFO lines.
//!
//! # Layout
//!
//! - [`install`]: the writer for the subscriber and the guard that drains it.
//! - [`BufferedLines`]: the `MakeWriter`; [`LineWriter`]: one line's writer.
//! - the flusher thread: waits for a first line, lets a batch gather, writes it.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait for others before it is written.
pub const FLUSH_AFTER: Duration = Duration::from_millis(5);
/// Waiting bytes that are written at once, without waiting for the flusher.
pub const FLUSH_AT: usize = 64 * 1024;

/// What the writers and the flusher share.
struct Shared<W> {
    /// Lines not written yet, and whether the guard has stopped the flusher.
    pending: Mutex<Pending>,
    /// Wakes the flusher when a first line arrives (or when it is stopped).
    arrived: Condvar,
    /// How long a first line waits for others.
    flush_after: Duration,
    /// The output; held while writing, so batches and urgent lines keep
    /// their order. Taken before `pending` when both are.
    out: Mutex<W>,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    stopped: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding either lock leaves plain bytes behind: usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<W: Write> Shared<W> {
    /// Writes what is waiting, then `line`.
    fn flush_with(&self, line: &[u8]) -> io::Result<()> {
        let mut out = lock(&self.out);
        let waiting = std::mem::take(&mut lock(&self.pending).bytes);
        // Errors (a closed stderr) drop the lines: nobody can read them.
        out.write_all(&waiting)?;
        out.write_all(line)?;
        out.flush()
    }
}

/// The subscriber's writer: see the module's documentation.
pub struct BufferedLines<W> {
    shared: Arc<Shared<W>>,
}

impl<W> Clone for BufferedLines<W> {
    fn clone(&self) -> Self {
        BufferedLines {
            shared: self.shared.clone(),
        }
    }
}

/// Stops the flusher and writes what is left, when dropped.
#[must_use = "dropping the guard stops the buffering"]
pub struct FlushGuard<W: Write> {
    shared: Arc<Shared<W>>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

/// The buffered writer over `out`, with its flusher thread started, and the
/// guard that drains it at exit.
pub fn install<W: Write + Send + 'static>(out: W) -> io::Result<(BufferedLines<W>, FlushGuard<W>)> {
    install_with(out, FLUSH_AFTER)
}

fn install_with<W: Write + Send + 'static>(
    out: W,
    flush_after: Duration,
) -> io::Result<(BufferedLines<W>, FlushGuard<W>)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        arrived: Condvar::new(),
        flush_after,
        out: Mutex::new(out),
    });
    let flusher = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("log-flusher".into())
            .spawn(move || flush_loop(&shared))?
    };
    Ok((
        BufferedLines { shared: shared.clone() },
        FlushGuard {
            shared,
            flusher: Some(flusher),
        },
    ))
}

fn flush_loop<W: Write>(shared: &Shared<W>) {
    let wait = |guard| {
        shared
            .arrived
            .wait_while(guard, |p: &mut Pending| p.bytes.is_empty() && !p.stopped)
    };
    let mut pending = lock(&shared.pending);
    loop {
        pending = wait(pending).unwrap_or_else(PoisonError::into_inner);
        if pending.stopped {
            return;
        }
        // The first line waits a little for others: one write for them all.
        // Only the guard wakes this wait early (lines notify an empty buffer only).
        pending = shared
            .arrived
            .wait_timeout_while(pending, shared.flush_after, |p| !p.stopped)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if pending.stopped {
            return;
        }
        drop(pending);
        let _ = shared.flush_with(&[]);
        pending = lock(&shared.pending);
    }
}

impl<W: Write> Drop for FlushGuard<W> {
    fn drop(&mut self) {
        lock(&self.shared.pending).stopped = true;
        self.shared.arrived.notify_one();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
        let _ = self.shared.flush_with(&[]);
    }
}

/// One event's writer: `tracing_subscriber` formats a line and writes it
/// with one `write_all`.
pub struct LineWriter<'a, W> {
    shared: &'a Shared<W>,
    urgent: bool,
}

impl<W: Write> Write for LineWriter<'_, W> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if self.urgent {
            self.shared.flush_with(line)?;
            return Ok(line.len());
        }
        let mut pending = lock(&self.shared.pending);
        if pending.stopped {
            // After the guard: nobody flushes any more, so write through.
            drop(pending);
            self.shared.flush_with(line)?;
            return Ok(line.len());
        }
        let first = pending.bytes.is_empty();
        pending.bytes.extend_from_slice(line);
        let full = pending.bytes.len() >= FLUSH_AT;
        drop(pending);
        if full {
            self.shared.flush_with(&[])?;
        } else if first {
            self.shared.arrived.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + 'a> MakeWriter<'a> for BufferedLines<W> {
    type Writer = LineWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
            // ERROR < WARN < INFO in `tracing`'s order.
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test can read while the writer holds it.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).clone()).unwrap()
        }
    }

    fn write_line(writer: &BufferedLines<Captured>, urgent: bool, line: &str) {
        let mut w = writer.make_writer();
        w.urgent = urgent;
        w.write_all(line.as_bytes()).unwrap();
    }

    #[test]
    fn info_lines_wait_for_the_flusher_and_a_warning_takes_them_along_in_order() {
        // Arrange
        let out = Captured::default();
        let (writer, guard) = install_with(out.clone(), Duration::from_secs(3600)).unwrap();

        // Act: lines written together, then one urgent line.
        write_line(&writer, false, "one\n");
        write_line(&writer, false, "two\n");
        let before_warning = out.text();
        write_line(&writer, true, "warn\n");

        // Assert: nothing before the urgent line (the flusher waits an
        // hour here), everything in order after it.
        assert_eq!(before_warning, "");
        assert_eq!(out.text(), "one\ntwo\nwarn\n");
        drop(guard);
    }

    #[test]
    fn the_flusher_writes_a_lone_line_and_the_guard_writes_what_is_left() {
        // Arrange
        let out = Captured::default();
        let (writer, guard) = install_with(out.clone(), Duration::from_millis(1)).unwrap();

        // Act: a line, then time for the flusher.
        write_line(&writer, false, "alone\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.text().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let flushed = out.text();
        // A line the guard finds waiting: written as it stops.
        write_line(&writer, false, "last\n");
        drop(guard);

        // Assert
        assert_eq!(flushed, "alone\n");
        assert_eq!(out.text(), "alone\nlast\n");
    }

    #[test]
    fn a_full_buffer_is_written_at_once() {
        // Arrange
        let out = Captured::default();
        let (writer, guard) = install_with(out.clone(), Duration::from_secs(3600)).unwrap();
        let line = format!("{}\n", "x".repeat(1023));

        // Act: more than FLUSH_AT bytes, faster than the flusher wakes.
        for _ in 0..(FLUSH_AT / line.len() + 1) {
            write_line(&writer, false, &line);
        }

        // Assert: out without the flusher (it waits an hour here); the
        // last line waits for it, and the guard writes it.
        let written = out.text().len();
        assert!((FLUSH_AT..FLUSH_AT + line.len()).contains(&written), "{written}");
        drop(guard);
        assert_eq!(out.text().len(), (FLUSH_AT / line.len() + 1) * line.len());
    }
}
