//! Instances at work between calls. An instance has nothing to do between
//! its calls (`/init`, `/run`), but a function can leave work behind: a
//! thread spinning, a timer that never ends. A retained session keeps its
//! instance for hours, and an idle one waits in the pool for minutes, so
//! such work would take a core for that long, unseen and unbilled. The
//! sweep reads each watched instance's CPU time (its uid's `cpuacct`
//! cgroup) every [`SWEEP_EVERY`]; one that used more than [`IDLE_CPU_LIMIT`]
//! over a whole period without a call is stopped (every process of it
//! killed), and its next call finds it gone (a retained session's instance
//! is started again: `instance_recreated`).
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
/// work after an answer, a runtime's housekeeping).
pub const IDLE_CPU_LIMIT: Duration = Duration::from_millis(250);

/// One watched instance.
#[derive(Debug)]
pub struct IdleWatch {
    pub id: String,
    pub activity: Arc<Activity>,
    pub cpu: CpuCgroup,
    /// The cgroup whose processes are the instance's (what is killed).
    pub processes: PathBuf,
    /// The activity's changes and the CPU time at the last sweep.
    last: Mutex<Option<(u64, u64)>>,
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

    /// One sweep's look: whether it worked past the limit since the last
    /// look with no call begun or ended meanwhile, and none under way.
    fn worked_while_idle(&self) -> Option<Duration> {
        let now = (self.activity.changes(), self.cpu.usage_ns());
        let mut last = self.last.lock().unwrap();
        let before = last.replace(now);
        let (changes, used) = before?;
        if self.activity.busy() || changes != now.0 {
            return None;
        }
        let worked = Duration::from_nanos(now.1.saturating_sub(used));
        (worked > IDLE_CPU_LIMIT).then_some(worked)
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
            tracing::warn!(
                instance = %watch.id,
                cpu_ms = worked.as_millis() as u64,
                period_ms = SWEEP_EVERY.as_millis() as u64,
                "an instance worked between its calls (work its function left running); stopped"
            );
            crate::cgroups::kill_procs(&watch.processes, None);
        }
    }
}
