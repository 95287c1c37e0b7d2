//! Runtime instances and the backends that start them.
//!
//! An [`Instance`] is one runtime server (or sandbox) specialised with one
//! function version for its whole life. A [`RuntimeBackend`] starts generic
//! instances for a language: child processes for the embedded default,
//! wasmtime sandboxes for wasm (both in `fnrt-backends`); containers and
//! pods implement the same trait. The [`pool::InstancePool`] keeps generic
//! warm instances and idle specialised ones, and hands them out.
//!
//! # Layout
//!
//! - [`protocol`]: the typed client for `/init`, `/run`, `/health`
//!   (docs/runtime-protocol.md) over a Unix socket or TCP with a token.
//! - [`remote`]: [`remote::RemoteInstance`], the one instance for every
//!   backend that starts runtime servers, over a backend's
//!   [`remote::InstanceHandle`].
//! - `wakes`: polls the protocol client's call without the wakes it makes
//!   of its own task (each cost a context switch).
//! - [`placement`]: which backend runs which function (`--placement`).
//! - [`pool`]: warm pool, specialisation, reaping.
//! - this module: the [`RuntimeBackend`] and [`Instance`] traits, what a run
//!   is given and answers, [`InstanceError`], and [`init_payload`], what
//!   `/init` sends, resolved once per version through [`Artifacts`].

#[cfg(test)]
pub(crate) mod fake;
pub mod placement;
pub mod pool;
pub mod protocol;
pub mod remote;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::artifact::{BuildFailure, Target};
use crate::function::FunctionVersion;
use crate::function::manifest::Network;
use crate::language::Language;

/// What a run is given.
#[derive(Debug, Clone, Copy)]
pub struct RunRequest<'a> {
    pub params: &'a Value,
    pub context: &'a Value,
    pub deadline: Duration,
    /// Where what the function writes during the run goes.
    pub logs: Option<&'a std::sync::Arc<crate::logs::RunLogs>>,
    /// The run's key to its caller's files (`files.sock` beside the
    /// runtime's socket), valid until the run ends.
    pub files_token: Option<&'a str>,
}

/// Keys to the caller's files, one per run (the controller's files socket
/// checks them): what a function's file helpers present.
pub trait FileGrants: Send + Sync {
    /// A new key to `subject`'s files.
    fn grant(&self, subject: &str) -> String;
    /// Ends a key.
    fn revoke(&self, token: &str);
}

/// How a function answered a run.
#[derive(Debug)]
pub enum RunOutcome {
    Success(Value),
    /// The function refused its params (`INVALID_PARAMS`).
    InvalidParams {
        message: String,
        details: Value,
    },
    /// The function threw (`RUNTIME_ERROR`).
    Failed {
        message: String,
        details: Value,
    },
}

/// An instance failed, as opposed to the function failing inside it. Every
/// variant means the instance must not be used again.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("{language} runtime is unavailable: {message}")]
    Unavailable { language: Language, message: String },
    /// The backend has no room for another instance now (every instance
    /// uid is in use, say); an idle instance stopped would make room.
    #[error("{language} runtime is unavailable: {message}")]
    Exhausted { language: Language, message: String },
    #[error("{message}")]
    Init { message: String, details: Value },
    #[error("instance crashed: {message}")]
    Crashed { message: String, details: Value },
    #[error("result is larger than the limit of {limit} bytes")]
    ResultTooLarge { limit: usize },
    #[error("runtime protocol error: {0}")]
    Protocol(String),
    /// The function's build has not finished (yet) on this controller.
    #[error("{message}")]
    NotReady { message: String },
    #[error("{}", .0.message)]
    BuildFailed(BuildFailure),
}

#[async_trait]
pub trait Instance: Send + Sync {
    /// Short unique ID, for logs.
    fn id(&self) -> &str;
    fn language(&self) -> Language;
    /// Loads the function; an instance is initialised at most once.
    async fn init(&mut self, function: &FunctionVersion) -> Result<(), InstanceError>;
    /// Runs the function once. The caller enforces the deadline by dropping
    /// this future and calling [`Instance::terminate`].
    async fn run(&mut self, request: RunRequest<'_>) -> Result<RunOutcome, InstanceError>;
    /// Whether the instance is still able to serve another session (it
    /// runs, and its function left nothing behind in it).
    fn is_alive(&mut self) -> bool;
    /// Whether the instance still runs: what a retained session asks before
    /// each of its runs (it keeps its instance whatever its own function
    /// left in it, so the backend's costlier checks are not needed).
    fn is_running(&mut self) -> bool {
        self.is_alive()
    }
    /// Stops the instance for good and releases what it holds. Dropping an
    /// instance does the same, best effort.
    async fn terminate(&mut self);
    /// Whether its function can reach its caller's files (a runtime's file
    /// helpers, on `files.sock`): a run of one that cannot gets no key.
    fn reaches_files(&self) -> bool {
        true
    }
}

/// Where the built artifacts of crate functions are (the backends' builder).
pub trait Artifacts: Send + Sync {
    /// The built artifact of a crate function; `NotReady` or `BuildFailed`
    /// when there is none yet.
    fn locate(&self, function: &FunctionVersion) -> Result<PathBuf, InstanceError>;
}

/// What `/init` sends for `function`: its source, or its built library as
/// base64. Resolved once per function version (the first specialisation
/// reads the artifact; later ones reuse it).
pub async fn init_payload(
    artifacts: Option<&dyn Artifacts>,
    function: &FunctionVersion,
) -> Result<std::sync::Arc<protocol::InitPayload>, InstanceError> {
    use base64::Engine as _;
    function
        .init_payload
        .get_or_try_init(|| async {
            let (entrypoint, code): (String, std::sync::Arc<str>) = match (&function.files, artifacts) {
                (Some(_), Some(artifacts)) => {
                    let path = artifacts.locate(function)?;
                    let bytes = tokio::fs::read(&path)
                        .await
                        .map_err(|e| InstanceError::Protocol(format!("reading the built artifact: {e}")))?;
                    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
                    (Target::Native.artifact_name().to_owned(), encoded.into())
                }
                (Some(_), None) => return Err(InstanceError::Protocol("no builder for a crate".into())),
                (None, _) if function.manifest.package => (function.manifest.entrypoint.clone(), "".into()),
                (None, _) => (function.manifest.entrypoint.clone(), function.code.as_str().into()),
            };
            Ok(std::sync::Arc::new(protocol::InitPayload {
                language_title: function.language_title.to_string(),
                version: function.version,
                entrypoint,
                handler: function.manifest.handler.clone(),
                code,
                env: serde_json::to_value(&function.manifest.env).unwrap_or_default(),
                package: function.manifest.package,
            }))
        })
        .await
        .cloned()
}

#[async_trait]
pub trait RuntimeBackend: Send + Sync {
    /// Name for logs and `/health` (`process`, `docker`, ...).
    fn name(&self) -> &'static str;
    /// The languages this backend runs.
    fn languages(&self) -> Vec<Language>;
    /// Refuses a source file this backend could never run (checked at
    /// registration).
    fn check_code(&self, _language: Language, _entrypoint: &str, _code: &str) -> Result<(), String> {
        Ok(())
    }
    /// Refuses a crate's built artifact this backend could never run.
    fn check_artifact(&self, _language: Language, _artifact: &[u8]) -> Result<(), String> {
        Ok(())
    }
    /// Whether `function` can be started now (a crate must be built first).
    async fn ready(&self, _function: &FunctionVersion) -> Result<(), InstanceError> {
        Ok(())
    }
    /// Starts a generic, healthy, not yet initialised instance of `shape`
    /// (its memory cap and network, fixed for the instance's life).
    async fn start(
        &self,
        language: Language,
        shape: &Shape,
        purpose: StartFor,
    ) -> Result<Box<dyn Instance>, InstanceError>;
    /// At shutdown, after every instance was terminated: releases what is
    /// left (a container whose start was cut short).
    async fn shutdown(&self) {}
}

/// What an instance is started for, which decides what its start is worth:
/// a pooled one waits for a function, so its runtime may first go through
/// what `/init` runs (the Node runtime's warm-up: the caller waits for
/// `/init`, not for the start); a cold start is `/init`ed at once, and a
/// warm-up would only delay it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFor {
    /// The warm pool.
    Pool,
    /// A function's `/init`, right after (a cold start).
    Init,
}

/// What an instance is fixed to when it starts: only a function of the
/// same shape can use it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shape {
    pub memory_mb: u64,
    /// Where it may connect (`network.egress`); empty: only its own loopback.
    pub network: Network,
}

impl Shape {
    /// The shape of a warm pool's generic instances: no network.
    pub fn generic(memory_mb: u64) -> Shape {
        Shape {
            memory_mb,
            network: Network::default(),
        }
    }

    /// The shape `function` needs.
    pub fn of(function: &FunctionVersion) -> Shape {
        Shape {
            memory_mb: function.manifest.limits.memory_mb,
            network: function.manifest.network.clone(),
        }
    }
}
