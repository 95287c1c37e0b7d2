#![allow(unreachable_pub, dead_code)]

//! End-to-end tests: each starts a controller on port 0 with a fresh data
//! dir and drives it over HTTP. Most run the application in process
//! (`helpers::spawn_app`: `Application::build` on the test's runtime, so a
//! test can reach the core); the tests of what only the real binary shows
//! start it as a child process (`helpers::spawn_binary`): its log lines
//! (contract, operations, initialize), its exit on SIGTERM and the children
//! it leaves (contract, operations), its own memory (sandbox), the command
//! line and a newcomer's first run (auth, first_run).
//!
//! Tests run on a multi-threaded runtime
//! (`#[tokio::test(flavor = "multi_thread")]`): dropping an in-process app
//! waits until it has stopped, as SIGTERM stops the binary.

mod helpers;

mod auth;
mod build_sandbox;
mod cache;
mod cli;
mod containers;
mod contract;
mod dependencies;
mod egress;
mod execute;
mod executions;
mod faults;
mod files;
mod first_run;
mod function_files;
mod functions;
mod images;
mod initialize;
mod limits;
mod logs;
mod newcomer;
mod operations;
mod packages;
mod pipelines;
mod placement;
mod replicas;
mod runtimes;
mod rust;
mod s3_files;
mod sandbox;
mod sessions;
mod versions;
mod walls;
mod wasm;
