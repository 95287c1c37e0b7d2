//! The session layer: initialize, execute and close over the invocation
//! core ([`crate::invoke`]). It owns session records, the instances that
//! retained sessions keep, and the serialisation of one session's
//! executions; everything about running a function (schema, cache,
//! instances, the deadline, records, metrics) is the core's.
//!
//! ```text
//! initialize: scope -> registry (current version) -> core.prepare (/init)
//!             -> session record; the instance is kept by the session
//!             (retain_session) or goes back to the version's idle list
//! execute:    session lock -> session (owner; a retained one's record is
//!             kept here, any other read beside the rate limit) -> scope
//!             -> admission (limit + count) beside core.look_up (schema,
//!             cache) -> core.invoke_looked_up (with the session's retained
//!             instance)
//! ```
//!
//! A pipeline's session runs [`crate::pipelines`] instead of one invocation:
//! the caller needs the scope of every step's language too, nothing is
//! retained, and the session shows the running steps (`progress`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::admission::{Admitted, Gate, SessionCheck};
use crate::auth::Subject;
use crate::error::ApiError;
use crate::pipelines::{Pipelines, StepBoard, StepReport, StepsView};
use crate::registry::Registry;
use crate::sessions::{SessionRecord, SessionStatus, SessionStore, session_key};
use fnrt_core::function::FunctionVersion;
use fnrt_core::invoke::{CacheDirective, CoreError, Invocation, Invoker, Lookup, Origin, Retained};
use fnrt_core::language::{Language, LanguageTitle};
use fnrt_core::metrics::Metrics;
use fnrt_core::timefmt;

#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    pub session_ttl: Duration,
    pub max_timeout_ms: u64,
    /// Retained sessions (each holds an instance) one subject may keep on
    /// this controller (`MAX_SESSIONS_PER_SUBJECT`).
    pub max_retained_per_subject: usize,
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
    /// The execution's id: its logs are at `/api/v1/executions/{id}/logs`.
    pub execution_id: uuid::Uuid,
    pub language_title: String,
    pub execution_time_ms: u64,
    pub cached: bool,
    pub result: Arc<Value>,
    /// A retained session had no live instance here (it was initialized on
    /// another controller, or its instance crashed or timed out), so a fresh
    /// one was specialised: in-memory state started over.
    pub instance_recreated: bool,
    /// A pipeline's steps.
    pub steps: Option<Vec<StepReport>>,
}

/// How one run (a function's invocation or a pipeline's) went.
#[derive(Debug)]
pub struct Outcome {
    pub result: Arc<Value>,
    pub cached: bool,
    pub cold_start: bool,
    pub instance_recreated: bool,
    /// A pipeline's steps.
    pub steps: Option<Vec<StepReport>>,
}

/// A retained session counted against its subject's cap
/// ([`Engine::reserve`]): given back when dropped, unless kept.
struct Hold<'a> {
    engine: &'a Engine,
    key: Option<String>,
}

impl Hold<'_> {
    /// The session is kept: its count stays until its slot is dropped.
    fn keep(mut self) {
        self.key = None;
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.engine.unhold(&key);
        }
    }
}

/// One session's serialisation point and, when retained, its instance.
#[derive(Default)]
struct Slot {
    retained: Retained,
    /// A retained session's record, as initialize wrote it or as read here
    /// once: it does not change but for its counts, so an execute needs no
    /// read of it (its admission checks that the session still exists).
    record: Option<Arc<SessionRecord>>,
}

pub struct Engine {
    pub registry: Arc<Registry>,
    pub sessions: Arc<dyn SessionStore>,
    /// Runs the functions.
    pub core: Arc<Invoker>,
    pub metrics: Arc<Metrics>,
    settings: EngineSettings,
    /// Per session of this process: its lock and retained instance. Executions
    /// of one session run one at a time.
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
    /// The keys of the retained sessions holding (or about to hold) an
    /// instance here: counted per subject against
    /// [`EngineSettings::max_retained_per_subject`].
    held: Mutex<HashSet<String>>,
    pub pipelines: Pipelines,
    /// The steps of each session's pipeline while it runs here.
    live: Mutex<HashMap<String, StepsView>>,
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
        core: Arc<Invoker>,
        metrics: Arc<Metrics>,
        settings: EngineSettings,
    ) -> Self {
        Engine {
            registry,
            sessions,
            pipelines: Pipelines::new(core.clone(), metrics.clone()),
            core,
            metrics,
            settings,
            slots: Mutex::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
            live: Mutex::new(HashMap::new()),
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
        let function = self.runnable(subject, &language_title).await?;
        let timeout_ms = self.timeout_ms(&function, options.timeout_ms.as_ref())?;
        let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // Counted before an instance is readied for it; given back unless
        // the session is kept.
        let mut hold = match options.retain_session && holds_instance(&function) {
            true => Some(self.reserve(&subject.sub, &request_id)?),
            false => None,
        };

        let mut retained = Retained::default();
        if function.pipeline().is_some() {
            // Each step's instance readied; a pipeline keeps none.
            let steps = self.pipeline_steps(subject, &function).await?;
            self.prepare_steps(&function, &steps).await?;
        } else {
            self.core.prepare(&function, Some(&mut retained)).await?;
        }
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
            self.core.release(retained).await;
            inserted?;
            return Err(ApiError::Conflict(format!(
                "request ID '{request_id}' is already in use"
            )));
        }
        // A delete while the instance was readied may have ended the
        // function's sessions before this one was written; had it, the
        // session would live on, and run whatever is registered under the
        // name next. Its own check comes after the registry forgets the
        // function, this one after the session is written: one of the two
        // sees the other.
        let current = self.registry.get(language_title.as_str());
        if current.is_none_or(|f| f.current.registration != function.registration) {
            if let Err(e) = self.sessions.remove(&record.key()).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    request_id,
                    "removing a deleted function's session"
                );
            }
            self.core.release(retained).await;
            return Err(ApiError::NotFound(format!(
                "function '{language_title}' was deleted while the session started"
            )));
        }
        if record.retain {
            let slot = self.slot(&record.key());
            let mut slot = slot.lock().await;
            slot.retained = retained;
            slot.record = Some(Arc::new(record.clone()));
            if let Some(hold) = hold.take() {
                hold.keep();
            }
        } else {
            self.core.release(retained).await;
        }
        Ok(record)
    }

    /// The current version of a function `subject` may run: 403 without
    /// the scope, 404 (with the likeliest meant name) when there is none.
    pub async fn runnable(
        &self,
        subject: &Subject,
        language_title: &LanguageTitle,
    ) -> Result<Arc<fnrt_core::function::FunctionVersion>, ApiError> {
        require_execute_scope(subject, language_title)?;
        Ok(self
            .registry
            .find(language_title.as_str())
            .await?
            .ok_or_else(|| {
                // A typo's likely meaning, among the functions the caller may run.
                let runnable = |name: &str| {
                    name.parse::<LanguageTitle>()
                        .is_ok_and(|t| subject.can_execute(t.language()))
                };
                match self.registry.closest(language_title.as_str(), runnable) {
                    Some(near) => {
                        ApiError::NotFound(format!("function '{language_title}' not found; did you mean '{near}'?"))
                    }
                    None => ApiError::NotFound(format!(
                        "function '{language_title}' not found (GET /api/v1/functions lists them)"
                    )),
                }
            })?
            .current)
    }

    /// The current versions of a pipeline's steps, once the caller may run
    /// each (403 naming the step otherwise; 404 when one is gone).
    pub async fn pipeline_steps(
        &self,
        subject: &Subject,
        function: &FunctionVersion,
    ) -> Result<Vec<Arc<FunctionVersion>>, ApiError> {
        let Some(pipeline) = function.pipeline() else {
            return Ok(Vec::new());
        };
        for step in &pipeline.steps {
            let language = step.function.split('-').next().unwrap_or_default();
            if !language.parse().is_ok_and(|l| subject.can_execute(l)) {
                return Err(ApiError::Forbidden(format!(
                    "token lacks scope 'execute:{language}' (or 'execute:all'), which step '{}' ({}) needs",
                    step.name, step.function
                )));
            }
        }
        self.pipeline_functions(function).await
    }

    /// The current versions of a pipeline's steps (none for a function);
    /// 404 when one is gone.
    pub async fn pipeline_functions(&self, function: &FunctionVersion) -> Result<Vec<Arc<FunctionVersion>>, ApiError> {
        let Some(pipeline) = function.pipeline() else {
            return Ok(Vec::new());
        };
        let mut found = Vec::with_capacity(pipeline.steps.len());
        for step in &pipeline.steps {
            let entry = self.registry.find(&step.function).await?.ok_or_else(|| {
                ApiError::NotFound(format!(
                    "step '{}' of '{}': function '{}' no longer exists",
                    step.name, function.language_title, step.function
                ))
            })?;
            found.push(entry.current);
        }
        Ok(found)
    }

    /// Readies an instance of each step's function (at most once each), so
    /// that the first execute does not wait for cold starts.
    async fn prepare_steps(&self, pipeline: &FunctionVersion, steps: &[Arc<FunctionVersion>]) -> Result<(), ApiError> {
        let names = pipeline.pipeline().map(|p| p.steps.as_slice()).unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        let prepared = futures::future::join_all(
            steps
                .iter()
                .zip(names)
                .filter(|(f, _)| seen.insert(f.language_title.clone()))
                .map(|(f, step)| async move { (step, self.core.prepare(f, None).await) }),
        )
        .await;
        for (step, result) in prepared {
            if let Err(e) = result {
                return Err(ApiError::from(CoreError::Step {
                    step: step.name.clone(),
                    function: step.function.clone(),
                    execution_id: None,
                    source: Box::new(e),
                    steps: Value::Null,
                }));
            }
        }
        Ok(())
    }

    /// Runs `invocation`: a pipeline through its `steps`, anything else
    /// through the core (on the retained instance when given; after
    /// `lookup` when the cache was asked already).
    pub async fn run(
        &self,
        invocation: Invocation<'_>,
        retained: Option<&mut Retained>,
        steps: &[Arc<FunctionVersion>],
        board: Option<&StepBoard>,
        lookup: Option<Lookup>,
    ) -> Result<Outcome, CoreError> {
        if invocation.function.pipeline().is_some() {
            let ran = self.pipelines.run(invocation, steps, board).await?;
            return Ok(Outcome {
                result: ran.output,
                cached: false,
                cold_start: ran.cold_start,
                instance_recreated: false,
                steps: Some(ran.steps),
            });
        }
        let invoked = match lookup {
            Some(lookup) => self.core.invoke_looked_up(invocation, retained, lookup).await?,
            None => self.core.invoke(invocation, retained).await?,
        };
        Ok(Outcome {
            result: invoked.result,
            cached: invoked.cached,
            cold_start: invoked.cold_start,
            instance_recreated: invoked.instance_recreated,
            steps: None,
        })
    }

    /// A session's pipeline run in progress here: `progress` and `steps`.
    pub fn live_progress(&self, subject: &Subject, request_id: &str) -> Option<Value> {
        let live = self
            .live
            .lock()
            .unwrap()
            .get(&session_key(&subject.sub, request_id))
            .cloned()?;
        let steps = live.snapshot();
        Some(serde_json::json!({
            "progress": crate::pipelines::progress_of(&steps),
            "steps": steps,
        }))
    }

    /// A run's timeout: `timeout_ms` of the context when given (within
    /// the controller's maximum), else the function's default.
    pub fn timeout_ms(
        &self,
        function: &fnrt_core::function::FunctionVersion,
        given: Option<&Value>,
    ) -> Result<u64, ApiError> {
        Ok(match given {
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
        })
    }

    /// The caller's session, or 404 (also for another subject's session).
    pub async fn session(&self, subject: &Subject, request_id: &str) -> Result<SessionRecord, ApiError> {
        let key = session_key(&subject.sub, request_id);
        match self.sessions.get(&key).await.map_err(ApiError::Internal)? {
            Some(s) if s.owner == subject.sub => Ok(s),
            _ => Err(not_found()),
        }
    }

    /// The caller's unexpired sessions that match the filters, newest first,
    /// one page of them (`page` from 1), and how many match in all.
    pub async fn sessions(
        &self,
        subject: &Subject,
        status: Option<SessionStatus>,
        language_title: Option<&str>,
        page: usize,
        per_page: usize,
    ) -> Result<(usize, Vec<SessionRecord>), ApiError> {
        let mut sessions = self.sessions.list(&subject.sub).await.map_err(ApiError::Internal)?;
        sessions.retain(|s| {
            status.is_none_or(|st| s.status == st) && language_title.is_none_or(|lt| s.language_title == lt)
        });
        // Times are whole seconds: the request ID breaks ties, so pages stay put.
        sessions.sort_by(|a, b| (b.created_at, &b.request_id).cmp(&(a.created_at, &a.request_id)));
        let total = sessions.len();
        let page = sessions
            .into_iter()
            .skip(page.saturating_sub(1).saturating_mul(per_page))
            .take(per_page)
            .collect();
        Ok((total, page))
    }

    /// Ends a session and releases its instance.
    pub async fn close(&self, subject: &Subject, request_id: &str) -> Result<(), ApiError> {
        let key = self.session(subject, request_id).await?.key();
        self.sessions.remove(&key).await.map_err(ApiError::Internal)?;
        self.drop_slot(&key).await;
        Ok(())
    }

    /// Counts a retained session of `owner`'s about to hold an instance
    /// here: [`ApiError::TooMany`] when it holds as many as it may. The
    /// count is given back when the [`Hold`] drops, unless kept.
    fn reserve(&self, owner: &str, request_id: &str) -> Result<Hold<'_>, ApiError> {
        let key = session_key(owner, request_id);
        let prefix = format!("{}.", crate::sessions::owner_hash(owner));
        let mut held = self.held.lock().unwrap();
        if held.contains(&key) {
            // A live session's ID asked for again (409 below): its count
            // is that session's, not this request's to give back.
            return Ok(Hold {
                engine: self,
                key: None,
            });
        }
        let max = self.settings.max_retained_per_subject;
        if held.iter().filter(|k| k.starts_with(&prefix)).count() >= max {
            return Err(ApiError::TooMany {
                message: format!(
                    "you hold {max} retained sessions on this controller (MAX_SESSIONS_PER_SUBJECT), each keeping an \
                     instance: end one (DELETE /api/v1/sessions/{{request_id}}) or let one expire"
                ),
                retry_after_secs: 30,
            });
        }
        held.insert(key.clone());
        Ok(Hold {
            engine: self,
            key: Some(key),
        })
    }

    /// A retained session's instance is no longer held here.
    fn unhold(&self, key: &str) {
        self.held.lock().unwrap().remove(key);
    }

    /// Removes a slot nobody holds and that has no instance.
    fn forget_idle_slot(&self, request_id: &str, handle: &Arc<tokio::sync::Mutex<Slot>>) {
        let mut slots = self.slots.lock().unwrap();
        if let Some(current) = slots.get(request_id)
            && Arc::ptr_eq(current, handle)
            // Ours, plus the map's: nobody else is waiting on it.
            && Arc::strong_count(handle) == 2
            && handle.try_lock().is_ok_and(|s| s.retained.is_empty())
        {
            slots.remove(request_id);
            self.unhold(request_id);
        }
    }

    async fn drop_slot(&self, request_id: &str) {
        self.unhold(request_id);
        let slot = self.slots.lock().unwrap().remove(request_id);
        if let Some(slot) = slot {
            let retained = std::mem::take(&mut slot.lock().await.retained);
            self.core.discard(retained).await;
        }
    }

    /// Runs the session's function with `params`. A failure of a run
    /// that happened names its execution (its logs tell why).
    ///
    /// `gate`: the request's admission (its rate limit), passed here once:
    /// beside the cache lookup, with the session's count, for a retained
    /// session whose record this controller keeps; beside the session's
    /// read otherwise; before any refusal (429 comes first).
    pub async fn execute(
        &self,
        subject: &Subject,
        request_id: &str,
        params: Value,
        directive: CacheDirective,
        gate: Gate<'_>,
    ) -> Result<Executed, (ApiError, Option<uuid::Uuid>)> {
        let execution_id = fnrt_core::records::new_execution_id();
        let mut gate = Some(gate);
        let ran = self
            .execute_as(subject, request_id, params, directive, execution_id, &mut gate)
            .await;
        match (ran, gate) {
            (Err(refused), Some(gate)) => Err((gate.refuse(refused).await, None)),
            (Err(refused), None) => Err((refused, None)),
            (Ok(ran), gate) => {
                debug_assert!(gate.is_none(), "an execute ran without passing its gate");
                ran.map_err(|failed| (failed, Some(execution_id)))
            }
        }
    }

    /// Err: refused before anything ran; Ok: how the run went (`gate` was
    /// passed).
    async fn execute_as(
        &self,
        subject: &Subject,
        request_id: &str,
        params: Value,
        directive: CacheDirective,
        execution_id: uuid::Uuid,
        gate: &mut Option<Gate<'_>>,
    ) -> Result<Result<Executed, ApiError>, ApiError> {
        let started = std::time::Instant::now();
        require_some_execute_scope(subject)?;
        // The session's lock first, then the session: a one-shot session may
        // have completed while this request waited. A retained session's
        // record this controller keeps needs no read (see `Slot::record`);
        // any other is read beside the request's limit.
        let key = session_key(&subject.sub, request_id);
        let slot_handle = self.slot(&key);
        let mut slot = slot_handle.lock().await;
        let kept = slot
            .record
            .clone()
            .filter(|s| s.owner == subject.sub && !s.is_expired(OffsetDateTime::now_utc()));
        let session = match kept {
            Some(s) => Ok(s),
            None => {
                let admitted = async {
                    match gate.take() {
                        Some(gate) => gate.pass(None).await,
                        None => Admitted::Yes,
                    }
                };
                match tokio::join!(admitted, self.session(subject, request_id)) {
                    (Admitted::Limited(retry_after_secs), _) => Err(ApiError::RateLimited { retry_after_secs }),
                    (_, session) => session.map(Arc::new),
                }
            }
        };
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                // Unknown IDs must not leave slots behind.
                if slot.retained.is_empty() {
                    drop(slot);
                    self.forget_idle_slot(&key, &slot_handle);
                }
                return Err(e);
            }
        };
        let first_seen = session.retain && slot.record.is_none();
        if first_seen {
            slot.record = Some(session.clone());
        }
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
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "function '{language_title}' version {} no longer exists (deleted); initialize a new session",
                    session.version
                ))
            })?;
        if first_seen && holds_instance(&function) {
            // Initialized on another controller: it holds an instance here now.
            self.held.lock().unwrap().insert(key.clone());
        }
        if !params.is_object() {
            return Err(ApiError::InvalidRequest("'params' must be a JSON object".into()));
        }
        let steps = self.pipeline_steps(subject, &function).await?;

        let invocation = Invocation {
            function: &function,
            params: &params,
            context: &session.context,
            deadline: Duration::from_millis(session.timeout_ms),
            cache: directive,
            origin: Origin {
                request_id,
                subject: &subject.sub,
            },
            execution_id,
            run_context: None,
            cancel: None,
            parent: None,
        };
        // A retained session counts what its schema accepts: what runs (or
        // is served from the cache), not what is refused.
        let counts = session.retain && function.accepts(&params);
        // Not admitted yet (the session was kept here): the limit and the
        // count go together, beside the cache lookup (with Redis, one round
        // trip for a cached result).
        let mut lookup = None;
        let counted = match gate.take() {
            Some(gate) => {
                let check = SessionCheck {
                    key: &key,
                    count: counts,
                };
                // Params the schema refuses are looked at after the verdict
                // (in the run below): a request over the limit records no
                // execution of any outcome.
                let looking = async {
                    match function.pipeline() {
                        None if counts => Some(self.core.look_up(&invocation).await),
                        _ => None,
                    }
                };
                let (admitted, looked) = tokio::join!(gate.pass(Some(check)), looking);
                match admitted {
                    Admitted::Yes => {}
                    Admitted::Limited(retry_after_secs) => return Err(ApiError::RateLimited { retry_after_secs }),
                    Admitted::SessionGone => {
                        // Closed, expired or deleted elsewhere: forget it here too.
                        drop(slot);
                        self.drop_slot(&key).await;
                        return Err(not_found());
                    }
                }
                lookup = looked.transpose()?;
                counts
            }
            None => false,
        };
        let retained = session.retain.then_some(&mut slot.retained);
        let live = function.pipeline().map(|_| {
            let board = StepBoard::default();
            self.live.lock().unwrap().insert(key.clone(), board.view());
            board
        });
        // Otherwise a retained session's count is kept while the function
        // runs (with Redis, a round trip off the answer's path). A one-shot
        // session is completed after its run, which may still be refused.
        let record_early = counts && !counted;
        let record = async {
            if record_early {
                self.record_execution(&key, false).await;
            }
        };
        let (invoked, ()) = tokio::join!(self.run(invocation, retained, &steps, live.as_ref(), lookup), record);
        if live.is_some() {
            self.live.lock().unwrap().remove(&key);
        }
        if invoked.as_ref().is_err_and(|e| !e.ran()) {
            // Refused before it ran: the session is not spent.
            return Err(invoked.unwrap_err().into());
        }
        if !record_early && !counted {
            self.record_execution(&key, !session.retain).await;
        }
        if !session.retain {
            drop(slot);
            self.slots.lock().unwrap().remove(&key);
        }
        Ok(invoked.map_err(ApiError::from).map(|invoked| Executed {
            execution_id,
            language_title: session.language_title.clone(),
            execution_time_ms: started.elapsed().as_millis() as u64,
            cached: invoked.cached,
            result: invoked.result,
            instance_recreated: invoked.instance_recreated,
            steps: invoked.steps,
        }))
    }

    /// Counts an execution on the session; `complete` ends a one-shot one.
    /// A failure is logged: the execution happened either way.
    async fn record_execution(&self, key: &str, complete: bool) {
        if let Err(e) = self.sessions.record_execution(key, timefmt::now(), complete).await {
            tracing::error!(error = format!("{e:#}"), "recording the execution on the session");
        }
    }

    /// Forgets a deleted function's sessions and idle instances.
    pub async fn function_removed(&self, language_title: &str) {
        if let Ok(removed) = self.sessions.remove_function(language_title).await {
            for id in removed {
                self.drop_slot(&id).await;
            }
        }
        self.core.evict_function(language_title).await;
        self.metrics.forget_function(language_title);
    }

    /// Ends the sessions pinned to a deleted version of a function, lets go
    /// of the instances they held and stops its idle pooled ones.
    pub async fn version_removed(&self, language_title: &str, version: i64) {
        self.core.evict_version(language_title, version).await;
        match self.sessions.remove_version(language_title, version).await {
            Ok(removed) => {
                for id in removed {
                    self.drop_slot(&id).await;
                }
            }
            Err(e) => tracing::warn!(
                language_title,
                version,
                error = format!("{e:#}"),
                "ending the sessions of a deleted version; they end when they expire"
            ),
        }
    }

    /// Catches up with functions other replicas changed in a shared store
    /// ([`Registry::refresh`]). Idle instances of one deleted there (or
    /// deleted and registered again) are stopped here: they can never serve
    /// again. Its sessions were that replica's to remove.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let refreshed = self.registry.refresh().await?;
        for lt in &refreshed.gone {
            self.core.evict_function(lt).await;
            self.metrics.forget_function(lt);
        }
        for lt in &refreshed.reborn {
            self.core.evict_function(lt).await;
        }
        Ok(())
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
    }

    /// Sets the active-sessions gauge from the session store. Called when
    /// `/metrics` is scraped, not per request: counting is a Redis round
    /// trip (or a walk over every session in memory), which initialize and
    /// every one-shot execute used to pay for.
    pub async fn update_session_gauge(&self) {
        if let Ok(n) = self.sessions.active_count().await {
            self.metrics.active_sessions.set(n as i64);
        }
    }

    /// Terminates every instance this engine holds (retained sessions), then the pool's.
    pub async fn shutdown(&self) {
        let slots: Vec<_> = self.slots.lock().unwrap().drain().map(|(_, s)| s).collect();
        for slot in slots {
            let retained = std::mem::take(&mut slot.lock().await.retained);
            self.core.discard(retained).await;
        }
        self.core.shutdown().await;
    }
}

/// Whether a retained session of `function` holds an instance: a
/// pipeline keeps none, nor does wasm (a fresh instance each run).
fn holds_instance(function: &FunctionVersion) -> bool {
    function.pipeline().is_none() && function.language() != Language::Wasm
}

/// 403 unless the token may execute some language.
pub fn require_some_execute_scope(subject: &Subject) -> Result<(), ApiError> {
    if subject.can_execute_something() {
        Ok(())
    } else {
        Err(ApiError::Forbidden("token has no 'execute:*' scope".into()))
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
