//! Where values come from when the online store has none or cannot answer: the offline store,
//! or a computation where the feature's definition allows one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use crate::features::{EntityKey, FeatureRef, StoredValue};

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
