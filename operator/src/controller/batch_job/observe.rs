//! Step 4: what the runs did, read from the Jobs of a BatchJob and their Pods: outcome and
//! attempts from the Job's status, the trainer's figures from its container's termination
//! message ([`RunSummary`]), trigger and lineage from the Job's annotations.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use recsys_core::quality::GATE_KIND;
use recsys_core::runs::RunSummary;
use recsys_crds::batch_job::{
    CheckViolation, ConsumedRun, DataQualityRun, HandOff, JobRun, RunOutcome, RunTrigger,
};

use super::{CONSUMED_ANNOTATION, CONTAINER, HAND_OFF_ANNOTATION, TRIGGER_ANNOTATION};

/// One run as observed.
#[derive(Clone, Debug, PartialEq)]
pub struct RunView {
    /// The Job's name.
    pub job_name: String,
    /// When the Job was created.
    pub created: Timestamp,
    /// What started it.
    pub trigger: RunTrigger,
    /// The upstream runs it consumed.
    pub consumed: Vec<ConsumedRun>,
    /// Attempts so far (Pods that ended, and the one running).
    pub attempts: i32,
    /// The finished run, or `None` while it runs.
    pub finished: Option<JobRun>,
    /// The trainer's summary, when its container wrote one.
    pub summary: Option<RunSummary>,
}

impl RunView {
    /// Whether it still runs.
    pub fn running(&self) -> bool {
        self.finished.is_none()
    }
}

fn trigger_of(job: &Job) -> RunTrigger {
    match job
        .annotations()
        .get(TRIGGER_ANNOTATION)
        .map(String::as_str)
    {
        Some("Manual") => RunTrigger::Manual,
        Some("Upstream") => RunTrigger::Upstream,
        _ => RunTrigger::Schedule,
    }
}

/// The summary in the termination message of the run's Pod that decided it: the succeeded
/// one, else the last one to end.
fn summary_of(job: &str, pods: &[Pod]) -> Option<RunSummary> {
    let mut ended: Vec<(Timestamp, bool, &str)> = pods
        .iter()
        .filter(|p| p.labels().get("job-name").map(String::as_str) == Some(job))
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            let c = status
                .container_statuses
                .as_ref()?
                .iter()
                .find(|c| c.name == CONTAINER)?;
            let t = c.state.as_ref()?.terminated.as_ref()?;
            let at = t
                .finished_at
                .as_ref()
                .map_or(Timestamp::UNIX_EPOCH, |t| t.0);
            Some((at, t.exit_code == 0, t.message.as_deref()?))
        })
        .collect();
    ended.sort_by_key(|(at, ok, _)| (*ok, *at));
    ended.last().and_then(|(_, _, m)| RunSummary::parse(m))
}

/// Every run of `jobs`, newest first.
pub fn runs(jobs: &[Job], pods: &[Pod]) -> Vec<RunView> {
    let mut runs: Vec<RunView> = jobs
        .iter()
        .map(|job| {
            let name = job.name_any();
            let created = job
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(Timestamp::UNIX_EPOCH, |t| t.0);
            let consumed: Vec<ConsumedRun> = job
                .annotations()
                .get(CONSUMED_ANNOTATION)
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default();
            let summary = summary_of(&name, pods);
            let finished = finished_run(job, &name, created, &consumed, summary.as_ref());
            let attempts = job.status.as_ref().map_or(0, |s| {
                s.succeeded.unwrap_or(0) + s.failed.unwrap_or(0) + s.active.unwrap_or(0)
            });
            RunView {
                job_name: name,
                created,
                trigger: trigger_of(job),
                consumed,
                attempts,
                finished,
                summary,
            }
        })
        .collect();
    runs.sort_by(|a, b| b.created.cmp(&a.created).then(b.job_name.cmp(&a.job_name)));
    runs
}

fn finished_run(
    job: &Job,
    name: &str,
    created: Timestamp,
    consumed: &[ConsumedRun],
    summary: Option<&RunSummary>,
) -> Option<JobRun> {
    let status = job.status.as_ref()?;
    let conditions = status.conditions.as_deref().unwrap_or_default();
    let finished = |t: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == t && c.status == "True")
    };
    let (outcome, reason, finished_at) = match (finished("Complete"), finished("Failed")) {
        (Some(_), _) => (
            RunOutcome::Succeeded,
            String::new(),
            status.completion_time.clone(),
        ),
        (None, Some(c)) => {
            let mut reason = format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or("Failed"),
                c.message.as_deref().unwrap_or_default()
            );
            // The trainer's own words, when it said what went wrong; a data-quality gate that
            // held is named as such, not as the pod failure policy that stopped the Job.
            match summary {
                Some(s) if s.error_kind.as_deref() == Some(GATE_KIND) => {
                    reason = format!("{GATE_KIND}: {}", s.message.as_deref().unwrap_or_default());
                }
                Some(s) => {
                    if let Some(m) = s.message.as_deref() {
                        reason = format!("{reason} ({m})");
                    }
                }
                None => {}
            }
            (RunOutcome::Failed, reason, c.last_transition_time.clone())
        }
        _ => return None,
    };
    let hand_off: Option<HandOff> = job
        .annotations()
        .get(HAND_OFF_ANNOTATION)
        .and_then(|s| serde_json::from_str(s).ok());
    Some(JobRun {
        job_name: name.to_owned(),
        trigger: trigger_of(job),
        started_at: status.start_time.clone().unwrap_or(Time(created)),
        finished_at,
        outcome,
        attempts: status.succeeded.unwrap_or(0) + status.failed.unwrap_or(0),
        reason,
        duration_seconds: summary.map(|s| s.seconds.round() as i64),
        events: summary.and_then(|s| s.events).map(clamp),
        rows: summary.and_then(|s| s.rows).map(clamp),
        version: summary.and_then(|s| s.version.clone()),
        consumed: consumed.to_vec(),
        hand_off,
        data_quality: summary
            .and_then(|s| s.quality.as_ref())
            .map(data_quality_run),
    })
}

fn data_quality_run(q: &recsys_core::quality::QualitySummary) -> DataQualityRun {
    DataQualityRun {
        run_id: q.run_id.clone(),
        passed: q.passed,
        violations: q
            .violations
            .iter()
            .take(16)
            .map(|v| CheckViolation {
                check: v.check.clone(),
                check_type: v.check_type.as_str().to_owned(),
                target: v.target.clone(),
                blocking: v.blocking,
            })
            .collect(),
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The latest success and the latest failure of a BatchJob, from its status history: what a
/// downstream job's gate looks at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpstreamState {
    /// The upstream's name.
    pub name: String,
    /// Its latest successful run: Job name and when it finished.
    pub last_success: Option<(String, Timestamp)>,
    /// Its latest failed run: Job name, when it finished, why.
    pub last_failure: Option<(String, Timestamp, String)>,
}

impl UpstreamState {
    /// From a BatchJob's recorded history.
    pub fn from_history(name: &str, history: &[JobRun]) -> Self {
        let finished = |r: &JobRun| r.finished_at.as_ref().map_or(r.started_at.0, |t| t.0);
        let latest = |outcome: RunOutcome| {
            history
                .iter()
                .filter(|r| r.outcome == outcome)
                .max_by_key(|r| finished(r))
        };
        Self {
            name: name.to_owned(),
            last_success: latest(RunOutcome::Succeeded).map(|r| (r.job_name.clone(), finished(r))),
            last_failure: latest(RunOutcome::Failed)
                .map(|r| (r.job_name.clone(), finished(r), r.reason.clone())),
        }
    }
}

/// Finished Jobs beyond the newest `limit`, oldest first: what garbage collection deletes.
pub fn expired(runs: &[RunView], limit: usize) -> Vec<String> {
    let mut old: Vec<String> = runs
        .iter()
        .filter(|r| !r.running())
        .skip(limit)
        .map(|r| r.job_name.clone())
        .collect();
    old.reverse();
    old
}

/// `name → run` of the finished runs, for finding the ones not seen before.
pub fn by_name(history: &[JobRun]) -> BTreeMap<&str, &JobRun> {
    history.iter().map(|r| (r.job_name.as_str(), r)).collect()
}
