//! Building the application from its settings and running it until a
//! shutdown signal. `main` and the tests share this path.

use secrecy::ExposeSecret;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, InProcess, RedisAdmission};
use crate::auth::Authenticator;
use crate::config::ServeArgs;
use crate::engine::{Engine, EngineSettings};
use crate::http::{self, AppState, HttpSettings};
use crate::ratelimit::{Limits, LocalRateLimiter, RateLimiter, RedisRateLimiter};
use crate::records::ExecutionLog;
use crate::redis_cache::RedisCache;
use crate::redis_client::RedisClient;
use crate::registry::Registry;
use crate::sessions::SessionStore;
use crate::sessions::fallback::FallbackSessionStore;
use crate::sessions::memory::MemorySessionStore;
use crate::sessions::redis::RedisSessionStore;
use crate::store::Stores;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use fnrt_backends::Backends;
use fnrt_backends::build::{Builder, BuilderConfig};
use fnrt_backends::deps::{Installer, InstallerConfig};
use fnrt_backends::docker::{DockerBackend, DockerConfig};
use fnrt_backends::process::{ProcessBackend, ProcessConfig, ProcessLimits};
use fnrt_backends::wasm::{WasmBackend, WasmConfig, WasmRuntime};
use fnrt_core::cache::memory::MemoryCache;
use fnrt_core::cache::{Layers, ResultCache};
use fnrt_core::invoke::{InvokeSettings, Invoker};
use fnrt_core::language::Language;
use fnrt_core::metrics::Metrics;
use fnrt_core::runtime::placement::Placement;
use fnrt_core::runtime::pool::{InstancePool, PoolConfig};

/// Longest cache TTL a client may ask for with `max-age`.
const MAX_CACHE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often expired sessions and idle rate-limit keys are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Sweeps between two deletions of logs past their retention (5 minutes).
const LOG_SWEEP_TICKS: u64 = 60;
/// Sweeps between two deletions of expired files (a minute).
const FILE_SWEEP_TICKS: u64 = 12;

pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    http_settings: HttpSettings,
    engine: Arc<Engine>,
    /// Asynchronous executions: its runs are handed back at shutdown.
    executions: Arc<crate::executions::Executions>,
    /// Stops the background loops (pool upkeep, session sweeps) at shutdown.
    stop: CancellationToken,
    /// Stops them too when the application is dropped without being run.
    _stop_on_drop: DropGuard,
    /// The background loops, waited for at shutdown.
    tasks: TaskTracker,
    /// Stopped with the application: its background builds end with it.
    builder: Option<Arc<Builder>>,
    /// Stopped with it too: its background dependency installs end with it.
    installer: Option<Arc<Installer>>,
    /// Writes execution records; finishes once the engine (its last sender) is gone.
    record_writer: JoinHandle<()>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// Creates the data dir and returns it as an absolute path (instances start
/// in a directory of their own, where a relative path means something else).
/// Instance users may pass through it (0711) to their own directories, but
/// neither list it nor enter anything else in it: every other entry is made
/// private, also those an earlier run or another umask left open.
fn prepare_data_dir(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        // An entry may go between the listing and this look: the `-wal` and
        // `-shm` files of an earlier controller's SQLite, closing on its own
        // thread as this one starts on the same dir.
        let meta = match entry.metadata() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            meta => meta?,
        };
        // instances/ and bin/ are set up by the process backend itself.
        if meta.is_symlink() || matches!(entry.file_name().to_str(), Some("instances" | "bin")) {
            continue;
        }
        let private = if meta.is_dir() { 0o700 } else { 0o600 };
        if meta.permissions().mode() & 0o7777 != private {
            match std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(private)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                done => done?,
            }
        }
    }
    Ok(dir)
}

/// Creates the database `DATABASE_URL` names when the server answers and it
/// does not exist yet (a first start); a server that does not answer is
/// left for the connection to report.
async fn create_database_if_missing(url: &str) -> anyhow::Result<()> {
    use sqlx::migrate::MigrateDatabase;
    if let Ok(false) = sqlx::Postgres::database_exists(url).await {
        sqlx::Postgres::create_database(url)
            .await
            .context("creating the database DATABASE_URL names")?;
        tracing::info!("created the PostgreSQL database DATABASE_URL names");
    }
    Ok(())
}

/// One database, PostgreSQL when `DATABASE_URL` is set, else SQLite in the
/// data dir, as the stores its callers need.
async fn open_stores(args: &ServeArgs) -> anyhow::Result<Stores> {
    if let Some(url) = args.database_url.as_ref().filter(|u| !u.expose_secret().is_empty()) {
        create_database_if_missing(url.expose_secret()).await?;
        let store = PostgresStore::connect(url.expose_secret())
            .await
            .context("connecting to PostgreSQL")?;
        tracing::info!("store: PostgreSQL");
        return Ok(Stores::of(store));
    }
    let db_path = args.auth.data_dir.join("controller.db");
    // Created private before SQLite opens it; its -wal and -shm files copy the mode.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&db_path)
        .with_context(|| format!("creating {}", db_path.display()))?;
    let store = SqliteStore::open(&db_path).await?;
    tracing::info!(path = %db_path.display(), "store: SQLite");
    Ok(Stores::of(store))
}

impl Application {
    /// Opens the store, registers bundled functions, starts the pool and
    /// binds the listener (port 0 picks a free port; see [`Self::local_addr`]).
    pub async fn build(mut args: ServeArgs) -> anyhow::Result<Self> {
        // Whatever umask the controller was started with, what it writes
        // (database, builds, compiled modules, secrets) is its own; the few
        // paths instances must reach are opened up one by one.
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        args.auth.data_dir = prepare_data_dir(&args.auth.data_dir)?;
        let data_dir = &args.auth.data_dir;
        let auth = Arc::new(Authenticator::from_args(&args.auth)?);

        let stores = open_stores(&args).await?;
        let metrics = Arc::new(Metrics::new());
        let run_keys = Arc::new(crate::files::keys::RunKeys::default());
        let builder = Builder::new(BuilderConfig {
            cargo: args.cargo_bin.clone(),
            sdk_dir: args.runtimes_dir().join("rust").join("sdk"),
            target_dir: args
                .rust_target_dir
                .clone()
                .unwrap_or_else(|| data_dir.join("rust-target")),
            builds_dir: data_dir.join("builds"),
            timeout: Duration::from_secs(args.rust_build_timeout_secs),
            retry_failed_after: Duration::from_secs(args.rust_build_retry_secs),
            build_uid: args.rust_build_uid,
            caps: args.build_caps(),
        })
        .map_err(|e| format!("{e:#}"));
        if let Err(e) = &builder {
            tracing::warn!(error = %e, "Rust functions cannot be built");
        }
        let controller_bin = args.controller_bin.clone().or_else(|| std::env::current_exe().ok());
        let mut backend = ProcessBackend::new(ProcessConfig {
            instances_dir: data_dir.join("instances"),
            runtimes_dir: args.runtimes_dir(),
            node_bin: args.node_bin.clone(),
            python_bin: args.python_bin.clone(),
            limits: ProcessLimits {
                max_processes: args.instance_max_processes,
                max_open_files: args.instance_max_open_files,
                max_file_bytes: args.instance_max_file_mb * 1024 * 1024,
                scratch_bytes: args.instance_scratch_mb * 1024 * 1024,
                cpus: (args.instance_cpus > 0.0).then_some(args.instance_cpus),
            },
            instance_uid_base: args.instance_uid_base,
            instance_uid_count: args.instance_uid_count,
            memory_mb: args.instance_memory_mb(),
            max_result_bytes: args.max_result_bytes,
            rust_runtime: controller_bin.clone(),
            builder: builder.clone().ok(),
        })?;
        // Functions reach their caller's files here, with their run's key:
        // beside the instances' directories, on their filesystem, so that
        // each instance gets a hard link to it.
        let root = backend.packages().1.parent().unwrap_or(data_dir).to_owned();
        let package_store = backend.packages().0;
        let (files_listener, files_socket) = crate::files::keys::bind_socket(&root)?;
        backend.set_files_socket(files_socket.clone());
        // Dependencies are installed for the interpreters instances run.
        let installer = match (backend.program(Language::Python), backend.program(Language::Nodejs)) {
            (Some(python_bin), Some(node_bin)) => Installer::new(
                InstallerConfig {
                    deps_dir: args.deps_dir.clone().unwrap_or_else(|| data_dir.join("deps")),
                    python_bin,
                    node_bin,
                    npm_bin: fnrt_backends::process::find_program("npm"),
                    timeout: Duration::from_secs(args.deps_install_timeout_secs),
                    max_bytes: args.deps_max_mb.saturating_mul(1024 * 1024),
                    keep_unused: Duration::from_secs(args.deps_keep_unused_secs),
                    uid: args.rust_build_uid,
                    caps: args.build_caps(),
                    sources: fnrt_backends::deps::Sources {
                        pip_index_url: args.deps_pip_index_url.clone(),
                        pip_wheels_dir: args.deps_pip_wheels_dir.clone(),
                        npm_registry: args.deps_npm_registry.clone(),
                    },
                },
                metrics.clone(),
            )
            .inspect_err(|e| tracing::warn!(error = format!("{e:#}"), "dependencies cannot be installed"))
            .ok(),
            _ => None,
        };
        if let Some(installer) = &installer {
            backend.set_installer(installer.clone());
        }
        let wasm = WasmBackend::new(
            WasmConfig {
                max_output_bytes: args.max_result_bytes,
                max_module_bytes: args.wasm_max_module_bytes,
                compile_budget: Duration::from_secs(args.wasm_compile_budget_secs),
                cache_dir: data_dir.join("wasm-cache"),
                cache_bytes: args.wasm_cache_mb.saturating_mul(1024 * 1024),
                compiler: controller_bin.clone(),
                max_instances: args.wasm_max_instances,
            },
            builder.clone().ok(),
            metrics.clone(),
        )?;
        let docker = Arc::new(docker_backend(
            &args,
            data_dir,
            &backend,
            builder.clone().ok(),
            installer.clone(),
            &files_socket,
        )?);
        let placement = Placement::new(
            vec![Arc::new(backend), Arc::new(WasmRuntime(wasm)), docker.clone()],
            &args.placement,
        )
        .map_err(|e| anyhow::anyhow!("--placement: {e}"))?;
        let docker = match placement.targets().iter().any(|(b, _)| b.name() == "docker") {
            true => {
                prepare_docker(&docker).await?;
                Some(docker)
            }
            false => None,
        };
        tracing::info!(?placement, "placement");
        let placement = Arc::new(placement);
        let backends = Arc::new(Backends::new(placement.clone(), builder.clone(), installer.clone()));
        let logs = Arc::new(crate::logs::Logs {
            store: stores.logs.clone(),
            recent: Arc::default(),
            hub: Arc::default(),
            limit_bytes: args.log_limit_bytes,
            retention: Duration::from_secs(args.log_retention_hours.max(1) * 3600),
        });
        let file_store: Arc<dyn crate::files::FileStore> = match args.file_store.as_str() {
            "local" => Arc::new(
                crate::files::local::LocalFileStore::open(&data_dir.join("files"))
                    .with_context(|| format!("opening the file store in {}", data_dir.join("files").display()))?,
            ),
            url => Arc::new(
                crate::files::s3::S3FileStore::open(url, &data_dir.join("files/staging"))
                    .await
                    .context("opening the file store (FILE_STORE)")?,
            ),
        };
        tracing::info!(store = %args.file_store, "file store");
        let files = Arc::new(
            crate::files::Files::new(
                file_store,
                stores.files.clone(),
                args.max_file_bytes(),
                Duration::from_secs(args.file_retention_hours.max(1) * 3600),
            )
            .with_quota(args.files_quota_bytes()),
        );
        let (records, write_records) = ExecutionLog::new(stores.executions.clone(), logs.recent.clone());
        let registry = Arc::new(
            Registry::load(stores.functions.clone(), Some(backends.clone()))
                .await?
                .with_package_limits(args.package_limits())
                .with_quota(args.functions_quota_bytes())
                .with_pipeline_max_steps(args.pipeline_max_steps.into()),
        );
        let functions_dir = args.functions_dir();
        if functions_dir.is_dir() {
            let n = registry.load_bundled(&functions_dir).await?;
            tracing::info!(dir = %functions_dir.display(), changed = n, "bundled functions registered");
        } else {
            tracing::warn!(dir = %functions_dir.display(), "no bundled functions folder");
        }

        let pool = InstancePool::new(
            placement,
            PoolConfig {
                warm_per_language: args.warm_pool_size,
                warm_memory_mb: fnrt_core::function::manifest::DEFAULT_MEMORY_MB,
                keep_warm: args.keep_warm(),
                max_idle_per_version: 8,
                room_wait: Duration::from_secs(args.instance_wait_secs),
            },
            metrics.clone(),
        );
        let redis = match args.redis_url.as_ref().filter(|u| !u.expose_secret().is_empty()) {
            Some(url) => {
                let client = RedisClient::new(url.expose_secret()).context("REDIS_URL")?;
                if !client.ping().await {
                    tracing::warn!("Redis is unreachable at start-up; running degraded until it answers");
                }
                Some(client)
            }
            None => None,
        };
        let mut layers: Vec<Arc<dyn ResultCache>> = vec![Arc::new(MemoryCache::new(args.cache_max_bytes))];
        if let Some(redis) = &redis {
            layers.push(Arc::new(RedisCache::new(redis.clone())));
        }
        let cache = Layers::new(layers, metrics.clone());
        let shared_sessions = redis
            .as_ref()
            .map(|redis| Arc::new(FallbackSessionStore::new(RedisSessionStore::new(redis.clone()))));
        let sessions: Arc<dyn SessionStore> = match &shared_sessions {
            Some(shared) => shared.clone(),
            None => Arc::new(MemorySessionStore::default()),
        };
        let core = Arc::new(
            Invoker::new(
                cache,
                pool.clone(),
                metrics.clone(),
                Arc::new(records),
                InvokeSettings {
                    cache_ttl: Duration::from_secs(args.cache_ttl_secs),
                    max_cache_ttl: MAX_CACHE_TTL,
                    log_limit_bytes: args.log_limit_bytes,
                },
            )
            .with_followers(logs.hub.clone())
            .with_file_grants(run_keys.clone()),
        );
        let engine = Arc::new(Engine::new(
            registry,
            sessions.clone(),
            core,
            metrics.clone(),
            EngineSettings {
                session_ttl: args.session_ttl(),
                max_timeout_ms: args.max_timeout_ms,
                max_retained_per_subject: args.max_sessions_per_subject as usize,
            },
        ));
        let limits = Limits {
            execute: args.rate_limit_execute,
            functions: args.rate_limit_functions,
            unauthenticated: args.rate_limit_unauthenticated,
        };
        // The local limiter is the whole story without Redis, and the
        // fallback while Redis does not answer.
        let local_limiter = Arc::new(LocalRateLimiter::new(limits));
        let (limiter, admission): (Arc<dyn RateLimiter>, Arc<dyn Admission>) = match (&redis, shared_sessions) {
            (Some(redis), Some(shared_sessions)) => {
                let limiter = Arc::new(RedisRateLimiter::new(redis.clone(), limits, local_limiter.clone()));
                let admission = RedisAdmission::new(redis.clone(), limiter.clone(), shared_sessions);
                (limiter, Arc::new(admission))
            }
            _ => {
                let limiter: Arc<dyn RateLimiter> = local_limiter.clone();
                (limiter.clone(), Arc::new(InProcess::new(limiter, sessions)))
            }
        };

        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(pool.clone().maintain(stop.clone()));
        let record_writer = tokio::spawn(write_records);
        tasks.spawn({
            let engine = engine.clone();
            let limiter = local_limiter.clone();
            let logs = logs.clone();
            let files = files.clone();
            let (records, queue) = (stores.executions.clone(), stores.queue.clone());
            let execution_retention = Duration::from_secs(args.execution_retention_hours * 3600);
            let (installer, package_store) = (installer.clone(), package_store.clone());
            let keep_unused = Duration::from_secs(args.deps_keep_unused_secs);
            // A quarter of the time unused installs and package files are
            // kept, from every sweep to every 10 minutes.
            let unused_sweep_ticks =
                (args.deps_keep_unused_secs / 4 / SWEEP_EVERY.as_secs()).clamp(1, 600 / SWEEP_EVERY.as_secs());
            let stop = stop.clone();
            async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                // Old function logs and executions and expired files are
                // deleted at start-up, then every few minutes (files: every
                // minute).
                let mut ticks: u64 = 0;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    engine.sweep().await;
                    limiter.shrink();
                    logs.recent.expire();
                    if ticks.is_multiple_of(LOG_SWEEP_TICKS) {
                        logs.sweep().await;
                        crate::executions::purge_old(&*records, &*queue, execution_retention).await;
                    }
                    if ticks.is_multiple_of(FILE_SWEEP_TICKS) {
                        files.sweep().await;
                    }
                    // Other replicas may have changed functions in a shared store.
                    let refreshed = engine.refresh().await;
                    if let Err(e) = &refreshed {
                        tracing::debug!(error = format!("{e:#}"), "refreshing the registry");
                    }
                    // Installs and package files no current version uses,
                    // once this replica knows every function's current
                    // version.
                    if refreshed.is_ok() && ticks.is_multiple_of(unused_sweep_ticks) {
                        let (installer, packages) = (installer.clone(), package_store.clone());
                        let (keys, hashes) = (engine.registry.dependency_keys(), engine.registry.code_hashes());
                        let removed = tokio::task::spawn_blocking(move || {
                            let installs = installer.map_or(0, |i| i.collect(&keys));
                            (installs, packages.collect(&hashes, keep_unused))
                        })
                        .await;
                        if let Ok((installs, packages)) = removed
                            && installs + packages > 0
                        {
                            tracing::info!(installs, packages, "files no function uses any more removed");
                        }
                    }
                    ticks += 1;
                }
            }
        });

        let executions = crate::executions::Executions::new(
            stores.queue.clone(),
            engine.clone(),
            crate::executions::callbacks::Targets::new(&args.callback_allow_networks)?,
            crate::executions::events::Events::new(redis.clone(), args.max_streams_per_subject.max(1)),
            crate::executions::ExecutionSettings {
                workers: args.execution_workers,
                lease: Duration::from_secs(args.execution_lease_secs.max(2)),
                per_subject: args.execution_max_per_subject.max(1),
                per_function: args.execution_max_per_function.max(1),
                max_pending: args.execution_max_pending_per_subject,
                idempotency_window: Duration::from_secs(24 * 3600),
                poll: Duration::from_secs(1),
            },
        );
        tasks.spawn(executions.callbacks.clone().run());
        tasks.spawn(executions.events.clone().relay(stop.clone()));
        if args.execution_workers > 0 {
            tasks.spawn(executions.clone().run(stores.health.kind() == "sqlite"));
        } else {
            tracing::info!("EXECUTION_WORKERS is 0: this controller queues asynchronous executions but runs none");
        }

        let state = AppState::new(http::Shared {
            executions: executions.clone(),
            engine: engine.clone(),
            database: stores.health,
            auth,
            limiter,
            admission,
            metrics,
            redis,
            builder: builder.clone().ok(),
            installer: installer.clone(),
            logs,
            docker,
            files,
        });
        tasks.spawn({
            let router = http::files_socket_router(state.clone(), run_keys);
            let stop = stop.clone();
            async move {
                let served = axum::serve(files_listener, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "serving the files socket");
                }
            }
        });
        let http_settings = HttpSettings {
            max_body_bytes: args.max_body_bytes,
            max_registration_bytes: args.max_registration_bytes(),
            max_upload_bytes: args.max_upload_bytes(),
            cors_allowed_origins: args.cors_allowed_origins.clone(),
        };
        let router = http::router(state, &http_settings);
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        Ok(Application {
            listener,
            router,
            http_settings,
            engine,
            executions,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            tasks,
            builder: builder.ok(),
            installer,
            record_writer,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, lets in-flight requests finish, then
    /// stops the background builds and terminates every instance.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let app = http::app(self.router, &self.http_settings);
        crate::http::conn::serve(crate::http::conn::Listener(self.listener), app, shutdown).await;
        tracing::info!("shutting down: stopping instances");
        self.executions.shutdown().await;
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::error!("background tasks still running after 10 s");
        }
        if let Some(installer) = &self.installer {
            installer.shutdown().await;
        }
        if let Some(builder) = &self.builder {
            builder.shutdown().await;
        }
        self.engine.shutdown().await;
        // Both hold the engine, whose records' sender must go.
        drop(self.executions);
        drop(self.engine);
        // The router's state held the engine too; it is gone with `serve`.
        if tokio::time::timeout(Duration::from_secs(10), self.record_writer)
            .await
            .is_err()
        {
            tracing::error!("execution records still unwritten after 10 s; giving up");
        }
        Ok(())
    }
}

/// The docker backend over the engine at `DOCKER_HOST`: it runs only what
/// `--placement` gives it.
fn docker_backend(
    args: &ServeArgs,
    data_dir: &std::path::Path,
    process: &ProcessBackend,
    builder: Option<Arc<fnrt_backends::build::Builder>>,
    installer: Option<Arc<Installer>>,
    files_socket: &std::path::Path,
) -> anyhow::Result<DockerBackend> {
    let (packages, instances) = process.packages();
    let images = [Language::Nodejs, Language::Python, Language::Rust]
        .into_iter()
        .map(|l| (l, args.docker_image.replace("{language}", &l.to_string())))
        .collect();
    DockerBackend::new(DockerConfig {
        host: args
            .docker_host
            .clone()
            .unwrap_or_else(fnrt_backends::docker::default_host),
        images,
        instances_dir: instances.with_file_name("containers"),
        controller_id: fnrt_backends::docker::controller_id(data_dir),
        uids: process.uids(),
        uid: args.docker_uid,
        scratch_bytes: args.instance_scratch_mb * 1024 * 1024,
        max_processes: args.instance_max_processes,
        max_open_files: args.instance_max_open_files,
        cpus: args.docker_cpus,
        max_containers: args.docker_max_containers,
        remote: process.remote_settings(),
        builder,
        packages,
        installer,
        files_socket: Some(files_socket.to_owned()),
    })
}

/// Start-up of a docker backend that functions are placed on: leftovers of
/// an earlier run removed, and every image there (a missing one stops the
/// start with how to build it). An engine that does not answer only makes
/// those functions unavailable until it does.
async fn prepare_docker(docker: &DockerBackend) -> anyhow::Result<()> {
    match docker.health().await {
        Err(e) => {
            tracing::error!(error = %e, "docker-placed functions are unavailable until the container engine answers");
            return Ok(());
        }
        Ok(version) => tracing::info!(%version, "container engine"),
    }
    match docker.remove_leftovers().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(containers = n, "containers left by an earlier run removed"),
        Err(e) => tracing::warn!(error = %e, "removing containers left by an earlier run"),
    }
    docker
        .check_images()
        .await
        .map_err(|e| anyhow::anyhow!("the docker backend's runtime images: {e}"))
}
