//! The docker backend through the API, against the engine at `DOCKER_HOST`
//! (Podman here; `.ci/run` starts it and builds the images with
//! `runtimes/images.sh`): Node, Python and Rust functions placed on it,
//! retained sessions, logs, the walls of a container attacked from inside
//! a function, a container killed or out of memory mid-execution, an engine
//! that does not answer, and no container left after shutdown.
//!
//! Without an engine these tests say so and pass, unless `CI=true`, where
//! they fail: run them with `DOCKER_HOST=unix:///run/podman/podman.sock`
//! and the images built (docs/containers.md).

use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::KillContainerOptionsBuilder;
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app_with};

/// The engine's socket, when one answers.
fn engine() -> Option<String> {
    let host = std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| h.starts_with("unix://"))
        .unwrap_or_else(|| "unix:///run/podman/podman.sock".into());
    let path = host.trim_start_matches("unix://").to_owned();
    match std::os::unix::net::UnixStream::connect(&path) {
        Ok(_) => Some(host),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("no container engine at {host} ({e}): .ci/run starts Podman's API service")
        }
        Err(e) => {
            eprintln!(
                "skipped: no container engine at {host} ({e}); start one (docs/containers.md) and set DOCKER_HOST"
            );
            None
        }
    }
}

/// A controller whose `placement` runs on the docker backend at `host`.
async fn app_on(host: &str, placement: &str, extra: &[&str]) -> TestApp {
    let mut flags = vec!["--docker-host", host, "--placement", placement];
    flags.extend_from_slice(extra);
    spawn_app_with(&flags).await
}

fn docker(host: &str) -> Docker {
    Docker::connect_with_unix(host.trim_start_matches("unix://"), 30, bollard::API_DEFAULT_VERSION).unwrap()
}

/// The ids of the containers of `app`'s controller.
async fn containers_of(host: &str, app: &TestApp) -> Vec<String> {
    let controller = fnrt_backends::docker::controller_id(app.data_dir.path());
    fnrt_backends::docker::container_ids(host, &controller).await.unwrap()
}

/// Stops the controller; then none of its containers may be left (and
/// any that are, are removed, so a failure leaves nothing behind).
async fn stop_leaving_nothing(host: &str, mut app: TestApp) {
    app.stop().await;
    let left = containers_of(host, &app).await;
    for id in &left {
        let options = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
            .force(true)
            .build();
        let _ = docker(host).remove_container(id, Some(options)).await;
    }
    assert_eq!(left, Vec::<String>::new(), "containers left after shutdown");
}

/// Kills a container's process with SIGKILL, as the kernel's OOM killer or
/// a crash would.
async fn kill(host: &str, id: &str) {
    docker(host)
        .kill_container(id, Some(KillContainerOptionsBuilder::default().signal("KILL").build()))
        .await
        .unwrap();
}

async fn run(app: &TestApp, token: &str, lt: &str, context: Value, params: Value) -> crate::helpers::Reply {
    let id = app.session(token, lt, context).await;
    app.execute(token, &id, params).await
}

#[tokio::test(flavor = "multi_thread")]
async fn node_and_python_functions_run_in_containers_keep_session_state_and_log() {
    let Some(host) = engine() else { return };
    let app = app_on(&host, "nodejs=docker,python=docker", &[]).await;
    let token = app.admin();

    // The bundled calculators answer from containers.
    for lt in ["nodejs-calculator", "python-calculator"] {
        let r = run(
            &app,
            &token,
            lt,
            json!({}),
            json!({"operation": "add", "values": [1, 2, 3]}),
        )
        .await;
        assert_eq!(r.body["result"], json!({"value": 6}), "{lt}: {:?}", r.body);
    }
    assert!(!containers_of(&host, &app).await.is_empty());

    // A retained session keeps its container's state.
    let id = app
        .session(&token, "nodejs-counter", json!({"retain_session": true}))
        .await;
    let first = app
        .execute_with(&token, &id, json!({"params": {}}), Some("no-cache"))
        .await;
    let second = app
        .execute_with(&token, &id, json!({"params": {}}), Some("no-cache"))
        .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_ne!(
        first.body["result"], second.body["result"],
        "state did not survive: {:?}",
        second.body
    );

    // What the function prints is the execution's logs.
    app.register(
        "python-says",
        "def handler(params, context):\n    print('from a container', params['n'])\n    return {}\n",
        json!({"cache": {"enabled": false}}),
    )
    .await;
    let r = run(&app, &token, "python-says", json!({}), json!({"n": 5})).await;
    let logs = app
        .get(
            Some(&token),
            &format!("/api/v1/executions/{}/logs", r.body["execution_id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(logs.body["lines"][0]["text"], "from a container 5", "{:?}", logs.body);

    // /health shows the backend and its pool; /metrics its containers.
    // The engine's ping has 2 s: on a loaded machine one may be late.
    let mut health = app.get(None, "/health").await;
    for _ in 0..10 {
        if health.body["components"]["docker"] == "ok" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        health = app.get(None, "/health").await;
    }
    assert_eq!(health.body["components"]["docker"], "ok", "{:?}", health.body);
    let pool = &health.body["components"]["docker_pool"];
    assert!(
        pool["nodejs"]["warm"].is_i64() && pool["python"]["idle"].is_i64(),
        "{pool}"
    );
    let metrics = app.metrics().await;
    for family in [
        r#"lambda_instance_start_seconds_count{backend="docker",language="nodejs"}"#,
        r#"lambda_pool_acquires_total{backend="docker",language="python",result="#,
        r#"lambda_backend_instances{backend="docker",language="nodejs",state="warm"}"#,
    ] {
        assert!(metrics.contains(family), "{family} not in {metrics}");
    }
    stop_leaving_nothing(&host, app).await;
}

/// Probes what a function can reach from inside its container.
const PROBE: &str = r#"import os
import socket


def attempt(f):
    try:
        return f()
    except OSError as e:
        return type(e).__name__ + ":" + (os.strerror(e.errno) if e.errno else str(e))


def write(path):
    with open(path, "w") as f:
        f.write("x")
    return "written"


def connect(host, port):
    with socket.create_connection((host, port), timeout=2):
        return "connected"


def fill(path):
    written = 0
    chunk = b"x" * (1 << 20)
    try:
        with open(path, "wb") as f:
            for _ in range(512):
                f.write(chunk)
                f.flush()
                written += 1
    except OSError as e:
        return "ENOSPC" if e.errno == 28 else str(e)
    return f"wrote {written} MiB"


def status(field):
    with open("/proc/self/status") as f:
        return next(l.split(":", 1)[1].strip() for l in f if l.startswith(field + ":"))


def handler(params, context):
    port = params["port"]
    return {
        "uid": os.getuid(),
        "root_write": attempt(lambda: write("/usr/fnrt-was-here")),
        "etc_write": attempt(lambda: write("/etc/fnrt-was-here")),
        # Its directory on the host's disk, where nothing caps what is written.
        "runtime_dir_write": attempt(lambda: write("/run/runtime/fnrt-was-here")),
        "tmp": attempt(lambda: fill("/tmp/fill")),
        "controller": attempt(lambda: connect("127.0.0.1", port)),
        "outside": attempt(lambda: connect("1.1.1.1", 80)),
        "shadow": attempt(lambda: open("/etc/shadow").read()),
        "docker_socket": os.path.exists("/var/run/docker.sock") or os.path.exists("/run/podman/podman.sock"),
        "data_dir": os.path.exists(params["data_dir"]),
        "environ": sorted(os.environ),
        "caps": status("CapEff"),
        "no_new_privs": status("NoNewPrivs"),
        "seccomp": status("Seccomp"),
        "pid1": open("/proc/1/cmdline").read().split("\0")[0],
    }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_function_in_a_container_finds_every_wall_in_place() {
    let Some(host) = engine() else { return };
    let app = app_on(&host, "python=docker", &[]).await;
    app.register(
        "python-probe",
        PROBE,
        json!({"cache": {"enabled": false}, "env": {"GREETING": "hi"}}),
    )
    .await;
    let port: u16 = app
        .address
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let data_dir = app.data_dir.path().to_str().unwrap().to_owned();
    let r = run(
        &app,
        &app.admin(),
        "python-probe",
        json!({}),
        json!({"port": port, "data_dir": data_dir}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seen = &r.body["result"];
    assert_ne!(seen["uid"], 0, "{seen}");
    assert!(
        seen["root_write"].as_str().unwrap().starts_with("OSError:Read-only"),
        "{seen}"
    );
    assert!(seen["etc_write"].as_str().unwrap().contains("Read-only"), "{seen}");
    assert!(
        seen["runtime_dir_write"]
            .as_str()
            .unwrap()
            .contains("Permission denied"),
        "{seen}"
    );
    assert_eq!(seen["tmp"], "ENOSPC", "{seen}");
    assert!(seen["controller"].as_str().unwrap().contains("refused"), "{seen}");
    assert!(seen["outside"].as_str().unwrap().contains("unreachable"), "{seen}");
    assert!(seen["shadow"].as_str().unwrap().contains("No such file"), "{seen}");
    assert_eq!(seen["docker_socket"], false, "{seen}");
    assert_eq!(seen["data_dir"], false, "{seen}");
    assert_eq!(
        seen["environ"],
        json!(["GREETING", "HOME", "LANG", "PATH", "TMPDIR"]),
        "{seen}"
    );
    assert_eq!(seen["caps"], "0000000000000000", "{seen}");
    assert_eq!(seen["no_new_privs"], "1", "{seen}");
    // The engine's default system-call filter.
    assert_eq!(seen["seccomp"], "2", "{seen}");
    assert!(seen["pid1"].as_str().unwrap().contains("python"), "{seen}");
    stop_leaving_nothing(&host, app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fork_bomb_or_a_memory_bomb_stays_in_its_container_which_is_replaced() {
    let Some(host) = engine() else { return };
    let app = app_on(&host, "python=docker", &["--instance-max-processes", "32"]).await;
    let token = app.admin();
    app.register(
        "python-bombs",
        r#"import os


def handler(params, context):
    if params["bomb"] == "fork":
        children = 0
        try:
            for _ in range(200):
                if os.fork() == 0:
                    import time
                    time.sleep(30)
                    os._exit(0)
                children += 1
        except OSError as e:
            return {"children": children, "error": e.strerror}
        return {"children": children}
    hoard = []
    while True:
        hoard.append(bytearray(16 << 20))
"#,
        json!({"cache": {"enabled": false}, "limits": {"memory_mb": 96}}),
    )
    .await;

    let forked = run(&app, &token, "python-bombs", json!({}), json!({"bomb": "fork"})).await;
    assert_eq!(forked.status, 200, "{:?}", forked.body);
    let children = forked.body["result"]["children"].as_u64().unwrap();
    assert!(children < 32, "{:?}", forked.body);

    let bombed = run(&app, &token, "python-bombs", json!({}), json!({"bomb": "memory"})).await;
    assert_eq!(
        (bombed.status, bombed.code()),
        (500, "RUNTIME_ERROR"),
        "{:?}",
        bombed.body
    );
    let message = bombed.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("out of memory"), "{message}");
    assert!(
        app.metrics()
            .await
            .contains(r#"lambda_oom_kills_total{language="python"} 1"#)
    );

    // The next execution gets a healthy container.
    let after = run(
        &app,
        &token,
        "python-calculator",
        json!({}),
        json!({"operation": "add", "values": [2, 2]}),
    )
    .await;
    assert_eq!(after.body["result"], json!({"value": 4}), "{:?}", after.body);
    stop_leaving_nothing(&host, app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_killed_mid_execution_answers_a_clean_error_and_shutdown_leaves_none() {
    let Some(host) = engine() else { return };
    let app = app_on(&host, "nodejs=docker", &["--warm-pool-size", "0"]).await;
    let token = app.admin();
    app.register(
        "nodejs-sleeper",
        "exports.handler = async () => { await new Promise((r) => setTimeout(r, 60000)); return {}; };",
        json!({"cache": {"enabled": false}}),
    )
    .await;
    let id = app
        .session(&token, "nodejs-sleeper", json!({"timeout_ms": 90000}))
        .await;
    let url = app.url(&format!("/api/v1/execute/{id}"));
    let (client, t) = (app.client.clone(), token.clone());
    let pending = tokio::spawn(async move {
        crate::helpers::read(
            client
                .post(url)
                .bearer_auth(t)
                .json(&json!({"params": {}}))
                .send()
                .await
                .unwrap(),
        )
        .await
    });
    // The one container there is the sleeper's (no warm pool).
    let mut victims = Vec::new();
    for _ in 0..100 {
        victims = containers_of(&host, &app).await;
        if !victims.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(victims.len(), 1, "{victims:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(&host, &victims[0]).await;

    let r = pending.await.unwrap();
    assert_eq!((r.status, r.code()), (500, "RUNTIME_ERROR"), "{:?}", r.body);
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("exited"),
        "{:?}",
        r.body
    );

    // Another function still runs; after shutdown no container is left.
    let ok = run(
        &app,
        &token,
        "nodejs-calculator",
        json!({}),
        json!({"operation": "add", "values": [1]}),
    )
    .await;
    assert_eq!(ok.body["result"], json!({"value": 1}), "{:?}", ok.body);
    stop_leaving_nothing(&host, app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_engine_that_does_not_answer_makes_only_its_functions_unavailable() {
    let app = app_on("unix:///var/tmp/fnrt-no-engine.sock", "nodejs=docker", &[]).await;
    let token = app.admin();
    let r = app.initialize(&token, "nodejs-calculator", json!({})).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fnrt-no-engine.sock"),
        "{:?}",
        r.body
    );
    let other = run(
        &app,
        &token,
        "python-calculator",
        json!({}),
        json!({"operation": "add", "values": [3]}),
    )
    .await;
    assert_eq!(other.body["result"], json!({"value": 3}), "{:?}", other.body);
    let health = app.get(None, "/health").await;
    assert_eq!(health.body["status"], "degraded", "{:?}", health.body);
    assert_eq!(health.body["components"]["docker"], "error");
    assert!(
        health.body["components"]["docker_error"]
            .as_str()
            .unwrap()
            .contains("fnrt-no-engine.sock")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rust_function_s_library_runs_in_a_container() {
    let Some(host) = engine() else { return };
    let app = app_on(&host, "rust=docker", &[]).await;
    let token = app.admin();
    // The bundled crate builds in the background at start-up.
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let id = loop {
        let r = app.initialize(&token, "rust-fibonacci", json!({})).await;
        if r.status == 200 {
            break r.body["request_id"].as_str().unwrap().to_owned();
        }
        assert_eq!(r.code(), "FUNCTION_NOT_READY", "{:?}", r.body);
        assert!(std::time::Instant::now() < deadline, "rust-fibonacci was not built");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let r = app.execute(&token, &id, json!({"n": 10})).await;
    assert_eq!(r.body["result"]["value"], 55, "{:?}", r.body);
    assert!(!containers_of(&host, &app).await.is_empty());
    stop_leaving_nothing(&host, app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn floods_file_descriptors_and_scratch_stay_inside_one_container_and_one_function() {
    let Some(host) = engine() else { return };
    let app = app_on(&host, "python=docker", &["--log-limit-bytes", "4096"]).await;
    let token = app.admin();
    app.register(
        "python-noisy",
        r#"import os


def handler(params, context):
    seen = {"tmp_files": sorted(os.listdir("/tmp")), "environ_of_pid1": open("/proc/1/environ").read().split("\0")}
    if params.get("flood"):
        line = "y" * 1023
        for _ in range(50 * 1024):
            print(line)
        seen["flooded_mb"] = 50
    files = []
    try:
        for i in range(5000):
            files.append(open("/dev/null"))
    except OSError as e:
        seen["files_error"] = e.strerror
    seen["files"] = len(files)
    for f in files:
        f.close()
    with open("/tmp/left-by-noisy", "w") as f:
        f.write(params.get("secret", ""))
    return seen
"#,
        json!({"cache": {"enabled": false}}),
    )
    .await;
    app.register(
        "python-neighbour",
        "import os\n\ndef handler(params, context):\n    return {'tmp_files': sorted(os.listdir('/tmp'))}\n",
        json!({"cache": {"enabled": false}}),
    )
    .await;

    // A 50 MiB stdout flood: the answer is intact, the logs cut at the cap.
    let flooded = run(
        &app,
        &token,
        "python-noisy",
        json!({}),
        json!({"flood": true, "secret": "s"}),
    )
    .await;
    assert_eq!(flooded.status, 200, "{:?}", flooded.body);
    let seen = &flooded.body["result"];
    assert_eq!(seen["flooded_mb"], 50);
    // EMFILE inside the function.
    assert_eq!(seen["files_error"], "Too many open files", "{seen}");
    assert!(seen["files"].as_u64().unwrap() < 5000);
    // The runtime's own environment holds nothing of the controller's
    // (the engine adds TERM, HOSTNAME and `container`).
    for variable in seen["environ_of_pid1"].as_array().unwrap() {
        let name = variable.as_str().unwrap().split('=').next().unwrap();
        assert!(
            ["", "PATH", "HOME", "LANG", "TMPDIR", "TERM", "HOSTNAME", "container"].contains(&name),
            "{seen}"
        );
    }
    let logs = app
        .get(
            Some(&token),
            &format!(
                "/api/v1/executions/{}/logs",
                flooded.body["execution_id"].as_str().unwrap()
            ),
        )
        .await;
    assert_eq!(logs.body["truncated"], true, "{:?}", logs.body);

    // What it left in /tmp is not another function's to see.
    let neighbour = run(&app, &token, "python-neighbour", json!({}), json!({})).await;
    assert_eq!(neighbour.body["result"]["tmp_files"], json!([]), "{:?}", neighbour.body);
    stop_leaving_nothing(&host, app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn five_memory_bombs_in_a_row_each_answer_out_of_memory() {
    let Some(host) = engine() else { return };
    let app = app_on(&host, "nodejs=docker", &[]).await;
    let token = app.admin();
    app.register(
        "nodejs-hoarder",
        "exports.handler = async () => { const h = []; for (;;) h.push(Buffer.alloc(8 << 20, 1)); };",
        json!({"cache": {"enabled": false}, "limits": {"memory_mb": 128}}),
    )
    .await;
    for round in 0..5 {
        let r = run(&app, &token, "nodejs-hoarder", json!({}), json!({})).await;
        assert_eq!(
            (r.status, r.code()),
            (500, "RUNTIME_ERROR"),
            "round {round}: {:?}",
            r.body
        );
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("out of memory"), "round {round}: {message}");
    }
    stop_leaving_nothing(&host, app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_finishes_what_runs_and_leaves_no_container() {
    let Some(host) = engine() else { return };
    let app = crate::helpers::spawn_binary_with(&["--docker-host", &host, "--placement", "nodejs=docker"]);
    app.register(
        "nodejs-slowish",
        "exports.handler = async (p) => { await new Promise((r) => setTimeout(r, 1500)); return {n: p.n}; };",
        json!({"cache": {"enabled": false}}),
    )
    .await;
    let token = app.admin();
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(app.session(&token, "nodejs-slowish", json!({})).await);
    }
    let runs = futures::future::join_all(
        sessions
            .iter()
            .enumerate()
            .map(|(n, id)| app.execute(&token, id, json!({"n": n}))),
    );
    let stop = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(app.controller_pid() as i32).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
    };
    let (answers, ()) = tokio::join!(runs, stop);
    for (n, r) in answers.iter().enumerate() {
        assert_eq!(r.body["result"], json!({"n": n}), "{:?}", r.body);
    }
    let mut app = app;
    let status = app
        .wait_for_exit(Duration::from_secs(30))
        .expect("the controller exits");
    assert!(status.success(), "exit status {status}");
    assert_eq!(containers_of(&host, &app).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_a_crashed_controller_left_are_removed_at_the_next_start_whatever_their_state() {
    let Some(host) = engine() else { return };
    let flags = ["--docker-host", host.as_str(), "--placement", "nodejs=docker"];
    let mut app = crate::helpers::spawn_binary_with(&flags);
    let token = app.admin();
    for _ in 0..2 {
        let id = app
            .session(&token, "nodejs-counter", json!({"retain_session": true}))
            .await;
        let r = app.execute(&token, &id, json!({})).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let left = containers_of(&host, &app).await;
    assert!(left.len() >= 2, "{left:?}");

    // A crash: nothing of the shutdown runs, and the containers stay. One
    // of them ends too, so the next start finds one running and one that
    // has exited.
    app.kill_hard();
    assert_eq!(containers_of(&host, &app).await.len(), left.len());
    kill(&host, &left[0]).await;

    let app = app
        .restart_with(&[&flags[..], &["--warm-pool-size", "0"]].concat())
        .await;
    let now = containers_of(&host, &app).await;
    assert!(
        left.iter().all(|id| !now.contains(id)),
        "left by the crashed run: {left:?}; there now: {now:?}"
    );
    let r = run(
        &app,
        &token,
        "nodejs-calculator",
        json!({}),
        json!({"operation": "add", "values": [2]}),
    )
    .await;
    assert_eq!(r.body["result"], json!({"value": 2}), "{:?}", r.body);
    stop_leaving_nothing(&host, app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_larger_than_the_container_cap_waits_for_a_container_and_never_fails() {
    let Some(host) = engine() else { return };
    let app = app_on(
        &host,
        "nodejs=docker",
        &["--docker-max-containers", "2", "--warm-pool-size", "0"],
    )
    .await;
    app.register(
        "nodejs-busy",
        "exports.handler = async (p) => { await new Promise((r) => setTimeout(r, 700)); return {n: p.n}; };",
        json!({"cache": {"enabled": false}}),
    )
    .await;
    let token = app.admin();
    let mut sessions = Vec::new();
    for _ in 0..5 {
        // Initialize readies an instance: with two containers at most, the
        // later ones wait until an earlier one is idle, then reuse it.
        sessions.push(app.session(&token, "nodejs-busy", json!({})).await);
    }
    let answers = futures::future::join_all(
        sessions
            .iter()
            .enumerate()
            .map(|(n, id)| app.execute(&token, id, json!({"n": n}))),
    )
    .await;
    for (n, r) in answers.iter().enumerate() {
        assert_eq!(r.body["result"], json!({"n": n}), "{:?}", r.body);
    }
    assert!(containers_of(&host, &app).await.len() <= 2);
    stop_leaving_nothing(&host, app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_reaches_what_its_manifest_lists_and_nothing_else() {
    let Some(host) = engine() else { return };
    let app = app_on(&host, "python=docker", &[]).await;
    crate::egress::reaches_only_what_it_lists(&app).await;
    stop_leaving_nothing(&host, app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_image_stops_the_start_naming_it_and_how_to_build_it() {
    let Some(host) = engine() else { return };
    let says = crate::helpers::start_error(&[
        "--docker-host",
        &host,
        "--placement",
        "python=docker",
        "--docker-image",
        "fnrt-nothing-{language}:0",
    ])
    .await;
    assert!(says.contains("fnrt-nothing-python:0"), "{says}");
    assert!(says.contains("runtimes/images.sh"), "{says}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_loop_is_stopped_at_its_deadline_and_a_new_version_starts_clean() {
    let Some(host) = engine() else { return };
    let app = app_on(&host, "nodejs=docker", &[]).await;
    let token = app.admin();
    let v1 = r#"const fs = require("fs");
exports.handler = async (p) => {
  if (p.spin) for (;;) {}
  const seen = fs.readdirSync("/tmp");
  fs.writeFileSync("/tmp/v1-was-here", "secret");
  return { seen };
};"#;
    app.register("nodejs-spinner", v1, json!({"cache": {"enabled": false}}))
        .await;
    let r = run(
        &app,
        &token,
        "nodejs-spinner",
        json!({"timeout_ms": 1000}),
        json!({"spin": true}),
    )
    .await;
    assert_eq!((r.status, r.code()), (504, "TIMEOUT"), "{:?}", r.body);
    // The killed container is replaced; version 1 leaves a file behind.
    let first = run(&app, &token, "nodejs-spinner", json!({}), json!({})).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    // Version 2 runs in containers of its own: nothing of version 1's.
    let v2 = v1.replace("v1-was-here", "v2-was-here");
    let updated = crate::functions::put_function(
        &app,
        &token,
        "nodejs-spinner",
        json!({"description": "v2", "code": v2, "cache": {"enabled": false}}),
    )
    .await;
    assert_eq!(updated.status, 200, "{:?}", updated.body);
    let second = run(&app, &token, "nodejs-spinner", json!({}), json!({})).await;
    assert_eq!(second.body["result"]["seen"], json!([]), "{:?}", second.body);
    stop_leaving_nothing(&host, app).await;
}
