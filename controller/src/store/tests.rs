//! One set of assertions, run against the stores of every database.
//!
//! PostgreSQL comes from `TEST_DATABASE_URL` or `DATABASE_URL` (a server
//! URL; each test creates and drops a database of its own). Without one, the
//! PostgreSQL half is skipped with a message, except under `CI=true`, where
//! it fails.

use serde_json::json;
use time::macros::datetime;

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::{
    Claim, ExecutionFilter, ExecutionQueue, ExecutionRecord, ExecutionStore, FileRecords, Finish, FunctionStore,
    NewExecution, NewVersion, Source, StoreError, StoredFile, Stores,
};

fn new(lt: &str, code: &str) -> NewVersion {
    NewVersion {
        language_title: lt.into(),
        language: "nodejs".into(),
        title: lt.trim_start_matches("nodejs-").into(),
        description: format!("description of {code}"),
        manifest: json!({"entrypoint": "index.js", "nested": {"b": 2, "a": [1, 2]}}),
        code: code.into(),
        code_hash: format!("hash-{code}"),
        owner: Some("alice".into()),
        quota: None,
        installed_bytes: 0,
    }
}

/// A quota counts every version of an owner's functions, refuses the
/// version (or function) that would pass it and writes nothing of it, and
/// registrations that come together pass it no more than one at a time.
async fn exercise_function_quota(store: &dyn FunctionStore) {
    let of = |lt: &str, owner: &str, code: &str, quota: i64| NewVersion {
        owner: Some(owner.into()),
        quota: Some(quota),
        ..new(lt, code)
    };
    let small = of("nodejs-q1", "quinn", &"x".repeat(100), 0).size();
    let quota = small * 3;
    assert_eq!(store.function_bytes("quinn").await.unwrap(), 0);
    store
        .create(of("nodejs-q1", "quinn", &"x".repeat(100), quota), Source::Api)
        .await
        .unwrap();
    store
        .add_version(
            of("nodejs-q1", "quinn", &"y".repeat(100), quota),
            Source::Api,
            Some("quinn"),
        )
        .await
        .unwrap();
    assert_eq!(store.function_bytes("quinn").await.unwrap(), small * 2);
    let big = of("nodejs-q1", "quinn", &"z".repeat(200), quota);
    let refused = store.add_version(big, Source::Api, Some("quinn")).await.unwrap_err();
    assert!(
        matches!(refused, StoreError::OverQuota { used, .. } if used == small * 2),
        "{refused:?}"
    );
    assert_eq!(
        store.function("nodejs-q1").await.unwrap().unwrap().current.version,
        2,
        "nothing written"
    );
    let refused = store
        .create(of("nodejs-q2", "quinn", &"z".repeat(200), quota), Source::Api)
        .await;
    assert!(matches!(refused, Err(StoreError::OverQuota { .. })));
    assert!(store.function("nodejs-q2").await.unwrap().is_none(), "nothing written");
    // Another owner's quota is its own; the controller's functions have none.
    store
        .create(of("nodejs-q3", "rita", &"x".repeat(100), quota), Source::Api)
        .await
        .unwrap();
    // Registrations that come together.
    for round in 0..4 {
        let owner = format!("sam-{round}");
        let news: Vec<NewVersion> = (0..6)
            .map(|i| of(&format!("nodejs-q-{owner}-{i}"), &owner, &"x".repeat(100), quota))
            .collect();
        let created = futures::future::join_all(news.into_iter().map(|n| store.create(n, Source::Api))).await;
        let passed: Vec<bool> = created.iter().map(Result::is_ok).collect();
        assert_eq!(passed.iter().filter(|ok| **ok).count(), 3, "{passed:?}");
        assert_eq!(store.function_bytes(&owner).await.unwrap(), small * 3);
    }
}

/// An older version is deleted by its function's writer only, never the
/// current one, and takes its size out of its owner's; an install it
/// shares with the current version moves to the current one's charge.
async fn exercise_version_deletion(store: &dyn FunctionStore) {
    let of = |code: &str, installed: u64| NewVersion {
        owner: Some("vera".into()),
        installed_bytes: installed,
        ..new("nodejs-vd", code)
    };
    store.create(of("v1", 5000), Source::Api).await.unwrap();
    for code in ["v2", "v3"] {
        store.add_version(of(code, 0), Source::Api, Some("vera")).await.unwrap();
    }
    let code_only = of("v1", 0).size();
    assert_eq!(store.function_bytes("vera").await.unwrap(), code_only * 3 + 5000);
    let (total, page) = store.versions("nodejs-vd", 0, 2).await.unwrap();
    let listed: Vec<(i64, i64)> = page.iter().map(|v| (v.version, v.size)).collect();
    assert_eq!((total, listed), (3, vec![(3, code_only), (2, code_only)]));
    assert_eq!(page[0].code_hash, "hash-v3");

    // Refused: the current version, another writer, a stale current.
    let refused = store.delete_version("nodejs-vd", 3, Some("vera"), 3, false).await;
    assert!(matches!(refused, Err(StoreError::IsCurrent)), "{refused:?}");
    for writer in [Some("bob"), None] {
        let refused = store.delete_version("nodejs-vd", 1, writer, 3, false).await;
        assert!(matches!(refused, Err(StoreError::NotOwner)), "{refused:?}");
    }
    let refused = store.delete_version("nodejs-vd", 1, Some("vera"), 2, false).await;
    assert!(matches!(refused, Err(StoreError::CurrentChanged)), "{refused:?}");
    let refused = store.delete_version("nodejs-none", 1, Some("vera"), 1, false).await;
    assert!(matches!(refused, Err(StoreError::NotFound)), "{refused:?}");
    assert_eq!(
        store.versions("nodejs-vd", 0, 10).await.unwrap().0,
        3,
        "nothing deleted"
    );

    // Deleted: v2 takes its code away; v1 moves its install to v3.
    assert!(
        store
            .delete_version("nodejs-vd", 2, Some("vera"), 3, false)
            .await
            .unwrap()
    );
    assert!(
        !store
            .delete_version("nodejs-vd", 2, Some("vera"), 3, false)
            .await
            .unwrap()
    );
    assert_eq!(store.function_bytes("vera").await.unwrap(), code_only * 2 + 5000);
    assert!(
        store
            .delete_version("nodejs-vd", 1, Some("vera"), 3, true)
            .await
            .unwrap()
    );
    assert_eq!(store.function_bytes("vera").await.unwrap(), code_only + 5000);
    assert!(store.version("nodejs-vd", 1).await.unwrap().is_none());
    let (total, page) = store.versions("nodejs-vd", 0, 10).await.unwrap();
    assert_eq!((total, page[0].version, page[0].size), (1, 3, code_only + 5000));
    // The next version is numbered after the current one, as before.
    let f = store.add_version(of("v4", 0), Source::Api, Some("vera")).await.unwrap();
    assert_eq!(f.current.version, 4);
    // A current version that carries a charge for the set of its own (it
    // brought the set again) is not charged twice.
    store
        .add_version(of("v5", 700), Source::Api, Some("vera"))
        .await
        .unwrap();
    let before = store.function_bytes("vera").await.unwrap();
    assert!(
        store
            .delete_version("nodejs-vd", 3, Some("vera"), 5, true)
            .await
            .unwrap()
    );
    assert_eq!(store.function_bytes("vera").await.unwrap(), before - code_only - 5000);
    assert_eq!(store.versions("nodejs-none", 0, 10).await.unwrap().0, 0);
}

/// The assertions every database's stores must pass.
async fn exercise(stores: Stores) {
    stores.health.ping().await.unwrap();
    let store = stores.functions.clone();
    assert!(store.functions().await.unwrap().is_empty());

    let f = store.create(new("nodejs-a", "v1"), Source::Api).await.unwrap();
    assert_eq!(f.current.version, 1);
    assert_eq!(f.source, Source::Api);
    assert_eq!(f.owner.as_deref(), Some("alice"));
    assert_eq!(f.current.manifest["nested"]["a"], json!([1, 2]));
    assert!(matches!(
        store.create(new("nodejs-a", "again"), Source::Api).await,
        Err(StoreError::Conflict)
    ));

    // Only its owner writes an owned function: not another subject, not
    // the controller's bundled folder; and the refusal writes nothing.
    for writer in [Some("bob"), None] {
        assert!(matches!(
            store.add_version(new("nodejs-a", "theirs"), Source::Api, writer).await,
            Err(StoreError::NotOwner)
        ));
        assert!(matches!(
            store.delete("nodejs-a", writer).await,
            Err(StoreError::NotOwner)
        ));
    }
    assert_eq!(store.function("nodejs-a").await.unwrap().unwrap().current.code, "v1");
    assert!(store.version("nodejs-a", 2).await.unwrap().is_none());
    let f2 = store
        .add_version(new("nodejs-a", "v2"), Source::Bundled, Some("alice"))
        .await
        .unwrap();
    assert_eq!(f2.current.version, 2);
    assert_eq!(f2.current.code, "v2");
    assert_eq!(f2.source, Source::Bundled);
    assert_eq!(f2.created_at, f.created_at);
    assert!(f2.updated_at >= f.updated_at);
    let v1 = store.version("nodejs-a", 1).await.unwrap().unwrap();
    assert_eq!((v1.code.as_str(), v1.code_hash.as_str()), ("v1", "hash-v1"));
    assert!(store.version("nodejs-a", 3).await.unwrap().is_none());
    assert!(matches!(
        store
            .add_version(new("nodejs-b", "x"), Source::Api, Some("alice"))
            .await,
        Err(StoreError::NotFound)
    ));
    // A function no one owns (bundled) is written by any subject and by
    // the controller.
    let bundled = |code: &str| NewVersion {
        owner: None,
        ..new("nodejs-bundled", code)
    };
    store.create(bundled("b1"), Source::Bundled).await.unwrap();
    let b2 = store.add_version(bundled("b2"), Source::Bundled, None).await.unwrap();
    assert_eq!((b2.current.version, b2.owner.as_deref()), (2, None));
    let b3 = store
        .add_version(bundled("b3"), Source::Api, Some("bob"))
        .await
        .unwrap();
    assert_eq!(
        (b3.current.version, b3.owner.as_deref()),
        (3, None),
        "an update does not take it over"
    );
    assert!(store.delete("nodejs-bundled", Some("bob")).await.unwrap());

    assert_eq!(store.function("nodejs-a").await.unwrap().unwrap().current.code, "v2");
    assert!(store.function("nodejs-zzz").await.unwrap().is_none());
    store.create(new("nodejs-0", "first"), Source::Api).await.unwrap();
    let mut versions = store.current_versions().await.unwrap();
    versions.sort();
    let registration = |lt: &str| versions.iter().find(|v| v.0 == lt).unwrap().1.clone();
    let first_life = registration("nodejs-a");
    let versions: Vec<_> = versions.iter().map(|(lt, _, v)| (lt.as_str(), *v)).collect();
    assert_eq!(versions, [("nodejs-0", 1), ("nodejs-a", 2)]);
    let all = store.functions().await.unwrap();
    let names: Vec<_> = all.iter().map(|f| f.language_title.as_str()).collect();
    assert_eq!(names, ["nodejs-0", "nodejs-a"], "sorted by Language-Title");
    assert_eq!(all[1].current.version, 2, "listed with the current version");

    assert!(store.delete("nodejs-a", Some("alice")).await.unwrap());
    assert!(!store.delete("nodejs-a", Some("alice")).await.unwrap());
    assert!(store.version("nodejs-a", 1).await.unwrap().is_none());
    let again = store.create(new("nodejs-a", "reborn"), Source::Api).await.unwrap();
    assert_eq!(again.current.version, 1);
    // Its version 1 is another registration's: nothing keyed by the old one
    // (an instance, a replica's copy) is taken for it.
    assert_ne!(again.current.registration, first_life);
    assert_eq!(
        store.version("nodejs-a", 1).await.unwrap().unwrap().registration,
        again.current.registration
    );
    let updated = store
        .add_version(new("nodejs-a", "reborn v2"), Source::Api, Some("alice"))
        .await
        .unwrap();
    assert_eq!(
        updated.current.registration, again.current.registration,
        "an update keeps it"
    );

    let record = |outcome: &str, cached: bool| ExecutionRecord {
        id: uuid::Uuid::new_v4(),
        request_id: "session-1".into(),
        subject: "alice".into(),
        language_title: "nodejs-a".into(),
        version: 1,
        started_at: fnrt_core::timefmt::now(),
        duration_ms: 12,
        outcome: outcome.into(),
        cached,
        cold_start: !cached,
        parent_id: None,
        logs: None,
    };
    exercise_logs(&stores, &record("success", false)).await;
    let store = stores.executions;
    let mut step = record("success", false);
    let pipeline = uuid::Uuid::new_v4();
    step.parent_id = Some(pipeline);
    let batch = vec![record("success", false), record("cache_hit", true), step];
    store.record_executions(&batch).await.unwrap();
    // A retried batch does not duplicate rows.
    store.record_executions(&batch).await.unwrap();
    let stored = store.executions_of("session-1").await.unwrap();
    assert_eq!(stored.len(), 3);
    // A pipeline's step names the pipeline's execution; nothing else does.
    assert_eq!(
        stored.iter().filter_map(|r| r.parent_id).collect::<Vec<_>>(),
        [pipeline]
    );
    let first = stored.iter().find(|r| r.id == batch[0].id).unwrap();
    assert_eq!(first.outcome, "success");
    assert_eq!(first.subject, "alice");
    assert_eq!(first.started_at, batch[0].started_at);
    assert!(first.cold_start && !first.cached);
    assert!(store.executions_of("session-2").await.unwrap().is_empty());

    // A batch larger than one statement takes (SQLite: 256 rows, then 44
    // padded to 64), every third with logs: each row and its logs are
    // written once.
    use fnrt_core::logs::{Captured, LogLine, Stream};
    let big_session = format!("session-{}", uuid::Uuid::new_v4());
    let big: Vec<ExecutionRecord> = (0..300)
        .map(|i| ExecutionRecord {
            id: uuid::Uuid::new_v4(),
            request_id: big_session.clone(),
            duration_ms: i,
            logs: (i % 3 == 0).then(|| {
                std::sync::Arc::new(Captured {
                    lines: vec![LogLine {
                        ts_ms: i,
                        stream: Stream::Stdout,
                        text: format!("row {i}"),
                    }],
                    bytes: 6,
                    dropped_bytes: 0,
                })
            }),
            ..record("success", false)
        })
        .collect();
    store.record_executions(&big).await.unwrap();
    store.record_executions(&big).await.unwrap();
    let mut durations: Vec<i64> = store
        .executions_of(&big_session)
        .await
        .unwrap()
        .iter()
        .map(|r| r.duration_ms)
        .collect();
    durations.sort();
    assert_eq!(durations, (0..300).collect::<Vec<i64>>());
    let logged = stores.logs.logs_of(&big_session).await.unwrap();
    assert_eq!(logged.len(), 100);
    for i in [30, 297] {
        let row = logged.iter().find(|l| l.execution_id == big[i].id.to_string()).unwrap();
        assert_eq!(Some(&row.captured), big[i].logs.as_ref());
    }

    // Retention: records started before the cut go, a batch at a time.
    // Ids are UUIDv7 (their time first): the old ones are a range of the
    // key. Ids from before v7 are random, anywhere in the key: their time
    // decides. `exercise_logs` left one of those ten days old.
    let cut = fnrt_core::timefmt::now() - time::Duration::days(7);
    assert_eq!(store.purge_executions(cut, 100).await.unwrap(), 1);
    let v7_at = |at: time::OffsetDateTime| {
        let ms = u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap();
        uuid::Builder::from_unix_timestamp_millis(ms, &rand::random()).into_uuid()
    };
    let aged = |id: uuid::Uuid, started_at: time::OffsetDateTime| ExecutionRecord {
        id,
        request_id: "session-aged".into(),
        started_at,
        ..record("success", false)
    };
    let day = time::Duration::days(1);
    let old = [cut - day * 3, cut - day * 2, cut - day].map(|at| aged(v7_at(at), at));
    let young = aged(v7_at(cut + day), cut + day);
    // Random ids below and above every v7 one: one young, one old.
    let legacy_young = aged(uuid::Uuid::from_u128(1), cut + day);
    let legacy_old = aged(uuid::uuid!("ffffffff-ffff-4fff-bfff-ffffffffffff"), cut - day);
    let mut written = old.to_vec();
    written.extend([young.clone(), legacy_young.clone(), legacy_old.clone()]);
    store.record_executions(&written).await.unwrap();
    let ids = || async {
        let mut ids = ids_of(store.as_ref(), "session-aged").await;
        ids.sort();
        ids
    };
    assert_eq!(store.purge_executions(cut, 2).await.unwrap(), 2);
    assert_eq!(store.purge_executions(cut, 2).await.unwrap(), 2);
    assert_eq!(store.purge_executions(cut, 2).await.unwrap(), 0);
    assert_eq!(ids().await, [legacy_young.id, young.id]);
    // The young pre-v7 record still goes when its time comes.
    assert_eq!(store.purge_executions(cut + day * 2, 100).await.unwrap(), 2);
    assert!(ids().await.is_empty());

    // Oldest first, whatever order they were written in.
    let at = |started_at| ExecutionRecord {
        request_id: "session-3".into(),
        started_at,
        ..record("success", false)
    };
    let now = fnrt_core::timefmt::now();
    let (later, earlier) = (at(now), at(now - time::Duration::seconds(1)));
    store
        .record_executions(&[later.clone(), earlier.clone()])
        .await
        .unwrap();
    assert_eq!(ids_of(store.as_ref(), "session-3").await, [earlier.id, later.id]);
}

/// The ids of a session's execution records, in the store's order.
async fn ids_of(store: &dyn ExecutionStore, session: &str) -> Vec<uuid::Uuid> {
    store
        .executions_of(session)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect()
}

fn queued(id: &str, subject: &str, lt: &str, priority: i32, key: Option<&str>, now_ms: i64) -> NewExecution {
    NewExecution {
        id: id.into(),
        subject: subject.into(),
        language_title: lt.into(),
        version: 1,
        params: json!({"n": id}),
        context: json!({}),
        timeout_ms: 1000,
        priority,
        idempotency_key: key.map(Into::into),
        cache: None,
        max_attempts: 3,
        backoff_ms: 1000,
        retry_runtime_errors: false,
        callback_url: (subject == "carol").then(|| "https://example.com/hook".to_owned()),
        now_ms,
        max_pending: 1000,
    }
}

fn claim(owner: &str, now_ms: i64) -> Claim<'_> {
    Claim {
        owner,
        now_ms,
        lease_until_ms: now_ms + 10_000,
        per_subject: 2,
        per_function: 10,
    }
}

/// The queue of asynchronous executions: idempotency, priority order,
/// caps, leases and their takeover, fenced finishes, cancel and requeue.
/// Logs are written with their record, read by execution, by session and
/// by function, and deleted past their retention.
async fn exercise_logs(stores: &Stores, template: &ExecutionRecord) {
    use fnrt_core::logs::{Captured, LogLine, Stream};
    let request = format!("session-{}", uuid::Uuid::new_v4());
    let function = format!("nodejs-logs{}", uuid::Uuid::new_v4().simple());
    let line = |ts_ms, stream, text: &str| LogLine {
        ts_ms,
        stream,
        text: text.into(),
    };
    let now = fnrt_core::timefmt::now();
    let first = ExecutionRecord {
        id: uuid::Uuid::new_v4(),
        request_id: request.clone(),
        language_title: function.clone(),
        started_at: now - time::Duration::days(10),
        logs: Some(std::sync::Arc::new(Captured {
            lines: vec![line(1, Stream::Stdout, "héllo \"quoted\""), line(2, Stream::Stderr, "")],
            bytes: 18,
            dropped_bytes: 7,
        })),
        ..template.clone()
    };
    let quiet = ExecutionRecord {
        id: uuid::Uuid::new_v4(),
        started_at: now,
        logs: None,
        ..first.clone()
    };
    let second = ExecutionRecord {
        id: uuid::Uuid::new_v4(),
        started_at: now,
        logs: Some(std::sync::Arc::new(Captured {
            lines: vec![line(3, Stream::Stdout, "again")],
            bytes: 6,
            dropped_bytes: 0,
        })),
        ..first.clone()
    };
    let batch = [first.clone(), quiet.clone(), second.clone()];
    stores.executions.record_executions(&batch).await.unwrap();
    stores.executions.record_executions(&batch).await.unwrap();

    let one = stores.logs.logs_of(&first.id.to_string()).await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(Some(&one[0].captured), first.logs.as_ref());
    assert_eq!(
        (one[0].subject.as_str(), one[0].request_id.as_str()),
        ("alice", request.as_str())
    );
    let session: Vec<_> = stores.logs.logs_of(&request).await.unwrap();
    let ids: Vec<_> = session.iter().map(|l| l.execution_id.clone()).collect();
    assert_eq!(ids, [first.id.to_string(), second.id.to_string()]);
    // An execution that wrote nothing has a record and no logs.
    assert!(stores.logs.logs_of(&quiet.id.to_string()).await.unwrap().is_empty());
    assert_eq!(
        stores.logs.execution(quiet.id).await.unwrap().unwrap().request_id,
        request
    );
    assert!(stores.logs.execution(uuid::Uuid::new_v4()).await.unwrap().is_none());
    let last = stores.logs.function_logs(&function, 1).await.unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].execution_id, second.id.to_string());

    let before = fnrt_core::timefmt::now_ms() - 24 * 3600 * 1000;
    assert!(stores.logs.purge_logs(before).await.unwrap() >= 1);
    let ids: Vec<_> = stores
        .logs
        .logs_of(&request)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.execution_id)
        .collect();
    assert_eq!(ids, [second.id.to_string()]);
}

async fn exercise_queue(q: &dyn ExecutionQueue) {
    let t = 1_000_000;
    let (first, new) = q
        .submit(queued("e1", "alice", "python-a", 1, Some("k"), t), 0)
        .await
        .unwrap();
    assert!(new);
    assert_eq!((first.status.as_str(), first.attempt), ("pending", 0));
    let (again, new) = q
        .submit(queued("e1b", "alice", "python-a", 1, Some("k"), t + 1), 0)
        .await
        .unwrap();
    assert_eq!((again.id.as_str(), new), ("e1", false));
    // Another subject's key is its own; an old key is free again.
    assert!(
        q.submit(queued("e2", "bob", "python-a", 0, Some("k"), t), 0)
            .await
            .unwrap()
            .1
    );
    let (fresh, new) = q
        .submit(queued("e3", "alice", "python-a", 2, Some("k"), t + 2), t + 1)
        .await
        .unwrap();
    assert_eq!((fresh.id.as_str(), new), ("e3", true));
    q.submit(queued("e4", "alice", "python-b", 1, None, t + 3), 0)
        .await
        .unwrap();

    // Highest priority first, then the oldest; alice's cap is 2 running.
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(q.claim(&claim("r1", t + 10)).await.unwrap().unwrap().id);
    }
    assert_eq!(order, ["e3", "e1", "e2"]);
    assert!(
        q.claim(&claim("r1", t + 10)).await.unwrap().is_none(),
        "alice is at her cap"
    );

    // A renewal says whether a cancel was asked for; another owner's fails.
    assert_eq!(q.renew("e3", "r1", t + 20_000).await.unwrap(), Some(false));
    assert_eq!(q.renew("e3", "r2", t + 20_000).await.unwrap(), None);
    // A pipeline's step reports: written by the lease's owner only.
    let steps = json!([{"name": "a", "status": "running"}]);
    assert!(q.set_steps("e3", "r1", &steps).await.unwrap());
    assert!(!q.set_steps("e3", "r2", &json!([])).await.unwrap());
    assert_eq!(q.get("e3").await.unwrap().unwrap().steps, Some(steps));
    let cancelling = q.cancel("e3", "alice", t + 11).await.unwrap().unwrap();
    assert_eq!(
        (cancelling.status.as_str(), cancelling.cancel_requested),
        ("running", true)
    );
    assert_eq!(q.renew("e3", "r1", t + 100_000).await.unwrap(), Some(true));
    assert!(q.cancel("e3", "bob", t + 11).await.unwrap().is_none(), "not bob's");

    // e1's lease (until t + 10_010) expires: r2 takes it over; r1 can no
    // longer finish it.
    let taken = q.claim(&claim("r2", t + 10_011)).await.unwrap().unwrap();
    assert_eq!((taken.id.as_str(), taken.attempt), ("e1", 2));
    let done = |status: &'static str| Finish {
        status,
        attempts: json!([{"number": 1}]),
        result: Some(json!({"ok": true})),
        error: None,
        cold_start: true,
        run_after_ms: 0,
        finished_ms: Some(t + 10_020),
        uncount: false,
        delivery_id: Some("d1".into()),
    };
    assert!(!q.finish("e1", "r1", &done("completed")).await.unwrap());
    assert!(q.finish("e1", "r2", &done("completed")).await.unwrap());
    let e1 = q.get("e1").await.unwrap().unwrap();
    assert_eq!(
        (e1.status.as_str(), e1.result, e1.cold_start),
        ("completed", Some(json!({"ok": true})), true)
    );
    assert_eq!(e1.attempts, json!([{"number": 1}]));

    // A retry waits for its backoff; a hand-back at shutdown does not count.
    let retry = Finish {
        status: "pending",
        run_after_ms: t + 50_000,
        finished_ms: None,
        result: None,
        ..done("pending")
    };
    assert!(q.finish("e2", "r1", &retry).await.unwrap());
    assert!(
        q.claim(&claim("r1", t + 49_999))
            .await
            .unwrap()
            .is_some_and(|e| e.id == "e4")
    );
    assert!(q.claim(&claim("r1", t + 49_999)).await.unwrap().is_none());
    let e2 = q.claim(&claim("r1", t + 50_000)).await.unwrap().unwrap();
    assert_eq!((e2.id.as_str(), e2.attempt), ("e2", 2));
    let back = Finish {
        uncount: true,
        ..retry.clone()
    };
    assert!(q.finish("e2", "r1", &back).await.unwrap());
    assert_eq!(q.get("e2").await.unwrap().unwrap().attempt, 1);

    // Cancel: a pending one at once; requeue: failed or cancelled only.
    q.submit(queued("e5", "carol", "python-a", 1, None, t), 0)
        .await
        .unwrap();
    let cancelled = q.cancel("e5", "carol", t + 5).await.unwrap().unwrap();
    assert_eq!(cancelled.status, "cancelled");
    // Its callback is due: claimed once, held, then recorded.
    assert_eq!(cancelled.callback_status.as_deref(), Some("pending"));
    let due = q.claim_callback(t + 5, t + 1000).await.unwrap().unwrap();
    assert_eq!((due.id.as_str(), due.callback_attempts), ("e5", 1));
    assert!(q.claim_callback(t + 6, t + 1000).await.unwrap().is_none(), "held");
    let delivery = due.delivery_id.clone().unwrap();
    assert!(
        !q.callback_done("e5", "another", "delivered", t + 7, None)
            .await
            .unwrap()
    );
    assert!(
        q.callback_done("e5", &delivery, "delivered", t + 7, None)
            .await
            .unwrap()
    );
    assert_eq!(
        q.get("e5").await.unwrap().unwrap().callback_status.as_deref(),
        Some("delivered")
    );
    // e1 finished without a callback URL: nothing to deliver.
    assert_eq!(q.get("e1").await.unwrap().unwrap().callback_status, None);
    let (secret, _) = q.signing_secret("carol", "s1", t).await.unwrap();
    assert_eq!(q.signing_secret("carol", "s2", t).await.unwrap().0, secret);
    q.rotate_signing_secret("carol", "s3", t + 1).await.unwrap();
    assert_eq!(
        q.signing_secret("carol", "s4", t).await.unwrap(),
        ("s3".to_owned(), t + 1)
    );
    let marked = json!([{"outcome": "requeued"}]);
    assert_eq!(q.requeue("e5", "carol", t + 6, &marked).await.unwrap(), Some(true));
    let e5 = q.get("e5").await.unwrap().unwrap();
    assert_eq!((e5.status.as_str(), e5.attempts), ("pending", marked.clone()));
    assert_eq!(
        q.requeue("e1", "alice", t + 6, &marked).await.unwrap(),
        Some(false),
        "completed"
    );
    assert_eq!(q.requeue("e1", "bob", t + 6, &marked).await.unwrap(), None);

    // Listing: the subject's own, filtered, newest first, with the total.
    let filter = ExecutionFilter {
        status: None,
        language_title: Some("python-a".into()),
        offset: 0,
        limit: 1,
    };
    let (page, total) = q.list("alice", &filter).await.unwrap();
    assert_eq!((page.len(), total), (1, 2));
    assert_eq!(page[0].id, "e3");
    let completed = ExecutionFilter {
        status: Some("completed".into()),
        limit: 10,
        ..filter
    };
    let (page, total) = q.list("alice", &completed).await.unwrap();
    assert_eq!((page[0].id.as_str(), total), ("e1", 1));
    let mut pending = q.pending_by_priority().await.unwrap();
    pending.sort();
    assert_eq!(pending, [(0, 1), (1, 1)]);
    assert!(q.expire_leases().await.unwrap() >= 1);

    // A subject's pending executions stop at its cap; an idempotent
    // resubmission still finds its first.
    let capped = |id: &str, subject: &str, key: Option<&str>| NewExecution {
        max_pending: 3,
        ..queued(id, subject, "python-a", 1, key, t)
    };
    for i in 0..3 {
        q.submit(capped(&format!("p-{i}"), "pia", (i == 0).then_some("pk")), 0)
            .await
            .unwrap();
    }
    let over = q.submit(capped("p-3", "pia", None), 0).await;
    assert!(matches!(over, Err(StoreError::TooManyPending { max: 3 })), "{over:?}");
    let over = q.submit(capped("p-4", "pia", Some("other")), 0).await;
    assert!(matches!(over, Err(StoreError::TooManyPending { .. })), "{over:?}");
    let (first, new) = q.submit(capped("p-5", "pia", Some("pk")), 0).await.unwrap();
    assert_eq!((first.id.as_str(), new), ("p-0", false));
    assert!(q.get("p-3").await.unwrap().is_none());
    // Keyed submissions that come together: each its own (a read of its
    // key, then the insert).
    let keyed: Vec<NewExecution> = (0..8)
        .map(|i| queued(&format!("k-{i}"), "kim", "python-a", 1, Some(&format!("key-{i}")), t))
        .collect();
    let done = futures::future::join_all(keyed.into_iter().map(|n| q.submit(n, 0))).await;
    for d in &done {
        assert!(matches!(d, Ok((_, true))), "{d:?}");
    }
    // Submissions that come together: as many as fit.
    for round in 0..4 {
        let subject = format!("quincy-{round}");
        let news: Vec<NewExecution> = (0..6)
            .map(|i| capped(&format!("p-{subject}-{i}"), &subject, None))
            .collect();
        let done = futures::future::join_all(news.into_iter().map(|n| q.submit(n, 0))).await;
        let passed: Vec<bool> = done.iter().map(Result::is_ok).collect();
        assert_eq!(passed.iter().filter(|ok| **ok).count(), 3, "{passed:?}");
    }

    // Retention: what finished before the cut goes, a batch at a time;
    // what is pending, running or has a callback still due stays.
    for (id, subject) in [("e6", "carol"), ("e7", "dave")] {
        q.submit(queued(id, subject, "python-a", 1, None, t), 0).await.unwrap();
        q.cancel(id, subject, t + 5).await.unwrap().unwrap();
    }
    assert_eq!(
        q.purge_finished(t + 10_020, 10).await.unwrap(),
        1,
        "e7 only: e1 finished at the cut"
    );
    assert_eq!(q.purge_finished(t + 20_000, 10).await.unwrap(), 1, "e1");
    assert_eq!(q.purge_finished(t + 20_000, 10).await.unwrap(), 0);
    for (id, kept) in [
        ("e1", false),
        ("e7", false),
        ("e6", true),
        ("e2", true),
        ("e3", true),
        ("e4", true),
        ("e5", true),
    ] {
        assert_eq!(q.get(id).await.unwrap().is_some(), kept, "{id}");
    }
}

/// File records: one per upload, several naming one blob and counted by
/// it, deleted only by their owner, purged once expired (oldest first, a
/// batch at a time).
async fn exercise_files(files: &dyn FileRecords) {
    let now = 1_000_000;
    let (one, other) = ("a".repeat(64), "b".repeat(64));
    let file = |id: &str, owner: &str, sha256: &str, expires_ms: i64| StoredFile {
        id: id.into(),
        owner: owner.into(),
        name: format!("{id} \"quoted\" é.png"),
        // Past 32 bits.
        size: 20 * 1024 * 1024 * 1024,
        content_type: "image/png".into(),
        sha256: sha256.into(),
        created_ms: now - 5_000,
        expires_ms,
    };
    let live = file("f-live", "alice", &one, now + 1);
    let expired = file("f-expired", "alice", &one, now - 1);
    let due = file("f-due", "bob", &other, now);
    for f in [&live, &expired, &due] {
        assert!(files.insert_file(f, None).await.unwrap());
    }
    assert!(files.insert_file(&live, None).await.is_err(), "an id is one file");
    assert_eq!(files.file("f-live").await.unwrap().as_ref(), Some(&live));
    assert_eq!(
        files.file("f-expired").await.unwrap().as_ref(),
        Some(&expired),
        "read back until swept"
    );
    assert!(files.file("f-none").await.unwrap().is_none());
    assert_eq!(files.blob_refs(&one).await.unwrap(), 2);
    assert_eq!(files.blob_refs(&other).await.unwrap(), 1);
    assert_eq!(files.blob_refs(&"c".repeat(64)).await.unwrap(), 0);

    // Only the owner deletes.
    assert!(files.delete_file("f-live", "bob").await.unwrap().is_none());
    assert!(files.file("f-live").await.unwrap().is_some());

    let mut purged: Vec<_> = files
        .purge_files(now, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.id)
        .collect();
    purged.sort();
    assert_eq!(purged, ["f-due", "f-expired"], "expired at or before now");
    assert!(files.file("f-expired").await.unwrap().is_none());
    assert_eq!(files.blob_refs(&one).await.unwrap(), 1);
    assert_eq!(files.blob_refs(&other).await.unwrap(), 0);
    assert!(files.purge_files(now, 100).await.unwrap().is_empty());

    // A batch at a time, the longest expired first.
    for (i, expires_ms) in [now - 3, now - 1, now - 2].into_iter().enumerate() {
        files
            .insert_file(&file(&format!("f-old-{i}"), "carol", &other, expires_ms), None)
            .await
            .unwrap();
    }
    let first: Vec<_> = files
        .purge_files(now, 2)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.id)
        .collect();
    assert_eq!(first.len(), 2);
    assert!(first.contains(&"f-old-0".to_owned()) && first.contains(&"f-old-2".to_owned()));
    assert_eq!(files.purge_files(now, 2).await.unwrap().len(), 1);

    assert_eq!(files.delete_file("f-live", "alice").await.unwrap(), Some(live));
    assert!(files.delete_file("f-live", "alice").await.unwrap().is_none());
    assert_eq!(files.blob_refs(&one).await.unwrap(), 0);

    // A quota counts the owner's live files only, and refuses what would
    // pass it.
    let sized = |id: &str, owner: &str, size: i64, expires_ms: i64| StoredFile {
        size,
        ..file(id, owner, &one, expires_ms)
    };
    assert_eq!(files.file_bytes("dave", now).await.unwrap(), 0);
    assert!(
        files
            .insert_file(&sized("q-1", "dave", 600, now + 1), Some(1000))
            .await
            .unwrap()
    );
    assert!(
        !files
            .insert_file(&sized("q-2", "dave", 600, now + 1), Some(1000))
            .await
            .unwrap()
    );
    assert!(files.file("q-2").await.unwrap().is_none(), "refused, not written");
    let stale = sized("q-stale", "dave", 600, now - 6_000);
    assert!(files.insert_file(&stale, None).await.unwrap());
    assert!(
        files
            .insert_file(&sized("q-3", "dave", 400, now + 1), Some(1000))
            .await
            .unwrap()
    );
    assert_eq!(
        files.file_bytes("dave", now - 5_000).await.unwrap(),
        1000,
        "expired ones not counted"
    );
    assert!(
        files
            .insert_file(&sized("q-4", "erin", 1000, now + 1), Some(1000))
            .await
            .unwrap(),
        "per owner"
    );
    // Uploads that come together: as many as fit, not one each (a few
    // rounds, for the race to show where it would).
    for round in 0..6 {
        let owner = format!("frank-{round}");
        let together: Vec<StoredFile> = (0..8)
            .map(|i| sized(&format!("q-{owner}-{i}"), &owner, 300, now + 1))
            .collect();
        let passed = futures::future::join_all(together.iter().map(|f| files.insert_file(f, Some(1000)))).await;
        let passed = passed.into_iter().filter(|r| *r.as_ref().unwrap()).count();
        assert_eq!(passed, 3, "300 bytes each under a quota of 1000");
        assert_eq!(files.file_bytes(&owner, now).await.unwrap(), 900);
    }
}

#[tokio::test]
async fn sqlite_store_passes_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
    let stores = Stores::of(store);
    exercise(stores.clone()).await;
    exercise_queue(stores.queue.as_ref()).await;
    exercise_files(stores.files.as_ref()).await;
    exercise_function_quota(stores.functions.as_ref()).await;
    exercise_version_deletion(stores.functions.as_ref()).await;
}

#[tokio::test]
async fn postgres_store_passes_the_store_suite() {
    let Some(db) = TestDatabase::create().await else { return };
    let store = PostgresStore::connect(&db.url).await.unwrap();
    let stores = Stores::of(store);
    exercise(stores.clone()).await;
    exercise_queue(stores.queue.as_ref()).await;
    exercise_files(stores.files.as_ref()).await;
    exercise_function_quota(stores.functions.as_ref()).await;
    exercise_version_deletion(stores.functions.as_ref()).await;
    // PostgreSQL keeps what it is given to the microsecond (SQLite: see
    // `sqlite_reads_and_writes_the_text_it_always_had`).
    let precise = ExecutionRecord {
        id: uuid::Uuid::new_v4(),
        request_id: "session-precise".into(),
        subject: "alice".into(),
        language_title: "nodejs-a".into(),
        version: 1,
        started_at: datetime!(2025-05-14 10:00:06.123456 +2),
        duration_ms: 1,
        outcome: "success".into(),
        cached: false,
        cold_start: false,
        parent_id: None,
        logs: None,
    };
    stores
        .executions
        .record_executions(std::slice::from_ref(&precise))
        .await
        .unwrap();
    let stored = stores.executions.executions_of("session-precise").await.unwrap();
    assert_eq!(stored[0].started_at, precise.started_at);
    db.drop().await;
}

/// A database written before functions had a registration: the migration
/// gives each existing function one of its own (its name tells them apart),
/// and a function created after gets a new one.
#[tokio::test]
async fn functions_stored_before_registrations_each_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let raw = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let mut before = sqlx::migrate!("../migrations/sqlite");
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version < 8)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before.run(&raw).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO functions VALUES ('nodejs-old', 'nodejs', 'old', 'd', 'api', 1, \
           '2025-05-13T12:28:22Z', '2025-05-13T12:28:22Z', 'alice'); \
         INSERT INTO function_versions (language_title, version, manifest, code, code_hash, created_at) VALUES \
           ('nodejs-old', 1, '{\"entrypoint\":\"index.js\"}', 'v1', 'hash-v1', '2025-05-13T12:28:22Z');",
    )
    .execute(&raw)
    .await
    .unwrap();
    raw.close().await;

    let stores = Stores::of(SqliteStore::open(&path).await.unwrap());

    let old = stores.functions.function("nodejs-old").await.unwrap().unwrap();
    assert_eq!(old.current.registration, "before-0008:nodejs-old");
    assert_eq!(
        stores
            .functions
            .version("nodejs-old", 1)
            .await
            .unwrap()
            .unwrap()
            .registration,
        "before-0008:nodejs-old"
    );
    assert!(stores.functions.delete("nodejs-old", Some("alice")).await.unwrap());
    let again = stores
        .functions
        .create(new("nodejs-old", "again"), Source::Api)
        .await
        .unwrap();
    assert!(
        uuid::Uuid::parse_str(&again.current.registration).is_ok(),
        "{}",
        again.current.registration
    );
}

/// The SQLite driver binds the `$N` placeholders the shared queries use, by
/// number: out of order and repeated.
#[tokio::test]
async fn sqlite_binds_numbered_placeholders() {
    let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
    let row: (String, String, String) = sqlx::query_as("SELECT $2, $1, $2")
        .bind("one")
        .bind("two")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(row, ("two".into(), "one".into(), "two".into()));
}

/// A database written before the queries were shared (TEXT timestamps as
/// `timefmt` formats them, JSON and UUIDs as text, booleans as 0 and 1)
/// reads as it did, and what is written now has the same shape, so old and
/// new rows sort together.
#[tokio::test]
async fn sqlite_reads_and_writes_the_text_it_always_had() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    drop(SqliteStore::open(&path).await.unwrap());
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
    let raw = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO functions (language_title, language, title, description, source, current_version, \
           created_at, updated_at, owner) VALUES ('nodejs-old', 'nodejs', 'old', 'd', 'bundled', 2, \
           '2025-05-13T12:28:22Z', '2025-05-14T08:00:05Z', NULL); \
         INSERT INTO function_versions (language_title, version, manifest, code, code_hash, created_at) VALUES \
           ('nodejs-old', 1, '{\"entrypoint\":\"index.js\"}', 'v1', 'hash-v1', '2025-05-13T12:28:22Z'), \
           ('nodejs-old', 2, '{\"entrypoint\":\"main.js\",\"nested\":{\"a\":[1,2]}}', 'v2', 'hash-v2', \
            '2025-05-14T08:00:05Z'); \
         INSERT INTO executions (id, request_id, subject, language_title, version, started_at, duration_ms, \
           outcome, cached, cold_start) VALUES ('67e55044-10b1-426f-9247-bb680e5fe0c8', 'session-old', 'alice', \
           'nodejs-old', 2, '2025-05-14T08:00:07Z', 12, 'success', 0, 1);",
    )
    .execute(&raw)
    .await
    .unwrap();
    let stores = Stores::of(SqliteStore::open(&path).await.unwrap());

    let f = stores.functions.function("nodejs-old").await.unwrap().unwrap();
    assert_eq!(f.source, Source::Bundled);
    assert_eq!(f.created_at, datetime!(2025-05-13 12:28:22 UTC));
    assert_eq!(f.updated_at, datetime!(2025-05-14 08:00:05 UTC));
    assert_eq!((f.current.version, f.current.code.as_str()), (2, "v2"));
    assert_eq!(f.current.created_at, datetime!(2025-05-14 08:00:05 UTC));
    assert_eq!(f.current.manifest["nested"]["a"], json!([1, 2]));
    let v1 = stores.functions.version("nodejs-old", 1).await.unwrap().unwrap();
    assert_eq!(v1.created_at, datetime!(2025-05-13 12:28:22 UTC));
    assert_eq!(v1.manifest, json!({"entrypoint": "index.js"}));
    let old = &stores.executions.executions_of("session-old").await.unwrap()[0];
    assert_eq!(old.id, uuid::uuid!("67e55044-10b1-426f-9247-bb680e5fe0c8"));
    assert_eq!(old.started_at, datetime!(2025-05-14 08:00:07 UTC));
    assert!(old.cold_start && !old.cached);

    // New rows: a version, and two records around the old one, given with
    // an offset and fractions of a second.
    let f3 = stores
        .functions
        .add_version(new("nodejs-old", "v3"), Source::Api, Some("alice"))
        .await
        .unwrap();
    assert_eq!(f3.created_at, f.created_at);
    let record = |started_at| ExecutionRecord {
        id: uuid::Uuid::new_v4(),
        started_at,
        cached: true,
        cold_start: false,
        parent_id: None,
        ..old.clone()
    };
    let before = record(datetime!(2025-05-14 10:00:06.75 +2));
    let same_second = record(datetime!(2025-05-14 08:00:07.4 UTC));
    stores
        .executions
        .record_executions(&[before.clone(), same_second.clone()])
        .await
        .unwrap();
    let all = stores.executions.executions_of("session-old").await.unwrap();
    let ids: Vec<_> = all.iter().map(|r| r.id).collect();
    assert_eq!(ids, [before.id, old.id, same_second.id], "by time, then as written");
    assert_eq!(
        all[0].started_at,
        datetime!(2025-05-14 08:00:06 UTC),
        "kept to the second"
    );

    let texts: Vec<(String, String, String, i64)> =
        sqlx::query_as("SELECT id, started_at, typeof(cached), cached FROM executions ORDER BY rowid")
            .fetch_all(&raw)
            .await
            .unwrap();
    assert_eq!(
        texts[1..],
        [
            (
                before.id.to_string(),
                "2025-05-14T08:00:06Z".into(),
                "integer".into(),
                1
            ),
            (
                same_second.id.to_string(),
                "2025-05-14T08:00:07Z".into(),
                "integer".into(),
                1
            ),
        ]
    );
    let (updated_at, created_at, manifest): (String, String, String) = sqlx::query_as(
        "SELECT f.updated_at, v.created_at, v.manifest FROM functions f \
         JOIN function_versions v ON v.language_title = f.language_title AND v.version = 3",
    )
    .fetch_one(&raw)
    .await
    .unwrap();
    assert_eq!(updated_at, fnrt_core::timefmt::format(f3.updated_at));
    assert_eq!(created_at, updated_at);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&manifest).unwrap(),
        new("x", "v3").manifest
    );
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
