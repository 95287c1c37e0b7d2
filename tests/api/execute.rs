use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_walkthrough_adds_and_then_answers_from_the_cache() {
    let app = spawn_app().await;
    let token = app.token("alice", &["execute:all", "read:functions"]);
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;

    let first = app
        .execute(&token, &id, json!({"operation": "add", "values": [1, 2, 3]}))
        .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.body["request_id"], id.as_str());
    assert_eq!(first.body["language_title"], "nodejs-calculator");
    assert_eq!(first.body["cached"], false);
    assert_eq!(first.body["result"], json!({"value": 6}));
    assert!(first.body["execution_time"].is_u64());

    let second = app
        .execute(&token, &id, json!({"operation": "add", "values": [1, 2, 3]}))
        .await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body["cached"], true);
    assert_eq!(second.body["result"], json!({"value": 6}));
}

#[tokio::test(flavor = "multi_thread")]
async fn python_calculator_computes_every_operation() {
    let app = spawn_app().await;
    let token = app.admin();
    let id = app
        .session(&token, "python-calculator", json!({"retain_session": true}))
        .await;
    for (op, values, expected) in [
        ("add", json!([1, 2, 3]), json!(6)),
        ("subtract", json!([10, 2, 3]), json!(5)),
        ("multiply", json!([2, 3, 4]), json!(24)),
        ("divide", json!([10, 4]), json!(2.5)),
    ] {
        let r = app
            .execute(&token, &id, json!({"operation": op, "values": values}))
            .await;
        assert_eq!(r.status, 200, "{op}: {:?}", r.body);
        assert_eq!(r.body["result"]["value"], expected, "{op}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retained_session_keeps_in_memory_state_between_executions() {
    let app = spawn_app().await;
    let token = app.admin();
    for lt in ["nodejs-counter", "python-counter"] {
        let id = app.session(&token, lt, json!({"retain_session": true})).await;
        for expected in 1..=3 {
            let r = app
                .execute_with(&token, &id, json!({"params": {}}), Some("no-cache"))
                .await;
            assert_eq!(r.status, 200, "{lt}: {:?}", r.body);
            assert_eq!(r.body["result"]["count"], expected, "{lt}");
        }
        // Another session gets its own instance and starts from zero.
        let other = app.session(&token, lt, json!({"retain_session": true})).await;
        let r = app
            .execute_with(&token, &other, json!({"params": {}}), Some("no-cache"))
            .await;
        assert_eq!(r.body["result"]["count"], 1, "{lt} state leaked between sessions");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thrown_error_is_a_runtime_error_with_line_column_and_stack() {
    let app = spawn_app().await;
    let token = app.admin();
    for (lt, line) in [("nodejs-error", 8), ("python-error", 20)] {
        let id = app.session(&token, lt, json!({"retain_session": true})).await;
        let r = app.execute(&token, &id, json!({})).await;
        assert_eq!(r.status, 500, "{lt}: {:?}", r.body);
        assert_eq!(r.body["request_id"], id.as_str());
        assert_eq!(r.code(), "RUNTIME_ERROR");
        let details = &r.body["error"]["details"];
        assert_eq!(details["line"], line, "{lt}: {details}");
        assert!(details["column"].as_u64().unwrap() > 0);
        let stack = details["stack_trace"].as_str().unwrap();
        assert!(
            stack.contains(&format!(":{line}")) || stack.contains(&format!("line {line}")),
            "{stack}"
        );
        assert!(
            !stack.contains(app.data_dir.path().to_str().unwrap()),
            "host path leaked: {stack}"
        );
        // The instance survives its function's error.
        let again = app.execute(&token, &id, json!({"message": "on purpose"})).await;
        assert_eq!(again.status, 500);
        assert_eq!(again.body["error"]["message"], "on purpose");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn division_by_zero_is_invalid_params_and_is_not_cached() {
    let app = spawn_app().await;
    let token = app.admin();
    for lt in ["nodejs-calculator", "python-calculator"] {
        let id = app.session(&token, lt, json!({"retain_session": true})).await;
        for _ in 0..2 {
            let r = app
                .execute(&token, &id, json!({"operation": "divide", "values": [1, 0]}))
                .await;
            assert_eq!(r.status, 400, "{lt}: {:?}", r.body);
            assert_eq!(r.code(), "INVALID_PARAMS");
            assert!(r.body["error"]["message"].as_str().unwrap().contains("zero"));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn params_are_checked_against_the_schema_before_the_function_runs() {
    params_refused_by_the_schema_run_nothing_and_count_nothing(&spawn_app().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn params_refused_by_the_schema_count_nothing_on_sessions_in_redis() {
    let Some(redis) = crate::replicas::redis_url() else {
        return;
    };
    params_refused_by_the_schema_run_nothing_and_count_nothing(&spawn_app_with(&["--redis-url", &redis]).await).await;
}

/// A retained session counts what ran (its count is kept while the
/// function runs), never what its schema refused.
async fn params_refused_by_the_schema_run_nothing_and_count_nothing(app: &crate::helpers::TestApp) {
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let count = || async {
        let s = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
        assert_eq!(s.status, 200, "{:?}", s.body);
        s.body["execution_count"].as_u64().unwrap()
    };
    for params in [
        json!({"operation": "power", "values": [1]}),
        json!({"operation": "add"}),
        json!({"operation": "add", "values": ["1"]}),
    ] {
        let r = app.execute(&token, &id, params.clone()).await;
        assert_eq!(r.status, 400, "{params}: {:?}", r.body);
        assert_eq!(r.code(), "INVALID_PARAMS");
        assert!(!r.body["error"]["details"]["errors"].as_array().unwrap().is_empty());
    }
    assert_eq!(count().await, 0, "nothing ran");
    // The session is still usable.
    let r = app
        .execute(&token, &id, json!({"operation": "multiply", "values": [2, 3]}))
        .await;
    assert_eq!(r.body["result"]["value"], 6);
    assert_eq!(count().await, 1);
    // Refused by the function itself: it ran, so it counts.
    let r = app
        .execute(&token, &id, json!({"operation": "divide", "values": [1, 0]}))
        .await;
    assert_eq!(r.code(), "INVALID_PARAMS", "{:?}", r.body);
    assert_eq!(count().await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_execute_bodies_are_400_in_the_contract_shape() {
    let app = spawn_app().await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let url = app.url(&format!("/api/v1/execute/{id}"));
    for (body, content_type) in [
        ("{not json", "application/json"),
        ("{\"params\": 5}", "application/json"),
        ("{\"params\": [1, 2]}", "application/json"),
        ("{}", "application/json"),
        ("{\"params\": {}}", "text/plain"),
        // A context belongs to initialize: here it would be ignored.
        (
            "{\"params\": {}, \"context\": {\"user_id\": \"u\"}}",
            "application/json",
        ),
    ] {
        let r = app
            .client
            .post(&url)
            .bearer_auth(&token)
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let r = crate::helpers::read(r).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert_eq!(r.code(), "INVALID_REQUEST", "{body}");
        assert_eq!(r.body["request_id"], id.as_str());
        assert!(r.body["error"]["message"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_shot_session_serves_one_execution() {
    let app = spawn_app().await;
    let token = app.admin();
    let id = app.session(&token, "nodejs-calculator", json!({})).await;
    let r = app
        .execute(&token, &id, json!({"operation": "add", "values": [4, 4]}))
        .await;
    assert_eq!(r.status, 200);
    let again = app
        .execute(&token, &id, json!({"operation": "add", "values": [4, 4]}))
        .await;
    assert_eq!(again.status, 404, "{:?}", again.body);
    assert_eq!(again.code(), "NOT_FOUND");
    let s = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
    assert_eq!(s.body["status"], "completed");
    assert_eq!(s.body["execution_count"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answered_execution_is_recorded_durably() {
    let app = spawn_app().await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let params = json!({"operation": "add", "values": [2, 2]});
    assert_eq!(app.execute(&token, &id, params.clone()).await.status, 200);
    assert_eq!(app.execute(&token, &id, params).await.body["cached"], true);
    assert_eq!(
        app.execute(&token, &id, json!({"operation": "divide", "values": [1, 0]}))
            .await
            .status,
        400
    );

    // The records are written off the request path; a clean stop flushes them.
    let db = app.data_dir.path().join("controller.db");
    let app = app.restart().await;
    let rows = std::process::Command::new("python3")
        .args(["-c", "import sqlite3,sys,json; c=sqlite3.connect(sys.argv[1]); print(json.dumps(c.execute('select subject, language_title, version, outcome, cached from executions where request_id=? order by rowid', (sys.argv[2],)).fetchall()))"])
        .arg(&db)
        .arg(&id)
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&rows.stdout).unwrap_or_default();
    assert_eq!(
        rows,
        json!([
            ["alice", "nodejs-calculator", 1, "success", 0],
            ["alice", "nodejs-calculator", 1, "cache_hit", 1],
            ["alice", "nodejs-calculator", 1, "invalid_params", 0]
        ])
    );
    drop(app);
}
