//! Asynchronous executions: `POST /api/v1/executions` queues a run of any
//! function and answers at once; workers in every replica claim runs from
//! the durable queue ([`ExecutionQueue`]: SQLite by default, PostgreSQL
//! with `DATABASE_URL`) and run them through the same invocation core as
//! execute, with retries and cancellation.
//!
//! ```text
//! submit: scope, function (404 at once), retry policy -> queue row (pending)
//! worker: claim (priority, age, caps; a lease) -> run (lease renewed every
//!         second: a cancel asked on any replica stops it) -> completed |
//!         pending again after a backoff (crash, timeout, unavailable) |
//!         failed with every attempt's error (the dead-letter list)
//! ```
//!
//! - A claim is a lease ([`ExecutionSettings::lease`]): a replica that
//!   stops renewing it (killed) loses the run to another replica, which
//!   records the lost attempt and runs it again; a finish is fenced by the
//!   lease, so a run is recorded once.
//! - A SQLite controller starting takes back every run it held at once;
//!   a stopping controller hands its runs back unrun (they do not count as
//!   attempts): nothing accepted with 202 is lost.
//! - The function sees `context.execution` = `{"id", "attempt"}` beside
//!   its context; it is not part of the cache key.
//! - A final state with a `callback_url` is delivered, signed, by
//!   [`callbacks`].
//!
//! # Layout
//! - [`Executions`]: submit, read, list, cancel, requeue; [`Executions::run`]
//!   is the dispatcher that claims and spawns attempts.
//! - [`Submission`], [`Priority`].
//! - `Executions::attempt`: one claimed run, start to finish.
//! - [`view`]: an execution as its owner reads it (and its callback's body).
//! - [`events`]: its live progress (SSE, WebSocket), across replicas.
//! - [`callbacks`]: signed, retried deliveries of final states; which
//!   targets are allowed; signing secrets.
//! - [`purge_old`]: the retention sweep (`EXECUTION_RETENTION_HOURS`), for
//!   these and for every execute's record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

pub mod callbacks;
pub mod events;
pub mod view;

use crate::auth::Subject;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::pipelines::StepBoard;
use crate::store::{Claim, ExecutionFilter, ExecutionQueue, ExecutionStore, Finish, NewExecution, QueuedExecution};
use fnrt_core::function::manifest::RetrySpec;
use fnrt_core::invoke::{CacheDirective, CoreError, Invocation, Origin};
use fnrt_core::language::LanguageTitle;
pub use fnrt_core::timefmt::{format_ms, now_ms};

/// Rows one statement of the retention sweep deletes: short transactions,
/// whatever has piled up.
const PURGE_BATCH: i64 = 5_000;
/// Batches one sweep deletes at most of each table; the next sweep goes on.
const PURGE_BATCHES: usize = 200;

/// Deletes what is older than `retention`: the records of executions
/// started before it (every execute writes one) and the asynchronous
/// executions that finished before it (their callback delivered or given
/// up). Run periodically; without it both tables grow without end.
pub async fn purge_old(records: &dyn ExecutionStore, queue: &dyn ExecutionQueue, retention: Duration) {
    let before = fnrt_core::timefmt::now() - retention;
    let before_ms = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let records = in_batches(|| records.purge_executions(before, PURGE_BATCH)).await;
    let asynchronous = in_batches(|| queue.purge_finished(before_ms, PURGE_BATCH)).await;
    if records + asynchronous > 0 {
        tracing::info!(records, asynchronous, "executions past their retention deleted");
    }
}

/// Runs `purge` until it deletes less than a batch (or [`PURGE_BATCHES`]
/// times, or until it fails); how many rows it deleted.
async fn in_batches<F>(purge: impl Fn() -> F) -> u64
where
    F: std::future::Future<Output = Result<u64, crate::store::StoreError>>,
{
    let mut total = 0;
    for _ in 0..PURGE_BATCHES {
        match purge().await {
            Ok(n) => {
                total += n;
                if n < PURGE_BATCH as u64 {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "deleting executions past their retention");
                break;
            }
        }
    }
    total
}

/// How long a run whose function is still being built waits before it
/// looks again.
const NOT_READY_WAIT: Duration = Duration::from_secs(5);

/// How executions are queued and run.
#[derive(Debug, Clone, Copy)]
pub struct ExecutionSettings {
    /// Attempts this replica runs at once.
    pub workers: usize,
    /// How long a claim holds without renewal; renewed every second.
    pub lease: Duration,
    /// Most running executions of one subject, and of one function, across
    /// replicas: one tenant cannot take every worker.
    pub per_subject: u32,
    pub per_function: u32,
    /// Most pending executions of one subject (the queue keeps each one's
    /// params until it runs): `EXECUTION_MAX_PENDING_PER_SUBJECT`.
    pub max_pending: u32,
    /// How long an idempotency key returns its first execution.
    pub idempotency_window: Duration,
    /// The longest an idle worker waits before it looks at the queue again
    /// (a submission on this replica wakes it at once).
    pub poll: Duration,
}

/// `priority` of a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    fn rank(self) -> i32 {
        match self {
            Priority::Low => 0,
            Priority::Normal => 1,
            Priority::High => 2,
        }
    }

    pub fn from_rank(rank: i32) -> Priority {
        match rank {
            i32::MIN..=0 => Priority::Low,
            1 => Priority::Normal,
            _ => Priority::High,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

/// What a client submits.
#[derive(Debug)]
pub struct Submission {
    pub language_title: LanguageTitle,
    pub params: Value,
    /// The context as sent: `timeout_ms` is the controller's, the rest the
    /// function's.
    pub context: Map<String, Value>,
    pub priority: Priority,
    pub retry: RetrySpec,
    pub idempotency_key: Option<String>,
    /// How the result cache may serve and keep it (`X-Cache-Control`).
    pub cache: CacheDirective,
    /// Where the final state is POSTed, signed ([`callbacks`]).
    pub callback_url: Option<String>,
}

/// Why a run stopped before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancelled,
    LeaseLost,
    Shutdown,
}

/// A run of this replica: how to stop it, and why it was stopped.
#[derive(Clone)]
struct Running {
    token: CancellationToken,
    why: Arc<Mutex<Option<Stop>>>,
}

impl Running {
    fn stop(&self, why: Stop) {
        self.why.lock().unwrap().get_or_insert(why);
        self.token.cancel();
    }
}

/// One replica's side of the queue.
pub struct Executions {
    queue: Arc<dyn ExecutionQueue>,
    engine: Arc<Engine>,
    /// Delivers callbacks; checks their URLs at submission.
    pub callbacks: Arc<callbacks::Callbacks>,
    /// Wakes live progress streams.
    pub events: Arc<events::Events>,
    settings: ExecutionSettings,
    /// This replica's name on its leases.
    owner: String,
    /// A submission on this replica: a worker looks at once.
    wake: Notify,
    /// Runs of this replica, to stop at once when cancelled here.
    running: Mutex<HashMap<String, Running>>,
    /// Recent duration per function (ms), for `estimated_completion`.
    durations: Mutex<HashMap<String, f64>>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Executions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executions")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

fn internal(e: crate::store::StoreError) -> ApiError {
    if e.is_unavailable() {
        ApiError::Unavailable("the database is unavailable; retry shortly".into())
    } else {
        ApiError::Internal(e.into())
    }
}

impl Executions {
    pub fn new(
        queue: Arc<dyn ExecutionQueue>,
        engine: Arc<Engine>,
        targets: callbacks::Targets,
        events: Arc<events::Events>,
        settings: ExecutionSettings,
    ) -> Arc<Self> {
        Arc::new(Executions {
            events,
            callbacks: callbacks::Callbacks::new(queue.clone(), targets, engine.metrics.clone()),
            queue,
            engine,
            settings,
            owner: format!("controller-{}", uuid::Uuid::new_v4()),
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            durations: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
        })
    }

    /// Queues a run: the function and the scope are checked first (404 and
    /// 403 at once). False when an idempotency key returned the first run.
    pub async fn submit(&self, subject: &Subject, s: Submission) -> Result<(QueuedExecution, bool), ApiError> {
        let function = self.engine.runnable(subject, &s.language_title).await?;
        // A pipeline: the scope of every step's language too, now.
        self.engine.pipeline_steps(subject, &function).await?;
        if !s.params.is_object() {
            return Err(ApiError::InvalidRequest("'params' must be a JSON object".into()));
        }
        let mut context = s.context;
        let timeout_ms = self.engine.timeout_ms(
            &function,
            context.remove("timeout_ms").filter(|v| !v.is_null()).as_ref(),
        )?;
        if context.remove("retain_session").is_some() {
            return Err(ApiError::InvalidRequest(
                "context.retain_session means nothing to an asynchronous execution".into(),
            ));
        }
        if context.contains_key("execution") {
            return Err(ApiError::InvalidRequest(
                "context.execution is set by the controller (the execution's id and attempt)".into(),
            ));
        }
        let retry = function
            .manifest
            .retry
            .with(s.retry, "retry")
            .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
        if let Some(url) = &s.callback_url {
            let parsed = self.callbacks.targets.parse(url).map_err(ApiError::InvalidRequest)?;
            self.callbacks
                .targets
                .resolve(&parsed)
                .await
                .map_err(ApiError::InvalidRequest)?;
        }
        let now = now_ms();
        let new = NewExecution {
            id: uuid::Uuid::new_v4().to_string(),
            subject: subject.sub.clone(),
            language_title: s.language_title.to_string(),
            version: function.version,
            params: s.params,
            context: Value::Object(context),
            timeout_ms: timeout_ms as i64,
            priority: s.priority.rank(),
            idempotency_key: s.idempotency_key,
            cache: match s.cache {
                CacheDirective::Default => None,
                CacheDirective::NoCache => Some("no-cache".to_owned()),
                CacheDirective::MaxAge(age) => Some(format!("max-age={}", age.as_secs())),
            },
            max_attempts: retry.max_attempts as i32,
            backoff_ms: retry.backoff_ms as i64,
            retry_runtime_errors: retry.runtime_errors,
            callback_url: s.callback_url,
            now_ms: now,
            max_pending: i64::from(self.settings.max_pending),
        };
        let since = now - self.settings.idempotency_window.as_millis() as i64;
        let (row, new) = self.queue.submit(new, since).await.map_err(|e| match e {
            crate::store::StoreError::TooManyPending { max } => ApiError::TooMany {
                message: format!(
                    "you have {max} executions waiting to run (EXECUTION_MAX_PENDING_PER_SUBJECT): submit more as \
                     they finish, or cancel some"
                ),
                retry_after_secs: 30,
            },
            e => internal(e),
        })?;
        if new {
            self.wake.notify_one();
            self.events.changed(&row.id);
        }
        Ok((row, new))
    }

    /// When a run submitted now is likely done: the queue ahead of it
    /// shared by this replica's workers, at the function's recent pace.
    /// No query: the queue's depth is the one the dispatcher last read
    /// (every 5 s), so a submission stays one transaction.
    pub fn estimate_ms(&self, row: &QueuedExecution) -> i64 {
        let each = self
            .durations
            .lock()
            .unwrap()
            .get(&row.language_title)
            .copied()
            .unwrap_or(1000.0);
        let ahead: i64 = [Priority::Low, Priority::Normal, Priority::High]
            .into_iter()
            .filter(|p| p.rank() >= row.priority)
            .map(|p| {
                self.engine
                    .metrics
                    .queue_depth
                    .get_or_create(&fnrt_core::metrics::PriorityLabels {
                        priority: p.as_str().to_owned(),
                    })
                    .get()
            })
            .sum();
        let rounds = 1 + ahead / self.settings.workers.max(1) as i64;
        row.created_ms + rounds * each as i64
    }

    /// The subject's execution, or 404 (also another subject's).
    pub async fn get(&self, subject: &Subject, id: &str) -> Result<QueuedExecution, ApiError> {
        match self.queue.get(id).await.map_err(internal)? {
            Some(e) if e.subject == subject.sub => Ok(e),
            _ => Err(not_found(id)),
        }
    }

    /// One execution as stored, whoever owns it (for a stream already
    /// checked); `None` if it is gone or unreadable.
    pub async fn row(&self, id: &str) -> Option<QueuedExecution> {
        self.queue.get(id).await.ok().flatten()
    }

    pub async fn list(
        &self,
        subject: &Subject,
        filter: &ExecutionFilter,
    ) -> Result<(Vec<QueuedExecution>, i64), ApiError> {
        self.queue.list(&subject.sub, filter).await.map_err(internal)
    }

    /// Cancels a pending run, or stops a running one (its instance is
    /// killed; within a second when another replica runs it). 409 once
    /// it has finished.
    pub async fn cancel(&self, subject: &Subject, id: &str) -> Result<QueuedExecution, ApiError> {
        let row = self
            .queue
            .cancel(id, &subject.sub, now_ms())
            .await
            .map_err(internal)?
            .ok_or_else(|| not_found(id))?;
        match row.status.as_str() {
            "cancelled" => {
                self.events.changed(id);
                if row.callback_url.is_some() {
                    self.callbacks.wake.notify_one();
                }
                return Ok(row);
            }
            "running" => {}
            other => {
                return Err(ApiError::Conflict(format!(
                    "execution {id} has already finished ({other})"
                )));
            }
        }
        if let Some(run) = self.running.lock().unwrap().get(id) {
            run.stop(Stop::Cancelled);
        }
        // The worker (here, or on the replica that renews its lease every
        // second) records the end.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let row = self.get(subject, id).await?;
            match row.status.as_str() {
                // A run that ended on its own before the stop reached it
                // (its result written first) was not cancelled: 200 would
                // tell the caller it was.
                "completed" | "failed" => {
                    return Err(ApiError::Conflict(format!(
                        "execution {id} finished ({}) before it could be stopped",
                        row.status
                    )));
                }
                // Stopped, or stopping still (a failed attempt queued again
                // is cancelled when it is next taken).
                "running" if tokio::time::Instant::now() <= deadline => {}
                _ => return Ok(row),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Queues a failed or cancelled run again (its attempts start over;
    /// the earlier ones stay in its history). 409 in another state.
    pub async fn requeue(&self, subject: &Subject, id: &str) -> Result<QueuedExecution, ApiError> {
        let row = self.get(subject, id).await?;
        // A marker in the history: attempts after it are the new round's.
        let now = now_ms();
        let mut history = row.attempts.as_array().cloned().unwrap_or_default();
        history.push(json!({"outcome": "requeued", "at": format_ms(now)}));
        match self
            .queue
            .requeue(id, &subject.sub, now, &Value::Array(history))
            .await
            .map_err(internal)?
        {
            None => Err(not_found(id)),
            Some(false) => Err(ApiError::Conflict(format!(
                "execution {id} is not failed or cancelled; only those are queued again"
            ))),
            Some(true) => {
                self.wake.notify_one();
                self.events.changed(id);
                self.get(subject, id).await
            }
        }
    }

    /// Stops claiming, and hands this replica's runs back unrun.
    pub async fn shutdown(&self) {
        let running: Vec<_> = self.running.lock().unwrap().values().cloned().collect();
        for run in running {
            run.stop(Stop::Shutdown);
        }
        self.shutdown.cancel();
        self.callbacks.stop();
        // The hand-backs are written by the attempts themselves.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.running.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The dispatcher: claims due runs while a worker is free and runs each
    /// in a task of its own; sleeps on the queue when nothing is due.
    pub async fn run(self: Arc<Self>, is_sqlite: bool) {
        if is_sqlite {
            // One SQLite controller per database: its earlier process's
            // leases are nobody's now.
            match self.queue.expire_leases().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    runs = n,
                    "asynchronous executions interrupted by the last stop run again"
                ),
                Err(e) => tracing::warn!(error = %e, "taking back interrupted executions"),
            }
        }
        let workers = Arc::new(Semaphore::new(self.settings.workers.max(1)));
        let mut gauges_at = tokio::time::Instant::now();
        loop {
            let permit = tokio::select! {
                permit = workers.clone().acquire_owned() => permit.expect("never closed"),
                () = self.shutdown.cancelled() => return,
            };
            if tokio::time::Instant::now() >= gauges_at {
                self.update_gauges().await;
                gauges_at = tokio::time::Instant::now() + Duration::from_secs(5);
            }
            let now = now_ms();
            let claim = Claim {
                owner: &self.owner,
                now_ms: now,
                lease_until_ms: now + self.settings.lease.as_millis() as i64,
                per_subject: i64::from(self.settings.per_subject),
                per_function: i64::from(self.settings.per_function),
            };
            match self.queue.claim(&claim).await {
                Ok(Some(row)) => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.attempt(row).await;
                        drop(permit);
                    });
                }
                Ok(None) => {
                    drop(permit);
                    tokio::select! {
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(self.settings.poll) => {}
                        () = self.shutdown.cancelled() => return,
                    }
                }
                Err(e) => {
                    drop(permit);
                    tracing::warn!(error = %e, "claiming an asynchronous execution");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = self.shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn update_gauges(&self) {
        if let Ok(counts) = self.queue.pending_by_priority().await {
            for p in [Priority::Low, Priority::Normal, Priority::High] {
                let n = counts.iter().find(|(r, _)| *r == p.rank()).map_or(0, |(_, n)| *n);
                self.engine
                    .metrics
                    .queue_depth
                    .get_or_create(&fnrt_core::metrics::PriorityLabels {
                        priority: p.as_str().to_owned(),
                    })
                    .set(n);
            }
        }
    }

    /// One claimed run, start to finish.
    async fn attempt(self: &Arc<Self>, row: QueuedExecution) {
        self.events.changed(&row.id);
        let metrics = self.engine.metrics.clone();
        let mut history = row.attempts.as_array().cloned().unwrap_or_default();
        let started_ms = now_ms();
        if row.attempt == 1 {
            metrics
                .queue_wait
                .observe((started_ms - row.created_ms).max(0) as f64 / 1000.0);
        }
        // An earlier claim whose controller stopped before it finished.
        if (this_round(&history) as i32) < row.attempt - 1 {
            metrics.record_attempt("lost");
            history.push(json!({
                "number": row.attempt - 1,
                "outcome": "lost",
                "error": {"code": "UNAVAILABLE", "message": "the controller running this attempt stopped before it finished", "details": {}},
            }));
        }
        let finish = |status: &'static str, error: Option<Value>, history: Vec<Value>| Finish {
            status,
            attempts: Value::Array(history),
            result: None,
            error,
            cold_start: false,
            run_after_ms: row.run_after_ms,
            finished_ms: Some(now_ms()),
            uncount: false,
            delivery_id: Some(uuid::Uuid::new_v4().to_string()),
        };
        if row.cancel_requested {
            self.write(&row, finish("cancelled", Some(cancelled_error()), history))
                .await;
            return;
        }
        if row.attempt > row.max_attempts {
            metrics.record_attempt("failed");
            let error = history.last().and_then(|a| a.get("error").cloned());
            self.write(&row, finish("failed", error, history)).await;
            return;
        }
        let function = match self.engine.registry.version(&row.language_title, row.version).await {
            Ok(Some(f)) => f,
            Ok(None) => {
                let error = error_value(&ApiError::NotFound(format!(
                    "function '{}' version {} no longer exists",
                    row.language_title, row.version
                )));
                metrics.record_attempt("failed");
                history.push(attempt_entry(row.attempt, started_ms, "failed", Some(&error), false));
                self.write(&row, finish("failed", Some(error), history)).await;
                return;
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "reading an execution's function; handing it back"
                );
                self.write(
                    &row,
                    Finish {
                        uncount: true,
                        finished_ms: None,
                        // Not at once: the database may need a moment.
                        run_after_ms: now_ms() + 1000,
                        ..finish("pending", None, history)
                    },
                )
                .await;
                return;
            }
        };

        let steps = match self.engine.pipeline_functions(&function).await {
            Ok(steps) => steps,
            Err(e) => {
                let error = error_value(&e);
                metrics.record_attempt("failed");
                history.push(attempt_entry(row.attempt, started_ms, "failed", Some(&error), false));
                self.write(&row, finish("failed", Some(error), history)).await;
                return;
            }
        };
        // A pipeline's step reports go to its row as they change.
        let reporter = function.pipeline().map(|_| self.step_reporter(&row.id));

        // Runs until it finishes or is stopped; the lease is renewed meanwhile.
        let token = CancellationToken::new();
        let why = Arc::new(Mutex::new(None));
        let run = Running {
            token: token.clone(),
            why: why.clone(),
        };
        self.running.lock().unwrap().insert(row.id.clone(), run.clone());
        let renewal = tokio::spawn(renew(self.clone(), row.id.clone(), run));
        let mut run_context = row.context.clone();
        if let Some(map) = run_context.as_object_mut() {
            map.insert("execution".into(), json!({"id": row.id, "attempt": row.attempt}));
        }
        let invocation = Invocation {
            function: &function,
            params: &row.params,
            context: &row.context,
            deadline: Duration::from_millis(row.timeout_ms as u64),
            cache: match row.cache.as_deref() {
                Some("no-cache") => CacheDirective::NoCache,
                Some(age) => age
                    .strip_prefix("max-age=")
                    .and_then(|s| s.parse().ok())
                    .map_or(CacheDirective::Default, |s| {
                        CacheDirective::MaxAge(Duration::from_secs(s))
                    }),
                None => CacheDirective::Default,
            },
            origin: Origin {
                request_id: &row.id,
                subject: &row.subject,
            },
            execution_id: fnrt_core::records::new_execution_id(),
            run_context: Some(&run_context),
            cancel: Some(&token),
            parent: None,
        };
        let board = reporter.as_ref().map(|(board, _)| board);
        let invoked = self.engine.run(invocation, None, &steps, board, None).await;
        if let Some((board, writer)) = reporter {
            // Its last report is written before the attempt's end.
            drop(board);
            let _ = writer.await;
        }
        renewal.abort();
        self.running.lock().unwrap().remove(&row.id);
        let stop = *why.lock().unwrap();
        let elapsed = (now_ms() - started_ms) as f64;
        {
            let mut paces = self.durations.lock().unwrap();
            let pace = paces.entry(row.language_title.clone()).or_insert(elapsed);
            *pace = 0.8 * *pace + 0.2 * elapsed;
        }

        let update = match invoked {
            Ok(done) => {
                metrics.record_attempt("completed");
                history.push(attempt_entry(
                    row.attempt,
                    started_ms,
                    "completed",
                    None,
                    done.cold_start,
                ));
                Finish {
                    result: Some((*done.result).clone()),
                    cold_start: done.cold_start,
                    ..finish("completed", None, history)
                }
            }
            Err(CoreError::Cancelled) => match stop {
                Some(Stop::Shutdown) => {
                    metrics.record_attempt("handed_back");
                    Finish {
                        uncount: true,
                        finished_ms: None,
                        run_after_ms: now_ms(),
                        ..finish("pending", None, history)
                    }
                }
                // Another replica owns it now: nothing to write.
                Some(Stop::LeaseLost) => return,
                _ => {
                    metrics.record_attempt("cancelled");
                    let error = cancelled_error();
                    history.push(attempt_entry(row.attempt, started_ms, "cancelled", Some(&error), false));
                    finish("cancelled", Some(error), history)
                }
            },
            // A Rust crate still building: wait for it without spending
            // an attempt (a failed build ends it as BUILD_FAILED).
            Err(CoreError::NotReady { .. }) => {
                metrics.record_attempt("handed_back");
                Finish {
                    uncount: true,
                    finished_ms: None,
                    run_after_ms: now_ms() + NOT_READY_WAIT.as_millis() as i64,
                    ..finish("pending", None, history)
                }
            }
            Err(e) => {
                // A pipeline's failed step: as that step's own error would be.
                let retryable = match e.root() {
                    CoreError::Timeout { .. } | CoreError::Unavailable(_) | CoreError::Crashed { .. } => true,
                    CoreError::Runtime { .. } => row.retry_runtime_errors,
                    _ => false,
                };
                let error = error_value(&ApiError::from(e));
                let cold = false;
                if retryable && row.attempt < row.max_attempts {
                    metrics.record_attempt("retried");
                    history.push(attempt_entry(row.attempt, started_ms, "retried", Some(&error), cold));
                    Finish {
                        finished_ms: None,
                        run_after_ms: now_ms() + backoff_ms(row.backoff_ms, row.attempt),
                        ..finish("pending", None, history)
                    }
                } else {
                    metrics.record_attempt("failed");
                    history.push(attempt_entry(row.attempt, started_ms, "failed", Some(&error), cold));
                    finish("failed", Some(error), history)
                }
            }
        };
        let retry_later = update.status == "pending";
        self.write(&row, update).await;
        if retry_later {
            self.wake.notify_one();
        }
    }

    /// Where a running pipeline's step reports go, and the task that
    /// writes them to its row (the latest wins; it ends, after writing the
    /// last, when the reports are dropped), for reads and live progress on
    /// any replica.
    fn step_reporter(self: &Arc<Self>, id: &str) -> (StepBoard, tokio::task::JoinHandle<()>) {
        let (board, mut changes) = StepBoard::watched();
        let steps = board.view();
        let this = self.clone();
        let id = id.to_owned();
        let writer = tokio::spawn(async move {
            let mut written = None;
            loop {
                let open = changes.changed().await.is_ok();
                let now = serde_json::to_value(steps.snapshot()).ok();
                if now != written
                    && let Some(value) = &now
                    && let Ok(true) = this.queue.set_steps(&id, &this.owner, value).await
                {
                    this.events.changed(&id);
                    written = now;
                }
                if !open {
                    break;
                }
            }
        });
        (board, writer)
    }

    /// Writes an attempt's end, fenced by the lease.
    async fn write(&self, row: &QueuedExecution, finish: Finish) {
        match self.queue.finish(&row.id, &self.owner, &finish).await {
            Ok(true) => {
                self.events.changed(&row.id);
                if finish.status != "pending" && row.callback_url.is_some() {
                    self.callbacks.wake.notify_one();
                }
            }
            Ok(false) => {
                tracing::warn!(execution = %row.id, "the lease was lost before the attempt ended; another replica owns it")
            }
            Err(e) => {
                tracing::error!(execution = %row.id, error = %e, "recording an attempt's end; the lease will expire and another attempt run")
            }
        }
    }
}

/// Renews a run's lease every second; stops the run when a cancel is
/// asked for (on any replica), when the lease is lost, or at shutdown.
async fn renew(this: Arc<Executions>, id: String, run: Running) {
    let every = Duration::from_secs(1).min(this.settings.lease / 3);
    loop {
        tokio::time::sleep(every).await;
        let until = now_ms() + this.settings.lease.as_millis() as i64;
        let stop = match this.queue.renew(&id, &this.owner, until).await {
            Ok(Some(false)) => continue,
            Ok(Some(true)) => Stop::Cancelled,
            Ok(None) => Stop::LeaseLost,
            Err(e) => {
                // The lease outlives a short outage; a long one hands the
                // run to whoever can reach the database.
                tracing::warn!(execution = %id, error = %e, "renewing a lease");
                continue;
            }
        };
        run.stop(stop);
        return;
    }
}

/// Attempts recorded since the execution was last queued again.
fn this_round(history: &[Value]) -> usize {
    history.iter().rev().take_while(|a| a["outcome"] != "requeued").count()
}

/// The wait before attempt `attempt + 1`: `base`, doubled per attempt,
/// ±20 % jitter so that retries of many runs spread out.
pub fn backoff_ms(base: i64, attempt: i32) -> i64 {
    let doubled = base.saturating_mul(1 << (attempt - 1).clamp(0, 16));
    let jitter = 0.8 + 0.4 * rand::random::<f64>();
    (doubled as f64 * jitter) as i64
}

fn attempt_entry(number: i32, started_ms: i64, outcome: &str, error: Option<&Value>, cold_start: bool) -> Value {
    let finished = now_ms();
    let mut entry = json!({
        "number": number,
        "started_at": format_ms(started_ms),
        "finished_at": format_ms(finished),
        "duration_ms": finished - started_ms,
        "outcome": outcome,
        "cold_start": cold_start,
    });
    if let Some(error) = error {
        entry["error"] = error.clone();
    }
    entry
}

/// The contract's error object for `e`.
fn error_value(e: &ApiError) -> Value {
    serde_json::to_value(e.body()).unwrap_or_else(|_| json!({"code": e.code(), "message": e.to_string()}))
}

fn cancelled_error() -> Value {
    json!({"code": "CANCELLED", "message": "the execution was cancelled by its owner", "details": {}})
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("execution '{id}' not found"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter() {
        for (attempt, base) in [(1, 1000.0), (2, 2000.0), (3, 4000.0)] {
            let wait = backoff_ms(1000, attempt) as f64;
            assert!((0.8 * base..=1.2 * base).contains(&wait), "attempt {attempt}: {wait}");
        }
    }

    #[test]
    fn priorities_rank_and_read_back() {
        for p in [Priority::Low, Priority::Normal, Priority::High] {
            assert_eq!(Priority::from_rank(p.rank()), p);
        }
    }
}
