//! Multi-file functions (packages) through the API: a Python package with
//! relative imports and a template beside its code, a Node function that
//! requires its own modules, binary files, archives (zip and tar.gz) and
//! the archives an attacker sends (`..`, links, a compression bomb), and
//! the wall between one package's files and another function's instances.

use base64::Engine as _;
use serde_json::{Value, json};

use crate::helpers::{Reply, TestApp, read, spawn_app, spawn_app_with, tar_gz_of, zip_of};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Registers `files` as `language_title` and runs it once with `params`.
async fn run_package(app: &TestApp, language_title: &str, files: Value, extra: Value, params: Value) -> Reply {
    let mut body = json!({
        "language_title": language_title,
        "description": "a package",
        "files": files,
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let registered = app.post_function(body).await;
    assert_eq!(registered.status, 201, "{:?}", registered.body);
    let token = app.admin();
    let id = app.session(&token, language_title, json!({})).await;
    app.execute(&token, &id, params).await
}

const REPORT_MAIN: &str = r#"import hashlib
from pathlib import Path

from . import storage
from .format import title_case

ROOT = Path(__file__).resolve().parent.parent


def handler(params, context):
    template = (ROOT / "templates" / "page.html").read_text()
    logo = (ROOT / "static" / "logo.bin").read_bytes()
    return {
        "page": template.replace("{{ name }}", title_case(params["name"])),
        "stored": storage.value(),
        "logo_sha256": hashlib.sha256(logo).hexdigest(),
        "module": __name__,
    }
"#;

fn report_files() -> Value {
    json!({
        "report/__init__.py": "",
        "report/main.py": REPORT_MAIN,
        "report/storage.py": "def value():\n    return 42\n",
        "report/format.py": "def title_case(s):\n    return s.title()\n",
        "templates/page.html": "<h1>Hello {{ name }}</h1>",
        "static/logo.bin": { "base64": B64.encode([0u8, 0x89, b'P', b'N', b'G', 0xff]) },
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_package_imports_its_modules_and_reads_files_beside_its_code() {
    let app = spawn_app().await;
    let r = run_package(
        &app,
        "python-pkg-report",
        report_files(),
        json!({ "entrypoint": "report/main.py" }),
        json!({ "name": "ada lovelace" }),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let result = &r.body["result"];
    assert_eq!(result["page"], "<h1>Hello Ada Lovelace</h1>");
    assert_eq!(result["stored"], 42);
    assert_eq!(result["module"], "report.main");
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest([0u8, 0x89, b'P', b'N', b'G', 0xff]))
    };
    assert_eq!(result["logo_sha256"], expected.as_str());

    // The detail says what it is; the same files again are one more version.
    let detail = app.get(Some(&app.admin()), "/api/v1/functions/python-pkg-report").await;
    assert_eq!(detail.status, 200);
    assert_eq!(detail.body["version"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_package_requires_its_own_modules() {
    let app = spawn_app().await;
    let files = json!({
        "index.js": "const { greet } = require('./lib/greet');\nmodule.exports.handler = async (p) => ({ text: greet(p.name) });\n",
        "lib/greet.js": "const fs = require('fs');\nconst path = require('path');\nconst word = fs.readFileSync(path.join(__dirname, 'greeting.txt'), 'utf8').trim();\nmodule.exports.greet = (n) => `${word}, ${n}!`;\n",
        "lib/greeting.txt": "Bonjour\n",
    });
    let r = run_package(&app, "nodejs-greeter", files, json!({}), json!({ "name": "Grace" })).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["text"], "Bonjour, Grace!");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_in_a_package_module_names_the_file_not_the_host_path() {
    let app = spawn_app().await;
    let files = json!({
        "main.py": "from helpers import explode\n\ndef handler(params, context):\n    return explode()\n",
        "helpers.py": "def explode():\n    raise ValueError('boom')\n",
    });
    let r = run_package(&app, "python-boom", files, json!({}), json!({})).await;
    assert_eq!(r.status, 500, "{:?}", r.body);
    let trace = r.body["error"]["details"]["stack_trace"].as_str().unwrap_or_default();
    assert!(trace.contains("helpers.py"), "{trace}");
    assert!(
        !trace.contains("/run/runtime") && !trace.contains("/instances/"),
        "{trace}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn archives_register_packages() {
    let app = spawn_app().await;
    let zip = zip_of(&[
        ("calc/__init__.py", b""),
        (
            "calc/main.py",
            b"from .ops import add\n\ndef handler(p, c):\n    return add(p['a'], p['b'])\n",
        ),
        ("calc/ops.py", b"def add(a, b):\n    return a + b\n"),
    ]);
    let body = json!({
        "language_title": "python-zipped", "description": "from a zip",
        "entrypoint": "calc/main.py", "archive": B64.encode(&zip),
    });
    assert_eq!(app.post_function(body).await.status, 201);
    let token = app.admin();
    let id = app.session(&token, "python-zipped", json!({})).await;
    let r = app.execute(&token, &id, json!({ "a": 2, "b": 40 })).await;
    assert_eq!(r.body["result"], 42, "{:?}", r.body);

    let tgz = tar_gz_of(
        &[
            (
                "./index.js",
                b"module.exports.handler = () => require('./data.json');\n",
            ),
            ("./data.json", b"{\"from\": \"tar\"}"),
        ],
        false,
    );
    let body = json!({
        "language_title": "nodejs-tarred", "description": "from a tar.gz", "archive": B64.encode(&tgz),
    });
    assert_eq!(app.post_function(body).await.status, 201);
    let id = app.session(&token, "nodejs-tarred", json!({})).await;
    let r = app.execute(&token, &id, json!({})).await;
    assert_eq!(r.body["result"], json!({ "from": "tar" }), "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_archives_are_refused_naming_the_entry_and_nothing_is_written() {
    let app = spawn_app().await;
    let marker = format!("fnrt-escaped-{}", uuid::Uuid::new_v4().simple());
    let escape = format!("../../../../../../../../tmp/{marker}");
    let register = |archive: Vec<u8>| json!({ "language_title": "python-hostile", "description": "x", "archive": B64.encode(archive) });

    let r = app
        .post_function(register(zip_of(&[("main.py", b""), (&escape, b"pwned")])))
        .await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"), "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&marker) && message.contains("'..'"), "{message}");

    let r = app.post_function(register(tar_gz_of(&[("main.py", b"")], true))).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"evil\"") && message.contains("symbolic link"),
        "{message}"
    );

    // 2 x 64 MiB of zeros, about 130 KiB compressed: past the 50 MiB limit.
    let zeros = vec![0u8; 64 * 1024 * 1024];
    let bomb = zip_of(&[("main.py", b""), ("a.bin", &zeros), ("b.bin", &zeros)]);
    assert!(bomb.len() < 1024 * 1024);
    let r = app.post_function(register(bomb)).await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("a.bin"),
        "{:?}",
        r.body
    );

    let r = app.post_function(register(b"not an archive".to_vec())).await;
    assert_eq!(r.status, 400, "{:?}", r.body);

    assert!(!std::path::Path::new("/tmp").join(&marker).exists());
    assert!(!app.data_dir.path().join(&marker).exists());
    assert_eq!(
        app.get(Some(&app.admin()), "/api/v1/functions/python-hostile")
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_packages_get_clear_errors() {
    let app = spawn_app_with(&["--max-package-files", "3"]).await;
    let cases = [
        (
            json!({ "files": { "lib.py": "" } }),
            "python-noentry",
            400,
            "is not one of the package's files",
        ),
        (
            json!({ "files": { "my-app/main.py": "" }, "entrypoint": "my-app/main.py" }),
            "python-dashed",
            400,
            "importable",
        ),
        (json!({ "files": { "a/../main.py": "" } }), "python-dots", 400, "'..'"),
        (
            json!({ "files": { "main.py": { "base64": "!!" } } }),
            "python-b64",
            400,
            "base64",
        ),
        (
            json!({ "files": { "main.py": "", "a.py": "", "b.py": "", "c.py": "" } }),
            "python-many",
            413,
            "MAX_PACKAGE_FILES",
        ),
        (
            json!({ "files": { "main.py": "" }, "code": "x" }),
            "python-both",
            400,
            "only one of",
        ),
        (
            json!({ "files": { "m.wat": { "base64": "AA==" } } }),
            "wasm-bin",
            400,
            "must be text",
        ),
    ];
    for (extra, name, status, expected) in cases {
        let mut body = json!({ "language_title": name, "description": "bad" });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = app.post_function(body).await;
        assert_eq!(r.status, status, "{name}: {:?}", r.body);
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{name}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn registrations_may_be_larger_than_other_bodies_up_to_the_package_limit() {
    let app = spawn_app_with(&["--max-body-bytes", "4096", "--max-package-mb", "1"]).await;
    // 100 KiB of text: over MAX_BODY_BYTES, within the package limit.
    let text = "x".repeat(100 * 1024);
    let files = json!({ "main.py": "def handler(p, c):\n    return len(open(__file__.replace('main.py', 'big.txt')).read())\n", "big.txt": text });
    let r = run_package(&app, "python-big", files, json!({}), json!({})).await;
    assert_eq!(r.body["result"], 100 * 1024, "{:?}", r.body);
    // Other routes keep their limit.
    let big_params = json!({ "params": { "x": "y".repeat(8192) } });
    let r = app
        .client
        .post(app.url("/api/v1/initialize"))
        .bearer_auth(app.admin())
        .header("Language-Title", "python-big")
        .json(&big_params)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Past the registration limit: 413 with the limit.
    let files = json!({ "main.py": "x", "big.txt": "x".repeat(2 * 1024 * 1024) });
    let r = app
        .post_function(json!({ "language_title": "python-huge", "description": "x", "files": files }))
        .await;
    assert_eq!(r.status, 413, "{:?}", r.body);
}

const SNOOP: &str = r##"import os


def handler(params, context):
    here = os.path.dirname(os.path.abspath(__file__))
    mine = sorted(os.listdir(here))
    found = []
    for top in ["/run", "/home", "/tmp", "/opt", "/var", "/srv", "/mnt"]:
        for root, dirs, files in os.walk(top):
            found += [os.path.join(root, f) for f in files if params["secret_name"] in f]
    try:
        with open(os.path.join(here, "main.py"), "a") as f:
            f.write("changed")
        write = "written"
    except OSError as e:
        write = type(e).__name__
    return {"mine": mine, "found": found, "write": write}
"##;

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_sees_only_its_own_package() {
    let app = spawn_app().await;
    let secret_name = format!("secret-{}.txt", uuid::Uuid::new_v4().simple());
    let victim = json!({
        "main.py": "def handler(p, c):\n    return 'victim'\n",
        secret_name.clone(): "api-key-of-the-victim",
    });
    let r = run_package(&app, "python-victim", victim, json!({}), json!({})).await;
    assert_eq!(r.body["result"], "victim");
    // The victim's instance stays warm while the snoop looks around.
    let snoop = json!({ "main.py": SNOOP, "notes.txt": "mine" });
    let r = run_package(
        &app,
        "python-snoop",
        snoop,
        json!({}),
        json!({ "secret_name": secret_name }),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["mine"], json!(["main.py", "notes.txt"]));
    assert_eq!(
        r.body["result"]["found"],
        json!([]),
        "another function's file is visible"
    );
    // Its own files are read-only to it.
    assert_eq!(r.body["result"]["write"], "PermissionError");
}

/// Initializes `language_title`, waiting while its dependencies install
/// in the background (503 `FUNCTION_NOT_READY`), at most `patience`.
async fn initialize_when_ready(app: &TestApp, language_title: &str, patience: std::time::Duration) -> String {
    let token = app.admin();
    let started = std::time::Instant::now();
    loop {
        let r = app.initialize(&token, language_title, json!({})).await;
        if r.status == 200 {
            return r.body["request_id"].as_str().unwrap().to_owned();
        }
        assert_eq!(
            (r.status, r.code()),
            (503, "FUNCTION_NOT_READY"),
            "{language_title}: {:?}",
            r.body
        );
        assert!(
            started.elapsed() < patience,
            "{language_title} not ready after {patience:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bundled_packages_answer_their_examples() {
    let app = spawn_app().await;
    let token = app.admin();
    for name in ["python-report", "python-wordcount", "nodejs-greeting-card"] {
        let manifest: Value = serde_json::from_slice(
            &std::fs::read(
                crate::helpers::repo_dir()
                    .join("functions")
                    .join(name)
                    .join("function.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let id = initialize_when_ready(&app, name, std::time::Duration::from_secs(180)).await;
        for example in manifest["examples"].as_array().unwrap() {
            let r = app.execute(&token, &id, example["request"]["params"].clone()).await;
            assert_eq!(r.status, 200, "{name}: {:?}", r.body);
            assert_eq!(
                r.body["result"], example["response"]["result"],
                "{name}: {}",
                example["description"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archive_uploads_as_multipart_form_data_with_its_manifest_beside_it() {
    let app = spawn_app().await;
    let zip = zip_of(&[
        ("shout/__init__.py", b""),
        (
            "shout/main.py",
            b"from .words import loud\n\ndef handler(p, c):\n    return loud(p['text'])\n",
        ),
        ("shout/words.py", b"def loud(s):\n    return s.upper() + '!'\n"),
    ]);
    let manifest = json!({
        "description": "Shouts",
        "entrypoint": "shout/main.py",
        "schema": { "params": { "type": "object", "required": ["text"] } },
    });
    let form = reqwest::multipart::Form::new()
        .text("language_title", "python-shout")
        .text("manifest", manifest.to_string())
        .text("limits", r#"{"timeout_ms": 5000}"#)
        .part(
            "archive",
            reqwest::multipart::Part::bytes(zip)
                .file_name("shout.zip")
                .mime_str("application/zip")
                .unwrap(),
        );
    let r = read(
        app.client
            .post(app.url("/api/v1/functions"))
            .bearer_auth(app.admin())
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["limits"]["timeout_ms"], 5000);
    let token = app.admin();
    let id = app.session(&token, "python-shout", json!({})).await;
    assert_eq!(
        app.execute(&token, &id, json!({ "text": "hey" })).await.body["result"],
        "HEY!"
    );

    // Without the archive: a clear error.
    let form = reqwest::multipart::Form::new()
        .text("language_title", "python-shout-two")
        .text("description", "x");
    let r = read(
        app.client
            .post(app.url("/api/v1/functions"))
            .bearer_auth(app.admin())
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("'archive'"),
        "{:?}",
        r.body
    );
}

/// Where the controller wrote the files of the version with `code_hash`,
/// if anywhere: beside its instance directories, in the data dir or in
/// `/run/fnrt` (a data dir instance uids cannot pass through).
fn version_dir(app: &TestApp, code_hash: &str) -> Option<std::path::PathBuf> {
    let mut roots = vec![app.data_dir.path().join("packages")];
    if let Ok(entries) = std::fs::read_dir("/run/fnrt") {
        roots.extend(entries.flatten().map(|e| e.path().join("packages")));
    }
    roots
        .into_iter()
        .map(|root| root.join(code_hash))
        .find(|dir| dir.is_dir())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_files_of_a_deleted_function_are_removed_from_the_disk() {
    // Arrange: files no current version uses are kept 2 s.
    let app = spawn_app_with(&["--deps-keep-unused-secs", "2"]).await;
    let files = |n: u32| {
        json!({
            "main.py": "from pathlib import Path\n\ndef handler(p, c):\n    return int(Path(__file__).with_name('n.txt').read_text())\n",
            "n.txt": format!("{n}\n"),
        })
    };
    let mut dirs = Vec::new();
    for (lt, n) in [("python-pkg-gone", 1), ("python-pkg-kept", 2)] {
        let r = run_package(&app, lt, files(n), json!({}), json!({})).await;
        assert_eq!(r.body["result"], n, "{:?}", r.body);
        let details = app.get(Some(&app.admin()), &format!("/api/v1/functions/{lt}")).await;
        let hash = details.body["code_hash"].as_str().unwrap().to_owned();
        let dir = version_dir(&app, &hash).unwrap_or_else(|| panic!("no files written for {lt}"));
        dirs.push(dir);
    }

    // Act: delete one of them.
    let r = app
        .client
        .delete(app.url("/api/v1/functions/python-pkg-gone"))
        .bearer_auth(app.admin())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    // Assert: its files go; the other's stay, and it still runs.
    let gone = crate::helpers::eventually(std::time::Duration::from_secs(20), || !dirs[0].exists()).await;
    assert!(gone, "{} is still there", dirs[0].display());
    assert!(dirs[1].is_dir());
    let token = app.admin();
    let id = app.session(&token, "python-pkg-kept", json!({})).await;
    assert_eq!(app.execute(&token, &id, json!({})).await.body["result"], 2);
}
