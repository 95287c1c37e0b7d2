//! A [`FileStore`] in S3-compatible object storage (AWS S3, MinIO, Ceph,
//! R2, ...), through the `object_store` crate, for controllers that share
//! one database: a file uploaded to one replica is read by functions and
//! clients on any other. Chosen with `FILE_STORE=s3://BUCKET[/PREFIX]`; the
//! endpoint and credentials come from the standard `AWS_*` variables
//! (`AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ALLOW_HTTP`), which never reach an instance (their
//! environment is built from nothing).
//!
//! # Layout
//!
//! - `PREFIX/blobs/ab/ab12…`: each blob, named by its sha256.
//! - An upload is staged in the controller's own `DATA_DIR/files/staging/`
//!   (hashed as it is written, [`super::local::stage_in`]) and only then
//!   put under its hash (a multipart upload when large), so no object is
//!   ever named by a hash its bytes do not have.
//!
//! # Several controllers, one bucket
//!
//! A controller cannot lock a blob against the others, so a blob whose
//! last file goes is not removed at once: the sweep lists the blobs last
//! written more than [`GRACE`] ago and removes those no record names. An
//! upload of bytes already stored writes them again unless they were
//! written less than half of [`GRACE`] ago, so a blob that just gained a
//! file is never old enough for a sweep to take. What is left is the
//! moment between a sweep's last look at a blob and its delete (a few
//! milliseconds, once per [`GRACE`] and blob): an upload of the same bytes
//! landing exactly then is answered, and then not found.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig};
use tokio::io::AsyncWriteExt;

use super::{Blob, ByteStream, FileError, FileStore, Staged, is_sha256};

/// How old an unnamed blob must be before a sweep removes it.
pub const GRACE: Duration = Duration::from_secs(10 * 60);
/// Bytes per part of a multipart upload, and read ahead of a download.
const PART_BYTES: usize = 8 * 1024 * 1024;

pub struct S3FileStore {
    store: Arc<dyn ObjectStore>,
    /// `s3://bucket/prefix`, as configured (no credential is in it).
    url: String,
    staging: std::path::PathBuf,
}

impl std::fmt::Debug for S3FileStore {
    // Not the object store's own: its configuration holds the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3FileStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// `s3://bucket[/prefix]` as (bucket, prefix).
pub fn parse_url(url: &str) -> Result<(&str, &str), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("FILE_STORE {url:?}: expected `local` or `s3://BUCKET[/PREFIX]`"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !valid_bucket {
        return Err(format!(
            "FILE_STORE {url:?}: {bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, `.` or `-`)"
        ));
    }
    Ok((bucket, prefix.trim_matches('/')))
}

impl S3FileStore {
    /// The store at `url` (`s3://bucket[/prefix]`), configured from the
    /// `AWS_*` variables, staging uploads in `staging`; fails unless the
    /// bucket answers.
    pub async fn open(url: &str, staging: &std::path::Path) -> Result<Self, FileError> {
        Self::open_with(url, staging, &[]).await
    }

    /// [`Self::open`], with `settings` (`("aws_endpoint", "http://…")`, ...)
    /// over the `AWS_*` variables.
    pub async fn open_with(url: &str, staging: &std::path::Path, settings: &[(&str, &str)]) -> Result<Self, FileError> {
        let (bucket, prefix) = parse_url(url).map_err(|e| FileError::Io(std::io::Error::other(e)))?;
        let mut builder = AmazonS3Builder::from_env();
        for (key, value) in settings {
            let key: AmazonS3ConfigKey = key.parse().map_err(store_error)?;
            builder = builder.with_config(key, *value);
        }
        let s3 = builder
            .with_bucket_name(bucket)
            // A store that does not answer fails an upload or a download in
            // seconds, not after the crate's default of minutes of retries.
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
                ..RetryConfig::default()
            })
            .build()
            .map_err(store_error)?;
        let store: Arc<dyn ObjectStore> = match prefix {
            "" => Arc::new(s3),
            prefix => Arc::new(PrefixStore::new(s3, prefix)),
        };
        super::local::open_staging(staging)?;
        let this = S3FileStore {
            store,
            url: url.to_owned(),
            staging: staging.to_owned(),
        };
        // A listing, not a HEAD: S3 answers a HEAD in a missing bucket with
        // the same 404 as a missing object.
        match this.store.list_with_delimiter(Some(&Path::from("blobs"))).await {
            Ok(_) => Ok(this),
            Err(e) => Err(FileError::Io(std::io::Error::other(format!(
                "FILE_STORE {url}: the bucket does not answer: {e}"
            )))),
        }
    }

    fn path(&self, sha256: &str) -> Path {
        Path::from_iter(["blobs", &sha256[..2], sha256])
    }

    fn checked_path(&self, sha256: &str) -> Result<Path, FileError> {
        if !is_sha256(sha256) {
            return Err(FileError::Io(std::io::Error::other(format!(
                "not a sha256: {sha256:?}"
            ))));
        }
        Ok(self.path(sha256))
    }

    /// Deletes the object at `path`; false if it was not there.
    async fn delete(&self, path: &Path) -> Result<bool, FileError> {
        match self.store.delete(path).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_error(e)),
        }
    }

    /// When the blob `sha256` was last written, in ms since the epoch.
    async fn written_ms(&self, path: &Path) -> Result<Option<i64>, FileError> {
        match self.store.head(path).await {
            Ok(meta) => Ok(Some(meta.last_modified.timestamp_millis())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(e)),
        }
    }
}

fn store_error(e: object_store::Error) -> FileError {
    FileError::Io(std::io::Error::other(e))
}

#[async_trait]
impl FileStore for S3FileStore {
    fn shared(&self) -> bool {
        true
    }

    async fn stage(&self, body: ByteStream<'_>, max_bytes: u64) -> Result<Staged, FileError> {
        super::local::stage_in(&self.staging, body, max_bytes).await
    }

    async fn keep(&self, staged: Staged) -> Result<(), FileError> {
        let path = self.checked_path(&staged.sha256)?;
        let temp: tempfile::TempPath = staged
            .into_handle()
            .ok_or_else(|| FileError::Io(std::io::Error::other("staged by another file store")))?;
        let half_grace = i64::try_from(GRACE.as_millis() / 2).unwrap_or(i64::MAX);
        if let Some(written) = self.written_ms(&path).await?
            && fnrt_core::timefmt::now_ms().saturating_sub(written) < half_grace
        {
            return Ok(());
        }
        // Put in one request when small, in parts when large; an upload
        // that fails midway is aborted (no parts are left in the bucket).
        let mut file = tokio::fs::File::open(&temp).await?;
        let mut out = object_store::buffered::BufWriter::with_capacity(self.store.clone(), path, PART_BYTES);
        let copied = async {
            tokio::io::copy(&mut file, &mut out).await?;
            out.shutdown().await
        }
        .await;
        if let Err(e) = copied {
            if let Err(abort) = out.abort().await {
                tracing::warn!(error = %abort, "aborting a failed upload to the file store");
            }
            return Err(e.into());
        }
        Ok(())
    }

    async fn open(&self, sha256: &str) -> Result<Option<Blob>, FileError> {
        let got = match self.store.get(&self.checked_path(sha256)?).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_error(e)),
        };
        let size = got.meta.size;
        let body = got.into_stream().map_err(std::io::Error::other).boxed();
        Ok(Some(Blob { size, body }))
    }

    async fn remove(&self, sha256: &str) -> Result<bool, FileError> {
        let path = self.checked_path(sha256)?;
        // S3 answers a delete of nothing as a success: ask first.
        if self.written_ms(&path).await?.is_none() {
            return Ok(false);
        }
        self.delete(&path).await
    }

    async fn written_before(&self, cutoff_ms: i64) -> Result<Vec<String>, FileError> {
        let mut old = Vec::new();
        let mut listing = self.store.list(Some(&Path::from("blobs")));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(store_error)?;
            if let Some(name) = meta.location.filename()
                && is_sha256(name)
                && meta.last_modified.timestamp_millis() < cutoff_ms
            {
                old.push(name.to_owned());
            }
        }
        Ok(old)
    }

    async fn remove_if_written_before(&self, sha256: &str, cutoff_ms: i64) -> Result<bool, FileError> {
        let path = self.checked_path(sha256)?;
        match self.written_ms(&path).await? {
            // Looked at just now: no need to ask again.
            Some(written) if written < cutoff_ms => self.delete(&path).await,
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::Files;
    use axum::body::Bytes;

    /// An S3-compatible server for these tests (`TEST_S3_ENDPOINT`, moto's
    /// server in CI), or `None` (skipped) outside CI.
    fn endpoint() -> Option<String> {
        match std::env::var("TEST_S3_ENDPOINT") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true but TEST_S3_ENDPOINT is not set"
                );
                eprintln!("skipped: set TEST_S3_ENDPOINT=http://127.0.0.1:PORT (e.g. moto_server) to run the S3 tests");
                None
            }
        }
    }

    /// A new bucket on `endpoint` (moto takes an unsigned create) and a
    /// store on it under a prefix.
    async fn store(endpoint: &str, staging: &std::path::Path) -> S3FileStore {
        let bucket = format!("fnrt-test-{}", uuid::Uuid::new_v4().simple());
        let created = reqwest::Client::new()
            .put(format!("{endpoint}/{bucket}"))
            .send()
            .await
            .unwrap();
        assert!(created.status().is_success(), "creating {bucket}: {}", created.status());
        let settings = [
            ("aws_endpoint", endpoint),
            ("aws_allow_http", "true"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
            ("aws_region", "us-east-1"),
        ];
        S3FileStore::open_with(&format!("s3://{bucket}/files"), staging, &settings)
            .await
            .unwrap()
    }

    fn body(bytes: Vec<u8>) -> crate::files::ByteStream<'static> {
        let chunks: Vec<Result<Bytes, FileError>> =
            bytes.chunks(1 << 20).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        futures::stream::iter(chunks).boxed()
    }

    async fn read(blob: Blob) -> Vec<u8> {
        blob.body.map(|c| c.unwrap().to_vec()).concat().await
    }

    #[tokio::test]
    async fn blobs_round_trip_through_s3_small_and_in_parts() {
        let Some(endpoint) = endpoint() else { return };
        let dir = tempfile::tempdir().unwrap();
        let store = store(&endpoint, &dir.path().join("staging")).await;
        // 9 MiB: more than one part of a multipart upload.
        let big: Vec<u8> = (0..9 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        for bytes in [b"small".to_vec(), big] {
            let staged = store.stage(body(bytes.clone()), 64 << 20).await.unwrap();
            let sha256 = staged.sha256.clone();
            store.keep(staged).await.unwrap();
            // The same bytes again: kept once, and the staged copy goes.
            store
                .keep(store.stage(body(bytes.clone()), 64 << 20).await.unwrap())
                .await
                .unwrap();
            assert_eq!(std::fs::read_dir(dir.path().join("staging")).unwrap().count(), 0);
            let blob = store.open(&sha256).await.unwrap().expect("the blob");
            assert_eq!(blob.size, bytes.len() as u64);
            assert!(read(blob).await == bytes, "the bytes read are the bytes written");
        }
        let listed = store.written_before(i64::MAX).await.unwrap();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(store.written_before(0).await.unwrap().is_empty());
        for sha256 in &listed {
            assert!(
                !store.remove_if_written_before(sha256, 0).await.unwrap(),
                "too new to remove"
            );
            assert!(store.remove(sha256).await.unwrap());
            assert!(!store.remove(sha256).await.unwrap());
            assert!(store.open(sha256).await.unwrap().is_none());
        }
        assert!(store.open("../x").await.is_err(), "not a hash, not a key");
        let too_large = store.stage(body(vec![0; 2048]), 1024).await;
        assert!(matches!(too_large, Err(FileError::TooLarge { limit: 1024 })));
        assert_eq!(std::fs::read_dir(dir.path().join("staging")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_blob_without_files_goes_at_the_first_sweep_after_the_grace() {
        let Some(endpoint) = endpoint() else { return };
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(store(&endpoint, &dir.path().join("staging")).await);
        let records = crate::store::sqlite::SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
        let files = Arc::new(Files::new(
            store.clone(),
            Arc::new(records),
            1 << 20,
            Duration::from_secs(3600),
        ));
        let kept = files.upload("alice", "kept.txt", body(b"kept".to_vec())).await.unwrap();
        let gone = files.upload("alice", "gone.txt", body(b"gone".to_vec())).await.unwrap();
        files.delete("alice", &gone.id).await.unwrap();
        // Another controller could be naming it again: it stays for now.
        assert!(store.open(&gone.sha256).await.unwrap().is_some());
        let now = fnrt_core::timefmt::now_ms();
        files.sweep_at(now).await.unwrap();
        assert!(
            store.open(&gone.sha256).await.unwrap().is_some(),
            "younger than the grace"
        );

        let later = now + i64::try_from(GRACE.as_millis()).unwrap() + 60_000;
        files.sweep_at(later).await.unwrap();
        assert!(
            store.open(&gone.sha256).await.unwrap().is_none(),
            "unnamed and old: removed"
        );
        let (file, blob) = files.open("alice", &kept.id).await.unwrap();
        assert_eq!((file.name.as_str(), read(blob).await), ("kept.txt", b"kept".to_vec()));
    }

    #[test]
    fn urls_name_a_bucket_and_a_prefix() {
        assert_eq!(parse_url("s3://fnrt-files"), Ok(("fnrt-files", "")));
        assert_eq!(parse_url("s3://fnrt.files/prod/eu/"), Ok(("fnrt.files", "prod/eu")));
        for bad in [
            "fnrt-files",
            "https://x/y",
            "s3://",
            "s3://UPPER",
            "s3://ab",
            "s3://a_b/c",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
