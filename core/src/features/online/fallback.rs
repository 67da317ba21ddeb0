//! Where values come from when the online store has none or cannot answer: the offline store
//! ([`OfflineFallback`]), or a computation where the feature's definition allows one.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use crate::features::offline::OfflineStore;
use crate::features::{EntityKey, EntityKind, FeatureRef, StoredValue};

use super::OnlineError;

/// A source of values for cells the online store could not serve. The reader calls it with
/// the cells still empty, within what is left of its time budget, and drops its answer when
/// the budget runs out. An implementation should answer only for the features it can serve
/// (leaving the others `None`) and keep its own work bounded: it is on the request path.
#[async_trait]
pub trait Fallback: Send + Sync + 'static {
    /// Short, fixed name for metrics and logs (`none`, `offline`, `memory`).
    fn name(&self) -> &'static str;

    /// True for a fallback that never has anything ([`NoFallback`]): the reader skips it.
    fn is_noop(&self) -> bool {
        false
    }

    /// Values for `cells`, in the same order; `None` where there is none.
    async fn fetch(
        &self,
        cells: &[(&EntityKey, &FeatureRef)],
    ) -> Result<Vec<Option<StoredValue>>, OnlineError>;
}

/// No fallback: what the online store lacks is missing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFallback;

#[async_trait]
impl Fallback for NoFallback {
    fn name(&self) -> &'static str {
        "none"
    }

    fn is_noop(&self) -> bool {
        true
    }

    async fn fetch(
        &self,
        cells: &[(&EntityKey, &FeatureRef)],
    ) -> Result<Vec<Option<StoredValue>>, OnlineError> {
        Ok(vec![None; cells.len()])
    }
}

/// A fallback over a map, for tests and local mode; optionally slow or failing, to exercise
/// the reader's budget.
#[derive(Debug, Default)]
pub struct MemoryFallback {
    values: RwLock<HashMap<(FeatureRef, EntityKey), StoredValue>>,
    delay: Option<Duration>,
    fail: bool,
    calls: AtomicU64,
}

impl MemoryFallback {
    /// An empty fallback.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers only after `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Always fails.
    pub fn failing(mut self) -> Self {
        self.fail = true;
        self
    }

    /// Sets the value of `feature` for `entity`.
    pub fn insert(&self, feature: FeatureRef, entity: EntityKey, value: StoredValue) {
        self.values
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((feature, entity), value);
    }

    /// How many times it was asked.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Fallback for MemoryFallback {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn fetch(
        &self,
        cells: &[(&EntityKey, &FeatureRef)],
    ) -> Result<Vec<Option<StoredValue>>, OnlineError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        if self.fail {
            return Err(OnlineError::Fallback {
                fallback: "memory",
                message: "configured to fail".into(),
            });
        }
        let values = self.values.read().unwrap_or_else(PoisonError::into_inner);
        Ok(cells
            .iter()
            .map(|(e, f)| values.get(&((*f).clone(), (*e).clone())).cloned())
            .collect())
    }
}

/// Fallbacks asked in order, each for the cells the previous ones left empty (for example
/// the offline store, then a computation).
#[derive(Clone, Default)]
pub struct FallbackChain {
    links: Vec<Arc<dyn Fallback>>,
}

impl std::fmt::Debug for FallbackChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.links.iter().map(|l| l.name()))
            .finish()
    }
}

impl FallbackChain {
    /// A chain of `links`.
    pub fn new(links: Vec<Arc<dyn Fallback>>) -> Self {
        Self { links }
    }
}

#[async_trait]
impl Fallback for FallbackChain {
    fn name(&self) -> &'static str {
        "chain"
    }

    async fn fetch(
        &self,
        cells: &[(&EntityKey, &FeatureRef)],
    ) -> Result<Vec<Option<StoredValue>>, OnlineError> {
        let mut out: Vec<Option<StoredValue>> = vec![None; cells.len()];
        let mut last_err = None;
        for link in &self.links {
            let open: Vec<usize> = (0..cells.len()).filter(|&i| out[i].is_none()).collect();
            if open.is_empty() {
                break;
            }
            let ask: Vec<_> = open.iter().map(|&i| cells[i]).collect();
            match link.fetch(&ask).await {
                Ok(values) => {
                    for (i, v) in open.into_iter().zip(values) {
                        out[i] = v;
                    }
                }
                Err(e) => {
                    tracing::debug!(fallback = link.name(), error = %e, "fallback link failed");
                    last_err = Some(e);
                }
            }
        }
        match last_err {
            Some(e) if out.iter().all(Option::is_none) => Err(e),
            _ => Ok(out),
        }
    }
}

/// The offline store as a fallback: the latest value of each asked cell
/// ([`OfflineStore::latest`]), whatever its age (the reader reports the age and marks the value
/// [`Freshness::Fallback`](crate::features::Freshness::Fallback)).
///
/// Cells are grouped by feature version and entity kind: one `latest` call per group (one
/// statement in Postgres), each entity asked once, the groups run concurrently. A group that
/// fails leaves its cells empty and the others are still served; only when every group fails
/// does the fetch fail.
pub struct OfflineFallback {
    store: Arc<dyn OfflineStore>,
    calls: AtomicU64,
}

impl std::fmt::Debug for OfflineFallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfflineFallback")
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}

impl OfflineFallback {
    /// A fallback reading `store`.
    pub fn new(store: Arc<dyn OfflineStore>) -> Self {
        Self {
            store,
            calls: AtomicU64::new(0),
        }
    }

    /// How many `latest` calls it made (one per feature version and entity kind asked).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// The cells of one `latest` call: the distinct entity ids, and for each asked cell the
/// position of its id.
#[derive(Default)]
struct Group {
    ids: Vec<String>,
    index: HashMap<String, usize>,
    cells: Vec<(usize, usize)>,
}

#[async_trait]
impl Fallback for OfflineFallback {
    fn name(&self) -> &'static str {
        "offline"
    }

    async fn fetch(
        &self,
        cells: &[(&EntityKey, &FeatureRef)],
    ) -> Result<Vec<Option<StoredValue>>, OnlineError> {
        let mut groups: BTreeMap<(&FeatureRef, EntityKind), Group> = BTreeMap::new();
        for (cell, (entity, feature)) in cells.iter().enumerate() {
            let group = groups.entry((*feature, entity.kind)).or_default();
            let next = group.ids.len();
            let at = *group.index.entry(entity.id.clone()).or_insert(next);
            if at == next {
                group.ids.push(entity.id.clone());
            }
            group.cells.push((cell, at));
        }
        self.calls.fetch_add(groups.len() as u64, Ordering::Relaxed);
        let answers = futures::future::join_all(
            groups
                .iter()
                .map(|((feature, kind), g)| self.store.latest(feature, *kind, &g.ids)),
        )
        .await;
        let mut out: Vec<Option<StoredValue>> = vec![None; cells.len()];
        let (mut failed, mut first_err) = (0usize, None);
        for (((feature, kind), group), answer) in groups.iter().zip(answers) {
            match answer {
                Ok(mut values) => {
                    for &(cell, at) in &group.cells {
                        out[cell] = values.get_mut(at).and_then(|v| v.clone());
                    }
                }
                Err(e) => {
                    failed += 1;
                    tracing::debug!(
                        feature = %feature,
                        entity_kind = %kind,
                        error = %e,
                        "offline fallback read failed"
                    );
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if failed == groups.len() => Err(OnlineError::Fallback {
                fallback: "offline",
                message: format!("{} ({})", e, e.kind()),
            }),
            Some(e) => {
                tracing::warn!(
                    failed,
                    groups = groups.len(),
                    error = %e,
                    "offline fallback answered in part"
                );
                Ok(out)
            }
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::FeatureValue;
    use crate::features::offline::{InProcessOfflineStore, OfflineRow};

    #[tokio::test]
    async fn offline_fallback_serves_the_latest_value_per_cell() {
        let store = Arc::new(InProcessOfflineStore::new());
        let pop = FeatureRef::new("pop", 1);
        let aff = FeatureRef::new("aff", 2);
        store
            .write(
                &pop,
                EntityKind::Product,
                &[
                    OfflineRow::new("p1", FeatureValue::Float(1.0), 10).written_at(11),
                    OfflineRow::new("p1", FeatureValue::Float(2.0), 20).written_at(21),
                    OfflineRow::new("p2", FeatureValue::Float(3.0), 5).written_at(6),
                ],
            )
            .await
            .expect("write");
        store
            .write(
                &aff,
                EntityKind::User,
                &[OfflineRow::new("u1", FeatureValue::Int(7), 30).written_at(31)],
            )
            .await
            .expect("write");
        let fallback = OfflineFallback::new(store);
        let (p1, p2, p3, u1) = (
            EntityKey::product("p1"),
            EntityKey::product("p2"),
            EntityKey::product("p3"),
            EntityKey::user("u1"),
        );
        // A product id that is also a user id must not mix kinds.
        let u_p1 = EntityKey::user("p1");
        let cells = vec![
            (&p1, &pop),
            (&u1, &aff),
            (&p2, &pop),
            (&p3, &pop),
            (&p1, &pop),
            (&u_p1, &pop),
            (&p1, &aff),
        ];
        let got = fallback.fetch(&cells).await.expect("fetch");
        let value = |i: usize| got[i].as_ref().map(|v| (v.value.clone(), v.event_time_ms));
        assert_eq!(
            value(0),
            Some((FeatureValue::Float(2.0), 20)),
            "latest event wins"
        );
        assert_eq!(value(1), Some((FeatureValue::Int(7), 30)));
        assert_eq!(value(2), Some((FeatureValue::Float(3.0), 5)));
        assert_eq!(value(3), None, "unknown entity");
        assert_eq!(value(4), value(0), "a repeated cell gets the same answer");
        assert_eq!(value(5), None, "the entity kind is part of the address");
        assert_eq!(value(6), None, "aff has no product values");
        // Groups: (pop, product), (aff, user), (pop, user), (aff, product).
        assert_eq!(fallback.calls(), 4);
        assert_eq!(fallback.name(), "offline");
    }

    #[tokio::test]
    async fn offline_fallback_fails_only_when_every_group_fails() {
        let store = Arc::new(InProcessOfflineStore::new());
        let pop = FeatureRef::new("pop", 1);
        store
            .write(
                &pop,
                EntityKind::Product,
                &[OfflineRow::new("p1", FeatureValue::Float(1.0), 10)],
            )
            .await
            .expect("write");
        let fallback = OfflineFallback::new(store);
        // A NUL in an id is refused by the offline store: that group fails.
        let (good, bad) = (EntityKey::product("p1"), EntityKey::user("u\0"));
        let ok = fallback
            .fetch(&[(&good, &pop), (&bad, &pop)])
            .await
            .expect("one group still answers");
        assert!(ok[0].is_some() && ok[1].is_none(), "{ok:?}");
        let err = fallback
            .fetch(&[(&bad, &pop)])
            .await
            .expect_err("every group failed");
        assert_eq!(err.kind(), "FallbackFailed");
        assert!(err.to_string().contains("NUL"), "{err}");
        assert!(fallback.fetch(&[]).await.expect("nothing asked").is_empty());
    }
}
