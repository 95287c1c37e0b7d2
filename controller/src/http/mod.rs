//! The HTTP layer: one file per resource, each with its own `router()`,
//! merged here with the middleware every request goes through.
//!
//! Order of the middleware, outermost first: request ID (set, then
//! propagated to the response), the access log ([`access`]: the request's
//! span, one line per answer), CORS,
//! compression (gzip, br, at level 1; bodies over 1 KiB, never a file download; only
//! for a request that sends `Accept-Encoding`), then
//! the envelope ([`Envelope`]): the body limit, metrics by matched route,
//! and JSON errors for anything answered before a handler (413 from the
//! length check, unknown route, wrong method). The `/api/v1` resource
//! routes also pass the guard: token check, then the rate limit (an
//! execute's is counted by its handler, with its session's count:
//! [`crate::admission`]). What no
//! middleware sees, hyper's answer to a request it cannot parse, gets its
//! JSON body from the connection itself ([`conn`]).

pub mod access;
mod components;
pub mod conn;
mod execute;
mod executions;
pub mod extract;
mod files;
mod functions;
mod guard;
mod health;
mod initialize;
pub mod linger;
mod logs;
mod sessions;
mod versions;
mod ws;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use tower::Layer as _;
use tower_http::compression::predicate::{And, DefaultPredicate, SizeAbove};
use tower_http::compression::{Compression, CompressionLayer, CompressionLevel, Predicate as _};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::auth::Authenticator;
use crate::engine::Engine;
use crate::error::{ApiError, ErrorBody, ErrorObject, ExecuteErrorBody, WithRequestId};
use crate::ratelimit::RateLimiter;
use extract::BodyLimit;
use fnrt_core::metrics::Metrics;

/// Everything a handler can reach: one `Arc`, because axum clones the state
/// for every middleware and extractor of every request (a struct of a dozen
/// `Arc`s was a dozen contended atomic increments and decrements each time).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares.
pub struct Shared {
    pub engine: Arc<Engine>,
    /// Asynchronous executions.
    pub executions: Arc<crate::executions::Executions>,
    /// The database behind the stores; `/health` pings it.
    pub database: Arc<dyn crate::store::StoreHealth>,
    pub auth: Arc<Authenticator>,
    pub limiter: Arc<dyn RateLimiter>,
    /// An execute's limit and its session's count ([`crate::admission`]).
    pub admission: Arc<dyn crate::admission::Admission>,
    pub metrics: Arc<Metrics>,
    /// Set when `REDIS_URL` is; `/health` reports it.
    pub redis: Option<crate::redis_client::RedisClient>,
    /// Builds Rust functions; function details report their build.
    pub builder: Option<Arc<fnrt_backends::build::Builder>>,
    /// Installs packages' dependencies (their state shows in details).
    pub installer: Option<Arc<fnrt_backends::deps::Installer>>,
    /// Function logs: per execution, per function live.
    pub logs: Arc<crate::logs::Logs>,
    /// The docker backend, when functions are placed on it (`/health`).
    pub docker: Option<Arc<fnrt_backends::docker::DockerBackend>>,
    /// Uploaded files.
    pub files: Arc<crate::files::Files>,
}

/// HTTP settings that are not state.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub max_body_bytes: usize,
    /// Largest body of a registration (`POST /api/v1/functions`, `PUT
    /// /api/v1/functions/{language_title}`), which may carry a package.
    pub max_registration_bytes: usize,
    /// Largest body of a file upload (`POST /api/v1/files`): the file
    /// (`MAX_FILE_MB`, counted exactly as it streams) with room for a
    /// multipart envelope.
    pub max_upload_bytes: usize,
    /// `*` means any origin.
    pub cors_allowed_origins: Vec<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Function runtime controller", description = "Lambda-style initialize/execute API. Part A is the seed API; the rest are documented extensions."),
    modifiers(&BearerAuth),
    tags(
        (name = "sessions", description = "initialize, execute, session state"),
        (name = "functions", description = "the function registry"),
        (name = "executions", description = "asynchronous executions: submit, status, cancel, retry"),
        (name = "logs", description = "what functions write to stdout and stderr, per execution and per function"),
        (name = "pipelines", description = "functions usable as pipeline steps (pipelines themselves are functions)"),
        (name = "files", description = "uploaded files, passed to functions by reference"),
        (name = "operations", description = "health, metrics, this document"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document, generated from the handlers' annotations.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations", responses((status = 200, description = "This document", content_type = "application/json")))]
async fn openapi_json(State(doc): State<Arc<String>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc.as_str().to_owned())
}

/// What a status means when a route's annotation does not say more.
fn status_description(status: &str) -> &'static str {
    match status {
        "200" => "Success",
        "201" => "Created",
        "204" => "Done; no body",
        "400" => "Malformed request or params (INVALID_REQUEST, INVALID_PARAMS)",
        "401" => "Missing or invalid token (UNAUTHORIZED)",
        "403" => "The token lacks the scope this needs (FORBIDDEN)",
        "404" => "Not found, expired or another subject's (NOT_FOUND)",
        "409" => "Conflicts with what exists (CONFLICT)",
        "413" => "Request body larger than MAX_BODY_BYTES (INVALID_REQUEST)",
        "422" => "A Rust function's build failed (BUILD_FAILED), with the compiler's messages",
        "429" => "Rate limited (RATE_LIMITED), with Retry-After",
        "500" => "The function failed (RUNTIME_ERROR, INITIALIZATION_ERROR) or the controller did (INTERNAL_ERROR)",
        "503" => "A dependency is unavailable (UNAVAILABLE) or the function is still being built (FUNCTION_NOT_READY)",
        "504" => "The execution passed its timeout (TIMEOUT)",
        _ => "See the error body",
    }
}

/// Makes the document complete as OpenAPI 3.1 requires and clients expect:
/// every response has a description, and every status a route can answer
/// is listed: 413 for any body, 422/503 where a function is specialised,
/// 429 behind the rate limit.
fn document_every_answer(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{RefOr, ResponseBuilder};
    let error_body = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build(),
        )
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        let specialises = path.starts_with("/api/v1/initialize") || path.starts_with("/api/v1/execute");
        let guarded = path.starts_with("/api/v1/") && path != "/api/v1/openapi.json";
        let operations = [
            (&mut item.get, false),
            (&mut item.post, true),
            (&mut item.put, true),
            (&mut item.delete, false),
        ];
        for (operation, has_body) in operations {
            let Some(operation) = operation else { continue };
            let responses = &mut operation.responses.responses;
            let mut wanted: Vec<&str> = Vec::new();
            if guarded {
                wanted.extend(["401", "429"]);
            }
            if guarded && has_body {
                wanted.push("413");
            }
            if specialises {
                wanted.extend(["422", "503"]);
            }
            for status in wanted {
                responses
                    .entry(status.to_owned())
                    .or_insert_with(|| error_body(status_description(status)));
            }
            for (status, response) in responses.iter_mut() {
                if let RefOr::T(response) = response
                    && response.description.is_empty()
                {
                    response.description = status_description(status).to_owned();
                }
            }
        }
    }
}

/// The files socket's router (`DATA_DIR/run/files.sock`, see [`crate::files::keys`]): `/api/v1/files`
/// for functions, a run's key (`Authorization: Bearer`) standing for that
/// run's caller (see [`crate::files::keys`]).
pub fn files_socket_router(state: AppState, keys: Arc<crate::files::keys::RunKeys>) -> Router {
    let (api, _) = files::router().split_for_parts();
    api.with_state(state)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(middleware::from_fn(
            move |mut req: axum::extract::Request, next: middleware::Next| {
                let keys = keys.clone();
                async move {
                    let subject = req
                        .headers()
                        .get(axum::http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .and_then(|key| keys.subject(key));
                    let authenticated = match subject {
                        Some(sub) => Ok(crate::auth::Subject {
                            sub,
                            scopes: Vec::new(),
                        }),
                        None => Err("this run's files key is missing, or its run has ended".to_owned()),
                    };
                    req.extensions_mut().insert(extract::Authenticated(authenticated));
                    next.run(req).await
                }
            },
        ))
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// The application's routes, with what must see the matched route (the
/// envelope); [`app`] wraps it in the rest.
pub fn router(state: AppState, settings: &HttpSettings) -> Router {
    let guarded: OpenApiRouter<AppState> = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(initialize::router())
        .merge(execute::router())
        .merge(sessions::router())
        .merge(functions::router())
        .merge(versions::router())
        .merge(components::router())
        .merge(executions::router())
        .merge(logs::router())
        .merge(files::router())
        .route_layer(middleware::from_fn_with_state(state.clone(), guard::guard));
    let (api, mut doc) = guarded.merge(health::router()).split_for_parts();
    let (_, openapi_paths) = OpenApiRouter::<Arc<String>>::new()
        .routes(utoipa_axum::routes!(openapi_json))
        .split_for_parts();
    doc.merge(openapi_paths);
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    document_every_answer(&mut doc);
    let doc = Arc::new(doc.to_json().expect("the OpenAPI document serialises"));

    Router::new()
        .route("/api/v1/openapi.json", axum::routing::get(openapi_json).with_state(doc))
        // Its token comes in its first message, not through the guard.
        .route("/api/v1/ws", axum::routing::get(ws::upgrade).with_state(state.clone()))
        .merge(api.with_state(state.clone()))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(axum::extract::DefaultBodyLimit::disable())
        // Inside the router: it counts requests by their matched route.
        .layer({
            let metrics = state.metrics.clone();
            let limits = BodyLimits {
                body: settings.max_body_bytes,
                registration: settings.max_registration_bytes,
                upload: settings.max_upload_bytes,
            };
            tower::layer::layer_fn(move |inner| Envelope {
                inner,
                metrics: metrics.clone(),
                limits,
            })
        })
}

/// The [`router`] inside the layers that do not need the matched route,
/// outermost first: the request ID, the access log, CORS, compression.
/// They wrap the router as one service rather than going through
/// `Router::layer`, which wraps every route in each layer and boxes the
/// result again: every request then cloned one box per layer and boxed
/// one future per layer (a fifth of a cached hit's allocations).
pub fn app(
    router: Router,
    settings: &HttpSettings,
) -> impl tower::Service<Request, Response = Response, Error = std::convert::Infallible, Future: Send + 'static>
+ Clone
+ Send
+ 'static {
    let request_id = HeaderName::from_static("x-request-id");
    tower::ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        .layer(tower::layer::layer_fn(|inner| access::AccessLog { inner }))
        .layer(PropagateRequestIdLayer::new(request_id))
        .layer(cors(settings))
        .layer(tower::layer::layer_fn(CompressWhenAsked::new))
        .service(router)
}

/// The predicate of [`CompressWhenAsked`]: over 1 KiB, not a file download.
type CompressPredicate = And<And<DefaultPredicate, SizeAbove>, NotADownload>;
type NotADownload = fn(StatusCode, axum::http::Version, &axum::http::HeaderMap, &axum::http::Extensions) -> bool;

fn compress_predicate() -> CompressPredicate {
    let not_a_download: NotADownload = |_, _, headers, _| !headers.contains_key(header::CONTENT_DISPOSITION);
    DefaultPredicate::new().and(SizeAbove::new(1024)).and(not_a_download)
}

/// gzip or br, as the client accepts, for bodies over 1 KiB (error bodies
/// too: this is outside the layer that writes them). File downloads go as
/// stored: their ETag and length name those bytes.
///
/// A request without `Accept-Encoding` goes around the compression layer:
/// its answer is the body as it is either way, and the layer would still
/// work out the client's preferred encoding (over 1 % of the controller's
/// CPU for cached hits at c32, docs/benchmarks.md) and wrap the body.
/// Such an answer still names `Accept-Encoding` in `Vary` when the layer
/// would have, so a cache between keeps the two apart.
#[derive(Clone)]
struct CompressWhenAsked<S> {
    plain: S,
    compressed: Compression<S, CompressPredicate>,
}

impl<S: Clone> CompressWhenAsked<S> {
    fn new(inner: S) -> Self {
        // The fastest level, as nginx's default (`gzip_comp_level 1`): an
        // answer is made once and sent once, so the encoder's set-up and
        // search cost each request in full. On a pipeline's 1.8 KB answer
        // brotli's default here (4) took 66 µs and gzip's (6) 25, against
        // 22 (brotli 1) and 17 (gzip 1) for 10 to 20 % more bytes
        // (docs/benchmarks.md).
        let compression = CompressionLayer::new()
            .gzip(true)
            .br(true)
            .quality(CompressionLevel::Precise(1))
            .compress_when(compress_predicate());
        CompressWhenAsked {
            compressed: compression.layer(inner.clone()),
            plain: inner,
        }
    }
}

/// What the compression layer does to the headers of an answer it would
/// compress for a client that asked, but did not ask here.
fn vary_if_compressible(mut response: Response) -> Response {
    let headers = response.headers();
    let compressible = !headers.contains_key(header::CONTENT_ENCODING)
        && !headers.contains_key(header::CONTENT_RANGE)
        && compress_predicate().should_compress(&response);
    let named = || {
        response.headers().get_all(header::VARY).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|h| h.trim().eq_ignore_ascii_case("accept-encoding")))
        })
    };
    if compressible && !named() {
        response
            .headers_mut()
            .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    response
}

type CompressedBody = tower_http::compression::CompressionBody<axum::body::Body>;
type Boxed = fn(axum::http::Response<CompressedBody>) -> Response;
type Varied = fn(Response) -> Response;

impl<S> tower::Service<Request> for CompressWhenAsked<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible> + Clone,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::Either<
        futures::future::MapOk<S::Future, Varied>,
        futures::future::MapOk<tower_http::compression::ResponseFuture<S::Future, CompressPredicate>, Boxed>,
    >;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        // Either may take the request: both are asked.
        std::task::ready!(self.plain.poll_ready(cx))?;
        self.compressed.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        use futures::TryFutureExt as _;
        if req.headers().contains_key(header::ACCEPT_ENCODING) {
            let boxed: Boxed = |r| r.map(axum::body::Body::new);
            futures::future::Either::Right(self.compressed.call(req).map_ok(boxed))
        } else {
            futures::future::Either::Left(self.plain.call(req).map_ok(vary_if_compressible as Varied))
        }
    }
}

fn cors(settings: &HttpSettings) -> CorsLayer {
    let origins = &settings.cors_allowed_origins;
    let allow_origin = if origins.iter().any(|o| o.trim() == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o.trim()).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS, Method::PUT, Method::DELETE])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            HeaderName::from_static("language-title"),
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("x-cache-control"),
            header::IF_NONE_MATCH,
        ])
        .expose_headers([
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static(crate::error::EXECUTION_ID_HEADER),
            header::RETRY_AFTER,
            header::CONTENT_DISPOSITION,
            header::ETAG,
            header::LOCATION,
        ])
        .max_age(Duration::from_secs(86_400))
}

/// Every request's envelope, one service written out rather than
/// `middleware::from_fn` layers (each of those clones the stack below it
/// and boxes two futures per request: three of them were about 12 µs of a
/// cached hit's 67 µs of CPU at c32):
///
/// - the body limit: a declared length over it is refused at once (before
///   the body is read); a body that grows past it fails its extractor
///   with 413;
/// - the request counted by matched route (never the raw path: IDs would
///   explode the series count);
/// - answers axum or tower produce on their own (405, the 413 above, ...)
///   given the contract's JSON error body.
#[derive(Clone)]
struct Envelope<S> {
    inner: S,
    metrics: Arc<Metrics>,
    limits: BodyLimits,
}

impl<S> tower::Service<Request> for Envelope<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response, std::convert::Infallible>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = Instant::now();
        let route = req.extensions().get::<MatchedPath>().cloned();
        let method = method_label(req.method());
        let limit = self.limits.of(req.method(), req.uri().path());
        // Execute errors carry the session's request ID, also those
        // answered before the handler (a body refused for its length).
        let execute_id = req
            .uri()
            .path()
            .strip_prefix("/api/v1/execute/")
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .map(str::to_owned);
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let answered = if declared.is_some_and(|n| n > limit as u64) {
            // The same answer as a body that grows past the limit: the limit in its message and
            // details, and an execute's session.
            let refused = ApiError::PayloadTooLarge { limit };
            Err(match &execute_id {
                Some(id) => WithRequestId(id.clone(), refused).into_response(),
                None => refused.into_response(),
            })
        } else {
            let mut req = req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, limit)));
            req.extensions_mut().insert(BodyLimit(limit));
            Ok(self.inner.call(req))
        };
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = match answered {
                Ok(future) => future.await?,
                Err(refused) => refused,
            };
            metrics.record_http(
                route.as_ref().map_or("unmatched", |r| r.as_str()),
                method,
                response.status().as_u16(),
                started.elapsed(),
            );
            Ok(json_errors(response, execute_id))
        })
    }
}

/// The body limits of [`Envelope`], in bytes.
#[derive(Debug, Clone, Copy)]
struct BodyLimits {
    body: usize,
    registration: usize,
    upload: usize,
}

impl BodyLimits {
    /// `MAX_BODY_BYTES`, or for a registration the larger limit a package
    /// needs, or for a file upload `MAX_FILE_MB` and room for its envelope.
    fn of(&self, method: &Method, path: &str) -> usize {
        if (method == Method::POST && path == "/api/v1/functions")
            || (method == Method::PUT && path.starts_with("/api/v1/functions/"))
        {
            self.registration
        } else if method == Method::POST && path == "/api/v1/files" {
            self.upload
        } else {
            self.body
        }
    }
}

/// The method as a metric label: the standard ones by name, anything a
/// client invents as `other`, so invented methods never make new series.
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    KNOWN
        .iter()
        .find(|known| *known == method)
        .map_or("other", |known| known.as_str())
}

/// Gives answers axum or tower produce on their own (405, 413 from the
/// length check, ...) the contract's JSON error body; `request_id`: an
/// execute's session, which its error bodies carry.
fn json_errors(response: Response, request_id: Option<String>) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let code = match status {
        StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
        StatusCode::FORBIDDEN => "FORBIDDEN",
        StatusCode::NOT_FOUND => "NOT_FOUND",
        StatusCode::TOO_MANY_REQUESTS => "RATE_LIMITED",
        s if s.is_server_error() => "INTERNAL_ERROR",
        _ => "INVALID_REQUEST",
    };
    let message = status.canonical_reason().unwrap_or("error").to_owned();
    let error = ErrorObject {
        code,
        message,
        details: serde_json::json!({}),
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut fresh = match request_id {
        Some(request_id) => (
            status,
            axum::Json(ExecuteErrorBody {
                request_id,
                execution_id: None,
                error,
            }),
        )
            .into_response(),
        None => (status, axum::Json(ErrorBody { error })).into_response(),
    };
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE {
            fresh.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fresh
}
