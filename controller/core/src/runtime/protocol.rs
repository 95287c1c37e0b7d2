//! The runtime protocol, client side (docs/runtime-protocol.md): typed
//! `GET /health`, `POST /init` and `POST /run` over HTTP/1.1 + JSON, and the
//! mapping of their answers. Every backend whose instances are runtime
//! servers (process today; containers and pods later) reaches them through
//! this one client; a backend only says where an instance listens.
//!
//! The transport is one HTTP/1.1 connection per instance (hyper's
//! connection-level client), kept between calls and driven by the call
//! itself rather than by a task of its own: an instance serves one call at
//! a time, and a connection task and a pool were two more hand-offs per
//! call. It dials either a Unix socket or a TCP address on loopback. Over
//! TCP every request carries the instance's own token (`Authorization:
//! Bearer`), so that a runtime published on a port answers only its
//! controller.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::{RunOutcome, RunRequest};
use crate::wakes::without_self_wakes;

/// Largest `/health` or `/init` answer read.
const MAX_CONTROL_RESPONSE: usize = 256 * 1024;

/// Where an instance's runtime server listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// A Unix socket (the process backend; a container's bind-mounted socket).
    Unix(PathBuf),
    /// A TCP address on loopback (a container's published port, a pod), and
    /// the instance's token.
    Tcp { addr: SocketAddr, token: SecretString },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("cannot reach the instance: {0}")]
    Connect(String),
    #[error("connection to the instance failed: {0}")]
    Http(String),
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    #[error("instance answered something that is not JSON: {0}")]
    BadBody(String),
    /// An answer the protocol does not have for this request.
    #[error("{path} answered {status}: {message}")]
    Status {
        path: &'static str,
        status: StatusCode,
        message: String,
    },
}

/// Why `/init` did not load the function.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The code did not load (422): a syntax error, a throw at load time, no handler.
    #[error("{message}")]
    Refused { message: String, details: Value },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// What `/init` sends: the function's code (source text, or a built
/// artifact as base64) under the file name the runtime writes it to.
#[derive(Debug, Clone)]
pub struct InitPayload {
    pub language_title: String,
    pub version: i64,
    pub entrypoint: String,
    pub handler: String,
    pub code: std::sync::Arc<str>,
    pub env: Value,
    /// The function is a package whose files the backend put in
    /// `function/` beside the instance's socket before `/init`; `code` is
    /// empty and `entrypoint` a path among those files.
    pub package: bool,
}

/// What `/run` sends (docs/runtime-protocol.md).
#[derive(serde::Serialize)]
struct RunBody<'a> {
    params: &'a Value,
    context: &'a Value,
    deadline_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_marker: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    files_token: Option<&'a str>,
}

/// One instance's client.
pub struct RuntimeClient {
    endpoint: Endpoint,
    /// The connection kept between calls (taken out during one).
    idle: Mutex<Option<Connection>>,
    /// Sent with every request over TCP.
    token: Option<SecretString>,
}

/// One HTTP/1.1 connection to an instance: the handle requests go through,
/// and the connection's own future, which moves its bytes when polled.
struct Connection {
    sender: http1::SendRequest<Full<Bytes>>,
    driver: Pin<Box<http1::Connection<TokioIo<Stream>, Full<Bytes>>>>,
}

impl std::fmt::Debug for RuntimeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeClient").finish_non_exhaustive()
    }
}

impl RuntimeClient {
    pub fn new(endpoint: Endpoint) -> Self {
        let token = match &endpoint {
            Endpoint::Tcp { token, .. } => Some(token.clone()),
            Endpoint::Unix(_) => None,
        };
        RuntimeClient {
            endpoint,
            idle: Mutex::new(None),
            token,
        }
    }

    /// The kept connection when it is still open, else a new one.
    async fn connection(&self) -> Result<Connection, ProtocolError> {
        let kept = self.idle.lock().unwrap().take();
        if let Some(mut conn) = kept {
            // Nothing polls a kept connection between calls: one poll now
            // reads the end of one the server has closed since (it ends).
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let ended = conn.sender.is_closed() || conn.driver.as_mut().poll(&mut cx).is_ready();
            if !ended {
                return Ok(conn);
            }
        }
        let connect = |e: std::io::Error| ProtocolError::Connect(e.to_string());
        let stream = match &self.endpoint {
            Endpoint::Unix(path) => Stream::Unix(UnixStream::connect(path).await.map_err(connect)?),
            Endpoint::Tcp { addr, .. } => {
                let stream = TcpStream::connect(addr).await.map_err(connect)?;
                stream.set_nodelay(true).map_err(connect)?;
                Stream::Tcp(stream)
            }
        };
        let (sender, driver) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProtocolError::Connect(error_chain(&e)))?;
        Ok(Connection {
            sender,
            driver: Box::pin(driver),
        })
    }

    /// Whether the runtime server is up and answering.
    pub async fn health(&self) -> Result<(), ProtocolError> {
        let (status, body) = self
            .call(Method::GET, "/health", None::<&()>, MAX_CONTROL_RESPONSE)
            .await?;
        match status {
            StatusCode::OK => Ok(()),
            status => Err(unexpected("/health", status, &body)),
        }
    }

    /// Loads the function; an instance is initialised at most once.
    pub async fn init(&self, payload: &InitPayload) -> Result<(), InitError> {
        let mut body = json!({
            "language_title": payload.language_title,
            "version": payload.version,
            "entrypoint": payload.entrypoint,
            "handler": payload.handler,
            "code": &*payload.code,
            "env": payload.env,
        });
        if payload.package {
            body["package"] = json!(true);
        }
        let (status, answer) = self
            .call(Method::POST, "/init", Some(&body), MAX_CONTROL_RESPONSE)
            .await?;
        match status {
            StatusCode::OK => Ok(()),
            StatusCode::UNPROCESSABLE_ENTITY => {
                let (_, message, details) = error_parts(&answer);
                Err(InitError::Refused { message, details })
            }
            status => Err(unexpected("/init", status, &answer).into()),
        }
    }

    /// Runs the function once; reads at most `max_response` bytes of the answer.
    /// Runs once; with `log_marker`, the runtime writes it on stdout and
    /// stderr when the run ends, before it answers.
    pub async fn run(
        &self,
        request: RunRequest<'_>,
        log_marker: Option<&str>,
        max_response: usize,
    ) -> Result<RunOutcome, ProtocolError> {
        // Serialised from the request's own values: a `json!` copies the
        // params and context whole first.
        let body = RunBody {
            params: request.params,
            context: request.context,
            deadline_ms: request.deadline.as_millis() as u64,
            log_marker,
            files_token: request.files_token,
        };
        let (status, mut answer) = self.call(Method::POST, "/run", Some(&body), max_response).await?;
        if status != StatusCode::OK {
            return Err(unexpected("/run", status, &answer));
        }
        if let Some(result) = answer.get_mut("result") {
            return Ok(RunOutcome::Success(result.take()));
        }
        let (code, message, details) = error_parts(&answer);
        Ok(if code == "INVALID_PARAMS" {
            RunOutcome::InvalidParams { message, details }
        } else {
            RunOutcome::Failed { message, details }
        })
    }

    /// Sends one request; reads at most `max_response` bytes of the answer.
    async fn call(
        &self,
        method: Method,
        path: &'static str,
        body: Option<&impl serde::Serialize>,
        max_response: usize,
    ) -> Result<(StatusCode, Value), ProtocolError> {
        let bytes = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v).map_err(|e| ProtocolError::BadBody(e.to_string()))?),
            None => Bytes::new(),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            // HTTP/1.1 requires one (Node's server refuses a request
            // without); the connection reaches one instance whatever it says.
            .header(hyper::header::HOST, "runtime")
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            request = request.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", token.expose_secret()),
            );
        }
        let request = request.body(Full::new(bytes)).expect("static request parts are valid");
        let mut conn = self.connection().await?;
        // Handing the request over and the answer back wake this task while
        // it polls them (see [`crate::wakes`]).
        let (exchanged, open) = without_self_wakes(async {
            let Connection { sender, driver } = &mut conn;
            let exchange = async {
                sender.ready().await.map_err(|e| ProtocolError::Http(error_chain(&e)))?;
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| ProtocolError::Http(error_chain(&e)))?;
                let status = response.status();
                let body = Limited::new(response.into_body(), max_response)
                    .collect()
                    .await
                    .map_err(|e| match e.downcast::<hyper::Error>() {
                        Ok(e) => ProtocolError::Http(e.to_string()),
                        Err(_) => ProtocolError::TooLarge(max_response),
                    })?
                    .to_bytes();
                Ok::<_, ProtocolError>((status, body))
            };
            let mut exchange = std::pin::pin!(exchange);
            // The exchange moves only while the connection is polled beside it.
            tokio::select! {
                biased;
                exchanged = &mut exchange => (exchanged, true),
                // Its end: what it read is in the exchange's channels, and a
                // request it never sent would wait for it forever.
                _ended = driver.as_mut() => {
                    let mut cx = Context::from_waker(std::task::Waker::noop());
                    match exchange.as_mut().poll(&mut cx) {
                        Poll::Ready(exchanged) => (exchanged, false),
                        Poll::Pending => (Err(ProtocolError::Http("the instance closed the connection".into())), false),
                    }
                }
            }
        })
        .await;
        let (status, body) = exchanged?;
        if open {
            *self.idle.lock().unwrap() = Some(conn);
        }
        let value = serde_json::from_slice(&body).map_err(|e| ProtocolError::BadBody(e.to_string()))?;
        Ok((status, value))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    message
}

fn unexpected(path: &'static str, status: StatusCode, body: &Value) -> ProtocolError {
    ProtocolError::Status {
        path,
        status,
        message: error_parts(body).1,
    }
}

/// The `error` object of an answer: code, message, details (an object).
fn error_parts(body: &Value) -> (String, String, Value) {
    let error = &body["error"];
    let code = error["code"].as_str().unwrap_or("RUNTIME_ERROR").to_owned();
    let message = error["message"].as_str().unwrap_or("the function failed").to_owned();
    let details = match &error["details"] {
        Value::Object(_) => error["details"].clone(),
        _ => json!({}),
    };
    (code, message, details)
}

/// A connection to an instance over either transport.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The client against a real HTTP server on loopback TCP (the Unix
    //! socket path is exercised end to end by every process-backend test).

    use super::*;
    use std::sync::Arc;

    use axum::Json;
    use axum::http::HeaderMap;
    use axum::routing::{get, post};

    const TOKEN: &str = "instance-token-0123456789";

    fn authorized(headers: &HeaderMap) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
    }

    async fn runtime_on_loopback() -> SocketAddr {
        let app = axum::Router::new()
            .route(
                "/health",
                get(|h: HeaderMap| async move {
                    match authorized(&h) {
                        // As Node's server, which refuses HTTP/1.1 without a Host.
                        true if !h.contains_key("host") => {
                            (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": "no host"}})))
                        }
                        true => (StatusCode::OK, Json(json!({"status": "ok"}))),
                        false => (StatusCode::UNAUTHORIZED, Json(json!({"error": {"message": "bad token"}}))),
                    }
                }),
            )
            .route(
                "/init",
                post(|Json(body): Json<Value>| async move {
                    match body["code"].as_str().unwrap_or_default() {
                        "ok" => (StatusCode::OK, Json(json!({"status": "initialized"}))),
                        _ => (
                            StatusCode::UNPROCESSABLE_ENTITY,
                            Json(json!({"error": {"code": "INIT_ERROR", "message": "syntax error", "details": {"line": 3}}})),
                        ),
                    }
                }),
            )
            .route(
                "/run",
                post(|Json(body): Json<Value>| async move {
                    let answer = match body["params"]["mode"].as_str() {
                        Some("invalid") => json!({"error": {"code": "INVALID_PARAMS", "message": "no"}}),
                        Some("fail") => json!({"error": {"code": "RUNTIME_ERROR", "message": "boom", "details": "x"}}),
                        Some("big") => json!({"result": "y".repeat(4096)}),
                        _ => json!({"result": {"echo": body["params"], "deadline_ms": body["deadline_ms"]}}),
                    };
                    Json(answer)
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn payload(code: &str) -> InitPayload {
        InitPayload {
            package: false,
            language_title: "nodejs-x".into(),
            version: 1,
            entrypoint: "index.js".into(),
            handler: "handler".into(),
            code: code.into(),
            env: json!({}),
        }
    }

    fn request(params: &Value) -> RunRequest<'_> {
        static CONTEXT: Value = Value::Null;
        RunRequest {
            params,
            context: &CONTEXT,
            deadline: std::time::Duration::from_millis(1500),
            logs: None,
            files_token: None,
        }
    }

    #[tokio::test]
    async fn over_tcp_every_call_carries_the_instance_token_and_answers_are_typed() {
        let addr = runtime_on_loopback().await;
        let client = RuntimeClient::new(Endpoint::Tcp {
            addr,
            token: SecretString::from(TOKEN),
        });
        client.health().await.unwrap();
        client.init(&payload("ok")).await.unwrap();
        match client.init(&payload("broken")).await {
            Err(InitError::Refused { message, details }) => {
                assert_eq!(message, "syntax error");
                assert_eq!(details, json!({"line": 3}));
            }
            other => panic!("{other:?}"),
        }
        let params = json!({"n": 1});
        match client.run(request(&params), None, 1 << 20).await.unwrap() {
            RunOutcome::Success(v) => assert_eq!(v, json!({"echo": {"n": 1}, "deadline_ms": 1500})),
            other => panic!("{other:?}"),
        }
        let invalid = json!({"mode": "invalid"});
        assert!(matches!(
            client.run(request(&invalid), None, 1 << 20).await.unwrap(),
            RunOutcome::InvalidParams { .. }
        ));
        let fail = json!({"mode": "fail"});
        match client.run(request(&fail), None, 1 << 20).await.unwrap() {
            RunOutcome::Failed { message, details } => assert_eq!((message.as_str(), details), ("boom", json!({}))),
            other => panic!("{other:?}"),
        }
        let big = json!({"mode": "big"});
        assert!(matches!(
            client.run(request(&big), None, 1024).await,
            Err(ProtocolError::TooLarge(1024))
        ));
        // The connection survives an oversized answer: the next call works.
        client.health().await.unwrap();
    }

    #[tokio::test]
    async fn a_wrong_token_or_no_listener_is_a_protocol_error() {
        let addr = runtime_on_loopback().await;
        let wrong = RuntimeClient::new(Endpoint::Tcp {
            addr,
            token: SecretString::from("not-the-token"),
        });
        assert!(matches!(
            wrong.health().await,
            Err(ProtocolError::Status {
                status: StatusCode::UNAUTHORIZED,
                ..
            })
        ));
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let nobody = RuntimeClient::new(Endpoint::Tcp {
            addr: gone,
            token: SecretString::from(TOKEN),
        });
        assert!(matches!(nobody.health().await, Err(ProtocolError::Connect(_))));
        let missing = RuntimeClient::new(Endpoint::Unix("/nonexistent/fnrt.sock".into()));
        assert!(matches!(missing.health().await, Err(ProtocolError::Connect(_))));
    }

    #[tokio::test]
    async fn calls_share_one_connection_and_without_one_a_call_dials_anew() {
        use axum::extract::ConnectInfo;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        let app = axum::Router::new().route(
            "/health",
            get(move |ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                seen.lock().unwrap().push(peer.port());
                Json(json!({"status": "ok"}))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            async move { axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await },
        );
        let client = RuntimeClient::new(Endpoint::Tcp {
            addr,
            token: SecretString::from(TOKEN),
        });
        for _ in 0..5 {
            client.health().await.unwrap();
        }
        // No connection kept (as after a call that was cut off): a new one.
        drop(client.idle.lock().unwrap().take());
        client.health().await.unwrap();
        let ports = peers.lock().unwrap().clone();
        assert_eq!(ports.len(), 6);
        assert!(ports[..5].iter().all(|&p| p == ports[0]), "{ports:?}");
        assert_ne!(ports[5], ports[0]);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_between_calls_is_replaced() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A server that answers one request per connection, then closes it
        // without saying so (no `Connection: close`).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let body = r#"{"status":"ok"}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
                // Closed after the client has read its answer, while idle.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        });
        let client = RuntimeClient::new(Endpoint::Tcp {
            addr,
            token: SecretString::from(TOKEN),
        });
        for _ in 0..3 {
            client.health().await.unwrap();
            // Let the server's close reach this side before the next call.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}
