//! Functions as the core runs them: one immutable [`FunctionVersion`]
//! (manifest, code, compiled params schema), the manifest format
//! ([`manifest`], with [`egress`] for `network.egress`), and the check a backend makes of code before it is
//! registered ([`CodeCheck`]).

pub mod egress;
pub mod manifest;
pub mod package;
pub mod pipeline;

use std::sync::{Arc, LazyLock};

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
    /// The subject that registered the function (`None`: bundled): a
    /// crate builds in its owner's work directory.
    pub owner: Option<String>,
    /// Which registration of the name this version belongs to (the store's,
    /// empty until set). A function deleted and registered again counts
    /// from version 1 again under a new registration, so whatever is kept
    /// per version (idle instances) is told apart by it.
    pub registration: Arc<str>,
    /// `schema.params`, compiled once (the default needs no compile).
    params: ParamsSchema,
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
        let params = ParamsSchema::compile(&manifest.schema.params)?;
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
            owner: None,
            registration: Arc::from(""),
            code,
            code_hash,
            created_at,
            params,
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
        match &self.params {
            ParamsSchema::AnyObject => params.is_object(),
            ParamsSchema::Compiled(v) => v.is_valid(params),
        }
    }

    /// Checks `params` against `schema.params`; the error lists every problem
    /// with its JSON pointer.
    pub fn validate_params(&self, params: &Value) -> Result<(), Value> {
        let validator = match &self.params {
            ParamsSchema::AnyObject if params.is_object() => return Ok(()),
            ParamsSchema::AnyObject => &*ANY_OBJECT,
            ParamsSchema::Compiled(v) => v,
        };
        let errors: Vec<Value> = validator
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

/// A function's `schema.params`. Most functions keep the default, any
/// object, which needs no validator: such a function never compiles one
/// (a compile validates the schema against its draft's meta-schema, code
/// that would otherwise stay in the controller's memory after every
/// registration and start-up).
enum ParamsSchema {
    AnyObject,
    Compiled(jsonschema::Validator),
}

/// The default schema, compiled once in the process for the errors of
/// params that are not an object.
static ANY_OBJECT: LazyLock<jsonschema::Validator> =
    LazyLock::new(|| jsonschema::validator_for(&manifest::default_params_schema()).expect("a valid schema"));

impl ParamsSchema {
    fn compile(schema: &Value) -> anyhow::Result<Self> {
        if *schema == manifest::default_params_schema() {
            return Ok(ParamsSchema::AnyObject);
        }
        let validator = jsonschema::validator_for(schema).map_err(|e| anyhow::anyhow!("params schema: {e}"))?;
        Ok(ParamsSchema::Compiled(validator))
    }
}

/// Checks code a runtime must accept before it is stored (that a wasm
/// module compiles, that a Rust crate builds), so a bad function is refused
/// at registration.
#[async_trait::async_trait]
pub trait CodeCheck: Send + Sync {
    /// With `build` false (bundled functions at start-up), a crate is only
    /// queued for a background build instead of built now. Returns what
    /// the check keeps on disk for the code beside the code itself, in
    /// bytes: a package's installed dependencies (0 for none, or when
    /// nothing was installed now).
    async fn check(&self, language: Language, code: Code<'_>, build: bool) -> Result<u64, CheckError>;
}

/// A function's code, as [`CodeCheck`] sees it.
#[derive(Debug, Clone, Copy)]
pub enum Code<'a> {
    /// One source file: the entrypoint's name and its text.
    File { entrypoint: &'a str, text: &'a str },
    /// A Rust crate's files, and the subject that owns the function
    /// (`None`: bundled), whose work directory builds it.
    Crate {
        files: &'a CrateFiles,
        owner: Option<&'a str>,
    },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn version(spec: Value) -> FunctionVersion {
        let spec: FunctionSpec = serde_json::from_value(spec).unwrap();
        let manifest = spec.normalize(Language::Nodejs).unwrap();
        let title = "nodejs-params".parse().unwrap();
        FunctionVersion::new(title, 1, manifest, "ok".into(), "h".into(), OffsetDateTime::now_utc()).unwrap()
    }

    #[test]
    fn a_function_without_a_params_schema_takes_any_object_and_names_what_else_it_got() {
        let f = version(json!({"description": "untyped"}));
        assert!(matches!(f.params, ParamsSchema::AnyObject));
        assert!(f.accepts(&json!({"n": 1})));
        assert_eq!(f.validate_params(&json!({})), Ok(()));
        assert!(!f.accepts(&json!([1])));
        let errors = f.validate_params(&json!([1])).unwrap_err();
        assert_eq!(errors["errors"][0]["path"], "");
        let message = errors["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("object"), "{message}");
    }

    #[test]
    fn a_params_schema_of_its_own_is_compiled_and_checked() {
        let f = version(json!({
            "description": "typed",
            "schema": {"params": {"type": "object", "required": ["n"]}}
        }));
        assert!(matches!(f.params, ParamsSchema::Compiled(_)));
        assert!(f.accepts(&json!({"n": 1})));
        assert!(!f.accepts(&json!({})));
        let errors = f.validate_params(&json!({})).unwrap_err();
        let message = errors["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("\"n\""), "{message}");
    }
}
