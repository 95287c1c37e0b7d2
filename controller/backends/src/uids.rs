//! The uids instances run as (when the controller is root), and what tells
//! which processes each one has.
//!
//! A uid is one instance's at a time, on the whole host: several
//! controllers (replicas, test suites) may share a uid range, so a uid is
//! taken by an exclusive `flock` on `/run/fnrt/uids/{uid}`, which the kernel
//! drops when its holder dies. And a uid is never handed out while any
//! process of it lives: every process an instance starts is in the cgroup
//! of its uid (v1 `pids` controller, `/sys/fs/cgroup/pids/fnrt/{uid}`,
//! joined before the sandbox starts; a function cannot leave it, since no
//! cgroup filesystem is mounted in its sandbox), and a uid whose cgroup
//! still counts a task is passed over. Those tasks belong to no instance
//! (the uid's lock is free), so they are killed then, and when a pool
//! starts ([`UidPool::new`] sweeps its range): nothing of a controller that
//! died without stopping its instances outlives the next one to start.
//!
//! The same cgroup tells whether an instance's processes grew: a function
//! that left a process (or a zombie) behind is not handed to the next
//! execution ([`Cgroup::grew`]).
//!
//! An instance of the process backend also gets a v1 `memory` cgroup of
//! its uid ([`UidLease::limit_memory`], `/sys/fs/cgroup/memory/fnrt/{uid}`):
//! its manifest's memory is the cap of all its processes together and of
//! what they write to its scratch tmpfs, where `RLIMIT_DATA` caps each
//! process alone (a function that forks ten children had ten times its
//! memory). Past the cap the kernel kills within the instance, and the
//! cgroup's `oom_kill` count says so ([`MemoryCgroup::oom_killed`](crate::cgroups::MemoryCgroup::oom_killed)).
//! Its uid's v1 `cpu` cgroup caps the CPU time of all its processes and
//! threads together during a call (`INSTANCE_CPUS`, [`UidLease::limit_cpu`]),
//! and its `cpuacct` one counts it for the idle sweep between calls
//! ([`UidLease::account_cpu`], [`crate::idle`]).
//!
//! # Layout
//!
//! - [`UidPool`] hands out [`UidLease`]s round-robin.
//! - [`Cgroup`]: one uid's cgroup: join (between fork and exec, through
//!   `tasks`), count,
//!   kill, wait until empty.
//! - memory caps and joining a cgroup are [`crate::cgroups`]'.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cgroups::{
    CPU_HIERARCHY, CPUACCT_HIERARCHY, CpuCgroup, CpuQuota, MEMORY_HIERARCHY, MemoryCgroup, PIDS_HIERARCHY, fnrt_cgroup,
};

/// Where the uid locks live.
const LOCK_DIR: &str = "/run/fnrt/uids";

/// The range of uids instances run as, one each. Handed out round-robin so
/// a uid is reused as late as possible.
#[derive(Debug)]
pub struct UidPool {
    base: u32,
    count: u32,
    /// `fnrt/` in the `pids` hierarchy, when there is one.
    cgroups: Option<PathBuf>,
    /// `fnrt/` in the `memory` hierarchy, when there is one.
    memory: Option<PathBuf>,
    /// `fnrt/` in the `cpuacct` hierarchy, when there is one.
    cpuacct: Option<PathBuf>,
    /// `fnrt/` in the `cpu` hierarchy, when there is one.
    cpu: Option<PathBuf>,
    /// The next offset to try, and the uids this controller holds.
    state: Mutex<(u32, HashSet<u32>)>,
}

impl UidPool {
    pub fn new(base: u32, count: u32) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(LOCK_DIR)?;
        let cgroups = fnrt_cgroup(
            PIDS_HIERARCHY,
            "instance processes are not counted, so a uid is reused without checking that none of its processes lives",
        )?;
        let memory = fnrt_cgroup(
            MEMORY_HIERARCHY,
            "an instance's memory is capped per process only (RLIMIT_DATA), not for all its processes together",
        )?;
        let cpuacct = fnrt_cgroup(
            CPUACCT_HIERARCHY,
            "an instance that works between its calls is not seen, nor stopped",
        )?;
        let cpu = fnrt_cgroup(
            CPU_HIERARCHY,
            "an instance's CPU time is not capped (INSTANCE_CPUS): during a call it may take every core",
        )?;
        let pool = Arc::new(UidPool {
            base,
            count: count.max(1),
            cgroups,
            memory,
            cpuacct,
            cpu,
            state: Mutex::new((0, HashSet::new())),
        });
        pool.sweep();
        Ok(pool)
    }

    /// Kills what instances of a controller that died without stopping them
    /// left behind in this range: processes of a uid whose lock no one
    /// holds. (A sandbox dies with its controller; this is the net under
    /// that, for any way it did not.)
    fn sweep(&self) {
        if let Some(dir) = &self.cgroups {
            for (uid, path) in self.in_range(dir) {
                if let Some(_lock) = try_lock(uid)
                    && let Ok(cgroup) = Cgroup::open(path)
                    && cgroup.tasks() > 0
                {
                    kill_orphans(uid, &cgroup);
                }
            }
        }
        // An instance dropped while its processes were still dying (a
        // controller stopping) could not remove its memory and CPU cgroups:
        // empty now, they go (the `pids` one stays, as the uid's).
        for dir in [&self.memory, &self.cpuacct, &self.cpu].into_iter().flatten() {
            for (uid, path) in self.in_range(dir) {
                if let Some(_lock) = try_lock(uid) {
                    let _ = std::fs::remove_dir(path);
                }
            }
        }
    }

    /// The cgroups under `dir` named after a uid of this range.
    fn in_range(&self, dir: &Path) -> Vec<(u32, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let uid = entry.file_name().to_str()?.parse::<u32>().ok()?;
                (self.base..self.base + self.count)
                    .contains(&uid)
                    .then(|| (uid, entry.path()))
            })
            .collect()
    }

    /// A uid no other instance on this host holds and no process runs as.
    pub fn allocate(self: &Arc<Self>) -> Option<UidLease> {
        let mut state = self.state.lock().unwrap();
        for _ in 0..self.count {
            let uid = self.base + state.0;
            state.0 = (state.0 + 1) % self.count;
            if state.1.contains(&uid) {
                continue;
            }
            let Some(lock) = try_lock(uid) else { continue };
            let cgroup = match &self.cgroups {
                Some(dir) => match Cgroup::open(dir.join(uid.to_string())) {
                    Ok(cgroup) if cgroup.tasks() == 0 => Some(cgroup),
                    // Processes of an earlier instance with this uid are
                    // still being reaped, or live on with no one to stop
                    // them: killed either way (whoever held the uid let it
                    // go), and the uid passed over until they are gone.
                    Ok(cgroup) => {
                        kill_orphans(uid, &cgroup);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(uid, error = %e, "cannot create the uid's cgroup; passed over");
                        continue;
                    }
                },
                None => None,
            };
            state.1.insert(uid);
            return Some(UidLease {
                uid,
                cgroup,
                _lock: lock,
                pool: self.clone(),
            });
        }
        None
    }
}

/// Kills the processes in the cgroup of `uid`, whose lock the caller
/// holds: no instance owns them. Says which they were, since a sandbox
/// that outlived its controller is a fault worth finding.
fn kill_orphans(uid: u32, cgroup: &Cgroup) {
    let processes = cgroup.processes();
    if processes.is_empty() {
        return;
    }
    let commands: Vec<String> = processes
        .iter()
        .map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            format!("{pid}: {}", cmdline.trim())
        })
        .collect();
    tracing::warn!(uid, processes = ?commands, "killing processes of a uid no instance holds (left by a controller that is gone, or still dying)");
    cgroup.kill(None);
}

/// The exclusive lock on `uid`, if no one else holds it.
fn try_lock(uid: u32) -> Option<OwnedFd> {
    use rustix::fs::{FlockOperation, Mode, OFlags};
    let path = Path::new(LOCK_DIR).join(uid.to_string());
    let fd = rustix::fs::open(
        &path,
        OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from(0o600),
    )
    .ok()?;
    rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).ok()?;
    Some(fd)
}

/// A uid in use by one instance; given back when dropped.
#[derive(Debug)]
pub struct UidLease {
    pub uid: u32,
    /// The uid's cgroup, which every process of the instance joins.
    pub cgroup: Option<Cgroup>,
    _lock: OwnedFd,
    pool: Arc<UidPool>,
}

impl UidLease {
    /// Caps the memory of everything the instance runs, together, at
    /// `bytes` (swap included, where the kernel counts it): the uid's
    /// `memory` cgroup, which the child joins with [`join_cgroup`] beside
    /// its `pids` one. `None` without a v1 `memory` hierarchy.
    pub fn limit_memory(&self, bytes: u64) -> std::io::Result<Option<MemoryCgroup>> {
        self.own(&self.pool.memory)
            .map(|dir| MemoryCgroup::create(dir, bytes))
            .transpose()
    }

    /// Counts the CPU time of everything the instance runs: the uid's
    /// `cpuacct` cgroup, joined like the others. `None` without the
    /// hierarchy.
    pub fn account_cpu(&self) -> std::io::Result<Option<CpuCgroup>> {
        self.own(&self.pool.cpuacct).map(CpuCgroup::create).transpose()
    }

    /// Caps the CPU time of everything the instance runs, together, at
    /// `cpus` CPUs: the uid's `cpu` cgroup, joined like the others. `None`
    /// without the hierarchy.
    pub fn limit_cpu(&self, cpus: f64) -> std::io::Result<Option<CpuQuota>> {
        self.own(&self.pool.cpu)
            .map(|dir| CpuQuota::create(dir, cpus))
            .transpose()
    }

    /// This uid's cgroup in a hierarchy's `fnrt/`, when there is one.
    fn own(&self, fnrt: &Option<PathBuf>) -> Option<PathBuf> {
        fnrt.as_ref().map(|dir| dir.join(self.uid.to_string()))
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.pool.state.lock().unwrap().1.remove(&self.uid);
    }
}

/// One uid's cgroup in the `pids` hierarchy.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    /// `tasks`, ready for [`join_cgroup`] after a fork.
    tasks: CString,
    /// `pids.current`, kept open (one `pread` per look). `cgroup.procs`
    /// and `tasks` are opened afresh for every look: cgroup v1 keeps the
    /// list an open file read for a second and serves it again, stale.
    current: std::fs::File,
}

impl Cgroup {
    fn open(dir: PathBuf) -> std::io::Result<Self> {
        // Made, or taken over as an earlier holder left it.
        std::fs::create_dir_all(&dir)?;
        let tasks = CString::new(dir.join("tasks").into_os_string().into_encoded_bytes())
            .map_err(|_| std::io::Error::other("cgroup path contains NUL"))?;
        let current = std::fs::File::open(dir.join("pids.current"))?;
        Ok(Cgroup { dir, tasks, current })
    }

    /// Its directory in the `pids` hierarchy.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Its `tasks`, for [`join_cgroup`] after a fork.
    pub fn join_path(&self) -> CString {
        self.tasks.clone()
    }

    /// Tasks (threads, and zombies not yet reaped) counted in the cgroup.
    pub fn tasks(&self) -> u64 {
        std::str::from_utf8(&read_whole(&self.current))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The live processes in the cgroup.
    pub fn processes(&self) -> Vec<i32> {
        self.list("cgroup.procs")
    }

    /// The ids a list file holds, read from a fresh open.
    fn list(&self, name: &str) -> Vec<i32> {
        std::fs::File::open(self.dir.join(name))
            .map(|f| parse_ids(&read_whole(&f)))
            .unwrap_or_default()
    }

    /// Whether the cgroup holds more than `expected` processes, or tasks
    /// that are not running threads (zombies left unreaped). Every count is
    /// read afresh: a total that stayed the same can hide a thread gone and
    /// a process come.
    pub fn grew(&self, expected: usize) -> bool {
        if self.processes().len() > expected {
            return true;
        }
        // A thread that just ended has left `tasks` a moment before it is
        // uncharged from the count (Python's request thread ends right
        // after its answer): only a surplus that stays is a zombie.
        for _ in 0..5 {
            let tasks = self.tasks();
            let threads = self.list("tasks").len() as u64;
            if tasks <= threads {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        true
    }

    /// Sends SIGKILL to every process in the cgroup but `spared`.
    pub fn kill(&self, spared: Option<rustix::process::Pid>) {
        crate::cgroups::kill_procs(&self.dir, spared);
    }

    /// Kills every process in the cgroup and waits (at most `wait`) until
    /// none is counted; whether it emptied.
    pub async fn kill_all(&self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            self.kill(None);
            if self.tasks() == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A cgroup file's whole text: each read from offset 0 makes it anew.
fn read_whole(file: &std::fs::File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match file.read_at(&mut buf, out.len() as u64) {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                // The kernel hands over what fits at once: a short read is all.
                if n < buf.len() {
                    return out;
                }
            }
        }
    }
}

fn parse_ids(text: &[u8]) -> Vec<i32> {
    String::from_utf8_lossy(text)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::join_cgroup;

    /// The walls need root and the cgroup v1 `pids` hierarchy, as in CI.
    fn walls_available() -> bool {
        let available = rustix::process::geteuid().is_root() && Path::new(PIDS_HIERARCHY).exists();
        assert!(
            available || std::env::var_os("CI").is_none(),
            "CI runs as root with cgroups"
        );
        available
    }

    /// `sleep secs`, moved into `cgroup` (a process an instance left).
    fn sleep_in(cgroup: &Cgroup, secs: &str) -> std::process::Child {
        let child = std::process::Command::new("sleep").arg(secs).spawn().unwrap();
        std::fs::write(cgroup.path().join("cgroup.procs"), child.id().to_string()).unwrap();
        child
    }

    /// Calls `look` until `child` has exited (at most 5 s): a look may find a
    /// free uid's lock held for a moment by a child another test forked
    /// (it holds every descriptor until its exec), and pass the uid over.
    fn look_until_gone(child: &mut std::process::Child, mut look: impl FnMut()) {
        for _ in 0..500 {
            look();
            if child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for `child`, which must have been killed with SIGKILL.
    fn assert_killed(mut child: std::process::Child) {
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "{status}"
        );
    }

    #[tokio::test]
    async fn a_uid_is_never_handed_out_while_another_holds_it_or_a_process_of_it_lives() {
        if !walls_available() {
            return;
        }
        // Arrange: two pools (two controllers) over the same one uid.
        let a = UidPool::new(260_000, 1).unwrap();
        let b = UidPool::new(260_000, 1).unwrap();
        let lease = a.allocate().expect("a free uid");

        // Assert: held by a, it is neither a's again nor b's.
        assert!(a.allocate().is_none());
        assert!(b.allocate().is_none());

        // Arrange: a process in the uid's cgroup outlives the lease.
        let mut straggler = sleep_in(lease.cgroup.as_ref().unwrap(), "30");
        drop(lease);

        // Assert: not handed out while the process lives; no one holds the
        // uid, so the process is killed; then the uid is free.
        look_until_gone(&mut straggler, || {
            assert!(b.allocate().is_none(), "handed out while a process of it lives");
        });
        assert_killed(straggler);
        // The kernel may uncharge a reaped task a moment later.
        let mut lease = None;
        for _ in 0..200 {
            lease = b.allocate();
            if lease.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let lease = lease.expect("free once its last process is gone");
        assert_eq!(lease.uid, 260_000);
        assert_eq!(lease.cgroup.as_ref().unwrap().tasks(), 0);
    }

    #[tokio::test]
    async fn a_pool_that_starts_kills_what_a_dead_controllers_instances_left_in_its_range() {
        if !walls_available() {
            return;
        }
        // Arrange: a controller (pool) whose instance's process outlives
        // it: the pool and the lease are gone, the process is not.
        let dead = UidPool::new(260_003, 1).unwrap();
        let lease = dead.allocate().unwrap();
        let mut left = sleep_in(lease.cgroup.as_ref().unwrap(), "30");
        drop((lease, dead));
        // A uid another pool holds is not touched, whatever runs in it.
        let holder = UidPool::new(260_004, 1).unwrap();
        let held = holder.allocate().unwrap();
        let mut running = sleep_in(held.cgroup.as_ref().unwrap(), "30");

        // Act: the next controller starts over the whole range (again,
        // while the left process lives).
        look_until_gone(&mut left, || drop(UidPool::new(260_003, 2).unwrap()));

        // Assert: the left process was killed, the held one lives.
        assert_killed(left);
        assert!(running.try_wait().unwrap().is_none(), "a held uid's process was killed");
        running.kill().unwrap();
        running.wait().unwrap();
        assert!(held.cgroup.as_ref().unwrap().kill_all(Duration::from_secs(2)).await);
    }

    #[tokio::test]
    async fn a_pool_that_starts_removes_the_memory_and_cpu_cgroups_left_in_its_range() {
        if !walls_available() {
            return;
        }
        // Arrange: cgroups an instance dropped mid-exit left, empty; and a
        // uid another pool holds, whose cgroups are in use.
        let left: Vec<PathBuf> = [MEMORY_HIERARCHY, CPU_HIERARCHY, CPUACCT_HIERARCHY]
            .iter()
            .map(|h| Path::new(h).join("fnrt/260010"))
            .collect();
        for dir in &left {
            std::fs::create_dir_all(dir).unwrap();
        }
        let holder = UidPool::new(260_011, 1).unwrap();
        let held = holder.allocate().unwrap();
        let memory = held.limit_memory(64 << 20).unwrap().unwrap();

        // Act: the next controller starts over the range.
        drop(UidPool::new(260_010, 2).unwrap());

        // Assert: the left ones are gone, the held one is not.
        for dir in &left {
            assert!(!dir.exists(), "{} was left", dir.display());
        }
        assert!(Path::new(MEMORY_HIERARCHY).join("fnrt/260011").is_dir());
        drop((memory, held));
        assert!(!Path::new(MEMORY_HIERARCHY).join("fnrt/260011").exists());
    }

    #[tokio::test]
    async fn an_instance_that_left_a_zombie_or_a_process_grew() {
        if !walls_available() {
            return;
        }
        let pool = UidPool::new(260_001, 1).unwrap();
        let lease = pool.allocate().unwrap();
        let cgroup = lease.cgroup.as_ref().unwrap();
        let mut a = sleep_in(cgroup, "30");
        assert!(!cgroup.grew(1), "one process, as expected");

        // A second process, then the same exited but not reaped (a zombie).
        let mut b = sleep_in(cgroup, "0.2");
        assert!(cgroup.grew(1), "a second process counts");
        std::thread::sleep(Duration::from_millis(500));
        assert!(cgroup.grew(1), "a zombie counts");
        b.wait().unwrap();
        // Reaped, it no longer counts (once the kernel has uncharged it).
        let mut grew = true;
        for _ in 0..200 {
            grew = cgroup.grew(1);
            if !grew {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!grew, "a reaped zombie still counts");

        a.kill().unwrap();
        a.wait().unwrap();
        assert!(cgroup.kill_all(Duration::from_secs(2)).await);
    }

    #[tokio::test]
    #[allow(unsafe_code)]
    async fn a_child_that_joins_between_fork_and_exec_is_counted_with_all_it_starts() {
        if !walls_available() {
            return;
        }
        let pool = UidPool::new(260_002, 1).unwrap();
        let lease = pool.allocate().unwrap();
        let cgroup = lease.cgroup.as_ref().unwrap();
        let tasks = cgroup.join_path();
        // A shell that starts two sleeps of its own, as an instance's
        // server starts what it starts.
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "sleep 30 & sleep 30 & wait"]);
        // SAFETY: join_cgroup makes raw system calls (open, write, close) on
        // a path prepared before the fork: async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || Ok(join_cgroup(&tasks)?));
        }
        let mut shell = cmd.spawn().unwrap();
        let mut counted = Vec::new();
        for _ in 0..200 {
            counted = cgroup.processes();
            if counted.len() == 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(counted.contains(&(shell.id() as i32)), "the child itself: {counted:?}");
        assert_eq!(counted.len(), 3, "the shell and both sleeps: {counted:?}");
        // Killed through the cgroup; the shell, ours, is reaped here.
        cgroup.kill(None);
        shell.wait().unwrap();
        assert!(cgroup.kill_all(Duration::from_secs(2)).await);
    }
}
