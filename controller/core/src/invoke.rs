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
//! invoke: look_up: schema -> cache (L1, L2)
//!         invoke_looked_up: --hit--> output (cached)
//!         -> instance (retained, idle, warm, cold) -> /run within the deadline
//!         -> cache the success -> record + metrics -> output
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::artifact::BuildFailure;
use crate::cache::{CacheKey, CachedResult, Layers};
use crate::function::FunctionVersion;
use crate::logs::{Captured, LogFollowers, RunLogs};
use crate::metrics::Metrics;
use crate::records::{ExecutionRecord, RecordSink};
use crate::runtime::pool::{InstancePool, Lease};
use crate::runtime::{FileGrants, InstanceError, RunOutcome, RunRequest};
use tokio_util::sync::CancellationToken;

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
    /// Bytes of an execution's stdout and stderr kept as its logs.
    pub log_limit_bytes: usize,
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
    /// The execution's id: its record's, and its logs'. The caller chooses
    /// it so that it can name the execution whatever the outcome.
    pub execution_id: uuid::Uuid,
    /// What the function sees as its context when it differs from
    /// `context` (an asynchronous execution adds its id and attempt, which
    /// are not part of the cache key).
    pub run_context: Option<&'a Value>,
    /// Stops the run (its instance is killed) when cancelled.
    pub cancel: Option<&'a CancellationToken>,
    /// The pipeline execution this invocation is a step of.
    pub parent: Option<uuid::Uuid>,
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

/// An invocation whose params passed its function's schema, and what the
/// cache had for it ([`Invoker::look_up`]).
#[derive(Debug)]
pub struct Lookup {
    started: Instant,
    started_at: OffsetDateTime,
    /// `None` when the function's results are not cached.
    key: Option<CacheKey>,
    /// What the cache answered; `None` when it was not asked (`no-cache`).
    found: Option<Option<CachedResult>>,
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
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoreError {
    /// The params do not match the function's schema: refused before anything ran.
    #[error("{message}")]
    SchemaMismatch { message: String, details: Value },
    /// The function refused its params.
    #[error("{message}")]
    InvalidParams { message: String, details: Value },
    /// The function threw.
    #[error("{message}")]
    Runtime { message: String, details: Value },
    /// Its instance crashed (out of memory, killed) or answered something
    /// unusable: not the function's own answer, so it may be retried.
    #[error("{message}")]
    Crashed { message: String, details: Value },
    /// The run was cancelled; its instance was stopped.
    #[error("the execution was cancelled")]
    Cancelled,
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
    /// A pipeline's step failed, and so the pipeline: `source` says how.
    #[error("step '{step}' ({function}) failed: {source}")]
    Step {
        step: String,
        function: String,
        /// The step's last attempt, when it ran.
        execution_id: Option<uuid::Uuid>,
        source: Box<CoreError>,
        /// Every step's report, as the pipeline left them.
        steps: Value,
    },
}

impl CoreError {
    /// False when the invocation was refused before it ran (so a one-shot
    /// session is not spent on it).
    pub fn ran(&self) -> bool {
        !matches!(self, CoreError::SchemaMismatch { .. })
    }

    /// What went wrong at the bottom: a failed step's own error.
    pub fn root(&self) -> &CoreError {
        match self {
            CoreError::Step { source, .. } => source.root(),
            e => e,
        }
    }

    /// The outcome label of metrics and execution records.
    pub fn outcome(&self) -> &'static str {
        match self {
            CoreError::Step { source, .. } => source.outcome(),
            CoreError::SchemaMismatch { .. } | CoreError::InvalidParams { .. } => "invalid_params",
            CoreError::Runtime { .. } | CoreError::Crashed { .. } => "runtime_error",
            CoreError::Cancelled => "cancelled",
            CoreError::Timeout { .. } => "timeout",
            _ => "error",
        }
    }
}

impl From<InstanceError> for CoreError {
    /// An instance (not the function) failed.
    fn from(e: InstanceError) -> Self {
        match e {
            InstanceError::Unavailable { .. } | InstanceError::Exhausted { .. } => {
                CoreError::Unavailable(e.to_string())
            }
            InstanceError::Init { message, details } => CoreError::Initialization {
                message: format!("the function failed to load: {message}"),
                details,
            },
            InstanceError::Crashed { message, details } => CoreError::Crashed { message, details },
            InstanceError::ResultTooLarge { limit } => CoreError::Runtime {
                message: e.to_string(),
                details: json!({ "limit_bytes": limit }),
            },
            InstanceError::Protocol(message) => CoreError::Crashed {
                message: format!("the runtime misbehaved: {message}"),
                details: json!({}),
            },
            InstanceError::NotReady { message } => CoreError::NotReady { message },
            InstanceError::BuildFailed(failure) => CoreError::BuildFailed(failure),
        }
    }
}

/// A run's key to its caller's files, revoked when dropped.
struct Grant {
    token: String,
    grants: Arc<dyn FileGrants>,
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.grants.revoke(&self.token);
    }
}

/// Runs function versions: the one path every execution takes.
pub struct Invoker {
    cache: Layers,
    pool: Arc<InstancePool>,
    metrics: Arc<Metrics>,
    /// Where answered invocations are recorded, off the request path.
    records: Arc<dyn RecordSink>,
    /// Where log lines go live as they are captured.
    followers: Option<Arc<dyn LogFollowers>>,
    /// Issues each run its key to the caller's files.
    grants: Option<Arc<dyn FileGrants>>,
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
        records: Arc<dyn RecordSink>,
        settings: InvokeSettings,
    ) -> Self {
        Invoker {
            cache,
            pool,
            metrics,
            records,
            followers: None,
            grants: None,
            settings,
        }
    }

    /// Also hands every captured log line to `followers` as it comes.
    pub fn with_followers(mut self, followers: Arc<dyn LogFollowers>) -> Self {
        self.followers = Some(followers);
        self
    }

    /// Gives every run a key to its caller's files.
    pub fn with_file_grants(mut self, grants: Arc<dyn FileGrants>) -> Self {
        self.grants = Some(grants);
        self
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
        let lookup = self.look_up(&invocation).await?;
        self.invoke_looked_up(invocation, retained, lookup).await
    }

    /// The first half of [`Invoker::invoke`]: checks the params against the
    /// function's schema and asks the cache for the result. A caller may do
    /// something else meanwhile (the session layer counts the request
    /// against its rate limit in the same round trip to Redis), then
    /// finish with [`Invoker::invoke_looked_up`].
    pub async fn look_up(&self, invocation: &Invocation<'_>) -> Result<Lookup, CoreError> {
        let started = Instant::now();
        let started_at = OffsetDateTime::now_utc();
        let function = invocation.function;
        if let Err(details) = function.validate_params(invocation.params) {
            self.metrics
                .record_execution(function.language_title.as_str(), "invalid_params", started.elapsed());
            return Err(CoreError::SchemaMismatch {
                message: "params do not match the function's schema".into(),
                details,
            });
        }
        // Hashing the params and context is for the cache only.
        let key = function.manifest.cache.enabled.then(|| {
            CacheKey::new(
                function.language_title.as_str(),
                &function.code_hash,
                invocation.params,
                invocation.context,
            )
        });
        let mut found = None;
        if let Some(key) = &key
            && invocation.cache != CacheDirective::NoCache
        {
            let max_age = match invocation.cache {
                CacheDirective::MaxAge(max) => Some(max),
                _ => None,
            };
            let l1_ttl = function.manifest.cache.l1_ttl_secs.map(Duration::from_secs);
            found = Some(self.cache.get(key, max_age, l1_ttl).await);
        }
        Ok(Lookup {
            started,
            started_at,
            key,
            found,
        })
    }

    /// The second half of [`Invoker::invoke`]: the cached result when
    /// `lookup` found one, else a run (whose success is cached).
    pub async fn invoke_looked_up(
        &self,
        invocation: Invocation<'_>,
        retained: Option<&mut Retained>,
        lookup: Lookup,
    ) -> Result<Invoked, CoreError> {
        let Lookup {
            started,
            started_at,
            key,
            found,
        } = lookup;
        let function = invocation.function;
        let language_title = function.language_title.as_str();
        let policy = function.manifest.cache;
        let l1_ttl = policy.l1_ttl_secs.map(Duration::from_secs);
        if let Some(found) = found {
            self.metrics.record_function_cache(language_title, found.is_some());
            if let Some(entry) = found {
                self.record(&invocation, started, started_at, "cache_hit", true, false, None);
                return Ok(Invoked {
                    result: entry.result,
                    cached: true,
                    cold_start: false,
                    instance_recreated: false,
                });
            }
        }

        let mut logs = RunLogs::new(self.settings.log_limit_bytes);
        if let Some(followers) = &self.followers {
            logs = logs.followed(followers.clone(), language_title, &invocation.execution_id.to_string());
        }
        let logs = Arc::new(logs);
        let (start, outcome) = self.run(&invocation, retained, &logs).await;
        let result = match outcome {
            Ok(RunOutcome::Success(value)) => Ok(Arc::new(value)),
            Ok(RunOutcome::InvalidParams { message, details }) => Err(CoreError::InvalidParams { message, details }),
            Ok(RunOutcome::Failed { message, details }) => Err(CoreError::Runtime { message, details }),
            Err(e) => Err(e),
        };
        if let Ok(value) = &result
            && let Some(key) = &key
        {
            // The client's max-age, else the function's TTL, else the
            // controller's; never over the controller's maximum.
            let ttl = match (invocation.cache, policy.ttl_secs) {
                (CacheDirective::MaxAge(ttl), _) => ttl,
                (_, Some(secs)) => Duration::from_secs(secs),
                _ => self.settings.cache_ttl,
            };
            self.cache
                .put(key, value.clone(), ttl.min(self.settings.max_cache_ttl), l1_ttl)
                .await;
        }
        let label = match &result {
            Ok(_) => "success",
            Err(e) => e.outcome(),
        };
        let captured = logs.take();
        let captured = (!captured.is_empty()).then(|| Arc::new(captured));
        self.record(&invocation, started, started_at, label, false, start.cold, captured);
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
        logs: &Arc<RunLogs>,
    ) -> (InstanceStart, Result<RunOutcome, CoreError>) {
        let kept = match retained.as_mut().and_then(|slot| slot.0.take()) {
            Some(mut lease) => {
                if lease.instance.is_running() {
                    Some(lease)
                } else {
                    self.pool.discard(lease).await;
                    None
                }
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
        // Ends with the run, however it ends (a cancelled run is dropped).
        let grants = self.grants.as_ref().filter(|_| lease.instance.reaches_files());
        let grant = grants.map(|grants| Grant {
            token: grants.grant(invocation.origin.subject),
            grants: grants.clone(),
        });
        let request = RunRequest {
            files_token: grant.as_ref().map(|g| g.token.as_str()),
            params: invocation.params,
            context: invocation.run_context.unwrap_or(invocation.context),
            deadline: invocation.deadline,
            logs: Some(logs),
        };
        let request_id = invocation.origin.request_id;
        let cancelled = async {
            match invocation.cancel {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let run = tokio::time::timeout(invocation.deadline, lease.instance.run(request));
        let ran = tokio::select! {
            ran = run => ran,
            () = cancelled => {
                tracing::info!(request_id, instance = lease.instance.id(), "cancelled; stopping the instance");
                self.pool.discard(lease).await;
                return (start, Err(CoreError::Cancelled));
            }
        };
        let result = match ran {
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
                if let InstanceError::Crashed { details, .. } = &e
                    && details["out_of_memory"] == true
                {
                    self.metrics.record_oom_kill(invocation.function.language());
                }
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

    /// Metrics and the durable record of one answered invocation (also
    /// of one an adapter ran itself: a pipeline's).
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        invocation: &Invocation<'_>,
        started: Instant,
        started_at: OffsetDateTime,
        outcome: &'static str,
        cached: bool,
        cold_start: bool,
        logs: Option<Arc<Captured>>,
    ) {
        let elapsed = started.elapsed();
        let function = invocation.function;
        self.metrics
            .record_execution(function.language_title.as_str(), outcome, elapsed);
        self.records.record(ExecutionRecord {
            id: invocation.execution_id,
            request_id: invocation.origin.request_id.to_owned(),
            subject: invocation.origin.subject.to_owned(),
            language_title: function.language_title.to_string(),
            version: function.version,
            started_at,
            duration_ms: elapsed.as_millis() as i64,
            outcome: outcome.to_owned(),
            cached,
            cold_start,
            parent_id: invocation.parent,
            logs,
        });
    }

    /// Stops the idle instances of every version of a function (it was
    /// updated or deleted: they will not be asked for again).
    pub async fn evict_function(&self, language_title: &str) {
        self.pool.evict_function(language_title).await;
    }

    /// Stops the idle instances of one deleted version of a function.
    pub async fn evict_version(&self, language_title: &str, version: i64) {
        self.pool.evict_version(language_title, version).await;
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

#[cfg(test)]
mod tests {
    //! The core against the fake backend: what the deadline, a crash, a
    //! failing `/init`, the cache and concurrent callers do to instances.

    use std::sync::atomic::Ordering;

    use serde_json::json;

    use super::*;
    use crate::cache::memory::MemoryCache;
    use crate::function::FunctionSpec;
    use crate::language::Language;
    use crate::runtime::fake::{Counters, FakeBackend};
    use crate::runtime::placement::Placement;
    use crate::runtime::pool::PoolConfig;

    struct Harness {
        core: Arc<Invoker>,
        counters: Arc<Counters>,
        records: Arc<Collected>,
    }

    /// Keeps every record, for the tests to read.
    #[derive(Default)]
    struct Collected(std::sync::Mutex<Vec<ExecutionRecord>>);

    impl RecordSink for Collected {
        fn record(&self, record: ExecutionRecord) {
            self.0.lock().unwrap().push(record);
        }
    }

    async fn harness() -> Harness {
        let records = Arc::new(Collected::default());
        let backend = Arc::new(FakeBackend::default());
        let counters = backend.counters.clone();
        let metrics = Arc::new(Metrics::new());
        let config = PoolConfig {
            warm_per_language: 0,
            warm_memory_mb: crate::function::manifest::DEFAULT_MEMORY_MB,
            keep_warm: Duration::from_secs(60),
            max_idle_per_version: 8,
            room_wait: Duration::from_secs(30),
        };
        let pool = InstancePool::new(Arc::new(Placement::single(backend)), config, metrics.clone());
        let cache = Layers::new(vec![Arc::new(MemoryCache::new(1 << 20))], metrics.clone());
        let settings = InvokeSettings {
            cache_ttl: Duration::from_secs(60),
            max_cache_ttl: Duration::from_secs(600),
            log_limit_bytes: 64 * 1024,
        };
        Harness {
            core: Arc::new(Invoker::new(cache, pool, metrics, records.clone(), settings)),
            counters,
            records,
        }
    }

    fn function(code: &str) -> FunctionVersion {
        let spec = FunctionSpec {
            description: "a fake function".into(),
            ..Default::default()
        };
        let manifest = spec.normalize(Language::Nodejs).unwrap();
        let hash = manifest.code_hash(code);
        FunctionVersion::new(
            "nodejs-fake".parse().unwrap(),
            1,
            manifest,
            code.into(),
            hash,
            OffsetDateTime::now_utc(),
        )
        .unwrap()
    }

    static CONTEXT: Value = Value::Null;

    fn invocation<'a>(function: &'a FunctionVersion, params: &'a Value, deadline_ms: u64) -> Invocation<'a> {
        Invocation {
            function,
            params,
            context: &CONTEXT,
            deadline: Duration::from_millis(deadline_ms),
            cache: CacheDirective::NoCache,
            origin: Origin {
                request_id: "test",
                subject: "tester",
            },
            execution_id: uuid::Uuid::new_v4(),
            run_context: None,
            cancel: None,
            parent: None,
        }
    }

    #[tokio::test]
    async fn an_instance_given_back_after_its_function_was_evicted_is_stopped() {
        let h = harness().await;
        let f = function("ok");
        let mut before = Retained::default();
        h.core.prepare(&f, Some(&mut before)).await.unwrap();

        // The function is deleted while the instance is out.
        h.core.evict_function("nodejs-fake").await;
        h.core.release(before).await;

        assert_eq!(h.counters.terminated.load(Ordering::SeqCst), 1, "kept idle for no one");
        // One handed out after the eviction goes back idle as usual.
        let mut after = Retained::default();
        h.core.prepare(&f, Some(&mut after)).await.unwrap();
        let id = after.0.as_ref().unwrap().instance.id().to_owned();
        h.core.release(after).await;
        assert_eq!(h.counters.terminated.load(Ordering::SeqCst), 1);
        let ok = h.core.invoke(invocation(&f, &json!({}), 1000), None).await.unwrap();
        assert_eq!(ok.result["instance"], id.as_str(), "the idle instance serves");
    }

    #[tokio::test]
    async fn evicting_a_version_stops_its_idle_instances_and_no_other_versions() {
        let h = harness().await;
        let v1 = function("ok");
        let mut v2 = function("ok too");
        v2.version = 2;
        for f in [&v1, &v2] {
            h.core.invoke(invocation(f, &json!({}), 1000), None).await.unwrap();
        }

        h.core.evict_version("nodejs-fake", 1).await;

        assert_eq!(
            h.counters.terminated.load(Ordering::SeqCst),
            1,
            "version 1's idle instance"
        );
        let ok = h.core.invoke(invocation(&v2, &json!({}), 1000), None).await.unwrap();
        assert_eq!(ok.result["instance"], "fake-1", "version 2's idle instance serves");
    }

    #[tokio::test]
    async fn a_run_past_its_deadline_is_a_timeout_and_its_instance_is_stopped() {
        let h = harness().await;
        let f = function("ok");
        let slow = json!({"sleep_ms": 10_000});

        let started = Instant::now();
        let r = h.core.invoke(invocation(&f, &slow, 100), None).await;

        assert!(matches!(r, Err(CoreError::Timeout { timeout_ms: 100 })), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(h.counters.terminated.load(Ordering::SeqCst), 1);
        // The next invocation gets a fresh instance.
        let ok = h.core.invoke(invocation(&f, &json!({}), 1000), None).await.unwrap();
        assert_eq!(ok.result["instance"], "fake-1");
        assert!(ok.cold_start);
    }

    #[tokio::test]
    async fn a_crash_mid_run_is_a_crash_and_a_retained_session_gets_a_new_instance() {
        let h = harness().await;
        let f = function("ok");
        let mut retained = Retained::default();
        let first = h
            .core
            .invoke(invocation(&f, &json!({}), 1000), Some(&mut retained))
            .await
            .unwrap();
        let second = h
            .core
            .invoke(invocation(&f, &json!({}), 1000), Some(&mut retained))
            .await
            .unwrap();
        assert_eq!(
            (first.result["runs"].clone(), second.result["runs"].clone()),
            (json!(1), json!(2))
        );

        let crashed = h
            .core
            .invoke(invocation(&f, &json!({"crash": true}), 1000), Some(&mut retained))
            .await;
        assert!(matches!(crashed, Err(CoreError::Crashed { .. })), "{crashed:?}");
        assert!(retained.is_empty(), "a crashed instance is not kept");

        let after = h
            .core
            .invoke(invocation(&f, &json!({}), 1000), Some(&mut retained))
            .await
            .unwrap();
        assert!(after.instance_recreated);
        assert_eq!(after.result["runs"], 1, "state started over");
        assert_ne!(after.result["instance"], first.result["instance"]);
    }

    #[tokio::test]
    async fn a_function_that_fails_to_load_is_an_initialization_error_and_its_instance_is_stopped() {
        let h = harness().await;
        let f = function("fail-init");
        let r = h.core.invoke(invocation(&f, &json!({}), 1000), None).await;
        match r {
            Err(CoreError::Initialization { message, details }) => {
                assert!(message.contains("fail-init"), "{message}");
                assert_eq!(details, json!({"line": 1}));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(h.counters.started.load(Ordering::SeqCst), 1);
        assert_eq!(h.counters.terminated.load(Ordering::SeqCst), 1);
        assert_eq!(h.counters.runs.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn params_that_miss_the_schema_are_refused_before_anything_runs() {
        let h = harness().await;
        let spec: FunctionSpec = serde_json::from_value(json!({
            "description": "typed",
            "schema": {"params": {"type": "object", "required": ["n"]}}
        }))
        .unwrap();
        let manifest = spec.normalize(Language::Nodejs).unwrap();
        let f = FunctionVersion::new(
            "nodejs-typed".parse().unwrap(),
            1,
            manifest,
            "ok".into(),
            "h".into(),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        let r = h.core.invoke(invocation(&f, &json!({}), 1000), None).await;
        assert!(
            matches!(&r, Err(e @ CoreError::SchemaMismatch { .. }) if !e.ran()),
            "{r:?}"
        );
        assert_eq!(h.counters.started.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_cached_result_is_served_without_an_instance_and_errors_are_never_cached() {
        let h = harness().await;
        let f = function("ok");
        let params = json!({"n": 1});
        let mut cached = invocation(&f, &params, 1000);
        cached.cache = CacheDirective::Default;
        let first = h.core.invoke(cached, None).await.unwrap();
        let second = h.core.invoke(cached, None).await.unwrap();
        assert!(!first.cached && second.cached);
        assert_eq!(first.result, second.result);
        assert_eq!(h.counters.runs.load(Ordering::SeqCst), 1);

        let crash = json!({"crash": true});
        let mut failing = invocation(&f, &crash, 1000);
        failing.cache = CacheDirective::Default;
        assert!(h.core.invoke(failing, None).await.is_err());
        assert!(h.core.invoke(failing, None).await.is_err());
        assert_eq!(h.counters.runs.load(Ordering::SeqCst), 3, "a failure is run again");
        let outcomes: Vec<_> = h
            .records
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.outcome.clone(), r.cached))
            .collect();
        let expected = [
            ("success", false),
            ("cache_hit", true),
            ("runtime_error", false),
            ("runtime_error", false),
        ];
        assert_eq!(
            outcomes,
            expected.map(|(o, c)| (o.to_owned(), c)),
            "one record per answered invocation"
        );
    }

    #[tokio::test]
    async fn concurrent_invocations_never_share_an_instance() {
        let h = harness().await;
        let f = Arc::new(function("ok"));
        // One instance specialised ahead, as initialize does.
        h.core.prepare(&f, None).await.unwrap();
        let runs = (0..12).map(|_| {
            let core = h.core.clone();
            let f = f.clone();
            tokio::spawn(async move {
                let params = json!({"sleep_ms": 30});
                core.invoke(invocation(&f, &params, 5000), None).await
            })
        });
        for run in futures::future::join_all(runs).await {
            run.unwrap().unwrap();
        }
        assert!(
            !h.counters.overlapped.load(Ordering::SeqCst),
            "two runs shared an instance"
        );
        assert_eq!(h.counters.runs.load(Ordering::SeqCst), 12);
        assert!(h.counters.started.load(Ordering::SeqCst) > 1);
    }
}
