//! The result cache.
//!
//! One [`ResultCache`] trait; [`MemoryCache`] (moka, bounded by bytes, TTL per
//! entry) is the in-process L1. A Redis L2 implements the same trait.
//!
//! The key ([`CacheKey`]) covers everything the function sees: the
//! Language-Title, the version's code hash, and the canonical JSON of
//! `params` and of the `context` passed to the function. Only successes are
//! cached; the execute path decides that, this module only stores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::Expiry;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Bumped whenever the key or entry format changes, so old entries are never read.
const KEY_VERSION: &str = "v1";

/// The hash that names one cached result.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(pub String);

impl CacheKey {
    pub fn new(language_title: &str, code_hash: &str, params: &Value, context: &Value) -> Self {
        let mut h = Sha256::new();
        for part in [
            KEY_VERSION,
            language_title,
            code_hash,
            &canonical_json(params),
            &canonical_json(context),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        CacheKey(format!("{KEY_VERSION}:{}", hex::encode(h.finalize())))
    }
}

/// JSON with object keys sorted at every level, so equal values give equal
/// text whatever order the client sent them in.
pub fn canonical_json(value: &Value) -> String {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k.clone(), sorted(v))).collect())
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}

/// A cached result and when it was stored.
#[derive(Debug, Clone)]
pub struct CachedResult {
    pub result: Arc<Value>,
    pub stored_at: Instant,
    ttl: Duration,
    size: u32,
}

impl CachedResult {
    pub fn age(&self) -> Duration {
        self.stored_at.elapsed()
    }
}

#[async_trait]
pub trait ResultCache: Send + Sync {
    /// Name of the layer for metrics (`l1`, `l2`).
    fn layer(&self) -> &'static str;
    async fn get(&self, key: &CacheKey) -> Option<CachedResult>;
    async fn put(&self, key: CacheKey, result: Arc<Value>, ttl: Duration);
}

/// The in-process L1: bounded by the serialised size of its results.
pub struct MemoryCache {
    cache: moka::future::Cache<CacheKey, CachedResult>,
}

impl std::fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCache").finish_non_exhaustive()
    }
}

struct PerEntryTtl;

impl Expiry<CacheKey, CachedResult> for PerEntryTtl {
    fn expire_after_create(&self, _key: &CacheKey, value: &CachedResult, _now: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl MemoryCache {
    pub fn new(max_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k, v: &CachedResult| v.size)
            .expire_after(PerEntryTtl)
            .build();
        MemoryCache { cache }
    }
}

#[async_trait]
impl ResultCache for MemoryCache {
    fn layer(&self) -> &'static str {
        "l1"
    }

    async fn get(&self, key: &CacheKey) -> Option<CachedResult> {
        self.cache.get(key).await
    }

    async fn put(&self, key: CacheKey, result: Arc<Value>, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        // The weight is the result's JSON size plus the key; computed once here.
        let size = (result.to_string().len() + key.0.len() + 64).min(u32::MAX as usize) as u32;
        let entry = CachedResult {
            result,
            stored_at: Instant::now(),
            ttl,
            size,
        };
        self.cache.insert(key, entry).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_ignores_key_order_but_not_values() {
        let a = CacheKey::new("nodejs-x", "h", &json!({"a": 1, "b": {"c": 2, "d": 3}}), &json!({}));
        let b = CacheKey::new("nodejs-x", "h", &json!({"b": {"d": 3, "c": 2}, "a": 1}), &json!({}));
        assert_eq!(a, b);
        let c = CacheKey::new("nodejs-x", "h", &json!({"a": 2, "b": {"c": 2, "d": 3}}), &json!({}));
        assert_ne!(a, c);
        let d = CacheKey::new("nodejs-x", "h2", &json!({"a": 1, "b": {"c": 2, "d": 3}}), &json!({}));
        assert_ne!(a, d);
        let e = CacheKey::new(
            "nodejs-x",
            "h",
            &json!({"a": 1, "b": {"c": 2, "d": 3}}),
            &json!({"user_id": "u"}),
        );
        assert_ne!(a, e);
    }

    #[tokio::test]
    async fn entries_expire_after_their_ttl() {
        let cache = MemoryCache::new(1 << 20);
        let k = CacheKey::new("nodejs-x", "h", &json!({}), &json!({}));
        cache
            .put(k.clone(), Arc::new(json!(1)), Duration::from_millis(50))
            .await;
        assert!(cache.get(&k).await.is_some());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(cache.get(&k).await.is_none());
        cache.put(k.clone(), Arc::new(json!(1)), Duration::ZERO).await;
        assert!(cache.get(&k).await.is_none());
    }
}
