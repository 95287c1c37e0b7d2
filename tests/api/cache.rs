//! The result cache (contract A.13, design/reliability.md 21 and 22): what is
//! a hit, what is a miss, what is never stored, and that authorization comes
//! before any lookup.
//!
//! The tests use a registered Node function whose every real run returns a
//! fresh random `nonce` and its instance's run count, so a cached answer (same
//! nonce) is told apart from a fresh one.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{Reply, TestApp, read, spawn_app};

const FUNCTION: &str = "nodejs-probe";

const CODE: &str = r#"'use strict';
const crypto = require('crypto');
let runs = 0;
module.exports.handler = (params, context) => {
  runs += 1;
  if (params.fail === 'runtime') throw new Error(`failed on run ${runs}`);
  if (params.fail === 'invalid') throw Object.assign(new Error(`refused on run ${runs}`), { code: 'INVALID_PARAMS' });
  if (params.fail === 'loop') for (;;) {}
  return { version: 'VERSION', nonce: crypto.randomUUID(), runs, params, context };
};
"#;

fn code(version: &str) -> String {
    CODE.replace("VERSION", version)
}

/// A fresh controller with the probe function registered at version 1.
async fn app_with_probe() -> TestApp {
    let app = spawn_app().await;
    app.register(FUNCTION, &code("v1"), json!({})).await;
    app
}

async fn execute_cached(app: &TestApp, token: &str, id: &str, params: Value, cache: Option<&str>) -> Reply {
    app.execute_with(token, id, json!({ "params": params }), cache).await
}

/// Executes with a body sent verbatim (key order as written).
async fn execute_raw(app: &TestApp, token: &str, id: &str, body: &str) -> Reply {
    let r = app
        .client
        .post(app.url(&format!("/api/v1/execute/{id}")))
        .bearer_auth(token)
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    read(r).await
}

fn ok(r: &Reply) -> &Value {
    assert_eq!(r.status, 200, "{:?}", r.body);
    &r.body["result"]
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_params_in_a_retained_session_are_answered_from_the_cache() {
    let app = app_with_probe().await;
    let token = app.admin();
    let id = app.session(&token, FUNCTION, json!({"retain_session": true})).await;

    let first = app.execute(&token, &id, json!({"x": 1})).await;
    let second = app.execute(&token, &id, json!({"x": 1})).await;

    assert_eq!(first.body["cached"], false);
    assert_eq!(second.body["cached"], true);
    assert_eq!(ok(&second), ok(&first), "the cached result is the first one");
    assert_eq!(second.body["request_id"], id.as_str());
    assert_eq!(second.body["language_title"], FUNCTION);
    assert!(second.body["execution_time"].is_u64());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_cache_runs_the_function_again_and_answers_uncached() {
    let app = app_with_probe().await;
    let token = app.admin();
    let id = app.session(&token, FUNCTION, json!({"retain_session": true})).await;
    let first = app.execute(&token, &id, json!({"x": 1})).await;

    let fresh = execute_cached(&app, &token, &id, json!({"x": 1}), Some("no-cache")).await;

    assert_eq!(fresh.body["cached"], false, "{:?}", fresh.body);
    assert_ne!(
        ok(&fresh)["nonce"],
        ok(&first)["nonce"],
        "the function did not run again"
    );
    assert_eq!(ok(&fresh)["runs"], 2);
    // The fresh result replaces the cached one.
    let after = app.execute(&token, &id, json!({"x": 1})).await;
    assert_eq!(after.body["cached"], true);
    assert_eq!(ok(&after)["nonce"], ok(&fresh)["nonce"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_age_does_not_serve_an_entry_older_than_it() {
    let app = app_with_probe().await;
    let token = app.admin();
    let id = app.session(&token, FUNCTION, json!({"retain_session": true})).await;
    let first = app.execute(&token, &id, json!({"x": 1})).await;
    assert_eq!(first.body["cached"], false);

    // Act: the entry is now older than one second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let stale = execute_cached(&app, &token, &id, json!({"x": 1}), Some("max-age=1")).await;
    let young = execute_cached(&app, &token, &id, json!({"x": 1}), Some("max-age=60")).await;

    // Assert
    assert_eq!(stale.body["cached"], false, "{:?}", stale.body);
    assert_ne!(ok(&stale)["nonce"], ok(&first)["nonce"]);
    assert_eq!(young.body["cached"], true, "{:?}", young.body);
    assert_eq!(ok(&young)["nonce"], ok(&stale)["nonce"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_age_zero_never_stores_a_result() {
    let app = app_with_probe().await;
    let token = app.admin();
    let id = app.session(&token, FUNCTION, json!({"retain_session": true})).await;

    let first = execute_cached(&app, &token, &id, json!({"x": 2}), Some("max-age=0")).await;
    let second = app.execute(&token, &id, json!({"x": 2})).await;

    assert_eq!(first.body["cached"], false, "{:?}", first.body);
    assert_eq!(
        second.body["cached"], false,
        "a max-age=0 result was stored: {:?}",
        second.body
    );
    assert_eq!(ok(&second)["runs"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_cache_control_header_is_400_invalid_request() {
    let app = app_with_probe().await;
    let token = app.admin();
    let id = app.session(&token, FUNCTION, json!({"retain_session": true})).await;
    for header in ["max-age=abc", "max-age=-1", "max-age=", "public", "no-store"] {
        let r = execute_cached(&app, &token, &id, json!({}), Some(header)).await;
        assert_eq!(r.status, 400, "{header}: {:?}", r.body);
        assert_eq!(r.code(), "INVALID_REQUEST", "{header}");
        assert_eq!(r.body["request_id"], id.as_str());
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains("X-Cache-Control"),
            "{header}"
        );
    }
    // None of them ran the function.
    let r = execute_cached(&app, &token, &id, json!({}), Some("no-cache")).await;
    assert_eq!(ok(&r)["runs"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_order_of_keys_in_params_does_not_change_the_cache_key() {
    let app = app_with_probe().await;
    let token = app.admin();
    let id = app.session(&token, FUNCTION, json!({"retain_session": true})).await;

    let first = execute_raw(&app, &token, &id, r#"{"params": {"a": 1, "b": {"c": 2, "d": 3}}}"#).await;
    let reordered = execute_raw(&app, &token, &id, r#"{"params": {"b": {"d": 3, "c": 2}, "a": 1}}"#).await;

    assert_eq!(first.body["cached"], false, "{:?}", first.body);
    assert_eq!(reordered.body["cached"], true, "{:?}", reordered.body);
    assert_eq!(ok(&reordered)["nonce"], ok(&first)["nonce"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn different_params_miss_the_cache() {
    let app = app_with_probe().await;
    let token = app.admin();
    let id = app.session(&token, FUNCTION, json!({"retain_session": true})).await;
    let first = app.execute(&token, &id, json!({"a": 1})).await;

    for params in [
        json!({"a": 2}),
        json!({"a": "1"}),
        json!({"a": 1, "b": null}),
        json!({}),
    ] {
        let r = app.execute(&token, &id, params.clone()).await;
        assert_eq!(r.body["cached"], false, "{params}: {:?}", r.body);
        assert_ne!(ok(&r)["nonce"], ok(&first)["nonce"], "{params}");
        assert_eq!(ok(&r)["params"], params);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn another_session_of_the_same_subject_with_the_same_context_hits() {
    let app = app_with_probe().await;
    let token = app.admin();
    let context = json!({"user_id": "u1", "environment": "production"});
    let one = app.session(&token, FUNCTION, context.clone()).await;
    let first = app.execute(&token, &one, json!({"x": 1})).await;

    let two = app.session(&token, FUNCTION, context).await;
    let second = app.execute(&token, &two, json!({"x": 1})).await;

    assert_eq!(second.body["cached"], true, "{:?}", second.body);
    assert_eq!(ok(&second), ok(&first));
    assert_eq!(second.body["request_id"], two.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subject_whose_context_differs_misses() {
    let app = app_with_probe().await;
    let alice = app.token("alice", &["execute:all"]);
    let bob = app.token("bob", &["execute:all"]);
    let alices = app.session(&alice, FUNCTION, json!({"user_id": "u1"})).await;
    let first = app.execute(&alice, &alices, json!({"x": 1})).await;
    assert_eq!(ok(&first)["context"], json!({"user_id": "u1"}));

    let bobs = app.session(&bob, FUNCTION, json!({"user_id": "u2"})).await;
    let second = app.execute(&bob, &bobs, json!({"x": 1})).await;

    assert_eq!(second.body["cached"], false, "{:?}", second.body);
    assert_eq!(
        ok(&second)["context"],
        json!({"user_id": "u2"}),
        "bob got alice's result"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_version_misses_and_sessions_started_before_keep_the_old_code() {
    let app = app_with_probe().await;
    let token = app.admin();
    let before = app.session(&token, FUNCTION, json!({"retain_session": true})).await;
    let old = app.execute(&token, &before, json!({"x": 1})).await;
    assert_eq!(ok(&old)["version"], "v1");

    // Act
    let updated = crate::functions::put_function(
        &app,
        &token,
        FUNCTION,
        json!({"description": "version 2", "code": code("v2")}),
    )
    .await;
    assert_eq!(updated.status, 200, "{:?}", updated.body);
    let after = app.session(&token, FUNCTION, json!({"retain_session": true})).await;
    let new = app.execute(&token, &after, json!({"x": 1})).await;

    // Assert: the new version's session misses and runs the new code...
    assert_eq!(new.body["cached"], false, "{:?}", new.body);
    assert_eq!(ok(&new)["version"], "v2");
    // ...while the older session still gets version 1, cached or run.
    let cached_old = app.execute(&token, &before, json!({"x": 1})).await;
    assert_eq!(ok(&cached_old)["version"], "v1", "{:?}", cached_old.body);
    let rerun_old = execute_cached(&app, &token, &before, json!({"x": 1}), Some("no-cache")).await;
    assert_eq!(rerun_old.body["cached"], false);
    assert_eq!(ok(&rerun_old)["version"], "v1");
    assert_eq!(ok(&rerun_old)["runs"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_errors_and_invalid_params_from_the_function_are_never_cached() {
    let app = app_with_probe().await;
    let token = app.admin();
    let id = app.session(&token, FUNCTION, json!({"retain_session": true})).await;
    for (fail, status, code) in [("runtime", 500, "RUNTIME_ERROR"), ("invalid", 400, "INVALID_PARAMS")] {
        let first = app.execute(&token, &id, json!({"fail": fail})).await;
        let second = app.execute(&token, &id, json!({"fail": fail})).await;

        assert_eq!(first.status, status, "{fail}: {:?}", first.body);
        assert_eq!(first.code(), code);
        assert_eq!(second.status, status, "{fail}: {:?}", second.body);
        assert_eq!(second.code(), code);
        // The run counter in the message moved on: the function ran again.
        let (m1, m2) = (
            first.body["error"]["message"].as_str().unwrap(),
            second.body["error"]["message"].as_str().unwrap(),
        );
        assert_ne!(m1, m2, "{fail}: the second error was a replay");
    }
    let r = execute_cached(&app, &token, &id, json!({}), Some("no-cache")).await;
    assert_eq!(ok(&r)["runs"], 5, "every failing call ran the function");
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_are_never_cached() {
    let app = app_with_probe().await;
    let token = app.admin();
    let id = app
        .session(&token, FUNCTION, json!({"timeout_ms": 500, "retain_session": true}))
        .await;
    for attempt in 1..=2 {
        let started = Instant::now();
        let r = app.execute(&token, &id, json!({"fail": "loop"})).await;
        let elapsed = started.elapsed();

        assert_eq!(r.status, 504, "attempt {attempt}: {:?}", r.body);
        assert_eq!(r.code(), "TIMEOUT");
        assert!(
            elapsed >= Duration::from_millis(500),
            "attempt {attempt} did not run: {elapsed:?}"
        );
        assert!(elapsed < Duration::from_millis(2000), "attempt {attempt}: {elapsed:?}");
    }
    // The session carries on with a fresh instance.
    let r = app.execute(&token, &id, json!({})).await;
    assert_eq!(ok(&r)["runs"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_runs_before_the_cache() {
    let app = app_with_probe().await;
    let token = app.admin();
    let id = app.session(&token, FUNCTION, json!({"retain_session": true})).await;
    app.execute(&token, &id, json!({"x": 1})).await;
    let hit = app.execute(&token, &id, json!({"x": 1})).await;
    assert_eq!(hit.body["cached"], true, "the result should be cached: {:?}", hit.body);

    let cases = [
        (
            "alice without any execute scope",
            app.token("alice", &["read:functions"]),
            403,
            "FORBIDDEN",
        ),
        (
            "alice with another language's scope",
            app.token("alice", &["execute:python"]),
            403,
            "FORBIDDEN",
        ),
        (
            "another subject",
            app.token("mallory", &["execute:all", "read:functions"]),
            404,
            "NOT_FOUND",
        ),
    ];
    for (who, other, status, code) in cases {
        let r = app.execute(&other, &id, json!({"x": 1})).await;

        assert_eq!(r.status, status, "{who}: {:?}", r.body);
        assert_eq!(r.code(), code, "{who}");
        assert!(
            r.body.get("result").is_none(),
            "{who} got the cached result: {:?}",
            r.body
        );
        assert_eq!(r.body["request_id"], id.as_str());
    }
    let bad = app
        .execute_with("not-a-token", &id, json!({"params": {"x": 1}}), None)
        .await;
    assert_eq!(bad.status, 401, "{:?}", bad.body);
    assert!(bad.body.get("result").is_none());
}

/// Registers the probe as `title` with a `cache` policy; a retained session on it.
async fn probe_with_policy(app: &TestApp, title: &str, cache: Value) -> String {
    app.register(title, &code("v1"), json!({ "cache": cache })).await;
    app.session(&app.admin(), title, json!({"retain_session": true})).await
}

fn nonce(r: &Reply) -> String {
    ok(r)["nonce"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_function_with_caching_disabled_is_never_cached_whatever_the_client_asks() {
    let app = spawn_app().await;
    let token = app.admin();
    let id = probe_with_policy(&app, "nodejs-fresh", json!({"enabled": false})).await;
    let detail = app.get(Some(&token), "/api/v1/functions/nodejs-fresh").await;
    assert_eq!(detail.body["cache"]["enabled"], false, "{:?}", detail.body);

    // Act: the same params, plain and with a max-age.
    let a = execute_cached(&app, &token, &id, json!({"x": 1}), None).await;
    let b = execute_cached(&app, &token, &id, json!({"x": 1}), None).await;
    let c = execute_cached(&app, &token, &id, json!({"x": 1}), Some("max-age=60")).await;
    let d = execute_cached(&app, &token, &id, json!({"x": 1}), Some("max-age=60")).await;

    // Assert
    for r in [&a, &b, &c, &d] {
        assert_eq!(r.body["cached"], false, "{:?}", r.body);
    }
    let nonces: std::collections::HashSet<String> = [&a, &b, &c, &d].into_iter().map(nonce).collect();
    assert_eq!(nonces.len(), 4, "every call ran the function");
    let metrics = app.metrics().await;
    assert!(
        !metrics.contains(r#"language_title="nodejs-fresh",result="hit""#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_functions_own_ttl_is_honoured_and_hits_and_misses_are_counted_per_function() {
    let app = spawn_app().await;
    let token = app.admin();
    let id = probe_with_policy(&app, "nodejs-brief", json!({"ttl_secs": 1})).await;

    // Act
    let first = execute_cached(&app, &token, &id, json!({"x": 1}), None).await;
    let hit = execute_cached(&app, &token, &id, json!({"x": 1}), None).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let expired = execute_cached(&app, &token, &id, json!({"x": 1}), None).await;

    // Assert
    assert_eq!((hit.body["cached"].as_bool(), nonce(&hit)), (Some(true), nonce(&first)));
    assert_eq!(
        expired.body["cached"], false,
        "kept past its ttl_secs: {:?}",
        expired.body
    );
    assert_ne!(nonce(&expired), nonce(&first));
    let metrics = app.metrics().await;
    for (result, n) in [("hit", 1), ("miss", 2)] {
        let line =
            format!(r#"lambda_function_cache_requests_total{{language_title="nodejs-brief",result="{result}"}} {n}"#);
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_policy_that_makes_no_sense_is_refused_at_registration() {
    let app = spawn_app().await;
    for (cache, says) in [
        (
            json!({"ttl_secs": 60, "l1_ttl_secs": 600}),
            "'cache.l1_ttl_secs' must not be longer",
        ),
        (json!({"ttl_secs": 0}), "'cache.ttl_secs' must be between 1"),
        (
            json!({"enabled": false, "ttl_secs": 5}),
            "mean nothing with 'cache.enabled': false",
        ),
        (json!({"ttl": 5}), "unknown field"),
    ] {
        let r = app
            .client
            .post(app.url("/api/v1/functions"))
            .bearer_auth(app.admin())
            .json(&json!({
                "language_title": "nodejs-odd",
                "description": "odd cache",
                "code": code("v1"),
                "cache": cache,
            }))
            .send()
            .await
            .unwrap();
        let r = read(r).await;
        assert_eq!(r.status, 400, "{cache}: {:?}", r.body);
        let message = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{cache}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn l1_and_l2_keep_a_result_for_their_own_ttls() {
    let Some(redis) = crate::replicas::redis_url() else {
        return;
    };
    let app = crate::helpers::spawn_app_with(&["--redis-url", &redis]).await;
    let token = app.admin();
    let title = format!("nodejs-layered{}", uuid::Uuid::new_v4().simple());
    let id = probe_with_policy(&app, &title, json!({"ttl_secs": 60, "l1_ttl_secs": 1})).await;
    let params = json!({"x": uuid::Uuid::new_v4().to_string()});

    // Act: stored in both; L1 forgets it after 1 s, L2 still has it.
    let first = execute_cached(&app, &token, &id, params.clone(), None).await;
    let from_l1 = execute_cached(&app, &token, &id, params.clone(), None).await;
    let before = app.metrics().await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let from_l2 = execute_cached(&app, &token, &id, params.clone(), None).await;
    let after = app.metrics().await;

    // Assert
    assert_eq!(nonce(&from_l1), nonce(&first));
    assert_eq!(
        (from_l2.body["cached"].as_bool(), nonce(&from_l2)),
        (Some(true), nonce(&first))
    );
    let count = |metrics: &str, layer: &str, result: &str| -> u64 {
        let prefix = format!(r#"lambda_cache_requests_total{{layer="{layer}",result="{result}"}} "#);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |n| n.parse().unwrap())
    };
    assert_eq!(
        count(&after, "l1", "miss") - count(&before, "l1", "miss"),
        1,
        "L1 forgot it"
    );
    assert_eq!(
        count(&after, "l2", "hit") - count(&before, "l2", "hit"),
        1,
        "L2 served it"
    );
}
