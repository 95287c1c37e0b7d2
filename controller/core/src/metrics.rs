//! Prometheus metrics (prometheus-client, the Prometheus project's own Rust
//! client), all under the `lambda_` prefix.
//!
//! Labels are bounded: routes are the matched route template, never the raw
//! path; functions are Language-Titles that exist in the registry.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::language::Language;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExecutionLabels {
    pub language_title: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub pipeline: String,
    pub step: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    pub language_title: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub layer: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionCacheLabels {
    pub language_title: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LanguageLabels {
    pub language: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub language: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// `process`, `docker`, `wasm`.
    pub backend: String,
    pub language: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcquireLabels {
    pub backend: String,
    pub language: String,
    /// `reused` (an idle specialised instance), `warm` (from the warm
    /// pool: a hit) or `cold` (started for it: a miss).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendInstanceLabels {
    pub backend: String,
    pub language: String,
    /// `warm` or `idle`.
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleLabels {
    /// `compiled` or `disk_cache`.
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstallLabels {
    pub language: String,
    /// `installed`, `reused` (found done) or `failed`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PriorityLabels {
    /// `low`, `normal`, `high`.
    pub priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// How an attempt of an asynchronous execution ended: `completed`,
    /// `retried`, `failed` (dead-lettered), `cancelled`, `lost` (its
    /// controller stopped), `handed_back` (shutdown).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: String,
}

/// Every outcome an execution is counted under.
pub const OUTCOMES: [&str; 6] = [
    "success",
    "cache_hit",
    "invalid_params",
    "runtime_error",
    "timeout",
    "error",
];

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~65 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub executions: Family<ExecutionLabels, Counter>,
    pub execution_duration: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    pub cache: Family<CacheLabels, Counter>,
    pub function_cache: Family<FunctionCacheLabels, Counter>,
    pub cold_starts: Family<LanguageLabels, Counter>,
    pub cold_start_duration: Family<LanguageLabels, Histogram, fn() -> Histogram>,
    pub init_duration: Family<LanguageLabels, Histogram, fn() -> Histogram>,
    pub instances: Family<InstanceLabels, Gauge>,
    /// Instances per backend (containers for `docker`), by state.
    pub backend_instances: Family<BackendInstanceLabels, Gauge>,
    /// Time from asking a backend for an instance to its server answering.
    pub instance_start: Family<BackendLabels, Histogram, fn() -> Histogram>,
    pub pool_acquires: Family<AcquireLabels, Counter>,
    pub oom_kills: Family<LanguageLabels, Counter>,
    pub instances_busy: Gauge,
    pub rate_limited: Family<ClassLabels, Counter>,
    pub wasm_modules: Family<ModuleLabels, Counter>,
    pub dependency_installs: Family<InstallLabels, Counter>,
    pub active_sessions: Gauge,
    pub queue_depth: Family<PriorityLabels, Gauge>,
    pub queue_wait: Histogram,
    pub async_attempts: Family<AttemptLabels, Counter>,
    pub callbacks: Family<AttemptLabels, Counter>,
    pub pipeline_steps: Family<StepLabels, Histogram, fn() -> Histogram>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lambda");
        let m = Metrics {
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            executions: Family::default(),
            execution_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            cache: Family::default(),
            function_cache: Family::default(),
            cold_starts: Family::default(),
            cold_start_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            init_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            instances: Family::default(),
            backend_instances: Family::default(),
            instance_start: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            pool_acquires: Family::default(),
            oom_kills: Family::default(),
            instances_busy: Gauge::default(),
            rate_limited: Family::default(),
            wasm_modules: Family::default(),
            dependency_installs: Family::default(),
            active_sessions: Gauge::default(),
            queue_depth: Family::default(),
            queue_wait: latency_histogram(),
            async_attempts: Family::default(),
            callbacks: Family::default(),
            pipeline_steps: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            m.http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            m.http_duration.clone(),
        );
        registry.register(
            "executions",
            "Executions by Language-Title and outcome",
            m.executions.clone(),
        );
        registry.register(
            "execution_duration_seconds",
            "Execution latency by Language-Title (cache hits included)",
            m.execution_duration.clone(),
        );
        registry.register(
            "cache_requests",
            "Result cache lookups by layer and result (hit, miss)",
            m.cache.clone(),
        );
        registry.register(
            "function_cache_requests",
            "Result cache lookups by Language-Title and result (hit, miss)",
            m.function_cache.clone(),
        );
        registry.register(
            "backend_instances",
            "Instances (containers on the docker backend) by backend, language and state (warm, idle)",
            m.backend_instances.clone(),
        );
        registry.register(
            "instance_start_seconds",
            "Time to start an instance (a container on the docker backend) until its server answers",
            m.instance_start.clone(),
        );
        registry.register(
            "pool_acquires",
            "Instances handed out, by backend, language and where from (reused, warm: pool hits; cold: misses)",
            m.pool_acquires.clone(),
        );
        registry.register(
            "oom_kills",
            "Instances killed for want of memory during a run",
            m.oom_kills.clone(),
        );
        registry.register(
            "cold_starts",
            "Instances started on demand because no warm one was ready",
            m.cold_starts.clone(),
        );
        registry.register(
            "cold_start_duration_seconds",
            "Time to start an instance on demand",
            m.cold_start_duration.clone(),
        );
        registry.register(
            "init_duration_seconds",
            "Time to specialise an instance (/init)",
            m.init_duration.clone(),
        );
        registry.register(
            "instances",
            "Pooled instances by language and state (warm, idle)",
            m.instances.clone(),
        );
        registry.register(
            "instances_busy",
            "Instances handed out to executions or retained sessions",
            m.instances_busy.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit, by class",
            m.rate_limited.clone(),
        );
        registry.register(
            "pipeline_step_duration_seconds",
            "Pipeline steps by pipeline, step and outcome (success, retried, failed, continued, cancelled), \
             every attempt included",
            m.pipeline_steps.clone(),
        );
        registry.register(
            "active_sessions",
            "Sessions that can still be executed",
            m.active_sessions.clone(),
        );
        registry.register(
            "wasm_modules",
            "Wasm modules made ready to link, by source (compiled, disk_cache)",
            m.wasm_modules.clone(),
        );
        registry.register(
            "dependency_installs",
            "Dependency installs asked for at registration, by language and result (installed, reused, failed)",
            m.dependency_installs.clone(),
        );
        registry.register(
            "async_queue_depth",
            "Asynchronous executions waiting to run, by priority (every replica sees the whole queue)",
            m.queue_depth.clone(),
        );
        registry.register(
            "async_queue_wait_seconds",
            "Time an asynchronous execution waited in the queue before its first attempt",
            m.queue_wait.clone(),
        );
        registry.register(
            "async_attempts",
            "Attempts of asynchronous executions by outcome (completed, retried, failed = dead-lettered, cancelled, lost, handed_back)",
            m.async_attempts.clone(),
        );
        registry.register(
            "async_callbacks",
            "Callback delivery tries by outcome (delivered, retried, failed)",
            m.callbacks.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn record_callback(&self, outcome: &str) {
        self.callbacks
            .get_or_create(&AttemptLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn record_step(&self, pipeline: &str, step: &str, outcome: &str, elapsed: std::time::Duration) {
        self.pipeline_steps
            .get_or_create(&StepLabels {
                pipeline: pipeline.to_owned(),
                step: step.to_owned(),
                outcome: outcome.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn record_attempt(&self, outcome: &str) {
        self.async_attempts
            .get_or_create(&AttemptLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn record_dependency_install(&self, language: &str, result: &str) {
        self.dependency_installs
            .get_or_create(&InstallLabels {
                language: language.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn record_execution(&self, language_title: &str, outcome: &str, elapsed: Duration) {
        self.executions
            .get_or_create(&ExecutionLabels {
                language_title: language_title.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.execution_duration
            .get_or_create(&FunctionLabels {
                language_title: language_title.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Drops a deleted function's series, so that `/metrics` does not grow
    /// with every function ever registered.
    pub fn forget_function(&self, language_title: &str) {
        for outcome in OUTCOMES {
            self.executions.remove(&ExecutionLabels {
                language_title: language_title.to_owned(),
                outcome: outcome.to_owned(),
            });
        }
        self.execution_duration.remove(&FunctionLabels {
            language_title: language_title.to_owned(),
        });
        for result in ["hit", "miss"] {
            self.function_cache.remove(&FunctionCacheLabels {
                language_title: language_title.to_owned(),
                result: result.to_owned(),
            });
        }
    }

    /// One lookup of a function's result, over every layer.
    pub fn record_function_cache(&self, language_title: &str, hit: bool) {
        self.function_cache
            .get_or_create(&FunctionCacheLabels {
                language_title: language_title.to_owned(),
                result: if hit { "hit" } else { "miss" }.to_owned(),
            })
            .inc();
    }

    pub fn record_wasm_module(&self, from_disk: bool) {
        self.wasm_modules
            .get_or_create(&ModuleLabels {
                source: if from_disk { "disk_cache" } else { "compiled" }.to_owned(),
            })
            .inc();
    }

    pub fn record_cache(&self, layer: &str, hit: bool) {
        self.cache
            .get_or_create(&CacheLabels {
                layer: layer.to_owned(),
                result: if hit { "hit" } else { "miss" }.to_owned(),
            })
            .inc();
    }

    pub fn record_instance_start(&self, backend: &str, language: Language, elapsed: Duration) {
        self.instance_start
            .get_or_create(&BackendLabels {
                backend: backend.to_owned(),
                language: language.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn record_acquire(&self, backend: &str, language: Language, result: &str) {
        self.pool_acquires
            .get_or_create(&AcquireLabels {
                backend: backend.to_owned(),
                language: language.to_string(),
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn record_oom_kill(&self, language: Language) {
        self.oom_kills
            .get_or_create(&LanguageLabels {
                language: language.to_string(),
            })
            .inc();
    }

    pub fn record_cold_start(&self, language: Language, elapsed: Duration) {
        let labels = LanguageLabels {
            language: language.to_string(),
        };
        self.cold_starts.get_or_create(&labels).inc();
        self.cold_start_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn record_init(&self, language: Language, elapsed: Duration) {
        self.init_duration
            .get_or_create(&LanguageLabels {
                language: language.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn record_rate_limited(&self, class: &str) {
        self.rate_limited
            .get_or_create(&ClassLabels {
                class: class.to_owned(),
            })
            .inc();
    }

    pub fn record_http(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route: route.to_owned(),
                method: method.to_owned(),
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text format (`application/openmetrics-text`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }

    /// The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`), for
    /// scrapers and tools that do not ask for OpenMetrics.
    pub fn encode_text_004(&self) -> String {
        openmetrics_to_text_004(&self.encode())
    }
}

/// Rewrites what prometheus-client writes (OpenMetrics, which it alone
/// speaks) as text format 0.0.4. They differ, for what is used here, in
/// three ways: a counter family is named without `_total` in OpenMetrics but
/// with it in 0.0.4 (its `# HELP` and `# TYPE` must name the samples), and
/// `# UNIT` and `# EOF` do not exist in 0.0.4. Gauges and histograms are
/// written alike in both.
pub fn openmetrics_to_text_004(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let comment = ["# HELP ", "# TYPE "].into_iter().find(|c| line.starts_with(c));
        match comment {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn openmetrics_becomes_text_004_with_counters_named_as_their_samples() {
        let openmetrics = "# HELP a_requests Requests.\n# TYPE a_requests counter\n\
            a_requests_total{route=\"/x\"} 3\n# HELP b Busy.\n# TYPE b gauge\n# UNIT b seconds\nb 1\n# EOF\n";
        assert_eq!(
            super::openmetrics_to_text_004(openmetrics),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\n\
             a_requests_total{route=\"/x\"} 3\n# HELP b Busy.\n# TYPE b gauge\nb 1\n"
        );
    }
}
