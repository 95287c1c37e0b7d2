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
    stderr: Arc<Mutex<String>>,
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
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stderr.take().unwrap());
        let server = Server {
            child,
            socket,
            stderr: Arc::clone(&stderr),
        };
        let mut first = String::new();
        lines.read_line(&mut first).unwrap();
        assert_eq!(first, "ready\n");
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                let mut all = stderr.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        server
    }

    fn connect(&self) -> Client {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client(BufReader::new(stream))
    }

    fn stderr_contains(&self, text: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.stderr.lock().unwrap().contains(text) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
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
