//! `GET /health` (no authentication, no rate limit) and `GET /metrics`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use fnrt_core::metrics::InstanceLabels;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(health)).routes(routes!(metrics))
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct HealthResponse {
    /// `ok`, or `degraded` when a component is not ok.
    #[schema(example = "ok")]
    pub status: &'static str,
    #[schema(example = "0.1.0")]
    pub version: &'static str,
    pub components: Components,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Components {
    pub controller: &'static str,
    /// `ok`, `degraded` (unreachable: no L2 cache, per-process limits), or
    /// `disabled` on embedded defaults (no `REDIS_URL`).
    pub redis: &'static str,
    /// `ok` or `error` with `DATABASE_URL`; `disabled` on embedded defaults.
    pub postgres: &'static str,
    /// The embedded database (extension): `ok`, `error`, or `disabled` when PostgreSQL is used.
    pub sqlite: &'static str,
    /// Where rate limits are counted (extension): `shared` (Redis) or
    /// `per-process` (no Redis, or Redis unreachable).
    pub rate_limits: &'static str,
    /// Per language: `ok`, `error`, or `unknown` before its first instance started.
    pub runtimes: BTreeMap<String, &'static str>,
    /// Why a runtime is not ok (extension), when known.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub runtime_errors: BTreeMap<String, String>,
    /// The docker backend (extension): `ok`, `error` (its engine does not
    /// answer), or `disabled` when no function is placed on it.
    pub docker: &'static str,
    /// Why the docker backend is in error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_error: Option<String>,
    /// Its containers per language: warm (generic, ready) and idle
    /// (specialised, waiting for their function).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub docker_pool: BTreeMap<String, PoolSize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct PoolSize {
    pub warm: i64,
    pub idle: i64,
}

/// Liveness and component status.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, body = HealthResponse)))]
async fn health(State(state): State<AppState>) -> axum::Json<HealthResponse> {
    let database = match tokio::time::timeout(Duration::from_secs(2), state.database.ping()).await {
        Ok(Ok(())) => "ok",
        _ => "error",
    };
    let (sqlite, postgres) = match state.database.kind() {
        "postgres" => ("disabled", database),
        _ => (database, "disabled"),
    };
    let mut runtimes = BTreeMap::new();
    let mut runtime_errors = BTreeMap::new();
    for (language, (status, error)) in state.engine.core.pool().health() {
        runtimes.insert(language.to_string(), status);
        if let Some(e) = error {
            runtime_errors.insert(language.to_string(), e);
        }
    }
    // Without Redis the controller still serves (no L2, per-process limits): degraded.
    let redis = match &state.redis {
        None => "disabled",
        Some(r) if r.ping().await => "ok",
        Some(_) => "degraded",
    };
    let (docker, docker_error) = match &state.docker {
        None => ("disabled", None),
        Some(backend) => match tokio::time::timeout(Duration::from_secs(2), backend.health()).await {
            Ok(Ok(_)) => ("ok", None),
            Ok(Err(e)) => ("error", Some(e)),
            Err(_) => (
                "error",
                Some("the container engine did not answer within 2 s".to_owned()),
            ),
        },
    };
    let docker_pool = match &state.docker {
        None => BTreeMap::new(),
        Some(_) => state
            .engine
            .core
            .pool()
            .sizes_of("docker")
            .into_iter()
            .map(|(language, (warm, idle))| (language.to_string(), PoolSize { warm, idle }))
            .collect(),
    };
    let degraded =
        database != "ok" || redis == "degraded" || docker == "error" || runtimes.values().any(|s| *s == "error");
    axum::Json(HealthResponse {
        status: if degraded { "degraded" } else { "ok" },
        version: env!("CARGO_PKG_VERSION"),
        components: Components {
            controller: "ok",
            redis,
            rate_limits: if redis == "ok" { "shared" } else { "per-process" },
            postgres,
            sqlite,
            runtimes,
            runtime_errors,
            docker,
            docker_error,
            docker_pool,
        },
    })
}

/// Prometheus metrics: OpenMetrics when the `Accept` header asks for
/// `application/openmetrics-text` (as Prometheus does), else the text
/// format 0.0.4 (curl, promtool, older scrapers).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "the metrics", content(
    (String = "text/plain; version=0.0.4"),
    (String = "application/openmetrics-text; version=1.0.0"),
))))]
async fn metrics(State(state): State<AppState>, headers: header::HeaderMap) -> impl IntoResponse {
    let m = &state.metrics;
    let pool = state.engine.core.pool();
    for backend in pool.backend_names() {
        for (language, (warm, idle)) in pool.sizes_of(backend) {
            for (pool_state, n) in [("warm", warm), ("idle", idle)] {
                m.backend_instances
                    .get_or_create(&fnrt_core::metrics::BackendInstanceLabels {
                        backend: backend.to_owned(),
                        language: language.to_string(),
                        state: pool_state.to_owned(),
                    })
                    .set(n);
            }
        }
    }
    let (counts, busy) = state.engine.core.pool().counts();
    for (language, pool_state, n) in counts {
        m.instances
            .get_or_create(&InstanceLabels {
                language: language.to_string(),
                state: pool_state.to_owned(),
            })
            .set(n);
    }
    m.instances_busy.set(busy);
    state.engine.update_session_gauge().await;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    match openmetrics {
        true => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            m.encode(),
        ),
        false => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            m.encode_text_004(),
        ),
    }
}
