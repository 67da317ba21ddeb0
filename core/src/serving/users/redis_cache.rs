//! The Redis user-state cache: one hash per user (key schema and encoding in the module docs).
//!
//! - get: one `HMGET {key} {model}:{version} ~gen`;
//! - put: one script: compare `~gen`, `HSET`, drop the oldest versions beyond the limit,
//!   `PEXPIRE`;
//! - invalidate: one script: `DEL`, `HSET ~gen <random>`, `PEXPIRE` (the tombstone TTL).
//!
//! Scripts run with `EVAL` and their body, as the online store's writes do: Redis caches the
//! compiled script, the body is under 1 KB and is sent on misses and invalidations only (the
//! client's `EVALSHA` helper needs a feature this workspace does not enable). Each touches one
//! key, so they suit a Redis Cluster with a cluster-aware client as well as a single primary.

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::codec::{self, GENERATION_FIELD, validate_key, validate_prefix};
use super::{
    CacheOptions, CachedState, Generation, Lookup, StateKey, UserStateCache, UserStateError,
    duration_ms, now_ms, validate_user_id,
};
use crate::stores::redact_url;

/// `KEYS[1]` user hash; `ARGV`: field, value, expected generation (`""`: none), TTL in ms,
/// most versions kept. Returns 1 when written, 0 when the generation changed.
///
/// The oldest versions are found by the `written_at_ms` of their values (bytes 3–10 of the
/// encoding, little-endian; read with `string.byte`, so no Lua library is needed).
const PUT_SCRIPT: &str = r"
local g = redis.call('HGET', KEYS[1], '~gen')
if (g or '') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local limit = tonumber(ARGV[5])
local n = redis.call('HLEN', KEYS[1])
if g then n = n - 1 end
if n > limit then
  local all = redis.call('HGETALL', KEYS[1])
  local olds = {}
  for i = 1, #all, 2 do
    local f, v = all[i], all[i + 1]
    if f ~= '~gen' and f ~= ARGV[1] then
      local t = 0
      if #v >= 10 then
        for j = 10, 3, -1 do t = t * 256 + string.byte(v, j) end
      end
      olds[#olds + 1] = {f, t}
    end
  end
  table.sort(olds, function(a, b) return a[2] < b[2] end)
  for i = 1, n - limit do redis.call('HDEL', KEYS[1], olds[i][1]) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// `KEYS[1]` user hash; `ARGV`: new generation, tombstone TTL in ms.
const INVALIDATE_SCRIPT: &str = r"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '~gen', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// Settings of a [`RedisUserStateCache`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisUserStateCacheOptions {
    /// Key prefix (`[A-Za-z0-9_.-]{1,64}`); the online store's, so one installation shares
    /// one namespace.
    pub prefix: String,
    /// TTL, tombstone TTL, versions per user.
    pub cache: CacheOptions,
}

impl Default for RedisUserStateCacheOptions {
    fn default() -> Self {
        Self::with_prefix(crate::features::online::DEFAULT_PREFIX)
    }
}

impl RedisUserStateCacheOptions {
    /// The defaults with another prefix.
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            cache: CacheOptions::default(),
        }
    }
}

/// The production user-state cache.
#[derive(Clone)]
pub struct RedisUserStateCache {
    conn: ConnectionManager,
    options: RedisUserStateCacheOptions,
}

impl std::fmt::Debug for RedisUserStateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisUserStateCache")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl RedisUserStateCache {
    /// A cache over an open connection (for example from [`crate::stores::redis`]).
    pub fn new(
        conn: ConnectionManager,
        options: RedisUserStateCacheOptions,
    ) -> Result<Self, UserStateError> {
        validate_prefix(&options.prefix)?;
        options.cache.validate()?;
        Ok(Self { conn, options })
    }

    /// A cache whose connection is made on first use, so that a process starts (and computes
    /// states directly) while Redis is down. Connection attempts time out after 500 ms and are
    /// retried twice per reconnection; commands time out after 5 s (the callers' timeouts
    /// are much shorter).
    pub fn connect_lazy(
        url: &str,
        options: RedisUserStateCacheOptions,
    ) -> Result<Self, UserStateError> {
        let err = |source| UserStateError::Command {
            op: "connect",
            source,
        };
        let conn = crate::stores::redis_lazy(url).map_err(err)?;
        tracing::debug!(url = %redact_url(url), prefix = %options.prefix, "redis user-state cache");
        Self::new(conn, options)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.options.prefix
    }

    /// The settings.
    pub fn options(&self) -> &RedisUserStateCacheOptions {
        &self.options
    }
}

#[async_trait]
impl UserStateCache for RedisUserStateCache {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, key: &StateKey<'_>) -> Result<Lookup, UserStateError> {
        validate_key(key)?;
        let redis_key = codec::user_key(&self.options.prefix, key.user_id);
        let field = codec::field(key);
        let mut conn = self.conn.clone();
        let (value, generation): (Option<Vec<u8>>, Option<String>) = redis::cmd("HMGET")
            .arg(&redis_key)
            .arg(&field)
            .arg(GENERATION_FIELD)
            .query_async(&mut conn)
            .await
            .map_err(|e| UserStateError::redis("get", e))?;
        let generation = match generation {
            None => Generation(None),
            Some(g) => Generation(Some(g.parse().map_err(|_| UserStateError::Corrupt {
                key: format!("{redis_key} {GENERATION_FIELD}"),
                reason: format!("generation {g:?} is not a number"),
            })?)),
        };
        let mut lookup = Lookup {
            state: None,
            generation,
            corrupt: None,
        };
        if let Some(bytes) = value {
            match codec::decode(&bytes, || format!("{redis_key} {field}")) {
                Ok(s)
                    if s.written_at_ms
                        .saturating_add(duration_ms(self.options.cache.ttl))
                        > now_ms() =>
                {
                    lookup.state = Some(s);
                }
                Ok(_) => {}
                Err(e) => lookup.corrupt = Some(e),
            }
        }
        Ok(lookup)
    }

    async fn put(
        &self,
        key: &StateKey<'_>,
        generation: Generation,
        state: &CachedState,
    ) -> Result<bool, UserStateError> {
        validate_key(key)?;
        if state.factors.len() > usize::from(u16::MAX) {
            return Err(UserStateError::InvalidArgument(format!(
                "{} factors; the encoding holds at most 65535",
                state.factors.len()
            )));
        }
        let expected = generation.0.map(|g| g.to_string()).unwrap_or_default();
        let mut conn = self.conn.clone();
        let written: i64 = redis::cmd("EVAL")
            .arg(PUT_SCRIPT)
            .arg(1)
            .arg(codec::user_key(&self.options.prefix, key.user_id))
            .arg(codec::field(key))
            .arg(codec::encode(state))
            .arg(expected)
            .arg(duration_ms(self.options.cache.ttl))
            .arg(self.options.cache.max_versions)
            .query_async(&mut conn)
            .await
            .map_err(|e| UserStateError::redis("put", e))?;
        Ok(written == 1)
    }

    async fn invalidate_user(&self, user_id: &str) -> Result<(), UserStateError> {
        validate_user_id(user_id)?;
        let generation = rand::random::<u64>();
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("EVAL")
            .arg(INVALIDATE_SCRIPT)
            .arg(1)
            .arg(codec::user_key(&self.options.prefix, user_id))
            .arg(generation.to_string())
            .arg(duration_ms(self.options.cache.tombstone_ttl))
            .query_async(&mut conn)
            .await
            .map_err(|e| UserStateError::redis("invalidate", e))?;
        Ok(())
    }
}
