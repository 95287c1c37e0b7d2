//! `spawn_app()`: the controller's application (`Application::build`)
//! started in the test's own process, on port 0 with a fresh data dir;
//! `spawn_binary()`: the real controller binary started the same way, for
//! the tests of what only a process shows (its logs, its exit on SIGTERM,
//! its children, its memory). Both give a [`TestApp`] with typed helpers to
//! drive it over HTTP.

use std::io::Write;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use controller::auth::Authenticator;
use controller::config::ServeArgs;
use controller::startup::Application;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET: &str = "test-secret-test-secret-test-secret!";

/// The cargo target directory of every test controller's Rust function
/// builds, so that dependencies build once.
pub const RUST_TARGET_DIR: &str = "/var/tmp/fnrt-test-functions";
/// Installed dependencies, shared like the Rust target dir: the bundled
/// packages' installs run once per machine, not once per test.
const DEPS_DIR: &str = "/var/tmp/fnrt-test-deps";

/// How long a stopping controller may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running controller and what a test needs to talk to it. Dropping it
/// stops the controller as SIGTERM does (in-flight requests finish, every
/// instance is stopped and its directory removed), and waits for that.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub data_dir: tempfile::TempDir,
    server: Server,
    auth: Authenticator,
}

/// Where the controller runs.
enum Server {
    /// On the test's runtime, in the test's process.
    InProcess(InProcess),
    /// The controller binary as a child process, and everything it logged
    /// (JSON lines).
    Binary {
        child: Child,
        logs: Arc<Mutex<Vec<String>>>,
    },
    /// Already stopped.
    Stopped,
}

struct InProcess {
    /// Resolves `run_until_stopped`'s shutdown future.
    stop: oneshot::Sender<()>,
    /// `run_until_stopped`, spawned on the test's runtime.
    serving: JoinHandle<Result<(), String>>,
}

/// A controller with default settings and a fresh data dir, in process.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// A controller with extra command-line flags and a fresh data dir, in process.
pub async fn spawn_app_with(extra: &[&str]) -> TestApp {
    spawn_app_in(fresh_data_dir(), extra).await
}

/// Not under /tmp: instances get a private /tmp mounted over it, which would hide the data dir.
fn fresh_data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fnrt")
        .tempdir_in("/var/tmp")
        .expect("temp dir")
}

/// The flags every test controller starts with, before the test's own.
fn base_flags(data_dir: &Path) -> Vec<String> {
    let repo = repo_dir();
    let path = |p: &Path| p.to_string_lossy().into_owned();
    vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--warm-pool-size".into(),
        "1".into(),
        "--data-dir".into(),
        path(data_dir),
        "--functions-dir".into(),
        path(&repo.join("functions")),
        "--runtimes-dir".into(),
        path(&repo.join("runtimes")),
    ]
}

/// Why the controller refuses to start with `extra` flags: the flag parser's
/// error or `Application::build`'s (panics if it starts).
pub async fn start_error(extra: &[&str]) -> String {
    let data_dir = tempfile::Builder::new().prefix("fnrt").tempdir_in("/var/tmp").unwrap();
    let mut flags = base_flags(data_dir.path());
    flags.extend(["--jwt-secret", SECRET, "--rust-target-dir", RUST_TARGET_DIR].map(str::to_owned));
    flags.extend(extra.iter().map(|s| s.to_string()));
    let args = match ServeArgs::from_flags(&flags) {
        Ok(args) => args,
        Err(e) => return e.to_string(),
    };
    match Application::build(args).await {
        Ok(_) => panic!("the controller started with {extra:?}"),
        Err(e) => format!("{e:#}"),
    }
}

/// A controller on an existing data dir, in process: `Application::build`
/// on the flags the binary would get (and no environment variable), served
/// on the test's runtime until the [`TestApp`] is dropped or stopped.
///
/// The test must run on a multi-threaded runtime
/// (`#[tokio::test(flavor = "multi_thread")]`): dropping the app waits for
/// it to stop, which a current-thread runtime cannot do from inside itself.
pub async fn spawn_app_in(data_dir: tempfile::TempDir, extra: &[&str]) -> TestApp {
    let runtime = tokio::runtime::Handle::current();
    assert_eq!(
        runtime.runtime_flavor(),
        tokio::runtime::RuntimeFlavor::MultiThread,
        "an in-process app needs #[tokio::test(flavor = \"multi_thread\")]: dropping it waits for it to stop"
    );
    let mut flags = base_flags(data_dir.path());
    flags.extend(
        [
            "--jwt-secret",
            SECRET,
            "--rust-target-dir",
            RUST_TARGET_DIR,
            "--deps-dir",
            DEPS_DIR,
            // Rust instances run `PROGRAM runtime-rust`, wasm compiles in
            // `PROGRAM compile-wasm`: the controller, not this test binary.
            "--controller-bin",
            env!("CARGO_BIN_EXE_controller-under-test"),
        ]
        .map(str::to_owned),
    );
    flags.extend(extra.iter().map(|s| s.to_string()));
    let args = ServeArgs::from_flags(&flags).unwrap_or_else(|e| panic!("flags {flags:?}: {e}"));
    let app = Application::build(args)
        .await
        .unwrap_or_else(|e| panic!("the controller did not start: {e:#}"));
    let address = format!("http://{}", app.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        app.run_until_stopped(async {
            // A dropped sender stops the app as well.
            let _ = stopped.await;
        })
        .await
        .map_err(|e| format!("{e:#}"))
    });
    TestApp {
        address,
        client: reqwest::Client::new(),
        data_dir,
        server: Server::InProcess(InProcess { stop, serving }),
        auth: Authenticator::new(SECRET.as_bytes(), None, None),
    }
}

/// The controller binary with default settings and a fresh data dir.
pub fn spawn_binary() -> TestApp {
    spawn_binary_with(&[])
}

/// The controller binary with extra command-line flags and a fresh data dir.
pub fn spawn_binary_with(extra: &[&str]) -> TestApp {
    spawn_binary_opts(fresh_data_dir(), extra, &Options::default())
}

/// How the test starts a controller binary, beyond its flags.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Start the controller without `JWT_SECRET`, so it generates its own
    /// secret file in the data dir (the test reads it to make tokens).
    pub generated_secret: bool,
    /// The umask the controller starts with (the test's own when `None`).
    pub umask: Option<u32>,
    /// Environment variables beyond [`controller_env`]'s.
    pub env: Vec<(String, String)>,
}

/// The controller binary on an existing data dir, started as `options` say,
/// logging JSON to stderr (see [`TestApp::logs`]).
pub fn spawn_binary_opts(data_dir: tempfile::TempDir, extra: &[&str], options: &Options) -> TestApp {
    let mut command = Command::new(env!("CARGO_BIN_EXE_controller-under-test"));
    command
        .arg("serve")
        .args(base_flags(data_dir.path()))
        .args(["--log-format", "json"])
        .args(extra);
    controller_env(&mut command);
    command.envs(options.env.iter().map(|(k, v)| (k, v)));
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
        server: Server::Binary { child, logs },
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
        .env("RUST_TARGET_DIR", RUST_TARGET_DIR)
        .env("DEPS_DIR", DEPS_DIR)
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
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    // A binary just copied (first_run's copy under /tmp) is "busy" while a
    // process another test forks at that moment still holds the copy's
    // write descriptor, until that process execs: try again shortly.
    let mut attempts = 0;
    let mut child = loop {
        match command.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            spawned => break spawned.expect("start the controller binary"),
        }
    };
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
        match std::mem::replace(&mut self.server, Server::Stopped) {
            Server::InProcess(app) => stop_in_process(app),
            Server::Binary { mut child, .. } => stop_binary(&mut child),
            Server::Stopped => {}
        }
    }
}

/// Stops an in-process app as SIGTERM stops the binary and waits for it,
/// killing what is left (every instance's process group) if it takes longer
/// than [`STOP_TIMEOUT`].
fn stop_in_process(app: InProcess) {
    let InProcess { stop, mut serving } = app;
    let _ = stop.send(());
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // Outside any runtime (dropped after the test's runtime): nothing
        // to wait on; dropping the serving future drops the instances,
        // which kills them.
        serving.abort();
        return;
    };
    // On the test's runtime (its flavor was checked at the start), from its
    // own thread or a worker: leave the runtime to its other threads while
    // this one waits.
    tokio::task::block_in_place(|| {
        runtime.block_on(async {
            if tokio::time::timeout(STOP_TIMEOUT, &mut serving).await.is_err() {
                // Dropping the serving future drops the instances, which kills them.
                serving.abort();
                let _ = serving.await;
            }
        });
    });
}

/// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
fn stop_binary(child: &mut Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    if wait_for(child, STOP_TIMEOUT).is_none() {
        let _ = child.kill();
        let _ = child.wait();
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
    /// Stops the controller (as SIGTERM does) and starts a new one on the
    /// same data dir, in process or as a binary as this one was.
    pub async fn restart(self) -> TestApp {
        self.restart_with(&[]).await
    }

    /// [`TestApp::restart`] with other flags.
    pub async fn restart_with(mut self, extra: &[&str]) -> TestApp {
        let binary = matches!(self.server, Server::Binary { .. });
        self.stop().await;
        let data_dir = std::mem::replace(&mut self.data_dir, fresh_data_dir());
        drop(self);
        if binary {
            spawn_binary_opts(data_dir, extra, &Options::default())
        } else {
            spawn_app_in(data_dir, extra).await
        }
    }

    /// Kills the controller binary with SIGKILL (a crash: nothing of its
    /// shutdown runs) and waits until it is gone.
    pub fn kill_hard(&mut self) {
        match std::mem::replace(&mut self.server, Server::Stopped) {
            Server::Binary { mut child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
            other => {
                self.server = other;
                panic!("kill_hard is for a controller binary");
            }
        }
    }

    /// Stops the controller as SIGTERM does and waits until it has stopped,
    /// asserting that it stopped cleanly (in process: `run_until_stopped`
    /// returned `Ok`; a binary: exit status 0).
    pub async fn stop(&mut self) {
        match std::mem::replace(&mut self.server, Server::Stopped) {
            Server::InProcess(InProcess { stop, mut serving }) => {
                let _ = stop.send(());
                match tokio::time::timeout(STOP_TIMEOUT, &mut serving).await {
                    Ok(joined) => joined
                        .expect("the serving task did not panic")
                        .expect("the app stopped cleanly"),
                    Err(_) => {
                        serving.abort();
                        let _ = serving.await;
                        panic!("the app did not stop within {STOP_TIMEOUT:?}");
                    }
                }
            }
            Server::Binary { mut child, logs } => {
                let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                let Some(status) = wait_for(&mut child, STOP_TIMEOUT) else {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the controller did not stop: {:#?}", logs.lock().unwrap());
                };
                assert!(status.success(), "exit status {status}");
            }
            Server::Stopped => {}
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// A token for `sub` with `scopes`.
    pub fn token(&self, sub: &str, scopes: &[&str]) -> String {
        self.token_for(sub, scopes, 3600)
    }

    /// A token for `sub` with `scopes` that expires in `ttl_secs`.
    pub fn token_for(&self, sub: &str, scopes: &[&str], ttl_secs: u64) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        self.auth.issue(sub, &scopes, ttl_secs).unwrap()
    }

    /// A token for `alice` with every scope.
    pub fn admin(&self) -> String {
        self.token("alice", &["execute:all", "read:functions", "write:functions"])
    }

    /// Everything the controller binary logged so far (JSON lines); an
    /// in-process app installs no logger, so its tests use `spawn_binary`.
    pub fn logs(&self) -> Vec<String> {
        match &self.server {
            Server::Binary { logs, .. } => logs.lock().unwrap().clone(),
            _ => panic!("only a controller binary's logs are collected: start it with spawn_binary"),
        }
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

    /// Posts a registration body as it is, returning the answer.
    pub async fn post_function(&self, body: Value) -> Reply {
        let r = self
            .client
            .post(self.url("/api/v1/functions"))
            .bearer_auth(self.admin())
            .json(&body)
            .send()
            .await
            .unwrap();
        read(r).await
    }

    /// Runs `code` once as a fresh function in a fresh session.
    pub async fn run_once(&self, language_title: &str, code: &str, extra: Value, params: Value) -> Reply {
        self.register(language_title, code, extra).await;
        let token = self.admin();
        let id = self.session(&token, language_title, json!({})).await;
        self.execute(&token, &id, params).await
    }

    /// How many instance directories the data dir holds (one per live instance).
    pub fn instance_dirs(&self) -> usize {
        std::fs::read_dir(self.data_dir.path().join("instances"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits for the controller binary to exit by itself.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_for(self.child(), timeout)
    }

    /// The controller binary's pid (what SIGTERM goes to, the parent of its
    /// instances).
    pub fn controller_pid(&self) -> u32 {
        match &self.server {
            Server::Binary { child, .. } => child.id(),
            _ => panic!("an in-process app is no process of its own: start it with spawn_binary"),
        }
    }

    /// The pid of the process the controller runs in: the binary's, or the
    /// test's own for an in-process app.
    pub fn server_pid(&self) -> u32 {
        match &self.server {
            Server::Binary { child, .. } => child.id(),
            _ => std::process::id(),
        }
    }

    fn child(&mut self) -> &mut Child {
        match &mut self.server {
            Server::Binary { child, .. } => child,
            _ => panic!("an in-process app is no process of its own: start it with spawn_binary"),
        }
    }
}

/// Waits up to `timeout` for `child` to exit.
fn wait_for(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Every pid on the host (whatever namespace it runs in).
pub fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}

/// Pids whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for pid in pids() {
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

/// Which of the descriptors that code in a sandbox found open (`fd`
/// number to what `/proc/self/fd/N` links to, as the code read them) it did
/// not open itself, past the standard streams: a file or directory (but
/// `/dev/null`, and the listing's own `/proc/N/fd`), or a pipe or socket
/// also open in this process, the in-process controller (a descriptor
/// leaked across `exec` is the same pipe or socket on both sides).
/// Anonymous inodes have one name for all and are not told apart.
pub fn descriptors_not_its_own<'a>(found: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<String> {
    let controllers: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string())
        .collect();
    found
        .into_iter()
        .filter(|(fd, target)| {
            let past_stdio = fd.parse::<u32>().is_ok_and(|n| n > 2);
            let file = target.starts_with('/')
                && *target != "/dev/null"
                && !(target.starts_with("/proc/") && target.ends_with("/fd"));
            let shared = *target != "/dev/null" && !target.starts_with("anon_inode:") && controllers.contains(*target);
            past_stdio && (file || shared)
        })
        .map(|(fd, target)| format!("fd {fd} -> {target}"))
        .collect()
}

/// The value of one series (`name{labels}` exactly as `/metrics` writes
/// it) in a `/metrics` text; None when it is not there.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
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

/// A zip of `entries`, deflated (registration archives, wheels).
pub fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in entries {
        out.start_file(*name, options).unwrap();
        out.write_all(data).unwrap();
    }
    out.finish().unwrap().into_inner()
}

/// A tar.gz; `link` adds a symbolic link entry named `evil` to `/etc/shadow`.
pub fn tar_gz_of(entries: &[(&str, &[u8])], link: bool) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        builder.append_data(&mut h, name, *data).unwrap();
    }
    if link {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        builder.append_link(&mut h, "evil", "/etc/shadow").unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&builder.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}
