//! PostgreSQL: production, chosen when `DATABASE_URL` is a `postgres://`
//! URL. Same tables as SQLite (migrations/postgres) and the same queries
//! (`sql.rs`); here are its [`Dialect`] and how it connects.

use sqlx::Postgres;
use sqlx::postgres::PgPoolOptions;

use super::sql::{Dialect, SqlStore};

pub type PostgresStore = SqlStore<Postgres>;

impl Dialect for Postgres {
    const KIND: &'static str = "postgres";
    /// Timestamps keep microseconds here, so ties are rare; there is no
    /// insertion order to fall back on.
    const TIE_BREAK: &'static str = "id";
    const ID_TEXT: &'static str = "id::text";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    /// Under READ COMMITTED two inserts would each sum the rows without
    /// the other's: a lock per owner, held to the commit.
    const OWNER_LOCK: Option<&'static str> = Some("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))");
    /// A native `UUID` column.
    type Uuid = uuid::Uuid;
}

impl SqlStore<Postgres> {
    /// Connects and applies the migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await?;
        sqlx::migrate!("../migrations/postgres").run(&pool).await?;
        Ok(SqlStore::new(pool.clone(), pool))
    }
}
