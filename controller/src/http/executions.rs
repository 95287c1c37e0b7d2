//! `/api/v1/executions` (extension): asynchronous executions. Submit a
//! run (202 at once), read its status, progress, attempts and result,
//! list the caller's, cancel, and queue a failed one again
//! ([`crate::executions`]).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use super::extract::{ApiJson, Auth};
use crate::error::{ApiError, ErrorBody};
use crate::executions::{Priority, Submission, format_ms};
use crate::store::{ExecutionFilter, QueuedExecution};
use fnrt_core::function::manifest::RetrySpec;
use fnrt_core::language::LanguageTitle;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit, list))
        .routes(routes!(get_execution))
        .routes(routes!(cancel))
        .routes(routes!(requeue))
}

/// An asynchronous run to queue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SubmitBody {
    /// The function; or the `Language-Title` header.
    #[schema(example = "python-wordcount")]
    pub language_title: Option<String>,
    /// The function's parameters; must satisfy its `schema.params`.
    #[schema(value_type = Object)]
    pub params: Option<Value>,
    /// As initialize's: `timeout_ms` is the controller's, the rest the
    /// function's (which also sees `execution: {id, attempt}`).
    #[schema(value_type = Option<Object>)]
    pub context: Option<Value>,
    #[serde(default)]
    pub priority: Priority,
    /// Over the function's own `retry` (`max_attempts`, `backoff_ms`,
    /// `runtime_errors`).
    #[serde(default)]
    pub retry: RetrySpec,
}

/// What a submission answers.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Submitted {
    pub execution_id: String,
    /// `pending` for a new run; the first run's status for a repeated
    /// idempotency key.
    #[schema(example = "pending")]
    pub status: String,
    /// When it is likely done, from the queue ahead of it and the
    /// function's recent pace.
    pub estimated_completion: String,
    /// Where to read it.
    pub location: String,
}

/// An execution as its owner reads it.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ExecutionView {
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
        let progress = json!({
            "current_step": (!done).then_some(&e.language_title),
            "total_steps": 1,
            "completed_steps": completed,
            "percentage": f64::from(completed) * 100.0,
        });
        ExecutionView {
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
            steps: vec![step],
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

fn location(id: &str) -> String {
    format!("/api/v1/executions/{id}")
}

/// Run a function asynchronously (extension).
///
/// The function and the caller's scope are checked before anything is
/// queued. With an `Idempotency-Key`, the same key from the same subject
/// within 24 hours answers the first execution and never runs another.
#[utoipa::path(
    post,
    path = "/api/v1/executions",
    tag = "executions",
    params(
        ("Language-Title" = Option<String>, Header, description = "The function, unless the body names it"),
        ("Idempotency-Key" = Option<String>, Header, description = "Up to 255 visible ASCII characters"),
    ),
    request_body(content = SubmitBody, content_type = "application/json"),
    responses(
        (status = 202, description = "Queued (or, for a repeated idempotency key, the first execution)", body = Submitted,
         headers(("Location" = String, description = "The execution"))),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Token lacks execute scope for the language", body = ErrorBody),
        (status = 404, description = "No such function", body = ErrorBody),
        (status = 429, body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn submit(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SubmitBody>,
) -> Result<Response, ApiError> {
    let header_title = headers
        .get("language-title")
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::InvalidRequest("Language-Title must be ASCII".into()))
        })
        .transpose()?;
    let title = match (header_title, body.language_title) {
        (Some(h), Some(b)) if h != b => {
            return Err(ApiError::InvalidRequest(
                "the Language-Title header and 'language_title' name different functions".into(),
            ));
        }
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => {
            return Err(ApiError::InvalidRequest(
                "name the function: a Language-Title header or 'language_title' in the body".into(),
            ));
        }
    };
    let language_title: LanguageTitle = title
        .parse()
        .map_err(|e| ApiError::InvalidRequest(format!("invalid Language-Title: {e}")))?;
    let idempotency_key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
                .map(str::to_owned)
                .ok_or_else(|| {
                    ApiError::InvalidRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into())
                })
        })
        .transpose()?;
    let params = body
        .params
        .ok_or_else(|| ApiError::InvalidRequest("missing 'params'".into()))?;
    let context = match body.context {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(ApiError::InvalidRequest("'context' must be a JSON object".into())),
    };
    let submission = Submission {
        language_title,
        params,
        context,
        priority: body.priority,
        retry: body.retry,
        idempotency_key,
    };
    let (row, new) = state.executions.submit(&auth.0, submission).await?;
    let estimated = state.executions.estimate_ms(&row).await;
    let at = location(&row.id);
    let mut response = (
        StatusCode::ACCEPTED,
        axum::Json(Submitted {
            execution_id: row.id,
            status: row.status,
            estimated_completion: format_ms(estimated),
            location: at.clone(),
        }),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&at) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    if !new {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// An execution's status, progress, attempts and result (extension; the
/// owner's only).
#[utoipa::path(
    get,
    path = "/api/v1/executions/{execution_id}",
    tag = "executions",
    params(("execution_id" = String, Path)),
    responses(
        (status = 200, body = ExecutionView),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such execution, or another subject's", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn get_execution(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<ExecutionView>, ApiError> {
    Ok(axum::Json(state.executions.get(&auth.0, &id).await?.into()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only this status (`failed` is the dead-letter list).
    status: Option<String>,
    /// Only this function.
    language_title: Option<String>,
    /// Page number, from 1.
    page: Option<String>,
    /// Items per page, 1 to 100 (default 20).
    per_page: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ExecutionList {
    pub total: i64,
    pub page: usize,
    pub per_page: usize,
    pub executions: Vec<ExecutionView>,
}

const STATUSES: [&str; 5] = ["pending", "running", "completed", "failed", "cancelled"];

/// The caller's executions, newest first (extension).
#[utoipa::path(
    get,
    path = "/api/v1/executions",
    tag = "executions",
    params(ListQuery),
    responses(
        (status = 200, body = ExecutionList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list(
    State(state): State<AppState>,
    auth: Auth,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<ExecutionList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(format!("bad query: {}", e.body_text())))?;
    if let Some(s) = &query.status
        && !STATUSES.contains(&s.as_str())
    {
        return Err(ApiError::InvalidRequest(format!(
            "'status' must be one of {}",
            STATUSES.join(", ")
        )));
    }
    let page = super::functions::positive(query.page.as_deref(), "page", 1, 1_000_000)?;
    let per_page = super::functions::positive(query.per_page.as_deref(), "per_page", 20, 100)?;
    let filter = ExecutionFilter {
        status: query.status,
        language_title: query.language_title,
        offset: ((page - 1) * per_page) as i64,
        limit: per_page as i64,
    };
    let (rows, total) = state.executions.list(&auth.0, &filter).await?;
    Ok(axum::Json(ExecutionList {
        total,
        page,
        per_page,
        executions: rows.into_iter().map(Into::into).collect(),
    }))
}

/// Cancel an execution (extension): a pending one never runs; a running
/// one has its instance stopped. 409 once it has finished.
#[utoipa::path(
    post,
    path = "/api/v1/executions/{execution_id}/cancel",
    tag = "executions",
    params(("execution_id" = String, Path)),
    responses(
        (status = 200, description = "Cancelled (or, rarely, still stopping)", body = ExecutionView),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Already finished", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn cancel(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<ExecutionView>, ApiError> {
    Ok(axum::Json(state.executions.cancel(&auth.0, &id).await?.into()))
}

/// Queue a failed or cancelled execution again (extension).
#[utoipa::path(
    post,
    path = "/api/v1/executions/{execution_id}/retry",
    tag = "executions",
    params(("execution_id" = String, Path)),
    responses(
        (status = 202, description = "Queued again", body = ExecutionView),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Not failed or cancelled", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn requeue(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<(StatusCode, axum::Json<ExecutionView>), ApiError> {
    let row = state.executions.requeue(&auth.0, &id).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(row.into())))
}
