#![allow(unreachable_pub, dead_code)]

//! End-to-end tests: each starts the real controller binary on port 0 with a
//! fresh data dir (`helpers::spawn_app`) and drives it over HTTP.

mod helpers;

mod auth;
mod build_sandbox;
mod cache;
mod contract;
mod execute;
mod faults;
mod first_run;
mod functions;
mod initialize;
mod limits;
mod operations;
mod replicas;
mod runtimes;
mod rust;
mod sandbox;
mod sessions;
mod wasm;
