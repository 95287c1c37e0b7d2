//! Builds Rust functions: a crate (a `Cargo.toml` and `src/`) written against
//! the `fnrt-sdk` crate becomes a native library (`rust-*` functions, loaded
//! by the Rust runtime) or a WASI command module (`wasm-*` functions whose
//! entrypoint is `Cargo.toml`).
//!
//! - A build is keyed by what it is made of (target + the crate's files), so
//!   the same source is built once however many versions or functions share
//!   it; the artifact lands in `DATA_DIR/builds/{key}/` and survives restarts.
//!   The crate's files go to `{target dir}/crates/{key}/`, a path that
//!   depends on the files only, so cargo finds its earlier work there.
//! - Builds run one at a time (cargo locks its target directory anyway) in a
//!   work directory per tenant ([`Tenant`]: the subject that registered the
//!   function, or the bundled functions), shared by the tenant's functions,
//!   so the dependencies of its second build of anything are already
//!   compiled. A build's code (build scripts, proc macros) sees its tenant's
//!   directory only: no other tenant's sources, compiled dependencies or
//!   downloaded crates, which it could read or tamper with.
//! - `fnrt-sdk = "0.1"` in a function's `Cargo.toml` is patched to this
//!   repository's `runtimes/rust/sdk`.
//! - cargo runs with a scrubbed environment: a build script never sees the
//!   controller's secrets or database URL.
//!
//! Registration waits for the build ([`Builder::build`]); functions found
//! another way (bundled, or registered by another replica) are built in the
//! background ([`Builder::ensure`]) and initialize answers "not ready" until
//! the artifact exists. Background builds end with the application
//! ([`Builder::shutdown`]), cargo's whole process group with them.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::{Semaphore, watch};

use fnrt_core::artifact::{BuildFailure, BuildState, Target};

use crate::cgroups::{Confinement, StepCaps};
use crate::netns::PrivateNetwork;
use crate::sandbox::{BuildSandbox, chown_tree};

#[derive(Debug, Clone)]
pub struct BuilderConfig {
    pub cargo: String,
    /// `runtimes/rust/sdk`.
    pub sdk_dir: PathBuf,
    /// The builds' work directories (`tenants/{tenant}/` each: the
    /// crates, cargo's target directory, cargo's home).
    pub target_dir: PathBuf,
    /// `DATA_DIR/builds`.
    pub builds_dir: PathBuf,
    /// Longest a build may take.
    pub timeout: Duration,
    /// How long a failed background build stands before a function's next
    /// initialize tries it again (the network or the disk may be back).
    pub retry_failed_after: Duration,
    /// The uid builds run as when the controller is root.
    pub build_uid: u32,
    /// What each build step may take (memory, tasks).
    pub caps: StepCaps,
}

pub struct Builder {
    config: BuilderConfig,
    /// sha256 of the SDK as builds see it: part of every build key, so an
    /// SDK that changed rebuilds every crate against it.
    sdk_hash: String,
    /// The walls builds run in; `None` without bubblewrap.
    sandbox: Option<BuildSandbox>,
    /// The toolchain `cargo` runs (its `bin/` holds cargo and rustc).
    sysroot: Option<PathBuf>,
    /// One build at a time.
    queue: Semaphore,
    /// Builds this process started or finished, by key; a receiver sees the
    /// state change when the build ends.
    states: Mutex<HashMap<String, watch::Receiver<BuildState>>>,
    /// When each failed build may be tried again by [`Builder::ensure`].
    retry_at: Mutex<HashMap<String, Instant>>,
    /// Whether the `wasm32-wasip1` standard library is known to be
    /// installed (checked, and installed through rustup when missing, until
    /// it is).
    wasm_target: tokio::sync::Mutex<bool>,
    /// Background builds under way (finished ones are pruned as new ones
    /// start); `None` once the builder is shut down.
    background: Mutex<Option<Vec<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Changes whenever the way a crate is laid out for cargo changes, so no
/// build of an older layout is reused (the SDK's own changes are in the key
/// through its hash).
const BUILD_FORMAT: u32 = 5;
/// Most compiler messages kept from a failed build.
const MAX_MESSAGES: usize = 20;
/// Most bytes of one message kept.
const MAX_MESSAGE_BYTES: usize = 8 * 1024;

impl Builder {
    pub fn new(config: BuilderConfig) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.builds_dir)?;
        std::fs::create_dir_all(&config.target_dir)?;
        let mut config = config;
        config.target_dir = config.target_dir.canonicalize()?;
        config.sdk_dir = config
            .sdk_dir
            .canonicalize()
            .map_err(|e| anyhow::anyhow!("the Rust SDK {} is missing: {e}", config.sdk_dir.display()))?;
        // Builds get a copy of the SDK that stands alone: the original
        // inherits from this repository's workspace, whose other members a
        // build must not need to see.
        let staged = config.builds_dir.with_file_name("sdk");
        let sdk_hash = stage_sdk(&config.sdk_dir, &staged)
            .map_err(|e| anyhow::anyhow!("copying the Rust SDK to {}: {e:#}", staged.display()))?;
        config.sdk_dir = staged;
        let sysroot = toolchain_sysroot(&config.cargo);
        let uid = rustix::process::geteuid().is_root().then_some(config.build_uid);
        // What a build sees of the host: the toolchain, the SDK, a cargo
        // given by path (with its folder), and its own work directory.
        let mut read_only: Vec<PathBuf> = sysroot.iter().cloned().collect();
        read_only.push(config.sdk_dir.clone());
        if config.cargo.contains('/')
            && let Some(dir) = Path::new(&config.cargo)
                .canonicalize()
                .ok()
                .and_then(|c| c.parent().map(Path::to_path_buf))
        {
            read_only.push(dir);
        }
        // Each build is given its tenant's directory to write ([`Builder::cargo`]).
        let sandbox = BuildSandbox::detect(uid, read_only, Vec::new(), config.caps);
        match &sandbox {
            Some(s) if !s.private_network() => tracing::warn!(
                uid,
                "Rust builds run in bubblewrap, but slirp4netns is not installed: `cargo fetch` shares the host's \
                 network, its loopback included (apt-get install slirp4netns)"
            ),
            Some(_) => tracing::info!(uid, "Rust builds run in bubblewrap"),
            None => tracing::warn!(
                "bubblewrap (bwrap) is not installed: Rust builds run as the controller's user, unwalled \
                 (apt-get install bubblewrap)"
            ),
        }
        std::fs::create_dir_all(config.target_dir.join("tenants"))?;
        for dir in [&config.builds_dir, &config.target_dir] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Arc::new(Builder {
            config,
            sdk_hash,
            sandbox,
            sysroot,
            queue: Semaphore::new(1),
            wasm_target: tokio::sync::Mutex::new(false),
            states: Mutex::new(HashMap::new()),
            retry_at: Mutex::new(HashMap::new()),
            background: Mutex::new(Some(Vec::new())),
        }))
    }

    /// The build key of a crate: the SDK, its target, its tenant and every
    /// file (the same files of two tenants are two builds: each in its own
    /// work directory).
    pub fn key(&self, target: Target, tenant: &Tenant, files: &BTreeMap<String, String>) -> String {
        build_key(&self.sdk_hash, target, tenant, files)
    }

    /// A tenant's work directory, made (and given to the builds' uid) on
    /// its first build.
    fn work_dir(&self, tenant: &Tenant) -> std::io::Result<PathBuf> {
        let dir = self.config.target_dir.join("tenants").join(tenant.dir_name());
        std::fs::create_dir_all(dir.join("crates"))?;
        if let Some(uid) = self.sandbox.as_ref().and_then(BuildSandbox::uid) {
            use std::os::unix::fs::MetadataExt;
            // Left by a run with another build uid: the whole tree, once.
            if std::fs::metadata(&dir)?.uid() != uid || std::fs::metadata(dir.join("crates"))?.uid() != uid {
                chown_tree(&dir, uid)?;
            }
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(dir)
    }

    fn artifact_path(&self, key: &str, target: Target) -> PathBuf {
        self.config.builds_dir.join(key).join(target.artifact_name())
    }

    /// The build's state here, without starting anything: a finished
    /// artifact on disk counts as ready even after a restart.
    pub fn state(&self, target: Target, tenant: &Tenant, files: &BTreeMap<String, String>) -> Option<BuildState> {
        let key = self.key(target, tenant, files);
        if let Some(rx) = self.states.lock().unwrap().get(&key) {
            return Some(rx.borrow().clone());
        }
        let artifact = self.artifact_path(&key, target);
        artifact.is_file().then_some(BuildState::Ready(artifact))
    }

    /// Starts a background build unless one exists (or failed only a short
    /// while ago); returns the state.
    pub fn ensure(self: &Arc<Self>, target: Target, tenant: &Tenant, files: &BTreeMap<String, String>) -> BuildState {
        match self.state(target, tenant, files) {
            Some(BuildState::Failed(failure)) => {
                let key = self.key(target, tenant, files);
                let mut retry_at = self.retry_at.lock().unwrap();
                match retry_at.get(&key) {
                    Some(at) if Instant::now() < *at => return BuildState::Failed(failure),
                    // Once per period, however many initializes ask.
                    _ => retry_at.insert(key, Instant::now() + self.config.retry_failed_after),
                };
            }
            Some(state) => return state,
            None => {}
        }
        let mut background = self.background.lock().unwrap();
        // Shut down: nothing starts any more.
        let Some(background) = background.as_mut() else {
            return BuildState::Building;
        };
        background.retain(|task| !task.is_finished());
        let this = self.clone();
        let files = files.clone();
        let tenant = tenant.clone();
        background.push(tokio::spawn(async move {
            let _ = this.build(target, &tenant, &files).await;
        }));
        BuildState::Building
    }

    /// Stops the background builds under way (dropping a build kills cargo's
    /// process group) and starts no more: part of the application's stop,
    /// so that an application embedded in a longer-lived process (the
    /// tests) leaves no cargo behind, as the controller's exit does.
    pub async fn shutdown(&self) {
        let tasks = self.background.lock().unwrap().take().unwrap_or_default();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Builds the crate (or waits for the build already under way) and
    /// returns the artifact.
    pub async fn build(
        &self,
        target: Target,
        tenant: &Tenant,
        files: &BTreeMap<String, String>,
    ) -> Result<PathBuf, BuildFailure> {
        let key = self.key(target, tenant, files);
        let artifact = self.artifact_path(&key, target);
        let (mut rx, tx) = {
            let mut states = self.states.lock().unwrap();
            match states.get(&key) {
                // A failed build is tried again: the failure may have been
                // the network or the disk, and a registration asks anew.
                Some(rx) if !matches!(*rx.borrow(), BuildState::Failed(_)) => (rx.clone(), None),
                _ => {
                    let (tx, rx) = watch::channel(BuildState::Building);
                    states.insert(key.clone(), rx.clone());
                    (rx, Some(tx))
                }
            }
        };
        if let Some(tx) = tx {
            let state = if artifact.is_file() {
                BuildState::Ready(artifact.clone())
            } else {
                let _turn = self.queue.acquire().await;
                match self.run_cargo(&key, target, tenant, files, &artifact).await {
                    Ok(()) => BuildState::Ready(artifact.clone()),
                    Err(failure) => {
                        let retry = Instant::now() + self.config.retry_failed_after;
                        self.retry_at.lock().unwrap().insert(key.clone(), retry);
                        BuildState::Failed(failure)
                    }
                }
            };
            let _ = tx.send(state);
        }
        loop {
            match &*rx.borrow_and_update() {
                BuildState::Ready(path) => return Ok(path.clone()),
                BuildState::Failed(failure) => return Err(failure.clone()),
                BuildState::Building => {}
            }
            if rx.changed().await.is_err() {
                return Err(BuildFailure {
                    message: "the build was abandoned".into(),
                    messages: vec![],
                });
            }
        }
    }

    async fn run_cargo(
        &self,
        key: &str,
        target: Target,
        tenant: &Tenant,
        files: &BTreeMap<String, String>,
        artifact: &Path,
    ) -> Result<(), BuildFailure> {
        let failure = |message: String| BuildFailure {
            message,
            messages: vec![],
        };
        let dir = self.config.builds_dir.join(key);
        let work = self
            .work_dir(tenant)
            .map_err(|e| failure(format!("preparing the work directory: {e}")))?;
        let src = work.join("crates").join(key);
        let package = std::fs::create_dir_all(&dir)
            .and_then(|_| write_crate(&src, key, files))
            .map_err(|e| failure(format!("writing the crate: {e}")))?;

        if target == Target::Wasm {
            let mut installed = self.wasm_target.lock().await;
            if !*installed {
                ensure_wasm_target(&self.config.cargo).await.map_err(failure)?;
                *installed = true;
            }
        }
        if let Some(uid) = self.sandbox.as_ref().and_then(BuildSandbox::uid) {
            chown_tree(&src, uid).map_err(|e| failure(format!("preparing the crate: {e}")))?;
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let patch = format!(
            "patch.crates-io.fnrt-sdk.path={}",
            toml_string(&self.config.sdk_dir.to_string_lossy())
        );
        let timed_out = || {
            failure(format!(
                "the build took longer than {} s",
                self.config.timeout.as_secs()
            ))
        };
        if self.sandbox.is_some() {
            // Dependencies come first, with the network; the build that runs
            // the crate's code comes after, without it.
            let (fetch, net, confined) = self
                .cargo(
                    &work,
                    &src,
                    &["fetch".into(), "--config".into(), patch.clone().into()],
                    true,
                )
                .map_err(|e| failure(format!("preparing cargo: {e}")))?;
            match tokio::time::timeout_at(deadline, run_quietly(fetch, net)).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(e)) => return Err(failure(format!("starting cargo: {e}"))),
                Ok(Ok((true, _))) => {}
                Ok(Ok((false, output))) => {
                    forget_if_too_large(confined.as_ref(), tenant, &work);
                    let message = match confined.as_ref().and_then(Confinement::explain) {
                        Some(why) => format!("fetching the crate's dependencies was stopped: {why}"),
                        None => "fetching the crate's dependencies failed".into(),
                    };
                    return Err(BuildFailure {
                        message,
                        messages: vec![self.strip_paths(&output, &src, &work)],
                    });
                }
            }
        }
        let mut args: Vec<std::ffi::OsString> =
            ["rustc", "--lib", "--release", "--message-format=json", "--target-dir"]
                .map(Into::into)
                .to_vec();
        args.push(work.clone().into());
        args.extend(["--config".into(), patch.into()]);
        if self.sandbox.is_some() {
            args.push("--offline".into());
        }
        match target {
            // Panics must unwind so the SDK can catch them and report where.
            Target::Native => args.extend(
                [
                    "--crate-type",
                    "cdylib",
                    "--config",
                    "profile.release.panic=\"unwind\"",
                    "--config",
                    "profile.release.strip=\"debuginfo\"",
                ]
                .map(Into::into),
            ),
            // The SDK's export! expands to `main` on wasm: a WASI command.
            Target::Wasm => args.extend(["--crate-type", "bin", "--target", WASM_TARGET].map(Into::into)),
        };
        let (mut cmd, _, confined) = self
            .cargo(&work, &src, &args, false)
            .map_err(|e| failure(format!("preparing cargo: {e}")))?;
        let mut child = cmd
            .spawn()
            .map_err(|e| failure(format!("starting {}: {e}", self.config.cargo)))?;
        let pid = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32));
        // Whatever ends this build early (the timeout, a shutdown dropping
        // the task) takes cargo's whole process group with it: rustc and
        // build scripts are cargo's children.
        let _group = pid.map(KillGroup);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let reading = async {
            let (diagnostics, built) = read_messages(stdout, &src.join("Cargo.toml")).await;
            let mut cargo_output = String::new();
            if let Some(mut err) = stderr {
                let _ = err.read_to_string(&mut cargo_output).await;
            }
            let status = child.wait().await;
            (diagnostics, built, cargo_output, status)
        };
        let (diagnostics, built, cargo_output, status) = match tokio::time::timeout_at(deadline, reading).await {
            Ok(done) => done,
            Err(_) => return Err(timed_out()),
        };
        let succeeded = matches!(status, Ok(s) if s.success());
        let built = built.into_iter().find(|p| {
            let ext = p.extension().and_then(|e| e.to_str());
            matches!(
                (target, ext),
                (Target::Native, Some("so")) | (Target::Wasm, Some("wasm"))
            )
        });
        match (succeeded, built) {
            (true, Some(built)) => {
                let tmp = dir.join(format!("{}.tmp", target.artifact_name()));
                std::fs::copy(&built, &tmp)
                    .and_then(|_| std::fs::rename(&tmp, artifact))
                    .map_err(|e| failure(format!("keeping the artifact: {e}")))?;
                tracing::info!(key, ?target, secs = started.elapsed().as_secs_f32(), "function built");
                Ok(())
            }
            (true, None) => Err(failure(
                "cargo built no library: is the crate a library (src/lib.rs) with fnrt_sdk::export!?".into(),
            )),
            (false, _) => {
                let mut messages = diagnostics;
                if messages.is_empty() {
                    // cargo failed before compiling (manifest, resolution):
                    // its own output says why.
                    messages = vec![self.strip_paths(&cargo_output, &src, &work)];
                }
                for m in &mut messages {
                    *m = m
                        .replace(&unique_name(key), &package)
                        .replace(&unique_name(key).replace('-', "_"), &package.replace('-', "_"));
                }
                messages.truncate(MAX_MESSAGES);
                let errors = messages.iter().filter(|m| m.starts_with("error")).count();
                forget_if_too_large(confined.as_ref(), tenant, &work);
                let message = match confined.as_ref().and_then(Confinement::explain) {
                    Some(why) => format!("the build was stopped: {why}"),
                    None => format!("the build failed with {} error(s)", errors.max(1)),
                };
                Err(BuildFailure { message, messages })
            }
        }
    }
}

impl Builder {
    /// cargo with `args` in `dir`: inside the sandbox when there is one,
    /// which may write the tenant's work directory `work` and nothing else
    /// of the host (the network only when `network`), with the environment
    /// a build gets. With the network and slirp4netns, also its private
    /// network, to start once cargo is spawned; in the sandbox, the
    /// cgroups that cap the step, to keep until it has ended.
    fn cargo(
        &self,
        work: &Path,
        dir: &Path,
        args: &[std::ffi::OsString],
        network: bool,
    ) -> std::io::Result<(tokio::process::Command, Option<PrivateNetwork>, Option<Confinement>)> {
        let toolchain_cargo = self.sysroot.as_ref().map(|s| s.join("bin").join("cargo"));
        let mut private = None;
        let mut cmd = match (&self.sandbox, toolchain_cargo) {
            (Some(sandbox), Some(toolchain_cargo)) => {
                // The toolchain's own cargo: rustup's proxies live in a home
                // the build does not see.
                let program = match self.config.cargo.as_str() {
                    "cargo" => toolchain_cargo,
                    other => PathBuf::from(other),
                };
                let (bwrap, wrapped, net) = sandbox
                    .writing(vec![work.to_path_buf()])
                    .wrap(&program, args, dir, network)?;
                let mut cmd = tokio::process::Command::new(bwrap);
                cmd.args(wrapped).env_clear().envs(self.sandboxed_env(work));
                private = net;
                cmd
            }
            _ => {
                let mut cmd = tokio::process::Command::new(&self.config.cargo);
                // Unwalled (no bubblewrap): writers are trusted, and the
                // user's cargo home is used as it is.
                cmd.args(args).current_dir(dir).env_clear().envs(build_env());
                cmd
            }
        };
        cmd.env("CARGO_TERM_COLOR", "never")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        die_with_controller(cmd.as_std_mut());
        let confined = match &self.sandbox {
            Some(sandbox) => {
                let mut confined = sandbox.confine(cmd.as_std_mut())?;
                confined.watch_disk(work.to_path_buf());
                Some(confined)
            }
            None => None,
        };
        if let Some(net) = &private {
            net.prepare(&mut cmd);
        }
        Ok((cmd, private, confined))
    }

    /// The environment inside the sandbox: the toolchain first on `PATH`,
    /// cargo's home in the work directory, nothing of the controller's.
    fn sandboxed_env(&self, work: &Path) -> Vec<(String, String)> {
        let bin = self
            .sysroot
            .as_ref()
            .map(|s| format!("{}:", s.join("bin").display()))
            .unwrap_or_default();
        vec![
            ("PATH".into(), format!("{bin}/usr/local/bin:/usr/bin:/bin")),
            ("HOME".into(), "/tmp".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("CARGO_HOME".into(), work.join("cargo-home").display().to_string()),
            // As many jobs as the step's CPU quota runs at once: more would
            // take more memory for no speed.
            ("CARGO_BUILD_JOBS".into(), self.jobs().to_string()),
        ]
    }

    /// cargo's parallel jobs: the CPUs a step may use, rounded up, or the
    /// machine's.
    fn jobs(&self) -> usize {
        let machine = std::thread::available_parallelism().map_or(1, usize::from);
        match self.config.caps.cpus {
            cpus if cpus > 0.0 => (cpus.ceil() as usize).clamp(1, machine),
            _ => machine,
        }
    }

    /// cargo's own output without the host paths it names.
    fn strip_paths(&self, output: &str, src: &Path, work: &Path) -> String {
        let mut out = output.replace(&*src.to_string_lossy(), ".");
        out = out.replace(&*self.config.sdk_dir.to_string_lossy(), "fnrt-sdk");
        out = out.replace(&*work.to_string_lossy(), "target");
        if let Some(sysroot) = &self.sysroot {
            out = out.replace(&*sysroot.to_string_lossy(), "toolchain");
        }
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| !l.trim_start().starts_with("Updating") && !l.trim_start().starts_with("Locking"))
            .collect();
        let joined = lines.join("\n");
        joined.chars().take(MAX_MESSAGE_BYTES).collect()
    }
}

/// Runs a command to its end (in its private network, if given); whether
/// it succeeded, and its stderr.
async fn run_quietly(mut cmd: tokio::process::Command, net: Option<PrivateNetwork>) -> std::io::Result<(bool, String)> {
    let child = cmd.spawn()?;
    let pid = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32));
    let _group = pid.map(KillGroup);
    let _slirp = match net {
        Some(net) => Some(net.start().await?),
        None => None,
    };
    let out = child.wait_with_output().await?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// Copies the SDK crate (`Cargo.toml` and `src/`) to `dest`, with the
/// fields it inherits from its workspace (`edition.workspace = true`, ...)
/// written out, readable by every uid (it is public source).
fn stage_sdk(sdk: &Path, dest: &Path) -> anyhow::Result<String> {
    let mut manifest: toml::Table = std::fs::read_to_string(sdk.join("Cargo.toml"))?.parse()?;
    let workspace = sdk
        .ancestors()
        .skip(1)
        .map(|d| d.join("Cargo.toml"))
        .filter_map(|m| std::fs::read_to_string(m).ok()?.parse::<toml::Table>().ok())
        .find_map(|t| t.get("workspace")?.get("package")?.as_table().cloned())
        .unwrap_or_default();
    if let Some(toml::Value::Table(package)) = manifest.get_mut("package") {
        for (key, value) in package.iter_mut() {
            let inherited = value.get("workspace").and_then(toml::Value::as_bool) == Some(true);
            if inherited && let Some(from) = workspace.get(key) {
                *value = from.clone();
            }
        }
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest)?;
    }
    let readable = |path: &Path, mode: u32| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    std::fs::create_dir_all(dest)?;
    readable(dest, 0o755)?;
    let manifest = manifest.to_string();
    let mut hash = Sha256::new();
    hash.update(manifest.as_bytes());
    std::fs::write(dest.join("Cargo.toml"), manifest)?;
    readable(&dest.join("Cargo.toml"), 0o644)?;
    let mut pending = vec![PathBuf::from("src")];
    while let Some(relative) = pending.pop() {
        std::fs::create_dir_all(dest.join(&relative))?;
        readable(&dest.join(&relative), 0o755)?;
        // In name order, so that the hash is the same for the same files.
        let mut entries = std::fs::read_dir(sdk.join(&relative))?.collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = relative.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                pending.push(name);
            } else {
                let bytes = std::fs::read(entry.path())?;
                hash.update(name.to_string_lossy().as_bytes());
                hash.update(bytes.len().to_le_bytes());
                hash.update(&bytes);
                std::fs::write(dest.join(&name), bytes)?;
                readable(&dest.join(&name), 0o644)?;
            }
        }
    }
    Ok(hex::encode(hash.finalize()))
}

/// The build key of a crate built against the SDK whose hash is `sdk`.
/// Whose build it is: builds of one tenant share a work directory, and
/// never see another's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Tenant {
    /// Functions with no owner: the bundled ones (managed by holders of
    /// `admin:functions`).
    Bundled,
    /// The functions a subject registered.
    Owner(String),
}

impl Tenant {
    /// The tenant of a function owned by `owner` (`None`: bundled).
    pub fn of(owner: Option<&str>) -> Self {
        owner.map_or(Tenant::Bundled, |o| Tenant::Owner(o.to_owned()))
    }

    /// Its work directory's name: a subject's name is anything a token
    /// says, so it is hashed into a name that is always a plain one.
    pub fn dir_name(&self) -> String {
        match self {
            Tenant::Bundled => "bundled".into(),
            Tenant::Owner(sub) => {
                let digest = Sha256::digest(format!("owner\0{sub}").as_bytes());
                format!("owner-{}", &hex::encode(digest)[..32])
            }
        }
    }
}

fn build_key(sdk: &str, target: Target, tenant: &Tenant, files: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    h.update(format!("{BUILD_FORMAT}\0{sdk}\0{target:?}\0{}\0", tenant.dir_name()).as_bytes());
    for (path, text) in files {
        h.update(path.as_bytes());
        h.update([0]);
        h.update(text.len().to_le_bytes());
        h.update(text.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The rustc of the toolchain `cargo` belongs to: the one beside it, else
/// the one on `PATH` (rustup's proxies pick the same toolchain).
fn rustc_beside(cargo: &str) -> PathBuf {
    Path::new(cargo)
        .parent()
        .map(|dir| dir.join("rustc"))
        .filter(|rustc| rustc.is_file())
        .unwrap_or_else(|| PathBuf::from("rustc"))
}

/// The sysroot of the toolchain `cargo` belongs to (`rustc --print sysroot`
/// beside it, or on `PATH`).
fn toolchain_sysroot(cargo: &str) -> Option<PathBuf> {
    let out = std::process::Command::new(rustc_beside(cargo))
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && sysroot.join("bin").join("cargo").is_file())
        .then(|| sysroot.canonicalize().ok())
        .flatten()
}

/// The target wasm functions are built for.
const WASM_TARGET: &str = "wasm32-wasip1";

/// Makes sure the toolchain that `cargo` runs has the standard library of
/// [`WASM_TARGET`]: a fresh rustup installation has only the host's, and
/// the bundled `wasm-*` crates must build on the first run. Installs it with
/// `rustup target add` when rustup manages the toolchain; otherwise says
/// what to install.
async fn ensure_wasm_target(cargo: &str) -> Result<(), String> {
    let run = |program: &str, args: &[&str]| {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(build_env())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    };
    let rustc = rustc_beside(cargo).to_string_lossy().into_owned();
    let libdir = run(&rustc, &["--print", "target-libdir", "--target", WASM_TARGET])
        .output()
        .await
        .map_err(|e| format!("running {rustc}: {e}"))?;
    let libdir = String::from_utf8_lossy(&libdir.stdout).trim().to_owned();
    let installed = !libdir.is_empty()
        && std::fs::read_dir(&libdir)
            .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libcore-"))));
    if installed {
        return Ok(());
    }
    tracing::info!("installing the {WASM_TARGET} target with rustup (once per toolchain)");
    let mut add = run("rustup", &["target", "add", WASM_TARGET]);
    // The toolchain is read by builds running as another uid: what rustup
    // installs must not take the controller's private umask.
    #[allow(unsafe_code)]
    // SAFETY: umask is one async-signal-safe system call between fork and exec.
    unsafe {
        add.pre_exec(|| {
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
            Ok(())
        });
    }
    let added = add.output().await;
    match added {
        Ok(out) if out.status.success() => {
            tracing::info!("{WASM_TARGET} installed");
            Ok(())
        }
        Ok(out) => Err(format!(
            "the {WASM_TARGET} target is not installed and `rustup target add {WASM_TARGET}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!(
            "the {WASM_TARGET} target is not installed and rustup could not be run ({e}): install \
             the {WASM_TARGET} standard library for the toolchain that runs `{cargo}`"
        )),
    }
}

/// The child (cargo, pip, npm, the wasm compiler) gets SIGKILL when the
/// controller dies, even by SIGKILL (a stopped controller kills a build's
/// whole group itself, see [`KillGroup`]). The signal is tied to the
/// spawning thread: a long-lived tokio worker, or a thread that waits for
/// the child.
///
/// It inherits no descriptor of the controller's past its standard streams
/// ([`crate::sandbox::close_inherited_on_exec`]), and the kernel kills it
/// before the controller should the machine run out of memory
/// ([`crate::sandbox::first_to_go_out_of_memory`]). A private network's
/// `pre_exec` hands bubblewrap its own ends again, so it is registered
/// after this one.
#[allow(unsafe_code)]
pub(crate) fn die_with_controller(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    let controller = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec and makes
    // raw system calls (prctl, getppid, open/write/close, close_range)
    // through rustix and libc, without allocating or taking locks:
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // A controller that died before that line sends no signal.
            if rustix::process::getppid() != Some(controller) {
                return Err(std::io::Error::other("the controller is gone"));
            }
            crate::sandbox::first_to_go_out_of_memory()?;
            crate::sandbox::close_inherited_on_exec()
        });
    }
}

/// Removes a subject's work directory that a step stopped for its size
/// (`BUILD_DISK_MB`): what the build wrote there stays otherwise, and every
/// later build would stop too. Its next build starts from nothing. The
/// bundled functions' directory is the operator's, and replicas may be
/// building in it: kept.
fn forget_if_too_large(confined: Option<&Confinement>, tenant: &Tenant, work: &Path) {
    if confined.is_some_and(Confinement::disk_exceeded)
        && !matches!(tenant, Tenant::Bundled)
        && let Err(e) = std::fs::remove_dir_all(work)
    {
        tracing::warn!(work = %work.display(), error = %e, "removing a work directory past BUILD_DISK_MB");
    }
}

/// Kills cargo's process group when dropped: at the end of a build it
/// removes anything cargo left behind; on a timeout or a shutdown it stops
/// the build itself. (The dropped guard runs right after cargo was reaped,
/// so its pid has not been handed out again.)
pub(crate) struct KillGroup(pub(crate) rustix::process::Pid);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process_group(self.0, rustix::process::Signal::KILL);
    }
}

/// Reads cargo's JSON messages: the rendered errors (then warnings) and the
/// files built for the crate itself (`manifest`; not its dependencies, some
/// of which are shared libraries too: proc macros).
async fn read_messages(stdout: Option<tokio::process::ChildStdout>, manifest: &Path) -> (Vec<String>, Vec<PathBuf>) {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut built = Vec::new();
    let Some(stdout) = stdout else {
        return (errors, built);
    };
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        use cargo_metadata::Message;
        use cargo_metadata::diagnostic::DiagnosticLevel;
        match serde_json::from_str::<Message>(&line) {
            Ok(Message::CompilerMessage(msg)) => {
                let Some(rendered) = msg.message.rendered else {
                    continue;
                };
                let mut rendered = rendered.trim_end().to_owned();
                if rendered.len() > MAX_MESSAGE_BYTES {
                    let mut cut = MAX_MESSAGE_BYTES;
                    while !rendered.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    rendered.truncate(cut);
                }
                match msg.message.level {
                    DiagnosticLevel::Error | DiagnosticLevel::Ice => errors.push(rendered),
                    DiagnosticLevel::Warning if warnings.len() < MAX_MESSAGES => warnings.push(rendered),
                    _ => {}
                }
            }
            Ok(Message::CompilerArtifact(artifact)) if artifact.manifest_path.as_std_path() == manifest => {
                built.extend(artifact.filenames.into_iter().map(PathBuf::from));
            }
            _ => {}
        }
    }
    errors.extend(warnings);
    (errors, built)
}

/// Writes the crate's files to `dir` unless they are there: the directory
/// is named by the build key, so an existing one holds the same files, and
/// the same path lets cargo reuse an earlier build of it (another data dir
/// sharing the target directory, or a controller restarted without its
/// artifacts). Returns the crate's own package name.
fn write_crate(dir: &Path, key: &str, files: &BTreeMap<String, String>) -> std::io::Result<String> {
    let mut package = String::new();
    let members = member_names(key, files);
    let mut manifest = files.get("Cargo.toml").cloned().unwrap_or_default();
    if let Ok(mut table) = manifest.parse::<toml::Table>() {
        // Crates share the target directory, where cargo tells packages
        // apart by name and version, not by path, and names a cdylib's file
        // after the library alone: two functions' crates both called "hello"
        // would pass for one another. Each build gets names of its own (a
        // library's name is not visible to its own code, which says `crate`).
        if let Some(toml::Value::Table(p)) = table.get_mut("package") {
            if let Some(name) = p.get("name").and_then(toml::Value::as_str) {
                package = name.to_owned();
            }
            p.insert("name".into(), toml::Value::String(unique_name(key)));
        }
        if let toml::Value::Table(lib) = table.entry("lib").or_insert(toml::Value::Table(Default::default())) {
            lib.insert("name".into(), toml::Value::String(unique_name(key).replace('-', "_")));
        }
        // A workspace of its own, so a data dir inside another workspace
        // does not confuse cargo.
        table
            .entry("workspace")
            .or_insert(toml::Value::Table(Default::default()));
        rename_path_dependencies(&mut table, "", &members);
        manifest = table.to_string();
    }
    // The crate's other packages (path dependencies in its folders) get
    // names of their own too: cargo keys a workspace member by its path
    // relative to the workspace, so `macro/` of two crates would otherwise
    // be one unit in the shared target dir, compiled once for both.
    let mut rewritten: BTreeMap<&str, String> = BTreeMap::new();
    for (path, text) in files {
        let Some(member_dir) = path.strip_suffix("/Cargo.toml") else {
            continue;
        };
        let Ok(mut table) = text.parse::<toml::Table>() else {
            continue;
        };
        if let Some(toml::Value::Table(p)) = table.get_mut("package")
            && let Some(name) = members.get(member_dir)
        {
            p.insert("name".into(), toml::Value::String(name.clone()));
        }
        rename_path_dependencies(&mut table, member_dir, &members);
        rewritten.insert(path.as_str(), table.to_string());
    }
    if dir.join("Cargo.toml").is_file() {
        return Ok(package);
    }
    let tmp = dir.with_extension(format!("tmp{}", rand::random::<u32>()));
    std::fs::create_dir_all(&tmp)?;
    for (path, text) in files {
        // Paths were checked at registration: relative, plain components.
        let file = tmp.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let text = match (path.as_str(), rewritten.get(path.as_str())) {
            ("Cargo.toml", _) => &manifest,
            (_, Some(member)) => member,
            _ => text,
        };
        std::fs::write(file, text)?;
    }
    if std::fs::rename(&tmp, dir).is_err() {
        if !dir.join("Cargo.toml").is_file() {
            // Not another controller's crate but what is left of one (a
            // cargo that wrote its lock file after the crate was removed):
            // replaced, else every build of it would fail.
            let _ = std::fs::remove_dir_all(dir);
            if std::fs::rename(&tmp, dir).is_ok() {
                return Ok(package);
            }
        }
        // Another controller wrote the same crate first.
        std::fs::remove_dir_all(&tmp)?;
    }
    Ok(package)
}

/// The names the crate's other packages (a `Cargo.toml` in a folder of its
/// files) build under, by folder.
fn member_names(key: &str, files: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    files
        .keys()
        .filter_map(|path| path.strip_suffix("/Cargo.toml"))
        .enumerate()
        .map(|(i, folder)| (folder.to_owned(), format!("{}-dep{i}", unique_name(key))))
        .collect()
}

/// Points every path dependency of a manifest (in folder `at` of the crate)
/// on one of the crate's packages at its build name, keeping the name the
/// code uses (`package = ...`).
fn rename_path_dependencies(manifest: &mut toml::Table, at: &str, members: &BTreeMap<String, String>) {
    fn tables(manifest: &mut toml::Table) -> Vec<&mut toml::Table> {
        let mut found = Vec::new();
        let mut targets = Vec::new();
        for (key, value) in manifest.iter_mut() {
            match (key.as_str(), value) {
                ("dependencies" | "dev-dependencies" | "build-dependencies", toml::Value::Table(t)) => found.push(t),
                ("target", toml::Value::Table(t)) => targets.push(t),
                _ => {}
            }
        }
        for target in targets {
            for (_, cfg) in target.iter_mut() {
                if let toml::Value::Table(cfg) = cfg {
                    found.extend(tables(cfg));
                }
            }
        }
        found
    }
    for deps in tables(manifest) {
        for (_, dep) in deps.iter_mut() {
            let toml::Value::Table(dep) = dep else { continue };
            let Some(path) = dep.get("path").and_then(toml::Value::as_str) else {
                continue;
            };
            // The folder it names, relative to the crate's root.
            let mut parts: Vec<&str> = at.split('/').filter(|p| !p.is_empty()).collect();
            for part in path.split('/') {
                match part {
                    "" | "." => {}
                    ".." => {
                        parts.pop();
                    }
                    other => parts.push(other),
                }
            }
            if let Some(name) = members.get(&parts.join("/")) {
                dep.insert("package".into(), toml::Value::String(name.clone()));
            }
        }
    }
}

/// The package name a build uses.
fn unique_name(key: &str) -> String {
    format!("fnrt-build-{}", &key[..16])
}

/// The environment cargo gets: what it needs to find the toolchain and its
/// registry cache, nothing of the controller's configuration.
fn build_env() -> Vec<(String, String)> {
    const KEEP: [&str; 8] = [
        "PATH",
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
        "TMPDIR",
        "LANG",
        "CARGO_NET_OFFLINE",
    ];
    KEEP.iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_changes_with_any_file_the_target_the_tenant_and_the_sdk() {
        let mut files = BTreeMap::from([("Cargo.toml".to_owned(), "a".to_owned())]);
        let alice = Tenant::of(Some("alice"));
        let a = build_key("sdk", Target::Native, &alice, &files);
        assert_eq!(a, build_key("sdk", Target::Native, &Tenant::of(Some("alice")), &files));
        assert_ne!(a, build_key("sdk", Target::Wasm, &alice, &files));
        assert_ne!(a, build_key("another sdk", Target::Native, &alice, &files));
        assert_ne!(a, build_key("sdk", Target::Native, &Tenant::of(Some("bob")), &files));
        assert_ne!(a, build_key("sdk", Target::Native, &Tenant::Bundled, &files));
        files.insert("src/lib.rs".into(), String::new());
        assert_ne!(a, build_key("sdk", Target::Native, &alice, &files));
    }

    #[tokio::test]
    async fn a_work_directory_that_cannot_be_made_fails_the_build_with_its_reason() {
        // Arrange: a builder whose tenant's work directory is blocked by a file.
        let root = tempfile::tempdir().unwrap();
        let builder = Builder::new(BuilderConfig {
            cargo: "cargo".into(),
            sdk_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runtimes/rust/sdk"),
            target_dir: root.path().join("target"),
            builds_dir: root.path().join("data/builds"),
            timeout: Duration::from_secs(60),
            retry_failed_after: Duration::from_secs(60),
            build_uid: 65_000,
            caps: StepCaps {
                memory_bytes: 1 << 30,
                max_tasks: 1024,
                disk_bytes: 1 << 30,
                cpus: 0.0,
            },
        })
        .unwrap();
        let tenant = Tenant::of(Some("alice"));
        let blocked = root.path().join("target/tenants").join(tenant.dir_name());
        std::fs::write(&blocked, "not a directory").unwrap();
        let files = BTreeMap::from([("Cargo.toml".to_owned(), "[package]\nname = \"f\"\n".to_owned())]);

        // Act
        let failed = builder.build(Target::Native, &tenant, &files).await.unwrap_err();

        // Assert: the reason, no artifact, and the failure is the build's state.
        assert!(
            failed.message.starts_with("preparing the work directory: "),
            "{}",
            failed.message
        );
        // A registering client reads this message: no host path in it.
        assert!(
            !failed.message.contains(root.path().to_str().unwrap()),
            "{}",
            failed.message
        );
        assert!(matches!(
            builder.state(Target::Native, &tenant, &files),
            Some(BuildState::Failed(_))
        ));
        assert_eq!(
            std::fs::read_to_string(&blocked).unwrap(),
            "not a directory",
            "the file was left as it was"
        );
    }

    #[test]
    fn a_crate_directory_left_without_its_manifest_is_written_again() {
        // Arrange: what a cargo that outlived its crate's removal leaves.
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("crates").join("key");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("Cargo.lock"), "# left").unwrap();
        let files = BTreeMap::from([
            ("Cargo.toml".to_owned(), "[package]\nname = \"f\"\n".to_owned()),
            ("src/lib.rs".to_owned(), String::new()),
        ]);

        // Act
        write_crate(&dir, "0123456789abcdef0123", &files).unwrap();

        // Assert: the crate is whole again, and a whole one is kept as it is.
        assert!(dir.join("Cargo.toml").is_file());
        assert!(dir.join("src/lib.rs").is_file());
        std::fs::write(dir.join("Cargo.lock"), "# cargo's").unwrap();
        write_crate(&dir, "0123456789abcdef0123", &files).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("Cargo.lock")).unwrap(), "# cargo's");
    }

    #[test]
    fn a_tenants_directory_is_a_plain_name_of_its_own() {
        let odd = Tenant::of(Some("../../etc/x"));
        let name = odd.dir_name();
        assert!(name.starts_with("owner-") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_ne!(name, Tenant::of(Some("alice")).dir_name());
        assert_ne!(Tenant::of(Some("bundled")).dir_name(), Tenant::Bundled.dir_name());
    }
}
