//! Durable state: functions and their versions, and execution records.
//!
//! One trait per concern, so each caller holds only what it uses:
//! [`FunctionStore`] (functions and versions, for the
//! [`crate::registry::Registry`]), [`ExecutionStore`] (execution records, for
//! [`crate::records::ExecutionLog`]), [`ExecutionQueue`] (asynchronous
//! executions, for [`crate::executions`]), [`LogStore`] (function logs),
//! [`FileRecords`] (uploaded files, for [`crate::files`]) and [`StoreHealth`] (`/health`). One
//! database implements them all: SQLite ([`sqlite::SqliteStore`]) is the
//! embedded default, PostgreSQL ([`postgres::PostgresStore`]) is chosen when
//! `DATABASE_URL` is set. [`Stores`] hands one open database to each caller
//! as the trait it needs. One test suite (`tests.rs`) runs against both. The
//! controller never reads the store on the execute path: the registry keeps
//! the current versions in memory.
//!
//! A new concern (job queues, pipeline runs) gets a trait of its own here, an
//! impl in `sql.rs` and a field in [`Stores`], rather than growing another.
//!
//! # Layout
//!
//! - `mod.rs`: the traits, the types they take and return (rows are read
//!   straight into them with `#[derive(sqlx::FromRow)]`), [`StoreError`],
//!   [`Stores`].
//! - [`sql`]: every query, written once: [`sql::SqlStore`] is generic over
//!   the sqlx driver and implements the traits for any [`sql::Dialect`].
//!   Rather than sqlx's `Any` driver (which loses the native types: JSON,
//!   timestamps, UUIDs) or a macro that stamps out one impl per database,
//!   the compiler checks the one body once against `where` clauses that
//!   name what it needs of a driver, and checks each driver against them.
//! - [`sqlite`], [`postgres`]: each database's [`sql::Dialect`] (the few
//!   differences, named: how a UUID and a timestamp are kept, how ties
//!   between execution records are broken) and how it is opened and
//!   migrated (`migrations/sqlite`, `migrations/postgres`).
//! - `tests.rs`: the suite both databases pass, and SQLite's reading of the
//!   text it has always written.

pub mod postgres;
pub mod sql;
pub mod sqlite;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use time::OffsetDateTime;

/// Who registered a function: the bundled `functions/` folder or the API.
/// A function changed through the API is never overwritten by the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Bundled,
    Api,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Bundled => "bundled",
            Source::Api => "api",
        }
    }

    pub fn parse(s: &str) -> Source {
        if s == "bundled" { Source::Bundled } else { Source::Api }
    }
}

/// How the `source` column is read.
impl From<String> for Source {
    fn from(s: String) -> Source {
        Source::parse(&s)
    }
}

/// One stored version of a function (a `function_versions` row, with its
/// function's `registration`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredVersion {
    pub language_title: String,
    pub version: i64,
    /// The normalised manifest ([`crate::registry::Manifest`]) as JSON.
    pub manifest: Value,
    pub code: String,
    pub code_hash: String,
    pub created_at: OffsetDateTime,
    /// Which registration of the name this is: a function deleted and
    /// registered again counts its versions from 1 again, under a new one.
    pub registration: String,
}

/// A function with its current version (a `functions` row joined with its
/// current `function_versions` row, whose `created_at` is the version's).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredFunction {
    pub language_title: String,
    #[sqlx(try_from = "String")]
    pub source: Source,
    /// The subject that registered it (None: bundled).
    pub owner: Option<String>,
    #[sqlx(rename = "function_created_at")]
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    #[sqlx(flatten)]
    pub current: StoredVersion,
}

/// A version to write.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub language_title: String,
    pub language: String,
    pub title: String,
    pub description: String,
    pub manifest: Value,
    pub code: String,
    pub code_hash: String,
    /// Who registers it; kept only when the function is created. For an
    /// update, the function's owner.
    pub owner: Option<String>,
    /// The most the owner's versions may take together, this one included
    /// ([`StoreError::OverQuota`] beyond); `None`: no quota.
    pub quota: Option<i64>,
    /// What its registration installed for it, in bytes (a package's
    /// dependencies; 0 when its function's current version has the same
    /// set): charged to its owner beside its code.
    pub installed_bytes: u64,
}

impl NewVersion {
    /// What it takes: its code and manifest stored, and what was installed
    /// for it, in bytes.
    pub fn size(&self) -> i64 {
        let stored = (self.code.len() + self.manifest.to_string().len()) as u64;
        i64::try_from(stored.saturating_add(self.installed_bytes)).unwrap_or(i64::MAX)
    }
}

pub use fnrt_core::records::ExecutionRecord;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("function already exists")]
    Conflict,
    #[error("function not found")]
    NotFound,
    /// The function is another subject's: only the subject that registered
    /// it writes its versions or deletes it.
    #[error("function owned by another subject")]
    NotOwner,
    /// The subject has as many pending executions as it may.
    #[error("the subject has {max} pending executions")]
    TooManyPending { max: i64 },
    /// The owner's versions would take more than its quota.
    #[error("the owner's functions take {used} bytes; this version would pass the quota of {quota}")]
    OverQuota { used: i64, quota: i64 },
    /// The version asked to be deleted is its function's current one.
    #[error("the function's current version")]
    IsCurrent,
    /// The function's current version is no longer the one the caller saw.
    #[error("the function's current version changed")]
    CurrentChanged,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl StoreError {
    /// The database could not be reached (as opposed to refusing the query):
    /// the client gets 503 and may retry.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Database(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_)
            )
        )
    }
}

/// Functions and their versions: what the [`crate::registry::Registry`]
/// loads at start-up and writes through.
#[async_trait]
pub trait FunctionStore: Send + Sync {
    /// Every function with its current version.
    async fn functions(&self) -> Result<Vec<StoredFunction>, StoreError>;
    /// One function with its current version.
    async fn function(&self, language_title: &str) -> Result<Option<StoredFunction>, StoreError>;
    /// Every function's registration and current version number
    /// (`(language_title, registration, version)`): a cheap way for a
    /// replica to see what others changed.
    async fn current_versions(&self) -> Result<Vec<(String, String, i64)>, StoreError>;
    /// One version of one function.
    async fn version(&self, language_title: &str, version: i64) -> Result<Option<StoredVersion>, StoreError>;
    /// Creates a function at version 1; [`StoreError::Conflict`] if it exists.
    async fn create(&self, new: NewVersion, source: Source) -> Result<StoredFunction, StoreError>;
    /// Adds the next version, written by `writer` (see [`delete`]);
    /// [`StoreError::NotFound`] if the function does not exist.
    ///
    /// [`delete`]: FunctionStore::delete
    async fn add_version(
        &self,
        new: NewVersion,
        source: Source,
        writer: Option<&str>,
    ) -> Result<StoredFunction, StoreError>;
    /// The bytes `owner`'s functions take, every version counted.
    async fn function_bytes(&self, owner: &str) -> Result<i64, StoreError>;
    /// Deletes a function and its versions; false if it did not exist.
    ///
    /// `writer` is the subject asking (`None`: the controller itself). A
    /// function with an owner is written by its owner only, one without
    /// (bundled) by anyone: [`StoreError::NotOwner`] otherwise. Checked in
    /// the statement that writes, so a function deleted and registered
    /// again by someone else meanwhile is not written.
    async fn delete(&self, language_title: &str, writer: Option<&str>) -> Result<bool, StoreError>;
    /// A page of a function's versions, newest first, with how many there
    /// are (`(0, [])` for a function that does not exist).
    async fn versions(
        &self,
        language_title: &str,
        offset: i64,
        limit: i64,
    ) -> Result<(i64, Vec<VersionInfo>), StoreError>;
    /// Deletes one version that is not its function's current one, written
    /// by `writer` as for [`delete`]; false if there is no such version.
    /// The function's current version must still be `current`
    /// ([`StoreError::CurrentChanged`] otherwise; [`StoreError::IsCurrent`]
    /// when that is the one asked for). With `move_install`, what was
    /// installed for the deleted version (its size beyond its code and
    /// manifest) is charged to the current version from now on, unless
    /// the current version carries such a charge already: the two share
    /// one install, which the current version keeps.
    ///
    /// [`delete`]: FunctionStore::delete
    async fn delete_version(
        &self,
        language_title: &str,
        version: i64,
        writer: Option<&str>,
        current: i64,
        move_install: bool,
    ) -> Result<bool, StoreError>;
}

/// One version as a listing shows it: no code.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VersionInfo {
    pub version: i64,
    pub code_hash: String,
    pub created_at: OffsetDateTime,
    /// What it takes against its owner's quota, in bytes: its code and
    /// manifest, and what was installed for it.
    pub size: i64,
}

/// The durable record of answered executions, written in batches by
/// [`crate::records::ExecutionLog`].
#[async_trait]
pub trait ExecutionStore: Send + Sync {
    /// Appends execution records (one transaction; safe to retry: rows are
    /// keyed by their `id`).
    async fn record_executions(&self, records: &[ExecutionRecord]) -> Result<(), StoreError>;
    /// The records of one session, oldest first (operations and tests).
    async fn executions_of(&self, request_id: &str) -> Result<Vec<ExecutionRecord>, StoreError>;
    /// Deletes up to `limit` records of executions started before
    /// `before`; how many it deleted.
    async fn purge_executions(&self, before: OffsetDateTime, limit: i64) -> Result<u64, StoreError>;
}

/// One execution's logs as stored.
#[derive(Debug, Clone)]
pub struct StoredLogs {
    pub execution_id: String,
    /// Its session or asynchronous execution.
    pub request_id: String,
    pub subject: String,
    pub language_title: String,
    /// When the execution started, Unix milliseconds.
    pub created_ms: i64,
    pub captured: std::sync::Arc<fnrt_core::logs::Captured>,
}

/// What functions wrote (`execution_logs`), written with the execution
/// records and read by the logs endpoints.
#[async_trait]
pub trait LogStore: Send + Sync {
    /// The logs of execution `id`, or of every execution of the session or
    /// asynchronous execution `id`, oldest first.
    async fn logs_of(&self, id: &str) -> Result<Vec<StoredLogs>, StoreError>;
    /// An execution's record (an execution that wrote nothing has no logs row).
    async fn execution(&self, id: uuid::Uuid) -> Result<Option<ExecutionRecord>, StoreError>;
    /// The logs of a function's last `limit` executions that wrote anything, oldest first.
    async fn function_logs(&self, language_title: &str, limit: i64) -> Result<Vec<StoredLogs>, StoreError>;
    /// Deletes logs of executions started before `before_ms`; how many.
    async fn purge_logs(&self, before_ms: i64) -> Result<u64, StoreError>;
}

/// One asynchronous execution as stored (an `async_executions` row): the
/// queue entry and its state. Times are Unix milliseconds.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueuedExecution {
    pub id: String,
    pub subject: String,
    pub language_title: String,
    pub version: i64,
    pub params: Value,
    /// The context the function sees.
    pub context: Value,
    pub timeout_ms: i64,
    /// 0 low, 1 normal, 2 high.
    pub priority: i32,
    /// `pending`, `running`, `completed`, `failed`, `cancelled`.
    pub status: String,
    pub idempotency_key: Option<String>,
    /// The submission's `X-Cache-Control` (`no-cache`, `max-age=N`).
    pub cache: Option<String>,
    pub max_attempts: i32,
    pub backoff_ms: i64,
    pub retry_runtime_errors: bool,
    /// Attempts claimed so far (the one running included).
    pub attempt: i32,
    /// Each finished attempt: `number`, `started_at`, `finished_at`,
    /// `outcome`, `error`.
    pub attempts: Value,
    pub result: Option<Value>,
    pub error: Option<Value>,
    pub cold_start: bool,
    pub cancel_requested: bool,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub run_after_ms: i64,
    pub lease_owner: Option<String>,
    pub lease_until_ms: Option<i64>,
    /// Where the final state is POSTed.
    pub callback_url: Option<String>,
    /// `pending`, `delivered`, `failed`; `None` before the final state.
    pub callback_status: Option<String>,
    pub callback_attempts: i32,
    pub callback_next_ms: Option<i64>,
    /// One per final state: the receiver drops duplicates by it.
    pub delivery_id: Option<String>,
    pub callback_error: Option<String>,
    /// A pipeline's steps as its running attempt last reported them.
    pub steps: Option<Value>,
}

/// An execution to queue.
#[derive(Debug, Clone)]
pub struct NewExecution {
    pub id: String,
    pub subject: String,
    pub language_title: String,
    pub version: i64,
    pub params: Value,
    pub context: Value,
    pub timeout_ms: i64,
    pub priority: i32,
    pub idempotency_key: Option<String>,
    pub cache: Option<String>,
    pub max_attempts: i32,
    pub backoff_ms: i64,
    pub retry_runtime_errors: bool,
    pub callback_url: Option<String>,
    pub now_ms: i64,
    /// The most pending executions its subject may have, this one
    /// included ([`StoreError::TooManyPending`] beyond).
    pub max_pending: i64,
}

/// Which of a subject's executions to list.
#[derive(Debug, Clone, Default)]
pub struct ExecutionFilter {
    pub status: Option<String>,
    pub language_title: Option<String>,
    pub offset: i64,
    pub limit: i64,
}

/// A worker's claim on the next execution due.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    /// The replica that claims (its lease names it).
    pub owner: &'a str,
    pub now_ms: i64,
    pub lease_until_ms: i64,
    /// Most running executions of one subject, and of one function.
    pub per_subject: i64,
    pub per_function: i64,
}

/// How an attempt ended, written only by the lease's holder.
#[derive(Debug, Clone)]
pub struct Finish {
    /// `completed`, `failed`, `cancelled`, or `pending` (retried later, or
    /// handed back at shutdown).
    pub status: &'static str,
    pub attempts: Value,
    pub result: Option<Value>,
    pub error: Option<Value>,
    pub cold_start: bool,
    pub run_after_ms: i64,
    pub finished_ms: Option<i64>,
    /// Handed back unrun (shutdown): the attempt does not count.
    pub uncount: bool,
    /// For a final state: the id of its callback delivery (used when the
    /// execution has a callback URL).
    pub delivery_id: Option<String>,
}

/// The durable queue of asynchronous executions ([`crate::executions`]).
/// Every replica's workers claim from it; a claim is a lease that another
/// replica takes over when its holder stops renewing it.
#[async_trait]
pub trait ExecutionQueue: Send + Sync {
    /// Queues `new`; with an idempotency key already used by the same
    /// subject since `since_ms`, returns that execution instead (false).
    async fn submit(&self, new: NewExecution, since_ms: i64) -> Result<(QueuedExecution, bool), StoreError>;
    async fn get(&self, id: &str) -> Result<Option<QueuedExecution>, StoreError>;
    /// A subject's executions, newest first, and how many match in all.
    async fn list(&self, subject: &str, filter: &ExecutionFilter) -> Result<(Vec<QueuedExecution>, i64), StoreError>;
    /// Claims the next due execution (pending and past its backoff, or
    /// running under an expired lease), highest priority first, oldest
    /// first, skipping subjects and functions at their caps.
    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<QueuedExecution>, StoreError>;
    /// Extends a lease; `None` if it is no longer the owner's, else whether
    /// a cancel was asked for.
    async fn renew(&self, id: &str, owner: &str, until_ms: i64) -> Result<Option<bool>, StoreError>;
    /// Ends the owner's attempt; false if the lease was lost meanwhile.
    async fn finish(&self, id: &str, owner: &str, finish: &Finish) -> Result<bool, StoreError>;
    /// Cancels a pending execution, or asks its worker to stop a running
    /// one; the execution as it is afterwards (`None`: not the subject's).
    async fn cancel(&self, id: &str, subject: &str, now_ms: i64) -> Result<Option<QueuedExecution>, StoreError>;
    /// Writes a running pipeline's step reports; false if `owner` no longer runs it.
    async fn set_steps(&self, id: &str, owner: &str, steps: &Value) -> Result<bool, StoreError>;
    /// Queues a failed or cancelled execution again, its attempt history
    /// replaced by `attempts`; false if it is in another state (or its
    /// history changed meanwhile), `None` if it is not the subject's.
    async fn requeue(&self, id: &str, subject: &str, now_ms: i64, attempts: &Value)
    -> Result<Option<bool>, StoreError>;
    /// Deletes up to `limit` executions that finished (completed, failed
    /// or cancelled, their callback no longer due) before `before_ms`;
    /// how many it deleted.
    async fn purge_finished(&self, before_ms: i64, limit: i64) -> Result<u64, StoreError>;
    /// Ends every lease now (a SQLite controller starting: no other
    /// process held them).
    async fn expire_leases(&self) -> Result<u64, StoreError>;
    /// Pending executions per priority.
    async fn pending_by_priority(&self) -> Result<Vec<(i32, i64)>, StoreError>;
    /// Claims the next callback due (holding it until `hold_until_ms`)
    /// and counts the delivery attempt.
    async fn claim_callback(&self, now_ms: i64, hold_until_ms: i64) -> Result<Option<QueuedExecution>, StoreError>;
    /// Records how a delivery attempt went: `delivered`, `failed`, or
    /// `pending` again at `next_ms`; false if that delivery is no longer
    /// the current one.
    async fn callback_done(
        &self,
        id: &str,
        delivery_id: &str,
        status: &str,
        next_ms: i64,
        error: Option<&str>,
    ) -> Result<bool, StoreError>;
    /// The subject's callback signing secret, made from `candidate` the
    /// first time: (secret, created at).
    async fn signing_secret(&self, subject: &str, candidate: &str, now_ms: i64) -> Result<(String, i64), StoreError>;
    /// Replaces it.
    async fn rotate_signing_secret(&self, subject: &str, secret: &str, now_ms: i64) -> Result<(), StoreError>;
}

/// One uploaded file (a `files` row); its bytes are the blob its `sha256`
/// names in the [`crate::files::FileStore`]. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredFile {
    /// The `file_id`, a UUID.
    pub id: String,
    /// The subject that uploaded it: the only one who reads it.
    pub owner: String,
    pub name: String,
    pub size: i64,
    pub content_type: String,
    /// Hex.
    pub sha256: String,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// The records of uploaded files ([`crate::files::Files`]). Several records
/// may name one blob: the blob goes when [`FileRecords::blob_refs`] says
/// no record names it any more.
#[async_trait]
pub trait FileRecords: Send + Sync {
    /// Inserts `file`, unless its owner's live files (those expiring after
    /// its `created_ms`) and it would take more than `quota` bytes; false
    /// then. Decided atomically: uploads that come together cannot pass
    /// the quota together.
    async fn insert_file(&self, file: &StoredFile, quota: Option<i64>) -> Result<bool, StoreError>;
    /// The bytes of `owner`'s files that expire after `now_ms`.
    async fn file_bytes(&self, owner: &str, now_ms: i64) -> Result<i64, StoreError>;
    /// A file by its id, expired or not.
    async fn file(&self, id: &str) -> Result<Option<StoredFile>, StoreError>;
    /// Deletes `owner`'s file `id`; the record deleted (`None`: no such
    /// file of theirs).
    async fn delete_file(&self, id: &str, owner: &str) -> Result<Option<StoredFile>, StoreError>;
    /// How many records name the blob `sha256`.
    async fn blob_refs(&self, sha256: &str) -> Result<i64, StoreError>;
    /// Deletes up to `limit` files that expired at or before `now_ms`; the
    /// records deleted.
    async fn purge_files(&self, now_ms: i64, limit: i64) -> Result<Vec<StoredFile>, StoreError>;
}

/// What `/health` asks of the database behind every store.
#[async_trait]
pub trait StoreHealth: Send + Sync {
    /// Cheap liveness check.
    async fn ping(&self) -> Result<(), StoreError>;
    /// `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;
}

/// One open database, handed to each caller as the trait it needs.
#[derive(Clone)]
pub struct Stores {
    pub functions: Arc<dyn FunctionStore>,
    pub executions: Arc<dyn ExecutionStore>,
    pub queue: Arc<dyn ExecutionQueue>,
    pub logs: Arc<dyn LogStore>,
    pub files: Arc<dyn FileRecords>,
    pub health: Arc<dyn StoreHealth>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("kind", &self.health.kind())
            .finish_non_exhaustive()
    }
}

impl Stores {
    /// Every store of one database that implements them all.
    pub fn of<S>(store: S) -> Stores
    where
        S: FunctionStore + ExecutionStore + ExecutionQueue + LogStore + FileRecords + StoreHealth + 'static,
    {
        let store = Arc::new(store);
        Stores {
            functions: store.clone(),
            executions: store.clone(),
            queue: store.clone(),
            logs: store.clone(),
            files: store.clone(),
            health: store,
        }
    }
}
