//! The walls around a build of registered code. A crate's `build.rs`, its
//! proc macros and those of its dependencies are code of whoever registered
//! it; cargo runs them, so cargo runs walled in:
//!
//! - inside bubblewrap (Debian's `bubblewrap`): its own PID, IPC and UTS
//!   namespaces and a root of its own in which only the system (`/usr`,
//!   `/etc`, the libraries), the toolchain, the SDK and the build's work
//!   directory exist (read-only, but for the work directory). The data dir,
//!   the database, the JWT secret, `/root` and other functions' artifacts
//!   are not there, nor the controller's `/proc` entries (a `/proc` of its
//!   own);
//! - as a uid of its own (`RUST_BUILD_UID`, when the controller is root),
//!   with no groups, no capabilities and `no_new_privs`;
//! - with the network only while dependencies are fetched (`cargo fetch`);
//!   the build itself (`build.rs`, proc macros, rustc) runs in a network
//!   namespace of its own, offline;
//! - killed as a whole: bubblewrap dies with the controller
//!   (`PR_SET_PDEATHSIG`), its sandboxed init dies with bubblewrap
//!   (`--die-with-parent`), and every process of the build dies with that
//!   init (a PID namespace ends with its init).
//!
//! Without bubblewrap (`bwrap` not on `PATH`) builds run as the controller's
//! user with a scrubbed environment, and start-up says so in a warning.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// How builds are walled in, decided once at start-up.
#[derive(Debug, Clone)]
pub struct BuildSandbox {
    bwrap: PathBuf,
    /// The uid (and gid) builds run as; `None` when the controller is not
    /// root (then builds run as its user, inside the same walls).
    uid: Option<u32>,
    /// Host paths a build sees, read-only, at the same place.
    read_only: Vec<PathBuf>,
    /// Host paths a build may write (its work directory).
    writable: Vec<PathBuf>,
}

/// The system a build needs, read-only: programs, libraries, `/etc` (the
/// resolver and CA certificates for the fetch; `/etc/shadow` stays
/// unreadable to the build's uid).
const SYSTEM: [&str; 7] = ["/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64"];

impl BuildSandbox {
    /// bubblewrap, if it is installed; `None` otherwise.
    pub fn detect(uid: Option<u32>, read_only: Vec<PathBuf>, writable: Vec<PathBuf>) -> Option<Self> {
        let bwrap = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join("bwrap")).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .chain([PathBuf::from("/usr/bin/bwrap")])
            .find(|p| p.is_file())?;
        Some(BuildSandbox {
            bwrap,
            uid,
            read_only,
            writable,
        })
    }

    /// The uid builds run as, if not the controller's.
    pub fn uid(&self) -> Option<u32> {
        self.uid
    }

    /// The program and arguments that run `program args` inside the walls,
    /// in `cwd`, with or without the network.
    pub fn wrap(&self, program: &Path, args: &[OsString], cwd: &Path, network: bool) -> (PathBuf, Vec<OsString>) {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&std::ffi::OsStr]| a.extend(items.iter().map(|s| s.to_os_string()));
        push(&[
            "--die-with-parent".as_ref(),
            "--new-session".as_ref(),
            "--unshare-pid".as_ref(),
            "--unshare-ipc".as_ref(),
            "--unshare-uts".as_ref(),
            "--unshare-cgroup-try".as_ref(),
        ]);
        if !network {
            push(&["--unshare-net".as_ref()]);
        }
        for dir in SYSTEM {
            let path = Path::new(dir);
            match std::fs::symlink_metadata(path) {
                // Merged /usr: /bin -> usr/bin and the like.
                Ok(meta) if meta.is_symlink() => {
                    if let Ok(target) = std::fs::read_link(path) {
                        push(&["--symlink".as_ref(), target.as_os_str(), path.as_os_str()]);
                    }
                }
                Ok(_) => push(&["--ro-bind".as_ref(), path.as_os_str(), path.as_os_str()]),
                Err(_) => {}
            }
        }
        push(&[
            "--proc".as_ref(),
            "/proc".as_ref(),
            "--dev".as_ref(),
            "/dev".as_ref(),
            "--tmpfs".as_ref(),
            "/tmp".as_ref(),
        ]);
        // bubblewrap would make the missing parents of a bind 0700, which
        // the build's uid could not pass: they are made 0755 first.
        let mut made: Vec<PathBuf> = Vec::new();
        for (path, flag) in self
            .read_only
            .iter()
            .map(|p| (p, "--ro-bind"))
            .chain(self.writable.iter().map(|p| (p, "--bind")))
        {
            let mut parents: Vec<&Path> = path.ancestors().skip(1).collect();
            parents.reverse();
            for parent in parents {
                let system = SYSTEM.iter().any(|s| parent.starts_with(s));
                if parent == Path::new("/") || parent == Path::new("/tmp") || system || made.iter().any(|m| m == parent)
                {
                    continue;
                }
                push(&[
                    "--perms".as_ref(),
                    "0755".as_ref(),
                    "--dir".as_ref(),
                    parent.as_os_str(),
                ]);
                made.push(parent.to_path_buf());
            }
            push(&[flag.as_ref(), path.as_os_str(), path.as_os_str()]);
        }
        push(&["--chdir".as_ref(), cwd.as_os_str(), "--".as_ref()]);
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
        (self.bwrap.clone(), a)
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
