//! The execution engine: what initialize and execute do, between the HTTP
//! handlers and the runtime backends.
//!
//! ```text
//! initialize: scope -> registry (current version) -> pool.acquire (/init)
//!             -> session record; the instance is kept by the session
//!             (retain_session) or goes back to the version's idle list
//! execute:    session (owner) -> scope -> params schema -> cache L1
//!             -> instance (the session's, or from the pool) -> /run with
//!             the deadline -> cache the success -> session stats
//! ```
//!
//! The deadline is enforced here and only here: past it the instance is
//! killed and the client gets `504 TIMEOUT`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use crate::auth::Subject;
use crate::cache::{CacheKey, Layers};
use crate::error::ApiError;
use crate::language::LanguageTitle;
use crate::metrics::Metrics;
use crate::records::ExecutionLog;
use crate::registry::{FunctionVersion, Registry};
use crate::runtime::pool::{InstancePool, Lease};
use crate::runtime::{InstanceError, RunOutcome, RunRequest};
use crate::sessions::{SessionRecord, SessionStatus, SessionStore};
use crate::store::ExecutionRecord;
use crate::timefmt;

#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    pub session_ttl: Duration,
    pub max_timeout_ms: u64,
    pub cache_ttl: Duration,
    /// Longest TTL a client may ask for with `max-age`.
    pub max_cache_ttl: Duration,
}

/// `X-Cache-Control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheDirective {
    Default,
    /// Skip the lookup; the fresh result is still stored.
    NoCache,
    /// Accept a cached result at most this old; store the fresh one for this long.
    MaxAge(Duration),
}

/// The part of initialize's `context` the controller reads itself.
#[derive(Debug, Default)]
pub struct InitializeOptions {
    pub timeout_ms: Option<Value>,
    pub retain_session: bool,
    /// Everything else: passed to the function.
    pub function_context: Map<String, Value>,
}

#[derive(Debug)]
pub struct Executed {
    pub language_title: String,
    pub execution_time_ms: u64,
    pub cached: bool,
    pub result: Arc<Value>,
    /// A retained session had no live instance here (it was initialized on
    /// another controller, or its instance crashed or timed out), so a fresh
    /// one was specialised: in-memory state started over.
    pub instance_recreated: bool,
}

/// How an execution came by its instance.
#[derive(Debug, Clone, Copy)]
struct InstanceStart {
    /// An instance was started for it.
    cold: bool,
    /// A retained session's instance was replaced.
    recreated: bool,
}

/// How one execution went, for [`Engine::finish`].
struct Finished<'a> {
    subject: &'a Subject,
    started: Instant,
    started_at: OffsetDateTime,
    outcome: &'static str,
    cached: bool,
    cold_start: bool,
}

/// One session's serialisation point and, when retained, its instance.
#[derive(Default)]
struct Slot {
    lease: Option<Lease>,
}

pub struct Engine {
    pub registry: Arc<Registry>,
    pub sessions: Arc<dyn SessionStore>,
    pub cache: Layers,
    pub pool: Arc<InstancePool>,
    pub metrics: Arc<Metrics>,
    /// Where answered executions are recorded, off the request path.
    records: ExecutionLog,
    settings: EngineSettings,
    /// Per session of this process: its lock and retained instance. Executions
    /// of one session run one at a time.
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn not_found() -> ApiError {
    ApiError::NotFound("request ID not found or expired".into())
}

impl Engine {
    pub fn new(
        registry: Arc<Registry>,
        sessions: Arc<dyn SessionStore>,
        cache: Layers,
        pool: Arc<InstancePool>,
        metrics: Arc<Metrics>,
        records: ExecutionLog,
        settings: EngineSettings,
    ) -> Self {
        Engine {
            registry,
            sessions,
            cache,
            pool,
            metrics,
            records,
            settings,
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    fn slot(&self, request_id: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        self.slots
            .lock()
            .unwrap()
            .entry(request_id.to_owned())
            .or_default()
            .clone()
    }

    /// Starts a session for `language_title`, specialising an instance for it.
    pub async fn initialize(
        &self,
        subject: &Subject,
        language_title: LanguageTitle,
        options: InitializeOptions,
        request_id: Option<String>,
    ) -> Result<SessionRecord, ApiError> {
        require_execute_scope(subject, &language_title)?;
        let function = self
            .registry
            .find(language_title.as_str())
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("function '{language_title}' not found")))?
            .current;
        let timeout_ms = match &options.timeout_ms {
            // The function's default, within the controller's maximum.
            None => function.manifest.limits.timeout_ms.min(self.settings.max_timeout_ms),
            Some(v) => v
                .as_u64()
                .filter(|ms| (1..=self.settings.max_timeout_ms).contains(ms))
                .ok_or_else(|| {
                    ApiError::InvalidRequest(format!(
                        "context.timeout_ms must be an integer between 1 and {}",
                        self.settings.max_timeout_ms
                    ))
                })?,
        };
        let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());

        let lease = self.pool.acquire(&function).await.map_err(instance_error)?;
        let now = timefmt::now();
        let record = SessionRecord {
            request_id: request_id.clone(),
            owner: subject.sub.clone(),
            language_title: language_title.to_string(),
            version: function.version,
            context: Value::Object(options.function_context),
            timeout_ms,
            retain: options.retain_session,
            status: SessionStatus::Active,
            created_at: now,
            expires_at: now + self.settings.session_ttl,
            execution_count: 0,
            last_executed_at: None,
        };
        let inserted = self.sessions.insert(record.clone()).await.map_err(ApiError::Internal);
        if !matches!(inserted, Ok(true)) {
            self.pool.release(lease).await;
            inserted?;
            return Err(ApiError::Conflict(format!(
                "request ID '{request_id}' is already in use"
            )));
        }
        if record.retain {
            self.slot(&request_id).lock().await.lease = Some(lease);
        } else {
            self.pool.release(lease).await;
        }
        self.update_session_gauge().await;
        Ok(record)
    }

    /// The caller's session, or 404 (also for another subject's session).
    pub async fn session(&self, subject: &Subject, request_id: &str) -> Result<SessionRecord, ApiError> {
        match self.sessions.get(request_id).await.map_err(ApiError::Internal)? {
            Some(s) if s.owner == subject.sub => Ok(s),
            _ => Err(not_found()),
        }
    }

    /// Ends a session and releases its instance.
    pub async fn close(&self, subject: &Subject, request_id: &str) -> Result<(), ApiError> {
        self.session(subject, request_id).await?;
        self.sessions.remove(request_id).await.map_err(ApiError::Internal)?;
        self.drop_slot(request_id).await;
        self.update_session_gauge().await;
        Ok(())
    }

    /// Removes a slot nobody holds and that has no instance.
    fn forget_idle_slot(&self, request_id: &str, handle: &Arc<tokio::sync::Mutex<Slot>>) {
        let mut slots = self.slots.lock().unwrap();
        if let Some(current) = slots.get(request_id)
            && Arc::ptr_eq(current, handle)
            // Ours, plus the map's: nobody else is waiting on it.
            && Arc::strong_count(handle) == 2
            && handle.try_lock().is_ok_and(|s| s.lease.is_none())
        {
            slots.remove(request_id);
        }
    }

    async fn drop_slot(&self, request_id: &str) {
        let slot = self.slots.lock().unwrap().remove(request_id);
        if let Some(slot) = slot
            && let Some(lease) = slot.lock().await.lease.take()
        {
            self.pool.discard(lease).await;
        }
    }

    /// Runs the session's function with `params`.
    pub async fn execute(
        &self,
        subject: &Subject,
        request_id: &str,
        params: Value,
        directive: CacheDirective,
    ) -> Result<Executed, ApiError> {
        let started = Instant::now();
        let started_at = OffsetDateTime::now_utc();
        if !subject.can_execute_something() {
            return Err(ApiError::Forbidden("token has no 'execute:*' scope".into()));
        }
        // The session's lock first, then one read of the session under it: a
        // one-shot session may have completed while this request waited.
        let slot_handle = self.slot(request_id);
        let mut slot = slot_handle.lock().await;
        let session = match self.session(subject, request_id).await {
            Ok(s) => s,
            Err(e) => {
                // Unknown or foreign IDs must not leave slots behind.
                if slot.lease.is_none() {
                    drop(slot);
                    self.forget_idle_slot(request_id, &slot_handle);
                }
                return Err(e);
            }
        };
        if session.status != SessionStatus::Active {
            return Err(ApiError::NotFound(
                "session has completed its execution (retain_session was false); initialize a new one".into(),
            ));
        }
        let language_title: LanguageTitle = session
            .language_title
            .parse()
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored session title: {e}")))?;
        require_execute_scope(subject, &language_title)?;
        let function = self
            .registry
            .version(language_title.as_str(), session.version)
            .await
            .map_err(ApiError::Internal)?
            .ok_or_else(|| ApiError::NotFound(format!("function '{language_title}' no longer exists")))?;
        if !params.is_object() {
            return Err(ApiError::InvalidRequest("'params' must be a JSON object".into()));
        }
        if let Err(details) = function.validate_params(&params) {
            self.metrics
                .record_execution(language_title.as_str(), "invalid_params", started.elapsed());
            return Err(ApiError::InvalidParams {
                message: "params do not match the function's schema".into(),
                details,
            });
        }

        let key = CacheKey::new(language_title.as_str(), &function.code_hash, &params, &session.context);
        if directive != CacheDirective::NoCache {
            let max_age = match directive {
                CacheDirective::MaxAge(max) => Some(max),
                _ => None,
            };
            let hit = self.cache.get(&key, max_age).await;
            if let Some(entry) = hit {
                let done = Finished {
                    subject,
                    started,
                    started_at,
                    outcome: "cache_hit",
                    cached: true,
                    cold_start: false,
                };
                self.finish(&session, done).await;
                return Ok(Executed {
                    language_title: session.language_title,
                    execution_time_ms: started.elapsed().as_millis() as u64,
                    cached: true,
                    result: entry.result,
                    instance_recreated: false,
                });
            }
        }

        let (started_instance, outcome) = self.run(&mut slot, &session, &function, &params).await;
        let (label, result) = match outcome {
            Ok(RunOutcome::Success(value)) => ("success", Ok(Arc::new(value))),
            Ok(RunOutcome::InvalidParams { message, details }) => {
                ("invalid_params", Err(ApiError::InvalidParams { message, details }))
            }
            Ok(RunOutcome::Failed { message, details }) => {
                ("runtime_error", Err(ApiError::Runtime { message, details }))
            }
            Err(e @ ApiError::Timeout { .. }) => ("timeout", Err(e)),
            Err(e) => ("error", Err(e)),
        };
        if let Ok(value) = &result {
            let ttl = match directive {
                CacheDirective::MaxAge(ttl) => ttl.min(self.settings.max_cache_ttl),
                _ => self.settings.cache_ttl,
            };
            self.cache.put(&key, value.clone(), ttl).await;
        }
        let done = Finished {
            subject,
            started,
            started_at,
            outcome: label,
            cached: false,
            cold_start: started_instance.cold,
        };
        self.finish(&session, done).await;
        if !session.retain {
            drop(slot);
            self.slots.lock().unwrap().remove(request_id);
        }
        result.map(|result| Executed {
            language_title: session.language_title,
            execution_time_ms: started.elapsed().as_millis() as u64,
            cached: false,
            result,
            instance_recreated: started_instance.recreated,
        })
    }

    /// One run on the session's instance (retained) or a pooled one, within
    /// the deadline. Also says how the instance was come by.
    async fn run(
        &self,
        slot: &mut Slot,
        session: &SessionRecord,
        function: &FunctionVersion,
        params: &Value,
    ) -> (InstanceStart, Result<RunOutcome, ApiError>) {
        let retained = match slot.lease.take() {
            Some(mut lease) => {
                if lease.instance.is_alive() {
                    Some(lease)
                } else {
                    self.pool.discard(lease).await;
                    None
                }
            }
            None => None,
        };
        let mut info = InstanceStart {
            cold: false,
            // A retained session without a live instance here gets a fresh one.
            recreated: session.retain && retained.is_none(),
        };
        let mut lease = match retained {
            Some(lease) => lease,
            None => match self.pool.acquire(function).await {
                Ok(lease) => lease,
                Err(e) => return (info, Err(instance_error(e))),
            },
        };
        info.cold = lease.start.is_cold();
        let deadline = Duration::from_millis(session.timeout_ms);
        let request = RunRequest {
            params,
            context: &session.context,
            deadline,
        };
        let result = match tokio::time::timeout(deadline, lease.instance.run(request)).await {
            Err(_elapsed) => {
                tracing::info!(request_id = %session.request_id, instance = lease.instance.id(), "deadline passed; killing the instance");
                self.pool.discard(lease).await;
                Err(ApiError::Timeout {
                    timeout_ms: session.timeout_ms,
                })
            }
            Ok(Err(e)) => {
                tracing::warn!(request_id = %session.request_id, instance = lease.instance.id(), error = %e, "instance failed");
                self.pool.discard(lease).await;
                Err(instance_error(e))
            }
            Ok(Ok(outcome)) => {
                if session.retain {
                    slot.lease = Some(lease);
                } else {
                    self.pool.release(lease).await;
                }
                Ok(outcome)
            }
        };
        (info, result)
    }

    /// Metrics, session stats and the durable record of one answered execution.
    async fn finish(&self, session: &SessionRecord, done: Finished<'_>) {
        let elapsed = done.started.elapsed();
        self.metrics
            .record_execution(&session.language_title, done.outcome, elapsed);
        self.records.record(ExecutionRecord {
            id: uuid::Uuid::new_v4(),
            request_id: session.request_id.clone(),
            subject: done.subject.sub.clone(),
            language_title: session.language_title.clone(),
            version: session.version,
            started_at: done.started_at,
            duration_ms: elapsed.as_millis() as i64,
            outcome: done.outcome.to_owned(),
            cached: done.cached,
            cold_start: done.cold_start,
        });
        if let Err(e) = self
            .sessions
            .record_execution(&session.request_id, timefmt::now(), !session.retain)
            .await
        {
            tracing::error!(error = format!("{e:#}"), "recording the execution on the session");
        }
        if !session.retain {
            self.update_session_gauge().await;
        }
    }

    /// Forgets a deleted function's sessions and idle instances.
    pub async fn function_removed(&self, language_title: &str) {
        if let Ok(removed) = self.sessions.remove_function(language_title).await {
            for id in removed {
                self.drop_slot(&id).await;
            }
        }
        self.pool.evict_function(language_title).await;
        self.update_session_gauge().await;
    }

    /// Removes expired sessions and their instances; run periodically. Also
    /// lets go of local instances whose session is gone (ended on another
    /// replica, or expired).
    pub async fn sweep(&self) {
        match self.sessions.remove_expired(OffsetDateTime::now_utc()).await {
            Ok(expired) => {
                for id in expired {
                    self.drop_slot(&id).await;
                }
            }
            Err(e) => tracing::debug!(error = format!("{e:#}"), "sweeping sessions"),
        }
        let local: Vec<String> = self.slots.lock().unwrap().keys().cloned().collect();
        for id in local {
            if let Ok(None) = self.sessions.get(&id).await {
                self.drop_slot(&id).await;
            }
        }
        self.update_session_gauge().await;
    }

    async fn update_session_gauge(&self) {
        if let Ok(n) = self.sessions.active_count().await {
            self.metrics.active_sessions.set(n as i64);
        }
    }

    /// Terminates every instance this engine holds (retained sessions), then the pool's.
    pub async fn shutdown(&self) {
        let slots: Vec<_> = self.slots.lock().unwrap().drain().map(|(_, s)| s).collect();
        for slot in slots {
            if let Some(lease) = slot.lock().await.lease.take() {
                self.pool.discard(lease).await;
            }
        }
        self.pool.shutdown().await;
    }
}

/// 403 unless the token may execute the function's language.
fn require_execute_scope(subject: &Subject, language_title: &LanguageTitle) -> Result<(), ApiError> {
    let language = language_title.language();
    if subject.can_execute(language) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "token lacks scope 'execute:{language}' (or 'execute:all')"
        )))
    }
}

/// What a client sees when an instance (not the function) failed.
fn instance_error(e: InstanceError) -> ApiError {
    match e {
        InstanceError::Unavailable { .. } => ApiError::Unavailable(e.to_string()),
        InstanceError::Init { message, details } => ApiError::Initialization {
            message: format!("the function failed to load: {message}"),
            details,
        },
        InstanceError::Crashed { message, details } => ApiError::Runtime { message, details },
        InstanceError::ResultTooLarge { limit } => ApiError::Runtime {
            message: e.to_string(),
            details: json!({ "limit_bytes": limit }),
        },
        InstanceError::Protocol(message) => ApiError::Runtime {
            message: format!("the runtime misbehaved: {message}"),
            details: json!({}),
        },
        InstanceError::NotReady { message } => ApiError::NotReady {
            message,
            retry_after_secs: 5,
        },
        InstanceError::BuildFailed(failure) => ApiError::build_failed(failure),
    }
}
