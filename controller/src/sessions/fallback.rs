//! Redis sessions with an in-process fallback: while Redis does not
//! answer, new sessions live in this controller only (degraded, not down),
//! and sessions stored in Redis cannot be found until it is back.

use async_trait::async_trait;
use time::OffsetDateTime;

use super::memory::MemorySessionStore;
use super::redis::RedisSessionStore;
use super::{SessionRecord, SessionStore};

#[derive(Debug)]
pub struct FallbackSessionStore {
    shared: RedisSessionStore,
    local: MemorySessionStore,
}

impl FallbackSessionStore {
    pub fn new(shared: RedisSessionStore) -> Self {
        FallbackSessionStore {
            shared,
            local: MemorySessionStore::default(),
        }
    }

    /// Whether the session lives in this controller only (it was created
    /// while Redis did not answer).
    pub fn holds_locally(&self, key: &str) -> bool {
        self.local.contains(key)
    }
}

#[async_trait]
impl SessionStore for FallbackSessionStore {
    async fn insert(&self, record: SessionRecord) -> anyhow::Result<bool> {
        match self.shared.insert(record.clone()).await {
            Ok(inserted) => Ok(inserted),
            Err(e) => {
                tracing::warn!(error = %e, "Redis unavailable: keeping a new session in this controller only");
                self.local.insert(record).await
            }
        }
    }

    async fn get(&self, request_id: &str) -> anyhow::Result<Option<SessionRecord>> {
        if let Some(s) = self.local.get(request_id).await? {
            return Ok(Some(s));
        }
        Ok(self.shared.get(request_id).await.unwrap_or(None))
    }

    async fn list(&self, owner: &str) -> anyhow::Result<Vec<SessionRecord>> {
        // As `get`: the local copy of a key wins, and Redis down lists only the local ones.
        let mut sessions = self.local.list(owner).await?;
        let local: std::collections::HashSet<String> = sessions.iter().map(SessionRecord::key).collect();
        let shared = self.shared.list(owner).await.unwrap_or_default();
        sessions.extend(shared.into_iter().filter(|s| !local.contains(&s.key())));
        Ok(sessions)
    }

    async fn record_execution(&self, request_id: &str, at: OffsetDateTime, complete: bool) -> anyhow::Result<bool> {
        if self.holds_locally(request_id) {
            return self.local.record_execution(request_id, at, complete).await;
        }
        self.shared.record_execution(request_id, at, complete).await
    }

    async fn remove(&self, request_id: &str) -> anyhow::Result<Option<SessionRecord>> {
        if let Some(s) = self.local.remove(request_id).await? {
            return Ok(Some(s));
        }
        self.shared.remove(request_id).await
    }

    async fn remove_expired(&self, now: OffsetDateTime) -> anyhow::Result<Vec<String>> {
        let mut ids = self.local.remove_expired(now).await?;
        ids.extend(self.shared.remove_expired(now).await.unwrap_or_default());
        Ok(ids)
    }

    async fn remove_function(&self, language_title: &str) -> anyhow::Result<Vec<String>> {
        let mut ids = self.local.remove_function(language_title).await?;
        ids.extend(self.shared.remove_function(language_title).await?);
        Ok(ids)
    }

    async fn remove_version(&self, language_title: &str, version: i64) -> anyhow::Result<Vec<String>> {
        let mut ids = self.local.remove_version(language_title, version).await?;
        ids.extend(self.shared.remove_version(language_title, version).await?);
        Ok(ids)
    }

    async fn active_count(&self) -> anyhow::Result<usize> {
        let local = self.local.active_count().await?;
        Ok(local + self.shared.active_count().await.unwrap_or(0))
    }
}
