//! Function logs through the API: what Node and Python functions write
//! to stdout and stderr during an execution, read back by the execution's
//! id (its caller and the function's owner only), capped, kept for failed
//! and timed-out runs, and followed live per function by its owner.
//! (Rust native and wasm logs: `rust.rs`, the chatty probe.)

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::helpers::{Reply, TestApp, eventually, spawn_app, spawn_app_with, spawn_binary};

const NODE_CHATTY: &str = r#"
exports.handler = async (params) => {
  console.log("nodejs says", params.word);
  console.error("nodejs warns");
  process.stdout.write("no newline at the end");
  return { ok: true };
};
"#;

const PYTHON_CHATTY: &str = r#"import sys


def handler(params, context):
    print("python says", params["word"])
    print("python warns", file=sys.stderr)
    if params.get("fail"):
        raise ValueError("failing after printing")
    return {"ok": True}
"#;

/// Every run really runs (the shared Redis of other tests outlives a run).
fn no_cache() -> Value {
    json!({"cache": {"enabled": false}})
}

async fn logs(app: &TestApp, token: &str, id: &str) -> Reply {
    app.get(Some(token), &format!("/api/v1/executions/{id}/logs")).await
}

/// (stream, text) of each line.
fn lines(reply: &Reply) -> Vec<(String, String)> {
    reply.body["lines"]
        .as_array()
        .unwrap_or_else(|| panic!("no lines: {:?}", reply.body))
        .iter()
        .map(|l| {
            (
                l["stream"].as_str().unwrap().to_owned(),
                l["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn stream_of(reply: &Reply, stream: &str) -> Vec<String> {
    lines(reply)
        .into_iter()
        .filter(|(s, _)| s == stream)
        .map(|(_, t)| t)
        .collect()
}

/// Many runs at once on one function's instances, by two callers: each
/// execution's logs are its own lines, all of them and nothing else. (A
/// run whose answer was there at its call's first poll, as happens under
/// load, kept none of its output or gave it to the next run on its
/// instance, maybe the other caller's: 12 to 32 runs of these 400, in
/// each of three tries, before that was mended.)
#[tokio::test(flavor = "multi_thread")]
async fn executions_at_once_each_get_exactly_their_own_output() {
    let app = spawn_app_with(&["--rate-limit-execute", "100000"]).await;
    let echoes =
        "exports.handler = (p) => { console.log('says ' + p.word); console.error('warns ' + p.word); return {}; };\n";
    app.register("nodejs-echoes", echoes, no_cache()).await;
    let callers = [
        app.token("carol", &["execute:all"]),
        app.token("dave", &["execute:all"]),
    ];

    // Act: 400 one-shot executions, 16 at a time.
    let runs: Vec<(String, Vec<(String, String)>)> = futures::stream::iter(0..400)
        .map(|i| {
            let (app, token) = (&app, &callers[i % 2]);
            async move {
                let word = format!("w{i}");
                let id = app.session(token, "nodejs-echoes", json!({})).await;
                let r = app.execute(token, &id, json!({"word": word})).await;
                assert_eq!(r.status, 200, "{:?}", r.body);
                let mut kept = lines(&logs(app, token, r.body["execution_id"].as_str().unwrap()).await);
                kept.sort();
                (word, kept)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;

    // Assert
    let wrong: Vec<_> = runs
        .iter()
        .filter(|(word, kept)| {
            *kept
                != [
                    ("stderr".to_owned(), format!("warns {word}")),
                    ("stdout".to_owned(), format!("says {word}")),
                ]
        })
        .collect();
    assert!(wrong.is_empty(), "{} of {} runs: {wrong:?}", wrong.len(), runs.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_execution_s_output_is_its_logs_for_its_caller_and_the_function_owner_only() {
    // Arrange: alice registers both functions; carol runs them.
    let app = spawn_app().await;
    app.register("nodejs-chatty", NODE_CHATTY, no_cache()).await;
    app.register("python-chatty", PYTHON_CHATTY, no_cache()).await;
    let carol = app.token("carol", &["execute:all"]);
    let bob = app.token("bob", &["execute:all", "write:functions"]);

    for lt in ["nodejs-chatty", "python-chatty"] {
        let language = lt.split('-').next().unwrap();
        let id = app.session(&carol, lt, json!({"retain_session": true})).await;

        // Act
        let r = app.execute(&carol, &id, json!({"word": "hello"})).await;

        // Assert: the execution is named in the body and the header.
        assert_eq!(r.status, 200, "{lt}: {:?}", r.body);
        let execution_id = r.body["execution_id"].as_str().expect("execution_id").to_owned();
        assert_eq!(r.headers["x-execution-id"].to_str().unwrap(), execution_id);
        let mine = logs(&app, &carol, &execution_id).await;
        assert_eq!(mine.status, 200, "{lt}: {:?}", mine.body);
        let mut stdout = vec![format!("{language} says hello")];
        if language == "nodejs" {
            stdout.push("no newline at the end".into());
        }
        assert_eq!(stream_of(&mine, "stdout"), stdout, "{lt}: {:?}", mine.body);
        assert_eq!(stream_of(&mine, "stderr"), [format!("{language} warns")], "{lt}");
        assert_eq!(mine.body["truncated"], false);
        assert_eq!(mine.body["executions"], json!([execution_id]));
        assert!(mine.body["lines"][0]["ts"].as_str().unwrap().ends_with('Z'));

        // The function's owner reads them too; another subject does not
        // learn that the execution exists.
        let owner = logs(&app, &app.admin(), &execution_id).await;
        assert_eq!(lines(&owner), lines(&mine));
        let other = logs(&app, &bob, &execution_id).await;
        assert_eq!((other.status, other.code()), (404, "NOT_FOUND"), "{:?}", other.body);

        // A second run's logs are its own, not the first's again.
        let again = app.execute(&carol, &id, json!({"word": "again"})).await;
        let again_id = again.body["execution_id"].as_str().unwrap();
        assert_ne!(again_id, execution_id);
        let second = logs(&app, &carol, again_id).await;
        assert_eq!(stream_of(&second, "stdout")[0], format!("{language} says again"));
        assert_eq!(lines(&second).len(), lines(&mine).len(), "{:?}", second.body);

        // The session's id gives every execution of it, in order.
        let session = logs(&app, &carol, &id).await;
        assert_eq!(session.body["executions"], json!([execution_id, again_id]));
    }
    let unknown = logs(&app, &carol, &uuid::Uuid::new_v4().to_string()).await;
    assert_eq!(unknown.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_or_timed_out_execution_names_itself_and_keeps_what_it_wrote() {
    let app = spawn_app().await;
    app.register("python-chatty", PYTHON_CHATTY, no_cache()).await;
    app.register(
        "nodejs-stuck",
        r#"exports.handler = async () => { console.log("about to hang"); await new Promise(() => {}); };"#,
        no_cache(),
    )
    .await;
    let token = app.admin();

    // A function that raises.
    let id = app.session(&token, "python-chatty", json!({})).await;
    let r = app.execute(&token, &id, json!({"word": "x", "fail": true})).await;
    assert_eq!((r.status, r.code()), (500, "RUNTIME_ERROR"), "{:?}", r.body);
    let execution_id = r.body["execution_id"].as_str().expect("execution_id on an error");
    assert_eq!(r.headers["x-execution-id"].to_str().unwrap(), execution_id);
    let failed = logs(&app, &token, execution_id).await;
    assert_eq!(stream_of(&failed, "stdout"), ["python says x"], "{:?}", failed.body);

    // A function killed at its deadline.
    let id = app.session(&token, "nodejs-stuck", json!({"timeout_ms": 1000})).await;
    let r = app.execute(&token, &id, json!({})).await;
    assert_eq!((r.status, r.code()), (504, "TIMEOUT"), "{:?}", r.body);
    let timed_out = logs(&app, &token, r.body["execution_id"].as_str().unwrap()).await;
    assert_eq!(
        stream_of(&timed_out, "stdout"),
        ["about to hang"],
        "{:?}",
        timed_out.body
    );

    // Refused before it ran: no execution to name.
    let id = app.session(&token, "python-chatty", json!({})).await;
    let r = app
        .execute_with(&token, &id, json!({"params": "not an object"}), None)
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body.get("execution_id").is_none(), "{:?}", r.body);
    assert!(r.headers.get("x-execution-id").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_is_cut_at_the_cap_keeping_its_first_lines() {
    // Arrange: 1 KiB of logs per execution; the function writes ~100 KiB.
    let app = spawn_app_with(&["--log-limit-bytes", "1024"]).await;
    app.register(
        "nodejs-flood",
        r#"exports.handler = async () => {
             for (let i = 0; i < 1000; i++) console.log(`line ${i} ` + "x".repeat(90));
             return { done: true };
           };"#,
        no_cache(),
    )
    .await;
    let token = app.admin();
    let id = app.session(&token, "nodejs-flood", json!({})).await;

    // Act
    let r = app.execute(&token, &id, json!({})).await;

    // Assert: the answer is intact; the logs are the head, marked.
    assert_eq!(r.body["result"], json!({"done": true}), "{:?}", r.body);
    let flood = logs(&app, &token, r.body["execution_id"].as_str().unwrap()).await;
    let kept = stream_of(&flood, "stdout");
    assert!(!kept.is_empty() && kept.len() < 20, "{} lines kept", kept.len());
    assert!(kept[0].starts_with("line 0 "), "{:?}", kept[0]);
    assert!(
        kept.iter()
            .enumerate()
            .all(|(i, l)| l.starts_with(&format!("line {i} ")))
    );
    assert_eq!(flood.body["truncated"], true);
    assert_eq!(flood.body["limit_bytes"], 1024);
    let kept_bytes: usize = kept.iter().map(|l| l.len() + 1).sum();
    assert!(kept_bytes <= 1024);
    assert_eq!(
        flood.body["dropped_bytes"].as_u64().unwrap() as usize + kept_bytes,
        (0..1000).map(|i| format!("line {i} ").len() + 90 + 1).sum::<usize>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_owner_follows_a_function_s_lines_while_an_execution_is_still_running() {
    // Arrange: the function writes a line, then sleeps until it is
    // cancelled: its line can only be seen live.
    let app = spawn_app().await;
    app.register(
        "python-slow",
        r#"import time


def handler(params, context):
    print("started", params["n"])
    time.sleep(600)
"#,
        no_cache(),
    )
    .await;
    let carol = app.token("carol", &["execute:all"]);
    let owner = app.admin();

    // Only the owner may follow.
    let refused = app
        .get(Some(&carol), "/api/v1/functions/python-slow/logs?follow=true")
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (403, "FORBIDDEN"),
        "{:?}",
        refused.body
    );

    let response = app
        .client
        .get(app.url("/api/v1/functions/python-slow/logs?follow=true"))
        .bearer_auth(&owner)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut events = response.bytes_stream();

    // Act: carol starts it.
    let submitted = submit(
        &app,
        &carol,
        "python-slow",
        json!({"params": {"n": 7}, "context": {"timeout_ms": 120000}}),
    )
    .await;
    let id = submitted.body["execution_id"].as_str().unwrap().to_owned();
    let mut seen = String::new();
    let started = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(chunk) = events.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if seen.contains("started 7") {
                return true;
            }
        }
        false
    })
    .await;

    // Assert: the line came while the execution was still running.
    assert_eq!(started, Ok(true), "{seen}");
    assert!(seen.contains("event: log"), "{seen}");
    let running = app.get(Some(&carol), &format!("/api/v1/executions/{id}")).await;
    assert_eq!(running.body["status"], "running", "{:?}", running.body);
    let cancel = crate::helpers::read(
        app.client
            .post(app.url(&format!("/api/v1/executions/{id}/cancel")))
            .bearer_auth(&carol)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(cancel.status < 300, "{:?}", cancel.body);
    crate::executions::wait_until(&app, &carol, &id, Duration::from_secs(60), |e| {
        e["status"] == "cancelled"
    })
    .await;
    let kept = logs(&app, &carol, &id).await;
    assert_eq!(stream_of(&kept, "stdout"), ["started 7"], "{:?}", kept.body);
    let attempt = kept.body["executions"][0].as_str().unwrap();
    assert!(seen.contains(attempt), "{seen}");

    // Without follow: the function's last lines.
    let last = app
        .get(Some(&owner), "/api/v1/functions/python-slow/logs?lines=1")
        .await;
    assert_eq!(last.status, 200, "{:?}", last.body);
    assert_eq!(last.body["lines"].as_array().unwrap().len(), 1);
    assert_eq!(last.body["lines"][0]["text"], "started 7");
    let bad = app
        .get(Some(&owner), "/api/v1/functions/python-slow/logs?follow=yes")
        .await;
    assert_eq!((bad.status, bad.code()), (400, "INVALID_REQUEST"));
    let missing = app.get(Some(&owner), "/api/v1/functions/python-nope/logs").await;
    assert_eq!(missing.status, 404);
}

async fn submit(app: &TestApp, token: &str, language_title: &str, body: Value) -> Reply {
    crate::helpers::read(
        app.client
            .post(app.url("/api/v1/executions"))
            .bearer_auth(token)
            .header("Language-Title", language_title)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_asynchronous_execution_s_logs_hold_each_of_its_attempts() {
    let app = spawn_app().await;
    app.register("python-chatty", PYTHON_CHATTY, no_cache()).await;
    let token = app.admin();
    let submitted = submit(&app, &token, "python-chatty", json!({"params": {"word": "later"}})).await;
    assert_eq!(submitted.status, 202, "{:?}", submitted.body);
    let id = submitted.body["execution_id"].as_str().unwrap().to_owned();
    let done = crate::executions::wait_until(&app, &token, &id, Duration::from_secs(60), |e| {
        e["status"] != "pending" && e["status"] != "running"
    })
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    let r = logs(&app, &token, &id).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(stream_of(&r, "stdout"), ["python says later"], "{:?}", r.body);
    assert_eq!(r.body["executions"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn output_an_earlier_execution_leaves_behind_never_lands_in_another_subject_s_logs() {
    // Arrange: alice's run leaves timers that write her secret later;
    // bob's run on the same instance is still going when they fire.
    let app = spawn_app().await;
    app.register(
        "nodejs-leaky",
        r#"exports.handler = async (p) => {
             if (p.secret) {
               setTimeout(() => console.log("late " + p.secret), 300);
               setTimeout(() => console.error("late " + p.secret), 300);
             }
             if (p.wait) await new Promise((r) => setTimeout(r, p.wait));
             console.log("run of " + p.who);
             return { pid: process.pid };
           };"#,
        no_cache(),
    )
    .await;
    let alice = app.token("alice", &["execute:all"]);
    let bob = app.token("bob", &["execute:all"]);

    // Act
    let id = app.session(&alice, "nodejs-leaky", json!({})).await;
    let first = app
        .execute(&alice, &id, json!({"who": "alice", "secret": "s3cret"}))
        .await;
    let id = app.session(&bob, "nodejs-leaky", json!({})).await;
    let second = app.execute(&bob, &id, json!({"who": "bob", "wait": 1000})).await;

    // Assert: the same instance served both (so the timers fired during
    // bob's run), and bob's logs hold only his run's line.
    assert_eq!(
        first.body["result"]["pid"], second.body["result"]["pid"],
        "{first:?} {second:?}"
    );
    let bobs = logs(&app, &bob, second.body["execution_id"].as_str().unwrap()).await;
    assert_eq!(
        lines(&bobs),
        [("stdout".to_owned(), "run of bob".to_owned())],
        "{:?}",
        bobs.body
    );
    let alices = logs(&app, &alice, first.body["execution_id"].as_str().unwrap()).await;
    assert_eq!(stream_of(&alices, "stdout"), ["run of alice"]);
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// An instance that dies mid-run: its last words are its run's logs, and
/// nothing of it stays open in the controller. (A run reads its instance's
/// pipes while it waits for the answer and hands them back after; a pipe
/// whose end the run saw must still end its reader, or each dead instance
/// would keep its two pipes open.)
#[tokio::test(flavor = "multi_thread")]
async fn instances_that_die_mid_run_keep_their_last_words_and_leave_nothing_open() {
    let app = spawn_binary();
    app.register(
        "python-dier",
        "import os, sys\n\n\ndef handler(params, context):\n    print(\"last words\", flush=True)\n    print(\"and on stderr\", file=sys.stderr, flush=True)\n    os._exit(1)\n",
        no_cache(),
    )
    .await;
    let token = app.admin();
    let pid = app.controller_pid();
    let die = || async {
        let id = app.session(&token, "python-dier", json!({})).await;
        let r = app.execute(&token, &id, json!({})).await;
        assert_eq!(r.status, 500, "{:?}", r.body);
        r.body["execution_id"].as_str().unwrap().to_owned()
    };
    // The first death sets up what stays (the pool's refill, connections).
    die().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = open_fds(pid);

    let mut last = String::new();
    for _ in 0..8 {
        last = die().await;
    }
    let dead = logs(&app, &token, &last).await;
    assert_eq!(stream_of(&dead, "stdout"), ["last words"], "{:?}", dead.body);
    assert_eq!(stream_of(&dead, "stderr"), ["and on stderr"], "{:?}", dead.body);
    // Eight dead instances, two pipes each, would be 16 more.
    let closed = eventually(Duration::from_secs(10), || open_fds(pid) <= before + 4).await;
    assert!(closed, "open descriptors went from {before} to {}", open_fds(pid));
}

/// All a run wrote before its answer is its logs, to the last byte: a
/// megabyte Node has to queue because the pipe is full, a last line without
/// a newline, Python's buffered text. (The process backend asks for no end
/// marker: it reads the pipes dry once the answer has come.)
#[tokio::test(flavor = "multi_thread")]
async fn all_a_run_wrote_before_its_answer_is_its_logs_to_the_last_byte() {
    // Arrange
    let app = spawn_app_with(&["--log-limit-bytes", "4194304"]).await;
    app.register(
        "nodejs-megabyte",
        r#"exports.handler = async (p) => {
             process.stdout.write("x".repeat(1 << 20) + "\nend of " + p.run);
             console.error("err " + p.run);
             return { ok: true };
           };"#,
        no_cache(),
    )
    .await;
    app.register(
        "python-megabyte",
        "import sys\n\n\ndef handler(p, c):\n    sys.stdout.write(\"x\" * (1 << 20) + \"\\n\")\n    sys.stdout.write(\"end of \" + p[\"run\"])\n    print(\"err \" + p[\"run\"], file=sys.stderr)\n    return {\"ok\": True}\n",
        no_cache(),
    )
    .await;
    let token = app.admin();

    for lt in ["nodejs-megabyte", "python-megabyte"] {
        // The same instance, run after run: nothing spills into the next.
        let id = app.session(&token, lt, json!({"retain_session": true})).await;
        for run in ["one", "two", "three"] {
            // Act
            let r = app.execute(&token, &id, json!({"run": run})).await;
            assert_eq!(r.body["result"], json!({"ok": true}), "{lt}: {:?}", r.body);
            let got = logs(&app, &token, r.body["execution_id"].as_str().unwrap()).await;

            // Assert: the megabyte (in lines of at most 16 KiB), then the
            // unterminated last line; stderr's line.
            assert_eq!(got.body["truncated"], false, "{lt} {run}");
            let stdout = stream_of(&got, "stdout");
            let (last, megabyte) = stdout.split_last().expect("stdout lines");
            assert_eq!(last, &format!("end of {run}"), "{lt} {run}");
            assert!(megabyte.iter().all(|l| l.bytes().all(|b| b == b'x')), "{lt} {run}");
            assert_eq!(megabyte.iter().map(String::len).sum::<usize>(), 1 << 20, "{lt} {run}");
            assert_eq!(stream_of(&got, "stderr"), [format!("err {run}")], "{lt} {run}");
        }
    }
}
