//! Rate limits, the body limit and the timeout limit, beyond contract.rs:
//! the functions class, the unauthenticated limit per client address, 413 on
//! initialize, and the bounds of `context.timeout_ms`.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::helpers::{Reply, read, spawn_app, spawn_app_with};

fn assert_rate_limited(what: &str, r: &Reply) {
    assert_eq!(r.status, 429, "{what}: {:?}", r.body);
    assert_eq!(r.code(), "RATE_LIMITED", "{what}");
    assert!(r.body["error"]["message"].is_string(), "{what}");
    let header = r
        .headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("{what}: no Retry-After"));
    let secs: u64 = header
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{what}: Retry-After {header:?} is not whole seconds"));
    assert!((1..=60).contains(&secs), "{what}: Retry-After {secs}");
}

/// A client whose connections come from `ip` (any 127.0.0.0/8 address reaches the server).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_functions_limit_is_per_subject_and_apart_from_the_execute_limit() {
    // Arrange
    let app = spawn_app_with(&["--rate-limit-functions", "2"]).await;
    let alice = app.token("alice", &["execute:all", "read:functions"]);
    let bob = app.token("bob", &["read:functions"]);

    // Act
    let first = app.get(Some(&alice), "/api/v1/functions").await;
    let second = app.get(Some(&alice), "/api/v1/functions/nodejs-calculator").await;
    let third = app.get(Some(&alice), "/api/v1/functions").await;
    let detail = app.get(Some(&alice), "/api/v1/functions/nodejs-calculator").await;
    let bobs = app.get(Some(&bob), "/api/v1/functions").await;
    let alices_execute = app.initialize(&alice, "nodejs-calculator", json!({})).await;

    // Assert
    assert_eq!(first.status, 200);
    assert_eq!(second.status, 200);
    assert_rate_limited("third list", &third);
    assert_rate_limited("detail over the limit", &detail);
    assert_eq!(bobs.status, 200, "another subject is unaffected: {:?}", bobs.body);
    assert_eq!(
        alices_execute.status, 200,
        "the execute class is counted apart: {:?}",
        alices_execute.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthenticated_requests_are_limited_per_client_address_with_a_default_of_ten() {
    // Arrange: default settings; ten requests a minute without a valid token.
    let app = spawn_app().await;
    let alice = app.admin();
    let id = app
        .session(&alice, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let init_from = |client: &reqwest::Client| {
        client
            .post(app.url("/api/v1/initialize"))
            .bearer_auth("not-a-token")
            .header("Language-Title", "nodejs-calculator")
            .json(&json!({}))
            .send()
    };
    let here = client_from("127.0.0.1");

    // Act
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(read(init_from(&here).await.unwrap()).await.status);
    }
    let over = read(init_from(&here).await.unwrap()).await;
    let over_execute = read(
        here.post(app.url(&format!("/api/v1/execute/{id}")))
            .json(&json!({"params": {}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let elsewhere = read(init_from(&client_from("127.0.0.2")).await.unwrap()).await;
    let with_token = app
        .execute(&alice, &id, json!({"operation": "add", "values": [1, 2]}))
        .await;

    // Assert
    assert_eq!(statuses, [401; 10]);
    assert_rate_limited("11th unauthenticated initialize", &over);
    assert_rate_limited("unauthenticated execute", &over_execute);
    assert_eq!(over_execute.body["request_id"], id.as_str());
    assert_eq!(
        elsewhere.status, 401,
        "another address has its own budget: {:?}",
        elsewhere.body
    );
    assert_eq!(
        with_token.status, 200,
        "a valid token is counted for its subject: {:?}",
        with_token.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_the_limit_on_initialize_is_413_with_and_without_content_length() {
    // Arrange
    let app = spawn_app_with(&["--max-body-bytes", "1024"]).await;
    let token = app.admin();
    let big = format!(r#"{{"context": {{"pad": "{}"}}}}"#, "x".repeat(4096));
    // The server closes a connection whose body it refused: a client of its own.
    let refusing = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let request = || {
        refusing
            .post(app.url("/api/v1/initialize"))
            .bearer_auth(&token)
            .header("Language-Title", "nodejs-calculator")
            .header("Content-Type", "application/json")
    };

    // Act
    let sized = read(request().body(big.clone()).send().await.unwrap()).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.as_bytes().chunks(256).map(|c| Ok(c.to_vec())).collect();
    let chunked = read(
        request()
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let small = app
        .initialize(
            &token,
            "nodejs-calculator",
            json!({"context": {"pad": "x".repeat(900)}}),
        )
        .await;

    // Assert
    for (what, r) in [("with Content-Length", &sized), ("chunked", &chunked)] {
        assert_eq!(r.status, 413, "{what}: {:?}", r.body);
        assert_eq!(r.code(), "INVALID_REQUEST", "{what}");
        assert!(r.body["error"]["message"].is_string(), "{what}");
        assert!(r.body["error"]["details"].is_object(), "{what}");
    }
    assert_eq!(
        small.status, 200,
        "a body under the limit is accepted: {:?}",
        small.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_execute_body_refused_for_its_content_length_still_carries_the_request_id() {
    // Arrange
    let app = spawn_app_with(&["--max-body-bytes", "1024"]).await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let refusing = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let big = format!(r#"{{"params": {{"pad": "{}"}}}}"#, "x".repeat(4096));

    // Act
    let r = read(
        refusing
            .post(app.url(&format!("/api/v1/execute/{id}")))
            .bearer_auth(&token)
            .header("Content-Type", "application/json")
            .body(big)
            .send()
            .await
            .unwrap(),
    )
    .await;

    // Assert
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert_eq!(r.code(), "INVALID_REQUEST");
    assert_eq!(
        r.body["request_id"],
        id.as_str(),
        "execute errors carry the request ID: {:?}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_ms_is_accepted_between_1_and_the_maximum_and_refused_otherwise() {
    // Arrange
    let app = spawn_app_with(&["--max-timeout-ms", "2000"]).await;
    let token = app.admin();
    let refused: [Value; 8] = [
        json!(0),
        json!(-5),
        json!(2000.5),
        json!(2001),
        json!("x"),
        json!(true),
        json!([1000]),
        json!({"ms": 1000}),
    ];

    for bad in refused {
        // Act
        let r = app
            .initialize(&token, "nodejs-calculator", json!({"context": {"timeout_ms": bad}}))
            .await;

        // Assert
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
        assert_eq!(r.code(), "INVALID_REQUEST", "{bad}");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("timeout_ms") && message.contains("2000"),
            "{bad}: {message}"
        );
    }
    for good in [1, 2000] {
        let id = app
            .session(
                &token,
                "nodejs-calculator",
                json!({"timeout_ms": good, "retain_session": true}),
            )
            .await;
        let s = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
        assert_eq!(s.body["timeout_ms"], good, "{:?}", s.body);
    }
}
