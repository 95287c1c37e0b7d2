//! The contract's error rows and operations endpoints, end to end: 401, 403,
//! 404, 413, 429, limits out of range, expiry, session deletion, /health,
//! /metrics, OpenAPI, CORS, and a graceful stop.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::{SECRET, children_of, eventually, read, spawn_app, spawn_app_with, spawn_binary};

fn b64(bytes: &[u8]) -> String {
    // base64url without padding, by hand: the tests crate needs no base64 dependency for this.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Tokens that must all be refused with 401.
fn bad_tokens() -> Vec<(&'static str, String)> {
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = b64(format!(r#"{{"sub":"mallory","exp":{},"scope":"execute:all"}}"#, now() + 600).as_bytes());
    let other = controller::auth::Authenticator::new(b"not-the-server-secret-not-the-server", None, None);
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    let hs256 = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    let expired = jsonwebtoken::encode(
        &hs256,
        &json!({"sub": "alice", "exp": now() - 120, "scope": "execute:all"}),
        &key,
    )
    .unwrap();
    let no_exp = jsonwebtoken::encode(&hs256, &json!({"sub": "alice", "scope": "execute:all"}), &key).unwrap();
    vec![
        ("alg none", format!("{header}.{claims}.")),
        (
            "another secret",
            other.issue("mallory", &["execute:all".into()], 600).unwrap(),
        ),
        ("garbage", "not-a-jwt".into()),
        ("expired", expired),
        ("no exp", no_exp),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_without_a_valid_token_are_401_and_run_nothing() {
    // The unauthenticated rate limit would answer 429 first after ten requests.
    let app = spawn_app_with(&["--rate-limit-unauthenticated", "0"]).await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-counter", json!({"retain_session": true}))
        .await;

    let mut cases = bad_tokens().into_iter().map(|(n, t)| (n, Some(t))).collect::<Vec<_>>();
    cases.push(("missing", None));
    for (name, bad) in cases {
        let mut req = app
            .client
            .post(app.url(&format!("/api/v1/execute/{id}")))
            .json(&json!({"params": {}}));
        if let Some(t) = &bad {
            req = req.bearer_auth(t);
        }
        let r = read(req.send().await.unwrap()).await;
        assert_eq!(r.status, 401, "{name}: {:?}", r.body);
        assert_eq!(r.code(), "UNAUTHORIZED", "{name}");
        assert_eq!(r.body["request_id"], id.as_str(), "{name}");

        let init = app
            .initialize(bad.as_deref().unwrap_or(""), "nodejs-counter", json!({}))
            .await;
        assert_eq!(init.status, 401, "{name}: {:?}", init.body);
        let list = app.get(bad.as_deref(), "/api/v1/functions").await;
        assert_eq!(list.status, 401, "{name}");
        let session = app.get(bad.as_deref(), &format!("/api/v1/sessions/{id}")).await;
        assert_eq!(session.status, 401, "{name}");
    }
    // None of them ran the function: the counter's first real run is 1.
    let r = app
        .execute_with(&token, &id, json!({"params": {}}), Some("no-cache"))
        .await;
    assert_eq!(r.body["result"]["count"], 1, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn scopes_are_checked_per_language_and_sessions_are_private_to_their_subject() {
    let app = spawn_app().await;
    let python_only = app.token("bob", &["execute:python"]);
    let r = app.initialize(&python_only, "nodejs-calculator", json!({})).await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(r.code(), "FORBIDDEN");
    assert!(r.body["error"]["message"].as_str().unwrap().contains("execute:nodejs"));
    app.session(&python_only, "python-calculator", json!({})).await;

    let alice = app.admin();
    let id = app
        .session(&alice, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let eve = app.token("eve", &["execute:all"]);
    let r = app.execute(&eve, &id, json!({"operation": "add", "values": [1]})).await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert_eq!(r.code(), "NOT_FOUND");
    assert_eq!(app.get(Some(&eve), &format!("/api/v1/sessions/{id}")).await.status, 404);
    let del = app
        .client
        .delete(app.url(&format!("/api/v1/sessions/{id}")))
        .bearer_auth(&eve)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 404);
    // Still alice's and still alive.
    assert_eq!(
        app.get(Some(&alice), &format!("/api/v1/sessions/{id}")).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn over_the_rate_limit_is_429_with_retry_after_and_other_subjects_are_unaffected() {
    let app = spawn_app_with(&["--rate-limit-execute", "3", "--rate-limit-unauthenticated", "2"]).await;
    let alice = app.token("alice", &["execute:all"]);
    let id = app
        .session(&alice, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let params = json!({"operation": "add", "values": [1, 1]});
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..4 {
        let r = app.execute(&alice, &id, params.clone()).await;
        statuses.push(r.status);
        if r.status == 429 {
            limited = Some(r);
        }
    }
    // initialize counted too: 3 allowed in all.
    assert_eq!(statuses, [200, 200, 429, 429]);
    let r = limited.unwrap();
    assert_eq!(r.code(), "RATE_LIMITED");
    assert_eq!(r.body["request_id"], id.as_str());
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");

    let bob = app.token("bob", &["execute:all"]);
    app.session(&bob, "nodejs-calculator", json!({})).await;

    // Without a valid token: limited per client address, before the 401.
    let unauth: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(app.initialize("bogus", "nodejs-calculator", json!({})).await.status);
        }
        v
    };
    assert_eq!(unauth, [401, 401, 429]);
    // /health is never limited.
    for _ in 0..20 {
        assert_eq!(app.get(None, "/health").await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_over_the_limit_are_413_with_and_without_content_length() {
    let app = spawn_app_with(&["--max-body-bytes", "1024"]).await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let big = format!(
        r#"{{"params": {{"operation": "add", "values": [1], "pad": "{}"}}}}"#,
        "x".repeat(4096)
    );
    let url = app.url(&format!("/api/v1/execute/{id}"));
    // The server closes a connection whose body it refused; a client of its
    // own keeps that from poisoning the shared client's connection pool.
    let refused = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();

    let sized = refused
        .post(&url)
        .bearer_auth(&token)
        .header("Content-Type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let sized = read(sized).await;
    assert_eq!(sized.status, 413, "{:?}", sized.body);
    assert_eq!(sized.code(), "INVALID_REQUEST");
    // Refused for its length before it is read, and said as a body that grew past the limit is.
    assert_eq!(
        (
            &sized.body["error"]["details"]["limit_bytes"],
            &sized.body["request_id"]
        ),
        (&json!(1024), &json!(id)),
        "{:?}",
        sized.body
    );
    assert_eq!(
        sized.body["error"]["message"],
        "request body is larger than the limit of 1024 bytes"
    );

    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.as_bytes().chunks(512).map(|c| Ok(c.to_vec())).collect();
    let chunked = refused
        .post(&url)
        .bearer_auth(&token)
        .header("Content-Type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let chunked = read(chunked).await;
    assert_eq!(chunked.status, 413, "{:?}", chunked.body);
    assert_eq!(chunked.code(), "INVALID_REQUEST");

    // A small body still works.
    let ok = app
        .execute(&token, &id, json!({"operation": "add", "values": [1, 2]}))
        .await;
    assert_eq!(ok.status, 200);
}

/// Most clients send their whole body before they read the answer. One
/// answered before its body was read (refused for its declared length,
/// past the upload limit mid-stream, or for its token) still has that body
/// read, so the client is not cut off with a reset while it sends, sees its
/// answer, and keeps its connection. 32 MiB is far more than the loopback's
/// socket buffers hold: without that reading, the writes fail.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_still_sending_a_refused_body_gets_its_answer_and_keeps_its_connection() {
    // Arrange
    let app = spawn_app_with(&["--max-file-mb", "8"]).await;
    let token = app.admin();
    let addr = app.address.trim_start_matches("http://").to_owned();
    let size = 32 << 20;
    let auth = format!("Authorization: Bearer {token}\r\n");
    let cases = [
        (
            "initialize, declared length",
            format!(
                "POST /api/v1/initialize HTTP/1.1\r\n{auth}Language-Title: nodejs-calculator\r\nContent-Type: application/json\r\n"
            ),
            false,
            413,
            "INVALID_REQUEST",
        ),
        (
            "upload, past the limit while read",
            format!("POST /api/v1/files HTTP/1.1\r\n{auth}"),
            true,
            413,
            "INVALID_REQUEST",
        ),
        (
            "upload without a token",
            "POST /api/v1/files HTTP/1.1\r\n".to_owned(),
            true,
            401,
            "UNAUTHORIZED",
        ),
    ];

    for (case, head, chunked, status, code) in cases {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();

        // Act: the head, then every byte of the body, then read.
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_owned()
        } else {
            format!("Content-Length: {size}")
        };
        let head = format!("{head}Host: localhost\r\n{framing}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let sent = write_body(&mut stream, size, chunked).await;

        // Assert
        assert!(sent.is_ok(), "{case}: the server stopped reading the body: {sent:?}");
        let (answered, body) = read_answer(&mut stream).await;
        assert_eq!(
            (answered, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{case}: {body}"
        );
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let (health, body) = read_answer(&mut stream).await;
        assert_eq!(
            health, 200,
            "{case}: the same connection serves the next request: {body}"
        );
    }

    // A client that asked to be told to send is told no, never "continue", and its connection
    // closes: it will not send the body, so nothing waits for it.
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/v1/files HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: {size}\r\nExpect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (answered, body) = read_answer(&mut stream).await;
    assert_eq!(
        (answered, body["error"]["code"].as_str()),
        (413, Some("INVALID_REQUEST")),
        "{body}"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
}

/// Writes `size` bytes of body, in 1 MiB chunks, chunk-encoded or not.
async fn write_body(stream: &mut tokio::net::TcpStream, size: usize, chunked: bool) -> std::io::Result<()> {
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..size / chunk.len() {
        if chunked {
            stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
        }
        stream.write_all(&chunk).await?;
        if chunked {
            stream.write_all(b"\r\n").await?;
        }
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

/// Reads one answer: its status and JSON body (a final answer: an interim
/// `100 Continue` fails the parse). Needs `Content-Length`, which every
/// answer of the controller's to these requests has.
async fn read_answer(stream: &mut tokio::net::TcpStream) -> (u16, Value) {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut more = [0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut more))
            .await
            .expect("an answer within 30 s")
            .expect("an answer, not a reset");
        assert!(
            n > 0,
            "the connection closed before an answer: {:?}",
            String::from_utf8_lossy(&buffer)
        );
        buffer.extend_from_slice(&more[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    let mut body = vec![0; length];
    let already = (buffer.len() - head_end).min(length);
    body[..already].copy_from_slice(&buffer[head_end..head_end + already]);
    stream.read_exact(&mut body[already..]).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_out_of_range_is_400_naming_the_limit() {
    let app = spawn_app_with(&["--max-timeout-ms", "5000"]).await;
    let token = app.admin();
    for bad in [json!(0), json!(-1), json!(1.5), json!("100"), json!(5001)] {
        let r = app
            .initialize(&token, "nodejs-calculator", json!({"context": {"timeout_ms": bad}}))
            .await;
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
        assert_eq!(r.code(), "INVALID_REQUEST");
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains("timeout_ms"),
            "{bad}"
        );
    }
    let r = app
        .initialize(&token, "nodejs-calculator", json!({"context": {"timeout_ms": 5000}}))
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn initialize_refuses_bad_language_titles_before_touching_anything() {
    let app = spawn_app().await;
    let token = app.admin();
    let long = format!("nodejs-{}", "a".repeat(10_000));
    for title in [
        "nodejs",
        "nodejs-../../etc",
        "cobol-calculator",
        "NODEJS-calculator",
        "nodejs-a b",
        long.as_str(),
    ] {
        let r = app.initialize(&token, title, json!({})).await;
        assert_eq!(r.status, 400, "{title:.40}: {:?}", r.body);
        assert_eq!(r.code(), "INVALID_REQUEST");
    }
    let missing = app
        .client
        .post(app.url("/api/v1/initialize"))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(read(missing).await.status, 400);
    let unknown = app.initialize(&token, "nodejs-nope", json!({})).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.code(), "NOT_FOUND");
    // Nothing named after a refused title was created.
    let instances = std::fs::read_dir(app.data_dir.path().join("instances")).unwrap();
    for entry in instances.flatten() {
        assert!(!entry.file_name().to_string_lossy().contains(".."));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn initialize_answers_the_contract_shape_and_honours_x_request_id() {
    let app = spawn_app().await;
    let token = app.admin();
    let r = app.initialize(&token, "nodejs-calculator", json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "initialized");
    assert!(r.body["request_id"].as_str().unwrap().len() >= 32);
    let expires = r.body["expires_at"].as_str().unwrap();
    assert!(expires.ends_with('Z') && expires.len() == 20, "{expires}");

    let mine = "client-chosen-id-1";
    let send = || {
        app.client
            .post(app.url("/api/v1/initialize"))
            .bearer_auth(&token)
            .header("Language-Title", "nodejs-calculator")
            .header("X-Request-ID", mine)
            .json(&json!({}))
            .send()
    };
    let r = send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"], mine);
    let r = read(r).await;
    assert_eq!(r.body["request_id"], mine);
    let again = read(send().await.unwrap()).await;
    assert_eq!(again.status, 409, "{:?}", again.body);
    // An empty body is the same as no context.
    let empty = app
        .client
        .post(app.url("/api/v1/initialize"))
        .bearer_auth(&token)
        .header("Language-Title", "python-calculator")
        .send()
        .await
        .unwrap();
    assert_eq!(read(empty).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_expires_into_404_and_reports_its_state_until_then() {
    let app = spawn_app_with(&["--session-ttl-secs", "2"]).await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let s = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.body["status"], "active");
    assert_eq!(s.body["language_title"], "nodejs-calculator");
    assert_eq!(s.body["execution_count"], 0);
    assert_eq!(s.body["last_executed_at"], Value::Null);
    app.execute(&token, &id, json!({"operation": "add", "values": [1]}))
        .await;
    let s = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
    assert_eq!(s.body["execution_count"], 1);
    assert!(s.body["last_executed_at"].is_string());

    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await.status,
        404
    );
    let r = app
        .execute(&token, &id, json!({"operation": "add", "values": [1]}))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_session_releases_its_instance() {
    let app = spawn_app().await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-counter", json!({"retain_session": true}))
        .await;
    // The warm pool settles first (one warm instance per process language:
    // nodejs, python, rust; plus the session's), so only the release counts.
    assert!(eventually(Duration::from_secs(15), || app.instance_dirs() >= 4).await);
    let before = app.instance_dirs();
    let del = app
        .client
        .delete(app.url(&format!("/api/v1/sessions/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    assert_eq!(
        app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await.status,
        404
    );
    assert!(eventually(Duration::from_secs(5), || app.instance_dirs() < before).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_metrics_and_openapi_describe_the_service() {
    let app = spawn_app().await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    app.execute(&token, &id, json!({"operation": "add", "values": [1]}))
        .await;

    let health = app.health_with_runtimes(&["python"]).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.body["status"], "ok", "{:?}", health.body);
    assert_eq!(health.body["components"]["controller"], "ok");
    assert_eq!(health.body["components"]["redis"], "disabled");
    assert_eq!(health.body["components"]["postgres"], "disabled");
    assert_eq!(health.body["components"]["runtimes"]["nodejs"], "ok");
    assert!(health.body["version"].is_string());

    let metrics = app.metrics().await;
    assert!(metrics.contains(r#"route="/api/v1/execute/{request_id}""#), "{metrics}");
    assert!(!metrics.contains(&id), "a request ID became a label");
    for family in [
        "lambda_executions_total",
        "lambda_cache_requests_total",
        "lambda_instances",
        "lambda_active_sessions",
    ] {
        assert!(metrics.contains(family), "{family} missing");
    }

    let doc = app.get(None, "/api/v1/openapi.json").await;
    let paths = doc.body["paths"].as_object().unwrap();
    for path in [
        "/api/v1/initialize",
        "/api/v1/execute/{request_id}",
        "/api/v1/sessions/{request_id}",
        "/api/v1/sessions",
        "/api/v1/functions",
        "/api/v1/functions/{language_title}",
        "/api/v1/executions/{execution_id}/logs",
        "/api/v1/functions/{language_title}/logs",
        "/api/v1/files",
        "/api/v1/files/{file_id}",
        "/api/v1/files/{file_id}/meta",
        "/health",
        "/metrics",
        "/api/v1/openapi.json",
    ] {
        assert!(paths.contains_key(path), "{path} missing from the OpenAPI document");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_routes_and_wrong_methods_answer_the_json_error_body() {
    let app = spawn_app().await;
    let r = app.get(None, "/api/v1/nothing-here").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "NOT_FOUND");
    let r = app.get(None, "/api/v1/initialize").await;
    assert_eq!(r.status, 405);
    assert!(!r.code().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_preflight_allows_the_contract_headers_for_configured_origins() {
    let app = spawn_app_with(&["--cors-allowed-origins", "https://a.example"]).await;
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/api/v1/initialize"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "language-title,x-cache-control")
            .send()
    };
    let ok = preflight("https://a.example").await.unwrap();
    let h = ok.headers();
    assert_eq!(h["access-control-allow-origin"], "https://a.example");
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    for m in ["GET", "POST", "OPTIONS"] {
        assert!(methods.contains(m), "{methods}");
    }
    let headers = h["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    for name in [
        "content-type",
        "authorization",
        "language-title",
        "x-request-id",
        "x-cache-control",
    ] {
        assert!(headers.contains(name), "{headers}");
    }
    assert_eq!(h["access-control-max-age"], "86400");
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn each_request_logs_one_line_with_its_request_id() {
    let app = spawn_binary();
    let r = app
        .client
        .get(app.url("/health"))
        .header("X-Request-ID", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");
    assert!(
        eventually(Duration::from_secs(3), || {
            app.logs().iter().filter(|l| l.contains("trace-me-42")).count() == 1
        })
        .await,
        "{:#?}",
        app.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_execution_finish_then_stops_every_instance_and_exits_0() {
    let app = spawn_binary();
    let code =
        "module.exports.handler = async () => { await new Promise(r => setTimeout(r, 1500)); return {slept: true}; };";
    app.register("nodejs-sleepy", code, json!({})).await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-sleepy", json!({"retain_session": true}))
        .await;
    let pid = app.controller_pid();
    assert!(
        !children_of(pid).is_empty(),
        "instances run as children of the controller"
    );

    let in_flight = app.execute(&token, &id, json!({}));
    let stop = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        started
    };
    let (r, _) = tokio::join!(in_flight, stop);
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["slept"], true);

    let mut app = app;
    let status = app
        .wait_for_exit(Duration::from_secs(10))
        .expect("the controller exits");
    assert!(status.success(), "exit status {status}");
    assert!(children_of(pid).is_empty());
    let data = app.data_dir.path().to_string_lossy().into_owned();
    let leftovers: Vec<u32> = all_pids()
        .into_iter()
        .filter(|p| std::fs::read_link(format!("/proc/{p}/cwd")).is_ok_and(|c| c.to_string_lossy().starts_with(&data)))
        .collect();
    assert!(leftovers.is_empty(), "processes left in the data dir: {leftovers:?}");
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}
