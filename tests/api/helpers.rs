//! `spawn_app()`: starts the real controller binary on port 0 with a fresh
//! data dir, and typed helpers to drive it over HTTP.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use controller::auth::Authenticator;
use serde_json::{Value, json};

pub const SECRET: &str = "test-secret-test-secret-test-secret!";

pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running controller and what a test needs to talk to it.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub data_dir: tempfile::TempDir,
    child: Child,
    /// Everything the controller logged (JSON lines).
    logs: Arc<Mutex<Vec<String>>>,
    auth: Authenticator,
}

/// A controller with default settings and a fresh data dir.
pub fn spawn_app() -> TestApp {
    spawn_app_with(&[])
}

/// A controller with extra command-line flags and a fresh data dir.
pub fn spawn_app_with(extra: &[&str]) -> TestApp {
    spawn_app_in(fresh_data_dir(), extra)
}

/// Not under /tmp: instances get a private /tmp mounted over it, which would hide the data dir.
fn fresh_data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fnrt")
        .tempdir_in("/var/tmp")
        .expect("temp dir")
}

/// A controller on an existing data dir.
pub fn spawn_app_in(data_dir: tempfile::TempDir, extra: &[&str]) -> TestApp {
    spawn_app_opts(data_dir, extra, &Options::default())
}

/// How the test starts a controller, beyond its flags.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Start the controller without `JWT_SECRET`, so it generates its own
    /// secret file in the data dir (the test reads it to make tokens).
    pub generated_secret: bool,
    /// The umask the controller starts with (the test's own when `None`).
    pub umask: Option<u32>,
}

/// A controller on an existing data dir, started as `options` say.
pub fn spawn_app_opts(data_dir: tempfile::TempDir, extra: &[&str], options: &Options) -> TestApp {
    let repo = repo_dir();
    let mut command = Command::new(env!("CARGO_BIN_EXE_controller-under-test"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--warm-pool-size",
            "1",
        ])
        .arg("--data-dir")
        .arg(data_dir.path())
        .arg("--functions-dir")
        .arg(repo.join("functions"))
        .arg("--runtimes-dir")
        .arg(repo.join("runtimes"))
        .args(extra);
    controller_env(&mut command);
    if !options.generated_secret {
        command.env("JWT_SECRET", SECRET);
    }
    if let Some(mask) = options.umask {
        set_umask(&mut command, mask);
    }
    let (child, address, logs) = start(command);
    let secret = if options.generated_secret {
        std::fs::read_to_string(data_dir.path().join("jwt-secret")).expect("the generated JWT secret")
    } else {
        SECRET.to_owned()
    };
    TestApp {
        address,
        client: reqwest::Client::new(),
        data_dir,
        child,
        logs,
        auth: Authenticator::new(secret.trim().as_bytes(), None, None),
    }
}

/// The environment a test controller gets: `PATH`, and what cargo needs for
/// Rust function builds, with one target directory for every test
/// controller so dependencies build once.
pub fn controller_env(command: &mut Command) {
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(
            ["HOME", "CARGO_HOME", "RUSTUP_HOME", "RUSTUP_TOOLCHAIN"]
                .into_iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (k, v))),
        )
        .env("RUST_TARGET_DIR", "/var/tmp/fnrt-test-functions")
        .env("RUST_LOG", "info");
}

/// Starts the child with `mask` as its umask.
#[allow(unsafe_code)]
pub fn set_umask(command: &mut Command, mask: u32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask is one async-signal-safe system call, made between fork
    // and exec without allocating.
    unsafe {
        command.pre_exec(move || {
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask));
            Ok(())
        });
    }
}

/// Spawns a controller that logs JSON to stderr and waits until it says
/// where it listens; returns it, its address and its log lines.
pub fn start(mut command: Command) -> (Child, String, Arc<Mutex<Vec<String>>>) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the controller binary");
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let logs = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = listening_addr(&line)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
                logs.lock().unwrap().push(line);
            }
        });
    }
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => (child, format!("http://{addr}"), logs),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("controller did not start: {:#?}", logs.lock().unwrap());
        }
    }
}

fn listening_addr(line: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    v["message"]
        .as_str()?
        .starts_with("listening on")
        .then(|| v["addr"].as_str().map(str::to_owned))?
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }
}

pub async fn read(response: reqwest::Response) -> Reply {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("body is not JSON ({status}): {text}"))
    };
    Reply { status, headers, body }
}

impl TestApp {
    /// Stops the controller (SIGTERM) and starts a new one on the same data dir.
    pub fn restart(mut self) -> TestApp {
        let data_dir = std::mem::replace(&mut self.data_dir, fresh_data_dir());
        drop(self);
        spawn_app_in(data_dir, &[])
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// A token for `sub` with `scopes`.
    pub fn token(&self, sub: &str, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        self.auth.issue(sub, &scopes, 3600).unwrap()
    }

    /// A token for `alice` with every scope.
    pub fn admin(&self) -> String {
        self.token("alice", &["execute:all", "read:functions", "write:functions"])
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub async fn initialize(&self, token: &str, language_title: &str, body: Value) -> Reply {
        let r = self
            .client
            .post(self.url("/api/v1/initialize"))
            .bearer_auth(token)
            .header("Language-Title", language_title)
            .json(&body)
            .send()
            .await
            .unwrap();
        read(r).await
    }

    /// Initializes and returns the request ID, asserting success.
    pub async fn session(&self, token: &str, language_title: &str, context: Value) -> String {
        let r = self
            .initialize(token, language_title, json!({ "context": context }))
            .await;
        assert_eq!(r.status, 200, "initialize {language_title}: {:?}", r.body);
        r.body["request_id"].as_str().unwrap().to_owned()
    }

    pub async fn execute(&self, token: &str, request_id: &str, params: Value) -> Reply {
        self.execute_with(token, request_id, json!({ "params": params }), None)
            .await
    }

    pub async fn execute_with(&self, token: &str, request_id: &str, body: Value, cache: Option<&str>) -> Reply {
        let mut req = self
            .client
            .post(self.url(&format!("/api/v1/execute/{request_id}")))
            .bearer_auth(token)
            .json(&body);
        if let Some(c) = cache {
            req = req.header("X-Cache-Control", c);
        }
        read(req.send().await.unwrap()).await
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET /health`, once each of `languages` reports `ok` (the warm pool
    /// starts runtimes in the background) or after 10 s.
    pub async fn health_with_runtimes(&self, languages: &[&str]) -> Reply {
        let mut health = self.get(None, "/health").await;
        for _ in 0..100 {
            let runtimes = &health.body["components"]["runtimes"];
            if languages.iter().all(|l| runtimes[l] == "ok") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            health = self.get(None, "/health").await;
        }
        health
    }

    pub async fn get(&self, token: Option<&str>, path: &str) -> Reply {
        let mut req = self.client.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        read(req.send().await.unwrap()).await
    }

    /// Registers a function through the API, asserting success.
    pub async fn register(&self, language_title: &str, code: &str, extra: Value) -> Reply {
        let mut body = json!({
            "language_title": language_title,
            "description": format!("test function {language_title}"),
            "code": code,
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let r = self
            .client
            .post(self.url("/api/v1/functions"))
            .bearer_auth(self.admin())
            .json(&body)
            .send()
            .await
            .unwrap();
        let reply = read(r).await;
        assert_eq!(reply.status, 201, "register {language_title}: {:?}", reply.body);
        reply
    }

    /// Runs `code` once as a fresh function in a fresh session.
    pub async fn run_once(&self, language_title: &str, code: &str, extra: Value, params: Value) -> Reply {
        self.register(language_title, code, extra).await;
        let token = self.admin();
        let id = self.session(&token, language_title, json!({})).await;
        self.execute(&token, &id, params).await
    }

    /// Processes (pids) running as children of the controller's instances.
    pub fn instance_dirs(&self) -> usize {
        std::fs::read_dir(self.data_dir.path().join("instances"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits for the controller to exit by itself.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn controller_pid(&self) -> u32 {
        self.child.id()
    }
}

/// Pids whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent pid is the second field after the parenthesised name.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == parent {
            out.push(pid);
        }
    }
    out
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}
