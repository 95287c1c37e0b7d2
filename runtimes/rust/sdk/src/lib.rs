//! Write a function for the function runtime in Rust.
//!
//! A function is a library crate with one handler, `fn(P, Context) -> Result<R, Error>`, where
//! `P` is any [`serde::de::DeserializeOwned`] type (the call's `params`) and `R` any
//! [`serde::Serialize`] type (its result); [`serde_json::Value`] works for both. `export!(handler)`
//! at the crate root turns the crate into something the controller can run:
//!
//! ```
//! use fnrt_sdk::serde_json::{Value, json};
//! use fnrt_sdk::{Context, Error, export};
//!
//! #[derive(serde::Deserialize)]
//! struct Params {
//!     n: u64,
//! }
//!
//! fn handler(params: Params, context: Context) -> Result<Value, Error> {
//!     if params.n > 93 {
//!         return Err(Error::invalid_params("n must be at most 93"));
//!     }
//!     let (mut a, mut b) = (0u64, 1u64);
//!     for _ in 0..params.n {
//!         (a, b) = (b, a + b);
//!     }
//!     Ok(json!({ "fibonacci": a, "user": context.get("user_id") }))
//! }
//!
//! export!(handler);
//! ```
//!
//! Params that do not deserialise into `P` are answered `INVALID_PARAMS` with serde's message;
//! [`Error::invalid_params`] is the handler's own way to blame the caller, anything else is a
//! `RUNTIME_ERROR`. A panic in the handler is a `RUNTIME_ERROR` too, located by file, line and
//! column (`details.type` is `"panic"`).
//!
//! # Layout
//!
//! - [`Context`], [`Error`] and [`ErrorCode`]: what a handler sees and returns.
//! - [`Handler`]: implemented for every `Fn(P, Context) -> Result<R, Error>`, so `export!` works
//!   for plain functions and closures alike.
//! - [`export!`]: on native targets, the C ABI the Rust runtime (`fnrt-runtime-rust`) loads with
//!   `dlopen` from the crate built as a `cdylib`: `fnrt_abi_version() -> u32` (returns 1),
//!   `fnrt_call(input, input_len, *output_len) -> *mut u8` (input `{"params":…,"context":…}`,
//!   output a runtime-protocol `/run` answer, `{"result":…}` or `{"error":…}`) and
//!   `fnrt_free(ptr, len)` for that output. On wasm targets, a `fn main` (the controller builds the
//!   library as a `bin` for `wasm32-wasip1`) that reads `{"params":…,"context":…}` from stdin and
//!   writes the result JSON to stdout, or `{"error":…}` and exits with status 1, after the marker
//!   the runtime gives in `FNRT_RESULT_MARKER` (so the function's own prints do not spoil it).
//! - `__private` (hidden): the logic both expansions share, which the macro merely calls.
//!
//! Error `details` are always an object with a `type`: `"InvalidParams"` ([`Error::invalid_params`]),
//! `"Error"` ([`Error::runtime`], `From<String>`, `From<&str>`), `"serde"` (params that do not
//! deserialise, a result that does not serialise, `From<serde_json::Error>`) or `"panic"` (with
//! `file`, `line`, `column`). A panic's file is relative as rustc saw it (`src/lib.rs`); absolute
//! paths are cut to `crate-version/src/file.rs` for crates from the cargo registry and to the
//! file name otherwise, so no host path leaks.

#![allow(unsafe_code)]

use std::fmt;
use std::ops::Deref;

pub use serde;
pub use serde_json;
use serde_json::{Map, Value};

/// The call's `context` object (user, environment, … as the controller sends it).
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    value: Value,
    files: Option<Files>,
}

impl Context {
    /// Wraps a context value (normally a JSON object).
    pub fn new(value: Value) -> Self {
        Context { value, files: None }
    }

    /// The caller's files, by id (native Rust functions; see [`Files`]).
    pub fn files(&self) -> Result<&Files, Error> {
        self.files
            .as_ref()
            .ok_or_else(|| Error::runtime("files are not available to this call").with_type("FilesError"))
    }

    /// The member `key` of the context object, if there is one.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key)
    }

    /// The whole context.
    pub fn as_value(&self) -> &Value {
        &self.value
    }

    /// The whole context, by value.
    pub fn into_value(self) -> Value {
        self.value
    }
}

/// The caller's files, for this call only: [`Files::read`], [`Files::info`] and
/// [`Files::write`] go to the controller's files socket with the call's own key, which ends
/// with the call. Native functions only (a wasm module has no sockets).
#[derive(Clone, PartialEq)]
pub struct Files {
    socket: String,
    token: String,
}

impl fmt::Debug for Files {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of debug output.
        f.debug_struct("Files")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Files {
    /// The file's bytes.
    pub fn read(&self, file_id: &str) -> Result<Vec<u8>, Error> {
        self.call("GET", &format!("/api/v1/files/{}", checked_id(file_id)?), &[])
    }

    /// The file's `name`, `size`, `content_type`, `sha256` and times.
    pub fn info(&self, file_id: &str) -> Result<Value, Error> {
        let body = self.call("GET", &format!("/api/v1/files/{}/meta", checked_id(file_id)?), &[])?;
        serde_json::from_slice(&body).map_err(|e| files_error("UNAVAILABLE", &e.to_string()))
    }

    /// Stores `data` as a new file of the caller's named `name`: its info, with `file_id`.
    pub fn write(&self, data: &[u8], name: &str) -> Result<Value, Error> {
        let mut query = String::new();
        for b in name.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => query.push(char::from(b)),
                _ => query.push_str(&format!("%{b:02X}")),
            }
        }
        let body = self.call("POST", &format!("/api/v1/files?name={query}"), data)?;
        serde_json::from_slice(&body).map_err(|e| files_error("UNAVAILABLE", &e.to_string()))
    }

    /// One HTTP/1.0 exchange on the socket (the answer ends where the connection does).
    #[cfg(unix)]
    fn call(&self, method: &str, path: &str, body: &[u8]) -> Result<Vec<u8>, Error> {
        use std::io::{Read, Write};
        let io = |e: std::io::Error| files_error("UNAVAILABLE", &format!("the files socket: {e}"));
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).map_err(io)?;
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
            self.token,
            body.len()
        )
        .and_then(|()| stream.write_all(body))
        .map_err(io)?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).map_err(io)?;
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| files_error("UNAVAILABLE", "a malformed answer"))?;
        let status: u16 = std::str::from_utf8(&answer[..split])
            .ok()
            .and_then(|head| head.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| files_error("UNAVAILABLE", "a malformed status line"))?;
        let body = answer.split_off(split + 4);
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let error: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let code = error["error"]["code"].as_str().unwrap_or("UNAVAILABLE");
        let message = error["error"]["message"]
            .as_str()
            .unwrap_or("the files socket refused the call");
        Err(files_error(code, message))
    }

    #[cfg(not(unix))]
    fn call(&self, _method: &str, _path: &str, _body: &[u8]) -> Result<Vec<u8>, Error> {
        Err(files_error("UNAVAILABLE", "files are not available to wasm functions"))
    }
}

fn checked_id(id: &str) -> Result<&str, Error> {
    if (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        Ok(id)
    } else {
        Err(files_error("INVALID_REQUEST", "a file id is a string like \"9b2f…\""))
    }
}

/// A files failure: a runtime error whose `details.files_code` is the contract's code
/// (`NOT_FOUND`, `UNAUTHORIZED`, …).
fn files_error(code: &str, message: &str) -> Error {
    Error::runtime(format!("files: {message}"))
        .with_type("FilesError")
        .with_details(serde_json::json!({ "files_code": code }))
}

impl Default for Context {
    /// An empty object.
    fn default() -> Self {
        Context::new(Value::Object(Map::new()))
    }
}

impl Deref for Context {
    type Target = Value;

    fn deref(&self) -> &Value {
        &self.value
    }
}

impl From<Value> for Context {
    fn from(value: Value) -> Self {
        Context::new(value)
    }
}

/// Who is to blame for an [`Error`]: the caller (`INVALID_PARAMS`) or the function (`RUNTIME_ERROR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `INVALID_PARAMS`: the controller answers 400.
    InvalidParams,
    /// `RUNTIME_ERROR`: the controller answers 500.
    RuntimeError,
}

impl ErrorCode {
    /// The protocol's spelling: `"INVALID_PARAMS"` or `"RUNTIME_ERROR"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidParams => "INVALID_PARAMS",
            ErrorCode::RuntimeError => "RUNTIME_ERROR",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A handler's failure: a code, a message and a `details` object (which always has a `type`).
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    code: ErrorCode,
    message: String,
    details: Map<String, Value>,
}

impl Error {
    /// An error with `code` and `details` `{"type": type_name}`.
    pub fn new(code: ErrorCode, message: impl Into<String>, type_name: &str) -> Self {
        let mut details = Map::new();
        details.insert("type".to_owned(), Value::String(type_name.to_owned()));
        Error {
            code,
            message: message.into(),
            details,
        }
    }

    /// The caller's mistake (`INVALID_PARAMS`, details type `"InvalidParams"`).
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidParams, message, "InvalidParams")
    }

    /// The function's failure (`RUNTIME_ERROR`, details type `"Error"`).
    pub fn runtime(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::RuntimeError, message, "Error")
    }

    /// Replaces `details` with `details` (an object; its `type`, if any, replaces the current one,
    /// else the current `type` stays). A value that is not an object is kept as `details.value`.
    pub fn with_details(mut self, details: Value) -> Self {
        let kind = self.details.remove("type");
        self.details = match details {
            Value::Object(map) => map,
            other => Map::from_iter([("value".to_owned(), other)]),
        };
        if let Some(kind) = kind {
            self.details.entry("type").or_insert(kind);
        }
        self
    }

    /// `INVALID_PARAMS` or `RUNTIME_ERROR`.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The message shown to the caller.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The `details` object.
    pub fn details(&self) -> &Map<String, Value> {
        &self.details
    }

    /// `{"code": …, "message": …, "details": {…}}`: the protocol's `error` member.
    pub fn to_json(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".to_owned(), Value::String(self.code.as_str().to_owned()));
        error.insert("message".to_owned(), Value::String(self.message.clone()));
        error.insert("details".to_owned(), Value::Object(self.details.clone()));
        Value::Object(error)
    }

    fn with_type(mut self, type_name: &str) -> Self {
        self.details
            .insert("type".to_owned(), Value::String(type_name.to_owned()));
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::runtime(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error::runtime(message)
    }
}

impl From<serde_json::Error> for Error {
    /// A `RUNTIME_ERROR` of type `"serde"`: JSON the function itself handles went wrong.
    fn from(error: serde_json::Error) -> Self {
        Error::runtime(error.to_string()).with_type("serde")
    }
}

/// A function's handler: implemented for every `Fn(P, Context) -> Result<R, Error>`.
///
/// `P` and `R` are parameters of the trait (not associated types) so that one blanket
/// implementation covers every fn and closure; they are inferred from the handler's signature.
pub trait Handler<P, R> {
    /// Runs the handler once.
    fn call(&self, params: P, context: Context) -> Result<R, Error>;
}

impl<F, P, R> Handler<P, R> for F
where
    F: Fn(P, Context) -> Result<R, Error>,
{
    fn call(&self, params: P, context: Context) -> Result<R, Error> {
        self(params, context)
    }
}

/// Exports `handler` (a path or expression implementing [`Handler`]) for the runtime.
///
/// Use it once, at the crate root. On native targets it defines the `extern "C"` functions
/// `fnrt_abi_version`, `fnrt_call` and `fnrt_free`; on wasm targets it defines `fn main`.
#[macro_export]
macro_rules! export {
    ($handler:expr $(,)?) => {
        /// The version of the C ABI between this library and the Rust runtime.
        #[cfg(not(target_family = "wasm"))]
        #[unsafe(no_mangle)]
        pub extern "C" fn fnrt_abi_version() -> u32 {
            $crate::__private::ABI_VERSION
        }

        /// Runs the handler on `{"params":…,"context":…}` and returns a `/run` answer.
        ///
        /// # Safety
        ///
        /// `input` must be valid for reads of `input_len` bytes and `output_len` valid for one
        /// write; the returned buffer must be released with `fnrt_free(ptr, *output_len)`.
        #[cfg(not(target_family = "wasm"))]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn fnrt_call(input: *const u8, input_len: usize, output_len: *mut usize) -> *mut u8 {
            let handler = &$handler;
            // SAFETY: the caller upholds `ffi_call`'s contract, which is this function's.
            unsafe { $crate::__private::ffi_call(handler, input, input_len, output_len) }
        }

        /// Releases a buffer returned by `fnrt_call`.
        ///
        /// # Safety
        ///
        /// `ptr` and `len` must be a pointer and length returned by this library's `fnrt_call`,
        /// released at most once.
        #[cfg(not(target_family = "wasm"))]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn fnrt_free(ptr: *mut u8, len: usize) {
            // SAFETY: the caller upholds `ffi_free`'s contract, which is this function's.
            unsafe { $crate::__private::ffi_free(ptr, len) }
        }

        /// The module's `_start` when the library is built as a wasm `bin`.
        #[cfg(target_family = "wasm")]
        #[allow(dead_code)]
        fn main() {
            $crate::__private::main_stdio(&$handler)
        }
    };
}

#[doc(hidden)]
pub mod __private {
    //! What `export!` expands to calls into; not a stable API.

    use std::cell::{Cell, RefCell};
    use std::io::{Read, Write};
    use std::panic::{self, AssertUnwindSafe};
    use std::sync::Once;

    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use serde_json::{Map, Value};

    use crate::{Context, Error, Handler};

    /// What `fnrt_abi_version` returns; the runtime refuses libraries with another.
    pub const ABI_VERSION: u32 = 1;

    /// On wasm: the variable that holds the marker written before the answer
    /// on stdout, so that what the function prints does not spoil it.
    pub const RESULT_MARKER_ENV: &str = "FNRT_RESULT_MARKER";

    /// Runs `handler` on `input` (`{"params":…,"context":…}`); on success, the result as JSON text.
    ///
    /// Never unwinds: a panic (in the handler, in deserialising the params or serialising the
    /// result) becomes a `RUNTIME_ERROR` of type `"panic"`.
    pub fn invoke<H, P, R>(handler: &H, input: &[u8]) -> Result<Vec<u8>, Error>
    where
        H: Handler<P, R>,
        P: DeserializeOwned,
        R: Serialize,
    {
        install_panic_hook();
        let run = || -> Result<Vec<u8>, Error> {
            let (params, context, files) = split_input(input)?;
            let params: P =
                serde_json::from_value(params).map_err(|e| Error::invalid_params(e.to_string()).with_type("serde"))?;
            let mut context = Context::new(context);
            context.files = files.and_then(|f| {
                Some(crate::Files {
                    socket: f.get("socket")?.as_str()?.to_owned(),
                    token: f.get("token")?.as_str()?.to_owned(),
                })
            });
            let result = handler.call(params, context)?;
            serde_json::to_vec(&result)
                .map_err(|e| Error::runtime(format!("result is not JSON-serialisable: {e}")).with_type("serde"))
        };
        let outcome = {
            let _in_call = InCall::enter();
            panic::catch_unwind(AssertUnwindSafe(run))
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(payload) => Err(panic_error(payload)),
        };
        // The function's `print!`s are in this library's own stdout buffer; the host cannot flush it.
        // Done on every call, native and wasm, so they are in the pipe before the runtime answers
        // (and before its end-of-run log marker); stderr too (unbuffered in std, but the marker
        // must not overtake it if that changes).
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        outcome
    }

    /// A runtime-protocol `/run` answer: `{"result":…}` or `{"error":{"code","message","details"}}`.
    pub fn answer(outcome: &Result<Vec<u8>, Error>) -> Vec<u8> {
        match outcome {
            Ok(result) => {
                let mut out = Vec::with_capacity(result.len() + 11);
                out.extend_from_slice(b"{\"result\":");
                out.extend_from_slice(result);
                out.push(b'}');
                out
            }
            Err(error) => error_answer(error),
        }
    }

    fn error_answer(error: &Error) -> Vec<u8> {
        let mut body = Map::new();
        body.insert("error".to_owned(), error.to_json());
        serde_json::to_vec(&Value::Object(body)).unwrap_or_else(|_| {
            br#"{"error":{"code":"RUNTIME_ERROR","message":"the error could not be encoded","details":{"type":"serde"}}}"#
                .to_vec()
        })
    }

    /// [`invoke`] then [`answer`]: the body of `fnrt_call`.
    pub fn call_native<H, P, R>(handler: &H, input: &[u8]) -> Vec<u8>
    where
        H: Handler<P, R>,
        P: DeserializeOwned,
        R: Serialize,
    {
        answer(&invoke(handler, input))
    }

    /// `fnrt_call`: runs `handler` on the `input_len` bytes at `input`, stores the answer's length
    /// in `*output_len` and returns the answer, to be released with [`ffi_free`].
    ///
    /// # Safety
    ///
    /// `input` must be valid for reads of `input_len` bytes (or `input_len` be 0) and `output_len`
    /// must be null or valid for a write.
    pub unsafe fn ffi_call<H, P, R>(handler: &H, input: *const u8, input_len: usize, output_len: *mut usize) -> *mut u8
    where
        H: Handler<P, R>,
        P: DeserializeOwned,
        R: Serialize,
    {
        let input = if input.is_null() || input_len == 0 {
            &[][..]
        } else {
            // SAFETY: the caller guarantees `input` is readable for `input_len` bytes during this call.
            unsafe { std::slice::from_raw_parts(input, input_len) }
        };
        let answer = call_native(handler, input).into_boxed_slice();
        let len = answer.len();
        if !output_len.is_null() {
            // SAFETY: non-null, and the caller guarantees it is valid for a write.
            unsafe { output_len.write(len) };
        }
        Box::into_raw(answer).cast::<u8>()
    }

    /// `fnrt_free`: releases an answer of [`ffi_call`].
    ///
    /// # Safety
    ///
    /// `ptr` and `len` must come from one [`ffi_call`] of this same library (so the same
    /// allocator), and be released only once. A null `ptr` is ignored.
    pub unsafe fn ffi_free(ptr: *mut u8, len: usize) {
        if ptr.is_null() {
            return;
        }
        // SAFETY: `ptr`/`len` are a `Box<[u8]>` leaked by `ffi_call` (caller's guarantee), so
        // rebuilding that box and dropping it frees it with the allocator that made it.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) });
    }

    /// The wasm `main`: [`run_stdio`] on stdin/stdout; exit status 1 on an error.
    pub fn main_stdio<H, P, R>(handler: &H)
    where
        H: Handler<P, R>,
        P: DeserializeOwned,
        R: Serialize,
    {
        // The marker is the runtime's, not the function's: taken out of the
        // environment before the handler runs, so no answer can contain it.
        let marker = std::env::var(RESULT_MARKER_ENV).ok();
        // SAFETY: a wasm module runs on this one thread; nothing else reads
        // the environment while it changes.
        unsafe { std::env::remove_var(RESULT_MARKER_ENV) };
        let ok = run_stdio(
            handler,
            std::io::stdin().lock(),
            std::io::stdout().lock(),
            marker.as_deref(),
        );
        if !ok {
            std::process::exit(1);
        }
    }

    /// Reads the call from `input`, writes the result JSON (success, `true`) or
    /// `{"error":…}` (`false`) to `output`, after `marker` when there is one.
    pub fn run_stdio<H, P, R>(handler: &H, mut input: impl Read, mut output: impl Write, marker: Option<&str>) -> bool
    where
        H: Handler<P, R>,
        P: DeserializeOwned,
        R: Serialize,
    {
        let mut bytes = Vec::new();
        let outcome = match input.read_to_end(&mut bytes) {
            Ok(_) => invoke(handler, &bytes),
            Err(e) => Err(Error::runtime(format!("cannot read the call from stdin: {e}")).with_type("ProtocolError")),
        };
        let (ok, text) = match outcome {
            Ok(result) => (true, result),
            Err(error) => (false, error_answer(&error)),
        };
        // The wasm runtime tells the answer from what the function printed
        // by a marker of its own (one per run) written just before it.
        let marked = match marker {
            Some(m) => output
                .flush()
                .and_then(|()| output.write_all(b"\n"))
                .and_then(|()| output.write_all(m.as_bytes())),
            None => Ok(()),
        };
        if let Err(e) = marked
            .and_then(|()| output.write_all(&text))
            .and_then(|()| output.flush())
        {
            let _ = writeln!(std::io::stderr(), "fnrt-sdk: cannot write the answer to stdout: {e}");
            return false;
        }
        ok
    }

    /// `{"params": P, "context": C}` → `(P, C)`; a missing member is `{}`.
    fn split_input(input: &[u8]) -> Result<(Value, Value, Option<Value>), Error> {
        let malformed = |why: String| {
            Error::runtime(format!("the runtime sent a malformed call: {why}")).with_type("ProtocolError")
        };
        let mut call = match serde_json::from_slice::<Value>(input) {
            Ok(Value::Object(call)) => call,
            Ok(_) => return Err(malformed("not a JSON object".to_owned())),
            Err(e) => return Err(malformed(e.to_string())),
        };
        let params = call.remove("params").unwrap_or_else(|| Value::Object(Map::new()));
        let context = call.remove("context").unwrap_or_else(|| Value::Object(Map::new()));
        Ok((params, context, call.remove("files")))
    }

    // --- panics -------------------------------------------------------------------------------

    /// What the panic hook saw of the last panic on this thread during a call.
    struct PanicRecord {
        message: String,
        location: Option<(String, u32, u32)>,
    }

    thread_local! {
        /// True while this thread runs a handler: only those panics are recorded.
        static IN_CALL: Cell<bool> = const { Cell::new(false) };
        static LAST_PANIC: RefCell<Option<PanicRecord>> = const { RefCell::new(None) };
    }

    /// Marks this thread as running a handler until dropped (restoring the previous mark).
    struct InCall {
        previous: bool,
    }

    impl InCall {
        fn enter() -> Self {
            let _ = LAST_PANIC.try_with(|last| last.borrow_mut().take());
            InCall {
                previous: IN_CALL.replace(true),
            }
        }
    }

    impl Drop for InCall {
        fn drop(&mut self) {
            IN_CALL.set(self.previous);
        }
    }

    /// Installs, once per process, a hook that records panics during a call (message and
    /// location, for the answer) and prints `panicked at file:line:column: message` to stderr.
    /// Panics outside a call (other threads, a host's tests) go to the hook that was there before.
    fn install_panic_hook() {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            let previous = panic::take_hook();
            panic::set_hook(Box::new(move |info| {
                if !IN_CALL.try_with(Cell::get).unwrap_or(false) {
                    previous(info);
                    return;
                }
                let message = match info.payload_as_str() {
                    Some(message) => message.to_owned(),
                    None => "Box<dyn Any>".to_owned(),
                };
                let location = info.location().map(|l| (short_file(l.file()), l.line(), l.column()));
                let record = PanicRecord { message, location };
                // Not eprintln!: a failed write must not panic inside the hook.
                let _ = writeln!(std::io::stderr(), "{}", panic_text(&record));
                let _ = LAST_PANIC.try_with(|last| *last.borrow_mut() = Some(record));
            }));
        });
    }

    fn panic_text(record: &PanicRecord) -> String {
        match &record.location {
            Some((file, line, column)) => format!("panicked at {file}:{line}:{column}: {}", record.message),
            None => format!("panicked: {}", record.message),
        }
    }

    fn panic_error(payload: Box<dyn std::any::Any + Send>) -> Error {
        let recorded = LAST_PANIC.try_with(|last| last.borrow_mut().take()).ok().flatten();
        // No record if the function replaced the panic hook: the payload still has the message.
        let record = recorded.unwrap_or_else(|| PanicRecord {
            message: payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "Box<dyn Any>".to_owned()),
            location: None,
        });
        // A payload whose Drop panics must not unwind out of here either.
        let _ = panic::catch_unwind(AssertUnwindSafe(move || drop(payload)));
        let mut details = Map::new();
        details.insert("type".to_owned(), Value::String("panic".to_owned()));
        if let Some((file, line, column)) = &record.location {
            details.insert("file".to_owned(), Value::String(file.clone()));
            details.insert("line".to_owned(), Value::from(*line));
            details.insert("column".to_owned(), Value::from(*column));
        }
        Error::runtime(panic_text(&record)).with_details(Value::Object(details))
    }

    /// A panic location's file without host paths: relative paths as they are, registry crates
    /// from their `name-version/` directory on, anything else absolute as its file name.
    pub fn short_file(file: &str) -> String {
        const REGISTRY: &str = "/registry/src/";
        if !file.starts_with('/') {
            return file.to_owned();
        }
        if let Some(at) = file.find(REGISTRY) {
            // Skip the index directory (`index.crates.io-1949cf8c6b5b557f/`).
            let rest = &file[at + REGISTRY.len()..];
            if let Some(slash) = rest.find('/')
                && slash + 1 < rest.len()
            {
                return rest[slash + 1..].to_owned();
            }
        }
        file.rsplit('/').next().unwrap_or(file).to_owned()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::__private::{answer, call_native, invoke, run_stdio, short_file};
    use super::{Context, Error, ErrorCode};

    #[derive(serde::Deserialize)]
    struct Params {
        n: u64,
    }

    fn double(params: Params, context: Context) -> Result<Value, Error> {
        if params.n == 13 {
            return Err(Error::invalid_params("13 is unlucky").with_details(json!({"n": 13})));
        }
        if params.n == 0 {
            return Err("zero".into());
        }
        if params.n == 99 {
            panic!("boom {}", params.n);
        }
        Ok(json!({"double": params.n * 2, "user": context.get("user_id")}))
    }

    fn call(input: Value) -> Value {
        let bytes = call_native(&double, input.to_string().as_bytes());
        serde_json::from_slice(&bytes).expect("answers are JSON")
    }

    #[test]
    fn success_is_a_result() {
        let answer = call(json!({"params": {"n": 21}, "context": {"user_id": "u-1"}}));
        assert_eq!(answer, json!({"result": {"double": 42, "user": "u-1"}}));
    }

    #[test]
    fn missing_members_are_empty_objects() {
        let echo =
            |params: Value, context: Context| -> Result<Value, Error> { Ok(json!([params, context.into_value()])) };
        let bytes = call_native(&echo, b"{}");
        assert_eq!(
            serde_json::from_slice::<Value>(&bytes).unwrap(),
            json!({"result": [{}, {}]})
        );
    }

    #[test]
    fn params_that_do_not_deserialise_are_invalid_params() {
        let answer = call(json!({"params": {"n": "x"}, "context": {}}));
        assert_eq!(answer["error"]["code"], "INVALID_PARAMS");
        assert_eq!(answer["error"]["details"], json!({"type": "serde"}));
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("invalid type: string \"x\""), "{message}");

        let answer = call(json!({"params": {}}));
        assert_eq!(answer["error"]["message"], "missing field `n`");
    }

    #[test]
    fn the_handlers_invalid_params() {
        let answer = call(json!({"params": {"n": 13}}));
        assert_eq!(
            answer,
            json!({"error": {"code": "INVALID_PARAMS", "message": "13 is unlucky",
                             "details": {"type": "InvalidParams", "n": 13}}})
        );
    }

    #[test]
    fn runtime_errors() {
        let answer = call(json!({"params": {"n": 0}}));
        assert_eq!(
            answer,
            json!({"error": {"code": "RUNTIME_ERROR", "message": "zero", "details": {"type": "Error"}}})
        );
        let error: Error = serde_json::from_str::<Value>("{").unwrap_err().into();
        assert_eq!(error.code(), ErrorCode::RuntimeError);
        assert_eq!(error.details()["type"], "serde");
        let error = Error::runtime("x").with_details(json!([1]));
        assert_eq!(
            Value::Object(error.details().clone()),
            json!({"type": "Error", "value": [1]})
        );
        let error = Error::runtime("x").with_details(json!({"type": "Mine"}));
        assert_eq!(error.details()["type"], "Mine");
        assert_eq!(error.to_string(), "RUNTIME_ERROR: x");
    }

    #[test]
    fn a_panic_is_a_runtime_error_with_its_location() {
        let line = line!() + 1;
        let boom = |_: Value, _: Context| -> Result<Value, Error> { panic!("boom") };
        let answer: Value = serde_json::from_slice(&call_native(&boom, b"{}")).unwrap();
        let column = answer["error"]["details"]["column"].as_u64().unwrap();
        let file = "runtimes/rust/sdk/src/lib.rs";
        let message = format!("panicked at {file}:{line}:{column}: boom");
        assert_eq!(
            answer,
            json!({"error": {"code": "RUNTIME_ERROR", "message": message,
                             "details": {"type": "panic", "file": file, "line": line, "column": column}}})
        );
        assert!(column > 50, "the column of panic! in that line: {column}");

        // A formatted message, through a plain fn; and the next call is unaffected.
        let answer = call(json!({"params": {"n": 99}}));
        assert!(
            answer["error"]["message"].as_str().unwrap().ends_with(": boom 99"),
            "{answer}"
        );
        assert_eq!(call(json!({"params": {"n": 1}}))["result"]["double"], 2);
    }

    #[test]
    fn panics_outside_a_call_still_reach_the_previous_hook() {
        // Install our hook first, then panic outside a call: the previous (default) hook runs and
        // nothing is recorded for a later call.
        let _ = call(json!({"params": {"n": 1}}));
        let outside = std::thread::spawn(|| panic!("outside")).join();
        assert!(outside.is_err());
        let result = std::panic::catch_unwind(|| panic!("outside too"));
        assert!(result.is_err());
        assert_eq!(
            call(json!({"params": {"n": 2}})),
            json!({"result": {"double": 4, "user": null}})
        );
    }

    #[test]
    fn a_result_that_does_not_serialise_is_a_runtime_error() {
        use std::collections::BTreeMap;
        let bad = |_: Value, _: Context| -> Result<BTreeMap<Vec<u8>, u8>, Error> { Ok(BTreeMap::from([(vec![1], 1)])) };
        let answer: Value = serde_json::from_slice(&call_native(&bad, b"{}")).unwrap();
        assert_eq!(answer["error"]["code"], "RUNTIME_ERROR");
        assert_eq!(answer["error"]["details"], json!({"type": "serde"}));
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("result is not JSON-serialisable: ")
        );
    }

    #[test]
    fn malformed_input_is_a_protocol_error() {
        let answer: Value = serde_json::from_slice(&call_native(&double, b"not json")).unwrap();
        assert_eq!(answer["error"]["code"], "RUNTIME_ERROR");
        assert_eq!(answer["error"]["details"]["type"], "ProtocolError");
        assert!(invoke(&double, b"[]").is_err());
        assert_eq!(answer_of(Ok(b"null".to_vec())), json!({"result": null}));
    }

    fn answer_of(outcome: Result<Vec<u8>, Error>) -> Value {
        serde_json::from_slice(&answer(&outcome)).unwrap()
    }

    #[test]
    fn stdio_writes_the_bare_result_or_the_error() {
        let mut out = Vec::new();
        assert!(run_stdio(&double, &br#"{"params":{"n":4}}"#[..], &mut out, None));
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            json!({"double": 8, "user": null})
        );
        let mut out = Vec::new();
        assert!(!run_stdio(&double, &br#"{"params":{"n":0}}"#[..], &mut out, None));
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            json!({"error": {"code": "RUNTIME_ERROR", "message": "zero", "details": {"type": "Error"}}})
        );
    }

    #[test]
    fn files_are_shortened() {
        assert_eq!(short_file("src/lib.rs"), "src/lib.rs");
        assert_eq!(
            short_file("/home/me/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/serde_json-1.0.145/src/de.rs"),
            "serde_json-1.0.145/src/de.rs"
        );
        assert_eq!(short_file("/build/fn/src/lib.rs"), "lib.rs");
        assert_eq!(short_file("/rustc/abc/library/core/src/option.rs"), "option.rs");
    }

    mod ffi {
        use serde_json::{Value, json};

        use crate::{Context, Error};

        fn handler(params: Value, _context: Context) -> Result<Value, Error> {
            Ok(json!({"echo": params}))
        }

        crate::export!(handler);

        #[test]
        fn the_c_abi_round_trips() {
            assert_eq!(fnrt_abi_version(), 1);
            let input = br#"{"params":{"a":[1,"b"]},"context":{}}"#;
            let mut len = 0usize;
            // SAFETY: `input` is readable for its length and `len` writable.
            let ptr = unsafe { fnrt_call(input.as_ptr(), input.len(), &mut len) };
            assert!(!ptr.is_null());
            // SAFETY: `fnrt_call` returned `len` initialised bytes at `ptr`, not yet freed.
            let answer: Value = serde_json::from_slice(unsafe { std::slice::from_raw_parts(ptr, len) }).unwrap();
            // SAFETY: the pointer and length `fnrt_call` returned, released once.
            unsafe { fnrt_free(ptr, len) };
            assert_eq!(answer, json!({"result": {"echo": {"a": [1, "b"]}}}));

            // An empty input is a malformed call, answered all the same.
            // SAFETY: a null input with length 0 is allowed; `len` is writable.
            let ptr = unsafe { fnrt_call(std::ptr::null(), 0, &mut len) };
            // SAFETY: as above.
            let answer: Value = serde_json::from_slice(unsafe { std::slice::from_raw_parts(ptr, len) }).unwrap();
            // SAFETY: as above.
            unsafe { fnrt_free(ptr, len) };
            assert_eq!(answer["error"]["details"]["type"], "ProtocolError");
            // SAFETY: null is ignored.
            unsafe { fnrt_free(std::ptr::null_mut(), 0) };
        }
    }
}
