//! An instance that is a runtime server the controller talks to over the
//! runtime protocol: the one [`Instance`] implementation for every backend
//! that starts runtime servers (process today; containers and pods later).
//!
//! The backend keeps what is its own behind [`InstanceHandle`]: starting is
//! done when the handle exists; it watches the server (alive or not, and
//! how it ended) and stops it. Everything said to the server, and what its
//! answers and failures mean, is here and in [`super::protocol`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;

use super::protocol::{Endpoint, InitError, ProtocolError, RuntimeClient};
use super::{Artifacts, Instance, InstanceError, RunOutcome, RunRequest, Shape, init_payload};
use crate::function::FunctionVersion;
use crate::language::Language;
use crate::logs::OutputTap;

/// How long a run's answer waits for its log markers behind output still
/// on its way (a marker that does not come only cuts that run's logs).
const LOG_MARKER_WAIT: Duration = Duration::from_secs(2);

/// How long a runtime server may take to answer its first `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long `/health` is asked every millisecond while a server starts
/// (a refused connect costs microseconds): a start usually takes tens of
/// milliseconds, and a poll backing off from there would add as much again
/// to every cold start. Past it, the pause doubles up to 50 ms.
const FAST_POLL: Duration = Duration::from_millis(300);

/// How an instance's server ended, as far as its backend can tell.
#[derive(Debug, Clone)]
pub struct Exit {
    /// The exit status, as the backend words it (`exit status: 1`, `signal: 9 (SIGKILL)`).
    pub status: String,
    /// The last of what it wrote to stderr.
    pub output_tail: String,
    /// The kernel killed it for want of memory (as a container engine reports).
    pub oom_killed: bool,
}

impl Exit {
    /// Whether it died for want of memory (each runtime says so in its own
    /// words; a container engine says so itself).
    fn out_of_memory(&self) -> bool {
        self.oom_killed
            || ["out of memory", "MemoryError", "memory allocation of"]
                .iter()
                .any(|sign| self.output_tail.contains(sign))
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// [`InstanceHandle::follow_output`]: reads the server's output until dropped.
pub type Following<'a> = std::pin::Pin<Box<dyn Future<Output = std::convert::Infallible> + Send + 'a>>;

/// A backend's hold on one runtime server it started.
#[async_trait]
pub trait InstanceHandle: Send + Sync {
    /// Short unique ID, for logs.
    fn id(&self) -> &str;
    /// Whether the server still runs, with nothing left behind beside it.
    fn is_alive(&mut self) -> bool;
    /// Whether the server still runs (see [`Instance::is_running`]).
    fn is_running(&mut self) -> bool {
        self.is_alive()
    }
    /// Whether the server has ended, waiting at most `wait` for it to be
    /// reaped; if so, how (exit status, the tail of its output).
    async fn exited(&mut self, wait: Duration) -> Option<Exit>;
    /// Stops the server for good and releases what it holds. Dropping the
    /// handle does the same, best effort.
    async fn terminate(&mut self);
    /// The tap the backend feeds the server's stdout and stderr into; a
    /// handle without one captures no function logs.
    fn output(&self) -> Option<Arc<OutputTap>> {
        None
    }
    /// Reads the server's output into the tap from the task that polls
    /// this, until it is dropped: polled beside a run's call, so that the
    /// call's task reads the run's logs as they come. Dropping it reads what
    /// is left and gives the output back to the backend's own reader, also
    /// when it was never polled (a call can end at its first poll, when the
    /// answer is there by the time it reads). A handle without its own
    /// pipes never reads here.
    fn follow_output(&self) -> Following<'_> {
        Box::pin(std::future::pending())
    }
    /// Whether dropping [`Self::follow_output`] has read everything the
    /// server wrote before it answered (its pipes, read dry), so that a run
    /// needs no log marker. Output that comes another way (a container
    /// engine's log stream, behind the answer) needs one.
    fn output_complete_at_answer(&self) -> bool {
        false
    }
    /// Where the instance tells whether a call (`/init`, `/run`) is under
    /// way: between calls an instance has nothing to do, and a backend may
    /// stop one that works anyway (a thread the function left spinning).
    fn activity(&self) -> Option<Arc<Activity>> {
        None
    }
    /// Puts a package's files where the server reads them (`function/`
    /// beside its socket), before its `/init`.
    async fn place_package(&mut self, function: &FunctionVersion) -> Result<(), InstanceError> {
        Err(InstanceError::Unavailable {
            language: function.language(),
            message: format!("instance {} cannot be given a package of files", self.id()),
        })
    }
}

/// A runtime server, specialised at most once, reached over the protocol.
pub struct RemoteInstance {
    handle: Box<dyn InstanceHandle>,
    client: RuntimeClient,
    language: Language,
    /// The memory cap and network it was started with; a function of
    /// another shape cannot use it.
    shape: Shape,
    max_result_bytes: usize,
    initialized: bool,
    /// Where a crate's built library is: its `/init` sends it.
    artifacts: Option<Arc<dyn Artifacts>>,
    /// The handle's [`Activity`], if its backend watches it.
    activity: Option<Arc<Activity>>,
}

/// What a backend fixes about the instances it starts.
#[derive(Clone)]
pub struct RemoteSettings {
    pub max_result_bytes: usize,
    pub artifacts: Option<Arc<dyn Artifacts>>,
}

impl RemoteInstance {
    /// Waits until the server at `endpoint` answers `/health`; a server
    /// that ends or stays silent first is stopped and reported.
    pub async fn connect(
        mut handle: Box<dyn InstanceHandle>,
        endpoint: Endpoint,
        language: Language,
        shape: Shape,
        settings: &RemoteSettings,
    ) -> Result<Self, InstanceError> {
        let started = Instant::now();
        let client = RuntimeClient::new(endpoint);
        let mut pause = Duration::from_millis(1);
        let failed = loop {
            if let Some(exit) = handle.exited(Duration::ZERO).await {
                break format!(
                    "runtime server exited during start-up ({}): {}",
                    exit.status,
                    exit.output_tail.trim()
                );
            }
            if client.health().await.is_ok() {
                tracing::debug!(instance = handle.id(), %language, ms = started.elapsed().as_millis() as u64, "instance started");
                return Ok(RemoteInstance {
                    activity: handle.activity(),
                    handle,
                    client,
                    language,
                    shape,
                    max_result_bytes: settings.max_result_bytes,
                    initialized: false,
                    artifacts: settings.artifacts.clone(),
                });
            }
            if started.elapsed() > START_TIMEOUT {
                break format!("runtime server did not answer within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(pause).await;
            if started.elapsed() > FAST_POLL {
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        };
        handle.terminate().await;
        Err(InstanceError::Unavailable {
            language,
            message: failed,
        })
    }

    /// The error for a call that failed: a crash if the server is gone
    /// (with how it ended), else a protocol error.
    async fn failure(&mut self, err: ProtocolError) -> InstanceError {
        match err {
            ProtocolError::TooLarge(_) => {
                return InstanceError::ResultTooLarge {
                    limit: self.max_result_bytes,
                };
            }
            // The server answered: it is alive, and wrong.
            ProtocolError::Status { .. } => return InstanceError::Protocol(err.to_string()),
            _ => {}
        }
        // A connection that broke mid-call means the server is most likely
        // dying (out of memory, killed): give it a moment to be reaped, so
        // the answer says how it ended (a loaded machine needs more than a
        // fraction of a second to tear down a large process).
        match self.handle.exited(Duration::from_secs(2)).await {
            Some(exit) => {
                let message = if exit.out_of_memory() {
                    format!(
                        "the function ran out of memory (limit {} MiB) and its instance was stopped",
                        self.shape.memory_mb
                    )
                } else {
                    format!("the instance exited during the run ({})", exit.status)
                };
                InstanceError::Crashed {
                    message,
                    details: json!({
                        "exit_status": exit.status,
                        "out_of_memory": exit.out_of_memory(),
                        "stderr_tail": last_lines(&exit.output_tail, 20),
                    }),
                }
            }
            None => InstanceError::Protocol(err.to_string()),
        }
    }
}

/// Whether a call is under way on an instance, and how many times one
/// began or ended: what a backend watches to tell an instance at work
/// between calls.
#[derive(Debug, Default)]
pub struct Activity {
    busy: AtomicBool,
    changes: AtomicU64,
}

impl Activity {
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// Calls begun plus calls ended.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }
}

/// Marks a call under way until dropped (whichever way the call ends, a
/// cancelled one too).
struct Busy(Option<Arc<Activity>>);

impl Busy {
    fn of(activity: &Option<Arc<Activity>>) -> Self {
        if let Some(a) = activity {
            a.busy.store(true, Ordering::SeqCst);
            a.changes.fetch_add(1, Ordering::SeqCst);
        }
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(a) = &self.0 {
            a.busy.store(false, Ordering::SeqCst);
            a.changes.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// 16 random bytes for a run's log marker: unguessable, so a function
/// cannot end its run's logs early by printing one ahead of time.
fn rand_bytes() -> [u8; 16] {
    uuid::Uuid::new_v4().into_bytes()
}

#[async_trait]
impl Instance for RemoteInstance {
    fn id(&self) -> &str {
        self.handle.id()
    }

    fn language(&self) -> Language {
        self.language
    }

    async fn init(&mut self, function: &FunctionVersion) -> Result<(), InstanceError> {
        if self.initialized {
            return Err(InstanceError::Protocol("instance is already initialised".into()));
        }
        if Shape::of(function) != self.shape {
            return Err(InstanceError::Protocol(
                "instance memory cap or network differs from the function's".into(),
            ));
        }
        let payload = init_payload(self.artifacts.as_deref(), function).await?;
        if payload.package {
            self.handle.place_package(function).await?;
        }
        let _busy = Busy::of(&self.activity);
        match self.client.init(&payload).await {
            Ok(()) => {
                self.initialized = true;
                Ok(())
            }
            Err(InitError::Refused { message, details }) => Err(InstanceError::Init { message, details }),
            Err(InitError::Protocol(e)) => Err(self.failure(e).await),
        }
    }

    async fn run(&mut self, request: RunRequest<'_>) -> Result<RunOutcome, InstanceError> {
        let _busy = Busy::of(&self.activity);
        let tap = request.logs.and_then(|logs| Some((logs, self.handle.output()?)));
        // Without a marker the run's window ends when its output has been
        // read after the answer, without waiting for anything more.
        let marker = (tap.is_some() && !self.handle.output_complete_at_answer())
            .then(|| format!("fnrt-log-end-{}", hex::encode(rand_bytes())));
        if let Some((logs, tap)) = &tap {
            tap.open(Arc::clone(logs), marker.as_deref());
        }
        let call = self.client.run(request, marker.as_deref(), self.max_result_bytes);
        let ran = if tap.is_some() {
            // The output is followed until the call ends (then handed back).
            tokio::select! {
                biased;
                ran = call => ran,
                never = self.handle.follow_output() => match never {},
            }
        } else {
            call.await
        };
        if let Some((_, tap)) = &tap {
            // A crashed server's last words are already in the pipes.
            let wait = match (&marker, &ran) {
                (None, _) => Duration::ZERO,
                (Some(_), Ok(_)) => LOG_MARKER_WAIT,
                (Some(_), Err(_)) => Duration::from_millis(200),
            };
            if !tap.close(wait).await && ran.is_ok() {
                tracing::debug!(
                    instance = self.handle.id(),
                    "a run's log markers did not come; its logs may be cut"
                );
            }
        }
        match ran {
            Ok(outcome) => Ok(outcome),
            Err(e) => Err(self.failure(e).await),
        }
    }

    fn is_alive(&mut self) -> bool {
        self.handle.is_alive()
    }

    fn is_running(&mut self) -> bool {
        self.handle.is_running()
    }

    async fn terminate(&mut self) {
        self.handle.terminate().await;
    }
}
