//! Sessions in Redis, shared by every controller on it.
//!
//! An ID is a session's key ([`super::session_key`]: owner hash, '.',
//! request ID).
//!
//! - `fnrt:session:v2:{id}`: a hash (`record`: the record as JSON; `count`,
//!   `last`, `status`: what executions change), expiring at `expires_at`.
//! - `fnrt:sessions:v2`: sorted set of IDs by expiry, for the sweep and the
//!   active count; a one-shot session leaves it once its execution
//!   completes it (it can no longer be executed).
//! - `fnrt:function-sessions:v2:{language_title}`: set of IDs, for deletes.
//! - `fnrt:owner-sessions:v2:{owner hash}`: set of an owner's IDs, for
//!   listing them without scanning; it expires no sooner than the owner's
//!   last session, and a listing drops the IDs whose hash is gone.

use std::collections::HashMap;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{SessionRecord, SessionStatus, SessionStore, key_owner_hash, owner_hash};
use crate::redis_client::RedisClient;
use fnrt_core::timefmt;

// v2: sessions are keyed by owner and request ID (`super::session_key`).
pub(crate) const ALL: &str = "fnrt:sessions:v2";

pub(crate) fn hash_key(key: &str) -> String {
    format!("fnrt:session:v2:{key}")
}

fn function_key(language_title: &str) -> String {
    format!("fnrt:function-sessions:v2:{language_title}")
}

/// The owner index of the owner whose [`super::owner_hash`] this is.
fn owner_key(owner_hash: &str) -> String {
    format!("fnrt:owner-sessions:v2:{owner_hash}")
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Creates the hash unless the ID is taken, and indexes it.
const INSERT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'count', 0, 'last', '', 'status', 'active')
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('SADD', KEYS[4], ARGV[3])
-- The owner index outlives each of its sessions: extend it, never shorten it.
local ttl = redis.call('PTTL', KEYS[4])
local now = redis.call('TIME')
local ends = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + ttl
if ttl < 0 or ends < tonumber(ARGV[2]) then redis.call('PEXPIREAT', KEYS[4], ARGV[2]) end
return 1
";

/// Counts an execution on a session that still exists (0 when it does not);
/// a completing one leaves the active index. A Lua function, so that
/// [`crate::admission`]'s script counts the same way.
pub(crate) const RECORD_FN: &str = r"
local function record(key, all, at, complete, id)
  if redis.call('EXISTS', key) == 0 then return 0 end
  redis.call('HINCRBY', key, 'count', 1)
  redis.call('HSET', key, 'last', at)
  if complete == '1' then
    redis.call('HSET', key, 'status', 'completed')
    redis.call('ZREM', all, id)
  end
  return 1
end
";

pub struct RedisSessionStore {
    redis: RedisClient,
    insert: redis::Script,
    record: redis::Script,
}

impl std::fmt::Debug for RedisSessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSessionStore").finish_non_exhaustive()
    }
}

/// A session's hash as a record; `None` when it is gone (an empty hash).
fn parse(fields: &HashMap<String, String>) -> anyhow::Result<Option<SessionRecord>> {
    let Some(record) = fields.get("record") else {
        return Ok(None);
    };
    let mut record: SessionRecord = serde_json::from_str(record)?;
    record.execution_count = fields.get("count").and_then(|c| c.parse().ok()).unwrap_or(0);
    record.last_executed_at = fields
        .get("last")
        .filter(|l| !l.is_empty())
        .and_then(|l| timefmt::parse(l).ok());
    if fields.get("status").is_some_and(|s| s == "completed") {
        record.status = SessionStatus::Completed;
    }
    Ok(Some(record))
}

impl RedisSessionStore {
    pub fn new(redis: RedisClient) -> Self {
        RedisSessionStore {
            redis,
            insert: redis::Script::new(INSERT),
            record: redis::Script::new(&format!(
                "{RECORD_FN}return record(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])"
            )),
        }
    }

    async fn read(&self, id: &str) -> anyhow::Result<Option<SessionRecord>> {
        let key = hash_key(id);
        let fields: HashMap<String, String> = self
            .redis
            .run(|mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await })
            .await?;
        parse(&fields)
    }

    async fn unindex(&self, ids: &[String], language_title: Option<&str>) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = ids.to_vec();
        let function = language_title.map(function_key);
        self.redis
            .run(|mut c| async move {
                let mut pipe = redis::pipe();
                for id in &ids {
                    pipe.del(hash_key(id)).ignore();
                    pipe.zrem(ALL, id).ignore();
                    pipe.srem(owner_key(key_owner_hash(id)), id).ignore();
                }
                if let Some(f) = &function {
                    pipe.del(f).ignore();
                }
                pipe.query_async::<()>(&mut c).await
            })
            .await
    }
}

#[async_trait]
impl SessionStore for RedisSessionStore {
    async fn insert(&self, record: SessionRecord) -> anyhow::Result<bool> {
        let json = serde_json::to_string(&record)?;
        let expires = unix_ms(record.expires_at);
        let keys = [
            hash_key(&record.key()),
            ALL.to_owned(),
            function_key(&record.language_title),
            owner_key(&owner_hash(&record.owner)),
        ];
        let id = record.key();
        let script = &self.insert;
        let inserted: i64 = self
            .redis
            .run(|mut c| async move {
                script
                    .key(&keys[0])
                    .key(&keys[1])
                    .key(&keys[2])
                    .key(&keys[3])
                    .arg(json)
                    .arg(expires)
                    .arg(id)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(inserted == 1)
    }

    async fn get(&self, request_id: &str) -> anyhow::Result<Option<SessionRecord>> {
        let now = OffsetDateTime::now_utc();
        Ok(self.read(request_id).await?.filter(|s| !s.is_expired(now)))
    }

    async fn list(&self, owner: &str) -> anyhow::Result<Vec<SessionRecord>> {
        let index = owner_key(&owner_hash(owner));
        let ids: Vec<String> = {
            let index = index.clone();
            self.redis
                .run(|mut c| async move { redis::cmd("SMEMBERS").arg(index).query_async(&mut c).await })
                .await?
        };
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let hashes: Vec<HashMap<String, String>> = {
            let ids = ids.clone();
            self.redis
                .run(|mut c| async move {
                    let mut pipe = redis::pipe();
                    for id in &ids {
                        pipe.hgetall(hash_key(id));
                    }
                    pipe.query_async(&mut c).await
                })
                .await?
        };
        let now = OffsetDateTime::now_utc();
        let mut sessions = Vec::new();
        let mut gone = Vec::new();
        for (id, fields) in ids.into_iter().zip(&hashes) {
            match parse(fields)? {
                // The owner check guards against the (128-bit) hash colliding.
                Some(s) if !s.is_expired(now) && s.owner == owner => sessions.push(s),
                Some(_) => {}
                None => gone.push(id),
            }
        }
        // Hashes gone (expired, evicted): forget their IDs. Best effort, as
        // the listing itself is done: the next one tries again.
        if !gone.is_empty()
            && let Err(e) = self
                .redis
                .run(|mut c| async move { redis::cmd("SREM").arg(index).arg(gone).query_async::<()>(&mut c).await })
                .await
        {
            tracing::debug!(error = %e, "could not prune an owner's session index");
        }
        Ok(sessions)
    }

    async fn record_execution(&self, request_id: &str, at: OffsetDateTime, complete: bool) -> anyhow::Result<bool> {
        let key = hash_key(request_id);
        let at = timefmt::format(at);
        let script = &self.record;
        self.redis
            .run(|mut c| async move {
                script
                    .key(key)
                    .key(ALL)
                    .arg(at)
                    .arg(if complete { "1" } else { "0" })
                    .arg(request_id)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|counted| counted == 1)
    }

    async fn remove(&self, request_id: &str) -> anyhow::Result<Option<SessionRecord>> {
        let record = self.read(request_id).await?;
        if let Some(r) = &record {
            let (id, f) = (r.key(), function_key(&r.language_title));
            self.unindex(std::slice::from_ref(&id), None).await?;
            self.redis
                .run(|mut c| async move { redis::cmd("SREM").arg(f).arg(id).query_async::<()>(&mut c).await })
                .await?;
        }
        Ok(record)
    }

    async fn remove_expired(&self, now: OffsetDateTime) -> anyhow::Result<Vec<String>> {
        // The hashes expire by themselves; only the indexes need pruning.
        let cutoff = unix_ms(now);
        let ids: Vec<String> = self
            .redis
            .run(|mut c| async move {
                let (ids, _removed): (Vec<String>, i64) = redis::pipe()
                    .cmd("ZRANGEBYSCORE")
                    .arg(ALL)
                    .arg("-inf")
                    .arg(cutoff)
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(ALL)
                    .arg("-inf")
                    .arg(cutoff)
                    .query_async(&mut c)
                    .await?;
                Ok(ids)
            })
            .await?;
        if !ids.is_empty() {
            let owned = ids.clone();
            self.redis
                .run(|mut c| async move {
                    let mut pipe = redis::pipe();
                    for id in &owned {
                        pipe.srem(owner_key(key_owner_hash(id)), id).ignore();
                    }
                    pipe.query_async::<()>(&mut c).await
                })
                .await?;
        }
        Ok(ids)
    }

    async fn remove_function(&self, language_title: &str) -> anyhow::Result<Vec<String>> {
        let f = function_key(language_title);
        let ids: Vec<String> = self
            .redis
            .run(|mut c| async move { redis::cmd("SMEMBERS").arg(f).query_async(&mut c).await })
            .await?;
        self.unindex(&ids, Some(language_title)).await?;
        Ok(ids)
    }

    async fn remove_version(&self, language_title: &str, version: i64) -> anyhow::Result<Vec<String>> {
        let f = function_key(language_title);
        let members = f.clone();
        let all: Vec<String> = self
            .redis
            .run(|mut c| async move { redis::cmd("SMEMBERS").arg(members).query_async(&mut c).await })
            .await?;
        // One read per session of the function: deleting a version is rare.
        let mut ids = Vec::new();
        for id in all {
            if self.read(&id).await?.is_some_and(|s| s.version == version) {
                ids.push(id);
            }
        }
        if ids.is_empty() {
            return Ok(ids);
        }
        self.unindex(&ids, None).await?;
        let gone = ids.clone();
        self.redis
            .run(|mut c| async move { redis::cmd("SREM").arg(f).arg(gone).query_async::<()>(&mut c).await })
            .await?;
        Ok(ids)
    }

    async fn active_count(&self) -> anyhow::Result<usize> {
        // Sessions not yet expired and not completed.
        let now = unix_ms(OffsetDateTime::now_utc());
        let n: usize = self
            .redis
            .run(|mut c| async move {
                redis::cmd("ZCOUNT")
                    .arg(ALL)
                    .arg(format!("({now}"))
                    .arg("+inf")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(n)
    }
}
