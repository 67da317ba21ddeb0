//! Step 2: what to start now, decided from the spec, the runs observed and the upstreams'
//! state, as a pure function of them and the time.
//!
//! - A new value of the annotation `recsys.io/run` starts one run (any BatchJob, suspended
//!   or not, gate or not: a person asked for it).
//! - A schedule that came due starts a run, unless it is suspended, was seen more than
//!   [`STARTING_DEADLINE`] late (missed), an upstream has not succeeded since this job's last
//!   run (held), or the previous run still runs under `Forbid` (skipped).
//! - `after` without a schedule starts a run each time every upstream has succeeded since this
//!   job's last run.
//!
//! Job names are derived from what started them (the due time, the request, the upstream runs
//! consumed), so a decision taken twice (a status write lost, a leader change) creates one Job.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use recsys_crds::BatchJob;
use recsys_crds::batch_job::{ConcurrencyPolicy, ConsumedRun, RunTrigger};

use super::RUN_ANNOTATION;
use super::observe::{RunView, UpstreamState};
use super::schedule::{STARTING_DEADLINE, Schedule};

/// Whether the upstreams allow a run.
#[derive(Clone, Debug, PartialEq)]
pub enum Gate {
    /// Every upstream succeeded since this job's last run: these are the runs consumed.
    Open(Vec<ConsumedRun>),
    /// `upstream` has not; `failure` when its latest run since then failed.
    Waiting {
        /// The first upstream waited for.
        upstream: String,
        /// Its failed run and why, when it failed since this job's last run.
        failure: Option<(String, String)>,
    },
}

/// The last run of this job: when its Job was created, and the upstream runs it consumed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Since<'a> {
    /// Creation of the newest Job.
    pub at: Option<Timestamp>,
    /// What it consumed.
    pub consumed: &'a [ConsumedRun],
}

/// The gate of `after` for a job whose last run is `since`. An upstream run counts when it
/// finished after that run was created; Kubernetes times have whole seconds, so one that
/// finished in the same second counts unless that run consumed it already.
pub fn gate(after: &[String], upstreams: &[UpstreamState], since: Since<'_>) -> Gate {
    let mut consumed = vec![];
    for name in after {
        let state = upstreams.iter().find(|u| &u.name == name);
        let seen = |job: &str| since.consumed.iter().any(|c| c.job_name == job);
        let newer =
            |job: &str, t: &Timestamp| since.at.is_none_or(|s| *t > s || (*t == s && !seen(job)));
        match state.and_then(|u| u.last_success.as_ref()) {
            Some((job, at)) if newer(job, at) => consumed.push(ConsumedRun {
                batch_job: name.clone(),
                job_name: job.clone(),
            }),
            _ => {
                let failure = state
                    .and_then(|u| u.last_failure.as_ref())
                    .filter(|(job, at, _)| newer(job, at))
                    .map(|(job, _, why)| (job.clone(), why.clone()));
                return Gate::Waiting {
                    upstream: name.clone(),
                    failure,
                };
            }
        }
    }
    Gate::Open(consumed)
}

/// A run to start.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRequest {
    /// The Job's name.
    pub name: String,
    /// What starts it.
    pub trigger: RunTrigger,
    /// The upstream runs it consumes.
    pub consumed: Vec<ConsumedRun>,
}

/// What to do now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The run to start, if any.
    pub start: Option<RunRequest>,
    /// Running Jobs to delete first (`Replace`).
    pub replace: Vec<String>,
    /// A due run was held by the gate.
    pub held: bool,
    /// A due run was seen too late.
    pub missed: bool,
    /// A due run was skipped: the previous one still runs (`Forbid`).
    pub skipped: bool,
    /// The due time handled now, or the one handled before.
    pub last_schedule_time: Option<Timestamp>,
    /// The next due time.
    pub next_schedule_time: Option<Timestamp>,
    /// The run request handled now, or the one handled before.
    pub last_run_request: Option<String>,
    /// The gate, for jobs with `after`.
    pub gate: Option<Gate>,
    /// When to look again at the latest (the next due time).
    pub wake: Option<Duration>,
}

/// `<batchjob>-<suffix>`, cut to fit the 63-character label limit Jobs inherit.
pub fn job_name(batch_job: &str, suffix: &str) -> String {
    let stem: String = batch_job.chars().take(63 - 1 - suffix.len()).collect();
    format!("{}-{suffix}", stem.trim_end_matches('-'))
}

/// FNV-1a of `s`, 40 bits in hex: short Job name suffixes.
fn short_hash(s: &str) -> String {
    let hash = s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{:010x}", hash & 0xff_ffff_ffff)
}

/// The Job of a run request (the annotation's value).
pub fn run_job_name(batch_job: &str, token: &str) -> String {
    job_name(batch_job, &short_hash(token))
}

/// Decides what to start at `now`.
pub fn plan(
    bj: &BatchJob,
    schedule: Option<&Schedule>,
    runs: &[RunView],
    upstreams: &[UpstreamState],
    now: Timestamp,
) -> Plan {
    let status = bj.status.clone().unwrap_or_default();
    let name = bj.name_any();
    let mut plan = Plan {
        last_schedule_time: status.last_schedule_time.as_ref().map(|t| t.0),
        last_run_request: status.last_run_request.clone(),
        ..Default::default()
    };
    let exists = |job: &str| runs.iter().any(|r| r.job_name == job);
    let since = Since {
        at: runs.first().map(|r| r.created),
        consumed: runs.first().map_or(&[], |r| r.consumed.as_slice()),
    };
    let running: Vec<&RunView> = runs.iter().filter(|r| r.running()).collect();
    let gate_now = (!bj.spec.after.is_empty()).then(|| gate(&bj.spec.after, upstreams, since));
    plan.gate = gate_now.clone();

    // A person asked for a run.
    if let Some(token) = bj.annotations().get(RUN_ANNOTATION)
        && status.last_run_request.as_ref() != Some(token)
    {
        plan.last_run_request = Some(token.clone());
        let job = run_job_name(&name, token);
        if !exists(&job) {
            plan.start = Some(RunRequest {
                name: job,
                trigger: RunTrigger::Manual,
                consumed: match &gate_now {
                    Some(Gate::Open(c)) => c.clone(),
                    _ => vec![],
                },
            });
        }
        return plan;
    }

    let created = bj
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(Timestamp::UNIX_EPOCH, |t| t.0);
    let open = |plan: &mut Plan, name: String, trigger| match &gate_now {
        None => {
            plan.start = Some(RunRequest {
                name,
                trigger,
                consumed: vec![],
            })
        }
        Some(Gate::Open(consumed)) => {
            plan.start = Some(RunRequest {
                name,
                trigger,
                consumed: consumed.clone(),
            })
        }
        Some(Gate::Waiting { .. }) => {}
    };
    match schedule {
        Some(schedule) => {
            plan.next_schedule_time = schedule.next_due(now);
            plan.wake = plan
                .next_schedule_time
                .map(|t| now.duration_until(t).unsigned_abs() + Duration::from_secs(1));
            let Some(due) = schedule.last_due(now) else {
                return plan;
            };
            // Each due time once, and none before the BatchJob existed.
            let handled = plan.last_schedule_time.is_some_and(|t| t >= due);
            if handled || due < created || bj.spec.suspend {
                return plan;
            }
            plan.last_schedule_time = Some(due);
            let late = now.duration_since(due).unsigned_abs() > STARTING_DEADLINE;
            let job = job_name(&name, &format!("{}", due.as_second() / 60));
            if late {
                plan.missed = true;
            } else if matches!(gate_now, Some(Gate::Waiting { .. })) {
                plan.held = true;
            } else if exists(&job) {
                // Started before; the status that said so was lost.
            } else if !running.is_empty() {
                match bj.spec.concurrency_policy {
                    ConcurrencyPolicy::Forbid => plan.skipped = true,
                    ConcurrencyPolicy::Replace => {
                        plan.replace = running.iter().map(|r| r.job_name.clone()).collect();
                        open(&mut plan, job, RunTrigger::Schedule);
                    }
                    ConcurrencyPolicy::Allow => open(&mut plan, job, RunTrigger::Schedule),
                }
            } else {
                open(&mut plan, job, RunTrigger::Schedule);
            }
        }
        None if !bj.spec.after.is_empty() && !bj.spec.suspend => {
            if let Some(Gate::Open(consumed)) = &gate_now {
                let key: Vec<&str> = consumed.iter().map(|c| c.job_name.as_str()).collect();
                let job = job_name(&name, &format!("u{}", short_hash(&key.join(","))));
                let forbid = bj.spec.concurrency_policy == ConcurrencyPolicy::Forbid;
                if !exists(&job) && (!forbid || running.is_empty()) {
                    if bj.spec.concurrency_policy == ConcurrencyPolicy::Replace {
                        plan.replace = running.iter().map(|r| r.job_name.clone()).collect();
                    }
                    open(&mut plan, job, RunTrigger::Upstream);
                }
            }
        }
        None => {}
    }
    plan
}
