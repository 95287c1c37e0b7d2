//! The walls around code of others, drawn with bubblewrap (Debian's
//! `bubblewrap`): registered crates' builds ([`BuildSandbox`]) and the
//! process backend's instances both run inside a [`Walls`].
//!
//! What every sandbox gets:
//! - its own PID, IPC and UTS namespaces, and a root of its own in which
//!   only the system (`/usr`, `/etc`, the libraries, read-only) and what
//!   the sandbox is given exist: the data dir, the database, the JWT
//!   secret, `/root` and other functions' files are not there, nor the
//!   controller's `/proc` entries (a `/proc` of its own);
//! - a network namespace of its own (only its own loopback) unless it is
//!   given the network;
//! - private scratch space: a tmpfs per writable path (`/tmp`, and for
//!   instances `/var/tmp`, `/dev/shm`, `/run`, the home), size-capped where
//!   a cap is given, gone when the sandbox ends;
//! - a uid of its own when the controller is root (through `setpriv`: no
//!   groups, no capabilities, `no_new_privs`);
//! - killed as a whole: bubblewrap dies with the controller
//!   (`PR_SET_PDEATHSIG`), its sandboxed init dies with bubblewrap
//!   (`--die-with-parent`), and every process inside dies with that init (a
//!   PID namespace ends with its init), however it forked or `setsid`ed.
//!
//! Builds, in addition, have the network only while dependencies are
//! fetched (`cargo fetch`, pip, npm); the build itself (`build.rs`, proc
//! macros, rustc; npm's install scripts) runs offline. That network is one
//! of its own through slirp4netns when it is installed ([`crate::netns`]):
//! the internet, but never the host's loopback. Each step (a fetch, a
//! build, an install) also runs in cgroups of its own that cap its memory
//! and its tasks, all its processes together ([`BuildSandbox::confine`]).
//! Without bubblewrap (`bwrap` not on `PATH`) builds run
//! as the controller's user with a scrubbed environment, and start-up says so
//! in a warning.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::cgroups::{Confinement, StepCaps};
use crate::netns::PrivateNetwork;

/// Marks every descriptor past the standard streams close-on-exec, so that
/// nothing the controller holds open reaches code of others (a child's
/// `pre_exec`), also one a library left without the flag: wasmtime re-opens
/// its `/proc/self/pagemap` in every forked child with `dup2`, which clears
/// it. Marked rather than closed: std's own pipe reports a failed exec, and
/// a later `pre_exec` step may hand a child its own ends again.
///
/// One system call, no allocation, no lock: async-signal-safe.
#[allow(unsafe_code)]
pub(crate) fn close_inherited_on_exec() -> std::io::Result<()> {
    // SAFETY: close_range only changes descriptor flags; the range past 2
    // holds no descriptor this process's Rust code owns across exec.
    if unsafe { libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `oom_score_adj` of sandboxed code: should the machine run out of
/// memory, the kernel kills functions and builds before the controller,
/// the database and Redis (each is capped by its own cgroup first; this is
/// for the machine as a whole). They cannot lower it: that takes
/// `CAP_SYS_RESOURCE`.
const OOM_SCORE_ADJ: &[u8] = b"500";

/// Makes the calling process (a child between fork and exec) the kernel's
/// first choice when the machine runs out of memory ([`OOM_SCORE_ADJ`]).
/// Async-signal-safe: open, write, close.
pub(crate) fn first_to_go_out_of_memory() -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        c"/proc/self/oom_score_adj",
        OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::io::write(&fd, OOM_SCORE_ADJ)?;
    Ok(())
}

/// The system every sandbox sees, read-only: programs, libraries, `/etc`
/// (the resolver and CA certificates for a fetch; `/etc/shadow` stays
/// unreadable to a sandbox's uid).
const SYSTEM: [&str; 7] = ["/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64"];

/// bubblewrap's path, if it is installed.
pub fn find_bwrap() -> Option<PathBuf> {
    crate::find_tool("bwrap")
}

/// One sandbox: what it sees of the host, what it may write, and who it runs as.
#[derive(Debug, Clone, Default)]
pub struct Walls {
    /// Whether it shares the host's network (else only its own loopback).
    pub network: bool,
    /// Or a network of its own through slirp4netns: bubblewrap's
    /// arguments for it ([`crate::netns::PrivateNetwork::bwrap_args`]:
    /// the namespace's, then the files').
    pub private_network: Option<(Vec<OsString>, Vec<OsString>)>,
    /// Host paths it sees read-only: (host path, path inside).
    pub read_only: Vec<(PathBuf, PathBuf)>,
    /// Host directories it may write: (host path, path inside).
    pub writable: Vec<(PathBuf, PathBuf)>,
    /// Private tmpfs mounts (mode 1777): path inside and size cap in bytes.
    pub scratch: Vec<(PathBuf, Option<u64>)>,
    /// The uid (and gid) it runs as; `None`: the controller's.
    pub uid: Option<u32>,
    /// Its working directory (inside).
    pub cwd: PathBuf,
}

impl Walls {
    /// bubblewrap's arguments that run `program args` inside these walls.
    pub fn args(&self, program: &Path, args: &[OsString]) -> Vec<OsString> {
        let mut a: Vec<OsString> = [
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
        ]
        .map(OsString::from)
        .into();
        match &self.private_network {
            Some((namespace, _)) => a.extend(namespace.iter().cloned()),
            None if !self.network => a.push("--unshare-net".into()),
            None => {}
        }
        for dir in SYSTEM {
            let path = Path::new(dir);
            match std::fs::symlink_metadata(path) {
                // Merged /usr: /bin -> usr/bin and the like.
                Ok(meta) if meta.is_symlink() => {
                    if let Ok(target) = std::fs::read_link(path) {
                        a.extend(["--symlink".into(), target.into_os_string(), dir.into()]);
                    }
                }
                Ok(_) => a.extend(["--ro-bind", dir, dir].map(OsString::from)),
                Err(_) => {}
            }
        }
        a.extend(["--proc", "/proc", "--dev", "/dev"].map(OsString::from));
        // Over the system's /etc/resolv.conf and /etc/hosts, once it is bound.
        if let Some((_, files)) = &self.private_network {
            a.extend(files.iter().cloned());
        }
        // Directories that exist inside: a mount's missing parents are made
        // 0755 first, since bubblewrap would make them 0700, which the
        // sandbox's uid could not pass.
        let mut made: Vec<PathBuf> = ["/", "/dev", "/proc"].map(PathBuf::from).into();
        for (path, size) in &self.scratch {
            make_parents(path, &mut made, &mut a);
            made.push(path.clone());
            if let Some(size) = size {
                a.extend(["--size".into(), size.to_string().into()]);
            }
            a.extend([
                "--perms".into(),
                "1777".into(),
                "--tmpfs".into(),
                path.clone().into_os_string(),
            ]);
        }
        let binds = self
            .read_only
            .iter()
            // The system is there already.
            .filter(|(host, inside)| !(host == inside && is_system(host)))
            .map(|(host, inside)| (host, inside, "--ro-bind"))
            .chain(self.writable.iter().map(|(host, inside)| (host, inside, "--bind")));
        for (host, inside, flag) in binds {
            make_parents(inside, &mut made, &mut a);
            a.extend([
                flag.into(),
                host.clone().into_os_string(),
                inside.clone().into_os_string(),
            ]);
        }
        a.extend(["--chdir".into(), self.cwd.clone().into_os_string(), "--".into()]);
        if let Some(uid) = self.uid {
            let id = uid.to_string();
            a.extend(
                [
                    "/usr/bin/setpriv",
                    &format!("--reuid={id}"),
                    &format!("--regid={id}"),
                    "--clear-groups",
                    "--inh-caps=-all",
                    "--no-new-privs",
                    "--",
                ]
                .map(OsString::from),
            );
        }
        a.push(program.as_os_str().to_os_string());
        a.extend(args.iter().cloned());
        a
    }
}

fn is_system(path: &Path) -> bool {
    SYSTEM.iter().any(|s| path.starts_with(s))
}

/// Adds `--dir` (0755) for each parent of `path` not yet `made`.
fn make_parents(path: &Path, made: &mut Vec<PathBuf>, args: &mut Vec<OsString>) {
    let mut missing: Vec<PathBuf> = path
        .ancestors()
        .skip(1)
        .take_while(|p| !made.iter().any(|m| m == p) && !is_system(p))
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    for dir in missing {
        args.extend([
            "--perms".into(),
            "0755".into(),
            "--dir".into(),
            dir.clone().into_os_string(),
        ]);
        made.push(dir);
    }
}

/// How builds are walled in, decided once at start-up.
#[derive(Debug, Clone)]
pub struct BuildSandbox {
    bwrap: PathBuf,
    /// slirp4netns, for a network that never reaches the host's loopback;
    /// without it, downloads share the host's network.
    slirp: Option<PathBuf>,
    /// The uid (and gid) builds run as; `None` when the controller is not
    /// root (then builds run as its user, inside the same walls).
    uid: Option<u32>,
    /// Host paths a build sees, read-only, at the same place.
    read_only: Vec<PathBuf>,
    /// Host paths a build may write (its work directory).
    writable: Vec<PathBuf>,
    /// What each step may take: memory and tasks ([`Confinement`]).
    caps: StepCaps,
}

impl BuildSandbox {
    /// bubblewrap, if it is installed; `None` otherwise.
    pub fn detect(uid: Option<u32>, read_only: Vec<PathBuf>, writable: Vec<PathBuf>, caps: StepCaps) -> Option<Self> {
        Some(BuildSandbox {
            bwrap: find_bwrap()?,
            slirp: crate::netns::find_slirp(),
            uid,
            read_only,
            writable,
            caps,
        })
    }

    /// The cgroups one step runs in, capped at the sandbox's [`StepCaps`],
    /// joined by `cmd`'s child: kept until the step has ended, then asked
    /// whether a cap stopped it ([`Confinement::explain`]).
    pub fn confine(&self, cmd: &mut std::process::Command) -> std::io::Result<Confinement> {
        let confinement = Confinement::new(self.caps)?;
        confinement.apply(cmd)?;
        Ok(confinement)
    }

    /// The same walls, with `writable` the host paths the sandbox may
    /// write (in place of those given at [`BuildSandbox::detect`]).
    pub fn writing(&self, writable: Vec<PathBuf>) -> Self {
        BuildSandbox {
            writable,
            ..self.clone()
        }
    }

    /// The uid builds run as, if not the controller's.
    pub fn uid(&self) -> Option<u32> {
        self.uid
    }

    /// Whether downloads reach the internet through a network of their own
    /// (slirp4netns), rather than the host's with its loopback.
    pub fn private_network(&self) -> bool {
        self.slirp.is_some()
    }

    /// The program and arguments that run `program args` inside the walls,
    /// in `cwd`, with or without the network; with it, and slirp4netns
    /// installed, the network is a private one, whose pipes the caller
    /// hands to the child ([`PrivateNetwork::prepare`]) and starts once it
    /// is spawned ([`PrivateNetwork::start`]).
    pub fn wrap(
        &self,
        program: &Path,
        args: &[OsString],
        cwd: &Path,
        network: bool,
    ) -> std::io::Result<(PathBuf, Vec<OsString>, Option<PrivateNetwork>)> {
        let private = match (&self.slirp, network) {
            (Some(slirp), true) => Some(PrivateNetwork::new(slirp.clone(), crate::netns::Setup::open())?),
            _ => None,
        };
        let walls = Walls {
            network: network && private.is_none(),
            private_network: private.as_ref().map(PrivateNetwork::bwrap_args),
            read_only: self.read_only.iter().map(|p| (p.clone(), p.clone())).collect(),
            writable: self.writable.iter().map(|p| (p.clone(), p.clone())).collect(),
            scratch: vec![(PathBuf::from("/tmp"), None)],
            uid: self.uid,
            cwd: cwd.to_path_buf(),
        };
        Ok((self.bwrap.clone(), walls.args(program, args), private))
    }
}

/// Gives `path` and everything under it to `uid` (the build's work
/// directory, written by the controller or left by an earlier run).
pub fn chown_tree(path: &Path, uid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.uid() != uid || meta.gid() != uid {
        std::os::unix::fs::lchown(path, Some(uid), Some(uid))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid)?;
        }
    }
    Ok(())
}
