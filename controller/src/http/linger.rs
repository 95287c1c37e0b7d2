//! Reading the rest of a request body that its handler left unread, so the
//! client sees the answer it was sent.
//!
//! A handler may answer before the whole body is in: a body refused for its
//! declared length, an upload past `MAX_FILE_MB`, a 401 before a body is
//! read. If the connection closed at once, the kernel would meet the
//! client's next bytes with a reset, and a client still writing its body
//! could get "connection reset" instead of the answer already on its way
//! (seen in CI: a 3 MiB upload refused for its length). So each request
//! body is a [`Lingering`]: dropped unfinished, it hands what is left to a
//! task that reads and discards it, as nginx's lingering close does. The
//! answer goes out meanwhile, and the connection is kept once the body is
//! through.
//!
//! The task is bounded: at most [`LINGER_BYTES`], for at most
//! [`LINGER_FOR`], and never past the server's shutdown. Past a bound the
//! connection closes as before.
//!
//! A request sent with `Expect: 100-continue` is left alone: its client
//! waits to be told to send, and reading its body before the answer is
//! written would tell it to (hyper sends the `100 Continue` on the first
//! read). The answer alone stops such a client.
//!
//! # Layout
//! - [`Lingering`]: the body every request gets, and [`drain`], the task
//!   its `Drop` starts.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio_util::sync::CancellationToken;

/// The most of a body read after its answer; past it the connection closes.
pub const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// The longest a body is read after its answer.
pub const LINGER_FOR: Duration = Duration::from_secs(10);

/// A request body that, dropped before its end, is read to the end (within
/// bounds) by a task of its own.
#[derive(Debug)]
pub struct Lingering {
    body: Option<Incoming>,
    /// The server's shutdown; `None`: drop the rest, do not read it.
    closing: Option<CancellationToken>,
}

impl Lingering {
    /// `body` of a request with `headers`; `closing` ends any reading left.
    pub fn new(body: Incoming, headers: &HeaderMap, closing: &CancellationToken) -> Self {
        let expects_continue = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        Self {
            body: Some(body),
            closing: (!expects_continue).then(|| closing.clone()),
        }
    }
}

impl Body for Lingering {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().body {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let (Some(body), Some(closing)) = (self.body.take(), self.closing.take()) else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        // Bodies are dropped on the runtime's threads; outside one (never
        // seen) the rest is dropped and the connection closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body, closing));
        }
    }
}

/// Reads `body` to its end, or to [`LINGER_BYTES`], [`LINGER_FOR`] or
/// `closing`, whichever comes first, keeping nothing.
async fn drain(mut body: Incoming, closing: CancellationToken) {
    let mut read = 0;
    let through = async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > LINGER_BYTES {
                return false;
            }
        }
        true
    };
    let through = tokio::select! {
        through = through => through,
        () = tokio::time::sleep(LINGER_FOR) => false,
        () = closing.cancelled() => false,
    };
    tracing::debug!(bytes = read, through, "read the rest of a body its handler left");
}
