//! Per-run keys to the caller's files, and the socket functions reach
//! them through.
//!
//! Every run gets a fresh random key (the core asks [`RunKeys`] through
//! [`FileGrants`] and revokes the key when the run ends, however it ends).
//! The runtime hands it to the function's file helpers, which present it on
//! the controller's files socket (`DATA_DIR/run/files.sock`, hard-linked
//! into each instance's directory as `files.sock`) as a bearer token: the
//! socket serves `/api/v1/files` as the caller of that run, and nothing
//! else. No storage credential and no JWT ever enters an instance, and a
//! key kept past its run opens nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use fnrt_core::runtime::FileGrants;

/// The keys of the runs in flight: key -> the subject whose files it opens.
#[derive(Debug, Default)]
pub struct RunKeys {
    keys: Mutex<HashMap<String, String>>,
}

impl RunKeys {
    /// The subject a key stands for, while its run lasts.
    pub fn subject(&self, key: &str) -> Option<String> {
        self.keys.lock().unwrap().get(key).cloned()
    }
}

impl FileGrants for RunKeys {
    fn grant(&self, subject: &str) -> String {
        let key = hex::encode(rand::random::<[u8; 32]>());
        self.keys.lock().unwrap().insert(key.clone(), subject.to_owned());
        key
    }

    fn revoke(&self, key: &str) {
        self.keys.lock().unwrap().remove(key);
    }
}

/// Binds the files socket at `ROOT/run/files.sock` (`ROOT` holds the
/// instances' directories: the data dir, or its stand-in under `/run/fnrt`):
/// any uid may connect (instances run as uids of their own); the key is the check.
pub fn bind_socket(root: &Path) -> anyhow::Result<(tokio::net::UnixListener, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join("run");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let path = dir.join(fnrt_backends::FILES_SOCKET);
    // A previous controller's; instances linked to it died with it.
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", path.display()));
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    Ok((listener, path))
}
