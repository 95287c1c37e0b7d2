//! Function logs (extension): `GET /api/v1/executions/{id}/logs` and
//! `GET /api/v1/functions/{language_title}/logs[?follow=true]`.
//!
//! An execution's logs are its caller's, and its function owner's: the
//! subject that registered the function, and a holder of
//! `admin:functions` (an operator). A function's logs, all callers'
//! together, are theirs only. Anyone else gets 404 for an execution (whether it
//! exists is not told) and 403 for a function.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use super::extract::Auth;
use crate::auth::{ADMIN_FUNCTIONS, Subject};
use crate::error::{ApiError, ErrorBody};
use crate::registry::FunctionEntry;
use crate::store::StoredLogs;
use fnrt_core::logs::LogLine;
use fnrt_core::timefmt::format_ms;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(execution_logs))
        .routes(routes!(function_logs))
}

/// One line a function wrote.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct LineView {
    /// The execution that wrote it.
    pub execution_id: String,
    /// When the controller read it (RFC 3339, milliseconds).
    pub ts: String,
    /// `stdout` or `stderr`.
    pub stream: &'static str,
    pub text: String,
}

impl LineView {
    fn new(execution_id: &str, line: &LogLine) -> Self {
        LineView {
            execution_id: execution_id.to_owned(),
            ts: format_ms(line.ts_ms),
            stream: line.stream.as_str(),
            text: line.text.clone(),
        }
    }
}

/// What the executions an id names wrote, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct LogsView {
    /// The id asked for: an execution, or a session or asynchronous
    /// execution (the logs of each of its executions, in order).
    pub id: String,
    pub language_title: String,
    /// The executions the lines come from, oldest first.
    pub executions: Vec<String>,
    pub lines: Vec<LineView>,
    /// Some execution wrote more than `limit_bytes`: its first
    /// `limit_bytes` are here, the rest was not kept.
    pub truncated: bool,
    /// Bytes written past the limit and not kept.
    pub dropped_bytes: usize,
    /// Bytes kept per execution at most (`LOG_LIMIT_BYTES`).
    pub limit_bytes: usize,
}

/// What an execution's function wrote to stdout and stderr (extension).
///
/// `{id}` is the `execution_id` an execute answered (also in
/// `X-Execution-Id`), the id of an asynchronous execution (every attempt),
/// or a session's `request_id` (every execution of it). The caller's
/// executions, and every execution of a function the caller registered.
#[utoipa::path(
    get,
    path = "/api/v1/executions/{execution_id}/logs",
    tag = "logs",
    params(("execution_id" = String, Path)),
    responses(
        (status = 200, body = LogsView),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such execution, or one the caller may not read", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn execution_logs(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<LogsView>, ApiError> {
    let found = state.logs.find(&id).await.map_err(|e| ApiError::Internal(e.into()))?;
    let mut readable: Vec<Arc<StoredLogs>> = Vec::new();
    for execution in found.executions {
        if execution.subject == auth.0.sub
            || owns(&auth.0, state.engine.registry.get(&execution.language_title).as_ref())
        {
            readable.push(execution);
        }
    }
    if readable.is_empty()
        && let Some(execution) = state.executions.row(&id).await
    {
        // An asynchronous execution that has not run yet.
        if execution.subject == auth.0.sub {
            return Ok(axum::Json(LogsView {
                id,
                language_title: execution.language_title,
                executions: vec![],
                lines: vec![],
                truncated: false,
                dropped_bytes: 0,
                limit_bytes: state.logs.limit_bytes,
            }));
        }
    }
    let Some(first) = readable.first() else {
        return Err(ApiError::NotFound(format!(
            "no execution '{id}' of yours (logs are kept {} hours)",
            state.logs.retention.as_secs() / 3600
        )));
    };
    Ok(axum::Json(LogsView {
        language_title: first.language_title.clone(),
        executions: readable.iter().map(|e| e.execution_id.clone()).collect(),
        lines: readable
            .iter()
            .flat_map(|e| e.captured.lines.iter().map(|l| LineView::new(&e.execution_id, l)))
            .collect(),
        truncated: readable.iter().any(|e| e.captured.truncated()),
        dropped_bytes: readable.iter().map(|e| e.captured.dropped_bytes).sum(),
        limit_bytes: state.logs.limit_bytes,
        id,
    }))
}

/// Whether `subject` owns `function`: registered it, or manages every
/// function (`admin:functions`).
fn owns(subject: &Subject, function: Option<&FunctionEntry>) -> bool {
    function.is_some_and(|f| f.managed_by(subject))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct FunctionLogsQuery {
    /// `true`: stream lines as they are written (Server-Sent Events,
    /// event `log`), until the client goes.
    follow: Option<String>,
    /// Without `follow`: at most this many of the last lines (1 to 10000, default 200).
    lines: Option<String>,
}

/// The last lines a function wrote.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct FunctionLogsView {
    pub language_title: String,
    pub lines: Vec<LineView>,
}

/// Executions read for a function's last lines.
const RECENT_EXECUTIONS: usize = 200;

/// A function's logs, every caller's (extension; its owner's, and an
/// operator's with `admin:functions`).
///
/// The last lines, or with `follow=true` a Server-Sent Events stream of
/// lines as executions on this controller write them: event `log`, data
/// `{"execution_id", "ts", "stream", "text"}`; an event `lagged` says how
/// many lines a slow client missed.
#[utoipa::path(
    get,
    path = "/api/v1/functions/{language_title}/logs",
    tag = "logs",
    params(("language_title" = String, Path), FunctionLogsQuery),
    responses(
        (status = 200, body = FunctionLogsView, description = "The last lines; with follow=true, text/event-stream"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not the function's owner, and the token lacks admin:functions", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn function_logs(
    State(state): State<AppState>,
    auth: Auth,
    Path(language_title): Path<String>,
    Query(query): Query<FunctionLogsQuery>,
) -> Result<Response, ApiError> {
    let function = state
        .engine
        .registry
        .get(&language_title)
        .ok_or_else(|| ApiError::NotFound(format!("function '{language_title}' not found")))?;
    if !owns(&auth.0, Some(&function)) {
        return Err(ApiError::Forbidden(match &function.owner {
            Some(_) => format!(
                "only the subject that registered '{language_title}' (or a holder of scope '{ADMIN_FUNCTIONS}') reads its logs"
            ),
            None => format!("reading the logs of '{language_title}' needs scope '{ADMIN_FUNCTIONS}'"),
        }));
    }
    let follow = match query.follow.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "follow must be 'true' or 'false', not '{other}'"
            )));
        }
    };
    if follow {
        return follow_function(state, &auth.0, &language_title);
    }
    let limit = super::functions::positive(query.lines.as_deref(), "lines", 200, 10_000)?;
    let executions = state
        .logs
        .of_function(&language_title, RECENT_EXECUTIONS)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let mut lines: Vec<LineView> = executions
        .iter()
        .flat_map(|e| e.captured.lines.iter().map(|l| LineView::new(&e.execution_id, l)))
        .collect();
    lines.drain(..lines.len().saturating_sub(limit));
    Ok(axum::Json(FunctionLogsView { language_title, lines }).into_response())
}

fn follow_function(state: AppState, subject: &Subject, language_title: &str) -> Result<Response, ApiError> {
    let guard = state.executions.events.open(&subject.sub)?;
    let lines = state.logs.hub.follow(language_title);
    let stream = futures::stream::unfold((lines, guard), |(mut lines, guard)| async move {
        let event = match lines.recv().await {
            Ok(followed) => Event::default()
                .event("log")
                .json_data(LineView::new(&followed.execution_id, &followed.line))
                .unwrap_or_default(),
            Err(RecvError::Lagged(missed)) => Event::default()
                .event("lagged")
                .json_data(serde_json::json!({ "missed": missed }))
                .unwrap_or_default(),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok::<_, Infallible>(event), (lines, guard)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}
