//! SQLite: the embedded default, one file in the data dir. Its queries are
//! the shared ones in `sql.rs`; here are its [`Dialect`] and how it opens.

use std::path::Path;
use std::str::FromStr;

use sqlx::Sqlite;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use time::OffsetDateTime;

use super::sql::{Dialect, SqlStore};

pub type SqliteStore = SqlStore<Sqlite>;

impl Dialect for Sqlite {
    const KIND: &'static str = "sqlite";
    /// The order rows were written in: timestamps have whole seconds here,
    /// so a session's executions often share one.
    const TIE_BREAK: &'static str = "rowid";
    const ID_TEXT: &'static str = "id";
    /// One writer at a time: a claim never meets another's lock.
    const SKIP_LOCKED: &'static str = "";
    const BEGIN_READ_THEN_WRITE: &'static str = "BEGIN IMMEDIATE";
    /// TEXT, hyphenated, as the first migration made the column.
    type Uuid = uuid::fmt::Hyphenated;

    /// `VALUES` rows (SQLite names their columns `column1`, …); the first
    /// column of a real row is never NULL. The `WHERE` is also what SQLite's
    /// parser needs to read an `INSERT ... SELECT` with `ON CONFLICT`.
    fn select_bound_rows(columns: &[(&str, &str)], rows: usize) -> Option<String> {
        let row = format!("({})", vec!["?"; columns.len()].join(", "));
        Some(format!(
            "SELECT * FROM (VALUES {}) WHERE column1 IS NOT NULL",
            vec![row; rows].join(", ")
        ))
    }
    /// Timestamps are RFC 3339 TEXT and compared as text, so each is written
    /// in the one shape `timefmt` gives (UTC, whole seconds): they sort in
    /// time order, and alike with the rows written before the queries were
    /// shared.
    fn timestamp(t: OffsetDateTime) -> OffsetDateTime {
        let t = t.to_offset(time::UtcOffset::UTC);
        t.replace_nanosecond(0).unwrap_or(t)
    }
}

impl SqlStore<Sqlite> {
    /// Opens (creating if needed) `path` and applies the migrations.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // In WAL mode: a commit survives the controller's crash or
            // restart, and only a power loss or an OS crash may undo the
            // last ones (never corrupting the file); it is not waited on
            // with fsync (a commit per batch of execution records).
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // A file's connection does not go stale; the check would be a
            // round trip to its thread before every query.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("../migrations/sqlite").run(&pool).await?;
        // Execution records, the one write under load, go through one
        // connection of their own that is never closed. A connection drops
        // its whole page cache when another has written since its last
        // transaction, so batches taken in turn by the pool's connections
        // read the table's and indexes' pages again from the file each
        // time (0.6 reads per cached hit at c1, docs/benchmarks.md); this
        // one keeps them.
        let records = SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(SqlStore::new(pool, records))
    }
}
