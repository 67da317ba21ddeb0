//! Volume anomalies: hourly event counts against a seasonal baseline.
//!
//! Event volume in a shop follows the hour of the day and the day of the week: Monday 09:00
//! is busier than Sunday 04:00, every week. A fixed threshold or a comparison with the hour
//! before flags every morning; this detector compares each hour with the same hour of the
//! week in the weeks before it.
//!
//! For an hour `t` with count `x`:
//! 1. **Expected count `e`**: the median of the counts at `t − 7 d`, `t − 14 d`, … (up to
//!    [`VolumeConfig::weeks`] weeks back, at least two available). With less than two weeks of
//!    history, the median of the same hour of the day over the previous seven days
//!    (`t − 1 d`, …, `t − 7 d`, at least three available); with less, the hour is not judged.
//!    A median, not a mean, so that one earlier anomaly does not move the baseline.
//! 2. **Noise `σ`**: counts are at least Poisson-distributed, and real traffic is noisier. The
//!    history's own hours are standardised with Anscombe's variance-stabilising transform,
//!    `r = 2(√(x + 3/8) − √(e + 3/8))` (about standard normal for Poisson counts, small ones
//!    included), and `σ` is 1.4826 × the median absolute deviation of those residuals (a
//!    robust standard deviation), never below 1 (pure Poisson noise).
//! 3. **Score** `z = 2(√(x + 3/8) − √(e + 3/8)) / σ`. A span is anomalous when all hold:
//!    - `|z| ≥ z_threshold` (default 3.5): unlikely under the history's own noise;
//!    - `x / e ≥ spike_ratio` (default 2) for a spike, or `x / e ≤ drop_ratio` (default 0.5)
//!      for a drop: large enough to matter, whatever the noise;
//!    - `e ≥ min_expected` (default 10 events): quiet hours are not judged, since a drop from
//!      3 to 1 says little.
//!
//! Judged spans: each of the last [`VolumeConfig::hours`] complete hours; the current hour
//! once [`VolumeConfig::min_partial_minutes`] of it have passed, its expectation scaled by the
//! part elapsed; and the trailing windows ending now (the last 1, 2, … `hours` complete hours
//! with the current hour's elapsed part), so that a sustained change in a quiet series (an 80%
//! drop of 20 purchases an hour) stands out over an hour and a half where one hour is within
//! the noise. The detector is run on the total and on each event type, so that a drop of
//! purchases is seen although views hide it in the total.

use std::collections::BTreeMap;

/// One hour in milliseconds.
pub const HOUR_MS: i64 = 3_600_000;
const WEEK_HOURS: i64 = 7 * 24;

/// Parameters of the detector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VolumeConfig {
    /// Weeks of history the baseline is taken from.
    pub weeks: usize,
    /// Complete hours judged before the current one.
    pub hours: usize,
    /// Least |z| of an anomaly.
    pub z_threshold: f64,
    /// Least `observed / expected` of a spike.
    pub spike_ratio: f64,
    /// Largest `observed / expected` of a drop.
    pub drop_ratio: f64,
    /// Least expected count of a judged hour.
    pub min_expected: f64,
    /// Minutes of the current hour that must have passed for it to be judged.
    pub min_partial_minutes: u32,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            weeks: 4,
            hours: 3,
            z_threshold: 3.5,
            spike_ratio: 2.0,
            drop_ratio: 0.5,
            min_expected: 10.0,
            min_partial_minutes: 20,
        }
    }
}

/// The judgement of one hour.
#[derive(Clone, Debug, PartialEq)]
pub struct HourJudgement {
    /// Start of the judged span (an hour, the current hour's elapsed part, or a trailing
    /// window ending now), ms since the epoch.
    pub hour_ms: i64,
    /// Length of the span in hours.
    pub hours: f64,
    /// Events counted (in the elapsed part of the current hour).
    pub observed: f64,
    /// Expected count (scaled to the elapsed part).
    pub expected: f64,
    /// The score.
    pub z: f64,
    /// Whether it is a spike, a drop, or neither.
    pub anomaly: Option<Anomaly>,
}

impl HourJudgement {
    /// `observed / expected`.
    pub fn ratio(&self) -> f64 {
        self.observed / self.expected
    }
}

/// Direction of an anomaly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anomaly {
    /// Far more events than expected.
    Spike,
    /// Far fewer events than expected.
    Drop,
}

impl Anomaly {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spike => "spike",
            Self::Drop => "drop",
        }
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Counts per hour (keyed by the hour's index, `ms / HOUR_MS`), with hours absent counting as
/// zero between `first` and the hour judged.
struct Series<'a> {
    counts: &'a BTreeMap<i64, f64>,
    first: i64,
}

impl Series<'_> {
    fn at(&self, hour: i64) -> Option<f64> {
        (hour >= self.first).then(|| self.counts.get(&hour).copied().unwrap_or(0.0))
    }

    /// The seasonal expectation of `hour`: same hour of the week, else of the day.
    fn expected(&self, hour: i64, cfg: &VolumeConfig) -> Option<f64> {
        let mut weekly: Vec<f64> = (1..=cfg.weeks as i64)
            .filter_map(|k| self.at(hour - k * WEEK_HOURS))
            .collect();
        if weekly.len() >= 2 {
            return median(&mut weekly);
        }
        let mut daily: Vec<f64> = (1..=7).filter_map(|k| self.at(hour - k * 24)).collect();
        if daily.len() >= 3 {
            return median(&mut daily);
        }
        None
    }
}

/// Judges the hours before `now_ms` (see the module documentation). `counts` maps an hour's
/// index (`ms / HOUR_MS`) to its events; `history_from_ms` is where the data starts (hours
/// before it are unknown, not zero).
pub fn judge(
    counts: &BTreeMap<i64, f64>,
    history_from_ms: i64,
    now_ms: i64,
    cfg: &VolumeConfig,
) -> Vec<HourJudgement> {
    let series = Series {
        counts,
        first: history_from_ms.div_euclid(HOUR_MS)
            + i64::from(history_from_ms.rem_euclid(HOUR_MS) != 0),
    };
    let current = now_ms.div_euclid(HOUR_MS);
    let elapsed = (now_ms.rem_euclid(HOUR_MS)) as f64 / HOUR_MS as f64;
    // The noise of the history: residuals of every hour before the judged ones that has an
    // expectation of its own.
    let judged_from = current - cfg.hours as i64;
    let mut residuals: Vec<f64> = (series.first..judged_from)
        .filter_map(|h| {
            let e = series.expected(h, cfg)?;
            (e >= cfg.min_expected).then(|| anscombe(series.at(h).unwrap_or(0.0), e))
        })
        .collect();
    let sigma = median(&mut residuals)
        .map(|m| {
            let mut dev: Vec<f64> = residuals.iter().map(|r| (r - m).abs()).collect();
            1.4826 * median(&mut dev).unwrap_or(0.0)
        })
        .unwrap_or(1.0)
        .max(1.0);
    let judge_span = |from: i64, spans: &[(i64, f64)]| -> Option<HourJudgement> {
        let mut e = 0.0;
        let mut x = 0.0;
        let mut length = 0.0;
        for &(h, part) in spans {
            if h < series.first {
                return None;
            }
            e += series.expected(h, cfg)? * part;
            x += series.at(h).unwrap_or(0.0);
            length += part;
        }
        if length <= 0.0 || e < cfg.min_expected * length || e <= 0.0 {
            return None;
        }
        let z = anscombe(x, e) / sigma;
        let ratio = x / e;
        let anomaly = if z.abs() < cfg.z_threshold {
            None
        } else if z > 0.0 && ratio >= cfg.spike_ratio {
            Some(Anomaly::Spike)
        } else if z < 0.0 && ratio <= cfg.drop_ratio {
            Some(Anomaly::Drop)
        } else {
            None
        };
        Some(HourJudgement {
            hour_ms: from * HOUR_MS,
            hours: length,
            observed: x,
            expected: e,
            z,
            anomaly,
        })
    };
    let partial = elapsed * 60.0 >= f64::from(cfg.min_partial_minutes);
    let mut out: Vec<HourJudgement> = (judged_from..current)
        .filter_map(|h| judge_span(h, &[(h, 1.0)]))
        .collect();
    if partial {
        out.extend(judge_span(current, &[(current, elapsed)]));
    }
    // Trailing windows ending now: a sustained change in a quiet series (80% fewer of 20
    // purchases an hour) stands out over 1.5 hours where one hour is within the noise.
    for k in 1..=cfg.hours as i64 {
        let mut spans: Vec<(i64, f64)> = (current - k..current).map(|h| (h, 1.0)).collect();
        if elapsed > 0.0 {
            spans.push((current, elapsed));
        }
        if spans.len() > 1 {
            out.extend(judge_span(current - k, &spans));
        }
    }
    out
}

/// The variance-stabilised difference of a count `x` from its expectation `e` (Anscombe's
/// transform of Poisson counts): about standard normal under Poisson noise, at small counts
/// too, where `(x − e) / √e` is not.
fn anscombe(x: f64, e: f64) -> f64 {
    2.0 * ((x + 0.375).sqrt() - (e + 0.375).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A week-periodic profile: busy weekday daytime, quiet nights, busier weekends.
    fn profile(hour: i64) -> f64 {
        let hod = hour.rem_euclid(24);
        let dow = hour.div_euclid(24).rem_euclid(7);
        let day = if (8..22).contains(&hod) { 100.0 } else { 15.0 };
        if dow >= 5 { day * 1.6 } else { day }
    }

    fn weeks(n: i64, f: impl Fn(i64) -> f64) -> BTreeMap<i64, f64> {
        (0..n * WEEK_HOURS).map(|h| (h, f(h))).collect()
    }

    #[test]
    fn a_busy_morning_after_a_quiet_night_is_not_an_anomaly() {
        let counts = weeks(4, profile);
        // Judge Monday 10:00 of week 4 (hour 3·168 + 10): the night before had 15 an hour.
        let now = (3 * WEEK_HOURS + 11) * HOUR_MS;
        let j = judge(&counts, 0, now, &VolumeConfig::default());
        assert!(!j.is_empty());
        assert!(j.iter().all(|h| h.anomaly.is_none()), "{j:?}");
    }

    #[test]
    fn spikes_and_drops_are_found_with_their_figures() {
        let at = 3 * WEEK_HOURS + 12;
        let mut spike = weeks(4, profile);
        *spike.get_mut(&(at - 1)).expect("hour") *= 5.0;
        let j = judge(&spike, 0, at * HOUR_MS, &VolumeConfig::default());
        let hit = j.iter().find(|h| h.anomaly.is_some()).expect("spike found");
        assert_eq!(
            (hit.anomaly, hit.hour_ms, hit.observed, hit.expected),
            (Some(Anomaly::Spike), (at - 1) * HOUR_MS, 500.0, 100.0)
        );
        let mut drop = weeks(4, profile);
        *drop.get_mut(&(at - 2)).expect("hour") *= 0.2;
        let j = judge(&drop, 0, at * HOUR_MS, &VolumeConfig::default());
        assert_eq!(
            j.iter().filter_map(|h| h.anomaly).collect::<Vec<_>>(),
            [Anomaly::Drop]
        );
    }

    #[test]
    fn a_partial_hour_is_judged_on_its_share_and_quiet_hours_not_at_all() {
        let at = 3 * WEEK_HOURS + 12;
        let mut counts = weeks(4, profile);
        // 30 minutes into the hour with nothing yet: expected 50, seen 0.
        counts.insert(at, 0.0);
        let j = judge(
            &counts,
            0,
            at * HOUR_MS + HOUR_MS / 2,
            &VolumeConfig::default(),
        );
        let last = j
            .iter()
            .find(|h| h.hour_ms == at * HOUR_MS)
            .expect("current hour judged");
        assert_eq!((last.hours, last.expected), (0.5, 50.0));
        assert_eq!(last.anomaly, Some(Anomaly::Drop));
        // 03:00 expects 15; with min_expected 20 it is not judged.
        let night = 3 * WEEK_HOURS + 4;
        let cfg = VolumeConfig {
            min_expected: 20.0,
            ..VolumeConfig::default()
        };
        let mut c = weeks(4, profile);
        *c.get_mut(&(night - 1)).expect("hour") = 0.0;
        assert!(
            judge(&c, 0, night * HOUR_MS, &cfg)
                .iter()
                .all(|h| h.hour_ms != (night - 1) * HOUR_MS)
        );
    }

    #[test]
    fn without_enough_history_nothing_is_judged() {
        let counts = weeks(1, profile);
        let j = judge(&counts, 0, 2 * 24 * HOUR_MS, &VolumeConfig::default());
        assert!(j.is_empty(), "{j:?}");
    }

    #[test]
    fn noisy_history_widens_the_band() {
        // ±60% noise that does not repeat weekly: a 2.2× hour is within it, a 6× one is not.
        let noisy = |h: i64| (profile(h) * (1.0 + 0.6 * (h as f64 * 1.7).sin())).round();
        let at = 3 * WEEK_HOURS + 13;
        let mut c = weeks(4, noisy);
        let base = {
            let mut b = weeks(4, noisy);
            b.insert(at - 1, 0.0);
            judge(&b, 0, at * HOUR_MS, &VolumeConfig::default())
                .iter()
                .find(|h| h.hour_ms == (at - 1) * HOUR_MS)
                .expect("judged")
                .expected
        };
        c.insert(at - 1, (base * 2.2).round());
        let j = judge(&c, 0, at * HOUR_MS, &VolumeConfig::default());
        assert!(j.iter().all(|h| h.anomaly.is_none()), "{j:?}");
        c.insert(at - 1, (base * 6.0).round());
        let j = judge(&c, 0, at * HOUR_MS, &VolumeConfig::default());
        assert!(j.iter().any(|h| h.anomaly == Some(Anomaly::Spike)), "{j:?}");
        // The same 2.2× hour over quiet, Poisson-like history is a spike.
        let mut quiet = weeks(4, profile);
        quiet.insert(at - 1, 220.0);
        let j = judge(&quiet, 0, at * HOUR_MS, &VolumeConfig::default());
        assert!(j.iter().any(|h| h.anomaly == Some(Anomaly::Spike)), "{j:?}");
    }
}
