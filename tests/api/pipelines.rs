//! Pipelines through the API: registered like functions (and refused when
//! they cannot run), initialized and executed like functions, with each
//! step's output and timing; steps in Node, Python and wasm; parallel
//! branches; a failing step named and the rest never started; retries and
//! `on_error: continue`; scopes of every step; progress on the session.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app};

/// Sleeps `ms`, then answers when it started and ended by its own clock.
const NODE_SLEEPER: &str = r#"
exports.handler = async (params) => {
  const started = Date.now();
  await new Promise((r) => setTimeout(r, params.ms));
  return { label: params.label, started, ended: Date.now() };
};
"#;

/// Fails the first `fail_times` calls for a `token`, then answers.
const NODE_FLAKY: &str = r#"
const seen = new Map();
exports.handler = async (params) => {
  const n = (seen.get(params.token) || 0) + 1;
  seen.set(params.token, n);
  if (n <= params.fail_times) throw new Error(`flaky failure ${n}`);
  return { calls: n };
};
"#;

/// Counts its calls per token (how many times a step ran).
const NODE_COUNTER: &str = r#"
const seen = new Map();
exports.handler = async (params) => {
  const n = (seen.get(params.token) || 0) + 1;
  seen.set(params.token, n);
  return { calls: n, input: params };
};
"#;

const PYTHON_FAILS: &str = r#"
def handler(params, context):
    raise RuntimeError("the middle step gave up on " + str(params.get("value")))
"#;

fn no_cache() -> Value {
    json!({"cache": {"enabled": false}})
}

async fn register_pipeline(app: &TestApp, language_title: &str, manifest: Value) -> crate::helpers::Reply {
    let mut body = json!({
        "language_title": language_title,
        "description": format!("test pipeline {language_title}"),
    });
    body.as_object_mut()
        .unwrap()
        .extend(manifest.as_object().unwrap().clone());
    app.post_function(body).await
}

async fn run(app: &TestApp, token: &str, language_title: &str, params: Value) -> crate::helpers::Reply {
    let id = app.session(token, language_title, json!({})).await;
    app.execute(token, &id, params).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_of_node_python_and_wasm_steps_runs_like_a_function() {
    let app = spawn_app().await;
    let token = app.admin();
    let registered = register_pipeline(
        &app,
        "pipeline-sum-scale",
        json!({
            "schema": {"params": {"type": "object", "required": ["values", "factor"]}},
            "steps": [
                {"name": "sum", "function": "nodejs-calculator",
                 "params": {"operation": "add", "values": "$.params.values"}},
                {"name": "scaled", "function": "python-calculator",
                 "params": {"operation": "multiply", "values": ["$.steps.sum.output.value", "$.params.factor"]}},
                {"name": "hello", "function": "wasm-hello", "after": [], "params": {}},
            ],
            "output": {"total": "$.steps.scaled.output.value", "greeting": "$.steps.hello.output.message"},
        }),
    )
    .await;
    assert_eq!(registered.status, 201, "{:?}", registered.body);
    assert_eq!(registered.body["language"], "pipeline");
    assert_eq!(registered.body["steps"][1]["after"], json!(["sum"]));
    assert_eq!(registered.body["steps"][2]["after"], json!([]));

    let r = run(
        &app,
        &token,
        "pipeline-sum-scale",
        json!({"values": [1, 2, 3], "factor": 10}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"], json!({"total": 60, "greeting": "hello from wasm"}));
    let steps = r.body["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["sum", "scaled", "hello"]);
    for step in steps {
        assert_eq!(step["status"], "completed", "{step}");
        assert_eq!(step["attempts"], 1);
        assert!(step["duration_ms"].is_u64() && step["started_at"].is_string() && step["completed_at"].is_string());
        let id = step["execution_id"].as_str().unwrap();
        assert_ne!(id, r.body["execution_id"].as_str().unwrap());
    }
    assert_eq!(steps[0]["output"], json!({"value": 6}));
    assert_eq!(steps[1]["output"], json!({"value": 60}));
    assert_eq!(steps[1]["language_title"], "python-calculator");

    // Listed and described like any function.
    let listed = app.get(Some(&token), "/api/v1/functions?language=pipeline").await;
    assert_eq!(listed.status, 200);
    let titles: Vec<&str> = listed.body["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["language_title"].as_str().unwrap())
        .collect();
    assert!(titles.contains(&"pipeline-sum-scale"), "{titles:?}");
    assert!(!titles.iter().any(|t| !t.starts_with("pipeline-")), "{titles:?}");

    // The pipeline's params are checked against its own schema first.
    let r = run(&app, &token, "pipeline-sum-scale", json!({"values": [1]})).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "INVALID_PARAMS");

    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"lambda_pipeline_step_duration_seconds_count{pipeline="pipeline-sum-scale",step="scaled",outcome="success"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn independent_steps_run_in_parallel_and_join() {
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-sleeper", NODE_SLEEPER, no_cache()).await;
    app.register("nodejs-counter-join", NODE_COUNTER, no_cache()).await;
    let r = register_pipeline(
        &app,
        "pipeline-fan",
        json!({
            "steps": [
                {"name": "left", "function": "nodejs-sleeper", "params": {"ms": 1500, "label": "left"}},
                {"name": "right", "function": "nodejs-sleeper", "after": [], "params": {"ms": 1500, "label": "right"}},
                {"name": "join", "function": "nodejs-counter-join", "after": ["left", "right"],
                 "params": {"token": "$.params.token", "left": "$.steps.left.output", "right": "$.steps.right.output"}},
            ],
        }),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = run(&app, &token, "pipeline-fan", json!({"token": "t1"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let input = &r.body["result"]["input"];
    let (left, right) = (&input["left"], &input["right"]);
    assert_eq!(
        (left["label"].as_str(), right["label"].as_str()),
        (Some("left"), Some("right"))
    );
    // By the functions' own clocks: each started before the other ended.
    let (ls, le) = (left["started"].as_i64().unwrap(), left["ended"].as_i64().unwrap());
    let (rs, re) = (right["started"].as_i64().unwrap(), right["ended"].as_i64().unwrap());
    assert!(
        ls < re && rs < le,
        "the branches ran one after the other: {left} {right}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_step_stops_the_pipeline_and_is_named() {
    let app = spawn_app().await;
    let token = app.admin();
    app.register("python-gives-up", PYTHON_FAILS, no_cache()).await;
    app.register("nodejs-counter-after", NODE_COUNTER, no_cache()).await;
    let r = register_pipeline(
        &app,
        "pipeline-breaks",
        json!({
            "steps": [
                {"name": "first", "function": "nodejs-calculator", "params": {"operation": "add", "values": [2, 3]}},
                {"name": "middle", "function": "python-gives-up", "params": {"value": "$.steps.first.output.value"}},
                {"name": "last", "function": "nodejs-counter-after", "params": {"token": "never"}},
            ],
        }),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = run(&app, &token, "pipeline-breaks", json!({})).await;
    assert_eq!(r.status, 500, "{:?}", r.body);
    let error = &r.body["error"];
    assert_eq!(error["code"], "RUNTIME_ERROR");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("step 'middle'") && message.contains("gave up on 5"),
        "{message}"
    );
    assert_eq!(error["details"]["step"], "middle");
    assert_eq!(error["details"]["language_title"], "python-gives-up");
    let steps = error["details"]["steps"].as_array().unwrap();
    assert_eq!(steps[0]["status"], "completed");
    assert_eq!(steps[1]["status"], "failed");
    assert_eq!(steps[1]["error"]["code"], "RUNTIME_ERROR");
    assert_eq!(steps[2]["status"], "skipped");
    assert_eq!(steps[2]["attempts"], 0);
    // The failed step's own execution has the Python traceback's logs id.
    assert_eq!(error["details"]["execution_id"], steps[1]["execution_id"]);

    // The last step's function never ran: its first call is the next one.
    let id = app.session(&token, "nodejs-counter-after", json!({})).await;
    let counted = app.execute(&token, &id, json!({"token": "never"})).await;
    assert_eq!(counted.body["result"]["calls"], 1, "{:?}", counted.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_whose_params_mapping_gives_no_object_is_a_400_naming_it() {
    let app = spawn_app().await;
    let token = app.admin();
    let r = register_pipeline(
        &app,
        "pipeline-scalar-params",
        json!({"steps": [{"name": "only", "function": "nodejs-calculator", "params": "$.params.n"}]}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = run(&app, &token, "pipeline-scalar-params", json!({"n": 5})).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.code(), "INVALID_PARAMS");
    let error = &r.body["error"];
    assert!(error["message"].as_str().unwrap().contains("step 'only'"), "{error}");
    assert_eq!(error["details"]["step"], "only");
    assert_eq!(error["details"]["steps"][0]["status"], "failed");
    assert_eq!(
        error["details"]["steps"][0]["attempts"], 0,
        "never sent to the function"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flaky_step_is_retried_and_a_tolerated_failure_uses_its_fallback() {
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-flaky", NODE_FLAKY, no_cache()).await;
    let r = register_pipeline(
        &app,
        "pipeline-retries",
        json!({
            "steps": [{"name": "flaky", "function": "nodejs-flaky",
                       "params": {"token": "$.params.token", "fail_times": 2},
                       "retry": {"max_attempts": 3, "backoff_ms": 50}}],
        }),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = run(&app, &token, "pipeline-retries", json!({"token": "a"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"], json!({"calls": 3}));
    assert_eq!(r.body["steps"][0]["attempts"], 3);
    let r = register_pipeline(
        &app,
        "pipeline-tolerant",
        json!({
            "steps": [
                {"name": "flaky", "function": "nodejs-flaky",
                 "params": {"token": "$.params.token", "fail_times": 5},
                 "on_error": "continue", "fallback": {"calls": -1}},
                {"name": "sum", "function": "nodejs-calculator",
                 "params": {"operation": "add", "values": [1, "$.steps.flaky.output.calls"]}},
            ],
        }),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = run(&app, &token, "pipeline-tolerant", json!({"token": "c"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"], json!({"value": 0}));
    assert_eq!(r.body["steps"][0]["status"], "failed");
    assert_eq!(r.body["steps"][0]["output"], json!({"calls": -1}));
    assert!(
        r.body["steps"][0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("flaky failure 1")
    );
    assert_eq!(r.body["steps"][1]["status"], "completed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_past_the_pipelines_deadline_is_a_timeout_that_names_it() {
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-sleeper", NODE_SLEEPER, no_cache()).await;
    let r = register_pipeline(
        &app,
        "pipeline-slow",
        json!({
            "limits": {"timeout_ms": 1000},
            "steps": [{"name": "nap", "function": "nodejs-sleeper", "params": {"ms": 5000, "label": "x"}}],
        }),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = run(&app, &token, "pipeline-slow", json!({})).await;
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "TIMEOUT");
    assert_eq!(r.body["error"]["details"]["step"], "nap");
    assert_eq!(r.body["error"]["details"]["timeout_ms"], 1000);
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelines_that_cannot_run_are_refused_at_registration() {
    let app = spawn_app().await;
    let refused = |manifest: Value, language_title: &'static str| {
        let app = &app;
        async move {
            let r = register_pipeline(app, language_title, manifest).await;
            assert_eq!(r.status, 400, "{language_title} accepted: {:?}", r.body);
            assert_eq!(r.body["error"]["code"], "INVALID_REQUEST");
            r.body["error"]["message"].as_str().unwrap().to_owned()
        }
    };
    let m = refused(json!({"steps": [{"function": "nodejs-calculater"}]}), "pipeline-typo").await;
    assert!(
        m.contains("'nodejs-calculater' not found") && m.contains("nodejs-calculator"),
        "{m}"
    );
    let m = refused(
        json!({"steps": [
            {"name": "a", "function": "wasm-hello", "after": ["b"]},
            {"name": "b", "function": "wasm-hello", "after": ["a"]},
        ]}),
        "pipeline-cycle",
    )
    .await;
    assert!(m.contains("cycle"), "{m}");
    let m = refused(
        json!({"steps": [
            {"name": "a", "function": "wasm-hello", "params": {"x": "$.steps.b.output.message"}},
            {"name": "b", "function": "wasm-hello"},
        ]}),
        "pipeline-forward",
    )
    .await;
    assert!(m.contains("forward reference"), "{m}");
    let m = refused(
        json!({"steps": [{"function": "nodejs-calculator", "params": {"operation": "add"}}]}),
        "pipeline-lacking",
    )
    .await;
    assert!(m.contains("lacks 'values'"), "{m}");
    let many: Vec<Value> = (0..51)
        .map(|i| json!({"name": format!("s{i}"), "function": "wasm-hello"}))
        .collect();
    let m = refused(json!({ "steps": many }), "pipeline-long").await;
    assert!(m.contains("at most 50 steps"), "{m}");
    let m = refused(json!({"steps": []}), "pipeline-empty").await;
    assert!(m.contains("'steps'"), "{m}");
    let m = refused(
        json!({"steps": [{"function": "wasm-hello"}], "env": {"A": "b"}}),
        "pipeline-env",
    )
    .await;
    assert!(m.contains("'env' does not apply"), "{m}");
    // Steps belong to pipelines; a pipeline has no code.
    let r = app
        .post_function(
            json!({"language_title": "nodejs-stepper", "description": "x", "code": "exports.handler = () => 1;",
                              "steps": [{"function": "wasm-hello"}]}),
        )
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let r = app
        .post_function(
            json!({"language_title": "pipeline-coded", "description": "x", "code": "x",
                              "steps": [{"function": "wasm-hello"}]}),
        )
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("no code"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_steps_scope_is_needed_before_anything_runs() {
    let app = spawn_app().await;
    app.register("nodejs-counter-scoped", NODE_COUNTER, no_cache()).await;
    let r = register_pipeline(
        &app,
        "pipeline-mixed-scopes",
        json!({"steps": [
            {"name": "count", "function": "nodejs-counter-scoped", "params": {"token": "s"}},
            {"name": "sum", "function": "python-calculator", "params": {"operation": "add", "values": [1]}},
        ]}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let partial = app.token("bob", &["execute:pipeline", "execute:nodejs"]);
    let r = app.initialize(&partial, "pipeline-mixed-scopes", json!({})).await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    let m = r.body["error"]["message"].as_str().unwrap();
    assert!(m.contains("execute:python") && m.contains("'sum'"), "{m}");
    let no_pipeline = app.token("bob", &["execute:nodejs", "execute:python"]);
    let r = app.initialize(&no_pipeline, "pipeline-mixed-scopes", json!({})).await;
    assert_eq!(r.status, 403, "{:?}", r.body);

    // Nothing ran: the counter's first call is this one.
    let all = app.token("bob", &["execute:pipeline", "execute:nodejs", "execute:python"]);
    let r = run(&app, &all, "pipeline-mixed-scopes", json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["steps"][0]["output"]["calls"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_shows_each_step_while_the_pipeline_runs() {
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-sleeper", NODE_SLEEPER, no_cache()).await;
    let r = register_pipeline(
        &app,
        "pipeline-progress",
        json!({"steps": [
            {"name": "quick", "function": "nodejs-calculator", "params": {"operation": "add", "values": [1]}},
            {"name": "slow", "function": "nodejs-sleeper", "params": {"ms": 3000, "label": "slow"}},
        ]}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = app.session(&token, "pipeline-progress", json!({})).await;
    let running = {
        let (app, token, id) = (&app, token.clone(), id.clone());
        async move { app.execute(&token, &id, json!({})).await }
    };
    let watch = async {
        for _ in 0..100 {
            let s = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
            if s.body["progress"]["current_step"] == "slow" {
                return Some(s.body);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    };
    let (done, seen) = tokio::join!(running, watch);
    assert_eq!(done.status, 200, "{:?}", done.body);
    let seen = seen.expect("the session never showed the slow step running");
    assert_eq!(seen["progress"]["total_steps"], 2);
    assert_eq!(seen["progress"]["completed_steps"], 1);
    assert_eq!(seen["steps"][0]["status"], "completed");
    assert_eq!(seen["steps"][1]["status"], "running");
    // Done: no progress any more.
    let s = app.get(Some(&token), &format!("/api/v1/sessions/{id}")).await;
    assert!(s.body.get("progress").is_none(), "{:?}", s.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_asynchronous_pipeline_shows_its_steps_and_is_cancelled_during_one() {
    use crate::executions::{post, submit, wait_until};
    let app = spawn_app().await;
    let token = app.admin();
    app.register("nodejs-sleeper", NODE_SLEEPER, no_cache()).await;
    app.register("nodejs-counter-late", NODE_COUNTER, no_cache()).await;
    let r = register_pipeline(
        &app,
        "pipeline-async",
        json!({"steps": [
            {"name": "quick", "function": "nodejs-calculator", "params": {"operation": "add", "values": [1, 2]}},
            {"name": "slow", "function": "nodejs-sleeper", "params": {"ms": "$.params.ms", "label": "slow"}},
            {"name": "late", "function": "nodejs-counter-late", "params": {"token": "late"}},
        ]}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);

    // Completed: every step's report, and the output.
    let done = submit(
        &app,
        &token,
        json!({"language_title": "pipeline-async", "params": {"ms": 10}}),
        None,
    )
    .await;
    assert_eq!(done.status, 202, "{:?}", done.body);
    let id = done.body["execution_id"].as_str().unwrap().to_owned();
    let view = wait_until(&app, &token, &id, Duration::from_secs(60), |e| {
        e["status"] == "completed"
    })
    .await;
    assert_eq!(view["result"]["input"]["token"], "late", "{view}");
    assert_eq!(view["progress"]["completed_steps"], 3, "{view}");
    assert_eq!(view["progress"]["total_steps"], 3);
    let statuses: Vec<&str> = view["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["completed", "completed", "completed"]);
    // Its events: each step's start and end, in order, before the final one.
    let (status, events) = crate::executions::read_events(&app, &token, &id, None, 100).await;
    assert_eq!(status, 200);
    let steps: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.event == "pipeline_step")
        .map(|e| {
            (
                e.data["step"].as_str().unwrap().to_owned(),
                e.data["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = ["quick", "slow", "late"]
        .iter()
        .flat_map(|s| {
            [
                (s.to_string(), "running".to_owned()),
                (s.to_string(), "completed".to_owned()),
            ]
        })
        .collect();
    assert_eq!(steps, expected);
    assert_eq!(events.last().unwrap().event, "completed");
    assert!(events.windows(2).all(|w| w[0].id + 1 == w[1].id));

    // Cancelled while the slow step runs: it stops, the last never starts.
    let slow = submit(
        &app,
        &token,
        json!({"language_title": "pipeline-async", "params": {"ms": 20000}}),
        None,
    )
    .await;
    let id = slow.body["execution_id"].as_str().unwrap().to_owned();
    let running = wait_until(&app, &token, &id, Duration::from_secs(30), |e| {
        e["progress"]["current_step"] == "slow"
    })
    .await;
    assert_eq!(running["steps"][0]["status"], "completed", "{running}");
    assert_eq!(running["progress"]["completed_steps"], 1);
    let cancelled = post(&app, &token, &format!("/api/v1/executions/{id}/cancel")).await;
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    let view = wait_until(&app, &token, &id, Duration::from_secs(10), |e| {
        e["status"] == "cancelled"
    })
    .await;
    assert_eq!(view["error"]["code"], "CANCELLED", "{view}");
    let statuses: Vec<&str> = view["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["completed", "cancelled", "skipped"], "{view}");

    assert_eq!(view["steps"][2]["attempts"], 0);
    assert!(view["steps"][2].get("execution_id").is_none());
    assert!(view.get("result").is_none());

    // A token without a step's language cannot submit it: 403, nothing queued.
    let r = register_pipeline(
        &app,
        "pipeline-async-python",
        json!({"steps": [{"function": "python-calculator", "params": {"operation": "add", "values": [1]}}]}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let partial = app.token("bob", &["execute:pipeline", "execute:nodejs"]);
    let r = submit(
        &app,
        &partial,
        json!({"language_title": "pipeline-async-python", "params": {}}),
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("execute:python"));
}

#[tokio::test(flavor = "multi_thread")]
async fn components_are_the_functions_usable_as_steps_with_their_schemas() {
    let app = spawn_app().await;
    let r = register_pipeline(&app, "pipeline-one", json!({"steps": [{"function": "wasm-hello"}]})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let reader = app.token("carol", &["read:functions", "execute:nodejs"]);
    let r = app.get(Some(&reader), "/api/v1/components?per_page=100").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let components = r.body["components"].as_array().unwrap();
    assert_eq!(r.body["total"], components.len());
    assert!(components.iter().all(|c| c["language"] != "pipeline"), "{components:?}");
    let calculator = components
        .iter()
        .find(|c| c["component_id"] == "nodejs-calculator")
        .expect("nodejs-calculator is a component");
    assert_eq!(calculator["input_schema"]["required"], json!(["operation", "values"]));
    assert_eq!(calculator["output_schema"]["required"], json!(["value"]));
    assert_eq!(calculator["executable"], true);
    let python = components
        .iter()
        .find(|c| c["component_id"] == "python-calculator")
        .unwrap();
    assert_eq!(python["executable"], false, "carol has no execute:python");

    let one = app.get(Some(&reader), "/api/v1/components/python-calculator").await;
    assert_eq!(one.status, 200, "{:?}", one.body);
    assert_eq!(one.body["language"], "python");
    let r = app.get(Some(&reader), "/api/v1/components/pipeline-one").await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    let no_scope = app.token("carol", &["execute:nodejs"]);
    assert_eq!(app.get(Some(&no_scope), "/api/v1/components").await.status, 403);
}
