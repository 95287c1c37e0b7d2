//! `/api/v1/functions/{language_title}/versions`: a function's versions
//! (extension; `read:functions`), and deleting an older one (its owner's,
//! or an operator's with `admin:functions`), which is how an owner gets
//! back what it takes of `FUNCTIONS_QUOTA_MB` without deleting the
//! function.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use super::extract::Auth;
use super::functions::{parse_title, positive};
use crate::auth::{READ_FUNCTIONS, WRITE_FUNCTIONS};
use crate::error::{ApiError, ErrorBody};
use fnrt_core::timefmt;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_versions))
        .routes(routes!(delete_version))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct VersionsQuery {
    /// Page number, from 1.
    pub page: Option<String>,
    /// Items per page, 1 to 100 (default 20).
    pub per_page: Option<String>,
}

/// One version of a function.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct VersionItem {
    pub version: i64,
    /// Whether new sessions get this version.
    pub current: bool,
    /// sha256 of the version's code and behaviour.
    pub code_hash: String,
    pub created_at: String,
    /// What it counts against its owner's `FUNCTIONS_QUOTA_MB`: its code
    /// and manifest, and the dependencies installed for it.
    pub size_bytes: i64,
}

/// A page of a function's versions, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct VersionList {
    pub language_title: String,
    pub current_version: i64,
    pub total: i64,
    pub page: usize,
    pub per_page: usize,
    pub versions: Vec<VersionItem>,
}

/// A function's versions, newest first, with what each takes.
#[utoipa::path(
    get,
    path = "/api/v1/functions/{language_title}/versions",
    tag = "functions",
    params(("language_title" = String, Path, description = "e.g. `nodejs-calculator`"), VersionsQuery),
    responses(
        (status = 200, body = VersionList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Token lacks read:functions", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list_versions(
    State(state): State<AppState>,
    auth: Auth,
    Path(language_title): Path<String>,
    query: Result<Query<VersionsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<VersionList>, ApiError> {
    auth.require(READ_FUNCTIONS)?;
    let lt = parse_title(&language_title)?;
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(format!("bad query: {}", e.body_text())))?;
    let page = positive(query.page.as_deref(), "page", 1, usize::MAX / 128)?;
    let per_page = positive(query.per_page.as_deref(), "per_page", 20, 100)?;
    let (f, total, versions) = state
        .engine
        .registry
        .versions(&lt, page, per_page)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::NotFound(format!("function '{lt}' not found")))?;
    let current = f.current.version;
    Ok(axum::Json(VersionList {
        language_title: lt.to_string(),
        current_version: current,
        total,
        page,
        per_page,
        versions: versions
            .into_iter()
            .map(|v| VersionItem {
                version: v.version,
                current: v.version == current,
                code_hash: v.code_hash,
                created_at: timefmt::format(v.created_at),
                size_bytes: v.size,
            })
            .collect(),
    }))
}

/// Delete an older version of a function (extension; `write:functions`,
/// and the function's owner as for an update). What it took no longer
/// counts against the owner's quota; sessions pinned to it end, and its
/// queued asynchronous executions fail with `NOT_FOUND` when their turn
/// comes. The current version is deleted only with the function (409).
#[utoipa::path(
    delete,
    path = "/api/v1/functions/{language_title}/versions/{version}",
    tag = "functions",
    params(
        ("language_title" = String, Path, description = "e.g. `nodejs-calculator`"),
        ("version" = i64, Path, description = "A version other than the current one"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Token lacks write:functions, or the function is another subject's (or bundled) and the token lacks admin:functions", body = ErrorBody),
        (status = 404, description = "No such function or version", body = ErrorBody),
        (status = 409, description = "The version is the function's current one", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn delete_version(
    State(state): State<AppState>,
    auth: Auth,
    Path((language_title, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    auth.require(WRITE_FUNCTIONS)?;
    let lt = parse_title(&language_title)?;
    let version = version
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| ApiError::InvalidRequest(format!("version must be a positive integer, not '{version}'")))?;
    state
        .engine
        .registry
        .delete_version(&lt, version, &auth.0)
        .await
        .map_err(ApiError::from)?;
    state.engine.version_removed(lt.as_str(), version).await;
    tracing::info!(language_title = %lt, version, sub = %auth.0.sub, "function version deleted");
    Ok(StatusCode::NO_CONTENT)
}
