//! Instances at work between calls. An instance has nothing to do between
//! its calls (`/init`, `/run`), but a function can leave work behind: a
//! thread spinning, a timer that never ends. A retained session keeps its
//! instance for hours, and an idle one waits in the pool for minutes, so
//! such work would take a core for that long, unseen and unbilled. The
//! sweep reads each watched instance's CPU time (its uid's `cpuacct`
//! cgroup) every [`SWEEP_EVERY`]; one that used more than [`IDLE_CPU_LIMIT`]
//! in two of three periods in a row without a call is stopped (every
//! process of it killed), and its next call finds it gone (a retained
//! session's instance is started again: `instance_recreated`). Work left
//! running goes on, or comes back (resting every other period does not
//! hide it); one burst (a collector, a tail of work after an answer on a
//! loaded machine: at most twice the limit, however it falls across the
//! periods) does not stop an instance a caller relies on.
//!
//! # Layout
//!
//! - [`IdleWatch`]: one instance's activity, CPU time and processes.
//! - [`Sweeper`]: the watched instances and the sweep.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fnrt_core::runtime::remote::Activity;

use crate::cgroups::CpuCgroup;

/// How often instances' CPU time is read.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// CPU time an instance may use over a period without a call (a tail of
/// work after an answer, a runtime's housekeeping); past it in two of three
/// periods, it is stopped.
pub const IDLE_CPU_LIMIT: Duration = Duration::from_millis(250);

/// One watched instance.
#[derive(Debug)]
pub struct IdleWatch {
    pub id: String,
    pub activity: Arc<Activity>,
    pub cpu: CpuCgroup,
    /// The cgroup whose processes are the instance's (what is killed).
    pub processes: PathBuf,
    /// What the last sweep read.
    last: Mutex<Option<Look>>,
}

/// One sweep's reading of an instance.
#[derive(Debug, Clone, Copy)]
struct Look {
    /// Its activity's changes (calls begun plus ended).
    changes: u64,
    /// Its CPU time.
    used_ns: u64,
    /// Whether it worked past the limit, idle, in the period that ended
    /// with this look and in the one before.
    over: [bool; 2],
}

/// Why the sweep stops an instance.
#[derive(Debug)]
struct Worked {
    /// The CPU time it used in the last period.
    last: Duration,
    /// The activity's changes when read: a call begun since spares it.
    changes: u64,
}

impl IdleWatch {
    pub fn new(id: String, cpu: CpuCgroup, processes: PathBuf) -> Arc<Self> {
        Arc::new(IdleWatch {
            id,
            activity: Arc::new(Activity::default()),
            cpu,
            processes,
            last: Mutex::new(None),
        })
    }

    /// One sweep's look: whether it worked past the limit over this period
    /// and over one of the two before, with no call begun or ended
    /// meanwhile and none under way. An unreadable CPU time is no reading
    /// (the next look starts again), never a zero.
    fn worked_while_idle(&self) -> Option<Worked> {
        let changes = self.activity.changes();
        let used_ns = self.cpu.usage_ns();
        let mut last = self.last.lock().unwrap();
        let Some(used_ns) = used_ns else {
            *last = None;
            return None;
        };
        let before = last.replace(Look {
            changes,
            used_ns,
            over: [false; 2],
        })?;
        if self.activity.busy() || changes != before.changes {
            return None;
        }
        let worked = Duration::from_nanos(used_ns.saturating_sub(before.used_ns));
        let over = worked > IDLE_CPU_LIMIT;
        last.as_mut().expect("just set").over = [over, before.over[0]];
        (over && before.over.contains(&true)).then_some(Worked { last: worked, changes })
    }

    /// Whether no call began or ended since the look that found `worked`,
    /// and none is under way: asked again just before the kill.
    fn still_idle(&self, worked: &Worked) -> bool {
        !self.activity.busy() && self.activity.changes() == worked.changes
    }
}

/// The instances a backend watches.
#[derive(Debug, Default)]
pub struct Sweeper {
    watched: Mutex<Vec<Weak<IdleWatch>>>,
}

impl Sweeper {
    /// Watches `watch` from now on (until it is dropped); the first watch
    /// starts the sweep, which ends with the sweeper.
    pub fn watch(self: &Arc<Self>, watch: &Arc<IdleWatch>) {
        let mut watched = self.watched.lock().unwrap();
        if watched.is_empty() {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
        watched.push(Arc::downgrade(watch));
    }
}

async fn sweep(sweeper: Weak<Sweeper>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(sweeper) = sweeper.upgrade() else { return };
        let live: Vec<Arc<IdleWatch>> = {
            let mut watched = sweeper.watched.lock().unwrap();
            watched.retain(|w| w.strong_count() > 0);
            if watched.is_empty() {
                // The next watch starts a sweep again.
                return;
            }
            watched.iter().filter_map(Weak::upgrade).collect()
        };
        drop(sweeper);
        // One blocking task reads them all (a file each).
        let busy_idle = tokio::task::spawn_blocking(move || {
            live.into_iter()
                .filter_map(|watch| watch.worked_while_idle().map(|worked| (watch, worked)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (watch, worked) in busy_idle {
            if !watch.still_idle(&worked) {
                continue;
            }
            tracing::warn!(
                instance = %watch.id,
                cpu_ms = worked.last.as_millis() as u64,
                period_ms = SWEEP_EVERY.as_millis() as u64,
                "an instance worked between its calls, in two of three periods (work its function left running); stopped"
            );
            crate::cgroups::kill_procs(&watch.processes, None);
        }
    }
}
