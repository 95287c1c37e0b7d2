//! `POST /api/v1/initialize`: start a session for a Language-Title.

use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use super::extract::{ApiJson, Auth};
use crate::engine::InitializeOptions;
use crate::error::{ApiError, ErrorBody};
use fnrt_core::language::LanguageTitle;
use fnrt_core::timefmt;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(initialize))
}

/// Body of initialize; everything is optional. A field other than
/// `context` is refused: `{"retain_session": true}` beside `context`
/// would otherwise give a one-shot session without a word.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct InitializeBody {
    /// Execution context. `timeout_ms` (default: the function's, usually
    /// 30000) and `retain_session` (default false) are read by the
    /// controller; every other field is passed to the function as its context.
    #[serde(default)]
    #[schema(value_type = Option<Object>, example = json!({"environment": "production", "user_id": "user-123", "timeout_ms": 30000, "retain_session": true}))]
    pub context: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct InitializeResponse {
    #[schema(example = "f8c3de3d-1234-5678-9abc-def012345678")]
    pub request_id: String,
    /// Always `initialized`.
    #[schema(example = "initialized")]
    pub status: &'static str,
    #[schema(example = "2025-05-13T12:28:22Z")]
    pub expires_at: String,
}

/// Start a function session.
///
/// Specialises an instance with the function's current version and returns
/// the session's `request_id`. With `retain_session: true` the session keeps
/// its instance (in-memory state survives between executions) until it
/// expires or is deleted; otherwise the session serves one execution.
#[utoipa::path(
    post,
    path = "/api/v1/initialize",
    tag = "sessions",
    params(
        ("Language-Title" = String, Header, description = "`{language}-{title}`, e.g. `nodejs-calculator`"),
        ("X-Request-ID" = Option<String>, Header, description = "Client-chosen request ID ([A-Za-z0-9][A-Za-z0-9._-]{0,127}); generated when absent"),
    ),
    request_body(content = InitializeBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Session started", body = InitializeResponse),
        (status = 400, description = "Bad Language-Title, body or limit", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Token lacks execute scope for the language", body = ErrorBody),
        (status = 404, description = "No such function", body = ErrorBody),
        (status = 409, description = "X-Request-ID already in use", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 500, description = "The function failed to load (INITIALIZATION_ERROR)", body = ErrorBody),
        (status = 503, description = "The language's runtime is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn initialize(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    ApiJson(body): ApiJson<InitializeBody>,
) -> Result<axum::Json<InitializeResponse>, ApiError> {
    let language_title: LanguageTitle = headers
        .get("language-title")
        .ok_or_else(|| {
            ApiError::InvalidRequest(
                "missing Language-Title header: name the function to run, e.g. 'Language-Title: nodejs-calculator'"
                    .into(),
            )
        })?
        .to_str()
        .map_err(|_| ApiError::InvalidRequest("Language-Title must be ASCII".into()))?
        .parse()
        .map_err(|e| ApiError::InvalidRequest(format!("invalid Language-Title: {e}")))?;
    let request_id = headers
        .get("x-request-id")
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|id| valid_request_id(id))
                .map(str::to_owned)
                .ok_or_else(|| {
                    ApiError::InvalidRequest("X-Request-ID must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}".into())
                })
        })
        .transpose()?;
    let options = options(body.context)?;
    let session = state
        .engine
        .initialize(&auth.0, language_title, options, request_id)
        .await?;
    Ok(axum::Json(InitializeResponse {
        request_id: session.request_id,
        status: "initialized",
        expires_at: timefmt::format(session.expires_at),
    }))
}

/// Splits the client's context into the controller's knobs and the function's context.
fn options(context: Option<Value>) -> Result<InitializeOptions, ApiError> {
    let mut context = match context {
        None | Some(Value::Null) => return Ok(InitializeOptions::default()),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(ApiError::InvalidRequest("'context' must be a JSON object".into()));
        }
    };
    let retain_session = match context.remove("retain_session") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "context.retain_session must be a boolean".into(),
            ));
        }
    };
    let timeout_ms = context.remove("timeout_ms").filter(|v| !v.is_null());
    Ok(InitializeOptions {
        timeout_ms,
        retain_session,
        function_context: context,
    })
}

fn valid_request_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    (1..=128).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
