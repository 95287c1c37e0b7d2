//! Durable execution records, written off the request path.
//!
//! The engine hands each answered execution to [`ExecutionLog::record`],
//! which never waits: the record goes into a bounded queue, and one
//! background task writes batches to the [`ExecutionStore`] (what arrives
//! within a few milliseconds of a record shares its transaction). When the database is
//! down the task keeps its batch and retries with backoff, so a record of an
//! execution answered before or during an outage is written once the
//! database is back (up to the queue's capacity; beyond it records are
//! dropped and counted).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use fnrt_core::records::{ExecutionRecord, RecordSink};

use crate::logs::Recent;
use crate::store::ExecutionStore;

/// Records waiting to be written, at most.
const QUEUE: usize = 65_536;
/// Records per write.
const BATCH: usize = 256;
/// How long the writer waits after a record for more to share its write:
/// one transaction (and one wake of the database's thread) per batch
/// rather than per execution, which under load is most of what a cache
/// hit costs (docs/benchmarks.md).
const LINGER: Duration = Duration::from_millis(5);

#[derive(Debug, Clone)]
pub struct ExecutionLog {
    tx: mpsc::Sender<ExecutionRecord>,
    dropped: Arc<AtomicU64>,
    /// Records (and their function logs) readable before they are written.
    recent: Arc<Recent>,
}

impl ExecutionLog {
    /// The log and its writer task (run it until the log's senders are dropped).
    pub fn new(
        store: Arc<dyn ExecutionStore>,
        recent: Arc<Recent>,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            ExecutionLog {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
                recent,
            },
            write_all(store, rx),
        )
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl RecordSink for ExecutionLog {
    /// Queues the record; never waits.
    fn record(&self, record: ExecutionRecord) {
        // Cache hits run nothing: there is nothing to read before the write.
        if !record.cached {
            self.recent.remember(&record);
        }
        if self.tx.try_send(record).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::error!(dropped = n, "execution record queue is full; records are being dropped");
            }
        }
    }
}

async fn write_all(store: Arc<dyn ExecutionStore>, mut rx: mpsc::Receiver<ExecutionRecord>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        if batch.len() < BATCH {
            tokio::time::sleep(LINGER).await;
            while batch.len() < BATCH
                && let Ok(record) = rx.try_recv()
            {
                batch.push(record);
            }
        }
        let mut pause = Duration::from_millis(100);
        loop {
            match store.record_executions(&batch).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, records = batch.len(), "writing execution records failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
        batch.clear();
    }
}
