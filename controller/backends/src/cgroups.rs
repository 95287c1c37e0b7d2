//! Caps on what a sandbox may take, as cgroup v1 sets them (these machines
//! mount v1 `pids`, `memory`, `cpu` and `cpuacct`): an instance's memory,
//! all its processes together ([`MemoryCgroup`], one per instance uid, made
//! by [`crate::uids::UidLease::limit_memory`]), its CPU ([`CpuQuota`], by
//! [`crate::uids::UidLease::limit_cpu`]), and a build step's memory and
//! tasks ([`Confinement`]: a cargo build, a pip or npm install, whose code
//! is anyone's with `write:functions`: `build.rs`, proc macros, `setup.py`,
//! install scripts).
//!
//! A process joins its cgroups between fork and exec ([`join_cgroup`]), so
//! everything it starts is counted from its first instruction; nothing in a
//! sandbox can leave them (no cgroup filesystem is mounted inside). Past a
//! memory cap the kernel kills inside the cgroup, and the cgroup's
//! `oom_kill` count says so; past a tasks cap `fork` fails there, and
//! `pids.events` counts it. A step's directory on the host's disk has no
//! such cap: a watch measures it every second while the step runs and
//! kills the step past `BUILD_DISK_MB` ([`Confinement::watch_disk`]).
//!
//! # Layout
//!
//! - [`join_cgroup`]: the child's side, async-signal-safe.
//! - [`MemoryCgroup`]: a capped memory cgroup; [`CpuQuota`]: a `cpu`
//!   cgroup with a CFS quota; [`CpuCgroup`]: a `cpuacct` cgroup, read by
//!   the idle sweep. Each is a directory of its own, removed when dropped.
//! - [`Confinement`]: a build step's `pids`, `memory` and `cpu` cgroups
//!   (`fnrt/steps/{controller pid}-{n}`), the watch on its disk use, and
//!   what ended the step, if a cap did ([`Confinement::explain`]).

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often a step's directory is measured.
const DISK_WATCH_EVERY: Duration = Duration::from_secs(1);

/// The cgroup v1 `pids` hierarchy.
pub const PIDS_HIERARCHY: &str = "/sys/fs/cgroup/pids";
/// The cgroup v1 `memory` hierarchy.
pub const MEMORY_HIERARCHY: &str = "/sys/fs/cgroup/memory";
/// The cgroup v1 `cpuacct` hierarchy.
pub const CPUACCT_HIERARCHY: &str = "/sys/fs/cgroup/cpuacct";
/// The cgroup v1 `cpu` hierarchy (the same directory as `cpuacct` where
/// the two are mounted together).
pub const CPU_HIERARCHY: &str = "/sys/fs/cgroup/cpu";
/// The scheduler's period for a CPU quota, in microseconds (the kernel's
/// default): a quota of one CPU is 100 ms of CPU time per 100 ms.
const CPU_PERIOD_US: u64 = 100_000;

/// `fnrt/` in a hierarchy, made if missing; `None` (and a warning saying
/// what goes uncapped: `without`) when the hierarchy is not mounted.
pub fn fnrt_cgroup(hierarchy: &str, without: &str) -> anyhow::Result<Option<PathBuf>> {
    if !Path::new(hierarchy).join("cgroup.procs").exists() {
        tracing::warn!("no cgroup v1 hierarchy at {hierarchy}: {without}");
        return Ok(None);
    }
    let dir = Path::new(hierarchy).join("fnrt");
    std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("creating the cgroup {}: {e}", dir.display()))?;
    Ok(Some(dir))
}

/// Moves the calling thread into the cgroup whose `tasks` file is `tasks`.
/// Async-signal-safe (open, write, close on a path prepared before the
/// fork): meant for the child between fork and exec, so that it and all it
/// starts are counted. A forked child has one thread, so the thread is the
/// whole process; moving it through `tasks` rather than `cgroup.procs`
/// spares the kernel the global lock that a whole thread group's move
/// takes, whose first taking after a quiet spell waits for an RCU grace
/// period (5 to 15 ms of every instance start here, measured; well under
/// 1 ms through `tasks`).
pub fn join_cgroup(tasks: &CStr) -> rustix::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(tasks, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
    // "0" is the writing thread.
    rustix::io::write(&fd, b"0")?;
    Ok(())
}

/// `dir/tasks`, ready for [`join_cgroup`] after a fork.
fn tasks_of(dir: &Path) -> std::io::Result<CString> {
    CString::new(dir.join("tasks").into_os_string().into_encoded_bytes())
        .map_err(|_| std::io::Error::other("cgroup path contains NUL"))
}

/// One cgroup directory of its own: made, or taken over as an earlier
/// holder left it, and removed when dropped once nothing runs in it (an
/// instance is dropped after its processes are gone; one that still holds
/// a process is left, and set afresh by whoever makes it next).
#[derive(Debug)]
struct Owned {
    dir: PathBuf,
    /// `tasks`, ready for [`join_cgroup`] after a fork.
    tasks: CString,
}

impl Owned {
    fn create(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Owned {
            tasks: tasks_of(&dir)?,
            dir,
        })
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        // Fails (EBUSY) while a process is still in it: left as it is.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A v1 `memory` cgroup capped at a number of bytes, swap included where
/// the kernel counts it.
#[derive(Debug)]
pub struct MemoryCgroup {
    cgroup: Owned,
    /// `oom_kill` when it was capped: a cgroup left by an earlier instance
    /// keeps its count.
    oom_base: u64,
}

impl MemoryCgroup {
    /// Makes (or takes over) the cgroup at `dir` and caps it at `bytes`.
    pub fn create(dir: PathBuf, bytes: u64) -> std::io::Result<Self> {
        let cgroup = Owned::create(dir)?;
        let limit = bytes.to_string();
        // memory+swap may never be below memory alone: lifted first, then
        // memory, then memory+swap to the same (no swap beyond the cap).
        let memsw = cgroup.dir.join("memory.memsw.limit_in_bytes");
        let swap_counted = memsw.exists();
        if swap_counted {
            std::fs::write(&memsw, "-1")?;
        }
        std::fs::write(cgroup.dir.join("memory.limit_in_bytes"), &limit)?;
        if swap_counted {
            std::fs::write(&memsw, &limit)?;
        }
        Ok(MemoryCgroup {
            oom_base: oom_kills(&cgroup.dir).unwrap_or(0),
            cgroup,
        })
    }

    /// Its `tasks`, for [`join_cgroup`] after a fork.
    pub fn join_path(&self) -> CString {
        self.cgroup.tasks.clone()
    }

    /// Whether the kernel killed a process of it for want of memory since
    /// it was capped.
    pub fn oom_killed(&self) -> bool {
        oom_kills(&self.cgroup.dir).is_some_and(|n| n > self.oom_base)
    }
}

/// A v1 `cpuacct` cgroup: the CPU time of everything in it.
#[derive(Debug)]
pub struct CpuCgroup(Owned);

impl CpuCgroup {
    /// Makes (or takes over) the cgroup at `dir`.
    pub fn create(dir: PathBuf) -> std::io::Result<Self> {
        Owned::create(dir).map(CpuCgroup)
    }

    /// Its `tasks`, for [`join_cgroup`] after a fork.
    pub fn join_path(&self) -> CString {
        self.0.tasks.clone()
    }

    /// The CPU time its tasks have used, in nanoseconds, if readable.
    pub fn usage_ns(&self) -> Option<u64> {
        std::fs::read_to_string(self.0.dir.join("cpuacct.usage"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

/// A v1 `cpu` cgroup whose tasks together may use at most a number of CPUs
/// (a CFS quota per period: past it they wait for the next period,
/// however many threads or processes they run).
#[derive(Debug)]
pub struct CpuQuota(Owned);

impl CpuQuota {
    /// Makes (or takes over) the cgroup at `dir` and caps it at `cpus`.
    pub fn create(dir: PathBuf, cpus: f64) -> std::io::Result<Self> {
        let cgroup = Owned::create(dir)?;
        std::fs::write(cgroup.dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
        std::fs::write(cgroup.dir.join("cpu.cfs_quota_us"), quota_us(cpus).to_string())?;
        Ok(CpuQuota(cgroup))
    }

    /// Its `tasks`, for [`join_cgroup`] after a fork.
    pub fn join_path(&self) -> CString {
        self.0.tasks.clone()
    }
}

/// `cpus` as CPU time per [`CPU_PERIOD_US`], no less than the kernel's
/// least (1 ms).
fn quota_us(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

/// The `oom_kill` count of a v1 memory cgroup, while it exists.
pub fn oom_kills(cgroup: &Path) -> Option<u64> {
    counter(&cgroup.join("memory.oom_control"), "oom_kill")
}

/// The number after `name` in a cgroup file of `name value` lines.
fn counter(file: &Path, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word == name {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// What one build step may take: memory (all its processes together),
/// tasks (processes and threads), the disk its directory takes and CPUs,
/// `BUILD_MEMORY_MB`, `BUILD_MAX_PROCESSES`, `BUILD_DISK_MB` and
/// `BUILD_CPUS`.
#[derive(Debug, Clone, Copy)]
pub struct StepCaps {
    pub memory_bytes: u64,
    pub max_tasks: u64,
    pub disk_bytes: u64,
    /// 0: no quota.
    pub cpus: f64,
}

/// Names steps' cgroups apart within this controller.
static STEPS: AtomicU64 = AtomicU64::new(0);

/// A build step's own cgroups, capped at its [`StepCaps`] (its CPU quota
/// leaves the controller's requests the rest of the machine): the step's
/// first process joins them before exec ([`Confinement::apply`]). Without
/// the hierarchies (or not as root) it caps nothing. Removed when dropped:
/// anything still in them is killed first.
#[derive(Debug)]
pub struct Confinement {
    caps: StepCaps,
    pids: Option<PathBuf>,
    memory: Option<MemoryCgroup>,
    cpu: Option<CpuQuota>,
    /// What the disk watch found the directory took, once past the cap.
    disk_over: Arc<AtomicU64>,
    watch: Option<tokio::task::JoinHandle<()>>,
}

impl Confinement {
    pub fn new(caps: StepCaps) -> std::io::Result<Self> {
        let mut confinement = Confinement {
            caps,
            pids: None,
            memory: None,
            cpu: None,
            disk_over: Arc::new(AtomicU64::new(0)),
            watch: None,
        };
        if !rustix::process::geteuid().is_root() {
            return Ok(confinement);
        }
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(sweep_steps);
        let name = format!("{}-{}", std::process::id(), STEPS.fetch_add(1, Ordering::Relaxed));
        if Path::new(PIDS_HIERARCHY).join("cgroup.procs").exists() {
            let dir = Path::new(PIDS_HIERARCHY).join("fnrt/steps").join(&name);
            std::fs::create_dir_all(&dir)?;
            // Owned from here: removed on drop even if the cap fails.
            confinement.pids = Some(dir.clone());
            std::fs::write(dir.join("pids.max"), caps.max_tasks.to_string())?;
        }
        if Path::new(MEMORY_HIERARCHY).join("cgroup.procs").exists() {
            let parent = Path::new(MEMORY_HIERARCHY).join("fnrt/steps");
            std::fs::create_dir_all(&parent)?;
            confinement.memory = Some(MemoryCgroup::create(parent.join(&name), caps.memory_bytes)?);
        }
        if caps.cpus > 0.0 && Path::new(CPU_HIERARCHY).join("cgroup.procs").exists() {
            let parent = Path::new(CPU_HIERARCHY).join("fnrt/steps");
            std::fs::create_dir_all(&parent)?;
            confinement.cpu = Some(CpuQuota::create(parent.join(&name), caps.cpus)?);
        }
        Ok(confinement)
    }

    /// Makes `cmd`'s child join the step's cgroups before it execs.
    #[allow(unsafe_code)]
    pub fn apply(&self, cmd: &mut std::process::Command) -> std::io::Result<()> {
        use std::os::unix::process::CommandExt as _;
        let pids = self.pids.as_deref().map(tasks_of).transpose()?;
        let memory = self.memory.as_ref().map(MemoryCgroup::join_path);
        let cpu = self.cpu.as_ref().map(CpuQuota::join_path);
        if pids.is_none() && memory.is_none() && cpu.is_none() {
            return Ok(());
        }
        // SAFETY: the closure runs in the forked child before exec and only
        // opens and writes files whose paths were made before the fork
        // (`join_cgroup`), without allocating or taking locks.
        unsafe {
            cmd.pre_exec(move || {
                for tasks in [&pids, &memory, &cpu].into_iter().flatten() {
                    join_cgroup(tasks)?;
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Measures `dir` (what the step writes on the host's disk) every
    /// second until the confinement is dropped; past the cap, kills every
    /// process of the step. Needs the `pids` cgroup (what it kills).
    pub fn watch_disk(&mut self, dir: PathBuf) {
        let Some(pids) = self.pids.clone() else { return };
        let (cap, over) = (self.caps.disk_bytes, self.disk_over.clone());
        self.watch = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(DISK_WATCH_EVERY).await;
                let measured = dir.clone();
                let used = tokio::task::spawn_blocking(move || disk_used(&measured))
                    .await
                    .unwrap_or(0);
                if used > cap {
                    over.store(used, Ordering::SeqCst);
                    kill_procs(&pids, None);
                    return;
                }
            }
        }));
    }

    /// Whether the disk watch stopped the step.
    pub fn disk_exceeded(&self) -> bool {
        self.disk_over.load(Ordering::SeqCst) > 0
    }

    /// Which cap stopped the step, in words for its failure, if one did.
    pub fn explain(&self) -> Option<String> {
        let disk = self.disk_over.load(Ordering::SeqCst);
        if disk > 0 {
            return Some(format!(
                "it wrote {} MiB to its work directory, more than the {} MiB a build step may (BUILD_DISK_MB)",
                disk / (1024 * 1024),
                self.caps.disk_bytes / (1024 * 1024)
            ));
        }
        if self.memory.as_ref().is_some_and(MemoryCgroup::oom_killed) {
            return Some(format!(
                "it ran out of memory: a build step may use {} MiB (BUILD_MEMORY_MB)",
                self.caps.memory_bytes / (1024 * 1024)
            ));
        }
        let refused = self
            .pids
            .as_ref()
            .and_then(|dir| counter(&dir.join("pids.events"), "max"))
            .unwrap_or(0);
        (refused > 0).then(|| {
            format!(
                "it reached its limit of {} processes and threads (BUILD_MAX_PROCESSES): {refused} forks refused",
                self.caps.max_tasks
            )
        })
    }
}

impl Drop for Confinement {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.abort();
        }
        let Some(dir) = &self.pids else { return };
        // The step's processes die with its sandbox's PID namespace; a
        // moment after, they may still be leaving the cgroup.
        for _ in 0..50 {
            if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                break;
            }
            kill_procs(dir, None);
            std::thread::sleep(Duration::from_millis(2));
        }
        // The memory and cpu cgroups go after (their own drops), empty by
        // now.
    }
}

/// Removes the steps' cgroups that controllers which are gone left behind
/// (one that exits mid-build drops no [`Confinement`]): those named after
/// a pid that no longer runs. A cgroup that still holds a task is not
/// removed (the kernel refuses).
fn sweep_steps() {
    for hierarchy in [PIDS_HIERARCHY, MEMORY_HIERARCHY, CPU_HIERARCHY] {
        let Ok(entries) = std::fs::read_dir(Path::new(hierarchy).join("fnrt/steps")) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.split('-').next()) else {
                continue;
            };
            let gone = pid
                .parse::<u32>()
                .is_ok_and(|p| p != std::process::id() && !Path::new("/proc").join(p.to_string()).exists());
            if gone && entry.path().is_dir() {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

/// Sends SIGKILL to every process of the cgroup at `dir` but `spared`
/// (`cgroup.procs` read afresh).
pub fn kill_procs(dir: &Path, spared: Option<rustix::process::Pid>) {
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter_map(rustix::process::Pid::from_raw)
    {
        if Some(pid) != spared {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// The disk `dir` takes: its files' allocated blocks (so that many small
/// files count for what they take), symbolic links not followed; what
/// vanishes during the walk is skipped.
pub fn disk_used(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        total += meta.blocks() * 512;
        if meta.is_dir() {
            total += disk_used(&entry.path());
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steps_cgroup_left_by_a_controller_that_is_gone_is_removed() {
        if !rustix::process::geteuid().is_root() || !Path::new(PIDS_HIERARCHY).join("cgroup.procs").exists() {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root with cgroups");
            return;
        }
        // Arrange: a step's cgroups named after a pid that runs nothing,
        // and one of this process's.
        let dead = (4_194_000..4_194_304)
            .find(|p| !Path::new("/proc").join(p.to_string()).exists())
            .unwrap();
        let left: Vec<PathBuf> = [PIDS_HIERARCHY, MEMORY_HIERARCHY, CPU_HIERARCHY]
            .iter()
            .map(|h| Path::new(h).join("fnrt/steps").join(format!("{dead}-0")))
            .collect();
        let own = Path::new(PIDS_HIERARCHY)
            .join("fnrt/steps")
            .join(format!("{}-999999", std::process::id()));
        for dir in left.iter().chain([&own]) {
            std::fs::create_dir_all(dir).unwrap();
        }

        // Act
        sweep_steps();

        // Assert
        for dir in &left {
            assert!(!dir.exists(), "{} is left", dir.display());
        }
        assert!(own.exists(), "a live controller's step was removed");
        std::fs::remove_dir(&own).unwrap();
    }
}
