//! The results: [`Report`] (rows of a path beside its floor, goals, memory,
//! leaks), written as JSON for machines, a Markdown table for
//! docs/benchmarks.md and an SVG plot of latency percentiles per path
//! beside its floor.

use std::fmt::Write as _;

use serde::Serialize;

use crate::load::Stats;

/// One path measured at one concurrency, beside its floor.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) path: String,
    pub(crate) concurrency: u32,
    pub(crate) stats: Stats,
    pub(crate) floor: Option<Floor>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Floor {
    pub(crate) name: String,
    pub(crate) stats: Stats,
}

impl Row {
    /// p50 as a multiple of the floor's.
    pub(crate) fn p50_ratio(&self) -> Option<f64> {
        self.floor.as_ref().map(|f| self.stats.p50_us / f.stats.p50_us)
    }
    /// Throughput as a fraction of the floor's.
    pub(crate) fn rps_ratio(&self) -> Option<f64> {
        self.floor.as_ref().map(|f| self.stats.rps / f.stats.rps)
    }
}

/// A goal of issue 16 and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Goal {
    pub(crate) path: String,
    pub(crate) goal: String,
    pub(crate) measured: String,
    pub(crate) met: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) date: String,
    pub(crate) commit: String,
    pub(crate) cores: usize,
    pub(crate) mode: String,
    pub(crate) rounds: u32,
    pub(crate) seconds_per_run: f64,
    pub(crate) rows: Vec<Row>,
    pub(crate) goals: Vec<Goal>,
    /// Resident memory, MiB, by what.
    pub(crate) memory: Vec<(String, f64)>,
    /// Instances and descriptors before and after the load.
    pub(crate) leaks: Vec<(String, u64, u64)>,
    /// What was left out, and why.
    pub(crate) notes: Vec<String>,
}

impl Report {
    pub(crate) fn row(&self, path: &str, concurrency: u32) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.path == path && r.concurrency == concurrency)
    }

    pub(crate) fn goal(&mut self, path: &str, goal: &str, measured: String, met: bool) {
        self.goals.push(Goal {
            path: path.to_owned(),
            goal: goal.to_owned(),
            measured,
            met,
        });
    }

    /// The Markdown section of docs/benchmarks.md.
    pub(crate) fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Run on {} at commit `{}`, {} cores, {} mode ({} round(s) of {:.0} s per measurement, \
             each path interleaved with its floor).\n",
            self.date, self.commit, self.cores, self.mode, self.rounds, self.seconds_per_run
        );
        md.push_str("### Paths beside their floors\n\n");
        md.push_str("| path | c | p50 µs | p95 µs | p99 µs | req/s | floor | floor p50 µs | floor req/s | p50 ratio | throughput |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|\n");
        for r in &self.rows {
            let s = &r.stats;
            let (floor, fp50, frps) = match &r.floor {
                Some(f) => (f.name.clone(), num(f.stats.p50_us), num(f.stats.rps)),
                None => ("".into(), "".into(), "".into()),
            };
            let ratio = r.p50_ratio().map(|x| format!("{x:.2}x")).unwrap_or_default();
            let share = r.rps_ratio().map(|x| format!("{:.0} %", x * 100.0)).unwrap_or_default();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.path,
                r.concurrency,
                num(s.p50_us),
                num(s.p95_us),
                num(s.p99_us),
                num(s.rps),
                floor,
                fp50,
                frps,
                ratio,
                share
            );
        }
        md.push_str("\n### Goals\n\n| path | goal | measured | met |\n|---|---|---|---|\n");
        for g in &self.goals {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                g.path,
                g.goal,
                g.measured,
                if g.met { "yes" } else { "**no**" }
            );
        }
        md.push_str("\n### Memory (RSS)\n\n| what | MiB |\n|---|---:|\n");
        for (what, mib) in &self.memory {
            let _ = writeln!(md, "| {what} | {mib:.1} |");
        }
        md.push_str("\n### Before and after the load\n\n| what | before | after |\n|---|---:|---:|\n");
        for (what, before, after) in &self.leaks {
            let _ = writeln!(md, "| {what} | {before} | {after} |");
        }
        if !self.notes.is_empty() {
            md.push_str("\n### Notes\n\n");
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        md
    }

    /// Horizontal bars of p50/p95/p99 (log scale, µs) for each row at
    /// concurrency 1 with a floor, the floor's bars right under its path's.
    pub(crate) fn svg(&self) -> String {
        let rows: Vec<(String, Stats, bool)> = self
            .rows
            .iter()
            .filter(|r| r.floor.is_some() && r.stats.p50_us > 0.0)
            .flat_map(|r| {
                let f = r.floor.as_ref().unwrap();
                [
                    (format!("{} (c{})", r.path, r.concurrency), r.stats, false),
                    (format!("  vs {}", f.name), f.stats, true),
                ]
            })
            .collect();
        let (left, width, bar, gap) = (330.0, 560.0, 6.0, 10.0);
        let height = 76.0 + rows.len() as f64 * (3.0 * bar + gap);
        let max = rows
            .iter()
            .map(|(_, s, _)| s.p99_us.max(s.p50_us))
            .fold(10.0_f64, f64::max);
        let min = 1.0_f64;
        let x = |us: f64| left + width * ((us.max(min)).log10() - min.log10()) / (max.log10() - min.log10());
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="11">"#,
            left + width + 20.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="10" y="16" font-size="13">Latency p50 / p95 / p99 (µs, log scale), each path (orange) above its floor or peer (blue): {} {}</text>"#,
            self.date, self.commit
        );
        let _ = writeln!(
            svg,
            r#"<text x="10" y="{:.1}">Bars from light to dark: p50, p95, p99. fnrt-bench, docs/benchmarks.md</text>"#,
            height - 4.0
        );
        let mut decade = 1.0;
        while decade <= max * 1.0001 {
            let xd = x(decade);
            let _ = writeln!(
                svg,
                r##"<line x1="{xd:.1}" y1="28" x2="{xd:.1}" y2="{:.1}" stroke="#ddd"/><text x="{xd:.1}" y="40" text-anchor="middle">{}</text>"##,
                height - 20.0,
                num(decade)
            );
            decade *= 10.0;
        }
        let mut y = 50.0;
        for (label, s, is_floor) in &rows {
            let colors = if *is_floor {
                ["#9ecae1", "#6baed6", "#3182bd"]
            } else {
                ["#fdae6b", "#fd8d3c", "#e6550d"]
            };
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + 2.0 * bar,
                escape(label)
            );
            for (i, (v, c)) in [(s.p50_us, colors[0]), (s.p95_us, colors[1]), (s.p99_us, colors[2])]
                .into_iter()
                .enumerate()
            {
                let _ = writeln!(
                    svg,
                    r#"<rect x="{left}" y="{:.1}" width="{:.1}" height="{bar}" fill="{c}"><title>{} µs</title></rect>"#,
                    y + i as f64 * bar,
                    (x(v) - left).max(1.0),
                    num(v)
                );
            }
            y += 3.0 * bar + gap;
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// A figure with sensible precision.
pub(crate) fn num(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Replaces what lies between the `<!-- results:begin -->` and
/// `<!-- results:end -->` lines of `doc` with `section`.
pub(crate) fn splice(doc: &str, section: &str) -> Option<String> {
    const BEGIN: &str = "<!-- results:begin -->";
    const END: &str = "<!-- results:end -->";
    let start = doc.find(BEGIN)? + BEGIN.len();
    let end = doc[start..].find(END)? + start;
    Some(format!("{}\n\n{}\n{}", &doc[..start], section.trim_end(), &doc[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let stats = |p50: f64, rps: f64| Stats {
            p50_us: p50,
            p95_us: p50 * 2.0,
            p99_us: p50 * 3.0,
            rps,
            requests: 10,
        };
        Report {
            date: "2026-12-03".into(),
            commit: "abc1234".into(),
            cores: 2,
            mode: "smoke".into(),
            rounds: 1,
            seconds_per_run: 1.0,
            rows: vec![Row {
                path: "cached execute, L1 hit".into(),
                concurrency: 1,
                stats: stats(120.0, 8000.0),
                floor: Some(Floor {
                    name: "axum echo".into(),
                    stats: stats(60.0, 16000.0),
                }),
            }],
            ..Report::default()
        }
    }

    #[test]
    fn the_table_shows_each_path_with_its_floor_and_ratios() {
        let r = report();
        let row = r.row("cached execute, L1 hit", 1).unwrap();
        assert_eq!((row.p50_ratio(), row.rps_ratio()), (Some(2.0), Some(0.5)));
        let md = r.markdown();
        assert!(
            md.contains(
                "| cached execute, L1 hit | 1 | 120 | 240 | 360 | 8000 | axum echo | 60.0 | 16000 | 2.00x | 50 % |"
            ),
            "{md}"
        );
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.contains("vs axum echo") && svg.matches("<rect").count() == 6);
    }

    #[test]
    fn the_results_section_is_spliced_between_its_markers() {
        let doc = "# B\n\n<!-- results:begin -->\nold\n<!-- results:end -->\nafter\n";
        assert_eq!(
            splice(doc, "new table\n").unwrap(),
            "# B\n\n<!-- results:begin -->\n\nnew table\n<!-- results:end -->\nafter\n"
        );
        assert!(splice("no markers", "x").is_none());
    }
}
