//! An execution as its owner reads it: `GET /api/v1/executions/{id}`,
//! the list, and the body of its callback.

use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{Priority, format_ms};
use crate::store::QueuedExecution;

/// An execution as its owner reads it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecutionView {
    pub execution_id: String,
    pub language_title: String,
    pub version: i64,
    /// `pending`, `running`, `completed`, `failed` or `cancelled`.
    pub status: String,
    pub priority: Priority,
    #[schema(value_type = Object)]
    pub progress: Value,
    /// One step per function run (a pipeline has one per step).
    #[schema(value_type = Vec<Object>)]
    pub steps: Vec<Value>,
    /// Every attempt: `number`, `started_at`, `finished_at`,
    /// `duration_ms`, `outcome` (`completed`, `retried`, `failed`,
    /// `cancelled`, `lost`), `error`.
    #[schema(value_type = Vec<Object>)]
    pub attempts: Vec<Value>,
    pub max_attempts: i32,
    /// The function's result, once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    /// The contract's error object, once failed or cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    #[schema(value_type = Vec<Object>)]
    pub output_files: Vec<Value>,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// From submission to the first attempt's start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_ms: Option<i64>,
    /// From the first attempt's start to the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
    /// Whether an attempt started an instance.
    pub cold_start: bool,
    /// The next attempt's earliest start, while a retry waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
    /// With a `callback_url`: `url`, `status` (`pending`, `delivered`,
    /// `failed`; absent before the final state), `attempts`,
    /// `delivery_id`, `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub callback: Option<Value>,
}

impl From<QueuedExecution> for ExecutionView {
    fn from(e: QueuedExecution) -> Self {
        let done = matches!(e.status.as_str(), "completed" | "failed" | "cancelled");
        let step_status = match e.status.as_str() {
            "pending" if e.attempt > 0 => "retrying",
            s => s,
        };
        let mut step = json!({"component_name": e.language_title, "status": step_status});
        if let Some(s) = e.started_ms {
            step["started_at"] = json!(format_ms(s));
        }
        if let (true, Some(f)) = (done, e.finished_ms) {
            step["completed_at"] = json!(format_ms(f));
        }
        let completed = u8::from(e.status == "completed");
        let mut progress = json!({
            "current_step": (!done).then_some(&e.language_title),
            "total_steps": 1,
            "completed_steps": completed,
            "percentage": f64::from(completed) * 100.0,
        });
        // A pipeline: its steps as its attempt reported them.
        let steps = match e.steps.as_ref().and_then(Value::as_array) {
            Some(reports) => {
                progress = crate::pipelines::progress(reports.iter().map(|r| {
                    (
                        r["name"].as_str().unwrap_or_default(),
                        r["status"].as_str().unwrap_or_default(),
                    )
                }));
                reports.clone()
            }
            None => vec![step],
        };
        let callback = e.callback_url.as_ref().map(|url| {
            json!({
                "url": url,
                "status": e.callback_status,
                "attempts": e.callback_attempts,
                "delivery_id": e.delivery_id,
                "error": e.callback_error,
            })
        });
        ExecutionView {
            callback,
            retry_at: (e.status == "pending" && e.attempt > 0).then(|| format_ms(e.run_after_ms)),
            queued_ms: e.started_ms.map(|s| s - e.created_ms),
            duration_ms: e.started_ms.zip(e.finished_ms).map(|(s, f)| f - s),
            started_at: e.started_ms.map(format_ms),
            completed_at: e.finished_ms.filter(|_| done).map(format_ms),
            created_at: format_ms(e.created_ms),
            execution_id: e.id,
            version: e.version,
            priority: Priority::from_rank(e.priority),
            progress,
            steps,
            attempts: e.attempts.as_array().cloned().unwrap_or_default(),
            max_attempts: e.max_attempts,
            result: e.result,
            error: e.error,
            output_files: Vec::new(),
            cold_start: e.cold_start,
            language_title: e.language_title,
            status: e.status,
        }
    }
}
