//! Per-user state for the scorer: the user's recent interactions ([`UserHistory`]), and, per
//! model version, the user's factors, interaction count and already-seen products, cached
//! ([`UserStateCache`]) and put together by [`UserStates`].
//!
//! ```text
//!   GET /v1/recommendations?user_id=u42&exclude_seen=true
//!        │
//!   UserStates::get_or_build(model, "u42")
//!        ├─► cache (Redis / in-process)  hit ─► factors, source, counts, seen rows
//!        └─► miss ─► history (Postgres `events` / in-process) ─► trained factors, or a fold-in
//!                    ─► cache write (guarded by the user's generation; failures never fatal)
//!
//!   ingestion ─► UserStates::record(events) ─► history.record ─► invalidate_user (each user)
//! ```
//!
//! The design, with the reasons for each choice, is also in `docs/user-state.md`.
//!
//! # What is cached
//!
//! Per (model name, model version, user id), a [`CachedState`]:
//! - the **source** of the user's factors: trained (the model has a row for the user), fold-in
//!   (solved from the history against the item factors) or none (no interaction with an item
//!   this version knows);
//! - the **factors** of a fold-in. Trained factors are not copied: the model in memory has them
//!   and a hit takes them from there, so the cache stays small and can never disagree;
//! - the **interaction count** (events in the history read, so at most the history limit) and
//!   how many of them are with items this version knows;
//! - the **seen** products, as rows of this model version (ascending, distinct): the most
//!   recent `max_seen` distinct products of the history that the version knows. Products it
//!   does not know cannot be recommended by it anyway.
//!
//! A new model version needs no invalidation: the version is part of the key, so its users
//! start with misses while the old version's entries expire.
//!
//! # Key schema (Redis)
//!
//! Next to the online store's entity hashes (`{prefix}:e:{entity_kind}:{entity_id}`, see
//! [`crate::features::online`]), one hash per user:
//!
//! ```text
//! key    {prefix}:u:{user_id}        field  {model}:{version}   the state (binary, below)
//!                                           ~gen                generation of the last invalidation
//! rs:u:u42                                  als:20250101-120000-a1b2c3, als:20250108-093000-d4e5f6, ~gen
//! ```
//!
//! - `prefix` is the online store's (default `rs`, `[A-Za-z0-9_.-]{1,64}`); `u` is the family
//!   of user-state hashes, so `SCAN MATCH {prefix}:e:*` (the online store's maintenance) never
//!   sees them and `{prefix}:u:*` finds exactly these.
//! - `user_id` is any UTF-8 of 1 to 512 bytes; it is the last component, so a `:` in it is
//!   harmless. Model names (`[a-z0-9-]`) and versions (`[A-Za-z0-9._-]`) cannot contain `:` or
//!   start with `~`, so fields never collide.
//! - One key per user makes "the user's interactions changed" one operation on one key,
//!   whatever the number of models and versions, and keeps every key in one Redis Cluster
//!   slot of its own.
//!
//! # Value encoding (format 1, little-endian)
//!
//! ```text
//! offset  size  field
//! 0       1     format version = 1
//! 1       1     source: 0 none | 1 trained | 2 fold-in
//! 2       8     written_at_ms (i64)
//! 10      4     interactions (u32)
//! 14      4     known: interactions with items of this version (u32)
//! 18      2     n: factors stored (u16; 0 unless fold-in)
//! 20      4     m: seen rows (u32)
//! 24      4·n   factors (f32)
//! 24+4n   4·m   seen rows (u32, strictly ascending)
//! ```
//!
//! Binary rather than JSON: a fold-in of 64 factors with 500 seen rows is 2,280 bytes instead
//! of about 4 KB of JSON, a hit decodes with one length check and two copies instead of 564
//! number parses, and f32 factors round-trip bit for bit. The leading format byte lets a later
//! layout coexist during a rollout. Bytes that do not decode are reported as
//! [`UserStateError::Corrupt`] and treated as a miss (then overwritten).
//!
//! # Time to live
//!
//! [`CacheOptions::ttl`] (default 24 h). Each write sets the user key's expiry to the TTL
//! (`PEXPIRE`), so a user's hash disappears a TTL after its last write; a state is also never
//! served once it is older than the TTL by its `written_at_ms`, even when a newer write keeps
//! the key alive. At most [`CacheOptions::max_versions`] (default 8) versions are kept per
//! user: a write beyond that drops the oldest written (enough for stable, canary and shadow
//! of a few models).
//!
//! # Invalidation and the race it must not lose
//!
//! When a user's interactions change, [`UserStateCache::invalidate_user`] deletes the user's
//! hash (every model, every version) and leaves in it only `~gen`, a new random generation,
//! for [`CacheOptions::tombstone_ttl`] (default 60 s). A build reads the generation with the
//! state (one `HMGET`); its write (one script: compare `~gen`, `HSET`, `PEXPIRE`) is refused if
//! the generation changed in between. Without this, a request that read the history just
//! before an event was stored, and wrote the cache just after the invalidation, would cache
//! the old state (without the purchase just made) for up to 24 h. Invalidation is still one
//! round trip on one key (a script that `DEL`s it and sets `~gen`), whatever the number of
//! model versions. The history is written before the cache is invalidated, so a build that
//! reads the new generation also reads the new history.
//!
//! # Degradation
//!
//! The cache and the history each sit behind a per-call timeout and a circuit breaker (the
//! same scheme as the online store's reader: after `failure_threshold` consecutive failures
//! the dependency is skipped for a cool-down, doubled after each failed probe). With Redis
//! down or slow, [`UserStates::get_or_build`] computes from the model in memory and the history
//! directly ([`CacheOutcome::Bypassed`]): slower, same answer. With the history down, a trained
//! user still gets their factors; seen products and counts are then empty and the state says
//! why ([`UserState::history_error`]); such a state is never cached. An invalidation that
//! cannot reach Redis is kept (bounded) and retried ([`UserStates::flush_pending`]); until it
//! succeeds this process does not read that user's cached state.
//!
//! # Metrics
//!
//! See [`UserStateMetrics`].

mod codec;
mod history;
mod memory;
mod metrics;
mod redis_cache;
mod service;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::cf::interactions::EventType;
use crate::events::{EventRow, EventsError};

pub use codec::{FORMAT_VERSION, HEADER_LEN, decode, encode, field, user_key};
pub use history::{DEFAULT_PER_USER, InProcessUserHistory, PostgresUserHistory, validate_events};
pub use memory::{DEFAULT_MAX_USERS, InProcessUserStateCache};
pub use metrics::UserStateMetrics;
pub use redis_cache::{RedisUserStateCache, RedisUserStateCacheOptions};
pub use service::{
    Built, CacheOutcome, RecordReport, UserState, UserStateArgs, UserStates, UserStatesOptions,
    build_state,
};

/// Longest user id, in bytes (the online store's entity-id limit).
pub const MAX_USER_ID_LEN: usize = 512;

/// Why a user-state operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UserStateError {
    /// A user id that cannot be a key.
    #[error("invalid user id {id:?}: {reason}")]
    InvalidUserId {
        /// The id (cut to 64 characters).
        id: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An event that cannot be recorded.
    #[error("event {index} ({event_id:?}): {reason}")]
    InvalidEvent {
        /// Position in the batch.
        index: usize,
        /// Its event id.
        event_id: String,
        /// What is wrong.
        reason: String,
    },
    /// An option outside what is accepted.
    #[error("invalid option: {0}")]
    InvalidArgument(String),
    /// Redis could not be reached or the connection broke.
    #[error("redis unavailable during user-state {op}: {source}")]
    Unavailable {
        /// The operation (`get`, `put`, `invalidate`).
        op: &'static str,
        /// The client's error.
        source: redis::RedisError,
    },
    /// Redis answered with an error.
    #[error("redis refused user-state {op}: {source}")]
    Command {
        /// The operation.
        op: &'static str,
        /// The client's error.
        source: redis::RedisError,
    },
    /// The operation did not finish in time.
    #[error("user-state {op} timed out after {after:?}")]
    Timeout {
        /// The operation (`cache get`, `history read`, …).
        op: &'static str,
        /// The time allowed.
        after: Duration,
    },
    /// Stored bytes do not decode.
    #[error("corrupt user state under {key}: {reason}")]
    Corrupt {
        /// The key and field.
        key: String,
        /// What is wrong with the bytes.
        reason: String,
    },
    /// The history (events table or file) failed.
    #[error("user history: {0}")]
    History(#[from] EventsError),
}

impl UserStateError {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidUserId { .. } => "InvalidUserId",
            Self::InvalidEvent { .. } => "InvalidEvent",
            Self::InvalidArgument(_) => "InvalidArgument",
            Self::Unavailable { .. } => "RedisUnavailable",
            Self::Command { .. } => "RedisCommand",
            Self::Timeout { .. } => "Timeout",
            Self::Corrupt { .. } => "CorruptUserState",
            Self::History(e) => e.kind(),
        }
    }

    /// Whether a dependency itself is failing (as opposed to bad input or a bad value): what
    /// opens a circuit.
    pub fn is_outage(&self) -> bool {
        match self {
            Self::Unavailable { .. } | Self::Command { .. } | Self::Timeout { .. } => true,
            Self::History(e) => e.retryable(),
            _ => false,
        }
    }

    /// A Redis error, classified as unavailability (I/O, connection, timeouts) or a refusal.
    pub(crate) fn redis(op: &'static str, source: redis::RedisError) -> Self {
        if crate::stores::redis_unavailable(&source) {
            Self::Unavailable { op, source }
        } else {
            Self::Command { op, source }
        }
    }
}

/// Checks a user id: 1 to [`MAX_USER_ID_LEN`] bytes of any UTF-8 without control characters.
pub fn validate_user_id(user_id: &str) -> Result<(), UserStateError> {
    let reason = if user_id.is_empty() {
        "must not be empty"
    } else if user_id.len() > MAX_USER_ID_LEN {
        "longer than 512 bytes"
    } else if user_id.chars().any(char::is_control) {
        "contains a control character"
    } else {
        return Ok(());
    };
    Err(UserStateError::InvalidUserId {
        id: user_id.chars().take(64).collect(),
        reason,
    })
}

/// One interaction of a user, as the history returns it (most recent first).
#[derive(Clone, Debug, PartialEq)]
pub struct Interaction {
    /// Product id.
    pub product_id: String,
    /// What the user did.
    pub kind: EventType,
    /// When, in milliseconds since the Unix epoch (`None` for file events without a time;
    /// those count as older than any timed event).
    pub at_ms: Option<i64>,
    /// Explicit weight (the rating of a rating), if any.
    pub value: Option<f32>,
}

impl Interaction {
    /// The interaction as [`crate::cf::serving::ServingModel::fold_in`] reads it.
    pub fn as_fold_in(&self) -> crate::cf::serving::Interaction<'_> {
        crate::cf::serving::Interaction {
            item: &self.product_id,
            kind: self.kind,
            value: self.value,
        }
    }
}

/// The user-history seam: a user's recent interactions, and the ingestion of new ones.
///
/// Implementations: [`PostgresUserHistory`] (the `events` table), [`InProcessUserHistory`]
/// (local mode: an events file, optionally appended to).
#[async_trait]
pub trait UserHistory: Send + Sync + 'static {
    /// Short name for metrics and logs (`postgres`, `in_process`).
    fn backend(&self) -> &'static str;

    /// The user's `limit` most recent interactions, most recent first.
    async fn history(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<Interaction>, UserStateError>;

    /// Stores events, idempotently by event id (an id already stored for the same event is
    /// skipped; for a different event the whole batch is refused). Returns how many were new.
    async fn record(&self, events: &[EventRow]) -> Result<u64, UserStateError>;
}

/// How a user's factors came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FactorSource {
    /// Learned in training: the model has a row for the user.
    Trained,
    /// Solved from the user's interactions against the item factors.
    FoldIn,
    /// No factors: the model does not know the user, and none of their interactions is with
    /// an item it knows.
    None,
}

impl FactorSource {
    /// Wire name: `trained`, `fold_in`, `none` (responses and metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trained => "trained",
            Self::FoldIn => "fold_in",
            Self::None => "none",
        }
    }
}

/// Which model version and user a cached state belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StateKey<'a> {
    /// Model name.
    pub model: &'a str,
    /// Model version (the concrete version, never an alias).
    pub version: &'a str,
    /// User id.
    pub user_id: &'a str,
}

/// A user's state for one model version, as cached.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedState {
    /// How the factors came about.
    pub source: FactorSource,
    /// The factors of a fold-in; empty otherwise (trained factors come from the model).
    pub factors: Vec<f32>,
    /// Interactions in the history read (at most the history limit).
    pub interactions: u32,
    /// Of those, interactions with items this version knows.
    pub known: u32,
    /// Rows of this version the user interacted with, ascending and distinct.
    pub seen: Vec<u32>,
    /// When the state was computed, in milliseconds since the Unix epoch.
    pub written_at_ms: i64,
}

/// The generation of a user's cache entry: changed by every invalidation. A write carries the
/// generation its lookup saw and is refused if it changed since.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Generation(pub Option<u64>);

/// What a cache lookup found.
#[derive(Debug)]
pub struct Lookup {
    /// The state, if cached and younger than the TTL.
    pub state: Option<CachedState>,
    /// The user's generation, to pass to [`UserStateCache::put`].
    pub generation: Generation,
    /// Bytes that were stored but do not decode (the state is then `None`).
    pub corrupt: Option<UserStateError>,
}

/// Settings shared by the cache implementations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheOptions {
    /// A state is served for this long after it was written (default 24 h); a user's key
    /// expires this long after its last write.
    pub ttl: Duration,
    /// How long the generation left by an invalidation is kept (default 60 s): longer than
    /// any build takes, so that a build that started before the invalidation cannot write.
    /// [`UserStates`] does not write after builds of 10 s or more; keep this above that.
    pub tombstone_ttl: Duration,
    /// Most model versions kept per user (default 8); a write beyond drops the oldest.
    pub max_versions: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 3600),
            tombstone_ttl: Duration::from_secs(60),
            max_versions: 8,
        }
    }
}

impl CacheOptions {
    /// Checks the options.
    pub fn validate(&self) -> Result<(), UserStateError> {
        if self.ttl < Duration::from_millis(1) || self.tombstone_ttl < Duration::from_millis(1) {
            return Err(UserStateError::InvalidArgument(format!(
                "user-state ttl ({:?}) and tombstone ttl ({:?}) must be at least 1 ms",
                self.ttl, self.tombstone_ttl
            )));
        }
        if self.max_versions == 0 || self.max_versions > 1000 {
            return Err(UserStateError::InvalidArgument(format!(
                "max_versions is {}; it must be between 1 and 1000",
                self.max_versions
            )));
        }
        Ok(())
    }
}

/// The user-state cache seam.
///
/// Implementations: [`RedisUserStateCache`] (production), [`InProcessUserStateCache`] (local
/// mode, tests). One conformance suite (`core/tests/user_state.rs`) runs against both.
#[async_trait]
pub trait UserStateCache: Send + Sync + 'static {
    /// Short name for metrics and logs (`redis`, `in_process`).
    fn backend(&self) -> &'static str;

    /// The state of `key` if cached and younger than the TTL, with the user's generation.
    async fn get(&self, key: &StateKey<'_>) -> Result<Lookup, UserStateError>;

    /// Stores `state` under `key` if the user's generation is still `generation` (the one
    /// [`Self::get`] returned); returns whether it was stored. Refreshes the user's expiry.
    async fn put(
        &self,
        key: &StateKey<'_>,
        generation: Generation,
        state: &CachedState,
    ) -> Result<bool, UserStateError>;

    /// Forgets every state of the user (all models and versions) and changes their
    /// generation, so that builds in flight cannot write what they computed before.
    async fn invalidate_user(&self, user_id: &str) -> Result<(), UserStateError>;
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Milliseconds of a duration, saturating.
pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_checked_with_a_reason() {
        assert!(validate_user_id("u:42/ü").is_ok());
        let long = "x".repeat(MAX_USER_ID_LEN + 1);
        for (id, reason) in [("", "empty"), (long.as_str(), "512"), ("a\nb", "control")] {
            let e = validate_user_id(id).expect_err(id);
            assert_eq!(e.kind(), "InvalidUserId");
            assert!(e.to_string().contains(reason), "{e}");
        }
        let e = validate_user_id(&long).expect_err("long");
        assert!(e.to_string().len() < 200, "the id is cut: {e}");
    }

    #[test]
    fn cache_options_are_checked() {
        assert!(CacheOptions::default().validate().is_ok());
        let zero = CacheOptions {
            ttl: Duration::ZERO,
            ..CacheOptions::default()
        };
        assert!(
            zero.validate()
                .expect_err("ttl")
                .to_string()
                .contains("ttl")
        );
        let none = CacheOptions {
            max_versions: 0,
            ..CacheOptions::default()
        };
        assert!(
            none.validate()
                .expect_err("versions")
                .to_string()
                .contains("max_versions")
        );
    }

    #[test]
    fn outages_are_told_from_bad_input() {
        let t = UserStateError::Timeout {
            op: "cache get",
            after: Duration::from_millis(20),
        };
        assert!(t.is_outage());
        assert!(!UserStateError::InvalidArgument("x".into()).is_outage());
        let io = UserStateError::History(EventsError::Io {
            path: "/x".into(),
            source: std::io::Error::other("disk"),
        });
        assert!(io.is_outage());
        assert_eq!(io.kind(), "EventsIo");
    }
}
