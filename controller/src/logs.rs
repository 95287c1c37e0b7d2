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
//! - [`Recent`]: the executions recorded in the last minute or two.
//! - [`LogHub`]: live lines per function.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fnrt_core::logs::{LogFollowers, LogLine};
use fnrt_core::records::ExecutionRecord;
use tokio::sync::broadcast;

use crate::store::{LogStore, StoreError, StoredLogs};

/// How long [`Recent`] keeps an execution at most: far longer than a
/// batch of records takes to be written. It keeps one at least half as long
/// (or until [`RECENT_MAX`] newer ones came).
const RECENT_TTL: Duration = Duration::from_secs(120);
/// Executions [`Recent`] keeps at most.
const RECENT_MAX: usize = 20_000;
/// Executions kept per session or asynchronous execution in [`Recent`].
const RECENT_PER_REQUEST: usize = 64;
/// Lines a follower may fall behind before it misses some (it is told).
const FOLLOW_BUFFER: usize = 1024;

/// The executions recorded lately, by their id, by their session's or
/// asynchronous execution's id, and by function.
///
/// Two generations of plain maps under one lock: new executions go into the
/// current one; when it is [`RECENT_TTL`]/2 old or holds [`RECENT_MAX`]/2
/// executions it becomes the previous one, and the previous one is dropped
/// whole ([`free`]). Every execution is remembered on its request's path,
/// and this is one short lock and a map insert, where a TTL cache (moka,
/// three of them) was about 6 % of the controller's CPU under warm wasm at
/// c32 (docs/benchmarks.md); nothing here needs a per-entry expiry.
pub struct Recent {
    generations: Mutex<Generations>,
}

struct Generations {
    current: Generation,
    previous: Generation,
}

struct Generation {
    began: Instant,
    by_id: HashMap<String, Arc<StoredLogs>>,
    /// The last [`RECENT_PER_REQUEST`] of each session or asynchronous execution.
    by_request: HashMap<String, Vec<Arc<StoredLogs>>>,
    /// The last [`RECENT_PER_REQUEST`] of each function that wrote anything.
    by_function: HashMap<String, Vec<Arc<StoredLogs>>>,
}

impl Generation {
    fn new() -> Self {
        Generation {
            began: Instant::now(),
            by_id: HashMap::new(),
            by_request: HashMap::new(),
            by_function: HashMap::new(),
        }
    }

    fn is_full(&self, now: Instant) -> bool {
        now.duration_since(self.began) >= RECENT_TTL / 2 || self.by_id.len() >= RECENT_MAX / 2
    }
}

impl Generations {
    /// Starts a new generation if the current one is full, and hands back
    /// the oldest one, to be dropped once the lock is released.
    fn turn(&mut self, now: Instant) -> Option<Generation> {
        if !self.current.is_full(now) {
            return None;
        }
        let current = std::mem::replace(&mut self.current, Generation::new());
        Some(std::mem::replace(&mut self.previous, current))
    }
}

/// Frees a generation off the request's path: up to [`RECENT_MAX`]/2
/// executions, several small allocations each, are freed on a blocking
/// thread rather than delaying the request that turned the generation.
fn free(old: Generation) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(old))),
        Err(_) => drop(old),
    }
}

/// Appends to a capped list, the oldest going first.
fn push_capped(list: &mut Vec<Arc<StoredLogs>>, logs: &Arc<StoredLogs>) {
    if list.len() >= RECENT_PER_REQUEST {
        list.remove(0);
    }
    list.push(logs.clone());
}

/// The previous generation's list then the current one's, the last
/// [`RECENT_PER_REQUEST`] of them.
fn joined(previous: Option<&Vec<Arc<StoredLogs>>>, current: Option<&Vec<Arc<StoredLogs>>>) -> Vec<Arc<StoredLogs>> {
    let mut all: Vec<Arc<StoredLogs>> = previous.into_iter().chain(current).flatten().cloned().collect();
    all.drain(..all.len().saturating_sub(RECENT_PER_REQUEST));
    all
}

impl Default for Recent {
    fn default() -> Self {
        Recent {
            generations: Mutex::new(Generations {
                current: Generation::new(),
                previous: Generation::new(),
            }),
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
        let now = Instant::now();
        let dropped = {
            let mut generations = self.generations.lock().unwrap();
            let dropped = generations.turn(now);
            let current = &mut generations.current;
            current.by_id.insert(logs.execution_id.clone(), logs.clone());
            match current.by_request.get_mut(&record.request_id) {
                Some(list) => push_capped(list, &logs),
                None => {
                    current.by_request.insert(record.request_id.clone(), vec![logs.clone()]);
                }
            }
            // A function's last lines are only those of executions that wrote.
            if record.logs.is_some() {
                push_capped(
                    current.by_function.entry(record.language_title.clone()).or_default(),
                    &logs,
                );
            }
            dropped
        };
        if let Some(old) = dropped {
            free(old);
        }
    }

    /// Forgets what is past its time when nothing new arrives (run
    /// periodically: `remember` only turns a generation when it adds one).
    pub fn expire(&self) {
        let dropped = self.generations.lock().unwrap().turn(Instant::now());
        if let Some(old) = dropped {
            free(old);
        }
    }

    fn of_function(&self, language_title: &str) -> Vec<Arc<StoredLogs>> {
        let generations = self.generations.lock().unwrap();
        joined(
            generations.previous.by_function.get(language_title),
            generations.current.by_function.get(language_title),
        )
    }

    fn get(&self, id: &str) -> Vec<Arc<StoredLogs>> {
        let generations = self.generations.lock().unwrap();
        let Generations { current, previous } = &*generations;
        if let Some(one) = current.by_id.get(id).or_else(|| previous.by_id.get(id)) {
            return vec![one.clone()];
        }
        joined(previous.by_request.get(id), current.by_request.get(id))
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

#[cfg(test)]
mod tests {
    use super::*;
    use fnrt_core::logs::Captured;

    fn record(request_id: &str, wrote: bool) -> ExecutionRecord {
        ExecutionRecord {
            id: uuid::Uuid::new_v4(),
            request_id: request_id.into(),
            subject: "alice".into(),
            language_title: "wasm-hello".into(),
            version: 1,
            started_at: fnrt_core::timefmt::now(),
            duration_ms: 1,
            outcome: "success".into(),
            cached: false,
            cold_start: false,
            parent_id: None,
            logs: wrote.then(|| Arc::new(Captured::default())),
        }
    }

    fn ids(list: &[Arc<StoredLogs>]) -> Vec<String> {
        list.iter().map(|l| l.execution_id.clone()).collect()
    }

    #[test]
    fn finds_an_execution_by_its_id_its_request_and_its_function() {
        let recent = Recent::default();
        let quiet = record("session-1", false);
        let wrote = record("session-1", true);
        recent.remember(&quiet);
        recent.remember(&wrote);
        assert_eq!(ids(&recent.get(&quiet.id.to_string())), [quiet.id.to_string()]);
        assert_eq!(
            ids(&recent.get("session-1")),
            [quiet.id.to_string(), wrote.id.to_string()]
        );
        // Only executions that wrote count as a function's last lines.
        assert_eq!(ids(&recent.of_function("wasm-hello")), [wrote.id.to_string()]);
        assert!(recent.get("session-2").is_empty());
    }

    #[test]
    fn keeps_the_last_executions_of_a_request_across_generations() {
        let recent = Recent::default();
        let all: Vec<ExecutionRecord> = (0..RECENT_PER_REQUEST + 10)
            .map(|_| record("session-1", true))
            .collect();
        for (i, r) in all.iter().enumerate() {
            if i == 30 {
                // As if the current generation were old enough to turn.
                recent.generations.lock().unwrap().turn(Instant::now() + RECENT_TTL / 2);
            }
            recent.remember(r);
        }
        assert!(!recent.generations.lock().unwrap().previous.by_id.is_empty());
        let last: Vec<String> = all[10..].iter().map(|r| r.id.to_string()).collect();
        assert_eq!(ids(&recent.get("session-1")), last);
        assert_eq!(ids(&recent.of_function("wasm-hello")), last);
        assert_eq!(ids(&recent.get(&all[0].id.to_string())), [all[0].id.to_string()]);
    }

    #[test]
    fn forgets_what_is_past_its_time() {
        let recent = Recent::default();
        let r = record("session-1", true);
        recent.remember(&r);
        recent.expire();
        assert_eq!(recent.get("session-1").len(), 1, "kept while its generation is young");
        // As if time passed: one turn keeps it in the previous generation,
        // the second drops it.
        let later = Instant::now() + RECENT_TTL / 2;
        recent.generations.lock().unwrap().turn(later);
        assert_eq!(recent.get("session-1").len(), 1);
        recent.generations.lock().unwrap().turn(later + RECENT_TTL / 2);
        assert!(recent.get(&r.id.to_string()).is_empty());
        assert!(recent.get("session-1").is_empty());
        assert!(recent.of_function("wasm-hello").is_empty());
    }

    #[test]
    fn holds_at_most_its_maximum() {
        let recent = Recent::default();
        for _ in 0..RECENT_MAX + 1 {
            recent.remember(&record("session-1", false));
        }
        let generations = recent.generations.lock().unwrap();
        assert!(generations.current.by_id.len() + generations.previous.by_id.len() <= RECENT_MAX);
    }
}
