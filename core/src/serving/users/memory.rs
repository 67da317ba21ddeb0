//! The in-process user-state cache of local mode: a bounded concurrent map (`quick_cache`, the
//! crate the online store's near cache uses) of user → entry, with the same semantics as
//! Redis: one entry per user holding one state per model version, a generation changed by
//! invalidation, the TTL by write time and a key expiry refreshed on write.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use quick_cache::sync::{Cache, EntryAction, EntryResult};

use super::codec::{self, validate_key};
use super::{
    CacheOptions, CachedState, Generation, Lookup, StateKey, UserStateCache, UserStateError,
    duration_ms, now_ms, validate_user_id,
};

/// Default number of users kept.
pub const DEFAULT_MAX_USERS: usize = 100_000;

#[derive(Clone, Debug)]
struct UserEntry {
    generation: Option<u64>,
    /// The whole entry (the Redis key) is gone at this time.
    expire_at_ms: i64,
    /// `{model}:{version}` → state. Arcs, so that a lookup clones pointers, not seen lists.
    fields: Vec<(Arc<str>, Arc<CachedState>)>,
}

/// The user-state cache of local mode (no server): at most `max_users` users, the least
/// recently useful evicted first.
pub struct InProcessUserStateCache {
    options: CacheOptions,
    users: Cache<String, UserEntry>,
    generations: AtomicU64,
}

impl std::fmt::Debug for InProcessUserStateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessUserStateCache")
            .field("options", &self.options)
            .field("users", &self.users.len())
            .finish()
    }
}

impl InProcessUserStateCache {
    /// An empty cache of at most `max_users` users ([`DEFAULT_MAX_USERS`] is a fair default).
    pub fn new(options: CacheOptions, max_users: usize) -> Result<Self, UserStateError> {
        options.validate()?;
        if max_users == 0 {
            return Err(UserStateError::InvalidArgument(
                "the in-process user-state cache needs room for at least one user".into(),
            ));
        }
        Ok(Self {
            options,
            users: Cache::new(max_users),
            // Random start: generations of two caches never line up by accident.
            generations: AtomicU64::new(rand::random::<u32>().into()),
        })
    }

    /// Users with an entry (tombstones and expired entries not yet evicted included).
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no user has an entry.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[async_trait]
impl UserStateCache for InProcessUserStateCache {
    fn backend(&self) -> &'static str {
        "in_process"
    }

    async fn get(&self, key: &StateKey<'_>) -> Result<Lookup, UserStateError> {
        validate_key(key)?;
        let now = now_ms();
        let Some(entry) = self.users.get(key.user_id).filter(|e| e.expire_at_ms > now) else {
            return Ok(Lookup {
                state: None,
                generation: Generation(None),
                corrupt: None,
            });
        };
        let field = codec::field(key);
        let ttl = duration_ms(self.options.ttl);
        let state = entry
            .fields
            .iter()
            .find(|(f, _)| **f == *field)
            .filter(|(_, s)| s.written_at_ms.saturating_add(ttl) > now)
            .map(|(_, s)| CachedState::clone(s));
        Ok(Lookup {
            state,
            generation: Generation(entry.generation),
            corrupt: None,
        })
    }

    async fn put(
        &self,
        key: &StateKey<'_>,
        generation: Generation,
        state: &CachedState,
    ) -> Result<bool, UserStateError> {
        validate_key(key)?;
        let now = now_ms();
        let expire_at_ms = now.saturating_add(duration_ms(self.options.ttl));
        let field: Arc<str> = codec::field(key).into();
        let value = Arc::new(state.clone());
        let max_versions = self.options.max_versions;
        let result = self.users.entry(key.user_id, None, |_, e| {
            if e.expire_at_ms <= now {
                // Expired: as if absent.
                e.generation = None;
                e.fields.clear();
            }
            if e.generation != generation.0 {
                return EntryAction::Retain(false);
            }
            match e.fields.iter_mut().find(|(f, _)| *f == field) {
                Some((_, s)) => *s = value.clone(),
                None => e.fields.push((field.clone(), value.clone())),
            }
            while e.fields.len() > max_versions {
                let oldest = e
                    .fields
                    .iter()
                    .enumerate()
                    .filter(|(_, (f, _))| *f != field)
                    .min_by_key(|(_, (_, s))| s.written_at_ms)
                    .map(|(i, _)| i);
                match oldest {
                    Some(i) => {
                        e.fields.swap_remove(i);
                    }
                    None => break,
                }
            }
            e.expire_at_ms = expire_at_ms;
            EntryAction::Retain(true)
        });
        Ok(match result {
            EntryResult::Retained(stored) => stored,
            EntryResult::Vacant(guard) if generation.0.is_none() => guard
                .insert(UserEntry {
                    generation: None,
                    expire_at_ms,
                    fields: vec![(field, value)],
                })
                .is_ok(),
            // Vacant with a generation: the user's tombstone was evicted or expired in
            // between, so an invalidation may have happened; do not write.
            _ => false,
        })
    }

    async fn invalidate_user(&self, user_id: &str) -> Result<(), UserStateError> {
        validate_user_id(user_id)?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        self.users.insert(
            user_id.to_owned(),
            UserEntry {
                generation: Some(generation),
                expire_at_ms: now_ms().saturating_add(duration_ms(self.options.tombstone_ttl)),
                fields: vec![],
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::users::FactorSource;

    fn state(written_at_ms: i64) -> CachedState {
        CachedState {
            source: FactorSource::Trained,
            factors: vec![],
            interactions: 1,
            known: 1,
            seen: vec![1],
            written_at_ms,
        }
    }

    #[tokio::test]
    async fn users_are_bounded() -> Result<(), UserStateError> {
        let cache = InProcessUserStateCache::new(CacheOptions::default(), 10)?;
        for i in 0..100 {
            let user = format!("u{i}");
            let key = StateKey {
                model: "als",
                version: "v1",
                user_id: &user,
            };
            assert!(cache.put(&key, Generation(None), &state(now_ms())).await?);
        }
        assert!(cache.len() <= 10, "{}", cache.len());
        assert!(InProcessUserStateCache::new(CacheOptions::default(), 0).is_err());
        Ok(())
    }
}
