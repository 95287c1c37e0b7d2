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
//! It is outside the token guard (the token comes in the first message),
//! and one connection counts as one of its subject's open streams.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::AppState;
use crate::auth::Subject;
use crate::error::ApiError;
use crate::executions::events::REREAD;
use crate::executions::view::ExecutionView;

/// How long a connection may stay unauthenticated.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn upgrade(State(state): State<AppState>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let subject = authorization.and_then(|h| state.auth.verify_header(Some(h)).ok());
    ws.on_upgrade(move |socket| session(state, socket, subject))
}

fn error_message(id: Option<&str>, e: &ApiError) -> Message {
    let mut m = json!({"type": "error", "error": e.body()});
    if let Some(id) = id {
        m["execution_id"] = json!(id);
    }
    Message::Text(m.to_string().into())
}

async fn session(state: AppState, mut socket: WebSocket, subject: Option<Subject>) {
    let subject = match subject {
        Some(s) => s,
        None => match authenticate(&state, &mut socket).await {
            Some(s) => s,
            None => return,
        },
    };
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
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => Vec::new(),
            },
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
async fn authenticate(state: &AppState, socket: &mut WebSocket) -> Option<Subject> {
    let refused = |m: &str| ApiError::Unauthorized(m.to_owned());
    let first = tokio::time::timeout(AUTH_TIMEOUT, socket.recv()).await;
    let text = match first {
        Ok(Some(Ok(Message::Text(t)))) => t,
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
    match state.auth.verify(&token) {
        Ok(s) => Some(s),
        Err(e) => {
            let _ = socket.send(error_message(None, &refused(&e.to_string()))).await;
            None
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
