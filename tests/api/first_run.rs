//! The first run, as a newcomer makes it: the README's command with its
//! defaults (a relative `./data`, the binary wherever cargo put it, a
//! generated JWT secret), then the walk-through for every bundled language;
//! and the data dir as a function sees it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::helpers::{Options, Reply, TestApp, controller_env, read, spawn_binary_opts, start};
use crate::rust::session_when_built;

/// The controller the tests run, copied to `dir` as `controller`.
fn copy_binary_to(dir: &Path) -> std::path::PathBuf {
    let copy = dir.join("controller");
    std::fs::copy(env!("CARGO_BIN_EXE_controller-under-test"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// A controller stopped (SIGTERM, then SIGKILL) when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.0.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        for _ in 0..500 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn post(client: &reqwest::Client, url: String, token: &str, title: Option<&str>, body: Value) -> Reply {
    let mut request = client.post(url).bearer_auth(token).json(&body);
    if let Some(title) = title {
        request = request.header("Language-Title", title);
    }
    read(request.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_run_command_serves_every_language_with_a_relative_data_dir_and_the_binary_under_tmp() {
    // Arrange: the binary where a CARGO_TARGET_DIR under /tmp puts it, and a
    // working directory of its own, as a clone would be.
    let bin_dir = tempfile::Builder::new().prefix("fnrt-bin").tempdir_in("/tmp").unwrap();
    let binary = copy_binary_to(bin_dir.path());
    let cwd = tempfile::Builder::new()
        .prefix("fnrt-clone")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut command = Command::new(&binary);
    // The README's command adds nothing but the address (port 0 here) and
    // JSON logs, which the harness reads the address from.
    command
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .current_dir(cwd.path());
    controller_env(&mut command);
    let (child, address, logs) = start(command);
    let _running = Running(child);

    // The README's token command, from the same directory.
    let mut token = Command::new(&binary);
    token
        .args([
            "token",
            "--sub",
            "alice",
            "--scope",
            "execute:all",
            "--scope",
            "read:functions",
        ])
        .current_dir(cwd.path());
    controller_env(&mut token);
    let out = token.output().unwrap();
    assert!(out.status.success(), "token: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    // Act and assert: the walk-through, for one function of each language.
    let client = reqwest::Client::new();
    let cases = [
        (
            "nodejs-calculator",
            json!({"operation": "add", "values": [1, 2, 3]}),
            json!({"value": 6}),
        ),
        (
            "python-calculator",
            json!({"operation": "multiply", "values": [2, 3, 4]}),
            json!({"value": 24}),
        ),
        ("rust-fibonacci", json!({"n": 10}), json!({"n": 10, "value": 55})),
        (
            "wasm-sha256",
            json!({"data": "aGVsbG8="}),
            json!({"sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824", "bytes": 5}),
        ),
    ];
    let app = Newcomer {
        client: client.clone(),
        address: address.clone(),
    };
    for (title, params, expected) in cases {
        let id = app.session_when_built(&token, title).await;
        let r = post(
            &client,
            format!("{address}/api/v1/execute/{id}"),
            &token,
            None,
            json!({ "params": params }),
        )
        .await;
        assert_eq!(
            r.status,
            200,
            "{title}: {:?}\nlogs: {:#?}",
            r.body,
            logs.lock().unwrap()
        );
        assert_eq!(r.body["result"], expected, "{title}");
    }
    let health = read(client.get(format!("{address}/health")).send().await.unwrap()).await;
    assert_eq!(health.body["status"], "ok", "{:?}", health.body);

    // The data dir is where the README says, private as docs/ say.
    let data = cwd.path().join("data");
    assert_eq!(mode(&data), 0o711);
    assert_eq!(mode(&data.join("jwt-secret")), 0o600);
    assert_eq!(mode(&data.join("controller.db")), 0o600);
    assert_eq!(mode(&data.join("builds")), 0o700);
}

/// Just enough of a client for a controller the harness did not start.
struct Newcomer {
    client: reqwest::Client,
    address: String,
}

impl Newcomer {
    /// Initializes `title`, waiting while a bundled crate is still building.
    async fn session_when_built(&self, token: &str, title: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
        loop {
            let url = format!("{}/api/v1/initialize", self.address);
            let r = post(&self.client, url, token, Some(title), json!({})).await;
            if r.status == 200 {
                return r.body["request_id"].as_str().unwrap().to_owned();
            }
            assert_eq!(
                (r.status, r.code()),
                (503, "FUNCTION_NOT_READY"),
                "{title}: {:?}",
                r.body
            );
            assert!(std::time::Instant::now() < deadline, "{title} was not built in time");
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Lists and reads the paths it is given; says how each attempt ended.
const SNOOP: &str = r#"
import errno, os

def outcome(attempt):
    try:
        attempt()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def handler(params, context):
    out = {}
    for path in params["list"]:
        out["list " + path] = outcome(lambda: os.listdir(path))
    for path in params["read"]:
        out["read " + path] = outcome(lambda: open(path, "rb").read(1))
    return out
"#;

/// Every file under `dir` whose name ends with `suffix`.
fn files_under(dir: &Path, suffix: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(suffix) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_function_can_neither_list_nor_read_the_data_dir_other_functions_builds_or_the_secret() {
    if !rustix::process::geteuid().is_root() {
        // Instances run as the controller's own user unless it is root.
        eprintln!("skipped: the instance uid wall exists only when the controller runs as root");
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        return;
    }
    // Arrange: a controller started under a permissive umask, with the
    // secret it generates itself, and something built of each kind.
    let data_dir = tempfile::Builder::new().prefix("fnrt").tempdir_in("/var/tmp").unwrap();
    let options = Options {
        generated_secret: true,
        umask: Some(0o022),
        ..Options::default()
    };
    let app: TestApp = spawn_binary_opts(data_dir, &[], &options);
    let token = app.admin();
    let rust = session_when_built(&app, &token, "rust-fibonacci", json!({})).await;
    assert_eq!(app.execute(&token, &rust, json!({"n": 3})).await.status, 200);
    let wasm = app.session(&token, "wasm-hello", json!({})).await;
    assert_eq!(app.execute(&token, &wasm, json!({})).await.status, 200);
    let data = app.data_dir.path().to_path_buf();
    let artifacts = files_under(&data.join("builds"), "function.so");
    let compiled = files_under(&data.join("wasm-cache"), ".cwasm");
    let sources = files_under(
        Path::new("/var/tmp/fnrt-test-functions/tenants/bundled/crates"),
        "lib.rs",
    );
    assert!(!artifacts.is_empty() && !compiled.is_empty() && !sources.is_empty());
    app.register("python-snoop", SNOOP, json!({})).await;

    // Act
    let list = [
        data.display().to_string(),
        data.join("builds").display().to_string(),
        data.join("wasm-cache").display().to_string(),
        "/var/tmp/fnrt-test-functions".to_owned(),
    ];
    let read_paths = [
        data.join("jwt-secret").display().to_string(),
        data.join("controller.db").display().to_string(),
        artifacts[0].clone(),
        compiled[0].clone(),
        sources[0].clone(),
    ];
    let id = app.session(&token, "python-snoop", json!({})).await;
    let r = app
        .execute(&token, &id, json!({"list": list, "read": read_paths}))
        .await;

    // Assert: every attempt is refused: for lack of permission, or because
    // the path is not there at all inside the sandbox.
    assert_eq!(r.status, 200, "{:?}", r.body);
    let outcomes = r.body["result"].as_object().unwrap();
    assert_eq!(outcomes.len(), list.len() + read_paths.len(), "{outcomes:?}");
    for (attempt, outcome) in outcomes {
        assert!(
            outcome == "EACCES" || outcome == "EPERM" || outcome == "ENOENT",
            "{attempt} gave {outcome}, expected a refusal"
        );
    }
}
