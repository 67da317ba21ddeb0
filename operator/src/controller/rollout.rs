//! The rollout of a candidate version through `spec.strategy.steps`: a pure function of the
//! spec, the status and the time, so every transition is unit-tested without a cluster.
//!
//! - `shadow {duration}`: the candidate is scored off the request path for the duration.
//! - `canary {weight, duration?}`: `weight`% of users get the candidate; without a duration the
//!   next step follows at once.
//! - `pause {duration?}`: weights held for the duration, or until the annotation
//!   `recsys.io/approve` names the step's index.
//! - `full`, or the end of the steps: the candidate becomes stable for every user.
//!
//! Analysis gates every step that leaves the candidate with more traffic than before. This
//! version of the operator has no analysis source yet, so a strategy that sets any analysis
//! threshold holds before its first traffic step rather than skip a gate
//! (`Progressing=False, reason AnalysisUnavailable`); a strategy without thresholds advances
//! on time and approvals alone.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use recsys_crds::model_deployment::AnalysisSpec;
use recsys_crds::{ModelDeployment, ModelDeploymentStatus, RolloutRecord, Stage};

/// Annotation approving a `pause {}` step without duration: its value is the step's index.
pub const APPROVE_ANNOTATION: &str = "recsys.io/approve";

/// Most rollouts kept in `status.history`.
pub const HISTORY_LIMIT: usize = 20;

/// What one look at a rollout concluded.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Reason of the `Progressing` condition.
    pub reason: &'static str,
    /// Message of the `Progressing` condition.
    pub message: String,
    /// When to look again (the end of a timed step); `None`: on the next change.
    pub requeue: Option<Duration>,
}

impl Progress {
    /// Whether a rollout is under way (`Progressing=True`): in a step, or waiting for approval.
    pub fn is_progressing(&self) -> bool {
        matches!(
            self.reason,
            "Shadow" | "Canary" | "Paused" | "AwaitingApproval"
        )
    }
}

/// Whether `analysis` sets any threshold.
pub fn has_thresholds(analysis: &AnalysisSpec) -> bool {
    analysis.max_error_rate.is_some()
        || analysis.max_p99_latency_ms.is_some()
        || analysis.max_score_drift_psi.is_some()
        || analysis.min_top_k_overlap.is_some()
        || analysis.min_offline_metric_ratio.is_some()
}

/// Moves `status` (with a stable version other than `spec.version`) through the steps as far as
/// `now` allows, and says where it stands.
pub fn advance(
    md: &ModelDeployment,
    status: &mut ModelDeploymentStatus,
    now: Timestamp,
) -> Progress {
    let candidate = md.spec.version.clone();
    let steps = &md.spec.strategy.steps;
    if status.candidate_version.as_deref() != Some(candidate.as_str()) {
        // A new candidate (or a changed one mid-rollout) starts from the first step.
        status.candidate_version = Some(candidate.clone());
        status.current_step = Some(0);
        status.step_started_at = Some(Time(now));
        status.canary_weight = 0;
        status.stage = Stage::Pending;
    }
    if status.stage == Stage::RolledBack {
        return Progress {
            reason: "RolledBack",
            message: format!(
                "{candidate} was rolled back; set spec.version to roll out another version"
            ),
            requeue: None,
        };
    }
    if md.spec.paused {
        return Progress {
            reason: "SpecPaused",
            message: format!("spec.paused holds {candidate} at step {}", step_of(status)),
            requeue: None,
        };
    }
    let gated = has_thresholds(&md.spec.strategy.analysis);
    if step_of(status) >= steps.len() && !steps.is_empty() {
        // The steps were shortened under a rollout that had not finished them (a finished one
        // is promoted and has no step): resume at the new last step, not promote unchecked.
        status.current_step = Some(steps.len() as i32 - 1);
        status.step_started_at = Some(Time(now));
    }
    loop {
        let index = step_of(status);
        let Some(step) = steps.get(index) else {
            return promote(status, &candidate, now, "the last step passed");
        };
        let started = status.step_started_at.as_ref().map_or(now, |t| t.0);
        let elapsed = now.duration_since(started).unsigned_abs();
        let hold = |reason: &'static str, message: String, left: Option<Duration>| Progress {
            reason,
            message,
            requeue: left,
        };
        if let Some(shadow) = &step.shadow {
            status.stage = Stage::Shadow;
            status.canary_weight = 0;
            let d = shadow.duration.to_std().unwrap_or_default();
            if elapsed < d {
                return hold(
                    "Shadow",
                    format!(
                        "step {index}: {candidate} shadowed for {}",
                        shadow.duration.0
                    ),
                    Some(d - elapsed),
                );
            }
        } else if let Some(canary) = &step.canary {
            if gated {
                return hold(
                    "AnalysisUnavailable",
                    format!(
                        "step {index} would send {}% of users to {candidate}, but spec.strategy.analysis sets thresholds this operator version cannot check yet; remove them to roll out on time and approvals alone",
                        canary.weight
                    ),
                    None,
                );
            }
            status.stage = Stage::Canary;
            status.canary_weight = canary.weight;
            let d = canary
                .duration
                .as_ref()
                .and_then(|d| d.to_std().ok())
                .unwrap_or_default();
            if elapsed < d {
                return hold(
                    "Canary",
                    format!("step {index}: {}% of users on {candidate}", canary.weight),
                    Some(d - elapsed),
                );
            }
        } else if let Some(pause) = &step.pause {
            status.stage = Stage::Paused;
            match pause.duration.as_ref().and_then(|d| d.to_std().ok()) {
                Some(d) if elapsed < d => {
                    return hold(
                        "Paused",
                        format!(
                            "step {index}: paused for {}",
                            pause.duration.as_ref().map_or("", |d| d.0.as_str())
                        ),
                        Some(d - elapsed),
                    );
                }
                Some(_) => {}
                None if approved(md, index) => {}
                None => {
                    return hold(
                        "AwaitingApproval",
                        format!(
                            "step {index}: waiting for approval: annotate {APPROVE_ANNOTATION}={index}"
                        ),
                        None,
                    );
                }
            }
        } else if step.full.is_some() {
            if gated {
                return hold(
                    "AnalysisUnavailable",
                    format!(
                        "step {index} would promote {candidate}, but spec.strategy.analysis sets thresholds this operator version cannot check yet"
                    ),
                    None,
                );
            }
            return promote(status, &candidate, now, "the full step");
        }
        // The step is done: on to the next one, from now.
        status.current_step = Some(index as i32 + 1);
        status.step_started_at = Some(Time(now));
    }
}

fn step_of(status: &ModelDeploymentStatus) -> usize {
    status.current_step.map_or(0, |i| i.max(0) as usize)
}

fn approved(md: &ModelDeployment, index: usize) -> bool {
    md.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(APPROVE_ANNOTATION))
        .is_some_and(|v| v.trim() == index.to_string())
}

fn promote(
    status: &mut ModelDeploymentStatus,
    candidate: &str,
    now: Timestamp,
    why: &str,
) -> Progress {
    let previous = status.stable_version.replace(candidate.to_owned());
    status.candidate_version = None;
    status.stage = Stage::Promoted;
    status.canary_weight = 0;
    status.current_step = None;
    status.step_started_at = None;
    record(
        status,
        candidate,
        Stage::Promoted,
        format!(
            "Promoted after {why}; it replaced {}",
            previous.as_deref().unwrap_or("nothing")
        ),
        now,
    );
    Progress {
        reason: "Promoted",
        message: format!("{candidate} is stable for every user after {why}"),
        requeue: None,
    }
}

/// Adds a finished rollout to the history, newest first.
pub fn record(
    status: &mut ModelDeploymentStatus,
    version: &str,
    outcome: Stage,
    reason: String,
    now: Timestamp,
) {
    status.history.insert(
        0,
        RolloutRecord {
            version: version.to_owned(),
            outcome,
            reason,
            finished_at: Time(now),
        },
    );
    status.history.truncate(HISTORY_LIMIT);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(yaml: &str) -> ModelDeployment {
        serde_yaml::from_str(yaml).expect("fixture")
    }

    const TIMED: &str = r#"
apiVersion: recsys.io/v1alpha1
kind: ModelDeployment
metadata: { name: als, namespace: shop, generation: 2 }
spec:
  model: als
  version: v2
  artifacts: { uri: "s3://models/recsys" }
  strategy:
    steps:
      - shadow: { duration: 10m }
      - canary: { weight: 10, duration: 1h }
      - pause: {}
      - canary: { weight: 50 }
      - pause: { duration: 30m }
      - full: {}
"#;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn stable_v1() -> ModelDeploymentStatus {
        ModelDeploymentStatus {
            stable_version: Some("v1".into()),
            stage: Stage::Promoted,
            ..Default::default()
        }
    }

    #[test]
    fn steps_advance_on_time_and_approval_then_promote() {
        let mut m = md(TIMED);
        let mut s = stable_v1();
        let p = advance(&m, &mut s, at("2026-11-26T10:00:00Z"));
        assert_eq!(
            (p.reason, s.stage, s.current_step),
            ("Shadow", Stage::Shadow, Some(0))
        );
        assert_eq!(p.requeue, Some(Duration::from_secs(600)));
        assert_eq!(s.candidate_version.as_deref(), Some("v2"));

        let p = advance(&m, &mut s, at("2026-11-26T10:05:00Z"));
        assert_eq!(
            (p.reason, p.requeue),
            ("Shadow", Some(Duration::from_secs(300)))
        );

        let p = advance(&m, &mut s, at("2026-11-26T10:10:00Z"));
        assert_eq!(
            (p.reason, s.canary_weight, s.current_step),
            ("Canary", 10, Some(1))
        );

        // After the hour: the pause without duration waits for approval, weight held.
        let p = advance(&m, &mut s, at("2026-11-26T11:10:00Z"));
        assert_eq!(
            (p.reason, s.stage, s.canary_weight),
            ("AwaitingApproval", Stage::Paused, 10)
        );
        assert_eq!(p.requeue, None);
        let p = advance(&m, &mut s, at("2026-11-26T15:00:00Z"));
        assert_eq!(p.reason, "AwaitingApproval", "time alone does not approve");

        // Approving another step does nothing; approving this one moves on through the
        // 50% canary (no duration) into the timed pause.
        m.metadata.annotations = Some([(APPROVE_ANNOTATION.to_owned(), "4".to_owned())].into());
        assert_eq!(
            advance(&m, &mut s, at("2026-11-26T15:00:00Z")).reason,
            "AwaitingApproval"
        );
        m.metadata.annotations = Some([(APPROVE_ANNOTATION.to_owned(), "2".to_owned())].into());
        let p = advance(&m, &mut s, at("2026-11-26T15:01:00Z"));
        assert_eq!(
            (p.reason, s.canary_weight, s.current_step),
            ("Paused", 50, Some(4))
        );

        let p = advance(&m, &mut s, at("2026-11-26T15:31:00Z"));
        assert_eq!(p.reason, "Promoted");
        assert_eq!(s.stable_version.as_deref(), Some("v2"));
        assert_eq!(
            (s.candidate_version.clone(), s.stage, s.canary_weight),
            (None, Stage::Promoted, 0)
        );
        assert_eq!(s.history[0].version, "v2");
        assert_eq!(s.history[0].outcome, Stage::Promoted);
    }

    #[test]
    fn a_new_candidate_mid_rollout_starts_over() {
        let mut m = md(TIMED);
        let mut s = stable_v1();
        advance(&m, &mut s, at("2026-11-26T10:00:00Z"));
        advance(&m, &mut s, at("2026-11-26T10:20:00Z"));
        assert_eq!(s.canary_weight, 10);
        m.spec.version = "v3".into();
        let p = advance(&m, &mut s, at("2026-11-26T10:21:00Z"));
        assert_eq!(
            (p.reason, s.canary_weight, s.current_step),
            ("Shadow", 0, Some(0))
        );
        assert_eq!(s.candidate_version.as_deref(), Some("v3"));
    }

    #[test]
    fn spec_paused_holds_and_thresholds_gate_traffic() {
        let mut m = md(TIMED);
        let mut s = stable_v1();
        m.spec.paused = true;
        assert_eq!(
            advance(&m, &mut s, at("2026-11-26T10:00:00Z")).reason,
            "SpecPaused"
        );
        m.spec.paused = false;
        m.spec.strategy.analysis.max_error_rate = Some(0.01);
        advance(&m, &mut s, at("2026-11-26T10:00:00Z"));
        // Shadowing is safe without analysis; the first traffic step is not.
        let p = advance(&m, &mut s, at("2026-11-26T10:30:00Z"));
        assert_eq!(
            (p.reason, s.stage, s.canary_weight),
            ("AnalysisUnavailable", Stage::Shadow, 0)
        );
        assert!(p.message.contains("10%"), "{}", p.message);
    }

    #[test]
    fn shortened_steps_resume_at_the_new_last_step() {
        let mut m = md(TIMED);
        let mut s = stable_v1();
        advance(&m, &mut s, at("2026-11-26T10:00:00Z"));
        advance(&m, &mut s, at("2026-11-26T10:10:00Z"));
        advance(&m, &mut s, at("2026-11-26T11:10:00Z"));
        assert_eq!(s.current_step, Some(2), "waiting for approval");
        m.spec.strategy.steps.truncate(2);
        let p = advance(&m, &mut s, at("2026-11-26T11:11:00Z"));
        assert_eq!(
            (p.reason, s.current_step, s.canary_weight),
            ("Canary", Some(1), 10)
        );
        assert_eq!(
            s.stable_version.as_deref(),
            Some("v1"),
            "not promoted unchecked"
        );
    }

    #[test]
    fn a_strategy_without_full_promotes_after_its_last_step() {
        let mut m = md(TIMED);
        m.spec.strategy.steps.truncate(2);
        let mut s = stable_v1();
        advance(&m, &mut s, at("2026-11-26T10:00:00Z"));
        // A step starts when it is reached, not when the one before could have ended.
        let p = advance(&m, &mut s, at("2026-11-26T12:00:00Z"));
        assert_eq!((p.reason, s.canary_weight), ("Canary", 10));
        let p = advance(&m, &mut s, at("2026-11-26T13:00:00Z"));
        assert_eq!(p.reason, "Promoted");
        assert_eq!(s.stable_version.as_deref(), Some("v2"));
    }
}
