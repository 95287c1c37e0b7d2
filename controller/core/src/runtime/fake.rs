//! A backend of in-process instances, for tests of the pool and the
//! invocation core: no process, no socket. What an instance does is chosen
//! by the run's params (`sleep_ms`, `crash`), and a function whose code is
//! `fail-init` does not load. It counts what tests assert on: instances
//! started and stopped, and any instance entered by two runs at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use super::{Instance, InstanceError, RunOutcome, RunRequest, RuntimeBackend};
use crate::function::FunctionVersion;
use crate::language::Language;

/// What the fake instances did.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) started: AtomicUsize,
    pub(crate) terminated: AtomicUsize,
    pub(crate) runs: AtomicUsize,
    /// Set if a run entered an instance that was already running one.
    pub(crate) overlapped: AtomicBool,
}

#[derive(Debug)]
pub(crate) struct FakeBackend {
    pub(crate) name: &'static str,
    pub(crate) counters: Arc<Counters>,
}

impl Default for FakeBackend {
    fn default() -> Self {
        FakeBackend::named("fake")
    }
}

impl FakeBackend {
    pub(crate) fn named(name: &'static str) -> Self {
        FakeBackend {
            name,
            counters: Arc::default(),
        }
    }
}

#[async_trait]
impl RuntimeBackend for FakeBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn languages(&self) -> Vec<Language> {
        vec![Language::Nodejs]
    }

    async fn start(
        &self,
        language: Language,
        _shape: &super::Shape,
        _purpose: super::StartFor,
    ) -> Result<Box<dyn Instance>, InstanceError> {
        let n = self.counters.started.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(FakeInstance {
            id: format!("{}-{n}", self.name),
            language,
            counters: self.counters.clone(),
            busy: Arc::new(AtomicBool::new(false)),
            alive: true,
            terminated: false,
            runs: 0,
        }))
    }
}

struct FakeInstance {
    id: String,
    language: Language,
    counters: Arc<Counters>,
    busy: Arc<AtomicBool>,
    alive: bool,
    terminated: bool,
    /// Runs on this instance: in-memory state a retained session keeps.
    runs: u64,
}

#[async_trait]
impl Instance for FakeInstance {
    fn id(&self) -> &str {
        &self.id
    }

    fn language(&self) -> Language {
        self.language
    }

    async fn init(&mut self, function: &FunctionVersion) -> Result<(), InstanceError> {
        if function.code == "fail-init" {
            return Err(InstanceError::Init {
                message: "SyntaxError: fail-init".into(),
                details: json!({ "line": 1 }),
            });
        }
        Ok(())
    }

    async fn run(&mut self, request: RunRequest<'_>) -> Result<RunOutcome, InstanceError> {
        if self.busy.swap(true, Ordering::SeqCst) {
            self.counters.overlapped.store(true, Ordering::SeqCst);
        }
        // Cleared however the run ends, dropped at its deadline included.
        let _busy = Cleared(self.busy.clone());
        self.counters.runs.fetch_add(1, Ordering::SeqCst);
        self.runs += 1;
        if let Some(ms) = request.params["sleep_ms"].as_u64() {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if request.params["crash"] == true {
            self.alive = false;
            return Err(InstanceError::Crashed {
                message: "the instance exited during the run (signal: 9)".into(),
                details: json!({}),
            });
        }
        Ok(RunOutcome::Success(json!({ "instance": self.id, "runs": self.runs })))
    }

    fn is_alive(&mut self) -> bool {
        self.alive && !self.terminated
    }

    async fn terminate(&mut self) {
        if !self.terminated {
            self.terminated = true;
            self.counters.terminated.fetch_add(1, Ordering::SeqCst);
        }
    }
}

struct Cleared(Arc<AtomicBool>);

impl Drop for Cleared {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}
