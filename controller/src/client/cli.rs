//! The `fnrt` commands, their output and their exit codes.
//!
//! Output is for people by default (a table, a result printed as indented
//! JSON, bold and red only on a terminal) and the API's JSON with `--json`,
//! for scripts. Errors go to stderr as `error: CODE: message`. The exit code
//! says what failed:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | the function failed (`RUNTIME_ERROR`, `TIMEOUT`, `INVALID_PARAMS`, ...), or an asynchronous execution ended `failed` |
//! | 2 | the command line or a local file is wrong |
//! | 3 | the controller cannot be reached, or there is no login |
//! | 4 | not found (function, session, execution) |
//! | 5 | the token was refused or lacks a scope |
//! | 6 | any other refusal (a conflict, a failed build, a limit, 5xx), or an execution `cancelled` |

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::api::{Api, Failure};
use super::{folder, login};

#[derive(Debug, Parser)]
#[command(
    name = "fnrt",
    version,
    about = "Deploy, invoke and inspect functions on a function-runtime controller"
)]
pub struct Cli {
    /// Print the API's JSON instead of human output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Keep the controller's URL and a token for the other commands (in a 0600 file).
    Login {
        /// The controller, e.g. http://127.0.0.1:8080.
        url: String,
        /// The token (`controller token` issues local ones); else $FNRT_TOKEN, else one line of stdin.
        #[arg(long)]
        token: Option<String>,
    },
    /// Register a function folder (function.json and its code), or update it.
    Deploy {
        /// The folder; its name is the Language-Title unless --name says otherwise.
        dir: PathBuf,
        /// The Language-Title, e.g. nodejs-hello.
        #[arg(long)]
        name: Option<String>,
    },
    /// Run a function once and print its result.
    Invoke {
        language_title: String,
        /// The params, as a JSON object.
        #[arg(short = 'd', long = "data", conflicts_with = "param")]
        data: Option<String>,
        /// One param, KEY=VALUE (VALUE is read as JSON when it parses, else as a string); repeat.
        #[arg(short = 'p', long = "param")]
        param: Vec<String>,
        /// Run it even if a cached result exists.
        #[arg(long)]
        no_cache: bool,
        /// The execution's deadline, in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Queue it as an asynchronous execution and print its id.
        #[arg(long = "async")]
        run_async: bool,
        /// With --async: follow its progress until it ends, then print its result.
        #[arg(long, requires = "run_async")]
        watch: bool,
        /// With --async: low, normal or high.
        #[arg(long, requires = "run_async")]
        priority: Option<String>,
    },
    /// List your asynchronous executions, or show one.
    Executions {
        /// One execution's id: show it (with --watch, follow it).
        id: Option<String>,
        /// Only this status (pending, running, completed, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// Only this function.
        #[arg(long)]
        function: Option<String>,
        /// Follow the execution until it ends.
        #[arg(long, requires = "id")]
        watch: bool,
    },
    /// Cancel an asynchronous execution.
    Cancel { id: String },
    /// What functions wrote to stdout and stderr: one execution's (its id,
    /// an asynchronous execution's, or a session's request_id), or a
    /// function's last lines; -f follows a function as it runs.
    Logs {
        /// An execution id, a session's request_id, or a Language-Title.
        target: String,
        /// Follow the function's lines as executions write them (until interrupted).
        #[arg(short = 'f', long)]
        follow: bool,
        /// Of a function: its last N lines (default 200).
        #[arg(long)]
        lines: Option<usize>,
    },
    /// List your sessions, or show one.
    Sessions {
        /// One session's request_id: show it.
        request_id: Option<String>,
        /// Only active or completed sessions.
        #[arg(long)]
        status: Option<String>,
        /// Only this function's.
        #[arg(long)]
        function: Option<String>,
    },
    /// List the functions.
    List {
        /// Only this language (nodejs, python, rust, wasm).
        #[arg(long)]
        language: Option<String>,
    },
    /// Show one function: its version, schemas, limits, cache policy, build.
    Describe { language_title: String },
    /// List a function's versions, newest first, with what each takes of your quota.
    Versions { language_title: String },
    /// Remove a function (every version), or with --version one older version.
    Rm {
        language_title: String,
        /// Only this version (not the current one): frees what it takes of your quota.
        #[arg(long)]
        version: Option<u64>,
    },
}

/// `println!`, but a closed stdout (`fnrt list | head`) ends the program
/// quietly, as it does other Unix tools, instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        emit(format_args!($($arg)*))
    };
}

fn emit(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{text}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing the output: {e}");
        std::process::exit(exit::USAGE.into());
    }
}

/// Exit codes (see the module's table).
mod exit {
    pub(super) const FUNCTION_FAILED: u8 = 1;
    pub(super) const USAGE: u8 = 2;
    pub(super) const UNREACHABLE: u8 = 3;
    pub(super) const NOT_FOUND: u8 = 4;
    pub(super) const DENIED: u8 = 5;
    pub(super) const REFUSED: u8 = 6;
}

/// Why a command stopped, and its exit code.
struct Stop(u8, String);

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        let code = match &f {
            Failure::Unreachable(_) => exit::UNREACHABLE,
            Failure::Api { status, .. } if *status == StatusCode::NOT_FOUND => exit::NOT_FOUND,
            Failure::Api { status, .. } if matches!(status.as_u16(), 401 | 403) => exit::DENIED,
            Failure::Api { code, .. }
                if ["RUNTIME_ERROR", "TIMEOUT", "INVALID_PARAMS", "SCHEMA_MISMATCH"].contains(&code.as_str()) =>
            {
                exit::FUNCTION_FAILED
            }
            Failure::Api { .. } => exit::REFUSED,
        };
        // A run that failed: where to read what it wrote.
        let hint = match &f {
            Failure::Api { body, .. } => body["execution_id"]
                .as_str()
                .map(|id| format!(" (its output: fnrt logs {id})"))
                .unwrap_or_default(),
            Failure::Unreachable(_) => String::new(),
        };
        Stop(code, format!("{f}{hint}"))
    }
}

fn usage(message: impl std::fmt::Display) -> Stop {
    Stop(exit::USAGE, message.to_string())
}

/// Runs the command line; what `fnrt`'s `main` returns.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stop(code, message)) => {
            let stderr = std::io::stderr().is_terminal();
            eprintln!("{}error:{} {message}", red(stderr), reset(stderr));
            ExitCode::from(code)
        }
    }
}

async fn run(cli: &Cli) -> Result<(), Stop> {
    if let Command::Login { url, token } = &cli.command {
        return login_to(url, token.clone(), cli.json).await;
    }
    let saved = login::load().map_err(usage)?.ok_or_else(|| {
        Stop(
            exit::UNREACHABLE,
            "not logged in: run `fnrt login URL --token TOKEN` first".into(),
        )
    })?;
    let api = Api::new(&saved.url, &saved.token);
    match &cli.command {
        Command::Login { .. } => unreachable!("handled above"),
        Command::Deploy { dir, name } => deploy(&api, dir, name.as_deref(), cli.json).await,
        Command::Invoke {
            language_title,
            data,
            param,
            no_cache,
            timeout_ms,
            run_async,
            watch,
            priority,
        } => {
            let params = params(data.as_deref(), param)?;
            if *run_async {
                let id = submit(
                    &api,
                    language_title,
                    params,
                    *timeout_ms,
                    priority.as_deref(),
                    cli.json && !watch,
                )
                .await?;
                return match watch {
                    true => follow(&api, &id, cli.json).await,
                    false => Ok(()),
                };
            }
            invoke(&api, language_title, params, *no_cache, *timeout_ms, cli.json).await
        }
        Command::Executions {
            id: Some(id),
            watch: true,
            ..
        } => follow(&api, id, cli.json).await,
        Command::Executions { id: Some(id), .. } => {
            let e = api.get(&format!("/api/v1/executions/{id}")).await?;
            match cli.json {
                true => print_json(&e),
                false => show_execution(&e),
            }
            finished_ok(&e)
        }
        Command::Executions {
            id: None,
            status,
            function,
            ..
        } => executions(&api, status.as_deref(), function.as_deref(), cli.json).await,
        Command::Cancel { id } => {
            let (e, _) = api
                .call(Method::POST, &format!("/api/v1/executions/{id}/cancel"), &[], None)
                .await?;
            match cli.json {
                true => print_json(&e),
                false => out!("{id} {}", e["status"].as_str().unwrap_or_default()),
            }
            Ok(())
        }
        Command::Logs { target, follow, lines } => logs(&api, target, *follow, *lines, cli.json).await,
        Command::Sessions {
            request_id: Some(id), ..
        } => {
            let s = api.get(&format!("/api/v1/sessions/{id}")).await?;
            match cli.json {
                true => print_json(&s),
                false => show_session(&s),
            }
            Ok(())
        }
        Command::Sessions {
            request_id: None,
            status,
            function,
        } => sessions(&api, status.as_deref(), function.as_deref(), cli.json).await,
        Command::List { language } => list(&api, language.as_deref(), cli.json).await,
        Command::Describe { language_title } => {
            let detail = api.get(&format!("/api/v1/functions/{language_title}")).await?;
            match cli.json {
                true => print_json(&detail),
                false => describe(&detail),
            }
            Ok(())
        }
        Command::Versions { language_title } => versions(&api, language_title, cli.json).await,
        Command::Rm {
            language_title,
            version: None,
        } => {
            api.call(
                Method::DELETE,
                &format!("/api/v1/functions/{language_title}"),
                &[],
                None,
            )
            .await?;
            match cli.json {
                true => print_json(&json!({"removed": language_title})),
                false => out!("Removed {language_title}"),
            }
            Ok(())
        }
        Command::Rm {
            language_title,
            version: Some(version),
        } => {
            api.call(
                Method::DELETE,
                &format!("/api/v1/functions/{language_title}/versions/{version}"),
                &[],
                None,
            )
            .await?;
            match cli.json {
                true => print_json(&json!({"removed": language_title, "version": version})),
                false => out!("Removed version {version} of {language_title}"),
            }
            Ok(())
        }
    }
}

async fn login_to(url: &str, token: Option<String>, as_json: bool) -> Result<(), Stop> {
    let token = match token.or_else(|| std::env::var("FNRT_TOKEN").ok()) {
        Some(t) => t,
        None => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map_err(usage)?;
            line
        }
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(usage("no token: pass --token, set FNRT_TOKEN, or pipe one in"));
    }
    let api = Api::new(url, &token);
    // A token this controller refuses is not saved; one without
    // read:functions is (it may only execute).
    match api.get("/api/v1/functions?per_page=1").await {
        Ok(_) => {}
        Err(Failure::Api { status, .. }) if status == StatusCode::FORBIDDEN => {}
        Err(e) => return Err(e.into()),
    }
    let path = login::save(&login::Login {
        url: url.trim_end_matches('/').to_owned(),
        token,
    })
    .map_err(usage)?;
    match as_json {
        true => print_json(&json!({"url": url, "config": path})),
        false => out!("Logged in to {url} (saved in {})", path.display()),
    }
    Ok(())
}

async fn deploy(api: &Api, dir: &std::path::Path, name: Option<&str>, as_json: bool) -> Result<(), Stop> {
    let (lt, body) = folder::registration(dir, name).map_err(|e| usage(format!("{e:#}")))?;
    // Registration answers when the function is stored, after a crate's
    // build: a spinner meanwhile, on a terminal.
    let spinner = (!as_json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        // The registration answers once a crate is built or a package's
        // dependencies installed: the time so far is the progress there is.
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
            bar.set_style(style);
        }
        bar.set_message(format!(
            "deploying {lt} (a Rust crate builds, a package's dependencies install first)"
        ));
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let created = api.call(Method::POST, "/api/v1/functions", &[], Some(&body)).await;
    let stored = match created {
        Err(Failure::Api { status, .. }) if status == StatusCode::CONFLICT => {
            api.call(Method::PUT, &format!("/api/v1/functions/{lt}"), &[], Some(&body))
                .await
        }
        other => other,
    };
    if let Some(bar) = spinner {
        bar.finish_and_clear();
    }
    let (detail, _) = stored?;
    match as_json {
        true => print_json(&detail),
        false => {
            let build = detail["build"]["state"]
                .as_str()
                .map(|s| format!(", build {s}"))
                .unwrap_or_default();
            out!("Deployed {lt} version {}{build}", detail["version"]);
        }
    }
    Ok(())
}

/// The params from `-d` or the `-p`s.
fn params(data: Option<&str>, pairs: &[String]) -> Result<Value, Stop> {
    if let Some(data) = data {
        let value: Value = serde_json::from_str(data).map_err(|e| usage(format!("-d is not JSON: {e}")))?;
        if !value.is_object() {
            return Err(usage("-d must be a JSON object"));
        }
        return Ok(value);
    }
    let mut params = serde_json::Map::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| usage(format!("-p {pair}: expected KEY=VALUE")))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        params.insert(key.to_owned(), value);
    }
    Ok(Value::Object(params))
}

async fn invoke(
    api: &Api,
    language_title: &str,
    params: Value,
    no_cache: bool,
    timeout_ms: Option<u64>,
    as_json: bool,
) -> Result<(), Stop> {
    let context = match timeout_ms {
        Some(ms) => json!({ "timeout_ms": ms }),
        None => json!({}),
    };
    let (session, _) = api
        .call(
            Method::POST,
            "/api/v1/initialize",
            &[("Language-Title", language_title)],
            Some(&json!({ "context": context })),
        )
        .await?;
    let id = session["request_id"].as_str().unwrap_or_default();
    let cache: &[(&str, &str)] = if no_cache {
        &[("X-Cache-Control", "no-cache")]
    } else {
        &[]
    };
    let (answer, _) = api
        .call(
            Method::POST,
            &format!("/api/v1/execute/{id}"),
            cache,
            Some(&json!({ "params": params })),
        )
        .await?;
    match as_json {
        true => print_json(&answer),
        false => print_json(&answer["result"]),
    }
    Ok(())
}

/// Queues an asynchronous execution; its id.
async fn submit(
    api: &Api,
    language_title: &str,
    params: Value,
    timeout_ms: Option<u64>,
    priority: Option<&str>,
    as_json: bool,
) -> Result<String, Stop> {
    let mut body = json!({ "language_title": language_title, "params": params });
    if let Some(ms) = timeout_ms {
        body["context"] = json!({ "timeout_ms": ms });
    }
    if let Some(p) = priority {
        body["priority"] = json!(p);
    }
    let (answer, _) = api.call(Method::POST, "/api/v1/executions", &[], Some(&body)).await?;
    let id = answer["execution_id"].as_str().unwrap_or_default().to_owned();
    match as_json {
        true => print_json(&answer),
        false => out!("{id}"),
    }
    Ok(id)
}

/// Follows an execution's events (SSE) until it ends: a line per step
/// (`--json`: each event's data), then its result; the exit code says how
/// it ended.
async fn follow(api: &Api, id: &str, as_json: bool) -> Result<(), Stop> {
    let mut events = api.events(&format!("/api/v1/executions/{id}/events")).await?;
    let stderr = std::io::stderr().is_terminal();
    let mut last = None;
    while let Some((kind, data)) = events.next().await? {
        if as_json {
            out!("{}", json!({"event": kind, "data": data}));
        } else if kind == "step" {
            let error = data["error"]["message"]
                .as_str()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            eprintln!(
                "{}attempt {} {}{}{error}",
                bold(stderr),
                data["attempt"],
                data["status"].as_str().unwrap_or_default(),
                reset(stderr)
            );
        }
        if matches!(kind.as_str(), "completed" | "failed" | "cancelled") {
            last = Some(data);
            break;
        }
    }
    let Some(execution) = last else {
        return Err(Stop(
            exit::UNREACHABLE,
            "the event stream ended early; try again".into(),
        ));
    };
    if !as_json && execution["status"] == "completed" {
        print_json(&execution["result"]);
    }
    finished_ok(&execution)
}

/// Exit code of a finished execution: 0 completed, 1 failed, 6 cancelled.
fn finished_ok(execution: &Value) -> Result<(), Stop> {
    let error = |e: &Value| {
        format!(
            "{}: {}",
            e["code"].as_str().unwrap_or("ERROR"),
            e["message"].as_str().unwrap_or_default()
        )
    };
    match execution["status"].as_str() {
        Some("failed") => Err(Stop(exit::FUNCTION_FAILED, error(&execution["error"]))),
        Some("cancelled") => Err(Stop(exit::REFUSED, error(&execution["error"]))),
        _ => Ok(()),
    }
}

fn show_execution(e: &Value) {
    let field = |key: &str| match &e[key] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    out!("{}", field("execution_id"));
    out!(
        "  function     {} (version {})",
        field("language_title"),
        field("version")
    );
    out!("  status       {} ({} priority)", field("status"), field("priority"));
    out!("  created      {}", field("created_at"));
    for a in e["attempts"].as_array().into_iter().flatten() {
        let error = a["error"]["message"]
            .as_str()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        match a["number"].as_i64() {
            Some(n) => out!("  attempt {n}    {}{error}", a["outcome"].as_str().unwrap_or_default()),
            None => out!("  queued again {}", a["at"].as_str().unwrap_or_default()),
        }
    }
    if !e["result"].is_null() {
        out!("  result       {}", e["result"]);
    }
}

async fn executions(api: &Api, status: Option<&str>, function: Option<&str>, as_json: bool) -> Result<(), Stop> {
    let mut path = "/api/v1/executions?per_page=100".to_owned();
    if let Some(s) = status {
        path.push_str(&format!("&status={s}"));
    }
    if let Some(f) = function {
        path.push_str(&format!("&language_title={f}"));
    }
    let answer = api.get(&path).await?;
    let items = answer["executions"].as_array().cloned().unwrap_or_default();
    if as_json {
        print_json(&Value::Array(items));
        return Ok(());
    }
    let rows: Vec<[String; 5]> = items
        .iter()
        .map(|e| {
            [
                e["execution_id"].as_str().unwrap_or_default().to_owned(),
                e["language_title"].as_str().unwrap_or_default().to_owned(),
                e["status"].as_str().unwrap_or_default().to_owned(),
                e["attempts"].as_array().map_or(0, Vec::len).to_string(),
                e["created_at"].as_str().unwrap_or_default().to_owned(),
            ]
        })
        .collect();
    table(["EXECUTION", "FUNCTION", "STATUS", "ATTEMPTS", "CREATED"], &rows);
    Ok(())
}

/// Logs of an execution (or session), or of a function: a Language-Title
/// is a function, anything else an id.
async fn logs(api: &Api, target: &str, follow: bool, lines: Option<usize>, as_json: bool) -> Result<(), Stop> {
    let function = target.parse::<fnrt_core::language::LanguageTitle>().is_ok();
    if follow && !function {
        return Err(usage(
            "-f follows a function: fnrt logs -f LANGUAGE-TITLE (an execution's logs are complete once it ends)",
        ));
    }
    let tty = std::io::stdout().is_terminal();
    if follow {
        let mut events = api
            .events(&format!("/api/v1/functions/{target}/logs?follow=true"))
            .await?;
        while let Some((kind, data)) = events.next().await? {
            match (kind.as_str(), as_json) {
                ("log", true) => out!("{data}"),
                ("log", false) => print_line(&data, true, tty),
                ("lagged", _) => eprintln!(
                    "({} lines were missed: the output was faster than this terminal)",
                    data["missed"]
                ),
                _ => {}
            }
        }
        return Err(Stop(exit::UNREACHABLE, "the controller ended the stream".into()));
    }
    let path = match function {
        true => format!("/api/v1/functions/{target}/logs?lines={}", lines.unwrap_or(200)),
        false => format!("/api/v1/executions/{target}/logs"),
    };
    let answer = api.get(&path).await?;
    if as_json {
        print_json(&answer);
        return Ok(());
    }
    for line in answer["lines"].as_array().into_iter().flatten() {
        print_line(line, function, tty);
    }
    if answer["truncated"] == true {
        eprintln!(
            "(truncated: {} more bytes were written than the {} kept per execution)",
            answer["dropped_bytes"], answer["limit_bytes"]
        );
    }
    Ok(())
}

/// `TIME [EXECUTION] STREAM TEXT`, stderr in red on a terminal.
fn print_line(line: &Value, with_execution: bool, tty: bool) {
    let text = |key: &str| line[key].as_str().unwrap_or_default();
    let execution = match with_execution {
        true => format!("{} ", text("execution_id").get(..8).unwrap_or_default()),
        false => String::new(),
    };
    let stream = match text("stream") {
        "stderr" => format!("{}stderr{}", red(tty), reset(tty)),
        other => other.to_owned(),
    };
    out!("{} {execution}{stream} {}", text("ts"), text("text"));
}

async fn sessions(api: &Api, status: Option<&str>, function: Option<&str>, as_json: bool) -> Result<(), Stop> {
    let mut path = "/api/v1/sessions?per_page=100".to_owned();
    if let Some(s) = status {
        path.push_str(&format!("&status={s}"));
    }
    if let Some(f) = function {
        path.push_str(&format!("&language_title={f}"));
    }
    let all = every_page(api, &path, "sessions").await?;
    if as_json {
        print_json(&Value::Array(all));
        return Ok(());
    }
    let rows: Vec<[String; 5]> = all
        .iter()
        .map(|s| {
            [
                s["request_id"].as_str().unwrap_or_default().to_owned(),
                s["language_title"].as_str().unwrap_or_default().to_owned(),
                s["status"].as_str().unwrap_or_default().to_owned(),
                s["execution_count"].to_string(),
                s["expires_at"].as_str().unwrap_or_default().to_owned(),
            ]
        })
        .collect();
    table(["REQUEST_ID", "FUNCTION", "STATUS", "EXECUTIONS", "EXPIRES"], &rows);
    Ok(())
}

fn show_session(s: &Value) {
    let field = |key: &str| match &s[key] {
        Value::String(v) => v.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    out!("{}", field("request_id"));
    out!(
        "  function     {} (version {})",
        field("language_title"),
        field("version")
    );
    out!(
        "  status       {} ({} executions, last {})",
        field("status"),
        field("execution_count"),
        field("last_executed_at")
    );
    out!("  retained     {}", field("retain_session"));
    out!("  created      {}", field("created_at"));
    out!("  expires      {}", field("expires_at"));
}

/// Every item of a paged list (`path` asks 100 per page), `field` of each page.
async fn every_page(api: &Api, path: &str, field: &str) -> Result<Vec<Value>, Stop> {
    let mut all = Vec::new();
    for page in 1.. {
        let answer = api.get(&format!("{path}&page={page}")).await?;
        let items = answer[field].as_array().cloned().unwrap_or_default();
        let done = items.len() < 100;
        all.extend(items);
        if done {
            break;
        }
    }
    Ok(all)
}

async fn list(api: &Api, language: Option<&str>, as_json: bool) -> Result<(), Stop> {
    let mut path = "/api/v1/functions?per_page=100".to_owned();
    if let Some(l) = language {
        path.push_str(&format!("&language={l}"));
    }
    let all = every_page(api, &path, "functions").await?;
    if as_json {
        print_json(&Value::Array(all));
        return Ok(());
    }
    let rows: Vec<[String; 4]> = all
        .iter()
        .map(|f| {
            [
                f["language_title"].as_str().unwrap_or_default().to_owned(),
                f["version"].to_string(),
                f["updated_at"].as_str().unwrap_or_default().to_owned(),
                f["description"].as_str().unwrap_or_default().to_owned(),
            ]
        })
        .collect();
    table(["LANGUAGE-TITLE", "VERSION", "UPDATED", "DESCRIPTION"], &rows);
    Ok(())
}

async fn versions(api: &Api, language_title: &str, as_json: bool) -> Result<(), Stop> {
    let path = format!("/api/v1/functions/{language_title}/versions?per_page=100");
    let all = every_page(api, &path, "versions").await?;
    if as_json {
        print_json(&Value::Array(all));
        return Ok(());
    }
    let rows: Vec<[String; 4]> = all
        .iter()
        .map(|v| {
            let current = if v["current"] == true { " (current)" } else { "" };
            [
                format!("{}{current}", v["version"]),
                v["created_at"].as_str().unwrap_or_default().to_owned(),
                v["size_bytes"].to_string(),
                v["code_hash"].as_str().unwrap_or_default().chars().take(12).collect(),
            ]
        })
        .collect();
    table(["VERSION", "CREATED", "BYTES", "CODE-HASH"], &rows);
    Ok(())
}

fn describe(detail: &Value) {
    let field = |key: &str| match &detail[key] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    out!("{}", field("language_title"));
    out!("  description  {}", field("description"));
    out!("  version      {} (updated {})", field("version"), field("updated_at"));
    out!(
        "  limits       timeout {} ms, memory {} MiB",
        detail["limits"]["timeout_ms"],
        detail["limits"]["memory_mb"]
    );
    let cache = &detail["cache"];
    let seconds = |v: &Value, otherwise: &str| v.as_u64().map_or(otherwise.to_owned(), |s| format!("{s} s"));
    match cache["enabled"].as_bool() {
        Some(false) => out!("  cache        off"),
        _ => out!(
            "  cache        on, kept {} (in memory {})",
            seconds(&cache["ttl_secs"], "the controller's default time"),
            seconds(&cache["l1_ttl_secs"], "as long")
        ),
    }
    if let Some(state) = detail["build"]["state"].as_str() {
        out!("  build        {state}");
    }
    out!("  params       {}", detail["schema"]["params"]);
}

/// Columns padded to their widest cell; the header bold on a terminal.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    let tty = std::io::stdout().is_terminal();
    out!("{}{}{}", bold(tty), line(header.to_vec()), reset(tty));
    for row in rows {
        out!("{}", line(row.iter().map(String::as_str).collect()));
    }
}

fn print_json(value: &Value) {
    out!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

fn bold(on: bool) -> &'static str {
    if on { "\x1b[1m" } else { "" }
}

fn red(on: bool) -> &'static str {
    if on { "\x1b[31m" } else { "" }
}

fn reset(on: bool) -> &'static str {
    if on { "\x1b[0m" } else { "" }
}
