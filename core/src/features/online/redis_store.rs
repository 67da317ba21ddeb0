//! The Redis online store: one hash per entity, one field per feature version (see the key
//! schema in the parent module). A batch read is one pipeline of `HMGET`s (one per entity);
//! a write is one Lua script call per 1,000 values. With a near cache, the pipeline holds only
//! the entities not cached (see "Near cache" in the parent module).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{IntoConnectionInfo as _, ProtocolVersion, PushInfo};

use crate::features::{EntityKey, EntityKind, FeatureRef, StoredValue};
use crate::stores::redact_url;

use super::codec::{self, HEADER_LEN};
use super::near_cache::{NearCache, NearCacheOptions, NearCacheStats};
use super::{
    DEFAULT_PREFIX, DEFAULT_RETENTION_FACTOR, FeatureStats, OnlineError, OnlineFeature,
    OnlineMetrics, OnlineStore, StoreStats, ValueMatrix, WriteReport, now_ms, retention_ms,
    validate_online, validate_read,
};

/// Compare-and-set of one feature version for a batch of entities. `KEYS[i]`: entity hashes;
/// `ARGV[1]`: the field; `ARGV[2i]`: the encoded value of `KEYS[i]`; `ARGV[2i+1]`: its
/// remaining retention in ms. The stored value is kept when its `(event_time_ms,
/// written_at_ms)` (little-endian i64 at offsets 2 and 10) is newer. A written value extends
/// the hash's expiry to its retention deadline when that is later. Returns
/// `{written, kept_newer}`.
const WRITE_SCRIPT: &str = r#"
local field = ARGV[1]
local written, kept = 0, 0
for i = 1, #KEYS do
  local key = KEYS[i]
  local new = ARGV[2 * i]
  local take = true
  local cur = redis.call('HGET', key, field)
  if cur and string.len(cur) >= 18 and string.byte(cur, 1) == 1 then
    local cur_event = struct.unpack('<i8', cur, 3)
    local new_event = struct.unpack('<i8', new, 3)
    if cur_event > new_event then
      take = false
    elseif cur_event == new_event then
      local cur_written = struct.unpack('<i8', cur, 11)
      local new_written = struct.unpack('<i8', new, 11)
      if cur_written > new_written then
        take = false
      end
    end
  end
  if take then
    redis.call('HSET', key, field, new)
    local px = tonumber(ARGV[2 * i + 1])
    if redis.call('PTTL', key) < px then
      redis.call('PEXPIRE', key, px)
    end
    written = written + 1
  else
    kept = kept + 1
  end
end
return {written, kept}
"#;

/// Settings of a [`RedisOnlineStore`].
#[derive(Clone, Debug)]
pub struct RedisOnlineStoreOptions {
    /// Key prefix (`[A-Za-z0-9_.-]{1,64}`).
    pub prefix: String,
    /// Values are served (stale) until their age reaches `TTL × retention_factor`.
    pub retention_factor: u32,
    /// Values per write script call.
    pub write_batch: usize,
    /// Write script calls in flight at once.
    pub writes_in_flight: usize,
    /// Entity hashes per kind read in full by [`OnlineStore::stats`]; beyond that, figures
    /// are scaled from this sample.
    pub stats_sample: usize,
    /// An in-process cache of entity hashes in front of Redis, invalidated by Redis (RESP3
    /// `CLIENT TRACKING`, Redis 6 or later); `None` (the default): every read goes to Redis.
    /// Only [`RedisOnlineStore::connect_lazy`] can set it up (it needs a connection of its
    /// own); see "Near cache" in the module documentation.
    pub near_cache: Option<NearCacheOptions>,
}

impl Default for RedisOnlineStoreOptions {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            retention_factor: DEFAULT_RETENTION_FACTOR,
            write_batch: 1000,
            writes_in_flight: 4,
            stats_sample: 1000,
            near_cache: None,
        }
    }
}

impl RedisOnlineStoreOptions {
    /// The defaults with another key prefix.
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            ..Self::default()
        }
    }
}

/// The production online store.
#[derive(Clone)]
pub struct RedisOnlineStore {
    conn: ConnectionManager,
    options: RedisOnlineStoreOptions,
    cache: Option<Arc<NearCache>>,
}

impl std::fmt::Debug for RedisOnlineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOnlineStore")
            .field("options", &self.options)
            .field("near_cache", &self.cache)
            .finish_non_exhaustive()
    }
}

fn check_options(options: &RedisOnlineStoreOptions) -> Result<(), OnlineError> {
    codec::validate_prefix(&options.prefix)?;
    if options.write_batch == 0 || options.writes_in_flight == 0 || options.stats_sample == 0 {
        return Err(OnlineError::InvalidArgument(
            "write_batch, writes_in_flight and stats_sample must be positive".into(),
        ));
    }
    Ok(())
}

impl RedisOnlineStore {
    /// A store over an open connection (for example from [`crate::stores::redis`]). A near
    /// cache cannot be set up here (it needs a RESP3 connection with a push handler of its
    /// own): use [`RedisOnlineStore::connect_lazy`] for one.
    pub fn new(
        conn: ConnectionManager,
        options: RedisOnlineStoreOptions,
    ) -> Result<Self, OnlineError> {
        check_options(&options)?;
        if options.near_cache.is_some() {
            return Err(OnlineError::InvalidArgument(
                "a near cache needs a RESP3 connection that delivers Redis's invalidation pushes \
                 to it: build the store with RedisOnlineStore::connect_lazy"
                    .into(),
            ));
        }
        Ok(Self {
            conn,
            options,
            cache: None,
        })
    }

    /// A store whose connection is made on first use, so that a process starts (and serves
    /// from its fallback) while Redis is down. Connection attempts time out after 500 ms and
    /// are retried twice (100 ms to 1 s apart) per reconnection; commands time out after 5 s
    /// (the [`super::FeatureReader`] budget is much shorter). With
    /// [`RedisOnlineStoreOptions::near_cache`], the connection speaks RESP3 and hands Redis's
    /// invalidation pushes and disconnections to the cache.
    pub fn connect_lazy(url: &str, options: RedisOnlineStoreOptions) -> Result<Self, OnlineError> {
        check_options(&options)?;
        let err = |source| OnlineError::Command {
            op: "connect",
            source,
        };
        let mut config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        let (client, cache) = match &options.near_cache {
            None => (redis::Client::open(url).map_err(err)?, None),
            Some(near) => {
                let cache = Arc::new(NearCache::new(near, &options.prefix)?);
                let info = url.into_connection_info().map_err(err)?;
                let resp3 = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                let client = redis::Client::open(info.set_redis_settings(resp3)).map_err(err)?;
                let handler = cache.clone();
                config = config.set_push_sender(move |push: PushInfo| {
                    handler.on_push(&push);
                    Ok::<(), std::convert::Infallible>(())
                });
                (client, Some(cache))
            }
        };
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(err)?;
        tracing::debug!(
            url = %redact_url(url),
            prefix = %options.prefix,
            near_cache = ?options.near_cache,
            "redis online store"
        );
        Ok(Self {
            conn,
            options,
            cache,
        })
    }

    /// What the near cache did so far; `None` without one.
    pub fn near_cache_stats(&self) -> Option<NearCacheStats> {
        self.cache.as_ref().map(|c| c.stats())
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.options.prefix
    }

    /// Removes every key under this store's prefix (all entities, all feature versions);
    /// returns how many keys. For tests, benchmarks and decommissioning an installation.
    pub async fn clear(&self) -> Result<u64, OnlineError> {
        let result = self.unlink_all().await;
        if let Some(cache) = &self.cache {
            cache.flush("clear");
        }
        result
    }

    async fn unlink_all(&self) -> Result<u64, OnlineError> {
        let pattern = format!("{}:*", self.options.prefix);
        let mut conn = self.conn.clone();
        let (mut cursor, mut removed) = (0u64, 0u64);
        loop {
            let (next, keys) = self.scan_page(&mut conn, "clear", &pattern, cursor).await?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("UNLINK")
                    .arg(keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| OnlineError::redis("clear", e))?;
                removed += n;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// One `SCAN` page (never `KEYS`): the next cursor and the keys matching `pattern`.
    async fn scan_page(
        &self,
        conn: &mut ConnectionManager,
        op: &'static str,
        pattern: &str,
        cursor: u64,
    ) -> Result<(u64, Vec<Vec<u8>>), OnlineError> {
        redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .map_err(|e| OnlineError::redis(op, e))
    }

    /// The script call writing `chunk` (none when every value is already past retention),
    /// and how many values were.
    fn write_command(
        &self,
        field: &str,
        retention: i64,
        now: i64,
        chunk: &[(EntityKey, StoredValue)],
    ) -> (Option<redis::Cmd>, u64) {
        let mut expired = 0;
        let mut keys: Vec<Vec<u8>> = Vec::with_capacity(chunk.len());
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(2 * chunk.len());
        for (entity, value) in chunk {
            let px = value.event_time_ms.saturating_add(retention) - now;
            if px <= 0 {
                expired += 1;
                continue;
            }
            let mut key = Vec::with_capacity(self.options.prefix.len() + 16 + entity.id.len());
            codec::push_entity_key(&mut key, &self.options.prefix, entity);
            keys.push(key);
            args.push(codec::encode(value));
            args.push(px.to_string().into_bytes());
        }
        if keys.is_empty() {
            return (None, expired);
        }
        // EVAL with the body: Redis caches the compiled script, and the ~1 KB it adds is small
        // next to 1,000 values.
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(WRITE_SCRIPT).arg(keys.len());
        for k in &keys {
            cmd.arg(&k[..]);
        }
        cmd.arg(field);
        for a in &args {
            cmd.arg(&a[..]);
        }
        (Some(cmd), expired)
    }
}

#[async_trait]
impl OnlineStore for RedisOnlineStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn write_batch(
        &self,
        feature: &FeatureRef,
        ttl: Duration,
        values: &[(EntityKey, StoredValue)],
    ) -> Result<WriteReport, OnlineError> {
        codec::validate_feature(feature)?;
        let retention = retention_ms(ttl, self.options.retention_factor)?;
        for (entity, _) in values {
            codec::validate_entity(entity)?;
        }
        let result = self.write_values(feature, retention, values).await;
        // Read-your-writes: whatever the outcome (a failed batch may have written part), the
        // entities written are dropped from the near cache now, before Redis's own
        // invalidation push arrives.
        if let Some(cache) = &self.cache {
            let mut key = Vec::with_capacity(128);
            for (entity, _) in values {
                key.clear();
                codec::push_entity_key(&mut key, &self.options.prefix, entity);
                cache.invalidate(&key, "local");
            }
            cache.publish_size();
        }
        result
    }

    async fn read_batch(
        &self,
        entities: &[EntityKey],
        features: &[OnlineFeature],
    ) -> Result<ValueMatrix, OnlineError> {
        validate_online(entities, features)?;
        let width = features.len();
        if entities.is_empty() || width == 0 {
            return Ok(ValueMatrix::new(width, Vec::new()));
        }
        let fields: Vec<String> = features.iter().map(|f| codec::field(&f.feature)).collect();
        match &self.cache {
            Some(cache) if cache.enabled() => {
                match self.read_cached(cache, entities, features, &fields).await {
                    Err(CachedReadError::TrackingRefused(e)) => {
                        tracing::warn!(
                            error = %e,
                            "redis refused CLIENT TRACKING; near cache turned off, reads go to redis"
                        );
                        cache.disable();
                        self.read_uncached(entities, features, &fields).await
                    }
                    Err(CachedReadError::Online(e)) => Err(e),
                    Ok(m) => Ok(m),
                }
            }
            _ => self.read_uncached(entities, features, &fields).await,
        }
    }

    async fn invalidate_entity(
        &self,
        entity: &EntityKey,
        features: &[FeatureRef],
    ) -> Result<u64, OnlineError> {
        validate_read(std::slice::from_ref(entity), features)?;
        if features.is_empty() {
            return Ok(0);
        }
        let key = codec::entity_key(&self.options.prefix, entity);
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(&key);
        for f in features {
            cmd.arg(codec::field(f));
        }
        let mut conn = self.conn.clone();
        let result = cmd
            .query_async(&mut conn)
            .await
            .map_err(|e| OnlineError::redis("invalidate", e));
        if let Some(cache) = &self.cache {
            cache.invalidate(key.as_bytes(), "local");
            cache.publish_size();
        }
        result
    }

    async fn invalidate_feature(&self, feature: &FeatureRef) -> Result<u64, OnlineError> {
        codec::validate_feature(feature)?;
        let result = self.delete_field_everywhere(feature).await;
        // Every entity may have lost a field: start afresh (a rare admin operation).
        if let Some(cache) = &self.cache {
            cache.flush("invalidate_feature");
        }
        result
    }

    fn attach_metrics(&self, metrics: &OnlineMetrics) {
        if let Some(cache) = &self.cache {
            cache.attach(metrics.near_cache().clone());
        }
    }

    async fn stats(&self) -> Result<StoreStats, OnlineError> {
        let prefix = self.options.prefix.clone();
        let sample = self.options.stats_sample;
        // Entity hashes per kind, and the first `sample` of each kind (SCAN order is the hash
        // table's, unrelated to ids).
        let mut kinds: BTreeMap<EntityKind, (u64, Vec<Vec<u8>>)> = BTreeMap::new();
        let pattern = codec::entity_pattern(&prefix);
        let mut conn = self.conn.clone();
        let mut cursor = 0u64;
        loop {
            let (next, keys) = self.scan_page(&mut conn, "stats", &pattern, cursor).await?;
            for key in keys {
                let Some(entity) = std::str::from_utf8(&key)
                    .ok()
                    .and_then(|k| codec::parse_entity_key(&prefix, k))
                else {
                    continue;
                };
                let entry = kinds.entry(entity.kind).or_default();
                entry.0 += 1;
                if entry.1.len() < sample {
                    entry.1.push(key);
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut per_feature: BTreeMap<FeatureRef, (f64, f64)> = BTreeMap::new();
        for (total, sampled) in kinds.values() {
            let scale = *total as f64 / sampled.len().max(1) as f64;
            for chunk in sampled.chunks(100) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("HGETALL").arg(&key[..]);
                    pipe.cmd("MEMORY")
                        .arg("USAGE")
                        .arg(&key[..])
                        .arg("SAMPLES")
                        .arg(0);
                }
                let replies: Vec<redis::Value> = pipe
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| OnlineError::redis("stats", e))?;
                for pair in replies.chunks(2) {
                    let [fields, usage] = pair else { continue };
                    // A hash may have expired in between: nothing to count.
                    let Ok(fields) = redis::from_redis_value_ref::<Vec<(Vec<u8>, Vec<u8>)>>(fields)
                    else {
                        continue;
                    };
                    let usage = redis::from_redis_value_ref::<Option<u64>>(usage)
                        .ok()
                        .flatten()
                        .unwrap_or(0) as f64;
                    let sizes: usize = fields.iter().map(|(f, v)| f.len() + v.len()).sum();
                    for (field, value) in &fields {
                        let Some(feature) =
                            std::str::from_utf8(field).ok().and_then(codec::parse_field)
                        else {
                            continue;
                        };
                        let share = (field.len() + value.len()) as f64 / sizes.max(1) as f64;
                        let entry = per_feature.entry(feature).or_default();
                        entry.0 += scale;
                        entry.1 += scale * usage.max(HEADER_LEN as f64) * share;
                    }
                }
            }
        }
        Ok(StoreStats {
            features: per_feature
                .into_iter()
                .map(|(feature, (keys, bytes))| FeatureStats {
                    feature,
                    keys: keys.round() as u64,
                    bytes: bytes.round() as u64,
                })
                .collect(),
        })
    }
}

/// Why a read through the near cache failed.
enum CachedReadError {
    /// Redis refused `CLIENT TRACKING` (too old, or not allowed by its ACL).
    TrackingRefused(redis::RedisError),
    /// Anything else, as an uncached read would report it.
    Online(OnlineError),
}

impl RedisOnlineStore {
    /// The script calls of a write, `writes_in_flight` at a time.
    async fn write_values(
        &self,
        feature: &FeatureRef,
        retention: i64,
        values: &[(EntityKey, StoredValue)],
    ) -> Result<WriteReport, OnlineError> {
        let now = now_ms();
        let field = codec::field(feature);
        let mut total = WriteReport::default();
        // Waves of `writes_in_flight` script calls of `write_batch` values each.
        for wave in values.chunks(self.options.write_batch * self.options.writes_in_flight) {
            let mut calls = Vec::new();
            for chunk in wave.chunks(self.options.write_batch) {
                let (cmd, expired) = self.write_command(&field, retention, now, chunk);
                total.expired += expired;
                if let Some(cmd) = cmd {
                    let mut conn = self.conn.clone();
                    calls.push(async move { cmd.query_async::<(u64, u64)>(&mut conn).await });
                }
            }
            for (written, kept) in futures::future::try_join_all(calls)
                .await
                .map_err(|e| OnlineError::redis("write", e))?
            {
                total.written += written;
                total.kept_newer += kept;
            }
        }
        Ok(total)
    }

    /// A read straight from Redis: one pipeline, one `HMGET` per entity.
    async fn read_uncached(
        &self,
        entities: &[EntityKey],
        features: &[OnlineFeature],
        fields: &[String],
    ) -> Result<ValueMatrix, OnlineError> {
        let width = features.len();
        let total = entities.len() * width;
        let mut pipe = redis::pipe();
        let mut key = Vec::with_capacity(128);
        for entity in entities {
            key.clear();
            codec::push_entity_key(&mut key, &self.options.prefix, entity);
            let cmd = pipe.cmd("HMGET").arg(&key[..]);
            for field in fields {
                cmd.arg(field.as_str());
            }
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Vec<Option<Vec<u8>>>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| OnlineError::redis("read", e))?;
        let oldest = self.oldest(features, now_ms())?;
        let mut cells = Vec::with_capacity(total);
        let mut corrupt = Vec::new();
        for (e, row) in replies.into_iter().enumerate() {
            if row.len() != width {
                return Err(OnlineError::Corrupt {
                    key: codec::entity_key(&self.options.prefix, &entities[e]),
                    reason: format!("HMGET returned {} values for {width} fields", row.len()),
                });
            }
            for (f, bytes) in row.into_iter().enumerate() {
                cells.push(match bytes {
                    None => None,
                    Some(bytes) => {
                        let key = || {
                            format!(
                                "{} {}",
                                codec::entity_key(&self.options.prefix, &entities[e]),
                                fields[f]
                            )
                        };
                        match codec::decode_lazy(&bytes, key) {
                            Ok(v) if v.event_time_ms >= oldest[f] => Some(v),
                            Ok(_) => None,
                            Err(err) => {
                                corrupt.push(err);
                                None
                            }
                        }
                    }
                });
            }
        }
        if cells.len() != total {
            return Err(OnlineError::Corrupt {
                key: "(HMGET replies)".into(),
                reason: format!("{} values for {total} cells", cells.len()),
            });
        }
        let mut matrix = ValueMatrix::new(width, cells);
        matrix.corrupt = corrupt;
        Ok(matrix)
    }

    /// The oldest event time still served, per feature, at `now` (retention).
    fn oldest(&self, features: &[OnlineFeature], now: i64) -> Result<Vec<i64>, OnlineError> {
        features
            .iter()
            .map(|f| retention_ms(f.ttl, self.options.retention_factor).map(|r| now - r))
            .collect()
    }

    /// A read through the near cache: cached entities come from memory, the others from one
    /// pipeline of `HMGET`s that starts with `CLIENT TRACKING ON` (so Redis tracks those keys
    /// on whichever connection serves the pipeline, a new one after a reconnection
    /// included), and what it returns is stored unless invalidated meanwhile.
    async fn read_cached(
        &self,
        cache: &NearCache,
        entities: &[EntityKey],
        features: &[OnlineFeature],
        fields: &[String],
    ) -> Result<ValueMatrix, CachedReadError> {
        let width = features.len();
        let oldest = self
            .oldest(features, now_ms())
            .map_err(CachedReadError::Online)?;
        let mut cells: Vec<Option<StoredValue>> = Vec::with_capacity(entities.len() * width);
        let mut missed: Vec<usize> = Vec::new();
        let mut keys: Vec<Box<[u8]>> = Vec::new();
        let layout = cache.layout(fields);
        let mut key = Vec::with_capacity(128);
        for (e, entity) in entities.iter().enumerate() {
            key.clear();
            codec::push_entity_key(&mut key, &self.options.prefix, entity);
            if !cache.serve(&key, &layout, &oldest, &mut cells) {
                missed.push(e);
                keys.push(key.as_slice().into());
                cells.resize_with(cells.len() + width, || None);
            }
        }
        cache.record_lookups((entities.len() - missed.len()) as u64, missed.len() as u64);
        if missed.is_empty() {
            return Ok(ValueMatrix::new(width, cells));
        }
        // Registered before the pipeline is sent: an invalidation from now on wins.
        let mut fetch = cache.begin(keys);
        let mut pipe = redis::pipe();
        pipe.cmd("CLIENT").arg("TRACKING").arg("ON").ignore();
        for k in fetch.keys() {
            let cmd = pipe.cmd("HMGET").arg(k);
            for field in fields {
                cmd.arg(field.as_str());
            }
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Vec<Option<Vec<u8>>>> = match pipe.query_async(&mut conn).await {
            Ok(replies) => replies,
            Err(e) => {
                let tracking_refused = e
                    .clone()
                    .into_server_errors()
                    .is_some_and(|errors| errors.iter().any(|(i, _)| *i == 0));
                return Err(if tracking_refused {
                    CachedReadError::TrackingRefused(e)
                } else {
                    CachedReadError::Online(OnlineError::redis("read", e))
                });
            }
        };
        if replies.len() != missed.len() {
            return Err(CachedReadError::Online(OnlineError::Corrupt {
                key: "(HMGET replies)".into(),
                reason: format!("{} replies for {} entities", replies.len(), missed.len()),
            }));
        }
        let mut corrupt = Vec::new();
        for (i, (row, &e)) in replies.into_iter().zip(&missed).enumerate() {
            if row.len() != width {
                return Err(CachedReadError::Online(OnlineError::Corrupt {
                    key: codec::entity_key(&self.options.prefix, &entities[e]),
                    reason: format!("HMGET returned {} values for {width} fields", row.len()),
                }));
            }
            let mut stored = Vec::with_capacity(width);
            let mut clean = true;
            for (f, bytes) in row.into_iter().enumerate() {
                let value = match bytes {
                    None => None,
                    Some(bytes) => {
                        let key = || {
                            format!(
                                "{} {}",
                                codec::entity_key(&self.options.prefix, &entities[e]),
                                fields[f]
                            )
                        };
                        match codec::decode_lazy(&bytes, key) {
                            Ok(v) => Some(v),
                            Err(err) => {
                                corrupt.push(err);
                                clean = false;
                                None
                            }
                        }
                    }
                };
                cells[e * width + f] = value
                    .as_ref()
                    .filter(|v| v.event_time_ms >= oldest[f])
                    .cloned();
                stored.push(value);
            }
            // An entity with a corrupt value is not cached: each read reports it again.
            if clean {
                fetch.complete(i, &layout, stored);
            }
        }
        drop(fetch);
        cache.publish_size();
        let mut matrix = ValueMatrix::new(width, cells);
        matrix.corrupt = corrupt;
        Ok(matrix)
    }

    /// `HDEL` of one field in every entity hash (`SCAN` + pipelines).
    async fn delete_field_everywhere(&self, feature: &FeatureRef) -> Result<u64, OnlineError> {
        let field = codec::field(feature);
        let pattern = codec::entity_pattern(&self.options.prefix);
        let mut conn = self.conn.clone();
        let (mut cursor, mut removed) = (0u64, 0u64);
        loop {
            let (next, keys) = self
                .scan_page(&mut conn, "invalidate", &pattern, cursor)
                .await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("HDEL").arg(&key[..]).arg(&field);
                }
                let counts: Vec<u64> = pipe
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| OnlineError::redis("invalidate", e))?;
                removed += counts.iter().sum::<u64>();
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}
