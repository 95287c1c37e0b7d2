//! `/api/v1/functions/{language_title}/versions`: listing a function's
//! versions, and deleting an older one to make room in a quota.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::functions::{call, put_function};
use crate::helpers::{TestApp, sample, spawn_app, spawn_app_with};

/// Node code of about `size` bytes whose handler answers `n`.
fn node_code(n: u32, size: usize) -> String {
    format!(
        "// {}\nmodule.exports.handler = async () => ({{ n: {n} }});\n",
        "x".repeat(size)
    )
}

async fn versions_of(app: &TestApp, token: &str, lt: &str) -> Value {
    let listed = call(
        app,
        Method::GET,
        &format!("/api/v1/functions/{lt}/versions"),
        token,
        None,
    )
    .await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    listed.body
}

fn numbers(list: &Value) -> Vec<i64> {
    list["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("no versions in {list}"))
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_owner_over_its_quota_makes_room_by_deleting_an_older_version() {
    // Arrange: 1 MiB a subject; two versions of 400 KB fill it.
    let app = spawn_app_with(&["--functions-quota-mb", "1"]).await;
    let alice = app.token("alice", &["read:functions", "write:functions", "execute:all"]);
    let body = |n: u32| json!({"language_title": "nodejs-roomy", "description": "big", "code": node_code(n, 400_000)});
    let created = call(&app, Method::POST, "/api/v1/functions", &alice, Some(body(1))).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(put_function(&app, &alice, "nodejs-roomy", body(2)).await.status, 200);
    let full = put_function(&app, &alice, "nodejs-roomy", body(3)).await;
    assert_eq!(full.status, 413, "{:?}", full.body);
    let message = full.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("/versions/"),
        "the refusal does not say how to make room: {message}"
    );
    let listed = versions_of(&app, &alice, "nodejs-roomy").await;
    assert_eq!(numbers(&listed), [2, 1], "{listed}");
    assert_eq!(
        (listed["current_version"].clone(), listed["total"].clone()),
        (json!(2), json!(2))
    );
    assert_eq!(listed["versions"][0]["current"], true);
    assert_eq!(listed["versions"][1]["current"], false);
    assert!(
        listed["versions"][1]["size_bytes"].as_i64().unwrap() > 400_000,
        "{listed}"
    );

    // Act: version 1 goes.
    let deleted = call(
        &app,
        Method::DELETE,
        "/api/v1/functions/nodejs-roomy/versions/1",
        &alice,
        None,
    )
    .await;

    // Assert: the third version fits now, and runs.
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    let third = put_function(&app, &alice, "nodejs-roomy", body(3)).await;
    assert_eq!(third.status, 200, "{:?}", third.body);
    assert_eq!(third.body["version"], 3);
    assert_eq!(numbers(&versions_of(&app, &alice, "nodejs-roomy").await), [3, 2]);
    let id = app.session(&alice, "nodejs-roomy", json!({})).await;
    let ran = app.execute(&alice, &id, json!({})).await;
    assert_eq!(ran.body["result"], json!({"n": 3}), "{:?}", ran.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_versions_sessions_end_and_let_go_of_their_instances() {
    // Arrange: a retained session holds an instance of version 1; version 2 is current.
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-pinned", &node_code(1, 10), json!({})).await;
    let pinned = app
        .session(&token, "nodejs-pinned", json!({"retain_session": true}))
        .await;
    let first = app.execute(&token, &pinned, json!({})).await;
    assert_eq!(first.body["result"], json!({"n": 1}), "{:?}", first.body);
    let v2 = json!({"description": "d", "code": node_code(2, 10)});
    assert_eq!(put_function(&app, &token, "nodejs-pinned", v2).await.status, 200);
    let busy = |metrics: &str| sample(metrics, "lambda_instances_busy").unwrap_or(0.0);
    assert_eq!(busy(&app.metrics().await), 1.0, "the session holds no instance");

    // Act
    let path = "/api/v1/functions/nodejs-pinned/versions/1";
    let deleted = call(&app, Method::DELETE, path, &token, None).await;

    // Assert: the session is gone and so is its instance; version 2 runs.
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    let again = app
        .execute_with(&token, &pinned, json!({"params": {}}), Some("no-cache"))
        .await;
    assert_eq!((again.status, again.code()), (404, "NOT_FOUND"), "{:?}", again.body);
    let mut metrics = app.metrics().await;
    for _ in 0..100 {
        if busy(&metrics) == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = app.metrics().await;
    }
    assert_eq!(
        busy(&metrics),
        0.0,
        "the deleted version's session still holds its instance: {metrics}"
    );
    let id = app.session(&token, "nodejs-pinned", json!({})).await;
    let ran = app.execute(&token, &id, json!({})).await;
    assert_eq!(ran.body["result"], json!({"n": 2}), "{:?}", ran.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_an_older_version_is_deleted_and_only_by_the_functions_manager() {
    // Arrange: alice's function at version 2.
    let app = spawn_app().await;
    let alice = app.token("alice", &["read:functions", "write:functions"]);
    let bob = app.token("bob", &["read:functions", "write:functions"]);
    let reader = app.token("alice", &["read:functions"]);
    let body = |n: u32| json!({"language_title": "nodejs-kept", "description": "d", "code": node_code(n, 10)});
    assert_eq!(
        call(&app, Method::POST, "/api/v1/functions", &alice, Some(body(1)))
            .await
            .status,
        201
    );
    assert_eq!(put_function(&app, &alice, "nodejs-kept", body(2)).await.status, 200);
    let delete = async |token: &str, path: &str| call(&app, Method::DELETE, path, token, None).await;

    // Act and assert: each refused with its reason.
    let cases = [
        (
            &alice,
            "/api/v1/functions/nodejs-kept/versions/2",
            409,
            "CONFLICT",
            "current version",
        ),
        (
            &bob,
            "/api/v1/functions/nodejs-kept/versions/1",
            403,
            "FORBIDDEN",
            "another subject",
        ),
        (
            &reader,
            "/api/v1/functions/nodejs-kept/versions/1",
            403,
            "FORBIDDEN",
            "write:functions",
        ),
        (
            &alice,
            "/api/v1/functions/nodejs-kept/versions/7",
            404,
            "NOT_FOUND",
            "no version 7",
        ),
        (
            &alice,
            "/api/v1/functions/nodejs-kept/versions/0",
            400,
            "INVALID_REQUEST",
            "positive integer",
        ),
        (
            &alice,
            "/api/v1/functions/nodejs-kept/versions/one",
            400,
            "INVALID_REQUEST",
            "positive integer",
        ),
        (
            &alice,
            "/api/v1/functions/nodejs-gone/versions/1",
            404,
            "NOT_FOUND",
            "not found",
        ),
        (
            &alice,
            "/api/v1/functions/calculator/versions/1",
            400,
            "INVALID_REQUEST",
            "Language-Title",
        ),
    ];
    for (token, path, status, code, says) in cases {
        let refused = delete(token, path).await;
        assert_eq!(
            (refused.status, refused.code()),
            (status, code),
            "{path}: {:?}",
            refused.body
        );
        let message = refused.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{path}: {message}");
    }
    // A bundled function's older versions are an operator's.
    let bundled = delete(&alice, "/api/v1/functions/nodejs-calculator/versions/1").await;
    assert_eq!(bundled.status, 403, "{:?}", bundled.body);

    // Nothing was deleted; the listing pages.
    let listed = versions_of(&app, &reader, "nodejs-kept").await;
    assert_eq!(numbers(&listed), [2, 1], "{listed}");
    let page = call(
        &app,
        Method::GET,
        "/api/v1/functions/nodejs-kept/versions?page=2&per_page=1",
        &bob,
        None,
    )
    .await;
    assert_eq!(numbers(&page.body), [1], "{:?}", page.body);
    assert_eq!(
        (page.body["total"].clone(), page.body["page"].clone()),
        (json!(2), json!(2))
    );
    let missing = call(&app, Method::GET, "/api/v1/functions/nodejs-gone/versions", &bob, None).await;
    assert_eq!(
        (missing.status, missing.code()),
        (404, "NOT_FOUND"),
        "{:?}",
        missing.body
    );
    let bad = call(
        &app,
        Method::GET,
        "/api/v1/functions/nodejs-kept/versions?per_page=0",
        &bob,
        None,
    )
    .await;
    assert_eq!((bad.status, bad.code()), (400, "INVALID_REQUEST"), "{:?}", bad.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_execution_of_a_deleted_version_fails_saying_so() {
    // Arrange: one worker, busy with a slow run; behind it, a run of
    // nodejs-queued pinned to its version 1.
    let app = spawn_app_with(&["--execution-workers", "1"]).await;
    let token = app.admin();
    let slow = "module.exports.handler = async (p) => { await new Promise((r) => setTimeout(r, p.ms)); return {}; };\n";
    app.register("nodejs-slow", slow, json!({})).await;
    app.register("nodejs-queued", &node_code(1, 10), json!({})).await;
    let submit = async |body: Value| {
        let submitted = crate::executions::submit(&app, &token, body, None).await;
        assert_eq!(submitted.status, 202, "{:?}", submitted.body);
        submitted.body["execution_id"].as_str().unwrap().to_owned()
    };
    let blocker = submit(json!({"language_title": "nodejs-slow", "params": {"ms": 3000}})).await;
    let long = Duration::from_secs(30);
    crate::executions::wait_until(&app, &token, &blocker, long, |e| e["status"] == "running").await;
    let queued = submit(json!({"language_title": "nodejs-queued", "params": {}})).await;

    // Act: version 2 comes and version 1 goes while it waits.
    let v2 = json!({"description": "d", "code": node_code(2, 10)});
    assert_eq!(put_function(&app, &token, "nodejs-queued", v2).await.status, 200);
    let path = "/api/v1/functions/nodejs-queued/versions/1";
    let deleted = call(&app, Method::DELETE, path, &token, None).await;
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);

    // Assert: when its turn comes it fails, naming the version.
    let waiting = app.get(Some(&token), &format!("/api/v1/executions/{queued}")).await;
    assert_eq!(
        waiting.body["status"], "pending",
        "it ran before the delete: {:?}",
        waiting.body
    );
    let done = crate::executions::wait_until(&app, &token, &queued, long, |e| {
        e["status"] != "pending" && e["status"] != "running"
    })
    .await;
    assert_eq!(done["status"], "failed", "{done:?}");
    assert_eq!(done["error"]["code"], "NOT_FOUND", "{done:?}");
    let message = done["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("version 1 no longer exists"), "{message}");
}
