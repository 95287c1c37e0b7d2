//! The process backend: each instance is a child process of the controller
//! running a language's runtime server (`runtimes/{language}/`): `node` or
//! `python3` with the server script, or, for Rust, the controller's own
//! executable as `controller runtime-rust`, which loads the function's built
//! library (sent as base64 in `/init`).
//!
//! What an instance gets, when the controller is root and bubblewrap is
//! installed (the walls are [`crate::sandbox::Walls`]):
//! - a uid of its own (`INSTANCE_UID_BASE` + n, no passwd entry needed),
//!   never another live instance's on this host, and never one whose
//!   processes still live ([`crate::uids`]);
//! - its own PID namespace: every process it starts dies with it, however
//!   it forked; its own network namespace (only its own loopback: neither
//!   the controller, nor Redis, nor the database, nor anything else), or,
//!   for a function with `network.egress`, one given the internet by
//!   slirp4netns and narrowed to what the manifest lists
//!   ([`crate::egress`]);
//! - its own root: the system read-only, the runtime it runs, a directory
//!   bound at `/run/runtime` that holds only its socket, and private,
//!   size-capped tmpfs mounts (`INSTANCE_SCRATCH_MB` each) at its home
//!   (`/home/function`, also its cwd), `/tmp`, `/var/tmp`, `/dev/shm` and
//!   `/run`, gone with it; nothing of the data dir;
//! - the uid's cgroups: v1 `pids`, so an instance whose processes grew (a
//!   process or a zombie left behind) is not handed out again, and v1
//!   `memory`, capped at the manifest's `limits.memory_mb`: all its
//!   processes and its scratch space together, no swap; v1 `cpu`, a quota
//!   of `INSTANCE_CPUS` for all its processes and threads together; v1
//!   `cpuacct`, read between calls by the idle sweep;
//! - a scrubbed environment (`PATH`, `HOME`, `LANG`, `TMPDIR`; the
//!   function's own variables arrive with `/init`);
//! - resource limits: data memory (`RLIMIT_DATA`: counts the heap of both
//!   V8 and CPython, unlike `RLIMIT_AS`, which V8's large address-space
//!   reservations exhaust at once), processes, open files, file size, no
//!   core dumps; `SIGXFSZ` ignored, so a write past the file-size limit
//!   fails with `EFBIG` inside the function instead of killing the instance;
//! - `PR_SET_PDEATHSIG`, so it dies with the controller.
//!
//! As root without bubblewrap, an instance gets its own uid, cgroup, limits
//! and (mount namespace) `/tmp`, and start-up warns that the network, the
//! host's files and other scratch space are not walled off. Not as root,
//! instances run as the controller's user with limits only.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use rustix::process::{Pid, Resource, Rlimit, Signal};
use tokio::net::unix::pipe;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::budget::{MemoryBudget, Refusal, Reservation};
use crate::build::Builder;
use crate::cgroups::{CpuQuota, MemoryCgroup};
use crate::deps::Installer;
use crate::idle::{IdleWatch, Sweeper};
use crate::netns::{PrivateNetwork, Setup, SlirpGuard};
use crate::packages::PackageStore;
use crate::sandbox::Walls;
use crate::uids::{UidLease, UidPool};
use fnrt_core::function::FunctionVersion;
use fnrt_core::language::Language;
use fnrt_core::logs::{OutputTap, Stream};
use fnrt_core::runtime::protocol::Endpoint;
use fnrt_core::runtime::remote::{Exit, Following, InstanceHandle, RemoteInstance, RemoteSettings};
use fnrt_core::runtime::{Instance, InstanceError, RuntimeBackend, Shape, StartFor};

/// Where instance directories go when the data dir cannot be passed through.
const RUN_DIR: &str = "/run/fnrt";
/// `PATH` inside an instance.
const INSTANCE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Bytes of stdout/stderr kept per instance for crash reports.
const OUTPUT_TAIL_BYTES: usize = 4096;
/// Inside the sandbox: the home and working directory, and where the
/// instance's socket directory is bound.
const SANDBOX_HOME: &str = "/home/function";
const SANDBOX_SOCKET_DIR: &str = "/run/runtime";
/// Inside the sandbox: where the runtime server (script or program) is shown.
const SANDBOX_RUNTIME_DIR: &str = "/opt/fnrt";
/// Processes in a healthy sandboxed instance's cgroup: bubblewrap, its
/// init in the PID namespace, and the runtime server.
const SANDBOX_PROCESSES: usize = 3;

/// Limits applied to every instance.
#[derive(Debug, Clone, Copy)]
pub struct ProcessLimits {
    pub max_processes: u64,
    pub max_open_files: u64,
    pub max_file_bytes: u64,
    /// Size of each private scratch mount (home, `/tmp`, `/var/tmp`, `/dev/shm`, `/run`).
    pub scratch_bytes: u64,
    /// CPUs all of an instance's processes together may use (a quota in
    /// its uid's `cpu` cgroup); `None`: no quota.
    pub cpus: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Parent of the instance directories (`DATA_DIR/instances`).
    pub instances_dir: PathBuf,
    /// Folder holding `nodejs/server.js` and `python/server.py`.
    pub runtimes_dir: PathBuf,
    pub node_bin: String,
    pub python_bin: String,
    pub limits: ProcessLimits,
    /// First uid of the range instances run as when the controller is root.
    pub instance_uid_base: u32,
    /// Size of that range: the most instances that can exist at once.
    pub instance_uid_count: u32,
    /// The memory all instances together may reserve, in MiB ([`MemoryBudget`]).
    pub memory_mb: u64,
    /// Largest runtime answer (result included), in bytes.
    pub max_result_bytes: usize,
    /// The program that serves the Rust runtime when given the arguments
    /// `runtime-rust --socket PATH`: the controller's own executable (a
    /// program embedding the application names the controller binary).
    pub rust_runtime: Option<PathBuf>,
    /// Builds Rust functions (the artifact is what `/init` loads).
    pub builder: Option<Arc<Builder>>,
}

/// How to start one language's runtime server.
#[derive(Debug, Clone)]
struct Launcher {
    program: PathBuf,
    args: Vec<String>,
    /// The same inside bubblewrap, which shows the runtime (a server
    /// script, the controller binary) at a place of its own.
    sandboxed: (PathBuf, Vec<String>),
    /// What bubblewrap must show, read-only: (host path, path inside).
    sees: Vec<(PathBuf, PathBuf)>,
    /// Added after `--socket` when the instance is `/init`ed right away (a
    /// cold start): the Node and Python runtimes' `--no-warm-up`, since a
    /// start-up warm-up only pays off for an instance that waits in the pool.
    init_now_args: Vec<String>,
}

pub struct ProcessBackend {
    instances_dir: PathBuf,
    /// Per language: how to start it, or why it cannot be started.
    launchers: HashMap<Language, Result<Launcher, String>>,
    /// Uids to drop to, one per instance, when running as root.
    uids: Option<Arc<UidPool>>,
    /// What instances' memory caps may add up to.
    budget: Arc<MemoryBudget>,
    /// Stops instances that work between their calls.
    sweeper: Arc<Sweeper>,
    /// bubblewrap, when the controller is root and it is installed.
    bwrap: Option<PathBuf>,
    /// slirp4netns and nft, for functions with `network.egress`.
    egress_tools: Result<(PathBuf, PathBuf), String>,
    /// Without bubblewrap: whether instances get their `tmp/` mounted over
    /// `/tmp` (root, and the data dir is not itself under `/tmp`, which the
    /// mount would hide).
    mounted_tmp: bool,
    limits: ProcessLimits,
    /// What every instance is given: the result cap, where artifacts are.
    remote: RemoteSettings,
    /// Builds Rust functions.
    builder: Option<Arc<Builder>>,
    /// Multi-file functions' files.
    packages: Arc<PackageStore>,
    /// Installs packages' dependencies.
    installer: Option<Arc<Installer>>,
    /// The controller's files socket, linked into instances' directories.
    files_socket: Option<PathBuf>,
    /// The directory of its own under `/run/fnrt` when the data dir could
    /// not be used; removed with the backend (it holds copies of runtimes).
    own_root: Option<PathBuf>,
}

impl Drop for ProcessBackend {
    fn drop(&mut self) {
        if let Some(root) = &self.own_root {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

impl std::fmt::Debug for ProcessBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessBackend")
            .field("launchers", &self.launchers)
            .finish_non_exhaustive()
    }
}

impl ProcessBackend {
    /// Prepares the backend: resolves interpreters and the instance user, and
    /// clears instance directories left by an earlier run.
    pub fn new(config: ProcessConfig) -> anyhow::Result<Self> {
        let uids = match rustix::process::geteuid().is_root() {
            true => Some(UidPool::new(config.instance_uid_base, config.instance_uid_count)?),
            false => None,
        };
        let others_only = uids.is_some();
        let bwrap = others_only.then(crate::sandbox::find_bwrap).flatten();
        match (others_only, &bwrap) {
            (true, Some(_)) => tracing::info!("instances run in bubblewrap"),
            (true, None) => tracing::warn!(
                "bubblewrap (bwrap) is not installed: instances get their own uid and /tmp, but share the \
                 host's network (the controller, Redis and the database on 127.0.0.1), files and other scratch \
                 space (apt-get install bubblewrap)"
            ),
            (false, _) => {
                tracing::warn!("the controller is not root: instances run as its user, with resource limits only")
            }
        }
        let instances_dir = if others_only {
            reachable_instances_dir(&config.instances_dir)?
        } else {
            config.instances_dir.clone()
        };
        if instances_dir.exists() {
            std::fs::remove_dir_all(&instances_dir)?;
        }
        std::fs::create_dir_all(&instances_dir)?;
        // Instances must reach their own directory through this one.
        std::fs::set_permissions(&instances_dir, std::fs::Permissions::from_mode(0o711))?;
        let instances_dir = instances_dir.canonicalize()?;
        // Without bubblewrap, a private /tmp is the instance's tmp/ mounted
        // over it, which a data dir under /tmp would hide.
        let mounted_tmp = others_only && bwrap.is_none() && !instances_dir.starts_with("/tmp");
        if others_only && bwrap.is_none() && !mounted_tmp {
            tracing::warn!("the data dir is under /tmp: instances get a private TMPDIR but share /tmp");
        }
        // What an instance runs must be visible from inside its sandbox: a
        // file its uid cannot reach, or one under the /tmp its private /tmp
        // hides, is copied beside the instance directories first.
        let sight = Sight {
            others_only,
            // bubblewrap shows an instance what it runs wherever it lies.
            private_tmp: mounted_tmp,
            staging: instances_dir.with_file_name("bin"),
        };
        let mut launchers = HashMap::new();
        let runtimes: [(Language, &str, &str, &[&str]); 2] = [
            (Language::Nodejs, &config.node_bin, "nodejs/server.js", &[]),
            // -I: ignore PYTHON* variables and the user site directory; -S:
            // no `.pth` hooks of the host at every start (the server puts
            // the system's site-packages on sys.path itself).
            (Language::Python, &config.python_bin, "python/server.py", &["-I", "-S"]),
        ];
        for (language, bin, server, flags) in runtimes {
            let launcher = sight.program(bin).and_then(|program| {
                let server = config.runtimes_dir.join(server);
                let server = server
                    .canonicalize()
                    .map_err(|e| format!("runtime server {} not found: {e}", server.display()))?;
                let mut server = sight.stage(&server, language.as_str())?;
                if language == Language::Python {
                    // Run as a script, server.py would be compiled at every
                    // start (a script's bytecode is never cached): an
                    // instance runs its bytecode, compiled here once.
                    let compiled = precompile_python(&program, &server, &sight.staging.join("python"));
                    match compiled.and_then(|c| match sight.sees(&c) {
                        true => Ok(c),
                        false => Err(format!("{} is not visible from inside an instance", c.display())),
                    }) {
                        Ok(compiled) => server = compiled,
                        Err(e) => tracing::warn!(error = %e, "the Python runtime runs from source (slower starts)"),
                    }
                }
                let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
                let inside = Path::new(SANDBOX_RUNTIME_DIR).join(server.file_name().unwrap_or_default());
                let root = install_root(&program);
                Ok(Launcher {
                    args: [&flags[..], &[server.to_string_lossy().into_owned()]].concat(),
                    sandboxed: (
                        program.clone(),
                        [&flags[..], &[inside.to_string_lossy().into_owned()]].concat(),
                    ),
                    sees: vec![(root.clone(), root), (server, inside)],
                    program,
                    init_now_args: match language {
                        Language::Nodejs | Language::Python => vec!["--no-warm-up".to_owned()],
                        _ => Vec::new(),
                    },
                })
            });
            if let Err(e) = &launcher {
                tracing::warn!(%language, error = %e, "runtime unavailable");
            }
            launchers.insert(language, launcher);
        }
        let rust = match (&config.rust_runtime, &config.builder) {
            (Some(program), Some(_)) => sight.stage(program, "rust").map(|program| {
                let args = vec!["runtime-rust".to_owned()];
                let inside = Path::new(SANDBOX_RUNTIME_DIR).join("controller");
                Launcher {
                    sees: vec![(program.clone(), inside.clone())],
                    sandboxed: (inside, args.clone()),
                    program,
                    args,
                    init_now_args: Vec::new(),
                }
            }),
            (None, _) => Err("no Rust runtime program configured".to_owned()),
            (_, None) => Err("Rust functions cannot be built here".to_owned()),
        };
        if let Err(e) = &rust {
            tracing::warn!(language = %Language::Rust, error = %e, "runtime unavailable");
        }
        launchers.insert(Language::Rust, rust);
        // Beside the instance directories: the same filesystem, for links.
        let packages = Arc::new(PackageStore::new(
            instances_dir.with_file_name("packages"),
            others_only,
        )?);
        let own_root = instances_dir
            .starts_with(RUN_DIR)
            .then(|| instances_dir.parent().map(Path::to_path_buf))
            .flatten();
        let egress_tools = match (crate::netns::find_slirp(), crate::egress::find_nft()) {
            _ if bwrap.is_none() => Err("instances do not run in bubblewrap here".to_owned()),
            (Some(slirp), Some(nft)) => Ok((slirp, nft)),
            (slirp, nft) => Err(format!(
                "{} not installed (apt-get install slirp4netns nftables)",
                [
                    slirp.is_none().then_some("slirp4netns"),
                    nft.is_none().then_some("nftables")
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" and ")
            )),
        };
        if let Err(e) = &egress_tools
            && bwrap.is_some()
        {
            tracing::warn!("functions whose manifest allows egress ('network.egress') cannot start: {e}");
        }
        Ok(ProcessBackend {
            instances_dir,
            launchers,
            uids,
            budget: MemoryBudget::new(config.memory_mb),
            sweeper: Arc::default(),
            bwrap,
            egress_tools,
            mounted_tmp,
            limits: config.limits,
            own_root,
            packages,
            installer: None,
            files_socket: None,
            builder: config.builder.clone(),
            remote: RemoteSettings {
                max_result_bytes: config.max_result_bytes,
                artifacts: config
                    .builder
                    .map(|b| Arc::new(crate::BuiltArtifacts(b)) as Arc<dyn fnrt_core::runtime::Artifacts>),
            },
        })
    }
}

impl ProcessBackend {
    /// Multi-file functions' files, which other backends' instances are
    /// given too; and where instance directories are (links from the store
    /// need the same filesystem).
    /// Links the controller's files socket into every instance's directory
    /// (it must be on the instances' filesystem).
    pub fn set_files_socket(&mut self, socket: PathBuf) {
        self.files_socket = Some(socket);
    }

    pub fn packages(&self) -> (Arc<PackageStore>, &Path) {
        (self.packages.clone(), &self.instances_dir)
    }

    /// The instance uids (as root): containers take theirs from the same
    /// range, so that no two instances on the host share one.
    pub fn uids(&self) -> Option<Arc<UidPool>> {
        self.uids.clone()
    }

    /// What every instance of a runtime server is given.
    pub fn remote_settings(&self) -> RemoteSettings {
        self.remote.clone()
    }

    /// The interpreter a language's instances run (Node, Python), as
    /// resolved at start-up: dependencies are installed for it.
    pub fn program(&self, language: Language) -> Option<PathBuf> {
        match self.launchers.get(&language) {
            Some(Ok(launcher)) if matches!(language, Language::Nodejs | Language::Python) => {
                Some(launcher.program.clone())
            }
            _ => None,
        }
    }

    /// Gives the backend the installer of packages' dependencies.
    pub fn set_installer(&mut self, installer: Arc<Installer>) {
        self.installer = Some(installer);
    }
}

/// The first `name` on `PATH` (or `name` itself, given as a path).
pub fn find_program(name: &str) -> Option<PathBuf> {
    find_programs(name).into_iter().next()
}

#[async_trait]
impl RuntimeBackend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    fn languages(&self) -> Vec<Language> {
        let mut languages: Vec<_> = self.launchers.keys().copied().collect();
        languages.sort();
        languages
    }

    async fn ready(&self, function: &fnrt_core::function::FunctionVersion) -> Result<(), InstanceError> {
        // A cap larger than the whole budget never fits: said here, where
        // it is the function's doing, not the runtime's (a failed start
        // marks the language unhealthy for a while).
        let memory_mb = Shape::of(function).memory_mb;
        self.budget
            .fits_at_all(memory_mb)
            .map_err(|refusal| memory_refused(function.language(), memory_mb, refusal))?;
        crate::crate_ready(self.builder.as_ref(), function)?;
        crate::dependencies_dir(self.installer.as_ref(), function).map(drop)
    }

    async fn start(
        &self,
        language: Language,
        shape: &Shape,
        purpose: StartFor,
    ) -> Result<Box<dyn Instance>, InstanceError> {
        let unavailable = |message: String| InstanceError::Unavailable { language, message };
        let memory_mb = shape.memory_mb;
        // A function with egress: a network of its own, narrowed to its list.
        let egress = match (&self.egress_tools, shape.network.is_empty()) {
            (_, true) => None,
            (Ok((slirp, nft)), false) => {
                let plan = crate::egress::Plan::resolve(&shape.network).await;
                let setup = Setup {
                    resolv: plan.resolv,
                    hosts: Some(plan.hosts),
                    rules: Some((nft.clone(), plan.ruleset)),
                };
                Some(
                    PrivateNetwork::new(slirp.clone(), setup)
                        .map_err(|e| unavailable(format!("preparing the instance's network: {e}")))?,
                )
            }
            // Without bubblewrap an instance has the host's network anyway.
            (Err(_), false) if self.bwrap.is_none() => None,
            (Err(e), false) => {
                return Err(unavailable(format!(
                    "this function's manifest allows egress ('network.egress'), but {e}"
                )));
            }
        };
        let launcher = match self.launchers.get(&language) {
            Some(Ok(l)) => l,
            Some(Err(e)) => return Err(unavailable(e.clone())),
            None => return Err(unavailable("not served by the process backend".into())),
        };
        let id = hex::encode(rand::random::<[u8; 6]>());
        let dir = self.instances_dir.join(&id);
        let socket = dir.join("rt.sock");
        // sun_path holds 108 bytes including the terminating NUL.
        if socket.as_os_str().len() > 100 {
            return Err(unavailable(format!(
                "data dir path is too long for a Unix socket ({})",
                socket.display()
            )));
        }
        // Its memory cap, reserved for its life: the pool makes room (stops
        // idle instances) or waits for some when the budget is spent.
        let reservation = self
            .budget
            .reserve(memory_mb)
            .map_err(|refusal| memory_refused(language, memory_mb, refusal))?;
        let uid = match &self.uids {
            Some(pool) => Some(pool.allocate().ok_or_else(|| InstanceError::Exhausted {
                language,
                message: "every instance uid is in use".into(),
            })?),
            None => None,
        };
        let memory = match &uid {
            Some(lease) => lease
                .limit_memory(memory_mb * 1024 * 1024)
                .map_err(|e| unavailable(format!("capping the instance's memory (its uid's memory cgroup): {e}")))?,
            None => None,
        };
        // Its CPU time during calls: a quota, so that one instance's threads
        // never take every core from the controller and its neighbours.
        let cpu = match (&uid, self.limits.cpus) {
            (Some(lease), Some(cpus)) => lease
                .limit_cpu(cpus)
                .map_err(|e| unavailable(format!("capping the instance's CPU (its uid's cpu cgroup): {e}")))?,
            _ => None,
        };
        // Its CPU time, watched between calls ([`crate::idle`]).
        let idle = match &uid {
            Some(lease) => match (
                lease.account_cpu().map_err(|e| {
                    unavailable(format!(
                        "counting the instance's CPU time (its uid's cpuacct cgroup): {e}"
                    ))
                })?,
                &lease.cgroup,
            ) {
                (Some(cpu), Some(pids)) => Some(IdleWatch::new(id.clone(), cpu, pids.path().to_path_buf())),
                _ => None,
            },
            None => None,
        };
        prepare_dir(&dir, uid.as_ref().map(|u| u.uid))
            .map_err(|e| unavailable(format!("creating {}: {e}", dir.display())))?;
        crate::link_files_socket(self.files_socket.as_deref(), &dir);

        // Given after `--socket`, inside bubblewrap or not.
        let extra: &[String] = match purpose {
            StartFor::Init => &launcher.init_now_args,
            StartFor::Pool => &[],
        };
        let mut cmd = match (&self.bwrap, &uid) {
            (Some(bwrap), Some(lease)) => {
                let scratch = Some(self.limits.scratch_bytes);
                let walls = Walls {
                    network: false,
                    private_network: egress.as_ref().map(PrivateNetwork::bwrap_args),
                    read_only: launcher.sees.clone(),
                    writable: vec![(dir.clone(), PathBuf::from(SANDBOX_SOCKET_DIR))],
                    scratch: [SANDBOX_HOME, "/tmp", "/var/tmp", "/dev/shm", "/run"]
                        .into_iter()
                        .map(|p| (PathBuf::from(p), scratch))
                        .collect(),
                    uid: Some(lease.uid),
                    cwd: PathBuf::from(SANDBOX_HOME),
                };
                let (program, args) = &launcher.sandboxed;
                let mut args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
                args.push("--socket".into());
                args.push(Path::new(SANDBOX_SOCKET_DIR).join("rt.sock").into());
                args.extend(extra.iter().map(Into::into));
                let mut cmd = Command::new(bwrap);
                cmd.args(walls.args(program, &args))
                    .env_clear()
                    .env("HOME", SANDBOX_HOME)
                    .env("TMPDIR", "/tmp");
                cmd
            }
            _ => {
                let mut cmd = Command::new(&launcher.program);
                cmd.args(&launcher.args)
                    .arg("--socket")
                    .arg(&socket)
                    .args(extra)
                    .env_clear()
                    .env("HOME", &dir)
                    .env("TMPDIR", dir.join("tmp"))
                    .current_dir(&dir);
                cmd
            }
        };
        cmd.env("PATH", INSTANCE_PATH)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let sandbox = match &uid {
            Some(lease) => {
                // Without bubblewrap: the instance's own tmp/ mounted over /tmp.
                let tmp = if self.mounted_tmp {
                    cmd.env("TMPDIR", "/tmp");
                    let path = dir.join("tmp").into_os_string().into_encoded_bytes();
                    Some(std::ffi::CString::new(path).map_err(|_| unavailable("instance path contains NUL".into()))?)
                } else {
                    None
                };
                Some(Sandbox {
                    // bubblewrap changes the uid itself, after its mounts.
                    uid: self.bwrap.is_none().then_some(lease.uid),
                    tmp,
                    cgroups: [
                        lease.cgroup.as_ref().map(|c| c.join_path()),
                        memory.as_ref().map(|m| m.join_path()),
                        idle.as_ref().map(|w| w.cpu.join_path()),
                        cpu.as_ref().map(CpuQuota::join_path),
                    ],
                })
            }
            None => None,
        };
        limit_child(&mut cmd, self.limits, memory_mb * 1024 * 1024, sandbox);
        if let Some(network) = &egress {
            network.prepare(&mut cmd);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                // The error may come from the sandbox set-up between fork and
                // exec (a mount, the uid change) as much as from exec itself.
                return Err(unavailable(format!(
                    "starting {} in the instance sandbox (instance directory {}): {e}",
                    launcher.program.display(),
                    dir.display()
                )));
            }
        };
        let pid = child.id().and_then(|p| Pid::from_raw(p as i32));
        let pipes = match (child.stdout.take(), child.stderr.take()) {
            (Some(out), Some(err)) => Output::pipes(out, err),
            _ => Err(std::io::Error::other("its stdout and stderr were not piped")),
        };
        let pipes = pipes
            .inspect_err(|e| {
                tracing::warn!(instance = %id, error = %e, "an instance's output cannot be read; its runs keep no logs");
            })
            .ok();
        let output = Arc::new(Output::new(pipes));
        // One task for both pipes: output on both at once (a crash's last
        // words) is one wake instead of two.
        if output.pipes.is_some() {
            let (o, e) = (output.clone(), output.clone());
            tokio::spawn(async move { tokio::join!(drain(o, Stream::Stdout), drain(e, Stream::Stderr)) });
        }
        // Watched once it answers: its start-up is work before any call.
        let watched = idle.clone();
        let mut handle = ProcessHandle {
            id,
            child,
            pid,
            dir,
            output,
            terminated: false,
            in_bwrap: self.bwrap.is_some(),
            memory,
            cpu,
            idle,
            uid,
            _reservation: reservation,
            packages: self.packages.clone(),
            installer: self.installer.clone(),
            slirp: None,
        };
        if let Some(network) = egress {
            match network.start().await {
                Ok(slirp) => handle.slirp = Some(slirp),
                Err(e) => {
                    handle.terminate().await;
                    return Err(unavailable(format!("starting the instance's network: {e}")));
                }
            }
        }
        // In bubblewrap the runtime writes nothing in its directory but its
        // socket (its working directory is a tmpfs); without it, it works
        // there, and the directory stays its own.
        let seal = self
            .bwrap
            .as_ref()
            .and(handle.uid.as_ref())
            .map(|lease| (handle.dir.clone(), lease.uid));
        let mut instance = RemoteInstance::connect(
            Box::new(handle),
            Endpoint::Unix(socket),
            language,
            shape.clone(),
            &self.remote,
        )
        .await?;
        if let Some((dir, gid)) = seal
            && let Err(e) = crate::seal_instance_dir(&dir, gid)
        {
            instance.terminate().await;
            return Err(unavailable(format!("sealing {}: {e}", dir.display())));
        }
        if let Some(watch) = &watched {
            self.sweeper.watch(watch);
        }
        Ok(Box::new(instance))
    }
}

/// What a start whose memory cap the budget refused fails with: no room
/// now is `Exhausted` (the pool makes room or waits), larger than the whole
/// budget is `Unavailable`.
fn memory_refused(language: Language, memory_mb: u64, refusal: Refusal) -> InstanceError {
    match refusal {
        Refusal::Full { .. } => InstanceError::Exhausted {
            language,
            message: format!("no room for another instance of {memory_mb} MiB: {refusal}"),
        },
        Refusal::TooLarge { .. } => InstanceError::Unavailable {
            language,
            message: format!("this function's memory (limits.memory_mb, {memory_mb} MiB) is {refusal}"),
        },
    }
}

/// Where instance directories go when the controller is root: under the
/// data dir when instance users can pass through every directory above it,
/// else (a data dir under `/root`, mode 0700) in a directory of its own under
/// `/run/fnrt`, named after the data dir.
fn reachable_instances_dir(wanted: &Path) -> anyhow::Result<PathBuf> {
    if ancestors_searchable(wanted) {
        return Ok(wanted.to_path_buf());
    }
    let mut h = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(wanted, &mut h);
    let own = Path::new(RUN_DIR).join(format!("{:016x}", std::hash::Hasher::finish(&h)));
    for dir in [own.parent().unwrap_or(&own), &own] {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    }
    let blocked = wanted
        .ancestors()
        .skip(1)
        .find(|d| !d.metadata().is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    tracing::warn!(
        blocked = %blocked.unwrap_or(wanted).display(),
        instances = %own.display(),
        "instance users cannot pass through the data dir's parents; instance directories live elsewhere"
    );
    Ok(own.join("instances"))
}

/// What an instance can see of the host's files.
#[derive(Debug)]
struct Sight {
    /// Instances run as another user: only what others may read and run.
    others_only: bool,
    /// Instances have a private `/tmp`: nothing under the host's `/tmp`.
    private_tmp: bool,
    /// Where files an instance could not see are copied.
    staging: PathBuf,
}

impl Sight {
    fn sees(&self, path: &Path) -> bool {
        let Ok(meta) = path.metadata() else { return false };
        let mode = meta.permissions().mode();
        !(self.private_tmp && path.starts_with("/tmp"))
            && (!self.others_only || (mode & 0o005 == 0o005 && ancestors_searchable(path)))
    }

    /// An interpreter found on `PATH` (or given as a path) that an instance can run.
    /// The first on `PATH` that an instance sees (a pyenv shim under
    /// `/root` is passed over for `/usr/bin/python3`).
    fn program(&self, name: &str) -> Result<PathBuf, String> {
        let found = find_programs(name);
        if let Some(program) = found.iter().find(|p| self.sees(p)) {
            return Ok(program.clone());
        }
        match found.first() {
            None => Err(format!("{name} not found on PATH")),
            Some(program) => Err(format!(
                "{} cannot be run from inside an instance's sandbox (it must be readable and \
                 executable by other users{}); set its path to one that is",
                program.display(),
                if self.private_tmp { ", and not under /tmp" } else { "" }
            )),
        }
    }

    /// `file` itself when an instance sees it, else a copy of it in the
    /// staging directory (under `name`).
    fn stage(&self, file: &Path, name: &str) -> Result<PathBuf, String> {
        let file = file
            .canonicalize()
            .map_err(|e| format!("{} not found: {e}", file.display()))?;
        if self.sees(&file) {
            return Ok(file);
        }
        let dir = self.staging.join(name);
        let copy = dir.join(file.file_name().unwrap_or(std::ffi::OsStr::new("program")));
        // A copy from an earlier start is kept: the controller binary is
        // hundreds of MB, and a restart must not copy it again.
        let current = |(src, dst): (std::fs::Metadata, std::fs::Metadata)| {
            src.len() == dst.len() && src.modified().ok() <= dst.modified().ok()
        };
        if file.metadata().ok().zip(copy.metadata().ok()).is_some_and(current) && self.sees(&copy) {
            return Ok(copy);
        }
        let staged = (|| {
            for d in [&self.staging, &dir] {
                std::fs::create_dir_all(d)?;
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))?;
            }
            let tmp = copy.with_extension("tmp");
            std::fs::copy(&file, &tmp)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
            std::fs::rename(&tmp, &copy)
        })();
        staged.map_err(|e| format!("copying {} to {}: {e}", file.display(), copy.display()))?;
        if !self.sees(&copy) {
            return Err(format!("{} is not visible from inside an instance", copy.display()));
        }
        Ok(copy)
    }
}

/// Compiles the Python runtime `server` with `python` (the interpreter
/// instances run: its bytecode format) into `dir`/server.pyc, which
/// `python server.pyc` runs as it would the script. Its frames name the
/// source where a sandboxed instance sees it, not the host's path.
fn precompile_python(python: &Path, server: &Path, dir: &Path) -> Result<PathBuf, String> {
    const COMPILE: &str = "import py_compile, sys; \
        py_compile.compile(sys.argv[1], cfile=sys.argv[2], dfile=sys.argv[3], doraise=True)";
    let compiled = dir.join("server.pyc");
    let made = (|| {
        std::fs::create_dir_all(dir)?;
        for d in [dir.parent().unwrap_or(dir), dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))?;
        }
        let out = std::process::Command::new(python)
            .args(["-I", "-S", "-c", COMPILE])
            .arg(server)
            .arg(&compiled)
            .arg(Path::new(SANDBOX_RUNTIME_DIR).join("server.py"))
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        // As every staged file: what an instance runs is readable and
        // executable by others (`Sight::sees`).
        std::fs::set_permissions(&compiled, std::fs::Permissions::from_mode(0o755))
    })();
    made.map_err(|e| format!("compiling {} to {}: {e}", server.display(), compiled.display()))?;
    Ok(compiled)
}

/// The instance directory, with `tmp/`, owned by the instance user.
fn prepare_dir(dir: &Path, uid: Option<u32>) -> std::io::Result<()> {
    std::fs::create_dir(dir)?;
    std::fs::create_dir(dir.join("tmp"))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some(uid) = uid {
        std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
        std::os::unix::fs::chown(dir.join("tmp"), Some(uid), Some(uid))?;
    }
    Ok(())
}

/// What the child does before exec when the controller is root: join its
/// uid's cgroups and, without bubblewrap, take its uid and a private `/tmp`
/// in a mount namespace of its own. Prepared before the fork, because the
/// child may not allocate.
#[derive(Debug)]
struct Sandbox {
    uid: Option<u32>,
    /// The instance's `tmp/` to mount over `/tmp`.
    tmp: Option<std::ffi::CString>,
    /// The `tasks` of the uid's cgroups (`pids`, `memory`, `cpuacct`,
    /// `cpu`), joined by the child.
    cgroups: [Option<std::ffi::CString>; 4],
}

/// Sets up the child between fork and exec: private `/tmp` and own uid (as
/// root), resource limits, parent-death signal.
#[allow(unsafe_code)]
fn limit_child(cmd: &mut Command, limits: ProcessLimits, memory_bytes: u64, sandbox: Option<Sandbox>) {
    let rl = |n: u64| Rlimit {
        current: Some(n),
        maximum: Some(n),
    };
    // SAFETY: the closure runs in the forked (single-threaded) child before
    // exec; it only makes raw system calls (open/write/close, unshare,
    // mount, setres[ug]id, setgroups, setrlimit, prctl, signal, getppid,
    // close_range) through rustix and libc on data prepared before the
    // fork, without allocating or taking locks, so it is async-signal-safe.
    // unshare(NEWNS) shares no file descriptors, the hazard of unshare_unsafe.
    let controller = rustix::process::getpid();
    unsafe {
        cmd.pre_exec(move || {
            // Before any uid change: a process that changed its uid no
            // longer owns its own /proc entries (it is not dumpable).
            crate::sandbox::first_to_go_out_of_memory()?;
            if let Some(sandbox) = &sandbox {
                use rustix::mount::{MountPropagationFlags, mount_bind, mount_change};
                use rustix::thread::{set_thread_groups, set_thread_res_gid, set_thread_res_uid};
                for tasks in sandbox.cgroups.iter().flatten() {
                    crate::cgroups::join_cgroup(tasks)?;
                }
                // Mounts need root, so they come before the uid changes.
                if let Some(tmp) = &sandbox.tmp {
                    rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS)?;
                    mount_change(c"/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)?;
                    mount_bind(tmp.as_c_str(), c"/tmp")?;
                }
                if let Some(id) = sandbox.uid {
                    let gid = rustix::process::Gid::from_raw(id);
                    let uid = rustix::process::Uid::from_raw(id);
                    set_thread_groups(&[])?;
                    set_thread_res_gid(gid, gid, gid)?;
                    set_thread_res_uid(uid, uid, uid)?;
                }
            }
            rustix::process::setrlimit(Resource::Nofile, rl(limits.max_open_files))?;
            rustix::process::setrlimit(Resource::Nproc, rl(limits.max_processes))?;
            rustix::process::setrlimit(Resource::Fsize, rl(limits.max_file_bytes))?;
            rustix::process::setrlimit(Resource::Data, rl(memory_bytes))?;
            rustix::process::setrlimit(Resource::Core, rl(0))?;
            // A write past the file-size limit fails with EFBIG inside the
            // function instead of killing the instance (an ignored signal
            // stays ignored across exec; CPython does the same itself).
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            // Killed with the controller, even by SIGKILL. The signal is tied
            // to the spawning thread: tokio spawns from its long-lived workers.
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // A controller that died between the fork and that line sends
            // no signal: the child is init's already, and must not run.
            if rustix::process::getppid() != Some(controller) {
                return Err(std::io::Error::other("the controller is gone"));
            }
            // Nothing the controller holds open reaches the instance.
            crate::sandbox::close_inherited_on_exec()?;
            Ok(())
        });
    }
}

/// An instance's stdout and stderr: each run's lines go to its logs
/// through the tap; the last bytes are kept for crash reports.
///
/// Between runs the drain task reads the pipes. While a run waits for its
/// answer, the run's own task reads them ([`Output::follow`]): a pipe wakes
/// only the latest task that asked it (tokio's `poll_read_ready`), so a
/// run's output and its answer wake one task instead of two (the second
/// woke the other worker thread: a context switch, and on these machines
/// one costs tens of microseconds). When the run has its answer the pipes
/// are read dry, which takes all the run wrote (a runtime writes it out
/// before it answers: no log marker is needed), and go back to the drain
/// task.
#[derive(Debug)]
struct Output {
    tap: Arc<OutputTap>,
    pipes: Option<[pipe::Receiver; 2]>,
    /// Per stream: held while reading it, and its last bytes.
    tails: [Mutex<VecDeque<u8>>; 2],
    /// Per stream: the drain task's waker, to hand the pipe back to.
    drains: [Mutex<Option<Waker>>; 2],
}

/// Reads from a pipe at once, at most, before letting other tasks run.
const READS_PER_TURN: usize = 16;

/// Rounds of [`READS_PER_TURN`] reads a run's pipes get after its answer:
/// 1 MiB, what the largest pipe an unprivileged process can ask for holds
/// (`/proc/sys/fs/pipe-max-size`). More is a flood from something the run
/// left running, and is the drain task's.
const HAND_BACK_READS: usize = 8;

/// How a read of whatever a pipe holds ended.
enum Read {
    /// Nothing more is there for now.
    Drained,
    /// [`READS_PER_TURN`] reads, and there may be more.
    More,
    /// The pipe has ended (the server is gone).
    Ended,
}

impl Output {
    fn new(pipes: Option<[pipe::Receiver; 2]>) -> Self {
        Output {
            tap: OutputTap::new(),
            pipes,
            tails: Default::default(),
            drains: Default::default(),
        }
    }

    /// A child's stdout and stderr as pipes that can be read from any task.
    fn pipes(out: ChildStdout, err: ChildStderr) -> std::io::Result<[pipe::Receiver; 2]> {
        Ok([
            pipe::Receiver::from_owned_fd(out.into_owned_fd()?)?,
            pipe::Receiver::from_owned_fd(err.into_owned_fd()?)?,
        ])
    }

    fn tail(&self, stream: Stream) -> String {
        let buf = self.tails[stream.index()].lock().unwrap();
        let (a, b) = buf.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).into_owned()
    }

    /// Reads what `stream`'s pipe holds now, without waiting: to the tap,
    /// and to the tail. `past_readiness`: asks the pipe itself, not tokio's
    /// last word on it (which is news from the event loop, and may not have
    /// heard yet of bytes that are there).
    fn read_now(&self, pipe: &pipe::Receiver, stream: Stream, past_readiness: bool) -> Read {
        let mut tail = self.tails[stream.index()].lock().unwrap();
        let mut chunk = [0u8; 8192];
        for _ in 0..READS_PER_TURN {
            let read = if past_readiness {
                rustix::io::read(pipe, &mut chunk).map_err(std::io::Error::from)
            } else {
                pipe.try_read(&mut chunk)
            };
            match read {
                Ok(0) => return Read::Ended,
                Ok(n) => {
                    self.tap.feed(stream, &chunk[..n]);
                    tail.extend(&chunk[..n]);
                    let excess = tail.len().saturating_sub(OUTPUT_TAIL_BYTES);
                    tail.drain(..excess);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Read::Drained,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Read::Ended,
            }
        }
        Read::More
    }

    /// Reads `stream` until its pipe is empty, then leaves `cx`'s task to
    /// be woken when it is readable again. Ready once the pipe has ended.
    fn poll_read(&self, stream: Stream, cx: &mut Context<'_>) -> Poll<()> {
        let Some(pipes) = &self.pipes else {
            return Poll::Ready(());
        };
        let pipe = &pipes[stream.index()];
        loop {
            match pipe.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => match self.read_now(pipe, stream, false) {
                    Read::Drained => {}
                    Read::Ended => return Poll::Ready(()),
                    Read::More => {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                },
            }
        }
    }

    /// Reads what `stream`'s pipe holds now, up to [`HAND_BACK_READS`]
    /// rounds, whatever the event loop has seen of it.
    fn read_dry(&self, stream: Stream) {
        let Some(pipes) = &self.pipes else { return };
        for _ in 0..HAND_BACK_READS {
            if !matches!(self.read_now(&pipes[stream.index()], stream, true), Read::More) {
                return;
            }
        }
    }

    /// The run in progress reads both pipes until this is dropped; then
    /// they are read dry (a runtime has written out all of a run's output
    /// before it answers: this read has it all) and go back to the drain
    /// task. Also when it was never polled: a run's call can end at its
    /// first poll (the runtime answered while the controller's thread was
    /// off the core between sending the request and reading), before this
    /// is first polled, and the output must still be the run's, not left
    /// to the drain task after the run's window has closed (the next run's
    /// logs, or none).
    fn follow(&self) -> impl Future<Output = Infallible> + Send + '_ {
        struct HandBack<'a>(&'a Output);
        impl Drop for HandBack<'_> {
            fn drop(&mut self) {
                for stream in [Stream::Stdout, Stream::Stderr] {
                    self.0.read_dry(stream);
                    let drain = self.0.drains[stream.index()].lock().unwrap().clone();
                    if let Some(waker) = drain {
                        // Reads what is there and leaves the drain task's
                        // waker with the pipe, without waking it; a pipe
                        // that ended wakes it, to end (and close the pipe).
                        if self.0.poll_read(stream, &mut Context::from_waker(&waker)).is_ready() {
                            waker.wake();
                        }
                    }
                }
            }
        }
        // Armed now, not at the first poll: the closure owns it (whole:
        // it names the variable, not its field, which alone would be copied
        // and leave the guard to drop here), and a future dropped unpolled
        // still drops what it owns.
        let hand_back = HandBack(self);
        std::future::poll_fn(move |cx| {
            let HandBack(output) = &hand_back;
            for stream in [Stream::Stdout, Stream::Stderr] {
                // An ended pipe stays ended; the run's answer says the rest.
                let _ = output.poll_read(stream, cx);
            }
            Poll::Pending
        })
    }
}

/// Reads a pipe to its end between runs: the tail for crash reports (and
/// any late lines of a run); a flood costs CPU, never memory.
async fn drain(output: Arc<Output>, stream: Stream) {
    std::future::poll_fn(|cx| {
        {
            let mut drain = output.drains[stream.index()].lock().unwrap();
            if !drain.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *drain = Some(cx.waker().clone());
            }
        }
        output.poll_read(stream, cx)
    })
    .await
}

/// One runtime server process: its child, directory, output and uid.
pub struct ProcessHandle {
    id: String,
    child: Child,
    /// The child's pid, which is also its process group.
    pid: Option<Pid>,
    dir: PathBuf,
    output: Arc<Output>,
    terminated: bool,
    /// Whether it runs in bubblewrap (the child is bubblewrap, not the runtime).
    in_bwrap: bool,
    /// Its uid's memory cgroup: its cap, and whether the kernel killed in
    /// it. Declared before `uid`, so it is removed before the uid is free.
    memory: Option<MemoryCgroup>,
    /// Its uid's `cpu` cgroup: its CPU quota (`INSTANCE_CPUS`).
    cpu: Option<CpuQuota>,
    /// Its activity and CPU time, which the backend's sweeper watches.
    idle: Option<Arc<IdleWatch>>,
    /// The instance's own uid, given back when the instance is gone.
    uid: Option<UidLease>,
    /// Its share of the memory budget, given back when it is gone.
    _reservation: Reservation,
    /// Where multi-file functions' files are.
    packages: Arc<PackageStore>,
    /// Where their installed dependencies are.
    installer: Option<Arc<Installer>>,
    /// The user-mode network of an instance with egress; stops with it.
    slirp: Option<SlirpGuard>,
}

#[async_trait]
impl InstanceHandle for ProcessHandle {
    fn id(&self) -> &str {
        &self.id
    }

    fn output(&self) -> Option<Arc<OutputTap>> {
        Some(self.output.tap.clone())
    }

    fn follow_output(&self) -> Following<'_> {
        Box::pin(self.output.follow())
    }

    fn activity(&self) -> Option<Arc<fnrt_core::runtime::remote::Activity>> {
        self.idle.as_ref().map(|w| w.activity.clone())
    }

    /// Its pipes are read dry when a run's answer has come.
    fn output_complete_at_answer(&self) -> bool {
        self.output.pipes.is_some()
    }

    /// Also false when the function left a process or a zombie behind: such
    /// an instance is not handed to the next execution ([`crate::uids::Cgroup::grew`]:
    /// three small reads of its cgroup's files).
    fn is_alive(&mut self) -> bool {
        if !self.is_running() {
            return false;
        }
        // bubblewrap, its init and the runtime; or the runtime alone.
        let expected = if self.in_bwrap { SANDBOX_PROCESSES } else { 1 };
        match self.uid.as_ref().and_then(|lease| lease.cgroup.as_ref()) {
            Some(cgroup) if cgroup.grew(expected) => {
                tracing::info!(instance = %self.id, "the function left processes behind; the instance is not reused");
                false
            }
            _ => true,
        }
    }

    /// Without the three reads of its cgroup that [`Self::is_alive`] makes.
    fn is_running(&mut self) -> bool {
        !self.terminated && matches!(self.child.try_wait(), Ok(None))
    }

    async fn exited(&mut self, wait: Duration) -> Option<Exit> {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) if !wait.is_zero() => tokio::time::timeout(wait, self.child.wait()).await.ok()?.ok()?,
            _ => return None,
        };
        // bubblewrap ends as its command did, a signal as 128 + its number.
        let status = match status.code() {
            Some(code) if self.in_bwrap && code > 128 => {
                format!("signal: {}", code - 128)
            }
            _ => status.to_string(),
        };
        Some(Exit {
            status,
            output_tail: self.output.tail(Stream::Stderr),
            oom_killed: self.memory.as_ref().is_some_and(MemoryCgroup::oom_killed),
        })
    }

    async fn terminate(&mut self) {
        if self.terminated {
            return;
        }
        self.kill_instance();
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            self.kill_group();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        }
        // Its uid is free once no process of it is left.
        if let Some(cgroup) = self.uid.as_ref().and_then(|lease| lease.cgroup.as_ref())
            && !cgroup.kill_all(Duration::from_secs(5)).await
        {
            tracing::warn!(
                instance = %self.id,
                cgroup = %cgroup.path().display(),
                "processes of a stopped instance outlive it; its uid is passed over"
            );
        }
        self.slirp = None;
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        self.terminated = true;
        self.memory = None;
        self.cpu = None;
        self.idle = None;
        self.uid = None;
    }

    /// Links the version's files into `function/` of the instance
    /// directory (`/run/runtime/function` inside bubblewrap).
    async fn place_package(&mut self, function: &FunctionVersion) -> Result<(), InstanceError> {
        crate::packages::place_for(&self.packages, self.installer.as_ref(), function, &self.dir).await
    }
}

impl ProcessHandle {
    /// Kills what the instance runs. With a cgroup: every process in it
    /// but the child itself, so that bubblewrap reaps its init (whose
    /// death ends the PID namespace) and then exits; killing bubblewrap
    /// first would leave that init to the host's init to reap, holding the
    /// uid until it does. Without one: the child's process group.
    fn kill_instance(&mut self) {
        match self.uid.as_ref().and_then(|lease| lease.cgroup.as_ref()) {
            Some(cgroup) => {
                cgroup.kill(self.pid);
                // A runtime that is not sandboxed is the child itself.
                if !self.in_bwrap {
                    self.kill_group();
                }
            }
            None => self.kill_group(),
        }
    }

    fn kill_group(&mut self) {
        if let Some(pid) = self.pid {
            // The whole group: the runtime and anything the function forked.
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        }
        let _ = self.child.start_kill();
    }
}

impl Drop for ProcessHandle {
    fn drop(&mut self) {
        if !self.terminated {
            self.kill_instance();
            self.kill_group();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Every executable file called `name` on `PATH`, in order (or `name`
/// itself when it is a path).
fn find_programs(name: &str) -> Vec<PathBuf> {
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![PathBuf::from(name)]
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|dir| dir.join(name)).collect())
            .unwrap_or_default()
    };
    candidates
        .into_iter()
        .filter_map(|c| c.canonicalize().ok())
        .filter(|c| {
            c.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .collect()
}

/// What a sandbox must see to run `program`: the installation it belongs
/// to (`/opt/node` for `/opt/node/bin/node`, for its libraries), or the file
/// alone.
fn install_root(program: &Path) -> PathBuf {
    match program.parent() {
        Some(bin) if bin.file_name().is_some_and(|n| n == "bin") => bin
            .parent()
            .filter(|p| *p != Path::new("/"))
            .unwrap_or(program)
            .to_path_buf(),
        _ => program.to_path_buf(),
    }
}

fn ancestors_searchable(path: &Path) -> bool {
    path.ancestors().skip(1).all(|dir| {
        dir.metadata()
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run reads the pipes while it waits; the server ends meanwhile and
    /// the run sees its pipes end. Handed back, they must still end their
    /// drain tasks (which hold them open), though nothing will wake those
    /// tasks again.
    #[tokio::test]
    async fn pipes_that_end_while_a_run_reads_them_still_end_their_drain_tasks() {
        let (out_tx, out_rx) = pipe::pipe().unwrap();
        let (err_tx, err_rx) = pipe::pipe().unwrap();
        let output = Arc::new(Output::new(Some([out_rx, err_rx])));
        let (o, e) = (output.clone(), output.clone());
        let drains = tokio::spawn(async move { tokio::join!(drain(o, Stream::Stdout), drain(e, Stream::Stderr)) });
        for _ in 0..100 {
            if output.drains.iter().all(|d| d.lock().unwrap().is_some()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        {
            let mut follow = std::pin::pin!(output.follow());
            assert!(futures::poll!(follow.as_mut()).is_pending());
            out_tx.try_write(b"last words\n").unwrap();
            drop((out_tx, err_tx));
            // The event loop sees the pipes end (and wakes the run's task).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::timeout(Duration::from_secs(5), drains)
            .await
            .expect("a drain task did not end: its pipe stays open")
            .unwrap();
        assert_eq!(output.tail(Stream::Stdout), "last words\n");
    }

    /// An instance's output on two pipes (their writing ends, the server's
    /// side), with a run's window open on it (no marker, as this backend's).
    fn in_a_run() -> (pipe::Sender, pipe::Sender, Arc<Output>, Arc<fnrt_core::logs::RunLogs>) {
        let (out_tx, out_rx) = pipe::pipe().unwrap();
        let (err_tx, err_rx) = pipe::pipe().unwrap();
        let output = Arc::new(Output::new(Some([out_rx, err_rx])));
        let logs = Arc::new(fnrt_core::logs::RunLogs::new(1024));
        output.tap.open(logs.clone(), None);
        (out_tx, err_tx, output, logs)
    }

    /// What a runtime wrote before its answer is in the pipe when the
    /// answer comes, but the event loop may not have heard of it yet: the
    /// hand-back reads the pipe itself, so the run gets all of it.
    #[tokio::test]
    async fn a_run_handed_back_has_read_what_the_event_loop_has_not_seen() {
        let (out_tx, _err_tx, output, logs) = in_a_run();
        {
            let mut follow = std::pin::pin!(output.follow());
            assert!(futures::poll!(follow.as_mut()).is_pending());
            // Written, and the answer "came": no await in between, so the
            // event loop has had no turn to see the pipe readable.
            rustix::io::write(&out_tx, b"one\nlast, no newline").unwrap();
        }
        assert!(output.tap.close(Duration::ZERO).await);
        let lines: Vec<String> = logs.take().lines.into_iter().map(|l| l.text).collect();
        assert_eq!(lines, ["one", "last, no newline"]);
    }

    /// A run's call can end at its first poll (the runtime answered while
    /// the controller's thread was off the core), before the following
    /// beside it is polled at all. The run's output is still read into its
    /// window, not left for the drain task to find after the window has
    /// closed (under load, 1 run in 100 went without its logs, or into the
    /// next run's).
    #[tokio::test]
    async fn a_run_whose_answer_came_before_its_output_was_followed_still_gets_its_output() {
        let (out_tx, err_tx, output, logs) = in_a_run();

        // Followed (never polled), written, answered: the following dropped.
        let following = output.follow();
        rustix::io::write(&out_tx, b"hello ann\n").unwrap();
        rustix::io::write(&err_tx, b"careful\n").unwrap();
        drop(following);

        assert!(output.tap.close(Duration::ZERO).await);
        let lines: Vec<(Stream, String)> = logs.take().lines.into_iter().map(|l| (l.stream, l.text)).collect();
        assert_eq!(
            lines,
            [
                (Stream::Stdout, "hello ann".to_owned()),
                (Stream::Stderr, "careful".to_owned())
            ]
        );
    }
}
