//! The API's one error type and the contract's error body.
//!
//! Every failure a client can see is an [`ApiError`]; it knows its contract
//! code (`RUNTIME_ERROR`, `TIMEOUT`, ...) and HTTP status, and renders as
//! `{"error": {"code", "message", "details"}}`. Errors of the execute
//! endpoint also carry the `request_id` at the top level ([`WithRequestId`]).
//! 5xx errors that come from the controller itself hide their cause from the
//! client and log it once.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request: bad JSON, wrong types, bad headers.
    #[error("{0}")]
    InvalidRequest(String),
    /// The function's parameters were refused (schema or the function itself).
    #[error("{message}")]
    InvalidParams { message: String, details: Value },
    /// The body is larger than the configured limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// What the body carries is larger than a limit (a package's files).
    #[error("{0}")]
    ContentTooLarge(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The resource exists already (e.g. registering a function twice).
    #[error("{0}")]
    Conflict(String),
    #[error("rate limit exceeded; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// The caller holds as many of something as it may (retained
    /// sessions): 429 like a rate limit, saying which.
    #[error("{message}")]
    TooMany { message: String, retry_after_secs: u64 },
    /// The function failed while loading its code.
    #[error("{message}")]
    Initialization { message: String, details: Value },
    /// The function threw, crashed or returned something unusable.
    #[error("{message}")]
    Runtime { message: String, details: Value },
    #[error("execution exceeded its timeout of {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    /// A Rust function's build failed (extension): `details.messages` holds
    /// the compiler's messages.
    #[error("{message}")]
    BuildFailed { message: String, details: Value },
    /// The function is still being built (extension); retry later.
    #[error("{message}")]
    NotReady { message: String, retry_after_secs: u64 },
    /// A dependency (a runtime, the database) is unavailable right now.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure inside the controller.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
    /// A pipeline's step failed (extension): the step's own error, with
    /// the step named in the message and in `details.step`.
    #[error("step '{step}' ({function}) failed: {inner}")]
    Step {
        step: String,
        function: String,
        execution_id: Option<uuid::Uuid>,
        inner: Box<ApiError>,
        steps: Value,
    },
}

impl ApiError {
    /// The contract's error code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) | ApiError::PayloadTooLarge { .. } | ApiError::ContentTooLarge(_) => {
                "INVALID_REQUEST"
            }
            ApiError::InvalidParams { .. } => "INVALID_PARAMS",
            ApiError::Unauthorized(_) => "UNAUTHORIZED",
            ApiError::Forbidden(_) => "FORBIDDEN",
            ApiError::NotFound(_) => "NOT_FOUND",
            ApiError::Conflict(_) => "CONFLICT",
            ApiError::RateLimited { .. } | ApiError::TooMany { .. } => "RATE_LIMITED",
            ApiError::Initialization { .. } => "INITIALIZATION_ERROR",
            ApiError::Runtime { .. } => "RUNTIME_ERROR",
            ApiError::Timeout { .. } => "TIMEOUT",
            ApiError::Unavailable(_) => "UNAVAILABLE",
            ApiError::BuildFailed { .. } => "BUILD_FAILED",
            ApiError::NotReady { .. } => "FUNCTION_NOT_READY",
            ApiError::Internal(_) => "INTERNAL_ERROR",
            ApiError::Step { inner, .. } => inner.code(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) | ApiError::InvalidParams { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } | ApiError::ContentTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } | ApiError::TooMany { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Initialization { .. } | ApiError::Runtime { .. } | ApiError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ApiError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) | ApiError::NotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BuildFailed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Step { inner, .. } => inner.status(),
        }
    }

    fn details(&self) -> Value {
        match self {
            ApiError::InvalidParams { details, .. }
            | ApiError::Initialization { details, .. }
            | ApiError::Runtime { details, .. }
            | ApiError::BuildFailed { details, .. } => details.clone(),
            ApiError::NotReady { retry_after_secs, .. } => {
                json!({ "build": "building", "retry_after_secs": retry_after_secs })
            }
            ApiError::PayloadTooLarge { limit } => json!({ "limit_bytes": limit }),
            ApiError::RateLimited { retry_after_secs } | ApiError::TooMany { retry_after_secs, .. } => {
                json!({ "retry_after_secs": retry_after_secs })
            }
            ApiError::Timeout { timeout_ms } => json!({ "timeout_ms": timeout_ms }),
            ApiError::Step {
                step,
                function,
                execution_id,
                inner,
                steps,
            } => {
                let mut details = match inner.details() {
                    Value::Object(map) => map,
                    _ => serde_json::Map::new(),
                };
                details.insert("step".into(), json!(step));
                details.insert("language_title".into(), json!(function));
                if let Some(id) = execution_id {
                    details.insert("execution_id".into(), json!(id.to_string()));
                }
                details.insert("steps".into(), steps.clone());
                Value::Object(details)
            }
            _ => json!({}),
        }
    }

    /// The body's `error` object.
    pub fn body(&self) -> ErrorObject {
        if let ApiError::Internal(err) = self {
            // Logged here, once; the client only learns that it happened.
            tracing::error!(error = format!("{err:#}"), "internal error");
        }
        ErrorObject {
            code: self.code(),
            message: self.to_string(),
            details: self.details(),
        }
    }

    fn headers(&self, response: &mut Response) {
        if let ApiError::Step { inner, .. } = self {
            return inner.headers(response);
        }
        if let ApiError::RateLimited { retry_after_secs }
        | ApiError::TooMany { retry_after_secs, .. }
        | ApiError::NotReady { retry_after_secs, .. } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
    }
}

/// The `error` object of every error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorObject {
    /// One of the contract's codes, e.g. `RUNTIME_ERROR`.
    #[schema(value_type = String, example = "RUNTIME_ERROR")]
    pub code: &'static str,
    pub message: String,
    /// Code-specific details (for runtime errors: line, column, stack_trace).
    #[schema(value_type = Object)]
    pub details: Value,
}

/// `{"error": {...}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

/// `{"request_id": "...", "error": {...}}`, the execute endpoint's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecuteErrorBody {
    pub request_id: String,
    /// The execution that failed, when the function ran (extension): its
    /// logs are at `/api/v1/executions/{execution_id}/logs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_id: Option<String>,
    pub error: ErrorObject,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(ErrorBody { error: self.body() })).into_response();
        self.headers(&mut response);
        response
    }
}

/// An error of a request that names a session: the body carries its ID.
#[derive(Debug)]
pub struct WithRequestId(pub String, pub ApiError);

impl IntoResponse for WithRequestId {
    fn into_response(self) -> Response {
        let WithRequestId(request_id, err) = self;
        FailedExecution {
            request_id,
            execution_id: None,
            error: err,
        }
        .into_response()
    }
}

/// An execute that failed, with the execution when the function ran
/// (the body carries it, and `X-Execution-Id`).
#[derive(Debug)]
pub struct FailedExecution {
    pub request_id: String,
    pub execution_id: Option<uuid::Uuid>,
    pub error: ApiError,
}

impl From<WithRequestId> for FailedExecution {
    fn from(WithRequestId(request_id, error): WithRequestId) -> Self {
        FailedExecution {
            request_id,
            execution_id: None,
            error,
        }
    }
}

impl IntoResponse for FailedExecution {
    fn into_response(self) -> Response {
        let FailedExecution {
            request_id,
            execution_id,
            error,
        } = self;
        let body = ExecuteErrorBody {
            request_id,
            execution_id: execution_id.map(|id| id.to_string()),
            error: error.body(),
        };
        let mut response = (error.status(), axum::Json(body)).into_response();
        error.headers(&mut response);
        if let Some(id) = execution_id {
            response.headers_mut().insert(
                EXECUTION_ID_HEADER,
                axum::http::HeaderValue::from_str(&id.to_string()).expect("a uuid is a header value"),
            );
        }
        response
    }
}

/// The header that names an execution on execute's answers.
pub const EXECUTION_ID_HEADER: &str = "x-execution-id";

impl From<crate::registry::RegistryError> for ApiError {
    fn from(e: crate::registry::RegistryError) -> Self {
        use crate::registry::RegistryError;
        match e {
            RegistryError::Invalid(e) => ApiError::InvalidRequest(e.to_string()),
            RegistryError::TooLarge(m) => ApiError::ContentTooLarge(m),
            RegistryError::OverQuota { .. } => ApiError::ContentTooLarge(e.to_string()),
            RegistryError::Exists(_) | RegistryError::CurrentVersion(..) | RegistryError::Changed(_) => {
                ApiError::Conflict(e.to_string())
            }
            RegistryError::NotFound(_) | RegistryError::NoSuchVersion(..) => ApiError::NotFound(e.to_string()),
            RegistryError::NotOwner(_) | RegistryError::Bundled(_) => ApiError::Forbidden(e.to_string()),
            RegistryError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            RegistryError::BuildFailed(failure) => ApiError::build_failed(failure),
            RegistryError::Store(e) => ApiError::Internal(e),
        }
    }
}

impl From<crate::files::FileError> for ApiError {
    fn from(e: crate::files::FileError) -> Self {
        use crate::files::FileError;
        match e {
            FileError::TooLarge { .. } | FileError::OverQuota { .. } => ApiError::ContentTooLarge(e.to_string()),
            FileError::Body(message) => ApiError::InvalidRequest(format!("could not read the upload: {message}")),
            FileError::NotFound => ApiError::NotFound("no such file".into()),
            FileError::Store(e) if e.is_unavailable() => {
                ApiError::Unavailable("the database is unavailable; retry shortly".into())
            }
            FileError::Store(e) => ApiError::Internal(e.into()),
            FileError::Io(e) => ApiError::Internal(anyhow::Error::new(e).context("the file store")),
        }
    }
}

impl ApiError {
    pub fn build_failed(failure: fnrt_core::artifact::BuildFailure) -> Self {
        ApiError::BuildFailed {
            message: failure.message,
            details: json!({ "messages": failure.messages }),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

impl From<fnrt_core::invoke::CoreError> for ApiError {
    /// The contract's code for each way an invocation can fail.
    fn from(e: fnrt_core::invoke::CoreError) -> Self {
        use fnrt_core::invoke::CoreError;
        match e {
            CoreError::SchemaMismatch { message, details } | CoreError::InvalidParams { message, details } => {
                ApiError::InvalidParams { message, details }
            }
            CoreError::Runtime { message, details } | CoreError::Crashed { message, details } => {
                ApiError::Runtime { message, details }
            }
            CoreError::Cancelled => ApiError::Conflict("the execution was cancelled".into()),
            CoreError::Timeout { timeout_ms } => ApiError::Timeout { timeout_ms },
            CoreError::Initialization { message, details } => ApiError::Initialization { message, details },
            CoreError::Unavailable(message) => ApiError::Unavailable(message),
            CoreError::NotReady { message } => ApiError::NotReady {
                message,
                retry_after_secs: 5,
            },
            CoreError::BuildFailed(failure) => ApiError::build_failed(failure),
            CoreError::Step {
                step,
                function,
                execution_id,
                source,
                steps,
            } => ApiError::Step {
                step,
                function,
                execution_id,
                inner: Box::new(ApiError::from(*source)),
                steps,
            },
        }
    }
}
