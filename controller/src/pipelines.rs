//! Running pipelines: an adapter over the invocation core, like sessions
//! and asynchronous executions. A pipeline's run is one execution of its
//! own, and each step one execution of the step's function through
//! [`Invoker::invoke`] (schema, cache, instances, deadline, records), linked
//! to the pipeline's by `parent`.
//!
//! ```text
//! run: params schema -> ready steps (no unfinished `after`) start, each with
//!      its params mapped from the pipeline's params and finished outputs
//!      -> a step ends: completed (its dependents may start), failed with
//!      `on_error: continue` (its fallback stands in), or failed (the
//!      others are cancelled, the error names the step) -> output
//! ```
//!
//! Every step attempt gets what is left of the pipeline's deadline at most;
//! cancelling the pipeline cancels the running steps (their instances are
//! stopped) and starts no other. A [`StepBoard`] holds the steps' reports
//! as they change; whoever shows the run's progress reads them there.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::error::ApiError;
use fnrt_core::function::FunctionVersion;
use fnrt_core::function::pipeline::{self, OnError, Pipeline};
use fnrt_core::invoke::{CacheDirective, CoreError, Invocation, Invoker};
use fnrt_core::metrics::Metrics;
use fnrt_core::timefmt;

/// One step as a pipeline's progress and result show it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StepReport {
    pub name: String,
    pub language_title: String,
    /// `pending`, `running`, `retrying`, `completed`, `failed` (with
    /// `on_error: continue`, the pipeline went on with its fallback),
    /// `cancelled` or `skipped` (never started: an earlier step failed).
    pub status: &'static str,
    /// Attempts so far.
    pub attempts: u32,
    /// The last attempt's execution: its logs are at
    /// `/api/v1/executions/{execution_id}/logs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// From its first attempt's start to its end, waits between attempts included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Its result came from the cache.
    pub cached: bool,
    /// Its output (a fallback's, for a failed step the pipeline continued after).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// The contract's error object of its last failed attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    /// When it started and ended among the run's step starts and ends
    /// (1, 2, …): their order, which times in milliseconds cannot always tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_seq: Option<u64>,
}

/// The `progress` object of a pipeline run (the seed's shape), from its
/// steps' names and statuses.
pub fn progress<'a>(steps: impl IntoIterator<Item = (&'a str, &'a str)>) -> Value {
    let steps: Vec<(&str, &str)> = steps.into_iter().collect();
    let total = steps.len();
    let completed = steps
        .iter()
        .filter(|(_, status)| matches!(*status, "completed" | "failed" | "cancelled" | "skipped"))
        .count();
    let current: Vec<&str> = steps
        .iter()
        .filter(|(_, status)| matches!(*status, "running" | "retrying"))
        .map(|(name, _)| *name)
        .collect();
    json!({
        "current_step": current.first(),
        "running_steps": current,
        "total_steps": total,
        "completed_steps": completed,
        "percentage": (completed * 1000).checked_div(total).map_or(0.0, |p| p as f64 / 10.0),
    })
}

/// [`progress`] of reports.
pub fn progress_of(steps: &[StepReport]) -> Value {
    progress(steps.iter().map(|s| (s.name.as_str(), s.status)))
}

/// A run's step reports as the run changes them, read by whatever shows
/// its progress (a session's live view, an asynchronous execution's row)
/// through a [`StepsView`], which copies them when it is asked. A change
/// copies nothing: a copy of every report (outputs included) on each of a
/// run's changes was quadratic in its steps (docs/benchmarks.md).
#[derive(Default)]
pub struct StepBoard {
    steps: StepsView,
    /// The last start or end numbered (`started_seq`, `ended_seq`).
    seq: AtomicU64,
    /// Told of every change (the latest only), when someone watches.
    changed: Option<watch::Sender<()>>,
}

/// A run's step reports, read as they are now.
#[derive(Clone, Default)]
pub struct StepsView(Arc<Mutex<Vec<StepReport>>>);

impl StepsView {
    pub fn snapshot(&self) -> Vec<StepReport> {
        self.0.lock().unwrap().clone()
    }
}

impl StepBoard {
    /// A board and what sees its changes (and sees the board go when it
    /// is dropped).
    pub fn watched() -> (Self, watch::Receiver<()>) {
        let (tx, rx) = watch::channel(());
        let board = StepBoard {
            changed: Some(tx),
            ..StepBoard::default()
        };
        (board, rx)
    }

    pub fn view(&self) -> StepsView {
        self.steps.clone()
    }

    fn set(&self, reports: Vec<StepReport>) {
        *self.steps.0.lock().unwrap() = reports;
        self.tell();
    }

    fn update(&self, i: usize, change: impl FnOnce(&mut StepReport)) {
        change(&mut self.steps.0.lock().unwrap()[i]);
        self.tell();
    }

    fn tell(&self) {
        if let Some(tx) = &self.changed {
            tx.send_replace(());
        }
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn snapshot(&self) -> Vec<StepReport> {
        self.steps.snapshot()
    }
}

/// A pipeline's answer.
#[derive(Debug)]
pub struct Ran {
    pub output: Arc<Value>,
    pub steps: Vec<StepReport>,
    /// A step started an instance.
    pub cold_start: bool,
}

/// One step's successful (or continued) end.
struct StepDone {
    output: Value,
    cached: bool,
    cold: bool,
}

pub struct Pipelines {
    core: Arc<Invoker>,
    metrics: Arc<Metrics>,
}

/// What expressions read during a run.
struct Values<'a> {
    params: &'a Value,
    context: &'a Value,
    outputs: &'a BTreeMap<String, Value>,
}

impl pipeline::Scope for Values<'_> {
    fn params(&self) -> &Value {
        self.params
    }
    fn context(&self) -> &Value {
        self.context
    }
    fn output(&self, step: &str) -> Option<&Value> {
        self.outputs.get(step)
    }
}

impl Pipelines {
    pub fn new(core: Arc<Invoker>, metrics: Arc<Metrics>) -> Self {
        Pipelines { core, metrics }
    }

    /// Runs the pipeline `invocation.function` with `steps` (its steps'
    /// functions, in its order, resolved and allowed by the caller).
    pub async fn run(
        &self,
        invocation: Invocation<'_>,
        steps: &[Arc<FunctionVersion>],
        board: Option<&StepBoard>,
    ) -> Result<Ran, CoreError> {
        let started = Instant::now();
        let started_at = OffsetDateTime::now_utc();
        let function = invocation.function;
        let Some(pipeline) = function.pipeline() else {
            return Err(CoreError::Unavailable(format!(
                "'{}' is not a pipeline",
                function.language_title
            )));
        };
        if let Err(details) = function.validate_params(invocation.params) {
            self.core
                .record(&invocation, started, started_at, "invalid_params", false, false, None);
            return Err(CoreError::SchemaMismatch {
                message: "params do not match the pipeline's schema".into(),
                details,
            });
        }
        // The caller's, when it shows the run's progress; else the run's own.
        let own;
        let board = match board {
            Some(board) => board,
            None => {
                own = StepBoard::default();
                &own
            }
        };
        board.set(
            pipeline
                .steps
                .iter()
                .map(|s| StepReport {
                    name: s.name.clone(),
                    language_title: s.function.clone(),
                    status: "pending",
                    attempts: 0,
                    execution_id: None,
                    started_at: None,
                    completed_at: None,
                    duration_ms: None,
                    cached: false,
                    output: None,
                    error: None,
                    started_seq: None,
                    ended_seq: None,
                })
                .collect(),
        );
        let outcome = self.schedule(&invocation, pipeline, steps, board, started).await;
        let reports = board.snapshot();
        let (label, cold) = match &outcome {
            Ok((_, cold)) => ("success", *cold),
            Err(e) => (e.outcome(), false),
        };
        self.core
            .record(&invocation, started, started_at, label, false, cold, None);
        let (outputs, cold_start) = outcome?;
        let values = Values {
            params: invocation.params,
            context: invocation.context,
            outputs: &outputs,
        };
        let output = match &pipeline.output {
            Some(template) => pipeline::evaluate(template, &values),
            None => outputs
                .get(&pipeline.steps[pipeline.last()].name)
                .cloned()
                .unwrap_or(Value::Null),
        };
        Ok(Ran {
            output: Arc::new(output),
            steps: reports,
            cold_start,
        })
    }

    /// Starts steps as their `after` finish, until all ended or one failed.
    async fn schedule(
        &self,
        invocation: &Invocation<'_>,
        pipeline: &Pipeline,
        functions: &[Arc<FunctionVersion>],
        board: &StepBoard,
        started: Instant,
    ) -> Result<(BTreeMap<String, Value>, bool), CoreError> {
        let ends = started + invocation.deadline;
        // Cancelled by the caller, or by the first step that fails.
        let stop = invocation
            .cancel
            .map_or_else(CancellationToken::new, |t| t.child_token());
        let mut waiting: Vec<usize> = pipeline.steps.iter().map(|s| s.after.len()).collect();
        let mut ready: VecDeque<usize> = (0..pipeline.steps.len()).filter(|&i| waiting[i] == 0).collect();
        let mut outputs = BTreeMap::new();
        let mut running = FuturesUnordered::new();
        let mut failure: Option<CoreError> = None;
        let mut cold = false;
        loop {
            while failure.is_none() && !stop.is_cancelled() {
                let Some(i) = ready.pop_front() else { break };
                let params = self.params_of(invocation, pipeline, i, &outputs);
                let step_run = self.run_step(invocation, pipeline, i, &functions[i], params, board, ends, &stop);
                running.push(async move { (i, step_run.await) });
            }
            let Some((i, ended)) = running.next().await else { break };
            let step = &pipeline.steps[i];
            match ended {
                Ok(done) => {
                    cold |= done.cold;
                    board.update(i, |r| {
                        if r.status != "failed" {
                            r.status = "completed";
                        }
                        r.output = Some(done.output.clone());
                        r.cached = done.cached;
                    });
                    outputs.insert(step.name.clone(), done.output);
                    for j in pipeline.dependents(i) {
                        waiting[j] -= 1;
                        if waiting[j] == 0 {
                            ready.push_back(j);
                        }
                    }
                }
                Err(e) => {
                    if failure.is_none() && !matches!(e, CoreError::Cancelled) {
                        let execution_id = board.steps.0.lock().unwrap()[i]
                            .execution_id
                            .as_deref()
                            .and_then(|id| id.parse().ok());
                        failure = Some(CoreError::Step {
                            step: step.name.clone(),
                            function: step.function.clone(),
                            execution_id,
                            source: Box::new(e),
                            steps: Value::Null,
                        });
                        // The other running steps are stopped; none starts.
                        stop.cancel();
                    }
                }
            }
        }
        // Steps that never started.
        for i in 0..pipeline.steps.len() {
            board.update(i, |r| {
                if r.status == "pending" {
                    r.status = "skipped";
                }
            });
        }
        if invocation.cancel.is_some_and(CancellationToken::is_cancelled) {
            return Err(CoreError::Cancelled);
        }
        match failure {
            Some(CoreError::Step {
                step,
                function,
                execution_id,
                source,
                ..
            }) => Err(CoreError::Step {
                step,
                function,
                execution_id,
                source,
                steps: serde_json::to_value(board.snapshot()).unwrap_or_default(),
            }),
            Some(other) => Err(other),
            None => Ok((outputs, cold)),
        }
    }

    /// Step `i`'s params: its mapping, or by default the pipeline's params
    /// (no `after`) or the output of the one step it waits for.
    fn params_of(
        &self,
        invocation: &Invocation<'_>,
        pipeline: &Pipeline,
        i: usize,
        outputs: &BTreeMap<String, Value>,
    ) -> Value {
        let step = &pipeline.steps[i];
        let values = Values {
            params: invocation.params,
            context: invocation.context,
            outputs,
        };
        match (&step.params, step.after.as_slice()) {
            (Some(template), _) => pipeline::evaluate(template, &values),
            (None, []) => invocation.params.clone(),
            (None, [one]) => outputs.get(&pipeline.steps[*one].name).cloned().unwrap_or(Value::Null),
            // Refused at registration.
            (None, _) => Value::Null,
        }
    }

    /// One step, with its retries, within the pipeline's deadline.
    #[allow(clippy::too_many_arguments)]
    async fn run_step(
        &self,
        invocation: &Invocation<'_>,
        pipeline: &Pipeline,
        i: usize,
        function: &Arc<FunctionVersion>,
        params: Value,
        board: &StepBoard,
        ends: Instant,
        stop: &CancellationToken,
    ) -> Result<StepDone, CoreError> {
        let step = &pipeline.steps[i];
        let pipeline_name = invocation.function.language_title.as_str();
        let first_start = Instant::now();
        board.update(i, |r| {
            r.status = "running";
            r.started_at = Some(timefmt::format_ms(timefmt::now_ms()));
            r.started_seq = Some(board.next_seq());
        });
        let finish = |status: &'static str, error: Option<Value>| {
            board.update(i, |r| {
                r.status = status;
                r.error = error;
                r.completed_at = Some(timefmt::format_ms(timefmt::now_ms()));
                r.ended_seq = Some(board.next_seq());
                r.duration_ms = Some(first_start.elapsed().as_millis() as u64);
            });
        };
        if !params.is_object() {
            let e = CoreError::InvalidParams {
                message: "the step's params mapping did not give a JSON object".into(),
                details: json!({ "params": params }),
            };
            finish("failed", Some(error_object(&e)));
            return Err(e);
        }
        let cache = match function.manifest.cache.enabled && invocation.function.manifest.cache.enabled {
            true => invocation.cache,
            false => CacheDirective::NoCache,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let left = ends.saturating_duration_since(Instant::now());
            let own = Duration::from_millis(step.timeout_ms.unwrap_or(function.manifest.limits.timeout_ms));
            let execution_id = fnrt_core::records::new_execution_id();
            board.update(i, |r| {
                r.attempts = attempt;
                r.execution_id = Some(execution_id.to_string());
            });
            let attempt_start = Instant::now();
            let result = if left.is_zero() {
                Err(pipeline_timeout(invocation))
            } else {
                let ran = self
                    .core
                    .invoke(
                        Invocation {
                            function,
                            params: &params,
                            context: invocation.context,
                            deadline: own.min(left),
                            cache,
                            origin: invocation.origin,
                            execution_id,
                            run_context: invocation.run_context,
                            cancel: Some(stop),
                            parent: Some(invocation.execution_id),
                        },
                        None,
                    )
                    .await;
                match ran {
                    // The pipeline's deadline, not the step's own, cut it.
                    Err(CoreError::Timeout { .. }) if own > left => Err(pipeline_timeout(invocation)),
                    other => other,
                }
            };
            let elapsed = attempt_start.elapsed();
            let e = match result {
                Ok(invoked) => {
                    self.metrics.record_step(pipeline_name, &step.name, "success", elapsed);
                    finish("completed", None);
                    return Ok(StepDone {
                        output: (*invoked.result).clone(),
                        cached: invoked.cached,
                        cold: invoked.cold_start,
                    });
                }
                Err(e) => e,
            };
            if matches!(e, CoreError::Cancelled) {
                self.metrics
                    .record_step(pipeline_name, &step.name, "cancelled", elapsed);
                finish("cancelled", None);
                return Err(e);
            }
            let again = attempt < step.max_attempts
                && !matches!(
                    e,
                    CoreError::SchemaMismatch { .. } | CoreError::InvalidParams { .. } | CoreError::BuildFailed(_)
                )
                && !matches!(&e, CoreError::Timeout { timeout_ms } if *timeout_ms == invocation.deadline.as_millis() as u64);
            if again {
                self.metrics.record_step(pipeline_name, &step.name, "retried", elapsed);
                board.update(i, |r| {
                    r.status = "retrying";
                    r.error = Some(error_object(&e));
                });
                let backoff = Duration::from_millis(step.backoff_ms.saturating_mul(1 << (attempt - 1).min(16)));
                tokio::select! {
                    () = tokio::time::sleep(backoff.min(ends.saturating_duration_since(Instant::now()))) => {}
                    () = stop.cancelled() => {
                        finish("cancelled", None);
                        return Err(CoreError::Cancelled);
                    }
                }
                board.update(i, |r| r.status = "running");
                continue;
            }
            if step.on_error == OnError::Continue {
                self.metrics
                    .record_step(pipeline_name, &step.name, "continued", elapsed);
                finish("failed", Some(error_object(&e)));
                return Ok(StepDone {
                    output: step.fallback.clone(),
                    cached: false,
                    cold: false,
                });
            }
            self.metrics.record_step(pipeline_name, &step.name, "failed", elapsed);
            finish("failed", Some(error_object(&e)));
            return Err(e);
        }
    }
}

/// The pipeline's own deadline passed.
fn pipeline_timeout(invocation: &Invocation<'_>) -> CoreError {
    CoreError::Timeout {
        timeout_ms: invocation.deadline.as_millis() as u64,
    }
}

/// The contract's error object for a step's error.
fn error_object(e: &CoreError) -> Value {
    serde_json::to_value(ApiError::from(e.clone()).body()).unwrap_or_default()
}
