//! Placement: `--placement` puts a language, or one function, on a backend,
//! and refuses at start-up what cannot run.

use serde_json::json;

use crate::helpers::{spawn_app_with, start_error};

#[tokio::test(flavor = "multi_thread")]
async fn a_placement_that_cannot_run_is_refused_at_start_up_saying_why() {
    for (flag, says) in [
        (
            "nodejs=kubernetes",
            "there is no backend 'kubernetes' (backends here: process, wasm, docker)",
        ),
        ("wasm=docker", "the docker backend does not run wasm"),
        ("nodejs=wasm", "the wasm backend does not run nodejs"),
        (
            "python-resize=wasm",
            "placement of python-resize: the wasm backend does not run python",
        ),
        ("cobol=process", "neither a language nor a Language-Title"),
        ("nodejs", "is not LANGUAGE=BACKEND"),
    ] {
        let error = start_error(&["--placement", flag]).await;
        assert!(error.contains(says), "--placement {flag}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn functions_run_where_their_language_or_their_own_rule_places_them() {
    // Rules for a language, a function and both forms in one flag.
    let app = spawn_app_with(&[
        "--placement",
        "nodejs-calculator=process,wasm=wasm",
        "--placement",
        "python=process",
    ])
    .await;
    let token = app.admin();
    for (title, params, expected) in [
        (
            "nodejs-calculator",
            json!({"operation": "add", "values": [1, 2]}),
            json!({"value": 3}),
        ),
        (
            "python-calculator",
            json!({"operation": "multiply", "values": [2, 3]}),
            json!({"value": 6}),
        ),
    ] {
        let id = app.session(&token, title, json!({})).await;
        let r = app.execute(&token, &id, params).await;
        assert_eq!(r.status, 200, "{title}: {:?}", r.body);
        assert_eq!(r.body["result"], expected, "{title}");
    }
    let id = app.session(&token, "wasm-hello", json!({})).await;
    let r = app.execute(&token, &id, json!({"name": "placement"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}
