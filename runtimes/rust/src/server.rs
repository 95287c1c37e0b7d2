//! The accept loop and one connection's request loop: routing, bounded bodies, keep-alive.

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::http::{self, HttpError, MAX_BODY_BYTES};
use crate::runtime::{Answer as Response, Init, Run, Runtime, error};

/// Connection threads run the function (a /run calls it on its connection's thread), so they get
/// a main thread's stack. Explicit, too, so spawning never reads RUST_MIN_STACK (see
/// `Runtime::replace_environment`).
const STACK_SIZE: usize = 8 * 1024 * 1024;

/// Read timeout while discarding the rest of an oversized body before closing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes one line to stderr (diagnostics only; stdout is the function's). Never panics.
pub(crate) fn log(message: &str) {
    let _ = writeln!(io::stderr(), "fnrt-runtime-rust: {message}");
}

/// Serves `listener` forever, one thread per connection.
pub(crate) fn serve(listener: UnixListener, runtime: Arc<Runtime>) -> ! {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let runtime = Arc::clone(&runtime);
                let spawned = thread::Builder::new()
                    .name("connection".to_owned())
                    .stack_size(STACK_SIZE)
                    .spawn(move || serve_connection(stream, &runtime));
                if let Err(e) = spawned {
                    log(&format!("cannot start a connection thread: {e}"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                log(&format!("accept failed: {e}"));
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// What to do with the connection after an answer.
enum Next {
    KeepAlive,
    Close,
    /// Answered an oversized body without reading it: read and discard up to this many bytes of
    /// it (so the client, still sending, gets to read the answer), then close.
    DrainAndClose(u64),
}

fn serve_connection(stream: UnixStream, runtime: &Arc<Runtime>) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 * 1024, read_half);
    let mut writer = stream;
    loop {
        match serve_request(&mut reader, &mut writer, runtime) {
            Next::KeepAlive => {}
            Next::Close => break,
            Next::DrainAndClose(limit) => {
                let _ = writer.shutdown(Shutdown::Write);
                if writer.set_read_timeout(Some(DRAIN_TIMEOUT)).is_ok() {
                    let _ = io::copy(&mut reader.by_ref().take(limit), &mut io::sink());
                }
                break;
            }
        }
    }
}

/// The routes: path → method.
fn route(path: &str) -> Option<&'static str> {
    match path {
        "/health" => Some("GET"),
        "/init" | "/run" => Some("POST"),
        _ => None,
    }
}

fn serve_request(reader: &mut BufReader<UnixStream>, writer: &mut UnixStream, runtime: &Arc<Runtime>) -> Next {
    let raw = match http::read_head(reader) {
        Ok(Some(raw)) => raw,
        Ok(None) | Err(HttpError::Io) => return Next::Close,
        Err(HttpError::Bad(message)) => return refuse(writer, message, false, Next::Close),
        Err(HttpError::TooLarge { .. }) => return refuse(writer, "request too large".to_owned(), false, Next::Close),
    };
    let head = match http::parse_head(&raw) {
        Ok(head) => head,
        Err(message) => return refuse(writer, message, false, Next::Close),
    };
    let head_only = head.method == "HEAD";

    // The body is read (or discarded) even for a request we refuse, so the next request on a
    // kept-alive connection starts where it should.
    let body = match http::read_body(reader, writer, &head) {
        Ok(body) => body,
        Err(HttpError::Io) => return Next::Close,
        Err(HttpError::Bad(message)) => return refuse(writer, message, head_only, Next::Close),
        Err(HttpError::TooLarge { declared }) => {
            let message = format!("body is larger than {MAX_BODY_BYTES} bytes");
            // After `Expect: 100-continue` the client waits for us and sends no body.
            let next = match declared {
                _ if head.expects_continue() => Next::Close,
                Some(length) => Next::DrainAndClose(length.min(2 * MAX_BODY_BYTES)),
                None => Next::DrainAndClose(2 * MAX_BODY_BYTES),
            };
            return refuse(writer, message, head_only, next);
        }
    };

    let response = match (route(&head.path), head.path.as_str()) {
        (None, path) => error(404, "NOT_FOUND", format!("no route {path}"), None),
        (Some(method), path) if method != head.method => Response {
            allow: Some(method),
            ..error(405, "METHOD_NOT_ALLOWED", format!("{path} takes {method}"), None)
        },
        (_, "/health") => runtime.health(),
        (_, "/init") => runtime.begin_init(&body).map_or_else(|answer| answer, Init::load),
        _ => runtime.begin_run(&body).map_or_else(|answer| answer, Run::call),
    };
    let keep_alive = head.keep_alive();
    match http::write_response(writer, &response, !keep_alive, head_only) {
        Ok(()) if keep_alive => Next::KeepAlive,
        _ => Next::Close,
    }
}

/// Answers 400 BAD_REQUEST with `Connection: close`; returns `next`.
fn refuse(writer: &mut UnixStream, message: String, head_only: bool, next: Next) -> Next {
    let response = error(400, "BAD_REQUEST", message, None);
    match http::write_response(writer, &response, true, head_only) {
        Ok(()) => next,
        Err(_) => Next::Close,
    }
}
