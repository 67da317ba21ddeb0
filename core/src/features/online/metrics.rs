//! Prometheus metrics of online-feature serving.
//!
//! | metric | labels | what |
//! | --- | --- | --- |
//! | `feature_store_requests_total` | `outcome` = `ok` \| `degraded` \| `rejected` | reads served (degraded: the online store failed or was skipped) |
//! | `feature_store_fetch_duration_seconds` | `stage` = `online` \| `fallback` \| `total` | latency histogram |
//! | `feature_store_values_total` | `feature`, `major`, `freshness` | values served, by how they came about |
//! | `feature_store_online_reads_total` | `outcome` = `ok` \| `error` \| `timeout` \| `skipped` | online-store round trips (skipped: circuit open) |
//! | `feature_store_fallback_requests_total` | `outcome` = `ok` \| `error` \| `timeout` | fallback computations / offline reads |
//! | `feature_store_errors_total` | `kind` ([`super::OnlineError::kind`]) | errors, corrupt values included |
//! | `feature_store_circuit_open` | | 1 while the online store is being skipped |
//! | `feature_store_keys`, `feature_store_bytes` | `feature`, `major` | stored values and bytes (from [`super::OnlineStore::stats`]) |
//! | `feature_store_near_cache_lookups_total` | `result` = `hit` \| `miss` | entities looked up in the near cache (a miss is read from Redis) |
//! | `feature_store_near_cache_evictions_total` | `reason` = `capacity` \| `expired` | entities dropped to stay within the bounds, or older than `max_age` |
//! | `feature_store_near_cache_invalidations_total` | `source` = `push` \| `local` | entities invalidated by a Redis push (a write by any process) or by this process's own write |
//! | `feature_store_near_cache_flushes_total` | `reason` = `disconnect` \| `flushdb` \| `untrusted_push` \| `invalidate_feature` \| `clear` \| `tracking_refused` | whole-cache flushes |
//! | `feature_store_near_cache_entries`, `feature_store_near_cache_bytes` | | entities held and their estimated bytes |
//!
//! Online-store hit rate (values found, stale or fresh): `sum(rate(feature_store_values_total{freshness=~"fresh|stale"}[5m])) /
//! sum(rate(feature_store_values_total[5m]))` (or `freshness="fresh"` alone for fresh hits).
//! Near-cache hit rate (entities served without Redis):
//! `rate(feature_store_near_cache_lookups_total{result="hit"}[5m]) /
//! sum(rate(feature_store_near_cache_lookups_total[5m]))`. The near-cache families stay at zero
//! when the store has no near cache.
//!
//! Labels are bounded: `feature` and `major` come from the registry (every feature version
//! defined, a few hundred at most, times four freshness values), never from a request's
//! entity ids; outcomes and error kinds are fixed sets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::features::{FeatureRef, Freshness};

use super::StoreStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ValueLabels {
    feature: String,
    major: u64,
    freshness: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeatureLabels {
    feature: String,
    major: u64,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    ])
}

/// Wire name of a freshness, as in the HTTP API and the `freshness` label.
pub fn freshness_label(f: Freshness) -> &'static str {
    match f {
        Freshness::Fresh => "fresh",
        Freshness::Stale => "stale",
        Freshness::Fallback => "fallback",
        Freshness::Missing => "missing",
    }
}

/// The metrics of one [`super::FeatureReader`] (clone-cheap handles; register once).
#[derive(Clone, Debug)]
pub struct OnlineMetrics {
    requests: Family<OutcomeLabels, Counter>,
    duration: Family<StageLabels, Histogram, fn() -> Histogram>,
    values: Family<ValueLabels, Counter>,
    online_reads: Family<OutcomeLabels, Counter>,
    fallbacks: Family<OutcomeLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    circuit_open: Gauge,
    keys: Family<FeatureLabels, Gauge>,
    bytes: Family<FeatureLabels, Gauge>,
    near_cache: NearCacheMetrics,
}

impl Default for OnlineMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl OnlineMetrics {
    /// Fresh metrics, not registered anywhere.
    pub fn new() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            values: Family::default(),
            online_reads: Family::default(),
            fallbacks: Family::default(),
            errors: Family::default(),
            circuit_open: Gauge::default(),
            keys: Family::default(),
            bytes: Family::default(),
            near_cache: NearCacheMetrics::default(),
        }
    }

    /// The near cache's part (given to the store by [`super::OnlineStore::attach_metrics`]).
    pub fn near_cache(&self) -> &NearCacheMetrics {
        &self.near_cache
    }

    /// Registers every metric (names in the module documentation).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "feature_store_requests",
            "Online feature reads served, by outcome",
            self.requests.clone(),
        );
        registry.register(
            "feature_store_fetch_duration_seconds",
            "Latency of online feature reads, by stage",
            self.duration.clone(),
        );
        registry.register(
            "feature_store_values",
            "Feature values served, by feature version and freshness",
            self.values.clone(),
        );
        registry.register(
            "feature_store_online_reads",
            "Round trips to the online store, by outcome",
            self.online_reads.clone(),
        );
        registry.register(
            "feature_store_fallback_requests",
            "Fallback computations or offline reads, by outcome",
            self.fallbacks.clone(),
        );
        registry.register(
            "feature_store_errors",
            "Feature store errors, by kind",
            self.errors.clone(),
        );
        registry.register(
            "feature_store_circuit_open",
            "1 while the online store is skipped after failures",
            self.circuit_open.clone(),
        );
        registry.register(
            "feature_store_keys",
            "Values stored in the online store, per feature version",
            self.keys.clone(),
        );
        registry.register(
            "feature_store_bytes",
            "Bytes used in the online store, per feature version",
            self.bytes.clone(),
        );
        self.near_cache.register(registry);
    }

    pub(crate) fn request(&self, outcome: &'static str) {
        self.requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub(crate) fn duration(&self, stage: &'static str, seconds: f64) {
        self.duration
            .get_or_create(&StageLabels { stage })
            .observe(seconds);
    }

    pub(crate) fn values(&self, feature: &FeatureRef, freshness: Freshness, n: u64) {
        if n > 0 {
            self.values
                .get_or_create(&ValueLabels {
                    feature: feature.name.clone(),
                    major: feature.major,
                    freshness: freshness_label(freshness),
                })
                .inc_by(n);
        }
    }

    pub(crate) fn online_read(&self, outcome: &'static str) {
        self.online_reads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub(crate) fn fallback(&self, outcome: &'static str) {
        self.fallbacks
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub(crate) fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn circuit(&self, open: bool) {
        self.circuit_open.set(i64::from(open));
    }

    /// Publishes what [`super::OnlineStore::stats`] found (replacing the previous figures).
    pub fn observe_stats(&self, stats: &StoreStats) {
        self.keys.clear();
        self.bytes.clear();
        for s in &stats.features {
            let labels = FeatureLabels {
                feature: s.feature.name.clone(),
                major: s.feature.major,
            };
            self.keys
                .get_or_create(&labels)
                .set(i64::try_from(s.keys).unwrap_or(i64::MAX));
            self.bytes
                .get_or_create(&labels)
                .set(i64::try_from(s.bytes).unwrap_or(i64::MAX));
        }
    }
}

/// The metrics of a near cache (clone-cheap handles; registered with [`OnlineMetrics`]).
#[derive(Clone, Debug, Default)]
pub struct NearCacheMetrics {
    lookups: Family<ResultLabels, Counter>,
    evictions: Family<ReasonLabels, Counter>,
    invalidations: Family<SourceLabels, Counter>,
    flushes: Family<ReasonLabels, Counter>,
    entries: Gauge,
    bytes: Gauge,
}

impl NearCacheMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "feature_store_near_cache_lookups",
            "Entities looked up in the near cache, by result (a miss is read from Redis)",
            self.lookups.clone(),
        );
        registry.register(
            "feature_store_near_cache_evictions",
            "Entities dropped from the near cache to stay within its bounds or its maximum age",
            self.evictions.clone(),
        );
        registry.register(
            "feature_store_near_cache_invalidations",
            "Entities invalidated in the near cache, by source (Redis push or own write)",
            self.invalidations.clone(),
        );
        registry.register(
            "feature_store_near_cache_flushes",
            "Whole near-cache flushes, by reason",
            self.flushes.clone(),
        );
        registry.register(
            "feature_store_near_cache_entries",
            "Entities held in the near cache",
            self.entries.clone(),
        );
        registry.register(
            "feature_store_near_cache_bytes",
            "Estimated bytes held in the near cache",
            self.bytes.clone(),
        );
    }

    pub(crate) fn lookups(&self, hits: u64, misses: u64) {
        if hits > 0 {
            self.lookups
                .get_or_create(&ResultLabels { result: "hit" })
                .inc_by(hits);
        }
        if misses > 0 {
            self.lookups
                .get_or_create(&ResultLabels { result: "miss" })
                .inc_by(misses);
        }
    }

    pub(crate) fn eviction(&self, reason: &'static str) {
        self.evictions.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub(crate) fn invalidations(&self, source: &'static str, n: u64) {
        if n > 0 {
            self.invalidations
                .get_or_create(&SourceLabels { source })
                .inc_by(n);
        }
    }

    pub(crate) fn flush(&self, reason: &'static str) {
        self.flushes.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub(crate) fn size(&self, entries: u64, bytes: u64) {
        self.entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}
