//! The wasm backend: `wasm-*` functions run in wasmtime inside the
//! controller. A function is a WASI preview 1 command module; it reads
//! `{"params": …, "context": …}` as JSON on stdin and writes its result as
//! JSON on stdout.
//!
//! - One [`wasmtime::Engine`] (pooling allocator, epoch interruption, async).
//! - Per function version, the module is compiled once and linked once into
//!   an `InstancePre`, cached by code hash.
//! - Per execution, a fresh `Store` and instance: nothing survives between
//!   executions or subjects. The store gets a memory cap (`memory_mb`),
//!   stdout/stderr pipes with caps, stdin with the input, only the manifest's
//!   environment, no preopened directories and no sockets.
//! - A ticker advances the epoch every 10 ms; a running guest yields at each
//!   tick, so the engine's deadline can drop it, and traps past the deadline
//!   as a backstop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use serde_json::{Value, json};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module, PoolingAllocationConfig};
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;

use super::{Instance, InstanceError, RunOutcome, RunRequest, RuntimeBackend};
use crate::language::Language;
use crate::registry::FunctionVersion;

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

pub struct WasmBackend {
    engine: Engine,
    linker: Linker<State>,
    /// Linked modules by code hash.
    modules: Mutex<HashMap<String, InstancePre<State>>>,
    max_output_bytes: usize,
}

impl std::fmt::Debug for WasmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmBackend").finish_non_exhaustive()
    }
}

impl WasmBackend {
    /// Builds the engine and starts its epoch ticker.
    pub fn new(max_output_bytes: usize) -> anyhow::Result<Arc<Self>> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(256)
            .total_memories(256)
            .total_tables(256)
            .max_memory_size(4 << 30);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut State| &mut s.wasi)?;
        let ticker = engine.weak();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            loop {
                tick.tick().await;
                match ticker.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        });
        Ok(Arc::new(WasmBackend {
            engine,
            linker,
            modules: Mutex::new(HashMap::new()),
            max_output_bytes,
        }))
    }

    /// The module bytes of a function: WAT text (`.wat`) or base64 of a
    /// binary (`.wasm`).
    pub fn module_bytes(entrypoint: &str, code: &str) -> Result<Vec<u8>, String> {
        if entrypoint.ends_with(".wasm") {
            base64::engine::general_purpose::STANDARD
                .decode(code.trim())
                .map_err(|e| format!("a .wasm entrypoint's code must be base64: {e}"))
        } else {
            Ok(code.as_bytes().to_vec())
        }
    }

    /// Compiles a function's module (refused at registration when it does not).
    pub fn compile(&self, entrypoint: &str, code: &str) -> Result<Module, String> {
        let bytes = Self::module_bytes(entrypoint, code)?;
        Module::new(&self.engine, bytes).map_err(|e| format!("the module does not compile: {e:#}"))
    }
}

#[async_trait]
impl RuntimeBackend for Arc<WasmBackend> {
    fn name(&self) -> &'static str {
        "wasm"
    }

    fn languages(&self) -> Vec<Language> {
        vec![Language::Wasm]
    }

    fn check_code(&self, _language: Language, entrypoint: &str, code: &str) -> Result<(), String> {
        let module = self.compile(entrypoint, code)?;
        self.linker
            .instantiate_pre(&module)
            .map(|_| ())
            .map_err(|e| format!("the module cannot be linked (WASI preview 1 only): {e:#}"))
    }

    async fn start(&self, language: Language, memory_mb: u64) -> Result<Box<dyn Instance>, InstanceError> {
        if language != Language::Wasm {
            return Err(InstanceError::Unavailable {
                language,
                message: "not served by the wasm backend".into(),
            });
        }
        Ok(Box::new(WasmInstance {
            id: format!("wasm-{}", hex::encode(rand::random::<[u8; 4]>())),
            backend: self.clone(),
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
        let cached = self.backend.modules.lock().unwrap().get(&function.code_hash).cloned();
        let pre = match cached {
            Some(pre) => pre,
            None => {
                // Compiling is CPU work: off the async workers.
                let backend = self.backend.clone();
                let f = FunctionRef {
                    code_hash: function.code_hash.clone(),
                    entrypoint: function.manifest.entrypoint.clone(),
                    code: function.code.clone(),
                };
                tokio::task::spawn_blocking(move || backend.linked(&f))
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
        let input = serde_json::to_vec(&json!({ "params": request.params, "context": request.context }))
            .map_err(|e| InstanceError::Protocol(e.to_string()))?;
        let stdout = CappedOutput::new(self.backend.max_output_bytes);
        let stderr = CappedOutput::new(STDERR_CAP);
        let wasi = WasiCtxBuilder::new()
            .stdin(MemoryInputPipe::new(input))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .envs(env)
            .build_p1();
        let limits = StoreLimitsBuilder::new()
            .memory_size((self.memory_mb as usize) << 20)
            .instances(1)
            .build();
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
                            self.backend.max_output_bytes
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
        if exit != 0 {
            return Ok(RunOutcome::Failed {
                message: format!("the module exited with status {exit}"),
                details: json!({ "exit_code": exit, "stderr_tail": stderr_tail }),
            });
        }
        match serde_json::from_slice::<Value>(&stdout.contents()) {
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
}

/// What [`WasmBackend::linked`] needs of a function, owned for `spawn_blocking`.
struct FunctionRef {
    code_hash: String,
    entrypoint: String,
    code: String,
}

impl WasmBackend {
    /// The function's linked module, compiled on first use.
    fn linked(&self, f: &FunctionRef) -> Result<InstancePre<State>, InstanceError> {
        let init_error = |message: String| InstanceError::Init {
            message,
            details: json!({}),
        };
        let module = self.compile(&f.entrypoint, &f.code).map_err(init_error)?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| init_error(format!("the module cannot be linked (WASI preview 1 only): {e:#}")))?;
        self.modules.lock().unwrap().insert(f.code_hash.clone(), pre.clone());
        Ok(pre)
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
}

impl CappedOutput {
    fn new(capacity: usize) -> Self {
        CappedOutput {
            buffer: Arc::new(Mutex::new(Vec::new())),
            capacity,
            overflowed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    fn contents(&self) -> Vec<u8> {
        self.buffer.lock().unwrap().clone()
    }

    fn overflowed(&self) -> bool {
        self.overflowed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl tokio::io::AsyncWrite for CappedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut buffer = self.buffer.lock().unwrap();
        if buffer.len() + buf.len() > self.capacity {
            self.overflowed.store(true, std::sync::atomic::Ordering::Relaxed);
            return std::task::Poll::Ready(Err(std::io::Error::other("output limit exceeded")));
        }
        buffer.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
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
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(4096);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}
