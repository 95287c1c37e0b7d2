//! Client side of the runtime protocol (docs/runtime-protocol.md): HTTP/1.1
//! and JSON over a Unix socket, one kept-alive connection per instance.

use std::path::PathBuf;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("cannot connect to the instance: {0}")]
    Connect(std::io::Error),
    #[error("connection to the instance failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    #[error("instance answered something that is not JSON: {0}")]
    BadBody(String),
}

/// One instance's connection.
pub struct RuntimeClient {
    socket: PathBuf,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl std::fmt::Debug for RuntimeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeClient").field("socket", &self.socket).finish()
    }
}

impl RuntimeClient {
    pub fn new(socket: PathBuf) -> Self {
        RuntimeClient { socket, sender: None }
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, ProtocolError> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = UnixStream::connect(&self.socket)
                .await
                .map_err(ProtocolError::Connect)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            // The connection task ends when the sender is dropped or the peer closes.
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("set above");
        sender.ready().await?;
        Ok(sender)
    }

    /// Sends one request; reads at most `max_response` bytes of the answer.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        max_response: usize,
    ) -> Result<(StatusCode, Value), ProtocolError> {
        let bytes = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v).map_err(|e| ProtocolError::BadBody(e.to_string()))?),
            None => Bytes::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "runtime")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))
            .expect("static request parts are valid");
        let result = async {
            let response = self.sender().await?.send_request(request).await?;
            let status = response.status();
            let body = Limited::new(response.into_body(), max_response)
                .collect()
                .await
                .map_err(|e| match e.downcast::<hyper::Error>() {
                    Ok(e) => ProtocolError::Http(*e),
                    Err(_) => ProtocolError::TooLarge(max_response),
                })?
                .to_bytes();
            let value = serde_json::from_slice(&body).map_err(|e| ProtocolError::BadBody(e.to_string()))?;
            Ok((status, value))
        }
        .await;
        if result.is_err() {
            // A half-read connection cannot be reused.
            self.sender = None;
        }
        result
    }
}
