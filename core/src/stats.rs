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
}
