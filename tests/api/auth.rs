//! Authentication and authorization beyond contract.rs: malformed
//! `Authorization` headers, claims of the wrong type, pinned algorithm,
//! scopes as a string or an array, and the `controller token` subcommand.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::helpers::{Reply, SECRET, TestApp, read, repo_dir, spawn_app, spawn_app_with};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token with exactly these claims, signed with `alg` and the server's secret.
fn signed(alg: Algorithm, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// Calls every authenticated endpoint with `authorization` as the raw header
/// value (none when `None`); the execute and session calls name `id`.
async fn call_every_endpoint(app: &TestApp, authorization: Option<&str>, id: &str) -> Vec<(&'static str, Reply)> {
    let requests = [
        (
            "initialize",
            app.client
                .post(app.url("/api/v1/initialize"))
                .header("Language-Title", "nodejs-counter")
                .json(&json!({})),
        ),
        (
            "execute",
            app.client
                .post(app.url(&format!("/api/v1/execute/{id}")))
                .json(&json!({"params": {}})),
        ),
        (
            "get session",
            app.client.get(app.url(&format!("/api/v1/sessions/{id}"))),
        ),
        (
            "delete session",
            app.client.delete(app.url(&format!("/api/v1/sessions/{id}"))),
        ),
        ("list functions", app.client.get(app.url("/api/v1/functions"))),
        (
            "describe function",
            app.client.get(app.url("/api/v1/functions/nodejs-counter")),
        ),
    ];
    let mut replies = Vec::new();
    for (name, mut request) in requests {
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        replies.push((name, read(request.send().await.unwrap()).await));
    }
    replies
}

/// Asserts that every reply is the contract's 401 (execute's with the request ID).
fn assert_all_unauthorized(case: &str, replies: &[(&str, Reply)], id: &str) {
    for (endpoint, r) in replies {
        assert_eq!(r.status, 401, "{case} on {endpoint}: {:?}", r.body);
        assert_eq!(r.code(), "UNAUTHORIZED", "{case} on {endpoint}");
        assert!(r.body["error"]["message"].is_string(), "{case} on {endpoint}");
        assert!(r.body["error"]["details"].is_object(), "{case} on {endpoint}");
        if *endpoint == "execute" {
            assert_eq!(r.body["request_id"], id, "{case} on {endpoint}");
        }
    }
}

/// The next count of a retained nodejs-counter session: 1 if nothing else ran it.
async fn next_count(app: &TestApp, token: &str, id: &str) -> Value {
    let r = app
        .execute_with(token, id, json!({"params": {}}), Some("no-cache"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["result"]["count"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_authorization_headers_are_401_everywhere_and_run_nothing() {
    // Arrange: the unauthenticated limit would answer 429 before long.
    let app = spawn_app_with(&["--rate-limit-unauthenticated", "0"]).await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-counter", json!({"retain_session": true}))
        .await;
    let cases = [
        ("basic scheme", "Basic YWxpY2U6c2VjcmV0".to_owned()),
        ("scheme without a token", "Bearer".to_owned()),
        ("scheme and a blank", "Bearer    ".to_owned()),
        ("another scheme", format!("Token {token}")),
        ("a token without its scheme", token.clone()),
        ("two tokens", format!("Bearer {token} {token}")),
        ("a token with a fourth part", format!("Bearer {token}.AAAA")),
        ("a truncated signature", format!("Bearer {}", &token[..token.len() - 3])),
    ];

    for (case, header) in &cases {
        // Act
        let replies = call_every_endpoint(&app, Some(header), &id).await;

        // Assert
        assert_all_unauthorized(case, &replies, &id);
    }
    assert_eq!(
        next_count(&app, &token, &id).await,
        1,
        "a refused request ran the function"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_with_claims_of_the_wrong_type_or_algorithm_are_401_and_run_nothing() {
    // Arrange
    let app = spawn_app_with(&["--rate-limit-unauthenticated", "0"]).await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-counter", json!({"retain_session": true}))
        .await;
    let exp = now() + 600;
    let hs256 = |claims: Value| signed(Algorithm::HS256, &claims);
    let cases = [
        (
            "sub is a number",
            hs256(json!({"sub": 42, "exp": exp, "scope": "execute:all"})),
        ),
        (
            "sub is empty",
            hs256(json!({"sub": "", "exp": exp, "scope": "execute:all"})),
        ),
        ("sub is missing", hs256(json!({"exp": exp, "scope": "execute:all"}))),
        (
            "exp is a string",
            hs256(json!({"sub": "alice", "exp": "tomorrow", "scope": "execute:all"})),
        ),
        (
            "exp is negative",
            hs256(json!({"sub": "alice", "exp": -1, "scope": "execute:all"})),
        ),
        (
            "scope is a number",
            hs256(json!({"sub": "alice", "exp": exp, "scope": 5})),
        ),
        (
            "scope is an object",
            hs256(json!({"sub": "alice", "exp": exp, "scope": {"execute": "all"}})),
        ),
        (
            "scope holds numbers",
            hs256(json!({"sub": "alice", "exp": exp, "scope": [1, 2]})),
        ),
        ("claims are an array", hs256(json!(["alice", exp]))),
        (
            "HS384 with the server's own secret",
            signed(
                Algorithm::HS384,
                &json!({"sub": "alice", "exp": exp, "scope": "execute:all"}),
            ),
        ),
        (
            "HS512 with the server's own secret",
            signed(
                Algorithm::HS512,
                &json!({"sub": "alice", "exp": exp, "scope": "execute:all"}),
            ),
        ),
    ];

    for (case, bad) in &cases {
        // Act
        let replies = call_every_endpoint(&app, Some(&format!("Bearer {bad}")), &id).await;

        // Assert
        assert_all_unauthorized(case, &replies, &id);
    }
    assert_eq!(
        next_count(&app, &token, &id).await,
        1,
        "a refused request ran the function"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scope_claim_works_as_an_oauth_string_and_as_an_array() {
    // Arrange
    let app = spawn_app().await;
    let exp = now() + 600;
    let as_string = signed(
        Algorithm::HS256,
        &json!({"sub": "carol", "exp": exp, "scope": "  execute:nodejs   read:functions "}),
    );
    let as_array = signed(
        Algorithm::HS256,
        &json!({"sub": "dave", "exp": exp, "scope": ["execute:nodejs", "read:functions"]}),
    );

    for (form, token) in [("string", &as_string), ("array", &as_array)] {
        // Act
        let list = app.get(Some(token), "/api/v1/functions").await;
        let init = app.initialize(token, "nodejs-calculator", json!({})).await;
        let id = init.body["request_id"].as_str().unwrap_or_default().to_owned();
        let run = app
            .execute(token, &id, json!({"operation": "add", "values": [2, 3]}))
            .await;
        let python = app.initialize(token, "python-calculator", json!({})).await;

        // Assert
        assert_eq!(list.status, 200, "{form}: {:?}", list.body);
        assert_eq!(init.status, 200, "{form}: {:?}", init.body);
        assert_eq!(run.status, 200, "{form}: {:?}", run.body);
        assert_eq!(run.body["result"]["value"], 5, "{form}");
        assert_eq!(python.status, 403, "{form}: {:?}", python.body);
        assert_eq!(python.code(), "FORBIDDEN", "{form}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn execute_nodejs_grants_nodejs_functions_and_nothing_else() {
    // Arrange: carol's python session, started while she held execute:all.
    let app = spawn_app().await;
    let nodejs_only = app.token("carol", &["execute:nodejs"]);
    let everything = app.token("carol", &["execute:all"]);
    let no_execute = app.token("carol", &["read:functions"]);
    let python_id = app
        .session(&everything, "python-counter", json!({"retain_session": true}))
        .await;

    // Act
    let node_id = app
        .session(&nodejs_only, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let node_run = app
        .execute(
            &nodejs_only,
            &node_id,
            json!({"operation": "multiply", "values": [6, 7]}),
        )
        .await;
    let python_init = app.initialize(&nodejs_only, "python-calculator", json!({})).await;
    let python_run = app
        .execute_with(&nodejs_only, &python_id, json!({"params": {}}), Some("no-cache"))
        .await;
    let unscoped_init = app.initialize(&no_execute, "nodejs-calculator", json!({})).await;
    let unscoped_run = app
        .execute(&no_execute, &node_id, json!({"operation": "add", "values": [1]}))
        .await;

    // Assert
    assert_eq!(node_run.status, 200, "{:?}", node_run.body);
    assert_eq!(node_run.body["result"]["value"], 42);
    for (what, r) in [
        ("python initialize", &python_init),
        ("python execute", &python_run),
        ("initialize without execute scope", &unscoped_init),
        ("execute without execute scope", &unscoped_run),
    ] {
        assert_eq!(r.status, 403, "{what}: {:?}", r.body);
        assert_eq!(r.code(), "FORBIDDEN", "{what}");
    }
    assert_eq!(python_run.body["request_id"], python_id.as_str());
    assert!(
        python_init.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("execute:python"),
        "{:?}",
        python_init.body
    );
    // The refused execution did not run: the python counter's first run is 1.
    assert_eq!(next_count(&app, &everything, &python_id).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn reading_functions_without_read_functions_is_403() {
    // Arrange
    let app = spawn_app().await;
    let executor = app.token("alice", &["execute:all", "write:functions"]);

    // Act
    let list = app.get(Some(&executor), "/api/v1/functions").await;
    let detail = app.get(Some(&executor), "/api/v1/functions/nodejs-calculator").await;
    let filtered = app.get(Some(&executor), "/api/v1/functions?language=nodejs").await;

    // Assert
    for (what, r) in [("list", &list), ("detail", &detail), ("filtered list", &filtered)] {
        assert_eq!(r.status, 403, "{what}: {:?}", r.body);
        assert_eq!(r.code(), "FORBIDDEN", "{what}");
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains("read:functions"),
            "{what}: {:?}",
            r.body
        );
        assert!(r.body.get("functions").is_none() && r.body.get("schema").is_none());
    }
}

/// Runs `controller token ...` with exactly `env`; returns (success, stdout, stderr).
fn token_subcommand(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_controller-under-test"))
        .arg("token")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("run the token subcommand");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn private_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fnrt-auth")
        .tempdir_in("/var/tmp")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_subcommand_prints_a_token_that_the_server_accepts() {
    // Arrange
    let app = spawn_app().await;
    let dir = private_dir();

    // Act
    let (ok, token, stderr) = token_subcommand(
        dir.path(),
        &[
            "--sub",
            "bob",
            "--scope",
            "execute:all",
            "--scope",
            "read:functions",
            "--ttl",
            "120",
        ],
        &[("JWT_SECRET", SECRET)],
    );

    // Assert
    assert!(ok, "token subcommand failed: {stderr}");
    assert_eq!(token.lines().count(), 1, "stdout is exactly the token: {token:?}");
    assert_eq!(token.split('.').count(), 3, "{token}");
    let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(&token)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "bob");
    let exp = claims["exp"].as_u64().unwrap();
    assert!(
        (now() + 100..=now() + 130).contains(&exp),
        "exp {exp} is not ~120 s ahead"
    );
    assert!(
        !dir.path().join("jwt-secret").exists(),
        "JWT_SECRET was set: no secret file is needed"
    );

    let list = app.get(Some(&token), "/api/v1/functions").await;
    assert_eq!(list.status, 200, "{:?}", list.body);
    let id = app.session(&token, "python-calculator", json!({})).await;
    let run = app
        .execute(&token, &id, json!({"operation": "subtract", "values": [10, 4]}))
        .await;
    assert_eq!(run.body["result"]["value"], 6, "{:?}", run.body);
}

/// A controller started here, without JWT_SECRET (spawn_app always sets it).
struct Unconfigured {
    child: Child,
    address: String,
}

impl Unconfigured {
    fn start(data_dir: &Path) -> Unconfigured {
        let mut child = Command::new(env!("CARGO_BIN_EXE_controller-under-test"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--warm-pool-size",
                "0",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--functions-dir")
            .arg(repo_dir().join("functions"))
            .arg("--runtimes-dir")
            .arg(repo_dir().join("runtimes"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the controller");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let addr = serde_json::from_str::<Value>(&line)
                    .ok()
                    .and_then(|v| v["addr"].as_str().map(str::to_owned));
                if let (Some(addr), Some(sender)) = (addr, tx.as_ref()) {
                    let _ = sender.send(addr);
                    tx = None;
                }
            }
        });
        let mut server = Unconfigured {
            child,
            address: String::new(),
        };
        server.address = format!(
            "http://{}",
            rx.recv_timeout(Duration::from_secs(30))
                .expect("the controller did not start")
        );
        server
    }
}

impl Drop for Unconfigured {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        for _ in 0..500 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_jwt_secret_the_token_subcommand_and_the_server_share_a_generated_secret() {
    use std::os::unix::fs::PermissionsExt;

    // Arrange
    let dir = private_dir();
    let args = ["--sub", "bob", "--scope", "read:functions"];

    // Act: the token first (it creates the secret), then the server on the same data dir.
    let (ok, token, stderr) = token_subcommand(dir.path(), &args, &[]);
    let secret_file = dir.path().join("jwt-secret");
    let secret = std::fs::read_to_string(&secret_file).expect("the token subcommand wrote DATA_DIR/jwt-secret");
    let mode = std::fs::metadata(&secret_file).unwrap().permissions().mode() & 0o777;
    let server = Unconfigured::start(dir.path());
    let client = reqwest::Client::new();
    let list = |t: String| {
        let request = client
            .get(format!("{}/api/v1/functions", server.address))
            .bearer_auth(t);
        async move { read(request.send().await.unwrap()).await }
    };
    let accepted = list(token.clone()).await;
    let foreign_token = controller::auth::Authenticator::new(SECRET.as_bytes(), None, None)
        .issue("bob", &["read:functions".to_owned()], 600)
        .unwrap();
    let foreign = list(foreign_token).await;
    let (again_ok, again, _) = token_subcommand(dir.path(), &args, &[]);
    let accepted_again = list(again).await;

    // Assert
    assert!(ok, "token subcommand failed: {stderr}");
    assert!(
        stderr.contains("jwt-secret"),
        "the generated secret is announced: {stderr}"
    );
    assert!(!stderr.contains(secret.trim()), "the secret itself is never printed");
    assert_eq!(mode, 0o600, "jwt-secret mode {mode:o}");
    assert!(secret.trim().len() >= 32);
    let verifier = controller::auth::Authenticator::new(secret.trim().as_bytes(), None, None);
    assert_eq!(
        verifier.verify(&token).expect("signed with the file's secret").sub,
        "bob"
    );
    assert_eq!(accepted.status, 200, "{:?}", accepted.body);
    assert_eq!(foreign.status, 401, "a token from another secret: {:?}", foreign.body);
    assert!(again_ok);
    assert_eq!(accepted_again.status, 200, "the secret is reused, not regenerated");
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), secret);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_is_refused_once_its_exp_and_the_configured_leeway_have_passed() {
    // Arrange: exact expiry, and a token that lives one second.
    let app = spawn_app_with(&["--jwt-leeway-secs", "0"]).await;
    let token = app.token("brief", &["read:functions"]);
    let short = {
        let claims = json!({"sub": "brief", "scope": "read:functions", "exp": now() + 1});
        jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    assert_eq!(app.get(Some(&short), "/api/v1/functions").await.status, 200);

    // Act
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = app.get(Some(&short), "/api/v1/functions").await;

    // Assert
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"), "{:?}", r.body);
    assert_eq!(app.get(Some(&token), "/api/v1/functions").await.status, 200);
}
