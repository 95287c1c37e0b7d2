//! The access log: every request runs in a `request` span, and its answer
//! gets one line.
//!
//! The span (`method`, `path`, `request_id`) names the request in every
//! line written while it is handled. When the answer is ready, one INFO
//! line `finished processing request` with its `status` and `latency`
//! (target `tower_http::trace::on_response`), and for a server error an
//! ERROR line `response failed` (target `tower_http::trace::on_failure`):
//! the lines tower-http's `TraceLayer` wrote before, with the same fields,
//! so `RUST_LOG` filters them as before.
//!
//! With JSON logs the INFO line is written straight into the log buffer
//! ([`crate::logbuffer`]), in the layout json-subscriber gives every other
//! line. As a `tracing` event it went through the subscriber (the span's
//! fields, the timestamp, each field through `Debug` into a `String`, then
//! escaped): about 13k of a cached hit's 136k instructions under callgrind
//! (docs/benchmarks.md). The filter still decides whether it is written.
//! With text logs (or no logging set up) it is an ordinary event.
//!
//! # Layout
//!
//! - [`install_json`]: the writer for JSON lines, from the logging set-up.
//! - [`AccessLog`]: the service (a `tower` layer function in `http::app`);
//!   [`Answered`]: its future.
//! - [`Line`]: a JSON line, built as the request starts and finished with
//!   its answer.

use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use tracing::Span;
use tracing_subscriber::fmt::MakeWriter as _;

use crate::logbuffer::BufferedLines;

/// The target of the answer's INFO line, as tower-http named it.
const TARGET: &str = "tower_http::trace::on_response";

/// Where JSON access lines go; unset for text logs.
static JSON_LINES: OnceLock<BufferedLines<std::io::Stderr>> = OnceLock::new();

/// Writes the access log's JSON lines into `writer` (the subscriber's).
pub fn install_json(writer: BufferedLines<std::io::Stderr>) {
    let _ = JSON_LINES.set(writer);
}

/// The service: see the module's documentation.
#[derive(Clone)]
pub struct AccessLog<S> {
    pub inner: S,
}

impl<S> tower::Service<Request> for AccessLog<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Answered<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = Instant::now();
        let request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let path = req.uri().path();
        // Fields as `&str`, not through `Display`: json-subscriber then
        // writes each as it is, without formatting it into a `String` first.
        let span = tracing::info_span!("request", method = req.method().as_str(), path, request_id);
        let line = span.in_scope(|| {
            (JSON_LINES.get().is_some() && tracing::enabled!(target: TARGET, tracing::Level::INFO))
                .then(|| Line::start(req.method().as_str(), path, request_id))
        });
        let inner = span.in_scope(|| self.inner.call(req));
        Answered {
            inner,
            span,
            line,
            started,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's answer, polled in the request's span; the line
    /// is written when it is ready.
    pub struct Answered<F> {
        #[pin]
        inner: F,
        span: Span,
        line: Option<Line>,
        started: Instant,
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for Answered<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let Ok(response) = std::task::ready!(this.inner.poll(cx));
        let status = response.status();
        let latency_ms = this.started.elapsed().as_millis();
        match (this.line.take(), JSON_LINES.get()) {
            (Some(line), Some(out)) => {
                let line = line.finish(status, latency_ms);
                // One `write_all`: the buffer keeps the line whole.
                let _ = out.make_writer().write_all(line.as_bytes());
            }
            _ => tracing::info!(
                target: TARGET,
                latency = %format_args!("{latency_ms} ms"),
                status = status.as_u16(),
                "finished processing request"
            ),
        }
        if status.is_server_error() {
            tracing::error!(
                target: "tower_http::trace::on_failure",
                classification = %format_args!("Status code: {status}"),
                latency = %format_args!("{latency_ms} ms"),
                "response failed"
            );
        }
        Poll::Ready(Ok(response))
    }
}

/// A JSON access line: its start (level, span, target) as the request
/// begins, the rest (timestamp, fields) with its answer. Keys in the order
/// json-subscriber writes them.
pub struct Line(String);

impl Line {
    fn start(method: &str, path: &str, request_id: &str) -> Self {
        let mut line = String::with_capacity(256 + path.len() + request_id.len());
        line.push_str(r#"{"level":"INFO","span":{"method":"#);
        push_json_str(&mut line, method);
        line.push_str(r#","name":"request","path":"#);
        push_json_str(&mut line, path);
        line.push_str(r#","request_id":"#);
        push_json_str(&mut line, request_id);
        line.push_str(r#"},"target":""#);
        line.push_str(TARGET);
        line.push_str(r#"","timestamp":""#);
        Line(line)
    }

    fn finish(self, status: StatusCode, latency_ms: u128) -> String {
        let Line(mut line) = self;
        push_timestamp(&mut line, time::OffsetDateTime::now_utc());
        line.push_str(r#"","latency":""#);
        line.push_str(itoa::Buffer::new().format(latency_ms));
        line.push_str(r#" ms","message":"finished processing request","status":"#);
        line.push_str(itoa::Buffer::new().format(status.as_u16()));
        line.push_str("}\n");
        line
    }
}

/// `s` as a JSON string. Control characters and the line and paragraph
/// separators are escaped, so a line stays one line of valid JSON whatever
/// a request carries.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    if s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
        out.push_str(s);
    } else {
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                    use std::fmt::Write as _;
                    let _ = write!(out, "\\u{:04x}", u32::from(c));
                }
                c => out.push(c),
            }
        }
    }
    out.push('"');
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber's `SystemTime`
/// timer writes it (`2026-12-07T21:40:16.063533Z`). By hand: that timer
/// goes through `fmt`, 2.4k more instructions per cached hit under
/// callgrind (a test keeps the two alike).
fn push_timestamp(out: &mut String, t: time::OffsetDateTime) {
    let digits = |out: &mut String, n: u32, width: u32| {
        for place in (0..width).rev() {
            out.push(char::from(b'0' + (n / 10u32.pow(place) % 10) as u8));
        }
    };
    digits(out, t.year().clamp(0, 9999) as u32, 4);
    out.push('-');
    digits(out, u8::from(t.month()).into(), 2);
    out.push('-');
    digits(out, t.day().into(), 2);
    out.push('T');
    digits(out, t.hour().into(), 2);
    out.push(':');
    digits(out, t.minute().into(), 2);
    out.push(':');
    digits(out, t.second().into(), 2);
    out.push('.');
    digits(out, t.microsecond(), 6);
    out.push('Z');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_one_json_object_with_the_fields_of_every_other_line() {
        let line = Line::start("POST", "/api/v1/execute/abc", "id-1").finish(StatusCode::OK, 12);
        assert!(
            line.ends_with("}\n") && !line[..line.len() - 1].contains('\n'),
            "{line:?}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            parsed["span"],
            serde_json::json!({"method": "POST", "name": "request", "path": "/api/v1/execute/abc", "request_id": "id-1"})
        );
        assert_eq!(parsed["level"], "INFO");
        assert_eq!(parsed["target"], TARGET);
        assert_eq!(parsed["message"], "finished processing request");
        assert_eq!(parsed["latency"], "12 ms");
        assert_eq!(parsed["status"], 200);
        let stamp = parsed["timestamp"].as_str().unwrap();
        let parsed_stamp = time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).unwrap();
        assert!(
            (time::OffsetDateTime::now_utc() - parsed_stamp).whole_seconds().abs() < 60,
            "{stamp}"
        );
        assert_eq!(stamp.len(), "2026-12-07T21:40:16.063533Z".len(), "{stamp}");
    }

    #[test]
    fn what_a_request_carries_cannot_break_a_line() {
        let tricky = "zq\"quote\\back}{brace'\n\u{1b}[31m\u{2028}\u{2029}\u{85}é";
        let line = Line::start("POST", tricky, tricky).finish(StatusCode::NOT_FOUND, 0);
        let body = &line[..line.len() - 1];
        assert!(
            !body
                .chars()
                .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}'),
            "{line:?}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["span"]["path"], tricky);
        assert_eq!(parsed["span"]["request_id"], tricky);
        assert_eq!(parsed["status"], 404);
    }

    #[test]
    fn timestamps_and_numbers_keep_their_width() {
        let mut out = String::new();
        let t = time::macros::datetime!(2026-01-02 03:04:05.000007 UTC);
        push_timestamp(&mut out, t);
        assert_eq!(out, "2026-01-02T03:04:05.000007Z");
        for (n, text) in [
            (0u128, "0"),
            (7, "7"),
            (1000, "1000"),
            (u128::from(u64::MAX), "18446744073709551615"),
        ] {
            let line = Line::start("GET", "/", "").finish(StatusCode::OK, n);
            let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(parsed["latency"], format!("{text} ms"));
        }
    }

    /// Written by hand (tracing-subscriber's timer goes through `fmt`,
    /// about 2k instructions a line), in the shape that timer gives every
    /// other JSON line.
    #[test]
    fn the_timestamp_has_the_shape_of_the_subscribers() {
        use tracing_subscriber::fmt::time::FormatTime as _;
        let mut theirs = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut theirs))
            .unwrap();
        let mut ours = String::new();
        push_timestamp(&mut ours, time::OffsetDateTime::now_utc());
        let shape = |s: &str| {
            s.chars()
                .map(|c| if c.is_ascii_digit() { '0' } else { c })
                .collect::<String>()
        };
        assert_eq!(shape(&ours), shape(&theirs));
        let rfc3339 = &time::format_description::well_known::Rfc3339;
        let at = |s: &str| time::OffsetDateTime::parse(s, rfc3339).unwrap();
        assert!(
            (at(&ours) - at(&theirs)).abs() < time::Duration::seconds(5),
            "{ours} {theirs}"
        );
    }
}
