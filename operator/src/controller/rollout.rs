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
//! Scorer pods gate every step that gives the candidate more users: a new candidate first
//! waits in `Pending` (named in the routing table with weight 0, so every scorer pod loads and
//! verifies it) until every ready scorer pod has it loaded; a candidate any pod refused is
//! never routed (`CandidateRefused`, with the pod's reason). A weight increase or promotion
//! waits again if a pod lost it (a restart, a scale-up).
//!
//! Analysis gates every step that leaves the candidate with more traffic than before. This
//! version of the operator has no analysis source yet, so a strategy that sets any analysis
//! threshold holds before its first traffic step rather than skip a gate
//! (`Progressing=False, reason AnalysisUnavailable`); a strategy without thresholds advances
//! on time and approvals alone.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use recsys_core::serving::fleet::VersionState;
use recsys_crds::model_deployment::AnalysisSpec;
use recsys_crds::{ModelDeployment, ModelDeploymentStatus, RolloutRecord, Stage};

/// Annotation approving a `pause {}` step without duration: its value is the step's index.
pub const APPROVE_ANNOTATION: &str = "recsys.io/approve";

/// How soon to look again while scorer pods load a version.
pub const LOADING_RECHECK: Duration = Duration::from_secs(5);
/// How soon to look again after a pod refused a version (it retries on its own interval).
pub const REFUSED_RECHECK: Duration = Duration::from_secs(15);

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
            "Shadow"
                | "Canary"
                | "Paused"
                | "AwaitingApproval"
                | "LoadingCandidate"
                | "WaitingForScorers"
        )
    }
}

/// Whether `analysis` sets a threshold on live traffic (error rate, latency, score drift,
/// top-k overlap), which this operator version cannot check yet. The offline metric ratio is
/// checked, from the manifests the scorer pods report.
pub fn has_live_thresholds(analysis: &AnalysisSpec) -> bool {
    analysis.max_error_rate.is_some()
        || analysis.max_p99_latency_ms.is_some()
        || analysis.max_score_drift_psi.is_some()
        || analysis.min_top_k_overlap.is_some()
}

/// What the scorer pods say about the two versions of a rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct Evidence {
    /// Where the candidate stands on the pods.
    pub candidate: VersionState,
    /// Where the stable version stands on the pods.
    pub stable: VersionState,
}

/// The offline check: the candidate's NDCG@10 over the stable version's, both from their
/// manifests, against `min`. `Ok(None)`: passed or not asked; `Err`: no data (inconclusive);
/// `Ok(Some(reason))`: failed.
fn offline_check(analysis: &AnalysisSpec, evidence: &Evidence) -> Result<Option<String>, String> {
    let Some(min) = analysis.min_offline_metric_ratio else {
        return Ok(None);
    };
    let ndcg = |s: &VersionState| match s {
        VersionState::Loaded { offline_ndcg, .. } => *offline_ndcg,
        _ => None,
    };
    match (ndcg(&evidence.candidate), ndcg(&evidence.stable)) {
        (Some(c), Some(s)) if s > 0.0 => {
            let ratio = c / s;
            Ok((ratio < min).then(|| {
                format!(
                    "OfflineMetricRatio: candidate NDCG@10 {c:.4} is {ratio:.3}× stable's {s:.4}, below minOfflineMetricRatio {min}"
                )
            }))
        }
        (c, s) => Err(format!(
            "minOfflineMetricRatio needs NDCG@10 in both manifests (candidate {}, stable {})",
            c.map_or_else(|| "none".to_owned(), |v| format!("{v:.4}")),
            s.map_or_else(|| "none".to_owned(), |v| format!("{v:.4}"))
        )),
    }
}

/// Moves `status` (with a stable version other than `spec.version`) through the steps as far as
/// `now` and the scorer pods (`candidate`: where the candidate stands on them) allow, and says
/// where it stands.
pub fn advance(
    md: &ModelDeployment,
    status: &mut ModelDeploymentStatus,
    evidence: &Evidence,
    now: Timestamp,
) -> Progress {
    let candidate_state = &evidence.candidate;
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
    if status.stage == Stage::Pending {
        // Not routed until every ready scorer pod has it loaded and verified.
        match candidate_state {
            VersionState::Loaded { .. } => {
                status.current_step = Some(0);
                status.step_started_at = Some(Time(now));
            }
            VersionState::Refused { .. } => {
                return Progress {
                    reason: "CandidateRefused",
                    message: format!(
                        "{}; it is not routed (the scorers retry loading it)",
                        candidate_state.describe(&candidate)
                    ),
                    requeue: Some(REFUSED_RECHECK),
                };
            }
            _ => {
                return Progress {
                    reason: "LoadingCandidate",
                    message: format!(
                        "waiting before step 0: {}",
                        candidate_state.describe(&candidate)
                    ),
                    requeue: Some(LOADING_RECHECK),
                };
            }
        }
    }
    if md.spec.paused {
        return Progress {
            reason: "SpecPaused",
            message: format!("spec.paused holds {candidate} at step {}", step_of(status)),
            requeue: None,
        };
    }
    let analysis = &md.spec.strategy.analysis;
    let gated = has_live_thresholds(analysis);
    if step_of(status) >= steps.len() && !steps.is_empty() {
        // The steps were shortened under a rollout that had not finished them (a finished one
        // is promoted and has no step): resume at the new last step, not promote unchecked.
        status.current_step = Some(steps.len() as i32 - 1);
        status.step_started_at = Some(Time(now));
    }
    loop {
        let index = step_of(status);
        let Some(step) = steps.get(index) else {
            if !candidate_state.is_loaded() {
                return Progress {
                    reason: "WaitingForScorers",
                    message: format!(
                        "the steps are done, but {}",
                        candidate_state.describe(&candidate)
                    ),
                    requeue: Some(LOADING_RECHECK),
                };
            }
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
            if canary.weight > status.canary_weight && !candidate_state.is_loaded() {
                return hold(
                    "WaitingForScorers",
                    format!(
                        "step {index} would send {}% of users to {candidate}, but {}",
                        canary.weight,
                        candidate_state.describe(&candidate)
                    ),
                    Some(LOADING_RECHECK),
                );
            }
            if canary.weight > status.canary_weight {
                match offline_check(analysis, evidence) {
                    Ok(None) => {}
                    Ok(Some(failure)) => return roll_back(status, &candidate, failure, now),
                    Err(missing) => {
                        return hold(
                            "AnalysisInconclusive",
                            format!("step {index} holds {candidate}: {missing}"),
                            Some(REFUSED_RECHECK),
                        );
                    }
                }
            }
            if gated {
                return hold(
                    "AnalysisUnavailable",
                    format!(
                        "step {index} would send {}% of users to {candidate}, but spec.strategy.analysis sets live thresholds (error rate, latency, drift, overlap) this operator version cannot check yet; remove them to roll out on time, approvals and the offline ratio alone",
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
            if !candidate_state.is_loaded() {
                return hold(
                    "WaitingForScorers",
                    format!(
                        "step {index} would promote {candidate}, but {}",
                        candidate_state.describe(&candidate)
                    ),
                    Some(LOADING_RECHECK),
                );
            }
            match offline_check(analysis, evidence) {
                Ok(None) => {}
                Ok(Some(failure)) => return roll_back(status, &candidate, failure, now),
                Err(missing) => {
                    return hold(
                        "AnalysisInconclusive",
                        format!("step {index} holds {candidate}: {missing}"),
                        Some(REFUSED_RECHECK),
                    );
                }
            }
            if gated {
                return hold(
                    "AnalysisUnavailable",
                    format!(
                        "step {index} would promote {candidate}, but spec.strategy.analysis sets live thresholds this operator version cannot check yet"
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

/// Sends every user back to stable: the candidate keeps no weight and no shadow, and the
/// rollout ends in `RolledBack` with `why` (the failed check and its figures).
fn roll_back(
    status: &mut ModelDeploymentStatus,
    candidate: &str,
    why: String,
    now: Timestamp,
) -> Progress {
    status.stage = Stage::RolledBack;
    status.canary_weight = 0;
    status.step_started_at = None;
    record(status, candidate, Stage::RolledBack, why.clone(), now);
    Progress {
        reason: "RolledBack",
        message: format!("{candidate} rolled back, every user on stable: {why}"),
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

    const LOADED_STATE: VersionState = VersionState::Loaded {
        pods: 2,
        offline_ndcg: None,
    };
    const LOADED: Evidence = Evidence {
        candidate: LOADED_STATE,
        stable: LOADED_STATE,
    };

    fn with(candidate: VersionState) -> Evidence {
        Evidence {
            candidate,
            stable: LOADED_STATE,
        }
    }

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
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:00Z"));
        assert_eq!(
            (p.reason, s.stage, s.current_step),
            ("Shadow", Stage::Shadow, Some(0))
        );
        assert_eq!(p.requeue, Some(Duration::from_secs(600)));
        assert_eq!(s.candidate_version.as_deref(), Some("v2"));

        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:05:00Z"));
        assert_eq!(
            (p.reason, p.requeue),
            ("Shadow", Some(Duration::from_secs(300)))
        );

        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:10:00Z"));
        assert_eq!(
            (p.reason, s.canary_weight, s.current_step),
            ("Canary", 10, Some(1))
        );

        // After the hour: the pause without duration waits for approval, weight held.
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T11:10:00Z"));
        assert_eq!(
            (p.reason, s.stage, s.canary_weight),
            ("AwaitingApproval", Stage::Paused, 10)
        );
        assert_eq!(p.requeue, None);
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T15:00:00Z"));
        assert_eq!(p.reason, "AwaitingApproval", "time alone does not approve");

        // Approving another step does nothing; approving this one moves on through the
        // 50% canary (no duration) into the timed pause.
        m.metadata.annotations = Some([(APPROVE_ANNOTATION.to_owned(), "4".to_owned())].into());
        assert_eq!(
            advance(&m, &mut s, &LOADED, at("2026-11-26T15:00:00Z")).reason,
            "AwaitingApproval"
        );
        m.metadata.annotations = Some([(APPROVE_ANNOTATION.to_owned(), "2".to_owned())].into());
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T15:01:00Z"));
        assert_eq!(
            (p.reason, s.canary_weight, s.current_step),
            ("Paused", 50, Some(4))
        );

        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T15:31:00Z"));
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
        advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:00Z"));
        advance(&m, &mut s, &LOADED, at("2026-11-26T10:20:00Z"));
        assert_eq!(s.canary_weight, 10);
        m.spec.version = "v3".into();
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:21:00Z"));
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
            advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:00Z")).reason,
            "SpecPaused"
        );
        m.spec.paused = false;
        m.spec.strategy.analysis.max_error_rate = Some(0.01);
        advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:00Z"));
        // Shadowing is safe without analysis; the first traffic step is not.
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:30:00Z"));
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
        advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:00Z"));
        advance(&m, &mut s, &LOADED, at("2026-11-26T10:10:00Z"));
        advance(&m, &mut s, &LOADED, at("2026-11-26T11:10:00Z"));
        assert_eq!(s.current_step, Some(2), "waiting for approval");
        m.spec.strategy.steps.truncate(2);
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T11:11:00Z"));
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
        advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:00Z"));
        // A step starts when it is reached, not when the one before could have ended.
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T12:00:00Z"));
        assert_eq!((p.reason, s.canary_weight), ("Canary", 10));
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T13:00:00Z"));
        assert_eq!(p.reason, "Promoted");
        assert_eq!(s.stable_version.as_deref(), Some("v2"));
    }

    #[test]
    fn the_candidate_takes_users_only_once_every_scorer_pod_has_it() {
        let m = md(TIMED);
        let mut s = stable_v1();
        let loading = VersionState::Loading { have: 1, of: 2 };
        let p = advance(
            &m,
            &mut s,
            &with(loading.clone()),
            at("2026-11-26T10:00:00Z"),
        );
        assert_eq!((p.reason, s.stage), ("LoadingCandidate", Stage::Pending));
        assert_eq!(p.requeue, Some(LOADING_RECHECK));
        assert!(p.message.contains("1 of 2"), "{}", p.message);

        let refused = VersionState::Refused {
            pod: "als-scorer-0".into(),
            reason: "models/als/v2/manifest.json: not found".into(),
        };
        let p = advance(&m, &mut s, &with(refused), at("2026-11-26T10:01:00Z"));
        assert_eq!(
            (p.reason, s.stage, s.canary_weight),
            ("CandidateRefused", Stage::Pending, 0)
        );
        assert!(
            p.message.contains("manifest.json: not found"),
            "{}",
            p.message
        );

        // Loaded: step 0 starts now, not when the candidate was first seen.
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:05:00Z"));
        assert_eq!(
            (p.reason, p.requeue),
            ("Shadow", Some(Duration::from_secs(600)))
        );

        // A pod restarted without it: the canary waits, weight unchanged.
        let p = advance(
            &m,
            &mut s,
            &with(loading.clone()),
            at("2026-11-26T10:15:00Z"),
        );
        assert_eq!(
            (p.reason, s.stage, s.canary_weight),
            ("WaitingForScorers", Stage::Shadow, 0)
        );
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:15:05Z"));
        assert_eq!((p.reason, s.canary_weight), ("Canary", 10));
        // Holding a weight needs no new evidence; raising it does.
        let p = advance(
            &m,
            &mut s,
            &with(loading.clone()),
            at("2026-11-26T10:20:00Z"),
        );
        assert_eq!((p.reason, s.canary_weight), ("Canary", 10));
    }

    #[test]
    fn the_offline_ratio_is_checked_from_the_manifests_and_rolls_back() {
        let mut m = md(TIMED);
        m.spec.strategy.analysis.min_offline_metric_ratio = Some(0.98);
        let loaded = |ndcg: Option<f64>| VersionState::Loaded {
            pods: 2,
            offline_ndcg: ndcg,
        };
        let evidence = |c, s| Evidence {
            candidate: loaded(c),
            stable: loaded(s),
        };
        // No metric in a manifest: inconclusive, held at the first traffic step.
        let mut s = stable_v1();
        advance(
            &m,
            &mut s,
            &evidence(None, Some(0.3)),
            at("2026-11-26T10:00:00Z"),
        );
        let p = advance(
            &m,
            &mut s,
            &evidence(None, Some(0.3)),
            at("2026-11-26T10:10:00Z"),
        );
        assert_eq!((p.reason, s.canary_weight), ("AnalysisInconclusive", 0));
        assert!(p.message.contains("candidate none"), "{}", p.message);
        // Good enough: on to the canary.
        let p = advance(
            &m,
            &mut s,
            &evidence(Some(0.30), Some(0.3)),
            at("2026-11-26T10:10:01Z"),
        );
        assert_eq!((p.reason, s.canary_weight), ("Canary", 10));

        // Worse: rolled back, every user on stable, recorded with the figures.
        let mut s = stable_v1();
        advance(
            &m,
            &mut s,
            &evidence(Some(0.2), Some(0.3)),
            at("2026-11-26T10:00:00Z"),
        );
        let p = advance(
            &m,
            &mut s,
            &evidence(Some(0.2), Some(0.3)),
            at("2026-11-26T10:10:00Z"),
        );
        assert_eq!(
            (p.reason, s.stage, s.canary_weight),
            ("RolledBack", Stage::RolledBack, 0)
        );
        assert_eq!(s.stable_version.as_deref(), Some("v1"));
        assert_eq!(
            (s.history[0].version.as_str(), s.history[0].outcome),
            ("v2", Stage::RolledBack)
        );
        assert!(
            s.history[0].reason.contains("0.667"),
            "{}",
            s.history[0].reason
        );
        // It stays rolled back.
        let p = advance(
            &m,
            &mut s,
            &evidence(Some(0.2), Some(0.3)),
            at("2026-11-26T11:00:00Z"),
        );
        assert_eq!((p.reason, s.canary_weight), ("RolledBack", 0));
    }
}
