//! Prometheus metrics of the operator. Labels are bounded: controller names and error kinds
//! are `&'static str`, never object names.

use std::sync::atomic::{AtomicI64, AtomicU64};
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
    /// Where it moved to: `shadow`, `canary`, `paused`, `promoted`, `rolled_back` or
    /// `aborted`.
    pub status: &'static str,
}

/// Labels of `model_deployment_analysis_checks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnalysisLabels {
    /// The model.
    pub model_name: String,
    /// `ErrorRate`, `P99Latency`, `ScoreDrift` or `TopKOverlap`.
    pub check: &'static str,
    /// `Successful`, `Failed` or `Inconclusive`.
    pub verdict: &'static str,
}

/// Labels of the A/B readout's per-variant gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExperimentVariantLabels {
    /// The model.
    pub model_name: String,
    /// `stable` or `canary`.
    pub variant: String,
    /// `impressions`, `users`, `ctr` or `conversion`.
    pub metric: &'static str,
}

/// Labels of the A/B readout's tests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExperimentTestLabels {
    /// The model.
    pub model_name: String,
    /// `ctr`, `conversion` or `sample_ratio`.
    pub test: &'static str,
}

/// Labels of per-BatchJob series. The seed names them by `job_name`; with the namespace, one
/// series per BatchJob, which a cluster has tens of, not per run.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BatchJobLabels {
    /// The BatchJob's namespace.
    pub namespace: String,
    /// The BatchJob's name.
    pub job_name: String,
}

/// Labels of `batch_job_executions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExecutionLabels {
    /// The BatchJob's namespace.
    pub namespace: String,
    /// The BatchJob's name.
    pub job_name: String,
    /// `Succeeded` or `Failed`.
    pub status: &'static str,
}

/// Labels of `data_quality_checks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QualityCheckLabels {
    /// `schema`, `freshness`, `completeness`, `validity`, `volume` or `drift`.
    pub check_type: &'static str,
    /// `pass`, `warn`, `fail` or `skipped`.
    pub status: &'static str,
}

/// Labels of `data_quality_violations_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QualityTypeLabels {
    /// The check type.
    pub check_type: &'static str,
}

/// Labels of `data_quality_failing_checks`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QualityLatestLabels {
    /// Namespace of the BatchJob.
    pub namespace: String,
    /// The BatchJob.
    pub job_name: String,
    /// The check type.
    pub check_type: &'static str,
    /// `fail` (blocking) or `warn`.
    pub verdict: &'static str,
}

/// Labels of `batch_job_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The BatchJob's namespace.
    pub namespace: String,
    /// The BatchJob's name.
    pub job_name: String,
    /// Why: the Job's failure reason (`BackoffLimitExceeded`, `PodFailurePolicy`,
    /// `DeadlineExceeded`, …), or the trainer's error kind when it reported one.
    pub reason: String,
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
    /// Checks of live rollout analyses (`model_deployment_analysis_checks_total`).
    pub analysis_checks: Family<AnalysisLabels, Counter>,
    /// The current segment's figures per variant (`model_deployment_experiment_value`).
    pub experiment_values: Family<ExperimentVariantLabels, Gauge<f64, AtomicU64>>,
    /// The current segment's p-values (`model_deployment_experiment_p_value`).
    pub experiment_p_values: Family<ExperimentTestLabels, Gauge<f64, AtomicU64>>,
    /// Finished BatchJob runs by outcome (`batch_job_executions_total`).
    pub batch_executions: Family<ExecutionLabels, Counter>,
    /// Wall time of finished runs, from start to end (`batch_job_duration_seconds`).
    pub batch_duration: Family<BatchJobLabels, Histogram>,
    /// Failed runs by reason (`batch_job_failures_total`).
    pub batch_failures: Family<FailureLabels, Counter>,
    /// When a BatchJob last succeeded, Unix seconds (`batch_job_last_success_timestamp_seconds`).
    pub batch_last_success: Family<BatchJobLabels, Gauge<f64, AtomicU64>>,
    /// Scheduled runs held by `after` (`batch_job_held_runs_total`).
    pub batch_held: Family<BatchJobLabels, Counter>,
    /// Data-quality checks run, by type and verdict (`data_quality_checks_total`).
    pub quality_checks: Family<QualityCheckLabels, Counter>,
    /// Checks that failed or warned, by type (`data_quality_violations_total`).
    pub quality_violations: Family<QualityTypeLabels, Counter>,
    /// Checks failing or warning in each BatchJob's latest run with checks
    /// (`data_quality_failing_checks`).
    pub quality_failing: Family<QualityLatestLabels, Gauge<i64, AtomicI64>>,
    /// Seconds between the newest event and the latest freshness check
    /// (`data_quality_event_age_seconds`).
    pub quality_event_age: Family<BatchJobLabels, Gauge<f64, AtomicU64>>,
    /// When each BatchJob's latest run with checks finished, Unix seconds
    /// (`data_quality_last_run_timestamp_seconds`).
    pub quality_last_run: Family<BatchJobLabels, Gauge<f64, AtomicU64>>,
    /// Runs whose data-quality gate held (`data_quality_gate_holds_total`).
    pub quality_gate_holds: Family<BatchJobLabels, Counter>,
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
        let analysis_checks = Family::<AnalysisLabels, Counter>::default();
        registry.register(
            "model_deployment_analysis_checks",
            "Checks of live rollout analyses, by model, check and verdict",
            analysis_checks.clone(),
        );
        let experiment_values = Family::<ExperimentVariantLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "model_deployment_experiment_value",
            "A/B readout of the current canary weight: impressions, users, ctr and conversion per variant",
            experiment_values.clone(),
        );
        let experiment_p_values = Family::<ExperimentTestLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "model_deployment_experiment_p_value",
            "A/B readout of the current canary weight: p-values of the ctr and conversion tests and of the sample-ratio check",
            experiment_p_values.clone(),
        );
        let batch_executions = Family::<ExecutionLabels, Counter>::default();
        registry.register(
            "batch_job_executions",
            "Finished BatchJob runs, by outcome",
            batch_executions.clone(),
        );
        let batch_duration = Family::<BatchJobLabels, Histogram>::new_with_constructor(|| {
            // 1 s … about 9 h.
            Histogram::new(exponential_buckets(1.0, 2.0, 16))
        });
        registry.register(
            "batch_job_duration_seconds",
            "Wall time of finished BatchJob runs, first attempt to end",
            batch_duration.clone(),
        );
        let batch_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "batch_job_failures",
            "Failed BatchJob runs, by reason",
            batch_failures.clone(),
        );
        let batch_last_success = Family::<BatchJobLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "batch_job_last_success_timestamp_seconds",
            "When a BatchJob last succeeded (Unix seconds), for staleness alerts",
            batch_last_success.clone(),
        );
        let batch_held = Family::<BatchJobLabels, Counter>::default();
        registry.register(
            "batch_job_held_runs",
            "Scheduled BatchJob runs held because an upstream (spec.after) had not succeeded",
            batch_held.clone(),
        );
        let quality_checks = Family::<QualityCheckLabels, Counter>::default();
        registry.register(
            "data_quality_checks",
            "Data-quality checks run by BatchJobs, by check type and verdict (status)",
            quality_checks.clone(),
        );
        let quality_violations = Family::<QualityTypeLabels, Counter>::default();
        registry.register(
            "data_quality_violations",
            "Data-quality checks that failed or warned, by check type",
            quality_violations.clone(),
        );
        let quality_failing = Family::<QualityLatestLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "data_quality_failing_checks",
            "Checks failing (verdict fail, blocking) or warning in the latest run with checks of each BatchJob",
            quality_failing.clone(),
        );
        let quality_event_age = Family::<BatchJobLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "data_quality_event_age_seconds",
            "Age of the newest event when the latest freshness check of each BatchJob ran",
            quality_event_age.clone(),
        );
        let quality_last_run = Family::<BatchJobLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "data_quality_last_run_timestamp_seconds",
            "When the latest run with data-quality checks of each BatchJob finished, Unix seconds",
            quality_last_run.clone(),
        );
        let quality_gate_holds = Family::<BatchJobLabels, Counter>::default();
        registry.register(
            "data_quality_gate_holds",
            "BatchJob runs whose data-quality gate held: nothing was published (exit code 3)",
            quality_gate_holds.clone(),
        );
        Self {
            quality_checks,
            quality_violations,
            quality_failing,
            quality_event_age,
            quality_last_run,
            quality_gate_holds,
            registry,
            deployments,
            analysis_checks,
            experiment_values,
            experiment_p_values,
            batch_executions,
            batch_duration,
            batch_failures,
            batch_last_success,
            batch_held,
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

    /// Records what a finished run's data-quality checks found (its summary's counts; nothing
    /// when it ran none): the
    /// trainer is a short-lived Pod that Prometheus would rarely catch alive, so the operator,
    /// which reads every run's summary anyway and is scraped all the time, exports them.
    pub fn data_quality(
        &self,
        namespace: &str,
        job_name: &str,
        run: &recsys_crds::batch_job::JobRun,
        summary: &recsys_core::runs::RunSummary,
    ) {
        use recsys_core::quality::{CheckType, GATE_KIND, Verdict};
        let Some(q) = &summary.quality else {
            return;
        };
        let job = BatchJobLabels {
            namespace: namespace.to_owned(),
            job_name: job_name.to_owned(),
        };
        for t in CheckType::ALL {
            let counts = q.checks.get(t.as_str());
            for v in Verdict::ALL {
                let n = counts.and_then(|c| c.get(v.as_str())).copied().unwrap_or(0);
                if n > 0 {
                    self.quality_checks
                        .get_or_create(&QualityCheckLabels {
                            check_type: t.as_str(),
                            status: v.as_str(),
                        })
                        .inc_by(n);
                }
            }
            let violations: u64 = [Verdict::Warn, Verdict::Fail]
                .iter()
                .map(|v| counts.and_then(|c| c.get(v.as_str())).copied().unwrap_or(0))
                .sum();
            // Created at zero too, so that rate() and absent() see every type.
            self.quality_violations
                .get_or_create(&QualityTypeLabels {
                    check_type: t.as_str(),
                })
                .inc_by(violations);
            for v in [Verdict::Fail, Verdict::Warn] {
                let n = counts.and_then(|c| c.get(v.as_str())).copied().unwrap_or(0);
                self.quality_failing
                    .get_or_create(&QualityLatestLabels {
                        namespace: job.namespace.clone(),
                        job_name: job.job_name.clone(),
                        check_type: t.as_str(),
                        verdict: v.as_str(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        if let Some(age) = q.event_age_seconds {
            self.quality_event_age.get_or_create(&job).set(age);
        }
        if let Some(end) = &run.finished_at {
            self.quality_last_run
                .get_or_create(&job)
                .set(end.0.as_millisecond() as f64 / 1000.0);
        }
        if summary.error_kind.as_deref() == Some(GATE_KIND) {
            self.quality_gate_holds.get_or_create(&job).inc();
        }
    }

    /// Records a finished run of BatchJob `namespace/job_name`: its outcome, duration, failure
    /// reason or success time.
    pub fn batch_run(&self, namespace: &str, job_name: &str, run: &recsys_crds::batch_job::JobRun) {
        let job = BatchJobLabels {
            namespace: namespace.to_owned(),
            job_name: job_name.to_owned(),
        };
        self.batch_executions
            .get_or_create(&ExecutionLabels {
                namespace: job.namespace.clone(),
                job_name: job.job_name.clone(),
                status: run.outcome.as_str(),
            })
            .inc();
        if let Some(end) = &run.finished_at {
            let seconds = end.0.duration_since(run.started_at.0).as_secs_f64();
            self.batch_duration
                .get_or_create(&job)
                .observe(seconds.max(0.0));
            if run.outcome == recsys_crds::batch_job::RunOutcome::Succeeded {
                self.batch_last_success
                    .get_or_create(&job)
                    .set(end.0.as_millisecond() as f64 / 1000.0);
            }
        }
        if run.outcome == recsys_crds::batch_job::RunOutcome::Failed {
            // "BackoffLimitExceeded: …" → the Job controller's reason, a short fixed set.
            let reason = run
                .reason
                .split(':')
                .next()
                .filter(|r| !r.is_empty() && r.len() <= 64 && !r.contains(' '))
                .unwrap_or("Failed")
                .to_owned();
            self.batch_failures
                .get_or_create(&FailureLabels {
                    namespace: job.namespace,
                    job_name: job.job_name,
                    reason,
                })
                .inc();
        }
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
