//! Functions as the core runs them: one immutable [`FunctionVersion`]
//! (manifest, code, compiled params schema), the manifest format
//! ([`manifest`], with [`egress`] for `network.egress`), and the check a backend makes of code before it is
//! registered ([`CodeCheck`]).

pub mod egress;
pub mod manifest;
pub mod package;
pub mod pipeline;

use std::sync::Arc;

use anyhow::Context;
use serde_json::{Value, json};
use time::OffsetDateTime;

pub use manifest::{CrateFiles, FunctionSpec, Manifest, ManifestError};
pub use package::{FileContent, PackageFiles, PackageLimits};

use crate::artifact::BuildFailure;
use crate::language::{Language, LanguageTitle};

/// One immutable version of a function, ready to run.
pub struct FunctionVersion {
    pub language_title: LanguageTitle,
    pub version: i64,
    pub manifest: Manifest,
    pub code: String,
    /// sha256 of code and behaviour-relevant manifest fields.
    pub code_hash: String,
    pub created_at: OffsetDateTime,
    /// A Rust crate's files (when `manifest.is_crate()`).
    pub files: Option<CrateFiles>,
    /// What a package asks to install (`requirements.txt`, `package.json`).
    pub dependencies: Option<package::DependencyFiles>,
    /// `schema.params`, compiled once.
    validator: jsonschema::Validator,
    /// What `/init` sends, resolved at the first specialisation
    /// ([`crate::runtime::init_payload`]) and kept for the version's life.
    pub init_payload: tokio::sync::OnceCell<Arc<crate::runtime::protocol::InitPayload>>,
}

impl std::fmt::Debug for FunctionVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionVersion")
            .field("language_title", &self.language_title)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl FunctionVersion {
    /// A version from its parts: the params schema is compiled and a
    /// crate's files are parsed here, once.
    pub fn new(
        language_title: LanguageTitle,
        version: i64,
        manifest: Manifest,
        code: String,
        code_hash: String,
        created_at: OffsetDateTime,
    ) -> anyhow::Result<Self> {
        let validator =
            jsonschema::validator_for(&manifest.schema.params).map_err(|e| anyhow::anyhow!("params schema: {e}"))?;
        let files = match manifest.is_crate() {
            true => Some(manifest::crate_files(&code).context("crate files")?),
            false => None,
        };
        let dependencies = match manifest.package {
            true => {
                let files: PackageFiles = serde_json::from_str(&code).context("package files")?;
                package::DependencyFiles::of(language_title.language(), &files, manifest.install.scripts)
            }
            false => None,
        };
        Ok(FunctionVersion {
            language_title,
            version,
            manifest,
            files,
            dependencies,
            code,
            code_hash,
            created_at,
            validator,
            init_payload: tokio::sync::OnceCell::new(),
        })
    }

    pub fn language(&self) -> Language {
        self.language_title.language()
    }

    /// A pipeline's steps, for a `pipeline-*` function.
    pub fn pipeline(&self) -> Option<&pipeline::Pipeline> {
        self.manifest.pipeline.as_ref()
    }

    /// Whether `params` satisfy `schema.params` (what [`Self::validate_params`]
    /// checks, without building the error).
    pub fn accepts(&self, params: &Value) -> bool {
        self.validator.is_valid(params)
    }

    /// Checks `params` against `schema.params`; the error lists every problem
    /// with its JSON pointer.
    pub fn validate_params(&self, params: &Value) -> Result<(), Value> {
        let errors: Vec<Value> = self
            .validator
            .iter_errors(params)
            .take(20)
            .map(|e| json!({ "path": e.instance_path().to_string(), "message": e.to_string() }))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(json!({ "errors": errors }))
        }
    }
}

/// Checks code a runtime must accept before it is stored (that a wasm
/// module compiles, that a Rust crate builds), so a bad function is refused
/// at registration.
#[async_trait::async_trait]
pub trait CodeCheck: Send + Sync {
    /// With `build` false (bundled functions at start-up), a crate is only
    /// queued for a background build instead of built now.
    async fn check(&self, language: Language, code: Code<'_>, build: bool) -> Result<(), CheckError>;
}

/// A function's code, as [`CodeCheck`] sees it.
#[derive(Debug, Clone, Copy)]
pub enum Code<'a> {
    /// One source file: the entrypoint's name and its text.
    File { entrypoint: &'a str, text: &'a str },
    /// A Rust crate's files.
    Crate(&'a CrateFiles),
    /// A Node or Python package's files, and whether its dependencies'
    /// install code may run.
    Package { files: &'a PackageFiles, scripts: bool },
}

/// Why [`CodeCheck`] refused a function.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Invalid(String),
    #[error("{}", .0.message)]
    BuildFailed(BuildFailure),
}
