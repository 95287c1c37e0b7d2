//! Operations beyond contract.rs: the 405 body, route labels of unknown
//! paths, X-Request-ID on every answer, log lines that stay valid JSON, CORS
//! on simple requests and by default, and nothing left behind after SIGTERM
//! (the binary) or a stop (in process).

use std::time::Duration;

use reqwest::header::HeaderValue;
use serde_json::{Value, json};

use crate::helpers::{TestApp, children_of, read, spawn_app, spawn_app_with, spawn_binary};

/// The log lines of the request whose span carries `request_id`, each parsed.
fn request_log_lines(app: &TestApp, request_id: &str) -> Vec<Value> {
    app.logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["span"]["request_id"] == request_id && v["message"] == "finished processing request")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_method_is_405_with_the_json_error_body_and_an_allow_header() {
    // Arrange
    let app = spawn_app().await;
    let token = app.admin();

    for (method, path, allowed) in [
        (reqwest::Method::GET, "/api/v1/initialize", "POST"),
        (reqwest::Method::PATCH, "/api/v1/functions", "GET"),
        (reqwest::Method::PUT, "/health", "GET"),
        (reqwest::Method::POST, "/metrics", "GET"),
    ] {
        // Act
        let r = read(
            app.client
                .request(method.clone(), app.url(path))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap(),
        )
        .await;

        // Assert
        assert_eq!(r.status, 405, "{method} {path}: {:?}", r.body);
        assert!(
            r.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{method} {path}"
        );
        assert_eq!(r.code(), "INVALID_REQUEST", "{method} {path}");
        assert!(r.body["error"]["message"].is_string());
        assert!(r.body["error"]["details"].is_object());
        let allow = r
            .headers
            .get("allow")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        assert!(allow.contains(allowed), "{method} {path}: Allow {allow:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_paths_are_404_json_and_never_become_metric_labels() {
    // Arrange
    let app = spawn_app().await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    app.execute(&token, &id, json!({"operation": "add", "values": [1]}))
        .await;

    // Act
    let mut replies = Vec::new();
    for path in [
        "/zqroute-1",
        "/api/v2/initialize",
        "/api/v1/zqroute-2/deeper",
        "/api/v1/functions/a/b",
    ] {
        replies.push((path, app.get(Some(&token), path).await));
    }
    let metrics = app.metrics().await;

    // Assert
    for (path, r) in &replies {
        assert_eq!(r.status, 404, "{path}: {:?}", r.body);
        assert_eq!(r.code(), "NOT_FOUND", "{path}");
    }
    assert!(!metrics.contains("zqroute"), "a raw path became a label:\n{metrics}");
    assert!(!metrics.contains(&id), "a request ID became a label");
    let execute_line = metrics
        .lines()
        .find(|l| l.starts_with("lambda_http_requests_total{") && l.contains(r#"route="/api/v1/execute/{request_id}""#))
        .unwrap_or_else(|| panic!("no lambda_http_requests_total for the execute route:\n{metrics}"));
    assert!(
        execute_line.contains(r#"method="POST""#) && execute_line.contains(r#"status="200""#),
        "{execute_line}"
    );
    assert!(
        metrics.contains("# TYPE lambda_http_requests_total counter"),
        "Prometheus text format 0.0.4"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_carries_an_x_request_id_generated_when_the_client_sends_none() {
    // Arrange
    let app = spawn_app().await;
    let mut seen = Vec::new();

    for (method, path) in [
        (reqwest::Method::GET, "/health"),
        (reqwest::Method::GET, "/metrics"),
        (reqwest::Method::GET, "/api/v1/openapi.json"),
        (reqwest::Method::GET, "/no-such-route"),
        (reqwest::Method::POST, "/api/v1/initialize"),
        (reqwest::Method::POST, "/api/v1/execute/some-id"),
    ] {
        // Act
        let r = app.client.request(method.clone(), app.url(path)).send().await.unwrap();

        // Assert
        let id = r
            .headers()
            .get("x-request-id")
            .unwrap_or_else(|| panic!("{method} {path} answered {} without X-Request-ID", r.status()))
            .to_str()
            .unwrap()
            .to_owned();
        uuid::Uuid::parse_str(&id).unwrap_or_else(|_| panic!("{method} {path}: {id} is not a UUID"));
        seen.push(id);
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "IDs repeat: {seen:?}");
    // A client's ID comes back on errors too.
    let r = app
        .client
        .post(app.url("/api/v1/initialize"))
        .header("X-Request-ID", "client-trace-7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-request-id"], "client-trace-7");
}

#[tokio::test(flavor = "multi_thread")]
async fn log_lines_stay_valid_json_whatever_the_request_carries() {
    // Arrange: values a naive log line would break on; only what HTTP lets through.
    let app = spawn_binary();
    let token = app.admin();
    let tricky_id = r#"zq"quote\back}{brace'"#;

    // Act
    let health = app
        .client
        .get(app.url("/health"))
        .header("X-Request-ID", tricky_id)
        .send()
        .await
        .unwrap();
    let escaped_path = app.get(None, "/api/v1/zq%0Anewline%1B%5B31m%E2%80%A8").await;
    let unicode_title = app
        .client
        .post(app.url("/api/v1/initialize"))
        .bearer_auth(&token)
        .header("X-Request-ID", "zq-unicode-title")
        .header(
            "Language-Title",
            HeaderValue::from_bytes("nodejs-zq\u{2028}\u{85}title".as_bytes()).unwrap(),
        )
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let payload = app
        .run_once(
            "nodejs-echo",
            "module.exports.handler = (p) => { console.log(p.text); return { text: p.text }; };",
            json!({}),
            json!({"text": "line1\nline2\u{2028}\u{1b}[31mred"}),
        )
        .await;

    // Assert
    assert_eq!(health.status(), 200);
    assert_eq!(health.headers()["x-request-id"], tricky_id);
    assert_eq!(escaped_path.status, 404);
    assert_eq!(unicode_title.status(), 400);
    assert_eq!(payload.status, 200, "{:?}", payload.body);
    assert!(
        crate::helpers::eventually(Duration::from_secs(3), || request_log_lines(&app, "zq-unicode-title")
            .len()
            == 1)
        .await
    );
    let logs = app.logs();
    for line in &logs {
        let parsed: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        assert!(parsed.is_object(), "{line}");
        assert!(
            !line
                .chars()
                .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}'),
            "raw control or separator characters in: {line:?}"
        );
    }
    let tricky = request_log_lines(&app, tricky_id);
    assert_eq!(tricky.len(), 1, "one line for the request, its ID intact: {logs:#?}");
    assert_eq!(tricky[0]["status"], 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_allows_any_origin_by_default_and_answers_simple_requests() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/api/v1/execute/abc"))
        .header("Origin", "https://anywhere.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type,x-cache-control",
        )
        .send()
        .await
        .unwrap();
    let simple = app
        .client
        .get(app.url("/health"))
        .header("Origin", "https://anywhere.example")
        .send()
        .await
        .unwrap();

    // Assert
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    assert_eq!(preflight.headers()["access-control-max-age"], "86400");
    assert_eq!(simple.status(), 200);
    assert_eq!(simple.headers()["access-control-allow-origin"], "*");
    let exposed = simple.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        exposed.contains("x-request-id"),
        "a browser can read X-Request-ID: {exposed}"
    );
    assert!(
        exposed.contains("retry-after"),
        "a browser can read Retry-After: {exposed}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_origin_gets_cors_headers_on_simple_requests_and_others_do_not() {
    // Arrange
    let app = spawn_app_with(&["--cors-allowed-origins", "https://a.example,https://b.example"]).await;
    let get_from = |origin: &'static str| app.client.get(app.url("/health")).header("Origin", origin).send();

    // Act
    let a = get_from("https://a.example").await.unwrap();
    let b = get_from("https://b.example").await.unwrap();
    let evil = get_from("https://a.example.evil.example").await.unwrap();

    // Assert
    assert_eq!(a.headers()["access-control-allow-origin"], "https://a.example");
    assert_eq!(b.headers()["access-control-allow-origin"], "https://b.example");
    assert!(evil.headers().get("access-control-allow-origin").is_none());
    assert_eq!(
        evil.status(),
        200,
        "CORS is the browser's business: the answer itself is unchanged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_sigterm_no_instance_directory_or_process_is_left() {
    // Arrange: a retained instance, an idle one and the warm pool.
    let app = spawn_binary();
    let token = app.admin();
    let retained = app
        .session(&token, "nodejs-counter", json!({"retain_session": true}))
        .await;
    app.execute(&token, &retained, json!({})).await;
    let one_shot = app.session(&token, "python-calculator", json!({})).await;
    app.execute(&token, &one_shot, json!({"operation": "add", "values": [1]}))
        .await;
    let pid = app.controller_pid();
    let instances_before = children_of(pid);
    assert!(
        !instances_before.is_empty(),
        "instances run as children of the controller"
    );
    assert!(app.instance_dirs() >= 2, "{} instance dirs", app.instance_dirs());

    // Act
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let mut app = app;
    let status = app
        .wait_for_exit(Duration::from_secs(10))
        .expect("the controller exits");

    // Assert
    assert!(status.success(), "exit status {status}");
    assert_eq!(app.instance_dirs(), 0, "instance directories left behind");
    let alive: Vec<u32> = instances_before
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                !s.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
        })
        .collect();
    assert!(
        alive.is_empty(),
        "instance processes outlived the controller: {alive:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invented_http_methods_never_create_new_metric_series() {
    // Arrange
    let app = spawn_app().await;

    // Act: many methods nobody defined, on known and unknown paths.
    for i in 0..40 {
        let method = reqwest::Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
        let path = if i % 2 == 0 { "/health" } else { "/api/v1/no-such-thing" };
        let r = app.client.request(method, app.url(path)).send().await.unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    let metrics = app.metrics().await;

    // Assert: one `other` series, no invented name.
    assert!(!metrics.contains("INVENTED"), "an invented method became a label");
    assert!(metrics.contains(r#"method="other""#), "{metrics}");
    let series = metrics
        .lines()
        .filter(|l| l.starts_with("lambda_http_requests_total{"))
        .count();
    assert!(series < 10, "{series} series after invented methods:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_served_openapi_document_is_valid_openapi_3_1_and_lists_every_answer() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let doc = app.get(None, "/api/v1/openapi.json").await.body;

    // Assert: every response is described, and initialize and execute list
    // the statuses they can answer beyond their own.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                assert!(
                    response["description"].as_str().is_some_and(|d| !d.is_empty()),
                    "{method} {path} {status} has no description"
                );
            }
        }
    }
    for path in ["/api/v1/initialize", "/api/v1/execute/{request_id}"] {
        let responses = &doc["paths"][path]["post"]["responses"];
        for status in ["401", "413", "422", "429", "503"] {
            assert!(responses.get(status).is_some(), "{path} does not list {status}");
        }
    }
    // And the OpenAPI project's own validator accepts it (PyPI
    // openapi-spec-validator, which .ci/run installs).
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&doc).unwrap()).unwrap();
    let check = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys\nfrom openapi_spec_validator import validate\nvalidate(json.load(open(sys.argv[1])))",
        ])
        .arg(file.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    if stderr.contains("No module named 'openapi_spec_validator'") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs openapi-spec-validator (.ci/run)"
        );
        eprintln!("skipped the validator: pip install openapi-spec-validator");
        return;
    }
    assert!(
        check.status.success(),
        "openapi-spec-validator refused the document:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_functions_metric_series_are_gone_from_metrics() {
    // Arrange: a function that ran, so it has series.
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-fleeting", "module.exports.handler = async () => 1;", json!({}))
        .await;
    let id = app.session(&token, "nodejs-fleeting", json!({})).await;
    assert_eq!(app.execute(&token, &id, json!({})).await.status, 200);
    assert!(app.metrics().await.contains(r#"language_title="nodejs-fleeting""#));

    // Act
    let r = app
        .client
        .delete(app.url("/api/v1/functions/nodejs-fleeting"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();

    // Assert
    assert!(r.status().is_success(), "{}", r.status());
    let metrics = app.metrics().await;
    assert!(
        !metrics.contains("nodejs-fleeting"),
        "series of a deleted function remain:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_in_process_app_leaves_no_instance_directory_or_process() {
    // Arrange: a retained instance, an idle one and the warm pool, in process.
    let mut app = spawn_app().await;
    let token = app.admin();
    let retained = app
        .session(&token, "nodejs-counter", json!({"retain_session": true}))
        .await;
    app.execute(&token, &retained, json!({})).await;
    let one_shot = app.session(&token, "python-calculator", json!({})).await;
    app.execute(&token, &one_shot, json!({"operation": "add", "values": [1]}))
        .await;
    let data = app.data_dir.path().canonicalize().unwrap();
    // An instance is bubblewrap (bound to its directory in the data dir) and
    // what runs inside; without bubblewrap, the runtime in its directory.
    // (A background build of a bundled crate also works in the data dir:
    // the runtimes are told apart by what they run.)
    let in_data_dir = || -> Vec<u32> {
        let instances = data.join("instances").to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|p| {
                let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default())
                    .replace('\0', " ");
                let cwd = std::fs::read_link(format!("/proc/{p}/cwd")).unwrap_or_default();
                cmdline.contains(&instances) || cwd.starts_with(&instances)
            })
            .collect()
    };
    assert!(!in_data_dir().is_empty(), "instances run in the data dir");
    assert!(app.instance_dirs() >= 2, "{} instance dirs", app.instance_dirs());

    // Act: what dropping the app does, as SIGTERM stops the binary.
    app.stop().await;

    // Assert
    assert_eq!(app.instance_dirs(), 0, "instance directories left behind");
    let left = in_data_dir();
    assert!(left.is_empty(), "instance processes outlived the app: {left:?}");
}

/// promtool (Debian's `prometheus` package; `.ci/run` unpacks it and sets
/// `PROMTOOL`), if it is here.
fn promtool() -> Option<std::path::PathBuf> {
    let named = std::env::var_os("PROMTOOL").map(std::path::PathBuf::from);
    let found = named.or_else(|| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("promtool"))
                .find(|p| p.is_file())
        })
    });
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI provides promtool (.ci/run)");
        eprintln!("skipped: promtool not found (set PROMTOOL)");
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_valid_for_promtool_and_openmetrics_is_served_to_who_asks_for_it() {
    let Some(promtool) = promtool() else { return };
    // Arrange: traffic that fills every family: executions, a cache hit,
    // an error, an unknown route.
    let app = spawn_app().await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    for _ in 0..2 {
        let r = app
            .execute(&token, &id, json!({"operation": "add", "values": [1, 2]}))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    app.execute(&token, &id, json!({"operation": "nope"})).await;
    app.get(Some(&token), "/api/v1/nothing-here").await;

    // Act
    let plain = app.client.get(app.url("/metrics")).send().await.unwrap();
    let plain_type = plain.headers()["content-type"].to_str().unwrap().to_owned();
    let plain = plain.text().await.unwrap();
    let open = app
        .client
        .get(app.url("/metrics"))
        .header(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )
        .send()
        .await
        .unwrap();
    let open_type = open.headers()["content-type"].to_str().unwrap().to_owned();
    let open = open.text().await.unwrap();

    // Assert: 0.0.4 by default, clean for promtool; OpenMetrics when asked.
    assert!(plain_type.starts_with("text/plain; version=0.0.4"), "{plain_type}");
    assert!(plain.contains("lambda_executions_total{"), "{plain}");
    let mut check = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), plain.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{plain}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(open_type.starts_with("application/openmetrics-text"), "{open_type}");
    assert!(open.ends_with("# EOF\n"), "{open}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_hyper_cannot_parse_is_answered_with_the_json_error_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let address = app.address.trim_start_matches("http://").to_owned();
    for head in [
        &b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\n\r\n"[..],
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\0b\r\n\r\n",
        b"GET /he alth HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        // Act
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(head).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection")
            .unwrap();

        // Assert
        let answer = String::from_utf8_lossy(&answer);
        let (status_and_headers, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(status_and_headers.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(
            status_and_headers.contains("content-type: application/json"),
            "{answer}"
        );
        let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
        assert_eq!(body["error"]["code"], "INVALID_REQUEST", "{answer}");
    }
    // The server still serves.
    assert_eq!(app.get(None, "/health").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn large_answers_are_compressed_as_the_client_accepts_and_small_ones_are_not() {
    use std::io::Read;
    let app = spawn_app().await;
    let token = app.admin();
    app.register(
        "nodejs-bulky",
        "module.exports.handler = (p) => ({ items: Array.from({ length: p.n }, (_, i) => ({ i, text: 'lorem ipsum' })) });",
        json!({}),
    )
    .await;
    let id = app
        .session(&token, "nodejs-bulky", json!({"retain_session": true}))
        .await;
    let call = |n: u64, encoding: Option<&'static str>| {
        let mut req = app
            .client
            .post(app.url(&format!("/api/v1/execute/{id}")))
            .bearer_auth(&token)
            .json(&json!({"params": {"n": n}}));
        if let Some(e) = encoding {
            req = req.header("Accept-Encoding", e);
        }
        req.send()
    };

    // Act
    let gzip = call(500, Some("gzip")).await.unwrap();
    let br = call(500, Some("br")).await.unwrap();
    let plain = call(500, None).await.unwrap();
    let small = call(1, Some("gzip, br")).await.unwrap();

    // Assert
    let encoding = |r: &reqwest::Response| {
        r.headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(encoding(&gzip).as_deref(), Some("gzip"));
    assert_eq!(encoding(&br).as_deref(), Some("br"));
    assert_eq!(encoding(&plain), None);
    // Both say that the body depends on Accept-Encoding, asked or not (a
    // cache between must not hand one client's gzip to another).
    let vary = |r: &reqwest::Response| {
        r.headers()
            .get_all("vary")
            .iter()
            .any(|v| v.to_str().unwrap().to_ascii_lowercase().contains("accept-encoding"))
    };
    assert!(
        vary(&gzip) && vary(&plain),
        "{:?} / {:?}",
        gzip.headers(),
        plain.headers()
    );
    assert_eq!(encoding(&small), None, "a body under 1 KiB is sent as is");
    let plain: Value = plain.json().await.unwrap();
    let packed = gzip.bytes().await.unwrap();
    let mut unpacked = String::new();
    flate2::read::GzDecoder::new(&packed[..])
        .read_to_string(&mut unpacked)
        .unwrap();
    let unpacked: Value = serde_json::from_str(&unpacked).unwrap();
    assert_eq!(unpacked["result"], plain["result"]);
    assert_eq!(plain["result"]["items"].as_array().unwrap().len(), 500);
    assert!(
        packed.len() * 4 < serde_json::to_vec(&plain).unwrap().len(),
        "{} bytes",
        packed.len()
    );
    assert!(br.bytes().await.unwrap().len() < packed.len() * 2);
}
