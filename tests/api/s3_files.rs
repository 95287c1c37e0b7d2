//! Files in S3-compatible object storage (`FILE_STORE=s3://…`), shared by
//! controllers on one PostgreSQL database: a file uploaded to one is read
//! by a function running on the other, and deleted through either.
//!
//! The S3 server comes from `TEST_S3_ENDPOINT` (moto's server mode in CI,
//! started by `.ci/run`); PostgreSQL from `TEST_DATABASE_URL`. Without
//! them these tests say that they skipped, except under `CI=true`, where
//! they fail.

use std::process::Command;

use serde_json::json;

use crate::files::upload;
use crate::function_files::download;
use crate::helpers::{Options, TestApp, controller_env, spawn_binary_opts};
use crate::replicas::TestDatabase;

/// The S3 server, or `None` (skipped) outside CI.
fn s3_endpoint() -> Option<String> {
    match std::env::var("TEST_S3_ENDPOINT") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but TEST_S3_ENDPOINT is not set"
            );
            eprintln!("skipped: set TEST_S3_ENDPOINT=http://127.0.0.1:PORT (e.g. moto_server) to run the S3 tests");
            None
        }
    }
}

/// A new bucket (moto takes an unsigned create); its name.
async fn bucket(endpoint: &str) -> String {
    let name = format!("fnrt-e2e-{}", uuid::Uuid::new_v4().simple());
    let r = reqwest::Client::new()
        .put(format!("{endpoint}/{name}"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "creating bucket {name}: {}", r.status());
    name
}

const SECRET_KEY: &str = "s3-secret-that-no-function-may-see";

/// The environment an operator sets for an S3-compatible store.
fn s3_env(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "fnrt-test"),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn controller(db: &TestDatabase, store: &str, endpoint: &str) -> TestApp {
    let data_dir = tempfile::Builder::new().prefix("fnrt").tempdir_in("/var/tmp").unwrap();
    let options = Options {
        env: s3_env(endpoint),
        ..Options::default()
    };
    spawn_binary_opts(data_dir, &["--database-url", &db.url, "--file-store", store], &options)
}

/// Reads a file, writes it reversed, and shows what it can see of its
/// environment.
const PYTHON_REVERSE: &str = r#"
import os
import fnrt

def handler(params, context):
    data = fnrt.files.read(params["file_id"])
    written = fnrt.files.write(data[::-1], name="reversed.txt")
    return {"file_id": written["file_id"], "env": dict(os.environ)}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn replicas_on_one_bucket_share_files_and_functions_never_see_its_credentials() {
    let (Some(endpoint), Some(db)) = (s3_endpoint(), TestDatabase::create()) else {
        return;
    };
    let store = format!("s3://{}/replicas", bucket(&endpoint).await);
    let a = controller(&db, &store, &endpoint);
    let b = controller(&db, &store, &endpoint);
    let token = a.admin();
    a.register("python-reverse", PYTHON_REVERSE, json!({"cache": {"enabled": false}}))
        .await;

    // Uploaded to A (9 MiB: a multipart upload to the bucket).
    let bytes: Vec<u8> = (0..9 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let up = upload(&a, &token, bytes.clone(), Some("big.bin")).await;
    assert_eq!(up.status, 201, "{:?}", up.body);
    let file_id = up.body["file_id"].as_str().unwrap().to_owned();
    assert_eq!(download(&b, &token, &file_id).await, bytes, "B serves A's upload");

    // Read and written by a function running on B; the result downloads from A.
    let id = b.session(&token, "python-reverse", json!({})).await;
    let r = b.execute(&token, &id, json!({"file_id": file_id})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let reversed = r.body["result"]["file_id"].as_str().unwrap().to_owned();
    let mut expected = bytes.clone();
    expected.reverse();
    assert!(
        download(&a, &token, &reversed).await == expected,
        "A serves what B's function wrote"
    );

    // The store's credentials stay in the controller.
    let env = r.body["result"]["env"].to_string();
    assert!(!env.contains(SECRET_KEY) && !env.contains("AWS_"), "{env}");

    // Deleted through B: gone on A, for its owner too.
    let deleted = b
        .client
        .delete(b.url(&format!("/api/v1/files/{file_id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = a.get(Some(&token), &format!("/api/v1/files/{file_id}/meta")).await;
    assert_eq!(gone.status, 404, "{:?}", gone.body);
    assert_eq!(gone.code(), "NOT_FOUND");
}

/// The controller's exit status and what it printed, started with `env`.
fn start_failure(flags: &[&str], env: &[(String, String)]) -> String {
    let data_dir = tempfile::Builder::new().prefix("fnrt").tempdir_in("/var/tmp").unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_controller-under-test"));
    command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir.path())
        .args(flags);
    controller_env(&mut command);
    command.envs(env.iter().map(|(k, v)| (k, v)));
    let out = command.output().expect("the controller binary");
    assert!(!out.status.success(), "it started with {flags:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_store_that_is_not_there_stops_the_start_with_the_reason() {
    let Some(endpoint) = s3_endpoint() else { return };
    let missing = start_failure(&["--file-store", "s3://fnrt-no-such-bucket"], &s3_env(&endpoint));
    assert!(
        missing.contains("FILE_STORE s3://fnrt-no-such-bucket: the bucket does not answer"),
        "{missing}"
    );
    assert!(!missing.contains(SECRET_KEY), "{missing}");

    let bad = start_failure(&["--file-store", "s3://Not_A_Bucket"], &s3_env(&endpoint));
    assert!(bad.contains("is not a bucket name"), "{bad}");
    let unknown = start_failure(&["--file-store", "/var/files"], &[]);
    assert!(
        unknown.contains("expected `local` or `s3://BUCKET[/PREFIX]`"),
        "{unknown}"
    );
}
