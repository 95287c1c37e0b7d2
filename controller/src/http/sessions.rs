//! `GET` and `DELETE /api/v1/sessions/{request_id}`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use super::extract::Auth;
use crate::error::{ApiError, ErrorBody};
use crate::sessions::{SessionRecord, SessionStatus};
use fnrt_core::timefmt;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_session, delete_session))
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
        }
    }
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
    Ok(axum::Json(session.into()))
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
