//! A private network for a sandbox that must download (a build's `cargo
//! fetch`, a dependency install): a network namespace of its own that
//! reaches the internet through slirp4netns (Debian's `slirp4netns`, the
//! user-mode NAT rootless Podman uses), and never the host's loopback or
//! the host's own addresses (`--disable-host-loopback`): the controller,
//! Redis and the database on 127.0.0.1 stay out of reach even while the
//! code of a registered package's install runs.
//!
//! bubblewrap creates the namespace and waits (`--block-fd`) until
//! slirp4netns, started on the sandbox's pid (read from `--info-fd`), has
//! configured it; the sandbox's `/etc/resolv.conf` names slirp's DNS
//! forwarder. slirp4netns runs with its own sandbox and seccomp filter, and
//! stops when the [`SlirpGuard`] is dropped.
//!
//! An instance of a function with `network.egress` gets the same network,
//! narrowed by a ruleset ([`crate::egress`]) loaded into the namespace
//! after slirp configured it and before bubblewrap lets the function run,
//! and its own `/etc/hosts`.
//!
//! # Layout
//! - [`find_slirp`]: whether slirp4netns is installed.
//! - [`Setup`]: what the namespace gets besides the network (files, rules).
//! - [`PrivateNetwork`]: the pipes, made before the spawn; its
//!   [`PrivateNetwork::bwrap_args`] go to bubblewrap, [`PrivateNetwork::prepare`]
//!   lets the child inherit its ends, [`PrivateNetwork::start`] runs slirp
//!   once the sandbox is spawned.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// slirp's DNS forwarder, inside the namespace.
const RESOLV_CONF: &str = "nameserver 10.0.2.3\n";

/// What a private network's sandbox gets besides the network.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Its `/etc/resolv.conf`.
    pub resolv: String,
    /// Its `/etc/hosts`; `None`: the host's.
    pub hosts: Option<String>,
    /// An nftables ruleset loaded into the namespace before the command
    /// runs, and nft's path; `None`: the whole internet.
    pub rules: Option<(PathBuf, String)>,
}

impl Setup {
    /// The internet, names resolved by slirp's forwarder (builds, installs).
    pub fn open() -> Setup {
        Setup {
            resolv: RESOLV_CONF.to_owned(),
            hosts: None,
            rules: None,
        }
    }
}

/// slirp4netns's path, if it is installed.
pub fn find_slirp() -> Option<PathBuf> {
    crate::find_tool("slirp4netns")
}

/// The pipes between the controller, bubblewrap and slirp4netns for one
/// sandbox with a private network.
#[derive(Debug)]
pub struct PrivateNetwork {
    slirp: PathBuf,
    /// bubblewrap writes the sandbox's pid here.
    info: OwnedFd,
    /// bubblewrap waits for a byte here before it runs the command.
    block: OwnedFd,
    /// The child's ends (info, block, then the files'): inherited, then
    /// closed here once it is spawned.
    child_ends: Vec<OwnedFd>,
    /// Where each file after info and block is shown.
    file_paths: Vec<&'static str>,
    rules: Option<(PathBuf, String)>,
}

impl PrivateNetwork {
    pub fn new(slirp: PathBuf, setup: Setup) -> std::io::Result<Self> {
        use rustix::pipe::{PipeFlags, pipe_with};
        let (info, info_child) = pipe_with(PipeFlags::CLOEXEC)?;
        let (block_child, block) = pipe_with(PipeFlags::CLOEXEC)?;
        let mut child_ends = vec![info_child, block_child];
        let mut file_paths = Vec::new();
        // Over the host's files, unless they are links bubblewrap could
        // not mount over (then names resolve as the host's files say).
        let files = [("/etc/resolv.conf", Some(setup.resolv)), ("/etc/hosts", setup.hosts)];
        for (path, text) in files {
            let Some(text) = text else { continue };
            if Path::new(path).is_symlink() {
                continue;
            }
            let (read, write) = pipe_with(PipeFlags::CLOEXEC)?;
            // At most a few KiB (MAX_EGRESS names): they fit in the pipe
            // before anyone reads.
            std::fs::File::from(write).write_all(text.as_bytes())?;
            child_ends.push(read);
            file_paths.push(path);
        }
        Ok(PrivateNetwork {
            slirp,
            info,
            block,
            child_ends,
            file_paths,
            rules: setup.rules,
        })
    }

    /// bubblewrap's arguments for it.
    /// bubblewrap's arguments for it: namespace options first, then the
    /// files, which must come after the system's `/etc` is bound (mounts
    /// are made in argument order).
    pub fn bwrap_args(&self) -> (Vec<OsString>, Vec<OsString>) {
        let fd = |i: usize| self.child_ends[i].as_raw_fd().to_string();
        let namespace = [
            "--unshare-net".into(),
            "--info-fd".into(),
            fd(0),
            "--block-fd".into(),
            fd(1),
        ]
        .map(OsString::from)
        .into();
        let mut files = Vec::new();
        for (i, path) in self.file_paths.iter().enumerate() {
            // Readable by the sandbox's uid (bubblewrap's default is 0600).
            files.extend([
                "--perms".into(),
                "0644".into(),
                "--ro-bind-data".into(),
                fd(i + 2).into(),
                OsString::from(path),
            ]);
        }
        (namespace, files)
    }

    /// Lets the child inherit its ends of the pipes (they are close-on-exec).
    pub fn prepare(&self, cmd: &mut tokio::process::Command) {
        inherit(cmd, self.child_ends.iter().map(|fd| fd.as_raw_fd()).collect());
    }

    /// After the sandbox was spawned: starts slirp4netns on its namespace,
    /// waits until the network is up, then lets the sandbox run.
    pub async fn start(self) -> std::io::Result<SlirpGuard> {
        let PrivateNetwork {
            slirp,
            info,
            block,
            child_ends,
            rules,
            ..
        } = self;
        drop(child_ends);
        let pid = tokio::task::spawn_blocking(move || read_child_pid(info))
            .await
            .map_err(std::io::Error::other)??;
        // bubblewrap brings the namespace's loopback up itself, and fails
        // (`loopback: Failed RTM_NEWADDR`) when slirp configures the
        // namespace at the same moment: slirp starts once that is done.
        let started = std::time::Instant::now();
        while !loopback_up(pid) && started.elapsed() < std::time::Duration::from_secs(2) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        match attach(&slirp, pid, rules).await {
            Ok(guard) => {
                std::fs::File::from(block).write_all(b"1")?;
                Ok(guard)
            }
            Err(e) => {
                // Before bubblewrap sees the block pipe close, which would
                // let the command run without its network or its rules.
                kill_sandbox(pid);
                Err(e)
            }
        }
    }
}

/// Gives the network namespace of `pid` the internet through slirp4netns
/// (never the host's loopback), then loads `rules` into it: for a
/// bubblewrap sandbox ([`PrivateNetwork::start`]) and for a container
/// (`crate::docker`), before the code it is for runs.
pub async fn attach(slirp: &Path, pid: u32, rules: Option<(PathBuf, String)>) -> std::io::Result<SlirpGuard> {
    let (ready, ready_child) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let (exit_child, exit) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let mut cmd = tokio::process::Command::new(slirp);
    cmd.args([
        "--configure".to_owned(),
        "--mtu=65520".to_owned(),
        "--disable-host-loopback".to_owned(),
        "--enable-sandbox".to_owned(),
        "--enable-seccomp".to_owned(),
        format!("--ready-fd={}", ready_child.as_raw_fd()),
        format!("--exit-fd={}", exit_child.as_raw_fd()),
        pid.to_string(),
        "tap0".to_owned(),
    ])
    .env_clear()
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .kill_on_drop(true);
    let inherited = [ready_child.as_raw_fd(), exit_child.as_raw_fd()];
    inherit(&mut cmd, inherited.to_vec());
    let mut child = cmd.spawn()?;
    drop((ready_child, exit_child));
    let up = tokio::task::spawn_blocking(move || {
        let mut byte = [0u8; 1];
        std::fs::File::from(ready).read(&mut byte)
    })
    .await
    .map_err(std::io::Error::other)?;
    if !matches!(up, Ok(1)) {
        let _ = child.start_kill();
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), err.read_to_string(&mut stderr)).await;
        }
        return Err(std::io::Error::other(format!(
            "slirp4netns did not start: {}",
            stderr.trim()
        )));
    }
    if let Some((nft, ruleset)) = rules
        && let Err(e) = crate::egress::load(&nft, pid, &ruleset).await
    {
        return Err(std::io::Error::other(format!("loading the egress rules: {e}")));
    }
    Ok(SlirpGuard {
        _child: child,
        _exit: exit,
    })
}

/// Kills the sandbox's init (bubblewrap then ends), so that the command
/// never runs.
fn kill_sandbox(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// Lets `cmd`'s child inherit `fds` (close-on-exec in the parent), and no
/// other descriptor past its standard streams.
#[allow(unsafe_code)]
fn inherit(cmd: &mut tokio::process::Command, fds: Vec<i32>) {
    // SAFETY: runs in the forked child before exec; close_range, then fcntl
    // through rustix, one system call per fd, no allocation, no lock. The
    // fds stay open in the parent until after the spawn.
    unsafe {
        cmd.pre_exec(move || {
            crate::sandbox::close_inherited_on_exec()?;
            for fd in &fds {
                let fd = std::os::fd::BorrowedFd::borrow_raw(*fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            }
            Ok(())
        });
    }
}

/// Whether the network namespace of `pid` has its loopback address (its
/// local routes list 127.0.0.1 once the address is there and the link up).
fn loopback_up(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/net/fib_trie")).is_ok_and(|t| t.contains("127.0.0.1"))
}

/// bubblewrap's `--info-fd` JSON, read until it parses: `{"child-pid": N}`.
fn read_child_pid(info: OwnedFd) -> std::io::Result<u32> {
    let mut file = std::fs::File::from(info);
    let mut data = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::other(
                "bubblewrap ended before it said its sandbox's pid",
            ));
        }
        data.extend_from_slice(&chunk[..n]);
        if let Ok(info) = serde_json::from_slice::<serde_json::Value>(&data) {
            return info["child-pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| std::io::Error::other("bubblewrap's info has no child-pid"));
        }
    }
}

/// slirp4netns for one sandbox: it stops when this is dropped (its exit
/// fd closes, and it is killed).
#[derive(Debug)]
pub struct SlirpGuard {
    _child: tokio::process::Child,
    _exit: OwnedFd,
}
