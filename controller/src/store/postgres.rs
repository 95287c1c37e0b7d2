//! The PostgreSQL store: production, chosen when `DATABASE_URL` is a
//! `postgres://` URL. Same tables as SQLite (migrations/postgres).

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use time::OffsetDateTime;

use super::{
    ExecutionRecord, ExecutionStore, FunctionStore, NewVersion, Source, StoreError, StoreHealth, StoredFunction,
    StoredVersion,
};
use crate::timefmt;

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects and applies the migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await?;
        sqlx::migrate!("../migrations/postgres").run(&pool).await?;
        Ok(PostgresStore { pool })
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

fn version_from_row(row: &PgRow, created_col: &str) -> Result<StoredVersion, StoreError> {
    Ok(StoredVersion {
        language_title: row.try_get("language_title")?,
        version: row.try_get("version")?,
        manifest: row.try_get("manifest")?,
        code: row.try_get("code")?,
        code_hash: row.try_get("code_hash")?,
        created_at: row.try_get(created_col)?,
    })
}

fn function_from_row(row: &PgRow) -> Result<StoredFunction, StoreError> {
    let source: String = row.try_get("source")?;
    Ok(StoredFunction {
        language_title: row.try_get("language_title")?,
        source: Source::parse(&source),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        current: version_from_row(row, "version_created_at")?,
    })
}

impl PostgresStore {
    async fn load(&self, language_title: &str) -> Result<StoredFunction, StoreError> {
        let row = sqlx::query(concat!(select_function!(), " WHERE f.language_title = $1"))
            .bind(language_title)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        function_from_row(&row)
    }
}

async fn insert_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    new: &NewVersion,
    version: i64,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO function_versions (language_title, version, manifest, code, code_hash, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&new.language_title)
    .bind(version)
    .bind(&new.manifest)
    .bind(&new.code)
    .bind(&new.code_hash)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl FunctionStore for PostgresStore {
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
             FROM function_versions WHERE language_title = $1 AND version = $2",
        )
        .bind(language_title)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| version_from_row(&r, "created_at")).transpose()
    }

    async fn create(&self, new: NewVersion, source: Source) -> Result<StoredFunction, StoreError> {
        let now = timefmt::now();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO functions (language_title, language, title, description, source, current_version, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, 1, $6, $6) ON CONFLICT (language_title) DO NOTHING",
        )
        .bind(&new.language_title)
        .bind(&new.language)
        .bind(&new.title)
        .bind(&new.description)
        .bind(source.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict);
        }
        insert_version(&mut tx, &new, 1, now).await?;
        tx.commit().await?;
        self.load(&new.language_title).await
    }

    async fn add_version(&self, new: NewVersion, source: Source) -> Result<StoredFunction, StoreError> {
        let now = timefmt::now();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE functions SET current_version = current_version + 1, description = $1, source = $2, updated_at = $3 \
             WHERE language_title = $4 RETURNING current_version",
        )
        .bind(&new.description)
        .bind(source.as_str())
        .bind(now)
        .bind(&new.language_title)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        let version: i64 = row.try_get("current_version")?;
        insert_version(&mut tx, &new, version, now).await?;
        tx.commit().await?;
        self.load(&new.language_title).await
    }

    async fn delete(&self, language_title: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM functions WHERE language_title = $1")
            .bind(language_title)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM function_versions WHERE language_title = $1")
            .bind(language_title)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted > 0)
    }
}

#[async_trait]
impl ExecutionStore for PostgresStore {
    async fn record_executions(&self, records: &[ExecutionRecord]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for r in records {
            sqlx::query(
                "INSERT INTO executions (id, request_id, subject, language_title, version, started_at, duration_ms, outcome, cached, cold_start) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING",
            )
            .bind(r.id)
            .bind(&r.request_id)
            .bind(&r.subject)
            .bind(&r.language_title)
            .bind(r.version)
            .bind(r.started_at)
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
             FROM executions WHERE request_id = $1 ORDER BY started_at, id",
        )
        .bind(request_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ExecutionRecord {
                    id: row.try_get("id")?,
                    request_id: row.try_get("request_id")?,
                    subject: row.try_get("subject")?,
                    language_title: row.try_get("language_title")?,
                    version: row.try_get("version")?,
                    started_at: row.try_get("started_at")?,
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
impl StoreHealth for PostgresStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}
