//! The state of this instance (the one function it serves, the one-init rule, the
//! one-run-at-a-time rule) and the answers to `/health`, `/init` and `/run`.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, TryLockError};

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::function::{Function, LoadError};
use crate::http::Response;

/// Directory (in the instance directory) the function's library is written to.
const FUNCTION_DIR: &str = "function";

/// The only variables of the runtime's own environment the function keeps.
pub(crate) const INHERITED_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TMPDIR"];

/// The rustc that built this runtime (see build.rs).
const RUNTIME_VERSION: &str = env!("FNRT_RUSTC_VERSION");

/// The state of this instance.
#[derive(Debug)]
pub(crate) struct Runtime {
    /// Where `function/` goes: `.` (the working directory, the instance directory) in production.
    instance_dir: PathBuf,
    /// PATH, HOME, LANG, TMPDIR as they were at start-up: they win over the function's `env`.
    inherited_env: Vec<(OsString, OsString)>,
    /// Held for the whole of an /init; true once an /init got past validation (even if it failed).
    init_attempted: Mutex<bool>,
    /// The function, once an /init succeeded.
    function: OnceLock<Function>,
    /// True during a run: one at a time.
    running: AtomicBool,
}

/// A field of a request body that is not what the protocol says: 400 BAD_REQUEST.
fn bad_request(message: impl Into<String>) -> Response {
    error(400, "BAD_REQUEST", message.into(), None)
}

/// `{"error":{"code","message"[,"details"]}}` with `status`.
pub(crate) fn error(status: u16, code: &str, message: String, details: Option<Value>) -> Response {
    let mut error = Map::new();
    error.insert("code".to_owned(), Value::from(code));
    error.insert("message".to_owned(), Value::from(message));
    if let Some(details) = details {
        error.insert("details".to_owned(), details);
    }
    json_response(status, &json!({ "error": error }))
}

fn json_response(status: u16, value: &Value) -> Response {
    // Serialising a Value (string keys only) cannot fail.
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response {
        status,
        body,
        allow: None,
    }
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Response> {
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
) -> Result<Option<&'a Value>, Response> {
    match body.get(name) {
        None => Ok(None),
        Some(value) if is_ok(value) => Ok(Some(value)),
        Some(_) => Err(bad_request(format!("'{name}' must be {what}"))),
    }
}

fn required_string<'a>(body: &'a Map<String, Value>, name: &str) -> Result<&'a str, Response> {
    field(body, name, Value::is_string, "a string")?
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request(format!("'{name}' is required")))
}

/// A valid /init body.
struct InitRequest<'a> {
    entrypoint: &'a str,
    code: &'a str,
    env: Vec<(&'a str, &'a str)>,
}

fn valid_entrypoint(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c))
        && name != "."
        && name != ".."
}

fn parse_init(body: &Map<String, Value>) -> Result<InitRequest<'_>, Response> {
    let entrypoint = required_string(body, "entrypoint")?;
    let code = required_string(body, "code")?;
    // Informational (the library's export! decides what runs), checked so a confused caller hears.
    field(body, "handler", Value::is_string, "a string")?;
    field(body, "language_title", Value::is_string, "a string")?;
    field(body, "version", |v| v.is_i64() || v.is_u64(), "an integer")?;
    let env = field(body, "env", Value::is_object, "an object of strings")?;

    if !valid_entrypoint(entrypoint) {
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
        pairs.push((key.as_str(), value));
    }
    Ok(InitRequest {
        entrypoint,
        code,
        env: pairs,
    })
}

/// Clears the running flag when a run ends, however it ends.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Runtime {
    /// A fresh instance writing under `instance_dir`, keeping `inherited_env` for the function.
    pub(crate) fn new(instance_dir: PathBuf, inherited_env: Vec<(OsString, OsString)>) -> Runtime {
        Runtime {
            instance_dir,
            inherited_env,
            init_attempted: Mutex::new(false),
            function: OnceLock::new(),
            running: AtomicBool::new(false),
        }
    }

    /// An initialised instance (tests stand in for a library with raw entry points).
    #[cfg(test)]
    pub(crate) fn with_function(function: Function) -> Runtime {
        let runtime = Runtime::new(PathBuf::from("."), Vec::new());
        *runtime.init_attempted.lock().unwrap() = true;
        runtime.function.set(function).unwrap();
        runtime
    }

    fn initialized(&self) -> bool {
        self.function.get().is_some()
    }

    pub(crate) fn health(&self) -> Response {
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

    pub(crate) fn init(&self, body: &[u8]) -> Response {
        self.try_init(body).unwrap_or_else(|response| response)
    }

    fn try_init(&self, body: &[u8]) -> Result<Response, Response> {
        let body = parse_object(body)?;
        let request = parse_init(&body)?;
        let mut attempted = match self.init_attempted.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                let message = "an /init is already in progress on this instance".to_owned();
                return Err(error(409, "ALREADY_INITIALIZED", message, None));
            }
        };
        if *attempted {
            let state = if self.initialized() {
                "initialized"
            } else {
                "failed to initialize"
            };
            let message = format!("this instance already {state}; it loads one function once");
            return Err(error(409, "ALREADY_INITIALIZED", message, None));
        }
        // From here on the instance's one /init is spent, whatever happens.
        *attempted = true;
        let function = self
            .load(&request)
            .map_err(|e| error(422, "INIT_ERROR", e.message, Some(json!({"type": e.kind}))))?;
        // Cannot be set already: only an /init holding the lock sets it, once.
        let _ = self.function.set(function);
        Ok(json_response(200, &json!({"status": "initialized"})))
    }

    /// Writes the library, replaces the environment, loads the library. Called with the init lock.
    fn load(&self, request: &InitRequest<'_>) -> Result<Function, LoadError> {
        let library = base64::engine::general_purpose::STANDARD
            .decode(request.code)
            .map_err(|e| LoadError {
                kind: "DecodeError",
                message: format!("'code' is not valid base64: {e}"),
            })?;
        let path = self.instance_dir.join(FUNCTION_DIR).join(request.entrypoint);
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
    fn replace_environment(&self, env: &[(&str, &str)]) {
        // SAFETY (for every set_var/remove_var below): they are unsound only while another thread
        // reads or writes the environment. This runs with the init lock held (no other /init),
        // before the function's library is loaded (none of its code has run, none of its threads
        // exist) and before the function is set (no /run can start). The server's other threads,
        // the accept loop and the connection threads, never touch the environment: they parse
        // HTTP and JSON, and are spawned with an explicit stack size so that std::thread does not
        // read RUST_MIN_STACK; the inherited variables were read once at start-up.
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

    pub(crate) fn run(&self, body: &[u8]) -> Response {
        self.try_run(body).unwrap_or_else(|response| response)
    }

    fn try_run(&self, body: &[u8]) -> Result<Response, Response> {
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

        let Some(function) = self.function.get() else {
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
        let _running = Running(&self.running);

        let mut call = Map::new();
        for name in ["params", "context"] {
            let value = body.remove(name).unwrap_or_else(|| Value::Object(Map::new()));
            call.insert(name.to_owned(), value);
        }
        let input = serde_json::to_vec(&call).unwrap_or_default();
        let answer = function.call(&input);
        if is_answer(&answer) {
            Ok(Response {
                status: 200,
                body: answer,
                allow: None,
            })
        } else {
            let message = "the function returned a malformed answer".to_owned();
            Ok(error(
                200,
                "RUNTIME_ERROR",
                message,
                Some(json!({"type": "ProtocolError"})),
            ))
        }
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

    fn answer_of(response: &Response) -> Value {
        serde_json::from_slice(&response.body).unwrap()
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
    fn init_bodies_that_do_not_spend_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Runtime::new(dir.path().to_owned(), Vec::new());
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
            let response = runtime.init(body.as_bytes());
            assert_eq!(response.status, 400, "{body}");
            let answer = answer_of(&response);
            assert_eq!(answer["error"]["code"], "BAD_REQUEST");
            let text = answer["error"]["message"].as_str().unwrap();
            assert!(text.starts_with(message), "{body}: {text}");
        }
        assert!(!*runtime.init_attempted.lock().unwrap());
    }

    #[test]
    fn bad_base64_spends_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Runtime::new(dir.path().to_owned(), Vec::new());
        let init = br#"{"entrypoint": "function.so", "code": "%%%", "env": {}, "version": 1}"#;
        let response = runtime.init(init);
        assert_eq!(response.status, 422);
        let answer = answer_of(&response);
        assert_eq!(answer["error"]["code"], "INIT_ERROR");
        assert_eq!(answer["error"]["details"], json!({"type": "DecodeError"}));

        let again = runtime.init(init);
        assert_eq!(again.status, 409);
        assert_eq!(
            answer_of(&again)["error"]["message"],
            "this instance already failed to initialize; it loads one function once"
        );
        let run = runtime.run(b"{}");
        assert_eq!(
            (run.status, answer_of(&run)["error"]["code"].clone()),
            (409, json!("NOT_INITIALIZED"))
        );
        assert_eq!(answer_of(&runtime.health())["initialized"], false);
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
        let runtime = Runtime::new(dir.path().to_owned(), Vec::new());
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
        ] {
            let response = runtime.run(body.as_bytes());
            assert_eq!(response.status, 400, "{body}");
            let text = answer_of(&response)["error"]["message"].as_str().unwrap().to_owned();
            assert!(text.starts_with(message), "{body}: {text}");
        }
        let response = runtime.run(br#"{"params": {}, "context": {}, "deadline_ms": 1.5}"#);
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
