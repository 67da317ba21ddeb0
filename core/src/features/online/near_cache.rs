//! The near cache of [`super::RedisOnlineStore`]: entity hashes read from Redis, kept in the
//! process and invalidated by Redis itself (server-assisted client-side caching: RESP3
//! `CLIENT TRACKING`). The protocol and its guarantees are in the parent module's "Near
//! cache" section; this file holds the cache, the bookkeeping of reads in flight that makes
//! an invalidation win over a concurrent read, and the handling of push messages.
//!
//! Lock order, to stay free of deadlocks: `flush_lock` → a `pending` shard → the cache's own
//! shard locks; `layouts` is taken last and alone. Invalidations take a `pending` shard only;
//! flushes take `flush_lock` only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};
use redis::{PushInfo, PushKind, Value};

use crate::features::StoredValue;

use super::OnlineError;
use super::metrics::NearCacheMetrics;

/// Settings of the near cache of a [`super::RedisOnlineStore`] (see "Near cache" in the
/// module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NearCacheOptions {
    /// Most entities held. An entity whose estimated size is above the average allowed
    /// (`max_bytes / max_entries`) counts as several, so that both bounds hold.
    pub max_entries: u64,
    /// Most bytes held (estimated: keys, field names, values and bookkeeping).
    pub max_bytes: u64,
    /// Longest an entity is served from the cache before it is read from Redis again. A
    /// backstop only: an entity written by anyone is invalidated by Redis within a few
    /// milliseconds, long before this.
    pub max_age: Duration,
}

impl Default for NearCacheOptions {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_bytes: 256 << 20,
            max_age: Duration::from_secs(60),
        }
    }
}

impl NearCacheOptions {
    /// The defaults with room for `max_entries` entities.
    pub fn with_entries(max_entries: u64) -> Self {
        Self {
            max_entries,
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<(), OnlineError> {
        if self.max_entries == 0 || self.max_bytes == 0 || self.max_age.is_zero() {
            return Err(OnlineError::InvalidArgument(format!(
                "near cache: max_entries ({}), max_bytes ({}) and max_age ({:?}) must be positive \
                 (to run without a near cache, leave RedisOnlineStoreOptions::near_cache unset)",
                self.max_entries, self.max_bytes, self.max_age
            )));
        }
        Ok(())
    }
}

/// What a near cache did since it was made (for tests, benchmarks and logs; the same figures
/// are exported as metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NearCacheStats {
    /// Entities held now.
    pub entries: u64,
    /// Their estimated bytes.
    pub bytes: u64,
    /// Entity lookups answered from the cache.
    pub hits: u64,
    /// Entity lookups sent to Redis.
    pub misses: u64,
    /// Entities dropped for room or age.
    pub evictions: u64,
    /// Entities invalidated by a Redis push.
    pub push_invalidations: u64,
    /// Entities invalidated by this process's own writes.
    pub local_invalidations: u64,
    /// Whole-cache flushes (reconnection, `FLUSHDB`, feature retirement, ...).
    pub flushes: u64,
    /// False once Redis refused `CLIENT TRACKING`: every read then goes to Redis.
    pub enabled: bool,
}

impl NearCacheStats {
    /// Hits over lookups (0 before any lookup).
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

/// Field names (`{feature}:v{major}`) in the order a read asked for them, with an index by
/// name. Interned per cache: the entities read with one feature list share its layout, so a
/// later read with the same list copies their values by position, without looking names up.
#[derive(Debug)]
pub(crate) struct Layout {
    names: Box<[Box<str>]>,
    index: HashMap<Box<str>, usize, DefaultHashBuilder>,
}

impl Layout {
    fn new(names: Box<[Box<str>]>) -> Self {
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Self { names, index }
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    fn is<S: AsRef<str>>(&self, names: &[S]) -> bool {
        self.names.len() == names.len()
            && self
                .names
                .iter()
                .zip(names)
                .all(|(a, b)| **a == *b.as_ref())
    }
}

/// Layouts kept for interning; beyond this many the table starts afresh (entries keep theirs).
const MAX_LAYOUTS: usize = 1024;

/// What Redis returned for some fields of one entity hash (`None`: the field is absent), kept
/// as read: retention is applied when values are served.
#[derive(Debug)]
struct Entry {
    layout: Arc<Layout>,
    values: Box<[Option<StoredValue>]>,
    bytes: u64,
    weight: u64,
    /// When the oldest of its fields was read (the start of that read).
    fetched_at: Instant,
}

impl Entry {
    fn get(&self, name: &str) -> Option<&Option<StoredValue>> {
        self.layout.position(name).map(|i| &self.values[i])
    }
}

type Key = Box<[u8]>;

/// Bookkeeping per entry (not counting the key): the `Arc`, the map's slots.
const ENTRY_OVERHEAD: u64 = 96;
/// Per field: the map slot, the `Box<str>`, the `Option<StoredValue>`.
const FIELD_OVERHEAD: u64 = 80;

fn estimate_bytes(key: &[u8], layout: &Layout, values: &[Option<StoredValue>]) -> u64 {
    let mut bytes = ENTRY_OVERHEAD + key.len() as u64;
    for (name, value) in layout.names.iter().zip(values) {
        bytes += FIELD_OVERHEAD + name.len() as u64;
        if let Some(v) = value {
            bytes += match &v.value {
                crate::features::FeatureValue::String(s) => s.len() as u64,
                crate::features::FeatureValue::FloatVector(x) => 4 * x.len() as u64,
                _ => 0,
            };
        }
    }
    bytes
}

#[derive(Clone, Debug)]
struct EntryWeighter;

impl Weighter<Key, Arc<Entry>> for EntryWeighter {
    fn weight(&self, _key: &Key, entry: &Arc<Entry>) -> u64 {
        entry.weight
    }
}

/// Counters shared with the eviction hook.
#[derive(Debug)]
struct Shared {
    metrics: ArcSwap<NearCacheMetrics>,
    bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    push_invalidations: AtomicU64,
    local_invalidations: AtomicU64,
    flushes: AtomicU64,
}

impl Shared {
    fn freed(&self, bytes: u64) {
        // Saturating: the estimate must never wrap below zero.
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(bytes))
            });
    }

    fn evicted(&self, entry: &Entry, reason: &'static str) {
        self.freed(entry.bytes);
        self.evictions.fetch_add(1, Ordering::Relaxed);
        self.metrics.load().eviction(reason);
    }
}

/// Counts capacity evictions (explicit removals are counted where they happen).
#[derive(Clone, Debug)]
struct Hooks(Arc<Shared>);

impl Lifecycle<Key, Arc<Entry>> for Hooks {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), _key: Key, entry: Arc<Entry>) {
        self.0.evicted(&entry, "capacity");
    }
}

type EntryCache =
    quick_cache::sync::Cache<Key, Arc<Entry>, EntryWeighter, DefaultHashBuilder, Hooks>;

/// A key being read from Redis by one or more reads.
#[derive(Debug, Default)]
struct Pending {
    readers: u32,
    /// Invalidations of the key seen while it was being read.
    invalidations: u32,
    /// What the last read of the key that completed stored.
    last: Option<Arc<Entry>>,
    /// Two reads of the key disagreed: none of the reads in flight stores anything.
    conflict: bool,
}

type PendingShard = HashMap<Key, Pending, DefaultHashBuilder>;

const PENDING_SHARDS: usize = 16;

/// The near cache. Cheap to share (`Arc`); every method takes `&self`.
pub(crate) struct NearCache {
    /// `{prefix}:e:`: pushes for other keys are ignored.
    key_prefix: Box<[u8]>,
    entries: EntryCache,
    pending: Box<[Mutex<PendingShard>]>,
    layouts: Mutex<HashMap<u64, Vec<Arc<Layout>>, DefaultHashBuilder>>,
    hasher: DefaultHashBuilder,
    /// The flush generation: a read that began in an older generation stores nothing.
    flush_lock: RwLock<u64>,
    enabled: AtomicBool,
    slot_bytes: u64,
    max_age: Duration,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NearCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCache")
            .field("stats", &self.stats())
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl NearCache {
    /// A cache for the entity hashes under `prefix`.
    pub(crate) fn new(options: &NearCacheOptions, prefix: &str) -> Result<Self, OnlineError> {
        options.validate()?;
        let shared = Arc::new(Shared {
            metrics: ArcSwap::from_pointee(NearCacheMetrics::default()),
            bytes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            push_invalidations: AtomicU64::new(0),
            local_invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        });
        let entries = EntryCache::with(
            usize::try_from(options.max_entries).unwrap_or(usize::MAX),
            options.max_entries,
            EntryWeighter,
            DefaultHashBuilder::default(),
            Hooks(shared.clone()),
        );
        Ok(Self {
            key_prefix: format!("{prefix}:e:").into_bytes().into_boxed_slice(),
            entries,
            pending: (0..PENDING_SHARDS)
                .map(|_| Mutex::new(PendingShard::default()))
                .collect(),
            layouts: Mutex::default(),
            hasher: DefaultHashBuilder::default(),
            flush_lock: RwLock::new(0),
            enabled: AtomicBool::new(true),
            slot_bytes: (options.max_bytes / options.max_entries).max(1),
            max_age: options.max_age,
            shared,
        })
    }

    /// Publishes to `metrics` from now on.
    pub(crate) fn attach(&self, metrics: NearCacheMetrics) {
        self.shared.metrics.store(Arc::new(metrics));
        self.publish_size();
    }

    /// Whether reads may use the cache (false once Redis refused tracking).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Turns the cache off for good (Redis refused `CLIENT TRACKING`) and empties it.
    pub(crate) fn disable(&self) {
        self.enabled.store(false, Ordering::Release);
        self.flush("tracking_refused");
    }

    pub(crate) fn stats(&self) -> NearCacheStats {
        let s = &self.shared;
        NearCacheStats {
            entries: self.entries.len() as u64,
            bytes: s.bytes.load(Ordering::Acquire),
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            push_invalidations: s.push_invalidations.load(Ordering::Relaxed),
            local_invalidations: s.local_invalidations.load(Ordering::Relaxed),
            flushes: s.flushes.load(Ordering::Relaxed),
            enabled: self.enabled(),
        }
    }

    /// Counts the lookups of one read and publishes the size.
    pub(crate) fn record_lookups(&self, hits: u64, misses: u64) {
        self.shared.hits.fetch_add(hits, Ordering::Relaxed);
        self.shared.misses.fetch_add(misses, Ordering::Relaxed);
        self.shared.metrics.load().lookups(hits, misses);
    }

    /// Publishes the number of entries and bytes.
    pub(crate) fn publish_size(&self) {
        self.shared.metrics.load().size(
            self.entries.len() as u64,
            self.shared.bytes.load(Ordering::Acquire),
        );
    }

    fn pending_shard(&self, key: &[u8]) -> &Mutex<PendingShard> {
        use std::hash::BuildHasher as _;
        let h = self.hasher.hash_one(key);
        &self.pending[(h as usize) % PENDING_SHARDS]
    }

    /// The shared layout of the field list `names` (one per read).
    pub(crate) fn layout<S: AsRef<str>>(&self, names: &[S]) -> Arc<Layout> {
        use std::hash::{BuildHasher as _, Hasher as _};
        let mut h = self.hasher.build_hasher();
        for n in names {
            h.write(n.as_ref().as_bytes());
            h.write_u8(0xff);
        }
        let hash = h.finish();
        let mut layouts = lock(&self.layouts);
        if let Some(found) = layouts
            .get(&hash)
            .and_then(|same_hash| same_hash.iter().find(|l| l.is(names)))
        {
            return found.clone();
        }
        if layouts.len() >= MAX_LAYOUTS {
            layouts.clear();
        }
        let layout = Arc::new(Layout::new(
            names.iter().map(|n| n.as_ref().into()).collect(),
        ));
        layouts.entry(hash).or_default().push(layout.clone());
        layout
    }

    /// Appends the cached values of the fields of `layout` for the entity hash `key` to
    /// `out`, each kept only when its event time is at least `oldest[f]` (retention, as a
    /// Redis read applies it). Returns false, leaving `out` as it was, when the entity is not
    /// cached with every field (or the cache is off).
    pub(crate) fn serve(
        &self,
        key: &[u8],
        layout: &Arc<Layout>,
        oldest: &[i64],
        out: &mut Vec<Option<StoredValue>>,
    ) -> bool {
        if !self.enabled() {
            return false;
        }
        let Some(entry) = self.entries.get(key) else {
            return false;
        };
        if entry.fetched_at.elapsed() > self.max_age {
            if let Some((_, gone)) = self.entries.remove_if(key, |e| Arc::ptr_eq(e, &entry)) {
                self.shared.evicted(&gone, "expired");
            }
            return false;
        }
        let keep = |v: &Option<StoredValue>, oldest: i64| {
            v.as_ref().filter(|v| v.event_time_ms >= oldest).cloned()
        };
        if Arc::ptr_eq(&entry.layout, layout) {
            out.extend(entry.values.iter().zip(oldest).map(|(v, &o)| keep(v, o)));
            return true;
        }
        let start = out.len();
        for (f, name) in layout.names.iter().enumerate() {
            match entry.get(name) {
                Some(v) => out.push(keep(v, oldest[f])),
                None => {
                    out.truncate(start);
                    return false;
                }
            }
        }
        true
    }

    /// Registers reads of `keys` about to be sent to Redis: an invalidation of one of them
    /// (or a flush) from now on keeps its answer out of the cache.
    pub(crate) fn begin(&self, keys: Vec<Key>) -> Fetch<'_> {
        let generation = *self
            .flush_lock
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        let keys = keys
            .into_iter()
            .map(|key| {
                let mut shard = lock(self.pending_shard(&key));
                let p = shard.entry(key.clone()).or_default();
                p.readers += 1;
                let seen = p.invalidations;
                drop(shard);
                InFlight {
                    key,
                    seen,
                    open: true,
                }
            })
            .collect();
        Fetch {
            cache: self,
            generation,
            started,
            keys,
        }
    }

    /// Ends one registration of `key`; returns whether no invalidation came in between.
    fn end(&self, shard: &mut PendingShard, key: &[u8], seen: u32) -> bool {
        let Some(p) = shard.get_mut(key) else {
            return false;
        };
        let clean = p.invalidations == seen && !p.conflict;
        p.readers = p.readers.saturating_sub(1);
        if p.readers == 0 {
            shard.remove(key);
        }
        clean
    }

    /// Drops the cached entity `key` (Redis pushed an invalidation, or this process wrote
    /// it); a read of it in flight will not store its answer. Returns whether it was cached.
    pub(crate) fn invalidate(&self, key: &[u8], source: &'static str) -> bool {
        let mut shard = lock(self.pending_shard(key));
        if let Some(p) = shard.get_mut(key) {
            p.invalidations = p.invalidations.wrapping_add(1);
        }
        let removed = self.entries.remove(key);
        drop(shard);
        let counter = if source == "push" {
            &self.shared.push_invalidations
        } else {
            &self.shared.local_invalidations
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.load().invalidations(source, 1);
        match removed {
            Some((_, entry)) => {
                self.shared.freed(entry.bytes);
                true
            }
            None => false,
        }
    }

    /// Empties the cache; reads in flight store nothing.
    pub(crate) fn flush(&self, reason: &'static str) {
        let mut generation = self
            .flush_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *generation += 1;
        let freed: u64 = self.entries.drain().map(|(_, e)| e.bytes).sum();
        drop(generation);
        self.shared.freed(freed);
        self.shared.flushes.fetch_add(1, Ordering::Relaxed);
        let metrics = self.shared.metrics.load();
        metrics.flush(reason);
        tracing::debug!(reason, "near cache flushed");
        self.publish_size();
    }

    /// Handles a RESP3 push of the store's connection: invalidations drop entities; a
    /// disconnection, a `FLUSHDB`/`FLUSHALL` or an invalidation that cannot be read empties
    /// the whole cache (the invalidations of the lost connection are gone with it).
    pub(crate) fn on_push(&self, push: &PushInfo) {
        match push.kind {
            PushKind::Invalidate => match push.data.first() {
                Some(Value::Array(keys)) => {
                    let mut unreadable = false;
                    for key in keys {
                        match key {
                            Value::BulkString(k) => self.on_invalidated_key(k),
                            Value::SimpleString(k) => self.on_invalidated_key(k.as_bytes()),
                            _ => unreadable = true,
                        }
                    }
                    if unreadable {
                        tracing::warn!(push = ?push.data, "unreadable invalidation; near cache flushed");
                        self.flush("untrusted_push");
                    }
                }
                // Redis sends a null after FLUSHDB / FLUSHALL.
                Some(Value::Nil) | None => self.flush("flushdb"),
                Some(other) => {
                    tracing::warn!(push = ?other, "unreadable invalidation; near cache flushed");
                    self.flush("untrusted_push");
                }
            },
            PushKind::Disconnection => {
                tracing::info!("redis connection lost; near cache flushed");
                self.flush("disconnect");
            }
            _ => {}
        }
    }

    fn on_invalidated_key(&self, key: &[u8]) {
        if key.starts_with(&self.key_prefix) {
            self.invalidate(key, "push");
        }
    }
}

#[derive(Debug)]
struct InFlight {
    key: Key,
    /// The key's invalidation count when the read began.
    seen: u32,
    open: bool,
}

/// Reads of some keys in flight. Dropping it (a failed or abandoned read) ends the
/// registrations still open.
pub(crate) struct Fetch<'a> {
    cache: &'a NearCache,
    generation: u64,
    started: Instant,
    keys: Vec<InFlight>,
}

impl Fetch<'_> {
    /// The keys, in the order given to [`NearCache::begin`].
    pub(crate) fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.keys.iter().map(|k| &k.key[..])
    }

    /// Stores what Redis answered for key `i` (`values` of the fields of `layout`, merged with
    /// those already cached for the entity), unless the key was invalidated or the cache
    /// flushed since the read began. Returns whether it was stored.
    pub(crate) fn complete(
        &mut self,
        i: usize,
        layout: &Arc<Layout>,
        values: Vec<Option<StoredValue>>,
    ) -> bool {
        let cache = self.cache;
        let Some(k) = self.keys.get_mut(i) else {
            return false;
        };
        if !std::mem::replace(&mut k.open, false) {
            return false;
        }
        let generation = cache
            .flush_lock
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut shard = lock(cache.pending_shard(&k.key));
        // Two reads of one key in flight may complete in either order, and the invalidation
        // separating their answers may not be handled yet: when this answer disagrees with
        // the one stored last (or with the cached entry), which is newer cannot be told, so
        // the entity is dropped and the reads in flight store nothing.
        let cached = cache.entries.peek(&k.key[..]);
        let disagrees = |other: &Entry| {
            layout
                .names
                .iter()
                .zip(&values)
                .any(|(name, v)| other.get(name).is_some_and(|o| !same(o, v)))
        };
        let conflict = shard
            .get(&k.key[..])
            .is_some_and(|p| p.last.as_deref().is_some_and(disagrees))
            || cached.as_deref().is_some_and(disagrees);
        if conflict {
            if let Some(p) = shard.get_mut(&k.key[..]) {
                p.conflict = true;
            }
            if let Some((_, old)) = cache.entries.remove(&k.key[..]) {
                cache.shared.freed(old.bytes);
            }
        }
        let clean = cache.end(&mut shard, &k.key, k.seen);
        if !clean || *generation != self.generation || !cache.enabled() {
            return false;
        }
        let mut layout = layout.clone();
        let mut values = values;
        let mut fetched_at = self.started;
        // Merge with what is cached (valid: it would have been removed by an invalidation,
        // and this shard's lock keeps invalidations of the key out until the insert).
        if let Some((_, old)) = cache.entries.remove(&k.key[..]) {
            cache.shared.freed(old.bytes);
            let extra: Vec<usize> = (0..old.values.len())
                .filter(|&j| layout.position(&old.layout.names[j]).is_none())
                .collect();
            if old.fetched_at.elapsed() <= cache.max_age && !extra.is_empty() {
                fetched_at = fetched_at.min(old.fetched_at);
                let names: Vec<&str> = layout
                    .names
                    .iter()
                    .map(|n| &**n)
                    .chain(extra.iter().map(|&j| &*old.layout.names[j]))
                    .collect();
                values.extend(extra.iter().map(|&j| old.values[j].clone()));
                layout = cache.layout(&names);
            }
        }
        let bytes = estimate_bytes(&k.key, &layout, &values);
        let weight = bytes.div_ceil(cache.slot_bytes).max(1);
        let entry = Arc::new(Entry {
            layout,
            values: values.into_boxed_slice(),
            bytes,
            weight,
            fetched_at,
        });
        if let Some(p) = shard.get_mut(&k.key[..]) {
            p.last = Some(entry.clone());
        }
        cache.shared.bytes.fetch_add(bytes, Ordering::AcqRel);
        // Too heavy for the cache: quick_cache rejects it through the eviction hook.
        cache.entries.insert(k.key.clone(), entry);
        true
    }
}

/// Whether two reads of a field returned the same thing (a float NaN equals itself here).
fn same(a: &Option<StoredValue>, b: &Option<StoredValue>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.event_time_ms == b.event_time_ms
                && a.written_at_ms == b.written_at_ms
                && (a.value == b.value
                    || matches!(
                        (&a.value, &b.value),
                        (crate::features::FeatureValue::Float(x), crate::features::FeatureValue::Float(y))
                            if x.to_bits() == y.to_bits()
                    ))
        }
        _ => false,
    }
}

impl Drop for Fetch<'_> {
    fn drop(&mut self) {
        for k in self.keys.iter_mut().filter(|k| k.open) {
            k.open = false;
            let mut shard = lock(self.cache.pending_shard(&k.key));
            self.cache.end(&mut shard, &k.key, k.seen);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::FeatureValue;

    fn v(x: f64, event_time_ms: i64) -> Option<StoredValue> {
        Some(StoredValue {
            value: FeatureValue::Float(x),
            event_time_ms,
            written_at_ms: event_time_ms,
        })
    }

    /// Fields as a read returns them, in order.
    type Fields = Vec<(String, Option<StoredValue>)>;

    fn fields(pairs: &[(&str, Option<StoredValue>)]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// Completes read `i` of `fetch` with `f`, as the store does.
    fn complete(c: &NearCache, fetch: &mut Fetch<'_>, i: usize, f: Fields) -> bool {
        let names: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
        let layout = c.layout(&names);
        fetch.complete(i, &layout, f.into_iter().map(|(_, v)| v).collect())
    }

    /// Serves `names` of entity `id`'s key from `c`.
    fn serve(
        c: &NearCache,
        key: &[u8],
        names: &[String],
        oldest: &[i64],
        out: &mut Vec<Option<StoredValue>>,
    ) -> bool {
        c.serve(key, &c.layout(names), oldest, out)
    }

    fn key(id: &str) -> Key {
        format!("rs:e:user:{id}").into_bytes().into_boxed_slice()
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn cache(options: NearCacheOptions) -> NearCache {
        NearCache::new(&options, "rs").expect("cache")
    }

    fn fill(c: &NearCache, id: &str, f: Fields) -> bool {
        let mut fetch = c.begin(vec![key(id)]);
        complete(c, &mut fetch, 0, f)
    }

    #[test]
    fn serves_what_was_stored_with_retention_applied_at_read_time() {
        let c = cache(NearCacheOptions::default());
        assert!(fill(
            &c,
            "1",
            fields(&[("a:v1", v(1.0, 100)), ("b:v1", None), ("c:v1", v(3.0, 50))])
        ));
        let mut out = Vec::new();
        assert!(serve(
            &c,
            &key("1"),
            &names(&["c:v1", "a:v1", "b:v1"]),
            &[0, 0, 0],
            &mut out
        ));
        assert_eq!(out, vec![v(3.0, 50), v(1.0, 100), None]);
        // Past retention at read time: dropped, as a Redis read would.
        out.clear();
        assert!(serve(
            &c,
            &key("1"),
            &names(&["c:v1", "a:v1"]),
            &[60, 60],
            &mut out
        ));
        assert_eq!(out, vec![None, v(1.0, 100)]);
        // A field never read is a miss for the whole entity; `out` is left alone.
        out = vec![None];
        assert!(!serve(
            &c,
            &key("1"),
            &names(&["a:v1", "zzz:v1"]),
            &[0, 0],
            &mut out
        ));
        assert_eq!(out, vec![None]);
        assert!(!serve(&c, &key("2"), &names(&["a:v1"]), &[0], &mut out));
    }

    #[test]
    fn layouts_are_shared_per_field_list_and_bounded() {
        let c = cache(NearCacheOptions::default());
        let ab = c.layout(&["a:v1", "b:v1"]);
        assert!(Arc::ptr_eq(&ab, &c.layout(&names(&["a:v1", "b:v1"]))));
        assert!(!Arc::ptr_eq(&ab, &c.layout(&["b:v1", "a:v1"])));
        assert!(!Arc::ptr_eq(&ab, &c.layout(&["a:v1b:v1"])));
        // Same list: copied by position; another order: looked up by name; same values.
        fill(&c, "1", fields(&[("a:v1", v(1.0, 1)), ("b:v1", None)]));
        let (mut fast, mut slow) = (Vec::new(), Vec::new());
        assert!(c.serve(&key("1"), &ab, &[0, 0], &mut fast));
        assert!(c.serve(&key("1"), &c.layout(&["b:v1", "a:v1"]), &[0, 0], &mut slow));
        assert_eq!(fast, vec![v(1.0, 1), None]);
        assert_eq!(slow, vec![None, v(1.0, 1)]);
        for i in 0..(MAX_LAYOUTS + 10) {
            c.layout(&[format!("f{i}:v1")]);
        }
        let kept: usize = lock(&c.layouts).values().map(Vec::len).sum();
        assert!(kept <= MAX_LAYOUTS, "{kept}");
        // Entities keep their layout when the table starts afresh.
        assert!(c.serve(&key("1"), &c.layout(&["a:v1", "b:v1"]), &[0, 0], &mut fast));
    }

    #[test]
    fn an_invalidation_during_a_read_keeps_its_answer_out() {
        let c = cache(NearCacheOptions::default());
        let mut fetch = c.begin(vec![key("1"), key("2")]);
        // Redis pushes an invalidation of key 1 while the read is in flight.
        assert!(!c.invalidate(&key("1"), "push"));
        assert!(!complete(&c, &mut fetch, 0, fields(&[("a:v1", v(1.0, 1))])));
        assert!(complete(&c, &mut fetch, 1, fields(&[("a:v1", v(2.0, 1))])));
        drop(fetch);
        let mut out = Vec::new();
        assert!(!serve(&c, &key("1"), &names(&["a:v1"]), &[0], &mut out));
        assert!(serve(&c, &key("2"), &names(&["a:v1"]), &[0], &mut out));
        // The bookkeeping of reads in flight is gone once they end.
        assert!(c.pending.iter().all(|s| lock(s).is_empty()));
        // After the read, an invalidation removes the entry.
        assert!(c.invalidate(&key("2"), "local"));
        assert!(!serve(&c, &key("2"), &names(&["a:v1"]), &[0], &mut out));
        let s = c.stats();
        assert_eq!((s.push_invalidations, s.local_invalidations), (1, 1));
        assert_eq!((s.entries, s.bytes), (0, 0));
    }

    #[test]
    fn concurrent_reads_of_one_key_and_a_flush() {
        let c = cache(NearCacheOptions::default());
        let mut a = c.begin(vec![key("1")]);
        let mut b = c.begin(vec![key("1")]);
        assert!(complete(&c, &mut a, 0, fields(&[("a:v1", v(1.0, 1))])));
        assert!(complete(&c, &mut b, 0, fields(&[("b:v1", v(2.0, 1))])));
        // Both answers are merged into one entity.
        let mut out = Vec::new();
        assert!(serve(
            &c,
            &key("1"),
            &names(&["a:v1", "b:v1"]),
            &[0, 0],
            &mut out
        ));
        assert_eq!(out, vec![v(1.0, 1), v(2.0, 1)]);
        // A read that began before a flush stores nothing.
        let mut late = c.begin(vec![key("2")]);
        c.flush("disconnect");
        assert!(!complete(&c, &mut late, 0, fields(&[("a:v1", v(1.0, 1))])));
        assert!(!serve(&c, &key("1"), &names(&["a:v1"]), &[0], &mut out));
        assert_eq!(c.stats().entries, 0);
        assert_eq!(c.stats().bytes, 0);
        // A dropped read (timeout, error) leaves nothing behind.
        let abandoned = c.begin(vec![key("3"), key("3")]);
        drop(abandoned);
        assert!(c.pending.iter().all(|s| lock(s).is_empty()));
    }

    #[test]
    fn reads_in_flight_that_disagree_store_nothing() {
        // Two reads of one key in flight; a write separated their answers on the server, and
        // its invalidation has not been handled yet. The later answer completes first.
        let c = cache(NearCacheOptions::default());
        let mut older = c.begin(vec![key("1")]);
        let mut newer = c.begin(vec![key("1")]);
        let mut third = c.begin(vec![key("1")]);
        assert!(complete(
            &c,
            &mut newer,
            0,
            fields(&[("a:v1", v(145.0, 145))])
        ));
        // The older answer must not replace the newer one (a reader would go back in time):
        // the entity is dropped instead.
        assert!(!complete(
            &c,
            &mut older,
            0,
            fields(&[("a:v1", v(144.0, 144))])
        ));
        let mut out = Vec::new();
        assert!(!serve(&c, &key("1"), &names(&["a:v1"]), &[0], &mut out));
        // A third read in flight meanwhile stores nothing either; after it, caching resumes.
        assert!(!complete(
            &c,
            &mut third,
            0,
            fields(&[("a:v1", v(145.0, 145))])
        ));
        drop((older, newer, third));
        assert!(fill(&c, "1", fields(&[("a:v1", v(145.0, 145))])));
        // Answers that agree merge, NaN included.
        let mut a = c.begin(vec![key("2")]);
        let mut b = c.begin(vec![key("2")]);
        assert!(complete(
            &c,
            &mut a,
            0,
            fields(&[("x:v1", v(f64::NAN, 1)), ("y:v1", None)])
        ));
        assert!(complete(
            &c,
            &mut b,
            0,
            fields(&[("x:v1", v(f64::NAN, 1)), ("z:v1", v(2.0, 2))])
        ));
        assert!(serve(
            &c,
            &key("2"),
            &names(&["x:v1", "y:v1", "z:v1"]),
            &[0, 0, 0],
            &mut out
        ));
        // An answer that disagrees with the cached entity drops it.
        let mut late = c.begin(vec![key("2")]);
        assert!(!complete(&c, &mut late, 0, fields(&[("z:v1", v(1.0, 1))])));
        assert!(!serve(&c, &key("2"), &names(&["x:v1"]), &[0], &mut out));
    }

    #[test]
    fn pushes_invalidate_keys_under_the_prefix_and_flush_on_disconnect() {
        let c = cache(NearCacheOptions::default());
        for id in ["1", "2", "3"] {
            fill(&c, id, fields(&[("a:v1", v(1.0, 1))]));
        }
        c.on_push(&PushInfo {
            kind: PushKind::Invalidate,
            data: vec![Value::Array(vec![
                Value::BulkString(key("1").into_vec()),
                Value::BulkString(b"other:e:user:2".to_vec()),
            ])],
        });
        let mut out = Vec::new();
        let has = |id: &str, out: &mut Vec<_>| serve(&c, &key(id), &names(&["a:v1"]), &[0], out);
        assert!(!has("1", &mut out) && has("2", &mut out) && has("3", &mut out));
        assert_eq!(c.stats().push_invalidations, 1);
        c.on_push(&PushInfo {
            kind: PushKind::Disconnection,
            data: vec![],
        });
        assert!(!has("2", &mut out) && !has("3", &mut out));
        fill(&c, "4", fields(&[("a:v1", v(1.0, 1))]));
        // FLUSHDB: a null instead of keys.
        c.on_push(&PushInfo {
            kind: PushKind::Invalidate,
            data: vec![Value::Nil],
        });
        assert!(!has("4", &mut out));
        assert_eq!(c.stats().flushes, 2);
    }

    #[test]
    fn bounded_by_entries_and_by_bytes() {
        let c = cache(NearCacheOptions {
            max_entries: 10,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        });
        for i in 0..50 {
            fill(&c, &i.to_string(), fields(&[("a:v1", v(1.0, 1))]));
        }
        let s = c.stats();
        assert!(s.entries <= 10, "{s:?}");
        assert!(s.evictions >= 40, "{s:?}");
        // 10 entries, 2,000 bytes: an entity of ~1 KB weighs two slots of 200 bytes... five.
        let c = cache(NearCacheOptions {
            max_entries: 10,
            max_bytes: 2_000,
            max_age: Duration::from_secs(60),
        });
        let big: Fields = (0..8).map(|j| (format!("f{j}:v1"), v(1.0, 1))).collect();
        for i in 0..20 {
            fill(&c, &i.to_string(), big.clone());
        }
        let s = c.stats();
        assert!(s.bytes <= 2_000, "{s:?}");
        assert!(s.entries >= 1 && s.entries < 10, "{s:?}");
        // An entity larger than the whole cache is not kept.
        let huge: Fields = (0..100).map(|j| (format!("f{j}:v1"), v(1.0, 1))).collect();
        fill(&c, "huge", huge);
        let mut out = Vec::new();
        assert!(!serve(&c, &key("huge"), &names(&["f0:v1"]), &[0], &mut out));
        assert!(c.stats().bytes <= 2_000);
    }

    #[test]
    fn entries_older_than_max_age_are_read_again() {
        let c = cache(NearCacheOptions {
            max_age: Duration::from_millis(30),
            ..NearCacheOptions::default()
        });
        fill(&c, "1", fields(&[("a:v1", v(1.0, 1))]));
        let mut out = Vec::new();
        assert!(serve(&c, &key("1"), &names(&["a:v1"]), &[0], &mut out));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!serve(&c, &key("1"), &names(&["a:v1"]), &[0], &mut out));
        let s = c.stats();
        assert_eq!((s.entries, s.evictions, s.bytes), (0, 1, 0));
    }

    #[test]
    fn a_disabled_cache_serves_and_stores_nothing() {
        let c = cache(NearCacheOptions::default());
        fill(&c, "1", fields(&[("a:v1", v(1.0, 1))]));
        c.disable();
        let mut out = Vec::new();
        assert!(!serve(&c, &key("1"), &names(&["a:v1"]), &[0], &mut out));
        assert!(!fill(&c, "1", fields(&[("a:v1", v(1.0, 1))])));
        assert!(!c.stats().enabled);
    }

    #[test]
    fn bad_options_are_refused_with_what_is_wrong() {
        for bad in [
            NearCacheOptions::with_entries(0),
            NearCacheOptions {
                max_bytes: 0,
                ..NearCacheOptions::default()
            },
            NearCacheOptions {
                max_age: Duration::ZERO,
                ..NearCacheOptions::default()
            },
        ] {
            let err = NearCache::new(&bad, "rs").expect_err("refused");
            assert_eq!(err.kind(), "InvalidArgument");
            assert!(err.to_string().contains("must be positive"), "{err}");
        }
    }
}
