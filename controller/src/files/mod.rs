//! Files (`/api/v1/files`): bytes a client uploads once and functions and
//! pipelines then pass by reference (`file_id`), so large inputs never go
//! through JSON.
//!
//! A file is a record in the database ([`crate::store::FileRecords`]:
//! owner, name, size, content type, sha256, times) and a blob in a
//! [`FileStore`], kept once per sha256: two uploads of the same bytes are
//! two records over one blob, and the blob goes with the last record that
//! names it (deleted by its owner, or expired after `FILE_RETENTION_HOURS`
//! and swept). An upload is streamed to the store while it is hashed, so a
//! large one never sits whole in memory; its content type is sniffed from
//! its first bytes.
//!
//! # Layout
//!
//! - `mod.rs`: the [`FileStore`] trait (stage while hashing, keep, open,
//!   remove), [`Files`] (upload, read, delete, the expiry sweep, over a
//!   store and the records), [`sniff`].
//! - [`local`]: [`local::LocalFileStore`], blobs in `DATA_DIR/files/`
//!   (the default).
//! - [`s3`]: [`s3::S3FileStore`], blobs in S3-compatible object storage
//!   (`FILE_STORE=s3://…`), for several controllers on one database.
//! - [`keys`]: per-run keys and the socket through which functions read
//!   and write their caller's files.

pub mod keys;
pub mod local;
pub mod s3;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Bytes;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};

use crate::store::{FileRecords, StoreError, StoredFile};
use fnrt_core::timefmt;

/// Bytes sniffed for the content type (what [`infer`] needs for every
/// common format).
pub const HEAD_BYTES: usize = 8192;
/// Expired files deleted per query of the sweep.
const SWEEP_BATCH: i64 = 256;

/// An upload's bytes as they arrive.
pub type ByteStream<'a> = BoxStream<'a, Result<Bytes, FileError>>;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("the file is larger than the limit of {limit} bytes (MAX_FILE_MB)")]
    TooLarge { limit: u64 },
    /// The owner's files would take more than its quota.
    #[error(
        "your files would take more than your quota of {quota} bytes (FILES_QUOTA_MB; {used} in use): \
         delete some, or wait for them to expire"
    )]
    OverQuota { used: u64, quota: u64 },
    /// The upload's body could not be read: the client's or its connection's fault.
    #[error("{0}")]
    Body(String),
    #[error("no such file")]
    NotFound,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An upload written to the store but not kept yet: dropping it discards
/// the bytes (a failed or abandoned upload leaves nothing behind).
pub struct Staged {
    pub sha256: String,
    pub size: u64,
    /// The first [`HEAD_BYTES`] bytes (all of a smaller file).
    pub head: Vec<u8>,
    /// The backend's hold on the bytes, handed back to it by
    /// [`FileStore::keep`]; releasing it discards them.
    handle: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("sha256", &self.sha256)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Staged {
    pub fn new(hashed: Hashed, handle: impl Any + Send + Sync) -> Self {
        Staged {
            sha256: hashed.sha256,
            size: hashed.size,
            head: hashed.head,
            handle: Box::new(handle),
        }
    }

    /// The backend's handle, if it is a `T` (the backend that staged it).
    pub fn into_handle<T: Any>(self) -> Option<T> {
        self.handle.downcast::<T>().ok().map(|h| *h)
    }
}

/// A blob's bytes, streamed.
pub struct Blob {
    pub size: u64,
    pub body: BoxStream<'static, std::io::Result<Bytes>>,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob").field("size", &self.size).finish_non_exhaustive()
    }
}

/// Where the bytes of files are kept, by their sha256 (lowercase hex).
/// Which records name a blob is not its business: [`Files`] decides when
/// one goes.
#[async_trait]
pub trait FileStore: Send + Sync {
    /// Writes `body` where no reader sees it, hashing it as it goes; more
    /// than `max_bytes` is [`FileError::TooLarge`] and leaves nothing.
    async fn stage(&self, body: ByteStream<'_>, max_bytes: u64) -> Result<Staged, FileError>;
    /// Keeps staged bytes as the blob of their sha256; when that blob
    /// exists already (the same bytes), it stays and the staged copy goes.
    async fn keep(&self, staged: Staged) -> Result<(), FileError>;
    /// The blob `sha256`; `None` if there is none.
    async fn open(&self, sha256: &str) -> Result<Option<Blob>, FileError>;
    /// Removes the blob `sha256`; false if there was none.
    async fn remove(&self, sha256: &str) -> Result<bool, FileError>;

    /// Whether other controllers use this store too. A shared store's
    /// blob is not removed when its last file goes (another controller
    /// may be giving it a new one that very moment) but by the sweep,
    /// once it is old ([`Self::written_before`]) and still unnamed.
    fn shared(&self) -> bool {
        false
    }
    /// The blobs last written before `cutoff_ms` (only a shared store is
    /// asked).
    async fn written_before(&self, _cutoff_ms: i64) -> Result<Vec<String>, FileError> {
        Ok(Vec::new())
    }
    /// Removes the blob `sha256` if it was last written before
    /// `cutoff_ms`, as [`Self::remove`] (only a shared store is asked).
    async fn remove_if_written_before(&self, sha256: &str, _cutoff_ms: i64) -> Result<bool, FileError> {
        self.remove(sha256).await
    }
}

/// What hashing an upload found.
#[derive(Debug, Clone)]
pub struct Hashed {
    pub sha256: String,
    pub size: u64,
    pub head: Vec<u8>,
}

/// Hashes, counts and keeps the first bytes of an upload as a backend
/// writes it, refusing it once it passes the limit.
#[derive(Debug)]
pub struct Hasher {
    sha256: Sha256,
    size: u64,
    head: Vec<u8>,
    limit: u64,
}

impl Hasher {
    pub fn new(limit: u64) -> Self {
        Hasher {
            sha256: Sha256::new(),
            size: 0,
            head: Vec::new(),
            limit,
        }
    }

    /// Takes the next chunk; [`FileError::TooLarge`] past the limit.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), FileError> {
        self.size += chunk.len() as u64;
        if self.size > self.limit {
            return Err(FileError::TooLarge { limit: self.limit });
        }
        self.sha256.update(chunk);
        let room = HEAD_BYTES.saturating_sub(self.head.len());
        self.head.extend_from_slice(&chunk[..room.min(chunk.len())]);
        Ok(())
    }

    pub fn finish(self) -> Hashed {
        Hashed {
            sha256: hex::encode(self.sha256.finalize()),
            size: self.size,
            head: self.head,
        }
    }
}

/// Whether `s` can name a blob: 64 lowercase hex digits (so it is also a
/// safe file or object name).
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The content type of a file from its first bytes (`head`; `whole`: they
/// are the whole file): a known binary format by its magic number (PNG,
/// JPEG, GIF, WebP, PDF, archives, ...), else JSON (text starting with `{`
/// or `[`), else UTF-8 text, else `application/octet-stream`.
pub fn sniff(head: &[u8], whole: bool) -> &'static str {
    const BINARY: &str = "application/octet-stream";
    if let Some(kind) = infer::get(head) {
        return kind.mime_type();
    }
    let text = match std::str::from_utf8(head) {
        Ok(text) => text,
        // A character cut in two where the head ends.
        Err(e) if !whole && e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or(""),
        Err(_) => return BINARY,
    };
    if text.is_empty() || text.contains('\0') {
        return BINARY;
    }
    match text.trim_start().as_bytes().first() {
        Some(b'{' | b'[') => "application/json",
        _ => "text/plain; charset=utf-8",
    }
}

/// A file name as kept: its last path component, without control
/// characters, at most 255 bytes; `file` when nothing is left.
pub fn clean_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut clean = String::new();
    for c in base.chars().filter(|c| !c.is_control()) {
        if clean.len() + c.len_utf8() > 255 {
            break;
        }
        clean.push(c);
    }
    let clean = clean.trim();
    if clean.is_empty() || clean == "." || clean == ".." {
        "file".to_owned()
    } else {
        clean.to_owned()
    }
}

/// Runs `work` to its end even if the caller stops waiting (a client that
/// goes away drops its request's future): a blob and the records naming
/// it change together or not at all.
async fn to_the_end<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, FileError>> + Send + 'static,
) -> Result<T, FileError> {
    tokio::spawn(work)
        .await
        .map_err(|e| FileError::Io(std::io::Error::other(e)))?
}

/// [`FileError::OverQuota`], with `used` as the records sum it.
fn over_quota(used: i64, quota: u64) -> FileError {
    FileError::OverQuota {
        used: u64::try_from(used).unwrap_or(0),
        quota,
    }
}

/// Uploaded files: their records and their bytes.
pub struct Files {
    store: Arc<dyn FileStore>,
    records: Arc<dyn FileRecords>,
    /// `MAX_FILE_MB`, in bytes.
    pub max_bytes: u64,
    /// `FILE_RETENTION_HOURS`.
    pub retention: Duration,
    /// `FILES_QUOTA_MB`, in bytes: the most one owner's live files take.
    pub quota: Option<u64>,
    /// Held while a blob may gain its first record or lose its last, so
    /// that an upload reusing a blob never meets its removal halfway (one
    /// controller owns its directory; both steps are short).
    blobs: tokio::sync::Mutex<()>,
    /// When a shared store's bucket was last listed for unnamed blobs
    /// (ms): a listing costs a request per thousand blobs, so it is done
    /// every half [`s3::GRACE`], not at every sweep.
    listed_ms: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files")
            .field("max_bytes", &self.max_bytes)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl Files {
    pub fn new(store: Arc<dyn FileStore>, records: Arc<dyn FileRecords>, max_bytes: u64, retention: Duration) -> Self {
        Files {
            store,
            records,
            max_bytes,
            retention,
            quota: None,
            blobs: tokio::sync::Mutex::new(()),
            listed_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
        }
    }

    /// At most `quota` bytes of live files per owner.
    pub fn with_quota(mut self, quota: Option<u64>) -> Self {
        self.quota = quota;
        self
    }

    /// Stores `body` as a new file of `owner`'s named `name`.
    pub async fn upload(
        self: &Arc<Self>,
        owner: &str,
        name: &str,
        body: ByteStream<'_>,
    ) -> Result<StoredFile, FileError> {
        // What the quota leaves: an upload stops there, not after the
        // whole file has been written.
        let mut short = None;
        if let Some(quota) = self.quota {
            let used = self.records.file_bytes(owner, timefmt::now_ms()).await?;
            let left = quota.saturating_sub(u64::try_from(used).unwrap_or(0));
            if left == 0 {
                return Err(over_quota(used, quota));
            }
            if left < self.max_bytes {
                short = Some((left, over_quota(used, quota)));
            }
        }
        let limit = short.as_ref().map_or(self.max_bytes, |(left, _)| *left);
        let staged = match (self.store.stage(body, limit).await, short) {
            (Err(FileError::TooLarge { .. }), Some((_, over))) => return Err(over),
            (staged, _) => staged?,
        };
        self.keep(owner, name, staged).await
    }

    /// Keeps an upload's staged bytes and writes its record (within the
    /// quota, checked again as the record is written).
    async fn keep(self: &Arc<Self>, owner: &str, name: &str, staged: Staged) -> Result<StoredFile, FileError> {
        let created_ms = timefmt::now_ms();
        let file = StoredFile {
            id: uuid::Uuid::new_v4().to_string(),
            owner: owner.to_owned(),
            name: clean_name(name),
            size: i64::try_from(staged.size).unwrap_or(i64::MAX),
            content_type: sniff(&staged.head, staged.size <= HEAD_BYTES as u64).to_owned(),
            sha256: staged.sha256.clone(),
            created_ms,
            expires_ms: created_ms.saturating_add(i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX)),
        };
        let this = self.clone();
        to_the_end(async move {
            let _held = this.blobs.lock().await;
            this.store.keep(staged).await?;
            let quota = this.quota.map(|q| i64::try_from(q).unwrap_or(i64::MAX));
            let refused = match this.records.insert_file(&file, quota).await {
                Ok(true) => return Ok(file),
                // Another upload of the owner's took what was left.
                Ok(false) => match this.records.file_bytes(&file.owner, file.created_ms).await {
                    Ok(used) => over_quota(used, this.quota.unwrap_or_default()),
                    Err(e) => e.into(),
                },
                Err(e) => e.into(),
            };
            // Best effort: the blob goes if no other record names it.
            if let Err(e) = this.release_held(&file.sha256).await {
                tracing::warn!(error = %e, sha256 = %file.sha256, "removing the blob of a failed upload");
            }
            Err(refused)
        })
        .await
    }

    /// `owner`'s file `id`, while it has not expired.
    pub async fn get(&self, owner: &str, id: &str) -> Result<StoredFile, FileError> {
        let now = timefmt::now_ms();
        self.records
            .file(id)
            .await?
            .filter(|f| f.owner == owner && f.expires_ms > now)
            .ok_or(FileError::NotFound)
    }

    /// `owner`'s file `id` and its bytes.
    pub async fn open(&self, owner: &str, id: &str) -> Result<(StoredFile, Blob), FileError> {
        let file = self.get(owner, id).await?;
        match self.store.open(&file.sha256).await? {
            Some(blob) => Ok((file, blob)),
            None => {
                tracing::warn!(file_id = %file.id, sha256 = %file.sha256, "a file's blob is missing");
                Err(FileError::NotFound)
            }
        }
    }

    /// Deletes `owner`'s file `id` (an expired one not swept yet is
    /// deleted too, and answered as not found).
    pub async fn delete(self: &Arc<Self>, owner: &str, id: &str) -> Result<(), FileError> {
        let (this, owner, id) = (self.clone(), owner.to_owned(), id.to_owned());
        to_the_end(async move {
            let file = this
                .records
                .delete_file(&id, &owner)
                .await?
                .ok_or(FileError::NotFound)?;
            this.release(&file.sha256).await?;
            if file.expires_ms <= timefmt::now_ms() {
                return Err(FileError::NotFound);
            }
            Ok(())
        })
        .await
    }

    /// Removes the blob `sha256` if no record names it any more.
    async fn release(&self, sha256: &str) -> Result<(), FileError> {
        let _held = self.blobs.lock().await;
        self.release_held(sha256).await
    }

    /// [`Self::release`] with the lock held. A shared store's blobs are
    /// left to the sweep ([`FileStore::shared`]).
    async fn release_held(&self, sha256: &str) -> Result<(), FileError> {
        if !self.store.shared() && self.records.blob_refs(sha256).await? == 0 {
            self.store.remove(sha256).await?;
        }
        Ok(())
    }

    /// Deletes the files expired at `now_ms` and the blobs no file names
    /// any more; how many files.
    pub async fn sweep_at(&self, now_ms: i64) -> Result<usize, FileError> {
        let mut deleted = 0;
        loop {
            let batch = self.records.purge_files(now_ms, SWEEP_BATCH).await?;
            deleted += batch.len();
            let mut blobs: Vec<&str> = batch.iter().map(|f| f.sha256.as_str()).collect();
            blobs.sort_unstable();
            blobs.dedup();
            for sha256 in blobs {
                self.release(sha256).await?;
            }
            if (batch.len() as i64) < SWEEP_BATCH {
                break;
            }
        }
        let half_grace = i64::try_from(s3::GRACE.as_millis() / 2).unwrap_or(i64::MAX);
        let listed = self.listed_ms.load(std::sync::atomic::Ordering::Relaxed);
        if self.store.shared() && now_ms.saturating_sub(listed) >= half_grace {
            self.listed_ms.store(now_ms, std::sync::atomic::Ordering::Relaxed);
            self.sweep_unnamed(now_ms).await?;
        }
        Ok(deleted)
    }

    /// Removes a shared store's blobs that no file names and that were
    /// last written more than [`s3::GRACE`] before `now_ms`; how many.
    async fn sweep_unnamed(&self, now_ms: i64) -> Result<usize, FileError> {
        let cutoff = now_ms.saturating_sub(i64::try_from(s3::GRACE.as_millis()).unwrap_or(i64::MAX));
        let mut removed = 0;
        for sha256 in self.store.written_before(cutoff).await? {
            if self.records.blob_refs(&sha256).await? == 0
                && self.store.remove_if_written_before(&sha256, cutoff).await?
            {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(blobs = removed, "unnamed blobs removed from the shared file store");
        }
        Ok(removed)
    }

    /// The periodic sweep: expired files deleted, and logged.
    pub async fn sweep(&self) {
        match self.sweep_at(timefmt::now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(files = n, "expired files deleted"),
            Err(e) => tracing::warn!(error = %e, "deleting expired files"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn sniffs_formats_by_their_first_bytes() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert_eq!(sniff(png, true), "image/png");
        assert_eq!(sniff(b"\xff\xd8\xff\xe0\0\x10JFIF", true), "image/jpeg");
        assert_eq!(sniff(b"GIF89a\x01\0\x01\0", true), "image/gif");
        assert_eq!(sniff(b"RIFF\x24\0\0\0WEBPVP8 ", true), "image/webp");
        assert_eq!(sniff(b"%PDF-1.7\n", true), "application/pdf");
        assert_eq!(sniff(b"  \n{\"a\": 1}", true), "application/json");
        assert_eq!(sniff(b"[1, 2]", true), "application/json");
        assert_eq!(sniff("héllo\n".as_bytes(), true), "text/plain; charset=utf-8");
        assert_eq!(sniff(b"\xff\xfe\0\x01", true), "application/octet-stream");
        assert_eq!(sniff(b"text\0with nul", true), "application/octet-stream");
        assert_eq!(sniff(b"", true), "application/octet-stream");
        // "é" cut in two by the end of the head: text, unless that is the whole file.
        let cut = &"abcé".as_bytes()[..4];
        assert_eq!(sniff(cut, false), "text/plain; charset=utf-8");
        assert_eq!(sniff(cut, true), "application/octet-stream");
    }

    #[test]
    fn names_keep_their_last_component_without_control_characters() {
        assert_eq!(clean_name("photo.png"), "photo.png");
        assert_eq!(clean_name("../../etc/passwd"), "passwd");
        assert_eq!(clean_name("C:\\Users\\me\\cat.jpg"), "cat.jpg");
        assert_eq!(clean_name("a\r\nb\u{7f}.txt"), "ab.txt");
        assert_eq!(clean_name(""), "file");
        assert_eq!(clean_name("dir/"), "file");
        assert_eq!(clean_name(".."), "file");
        assert_eq!(
            clean_name(&"é".repeat(200)).len(),
            254,
            "at most 255 bytes, whole characters"
        );
    }

    #[test]
    fn the_hasher_counts_hashes_and_stops_past_the_limit() {
        let mut h = Hasher::new(10);
        h.update(b"hello").unwrap();
        h.update(b" you").unwrap();
        let done = h.finish();
        assert_eq!(done.size, 9);
        assert_eq!(done.head, b"hello you");
        assert_eq!(
            done.sha256,
            hex::encode(Sha256::digest(b"hello you")),
            "the sha256 of every byte"
        );
        let mut h = Hasher::new(4);
        assert!(matches!(h.update(b"hello"), Err(FileError::TooLarge { limit: 4 })));
        assert!(is_sha256(&done.sha256));
        assert!(!is_sha256("../etc") && !is_sha256(&done.sha256.to_uppercase()));
    }

    fn body(chunks: Vec<&'static [u8]>) -> ByteStream<'static> {
        futures::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from_static(c)))).boxed()
    }

    async fn files(retention: Duration) -> (Arc<Files>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let records = crate::store::sqlite::SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
        let store = local::LocalFileStore::open(&dir.path().join("files")).unwrap();
        (
            Arc::new(Files::new(Arc::new(store), Arc::new(records), 1024, retention)),
            dir,
        )
    }

    /// Blobs in the store's directory, counted on disk.
    fn blobs(dir: &tempfile::TempDir) -> usize {
        std::fs::read_dir(dir.path().join("files/blobs"))
            .unwrap()
            .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum()
    }

    async fn read(blob: Blob) -> Vec<u8> {
        blob.body.map(|c| c.unwrap().to_vec()).concat().await
    }

    #[tokio::test]
    async fn uploads_share_a_blob_which_goes_with_the_last_file() {
        let (files, dir) = files(Duration::from_secs(3600)).await;
        let one = files
            .upload("alice", "a.txt", body(vec![b"same ", b"bytes"]))
            .await
            .unwrap();
        let two = files.upload("alice", "b.txt", body(vec![b"same bytes"])).await.unwrap();
        assert_ne!(one.id, two.id);
        assert_eq!((one.sha256.as_str(), one.size), (two.sha256.as_str(), 10));
        assert_eq!(one.content_type, "text/plain; charset=utf-8");
        assert_eq!(one.expires_ms - one.created_ms, 3_600_000);
        assert_eq!(blobs(&dir), 1);

        let (file, blob) = files.open("alice", &one.id).await.unwrap();
        assert_eq!(file, one);
        assert_eq!(read(blob).await, b"same bytes");
        assert!(matches!(files.open("bob", &one.id).await, Err(FileError::NotFound)));
        assert!(matches!(files.delete("bob", &one.id).await, Err(FileError::NotFound)));

        files.delete("alice", &one.id).await.unwrap();
        assert!(matches!(files.get("alice", &one.id).await, Err(FileError::NotFound)));
        assert_eq!(blobs(&dir), 1, "the other file still names it");
        files.delete("alice", &two.id).await.unwrap();
        assert_eq!(blobs(&dir), 0);

        // Too large: refused, and nothing is left of it.
        let big = files
            .upload("alice", "big", body(vec![&[0u8; 1000], &[0u8; 100]]))
            .await;
        assert!(matches!(big, Err(FileError::TooLarge { limit: 1024 })));
        let failed = files
            .upload(
                "alice",
                "cut",
                futures::stream::iter([Ok(Bytes::from_static(b"part")), Err(FileError::Body("reset".into()))]).boxed(),
            )
            .await;
        assert!(matches!(failed, Err(FileError::Body(_))));
        assert_eq!(blobs(&dir), 0);
        assert_eq!(std::fs::read_dir(dir.path().join("files/staging")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn the_sweep_deletes_expired_files_and_their_blobs() {
        let (files, dir) = files(Duration::ZERO).await;
        let gone = files.upload("alice", "x.json", body(vec![b"{\"a\":1}"])).await.unwrap();
        assert_eq!(gone.content_type, "application/json");
        assert!(
            matches!(files.open("alice", &gone.id).await, Err(FileError::NotFound)),
            "expired: not found before the sweep"
        );
        assert_eq!(blobs(&dir), 1);
        assert_eq!(files.sweep_at(timefmt::now_ms()).await.unwrap(), 1);
        assert_eq!(blobs(&dir), 0);
        assert_eq!(files.sweep_at(timefmt::now_ms()).await.unwrap(), 0);
    }
}
