//! Rate limits.
//!
//! One [`RateLimiter`] trait: [`LocalRateLimiter`] (governor, GCRA, in
//! process) for a single controller, and [`RedisRateLimiter`] (the same GCRA
//! as a Lua script on Redis, with Redis `TIME` as the one clock) when several
//! replicas share Redis; it falls back to the local limiter while Redis is
//! unreachable. Limits are per minute, keyed by the token's subject when the
//! request carries a valid token and by the client's address otherwise.

use std::net::IpAddr;
use std::num::NonZeroU32;

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Which table row of the contract a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitClass {
    /// `/api/v1/initialize`, `/api/v1/execute`, `/api/v1/sessions`.
    Execute,
    /// `/api/v1/functions`.
    Functions,
}

impl LimitClass {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitClass::Execute => "execute",
            LimitClass::Functions => "functions",
        }
    }
}

/// Who a request is counted for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    Subject(String),
    Client(IpAddr),
}

/// Requests per minute for each class; 0 disables that limit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub execute: u32,
    pub functions: u32,
    pub unauthenticated: u32,
}

#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Counts one request; `Err(seconds)` says when to retry.
    async fn check(&self, class: LimitClass, key: &RateKey) -> Result<(), u64>;
}

/// governor's keyed GCRA limiters, one per (class, authenticated) pair.
pub struct LocalRateLimiter {
    execute: Option<DefaultKeyedRateLimiter<RateKey>>,
    functions: Option<DefaultKeyedRateLimiter<RateKey>>,
    unauthenticated_execute: Option<DefaultKeyedRateLimiter<RateKey>>,
    unauthenticated_functions: Option<DefaultKeyedRateLimiter<RateKey>>,
}

impl std::fmt::Debug for LocalRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRateLimiter").finish_non_exhaustive()
    }
}

fn per_minute(n: u32) -> Option<DefaultKeyedRateLimiter<RateKey>> {
    // A burst of n, refilled evenly over the minute.
    NonZeroU32::new(n).map(|n| governor::RateLimiter::keyed(Quota::per_minute(n)))
}

impl LocalRateLimiter {
    pub fn new(limits: Limits) -> Self {
        LocalRateLimiter {
            execute: per_minute(limits.execute),
            functions: per_minute(limits.functions),
            unauthenticated_execute: per_minute(limits.unauthenticated),
            unauthenticated_functions: per_minute(limits.unauthenticated),
        }
    }

    /// Forgets keys that are back to a full bucket, so memory stays bounded.
    pub fn shrink(&self) {
        for limiter in [
            &self.execute,
            &self.functions,
            &self.unauthenticated_execute,
            &self.unauthenticated_functions,
        ]
        .into_iter()
        .flatten()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[async_trait]
impl RateLimiter for LocalRateLimiter {
    async fn check(&self, class: LimitClass, key: &RateKey) -> Result<(), u64> {
        let limiter = match (class, key) {
            (LimitClass::Execute, RateKey::Subject(_)) => &self.execute,
            (LimitClass::Functions, RateKey::Subject(_)) => &self.functions,
            (LimitClass::Execute, RateKey::Client(_)) => &self.unauthenticated_execute,
            (LimitClass::Functions, RateKey::Client(_)) => &self.unauthenticated_functions,
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            // Round up: "retry in 0 s" would invite an immediate retry.
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

/// GCRA (the algorithm governor implements) on Redis, as a Lua function
/// (so that [`crate::admission`]'s script limits the same way): `key`, the
/// emission interval in ms (a minute / limit) and the limit (burst).
/// Answers 0 when allowed, else the ms to wait. Redis `TIME` is the clock,
/// so replicas with skewed clocks still agree.
pub(crate) const GCRA_FN: &str = r"
local function gcra(key, interval, burst)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allowed_at = new_tat - interval * burst
  if now < allowed_at then
    return allowed_at - now
  end
  redis.call('SET', key, new_tat, 'PX', new_tat - now)
  return 0
end
";

/// A request's limit in Redis: its key, the emission interval in ms and the
/// burst.
#[derive(Debug)]
pub(crate) struct Gcra {
    pub key: String,
    pub interval_ms: u64,
    pub burst: u32,
}

/// Limits shared by every controller on one Redis.
pub struct RedisRateLimiter {
    redis: crate::redis_client::RedisClient,
    script: redis::Script,
    limits: Limits,
    /// Used while Redis does not answer.
    fallback: std::sync::Arc<LocalRateLimiter>,
}

impl std::fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRateLimiter").finish_non_exhaustive()
    }
}

impl RedisRateLimiter {
    /// `fallback` counts while Redis does not answer.
    pub fn new(
        redis: crate::redis_client::RedisClient,
        limits: Limits,
        fallback: std::sync::Arc<LocalRateLimiter>,
    ) -> Self {
        RedisRateLimiter {
            redis,
            script: redis::Script::new(&format!(
                "{GCRA_FN}return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))"
            )),
            limits,
            fallback,
        }
    }
}

impl RedisRateLimiter {
    /// The limit `key` is counted against in `class`; `None` when that
    /// limit is off.
    pub(crate) fn gcra(&self, class: LimitClass, key: &RateKey) -> Option<Gcra> {
        let (limit, who) = match key {
            RateKey::Subject(sub) => (
                match class {
                    LimitClass::Execute => self.limits.execute,
                    LimitClass::Functions => self.limits.functions,
                },
                format!("sub:{sub}"),
            ),
            RateKey::Client(ip) => (self.limits.unauthenticated, format!("ip:{ip}")),
        };
        (limit != 0).then(|| Gcra {
            key: format!("fnrt:rl:v1:{}:{who}", class.as_str()),
            interval_ms: 60_000u64.div_ceil(u64::from(limit)),
            burst: limit,
        })
    }
}

/// The seconds to wait before a retry, from GCRA's milliseconds.
pub(crate) fn retry_after_secs(wait_ms: u64) -> u64 {
    wait_ms.div_ceil(1000).max(1)
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn check(&self, class: LimitClass, key: &RateKey) -> Result<(), u64> {
        let Some(Gcra {
            key: redis_key,
            interval_ms,
            burst,
        }) = self.gcra(class, key)
        else {
            return Ok(());
        };
        let script = &self.script;
        let answer = self
            .redis
            .run(|mut c| async move {
                script
                    .key(redis_key)
                    .arg(interval_ms)
                    .arg(burst)
                    .invoke_async::<u64>(&mut c)
                    .await
            })
            .await;
        match answer {
            Ok(0) => Ok(()),
            Ok(wait_ms) => Err(retry_after_secs(wait_ms)),
            Err(_) => self.fallback.check(class, key).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limits_each_key_separately() {
        let rl = LocalRateLimiter::new(Limits {
            execute: 3,
            functions: 1,
            unauthenticated: 1,
        });
        let alice = RateKey::Subject("alice".into());
        let bob = RateKey::Subject("bob".into());
        for _ in 0..3 {
            rl.check(LimitClass::Execute, &alice).await.unwrap();
        }
        let retry = rl.check(LimitClass::Execute, &alice).await.unwrap_err();
        assert!((1..=20).contains(&retry), "retry after {retry}");
        rl.check(LimitClass::Execute, &bob).await.unwrap();
        rl.check(LimitClass::Functions, &alice).await.unwrap();
        assert!(rl.check(LimitClass::Functions, &alice).await.is_err());
        let ip = RateKey::Client("127.0.0.1".parse().unwrap());
        rl.check(LimitClass::Execute, &ip).await.unwrap();
        assert!(rl.check(LimitClass::Execute, &ip).await.is_err());
    }

    #[tokio::test]
    async fn zero_disables_a_limit() {
        let rl = LocalRateLimiter::new(Limits {
            execute: 0,
            functions: 0,
            unauthenticated: 0,
        });
        for _ in 0..1000 {
            rl.check(LimitClass::Execute, &RateKey::Subject("a".into()))
                .await
                .unwrap();
        }
    }
}
