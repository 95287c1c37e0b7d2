//! Live progress of executions, for `GET /api/v1/executions/{id}/events`
//! (Server-Sent Events) and the WebSocket at `/api/v1/ws`.
//!
//! An execution's events are a pure function of its row ([`events_of`]):
//! `progress` when it is queued, a `step` when an attempt starts and when
//! it ends (for a pipeline, a `pipeline_step` for each of its steps' starts
//! and ends in between, in the order the run numbered them),
//! `progress` after each step, and one final `completed`,
//! `failed` or `cancelled`. The list only grows as the row moves on, so an
//! event's number is stable: a client that reconnects with `Last-Event-ID`
//! gets exactly what it missed, from any replica.
//!
//! A change to a row wakes its streams: in process through a broadcast of
//! changed ids, and across replicas through Redis pub/sub (channel
//! `fnrt:executions:changed`) when Redis is configured; a stream also
//! rereads its row every two seconds, so a lost message only delays it.
//!
//! # Layout
//! - [`Events`]: the wake-ups and the per-subject cap on open streams.
//! - [`events_of`], [`Event`]: an execution's events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::format_ms;
use super::view::ExecutionView;
use crate::error::ApiError;
use crate::redis_client::RedisClient;
use crate::store::QueuedExecution;

/// The Redis channel that carries changed execution ids between replicas.
const CHANNEL: &str = "fnrt:executions:changed";
/// How often an open stream rereads its row without being woken.
pub const REREAD: Duration = Duration::from_secs(2);

/// One event of an execution.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// From 1, stable for the execution's life.
    pub id: u64,
    /// `progress`, `step`, `completed`, `failed`, `cancelled`.
    pub kind: &'static str,
    pub data: Value,
}

impl Event {
    /// Whether nothing follows it.
    pub fn is_final(&self) -> bool {
        matches!(self.kind, "completed" | "failed" | "cancelled")
    }
}

/// Wake-ups of streams, and how many each subject has open.
pub struct Events {
    local: broadcast::Sender<String>,
    redis: Option<RedisClient>,
    open: Mutex<HashMap<String, usize>>,
    max_per_subject: usize,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("max_per_subject", &self.max_per_subject)
            .finish_non_exhaustive()
    }
}

/// An open stream: counted against its subject until dropped.
#[derive(Debug)]
pub struct StreamGuard {
    events: Arc<Events>,
    subject: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut open = self.events.open.lock().unwrap();
        if let Some(n) = open.get_mut(&self.subject) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.subject);
            }
        }
    }
}

impl Events {
    pub fn new(redis: Option<RedisClient>, max_per_subject: usize) -> Arc<Self> {
        Arc::new(Events {
            local: broadcast::channel(1024).0,
            redis,
            open: Mutex::new(HashMap::new()),
            max_per_subject,
        })
    }

    /// Says that execution `id` changed, here and to the other replicas.
    pub fn changed(&self, id: &str) {
        let _ = self.local.send(id.to_owned());
        if let Some(redis) = &self.redis {
            let redis = redis.clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                let published = redis
                    .run(move |mut c| async move {
                        redis::cmd("PUBLISH")
                            .arg(CHANNEL)
                            .arg(&id)
                            .query_async::<i64>(&mut c)
                            .await
                    })
                    .await;
                if let Err(e) = published {
                    tracing::debug!(error = format!("{e:#}"), "publishing an execution change");
                }
            });
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.local.subscribe()
    }

    /// Opens a stream for `subject`; 429 past its cap.
    pub fn open(self: &Arc<Self>, subject: &str) -> Result<StreamGuard, ApiError> {
        let mut open = self.open.lock().unwrap();
        let n = open.entry(subject.to_owned()).or_default();
        if *n >= self.max_per_subject {
            return Err(ApiError::TooMany {
                message: format!(
                    "you have {} live progress streams open on this controller (MAX_STREAMS_PER_SUBJECT): close one \
                     (an event stream or a WebSocket)",
                    self.max_per_subject
                ),
                retry_after_secs: 5,
            });
        }
        *n += 1;
        Ok(StreamGuard {
            events: self.clone(),
            subject: subject.to_owned(),
        })
    }

    /// With Redis: relays other replicas' changes to this one's streams
    /// until stopped (reconnecting after a failure).
    pub async fn relay(self: Arc<Self>, stop: CancellationToken) {
        let Some(redis) = self.redis.clone() else { return };
        loop {
            let subscribed = async {
                let mut pubsub = redis.client().get_async_pubsub().await?;
                pubsub.subscribe(CHANNEL).await?;
                let mut messages = pubsub.on_message();
                while let Some(message) = futures::StreamExt::next(&mut messages).await {
                    if let Ok(id) = message.get_payload::<String>() {
                        let _ = self.local.send(id);
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                result = subscribed => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "execution events over Redis; retrying");
                    }
                }
                () = stop.cancelled() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

/// Every event of `row` so far, in order.
pub fn events_of(row: &QueuedExecution) -> Vec<Event> {
    let mut events = Vec::new();
    let mut push = |kind: &'static str, data: Value| {
        let id = events.len() as u64 + 1;
        events.push(Event { id, kind, data });
    };
    let progress = |completed: u8, status: &str, current: Option<&str>| {
        json!({
            "execution_id": row.id,
            "status": status,
            "current_step": current,
            "total_steps": 1,
            "completed_steps": completed,
            "percentage": f64::from(completed) * 100.0,
        })
    };
    push("progress", progress(0, "pending", Some(&row.language_title)));
    let history = row.attempts.as_array().cloned().unwrap_or_default();
    for attempt in &history {
        if attempt["outcome"] == "requeued" {
            push("progress", progress(0, "pending", Some(&row.language_title)));
            continue;
        }
        let number = &attempt["number"];
        if attempt["outcome"] != "lost" {
            push(
                "step",
                json!({"execution_id": row.id, "component_name": row.language_title, "attempt": number,
                       "status": "running", "started_at": attempt["started_at"]}),
            );
            if number.as_i64() == Some(i64::from(row.attempt)) {
                for (kind, data) in pipeline_step_events(row) {
                    push(kind, data);
                }
            }
        }
        let mut ended = json!({"execution_id": row.id, "component_name": row.language_title, "attempt": number,
                               "status": attempt["outcome"], "completed_at": attempt["finished_at"]});
        if let Some(error) = attempt.get("error") {
            ended["error"] = error.clone();
        }
        push("step", ended);
        let done = u8::from(attempt["outcome"] == "completed");
        let status = match attempt["outcome"].as_str() {
            Some("completed") => "completed",
            Some("failed") => "failed",
            Some("cancelled") => "cancelled",
            _ => "pending",
        };
        push(
            "progress",
            progress(done, status, (done == 0).then_some(row.language_title.as_str())),
        );
    }
    let recorded = history
        .iter()
        .rev()
        .take_while(|a| a["outcome"] != "requeued")
        .filter(|a| a["outcome"] != "lost")
        .count() as i32;
    if row.status == "running" && row.attempt > recorded {
        push(
            "step",
            json!({"execution_id": row.id, "component_name": row.language_title, "attempt": row.attempt,
                   "status": "running", "started_at": row.started_ms.map(format_ms)}),
        );
        for (kind, data) in pipeline_step_events(row) {
            push(kind, data);
        }
    }
    if matches!(row.status.as_str(), "completed" | "failed" | "cancelled") {
        let kind = match row.status.as_str() {
            "completed" => "completed",
            "failed" => "failed",
            _ => "cancelled",
        };
        push(
            kind,
            serde_json::to_value(ExecutionView::from(row.clone())).unwrap_or_default(),
        );
    }
    events
}

/// A pipeline's steps as events of its latest attempt, in the order they
/// happened (a `pipeline_step` when a step starts and when it ends), so the
/// list only grows while the attempt runs.
fn pipeline_step_events(row: &QueuedExecution) -> Vec<(&'static str, Value)> {
    let Some(steps) = row.steps.as_ref().and_then(Value::as_array) else {
        return Vec::new();
    };
    let mut timeline: Vec<(u64, Value)> = Vec::new();
    for step in steps {
        let base = |status: &Value| {
            json!({"execution_id": row.id, "attempt": row.attempt, "step": step["name"],
                   "component_name": step["language_title"], "status": status})
        };
        if let Some(seq) = step["started_seq"].as_u64() {
            let mut data = base(&json!("running"));
            data["started_at"] = step["started_at"].clone();
            timeline.push((seq, data));
        }
        if let (Some(seq), Some(at)) = (step["ended_seq"].as_u64(), step["completed_at"].as_str()) {
            let mut data = base(&step["status"]);
            data["completed_at"] = json!(at);
            for field in ["duration_ms", "attempts", "execution_id", "error"] {
                if let Some(v) = step.get(field) {
                    data[field] = v.clone();
                }
            }
            timeline.push((seq, data));
        }
    }
    // In the order the run numbered them.
    timeline.sort_by_key(|(seq, _)| *seq);
    timeline.into_iter().map(|(_, data)| ("pipeline_step", data)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: &str, attempt: i32, attempts: Value) -> QueuedExecution {
        QueuedExecution {
            id: "e".into(),
            subject: "s".into(),
            language_title: "python-x".into(),
            version: 1,
            params: json!({}),
            context: json!({}),
            timeout_ms: 1000,
            priority: 1,
            status: status.into(),
            idempotency_key: None,
            cache: None,
            max_attempts: 3,
            backoff_ms: 1000,
            retry_runtime_errors: false,
            attempt,
            attempts,
            result: None,
            error: None,
            cold_start: false,
            cancel_requested: false,
            created_ms: 0,
            started_ms: Some(5),
            finished_ms: None,
            run_after_ms: 0,
            lease_owner: None,
            lease_until_ms: None,
            callback_url: None,
            callback_status: None,
            callback_attempts: 0,
            callback_next_ms: None,
            delivery_id: None,
            callback_error: None,
            steps: None,
        }
    }

    #[test]
    fn events_only_grow_as_the_row_moves_on() {
        let stages = [
            row("pending", 0, json!([])),
            row("running", 1, json!([])),
            row(
                "pending",
                1,
                json!([{"number": 1, "outcome": "retried", "error": {"code": "TIMEOUT"}}]),
            ),
            row(
                "running",
                2,
                json!([{"number": 1, "outcome": "retried", "error": {"code": "TIMEOUT"}}]),
            ),
            row(
                "completed",
                2,
                json!([{"number": 1, "outcome": "retried"}, {"number": 2, "outcome": "completed"}]),
            ),
        ];
        let mut before: Vec<Event> = Vec::new();
        for stage in &stages {
            let now = events_of(stage);
            assert!(now.len() >= before.len());
            for (a, b) in before.iter().zip(&now) {
                assert_eq!((a.id, a.kind), (b.id, b.kind), "event {} changed", a.id);
            }
            before = now;
        }
        let kinds: Vec<&str> = before.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                "progress",
                "step",
                "step",
                "progress",
                "step",
                "step",
                "progress",
                "completed"
            ]
        );
        assert!(before.last().unwrap().is_final());
    }
}
