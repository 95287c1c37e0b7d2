//! Asynchronous executions through the API: submit and poll, priorities
//! across subjects, cancel (pending and running), idempotent resubmits,
//! retries of crashes and timeouts with every attempt recorded, the
//! dead-letter list and requeue, and nothing lost across a restart.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{Reply, TestApp, read, spawn_app_with};

/// Echoes, sleeps, or crashes until a given attempt.
const WORKER: &str = r#"import os
import time


def handler(params, context):
    execution = context.get("execution", {})
    mode = params.get("mode", "echo")
    if mode == "crash_until" and execution.get("attempt", 0) < params["attempt"]:
        os._exit(3)
    if mode == "sleep":
        time.sleep(params["seconds"])
    return {"n": params.get("n"), "execution": execution, "pid": os.getpid()}
"#;

const LT: &str = "python-async-worker";

async fn submit(app: &TestApp, token: &str, body: Value, key: Option<&str>) -> Reply {
    let mut req = app
        .client
        .post(app.url("/api/v1/executions"))
        .bearer_auth(token)
        .json(&body);
    if let Some(key) = key {
        req = req.header("Idempotency-Key", key);
    }
    read(req.send().await.unwrap()).await
}

async fn post(app: &TestApp, token: &str, path: &str) -> Reply {
    read(app.client.post(app.url(path)).bearer_auth(token).send().await.unwrap()).await
}

/// Polls an execution until `done` holds for it.
async fn wait_until(app: &TestApp, token: &str, id: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let r = app.get(Some(token), &format!("/api/v1/executions/{id}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        if done(&r.body) {
            return r.body;
        }
        assert!(
            started.elapsed() < timeout,
            "execution {id} never got there: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn finished(e: &Value) -> bool {
    matches!(e["status"].as_str(), Some("completed" | "failed" | "cancelled"))
}

async fn app_with_worker(extra: &[&str]) -> TestApp {
    let mut flags = vec!["--rate-limit-execute", "0"];
    flags.extend(extra);
    let app = spawn_app_with(&flags).await;
    app.register(LT, WORKER, json!({})).await;
    app
}

#[tokio::test(flavor = "multi_thread")]
async fn a_submission_answers_202_at_once_and_its_owner_polls_the_result() {
    // Arrange
    let app = app_with_worker(&[]).await;
    let alice = app.token("alice", &["execute:python"]);
    let bob = app.token("bob", &["execute:all"]);
    let reader = app.token("carol", &["read:functions"]);

    // Act
    let r = submit(
        &app,
        &alice,
        json!({"language_title": LT, "params": {"n": 7}, "context": {"tenant": "t1"}}),
        None,
    )
    .await;

    // Assert: 202 with where to look, then the result.
    assert_eq!(r.status, 202, "{:?}", r.body);
    let id = r.body["execution_id"].as_str().unwrap().to_owned();
    assert_eq!(r.body["status"], "pending");
    assert_eq!(r.headers["location"], format!("/api/v1/executions/{id}"));
    assert!(r.body["estimated_completion"].as_str().unwrap().ends_with('Z'));
    let done = wait_until(&app, &alice, &id, Duration::from_secs(30), finished).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["n"], 7);
    // The function sees its context and which execution and attempt it is.
    assert_eq!(done["result"]["execution"], json!({"id": id, "attempt": 1}));
    assert_eq!(done["progress"]["percentage"], 100.0);
    assert_eq!(done["steps"][0]["component_name"], LT);
    assert_eq!(done["steps"][0]["status"], "completed");
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(done["attempts"][0]["outcome"], "completed");
    assert!(done["queued_ms"].as_i64().unwrap() >= 0 && done["duration_ms"].as_i64().is_some());

    // Only its owner sees it; it is in the owner's list.
    assert_eq!(
        app.get(Some(&bob), &format!("/api/v1/executions/{id}")).await.status,
        404
    );
    let mine = app.get(Some(&alice), "/api/v1/executions?status=completed").await;
    assert_eq!(mine.body["total"], 1, "{:?}", mine.body);
    assert_eq!(mine.body["executions"][0]["execution_id"], id.as_str());
    assert_eq!(app.get(Some(&bob), "/api/v1/executions").await.body["total"], 0);

    // Checked before 202: an unknown function, a missing scope, bad input.
    let unknown = submit(
        &app,
        &alice,
        json!({"language_title": "python-nope", "params": {}}),
        None,
    )
    .await;
    assert_eq!(unknown.status, 404, "{:?}", unknown.body);
    let scope = submit(&app, &reader, json!({"language_title": LT, "params": {}}), None).await;
    assert_eq!(scope.status, 403, "{:?}", scope.body);
    let node = submit(
        &app,
        &alice,
        json!({"language_title": "nodejs-calculator", "params": {}}),
        None,
    )
    .await;
    assert_eq!(node.status, 403, "{:?}", node.body);
    for bad in [
        json!({"params": {}}),
        json!({"language_title": LT}),
        json!({"language_title": LT, "params": {}, "priority": "urgent"}),
        json!({"language_title": LT, "params": {}, "retry": {"max_attempts": 0}}),
        json!({"language_title": LT, "params": {}, "context": {"timeout_ms": 0}}),
        json!({"language_title": LT, "params": {}, "callback": "x"}),
    ] {
        let r = submit(&app, &alice, bad.clone(), None).await;
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
        assert_eq!(r.body["error"]["code"], "INVALID_REQUEST");
    }
    let status = app.get(Some(&alice), "/api/v1/executions?status=lost").await;
    assert_eq!(status.status, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_idempotency_key_returns_the_first_execution_and_never_runs_twice() {
    // Arrange
    let app = app_with_worker(&[]).await;
    let alice = app.token("alice", &["execute:all"]);
    let bob = app.token("bob", &["execute:all"]);
    let body = json!({"language_title": LT, "params": {"mode": "sleep", "seconds": 0.3}});

    // Act
    let first = submit(&app, &alice, body.clone(), Some("order-42")).await;
    let again = submit(&app, &alice, body.clone(), Some("order-42")).await;
    let bobs = submit(&app, &bob, body.clone(), Some("order-42")).await;

    // Assert
    assert_eq!(first.status, 202);
    assert_eq!(again.status, 202);
    assert_eq!(again.body["execution_id"], first.body["execution_id"]);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_ne!(
        bobs.body["execution_id"], first.body["execution_id"],
        "keys are per subject"
    );
    let id = first.body["execution_id"].as_str().unwrap();
    let done = wait_until(&app, &alice, id, Duration::from_secs(30), finished).await;
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1);
    let later = submit(&app, &alice, body, Some("order-42")).await;
    assert_eq!(later.body["execution_id"], id);
    assert_eq!(later.body["status"], "completed");
    assert_eq!(app.get(Some(&alice), "/api/v1/executions").await.body["total"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_is_retried_with_backoff_and_every_attempt_is_recorded() {
    // Arrange
    let app = app_with_worker(&[]).await;
    let token = app.token("alice", &["execute:all"]);

    // Act: crashes on attempts 1 and 2, answers on 3.
    let r = submit(
        &app,
        &token,
        json!({"language_title": LT, "params": {"mode": "crash_until", "attempt": 3}, "retry": {"backoff_ms": 200}}),
        None,
    )
    .await;
    let id = r.body["execution_id"].as_str().unwrap().to_owned();
    let done = wait_until(&app, &token, &id, Duration::from_secs(60), finished).await;

    // Assert
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["execution"]["attempt"], 3);
    let attempts = done["attempts"].as_array().unwrap();
    let outcomes: Vec<&str> = attempts.iter().map(|a| a["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["retried", "retried", "completed"], "{done}");
    for crash in &attempts[..2] {
        assert_eq!(crash["error"]["code"], "RUNTIME_ERROR", "{crash}");
        assert!(
            crash["error"]["message"].as_str().unwrap().contains("exited"),
            "{crash}"
        );
    }
    // The second retry waited about twice as long as the first (±20 %).
    let at = |i: usize, field: &str| {
        time::OffsetDateTime::parse(
            attempts[i][field].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    let first_wait = (at(1, "started_at") - at(0, "finished_at")).whole_milliseconds();
    let second_wait = (at(2, "started_at") - at(1, "finished_at")).whole_milliseconds();
    assert!(
        first_wait >= 150 && second_wait >= 300,
        "{first_wait} ms, then {second_wait} ms"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("lambda_async_attempts_total{outcome=\"retried\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_always_times_out_is_dead_lettered_with_its_attempts_and_can_be_queued_again() {
    // Arrange
    let app = app_with_worker(&[]).await;
    let token = app.token("alice", &["execute:all"]);
    let body = json!({
        "language_title": LT,
        "params": {"mode": "sleep", "seconds": 30},
        "context": {"timeout_ms": 300},
        "retry": {"max_attempts": 2, "backoff_ms": 100},
    });

    // Act
    let id = submit(&app, &token, body, None).await.body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let failed = wait_until(&app, &token, &id, Duration::from_secs(60), finished).await;

    // Assert
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "TIMEOUT");
    let attempts = failed["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{failed}");
    assert!(attempts.iter().all(|a| a["error"]["code"] == "TIMEOUT"));
    assert_eq!(attempts[1]["outcome"], "failed");
    let dead = app.get(Some(&token), "/api/v1/executions?status=failed").await;
    assert_eq!(dead.body["executions"][0]["execution_id"], id.as_str());

    // Its owner queues it again; a finished one cannot be cancelled.
    assert_eq!(
        post(&app, &token, &format!("/api/v1/executions/{id}/cancel"))
            .await
            .status,
        409
    );
    let again = post(&app, &token, &format!("/api/v1/executions/{id}/retry")).await;
    assert_eq!(again.status, 202, "{:?}", again.body);
    assert!(
        matches!(again.body["status"].as_str(), Some("pending" | "running")),
        "{:?}",
        again.body
    );
    let other = app.token("bob", &["execute:all"]);
    assert_eq!(
        post(&app, &other, &format!("/api/v1/executions/{id}/retry"))
            .await
            .status,
        404
    );
    let failed_again = wait_until(&app, &token, &id, Duration::from_secs(60), finished).await;
    assert_eq!(
        failed_again["attempts"].as_array().unwrap().len(),
        4,
        "the history is kept"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_running_execution_and_a_pending_one_never_runs() {
    // Arrange: one worker, busy with a long run.
    let app = app_with_worker(&["--execution-workers", "1"]).await;
    let token = app.token("alice", &["execute:all"]);
    let long = json!({"language_title": LT, "params": {"mode": "sleep", "seconds": 60}});
    let running = submit(&app, &token, long.clone(), None).await.body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pending = submit(&app, &token, long, None).await.body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until(&app, &token, &running, Duration::from_secs(30), |e| {
        e["status"] == "running"
    })
    .await;
    // The run is really under way in an instance.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let instances = app.instance_dirs();

    // Act
    let cancelled_pending = post(&app, &token, &format!("/api/v1/executions/{pending}/cancel")).await;
    let asked = Instant::now();
    let cancelled_running = post(&app, &token, &format!("/api/v1/executions/{running}/cancel")).await;
    let took = asked.elapsed();

    // Assert
    assert_eq!(cancelled_pending.status, 200, "{:?}", cancelled_pending.body);
    assert_eq!(cancelled_pending.body["status"], "cancelled");
    assert_eq!(cancelled_running.status, 200, "{:?}", cancelled_running.body);
    assert_eq!(
        cancelled_running.body["status"], "cancelled",
        "{:?}",
        cancelled_running.body
    );
    assert_eq!(cancelled_running.body["error"]["code"], "CANCELLED");
    assert!(took < Duration::from_secs(2), "cancelling took {took:?}");
    // Its instance is gone, and the pending one never ran.
    assert!(
        crate::helpers::eventually(Duration::from_secs(5), || app.instance_dirs() < instances).await,
        "the cancelled run's instance is still there"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let never = app.get(Some(&token), &format!("/api/v1/executions/{pending}")).await;
    assert_eq!(never.body["status"], "cancelled");
    assert!(
        never.body["attempts"].as_array().unwrap().is_empty(),
        "{:?}",
        never.body
    );
    assert!(never.body.get("started_at").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn higher_priority_runs_first_across_subjects() {
    // Arrange: one worker, held by a run while 100 executions queue up.
    let app = app_with_worker(&["--execution-workers", "1"]).await;
    let alice = app.token("alice", &["execute:all"]);
    let bob = app.token("bob", &["execute:all"]);
    let blocker = submit(
        &app,
        &alice,
        json!({"language_title": LT, "params": {"mode": "sleep", "seconds": 2}}),
        None,
    )
    .await
    .body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until(&app, &alice, &blocker, Duration::from_secs(30), |e| {
        e["status"] == "running"
    })
    .await;

    // Act: 50 low from alice, 50 high from bob, interleaved.
    let mut low = Vec::new();
    let mut high = Vec::new();
    for n in 0..50 {
        let l = submit(
            &app,
            &alice,
            json!({"language_title": LT, "params": {"n": n}, "priority": "low"}),
            None,
        )
        .await;
        low.push(l.body["execution_id"].as_str().unwrap().to_owned());
        let h = submit(
            &app,
            &bob,
            json!({"language_title": LT, "params": {"n": n}, "priority": "high"}),
            None,
        )
        .await;
        high.push(h.body["execution_id"].as_str().unwrap().to_owned());
    }
    let mut started = Vec::new();
    for (token, ids, priority) in [(&alice, &low, "low"), (&bob, &high, "high")] {
        for id in ids {
            let e = wait_until(&app, token, id, Duration::from_secs(120), finished).await;
            assert_eq!(e["status"], "completed", "{e}");
            assert_eq!(e["priority"], priority);
            assert_eq!(e["attempts"].as_array().unwrap().len(), 1);
            started.push((e["started_at"].as_str().unwrap().to_owned(), priority));
        }
    }

    // Assert: every high one started before any low one.
    started.sort();
    let first_low = started.iter().position(|(_, p)| *p == "low").unwrap();
    assert!(started[first_low..].iter().all(|(_, p)| *p == "low"), "{started:?}");
    assert_eq!(first_low, 50);
}

#[tokio::test(flavor = "multi_thread")]
async fn executions_accepted_before_a_restart_all_run_once_after_it() {
    // Arrange: a controller that queues but runs nothing, and one run
    // interrupted by the stop.
    let app = app_with_worker(&["--execution-workers", "0"]).await;
    let token = app.token("alice", &["execute:all"]);
    let mut ids = Vec::new();
    for n in 0..50 {
        let r = submit(&app, &token, json!({"language_title": LT, "params": {"n": n}}), None).await;
        assert_eq!(r.status, 202);
        ids.push(r.body["execution_id"].as_str().unwrap().to_owned());
    }
    let app = app
        .restart_with(&["--rate-limit-execute", "0", "--execution-workers", "1"])
        .await;
    let interrupted = submit(
        &app,
        &token,
        json!({"language_title": LT, "params": {"mode": "sleep", "seconds": 3}}),
        None,
    )
    .await
    .body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Act: stop while the long run is under way, then start again.
    wait_until(&app, &token, &interrupted, Duration::from_secs(60), |e| {
        e["status"] == "running"
    })
    .await;
    let app = app
        .restart_with(&["--rate-limit-execute", "0", "--execution-workers", "4"])
        .await;

    // Assert: everything ran, once; the interrupted run was handed back
    // unrun and ran again as its first attempt.
    for id in &ids {
        let e = wait_until(&app, &token, id, Duration::from_secs(120), finished).await;
        assert_eq!(e["status"], "completed", "{e}");
        assert_eq!(e["attempts"].as_array().unwrap().len(), 1, "{e}");
    }
    let e = wait_until(&app, &token, &interrupted, Duration::from_secs(60), finished).await;
    assert_eq!(e["status"], "completed", "{e}");
    assert_eq!(e["attempts"].as_array().unwrap().len(), 1, "{e}");
    assert_eq!(e["result"]["execution"]["attempt"], 1, "{e}");
}
