//! Processes the benchmark starts ([`Proc`]: stopped by their own id when
//! dropped) and what `/proc` says of them: resident memory, open file
//! descriptors, descendants.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, kill_process};

/// Stderr lines a [`Proc`] keeps, the last ones: a controller logs a line
/// per request, millions in a run.
const KEPT_LINES: usize = 200;

/// A child process, asked to stop (SIGTERM, then SIGKILL after a few
/// seconds) when dropped; its last stderr lines are kept.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) name: String,
    child: Child,
    lines: Arc<Mutex<VecDeque<String>>>,
}

impl Proc {
    /// Starts `cmd` (stdout discarded, stderr kept) and waits until a
    /// stderr line makes `ready` answer something, or `timeout`.
    pub(crate) fn start<T: Send + 'static>(
        name: &str,
        cmd: Command,
        timeout: Duration,
        ready: impl Fn(&str) -> Option<T> + Send + 'static,
    ) -> anyhow::Result<(Proc, T)> {
        let (proc, found) = Proc::launch(name, cmd, ready)?;
        match found.recv_timeout(timeout) {
            Ok(found) => Ok((proc, found)),
            Err(_) => bail!("{name} did not start in {timeout:?}: {}", proc.tail()),
        }
    }

    /// Starts `cmd` without waiting for anything (its stderr kept).
    pub(crate) fn spawn(name: &str, cmd: Command) -> anyhow::Result<Proc> {
        Proc::launch(name, cmd, |_| None::<()>).map(|(proc, _)| proc)
    }

    fn launch<T: Send + 'static>(
        name: &str,
        mut cmd: Command,
        ready: impl Fn(&str) -> Option<T> + Send + 'static,
    ) -> anyhow::Result<(Proc, std::sync::mpsc::Receiver<T>)> {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let stderr = child.stderr.take().context("stderr")?;
        let lines = Arc::new(Mutex::new(VecDeque::with_capacity(KEPT_LINES)));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                // Lines are read as they come (a full pipe would stall the
                // child) but looked at only until `ready` answers: this
                // thread shares the cores with what is measured.
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if tx.is_some()
                        && let Some(found) = ready(&line)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(found);
                    }
                    let mut lines = lines.lock().unwrap();
                    if lines.len() == KEPT_LINES {
                        lines.pop_front();
                    }
                    lines.push_back(line);
                }
            });
        }
        let proc = Proc {
            name: name.to_owned(),
            child,
            lines,
        };
        Ok((proc, rx))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines it wrote to stderr.
    pub(crate) fn tail(&self) -> String {
        let lines = self.lines.lock().unwrap();
        let last: Vec<&str> = lines
            .iter()
            .skip(lines.len().saturating_sub(20))
            .map(String::as_str)
            .collect();
        last.join("\n")
    }

    /// Whether it is still running.
    pub(crate) fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL if it has not stopped within `grace`.
    pub(crate) fn stop(&mut self, grace: Duration) {
        if !self.running() {
            return;
        }
        if let Some(pid) = Pid::from_raw(self.child.id() as i32) {
            let _ = kill_process(pid, Signal::TERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Resident memory of `pid`, in KiB (`VmRSS`); 0 if it is gone.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Open file descriptors of `pid`.
pub(crate) fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Every process below `pid` (children, their children, ...), with its
/// command line.
pub(crate) fn descendants(pid: u32) -> Vec<(u32, String)> {
    let mut parent_of = HashMap::new();
    let mut cmdline = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
        else {
            continue;
        };
        parent_of.insert(p, ppid);
        let args = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        cmdline.insert(p, String::from_utf8_lossy(&args).replace('\0', " ").trim().to_owned());
    }
    let mut below = HashSet::from([pid]);
    let mut grew = true;
    while grew {
        grew = false;
        for (&p, ppid) in &parent_of {
            if below.contains(ppid) && below.insert(p) {
                grew = true;
            }
        }
    }
    below.remove(&pid);
    let mut out: Vec<(u32, String)> = below
        .into_iter()
        .map(|p| (p, cmdline.remove(&p).unwrap_or_default()))
        .collect();
    out.sort();
    out
}

/// Samples `pid`'s resident memory every 50 ms while `work` runs; the
/// peak, in KiB.
pub(crate) fn peak_rss_during<T>(pid: u32, work: impl FnOnce() -> T) -> (T, u64) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = rss_kib(pid);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    let out = work();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    (out, peak)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_process_is_seen_below_us_and_stopped_on_drop() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo ready >&2; exec sleep 30"]);
        let (proc, ()) = Proc::start("sleeper", cmd, Duration::from_secs(5), |l| (l == "ready").then_some(())).unwrap();
        let pid = proc.pid();
        assert!(descendants(std::process::id()).iter().any(|(p, _)| *p == pid));
        assert!(rss_kib(pid) > 0 && fds(pid) > 0);
        drop(proc);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
