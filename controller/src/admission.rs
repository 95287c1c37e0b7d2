//! Admitting an execute: its rate limit and, for a retained session, the
//! count of the execution on it, decided in one step.
//!
//! A request over its limit is refused with 429 whatever else is wrong with
//! it, so the limit is asked first; a retained session counts each
//! execution its schema accepts, and only the ones admitted. With Redis,
//! the limit and the count are each a round trip; [`RedisAdmission`] makes
//! them one script, which the session layer sends beside the L2 cache's
//! `GET`, so that a cached execute of a retained session costs one round
//! trip: the limit, then (only when it allows the request) the session's
//! existence and its count, atomically. [`InProcess`] does the same in two
//! steps, for a limiter and a session store in this process.
//!
//! Admissions that come while a script call is on its way wait for it to
//! return and then go together, in one call that decides each in turn as
//! its own call would have (a group commit): alone, a request is sent at
//! once, from its own task; under load, one call serves many, sent by a
//! task of their own. An execute without a retained session goes the same
//! way, with only its limit to count. Each call costs Redis its
//! reading, parsing and answering, and the controller a round trip's
//! wake-ups (`redis-benchmark`: 11.9 µs of Redis's CPU per admission sent
//! alone, 5.8 in calls of 16).
//!
//! The guard ([`crate::http`]) leaves an execute's limit to the handler as
//! an unpassed [`Gate`]: whatever refuses the request passes it first.
//!
//! # Layout
//!
//! - [`Admission`]: the trait; [`Admitted`], its verdict.
//! - [`Gate`]: one request's admission, passed once (it records a refusal
//!   in the metrics).
//! - [`InProcess`]: the limiter, then the session store.
//! - [`RedisAdmission`]: one Lua script (the limiter's GCRA and the
//!   session store's count), [`InProcess`] while Redis does not answer.
//! - [`Batcher`]: the admissions waiting for the script, sent together;
//!   `Detachable`, the lone request's call, which goes on in a task should
//!   the request go away.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fnrt_core::metrics::Metrics;
use fnrt_core::timefmt;
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::ratelimit::{GCRA_FN, LimitClass, RateKey, RateLimiter, RedisRateLimiter, retry_after_secs};
use crate::redis_client::RedisClient;
use crate::sessions::SessionStore;
use crate::sessions::fallback::FallbackSessionStore;
use crate::sessions::redis::{ALL, RECORD_FN, hash_key};

/// A session an admitted execute runs on ([`crate::sessions::session_key`]).
#[derive(Debug, Clone, Copy)]
pub struct SessionCheck<'a> {
    pub key: &'a str,
    /// Count an execution on it (its params passed the schema).
    pub count: bool,
}

/// What [`Admission::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    Yes,
    /// Over the limit: retry after this many seconds.
    Limited(u64),
    /// Within the limit, but the session is gone (closed, expired or its
    /// function deleted, maybe on another controller): nothing was counted.
    SessionGone,
}

#[async_trait]
pub trait Admission: Send + Sync {
    /// Counts a request against its limit; when that allows it and
    /// `session` is given, checks that the session still exists and (with
    /// `count`) counts an execution on it.
    async fn admit(&self, class: LimitClass, key: &RateKey, session: Option<SessionCheck<'_>>) -> Admitted;
}

/// One request's admission, still to be decided: passed once, by value.
pub struct Gate<'a> {
    admission: &'a dyn Admission,
    metrics: &'a Metrics,
    class: LimitClass,
    key: RateKey,
}

impl std::fmt::Debug for Gate<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("class", &self.class)
            .finish_non_exhaustive()
    }
}

impl<'a> Gate<'a> {
    pub fn new(admission: &'a dyn Admission, metrics: &'a Metrics, class: LimitClass, key: RateKey) -> Self {
        Gate {
            admission,
            metrics,
            class,
            key,
        }
    }

    /// Admits the request (see [`Admission::admit`]).
    pub async fn pass(self, session: Option<SessionCheck<'_>>) -> Admitted {
        let admitted = self.admission.admit(self.class, &self.key, session).await;
        if let Admitted::Limited(_) = admitted {
            self.metrics.record_rate_limited(self.class.as_str());
        }
        admitted
    }

    /// `error`, unless the request is over its limit: 429 comes first.
    pub async fn refuse(self, error: ApiError) -> ApiError {
        match self.pass(None).await {
            Admitted::Limited(retry_after_secs) => ApiError::RateLimited { retry_after_secs },
            _ => error,
        }
    }
}

/// The limiter, then the session store: for stores in this process, where
/// neither step is a round trip (and while Redis does not answer).
pub struct InProcess {
    limiter: Arc<dyn RateLimiter>,
    sessions: Arc<dyn SessionStore>,
}

impl InProcess {
    pub fn new(limiter: Arc<dyn RateLimiter>, sessions: Arc<dyn SessionStore>) -> Self {
        InProcess { limiter, sessions }
    }
}

#[async_trait]
impl Admission for InProcess {
    async fn admit(&self, class: LimitClass, key: &RateKey, session: Option<SessionCheck<'_>>) -> Admitted {
        if let Err(retry_after_secs) = self.limiter.check(class, key).await {
            return Admitted::Limited(retry_after_secs);
        }
        let Some(session) = session else {
            return Admitted::Yes;
        };
        let exists = if session.count {
            self.sessions.record_execution(session.key, timefmt::now(), false).await
        } else {
            self.sessions.get(session.key).await.map(|s| s.is_some())
        };
        match exists {
            Ok(true) => Admitted::Yes,
            Ok(false) => Admitted::SessionGone,
            // The store did not answer: the execution goes on uncounted, as
            // it would have if the count had failed after the run.
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "counting the execution on the session");
                Admitted::Yes
            }
        }
    }
}

/// Admissions in one script, each in turn: the limit, then the session's
/// count. ARGV[1]: the time of the executions. Per admission, three KEYS
/// (the limit's key, the session's hash, the active-sessions index) and
/// four ARGV (the limit's interval in ms and its burst, 0 for no limit;
/// what to do with the session: '1' count an execution, '0' check that it
/// exists, '-' nothing, there is none, and its two keys are unused; the
/// session's key). Answers, per admission, {ms to wait, whether the
/// session exists (1 when there is none)}, one flat list.
const ADMIT: &str = r"
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local k, a = i * 3, 1 + i * 4
  local burst = tonumber(ARGV[a + 2])
  local wait = 0
  if burst > 0 then wait = gcra(KEYS[k + 1], tonumber(ARGV[a + 1]), burst) end
  local exists = 0
  if wait == 0 then
    local session = ARGV[a + 3]
    if session == '1' then
      exists = record(KEYS[k + 2], KEYS[k + 3], ARGV[1], '0', ARGV[a + 4])
    elseif session == '0' then
      exists = redis.call('EXISTS', KEYS[k + 2])
    else
      exists = 1
    end
  end
  out[#out + 1] = wait
  out[#out + 1] = exists
end
return out
";

/// Most admissions in one script call.
const MAX_BATCH: usize = 64;

/// The limit key of an entry whose limit is off (its burst is 0): unread.
const NO_LIMIT_KEY: &str = "fnrt:rl:v1:off";

/// One admission, as the script takes it.
struct Entry {
    limit_key: String,
    interval_ms: u64,
    burst: u32,
    /// The session's key ([`crate::sessions::session_key`]) and whether to
    /// count an execution on it; `None` for a request without one.
    session: Option<(String, bool)>,
}

impl Entry {
    /// Counts an execution on `session`, with no limit.
    #[cfg(test)]
    fn counting(session: &str) -> Self {
        Entry {
            limit_key: NO_LIMIT_KEY.into(),
            interval_ms: 0,
            burst: 0,
            session: Some((session.to_owned(), true)),
        }
    }
}

/// An admission waiting for its call; its answer is {ms to wait, whether
/// the session exists}, or `None` when the call failed.
struct Waiting {
    entry: Entry,
    answer: oneshot::Sender<Option<(u64, i64)>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// A task is sending (it takes whatever waits when its call returns).
    sending: bool,
}

/// Sends admissions to Redis in as few script calls as their arrival
/// allows: the first one at once, those that come meanwhile in the next.
pub struct Batcher {
    redis: RedisClient,
    script: redis::Script,
    queue: Mutex<Queue>,
    /// Script calls made, for the tests to see admissions go together.
    #[cfg(test)]
    calls: std::sync::atomic::AtomicUsize,
}

impl Batcher {
    fn new(redis: RedisClient) -> Arc<Self> {
        Arc::new(Batcher {
            redis,
            script: redis::Script::new(&format!("{GCRA_FN}{RECORD_FN}{ADMIT}")),
            queue: Mutex::default(),
            #[cfg(test)]
            calls: Default::default(),
        })
    }

    /// The script's answer for `entry`; `None` when Redis did not answer.
    async fn admit(self: &Arc<Self>, entry: Entry) -> Option<(u64, i64)> {
        let (answer, answered) = oneshot::channel();
        let lead = {
            let mut queue = self.queue.lock().unwrap();
            queue.waiting.push(Waiting { entry, answer });
            !std::mem::replace(&mut queue.sending, true)
        };
        if lead {
            // The first call goes from this request's own task. A task
            // spawned for it was ready beside the Redis connection's, and
            // tokio wakes an idle worker when a second task is ready: two
            // threads woke each other twice per lone request. Should this
            // request go away mid-call, the call goes on in a task, so that
            // the others in it still hear their answers.
            Detachable(Some(self.clone().send(true))).await;
        }
        answered.await.ok().flatten()
    }

    /// Sends what waits, call after call, until nothing does. `first_only`:
    /// in the task of the request that found no call on its way, which
    /// sends one call and leaves what came meanwhile to a task of its own
    /// (its client is waiting). Boxed: it spawns itself.
    fn send(self: Arc<Self>, first_only: bool) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            /// Should this end early (a panic, the runtime shutting down), the
            /// next admission starts again, and those left waiting fall back
            /// rather than wait for nobody.
            struct Early<'a>(Option<&'a Mutex<Queue>>);
            impl Drop for Early<'_> {
                fn drop(&mut self) {
                    if let Some(queue) = self.0 {
                        let mut queue = queue.lock().unwrap_or_else(|e| e.into_inner());
                        queue.sending = false;
                        queue.waiting.clear();
                    }
                }
            }
            let mut early = Early(Some(&self.queue));
            let mut sent = false;
            loop {
                let batch: Vec<Waiting> = {
                    let mut queue = self.queue.lock().unwrap();
                    if queue.waiting.is_empty() {
                        // Under the lock: an admission that comes next leads.
                        queue.sending = false;
                        early.0 = None;
                        return;
                    }
                    if sent && first_only {
                        early.0 = None;
                        drop(queue);
                        tokio::spawn(self.clone().send(false));
                        return;
                    }
                    let n = queue.waiting.len().min(MAX_BATCH);
                    queue.waiting.drain(..n).collect()
                };
                let answers = self.call(&batch).await;
                for (i, waiting) in batch.into_iter().enumerate() {
                    // A request that went away meanwhile hears nothing.
                    let _ = waiting.answer.send(answers.as_ref().map(|a| a[i]));
                }
                sent = true;
            }
        })
    }

    /// One script call for `batch`: an answer per admission, in order.
    async fn call(&self, batch: &[Waiting]) -> Option<Vec<(u64, i64)>> {
        #[cfg(test)]
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(timefmt::format(timefmt::now()));
        for Waiting { entry, .. } in batch {
            invocation.key(&entry.limit_key);
            match &entry.session {
                Some((session, count)) => invocation
                    .key(hash_key(session))
                    .key(ALL)
                    .arg(entry.interval_ms)
                    .arg(entry.burst)
                    .arg(if *count { "1" } else { "0" })
                    .arg(session),
                // The script reads neither key of an entry without a session.
                None => invocation
                    .key(ALL)
                    .key(ALL)
                    .arg(entry.interval_ms)
                    .arg(entry.burst)
                    .arg("-")
                    .arg(""),
            };
        }
        let flat: Vec<i64> = self
            .redis
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
            .ok()?;
        if flat.len() != batch.len() * 2 {
            tracing::error!(
                answers = flat.len(),
                admissions = batch.len(),
                "the admission script answered the wrong number of values"
            );
            return None;
        }
        Some(flat.chunks(2).map(|p| (p[0].max(0) as u64, p[1])).collect())
    }
}

/// A future polled in place that, dropped before it ends, goes on in a task
/// (when there is a runtime to run it).
struct Detachable(Option<futures::future::BoxFuture<'static, ()>>);

impl Future for Detachable {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let Some(future) = self.0.as_mut() else {
            return std::task::Poll::Ready(());
        };
        std::task::ready!(future.as_mut().poll(cx));
        self.0 = None;
        std::task::Poll::Ready(())
    }
}

impl Drop for Detachable {
    fn drop(&mut self) {
        if let Some(future) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(future);
        }
    }
}

/// The Redis limiter and session store, asked together in one script.
pub struct RedisAdmission {
    limiter: Arc<RedisRateLimiter>,
    sessions: Arc<FallbackSessionStore>,
    batcher: Arc<Batcher>,
    /// For a session held in this process only, and while Redis does not answer.
    in_process: InProcess,
}

impl RedisAdmission {
    pub fn new(redis: RedisClient, limiter: Arc<RedisRateLimiter>, sessions: Arc<FallbackSessionStore>) -> Self {
        RedisAdmission {
            in_process: InProcess::new(limiter.clone(), sessions.clone()),
            limiter,
            sessions,
            batcher: Batcher::new(redis),
        }
    }
}

#[async_trait]
impl Admission for RedisAdmission {
    async fn admit(&self, class: LimitClass, key: &RateKey, session: Option<SessionCheck<'_>>) -> Admitted {
        // A session created while Redis did not answer is in this process only.
        if session.is_some_and(|s| self.sessions.holds_locally(s.key)) {
            return self.in_process.admit(class, key, session).await;
        }
        let gcra = self.limiter.gcra(class, key);
        if gcra.is_none() && session.is_none() {
            // No limit and no session: nothing to ask.
            return Admitted::Yes;
        }
        let (limit_key, interval_ms, burst) = match gcra {
            Some(g) => (g.key, g.interval_ms, g.burst),
            // A burst of 0 tells the script there is no limit; the key is unused.
            None => (String::from(NO_LIMIT_KEY), 0, 0),
        };
        let entry = Entry {
            limit_key,
            interval_ms,
            burst,
            session: session.map(|s| (s.key.to_owned(), s.count)),
        };
        match self.batcher.admit(entry).await {
            Some((0, 1)) => Admitted::Yes,
            Some((0, _)) => Admitted::SessionGone,
            Some((wait_ms, _)) => Admitted::Limited(retry_after_secs(wait_ms)),
            // The call failed and backs off: both fall back for a while.
            None => self.in_process.admit(class, key, session).await,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Both admissions over the same assertions: Redis when `TEST_REDIS_URL`
    //! is set (skipped with a message otherwise, failed under `CI=true`).

    use super::*;
    use crate::ratelimit::{Limits, LocalRateLimiter};
    use crate::sessions::memory::MemorySessionStore;
    use crate::sessions::redis::RedisSessionStore;
    use crate::sessions::{SessionRecord, SessionStatus, session_key};

    const LIMITS: Limits = Limits {
        execute: 3,
        functions: 3,
        unauthenticated: 3,
    };

    fn retained(owner: &str) -> SessionRecord {
        let now = timefmt::now();
        SessionRecord {
            request_id: "kept".into(),
            owner: owner.into(),
            language_title: "nodejs-calculator".into(),
            version: 1,
            context: serde_json::json!({}),
            timeout_ms: 1000,
            retain: true,
            status: SessionStatus::Active,
            created_at: now,
            expires_at: now + time::Duration::hours(1),
            execution_count: 0,
            last_executed_at: None,
        }
    }

    /// A retained session of a new owner (`prefix` and random), stored.
    async fn stored(sessions: &dyn SessionStore, prefix: &str) -> SessionRecord {
        let record = retained(&format!("{prefix}-{}", hex::encode(rand::random::<[u8; 6]>())));
        assert!(sessions.insert(record.clone()).await.unwrap());
        record
    }

    /// Script calls the batcher has made.
    fn calls(batcher: &Batcher) -> usize {
        batcher.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    type Admitting<'a> = futures::future::BoxFuture<'a, Option<(u64, i64)>>;

    /// Two admissions, each polled once: the first's call on its way, the
    /// second waiting for the next call.
    async fn in_line(batcher: &Arc<Batcher>, first: Entry, second: Entry) -> (Admitting<'_>, Admitting<'_>) {
        let mut first: Admitting<'_> = Box::pin(batcher.admit(first));
        assert!(futures::poll!(&mut first).is_pending(), "answered without a round trip");
        let mut second: Admitting<'_> = Box::pin(batcher.admit(second));
        assert!(
            futures::poll!(&mut second).is_pending(),
            "not waiting for the call on its way"
        );
        (first, second)
    }

    async fn exercise(admission: &dyn Admission, sessions: &dyn SessionStore) {
        let record = stored(sessions, "admitted").await;
        let owner = record.owner.clone();
        let key = RateKey::Subject(owner.clone());
        let session = record.key();
        let count = |count| Some(SessionCheck { key: &session, count });
        let admit = |check| admission.admit(LimitClass::Execute, &key, check);

        assert_eq!(admit(count(true)).await, Admitted::Yes);
        assert_eq!(admit(count(false)).await, Admitted::Yes, "checked, not counted");
        let gone = session_key(&owner, "never-initialized");
        let missing = Some(SessionCheck {
            key: &gone,
            count: true,
        });
        assert_eq!(admit(missing).await, Admitted::SessionGone);
        // The fourth request of three a minute: refused, and not counted.
        assert!(matches!(admit(count(true)).await, Admitted::Limited(1..=60)));
        assert!(matches!(admit(None).await, Admitted::Limited(_)));

        let after = sessions.get(&session).await.unwrap().unwrap();
        assert_eq!(after.execution_count, 1, "only the admitted count counted");
        assert!(after.last_executed_at.is_some());
        sessions.remove(&session).await.unwrap();
    }

    #[tokio::test]
    async fn in_process_counts_only_what_the_limit_admits() {
        let sessions: Arc<dyn SessionStore> = Arc::new(MemorySessionStore::default());
        let admission = InProcess::new(Arc::new(LocalRateLimiter::new(LIMITS)), sessions.clone());
        exercise(&admission, &*sessions).await;
    }

    /// The Redis admission over `TEST_REDIS_URL` (`None`, with a message,
    /// when it is not set; a failure under `CI=true`).
    fn on_redis() -> Option<(RedisClient, RedisAdmission, Arc<FallbackSessionStore>)> {
        let Ok(url) = std::env::var("TEST_REDIS_URL") else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but TEST_REDIS_URL is not set"
            );
            eprintln!("skipped: set TEST_REDIS_URL=redis://127.0.0.1:6379/ to run the Redis admission test");
            return None;
        };
        let redis = RedisClient::new(&url).unwrap();
        let local = Arc::new(LocalRateLimiter::new(LIMITS));
        let limiter = Arc::new(RedisRateLimiter::new(redis.clone(), LIMITS, local));
        let sessions = Arc::new(FallbackSessionStore::new(RedisSessionStore::new(redis.clone())));
        let admission = RedisAdmission::new(redis.clone(), limiter, sessions.clone());
        Some((redis, admission, sessions))
    }

    #[tokio::test]
    async fn one_redis_script_counts_only_what_the_limit_admits() {
        let Some((redis, admission, sessions)) = on_redis() else {
            return;
        };
        exercise(&admission, &*sessions).await;
        assert!(redis.is_healthy(), "the script failed and the fallback answered");
    }

    #[tokio::test]
    async fn admissions_that_come_together_go_in_one_call_each_decided_as_if_alone() {
        // Arrange: a retained session, and a subject allowed 3 a minute.
        let Some((redis, admission, sessions)) = on_redis() else {
            return;
        };
        let record = stored(&*sessions, "together").await;
        let owner = record.owner.clone();
        let session = record.key();
        let key = RateKey::Subject(owner.clone());
        // Another subject's, on a session that is gone: its own limit, its own verdict.
        let other = RateKey::Subject(format!("{owner}-other"));
        let gone = session_key(&owner, "never-initialized");
        // A third subject's one-shot executes (no session): only the limit.
        let one_shot = RateKey::Subject(format!("{owner}-one-shot"));

        // Act: six at once on the session, one on the gone session, and
        // four without a session.
        let on_session = (0..6).map(|_| {
            admission.admit(
                LimitClass::Execute,
                &key,
                Some(SessionCheck {
                    key: &session,
                    count: true,
                }),
            )
        });
        let on_gone = admission.admit(
            LimitClass::Execute,
            &other,
            Some(SessionCheck {
                key: &gone,
                count: true,
            }),
        );
        let sessionless = (0..4).map(|_| admission.admit(LimitClass::Execute, &one_shot, None));
        let (verdicts, gone_verdict, one_shot_verdicts) = tokio::join!(
            futures::future::join_all(on_session),
            on_gone,
            futures::future::join_all(sessionless)
        );

        // Assert: two calls (the first admission at once, alone; the ten that
        // came while it was on its way together); three admitted and
        // counted, three over the limit.
        assert_eq!(
            calls(&admission.batcher),
            2,
            "admissions that came together were sent apart"
        );
        let admitted = verdicts.iter().filter(|v| **v == Admitted::Yes).count();
        let limited = verdicts
            .iter()
            .filter(|v| matches!(v, Admitted::Limited(1..=60)))
            .count();
        assert_eq!((admitted, limited), (3, 3), "{verdicts:?}");
        assert_eq!(gone_verdict, Admitted::SessionGone);
        assert_eq!(
            one_shot_verdicts.iter().filter(|v| **v == Admitted::Yes).count(),
            3,
            "{one_shot_verdicts:?}"
        );
        assert!(
            matches!(one_shot_verdicts[3], Admitted::Limited(1..=60)),
            "{one_shot_verdicts:?}"
        );
        // One more, alone: its own call, still over the limit.
        assert!(matches!(
            admission.admit(LimitClass::Execute, &one_shot, None).await,
            Admitted::Limited(1..=60)
        ));
        assert_eq!(calls(&admission.batcher), 3);
        let after = sessions.get(&session).await.unwrap().unwrap();
        assert_eq!(after.execution_count, 3, "only the admitted ones counted");
        assert!(redis.is_healthy(), "the script failed and the fallback answered");
        sessions.remove(&session).await.unwrap();
    }

    #[tokio::test]
    async fn a_request_that_goes_away_mid_call_leaves_the_others_their_answers() {
        // Arrange: a session on Redis.
        let Some((redis, admission, sessions)) = on_redis() else {
            return;
        };
        let session = stored(&*sessions, "away").await.key();
        let entry = || Entry::counting(&session);
        let batcher = &admission.batcher;

        // Act: the first admission starts its call and goes away (its client
        // gone) while the second waits for the next call.
        let (first, second) = in_line(batcher, entry(), entry()).await;
        drop(first);
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), second)
            .await
            .expect("the second admission waited for a call that never came");

        // Assert: the second was answered by Redis, and both were counted
        // (the first one's call went on without it).
        assert_eq!(answer, Some((0, 1)));
        let after = sessions.get(&session).await.unwrap().unwrap();
        assert_eq!(after.execution_count, 2);
        assert!(
            !batcher.queue.lock().unwrap().sending,
            "nothing sends, yet a call is said to be on its way"
        );
        assert!(redis.is_healthy());
        sessions.remove(&session).await.unwrap();
    }

    #[tokio::test]
    async fn a_call_dropped_where_no_runtime_can_take_it_over_lets_the_next_admission_lead() {
        // Arrange: a session on Redis.
        let Some((redis, admission, sessions)) = on_redis() else {
            return;
        };
        let session = stored(&*sessions, "orphaned").await.key();
        let entry = || Entry::counting(&session);
        let batcher = &admission.batcher;

        // Act: the first admission starts its call; the second waits for
        // the next one; the first is dropped on a thread with no runtime,
        // so its call cannot go on in a task.
        let (first, second) = in_line(batcher, entry(), entry()).await;
        std::thread::scope(|s| {
            s.spawn(move || drop(first));
        });
        let waiting = tokio::time::timeout(std::time::Duration::from_secs(10), second)
            .await
            .expect("the second admission waited for a call that had ended");
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), batcher.admit(entry()))
            .await
            .expect("the next admission waited for a call said to be on its way");

        // Assert: the one left waiting heard that nothing answered (and
        // falls back); the next one led a call of its own, answered.
        assert_eq!(waiting, None);
        assert_eq!(next, Some((0, 1)));
        assert!(!batcher.queue.lock().unwrap().sending);
        assert!(redis.is_healthy());
        sessions.remove(&session).await.unwrap();
    }

    #[tokio::test]
    async fn when_redis_does_not_answer_waiting_admissions_hear_so_and_later_ones_are_sent_again() {
        // Nothing listens on port 1: every call fails at once.
        let batcher = Batcher::new(RedisClient::new("redis://127.0.0.1:1/").unwrap());
        let entry = || Entry::counting("nobody:none");
        for round in 0..2 {
            let answers = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                futures::future::join_all((0..3).map(|_| batcher.admit(entry()))),
            )
            .await
            .unwrap_or_else(|_| panic!("round {round}: an admission waited for a call that never came"));
            assert_eq!(answers, [None, None, None], "round {round}");
        }
        assert!(!batcher.queue.lock().unwrap().sending, "the sending task did not stop");
    }
}
