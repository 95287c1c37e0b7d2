//! The SQLite store: the embedded default, one file in the data dir.

use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow};

use super::{
    ExecutionRecord, ExecutionStore, FunctionStore, NewVersion, Source, StoreError, StoreHealth, StoredFunction,
    StoredVersion,
};
use crate::timefmt;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) `path` and applies the migrations.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("../migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
    }
}

/// A function joined with its current version; a macro so `concat!` keeps
/// every query a static string.
macro_rules! select_function {
    () => {
        "SELECT f.language_title, f.source, f.created_at, f.updated_at, \
     v.version, v.manifest, v.code, v.code_hash, v.created_at AS version_created_at \
     FROM functions f JOIN function_versions v \
     ON v.language_title = f.language_title AND v.version = f.current_version"
    };
}

fn time_col(row: &SqliteRow, col: &str) -> Result<time::OffsetDateTime, StoreError> {
    let s: String = row.try_get(col)?;
    timefmt::parse(&s).map_err(|e| StoreError::Other(anyhow::anyhow!("bad timestamp in {col}: {e}")))
}

fn version_from_row(row: &SqliteRow, created_col: &str) -> Result<StoredVersion, StoreError> {
    let manifest: String = row.try_get("manifest")?;
    Ok(StoredVersion {
        language_title: row.try_get("language_title")?,
        version: row.try_get("version")?,
        manifest: serde_json::from_str(&manifest).map_err(|e| StoreError::Other(e.into()))?,
        code: row.try_get("code")?,
        code_hash: row.try_get("code_hash")?,
        created_at: time_col(row, created_col)?,
    })
}

fn function_from_row(row: &SqliteRow) -> Result<StoredFunction, StoreError> {
    let source: String = row.try_get("source")?;
    Ok(StoredFunction {
        language_title: row.try_get("language_title")?,
        source: Source::parse(&source),
        created_at: time_col(row, "created_at")?,
        updated_at: time_col(row, "updated_at")?,
        current: version_from_row(row, "version_created_at")?,
    })
}

impl SqliteStore {
    async fn load(&self, language_title: &str) -> Result<StoredFunction, StoreError> {
        let row = sqlx::query(concat!(select_function!(), " WHERE f.language_title = ?"))
            .bind(language_title)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        function_from_row(&row)
    }
}

#[async_trait]
impl FunctionStore for SqliteStore {
    async fn functions(&self) -> Result<Vec<StoredFunction>, StoreError> {
        let rows = sqlx::query(concat!(select_function!(), " ORDER BY f.language_title"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(function_from_row).collect()
    }

    async fn function(&self, language_title: &str) -> Result<Option<StoredFunction>, StoreError> {
        match self.load(language_title).await {
            Ok(f) => Ok(Some(f)),
            Err(StoreError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn current_versions(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT language_title, current_version FROM functions")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("language_title")?, r.try_get("current_version")?)))
            .collect()
    }

    async fn version(&self, language_title: &str, version: i64) -> Result<Option<StoredVersion>, StoreError> {
        let row = sqlx::query(
            "SELECT language_title, version, manifest, code, code_hash, created_at \
             FROM function_versions WHERE language_title = ? AND version = ?",
        )
        .bind(language_title)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| version_from_row(&r, "created_at")).transpose()
    }

    async fn create(&self, new: NewVersion, source: Source) -> Result<StoredFunction, StoreError> {
        let now = timefmt::format(timefmt::now());
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO functions (language_title, language, title, description, source, current_version, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT (language_title) DO NOTHING",
        )
        .bind(&new.language_title)
        .bind(&new.language)
        .bind(&new.title)
        .bind(&new.description)
        .bind(source.as_str())
        .bind(&now)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict);
        }
        insert_version(&mut tx, &new, 1, &now).await?;
        tx.commit().await?;
        self.load(&new.language_title).await
    }

    async fn add_version(&self, new: NewVersion, source: Source) -> Result<StoredFunction, StoreError> {
        let now = timefmt::format(timefmt::now());
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE functions SET current_version = current_version + 1, description = ?, source = ?, updated_at = ? \
             WHERE language_title = ? RETURNING current_version",
        )
        .bind(&new.description)
        .bind(source.as_str())
        .bind(&now)
        .bind(&new.language_title)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        let version: i64 = row.try_get("current_version")?;
        insert_version(&mut tx, &new, version, &now).await?;
        tx.commit().await?;
        self.load(&new.language_title).await
    }

    async fn delete(&self, language_title: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM functions WHERE language_title = ?")
            .bind(language_title)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM function_versions WHERE language_title = ?")
            .bind(language_title)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted > 0)
    }
}

#[async_trait]
impl ExecutionStore for SqliteStore {
    async fn record_executions(&self, records: &[ExecutionRecord]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for r in records {
            sqlx::query(
                "INSERT INTO executions (id, request_id, subject, language_title, version, started_at, duration_ms, outcome, cached, cold_start) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            )
            .bind(r.id.to_string())
            .bind(&r.request_id)
            .bind(&r.subject)
            .bind(&r.language_title)
            .bind(r.version)
            .bind(timefmt::format(r.started_at))
            .bind(r.duration_ms)
            .bind(&r.outcome)
            .bind(r.cached)
            .bind(r.cold_start)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn executions_of(&self, request_id: &str) -> Result<Vec<ExecutionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, request_id, subject, language_title, version, started_at, duration_ms, outcome, cached, cold_start \
             FROM executions WHERE request_id = ? ORDER BY started_at, rowid",
        )
        .bind(request_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                Ok(ExecutionRecord {
                    id: id
                        .parse()
                        .map_err(|e| StoreError::Other(anyhow::anyhow!("bad execution id: {e}")))?,
                    request_id: row.try_get("request_id")?,
                    subject: row.try_get("subject")?,
                    language_title: row.try_get("language_title")?,
                    version: row.try_get("version")?,
                    started_at: time_col(row, "started_at")?,
                    duration_ms: row.try_get("duration_ms")?,
                    outcome: row.try_get("outcome")?,
                    cached: row.try_get("cached")?,
                    cold_start: row.try_get("cold_start")?,
                })
            })
            .collect()
    }
}

#[async_trait]
impl StoreHealth for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }
}

async fn insert_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    new: &NewVersion,
    version: i64,
    now: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO function_versions (language_title, version, manifest, code, code_hash, created_at) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&new.language_title)
    .bind(version)
    .bind(new.manifest.to_string())
    .bind(&new.code)
    .bind(&new.code_hash)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
