//! Fault injection against private servers: a PostgreSQL and a Redis of the
//! test's own (on free ports, in temp dirs), stopped and started again. The
//! shared servers are never touched.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::helpers::{eventually, spawn_app_with};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A PostgreSQL cluster of the test's own, run as `postgres` when root.
struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    fn start() -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path().join("bin"))
                .find(|b| b.join("initdb").exists())
        });
        let Some(bin) = bin else {
            assert!(!ci(), "CI=true but PostgreSQL's initdb is not installed");
            eprintln!("skipped: PostgreSQL server binaries not found");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("fnrt-pg")
            .tempdir_in("/var/tmp")
            .unwrap();
        if rustix::process::geteuid().is_root() {
            let (uid, gid) = user_ids("postgres").expect("a postgres user");
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let pg = PrivatePostgres {
            bin,
            dir,
            port: free_port(),
        };
        let data = pg.data();
        pg.run("initdb", &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"]);
        pg.up();
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_string_lossy().into_owned()
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn run(&self, tool: &str, args: &[&str]) {
        if let Err(e) = self.try_run(tool, args) {
            panic!("{e}");
        }
    }

    fn try_run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let program = self.bin.join(tool);
        let mut cmd = if rustix::process::geteuid().is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = cmd.args(args).current_dir(self.dir.path()).output().unwrap();
        match out.status.success() {
            true => Ok(()),
            false => Err(format!("{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr))),
        }
    }

    fn up(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").to_string_lossy().into_owned();
        // A start can fail for reasons of the machine (a CI run saw one);
        // try again, and say what the server logged if it keeps failing.
        let mut last = String::new();
        for _ in 0..3 {
            match self.try_run("pg_ctl", &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"]) {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("{last}\nserver log:\n{logged}");
    }

    fn down(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
    }

    fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args([&self.url(db), "-At", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
        let _ = Command::new(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_down_gives_clean_503s_for_writes_and_every_answered_execution_keeps_its_record() {
    let Some(pg) = PrivatePostgres::start() else { return };
    pg.psql("postgres", "CREATE DATABASE fnrt");
    let url = pg.url("fnrt");
    let app = spawn_app_with(&["--database-url", &url]).await;
    let token = app.admin();
    let id = app
        .session(&token, "nodejs-calculator", json!({"retain_session": true}))
        .await;
    let mut answered = 0;
    for n in 0..3 {
        let r = app
            .execute(&token, &id, json!({"operation": "add", "values": [n, 1]}))
            .await;
        assert_eq!(r.status, 200);
        answered += 1;
    }

    // Act: the database goes away.
    pg.down();
    for n in 10..13 {
        let r = app
            .execute(&token, &id, json!({"operation": "add", "values": [n, 1]}))
            .await;
        assert_eq!(r.status, 200, "a warm execution needs no database: {:?}", r.body);
        answered += 1;
    }
    let write = app
        .client
        .post(app.url("/api/v1/functions"))
        .bearer_auth(&token)
        .json(&json!({"language_title": "nodejs-new", "description": "d", "code": "module.exports.handler = () => 1;"}))
        .send()
        .await
        .unwrap();
    let write = crate::helpers::read(write).await;
    assert_eq!(write.status, 503, "{:?}", write.body);
    assert_eq!(write.code(), "UNAVAILABLE");
    let health = app.get(None, "/health").await;
    assert_eq!(health.body["components"]["postgres"], "error");
    assert_eq!(health.body["status"], "degraded");

    // Assert: once it is back, every answered execution has its record.
    pg.up();
    let count = || {
        pg.psql(
            "fnrt",
            &format!("SELECT count(*) FROM executions WHERE request_id = '{id}'"),
        )
    };
    assert!(
        eventually(Duration::from_secs(20), || count() == answered.to_string()).await,
        "records: {} of {answered}",
        count()
    );
    assert_eq!(app.get(None, "/health").await.body["components"]["postgres"], "ok");
}

/// A Redis of the test's own.
struct PrivateRedis {
    child: Child,
    port: u16,
}

impl PrivateRedis {
    fn start_on(port: u16) -> Option<PrivateRedis> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            assert!(!ci(), "CI=true but redis-server is not installed");
            eprintln!("skipped: redis-server not found");
            return None;
        };
        let redis = PrivateRedis { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(redis);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("private redis-server did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_going_down_degrades_and_its_return_is_picked_up_automatically() {
    let Some(redis) = PrivateRedis::start_on(free_port()) else {
        return;
    };
    let port = redis.port;
    let app = spawn_app_with(&["--redis-url", &redis.url()]).await;
    let token = app.admin();
    assert_eq!(app.get(None, "/health").await.body["components"]["redis"], "ok");

    drop(redis);
    let id = app
        .session(&token, "python-calculator", json!({"retain_session": true}))
        .await;
    let r = app
        .execute(&token, &id, json!({"operation": "add", "values": [2, 3]}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["value"], 5);
    let health = app.get(None, "/health").await;
    assert_eq!(health.body["components"]["redis"], "degraded");
    assert_eq!(health.body["components"]["rate_limits"], "per-process");

    let _back = PrivateRedis::start_on(port).unwrap();
    let mut health = String::new();
    for _ in 0..50 {
        health = app.get(None, "/health").await.body["components"]["redis"].to_string();
        if health == "\"ok\"" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(health, "\"ok\"");
    // The session made during the outage lives on in this controller.
    let r = app
        .execute(&token, &id, json!({"operation": "add", "values": [5, 5]}))
        .await;
    assert_eq!(r.body["result"]["value"], 10, "{:?}", r.body);
}
