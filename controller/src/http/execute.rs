//! `POST /api/v1/execute/{request_id}`: run the session's function.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::FromRequestParts;
use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use super::extract::{ApiJson, Auth};
use super::guard::Unadmitted;
use crate::error::{ApiError, EXECUTION_ID_HEADER, ExecuteErrorBody, FailedExecution, WithRequestId};
use fnrt_core::invoke::CacheDirective;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(execute))
}

/// A field other than `params` is refused (a `context` here would be
/// ignored: it belongs to initialize).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ExecuteBody {
    /// The function's parameters; must satisfy its `schema.params`.
    #[schema(value_type = Object, example = json!({"operation": "add", "values": [1, 2, 3]}))]
    pub params: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ExecuteResponse {
    pub request_id: String,
    /// This execution (extension): its logs are at
    /// `/api/v1/executions/{execution_id}/logs`; also in `X-Execution-Id`.
    pub execution_id: String,
    #[schema(example = "nodejs-calculator")]
    pub language_title: String,
    /// Milliseconds spent serving this execution.
    pub execution_time: u64,
    /// Whether the result came from the cache.
    pub cached: bool,
    #[schema(value_type = Object, example = json!({"value": 6}))]
    pub result: Arc<Value>,
    /// Present (true) when a retained session's instance had to be
    /// re-created (initialized on another controller, or it crashed or timed
    /// out): in-memory state started over (extension).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub instance_recreated: bool,
    /// A pipeline's steps, in its order: each one's status, output,
    /// timing and execution (extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<crate::pipelines::StepReport>>,
}

/// Run the session's function with parameters.
///
/// Results are cached for an hour by default, keyed by the function
/// version's code hash, the params and the context the function sees.
#[utoipa::path(
    post,
    path = "/api/v1/execute/{request_id}",
    tag = "sessions",
    params(
        ("request_id" = String, Path, description = "From initialize"),
        ("X-Cache-Control" = Option<String>, Header, description = "`no-cache`, or `max-age={seconds}`: accept a cached result at most that old and keep the fresh one that long"),
    ),
    request_body(content = ExecuteBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The function's result", body = ExecuteResponse),
        (status = 400, description = "Malformed body or params (INVALID_REQUEST, INVALID_PARAMS)", body = ExecuteErrorBody),
        (status = 401, description = "Missing or invalid token", body = ExecuteErrorBody),
        (status = 403, description = "Token lacks execute scope", body = ExecuteErrorBody),
        (status = 404, description = "Request ID not found, expired, completed or another subject's", body = ExecuteErrorBody),
        (status = 429, description = "Rate limited", body = ExecuteErrorBody),
        (status = 500, description = "The function threw or crashed (RUNTIME_ERROR)", body = ExecuteErrorBody),
        (status = 504, description = "The execution passed its timeout (TIMEOUT)", body = ExecuteErrorBody),
    ),
    security(("bearer" = []))
)]
async fn execute(
    State(state): State<AppState>,
    Path(request_id): Path<String>,
    auth: Result<Auth, ApiError>,
    unadmitted: Option<Extension<Unadmitted>>,
    CacheControl(cache_control): CacheControl,
    body: Result<ApiJson<ExecuteBody>, ApiError>,
) -> Result<([(&'static str, String); 1], axum::Json<ExecuteResponse>), FailedExecution> {
    let with_id = |e: ApiError| WithRequestId(request_id.clone(), e);
    let Some(Extension(unadmitted)) = unadmitted else {
        return Err(with_id(ApiError::Internal(anyhow::anyhow!(
            "execute was routed around the guard"
        )))
        .into());
    };
    // The request's limit is counted once, whatever refuses it (429 first).
    let gate = unadmitted.gate(&state);
    let prepared = (|| {
        let Auth(subject) = auth?;
        let ApiJson(body) = body?;
        let params = body
            .params
            .ok_or_else(|| ApiError::InvalidRequest("missing 'params'".into()))?;
        Ok((subject, params, parse_cache_control(cache_control.as_ref())?))
    })();
    let (subject, params, directive) = match prepared {
        Ok(prepared) => prepared,
        Err(refused) => return Err(with_id(gate.refuse(refused).await).into()),
    };
    let executed = state
        .engine
        .execute(&subject, &request_id, params, directive, gate)
        .await
        .map_err(|(error, execution_id)| FailedExecution {
            request_id: request_id.clone(),
            execution_id,
            error,
        })?;
    let execution_id = executed.execution_id.to_string();
    let header = [(EXECUTION_ID_HEADER, execution_id.clone())];
    Ok((
        header,
        axum::Json(ExecuteResponse {
            request_id,
            execution_id,
            language_title: executed.language_title,
            execution_time: executed.execution_time_ms,
            cached: executed.cached,
            result: executed.result,
            instance_recreated: executed.instance_recreated,
            steps: executed.steps,
        }),
    ))
}

/// The request's `X-Cache-Control`, the one header an execute reads (a
/// `HeaderMap` extractor cloned every header for it).
pub(super) struct CacheControl(Option<HeaderValue>);

impl<S: Send + Sync> FromRequestParts<S> for CacheControl {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(CacheControl(parts.headers.get("x-cache-control").cloned()))
    }
}

pub(super) fn cache_directive(headers: &HeaderMap) -> Result<CacheDirective, ApiError> {
    parse_cache_control(headers.get("x-cache-control"))
}

fn parse_cache_control(value: Option<&HeaderValue>) -> Result<CacheDirective, ApiError> {
    let Some(value) = value else {
        return Ok(CacheDirective::Default);
    };
    let bad = || ApiError::InvalidRequest("X-Cache-Control must be 'no-cache' or 'max-age=<seconds>'".into());
    let value = value.to_str().map_err(|_| bad())?.trim().to_ascii_lowercase();
    if value == "no-cache" {
        return Ok(CacheDirective::NoCache);
    }
    let secs = value
        .strip_prefix("max-age=")
        .and_then(|n| n.trim().parse::<u64>().ok())
        .ok_or_else(bad)?;
    Ok(CacheDirective::MaxAge(Duration::from_secs(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directive(v: &str) -> Result<CacheDirective, ApiError> {
        let mut h = HeaderMap::new();
        h.insert("x-cache-control", v.parse().unwrap());
        cache_directive(&h)
    }

    #[test]
    fn parses_cache_control() {
        assert_eq!(directive("no-cache").unwrap(), CacheDirective::NoCache);
        assert_eq!(
            directive("max-age=60").unwrap(),
            CacheDirective::MaxAge(Duration::from_secs(60))
        );
        assert_eq!(
            directive(" Max-Age=0 ").unwrap(),
            CacheDirective::MaxAge(Duration::ZERO)
        );
        assert!(directive("max-age=-1").is_err());
        assert!(directive("max-age=").is_err());
        assert!(directive("public").is_err());
        assert_eq!(cache_directive(&HeaderMap::new()).unwrap(), CacheDirective::Default);
    }
}
