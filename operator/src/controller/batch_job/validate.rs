//! Step 1: is the spec acceptable? Checks beyond the schema and CEL rules (schedule, time
//! zone, deadline, the trainer's own parser over the command line), then `after` against the
//! other BatchJobs of the namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kube::{Resource, ResourceExt};
use recsys_crds::BatchJob;
use recsys_crds::common::ConditionStatus;
use recsys_trainer::contract::{self, ContractError, RunOptions};

use super::RUN_ANNOTATION;
use super::schedule::Schedule;
use crate::controller::{Assessment, Problem, find_cycle};

/// Reasons of a BatchJob's Ready condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadyReason {
    /// Runs when its schedule is due.
    Scheduled,
    /// Its schedule is suspended.
    Suspended,
    /// Runs when the run annotation gets a new value.
    OnDemand,
    /// Runs each time its upstreams have all succeeded.
    AfterUpstream,
    /// `after` names a BatchJob that does not exist.
    UnknownDependency,
    /// `after` closes a cycle.
    DependencyCycle,
}

impl ReadyReason {
    /// The condition reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "Scheduled",
            Self::Suspended => "Suspended",
            Self::OnDemand => "OnDemand",
            Self::AfterUpstream => "AfterUpstream",
            Self::UnknownDependency => "UnknownDependency",
            Self::DependencyCycle => "DependencyCycle",
        }
    }
}

/// Checks of the spec alone, beyond the schema and CEL rules.
pub fn validate(bj: &BatchJob) -> Vec<Problem> {
    let spec = &bj.spec;
    let mut problems = vec![];
    if let Err(errors) = Schedule::of(spec) {
        problems.extend(errors.into_iter().map(|e| Problem::new(e.field, e.message)));
    }
    if spec.time_zone.is_some() && spec.schedule.is_none() {
        problems.push(Problem::new(
            "spec.timeZone",
            "only meaningful with spec.schedule",
        ));
    }
    if let Some(d) = &spec.active_deadline {
        match d.to_std() {
            Ok(d) if d.as_secs() == 0 => {
                problems.push(Problem::new("spec.activeDeadline", "must be at least 1s"))
            }
            Ok(_) => {}
            Err(e) => problems.push(Problem::new("spec.activeDeadline", e.to_string())),
        }
    }
    let mut keys_ok = true;
    for key in spec.parameters.keys() {
        let ok = key.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            keys_ok = false;
            problems.push(Problem::new(
                format!("spec.parameters.{key}"),
                "keys are trainer flag names: lower-case letters, digits and '-', starting with a letter",
            ));
        }
    }
    // The command line every run gets, through the trainer's own parser: a parameter the
    // trainer would refuse is refused here, before any Pod runs.
    if keys_ok {
        match contract::check(spec, &RunOptions::default()) {
            Ok(_) => {}
            Err(ContractError::OwnedByField { key, field }) => problems.push(Problem::new(
                format!("spec.parameters.{key}"),
                format!("set by {field}; remove the parameter"),
            )),
            Err(e) => problems.push(Problem::new("spec.parameters", e.to_string())),
        }
    }
    problems
}

/// Full assessment: spec checks, then `after` against the BatchJobs in the same namespace.
pub fn assess(bj: &BatchJob, others: &[Arc<BatchJob>]) -> Assessment {
    let problems = validate(bj);
    if !problems.is_empty() {
        return Assessment::invalid(problems);
    }
    let ns = bj.namespace();
    let peers: Vec<&BatchJob> = others
        .iter()
        .map(Arc::as_ref)
        .filter(|o| o.namespace() == ns && o.meta().deletion_timestamp.is_none())
        .collect();
    let names: BTreeSet<String> = peers.iter().map(|o| o.name_any()).collect();
    let missing: Vec<&str> = bj
        .spec
        .after
        .iter()
        .map(String::as_str)
        .filter(|a| !names.contains(*a))
        .collect();
    if !missing.is_empty() {
        return Assessment::accepted(
            ConditionStatus::False,
            ReadyReason::UnknownDependency.as_str(),
            format!(
                "spec.after: no BatchJob named {} in this namespace",
                missing.join(", ")
            ),
        );
    }
    let me = bj.name_any();
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for o in &peers {
        if o.name_any() == me {
            continue;
        }
        if let Some(n) = o.meta().name.as_deref() {
            graph
                .entry(n)
                .or_default()
                .extend(o.spec.after.iter().map(String::as_str));
        }
    }
    graph
        .entry(me.as_str())
        .or_default()
        .extend(bj.spec.after.iter().map(String::as_str));
    if let Some(cycle) = find_cycle(&graph, &me) {
        return Assessment::accepted(
            ConditionStatus::False,
            ReadyReason::DependencyCycle.as_str(),
            format!("spec.after forms a cycle: {}", cycle.join(" → ")),
        );
    }
    let job = bj.spec.job.as_str();
    let after = bj.spec.after.join(", ");
    let (reason, message) = match (&bj.spec.schedule, bj.spec.after.is_empty()) {
        (Some(s), _) if bj.spec.suspend => (
            ReadyReason::Suspended,
            format!("schedule {s:?} is suspended; {RUN_ANNOTATION} still starts a run"),
        ),
        (Some(s), true) => (ReadyReason::Scheduled, format!("runs {job} on {s:?}")),
        (Some(s), false) => (
            ReadyReason::Scheduled,
            format!("runs {job} on {s:?} when {after} succeeded since its last run"),
        ),
        (None, false) => (
            ReadyReason::AfterUpstream,
            format!("runs {job} each time {after} succeeded since its last run"),
        ),
        (None, true) => (
            ReadyReason::OnDemand,
            format!("runs {job} when the annotation {RUN_ANNOTATION} gets a new value"),
        ),
    };
    Assessment::accepted(ConditionStatus::True, reason.as_str(), message)
}
