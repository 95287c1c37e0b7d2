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
    began = time.time()
    execution = context.get("execution", {})
    mode = params.get("mode", "echo")
    if mode == "crash_until" and execution.get("attempt", 0) < params["attempt"]:
        os._exit(3)
    if mode == "sleep":
        time.sleep(params["seconds"])
    return {"n": params.get("n"), "execution": execution, "pid": os.getpid(), "ran": [began, time.time()]}
"#;

const LT: &str = "python-async-worker";

/// Every run really runs: results are not cached (the shared Redis of
/// the replica tests outlives a test run).
static NO_CACHE: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| json!({"cache": {"enabled": false}}));

pub(crate) async fn submit(app: &TestApp, token: &str, body: Value, key: Option<&str>) -> Reply {
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

pub(crate) async fn post(app: &TestApp, token: &str, path: &str) -> Reply {
    read(app.client.post(app.url(path)).bearer_auth(token).send().await.unwrap()).await
}

/// Polls an execution until `done` holds for it.
pub(crate) async fn wait_until(
    app: &TestApp,
    token: &str,
    id: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
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
    app.register(LT, WORKER, NO_CACHE.clone()).await;
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
    let outcomes: Vec<&str> = failed_again["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["retried", "failed", "requeued", "retried", "failed"],
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
    // Its directories now: the pool may start others meanwhile (a warm
    // refill), so the check is that one of these goes, not the count.
    let instances: Vec<std::path::PathBuf> = std::fs::read_dir(app.data_dir.path().join("instances"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();

    // Act
    let cancelled_pending = post(&app, &token, &format!("/api/v1/executions/{pending}/cancel")).await;
    // The answer waits (a few seconds at most) until the run has stopped.
    let cancelled_running = post(&app, &token, &format!("/api/v1/executions/{running}/cancel")).await;

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
    // Its instance is gone, and the pending one never ran.
    assert!(
        crate::helpers::eventually(Duration::from_secs(5), || instances.iter().any(|d| !d.exists())).await,
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

/// A cancel that races the run's own end answers what happened: 200 when
/// the run was stopped (it ends cancelled, with no result), 409 when it
/// finished first (it ends completed, with its result). Before, about one
/// cancel in twenty answered 200 for a run that then showed `completed`
/// (the old code failed this test in three of three tries).
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_racing_the_runs_end_answers_what_happened() {
    let app = spawn_app_with(&["--rate-limit-execute", "0"]).await;
    let token = app.token("alice", &["execute:all"]);
    let quick =
        "module.exports.handler = async (p) => { await new Promise((r) => setTimeout(r, p.ms)); return { n: p.n }; };";
    app.register("nodejs-quick", quick, NO_CACHE.clone()).await;

    // Act: 6 clients, 150 runs of 0-40 ms, each cancelled 0-80 ms after it
    // was submitted.
    let answers = futures::future::join_all((0..6).map(|client| {
        let (app, token) = (&app, &token);
        async move {
            let mut seen = Vec::new();
            for i in 0..25u64 {
                let n = client * 100 + i;
                // Spread over the run's whole life, without a random crate.
                let (ms, wait) = ((n * 7) % 41, (n * 13) % 81);
                let body = json!({"language_title": "nodejs-quick", "params": {"n": n, "ms": ms}});
                let id = submit(app, token, body, None).await.body["execution_id"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let cancel = post(app, token, &format!("/api/v1/executions/{id}/cancel")).await;
                let end = wait_until(app, token, &id, Duration::from_secs(30), finished).await;
                seen.push((n, cancel, end));
            }
            seen
        }
    }))
    .await;

    // Assert
    let mut counts = std::collections::BTreeMap::new();
    for (n, cancel, end) in answers.into_iter().flatten() {
        *counts
            .entry((cancel.status, end["status"].as_str().unwrap().to_owned()))
            .or_insert(0) += 1;
        match cancel.status {
            200 => {
                assert_eq!(end["status"], "cancelled", "a cancel answered 200: {end}");
                assert!(end["result"].is_null(), "{end}");
            }
            409 => {
                assert_eq!(cancel.code(), "CONFLICT", "{:?}", cancel.body);
                assert_eq!(
                    (end["status"].clone(), end["result"].clone()),
                    (json!("completed"), json!({"n": n})),
                    "{end}"
                );
            }
            other => panic!("cancel answered {other}: {:?}", cancel.body),
        }
    }
    eprintln!("cancel answer, final status: {counts:?}");
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

#[tokio::test(flavor = "multi_thread")]
async fn a_run_of_a_killed_replica_completes_once_on_another() {
    let (Some(redis), Some(db)) = (crate::replicas::redis_url(), crate::replicas::TestDatabase::create()) else {
        return;
    };
    // Arrange: replica A (a binary, to be killed) holds a long run.
    let flags = [
        "--redis-url",
        redis.as_str(),
        "--database-url",
        db.url.as_str(),
        "--rate-limit-execute",
        "0",
        "--execution-lease-secs",
        "2",
    ];
    let mut a = crate::helpers::spawn_binary_with(&flags);
    a.register(LT, WORKER, NO_CACHE.clone()).await;
    let token = a.token("alice", &["execute:all"]);
    let body = json!({"language_title": LT, "params": {"mode": "sleep", "seconds": 3}});
    let id = submit(&a, &token, body, None).await.body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until(&a, &token, &id, Duration::from_secs(30), |e| e["status"] == "running").await;
    let b = spawn_app_with(&flags).await;

    // Act: A dies mid-run, without a chance to hand the run back.
    a.kill_hard();

    // Assert: B takes the run over once the lease expires and completes it,
    // once; the lost attempt is on record.
    let done = wait_until(&b, &token, &id, Duration::from_secs(60), finished).await;
    assert_eq!(done["status"], "completed", "{done}");
    let outcomes: Vec<&str> = done["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["lost", "completed"], "{done}");
    assert_eq!(done["result"]["execution"]["attempt"], 2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = b.get(Some(&token), &format!("/api/v1/executions/{id}")).await;
    assert_eq!(again.body["attempts"], done["attempts"], "it ran once more");
}

/// One request a [`Receiver`] got.
#[derive(Debug, Clone)]
struct Received {
    headers: std::collections::HashMap<String, String>,
    body: Vec<u8>,
    at: Instant,
}

/// A callback receiver on 127.0.0.1: answers each request with the next
/// of `answers` (status, extra header), then 200; records what it got.
struct Receiver {
    url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start(answers: Vec<(u16, Option<(&'static str, &'static str)>)>) -> Receiver {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = got.clone();
        let task = tokio::spawn(async move {
            let mut answers = answers.into_iter();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut data = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then as much body as Content-Length says.
                let (headers, body) = loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        break (None, Vec::new());
                    };
                    if n == 0 {
                        break (None, Vec::new());
                    }
                    data.extend_from_slice(&chunk[..n]);
                    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&data[..end]).to_string();
                    let headers: std::collections::HashMap<String, String> = head
                        .lines()
                        .skip(1)
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .collect();
                    let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                    while data.len() < end + 4 + length {
                        let Ok(n) = stream.read(&mut chunk).await else { break };
                        if n == 0 {
                            break;
                        }
                        data.extend_from_slice(&chunk[..n]);
                    }
                    break (Some(headers), data[end + 4..].to_vec());
                };
                let Some(headers) = headers else { continue };
                record.lock().unwrap().push(Received {
                    headers,
                    body,
                    at: Instant::now(),
                });
                let (status, extra) = answers.next().unwrap_or((200, None));
                let extra = extra.map_or(String::new(), |(k, v)| format!("{k}: {v}\r\n"));
                let reply = format!("HTTP/1.1 {status} X\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = stream.write_all(reply.as_bytes()).await;
            }
        });
        Receiver { url, got, task }
    }

    fn requests(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callback_is_signed_retried_on_5xx_and_delivered_once_logically() {
    // Arrange: a receiver that fails twice, then accepts.
    let app = app_with_worker(&["--callback-allow-networks", "127.0.0.1"]).await;
    let token = app.token("alice", &["execute:all"]);
    let receiver = Receiver::start(vec![(500, None), (503, None)]).await;
    let secret = app.get(Some(&token), "/api/v1/signing-secret").await;
    assert_eq!(secret.status, 200, "{:?}", secret.body);
    let secret = secret.body["secret"].as_str().unwrap().to_owned();

    // Act
    let body = json!({"language_title": LT, "params": {"n": 5}, "callback_url": receiver.url});
    let id = submit(&app, &token, body, None).await.body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let delivered = wait_until(&app, &token, &id, Duration::from_secs(60), |e| {
        e["callback"]["status"] == "delivered"
    })
    .await;

    // Assert: three tries of one delivery, each signed, the last accepted.
    let got = receiver.requests();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(delivered["callback"]["attempts"], 3);
    let delivery = &got[0].headers["x-delivery-id"];
    for (n, r) in got.iter().enumerate() {
        assert_eq!(
            &r.headers["x-delivery-id"], delivery,
            "duplicates share the delivery id"
        );
        assert_eq!(r.headers["x-attempt"], (n + 1).to_string());
        assert_eq!(r.headers["x-execution-id"], id);
        let expected = signature(&secret, &r.headers["x-timestamp"], &r.body);
        assert_eq!(r.headers["x-signature"], expected, "signature of try {}", n + 1);
        let sent: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(sent["status"], "completed");
        assert_eq!(sent["result"]["n"], 5);
    }
    // Backoff between tries: about 1 s, then about 2 s.
    assert!(
        got[1].at - got[0].at >= Duration::from_millis(900),
        "{:?}",
        got[1].at - got[0].at
    );
    assert!(
        got[2].at - got[1].at >= Duration::from_millis(1800),
        "{:?}",
        got[2].at - got[1].at
    );

    // A rotated secret signs what comes next; the old one no longer does.
    let rotated = post(&app, &token, "/api/v1/signing-secret/rotate").await;
    assert_eq!(rotated.status, 200);
    assert_ne!(rotated.body["secret"], secret.as_str());
    assert_eq!(
        app.get(Some(&token), "/api/v1/signing-secret").await.body["secret"],
        rotated.body["secret"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callback_answered_429_waits_for_retry_after() {
    // Arrange
    let app = app_with_worker(&["--callback-allow-networks", "127.0.0.1"]).await;
    let token = app.token("alice", &["execute:all"]);
    let receiver = Receiver::start(vec![(429, Some(("Retry-After", "2")))]).await;

    // Act
    let body = json!({"language_title": LT, "params": {"n": 1}, "callback_url": receiver.url});
    let id = submit(&app, &token, body, None).await.body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until(&app, &token, &id, Duration::from_secs(60), |e| {
        e["callback"]["status"] == "delivered"
    })
    .await;

    // Assert
    let got = receiver.requests();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got[1].at - got[0].at >= Duration::from_millis(1900),
        "{:?}",
        got[1].at - got[0].at
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("lambda_async_callbacks_total{outcome=\"delivered\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn callbacks_into_the_controllers_own_network_are_refused_unless_allowed() {
    // Arrange: the default: only public addresses.
    let app = app_with_worker(&[]).await;
    let token = app.token("alice", &["execute:all"]);
    let controller = app.url("/health");

    // Act + Assert
    for url in [
        controller.as_str(),
        "http://127.0.0.1:6379/",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/",
        "http://localhost:8080/",
        "ftp://example.com/",
        "https://user:secret@example.com/",
    ] {
        let body = json!({"language_title": LT, "params": {}, "callback_url": url});
        let r = submit(&app, &token, body, None).await;
        assert_eq!(r.status, 400, "{url}: {:?}", r.body);
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains("callback_url"),
            "{url}: {:?}",
            r.body
        );
    }
    assert_eq!(
        app.get(Some(&token), "/api/v1/executions").await.body["total"],
        0,
        "nothing was queued"
    );
}

/// One Server-Sent Event.
#[derive(Debug)]
pub(crate) struct Sse {
    pub(crate) id: u64,
    pub(crate) event: String,
    pub(crate) data: Value,
}

/// Reads an SSE stream to its end (or `limit` events).
pub(crate) async fn read_events(
    app: &TestApp,
    token: &str,
    id: &str,
    last: Option<u64>,
    limit: usize,
) -> (u16, Vec<Sse>) {
    use futures::StreamExt;
    let mut req = app
        .client
        .get(app.url(&format!("/api/v1/executions/{id}/events")))
        .bearer_auth(token);
    if let Some(last) = last {
        req = req.header("Last-Event-ID", last.to_string());
    }
    let response = req.send().await.unwrap();
    let status = response.status().as_u16();
    if status != 200 {
        return (status, Vec::new());
    }
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    while events.len() < limit {
        let chunk = match tokio::time::timeout(Duration::from_secs(60), body.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            _ => break,
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let field = |name: &str| {
                frame
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}:")))
                    .map(|v| v.trim().to_owned())
            };
            if let (Some(id), Some(event), Some(data)) = (field("id"), field("event"), field("data")) {
                events.push(Sse {
                    id: id.parse().unwrap(),
                    event,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
        }
    }
    (status, events)
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_show_every_step_in_order_and_resume_after_last_event_id() {
    // Arrange: a run that crashes once, then answers.
    let app = app_with_worker(&["--max-streams-per-subject", "1"]).await;
    let token = app.token("alice", &["execute:all"]);
    let body =
        json!({"language_title": LT, "params": {"mode": "crash_until", "attempt": 2}, "retry": {"backoff_ms": 300}});
    let id = submit(&app, &token, body, None).await.body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Act
    let (status, events) = read_events(&app, &token, &id, None, 100).await;

    // Assert
    assert_eq!(status, 200);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "progress",
            "step",
            "step",
            "progress",
            "step",
            "step",
            "progress",
            "completed"
        ],
        "{events:#?}"
    );
    assert_eq!(
        events.iter().map(|e| e.id).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert_eq!(events[1].data["status"], "running");
    assert_eq!(events[2].data["status"], "retried");
    assert_eq!(events[2].data["error"]["code"], "RUNTIME_ERROR");
    assert_eq!(events[5].data["status"], "completed");
    assert_eq!(events[6].data["percentage"], 100.0);
    assert_eq!(events[7].data["status"], "completed");
    assert_eq!(events[7].data["result"]["execution"]["attempt"], 2);

    // Resumed after event 5: only what came after it.
    let (_, resumed) = read_events(&app, &token, &id, Some(5), 100).await;
    assert_eq!(resumed.iter().map(|e| e.id).collect::<Vec<_>>(), [6, 7, 8]);

    // Another subject's execution is not there; one stream at a time here.
    let bob = app.token("bob", &["execute:all"]);
    assert_eq!(read_events(&app, &bob, &id, None, 1).await.0, 404);
    let long = json!({"language_title": LT, "params": {"mode": "sleep", "seconds": 5}});
    let running = submit(&app, &token, long, None).await.body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = app
        .client
        .get(app.url(&format!("/api/v1/executions/{running}/events")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(read_events(&app, &token, &running, None, 1).await.0, 429);
    let refused = app
        .client
        .get(app.url(&format!("/api/v1/executions/{running}/events")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let refused = read(refused).await;
    assert_eq!((refused.status, refused.code()), (429, "RATE_LIMITED"));
    let message = refused.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("MAX_STREAMS_PER_SUBJECT"),
        "says which limit: {message}"
    );
    drop(first);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_websocket_speaks_the_seeds_auth_watch_progress_and_error_messages() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    // Arrange
    let app = app_with_worker(&[]).await;
    let token = app.token("alice", &["execute:all"]);
    let ok = submit(
        &app,
        &token,
        json!({"language_title": LT, "params": {"mode": "sleep", "seconds": 1}}),
        None,
    )
    .await
    .body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let failing =
        json!({"language_title": LT, "params": {"mode": "crash_until", "attempt": 9}, "retry": {"max_attempts": 1}});
    let bad = submit(&app, &token, failing, None).await.body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let bob = app.token("bob", &["execute:all"]);
    let bobs = submit(&app, &bob, json!({"language_title": LT, "params": {}}), None)
        .await
        .body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ws_url = app.url("/api/v1/ws").replacen("http://", "ws://", 1);
    let (ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    let (mut sink, mut stream) = ws.split();
    let mut next = async || -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), stream.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Message::Text(t) = m {
                return serde_json::from_str(&t).unwrap();
            }
        }
    };
    let send = |v: Value| Message::Text(v.to_string().into());

    // Act + Assert: auth first.
    sink.send(send(json!({"type": "auth", "token": token}))).await.unwrap();
    assert_eq!(next().await["type"], "authenticated");
    for id in [&ok, &bad, &bobs] {
        sink.send(send(json!({"type": "watch", "execution_id": id})))
            .await
            .unwrap();
    }
    let mut ok_statuses = Vec::new();
    let mut bad_error = None;
    let mut refused = None;
    while ok_statuses.last() != Some(&json!("completed")) || bad_error.is_none() || refused.is_none() {
        let m = next().await;
        match (m["type"].as_str().unwrap(), m["execution_id"].as_str()) {
            ("progress", Some(id)) if id == ok => {
                ok_statuses.push(m["data"]["status"].clone());
                assert!(m["data"]["step_details"][0]["component_name"] == LT);
            }
            ("progress", Some(id)) if id == bad => {}
            ("error", Some(id)) if id == bad => bad_error = Some(m["error"]["code"].clone()),
            ("error", Some(id)) if id == bobs => refused = Some(m["error"]["code"].clone()),
            other => panic!("unexpected {other:?}: {m}"),
        }
    }
    assert_eq!(bad_error, Some(json!("RUNTIME_ERROR")));
    assert_eq!(refused, Some(json!("NOT_FOUND")), "another subject's execution");
    let order = ["pending", "running", "completed"];
    let positions: Vec<usize> = ok_statuses
        .iter()
        .map(|s| order.iter().position(|o| s == o).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{ok_statuses:?}");

    // A wrong token is refused and the connection closed.
    let (mut other, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    other
        .send(send(json!({"type": "auth", "token": "nope"})))
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), other.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let refusal: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
    assert_eq!(refusal["error"]["code"], "UNAUTHORIZED");
}

#[tokio::test(flavor = "multi_thread")]
async fn executions_past_their_retention_are_deleted() {
    use controller::store::sqlite::SqliteStore;
    use controller::store::{ExecutionRecord, NewExecution, Stores};
    // Arrange: a database with the record of an execute started 30 days
    // ago and one of yesterday, and an asynchronous execution that
    // finished 30 days ago (the retention is 7 days by default).
    let data_dir = tempfile::tempdir().unwrap();
    let db = data_dir.path().join("controller.db");
    let stores = Stores::of(SqliteStore::open(&db).await.unwrap());
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let record = |days: i64| {
        let at = now - time::Duration::days(days);
        let ms = u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap();
        ExecutionRecord {
            id: uuid::Builder::from_unix_timestamp_millis(ms, &[days as u8; 10]).into_uuid(),
            request_id: format!("session-{days}-days-ago"),
            subject: "alice".into(),
            language_title: "wasm-hello".into(),
            version: 1,
            started_at: at,
            duration_ms: 1,
            outcome: "success".into(),
            cached: false,
            cold_start: false,
            parent_id: None,
            logs: None,
        }
    };
    stores
        .executions
        .record_executions(&[record(30), record(1)])
        .await
        .unwrap();
    let long_ago_ms = (now - time::Duration::days(30)).unix_timestamp() * 1000;
    let old = NewExecution {
        id: uuid::Uuid::new_v4().to_string(),
        subject: "alice".into(),
        language_title: LT.into(),
        version: 1,
        params: json!({}),
        context: json!({}),
        timeout_ms: 1000,
        priority: 1,
        idempotency_key: None,
        cache: None,
        max_attempts: 1,
        backoff_ms: 1000,
        retry_runtime_errors: false,
        callback_url: None,
        now_ms: long_ago_ms,
        max_pending: 1000,
    };
    let old_id = old.id.clone();
    stores.queue.submit(old, 0).await.unwrap();
    stores
        .queue
        .cancel(&old_id, "alice", long_ago_ms + 5)
        .await
        .unwrap()
        .unwrap();

    // Act: a controller starts on it (its sweep runs at start-up).
    let app = crate::helpers::spawn_app_in(data_dir, &[]).await;

    // Assert: the old ones are gone, yesterday's record stays.
    let records = stores.executions.clone();
    let mut gone = false;
    for _ in 0..100 {
        if records.executions_of("session-30-days-ago").await.unwrap().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the 30-day-old record is still there");
    assert_eq!(records.executions_of("session-1-days-ago").await.unwrap().len(), 1);
    let token = app.token("alice", &["execute:all"]);
    let r = app.get(Some(&token), &format!("/api/v1/executions/{old_id}")).await;
    assert_eq!(r.status, 404, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_subject_has_a_bounded_number_of_pending_executions() {
    // Arrange: three pending a subject, and nothing runs them; each keeps
    // its params in the queue until it runs.
    let app = app_with_worker(&["--execution-workers", "0", "--execution-max-pending-per-subject", "3"]).await;
    let alice = app.token("alice", &["execute:all"]);
    let bob = app.token("bob", &["execute:all"]);
    let body = json!({"language_title": LT, "params": {}});
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(queued(&app, &alice, json!({})).await);
    }
    let keyed = submit(&app, &alice, body.clone(), Some("k1")).await;

    // Act
    let fourth = submit(&app, &alice, body.clone(), None).await;

    // Assert: refused, saying why; another subject is not, and a cancel
    // makes room.
    for refused in [&keyed, &fourth] {
        assert_eq!(
            (refused.status, refused.code()),
            (429, "RATE_LIMITED"),
            "{:?}",
            refused.body
        );
        let message = refused.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("EXECUTION_MAX_PENDING_PER_SUBJECT"), "{message}");
    }
    assert_eq!(submit(&app, &bob, body.clone(), None).await.status, 202);
    let cancelled = post(&app, &alice, &format!("/api/v1/executions/{}/cancel", ids[0])).await;
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    assert_eq!(submit(&app, &alice, body, None).await.status, 202);
}

#[tokio::test(flavor = "multi_thread")]
async fn keyed_submissions_that_come_together_are_each_queued() {
    // Arrange: the default store (SQLite), where a keyed submission reads
    // its key before it inserts.
    let app = app_with_worker(&["--execution-workers", "0"]).await;
    let token = app.token("alice", &["execute:all"]);

    // Act: twelve at once, each with a key of its own.
    let body = json!({"language_title": LT, "params": {}});
    let keys: Vec<String> = (0..12).map(|i| format!("together-{i}")).collect();
    let answers = futures::future::join_all(keys.iter().map(|key| submit(&app, &token, body.clone(), Some(key)))).await;

    // Assert: every one queued (the database was "locked" for some).
    for r in &answers {
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
}

/// Submits a run of the worker with `params` (202 asserted); its id.
async fn queued(app: &TestApp, token: &str, params: Value) -> String {
    let r = submit(app, token, json!({"language_title": LT, "params": params}), None).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    r.body["execution_id"].as_str().unwrap().to_owned()
}

/// A client of `/api/v1/ws`: its messages as JSON, and how it was closed.
mod ws_client {
    use std::time::Duration;

    use futures::{SinkExt, StreamExt};
    use serde_json::Value;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

    pub async fn connect(app: &crate::helpers::TestApp) -> Socket {
        let url = app.url("/api/v1/ws").replacen("http://", "ws://", 1);
        tokio_tungstenite::connect_async(&url).await.unwrap().0
    }

    pub async fn send(ws: &mut Socket, text: String) {
        ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// Connects and authenticates with `token` in the first message.
    pub async fn authenticated(app: &crate::helpers::TestApp, token: &str) -> Socket {
        let mut ws = connect(app).await;
        send(&mut ws, serde_json::json!({"type": "auth", "token": token}).to_string()).await;
        let hello = next(&mut ws, Duration::from_secs(10)).await.unwrap();
        assert_eq!(hello["type"], "authenticated", "{hello}");
        ws
    }

    /// Asks for execution `id`'s progress.
    pub async fn watch(ws: &mut Socket, id: &str) {
        send(ws, serde_json::json!({"type": "watch", "execution_id": id}).to_string()).await;
    }

    /// What came next within `timeout`: `Ok` a JSON message, `Err` the
    /// close frame's code and reason (`None` for a connection that just
    /// ended). Panics when nothing came.
    pub async fn next(ws: &mut Socket, timeout: Duration) -> Result<Value, Option<(CloseCode, String)>> {
        loop {
            let m = tokio::time::timeout(timeout, ws.next())
                .await
                .expect("nothing came from the WebSocket");
            match m {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| (f.code, f.reason.to_string()))),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return Err(None),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_message_over_the_limit_closes_the_connection_unread() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    // Arrange: an auth message of 100 KB (a token cannot be that large),
    // before any token was checked. The library's own limit was 64 MiB,
    // read whole and parsed as JSON by anyone who connects.
    let app = spawn_app_with(&[]).await;
    let mut ws = ws_client::connect(&app).await;
    let huge = json!({"type": "auth", "token": "a".repeat(100_000)}).to_string();

    // Act
    ws_client::send(&mut ws, huge).await;

    // Assert: closed, saying why; not read as an auth attempt.
    let answer = ws_client::next(&mut ws, Duration::from_secs(10)).await;
    let (code, reason) = answer
        .expect_err("the message was read")
        .expect("closed without a reason");
    assert_eq!(code, CloseCode::Policy, "{reason}");
    assert!(reason.contains("too long"), "{reason}");

    // A message within the limit is still read.
    ws_client::authenticated(&app, &app.token("alice", &["execute:all"])).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_ends_when_its_token_expires() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    // Arrange: a token good for 2 s more (no leeway), and an execution to
    // watch that stays pending (no workers).
    let app = app_with_worker(&["--jwt-leeway-secs", "0", "--execution-workers", "0"]).await;
    let lasting = app.token("alice", &["execute:all"]);
    let id = queued(&app, &lasting, json!({})).await;
    let brief = app.token_for("alice", &["execute:all"], 2);
    let mut ws = ws_client::authenticated(&app, &brief).await;
    ws_client::watch(&mut ws, &id).await;
    let progress = ws_client::next(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!(progress["data"]["status"], "pending", "{progress}");

    // Act: wait past the token's end (the connection stays quiet: the
    // execution never changes).
    let refusal = ws_client::next(&mut ws, Duration::from_secs(15)).await;

    // Assert: told why, then closed.
    let refusal = refusal.expect("a message before the close");
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(refusal["error"]["code"], "UNAUTHORIZED", "{refusal}");
    assert!(
        refusal["error"]["message"].as_str().unwrap().contains("expired"),
        "{refusal}"
    );
    let closed = ws_client::next(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(closed.unwrap_err().map(|(code, _)| code), Some(CloseCode::Policy));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_stream_ends_when_its_token_expires() {
    // Arrange: an execution that stays pending (no workers), and a token
    // good for 2 s more (no leeway).
    let app = app_with_worker(&["--jwt-leeway-secs", "0", "--execution-workers", "0"]).await;
    let lasting = app.token("alice", &["execute:all"]);
    let id = queued(&app, &lasting, json!({})).await;
    let brief = app.token_for("alice", &["execute:all"], 2);

    // Act: read the stream to its end.
    let response = app
        .client
        .get(app.url(&format!("/api/v1/executions/{id}/events")))
        .bearer_auth(&brief)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(15), response.text())
        .await
        .expect("the stream outlived its token")
        .unwrap();

    // Assert: the pending progress, then an error event saying why.
    let frames: Vec<&str> = body.split("\n\n").filter(|f| f.contains("data:")).collect();
    assert!(frames[0].contains("event: progress"), "{body}");
    let last = frames.last().unwrap();
    assert!(last.contains("event: error") && !last.contains("id:"), "{body}");
    let data: Value = serde_json::from_str(last.lines().find_map(|l| l.strip_prefix("data:")).unwrap().trim()).unwrap();
    assert_eq!(data["code"], "UNAUTHORIZED", "{data}");
    assert!(data["message"].as_str().unwrap().contains("expired"), "{data}");
    // A new token streams it again.
    let (status, events) = read_events(&app, &lasting, &id, None, 1).await;
    assert_eq!((status, events[0].event.as_str()), (200, "progress"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_counts_against_its_subjects_rate_limit() {
    // Arrange: 5 requests a minute; one submit spends one.
    let app = spawn_app_with(&["--rate-limit-execute", "5", "--execution-workers", "0"]).await;
    app.register(LT, WORKER, NO_CACHE.clone()).await;
    let token = app.token("alice", &["execute:all"]);
    let id = queued(&app, &token, json!({})).await;
    let mut ws = ws_client::authenticated(&app, &token).await;

    // Act: watch it ten times (each a read of it, as a GET would be), then
    // a message that is refused for what it is.
    for _ in 0..10 {
        ws_client::watch(&mut ws, &id).await;
    }
    ws_client::send(&mut ws, json!({"type": "nope"}).to_string()).await;

    // Assert: its progress once, and the watches over the limit refused.
    let (mut progress, mut limited) = (0, 0);
    loop {
        let m = ws_client::next(&mut ws, Duration::from_secs(10)).await.unwrap();
        match (m["type"].as_str(), m["error"]["code"].as_str()) {
            (Some("progress"), _) => progress += 1,
            (Some("error"), Some("RATE_LIMITED")) => {
                assert_eq!(m["execution_id"], json!(id), "{m}");
                limited += 1;
            }
            (Some("error"), Some("INVALID_REQUEST")) => break,
            _ => panic!("unexpected {m}"),
        }
    }
    assert_eq!(progress + limited, 10);
    assert!(
        (1..=3).contains(&progress),
        "{progress} of 10 watches admitted with 5 a minute, 2 spent"
    );
    // The limit spent, a new connection is refused once its token is read.
    let mut again = ws_client::connect(&app).await;
    ws_client::send(&mut again, json!({"type": "auth", "token": token}).to_string()).await;
    let m = ws_client::next(&mut again, Duration::from_secs(10)).await.unwrap();
    assert_eq!(m["error"]["code"], "RATE_LIMITED", "{m}");
    assert!(
        ws_client::next(&mut again, Duration::from_secs(10)).await.is_err(),
        "closed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_websocket_watches_a_bounded_number_of_executions() {
    // Arrange: 257 pending executions (no workers run them).
    let app = app_with_worker(&["--execution-workers", "0"]).await;
    let token = app.token("alice", &["execute:all"]);
    let mut ids = Vec::new();
    for n in 0..257 {
        ids.push(queued(&app, &token, json!({"n": n})).await);
    }
    let mut ws = ws_client::authenticated(&app, &token).await;

    // Act: watch them all.
    for id in &ids {
        ws_client::watch(&mut ws, id).await;
    }

    // Assert: the first 256 each get their progress; the last is refused
    // with a reason, and the connection stays.
    let (mut progressed, mut refused) = (0, Vec::new());
    while progressed + refused.len() < ids.len() {
        let m = ws_client::next(&mut ws, Duration::from_secs(30)).await.unwrap();
        match m["type"].as_str() {
            Some("progress") => progressed += 1,
            Some("error") => refused.push(m),
            _ => panic!("unexpected {m}"),
        }
    }
    assert_eq!(progressed, 256);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["execution_id"], json!(ids[256]));
    assert_eq!(refused[0]["error"]["code"], "INVALID_REQUEST");
    assert!(
        refused[0]["error"]["message"].as_str().unwrap().contains("256"),
        "{}",
        refused[0]
    );
    // Unwatching one makes room.
    ws_client::send(&mut ws, json!({"type": "unwatch", "execution_id": ids[0]}).to_string()).await;
    ws_client::watch(&mut ws, &ids[256]).await;
    let m = ws_client::next(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        (m["type"].as_str(), m["execution_id"].as_str()),
        (Some("progress"), Some(ids[256].as_str())),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_made_on_one_replica_streams_from_another() {
    let (Some(redis), Some(db)) = (crate::replicas::redis_url(), crate::replicas::TestDatabase::create()) else {
        return;
    };
    // Arrange: A runs executions; B only queues them and streams.
    let shared = [
        "--redis-url",
        redis.as_str(),
        "--database-url",
        db.url.as_str(),
        "--rate-limit-execute",
        "0",
    ];
    let a = spawn_app_with(&shared).await;
    let mut only_queues = shared.to_vec();
    only_queues.extend(["--execution-workers", "0"]);
    let b = spawn_app_with(&only_queues).await;
    a.register(LT, WORKER, NO_CACHE.clone()).await;
    let token = b.token("alice", &["execute:all"]);

    // Act
    let body = json!({"language_title": LT, "params": {"mode": "sleep", "seconds": 1}});
    let id = submit(&b, &token, body, None).await.body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, events) = read_events(&b, &token, &id, None, 100).await;

    // Assert
    assert_eq!(status, 200);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        ["progress", "step", "step", "progress", "completed"],
        "{events:#?}"
    );
    assert_eq!(events[4].data["result"]["execution"]["attempt"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_subject_at_its_cap_does_not_starve_another() {
    // Arrange: four workers, but one running execution per subject.
    let app = app_with_worker(&["--execution-max-per-subject", "1"]).await;
    let alice = app.token("alice", &["execute:all"]);
    let bob = app.token("bob", &["execute:all"]);
    let sleep = |n: u32| json!({"language_title": LT, "params": {"mode": "sleep", "seconds": 1, "n": n}});

    // Act: alice queues three, then bob one.
    let mut alices = Vec::new();
    for n in 0..3 {
        alices.push(
            submit(&app, &alice, sleep(n), None).await.body["execution_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let bobs = submit(&app, &bob, sleep(9), None).await.body["execution_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Assert: alice's ran one after another; bob's ran beside her first.
    // The function's own clock: when each run really ran.
    let span = |e: &Value| {
        (
            e["result"]["ran"][0].as_f64().unwrap(),
            e["result"]["ran"][1].as_f64().unwrap(),
        )
    };
    let mut spans = Vec::new();
    for id in &alices {
        let e = wait_until(&app, &alice, id, Duration::from_secs(60), finished).await;
        assert_eq!(e["status"], "completed", "{e}");
        spans.push(span(&e));
    }
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "alice ran two at once: {spans:?}");
    }
    let b = wait_until(&app, &bob, &bobs, Duration::from_secs(60), finished).await;
    let (b_start, _) = span(&b);
    assert!(b_start < spans[0].1, "bob waited for alice: {b_start} vs {spans:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn results_are_cached_as_executes_are_unless_the_submission_says_no_cache() {
    // Arrange: the same function with the result cache on.
    let app = spawn_app_with(&["--rate-limit-execute", "0"]).await;
    let lt = "python-async-cached";
    app.register(lt, WORKER, json!({})).await;
    let token = app.token("alice", &["execute:all"]);
    let body = json!({"language_title": lt, "params": {"n": 1}});
    let run = |cache: Option<&'static str>| {
        let mut req = app
            .client
            .post(app.url("/api/v1/executions"))
            .bearer_auth(&token)
            .json(&body);
        if let Some(c) = cache {
            req = req.header("X-Cache-Control", c);
        }
        async move {
            read(req.send().await.unwrap()).await.body["execution_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };

    // Act
    let first = run(None).await;
    let first_done = wait_until(&app, &token, &first, Duration::from_secs(30), finished).await;
    let cached = run(None).await;
    let cached_done = wait_until(&app, &token, &cached, Duration::from_secs(30), finished).await;
    let fresh = run(Some("no-cache")).await;
    let fresh_done = wait_until(&app, &token, &fresh, Duration::from_secs(30), finished).await;

    // Assert: the second is the first's result; the third ran itself.
    assert_eq!(first_done["result"]["execution"]["id"], first.as_str());
    assert_eq!(cached_done["result"], first_done["result"], "{cached_done}");
    assert_eq!(fresh_done["result"]["execution"]["id"], fresh.as_str(), "{fresh_done}");
    let bad = app
        .client
        .post(app.url("/api/v1/executions"))
        .bearer_auth(&token)
        .header("X-Cache-Control", "sometimes")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}
