//! `/api/v1/functions`: the seed's listing and detail (A.4, A.5) and the
//! registration extension (create, new version with PUT, delete).

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Reply, TestApp, read, spawn_app};

/// The functions shipped in `functions/`, in listing order.
const BUNDLED: &[&str] = &[
    "nodejs-calculator",
    "nodejs-counter",
    "nodejs-error",
    "nodejs-greeting-card",
    "pipeline-resize-detect-annotate",
    "python-calculator",
    "python-counter",
    "python-error",
    "python-image-annotate",
    "python-image-detect",
    "python-image-resize",
    "python-report",
    "python-wordcount",
    "rust-fibonacci",
    "wasm-hello",
    "wasm-sha256",
];

const NODE_HELLO: &str = "module.exports.handler = async (params, context) => ({ greeting: 'hello v1' });\n";
const NODE_HELLO_V2: &str = "module.exports.handler = async (params, context) => ({ greeting: 'hello v2' });\n";

/// Sends `body` (if any) to `path` with `token`.
pub(crate) async fn call(app: &TestApp, method: Method, path: &str, token: &str, body: Option<Value>) -> Reply {
    let mut req = app.client.request(method, app.url(path)).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    read(req.send().await.unwrap()).await
}

/// `PUT /api/v1/functions/{lt}`: registers a new version.
pub(crate) async fn put_function(app: &TestApp, token: &str, lt: &str, body: Value) -> Reply {
    call(app, Method::PUT, &format!("/api/v1/functions/{lt}"), token, Some(body)).await
}

fn titles(list: &Reply) -> Vec<String> {
    list.body["functions"]
        .as_array()
        .unwrap_or_else(|| panic!("no functions in {:?}", list.body))
        .iter()
        .map(|f| f["language_title"].as_str().unwrap().to_owned())
        .collect()
}

/// A contract timestamp: `2025-05-13T12:28:22Z`.
fn is_contract_time(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let b = s.as_bytes();
    s.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z'
        && s.chars().filter(char::is_ascii_digit).count() == 14
}

/// Every field of `expected` is in `actual` with the same value (objects
/// recursively; other values exactly).
fn contains(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => e.iter().all(|(k, v)| a.get(k).is_some_and(|av| contains(av, v))),
        _ => actual == expected,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_listing_shows_the_bundled_functions_with_the_contract_fields() {
    let app = spawn_app().await;
    let token = app.token("reader", &["read:functions"]);

    let r = app.get(Some(&token), "/api/v1/functions").await;

    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["total"], BUNDLED.len());
    assert_eq!(r.body["page"], 1);
    assert_eq!(r.body["per_page"], 20);
    assert_eq!(titles(&r), BUNDLED);
    for f in r.body["functions"].as_array().unwrap() {
        let language = f["language"].as_str().unwrap();
        let title = f["title"].as_str().unwrap();
        assert_eq!(f["language_title"], format!("{language}-{title}").as_str(), "{f}");
        assert!(!f["description"].as_str().unwrap().is_empty(), "{f}");
        assert!(
            is_contract_time(&f["created_at"]) && is_contract_time(&f["updated_at"]),
            "{f}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_listing_filters_by_language() {
    let app = spawn_app().await;
    let token = app.token("reader", &["read:functions"]);

    let python = app.get(Some(&token), "/api/v1/functions?language=python").await;
    let nodejs = app.get(Some(&token), "/api/v1/functions?language=nodejs").await;

    assert_eq!(python.status, 200, "{:?}", python.body);
    assert_eq!(
        titles(&python),
        [
            "python-calculator",
            "python-counter",
            "python-error",
            "python-image-annotate",
            "python-image-detect",
            "python-image-resize",
            "python-report",
            "python-wordcount"
        ]
    );
    assert_eq!(python.body["total"], 8);
    assert!(
        python.body["functions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["language"] == "python")
    );
    assert_eq!(
        titles(&nodejs),
        [
            "nodejs-calculator",
            "nodejs-counter",
            "nodejs-error",
            "nodejs-greeting-card"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_listing_pages_with_the_full_total_and_an_empty_page_past_the_end() {
    let app = spawn_app().await;
    let token = app.token("reader", &["read:functions"]);

    let n = BUNDLED.len();
    let last_page = n.div_ceil(4);
    let second = app.get(Some(&token), "/api/v1/functions?per_page=2&page=2").await;
    let last = app
        .get(Some(&token), &format!("/api/v1/functions?per_page=4&page={last_page}"))
        .await;
    let beyond = app
        .get(
            Some(&token),
            &format!("/api/v1/functions?per_page=2&page={}", n / 2 + 2),
        )
        .await;

    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(second.body["total"], n);
    assert_eq!(second.body["page"], 2);
    assert_eq!(second.body["per_page"], 2);
    assert_eq!(titles(&second), BUNDLED[2..4]);
    assert_eq!(titles(&last), BUNDLED[(last_page - 1) * 4..]);
    assert_eq!(last.body["total"], n);
    assert_eq!(beyond.status, 200, "{:?}", beyond.body);
    assert_eq!(beyond.body["total"], n);
    assert_eq!(titles(&beyond), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_listing_queries_are_400_invalid_request() {
    let app = spawn_app().await;
    let token = app.token("reader", &["read:functions"]);
    for query in [
        "per_page=101",
        "per_page=0",
        "page=0",
        "page=abc",
        "per_page=-1",
        "language=cobol",
    ] {
        let r = app.get(Some(&token), &format!("/api/v1/functions?{query}")).await;
        assert_eq!(r.status, 400, "{query}: {:?}", r.body);
        assert_eq!(r.code(), "INVALID_REQUEST", "{query}");
        assert!(r.body["error"]["message"].is_string(), "{query}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_calculator_detail_has_the_contracts_schema_and_example() {
    let app = spawn_app().await;
    let token = app.token("reader", &["read:functions"]);

    let r = app.get(Some(&token), "/api/v1/functions/nodejs-calculator").await;

    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["language"], "nodejs");
    assert_eq!(r.body["title"], "calculator");
    assert_eq!(r.body["language_title"], "nodejs-calculator");
    assert!(r.body["description"].is_string());
    assert!(is_contract_time(&r.body["created_at"]) && is_contract_time(&r.body["updated_at"]));
    // The contract's schema (A.5); the bundled manifest may add documentation to it.
    let params = json!({
        "type": "object",
        "properties": {
            "operation": { "type": "string", "enum": ["add", "subtract", "multiply", "divide"] },
            "values": { "type": "array", "items": { "type": "number" } }
        },
        "required": ["operation", "values"]
    });
    let result = json!({ "type": "object", "properties": { "value": { "type": "number" } } });
    assert!(
        contains(&r.body["schema"]["params"], &params),
        "{}",
        r.body["schema"]["params"]
    );
    assert!(
        contains(&r.body["schema"]["result"], &result),
        "{}",
        r.body["schema"]["result"]
    );
    assert_eq!(
        r.body["examples"][0],
        json!({ "description": "Addition",
                "request": { "params": { "operation": "add", "values": [1, 2, 3] } },
                "response": { "result": { "value": 6 } } })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_function_is_404_and_a_malformed_title_is_400() {
    let app = spawn_app().await;
    let token = app.token("reader", &["read:functions"]);

    let unknown = app.get(Some(&token), "/api/v1/functions/nodejs-nope").await;
    let no_language = app.get(Some(&token), "/api/v1/functions/cobol-calculator").await;
    let bad_title = app.get(Some(&token), "/api/v1/functions/nodejs-Bad_Title").await;

    assert_eq!(unknown.status, 404, "{:?}", unknown.body);
    assert_eq!(unknown.code(), "NOT_FOUND");
    for r in [no_language, bad_title] {
        assert_eq!(r.status, 400, "{:?}", r.body);
        assert_eq!(r.code(), "INVALID_REQUEST");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_function_is_version_1_listed_and_runnable() {
    let app = spawn_app().await;
    let token = app.admin();

    let created = app
        .register("nodejs-hello", NODE_HELLO, json!({"description": "Says hello"}))
        .await;

    assert_eq!(created.body["language_title"], "nodejs-hello");
    assert_eq!(created.body["language"], "nodejs");
    assert_eq!(created.body["title"], "hello");
    assert_eq!(created.body["version"], 1);
    assert_eq!(created.body["description"], "Says hello");
    let list = app.get(Some(&token), "/api/v1/functions").await;
    assert_eq!(list.body["total"], BUNDLED.len() + 1);
    assert!(titles(&list).contains(&"nodejs-hello".to_owned()));
    let detail = app.get(Some(&token), "/api/v1/functions/nodejs-hello").await;
    assert_eq!(detail.status, 200);
    assert_eq!(detail.body["version"], 1);
    let id = app.session(&token, "nodejs-hello", json!({})).await;
    let r = app.execute(&token, &id, json!({})).await;
    assert_eq!(r.body["result"], json!({"greeting": "hello v1"}), "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn registering_an_existing_function_again_is_409() {
    let app = spawn_app().await;
    app.register("nodejs-hello", NODE_HELLO, json!({})).await;
    let body = json!({"language_title": "nodejs-hello", "description": "again", "code": NODE_HELLO});

    let again = call(&app, Method::POST, "/api/v1/functions", &app.admin(), Some(body)).await;
    let bundled = call(
        &app,
        Method::POST,
        "/api/v1/functions",
        &app.admin(),
        Some(json!({"language_title": "nodejs-calculator", "description": "mine", "code": NODE_HELLO})),
    )
    .await;

    for r in [again, bundled] {
        assert_eq!(r.status, 409, "{:?}", r.body);
        assert_eq!(r.code(), "CONFLICT");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn registering_without_the_write_scope_is_403() {
    let app = spawn_app().await;
    let token = app.token("alice", &["execute:all", "read:functions"]);
    let body = json!({"language_title": "nodejs-hello", "description": "d", "code": NODE_HELLO});

    let create = call(&app, Method::POST, "/api/v1/functions", &token, Some(body.clone())).await;
    let update = put_function(&app, &token, "nodejs-calculator", body).await;
    let delete = call(
        &app,
        Method::DELETE,
        "/api/v1/functions/nodejs-calculator",
        &token,
        None,
    )
    .await;

    for r in [create, update, delete] {
        assert_eq!(r.status, 403, "{:?}", r.body);
        assert_eq!(r.code(), "FORBIDDEN");
    }
    let list = app.get(Some(&app.admin()), "/api/v1/functions").await;
    assert_eq!(list.body["total"], BUNDLED.len(), "nothing was registered or deleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_manifests_are_400_naming_the_field() {
    let app = spawn_app().await;
    let token = app.admin();
    let base = json!({"language_title": "nodejs-bad", "description": "d", "code": NODE_HELLO});
    let cases: Vec<(Value, &str)> = vec![
        (json!({"entrypoint": "../x.js"}), "entrypoint"),
        (json!({"entrypoint": "x.py"}), "entrypoint"),
        (json!({"handler": "a.b"}), "handler"),
        (json!({"env": {"PATH": "/tmp"}}), "PATH"),
        (json!({"env": {"A-B": "x"}}), "env"),
        (json!({"limits": {"timeout_ms": 0}}), "limits.timeout_ms"),
        (json!({"limits": {"memory_mb": 1}}), "limits.memory_mb"),
        (json!({"schema": {"params": {"type": 12}}}), "schema.params"),
        (json!({"surprise": true}), "surprise"),
        (json!({"code": ""}), "code"),
        (json!({"code": "  \n"}), "code"),
        (json!({"language_title": "nodejs-Bad"}), "Language-Title"),
        (json!({"language_title": "cobol-x"}), "cobol"),
    ];
    for (patch, field) in cases {
        let mut body = base.clone();
        body.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());

        let r = call(&app, Method::POST, "/api/v1/functions", &token, Some(body)).await;

        assert_eq!(r.status, 400, "{patch}: {:?}", r.body);
        assert_eq!(r.code(), "INVALID_REQUEST", "{patch}");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{patch}: the message does not name {field}: {message}"
        );
    }
    // A missing description.
    let r = call(
        &app,
        Method::POST,
        "/api/v1/functions",
        &token,
        Some(json!({"language_title": "nodejs-bad", "code": NODE_HELLO})),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("description"),
        "{:?}",
        r.body
    );
    // None of them was registered.
    let detail = app.get(Some(&token), "/api/v1/functions/nodejs-bad").await;
    assert_eq!(detail.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn put_registers_version_2_and_sessions_started_before_keep_version_1() {
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-hello", NODE_HELLO, json!({})).await;
    let before = app
        .session(&token, "nodejs-hello", json!({"retain_session": true}))
        .await;

    // Act
    let updated = put_function(
        &app,
        &token,
        "nodejs-hello",
        json!({"description": "Says hello, again", "code": NODE_HELLO_V2}),
    )
    .await;

    // Assert: the new version is current...
    assert_eq!(updated.status, 200, "{:?}", updated.body);
    assert_eq!(updated.body["version"], 2);
    assert_eq!(updated.body["description"], "Says hello, again");
    let detail = app.get(Some(&token), "/api/v1/functions/nodejs-hello").await;
    assert_eq!(detail.body["version"], 2);
    let after = app.session(&token, "nodejs-hello", json!({})).await;
    let r = app.execute(&token, &after, json!({})).await;
    assert_eq!(r.body["result"], json!({"greeting": "hello v2"}), "{:?}", r.body);
    // ...and the session started before runs version 1.
    let old = app.execute(&token, &before, json!({})).await;
    assert_eq!(old.body["result"], json!({"greeting": "hello v1"}), "{:?}", old.body);
    let session = app.get(Some(&token), &format!("/api/v1/sessions/{before}")).await;
    assert_eq!(session.body["version"], 1, "{:?}", session.body);
}

/// A function is its registering subject's: another holder of
/// `write:functions` can neither put code of its own in it (which would
/// see the owner's callers' params) nor delete it.
#[tokio::test(flavor = "multi_thread")]
async fn another_writer_can_neither_replace_nor_delete_a_function_it_did_not_register() {
    let app = spawn_app().await;
    let alice = app.admin();
    let mallory = app.token("mallory", &["execute:all", "read:functions", "write:functions"]);
    app.register("nodejs-hello", NODE_HELLO, json!({})).await;
    let listening = "module.exports.handler = async (params) => ({ greeting: 'hello v1', heard: params });\n";

    // Act
    let update = put_function(
        &app,
        &mallory,
        "nodejs-hello",
        json!({"description": "mine now", "code": listening}),
    )
    .await;
    let delete = call(&app, Method::DELETE, "/api/v1/functions/nodejs-hello", &mallory, None).await;

    // Assert: refused, and nothing of it took effect.
    for r in [&update, &delete] {
        assert_eq!(r.status, 403, "{:?}", r.body);
        assert_eq!(r.code(), "FORBIDDEN");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("another subject"), "{message}");
    }
    let detail = app.get(Some(&alice), "/api/v1/functions/nodejs-hello").await;
    assert_eq!(
        (detail.body["version"].clone(), detail.body["owner"].clone()),
        (json!(1), json!("alice"))
    );
    let id = app.session(&alice, "nodejs-hello", json!({})).await;
    let r = app.execute(&alice, &id, json!({"secret": "s3cr3t"})).await;
    assert_eq!(r.body["result"], json!({"greeting": "hello v1"}), "{:?}", r.body);
    // The owner still updates and deletes it.
    let mine = put_function(
        &app,
        &alice,
        "nodejs-hello",
        json!({"description": "d", "code": NODE_HELLO_V2}),
    )
    .await;
    assert_eq!(
        (mine.status, mine.body["version"].clone()),
        (200, json!(2)),
        "{:?}",
        mine.body
    );
    let gone = call(&app, Method::DELETE, "/api/v1/functions/nodejs-hello", &alice, None).await;
    assert_eq!(gone.status, 204, "{:?}", gone.body);
}

/// A bundled function has no owner and serves every caller: a holder of
/// `write:functions` can neither put code in front of them, nor delete it,
/// nor read what they send through its logs. That takes `admin:functions`.
#[tokio::test(flavor = "multi_thread")]
async fn a_bundled_function_is_managed_only_with_the_admin_scope() {
    let app = spawn_app().await;
    let alice = app.admin();
    let mallory = app.token("mallory", &["execute:all", "read:functions", "write:functions"]);
    let operator = app.token("ops", &["read:functions", "write:functions", "admin:functions"]);
    let listening =
        "module.exports.handler = async (params) => { console.log(JSON.stringify(params)); return { value: 0 }; };\n";
    let id = app.session(&alice, "nodejs-calculator", json!({})).await;
    let sum = app
        .execute(&alice, &id, json!({"operation": "add", "values": [1, 2]}))
        .await;
    assert_eq!(sum.status, 200, "{:?}", sum.body);
    let execution = sum.body["execution_id"].as_str().unwrap().to_owned();

    // Act
    let update = put_function(
        &app,
        &mallory,
        "nodejs-calculator",
        json!({"description": "mine now", "code": listening}),
    )
    .await;
    let delete = call(
        &app,
        Method::DELETE,
        "/api/v1/functions/nodejs-calculator",
        &mallory,
        None,
    )
    .await;
    let function_logs = app
        .get(Some(&mallory), "/api/v1/functions/nodejs-calculator/logs")
        .await;
    let execution_logs = app
        .get(Some(&mallory), &format!("/api/v1/executions/{execution}/logs"))
        .await;

    // Assert: refused, naming the scope, and nothing of it took effect.
    for r in [&update, &delete, &function_logs] {
        assert_eq!((r.status, r.code()), (403, "FORBIDDEN"), "{:?}", r.body);
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("admin:functions"), "{message}");
    }
    assert_eq!(execution_logs.status, 404, "{:?}", execution_logs.body);
    let detail = app.get(Some(&alice), "/api/v1/functions/nodejs-calculator").await;
    assert_eq!(detail.body["version"], 1, "{:?}", detail.body);
    let id = app.session(&alice, "nodejs-calculator", json!({})).await;
    let r = app
        .execute(&alice, &id, json!({"operation": "add", "values": [2, 3]}))
        .await;
    assert_eq!(r.body["result"], json!({"value": 5}), "{:?}", r.body);
    // The operator manages it and reads its logs.
    let logs = app
        .get(Some(&operator), "/api/v1/functions/nodejs-calculator/logs")
        .await;
    assert_eq!(logs.status, 200, "{:?}", logs.body);
    let updated = put_function(
        &app,
        &operator,
        "nodejs-calculator",
        json!({"description": "d", "code": NODE_HELLO_V2}),
    )
    .await;
    assert_eq!(
        (updated.status, updated.body["version"].clone()),
        (200, json!(2)),
        "{:?}",
        updated.body
    );
    let gone = call(
        &app,
        Method::DELETE,
        "/api/v1/functions/nodejs-calculator",
        &operator,
        None,
    )
    .await;
    assert_eq!(gone.status, 204, "{:?}", gone.body);
}

/// An operator (`admin:functions` with `write:functions`) takes down a
/// function another subject registered: reads what it logged, replaces it
/// (the owner stays the owner) and deletes it. `admin:functions` alone
/// writes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_reads_replaces_and_deletes_another_subjects_function() {
    let app = spawn_app().await;
    let alice = app.admin();
    let operator = app.token("ops", &["read:functions", "write:functions", "admin:functions"]);
    let reader = app.token("auditor", &["read:functions", "admin:functions"]);
    let logging = "module.exports.handler = async (params) => { console.log('abuse ' + params.n); return {}; };\n";
    app.register("nodejs-abuse", logging, json!({})).await;
    let id = app.session(&alice, "nodejs-abuse", json!({})).await;
    let run = app.execute(&alice, &id, json!({"n": 7})).await;
    assert_eq!(run.status, 200, "{:?}", run.body);
    let execution = run.body["execution_id"].as_str().unwrap().to_owned();

    // Act and assert: the operator reads both kinds of logs.
    let function_logs = app.get(Some(&operator), "/api/v1/functions/nodejs-abuse/logs").await;
    assert_eq!(function_logs.status, 200, "{:?}", function_logs.body);
    assert!(
        function_logs.body.to_string().contains("abuse 7"),
        "{:?}",
        function_logs.body
    );
    let execution_logs = app
        .get(Some(&operator), &format!("/api/v1/executions/{execution}/logs"))
        .await;
    assert_eq!(execution_logs.status, 200, "{:?}", execution_logs.body);
    assert_eq!(
        execution_logs.body["lines"][0]["text"], "abuse 7",
        "{:?}",
        execution_logs.body
    );
    // Without write:functions, the scope writes nothing.
    let put = put_function(
        &app,
        &reader,
        "nodejs-abuse",
        json!({"description": "d", "code": NODE_HELLO}),
    )
    .await;
    let delete = call(&app, Method::DELETE, "/api/v1/functions/nodejs-abuse", &reader, None).await;
    for r in [&put, &delete] {
        assert_eq!((r.status, r.code()), (403, "FORBIDDEN"), "{:?}", r.body);
    }
    // The operator replaces it; the function stays alice's, who can still
    // update it.
    let replaced = put_function(
        &app,
        &operator,
        "nodejs-abuse",
        json!({"description": "d", "code": NODE_HELLO}),
    )
    .await;
    assert_eq!(replaced.status, 200, "{:?}", replaced.body);
    let detail = app.get(Some(&alice), "/api/v1/functions/nodejs-abuse").await;
    assert_eq!(
        (detail.body["version"].clone(), detail.body["owner"].clone()),
        (json!(2), json!("alice")),
        "{:?}",
        detail.body
    );
    let id = app.session(&alice, "nodejs-abuse", json!({})).await;
    let r = app.execute(&alice, &id, json!({"n": 8})).await;
    assert_eq!(r.body["result"], json!({"greeting": "hello v1"}), "{:?}", r.body);
    let again = put_function(
        &app,
        &alice,
        "nodejs-abuse",
        json!({"description": "d", "code": NODE_HELLO_V2}),
    )
    .await;
    assert_eq!(again.body["version"], 3, "{:?}", again.body);
    // And deletes it: gone for everyone.
    let gone = call(&app, Method::DELETE, "/api/v1/functions/nodejs-abuse", &operator, None).await;
    assert_eq!(gone.status, 204, "{:?}", gone.body);
    let r = app.initialize(&alice, "nodejs-abuse", json!({})).await;
    assert_eq!(r.status, 404, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn put_on_an_unknown_function_is_404() {
    let app = spawn_app().await;
    let token = app.admin();

    let r = put_function(
        &app,
        &token,
        "nodejs-nope",
        json!({"description": "d", "code": NODE_HELLO}),
    )
    .await;

    assert_eq!(r.status, 404, "{:?}", r.body);
    assert_eq!(r.code(), "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread")]
async fn put_with_another_language_title_in_the_body_is_400() {
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-hello", NODE_HELLO, json!({})).await;

    let r = put_function(
        &app,
        &token,
        "nodejs-hello",
        json!({"language_title": "nodejs-other", "description": "d", "code": NODE_HELLO_V2}),
    )
    .await;

    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.code(), "INVALID_REQUEST");
    assert!(r.body["error"]["message"].as_str().unwrap().contains("language_title"));
    let detail = app.get(Some(&token), "/api/v1/functions/nodejs-hello").await;
    assert_eq!(detail.body["version"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_function_is_gone_for_details_initialize_and_its_open_sessions() {
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-hello", NODE_HELLO, json!({})).await;
    let open = app
        .session(&token, "nodejs-hello", json!({"retain_session": true}))
        .await;

    // Act
    let deleted = call(&app, Method::DELETE, "/api/v1/functions/nodejs-hello", &token, None).await;

    // Assert
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    assert_eq!(deleted.body, Value::Null, "204 has no body");
    let detail = app.get(Some(&token), "/api/v1/functions/nodejs-hello").await;
    assert_eq!(detail.status, 404);
    assert_eq!(detail.code(), "NOT_FOUND");
    let init = app.initialize(&token, "nodejs-hello", json!({})).await;
    assert_eq!(init.status, 404, "{:?}", init.body);
    assert_eq!(init.code(), "NOT_FOUND");
    let exec = app.execute(&token, &open, json!({})).await;
    assert_eq!(exec.status, 404, "{:?}", exec.body);
    assert_eq!(exec.code(), "NOT_FOUND");
    assert_eq!(exec.body["request_id"], open.as_str());
    let again = call(&app, Method::DELETE, "/api/v1/functions/nodejs-hello", &token, None).await;
    assert_eq!(again.status, 404);
    let list = app.get(Some(&token), "/api/v1/functions").await;
    assert!(!titles(&list).contains(&"nodejs-hello".to_owned()));
}

#[tokio::test(flavor = "multi_thread")]
async fn code_that_fails_to_load_is_500_initialization_error_with_details() {
    let app = spawn_app().await;
    let token = app.admin();
    let cases = [
        (
            "nodejs-syntax",
            "module.exports.handler = () => 1;\nlet x = ;\n",
            Some(2),
        ),
        (
            "python-syntax",
            "def handler(params, context):\n    return 1\nx = = 2\n",
            Some(3),
        ),
        ("nodejs-toplevel", "throw new Error('broken at load');\n", Some(1)),
        ("python-toplevel", "raise RuntimeError('broken at load')\n", Some(1)),
        ("nodejs-nohandler", "module.exports.other = () => 1;\n", None),
        ("python-nohandler", "def other(params, context):\n    return 1\n", None),
    ];
    for (lt, code, line) in cases {
        app.register(lt, code, json!({})).await;

        let r = app.initialize(&token, lt, json!({})).await;

        assert_eq!(r.status, 500, "{lt}: {:?}", r.body);
        assert_eq!(r.code(), "INITIALIZATION_ERROR", "{lt}");
        assert!(r.body["error"]["message"].is_string(), "{lt}");
        assert!(r.body["error"]["details"].is_object(), "{lt}: {:?}", r.body);
        if let Some(line) = line {
            assert_eq!(r.body["error"]["details"]["line"], line, "{lt}: {:?}", r.body);
        }
        if lt.ends_with("toplevel") {
            assert!(
                r.body["error"]["message"].as_str().unwrap().contains("broken at load"),
                "{lt}: {:?}",
                r.body
            );
        }
        if lt.ends_with("nohandler") {
            assert!(
                r.body["error"]["message"].as_str().unwrap().contains("handler"),
                "{lt}: {:?}",
                r.body
            );
        }
        let shown = r.body.to_string();
        assert!(
            !shown.contains(app.data_dir.path().to_str().unwrap()),
            "{lt}: host path leaked: {shown}"
        );
        // The runtime's own frames are trimmed (it runs from bytecode that
        // still names them as its source).
        if lt.starts_with("python") {
            assert!(!shown.contains("server.py"), "{lt}: runtime frames shown: {shown}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_function_sees_its_manifest_env() {
    let app = spawn_app().await;
    let token = app.admin();
    let cases = [
        (
            "nodejs-greeter",
            "module.exports.handler = () => ({ greeting: process.env.GREETING ?? null });\n",
        ),
        (
            "python-greeter",
            "import os\n\ndef handler(params, context):\n    return {\"greeting\": os.environ.get(\"GREETING\")}\n",
        ),
    ];
    for (lt, code) in cases {
        app.register(lt, code, json!({"env": {"GREETING": "hi"}})).await;
        let id = app.session(&token, lt, json!({})).await;

        let r = app.execute(&token, &id, json!({})).await;

        assert_eq!(r.status, 200, "{lt}: {:?}", r.body);
        assert_eq!(r.body["result"], json!({"greeting": "hi"}), "{lt}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn registered_functions_survive_a_restart() {
    // Arrange: register and update, then restart the controller on its data dir.
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-hello", NODE_HELLO, json!({})).await;
    let updated = put_function(
        &app,
        &token,
        "nodejs-hello",
        json!({"description": "v2", "code": NODE_HELLO_V2}),
    )
    .await;
    assert_eq!(updated.status, 200, "{:?}", updated.body);

    // Act
    let app = app.restart().await;
    let detail = app.get(Some(&token), "/api/v1/functions/nodejs-hello").await;

    // Assert: still there, at its latest version, and it runs.
    assert_eq!(detail.status, 200, "{:?}", detail.body);
    assert_eq!(detail.body["version"], 2);
    assert_eq!(detail.body["description"], "v2");
    let id = app.session(&token, "nodejs-hello", json!({})).await;
    let exec = app.execute(&token, &id, json!({})).await;
    assert_eq!(exec.body["result"], json!({"greeting": "hello v2"}), "{:?}", exec.body);
}

/// Code of a function's first life: answers after `params.ms`.
const FIRST_LIFE: &str = "module.exports.handler = async (p) => { await new Promise((r) => setTimeout(r, p.ms || 0)); return { life: 'first' }; };\n";
/// Code registered under the same name after the delete.
const SECOND_LIFE: &str = "module.exports.handler = async () => ({ life: 'second' });\n";

/// Deletes `nodejs-reborn` and registers it again with [`SECOND_LIFE`]:
/// the registration's answer.
async fn delete_and_register_again(app: &TestApp, token: &str) -> Reply {
    let deleted = call(app, Method::DELETE, "/api/v1/functions/nodejs-reborn", token, None).await;
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    app.register("nodejs-reborn", SECOND_LIFE, json!({})).await
}

/// A new session of `nodejs-reborn` runs [`SECOND_LIFE`], not the deleted
/// code.
async fn assert_a_new_session_runs_the_second_life(app: &TestApp, token: &str) {
    let id = app.session(token, "nodejs-reborn", json!({})).await;
    let r = app
        .execute_with(token, &id, json!({"params": {}}), Some("no-cache"))
        .await;
    assert_eq!(
        r.body["result"],
        json!({"life": "second"}),
        "the deleted code ran: {:?}",
        r.body
    );
}

/// An asynchronous execution still running when its function is deleted
/// gives its instance back afterwards (nothing waits for it). The name
/// registered again starts at version 1 too: that instance (the deleted
/// code, and whatever it kept in memory, maybe another subject's) must not
/// serve it.
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_busy_across_a_delete_never_serves_the_name_registered_again() {
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-reborn", FIRST_LIFE, json!({})).await;
    let submitted = crate::executions::submit(
        &app,
        &token,
        json!({"language_title": "nodejs-reborn", "params": {"ms": 2000}}),
        None,
    )
    .await;
    assert_eq!(submitted.status, 202, "{:?}", submitted.body);
    let id = submitted.body["execution_id"].as_str().unwrap().to_owned();
    let long = std::time::Duration::from_secs(30);
    crate::executions::wait_until(&app, &token, &id, long, |e| e["status"] == "running").await;

    // Act: deleted and registered again while it runs.
    let created = delete_and_register_again(&app, &token).await;
    assert_eq!(created.body["version"], 1, "{:?}", created.body);
    let done = crate::executions::wait_until(&app, &token, &id, long, |e| e["status"] != "running").await;

    // Assert: the run in flight finished on the first life; every later
    // session runs the second.
    assert_eq!(done["result"], json!({"life": "first"}), "{done:?}");
    for _ in 0..3 {
        assert_a_new_session_runs_the_second_life(&app, &token).await;
    }
}

/// An initialize still readying its instance when the function is deleted
/// must not leave a session behind: the delete ended the sessions there
/// were, and this one would run whatever is registered under the name next.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_started_across_a_delete_is_not_left_behind() {
    let app = spawn_app().await;
    let token = app.admin();
    // Loading the module takes a second and a half: initialize is slow.
    let slow_load = format!("const t = Date.now(); while (Date.now() - t < 1500) {{}}\n{FIRST_LIFE}");
    app.register("nodejs-reborn", &slow_load, json!({})).await;

    // Act
    let (started, ()) = tokio::join!(
        app.initialize(&token, "nodejs-reborn", json!({"context": {"retain_session": true}})),
        async {
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            delete_and_register_again(&app, &token).await;
        }
    );

    // Assert: 404, saying why; had a session been left, it would answer.
    assert_eq!(
        (started.status, started.code()),
        (404, "NOT_FOUND"),
        "{:?}",
        started.body
    );
    assert!(
        started.body["error"]["message"].as_str().unwrap().contains("deleted"),
        "{:?}",
        started.body
    );
    let sessions = app.get(Some(&token), "/api/v1/sessions").await;
    assert_eq!(sessions.status, 200, "{:?}", sessions.body);
    assert!(
        !sessions.body.to_string().contains("nodejs-reborn"),
        "a session of the deleted function is left: {:?}",
        sessions.body
    );
    // The instance it readied, given back, serves nothing of the new one.
    assert_a_new_session_runs_the_second_life(&app, &token).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_function_deleted_and_registered_again_never_runs_its_old_code() {
    // Arrange: the first life of nodejs-hello reaches version 2, and a session
    // on its version 1 executes after the update (so version 1 is looked up).
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-hello", NODE_HELLO, json!({})).await;
    let first_life = app
        .session(&token, "nodejs-hello", json!({"retain_session": true}))
        .await;
    let v2 = put_function(
        &app,
        &token,
        "nodejs-hello",
        json!({"description": "d", "code": NODE_HELLO_V2}),
    )
    .await;
    assert_eq!(v2.status, 200, "{:?}", v2.body);
    let r = app.execute(&token, &first_life, json!({})).await;
    assert_eq!(r.body["result"], json!({"greeting": "hello v1"}), "{:?}", r.body);
    let deleted = call(&app, Method::DELETE, "/api/v1/functions/nodejs-hello", &token, None).await;
    assert_eq!(deleted.status, 204);

    // Act: a second life, whose version 1 is other code, also gets a version 2
    // while a session on its version 1 is open.
    let reborn = "module.exports.handler = () => ({ greeting: 'reborn v1' });\n";
    let created = app.register("nodejs-hello", reborn, json!({})).await;
    assert_eq!(created.body["version"], 1);
    let second_life = app.session(&token, "nodejs-hello", json!({})).await;
    let reborn_v2 = "module.exports.handler = () => ({ greeting: 'reborn v2' });\n";
    let v2 = put_function(
        &app,
        &token,
        "nodejs-hello",
        json!({"description": "d", "code": reborn_v2}),
    )
    .await;
    assert_eq!(v2.status, 200, "{:?}", v2.body);
    let r = app
        .execute_with(&token, &second_life, json!({"params": {}}), Some("no-cache"))
        .await;

    // Assert: the session runs the second life's version 1, not the deleted code.
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body["result"],
        json!({"greeting": "reborn v1"}),
        "a deleted function's code ran"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subjects_functions_stay_within_its_storage_quota() {
    // Arrange: 1 MiB a subject, every version counted; code of 400 KB.
    let app = crate::helpers::spawn_app_with(&["--functions-quota-mb", "1"]).await;
    let alice = app.token("alice", &["read:functions", "write:functions"]);
    let bob = app.token("bob", &["read:functions", "write:functions"]);
    let big = |n: u32| {
        format!(
            "// {}\nmodule.exports.handler = async () => ({{ n: {n} }});\n",
            "x".repeat(400_000)
        )
    };
    let body = |lt: &str, n: u32| json!({"language_title": lt, "description": "big", "code": big(n)});
    let post = async |token: &str, b: Value| call(&app, Method::POST, "/api/v1/functions", token, Some(b)).await;
    assert_eq!(post(&alice, body("nodejs-quota-a", 1)).await.status, 201);
    let second = put_function(&app, &alice, "nodejs-quota-a", body("nodejs-quota-a", 2)).await;
    assert_eq!(second.status, 200, "{:?}", second.body);

    // Act: a third version, and another function.
    let third = put_function(&app, &alice, "nodejs-quota-a", body("nodejs-quota-a", 3)).await;
    let other = post(&alice, body("nodejs-quota-b", 4)).await;

    // Assert: both refused, saying why; nothing of them stored.
    for refused in [&third, &other] {
        assert_eq!(
            (refused.status, refused.code()),
            (413, "INVALID_REQUEST"),
            "{:?}",
            refused.body
        );
        let message = refused.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("quota of 1048576 bytes") && message.contains("'alice'"),
            "{message}"
        );
    }
    let a = call(&app, Method::GET, "/api/v1/functions/nodejs-quota-a", &alice, None).await;
    assert_eq!(a.body["version"], 2, "{:?}", a.body);
    let b = call(&app, Method::GET, "/api/v1/functions/nodejs-quota-b", &alice, None).await;
    assert_eq!(b.status, 404);
    // Another subject's quota is its own; a delete makes room.
    assert_eq!(post(&bob, body("nodejs-quota-c", 5)).await.status, 201);
    let deleted = call(&app, Method::DELETE, "/api/v1/functions/nodejs-quota-a", &alice, None).await;
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    assert_eq!(post(&alice, body("nodejs-quota-b", 6)).await.status, 201);
}
