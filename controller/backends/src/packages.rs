//! Packages on disk: a multi-file function's files, written once per
//! version, and shown to each of that version's instances only.
//!
//! A version's files are written under `packages/{code hash}/` (root's,
//! mode 0700 at the top, so no instance uid can walk the store) the first
//! time an instance of it is specialised; each instance then gets them as
//! hard links in `function/` beside its socket, a root-owned directory
//! the instance can read but not change. Hard links cost one `link` per
//! file and no copy; the inodes are root's and read-only to instances, so
//! one instance cannot change what another runs. Where links cannot be
//! made (another filesystem), or instances run as the controller's own
//! user (who could write through a link), files are copied instead.
//!
//! # Layout
//! - [`PackageStore::pending`], [`PackageStore::write`]: the version's
//!   directory, written on first use (to a staging directory, then renamed
//!   into place).
//! - [`PackageStore::place`]: links (or copies) it into an instance.
//! - [`PackageStore::collect`]: removes the directories of versions no
//!   function runs now (a deleted function's, an older version's).

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fnrt_core::function::FunctionVersion;
use fnrt_core::function::package::{PackageFiles, PackageLimits, check_package};
use fnrt_core::language::Language;
use fnrt_core::runtime::InstanceError;

/// Where an instance finds its function's files: beside its socket.
pub const PACKAGE_DIR: &str = "function";
/// Where a Python instance finds its installed dependencies: beside its socket.
pub const DEPS_DIR: &str = "deps";

/// A version's files still to be written.
#[derive(Debug)]
pub struct Pending {
    dir: PathBuf,
    code: String,
    language: Language,
    entrypoint: String,
}

#[derive(Debug)]
pub struct PackageStore {
    root: PathBuf,
    /// Whether instances run as other uids (links are safe to share).
    link: bool,
}

impl PackageStore {
    /// A store under `root`, emptied: it is a cache of what the database holds.
    pub fn new(root: PathBuf, link: bool) -> std::io::Result<Self> {
        if root.exists() {
            std::fs::remove_dir_all(&root)?;
        }
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        Ok(PackageStore { root, link })
    }

    /// Removes the version directories that none of `used` (the code hashes
    /// of every function's current version) names and that were written or
    /// given to an instance longer than `keep` ago; returns how many.
    /// Should an instance of such a version start again, its files are
    /// written again from the database (the store is a cache of it).
    /// Blocking.
    pub fn collect(&self, used: &HashSet<String>, keep: Duration) -> usize {
        // `.staging-*` (a version being written) is passed over.
        crate::unused::remove_dirs(&self.root, &self.root, keep, |hash| !used.contains(hash))
    }

    /// The directory that holds (or will hold) `function`'s files.
    pub fn dir_of(&self, function: &FunctionVersion) -> PathBuf {
        self.root.join(&function.code_hash)
    }

    /// What must still be written for `function`; `None` when its files
    /// are there already (the code is only copied when they are not).
    pub fn pending(&self, function: &FunctionVersion) -> Option<Pending> {
        let dir = self.dir_of(function);
        (!dir.is_dir()).then(|| Pending {
            dir,
            code: function.code.clone(),
            language: function.language(),
            entrypoint: function.manifest.entrypoint.clone(),
        })
    }

    /// Writes a version's files (blocking): to a staging directory, then
    /// renamed into place, so an instance never sees half of them.
    pub fn write(&self, pending: Pending) -> Result<(), String> {
        // Stored versions were checked at registration; the limits only
        // matter there, so none are applied again here.
        let unlimited = PackageLimits {
            max_files: usize::MAX,
            max_bytes: u64::MAX,
        };
        let files = check_package(&pending.code, pending.language, &pending.entrypoint, unlimited)
            .map_err(|e| format!("the stored package is unreadable: {e}"))?;
        let staging = self
            .root
            .join(format!(".staging-{}", hex::encode(rand::random::<[u8; 8]>())));
        let result = write_files(&staging, &files).and_then(|()| std::fs::rename(&staging, &pending.dir));
        match result {
            Ok(()) => Ok(()),
            // Another instance of the same version wrote it first.
            Err(_) if pending.dir.is_dir() => {
                let _ = std::fs::remove_dir_all(&staging);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                Err(format!("writing the function's files: {e}"))
            }
        }
    }

    /// Shows `package` (a version's directory) in `instance_dir`'s
    /// `function/`, and its installed dependencies where its language looks
    /// for them: Python's in `deps/` beside it, Node's as
    /// `function/node_modules/`. The version's directory is marked as used
    /// now, so [`PackageStore::collect`] keeps it while instances of it
    /// keep starting. What an earlier attempt left in `instance_dir` is
    /// replaced.
    pub fn place(&self, package: &Path, deps: Option<(&Path, Language)>, instance_dir: &Path) -> std::io::Result<()> {
        crate::unused::touch(package)?;
        let target = instance_dir.join(PACKAGE_DIR);
        for earlier in [target.clone(), instance_dir.join(DEPS_DIR)] {
            if earlier.exists() {
                std::fs::remove_dir_all(&earlier)?;
            }
        }
        copy_tree(package, &target, self.link)?;
        match deps {
            Some((deps, Language::Nodejs)) => {
                // A node_modules/ of the package's own would be a file map
                // entry; installed dependencies replace it.
                let modules = target.join("node_modules");
                if modules.exists() {
                    std::fs::remove_dir_all(&modules)?;
                }
                copy_tree(deps, &modules, self.link)
            }
            Some((deps, _)) => copy_tree(deps, &instance_dir.join(DEPS_DIR), self.link),
            None => Ok(()),
        }
    }
}

/// Writes `files` under `dir`: directories 0755, files 0644, root's.
fn write_files(dir: &Path, files: &PackageFiles) -> std::io::Result<()> {
    make_dir(dir)?;
    for (path, content) in files {
        let bytes = content.bytes().map_err(std::io::Error::other)?;
        let file = dir.join(path);
        let mut parent = dir.to_path_buf();
        if let Some((dirs, _)) = path.rsplit_once('/') {
            for part in dirs.split('/') {
                parent.push(part);
                if !parent.is_dir() {
                    make_dir(&parent)?;
                }
            }
        }
        std::fs::write(&file, &bytes)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

fn make_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

/// Recreates `from` at `to`: directories made, files hard-linked when
/// `link` (copied when they cannot be, or not `link`).
fn copy_tree(from: &Path, to: &Path, link: bool) -> std::io::Result<()> {
    make_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            copy_tree(&src, &dst, link)?;
        } else if entry.file_type()?.is_symlink() {
            // Installed packages have a few (npm's .bin/); kept as links.
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if !link || std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Links `function`'s files (and its installed dependencies) into
/// `function/` of an instance directory, writing them first when this is
/// the version's first instance: what an instance's `place_package` does.
pub async fn place_for(
    packages: &Arc<PackageStore>,
    installer: Option<&Arc<crate::deps::Installer>>,
    function: &FunctionVersion,
    instance_dir: &Path,
) -> Result<(), InstanceError> {
    let written = packages.dir_of(function).is_dir();
    let mut placed = place_once(packages, installer, function, instance_dir).await?;
    if placed.is_err() && written && !packages.dir_of(function).is_dir() {
        // Collected (no function's current version) between the check and
        // the linking: written again, once. (A write that failed is not
        // tried again.)
        placed = place_once(packages, installer, function, instance_dir).await?;
    }
    placed.map_err(|message| {
        tracing::error!(function = %function.language_title, version = function.version, error = %message, "package not placed");
        InstanceError::Unavailable {
            language: function.language(),
            message,
        }
    })
}

/// One attempt of [`place_for`]: Err when the dependencies are not there,
/// Ok(Err) when the files could not be written or linked.
async fn place_once(
    packages: &Arc<PackageStore>,
    installer: Option<&Arc<crate::deps::Installer>>,
    function: &FunctionVersion,
    instance_dir: &Path,
) -> Result<Result<(), String>, InstanceError> {
    let packages = packages.clone();
    let dir = instance_dir.to_path_buf();
    // The files are written once per version: the code is only copied for
    // the blocking task when they are not there yet.
    let package = packages.dir_of(function);
    let pending = packages.pending(function);
    let deps = crate::dependencies_dir(installer, function)?;
    let language = function.language();
    let placed = tokio::task::spawn_blocking(move || {
        if let Some(pending) = pending {
            packages.write(pending)?;
        }
        packages
            .place(&package, deps.as_deref().map(|d| (d, language)), &dir)
            .map_err(|e| format!("giving the instance its files: {e}"))
    })
    .await
    .unwrap_or_else(|e| Err(format!("placing the files failed: {e}")));
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use fnrt_core::function::FileContent;

    #[test]
    fn writes_once_and_links_into_instances() {
        let tmp = tempfile::tempdir().unwrap();
        let files: PackageFiles = [
            ("app/__init__.py".to_owned(), FileContent::Text(String::new())),
            ("app/main.py".to_owned(), FileContent::Text("x = 1".into())),
            (
                "data/blob.bin".to_owned(),
                FileContent::from_bytes(vec![0, 159, 146, 150]),
            ),
        ]
        .into();
        let dir = tmp.path().join("pkg");
        write_files(&dir, &files).unwrap();
        assert_eq!(std::fs::read(dir.join("data/blob.bin")).unwrap(), [0, 159, 146, 150]);
        let instance = tmp.path().join("instance");
        std::fs::create_dir(&instance).unwrap();
        let store = PackageStore {
            root: tmp.path().to_path_buf(),
            link: true,
        };
        store.place(&dir, None, &instance).unwrap();
        let placed = instance.join(PACKAGE_DIR).join("app/main.py");
        assert_eq!(std::fs::read_to_string(&placed).unwrap(), "x = 1");
        // The same inode: nothing was copied.
        assert_eq!(
            placed.metadata().unwrap().ino(),
            dir.join("app/main.py").metadata().unwrap().ino()
        );
        assert_eq!(placed.metadata().unwrap().mode() & 0o777, 0o644);
    }

    #[test]
    fn a_version_given_to_an_instance_is_kept_and_one_left_alone_is_collected() {
        // Arrange: two versions' files, both written two hours ago, and an
        // instance directory an earlier attempt left half filled.
        let tmp = tempfile::tempdir().unwrap();
        let store = PackageStore::new(tmp.path().join("packages"), true).unwrap();
        let files: PackageFiles = [("main.py".to_owned(), FileContent::Text("x = 1".into()))].into();
        let long_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
        for version in ["started", "idle"] {
            let dir = tmp.path().join("packages").join(version);
            write_files(&dir, &files).unwrap();
            let times = std::fs::FileTimes::new().set_modified(long_ago);
            std::fs::File::open(&dir).unwrap().set_times(times).unwrap();
        }
        let instance = tmp.path().join("instance");
        std::fs::create_dir_all(instance.join(PACKAGE_DIR).join("partial")).unwrap();

        // Act: an instance of one of them starts; then the collection runs,
        // neither being a current version.
        store
            .place(&tmp.path().join("packages/started"), None, &instance)
            .unwrap();
        let removed = store.collect(&HashSet::new(), Duration::from_secs(3600));

        // Assert: the started one's files stay, the other's go; the
        // instance has the files and nothing of the earlier attempt.
        assert_eq!(removed, 1);
        assert!(tmp.path().join("packages/started").is_dir());
        assert!(!tmp.path().join("packages/idle").exists());
        assert!(instance.join(PACKAGE_DIR).join("main.py").is_file());
        assert!(!instance.join(PACKAGE_DIR).join("partial").exists());
    }
}
