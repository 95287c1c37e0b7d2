//! Inside the sandbox (design/reliability.md 10, 13, 15, 17, 19, 20), for
//! every language of the process backend: what a misbehaving function can do
//! to its instance, to other functions and to the controller.
//!
//! Each test registers a "probe" function through the API: one handler per
//! language whose `params.mode` picks the misbehaviour.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{Reply, TestApp, eventually, spawn_app, spawn_binary};

/// The languages every test runs against.
const LANGUAGES: [&str; 2] = ["nodejs", "python"];

const NODE_PROBE: &str = r#"'use strict';
const fs = require('fs');
const path = require('path');
const { spawn } = require('child_process');

let runs = 0;

module.exports.handler = async (params, context) => {
  runs += 1;
  switch (params.mode) {
    case 'whoami':
      return { pid: process.pid, uid: process.getuid(), cwd: process.cwd(), runs };
    case 'loop':
      for (;;) {}
    case 'hang':
      return new Promise(() => {});
    case 'spawn': {
      const child = spawn('sleep', [params.marker], { stdio: 'ignore' });
      return { pid: child.pid };
    }
    case 'bomb': {
      const hog = [];
      for (;;) hog.push(new Array(1 << 20).fill(runs + 0.5));
    }
    case 'flood': {
      const line = 'x'.repeat(1023) + '\n';
      const n = params.mb * 1024;
      for (let i = 0; i < n; i++) process.stdout.write(line);
      return { lines: n };
    }
    case 'big':
      return 'x'.repeat(params.bytes);
    case 'env':
      return { env: { ...process.env } };
    case 'read': {
      const out = {};
      for (const p of params.paths) {
        try {
          fs.readFileSync(p);
          out[p] = 'read';
        } catch (e) {
          out[p] = e.code;
        }
      }
      return out;
    }
    case 'exit':
      process.exit(1);
    case 'write_tmp': {
      const file = path.join(process.env.TMPDIR, params.name);
      fs.writeFileSync(file, params.text);
      return { path: file };
    }
    case 'state':
      return { runs, files: fs.readdirSync(process.env.TMPDIR).sort() };
    case 'write':
      fs.writeFileSync(params.path, params.text);
      return { path: params.path };
    case 'kill':
      try {
        process.kill(params.pid, 'SIGKILL');
        return { killed: 'yes' };
      } catch (e) {
        return { killed: e.code };
      }
    case 'throw':
      throw new TypeError('probe failed on purpose');
    default:
      return { ok: true };
  }
};
"#;

const PYTHON_PROBE: &str = r#"import asyncio
import errno
import os
import subprocess
import sys

_runs = 0


async def _hang():
    await asyncio.get_running_loop().create_future()


def handler(params, context):
    global _runs
    _runs += 1
    mode = params.get("mode")
    if mode == "whoami":
        return {"pid": os.getpid(), "uid": os.getuid(), "cwd": os.getcwd(), "runs": _runs}
    if mode == "loop":
        while True:
            pass
    if mode == "hang":
        return _hang()
    if mode == "spawn":
        child = subprocess.Popen(["sleep", params["marker"]], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return {"pid": child.pid}
    if mode == "bomb":
        hog = []
        while True:
            hog.append(bytearray(8 << 20))
    if mode == "flood":
        line = "x" * 1023 + "\n"
        n = params["mb"] * 1024
        for _ in range(n):
            sys.stdout.write(line)
        sys.stdout.flush()
        return {"lines": n}
    if mode == "big":
        return "x" * params["bytes"]
    if mode == "env":
        return {"env": dict(os.environ)}
    if mode == "read":
        out = {}
        for p in params["paths"]:
            try:
                with open(p, "rb") as f:
                    f.read()
                out[p] = "read"
            except OSError as e:
                out[p] = errno.errorcode.get(e.errno, str(e.errno))
        return out
    if mode == "exit":
        os._exit(1)
    if mode == "write_tmp":
        file = os.path.join(os.environ["TMPDIR"], params["name"])
        with open(file, "w") as f:
            f.write(params["text"])
        return {"path": file}
    if mode == "state":
        return {"runs": _runs, "files": sorted(os.listdir(os.environ["TMPDIR"]))}
    if mode == "write":
        with open(params["path"], "w") as f:
            f.write(params["text"])
        return {"path": params["path"]}
    if mode == "kill":
        try:
            os.kill(params["pid"], 9)
            return {"killed": "yes"}
        except OSError as e:
            return {"killed": errno.errorcode.get(e.errno, str(e.errno))}
    if mode == "throw":
        raise TypeError("probe failed on purpose")
    return {"ok": True}
"#;

fn probe(language: &str) -> &'static str {
    match language {
        "nodejs" => NODE_PROBE,
        "python" => PYTHON_PROBE,
        other => panic!("no probe for {other}"),
    }
}

/// Registers the probe as `{language}-{title}` with `extra` manifest fields.
async fn register_probe(app: &TestApp, language: &str, title: &str, extra: Value) -> String {
    let lt = format!("{language}-{title}");
    app.register(&lt, probe(language), extra).await;
    lt
}

/// Executes without the cache, so every call really runs the function.
async fn run(app: &TestApp, token: &str, id: &str, params: Value) -> Reply {
    app.execute_with(token, id, json!({ "params": params }), Some("no-cache"))
        .await
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start()).unwrap_or_default();
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

/// Live processes whose command line contains `needle`.
pub(crate) fn processes_with_cmdline(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for pid in crate::helpers::pids() {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && alive(pid.into()) {
            out.push(pid);
        }
    }
    out
}

/// A process as the host sees it: its pid and start time (which tell it
/// apart from a later process given the same pid).
pub(crate) type HostProcess = (u32, u64);

/// The live processes (on the host, whatever namespace they run in) whose
/// real uid is `uid`.
pub(crate) fn processes_of_uid(uid: u64) -> Vec<HostProcess> {
    let mut out = Vec::new();
    for pid in crate::helpers::pids() {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let real_uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok());
        if real_uid == Some(uid)
            && alive(pid.into())
            && let Some(start) = start_time(pid)
        {
            out.push((pid, start));
        }
    }
    out
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22, counted from the state (field 3) after the command's ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Whether any of `processes` still runs.
fn any_running(processes: &[HostProcess]) -> bool {
    processes
        .iter()
        .any(|&(pid, start)| alive(pid.into()) && start_time(pid) == Some(start))
}

/// The host directory of the instance running as `uid` (root's, in the
/// uid's group once its runtime is up).
fn instance_dir_of_uid(app: &TestApp, uid: u64) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(app.data_dir.path().join("instances"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.metadata().is_ok_and(|m| u64::from(m.gid()) == uid))
}

/// The controller's resident memory, in KiB.
pub(crate) fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// `work`'s output, and the highest resident memory (KiB) of process `pid`
/// sampled while it ran.
pub(crate) async fn peak_rss_during<T>(pid: u32, work: impl std::future::Future<Output = T>) -> (T, u64) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn({
        let done = done.clone();
        async move {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(vm_rss_kib(pid));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak
        }
    });
    let output = work.await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    (output, sampler.await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_infinite_loop_times_out_within_a_second_of_its_deadline_and_its_instance_is_removed() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in LANGUAGES {
        // Arrange: a retained session, so its instance can be identified first.
        let lt = register_probe(&app, language, "loop", json!({})).await;
        let id = app
            .session(&token, &lt, json!({"timeout_ms": 500, "retain_session": true}))
            .await;
        let who = run(&app, &token, &id, json!({"mode": "whoami"})).await;
        assert_eq!(who.status, 200, "{lt}: {:?}", who.body);
        let uid = who.body["result"]["uid"].as_u64().unwrap();
        let processes = processes_of_uid(uid);
        assert!(
            !processes.is_empty(),
            "{lt}: the instance should be running as uid {uid}"
        );
        let dir = instance_dir_of_uid(&app, uid).expect("the instance's directory");

        // Act
        let started = Instant::now();
        let r = run(&app, &token, &id, json!({"mode": "loop"})).await;
        let elapsed = started.elapsed();

        // Assert: 504 between the deadline and deadline + 1 s (+ slack for the test's own HTTP).
        assert_eq!(r.status, 504, "{lt}: {:?}", r.body);
        assert_eq!(r.code(), "TIMEOUT");
        assert_eq!(r.body["request_id"], id.as_str());
        assert_eq!(r.body["error"]["details"]["timeout_ms"], 500);
        assert!(
            elapsed >= Duration::from_millis(500),
            "{lt}: answered before the deadline: {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_millis(2000),
            "{lt}: answered too late: {elapsed:?}"
        );
        // The killed instance is gone: every process it ran, and its directory.
        let gone = eventually(Duration::from_secs(5), || !any_running(&processes) && !dir.exists()).await;
        assert!(gone, "{lt}: the instance (uid {uid}) survived its timeout");
        // A new session works.
        let fresh = app.session(&token, &lt, json!({"timeout_ms": 500})).await;
        let ok = run(&app, &token, &fresh, json!({})).await;
        assert_eq!(ok.status, 200, "{lt}: {:?}", ok.body);
        assert_eq!(ok.body["result"], json!({"ok": true}));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_async_handler_that_never_settles_times_out_too() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in LANGUAGES {
        let lt = register_probe(&app, language, "hang", json!({})).await;
        let id = app.session(&token, &lt, json!({"timeout_ms": 500})).await;

        let started = Instant::now();
        let r = run(&app, &token, &id, json!({"mode": "hang"})).await;
        let elapsed = started.elapsed();

        assert_eq!(r.status, 504, "{lt}: {:?}", r.body);
        assert_eq!(r.code(), "TIMEOUT");
        assert!(elapsed >= Duration::from_millis(500), "{lt}: {elapsed:?}");
        assert!(elapsed < Duration::from_millis(2000), "{lt}: {elapsed:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_process_the_function_spawned_is_killed_with_its_instance_on_timeout() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in LANGUAGES {
        // Arrange: the function starts `sleep <marker>` and returns while it runs.
        let lt = register_probe(&app, language, "spawner", json!({})).await;
        let id = app
            .session(&token, &lt, json!({"timeout_ms": 500, "retain_session": true}))
            .await;
        let marker = format!("{}.{}", 3000 + rand_digits() % 1000, rand_digits());
        let spawned = run(&app, &token, &id, json!({"mode": "spawn", "marker": marker})).await;
        assert_eq!(spawned.status, 200, "{lt}: {:?}", spawned.body);
        let needle = format!("sleep {marker}");
        assert!(
            eventually(Duration::from_secs(5), || !processes_with_cmdline(&needle).is_empty()).await,
            "{lt}: the child never started"
        );

        // Act: the next execution times out; the instance is killed.
        let r = run(&app, &token, &id, json!({"mode": "loop"})).await;
        assert_eq!(r.status, 504, "{lt}: {:?}", r.body);

        // Assert: the whole process group went with it.
        let gone = eventually(Duration::from_secs(5), || processes_with_cmdline(&needle).is_empty()).await;
        assert!(gone, "{lt}: the child ({needle}) survived its instance");
    }
}

fn rand_digits() -> u64 {
    u64::from(uuid::Uuid::new_v4().as_fields().0) % 1_000_000
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_bomb_is_a_clean_runtime_error_five_times_in_a_row() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in LANGUAGES {
        let lt = register_probe(&app, language, "bomb", json!({"limits": {"memory_mb": 64}})).await;
        for attempt in 1..=5 {
            // Act
            let id = app.session(&token, &lt, json!({"timeout_ms": 20000})).await;
            let r = run(&app, &token, &id, json!({"mode": "bomb"})).await;

            // Assert: every time the same clean error for that execution only.
            assert_eq!(r.status, 500, "{lt} attempt {attempt}: {:?}", r.body);
            assert_eq!(r.code(), "RUNTIME_ERROR", "{lt} attempt {attempt}");
            assert_eq!(r.body["request_id"], id.as_str());
            let message = r.body["error"]["message"].as_str().unwrap().to_lowercase();
            assert!(message.contains("memory"), "{lt} attempt {attempt}: {message}");
        }
        // The function still works within its limit afterwards.
        let id = app.session(&token, &lt, json!({})).await;
        let ok = run(&app, &token, &id, json!({})).await;
        assert_eq!(ok.status, 200, "{lt}: {:?}", ok.body);
    }
    // And so does everybody else.
    let id = app.session(&token, "nodejs-calculator", json!({})).await;
    let r = app
        .execute(&token, &id, json!({"operation": "add", "values": [2, 2]}))
        .await;
    assert_eq!(r.body["result"]["value"], 4, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stdout_flood_is_answered_and_the_controller_memory_stays_bounded() {
    let app = spawn_binary();
    let token = app.admin();
    let controller = app.controller_pid();
    for language in LANGUAGES {
        // Arrange: sample the controller's memory while the function floods its stdout.
        let lt = register_probe(&app, language, "flood", json!({})).await;
        let id = app.session(&token, &lt, json!({})).await;
        // Act: 50 MiB of output.
        let (r, peak_kib) =
            peak_rss_during(controller, run(&app, &token, &id, json!({"mode": "flood", "mb": 50}))).await;

        // Assert
        assert_eq!(r.status, 200, "{lt}: {:?}", r.body);
        assert_eq!(r.body["result"]["lines"], 50 * 1024);
        assert!(peak_kib < 300 * 1024, "{lt}: controller VmRSS reached {peak_kib} KiB");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_result_is_refused_at_the_limit_and_the_next_execution_works() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in LANGUAGES {
        let lt = register_probe(&app, language, "big", json!({})).await;
        let id = app.session(&token, &lt, json!({"retain_session": true})).await;

        // Act: 5 MiB against the default --max-result-bytes of 1 MiB.
        let r = run(&app, &token, &id, json!({"mode": "big", "bytes": 5 * 1024 * 1024})).await;

        // Assert
        assert_eq!(r.status, 500, "{lt}: {:?}", r.body);
        assert_eq!(r.code(), "RUNTIME_ERROR");
        assert_eq!(r.body["request_id"], id.as_str());
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("1048576"), "{lt}: the limit is not named: {message}");
        assert_eq!(r.body["error"]["details"]["limit_bytes"], 1048576);
        // The same session carries on (with a new instance), and a result under the limit passes.
        let small = run(&app, &token, &id, json!({"mode": "big", "bytes": 1000})).await;
        assert_eq!(small.status, 200, "{lt}: {:?}", small.body);
        assert_eq!(small.body["result"].as_str().unwrap().len(), 1000);
        let other = app.session(&token, &lt, json!({})).await;
        let ok = run(&app, &token, &other, json!({})).await;
        assert_eq!(ok.status, 200, "{lt}: {:?}", ok.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_function_sees_only_its_manifest_environment_and_the_runtime_basics() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in LANGUAGES {
        // Arrange
        let lt = register_probe(&app, language, "env", json!({"env": {"GREETING": "hi"}})).await;
        let id = app.session(&token, &lt, json!({"retain_session": true})).await;

        // Act
        let r = run(&app, &token, &id, json!({"mode": "env"})).await;
        let who = run(&app, &token, &id, json!({"mode": "whoami"})).await;

        // Assert
        assert_eq!(r.status, 200, "{lt}: {:?}", r.body);
        let env = r.body["result"]["env"].as_object().unwrap();
        let mut names: Vec<&str> = env.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["GREETING", "HOME", "LANG", "PATH", "TMPDIR"], "{lt}: {env:?}");
        assert_eq!(env["GREETING"], "hi");
        let home = who.body["result"]["cwd"].as_str().unwrap();
        assert_eq!(env["HOME"], home, "{lt}: HOME is the instance's directory");
        // As root, the instance's tmp/ is mounted over /tmp; otherwise TMPDIR points at it.
        let tmpdir = env["TMPDIR"].as_str().unwrap();
        assert!(
            tmpdir == "/tmp" || tmpdir == format!("{home}/tmp"),
            "{lt}: TMPDIR {tmpdir}"
        );
        let all = serde_json::to_string(env).unwrap();
        assert!(!all.contains(crate::helpers::SECRET), "{lt}: the JWT secret leaked");
        assert!(!all.contains("JWT_SECRET") && !all.contains("RUST_LOG"), "{lt}: {all}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_function_cannot_read_the_environment_or_files_of_the_controller() {
    let app = spawn_app().await;
    let token = app.admin();
    // The harness passes JWT_SECRET, so the controller wrote no jwt-secret
    // file; put one where it would be, with the mode it would have.
    let secret_file = app.data_dir.path().join("jwt-secret");
    std::fs::write(&secret_file, crate::helpers::SECRET).unwrap();
    std::fs::set_permissions(&secret_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let paths = [
        "/proc/1/environ".to_owned(),
        format!("/proc/{}/environ", app.server_pid()),
        app.data_dir.path().join("controller.db").display().to_string(),
        secret_file.display().to_string(),
    ];
    for language in LANGUAGES {
        let lt = register_probe(&app, language, "snoop", json!({})).await;
        let id = app.session(&token, &lt, json!({})).await;

        // Act
        let r = run(&app, &token, &id, json!({"mode": "read", "paths": paths})).await;

        // Assert: every read is refused: for lack of permission, or because
        // the file is not there at all inside the sandbox.
        assert_eq!(r.status, 200, "{lt}: {:?}", r.body);
        for path in &paths {
            let outcome = r.body["result"][path].as_str().unwrap_or_default();
            assert!(
                ["EACCES", "EPERM", "ENOENT"].contains(&outcome),
                "{lt}: reading {path} gave {outcome:?}, expected a refusal"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_exits_mid_execution_is_a_runtime_error_and_the_next_session_works() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in LANGUAGES {
        let lt = register_probe(&app, language, "quitter", json!({})).await;
        let id = app.session(&token, &lt, json!({})).await;

        // Act
        let r = run(&app, &token, &id, json!({"mode": "exit"})).await;

        // Assert
        assert_eq!(r.status, 500, "{lt}: {:?}", r.body);
        assert_eq!(r.code(), "RUNTIME_ERROR");
        assert_eq!(r.body["request_id"], id.as_str());
        assert!(r.body["error"]["message"].is_string());
        let next = app.session(&token, &lt, json!({})).await;
        let ok = run(&app, &token, &next, json!({})).await;
        assert_eq!(ok.status, 200, "{lt}: {:?}", ok.body);
        assert_eq!(ok.body["result"], json!({"ok": true}));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_in_one_functions_tmpdir_is_invisible_to_another_function() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in LANGUAGES {
        // Arrange: A writes into its TMPDIR and keeps its instance.
        let a = register_probe(&app, language, "writer", json!({})).await;
        let b = register_probe(&app, language, "reader", json!({})).await;
        let a_id = app.session(&token, &a, json!({"retain_session": true})).await;
        let wrote = run(
            &app,
            &token,
            &a_id,
            json!({"mode": "write_tmp", "name": "left-by-a", "text": "secret"}),
        )
        .await;
        assert_eq!(wrote.status, 200, "{a}: {:?}", wrote.body);
        let a_state = run(&app, &token, &a_id, json!({"mode": "state"})).await;
        assert_eq!(
            a_state.body["result"]["files"],
            json!(["left-by-a"]),
            "{a}: the write did not land"
        );

        // Act: B looks at its own TMPDIR.
        let b_id = app.session(&token, &b, json!({})).await;
        let b_state = run(&app, &token, &b_id, json!({"mode": "state"})).await;

        // Assert
        assert_eq!(b_state.status, 200, "{b}: {:?}", b_state.body);
        assert_eq!(b_state.body["result"]["files"], json!([]), "{b} sees {a}'s files");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn state_left_by_version_1_is_invisible_to_version_2() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in LANGUAGES {
        // Arrange: version 1 leaves a file and module state behind in its
        // (pooled, idle) instance; a second v1 session shows that state is there.
        let lt = register_probe(&app, language, "versioned", json!({})).await;
        let first = app.session(&token, &lt, json!({})).await;
        let wrote = run(
            &app,
            &token,
            &first,
            json!({"mode": "write_tmp", "name": "left-by-v1", "text": "v1"}),
        )
        .await;
        assert_eq!(wrote.status, 200, "{lt}: {:?}", wrote.body);
        let again = app.session(&token, &lt, json!({})).await;
        let v1 = run(&app, &token, &again, json!({"mode": "state"})).await;
        assert_eq!(
            v1.body["result"],
            json!({"runs": 2, "files": ["left-by-v1"]}),
            "{lt}: control: v1 reuses its instance"
        );

        // Act: register version 2 and run it.
        let comment = if language == "python" { "# v2" } else { "// v2" };
        let updated = crate::functions::put_function(
            &app,
            &app.admin(),
            &lt,
            json!({
                "description": "version 2",
                "code": format!("{}\n{comment}\n", probe(language)),
            }),
        )
        .await;
        assert_eq!(updated.status, 200, "{lt}: {:?}", updated.body);
        let v2_id = app.session(&token, &lt, json!({})).await;
        let v2 = run(&app, &token, &v2_id, json!({"mode": "state"})).await;

        // Assert: a fresh module and an empty TMPDIR.
        assert_eq!(v2.status, 200, "{lt}: {:?}", v2.body);
        assert_eq!(
            v2.body["result"],
            json!({"runs": 1, "files": []}),
            "{lt}: v1 state leaked into v2"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_function_that_throws_is_a_runtime_error_with_its_line_and_stack() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in LANGUAGES {
        let lt = register_probe(&app, language, "thrower", json!({})).await;
        let id = app.session(&token, &lt, json!({})).await;

        let r = run(&app, &token, &id, json!({"mode": "throw"})).await;

        assert_eq!(r.status, 500, "{lt}: {:?}", r.body);
        assert_eq!(r.code(), "RUNTIME_ERROR");
        assert_eq!(r.body["request_id"], id.as_str());
        assert_eq!(r.body["error"]["message"], "probe failed on purpose");
        let details = &r.body["error"]["details"];
        assert_eq!(details["type"], "TypeError", "{lt}: {details}");
        let expected_line = probe(language)
            .lines()
            .position(|l| l.contains("probe failed on purpose"))
            .unwrap()
            + 1;
        assert_eq!(details["line"], expected_line, "{lt}: {details}");
        let stack = details["stack_trace"].as_str().unwrap();
        assert!(
            !stack.contains(app.data_dir.path().to_str().unwrap()),
            "{lt}: host path leaked: {stack}"
        );
    }
}

/// Removes a file on drop (the test runs as root; the file was made by `nobody`).
struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_in_tmp_of_one_function_is_invisible_to_another_function() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in LANGUAGES {
        // Arrange: A writes a file in /tmp.
        let a = register_probe(&app, language, "tmp-writer", json!({})).await;
        let b = register_probe(&app, language, "tmp-reader", json!({})).await;
        let path = format!("/tmp/fnrt-left-by-a-{}", uuid::Uuid::new_v4());
        let _cleanup = RemoveOnDrop(path.clone());
        let a_id = app.session(&token, &a, json!({})).await;
        let wrote = run(
            &app,
            &token,
            &a_id,
            json!({"mode": "write", "path": path, "text": "secret"}),
        )
        .await;
        assert_eq!(wrote.status, 200, "{a}: {:?}", wrote.body);

        // Act
        let b_id = app.session(&token, &b, json!({})).await;
        let r = run(&app, &token, &b_id, json!({"mode": "read", "paths": [path]})).await;

        // Assert
        assert_eq!(r.status, 200, "{b}: {:?}", r.body);
        assert_ne!(r.body["result"][&path], "read", "{b} read {a}'s /tmp file");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_function_cannot_reach_another_functions_instance() {
    let app = spawn_app().await;
    let token = app.admin();
    for language in LANGUAGES {
        // Arrange: A keeps its instance, with a file in its TMPDIR.
        let a = register_probe(&app, language, "victim", json!({})).await;
        let b = register_probe(&app, language, "intruder", json!({})).await;
        let a_id = app.session(&token, &a, json!({"retain_session": true})).await;
        let wrote = run(
            &app,
            &token,
            &a_id,
            json!({"mode": "write_tmp", "name": "private", "text": "secret"}),
        )
        .await;
        let a_file = wrote.body["result"]["path"].as_str().unwrap().to_owned();
        let who = run(&app, &token, &a_id, json!({"mode": "whoami"})).await;
        let a_uid = who.body["result"]["uid"].as_u64().unwrap();
        // A's runtime as the host numbers it (inside, its PID namespace numbers it anew).
        let a_processes = processes_of_uid(a_uid);
        assert_eq!(a_processes.len(), 1, "{a}: {a_processes:?}");
        let a_pid = a_processes[0].0;

        // Act: B (told A's pid) reads and signals A.
        let b_id = app.session(&token, &b, json!({"retain_session": true})).await;
        let via_proc = format!("/proc/{a_pid}/cwd/tmp/private");
        let read = run(
            &app,
            &token,
            &b_id,
            json!({"mode": "read", "paths": [a_file, via_proc]}),
        )
        .await;
        let kill = run(&app, &token, &b_id, json!({"mode": "kill", "pid": a_pid})).await;

        // Assert
        assert_eq!(read.status, 200, "{b}: {:?}", read.body);
        for (path, outcome) in read.body["result"].as_object().unwrap() {
            assert_ne!(outcome, "read", "{b} read {a}'s file {path}");
        }
        assert_ne!(kill.body["result"]["killed"], "yes", "{b} killed {a}'s instance");
        let state = run(&app, &token, &a_id, json!({"mode": "state"})).await;
        assert_eq!(
            state.body["result"]["files"],
            json!(["private"]),
            "{a} lost its state: {:?}",
            state.body
        );
    }
}
