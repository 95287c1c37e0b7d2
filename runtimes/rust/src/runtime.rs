//! The state of this instance (the one function it serves, the one-init rule, the
//! one-run-at-a-time rule) and the answers to `/health`, `/init` and `/run`.
//!
//! `/init` and `/run` come in two steps: [`Runtime::begin_init`] and [`Runtime::begin_run`] check
//! the body and the instance's state and answer at once when they refuse (so a refusal never waits
//! behind a run); what they hand back, an [`Init`] or a [`Run`], runs the function's code
//! ([`Init::load`], [`Run::call`]) and is meant for the function thread (see `server`).
//!
//! Everything a run wrote is in the pipes before its answer. A /run with a `log_marker` ends with
//! it on stdout and stderr, before its answer: the controller reads both line by line and ends the
//! run's logs there.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::function::{Function, LoadError};

/// Directory (in the instance directory) the function's library is written to.
const FUNCTION_DIR: &str = "function";

/// The only variables of the runtime's own environment the function keeps.
pub(crate) const INHERITED_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TMPDIR"];

/// The rustc that built this runtime (see build.rs).
const RUNTIME_VERSION: &str = env!("FNRT_RUSTC_VERSION");

/// An answer to send: status, JSON body, and an `Allow` header for 405s.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
    pub(crate) allow: Option<&'static str>,
}

/// `Runtime::init_state`: no /init yet.
const INIT_NONE: u8 = 0;
/// `Runtime::init_state`: an /init got past validation and is loading the library.
const INIT_LOADING: u8 = 1;
/// `Runtime::init_state`: the one /init is over (`function` is set if it succeeded).
const INIT_DONE: u8 = 2;

/// The state of this instance.
#[derive(Debug)]
pub(crate) struct Runtime {
    /// Where `function/` goes: `.` (the working directory, the instance directory) in production.
    instance_dir: PathBuf,
    /// PATH, HOME, LANG, TMPDIR as they were at start-up: they win over the function's `env`.
    inherited_env: Vec<(OsString, OsString)>,
    /// `INIT_NONE`, then `INIT_LOADING` once an /init got past validation, then `INIT_DONE` (even
    /// if it failed): one /init per instance.
    init_state: AtomicU8,
    /// The function, once an /init succeeded.
    function: OnceLock<Function>,
    /// True during a run: one at a time.
    running: AtomicBool,
    /// The controller's files socket (`files.sock` beside ours), handed to
    /// the function with a run's `files_token`.
    files_socket: Option<PathBuf>,
}

/// A field of a request body that is not what the protocol says: 400 BAD_REQUEST.
fn bad_request(message: impl Into<String>) -> Answer {
    error(400, "BAD_REQUEST", message.into(), None)
}

/// `{"error":{"code","message"[,"details"]}}` with `status`.
pub(crate) fn error(status: u16, code: &str, message: String, details: Option<Value>) -> Answer {
    let mut error = Map::new();
    error.insert("code".to_owned(), Value::from(code));
    error.insert("message".to_owned(), Value::from(message));
    if let Some(details) = details {
        error.insert("details".to_owned(), details);
    }
    json_response(status, &json!({ "error": error }))
}

fn json_response(status: u16, value: &Value) -> Answer {
    // Serialising a Value (string keys only) cannot fail.
    let body = serde_json::to_vec(value).unwrap_or_default();
    Answer {
        status,
        body,
        allow: None,
    }
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Answer> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(bad_request("body must be a JSON object")),
        Err(e) => Err(bad_request(format!("body is not valid JSON: {e}"))),
    }
}

/// Field `name` of `body` if present, checked with `is_ok` (else 400 saying it `must be {what}`).
fn field<'a>(
    body: &'a Map<String, Value>,
    name: &str,
    is_ok: impl Fn(&Value) -> bool,
    what: &str,
) -> Result<Option<&'a Value>, Answer> {
    match body.get(name) {
        None => Ok(None),
        Some(value) if is_ok(value) => Ok(Some(value)),
        Some(_) => Err(bad_request(format!("'{name}' must be {what}"))),
    }
}

fn required_string<'a>(body: &'a Map<String, Value>, name: &str) -> Result<&'a str, Answer> {
    field(body, name, Value::is_string, "a string")?
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request(format!("'{name}' is required")))
}

/// A valid /init body.
#[derive(Debug)]
struct InitRequest {
    entrypoint: String,
    code: String,
    env: Vec<(String, String)>,
}

/// What a /run's `log_marker` must be.
const LOG_MARKER_RULE: &str = "a string of 16 to 64 characters from [A-Za-z0-9_-]";

fn valid_log_marker(marker: &str) -> bool {
    (16..=64).contains(&marker.len())
        && marker
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

fn valid_entrypoint(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c))
        && name != "."
        && name != ".."
}

fn parse_init(mut body: Map<String, Value>) -> Result<InitRequest, Answer> {
    let entrypoint = required_string(&body, "entrypoint")?.to_owned();
    required_string(&body, "code")?;
    // Informational (the library's export! decides what runs), checked so a confused caller hears.
    field(&body, "handler", Value::is_string, "a string")?;
    field(&body, "language_title", Value::is_string, "a string")?;
    field(&body, "version", |v| v.is_i64() || v.is_u64(), "an integer")?;
    let env = field(&body, "env", Value::is_object, "an object of strings")?;

    if !valid_entrypoint(&entrypoint) {
        return Err(bad_request(
            "'entrypoint' must be a plain file name matching [A-Za-z0-9_.-]{1,64}",
        ));
    }
    let mut pairs = Vec::new();
    for (key, value) in env.and_then(Value::as_object).into_iter().flatten() {
        let Some(value) = value.as_str() else {
            return Err(bad_request(format!("env value of '{key}' must be a string")));
        };
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(bad_request(
                "env names must be non-empty without '=' or NUL, values without NUL",
            ));
        }
        pairs.push((key.clone(), value.to_owned()));
    }
    // Moved out, not copied: it is most of the body (up to 64 MiB).
    let Some(Value::String(code)) = body.remove("code") else {
        unreachable!("checked above to be a string");
    };
    Ok(InitRequest {
        entrypoint,
        code,
        env: pairs,
    })
}

/// Clears the running flag when a run ends, however it ends (also if it never starts).
#[derive(Debug)]
struct Running(Arc<Runtime>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

/// Marks the instance's one /init over when loading ends, however it ends (also if it never
/// starts).
#[derive(Debug)]
struct Loading(Arc<Runtime>);

impl Drop for Loading {
    fn drop(&mut self) {
        self.0.init_state.store(INIT_DONE, Ordering::Release);
    }
}

/// An /init that passed validation and holds the instance's one init: [`Init::load`] runs it.
#[derive(Debug)]
pub(crate) struct Init {
    request: InitRequest,
    loading: Loading,
}

impl Init {
    /// Writes the library, replaces the environment, loads the library (running its
    /// initialisers, the function's code): the /init answer.
    pub(crate) fn load(self) -> Answer {
        let runtime = &self.loading.0;
        match runtime.load(&self.request) {
            Ok(function) => {
                // Cannot be set already: only the one Init sets it, before INIT_DONE.
                let _ = runtime.function.set(function);
                json_response(200, &json!({"status": "initialized"}))
            }
            Err(e) => error(422, "INIT_ERROR", e.message, Some(json!({"type": e.kind}))),
        }
        // `self.loading` drops here: INIT_DONE, after the function was set.
    }
}

/// A /run that passed validation and holds the instance's one run: [`Run::call`] runs it.
#[derive(Debug)]
pub(crate) struct Run {
    function: Function,
    /// `{"params":…,"context":…}`.
    input: Vec<u8>,
    /// Written on stdout and stderr when the run ends.
    log_marker: Option<String>,
    _running: Running,
}

impl Run {
    /// Calls the function (for as long as it runs): the /run answer.
    pub(crate) fn call(self) -> Answer {
        let answer = self.function.call(&self.input);
        let answer = if is_answer(&answer) {
            Answer {
                status: 200,
                body: answer,
                allow: None,
            }
        } else {
            let message = "the function returned a malformed answer".to_owned();
            error(200, "RUNTIME_ERROR", message, Some(json!({"type": "ProtocolError"})))
        };
        // After all the function wrote: fnrt-sdk flushes the library's own stdout (its std is not
        // ours) after every call. Without a marker, all of it is in the pipes before the answer.
        match &self.log_marker {
            Some(marker) => end_logs(marker, &mut io::stdout().lock(), &mut io::stderr().lock()),
            None => {
                let _ = io::stdout().flush();
            }
        }
        // `self._running` drops here: the next run starts after the markers.
        answer
    }
}

/// Writes `marker` and a newline to `stdout`, then to `stderr`. No newline before it: the
/// controller takes a line that ends with the marker as the end. Errors are ignored: a closed pipe
/// has nobody to tell.
fn end_logs(marker: &str, stdout: &mut dyn Write, stderr: &mut dyn Write) {
    let line = format!("{marker}\n");
    let _ = stdout.write_all(line.as_bytes()).and_then(|()| stdout.flush());
    let _ = stderr.write_all(line.as_bytes()).and_then(|()| stderr.flush());
}

impl Runtime {
    /// A fresh instance writing under `instance_dir`, keeping `inherited_env` for the function.
    pub(crate) fn new(instance_dir: PathBuf, inherited_env: Vec<(OsString, OsString)>) -> Runtime {
        Runtime {
            instance_dir,
            inherited_env,
            init_state: AtomicU8::new(INIT_NONE),
            function: OnceLock::new(),
            running: AtomicBool::new(false),
            files_socket: None,
        }
    }

    /// Hands runs' files keys to the function with this socket.
    pub(crate) fn with_files_socket(mut self, socket: PathBuf) -> Runtime {
        self.files_socket = Some(socket);
        self
    }

    /// An initialised instance (tests stand in for a library with raw entry points).
    #[cfg(test)]
    pub(crate) fn with_function(function: Function) -> Runtime {
        let runtime = Runtime::new(PathBuf::from("."), Vec::new());
        runtime.init_state.store(INIT_DONE, Ordering::Release);
        runtime.function.set(function).unwrap();
        runtime
    }

    fn initialized(&self) -> bool {
        self.function.get().is_some()
    }

    pub(crate) fn health(&self) -> Answer {
        json_response(
            200,
            &json!({
                "status": "ok",
                "language": "rust",
                "runtime_version": RUNTIME_VERSION,
                "initialized": self.initialized(),
            }),
        )
    }

    /// Checks an /init body and claims the instance's one init: the [`Init`] to load, or the
    /// answer (400 for a malformed body, which spends nothing; 409 once an /init got this far).
    pub(crate) fn begin_init(self: &Arc<Self>, body: &[u8]) -> Result<Init, Answer> {
        let request = parse_init(parse_object(body)?)?;
        if let Err(state) =
            self.init_state
                .compare_exchange(INIT_NONE, INIT_LOADING, Ordering::AcqRel, Ordering::Acquire)
        {
            let message = match state {
                INIT_LOADING => "an /init is already in progress on this instance".to_owned(),
                _ if self.initialized() => "this instance already initialized; it loads one function once".to_owned(),
                _ => "this instance already failed to initialize; it loads one function once".to_owned(),
            };
            return Err(error(409, "ALREADY_INITIALIZED", message, None));
        }
        // From here on the instance's one /init is spent, whatever happens.
        Ok(Init {
            request,
            loading: Loading(Arc::clone(self)),
        })
    }

    /// Writes the library, replaces the environment, loads the library. Called by the one [`Init`].
    fn load(&self, request: &InitRequest) -> Result<Function, LoadError> {
        let library = base64::engine::general_purpose::STANDARD
            .decode(&request.code)
            .map_err(|e| LoadError {
                kind: "DecodeError",
                message: format!("'code' is not valid base64: {e}"),
            })?;
        let path = self.instance_dir.join(FUNCTION_DIR).join(&request.entrypoint);
        write_library(&path, &library).map_err(|e| LoadError {
            kind: "IoError",
            message: format!("cannot write the function's library: {e}"),
        })?;
        self.replace_environment(&request.env);
        Function::load(&path)
    }

    /// After this the process environment is exactly `env` plus PATH, HOME, LANG, TMPDIR as the
    /// runtime got them (those four win, as in the other runtimes).
    #[allow(unsafe_code)]
    fn replace_environment(&self, env: &[(String, String)]) {
        // SAFETY (for every set_var/remove_var below): they are unsound only while another thread
        // reads or writes the environment. This runs for the instance's one /init (`begin_init`
        // lets one through), on the function thread, before the function's library is loaded
        // (none of its code has run, none of its threads exist) and before the function is set (no
        // /run can start). The function thread's own tokio runtime and hyper are not polled while
        // this runs on it. The process has one other thread, the main thread, which serves HTTP:
        // a current-thread tokio runtime (epoll, a timer) and hyper, plus serde_json, none of
        // which reads the environment. tokio read its own variables (TOKIO_*) when the runtimes
        // were built, at start-up, and starts no thread of its own: a current-thread runtime's only
        // extra threads would be its blocking pool's, and nothing here calls `spawn_blocking` or
        // tokio's file or DNS functions. No thread is spawned after start-up, and the function
        // thread was spawned with an explicit stack size, so std::thread never read
        // RUST_MIN_STACK; the inherited variables were read once at start-up.
        for (key, _) in std::env::vars_os() {
            // Such names cannot be removed (unsetenv refuses them) and cannot be set either.
            if key.is_empty() || key.as_encoded_bytes().contains(&b'=') {
                continue;
            }
            // SAFETY: see above.
            unsafe { std::env::remove_var(&key) };
        }
        for (key, value) in env {
            // SAFETY: see above; names and values were checked (no '=', no NUL, non-empty name).
            unsafe { std::env::set_var(key, value) };
        }
        for (key, value) in &self.inherited_env {
            // SAFETY: see above; these came from the environment, so they are valid names and values.
            unsafe { std::env::set_var(key, value) };
        }
    }

    /// Checks a /run body and claims the instance's one run: the [`Run`] to call, or the answer
    /// (400 for a malformed body, 409 before a successful /init or during another run).
    pub(crate) fn begin_run(self: &Arc<Self>, body: &[u8]) -> Result<Run, Answer> {
        let mut body = parse_object(body)?;
        field(&body, "params", Value::is_object, "an object")?;
        field(&body, "context", Value::is_object, "an object")?;
        // Informational: the controller enforces the deadline by killing the process.
        field(
            &body,
            "deadline_ms",
            |v| v.as_f64().is_some_and(|d| d >= 0.0),
            "a non-negative number",
        )?;
        let files_token = field(
            &body,
            "files_token",
            |v| {
                v.as_str().is_some_and(|t| {
                    t.len() == 64 && t.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                })
            },
            "64 lowercase hex characters",
        )?
        .and_then(Value::as_str)
        .map(str::to_owned);
        let log_marker = field(
            &body,
            "log_marker",
            |v| v.as_str().is_some_and(valid_log_marker),
            LOG_MARKER_RULE,
        )?
        .and_then(Value::as_str)
        .map(str::to_owned);

        let Some(&function) = self.function.get() else {
            return Err(error(
                409,
                "NOT_INITIALIZED",
                "POST /init must succeed before /run".to_owned(),
                None,
            ));
        };
        if self
            .running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(error(
                409,
                "BUSY",
                "a run is already in progress on this instance".to_owned(),
                None,
            ));
        }
        let running = Running(Arc::clone(self));

        let mut call = Map::new();
        for name in ["params", "context"] {
            let value = body.remove(name).unwrap_or_else(|| Value::Object(Map::new()));
            call.insert(name.to_owned(), value);
        }
        // The SDK's `Context::files` (docs/runtime-protocol.md, "Files").
        if let (Some(token), Some(socket)) = (files_token, &self.files_socket) {
            call.insert(
                "files".to_owned(),
                json!({"socket": socket.to_string_lossy(), "token": token}),
            );
        }
        Ok(Run {
            function,
            input: serde_json::to_vec(&call).unwrap_or_default(),
            log_marker,
            _running: running,
        })
    }
}

/// Whether `answer` is a /run answer: a JSON object with `result` or `error`.
fn is_answer(answer: &[u8]) -> bool {
    match serde_json::from_slice::<Value>(answer) {
        Ok(Value::Object(object)) => object.contains_key("result") || object.contains_key("error"),
        _ => false,
    }
}

/// Writes `bytes` to `path` in a fresh file of its own (never through a planted symlink).
fn write_library(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // create_new is O_CREAT|O_EXCL, which does not follow a symlink at the last component.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_of(response: &Answer) -> Value {
        serde_json::from_slice(&response.body).unwrap()
    }

    /// An /init from start to end, on this thread.
    fn init(runtime: &Arc<Runtime>, body: &[u8]) -> Answer {
        runtime.begin_init(body).map_or_else(|answer| answer, Init::load)
    }

    /// A /run from start to end, on this thread.
    fn run(runtime: &Arc<Runtime>, body: &[u8]) -> Answer {
        runtime.begin_run(body).map_or_else(|answer| answer, Run::call)
    }

    fn fresh(dir: &tempfile::TempDir) -> Arc<Runtime> {
        Arc::new(Runtime::new(dir.path().to_owned(), Vec::new()))
    }

    #[test]
    fn entrypoints() {
        for ok in ["function.so", "a", "A-b_c.1", &"x".repeat(64)] {
            assert!(valid_entrypoint(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "a\n", "é", &"x".repeat(65)] {
            assert!(!valid_entrypoint(bad), "{bad}");
        }
    }

    #[test]
    fn log_markers() {
        for ok in [
            "a".repeat(16),
            "fnrt-log-end-0123456789abcdef".to_owned(),
            "Z9_-".repeat(16),
        ] {
            assert!(valid_log_marker(&ok), "{ok}");
        }
        let bad = [
            "a".repeat(15),
            "a".repeat(65),
            format!("{}\n", "a".repeat(16)),
            format!("{}!", "a".repeat(16)),
            format!("{} ", "a".repeat(16)),
            "é".repeat(16),
            String::new(),
        ];
        for bad in bad {
            assert!(!valid_log_marker(&bad), "{bad:?}");
        }
    }

    #[test]
    fn the_end_of_a_runs_logs() {
        let (mut stdout, mut stderr) = (b"partial".to_vec(), Vec::new());
        end_logs("fnrt-log-end-0123456789abcdef", &mut stdout, &mut stderr);
        assert_eq!(stdout, b"partialfnrt-log-end-0123456789abcdef\n");
        assert_eq!(stderr, b"fnrt-log-end-0123456789abcdef\n");
    }

    #[test]
    fn init_bodies_that_do_not_spend_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = fresh(&dir);
        for (body, message) in [
            ("nope", "body is not valid JSON: "),
            ("[]", "body must be a JSON object"),
            ("{}", "'entrypoint' is required"),
            (r#"{"entrypoint": 1, "code": ""}"#, "'entrypoint' must be a string"),
            (r#"{"entrypoint": "f.so"}"#, "'code' is required"),
            (
                r#"{"entrypoint": "../f.so", "code": ""}"#,
                "'entrypoint' must be a plain file name",
            ),
            (
                r#"{"entrypoint": "f.so", "code": "", "version": 1.5}"#,
                "'version' must be an integer",
            ),
            (
                r#"{"entrypoint": "f.so", "code": "", "handler": null}"#,
                "'handler' must be a string",
            ),
            (
                r#"{"entrypoint": "f.so", "code": "", "env": []}"#,
                "'env' must be an object of strings",
            ),
            (
                r#"{"entrypoint": "f.so", "code": "", "env": {"A": 1}}"#,
                "env value of 'A' must be a string",
            ),
            (
                r#"{"entrypoint": "f.so", "code": "", "env": {"A=B": "x"}}"#,
                "env names must be non-empty",
            ),
        ] {
            let response = init(&runtime, body.as_bytes());
            assert_eq!(response.status, 400, "{body}");
            let answer = answer_of(&response);
            assert_eq!(answer["error"]["code"], "BAD_REQUEST");
            let text = answer["error"]["message"].as_str().unwrap();
            assert!(text.starts_with(message), "{body}: {text}");
        }
        assert_eq!(runtime.init_state.load(Ordering::Acquire), INIT_NONE);
    }

    #[test]
    fn bad_base64_spends_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = fresh(&dir);
        let body = br#"{"entrypoint": "function.so", "code": "%%%", "env": {}, "version": 1}"#;
        let response = init(&runtime, body);
        assert_eq!(response.status, 422);
        let answer = answer_of(&response);
        assert_eq!(answer["error"]["code"], "INIT_ERROR");
        assert_eq!(answer["error"]["details"], json!({"type": "DecodeError"}));

        let again = init(&runtime, body);
        assert_eq!(again.status, 409);
        assert_eq!(
            answer_of(&again)["error"]["message"],
            "this instance already failed to initialize; it loads one function once"
        );
        let answer = run(&runtime, b"{}");
        assert_eq!(
            (answer.status, answer_of(&answer)["error"]["code"].clone()),
            (409, json!("NOT_INITIALIZED"))
        );
        assert_eq!(answer_of(&runtime.health())["initialized"], false);
    }

    #[test]
    fn an_init_is_spent_however_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = fresh(&dir);
        let body = br#"{"entrypoint": "function.so", "code": ""}"#;
        let first = runtime.begin_init(body).unwrap();
        let again = runtime.begin_init(body).unwrap_err();
        assert_eq!(
            (again.status, answer_of(&again)["error"]["message"].clone()),
            (409, json!("an /init is already in progress on this instance"))
        );
        // Never loaded (say its thread went away): spent all the same.
        drop(first);
        let again = runtime.begin_init(body).unwrap_err();
        assert_eq!(
            answer_of(&again)["error"]["message"],
            "this instance already failed to initialize; it loads one function once"
        );
    }

    #[test]
    fn the_library_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("function").join("function.so");
        write_library(&path, b"one").unwrap();
        write_library(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path.parent().unwrap()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn run_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = fresh(&dir);
        for (body, message) in [
            ("", "body is not valid JSON: "),
            (r#"{"params": []}"#, "'params' must be an object"),
            (r#"{"context": "x"}"#, "'context' must be an object"),
            (r#"{"deadline_ms": -1}"#, "'deadline_ms' must be a non-negative number"),
            (r#"{"deadline_ms": "1"}"#, "'deadline_ms' must be a non-negative number"),
            (
                r#"{"deadline_ms": null}"#,
                "'deadline_ms' must be a non-negative number",
            ),
            (
                r#"{"log_marker": "short"}"#,
                "'log_marker' must be a string of 16 to 64",
            ),
            (r#"{"log_marker": 1234567890123456}"#, "'log_marker' must be a string"),
            (r#"{"log_marker": null}"#, "'log_marker' must be a string"),
            (
                r#"{"log_marker": "fnrt-log-end-0123456789abcdef\n"}"#,
                "'log_marker' must be a string",
            ),
            (
                r#"{"log_marker": "fnrt-log-end-01234567/9abcdef"}"#,
                "'log_marker' must be a string",
            ),
        ] {
            let response = run(&runtime, body.as_bytes());
            assert_eq!(response.status, 400, "{body}");
            let text = answer_of(&response)["error"]["message"].as_str().unwrap().to_owned();
            assert!(text.starts_with(message), "{body}: {text}");
        }
        let response = run(&runtime, br#"{"params": {}, "context": {}, "deadline_ms": 1.5}"#);
        assert_eq!(response.status, 409);
        let response = run(&runtime, br#"{"log_marker": "fnrt-log-end-0123456789abcdef"}"#);
        assert_eq!(response.status, 409);
    }

    #[test]
    fn answers() {
        assert!(is_answer(br#"{"result": null}"#));
        assert!(is_answer(br#"{"error": {"code": "RUNTIME_ERROR"}}"#));
        assert!(!is_answer(b""));
        assert!(!is_answer(br#"{"other": 1}"#));
        assert!(!is_answer(br#"[{"result": 1}]"#));
        let health = answer_of(&Runtime::new(PathBuf::from("."), Vec::new()).health());
        assert_eq!(health["language"], "rust");
        assert!(
            health["runtime_version"].as_str().unwrap().starts_with("1."),
            "{health}"
        );
    }
}
