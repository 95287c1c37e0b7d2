//! `GET /api/v1/components` and `/components/{id}`: the functions a
//! pipeline may use as steps (every function that is not a pipeline), with
//! the schemas a step's params mapping must satisfy (the seed's components).

use axum::extract::{Path, Query, State};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use super::extract::Auth;
use super::functions::ListQuery;
use crate::auth::READ_FUNCTIONS;
use crate::error::{ApiError, ErrorBody};
use crate::registry::FunctionEntry;
use fnrt_core::language::Language;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_components))
        .routes(routes!(get_component))
}

/// A function as a pipeline step.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Component {
    /// Its Language-Title: what a step's `function` names.
    #[schema(example = "python-calculator")]
    pub component_id: String,
    pub language: Language,
    pub description: String,
    pub version: i64,
    /// JSON Schema its params must satisfy.
    #[schema(value_type = Object)]
    pub input_schema: Value,
    /// JSON Schema of its output (what `$.steps.NAME.output` holds).
    #[schema(value_type = Object)]
    pub output_schema: Value,
    /// Whether the caller's token may run it (`execute:{language}`).
    pub executable: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ComponentList {
    pub total: usize,
    pub page: usize,
    pub per_page: usize,
    pub components: Vec<Component>,
}

fn component(f: &FunctionEntry, auth: &Auth) -> Component {
    let v = &f.current;
    Component {
        component_id: v.language_title.to_string(),
        language: v.language(),
        description: v.manifest.description.clone(),
        version: v.version,
        input_schema: v.manifest.schema.params.clone(),
        output_schema: v.manifest.schema.result.clone(),
        executable: auth.0.can_execute(v.language()),
    }
}

/// The functions usable as pipeline steps, with their schemas (extension;
/// `read:functions`).
#[utoipa::path(
    get,
    path = "/api/v1/components",
    tag = "pipelines",
    params(ListQuery),
    responses(
        (status = 200, body = ComponentList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Token lacks read:functions", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list_components(
    State(state): State<AppState>,
    auth: Auth,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<ComponentList>, ApiError> {
    auth.require(READ_FUNCTIONS)?;
    let (language, page, per_page) = ListQuery::checked(query)?;
    let (_, all) = state.engine.registry.list(language, 1, usize::MAX);
    let usable: Vec<&FunctionEntry> = all.iter().filter(|f| f.current.pipeline().is_none()).collect();
    Ok(axum::Json(ComponentList {
        total: usable.len(),
        page,
        per_page,
        components: usable
            .into_iter()
            .skip(page.saturating_sub(1).saturating_mul(per_page))
            .take(per_page)
            .map(|f| component(f, &auth))
            .collect(),
    }))
}

/// One function usable as a pipeline step (extension; `read:functions`).
#[utoipa::path(
    get,
    path = "/api/v1/components/{component_id}",
    tag = "pipelines",
    params(("component_id" = String, Path, description = "A Language-Title, e.g. `python-calculator`")),
    responses(
        (status = 200, body = Component),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such function, or a pipeline", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn get_component(
    State(state): State<AppState>,
    auth: Auth,
    Path(component_id): Path<String>,
) -> Result<axum::Json<Component>, ApiError> {
    auth.require(READ_FUNCTIONS)?;
    match state.engine.registry.get(&component_id) {
        Some(f) if f.current.pipeline().is_none() => Ok(axum::Json(component(&f, &auth))),
        _ => Err(ApiError::NotFound(format!(
            "no component '{}' (GET /api/v1/components lists them)",
            component_id
                .chars()
                .filter(char::is_ascii_graphic)
                .take(80)
                .collect::<String>()
        ))),
    }
}
