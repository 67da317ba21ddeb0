//! Statistics shared by the rollout analysis and the data-quality checks.

/// Share given to an empty bin when comparing distributions, so that a bin one side never
/// uses counts as a large but finite shift rather than an infinite one (the convention of
/// Evidently and most PSI write-ups).
pub const EMPTY_BIN_SHARE: f64 = 1e-4;

/// Population stability index of `actual` against `expected`, both counts over the same bins:
/// Σ (aᵢ − eᵢ) · ln(aᵢ / eᵢ) over the bins' shares, an empty bin counting as
/// [`EMPTY_BIN_SHARE`]. `None` when either side is empty or the bins differ in number.
///
/// Read it as: below 0.1 no real shift, 0.1–0.25 a moderate one, above 0.25 a large one.
pub fn psi(expected: &[f64], actual: &[f64]) -> Option<f64> {
    if expected.len() != actual.len() || expected.is_empty() {
        return None;
    }
    let (te, ta): (f64, f64) = (expected.iter().sum(), actual.iter().sum());
    if te <= 0.0 || ta <= 0.0 {
        return None;
    }
    let share = |count: f64, total: f64| (count.max(0.0) / total).max(EMPTY_BIN_SHARE);
    Some(
        expected
            .iter()
            .zip(actual)
            .map(|(&e, &a)| {
                let (e, a) = (share(e, te), share(a, ta));
                (a - e) * (a / e).ln()
            })
            .sum(),
    )
}

/// A two-proportion z-test of `b` against `a` (successes over trials on each side).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProportionTest {
    /// Success rate of `a`.
    pub rate_a: f64,
    /// Success rate of `b`.
    pub rate_b: f64,
    /// Relative change of `b` against `a` (`rate_b / rate_a − 1`); `None` when `a` is 0.
    pub lift: Option<f64>,
    /// The z statistic, with the pooled standard error.
    pub z: f64,
    /// Two-sided p-value.
    pub p_value: f64,
}

/// The two-proportion z-test of `xb` successes in `nb` trials against `xa` in `na`, pooled
/// under the null hypothesis of equal rates. `None` without trials on a side or without any
/// variation (no success or no failure at all).
pub fn two_proportion_test(xa: f64, na: f64, xb: f64, nb: f64) -> Option<ProportionTest> {
    if na <= 0.0 || nb <= 0.0 || xa < 0.0 || xb < 0.0 || xa > na || xb > nb {
        return None;
    }
    let (ra, rb) = (xa / na, xb / nb);
    let pooled = (xa + xb) / (na + nb);
    let se = (pooled * (1.0 - pooled) * (1.0 / na + 1.0 / nb)).sqrt();
    if se <= 0.0 || !se.is_finite() {
        return None;
    }
    let z = (rb - ra) / se;
    Some(ProportionTest {
        rate_a: ra,
        rate_b: rb,
        lift: (ra > 0.0).then(|| rb / ra - 1.0),
        z,
        p_value: two_sided_p(z),
    })
}

/// Two-sided p-value of a standard normal statistic.
pub fn two_sided_p(z: f64) -> f64 {
    use statrs::distribution::{ContinuousCDF as _, Normal};
    let normal = Normal::standard();
    (2.0 * normal.sf(z.abs())).clamp(0.0, 1.0)
}

/// The p-value of a sample-ratio-mismatch check: Pearson's χ² goodness of fit of `observed`
/// counts against `expected_shares` (which need not sum to 1), with one degree of freedom
/// fewer than the groups. A tiny p-value (below 0.001, the usual alarm) says the split is not
/// what the assignment promised: a bug in routing, logging or attribution, and any difference
/// between the groups is suspect. `None` without counts or with a group expected to be empty.
pub fn sample_ratio_p(observed: &[f64], expected_shares: &[f64]) -> Option<f64> {
    use statrs::distribution::{ChiSquared, ContinuousCDF as _};
    if observed.len() != expected_shares.len() || observed.len() < 2 {
        return None;
    }
    let total: f64 = observed.iter().sum();
    let shares: f64 = expected_shares.iter().sum();
    if total <= 0.0 || shares <= 0.0 || expected_shares.iter().any(|s| *s <= 0.0) {
        return None;
    }
    let chi2: f64 = observed
        .iter()
        .zip(expected_shares)
        .map(|(&o, &s)| {
            let e = total * s / shares;
            (o - e).powi(2) / e
        })
        .sum();
    let dist = ChiSquared::new((observed.len() - 1) as f64).ok()?;
    Some(dist.sf(chi2).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_is_zero_for_the_same_shares_and_grows_with_the_shift() {
        let base = [10.0, 20.0, 30.0, 40.0];
        assert!(
            psi(&base, &[20.0, 40.0, 60.0, 80.0])
                .expect("a figure")
                .abs()
                < 1e-12
        );
        let small = psi(&base, &[12.0, 20.0, 30.0, 38.0]).expect("a figure");
        let large = psi(&base, &[40.0, 30.0, 20.0, 10.0]).expect("a figure");
        assert!(small > 0.0 && small < 0.1, "{small}");
        assert!(large > 0.25, "{large}");
    }

    #[test]
    fn psi_with_an_empty_bin_is_finite_and_large() {
        let p = psi(&[50.0, 50.0, 0.0], &[0.0, 50.0, 50.0]).expect("a figure");
        assert!(p.is_finite() && p > 1.0, "{p}");
    }

    #[test]
    fn psi_needs_counts_on_both_sides_over_the_same_bins() {
        assert_eq!(psi(&[0.0, 0.0], &[1.0, 2.0]), None);
        assert_eq!(psi(&[1.0], &[1.0, 2.0]), None);
        assert_eq!(psi(&[], &[]), None);
    }

    #[test]
    fn the_two_proportion_test_matches_a_hand_computation() {
        // 100/1000 against 130/1000: pooled 0.115, se 0.014267, z 2.1027, p 0.0355.
        let t = two_proportion_test(100.0, 1000.0, 130.0, 1000.0).expect("a test");
        assert!((t.z - 2.1027).abs() < 1e-3, "{t:?}");
        assert!((t.p_value - 0.0355).abs() < 5e-4, "{t:?}");
        assert!((t.lift.expect("lift") - 0.3).abs() < 1e-12);
        // The same rates: nothing to see.
        let same = two_proportion_test(50.0, 500.0, 100.0, 1000.0).expect("a test");
        assert!(same.z.abs() < 1e-12 && (same.p_value - 1.0).abs() < 1e-12);
        assert_eq!(two_proportion_test(0.0, 100.0, 0.0, 100.0), None);
        assert_eq!(two_proportion_test(1.0, 0.0, 1.0, 10.0), None);
    }

    #[test]
    fn a_skewed_split_trips_the_sample_ratio_check_and_a_fair_one_does_not() {
        // 5000 against 5200 on a 50/50 split: χ² 3.92, p 0.048 (not an SRM alarm at 0.001).
        let p = sample_ratio_p(&[5000.0, 5200.0], &[50.0, 50.0]).expect("p");
        assert!((p - 0.0477).abs() < 5e-4, "{p}");
        // A 90/10 split that came out 85/15 over 10,000 users.
        let skewed = sample_ratio_p(&[8500.0, 1500.0], &[90.0, 10.0]).expect("p");
        assert!(skewed < 1e-6, "{skewed}");
        assert_eq!(sample_ratio_p(&[10.0, 0.0], &[100.0, 0.0]), None);
        assert!((two_sided_p(1.959_964) - 0.05).abs() < 1e-6);
    }
}
