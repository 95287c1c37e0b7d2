//! `GET /api/v1/sessions` (the caller's), `GET` and
//! `DELETE /api/v1/sessions/{request_id}`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use super::extract::Auth;
use crate::error::{ApiError, ErrorBody};
use crate::sessions::{SessionRecord, SessionStatus};
use fnrt_core::timefmt;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_sessions))
        .routes(routes!(get_session, delete_session))
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SessionResponse {
    pub request_id: String,
    #[schema(example = "nodejs-calculator")]
    pub language_title: String,
    /// `active`, or `completed` once a one-shot session has run.
    pub status: SessionStatus,
    #[schema(example = "2025-05-13T10:28:22Z")]
    pub created_at: String,
    #[schema(example = "2025-05-13T12:28:22Z")]
    pub expires_at: String,
    pub execution_count: u64,
    #[schema(example = "2025-05-13T11:15:30Z")]
    pub last_executed_at: Option<String>,
    /// The function version this session runs (extension).
    pub version: i64,
    /// Whether the session keeps its instance (extension).
    pub retain_session: bool,
    /// Per-execution timeout (extension).
    pub timeout_ms: u64,
    /// While a pipeline's execution runs on the controller that answers:
    /// `total_steps`, `completed_steps`, `current_step`, `running_steps`,
    /// `percentage` (extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub progress: Option<serde_json::Value>,
    /// With `progress`: every step's status so far (extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub steps: Option<serde_json::Value>,
}

impl From<SessionRecord> for SessionResponse {
    fn from(s: SessionRecord) -> Self {
        SessionResponse {
            request_id: s.request_id,
            language_title: s.language_title,
            status: s.status,
            created_at: timefmt::format(s.created_at),
            expires_at: timefmt::format(s.expires_at),
            execution_count: s.execution_count,
            last_executed_at: s.last_executed_at.map(timefmt::format),
            version: s.version,
            retain_session: s.retain,
            timeout_ms: s.timeout_ms,
            progress: None,
            steps: None,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only this status: `active` or `completed`.
    status: Option<String>,
    /// Only this function.
    language_title: Option<String>,
    /// Page number, from 1.
    page: Option<String>,
    /// Items per page, 1 to 100 (default 20).
    per_page: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SessionList {
    /// How many sessions match, on all pages.
    pub total: usize,
    pub page: usize,
    pub per_page: usize,
    pub sessions: Vec<SessionResponse>,
}

/// The caller's sessions, newest first (extension).
///
/// Any valid token may ask; each subject sees only its own sessions.
/// Expired sessions are never listed; a one-shot session that ran is
/// listed as `completed` until it expires.
#[utoipa::path(
    get,
    path = "/api/v1/sessions",
    tag = "sessions",
    params(ListQuery),
    responses(
        (status = 200, body = SessionList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list_sessions(
    State(state): State<AppState>,
    auth: Auth,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<SessionList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(format!("bad query: {}", e.body_text())))?;
    let status = match query.status.as_deref() {
        None => None,
        Some("active") => Some(SessionStatus::Active),
        Some("completed") => Some(SessionStatus::Completed),
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "'status' must be one of active, completed".into(),
            ));
        }
    };
    let page = super::functions::positive(query.page.as_deref(), "page", 1, 1_000_000)?;
    let per_page = super::functions::positive(query.per_page.as_deref(), "per_page", 20, 100)?;
    let (total, sessions) = state
        .engine
        .sessions(&auth.0, status, query.language_title.as_deref(), page, per_page)
        .await?;
    Ok(axum::Json(SessionList {
        total,
        page,
        per_page,
        sessions: sessions.into_iter().map(Into::into).collect(),
    }))
}

/// A session's state.
#[utoipa::path(
    get,
    path = "/api/v1/sessions/{request_id}",
    tag = "sessions",
    params(("request_id" = String, Path, description = "From initialize")),
    responses(
        (status = 200, body = SessionResponse),
        (status = 401, body = ErrorBody),
        (status = 404, description = "Not found, expired or another subject's", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn get_session(
    State(state): State<AppState>,
    Path(request_id): Path<String>,
    auth: Auth,
) -> Result<axum::Json<SessionResponse>, ApiError> {
    let session = state.engine.session(&auth.0, &request_id).await?;
    let mut response = SessionResponse::from(session);
    if let Some(mut live) = state.engine.live_progress(&auth.0, &request_id) {
        response.progress = Some(live["progress"].take());
        response.steps = Some(live["steps"].take());
    }
    Ok(axum::Json(response))
}

/// End a session and release its instance (extension).
#[utoipa::path(
    delete,
    path = "/api/v1/sessions/{request_id}",
    tag = "sessions",
    params(("request_id" = String, Path, description = "From initialize")),
    responses(
        (status = 204, description = "Ended"),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn delete_session(
    State(state): State<AppState>,
    Path(request_id): Path<String>,
    auth: Auth,
) -> Result<StatusCode, ApiError> {
    state.engine.close(&auth.0, &request_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
