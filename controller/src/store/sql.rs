//! Every store query, written once: [`SqlStore`] is generic over the sqlx
//! driver, and [`Dialect`] names the little that differs.
//!
//! The `where` clauses say what the queries need of a driver: sqlx's own
//! encodings of `&str`, `i64`, `bool`, `time::OffsetDateTime` and
//! `serde_json::Value` (JSON), and rows read into the store's types with
//! `#[derive(sqlx::FromRow)]`. Both drivers take the numbered `$N`
//! placeholders (SQLite as named parameters, which sqlx binds by number),
//! except the batch inserts: `?` per value on SQLite
//! ([`Dialect::select_bound_rows`]), one JSON parameter on PostgreSQL
//! ([`Dialect::select_json_rows`]).
//! Each impl states only the bounds it uses: Rust would not carry such
//! bounds (on `&str`, `i64`, ... rather than on the driver) from a trait
//! like [`Dialect`] to its users, so they cannot be said once there.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use serde_json::Value;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::{AssertSqlSafe, Decode, Encode, Executor, FromRow, IntoArguments, Pool, Type};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Claim, ExecutionFilter, ExecutionQueue, ExecutionRecord, ExecutionStore, FileRecords, Finish, FunctionStore,
    LogStore, NewExecution, NewVersion, QueuedExecution, Source, StoreError, StoreHealth, StoredFile, StoredFunction,
    StoredLogs, StoredVersion, VersionInfo,
};
use fnrt_core::logs::{Captured, LogLine, Stream};
use fnrt_core::timefmt;

/// What differs between SQLite and PostgreSQL, each named once; the
/// implementations are beside each driver's `open`/`connect`.
///
/// (`Arguments: IntoArguments<Self>` holds for every driver; sqlx needs it
/// said where the driver is generic.)
pub trait Dialect: sqlx::Database<Arguments: IntoArguments<Self>> {
    /// `sqlite` or `postgres`, for `/health`.
    const KIND: &'static str;
    /// The column that orders a session's executions with the same
    /// `started_at`.
    const TIE_BREAK: &'static str;
    /// `executions.id` as hyphenated lowercase text (its 15th character
    /// is the UUID's version).
    const ID_TEXT: &'static str;
    /// Appended to the queue's claim: rows another replica is claiming are
    /// skipped rather than waited for.
    const SKIP_LOCKED: &'static str;
    /// Begins a transaction that reads before it writes. On SQLite two such
    /// transactions begun plainly (deferred) each hold a read snapshot, and
    /// the second to write fails at once with "database is locked" (the
    /// busy timeout does not wait for that): `BEGIN IMMEDIATE` there takes
    /// the write lock first, so the second waits its turn instead.
    const BEGIN_READ_THEN_WRITE: &'static str = "BEGIN";
    /// A lock on one key held to the end of the transaction ([`lock_owner`]),
    /// so that two writes counted against one owner's cap are decided one
    /// after the other; `None` where the write's own statement does that
    /// (SQLite: one writer at a time).
    const OWNER_LOCK: Option<&'static str> = None;
    /// How the `executions.id` column keeps a UUID.
    type Uuid: From<Uuid> + Into<Uuid> + for<'q> Encode<'q, Self> + for<'r> Decode<'r, Self> + Type<Self>;

    /// A timestamp as it is written.
    fn timestamp(t: OffsetDateTime) -> OffsetDateTime {
        t
    }
    /// A `SELECT` of `rows` rows of `columns` bound one value per
    /// parameter, rows whose first value is NULL (the padding) left out;
    /// `None` where a batch goes as JSON ([`Dialect::select_json_rows`]),
    /// as on PostgreSQL.
    fn select_bound_rows(_columns: &[(&str, &str)], _rows: usize) -> Option<String> {
        None
    }
    /// A `SELECT` of `columns` (name, PostgreSQL type) from a JSON array of
    /// objects bound as the statement's one parameter: a batch of rows of
    /// any size is one statement, of one shape (PostgreSQL's
    /// `jsonb_to_recordset` here).
    fn select_json_rows(columns: &[(&str, &str)]) -> String {
        let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
        let typed: Vec<String> = columns.iter().map(|(name, ty)| format!("{name} {ty}")).collect();
        format!(
            "SELECT {} FROM jsonb_to_recordset($1::jsonb) AS r({})",
            names.join(", "),
            typed.join(", ")
        )
    }
}

/// The store over one database; see `sqlite.rs` and `postgres.rs` for
/// opening one.
#[derive(Debug)]
pub struct SqlStore<DB: sqlx::Database> {
    pool: Pool<DB>,
    /// Where execution records are written: SQLite's own connection for
    /// them (see `sqlite.rs`), else `pool`.
    records: Pool<DB>,
    /// Set once no record with a pre-v7 id is left: the retention sweep
    /// stops scanning for them (every record written since is a v7 one).
    legacy_records_gone: AtomicBool,
}

impl<DB: sqlx::Database> SqlStore<DB> {
    /// A store over a pool whose migrations have been applied; `records`
    /// writes the execution records (the same pool, or one of its own).
    pub(super) fn new(pool: Pool<DB>, records: Pool<DB>) -> Self {
        SqlStore {
            pool,
            records,
            legacy_records_gone: AtomicBool::new(false),
        }
    }
}

/// A function joined with its current version (see the `sqlx` attributes
/// on [`StoredFunction`]); a macro so `concat!` keeps every query a static
/// string.
macro_rules! select_function {
    () => {
        "SELECT f.language_title, f.source, f.owner, f.created_at AS function_created_at, f.updated_at, \
         v.version, v.manifest, v.code, v.code_hash, v.created_at, f.registration \
         FROM functions f JOIN function_versions v \
         ON v.language_title = f.language_title AND v.version = f.current_version"
    };
}

#[async_trait]
impl<DB> FunctionStore for SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'r> StoredFunction: FromRow<'r, DB::Row>,
    for<'r> StoredVersion: FromRow<'r, DB::Row>,
    for<'r> (String, String, i64): FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (i64, String, Value): FromRow<'r, DB::Row>,
    for<'r> VersionInfo: FromRow<'r, DB::Row>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'q> Value: Encode<'q, DB> + Type<DB>,
{
    async fn functions(&self) -> Result<Vec<StoredFunction>, StoreError> {
        Ok(
            sqlx::query_as(concat!(select_function!(), " ORDER BY f.language_title"))
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn function(&self, language_title: &str) -> Result<Option<StoredFunction>, StoreError> {
        Ok(
            sqlx::query_as(concat!(select_function!(), " WHERE f.language_title = $1"))
                .bind(language_title)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn current_versions(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT language_title, registration, current_version FROM functions")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn version(&self, language_title: &str, version: i64) -> Result<Option<StoredVersion>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT v.language_title, v.version, v.manifest, v.code, v.code_hash, v.created_at, f.registration \
             FROM function_versions v JOIN functions f ON f.language_title = v.language_title \
             WHERE v.language_title = $1 AND v.version = $2",
        )
        .bind(language_title)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn create(&self, new: NewVersion, source: Source) -> Result<StoredFunction, StoreError> {
        let now = DB::timestamp(timefmt::now());
        let mut tx = self.pool.begin().await?;
        let created: Option<(i64,)> = sqlx::query_as(
            "INSERT INTO functions (language_title, language, title, description, source, current_version, created_at, updated_at, owner, registration) \
             VALUES ($1, $2, $3, $4, $5, 1, $6, $6, $7, $8) ON CONFLICT (language_title) DO NOTHING \
             RETURNING current_version",
        )
        .bind(new.language_title.as_str())
        .bind(new.language.as_str())
        .bind(new.title.as_str())
        .bind(new.description.as_str())
        .bind(source.as_str())
        .bind(now)
        .bind(new.owner.as_deref())
        .bind(uuid::Uuid::new_v4().to_string().as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let (version,) = created.ok_or(StoreError::Conflict)?;
        within_quota::<DB>(&mut tx, &new).await?;
        insert_version(&new, version, now).execute(&mut *tx).await?;
        tx.commit().await?;
        self.function(&new.language_title).await?.ok_or(StoreError::NotFound)
    }

    async fn add_version(
        &self,
        new: NewVersion,
        source: Source,
        writer: Option<&str>,
    ) -> Result<StoredFunction, StoreError> {
        let now = DB::timestamp(timefmt::now());
        let mut tx = self.pool.begin().await?;
        // `owner = NULL` is never true: the controller (no writer) writes
        // only functions no one owns.
        let updated: Option<(i64,)> = sqlx::query_as(
            "UPDATE functions SET current_version = current_version + 1, description = $1, source = $2, updated_at = $3 \
             WHERE language_title = $4 AND (owner IS NULL OR owner = $5) RETURNING current_version",
        )
        .bind(new.description.as_str())
        .bind(source.as_str())
        .bind(now)
        .bind(new.language_title.as_str())
        .bind(writer)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((version,)) = updated else {
            return Err(refused(&mut tx, &new.language_title).await);
        };
        within_quota::<DB>(&mut tx, &new).await?;
        insert_version(&new, version, now).execute(&mut *tx).await?;
        tx.commit().await?;
        self.function(&new.language_title).await?.ok_or(StoreError::NotFound)
    }

    async fn function_bytes(&self, owner: &str) -> Result<i64, StoreError> {
        let (bytes,): (i64,) = sqlx::query_as(FUNCTION_BYTES).bind(owner).fetch_one(&self.pool).await?;
        Ok(bytes)
    }

    async fn delete(&self, language_title: &str, writer: Option<&str>) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let deleted: Option<(i64,)> = sqlx::query_as(
            "DELETE FROM functions WHERE language_title = $1 AND (owner IS NULL OR owner = $2) \
             RETURNING current_version",
        )
        .bind(language_title)
        .bind(writer)
        .fetch_optional(&mut *tx)
        .await?;
        if deleted.is_none() {
            return match refused(&mut tx, language_title).await {
                StoreError::NotFound => Ok(false),
                e => Err(e),
            };
        }
        sqlx::query("DELETE FROM function_versions WHERE language_title = $1")
            .bind(language_title)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn versions(
        &self,
        language_title: &str,
        offset: i64,
        limit: i64,
    ) -> Result<(i64, Vec<VersionInfo>), StoreError> {
        let (total,): (i64,) =
            sqlx::query_as("SELECT CAST(COUNT(*) AS BIGINT) FROM function_versions WHERE language_title = $1")
                .bind(language_title)
                .fetch_one(&self.pool)
                .await?;
        let page = sqlx::query_as(
            "SELECT version, code_hash, created_at, size FROM function_versions WHERE language_title = $1 \
             ORDER BY version DESC LIMIT $2 OFFSET $3",
        )
        .bind(language_title)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        Ok((total, page))
    }

    async fn delete_version(
        &self,
        language_title: &str,
        version: i64,
        writer: Option<&str>,
        current: i64,
        move_install: bool,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        // A write first, that changes nothing: it holds the function's row
        // (PostgreSQL) or the database (SQLite) against a new version
        // until this commits, and checks the writer as every write does.
        let found: Option<(i64,)> = sqlx::query_as(
            "UPDATE functions SET current_version = current_version \
             WHERE language_title = $1 AND (owner IS NULL OR owner = $2) RETURNING current_version",
        )
        .bind(language_title)
        .bind(writer)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((now_current,)) = found else {
            return Err(refused(&mut tx, language_title).await);
        };
        if version == now_current {
            return Err(StoreError::IsCurrent);
        }
        if now_current != current {
            return Err(StoreError::CurrentChanged);
        }
        let deleted: Option<(i64, String, Value)> = sqlx::query_as(
            "DELETE FROM function_versions WHERE language_title = $1 AND version = $2 RETURNING size, code, manifest",
        )
        .bind(language_title)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((size, code, manifest)) = deleted else {
            return Ok(false);
        };
        let installed = installed_bytes(size, &code, &manifest);
        if move_install && installed > 0 {
            let current_row: Option<(i64, String, Value)> = sqlx::query_as(
                "SELECT size, code, manifest FROM function_versions WHERE language_title = $1 AND version = $2",
            )
            .bind(language_title)
            .bind(current)
            .fetch_optional(&mut *tx)
            .await?;
            // Moved only to a current version charged nothing for the install
            // (one that brought the set again carries a charge of its own).
            if current_row.is_some_and(|(size, code, manifest)| installed_bytes(size, &code, &manifest) == 0) {
                sqlx::query("UPDATE function_versions SET size = size + $1 WHERE language_title = $2 AND version = $3")
                    .bind(installed)
                    .bind(language_title)
                    .bind(current)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }
}

/// What a stored version's `size` counts beyond its code and manifest (as
/// `NewVersion::size` counted them): what was installed for it.
fn installed_bytes(size: i64, code: &str, manifest: &Value) -> i64 {
    size.saturating_sub((code.len() + manifest.to_string().len()) as i64)
        .max(0)
}

/// Why a write of `language_title` guarded by its owner matched no row:
/// the function is not there, or it is another subject's.
async fn refused<DB>(tx: &mut sqlx::Transaction<'_, DB>, language_title: &str) -> StoreError
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
{
    let exists: Result<Option<(i64,)>, sqlx::Error> =
        sqlx::query_as("SELECT current_version FROM functions WHERE language_title = $1")
            .bind(language_title)
            .fetch_optional(&mut **tx)
            .await;
    match exists {
        Ok(Some(_)) => StoreError::NotOwner,
        Ok(None) => StoreError::NotFound,
        Err(e) => e.into(),
    }
}

/// The row of a new version, written beside its function's row.
/// The bytes one owner's versions take.
const FUNCTION_BYTES: &str = "SELECT CAST(COALESCE(SUM(v.size), 0) AS BIGINT) FROM function_versions v \
     JOIN functions f ON f.language_title = v.language_title WHERE f.owner = $1";

/// Takes [`Dialect::OWNER_LOCK`] on `owner`'s `cap` (files, functions,
/// pending executions: one key each) for the rest of the transaction.
async fn lock_owner<DB>(conn: &mut DB::Connection, cap: &str, owner: &str) -> Result<(), StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
{
    if let Some(lock) = DB::OWNER_LOCK {
        let key = format!("{cap}:{owner}");
        sqlx::query(lock).bind(key.as_str()).execute(conn).await?;
    }
    Ok(())
}

/// Refuses `new` ([`StoreError::OverQuota`]) when its owner's versions and
/// it would pass its quota, inside the transaction that writes it: on
/// PostgreSQL under the owner's lock (another registration of the owner's
/// waits), on SQLite under the write lock the transaction already holds.
async fn within_quota<DB>(tx: &mut sqlx::Transaction<'_, DB>, new: &NewVersion) -> Result<(), StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
{
    let (Some(owner), Some(quota)) = (new.owner.as_deref(), new.quota) else {
        return Ok(());
    };
    lock_owner::<DB>(tx, "functions", owner).await?;
    let (used,): (i64,) = sqlx::query_as(FUNCTION_BYTES).bind(owner).fetch_one(&mut **tx).await?;
    if used.saturating_add(new.size()) > quota {
        return Err(StoreError::OverQuota { used, quota });
    }
    Ok(())
}

fn insert_version<DB>(new: &NewVersion, version: i64, now: OffsetDateTime) -> sqlx::query::Query<'_, DB, DB::Arguments>
where
    DB: Dialect,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'q> Value: Encode<'q, DB> + Type<DB>,
{
    sqlx::query(
        "INSERT INTO function_versions (language_title, version, manifest, code, code_hash, created_at, size) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(new.language_title.as_str())
    .bind(version)
    .bind(&new.manifest)
    .bind(new.code.as_str())
    .bind(new.code_hash.as_str())
    .bind(now)
    .bind(new.size())
}

#[async_trait]
impl<DB> ExecutionStore for SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'r> ExecutionRow: FromRow<'r, DB::Row>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    DB::QueryResult: RowsAffected,
{
    async fn record_executions(&self, records: &[ExecutionRecord]) -> Result<(), StoreError> {
        let record_rows: Vec<RecordRow> = records.iter().map(RecordRow::new::<DB>).collect();
        let log_rows: Vec<LogRow> = records.iter().filter_map(LogRow::new).collect();
        let mut statements = batch_inserts::<DB, _>("executions", RECORD_COLUMNS, "id", &record_rows)?;
        statements.extend(batch_inserts::<DB, _>(
            "execution_logs",
            LOG_COLUMNS,
            "execution_id",
            &log_rows,
        )?);
        if statements.is_empty() {
            return Ok(());
        }
        let mut conn = self.records.acquire().await?;
        if statements.len() == 1 {
            // One statement is atomic on its own (BEGIN and COMMIT are round
            // trips to the driver as well).
            statements.remove(0).execute(&mut *conn).await?;
            return Ok(());
        }
        // The inserts ignore rows already written, so a retry after a
        // failure part-way would be harmless; they share a transaction anyway.
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        for statement in statements {
            statement.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn executions_of(&self, request_id: &str) -> Result<Vec<ExecutionRecord>, StoreError> {
        // Not user input: the dialect's column name.
        let sql = format!(
            "SELECT id, request_id, subject, language_title, version, started_at, duration_ms, outcome, cached, cold_start, parent_id \
             FROM executions WHERE request_id = $1 ORDER BY started_at, {}",
            DB::TIE_BREAK
        );
        let rows: Vec<ExecutionRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(request_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(ExecutionRecord::from).collect())
    }

    async fn purge_executions(&self, before: OffsetDateTime, limit: i64) -> Result<u64, StoreError> {
        // Ids are UUIDv7 (time first), so the rows started before `before`
        // are a range of the primary key: no index of their own, which
        // every record would pay for. `started_at` guards the ids written
        // before v7 (random, anywhere in the key).
        let ms = u64::try_from((before.unix_timestamp_nanos() / 1_000_000).max(0)).unwrap_or(0);
        let first_at_before = uuid::Builder::from_unix_timestamp_millis(ms, &[0; 10]).into_uuid();
        let done = sqlx::query(
            "DELETE FROM executions WHERE id IN \
             (SELECT id FROM executions WHERE id < $1 AND started_at < $2 ORDER BY id LIMIT $3)",
        )
        .bind(DB::Uuid::from(first_at_before))
        .bind(DB::timestamp(before))
        .bind(limit)
        .execute(&self.pool)
        .await?
        .rows();
        if done == limit as u64 || self.legacy_records_gone.load(Ordering::Relaxed) {
            return Ok(done);
        }
        // Records written before ids were v7 (a release that wrote random
        // ones) are anywhere in the key: a scan of the table finds them.
        // None is written again, so once none is left the store stops
        // looking: one scan per start where there never were any, and the
        // scans end a retention period after an upgrade from such a release.
        let not_v7 = format!("substr({}, 15, 1) <> '7'", DB::ID_TEXT);
        let any = sqlx::query(AssertSqlSafe(format!(
            "SELECT 1 FROM executions WHERE {not_v7} LIMIT 1"
        )))
        .fetch_optional(&self.pool)
        .await?;
        if any.is_none() {
            self.legacy_records_gone.store(true, Ordering::Relaxed);
            return Ok(done);
        }
        let legacy = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM executions WHERE id IN \
             (SELECT id FROM executions WHERE {not_v7} AND started_at < $1 LIMIT $2)"
        )))
        .bind(DB::timestamp(before))
        .bind(limit - done as i64)
        .execute(&self.pool)
        .await?
        .rows();
        Ok(done + legacy)
    }
}

/// `executions`' columns as a batch of records writes them, each with its
/// PostgreSQL type (see [`Dialect::select_json_rows`]).
const RECORD_COLUMNS: &[(&str, &str)] = &[
    ("id", "uuid"),
    ("request_id", "text"),
    ("subject", "text"),
    ("language_title", "text"),
    ("version", "bigint"),
    ("started_at", "timestamptz"),
    ("duration_ms", "bigint"),
    ("outcome", "text"),
    ("cached", "boolean"),
    ("cold_start", "boolean"),
    ("parent_id", "text"),
];

/// `execution_logs`' columns, likewise.
const LOG_COLUMNS: &[(&str, &str)] = &[
    ("execution_id", "text"),
    ("request_id", "text"),
    ("subject", "text"),
    ("language_title", "text"),
    ("created_ms", "bigint"),
    ("lines", "text"),
    ("bytes", "bigint"),
    ("dropped_bytes", "bigint"),
];

fn column_names(columns: &[(&str, &str)]) -> String {
    columns.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ")
}

/// Rows per statement where a batch is bound value by value
/// ([`Dialect::select_bound_rows`]): the smallest that holds what is left
/// of the batch, padded with NULL rows, so that few shapes of statement
/// are ever prepared (SQLite allows 32,766 parameters). Steps of about
/// half again: each NULL row is bound, cleared and read like a record
/// (steps of four padded a batch of 39 records to 64, about a tenth of a
/// cached hit's instructions going to the records under callgrind).
const BOUND_BATCH_ROWS: [usize; 13] = [4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256];

type Statement<'q, DB> = sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>;

/// One value of a batch row, as it is bound.
enum BatchValue<'a> {
    Text(&'a str),
    Int(i64),
    Bool(bool),
    Null,
}

/// A row of a batch insert: its values in its columns' order.
trait BatchRow: serde::Serialize {
    fn values(&self) -> Vec<BatchValue<'_>>;
}

/// The statements that insert `rows` into `table` (none for no rows),
/// skipping those whose `conflict` column is taken: one JSON parameter
/// where the dialect reads rows from JSON, else rows bound value by value,
/// up to the largest of [`BOUND_BATCH_ROWS`] per statement. (SQLite's JSON
/// functions cost several times the insert itself: each column read
/// re-parses its row.)
fn batch_inserts<'q, DB, R>(
    table: &str,
    columns: &[(&str, &str)],
    conflict: &str,
    rows: &'q [R],
) -> Result<Vec<Statement<'q, DB>>, StoreError>
where
    DB: Dialect,
    R: BatchRow,
    &'q str: Encode<'q, DB> + Type<DB>,
    String: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
    bool: Encode<'q, DB> + Type<DB>,
    Option<&'q str>: Encode<'q, DB> + Type<DB>,
{
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let insert = format!("INSERT INTO {table} ({})", column_names(columns));
    let on_conflict = format!("ON CONFLICT ({conflict}) DO NOTHING");
    let largest = BOUND_BATCH_ROWS[BOUND_BATCH_ROWS.len() - 1];
    // The dialect says once, for any size, which way it takes a batch.
    if DB::select_bound_rows(columns, 1).is_none() {
        let json = serde_json::to_string(rows).map_err(|e| StoreError::Other(e.into()))?;
        let sql = format!("{insert} {} {on_conflict}", DB::select_json_rows(columns));
        return Ok(vec![sqlx::query(AssertSqlSafe(sql)).bind(json)]);
    }
    let mut statements = Vec::new();
    for chunk in rows.chunks(largest) {
        let size = BOUND_BATCH_ROWS
            .into_iter()
            .find(|&n| n >= chunk.len())
            .unwrap_or(largest);
        let select = DB::select_bound_rows(columns, size).unwrap_or_default();
        let mut statement = sqlx::query(AssertSqlSafe(format!("{insert} {select} {on_conflict}")));
        let padding = (chunk.len()..size).flat_map(|_| columns.iter().map(|_| BatchValue::Null));
        for value in chunk.iter().flat_map(BatchRow::values).chain(padding) {
            statement = match value {
                BatchValue::Text(text) => statement.bind(text),
                BatchValue::Int(n) => statement.bind(n),
                BatchValue::Bool(b) => statement.bind(b),
                BatchValue::Null => statement.bind(None::<&str>),
            };
        }
        statements.push(statement);
    }
    Ok(statements)
}

/// One record as a row of [`RECORD_COLUMNS`] in a batch ([`batch_inserts`]:
/// an object of the JSON parameter on PostgreSQL, bound values on SQLite).
#[derive(serde::Serialize)]
struct RecordRow<'a> {
    id: String,
    request_id: &'a str,
    subject: &'a str,
    language_title: &'a str,
    version: i64,
    /// RFC 3339, as the drivers write a timestamp (microseconds at most,
    /// truncated, as PostgreSQL keeps them; SQLite's in whole seconds).
    started_at: String,
    duration_ms: i64,
    outcome: &'a str,
    cached: bool,
    cold_start: bool,
    parent_id: Option<String>,
}

impl<'a> RecordRow<'a> {
    fn new<DB: Dialect>(r: &'a ExecutionRecord) -> Self {
        let t = DB::timestamp(r.started_at);
        let t = t.replace_nanosecond(t.nanosecond() / 1000 * 1000).unwrap_or(t);
        RecordRow {
            id: r.id.to_string(),
            request_id: &r.request_id,
            subject: &r.subject,
            language_title: &r.language_title,
            version: r.version,
            started_at: t
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            duration_ms: r.duration_ms,
            outcome: &r.outcome,
            cached: r.cached,
            cold_start: r.cold_start,
            parent_id: r.parent_id.map(|p| p.to_string()),
        }
    }
}

impl BatchRow for RecordRow<'_> {
    fn values(&self) -> Vec<BatchValue<'_>> {
        use BatchValue::*;
        // RECORD_COLUMNS' order.
        vec![
            Text(&self.id),
            Text(self.request_id),
            Text(self.subject),
            Text(self.language_title),
            Int(self.version),
            Text(&self.started_at),
            Int(self.duration_ms),
            Text(self.outcome),
            Bool(self.cached),
            Bool(self.cold_start),
            self.parent_id.as_deref().map_or(Null, Text),
        ]
    }
}

/// One record's logs as a row of [`LOG_COLUMNS`] (records whose function
/// wrote nothing have none).
#[derive(serde::Serialize)]
struct LogRow<'a> {
    execution_id: String,
    request_id: &'a str,
    subject: &'a str,
    language_title: &'a str,
    created_ms: i64,
    lines: String,
    bytes: i64,
    dropped_bytes: i64,
}

impl<'a> LogRow<'a> {
    fn new(r: &'a ExecutionRecord) -> Option<Self> {
        let logs = r.logs.as_deref()?;
        Some(LogRow {
            execution_id: r.id.to_string(),
            request_id: &r.request_id,
            subject: &r.subject,
            language_title: &r.language_title,
            created_ms: (r.started_at.unix_timestamp_nanos() / 1_000_000) as i64,
            lines: encode_lines(&logs.lines),
            bytes: logs.bytes as i64,
            dropped_bytes: logs.dropped_bytes as i64,
        })
    }
}

impl BatchRow for LogRow<'_> {
    fn values(&self) -> Vec<BatchValue<'_>> {
        use BatchValue::*;
        // LOG_COLUMNS' order.
        vec![
            Text(&self.execution_id),
            Text(self.request_id),
            Text(self.subject),
            Text(self.language_title),
            Int(self.created_ms),
            Text(&self.lines),
            Int(self.bytes),
            Int(self.dropped_bytes),
        ]
    }
}

fn encode_lines(lines: &[LogLine]) -> String {
    let rows: Vec<(i64, &str, &str)> = lines
        .iter()
        .map(|l| (l.ts_ms, l.stream.as_str(), l.text.as_str()))
        .collect();
    serde_json::to_string(&rows).unwrap_or_else(|_| "[]".into())
}

fn decode_lines(column: &str) -> Vec<LogLine> {
    let rows: Vec<(i64, Stream, String)> = serde_json::from_str(column).unwrap_or_default();
    rows.into_iter()
        .map(|(ts_ms, stream, text)| LogLine { ts_ms, stream, text })
        .collect()
}

/// An `execution_logs` row as read.
#[derive(Debug, sqlx::FromRow)]
pub struct LogsRow {
    execution_id: String,
    request_id: String,
    subject: String,
    language_title: String,
    created_ms: i64,
    lines: String,
    bytes: i64,
    dropped_bytes: i64,
}

impl From<LogsRow> for StoredLogs {
    fn from(r: LogsRow) -> Self {
        StoredLogs {
            execution_id: r.execution_id,
            request_id: r.request_id,
            subject: r.subject,
            language_title: r.language_title,
            created_ms: r.created_ms,
            captured: std::sync::Arc::new(Captured {
                lines: decode_lines(&r.lines),
                bytes: r.bytes as usize,
                dropped_bytes: r.dropped_bytes as usize,
            }),
        }
    }
}

const LOGS_COLUMNS: &str = "execution_id, request_id, subject, language_title, created_ms, lines, bytes, dropped_bytes";

#[async_trait]
impl<DB> LogStore for SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'r> LogsRow: FromRow<'r, DB::Row>,
    for<'r> ExecutionRow: FromRow<'r, DB::Row>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    DB::QueryResult: RowsAffected,
{
    async fn logs_of(&self, id: &str) -> Result<Vec<StoredLogs>, StoreError> {
        let sql = format!(
            "SELECT {LOGS_COLUMNS} FROM execution_logs WHERE execution_id = $1 OR request_id = $1 \
             ORDER BY created_ms, execution_id"
        );
        let rows: Vec<LogsRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(StoredLogs::from).collect())
    }

    async fn execution(&self, id: Uuid) -> Result<Option<ExecutionRecord>, StoreError> {
        let row: Option<ExecutionRow> = sqlx::query_as(
            "SELECT id, request_id, subject, language_title, version, started_at, duration_ms, outcome, cached, cold_start, parent_id \
             FROM executions WHERE id = $1",
        )
        .bind(ExecutionId(id))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(ExecutionRecord::from))
    }

    async fn function_logs(&self, language_title: &str, limit: i64) -> Result<Vec<StoredLogs>, StoreError> {
        let sql = format!(
            "SELECT {LOGS_COLUMNS} FROM execution_logs WHERE language_title = $1 \
             ORDER BY created_ms DESC, execution_id DESC LIMIT $2"
        );
        let mut rows: Vec<LogsRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(language_title)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.reverse();
        Ok(rows.into_iter().map(StoredLogs::from).collect())
    }

    async fn purge_logs(&self, before_ms: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM execution_logs WHERE created_ms < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(done.rows())
    }
}

/// An `executions` row as read ([`ExecutionRecord`] is the core's, so the
/// row is read into this and converted).
#[derive(Debug, FromRow)]
pub struct ExecutionRow {
    #[sqlx(try_from = "ExecutionId")]
    id: Uuid,
    request_id: String,
    subject: String,
    language_title: String,
    version: i64,
    started_at: OffsetDateTime,
    duration_ms: i64,
    outcome: String,
    cached: bool,
    cold_start: bool,
    parent_id: Option<String>,
}

impl From<ExecutionRow> for ExecutionRecord {
    fn from(r: ExecutionRow) -> Self {
        ExecutionRecord {
            id: r.id,
            request_id: r.request_id,
            subject: r.subject,
            language_title: r.language_title,
            version: r.version,
            started_at: r.started_at,
            duration_ms: r.duration_ms,
            outcome: r.outcome,
            cached: r.cached,
            cold_start: r.cold_start,
            parent_id: r.parent_id.and_then(|p| p.parse().ok()),
            logs: None,
        }
    }
}

#[async_trait]
impl<DB> StoreHealth for SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        DB::KIND
    }
}

/// An execution id as the database keeps it ([`Dialect::Uuid`]);
/// [`ExecutionRow`] reads its `id` through this.
#[derive(Debug, Clone, Copy)]
pub struct ExecutionId(pub Uuid);

impl From<ExecutionId> for Uuid {
    fn from(id: ExecutionId) -> Uuid {
        id.0
    }
}

impl<DB: Dialect> Type<DB> for ExecutionId {
    fn type_info() -> DB::TypeInfo {
        <DB::Uuid as Type<DB>>::type_info()
    }

    fn compatible(ty: &DB::TypeInfo) -> bool {
        <DB::Uuid as Type<DB>>::compatible(ty)
    }
}

impl<'q, DB: Dialect> Encode<'q, DB> for ExecutionId {
    fn encode_by_ref(&self, buf: &mut DB::ArgumentBuffer) -> Result<IsNull, BoxDynError> {
        DB::Uuid::from(self.0).encode(buf)
    }
}

impl<'r, DB: Dialect> Decode<'r, DB> for ExecutionId {
    fn decode(value: DB::ValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(ExecutionId(DB::Uuid::decode(value)?.into()))
    }
}

/// Every column of `async_executions`, as [`QueuedExecution`] reads them.
const QUEUED_COLUMNS: &str = "id, subject, language_title, version, params, context, timeout_ms, priority, status, \
     idempotency_key, cache, max_attempts, backoff_ms, retry_runtime_errors, attempt, attempts, result, error, \
     cold_start, cancel_requested, created_ms, started_ms, finished_ms, run_after_ms, lease_owner, lease_until_ms, \
     callback_url, callback_status, callback_attempts, callback_next_ms, delivery_id, callback_error, steps";

/// Set with a final state: its callback (if it has a URL) is due at `$n`,
/// as delivery `$n+1`.
fn callback_due(n: usize) -> String {
    format!(
        "callback_status = CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END, \
         callback_attempts = 0, callback_next_ms = ${n}, delivery_id = ${}, callback_error = NULL",
        n + 1
    )
}

#[async_trait]
impl<DB> ExecutionQueue for SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'r> QueuedExecution: FromRow<'r, DB::Row>,
    for<'r> (i32, i64): FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (bool,): FromRow<'r, DB::Row>,
    for<'r> (String, i64): FromRow<'r, DB::Row>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'q> i32: Encode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
    for<'q> Value: Encode<'q, DB> + Type<DB>,
    for<'q> Option<Value>: Encode<'q, DB> + Type<DB>,
    DB::QueryResult: RowsAffected,
{
    async fn submit(&self, new: NewExecution, since_ms: i64) -> Result<(QueuedExecution, bool), StoreError> {
        // Its idempotency key is read before the insert.
        let mut tx = self.pool.begin_with(DB::BEGIN_READ_THEN_WRITE).await?;
        if let Some(key) = &new.idempotency_key {
            let sql =
                format!("SELECT {QUEUED_COLUMNS} FROM async_executions WHERE subject = $1 AND idempotency_key = $2");
            let found: Option<QueuedExecution> = sqlx::query_as(AssertSqlSafe(sql))
                .bind(new.subject.as_str())
                .bind(key.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            match found {
                Some(first) if first.created_ms >= since_ms => return Ok((first, false)),
                // Past its window: the key is free again.
                Some(old) => {
                    sqlx::query("UPDATE async_executions SET idempotency_key = NULL WHERE id = $1")
                        .bind(old.id.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                None => {}
            }
        }
        lock_owner::<DB>(&mut tx, "pending", &new.subject).await?;
        // Only while the subject has fewer pending than it may: one
        // statement, so SQLite counts under the write lock it takes. The
        // count stops at the cap (the subject's pending index, read no
        // further than it), so a long queue costs a submit no more.
        let sql = format!(
            "INSERT INTO async_executions ({QUEUED_COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $14, $7, 'pending', $8, $16, $9, \
             $10, $11, 0, $12, NULL, NULL, FALSE, FALSE, $13, NULL, NULL, $13, NULL, NULL, $15, NULL, 0, NULL, NULL, NULL, NULL \
             WHERE (SELECT COUNT(*) FROM (SELECT 1 FROM async_executions WHERE subject = $2 AND status = 'pending' \
             LIMIT $17) AS pending) < $17 \
             ON CONFLICT DO NOTHING RETURNING {QUEUED_COLUMNS}"
        );
        let inserted: Option<QueuedExecution> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(new.id.as_str())
            .bind(new.subject.as_str())
            .bind(new.language_title.as_str())
            .bind(new.version)
            .bind(&new.params)
            .bind(&new.context)
            .bind(new.priority)
            .bind(new.idempotency_key.as_deref())
            .bind(new.max_attempts)
            .bind(new.backoff_ms)
            .bind(new.retry_runtime_errors)
            .bind(Value::Array(Vec::new()))
            .bind(new.now_ms)
            .bind(new.timeout_ms)
            .bind(new.callback_url.as_deref())
            .bind(new.cache.as_deref())
            .bind(new.max_pending)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        match inserted {
            Some(row) => Ok((row, true)),
            None if new.idempotency_key.is_none() => Err(StoreError::TooManyPending { max: new.max_pending }),
            // The same key, submitted at the same moment by the same
            // subject; else the subject's pending ones are at their cap.
            None => {
                let sql = format!(
                    "SELECT {QUEUED_COLUMNS} FROM async_executions WHERE subject = $1 AND idempotency_key = $2"
                );
                let first: Option<QueuedExecution> = sqlx::query_as(AssertSqlSafe(sql))
                    .bind(new.subject.as_str())
                    .bind(new.idempotency_key.as_deref())
                    .fetch_optional(&self.pool)
                    .await?;
                first
                    .map(|first| (first, false))
                    .ok_or(StoreError::TooManyPending { max: new.max_pending })
            }
        }
    }

    async fn get(&self, id: &str) -> Result<Option<QueuedExecution>, StoreError> {
        let sql = format!("SELECT {QUEUED_COLUMNS} FROM async_executions WHERE id = $1");
        Ok(sqlx::query_as(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn list(&self, subject: &str, filter: &ExecutionFilter) -> Result<(Vec<QueuedExecution>, i64), StoreError> {
        const MATCH: &str =
            "WHERE subject = $1 AND ($2 IS NULL OR status = $2) AND ($3 IS NULL OR language_title = $3)";
        let sql = format!(
            "SELECT {QUEUED_COLUMNS} FROM async_executions {MATCH} ORDER BY created_ms DESC, id LIMIT $4 OFFSET $5"
        );
        let rows: Vec<QueuedExecution> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(subject)
            .bind(filter.status.as_deref())
            .bind(filter.language_title.as_deref())
            .bind(filter.limit)
            .bind(filter.offset)
            .fetch_all(&self.pool)
            .await?;
        let (total,): (i64,) = sqlx::query_as(AssertSqlSafe(format!("SELECT COUNT(*) FROM async_executions {MATCH}")))
            .bind(subject)
            .bind(filter.status.as_deref())
            .bind(filter.language_title.as_deref())
            .fetch_one(&self.pool)
            .await?;
        Ok((rows, total))
    }

    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<QueuedExecution>, StoreError> {
        // Running under a live lease: what counts against the caps.
        let sql = format!(
            "UPDATE async_executions SET status = 'running', lease_owner = $1, lease_until_ms = $2, \
             attempt = attempt + 1, started_ms = COALESCE(started_ms, $3) \
             WHERE id IN (SELECT id FROM async_executions \
               WHERE ((status = 'pending' AND run_after_ms <= $3) OR (status = 'running' AND lease_until_ms < $3)) \
               AND subject NOT IN (SELECT subject FROM async_executions \
                 WHERE status = 'running' AND lease_until_ms >= $3 GROUP BY subject HAVING COUNT(*) >= $4) \
               AND language_title NOT IN (SELECT language_title FROM async_executions \
                 WHERE status = 'running' AND lease_until_ms >= $3 GROUP BY language_title HAVING COUNT(*) >= $5) \
               ORDER BY priority DESC, run_after_ms, created_ms LIMIT 1{}) \
             RETURNING {QUEUED_COLUMNS}",
            DB::SKIP_LOCKED
        );
        Ok(sqlx::query_as(AssertSqlSafe(sql))
            .bind(claim.owner)
            .bind(claim.lease_until_ms)
            .bind(claim.now_ms)
            .bind(claim.per_subject)
            .bind(claim.per_function)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn set_steps(&self, id: &str, owner: &str, steps: &Value) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE async_executions SET steps = $3 WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
        )
        .bind(id)
        .bind(owner)
        .bind(steps)
        .execute(&self.pool)
        .await?;
        Ok(done.rows() == 1)
    }

    async fn renew(&self, id: &str, owner: &str, until_ms: i64) -> Result<Option<bool>, StoreError> {
        let row: Option<(bool,)> = sqlx::query_as(
            "UPDATE async_executions SET lease_until_ms = $3 \
             WHERE id = $1 AND lease_owner = $2 AND status = 'running' RETURNING cancel_requested",
        )
        .bind(id)
        .bind(owner)
        .bind(until_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(cancel,)| cancel))
    }

    async fn finish(&self, id: &str, owner: &str, f: &Finish) -> Result<bool, StoreError> {
        let last = f.status != "pending";
        let sql = format!(
            "UPDATE async_executions SET status = $3, attempts = $4, result = $5, error = $6, \
             cold_start = (cold_start OR $7), run_after_ms = $8, finished_ms = $9, attempt = attempt - $10, \
             lease_owner = NULL, lease_until_ms = NULL{} \
             WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
            if last {
                format!(", {}", callback_due(11))
            } else {
                String::new()
            }
        );
        let mut query = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .bind(owner)
            .bind(f.status)
            .bind(&f.attempts)
            .bind(f.result.clone())
            .bind(f.error.clone())
            .bind(f.cold_start)
            .bind(f.run_after_ms)
            .bind(f.finished_ms)
            .bind(i32::from(f.uncount));
        if last {
            query = query
                .bind(f.finished_ms.unwrap_or_default())
                .bind(f.delivery_id.as_deref().unwrap_or(id));
        }
        let done = query.execute(&self.pool).await?;
        Ok(done.rows() == 1)
    }

    async fn cancel(&self, id: &str, subject: &str, now_ms: i64) -> Result<Option<QueuedExecution>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "UPDATE async_executions SET status = 'cancelled', finished_ms = $3, cancel_requested = TRUE, \
             error = $4, {} WHERE id = $1 AND subject = $2 AND status = 'pending'",
            callback_due(5)
        );
        let cancelled = serde_json::json!({
            "code": "CANCELLED", "message": "the execution was cancelled by its owner", "details": {},
        });
        let delivery = uuid::Uuid::new_v4().to_string();
        let pending = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .bind(subject)
            .bind(now_ms)
            .bind(cancelled)
            .bind(now_ms)
            .bind(delivery.as_str())
            .execute(&mut *tx)
            .await?;
        if pending.rows() == 0 {
            sqlx::query(
                "UPDATE async_executions SET cancel_requested = TRUE \
                 WHERE id = $1 AND subject = $2 AND status = 'running'",
            )
            .bind(id)
            .bind(subject)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(self.get(id).await?.filter(|e| e.subject == subject))
    }

    async fn requeue(
        &self,
        id: &str,
        subject: &str,
        now_ms: i64,
        attempts: &Value,
    ) -> Result<Option<bool>, StoreError> {
        let done = sqlx::query(
            "UPDATE async_executions SET status = 'pending', attempt = 0, result = NULL, error = NULL, \
             finished_ms = NULL, run_after_ms = $3, cancel_requested = FALSE, attempts = $4, steps = NULL \
             WHERE id = $1 AND subject = $2 AND status IN ('failed', 'cancelled')",
        )
        .bind(id)
        .bind(subject)
        .bind(now_ms)
        .bind(attempts)
        .execute(&self.pool)
        .await?;
        if done.rows() == 1 {
            return Ok(Some(true));
        }
        Ok(self.get(id).await?.filter(|e| e.subject == subject).map(|_| false))
    }

    async fn purge_finished(&self, before_ms: i64, limit: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM async_executions WHERE id IN \
             (SELECT id FROM async_executions WHERE finished_ms < $1 \
              AND status IN ('completed', 'failed', 'cancelled') \
              AND (callback_status IS NULL OR callback_status <> 'pending') \
              ORDER BY finished_ms LIMIT $2)",
        )
        .bind(before_ms)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows())
    }

    async fn expire_leases(&self) -> Result<u64, StoreError> {
        let done = sqlx::query("UPDATE async_executions SET lease_until_ms = 0 WHERE status = 'running'")
            .execute(&self.pool)
            .await?;
        Ok(done.rows())
    }

    async fn pending_by_priority(&self) -> Result<Vec<(i32, i64)>, StoreError> {
        Ok(
            sqlx::query_as(
                "SELECT priority, COUNT(*) FROM async_executions WHERE status = 'pending' GROUP BY priority",
            )
            .fetch_all(&self.pool)
            .await?,
        )
    }

    async fn claim_callback(&self, now_ms: i64, hold_until_ms: i64) -> Result<Option<QueuedExecution>, StoreError> {
        let sql = format!(
            "UPDATE async_executions SET callback_next_ms = $2, callback_attempts = callback_attempts + 1 \
             WHERE id IN (SELECT id FROM async_executions \
               WHERE callback_status = 'pending' AND callback_next_ms <= $1 \
               ORDER BY callback_next_ms LIMIT 1{}) \
             RETURNING {QUEUED_COLUMNS}",
            DB::SKIP_LOCKED
        );
        Ok(sqlx::query_as(AssertSqlSafe(sql))
            .bind(now_ms)
            .bind(hold_until_ms)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn callback_done(
        &self,
        id: &str,
        delivery_id: &str,
        status: &str,
        next_ms: i64,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE async_executions SET callback_status = $3, callback_next_ms = $4, callback_error = $5 \
             WHERE id = $1 AND delivery_id = $2 AND callback_status = 'pending'",
        )
        .bind(id)
        .bind(delivery_id)
        .bind(status)
        .bind(next_ms)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(done.rows() == 1)
    }

    async fn signing_secret(&self, subject: &str, candidate: &str, now_ms: i64) -> Result<(String, i64), StoreError> {
        sqlx::query(
            "INSERT INTO signing_secrets (subject, secret, created_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (subject) DO NOTHING",
        )
        .bind(subject)
        .bind(candidate)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        let row: (String, i64) = sqlx::query_as("SELECT secret, created_ms FROM signing_secrets WHERE subject = $1")
            .bind(subject)
            .fetch_one(&self.pool)
            .await?;
        Ok(row)
    }

    async fn rotate_signing_secret(&self, subject: &str, secret: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO signing_secrets (subject, secret, created_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (subject) DO UPDATE SET secret = $2, created_ms = $3",
        )
        .bind(subject)
        .bind(secret)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Every column of `files`, as [`StoredFile`] reads them.
const FILE_COLUMNS: &str = "id, owner, name, size, content_type, sha256, created_ms, expires_ms";

#[async_trait]
impl<DB> FileRecords for SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'r> StoredFile: FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    DB::QueryResult: RowsAffected,
{
    async fn insert_file(&self, file: &StoredFile, quota: Option<i64>) -> Result<bool, StoreError> {
        let sql = match quota {
            None => format!("INSERT INTO files ({FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"),
            // One statement: SQLite takes its write lock before it reads the sum.
            Some(_) => format!(
                "INSERT INTO files ({FILE_COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
                 WHERE (SELECT COALESCE(SUM(size), 0) FROM files WHERE owner = $2 AND expires_ms > $7) + $4 <= $9"
            ),
        };
        let mut tx = self.pool.begin().await?;
        if quota.is_some() {
            lock_owner::<DB>(&mut tx, "files", &file.owner).await?;
        }
        let inserted = sqlx::query(AssertSqlSafe(sql))
            .bind(file.id.as_str())
            .bind(file.owner.as_str())
            .bind(file.name.as_str())
            .bind(file.size)
            .bind(file.content_type.as_str())
            .bind(file.sha256.as_str())
            .bind(file.created_ms)
            .bind(file.expires_ms)
            .bind(quota.unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(inserted.rows() == 1)
    }

    async fn file_bytes(&self, owner: &str, now_ms: i64) -> Result<i64, StoreError> {
        let (bytes,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM files WHERE owner = $1 AND expires_ms > $2",
        )
        .bind(owner)
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(bytes)
    }

    async fn file(&self, id: &str) -> Result<Option<StoredFile>, StoreError> {
        let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE id = $1");
        Ok(sqlx::query_as(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn delete_file(&self, id: &str, owner: &str) -> Result<Option<StoredFile>, StoreError> {
        let sql = format!("DELETE FROM files WHERE id = $1 AND owner = $2 RETURNING {FILE_COLUMNS}");
        Ok(sqlx::query_as(AssertSqlSafe(sql))
            .bind(id)
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn blob_refs(&self, sha256: &str) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM files WHERE sha256 = $1")
            .bind(sha256)
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    async fn purge_files(&self, now_ms: i64, limit: i64) -> Result<Vec<StoredFile>, StoreError> {
        let sql = format!(
            "DELETE FROM files WHERE id IN (SELECT id FROM files WHERE expires_ms <= $1 ORDER BY expires_ms LIMIT $2) \
             RETURNING {FILE_COLUMNS}"
        );
        Ok(sqlx::query_as(AssertSqlSafe(sql))
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }
}

/// How many rows a statement changed, for either driver.
pub trait RowsAffected {
    fn rows(&self) -> u64;
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

impl RowsAffected for sqlx::postgres::PgQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_selects_a_batch_from_one_json_parameter() {
        assert_eq!(
            <sqlx::Postgres as Dialect>::select_json_rows(&[("id", "uuid"), ("n", "bigint")]),
            "SELECT id, n FROM jsonb_to_recordset($1::jsonb) AS r(id uuid, n bigint)"
        );
        assert_eq!(
            <sqlx::Postgres as Dialect>::select_bound_rows(&[("id", "uuid")], 2),
            None
        );
    }

    #[test]
    fn sqlite_binds_a_batch_value_by_value_and_leaves_the_padding_out() {
        assert_eq!(
            <sqlx::Sqlite as Dialect>::select_bound_rows(&[("id", "uuid"), ("n", "bigint")], 2).as_deref(),
            Some("SELECT * FROM (VALUES (?, ?), (?, ?)) WHERE column1 IS NOT NULL")
        );
    }
}
