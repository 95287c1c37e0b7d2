//! Sessions in process: the embedded default.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{SessionRecord, SessionStatus, SessionStore};

#[derive(Debug, Default)]
pub struct MemorySessionStore {
    sessions: Mutex<HashMap<String, SessionRecord>>,
}

impl MemorySessionStore {
    /// Whether a session that has not expired is here (`get` without the copy).
    pub fn contains(&self, key: &str) -> bool {
        let now = OffsetDateTime::now_utc();
        self.sessions
            .lock()
            .unwrap()
            .get(key)
            .is_some_and(|s| !s.is_expired(now))
    }
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    async fn insert(&self, record: SessionRecord) -> anyhow::Result<bool> {
        let mut sessions = self.sessions.lock().unwrap();
        let now = OffsetDateTime::now_utc();
        match sessions.get(&record.key()) {
            Some(existing) if !existing.is_expired(now) => Ok(false),
            _ => {
                sessions.insert(record.key(), record);
                Ok(true)
            }
        }
    }

    async fn get(&self, request_id: &str) -> anyhow::Result<Option<SessionRecord>> {
        let sessions = self.sessions.lock().unwrap();
        let now = OffsetDateTime::now_utc();
        Ok(sessions.get(request_id).filter(|s| !s.is_expired(now)).cloned())
    }

    async fn list(&self, owner: &str) -> anyhow::Result<Vec<SessionRecord>> {
        let sessions = self.sessions.lock().unwrap();
        let now = OffsetDateTime::now_utc();
        Ok(sessions
            .values()
            .filter(|s| s.owner == owner && !s.is_expired(now))
            .cloned()
            .collect())
    }

    async fn record_execution(&self, request_id: &str, at: OffsetDateTime, complete: bool) -> anyhow::Result<bool> {
        let mut sessions = self.sessions.lock().unwrap();
        let now = OffsetDateTime::now_utc();
        let Some(s) = sessions.get_mut(request_id).filter(|s| !s.is_expired(now)) else {
            return Ok(false);
        };
        s.execution_count += 1;
        s.last_executed_at = Some(at);
        if complete {
            s.status = SessionStatus::Completed;
        }
        Ok(true)
    }

    async fn remove(&self, request_id: &str) -> anyhow::Result<Option<SessionRecord>> {
        Ok(self.sessions.lock().unwrap().remove(request_id))
    }

    async fn remove_expired(&self, now: OffsetDateTime) -> anyhow::Result<Vec<String>> {
        let mut sessions = self.sessions.lock().unwrap();
        let expired: Vec<String> = sessions
            .values()
            .filter(|s| s.is_expired(now))
            .map(SessionRecord::key)
            .collect();
        for id in &expired {
            sessions.remove(id);
        }
        Ok(expired)
    }

    async fn remove_function(&self, language_title: &str) -> anyhow::Result<Vec<String>> {
        let mut sessions = self.sessions.lock().unwrap();
        let ids: Vec<String> = sessions
            .values()
            .filter(|s| s.language_title == language_title)
            .map(SessionRecord::key)
            .collect();
        for id in &ids {
            sessions.remove(id);
        }
        Ok(ids)
    }

    async fn remove_version(&self, language_title: &str, version: i64) -> anyhow::Result<Vec<String>> {
        let mut sessions = self.sessions.lock().unwrap();
        let ids: Vec<String> = sessions
            .values()
            .filter(|s| s.language_title == language_title && s.version == version)
            .map(SessionRecord::key)
            .collect();
        for id in &ids {
            sessions.remove(id);
        }
        Ok(ids)
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
