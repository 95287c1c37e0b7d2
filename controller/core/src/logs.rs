//! Function logs: what a function writes to stdout and stderr during one
//! execution, as timestamped lines, bounded, and shown live to followers.
//!
//! A runtime server's stdout and stderr are pipes that live as long as its
//! instance, which serves one run at a time. The backend reads them and
//! feeds an [`OutputTap`]; the instance opens a window on the tap for each
//! run and closes it when the run has answered. A runtime writes out all a
//! run wrote before it answers, so a backend that reads the pipes itself
//! has it all once it has read them dry after the answer. A backend whose
//! output comes another way (a container engine's log stream, later than
//! the answer) asks for a marker that is new for every run, which the
//! runtime writes on both streams when the run ends
//! (docs/runtime-protocol.md, `log_marker`): lines up to each stream's
//! marker are the run's. Output between runs belongs to no execution and
//! is dropped. The wasm backend feeds its per-run WASI pipes the same way.
//!
//! # Layout
//!
//! - [`RunLogs`]: one execution's capture: the byte cap (head kept,
//!   truncation counted), and the live feed to [`LogFollowers`].
//! - [`OutputTap`]: splits raw output into lines and routes them to the run
//!   in progress until it closes (or until its marker).
//! - [`LogLine`], [`Stream`], [`Captured`]: what is kept.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::timefmt::now_ms;

/// Longest line kept as one; a longer one is cut into lines of this size
/// (a flood without newlines costs no more memory than this).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Which of a function's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// 0 for stdout, 1 for stderr: where a per-stream pair keeps it.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One line a function wrote, without its newline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When the controller read it, Unix milliseconds.
    pub ts_ms: i64,
    pub stream: Stream,
    pub text: String,
}

/// What one execution's capture kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    pub lines: Vec<LogLine>,
    /// Bytes kept (each line counts its newline).
    pub bytes: usize,
    /// Bytes written past the cap and not kept.
    pub dropped_bytes: usize,
}

impl Captured {
    pub fn truncated(&self) -> bool {
        self.dropped_bytes > 0
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.dropped_bytes == 0
    }
}

/// Where lines go live, as they are captured (the controller's
/// `GET /api/v1/functions/{language_title}/logs?follow=true`).
pub trait LogFollowers: Send + Sync {
    /// A line of execution `execution_id` of `language_title`.
    fn line(&self, language_title: &str, execution_id: &str, line: &LogLine);
}

struct Live {
    followers: Arc<dyn LogFollowers>,
    language_title: String,
    execution_id: String,
}

/// One execution's output as it is captured: the first `limit` bytes are
/// kept, the rest only counted.
pub struct RunLogs {
    limit: usize,
    live: Option<Live>,
    captured: Mutex<Captured>,
}

impl std::fmt::Debug for RunLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunLogs")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl RunLogs {
    pub fn new(limit: usize) -> Self {
        RunLogs {
            limit,
            live: None,
            captured: Mutex::new(Captured::default()),
        }
    }

    /// Also hands every kept line to `followers` as it comes.
    pub fn followed(mut self, followers: Arc<dyn LogFollowers>, language_title: &str, execution_id: &str) -> Self {
        self.live = Some(Live {
            followers,
            language_title: language_title.to_owned(),
            execution_id: execution_id.to_owned(),
        });
        self
    }

    /// Keeps one line (`text` without its newline) unless the cap is
    /// reached; after the first line that does not fit, nothing more is
    /// kept, so what is kept is a true head of the output.
    pub fn push(&self, stream: Stream, text: &[u8]) {
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let cost = text.len() + 1;
        let line = {
            let mut captured = self.captured.lock().unwrap();
            if captured.dropped_bytes > 0 || captured.bytes + cost > self.limit {
                captured.dropped_bytes += cost;
                return;
            }
            captured.bytes += cost;
            let line = LogLine {
                ts_ms: now_ms(),
                stream,
                text: String::from_utf8_lossy(text).into_owned(),
            };
            if self.live.is_none() {
                captured.lines.push(line);
                return;
            }
            captured.lines.push(line.clone());
            line
        };
        if let Some(live) = &self.live {
            live.followers.line(&live.language_title, &live.execution_id, &line);
        }
    }

    /// Everything kept so far; the capture starts over empty.
    pub fn take(&self) -> Captured {
        std::mem::take(&mut *self.captured.lock().unwrap())
    }
}

/// The run an instance's output currently belongs to.
struct Window {
    logs: Arc<RunLogs>,
    /// Empty for a window that ends when it is closed.
    marker: Vec<u8>,
    /// Per stream: its marker has come, the rest is not the run's.
    ended: [bool; 2],
}

#[derive(Default)]
struct TapState {
    window: Option<Window>,
    /// Per stream: the start of a line not yet ended.
    pending: [Vec<u8>; 2],
    /// Per stream: a closed run's marker that had not come. What comes up
    /// to it is that run's, late (a log stream lagging behind the answer):
    /// dropped, never the next run's, which may be another caller's. Should
    /// it never come, the next run's own marker ends the wait, and that
    /// run's lines before it are dropped too (whose they are is unknown).
    stale: [Option<Stale>; 2],
}

/// A closed run's marker line still to come on a stream.
struct Stale {
    /// The marker and its newline, as the runtime writes them.
    line: Vec<u8>,
    /// The last bytes seen, which may be the start of it.
    seen: Vec<u8>,
}

/// An instance's stdout and stderr, split into lines and routed to the run
/// in progress. The backend calls [`OutputTap::feed`] with whatever it
/// reads; the instance calls [`OutputTap::open`] before a run and
/// [`OutputTap::close`] after it.
#[derive(Default)]
pub struct OutputTap {
    state: Mutex<TapState>,
    ended: Notify,
}

impl std::fmt::Debug for OutputTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputTap").finish_non_exhaustive()
    }
}

impl OutputTap {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Output read from `stream`, in any pieces.
    pub fn feed(&self, stream: Stream, bytes: &[u8]) {
        let mut state = self.state.lock().unwrap();
        let TapState { window, pending, stale } = &mut *state;
        let i = stream.index();
        let after_stale;
        let bytes = match stale[i].as_mut() {
            None => bytes,
            Some(late) => {
                let mut seen = std::mem::take(&mut late.seen);
                seen.extend_from_slice(bytes);
                let late_end = find(&seen, &late.line).map(|at| at + late.line.len());
                // The open window's own marker before the late one: that one
                // is not coming; what came before it is nobody's for sure.
                let own = window
                    .as_ref()
                    .filter(|w| !w.marker.is_empty())
                    .and_then(|w| find(&seen, &w.marker))
                    .filter(|at| late_end.is_none_or(|end| *at < end));
                if let Some(at) = own {
                    after_stale = seen.split_off(at);
                } else if let Some(end) = late_end {
                    after_stale = seen.split_off(end);
                } else {
                    // Dropped, but for what may be the marker's start.
                    let keep = seen.len().saturating_sub(late.line.len() - 1);
                    late.seen = seen.split_off(keep);
                    return;
                }
                stale[i] = None;
                &after_stale[..]
            }
        };
        // Between runs the output is no execution's.
        let Some(window) = window.as_mut() else { return };
        if window.ended[i] {
            return;
        }
        let pending = &mut pending[i];
        pending.extend_from_slice(bytes);
        let marker = (!window.marker.is_empty())
            .then(|| find(pending, &window.marker))
            .flatten();
        let end = marker.unwrap_or(pending.len());
        let mut start = 0;
        while let Some(newline) = pending[start..end].iter().position(|&b| b == b'\n') {
            window.logs.push(stream, &pending[start..start + newline]);
            start += newline + 1;
        }
        if let Some(at) = marker {
            // Text before the marker on its line is the run's last line.
            if at > start {
                window.logs.push(stream, &pending[start..at]);
            }
            pending.clear();
            window.ended[i] = true;
            self.ended.notify_one();
            return;
        }
        // A line too long to wait for (kept back: what could be the start
        // of a marker).
        let keep = window.marker.len();
        while pending.len() - start > MAX_LINE_BYTES + keep {
            window.logs.push(stream, &pending[start..start + MAX_LINE_BYTES]);
            start += MAX_LINE_BYTES;
        }
        pending.drain(..start);
    }

    /// Output from now on is `logs`' run's, until it is closed, or with a
    /// `marker`, until the marker on each stream.
    pub fn open(&self, logs: Arc<RunLogs>, marker: Option<&str>) {
        let mut state = self.state.lock().unwrap();
        state.pending = Default::default();
        state.window = Some(Window {
            logs,
            marker: marker.unwrap_or_default().as_bytes().to_vec(),
            ended: [false; 2],
        });
    }

    /// Ends the run's window; one with a marker once both markers came or
    /// `wait` passed (a stream the run left a partial line on keeps it as
    /// its last line). Whether the run's output is all there: for a window
    /// with a marker, whether both markers came.
    pub async fn close(&self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        // Without a wait there is no timer to arm: tokio's timers tick in
        // milliseconds, so even an elapsed deadline would hold this run
        // until the next tick (a wasm run's whole cost, several times over).
        while !wait.is_zero() {
            let notified = self.ended.notified();
            if self.both_ended() {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        let mut state = self.state.lock().unwrap();
        let Some(window) = state.window.take() else {
            return false;
        };
        for stream in [Stream::Stdout, Stream::Stderr] {
            let i = stream.index();
            let pending = std::mem::take(&mut state.pending[i]);
            if !window.ended[i] && !pending.is_empty() {
                window.logs.push(stream, &pending);
            }
            if !window.ended[i] && !window.marker.is_empty() {
                let mut line = window.marker.clone();
                line.push(b'\n');
                state.stale[i] = Some(Stale { line, seen: Vec::new() });
            }
        }
        window.marker.is_empty() || window.ended == [true; 2]
    }

    fn both_ended(&self) -> bool {
        let state = self.state.lock().unwrap();
        state
            .window
            .as_ref()
            .is_none_or(|w| w.marker.is_empty() || w.ended == [true; 2])
    }
}

/// Where `needle` first starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run's logs, its window opened on `tap`.
    fn opened(tap: &OutputTap, marker: Option<&str>) -> Arc<RunLogs> {
        let logs = Arc::new(RunLogs::new(1024));
        tap.open(logs.clone(), marker);
        logs
    }

    fn texts(captured: &Captured) -> Vec<(Stream, &str)> {
        captured.lines.iter().map(|l| (l.stream, l.text.as_str())).collect()
    }

    #[tokio::test]
    async fn a_run_gets_the_lines_between_its_window_and_its_markers() {
        let tap = OutputTap::new();
        tap.feed(Stream::Stdout, b"before any run\n");
        let logs = opened(&tap, Some("MARK1234"));
        tap.feed(Stream::Stdout, b"one\ntw");
        tap.feed(Stream::Stderr, b"oops\r\n");
        tap.feed(Stream::Stdout, b"o\npartialMARK");
        tap.feed(Stream::Stdout, b"1234\nafter the marker\n");
        tap.feed(Stream::Stderr, b"MARK1234\n");
        assert!(tap.close(Duration::from_secs(5)).await);
        tap.feed(Stream::Stdout, b"between runs\n");
        let captured = logs.take();
        assert_eq!(
            texts(&captured),
            vec![
                (Stream::Stdout, "one"),
                (Stream::Stderr, "oops"),
                (Stream::Stdout, "two"),
                (Stream::Stdout, "partial"),
            ]
        );
        assert_eq!(captured.bytes, 4 + 5 + 4 + 8);
    }

    #[tokio::test]
    async fn a_window_without_a_marker_takes_everything_until_it_closes() {
        let tap = OutputTap::new();
        let logs = opened(&tap, None);
        tap.feed(Stream::Stdout, b"one\nMARK1234 is only text\n");
        tap.feed(Stream::Stderr, b"last, without newline");
        assert!(tap.close(Duration::ZERO).await);
        tap.feed(Stream::Stdout, b"between runs\n");
        assert_eq!(
            texts(&logs.take()),
            vec![
                (Stream::Stdout, "one"),
                (Stream::Stdout, "MARK1234 is only text"),
                (Stream::Stderr, "last, without newline"),
            ]
        );
    }

    #[tokio::test]
    async fn a_missing_marker_ends_the_window_after_the_wait_keeping_a_partial_line() {
        let tap = OutputTap::new();
        let logs = opened(&tap, Some("MARK1234"));
        tap.feed(Stream::Stdout, b"no newline");
        assert!(!tap.close(Duration::from_millis(10)).await);
        assert_eq!(texts(&logs.take()), vec![(Stream::Stdout, "no newline")]);
    }

    /// A log stream that lags past a run's wait (a container engine's):
    /// the rest of that run's lines come during the next run, maybe
    /// another caller's. They are dropped up to the late marker, which may
    /// come in pieces, and the next run gets only its own.
    #[tokio::test]
    async fn a_run_s_lines_that_come_after_its_window_closed_never_reach_the_next_run() {
        let tap = OutputTap::new();
        let first = opened(&tap, Some("MARK0001"));
        tap.feed(Stream::Stdout, b"first, in time\n");
        assert!(!tap.close(Duration::from_millis(10)).await);
        let second = opened(&tap, Some("MARK0002"));

        tap.feed(Stream::Stdout, b"first's secret\nMARK00");
        tap.feed(Stream::Stdout, b"01\nsecond's line\nMARK0002\n");
        tap.feed(Stream::Stderr, b"first's warning\nMARK0001\nMARK0002\n");
        assert!(tap.close(Duration::from_secs(5)).await);

        assert_eq!(texts(&first.take()), vec![(Stream::Stdout, "first, in time")]);
        assert_eq!(texts(&second.take()), vec![(Stream::Stdout, "second's line")]);
    }

    /// A late marker that never comes (a runtime that could not write it)
    /// costs the next run its lines before its own marker, whose they are
    /// being unknown, and nothing after: the run after that gets its own.
    #[tokio::test]
    async fn a_late_marker_that_never_comes_costs_only_the_next_run_s_lines() {
        let tap = OutputTap::new();
        opened(&tap, Some("MARK0001"));
        assert!(!tap.close(Duration::from_millis(10)).await);
        let second = opened(&tap, Some("MARK0002"));

        tap.feed(Stream::Stdout, b"whose line?\n");
        tap.feed(Stream::Stdout, b"MARK0002\n");
        tap.feed(Stream::Stderr, b"MARK0002\n");
        assert!(tap.close(Duration::from_secs(5)).await);
        let third = opened(&tap, Some("MARK0003"));
        tap.feed(Stream::Stdout, b"third's line\n");
        tap.feed(Stream::Stdout, b"MARK0003\n");
        tap.feed(Stream::Stderr, b"MARK0003\n");
        assert!(tap.close(Duration::from_secs(5)).await);

        assert_eq!(texts(&second.take()), vec![]);
        assert_eq!(texts(&third.take()), vec![(Stream::Stdout, "third's line")]);
    }

    #[test]
    fn the_cap_keeps_the_head_and_counts_the_rest() {
        let logs = RunLogs::new(10);
        logs.push(Stream::Stdout, b"12345");
        logs.push(Stream::Stdout, b"123456");
        logs.push(Stream::Stdout, b"1");
        let captured = logs.take();
        assert_eq!(texts(&captured), vec![(Stream::Stdout, "12345")]);
        assert_eq!((captured.bytes, captured.dropped_bytes), (6, 9));
        assert!(captured.truncated());
    }

    #[test]
    fn a_line_without_newline_is_cut_at_the_line_limit() {
        let tap = OutputTap::new();
        let logs = Arc::new(RunLogs::new(1 << 20));
        tap.open(logs.clone(), Some("MARK1234"));
        tap.feed(Stream::Stdout, &vec![b'x'; MAX_LINE_BYTES * 2 + 100]);
        let captured = logs.take();
        assert_eq!(captured.lines.len(), 2);
        assert!(captured.lines.iter().all(|l| l.text.len() == MAX_LINE_BYTES));
    }
}
