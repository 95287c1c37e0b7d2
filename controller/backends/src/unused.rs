//! What the caches kept on disk share: marking an entry as used now, and
//! removing the directories no one has used for a while. Dependency
//! installs ([`crate::deps`]) and package files ([`crate::packages`]) are
//! directories named by a hash, written again when needed; compiled wasm
//! modules ([`crate::wasm`]) are files, trimmed by size.
//!
//! # Layout
//!
//! - [`touch`]: an entry's modification time set to now, its "last used".
//! - [`remove_dirs`]: the directories older than a time that a caller
//!   agrees to lose, each moved aside and then deleted.

use std::path::Path;
use std::time::{Duration, SystemTime};

/// Sets `path`'s modification time to now: when a cached entry was last
/// made or used, which [`remove_dirs`] and the wasm cache's trim read.
pub fn touch(path: &Path) -> std::io::Result<()> {
    let now = std::fs::FileTimes::new().set_modified(SystemTime::now());
    std::fs::File::open(path)?.set_times(now)
}

/// Removes the directories under `root` (but those named with a leading
/// `.`: work in progress) last modified more than `keep` ago that `unused`
/// agrees to lose (asked just before; it may drop what it knows of one);
/// returns how many. Each is first moved to `aside`/`.gone-…` (on the same
/// filesystem), so that no reader ever sees half of one. Blocking.
pub fn remove_dirs(root: &Path, aside: &Path, keep: Duration, mut unused: impl FnMut(&str) -> bool) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|at| at.elapsed().ok());
        if age.is_none_or(|age| age < keep) || !unused(name) {
            continue;
        }
        let gone = aside.join(format!(".gone-{}", hex::encode(rand::random::<[u8; 8]>())));
        match std::fs::rename(entry.path(), &gone) {
            Ok(()) => {
                if let Err(e) = std::fs::remove_dir_all(&gone) {
                    tracing::warn!(path = %gone.display(), error = %e, "removing an unused directory");
                }
                removed += 1;
            }
            Err(e) => tracing::warn!(path = %entry.path().display(), error = %e, "moving an unused directory aside"),
        }
    }
    removed
}
