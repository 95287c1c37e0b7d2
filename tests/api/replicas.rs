//! Several controllers sharing Redis (REDIS_URL): the L2 result cache.
//!
//! Redis comes from `TEST_REDIS_URL`. Without it these tests say that they
//! skipped, except under `CI=true`, where they fail.

use serde_json::json;

use crate::helpers::{TestApp, spawn_app_with};

/// The shared Redis, or `None` (skipped) outside CI.
pub fn redis_url() -> Option<String> {
    match std::env::var("TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but TEST_REDIS_URL is not set"
            );
            eprintln!("skipped: set TEST_REDIS_URL=redis://127.0.0.1:6379/ to run the Redis tests");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_result_computed_on_one_controller_is_a_cache_hit_on_another() {
    let Some(redis) = redis_url() else { return };
    let a = spawn_app_with(&["--redis-url", &redis]).await;
    let b = spawn_app_with(&["--redis-url", &redis]).await;
    // Fresh operands: the shared Redis outlives test runs.
    let n = rand_u32();
    let params = json!({"operation": "add", "values": [n, 1]});
    let token = a.admin();

    let on_a = a
        .session(&token, "python-calculator", json!({"retain_session": true}))
        .await;
    let first = a.execute(&token, &on_a, params.clone()).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.body["cached"], false);

    let on_b = b
        .session(&token, "python-calculator", json!({"retain_session": true}))
        .await;
    let second = b.execute(&token, &on_b, params).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(second.body["cached"], true, "B did not find A's result in Redis");
    assert_eq!(second.body["result"]["value"], u64::from(n) + 1);

    let health = b.get(None, "/health").await;
    assert_eq!(health.body["components"]["redis"], "ok");
    assert_eq!(health.body["components"]["rate_limits"], "shared");
    let metrics = b.metrics().await;
    assert!(
        metrics.contains(r#"lambda_cache_requests_total{layer="l2",result="hit"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_unreachable_executions_still_succeed_and_health_says_degraded() {
    // Nothing listens on this port: Redis is "down" from the start.
    let a = spawn_app_with(&["--redis-url", "redis://127.0.0.1:1/"]).await;
    let token = a.admin();
    let id = a
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let params = json!({"operation": "multiply", "values": [6, 7]});
    let r = a.execute(&token, &id, params.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["value"], 42);
    // L1 still serves.
    assert_eq!(a.execute(&token, &id, params).await.body["cached"], true);
    let health = a.get(None, "/health").await;
    assert_eq!(health.body["components"]["redis"], "degraded");
    assert_eq!(health.body["status"], "degraded");
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_controllers_on_one_redis_enforce_one_rate_limit_together() {
    let Some(redis) = redis_url() else { return };
    let flags = ["--redis-url", redis.as_str(), "--rate-limit-functions", "4"];
    let a = spawn_app_with(&flags).await;
    let b = spawn_app_with(&flags).await;
    // A subject of its own: the shared Redis outlives test runs.
    let sub = format!("limits-{}", rand_u32());
    let token = a.token(&sub, &["read:functions"]);
    let mut statuses = Vec::new();
    for i in 0..6 {
        let app = if i % 2 == 0 { &a } else { &b };
        statuses.push(app.get(Some(&token), "/api/v1/functions").await.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    // Another subject is unaffected.
    let other = a.token(&format!("{sub}-other"), &["read:functions"]);
    assert_eq!(b.get(Some(&other), "/api/v1/functions").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_initialized_on_one_controller_executes_on_another_with_a_recreated_instance() {
    let Some(redis) = redis_url() else { return };
    let a = spawn_app_with(&["--redis-url", &redis]).await;
    let b = spawn_app_with(&["--redis-url", &redis]).await;
    let token = a.admin();
    let id = a
        .session(&token, "nodejs-counter", json!({"retain_session": true}))
        .await;
    let on_a = a
        .execute_with(&token, &id, json!({"params": {}}), Some("no-cache"))
        .await;
    assert_eq!(on_a.body["result"]["count"], 1);
    assert!(on_a.body.get("instance_recreated").is_none());

    // B reads the session from Redis but cannot reach A's instance.
    let status = b.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
    assert_eq!(status.status, 200, "{:?}", status.body);
    assert_eq!(status.body["execution_count"], 1);
    let on_b = b
        .execute_with(&token, &id, json!({"params": {}}), Some("no-cache"))
        .await;
    assert_eq!(on_b.status, 200, "{:?}", on_b.body);
    assert_eq!(on_b.body["result"]["count"], 1, "B specialised its own instance");
    assert_eq!(on_b.body["instance_recreated"], true);
    let again = b
        .execute_with(&token, &id, json!({"params": {}}), Some("no-cache"))
        .await;
    assert_eq!(again.body["result"]["count"], 2);
    assert!(again.body.get("instance_recreated").is_none());

    // Another subject cannot see it from either controller.
    let eve = a.token("eve", &["execute:all"]);
    assert_eq!(b.get(Some(&eve), &format!("/api/v1/sessions/{id}")).await.status, 404);
    // Ending it on B ends it on A too.
    let del = b
        .client
        .delete(b.url(&format!("/api/v1/sessions/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    assert_eq!(a.get(Some(&token), &format!("/api/v1/sessions/{id}")).await.status, 404);
}

/// A fresh database on the `TEST_DATABASE_URL` server, dropped on drop.
pub struct TestDatabase {
    pub url: String,
    server: String,
    name: String,
}

impl TestDatabase {
    pub fn create() -> Option<TestDatabase> {
        let server = match std::env::var("TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => url,
            _ => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true but TEST_DATABASE_URL is not set"
                );
                eprintln!("skipped: set TEST_DATABASE_URL=postgres://... to run the PostgreSQL tests");
                return None;
            }
        };
        let name = format!("e2e_{}", rand_u32());
        psql(&server, &format!("CREATE DATABASE {name}"));
        let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
        Some(TestDatabase {
            url: format!("{base}/{name}"),
            server,
            name,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        psql(
            &self.server,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(url: &str, sql: &str) {
    let out = std::process::Command::new("psql")
        .args([url, "-q", "-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PostgreSQL database of their own (dropped with it, after the
/// controllers when bound first) and two controllers sharing it and Redis,
/// or `None` (skipped) outside CI.
async fn two_replicas() -> Option<(TestDatabase, TestApp, TestApp)> {
    let (Some(redis), Some(db)) = (redis_url(), TestDatabase::create()) else {
        return None;
    };
    let flags = ["--redis-url", redis.as_str(), "--database-url", db.url.as_str()];
    let a = spawn_app_with(&flags).await;
    let b = spawn_app_with(&flags).await;
    Some((db, a, b))
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_sharing_postgres_and_redis_serve_each_others_functions_and_sessions() {
    let Some((_db, a, b)) = two_replicas().await else {
        return;
    };
    let token = a.admin();

    // Registered through A, at once runnable through B.
    a.register(
        "nodejs-shared",
        "module.exports.handler = async (p) => ({ twice: p.n * 2 });",
        json!({}),
    )
    .await;
    let id = b
        .session(&token, "nodejs-shared", json!({"retain_session": true}))
        .await;
    let r = b.execute(&token, &id, json!({"n": 21})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["twice"], 42);
    // The session made on B runs on A too.
    let r = a.execute(&token, &id, json!({"n": 4})).await;
    assert_eq!(r.body["result"]["twice"], 8, "{:?}", r.body);

    let health = a.get(None, "/health").await;
    assert_eq!(health.body["components"]["postgres"], "ok");
    assert_eq!(health.body["components"]["sqlite"], "disabled");
    assert_eq!(health.body["components"]["redis"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_url_naming_a_database_that_does_not_exist_yet_is_created_at_start_up() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    // Arrange: the server is there, the database is not.
    psql(&db.server, &format!("DROP DATABASE {}", db.name));

    // Act
    let app = spawn_app_with(&["--database-url", db.url.as_str()]).await;

    // Assert: it starts on PostgreSQL and keeps what is registered there.
    let health = app.get(None, "/health").await;
    assert_eq!(health.body["components"]["postgres"], "ok", "{:?}", health.body);
    app.register("nodejs-first", "module.exports.handler = async () => 1;", json!({}))
        .await;
    let listed = app.get(Some(&app.admin()), "/api/v1/functions/nodejs-first").await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retained_session_deleted_on_another_controller_is_gone_where_its_instance_was() {
    let Some(redis) = redis_url() else { return };
    let a = spawn_app_with(&["--redis-url", &redis]).await;
    let b = spawn_app_with(&["--redis-url", &redis]).await;
    // A memory cap of its own tells its instance from the pool's.
    a.register(
        "nodejs-kept",
        "let n = 0; module.exports.handler = () => ({ count: ++n });",
        json!({"cache": {"enabled": false}, "limits": {"memory_mb": 128}}),
    )
    .await;
    let token = a.token(&format!("closer-{}", rand_u32()), &["execute:all"]);
    let id = a.session(&token, "nodejs-kept", json!({"retain_session": true})).await;
    for n in 1..=2 {
        let ran = a.execute(&token, &id, json!({})).await;
        assert_eq!(ran.status, 200, "{:?}", ran.body);
        assert_eq!(ran.body["result"]["count"], n);
    }
    assert_eq!(crate::sessions::instances_capped_at(&a, 128).len(), 1);

    // B deletes it; A, which keeps its record and its instance, finds it gone.
    assert_eq!(crate::sessions::delete(&b, Some(&token), &id).await.status, 204);
    let after = a.execute(&token, &id, json!({})).await;
    assert_eq!((after.status, after.code()), (404, "NOT_FOUND"), "{:?}", after.body);
    assert!(
        crate::helpers::eventually(std::time::Duration::from_secs(10), || {
            crate::sessions::instances_capped_at(&a, 128).is_empty()
        })
        .await,
        "the deleted session's instance is still running"
    );
    assert_eq!(a.get(Some(&token), &format!("/api/v1/sessions/{id}")).await.status, 404);

    // A session B initialized: A reads it once, keeps it, and finds it gone too.
    b.register(
        "nodejs-kept",
        "module.exports.handler = () => ({ ok: true });",
        json!({}),
    )
    .await;
    let from_b = b.session(&token, "nodejs-kept", json!({"retain_session": true})).await;
    for _ in 0..2 {
        let ran = a.execute(&token, &from_b, json!({})).await;
        assert_eq!(ran.status, 200, "{:?}", ran.body);
    }
    assert_eq!(crate::sessions::delete(&b, Some(&token), &from_b).await.status, 204);
    let after = a.execute(&token, &from_b, json!({})).await;
    assert_eq!((after.status, after.code()), (404, "NOT_FOUND"), "{:?}", after.body);
}

/// A function deleted and registered again through one replica (version
/// 1 again, other code) is what the other replica runs once it catches up,
/// not the deleted code it had loaded (same name, same version number).
#[tokio::test(flavor = "multi_thread")]
async fn a_function_registered_again_through_one_replica_replaces_the_deleted_code_on_the_other() {
    let Some((_db, a, b)) = two_replicas().await else {
        return;
    };
    let token = a.admin();
    let first = "module.exports.handler = async () => ({ life: 'first' });";
    // A memory cap of its own tells the first life's instances apart.
    let manifest = json!({"cache": {"enabled": false}, "limits": {"memory_mb": 128}});
    a.register("nodejs-twice", first, manifest).await;
    // What B runs (a 404 while it has forgotten the deleted function and
    // not yet loaded the new one is fine).
    let run_on_b = || async {
        let started = b.initialize(&token, "nodejs-twice", json!({})).await;
        match started.body["request_id"].as_str() {
            Some(id) => b.execute(&token, id, json!({})).await.body["result"]["life"].clone(),
            None => started.body,
        }
    };
    assert_eq!(run_on_b().await, "first");
    assert_eq!(crate::sessions::instances_capped_at(&b, 128).len(), 1, "idle on B");

    // Act: through A, deleted and registered again with other code.
    let path = "/api/v1/functions/nodejs-twice";
    let deleted = a.client.delete(a.url(path)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    let second = "module.exports.handler = async () => ({ life: 'second' });";
    let created = a
        .register("nodejs-twice", second, json!({"cache": {"enabled": false}}))
        .await;
    assert_eq!(created.body["version"], 1, "{:?}", created.body);

    // Assert: B catches up (it refreshes every few seconds) and runs the
    // second life.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let life = run_on_b().await;
        if life == "second" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B still runs the deleted code: {life:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // The first life's instance, idle on B, was stopped when B caught up
    // (not kept until the keep-warm period ends).
    assert!(
        crate::helpers::eventually(std::time::Duration::from_secs(10), || {
            crate::sessions::instances_capped_at(&b, 128).is_empty()
        })
        .await,
        "B keeps the deleted function's instance"
    );
}

/// An older version deleted through a replica that has not caught up with a
/// newer version registered through the other: the delete weighs the
/// store's current version, not the stale one it knew, and goes through.
#[tokio::test(flavor = "multi_thread")]
async fn an_older_version_is_deleted_through_a_replica_behind_on_the_current_one() {
    let Some((_db, a, b)) = two_replicas().await else {
        return;
    };
    let token = a.admin();
    let code = |n: u32| json!({"description": "d", "code": format!("module.exports.handler = () => ({{ n: {n} }});")});
    a.register("nodejs-behind", "module.exports.handler = () => ({ n: 1 });", json!({}))
        .await;
    assert_eq!(
        crate::functions::put_function(&a, &token, "nodejs-behind", code(2))
            .await
            .status,
        200
    );
    // Version 3 through B: A still knows version 2 as the current one.
    assert_eq!(
        crate::functions::put_function(&b, &token, "nodejs-behind", code(3))
            .await
            .status,
        200
    );

    // Act
    let path = "/api/v1/functions/nodejs-behind/versions/1";
    let deleted = crate::functions::call(&a, reqwest::Method::DELETE, path, &token, None).await;

    // Assert
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    let listed = crate::functions::call(
        &b,
        reqwest::Method::GET,
        "/api/v1/functions/nodejs-behind/versions",
        &token,
        None,
    )
    .await;
    let numbers: Vec<i64> = listed.body["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, [3, 2], "{:?}", listed.body);
}
