//! The in-process online store of local mode: a map per feature version behind read-write
//! locks, with the same semantics as Redis (retention, overwrite order, invalidation).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use crate::features::{EntityKey, FeatureRef, StoredValue};

use super::codec::{self, encoded_len};
use super::{
    DEFAULT_RETENTION_FACTOR, FeatureStats, OnlineError, OnlineFeature, OnlineStore, StoreStats,
    ValueMatrix, WriteReport, now_ms, retention_ms, validate_online, validate_read,
};

/// How often a write sweeps expired values out of its feature's table.
const SWEEP_EVERY_MS: i64 = 10_000;

#[derive(Debug)]
struct Entry {
    value: StoredValue,
    expire_at_ms: i64,
}

#[derive(Debug, Default)]
struct Table {
    values: HashMap<EntityKey, Entry>,
    last_sweep_ms: i64,
}

impl Table {
    fn sweep(&mut self, now: i64) {
        self.values.retain(|_, e| e.expire_at_ms > now);
        self.last_sweep_ms = now;
    }
}

type Shared<T> = Arc<RwLock<T>>;

/// The online store of local mode (no server). Values past retention disappear from reads at
/// once and from memory at the next sweep of their feature (every 10 s of writes, or
/// [`InProcessOnlineStore::purge_expired`]).
#[derive(Debug)]
pub struct InProcessOnlineStore {
    retention_factor: u32,
    tables: RwLock<HashMap<FeatureRef, Shared<Table>>>,
}

impl Default for InProcessOnlineStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcessOnlineStore {
    /// An empty store with the default retention (2 × TTL).
    pub fn new() -> Self {
        Self::with_retention_factor(DEFAULT_RETENTION_FACTOR)
    }

    /// An empty store keeping values until their age reaches `TTL × factor` (at least 1).
    pub fn with_retention_factor(factor: u32) -> Self {
        Self {
            retention_factor: factor.max(1),
            tables: RwLock::new(HashMap::new()),
        }
    }

    fn table(&self, feature: &FeatureRef) -> Option<Shared<Table>> {
        self.tables
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(feature)
            .cloned()
    }

    fn table_or_create(&self, feature: &FeatureRef) -> Shared<Table> {
        if let Some(t) = self.table(feature) {
            return t;
        }
        self.tables
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(feature.clone())
            .or_default()
            .clone()
    }

    /// Drops every value past retention now; returns how many.
    pub fn purge_expired(&self) -> u64 {
        let now = now_ms();
        let tables: Vec<_> = self
            .tables
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut purged = 0;
        for table in tables {
            let mut t = table.write().unwrap_or_else(PoisonError::into_inner);
            let before = t.values.len();
            t.sweep(now);
            purged += (before - t.values.len()) as u64;
        }
        purged
    }
}

#[async_trait]
impl OnlineStore for InProcessOnlineStore {
    fn backend(&self) -> &'static str {
        "in_process"
    }

    async fn write_batch(
        &self,
        feature: &FeatureRef,
        ttl: Duration,
        values: &[(EntityKey, StoredValue)],
    ) -> Result<WriteReport, OnlineError> {
        codec::validate_feature(feature)?;
        let retention = retention_ms(ttl, self.retention_factor)?;
        for (entity, _) in values {
            codec::validate_entity(entity)?;
        }
        let now = now_ms();
        let table = self.table_or_create(feature);
        let mut t = table.write().unwrap_or_else(PoisonError::into_inner);
        if now - t.last_sweep_ms > SWEEP_EVERY_MS {
            t.sweep(now);
        }
        let mut report = WriteReport::default();
        for (entity, value) in values {
            let expire_at_ms = value.event_time_ms.saturating_add(retention);
            if expire_at_ms <= now {
                report.expired += 1;
                continue;
            }
            match t.values.get_mut(entity) {
                Some(cur) if cur.expire_at_ms > now && !codec::supersedes(value, &cur.value) => {
                    report.kept_newer += 1;
                }
                Some(cur) => {
                    *cur = Entry {
                        value: value.clone(),
                        expire_at_ms,
                    };
                    report.written += 1;
                }
                None => {
                    t.values.insert(
                        entity.clone(),
                        Entry {
                            value: value.clone(),
                            expire_at_ms,
                        },
                    );
                    report.written += 1;
                }
            }
        }
        Ok(report)
    }

    async fn read_batch(
        &self,
        entities: &[EntityKey],
        features: &[OnlineFeature],
    ) -> Result<ValueMatrix, OnlineError> {
        validate_online(entities, features)?;
        let now = now_ms();
        let width = features.len();
        let mut cells = vec![None; entities.len() * width];
        for (f, feature) in features.iter().enumerate() {
            let Some(table) = self.table(&feature.feature) else {
                continue;
            };
            let oldest = now.saturating_sub(retention_ms(feature.ttl, self.retention_factor)?);
            let t = table.read().unwrap_or_else(PoisonError::into_inner);
            for (e, entity) in entities.iter().enumerate() {
                if let Some(entry) = t.values.get(entity)
                    && entry.expire_at_ms > now
                    && entry.value.event_time_ms >= oldest
                {
                    cells[e * width + f] = Some(entry.value.clone());
                }
            }
        }
        Ok(ValueMatrix::new(width, cells))
    }

    async fn invalidate_entity(
        &self,
        entity: &EntityKey,
        features: &[FeatureRef],
    ) -> Result<u64, OnlineError> {
        validate_read(std::slice::from_ref(entity), features)?;
        let now = now_ms();
        let mut removed = 0;
        for feature in features {
            if let Some(table) = self.table(feature) {
                let mut t = table.write().unwrap_or_else(PoisonError::into_inner);
                if let Some(e) = t.values.remove(entity)
                    && e.expire_at_ms > now
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    async fn invalidate_feature(&self, feature: &FeatureRef) -> Result<u64, OnlineError> {
        codec::validate_feature(feature)?;
        let now = now_ms();
        let removed = self
            .tables
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(feature);
        Ok(removed.map_or(0, |table| {
            let t = table.read().unwrap_or_else(PoisonError::into_inner);
            t.values.values().filter(|e| e.expire_at_ms > now).count() as u64
        }))
    }

    async fn stats(&self) -> Result<StoreStats, OnlineError> {
        let now = now_ms();
        let tables: Vec<_> = self
            .tables
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(f, t)| (f.clone(), t.clone()))
            .collect();
        let mut features = Vec::new();
        for (feature, table) in tables {
            let t = table.read().unwrap_or_else(PoisonError::into_inner);
            // As Redis would hold it: the field and the value (the entity's key is shared).
            let field_len = codec::field(&feature).len();
            let (mut keys, mut bytes) = (0u64, 0u64);
            for e in t.values.values() {
                if e.expire_at_ms > now {
                    keys += 1;
                    bytes += (field_len + encoded_len(&e.value)) as u64;
                }
            }
            if keys > 0 {
                features.push(FeatureStats {
                    feature,
                    keys,
                    bytes,
                });
            }
        }
        features.sort_by(|a, b| a.feature.cmp(&b.feature));
        Ok(StoreStats { features })
    }
}
