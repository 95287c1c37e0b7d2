//! The shared L2: results in Redis under `fnrt:cache:{key}` (the key carries
//! its own format version), as `{"s": stored_at_ms, "t": ttl_ms, "r": result}`
//! with the remaining TTL as the Redis expiry.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::redis_client::RedisClient;
use fnrt_core::cache::{CacheKey, CachedResult, ResultCache};

#[derive(Debug)]
pub struct RedisCache {
    redis: RedisClient,
}

impl RedisCache {
    pub fn new(redis: RedisClient) -> Self {
        RedisCache { redis }
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    s: u64,
    t: u64,
    r: Value,
}

fn redis_key(key: &CacheKey) -> String {
    format!("fnrt:cache:{}", key.0)
}

#[async_trait]
impl ResultCache for RedisCache {
    fn layer(&self) -> &'static str {
        "l2"
    }

    async fn get(&self, key: &CacheKey) -> anyhow::Result<Option<CachedResult>> {
        let k = redis_key(key);
        let raw: Option<Vec<u8>> = self
            .redis
            .run(|mut c| async move { redis::cmd("GET").arg(k).query_async(&mut c).await })
            .await?;
        let Some(raw) = raw else { return Ok(None) };
        // An entry this build cannot read is a miss, not an error.
        let Ok(stored) = serde_json::from_slice::<Stored>(&raw) else {
            return Ok(None);
        };
        Ok(Some(CachedResult {
            result: Arc::new(stored.r),
            stored_at: UNIX_EPOCH + Duration::from_millis(stored.s),
            ttl: Duration::from_millis(stored.t),
        }))
    }

    async fn put(&self, key: &CacheKey, entry: &CachedResult) -> anyhow::Result<()> {
        let remaining = entry.remaining().as_millis() as u64;
        if remaining == 0 {
            return Ok(());
        }
        let stored = Stored {
            s: entry
                .stored_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            t: entry.ttl.as_millis() as u64,
            r: (*entry.result).clone(),
        };
        let bytes = serde_json::to_vec(&stored)?;
        let k = redis_key(key);
        self.redis
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(k)
                    .arg(bytes)
                    .arg("PX")
                    .arg(remaining)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }
}
