//! `/api/v1/executions` (extension): asynchronous executions. Submit a
//! run (202 at once), read its status, progress, attempts and result,
//! list the caller's, cancel, and queue a failed one again
//! ([`crate::executions`]).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use super::extract::{ApiJson, Auth};
use crate::error::{ApiError, ErrorBody};
use crate::executions::view::ExecutionView;
use crate::executions::{Priority, Submission, format_ms};
use crate::store::ExecutionFilter;
use fnrt_core::function::manifest::RetrySpec;
use fnrt_core::language::LanguageTitle;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit, list))
        .routes(routes!(get_execution))
        .routes(routes!(events))
        .routes(routes!(cancel))
        .routes(routes!(requeue))
        .routes(routes!(signing_secret))
        .routes(routes!(rotate_signing_secret))
}

/// A signing secret as the API shows it.
fn secret_view(found: Result<(String, i64), crate::store::StoreError>) -> Result<axum::Json<SigningSecret>, ApiError> {
    let (secret, created) = found.map_err(|e| ApiError::Internal(e.into()))?;
    Ok(axum::Json(SigningSecret {
        secret,
        created_at: format_ms(created),
    }))
}

/// The caller's callback signing secret, made on first use (extension).
#[utoipa::path(
    get,
    path = "/api/v1/signing-secret",
    tag = "executions",
    responses(
        (status = 200, body = SigningSecret),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn signing_secret(State(state): State<AppState>, auth: Auth) -> Result<axum::Json<SigningSecret>, ApiError> {
    crate::engine::require_some_execute_scope(&auth.0)?;
    secret_view(state.executions.callbacks.secret(&auth.0.sub).await)
}

/// Replace the caller's signing secret (extension): callbacks sent from
/// now on are signed with the new one.
#[utoipa::path(
    post,
    path = "/api/v1/signing-secret/rotate",
    tag = "executions",
    responses(
        (status = 200, body = SigningSecret),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn rotate_signing_secret(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<axum::Json<SigningSecret>, ApiError> {
    crate::engine::require_some_execute_scope(&auth.0)?;
    secret_view(state.executions.callbacks.rotate(&auth.0.sub).await)
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
    /// Where the final state is POSTed, signed with the caller's signing
    /// secret (`X-Signature`), at least once (`X-Delivery-Id`).
    pub callback_url: Option<String>,
}

/// A subject's callback signing secret.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SigningSecret {
    /// The HMAC-SHA256 key of `X-Signature: sha256=<hex of HMAC over "{X-Timestamp}.{body}">`.
    pub secret: String,
    pub created_at: String,
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
        ("X-Cache-Control" = Option<String>, Header, description = "As execute's: `no-cache` runs it whatever is cached; `max-age={seconds}`"),
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
        cache: super::execute::cache_directive(&headers)?,
        callback_url: body.callback_url,
    };
    let (row, new) = state.executions.submit(&auth.0, submission).await?;
    let estimated = state.executions.estimate_ms(&row);
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

/// What an SSE stream carries between wake-ups.
struct Streaming {
    state: AppState,
    id: String,
    /// The last event sent.
    last: u64,
    /// Events to send, oldest first.
    ready: std::collections::VecDeque<crate::executions::events::Event>,
    changes: tokio::sync::broadcast::Receiver<String>,
    done: bool,
    /// When the caller's token stops being accepted: the stream ends there.
    expires: tokio::time::Instant,
    _guard: crate::executions::events::StreamGuard,
}

/// An execution's live progress as Server-Sent Events (extension):
/// `progress`, `step` (an attempt started or ended; for a pipeline,
/// `pipeline_step` as each of its steps starts and ends), then one `completed`,
/// `failed` or `cancelled` carrying the execution, after which the stream
/// ends. A stream lasts as long as the token that opened it: when the token
/// expires an `error` event (no id, an `UNAUTHORIZED` error body) ends it.
/// Reconnect with `Last-Event-ID` to get only what was missed.
#[utoipa::path(
    get,
    path = "/api/v1/executions/{execution_id}/events",
    tag = "executions",
    params(
        ("execution_id" = String, Path),
        ("Last-Event-ID" = Option<String>, Header, description = "The last event received; the stream resumes after it"),
    ),
    responses(
        (status = 200, description = "text/event-stream", content_type = "text/event-stream", body = String),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, description = "Too many open streams, or rate limited", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn events(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<
    axum::response::sse::Sse<impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>>,
    ApiError,
> {
    use crate::executions::events::{REREAD, events_of};
    use axum::response::sse::{Event, KeepAlive, Sse};
    // Subscribed before the first read: no change slips in between.
    let changes = state.executions.events.subscribe();
    state.executions.get(&auth.0, &id).await?;
    let guard = state.executions.events.open(&auth.0.sub)?;
    // The guard verified the token; this asks (a cached lookup) until when.
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let (_, until) = state
        .auth
        .verify_header_until(authorization)
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let start = Streaming {
        state,
        id,
        last,
        ready: Default::default(),
        changes,
        done: false,
        expires: crate::auth::expiry(until),
        _guard: guard,
    };
    let stream = futures::stream::unfold(start, |mut s| async move {
        loop {
            if let Some(event) = s.ready.pop_front() {
                s.last = event.id;
                s.done = event.is_final();
                let sse = Event::default()
                    .id(event.id.to_string())
                    .event(event.kind)
                    .json_data(&event.data)
                    .unwrap_or_default();
                return Some((Ok(sse), s));
            }
            if s.done {
                return None;
            }
            if tokio::time::Instant::now() >= s.expires {
                s.done = true;
                let expired = ApiError::Unauthorized(
                    "token has expired; reconnect with a new one (Last-Event-ID resumes where this ended)".into(),
                );
                let sse = Event::default()
                    .event("error")
                    .json_data(expired.body())
                    .unwrap_or_default();
                return Some((Ok(sse), s));
            }
            match s.state.executions.row(&s.id).await {
                Some(row) => s.ready.extend(events_of(&row).into_iter().filter(|e| e.id > s.last)),
                None => return None,
            }
            if !s.ready.is_empty() {
                continue;
            }
            // Until this execution changes, or a while has passed.
            let wait = async {
                loop {
                    match s.changes.recv().await {
                        Ok(changed) if changed == s.id => return,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                    }
                }
            };
            let until = s.expires.min(tokio::time::Instant::now() + REREAD);
            let _ = tokio::time::timeout_at(until, wait).await;
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
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
