//! The A/B readout of a rollout, read from the scorers: while a candidate exists, one ready
//! scorer pod's `GET /v1/experiments?model=` (every pod shares the counts through Redis) gives
//! the candidate's segments; they go into `status.experiment` and the
//! `model_deployment_experiment_*` gauges. The readout informs people; it does not move the
//! rollout (the live analysis does), but a sample-ratio mismatch is announced with a Warning
//! Event, because it means the split is not the one routing promised.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use recsys_core::serving::experiment::{Comparison, ExperimentsAnswer, Readout};
use recsys_crds::model_deployment::{
    ExperimentComparison, ExperimentSampleRatio, ExperimentSegment, ExperimentStatus,
    ExperimentVariant,
};
use tracing::debug;

use super::fleet::{self, Endpoint};
use crate::metrics::{ExperimentTestLabels, ExperimentVariantLabels, Metrics};

/// Segments kept in status.
pub const MAX_SEGMENTS: usize = 10;

fn time_ms(ms: i64) -> Time {
    Time(Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn comparison(c: &Comparison) -> ExperimentComparison {
    ExperimentComparison {
        lift: c.lift,
        z: c.z,
        p_value: c.p_value,
        significant: c.significant,
    }
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn segment(r: &Readout) -> ExperimentSegment {
    ExperimentSegment {
        canary_weight: i32::from(r.canary_weight),
        since: time_ms(r.since_ms),
        variants: r
            .variants
            .iter()
            .map(|v| ExperimentVariant {
                variant: v.variant.clone(),
                version: v.version.clone(),
                users: count(v.users),
                impressions: count(v.impressions),
                clicks: count(v.clicks),
                add_to_carts: count(v.add_to_carts),
                purchases: count(v.purchases),
                ctr: v.ctr,
                conversion: v.conversion,
            })
            .collect(),
        ctr: r.ctr.as_ref().map(comparison),
        conversion: r.conversion.as_ref().map(comparison),
        sample_ratio: r.sample_ratio.as_ref().map(|s| ExperimentSampleRatio {
            expected_canary_share: s.expected_canary_share,
            observed_canary_share: s.observed_canary_share,
            p_value: s.p_value,
            mismatch: s.mismatch,
        }),
        summary: r.summary.clone(),
    }
}

/// The status of `candidate` against `stable` from a scorer's answer: its segments of that
/// pair, newest first; `None` when it has none yet.
pub fn status_of(
    answer: &ExperimentsAnswer,
    stable: &str,
    candidate: &str,
    now: Timestamp,
) -> Option<ExperimentStatus> {
    let segments: Vec<ExperimentSegment> = answer
        .segments
        .iter()
        .filter(|r| r.stable_version == stable && r.candidate_version == candidate)
        .take(MAX_SEGMENTS)
        .map(segment)
        .collect();
    (!segments.is_empty()).then(|| ExperimentStatus {
        read_at: Time(now),
        candidate_version: candidate.to_owned(),
        attribution_window_seconds: i64::try_from(answer.attribution_window_seconds)
            .unwrap_or(i64::MAX),
        segments,
    })
}

/// Reads the readout of `candidate` against `stable` from the first ready endpoint that
/// answers; `None` when none does or there is no readout yet (the last one in status stays).
pub async fn observe(
    endpoints: &[Endpoint],
    model: &str,
    stable: &str,
    candidate: &str,
) -> Option<ExperimentStatus> {
    let path = format!(
        "/v1/experiments?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("model", model)
            .finish()
    );
    for e in endpoints.iter().filter(|e| e.ready) {
        match fleet::get(e.address, &path).await {
            Ok(body) => match serde_json::from_slice::<ExperimentsAnswer>(&body) {
                Ok(answer) => return status_of(&answer, stable, candidate, Timestamp::now()),
                Err(err) => debug!(pod = ?e.pod, error = %err, "unreadable experiment readout"),
            },
            Err(err) => debug!(pod = ?e.pod, error = %err, "no experiment readout"),
        }
    }
    None
}

/// Sets the gauges from the newest segment.
pub fn export(metrics: &Metrics, model: &str, status: &ExperimentStatus) {
    let Some(newest) = status.segments.first() else {
        return;
    };
    for v in &newest.variants {
        for (metric, value) in [
            ("impressions", Some(v.impressions as f64)),
            ("users", Some(v.users as f64)),
            ("ctr", v.ctr),
            ("conversion", v.conversion),
        ] {
            if let Some(value) = value {
                metrics
                    .experiment_values
                    .get_or_create(&ExperimentVariantLabels {
                        model_name: model.to_owned(),
                        variant: v.variant.clone(),
                        metric,
                    })
                    .set(value);
            }
        }
    }
    for (test, p) in [
        ("ctr", newest.ctr.as_ref().map(|c| c.p_value)),
        ("conversion", newest.conversion.as_ref().map(|c| c.p_value)),
        (
            "sample_ratio",
            newest.sample_ratio.as_ref().map(|s| s.p_value),
        ),
    ] {
        if let Some(p) = p {
            metrics
                .experiment_p_values
                .get_or_create(&ExperimentTestLabels {
                    model_name: model.to_owned(),
                    test,
                })
                .set(p);
        }
    }
}

/// The newest segment's sample-ratio mismatch, if it is new since `before`: its canary weight
/// and summary.
pub fn new_mismatch(
    before: Option<&ExperimentStatus>,
    now: &ExperimentStatus,
) -> Option<(i32, String)> {
    let newest = now.segments.first()?;
    if !newest.sample_ratio.as_ref().is_some_and(|s| s.mismatch) {
        return None;
    }
    let known = before.is_some_and(|b| {
        b.candidate_version == now.candidate_version
            && b.segments.iter().any(|s| {
                s.canary_weight == newest.canary_weight
                    && s.sample_ratio.as_ref().is_some_and(|r| r.mismatch)
            })
    });
    (!known).then(|| (newest.canary_weight, newest.summary.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use recsys_core::serving::experiment::{Segment, SegmentCounts, VariantCounts, readout};

    fn answer(weights: &[(u8, u64, u64)]) -> ExperimentsAnswer {
        ExperimentsAnswer {
            model: "als".into(),
            attribution_window_seconds: 3600,
            segments: weights
                .iter()
                .map(|&(w, stable_users, canary_users)| {
                    readout(&SegmentCounts {
                        segment: Segment {
                            model: "als".into(),
                            stable: "v1".into(),
                            candidate: "v2".into(),
                            canary_weight: w,
                        },
                        since_ms: 1_000 * i64::from(w),
                        stable: VariantCounts {
                            users: stable_users,
                            impressions: stable_users * 2,
                            clicked: stable_users / 5,
                            ..VariantCounts::default()
                        },
                        canary: VariantCounts {
                            users: canary_users,
                            impressions: canary_users * 2,
                            clicked: canary_users / 5,
                            ..VariantCounts::default()
                        },
                    })
                })
                .collect(),
        }
    }

    #[test]
    fn only_the_segments_of_the_candidate_against_the_stable_version_are_kept() {
        let a = answer(&[(50, 500, 500), (10, 900, 100)]);
        let s = status_of(&a, "v1", "v2", Timestamp::UNIX_EPOCH).expect("a readout");
        assert_eq!(
            s.segments
                .iter()
                .map(|x| x.canary_weight)
                .collect::<Vec<_>>(),
            vec![50, 10]
        );
        assert_eq!(s.segments[0].variants[1].impressions, 1000);
        assert!(status_of(&a, "v1", "v3", Timestamp::UNIX_EPOCH).is_none());
        assert!(status_of(&a, "v0", "v2", Timestamp::UNIX_EPOCH).is_none());
    }

    #[test]
    fn a_sample_ratio_mismatch_is_announced_once_per_segment() {
        let fine = status_of(
            &answer(&[(50, 500, 500)]),
            "v1",
            "v2",
            Timestamp::UNIX_EPOCH,
        )
        .expect("readout");
        assert_eq!(new_mismatch(None, &fine), None);
        let skewed = status_of(
            &answer(&[(50, 700, 300)]),
            "v1",
            "v2",
            Timestamp::UNIX_EPOCH,
        )
        .expect("readout");
        let (weight, summary) = new_mismatch(Some(&fine), &skewed).expect("new");
        assert_eq!(weight, 50);
        assert!(summary.starts_with("sample ratio mismatch"), "{summary}");
        assert_eq!(new_mismatch(Some(&skewed), &skewed), None, "already known");
    }
}
