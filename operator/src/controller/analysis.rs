//! The live analysis of a rollout, from the scorer pods' own `/metrics` or, when
//! `spec.strategy.analysis.prometheus` is set, from a Prometheus server ([`super::prometheus`]).
//!
//! While the candidate is shadowed or takes users, the operator reads every ready scorer pod's
//! `/metrics` through the Service's endpoints once per `spec.strategy.analysis.interval`. The
//! first reading of a step is the baseline; each later one closes a window (the difference of
//! the two readings, summed over the pods read both times) that
//! [`recsys_core::serving::analysis::judge`] holds to the thresholds. A new step, weight or
//! candidate starts a new baseline, so a window never mixes two exposures.
//!
//! The baselines live in the operator's memory: after a restart (or a leader change) the first
//! reading is a new baseline and the next run comes one interval later. The counters
//! themselves are the scorers', so nothing is lost but that interval.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use prometheus_parse::{Scrape, Value};
use recsys_core::serving::analysis::{
    self, Check, Counters, Exposure, Histogram, Readings, Thresholds,
};
use recsys_crds::model_deployment::{
    self as md_api, AnalysisCheck, AnalysisRun, AnalysisSpec, CheckKind,
};
use recsys_crds::{ModelDeployment, ModelDeploymentStatus, Stage};

use super::fleet::{self, Endpoint};

/// Path of the scorer's metrics.
pub const METRICS_PATH: &str = "/metrics";

/// A run is due when its window is this close to the interval (requeue timers are not exact).
const DUE_SLACK: Duration = Duration::from_millis(500);

/// How the candidate meets users in `status`, if it is analysed at all: shadowed, or serving a
/// share of users (also while a pause holds that share).
pub fn exposure(status: &ModelDeploymentStatus) -> Option<Exposure> {
    status.candidate_version.as_ref()?;
    match status.stage {
        Stage::Shadow => Some(Exposure::Shadow),
        Stage::Canary | Stage::Paused if status.canary_weight > 0 => Some(Exposure::Canary),
        _ => None,
    }
}

/// The thresholds of `spec`.
pub fn thresholds(spec: &AnalysisSpec) -> Thresholds {
    Thresholds {
        max_error_rate: spec.max_error_rate,
        max_p99_latency_ms: spec.max_p99_latency_ms,
        max_score_drift_psi: spec.max_score_drift_psi,
        min_top_k_overlap: spec.min_top_k_overlap,
        min_samples: u64::try_from(spec.min_samples).unwrap_or(1),
    }
}

/// The interval between runs (a spec whose interval does not parse is refused before any
/// analysis; one minute stands in).
pub fn interval(spec: &AnalysisSpec) -> Duration {
    spec.interval.to_std().unwrap_or(Duration::from_secs(60))
}

/// What a baseline was taken for: a window covers one exposure of one candidate.
#[derive(Clone, Debug, PartialEq, Eq)]
struct WindowKey {
    candidate: String,
    step: i32,
    weight: i32,
    shadow: bool,
}

#[derive(Clone, Debug)]
struct Baseline {
    key: WindowKey,
    at: Timestamp,
    readings: Readings,
}

/// The baselines of the analyses under way, per ModelDeployment.
#[derive(Debug, Default)]
pub struct Analyses {
    baselines: Mutex<HashMap<String, Baseline>>,
}

impl Analyses {
    /// Reads the scorer pods when `md`'s analysis needs it: a baseline at the start of an
    /// exposure, then a run every interval. Returns the run that an interval closed, if any.
    pub async fn observe(
        &self,
        md: &ModelDeployment,
        endpoints: &[Endpoint],
        now: Timestamp,
    ) -> Option<AnalysisRun> {
        let id = format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any());
        let status = md.status.clone().unwrap_or_default();
        let spec = &md.spec.strategy.analysis;
        let exposure = exposure(&status).filter(|_| super::rollout::has_live_thresholds(spec));
        let Some(exposure) = exposure else {
            self.forget(&id);
            return None;
        };
        let key = WindowKey {
            candidate: status.candidate_version.clone().unwrap_or_default(),
            step: status.current_step.unwrap_or(0),
            weight: status.canary_weight,
            shadow: exposure == Exposure::Shadow,
        };
        let interval = interval(spec);
        let earlier = self.baseline(&id);
        let due = match &earlier {
            Some(b) if b.key == key => {
                let age = now.duration_since(b.at).unsigned_abs();
                age + DUE_SLACK >= interval
            }
            _ => false,
        };
        if earlier.as_ref().is_some_and(|b| b.key == key) && !due {
            return None;
        }
        // With Prometheus, a baseline is only a time: the server holds the counters.
        let readings = match &spec.prometheus {
            None => read(endpoints, &md.spec.model).await,
            Some(_) => Readings::default(),
        };
        let fresh = Baseline {
            key: key.clone(),
            at: now,
            readings,
        };
        self.baselines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, fresh.clone());
        let earlier = earlier.filter(|b| b.key == key)?;
        let (window, pods, source, failure) = match &spec.prometheus {
            None => {
                let (w, p) = analysis::window(&fresh.readings, &earlier.readings);
                (w, p, md_api::AnalysisSource::Pods, None)
            }
            Some(src) => {
                let length = now.duration_since(earlier.at).unsigned_abs();
                match super::prometheus::window(src, &md.name_any(), &md.spec.model, length, now)
                    .await
                {
                    Ok((w, p)) => (w, p, md_api::AnalysisSource::Prometheus, None),
                    Err(e) => (
                        Counters::default(),
                        0,
                        md_api::AnalysisSource::Prometheus,
                        Some(e),
                    ),
                }
            }
        };
        let mut checks = analysis::judge(&thresholds(spec), exposure, &window);
        if let Some(e) = failure {
            // No figures is never a pass.
            for c in &mut checks {
                c.verdict = analysis::Verdict::Inconclusive;
                c.observed = None;
                c.message = format!("no figures: {e}");
            }
        }
        Some(AnalysisRun {
            at: Time(now),
            window_seconds: now.duration_since(earlier.at).as_secs(),
            step: key.step,
            exposure: match exposure {
                Exposure::Shadow => md_api::Exposure::Shadow,
                Exposure::Canary => md_api::Exposure::Canary,
            },
            weight: key.weight,
            pods: pods as i32,
            source,
            verdict: verdict(analysis::verdict(&checks)),
            checks: checks.iter().map(check).collect(),
        })
    }

    fn baseline(&self, id: &str) -> Option<Baseline> {
        self.baselines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Drops the baseline of a ModelDeployment no longer analysed (or deleted).
    pub fn forget(&self, id: &str) {
        self.baselines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

fn verdict(v: analysis::Verdict) -> md_api::Verdict {
    match v {
        analysis::Verdict::Successful => md_api::Verdict::Successful,
        analysis::Verdict::Failed => md_api::Verdict::Failed,
        analysis::Verdict::Inconclusive => md_api::Verdict::Inconclusive,
    }
}

fn check(c: &Check) -> AnalysisCheck {
    AnalysisCheck {
        check: match c.kind {
            analysis::CheckKind::ErrorRate => CheckKind::ErrorRate,
            analysis::CheckKind::P99Latency => CheckKind::P99Latency,
            analysis::CheckKind::ScoreDrift => CheckKind::ScoreDrift,
            analysis::CheckKind::TopKOverlap => CheckKind::TopKOverlap,
        },
        // Rounded so that a status write is not a new object for noise in the 12th digit.
        observed: c.observed.map(|v| (v * 1e6).round() / 1e6),
        threshold: c.threshold,
        verdict: verdict(c.verdict),
        message: c.message.clone(),
    }
}

/// Reads `/metrics` of every ready endpoint, concurrently; a pod that does not answer (or
/// answers something that is not a scorer's metrics) is left out of the window.
pub async fn read(endpoints: &[Endpoint], model: &str) -> Readings {
    let reads = endpoints.iter().filter(|e| e.ready).map(|e| async move {
        let text = fleet::get(e.address, METRICS_PATH).await.ok()?;
        let text = String::from_utf8(text.to_vec()).ok()?;
        let counters = counters(&text, model).ok()?;
        Some((
            e.pod.clone().unwrap_or_else(|| e.address.to_string()),
            counters,
        ))
    });
    futures::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The analysis counters of `model` in a scorer's metrics exposition (Prometheus or
/// OpenMetrics text).
pub fn counters(text: &str, model: &str) -> Result<Counters, std::io::Error> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
    let mut c = Counters::default();
    // Histogram sums come as their own samples; keyed by metric and the labels that matter.
    let sum_of = |metric: &str, keep: &dyn Fn(&prometheus_parse::Labels) -> bool| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == format!("{metric}_sum") && keep(&s.labels))
            .map(|s| scalar(&s.value))
            .sum()
    };
    for s in &scrape.samples {
        let variant = s.labels.get("variant");
        let for_model = |label: &str| s.labels.get(label) == Some(model);
        let side = match variant {
            Some("stable") => Some(&mut c.stable),
            Some("canary") => Some(&mut c.canary),
            _ => None,
        };
        match (s.metric.as_str(), side) {
            ("recommend_requests_total", Some(side)) => side.answered += scalar(&s.value),
            ("recommend_errors_total", Some(side)) => side.errors += scalar(&s.value),
            ("recommend_request_duration_seconds", Some(side)) => {
                side.latency.add(&histogram(&s.value, 0.0));
            }
            ("model_score_distribution", Some(side)) if for_model("model_name") => {
                side.scores.add(&histogram(&s.value, 0.0));
            }
            ("shadow_topk_overlap", _) if for_model("model") => {
                let sum = sum_of("shadow_topk_overlap", &|l| l.get("model") == Some(model));
                c.shadow.overlap.add(&histogram(&s.value, sum));
            }
            ("shadow_score_distribution", _) if for_model("model") => {
                let h = histogram(&s.value, 0.0);
                match variant {
                    Some("stable") => c.shadow.stable_scores.add(&h),
                    Some("shadow") => c.shadow.shadow_scores.add(&h),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Ok(c)
}

fn scalar(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        _ => 0.0,
    }
}

fn histogram(v: &Value, sum: f64) -> Histogram {
    match v {
        Value::Histogram(buckets) => Histogram::new(
            buckets.iter().map(|b| (b.less_than, b.count)).collect(),
            sum,
        ),
        _ => Histogram::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a scorer's `/metrics` holds of the analysed families (OpenMetrics, as
    /// prometheus-client writes it).
    const EXPOSITION: &str = r#"# HELP recommend_requests Recommendation and score answers.
# TYPE recommend_requests counter
recommend_requests_total{endpoint="recommendations",variant="stable",path="cf"} 90
recommend_requests_total{endpoint="recommendations",variant="canary",path="cf"} 8
recommend_requests_total{endpoint="scores",variant="canary",path="popularity"} 2
recommend_requests_total{endpoint="recommendations",variant="none",path="popularity"} 5
# HELP recommend_errors Requests that failed.
# TYPE recommend_errors counter
recommend_errors_total{endpoint="recommendations",variant="canary"} 3
# HELP recommend_request_duration_seconds Time to answer.
# TYPE recommend_request_duration_seconds histogram
recommend_request_duration_seconds_sum{endpoint="recommendations",variant="canary"} 0.5
recommend_request_duration_seconds_count{endpoint="recommendations",variant="canary"} 8
recommend_request_duration_seconds_bucket{le="0.01",endpoint="recommendations",variant="canary"} 6
recommend_request_duration_seconds_bucket{le="0.1",endpoint="recommendations",variant="canary"} 8
recommend_request_duration_seconds_bucket{le="+Inf",endpoint="recommendations",variant="canary"} 8
recommend_request_duration_seconds_sum{endpoint="scores",variant="canary"} 0.1
recommend_request_duration_seconds_count{endpoint="scores",variant="canary"} 2
recommend_request_duration_seconds_bucket{le="0.01",endpoint="scores",variant="canary"} 1
recommend_request_duration_seconds_bucket{le="0.1",endpoint="scores",variant="canary"} 2
recommend_request_duration_seconds_bucket{le="+Inf",endpoint="scores",variant="canary"} 2
# HELP model_score_distribution CF scores.
# TYPE model_score_distribution histogram
model_score_distribution_sum{model_name="als",variant="canary"} 1.5
model_score_distribution_count{model_name="als",variant="canary"} 4
model_score_distribution_bucket{le="0.5",model_name="als",variant="canary"} 3
model_score_distribution_bucket{le="+Inf",model_name="als",variant="canary"} 4
model_score_distribution_bucket{le="0.5",model_name="other",variant="canary"} 100
model_score_distribution_bucket{le="+Inf",model_name="other",variant="canary"} 100
# HELP shadow_topk_overlap Overlap.
# TYPE shadow_topk_overlap histogram
shadow_topk_overlap_sum{model="als"} 6.0
shadow_topk_overlap_count{model="als"} 10
shadow_topk_overlap_bucket{le="0.5",model="als"} 4
shadow_topk_overlap_bucket{le="1.0",model="als"} 10
shadow_topk_overlap_bucket{le="+Inf",model="als"} 10
# HELP shadow_score_distribution Shadow scores.
# TYPE shadow_score_distribution histogram
shadow_score_distribution_bucket{le="0.5",model="als",variant="shadow"} 7
shadow_score_distribution_bucket{le="+Inf",model="als",variant="shadow"} 9
shadow_score_distribution_bucket{le="0.5",model="als",variant="stable"} 2
shadow_score_distribution_bucket{le="+Inf",model="als",variant="stable"} 9
# EOF
"#;

    #[test]
    fn a_scorer_exposition_gives_each_variants_counters() {
        let c = counters(EXPOSITION, "als").expect("parse");
        assert_eq!((c.stable.answered, c.stable.errors), (90.0, 0.0));
        assert_eq!((c.canary.answered, c.canary.errors), (10.0, 3.0));
        // The two endpoints' latency histograms add up.
        assert_eq!(c.canary.latency.bins(), vec![7.0, 3.0, 0.0]);
        // Only this model's scores.
        assert_eq!(c.canary.scores.count(), 4.0);
        assert_eq!(
            (c.shadow.overlap.count(), c.shadow.overlap.sum),
            (10.0, 6.0)
        );
        assert_eq!(c.shadow.shadow_scores.bins(), vec![7.0, 2.0]);
        assert_eq!(c.shadow.stable_scores.bins(), vec![2.0, 7.0]);
    }

    #[test]
    fn only_a_shadowed_or_weighted_candidate_is_analysed() {
        let mut s = ModelDeploymentStatus {
            candidate_version: Some("v2".into()),
            stage: Stage::Shadow,
            ..Default::default()
        };
        assert_eq!(exposure(&s), Some(Exposure::Shadow));
        s.stage = Stage::Paused;
        assert_eq!(exposure(&s), None);
        s.canary_weight = 10;
        assert_eq!(exposure(&s), Some(Exposure::Canary));
        s.stage = Stage::Pending;
        assert_eq!(exposure(&s), None);
        s.stage = Stage::Canary;
        s.candidate_version = None;
        assert_eq!(exposure(&s), None);
    }
}
