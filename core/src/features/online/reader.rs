//! Serving reads: the online store within a time budget, freshness against each feature's
//! TTL, a fallback for what is missing, and a circuit breaker so that a Redis that is down
//! does not cost the budget on every call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::features::{EntityKey, FeatureRef, FeatureValue, Freshness, StoredValue};

use super::{
    Fallback, OnlineError, OnlineFeature, OnlineMetrics, OnlineStore, StoreStats, duration_ms,
    now_ms, validate_online,
};
use crate::breaker::{Breaker, Gate};

/// Settings of a [`FeatureReader`].
#[derive(Clone, Debug)]
pub struct ReaderOptions {
    /// The whole read, fallback included, answers within this (plus scheduling noise).
    pub budget: Duration,
    /// The online store's share of the budget: its read is abandoned after this, leaving
    /// the rest to the fallback.
    pub online_timeout: Duration,
    /// Consecutive online-store failures (errors or timeouts) that open the circuit.
    pub failure_threshold: u32,
    /// How long the online store is skipped once the circuit opens; doubled after each failed
    /// probe, up to `max_cooldown`. After it, one read probes the store while others still
    /// skip it; success closes the circuit.
    pub cooldown: Duration,
    /// Longest cool-down.
    pub max_cooldown: Duration,
    /// Largest entities × features per read.
    pub max_cells: usize,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self {
            budget: Duration::from_millis(50),
            online_timeout: Duration::from_millis(25),
            failure_threshold: 3,
            cooldown: Duration::from_millis(500),
            max_cooldown: Duration::from_secs(5),
            max_cells: 100_000,
        }
    }
}

/// What happened to the online-store part of a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOutcome {
    /// It answered.
    Ok,
    /// It did not answer within `online_timeout`.
    Timeout,
    /// It failed; `kind` is the [`OnlineError::kind`].
    Error {
        /// Error kind.
        kind: &'static str,
    },
    /// It was skipped: the circuit is open after recent failures.
    CircuitOpen,
}

impl StoreOutcome {
    /// Wire name: `ok`, `timeout`, `error`, `circuit_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Timeout => "timeout",
            Self::Error { .. } => "error",
            Self::CircuitOpen => "circuit_open",
        }
    }
}

impl Serialize for StoreOutcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One value as served.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServedValue {
    /// The value; `None` when missing.
    pub value: Option<FeatureValue>,
    /// Major version of the feature it belongs to.
    pub major: u64,
    /// `now − event_time` in milliseconds; `None` when missing.
    pub age_ms: Option<i64>,
    /// How it came about.
    pub freshness: Freshness,
}

/// The answer to one read: entities × features, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureBatch {
    features: usize,
    values: Vec<ServedValue>,
    /// What the online store did.
    pub store: StoreOutcome,
    /// Time the read took.
    pub elapsed: Duration,
}

impl FeatureBatch {
    /// A batch of `values`, row-major with `features` columns.
    pub fn new(
        features: usize,
        values: Vec<ServedValue>,
        store: StoreOutcome,
        elapsed: Duration,
    ) -> Self {
        debug_assert!(features == 0 || values.len().is_multiple_of(features));
        Self {
            features,
            values,
            store,
            elapsed,
        }
    }

    /// Number of features (columns).
    pub fn features(&self) -> usize {
        self.features
    }

    /// Number of entities (rows).
    pub fn entities(&self) -> usize {
        self.values.len().checked_div(self.features).unwrap_or(0)
    }

    /// Feature `f` of entity `e`.
    pub fn get(&self, e: usize, f: usize) -> &ServedValue {
        &self.values[e * self.features + f]
    }

    /// The features of entity `e`.
    pub fn row(&self, e: usize) -> &[ServedValue] {
        &self.values[e * self.features..(e + 1) * self.features]
    }

    /// Rows, one per entity.
    pub fn rows(&self) -> impl Iterator<Item = &[ServedValue]> {
        self.values.chunks(self.features.max(1))
    }

    /// How many values came about as `freshness`.
    pub fn count(&self, freshness: Freshness) -> usize {
        self.values
            .iter()
            .filter(|v| v.freshness == freshness)
            .count()
    }

    /// All values, row-major.
    pub fn into_values(self) -> Vec<ServedValue> {
        self.values
    }
}

/// Serves feature reads for the scorer: one round trip to the online store, within a time
/// budget, degrading to the fallback (and saying so value by value) when the store is down,
/// slow or lacks a value. Never fails because of the store; fails only on a bad request.
pub struct FeatureReader {
    store: Arc<dyn OnlineStore>,
    fallback: Arc<dyn Fallback>,
    options: ReaderOptions,
    breaker: Breaker,
    metrics: OnlineMetrics,
}

impl std::fmt::Debug for FeatureReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureReader")
            .field("store", &self.store.backend())
            .field("fallback", &self.fallback.name())
            .field("options", &self.options)
            .field("breaker", &self.breaker)
            .finish()
    }
}

impl FeatureReader {
    /// A reader over `store`, asking `fallback` for what the store cannot serve.
    pub fn new(
        store: Arc<dyn OnlineStore>,
        fallback: Arc<dyn Fallback>,
        options: ReaderOptions,
    ) -> Self {
        let metrics = OnlineMetrics::new();
        store.attach_metrics(&metrics);
        Self {
            breaker: Breaker::new(
                options.failure_threshold,
                options.cooldown,
                options.max_cooldown,
            ),
            store,
            fallback,
            options,
            metrics,
        }
    }

    /// Uses `metrics` (already registered, or to be) instead of private ones; the store's own
    /// metrics (its near cache's) are published through them too.
    pub fn with_metrics(mut self, metrics: OnlineMetrics) -> Self {
        self.store.attach_metrics(&metrics);
        self.metrics = metrics;
        self
    }

    /// The metrics this reader updates.
    pub fn metrics(&self) -> &OnlineMetrics {
        &self.metrics
    }

    /// The online store.
    pub fn store(&self) -> &Arc<dyn OnlineStore> {
        &self.store
    }

    /// The settings.
    pub fn options(&self) -> &ReaderOptions {
        &self.options
    }

    /// Whether the online store is currently being skipped.
    pub fn circuit_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Reads `features` for `entities`: row `e`, column `f` of the answer is `features[f]` of
    /// `entities[e]`. Errors only for a request that is too large or names something that
    /// cannot be a key; a failing store or fallback shows in the values' freshness and in
    /// [`FeatureBatch::store`].
    #[tracing::instrument(
        level = "trace",
        skip_all,
        fields(entities = entities.len(), features = features.len())
    )]
    pub async fn read(
        &self,
        entities: &[EntityKey],
        features: &[OnlineFeature],
    ) -> Result<FeatureBatch, OnlineError> {
        let start = Instant::now();
        let width = features.len();
        let cells = entities.len().saturating_mul(width);
        if cells > self.options.max_cells {
            self.metrics.request("rejected");
            self.metrics.error("RequestTooLarge");
            return Err(OnlineError::TooLarge {
                cells,
                limit: self.options.max_cells,
            });
        }
        if let Err(e) = validate_online(entities, features) {
            self.metrics.request("rejected");
            self.metrics.error(e.kind());
            return Err(e);
        }
        let deadline = start + self.options.budget;

        // 1. The online store, unless the circuit is open.
        let (matrix, store) = self.read_online(entities, features).await;

        // 2. Freshness of what it returned.
        let now = now_ms();
        let mut values = Vec::with_capacity(cells);
        let mut need = Vec::new();
        match matrix {
            Some(mut m) => {
                for err in &m.corrupt {
                    self.metrics.error(err.kind());
                }
                if let Some(first) = m.corrupt.first() {
                    tracing::warn!(
                        error = %first,
                        corrupt = m.corrupt.len(),
                        "corrupt online values treated as missing"
                    );
                }
                for e in 0..entities.len() {
                    for (f, feature) in features.iter().enumerate() {
                        match m.take(e, f) {
                            Some(v) => values.push(served(v, feature, now)),
                            None => {
                                need.push(values.len());
                                values.push(missing(feature));
                            }
                        }
                    }
                }
            }
            None => {
                for _ in entities {
                    for feature in features {
                        need.push(values.len());
                        values.push(missing(feature));
                    }
                }
            }
        }

        // 3. The fallback, for what is missing, within what is left of the budget.
        if !need.is_empty() && !self.fallback.is_noop() {
            self.read_fallback(entities, features, &need, &mut values, deadline, now)
                .await;
        }

        // 4. Metrics and the access log.
        let mut counts = [0usize; 4];
        for (f, feature) in features.iter().enumerate() {
            let mut per = [0u64; 4];
            for v in values.iter().skip(f).step_by(width.max(1)) {
                per[freshness_index(v.freshness)] += 1;
            }
            for (i, n) in per.into_iter().enumerate() {
                counts[i] += n as usize;
                self.metrics.values(&feature.feature, FRESHNESS[i], n);
            }
        }
        let elapsed = start.elapsed();
        self.metrics.request(if store == StoreOutcome::Ok {
            "ok"
        } else {
            "degraded"
        });
        self.metrics.duration("total", elapsed.as_secs_f64());
        tracing::debug!(
            target: "recsys_core::features::online::access",
            entities = entities.len(),
            features = width,
            fresh = counts[0],
            stale = counts[1],
            fallback = counts[2],
            missing = counts[3],
            store = store.as_str(),
            elapsed_us = elapsed.as_micros() as u64,
            "features read"
        );
        Ok(FeatureBatch {
            features: width,
            values,
            store,
            elapsed,
        })
    }

    async fn read_online(
        &self,
        entities: &[EntityKey],
        features: &[OnlineFeature],
    ) -> (Option<super::ValueMatrix>, StoreOutcome) {
        let (gate, _guard) = self.breaker.gate();
        let probe = match gate {
            Gate::Skip => {
                self.metrics.online_read("skipped");
                return (None, StoreOutcome::CircuitOpen);
            }
            Gate::Probe => true,
            Gate::Closed => false,
        };
        let timeout = self.options.online_timeout.min(self.options.budget);
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, self.store.read_batch(entities, features)).await;
        self.metrics
            .duration("online", started.elapsed().as_secs_f64());
        let err = match result {
            Ok(Ok(m)) => {
                self.metrics.online_read("ok");
                if self.breaker.success() {
                    self.metrics.circuit(false);
                    tracing::info!(
                        backend = self.store.backend(),
                        "online store answers again; circuit closed"
                    );
                }
                return (Some(m), StoreOutcome::Ok);
            }
            Ok(Err(e)) => {
                self.metrics.online_read("error");
                e
            }
            Err(_) => {
                self.metrics.online_read("timeout");
                OnlineError::Timeout {
                    op: "online read",
                    after: timeout,
                }
            }
        };
        self.metrics.error(err.kind());
        let outcome = match &err {
            OnlineError::Timeout { .. } => StoreOutcome::Timeout,
            e => StoreOutcome::Error { kind: e.kind() },
        };
        if !err.is_outage() {
            tracing::warn!(error = %err, "online read failed; serving from the fallback");
            return (None, outcome);
        }
        match self.breaker.failure(probe) {
            Some(cooldown) => {
                self.metrics.circuit(true);
                tracing::warn!(
                    backend = self.store.backend(),
                    error = %err,
                    cooldown_ms = cooldown.as_millis() as u64,
                    "online store failing; skipping it for the cool-down"
                );
            }
            None => tracing::debug!(error = %err, "online read failed; serving from the fallback"),
        }
        (None, outcome)
    }

    async fn read_fallback(
        &self,
        entities: &[EntityKey],
        features: &[OnlineFeature],
        need: &[usize],
        values: &mut [ServedValue],
        deadline: Instant,
        now: i64,
    ) {
        let width = features.len();
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            self.metrics.fallback("timeout");
            return;
        }
        let asks: Vec<(&EntityKey, &FeatureRef)> = need
            .iter()
            .map(|&i| (&entities[i / width], &features[i % width].feature))
            .collect();
        let started = Instant::now();
        let result = tokio::time::timeout(remaining, self.fallback.fetch(&asks)).await;
        self.metrics
            .duration("fallback", started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(found)) => {
                self.metrics.fallback("ok");
                for (&i, v) in need.iter().zip(found) {
                    if let Some(v) = v {
                        let slot = &mut values[i];
                        slot.age_ms = Some(now - v.event_time_ms);
                        slot.value = Some(v.value);
                        slot.freshness = Freshness::Fallback;
                    }
                }
            }
            Ok(Err(e)) => {
                self.metrics.fallback("error");
                self.metrics.error(e.kind());
                tracing::warn!(fallback = self.fallback.name(), error = %e, "fallback failed");
            }
            Err(_) => {
                self.metrics.fallback("timeout");
                self.metrics.error("Timeout");
                tracing::debug!(
                    fallback = self.fallback.name(),
                    after_ms = remaining.as_millis() as u64,
                    "fallback ran out of budget"
                );
            }
        }
    }

    /// Computes [`OnlineStore::stats`] and publishes it as the `feature_store_keys` and
    /// `feature_store_bytes` gauges. Walks the keyspace: call it from a periodic task.
    pub async fn refresh_stats(&self) -> Result<StoreStats, OnlineError> {
        match self.store.stats().await {
            Ok(stats) => {
                self.metrics.observe_stats(&stats);
                Ok(stats)
            }
            Err(e) => {
                self.metrics.error(e.kind());
                Err(e)
            }
        }
    }
}

const FRESHNESS: [Freshness; 4] = [
    Freshness::Fresh,
    Freshness::Stale,
    Freshness::Fallback,
    Freshness::Missing,
];

fn freshness_index(f: Freshness) -> usize {
    match f {
        Freshness::Fresh => 0,
        Freshness::Stale => 1,
        Freshness::Fallback => 2,
        Freshness::Missing => 3,
    }
}

/// A stored value classified against its feature's TTL: fresh while `now − event_time ≤ TTL`.
pub fn classify(v: &StoredValue, ttl: Duration, now_ms: i64) -> Freshness {
    if now_ms - v.event_time_ms <= duration_ms(ttl) {
        Freshness::Fresh
    } else {
        Freshness::Stale
    }
}

fn served(v: StoredValue, feature: &OnlineFeature, now: i64) -> ServedValue {
    ServedValue {
        freshness: classify(&v, feature.ttl, now),
        age_ms: Some(now - v.event_time_ms),
        value: Some(v.value),
        major: feature.feature.major,
    }
}

fn missing(feature: &OnlineFeature) -> ServedValue {
    ServedValue {
        value: None,
        major: feature.feature.major,
        age_ms: None,
        freshness: Freshness::Missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_is_by_event_time_against_the_ttl() {
        let v = |event| StoredValue {
            value: FeatureValue::Int(1),
            event_time_ms: event,
            written_at_ms: 10_000,
        };
        let ttl = Duration::from_secs(1);
        assert_eq!(classify(&v(9_000), ttl, 10_000), Freshness::Fresh);
        assert_eq!(classify(&v(8_999), ttl, 10_000), Freshness::Stale);
        // Written just now, but about the past: stale.
        assert_eq!(classify(&v(0), ttl, 10_000), Freshness::Stale);
    }
}
