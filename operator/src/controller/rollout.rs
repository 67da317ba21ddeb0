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
//! Analysis gates every step that leaves the candidate with more users than before. The
//! offline check (`minOfflineMetricRatio`, from the manifests the scorer pods report) runs
//! before each weight increase and before promotion. The live checks ([`super::analysis`])
//! run every `interval` while the candidate is shadowed or takes users; a step that exposes
//! the candidate ends only after a successful run of that step (so with live thresholds every
//! such step lasts at least one interval). An inconclusive run holds; `failureLimit` failed
//! runs in a row roll the candidate back at once, whatever step it is in.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use recsys_core::serving::fleet::VersionState;
use recsys_crds::model_deployment::{AnalysisRun, AnalysisSpec, AnalysisStatus, Verdict};
use recsys_crds::{ModelDeployment, ModelDeploymentStatus, RolloutRecord, Stage};

/// Annotation approving a `pause {}` step without duration: its value is the step's index.
pub const APPROVE_ANNOTATION: &str = "recsys.io/approve";
/// Annotation: promote the candidate to every user now, skipping the remaining steps and
/// analysis (it must be loaded on every ready scorer pod). Value: who and when.
pub const PROMOTE_ANNOTATION: &str = "recsys.io/promote";
/// Annotation: abort the rollout, every user back on stable; the candidate stays registered.
pub const ABORT_ANNOTATION: &str = "recsys.io/abort";
/// Annotation: roll an aborted or rolled-back candidate out again from the first step.
pub const RETRY_ANNOTATION: &str = "recsys.io/retry";
/// Annotation set together with `spec.version` = a version that was stable before: it
/// becomes stable again at once (once loaded), without the steps.
pub const UNDO_ANNOTATION: &str = "recsys.io/undo";

/// A manual action, asked for by its annotation; each is acted on once (its
/// `<annotation>=<value>` is recorded in `status.lastAction`) and the annotation removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// [`ABORT_ANNOTATION`].
    Abort,
    /// [`RETRY_ANNOTATION`].
    Retry,
    /// [`UNDO_ANNOTATION`].
    Undo,
    /// [`PROMOTE_ANNOTATION`].
    Promote,
}

impl Action {
    /// Every action, in the order they are looked at (abort first: it is the safe one).
    pub const ALL: [Action; 4] = [Self::Abort, Self::Retry, Self::Undo, Self::Promote];

    /// Its annotation.
    pub fn annotation(self) -> &'static str {
        match self {
            Self::Abort => ABORT_ANNOTATION,
            Self::Retry => RETRY_ANNOTATION,
            Self::Undo => UNDO_ANNOTATION,
            Self::Promote => PROMOTE_ANNOTATION,
        }
    }
}

/// The record of `action` with `value` in `status.lastAction`.
pub fn action_record(action: Action, value: &str) -> String {
    format!("{}={value}", action.annotation())
}

/// The first action annotated on `md` that `status` has not handled yet, with its value.
pub fn pending_action(
    md: &ModelDeployment,
    status: &ModelDeploymentStatus,
) -> Option<(Action, String)> {
    let annotations = md.metadata.annotations.as_ref()?;
    Action::ALL.into_iter().find_map(|a| {
        let value = annotations.get(a.annotation())?;
        (status.last_action.as_deref() != Some(action_record(a, value).as_str()))
            .then(|| (a, value.clone()))
    })
}

/// Whether `version` was stable before (promoted, or the first version).
fn was_stable(status: &ModelDeploymentStatus, version: &str) -> bool {
    status
        .history
        .iter()
        .any(|r| r.version == version && r.outcome == Stage::Promoted)
}

/// Acts on a pending manual action; `Some` when it decided where the rollout stands.
fn act(
    md: &ModelDeployment,
    status: &mut ModelDeploymentStatus,
    candidate_state: &VersionState,
    now: Timestamp,
) -> Option<Progress> {
    let (action, by) = pending_action(md, status)?;
    let candidate = md.spec.version.clone();
    let ended = matches!(status.stage, Stage::Aborted | Stage::RolledBack);
    let handled = |status: &mut ModelDeploymentStatus| {
        status.last_action = Some(action_record(action, &by));
    };
    match action {
        Action::Abort => {
            handled(status);
            if ended {
                return None;
            }
            status.stage = Stage::Aborted;
            status.canary_weight = 0;
            status.step_started_at = None;
            record(
                status,
                &candidate,
                Stage::Aborted,
                format!(
                    "Aborted by hand ({ABORT_ANNOTATION}: {by}) at step {}",
                    step_of(status)
                ),
                now,
            );
            Some(Progress {
                reason: Reason::Aborted,
                message: format!("{candidate} aborted by hand ({by}): every user on stable"),
                requeue: None,
            })
        }
        Action::Retry => {
            handled(status);
            if ended {
                status.stage = Stage::Pending;
                status.current_step = Some(0);
                status.step_started_at = Some(Time(now));
                status.canary_weight = 0;
                status.analysis = None;
            }
            None
        }
        Action::Undo | Action::Promote => {
            let allowed = action == Action::Promote || was_stable(status, &candidate);
            if !allowed || ended {
                // Nothing to promote: an undo to a version that was never stable rolls out
                // through the steps; an ended rollout needs a retry first.
                handled(status);
                return None;
            }
            // Waits (annotation kept) until every ready scorer pod has it.
            if !candidate_state.is_loaded() {
                return None;
            }
            handled(status);
            let why = match action {
                Action::Undo => format!("an undo by hand ({UNDO_ANNOTATION}: {by})"),
                _ => format!("a promotion by hand ({PROMOTE_ANNOTATION}: {by})"),
            };
            Some(promote(status, &candidate, now, &why))
        }
    }
}

/// How soon to look again while scorer pods load a version.
pub const LOADING_RECHECK: Duration = Duration::from_secs(5);
/// How soon to look again after a pod refused a version (it retries on its own interval).
pub const REFUSED_RECHECK: Duration = Duration::from_secs(15);

/// Most rollouts kept in `status.history`.
pub const HISTORY_LIMIT: usize = 20;
/// Most analysis runs kept in `status.analysis.runs`.
pub const RUNS_LIMIT: usize = 10;

/// Reason of the `Progressing` condition of a ModelDeployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
pub enum Reason {
    /// The first version is loading on the scorer pods.
    LoadingStable,
    /// A scorer pod refused the first version (missing or failing verification).
    VersionRefused,
    /// The first version became stable.
    InitialVersion,
    /// `spec.version` is the stable version.
    NothingToRollOut,
    /// The candidate is loading on the scorer pods; not routed yet.
    LoadingCandidate,
    /// A scorer pod refused the candidate; never routed.
    CandidateRefused,
    /// `spec.paused` holds the rollout.
    SpecPaused,
    /// A shadow step.
    Shadow,
    /// A canary step.
    Canary,
    /// A timed pause.
    Paused,
    /// A pause waiting for its approval annotation.
    AwaitingApproval,
    /// More users for the candidate wait for the scorer pods to load it.
    WaitingForScorers,
    /// The step waits for a successful analysis of it.
    Analyzing,
    /// The last analysis had too few observations; held.
    AnalysisInconclusive,
    /// The last analysis failed, below `failureLimit` in a row; held.
    AnalysisFailing,
    /// The model's input fails a blocking data-quality check; held where it is.
    DataQualityHeld,
    /// The candidate became stable.
    Promoted,
    /// The candidate was rolled back.
    RolledBack,
    /// The rollout was aborted by hand.
    Aborted,
}

impl Reason {
    /// The condition's `reason`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Whether a rollout is under way (`Progressing=True`): in a step, loading, or waiting
    /// for an approval or an analysis.
    pub fn is_progressing(self) -> bool {
        matches!(
            self,
            Self::LoadingStable
                | Self::LoadingCandidate
                | Self::Shadow
                | Self::Canary
                | Self::Paused
                | Self::AwaitingApproval
                | Self::WaitingForScorers
                | Self::Analyzing
                | Self::AnalysisInconclusive
                | Self::AnalysisFailing
                | Self::DataQualityHeld
        )
    }
}

/// What one look at a rollout concluded.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Reason of the `Progressing` condition.
    pub reason: Reason,
    /// Message of the `Progressing` condition.
    pub message: String,
    /// When to look again (the end of a timed step); `None`: on the next change.
    pub requeue: Option<Duration>,
}

/// Whether `analysis` sets a threshold on live traffic (error rate, latency, score drift,
/// top-k overlap), checked every interval from the scorer pods' metrics.
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
    /// The live analysis run that an interval just closed, if any.
    pub analysis: Option<AnalysisRun>,
    /// Why the model's input fails its data-quality checks, when it does: the rollout holds
    /// where it is (no new step, no promotion) until they pass; rollbacks still happen.
    pub input_quality: Option<String>,
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
/// `now`, the scorer pods and the analysis allow, and says where it stands. While the
/// candidate is exposed and analysed, or takes users (whose A/B readout is read), it looks
/// again at least every analysis interval.
pub fn advance(
    md: &ModelDeployment,
    status: &mut ModelDeploymentStatus,
    evidence: &Evidence,
    now: Timestamp,
) -> Progress {
    let mut progress = advance_steps(md, status, evidence, now);
    let analysis = &md.spec.strategy.analysis;
    let exposure = super::analysis::exposure(status);
    let analysed = has_live_thresholds(analysis) && exposure.is_some();
    let read_out = exposure == Some(recsys_core::serving::analysis::Exposure::Canary);
    if analysed || read_out {
        let interval = super::analysis::interval(analysis);
        progress.requeue = Some(progress.requeue.map_or(interval, |r| r.min(interval)));
    }
    progress
}

fn advance_steps(
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
        status.analysis = None;
    }
    if let Some(done) = act(md, status, candidate_state, now) {
        return done;
    }
    if status.stage == Stage::Aborted {
        return Progress {
            reason: Reason::Aborted,
            message: format!(
                "{candidate} was aborted by hand; annotate {RETRY_ANNOTATION} to roll it out again, or set spec.version"
            ),
            requeue: None,
        };
    }
    if status.stage == Stage::RolledBack {
        return Progress {
            reason: Reason::RolledBack,
            message: format!(
                "{candidate} was rolled back; set spec.version to roll out another version"
            ),
            requeue: None,
        };
    }
    if status.stage == Stage::Pending {
        // Not routed until every ready scorer pod has it loaded and verified.
        match candidate_state {
            VersionState::Loaded { .. } if let Some(why) = &evidence.input_quality => {
                return Progress {
                    reason: Reason::DataQualityHeld,
                    message: format!("{candidate} is not routed: {why}"),
                    requeue: Some(REFUSED_RECHECK),
                };
            }
            VersionState::Loaded { .. } => {
                status.current_step = Some(0);
                status.step_started_at = Some(Time(now));
            }
            VersionState::Refused { .. } => {
                return Progress {
                    reason: Reason::CandidateRefused,
                    message: format!(
                        "{}; it is not routed (the scorers retry loading it)",
                        candidate_state.describe(&candidate)
                    ),
                    requeue: Some(REFUSED_RECHECK),
                };
            }
            _ => {
                return Progress {
                    reason: Reason::LoadingCandidate,
                    message: format!(
                        "waiting before step 0: {}",
                        candidate_state.describe(&candidate)
                    ),
                    requeue: Some(LOADING_RECHECK),
                };
            }
        }
    }
    let analysis = &md.spec.strategy.analysis;
    if let Some(run) = &evidence.analysis
        && let Some(failure) = take_run(status, analysis, run)
    {
        return roll_back(status, &candidate, failure, now);
    }
    if md.spec.paused {
        return Progress {
            reason: Reason::SpecPaused,
            message: format!("spec.paused holds {candidate} at step {}", step_of(status)),
            requeue: None,
        };
    }
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
                    reason: Reason::WaitingForScorers,
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
        let hold = |reason: Reason, message: String, left: Option<Duration>| Progress {
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
                    Reason::Shadow,
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
                    Reason::WaitingForScorers,
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
                            Reason::AnalysisInconclusive,
                            format!("step {index} holds {candidate}: {missing}"),
                            Some(REFUSED_RECHECK),
                        );
                    }
                }
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
                    Reason::Canary,
                    format!("step {index}: {}% of users on {candidate}", canary.weight),
                    Some(d - elapsed),
                );
            }
        } else if let Some(pause) = &step.pause {
            status.stage = Stage::Paused;
            match pause.duration.as_ref().and_then(|d| d.to_std().ok()) {
                Some(d) if elapsed < d => {
                    return hold(
                        Reason::Paused,
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
                        Reason::AwaitingApproval,
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
                    Reason::WaitingForScorers,
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
                        Reason::AnalysisInconclusive,
                        format!("step {index} holds {candidate}: {missing}"),
                        Some(REFUSED_RECHECK),
                    );
                }
            }
            if let Some(why) = &evidence.input_quality {
                return hold(
                    Reason::DataQualityHeld,
                    format!("step {index} would promote {candidate}, held: {why}"),
                    Some(REFUSED_RECHECK),
                );
            }
            return promote(status, &candidate, now, "the full step");
        }
        // The step is done. One that exposed the candidate ends only on a successful
        // analysis of it.
        if gated
            && super::analysis::exposure(status).is_some()
            && let Some(held) = analysis_gate(status, analysis, index, started, &candidate)
        {
            return held;
        }
        if let Some(why) = &evidence.input_quality {
            // The step is over, but nothing moves on while the input is bad.
            return hold(
                Reason::DataQualityHeld,
                format!("step {index} of {candidate} is done, held: {why}"),
                Some(REFUSED_RECHECK),
            );
        }
        // On to the next one, from now.
        status.current_step = Some(index as i32 + 1);
        status.step_started_at = Some(Time(now));
    }
}

/// Adds `run` to the status and counts a failure; returns why to roll back when the failures
/// in a row reach `failureLimit`.
fn take_run(
    status: &mut ModelDeploymentStatus,
    analysis: &AnalysisSpec,
    run: &AnalysisRun,
) -> Option<String> {
    let a = status.analysis.get_or_insert_with(AnalysisStatus::default);
    match run.verdict {
        Verdict::Successful => a.consecutive_failures = 0,
        Verdict::Failed => a.consecutive_failures += 1,
        Verdict::Inconclusive => {}
    }
    a.runs.insert(0, run.clone());
    a.runs.truncate(RUNS_LIMIT);
    let limit = analysis.failure_limit.max(1);
    (run.verdict == Verdict::Failed && a.consecutive_failures >= limit).then(|| {
        let failed: Vec<String> = run
            .checks
            .iter()
            .filter(|c| c.verdict == Verdict::Failed)
            .map(|c| format!("{}: {}", c.check.as_str(), c.message))
            .collect();
        format!(
            "{} failed analyses in a row (failureLimit {limit}), the last at step {}: {}",
            a.consecutive_failures,
            run.step,
            failed.join("; ")
        )
    })
}

/// Holds step `index` (started at `started`) until an analysis run of it succeeded.
fn analysis_gate(
    status: &ModelDeploymentStatus,
    analysis: &AnalysisSpec,
    index: usize,
    started: Timestamp,
    candidate: &str,
) -> Option<Progress> {
    let interval = analysis.interval.to_std().ok();
    let latest = status.analysis.as_ref().and_then(|a| {
        a.runs
            .iter()
            .find(|r| r.step == index as i32 && r.at.0 >= started)
    });
    let failures = status
        .analysis
        .as_ref()
        .map_or(0, |a| a.consecutive_failures);
    let summary = |r: &AnalysisRun| {
        r.checks
            .iter()
            .filter(|c| c.verdict == r.verdict)
            .map(|c| format!("{}: {}", c.check.as_str(), c.message))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (reason, message) = match latest {
        Some(r) if r.verdict == Verdict::Successful => return None,
        None => (
            Reason::Analyzing,
            format!(
                "step {index} is done once an analysis of {candidate} at this step succeeds (every {})",
                analysis.interval.0
            ),
        ),
        Some(r) if r.verdict == Verdict::Inconclusive => (
            Reason::AnalysisInconclusive,
            format!("step {index} holds {candidate}: {}", summary(r)),
        ),
        Some(r) => (
            Reason::AnalysisFailing,
            format!(
                "step {index} holds {candidate} after {failures} of failureLimit {} failed analyses: {}",
                analysis.failure_limit,
                summary(r)
            ),
        ),
    };
    Some(Progress {
        reason,
        message,
        requeue: interval,
    })
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
        reason: Reason::Promoted,
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
        reason: Reason::RolledBack,
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
        analysis: None,
        input_quality: None,
    };

    fn with(candidate: VersionState) -> Evidence {
        Evidence {
            candidate,
            stable: LOADED_STATE,
            analysis: None,
            input_quality: None,
        }
    }

    /// Evidence carrying an analysis run of `step` with one error-rate check.
    fn run(step: i32, verdict: Verdict, when: &str) -> Evidence {
        use recsys_crds::model_deployment::{AnalysisCheck, CheckKind, Exposure};
        Evidence {
            analysis: Some(AnalysisRun {
                at: Time(at(when)),
                window_seconds: 60,
                step,
                exposure: Exposure::Canary,
                weight: 10,
                pods: 2,
                source: recsys_crds::model_deployment::AnalysisSource::Pods,
                verdict,
                checks: vec![AnalysisCheck {
                    check: CheckKind::ErrorRate,
                    observed: Some(0.2),
                    threshold: 0.01,
                    verdict,
                    message: "20 of 100 canary requests failed".into(),
                }],
            }),
            ..LOADED
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
            (p.reason.as_str(), s.stage, s.current_step),
            ("Shadow", Stage::Shadow, Some(0))
        );
        assert_eq!(p.requeue, Some(Duration::from_secs(600)));
        assert_eq!(s.candidate_version.as_deref(), Some("v2"));

        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:05:00Z"));
        assert_eq!(
            (p.reason.as_str(), p.requeue),
            ("Shadow", Some(Duration::from_secs(300)))
        );

        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:10:00Z"));
        assert_eq!(
            (p.reason.as_str(), s.canary_weight, s.current_step),
            ("Canary", 10, Some(1))
        );

        // After the hour: the pause without duration waits for approval, weight held.
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T11:10:00Z"));
        assert_eq!(
            (p.reason.as_str(), s.stage, s.canary_weight),
            ("AwaitingApproval", Stage::Paused, 10)
        );
        // Users are on the candidate: its A/B readout is read every interval.
        assert_eq!(p.requeue, Some(Duration::from_secs(60)));
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T15:00:00Z"));
        assert_eq!(
            p.reason.as_str(),
            "AwaitingApproval",
            "time alone does not approve"
        );

        // Approving another step does nothing; approving this one moves on through the
        // 50% canary (no duration) into the timed pause.
        m.metadata.annotations = Some([(APPROVE_ANNOTATION.to_owned(), "4".to_owned())].into());
        assert_eq!(
            advance(&m, &mut s, &LOADED, at("2026-11-26T15:00:00Z"))
                .reason
                .as_str(),
            "AwaitingApproval"
        );
        m.metadata.annotations = Some([(APPROVE_ANNOTATION.to_owned(), "2".to_owned())].into());
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T15:01:00Z"));
        assert_eq!(
            (p.reason.as_str(), s.canary_weight, s.current_step),
            ("Paused", 50, Some(4))
        );

        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T15:31:00Z"));
        assert_eq!(p.reason.as_str(), "Promoted");
        assert_eq!(s.stable_version.as_deref(), Some("v2"));
        assert_eq!(
            (s.candidate_version.clone(), s.stage, s.canary_weight),
            (None, Stage::Promoted, 0)
        );
        assert_eq!(s.history[0].version, "v2");
        assert_eq!(s.history[0].outcome, Stage::Promoted);
    }

    #[test]
    fn failing_input_checks_hold_the_rollout_where_it_is_and_rollbacks_still_happen() {
        let mut m = md(TIMED);
        let why = "the model's input fails data-quality checks: freshness on events";
        let bad = |e: Evidence| Evidence {
            input_quality: Some(why.into()),
            ..e
        };
        // A new candidate is not routed while the input is bad.
        let mut s = stable_v1();
        let p = advance(&m, &mut s, &bad(LOADED), at("2026-11-26T10:00:00Z"));
        assert_eq!(
            (p.reason.as_str(), s.stage),
            ("DataQualityHeld", Stage::Pending)
        );
        assert!(p.message.contains("freshness on events"), "{}", p.message);
        assert!(p.reason.is_progressing());
        // Started on good input, the shadow step runs its time, then holds instead of taking
        // users, and moves on once the checks pass.
        assert_eq!(
            advance(&m, &mut s, &LOADED, at("2026-11-26T10:01:00Z"))
                .reason
                .as_str(),
            "Shadow"
        );
        let p = advance(&m, &mut s, &bad(LOADED), at("2026-11-26T10:20:00Z"));
        assert_eq!(
            (p.reason.as_str(), s.stage, s.canary_weight, s.current_step),
            ("DataQualityHeld", Stage::Shadow, 0, Some(0))
        );
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:21:00Z"));
        assert_eq!((p.reason.as_str(), s.canary_weight), ("Canary", 10));
        // A failing analysis still rolls back while the input is bad.
        m.spec.strategy.analysis.max_error_rate = Some(0.01);
        m.spec.strategy.analysis.failure_limit = 1;
        let p = advance(
            &m,
            &mut s,
            &bad(run(1, Verdict::Failed, "2026-11-26T10:22:00Z")),
            at("2026-11-26T10:22:00Z"),
        );
        assert_eq!(
            (p.reason.as_str(), s.stage),
            ("RolledBack", Stage::RolledBack)
        );
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
            (p.reason.as_str(), s.canary_weight, s.current_step),
            ("Shadow", 0, Some(0))
        );
        assert_eq!(s.candidate_version.as_deref(), Some("v3"));
    }

    #[test]
    fn spec_paused_holds() {
        let mut m = md(TIMED);
        let mut s = stable_v1();
        m.spec.paused = true;
        assert_eq!(
            advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:00Z"))
                .reason
                .as_str(),
            "SpecPaused"
        );
    }

    #[test]
    fn an_exposed_step_ends_only_on_a_successful_analysis_of_it() {
        let mut m = md(TIMED);
        m.spec.strategy.analysis.max_error_rate = Some(0.01);
        let mut s = stable_v1();
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:00Z"));
        // Looked at every interval while exposed, not only at the step's end.
        assert_eq!(
            (p.reason.as_str(), p.requeue),
            ("Shadow", Some(Duration::from_secs(60)))
        );
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:10:00Z"));
        assert_eq!(
            (p.reason.as_str(), s.stage, s.canary_weight),
            ("Analyzing", Stage::Shadow, 0)
        );
        let p = advance(
            &m,
            &mut s,
            &run(0, Verdict::Inconclusive, "2026-11-26T10:11:00Z"),
            at("2026-11-26T10:11:00Z"),
        );
        assert_eq!(
            (p.reason.as_str(), s.canary_weight),
            ("AnalysisInconclusive", 0)
        );
        assert!(p.message.contains("20 of 100"), "{}", p.message);
        let p = advance(
            &m,
            &mut s,
            &run(0, Verdict::Successful, "2026-11-26T10:12:00Z"),
            at("2026-11-26T10:12:00Z"),
        );
        assert_eq!(
            (p.reason.as_str(), s.canary_weight, s.current_step),
            ("Canary", 10, Some(1))
        );
        // The shadow's success does not end the canary step.
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T11:12:00Z"));
        assert_eq!((p.reason.as_str(), s.canary_weight), ("Analyzing", 10));
        let p = advance(
            &m,
            &mut s,
            &run(1, Verdict::Successful, "2026-11-26T11:13:00Z"),
            at("2026-11-26T11:13:00Z"),
        );
        assert_eq!(
            (p.reason.as_str(), s.stage),
            ("AwaitingApproval", Stage::Paused)
        );
        // Analysed while paused too: the interval is the requeue.
        assert_eq!(p.requeue, Some(Duration::from_secs(60)));
        let a = s.analysis.clone().expect("analysis status");
        assert_eq!((a.runs.len(), a.consecutive_failures), (3, 0));
        assert_eq!(a.runs[0].step, 1, "newest first");
    }

    #[test]
    fn failure_limit_failed_runs_in_a_row_roll_back_at_once() {
        let mut m = md(TIMED);
        m.spec.strategy.analysis.max_error_rate = Some(0.01);
        m.spec.strategy.analysis.failure_limit = 2;
        m.spec.strategy.steps.remove(0);
        let mut s = stable_v1();
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:00Z"));
        assert_eq!((p.reason.as_str(), s.canary_weight), ("Canary", 10));
        let fail = |when| run(0, Verdict::Failed, when);
        let p = advance(
            &m,
            &mut s,
            &fail("2026-11-26T10:01:00Z"),
            at("2026-11-26T10:01:00Z"),
        );
        assert_eq!(
            (p.reason.as_str(), s.canary_weight),
            ("Canary", 10),
            "one failure is tolerated"
        );
        // A success resets the count; an inconclusive run leaves it.
        advance(
            &m,
            &mut s,
            &run(0, Verdict::Successful, "2026-11-26T10:02:00Z"),
            at("2026-11-26T10:02:00Z"),
        );
        advance(
            &m,
            &mut s,
            &fail("2026-11-26T10:03:00Z"),
            at("2026-11-26T10:03:00Z"),
        );
        advance(
            &m,
            &mut s,
            &run(0, Verdict::Inconclusive, "2026-11-26T10:04:00Z"),
            at("2026-11-26T10:04:00Z"),
        );
        assert_eq!(s.stage, Stage::Canary);
        let p = advance(
            &m,
            &mut s,
            &fail("2026-11-26T10:05:00Z"),
            at("2026-11-26T10:05:00Z"),
        );
        assert_eq!(
            (p.reason.as_str(), s.stage, s.canary_weight),
            ("RolledBack", Stage::RolledBack, 0)
        );
        assert_eq!(s.stable_version.as_deref(), Some("v1"));
        let record = &s.history[0];
        assert_eq!(
            (record.version.as_str(), record.outcome),
            ("v2", Stage::RolledBack)
        );
        assert!(
            record
                .reason
                .contains("2 failed analyses in a row (failureLimit 2)")
                && record.reason.contains("20 of 100 canary requests failed"),
            "{}",
            record.reason
        );
        assert_eq!(s.analysis.as_ref().map(|a| a.consecutive_failures), Some(2));
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
            (p.reason.as_str(), s.current_step, s.canary_weight),
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
        assert_eq!((p.reason.as_str(), s.canary_weight), ("Canary", 10));
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T13:00:00Z"));
        assert_eq!(p.reason.as_str(), "Promoted");
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
        assert_eq!(
            (p.reason.as_str(), s.stage),
            ("LoadingCandidate", Stage::Pending)
        );
        assert_eq!(p.requeue, Some(LOADING_RECHECK));
        assert!(p.message.contains("1 of 2"), "{}", p.message);

        let refused = VersionState::Refused {
            pod: "als-scorer-0".into(),
            reason: "models/als/v2/manifest.json: not found".into(),
        };
        let p = advance(&m, &mut s, &with(refused), at("2026-11-26T10:01:00Z"));
        assert_eq!(
            (p.reason.as_str(), s.stage, s.canary_weight),
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
            (p.reason.as_str(), p.requeue),
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
            (p.reason.as_str(), s.stage, s.canary_weight),
            ("WaitingForScorers", Stage::Shadow, 0)
        );
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:15:05Z"));
        assert_eq!((p.reason.as_str(), s.canary_weight), ("Canary", 10));
        // Holding a weight needs no new evidence; raising it does.
        let p = advance(
            &m,
            &mut s,
            &with(loading.clone()),
            at("2026-11-26T10:20:00Z"),
        );
        assert_eq!((p.reason.as_str(), s.canary_weight), ("Canary", 10));
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
            analysis: None,
            input_quality: None,
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
        assert_eq!(
            (p.reason.as_str(), s.canary_weight),
            ("AnalysisInconclusive", 0)
        );
        assert!(p.message.contains("candidate none"), "{}", p.message);
        // Good enough: on to the canary.
        let p = advance(
            &m,
            &mut s,
            &evidence(Some(0.30), Some(0.3)),
            at("2026-11-26T10:10:01Z"),
        );
        assert_eq!((p.reason.as_str(), s.canary_weight), ("Canary", 10));

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
            (p.reason.as_str(), s.stage, s.canary_weight),
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
        assert_eq!((p.reason.as_str(), s.canary_weight), ("RolledBack", 0));
    }

    fn annotate(m: &mut ModelDeployment, key: &str, value: &str) {
        m.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(key.to_owned(), value.to_owned());
    }

    #[test]
    fn abort_sends_every_user_back_and_retry_starts_over_each_acted_on_once() {
        let mut m = md(TIMED);
        let mut s = stable_v1();
        advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:00Z"));
        advance(&m, &mut s, &LOADED, at("2026-11-26T10:10:00Z"));
        assert_eq!((s.stage, s.canary_weight), (Stage::Canary, 10));

        annotate(&mut m, ABORT_ANNOTATION, "alice 10:15");
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:15:00Z"));
        assert_eq!(
            (p.reason, s.stage, s.canary_weight),
            (Reason::Aborted, Stage::Aborted, 0)
        );
        assert_eq!(
            s.last_action.as_deref(),
            Some("recsys.io/abort=alice 10:15")
        );
        assert_eq!(
            (s.history[0].version.as_str(), s.history[0].outcome),
            ("v2", Stage::Aborted)
        );
        assert!(
            s.history[0].reason.contains("alice 10:15"),
            "{}",
            s.history[0].reason
        );
        assert_eq!(s.stable_version.as_deref(), Some("v1"));
        // Handled once: the same annotation later changes nothing, and it stays aborted.
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T12:00:00Z"));
        assert_eq!((p.reason, s.history.len()), (Reason::Aborted, 1));

        annotate(&mut m, RETRY_ANNOTATION, "alice 12:01");
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T12:01:00Z"));
        assert_eq!(
            (p.reason, s.stage, s.current_step),
            (Reason::Shadow, Stage::Shadow, Some(0))
        );
        assert_eq!(
            s.last_action.as_deref(),
            Some("recsys.io/retry=alice 12:01")
        );
        // A new value is a new action.
        annotate(&mut m, ABORT_ANNOTATION, "bob 12:02");
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T12:02:00Z"));
        assert_eq!((p.reason, s.history.len()), (Reason::Aborted, 2));
    }

    #[test]
    fn promote_skips_the_remaining_steps_once_the_pods_have_the_candidate() {
        let mut m = md(TIMED);
        m.spec.strategy.analysis.max_error_rate = Some(0.01);
        let mut s = stable_v1();
        annotate(&mut m, PROMOTE_ANNOTATION, "carol");
        let loading = with(VersionState::Loading { have: 1, of: 2 });
        let p = advance(&m, &mut s, &loading, at("2026-11-26T10:00:00Z"));
        assert_eq!(
            p.reason,
            Reason::LoadingCandidate,
            "never promoted unloaded"
        );
        assert_eq!(s.last_action, None, "kept until it can be acted on");
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:05Z"));
        assert_eq!(p.reason, Reason::Promoted);
        assert_eq!(s.stable_version.as_deref(), Some("v2"));
        assert!(
            s.history[0].reason.contains("by hand"),
            "{}",
            s.history[0].reason
        );
    }

    #[test]
    fn undo_makes_a_former_stable_version_stable_at_once_and_nothing_else() {
        let mut m = md(TIMED);
        let mut s = stable_v1();
        record(
            &mut s,
            "v1",
            Stage::Promoted,
            "InitialVersion".into(),
            at("2026-11-25T00:00:00Z"),
        );
        // v2 was promoted; undo goes back to v1.
        s.stable_version = Some("v2".into());
        m.spec.version = "v1".into();
        annotate(&mut m, UNDO_ANNOTATION, "dave");
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:00Z"));
        assert_eq!(
            (p.reason, s.stable_version.as_deref()),
            (Reason::Promoted, Some("v1"))
        );
        assert!(
            s.history[0].reason.contains("undo by hand"),
            "{}",
            s.history[0].reason
        );

        // An undo to a version that was never stable is a normal rollout.
        let mut m = md(TIMED);
        let mut s = stable_v1();
        m.spec.version = "v9".into();
        annotate(&mut m, UNDO_ANNOTATION, "dave");
        let p = advance(&m, &mut s, &LOADED, at("2026-11-26T10:00:00Z"));
        assert_eq!((p.reason, s.stage), (Reason::Shadow, Stage::Shadow));
        assert_eq!(s.last_action.as_deref(), Some("recsys.io/undo=dave"));
    }
}
