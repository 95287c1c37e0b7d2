//! The function manifest: `function.json` in a function folder, and the body
//! of a registration request (the same fields plus the code).
//!
//! [`FunctionSpec`] is what a user writes; [`Manifest`] is the checked,
//! defaults-filled form that is stored and handed to runtimes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::egress::{Egress, MAX_EGRESS};
use super::pipeline::{DEFAULT_MAX_STEPS, Pipeline, PipelineSpec, StepSpec};
use crate::language::{CRATE_ENTRYPOINT, Language};

/// Default per-execution timeout of a function, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Default memory cap of a function's instances, in MiB.
pub const DEFAULT_MEMORY_MB: u64 = 256;
/// Largest accepted source file.
pub const MAX_CODE_BYTES: usize = 512 * 1024;
/// Hard ceiling on a manifest's default timeout; the controller's own
/// maximum (`MAX_TIMEOUT_MS`) further bounds it when a session starts.
pub const MAX_MANIFEST_TIMEOUT_MS: u64 = 3_600_000;
/// Longest `cache.ttl_secs` a manifest may ask for (the controller's own
/// maximum still applies).
pub const MAX_CACHE_TTL_SECS: u64 = 7 * 24 * 3600;
const MIN_MEMORY_MB: u64 = 32;
const MAX_MEMORY_MB: u64 = 4096;
const MAX_EXAMPLES: usize = 32;
const MAX_ENV_VARS: usize = 64;
const MAX_ENV_VALUE_BYTES: usize = 4096;
const MAX_DESCRIPTION_CHARS: usize = 1024;
/// Variables the runtime sets itself; a manifest may not override them.
const RESERVED_ENV: [&str; 5] = ["PATH", "HOME", "LANG", "TMPDIR", "FNRT_RESULT_MARKER"];

/// A function as its author describes it (`function.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// One line, shown in listings.
    pub description: String,
    /// File name of the code; defaults to `index.js` / `main.py`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<String>,
    /// Exported function to call; defaults to `handler`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    #[serde(default)]
    pub schema: SchemaSpec,
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub examples: Vec<Value>,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// The environment the function sees; nothing of the host's is visible.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How its results may be cached.
    #[serde(default)]
    pub cache: CacheSpec,
    /// How its dependencies (`requirements.txt`, `package.json`) are installed.
    #[serde(default)]
    pub install: InstallSpec,
    /// Where its instances may connect (none but their own loopback by default).
    #[serde(default)]
    pub network: NetworkSpec,
    /// How its asynchronous executions are retried.
    #[serde(default)]
    pub retry: RetrySpec,
    /// A pipeline's steps (`pipeline-*` functions only; docs/pipelines.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepSpec>,
    /// A pipeline's output: a mapping over its params and steps' outputs
    /// (default: the last step's output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
}

/// `retry` in a manifest (asynchronous executions), or in one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Most attempts, the first included (1 to 10; default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The wait before the second attempt, doubled for each next one
    /// (100 to 600000 ms; default 1000), with jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
    /// Whether the function's own errors (`RUNTIME_ERROR`) are retried too
    /// (default false: only crashes, timeouts and unavailable runtimes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_errors: Option<bool>,
}

/// How asynchronous executions are retried, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff_ms: u64,
    pub runtime_errors: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff_ms: 1000,
            runtime_errors: false,
        }
    }
}

impl RetryPolicy {
    fn is_default(&self) -> bool {
        *self == RetryPolicy::default()
    }

    /// This policy with `spec`'s fields over it (`field` names them in errors).
    pub fn with(self, spec: RetrySpec, field: &str) -> Result<RetryPolicy, ManifestError> {
        let max_attempts = spec.max_attempts.unwrap_or(self.max_attempts);
        if !(1..=10).contains(&max_attempts) {
            return err(format!("'{field}.max_attempts' must be between 1 and 10"));
        }
        let backoff_ms = spec.backoff_ms.unwrap_or(self.backoff_ms);
        if !(100..=600_000).contains(&backoff_ms) {
            return err(format!("'{field}.backoff_ms' must be between 100 and 600000"));
        }
        Ok(RetryPolicy {
            max_attempts,
            backoff_ms,
            runtime_errors: spec.runtime_errors.unwrap_or(self.runtime_errors),
        })
    }
}

/// `network` in a manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Allowed destinations: `host[:port]`, `a.b.c.d[/n][:port]` or `*[:port]`
    /// (any public address, and DNS). See docs/function-manifest.md.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<String>,
}

/// A function's network, checked: empty means only its own loopback.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Network {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Egress>,
}

impl Network {
    pub fn is_empty(&self) -> bool {
        self.egress.is_empty()
    }
}

impl NetworkSpec {
    fn normalize(self, language: Language) -> Result<Network, ManifestError> {
        if self.egress.is_empty() {
            return Ok(Network::default());
        }
        if language == Language::Wasm {
            return err("'network.egress': wasm functions have no network (WASI sockets are not granted)");
        }
        if self.egress.len() > MAX_EGRESS {
            return err(format!("'network.egress' has more than {MAX_EGRESS} entries"));
        }
        let mut egress = Vec::with_capacity(self.egress.len());
        for text in &self.egress {
            let entry = Egress::parse(text).map_err(|m| ManifestError(format!("'network.egress': {m}")))?;
            if !egress.contains(&entry) {
                egress.push(entry);
            }
        }
        Ok(Network { egress })
    }
}

/// `install` in a manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstallSpec {
    /// Whether the dependencies' own install code may run (default false):
    /// pip may build from source (`setup.py`) instead of taking wheels
    /// only, and npm runs install scripts (offline, after the download).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub scripts: bool,
}

impl InstallSpec {
    fn is_default(&self) -> bool {
        *self == InstallSpec::default()
    }
}

/// `cache` in a manifest, as sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    /// Whether results are cached at all (default true); false for a
    /// function whose result is not a function of its params and context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// How long a result is kept, in seconds (default: the controller's
    /// `CACHE_TTL_SECS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// How long it is kept in the controller's memory (L1) when that
    /// should be shorter than in Redis (L2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l1_ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SchemaSpec {
    /// JSON Schema that `params` must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub params: Option<Value>,
    /// JSON Schema of the result (documentation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Default per-execution timeout when the client sends none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Memory cap of the function's instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
}

/// A checked manifest with every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub description: String,
    pub entrypoint: String,
    pub handler: String,
    pub schema: Schemas,
    pub examples: Vec<Value>,
    pub limits: Limits,
    pub env: BTreeMap<String, String>,
    /// Versions stored before the field existed read as the default.
    #[serde(default)]
    pub cache: CachePolicy,
    /// Whether the code is a package of files (`files` or an archive) for
    /// Node or Python, rather than one source file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub package: bool,
    /// How a package's dependencies are installed.
    #[serde(default, skip_serializing_if = "InstallSpec::is_default")]
    pub install: InstallSpec,
    /// Where its instances may connect.
    #[serde(default, skip_serializing_if = "Network::is_empty")]
    pub network: Network,
    /// How its asynchronous executions are retried.
    #[serde(default, skip_serializing_if = "RetryPolicy::is_default")]
    pub retry: RetryPolicy,
    /// A pipeline's checked steps (language `pipeline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Pipeline>,
}

/// A function's cache policy. `X-Cache-Control: max-age` still wins within
/// the controller's maximum, but never turns a disabled cache on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CachePolicy {
    pub enabled: bool,
    /// `None`: the controller's default.
    pub ttl_secs: Option<u64>,
    /// `None`: as long as in every other layer.
    pub l1_ttl_secs: Option<u64>,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            enabled: true,
            ttl_secs: None,
            l1_ttl_secs: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Schemas {
    #[schema(value_type = Object)]
    pub params: Value,
    #[schema(value_type = Object)]
    pub result: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    pub timeout_ms: u64,
    pub memory_mb: u64,
}

/// Why a manifest was refused; the message names the field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(pub String);

/// `schema.params` when a manifest gives none: any object.
pub fn default_params_schema() -> Value {
    json!({ "type": "object" })
}

fn err<T>(msg: impl Into<String>) -> Result<T, ManifestError> {
    Err(ManifestError(msg.into()))
}

impl CacheSpec {
    fn normalize(self) -> Result<CachePolicy, ManifestError> {
        let enabled = self.enabled.unwrap_or(true);
        if !enabled && (self.ttl_secs.is_some() || self.l1_ttl_secs.is_some()) {
            return err("'cache.ttl_secs' and 'cache.l1_ttl_secs' mean nothing with 'cache.enabled': false");
        }
        for (name, ttl) in [("ttl_secs", self.ttl_secs), ("l1_ttl_secs", self.l1_ttl_secs)] {
            if ttl.is_some_and(|t| !(1..=MAX_CACHE_TTL_SECS).contains(&t)) {
                return err(format!("'cache.{name}' must be between 1 and {MAX_CACHE_TTL_SECS}"));
            }
        }
        if let (Some(ttl), Some(l1)) = (self.ttl_secs, self.l1_ttl_secs)
            && l1 > ttl
        {
            return err("'cache.l1_ttl_secs' must not be longer than 'cache.ttl_secs'");
        }
        Ok(CachePolicy {
            enabled,
            ttl_secs: self.ttl_secs,
            l1_ttl_secs: self.l1_ttl_secs,
        })
    }
}

impl FunctionSpec {
    /// Checks every field and fills the defaults, for a function that is one
    /// source file (or a Rust crate).
    pub fn normalize(self, language: Language) -> Result<Manifest, ManifestError> {
        self.normalize_as(language, false)
    }

    /// Checks every field and fills the defaults; `package`: the code is a
    /// package of files (Node, Python), whose entrypoint may be a relative path.
    pub fn normalize_as(self, language: Language, package: bool) -> Result<Manifest, ManifestError> {
        if language == Language::Pipeline {
            if package {
                return err("a pipeline has no code: its manifest lists its 'steps'");
            }
            return self.normalize_pipeline(DEFAULT_MAX_STEPS);
        }
        if !self.steps.is_empty() || self.output.is_some() {
            return err("'steps' and 'output' belong to pipelines (pipeline-* functions)");
        }
        let description = self.description.trim().to_owned();
        if description.is_empty() {
            return err("'description' must not be empty");
        }
        if description.chars().count() > MAX_DESCRIPTION_CHARS {
            return err(format!(
                "'description' is longer than {MAX_DESCRIPTION_CHARS} characters"
            ));
        }
        let entrypoint = self
            .entrypoint
            .unwrap_or_else(|| language.default_entrypoint().to_owned());
        if !package && self.install.scripts {
            return err("'install' applies to packages (functions registered with 'files' or an 'archive')");
        }
        if package && !matches!(language, Language::Nodejs | Language::Python) {
            return err(format!(
                "'files' of a {language} function must be a Rust crate (Cargo.toml and src/lib.rs)"
            ));
        }
        if package {
            super::package::check_path(&entrypoint).map_err(|m| ManifestError(format!("'entrypoint' {m}")))?;
        } else if !valid_file_name(&entrypoint) {
            return err("'entrypoint' must be a plain file name matching [A-Za-z0-9_.-]{1,64}");
        }
        if !language
            .entrypoint_extensions()
            .iter()
            .any(|ext| entrypoint.ends_with(ext))
            || (entrypoint.ends_with(CRATE_ENTRYPOINT) && entrypoint != CRATE_ENTRYPOINT)
        {
            return err(format!(
                "'entrypoint' of a {language} function must end in {}",
                language.entrypoint_extensions().join(" or ")
            ));
        }
        let handler = self.handler.unwrap_or_else(|| "handler".to_owned());
        if !valid_identifier(&handler) {
            return err("'handler' must be an identifier matching [A-Za-z_][A-Za-z0-9_]{0,63}");
        }
        let params = self.schema.params.unwrap_or_else(default_params_schema);
        if params != default_params_schema()
            && let Err(e) = jsonschema::validator_for(&params)
        {
            return err(format!("'schema.params' is not a valid JSON Schema: {e}"));
        }
        let result = self.schema.result.unwrap_or_else(|| json!({}));
        if !result.is_object() && !result.is_boolean() {
            return err("'schema.result' must be a JSON Schema object");
        }
        if self.examples.len() > MAX_EXAMPLES {
            return err(format!("at most {MAX_EXAMPLES} 'examples'"));
        }
        let timeout_ms = self.limits.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        if timeout_ms == 0 || timeout_ms > MAX_MANIFEST_TIMEOUT_MS {
            return err(format!(
                "'limits.timeout_ms' must be between 1 and {MAX_MANIFEST_TIMEOUT_MS}"
            ));
        }
        let memory_mb = self.limits.memory_mb.unwrap_or(DEFAULT_MEMORY_MB);
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&memory_mb) {
            return err(format!(
                "'limits.memory_mb' must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB}"
            ));
        }
        if self.env.len() > MAX_ENV_VARS {
            return err(format!("at most {MAX_ENV_VARS} 'env' variables"));
        }
        for (key, value) in &self.env {
            if !valid_env_name(key) {
                return err("'env' names must match [A-Za-z_][A-Za-z0-9_]{0,127}");
            }
            if RESERVED_ENV.contains(&key.as_str()) {
                return err(format!("'env' may not set {key}: the runtime sets it"));
            }
            if value.len() > MAX_ENV_VALUE_BYTES || value.contains('\0') {
                return err(format!(
                    "'env.{key}' must be at most {MAX_ENV_VALUE_BYTES} bytes without NUL"
                ));
            }
        }
        let cache = self.cache.normalize()?;
        let network = self.network.normalize(language)?;
        let retry = RetryPolicy::default().with(self.retry, "retry")?;
        Ok(Manifest {
            description,
            entrypoint,
            handler,
            schema: Schemas { params, result },
            examples: self.examples,
            limits: Limits { timeout_ms, memory_mb },
            env: self.env,
            cache,
            package,
            install: self.install,
            network,
            retry,
            pipeline: None,
        })
    }

    /// Checks a pipeline's manifest (at most `max_steps` steps): its steps'
    /// structure, and the fields a pipeline has (description, schema,
    /// examples, `limits.timeout_ms` for the whole run, `cache.enabled` for
    /// its steps, `retry` for asynchronous runs). Fields about code and
    /// instances are refused, since a pipeline has neither.
    pub fn normalize_pipeline(mut self, max_steps: usize) -> Result<Manifest, ManifestError> {
        let refused = [
            ("entrypoint", self.entrypoint.is_some()),
            ("handler", self.handler.is_some()),
            ("limits.memory_mb", self.limits.memory_mb.is_some()),
            ("env", !self.env.is_empty()),
            ("install", !self.install.is_default()),
            ("network", !self.network.egress.is_empty()),
            (
                "cache.ttl_secs",
                self.cache.ttl_secs.is_some() || self.cache.l1_ttl_secs.is_some(),
            ),
        ];
        if let Some((field, _)) = refused.iter().find(|(_, set)| *set) {
            return err(format!(
                "'{field}' does not apply to a pipeline (each step's function has its own)"
            ));
        }
        let pipeline = PipelineSpec {
            steps: std::mem::take(&mut self.steps),
            output: self.output.take(),
        }
        .normalize(max_steps)?;
        // Checked like any function's, with nothing of code to check.
        let mut manifest = FunctionSpec {
            entrypoint: Some("pipeline.js".into()),
            ..self
        }
        .normalize_as(Language::Nodejs, false)?;
        manifest.entrypoint = String::new();
        manifest.handler = String::new();
        manifest.pipeline = Some(pipeline);
        Ok(manifest)
    }
}

impl Manifest {
    /// Whether the function is a Rust crate, built before it runs.
    pub fn is_crate(&self) -> bool {
        self.entrypoint == CRATE_ENTRYPOINT
    }

    /// Hash of everything that changes what the function does: its code and
    /// the manifest fields a runtime sees. Part of every cache key.
    pub fn code_hash(&self, code: &str) -> String {
        let mut behaviour = json!({
            "entrypoint": self.entrypoint,
            "handler": self.handler,
            "env": self.env,
            "limits": self.limits,
            "params": self.schema.params,
        });
        // Only when set: the hashes of functions without it stay as they were.
        if self.install.scripts {
            behaviour["install_scripts"] = json!(true);
        }
        if !self.network.is_empty() {
            behaviour["network"] = json!(self.network);
        }
        if let Some(pipeline) = &self.pipeline {
            behaviour["pipeline"] = json!(pipeline);
            behaviour["cache"] = json!(self.cache.enabled);
        }
        let mut h = Sha256::new();
        h.update(crate::cache::canonical_json(&behaviour).as_bytes());
        h.update([0]);
        h.update(code.as_bytes());
        hex::encode(h.finalize())
    }
}

/// Checks a function's source.
pub fn check_code(code: &str) -> Result<(), ManifestError> {
    if code.trim().is_empty() {
        return err("'code' must not be empty");
    }
    if code.len() > MAX_CODE_BYTES {
        return err(format!("'code' is larger than {MAX_CODE_BYTES} bytes"));
    }
    if code.contains('\0') {
        return err("'code' must not contain NUL bytes");
    }
    Ok(())
}

/// The files of a crate, as registered (`files`) and stored (`code` holds
/// their JSON).
pub type CrateFiles = BTreeMap<String, String>;

/// Most files in a crate.
const MAX_CRATE_FILES: usize = 64;
/// Deepest path in a crate (`src/a/b/c.rs`).
const MAX_CRATE_DEPTH: usize = 4;

/// The stored form of a crate's files.
pub fn crate_code(files: &CrateFiles) -> String {
    serde_json::to_string(files).unwrap_or_default()
}

/// Reads and checks a crate's files from their stored form.
pub fn crate_files(code: &str) -> Result<CrateFiles, ManifestError> {
    let files: CrateFiles = serde_json::from_str(code)
        .map_err(|_| ManifestError("a Rust crate is registered with 'files' (path -> text), not 'code'".into()))?;
    if files.len() > MAX_CRATE_FILES {
        return err(format!("at most {MAX_CRATE_FILES} 'files'"));
    }
    if code.len() > MAX_CODE_BYTES {
        return err(format!("'files' are larger than {MAX_CODE_BYTES} bytes in all"));
    }
    for (path, text) in &files {
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() > MAX_CRATE_DEPTH || parts.iter().any(|p| !valid_file_name(p) || p.starts_with('.')) {
            return err(format!(
                "'files' path {:?} must be relative, with at most {MAX_CRATE_DEPTH} parts of [A-Za-z0-9_.-] \
                 not starting with '.'",
                path.chars().take(80).collect::<String>()
            ));
        }
        if text.contains('\0') {
            return err(format!("'files.{path}' must not contain NUL bytes"));
        }
    }
    for required in [CRATE_ENTRYPOINT, "src/lib.rs"] {
        if !files.contains_key(required) {
            return err(format!(
                "a Rust crate needs '{required}' in 'files' (a library calling fnrt_sdk::export!)"
            ));
        }
    }
    Ok(files)
}

pub fn valid_file_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn valid_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && name.len() <= 128
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FunctionSpec {
        FunctionSpec {
            description: "d".into(),
            ..Default::default()
        }
    }

    #[test]
    fn fills_defaults() {
        let m = spec().normalize(Language::Python).unwrap();
        assert_eq!(m.entrypoint, "main.py");
        assert_eq!(m.handler, "handler");
        assert_eq!(m.limits.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(m.schema.params, json!({"type": "object"}));
    }

    #[test]
    fn refuses_paths_bad_limits_and_reserved_env() {
        let bad = [
            FunctionSpec {
                entrypoint: Some("../x.js".into()),
                ..spec()
            },
            FunctionSpec {
                entrypoint: Some("/etc/x.js".into()),
                ..spec()
            },
            FunctionSpec {
                entrypoint: Some("x.py".into()),
                ..spec()
            },
            FunctionSpec {
                handler: Some("a.b".into()),
                ..spec()
            },
            FunctionSpec {
                limits: LimitsSpec {
                    timeout_ms: Some(0),
                    memory_mb: None,
                },
                ..spec()
            },
            FunctionSpec {
                limits: LimitsSpec {
                    timeout_ms: Some(4_000_000),
                    memory_mb: None,
                },
                ..spec()
            },
            FunctionSpec {
                limits: LimitsSpec {
                    timeout_ms: None,
                    memory_mb: Some(1),
                },
                ..spec()
            },
            FunctionSpec {
                env: [("PATH".to_string(), "/x".to_string())].into(),
                ..spec()
            },
            FunctionSpec {
                env: [("A-B".to_string(), "x".to_string())].into(),
                ..spec()
            },
            FunctionSpec {
                schema: SchemaSpec {
                    params: Some(json!({"type": 12})),
                    result: None,
                },
                ..spec()
            },
            FunctionSpec {
                description: "  ".into(),
                ..Default::default()
            },
        ];
        for s in bad {
            let shown = format!("{s:?}");
            assert!(s.normalize(Language::Nodejs).is_err(), "accepted {shown}");
        }
    }

    #[test]
    fn code_hash_changes_with_code_and_env() {
        let m = spec().normalize(Language::Nodejs).unwrap();
        let h1 = m.code_hash("a");
        assert_ne!(h1, m.code_hash("b"));
        let mut m2 = m.clone();
        m2.env.insert("X".into(), "1".into());
        assert_ne!(h1, m2.code_hash("a"));
        let mut m3 = m.clone();
        m3.description = "other words".into();
        assert_eq!(h1, m3.code_hash("a"));
    }
}
