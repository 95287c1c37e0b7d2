//! The build sandbox (reliability.md 35): a registered crate's `build.rs`
//! and a proc macro it uses run inside cargo, as code of whoever holds
//! `write:functions`. Both try to read the controller's secrets, write
//! outside their directory and reach the controller and Redis over
//! loopback; what each attempt gave is compiled into the function, which
//! the test then runs to read it.

use std::path::Path;

use reqwest::Method;
use serde_json::json;

use crate::functions::call;
use crate::helpers::spawn_app;

/// Rust source of `attempts()`, shared by the build script and the macro:
/// tries every read, write and connection and answers a JSON object of
/// what each gave, and of the descriptors it finds open (`"fd N"`).
const ATTEMPTS: &str = r#"
fn attempts() -> String {
    use std::io::Read;
    let mut out = Vec::new();
    for path in READS {
        let got = match std::fs::File::open(path) {
            Ok(mut f) => {
                let mut bytes = Vec::new();
                match f.read_to_end(&mut bytes) {
                    Ok(n) => format!("read {n} bytes"),
                    Err(e) => format!("error: {e}"),
                }
            }
            Err(e) => format!("error: {e}"),
        };
        out.push(format!("{:?}: {:?}", format!("read {path}"), got));
    }
    for path in WRITES {
        let got = match std::fs::write(path, "pwned") {
            Ok(()) => "wrote".to_string(),
            Err(e) => format!("error: {e}"),
        };
        out.push(format!("{:?}: {:?}", format!("write {path}"), got));
    }
    for addr in CONNECTS {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let got = match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) {
            Ok(_) => "connected".to_string(),
            Err(e) => format!("error: {e}"),
        };
        out.push(format!("{:?}: {:?}", format!("connect {addr}"), got));
    }
    // What it holds open, each as `"fd N": target`.
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let fd = format!("fd {}", entry.file_name().to_string_lossy());
            out.push(format!("{:?}: {:?}", fd, target.display().to_string()));
        }
    }
    format!("{{{}}}", out.join(","))
}
"#;

const LIB: &str = r#"
use fnrt_sdk::{Context, Error, export};

fn snoop(_params: serde_json::Value, _context: Context) -> Result<serde_json::Value, Error> {
    let build_rs: serde_json::Value =
        serde_json::from_str(include_str!(concat!(env!("OUT_DIR"), "/attempts.json"))).unwrap();
    let proc_macro: serde_json::Value = serde_json::from_str(snoop_macro::probe!()).unwrap();
    Ok(serde_json::json!({ "build_rs": build_rs, "proc_macro": proc_macro }))
}

export!(snoop);
"#;

fn rust_strings(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("&[{}]", quoted.join(", "))
}

/// Whether builds are walled in here (bubblewrap installed); without it a
/// test of the walls says it is skipped, and fails under CI, which installs it.
fn walled_builds() -> bool {
    let installed = ["/usr/bin/bwrap", "/usr/local/bin/bwrap"]
        .iter()
        .any(|p| Path::new(p).is_file());
    if !installed {
        assert!(std::env::var_os("CI").is_none(), "CI installs bubblewrap (.ci/run)");
        eprintln!("skipped: builds are walled in by bubblewrap, which is not installed");
    }
    installed
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_script_and_a_proc_macro_read_no_secret_write_nothing_outside_and_reach_no_loopback_service() {
    if !walled_builds() {
        return;
    }
    // Arrange: a controller with a secret file of its own, and a crate
    // whose build script and proc macro attack what is around them.
    let app = spawn_app().await;
    let data = app.data_dir.path();
    let secret = data.join("jwt-secret");
    std::fs::write(&secret, crate::helpers::SECRET).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let escape = format!("/var/tmp/fnrt-escape-{}", uuid::Uuid::new_v4());
    let sdk_file = crate::helpers::repo_dir().join("runtimes/rust/sdk/pwned");
    let port = app.address.rsplit(':').next().unwrap().to_owned();
    let reads = [
        secret.display().to_string(),
        data.join("controller.db").display().to_string(),
        // The controller runs in this test's process.
        format!("/proc/{}/environ", std::process::id()),
        "/etc/shadow".to_owned(),
        // Builds get a copy of the SDK: nothing of the repository (whose
        // folder may hold the data dir) is in their root.
        crate::helpers::repo_dir().join("Cargo.toml").display().to_string(),
    ];
    let writes = [
        data.join("pwned").display().to_string(),
        escape.clone(),
        sdk_file.display().to_string(),
    ];
    let connects = [format!("127.0.0.1:{port}"), "127.0.0.1:6379".to_owned()];
    let consts = format!(
        "const READS: &[&str] = {};\nconst WRITES: &[&str] = {};\nconst CONNECTS: &[&str] = {};\n",
        rust_strings(&reads),
        rust_strings(&writes),
        rust_strings(&connects)
    );
    let build_rs = format!(
        "{consts}{ATTEMPTS}\nfn main() {{\n    let out = std::env::var(\"OUT_DIR\").unwrap();\n    \
         std::fs::write(format!(\"{{out}}/attempts.json\"), attempts()).unwrap();\n}}\n"
    );
    let macro_rs = format!(
        "extern crate proc_macro;\nuse proc_macro::TokenStream;\n{consts}{ATTEMPTS}\n#[proc_macro]\n\
         pub fn probe(_: TokenStream) -> TokenStream {{\n    format!(\"{{:?}}\", attempts()).parse().unwrap()\n}}\n"
    );
    let files = json!({
        "Cargo.toml": "[package]\nname = \"snoop\"\nversion = \"0.1.0\"\nedition = \"2024\"\nbuild = \"build.rs\"\n\n\
                       [dependencies]\nfnrt-sdk = \"0.1\"\nserde_json = \"1\"\nsnoop-macro = { path = \"macro\" }\n",
        "build.rs": build_rs,
        "src/lib.rs": LIB,
        "macro/Cargo.toml": "[package]\nname = \"snoop-macro\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\nproc-macro = true\n",
        "macro/src/lib.rs": macro_rs,
    });

    // Act: register (the build runs now) and run what it compiled in.
    let body = json!({"language_title": "rust-snoop", "description": "attacks its build", "files": files});
    let registered = call(&app, Method::POST, "/api/v1/functions", &app.admin(), Some(body)).await;
    assert_eq!(
        registered.status, 201,
        "the build still reports its result: {:?}",
        registered.body
    );
    assert_eq!(registered.body["build"]["state"], "ready", "{:?}", registered.body);
    let token = app.admin();
    let id = app.session(&token, "rust-snoop", json!({})).await;
    let r = app.execute(&token, &id, json!({})).await;

    // Assert: every attempt failed, in both places, and nothing was written.
    assert_eq!(r.status, 200, "{:?}", r.body);
    for place in ["build_rs", "proc_macro"] {
        let found = r.body["result"][place]
            .as_object()
            .unwrap_or_else(|| panic!("{place}: {:?}", r.body));
        let (fds, attempts): (Vec<_>, Vec<_>) = found.iter().partition(|(k, _)| k.starts_with("fd "));
        assert_eq!(
            attempts.len(),
            reads.len() + writes.len() + connects.len(),
            "{attempts:?}"
        );
        for (attempt, got) in attempts {
            let got = got.as_str().unwrap_or_default();
            assert!(got.starts_with("error"), "{place}: {attempt} gave {got:?}");
        }
        // The build inherited nothing the controller holds open.
        assert!(!fds.is_empty(), "{place}: no descriptor listed: {found:?}");
        let inherited = crate::helpers::descriptors_not_its_own(
            fds.iter()
                .map(|(k, t)| (&k["fd ".len()..], t.as_str().unwrap_or_default())),
        );
        assert!(inherited.is_empty(), "{place}: inherited {inherited:?} of {fds:?}");
    }
    for path in writes {
        assert!(!Path::new(&path).exists(), "the build wrote {path}");
    }
}

/// What the tenant probe's build script did: it lists the builds' work
/// directories it can see and tries to write into another tenant's.
const TENANT_PROBE_LIB: &str = r#"
use fnrt_sdk::{Context, Error, export};

fn probe(_params: serde_json::Value, _context: Context) -> Result<serde_json::Value, Error> {
    Ok(serde_json::from_str(include_str!(concat!(env!("OUT_DIR"), "/seen.json"))).unwrap())
}

export!(probe);
"#;

/// Builds of one subject's functions never see another's: their sources,
/// compiled dependencies and downloaded crates are in a work directory of
/// that subject's, which a build script of someone else cannot read or
/// change (it would otherwise put its code into the other's next build).
#[tokio::test(flavor = "multi_thread")]
async fn a_build_sees_its_own_subjects_work_directory_and_no_other() {
    if !walled_builds() {
        return;
    }
    // Arrange: alice has built a crate, so her work directory exists.
    let app = spawn_app().await;
    let tenants = Path::new(crate::helpers::RUST_TARGET_DIR).join("tenants");
    let dir_of = |sub: &str| fnrt_backends::build::Tenant::of(Some(sub)).dir_name();
    let alice_files = json!({
        "Cargo.toml": "[package]\nname = \"plain\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n\
                       [dependencies]\nfnrt-sdk = \"0.1\"\nserde_json = \"1\"\n",
        "src/lib.rs": "use fnrt_sdk::{Context, Error, export};\n\
                       fn plain(_p: serde_json::Value, _c: Context) -> Result<serde_json::Value, Error> {\n    \
                       Ok(serde_json::json!(\"alice's\"))\n}\nexport!(plain);\n",
    });
    let body = json!({"language_title": "rust-alices", "description": "d", "files": alice_files});
    let alices = call(&app, Method::POST, "/api/v1/functions", &app.admin(), Some(body)).await;
    assert_eq!(alices.status, 201, "{:?}", alices.body);
    let alice_dir = tenants.join(dir_of("alice"));
    assert!(alice_dir.join("crates").is_dir(), "{} missing", alice_dir.display());
    let planted = alice_dir.join("crates").join("planted-by-mallory");
    // A crate of its own each run, so that its script runs again rather
    // than cargo reusing what it wrote in an earlier run.
    let build_rs = format!(
        "// run {run}\nfn main() {{\n    let out = std::env::var(\"OUT_DIR\").unwrap();\n    \
         let seen: Vec<String> = match std::fs::read_dir({tenants:?}) {{\n        \
         Ok(d) => d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),\n        \
         Err(e) => vec![format!(\"error: {{e}}\")],\n    }};\n    \
         let wrote = std::fs::write({planted:?}, \"x\").is_ok();\n    \
         std::fs::write(format!(\"{{out}}/seen.json\"), format!(\"{{{{\\\"seen\\\": {{seen:?}}, \\\"wrote\\\": {{wrote}}}}}}\")).unwrap();\n}}\n",
        tenants = tenants.display().to_string(),
        planted = planted.display().to_string(),
        run = uuid::Uuid::new_v4(),
    );
    let files = json!({
        "Cargo.toml": "[package]\nname = \"tenant-probe\"\nversion = \"0.1.0\"\nedition = \"2024\"\nbuild = \"build.rs\"\n\n\
                       [dependencies]\nfnrt-sdk = \"0.1\"\nserde_json = \"1\"\n",
        "build.rs": build_rs,
        "src/lib.rs": TENANT_PROBE_LIB,
    });
    let mallory = app.token("mallory", &["execute:all", "read:functions", "write:functions"]);

    // Act: mallory's crate builds (its script runs now), then runs.
    let body = json!({"language_title": "rust-tenant-probe", "description": "d", "files": files});
    let registered = call(&app, Method::POST, "/api/v1/functions", &mallory, Some(body)).await;
    assert_eq!(registered.status, 201, "{:?}", registered.body);
    let id = app.session(&mallory, "rust-tenant-probe", json!({})).await;
    let r = app.execute(&mallory, &id, json!({})).await;

    // Assert: it saw its own directory alone, and wrote nothing in alice's.
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["seen"], json!([dir_of("mallory")]), "{:?}", r.body);
    assert_eq!(r.body["result"]["wrote"], false, "{:?}", r.body);
    assert!(!planted.exists(), "mallory's build wrote {}", planted.display());
}

/// Registers a crate with no dependencies whose `build.rs` is `main`, as
/// `rust-{title}`, with `token`; the reply.
async fn register_build_script(
    app: &crate::helpers::TestApp,
    token: &str,
    title: &str,
    main: &str,
) -> crate::helpers::Reply {
    let files = json!({
        "Cargo.toml": format!("[package]\nname = \"{title}\"\nversion = \"0.1.0\"\nedition = \"2024\"\nbuild = \"build.rs\"\n"),
        // A run of its own each time: cargo must not reuse an earlier run.
        "build.rs": format!("// run {}\n{main}", uuid::Uuid::new_v4()),
        "src/lib.rs": "",
    });
    let body = json!({"language_title": format!("rust-{title}"), "description": "d", "files": files});
    call(app, Method::POST, "/api/v1/functions", token, Some(body)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_script_that_takes_more_memory_than_a_build_may_is_stopped_and_says_so() {
    if !walled_builds() {
        return;
    }
    let app = crate::helpers::spawn_app_with(&["--build-memory-mb", "256"]).await;

    // Act: a build script that fills 1 GiB, four times what a build may use.
    let r = register_build_script(
        &app,
        &app.admin(),
        "memory-hog",
        "fn main() {\n    let hog = vec![1u8; 1 << 30];\n    \
         std::thread::sleep(std::time::Duration::from_millis(200));\n    assert_eq!(hog[hog.len() - 1], 1);\n}\n",
    )
    .await;

    // Assert: the build fails, saying which limit stopped it.
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.code(), "BUILD_FAILED");
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("ran out of memory"), "{message}");
    assert!(message.contains("256 MiB (BUILD_MEMORY_MB)"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_script_that_forks_without_end_is_refused_past_the_limit() {
    if !walled_builds() {
        return;
    }
    let app = crate::helpers::spawn_app_with(&["--build-max-processes", "64"]).await;

    // Act: a build script that starts 200 processes and keeps them.
    let r = register_build_script(
        &app,
        &app.admin(),
        "fork-hog",
        "fn main() {\n    let mut children = Vec::new();\n    for n in 0..200 {\n        \
         match std::process::Command::new(\"sleep\").arg(\"30\").spawn() {\n            \
         Ok(child) => children.push(child),\n            \
         Err(e) => panic!(\"fork {n} refused: {e}\"),\n        }\n    }\n    \
         for mut child in children {\n        let _ = child.kill();\n        let _ = child.wait();\n    }\n}\n",
    )
    .await;

    // Assert: the build fails at the limit, saying so.
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.code(), "BUILD_FAILED");
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("limit of 64 processes and threads"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_script_that_fills_the_disk_is_stopped_past_the_limit() {
    if !walled_builds() {
        return;
    }
    let app = crate::helpers::spawn_app_with(&["--build-disk-mb", "64"]).await;
    // A subject of its own: its work directory, removed past the limit, is
    // shared by no other test's builds.
    let subject = format!("filler-{}", uuid::Uuid::new_v4());
    let token = app.token(&subject, &["execute:all", "read:functions", "write:functions"]);
    let work = Path::new(crate::helpers::RUST_TARGET_DIR)
        .join("tenants")
        .join(fnrt_backends::build::Tenant::of(Some(&subject)).dir_name());

    // Act: a build script that writes 1 GiB into its output directory, 1 MiB
    // every 10 ms (the limit is checked every second).
    let r = register_build_script(
        &app,
        &token,
        "disk-hog",
        "use std::io::Write;\nfn main() {\n    let out = std::env::var(\"OUT_DIR\").unwrap();\n    \
         let mut f = std::fs::File::create(format!(\"{out}/fill\")).unwrap();\n    let chunk = vec![1u8; 1 << 20];\n    \
         for _ in 0..1024 {\n        f.write_all(&chunk).unwrap();\n        f.flush().unwrap();\n        \
         std::thread::sleep(std::time::Duration::from_millis(10));\n    }\n}\n",
    )
    .await;

    // Assert: the build fails at the limit, saying so, and what it wrote
    // is gone from the disk.
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.code(), "BUILD_FAILED");
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("more than the 64 MiB a build step may (BUILD_DISK_MB)"),
        "{message}"
    );
    assert!(!work.exists(), "{} is left", work.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_script_that_spins_on_every_core_gets_no_more_than_the_builds_cpu_quota() {
    if !walled_builds() {
        return;
    }
    let app = crate::helpers::spawn_app_with(&["--build-cpus", "0.2"]).await;

    // Act: a build script that spins two threads for 2 s of wall time, then
    // fails the build with the CPU time its process got (utime + stime, in
    // clock ticks of 10 ms, from /proc/self/stat).
    let r = register_build_script(
        &app,
        &app.admin(),
        "cpu-hog",
        "fn main() {\n    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);\n    \
         let spin = move || { let mut n = 0u64; while std::time::Instant::now() < until { n = n.wrapping_add(1); } n };\n    \
         let threads: Vec<_> = (0..2).map(|_| std::thread::spawn(spin)).collect();\n    \
         for t in threads { std::hint::black_box(t.join().unwrap()); }\n    \
         let stat = std::fs::read_to_string(\"/proc/self/stat\").unwrap();\n    \
         let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();\n    \
         let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();\n    \
         panic!(\"spun for {} ms of CPU\", ticks * 10);\n}\n",
    )
    .await;

    // Assert: it ran to its end, and two threads spinning for 2 s got
    // about 0.4 s of CPU (0.2 CPU; without the quota, up to 4 s).
    assert_eq!(r.status, 422, "{:?}", r.body);
    let messages = r.body["error"]["details"]["messages"].to_string();
    let spun: u64 = messages
        .split("spun for ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no measurement in {messages}"));
    assert!(
        spun <= 800,
        "two spinning threads got {spun} ms of CPU in 2 s under 0.2 CPU"
    );
}
