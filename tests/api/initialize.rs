//! `POST /api/v1/initialize` beyond contract.rs: the expiry it promises,
//! X-Request-ID validation, titles the HTTP header rules let through (and
//! those they do not), malformed bodies, and the defaults of an empty body.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderValue;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{TestApp, read, sample, spawn_app, spawn_app_with, spawn_binary};

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn unix(rfc3339: &str) -> i64 {
    fnrt_core::timefmt::parse(rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339:?} is not RFC 3339: {e}"))
        .unix_timestamp()
}

/// Initialize with a raw Language-Title / X-Request-ID value.
async fn initialize_raw(app: &TestApp, title: HeaderValue, request_id: Option<HeaderValue>) -> crate::helpers::Reply {
    let mut request = app
        .client
        .post(app.url("/api/v1/initialize"))
        .bearer_auth(app.admin())
        .header("Language-Title", title)
        .json(&json!({}));
    if let Some(id) = request_id {
        request = request.header("X-Request-ID", id);
    }
    read(request.send().await.unwrap()).await
}

/// Every file and directory name, and every regular file's bytes, under `dir`.
fn data_dir_mentions(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_ascii_lowercase();
            if name.as_bytes().windows(needle.len()).any(|w| w == needle) {
                found.push(format!("name {}", path.display()));
            }
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && let Ok(bytes) = std::fs::read(&path)
                && bytes.to_ascii_lowercase().windows(needle.len()).any(|w| w == needle)
            {
                found.push(format!("content of {}", path.display()));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn initialize_promises_an_expiry_two_hours_ahead_and_echoes_the_generated_id() {
    // Arrange
    let app = spawn_app().await;
    let before = unix_now();

    // Act
    let response = app
        .client
        .post(app.url("/api/v1/initialize"))
        .bearer_auth(app.admin())
        .header("Language-Title", "nodejs-calculator")
        .json(&json!({"context": {"retain_session": true}}))
        .send()
        .await
        .unwrap();
    let r = read(response).await;
    let after = unix_now();

    // Assert
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = r.body["request_id"].as_str().unwrap();
    uuid::Uuid::parse_str(id).unwrap_or_else(|_| panic!("a generated request_id is a UUID: {id}"));
    assert_eq!(r.headers["x-request-id"], id, "the response header names the session");
    let expires = unix(r.body["expires_at"].as_str().unwrap());
    assert!(
        (before + 7200 - 1..=after + 7200 + 1).contains(&expires),
        "expires_at is {} s from now, not two hours",
        expires - before
    );
    let s = app.get(Some(&app.admin()), &format!("/api/v1/sessions/{id}")).await;
    assert_eq!(
        s.body["expires_at"], r.body["expires_at"],
        "the session keeps the promised expiry"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_x_request_id_is_400_and_starts_no_session() {
    // Arrange
    let app = spawn_app().await;
    let token = app.admin();
    let too_long = "a".repeat(129);
    let invalid: Vec<HeaderValue> = vec![
        HeaderValue::from_static("has space"),
        HeaderValue::from_str(&too_long).unwrap(),
        HeaderValue::from_static(".hidden"),
        HeaderValue::from_static("-dash-first"),
        HeaderValue::from_static("a/b"),
        HeaderValue::from_static("../../etc/passwd"),
        HeaderValue::from_static("quote\"d"),
        HeaderValue::from_bytes("caf\u{e9}".as_bytes()).unwrap(),
    ];

    for value in invalid {
        // Act
        let r = initialize_raw(&app, HeaderValue::from_static("nodejs-calculator"), Some(value.clone())).await;

        // Assert
        assert_eq!(r.status, 400, "{value:?}: {:?}", r.body);
        assert_eq!(r.code(), "INVALID_REQUEST", "{value:?}");
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains("X-Request-ID"),
            "{value:?}"
        );
    }
    let s = app.get(Some(&token), &format!("/api/v1/sessions/{too_long}")).await;
    assert_eq!(s.status, 404, "the refused ID was not used: {:?}", s.body);
    // The longest and the most varied valid IDs are accepted as they are.
    for valid in ["b".repeat(128), "Client_ID-1.2_x".to_owned()] {
        let r = initialize_raw(
            &app,
            HeaderValue::from_static("nodejs-calculator"),
            Some(valid.parse().unwrap()),
        )
        .await;
        assert_eq!(r.status, 200, "{valid}: {:?}", r.body);
        assert_eq!(r.body["request_id"], valid.as_str());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn titles_the_header_rules_let_through_are_400_and_never_reach_the_data_dir() {
    // Arrange: every refused title carries a marker to look for afterwards.
    let app = spawn_app().await;
    let titles: Vec<HeaderValue> = vec![
        HeaderValue::from_static(""),
        HeaderValue::from_static("nodejs-"),
        HeaderValue::from_static("-zqmarker"),
        HeaderValue::from_static("nodejs-../zqmarker"),
        HeaderValue::from_static("nodejs-zqmarker/../../x"),
        HeaderValue::from_static("nodejs-zqmarker;id"),
        HeaderValue::from_static("nodejs-zqmarker$(id)"),
        HeaderValue::from_static("nodejs_zqmarker"),
        HeaderValue::from_static("Nodejs-zqmarker"),
        HeaderValue::from_static("nodejs-ZQMARKER"),
        HeaderValue::from_static("zqmarker-calculator"),
        HeaderValue::from_str(&format!("nodejs-zqmarker{}", "a".repeat(56))).unwrap(),
        HeaderValue::from_str(&format!("nodejs-zqmarker{}", "a".repeat(10_000))).unwrap(),
        HeaderValue::from_bytes("nodejs-zqmarker\u{e9}".as_bytes()).unwrap(),
        HeaderValue::from_bytes("nodejs-zqmarker\u{2028}x".as_bytes()).unwrap(),
        HeaderValue::from_bytes(b"nodejs-zqmarker\xff").unwrap(),
    ];

    for title in titles {
        // Act
        let r = initialize_raw(&app, title.clone(), None).await;

        // Assert
        assert_eq!(r.status, 400, "{title:?}: {:?}", r.body);
        assert_eq!(r.code(), "INVALID_REQUEST", "{title:?}");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(
            message.len() < 300,
            "the error does not echo the whole value: {message}"
        );
        assert!(message.chars().all(|c| !c.is_control()), "{message:?}");
    }
    let found = data_dir_mentions(app.data_dir.path(), b"zqmarker");
    assert!(found.is_empty(), "a refused title reached the data dir: {found:?}");
}

/// Sends `head` (request line and headers, CRLF-separated, without the blank
/// line) and a `{}` body over a fresh connection; the status code answered.
async fn raw_status(app: &TestApp, head: &[u8]) -> u16 {
    let addr = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = head.to_vec();
    request
        .extend_from_slice(b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
    stream.write_all(&request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn control_characters_in_language_title_are_refused_before_the_controller_reads_them() {
    // Arrange: what reqwest refuses to send, written on the socket by hand.
    let app = spawn_binary();
    let token = app.admin();
    let titles: [&[u8]; 3] = [
        b"nodejs-calc\rzqmarker",
        b"nodejs-\x1b[31mzqmarker",
        b"nodejs-zq\x00marker",
    ];

    for title in titles {
        let mut head = format!(
            "POST /api/v1/initialize HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nLanguage-Title: "
        )
        .into_bytes();
        head.extend_from_slice(title);

        // Act
        let status = raw_status(&app, &head).await;

        // Assert
        assert_eq!(status, 400, "{:?}", String::from_utf8_lossy(title));
    }
    let found = data_dir_mentions(app.data_dir.path(), b"zqmarker");
    assert!(found.is_empty(), "{found:?}");
    assert!(!app.logs().iter().any(|l| l.contains("zqmarker")), "{:#?}", app.logs());
    // The server still answers normally.
    assert_eq!(app.initialize(&token, "nodejs-calculator", json!({})).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_initialize_bodies_are_400_in_the_contract_shape() {
    // Arrange
    let app = spawn_app().await;
    let token = app.admin();
    let cases: [(&str, &str); 11] = [
        ("{not json", "application/json"),
        ("5", "application/json"),
        ("\"context\"", "application/json"),
        ("{\"context\": 5}", "application/json"),
        ("{\"context\": [1, 2]}", "application/json"),
        ("{\"context\": \"production\"}", "application/json"),
        ("{\"context\": {\"retain_session\": \"yes\"}}", "application/json"),
        ("{\"context\": {\"retain_session\": 1}}", "application/json"),
        ("{\"context\": {\"retain_session\": true}", "application/json"),
        ("{\"context\": {}}", "text/plain"),
        // What belongs in `context`, beside it: silently a one-shot session.
        ("{\"retain_session\": true}", "application/json"),
    ];

    for (body, content_type) in cases {
        // Act
        let r = read(
            app.client
                .post(app.url("/api/v1/initialize"))
                .bearer_auth(&token)
                .header("Language-Title", "nodejs-calculator")
                .header("Content-Type", content_type)
                .body(body)
                .send()
                .await
                .unwrap(),
        )
        .await;

        // Assert
        assert_eq!(r.status, 400, "{body} ({content_type}): {:?}", r.body);
        assert_eq!(r.code(), "INVALID_REQUEST", "{body}");
        assert!(r.body["error"]["message"].is_string(), "{body}");
        assert!(r.body["error"]["details"].is_object(), "{body}");
        if body.starts_with("{\"retain_session") {
            let message = r.body["error"]["message"].as_str().unwrap();
            assert!(message.contains("unknown field `retain_session`"), "{message}");
        }
    }
    let r = app
        .initialize(
            &token,
            "nodejs-calculator",
            json!({"context": {"retain_session": "yes"}}),
        )
        .await;
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("retain_session"),
        "the message names the field: {:?}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_body_starts_a_one_shot_session_with_the_functions_defaults() {
    // Arrange
    let app = spawn_app().await;
    let token = app.admin();
    let detail = app.get(Some(&token), "/api/v1/functions/nodejs-calculator").await;
    let default_timeout = detail.body["limits"]["timeout_ms"].clone();
    assert!(default_timeout.is_u64(), "{:?}", detail.body);
    let bodies: [(Option<&str>, &str); 5] = [
        (None, ""),
        (Some("application/json"), ""),
        (Some("application/json"), "  \n"),
        (Some("application/json"), "{}"),
        (Some("application/json; charset=utf-8"), "{\"context\": null}"),
    ];

    for (content_type, body) in bodies {
        // Act
        let mut request = app
            .client
            .post(app.url("/api/v1/initialize"))
            .bearer_auth(&token)
            .header("Language-Title", "nodejs-calculator")
            .body(body);
        if let Some(ct) = content_type {
            request = request.header("Content-Type", ct);
        }
        let r = read(request.send().await.unwrap()).await;

        // Assert
        assert_eq!(r.status, 200, "{body:?} ({content_type:?}): {:?}", r.body);
        let id = r.body["request_id"].as_str().unwrap();
        let s = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
        assert_eq!(s.body["retain_session"], false, "{body:?}: {:?}", s.body);
        assert_eq!(s.body["timeout_ms"], default_timeout, "{body:?}");
        assert_eq!(s.body["status"], "active");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_context_reaches_the_function_without_the_controllers_own_fields() {
    // Arrange
    let app = spawn_app().await;
    let token = app.admin();
    app.register(
        "nodejs-context",
        "module.exports.handler = (params, context) => ({ context });",
        json!({}),
    )
    .await;

    // Act
    let id = app
        .session(
            &token,
            "nodejs-context",
            json!({"environment": "production", "user_id": "user-123", "timeout_ms": 5000, "retain_session": true}),
        )
        .await;
    let r = app.execute(&token, &id, json!({})).await;

    // Assert
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seen: &Value = &r.body["result"]["context"];
    assert_eq!(seen["environment"], "production", "{seen}");
    assert_eq!(seen["user_id"], "user-123", "{seen}");
    assert!(seen.get("retain_session").is_none(), "{seen}");
}

/// The value of `lambda_instances{language="nodejs",state="warm"}`.
async fn warm_node_instances(app: &TestApp) -> i64 {
    let metrics = app.metrics().await;
    sample(&metrics, r#"lambda_instances{language="nodejs",state="warm"}"#)
        .unwrap_or_else(|| panic!("no warm nodejs gauge in {metrics}")) as i64
}

/// Polls the warm gauge until it is `want`; false after `timeout`.
async fn warm_becomes(app: &TestApp, want: i64, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if warm_node_instances(app).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn initialize_takes_a_warm_instance_and_the_pool_fills_again_after_each_hand_out() {
    // Arrange: a pool of two Node instances. A hand-out that leaves one
    // behind refills after a short wait; one that leaves none, at once.
    let app = spawn_app_with(&["--warm-pool-size", "2"]).await;
    let token = app.admin();
    assert!(
        warm_becomes(&app, 2, Duration::from_secs(30)).await,
        "the pool never filled"
    );

    for round in 0..2 {
        // Act: two sessions, each on a warm instance (two hand-outs, the
        // first leaving one behind, the second none).
        let first = app
            .session(&token, "nodejs-calculator", json!({"retain_session": true}))
            .await;
        let second = app
            .session(&token, "nodejs-calculator", json!({"retain_session": true}))
            .await;

        // Assert: both ran on instances from the pool, which fills again.
        for id in [&first, &second] {
            let r = app
                .execute(&token, id, json!({"operation": "add", "values": [2, round]}))
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(r.body["result"], json!({"value": 2 + round}), "{:?}", r.body);
        }
        let metrics = app.metrics().await;
        let warm_hits = sample(
            &metrics,
            r#"lambda_pool_acquires_total{backend="process",language="nodejs",result="warm"}"#,
        );
        assert_eq!(warm_hits, Some(2.0 * (round as f64 + 1.0)), "{metrics}");
        assert!(
            warm_becomes(&app, 2, Duration::from_secs(30)).await,
            "the pool did not fill again"
        );
        for id in [first, second] {
            assert_eq!(crate::sessions::delete(&app, Some(&token), &id).await.status, 204);
        }
    }
}
