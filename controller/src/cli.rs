//! The `controller` binary's entry point: parse the command line, set up
//! logging, then serve or print a token.

use std::borrow::Cow;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::auth::Authenticator;
use crate::config::{Cli, Command, LogFormat, ServeArgs, TokenArgs};
use crate::logbuffer;
use crate::startup::Application;

pub fn main() -> ExitCode {
    // The process backend starts Rust runtime instances as
    // `controller runtime-rust --socket PATH` (hidden: not for people).
    // The wasm backend compiles modules in `controller compile-wasm OUT`
    // (hidden too), so Cranelift runs in a process of its own.
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("runtime-rust") => return fnrt_runtime_rust::main_with_args(args),
        Some("compile-wasm") => return fnrt_backends::wasm::compile_main(args),
        _ => {}
    }
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token(args)) => token(args),
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

fn token(args: TokenArgs) -> ExitCode {
    match Authenticator::from_args(&args.auth).and_then(|a| a.issue(&args.sub, &args.scopes, args.ttl)) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr through [`logbuffer`]; what is buffered is written when
/// the guard drops. JSON lines come from json-subscriber: tracing-subscriber's
/// own JSON format parses a span's fields again for every line written in
/// it (the access log's line, once per request: a cached hit at c32 took
/// about a fifth more CPU with it, docs/benchmarks.md); the output has the
/// same fields.
fn init_logging(format: LogFormat) -> std::io::Result<logbuffer::FlushGuard<std::io::Stderr>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let (writer, guard) = logbuffer::install(std::io::stderr())?;
    match format {
        LogFormat::Json => {
            crate::http::access::install_json(writer.clone());
            let mut layer = json_subscriber::JsonLayer::new(writer);
            layer
                .with_timer("timestamp", tracing_subscriber::fmt::time::SystemTime)
                .with_level("level")
                .with_flattened_event()
                .with_current_span("span");
            layer.add_dynamic_field("target", |event, _| Some(line_target(event)));
            tracing_subscriber::registry().with(layer).with(filter).init();
        }
        // Colours only for a terminal: a file or a journal would keep the escapes.
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(writer)
            .init(),
    }
    Ok(guard)
}

/// The target a JSON line is filed under. A line of the `log` crate
/// (wasmtime's, rustls') comes through tracing-log's bridge with the target
/// `log` and its own in a `log.target` field; tracing-subscriber's formats
/// show the latter, and so does this.
fn line_target(event: &tracing::Event<'_>) -> Cow<'static, str> {
    struct LogTarget(Option<String>);
    impl tracing::field::Visit for LogTarget {
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            if field.name() == "log.target" {
                self.0 = Some(value.to_owned());
            }
        }
        fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
    }
    let target = event.metadata().target();
    if target != "log" {
        return Cow::Borrowed(target);
    }
    let mut visitor = LogTarget(None);
    event.record(&mut visitor);
    visitor.0.map_or(Cow::Borrowed(target), Cow::Owned)
}

fn serve(args: ServeArgs) -> ExitCode {
    // Declared first, dropped last: the final lines are written.
    let _log_guard = match init_logging(args.log_format) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: starting the log writer: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let app = Application::build(args).await?;
        tracing::info!(addr = %app.local_addr(), "listening on http://{}", app.local_addr());
        app.run_until_stopped(shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "controller failed");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::{Context, SubscriberExt as _};

    /// Collects what [`super::line_target`] makes of each event.
    struct Targets(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Targets {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            self.0.lock().unwrap().push(super::line_target(event).into_owned());
        }
    }

    #[test]
    fn a_line_of_the_log_crate_is_filed_under_its_own_target() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Targets(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            // What tracing-log's bridge makes of `log::debug!` in wasmtime.
            tracing::info!(target: "log", { log.target = "wasmtime::pool" }, "bridged");
            tracing::info!(target: "log", "no target field");
            tracing::info!(target: "controller::startup", "native");
        });
        assert_eq!(*seen.lock().unwrap(), ["wasmtime::pool", "log", "controller::startup"]);
    }
}
