//! The wasm backend: `wasm-*` functions run in wasmtime inside the
//! controller. A function is a WASI preview 1 command module; it reads
//! `{"params": …, "context": …}` as JSON on stdin and writes its result as
//! JSON on stdout: a module built with fnrt-sdk writes it after a marker the
//! backend gives it per run (`FNRT_RESULT_MARKER`), so what the function
//! prints itself does not spoil it (and shows in an error's `stdout_tail`).
//!
//! - One [`wasmtime::Engine`] (pooling allocator, epoch interruption, async).
//!   A run takes one of the pool's `WASM_MAX_INSTANCES` slots (a
//!   semaphore's permit) or waits for one.
//! - Per function version, the module is compiled once and linked once into
//!   an `InstancePre`, cached by code hash. Compiled code is also kept on
//!   disk (`DATA_DIR/wasm-cache/{engine compatibility hash}/{sha256}.cwasm`),
//!   so a restart loads instead of recompiling. Both hold at most
//!   `WASM_CACHE_MB` of compiled code, the least recently compiled or
//!   loaded dropped first (`Linked`, `trim_disk`). A module larger than
//!   `WASM_MAX_MODULE_BYTES` or slower to compile than
//!   `WASM_COMPILE_BUDGET_SECS` is refused at registration.
//! - Compiling happens in a process of its own (`controller compile-wasm
//!   OUT`, [`compile_main`]), which writes the disk cache's file: a module
//!   that makes Cranelift spin or grow is killed at the budget instead of
//!   holding a thread of the controller, and the controller itself never
//!   runs (or keeps in memory) the compiler: it loads compiled code.
//! - A function is WAT text (`.wat`), a binary module as base64 (`.wasm`),
//!   or a Rust crate (`Cargo.toml`) that [`crate::build`] compiled for
//!   `wasm32-wasip1`.
//! - Per execution, a fresh `Store` and instance: nothing survives between
//!   executions or subjects. The store gets a memory cap (`memory_mb`),
//!   stdout/stderr pipes with caps, stdin with the input, only the manifest's
//!   environment, no preopened directories and no sockets.
//! - A ticker advances the epoch every 10 ms while a run is in progress (it
//!   sleeps otherwise: no wake-ups of an idle controller); a running guest
//!   yields at each tick, so the engine's deadline can drop it, and traps
//!   past the deadline as a backstop.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module, PoolingAllocationConfig,
};
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

use crate::build::Builder;
use fnrt_core::function::FunctionVersion;
use fnrt_core::language::Language;
use fnrt_core::logs::{OutputTap, Stream};
use fnrt_core::metrics::Metrics;

/// The variable that tells a module (built with fnrt-sdk) the marker to
/// write before its answer on stdout.
const RESULT_MARKER_ENV: &str = "FNRT_RESULT_MARKER";
use fnrt_core::runtime::{Instance, InstanceError, RunOutcome, RunRequest, RuntimeBackend, Shape, StartFor};

/// How often the epoch advances.
const TICK: Duration = Duration::from_millis(10);
/// Grace past the deadline before the guest traps by itself (the engine's
/// timeout normally drops it first).
const BACKSTOP: Duration = Duration::from_millis(500);
/// stderr kept per execution.
const STDERR_CAP: usize = 64 * 1024;

/// What a store carries.
struct State {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

#[derive(Debug, Clone)]
pub struct WasmConfig {
    /// Largest stdout of one run.
    pub max_output_bytes: usize,
    /// Largest module accepted, in bytes (binary, WAT text or built).
    pub max_module_bytes: usize,
    /// Longest a module may take to compile (at registration, or when the
    /// disk cache lacks it); the compiler is killed past it.
    pub compile_budget: Duration,
    /// `DATA_DIR/wasm-cache`.
    pub cache_dir: PathBuf,
    /// The most compiled code kept, in bytes: on disk, and linked in
    /// memory (`WASM_CACHE_MB`); the least recently compiled or loaded
    /// goes first past it.
    pub cache_bytes: u64,
    /// The controller's program, run as `PROGRAM compile-wasm OUT` to
    /// compile a module; `None` compiles in this process.
    pub compiler: Option<PathBuf>,
    /// Runs at one time (`WASM_MAX_INSTANCES`): the engine's pool has this
    /// many instance slots, each reserving the address space of a 4 GiB
    /// memory; a run past them waits for one.
    pub max_instances: u32,
}

/// The instance slots of an engine unless configured
/// (`WASM_MAX_INSTANCES`).
pub const DEFAULT_MAX_INSTANCES: u32 = 256;

pub struct WasmBackend {
    engine: Engine,
    linker: Linker<State>,
    /// Linked modules by code hash.
    modules: Mutex<Linked>,
    config: WasmConfig,
    /// Compiled modules of this engine's configuration.
    cache_dir: PathBuf,
    /// Builds `Cargo.toml` functions.
    builder: Option<Arc<Builder>>,
    metrics: Arc<Metrics>,
    ticker: Ticker,
    /// One permit per slot of the engine's pool: a run holds one from
    /// before its instance to after its store is gone. Without it a run
    /// past the pool's size failed as if its module had ("maximum
    /// concurrent instance limit reached").
    slots: tokio::sync::Semaphore,
}

/// The epoch ticker's thread, and what it shares with the backend.
struct Ticker {
    shared: Arc<TickerShared>,
    thread: std::thread::Thread,
}

#[derive(Default)]
struct TickerShared {
    /// Runs in progress: it ticks while there are any.
    runs: AtomicUsize,
    /// The backend is gone: the thread ends.
    stopped: AtomicBool,
}

/// A run in progress, for the ticker: it ticks until the last one drops.
struct Ticking(Arc<TickerShared>);

impl Ticker {
    fn start_run(&self) -> Ticking {
        if self.shared.runs.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        Ticking(self.shared.clone())
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        self.0.runs.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

impl std::fmt::Debug for WasmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmBackend").finish_non_exhaustive()
    }
}

/// What of a pooled slot's memory and table is reset in place rather than
/// given back to the kernel (see [`engine_config`]).
const KEEP_RESIDENT: usize = 1 << 20;

/// The engine's settings: a pooling allocator of `instances` slots and
/// epoch interruption (the benchmark's bare-wasmtime floor runs with the
/// same). The number of slots changes no compiled code (the engine's
/// compatibility hash).
pub fn engine_config(instances: u32) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(instances)
        .total_memories(instances)
        .total_tables(instances)
        .max_memory_size(4 << 30)
        // A slot's memory goes back to its first state for the next
        // instance. With `madvise` (the default) every run ended in a
        // system call and a TLB shootdown to the other cores (IPIs, costly
        // in a VM), and the next run faulted its pages in again: the pages
        // a run dirtied within the first MiB are reset with `memset`
        // instead, found with the `PAGEMAP_SCAN` ioctl where the kernel has
        // it (6.7+); past that MiB, `madvise` as before.
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(Enabled::Auto);
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

impl WasmBackend {
    /// Builds the engine and starts its epoch ticker.
    pub fn new(config: WasmConfig, builder: Option<Arc<Builder>>, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Self>> {
        let engine = Engine::new(&engine_config(config.max_instances)).map_err(|e| {
            anyhow::anyhow!(
                "cannot reserve {} wasm instance slots (WASM_MAX_INSTANCES), 4 GiB of address space each: {e:#}",
                config.max_instances
            )
        })?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut State| &mut s.wasi)?;
        // The ticker is a thread of its own, not a task: a guest that never
        // yields holds its tokio worker, and a ticker task queued behind it
        // on that worker would never advance the epoch that stops it.
        // With no run in progress it parks: a run's start unparks it, and
        // so does the backend's end. It sleeps before it ticks, so the run
        // that woke it gets its first tick a whole TICK later, as it would
        // have from a ticker that never stopped (a tick makes a run yield).
        let weak = engine.weak();
        let shared = Arc::new(TickerShared::default());
        let seen = shared.clone();
        let thread = std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            while !seen.stopped.load(Ordering::Acquire) {
                if seen.runs.load(Ordering::Acquire) == 0 {
                    std::thread::park();
                    continue;
                }
                std::thread::sleep(TICK);
                let Some(engine) = weak.upgrade() else { return };
                engine.increment_epoch();
            }
        })?;
        let ticker = Ticker {
            shared,
            thread: thread.thread().clone(),
        };
        // Code compiled by another wasmtime version or configuration is
        // never loaded: it lives under another directory.
        let mut compat = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut compat);
        let cache_dir = config.cache_dir.join(format!("{:016x}", compat.finish()));
        std::fs::create_dir_all(&cache_dir)?;
        std::fs::set_permissions(&config.cache_dir, std::fs::Permissions::from_mode(0o700))?;
        let slots = tokio::sync::Semaphore::new(config.max_instances as usize);
        Ok(Arc::new(WasmBackend {
            engine,
            linker,
            modules: Mutex::new(Linked::default()),
            slots,
            config,
            cache_dir,
            builder,
            metrics,
            ticker,
        }))
    }

    /// The module bytes of a source file: WAT text (`.wat`) or base64 of a
    /// binary (`.wasm`). (A crate's built module is bytes already.)
    fn module_bytes(entrypoint: &str, code: &str) -> Result<Vec<u8>, String> {
        if entrypoint.ends_with(".wasm") {
            base64::engine::general_purpose::STANDARD
                .decode(code.trim())
                .map_err(|e| format!("a .wasm entrypoint's code must be base64: {e}"))
        } else {
            Ok(code.as_bytes().to_vec())
        }
    }

    /// The compiled module for these bytes, and its compiled size: from the
    /// disk cache, or compiled and then cached (the cache trimmed to
    /// `cache_bytes`).
    fn module(&self, bytes: &[u8]) -> Result<(Module, u64), String> {
        if bytes.len() > self.config.max_module_bytes {
            return Err(format!(
                "the module is {} bytes, more than the limit of {} bytes",
                bytes.len(),
                self.config.max_module_bytes
            ));
        }
        let path = self
            .cache_dir
            .join(format!("{}.cwasm", hex::encode(Sha256::digest(bytes))));
        if path.is_file() {
            match deserialize(&self.engine, &path) {
                Ok(module) => {
                    self.metrics.record_wasm_module(true);
                    // Used now: the last to go when the cache is trimmed.
                    let _ = crate::unused::touch(&path);
                    return Ok((module, file_size(&path)));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "dropping an unreadable compiled module");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let tmp = path.with_extension(format!("tmp{}", rand::random::<u32>()));
        let module = match &self.config.compiler {
            Some(program) => {
                let compiled = self.compile_apart(program, bytes, &tmp);
                let module = compiled
                    .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| format!("keeping compiled code: {e}")))
                    .and_then(|()| {
                        deserialize(&self.engine, &path).map_err(|e| format!("loading compiled code: {e:#}"))
                    });
                let _ = std::fs::remove_file(&tmp);
                module?
            }
            None => {
                let module =
                    Module::new(&self.engine, bytes).map_err(|e| format!("the module does not compile: {e:#}"))?;
                if let Err(e) = module.serialize().and_then(|compiled| {
                    std::fs::write(&tmp, compiled)?;
                    std::fs::rename(&tmp, &path)?;
                    Ok(())
                }) {
                    tracing::warn!(error = %e, "could not keep the compiled module on disk");
                }
                module
            }
        };
        self.metrics.record_wasm_module(false);
        self.trim_disk(&path);
        Ok((module, file_size(&path)))
    }

    /// Compiles `bytes` in `program compile-wasm out`, within the compile
    /// budget (killed past it).
    fn compile_apart(&self, program: &Path, bytes: &[u8], out: &Path) -> Result<(), String> {
        use std::io::{Read as _, Write as _};
        use std::process::{Command, Stdio};
        let mut cmd = Command::new(program);
        cmd.arg("compile-wasm")
            .arg(out)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // This thread waits for the child, so the signal's tie holds.
        crate::build::die_with_controller(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting the wasm compiler ({}): {e}", program.display()))?;
        // The child reads all of its input before it writes anything.
        let written = child.stdin.take().map(|mut stdin| stdin.write_all(bytes));
        let deadline = Instant::now() + self.config.compile_budget;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "the module did not compile within {} s",
                        self.config.compile_budget.as_secs()
                    ));
                }
            }
        };
        if status.success() {
            return match written {
                Some(Ok(())) => Ok(()),
                _ => Err("the wasm compiler did not take the module".into()),
            };
        }
        let mut said = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = stderr.by_ref().take(16 * 1024).read_to_string(&mut said);
        }
        Err(format!("the module does not compile: {}", said.trim()))
    }

    /// Compiles and links a module (refused at registration when it does
    /// not), within the compile budget.
    fn check(self: &Arc<Self>, bytes: Vec<u8>) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let this = self.clone();
        // A thread of its own so the budget can be enforced: compilation
        // cannot be interrupted, but the registration need not wait for it.
        std::thread::spawn(move || {
            let linked = this
                .module(&bytes)
                .and_then(|(m, _)| this.linker.instantiate_pre(&m).map_err(link_error));
            let _ = tx.send(linked.map(drop));
        });
        // Compiling apart stops at the budget by itself (and stops the
        // compiler): its answer comes; in process, nothing stops Cranelift.
        let wait = match self.config.compiler {
            Some(_) => self.config.compile_budget + Duration::from_secs(5),
            None => self.config.compile_budget,
        };
        match rx.recv_timeout(wait) {
            Ok(result) => result,
            Err(_) => Err(format!(
                "the module did not compile within {} s",
                self.config.compile_budget.as_secs()
            )),
        }
    }
}

fn link_error(e: wasmtime::Error) -> String {
    format!("the module cannot be linked (a WASI preview 1 command module is expected): {e:#}")
}

/// `controller compile-wasm OUT`: compiles the module on standard input
/// with the backend's engine settings and writes its compiled code to OUT
/// (which the backend then loads). Errors go to standard error.
pub fn compile_main(mut args: impl Iterator<Item = String>) -> std::process::ExitCode {
    use std::io::Read as _;
    let Some(out) = args.next() else {
        eprintln!("usage: controller compile-wasm OUT < MODULE");
        return std::process::ExitCode::from(2);
    };
    let compiled = (|| -> wasmtime::Result<()> {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes)?;
        // It only compiles: one slot, not the address space of 256 (the
        // slots change no compiled code; under valgrind 256 cannot be had).
        let engine = Engine::new(&engine_config(1))?;
        std::fs::write(&out, Module::new(&engine, &bytes)?.serialize()?)?;
        Ok(())
    })();
    match compiled {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The size of the file at `path`, 0 when it cannot be read.
fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Linked modules by their function version's code hash, the oldest
/// dropped first once their compiled code passes the cache's size: a
/// module's code stays mapped from its file while it is linked, so without
/// this neither memory nor the disk its file held would be given back. An
/// instance keeps what it was linked from; a version dropped here is
/// linked again (from disk, or compiled) at its next start.
#[derive(Default)]
struct Linked {
    by_hash: HashMap<String, InstancePre<State>>,
    /// Code hashes in the order they were linked, with their sizes.
    order: std::collections::VecDeque<(String, u64)>,
    bytes: u64,
}

impl Linked {
    fn get(&self, code_hash: &str) -> Option<InstancePre<State>> {
        self.by_hash.get(code_hash).cloned()
    }

    fn insert(&mut self, code_hash: String, pre: InstancePre<State>, size: u64, cap: u64) {
        if self.by_hash.insert(code_hash.clone(), pre).is_some() {
            // Linked again meanwhile by another start: counted once.
            return;
        }
        self.order.push_back((code_hash, size));
        self.bytes += size;
        // The newest stays, whatever its size.
        while self.bytes > cap && self.order.len() > 1 {
            let Some((old, old_size)) = self.order.pop_front() else {
                break;
            };
            self.by_hash.remove(&old);
            self.bytes -= old_size;
        }
    }
}

/// Loads compiled code this controller wrote.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, path: &Path) -> wasmtime::Result<Module> {
    // SAFETY: wasmtime trusts serialized code; this file was written by
    // `Module::serialize` of an engine with the same compatibility hash (the
    // directory's name; this controller or its `compile-wasm` child, with
    // `engine_config`), into the data dir that only the controller's user
    // can write (0700), and is replaced atomically. wasmtime still checks
    // the header, version and settings before using it.
    unsafe { Module::deserialize_file(engine, path) }
}

/// The wasm backend as the pool sees it: instances share its engine.
#[derive(Clone)]
pub struct WasmRuntime(pub Arc<WasmBackend>);

#[async_trait]
impl RuntimeBackend for WasmRuntime {
    fn name(&self) -> &'static str {
        "wasm"
    }

    fn languages(&self) -> Vec<Language> {
        vec![Language::Wasm]
    }

    async fn ready(&self, function: &FunctionVersion) -> Result<(), InstanceError> {
        crate::crate_ready(self.0.builder.as_ref(), function)
    }

    fn check_code(&self, _language: Language, entrypoint: &str, code: &str) -> Result<(), String> {
        self.0.check(WasmBackend::module_bytes(entrypoint, code)?)
    }

    fn check_artifact(&self, _language: Language, artifact: &[u8]) -> Result<(), String> {
        self.0.check(artifact.to_vec())
    }

    async fn start(
        &self,
        language: Language,
        shape: &Shape,
        _purpose: StartFor,
    ) -> Result<Box<dyn Instance>, InstanceError> {
        if language != Language::Wasm {
            return Err(InstanceError::Unavailable {
                language,
                message: "not served by the wasm backend".into(),
            });
        }
        if !shape.network.is_empty() {
            return Err(InstanceError::Unavailable {
                language,
                message: "wasm functions have no network ('network.egress' is refused)".into(),
            });
        }
        let memory_mb = shape.memory_mb;
        Ok(Box::new(WasmInstance {
            id: format!("wasm-{}", hex::encode(rand::random::<[u8; 4]>())),
            backend: self.0.clone(),
            memory_mb,
            function: None,
        }))
    }
}

/// A wasm "instance": a function's linked module. Each run instantiates it
/// afresh.
pub struct WasmInstance {
    id: String,
    backend: Arc<WasmBackend>,
    memory_mb: u64,
    function: Option<Loaded>,
}

/// The function an instance was initialised with.
struct Loaded {
    pre: InstancePre<State>,
    /// The manifest's environment, the only one the guest sees.
    env: Vec<(String, String)>,
}

#[async_trait]
impl Instance for WasmInstance {
    fn id(&self) -> &str {
        &self.id
    }

    fn language(&self) -> Language {
        Language::Wasm
    }

    async fn init(&mut self, function: &FunctionVersion) -> Result<(), InstanceError> {
        if self.function.is_some() {
            return Err(InstanceError::Protocol("instance is already initialised".into()));
        }
        let cached = self.backend.modules.lock().unwrap().get(&function.code_hash);
        let pre = match cached {
            Some(pre) => pre,
            None => {
                let bytes = match (&function.files, &self.backend.builder) {
                    (Some(_), Some(builder)) => crate::built_artifact(builder, function).await?,
                    (Some(_), None) => return Err(InstanceError::Protocol("no builder for a crate".into())),
                    (None, _) => {
                        WasmBackend::module_bytes(&function.manifest.entrypoint, &function.code).map_err(init_error)?
                    }
                };
                // Compiling is CPU work: off the async workers.
                let backend = self.backend.clone();
                let code_hash = function.code_hash.clone();
                tokio::task::spawn_blocking(move || backend.linked(code_hash, &bytes))
                    .await
                    .map_err(|e| InstanceError::Protocol(e.to_string()))??
            }
        };
        let env = function
            .manifest
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.function = Some(Loaded { pre, env });
        Ok(())
    }

    async fn run(&mut self, request: RunRequest<'_>) -> Result<RunOutcome, InstanceError> {
        let Some(Loaded { pre, env }) = &self.function else {
            return Err(InstanceError::Protocol("instance is not initialised".into()));
        };
        // Serialised from the request's own values (a `json!` would copy
        // them whole first).
        #[derive(serde::Serialize)]
        struct Input<'a> {
            params: &'a serde_json::Value,
            context: &'a serde_json::Value,
        }
        let input = serde_json::to_vec(&Input {
            params: request.params,
            context: request.context,
        })
        .map_err(|e| InstanceError::Protocol(e.to_string()))?;
        let stdout = CappedOutput::new(self.backend.config.max_output_bytes);
        // stderr lines go to the run's logs as they come; stdout's, which
        // share the pipe with the answer, once the run is over.
        let tap = OutputTap::new();
        if let Some(logs) = request.logs {
            tap.open(logs.clone(), None);
        }
        let stderr = CappedOutput::logged(STDERR_CAP, tap.clone());
        // What the module prints before this marker is its own output; its
        // answer follows the last one (modules not built with fnrt-sdk write
        // no marker: all of stdout is their answer).
        let marker = format!("fnrt-result:{}:", hex::encode(rand::random::<[u8; 16]>()));
        let wasi = WasiCtxBuilder::new()
            .stdin(MemoryInputPipe::new(input))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .envs(env)
            .env(RESULT_MARKER_ENV, &marker)
            .build_p1();
        let limits = StoreLimitsBuilder::new()
            .memory_size((self.memory_mb as usize) << 20)
            .instances(1)
            .build();
        // Declared before the store, so given back after it is gone.
        let _slot = self
            .backend
            .slots
            .acquire()
            .await
            .map_err(|e| InstanceError::Protocol(e.to_string()))?;
        let _ticking = self.backend.ticker.start_run();
        let mut store = Store::new(&self.backend.engine, State { wasi, limits });
        store.limiter(|s| &mut s.limits);
        let backstop = Instant::now() + request.deadline + BACKSTOP;
        store.set_epoch_deadline(1);
        let flooded = stdout.clone();
        store.epoch_deadline_callback(move |_| {
            // Past the output cap the run is over, even if the guest ignores
            // its failed writes.
            if Instant::now() >= backstop || flooded.overflowed() {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        let outcome = async {
            let instance = pre.instantiate_async(&mut store).await?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call_async(&mut store, ()).await
        }
        .await;
        tap.close(Duration::ZERO).await;
        if let Some(logs) = request.logs {
            let contents = stdout.contents();
            let (_, printed) = split_answer(&contents, marker.as_bytes());
            if !printed.is_empty() {
                for line in printed.split(|&b| b == b'\n') {
                    logs.push(Stream::Stdout, line);
                }
            }
        }
        let stderr_tail = tail(&stderr.contents());
        let exit = match outcome {
            Ok(()) => 0,
            Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) => exit.0,
                None => {
                    let trap = e.downcast_ref::<wasmtime::Trap>().map(|t| t.to_string());
                    let message = match &trap {
                        Some(t) => format!("the module trapped: {t}"),
                        None => format!("the module failed: {e}"),
                    };
                    let message = if stdout.overflowed() {
                        format!(
                            "the module wrote more than {} bytes to stdout",
                            self.backend.config.max_output_bytes
                        )
                    } else {
                        message
                    };
                    return Ok(RunOutcome::Failed {
                        message,
                        details: json!({ "trap": trap, "error": format!("{e:#}"), "stderr_tail": stderr_tail }),
                    });
                }
            },
        };
        let contents = stdout.contents();
        let (answer, printed) = split_answer(&contents, marker.as_bytes());
        if exit != 0 {
            // A module built with fnrt-sdk reports its error on stdout.
            if let Some(outcome) = reported_error(answer, printed, &stderr_tail) {
                return Ok(outcome);
            }
            return Ok(RunOutcome::Failed {
                message: format!("the module exited with status {exit}"),
                details: json!({ "exit_code": exit, "stderr_tail": stderr_tail }),
            });
        }
        match serde_json::from_slice::<Value>(answer) {
            Ok(result) => Ok(RunOutcome::Success(result)),
            Err(e) => Ok(RunOutcome::Failed {
                message: format!("the module's stdout is not JSON: {e}"),
                details: json!({ "stderr_tail": stderr_tail }),
            }),
        }
    }

    fn is_alive(&mut self) -> bool {
        true
    }

    async fn terminate(&mut self) {
        self.function = None;
    }

    /// A module has no files socket (WASI with no preopened directory and
    /// no sockets): a key would open nothing.
    fn reaches_files(&self) -> bool {
        false
    }
}

impl WasmBackend {
    /// The function's linked module, compiled (or loaded from disk) on
    /// first use.
    fn linked(&self, code_hash: String, bytes: &[u8]) -> Result<InstancePre<State>, InstanceError> {
        let (module, size) = self.module(bytes).map_err(init_error)?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| init_error(link_error(e)))?;
        self.modules
            .lock()
            .unwrap()
            .insert(code_hash, pre.clone(), size, self.config.cache_bytes);
        Ok(pre)
    }

    /// Removes the compiled modules on disk least recently compiled or
    /// loaded (their modification time) until what is left fits in
    /// `cache_bytes`; never `keep`, the one just written.
    fn trim_disk(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.cache_dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm") && e.path() != keep)
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = file_size(keep) + files.iter().map(|f| f.1).sum::<u64>();
        files.sort();
        for (_, size, path) in files {
            if total <= self.config.cache_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= size;
            }
        }
    }
}

fn init_error(message: String) -> InstanceError {
    InstanceError::Init {
        message,
        details: json!({}),
    }
}

/// A guest's stdout or stderr: kept in memory up to a cap; a write past the
/// cap fails (and fails the run) rather than spin or grow. (wasmtime's own
/// memory pipe answers "0 bytes written" when full, which WASI's write-all
/// loop retries forever.)
#[derive(Clone)]
struct CappedOutput {
    buffer: Arc<Mutex<Vec<u8>>>,
    capacity: usize,
    overflowed: Arc<std::sync::atomic::AtomicBool>,
    /// Where what is written also goes, line by line, as the run's logs
    /// (stderr); writes past the capacity then succeed and are dropped
    /// here, so a chatty module is not failed by its own logging.
    tap: Option<Arc<OutputTap>>,
}

impl CappedOutput {
    fn new(capacity: usize) -> Self {
        CappedOutput {
            buffer: Arc::new(Mutex::new(Vec::new())),
            capacity,
            overflowed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            tap: None,
        }
    }

    fn logged(capacity: usize, tap: Arc<OutputTap>) -> Self {
        CappedOutput {
            tap: Some(tap),
            ..CappedOutput::new(capacity)
        }
    }

    fn contents(&self) -> Vec<u8> {
        self.buffer.lock().unwrap().clone()
    }

    fn overflowed(&self) -> bool {
        self.overflowed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps `buf`, or refuses it past the cap (stdout: the run is then
    /// over; stderr: it is dropped, only the tap sees it).
    fn put(&self, buf: &[u8]) -> std::io::Result<()> {
        if let Some(tap) = &self.tap {
            tap.feed(Stream::Stderr, buf);
        }
        let mut buffer = self.buffer.lock().unwrap();
        if buffer.len() + buf.len() > self.capacity {
            if self.tap.is_some() {
                // Only the crash report's copy is capped.
                return Ok(());
            }
            self.overflowed.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(std::io::Error::other("output limit exceeded"));
        }
        buffer.extend_from_slice(buf);
        Ok(())
    }
}

/// The stream the guest's `fd_write` reaches. Writing to memory never
/// waits, so it is done in the call: wasmtime's default adapter for an
/// `AsyncWrite` spawns a task per stream and hands every write to it
/// (two spawns per run and a wake per write, measured in the thirteenth
/// pass of docs/benchmarks.md).
#[async_trait]
impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.put(&bytes).map_err(|e| StreamError::LastOperationFailed(e.into()))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // What does not fit is refused by `write` (as the error it is, not
        // as "nothing may be written", which WASI's write loop retries).
        Ok(usize::MAX)
    }
}

#[async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CappedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(self.put(buf).map(|()| buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

/// What a module wrote to stdout: its answer (after the `marker`, or all of
/// it when there is none) and what it printed before. The first marker is
/// the one: fnrt-sdk hides the marker from the function, which then cannot
/// print it, while an answer may hold anything.
fn split_answer<'a>(stdout: &'a [u8], marker: &[u8]) -> (&'a [u8], &'a [u8]) {
    match stdout.windows(marker.len()).position(|w| w == marker) {
        Some(at) => {
            let printed = &stdout[..at];
            (
                &stdout[at + marker.len()..],
                printed.strip_suffix(b"\n").unwrap_or(printed),
            )
        }
        None => (stdout, &[]),
    }
}

/// Bytes of what a failed module printed kept in its error's details.
const STDOUT_TAIL: usize = 4096;

/// `{"error": {"code", "message", "details"}}` on stdout, as fnrt-sdk's
/// `export!` writes it before exiting with status 1.
fn reported_error(answer: &[u8], printed: &[u8], stderr_tail: &str) -> Option<RunOutcome> {
    let body: Value = serde_json::from_slice(answer).ok()?;
    let error = body.get("error")?;
    let message = error.get("message")?.as_str()?.to_owned();
    let mut details = match error.get("details") {
        Some(Value::Object(d)) => Value::Object(d.clone()),
        _ => json!({}),
    };
    if !stderr_tail.is_empty() {
        details["stderr_tail"] = json!(stderr_tail);
    }
    if !printed.is_empty() {
        let tail = &printed[printed.len().saturating_sub(STDOUT_TAIL)..];
        details["stdout_tail"] = json!(String::from_utf8_lossy(tail));
    }
    Some(match error.get("code").and_then(Value::as_str) {
        Some("INVALID_PARAMS") => RunOutcome::InvalidParams { message, details },
        _ => RunOutcome::Failed { message, details },
    })
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(4096);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}
