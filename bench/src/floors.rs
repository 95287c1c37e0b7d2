//! The floors every path is measured beside: what the same work costs with
//! nothing of the controller around it.
//!
//! - [`serve_echo`]: a minimal axum server echoing a JSON body (the HTTP
//!   floor), run as `fnrt-bench echo-server` in a process of its own.
//! - [`Runtime`]: a runtime instance (Node, Python) started bare, no
//!   sandbox, specialised with the same function and hit on its Unix
//!   socket (the runtime floor).
//! - [`wasm_rate`]: bare wasmtime instantiating and running the same module
//!   with a fresh store each time, on every core (the wasm floor).
//! - [`redis_get`]: `redis-benchmark`'s GET (the floor under an L2 hit).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

use crate::load::Stats;
use crate::procs::Proc;

/// Serves `POST /echo` (the JSON body back) on `listen` until killed,
/// printing `listening on ADDR` to stderr once it accepts.
pub(crate) async fn serve_echo(listen: &str) -> anyhow::Result<()> {
    async fn echo(axum::Json(body): axum::Json<Value>) -> axum::Json<Value> {
        axum::Json(body)
    }
    let app = axum::Router::new().route("/echo", axum::routing::post(echo));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

/// Starts the echo floor (this executable, `echo-server`); its address.
pub(crate) fn start_echo() -> anyhow::Result<(Proc, String)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["echo-server", "--listen", "127.0.0.1:0"]);
    Proc::start("echo floor", cmd, Duration::from_secs(10), |line| {
        line.strip_prefix("listening on ").map(|a| format!("http://{a}"))
    })
}

/// A runtime instance started bare, specialised with one function.
#[derive(Debug)]
pub(crate) struct Runtime {
    pub(crate) socket: PathBuf,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Runtime {
    /// Starts `program args… --socket S` in a directory of its own with a
    /// scrubbed environment (as the controller starts one, without the
    /// sandbox) and `/init`s it with `code`.
    pub(crate) async fn start(
        name: &str,
        program: &str,
        args: &[PathBuf],
        entrypoint: &str,
        code: &str,
    ) -> anyhow::Result<Runtime> {
        let dir = tempfile::Builder::new()
            .prefix("fnrt-bench-rt")
            .tempdir_in("/var/tmp")?;
        let socket = dir.path().join("runtime.sock");
        std::fs::create_dir(dir.path().join("tmp"))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .arg("--socket")
            .arg(&socket)
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("LANG", "C.UTF-8")
            .env("TMPDIR", dir.path().join("tmp"));
        let proc = Proc::spawn(name, cmd)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok((200, _)) = unix_request(&socket, "GET", "/health", None).await {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name} did not answer on {}: {}", socket.display(), proc.tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let init = json!({
            "language_title": name, "version": 1, "entrypoint": entrypoint,
            "handler": "handler", "code": code, "env": {}
        });
        let (status, body) = unix_request(&socket, "POST", "/init", Some(init.to_string())).await?;
        if status != 200 {
            bail!("{name} /init answered {status}: {body}");
        }
        Ok(Runtime {
            socket,
            _proc: proc,
            _dir: dir,
        })
    }
}

/// One HTTP/1.1 request on a Unix socket: its status and body.
pub(crate) async fn unix_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Executions per second of `wat` on bare wasmtime: on `threads` threads,
/// for `duration`, each a fresh store and instance of one linked module,
/// its input on stdin and its answer read from stdout, as the wasm backend
/// runs one (same engine settings: pooling allocator, epoch interruption).
pub(crate) fn wasm_rate(wat: &str, input: &Value, threads: usize, duration: Duration) -> anyhow::Result<Stats> {
    use wasmtime::{Engine, Linker, Module, Store};
    use wasmtime_wasi::WasiCtxBuilder;
    use wasmtime_wasi::p1::WasiP1Ctx;
    use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};

    let engine = Engine::new(&fnrt_backends::wasm::engine_config(
        fnrt_backends::wasm::DEFAULT_MAX_INSTANCES,
    ))?;
    let module = Module::new(&engine, wat).map_err(|e| anyhow::anyhow!("compiling the module: {e:#}"))?;
    let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s| s)?;
    let pre = linker.instantiate_pre(&module)?;
    let input = serde_json::to_vec(input)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let latencies = runtime.block_on(async {
        let mut workers = Vec::new();
        for _ in 0..threads {
            let (engine, pre, input) = (engine.clone(), pre.clone(), input.clone());
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while started.elapsed() < duration {
                    let t = Instant::now();
                    let stdout = MemoryOutputPipe::new(64 * 1024);
                    let wasi = WasiCtxBuilder::new()
                        .stdin(MemoryInputPipe::new(input.clone()))
                        .stdout(stdout.clone())
                        .build_p1();
                    let mut store = Store::new(&engine, wasi);
                    store.set_epoch_deadline(u64::MAX / 2);
                    let instance = pre.instantiate_async(&mut store).await?;
                    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                    start.call_async(&mut store, ()).await?;
                    drop(store);
                    if stdout.contents().is_empty() {
                        anyhow::bail!("the module wrote nothing");
                    }
                    latencies.push(t.elapsed());
                }
                anyhow::Ok(latencies)
            }));
        }
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await??);
        }
        anyhow::Ok(all)
    })?;
    Ok(Stats::of_samples(&latencies, started.elapsed()))
}

/// `redis-benchmark`'s GET against `url`'s server at `concurrency`: p50,
/// p95, p99 and requests per second.
pub(crate) fn redis_get(url: &str, concurrency: u32, requests: u32) -> anyhow::Result<Stats> {
    let rest = url
        .strip_prefix("redis://")
        .with_context(|| format!("{url}: not a redis:// URL"))?;
    let host_port = rest.split('/').next().unwrap_or("127.0.0.1:6379");
    let host_port = host_port.rsplit('@').next().unwrap_or(host_port);
    let (host, port) = host_port.rsplit_once(':').unwrap_or((host_port, "6379"));
    let out = Command::new("redis-benchmark")
        .args(["-h", host, "-p", port, "-t", "get", "--csv", "-q"])
        .args(["-c", &concurrency.to_string(), "-n", &requests.to_string()])
        .output()
        .context("running redis-benchmark (Debian's redis-tools)")?;
    if !out.status.success() {
        bail!("redis-benchmark: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    parse_redis_csv(&String::from_utf8_lossy(&out.stdout))
}

/// redis-benchmark's CSV: a header line, then
/// `"GET","rps","avg","min","p50","p95","p99","max"` (milliseconds).
fn parse_redis_csv(csv: &str) -> anyhow::Result<Stats> {
    let row = csv
        .lines()
        .find(|l| l.starts_with("\"GET\""))
        .with_context(|| format!("no GET row in redis-benchmark's output: {csv}"))?;
    let cells: Vec<f64> = row
        .split(',')
        .skip(1)
        .map(|c| c.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    if cells.len() < 6 {
        bail!("unexpected redis-benchmark row: {row}");
    }
    Ok(Stats {
        rps: cells[0],
        p50_us: cells[3] * 1000.0,
        p95_us: cells[4] * 1000.0,
        p99_us: cells[5] * 1000.0,
        requests: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_benchmark_csv_rows_are_read_in_milliseconds() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"GET\",\"25000.00\",\"0.035\",\"0.016\",\"0.031\",\"0.055\",\"0.087\",\"0.455\"\n";
        let s = parse_redis_csv(csv).unwrap();
        assert_eq!(s.rps, 25000.0);
        assert_eq!(
            (s.p50_us.round(), s.p95_us.round(), s.p99_us.round()),
            (31.0, 55.0, 87.0)
        );
    }

    #[test]
    fn the_wasm_floor_runs_the_module_and_counts() {
        let wat = r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 16) "{}")
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 2))
            (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;
        let s = wasm_rate(wat, &json!({}), 1, Duration::from_millis(200)).unwrap();
        assert!(s.requests > 0 && s.rps > 0.0, "{s:?}");
    }
}
