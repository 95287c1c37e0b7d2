//! The invocation core: one call runs one function version.
//!
//! [`Invoker::invoke`] takes the input (params and the context the function
//! sees), a deadline, a cache directive and, for a session that keeps its
//! instance, a [`Retained`] slot; it returns the output or a [`CoreError`].
//! Everything an execution needs happens here and nowhere else: the params
//! schema, the cache lookup and store, instance acquisition, the deadline,
//! the execution record and the execution metrics. There is no HTTP in it:
//! sessions, asynchronous executions and pipelines are adapters that call
//! it, and the HTTP layer maps [`CoreError`] to the contract's codes.
//!
//! ```text
//! invoke: schema -> cache (L1, L2) --hit--> output (cached)
//!         -> instance (retained, idle, warm, cold) -> /run within the deadline
//!         -> cache the success -> record + metrics -> output
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::build::BuildFailure;
use crate::cache::{CacheKey, Layers};
use crate::metrics::Metrics;
use crate::records::ExecutionLog;
use crate::registry::FunctionVersion;
use crate::runtime::pool::{InstancePool, Lease};
use crate::runtime::{InstanceError, RunOutcome, RunRequest};
use crate::store::ExecutionRecord;

/// How the cache may serve and keep one invocation's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheDirective {
    /// Serve a cached result; keep a fresh one for the default TTL.
    Default,
    /// Skip the lookup; the fresh result is still stored.
    NoCache,
    /// Accept a cached result at most this old; store the fresh one for this long.
    MaxAge(Duration),
}

/// Settings of the core.
#[derive(Debug, Clone, Copy)]
pub struct InvokeSettings {
    /// How long a result is cached without a `MaxAge` directive.
    pub cache_ttl: Duration,
    /// Longest TTL a `MaxAge` directive may ask for.
    pub max_cache_ttl: Duration,
}

/// On whose behalf an invocation runs: what its execution record names.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The session (or, later, the asynchronous execution) it belongs to.
    pub request_id: &'a str,
    /// The subject of the token that asked for it.
    pub subject: &'a str,
}

/// One invocation's input.
#[derive(Debug, Clone, Copy)]
pub struct Invocation<'a> {
    pub function: &'a FunctionVersion,
    pub params: &'a Value,
    /// The context the function sees (it is part of the cache key).
    pub context: &'a Value,
    /// How long the run may take; past it the instance is killed.
    pub deadline: Duration,
    pub cache: CacheDirective,
    pub origin: Origin<'a>,
}

/// A session's own instance, kept between its invocations
/// (`retain_session`): empty until the first one, and again after its
/// instance failed or timed out.
#[derive(Debug, Default)]
pub struct Retained(Option<Lease>);

impl Retained {
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

/// What an invocation answered.
#[derive(Debug)]
pub struct Invoked {
    pub result: Arc<Value>,
    /// The result came from the cache.
    pub cached: bool,
    /// An instance was started for this invocation.
    pub cold_start: bool,
    /// A [`Retained`] slot had no live instance, so a fresh one was
    /// specialised: the function's in-memory state started over.
    pub instance_recreated: bool,
}

/// Why an invocation gave no result. [`CoreError::ran`] says whether it got
/// as far as running (or looking up) anything.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The params do not match the function's schema: refused before anything ran.
    #[error("{message}")]
    SchemaMismatch { message: String, details: Value },
    /// The function refused its params.
    #[error("{message}")]
    InvalidParams { message: String, details: Value },
    /// The function threw, its instance crashed, or its answer was unusable.
    #[error("{message}")]
    Runtime { message: String, details: Value },
    /// The run passed its deadline; its instance was killed.
    #[error("execution exceeded its timeout of {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    /// The function failed while loading its code.
    #[error("{message}")]
    Initialization { message: String, details: Value },
    /// No instance can be started for the function's language right now.
    #[error("{0}")]
    Unavailable(String),
    /// The function's build has not finished yet.
    #[error("{message}")]
    NotReady { message: String },
    /// The function's build failed.
    #[error("{}", .0.message)]
    BuildFailed(BuildFailure),
}

impl CoreError {
    /// False when the invocation was refused before it ran (so a one-shot
    /// session is not spent on it).
    pub fn ran(&self) -> bool {
        !matches!(self, CoreError::SchemaMismatch { .. })
    }

    /// The outcome label of metrics and execution records.
    fn outcome(&self) -> &'static str {
        match self {
            CoreError::SchemaMismatch { .. } | CoreError::InvalidParams { .. } => "invalid_params",
            CoreError::Runtime { .. } => "runtime_error",
            CoreError::Timeout { .. } => "timeout",
            _ => "error",
        }
    }
}

impl From<InstanceError> for CoreError {
    /// An instance (not the function) failed.
    fn from(e: InstanceError) -> Self {
        match e {
            InstanceError::Unavailable { .. } => CoreError::Unavailable(e.to_string()),
            InstanceError::Init { message, details } => CoreError::Initialization {
                message: format!("the function failed to load: {message}"),
                details,
            },
            InstanceError::Crashed { message, details } => CoreError::Runtime { message, details },
            InstanceError::ResultTooLarge { limit } => CoreError::Runtime {
                message: e.to_string(),
                details: json!({ "limit_bytes": limit }),
            },
            InstanceError::Protocol(message) => CoreError::Runtime {
                message: format!("the runtime misbehaved: {message}"),
                details: json!({}),
            },
            InstanceError::NotReady { message } => CoreError::NotReady { message },
            InstanceError::BuildFailed(failure) => CoreError::BuildFailed(failure),
        }
    }
}

/// Runs function versions: the one path every execution takes.
pub struct Invoker {
    cache: Layers,
    pool: Arc<InstancePool>,
    metrics: Arc<Metrics>,
    /// Where answered invocations are recorded, off the request path.
    records: ExecutionLog,
    settings: InvokeSettings,
}

impl std::fmt::Debug for Invoker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invoker")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Invoker {
    pub fn new(
        cache: Layers,
        pool: Arc<InstancePool>,
        metrics: Arc<Metrics>,
        records: ExecutionLog,
        settings: InvokeSettings,
    ) -> Self {
        Invoker {
            cache,
            pool,
            metrics,
            records,
            settings,
        }
    }

    pub fn pool(&self) -> &Arc<InstancePool> {
        &self.pool
    }

    /// Readies an instance for `function` ahead of its first invocation:
    /// into `retained` when given, else back to the version's idle list.
    pub async fn prepare(&self, function: &FunctionVersion, retained: Option<&mut Retained>) -> Result<(), CoreError> {
        let lease = self.pool.acquire(function).await?;
        match retained {
            Some(slot) => {
                if let Some(old) = slot.0.replace(lease) {
                    self.pool.discard(old).await;
                }
            }
            None => self.pool.release(lease).await,
        }
        Ok(())
    }

    /// Gives a retained instance back to its version's idle list.
    pub async fn release(&self, retained: Retained) {
        if let Some(lease) = retained.0 {
            self.pool.release(lease).await;
        }
    }

    /// Stops a retained instance for good.
    pub async fn discard(&self, retained: Retained) {
        if let Some(lease) = retained.0 {
            self.pool.discard(lease).await;
        }
    }

    /// Runs `invocation` once, on the instance in `retained` when there is
    /// one (and keeps the instance there afterwards), else on a pooled one.
    pub async fn invoke(
        &self,
        invocation: Invocation<'_>,
        retained: Option<&mut Retained>,
    ) -> Result<Invoked, CoreError> {
        let started = Instant::now();
        let started_at = OffsetDateTime::now_utc();
        let function = invocation.function;
        let language_title = function.language_title.as_str();
        if let Err(details) = function.validate_params(invocation.params) {
            self.metrics
                .record_execution(language_title, "invalid_params", started.elapsed());
            return Err(CoreError::SchemaMismatch {
                message: "params do not match the function's schema".into(),
                details,
            });
        }
        let key = CacheKey::new(
            language_title,
            &function.code_hash,
            invocation.params,
            invocation.context,
        );
        if invocation.cache != CacheDirective::NoCache {
            let max_age = match invocation.cache {
                CacheDirective::MaxAge(max) => Some(max),
                _ => None,
            };
            if let Some(entry) = self.cache.get(&key, max_age).await {
                self.finish(&invocation, started, started_at, "cache_hit", true, false);
                return Ok(Invoked {
                    result: entry.result,
                    cached: true,
                    cold_start: false,
                    instance_recreated: false,
                });
            }
        }

        let (start, outcome) = self.run(&invocation, retained).await;
        let result = match outcome {
            Ok(RunOutcome::Success(value)) => Ok(Arc::new(value)),
            Ok(RunOutcome::InvalidParams { message, details }) => Err(CoreError::InvalidParams { message, details }),
            Ok(RunOutcome::Failed { message, details }) => Err(CoreError::Runtime { message, details }),
            Err(e) => Err(e),
        };
        if let Ok(value) = &result {
            let ttl = match invocation.cache {
                CacheDirective::MaxAge(ttl) => ttl.min(self.settings.max_cache_ttl),
                _ => self.settings.cache_ttl,
            };
            self.cache.put(&key, value.clone(), ttl).await;
        }
        let label = match &result {
            Ok(_) => "success",
            Err(e) => e.outcome(),
        };
        self.finish(&invocation, started, started_at, label, false, start.cold);
        result.map(|result| Invoked {
            result,
            cached: false,
            cold_start: start.cold,
            instance_recreated: start.recreated,
        })
    }

    /// One run on the retained instance or a pooled one, within the
    /// deadline: the one place the deadline is enforced.
    async fn run(
        &self,
        invocation: &Invocation<'_>,
        mut retained: Option<&mut Retained>,
    ) -> (InstanceStart, Result<RunOutcome, CoreError>) {
        let kept = match retained.as_mut().and_then(|slot| slot.0.take()) {
            Some(mut lease) if lease.instance.is_alive() => Some(lease),
            Some(dead) => {
                self.pool.discard(dead).await;
                None
            }
            None => None,
        };
        let mut start = InstanceStart {
            cold: false,
            // A retained slot without a live instance gets a fresh one.
            recreated: retained.is_some() && kept.is_none(),
        };
        let mut lease = match kept {
            Some(lease) => lease,
            None => match self.pool.acquire(invocation.function).await {
                Ok(lease) => lease,
                Err(e) => return (start, Err(e.into())),
            },
        };
        start.cold = lease.start.is_cold();
        let request = RunRequest {
            params: invocation.params,
            context: invocation.context,
            deadline: invocation.deadline,
        };
        let request_id = invocation.origin.request_id;
        let result = match tokio::time::timeout(invocation.deadline, lease.instance.run(request)).await {
            Err(_elapsed) => {
                tracing::info!(
                    request_id,
                    instance = lease.instance.id(),
                    "deadline passed; killing the instance"
                );
                self.pool.discard(lease).await;
                Err(CoreError::Timeout {
                    timeout_ms: invocation.deadline.as_millis() as u64,
                })
            }
            Ok(Err(e)) => {
                tracing::warn!(request_id, instance = lease.instance.id(), error = %e, "instance failed");
                self.pool.discard(lease).await;
                Err(e.into())
            }
            Ok(Ok(outcome)) => {
                match retained {
                    Some(slot) => slot.0 = Some(lease),
                    None => self.pool.release(lease).await,
                }
                Ok(outcome)
            }
        };
        (start, result)
    }

    /// Metrics and the durable record of one answered invocation.
    fn finish(
        &self,
        invocation: &Invocation<'_>,
        started: Instant,
        started_at: OffsetDateTime,
        outcome: &'static str,
        cached: bool,
        cold_start: bool,
    ) {
        let elapsed = started.elapsed();
        let function = invocation.function;
        self.metrics
            .record_execution(function.language_title.as_str(), outcome, elapsed);
        self.records.record(ExecutionRecord {
            id: uuid::Uuid::new_v4(),
            request_id: invocation.origin.request_id.to_owned(),
            subject: invocation.origin.subject.to_owned(),
            language_title: function.language_title.to_string(),
            version: function.version,
            started_at,
            duration_ms: elapsed.as_millis() as i64,
            outcome: outcome.to_owned(),
            cached,
            cold_start,
        });
    }

    /// Stops the idle instances of every version of a function (it was
    /// updated or deleted: they will not be asked for again).
    pub async fn evict_function(&self, language_title: &str) {
        self.pool.evict_function(language_title).await;
    }

    /// Stops every pooled instance.
    pub async fn shutdown(&self) {
        self.pool.shutdown().await;
    }
}

/// How an invocation came by its instance.
#[derive(Debug, Clone, Copy)]
struct InstanceStart {
    /// An instance was started for it.
    cold: bool,
    /// A retained instance was replaced.
    recreated: bool,
}
