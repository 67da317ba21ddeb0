//! Step 5: the status, a pure function of the assessment, the plan and the runs observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use recsys_crds::batch_job::RunOutcome;
use recsys_crds::common::{self, ConditionStatus};
use recsys_crds::{BatchJob, BatchJobStatus};

use super::observe::RunView;
use super::plan::{Gate, Plan};
use crate::controller::{Assessment, stamped};

/// Condition type of a BatchJob with `after`: whether its upstreams allow a run.
pub const UPSTREAM_READY: &str = "UpstreamReady";

/// Reasons of the UpstreamReady condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamReason {
    /// Every upstream succeeded since this job's last run.
    UpstreamsSucceeded,
    /// An upstream has not run successfully since.
    UpstreamPending,
    /// An upstream's latest run since then failed.
    UpstreamFailed,
}

impl UpstreamReason {
    /// The condition reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UpstreamsSucceeded => "UpstreamsSucceeded",
            Self::UpstreamPending => "UpstreamPending",
            Self::UpstreamFailed => "UpstreamFailed",
        }
    }
}

/// The UpstreamReady condition's status, reason and message for `gate`.
pub fn upstream_condition(gate: &Gate) -> (ConditionStatus, UpstreamReason, String) {
    match gate {
        Gate::Open(consumed) => (
            ConditionStatus::True,
            UpstreamReason::UpstreamsSucceeded,
            format!(
                "every upstream succeeded since the last run: {}",
                consumed
                    .iter()
                    .map(|c| format!("{} ({})", c.batch_job, c.job_name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Gate::Waiting {
            upstream,
            failure: Some((job, why)),
        } => (
            ConditionStatus::False,
            UpstreamReason::UpstreamFailed,
            format!("waiting for {upstream}: its run {job} failed: {why}"),
        ),
        Gate::Waiting {
            upstream,
            failure: None,
        } => (
            ConditionStatus::False,
            UpstreamReason::UpstreamPending,
            format!("waiting for {upstream} to succeed since this job's last run"),
        ),
    }
}

/// The status for `assessment`, the `plan` acted on (none when the spec is not accepted) and
/// the runs observed.
pub fn desired_status(
    bj: &BatchJob,
    assessment: &Assessment,
    plan: Option<&Plan>,
    runs: &[RunView],
    now: Timestamp,
) -> BatchJobStatus {
    let generation = bj.metadata.generation;
    let mut status: BatchJobStatus = stamped(bj.status.as_ref(), assessment, generation, now);
    match plan.and_then(|p| p.gate.as_ref()) {
        Some(gate) => {
            let (s, reason, message) = upstream_condition(gate);
            common::set_condition(
                &mut status.conditions,
                common::condition(UPSTREAM_READY, s, reason.as_str(), message, generation, now),
            );
        }
        None => status.conditions.retain(|c| c.type_ != UPSTREAM_READY),
    }
    if let Some(plan) = plan {
        status.last_schedule_time = plan.last_schedule_time.map(Time);
        status.next_schedule_time = plan.next_schedule_time.map(Time);
        status.last_run_request = plan.last_run_request.clone();
        status.held_runs += i32::from(plan.held);
        status.missed_runs += i32::from(plan.missed);
    } else {
        status.next_schedule_time = None;
    }
    status.active = runs
        .iter()
        .filter(|r| r.running())
        .map(|r| r.job_name.clone())
        .collect();
    if let Some(newest) = runs.first() {
        status.attempts = newest.attempts;
    }
    let limit = usize::try_from(bj.spec.history_limit).unwrap_or(10);
    status.history = runs
        .iter()
        .filter_map(|r| r.finished.clone())
        .take(limit)
        .collect();
    let last_success = status
        .history
        .iter()
        .filter(|r| r.outcome == RunOutcome::Succeeded)
        .filter_map(|r| r.finished_at.clone())
        .max_by_key(|t| t.0);
    status.last_successful_time = match (status.last_successful_time.take(), last_success) {
        (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
        (a, b) => a.or(b),
    };
    status
}
