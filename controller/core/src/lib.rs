//! The invocation core of the function runtime: one call runs one function
//! version, whoever asks (a session, later an asynchronous execution or a
//! pipeline step). It has no HTTP server, no status codes and no scopes in
//! it; the controller's HTTP layer maps its errors to the contract.
//!
//! # Layout
//!
//! - [`invoke`]: [`invoke::Invoker`], the one path of an execution: params
//!   schema -> result cache -> instance (retained, idle, warm or cold) ->
//!   `/run` within the deadline (enforced there and nowhere else) -> cache the
//!   success -> execution record and metrics; [`invoke::CoreError`].
//! - [`runtime`]: the [`runtime::RuntimeBackend`] and [`runtime::Instance`]
//!   traits, the instance pool ([`runtime::pool`]), the runtime protocol's
//!   client ([`runtime::protocol`]) and the one instance that speaks it for
//!   every backend of runtime servers ([`runtime::remote`]).
//! - [`function`]: [`function::FunctionVersion`] and the manifest format;
//!   the [`function::CodeCheck`] a backend makes at registration.
//! - [`cache`]: the [`cache::ResultCache`] trait, the key, the in-process L1
//!   and [`cache::Layers`], which chains layers.
//! - [`logs`]: function logs: one execution's captured stdout/stderr
//!   ([`logs::RunLogs`]) and an instance's output split per run ([`logs::OutputTap`]).
//! - [`records`]: the execution record and the [`records::RecordSink`] it goes to.
//! - [`artifact`]: build targets, states and failures of Rust functions.
//! - [`metrics`]: the Prometheus metrics (`lambda_*`).
//! - [`language`], [`timefmt`]: Language-Titles; contract timestamps.
//! - [`wakes`]: [`wakes::without_self_wakes`], which polls a future that
//!   woke its own task again at once (hyper's connections do, on both sides).
//!
//! Backends (processes, wasmtime) live in `fnrt-backends`; the HTTP API,
//! sessions, auth and stores in `controller`.

pub mod artifact;
pub mod cache;
pub mod function;
pub mod invoke;
pub mod language;
pub mod logs;
pub mod metrics;
pub mod records;
pub mod runtime;
pub mod timefmt;
pub mod wakes;
