//! One shared Redis connection (redis `ConnectionManager`: multiplexed,
//! reconnecting) for the L2 cache, live sessions and rate limits.
//!
//! Every command is bounded by a short timeout, so a Redis outage costs an
//! execution at most that long before the caller falls back (no L2 hit,
//! per-process limits, sessions kept locally). After a failure, commands
//! fail at once for a second (one probe per second finds Redis again), so a
//! hung Redis does not slow every request. The client remembers whether its
//! last command worked, for `/health`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

/// How long one command may take before the caller gives up on Redis.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failure, how long commands fail at once before Redis is tried again.
const BACKOFF: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct RedisClient {
    client: redis::Client,
    /// Connected lazily, so the controller starts (degraded) while Redis is
    /// down; once made, it reconnects by itself. Read without a lock: every
    /// command takes it, and at high concurrency a mutex here queued them.
    manager: Arc<OnceCell<ConnectionManager>>,
    healthy: Arc<AtomicBool>,
    /// When the last failure happened, in ms since `epoch`.
    failed_at_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient").finish_non_exhaustive()
    }
}

impl RedisClient {
    /// Parses the URL; connects on first use.
    pub fn new(url: &str) -> anyhow::Result<Self> {
        Ok(RedisClient {
            client: redis::Client::open(url)?,
            manager: Arc::new(OnceCell::new()),
            healthy: Arc::new(AtomicBool::new(false)),
            failed_at_ms: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        })
    }

    /// The client, for what needs a connection of its own (pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        // A failed first connection leaves the cell empty: the next command
        // tries again.
        let manager = self
            .manager
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(COMMAND_TIMEOUT))
                    .set_response_timeout(Some(COMMAND_TIMEOUT))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await?;
        Ok(manager.clone())
    }

    /// Runs one command (or pipeline/script invocation) within the timeout.
    pub async fn run<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let failed_at = self.failed_at_ms.load(Ordering::Relaxed);
        if failed_at != 0 && now_ms.saturating_sub(failed_at) < BACKOFF.as_millis() as u64 {
            anyhow::bail!("redis: unavailable (retrying shortly)");
        }
        let result = tokio::time::timeout(COMMAND_TIMEOUT * 2, async {
            let conn = self.connection().await?;
            f(conn).await
        })
        .await;
        let result = match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(anyhow::anyhow!("redis: {e}")),
            Err(_) => Err(anyhow::anyhow!("redis: no answer within {:?}", COMMAND_TIMEOUT * 2)),
        };
        // 0 means "no recent failure"; a failure at ms 0 counts as 1.
        self.failed_at_ms
            .store(if result.is_ok() { 0 } else { now_ms.max(1) }, Ordering::Relaxed);
        let was = self.healthy.swap(result.is_ok(), Ordering::Relaxed);
        match (&result, was) {
            (Err(e), true) => {
                tracing::warn!(error = %e, "Redis is unreachable; degrading (no L2 cache, per-process limits)")
            }
            (Ok(_), false) => tracing::info!("Redis is reachable"),
            _ => {}
        }
        result
    }

    /// `PING`, for `/health`.
    pub async fn ping(&self) -> bool {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .is_ok()
    }

    /// Whether the last command worked.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}
