//! The result cache.
//!
//! One [`ResultCache`] trait per layer: [`memory::MemoryCache`] (moka,
//! bounded by bytes, TTL per entry) is the in-process L1, and the
//! controller's `RedisCache` the shared L2 when `REDIS_URL` is set. [`Layers`]
//! asks them in order, fills the faster layers from a slower layer's hit,
//! stores in every layer, and counts hits and misses per layer.
//!
//! The key ([`CacheKey`]) covers everything the function sees: the
//! Language-Title, the version's code hash, and the canonical JSON of
//! `params` and of the `context` passed to the function. Only successes are
//! cached; the execute path decides that, this module only stores.

pub mod memory;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::metrics::Metrics;

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
        // `hex::encode` goes a char at a time (about 2 % of a cached hit's
        // instructions under callgrind, with the session key's): the digits
        // are written into place here.
        let mut digits = [0u8; 64];
        hex::encode_to_slice(h.finalize(), &mut digits).expect("32 bytes are 64 hex digits");
        let mut key = String::with_capacity(KEY_VERSION.len() + 1 + digits.len());
        key.push_str(KEY_VERSION);
        key.push(':');
        key.push_str(std::str::from_utf8(&digits).expect("hex digits are ASCII"));
        CacheKey(key)
    }
}

/// JSON with object keys sorted at every level, so equal values give equal
/// text whatever order the client sent them in.
///
/// Written straight from the value, through [`Sorted`]: a sorted copy of
/// the tree (a clone of every key and value, then freed) was about 2 % of
/// the controller's CPU on a cached hit (docs/benchmarks.md).
pub fn canonical_json(value: &Value) -> String {
    // A `Value` always serialises, and serde_json writes UTF-8.
    serde_json::to_string(&Sorted(value)).unwrap_or_default()
}

/// Serialises a JSON value with every object's keys in order. serde_json's
/// map keeps its keys sorted already (unless a dependency turns on its
/// `preserve_order` feature), so the sort is usually only a check.
struct Sorted<'a>(&'a Value);

impl serde::Serialize for Sorted<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(map) if map.keys().is_sorted() => {
                serializer.collect_map(map.iter().map(|(k, v)| (k, Sorted(v))))
            }
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                // Keys are unique: an unstable sort gives the one order.
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                serializer.collect_map(entries.into_iter().map(|(k, v)| (k, Sorted(v))))
            }
            Value::Array(items) => serializer.collect_seq(items.iter().map(Sorted)),
            other => other.serialize(serializer),
        }
    }
}

/// A cached result, when it was stored and for how long.
#[derive(Debug, Clone)]
pub struct CachedResult {
    pub result: Arc<Value>,
    /// Wall-clock time, so that every replica computes the same age.
    pub stored_at: SystemTime,
    pub ttl: Duration,
}

impl CachedResult {
    pub fn new(result: Arc<Value>, ttl: Duration) -> Self {
        CachedResult {
            result,
            stored_at: SystemTime::now(),
            ttl,
        }
    }

    pub fn age(&self) -> Duration {
        self.stored_at.elapsed().unwrap_or_default()
    }

    /// What is left of the TTL.
    pub fn remaining(&self) -> Duration {
        self.ttl.saturating_sub(self.age())
    }
}

/// One layer of the cache.
#[async_trait]
pub trait ResultCache: Send + Sync {
    /// Name of the layer for metrics (`l1`, `l2`).
    fn layer(&self) -> &'static str;
    async fn get(&self, key: &CacheKey) -> anyhow::Result<Option<CachedResult>>;
    /// Stores `entry` for what is left of its TTL.
    async fn put(&self, key: &CacheKey, entry: &CachedResult) -> anyhow::Result<()>;
}

/// The layers, fastest first.
pub struct Layers {
    layers: Vec<Arc<dyn ResultCache>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.layers.iter().map(|l| l.layer()).collect();
        f.debug_struct("Layers").field("layers", &names).finish()
    }
}

impl Layers {
    pub fn new(layers: Vec<Arc<dyn ResultCache>>, metrics: Arc<Metrics>) -> Self {
        Layers { layers, metrics }
    }

    /// The first layer's hit no older than `max_age`; a layer that fails
    /// counts as a miss. A hit in a slower layer fills the faster ones (the
    /// first, L1, for at most `l1_ttl`).
    pub async fn get(
        &self,
        key: &CacheKey,
        max_age: Option<Duration>,
        l1_ttl: Option<Duration>,
    ) -> Option<CachedResult> {
        for (i, layer) in self.layers.iter().enumerate() {
            let found = match layer.get(key).await {
                Ok(found) => found.filter(|e| max_age.is_none_or(|max| e.age() <= max)),
                Err(e) => {
                    tracing::debug!(layer = layer.layer(), error = %e, "cache lookup failed");
                    None
                }
            };
            self.metrics.record_cache(layer.layer(), found.is_some());
            if let Some(entry) = found {
                for (j, faster) in self.layers[..i].iter().enumerate() {
                    let _ = faster.put(key, &Self::for_layer(&entry, j, l1_ttl)).await;
                }
                return Some(entry);
            }
        }
        None
    }

    /// Stores a fresh result in every layer for `ttl` (the first, L1, for
    /// at most `l1_ttl`).
    pub async fn put(&self, key: &CacheKey, result: Arc<Value>, ttl: Duration, l1_ttl: Option<Duration>) {
        if ttl.is_zero() {
            return;
        }
        let entry = CachedResult::new(result, ttl);
        for (i, layer) in self.layers.iter().enumerate() {
            if let Err(e) = layer.put(key, &Self::for_layer(&entry, i, l1_ttl)).await {
                tracing::debug!(layer = layer.layer(), error = %e, "cache store failed");
            }
        }
    }

    /// `entry` as layer `i` keeps it: the first layer no longer than `l1_ttl`.
    fn for_layer(entry: &CachedResult, i: usize, l1_ttl: Option<Duration>) -> CachedResult {
        match l1_ttl {
            Some(l1) if i == 0 => {
                let mut capped = entry.clone();
                capped.ttl = capped.ttl.min(entry.age() + l1);
                capped
            }
            _ => entry.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Keys outlive a release in Redis: the same inputs name the same entry
    /// (the digest of each part after its length, computed apart).
    #[test]
    fn a_key_is_the_versioned_sha256_of_its_parts_in_hex() {
        let key = CacheKey::new("nodejs-x", "h", &json!({"a": 1}), &json!({}));
        assert_eq!(
            key.0,
            "v1:f54cc4df2a967bc7cafcf5520448fe9d00abfaab21aaf3b2ea29b52fd5f89453"
        );
    }

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

    #[test]
    fn canonical_json_is_compact_with_keys_sorted_at_every_level_and_keys_stay_as_they_were() {
        let params = json!({"b": {"d": [3, "é\n"], "c": 2.5}, "a": 1});
        assert_eq!(canonical_json(&params), r#"{"a":1,"b":{"c":2.5,"d":[3,"é\n"]}}"#);
        assert_eq!(
            canonical_json(&json!([{"y": null, "x": true}, "s"])),
            r#"[{"x":true,"y":null},"s"]"#
        );
        // The key of a result cached in Redis by an earlier build is found
        // by this one (the value was computed from the format above).
        assert_eq!(
            CacheKey::new("nodejs-x", "h", &params, &json!({})).0,
            "v1:453aa24ea2b1299400214904e6648a568afed2a21af9b034581d953bce3b9e00"
        );
    }

    #[tokio::test]
    async fn entries_expire_after_their_ttl_and_max_age_bounds_a_hit() {
        let layers = Layers::new(
            vec![Arc::new(memory::MemoryCache::new(1 << 20))],
            Arc::new(Metrics::new()),
        );
        let k = CacheKey::new("nodejs-x", "h", &json!({}), &json!({}));
        layers
            .put(&k, Arc::new(json!(1)), Duration::from_millis(150), None)
            .await;
        assert!(layers.get(&k, None, None).await.is_some());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(layers.get(&k, Some(Duration::from_millis(10)), None).await.is_none());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(layers.get(&k, None, None).await.is_none());
        layers.put(&k, Arc::new(json!(1)), Duration::ZERO, None).await;
        assert!(layers.get(&k, None, None).await.is_none());
    }

    #[tokio::test]
    async fn the_first_layer_keeps_an_entry_no_longer_than_its_own_ttl() {
        // Two in-memory layers stand for L1 and L2.
        let (l1, l2) = (
            Arc::new(memory::MemoryCache::new(1 << 20)),
            Arc::new(memory::MemoryCache::new(1 << 20)),
        );
        let layers = Layers::new(vec![l1.clone(), l2.clone()], Arc::new(Metrics::new()));
        let k = CacheKey::new("nodejs-x", "h", &json!({}), &json!({}));
        layers
            .put(
                &k,
                Arc::new(json!(1)),
                Duration::from_secs(60),
                Some(Duration::from_millis(100)),
            )
            .await;
        assert!(l1.get(&k).await.unwrap().is_some() && l2.get(&k).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(l1.get(&k).await.unwrap().is_none(), "L1 kept it past its own TTL");
        // Served from L2, which refills L1 for L1's TTL only.
        assert!(layers.get(&k, None, Some(Duration::from_millis(100))).await.is_some());
        assert!(l1.get(&k).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(l1.get(&k).await.unwrap().is_none());
        assert!(l2.get(&k).await.unwrap().is_some());
    }
}
