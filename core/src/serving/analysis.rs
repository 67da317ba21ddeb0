//! Live analysis of a rollout: what the scorer pods counted for each variant over a window,
//! and the checks a candidate must pass before it gets more users.
//!
//! The scorers' counters are cumulative; a window is the difference of two readings of the
//! same pods ([`Counters::since`]). Over a window:
//!
//! | check | while | figure | fails when |
//! | --- | --- | --- | --- |
//! | `ErrorRate` | canary | `recommend_errors_total{variant="canary"}` over the canary's requests | above `maxErrorRate` |
//! | `P99Latency` | canary | the 0.99 quantile of `recommend_request_duration_seconds{variant="canary"}`, interpolated in its bucket as Prometheus' `histogram_quantile` does | above `maxP99LatencyMs` |
//! | `ScoreDrift` | canary | PSI of `model_score_distribution{variant="canary"}` against `{variant="stable"}` | above `maxScoreDriftPsi` |
//! | `ScoreDrift` | shadow | PSI of `shadow_score_distribution{variant="shadow"}` against `{variant="stable"}` (same requests) | above `maxScoreDriftPsi` |
//! | `TopKOverlap` | shadow | mean of `shadow_topk_overlap` | below `minTopKOverlap` |
//!
//! A check with fewer than `minSamples` observations on either side is `Inconclusive`: no data
//! never passes. A check that has no figure while the candidate is in that exposure (error rate
//! and latency of a shadow, which answers no one; overlap of a canary, whose users differ from
//! stable's) is not run.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::stats::psi;

/// A histogram as Prometheus exposes it: cumulative counts per upper bound, `+Inf` last.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// `(le, cumulative count)`, in increasing `le`.
    pub buckets: Vec<(f64, f64)>,
    /// Sum of the observations.
    pub sum: f64,
}

impl Histogram {
    /// A histogram from `(le, cumulative count)` pairs in any order.
    pub fn new(mut buckets: Vec<(f64, f64)>, sum: f64) -> Self {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self { buckets, sum }
    }

    /// Number of observations.
    pub fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.1)
    }

    /// Observations per bucket (not cumulative).
    pub fn bins(&self) -> Vec<f64> {
        let mut prev = 0.0;
        self.buckets
            .iter()
            .map(|&(_, c)| {
                let bin = (c - prev).max(0.0);
                prev = c;
                bin
            })
            .collect()
    }

    /// The `q` quantile, interpolated linearly within its bucket (Prometheus'
    /// `histogram_quantile`); in the `+Inf` bucket, the highest finite bound. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let mut lower = (0.0, 0.0);
        for &(le, c) in &self.buckets {
            if c >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let within = c - lower.1;
                let fraction = if within > 0.0 {
                    (rank - lower.1) / within
                } else {
                    1.0
                };
                return Some(lower.0 + (le - lower.0) * fraction);
            }
            lower = (le, c);
        }
        Some(lower.0)
    }

    /// This reading minus an earlier one of the same series. Bounds that differ (a scorer of
    /// another version) give this reading whole.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let same = self.buckets.len() == earlier.buckets.len()
            && self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .all(|(a, b)| a.0 == b.0);
        if !same || earlier.buckets.is_empty() {
            return self.clone();
        }
        Histogram {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(a, b)| (a.0, (a.1 - b.1).max(0.0)))
                .collect(),
            sum: (self.sum - earlier.sum).max(0.0),
        }
    }

    /// Adds another histogram of the same bounds (another pod's); an empty side takes the
    /// other's bounds.
    pub fn add(&mut self, other: &Histogram) {
        if self.buckets.is_empty() {
            *self = other.clone();
            return;
        }
        if other.buckets.len() == self.buckets.len() {
            for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
                a.1 += b.1;
            }
            self.sum += other.sum;
        }
    }
}

/// What the scorers counted for the users of one variant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VariantCounters {
    /// Requests answered.
    pub answered: f64,
    /// Requests failed on the server's side.
    pub errors: f64,
    /// Answer latency, seconds.
    pub latency: Histogram,
    /// CF scores of returned products.
    pub scores: Histogram,
}

/// What the scorers counted comparing the shadow with stable on the same requests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShadowCounters {
    /// Top-k overlap per compared request.
    pub overlap: Histogram,
    /// Stable's top-k scores on compared requests.
    pub stable_scores: Histogram,
    /// The shadow's top-k scores on the same requests.
    pub shadow_scores: Histogram,
}

/// The analysis counters of a scorer (or a sum of scorers).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Users on stable.
    pub stable: VariantCounters,
    /// Users on the canary.
    pub canary: VariantCounters,
    /// Shadow comparisons.
    pub shadow: ShadowCounters,
}

impl VariantCounters {
    fn since(&self, e: &Self) -> Self {
        Self {
            answered: (self.answered - e.answered).max(0.0),
            errors: (self.errors - e.errors).max(0.0),
            latency: self.latency.since(&e.latency),
            scores: self.scores.since(&e.scores),
        }
    }

    fn add(&mut self, o: &Self) {
        self.answered += o.answered;
        self.errors += o.errors;
        self.latency.add(&o.latency);
        self.scores.add(&o.scores);
    }

    fn went_back(&self, e: &Self) -> bool {
        self.answered < e.answered
            || self.errors < e.errors
            || self.latency.count() < e.latency.count()
    }
}

impl Counters {
    /// What was counted between `earlier` and this reading of the same scorer; a scorer that
    /// restarted in between (a counter went back) gives this reading whole.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let restarted = self.stable.went_back(&earlier.stable)
            || self.canary.went_back(&earlier.canary)
            || self.shadow.overlap.count() < earlier.shadow.overlap.count();
        if restarted {
            return self.clone();
        }
        Counters {
            stable: self.stable.since(&earlier.stable),
            canary: self.canary.since(&earlier.canary),
            shadow: ShadowCounters {
                overlap: self.shadow.overlap.since(&earlier.shadow.overlap),
                stable_scores: self
                    .shadow
                    .stable_scores
                    .since(&earlier.shadow.stable_scores),
                shadow_scores: self
                    .shadow
                    .shadow_scores
                    .since(&earlier.shadow.shadow_scores),
            },
        }
    }

    /// Adds another scorer's counters.
    pub fn add(&mut self, o: &Counters) {
        self.stable.add(&o.stable);
        self.canary.add(&o.canary);
        self.shadow.overlap.add(&o.shadow.overlap);
        self.shadow.stable_scores.add(&o.shadow.stable_scores);
        self.shadow.shadow_scores.add(&o.shadow.shadow_scores);
    }
}

/// How the candidate meets users while it is analysed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// Scored off the request path, compared with stable on the same requests.
    Shadow,
    /// Serving a share of users.
    Canary,
}

/// The thresholds of an analysis.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Thresholds {
    /// Highest share of canary requests that may fail.
    pub max_error_rate: Option<f64>,
    /// Highest p99 latency of canary requests, milliseconds.
    pub max_p99_latency_ms: Option<f64>,
    /// Highest PSI of the candidate's scores against stable's.
    pub max_score_drift_psi: Option<f64>,
    /// Lowest mean top-k overlap of shadow and stable.
    pub min_top_k_overlap: Option<f64>,
    /// Fewest observations on each side for a figure to count.
    pub min_samples: u64,
}

/// A check of the live analysis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CheckKind {
    /// Share of failed canary requests.
    ErrorRate,
    /// p99 latency of canary requests.
    P99Latency,
    /// PSI of the candidate's scores against stable's.
    ScoreDrift,
    /// Mean top-k overlap of the shadow with stable.
    TopKOverlap,
}

impl CheckKind {
    /// The name in status, Events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ErrorRate => "ErrorRate",
            Self::P99Latency => "P99Latency",
            Self::ScoreDrift => "ScoreDrift",
            Self::TopKOverlap => "TopKOverlap",
        }
    }
}

/// The verdict of a check or a whole analysis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Within the threshold.
    Successful,
    /// Past the threshold.
    Failed,
    /// Too few observations to tell.
    Inconclusive,
}

impl Verdict {
    /// The name in status and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Successful => "Successful",
            Self::Failed => "Failed",
            Self::Inconclusive => "Inconclusive",
        }
    }
}

/// One check over one window.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// Which check.
    pub kind: CheckKind,
    /// The figure, when there were enough observations.
    pub observed: Option<f64>,
    /// The threshold.
    pub threshold: f64,
    /// The verdict.
    pub verdict: Verdict,
    /// The figure and threshold in words, with the sample sizes.
    pub message: String,
}

/// The overall verdict of `checks`: failed if any failed, else inconclusive if any was, else
/// successful (also when no check applies to the exposure).
pub fn verdict(checks: &[Check]) -> Verdict {
    if checks.iter().any(|c| c.verdict == Verdict::Failed) {
        Verdict::Failed
    } else if checks.iter().any(|c| c.verdict == Verdict::Inconclusive) {
        Verdict::Inconclusive
    } else {
        Verdict::Successful
    }
}

/// Runs the checks `t` sets that apply to `exposure` over `window`.
pub fn judge(t: &Thresholds, exposure: Exposure, window: &Counters) -> Vec<Check> {
    let min = t.min_samples.max(1) as f64;
    let mut checks = vec![];
    let few = |kind: CheckKind, threshold: f64, what: String| Check {
        kind,
        observed: None,
        threshold,
        verdict: Verdict::Inconclusive,
        message: format!("{what}, fewer than minSamples {min}"),
    };
    let judged =
        |kind: CheckKind, observed: f64, threshold: f64, failed: bool, message: String| Check {
            kind,
            observed: Some(observed),
            threshold,
            verdict: if failed {
                Verdict::Failed
            } else {
                Verdict::Successful
            },
            message,
        };
    let drift = |expected: &Histogram, actual: &Histogram, max: f64, who: &str| {
        let (ne, na) = (expected.count(), actual.count());
        if ne < min || na < min {
            return few(
                CheckKind::ScoreDrift,
                max,
                format!("{na} {who} scores and {ne} stable scores"),
            );
        }
        match psi(&expected.bins(), &actual.bins()) {
            Some(p) => judged(
                CheckKind::ScoreDrift,
                p,
                max,
                p > max,
                format!(
                    "PSI of {who} scores against stable is {p:.3} ({na} and {ne} scores; maxScoreDriftPsi {max})"
                ),
            ),
            None => few(
                CheckKind::ScoreDrift,
                max,
                format!("{who} and stable scores are on different buckets"),
            ),
        }
    };
    match exposure {
        Exposure::Canary => {
            let c = &window.canary;
            if let Some(max) = t.max_error_rate {
                let n = c.answered + c.errors;
                checks.push(if n < min {
                    few(CheckKind::ErrorRate, max, format!("{n} canary requests"))
                } else {
                    let rate = c.errors / n;
                    judged(
                        CheckKind::ErrorRate,
                        rate,
                        max,
                        rate > max,
                        format!(
                            "{} of {n} canary requests failed ({:.2}%; maxErrorRate {:.2}%)",
                            c.errors,
                            rate * 100.0,
                            max * 100.0
                        ),
                    )
                });
            }
            if let Some(max) = t.max_p99_latency_ms {
                let n = c.latency.count();
                checks.push(match c.latency.quantile(0.99) {
                    Some(p99) if n >= min => {
                        let ms = p99 * 1000.0;
                        judged(
                            CheckKind::P99Latency,
                            ms,
                            max,
                            ms > max,
                            format!(
                                "p99 of {n} canary answers is {ms:.1} ms (maxP99LatencyMs {max})"
                            ),
                        )
                    }
                    _ => few(CheckKind::P99Latency, max, format!("{n} canary answers")),
                });
            }
            if let Some(max) = t.max_score_drift_psi {
                checks.push(drift(&window.stable.scores, &c.scores, max, "canary"));
            }
        }
        Exposure::Shadow => {
            let s = &window.shadow;
            if let Some(max) = t.max_score_drift_psi {
                checks.push(drift(&s.stable_scores, &s.shadow_scores, max, "shadow"));
            }
            if let Some(min_overlap) = t.min_top_k_overlap {
                let n = s.overlap.count();
                checks.push(if n < min {
                    few(
                        CheckKind::TopKOverlap,
                        min_overlap,
                        format!("{n} shadow comparisons"),
                    )
                } else {
                    let mean = s.overlap.sum / n;
                    judged(
                        CheckKind::TopKOverlap,
                        mean,
                        min_overlap,
                        mean < min_overlap,
                        format!(
                            "mean top-k overlap of shadow and stable is {mean:.3} over {n} requests (minTopKOverlap {min_overlap})"
                        ),
                    )
                });
            }
        }
    }
    checks
}

/// Counters of several scorers, keyed by pod (or address).
pub type Readings = BTreeMap<String, Counters>;

/// The window between two readings of the scorers: the sum over the pods read both times
/// (a pod that came or went in between adds nothing; one that restarted adds its new reading).
pub fn window(now: &Readings, earlier: &Readings) -> (Counters, usize) {
    let mut total = Counters::default();
    let mut pods = 0;
    for (pod, c) in now {
        if let Some(e) = earlier.get(pod) {
            total.add(&c.since(e));
            pods += 1;
        }
    }
    (total, pods)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(counts: &[f64]) -> Histogram {
        // Bounds 10, 20, 50, 100 ms and +Inf.
        let bounds = [0.01, 0.02, 0.05, 0.1, f64::INFINITY];
        let mut c = 0.0;
        Histogram::new(
            bounds
                .iter()
                .zip(counts)
                .map(|(&b, &n)| {
                    c += n;
                    (b, c)
                })
                .collect(),
            0.0,
        )
    }

    fn t() -> Thresholds {
        Thresholds {
            max_error_rate: Some(0.05),
            max_p99_latency_ms: Some(60.0),
            max_score_drift_psi: Some(0.2),
            min_top_k_overlap: Some(0.5),
            min_samples: 20,
        }
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_as_prometheus_does() {
        let h = latency(&[50.0, 30.0, 20.0, 0.0, 0.0]);
        // Rank 99 of 100 falls in (20 ms, 50 ms], 19 of its 20: 20 + 30 × 19/20.
        assert!((h.quantile(0.99).expect("a figure") - 0.0485).abs() < 1e-9);
        assert!((h.quantile(0.5).expect("a figure") - 0.01).abs() < 1e-9);
        // In the +Inf bucket: the highest finite bound.
        assert_eq!(
            latency(&[0.0, 0.0, 0.0, 0.0, 5.0]).quantile(0.99),
            Some(0.1)
        );
        assert_eq!(Histogram::default().quantile(0.99), None);
    }

    #[test]
    fn a_window_is_the_difference_and_a_restarted_scorer_counts_whole() {
        let mut before = Counters::default();
        before.canary.answered = 100.0;
        before.canary.latency = latency(&[100.0, 0.0, 0.0, 0.0, 0.0]);
        let mut after = before.clone();
        after.canary.answered = 150.0;
        after.canary.errors = 5.0;
        after.canary.latency = latency(&[100.0, 0.0, 50.0, 0.0, 0.0]);
        let w = after.since(&before);
        assert_eq!((w.canary.answered, w.canary.errors), (50.0, 5.0));
        assert_eq!(w.canary.latency.bins(), vec![0.0, 0.0, 50.0, 0.0, 0.0]);

        let mut restarted = Counters::default();
        restarted.canary.answered = 7.0;
        assert_eq!(restarted.since(&before), restarted);
    }

    #[test]
    fn windows_add_the_pods_read_both_times() {
        let mut one = Counters::default();
        one.canary.answered = 10.0;
        let earlier: Readings = [("a".to_owned(), Counters::default())].into();
        let now: Readings = [("a".to_owned(), one.clone()), ("b".to_owned(), one)].into();
        let (w, pods) = window(&now, &earlier);
        assert_eq!((w.canary.answered, pods), (10.0, 1));
    }

    #[test]
    fn a_healthy_canary_passes_and_a_failing_one_fails_with_its_figures() {
        let mut w = Counters::default();
        w.canary.answered = 95.0;
        w.canary.errors = 1.0;
        w.canary.latency = latency(&[90.0, 6.0, 0.0, 0.0, 0.0]);
        w.canary.scores = latency(&[10.0, 40.0, 40.0, 6.0, 0.0]);
        w.stable.scores = latency(&[11.0, 39.0, 41.0, 5.0, 0.0]);
        let checks = judge(&t(), Exposure::Canary, &w);
        assert_eq!(
            checks.iter().map(|c| c.kind).collect::<Vec<_>>(),
            [
                CheckKind::ErrorRate,
                CheckKind::P99Latency,
                CheckKind::ScoreDrift
            ]
        );
        assert_eq!(verdict(&checks), Verdict::Successful, "{checks:?}");

        w.canary.errors = 10.0;
        let checks = judge(&t(), Exposure::Canary, &w);
        assert_eq!(verdict(&checks), Verdict::Failed);
        let failed = checks
            .iter()
            .find(|c| c.verdict == Verdict::Failed)
            .expect("a figure");
        assert_eq!(failed.kind, CheckKind::ErrorRate);
        assert!((failed.observed.expect("a figure") - 10.0 / 105.0).abs() < 1e-9);
        assert!(failed.message.contains("10 of 105"), "{}", failed.message);
    }

    #[test]
    fn too_few_observations_are_inconclusive_never_successful() {
        let mut w = Counters::default();
        w.canary.answered = 19.0;
        let checks = judge(&t(), Exposure::Canary, &w);
        assert!(checks.iter().all(|c| c.verdict == Verdict::Inconclusive));
        assert_eq!(verdict(&checks), Verdict::Inconclusive);
        assert!(checks[0].message.contains("fewer than minSamples 20"));
    }

    #[test]
    fn a_shadow_is_judged_on_overlap_and_drift_only() {
        let mut w = Counters::default();
        // 40 comparisons with overlap 0.3 on average.
        w.shadow.overlap = Histogram::new(vec![(0.3, 40.0), (f64::INFINITY, 40.0)], 12.0);
        w.shadow.stable_scores = latency(&[0.0, 50.0, 50.0, 0.0, 0.0]);
        w.shadow.shadow_scores = latency(&[0.0, 0.0, 10.0, 90.0, 0.0]);
        w.canary.errors = 1_000.0;
        let checks = judge(&t(), Exposure::Shadow, &w);
        assert_eq!(
            checks
                .iter()
                .map(|c| (c.kind, c.verdict))
                .collect::<Vec<_>>(),
            [
                (CheckKind::ScoreDrift, Verdict::Failed),
                (CheckKind::TopKOverlap, Verdict::Failed)
            ]
        );
        assert!((checks[1].observed.expect("a figure") - 0.3).abs() < 1e-9);
    }
}
