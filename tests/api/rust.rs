//! Functions written in Rust against `fnrt-sdk`: built by the controller at
//! registration, then run natively by the Rust runtime (`rust-*`, process
//! backend) or as a WASI module in wasmtime (`wasm-*` with a `Cargo.toml`).
//!
//! One probe crate, built for both targets, does what the sandbox cases need
//! (reliability.md 10-17, 19, 20) by `mode`.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::functions::call;
use crate::helpers::{Reply, TestApp, spawn_app, spawn_app_with};

pub(crate) const PROBE_TOML: &str = r#"[package]
name = "probe"
version = "0.1.0"
edition = "2024"

[dependencies]
fnrt-sdk = "0.1"
serde_json = "1"
"#;

const PROBE_LIB: &str = r#"
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use fnrt_sdk::{Context, Error, export};
use serde_json::{Value, json};

static RUNS: AtomicU64 = AtomicU64::new(0);

/// TMPDIR (std::env::temp_dir panics on wasm).
fn tmp() -> std::path::PathBuf {
    std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into()).into()
}

fn probe(params: Value, _context: Context) -> Result<Value, Error> {
    let runs = RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    match params["mode"].as_str().unwrap_or("ok") {
        "ok" => Ok(json!({ "echo": params, "runs": runs })),
        "chatty" => {
            // Output of the function's own: never part of its answer.
            println!("chatter {{\"not\": \"the result\"}}");
            print!("and no newline");
            eprintln!("chatter on stderr");
            if params["fail"] == true {
                return Err(Error::invalid_params("refused after chatting"));
            }
            Ok(json!({ "chatty": true }))
        }
        "invalid" => Err(Error::invalid_params("the probe refuses these params")),
        "fail" => Err(Error::runtime("the probe failed on purpose")),
        "panic" => {
            let empty: Vec<u64> = Vec::new();
            let i = params["index"].as_u64().unwrap_or(3) as usize;
            Ok(json!(empty[i]))
        }
        "loop" => loop {
            std::hint::black_box(runs);
        },
        "bomb" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 8 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "flood" => {
            use std::io::Write;
            let line = "x".repeat(1 << 20);
            let mut out = std::io::stdout();
            let mut written = 0;
            for _ in 0..params["mb"].as_u64().unwrap_or(20) {
                if out.write_all(line.as_bytes()).is_err() {
                    break;
                }
                written += 1;
            }
            Ok(json!({ "written_mb": written }))
        }
        "big" => Ok(json!("y".repeat(params["bytes"].as_u64().unwrap_or(0) as usize))),
        "env" => Ok(json!(std::env::vars().collect::<BTreeMap<String, String>>())),
        "read" => {
            let mut seen = BTreeMap::new();
            for path in params["paths"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                let what = match std::fs::read(path) {
                    Ok(bytes) => format!("read {} bytes", bytes.len()),
                    Err(e) => format!("error: {e}"),
                };
                seen.insert(path.to_owned(), what);
            }
            Ok(json!(seen))
        }
        "files" => {
            let mut open = Vec::new();
            let error = loop {
                match std::fs::File::open("/dev/null") {
                    Ok(f) if open.len() < 100_000 => open.push(f),
                    Ok(_) => break None,
                    Err(e) => break Some(e.raw_os_error()),
                }
            };
            Ok(json!({ "opened": open.len(), "errno": error }))
        }
        "fork" => {
            let mut children = Vec::new();
            let error = loop {
                match std::process::Command::new("sleep").arg("30").spawn() {
                    Ok(c) if children.len() < 5_000 => children.push(c),
                    Ok(_) => break None,
                    Err(e) => break Some(e.to_string()),
                }
            };
            let spawned = children.len();
            for mut c in children {
                let _ = c.kill();
                let _ = c.wait();
            }
            Ok(json!({ "spawned": spawned, "error": error }))
        }
        "write_tmp" => {
            let path = tmp().join("probe-marker");
            let written = std::fs::write(&path, params["text"].as_str().unwrap_or("marker")).is_ok();
            // One file past the file-size limit fails inside the function only.
            let big = std::fs::write(tmp().join("probe-big"), vec![0u8; 80 << 20]).map_err(|e| e.to_string());
            let _ = std::fs::remove_file(tmp().join("probe-big"));
            Ok(json!({ "written": written, "big": big.err() }))
        }
        "read_tmp" => Ok(json!(std::fs::read_to_string(tmp().join("probe-marker")).ok())),
        other => Err(Error::invalid_params(format!("unknown mode {other}"))),
    }
}

export!(probe);
"#;

/// The probe crate's files, with `extra` appended to its lib.rs (to make a
/// different version).
fn probe_files(extra: &str) -> Value {
    json!({ "Cargo.toml": PROBE_TOML, "src/lib.rs": format!("{PROBE_LIB}{extra}") })
}

/// Registers a crate as `language_title`; returns the reply (not asserted).
async fn register_crate(app: &TestApp, language_title: &str, files: Value, extra: Value) -> Reply {
    let mut body = json!({
        "language_title": language_title,
        "description": format!("test crate {language_title}"),
        "files": files,
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    call(app, Method::POST, "/api/v1/functions", &app.admin(), Some(body)).await
}

async fn register_probe(app: &TestApp, language_title: &str, extra: Value) {
    let r = register_crate(app, language_title, probe_files(""), extra).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["build"]["state"], "ready", "{:?}", r.body);
}

/// Executes without the cache.
async fn run(app: &TestApp, token: &str, id: &str, params: Value) -> Reply {
    app.execute_with(token, id, json!({ "params": params }), Some("no-cache"))
        .await
}

/// A session on `lt`, waiting while the function is still being built
/// (bundled crates build in the background at start-up).
pub async fn session_when_built(app: &TestApp, token: &str, lt: &str, context: Value) -> String {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let r = app.initialize(token, lt, json!({ "context": context })).await;
        if r.status == 200 {
            return r.body["request_id"].as_str().unwrap().to_owned();
        }
        assert_eq!(r.status, 503, "{:?}", r.body);
        assert_eq!(r.code(), "FUNCTION_NOT_READY", "{:?}", r.body);
        assert!(Instant::now() < deadline, "{lt} was not built in time");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bundled_rust_fibonacci_is_built_at_start_up_and_answers() {
    let app = spawn_app().await;
    let token = app.token("rustacean", &["execute:rust", "read:functions"]);
    let id = session_when_built(&app, &token, "rust-fibonacci", json!({"retain_session": true})).await;

    let r = app.execute(&token, &id, json!({"n": 10})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"], json!({"n": 10, "value": 55}));
    let r = app.execute(&token, &id, json!({"n": 93, "sequence": true})).await;
    assert_eq!(r.body["result"]["value"], 12200160415121876738u64);
    assert_eq!(r.body["result"]["sequence"].as_array().unwrap().len(), 94);
    // Schema-invalid params never reach the function.
    for bad in [json!({"n": -1}), json!({"n": 94}), json!({"m": 1}), json!({"n": "ten"})] {
        let r = app.execute(&token, &id, bad.clone()).await;
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
        assert_eq!(r.code(), "INVALID_PARAMS");
    }
    let detail = app.get(Some(&token), "/api/v1/functions/rust-fibonacci").await;
    assert_eq!(detail.body["language"], "rust");
    assert_eq!(detail.body["build"]["state"], "ready", "{:?}", detail.body);
    // execute:rust grants Rust functions only.
    assert_eq!(app.initialize(&token, "nodejs-calculator", json!({})).await.status, 403);
    assert_eq!(app.initialize(&token, "wasm-hello", json!({})).await.status, 403);
    let health = app.health_with_runtimes(&["rust", "wasm"]).await;
    assert_eq!(health.body["components"]["runtimes"]["rust"], "ok", "{:?}", health.body);
    assert_eq!(health.body["components"]["runtimes"]["wasm"], "ok", "{:?}", health.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bundled_wasm_sha256_is_rust_compiled_to_wasm() {
    let app = spawn_app().await;
    let token = app.token("hasher", &["execute:wasm"]);
    let id = session_when_built(&app, &token, "wasm-sha256", json!({"retain_session": true})).await;
    let r = app.execute(&token, &id, json!({"data": "aGVsbG8="})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body["result"],
        json!({"sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824", "bytes": 5})
    );
    let r = app.execute(&token, &id, json!({"data": "not base64!"})).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.code(), "INVALID_PARAMS");
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("base64"),
        "{:?}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crate_that_does_not_compile_is_refused_with_the_compilers_messages() {
    let app = spawn_app().await;
    for lt in ["rust-broken", "wasm-broken"] {
        let files = json!({
            "Cargo.toml": PROBE_TOML.replace("\"probe\"", "\"broken\""),
            "src/lib.rs": "use fnrt_sdk::{Context, Error, export};\nfn h(p: serde_json::Value, _c: Context) -> Result<serde_json::Value, Error> {\n    Ok(undefined_name)\n}\nexport!(h);\n",
        });
        let r = register_crate(&app, lt, files, json!({})).await;
        assert_eq!(r.status, 422, "{lt}: {:?}", r.body);
        assert_eq!(r.code(), "BUILD_FAILED");
        let messages = r.body["error"]["details"]["messages"].as_array().unwrap();
        let text: Vec<&str> = messages.iter().filter_map(Value::as_str).collect();
        let text = text.join("\n");
        assert!(
            text.contains("undefined_name") && text.contains("src/lib.rs:3"),
            "{text}"
        );
        assert!(!text.contains("/var/tmp"), "no host paths: {text}");
        // Nothing was registered.
        assert_eq!(
            app.get(Some(&app.admin()), &format!("/api/v1/functions/{lt}"))
                .await
                .status,
            404
        );
    }
    // A crate without its library is refused before any build.
    let r = register_crate(&app, "rust-empty", json!({"Cargo.toml": PROBE_TOML}), json!({})).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("src/lib.rs"),
        "{:?}",
        r.body
    );
    // `code` and `files` are one or the other; a crate's entrypoint is exactly Cargo.toml.
    let both = json!({"language_title": "rust-both", "description": "d", "code": "x", "files": probe_files("")});
    let neither = json!({"language_title": "rust-neither", "description": "d"});
    let renamed = json!({"language_title": "rust-renamed", "description": "d", "entrypoint": "MyCargo.toml", "files": probe_files("")});
    let as_code = json!({"language_title": "rust-as-code", "description": "d", "code": PROBE_LIB});
    for body in [both, neither, renamed, as_code] {
        let r = call(
            &app,
            Method::POST,
            "/api/v1/functions",
            &app.admin(),
            Some(body.clone()),
        )
        .await;
        assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"), "{body}: {:?}", r.body);
    }
    let r = register_crate(
        &app,
        "rust-escape",
        json!({"Cargo.toml": PROBE_TOML, "src/lib.rs": "", "../x.rs": ""}),
        json!({}),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
}

/// Success, the function's own errors, a panic (20), and the instance going
/// on afterwards, for one language.
async fn answers_errors_and_panics(language: &str) {
    let app = spawn_app().await;
    let lt = format!("{language}-probe");
    register_probe(&app, &lt, json!({})).await;
    let token = app.token("prober", &[&format!("execute:{language}")]);
    let id = app
        .session(&token, &lt, json!({"retain_session": true, "tenant": "t1"}))
        .await;

    let r = run(&app, &token, &id, json!({"mode": "ok", "x": [1, 2]})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["echo"], json!({"mode": "ok", "x": [1, 2]}));

    let r = run(&app, &token, &id, json!({"mode": "invalid"})).await;
    assert_eq!((r.status, r.code()), (400, "INVALID_PARAMS"), "{:?}", r.body);
    assert_eq!(r.body["error"]["message"], "the probe refuses these params");

    let r = run(&app, &token, &id, json!({"mode": "fail"})).await;
    assert_eq!((r.status, r.code()), (500, "RUNTIME_ERROR"), "{:?}", r.body);
    assert_eq!(r.body["error"]["message"], "the probe failed on purpose");

    let r = run(&app, &token, &id, json!({"mode": "panic"})).await;
    assert_eq!((r.status, r.code()), (500, "RUNTIME_ERROR"), "{:?}", r.body);
    let error = r.body["error"].to_string();
    assert!(error.contains("index out of bounds"), "{error}");
    assert!(error.contains("src/lib.rs:"), "the panic's location: {error}");
    if language == "rust" {
        assert_eq!(r.body["error"]["details"]["file"], "src/lib.rs", "{error}");
        assert!(r.body["error"]["details"]["line"].as_u64().unwrap() > 0, "{error}");
    }

    // The session goes on after every kind of error.
    let r = run(&app, &token, &id, json!({"mode": "ok"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_answers_its_own_errors_and_a_panic_with_its_location() {
    answers_errors_and_panics("rust").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wasm_from_rust_answers_its_own_errors_and_a_panic_with_its_location() {
    answers_errors_and_panics("wasm").await;
}

/// Infinite loop (10, 11), memory bomb (13), stdout flood and oversized
/// result (15).
async fn survives_loops_bombs_and_floods(language: &str) {
    let app = spawn_app().await;
    let lt = format!("{language}-probe");
    register_probe(&app, &lt, json!({"limits": {"memory_mb": 64}})).await;
    let token = app.admin();

    let id = app.session(&token, &lt, json!({"timeout_ms": 500})).await;
    let started = Instant::now();
    let r = run(&app, &token, &id, json!({"mode": "loop"})).await;
    let took = started.elapsed();
    assert_eq!((r.status, r.code()), (504, "TIMEOUT"), "{:?}", r.body);
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    let id = app.session(&token, &lt, json!({})).await;
    assert_eq!(run(&app, &token, &id, json!({"mode": "ok"})).await.status, 200);

    let mut answers = Vec::new();
    for _ in 0..5 {
        let id = app.session(&token, &lt, json!({})).await;
        let r = run(&app, &token, &id, json!({"mode": "bomb"})).await;
        assert_eq!((r.status, r.code()), (500, "RUNTIME_ERROR"), "{:?}", r.body);
        answers.push(r.body["error"]["message"].clone());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    let id = app.session(&token, &lt, json!({})).await;
    assert_eq!(run(&app, &token, &id, json!({"mode": "ok"})).await.status, 200);

    // A flood of stdout: the process backend keeps a tail, the wasm backend
    // stops the module at the output cap. Either way the answer is clean.
    let id = app.session(&token, &lt, json!({})).await;
    let r = run(&app, &token, &id, json!({"mode": "flood", "mb": 30})).await;
    match language {
        "rust" => assert_eq!(r.body["result"]["written_mb"], 30, "{:?}", r.body),
        _ => assert_eq!((r.status, r.code()), (500, "RUNTIME_ERROR"), "{:?}", r.body),
    }
    let id = app.session(&token, &lt, json!({})).await;
    let r = run(&app, &token, &id, json!({"mode": "big", "bytes": 2 << 20})).await;
    assert_eq!((r.status, r.code()), (500, "RUNTIME_ERROR"), "{:?}", r.body);
    let id = app.session(&token, &lt, json!({})).await;
    let r = run(&app, &token, &id, json!({"mode": "big", "bytes": 1000})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_survives_loops_memory_bombs_and_floods() {
    survives_loops_bombs_and_floods("rust").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wasm_from_rust_survives_loops_memory_bombs_and_floods() {
    survives_loops_bombs_and_floods("wasm").await;
}

/// What a function can see and touch (14, 16, 17) and state between
/// functions and versions (19).
async fn is_confined(language: &str) {
    // Scratch space larger than the file-size limit (64 MiB), so that the
    // 80 MiB write meets the latter.
    let app = spawn_app_with(&["--instance-scratch-mb", "128"]).await;
    let lt = format!("{language}-probe");
    register_probe(&app, &lt, json!({"env": {"GREETING": "hi"}})).await;
    let token = app.admin();
    let one = |mode: Value| {
        let app = &app;
        let token = &token;
        let lt = &lt;
        async move {
            let id = app.session(token, lt, json!({})).await;
            let r = run(app, token, &id, mode).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            r.body["result"].clone()
        }
    };

    let env = one(json!({"mode": "env"})).await;
    let names: Vec<&String> = env.as_object().unwrap().keys().collect();
    assert_eq!(env["GREETING"], "hi", "{env}");
    let allowed = ["GREETING", "PATH", "HOME", "LANG", "TMPDIR"];
    assert!(names.iter().all(|n| allowed.contains(&n.as_str())), "{names:?}");
    assert!(!env.to_string().contains(crate::helpers::SECRET), "{env}");

    let data_dir = app.data_dir.path().to_string_lossy().into_owned();
    let paths = [
        "/proc/1/environ".to_owned(),
        format!("/proc/{}/environ", app.server_pid()),
        "/etc/shadow".to_owned(),
        format!("{data_dir}/controller.db"),
        format!("{data_dir}/jwt-secret"),
    ];
    let seen = one(json!({"mode": "read", "paths": paths})).await;
    for path in &paths {
        let what = seen[path].as_str().unwrap();
        assert!(what.starts_with("error"), "{path}: {what}");
    }

    let files = one(json!({"mode": "files"})).await;
    match language {
        // RLIMIT_NOFILE: EMFILE (24) inside the function.
        "rust" => {
            assert_eq!(files["errno"], 24, "{files}");
            assert!(files["opened"].as_u64().unwrap() < 300, "{files}");
        }
        // No preopened directories: nothing opens at all.
        _ => assert_eq!(files["opened"], 0, "{files}"),
    }

    let tmp = one(json!({"mode": "write_tmp", "text": "from A"})).await;
    if language == "rust" {
        assert_eq!(tmp["written"], true, "{tmp}");
        assert!(
            tmp["big"].as_str().unwrap().contains("too large"),
            "file-size limit: {tmp}"
        );
        let fork = one(json!({"mode": "fork"})).await;
        assert!(fork["error"].is_string(), "stopped by the process limit: {fork}");
    } else {
        assert_eq!(tmp["written"], false, "no file system: {tmp}");
    }

    // State: a second function and a second version see nothing of the first.
    register_probe(&app, &format!("{language}-other"), json!({})).await;
    let id = app.session(&token, &format!("{language}-other"), json!({})).await;
    let r = run(&app, &token, &id, json!({"mode": "read_tmp"})).await;
    assert_eq!(r.body["result"], Value::Null, "{:?}", r.body);
    let path = format!("/api/v1/functions/{lt}");
    let r = call(
        &app,
        Method::PUT,
        &path,
        &token,
        Some(json!({"description": "v2", "files": probe_files("// v2\n")})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = app.session(&token, &lt, json!({"retain_session": true})).await;
    let first = run(&app, &token, &id, json!({"mode": "ok"})).await;
    assert_eq!(first.body["result"]["runs"], 1, "a fresh instance: {:?}", first.body);
    let r = run(&app, &token, &id, json!({"mode": "read_tmp"})).await;
    assert_eq!(r.body["result"], Value::Null, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_functions_are_confined_to_their_own_instance() {
    is_confined("rust").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wasm_functions_from_rust_are_confined_to_their_sandbox() {
    is_confined("wasm").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_crates_with_the_same_package_name_each_run_their_own_code() {
    let app = spawn_app().await;
    let token = app.admin();
    for (lt, word) in [
        ("rust-same-a", "alpha"),
        ("rust-same-b", "beta"),
        ("wasm-same-c", "gamma"),
    ] {
        let files = json!({
            "Cargo.toml": PROBE_TOML.replace("\"probe\"", "\"same\""),
            "src/lib.rs": format!(
                "use fnrt_sdk::{{Context, Error, export}};\nfn h(_p: serde_json::Value, _c: Context) -> Result<&'static str, Error> {{ Ok(\"{word}\") }}\nexport!(h);\n"
            ),
        });
        let r = register_crate(&app, lt, files, json!({})).await;
        assert_eq!(r.status, 201, "{lt}: {:?}", r.body);
    }
    for (lt, word) in [
        ("rust-same-a", "alpha"),
        ("rust-same-b", "beta"),
        ("wasm-same-c", "gamma"),
    ] {
        let id = app.session(&token, lt, json!({})).await;
        let r = run(&app, &token, &id, json!({})).await;
        assert_eq!(r.body["result"], word, "{lt}: {:?}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_crates_whose_path_dependencies_share_a_name_each_run_their_own_dependency() {
    // Arrange: the same layout and names, different code in the dependency.
    let app = spawn_app().await;
    let token = app.admin();
    let words = [
        ("rust-dep-a", format!("one-{}", rand_suffix())),
        ("rust-dep-b", format!("two-{}", rand_suffix())),
    ];
    for (lt, word) in &words {
        let files = json!({
            "Cargo.toml": format!("{PROBE_TOML}helper = {{ path = \"helper\" }}\n"),
            "src/lib.rs": "use fnrt_sdk::{Context, Error, export};\n\
                           fn h(_p: serde_json::Value, _c: Context) -> Result<&'static str, Error> { Ok(helper::WORD) }\n\
                           export!(h);\n",
            "helper/Cargo.toml": "[package]\nname = \"helper\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
            "helper/src/lib.rs": format!("pub const WORD: &str = \"{word}\";\n"),
        });

        // Act
        let r = register_crate(&app, lt, files, json!({})).await;
        assert_eq!(r.status, 201, "{lt}: {:?}", r.body);
    }

    // Assert: each function runs the dependency it was registered with.
    for (lt, word) in &words {
        let id = app.session(&token, lt, json!({})).await;
        let r = run(&app, &token, &id, json!({})).await;
        assert_eq!(r.body["result"], word.as_str(), "{lt}: {:?}", r.body);
    }
}

/// A stand-in for cargo in the test's data dir: `script` as a shell script.
/// A "cargo" script in `app_dir`, which is opened to the build user: builds
/// run as a uid of their own and see the folder of a cargo given by path.
fn fake_cargo(app_dir: &std::path::Path, script: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(app_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = app_dir.join(format!("fake-cargo-{}", rand_suffix()));
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_string_lossy().into_owned()
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crate_still_building_is_503_and_a_failed_background_build_is_422_until_a_retry_builds_it() {
    let scratch = tempfile::Builder::new()
        .prefix("fnrt-cargo")
        .tempdir_in("/var/tmp")
        .unwrap();
    // Bundled crates build in the background with a "cargo" that takes 20 s.
    let marker = format!("20.{}", rand_suffix() % 1_000_000);
    let slow = fake_cargo(scratch.path(), &format!("sleep {marker} & wait"));
    let app = crate::helpers::spawn_app_with(&[
        "--cargo-bin",
        &slow,
        "--rust-target-dir",
        &scratch.path().join("t").to_string_lossy(),
    ])
    .await;
    let token = app.admin();
    let started = Instant::now();
    let r = app.initialize(&token, "rust-fibonacci", json!({})).await;
    assert!(started.elapsed() < Duration::from_secs(5), "no waiting for the build");
    assert_eq!((r.status, r.code()), (503, "FUNCTION_NOT_READY"), "{:?}", r.body);
    assert_eq!(r.headers.get("retry-after").map(|v| v.to_str().unwrap()), Some("5"));
    let detail = app.get(Some(&token), "/api/v1/functions/rust-fibonacci").await;
    assert_eq!(detail.body["build"]["state"], "building", "{:?}", detail.body);
    // Other languages are not held up.
    let id = app.session(&token, "nodejs-calculator", json!({})).await;
    assert_eq!(
        app.execute(&token, &id, json!({"operation": "add", "values": [1, 2]}))
            .await
            .status,
        200
    );
    // The stopped controller takes its unfinished builds with it.
    let leftover = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
        })
    };
    assert!(leftover(), "the build is running");
    drop(app);
    assert!(
        crate::helpers::eventually(Duration::from_secs(3), || !leftover()).await,
        "a build outlived its controller"
    );

    // A "cargo" that fails until the network is "back" (a marker file):
    // the background build's failure is what initialize and the function's
    // detail report, and a later initialize builds again.
    let back = scratch.path().join("network-is-back");
    let flaky = fake_cargo(
        scratch.path(),
        &format!(
            "if [ -f {} ]; then exec cargo \"$@\"; fi\necho 'error: no registry here' >&2; exit 101",
            back.display()
        ),
    );
    let app = crate::helpers::spawn_app_with(&["--cargo-bin", &flaky, "--rust-build-retry-secs", "1"]).await;
    let token = app.admin();
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = app.initialize(&token, "wasm-sha256", json!({})).await;
        if r.status != 503 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((r.status, r.code()), (422, "BUILD_FAILED"), "{:?}", r.body);
    assert!(
        r.body["error"]["details"]["messages"]
            .to_string()
            .contains("no registry here"),
        "{:?}",
        r.body
    );
    let detail = app.get(Some(&token), "/api/v1/functions/wasm-sha256").await;
    assert_eq!(detail.body["build"]["state"], "failed", "{:?}", detail.body);

    std::fs::write(&back, "").unwrap();
    let id = session_when_built_or_failed(&app, &token, "wasm-sha256").await;
    let r = app.execute(&token, &id, json!({"data": "aGVsbG8="})).await;
    assert_eq!(r.status, 200, "built on a later try: {:?}", r.body);
}

/// Like [`session_when_built`], also waiting through `BUILD_FAILED` answers
/// (a failed build is tried again after a while).
async fn session_when_built_or_failed(app: &TestApp, token: &str, lt: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let r = app.initialize(token, lt, json!({})).await;
        if r.status == 200 {
            return r.body["request_id"].as_str().unwrap().to_owned();
        }
        assert!(
            matches!(r.code(), "FUNCTION_NOT_READY" | "BUILD_FAILED"),
            "{:?}",
            r.body
        );
        assert!(Instant::now() < deadline, "{lt} was not built in time: {:?}", r.body);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_over_its_time_limit_is_stopped_and_refused() {
    let scratch = tempfile::Builder::new()
        .prefix("fnrt-cargo")
        .tempdir_in("/var/tmp")
        .unwrap();
    let slow = fake_cargo(scratch.path(), "sleep 30");
    let app = crate::helpers::spawn_app_with(&["--cargo-bin", &slow, "--rust-build-timeout-secs", "1"]).await;
    let started = Instant::now();
    let r = register_crate(&app, "rust-slow", probe_files("// slow\n"), json!({})).await;
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!((r.status, r.code()), (422, "BUILD_FAILED"), "{:?}", r.body);
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("longer than 1 s"),
        "{:?}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_function_prints_never_spoils_its_answer() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in ["rust", "wasm"] {
        let lt = format!("{language}-chatty");
        register_probe(&app, &lt, json!({})).await;
        let id = app.session(&token, &lt, json!({"retain_session": true})).await;

        // Act
        let ok = run(&app, &token, &id, json!({"mode": "chatty"})).await;
        let refused = run(&app, &token, &id, json!({"mode": "chatty", "fail": true})).await;

        // Assert: the answer, and the error with what was printed beside it.
        assert_eq!(ok.status, 200, "{lt}: {:?}", ok.body);
        assert_eq!(ok.body["result"], json!({"chatty": true}), "{lt}");
        assert_eq!(
            (refused.status, refused.code()),
            (400, "INVALID_PARAMS"),
            "{lt}: {:?}",
            refused.body
        );
        assert_eq!(refused.body["error"]["message"], "refused after chatting");
        // Both runs' output is their logs, each its own.
        for r in [&ok, &refused] {
            let execution_id = r.body["execution_id"].as_str().expect("execution_id");
            let logs = app
                .get(Some(&token), &format!("/api/v1/executions/{execution_id}/logs"))
                .await;
            let of = |stream: &str| -> Vec<String> {
                logs.body["lines"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{lt}: {:?}", logs.body))
                    .iter()
                    .filter(|l| l["stream"] == stream)
                    .map(|l| l["text"].as_str().unwrap().to_owned())
                    .collect()
            };
            assert_eq!(
                of("stdout"),
                [r#"chatter {"not": "the result"}"#, "and no newline"],
                "{lt}: {:?}",
                logs.body
            );
            assert_eq!(of("stderr"), ["chatter on stderr"], "{lt}: {:?}", logs.body);
        }
        if language == "wasm" {
            let printed = refused.body["error"]["details"]["stdout_tail"]
                .as_str()
                .unwrap_or_default();
            assert!(
                printed.contains("chatter") && printed.ends_with("and no newline"),
                "{printed:?}"
            );
        }
    }
}
