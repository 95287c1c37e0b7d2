//! The controller of a lambda-style function runtime.
//!
//! A client calls `POST /api/v1/initialize` with a `Language-Title`
//! (`nodejs-calculator`), gets a `request_id`, then calls
//! `POST /api/v1/execute/{request_id}` with `params`. The controller checks
//! the JWT's scopes, applies rate limits, serves cached results, and runs the
//! function in a runtime instance (docs/architecture.md).
//!
//! # Layout
//!
//! - [`cli`], [`config`]: the binary's command line and settings.
//! - [`logbuffer`]: the controller's own log lines, buffered on their way to stderr.
//! - [`client`]: `fnrt`, the client CLI (the package's second binary).
//! - [`startup`]: [`startup::Application`] builds everything and serves.
//! - [`http`]: one module per resource (`initialize`, `execute`, `sessions`, `executions`, `ws`,
//!   `functions`, `logs`, `files`, `health`), the guard (token, rate limit) and extractors.
//! - [`invoke`]: the invocation core: one call runs one function version
//!   (schema, cache, instance, the deadline, records, metrics); no HTTP in it.
//! - [`engine`]: the session layer over the core: initialize, execute, close;
//!   session records, retained instances, one execution per session at a time.
//! - [`executions`]: asynchronous executions over the core: the durable
//!   queue's workers (leases, retries, cancellation).
//! - [`pipelines`]: pipelines over the core: a `pipeline-*` function's
//!   steps run as executions of their own (mappings, DAG, retries,
//!   `on_error`, the pipeline's deadline, progress).
//! - [`registry`]: functions and versions, in memory over the [`store`];
//!   the manifest format.
//! - [`store`]: the `FunctionStore`, `ExecutionStore`, `ExecutionQueue`,
//!   `LogStore`, `FileRecords` and `StoreHealth` traits, their SQLite and
//!   PostgreSQL implementations.
//! - [`records`]: durable execution records, batched off the request path.
//! - [`files`]: uploaded files: the `FileStore` trait (the bytes, by sha256),
//!   its local-directory implementation, uploads, reads and the expiry sweep.
//! - [`logs`]: function logs as users read them (per execution, per
//!   function live), the recent ones and the retention sweep.
//! - [`sessions`]: the `SessionStore` trait and its in-memory implementation.
//! - [`cache`]: the `ResultCache` trait, the cache key, the moka L1, the
//!   Redis L2, and `Layers` that chains them.
//! - [`redis_client`]: the shared, reconnecting, time-bounded Redis connection.
//! - [`ratelimit`]: the `RateLimiter` trait and its governor implementation.
//! - [`admission`]: an execute's limit and its session's count decided in
//!   one step (one Redis script, sent beside the L2 lookup).
//! - [`runtime`]: the `RuntimeBackend` and `Instance` traits, the runtime
//!   protocol client, the process and wasm backends and the instance pool.
//! - [`build`]: builds Rust functions (native libraries, wasm modules) with cargo.
//! - [`auth`]: JWT verification and issuing, scopes.
//! - [`metrics`]: Prometheus metrics.
//! - [`error`]: the API's error type and body.
//! - [`language`], [`timefmt`]: Language-Titles; contract timestamps.
//!
//! A request flows: `http` (request ID, trace, CORS, body limit, metrics)
//! -> `http::guard` (token, rate limit; an execute's limit is left to its
//! handler, for [`admission`]) -> handler -> `engine` (session)
//! -> `invoke` (core) -> `cache` / `runtime::pool` -> `runtime::process`
//! instance over its Unix socket.

pub mod admission;
pub mod archive;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod error;
pub mod executions;
pub mod files;
pub mod http;
pub mod logbuffer;
pub mod logs;
pub mod pipelines;
pub mod ratelimit;
pub mod records;
pub mod redis_cache;
pub mod redis_client;
pub mod registry;
pub mod sessions;
pub mod startup;
pub mod store;

/// The controller binary's global allocator (`main.rs`; the tests build the
/// same `main.rs`): jemalloc. Under glibc's `malloc`, a block one tokio
/// worker allocated and the other freed waited on the first one's arena
/// lock: 8 % of the controller's samples in cached hits at c32, and a
/// quarter of its CPU in the allocator. jemalloc frees through a
/// per-thread cache and returns blocks to their arena in batches
/// (docs/benchmarks.md, nineteenth pass).
pub use tikv_jemallocator::Jemalloc as Allocator;
