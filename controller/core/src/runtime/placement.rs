//! Placement: which backend runs which function.
//!
//! Every language runs on the first backend that serves it (the process
//! backend for Node.js, Python and Rust, wasmtime for wasm) unless a rule
//! says otherwise. A rule names a language (`nodejs=docker`: every Node.js
//! function) or one Language-Title (`python-resize=docker`: that function,
//! every version); a title's rule wins over its language's. So one language
//! can run on two backends at once, and the pool keeps warm instances for
//! every (backend, language) a rule or a default uses.
//!
//! Rules are checked when the placement is made (at start-up): a backend
//! that does not exist, or does not run the language, is refused there
//! with a message that says so, never at the first execution.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::RuntimeBackend;
use crate::function::FunctionVersion;
use crate::language::{Language, LanguageTitle};

/// What a rule places: a whole language, or one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Language(Language),
    Function(LanguageTitle),
}

/// `SCOPE=BACKEND`: a language (`nodejs`) or a Language-Title
/// (`nodejs-calculator`), and the name of a backend (`process`, `wasm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementRule {
    pub scope: Scope,
    pub backend: String,
}

impl std::str::FromStr for PlacementRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scope, backend) = s
            .split_once('=')
            .ok_or_else(|| format!("placement '{s}' is not LANGUAGE=BACKEND or LANGUAGE-TITLE=BACKEND"))?;
        let (scope, backend) = (scope.trim(), backend.trim());
        if backend.is_empty() {
            return Err(format!("placement '{s}' names no backend"));
        }
        let scope =
            match scope.parse::<Language>() {
                Ok(language) => Scope::Language(language),
                Err(_) => Scope::Function(scope.parse::<LanguageTitle>().map_err(|e| {
                    format!("placement '{s}': '{scope}' is neither a language nor a Language-Title ({e})")
                })?),
            };
        Ok(PlacementRule {
            scope,
            backend: backend.to_owned(),
        })
    }
}

/// The backends, and which one runs each function.
pub struct Placement {
    backends: Vec<Arc<dyn RuntimeBackend>>,
    /// Index into `backends`, per language (defaults and language rules).
    by_language: BTreeMap<Language, usize>,
    /// Index into `backends`, per Language-Title with a rule of its own.
    by_title: HashMap<LanguageTitle, usize>,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |i: &usize| self.backends[*i].name();
        let languages: BTreeMap<_, _> = self.by_language.iter().map(|(l, i)| (l.as_str(), name(i))).collect();
        let titles: BTreeMap<_, _> = self.by_title.iter().map(|(t, i)| (t.as_str(), name(i))).collect();
        f.debug_struct("Placement")
            .field("languages", &languages)
            .field("functions", &titles)
            .finish()
    }
}

impl Placement {
    /// Each language on the first of `backends` that runs it, then `rules`
    /// in order (a later rule for the same scope wins).
    pub fn new(backends: Vec<Arc<dyn RuntimeBackend>>, rules: &[PlacementRule]) -> Result<Self, String> {
        let mut by_language = BTreeMap::new();
        for (i, backend) in backends.iter().enumerate() {
            for language in backend.languages() {
                by_language.entry(language).or_insert(i);
            }
        }
        let mut by_title = HashMap::new();
        for rule in rules {
            let Some(i) = backends.iter().position(|b| b.name() == rule.backend) else {
                let names: Vec<_> = backends.iter().map(|b| b.name()).collect();
                return Err(format!(
                    "placement of {}: there is no backend '{}' (backends here: {})",
                    rule.scope,
                    rule.backend,
                    names.join(", ")
                ));
            };
            let language = match &rule.scope {
                Scope::Language(language) => *language,
                Scope::Function(title) => title.language(),
            };
            if !backends[i].languages().contains(&language) {
                return Err(format!(
                    "placement of {}: the {} backend does not run {language}",
                    rule.scope, rule.backend
                ));
            }
            match &rule.scope {
                Scope::Language(language) => by_language.insert(*language, i),
                Scope::Function(title) => by_title.insert(title.clone(), i),
            };
        }
        Ok(Placement {
            backends,
            by_language,
            by_title,
        })
    }

    /// Everything on one backend.
    pub fn single(backend: Arc<dyn RuntimeBackend>) -> Self {
        Placement::new(vec![backend], &[]).expect("no rules to refuse")
    }

    /// The backend that runs `function`, if any does.
    pub fn backend_for(&self, function: &FunctionVersion) -> Option<&Arc<dyn RuntimeBackend>> {
        self.backend_for_title(&function.language_title)
    }

    /// The backend that runs the function `language_title`, if any does.
    pub fn backend_for_title(&self, language_title: &LanguageTitle) -> Option<&Arc<dyn RuntimeBackend>> {
        self.by_title
            .get(language_title)
            .or_else(|| self.by_language.get(&language_title.language()))
            .map(|i| &self.backends[*i])
    }

    /// The backend that runs `language`'s functions that have no rule of their own.
    pub fn backend_for_language(&self, language: Language) -> Option<&Arc<dyn RuntimeBackend>> {
        self.by_language.get(&language).map(|i| &self.backends[*i])
    }

    /// The languages some backend runs.
    pub fn languages(&self) -> Vec<Language> {
        self.by_language.keys().copied().collect()
    }

    /// Every (backend, language) that a function may run on: the pool keeps
    /// warm instances for each.
    /// Every backend, placed on or not.
    pub fn backends(&self) -> &[Arc<dyn RuntimeBackend>] {
        &self.backends
    }

    pub fn targets(&self) -> Vec<(Arc<dyn RuntimeBackend>, Language)> {
        let pairs: BTreeSet<(usize, Language)> = self
            .by_language
            .iter()
            .map(|(l, i)| (*i, *l))
            .chain(self.by_title.iter().map(|(t, i)| (*i, t.language())))
            .collect();
        pairs.into_iter().map(|(i, l)| (self.backends[i].clone(), l)).collect()
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Language(language) => write!(f, "{language}"),
            Scope::Function(title) => write!(f, "{title}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use time::OffsetDateTime;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::function::FunctionSpec;
    use crate::metrics::Metrics;
    use crate::runtime::fake::FakeBackend;
    use crate::runtime::pool::{InstancePool, PoolConfig, StartKind};

    fn function(title: &str) -> FunctionVersion {
        let spec = FunctionSpec {
            description: "a fake function".into(),
            ..Default::default()
        };
        let manifest = spec.normalize(Language::Nodejs).unwrap();
        let code = "module.exports.handler = () => 1;";
        let hash = manifest.code_hash(code);
        FunctionVersion::new(
            title.parse().unwrap(),
            1,
            manifest,
            code.into(),
            hash,
            OffsetDateTime::now_utc(),
        )
        .unwrap()
    }

    fn rules(specs: &[&str]) -> Vec<PlacementRule> {
        specs.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn rules_name_a_language_or_a_function_and_a_backend() {
        assert_eq!(
            "nodejs=docker".parse::<PlacementRule>().unwrap().scope,
            Scope::Language(Language::Nodejs)
        );
        assert_eq!(
            " python-resize = process ".parse::<PlacementRule>().unwrap(),
            PlacementRule {
                scope: Scope::Function("python-resize".parse().unwrap()),
                backend: "process".into()
            }
        );
        for bad in ["nodejs", "nodejs=", "cobol=process", "=process"] {
            assert!(bad.parse::<PlacementRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_rule_for_a_missing_backend_or_a_language_it_does_not_run_is_refused() {
        let a: Arc<dyn RuntimeBackend> = Arc::new(FakeBackend::named("a"));
        let unknown = Placement::new(vec![a.clone()], &rules(&["nodejs=docker"])).unwrap_err();
        assert!(
            unknown.contains("no backend 'docker'") && unknown.contains("backends here: a"),
            "{unknown}"
        );
        let foreign = Placement::new(vec![a], &rules(&["python-x=a"])).unwrap_err();
        assert!(foreign.contains("does not run python"), "{foreign}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn one_language_runs_on_two_backends_at_once_each_with_its_warm_pool() {
        // Arrange: Node.js on backend a, but nodejs-special on backend b.
        let a = Arc::new(FakeBackend::named("a"));
        let b = Arc::new(FakeBackend::named("b"));
        let (a_started, b_started) = (a.counters.clone(), b.counters.clone());
        let placement = Placement::new(vec![a, b], &rules(&["nodejs-special=b"])).unwrap();
        let names: Vec<_> = placement.targets().iter().map(|(b, l)| (b.name(), *l)).collect();
        assert_eq!(names, [("a", Language::Nodejs), ("b", Language::Nodejs)]);
        let config = PoolConfig {
            warm_per_language: 1,
            warm_memory_mb: crate::function::manifest::DEFAULT_MEMORY_MB,
            keep_warm: Duration::from_secs(60),
            max_idle_per_version: 8,
            room_wait: Duration::from_secs(30),
        };
        let pool = InstancePool::new(Arc::new(placement), config, Arc::new(Metrics::new()));
        let stop = CancellationToken::new();
        let upkeep = tokio::spawn(pool.clone().maintain(stop.clone()));
        let started = |c: &crate::runtime::fake::Counters| c.started.load(std::sync::atomic::Ordering::SeqCst);
        for _ in 0..100 {
            if started(&a_started) == 1 && started(&b_started) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            (started(&a_started), started(&b_started)),
            (1, 1),
            "a warm instance on each"
        );

        // Act: both at once.
        let (special, other) = (function("nodejs-special"), function("nodejs-other"));
        let (special, other) = tokio::join!(pool.acquire(&special), pool.acquire(&other));

        // Assert: each from its own backend's warm pool.
        let (special, other) = (special.unwrap(), other.unwrap());
        assert_eq!((special.start, other.start), (StartKind::Warm, StartKind::Warm));
        assert!(special.instance.id().starts_with("b-"), "{}", special.instance.id());
        assert!(other.instance.id().starts_with("a-"), "{}", other.instance.id());
        stop.cancel();
        let _ = upkeep.await;
        // The refills went to the right backend too (one more each at most).
        assert!(started(&a_started) <= 2 && started(&b_started) <= 2);
        pool.discard(special).await;
        pool.discard(other).await;
        pool.shutdown().await;
    }
}
