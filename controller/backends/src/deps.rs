//! Third-party dependencies of packages: a Python function's
//! `requirements.txt` (pip) and a Node function's `package.json` (npm),
//! installed at registration, once per distinct set.
//!
//! An install is keyed by the dependency files' hash (with the language and
//! the `install.scripts` switch), so every function and version with the
//! same `requirements.txt` shares one install, and a second registration
//! does not install again. It runs in the build sandbox ([`BuildSandbox`]:
//! its own uid, nothing of the data dir, no secrets), with the network (to
//! reach the package index), a timeout and a size cap. By default no code of
//! a dependency runs: pip takes wheels only (`--only-binary=:all:`) and npm
//! skips install scripts (`--ignore-scripts`). With `install.scripts`, pip
//! may build from source (running `setup.py`, with the network) and npm runs
//! the scripts afterwards, offline (`npm rebuild`).
//!
//! The result lands in `deps/{key}/` (root's, files read-only to
//! instances), from which each instance of a function gets hard links:
//! Python's in `deps/` beside its socket (on `sys.path` after the package),
//! Node's as `function/node_modules/`.
//!
//! What an install takes is charged to its owner's quota by the registry
//! ([`Installer::installed_bytes`]). An install that no function's current
//! version names, and that was last made or used longer than
//! `DEPS_KEEP_UNUSED_SECS` ago (its directory's modification time, which
//! every use refreshes now and then, so controllers that share the
//! directory but not a database keep each other's), is removed by the
//! controller's sweep ([`Installer::collect`]); a version that needs it
//! again has it installed again.
//!
//! # Layout
//! - [`Dependencies`] (the core's `DependencyFiles`): what a package asks
//!   for, and its key.
//! - [`Installer`]: installs (or waits for the install under way), knows
//!   each key's state, and installs in the background for bundled functions;
//!   measures an install, and removes those no longer used.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::cgroups::StepCaps;
use crate::sandbox::BuildSandbox;
use fnrt_core::artifact::{BuildFailure, BuildState};
use fnrt_core::language::Language;

/// How long a failed install stands before an initialize tries it again
/// (the failure may have been the network).
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(60);

/// How a failure says the install's private network did not come up.
const NO_NETWORK: &str = "its network did not come up";

/// Lines of pip's or npm's output kept in a failure.
const MAX_MESSAGE_LINES: usize = 40;

pub use fnrt_core::function::package::DependencyFiles as Dependencies;

#[derive(Debug, Clone)]
pub struct InstallerConfig {
    /// Finished installs, `{key}/`, and those under way, `.installs/`
    /// (writable by the install's uid; one directory per install, removed
    /// when it ends). Several controllers may share it.
    pub deps_dir: PathBuf,
    pub python_bin: PathBuf,
    pub node_bin: PathBuf,
    pub npm_bin: Option<PathBuf>,
    /// Longest an install may take.
    pub timeout: Duration,
    /// Largest install, in bytes.
    pub max_bytes: u64,
    /// How long an install no function's current version uses stays on
    /// disk before [`Installer::collect`] removes it (it is installed
    /// again should a version need it).
    pub keep_unused: Duration,
    /// The uid installs run as, when the controller is root.
    pub uid: u32,
    /// What each install step may take (memory, tasks).
    pub caps: StepCaps,
    /// Where packages come from (default PyPI and the npm registry).
    pub sources: Sources,
}

/// Where installs fetch packages, for sites with a mirror or no internet.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// pip's index (`PIP_INDEX_URL`), e.g. a devpi or Artifactory mirror.
    pub pip_index_url: Option<String>,
    /// A directory of wheels: pip then installs from it alone, offline
    /// (`--no-index --find-links`); it is shown read-only to installs.
    pub pip_wheels_dir: Option<PathBuf>,
    /// npm's registry (`npm_config_registry`), e.g. a Verdaccio mirror.
    pub npm_registry: Option<String>,
}

impl Sources {
    /// The variables that point pip and npm at them.
    fn env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(url) = &self.pip_index_url {
            env.push(("PIP_INDEX_URL".into(), url.clone()));
        }
        if let Some(dir) = &self.pip_wheels_dir {
            env.push(("PIP_NO_INDEX".into(), "1".into()));
            env.push(("PIP_FIND_LINKS".into(), dir.display().to_string()));
        }
        if let Some(url) = &self.npm_registry {
            env.push(("npm_config_registry".into(), url.clone()));
        }
        env
    }
}

/// Installs dependencies, once per key.
pub struct Installer {
    config: InstallerConfig,
    sandbox: Option<BuildSandbox>,
    states: Mutex<HashMap<String, watch::Receiver<BuildState>>>,
    /// Background installs (bundled functions), stopped at shutdown.
    background: Mutex<Option<Vec<tokio::task::JoinHandle<()>>>>,
    /// One install at a time: each uses the network and the disk heavily.
    queue: tokio::sync::Semaphore,
    metrics: Arc<fnrt_core::metrics::Metrics>,
    /// When each failed install was last tried from [`Installer::ensure`].
    failed_at: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Installer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Installer {
    pub fn new(config: InstallerConfig, metrics: Arc<fnrt_core::metrics::Metrics>) -> anyhow::Result<Arc<Self>> {
        let uid = rustix::process::geteuid().is_root().then_some(config.uid);
        let work_dir = config.deps_dir.join(".installs");
        for dir in [&config.deps_dir, &work_dir] {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        if let Some(uid) = uid {
            std::os::unix::fs::chown(&work_dir, Some(uid), Some(uid))?;
        }
        // What an install sees of the host besides the system: the
        // interpreters' installations, and its own work directory.
        let mut read_only = Vec::new();
        for program in [
            Some(&config.python_bin),
            Some(&config.node_bin),
            config.npm_bin.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if let Ok(real) = program.canonicalize()
                && let Some(root) = real.parent().and_then(Path::parent)
            {
                read_only.push(root.to_path_buf());
            }
        }
        if let Some(wheels) = &config.sources.pip_wheels_dir {
            read_only.push(wheels.canonicalize()?);
        }
        let sandbox = BuildSandbox::detect(uid, read_only, vec![work_dir.clone()], config.caps);
        match &sandbox {
            None => tracing::warn!(
                "bubblewrap is not installed: dependency installs run as the controller's user, unwalled"
            ),
            Some(s) if !s.private_network() => tracing::warn!(
                "slirp4netns is not installed: dependency installs share the host's network, its loopback \
                 (the controller, Redis, the database) included (apt-get install slirp4netns)"
            ),
            Some(_) => {}
        }
        Ok(Arc::new(Installer {
            config,
            sandbox,
            states: Mutex::new(HashMap::new()),
            background: Mutex::new(Some(Vec::new())),
            queue: tokio::sync::Semaphore::new(1),
            metrics,
            failed_at: Mutex::new(HashMap::new()),
        }))
    }

    fn installed_dir(&self, key: &str) -> PathBuf {
        self.config.deps_dir.join(key)
    }

    /// Where the install of `deps` stands here, without starting one: a
    /// finished one on disk is ready even after a restart, and one that is
    /// no longer there (collected, here or by a controller sharing the
    /// directory) is not. A ready one is marked as used now and then, so
    /// that no controller sharing the directory collects it while it is.
    pub fn state(&self, deps: &Dependencies) -> Option<BuildState> {
        let key = deps.key();
        let dir = self.installed_dir(key);
        let mut states = self.states.lock().unwrap();
        if let Some(rx) = states.get(key) {
            let state = rx.borrow().clone();
            match &state {
                BuildState::Ready(path) if !self.still_there(path) => {
                    states.remove(key);
                }
                _ => return Some(state),
            }
        }
        self.still_there(&dir).then_some(BuildState::Ready(dir))
    }

    /// Whether the install at `dir` is there; if it is and was last marked
    /// as used more than a quarter of `keep_unused` ago, marks it now.
    fn still_there(&self, dir: &Path) -> bool {
        let Ok(meta) = std::fs::metadata(dir) else {
            return false;
        };
        let marked = meta.modified().ok().and_then(|at| at.elapsed().ok());
        if marked.is_some_and(|d| d > self.config.keep_unused / 4) {
            touch(dir);
        }
        meta.is_dir()
    }

    /// What the install of `deps` takes on disk, in bytes (0 when there is
    /// none): what its owner's quota is charged for it.
    pub async fn installed_bytes(&self, deps: &Dependencies) -> u64 {
        let dir = self.installed_dir(deps.key());
        tokio::task::spawn_blocking(move || tree_size(&dir).unwrap_or(0))
            .await
            .unwrap_or(0)
    }

    /// Removes the installs that none of `used` (the keys of every
    /// function's current version) names and that were last installed or
    /// reused longer than `keep_unused` ago, with none under way here;
    /// returns how many. A version that needs one again gets it installed
    /// again. Blocking.
    pub fn collect(&self, used: &HashSet<String>) -> usize {
        let aside = self.config.deps_dir.join(".installs");
        crate::unused::remove_dirs(&self.config.deps_dir, &aside, self.config.keep_unused, |key| {
            // Installs are named by their key; anything else is not one.
            if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) || used.contains(key) {
                return false;
            }
            let mut states = self.states.lock().unwrap();
            if states
                .get(key)
                .is_some_and(|rx| matches!(*rx.borrow(), BuildState::Building))
            {
                return false;
            }
            states.remove(key);
            self.failed_at.lock().unwrap().remove(key);
            true
        })
    }

    /// Starts a background install unless one exists (or failed less than
    /// [`RETRY_FAILED_AFTER`] ago); returns the state.
    pub fn ensure(self: &Arc<Self>, deps: &Dependencies) -> BuildState {
        match self.state(deps) {
            Some(BuildState::Failed(failure)) => {
                let mut failed_at = self.failed_at.lock().unwrap();
                let at = failed_at.entry(deps.key().to_owned()).or_insert_with(Instant::now);
                if at.elapsed() < RETRY_FAILED_AFTER {
                    return BuildState::Failed(failure);
                }
                // Once per period, however many initializes ask.
                *at = Instant::now();
            }
            Some(state) => return state,
            None => {}
        }
        let mut background = self.background.lock().unwrap();
        let Some(background) = background.as_mut() else {
            return BuildState::Building;
        };
        background.retain(|task| !task.is_finished());
        let this = self.clone();
        let deps = deps.clone();
        background.push(tokio::spawn(async move {
            let _ = this.install(&deps).await;
        }));
        BuildState::Building
    }

    /// Stops background installs (dropping one kills its process group).
    pub async fn shutdown(&self) {
        let tasks = self.background.lock().unwrap().take().unwrap_or_default();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Installs `deps` (or waits for the install under way, or finds it
    /// done) and returns its directory.
    pub async fn install(&self, deps: &Dependencies) -> Result<PathBuf, BuildFailure> {
        let key = deps.key();
        let dir = self.installed_dir(key);
        let (mut rx, tx) = {
            let mut states = self.states.lock().unwrap();
            let usable = |state: &BuildState| match state {
                BuildState::Building => true,
                // Collected since by a controller sharing the directory.
                BuildState::Ready(path) => path.is_dir(),
                // A failed install is tried again: it may have been the network.
                BuildState::Failed(_) => false,
            };
            match states.get(key) {
                Some(rx) if usable(&rx.borrow()) => (rx.clone(), None),
                _ => {
                    let (tx, rx) = watch::channel(BuildState::Building);
                    states.insert(key.to_owned(), rx.clone());
                    (rx, Some(tx))
                }
            }
        };
        let language = deps.language.as_str();
        match tx {
            Some(tx) => {
                let state = if dir.is_dir() {
                    self.metrics.record_dependency_install(language, "reused");
                    // Used again: not collected for another `keep_unused`.
                    touch(&dir);
                    BuildState::Ready(dir.clone())
                } else {
                    let _turn = self.queue.acquire().await;
                    let result = self.run(key, deps, &dir).await;
                    let outcome = if result.is_ok() { "installed" } else { "failed" };
                    self.metrics.record_dependency_install(language, outcome);
                    match result {
                        Ok(()) => BuildState::Ready(dir.clone()),
                        Err(failure) => BuildState::Failed(failure),
                    }
                };
                let _ = tx.send(state);
            }
            None => {
                self.metrics.record_dependency_install(language, "reused");
                touch(&dir);
            }
        }
        loop {
            match &*rx.borrow_and_update() {
                BuildState::Ready(path) => return Ok(path.clone()),
                BuildState::Failed(failure) => return Err(failure.clone()),
                BuildState::Building => {}
            }
            if rx.changed().await.is_err() {
                return Err(failure("the install was abandoned".into(), ""));
            }
        }
    }

    /// One install, in a work directory of its own, moved into place when
    /// it succeeded.
    async fn run(&self, key: &str, deps: &Dependencies, dir: &Path) -> Result<(), BuildFailure> {
        let work = self.config.deps_dir.join(".installs").join(format!(
            "{}-{}",
            &key[..16],
            hex::encode(rand::random::<[u8; 4]>())
        ));
        let result = self.run_in(&work, deps, dir).await;
        let _ = tokio::fs::remove_dir_all(&work).await;
        if let Err(e) = &result {
            tracing::warn!(language = %deps.language, error = %e.message, "dependency install failed");
        }
        result
    }

    async fn run_in(&self, work: &Path, deps: &Dependencies, dir: &Path) -> Result<(), BuildFailure> {
        let io = |what: &str, e: std::io::Error| failure(format!("{what}: {e}"), "");
        std::fs::create_dir(work).map_err(|e| io("preparing the install", e))?;
        for (name, bytes) in &deps.files {
            let path = work.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io("preparing the install", e))?;
            }
            std::fs::write(path, bytes).map_err(|e| io("preparing the install", e))?;
        }
        if let Some(uid) = self.sandbox.as_ref().and_then(BuildSandbox::uid) {
            crate::sandbox::chown_tree(work, uid).map_err(|e| io("preparing the install", e))?;
        }
        let out = match deps.language {
            Language::Python => {
                if !deps.scripts {
                    refuse_source_references(deps)?;
                }
                let target = work.join("site-packages");
                let mut args: Vec<String> = [
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    "--no-cache-dir",
                    "--no-warn-script-location",
                    "--progress-bar",
                    "off",
                ]
                .map(String::from)
                .into();
                if !deps.scripts {
                    args.push("--only-binary=:all:".into());
                }
                args.extend(["--target".into(), target.display().to_string()]);
                args.extend(["-r".into(), work.join("requirements.txt").display().to_string()]);
                let python = self.config.python_bin.clone();
                // From a local wheel directory, no network at all.
                let online = self.config.sources.pip_wheels_dir.is_none();
                self.step("pip install", &python, &args, work, online).await?;
                target
            }
            Language::Nodejs => {
                let npm = self
                    .config
                    .npm_bin
                    .clone()
                    .ok_or_else(|| failure("npm is not installed on this host".into(), ""))?;
                let locked = deps
                    .files
                    .iter()
                    .any(|(name, _)| name == "package-lock.json" || name == "npm-shrinkwrap.json");
                let mut args: Vec<String> = match locked {
                    true => vec!["ci".into()],
                    false => vec!["install".into(), "--no-package-lock".into()],
                };
                args.extend(
                    [
                        "--omit=dev",
                        "--ignore-scripts",
                        "--no-audit",
                        "--no-fund",
                        "--no-update-notifier",
                    ]
                    .map(String::from),
                );
                self.step("npm install", &npm, &args, work, true).await?;
                if deps.scripts {
                    // The scripts run offline: the packages are all there.
                    let rebuild = ["rebuild", "--offline"].map(String::from);
                    self.step("npm rebuild", &npm, &rebuild, work, false).await?;
                }
                work.join("node_modules")
            }
            other => {
                return Err(failure(
                    format!("{other} functions have no dependencies to install"),
                    "",
                ));
            }
        };
        if !out.is_dir() {
            std::fs::create_dir_all(&out).map_err(|e| io("finishing the install", e))?;
        }
        let size = tree_size(&out).map_err(|e| io("measuring the install", e))?;
        if size > self.config.max_bytes {
            return Err(failure(
                format!(
                    "the installed dependencies take {} MiB, more than the {} MiB allowed (DEPS_MAX_MB)",
                    size / (1024 * 1024),
                    self.config.max_bytes / (1024 * 1024)
                ),
                "",
            ));
        }
        // Root's from here on, read-only to everyone else, so that the
        // links instances get cannot be changed by them.
        seal(&out).map_err(|e| io("finishing the install", e))?;
        // Its age counts from now, for [`Installer::collect`].
        touch(&out);
        match std::fs::rename(&out, dir) {
            Ok(()) => Ok(()),
            // The same set installed by another replica meanwhile.
            Err(_) if dir.is_dir() => Ok(()),
            Err(e) => Err(io("finishing the install", e)),
        }
    }

    /// Runs one step of an install in the sandbox, within the timeout; once
    /// more if its private network did not come up (a race in setting up a
    /// namespace, not the install's fault).
    async fn step(
        &self,
        what: &str,
        program: &Path,
        args: &[String],
        work: &Path,
        network: bool,
    ) -> Result<(), BuildFailure> {
        match self.step_once(what, program, args, work, network).await {
            Err(failure) if failure.message.contains(NO_NETWORK) => {
                self.step_once(what, program, args, work, network).await
            }
            result => result,
        }
    }

    async fn step_once(
        &self,
        what: &str,
        program: &Path,
        args: &[String],
        work: &Path,
        network: bool,
    ) -> Result<(), BuildFailure> {
        let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        let mut private = None;
        let mut cmd = match &self.sandbox {
            Some(sandbox) => {
                let (bwrap, wrapped, net) = sandbox
                    .wrap(program, &args, work, network)
                    .map_err(|e| failure(format!("{what} could not be prepared: {e}"), ""))?;
                let mut cmd = tokio::process::Command::new(bwrap);
                cmd.args(wrapped);
                private = net;
                cmd
            }
            None => {
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(&args).current_dir(work);
                cmd
            }
        };
        cmd.env_clear()
            .envs(install_env())
            .envs(self.config.sources.env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        crate::build::die_with_controller(cmd.as_std_mut());
        let confined = match &self.sandbox {
            Some(sandbox) => {
                let mut confined = sandbox
                    .confine(cmd.as_std_mut())
                    .map_err(|e| failure(format!("{what} could not be prepared: {e}"), ""))?;
                confined.watch_disk(work.to_path_buf());
                Some(confined)
            }
            None => None,
        };
        if let Some(net) = &private {
            net.prepare(&mut cmd);
        }
        let child = cmd
            .spawn()
            .map_err(|e| failure(format!("{what} could not start: {e}"), ""))?;
        let pid = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32));
        let _group = pid.map(crate::build::KillGroup);
        // The network comes up before the install runs; it goes with it.
        let _slirp = match private {
            Some(net) => match net.start().await {
                Ok(guard) => Some(guard),
                Err(e) => {
                    // Most likely bubblewrap itself stopped: say how.
                    let ended = tokio::time::timeout(Duration::from_secs(2), child.wait_with_output()).await;
                    let (status, output) = match ended {
                        Ok(Ok(out)) => (
                            out.status.to_string(),
                            String::from_utf8_lossy(&out.stderr).into_owned(),
                        ),
                        _ => ("still running".to_owned(), String::new()),
                    };
                    tracing::warn!(%status, stderr = %output.trim(), error = %e, "an install's private network did not come up");
                    return Err(failure(
                        format!("{what}: {NO_NETWORK} ({e}; the sandbox: {status})"),
                        &output,
                    ));
                }
            },
            None => None,
        };
        let output = match tokio::time::timeout(self.config.timeout, child.wait_with_output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => return Err(failure(format!("{what} failed: {e}"), "")),
            Err(_) => {
                return Err(failure(
                    format!(
                        "{what} took longer than {} s (DEPS_INSTALL_TIMEOUT_SECS) and was stopped",
                        self.config.timeout.as_secs()
                    ),
                    "",
                ));
            }
        };
        if output.status.success() {
            return Ok(());
        }
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let text = text.replace(&*work.to_string_lossy(), ".");
        let message = match confined.as_ref().and_then(crate::cgroups::Confinement::explain) {
            Some(why) => format!("{what} was stopped: {why}"),
            None => format!("{what} failed ({})", output.status),
        };
        Err(failure(message, &text))
    }
}

/// Without `install.scripts`: a requirement that names a source
/// distribution, a directory or a VCS checkout directly (pip builds those
/// whatever `--only-binary` says, running their code) is refused.
fn refuse_source_references(deps: &Dependencies) -> Result<(), BuildFailure> {
    let Some((_, requirements)) = deps.files.iter().find(|(name, _)| name == "requirements.txt") else {
        return Ok(());
    };
    for line in String::from_utf8_lossy(requirements).lines() {
        let line = line.split(" #").next().unwrap_or_default().trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let lower = line.to_ascii_lowercase();
        let direct = lower.starts_with('.')
            || lower.starts_with('/')
            || lower.starts_with("-e")
            || lower.starts_with("--editable")
            || lower.contains("://")
            || lower.contains(" @ ")
            || lower.starts_with("file:");
        let source = [
            "git+", "hg+", "svn+", "bzr+", ".tar.gz", ".tgz", ".tar.bz2", ".zip", ".tar",
        ]
        .iter()
        .any(|s| lower.contains(s));
        let option = lower.starts_with('-') && !lower.starts_with("-e") && !lower.starts_with("--editable");
        if !option && (direct || source) && !lower.trim_end().ends_with(".whl") {
            return Err(failure(
                format!(
                    "requirement {:?} is built from source, which runs its code at install; \
                     give a wheel, or allow it with \"install\": {{\"scripts\": true}}",
                    line.chars().take(120).collect::<String>()
                ),
                "",
            ));
        }
    }
    Ok(())
}

fn failure(message: String, output: &str) -> BuildFailure {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(MAX_MESSAGE_LINES)..].join("\n");
    BuildFailure {
        message,
        messages: if tail.is_empty() { vec![] } else { vec![tail] },
    }
}

/// The environment of an install: nothing of the controller's but where
/// the system's CA certificates and a proxy are (pip and npm fetch over
/// HTTPS; a host behind a proxy reaches the index through it).
fn install_env() -> Vec<(String, String)> {
    const KEEP: [&str; 10] = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "SSL_CERT_FILE",
        "PIP_CERT",
        "NODE_EXTRA_CA_CERTS",
        "REQUESTS_CA_BUNDLE",
    ];
    let mut env: Vec<(String, String)> = KEEP
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    // The system's CA bundle, which a host behind a TLS-inspecting proxy
    // has its CA in: pip and Node otherwise use bundles of their own.
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    for name in ["PIP_CERT", "NODE_EXTRA_CA_CERTS"] {
        if Path::new(bundle).is_file() && !env.iter().any(|(k, _)| k == name) {
            env.push((name.into(), bundle.into()));
        }
    }
    env.extend(
        [
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
            ("HOME", "/tmp"),
            ("LANG", "C.UTF-8"),
            ("npm_config_cache", "/tmp/npm-cache"),
            ("npm_config_update_notifier", "false"),
            // A registry that refuses is retried a few seconds, not a minute.
            ("npm_config_fetch_retry_mintimeout", "1000"),
            ("npm_config_fetch_retry_maxtimeout", "4000"),
            ("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    env
}

/// Marks the install at `dir` as made or used now, for
/// [`Installer::collect`].
fn touch(dir: &Path) {
    if let Err(e) = crate::unused::touch(dir) {
        tracing::debug!(path = %dir.display(), error = %e, "marking an install as used");
    }
}

/// Bytes of the files under `dir` (links not followed).
fn tree_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            tree_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Makes `dir` root's (the controller's), directories 0755 and files 0644
/// (0755 when they were executable); symbolic links are kept as they are.
fn seal(dir: &Path) -> std::io::Result<()> {
    let owner = rustix::process::geteuid().as_raw();
    std::os::unix::fs::lchown(dir, Some(owner), Some(owner))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            seal(&path)?;
        } else if kind.is_file() {
            std::os::unix::fs::lchown(&path, Some(owner), Some(owner))?;
            let executable = entry.metadata()?.permissions().mode() & 0o111 != 0;
            let mode = if executable { 0o755 } else { 0o644 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        } else {
            std::os::unix::fs::lchown(&path, Some(owner), Some(owner))?;
        }
    }
    Ok(())
}
