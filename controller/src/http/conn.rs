//! The connections the server accepts: TCP, with the contract's JSON body
//! on the one answer no handler writes.
//!
//! hyper answers a request head it cannot parse (a bare CR or a NUL in a
//! header, an invalid URI, a head too large) by itself, before any handler
//! or middleware runs, with an empty-bodied 400 (or 414, 431, 505), and then
//! closes the connection. hyper has no hook for that answer, so the write
//! side of each connection ([`Conn`]) recognises it (an error status with
//! `content-length: 0`, which no handler of ours ever answers: every error
//! we write has a JSON body) and writes the same status and headers with
//! the contract's body instead.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The server's listener: a [`TcpListener`] handing out [`Conn`]s.
#[derive(Debug)]
pub struct Listener(pub TcpListener);

impl axum::serve::Listener for Listener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (
            Conn {
                stream,
                pending: Vec::new(),
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The client's address, for the rate limits of requests without a token.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, Listener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, Listener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
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
