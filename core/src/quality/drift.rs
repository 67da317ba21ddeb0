//! Feature drift: a feature's current values against a reference sample of its own past.
//!
//! - Numeric values (`float`, `int`; a `floatVector` by its Euclidean norm):
//!   - **PSI** over the reference's deciles: bin edges are the reference's 10-quantiles (ties
//!     merged, so a feature with few distinct values gets fewer bins), values below the first
//!     edge fall in the first bin and above the last in the last; an empty bin counts as a
//!     share of [`crate::stats::EMPTY_BIN_SHARE`] (Evidently's convention), so a bin that only
//!     one side uses is a large, finite shift;
//!   - **KS**: the largest distance between the two empirical distribution functions.
//! - Categorical values (`string`): the **Jensen–Shannon distance** (base 2, in `[0, 1]`)
//!   between the two category distributions.

use std::collections::BTreeMap;

use crate::features::FeatureValue;
use crate::stats::psi as psi_of_counts;

/// Number of reference quantile bins of the PSI.
pub const PSI_BINS: usize = 10;

/// PSI of `current` against `reference` over the reference's deciles; `None` when a side is
/// empty.
pub fn psi(reference: &[f64], current: &[f64]) -> Option<f64> {
    if reference.is_empty() || current.is_empty() {
        return None;
    }
    let mut sorted = reference.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    // Inner edges: the 1st … 9th deciles, deduplicated. Bin i holds values ≤ edge i (and
    // above edge i − 1); the last bin holds values above every edge.
    let mut edges: Vec<f64> = (1..PSI_BINS)
        .map(|i| sorted[(i * sorted.len() / PSI_BINS).min(sorted.len() - 1)])
        .collect();
    edges.dedup();
    let bin = |v: f64| edges.partition_point(|e| *e < v);
    let counts = |values: &[f64]| {
        let mut c = vec![0.0; edges.len() + 1];
        for &v in values {
            c[bin(v)] += 1.0;
        }
        c
    };
    psi_of_counts(&counts(reference), &counts(current))
}

/// Two-sample Kolmogorov–Smirnov statistic; `None` when a side is empty.
pub fn ks(reference: &[f64], current: &[f64]) -> Option<f64> {
    if reference.is_empty() || current.is_empty() {
        return None;
    }
    let mut a = reference.to_vec();
    let mut b = current.to_vec();
    a.sort_by(|x, y| x.total_cmp(y));
    b.sort_by(|x, y| x.total_cmp(y));
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0, 0, 0.0_f64);
    while i < a.len() && j < b.len() {
        let v = a[i].min(b[j]);
        while i < a.len() && a[i] <= v {
            i += 1;
        }
        while j < b.len() && b[j] <= v {
            j += 1;
        }
        d = d.max((i as f64 / na - j as f64 / nb).abs());
    }
    Some(d)
}

/// Jensen–Shannon distance (square root of the divergence, base 2) between two category
/// samples; `None` when a side is empty.
pub fn jensen_shannon(reference: &[String], current: &[String]) -> Option<f64> {
    if reference.is_empty() || current.is_empty() {
        return None;
    }
    let mut shares: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for r in reference {
        shares.entry(r).or_default().0 += 1.0 / reference.len() as f64;
    }
    for c in current {
        shares.entry(c).or_default().1 += 1.0 / current.len() as f64;
    }
    let kl_to_mid = |p: f64, m: f64| if p > 0.0 { p * (p / m).log2() } else { 0.0 };
    let js: f64 = shares
        .values()
        .map(|&(p, q)| {
            let m = (p + q) / 2.0;
            0.5 * kl_to_mid(p, m) + 0.5 * kl_to_mid(q, m)
        })
        .sum();
    Some(js.clamp(0.0, 1.0).sqrt())
}

/// Values of one feature, split by how they are compared.
#[derive(Clone, Debug, PartialEq)]
pub enum Sample {
    /// Numbers (a vector's norm).
    Numeric(Vec<f64>),
    /// Categories.
    Categorical(Vec<String>),
}

impl Sample {
    /// The sample of `values`, numeric unless they are strings.
    pub fn of<'a>(values: impl IntoIterator<Item = &'a FeatureValue>) -> Self {
        let mut nums = vec![];
        let mut cats = vec![];
        for v in values {
            match v {
                FeatureValue::Float(f) => nums.push(*f),
                FeatureValue::Int(i) => nums.push(*i as f64),
                FeatureValue::FloatVector(x) => {
                    nums.push(x.iter().map(|f| f64::from(*f).powi(2)).sum::<f64>().sqrt())
                }
                FeatureValue::String(s) => cats.push(s.clone()),
            }
        }
        if cats.len() > nums.len() {
            Self::Categorical(cats)
        } else {
            Self::Numeric(nums.into_iter().filter(|f| f.is_finite()).collect())
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::Numeric(v) => v.len(),
            Self::Categorical(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A drift statistic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Statistic {
    /// Population stability index.
    Psi,
    /// Kolmogorov–Smirnov statistic.
    Ks,
    /// Jensen–Shannon distance.
    JensenShannon,
}

impl Statistic {
    /// Name in check names and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Psi => "psi",
            Self::Ks => "ks",
            Self::JensenShannon => "jensen_shannon",
        }
    }

    /// The statistic of `current` against `reference`, when it applies to their kind.
    pub fn compute(self, reference: &Sample, current: &Sample) -> Option<f64> {
        match (self, reference, current) {
            (Self::Psi, Sample::Numeric(r), Sample::Numeric(c)) => psi(r, c),
            (Self::Ks, Sample::Numeric(r), Sample::Numeric(c)) => ks(r, c),
            (Self::JensenShannon, Sample::Categorical(r), Sample::Categorical(c)) => {
                jensen_shannon(r, c)
            }
            _ => None,
        }
    }
}

/// Judges `current` against `reference` with every threshold `thresholds` sets, one result per
/// statistic (`drift.psi`, `drift.ks`, `drift.jensen_shannon`) on `target`.
pub fn judge(
    target: &str,
    thresholds: &crate::features::registry::DriftThresholds,
    reference: &Sample,
    current: &Sample,
    min_values: usize,
    blocking: bool,
) -> Vec<super::CheckResult> {
    let mut out = vec![];
    for (stat, limit) in [
        (Statistic::Psi, thresholds.psi),
        (Statistic::Ks, thresholds.ks),
        (Statistic::JensenShannon, thresholds.jensen_shannon),
    ] {
        let Some(limit) = limit else { continue };
        let mut r = super::CheckResult::new(
            format!("drift.{}", stat.as_str()),
            super::CheckType::Drift,
            target,
        );
        r.blocking = blocking;
        out.push(if reference.is_empty() {
            r.skipped("no reference values yet: the feature has no earlier materialization in the reference window")
        } else if current.is_empty() {
            r.skipped("no current values")
        } else if current.len().min(reference.len()) < min_values {
            // A distance between a dozen values is noise, whatever its size.
            r.skipped(format!(
                "too few values to judge: {} current and {} reference, at least {min_values} each (--drift-min-values)",
                current.len(),
                reference.len()
            ))
        } else {
            match stat.compute(reference, current) {
                None => r.skipped(format!(
                    "{} does not apply to {} values",
                    stat.as_str(),
                    match current {
                        Sample::Numeric(_) => "numeric",
                        Sample::Categorical(_) => "categorical",
                    }
                )),
                Some(v) => r.figures(v, limit).judged(
                    v > limit,
                    format!(
                        "{} {v:.4} of {} current values against {} reference values (at most {limit})",
                        stat.as_str(),
                        current.len(),
                        reference.len()
                    ),
                ),
            }
        });
    }
    out
}

/// The check target of a feature version.
pub fn target(feature: &crate::features::FeatureRef) -> String {
    format!("feature:{feature}")
}

/// Most earlier materializations pooled into a reference sample.
pub const MAX_REFERENCE_RUNS: usize = 7;

/// A feature version's values at its materialization `at_ms` (rows of that event time only).
pub async fn values_at(
    offline: &dyn crate::features::offline::OfflineStore,
    feature: &crate::features::FeatureRef,
    kind: crate::features::EntityKind,
    at_ms: i64,
) -> Result<Vec<FeatureValue>, crate::features::offline::OfflineError> {
    let options = crate::features::offline::PitOptions {
        max_age_ms: Some(0),
        ..Default::default()
    };
    Ok(offline
        .snapshot(feature, kind, at_ms, &options)
        .await?
        .into_iter()
        .map(|(_, v)| v.value)
        .collect())
}

/// The times (ms) of a feature version's materializations, newest first, as the registry
/// records them.
pub async fn materialization_times(
    registry: &dyn crate::features::registry::FeatureRegistry,
    feature: &crate::features::FeatureRef,
) -> Result<Vec<i64>, super::DriftError> {
    Ok(registry
        .materializations(feature, 1000)
        .await?
        .into_iter()
        .map(|m| m.at_ms)
        .collect())
}

/// The reference sample of a feature version before `before_ms`: the values of up to
/// [`MAX_REFERENCE_RUNS`] of its materializations (`times`, from [`materialization_times`]) in
/// `[before_ms − window_ms, before_ms)`, spread over the window, pooled.
pub async fn reference(
    offline: &dyn crate::features::offline::OfflineStore,
    feature: &crate::features::FeatureRef,
    kind: crate::features::EntityKind,
    times: &[i64],
    before_ms: i64,
    window_ms: i64,
) -> Result<Sample, super::DriftError> {
    let runs: Vec<i64> = times
        .iter()
        .copied()
        .filter(|at| *at < before_ms && *at >= before_ms - window_ms)
        .collect();
    let step = runs.len().div_ceil(MAX_REFERENCE_RUNS).max(1);
    let mut values = vec![];
    for at in runs.into_iter().step_by(step) {
        values.extend(values_at(offline, feature, kind, at).await?);
    }
    Ok(Sample::of(&values))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(n: usize, mean: f64, sd: f64) -> Vec<f64> {
        // Deterministic quantiles of a normal distribution.
        use statrs::distribution::{ContinuousCDF, Normal};
        let d = Normal::new(mean, sd).expect("normal");
        (0..n)
            .map(|i| d.inverse_cdf((i as f64 + 0.5) / n as f64))
            .collect()
    }

    #[test]
    fn psi_is_zero_for_the_same_distribution_and_grows_with_a_shift() {
        let r = normal(5000, 0.0, 1.0);
        assert!(psi(&r, &normal(3000, 0.0, 1.0)).expect("psi") < 0.01);
        let small = psi(&r, &normal(3000, 0.1, 1.0)).expect("psi");
        let large = psi(&r, &normal(3000, 1.0, 1.0)).expect("psi");
        assert!(
            small < 0.1 && large > 0.25 && large > small,
            "{small} {large}"
        );
        assert_eq!(psi(&[], &r), None);
    }

    #[test]
    fn psi_handles_empty_bins_and_few_distinct_values() {
        // Reference all 1.0: one edge; the current sample entirely above it is a large shift.
        let r = vec![1.0; 100];
        let p = psi(&r, &[2.0; 50]).expect("psi");
        assert!(p.is_finite() && p > 1.0, "{p}");
        assert!(psi(&r, &r).expect("psi").abs() < 1e-12);
        // Values outside the reference's range fall in the outer bins, finitely.
        let p = psi(&normal(1000, 0.0, 1.0), &[100.0; 10]).expect("psi");
        assert!(p.is_finite() && p > 1.0);
    }

    #[test]
    fn ks_and_jensen_shannon_match_hand_figures() {
        assert_eq!(ks(&[1.0, 2.0, 3.0, 4.0], &[1.0, 2.0, 3.0, 4.0]), Some(0.0));
        assert_eq!(ks(&[1.0, 2.0], &[3.0, 4.0]), Some(1.0));
        assert_eq!(ks(&[1.0, 2.0, 3.0, 4.0], &[3.0, 4.0]), Some(0.5));
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(jensen_shannon(&s(&["a", "b"]), &s(&["b", "a"])), Some(0.0));
        assert_eq!(jensen_shannon(&s(&["a"]), &s(&["b"])), Some(1.0));
        let half = jensen_shannon(&s(&["a", "a"]), &s(&["a", "b"])).expect("js");
        // JS divergence of (1,0) and (½,½) is 0.311 bits.
        assert!((half * half - 0.3113).abs() < 1e-3, "{half}");
    }

    #[test]
    fn samples_take_their_kind_from_the_values() {
        let v = [
            FeatureValue::Float(1.0),
            FeatureValue::Int(2),
            FeatureValue::FloatVector(vec![3.0, 4.0]),
        ];
        assert_eq!(Sample::of(&v), Sample::Numeric(vec![1.0, 2.0, 5.0]));
        let c = [FeatureValue::String("x".into())];
        assert_eq!(Sample::of(&c), Sample::Categorical(vec!["x".into()]));
        assert_eq!(
            Statistic::Psi.compute(&Sample::of(&c), &Sample::of(&c)),
            None
        );
    }
}
