//! Command line and environment: every setting has a flag and an environment
//! variable, documented in one table in the README (one hidden flag,
//! `--controller-bin`, is for the in-process tests alone).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, FromArgMatches, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "controller", version, about = "Lambda-style function runtime controller")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings for `serve` when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve(ServeArgs),
    /// Print a JWT that this controller accepts, for local use.
    Token(TokenArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A secret from a flag or the environment: `secrecy`'s string, which
/// never prints and is zeroed when dropped.
pub type Secret = secrecy::SecretString;

fn secret(s: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret::from(s.to_owned()))
}

/// A number of CPUs: 0 (no quota), or from 0.01 (the kernel's least
/// quota, 1 ms per 100 ms) to 1024.
fn cpus(s: &str) -> Result<f64, String> {
    let n: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of CPUs"))?;
    if n == 0.0 || (0.01..=1024.0).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{s} CPUs: 0 (no quota) or from 0.01 to 1024"))
    }
}

/// Where the JWT secret comes from; shared by `serve` and `token`.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// HS256 secret for tokens. Without it, a secret is generated once and
    /// kept in the data dir (for local use only).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, value_parser = secret)]
    pub jwt_secret: Option<Secret>,
    /// Required `iss` claim, when set.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Seconds a token is still accepted after its `exp` (clock skew).
    #[arg(long, env = "JWT_LEEWAY_SECS", default_value_t = 5)]
    pub jwt_leeway_secs: u64,
    /// Directory for everything the controller writes (database, generated
    /// secret, instance directories).
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The token's subject (`sub`).
    #[arg(long)]
    pub sub: String,
    /// A scope to grant; repeat for several (`execute:all`, `execute:nodejs`,
    /// `read:functions`, `write:functions`, `admin:functions`, ...).
    #[arg(long = "scope", required = true)]
    pub scopes: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub ttl: u64,
    #[command(flatten)]
    pub auth: AuthArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// PostgreSQL URL (`postgres://…`) for functions and records; without it,
    /// SQLite in the data dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = secret)]
    pub database_url: Option<Secret>,
    /// Redis URL (`redis://host:6379/`): L2 result cache, shared sessions
    /// and rate limits; without it, all three stay in process.
    #[arg(long, env = "REDIS_URL", hide_env_values = true, value_parser = secret)]
    pub redis_url: Option<Secret>,
    /// Folder of bundled functions registered at start-up.
    #[arg(long, env = "FUNCTIONS_DIR")]
    pub functions_dir: Option<PathBuf>,
    /// Folder holding the runtime servers (`nodejs/server.js`, `python/server.py`)
    /// and the Rust SDK (`rust/sdk`) that Rust functions are built against.
    #[arg(long, env = "RUNTIMES_DIR")]
    pub runtimes_dir: Option<PathBuf>,
    /// Node.js interpreter for the nodejs runtime.
    #[arg(long, env = "NODE_BIN", default_value = "node")]
    pub node_bin: String,
    /// Python interpreter for the python runtime.
    #[arg(long, env = "PYTHON_BIN", default_value = "python3")]
    pub python_bin: String,
    /// Allowed CORS origins, comma-separated; `*` allows any.
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", value_delimiter = ',', default_value = "*")]
    pub cors_allowed_origins: Vec<String>,
    /// How long a session lives after initialize, in seconds.
    #[arg(long, env = "SESSION_TTL_SECS", default_value_t = 7_200)]
    pub session_ttl_secs: u64,
    /// Retained sessions one subject may keep on a controller: each holds
    /// a warm instance (a process or container) until it ends or expires.
    #[arg(long, env = "MAX_SESSIONS_PER_SUBJECT", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions_per_subject: u32,
    /// Asynchronous executions (`POST /api/v1/executions`) this controller
    /// runs at once; 0: it queues them but leaves running them to others.
    #[arg(long, env = "EXECUTION_WORKERS", default_value_t = 4)]
    pub execution_workers: usize,
    /// How long a replica's claim on an asynchronous execution holds
    /// without renewal (renewed every second): another replica takes the
    /// run over this long after its controller died.
    #[arg(long, env = "EXECUTION_LEASE_SECS", default_value_t = 10)]
    pub execution_lease_secs: u64,
    /// Most asynchronous executions of one subject running at once, across
    /// replicas.
    #[arg(long, env = "EXECUTION_MAX_PER_SUBJECT", default_value_t = 8)]
    pub execution_max_per_subject: u32,
    /// Pending (queued, not yet running) asynchronous executions one
    /// subject may have; a submission past it is refused with 429.
    #[arg(long, env = "EXECUTION_MAX_PENDING_PER_SUBJECT", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub execution_max_pending_per_subject: u32,
    /// Most asynchronous executions of one function running at once.
    #[arg(long, env = "EXECUTION_MAX_PER_FUNCTION", default_value_t = 16)]
    pub execution_max_per_function: u32,
    /// Networks callbacks may reach although they are not public
    /// (loopback, private ranges), comma-separated: `10.0.0.0/8,127.0.0.1`.
    #[arg(long, env = "CALLBACK_ALLOW_NETWORKS", value_delimiter = ',')]
    pub callback_allow_networks: Vec<String>,
    /// Live progress streams (SSE, WebSocket) one subject may hold open
    /// on this controller.
    #[arg(long, env = "MAX_STREAMS_PER_SUBJECT", default_value_t = 10)]
    pub max_streams_per_subject: usize,
    /// Largest `context.timeout_ms` a client may ask for.
    #[arg(long, env = "MAX_TIMEOUT_MS", default_value_t = 300_000)]
    pub max_timeout_ms: u64,
    /// Result cache TTL when the client sends no `max-age`, in seconds.
    #[arg(long, env = "CACHE_TTL_SECS", default_value_t = 3_600)]
    pub cache_ttl_secs: u64,
    /// Bound on the in-process result cache, in bytes of serialised results.
    #[arg(long, env = "CACHE_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub cache_max_bytes: u64,
    /// Execute/initialize/session requests per minute per subject; 0 disables.
    #[arg(long, env = "RATE_LIMIT_EXECUTE", default_value_t = 100)]
    pub rate_limit_execute: u32,
    /// Function-registry requests per minute per subject; 0 disables.
    #[arg(long, env = "RATE_LIMIT_FUNCTIONS", default_value_t = 60)]
    pub rate_limit_functions: u32,
    /// Requests per minute per client address without a valid token; 0 disables.
    #[arg(long, env = "RATE_LIMIT_UNAUTHENTICATED", default_value_t = 10)]
    pub rate_limit_unauthenticated: u32,
    /// Generic warm instances kept ready per language (and backend).
    #[arg(long, env = "WARM_POOL_SIZE", default_value_t = 2)]
    pub warm_pool_size: usize,
    /// Which backend runs which functions: `LANGUAGE=BACKEND` (every
    /// function of the language) or `LANGUAGE-TITLE=BACKEND` (one function);
    /// repeat the flag, or separate with commas. Backends: `process`,
    /// `wasm`, `docker`. Default: each language on the first backend that runs it.
    #[arg(long, env = "PLACEMENT", value_delimiter = ',')]
    pub placement: Vec<fnrt_core::runtime::placement::PlacementRule>,
    /// How long an idle specialised instance is kept before it is reaped, in seconds.
    #[arg(long, env = "KEEP_WARM_SECS", default_value_t = 300)]
    pub keep_warm_secs: u64,
    /// Largest request body, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Where installed dependencies of packages are kept, by the hash of
    /// their `requirements.txt` / `package.json`; may be shared by
    /// controllers on one host. Default `DATA_DIR/deps`.
    #[arg(long, env = "DEPS_DIR")]
    pub deps_dir: Option<PathBuf>,
    /// Longest a package's dependency install (pip, npm) may take, in seconds.
    #[arg(long, env = "DEPS_INSTALL_TIMEOUT_SECS", default_value_t = 300)]
    pub deps_install_timeout_secs: u64,
    /// pip's package index for dependency installs (a mirror), instead of PyPI.
    #[arg(long, env = "DEPS_PIP_INDEX_URL")]
    pub deps_pip_index_url: Option<String>,
    /// A directory of wheels to install Python dependencies from, offline
    /// (no index at all): for air-gapped sites.
    #[arg(long, env = "DEPS_PIP_WHEELS_DIR")]
    pub deps_pip_wheels_dir: Option<PathBuf>,
    /// npm's registry for dependency installs (a mirror such as Verdaccio).
    #[arg(long, env = "DEPS_NPM_REGISTRY")]
    pub deps_npm_registry: Option<String>,
    /// Largest installed dependency set, in MiB.
    #[arg(long, env = "DEPS_MAX_MB", default_value_t = 1024)]
    pub deps_max_mb: u64,
    /// How long an install of dependencies that no function's current
    /// version uses (its function deleted or moved to another set) stays
    /// on disk, in seconds; it is installed again should a version need it.
    #[arg(long, env = "DEPS_KEEP_UNUSED_SECS", default_value_t = 3600)]
    pub deps_keep_unused_secs: u64,
    /// Most files in a multi-file function (a package or an archive).
    #[arg(long, env = "MAX_PACKAGE_FILES", default_value_t = 256)]
    pub max_package_files: usize,
    /// The most one subject's registered functions take stored, every
    /// version counted (code and manifest), in MiB; 0: no quota.
    #[arg(long, env = "FUNCTIONS_QUOTA_MB", default_value_t = 1024)]
    pub functions_quota_mb: u64,
    /// Largest multi-file function, unpacked, in MiB. Registrations
    /// (`POST`/`PUT /api/v1/functions`) may be as large as that in base64,
    /// whatever `MAX_BODY_BYTES` says.
    #[arg(long, env = "MAX_PACKAGE_MB", default_value_t = 50)]
    pub max_package_mb: u64,
    /// The Docker Engine API (Docker or Podman) of the docker backend, a
    /// `unix://` socket. Default: Docker's socket, else Podman's as root.
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Runtime image of the docker backend per language (`{language}` is
    /// replaced); `runtimes/images.sh` builds them.
    #[arg(long, env = "DOCKER_IMAGE", default_value = "fnrt-runtime-{language}:0.1")]
    pub docker_image: String,
    /// CPUs one container may use.
    #[arg(long, env = "DOCKER_CPUS", default_value_t = 1.0)]
    pub docker_cpus: f64,
    /// Most containers the docker backend keeps at once (warm, idle, busy):
    /// a start beyond waits for one to be free.
    #[arg(long, env = "DOCKER_MAX_CONTAINERS", default_value_t = 64)]
    pub docker_max_containers: usize,
    /// The uid (and gid) runtimes run as inside containers.
    #[arg(long, env = "DOCKER_UID", default_value_t = 65532)]
    pub docker_uid: u32,
    /// Bytes of what one execution writes to stdout and stderr kept as its
    /// logs (the first ones; the rest is counted as dropped).
    #[arg(long, env = "LOG_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub log_limit_bytes: usize,
    /// How long function logs are kept, in hours.
    #[arg(long, env = "LOG_RETENTION_HOURS", default_value_t = 168)]
    pub log_retention_hours: u64,
    /// How long execution records (every execute's) and finished
    /// asynchronous executions are kept, in hours; at least 24, the
    /// window in which an `Idempotency-Key` finds its execution.
    #[arg(long, env = "EXECUTION_RETENTION_HOURS", default_value_t = 168,
          value_parser = clap::value_parser!(u64).range(24..))]
    pub execution_retention_hours: u64,
    /// Largest uploaded file (`POST /api/v1/files`), in MiB; a file
    /// upload may be that large whatever `MAX_BODY_BYTES` says.
    #[arg(long, env = "MAX_FILE_MB", default_value_t = 64)]
    pub max_file_mb: u64,
    /// The most one subject's uploaded files (those not expired yet) take
    /// together, in MiB; 0: no quota. Any token may upload.
    #[arg(long, env = "FILES_QUOTA_MB", default_value_t = 1024)]
    pub files_quota_mb: u64,
    /// Most steps a pipeline may have (1 to 1000).
    #[arg(long, env = "PIPELINE_MAX_STEPS", default_value_t = 50,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub pipeline_max_steps: u16,
    /// Where uploaded files' bytes are kept: `local` (`DATA_DIR/files/`)
    /// or `s3://BUCKET[/PREFIX]` (S3-compatible storage, shared by
    /// controllers on one database; endpoint and credentials from the
    /// `AWS_*` variables).
    #[arg(long, env = "FILE_STORE", default_value = "local")]
    pub file_store: String,
    /// How long an uploaded file is kept, in hours (at least 1).
    #[arg(long, env = "FILE_RETENTION_HOURS", default_value_t = 24)]
    pub file_retention_hours: u64,
    /// Largest result a function may return, in bytes of JSON.
    #[arg(long, env = "MAX_RESULT_BYTES", default_value_t = 1024 * 1024)]
    pub max_result_bytes: usize,
    /// Processes (and threads) an instance may run (`RLIMIT_NPROC`; per
    /// instance when each has its own uid, i.e. as root).
    #[arg(long, env = "INSTANCE_MAX_PROCESSES", default_value_t = 256)]
    pub instance_max_processes: u64,
    /// Open files per instance.
    #[arg(long, env = "INSTANCE_MAX_OPEN_FILES", default_value_t = 256)]
    pub instance_max_open_files: u64,
    /// Largest file an instance may write, in MiB.
    #[arg(long, env = "INSTANCE_MAX_FILE_MB", default_value_t = 64)]
    pub instance_max_file_mb: u64,
    /// Size of each private scratch mount of an instance (its home, `/tmp`,
    /// `/var/tmp`, `/dev/shm`, `/run`), in MiB: a tmpfs, in memory, when
    /// instances run in bubblewrap.
    #[arg(long, env = "INSTANCE_SCRATCH_MB", default_value_t = 64)]
    pub instance_scratch_mb: u64,
    /// CPUs all of a process instance's processes and threads together
    /// may use (a quota in its uid's cgroup, as root); 0: no quota.
    #[arg(long, env = "INSTANCE_CPUS", default_value_t = 1.0, value_parser = cpus)]
    pub instance_cpus: f64,
    /// First uid of the range instances run as (one uid each) when the
    /// controller runs as root.
    #[arg(long, env = "INSTANCE_UID_BASE", default_value_t = 200_000)]
    pub instance_uid_base: u32,
    /// Number of uids in that range: the most instances at once.
    #[arg(long, env = "INSTANCE_UID_COUNT", default_value_t = 10_000)]
    pub instance_uid_count: u32,
    /// The memory all process instances together may reserve, in MiB: each
    /// reserves its `limits.memory_mb` for its life (its memory cgroup's
    /// cap). Default: three quarters of the machine's memory.
    #[arg(long, env = "INSTANCE_MEMORY_MB", value_parser = clap::value_parser!(u64).range(32..))]
    pub instance_memory_mb: Option<u64>,
    /// How long a start waits for room (memory in that budget, a uid, a
    /// container slot) before it fails with 503, in seconds; meanwhile idle
    /// instances are stopped to make room.
    #[arg(long, env = "INSTANCE_WAIT_SECS", default_value_t = 30)]
    pub instance_wait_secs: u64,
    /// cargo, for building Rust functions.
    #[arg(long, env = "CARGO_BIN", default_value = "cargo")]
    pub cargo_bin: String,
    /// The Rust function builds' work directories, one per tenant (the
    /// subject that registered the function, or the bundled ones) under
    /// `tenants/`, shared by the tenant's builds (so its dependencies
    /// compile once); default `DATA_DIR/rust-target`.
    #[arg(long, env = "RUST_TARGET_DIR")]
    pub rust_target_dir: Option<PathBuf>,
    /// The uid Rust function builds run as (in bubblewrap) when the
    /// controller runs as root: outside the instance range, owner of the
    /// build work directory.
    #[arg(long, env = "RUST_BUILD_UID", default_value_t = 199_999)]
    pub rust_build_uid: u32,
    /// Longest a Rust function build may take, in seconds.
    #[arg(long, env = "RUST_BUILD_TIMEOUT_SECS", default_value_t = 600)]
    pub rust_build_timeout_secs: u64,
    /// How long a failed background build of a Rust function stands before
    /// its next initialize tries again, in seconds.
    #[arg(long, env = "RUST_BUILD_RETRY_SECS", default_value_t = 60)]
    pub rust_build_retry_secs: u64,
    /// The most memory one build step (a Rust build, a pip or npm install)
    /// may use, all its processes together, in MiB (as root, cgroup v1).
    #[arg(long, env = "BUILD_MEMORY_MB", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(64..))]
    pub build_memory_mb: u64,
    /// The most processes and threads one build step may run at once (as
    /// root, cgroup v1).
    #[arg(long, env = "BUILD_MAX_PROCESSES", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(16..))]
    pub build_max_processes: u64,
    /// The most disk one build step's directory may take while it runs, in
    /// MiB: a Rust build's subject's work directory (its crates and compiled
    /// dependencies), an install's own directory (as root, cgroup v1).
    #[arg(long, env = "BUILD_DISK_MB", default_value_t = 8192,
          value_parser = clap::value_parser!(u64).range(64..))]
    pub build_disk_mb: u64,
    /// The CPUs one build step may use, all its processes together (a
    /// quota, as root, cgroup v1); 0: no quota. Default: every CPU but one
    /// (at least one).
    #[arg(long, env = "BUILD_CPUS", value_parser = cpus)]
    pub build_cpus: Option<f64>,
    /// Largest wasm module accepted, in bytes.
    #[arg(long, env = "WASM_MAX_MODULE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub wasm_max_module_bytes: usize,
    /// Longest a wasm module may take to compile, in seconds (its compiler
    /// is killed past it).
    #[arg(long, env = "WASM_COMPILE_BUDGET_SECS", default_value_t = 30)]
    pub wasm_compile_budget_secs: u64,
    /// The most compiled wasm code kept, in MiB: on disk
    /// (`DATA_DIR/wasm-cache`) and linked in memory; the least recently
    /// compiled or loaded goes first past it (again when needed).
    #[arg(long, env = "WASM_CACHE_MB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub wasm_cache_mb: u64,
    /// Wasm runs at one time: the engine's pool of instance slots, each
    /// reserving the address space of a 4 GiB memory (256 reserve about
    /// 1 TiB, virtual). A run past them waits for a slot, within its
    /// deadline.
    #[arg(long, env = "WASM_MAX_INSTANCES", default_value_t = fnrt_backends::wasm::DEFAULT_MAX_INSTANCES,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub wasm_max_instances: u32,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// The controller's own program: Rust instances run it as `PROGRAM
    /// runtime-rust --socket PATH`, and wasm modules are compiled by
    /// `PROGRAM compile-wasm OUT`; default the running executable, which is
    /// the controller unless the application runs inside another program
    /// (a test binary).
    #[arg(long, hide = true)]
    pub controller_bin: Option<PathBuf>,
}

impl ServeArgs {
    /// How large a multi-file function may be.
    pub fn package_limits(&self) -> fnrt_core::function::PackageLimits {
        fnrt_core::function::PackageLimits {
            max_files: self.max_package_files,
            max_bytes: self.max_package_mb.saturating_mul(1024 * 1024),
        }
    }

    /// Largest registration body: a package's bytes in base64, with room
    /// for JSON and the manifest.
    pub fn max_registration_bytes(&self) -> usize {
        let base64 = self.max_package_mb.saturating_mul(1024 * 1024) / 3 * 4;
        usize::try_from(base64.saturating_add(1024 * 1024))
            .unwrap_or(usize::MAX)
            .max(self.max_body_bytes)
    }

    /// Largest uploaded file, in bytes.
    /// `INSTANCE_MEMORY_MB`, or three quarters of the machine's memory (a
    /// GiB when it cannot be read).
    pub fn instance_memory_mb(&self) -> u64 {
        self.instance_memory_mb
            .unwrap_or_else(|| fnrt_backends::budget::machine_memory_mb().map_or(1024, |mb| mb / 4 * 3))
    }

    /// What one build step may take (`BUILD_MEMORY_MB`, `BUILD_MAX_PROCESSES`,
    /// `BUILD_DISK_MB`, `BUILD_CPUS`).
    pub fn build_caps(&self) -> fnrt_backends::cgroups::StepCaps {
        fnrt_backends::cgroups::StepCaps {
            memory_bytes: self.build_memory_mb.saturating_mul(1024 * 1024),
            max_tasks: self.build_max_processes,
            disk_bytes: self.build_disk_mb.saturating_mul(1024 * 1024),
            cpus: self.build_cpus(),
        }
    }

    /// `BUILD_CPUS`, or every CPU but one (at least one): a build leaves
    /// the controller a core to answer with.
    pub fn build_cpus(&self) -> f64 {
        self.build_cpus.unwrap_or_else(|| {
            let machine = std::thread::available_parallelism().map_or(1, usize::from);
            machine.saturating_sub(1).max(1) as f64
        })
    }

    pub fn max_file_bytes(&self) -> u64 {
        self.max_file_mb.saturating_mul(1024 * 1024)
    }

    /// `FUNCTIONS_QUOTA_MB` in bytes; `None` for no quota.
    pub fn functions_quota_bytes(&self) -> Option<u64> {
        (self.functions_quota_mb > 0).then(|| self.functions_quota_mb.saturating_mul(1024 * 1024))
    }

    /// `FILES_QUOTA_MB` in bytes; `None` for no quota.
    pub fn files_quota_bytes(&self) -> Option<u64> {
        (self.files_quota_mb > 0).then(|| self.files_quota_mb.saturating_mul(1024 * 1024))
    }

    /// Largest body of a file upload: the file, with room for a
    /// multipart envelope (as much as any other body may be).
    pub fn max_upload_bytes(&self) -> usize {
        usize::try_from(self.max_file_bytes())
            .unwrap_or(usize::MAX)
            .saturating_add(self.max_body_bytes)
    }

    /// Settings from `flags` alone (`["--listen", "127.0.0.1:0", ...]`, no
    /// program name), as `controller serve` parses them but without reading
    /// any environment variable: what a program that embeds the application
    /// (the end-to-end tests) passes is all there is, whatever `DATABASE_URL`
    /// or `JWT_SECRET` its own environment holds. A flag given twice takes
    /// its last value.
    pub fn from_flags<I, T>(flags: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::flags_only_command().try_get_matches_from(
            std::iter::once(std::ffi::OsString::from("controller")).chain(flags.into_iter().map(Into::into)),
        )?;
        Self::from_arg_matches(&matches)
    }

    /// `serve`'s arguments with their environment variables unset.
    fn flags_only_command() -> clap::Command {
        Self::augment_args(clap::Command::new("controller"))
            .args_override_self(true)
            .mut_args(|arg| arg.env(None::<&'static str>))
    }

    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(self.session_ttl_secs)
    }

    pub fn keep_warm(&self) -> Duration {
        Duration::from_secs(self.keep_warm_secs)
    }

    /// `functions/` in the current directory, else the one beside the source.
    pub fn functions_dir(&self) -> PathBuf {
        self.functions_dir.clone().unwrap_or_else(|| repo_dir("functions"))
    }

    /// `runtimes/` in the current directory, else the one beside the source.
    pub fn runtimes_dir(&self) -> PathBuf {
        self.runtimes_dir.clone().unwrap_or_else(|| repo_dir("runtimes"))
    }
}

fn repo_dir(name: &str) -> PathBuf {
    let here = Path::new(name);
    if here.is_dir() {
        return here.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn from_flags_reads_no_environment_variable() {
        let serve = Cli::command();
        let serve = serve.find_subcommand("serve").unwrap();
        assert_eq!(
            serve
                .get_arguments()
                .find(|a| a.get_id() == "database_url")
                .unwrap()
                .get_env(),
            Some(std::ffi::OsStr::new("DATABASE_URL")),
            "the binary reads DATABASE_URL"
        );
        let with_env: Vec<_> = ServeArgs::flags_only_command()
            .get_arguments()
            .filter(|a| a.get_env().is_some())
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(with_env.is_empty(), "{with_env:?}");
    }

    #[test]
    fn from_flags_parses_what_serve_parses_and_a_repeated_flag_takes_its_last_value() {
        use secrecy::ExposeSecret;
        let args = ServeArgs::from_flags([
            "--listen",
            "127.0.0.1:0",
            "--warm-pool-size",
            "1",
            "--warm-pool-size",
            "3",
            "--jwt-secret",
            "s3cret",
            "--controller-bin",
            "/opt/controller",
        ])
        .unwrap();
        assert_eq!(args.listen.port(), 0);
        assert_eq!(args.warm_pool_size, 3);
        assert_eq!(args.auth.jwt_secret.as_ref().unwrap().expose_secret(), "s3cret");
        assert_eq!(args.controller_bin.as_deref(), Some(Path::new("/opt/controller")));
        assert!(args.database_url.is_none());
        assert_eq!(args.session_ttl_secs, 7_200, "defaults apply");
        assert!(ServeArgs::from_flags(["--no-such-flag"]).is_err());
    }

    #[test]
    fn instance_cpus_is_no_quota_or_a_quota_the_kernel_takes() {
        let parse = |v: &str| ServeArgs::from_flags(["--instance-cpus", v]).map(|a| a.instance_cpus);
        assert_eq!(ServeArgs::from_flags(Vec::<&str>::new()).unwrap().instance_cpus, 1.0);
        assert_eq!(parse("0").unwrap(), 0.0);
        assert_eq!(parse("0.25").unwrap(), 0.25);
        for refused in ["0.001", "-1", "NaN", "2000", "one"] {
            assert!(parse(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn a_build_leaves_a_cpu_to_the_controller_unless_told_otherwise() {
        let cpus = |flags: &[&str]| ServeArgs::from_flags(flags.iter().copied()).unwrap().build_cpus();
        let machine = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(cpus(&[]), machine.saturating_sub(1).max(1) as f64);
        assert_eq!(cpus(&["--build-cpus", "0"]), 0.0);
        assert_eq!(cpus(&["--build-cpus", "0.5"]), 0.5);
        assert!(ServeArgs::from_flags(["--build-cpus", "0.001"]).is_err());
    }
}
