//! `fnrt`, the client CLI, against a real controller: log in, deploy a
//! folder, invoke, list, describe, remove; `--json` output parsed; the exit
//! code and message of each kind of failure.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::{Value, json};

use crate::helpers::spawn_app;

/// What one `fnrt` run printed, and its exit code.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}", self.stdout))
    }
}

async fn fnrt(config: &Path, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fnrt-under-test"))
        .args(args)
        .env_clear()
        .env("FNRT_CONFIG", config)
        .output()
        .await
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write_function(dir: &Path, greeting: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("function.json"),
        json!({"description": "says hello", "schema": {"params": {"type": "object", "required": ["name"]}}})
            .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("index.js"),
        format!(
            "module.exports.handler = (p) => {{ if (p.name === 'boom') throw new Error('boom'); return {{ text: '{greeting}, ' + p.name }}; }};"
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_invoke_list_describe_and_remove_a_folder() {
    // Arrange
    let app = spawn_app().await;
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("fnrt").join("config.json");
    let folder = home.path().join("nodejs-clihello");
    write_function(&folder, "hello");

    // Act + Assert: log in; the token is kept for its owner alone.
    let login = fnrt(&config, &["login", &app.address, "--token", &app.admin()]).await;
    assert_eq!(login.code, 0, "{}", login.stderr);
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Deploy, then deploy a change: version 1, then 2.
    let first = fnrt(&config, &["deploy", folder.to_str().unwrap()]).await;
    assert_eq!(
        (first.code, first.stdout.trim()),
        (0, "Deployed nodejs-clihello version 1"),
        "{}",
        first.stderr
    );
    write_function(&folder, "hi");
    let second = fnrt(&config, &["--json", "deploy", folder.to_str().unwrap()]).await;
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(second.json()["version"], 2);

    // A pipeline's folder is its manifest alone.
    let pipeline = home.path().join("pipeline-clihello");
    std::fs::create_dir_all(&pipeline).unwrap();
    std::fs::write(
        pipeline.join("function.json"),
        r#"{"description": "greets twice", "steps": [{"name": "one", "function": "nodejs-clihello"}]}"#,
    )
    .unwrap();
    let deployed = fnrt(&config, &["deploy", pipeline.to_str().unwrap()]).await;
    assert_eq!(deployed.code, 0, "{}", deployed.stderr);
    let piped = fnrt(&config, &["invoke", "pipeline-clihello", "-p", "name=pipes"]).await;
    assert_eq!(piped.code, 0, "{}", piped.stderr);
    assert_eq!(
        serde_json::from_str::<Value>(&piped.stdout).unwrap(),
        json!({"text": "hi, pipes"})
    );

    // Invoke, with -p and with -d; human output is the result.
    let human = fnrt(&config, &["invoke", "nodejs-clihello", "-p", "name=world"]).await;
    assert_eq!(human.code, 0, "{}", human.stderr);
    assert_eq!(
        serde_json::from_str::<Value>(&human.stdout).unwrap(),
        json!({"text": "hi, world"})
    );
    let full = fnrt(
        &config,
        &[
            "--json",
            "invoke",
            "nodejs-calculator",
            "-d",
            r#"{"operation": "add", "values": [2, 3]}"#,
        ],
    )
    .await;
    assert_eq!(full.code, 0, "{}", full.stderr);
    assert_eq!(full.json()["result"], json!({"value": 5}));
    assert!(full.json()["request_id"].is_string());

    // List and describe.
    let listed = fnrt(&config, &["--json", "list", "--language", "nodejs"]).await;
    let titles: Vec<Value> = listed
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["language_title"].clone())
        .collect();
    assert!(titles.contains(&json!("nodejs-clihello")) && titles.contains(&json!("nodejs-calculator")));
    let table = fnrt(&config, &["list"]).await;
    assert!(table.stdout.starts_with("LANGUAGE-TITLE"), "{}", table.stdout);
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with("nodejs-clihello ") && l.contains("says hello"))
    );
    let described = fnrt(&config, &["--json", "describe", "nodejs-clihello"]).await;
    assert_eq!(described.json()["version"], 2);

    // Its versions; the older one removed, the current one refused (exit 6).
    let versions = fnrt(&config, &["versions", "nodejs-clihello"]).await;
    assert!(versions.stdout.starts_with("VERSION"), "{}", versions.stdout);
    assert!(versions.stdout.contains("2 (current)"), "{}", versions.stdout);
    let older = fnrt(&config, &["rm", "nodejs-clihello", "--version", "1"]).await;
    assert_eq!(
        (older.code, older.stdout.trim()),
        (0, "Removed version 1 of nodejs-clihello")
    );
    let listed = fnrt(&config, &["--json", "versions", "nodejs-clihello"]).await;
    let numbers: Vec<Value> = listed
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].clone())
        .collect();
    assert_eq!(numbers, [json!(2)]);
    let current = fnrt(&config, &["rm", "nodejs-clihello", "--version", "2"]).await;
    assert_eq!(current.code, 6, "{}", current.stderr);
    assert!(current.stderr.starts_with("error: CONFLICT: "), "{}", current.stderr);

    // Remove; then it is not found (exit 4).
    let removed = fnrt(&config, &["rm", "nodejs-clihello"]).await;
    assert_eq!((removed.code, removed.stdout.trim()), (0, "Removed nodejs-clihello"));
    let gone = fnrt(&config, &["describe", "nodejs-clihello"]).await;
    assert_eq!(gone.code, 4, "{}", gone.stderr);
    assert!(gone.stderr.starts_with("error: NOT_FOUND: "), "{}", gone.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_kind_of_failure_has_its_exit_code_and_the_apis_error() {
    let app = spawn_app().await;
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config.json");
    let folder = home.path().join("nodejs-clifail");
    write_function(&folder, "hello");

    // Not logged in: 3.
    let nobody = fnrt(&config, &["list"]).await;
    assert_eq!(nobody.code, 3, "{}", nobody.stderr);
    assert!(nobody.stderr.contains("fnrt login"), "{}", nobody.stderr);
    // A refused token is not saved: 5.
    let refused = fnrt(&config, &["login", &app.address, "--token", "not-a-token"]).await;
    assert_eq!(refused.code, 5, "{}", refused.stderr);
    assert!(!config.exists());

    // A token that may only execute: deploy is refused with 5.
    let runner = app.token("bob", &["execute:all"]);
    assert_eq!(
        fnrt(&config, &["login", &app.address, "--token", &runner]).await.code,
        0
    );
    let denied = fnrt(&config, &["deploy", folder.to_str().unwrap()]).await;
    assert_eq!(denied.code, 5, "{}", denied.stderr);
    assert!(denied.stderr.starts_with("error: FORBIDDEN: "), "{}", denied.stderr);

    // The function fails: 1, with its code and message.
    assert_eq!(
        fnrt(&config, &["login", &app.address, "--token", &app.admin()])
            .await
            .code,
        0
    );
    assert_eq!(fnrt(&config, &["deploy", folder.to_str().unwrap()]).await.code, 0);
    let threw = fnrt(&config, &["invoke", "nodejs-clifail", "-p", "name=boom"]).await;
    assert_eq!(threw.code, 1, "{}", threw.stderr);
    assert!(threw.stderr.starts_with("error: RUNTIME_ERROR: "), "{}", threw.stderr);
    let schema = fnrt(&config, &["invoke", "nodejs-clifail"]).await;
    assert_eq!(schema.code, 1, "{}", schema.stderr);

    // Not found, with the suggestion: 4. A bad -d: 2. Unreachable: 3.
    let typo = fnrt(&config, &["invoke", "nodejs-clifal", "-p", "name=x"]).await;
    assert_eq!(typo.code, 4, "{}", typo.stderr);
    assert!(
        typo.stderr.contains("did you mean 'nodejs-clifail'?"),
        "{}",
        typo.stderr
    );
    let bad = fnrt(&config, &["invoke", "nodejs-clifail", "-d", "{not json"]).await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    let port = app.address.rsplit(':').next().unwrap().to_owned();
    drop(app);
    let down = fnrt(&config, &["list"]).await;
    assert_eq!(down.code, 3, "{} (port {port})", down.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn login_makes_its_own_folder_private_and_leaves_an_existing_one_as_it_was() {
    let app = spawn_app().await;
    let home = tempfile::tempdir().unwrap();
    // A folder of its own: made 0700.
    let own = home.path().join("new").join("fnrt").join("config.json");
    assert_eq!(
        fnrt(&own, &["login", &app.address, "--token", &app.admin()]).await.code,
        0
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(own.parent().unwrap()), 0o700);
    // A file in a shared folder (FNRT_CONFIG=/var/tmp/x.json): the folder keeps its mode.
    let shared = home.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let config = shared.join("fnrt.json");
    assert_eq!(
        fnrt(&config, &["login", &app.address, "--token", &app.admin()])
            .await
            .code,
        0
    );
    assert_eq!(
        mode(&shared),
        0o1777,
        "login changed the mode of a folder it did not make"
    );
    assert_eq!(mode(&config), 0o600);
}

#[tokio::test(flavor = "multi_thread")]
async fn invoke_async_watches_an_execution_to_its_end_and_executions_lists_it() {
    // Arrange
    let app = spawn_app().await;
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config.json");
    let folder = home.path().join("nodejs-cliasync");
    write_function(&folder, "later");
    assert_eq!(
        fnrt(&config, &["login", &app.address, "--token", &app.admin()])
            .await
            .code,
        0
    );
    assert_eq!(fnrt(&config, &["deploy", folder.to_str().unwrap()]).await.code, 0);

    // Act
    let watched = fnrt(
        &config,
        &["invoke", "nodejs-cliasync", "-p", "name=you", "--async", "--watch"],
    )
    .await;
    let queued = fnrt(
        &config,
        &["--json", "invoke", "nodejs-cliasync", "-p", "name=boom", "--async"],
    )
    .await;

    // Assert: the id, each attempt on stderr, then the result.
    assert_eq!(watched.code, 0, "{}", watched.stderr);
    let mut lines = watched.stdout.lines();
    let id = lines.next().unwrap().trim().to_owned();
    assert_eq!(id.len(), 36, "{}", watched.stdout);
    let result: Value = serde_json::from_str(&lines.collect::<Vec<_>>().join("\n")).unwrap();
    assert_eq!(result, json!({"text": "later, you"}));
    assert!(watched.stderr.contains("attempt 1 completed"), "{}", watched.stderr);
    assert_eq!(queued.code, 0, "{}", queued.stderr);
    let failing = queued.json()["execution_id"].as_str().unwrap().to_owned();
    let followed = fnrt(&config, &["executions", &failing, "--watch"]).await;
    assert_eq!(followed.code, 1, "a failed execution exits 1: {}", followed.stderr);
    assert!(followed.stderr.contains("RUNTIME_ERROR: boom"), "{}", followed.stderr);
    let listed = fnrt(&config, &["--json", "executions", "--status", "failed"]).await;
    let failed: Vec<Value> = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["execution_id"], failing.as_str());
    let table = fnrt(&config, &["executions"]).await;
    assert!(table.stdout.starts_with("EXECUTION"), "{}", table.stdout);
    assert_eq!(table.stdout.lines().count(), 3, "{}", table.stdout);
    let gone = fnrt(&config, &["cancel", &id]).await;
    assert_eq!(
        gone.code, 6,
        "a finished execution cannot be cancelled: {}",
        gone.stderr
    );
    assert_eq!(fnrt(&config, &["executions", "no-such-id"]).await.code, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_show_an_execution_s_output_and_follow_a_function_and_sessions_lists_them() {
    // Arrange: a function that writes to both streams, deployed and invoked.
    let app = spawn_app().await;
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config.json");
    let folder = home.path().join("nodejs-clilogs");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("function.json"),
        json!({"description": "chatty", "cache": {"enabled": false}}).to_string(),
    )
    .unwrap();
    std::fs::write(
        folder.join("index.js"),
        "module.exports.handler = (p) => { console.log('hello ' + p.name); console.error('careful'); \
         if (p.name === 'boom') throw new Error('boom'); return {ok: true}; };",
    )
    .unwrap();
    assert_eq!(
        fnrt(&config, &["login", &app.address, "--token", &app.admin()])
            .await
            .code,
        0
    );
    assert_eq!(fnrt(&config, &["deploy", folder.to_str().unwrap()]).await.code, 0);

    // Act + Assert: an execution's logs, human and --json.
    let invoked = fnrt(&config, &["--json", "invoke", "nodejs-clilogs", "-p", "name=ann"]).await;
    assert_eq!(invoked.code, 0, "{}", invoked.stderr);
    let id = invoked.json()["execution_id"].as_str().unwrap().to_owned();
    let human = fnrt(&config, &["logs", &id]).await;
    assert_eq!(human.code, 0, "{}", human.stderr);
    let shown: Vec<(String, String)> = human
        .stdout
        .lines()
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            let ts = parts.next().unwrap();
            assert!(ts.ends_with('Z'), "{l}");
            (
                parts.next().unwrap().to_owned(),
                parts.next().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let as_json = fnrt(&config, &["--json", "logs", &id]).await;
    // A rare failure here (an execution found with no lines) was seen in
    // CI and not reproduced: the invoke's answer (cached? cold?) and the
    // logs as the API gave them say more than the lines alone.
    let seen = format!("invoke answered {}; logs {}", invoked.stdout, as_json.stdout);
    assert!(shown.contains(&("stdout".into(), "hello ann".into())), "{seen}");
    assert!(shown.contains(&("stderr".into(), "careful".into())), "{seen}");
    assert_eq!(as_json.json()["executions"], json!([id]));

    // A failed run names its logs in the error; they hold its output.
    let failed = fnrt(&config, &["invoke", "nodejs-clilogs", "-p", "name=boom"]).await;
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    let failed_id = failed
        .stderr
        .split("fnrt logs ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no logs hint: {}", failed.stderr));
    let failed_logs = fnrt(&config, &["logs", failed_id]).await;
    assert!(
        failed_logs.stdout.contains(" stdout hello boom"),
        "exit {}, stdout {:?}, stderr {:?}",
        failed_logs.code,
        failed_logs.stdout,
        failed_logs.stderr
    );

    // A function's last lines name their executions (the lines of one
    // execution keep their order within a stream only).
    let last = fnrt(&config, &["logs", "nodejs-clilogs", "--lines", "2"]).await;
    assert_eq!(last.code, 0, "{}", last.stderr);
    assert_eq!(last.stdout.lines().count(), 2, "{}", last.stdout);
    for line in [" stdout hello boom", " stderr careful"] {
        let expected = format!(" {}{line}", &failed_id[..8]);
        assert!(last.stdout.contains(&expected), "{expected} not in {}", last.stdout);
    }

    // Mistakes: -f on an id (usage), an unknown execution (not found).
    assert_eq!(fnrt(&config, &["logs", "-f", &id]).await.code, 2);
    let unknown = fnrt(&config, &["logs", &uuid::Uuid::new_v4().to_string()]).await;
    assert_eq!(unknown.code, 4, "{}", unknown.stderr);

    // Following: a line written by a run started after the follow began.
    let mut follower = tokio::process::Command::new(env!("CARGO_BIN_EXE_fnrt-under-test"))
        .args(["logs", "-f", "nodejs-clilogs"])
        .env_clear()
        .env("FNRT_CONFIG", &config)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(follower.stdout.take().unwrap()));
    let followed = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        // Until the follow is surely open: invoke again while nothing came.
        loop {
            assert_eq!(
                fnrt(&config, &["invoke", "nodejs-clilogs", "-p", "name=live"])
                    .await
                    .code,
                0
            );
            if let Ok(Ok(Some(line))) = tokio::time::timeout(std::time::Duration::from_secs(2), lines.next_line()).await
            {
                return line;
            }
        }
    })
    .await
    .expect("no followed line");
    assert!(
        followed.contains("hello live") || followed.contains("careful"),
        "{followed}"
    );
    follower.kill().await.unwrap();

    // Sessions: every invoke was a one-shot session, now completed.
    let sessions = fnrt(&config, &["--json", "sessions", "--function", "nodejs-clilogs"]).await;
    assert_eq!(sessions.code, 0, "{}", sessions.stderr);
    let listed = sessions.json();
    let listed = listed.as_array().unwrap();
    assert!(listed.len() >= 3, "{listed:?}");
    assert!(
        listed
            .iter()
            .all(|s| s["status"] == "completed" && s["language_title"] == "nodejs-clilogs")
    );
    let table = fnrt(&config, &["sessions"]).await;
    assert!(table.stdout.starts_with("REQUEST_ID"), "{}", table.stdout);
    let one = listed[0]["request_id"].as_str().unwrap();
    let shown = fnrt(&config, &["sessions", one]).await;
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    assert!(shown.stdout.starts_with(one), "{}", shown.stdout);
    assert_eq!(fnrt(&config, &["sessions", "no-such-session"]).await.code, 4);
}
