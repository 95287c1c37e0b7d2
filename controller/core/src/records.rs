//! Execution records: one per answered invocation, handed to a
//! [`RecordSink`] that must never make the invocation wait (the controller's
//! sink queues them and writes batches to the database).

use time::OffsetDateTime;

/// A new execution's id: a UUIDv7 (its first 48 bits the time, then 74
/// random ones), so ids come in time order and each record lands at the end
/// of the database's primary-key index; a random (v4) id put every record
/// on a page of its own, one page written per execution.
pub fn new_execution_id() -> uuid::Uuid {
    uuid::Uuid::now_v7()
}

/// One answered invocation, for the durable record.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionRecord {
    pub id: uuid::Uuid,
    /// The session (or asynchronous execution) it belongs to.
    pub request_id: String,
    pub subject: String,
    pub language_title: String,
    pub version: i64,
    pub started_at: OffsetDateTime,
    pub duration_ms: i64,
    /// `success`, `cache_hit`, `invalid_params`, `runtime_error`, `timeout`, `error`.
    pub outcome: String,
    pub cached: bool,
    pub cold_start: bool,
    /// The pipeline execution this is a step of.
    pub parent_id: Option<uuid::Uuid>,
    /// What the function wrote, when it wrote anything (shared: the
    /// controller keeps it for reads until the record is written).
    pub logs: Option<std::sync::Arc<crate::logs::Captured>>,
}

/// Where the core hands its records.
pub trait RecordSink: Send + Sync {
    /// Takes a record without waiting: a record that cannot be kept is
    /// dropped (and counted by the sink), never the invocation delayed.
    fn record(&self, record: ExecutionRecord);
}
