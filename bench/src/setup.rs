//! What the measurements run against: the controller binary built and
//! started ([`Controller`]), its API as a client uses it, and the peers
//! (Google's functions-framework for Node and Python, installed once under
//! the tools directory).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::procs::Proc;

/// The repository (the bench crate's parent).
pub(crate) fn repo_dir() -> PathBuf {
    // `cargo run` names the package it runs from; the path compiled in is
    // the checkout that built this binary, which a target directory shared
    // by two checkouts may hand to the other.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    Path::new(&manifest).parent().unwrap_or(Path::new(".")).to_owned()
}

/// Builds the controller binary (`release` or the dev profile) with cargo
/// and returns its path.
pub(crate) fn build_controller(release: bool) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_dir()).args([
        "build",
        "-p",
        "controller",
        "--bin",
        "controller",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("building the controller failed");
    }
    for message in cargo_metadata::Message::parse_stream(&out.stdout[..]) {
        if let Ok(cargo_metadata::Message::CompilerArtifact(a)) = message
            && a.target.name == "controller"
            && let Some(exe) = a.executable
        {
            return Ok(exe.into_std_path_buf());
        }
    }
    bail!("cargo built no controller executable")
}

/// The JWT secret of the controllers this run starts.
const SECRET: &str = "fnrt-bench-secret-not-for-production";

/// A controller binary started for the benchmark, on a data directory of
/// its own and an empty functions folder (the bundled functions' builds and
/// installs would run beside the measurements): it serves what the run
/// registers.
#[derive(Debug)]
pub(crate) struct Controller {
    pub(crate) url: String,
    pub(crate) proc: Proc,
    pub(crate) client: reqwest::Client,
    pub(crate) token: String,
    data: tempfile::TempDir,
    _functions: tempfile::TempDir,
}

impl Controller {
    /// Starts `bin serve` with `flags` beside the benchmark's own (limits
    /// on, but above what the load sends).
    pub(crate) async fn start(bin: &Path, flags: &[&str]) -> anyhow::Result<Controller> {
        let data = tempfile::Builder::new().prefix("fnrt-bench").tempdir_in("/var/tmp")?;
        let functions = tempfile::Builder::new()
            .prefix("fnrt-bench-fns")
            .tempdir_in("/var/tmp")?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .arg("--data-dir")
            .arg(data.path())
            .arg("--functions-dir")
            .arg(functions.path())
            .arg("--runtimes-dir")
            .arg(repo_dir().join("runtimes"))
            .args(["--rate-limit-execute", "2000000000", "--rate-limit-functions", "100000"])
            // Submits at c1 outrun the workers on a fast machine: the queue
            // a subject may have waiting is set above what a run submits.
            .args(["--execution-max-pending-per-subject", "10000000"])
            .args(flags)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(
                ["HOME", "CARGO_HOME", "RUSTUP_HOME"]
                    .into_iter()
                    .filter_map(|k| std::env::var(k).ok().map(|v| (k, v))),
            )
            .env("JWT_SECRET", SECRET)
            .env("RUST_LOG", "info");
        let (proc, addr) = Proc::start("controller", cmd, Duration::from_secs(60), |line| {
            let v: Value = serde_json::from_str(line).ok()?;
            v["message"]
                .as_str()?
                .starts_with("listening on")
                .then(|| v["addr"].as_str().map(str::to_owned))?
        })?;
        let token = token(bin, "bench", &["execute:all", "read:functions", "write:functions"])?;
        Ok(Controller {
            url: format!("http://{addr}"),
            proc,
            client: reqwest::Client::new(),
            token,
            data,
            _functions: functions,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The controller's data directory.
    pub(crate) fn data_dir(&self) -> &Path {
        self.data.path()
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        lt: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self.client.request(method, self.url(path)).bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(body);
        }
        if let Some(lt) = lt {
            req = req.header("Language-Title", lt);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    /// Registers a function (the manifest's fields beside `code`).
    pub(crate) async fn register(&self, language_title: &str, code: &str, manifest: Value) -> anyhow::Result<()> {
        self.register_with(language_title, json!({"code": code}), manifest)
            .await
    }

    /// Registers a function whose code is `source` (`{"code": …}` or
    /// `{"files": …}`), the manifest's fields beside it; a crate is built
    /// before this answers.
    pub(crate) async fn register_with(
        &self,
        language_title: &str,
        source: Value,
        manifest: Value,
    ) -> anyhow::Result<()> {
        let mut body = json!({"language_title": language_title, "description": "benchmark function"});
        if let (Some(b), Some(c)) = (body.as_object_mut(), source.as_object()) {
            b.extend(c.clone());
        }
        if let (Some(b), Some(m)) = (body.as_object_mut(), manifest.as_object()) {
            b.extend(m.clone());
        }
        let (status, answer) = self
            .call(reqwest::Method::POST, "/api/v1/functions", Some(&body), None)
            .await?;
        if status != 201 {
            bail!("registering {language_title}: {status} {answer}");
        }
        Ok(())
    }

    /// Initializes `language_title`; the request id.
    pub(crate) async fn initialize(&self, language_title: &str, retain: bool) -> anyhow::Result<String> {
        let body = json!({"context": {"retain_session": retain}});
        let (status, answer) = self
            .call(
                reqwest::Method::POST,
                "/api/v1/initialize",
                Some(&body),
                Some(language_title),
            )
            .await?;
        match answer["request_id"].as_str() {
            Some(id) if status == 200 => Ok(id.to_owned()),
            _ => bail!("initialize {language_title}: {status} {answer}"),
        }
    }

    /// Executes on session `id`; the answer's body.
    pub(crate) async fn execute(&self, id: &str, params: &Value) -> anyhow::Result<Value> {
        let (status, answer) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/execute/{id}"),
                Some(&json!({"params": params})),
                None,
            )
            .await?;
        if status != 200 {
            bail!("execute {id}: {status} {answer}");
        }
        Ok(answer)
    }

    /// Ends session `id` (its instance goes).
    pub(crate) async fn end_session(&self, id: &str) -> anyhow::Result<()> {
        let (status, answer) = self
            .call(reqwest::Method::DELETE, &format!("/api/v1/sessions/{id}"), None, None)
            .await?;
        if !(200..300).contains(&status) && status != 404 {
            bail!("ending session {id}: {status} {answer}");
        }
        Ok(())
    }

    /// `/health`, as JSON.
    pub(crate) async fn health(&self) -> anyhow::Result<Value> {
        Ok(self.client.get(self.url("/health")).send().await?.json().await?)
    }

    /// `/metrics`, as text.
    pub(crate) async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self.client.get(self.url("/metrics")).send().await?.text().await?)
    }

    /// The value of the sample `name{labels…}` whose labels include all of
    /// `labels`, summed over the matching samples (0 when none).
    pub(crate) async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(sum_samples(&self.metrics().await?, name, labels))
    }

    /// Waits until `check` holds, or `timeout`.
    pub(crate) async fn until(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !check().await? {
            if Instant::now() > deadline {
                bail!("waited {timeout:?} for {what}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

/// `controller token`: a signed JWT for `sub` with `scopes`.
fn token(bin: &Path, sub: &str, scopes: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(bin);
    cmd.args(["token", "--sub", sub]).env("JWT_SECRET", SECRET);
    for scope in scopes {
        cmd.args(["--scope", scope]);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("controller token: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Sums Prometheus text samples of `name` carrying every label in `labels`.
pub(crate) fn sum_samples(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A peer serving the same function over HTTP.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) name: &'static str,
    pub(crate) url: String,
    _proc: Proc,
}

/// The trivial function the peers serve, as each framework writes it.
const NODE_PEER: &str = "const ff = require('@google-cloud/functions-framework');\n\
ff.http('hello', (req, res) => { res.json({ greeting: 'hello ' + req.body.name }); });\n";
const PYTHON_PEER: &str = "import functions_framework\n\n\
@functions_framework.http\n\
def hello(request):\n    return {\"greeting\": \"hello \" + request.get_json()[\"name\"]}\n";

/// Google's functions-framework for Node (npm) and Python (PyPI), installed
/// under `tools/peers` the first time and started on loopback; a peer that
/// cannot be installed (no registry) is left out with the reason.
pub(crate) async fn start_peers(tools: &Path) -> (Vec<Peer>, Vec<String>) {
    let mut peers = Vec::new();
    let mut missing = Vec::new();
    match node_peer(tools).await {
        Ok(p) => peers.push(p),
        Err(e) => missing.push(format!("functions-framework (Node): {e:#}")),
    }
    match python_peer(tools).await {
        Ok(p) => peers.push(p),
        Err(e) => missing.push(format!("functions-framework (Python): {e:#}")),
    }
    (peers, missing)
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| what.to_owned())?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_http(url: &str, body: &Value, proc: &Proc) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.post(url).json(body).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} did not answer on {url}: {}", proc.name, proc.tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn node_peer(tools: &Path) -> anyhow::Result<Peer> {
    let dir = tools.join("peers/node");
    std::fs::create_dir_all(&dir)?;
    if !dir.join("node_modules/@google-cloud/functions-framework").exists() {
        std::fs::write(dir.join("package.json"), r#"{"name":"fnrt-bench-peer","private":true}"#)?;
        run(
            Command::new("npm")
                .args([
                    "install",
                    "--silent",
                    "--no-audit",
                    "--no-fund",
                    "@google-cloud/functions-framework@4",
                ])
                .current_dir(&dir),
            "npm install @google-cloud/functions-framework",
        )?;
    }
    std::fs::write(dir.join("index.js"), NODE_PEER)?;
    let port = free_port()?;
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("node_modules/@google-cloud/functions-framework/build/src/main.js"))
        .args(["--target=hello", "--signature-type=http", &format!("--port={port}")])
        .arg(format!("--source={}", dir.display()))
        .current_dir(&dir)
        .env("NODE_ENV", "production");
    let proc = Proc::spawn("functions-framework (Node)", cmd)?;
    let url = format!("http://127.0.0.1:{port}/");
    wait_http(&url, &json!({"name": "bench"}), &proc).await?;
    Ok(Peer {
        name: "functions-framework (Node)",
        url,
        _proc: proc,
    })
}

async fn python_peer(tools: &Path) -> anyhow::Result<Peer> {
    let dir = tools.join("peers/python");
    let venv = dir.join("venv");
    let ff = venv.join("bin/functions-framework");
    if !ff.exists() {
        std::fs::create_dir_all(&dir)?;
        run(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "python3 -m venv",
        )?;
        run(
            Command::new(venv.join("bin/pip")).args([
                "install",
                "-q",
                "--disable-pip-version-check",
                "functions-framework",
            ]),
            "pip install functions-framework",
        )?;
    }
    std::fs::write(dir.join("main.py"), PYTHON_PEER)?;
    let port = free_port()?;
    let mut cmd = Command::new(&ff);
    cmd.args(["--target", "hello", "--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--source")
        .arg(dir.join("main.py"))
        .current_dir(&dir);
    let proc = Proc::spawn("functions-framework (Python)", cmd)?;
    let url = format!("http://127.0.0.1:{port}/");
    wait_http(&url, &json!({"name": "bench"}), &proc).await?;
    Ok(Peer {
        name: "functions-framework (Python)",
        url,
        _proc: proc,
    })
}

/// The Docker API the container backend would use (`DOCKER_HOST`, a
/// `unix://` socket, else the controller's default), when it answers.
pub(crate) fn docker_host() -> Option<String> {
    let host = std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| h.starts_with("unix://"))
        .unwrap_or_else(fnrt_backends::docker::default_host);
    std::os::unix::net::UnixStream::connect(host.trim_start_matches("unix://"))
        .is_ok()
        .then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_by_name_and_labels() {
        let text = "# HELP x\nlambda_instances{language=\"nodejs\",state=\"warm\"} 2\n\
                    lambda_instances{language=\"python\",state=\"warm\"} 1\n\
                    lambda_instances{language=\"nodejs\",state=\"idle\"} 5\nlambda_up 1\n";
        assert_eq!(sum_samples(text, "lambda_instances", &[("state", "warm")]), 3.0);
        assert_eq!(
            sum_samples(text, "lambda_instances", &[("language", "nodejs"), ("state", "warm")]),
            2.0
        );
        assert_eq!(sum_samples(text, "lambda_up", &[]), 1.0);
        assert_eq!(sum_samples(text, "lambda_missing", &[]), 0.0);
    }
}
