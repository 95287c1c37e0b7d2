//! The server: HTTP/1.1 by hyper on two current-thread tokio runtimes, one on the main thread and
//! one on the function thread, where the function's code runs. Routing, bounded bodies and the
//! answers' HTTP form are here; hyper does the protocol (request heads, `Content-Length` and
//! chunked bodies, `Expect: 100-continue`, keep-alive, `HEAD`).
//!
//! The main thread accepts every connection. The first one (while it lasts) goes to the function
//! thread, which serves it and runs its `/init` and `/run` right there: the controller keeps one
//! connection per instance, so a run costs no hand-off between threads (two wake-ups, each a
//! context switch on a machine whose cores the controller shares). Any other connection stays on
//! the main thread, which answers its `/health` and refusals (`409 BUSY`) at once, also during a
//! run, and hands its `/init` and `/run` to the function thread. While such a handed-over run is
//! in progress, the function thread's own connection waits for it.

use std::convert::Infallible;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::runtime::{Answer, Runtime, error};

/// Request bodies larger than this are refused.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// The function thread runs the function (/run calls it there), so it gets a main thread's stack.
/// Explicit, too, so spawning it does not read RUST_MIN_STACK (see `Runtime::replace_environment`).
const STACK_SIZE: usize = 8 * 1024 * 1024;

/// How long, and how much of, an oversized body is read and discarded after the answer before the
/// connection is closed, so that a client still sending it gets to read the answer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
const DRAIN_BYTES: usize = 2 * MAX_BODY_BYTES;

/// Writes one line to stderr (diagnostics only; stdout is the function's). Never panics.
pub(crate) fn log(message: &str) {
    let _ = writeln!(io::stderr(), "fnrt-runtime-rust: {message}");
}

/// An /init's loading or a /run's call, answer included, handed to the function thread.
type Job = Box<dyn FnOnce() + Send>;

/// What the main thread hands the function thread.
enum Work {
    /// A connection to serve there, its runs on the spot.
    Connection(StdUnixStream),
    /// The function's code for a request read on the main thread.
    Job(Job),
}

/// The one thread the function's code runs on, for the life of the process: /init's loading (the
/// library's initialisers) and every /run's call, one after the other. Started with the server, so
/// serving never needs a new thread, whatever the function does with RLIMIT_NPROC.
#[derive(Debug, Clone)]
struct FunctionThread {
    work: mpsc::UnboundedSender<Work>,
    /// Whether it serves a connection (it serves at most one).
    serving: Arc<AtomicBool>,
}

impl FunctionThread {
    /// Starts the thread, with a tokio runtime of its own for the connection it is handed.
    fn start(runtime: Arc<Runtime>) -> io::Result<FunctionThread> {
        let (work, mut queue) = mpsc::unbounded_channel::<Work>();
        let serving = Arc::new(AtomicBool::new(false));
        let tokio = current_thread_runtime()?;
        let function_thread = FunctionThread { work, serving };
        let served = Arc::clone(&function_thread.serving);
        thread::Builder::new()
            .name("function".to_owned())
            .stack_size(STACK_SIZE)
            .spawn(move || {
                tokio.block_on(async move {
                    while let Some(work) = queue.recv().await {
                        match work {
                            // Only a bug of the runtime's can panic here (the SDK keeps the
                            // function from unwinding): that request gets a 500 (its answer's
                            // sender is dropped), the thread carries on.
                            Work::Job(job) => drop(panic::catch_unwind(AssertUnwindSafe(job))),
                            Work::Connection(stream) => {
                                let (served, runtime) = (Arc::clone(&served), Arc::clone(&runtime));
                                match into_tokio(stream) {
                                    Ok(stream) => {
                                        tokio::spawn(async move {
                                            serve_connection(stream, runtime, Place::Here).await;
                                            served.store(false, Ordering::Release);
                                        });
                                    }
                                    Err(_) => served.store(false, Ordering::Release),
                                }
                            }
                        }
                    }
                });
            })?;
        Ok(function_thread)
    }

    /// Runs `work` on the function thread; waits for its answer without blocking the server.
    async fn run(&self, work: impl FnOnce() -> Answer + Send + 'static) -> Answer {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move || {
            // The client may have gone away meanwhile: nobody to answer.
            let _ = answer.send(work());
        });
        // Sending never blocks; if the thread is gone the job comes back and is dropped, and with
        // it the `Init`/`Run`, which ends its claim on the instance.
        if self.work.send(Work::Job(job)).is_err() {
            return internal_error();
        }
        answered.await.unwrap_or_else(|_| internal_error())
    }

    /// Hands `stream` to the function thread if it serves none; else gives it back.
    fn take(&self, stream: UnixStream) -> Option<UnixStream> {
        if self.serving.swap(true, Ordering::AcqRel) {
            return Some(stream);
        }
        let given = match stream.into_std() {
            Ok(given) => given,
            Err(e) => {
                // The connection is lost (closed); the next one is handed over instead.
                self.serving.store(false, Ordering::Release);
                log(&format!("cannot hand a connection over: {e}"));
                return None;
            }
        };
        let Err(mpsc::error::SendError(Work::Connection(back))) = self.work.send(Work::Connection(given)) else {
            return None; // handed over
        };
        // The thread is gone: serve it here, where its runs will be refused.
        self.serving.store(false, Ordering::Release);
        into_tokio(back).ok()
    }
}

/// Where a connection's `/init` and `/run` run.
#[derive(Debug, Clone)]
enum Place {
    /// On this thread: the function thread's own connection.
    Here,
    /// Handed to the function thread: a connection of the main thread's.
    There(FunctionThread),
}

impl Place {
    async fn run(&self, work: impl FnOnce() -> Answer + Send + 'static) -> Answer {
        match self {
            Place::Here => panic::catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|_| internal_error()),
            Place::There(function_thread) => function_thread.run(work).await,
        }
    }
}

fn internal_error() -> Answer {
    let message = "the runtime failed while running the function".to_owned();
    error(500, "INTERNAL_ERROR", message, None)
}

/// A connection the main thread accepted, for the tokio runtime of the thread calling this.
fn into_tokio(stream: StdUnixStream) -> io::Result<UnixStream> {
    stream.set_nonblocking(true)?;
    UnixStream::from_std(stream)
}

/// A current-thread tokio runtime: no thread of its own, and none later (nothing here calls
/// `spawn_blocking`).
fn current_thread_runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
}

/// The server, ready to serve: the function thread and the tokio runtime that serves HTTP on the
/// thread calling [`Server::serve`].
#[derive(Debug)]
pub(crate) struct Server {
    runtime: Arc<Runtime>,
    function_thread: FunctionThread,
    tokio: tokio::runtime::Runtime,
}

impl Server {
    /// Starts the function thread and builds the main thread's tokio runtime: the only threads,
    /// ever, besides the caller's.
    pub(crate) fn start(runtime: Arc<Runtime>) -> io::Result<Server> {
        let function_thread = FunctionThread::start(Arc::clone(&runtime))?;
        let tokio = current_thread_runtime()?;
        Ok(Server {
            runtime,
            function_thread,
            tokio,
        })
    }

    /// Serves `listener` forever on this thread. Returns only if it cannot start serving it.
    pub(crate) fn serve(self, listener: StdUnixListener) -> ExitCode {
        let Server {
            runtime,
            function_thread,
            tokio,
        } = self;
        tokio.block_on(async move {
            let listener = match listener
                .set_nonblocking(true)
                .and_then(|()| UnixListener::from_std(listener))
            {
                Ok(listener) => listener,
                Err(e) => {
                    log(&format!("cannot serve the socket: {e}"));
                    return ExitCode::FAILURE;
                }
            };
            accept_loop(listener, runtime, function_thread).await
        })
    }
}

async fn accept_loop(listener: UnixListener, runtime: Arc<Runtime>, function_thread: FunctionThread) -> ! {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if let Some(stream) = function_thread.take(stream) {
                    let place = Place::There(function_thread.clone());
                    tokio::spawn(serve_connection(stream, Arc::clone(&runtime), place));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                log(&format!("accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one connection until it closes, its `/init` and `/run` run at `place`.
async fn serve_connection(stream: UnixStream, runtime: Arc<Runtime>, place: Place) {
    let service = service_fn(move |request| handle(request, Arc::clone(&runtime), place.clone()));
    // An error is a peer that went away or a request hyper could not parse (it answered that one
    // itself, 400 and close): nothing left to do either way.
    let _ = http1::Builder::new()
        // A client that shuts down its sending side still gets its answer (else hyper drops a
        // request in progress when it reads the end of the stream).
        .half_close(true)
        // No timer is set, so hyper times nothing out; said here too: a kept-alive connection may
        // wait for its next request (the controller's next call) for as long as the instance
        // lives.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// The routes: path → method.
fn route(path: &str) -> Option<&'static str> {
    match path {
        "/health" => Some("GET"),
        "/init" | "/run" => Some("POST"),
        _ => None,
    }
}

async fn handle(
    request: Request<Incoming>,
    runtime: Arc<Runtime>,
    place: Place,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (head, body) = request.into_parts();
    // The body is read even for a request we refuse, so that a kept-alive connection carries on.
    let body = match read_body(&head.headers, body).await {
        Ok(body) => body,
        Err(answer) => return Ok(http_response(answer, true)),
    };
    let path = head.uri.path();
    let answer = match (route(path), path) {
        (None, path) => error(404, "NOT_FOUND", format!("no route {path}"), None),
        (Some(method), path) if method != head.method.as_str() => Answer {
            allow: Some(method),
            ..error(405, "METHOD_NOT_ALLOWED", format!("{path} takes {method}"), None)
        },
        (_, "/health") => runtime.health(),
        // The checks answer here at once; the function's code runs on its thread.
        (_, "/init") => match runtime.begin_init(&body) {
            Ok(init) => place.run(move || init.load()).await,
            Err(answer) => answer,
        },
        _ => match runtime.begin_run(&body) {
            Ok(run) => place.run(move || run.call()).await,
            Err(answer) => answer,
        },
    };
    Ok(http_response(answer, false))
}

/// Reads a request's body, at most [`MAX_BODY_BYTES`]; else the 400 to answer (and close with).
async fn read_body(headers: &HeaderMap, mut body: Incoming) -> Result<Vec<u8>, Answer> {
    let too_large = || {
        let message = format!("body is larger than {MAX_BODY_BYTES} bytes");
        error(400, "BAD_REQUEST", message, None)
    };
    // The Content-Length, if there is one.
    let declared = body.size_hint().lower();
    if declared > MAX_BODY_BYTES as u64 {
        // Refused before a byte is read, so before hyper sends `100 Continue`: a client that asked
        // for it sends no body, and there is nothing to drain.
        if !expects_continue(headers) {
            drain(body);
        }
        return Err(too_large());
    }
    // Grown as data arrives: a client cannot make us allocate 64 MiB by saying so.
    let mut bytes = Vec::with_capacity(declared.min(1 << 20) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| error(400, "BAD_REQUEST", format!("malformed body: {}", causes(&e)), None))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > MAX_BODY_BYTES {
                drain(body);
                return Err(too_large());
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Reads and discards the rest of a refused body for a while, in the background, while the answer
/// goes out; then drops it, which closes the connection.
fn drain(mut body: Incoming) {
    tokio::spawn(async move {
        let mut left = DRAIN_BYTES;
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(Ok(frame)) = body.frame().await {
                left = left.saturating_sub(frame.data_ref().map_or(0, Bytes::len));
                if left == 0 {
                    break;
                }
            }
        })
        .await;
    });
}

/// An error's message with its causes (`error reading a body from connection: invalid chunk size line`).
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// The HTTP form of an answer: JSON, with `Allow` for 405s; `close` adds `Connection: close`,
/// which hyper honours. hyper sets `Content-Length` (and leaves the body out for `HEAD`).
fn http_response(answer: Answer, close: bool) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(allow) = answer.allow {
        headers.insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
