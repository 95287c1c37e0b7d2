//! The default [`FileStore`]: a directory of the controller's own,
//! `DATA_DIR/files/`, private to it (directories 0700, files 0600).
//!
//! # Layout
//!
//! - `blobs/ab/ab12…`: each blob, named by its sha256, in a subdirectory
//!   of its first two hex digits (at most 256 entries per directory level
//!   however many blobs there are).
//! - `staging/`: uploads being written (temp files, removed when an upload
//!   fails or is abandoned, and emptied at start-up); a kept upload is
//!   renamed into `blobs/`, in the same file system, so a blob is never
//!   seen half-written.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{Blob, ByteStream, FileError, FileStore, Hasher, Staged, is_sha256};

/// Buffer between the upload's chunks and the disk, and the size of the
/// chunks a download is read in.
const IO_BUFFER: usize = 256 * 1024;

#[derive(Debug)]
pub struct LocalFileStore {
    blobs: PathBuf,
    staging: PathBuf,
}

/// Creates `dir` (and its parents) private, or makes it private.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

impl LocalFileStore {
    /// The store in `root` (created if needed), its staging area emptied:
    /// what is there was left by a controller that stopped mid-upload.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        let store = LocalFileStore {
            blobs: root.join("blobs"),
            staging: root.join("staging"),
        };
        for dir in [root, &store.blobs] {
            private_dir(dir)?;
        }
        open_staging(&store.staging)?;
        Ok(store)
    }

    fn blob_path(&self, sha256: &str) -> Result<PathBuf, FileError> {
        if !is_sha256(sha256) {
            return Err(FileError::Io(std::io::Error::other(format!(
                "not a sha256: {sha256:?}"
            ))));
        }
        Ok(self.blobs.join(&sha256[..2]).join(sha256))
    }
}

/// Writes `body` to a private temp file in `staging`, hashing it as it
/// goes; the [`Staged`] upload holds the file's [`tempfile::TempPath`],
/// which removes it when dropped. The S3 store stages here too: an upload
/// is whole and hashed before it is named by its hash anywhere.
pub async fn stage_in(staging: &Path, mut body: ByteStream<'_>, max_bytes: u64) -> Result<Staged, FileError> {
    // Created 0600; removed when `path` is dropped, unless kept.
    let temp = tempfile::Builder::new().prefix("upload-").tempfile_in(staging)?;
    let (file, path) = temp.into_parts();
    let mut out = tokio::io::BufWriter::with_capacity(IO_BUFFER, tokio::fs::File::from_std(file));
    let mut hasher = Hasher::new(max_bytes);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        hasher.update(&chunk)?;
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    // On disk before it is named by its hash: a crash must not leave a
    // blob whose bytes are not the ones its name promises.
    out.into_inner().sync_all().await?;
    Ok(Staged::new(hasher.finish(), path))
}

/// Creates `staging` private and empties it: what is there was left by a
/// controller that stopped mid-upload.
pub fn open_staging(staging: &Path) -> std::io::Result<()> {
    private_dir(staging)?;
    for entry in std::fs::read_dir(staging)? {
        let path = entry?.path();
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "removing an unfinished upload");
        }
    }
    Ok(())
}

#[async_trait]
impl FileStore for LocalFileStore {
    async fn stage(&self, body: ByteStream<'_>, max_bytes: u64) -> Result<Staged, FileError> {
        stage_in(&self.staging, body, max_bytes).await
    }

    async fn keep(&self, staged: Staged) -> Result<(), FileError> {
        let dest = self.blob_path(&staged.sha256)?;
        let temp: tempfile::TempPath = staged
            .into_handle()
            .ok_or_else(|| FileError::Io(std::io::Error::other("staged by another file store")))?;
        if tokio::fs::try_exists(&dest).await? {
            // The same bytes are there already; `temp` goes when dropped.
            return Ok(());
        }
        if let Some(parent) = dest.parent() {
            tokio::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .await?;
        }
        tokio::fs::rename(&temp, &dest).await?;
        // Renamed: nothing is left to remove.
        let _ = temp.keep();
        Ok(())
    }

    async fn open(&self, sha256: &str) -> Result<Option<Blob>, FileError> {
        let file = match tokio::fs::File::open(self.blob_path(sha256)?).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let size = file.metadata().await?.len();
        let body = tokio_util::io::ReaderStream::with_capacity(file, IO_BUFFER).boxed();
        Ok(Some(Blob { size, body }))
    }

    async fn remove(&self, sha256: &str) -> Result<bool, FileError> {
        match tokio::fs::remove_file(self.blob_path(sha256)?).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn blobs_are_private_named_by_their_hash_and_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("files");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let leftover = root.join("staging/upload-old");
        std::fs::create_dir(root.join("staging")).unwrap();
        std::fs::write(&leftover, b"half").unwrap();
        let store = LocalFileStore::open(&root).unwrap();
        assert!(!leftover.exists(), "an unfinished upload is removed at start-up");

        let body = || futures::stream::iter([Ok(Bytes::from_static(b"bytes"))]).boxed();
        let staged = store.stage(body(), 100).await.unwrap();
        let sha256 = staged.sha256.clone();
        store.keep(staged).await.unwrap();
        store.keep(store.stage(body(), 100).await.unwrap()).await.unwrap();
        let path = root.join("blobs").join(&sha256[..2]).join(&sha256);
        assert_eq!(std::fs::read(&path).unwrap(), b"bytes");
        for (p, mode) in [
            (&root, 0o700),
            (&root.join("blobs"), 0o700),
            (&path.parent().unwrap().to_path_buf(), 0o700),
            (&path, 0o600),
        ] {
            assert_eq!(std::fs::metadata(p).unwrap().mode() & 0o777, mode, "{}", p.display());
        }
        assert_eq!(std::fs::read_dir(root.join("staging")).unwrap().count(), 0);

        let blob = store.open(&sha256).await.unwrap().unwrap();
        assert_eq!(blob.size, 5);
        assert!(store.remove(&sha256).await.unwrap());
        assert!(!store.remove(&sha256).await.unwrap());
        assert!(store.open(&sha256).await.unwrap().is_none());
        assert!(store.open("../../etc/passwd").await.is_err(), "not a hash, not a path");
    }
}
