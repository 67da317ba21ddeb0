//! Prometheus metrics of the operator. Labels are bounded: controller names and error kinds
//! are `&'static str`, never object names.

use std::sync::atomic::AtomicI64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-controller series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `modeldeployment`, `batchjob` or `featuredefinition`.
    pub controller: &'static str,
}

/// Labels of error series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The controller that failed.
    pub controller: &'static str,
    /// The error's stable kind.
    pub error: &'static str,
}

/// Labels of feature registry operations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    /// `connect`, `register` or `last_materialization`.
    pub operation: &'static str,
    /// `ok`, or the error's stable kind.
    pub outcome: &'static str,
}

/// Labels of `model_deployments_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeploymentLabels {
    /// The model.
    pub model_name: String,
    /// The version that moved.
    pub version: String,
    /// Where it moved to: `shadow`, `canary`, `paused`, `promoted` or `rolled_back`.
    pub status: &'static str,
}

/// All operator metrics and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    /// Reconciliations started.
    pub reconciles: Family<ControllerLabels, Counter>,
    /// Reconciliations that failed, by error kind.
    pub failures: Family<ErrorLabels, Counter>,
    /// Time spent per reconciliation.
    pub duration: Family<ControllerLabels, Histogram>,
    /// 1 while this replica holds the leader Lease (or runs without election).
    pub leader: Gauge<i64, AtomicI64>,
    /// Feature registry operations, by operation and outcome.
    pub registry_operations: Family<RegistryLabels, Counter>,
    /// Rollout transitions of ModelDeployments (`model_deployments_total`).
    pub deployments: Family<DeploymentLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        // Names carry their prefix themselves: `model_deployments_total` keeps the name the
        // dashboards and alerts use across components.
        let mut registry = Registry::default();
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let leader = Gauge::<i64, AtomicI64>::default();
        let registry_operations = Family::<RegistryLabels, Counter>::default();
        registry.register(
            "recsys_operator_reconciles",
            "Reconciliations started",
            reconciles.clone(),
        );
        registry.register(
            "recsys_operator_reconcile_failures",
            "Reconciliations that failed, by error kind",
            failures.clone(),
        );
        registry.register(
            "recsys_operator_reconcile_duration_seconds",
            "Time spent per reconciliation",
            duration.clone(),
        );
        registry.register(
            "recsys_operator_leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        registry.register(
            "recsys_operator_registry_operations",
            "Feature registry operations, by operation and outcome (ok or the error kind)",
            registry_operations.clone(),
        );
        let deployments = Family::<DeploymentLabels, Counter>::default();
        registry.register(
            "model_deployments",
            "Rollout transitions of ModelDeployments, by model, version and where it moved to",
            deployments.clone(),
        );
        Self {
            registry,
            deployments,
            reconciles,
            failures,
            duration,
            leader,
            registry_operations,
        }
    }
}

impl Metrics {
    /// Counts a reconciliation and returns a guard that records its duration when dropped.
    pub fn reconcile(&self, controller: &'static str) -> ReconcileTimer<'_> {
        let labels = ControllerLabels { controller };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            histogram: self.duration.get_or_create(&labels).clone(),
            start: Instant::now(),
            _metrics: self,
        }
    }

    /// Counts a failed reconciliation.
    pub fn failure(&self, controller: &'static str, error: &'static str) {
        self.failures
            .get_or_create(&ErrorLabels { controller, error })
            .inc();
    }

    /// Counts a feature registry operation; `outcome` is `ok` or the error's kind.
    pub fn registry(&self, operation: &'static str, outcome: &'static str) {
        self.registry_operations
            .get_or_create(&RegistryLabels { operation, outcome })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Records a reconciliation's duration when dropped, whichever way it ends.
pub struct ReconcileTimer<'a> {
    histogram: Histogram,
    start: Instant,
    _metrics: &'a Metrics,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_bounded_series() {
        let m = Metrics::default();
        {
            let _t = m.reconcile("batchjob");
        }
        m.failure("batchjob", "KubeApi");
        m.leader.set(1);
        m.registry("register", "ok");
        m.registry("register", "RegistryUnavailable");
        let text = m.encode().expect("encode");
        assert!(
            text.contains("recsys_operator_reconciles_total{controller=\"batchjob\"} 1"),
            "{text}"
        );
        assert!(text.contains("recsys_operator_reconcile_failures_total{controller=\"batchjob\",error=\"KubeApi\"} 1"), "{text}");
        assert!(
            text.contains(
                "recsys_operator_reconcile_duration_seconds_count{controller=\"batchjob\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("recsys_operator_leader 1"), "{text}");
        assert!(
            text.contains("recsys_operator_registry_operations_total{operation=\"register\",outcome=\"RegistryUnavailable\"} 1"),
            "{text}"
        );
    }
}
