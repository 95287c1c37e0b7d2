//! `fnrt-bench`: the benchmark. It builds the controller, starts it on its
//! embedded defaults (PostgreSQL when `DATABASE_URL` is set, an L2 Redis
//! controller when `REDIS_URL` is set), and measures every hot path beside
//! its floor in the same run, with a real load generator (`oha`), then
//! writes the results as JSON, a Markdown table and an SVG plot, and checks
//! them against the goals of docs/benchmarks.md. It asserts nothing about
//! speed: a missed goal is reported, not failed; a request that fails
//! during a measurement fails the run (a benchmark of errors measures
//! nothing), which is what the smoke mode in CI checks.
//!
//! ```text
//! cargo run --release -p bench                 # full run, results in target/bench/
//! cargo run --release -p bench -- --write-docs # and into docs/benchmarks.md
//! cargo run -p bench -- --smoke --debug        # 1 s per measurement; what CI runs
//! ```
//!
//! # Layout
//!
//! - `main.rs`: the command line; writes the report.
//! - [`scenarios`]: the measurements, interleaved with their floors, and
//!   the goals.
//! - [`floors`]: the axum echo server, a bare runtime on its socket, bare
//!   wasmtime, Redis GET.
//! - [`setup`]: building and starting the controller, its API, the peers
//!   (Google's functions-framework for Node and Python).
//! - [`load`]: the load generator `oha` (installed under the tools directory when missing)
//!   and the one-request-at-a-time loop.
//! - [`procs`]: child processes, RSS, descriptors, descendants.
//! - [`report`]: JSON, Markdown, SVG.

mod floors;
mod load;
mod procs;
mod report;
mod scenarios;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "fnrt-bench",
    about = "Measures every hot path beside its floor (docs/benchmarks.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// One round of 1 s per measurement and fewer samples: checks that
    /// every path works (setup, such as the Rust build, takes longer).
    #[arg(long)]
    smoke: bool,
    /// Measure the dev build of the controller (CI's smoke run reuses the
    /// test build); numbers from it mean nothing.
    #[arg(long)]
    debug: bool,
    /// Rounds per measurement (each path interleaved with its floor).
    #[arg(long)]
    rounds: Option<u32>,
    /// Seconds per load run.
    #[arg(long)]
    secs: Option<f64>,
    /// Where results.json, results.md and latency.svg go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Also write the results into docs/benchmarks.md (between its
    /// markers) and docs/benchmarks/.
    #[arg(long)]
    write_docs: bool,
    /// Where oha and the peers are installed (once).
    #[arg(long, env = "BENCH_TOOLS_DIR", default_value = "/var/tmp/fnrt-bench-tools")]
    tools: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The HTTP floor: a minimal axum JSON echo server (`POST /echo`).
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match cli.command {
        Some(Cmd::EchoServer { ref listen }) => runtime.block_on(floors::serve_echo(listen)),
        None => runtime.block_on(bench(&cli)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(cli: &Cli) -> anyhow::Result<()> {
    let plan = scenarios::Plan {
        smoke: cli.smoke,
        release: !cli.debug,
        rounds: cli.rounds.unwrap_or(if cli.smoke { 1 } else { 3 }),
        duration: Duration::from_secs_f64(cli.secs.unwrap_or(if cli.smoke { 1.0 } else { 5.0 })),
        high: 32,
        warm_high: 16,
        sessions: if cli.smoke { 2 } else { 8 },
        samples: if cli.smoke { 3 } else { 30 },
        tools: cli.tools.clone(),
        redis_url: std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()),
        database_url: std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()),
    };
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let commit = if dirty {
        format!("{commit} (with uncommitted changes)")
    } else {
        commit
    };
    let report = scenarios::run(plan, date, commit).await?;

    std::fs::create_dir_all(&cli.out)?;
    let markdown = report.markdown();
    std::fs::write(cli.out.join("results.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(cli.out.join("results.md"), &markdown)?;
    std::fs::write(cli.out.join("latency.svg"), report.svg())?;
    println!("\n{markdown}\nwritten to {}", cli.out.display());
    if cli.write_docs {
        let docs = setup::repo_dir().join("docs");
        let page = docs.join("benchmarks.md");
        let text = std::fs::read_to_string(&page)?;
        let spliced = report::splice(&text, &markdown)
            .ok_or_else(|| anyhow::anyhow!("{} has no results markers", page.display()))?;
        std::fs::write(&page, spliced)?;
        std::fs::create_dir_all(docs.join("benchmarks"))?;
        std::fs::write(
            docs.join("benchmarks/results.json"),
            serde_json::to_vec_pretty(&report)?,
        )?;
        std::fs::write(docs.join("benchmarks/latency.svg"), report.svg())?;
        println!("and into {}", page.display());
    }
    Ok(())
}

fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(setup::repo_dir())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
