//! The server: HTTP/1.1 by hyper on a current-thread tokio runtime (the main thread), and the
//! function thread, where the function's code runs. Routing, bounded bodies and the answers' HTTP
//! form are here; hyper does the protocol (request heads, `Content-Length` and chunked bodies,
//! `Expect: 100-continue`, keep-alive, `HEAD`).

use std::convert::Infallible;
use std::io::{self, Write};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::oneshot;

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

/// What the function thread runs: an /init's loading or a /run's call, answer included.
type Job = Box<dyn FnOnce() + Send>;

/// The one thread the function's code runs on, for the life of the process: /init's loading (the
/// library's initialisers) and every /run's call, one after the other. Started with the server, so
/// serving never needs a new thread, whatever the function does with RLIMIT_NPROC.
#[derive(Debug, Clone)]
struct FunctionThread {
    jobs: mpsc::Sender<Job>,
}

impl FunctionThread {
    fn start() -> io::Result<FunctionThread> {
        let (jobs, queue) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("function".to_owned())
            .stack_size(STACK_SIZE)
            .spawn(move || {
                for job in queue {
                    // Only a bug of the runtime's can panic here (the SDK keeps the function from
                    // unwinding): that request gets a 500 (its answer's sender is dropped), the
                    // thread carries on.
                    let _ = panic::catch_unwind(AssertUnwindSafe(job));
                }
            })?;
        Ok(FunctionThread { jobs })
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
        if self.jobs.send(job).is_err() {
            return internal_error();
        }
        answered.await.unwrap_or_else(|_| internal_error())
    }
}

fn internal_error() -> Answer {
    let message = "the runtime failed while running the function".to_owned();
    error(500, "INTERNAL_ERROR", message, None)
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
    /// Starts the function thread and builds the tokio runtime: the only threads, ever, besides
    /// the caller's (a current-thread runtime, which never starts blocking-pool threads here since
    /// nothing calls `spawn_blocking`).
    pub(crate) fn start(runtime: Arc<Runtime>) -> io::Result<Server> {
        let function_thread = FunctionThread::start()?;
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
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
                let runtime = Arc::clone(&runtime);
                let function_thread = function_thread.clone();
                let service = service_fn(move |request| handle(request, Arc::clone(&runtime), function_thread.clone()));
                tokio::spawn(async move {
                    // An error is a peer that went away or a request hyper could not parse (it
                    // answered that one itself, 400 and close): nothing left to do either way.
                    let _ = http1::Builder::new()
                        // A client that shuts down its sending side still gets its answer (else
                        // hyper drops a request in progress when it reads the end of the stream).
                        .half_close(true)
                        // No timer is set, so hyper times nothing out; said here too: a kept-alive
                        // connection may wait for its next request (the controller's next call)
                        // for as long as the instance lives.
                        .header_read_timeout(None)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
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
    function_thread: FunctionThread,
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
            Ok(init) => function_thread.run(move || init.load()).await,
            Err(answer) => answer,
        },
        _ => match runtime.begin_run(&body) {
            Ok(run) => function_thread.run(move || run.call()).await,
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
