//! Prometheus metrics of user states.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DependencyLabels {
    dependency: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    ])
}

/// The metrics of one [`super::UserStates`] (clone-cheap handles; register once).
///
/// | metric | labels | what |
/// | --- | --- | --- |
/// | `user_state_requests_total` | `cache` = `hit` \| `miss` \| `bypassed` | states served, by what the cache did (bypassed: Redis down, slow or skipped, or an invalidation of the user pending) |
/// | `user_state_cache_operations_total` | `op` = `get` \| `put` \| `invalidate`, `outcome` = `ok` \| `error` \| `timeout` \| `skipped` \| `superseded` | cache round trips (skipped: circuit open; superseded: a write refused because the user was invalidated meanwhile) |
/// | `user_state_history_reads_total` | `outcome` = `ok` \| `error` \| `timeout` \| `skipped` | history reads (on misses and bypasses) |
/// | `user_state_builds_total` | `source` = `trained` \| `fold_in` \| `none` | states computed (not served from the cache); `fold_in` counts the fold-ins |
/// | `user_state_errors_total` | `kind` ([`super::UserStateError::kind`]) | errors, corrupt cached values included |
/// | `user_state_circuit_open` | `dependency` = `cache` \| `history` | 1 while the dependency is being skipped |
/// | `user_state_duration_seconds` | `stage` = `cache` \| `history` \| `build` \| `total` | latency histogram |
/// | `user_state_pending_invalidations` | | users whose invalidation could not reach the cache yet |
/// | `user_state_events_recorded_total` | | new events stored by `record` |
///
/// Cache hit rate: `sum(rate(user_state_requests_total{cache="hit"}[5m])) /
/// sum(rate(user_state_requests_total[5m]))`. Labels are fixed sets; never a user or model id.
#[derive(Clone, Debug)]
pub struct UserStateMetrics {
    requests: Family<CacheLabels, Counter>,
    cache_ops: Family<OpLabels, Counter>,
    history_reads: Family<OutcomeLabels, Counter>,
    builds: Family<SourceLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    circuit_open: Family<DependencyLabels, Gauge>,
    duration: Family<StageLabels, Histogram, fn() -> Histogram>,
    pending: Gauge,
    recorded: Counter,
}

impl Default for UserStateMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl UserStateMetrics {
    /// Fresh metrics, not registered anywhere.
    pub fn new() -> Self {
        Self {
            requests: Family::default(),
            cache_ops: Family::default(),
            history_reads: Family::default(),
            builds: Family::default(),
            errors: Family::default(),
            circuit_open: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            pending: Gauge::default(),
            recorded: Counter::default(),
        }
    }

    /// Registers every metric (names in the type's documentation).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "user_state_requests",
            "User states served, by what the cache did",
            self.requests.clone(),
        );
        registry.register(
            "user_state_cache_operations",
            "User-state cache round trips, by operation and outcome",
            self.cache_ops.clone(),
        );
        registry.register(
            "user_state_history_reads",
            "User history reads, by outcome",
            self.history_reads.clone(),
        );
        registry.register(
            "user_state_builds",
            "User states computed, by the source of the factors",
            self.builds.clone(),
        );
        registry.register(
            "user_state_errors",
            "User-state errors, by kind",
            self.errors.clone(),
        );
        registry.register(
            "user_state_circuit_open",
            "1 while a dependency of user states is skipped after failures",
            self.circuit_open.clone(),
        );
        registry.register(
            "user_state_duration_seconds",
            "Latency of user states, by stage",
            self.duration.clone(),
        );
        registry.register(
            "user_state_pending_invalidations",
            "Users whose cache invalidation has not reached the cache yet",
            self.pending.clone(),
        );
        registry.register(
            "user_state_events_recorded",
            "New events stored through user states",
            self.recorded.clone(),
        );
    }

    pub(crate) fn request(&self, cache: &'static str) {
        self.requests.get_or_create(&CacheLabels { cache }).inc();
    }

    pub(crate) fn cache_op(&self, op: &'static str, outcome: &'static str) {
        self.cache_ops
            .get_or_create(&OpLabels { op, outcome })
            .inc();
    }

    pub(crate) fn history_read(&self, outcome: &'static str) {
        self.history_reads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub(crate) fn build(&self, source: &'static str) {
        self.builds.get_or_create(&SourceLabels { source }).inc();
    }

    pub(crate) fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn circuit(&self, dependency: &'static str, open: bool) {
        self.circuit_open
            .get_or_create(&DependencyLabels { dependency })
            .set(i64::from(open));
    }

    pub(crate) fn duration(&self, stage: &'static str, seconds: f64) {
        self.duration
            .get_or_create(&StageLabels { stage })
            .observe(seconds);
    }

    pub(crate) fn pending(&self, n: usize) {
        self.pending.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn recorded(&self, n: u64) {
        self.recorded.inc_by(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_their_documented_names() {
        let m = UserStateMetrics::new();
        let mut registry = Registry::default();
        m.register(&mut registry);
        m.request("hit");
        m.cache_op("get", "ok");
        m.history_read("ok");
        m.build("fold_in");
        m.error("Timeout");
        m.circuit("cache", true);
        m.duration("total", 0.001);
        m.pending(3);
        m.recorded(2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            r#"user_state_requests_total{cache="hit"} 1"#,
            r#"user_state_cache_operations_total{op="get",outcome="ok"} 1"#,
            r#"user_state_history_reads_total{outcome="ok"} 1"#,
            r#"user_state_builds_total{source="fold_in"} 1"#,
            r#"user_state_errors_total{kind="Timeout"} 1"#,
            r#"user_state_circuit_open{dependency="cache"} 1"#,
            "user_state_pending_invalidations 3",
            "user_state_events_recorded_total 2",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(
            text.contains("user_state_duration_seconds_bucket{"),
            "{text}"
        );
    }
}
