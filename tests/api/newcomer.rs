//! Errors a newcomer meets first, each saying what to do: a missing
//! Language-Title, a wrong Content-Type, a token signed with another secret
//! or expired, a typo in a Language-Title, a missing scope.

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use crate::helpers::{Reply, TestApp, read, spawn_app};

async fn initialize(app: &TestApp, token: &str, title: Option<&str>, content_type: &str) -> Reply {
    let mut req = app
        .client
        .post(app.url("/api/v1/initialize"))
        .bearer_auth(token)
        .header("Content-Type", content_type)
        .body("{}");
    if let Some(title) = title {
        req = req.header("Language-Title", title);
    }
    read(req.send().await.unwrap()).await
}

fn says(r: &Reply, status: u16, code: &str, words: &str) {
    assert_eq!(r.status, status, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], code, "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(words), "'{words}' not in: {message}");
}

fn signed(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_first_mistake_is_answered_with_what_to_do() {
    let app = spawn_app().await;
    let token = app.admin();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |exp: u64| json!({"sub": "alice", "exp": exp, "scope": "execute:all"});
    let foreign = signed("another-secret-of-at-least-32-bytes!", claims(now + 600));
    let expired = signed(crate::helpers::SECRET, claims(now - 600));
    let python_only = app.token("bob", &["execute:python"]);

    let cases = [
        (
            initialize(&app, &token, None, "application/json").await,
            (400, "INVALID_REQUEST", "e.g. 'Language-Title: nodejs-calculator'"),
        ),
        (
            initialize(&app, &token, Some("nodejs-calculator"), "text/plain").await,
            (400, "INVALID_REQUEST", "not 'text/plain'"),
        ),
        (
            initialize(&app, &foreign, Some("nodejs-calculator"), "application/json").await,
            (401, "UNAUTHORIZED", "signed with another secret"),
        ),
        (
            initialize(&app, &expired, Some("nodejs-calculator"), "application/json").await,
            (401, "UNAUTHORIZED", "has expired; get a new one"),
        ),
        (
            initialize(&app, &token, Some("nodejs-calculater"), "application/json").await,
            (404, "NOT_FOUND", "did you mean 'nodejs-calculator'?"),
        ),
        (
            initialize(&app, &python_only, Some("python-calculatr"), "application/json").await,
            (404, "NOT_FOUND", "did you mean 'python-calculator'?"),
        ),
        (
            initialize(&app, &token, Some("nodejs-something-else"), "application/json").await,
            (404, "NOT_FOUND", "GET /api/v1/functions lists them"),
        ),
        (
            initialize(&app, &python_only, Some("nodejs-calculator"), "application/json").await,
            (403, "FORBIDDEN", "lacks scope 'execute:nodejs'"),
        ),
    ];
    for (reply, (status, code, words)) in &cases {
        says(reply, *status, code, words);
    }
}
