//! Third-party dependencies of packages, installed at registration through
//! the API: a Python function rendering a template with jinja2, a Node
//! function using an npm package, one install for two functions with the
//! same requirements, a dependency that does not exist, an install that
//! outlives its timeout, Pillow resizing an image sent as base64, and the
//! walls of an install: an npm install script and a `setup.py` that go
//! looking for the controller's secrets and the host's loopback services,
//! and a download from the host's loopback; what an install takes on disk,
//! counted against its owner's quota and removed once no function uses it.
//!
//! These reach PyPI and the npm registry, as a user's registration would.

use std::io::Write;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{Reply, TestApp, eventually, spawn_app, spawn_app_with, tar_gz_of, zip_of};
use crate::sandbox::processes_with_cmdline;
use fnrt_core::function::package::DependencyFiles;

async fn register(app: &TestApp, language_title: &str, files: Value, extra: Value) -> Reply {
    let mut body = json!({ "language_title": language_title, "description": "with dependencies", "files": files });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    app.post_function(body).await
}

async fn run(app: &TestApp, language_title: &str, params: Value) -> Reply {
    let token = app.admin();
    let id = app.session(&token, language_title, json!({})).await;
    app.execute(&token, &id, params).await
}

/// The value of a `lambda_dependency_installs_total` series, 0 if absent.
fn installs(metrics: &str, language: &str, result: &str) -> u64 {
    let series = format!("lambda_dependency_installs_total{{language=\"{language}\",result=\"{result}\"}}");
    crate::helpers::sample(metrics, &series).map_or(0, |v| v as u64)
}

const REPORT: &str = r#"from pathlib import Path

import jinja2

TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"))


def handler(params, context):
    page = TEMPLATES.get_template("report.html").render(items=params["items"])
    return {"html": page, "jinja2": jinja2.__version__, "from": jinja2.__file__.split("/")[-3]}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn python_requirements_are_installed_once_and_used_by_the_function() {
    let app = spawn_app().await;
    // Tests share installs (a directory per machine): a set of this run's own.
    let requirements = format!("# {}\njinja2==3.1.6\n", uuid::Uuid::new_v4());
    let files = json!({
        "main.py": REPORT,
        "requirements.txt": requirements,
        "templates/report.html": "<ul>{% for i in items %}<li>{{ i | upper }}</li>{% endfor %}</ul>",
    });
    let r = register(&app, "python-jinja", files.clone(), json!({})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["build"]["state"], "ready", "{:?}", r.body);

    let r = run(&app, "python-jinja", json!({ "items": ["a", "b"] })).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["html"], "<ul><li>A</li><li>B</li></ul>");
    assert_eq!(r.body["result"]["jinja2"], "3.1.6");
    // Its own install, not a copy of jinja2 the host happens to have.
    assert_eq!(r.body["result"]["from"], "deps");

    // Another function with the same requirements: no second install.
    let mut other = files.clone();
    other["templates/report.html"] = json!("<ul>{% for i in items %}<li>{{ i | lower }}</li>{% endfor %}</ul>");
    let r = register(&app, "python-jinja-two", other, json!({})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let metrics = app.metrics().await;
    assert_eq!(installs(&metrics, "python", "installed"), 1, "{metrics}");
    assert_eq!(installs(&metrics, "python", "reused"), 1, "{metrics}");
    let r = run(&app, "python-jinja-two", json!({ "items": ["C"] })).await;
    assert_eq!(r.body["result"]["html"], "<ul><li>c</li></ul>", "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_npm_dependency_is_installed_and_required() {
    let app = spawn_app().await;
    let files = json!({
        "index.js": "const Mustache = require('mustache');\nmodule.exports.handler = async (p) => ({ text: Mustache.render('Hi {{name}}!', p) });\n",
        "package.json": r#"{ "name": "greeter", "version": "1.0.0", "dependencies": { "mustache": "4.2.0" } }"#,
    });
    let r = register(&app, "nodejs-mustache", files, json!({})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["build"]["state"], "ready");
    let r = run(&app, "nodejs-mustache", json!({ "name": "Ada" })).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["text"], "Hi Ada!");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dependency_that_does_not_exist_is_a_build_failure_with_pips_message() {
    let app = spawn_app().await;
    let files = json!({
        "main.py": "def handler(p, c):\n    return 1\n",
        "requirements.txt": "fnrt-no-such-package-4f1c2a==1.0\n",
    });
    let r = register(&app, "python-missing-dep", files, json!({})).await;
    assert_eq!((r.status, r.code()), (422, "BUILD_FAILED"), "{:?}", r.body);
    let messages = r.body["error"]["details"]["messages"].to_string();
    assert!(messages.contains("No matching distribution"), "{messages}");
    assert_eq!(
        app.get(Some(&app.admin()), "/api/v1/functions/python-missing-dep")
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_install_past_its_timeout_is_stopped_and_refused() {
    // A download of most of a gigabyte: far longer than two seconds.
    let app = spawn_app_with(&["--deps-install-timeout-secs", "2"]).await;
    let marker = format!("{}", uuid::Uuid::new_v4().simple());
    let files = json!({
        "main.py": "def handler(p, c):\n    return 1\n",
        "requirements.txt": format!("# {marker}\ntorch==2.5.1\n"),
    });
    // Its install's work directory is named after its key.
    let package = serde_json::from_value(files.clone()).unwrap();
    let key = DependencyFiles::of(fnrt_core::language::Language::Python, &package, false)
        .unwrap()
        .key()
        .to_owned();
    let r = register(&app, "python-slow-dep", files, json!({})).await;
    assert_eq!((r.status, r.code()), (422, "BUILD_FAILED"), "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("DEPS_INSTALL_TIMEOUT_SECS") && message.contains("stopped"),
        "{message}"
    );
    // pip is gone, not left downloading; so is its work directory.
    let gone = eventually(Duration::from_secs(5), || {
        processes_with_cmdline("pip").iter().all(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            !String::from_utf8_lossy(&cmdline).contains(&key[..16])
        })
    })
    .await;
    assert!(gone, "pip still runs");
}

/// Serves `body` to every request on `listener`, counting connections.
fn serve(
    listener: tokio::net::TcpListener,
    body: Vec<u8>,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 8192];
                let _ = socket.read(&mut request).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
            });
        }
    });
    (seen, task)
}

/// What an install script looks for (JavaScript): the controller's secrets
/// and database, its environment, `/etc/shadow`, and the host's loopback
/// (Redis, PostgreSQL, the controller's port).
fn snoop_js(data_dir: &str, controller_pid: u32, controller_port: u16) -> String {
    format!(
        r#"const fs = require('fs');
const net = require('net');
const found = {{ uid: process.getuid() }};
for (const [name, path] of [
  ['jwt_secret', '{data_dir}/jwt-secret'],
  ['database', '{data_dir}/controller.db'],
  ['environ', '/proc/{controller_pid}/environ'],
  ['shadow', '/etc/shadow'],
]) {{
  try {{ found[name] = fs.readFileSync(path).length > 0 ? 'read' : 'empty'; }} catch (e) {{ found[name] = e.code; }}
}}
found.fds = {{}};
for (const fd of fs.readdirSync('/proc/self/fd')) {{
  try {{ found.fds[fd] = fs.readlinkSync('/proc/self/fd/' + fd); }} catch (e) {{}}
}}
const ports = [6379, 5432, {controller_port}];
let pending = ports.length;
for (const port of ports) {{
  const s = net.connect(port, '127.0.0.1');
  const end = (result) => {{
    found['port_' + port] = result;
    if (--pending === 0) fs.writeFileSync(__dirname + '/found.json', JSON.stringify(found));
  }};
  s.on('connect', () => {{ s.destroy(); end('connected'); }});
  s.on('error', (e) => end(e.code));
}}
"#
    )
}

/// Asserts that a snoop found nothing: not root, no secret read, no port,
/// no descriptor of the controller's.
fn assert_found_nothing(found: &Value, ports: &[u16]) {
    assert_ne!(found["uid"], 0, "{found}");
    let fds = found["fds"].as_object().expect("the descriptors it listed");
    let inherited = crate::helpers::descriptors_not_its_own(
        fds.iter().map(|(fd, t)| (fd.as_str(), t.as_str().unwrap_or_default())),
    );
    assert!(inherited.is_empty(), "inherited {inherited:?} of {fds:?}");
    for secret in ["jwt_secret", "database", "environ", "shadow"] {
        let result = found[secret].as_str().unwrap_or_default();
        assert!(
            result != "read" && result != "empty" && !result.is_empty(),
            "{secret}: {found}"
        );
    }
    for port in ports {
        let result = &found[format!("port_{port}")];
        assert!(result.is_string() && result != "connected", "port {port}: {found}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_npm_install_script_finds_no_secrets_and_no_network() {
    let app = spawn_app().await;
    let data_dir = app.data_dir.path().display().to_string();
    let port = url_port(&app);
    // The in-process app is this test process.
    let script = snoop_js(&data_dir, std::process::id(), port);
    let tarball = tar_gz_of(
        &[
            (
                "package/package.json",
                br#"{ "name": "snoop", "version": "1.0.0", "scripts": { "postinstall": "node snoop.js" } }"#,
            ),
            ("package/snoop.js", script.as_bytes()),
            ("package/index.js", b"module.exports = require('./found.json');\n"),
        ],
        false,
    );
    use base64::Engine as _;
    let files = json!({
        "index.js": "module.exports.handler = async () => require('snoop');\n",
        "package.json": r#"{ "name": "victim", "version": "1.0.0", "dependencies": { "snoop": "file:vendor/snoop.tgz" } }"#,
        "vendor/snoop.tgz": { "base64": base64::engine::general_purpose::STANDARD.encode(&tarball) },
    });
    let r = register(&app, "nodejs-snoop", files, json!({ "install": { "scripts": true } })).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = run(&app, "nodejs-snoop", json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_found_nothing(&r.body["result"], &[6379, 5432, port]);
}

/// The port the app listens on.
fn url_port(app: &TestApp) -> u16 {
    app.url("/")
        .split(':')
        .nth(2)
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_never_reaches_the_hosts_loopback() {
    let app = spawn_app().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tarball = tar_gz_of(
        &[("package/package.json", br#"{ "name": "x", "version": "1.0.0" }"#)],
        false,
    );
    let (seen, server) = serve(listener, tarball);
    let files = json!({
        "index.js": "module.exports.handler = async () => 1;\n",
        "package.json": format!(r#"{{ "name": "v", "version": "1.0.0", "dependencies": {{ "x": "http://127.0.0.1:{port}/x.tgz" }} }}"#),
    });
    let r = register(&app, "nodejs-loopback", files, json!({})).await;
    assert_eq!((r.status, r.code()), (422, "BUILD_FAILED"), "{:?}", r.body);
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the install reached the host's loopback"
    );
    server.abort();
}

/// A source distribution whose `setup.py` looks for what the npm snoop
/// looks for and installs what it found as the module `evil_found`.
fn evil_sdist(data_dir: &str, controller_pid: u32, controller_port: u16) -> Vec<u8> {
    let setup = format!(
        r#"import json, os, socket
from setuptools import setup

found = {{"uid": os.getuid()}}
for name, path in [("jwt_secret", "{data_dir}/jwt-secret"), ("database", "{data_dir}/controller.db"),
                   ("environ", "/proc/{controller_pid}/environ"), ("shadow", "/etc/shadow")]:
    try:
        with open(path, "rb") as f:
            found[name] = "read" if f.read() else "empty"
    except OSError as e:
        found[name] = type(e).__name__
found["fds"] = {{}}
for fd in os.listdir("/proc/self/fd"):
    try:
        found["fds"][fd] = os.readlink("/proc/self/fd/" + fd)
    except OSError:
        pass
for port in [6379, 5432, {controller_port}]:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        found["port_%d" % port] = "connected"
    except OSError as e:
        found["port_%d" % port] = type(e).__name__
with open("evil_found.py", "w") as f:
    f.write("FOUND = %r\n" % json.dumps(found))
setup(name="evil", version="1.0", py_modules=["evil_found"])
"#
    );
    let pkg_info = b"Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n";
    tar_gz_of(
        &[("evil-1.0/setup.py", setup.as_bytes()), ("evil-1.0/PKG-INFO", pkg_info)],
        false,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_setup_py_finds_no_secrets_and_not_the_hosts_loopback() {
    use base64::Engine as _;
    let app = spawn_app().await;
    let data_dir = app.data_dir.path().display().to_string();
    let port = url_port(&app);
    let sdist = evil_sdist(&data_dir, std::process::id(), port);
    let files = json!({
        "main.py": "import json\nimport evil_found\n\ndef handler(p, c):\n    return json.loads(evil_found.FOUND)\n",
        "requirements.txt": "./vendor/evil-1.0.tar.gz\n",
        "vendor/evil-1.0.tar.gz": { "base64": base64::engine::general_purpose::STANDARD.encode(&sdist) },
    });
    // Without install.scripts, a source distribution is refused.
    let r = register(&app, "python-evil-refused", files.clone(), json!({})).await;
    assert_eq!((r.status, r.code()), (422, "BUILD_FAILED"), "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("built from source"),
        "{:?}",
        r.body
    );
    // With it, setup.py runs, walled in.
    let r = register(&app, "python-evil", files, json!({ "install": { "scripts": true } })).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = run(&app, "python-evil", json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_found_nothing(&r.body["result"], &[6379, 5432, port]);
}

/// A PNG of `width` x `height` RGB pixels, all one colour.
fn png(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend(kind);
        out.extend(data);
        out.extend(crc.sum().to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, no interlace
    // Each row: filter type 0 (none), then the pixels.
    let row: Vec<u8> = std::iter::once(0u8)
        .chain(std::iter::repeat_n([200u8, 30, 30], width as usize).flatten())
        .collect();
    let rows = row.repeat(height as usize);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&rows).unwrap();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z.finish().unwrap());
    chunk(&mut out, b"IEND", &[]);
    out
}

/// The width and height a PNG's header says.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let word = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (word(16), word(20))
}

const RESIZE: &str = r#"import base64
import io

from PIL import Image


def handler(params, context):
    image = Image.open(io.BytesIO(base64.b64decode(params["image"])))
    width = params["width"]
    height = round(image.height * width / image.width)
    out = io.BytesIO()
    image.resize((width, height)).save(out, "PNG")
    return {"image": base64.b64encode(out.getvalue()).decode()}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_pillow_function_resizes_an_image_sent_as_base64() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let app = spawn_app().await;
    let files = json!({ "main.py": RESIZE, "requirements.txt": "Pillow>=10,<12\n" });
    let r = register(&app, "python-resize", files, json!({})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = run(
        &app,
        "python-resize",
        json!({ "image": b64.encode(png(40, 20)), "width": 10 }),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let resized = b64.decode(r.body["result"]["image"].as_str().unwrap()).unwrap();
    assert_eq!(png_size(&resized), (10, 5));
}

/// A pure-Python wheel of the module `tinyoffline` (`VALUE = 42`).
fn tiny_wheel() -> Vec<u8> {
    wheel_of("tinyoffline", &[("tinyoffline/__init__.py", b"VALUE = 42\n")])
}

/// A pure-Python wheel of `name` 1.0 holding `files`.
fn wheel_of(name: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
    let info = format!("{name}-1.0.dist-info");
    let metadata = format!("Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n");
    let wheel = b"Wheel-Version: 1.0\nGenerator: fnrt-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n";
    let mut listed: Vec<String> = files.iter().map(|(path, _)| path.to_string()).collect();
    listed.extend(["METADATA", "WHEEL", "RECORD"].map(|f| format!("{info}/{f}")));
    let record: String = listed.iter().map(|path| format!("{path},,\n")).collect();
    let (metadata_path, wheel_path, record_path) = (
        format!("{info}/METADATA"),
        format!("{info}/WHEEL"),
        format!("{info}/RECORD"),
    );
    let mut entries: Vec<(&str, &[u8])> = files.to_vec();
    entries.push((&metadata_path, metadata.as_bytes()));
    entries.push((&wheel_path, wheel));
    entries.push((&record_path, record.as_bytes()));
    zip_of(&entries)
}

/// A directory of wheels, readable by installs, for `--deps-pip-wheels-dir`.
fn wheel_dir(wheels: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("fnrt-wheels")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, bytes) in wheels {
        let wheel = dir.path().join(format!("{name}-1.0-py3-none-any.whl"));
        std::fs::write(&wheel, bytes).unwrap();
        std::fs::set_permissions(&wheel, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn an_air_gapped_site_installs_from_a_wheel_directory_alone() {
    let wheels = wheel_dir(&[("tinyoffline", tiny_wheel())]);
    let dir = wheels.path().display().to_string();
    let app = spawn_app_with(&["--deps-pip-wheels-dir", &dir]).await;
    let marker = uuid::Uuid::new_v4().simple().to_string();

    let files = json!({
        "main.py": "import tinyoffline\n\ndef handler(p, c):\n    return tinyoffline.VALUE\n",
        "requirements.txt": format!("# {marker}\ntinyoffline==1.0\n"),
    });
    let r = register(&app, "python-offline", files, json!({})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(run(&app, "python-offline", json!({})).await.body["result"], 42);

    // What the directory does not hold is not fetched from anywhere.
    let files = json!({
        "main.py": "def handler(p, c):\n    return 1\n",
        "requirements.txt": format!("# {marker}\njinja2==3.1.6\n"),
    });
    let r = register(&app, "python-not-offline", files, json!({})).await;
    assert_eq!((r.status, r.code()), (422, "BUILD_FAILED"), "{:?}", r.body);
}

const SHARP_RESIZE: &str = r#"const sharp = require('sharp');
module.exports.handler = async (p) => {
  const out = await sharp(Buffer.from(p.image, 'base64')).resize({ width: p.width }).png().toBuffer();
  return { image: out.toString('base64') };
};
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_native_npm_package_with_prebuilt_binaries_resizes_an_image() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let app = spawn_app().await;
    let files = json!({
        "index.js": SHARP_RESIZE,
        "package.json": r#"{ "name": "resize", "version": "1.0.0", "dependencies": { "sharp": "0.33.5" } }"#,
    });
    let r = register(&app, "nodejs-sharp", files, json!({})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = run(
        &app,
        "nodejs-sharp",
        json!({ "image": b64.encode(png(40, 20)), "width": 10 }),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let resized = b64.decode(r.body["result"]["image"].as_str().unwrap()).unwrap();
    assert_eq!(png_size(&resized), (10, 5));
}

/// Registers `language_title`, a Node function that depends on a package
/// whose `postinstall` runs `script` (with `install.scripts`); the reply.
/// The set is one of its own each time: installs are shared by what they
/// install, and kept across runs here.
async fn register_with_postinstall(app: &TestApp, language_title: &str, script: &[u8]) -> Reply {
    let tarball = tar_gz_of(
        &[
            (
                "package/package.json",
                br#"{ "name": "scripted", "version": "1.0.0", "scripts": { "postinstall": "node script.js" } }"#,
            ),
            ("package/script.js", script),
        ],
        false,
    );
    use base64::Engine as _;
    let package_json = format!(
        r#"{{ "name": "victim", "version": "1.0.0", "description": "{}", "dependencies": {{ "scripted": "file:vendor/scripted.tgz" }} }}"#,
        uuid::Uuid::new_v4()
    );
    let files = json!({
        "index.js": "module.exports.handler = async () => 1;\n",
        "package.json": package_json,
        "vendor/scripted.tgz": { "base64": base64::engine::general_purpose::STANDARD.encode(&tarball) },
    });
    register(app, language_title, files, json!({ "install": { "scripts": true } })).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_install_script_that_takes_more_memory_than_an_install_may_is_stopped_and_says_so() {
    let app = spawn_app_with(&["--build-memory-mb", "256"]).await;
    // Act: a postinstall script that fills 1 GiB, four times what an
    // install may use.
    let r = register_with_postinstall(
        &app,
        "nodejs-install-hog",
        b"const hog = Buffer.alloc(1 << 30, 1);\nsetTimeout(() => console.log(hog[hog.length - 1]), 200);\n",
    )
    .await;

    // Assert: refused, saying which limit stopped the install.
    assert_eq!((r.status, r.code()), (422, "BUILD_FAILED"), "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("ran out of memory"), "{message}");
    assert!(message.contains("256 MiB (BUILD_MEMORY_MB)"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_install_script_that_fills_the_disk_is_stopped_past_the_limit() {
    let app = spawn_app_with(&["--build-disk-mb", "64"]).await;
    // Act: a postinstall script that writes 1 GiB beside itself, 1 MiB
    // every 10 ms.
    let r = register_with_postinstall(
        &app,
        "nodejs-install-filler",
        b"const fs = require('fs');\nconst fd = fs.openSync(__dirname + '/fill', 'w');\nconst chunk = Buffer.alloc(1 << 20, 1);\n\
          let n = 0;\nconst step = () => { fs.writeSync(fd, chunk); if (++n < 1024) setTimeout(step, 10); };\nstep();\n",
    )
    .await;

    // Assert: refused, saying which limit stopped the install.
    assert_eq!((r.status, r.code()), (422, "BUILD_FAILED"), "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("(BUILD_DISK_MB)"), "{message}");
}

/// A function of `marker`'s own set: `bigdep` (2 MiB installed) from the
/// test's wheel directory, and `n` in its code.
fn with_bigdep(marker: &str, n: u32) -> Value {
    json!({
        "main.py": format!("import bigdep\n\ndef handler(p, c):\n    return [{n}, len(bigdep.BLOB)]\n"),
        "requirements.txt": format!("# {marker}\nbigdep==1.0\n"),
    })
}

/// A controller whose pip installs from a directory holding bigdep's wheel
/// (kept while the returned directory lives), with 3 MiB a subject.
async fn with_bigdep_wheel_and_a_quota_of_3_mib() -> (tempfile::TempDir, TestApp) {
    let wheels = wheel_dir(&[("bigdep", bigdep_wheel())]);
    let app = spawn_app_with(&[
        "--deps-pip-wheels-dir",
        &wheels.path().display().to_string(),
        "--functions-quota-mb",
        "3",
    ])
    .await;
    (wheels, app)
}

fn bigdep_wheel() -> Vec<u8> {
    let init = b"from pathlib import Path\n\nBLOB = (Path(__file__).parent / 'blob.bin').read_bytes()\n";
    let blob = vec![b'x'; 2 << 20];
    wheel_of("bigdep", &[("bigdep/__init__.py", init), ("bigdep/blob.bin", &blob)])
}

#[tokio::test(flavor = "multi_thread")]
async fn what_an_install_takes_counts_against_its_owners_quota_once_per_function() {
    // Arrange: 3 MiB a subject; a dependency of 2 MiB installed, a few
    // hundred bytes of code.
    let (_wheels, app) = with_bigdep_wheel_and_a_quota_of_3_mib().await;
    let alice = app.token("alice", &["read:functions", "write:functions", "execute:python"]);
    let post = async |lt: &str, files: Value| {
        let body = json!({"language_title": lt, "description": "big dependency", "files": files});
        crate::functions::call(&app, reqwest::Method::POST, "/api/v1/functions", &alice, Some(body)).await
    };

    let (one, two) = (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
    let first = post("python-bigdep-a", with_bigdep(&one, 1)).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    // A new version on the same set is charged its code only.
    let body =
        json!({"language_title": "python-bigdep-a", "description": "big dependency", "files": with_bigdep(&one, 2)});
    let second = crate::functions::put_function(&app, &alice, "python-bigdep-a", body).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    let id = app.session(&alice, "python-bigdep-a", json!({})).await;
    let r = app.execute(&alice, &id, json!({})).await;
    assert_eq!(r.body["result"], json!([2, 2 << 20]), "{:?}", r.body);

    // Act: another function installing another 2 MiB.
    let other = post("python-bigdep-b", with_bigdep(&two, 3)).await;

    // Assert: refused for the quota, which the install would pass.
    assert_eq!(
        (other.status, other.code()),
        (413, "INVALID_REQUEST"),
        "{:?}",
        other.body
    );
    let message = other.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("quota of 3145728 bytes") && message.contains("dependencies"),
        "{message}"
    );
    // A function without dependencies still fits.
    let small = post("python-small", json!({"main.py": "def handler(p, c):\n    return 1\n"})).await;
    assert_eq!(small.status, 201, "{:?}", small.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_version_that_brought_an_install_leaves_it_charged_to_the_current_version() {
    // Arrange: 3 MiB a subject; version 1 brought a 2 MiB install that
    // version 2 shares (charged its code only).
    let (_wheels, app) = with_bigdep_wheel_and_a_quota_of_3_mib().await;
    let alice = app.token("alice", &["read:functions", "write:functions", "execute:python"]);
    let body = |lt: &str, files: Value| json!({"language_title": lt, "description": "big dependency", "files": files});
    let call = async |method: reqwest::Method, path: &str, body: Option<Value>| {
        crate::functions::call(&app, method, path, &alice, body).await
    };
    let (one, two) = (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
    let first = call(
        reqwest::Method::POST,
        "/api/v1/functions",
        Some(body("python-shared-a", with_bigdep(&one, 1))),
    )
    .await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let second = crate::functions::put_function(
        &app,
        &alice,
        "python-shared-a",
        body("python-shared-a", with_bigdep(&one, 2)),
    )
    .await;
    assert_eq!(second.status, 200, "{:?}", second.body);

    // Act: version 1 goes.
    let deleted = call(
        reqwest::Method::DELETE,
        "/api/v1/functions/python-shared-a/versions/1",
        None,
    )
    .await;

    // Assert: version 2 now carries the install's charge, so another 2 MiB
    // install is still refused; version 2 still runs with it.
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    let listed = call(reqwest::Method::GET, "/api/v1/functions/python-shared-a/versions", None).await;
    assert_eq!(listed.body["total"], 1, "{:?}", listed.body);
    let size = listed.body["versions"][0]["size_bytes"].as_i64().unwrap();
    assert!(
        size > 2 << 20,
        "the install's charge went with version 1: {:?}",
        listed.body
    );
    let other = call(
        reqwest::Method::POST,
        "/api/v1/functions",
        Some(body("python-shared-b", with_bigdep(&two, 3))),
    )
    .await;
    assert_eq!(other.status, 413, "{:?}", other.body);
    let id = app.session(&alice, "python-shared-a", json!({})).await;
    let r = app.execute(&alice, &id, json!({})).await;
    assert_eq!(r.body["result"], json!([2, 2 << 20]), "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_install_no_function_uses_is_removed_and_installed_again_when_needed() {
    // Arrange: installs of its own (others' tests keep theirs), kept 2 s
    // once no current version uses them.
    let wheels = wheel_dir(&[("bigdep", bigdep_wheel())]);
    let deps = tempfile::Builder::new()
        .prefix("fnrt-deps")
        .tempdir_in("/var/tmp")
        .unwrap();
    let app = spawn_app_with(&[
        "--deps-pip-wheels-dir",
        &wheels.path().display().to_string(),
        "--deps-dir",
        &deps.path().display().to_string(),
        "--deps-keep-unused-secs",
        "2",
    ])
    .await;
    // The installs of `bigdep` (the bundled functions' are there too).
    let installs = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(deps.path())
            .unwrap()
            .flatten()
            .filter(|e| e.path().join("bigdep").is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let (gone, kept) = (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
    for (lt, marker) in [("python-deps-gone", &gone), ("python-deps-kept", &kept)] {
        let r = register(&app, lt, with_bigdep(marker, 1), json!({})).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    let both = installs();
    assert_eq!(both.len(), 2, "{both:?}");

    // Act: delete one of the two functions.
    let token = app.admin();
    let deleted = crate::functions::call(
        &app,
        reqwest::Method::DELETE,
        "/api/v1/functions/python-deps-gone",
        &token,
        None,
    )
    .await;
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);

    // Assert: its install goes; the other's stays, and its function runs.
    let removed = eventually(Duration::from_secs(20), || installs().len() == 1).await;
    assert!(
        removed,
        "the deleted function's install is still there: {:?}",
        installs()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(installs().len(), 1, "{:?}", installs());
    assert_eq!(
        run(&app, "python-deps-kept", json!({})).await.body["result"],
        json!([1, 2 << 20])
    );
    // Registered again, the set is installed again.
    let again = register(&app, "python-deps-gone", with_bigdep(&gone, 2), json!({})).await;
    assert_eq!(again.status, 201, "{:?}", again.body);
    assert_eq!(
        run(&app, "python-deps-gone", json!({})).await.body["result"],
        json!([2, 2 << 20])
    );
    assert_eq!(installs(), both);
}
