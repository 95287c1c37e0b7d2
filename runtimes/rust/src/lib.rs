//! The Rust runtime server: runs one built Rust function for the controller.
//!
//! The controller starts `fnrt-runtime-rust --socket PATH` as a child process (or as a
//! container's entrypoint) in the instance directory, specialises it with one function through
//! `POST /init` (the function's shared library, built with fnrt-sdk's `export!`, as base64), then
//! calls it through `POST /run`. The wire protocol is docs/runtime-protocol.md, the same as the
//! Node.js and Python runtimes': HTTP/1.1 and JSON over a Unix socket.
//!
//! # Layout
//!
//! - [`main_with_args`] parses `--socket`, starts the server (below), removes a stale socket
//!   file, binds and serves forever on the calling thread.
//! - `server`: two threads, each serving HTTP/1.1 with hyper on a current-thread tokio runtime.
//!   The calling (main) thread accepts every connection: routing, bodies bounded to 64 MiB,
//!   400/404/405 answers. The function thread, started once, runs the function's code: /init's
//!   loading and each /run's call. It serves the first connection itself (the controller's one
//!   kept connection: its runs cost no hand-off); the main thread serves any other and hands its
//!   /init and /run over, so `GET /health` answers during a run and a concurrent `POST /run` gets
//!   409 BUSY at once.
//! - `runtime`: the instance's state (one init, one run at a time) and the `/health`, `/init`,
//!   `/run` answers, each of the last two in two steps: checks on the main thread, the function's
//!   code on the function thread; `/init` writes the library to `./function/{entrypoint}` and
//!   replaces the environment.
//! - `function`: the library's C ABI (`fnrt_abi_version`, `fnrt_call`, `fnrt_free`), loaded with
//!   `dlopen` and never unloaded; the only `unsafe` besides the environment's replacement.
//!
//! # Why hyper
//!
//! HTTP/1.1 is hyper's (`hyper::server::conn::http1` over `tokio::net::UnixListener`): request
//! heads, `Content-Length` and chunked bodies (and the framing checks that keep requests from
//! being smuggled), `Expect: 100-continue`, keep-alive, `HEAD`. It replaced a hand-written
//! server; the other choice, `httparse` for the head only, would have kept the body framing,
//! chunked decoding, keep-alive and answer writing hand-written. What hyper costs:
//!
//! - A request whose head hyper cannot parse (request line, headers, conflicting
//!   `Content-Length`s, a `Transfer-Encoding` other than chunked) gets hyper's own answer, 400
//!   (431 past 100 headers or ~400 KiB of head) with an empty body and `Connection: close`, not
//!   a JSON error: it never reaches this crate's code. Every request that does (malformed or oversized
//!   bodies, bad JSON, unknown routes) gets JSON.
//! - tokio, whose threads would matter for `Runtime::replace_environment` (setenv is unsound
//!   while another thread reads the environment). Hence current-thread runtimes, which add no
//!   thread, no `spawn_blocking`, and one function thread spawned at start-up with an explicit
//!   stack size: after start-up the process has exactly two threads of ours, and the main one
//!   never reads the environment. No thread is created per connection or per run either, so a
//!   function that spends RLIMIT_NPROC does not stop the instance from serving.
//!
//! stdout and stderr belong to the function; the server writes nothing to stdout and only
//! `ready` and real problems to stderr.

use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

mod function;
mod runtime;
mod server;

use runtime::{INHERITED_ENV, Runtime};
use server::{Server, log};

const USAGE: &str = "usage: fnrt-runtime-rust --socket PATH";

/// Runs the server with `args` (without the program name): exactly `--socket PATH` or
/// `--socket=PATH`. Returns only on failure: 2 for bad arguments, 1 if it cannot listen.
pub fn main_with_args(args: impl IntoIterator<Item = String>) -> ExitCode {
    let socket = match parse_args(args) {
        Ok(socket) => socket,
        Err(message) => {
            log(&message);
            log(USAGE);
            return ExitCode::from(2);
        }
    };
    // Read once, now: later the environment is the function's (see Runtime::replace_environment).
    let inherited: Vec<(OsString, OsString)> = INHERITED_ENV
        .iter()
        .filter_map(|name| std::env::var_os(name).map(|value| (OsString::from(name), value)))
        .collect();
    // The controller's files socket is linked beside ours.
    let files_socket = std::path::absolute(&socket)
        .ok()
        .and_then(|s| s.parent().map(|dir| dir.join("files.sock")));
    let mut runtime = Runtime::new(PathBuf::from("."), inherited);
    if let Some(files_socket) = files_socket {
        runtime = runtime.with_files_socket(files_socket);
    }
    let runtime = Arc::new(runtime);

    let server = match Server::start(runtime) {
        Ok(server) => server,
        Err(e) => {
            log(&format!("cannot start the server: {e}"));
            return ExitCode::FAILURE;
        }
    };
    if let Err(message) = remove_stale_socket(&socket) {
        log(&message);
        return ExitCode::FAILURE;
    }
    let listener = match UnixListener::bind(&socket) {
        Ok(listener) => listener,
        Err(e) => {
            log(&format!("cannot listen on {}: {e}", socket.display()));
            return ExitCode::FAILURE;
        }
    };
    let _ = std::io::Write::write_all(&mut std::io::stderr(), b"ready\n");
    server.serve(listener)
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<PathBuf, String> {
    let mut socket = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let value = if arg == "--socket" {
            args.next().ok_or("--socket needs a PATH")?
        } else if let Some(value) = arg.strip_prefix("--socket=") {
            value.to_owned()
        } else {
            return Err(format!("unexpected argument '{arg}'"));
        };
        if value.is_empty() {
            return Err("--socket needs a non-empty PATH".to_owned());
        }
        if socket.replace(PathBuf::from(value)).is_some() {
            return Err("--socket given twice".to_owned());
        }
    }
    socket.ok_or_else(|| "--socket PATH is required".to_owned())
}

/// Removes a socket file left by an earlier run; refuses to delete anything else.
fn remove_stale_socket(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot inspect {}: {e}", path.display())),
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))
        }
        Ok(_) => Err(format!("{} exists and is not a socket", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use serde_json::{Value, json};

    use super::*;
    use crate::function::Function;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn arguments() {
        assert_eq!(
            parse_args(args(&["--socket", "/a.sock"])).unwrap(),
            PathBuf::from("/a.sock")
        );
        assert_eq!(parse_args(args(&["--socket=b.sock"])).unwrap(), PathBuf::from("b.sock"));
        for bad in [
            &[][..],
            &["--socket"],
            &["--socket="],
            &["--socket", "a", "--socket=b"],
            &["--port", "1"],
            &["a"],
        ] {
            assert!(parse_args(args(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(main_with_args(args(&["--help"])), ExitCode::from(2));
    }

    #[test]
    fn stale_sockets_only() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        drop(UnixListener::bind(&socket).unwrap());
        remove_stale_socket(&socket).unwrap();
        assert!(!socket.exists());
        remove_stale_socket(&socket).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        assert!(remove_stale_socket(&file).unwrap_err().contains("is not a socket"));
        assert!(file.exists());
    }

    /// A server on a socket in a temp dir, on its own thread (which outlives the test; harmless).
    fn start(runtime: Runtime) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("runtime.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = Server::start(Arc::new(runtime)).unwrap();
        std::thread::spawn(move || server.serve(listener));
        (dir, socket)
    }

    /// Sends raw bytes; reads one answer: (status, headers lowercased, body).
    fn exchange(stream: &mut BufReader<UnixStream>, request: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
        stream.get_mut().write_all(request).unwrap();
        read_answer(stream)
    }

    fn read_answer(stream: &mut BufReader<UnixStream>) -> (u16, Vec<(String, String)>, Vec<u8>) {
        read_answer_to(stream, true)
    }

    /// `with_body` false: an answer to HEAD, whose Content-Length is not followed by a body.
    fn read_answer_to(stream: &mut BufReader<UnixStream>, with_body: bool) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut line = String::new();
        stream.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        let length = if with_body { length } else { 0 };
        let mut body = vec![0; length];
        stream.read_exact(&mut body).unwrap();
        (status, headers, body)
    }

    fn connect(socket: &Path) -> BufReader<UnixStream> {
        let stream = UnixStream::connect(socket).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        BufReader::new(stream)
    }

    fn post(path: &str, body: &str) -> Vec<u8> {
        format!(
            "POST {path} HTTP/1.1\r\nHost: runtime\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn json_of(body: &[u8]) -> Value {
        serde_json::from_slice(body).unwrap()
    }

    fn closed(stream: &mut BufReader<UnixStream>) -> bool {
        let mut rest = Vec::new();
        matches!(stream.read_to_end(&mut rest), Ok(0))
    }

    #[test]
    fn error_answers_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (_dir, socket) = start(Runtime::new(dir.path().to_owned(), Vec::new()));
        let mut s = connect(&socket);

        // Keep-alive: all of these on one connection.
        let (status, _, body) = exchange(&mut s, b"GET /health HTTP/1.1\r\nHost: runtime\r\n\r\n");
        assert_eq!(status, 200);
        let health = json_of(&body);
        assert_eq!(
            (health["status"].clone(), health["initialized"].clone()),
            (json!("ok"), json!(false))
        );
        let (status, _, body) = exchange(&mut s, &post("/run", r#"{"params": {}}"#));
        assert_eq!(
            (status, json_of(&body)["error"]["code"].clone()),
            (409, json!("NOT_INITIALIZED"))
        );
        let (status, _, body) = exchange(&mut s, &post("/nope", "ignored"));
        assert_eq!(status, 404);
        assert_eq!(
            json_of(&body),
            json!({"error": {"code": "NOT_FOUND", "message": "no route /nope"}})
        );
        let (status, headers, body) = exchange(&mut s, &post("/health", "ignored"));
        assert_eq!(
            (status, json_of(&body)["error"]["code"].clone()),
            (405, json!("METHOD_NOT_ALLOWED"))
        );
        assert!(headers.contains(&("allow".to_owned(), "GET".to_owned())));
        let (status, _, body) = exchange(&mut s, b"GET /init HTTP/1.1\r\n\r\n");
        assert_eq!(
            (status, json_of(&body)["error"]["message"].clone()),
            (405, json!("/init takes POST"))
        );
        let (status, _, body) = exchange(&mut s, &post("/init", "{"));
        assert_eq!(
            (status, json_of(&body)["error"]["code"].clone()),
            (400, json!("BAD_REQUEST"))
        );
        let (status, _, body) = exchange(&mut s, &post("/run", r#"{"params": 1}"#));
        assert_eq!(
            (status, json_of(&body)["error"]["message"].clone()),
            (400, json!("'params' must be an object"))
        );
        let (status, _, body) = exchange(
            &mut s,
            b"POST /run HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        );
        assert_eq!(
            (status, json_of(&body)["error"]["code"].clone()),
            (409, json!("NOT_INITIALIZED"))
        );
        // HEAD: the length of the answer, not the answer.
        s.get_mut().write_all(b"HEAD /health HTTP/1.1\r\n\r\n").unwrap();
        let (status, headers, body) = read_answer_to(&mut s, false);
        assert_eq!((status, body.len()), (405, 0));
        assert!(headers.iter().any(|(n, v)| n == "content-length" && v != "0"));
        let (status, headers, _) = exchange(&mut s, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(status, 200);
        assert!(headers.contains(&("connection".to_owned(), "close".to_owned())));
        assert!(closed(&mut s));

        // A malformed body: a JSON 400 and the connection is closed.
        let mut s = connect(&socket);
        let (status, headers, body) = exchange(
            &mut s,
            b"POST /run HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\nzz\r\n",
        );
        assert_eq!(status, 400);
        let message = json_of(&body)["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            message.starts_with("malformed body: ") && message.contains("chunk size"),
            "{message}"
        );
        assert!(headers.contains(&("connection".to_owned(), "close".to_owned())));
        assert!(closed(&mut s));

        // A malformed head, which hyper refuses itself: 400 without a body, and a close.
        for head in [
            &b"GET /health HTTP/9\r\n\r\n"[..],
            b"POST /run HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        ] {
            let mut s = connect(&socket);
            let (status, headers, body) = exchange(&mut s, head);
            assert_eq!((status, body.len()), (400, 0));
            assert!(headers.contains(&("connection".to_owned(), "close".to_owned())));
            assert!(closed(&mut s));
        }

        // An oversized body: answered without being read, then the connection is closed.
        let mut s = connect(&socket);
        let (status, _, body) = exchange(&mut s, b"POST /run HTTP/1.1\r\nContent-Length: 67108865\r\n\r\n{}");
        assert_eq!(status, 400);
        assert_eq!(json_of(&body)["error"]["message"], "body is larger than 67108864 bytes");
        s.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
        assert!(closed(&mut s));

        // A client that sends all of an oversized body, by length or chunked, gets to finish
        // sending (the rest is read and discarded) and to read the answer.
        let chunk = vec![b' '; 1 << 20];
        for chunked in [false, true] {
            let mut s = connect(&socket);
            let mut writer = s.get_ref().try_clone().unwrap();
            let chunk = chunk.clone();
            let sender = std::thread::spawn(move || {
                let (head, framing) = if chunked {
                    (
                        "Transfer-Encoding: chunked".to_owned(),
                        format!("{:x}\r\n", chunk.len()),
                    )
                } else {
                    (format!("Content-Length: {}", 65 * chunk.len()), String::new())
                };
                writer.write_all(format!("POST /run HTTP/1.1\r\n{head}\r\n\r\n").as_bytes())?;
                for _ in 0..65 {
                    writer.write_all(framing.as_bytes())?;
                    writer.write_all(&chunk)?;
                    if chunked {
                        writer.write_all(b"\r\n")?;
                    }
                }
                writer.write_all(if chunked { &b"0\r\n\r\n"[..] } else { b"" })
            });
            let (status, headers, body) = read_answer(&mut s);
            assert_eq!(
                (status, json_of(&body)["error"]["message"].clone()),
                (400, json!("body is larger than 67108864 bytes")),
                "chunked: {chunked}"
            );
            assert!(headers.contains(&("connection".to_owned(), "close".to_owned())));
            sender.join().unwrap().unwrap();
            assert!(closed(&mut s));
        }

        // Under Expect: 100-continue an oversized body is refused before the go-ahead.
        let mut s = connect(&socket);
        let (status, _, body) = exchange(
            &mut s,
            b"POST /run HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 67108865\r\n\r\n",
        );
        assert_eq!(
            (status, json_of(&body)["error"]["message"].clone()),
            (400, json!("body is larger than 67108864 bytes"))
        );
        assert!(closed(&mut s));

        // Expect: 100-continue gets the go-ahead first.
        let mut s = connect(&socket);
        s.get_mut()
            .write_all(b"POST /init HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .unwrap();
        let (status, _, _) = read_answer(&mut s);
        assert_eq!(status, 100);
        s.get_mut().write_all(b"[]").unwrap();
        let (status, _, body) = read_answer(&mut s);
        assert_eq!(
            (status, json_of(&body)["error"]["message"].clone()),
            (400, json!("body must be a JSON object"))
        );
    }

    // A stand-in for a function library: echoes its input, answers malformed when asked, and
    // blocks until released when asked.
    static RELEASE: AtomicBool = AtomicBool::new(false);
    static BLOCKED: AtomicBool = AtomicBool::new(false);
    /// The thread of every call.
    static CALLED_ON: std::sync::Mutex<Vec<std::thread::ThreadId>> = std::sync::Mutex::new(Vec::new());

    #[allow(unsafe_code)]
    mod fake {
        use super::*;

        pub(super) unsafe extern "C" fn call(input: *const u8, len: usize, output_len: *mut usize) -> *mut u8 {
            // SAFETY: the runtime passes `len` readable bytes at `input`.
            let input = unsafe { std::slice::from_raw_parts(input, len) };
            let text = String::from_utf8_lossy(input);
            CALLED_ON.lock().unwrap().push(std::thread::current().id());
            if text.contains("block") {
                BLOCKED.store(true, Ordering::SeqCst);
                while !RELEASE.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            let answer = if text.contains("malformed") {
                "{\"nope\":1}".to_owned()
            } else {
                format!("{{\"result\":{text}}}")
            };
            let answer = answer.into_bytes().into_boxed_slice();
            // SAFETY: the runtime passes a valid place for the length.
            unsafe { output_len.write(answer.len()) };
            Box::into_raw(answer).cast::<u8>()
        }

        pub(super) unsafe extern "C" fn free(ptr: *mut u8, len: usize) {
            // SAFETY: `ptr`/`len` are a Box<[u8]> leaked by `call` above, freed once.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) });
        }
    }

    #[test]
    fn runs_over_a_socket() {
        let (_dir, socket) = start(Runtime::with_function(Function::from_raw(fake::call, fake::free)));
        let mut s = connect(&socket);
        let (status, _, body) = exchange(&mut s, &post("/run", r#"{"params": {"a": 1}, "deadline_ms": 100}"#));
        assert_eq!(status, 200);
        assert_eq!(json_of(&body), json!({"result": {"params": {"a": 1}, "context": {}}}));
        let (status, _, body) = exchange(&mut s, &post("/run", r#"{"params": {"malformed": true}}"#));
        assert_eq!(status, 200);
        assert_eq!(
            json_of(&body),
            json!({"error": {"code": "RUNTIME_ERROR", "message": "the function returned a malformed answer",
                             "details": {"type": "ProtocolError"}}})
        );
        let (status, _, body) = exchange(&mut s, &post("/init", r#"{"entrypoint": "f.so", "code": ""}"#));
        assert_eq!(
            (status, json_of(&body)["error"]["code"].clone()),
            (409, json!("ALREADY_INITIALIZED"))
        );

        // A run in progress on the first connection (served by the function thread): /health
        // still answers on another connection, and another /run there is BUSY.
        let blocked = std::thread::spawn(move || {
            s.get_mut()
                .write_all(&post("/run", r#"{"params": {"block": true}}"#))
                .unwrap();
            let status = read_answer(&mut s).0;
            (status, s)
        });
        while !BLOCKED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut other = connect(&socket);
        let (status, _, body) = exchange(&mut other, b"GET /health HTTP/1.1\r\n\r\n");
        assert_eq!((status, json_of(&body)["initialized"].clone()), (200, json!(true)));
        let (status, _, body) = exchange(&mut other, &post("/run", "{}"));
        assert_eq!((status, json_of(&body)["error"]["code"].clone()), (409, json!("BUSY")));
        RELEASE.store(true, Ordering::SeqCst);
        let (status, mut s) = blocked.join().unwrap();
        assert_eq!(status, 200);

        // Runs on either connection, each answered, all on the one function thread.
        for first in [true, false, true] {
            let stream = if first { &mut s } else { &mut other };
            let (status, _, _) = exchange(stream, &post("/run", "{}"));
            assert_eq!(status, 200, "on the first connection: {first}");
        }
        let threads = CALLED_ON.lock().unwrap();
        assert_eq!(threads.len(), 6, "{threads:?}");
        assert!(threads.iter().all(|t| *t == threads[0]), "{threads:?}");
        assert_ne!(threads[0], std::thread::current().id());
    }
}
