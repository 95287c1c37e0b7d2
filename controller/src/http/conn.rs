//! The connections the server accepts, and how they are served: TCP, one
//! task per connection, with the contract's JSON body on the one answer no
//! handler writes.
//!
//! [`serve`] is axum's `serve` with two differences: each connection's
//! task absorbs the wakes it makes of itself ([`without_self_wakes`]:
//! hyper's connection wakes its own task once per request with a body,
//! which cost a cross-thread wake-up and a task migration each time), and
//! each request gets the client's address ([`ClientAddr`]) for the rate
//! limits. Each request's body is a [`Lingering`]: what its handler leaves
//! unread is read after the answer, so a client still sending sees it.
//!
//! hyper answers a request head it cannot parse (a bare CR or a NUL in a
//! header, an invalid URI, a head too large) by itself, before any handler
//! or middleware runs, with an empty-bodied 400 (or 414, 431, 505), and then
//! closes the connection. hyper has no hook for that answer, so the write
//! side of each connection ([`Conn`]) recognises it (an error status with
//! `content-length: 0`, which no handler of ours ever answers: every error
//! we write has a JSON body) and writes the same status and headers with
//! the contract's body instead.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use fnrt_core::wakes::without_self_wakes;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt as _};

use super::linger::Lingering;

/// The server's listener: a [`TcpListener`] handing out [`Conn`]s.
#[derive(Debug)]
pub struct Listener(pub TcpListener);

impl Listener {
    async fn accept(&mut self) -> (Conn, SocketAddr) {
        // axum's accept: it waits out errors (a full descriptor table) and
        // tries again.
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (
            Conn {
                stream,
                pending: Vec::new(),
            },
            addr,
        )
    }
}

/// The client's address, for the rate limits of requests without a token.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Serves `app` on `listener` until `shutdown` resolves; then accepts no
/// more, tells every connection to close after the request it is serving,
/// and returns once all have closed.
pub async fn serve<S>(mut listener: Listener, app: S, shutdown: impl Future<Output = ()>)
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let connections = TaskTracker::new();
    let closing = CancellationToken::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let closing = closing.clone();
        connections.spawn(without_self_wakes(async move {
            let lingering = closing.clone();
            let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(ClientAddr(addr)));
                let (parts, body) = request.into_parts();
                let body = Body::new(Lingering::new(body, &parts.headers, &lingering));
                app.clone().oneshot(Request::from_parts(parts, body))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut connection = pin!(connection);
            let served = tokio::select! {
                biased;
                served = connection.as_mut() => served,
                () = closing.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                tracing::trace!(error = %e, "serving a connection");
            }
        }));
    }
    drop(listener);
    closing.cancel();
    connections.close();
    connections.wait().await;
}

/// One accepted connection.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    /// A rewritten answer not yet fully written.
    pending: Vec<u8>,
}

impl Conn {
    /// Writes what is pending; ready once nothing is.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(answer) = with_json_body(buf) {
            self.pending = answer;
            // The whole of hyper's answer is taken; its replacement is
            // written from here and by the flush and shutdown that follow.
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // A body-less answer is one slice: its head.
        if let [only] = bufs
            && with_json_body(only).is_some()
        {
            return self.poll_write(cx, only);
        }
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// hyper's own answer to a request it could not parse, rewritten with the
/// contract's body; `None` for anything else.
fn with_json_body(written: &[u8]) -> Option<Vec<u8>> {
    let head = std::str::from_utf8(written).ok()?.strip_suffix("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let rest = status_line.strip_prefix("HTTP/1.1 ")?;
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    let status: u16 = code.parse().ok()?;
    let headers: Vec<&str> = lines.collect();
    let empty = headers.iter().any(|h| h.eq_ignore_ascii_case("content-length: 0"));
    if status < 400 || !empty || headers.iter().any(|h| h.contains('\n')) {
        return None;
    }
    let body = serde_json::json!({
        "error": {
            "code": "INVALID_REQUEST",
            "message": format!("the request is not valid HTTP/1.1 ({})", reason.to_ascii_lowercase()),
            "details": {},
        }
    })
    .to_string();
    let mut answer = format!("{status_line}\r\n");
    for h in headers
        .iter()
        .filter(|h| !h.to_ascii_lowercase().starts_with("content-length:"))
    {
        answer.push_str(h);
        answer.push_str("\r\n");
    }
    answer.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    Some(answer.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::with_json_body;

    #[test]
    fn hypers_empty_error_answer_gets_the_contract_body_and_nothing_else_changes() {
        let hyper = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 21:00:00 GMT\r\n\r\n";
        let answer = String::from_utf8(with_json_body(hyper).unwrap()).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("date: Wed"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["code"], "INVALID_REQUEST");

        for ours in [
            &b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 61\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
        ] {
            assert!(with_json_body(ours).is_none(), "{}", String::from_utf8_lossy(ours));
        }
    }
}
