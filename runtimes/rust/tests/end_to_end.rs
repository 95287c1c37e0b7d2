//! End to end: build a real function library with fnrt-sdk, start the real `fnrt-runtime-rust`
//! binary on a socket in a temp instance directory, and drive it over HTTP.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

const FUNCTION_CARGO_TOML: &str = r#"[package]
name = "fnrt-e2e-function"
version = "0.1.0"
edition = "2024"

[dependencies]
fnrt-sdk = { path = "SDK_PATH" }
serde = { version = "1", features = ["derive"] }
serde_json = "1"

# Not part of any enclosing workspace.
[workspace]
"#;

// Line 13, column 20 is the `panic!`, checked below.
const FUNCTION_LIB_RS: &str = r#"use fnrt_sdk::{Context, Error, export};
use serde_json::{Value, json};

#[derive(serde::Deserialize)]
struct Params {
    op: String,
    #[serde(default)]
    values: Vec<i64>,
}

fn handler(params: Params, context: Context) -> Result<Value, Error> {
    match params.op.as_str() {
        "panic" => panic!("boom"),
        "add" => Ok(json!({
            "sum": params.values.iter().sum::<i64>(),
            "user": context.get("user_id"),
            "greeting": std::env::var("GREETING").ok(),
            "leaked": std::env::var("LEAKED").ok(),
            "home": std::env::var("HOME").ok(),
        })),
        "log" => {
            println!("a");
            print!("partial");
            eprintln!("b");
            Ok(Value::Null)
        }
        other => Err(Error::invalid_params(format!("unknown op {other}"))),
    }
}

export!(handler);
"#;

/// Builds the function above as a cdylib; returns the library's path.
fn build_function(dir: &Path) -> PathBuf {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk");
    let workspace_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let manifest = FUNCTION_CARGO_TOML.replace("SDK_PATH", sdk.to_str().unwrap());
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    std::fs::write(dir.join("src/lib.rs"), FUNCTION_LIB_RS).unwrap();
    // The workspace's lock pins versions already downloaded: no index update, works offline.
    std::fs::copy(workspace_root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();

    let target_dir = PathBuf::from("/var/tmp/fnrt-target/test-functions");
    let status = Command::new(env!("CARGO"))
        .args([
            "rustc",
            "--lib",
            "--release",
            "--crate-type",
            "cdylib",
            "--quiet",
            "--target-dir",
        ])
        .arg(&target_dir)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(status.success(), "building the test function failed");
    target_dir.join("release/libfnrt_e2e_function.so")
}

/// The runtime process; killed when dropped, so a failing test leaves nothing behind.
struct Server {
    child: Child,
    socket: PathBuf,
    /// All the process wrote on each stream so far (stderr after its `ready` line).
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

/// All that `from` yields, gathered as it comes by a thread of its own. Not by lines: a run's last
/// line may be unterminated.
fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let into = Arc::new(Mutex::new(Vec::new()));
    let all = Arc::clone(&into);
    std::thread::spawn(move || {
        let mut buffer = [0; 8192];
        while let Ok(n @ 1..) = from.read(&mut buffer) {
            all.lock().unwrap().extend_from_slice(&buffer[..n]);
        }
    });
    into
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts the runtime in `instance` with a scrubbed environment (plus LEAKED, which the
    /// function must not see) and waits for its `ready`.
    fn start(instance: &Path) -> Server {
        let socket = instance.join("runtime.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fnrt-runtime-rust"))
            .arg("--socket")
            .arg(&socket)
            .current_dir(instance)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", instance)
            .env("LANG", "C.UTF-8")
            .env("LEAKED", "secret")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        let ready = stderr.read_line(&mut first);
        // Before asserting: the child is killed (on drop) if it was not ready.
        let server = Server {
            child,
            socket,
            stdout,
            stderr: collect(stderr),
        };
        ready.unwrap();
        assert_eq!(first, "ready\n");
        server
    }

    fn connect(&self) -> Client {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client(BufReader::new(stream))
    }

    fn stderr_contains(&self, text: &str) -> bool {
        wait_for(&self.stderr, |all| all.contains(text)).is_some()
    }

    /// All of stdout once it ends with `line` and a newline (or fails after 5 s).
    fn stdout_ending_with(&self, line: &str) -> String {
        let end = format!("{line}\n");
        wait_for(&self.stdout, |all| all.ends_with(&end)).unwrap_or_else(|| panic!("stdout does not end with {end:?}"))
    }

    /// All of stderr once it ends with `line` and a newline (or fails after 5 s).
    fn stderr_ending_with(&self, line: &str) -> String {
        let end = format!("{line}\n");
        wait_for(&self.stderr, |all| all.ends_with(&end)).unwrap_or_else(|| panic!("stderr does not end with {end:?}"))
    }
}

/// The text of `output` once `done` holds for it, for up to 5 s.
fn wait_for(output: &Mutex<Vec<u8>>, done: impl Fn(&str) -> bool) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let text = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
        if done(&text) {
            return Some(text);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// A minimal HTTP/1.1 client on one kept-alive connection.
struct Client(BufReader<UnixStream>);

impl Client {
    fn request(&mut self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: runtime\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.0.get_mut().write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.0.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.0.read_exact(&mut body).unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    fn get(&mut self, path: &str) -> (u16, Value) {
        self.request("GET", path, "")
    }

    fn post(&mut self, path: &str, body: &Value) -> (u16, Value) {
        self.request("POST", path, &body.to_string())
    }
}

fn init_body(library: &[u8]) -> Value {
    json!({
        "language_title": "rust-e2e",
        "version": 1,
        "entrypoint": "function.so",
        "handler": "handler",
        "code": base64::engine::general_purpose::STANDARD.encode(library),
        // HOME is the runtime's (the instance directory): the inherited four win over `env`.
        "env": {"GREETING": "hello", "HOME": "/elsewhere"},
    })
}

#[test]
fn a_real_function_end_to_end() {
    let work = tempfile::tempdir().unwrap();
    let library = std::fs::read(build_function(&work.path().join("function"))).unwrap();
    let instance = work.path().join("instance");
    std::fs::create_dir(&instance).unwrap();
    let server = Server::start(&instance);
    let mut client = server.connect();

    let (status, health) = client.get("/health");
    assert_eq!(status, 200);
    assert_eq!(
        (health["language"].clone(), health["initialized"].clone()),
        (json!("rust"), json!(false))
    );

    // A malformed /init does not use up the instance.
    let (status, answer) = client.request("POST", "/init", "{\"entrypoint\": 7}");
    assert_eq!((status, answer["error"]["code"].clone()), (400, json!("BAD_REQUEST")));

    let (status, answer) = client.post("/init", &init_body(&library));
    assert_eq!((status, answer.clone()), (200, json!({"status": "initialized"})));
    assert_eq!(std::fs::read(instance.join("function/function.so")).unwrap(), library);
    assert_eq!(client.get("/health").1["initialized"], true);

    let run = json!({"params": {"op": "add", "values": [1, 2, 3]}, "context": {"user_id": "u-1"}, "deadline_ms": 5000});
    let (status, answer) = client.post("/run", &run);
    assert_eq!(status, 200);
    let home = instance.to_str().unwrap();
    assert_eq!(
        answer,
        json!({"result": {"sum": 6, "user": "u-1", "greeting": "hello", "leaked": null, "home": home}})
    );

    let (status, answer) = client.post("/run", &json!({"params": {"op": "divide"}}));
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        json!({"error": {"code": "INVALID_PARAMS", "message": "unknown op divide", "details": {"type": "InvalidParams"}}})
    );
    let (_, answer) = client.post("/run", &json!({"params": {}}));
    assert_eq!(
        answer,
        json!({"error": {"code": "INVALID_PARAMS", "message": "missing field `op`", "details": {"type": "serde"}}})
    );

    let (status, answer) = client.post("/run", &json!({"params": {"op": "panic"}}));
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        json!({"error": {"code": "RUNTIME_ERROR", "message": "panicked at src/lib.rs:13:20: boom",
                         "details": {"type": "panic", "file": "src/lib.rs", "line": 13, "column": 20}}})
    );
    assert!(server.stderr_contains("panicked at src/lib.rs:13:20: boom\n"));

    // The instance keeps serving after a panic.
    assert_eq!(client.post("/run", &run).1["result"]["sum"], 6);

    // A run with a log_marker ends with it on stdout and stderr, after all the function wrote: its
    // unterminated last line too, which the SDK flushes from the library's own stdout.
    let marker = "fnrt-log-end-0123456789abcdef";
    let (status, answer) = client.post("/run", &json!({"params": {"op": "log"}, "log_marker": marker}));
    assert_eq!((status, answer), (200, json!({"result": null})));
    assert_eq!(server.stdout_ending_with(marker), format!("a\npartial{marker}\n"));
    assert!(server.stderr_ending_with(marker).ends_with(&format!("\nb\n{marker}\n")));
    // Whatever the outcome.
    let panicked = "fnrt-log-end-panicked-0000";
    let (_, answer) = client.post("/run", &json!({"params": {"op": "panic"}, "log_marker": panicked}));
    assert_eq!(answer["error"]["details"]["type"], "panic");
    let stderr = server.stderr_ending_with(panicked);
    assert!(
        stderr.ends_with(&format!("panicked at src/lib.rs:13:20: boom\n{panicked}\n")),
        "{stderr}"
    );
    // Without one nothing is added: the unterminated "partial" runs into the next run's marker.
    assert_eq!(client.post("/run", &json!({"params": {"op": "log"}})).0, 200);
    let last = "fnrt-log-end-after-a-plain-run";
    let (status, _) = client.post("/run", &json!({"params": {"op": "add"}, "log_marker": last}));
    assert_eq!(status, 200);
    assert_eq!(
        server.stdout_ending_with(last),
        format!("a\npartial{marker}\n{panicked}\na\npartial{last}\n")
    );
    let (status, answer) = client.post("/run", &json!({"params": {"op": "log"}, "log_marker": "short"}));
    assert_eq!(
        (status, answer["error"]["message"].clone()),
        (
            400,
            json!("'log_marker' must be a string of 16 to 64 characters from [A-Za-z0-9_-]")
        )
    );

    let (status, answer) = client.post("/init", &init_body(&library));
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (409, json!("ALREADY_INITIALIZED"))
    );
    let (status, answer) = client.post("/run", &json!({"params": []}));
    assert_eq!((status, answer["error"]["code"].clone()), (400, json!("BAD_REQUEST")));
}

#[test]
fn a_library_that_does_not_load_spends_the_instance() {
    let instance = tempfile::tempdir().unwrap();
    let server = Server::start(instance.path());
    let mut client = server.connect();

    let (status, answer) = client.post("/init", &init_body(b"not a shared object"));
    assert_eq!(status, 422);
    assert_eq!(answer["error"]["code"], "INIT_ERROR");
    assert_eq!(answer["error"]["details"], json!({"type": "LoadError"}));
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("cannot load the function's library: ./function/function.so: "),
        "{message}"
    );

    let (status, answer) = client.post("/init", &init_body(b"again"));
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (409, json!("ALREADY_INITIALIZED"))
    );
    let (status, answer) = client.post("/run", &json!({}));
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (409, json!("NOT_INITIALIZED"))
    );
}
