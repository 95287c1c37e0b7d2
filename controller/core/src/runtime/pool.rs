//! The instance pool: generic warm instances per backend, language and
//! memory class, and idle specialised instances per function version.
//!
//! `acquire` prefers, in order: an idle instance already specialised for the
//! version (no start, no `/init`), a generic warm instance (one `/init`), and
//! only then a cold start. A background task keeps the warm pool full, reaps
//! idle instances after the keep-warm period, and records each language's
//! health. An instance serves one function version for its life: it goes
//! back to that version's idle list or it is terminated. Which backend
//! starts a function's instances is the [`Placement`]'s answer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::placement::Placement;
use super::{Instance, InstanceError, RuntimeBackend, Shape, StartFor};
use crate::function::FunctionVersion;
use crate::language::Language;
use crate::metrics::Metrics;

/// How long a refill waits after a warm instance was handed out while the
/// pool still holds others (see `maintain`).
const REFILL_DELAY: Duration = Duration::from_millis(50);

/// A function version, as the pool tells instances apart: its
/// Language-Title, its registration (a name deleted and registered again
/// counts from version 1 again: an instance of the deleted code must never
/// serve the new one) and its number.
pub type VersionKey = (String, Arc<str>, i64);

/// Generic warm instances are told apart by backend, language and memory
/// class (today one class: `PoolConfig::warm_memory_mb`).
type WarmKey = (&'static str, Language, u64);

#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Generic instances kept ready per backend and language.
    pub warm_per_language: usize,
    /// Memory cap of the generic warm instances: functions with this cap (the
    /// default) start from the warm pool; others start cold with their own.
    pub warm_memory_mb: u64,
    /// How long an idle specialised instance is kept.
    pub keep_warm: Duration,
    /// Most idle instances kept per function version.
    pub max_idle_per_version: usize,
    /// How long a start waits for room (an instance uid, memory in the
    /// budget, a container slot) before it fails.
    pub room_wait: Duration,
}

/// How the instance behind a lease was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// An idle instance already specialised for this version.
    Reused,
    /// A generic warm instance, specialised now.
    Warm,
    /// Started now: a cold start.
    Cold,
}

impl StartKind {
    pub fn is_cold(self) -> bool {
        self == StartKind::Cold
    }
}

/// An instance handed out by the pool; give it back with
/// [`InstancePool::release`] or [`InstancePool::discard`].
pub struct Lease {
    pub instance: Box<dyn Instance>,
    pub key: VersionKey,
    pub start: StartKind,
    /// The pool's eviction count when it was handed out.
    evictions: u64,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("instance", &self.instance.id())
            .field("key", &self.key)
            .field("start", &self.start)
            .finish()
    }
}

/// An idle specialised instance and when it was given back.
type Idle = (Box<dyn Instance>, Instant);

/// A language's state as `/health` shows it.
#[derive(Debug, Clone)]
enum LanguageHealth {
    Unknown,
    Ok,
    Error { message: String, retry_at: Instant },
}

pub struct InstancePool {
    placement: Arc<Placement>,
    config: PoolConfig,
    /// Generic, not yet initialised instances.
    warm: Mutex<HashMap<WarmKey, Vec<Box<dyn Instance>>>>,
    /// Specialised instances waiting for their version's next execution.
    idle: Mutex<HashMap<VersionKey, Vec<Idle>>>,
    /// Functions evicted (deleted), with the eviction count after each: an
    /// instance handed out before its function's eviction is stopped when
    /// it comes back rather than kept idle for no one.
    evicted: Mutex<HashMap<String, u64>>,
    evictions: AtomicU64,
    /// Per backend and language: the last start's outcome.
    health: Mutex<BTreeMap<(&'static str, Language), LanguageHealth>>,
    /// Instances handed out and not yet returned.
    busy: AtomicI64,
    /// Wakes the maintenance task when a warm instance was taken.
    refill: Notify,
    shutting_down: AtomicBool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for InstancePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstancePool")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl InstancePool {
    pub fn new(placement: Arc<Placement>, config: PoolConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        let health = placement
            .targets()
            .into_iter()
            .map(|(b, l)| ((b.name(), l), LanguageHealth::Unknown))
            .collect();
        Arc::new(InstancePool {
            placement,
            config,
            warm: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
            evicted: Mutex::new(HashMap::new()),
            evictions: AtomicU64::new(0),
            health: Mutex::new(health),
            busy: AtomicI64::new(0),
            refill: Notify::new(),
            shutting_down: AtomicBool::new(false),
            metrics,
        })
    }

    /// An instance specialised for `function`.
    pub async fn acquire(&self, function: &FunctionVersion) -> Result<Lease, InstanceError> {
        let key: VersionKey = (
            function.language_title.to_string(),
            function.registration.clone(),
            function.version,
        );
        let language = function.language();
        let backend = self
            .placement
            .backend_for(function)
            .ok_or_else(|| InstanceError::Unavailable {
                language,
                message: "no backend runs this language".into(),
            })?
            .clone();
        if let Some(instance) = self.take_idle(&key) {
            self.metrics.record_acquire(backend.name(), language, "reused");
            return Ok(self.lease(instance, key, StartKind::Reused));
        }
        // Before a warm instance is spent on it: a crate must be built.
        backend.ready(function).await?;
        let shape = Shape::of(function);
        // Warm instances have no network: a function with egress starts its own.
        let warm = if shape.network.is_empty() {
            self.take_warm(&(backend.name(), language, shape.memory_mb))
        } else {
            None
        };
        let (mut instance, start) = match warm {
            Some(instance) => (instance, StartKind::Warm),
            None => {
                let started = Instant::now();
                let mut result = self.start(&backend, language, &shape, StartFor::Init).await;
                // No room for another instance: the longest idle one makes
                // room, else a generic warm one (the pool keeps those only
                // while there is room); with neither, the start waits (a
                // while) for a busy one to come back rather than failing a
                // burst.
                let mut pause = Duration::from_millis(20);
                while matches!(result, Err(InstanceError::Exhausted { .. }))
                    && started.elapsed() < self.config.room_wait
                {
                    // One of this version's came back meanwhile: it serves.
                    if let Some(instance) = self.take_idle(&key) {
                        self.metrics.record_acquire(backend.name(), language, "reused");
                        return Ok(self.lease(instance, key, StartKind::Reused));
                    }
                    match self.take_oldest_idle().or_else(|| self.take_any_warm()) {
                        Some(mut oldest) => oldest.terminate().await,
                        None => {
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_millis(500));
                        }
                    }
                    result = self.start(&backend, language, &shape, StartFor::Init).await;
                }
                let instance = result?;
                self.metrics.record_cold_start(language, started.elapsed());
                (instance, StartKind::Cold)
            }
        };
        let result = if start == StartKind::Warm { "warm" } else { "cold" };
        self.metrics.record_acquire(backend.name(), language, result);
        let started = Instant::now();
        let initialized = instance.init(function).await;
        // The refill starts only now: a runtime starting up takes a core or
        // two for tens of milliseconds, which the `/init` it would replace
        // must not wait behind.
        self.refill.notify_one();
        if let Err(e) = initialized {
            instance.terminate().await;
            return Err(e);
        }
        self.metrics.record_init(language, started.elapsed());
        Ok(self.lease(instance, key, start))
    }

    fn lease(&self, instance: Box<dyn Instance>, key: VersionKey, start: StartKind) -> Lease {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Lease {
            instance,
            key,
            start,
            evictions: self.evictions.load(Ordering::Acquire),
        }
    }

    /// Gives back a healthy instance: it waits, idle, for its version's next execution.
    pub async fn release(&self, mut lease: Lease) {
        self.busy.fetch_sub(1, Ordering::Relaxed);
        if self.shutting_down.load(Ordering::Relaxed) || !lease.instance.is_alive() {
            lease.instance.terminate().await;
            return;
        }
        let surplus = {
            let mut idle = self.idle.lock().unwrap();
            if self.evicted_since(&lease) {
                drop(idle);
                lease.instance.terminate().await;
                return;
            }
            let list = idle.entry(lease.key).or_default();
            list.push((lease.instance, Instant::now()));
            if list.len() > self.config.max_idle_per_version {
                Some(list.remove(0).0)
            } else {
                None
            }
        };
        if let Some(mut instance) = surplus {
            instance.terminate().await;
        }
    }

    /// Terminates an instance that must not serve again (timed out, crashed).
    pub async fn discard(&self, mut lease: Lease) {
        self.busy.fetch_sub(1, Ordering::Relaxed);
        lease.instance.terminate().await;
        self.refill.notify_one();
    }

    /// Terminates the idle instances of every version of a function (it was
    /// updated or deleted).
    pub async fn evict_function(&self, language_title: &str) {
        let evicted: Vec<_> = {
            let mut idle = self.idle.lock().unwrap();
            // Under the idle lock, so a release sees either the count or
            // its instance evicted here.
            let count = self.evictions.fetch_add(1, Ordering::AcqRel) + 1;
            self.evicted.lock().unwrap().insert(language_title.to_owned(), count);
            let keys: Vec<_> = idle.keys().filter(|k| k.0 == language_title).cloned().collect();
            keys.into_iter().filter_map(|k| idle.remove(&k)).flatten().collect()
        };
        for (mut instance, _) in evicted {
            instance.terminate().await;
        }
    }

    /// Stops the idle instances of one version of a function (it was
    /// deleted). One handed out now comes back idle and is stopped by the
    /// idle limit like any other: nothing asks for it again.
    pub async fn evict_version(&self, language_title: &str, version: i64) {
        let evicted: Vec<_> = {
            let mut idle = self.idle.lock().unwrap();
            let keys: Vec<_> = idle
                .keys()
                .filter(|k| k.0 == language_title && k.2 == version)
                .cloned()
                .collect();
            keys.into_iter().filter_map(|k| idle.remove(&k)).flatten().collect()
        };
        for (mut instance, _) in evicted {
            instance.terminate().await;
        }
    }

    /// Whether the lease's function was evicted after it was handed out.
    fn evicted_since(&self, lease: &Lease) -> bool {
        // Nothing was evicted since: no lookup (the usual case).
        if self.evictions.load(Ordering::Acquire) == lease.evictions {
            return false;
        }
        let evicted = self.evicted.lock().unwrap();
        evicted.get(&lease.key.0).is_some_and(|at| *at > lease.evictions)
    }

    /// The idle instance given back longest ago, of any version.
    fn take_oldest_idle(&self) -> Option<Box<dyn Instance>> {
        let mut idle = self.idle.lock().unwrap();
        let (key, index, _) = idle
            .iter()
            .flat_map(|(key, list)| list.iter().enumerate().map(move |(i, (_, at))| (key, i, *at)))
            .min_by_key(|(_, _, at)| *at)
            .map(|(key, i, at)| (key.clone(), i, at))?;
        let list = idle.get_mut(&key)?;
        let (instance, _) = list.remove(index);
        if list.is_empty() {
            idle.remove(&key);
        }
        Some(instance)
    }

    /// A generic warm instance of any backend, language and memory class.
    fn take_any_warm(&self) -> Option<Box<dyn Instance>> {
        self.warm.lock().unwrap().values_mut().find_map(Vec::pop)
    }

    fn take_idle(&self, key: &VersionKey) -> Option<Box<dyn Instance>> {
        let mut idle = self.idle.lock().unwrap();
        let list = idle.get_mut(key)?;
        // Most recently used first: it is the likeliest to be warm in cache.
        while let Some((mut instance, _)) = list.pop() {
            if instance.is_alive() {
                return Some(instance);
            }
        }
        None
    }

    fn take_warm(&self, key: &WarmKey) -> Option<Box<dyn Instance>> {
        let mut warm = self.warm.lock().unwrap();
        let list = warm.get_mut(key)?;
        while let Some(mut instance) = list.pop() {
            if instance.is_alive() {
                return Some(instance);
            }
        }
        None
    }

    async fn start(
        &self,
        backend: &Arc<dyn RuntimeBackend>,
        language: Language,
        shape: &Shape,
        purpose: StartFor,
    ) -> Result<Box<dyn Instance>, InstanceError> {
        let started = Instant::now();
        let result = backend.start(language, shape, purpose).await;
        if result.is_ok() {
            self.metrics
                .record_instance_start(backend.name(), language, started.elapsed());
        }
        let state = match &result {
            Ok(_) => LanguageHealth::Ok,
            // No room is busy, not broken.
            Err(InstanceError::Exhausted { .. }) => return result,
            Err(e) => LanguageHealth::Error {
                message: e.to_string(),
                retry_at: Instant::now() + Duration::from_secs(10),
            },
        };
        self.health.lock().unwrap().insert((backend.name(), language), state);
        result
    }

    /// `ok`, `error` or `unknown` (not started yet) per language: an error
    /// on any of its backends (named in the message) wins, then unknown.
    pub fn health(&self) -> BTreeMap<Language, (&'static str, Option<String>)> {
        let mut out: BTreeMap<Language, (&'static str, Option<String>)> = BTreeMap::new();
        for ((backend, language), h) in self.health.lock().unwrap().iter() {
            let shown = match h {
                LanguageHealth::Unknown => ("unknown", None),
                LanguageHealth::Ok => ("ok", None),
                LanguageHealth::Error { message, .. } => ("error", Some(format!("{backend} backend: {message}"))),
            };
            let rank = |s: &str| ["ok", "unknown", "error"].iter().position(|r| *r == s);
            match out.get(language) {
                Some(seen) if rank(seen.0) >= rank(shown.0) => {}
                _ => {
                    out.insert(*language, shown);
                }
            }
        }
        out
    }

    /// Warm and idle instances of one backend, per language (`/health`
    /// shows the docker backend's pool).
    pub fn sizes_of(&self, backend: &str) -> BTreeMap<Language, (i64, i64)> {
        let mut out: BTreeMap<Language, (i64, i64)> = BTreeMap::new();
        for ((name, language, _), list) in self.warm.lock().unwrap().iter() {
            if *name == backend {
                out.entry(*language).or_default().0 += list.len() as i64;
            }
        }
        for (key, list) in self.idle.lock().unwrap().iter() {
            if let Ok(lt) = key.0.parse::<crate::language::LanguageTitle>()
                && self
                    .placement
                    .backend_for_title(&lt)
                    .is_some_and(|b| b.name() == backend)
            {
                out.entry(lt.language()).or_default().1 += list.len() as i64;
            }
        }
        for (b, language) in self.placement.targets() {
            if b.name() == backend {
                out.entry(language).or_default();
            }
        }
        out
    }

    /// Every backend's name, for `/metrics`.
    pub fn backend_names(&self) -> Vec<&'static str> {
        self.placement.backends().iter().map(|b| b.name()).collect()
    }

    /// Instance counts by language and state, for `/metrics`.
    pub fn counts(&self) -> (Vec<(Language, &'static str, i64)>, i64) {
        let mut out = Vec::new();
        let mut warm: BTreeMap<Language, i64> = BTreeMap::new();
        for ((_, language, _), list) in self.warm.lock().unwrap().iter() {
            *warm.entry(*language).or_default() += list.len() as i64;
        }
        let mut idle: BTreeMap<Language, i64> = BTreeMap::new();
        for (key, list) in self.idle.lock().unwrap().iter() {
            if let Ok(lt) = key.0.parse::<crate::language::LanguageTitle>() {
                *idle.entry(lt.language()).or_default() += list.len() as i64;
            }
        }
        for language in self.placement.languages() {
            out.push((language, "warm", warm.get(&language).copied().unwrap_or(0)));
            out.push((language, "idle", idle.get(&language).copied().unwrap_or(0)));
        }
        (out, self.busy.load(Ordering::Relaxed))
    }

    /// Runs until `stop` is cancelled (or the pool shuts down): keeps the
    /// warm pool full and reaps idle instances. An instance being started
    /// when it stops is let finish its start and then terminated: dropped
    /// mid-start, it was only sent a kill, and the controller could exit
    /// before it was gone.
    pub async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        loop {
            if self.stopping(&stop) {
                return;
            }
            self.fill_warm(&stop).await;
            self.reap_idle().await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.refill.notified() => {
                    // A warm instance was just handed out, and its first
                    // run likely follows at once: a runtime starting up
                    // beside it takes a core for tens of milliseconds.
                    // The refill waits a little, unless the pool ran dry
                    // (the next initialize would start cold) or another
                    // hand-out comes meanwhile (a burst).
                    if !self.any_warm_list_empty() {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(REFILL_DELAY) => {}
                            _ = self.refill.notified() => {}
                        }
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    fn stopping(&self, stop: &CancellationToken) -> bool {
        self.shutting_down.load(Ordering::Relaxed) || stop.is_cancelled()
    }

    /// Whether some backend and language the pool keeps warm has none left.
    fn any_warm_list_empty(&self) -> bool {
        let warm = self.warm.lock().unwrap();
        self.placement.targets().into_iter().any(|(backend, language)| {
            warm.get(&(backend.name(), language, self.config.warm_memory_mb))
                .is_none_or(Vec::is_empty)
        })
    }

    async fn fill_warm(&self, stop: &CancellationToken) {
        for (backend, language) in self.placement.targets() {
            let key: WarmKey = (backend.name(), language, self.config.warm_memory_mb);
            loop {
                if self.stopping(stop) {
                    return;
                }
                let have = self.warm.lock().unwrap().get(&key).map_or(0, Vec::len);
                if have >= self.config.warm_per_language {
                    break;
                }
                let backing_off = matches!(
                    self.health.lock().unwrap().get(&(key.0, language)),
                    Some(LanguageHealth::Error { retry_at, .. }) if *retry_at > Instant::now()
                );
                if backing_off {
                    break;
                }
                match self
                    .start(
                        &backend,
                        language,
                        &Shape::generic(self.config.warm_memory_mb),
                        StartFor::Pool,
                    )
                    .await
                {
                    Ok(mut instance) => {
                        if self.stopping(stop) {
                            instance.terminate().await;
                            return;
                        }
                        let mut warm = self.warm.lock().unwrap();
                        warm.entry(key).or_default().push(instance);
                    }
                    // At its cap the backend keeps no more warm ones.
                    Err(InstanceError::Exhausted { .. }) => break,
                    Err(e) => {
                        tracing::warn!(%language, backend = key.0, error = %e, "could not start a warm instance");
                        break;
                    }
                }
            }
        }
    }

    async fn reap_idle(&self) {
        let keep = self.config.keep_warm;
        let expired: Vec<Box<dyn Instance>> = {
            let mut idle = self.idle.lock().unwrap();
            let mut out = Vec::new();
            for list in idle.values_mut() {
                let (old, fresh): (Vec<_>, Vec<_>) = list.drain(..).partition(|(_, since)| since.elapsed() >= keep);
                *list = fresh;
                out.extend(old.into_iter().map(|(i, _)| i));
            }
            idle.retain(|_, list| !list.is_empty());
            out
        };
        for mut instance in expired {
            tracing::debug!(instance = instance.id(), "reaping idle instance");
            instance.terminate().await;
        }
    }

    /// Terminates every pooled instance; later releases terminate too.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.refill.notify_one();
        let warm: Vec<_> = self.warm.lock().unwrap().drain().flat_map(|(_, v)| v).collect();
        let idle: Vec<_> = self
            .idle
            .lock()
            .unwrap()
            .drain()
            .flat_map(|(_, v)| v.into_iter().map(|(i, _)| i))
            .collect();
        for mut instance in warm.into_iter().chain(idle) {
            instance.terminate().await;
        }
        for backend in self.placement.backends() {
            backend.shutdown().await;
        }
    }
}
