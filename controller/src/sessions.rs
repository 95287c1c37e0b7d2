//! Live sessions: what `initialize` created and `execute` runs.
//!
//! One [`SessionStore`] trait; [`MemorySessionStore`] keeps them in process
//! (the embedded default); a Redis store shares them between replicas. A
//! record is plain data: the instance a retained session holds stays with the
//! controller process that holds it (see [`crate::engine`]).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    /// Can be executed.
    Active,
    /// Ran its one execution (`retain_session: false`); kept for status reads until it expires.
    Completed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub request_id: String,
    /// The `sub` that created it; nobody else sees it.
    pub owner: String,
    pub language_title: String,
    /// The function version fixed at initialize.
    pub version: i64,
    /// The context the function sees (the client's, without the controller's knobs).
    pub context: Value,
    pub timeout_ms: u64,
    pub retain: bool,
    pub status: SessionStatus,
    #[serde(with = "crate::timefmt::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "crate::timefmt::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub execution_count: u64,
    #[serde(with = "crate::timefmt::rfc3339::option")]
    pub last_executed_at: Option<OffsetDateTime>,
}

impl SessionRecord {
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at <= now
    }
}

#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Adds a session; false if its ID is taken.
    async fn insert(&self, record: SessionRecord) -> anyhow::Result<bool>;
    /// A session that has not expired.
    async fn get(&self, request_id: &str) -> anyhow::Result<Option<SessionRecord>>;
    /// Counts one execution; with `complete`, the session is done.
    async fn record_execution(&self, request_id: &str, at: OffsetDateTime, complete: bool) -> anyhow::Result<()>;
    /// Removes a session; the removed record, if it existed.
    async fn remove(&self, request_id: &str) -> anyhow::Result<Option<SessionRecord>>;
    /// Removes and returns sessions that expired by `now`.
    async fn remove_expired(&self, now: OffsetDateTime) -> anyhow::Result<Vec<SessionRecord>>;
    /// Removes and returns the sessions of a function (it was deleted).
    async fn remove_function(&self, language_title: &str) -> anyhow::Result<Vec<SessionRecord>>;
    /// Sessions that can still be executed.
    async fn active_count(&self) -> anyhow::Result<usize>;
}

#[derive(Debug, Default)]
pub struct MemorySessionStore {
    sessions: Mutex<HashMap<String, SessionRecord>>,
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    async fn insert(&self, record: SessionRecord) -> anyhow::Result<bool> {
        let mut sessions = self.sessions.lock().unwrap();
        let now = OffsetDateTime::now_utc();
        match sessions.get(&record.request_id) {
            Some(existing) if !existing.is_expired(now) => Ok(false),
            _ => {
                sessions.insert(record.request_id.clone(), record);
                Ok(true)
            }
        }
    }

    async fn get(&self, request_id: &str) -> anyhow::Result<Option<SessionRecord>> {
        let sessions = self.sessions.lock().unwrap();
        let now = OffsetDateTime::now_utc();
        Ok(sessions.get(request_id).filter(|s| !s.is_expired(now)).cloned())
    }

    async fn record_execution(&self, request_id: &str, at: OffsetDateTime, complete: bool) -> anyhow::Result<()> {
        if let Some(s) = self.sessions.lock().unwrap().get_mut(request_id) {
            s.execution_count += 1;
            s.last_executed_at = Some(at);
            if complete {
                s.status = SessionStatus::Completed;
            }
        }
        Ok(())
    }

    async fn remove(&self, request_id: &str) -> anyhow::Result<Option<SessionRecord>> {
        Ok(self.sessions.lock().unwrap().remove(request_id))
    }

    async fn remove_expired(&self, now: OffsetDateTime) -> anyhow::Result<Vec<SessionRecord>> {
        let mut sessions = self.sessions.lock().unwrap();
        let expired: Vec<String> = sessions
            .values()
            .filter(|s| s.is_expired(now))
            .map(|s| s.request_id.clone())
            .collect();
        Ok(expired.iter().filter_map(|id| sessions.remove(id)).collect())
    }

    async fn remove_function(&self, language_title: &str) -> anyhow::Result<Vec<SessionRecord>> {
        let mut sessions = self.sessions.lock().unwrap();
        let ids: Vec<String> = sessions
            .values()
            .filter(|s| s.language_title == language_title)
            .map(|s| s.request_id.clone())
            .collect();
        Ok(ids.iter().filter_map(|id| sessions.remove(id)).collect())
    }

    async fn active_count(&self) -> anyhow::Result<usize> {
        let now = OffsetDateTime::now_utc();
        Ok(self
            .sessions
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.status == SessionStatus::Active && !s.is_expired(now))
            .count())
    }
}
