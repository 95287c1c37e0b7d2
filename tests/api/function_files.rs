//! Functions reading and writing their caller's files by reference:
//! `require('fnrt').files` in Node, `import fnrt` in Python, each run with
//! a key of its own on the controller's files socket. A file goes through
//! pipeline steps as a `file_id`; another caller's file is not found; a key
//! kept past its run opens nothing.

use serde_json::{Value, json};

use crate::files::upload;
use crate::helpers::{TestApp, spawn_app};

/// Reads a file, writes its upper-cased copy.
const NODE_UPPER: &str = r#"
const { files } = require('fnrt');
exports.handler = async (params) => {
  const info = await files.info(params.file_id);
  const text = (await files.read(params.file_id)).toString('utf8');
  const written = await files.write(text.toUpperCase(), { name: 'upper-' + info.name });
  return { file_id: written.file_id, size: written.size, from: info.name };
};
"#;

/// Reads a file, writes it reversed.
const PYTHON_REVERSE: &str = r#"
import fnrt

def handler(params, context):
    data = fnrt.files.read(params["file_id"])
    written = fnrt.files.write(data[::-1], name="reversed.txt")
    return {"file_id": written["file_id"], "sha256": written["sha256"]}
"#;

/// Tries a file id, answering the error's code.
const PYTHON_PEEK: &str = r#"
import fnrt

def handler(params, context):
    try:
        return {"bytes": len(fnrt.files.read(params["file_id"]))}
    except fnrt.FilesError as e:
        return {"code": e.code, "message": str(e)}
"#;

/// Captures its run's key from the helper's request, and tries a kept key
/// directly on the socket.
const NODE_KEY_THIEF: &str = r#"
const http = require('http');
const { files } = require('fnrt');
let stolen = null;
const realRequest = http.request;
http.request = function (options, ...rest) {
  if (options && options.headers && options.headers.Authorization) stolen = options.headers.Authorization;
  return realRequest.call(this, options, ...rest);
};
function raw(key, fileId) {
  return new Promise((resolve) => {
    const socketPath = ['/run/runtime/files.sock', require('path').join(process.cwd(), 'files.sock')]
      .find((p) => require('fs').existsSync(p));
    const req = realRequest({ socketPath, path: '/api/v1/files/' + fileId,
                              headers: { Authorization: key } }, (res) => { res.resume(); resolve(res.statusCode); });
    req.on('error', (e) => resolve('error ' + e.code));
    req.end();
  });
}
exports.handler = async (params) => {
  if (params.steal) {
    await files.read(params.file_id);
    // The key works while its run lasts.
    return { stolen: stolen !== null, during_the_run: await raw(stolen, params.file_id) };
  }
  return { with_old_key: await raw(stolen, params.file_id) };
};
"#;

fn no_cache() -> Value {
    json!({"cache": {"enabled": false}})
}

async fn call(app: &TestApp, token: &str, language_title: &str, params: Value) -> crate::helpers::Reply {
    let id = app.session(token, language_title, json!({})).await;
    app.execute(token, &id, params).await
}

pub(crate) async fn download(app: &TestApp, token: &str, file_id: &str) -> Vec<u8> {
    let r = app
        .client
        .get(app.url(&format!("/api/v1/files/{file_id}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "downloading {file_id}");
    r.bytes().await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn node_and_python_functions_read_and_write_their_callers_files() {
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-upper", NODE_UPPER, no_cache()).await;
    app.register("python-reverse", PYTHON_REVERSE, no_cache()).await;
    let up = upload(&app, &token, b"hello files".to_vec(), Some("greeting.txt")).await;
    assert_eq!(up.status, 201, "{:?}", up.body);
    let file_id = up.body["file_id"].as_str().unwrap().to_owned();

    let r = call(&app, &token, "nodejs-upper", json!({"file_id": file_id})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["from"], "greeting.txt");
    let upper = r.body["result"]["file_id"].as_str().unwrap().to_owned();
    assert_eq!(download(&app, &token, &upper).await, b"HELLO FILES");

    let r = call(&app, &token, "python-reverse", json!({"file_id": upper})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let reversed = r.body["result"]["file_id"].as_str().unwrap().to_owned();
    assert_eq!(download(&app, &token, &reversed).await, b"SELIF OLLEH");
    // The caller owns what its functions wrote.
    let meta = app.get(Some(&token), &format!("/api/v1/files/{reversed}/meta")).await;
    assert_eq!(meta.body["name"], "reversed.txt");

    // As pipeline steps, the file goes by reference.
    let r = app
        .post_function(json!({
            "language_title": "pipeline-upper-reverse",
            "description": "upper-case, then reverse, a text file",
            "steps": [
                {"name": "upper", "function": "nodejs-upper", "params": {"file_id": "$.params.file_id"}},
                {"name": "reverse", "function": "python-reverse", "params": {"file_id": "$.steps.upper.output.file_id"}},
            ],
        }))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = call(&app, &token, "pipeline-upper-reverse", json!({"file_id": file_id})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let out = r.body["result"]["file_id"].as_str().unwrap();
    assert_eq!(download(&app, &token, out).await, b"SELIF OLLEH");
}

/// Reads a file, writes it reversed; a missing file is its error's code.
const RUST_REVERSE: &str = r#"
use fnrt_sdk::{Context, Error, export};
use serde_json::{Value, json};

fn reverse(params: Value, ctx: Context) -> Result<Value, Error> {
    let files = ctx.files()?;
    let id = params["file_id"].as_str().unwrap_or_default();
    let mut data = match files.read(id) {
        Ok(data) => data,
        Err(e) => return Ok(json!({"error": e.details()["files_code"]})),
    };
    let name = files.info(id)?["name"].as_str().unwrap_or_default().to_owned();
    data.reverse();
    let written = files.write(&data, &format!("reversed {name}"))?;
    Ok(json!({"file_id": written["file_id"], "name": written["name"]}))
}

export!(reverse);
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_rust_function_reads_and_writes_its_callers_files() {
    let app = spawn_app().await;
    let r = app
        .post_function(json!({"language_title": "rust-reverse", "description": "reverses a file",
                              "files": {"Cargo.toml": crate::rust::PROBE_TOML.replace("\"probe\"", "\"reverse\""), "src/lib.rs": RUST_REVERSE}, "cache": {"enabled": false}}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let alice = app.token("alice", &["execute:all"]);
    let up = upload(&app, &alice, b"abc".to_vec(), Some("x y.txt")).await;
    let id = up.body["file_id"].as_str().unwrap().to_owned();
    let r = call(&app, &alice, "rust-reverse", json!({"file_id": id})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["name"], "reversed x y.txt");
    let out = r.body["result"]["file_id"].as_str().unwrap();
    assert_eq!(download(&app, &alice, out).await, b"cba");
    let bob = app.token("bob", &["execute:all"]);
    let r = call(&app, &bob, "rust-reverse", json!({"file_id": id})).await;
    assert_eq!(r.body["result"], json!({"error": "NOT_FOUND"}), "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_opens_only_its_callers_files_and_only_while_it_lasts() {
    let app = spawn_app().await;
    app.register("python-peek", PYTHON_PEEK, no_cache()).await;
    app.register("nodejs-key-thief", NODE_KEY_THIEF, no_cache()).await;
    let alice = app.token("alice", &["execute:all"]);
    let bob = app.token("bob", &["execute:all"]);
    let up = upload(&app, &alice, b"alice's secret".to_vec(), Some("secret.txt")).await;
    let secret = up.body["file_id"].as_str().unwrap().to_owned();

    // Alice's run reads it; Bob's run of the same function does not find it.
    let r = call(&app, &alice, "python-peek", json!({"file_id": secret})).await;
    assert_eq!(r.body["result"], json!({"bytes": 14}), "{:?}", r.body);
    let r = call(&app, &bob, "python-peek", json!({"file_id": secret})).await;
    assert_eq!(r.body["result"]["code"], "NOT_FOUND", "{:?}", r.body);

    // A key captured during Alice's run opens nothing afterwards, even on
    // the same instance: the next run (Bob's) presents it and is refused.
    let r = call(
        &app,
        &alice,
        "nodejs-key-thief",
        json!({"steal": true, "file_id": secret}),
    )
    .await;
    assert_eq!(
        r.body["result"],
        json!({"stolen": true, "during_the_run": 200}),
        "{:?}",
        r.body
    );
    let r = call(&app, &bob, "nodejs-key-thief", json!({"file_id": secret})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["with_old_key"], 401, "{:?}", r.body);
}

/// Asks the files socket what no helper asks: a made-up key, no key, a
/// route of the public API that the socket does not serve, a path of
/// nothing.
const NODE_PROBE_SOCKET: &str = r#"
const http = require('http');
const fs = require('fs');
const path = require('path');
function raw(p, auth) {
  return new Promise((resolve) => {
    const socketPath = ['/run/runtime/files.sock', path.join(process.cwd(), 'files.sock')].find((f) => fs.existsSync(f));
    const req = http.request({ socketPath, path: p, headers: auth ? { Authorization: auth } : {} }, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => {
        let code = null;
        try { code = JSON.parse(body).error.code; } catch (e) { code = 'not JSON: ' + body.slice(0, 80); }
        resolve({ status: res.statusCode, code });
      });
    });
    req.on('error', (e) => resolve({ status: 'error ' + e.code }));
    req.end();
  });
}
exports.handler = async (params) => ({
  made_up: await raw('/api/v1/files/' + params.file_id, 'Bearer ' + 'f'.repeat(64)),
  malformed: await raw('/api/v1/files/' + params.file_id, 'Bearer not a key at all'),
  none: await raw('/api/v1/files/' + params.file_id, null),
  functions: await raw('/api/v1/functions', null),
  nothing: await raw('/no/such/route', null),
});
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_files_socket_answers_bad_keys_and_other_routes_with_the_contracts_errors() {
    let app = spawn_app().await;
    app.register("nodejs-probe-socket", NODE_PROBE_SOCKET, no_cache()).await;
    let token = app.admin();
    let up = upload(&app, &token, b"private".to_vec(), Some("p.txt")).await;
    let file_id = up.body["file_id"].as_str().unwrap().to_owned();

    let r = call(&app, &token, "nodejs-probe-socket", json!({"file_id": file_id})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seen = &r.body["result"];
    for key in ["made_up", "malformed", "none"] {
        assert_eq!(seen[key]["status"], 401, "{key}: {seen}");
        assert_eq!(seen[key]["code"], "UNAUTHORIZED", "{key}: {seen}");
    }
    // Only the files routes are on the socket: a run's key (or none)
    // reaches nothing else of the API.
    for key in ["functions", "nothing"] {
        assert_eq!(seen[key]["status"], 404, "{key}: {seen}");
        assert_eq!(seen[key]["code"], "NOT_FOUND", "{key}: {seen}");
    }
}

/// Copies a file (reading it whole) and answers the copy's sha256.
const NODE_COPY: &str = r#"
const crypto = require('crypto');
const { files } = require('fnrt');
exports.handler = async (params) => {
  const data = await files.read(params.file_id);
  const written = await files.write(data, { name: 'copy.bin' });
  return { file_id: written.file_id, sha256: crypto.createHash('sha256').update(data).digest('hex'), size: data.length };
};
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_20_mb_file_goes_through_steps_by_reference_and_the_controller_never_holds_it() {
    use sha2::{Digest, Sha256};
    let app = crate::helpers::spawn_binary();
    let token = app.admin();
    app.register("nodejs-copy", NODE_COPY, no_cache()).await;
    let r = app
        .post_function(json!({
            "language_title": "pipeline-copy-twice",
            "description": "copies a file, then copies the copy",
            "steps": [
                {"name": "first", "function": "nodejs-copy", "params": {"file_id": "$.params.file_id"}},
                {"name": "second", "function": "nodejs-copy", "params": {"file_id": "$.steps.first.output.file_id"}},
            ],
        }))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    // Warm: instances started, the controller's buffers allocated.
    let small = upload(&app, &token, b"warm".to_vec(), None).await;
    let r = call(
        &app,
        &token,
        "pipeline-copy-twice",
        json!({"file_id": small.body["file_id"]}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    let controller = app.controller_pid();
    let before = crate::sandbox::vm_rss_kib(controller);
    let big: Vec<u8> = (0..20 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let digest = hex::encode(Sha256::digest(&big));
    let (r, peak) = crate::sandbox::peak_rss_during(controller, async {
        let up = upload(&app, &token, big, Some("big.bin")).await;
        assert_eq!(up.status, 201, "{:?}", up.body);
        call(
            &app,
            &token,
            "pipeline-copy-twice",
            json!({"file_id": up.body["file_id"]}),
        )
        .await
    })
    .await;

    assert_eq!(r.status, 200, "{:?}", r.body);
    for step in r.body["steps"].as_array().unwrap() {
        assert_eq!(step["output"]["sha256"], digest.as_str(), "{step}");
        assert_eq!(step["output"]["size"], 20 * 1024 * 1024);
    }
    // 60 MiB went in and out of the controller (the upload, two reads, two
    // writes); it never held as much as one file.
    let grew = peak.saturating_sub(before);
    eprintln!("controller RSS {before} KiB, peak {peak} KiB while moving 20 MiB");
    assert!(
        grew < 16 * 1024,
        "the controller grew by {grew} KiB (from {before} KiB) while moving a 20 MiB file"
    );
}
