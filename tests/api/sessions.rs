//! `GET` / `DELETE /api/v1/sessions/{request_id}` beyond contract.rs: the
//! whole shape across executions, what a deleted session answers everywhere,
//! and instances released when a session expires; `GET /api/v1/sessions`,
//! the caller's, filtered and paged, in process and shared through Redis.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestApp, eventually, read, spawn_app, spawn_app_with};

fn unix(rfc3339: &str) -> i64 {
    fnrt_core::timefmt::parse(rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339:?} is not RFC 3339: {e}"))
        .unix_timestamp()
}

pub(crate) async fn delete(app: &TestApp, token: Option<&str>, id: &str) -> crate::helpers::Reply {
    let mut request = app.client.delete(app.url(&format!("/api/v1/sessions/{id}")));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    read(request.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retained_session_reports_each_execution_and_its_times() {
    // Arrange
    let app = spawn_app_with(&["--session-ttl-secs", "600"]).await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-counter", json!({"retain_session": true}))
        .await;
    let path = format!("/api/v1/sessions/{id}");

    // Act
    let fresh = app.get(Some(&token), &path).await;
    let mut after = Vec::new();
    for _ in 0..3 {
        let r = app
            .execute_with(&token, &id, json!({"params": {}}), Some("no-cache"))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        after.push(app.get(Some(&token), &path).await);
    }

    // Assert
    assert_eq!(fresh.status, 200);
    let keys: Vec<&str> = fresh.body.as_object().unwrap().keys().map(String::as_str).collect();
    for key in [
        "request_id",
        "language_title",
        "status",
        "created_at",
        "expires_at",
        "execution_count",
        "last_executed_at",
    ] {
        assert!(keys.contains(&key), "{key} missing from {:?}", fresh.body);
    }
    assert_eq!(fresh.body["request_id"], id.as_str());
    assert_eq!(fresh.body["language_title"], "nodejs-counter");
    assert_eq!(fresh.body["status"], "active");
    assert_eq!(fresh.body["execution_count"], 0);
    assert_eq!(fresh.body["last_executed_at"], Value::Null);
    let created = unix(fresh.body["created_at"].as_str().unwrap());
    assert_eq!(unix(fresh.body["expires_at"].as_str().unwrap()) - created, 600);
    for (n, s) in after.iter().enumerate() {
        assert_eq!(s.body["execution_count"], n as u64 + 1, "{:?}", s.body);
        assert_eq!(s.body["status"], "active", "a retained session stays active");
        assert_eq!(s.body["created_at"], fresh.body["created_at"]);
        assert_eq!(
            s.body["expires_at"], fresh.body["expires_at"],
            "executing does not extend the session"
        );
        let last = unix(s.body["last_executed_at"].as_str().unwrap());
        assert!(last >= created, "{:?}", s.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_session_is_404_everywhere_and_deleting_needs_a_token() {
    // Arrange
    let app = spawn_app().await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;

    // Act
    let anonymous = delete(&app, None, &id).await;
    let deleted = delete(&app, Some(&token), &id).await;
    let execute = app
        .execute(&token, &id, json!({"operation": "add", "values": [1]}))
        .await;
    let get = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
    let again = delete(&app, Some(&token), &id).await;
    let never_existed = delete(&app, Some(&token), "no-such-session").await;

    // Assert
    assert_eq!(anonymous.status, 401, "{:?}", anonymous.body);
    assert_eq!(anonymous.code(), "UNAUTHORIZED");
    assert_eq!(deleted.status, 204);
    assert_eq!(deleted.body, Value::Null, "204 has no body");
    assert_eq!(execute.status, 404, "{:?}", execute.body);
    assert_eq!(execute.code(), "NOT_FOUND");
    assert_eq!(execute.body["request_id"], id.as_str());
    for (what, r) in [("get", &get), ("second delete", &again), ("unknown ID", &never_existed)] {
        assert_eq!(r.status, 404, "{what}: {:?}", r.body);
        assert_eq!(r.code(), "NOT_FOUND", "{what}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_completed_one_shot_session_can_still_be_read_and_deleted() {
    // Arrange
    let app = spawn_app().await;
    let token = app.admin();
    let id = app.session(&token, "nodejs-calculator", json!({})).await;
    app.execute(&token, &id, json!({"operation": "add", "values": [1]}))
        .await;

    // Act
    let completed = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
    let deleted = delete(&app, Some(&token), &id).await;
    let gone = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;

    // Assert
    assert_eq!(completed.body["status"], "completed", "{:?}", completed.body);
    assert!(completed.body["last_executed_at"].is_string());
    assert_eq!(deleted.status, 204);
    assert_eq!(gone.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_active_sessions_gauge_follows_sessions_at_each_scrape() {
    // Arrange
    let app = spawn_app().await;
    let token = app.admin();
    let active = |metrics: &str| crate::helpers::sample(metrics, "lambda_active_sessions");
    let before = active(&app.metrics().await);
    let kept = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let one_shot = app.session(&token, "nodejs-calculator", json!({})).await;

    // Act
    let opened = active(&app.metrics().await);
    app.execute(&token, &one_shot, json!({"operation": "add", "values": [1]}))
        .await;
    let one_shot_done = active(&app.metrics().await);
    assert_eq!(delete(&app, Some(&token), &kept).await.status, 204);
    let kept_deleted = active(&app.metrics().await);

    // Assert
    assert_eq!(before, Some(0.0));
    assert_eq!(opened, Some(2.0), "two sessions opened");
    assert_eq!(one_shot_done, Some(1.0), "a one-shot session is spent by its execute");
    assert_eq!(kept_deleted, Some(0.0), "a deleted session no longer counts");
}

/// Instance directories whose runtime process has a data limit of `mib`: a
/// memory cap of its own tells a function's instances from the warm pool's.
/// An instance is found by the host directory its command line names (the
/// one bubblewrap binds, or the runtime's socket in it).
pub(crate) fn instances_capped_at(app: &TestApp, mib: u64) -> Vec<std::path::PathBuf> {
    let instances = app.data_dir.path().join("instances");
    let limit = (mib * 1024 * 1024).to_string();
    let mut found = std::collections::BTreeSet::new();
    for pid in crate::helpers::pids() {
        let proc_dir = std::path::Path::new("/proc").join(pid.to_string());
        let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
            continue;
        };
        let Some(dir) = cmdline
            .split(|b| *b == 0)
            .map(|arg| std::path::PathBuf::from(String::from_utf8_lossy(arg).into_owned()))
            .find(|arg| arg.starts_with(&instances) && arg != &instances)
        else {
            continue;
        };
        let dir = match dir.file_name() {
            Some(name) if name == "rt.sock" => dir.parent().unwrap().to_path_buf(),
            _ => dir,
        };
        let limits = std::fs::read_to_string(proc_dir.join("limits")).unwrap_or_default();
        if limits
            .lines()
            .any(|l| l.starts_with("Max data size") && l.split_whitespace().nth(3) == Some(limit.as_str()))
        {
            found.insert(dir);
        }
    }
    found.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_retained_session_releases_its_instance() {
    // Arrange: a function with a memory cap of its own starts its own instance.
    let app = spawn_app_with(&["--session-ttl-secs", "1"]).await;
    let token = app.admin();
    app.register(
        "nodejs-capped",
        "module.exports.handler = () => ({ ok: true });",
        json!({"limits": {"memory_mb": 128}}),
    )
    .await;
    let id = app
        .session(&token, "nodejs-capped", json!({"retain_session": true}))
        .await;
    let retained = instances_capped_at(&app, 128);
    assert_eq!(retained.len(), 1, "one instance for the retained session: {retained:?}");
    let dir = retained[0].clone();

    // Act: the session expires after a second; the sweeper then releases it.
    let mut status = 200;
    for _ in 0..40 {
        status = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await.status;
        if status == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Assert
    assert_eq!(status, 404, "the session did not expire");
    assert!(
        eventually(Duration::from_secs(10), || !dir.exists()
            && instances_capped_at(&app, 128).is_empty())
        .await,
        "the expired session's instance is still running in {}",
        dir.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_id_another_subject_uses_is_free_and_reveals_nothing() {
    // Arrange: alice initializes with a client-chosen X-Request-ID.
    let app = spawn_app().await;
    let alice = app.admin();
    let bob = app.token("bob", &["execute:all"]);
    let id = format!("shared-{}", uuid::Uuid::new_v4());
    let initialize = |token: String, title: &'static str| {
        let app = &app;
        let id = id.clone();
        async move {
            let r = app
                .client
                .post(app.url("/api/v1/initialize"))
                .bearer_auth(token)
                .header("Language-Title", title)
                .header("X-Request-ID", id)
                .json(&json!({"context": {"retain_session": true}}))
                .send()
                .await
                .unwrap();
            read(r).await
        }
    };
    let first = initialize(alice.clone(), "nodejs-calculator").await;
    assert_eq!(first.status, 200, "{:?}", first.body);

    // Act: bob chooses the same ID, for another function.
    let second = initialize(bob.clone(), "python-calculator").await;
    let again = initialize(alice.clone(), "nodejs-calculator").await;

    // Assert: bob's initialize answers as for any free ID; each subject's
    // ID names its own session; alice's own reuse is still a conflict.
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(second.body["request_id"], id.as_str());
    assert_eq!(again.status, 409, "{:?}", again.body);
    let params = json!({"operation": "add", "values": [2, 3]});
    let a = app.execute(&alice, &id, params.clone()).await;
    let b = app.execute(&bob, &id, params).await;
    assert_eq!((a.status, b.status), (200, 200), "{:?} {:?}", a.body, b.body);
    assert_eq!(a.body["language_title"], "nodejs-calculator");
    assert_eq!(b.body["language_title"], "python-calculator");
    assert_eq!(delete(&app, Some(&bob), &id).await.status, 204);
    let still = app.get(Some(&alice), &format!("/api/v1/sessions/{id}")).await;
    assert_eq!(
        still.status, 200,
        "bob's delete ended alice's session: {:?}",
        still.body
    );
}

/// The request IDs and statuses of a session list, in its order.
fn listed(r: &crate::helpers::Reply) -> Vec<(String, String)> {
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["sessions"]
        .as_array()
        .unwrap_or_else(|| panic!("no sessions array: {:?}", r.body))
        .iter()
        .map(|s| {
            (
                s["request_id"].as_str().unwrap().to_owned(),
                s["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pair(id: &str, status: &str) -> (String, String) {
    (id.to_owned(), status.to_owned())
}

/// Sessions' `created_at` are whole seconds: wait into the next one, so
/// the next session is strictly newer.
async fn next_second() {
    tokio::time::sleep(Duration::from_millis(1050)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listing_sessions_shows_the_callers_own_newest_first_filtered_and_paged() {
    // Arrange: alice has three sessions, the one-shot one completed; bob one.
    let app = spawn_app().await;
    let alice = app.token("alice", &["execute:all"]);
    let bob = app.token("bob", &["execute:all"]);
    let params = json!({"operation": "add", "values": [1, 2]});
    let first = app
        .session(&alice, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    next_second().await;
    let one_shot = app.session(&alice, "nodejs-calculator", json!({})).await;
    let ran = app.execute(&alice, &one_shot, params.clone()).await;
    assert_eq!(ran.status, 200, "{:?}", ran.body);
    next_second().await;
    let newest = app
        .session(&alice, "nodejs-counter", json!({"retain_session": true}))
        .await;
    let bobs = app
        .session(&bob, "nodejs-calculator", json!({"retain_session": true}))
        .await;

    // Act
    let all = app.get(Some(&alice), "/api/v1/sessions").await;
    let active = app.get(Some(&alice), "/api/v1/sessions?status=active").await;
    let completed = app.get(Some(&alice), "/api/v1/sessions?status=completed").await;
    let page_2 = app.get(Some(&alice), "/api/v1/sessions?per_page=2&page=2").await;
    let counter = app
        .get(Some(&alice), "/api/v1/sessions?language_title=nodejs-counter")
        .await;
    let bob_all = app.get(Some(&bob), "/api/v1/sessions").await;
    let carol = app.get(Some(&app.token("carol", &[])), "/api/v1/sessions").await;
    let bad_status = app.get(Some(&alice), "/api/v1/sessions?status=running").await;
    let bad_page = app.get(Some(&alice), "/api/v1/sessions?per_page=101").await;
    let anonymous = app.get(None, "/api/v1/sessions").await;

    // Assert: exactly alice's, newest first, each in the session view.
    assert_eq!(
        listed(&all),
        [
            pair(&newest, "active"),
            pair(&one_shot, "completed"),
            pair(&first, "active")
        ]
    );
    assert_eq!(
        (&all.body["total"], &all.body["page"], &all.body["per_page"]),
        (&json!(3), &json!(1), &json!(20))
    );
    let mut keys: Vec<&str> = all.body.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["page", "per_page", "sessions", "total"]);
    let completed_one = &all.body["sessions"][1];
    assert_eq!(completed_one["language_title"], "nodejs-calculator");
    assert_eq!(completed_one["execution_count"], 1);
    assert!(completed_one["last_executed_at"].is_string(), "{completed_one:?}");
    assert_eq!(completed_one["retain_session"], false);
    assert_eq!(all.body["sessions"][0]["language_title"], "nodejs-counter");
    let single = app.get(Some(&alice), &format!("/api/v1/sessions/{first}")).await;
    assert_eq!(all.body["sessions"][2], single.body, "the list shows the session view");
    let created: Vec<i64> = all.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| unix(s["created_at"].as_str().unwrap()))
        .collect();
    assert!(created[0] > created[1] && created[1] > created[2], "{created:?}");

    // Filters and pages.
    assert_eq!(listed(&active), [pair(&newest, "active"), pair(&first, "active")]);
    assert_eq!(active.body["total"], 2);
    assert_eq!(listed(&completed), [pair(&one_shot, "completed")]);
    assert_eq!(listed(&page_2), [pair(&first, "active")]);
    assert_eq!(
        (&page_2.body["total"], &page_2.body["page"], &page_2.body["per_page"]),
        (&json!(3), &json!(2), &json!(2))
    );
    assert_eq!(listed(&counter), [pair(&newest, "active")]);

    // Nobody sees anyone else's; any valid token may ask.
    assert_eq!(listed(&bob_all), [pair(&bobs, "active")]);
    assert_eq!(bob_all.body["total"], 1);
    assert_eq!(listed(&carol), []);
    assert_eq!(carol.body["total"], 0);

    // Refusals.
    assert_eq!(bad_status.status, 400, "{:?}", bad_status.body);
    assert_eq!(bad_status.code(), "INVALID_REQUEST");
    let message = bad_status.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("active") && message.contains("completed"), "{message}");
    assert_eq!(bad_page.status, 400, "{:?}", bad_page.body);
    assert_eq!(bad_page.code(), "INVALID_REQUEST");
    assert_eq!(anonymous.status, 401, "{:?}", anonymous.body);
    assert_eq!(anonymous.code(), "UNAUTHORIZED");

    // A session ended is no longer listed.
    assert_eq!(delete(&app, Some(&alice), &first).await.status, 204);
    let after = app.get(Some(&alice), "/api/v1/sessions").await;
    assert_eq!(listed(&after), [pair(&newest, "active"), pair(&one_shot, "completed")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_sessions_are_never_listed() {
    // Arrange
    let app = spawn_app_with(&["--session-ttl-secs", "1"]).await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;

    // Act: the session ends within two seconds (times are whole seconds).
    let fresh = app.get(Some(&token), "/api/v1/sessions").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let later = app.get(Some(&token), "/api/v1/sessions").await;

    // Assert
    assert_eq!(listed(&fresh), [pair(&id, "active")]);
    assert_eq!(listed(&later), []);
    assert_eq!(later.body["total"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn controllers_sharing_redis_list_each_others_sessions() {
    let Some(redis) = crate::replicas::redis_url() else {
        return;
    };
    let a = spawn_app_with(&["--redis-url", &redis]).await;
    let b = spawn_app_with(&["--redis-url", &redis]).await;
    // A subject of its own: the shared Redis outlives test runs.
    let sub = format!("lister-{}", uuid::Uuid::new_v4());
    let token = a.token(&sub, &["execute:all"]);
    let other = a.token(&format!("{sub}-other"), &["execute:all"]);

    let on_a = a
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    next_second().await;
    let on_b = b.session(&token, "nodejs-calculator", json!({})).await;
    let ran = b
        .execute(&token, &on_b, json!({"operation": "add", "values": [1, 2]}))
        .await;
    assert_eq!(ran.status, 200, "{:?}", ran.body);
    a.session(&other, "nodejs-calculator", json!({})).await;

    let from_a = a.get(Some(&token), "/api/v1/sessions").await;
    let from_b = b.get(Some(&token), "/api/v1/sessions?status=active").await;
    assert_eq!(listed(&from_a), [pair(&on_b, "completed"), pair(&on_a, "active")]);
    assert_eq!(listed(&from_b), [pair(&on_a, "active")]);

    assert_eq!(delete(&b, Some(&token), &on_a).await.status, 204);
    let after = a.get(Some(&token), "/api/v1/sessions").await;
    assert_eq!(listed(&after), [pair(&on_b, "completed")]);
}

/// Runs executes of a retained session until the rate limit refuses three,
/// among them malformed and schema-refused ones; then, once the limit lets
/// the caller in again, the session has counted exactly the executions
/// that were answered 200. Over the limit, a malformed request is 429 too.
async fn only_admitted_executions_count_on_a_retained_session(app: &TestApp, sub: &str) {
    let token = app.token(sub, &["execute:all"]);
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let url = app.url(&format!("/api/v1/execute/{id}"));
    let malformed = || async {
        let sent = app
            .client
            .post(&url)
            .bearer_auth(&token)
            .header("Content-Type", "application/json")
            .body("{\"params\": ")
            .send()
            .await
            .unwrap();
        read(sent).await
    };
    let (mut answered, mut limited) = (0u64, 0);
    for i in 0..400 {
        let reply = match i % 4 {
            0 => malformed().await,
            1 => app.execute(&token, &id, json!({"operation": "add"})).await,
            _ => {
                app.execute(&token, &id, json!({"operation": "add", "values": [1, 2]}))
                    .await
            }
        };
        match (reply.status, i % 4) {
            (200, 2 | 3) => answered += 1,
            (400, 0 | 1) => {}
            (429, _) => {
                assert_eq!(reply.code(), "RATE_LIMITED", "{:?}", reply.body);
                assert_eq!(reply.body["request_id"], id.as_str());
                limited += 1;
                if limited == 3 {
                    break;
                }
            }
            other => panic!("request {i}: {other:?} {:?}", reply.body),
        }
    }
    assert_eq!(limited, 3, "the limit never refused");
    assert!(answered > 0);
    // Over the limit still (its interval is two seconds): 429 before 400.
    let over = malformed().await;
    assert_eq!((over.status, over.code()), (429, "RATE_LIMITED"), "{:?}", over.body);

    let mut status = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
    for _ in 0..50 {
        if status.status != 429 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        status = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
    }
    assert_eq!(status.status, 200, "{:?}", status.body);
    assert_eq!(status.body["execution_count"], answered, "{:?}", status.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn executes_over_the_rate_limit_count_nothing_on_their_session() {
    let app = spawn_app_with(&["--rate-limit-execute", "30"]).await;
    only_admitted_executions_count_on_a_retained_session(&app, "counted").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn executes_over_the_shared_rate_limit_count_nothing_on_their_session() {
    let Some(redis) = crate::replicas::redis_url() else {
        return;
    };
    let app = spawn_app_with(&["--redis-url", &redis, "--rate-limit-execute", "30"]).await;
    // A subject of its own: the shared Redis outlives test runs.
    let sub = format!("counted-{}", uuid::Uuid::new_v4());
    only_admitted_executions_count_on_a_retained_session(&app, &sub).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_subject_holds_a_bounded_number_of_retained_sessions() {
    // Arrange: two a subject. Each retained session keeps an instance (a
    // process here) until it ends: without a cap one token could start
    // them until the machine runs out of memory.
    let app = spawn_app_with(&["--max-sessions-per-subject", "2"]).await;
    let alice = app.token("alice", &["execute:all"]);
    let bob = app.token("bob", &["execute:all"]);
    let retained = json!({"context": {"retain_session": true}});
    // A function whose code fails as it loads: its initializes give their
    // count back.
    app.register(
        "nodejs-broken-load",
        "throw new Error('broken at load');\nmodule.exports.handler = async () => ({});\n",
        json!({}),
    )
    .await;
    for _ in 0..3 {
        let r = app.initialize(&alice, "nodejs-broken-load", retained.clone()).await;
        assert_eq!(r.status, 500, "{:?}", r.body);
    }
    let mut held = Vec::new();
    for _ in 0..2 {
        let r = app.initialize(&alice, "nodejs-counter", retained.clone()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        held.push(r.body["request_id"].as_str().unwrap().to_owned());
    }

    // A live session's ID asked for again is 409, and frees nothing.
    let reused = app
        .client
        .post(app.url("/api/v1/initialize"))
        .bearer_auth(&alice)
        .header("Language-Title", "nodejs-counter")
        .header("X-Request-ID", &held[1])
        .json(&retained)
        .send()
        .await
        .unwrap();
    assert_eq!(read(reused).await.status, 409);

    // Act
    let third = app.initialize(&alice, "nodejs-counter", retained.clone()).await;

    // Assert: refused, saying why; what holds no instance, and another
    // subject, are not.
    assert_eq!((third.status, third.code()), (429, "RATE_LIMITED"), "{:?}", third.body);
    let message = third.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("MAX_SESSIONS_PER_SUBJECT"), "{message}");
    assert!(third.headers.contains_key("retry-after"));
    let one_shot = app.initialize(&alice, "nodejs-counter", json!({"context": {}})).await;
    assert_eq!(one_shot.status, 200, "{:?}", one_shot.body);
    let wasm = app.initialize(&alice, "wasm-hello", retained.clone()).await;
    assert_eq!(wasm.status, 200, "a fresh instance per run: none held {:?}", wasm.body);
    let bobs = app.initialize(&bob, "nodejs-counter", retained.clone()).await;
    assert_eq!(bobs.status, 200, "{:?}", bobs.body);
    // Ending one makes room.
    assert_eq!(delete(&app, Some(&alice), &held[0]).await.status, 204);
    let again = app.initialize(&alice, "nodejs-counter", retained).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn retained_sessions_of_every_subject_stay_within_the_instances_memory_budget() {
    // Arrange: room for two instances of 256 MiB, no warm pool, and a
    // start that waits a second for room. Two subjects each retain one.
    let app = spawn_app_with(&[
        "--instance-memory-mb",
        "512",
        "--warm-pool-size",
        "0",
        "--instance-wait-secs",
        "1",
    ])
    .await;
    let code = "def handler(params, context):\n    return {'ok': True}\n";
    app.register("python-sized", code, json!({"limits": {"memory_mb": 256}}))
        .await;
    app.register("python-huge", code, json!({"limits": {"memory_mb": 1024}}))
        .await;
    let alice = app.token("alice", &["execute:all"]);
    let bob = app.token("bob", &["execute:all"]);
    let retained = json!({"context": {"retain_session": true}});
    let mut held = Vec::new();
    for token in [&alice, &bob] {
        let r = app.initialize(token, "python-sized", retained.clone()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        held.push(r.body["request_id"].as_str().unwrap().to_owned());
    }

    // Act
    let third = app.initialize(&alice, "python-sized", retained.clone()).await;
    let huge = app.initialize(&bob, "python-huge", json!({"context": {}})).await;

    // Assert: no room is 503, saying which budget is spent; a function
    // larger than the whole budget says it can never start.
    assert_eq!((third.status, third.code()), (503, "UNAVAILABLE"), "{:?}", third.body);
    let message = third.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("hold 512 of its 512 MiB (INSTANCE_MEMORY_MB)"),
        "{message}"
    );
    assert_eq!((huge.status, huge.code()), (503, "UNAVAILABLE"), "{:?}", huge.body);
    let message = huge.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("more than all the memory"), "{message}");
    // Ending one makes room, for anyone.
    assert_eq!(delete(&app, Some(&alice), &held[0]).await.status, 204);
    let again = app.initialize(&bob, "python-sized", retained).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    let r = app
        .execute(&bob, again.body["request_id"].as_str().unwrap(), json!({}))
        .await;
    assert_eq!(r.body["result"], json!({"ok": true}), "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_that_finds_the_budget_held_by_the_warm_pool_stops_a_warm_instance_for_it() {
    // Arrange: two warm Node instances of 256 MiB fill a budget of 512.
    let app = spawn_app_with(&[
        "--instance-memory-mb",
        "512",
        "--warm-pool-size",
        "2",
        "--instance-wait-secs",
        "1",
    ])
    .await;
    let code = "def handler(params, context):\n    return {'ok': True}\n";
    app.register("python-small", code, json!({"limits": {"memory_mb": 64}}))
        .await;
    let warm_node = |metrics: &str| {
        crate::helpers::sample(metrics, r#"lambda_instances{language="nodejs",state="warm"}"#).unwrap_or(0.0)
    };
    let mut full = false;
    for _ in 0..250 {
        if warm_node(&app.metrics().await) == 2.0 {
            full = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(full, "the warm pool never filled: {}", app.metrics().await);

    // Act: a function of another memory class starts cold.
    let token = app.admin();
    let r = app.initialize(&token, "python-small", json!({"context": {}})).await;

    // Assert: it started, in the room of a warm instance.
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = r.body["request_id"].as_str().unwrap();
    let ran = app.execute(&token, id, json!({})).await;
    assert_eq!(ran.body["result"], json!({"ok": true}), "{:?}", ran.body);
}
