//! Function logs as users read them: per execution
//! (`GET /api/v1/executions/{id}/logs`) and per function, live
//! (`GET /api/v1/functions/{language_title}/logs?follow=true`).
//!
//! The core captures each execution's stdout and stderr
//! ([`fnrt_core::logs`]); the lines reach the database with the execution
//! record, off the request path ([`crate::records`]). Until the batch is
//! written, [`Recent`] holds them, so that a client reading the logs of
//! the execution it just ran finds them. Live lines go through the
//! [`LogHub`] to the followers of the function on this controller.
//!
//! # Layout
//!
//! - [`Logs`]: reading (recent, then the store), who may read what, and
//!   the retention sweep.
//! - [`Recent`]: the executions recorded in the last minute.
//! - [`LogHub`]: live lines per function.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fnrt_core::logs::{LogFollowers, LogLine};
use fnrt_core::records::ExecutionRecord;
use tokio::sync::broadcast;

use crate::store::{LogStore, StoreError, StoredLogs};

/// How long [`Recent`] keeps an execution: far longer than a batch of
/// records takes to be written.
const RECENT_TTL: Duration = Duration::from_secs(120);
/// Executions [`Recent`] keeps at most.
const RECENT_MAX: u64 = 20_000;
/// Executions kept per session or asynchronous execution in [`Recent`].
const RECENT_PER_REQUEST: usize = 64;
/// Lines a follower may fall behind before it misses some (it is told).
const FOLLOW_BUFFER: usize = 1024;

/// The executions recorded lately, by their id, by their session's or
/// asynchronous execution's id, and by function.
pub struct Recent {
    by_id: moka::sync::Cache<String, Arc<StoredLogs>>,
    by_request: moka::sync::Cache<String, Arc<Mutex<Vec<Arc<StoredLogs>>>>>,
    by_function: moka::sync::Cache<String, Arc<Mutex<Vec<Arc<StoredLogs>>>>>,
}

impl Default for Recent {
    fn default() -> Self {
        Recent {
            by_id: moka::sync::Cache::builder()
                .max_capacity(RECENT_MAX)
                .time_to_live(RECENT_TTL)
                .build(),
            by_request: moka::sync::Cache::builder()
                .max_capacity(RECENT_MAX)
                .time_to_live(RECENT_TTL)
                .build(),
            by_function: moka::sync::Cache::builder()
                .max_capacity(RECENT_MAX)
                .time_to_live(RECENT_TTL)
                .build(),
        }
    }
}

impl std::fmt::Debug for Recent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recent").finish_non_exhaustive()
    }
}

impl Recent {
    /// Keeps a record that was just handed to the writer.
    pub fn remember(&self, record: &ExecutionRecord) {
        let logs = Arc::new(stored(record));
        self.by_id.insert(logs.execution_id.clone(), logs.clone());
        // A function's last lines are only those of executions that wrote.
        let indexes = [
            Some((&self.by_request, &record.request_id)),
            record
                .logs
                .is_some()
                .then_some((&self.by_function, &record.language_title)),
        ];
        for (index, key) in indexes.into_iter().flatten() {
            let list = index.get_with(key.clone(), Default::default);
            let mut list = list.lock().unwrap();
            if list.len() >= RECENT_PER_REQUEST {
                list.remove(0);
            }
            list.push(logs.clone());
        }
    }

    fn of_function(&self, language_title: &str) -> Vec<Arc<StoredLogs>> {
        self.by_function
            .get(language_title)
            .map(|list| list.lock().unwrap().clone())
            .unwrap_or_default()
    }

    fn get(&self, id: &str) -> Vec<Arc<StoredLogs>> {
        if let Some(one) = self.by_id.get(id) {
            return vec![one];
        }
        self.by_request
            .get(id)
            .map(|list| list.lock().unwrap().clone())
            .unwrap_or_default()
    }
}

/// A record's logs as the store would give them back.
fn stored(record: &ExecutionRecord) -> StoredLogs {
    StoredLogs {
        execution_id: record.id.to_string(),
        request_id: record.request_id.clone(),
        subject: record.subject.clone(),
        language_title: record.language_title.clone(),
        created_ms: (record.started_at.unix_timestamp_nanos() / 1_000_000) as i64,
        captured: record.logs.clone().unwrap_or_default(),
    }
}

/// Oldest first (then by id, so the order is stable).
fn sort(executions: &mut [Arc<StoredLogs>]) {
    executions.sort_by(|a, b| (a.created_ms, &a.execution_id).cmp(&(b.created_ms, &b.execution_id)));
}

/// One line as a follower receives it.
#[derive(Debug, Clone)]
pub struct FollowedLine {
    pub execution_id: String,
    pub line: LogLine,
}

/// Live lines per function, for the followers on this controller.
#[derive(Default)]
pub struct LogHub {
    followers: Mutex<HashMap<String, broadcast::Sender<Arc<FollowedLine>>>>,
}

impl std::fmt::Debug for LogHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHub").finish_non_exhaustive()
    }
}

impl LogHub {
    /// Lines of `language_title`'s executions from now on.
    pub fn follow(&self, language_title: &str) -> broadcast::Receiver<Arc<FollowedLine>> {
        let mut followers = self.followers.lock().unwrap();
        // Functions nobody follows any more are forgotten here.
        followers.retain(|_, tx| tx.receiver_count() > 0);
        followers
            .entry(language_title.to_owned())
            .or_insert_with(|| broadcast::channel(FOLLOW_BUFFER).0)
            .subscribe()
    }
}

impl LogFollowers for LogHub {
    fn line(&self, language_title: &str, execution_id: &str, line: &LogLine) {
        let followers = self.followers.lock().unwrap();
        if let Some(tx) = followers.get(language_title)
            && tx.receiver_count() > 0
        {
            let _ = tx.send(Arc::new(FollowedLine {
                execution_id: execution_id.to_owned(),
                line: line.clone(),
            }));
        }
    }
}

/// Function logs: where they are read from and how long they are kept.
pub struct Logs {
    pub store: Arc<dyn LogStore>,
    pub recent: Arc<Recent>,
    pub hub: Arc<LogHub>,
    /// Bytes kept per execution (shown to readers).
    pub limit_bytes: usize,
    pub retention: Duration,
}

impl std::fmt::Debug for Logs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logs")
            .field("limit_bytes", &self.limit_bytes)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// What is known of an id a client asked the logs of.
#[derive(Debug, Default)]
pub struct Found {
    /// The executions with their logs (an execution that wrote nothing
    /// has an empty capture), oldest first.
    pub executions: Vec<Arc<StoredLogs>>,
}

impl Logs {
    /// The executions `id` names (one execution, or those of a session or
    /// asynchronous execution) as far as they are recorded.
    pub async fn find(&self, id: &str) -> Result<Found, StoreError> {
        let mut executions: Vec<Arc<StoredLogs>> = self.store.logs_of(id).await?.into_iter().map(Arc::new).collect();
        for recent in self.recent.get(id) {
            if !executions.iter().any(|e| e.execution_id == recent.execution_id) {
                executions.push(recent);
            }
        }
        if executions.is_empty()
            && let Ok(uuid) = id.parse::<uuid::Uuid>()
            && let Some(record) = self.store.execution(uuid).await?
        {
            // Recorded, and wrote nothing.
            executions.push(Arc::new(stored(&record)));
        }
        sort(&mut executions);
        Ok(Found { executions })
    }

    /// The last `limit` executions of a function that wrote anything, oldest first.
    pub async fn of_function(&self, language_title: &str, limit: usize) -> Result<Vec<Arc<StoredLogs>>, StoreError> {
        let mut executions: Vec<Arc<StoredLogs>> = self
            .store
            .function_logs(language_title, limit as i64)
            .await?
            .into_iter()
            .map(Arc::new)
            .collect();
        for recent in self.recent.of_function(language_title) {
            if !recent.captured.is_empty() && !executions.iter().any(|e| e.execution_id == recent.execution_id) {
                executions.push(recent);
            }
        }
        sort(&mut executions);
        executions.drain(..executions.len().saturating_sub(limit));
        Ok(executions)
    }

    /// Deletes logs past the retention; run periodically.
    pub async fn sweep(&self) {
        let before = fnrt_core::timefmt::now_ms() - self.retention.as_millis() as i64;
        match self.store.purge_logs(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(executions = n, "function logs past their retention deleted"),
            Err(e) => tracing::warn!(error = %e, "deleting old function logs"),
        }
    }
}
