//! One set of assertions, run against every session store.
//!
//! Redis comes from `TEST_REDIS_URL` (`redis://127.0.0.1:6379/`); each test
//! uses owners of its own, so runs share a server. Without it, the Redis
//! half is skipped with a message, except under `CI=true`, where it fails.

use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;

use super::fallback::FallbackSessionStore;
use super::memory::MemorySessionStore;
use super::redis::RedisSessionStore;
use super::{SessionRecord, SessionStatus, SessionStore, key_owner_hash, owner_hash, session_key};
use crate::redis_client::RedisClient;

/// A subject no other test (or earlier run) uses.
fn subject(name: &str) -> String {
    format!("{name}-{}", hex::encode(rand::random::<[u8; 6]>()))
}

fn record(owner: &str, request_id: &str, language_title: &str, expires_in: time::Duration) -> SessionRecord {
    let now = fnrt_core::timefmt::now();
    SessionRecord {
        request_id: request_id.into(),
        owner: owner.into(),
        language_title: language_title.into(),
        version: 1,
        context: json!({}),
        timeout_ms: 1000,
        retain: false,
        status: SessionStatus::Active,
        created_at: now,
        expires_at: now + expires_in,
        execution_count: 0,
        last_executed_at: None,
    }
}

/// Request IDs, sorted, of what `list` answers.
async fn listed(store: &dyn SessionStore, owner: &str) -> Vec<(String, SessionStatus)> {
    let mut ids: Vec<(String, SessionStatus)> = store
        .list(owner)
        .await
        .unwrap()
        .into_iter()
        .map(|s| {
            assert_eq!(s.owner, owner, "{s:?}");
            (s.request_id, s.status)
        })
        .collect();
    ids.sort_by(|a, b| a.0.cmp(&b.0));
    ids
}

fn active(id: &str) -> (String, SessionStatus) {
    (id.into(), SessionStatus::Active)
}

/// The assertions every store must pass.
async fn exercise(store: &dyn SessionStore) {
    let (alice, bob) = (subject("alice"), subject("bob"));
    // Functions of this run only, so removing one touches nobody else's.
    let (calc, counter) = (subject("nodejs-calc"), subject("nodejs-counter"));
    let hour = time::Duration::hours(1);
    assert!(store.list(&alice).await.unwrap().is_empty());

    for r in [
        record(&alice, "a1", &calc, hour),
        record(&alice, "a2", &calc, hour),
        record(&alice, "a3", &counter, hour),
        // The same request ID as alice's: a session of its own.
        record(&bob, "a1", &calc, hour),
        record(&alice, "expired", &calc, -time::Duration::seconds(1)),
    ] {
        assert!(store.insert(r).await.unwrap());
    }
    // Times are whole seconds: this one ends 1 to 2 seconds from now.
    let short = record(&alice, "short", &calc, time::Duration::seconds(2));
    assert!(store.insert(short).await.unwrap());

    // Only the owner's, never an expired one.
    assert_eq!(
        listed(store, &alice).await,
        [active("a1"), active("a2"), active("a3"), active("short")]
    );
    assert_eq!(listed(store, &bob).await, [active("a1")]);
    assert!(store.list(&subject("carol")).await.unwrap().is_empty());

    // A completed one is listed as completed, with its execution.
    let a2 = session_key(&alice, "a2");
    assert!(
        store
            .record_execution(&a2, OffsetDateTime::now_utc(), true)
            .await
            .unwrap()
    );
    // Counting on a session that is not there (or expired) counts nothing and says so.
    for missing in [session_key(&subject("carol"), "a2"), session_key(&alice, "expired")] {
        assert!(
            !store
                .record_execution(&missing, OffsetDateTime::now_utc(), false)
                .await
                .unwrap(),
            "{missing}"
        );
    }
    let lists = store.list(&alice).await.unwrap();
    let a2 = lists.iter().find(|s| s.request_id == "a2").unwrap();
    assert_eq!(a2.status, SessionStatus::Completed);
    assert_eq!(a2.execution_count, 1);
    assert!(a2.last_executed_at.is_some());

    // Removed with their version: only that version's, of that function.
    let on_v2 = SessionRecord {
        version: 2,
        ..record(&alice, "v2", &calc, hour)
    };
    assert!(store.insert(on_v2).await.unwrap());
    let gone = store.remove_version(&calc, 2).await.unwrap();
    assert_eq!(gone, [session_key(&alice, "v2")]);
    assert!(store.remove_version(&counter, 2).await.unwrap().is_empty());
    assert!(store.get(&session_key(&alice, "v2")).await.unwrap().is_none());
    assert_eq!(
        listed(store, &alice).await,
        [
            active("a1"),
            ("a2".into(), SessionStatus::Completed),
            active("a3"),
            active("short")
        ]
    );

    // Removed ones are gone: one by one, and with their function.
    let removed = store.remove(&session_key(&alice, "a1")).await.unwrap();
    assert_eq!(removed.map(|r| r.request_id).as_deref(), Some("a1"));
    let gone = store.remove_function(&counter).await.unwrap();
    assert_eq!(gone, [session_key(&alice, "a3")]);
    assert_eq!(
        listed(store, &alice).await,
        [("a2".into(), SessionStatus::Completed), active("short")]
    );
    assert_eq!(listed(store, &bob).await, [active("a1")], "alice's removals left bob's");

    // One that expires while listed drops out, before and after the sweep.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(listed(store, &alice).await, [("a2".into(), SessionStatus::Completed)]);
    store.remove_expired(OffsetDateTime::now_utc()).await.unwrap();
    assert_eq!(listed(store, &alice).await, [("a2".into(), SessionStatus::Completed)]);
    assert_eq!(listed(store, &bob).await, [active("a1")]);
}

#[test]
fn a_key_starts_with_its_owners_hash() {
    let key = session_key("alice", "client.chosen.id");
    assert_eq!(key_owner_hash(&key), owner_hash("alice"));
    // The first half of SHA-256("alice") in hex: keys stay as stored.
    assert_eq!(owner_hash("alice"), "2bd806c97f0e00af1a1fc3328fa763a9");
    assert_eq!(key, format!("{}.client.chosen.id", owner_hash("alice")));
    assert_ne!(owner_hash("alice"), owner_hash("bob"));
}

#[tokio::test]
async fn memory_store_lists_an_owners_sessions() {
    exercise(&MemorySessionStore::default()).await;
}

#[tokio::test]
async fn redis_store_lists_an_owners_sessions() {
    let Some(redis) = test_redis().await else { return };
    exercise(&RedisSessionStore::new(redis)).await;
}

#[tokio::test]
async fn fallback_store_over_redis_lists_an_owners_sessions() {
    let Some(redis) = test_redis().await else { return };
    exercise(&FallbackSessionStore::new(RedisSessionStore::new(redis))).await;
}

#[tokio::test]
async fn fallback_store_lists_local_sessions_while_redis_is_down() {
    // Nothing listens on port 1: every Redis command fails.
    let down = RedisClient::new("redis://127.0.0.1:1/").unwrap();
    let store = FallbackSessionStore::new(RedisSessionStore::new(down));
    let (alice, bob) = (subject("alice"), subject("bob"));
    let hour = time::Duration::hours(1);
    assert!(store.insert(record(&alice, "a1", "nodejs-calc", hour)).await.unwrap());
    assert!(store.insert(record(&bob, "b1", "nodejs-calc", hour)).await.unwrap());

    assert_eq!(listed(&store, &alice).await, [active("a1")]);
    assert_eq!(listed(&store, &bob).await, [active("b1")]);
}

/// The owner index: as long-lived as the owner's longest session, and
/// without the IDs of sessions removed or swept.
#[tokio::test]
async fn redis_owner_index_follows_the_owners_sessions() {
    let Some(redis) = test_redis().await else { return };
    let store = RedisSessionStore::new(redis.clone());
    let alice = subject("alice");
    let lt = subject("nodejs-calc");
    let index = format!("fnrt:owner-sessions:v2:{}", owner_hash(&alice));
    let members = || {
        let (redis, index) = (redis.clone(), index.clone());
        async move {
            let mut ids: Vec<String> = redis
                .run(|mut c| async move { redis::cmd("SMEMBERS").arg(index).query_async(&mut c).await })
                .await
                .unwrap();
            ids.sort();
            ids
        }
    };
    let ttl_secs = || {
        let (redis, index) = (redis.clone(), index.clone());
        async move {
            redis
                .run(|mut c| async move { redis::cmd("TTL").arg(index).query_async::<i64>(&mut c).await })
                .await
                .unwrap()
        }
    };

    // A later expiry extends the index; an earlier one leaves it.
    let short = record(&alice, "short", &lt, time::Duration::seconds(2));
    let long = record(&alice, "long", &lt, time::Duration::hours(2));
    let other = record(&alice, "other", &subject("nodejs-other"), time::Duration::hours(1));
    assert!(store.insert(short).await.unwrap());
    assert!((0..=2).contains(&ttl_secs().await));
    assert!(store.insert(long).await.unwrap());
    assert!(store.insert(other.clone()).await.unwrap());
    let ttl = ttl_secs().await;
    assert!(
        (7100..=7200).contains(&ttl),
        "the index expires in {ttl}s, before its newest session"
    );
    let key = |id: &str| session_key(&alice, id);
    assert_eq!(members().await, [key("long"), key("other"), key("short")]);

    // Swept and removed sessions leave the index.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    store.remove_expired(OffsetDateTime::now_utc()).await.unwrap();
    assert_eq!(members().await, [key("long"), key("other")]);
    store.remove(&other.key()).await.unwrap();
    assert_eq!(members().await, [key("long")]);
    store.remove_function(&lt).await.unwrap();
    assert!(members().await.is_empty());

    // An ID whose hash vanished without the store (evicted, deleted by hand)
    // is dropped by the next listing.
    assert!(
        store
            .insert(record(&alice, "evicted", &lt, time::Duration::hours(1)))
            .await
            .unwrap()
    );
    let hash = format!("fnrt:session:v2:{}", key("evicted"));
    redis
        .run(|mut c| async move { redis::cmd("DEL").arg(hash).query_async::<()>(&mut c).await })
        .await
        .unwrap();
    assert!(store.list(&alice).await.unwrap().is_empty());
    assert!(members().await.is_empty());
}

/// A one-shot session that completed can no longer be executed: it leaves
/// the index the active count is taken from (other tests share the server,
/// so its own IDs are looked for, not the count).
#[tokio::test]
async fn redis_active_index_drops_a_completed_session() {
    let Some(redis) = test_redis().await else { return };
    let store = RedisSessionStore::new(redis.clone());
    let owner = subject("counted");
    let lt = subject("nodejs-calc");
    let indexed = |id: String| {
        let redis = redis.clone();
        async move {
            redis
                .run(|mut c| async move {
                    redis::cmd("ZSCORE")
                        .arg("fnrt:sessions:v2")
                        .arg(id)
                        .query_async::<Option<f64>>(&mut c)
                        .await
                })
                .await
                .unwrap()
                .is_some()
        }
    };
    let retained = record(&owner, "retained", &lt, time::Duration::hours(1));
    let one_shot = record(&owner, "one-shot", &lt, time::Duration::hours(1));
    assert!(store.insert(retained.clone()).await.unwrap());
    assert!(store.insert(one_shot.clone()).await.unwrap());

    let now = OffsetDateTime::now_utc();
    store.record_execution(&retained.key(), now, false).await.unwrap();
    store.record_execution(&one_shot.key(), now, true).await.unwrap();

    assert!(indexed(retained.key()).await, "a session still executable stays");
    assert!(!indexed(one_shot.key()).await, "a completed session left the index");
    let completed = store.get(&one_shot.key()).await.unwrap().unwrap();
    assert_eq!(completed.status, SessionStatus::Completed, "and can still be read");
    store.remove_function(&lt).await.unwrap();
}

/// The test server, or `None` (skipped) without `TEST_REDIS_URL`.
async fn test_redis() -> Option<RedisClient> {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let Ok(url) = std::env::var("TEST_REDIS_URL") else {
        assert!(!ci, "CI=true but TEST_REDIS_URL is not set");
        eprintln!("skipped: set TEST_REDIS_URL=redis://127.0.0.1:6379/ to run the Redis session store tests");
        return None;
    };
    let redis = RedisClient::new(&url).unwrap();
    if !redis.ping().await {
        assert!(!ci, "CI=true and Redis at {url} does not answer");
        eprintln!("skipped: Redis at {url} does not answer");
        return None;
    }
    Some(redis)
}
