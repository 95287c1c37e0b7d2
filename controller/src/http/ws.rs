//! `GET /api/v1/ws` (extension): a WebSocket speaking design document
//! 000's messages, for clients that cannot send headers (browsers).
//!
//! ```text
//! client: {"type": "auth", "token": "<JWT>"}     (or Authorization on the upgrade)
//! server: {"type": "authenticated", "subject": "alice"}
//! client: {"type": "watch", "execution_id": "..."}   /  {"type": "unwatch", ...}
//! server: {"type": "progress", "execution_id": "...", "data": {"status", "current_step",
//!          "progress_percentage", "step_details": [...], "attempts": n}}   on every change
//! server: {"type": "error", "execution_id": "...", "error": {"code", "message", "details"}}
//!          when a watched execution failed or was cancelled, or a message was refused
//! ```
//!
//! It is outside the token guard (the token may come in the first
//! message): the connection, once its token is verified, and each `watch`
//! count as requests against the subject's rate limit, and one connection
//! counts as one of its subject's open streams. A
//! connection lasts as long as its token: when the token expires the
//! server sends an `UNAUTHORIZED` error and closes it (code 1008). A
//! message is at most [`MAX_MESSAGE_BYTES`] (a larger one closes the
//! connection, code 1008 with the reason) and a connection watches at most
//! [`MAX_WATCHED`] executions at once.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::AppState;
use crate::auth::Subject;
use crate::error::ApiError;
use crate::executions::events::REREAD;
use crate::executions::view::ExecutionView;
use crate::ratelimit::{LimitClass, RateKey};

/// How long a connection may stay unauthenticated.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest message a client may send. An `auth` carries a token (a
/// few hundred bytes), a `watch` an execution id. The WebSocket library's
/// own limit (64 MiB) let anyone, before the token is even read, make the
/// controller hold that much per connection and parse it as JSON.
pub(super) const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The most executions one connection watches: each is read again every
/// [`REREAD`].
pub(super) const MAX_WATCHED: usize = 256;

/// A verified caller and the last second (Unix time) its token is accepted.
type Caller = (Subject, u64);

pub(super) async fn upgrade(State(state): State<AppState>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let caller = authorization.and_then(|h| state.auth.verify_header_until(Some(h)).ok());
    ws.max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| session(state, socket, caller))
}

fn error_message(id: Option<&str>, e: &ApiError) -> Message {
    let mut m = json!({"type": "error", "error": e.body()});
    if let Some(id) = id {
        m["execution_id"] = json!(id);
    }
    Message::Text(m.to_string().into())
}

/// A close frame: `code` and why (cut to the 123 bytes a close frame holds).
fn close(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason[..end].into(),
    }))
}

/// Closes a connection whose message could not be read: over
/// [`MAX_MESSAGE_BYTES`] or not WebSocket. The library says which; it sends
/// nothing itself, and the client would see the connection just drop.
async fn refuse_unreadable(socket: &mut WebSocket, e: axum::Error) {
    tracing::debug!(error = %e, "websocket message refused");
    let _ = socket.send(close(close_code::POLICY, &e.to_string())).await;
}

async fn session(state: AppState, mut socket: WebSocket, caller: Option<Caller>) {
    let (subject, until) = match caller {
        Some(c) => c,
        None => match authenticate(&state, &mut socket).await {
            Some(c) => c,
            None => return,
        },
    };
    if let Err(e) = admit(&state, &subject).await {
        let _ = socket.send(error_message(None, &e)).await;
        let _ = socket.send(close(close_code::POLICY, "rate limited")).await;
        return;
    }
    let expired = tokio::time::sleep_until(crate::auth::expiry(until));
    tokio::pin!(expired);
    let _guard = match state.executions.events.open(&subject.sub) {
        Ok(g) => g,
        Err(e) => {
            let _ = socket.send(error_message(None, &e)).await;
            return;
        }
    };
    let hello = json!({"type": "authenticated", "subject": subject.sub});
    if socket.send(Message::Text(hello.to_string().into())).await.is_err() {
        return;
    }
    let mut changes = state.executions.events.subscribe();
    // Watched executions and what was last sent of each.
    let mut watched: HashMap<String, String> = HashMap::new();
    let mut tick = tokio::time::interval(REREAD);
    loop {
        let due: Vec<String> = tokio::select! {
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => match handle(&state, &subject, &text, &mut watched).await {
                    Ok(due) => due,
                    Err((id, e)) => {
                        if socket.send(error_message(id.as_deref(), &e)).await.is_err() {
                            return;
                        }
                        Vec::new()
                    }
                },
                Some(Ok(Message::Close(_))) | None => return,
                Some(Err(e)) => return refuse_unreadable(&mut socket, e).await,
                Some(Ok(_)) => Vec::new(),
            },
            () = &mut expired => {
                let e = ApiError::Unauthorized("token has expired; connect again with a new one".into());
                let _ = socket.send(error_message(None, &e)).await;
                let _ = socket.send(close(close_code::POLICY, "token expired")).await;
                return;
            }
            changed = changes.recv() => match changed {
                Ok(id) if watched.contains_key(&id) => vec![id],
                Ok(_) => Vec::new(),
                Err(_) => watched.keys().cloned().collect(),
            },
            _ = tick.tick() => watched.keys().cloned().collect(),
        };
        for id in due {
            let Some(row) = state.executions.row(&id).await else {
                continue;
            };
            let view = ExecutionView::from(row);
            let seen = format!("{}:{}", view.status, view.attempts.len());
            if watched.get(&id).is_some_and(|last| *last == seen) {
                continue;
            }
            let finished = matches!(view.status.as_str(), "completed" | "failed" | "cancelled");
            let mut out = vec![progress(&view)];
            if let (true, Some(error)) = (view.status != "completed", &view.error) {
                out.push(json!({"type": "error", "execution_id": id, "error": error}));
            }
            for m in out {
                if socket.send(Message::Text(m.to_string().into())).await.is_err() {
                    return;
                }
            }
            if finished {
                watched.remove(&id);
            } else {
                watched.insert(id, seen);
            }
        }
    }
}

/// Waits for `{"type": "auth", "token": ...}`.
async fn authenticate(state: &AppState, socket: &mut WebSocket) -> Option<Caller> {
    let refused = |m: &str| ApiError::Unauthorized(m.to_owned());
    let first = tokio::time::timeout(AUTH_TIMEOUT, socket.recv()).await;
    let text = match first {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Err(e))) => {
            refuse_unreadable(socket, e).await;
            return None;
        }
        Ok(_) => return None,
        Err(_) => {
            let _ = socket
                .send(error_message(
                    None,
                    &refused("send {\"type\": \"auth\", \"token\": ...} first"),
                ))
                .await;
            return None;
        }
    };
    let message: Value = serde_json::from_str(&text).unwrap_or_default();
    let token = match (message["type"].as_str(), message["token"].as_str()) {
        (Some("auth"), Some(token)) => token.to_owned(),
        _ => {
            let _ = socket
                .send(error_message(
                    None,
                    &refused("the first message must be {\"type\": \"auth\", \"token\": ...}"),
                ))
                .await;
            return None;
        }
    };
    match state.auth.verify_until(&token) {
        Ok(c) => Some(c),
        Err(e) => {
            let _ = socket.send(error_message(None, &refused(&e.to_string()))).await;
            None
        }
    }
}

/// Counts a request of `subject`'s against its rate limit, as the guard
/// does for every other `/api/v1` request.
async fn admit(state: &AppState, subject: &Subject) -> Result<(), ApiError> {
    let key = RateKey::Subject(subject.sub.clone());
    match state.limiter.check(LimitClass::Execute, &key).await {
        Ok(()) => Ok(()),
        Err(retry_after_secs) => {
            state.metrics.record_rate_limited(LimitClass::Execute.as_str());
            Err(ApiError::RateLimited { retry_after_secs })
        }
    }
}

/// A client's message: what to send now, or why it is refused.
async fn handle(
    state: &AppState,
    subject: &Subject,
    text: &str,
    watched: &mut HashMap<String, String>,
) -> Result<Vec<String>, (Option<String>, ApiError)> {
    let message: Value =
        serde_json::from_str(text).map_err(|_| (None, ApiError::InvalidRequest("messages are JSON objects".into())))?;
    let id = message["execution_id"].as_str().map(str::to_owned);
    match (message["type"].as_str(), id) {
        (Some("watch"), Some(id)) => {
            // A read, as `GET /api/v1/executions/{id}` is: limited alike.
            admit(state, subject).await.map_err(|e| (Some(id.clone()), e))?;
            if watched.len() >= MAX_WATCHED && !watched.contains_key(&id) {
                let e = ApiError::InvalidRequest(format!(
                    "one connection watches at most {MAX_WATCHED} executions; unwatch one, or open another connection"
                ));
                return Err((Some(id), e));
            }
            state
                .executions
                .get(subject, &id)
                .await
                .map_err(|e| (Some(id.clone()), e))?;
            watched.insert(id.clone(), String::new());
            Ok(vec![id])
        }
        (Some("unwatch"), Some(id)) => {
            watched.remove(&id);
            Ok(Vec::new())
        }
        _ => Err((
            None,
            ApiError::InvalidRequest("expected {\"type\": \"watch\" or \"unwatch\", \"execution_id\": ...}".into()),
        )),
    }
}

/// The seed's progress message.
fn progress(view: &ExecutionView) -> Value {
    json!({
        "type": "progress",
        "execution_id": view.execution_id,
        "data": {
            "status": view.status,
            "current_step": view.progress["current_step"],
            "progress_percentage": view.progress["percentage"],
            "step_details": view.steps,
            "attempts": view.attempts.len(),
        },
    })
}
