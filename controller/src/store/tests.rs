//! One set of assertions, run against the stores of every database.
//!
//! PostgreSQL comes from `TEST_DATABASE_URL` or `DATABASE_URL` (a server
//! URL; each test creates and drops a database of its own). Without one, the
//! PostgreSQL half is skipped with a message, except under `CI=true`, where
//! it fails.

use serde_json::json;

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::{ExecutionRecord, NewVersion, Source, StoreError, Stores};

fn new(lt: &str, code: &str) -> NewVersion {
    NewVersion {
        language_title: lt.into(),
        language: "nodejs".into(),
        title: lt.trim_start_matches("nodejs-").into(),
        description: format!("description of {code}"),
        manifest: json!({"entrypoint": "index.js", "nested": {"b": 2, "a": [1, 2]}}),
        code: code.into(),
        code_hash: format!("hash-{code}"),
    }
}

/// The assertions every database's stores must pass.
async fn exercise(stores: Stores) {
    stores.health.ping().await.unwrap();
    let store = stores.functions;
    assert!(store.functions().await.unwrap().is_empty());

    let f = store.create(new("nodejs-a", "v1"), Source::Api).await.unwrap();
    assert_eq!(f.current.version, 1);
    assert_eq!(f.source, Source::Api);
    assert_eq!(f.current.manifest["nested"]["a"], json!([1, 2]));
    assert!(matches!(
        store.create(new("nodejs-a", "again"), Source::Api).await,
        Err(StoreError::Conflict)
    ));

    let f2 = store.add_version(new("nodejs-a", "v2"), Source::Bundled).await.unwrap();
    assert_eq!(f2.current.version, 2);
    assert_eq!(f2.current.code, "v2");
    assert_eq!(f2.source, Source::Bundled);
    assert_eq!(f2.created_at, f.created_at);
    assert!(f2.updated_at >= f.updated_at);
    let v1 = store.version("nodejs-a", 1).await.unwrap().unwrap();
    assert_eq!((v1.code.as_str(), v1.code_hash.as_str()), ("v1", "hash-v1"));
    assert!(store.version("nodejs-a", 3).await.unwrap().is_none());
    assert!(matches!(
        store.add_version(new("nodejs-b", "x"), Source::Api).await,
        Err(StoreError::NotFound)
    ));

    assert_eq!(store.function("nodejs-a").await.unwrap().unwrap().current.code, "v2");
    assert!(store.function("nodejs-zzz").await.unwrap().is_none());
    store.create(new("nodejs-0", "first"), Source::Api).await.unwrap();
    let mut versions = store.current_versions().await.unwrap();
    versions.sort();
    assert_eq!(versions, [("nodejs-0".to_string(), 1), ("nodejs-a".to_string(), 2)]);
    let all = store.functions().await.unwrap();
    let names: Vec<_> = all.iter().map(|f| f.language_title.as_str()).collect();
    assert_eq!(names, ["nodejs-0", "nodejs-a"], "sorted by Language-Title");
    assert_eq!(all[1].current.version, 2, "listed with the current version");

    assert!(store.delete("nodejs-a").await.unwrap());
    assert!(!store.delete("nodejs-a").await.unwrap());
    assert!(store.version("nodejs-a", 1).await.unwrap().is_none());
    let again = store.create(new("nodejs-a", "reborn"), Source::Api).await.unwrap();
    assert_eq!(again.current.version, 1);

    let record = |outcome: &str, cached: bool| ExecutionRecord {
        id: uuid::Uuid::new_v4(),
        request_id: "session-1".into(),
        subject: "alice".into(),
        language_title: "nodejs-a".into(),
        version: 1,
        started_at: crate::timefmt::now(),
        duration_ms: 12,
        outcome: outcome.into(),
        cached,
        cold_start: !cached,
    };
    let store = stores.executions;
    let batch = vec![record("success", false), record("cache_hit", true)];
    store.record_executions(&batch).await.unwrap();
    // A retried batch does not duplicate rows.
    store.record_executions(&batch).await.unwrap();
    let stored = store.executions_of("session-1").await.unwrap();
    assert_eq!(stored.len(), 2);
    let first = stored.iter().find(|r| r.id == batch[0].id).unwrap();
    assert_eq!(first.outcome, "success");
    assert_eq!(first.subject, "alice");
    assert_eq!(first.started_at, batch[0].started_at);
    assert!(first.cold_start && !first.cached);
    assert!(store.executions_of("session-2").await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_store_passes_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
    exercise(Stores::of(store)).await;
}

#[tokio::test]
async fn postgres_store_passes_the_store_suite() {
    let Some(db) = TestDatabase::create().await else { return };
    let store = PostgresStore::connect(&db.url).await.unwrap();
    exercise(Stores::of(store)).await;
    db.drop().await;
}

/// A fresh database on the test server, dropped at the end.
pub(crate) struct TestDatabase {
    pub(crate) url: String,
    server: String,
    name: String,
}

impl TestDatabase {
    pub(crate) async fn create() -> Option<TestDatabase> {
        use sqlx::Connection;
        let server = std::env::var("TEST_DATABASE_URL")
            .or_else(|_| std::env::var("DATABASE_URL"))
            .ok()
            .filter(|u| u.starts_with("postgres"));
        let Some(server) = server else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but neither TEST_DATABASE_URL nor DATABASE_URL names a PostgreSQL server"
            );
            eprintln!("skipped: set TEST_DATABASE_URL=postgres://... to run the PostgreSQL store tests");
            return None;
        };
        let mut conn = match sqlx::PgConnection::connect(&server).await {
            Ok(c) => c,
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipped: PostgreSQL at {server} is unreachable: {e}");
                return None;
            }
            Err(e) => panic!("CI=true and PostgreSQL at {server} is unreachable: {e}"),
        };
        let name = format!("store_test_{}", hex::encode(rand::random::<[u8; 6]>()));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let url = with_database(&server, &name);
        Some(TestDatabase { url, server, name })
    }

    pub(crate) async fn drop(self) {
        use sqlx::Connection;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.server).await {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut conn)
            .await;
        }
    }
}

/// `server` with its database path replaced by `name`.
fn with_database(server: &str, name: &str) -> String {
    let (base, query) = server.split_once('?').map_or((server, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..].find('/').map_or(base.len(), |i| scheme_end + i);
    let mut url = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}
