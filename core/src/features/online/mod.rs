//! The online store: the latest value of each feature version for each entity, for serving.
//!
//! Two implementations of one seam, [`OnlineStore`]: [`RedisOnlineStore`] (production) and
//! [`InProcessOnlineStore`] (local mode, tests). One conformance suite
//! (`core/tests/online_conformance.rs`) runs against both. On top of the seam,
//! [`FeatureReader`] serves reads within a time budget: freshness is decided on every read,
//! missing values come from a [`Fallback`] (the offline store: [`OfflineFallback`], or a
//! computation), and a Redis that is down or slow degrades the answer instead of failing it.
//! [`warm_from_offline`] fills an empty online store from the offline store's latest values;
//! [`http`] holds the JSON shapes of the scorer's feature API.
//!
//! # Key schema
//!
//! One Redis hash per entity; one field per feature version:
//!
//! ```text
//! key    {prefix}:e:{entity_kind}:{entity_id}        field  {feature}:v{major}
//! rs:e:product:P-1234                                 popularity_score:v1, freshness_score:v1, …
//! rs:e:user_product:u42|P-1234                        user_product_affinity:v2
//! ```
//!
//! - `prefix` (default `rs`, `[A-Za-z0-9_.-]{1,64}`) separates installations and test runs
//!   sharing one Redis; `e` is the family (entity hashes), leaving room for others.
//! - `entity_kind` is `user`, `product` or `user_product`; `entity_id` is any UTF-8 up to 512
//!   bytes (it is the last component, so a `:` in it is harmless). `feature` follows the
//!   registry's rule `[a-z][a-z0-9_]*`. Neither prefix nor feature may contain glob
//!   characters, so `SCAN MATCH {prefix}:e:*` finds exactly this store's hashes.
//! - The major version is part of the field, so v1 and v2 of a feature live side by side
//!   until v1 is retired with [`OnlineStore::invalidate_feature`].
//!
//! Why a hash per entity rather than a key per value: a read of 100 entities × 50 features
//! is 100 `HMGET`s (one per entity) in one pipeline instead of 5,000 key lookups, which
//! measured 3–4× less Redis time on a keyspace of a million values (Redis looks up 100 keys
//! in its main table, then fields within small, cache-friendly hashes), and a value takes
//! about 40 bytes instead of 110 (small hashes are listpacks). The cost: retiring a feature
//! version walks every entity hash (`SCAN` + pipelined `HDEL`, a rare admin operation), and
//! memory is reclaimed per entity rather than per value (below). Every key is a single
//! entity, so the schema also suits Redis Cluster with a cluster-aware client (this crate
//! talks to a single primary, with replicas or Sentinel in front).
//!
//! # Value encoding (format 1, little-endian)
//!
//! ```text
//! offset  size  field
//! 0       1     format version = 1
//! 1       1     type tag: 1 float (f64) | 2 int (i64) | 3 string (UTF-8) | 4 float vector (f32 × n)
//! 2       8     event_time_ms  (i64)  the time the value describes
//! 10      8     written_at_ms  (i64)  when it was written
//! 18      …     payload: f64 | i64 | UTF-8 bytes | n × f32  (length = rest of the value)
//! ```
//!
//! Bytes that do not decode are reported as [`OnlineError::Corrupt`] naming the key; a read
//! treats that cell as missing (so the fallback is asked) and counts the error.
//!
//! # Time to live and freshness
//!
//! A feature's TTL comes from its definition in the registry. A value's age is
//! `now − event_time_ms`: a backfill written today about last month is old, not fresh.
//! - age ≤ TTL: [`Freshness::Fresh`](crate::features::Freshness::Fresh);
//! - TTL < age ≤ TTL × `retention_factor` (default 2): returned as
//!   [`Freshness::Stale`](crate::features::Freshness::Stale), with its age, so the caller can
//!   decide; never as fresh, and never silently missing right after the TTL;
//! - age > TTL × `retention_factor`: gone. Reads drop it (so the fallback is asked), whatever
//!   is still in memory; a value already that old when written is not written.
//!
//! Memory: each write extends its entity hash's expiry (`PEXPIRE`) to the value's retention
//! deadline when that is later, so Redis removes an entity's hash once none of its values
//! can be served any more; a feature that stops being written keeps its fields in hashes that
//! other features keep alive until it is retired (`invalidate_feature`).
//!
//! # Overwrites
//!
//! A write replaces the stored value when its `(event_time_ms, written_at_ms)` is not older:
//! a newer event time wins; for the same event time the newer write wins (a recomputation or a
//! correction). A write with an *older event time* than the stored value is ignored and
//! counted in [`WriteReport::kept_newer`]: a late backfill or a retried job can never make
//! serving go back in time. To roll a feature back on purpose, invalidate it, then write.
//! In Redis the comparison and the `HSET` run in one Lua script (`EVAL`) per batch of 1,000
//! values, so a write is one round trip per batch (Feast reads the old timestamps first: two).
//!
//! # Near cache
//!
//! [`RedisOnlineStoreOptions::near_cache`] puts an in-process cache of entity hashes in front
//! of Redis (off by default in the library; the scorer turns it on, `--online-cache-entries`).
//! A read serves the entities it holds with every requested field from memory and sends the
//! others to Redis in one pipeline, then merges; a read of cached entities only makes no
//! round trip at all. What it holds is what Redis returned (absent fields included), so
//! retention and freshness behave exactly as without it: values past `TTL ×
//! retention_factor` are dropped when served, and [`FeatureReader`] classifies each value's
//! age at read time.
//!
//! Correctness comes from Redis (server-assisted client-side caching): the store's connection
//! speaks RESP3 and every pipeline that reads uncached entities starts with `CLIENT TRACKING
//! ON`, so Redis remembers the keys read on that connection, whichever it is, and pushes an
//! `invalidate` message when any client changes or deletes one of them (a trainer job's
//! write, an expiry, an `HDEL`). The push drops the entity. (Default tracking rather than
//! `BCAST` with the key prefix: Redis then pushes only for keys this process has read, not for
//! every value a backfill writes; its tracking table is bounded by `tracking-table-max-keys`,
//! and a key it forgets is pushed as invalidated.) Around that:
//! - A read registers its keys before sending; an invalidation that arrives while it is in
//!   flight keeps its answer out of the cache (the answer may predate the write), so a value
//!   written by any process stops being served within the time a push takes to arrive.
//! - This store's own writes and invalidations drop the entities they touch as soon as they
//!   return (read-your-writes without waiting for the push); `invalidate_feature` and
//!   `clear` empty the cache.
//! - A lost connection empties the cache, as does a `FLUSHDB`/`FLUSHALL` (Redis pushes a null)
//!   or a push that cannot be read: invalidations sent on a dead connection are lost, and
//!   reads that began before the flush store nothing.
//! - As a backstop, an entity is read again after `max_age` (default 60 s) even if no
//!   invalidation came.
//! - A Redis that refuses `CLIENT TRACKING` (its ACL) turns the cache off with a warning;
//!   reads then go to Redis. RESP3 needs Redis 6 or later.
//!
//! Bounds: `max_entries` entities and `max_bytes` estimated bytes (an entity larger than
//! `max_bytes / max_entries` counts as several entries), evicted by `quick_cache`'s
//! S3-FIFO-like policy (scan-resistant, frequency-aware; chosen over `moka` for its lower
//! cost per lookup on the read path and a bound enforced at insertion rather than by
//! background housekeeping). redis-rs's own `cache-aio` cache was not used: it stores an
//! answer after the invalidation of the same key may already have been handled (a stale
//! value then stays until its client-side TTL), keys its entries by whole command (one entry
//! per feature list) and sends a `PTTL` per cached command. Metrics:
//! `feature_store_near_cache_*` (hits, misses, evictions, invalidations, flushes, size; see
//! [`OnlineMetrics`]), and [`RedisOnlineStore::near_cache_stats`].

pub(crate) mod codec;
mod fallback;
mod memory;
mod metrics;
mod near_cache;
mod reader;
mod redis_store;
mod warm;

use std::time::Duration;

use async_trait::async_trait;

use crate::features::{EntityKey, FeatureRef, StoredValue};

pub use codec::{
    FORMAT_VERSION, HEADER_LEN, MAX_ENTITY_ID_LEN, decode_at, encode, entity_key, field,
    parse_entity_key, parse_field, supersedes,
};
pub use fallback::{Fallback, FallbackChain, MemoryFallback, NoFallback, OfflineFallback};
pub use memory::InProcessOnlineStore;
pub use metrics::{NearCacheMetrics, OnlineMetrics, freshness_label};
pub use near_cache::{NearCacheOptions, NearCacheStats};
pub use reader::{FeatureBatch, FeatureReader, ReaderOptions, ServedValue, StoreOutcome, classify};
pub use redis_store::{RedisOnlineStore, RedisOnlineStoreOptions};
pub use warm::{WarmReport, warm_from_offline};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "rs";

/// Default retention, in TTLs: a value stays readable (as stale) until its age reaches
/// `TTL × DEFAULT_RETENTION_FACTOR`.
pub const DEFAULT_RETENTION_FACTOR: u32 = 2;

/// A feature as the online store serves it: which version, and how long a value stays fresh
/// (from the feature's definition in the registry).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OnlineFeature {
    /// Name and major version.
    pub feature: FeatureRef,
    /// A value older than this (by event time) is stale.
    pub ttl: Duration,
}

impl OnlineFeature {
    /// `feature` with `ttl`.
    pub fn new(feature: FeatureRef, ttl: Duration) -> Self {
        Self { feature, ttl }
    }
}

/// What a write did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Values stored.
    pub written: u64,
    /// Values ignored because the stored value has a newer event time (or the same event time
    /// and a newer write time).
    pub kept_newer: u64,
    /// Values ignored because they were already past retention (`TTL × retention_factor`).
    pub expired: u64,
}

impl std::ops::AddAssign for WriteReport {
    fn add_assign(&mut self, other: Self) {
        self.written += other.written;
        self.kept_newer += other.kept_newer;
        self.expired += other.expired;
    }
}

/// Values read for entities × features, row-major (one row per entity).
#[derive(Debug, Default)]
pub struct ValueMatrix {
    features: usize,
    cells: Vec<Option<StoredValue>>,
    /// Cells whose stored bytes did not decode; those cells are empty.
    pub corrupt: Vec<OnlineError>,
}

impl ValueMatrix {
    /// A matrix from row-major cells (`cells.len()` must be a multiple of `features`).
    pub fn new(features: usize, cells: Vec<Option<StoredValue>>) -> Self {
        debug_assert!(features == 0 || cells.len().is_multiple_of(features));
        Self {
            features,
            cells,
            corrupt: Vec::new(),
        }
    }

    /// Number of features (columns).
    pub fn features(&self) -> usize {
        self.features
    }

    /// Number of entities (rows).
    pub fn entities(&self) -> usize {
        self.cells.len().checked_div(self.features).unwrap_or(0)
    }

    /// The value of feature `f` for entity `e`.
    pub fn get(&self, e: usize, f: usize) -> Option<&StoredValue> {
        self.cells.get(e * self.features + f)?.as_ref()
    }

    /// Takes the value of feature `f` for entity `e` out of the matrix.
    pub fn take(&mut self, e: usize, f: usize) -> Option<StoredValue> {
        self.cells.get_mut(e * self.features + f)?.take()
    }

    /// All cells, row-major.
    pub fn into_cells(self) -> Vec<Option<StoredValue>> {
        self.cells
    }
}

/// Keys and bytes of one feature version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureStats {
    /// Feature version.
    pub feature: FeatureRef,
    /// Values stored (including stale ones not yet removed). Redis: exact up to
    /// `stats_sample` entities per kind, estimated from that many beyond.
    pub keys: u64,
    /// Bytes used, overhead included. Redis: each sampled hash's `MEMORY USAGE` shared among
    /// its fields by their sizes (an estimate). In-process: keys plus encoded values.
    pub bytes: u64,
}

/// What the store holds, per feature version. Computing it walks the keyspace (`SCAN`), so
/// it belongs in a periodic task, not on the request path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Per feature version, sorted.
    pub features: Vec<FeatureStats>,
}

impl StoreStats {
    /// Values over all features.
    pub fn keys(&self) -> u64 {
        self.features.iter().map(|f| f.keys).sum()
    }

    /// Bytes over all features.
    pub fn bytes(&self) -> u64 {
        self.features.iter().map(|f| f.bytes).sum()
    }

    /// The figures of one feature version.
    pub fn feature(&self, feature: &FeatureRef) -> Option<&FeatureStats> {
        self.features.iter().find(|s| &s.feature == feature)
    }
}

/// Why an online-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OnlineError {
    /// Redis could not be reached or the connection broke.
    #[error("redis unavailable during {op}: {source}")]
    Unavailable {
        /// The operation (`read`, `write`, `invalidate`, `stats`).
        op: &'static str,
        /// The client's error.
        source: redis::RedisError,
    },
    /// Redis answered with an error.
    #[error("redis refused {op}: {source}")]
    Command {
        /// The operation.
        op: &'static str,
        /// The client's error.
        source: redis::RedisError,
    },
    /// The operation did not finish in time.
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The time allowed.
        after: Duration,
    },
    /// The store is skipped for a while after failures (circuit open).
    #[error("online store skipped for {remaining:?} after {failures} consecutive failures")]
    CircuitOpen {
        /// Consecutive failures so far.
        failures: u32,
        /// Until the next attempt.
        remaining: Duration,
    },
    /// Bytes under a key do not decode.
    #[error("corrupt value under {key}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong with the bytes.
        reason: String,
    },
    /// A name that cannot be part of a key.
    #[error("invalid {what} {name:?}")]
    InvalidName {
        /// What kind of name.
        what: &'static str,
        /// The name (an entity id is cut to 64 characters).
        name: String,
    },
    /// An argument outside what the store accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A request larger than allowed.
    #[error("{cells} values requested, more than the limit of {limit}")]
    TooLarge {
        /// Entities × features requested.
        cells: usize,
        /// The limit.
        limit: usize,
    },
    /// The fallback failed.
    #[error("fallback {fallback} failed: {message}")]
    Fallback {
        /// Which fallback.
        fallback: &'static str,
        /// What it said.
        message: String,
    },
}

impl OnlineError {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unavailable { .. } => "RedisUnavailable",
            Self::Command { .. } => "RedisCommand",
            Self::Timeout { .. } => "Timeout",
            Self::CircuitOpen { .. } => "CircuitOpen",
            Self::Corrupt { .. } => "CorruptValue",
            Self::InvalidName { .. } => "InvalidName",
            Self::InvalidArgument(_) => "InvalidArgument",
            Self::TooLarge { .. } => "RequestTooLarge",
            Self::Fallback { .. } => "FallbackFailed",
        }
    }

    /// Whether the store itself is failing (as opposed to a bad request or a bad value): what
    /// opens the circuit.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::Timeout { .. } | Self::Command { .. }
        )
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

/// The online-store seam.
///
/// Implementations: [`RedisOnlineStore`], [`InProcessOnlineStore`]. Freshness is not decided
/// here: a read returns what is stored within retention (stale values included) and
/// [`FeatureReader`] classifies it against each feature's TTL.
#[async_trait]
pub trait OnlineStore: Send + Sync + 'static {
    /// Short name for metrics and logs (`redis`, `in_process`).
    fn backend(&self) -> &'static str;

    /// Writes values of one feature version (`ttl` from its definition). Redis: one round trip
    /// per 1,000 values, several batches in flight. See the module documentation for what
    /// replaces what.
    async fn write_batch(
        &self,
        feature: &FeatureRef,
        ttl: Duration,
        values: &[(EntityKey, StoredValue)],
    ) -> Result<WriteReport, OnlineError>;

    /// Reads every feature for every entity in one round trip. Row `e`, column `f` of the
    /// result is `features[f]` of `entities[e]`. Values past retention (`TTL ×
    /// retention_factor`, with each feature's TTL as given here) are left out; stale values
    /// within retention are returned.
    async fn read_batch(
        &self,
        entities: &[EntityKey],
        features: &[OnlineFeature],
    ) -> Result<ValueMatrix, OnlineError>;

    /// Removes the values of `features` for one entity; returns how many existed.
    async fn invalidate_entity(
        &self,
        entity: &EntityKey,
        features: &[FeatureRef],
    ) -> Result<u64, OnlineError>;

    /// Removes every value of one feature version; returns how many existed.
    async fn invalidate_feature(&self, feature: &FeatureRef) -> Result<u64, OnlineError>;

    /// Keys and bytes per feature version (walks the keyspace).
    async fn stats(&self) -> Result<StoreStats, OnlineError>;

    /// Publishes the store's own metrics (the near cache's) through `metrics` from now on;
    /// [`FeatureReader`] calls it with its metrics. Stores without metrics of their own
    /// ignore it.
    fn attach_metrics(&self, _metrics: &OnlineMetrics) {}
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Milliseconds of a duration, saturating.
pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Checks the names of a read (the same rules as writes, so both stores refuse the same).
pub(crate) fn validate_read(
    entities: &[EntityKey],
    features: &[FeatureRef],
) -> Result<(), OnlineError> {
    features.iter().try_for_each(codec::validate_feature)?;
    entities.iter().try_for_each(codec::validate_entity)
}

/// Checks the features of a read with their TTLs.
pub(crate) fn validate_online(
    entities: &[EntityKey],
    features: &[OnlineFeature],
) -> Result<(), OnlineError> {
    for f in features {
        codec::validate_feature(&f.feature)?;
        if f.ttl.is_zero() {
            return Err(OnlineError::InvalidArgument(format!(
                "the TTL of {} must be positive",
                f.feature
            )));
        }
    }
    entities.iter().try_for_each(codec::validate_entity)
}

/// Checks a TTL and a retention factor and returns the retention in milliseconds.
pub(crate) fn retention_ms(ttl: Duration, factor: u32) -> Result<i64, OnlineError> {
    if ttl.is_zero() {
        return Err(OnlineError::InvalidArgument(
            "a TTL must be positive".into(),
        ));
    }
    Ok(duration_ms(ttl)
        .max(1)
        .saturating_mul(i64::from(factor.max(1))))
}
