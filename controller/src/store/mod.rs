//! Durable state: functions and their versions, and execution records.
//!
//! One trait per concern, so each caller holds only what it uses:
//! [`FunctionStore`] (functions and versions, for the
//! [`crate::registry::Registry`]), [`ExecutionStore`] (execution records, for
//! [`crate::records::ExecutionLog`]) and [`StoreHealth`] (`/health`). One
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

/// One stored version of a function (a `function_versions` row).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredVersion {
    pub language_title: String,
    pub version: i64,
    /// The normalised manifest ([`crate::registry::Manifest`]) as JSON.
    pub manifest: Value,
    pub code: String,
    pub code_hash: String,
    pub created_at: OffsetDateTime,
}

/// A function with its current version (a `functions` row joined with its
/// current `function_versions` row, whose `created_at` is the version's).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredFunction {
    pub language_title: String,
    #[sqlx(try_from = "String")]
    pub source: Source,
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
}

pub use fnrt_core::records::ExecutionRecord;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("function already exists")]
    Conflict,
    #[error("function not found")]
    NotFound,
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
    /// Every function's current version number: a cheap way for a replica to
    /// see what others changed.
    async fn current_versions(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// One version of one function.
    async fn version(&self, language_title: &str, version: i64) -> Result<Option<StoredVersion>, StoreError>;
    /// Creates a function at version 1; [`StoreError::Conflict`] if it exists.
    async fn create(&self, new: NewVersion, source: Source) -> Result<StoredFunction, StoreError>;
    /// Adds the next version; [`StoreError::NotFound`] if the function does not exist.
    async fn add_version(&self, new: NewVersion, source: Source) -> Result<StoredFunction, StoreError>;
    /// Deletes a function and its versions; false if it did not exist.
    async fn delete(&self, language_title: &str) -> Result<bool, StoreError>;
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
        S: FunctionStore + ExecutionStore + StoreHealth + 'static,
    {
        let store = Arc::new(store);
        Stores {
            functions: store.clone(),
            executions: store.clone(),
            health: store,
        }
    }
}
