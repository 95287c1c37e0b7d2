//! Pipelines: functions whose body is other functions.
//!
//! A `pipeline-*` function's manifest lists `steps`; each step names a
//! function (its Language-Title) and maps the pipeline's params and earlier
//! steps' outputs to its own params with small path expressions
//! (`$.params.width`, `$.steps.resize.output.file_id`). Steps run after the
//! step before them in the list unless `after` says otherwise, so a list is a
//! sequence and `after` makes a DAG whose independent branches run in
//! parallel. docs/pipelines.md is the user's reference.
//!
//! # Layout
//!
//! - [`StepSpec`] / [`PipelineSpec`]: what an author writes; [`Pipeline`] and
//!   [`Step`]: the checked form stored in the manifest, with every step's
//!   dependencies resolved and a run order.
//! - [`Expr`] and [`evaluate`]: the mapping expressions.
//!
//! What needs the registry (every step exists, is not itself a pipeline, gets
//! the params its schema requires) is checked by the controller's registry.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::manifest::{MAX_MANIFEST_TIMEOUT_MS, ManifestError};
use crate::language::{Language, LanguageTitle};

/// Most steps a pipeline may have when the controller sets no other limit.
pub const DEFAULT_MAX_STEPS: usize = 50;
/// Most attempts of one step.
const MAX_STEP_ATTEMPTS: u32 = 10;
/// Longest wait before a step's second attempt.
const MAX_STEP_BACKOFF_MS: u64 = 60_000;

/// One step as an author writes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// The step's name in expressions and progress (`[A-Za-z0-9_-]{1,64}`);
    /// defaults to the function's Language-Title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The function it runs: a Language-Title of another language than `pipeline`.
    pub function: String,
    /// The step's params: any JSON, where a string `$.…` is replaced by the
    /// value it points at. Default: the pipeline's params for a step that
    /// depends on no other, the output of the one step a step depends on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub params: Option<Value>,
    /// The steps it waits for. Default: the step before it in the list
    /// (none for the first); `[]` starts it with the pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<String>>,
    /// The longest one attempt may take (default: the function's own
    /// timeout), always within what is left of the pipeline's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Attempts after a failure (`max_attempts` 1 to 10, `backoff_ms` 0 to
    /// 60000, doubled each time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<StepRetrySpec>,
    /// `fail` (default): a failing step stops the pipeline. `continue`: the
    /// step's output is `fallback` and the pipeline goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<OnError>,
    /// The output of a failed step with `on_error: continue` (default null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub fallback: Option<Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepRetrySpec {
    pub max_attempts: Option<u32>,
    pub backoff_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Fail,
    Continue,
}

/// The pipeline part of a manifest as written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PipelineSpec {
    pub steps: Vec<StepSpec>,
    /// The pipeline's output; default: the last listed step's output.
    pub output: Option<Value>,
}

/// A checked step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub function: String,
    /// None: the default input (see [`StepSpec::params`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
    /// Indexes of the steps it waits for.
    pub after: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    pub max_attempts: u32,
    pub backoff_ms: u64,
    pub on_error: OnError,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub fallback: Value,
}

/// A checked pipeline, as stored in its manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

fn invalid<T>(message: impl Into<String>) -> Result<T, ManifestError> {
    Err(ManifestError(message.into()))
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl PipelineSpec {
    /// Checks the structure (names, `after`, expressions, no cycles, no
    /// forward references) of a pipeline of at most `max_steps` steps.
    pub fn normalize(self, max_steps: usize) -> Result<Pipeline, ManifestError> {
        if self.steps.is_empty() {
            return invalid("a pipeline needs 'steps' (at least one)");
        }
        if self.steps.len() > max_steps {
            return invalid(format!("a pipeline has at most {max_steps} steps"));
        }
        let names: Vec<String> = self
            .steps
            .iter()
            .map(|s| s.name.clone().unwrap_or_else(|| s.function.clone()))
            .collect();
        let mut index = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            if !valid_name(name) {
                return invalid(format!("steps[{i}]: 'name' must match [A-Za-z0-9_-]{{1,64}}"));
            }
            if index.insert(name.as_str(), i).is_some() {
                return invalid(format!("steps[{i}]: two steps are named '{name}' (give one a 'name')"));
            }
        }
        let mut steps = Vec::with_capacity(self.steps.len());
        for (i, spec) in self.steps.iter().enumerate() {
            let name = &names[i];
            let function: LanguageTitle = spec
                .function
                .parse()
                .map_err(|e| ManifestError(format!("step '{name}': 'function': {e}")))?;
            if function.language() == Language::Pipeline {
                return invalid(format!(
                    "step '{name}': a step runs a function, not another pipeline ('{function}')"
                ));
            }
            let after = match &spec.after {
                None => (i > 0).then(|| i - 1).into_iter().collect(),
                Some(list) => {
                    let mut after = Vec::new();
                    for dep in list {
                        let Some(&d) = index.get(dep.as_str()) else {
                            return invalid(format!("step '{name}': 'after' names an unknown step '{dep}'"));
                        };
                        if d == i {
                            return invalid(format!("step '{name}': 'after' names the step itself"));
                        }
                        if !after.contains(&d) {
                            after.push(d);
                        }
                    }
                    after
                }
            };
            if let Some(t) = spec.timeout_ms
                && !(1..=MAX_MANIFEST_TIMEOUT_MS).contains(&t)
            {
                return invalid(format!(
                    "step '{name}': 'timeout_ms' must be between 1 and {MAX_MANIFEST_TIMEOUT_MS}"
                ));
            }
            let retry = spec.retry.unwrap_or_default();
            let max_attempts = retry.max_attempts.unwrap_or(1);
            if !(1..=MAX_STEP_ATTEMPTS).contains(&max_attempts) {
                return invalid(format!(
                    "step '{name}': 'retry.max_attempts' must be between 1 and {MAX_STEP_ATTEMPTS}"
                ));
            }
            let backoff_ms = retry.backoff_ms.unwrap_or(100);
            if backoff_ms > MAX_STEP_BACKOFF_MS {
                return invalid(format!(
                    "step '{name}': 'retry.backoff_ms' must be at most {MAX_STEP_BACKOFF_MS}"
                ));
            }
            let on_error = spec.on_error.unwrap_or_default();
            if spec.fallback.is_some() && on_error != OnError::Continue {
                return invalid(format!(
                    "step '{name}': 'fallback' is used only with 'on_error': 'continue'"
                ));
            }
            steps.push(Step {
                name: name.clone(),
                function: function.to_string(),
                params: spec.params.clone(),
                after,
                timeout_ms: spec.timeout_ms,
                max_attempts,
                backoff_ms,
                on_error,
                fallback: spec.fallback.clone().unwrap_or(Value::Null),
            });
        }
        let pipeline = Pipeline {
            steps,
            output: self.output,
        };
        let order = pipeline.order().map_err(ManifestError)?;
        // Which steps surely ran before each one (its ancestors), in run order.
        let mut ancestors: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); pipeline.steps.len()];
        for &i in &order {
            let mut set = BTreeSet::new();
            for &d in &pipeline.steps[i].after {
                set.insert(d);
                set.extend(ancestors[d].iter().copied());
            }
            ancestors[i] = set;
        }
        for (i, step) in pipeline.steps.iter().enumerate() {
            let field = format!("step '{}': 'params'", step.name);
            if let Some(params) = &step.params {
                for referenced in references(params, &field)? {
                    let Some(&r) = index.get(referenced.as_str()) else {
                        return invalid(format!("{field} refers to an unknown step '{referenced}'"));
                    };
                    if !ancestors[i].contains(&r) {
                        return invalid(format!(
                            "{field} refers to step '{referenced}', which does not run before it \
                             (a forward reference: list it in 'after')"
                        ));
                    }
                }
            } else if step.after.len() > 1 {
                return invalid(format!(
                    "step '{}' waits for several steps: give it 'params' saying what it takes from them",
                    step.name
                ));
            }
        }
        if let Some(output) = &pipeline.output {
            for referenced in references(output, "'output'")? {
                if !index.contains_key(referenced.as_str()) {
                    return invalid(format!("'output' refers to an unknown step '{referenced}'"));
                }
            }
        }
        Ok(pipeline)
    }
}

impl Pipeline {
    /// The steps in an order where each comes after those it waits for;
    /// an error names the steps of a cycle.
    pub fn order(&self) -> Result<Vec<usize>, String> {
        let n = self.steps.len();
        let mut waiting: Vec<usize> = self.steps.iter().map(|s| s.after.len()).collect();
        let mut ready: Vec<usize> = (0..n).filter(|&i| waiting[i] == 0).rev().collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop() {
            order.push(i);
            for (j, step) in self.steps.iter().enumerate() {
                if step.after.contains(&i) {
                    waiting[j] -= 1;
                    if waiting[j] == 0 {
                        ready.push(j);
                    }
                }
            }
        }
        if order.len() < n {
            let stuck: Vec<&str> = (0..n)
                .filter(|&i| waiting[i] > 0)
                .map(|i| self.steps[i].name.as_str())
                .collect();
            return Err(format!("the steps form a cycle through 'after': {}", stuck.join(", ")));
        }
        Ok(order)
    }

    /// The steps that wait for step `i`.
    pub fn dependents(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        self.steps
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.after.contains(&i))
            .map(|(j, _)| j)
    }

    /// The steps as an author would write them (`after` by name).
    pub fn specs(&self) -> Vec<StepSpec> {
        self.steps
            .iter()
            .map(|s| StepSpec {
                name: Some(s.name.clone()),
                function: s.function.clone(),
                params: s.params.clone(),
                after: Some(s.after.iter().map(|&d| self.steps[d].name.clone()).collect()),
                timeout_ms: s.timeout_ms,
                retry: (s.max_attempts > 1).then_some(StepRetrySpec {
                    max_attempts: Some(s.max_attempts),
                    backoff_ms: Some(s.backoff_ms),
                }),
                on_error: (s.on_error == OnError::Continue).then_some(OnError::Continue),
                fallback: (s.on_error == OnError::Continue).then(|| s.fallback.clone()),
            })
            .collect()
    }

    /// The index of the step whose output is the pipeline's without `output`.
    pub fn last(&self) -> usize {
        self.steps.len() - 1
    }
}

/// A mapping expression: `$.params…`, `$.context…` or `$.steps.NAME.output…`,
/// then `.key` or `[index]` segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Params(Vec<Segment>),
    Context(Vec<Segment>),
    Step { name: String, path: Vec<Segment> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

impl Expr {
    /// `None` for a string that is not an expression (a literal); `$$…`
    /// is the literal `$…`.
    pub fn parse(text: &str) -> Option<Result<Expr, String>> {
        if !text.starts_with("$.") && text != "$" {
            return None;
        }
        Some(Self::parse_path(text))
    }

    fn parse_path(text: &str) -> Result<Expr, String> {
        let bad = |why: &str| {
            Err(format!(
                "bad expression '{}': {why}",
                text.chars().take(80).collect::<String>()
            ))
        };
        let mut segments = Vec::new();
        let mut rest = &text[1..];
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('.') {
                let end = after.find(['.', '[']).unwrap_or(after.len());
                let key = &after[..end];
                if !valid_name(key) {
                    return bad("a key is [A-Za-z0-9_-]+ (use [N] for an index)");
                }
                segments.push(Segment::Key(key.to_owned()));
                rest = &after[end..];
            } else if let Some(after) = rest.strip_prefix('[') {
                let Some(end) = after.find(']') else {
                    return bad("'[' without ']'");
                };
                let Ok(index) = after[..end].parse::<usize>() else {
                    return bad("an index is a number: [0]");
                };
                segments.push(Segment::Index(index));
                rest = &after[end + 1..];
            } else {
                return bad("expected '.key' or '[index]'");
            }
        }
        let mut segments = segments.into_iter();
        match segments.next() {
            Some(Segment::Key(k)) if k == "params" => Ok(Expr::Params(segments.collect())),
            Some(Segment::Key(k)) if k == "context" => Ok(Expr::Context(segments.collect())),
            Some(Segment::Key(k)) if k == "steps" => {
                let Some(Segment::Key(name)) = segments.next() else {
                    return bad("'$.steps' is followed by a step's name");
                };
                match segments.next() {
                    Some(Segment::Key(o)) if o == "output" => Ok(Expr::Step {
                        name,
                        path: segments.collect(),
                    }),
                    _ => bad("a step's value is '$.steps.NAME.output…'"),
                }
            }
            _ => bad("it starts with $.params, $.context or $.steps"),
        }
    }
}

/// The names of the steps `template` refers to; an error names the field
/// and the bad expression.
pub fn references(template: &Value, field: &str) -> Result<BTreeSet<String>, ManifestError> {
    let mut found = BTreeSet::new();
    let mut pending = vec![template];
    while let Some(value) = pending.pop() {
        match value {
            Value::String(s) => match Expr::parse(s) {
                Some(Ok(Expr::Step { name, .. })) => {
                    found.insert(name);
                }
                Some(Ok(_)) | None => {}
                Some(Err(e)) => return invalid(format!("{field}: {e}")),
            },
            Value::Array(items) => pending.extend(items),
            Value::Object(map) => pending.extend(map.values()),
            _ => {}
        }
    }
    Ok(found)
}

/// What expressions read: the pipeline's params and context, and the
/// outputs of the steps that have finished.
pub trait Scope {
    fn params(&self) -> &Value;
    fn context(&self) -> &Value;
    fn output(&self, step: &str) -> Option<&Value>;
}

/// `template` with every expression replaced by its value. A key whose
/// expression points at nothing is left out (so the step's defaults apply);
/// elsewhere nothing reads as null.
pub fn evaluate(template: &Value, scope: &dyn Scope) -> Value {
    match template {
        Value::String(s) => match Expr::parse(s) {
            Some(Ok(expr)) => resolve(&expr, scope).cloned().unwrap_or(Value::Null),
            // Checked at registration; a literal otherwise.
            Some(Err(_)) => Value::Null,
            None => Value::String(
                s.strip_prefix('$')
                    .filter(|r| r.starts_with('$'))
                    .unwrap_or(s)
                    .to_owned(),
            ),
        },
        Value::Array(items) => Value::Array(items.iter().map(|v| evaluate(v, scope)).collect()),
        Value::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (key, value) in map {
                if let Value::String(s) = value
                    && let Some(Ok(expr)) = Expr::parse(s)
                {
                    if let Some(found) = resolve(&expr, scope) {
                        out.insert(key.clone(), found.clone());
                    }
                    continue;
                }
                out.insert(key.clone(), evaluate(value, scope));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

fn resolve<'a>(expr: &Expr, scope: &'a dyn Scope) -> Option<&'a Value> {
    let (root, path) = match expr {
        Expr::Params(path) => (scope.params(), path),
        Expr::Context(path) => (scope.context(), path),
        Expr::Step { name, path } => (scope.output(name)?, path),
    };
    path.iter().try_fold(root, |value, segment| match segment {
        Segment::Key(k) => value.get(k),
        Segment::Index(i) => value.get(i),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(steps: Value) -> PipelineSpec {
        PipelineSpec {
            steps: serde_json::from_value(steps).unwrap(),
            output: None,
        }
    }

    fn refused(steps: Value) -> String {
        spec(steps).normalize(DEFAULT_MAX_STEPS).unwrap_err().0
    }

    #[test]
    fn a_list_is_a_sequence_and_after_makes_a_dag() {
        let p = spec(json!([
            {"function": "nodejs-a"},
            {"function": "python-b"},
            {"name": "c", "function": "wasm-c", "after": []},
            {"name": "d", "function": "nodejs-a", "after": ["python-b", "c"],
             "params": {"x": "$.steps.python-b.output.x", "y": "$.steps.c.output"}},
        ]))
        .normalize(DEFAULT_MAX_STEPS)
        .unwrap();
        let after: Vec<_> = p.steps.iter().map(|s| s.after.clone()).collect();
        assert_eq!(after, [vec![], vec![0], vec![], vec![1, 2]]);
        let order = p.order().unwrap();
        assert_eq!(order.len(), 4);
        assert!(order.iter().position(|&i| i == 3) > order.iter().position(|&i| i == 1));
    }

    #[test]
    fn refuses_cycles_forward_references_and_unknown_steps() {
        let e = refused(json!([
            {"name": "a", "function": "nodejs-a", "after": ["b"]},
            {"name": "b", "function": "nodejs-b", "after": ["a"]},
        ]));
        assert!(e.contains("cycle") && e.contains('a') && e.contains('b'), "{e}");
        let e = refused(json!([
            {"name": "a", "function": "nodejs-a", "params": {"x": "$.steps.b.output.x"}},
            {"name": "b", "function": "nodejs-b"},
        ]));
        assert!(e.contains("forward reference") && e.contains("'b'"), "{e}");
        let e = refused(json!([{"name": "a", "function": "nodejs-a", "after": ["zz"]}]));
        assert!(e.contains("unknown step 'zz'"), "{e}");
        let e = refused(json!([{"name": "a", "function": "nodejs-a", "params": {"x": "$.steps.zz.output"}}]));
        assert!(e.contains("unknown step 'zz'"), "{e}");
        let e = refused(json!([{"function": "pipeline-other"}]));
        assert!(e.contains("not another pipeline"), "{e}");
        let e = refused(json!([{"function": "nodejs-a"}, {"function": "nodejs-a"}]));
        assert!(e.contains("two steps are named"), "{e}");
        let e = refused(json!([{"function": "nodejs-a", "params": {"x": "$.nothing"}}]));
        assert!(e.contains("bad expression"), "{e}");
        let e = refused(json!([{"function": "nodejs-a", "fallback": 1}]));
        assert!(e.contains("on_error"), "{e}");
        assert!(refused(json!([])).contains("at least one"));
        let many: Vec<Value> = (0..4)
            .map(|i| json!({"name": format!("s{i}"), "function": "nodejs-a"}))
            .collect();
        let e = spec(Value::Array(many)).normalize(3).unwrap_err().0;
        assert!(e.contains("at most 3"), "{e}");
    }

    struct Fixed(Value, Value, BTreeMap<String, Value>);
    impl Scope for Fixed {
        fn params(&self) -> &Value {
            &self.0
        }
        fn context(&self) -> &Value {
            &self.1
        }
        fn output(&self, step: &str) -> Option<&Value> {
            self.2.get(step)
        }
    }

    #[test]
    fn expressions_pick_values_and_leave_out_missing_keys() {
        let scope = Fixed(
            json!({"w": 640, "items": [{"id": "a"}, {"id": "b"}]}),
            json!({"user": "u1"}),
            BTreeMap::from([("resize".to_owned(), json!({"file_id": "f1", "size": [1, 2]}))]),
        );
        let template = json!({
            "width": "$.params.w",
            "second": "$.params.items[1].id",
            "file": "$.steps.resize.output.file_id",
            "h": "$.steps.resize.output.size[1]",
            "who": "$.context.user",
            "missing": "$.params.nope",
            "literal": "$$.params.w",
            "plain": "hello",
            "nested": {"all": "$.params", "list": ["$.params.w", "$.params.nope", 3]},
        });
        assert_eq!(
            evaluate(&template, &scope),
            json!({
                "width": 640, "second": "b", "file": "f1", "h": 2, "who": "u1",
                "literal": "$.params.w", "plain": "hello",
                "nested": {"all": {"w": 640, "items": [{"id": "a"}, {"id": "b"}]}, "list": [640, null, 3]},
            })
        );
    }
}
