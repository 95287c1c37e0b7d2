//! `wasm-*` functions: wasmtime sandboxes inside the controller, a fresh
//! instance per execution, JSON in on stdin and out on stdout.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::functions::call;

use crate::helpers::{spawn_app, spawn_app_with};

/// A WAT module whose `_start` body is `body`, with fd_read/fd_write/proc_exit
/// imported and one page of memory.
fn module(body: &str) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") {body}))"#
    )
}

/// Reads stdin (up to 60 KB) into memory at 1024 and writes it back.
const ECHO: &str = r#"
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 60000))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 4) (i32.load (i32.const 8)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_bundled_wat_function_answers_through_the_api() {
    let app = spawn_app().await;
    let token = app.token("wasm-user", &["execute:wasm"]);
    let id = app.session(&token, "wasm-hello", json!({"retain_session": true})).await;
    let r = app.execute(&token, &id, json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"], json!({"message": "hello from wasm"}));
    // execute:wasm is not execute:nodejs.
    assert_eq!(app.initialize(&token, "nodejs-calculator", json!({})).await.status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn params_and_context_arrive_as_json_on_stdin() {
    let app = spawn_app().await;
    app.register("wasm-echo", &module(ECHO), json!({})).await;
    let token = app.admin();
    let id = app
        .session(&token, "wasm-echo", json!({"retain_session": true, "user_id": "u-1"}))
        .await;
    let r = app.execute(&token, &id, json!({"n": [1, 2, 3]})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body["result"],
        json!({"params": {"n": [1, 2, 3]}, "context": {"user_id": "u-1"}})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trap_an_exit_code_and_bad_output_are_runtime_errors() {
    let app = spawn_app().await;
    let token = app.admin();
    let cases = [
        ("wasm-trap", "(unreachable)", "unreachable"),
        ("wasm-exit", "(call $proc_exit (i32.const 3))", "status 3"),
        ("wasm-silent", "(nop)", "not JSON"),
    ];
    for (lt, body, expected) in cases {
        app.register(lt, &module(body), json!({})).await;
        let id = app.session(&token, lt, json!({})).await;
        let r = app.execute(&token, &id, json!({})).await;
        assert_eq!(r.status, 500, "{lt}: {:?}", r.body);
        assert_eq!(r.code(), "RUNTIME_ERROR");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{lt}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tight_loop_times_out_within_a_second_of_its_deadline_and_the_next_run_works() {
    let app = spawn_app().await;
    app.register("wasm-spin", &module("(loop $l (br $l))"), json!({})).await;
    let token = app.admin();
    let id = app.session(&token, "wasm-spin", json!({"timeout_ms": 300})).await;
    let started = Instant::now();
    let r = app.execute(&token, &id, json!({})).await;
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert_eq!(r.code(), "TIMEOUT");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1800),
        "{took:?}"
    );
    let hello = app.session(&token, "wasm-hello", json!({})).await;
    assert_eq!(app.execute(&token, &hello, json!({})).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_bomb_is_a_clean_error_five_times_in_a_row() {
    let app = spawn_app().await;
    // Grows memory a page at a time until refused, then traps.
    let bomb = module("(loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) (unreachable)");
    app.register("wasm-bomb", &bomb, json!({"limits": {"memory_mb": 32}}))
        .await;
    let token = app.admin();
    for _ in 0..5 {
        let id = app.session(&token, "wasm-bomb", json!({})).await;
        let r = app.execute(&token, &id, json!({})).await;
        assert_eq!(r.status, 500, "{:?}", r.body);
        assert_eq!(r.code(), "RUNTIME_ERROR");
    }
    let hello = app.session(&token, "wasm-hello", json!({})).await;
    assert_eq!(app.execute(&token, &hello, json!({})).await.status, 200);
}

/// Reports whether anything of an earlier run is left (a mutable global, a
/// byte in the first page, one in memory it grew), then leaves its own
/// input in all three.
const LEFTOVERS: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $ran (mut i32) (i32.const 0))
  (data (i32.const 100) "{\"left\":false}")
  (data (i32.const 200) "{\"left\":true}")
  (func (export "_start")
    (local $left i32)
    (drop (memory.grow (i32.const 47)))
    (local.set $left (i32.or (global.get $ran)
      (i32.or (i32.load8_u (i32.const 32768)) (i32.load8_u (i32.const 2097152)))))
    (i32.store (i32.const 0) (i32.const 32768))
    (i32.store (i32.const 4) (i32.const 1000))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (memory.copy (i32.const 2097152) (i32.const 32768) (i32.const 1000))
    (global.set $ran (i32.const 1))
    (if (local.get $left)
      (then (i32.store (i32.const 0) (i32.const 200)) (i32.store (i32.const 4) (i32.const 13)))
      (else (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 14))))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// The engine reuses a pooled slot's memory in place (what a run dirtied is
/// reset, not given back to the kernel): nothing of one caller's run may
/// reach the next run, another caller's, in the same slot or any other.
#[tokio::test(flavor = "multi_thread")]
async fn nothing_of_a_run_reaches_the_next_one_in_memory_or_globals() {
    let app = spawn_app().await;
    app.register("wasm-leftovers", LEFTOVERS, json!({"cache": {"enabled": false}}))
        .await;
    let alice = app.token("alice", &["execute:wasm"]);
    let mallory = app.token("mallory", &["execute:wasm"]);
    let a = app
        .session(&alice, "wasm-leftovers", json!({"retain_session": true}))
        .await;
    let m = app
        .session(&mallory, "wasm-leftovers", json!({"retain_session": true}))
        .await;
    for round in 0..6 {
        let (token, id) = if round % 2 == 0 { (&alice, &a) } else { (&mallory, &m) };
        let r = app.execute(token, id, json!({"secret": format!("card-{round}")})).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.body["result"], json!({"left": false}), "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stdout_flood_is_stopped_at_the_output_cap() {
    let app = spawn_app().await;
    let flood = module(
        r#"(i32.store (i32.const 0) (i32.const 0)) (i32.store (i32.const 4) (i32.const 65536))
           (loop $l (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))) (br $l))"#,
    );
    app.register("wasm-flood", &flood, json!({})).await;
    let token = app.admin();
    let id = app.session(&token, "wasm-flood", json!({"timeout_ms": 5000})).await;
    let r = app.execute(&token, &id, json!({})).await;
    assert_eq!(r.status, 500, "{:?}", r.body);
    assert_eq!(r.code(), "RUNTIME_ERROR");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_that_does_not_compile_is_refused_at_registration() {
    let app = spawn_app().await;
    let r = call(&app, Method::POST, "/api/v1/functions", &app.admin(), Some(json!({"language_title": "wasm-broken", "description": "d", "code": "(module (func (export \"_start\") (i32.add)))"}))).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("compile"),
        "{:?}",
        r.body
    );
}

/// A binary module Cranelift takes long over (tens of seconds in a debug
/// build): one function keeping `LOCALS` locals, loaded from memory so that
/// nothing folds away, live across `n` multiplications, then stored.
fn slow_to_compile(n: usize) -> Vec<u8> {
    const LOCALS: usize = 500;
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                return out.push(byte);
            }
            out.push(byte | 0x80);
        }
    }
    fn section(id: u8, payload: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        leb(payload.len(), out);
        out.extend_from_slice(payload);
    }
    let mut body = Vec::new();
    leb(1, &mut body);
    leb(LOCALS, &mut body);
    body.push(0x7e); // i64
    for k in 0..LOCALS {
        body.extend([0x41, 0x00, 0x29, 0x03]); // i32.const 0, i64.load align=8
        leb(k * 8, &mut body);
        body.push(0x21); // local.set
        leb(k, &mut body);
    }
    for i in 0..n {
        let (a, b) = (i % LOCALS, (i * 7 + 3) % LOCALS);
        body.push(0x20);
        leb(a, &mut body);
        body.push(0x20);
        leb(b, &mut body);
        body.push(0x7e); // i64.mul
        body.push(0x21);
        leb(a, &mut body);
    }
    for k in 0..LOCALS {
        body.extend([0x41, 0x00, 0x20]); // i32.const 0, local.get
        leb(k, &mut body);
        body.extend([0x37, 0x03]); // i64.store align=8
        leb(k * 8, &mut body);
    }
    body.push(0x0b);
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut module);
    section(3, &[1, 0], &mut module);
    section(5, &[1, 0, 1], &mut module);
    let mut exports = vec![2, 6];
    exports.extend(b"memory\x02\x00\x06_start\x00\x00");
    section(7, &exports, &mut module);
    let mut code = vec![1];
    leb(body.len(), &mut code);
    code.extend(body);
    section(10, &code, &mut module);
    module
}

/// The registration of a module slow to compile, and the hash its
/// compiler's output file is named by (the disk cache's name for it).
fn slow_registration() -> (serde_json::Value, String) {
    use sha2::Digest as _;
    let slow = slow_to_compile(38_000);
    let hash = hex::encode(sha2::Sha256::digest(&slow));
    let code = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &slow);
    let body = json!({"language_title": "wasm-slow", "description": "slow to compile", "entrypoint": "module.wasm", "code": code});
    (body, hash)
}

/// Processes whose command line holds `needle`.
fn processes_with(needle: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle)))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_slower_to_compile_than_the_budget_is_refused_and_its_compiler_stopped() {
    let app = crate::helpers::spawn_app_with(&["--wasm-compile-budget-secs", "1"]).await;
    let (body, hash) = slow_registration();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, hash) = (stop.clone(), hash.clone());
        std::thread::spawn(move || {
            let mut seen = false;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seen |= processes_with(&hash) > 0;
                std::thread::sleep(Duration::from_millis(5));
            }
            seen
        })
    };
    let r = call(&app, Method::POST, "/api/v1/functions", &app.admin(), Some(body)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not compile within 1 s"),
        "{:?}",
        r.body
    );
    assert!(seen, "the module was compiled in a process of its own");
    assert_eq!(processes_with(&hash), 0, "its compiler was stopped at the budget");
    // A module that compiles still does.
    app.register("wasm-echo", &module(ECHO), json!({})).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_killed_while_a_module_compiles_takes_the_compiler_with_it() {
    let mut app = crate::helpers::spawn_binary();
    let (body, hash) = slow_registration();
    let registering = {
        let (client, url, token) = (app.client.clone(), app.url("/api/v1/functions"), app.admin());
        tokio::spawn(async move { client.post(url).bearer_auth(token).json(&body).send().await })
    };
    let mut compiling = false;
    for _ in 0..1000 {
        compiling = processes_with(&hash) > 0;
        if compiling {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(compiling, "the module is being compiled");
    app.kill_hard();
    let _ = registering.await;
    let mut left = processes_with(&hash);
    for _ in 0..200 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        left = processes_with(&hash);
    }
    assert_eq!(left, 0, "the compiler outlived its controller");
}

/// `lambda_wasm_modules_total{source="…"}`, 0 when absent.
async fn modules_from(app: &crate::helpers::TestApp, source: &str) -> u64 {
    let text = app.metrics().await;
    let prefix = format!("lambda_wasm_modules_total{{source=\"{source}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|n| n.trim().parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn compiled_modules_are_kept_on_disk_so_a_restart_does_not_recompile() {
    let app = spawn_app().await;
    app.register("wasm-echo", &module(ECHO), json!({})).await;
    assert!(modules_from(&app, "compiled").await >= 1);
    let app = app.restart().await;
    let token = app.admin();
    let id = app.session(&token, "wasm-echo", json!({})).await;
    let r = app.execute(&token, &id, json!({"x": 1})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Bundled modules and the registered one all came from the disk cache.
    assert_eq!(modules_from(&app, "compiled").await, 0);
    assert!(modules_from(&app, "disk_cache").await >= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_over_the_size_limit_is_refused_at_registration() {
    let app = crate::helpers::spawn_app_with(&["--wasm-max-module-bytes", "2000"]).await;
    let padding = format!("(drop (i32.const 0)) ;; {}", "x".repeat(3000));
    let r = call(
        &app,
        Method::POST,
        "/api/v1/functions",
        &app.admin(),
        Some(json!({"language_title": "wasm-big", "description": "big", "code": module(&padding)})),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 2000 bytes"),
        "{:?}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binary_module_is_base64_whatever_its_file_is_called() {
    let app = spawn_app().await;
    // The smallest WASI command: `(module (func (export "_start")))`.
    let binary = "AGFzbQEAAAABBAFgAAADAgEABwoBBl9zdGFydAAACgQBAgAL";
    for (lt, entrypoint) in [("wasm-named", "module.wasm"), ("wasm-built-name", "function.wasm")] {
        let body = json!({"language_title": lt, "description": "d", "entrypoint": entrypoint, "code": binary});
        let r = call(&app, Method::POST, "/api/v1/functions", &app.admin(), Some(body)).await;
        assert_eq!(r.status, 201, "{entrypoint}: {:?}", r.body);
    }
    let body = json!({"language_title": "wasm-not-b64", "description": "d", "entrypoint": "m.wasm", "code": "!!"});
    let r = call(&app, Method::POST, "/api/v1/functions", &app.admin(), Some(body)).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("base64"),
        "{:?}",
        r.body
    );
}

/// [`ECHO`] with `n` functions beside it that nothing calls (compiled all
/// the same), told apart by `seed`.
fn bulky_echo(seed: u32, n: u32) -> String {
    let fillers: String = (0..n)
        .map(|i| {
            let ops = " i32.const 7 i32.mul i32.const 3 i32.xor".repeat(4);
            format!(
                "(func (param i32) (result i32) local.get 0{ops} i32.const {} i32.add)\n",
                seed * 100_000 + i
            )
        })
        .collect();
    // The module's last parenthesis closes it: the fillers go before.
    let echo = module(ECHO);
    format!("{}\n{fillers})", echo.strip_suffix(')').unwrap())
}

/// The compiled modules in a data dir's wasm cache: how many, and their bytes.
fn compiled(data: &std::path::Path) -> (usize, u64) {
    let mut found = (0, 0);
    let mut dirs = vec![data.join("wasm-cache")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "cwasm") {
                found.0 += 1;
                found.1 += entry.metadata().unwrap().len();
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn compiled_code_is_kept_within_the_wasm_cache_size() {
    // Without a bound, every module ever registered (a refused one too)
    // kept its compiled code on disk, and every one run stayed linked.
    // Idle instances (which hold their module) are let go after 1 s.
    let app = spawn_app_with(&["--wasm-cache-mb", "1", "--keep-warm-secs", "1"]).await;
    let token = app.admin();
    let mut most = 0;

    // Act: six modules of several hundred KiB compiled each, run in turn.
    for i in 0..6 {
        let lt = format!("wasm-bulky-{i}");
        app.register(&lt, &bulky_echo(i, 1500), json!({})).await;
        let id = app.session(&token, &lt, json!({})).await;
        let r = app.execute(&token, &id, json!({"i": i})).await;
        assert_eq!(r.body["result"]["params"], json!({"i": i}), "{:?}", r.body);
        let (files, bytes) = compiled(app.data_dir.path());
        most = most.max(files);
        // Assert: the cache stays within its size.
        assert!(bytes <= 1 << 20, "{files} compiled modules take {bytes} bytes");
    }
    assert!(most >= 2, "the modules were too small to test the bound: {most}");
    // Nor does the controller (this process) keep every module linked:
    // a linked module maps its file, which a removal then cannot free.
    let cache = app.data_dir.path().join("wasm-cache").display().to_string();
    let mapped = || -> Vec<String> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mut files: Vec<String> = maps
            .lines()
            .filter_map(|l| l.split_once(cache.as_str()).map(|(_, file)| file.to_owned()))
            .collect();
        files.sort();
        files.dedup();
        files
    };
    let let_go = crate::helpers::eventually(Duration::from_secs(15), || mapped().len() <= 3).await;
    assert!(
        let_go,
        "{} compiled modules still mapped: {:?}",
        mapped().len(),
        mapped()
    );

    // Every function still runs: what left the cache is compiled again.
    for i in 0..6 {
        let lt = format!("wasm-bulky-{i}");
        let id = app.session(&token, &lt, json!({})).await;
        let r = app.execute(&token, &id, json!({"again": i})).await;
        assert_eq!(r.body["result"]["params"], json!({"again": i}), "{:?}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_past_the_engines_slots_wait_for_one_and_all_answer() {
    // Two slots (WASM_MAX_INSTANCES); six runs of a module that spins a
    // while (yielding at every epoch tick, so all six are under way at once).
    let app = spawn_app_with(&["--wasm-max-instances", "2"]).await;
    let spin_then_echo = format!(
        "(local $i i32) (local.set $i (i32.const 100000000)) \
         (loop $l (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $l (local.get $i))) {ECHO}"
    );
    app.register("wasm-busy", &module(&spin_then_echo), json!({})).await;
    let token = app.admin();
    let mut sessions = Vec::new();
    for _ in 0..6 {
        sessions.push(app.session(&token, "wasm-busy", json!({})).await);
    }

    // Act
    let answers = futures::future::join_all(
        sessions
            .iter()
            .enumerate()
            .map(|(n, id)| app.execute_with(&token, id, json!({"params": {"n": n}}), Some("no-cache"))),
    )
    .await;

    // Assert: each waited for a slot rather than failing as its module's
    // error, and got its own answer.
    for (n, r) in answers.iter().enumerate() {
        assert_eq!(r.status, 200, "run {n}: {:?}", r.body);
        assert_eq!(r.body["result"]["params"], json!({"n": n}));
    }
}

#[test]
fn more_wasm_slots_than_the_address_space_holds_stop_the_start_naming_the_setting() {
    // 65,536 slots of 4 GiB are twice what a process may map on x86-64.
    let data = tempfile::Builder::new()
        .prefix("fnrt-wasm-slots")
        .tempdir_in("/var/tmp")
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_controller-under-test"))
        .args(["serve", "--listen", "127.0.0.1:0", "--wasm-max-instances", "65536"])
        .arg("--data-dir")
        .arg(data.path().join("data"))
        .arg("--functions-dir")
        .arg(data.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("WASM_MAX_INSTANCES"), "{stderr}");
}
