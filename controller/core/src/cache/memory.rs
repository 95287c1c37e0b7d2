//! The in-process L1: moka, bounded by the serialised size of its results,
//! each entry living for what is left of its TTL.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::Expiry;

use super::{CacheKey, CachedResult, ResultCache};

#[derive(Clone)]
struct Entry {
    cached: CachedResult,
    /// Weight: the result's JSON size plus the key, computed once.
    size: u32,
}

pub struct MemoryCache {
    cache: moka::future::Cache<CacheKey, Entry>,
}

impl std::fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCache").finish_non_exhaustive()
    }
}

struct RemainingTtl;

impl Expiry<CacheKey, Entry> for RemainingTtl {
    fn expire_after_create(&self, _key: &CacheKey, value: &Entry, _now: Instant) -> Option<Duration> {
        Some(value.cached.remaining())
    }
}

impl MemoryCache {
    pub fn new(max_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k, v: &Entry| v.size)
            .expire_after(RemainingTtl)
            .build();
        MemoryCache { cache }
    }
}

#[async_trait]
impl ResultCache for MemoryCache {
    fn layer(&self) -> &'static str {
        "l1"
    }

    async fn get(&self, key: &CacheKey) -> anyhow::Result<Option<CachedResult>> {
        Ok(self.cache.get(key).await.map(|e| e.cached))
    }

    async fn put(&self, key: &CacheKey, entry: &CachedResult) -> anyhow::Result<()> {
        if entry.remaining().is_zero() {
            return Ok(());
        }
        let size = (entry.result.to_string().len() + key.0.len() + 64).min(u32::MAX as usize) as u32;
        let entry = Entry {
            cached: entry.clone(),
            size,
        };
        self.cache.insert(key.clone(), entry).await;
        Ok(())
    }
}
