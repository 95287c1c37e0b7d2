//! The load: [`Oha`] (the `oha` load generator, over TCP or a Unix socket,
//! its JSON report parsed into [`Stats`]), and [`sequential`], a loop of
//! single requests for what a constant load cannot measure (initialize
//! from the warm pool, cold starts), checked against `oha` on the echo
//! floor in every run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::Value;

/// Latency percentiles (µs) and throughput of one measurement.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Stats {
    pub(crate) p50_us: f64,
    pub(crate) p95_us: f64,
    pub(crate) p99_us: f64,
    /// Requests per second (successful ones).
    pub(crate) rps: f64,
    pub(crate) requests: u64,
}

impl Stats {
    /// The median of each figure over several rounds (interleaved with a
    /// floor's, so drift of the machine hits both).
    pub(crate) fn median(rounds: &[Stats]) -> Stats {
        let med = |f: fn(&Stats) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            match v.len() {
                0 => 0.0,
                n if n % 2 == 1 => v[n / 2],
                n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
            }
        };
        Stats {
            p50_us: med(|s| s.p50_us),
            p95_us: med(|s| s.p95_us),
            p99_us: med(|s| s.p99_us),
            rps: med(|s| s.rps),
            requests: rounds.iter().map(|s| s.requests).sum(),
        }
    }

    /// Percentiles of single measured latencies.
    pub(crate) fn of_samples(samples: &[Duration], elapsed: Duration) -> Stats {
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if us.is_empty() {
                return 0.0;
            }
            let rank = ((q * us.len() as f64).ceil() as usize).clamp(1, us.len());
            us[rank - 1]
        };
        Stats {
            p50_us: at(0.50),
            p95_us: at(0.95),
            p99_us: at(0.99),
            rps: samples.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            requests: samples.len() as u64,
        }
    }
}

/// One HTTP request, repeated.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) method: &'static str,
    /// The URL; with [`Target::url_regex`], a regular expression each
    /// request's URL is drawn from (`…/execute/(id1|id2)`: several sessions).
    pub(crate) url: String,
    pub(crate) url_regex: bool,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Option<String>,
    /// Connect here instead of the URL's host (a runtime's socket).
    pub(crate) unix_socket: Option<PathBuf>,
}

impl Target {
    pub(crate) fn post_json(url: impl Into<String>, body: &Value) -> Target {
        Target {
            method: "POST",
            url: url.into(),
            url_regex: false,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Some(body.to_string()),
            unix_socket: None,
        }
    }

    pub(crate) fn bearer(mut self, token: &str) -> Target {
        self.headers.push(("authorization".into(), format!("Bearer {token}")));
        self
    }
}

/// The `oha` binary.
#[derive(Debug, Clone)]
pub(crate) struct Oha {
    pub(crate) bin: PathBuf,
}

impl Oha {
    /// `OHA` if set, else `oha` on the `PATH`, else the one this benchmark
    /// installed under `tools` (installed there with cargo the first time).
    pub(crate) fn find_or_install(tools: &Path) -> anyhow::Result<Oha> {
        if let Some(bin) = std::env::var_os("OHA") {
            return Ok(Oha { bin: bin.into() });
        }
        let on_path = Command::new("oha").arg("--version").output();
        if on_path.is_ok_and(|o| o.status.success()) {
            return Ok(Oha { bin: "oha".into() });
        }
        let root = tools.join("oha");
        let bin = root.join("bin/oha");
        if !bin.exists() {
            eprintln!("installing oha into {} (cargo install, once)", root.display());
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["install", "oha", "--locked", "--quiet", "--root"])
                .arg(&root)
                .status()
                .context("running cargo install oha")?;
            if !status.success() {
                bail!("cargo install oha failed ({status})");
            }
        }
        Ok(Oha { bin })
    }

    /// Runs `target` for `duration` at `concurrency`; fails on any
    /// connection error or answer other than 2xx.
    pub(crate) fn run(&self, target: &Target, concurrency: u32, duration: Duration) -> anyhow::Result<Stats> {
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "--no-tui",
            "--output-format",
            "json",
            "--wait-ongoing-requests-after-deadline",
        ])
        .args(["-c", &concurrency.to_string()])
        .args(["-z", &format!("{}ms", duration.as_millis())])
        .args(["-m", target.method]);
        for (name, value) in &target.headers {
            cmd.args(["-H", &format!("{name}: {value}")]);
        }
        if let Some(body) = &target.body {
            cmd.args(["-d", body]);
        }
        if let Some(socket) = &target.unix_socket {
            cmd.arg("--unix-socket").arg(socket);
        }
        if target.url_regex {
            cmd.arg("--rand-regex-url");
        }
        cmd.arg(&target.url);
        let out = cmd
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "oha failed on {}: {}",
                target.url,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let report: Value = serde_json::from_slice(&out.stdout).context("oha's JSON report")?;
        parse_report(&report).with_context(|| format!("oha on {}", target.url))
    }
}

/// [`Stats`] from oha's JSON report (seconds), refusing a run with errors
/// or non-2xx answers: a benchmark of failures measures nothing.
fn parse_report(report: &Value) -> anyhow::Result<Stats> {
    let mut ok = 0u64;
    let mut bad = Vec::new();
    if let Some(codes) = report["statusCodeDistribution"].as_object() {
        for (code, n) in codes {
            let n = n.as_u64().unwrap_or(0);
            if code.starts_with('2') {
                ok += n;
            } else {
                bad.push(format!("{n} x {code}"));
            }
        }
    }
    if let Some(errors) = report["errorDistribution"].as_object() {
        for (error, n) in errors {
            // A request cut by the deadline is not the server's failure.
            if !error.contains("aborted due to deadline") {
                bad.push(format!("{n} x {error}"));
            }
        }
    }
    if !bad.is_empty() {
        bail!("failed requests: {}", bad.join(", "));
    }
    if ok == 0 {
        bail!("no request succeeded");
    }
    let pct = |key: &str| report["latencyPercentiles"][key].as_f64().unwrap_or(f64::NAN) * 1e6;
    let elapsed = report["summary"]["total"].as_f64().unwrap_or(0.0);
    Ok(Stats {
        p50_us: pct("p50"),
        p95_us: pct("p95"),
        p99_us: pct("p99"),
        rps: if elapsed > 0.0 { ok as f64 / elapsed } else { 0.0 },
        requests: ok,
    })
}

/// `n` requests one after the other (each made by `request`, which
/// answers whether it succeeded), after `before` prepared each one
/// outside the timing; their latencies.
pub(crate) async fn sequential<F, Fut, B, BFut>(n: usize, mut before: B, mut request: F) -> anyhow::Result<Stats>
where
    B: FnMut() -> BFut,
    BFut: std::future::Future<Output = anyhow::Result<()>>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut samples = Vec::with_capacity(n);
    let mut busy = Duration::ZERO;
    for _ in 0..n {
        before().await?;
        let start = Instant::now();
        request().await?;
        let took = start.elapsed();
        busy += took;
        samples.push(took);
    }
    Ok(Stats::of_samples(&samples, busy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn oha_reports_become_stats_and_failures_refuse_the_run() {
        let report = json!({
            "summary": {"total": 2.0, "requestsPerSec": 999.0},
            "latencyPercentiles": {"p50": 0.0001, "p95": 0.0002, "p99": 0.0005},
            "statusCodeDistribution": {"200": 1000},
            "errorDistribution": {"aborted due to deadline": 3}
        });
        let s = parse_report(&report).unwrap();
        assert_eq!(
            (s.p50_us.round(), s.p95_us.round(), s.p99_us.round()),
            (100.0, 200.0, 500.0)
        );
        assert_eq!((s.rps, s.requests), (500.0, 1000));
        let mut failing = report.clone();
        failing["statusCodeDistribution"]["429"] = json!(2);
        assert!(parse_report(&failing).unwrap_err().to_string().contains("2 x 429"));
        let mut broken = report;
        broken["errorDistribution"]["connection refused"] = json!(1);
        assert!(parse_report(&broken).is_err());
    }

    #[test]
    fn medians_and_percentiles() {
        let rounds = [
            Stats {
                p50_us: 3.0,
                rps: 10.0,
                ..Stats::default()
            },
            Stats {
                p50_us: 1.0,
                rps: 30.0,
                ..Stats::default()
            },
            Stats {
                p50_us: 2.0,
                rps: 20.0,
                ..Stats::default()
            },
        ];
        let m = Stats::median(&rounds);
        assert_eq!((m.p50_us, m.rps), (2.0, 20.0));
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = Stats::of_samples(&samples, Duration::from_secs(1));
        assert_eq!((s.p50_us, s.p95_us, s.p99_us, s.rps), (50.0, 95.0, 99.0, 100.0));
    }
}
