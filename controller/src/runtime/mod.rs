//! Runtime instances and the backends that start them.
//!
//! An [`Instance`] is one runtime server specialised with one function
//! version for its whole life. A [`RuntimeBackend`] starts generic instances
//! for a language: child processes ([`process::ProcessBackend`]) for the
//! embedded default; containers, pods and wasm sandboxes implement the same
//! trait. The [`pool::InstancePool`] keeps generic warm instances and idle
//! specialised ones, and hands them out.
//!
//! # Layout
//!
//! - [`protocol`]: the typed client for `/init`, `/run`, `/health`
//!   (docs/runtime-protocol.md) over a Unix socket or TCP with a token.
//! - [`remote`]: [`remote::RemoteInstance`], the one instance for every
//!   backend that starts runtime servers, over a backend's
//!   [`remote::InstanceHandle`].
//! - [`process`]: the process backend: spawn, scrubbed environment, limits.
//! - [`wasm`]: the wasm backend: wasmtime in process, a fresh instance per run.
//! - [`pool`]: warm pool, specialisation, reaping.
//! - [`Backends`]: routes each language to its backend.

#[cfg(test)]
pub(crate) mod fake;
pub mod pool;
pub mod process;
pub mod protocol;
pub mod remote;
pub mod wasm;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::build::{BuildFailure, BuildState, Builder, Target};
use crate::language::Language;
use crate::registry::{CheckError, Code, FunctionVersion};

/// What a run is given.
#[derive(Debug, Clone, Copy)]
pub struct RunRequest<'a> {
    pub params: &'a Value,
    pub context: &'a Value,
    pub deadline: Duration,
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
    /// Whether the instance is still able to serve.
    fn is_alive(&mut self) -> bool;
    /// Stops the instance for good and releases what it holds. Dropping an
    /// instance does the same, best effort.
    async fn terminate(&mut self);
}

/// Each language's backend, as one [`RuntimeBackend`]; also the registry's
/// [`crate::registry::CodeCheck`], building Rust crates with the [`Builder`].
pub struct Backends {
    by_language: std::collections::BTreeMap<Language, std::sync::Arc<dyn RuntimeBackend>>,
    /// Why Rust crates cannot be built here, when they cannot.
    builder: Result<std::sync::Arc<Builder>, String>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.by_language.iter().map(|(l, b)| (l.as_str(), b.name())).collect();
        f.debug_struct("Backends").field("by_language", &names).finish()
    }
}

impl Backends {
    /// Every language of every backend; a later backend wins a language.
    pub fn new(
        backends: Vec<std::sync::Arc<dyn RuntimeBackend>>,
        builder: Result<std::sync::Arc<Builder>, String>,
    ) -> Self {
        let mut by_language = std::collections::BTreeMap::new();
        for backend in backends {
            for language in backend.languages() {
                by_language.insert(language, backend.clone());
            }
        }
        Backends { by_language, builder }
    }

    fn builder(&self) -> Result<&std::sync::Arc<Builder>, String> {
        self.builder
            .as_ref()
            .map_err(|e| format!("Rust functions cannot be built here: {e}"))
    }
}

/// What a crate of this language is built into.
pub fn build_target(language: Language) -> Target {
    match language {
        Language::Wasm => Target::Wasm,
        _ => Target::Native,
    }
}

#[async_trait]
impl crate::registry::CodeCheck for Backends {
    async fn check(&self, language: Language, code: Code<'_>, build: bool) -> Result<(), CheckError> {
        let Some(backend) = self.by_language.get(&language) else {
            return Ok(());
        };
        let files = match code {
            Code::File { entrypoint, text } => {
                return backend
                    .check_code(language, entrypoint, text)
                    .map_err(CheckError::Invalid);
            }
            Code::Crate(files) => files,
        };
        let builder = self.builder().map_err(CheckError::Invalid)?;
        let target = build_target(language);
        if !build {
            builder.ensure(target, files);
            return Ok(());
        }
        let artifact = builder.build(target, files).await.map_err(CheckError::BuildFailed)?;
        let bytes = tokio::fs::read(&artifact)
            .await
            .map_err(|e| CheckError::Invalid(format!("reading the built artifact: {e}")))?;
        backend.check_artifact(language, &bytes).map_err(CheckError::Invalid)
    }
}

/// Where the built artifact of a crate function is; `NotReady` or
/// `BuildFailed` when there is none yet. Starts a build this controller has
/// not seen (a function registered by another replica, or an artifact lost
/// with a data dir).
pub fn artifact_path(builder: &std::sync::Arc<Builder>, function: &FunctionVersion) -> Result<PathBuf, InstanceError> {
    let Some(files) = &function.files else {
        return Err(InstanceError::Protocol("the function is not a crate".into()));
    };
    match builder.ensure(build_target(function.language()), files) {
        BuildState::Ready(path) => Ok(path),
        BuildState::Building => Err(InstanceError::NotReady {
            message: format!(
                "function '{}' version {} is still being built; retry shortly",
                function.language_title, function.version
            ),
        }),
        BuildState::Failed(failure) => Err(InstanceError::BuildFailed(failure)),
    }
}

/// What `/init` sends for `function`: its source, or its built library as
/// base64. Resolved once per function version (the first specialisation
/// reads the artifact; later ones reuse it).
pub async fn init_payload(
    builder: Option<&std::sync::Arc<Builder>>,
    function: &FunctionVersion,
) -> Result<std::sync::Arc<protocol::InitPayload>, InstanceError> {
    use base64::Engine as _;
    function
        .init_payload
        .get_or_try_init(|| async {
            let (entrypoint, code): (String, std::sync::Arc<str>) = match (&function.files, builder) {
                (Some(_), Some(builder)) => {
                    let path = artifact_path(builder, function)?;
                    let bytes = tokio::fs::read(&path)
                        .await
                        .map_err(|e| InstanceError::Protocol(format!("reading the built artifact: {e}")))?;
                    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
                    (Target::Native.artifact_name().to_owned(), encoded.into())
                }
                (Some(_), None) => return Err(InstanceError::Protocol("no builder for a crate".into())),
                (None, _) => (function.manifest.entrypoint.clone(), function.code.as_str().into()),
            };
            Ok(std::sync::Arc::new(protocol::InitPayload {
                language_title: function.language_title.to_string(),
                version: function.version,
                entrypoint,
                handler: function.manifest.handler.clone(),
                code,
                env: serde_json::to_value(&function.manifest.env).unwrap_or_default(),
            }))
        })
        .await
        .cloned()
}

/// The built artifact of a crate function, read whole.
pub async fn built_artifact(
    builder: &std::sync::Arc<Builder>,
    function: &FunctionVersion,
) -> Result<Vec<u8>, InstanceError> {
    let path = artifact_path(builder, function)?;
    tokio::fs::read(&path)
        .await
        .map_err(|e| InstanceError::Protocol(format!("reading the built artifact: {e}")))
}

#[async_trait]
impl RuntimeBackend for Backends {
    fn name(&self) -> &'static str {
        "backends"
    }

    fn languages(&self) -> Vec<Language> {
        self.by_language.keys().copied().collect()
    }

    async fn ready(&self, function: &FunctionVersion) -> Result<(), InstanceError> {
        // Source functions, and crates whose artifact was already read.
        if function.files.is_none() || function.init_payload.initialized() {
            return Ok(());
        }
        let builder = self.builder().map_err(|message| InstanceError::Unavailable {
            language: function.language(),
            message,
        })?;
        artifact_path(builder, function).map(drop)
    }

    async fn start(&self, language: Language, memory_mb: u64) -> Result<Box<dyn Instance>, InstanceError> {
        match self.by_language.get(&language) {
            Some(backend) => backend.start(language, memory_mb).await,
            None => Err(InstanceError::Unavailable {
                language,
                message: "no backend runs this language".into(),
            }),
        }
    }
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
    /// Starts a generic, healthy, not yet initialised instance whose memory
    /// is capped at `memory_mb` (fixed for the instance's life, so set at start).
    async fn start(&self, language: Language, memory_mb: u64) -> Result<Box<dyn Instance>, InstanceError>;
}
