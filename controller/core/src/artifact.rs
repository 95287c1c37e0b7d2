//! Built artifacts, as the core sees them: what a crate is built into
//! ([`Target`]), where its build stands ([`BuildState`]) and why one failed
//! ([`BuildFailure`]). The builder itself is a backend's
//! (`fnrt_backends::build`).

use std::path::PathBuf;

use crate::language::Language;

/// What a crate is built into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// A native shared library for the Rust runtime.
    Native,
    /// A `wasm32-wasip1` command module for the wasm backend.
    Wasm,
}

impl Target {
    /// The artifact's file name (also the name a runtime gets it under).
    pub fn artifact_name(self) -> &'static str {
        match self {
            Target::Native => "function.so",
            Target::Wasm => "function.wasm",
        }
    }
}

/// Why a build failed: a one-line summary and the compiler's messages.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildFailure {
    pub message: String,
    /// Rendered compiler diagnostics (errors first), or cargo's own output
    /// when it failed before compiling.
    pub messages: Vec<String>,
}

/// Where a function's build stands on this controller.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildState {
    Building,
    Ready(PathBuf),
    Failed(BuildFailure),
}

impl BuildState {
    pub fn as_str(&self) -> &'static str {
        match self {
            BuildState::Building => "building",
            BuildState::Ready(_) => "ready",
            BuildState::Failed(_) => "failed",
        }
    }
}

impl Target {
    /// What a crate of this language is built into.
    pub fn for_language(language: Language) -> Target {
        match language {
            Language::Wasm => Target::Wasm,
            _ => Target::Native,
        }
    }
}
