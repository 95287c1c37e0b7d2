//! Live sessions: what `initialize` created and `execute` runs.
//!
//! One [`SessionStore`] trait: [`memory::MemorySessionStore`] keeps them in
//! process (the embedded default); [`redis::RedisSessionStore`] shares them
//! between replicas (`REDIS_URL`), expiring with the session, behind
//! [`fallback::FallbackSessionStore`], which keeps new sessions in process
//! while Redis does not answer. A record is
//! kept under [`session_key`] (its owner's, then its request ID), and is
//! plain data: the instance a retained session holds stays with the
//! controller process that holds it (see [`crate::engine`]).
//!
//! `tests.rs`: the suite every store passes (Redis when `TEST_REDIS_URL`
//! is set).

pub mod fallback;
pub mod memory;
pub mod redis;
#[cfg(test)]
mod tests;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    /// Can be executed.
    Active,
    /// Ran its one execution (`retain_session: false`); kept for status reads until it expires.
    Completed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub request_id: String,
    /// The `sub` that created it; nobody else sees it.
    pub owner: String,
    pub language_title: String,
    /// The function version fixed at initialize.
    pub version: i64,
    /// The context the function sees (the client's, without the controller's knobs).
    pub context: Value,
    pub timeout_ms: u64,
    pub retain: bool,
    pub status: SessionStatus,
    #[serde(with = "fnrt_core::timefmt::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "fnrt_core::timefmt::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub execution_count: u64,
    #[serde(with = "fnrt_core::timefmt::rfc3339::option")]
    pub last_executed_at: Option<OffsetDateTime>,
}

impl SessionRecord {
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at <= now
    }

    /// Where the store keeps it: [`session_key`] of its owner and ID.
    pub fn key(&self) -> String {
        session_key(&self.owner, &self.request_id)
    }
}

/// A session's key in a store: its request ID within its owner's. Request
/// IDs are scoped per subject, so a client-chosen `X-Request-ID` that another
/// subject already uses is simply free for this one: no answer tells a
/// caller that someone else's session exists.
pub fn session_key(owner: &str, request_id: &str) -> String {
    let mut key = String::with_capacity(OWNER_HASH_LEN + 1 + request_id.len());
    key.push_str(owner_digits(owner, &mut [0; OWNER_HASH_LEN]));
    key.push('.');
    key.push_str(request_id);
    key
}

/// The length of an [`owner_hash`].
const OWNER_HASH_LEN: usize = 32;

/// The owner's part of its [`session_key`]s: hex, so without a '.'.
pub fn owner_hash(owner: &str) -> String {
    owner_digits(owner, &mut [0; OWNER_HASH_LEN]).to_owned()
}

/// [`owner_hash`] written into `digits` (every execute builds a key: no
/// `format!` or `hex::encode`, which goes a char at a time).
fn owner_digits<'a>(owner: &str, digits: &'a mut [u8; OWNER_HASH_LEN]) -> &'a str {
    use sha2::Digest;
    let owner = sha2::Sha256::digest(owner.as_bytes());
    hex::encode_to_slice(&owner[..OWNER_HASH_LEN / 2], digits).expect("16 bytes are 32 hex digits");
    std::str::from_utf8(digits).expect("hex digits are ASCII")
}

/// The [`owner_hash`] a [`session_key`] starts with (request IDs may hold
/// a '.' themselves; the hash never does).
pub fn key_owner_hash(key: &str) -> &str {
    key.split_once('.').map_or(key, |(owner, _)| owner)
}

/// Sessions by key ([`SessionRecord::key`]: owner and request ID).
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Adds a session; false if its key is taken.
    async fn insert(&self, record: SessionRecord) -> anyhow::Result<bool>;
    /// A session that has not expired.
    async fn get(&self, key: &str) -> anyhow::Result<Option<SessionRecord>>;
    /// The sessions of `owner` (a `sub`) that have not expired, in no set order.
    async fn list(&self, owner: &str) -> anyhow::Result<Vec<SessionRecord>>;
    /// Counts one execution; with `complete`, the session is done. False
    /// (nothing counted) when the session no longer exists.
    async fn record_execution(&self, key: &str, at: OffsetDateTime, complete: bool) -> anyhow::Result<bool>;
    /// Removes a session; the removed record, if it existed.
    async fn remove(&self, key: &str) -> anyhow::Result<Option<SessionRecord>>;
    /// Removes sessions that expired by `now`; their keys.
    async fn remove_expired(&self, now: OffsetDateTime) -> anyhow::Result<Vec<String>>;
    /// Removes the sessions of a function (it was deleted); their keys.
    async fn remove_function(&self, language_title: &str) -> anyhow::Result<Vec<String>>;
    /// Removes the sessions pinned to one version of a function (that
    /// version was deleted); their keys.
    async fn remove_version(&self, language_title: &str, version: i64) -> anyhow::Result<Vec<String>>;
    /// Sessions that can still be executed.
    async fn active_count(&self) -> anyhow::Result<usize>;
}
