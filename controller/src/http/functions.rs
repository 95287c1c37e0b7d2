//! `/api/v1/functions`: list and describe functions (seed API), register,
//! update and delete them (extension, `write:functions`; their owner's, or
//! an operator's with `admin:functions`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use super::extract::{ApiJson, Auth};
use crate::archive::{self, ArchiveError};
use crate::auth::{READ_FUNCTIONS, WRITE_FUNCTIONS};
use crate::error::{ApiError, ErrorBody};
use crate::registry::{FileContent, FunctionEntry, FunctionSpec, PackageLimits, Submission};
use fnrt_backends::build::{Builder, Tenant};
use fnrt_backends::deps::Installer;
use fnrt_core::artifact::BuildState;
use fnrt_core::function::manifest::{LimitsSpec, SchemaSpec};
use fnrt_core::language::{Language, LanguageTitle};
use fnrt_core::timefmt;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_functions, create_function))
        .routes(routes!(get_function, update_function, delete_function))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only this language, e.g. `nodejs`.
    pub language: Option<String>,
    /// Page number, from 1.
    pub page: Option<String>,
    /// Items per page, 1 to 100 (default 20).
    pub per_page: Option<String>,
}

impl ListQuery {
    /// The language, page and page size asked for (400 for a bad one).
    pub(super) fn checked(
        query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
    ) -> Result<(Option<Language>, usize, usize), ApiError> {
        let Query(query) = query.map_err(|e| ApiError::InvalidRequest(format!("bad query: {}", e.body_text())))?;
        let language = query
            .language
            .as_deref()
            .map(|l| l.parse::<Language>())
            .transpose()
            .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
        let page = positive(query.page.as_deref(), "page", 1, usize::MAX / 128)?;
        let per_page = positive(query.per_page.as_deref(), "per_page", 20, 100)?;
        Ok((language, page, per_page))
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct FunctionSummary {
    pub language: Language,
    pub title: String,
    pub language_title: String,
    pub description: String,
    pub created_at: String,
    pub updated_at: String,
    /// Current version number (extension).
    pub version: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct FunctionList {
    pub total: usize,
    pub page: usize,
    pub per_page: usize,
    pub functions: Vec<FunctionSummary>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct FunctionDetail {
    #[serde(flatten)]
    pub summary: FunctionSummary,
    pub schema: fnrt_core::function::manifest::Schemas,
    #[schema(value_type = Vec<Object>)]
    pub examples: Vec<Value>,
    /// sha256 of the version's code and behaviour (extension).
    pub code_hash: String,
    /// The subject that registered it; absent for a bundled function
    /// (extension). The owner reads every execution's logs, and updates or
    /// deletes it; so does a holder of `admin:functions` (an operator).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The version's limits (extension).
    pub limits: fnrt_core::function::manifest::Limits,
    /// The version's cache policy (extension).
    pub cache: fnrt_core::function::manifest::CachePolicy,
    /// How its asynchronous executions are retried (extension).
    pub retry: fnrt_core::function::manifest::RetryPolicy,
    /// Where its instances may connect, when anywhere (extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<fnrt_core::function::manifest::NetworkSpec>,
    /// A pipeline's steps (extension), `after` spelled out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<fnrt_core::function::pipeline::StepSpec>>,
    /// A pipeline's output mapping, when it has one (extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// For a Rust crate, or a package with dependencies to install
    /// (extension): where its build or install stands on this controller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildInfo>,
}

/// A crate's build.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct BuildInfo {
    /// `ready`, `building`, `failed`, or `not_built` (built at the first initialize).
    pub state: &'static str,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The compiler's messages of a failed build.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<String>,
}

fn summary(f: &FunctionEntry) -> FunctionSummary {
    let v = &f.current;
    FunctionSummary {
        language: v.language(),
        title: v.language_title.title().to_owned(),
        language_title: v.language_title.to_string(),
        description: v.manifest.description.clone(),
        created_at: timefmt::format(f.created_at),
        updated_at: timefmt::format(f.updated_at),
        version: v.version,
    }
}

/// Where a build (or an install) stands, as the detail shows it.
fn build_info(state: Option<BuildState>) -> BuildInfo {
    match state {
        Some(BuildState::Failed(failure)) => BuildInfo {
            state: "failed",
            message: Some(failure.message),
            messages: failure.messages,
        },
        Some(state) => BuildInfo {
            state: state.as_str(),
            message: None,
            messages: vec![],
        },
        None => BuildInfo {
            state: "not_built",
            message: None,
            messages: vec![],
        },
    }
}

fn detail(f: &FunctionEntry, builder: Option<&Arc<Builder>>, installer: Option<&Arc<Installer>>) -> FunctionDetail {
    let install = f
        .current
        .dependencies
        .as_ref()
        .map(|deps| build_info(installer.and_then(|i| i.state(deps))));
    let build = install.or_else(|| {
        f.current.files.as_ref().map(|files| {
            let target = fnrt_core::artifact::Target::for_language(f.current.language());
            let tenant = Tenant::of(f.owner.as_deref());
            build_info(builder.and_then(|b| b.state(target, &tenant, files)))
        })
    });
    let pipeline = f.current.pipeline();
    FunctionDetail {
        steps: pipeline.map(|p| p.specs()),
        output: pipeline.and_then(|p| p.output.clone()),
        build,
        summary: summary(f),
        schema: f.current.manifest.schema.clone(),
        examples: f.current.manifest.examples.clone(),
        code_hash: f.current.code_hash.clone(),
        owner: f.owner.clone(),
        limits: f.current.manifest.limits,
        cache: f.current.manifest.cache,
        retry: f.current.manifest.retry,
        network: (!f.current.manifest.network.is_empty()).then(|| fnrt_core::function::manifest::NetworkSpec {
            egress: f
                .current
                .manifest
                .network
                .egress
                .iter()
                .map(ToString::to_string)
                .collect(),
        }),
    }
}

pub(super) fn positive(value: Option<&str>, name: &str, default: usize, max: usize) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| ApiError::InvalidRequest(format!("'{name}' must be an integer between 1 and {max}"))),
    }
}

/// List the available functions (Language-Titles).
#[utoipa::path(
    get,
    path = "/api/v1/functions",
    tag = "functions",
    params(ListQuery),
    responses(
        (status = 200, body = FunctionList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Token lacks read:functions", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list_functions(
    State(state): State<AppState>,
    auth: Auth,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<FunctionList>, ApiError> {
    auth.require(READ_FUNCTIONS)?;
    let (language, page, per_page) = ListQuery::checked(query)?;
    let (total, items) = state.engine.registry.list(language, page, per_page);
    Ok(axum::Json(FunctionList {
        total,
        page,
        per_page,
        functions: items.iter().map(summary).collect(),
    }))
}

pub(super) fn parse_title(s: &str) -> Result<LanguageTitle, ApiError> {
    s.parse()
        .map_err(|e| ApiError::InvalidRequest(format!("invalid Language-Title: {e}")))
}

/// A function's description, schemas and examples.
#[utoipa::path(
    get,
    path = "/api/v1/functions/{language_title}",
    tag = "functions",
    params(("language_title" = String, Path, description = "e.g. `nodejs-calculator`")),
    responses(
        (status = 200, body = FunctionDetail),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn get_function(
    State(state): State<AppState>,
    auth: Auth,
    Path(language_title): Path<String>,
) -> Result<axum::Json<FunctionDetail>, ApiError> {
    auth.require(READ_FUNCTIONS)?;
    let lt = parse_title(&language_title)?;
    let f = state
        .engine
        .registry
        .find(lt.as_str())
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::NotFound(format!("function '{lt}' not found")))?;
    Ok(axum::Json(detail(&f, state.builder.as_ref(), state.installer.as_ref())))
}

/// A function to register: its manifest fields and its code, as exactly one
/// of `code`, `files` or `archive`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RegisterBody {
    /// Required on create; on update it may be omitted or must match the path.
    pub language_title: Option<String>,
    /// The source of the entrypoint file (Node, Python, WAT, base64 wasm).
    pub code: Option<String>,
    /// Several files, relative path -> text or `{"base64": "..."}`: a Node
    /// or Python package (entrypoint a path among them), or a Rust crate
    /// (`Cargo.toml`, `src/lib.rs`, ...) for `rust-*` and `wasm-*` functions.
    #[schema(value_type = Option<Object>)]
    pub files: Option<BTreeMap<String, FileContent>>,
    /// The same files as a `.zip` or `.tar.gz`, base64.
    pub archive: Option<String>,
    pub description: String,
    pub entrypoint: Option<String>,
    pub handler: Option<String>,
    #[serde(default)]
    pub schema: SchemaSpec,
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub examples: Vec<Value>,
    #[serde(default)]
    pub limits: LimitsSpec,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How results may be cached (`enabled`, `ttl_secs`, `l1_ttl_secs`).
    #[serde(default)]
    pub cache: fnrt_core::function::manifest::CacheSpec,
    /// How a package's dependencies are installed (`scripts`).
    #[serde(default)]
    pub install: fnrt_core::function::manifest::InstallSpec,
    /// Where its instances may connect (`egress`); none by default.
    #[serde(default)]
    pub network: fnrt_core::function::manifest::NetworkSpec,
    /// How its asynchronous executions are retried.
    #[serde(default)]
    pub retry: fnrt_core::function::manifest::RetrySpec,
    /// A pipeline's steps, instead of code (`pipeline-*`; docs/pipelines.md).
    #[serde(default)]
    pub steps: Vec<fnrt_core::function::pipeline::StepSpec>,
    /// A pipeline's output mapping (default: its last step's output).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
}

/// A registration: a JSON [`RegisterBody`], or a `multipart/form-data`
/// upload of an archive (part `archive`) with the manifest beside it (a
/// part `manifest` holding `function.json`, and/or one part per field:
/// text, or JSON for `schema`, `examples`, `limits`, `env`, `cache`,
/// `install`, `network`, `retry`).
pub(super) struct Registration {
    body: RegisterBody,
    /// The uploaded archive's bytes (multipart).
    archive: Option<Vec<u8>>,
}

/// Fields of a multipart registration whose parts hold JSON.
const JSON_FIELDS: [&str; 8] = [
    "schema", "examples", "limits", "env", "cache", "install", "network", "retry",
];

impl<S: Send + Sync> axum::extract::FromRequest<S> for Registration {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let multipart = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("multipart/form-data"));
        if !multipart {
            let ApiJson(body) = ApiJson::<RegisterBody>::from_request(req, state).await?;
            return Ok(Registration { body, archive: None });
        }
        let limit = req.extensions().get::<super::extract::BodyLimit>().map_or(0, |l| l.0);
        let bad = |e: axum::extract::multipart::MultipartError| match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
            _ => ApiError::InvalidRequest(format!("malformed multipart body: {}", e.body_text())),
        };
        let mut form = axum::extract::Multipart::from_request(req, state)
            .await
            .map_err(|e| ApiError::InvalidRequest(format!("malformed multipart body: {}", e.body_text())))?;
        let mut fields = serde_json::Map::new();
        let mut archive = None;
        while let Some(part) = form.next_field().await.map_err(bad)? {
            let name = part.name().unwrap_or_default().to_owned();
            let bytes = part.bytes().await.map_err(bad)?;
            let text = || {
                String::from_utf8(bytes.to_vec())
                    .map_err(|_| ApiError::InvalidRequest(format!("multipart part '{name}' is not UTF-8 text")))
            };
            let json = |text: String| {
                serde_json::from_str::<Value>(&text)
                    .map_err(|e| ApiError::InvalidRequest(format!("multipart part '{name}' is not JSON: {e}")))
            };
            match name.as_str() {
                "archive" => archive = Some(bytes.to_vec()),
                "manifest" => match json(text()?)? {
                    Value::Object(manifest) => fields.extend(manifest),
                    _ => {
                        return Err(ApiError::InvalidRequest(
                            "multipart part 'manifest' must be a JSON object".into(),
                        ));
                    }
                },
                n if JSON_FIELDS.contains(&n) => {
                    fields.insert(name.clone(), json(text()?)?);
                }
                _ => {
                    fields.insert(name.clone(), Value::String(text()?));
                }
            }
        }
        let Some(archive) = archive else {
            return Err(ApiError::InvalidRequest(
                "a multipart registration needs a part 'archive' (a .zip or .tar.gz)".into(),
            ));
        };
        let body: RegisterBody = serde_json::from_value(Value::Object(fields))
            .map_err(|e| ApiError::InvalidRequest(format!("bad manifest fields: {e}")))?;
        if body.code.is_some() || body.files.is_some() || body.archive.is_some() {
            return Err(ApiError::InvalidRequest(
                "a multipart registration carries its code in the part 'archive' only".into(),
            ));
        }
        Ok(Registration {
            body,
            archive: Some(archive),
        })
    }
}

impl Registration {
    fn into_parts(self, limits: PackageLimits) -> Result<(Option<String>, FunctionSpec, Submission), ApiError> {
        self.body.into_parts(self.archive, limits)
    }
}

fn unpack(bytes: &[u8], limits: PackageLimits) -> Result<Submission, ApiError> {
    Ok(Submission::Files(archive::unpack(bytes, limits).map_err(
        |e| match e {
            ArchiveError::Invalid(m) => ApiError::InvalidRequest(m),
            ArchiveError::TooLarge(m) => ApiError::ContentTooLarge(m),
        },
    )?))
}

impl RegisterBody {
    fn into_parts(
        self,
        uploaded: Option<Vec<u8>>,
        limits: PackageLimits,
    ) -> Result<(Option<String>, FunctionSpec, Submission), ApiError> {
        let code = match (self.code, self.files, self.archive) {
            (None, None, None) if uploaded.is_some() => unpack(&uploaded.unwrap_or_default(), limits)?,
            // A pipeline: its steps are its body.
            (None, None, None) if !self.steps.is_empty() => Submission::Source(String::new()),
            (Some(code), None, None) => Submission::Source(code),
            (None, Some(files), None) => Submission::Files(files),
            (None, None, Some(archive)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(archive.trim())
                    .map_err(|e| ApiError::InvalidRequest(format!("'archive' is not valid base64: {e}")))?;
                unpack(&bytes, limits)?
            }
            (None, None, None) => {
                return Err(ApiError::InvalidRequest(
                    "missing the code: 'code' (one file), 'files' (path -> content) or 'archive' \
                     (a base64 .zip or .tar.gz); a pipeline lists its 'steps' instead"
                        .into(),
                ));
            }
            _ => {
                return Err(ApiError::InvalidRequest(
                    "send only one of 'code', 'files' and 'archive'".into(),
                ));
            }
        };
        let spec = FunctionSpec {
            description: self.description,
            entrypoint: self.entrypoint,
            handler: self.handler,
            schema: self.schema,
            examples: self.examples,
            limits: self.limits,
            env: self.env,
            cache: self.cache,
            install: self.install,
            network: self.network,
            retry: self.retry,
            steps: self.steps,
            output: self.output,
        };
        Ok((self.language_title, spec, code))
    }
}

/// Register a new function (extension; `write:functions`).
#[utoipa::path(
    post,
    path = "/api/v1/functions",
    tag = "functions",
    request_body(
        description = "JSON, or `multipart/form-data`: a part `archive` (.zip or .tar.gz) beside a part \
                       `manifest` (function.json) and/or one part per field",
        content(
            (RegisterBody = "application/json"),
            (Object = "multipart/form-data"),
        )
    ),
    responses(
        (status = 201, description = "Registered at version 1", body = FunctionDetail),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Token lacks write:functions", body = ErrorBody),
        (status = 409, description = "Already exists", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn create_function(
    State(state): State<AppState>,
    auth: Auth,
    body: Registration,
) -> Result<(StatusCode, axum::Json<FunctionDetail>), ApiError> {
    auth.require(WRITE_FUNCTIONS)?;
    let (language_title, spec, code) = body.into_parts(state.engine.registry.package_limits())?;
    let lt = parse_title(
        language_title
            .as_deref()
            .ok_or_else(|| ApiError::InvalidRequest("missing 'language_title'".into()))?,
    )?;
    let f = state
        .engine
        .registry
        .create(&lt, spec, code, &auth.0.sub)
        .await
        .map_err(ApiError::from)?;
    tracing::info!(language_title = %lt, version = f.current.version, sub = %auth.0.sub, "function registered");
    Ok((
        StatusCode::CREATED,
        axum::Json(detail(&f, state.builder.as_ref(), state.installer.as_ref())),
    ))
}

/// Register a new version of a function (extension; `write:functions`,
/// and the function's owner: the subject that registered it, or a holder
/// of `admin:functions`, the only one for a bundled function). Sessions started before keep
/// their version.
#[utoipa::path(
    put,
    path = "/api/v1/functions/{language_title}",
    tag = "functions",
    params(("language_title" = String, Path, description = "e.g. `nodejs-calculator`")),
    request_body(
        description = "JSON, or `multipart/form-data`: a part `archive` (.zip or .tar.gz) beside a part \
                       `manifest` (function.json) and/or one part per field",
        content(
            (RegisterBody = "application/json"),
            (Object = "multipart/form-data"),
        )
    ),
    responses(
        (status = 200, description = "The new version", body = FunctionDetail),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Token lacks write:functions, or the function is another subject's (or bundled) and the token lacks admin:functions", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn update_function(
    State(state): State<AppState>,
    auth: Auth,
    Path(language_title): Path<String>,
    body: Registration,
) -> Result<axum::Json<FunctionDetail>, ApiError> {
    auth.require(WRITE_FUNCTIONS)?;
    let lt = parse_title(&language_title)?;
    let (body_title, spec, code) = body.into_parts(state.engine.registry.package_limits())?;
    if body_title.is_some_and(|t| t != lt.as_str()) {
        return Err(ApiError::InvalidRequest(
            "'language_title' does not match the path".into(),
        ));
    }
    let f = state
        .engine
        .registry
        .update(&lt, spec, code, &auth.0)
        .await
        .map_err(ApiError::from)?;
    // Idle instances of older versions will not be asked for again.
    state.engine.core.evict_function(lt.as_str()).await;
    tracing::info!(language_title = %lt, version = f.current.version, sub = %auth.0.sub, "function updated");
    Ok(axum::Json(detail(&f, state.builder.as_ref(), state.installer.as_ref())))
}

/// Delete a function, its versions and its sessions (extension;
/// `write:functions`, and the function's owner as for an update).
#[utoipa::path(
    delete,
    path = "/api/v1/functions/{language_title}",
    tag = "functions",
    params(("language_title" = String, Path, description = "e.g. `nodejs-calculator`")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Token lacks write:functions, or the function is another subject's (or bundled) and the token lacks admin:functions", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn delete_function(
    State(state): State<AppState>,
    auth: Auth,
    Path(language_title): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(WRITE_FUNCTIONS)?;
    let lt = parse_title(&language_title)?;
    state
        .engine
        .registry
        .delete(&lt, &auth.0)
        .await
        .map_err(ApiError::from)?;
    state.engine.function_removed(lt.as_str()).await;
    tracing::info!(language_title = %lt, sub = %auth.0.sub, "function deleted");
    Ok(StatusCode::NO_CONTENT)
}
