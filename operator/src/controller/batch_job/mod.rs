//! BatchJob controller: runs trainer jobs on a schedule, on request, or after their upstreams,
//! and reports every run.
//!
//! The operator starts each run's Job itself (no CronJob): a due run of a job with `after`
//! must be decided at its due time against its upstreams' runs, which a CronJob cannot do, and
//! one mechanism keeps history, lineage, metrics and garbage collection the same for every job.
//! A run is due while an operator replica leads; one seen more than five minutes late is
//! counted as missed, as the CronJob controller does with `startingDeadlineSeconds`.
//!
//! Each reconciliation is a pipeline: read (the BatchJob, its Jobs and their Pods, the
//! upstreams from the cache) → [`validate`] → [`plan`] (what to start) → [`build`] (the Job)
//! → apply (create, replace, collect old Jobs) → [`observe`] (runs, figures from the
//! trainer's summary, the hand-off of [`handoff`]) → [`status`]. Only reading and applying
//! touch the API.
//!
//! Retries use the Job controller: `backoffLimit = maxAttempts − 1` with its exponential
//! backoff, and a pod failure policy that fails the run at once when the trainer exits with
//! [`EXIT_NOT_RETRYABLE`] or [`EXIT_GATE_FAILED`].

pub mod build;
pub mod handoff;
pub mod observe;
pub mod plan;
pub mod schedule;
pub mod status;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, Toleration};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use recsys_crds::batch_job::RunOutcome;
use recsys_crds::{BatchJob, ModelDeployment};
use tracing::{info, instrument};

pub use plan::run_job_name;
pub use validate::{assess, validate};

use super::{Context, Error, RESYNC, WAIT_FOR_DEPENDENCY, write_status};
use observe::{RunView, UpstreamState};
use plan::Plan;

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "batchjob";
/// Label on every Job and Pod of a BatchJob, with the BatchJob's name.
pub const JOB_LABEL: &str = "recsys.io/batchjob";
/// Annotation that requests a run of a BatchJob; each new value is one run.
pub const RUN_ANNOTATION: &str = "recsys.io/run";
/// Annotation on a run's Job: what started it (`Schedule`, `Manual`, `Upstream`).
pub const TRIGGER_ANNOTATION: &str = "recsys.io/trigger";
/// Annotation on a run's Job: the upstream runs it consumes, as JSON.
pub const CONSUMED_ANNOTATION: &str = "recsys.io/consumed";
/// Annotation on a cf-train run's Job: the hand-off of its version, as JSON, once decided.
pub const HAND_OFF_ANNOTATION: &str = "recsys.io/hand-off";
/// Trainer exit code meaning "retrying cannot help" (bad input, invalid configuration).
pub const EXIT_NOT_RETRYABLE: i32 = recsys_core::exit::NOT_RETRYABLE;
/// Trainer exit code meaning "a data-quality gate held": the input failed a blocking check and
/// nothing was published. Not retried: the same data fails the same way.
pub const EXIT_GATE_FAILED: i32 = recsys_core::exit::GATE_FAILED;
/// Name of the trainer container.
pub const CONTAINER: &str = "trainer";

/// How often a BatchJob with a run in progress is looked at (besides its Job's changes).
const WHILE_RUNNING: Duration = Duration::from_secs(10);

/// Operator settings the children are built with.
#[derive(Clone, Debug)]
pub struct TrainerSettings {
    /// Default trainer image.
    pub image: String,
    /// Service account of trainer pods.
    pub service_account: Option<String>,
    /// ConfigMap whose keys become the trainer's environment (optional to exist).
    pub config_map: Option<String>,
    /// Secret whose keys become the trainer's environment (optional to exist).
    pub secret: Option<String>,
    /// Node selector of trainer pods (for example a node pool for batch work).
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of trainer pods.
    pub tolerations: Vec<Toleration>,
}

/// Finished runs already reported (metrics, Events, hand-off), per BatchJob: the status written
/// after reporting reaches the controller's cache a moment later, and a reconciliation in
/// between must not report them again. Holds only runs whose Jobs still exist; after a restart
/// the status history, read fresh, says the same.
#[derive(Debug, Default)]
pub struct ReportedRuns(std::sync::Mutex<BTreeMap<(String, String), Vec<String>>>);

impl ReportedRuns {
    /// The runs of `ns/name` reported before, forgetting those whose Jobs are gone.
    fn take(&self, ns: &str, name: &str, existing: &[RunView]) -> Vec<String> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seen = map.entry((ns.to_owned(), name.to_owned())).or_default();
        seen.retain(|j| existing.iter().any(|r| &r.job_name == j));
        seen.clone()
    }

    /// Marks `job` of `ns/name` as reported.
    fn add(&self, ns: &str, name: &str, job: &str) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry((ns.to_owned(), name.to_owned()))
            .or_default()
            .push(job.to_owned());
    }
}

fn kube_err(e: kube::Error) -> Error {
    Error::Kube(e)
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The upstreams' latest success and failure, from the cached BatchJobs.
fn upstreams(bj: &BatchJob, peers: &[Arc<BatchJob>]) -> Vec<UpstreamState> {
    let ns = bj.namespace();
    bj.spec
        .after
        .iter()
        .map(|name| {
            peers
                .iter()
                .find(|p| p.namespace() == ns && &p.name_any() == name)
                .map(|p| {
                    let history = p.status.as_ref().map(|s| s.history.as_slice());
                    UpstreamState::from_history(name, history.unwrap_or_default())
                })
                .unwrap_or_else(|| UpstreamState {
                    name: name.clone(),
                    ..Default::default()
                })
        })
        .collect()
}

/// Starts what the plan says: the Jobs it replaces go first, then the new run's Job, built with
/// the hand-off comparison when the run trains a model for a ModelDeployment.
async fn apply_plan(
    ctx: &Context,
    bj: &BatchJob,
    plan: &Plan,
    jobs: &Api<Job>,
) -> Result<(), Error> {
    let background = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    for name in &plan.replace {
        match jobs.delete(name, &background).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(kube_err(e)),
        }
    }
    let Some(run) = &plan.start else {
        return Ok(());
    };
    let options = match bj.spec.cf_train.as_ref() {
        Some(cf) if cf.hand_off_to.is_some() => {
            let md = match (&cf.hand_off_to, bj.namespace()) {
                (Some(md), Some(ns)) => Api::<ModelDeployment>::namespaced(ctx.client.clone(), &ns)
                    .get_opt(md)
                    .await
                    .map_err(kube_err)?,
                _ => None,
            };
            handoff::run_options(cf, md.as_ref())
        }
        _ => Default::default(),
    };
    // Validation ran the same command line through the trainer's parser.
    let job = build::run_job(bj, &ctx.trainer, run, &options)
        .map_err(|e| Error::InvalidSpec(e.to_string()))?;
    match jobs.create(&Default::default(), &job).await {
        Ok(_) => {}
        // Started by an earlier decision whose status write was lost.
        Err(e) if is_status(&e, 409) => return Ok(()),
        Err(e) => return Err(kube_err(e)),
    }
    let consumed = run
        .consumed
        .iter()
        .map(|c| format!("{} ({})", c.batch_job, c.job_name))
        .collect::<Vec<_>>();
    let note = match consumed.is_empty() {
        true => format!("run {} started ({})", run.name, run.trigger.as_str()),
        false => format!(
            "run {} started ({}), consuming {}",
            run.name,
            run.trigger.as_str(),
            consumed.join(", ")
        ),
    };
    info!(job = %run.name, trigger = run.trigger.as_str(), "run started");
    ctx.event(bj, EventType::Normal, "RunStarted", note, "Run")
        .await;
    Ok(())
}

/// Hands the version a finished cf-train run registered to its ModelDeployment, once, and
/// records the decision on the run's Job.
async fn hand_off(
    ctx: &Context,
    bj: &BatchJob,
    run: &mut RunView,
    jobs: &Api<Job>,
) -> Result<(), Error> {
    let (Some(cf), Some(finished)) = (bj.spec.cf_train.as_ref(), run.finished.as_mut()) else {
        return Ok(());
    };
    let Some(target) = cf.hand_off_to.as_deref() else {
        return Ok(());
    };
    if finished.outcome != RunOutcome::Succeeded || finished.hand_off.is_some() {
        return Ok(());
    }
    let ns = bj
        .namespace()
        .ok_or_else(|| Error::NoNamespace(bj.name_any()))?;
    let mds: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let md = mds.get_opt(target).await.map_err(kube_err)?;
    let decision = handoff::decide(cf, target, run.summary.as_ref(), md.as_ref());
    if let Some(version) = &decision.set_version {
        let patch = serde_json::json!({
            "apiVersion": "recsys.io/v1alpha1",
            "kind": "ModelDeployment",
            "spec": { "version": version },
        });
        mds.patch(
            target,
            &PatchParams::apply(handoff::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(kube_err)?;
    }
    let record = serde_json::to_string(&decision.hand_off).map_err(Error::Serialize)?;
    jobs.patch(
        &run.job_name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({
            "metadata": { "annotations": { HAND_OFF_ANNOTATION: record } }
        })),
    )
    .await
    .map_err(kube_err)?;
    let h = &decision.hand_off;
    let (type_, reason) = match h.outcome {
        recsys_crds::batch_job::HandOffOutcome::HandedOff => (EventType::Normal, "HandedOff"),
        _ => (EventType::Warning, h.outcome.as_str()),
    };
    let note = format!(
        "run {} → ModelDeployment {}: {}",
        run.job_name, target, h.message
    );
    ctx.event(bj, type_, reason, note.clone(), "HandOff").await;
    if let Some(md) = &md {
        ctx.event(md, type_, reason, note, "HandOff").await;
    }
    finished.hand_off = Some(decision.hand_off);
    Ok(())
}

/// Reconciles one BatchJob.
#[instrument(skip(bj, ctx), fields(name = %bj.name_any(), namespace = bj.namespace().unwrap_or_default()))]
pub async fn reconcile(bj: Arc<BatchJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let name = bj.name_any();
    let ns = bj
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let now = Timestamp::now();

    // Read.
    let peers = ctx.jobs.state();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = ListParams::default().labels(&format!("{JOB_LABEL}={name}"));
    let job_list = jobs.list(&selector).await.map_err(kube_err)?.items;
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&selector)
        .await
        .map_err(kube_err)?
        .items;
    let mut runs = observe::runs(&job_list, &pods);

    // Validate, plan, apply.
    let assessment = validate::assess(&bj, &peers);
    let plan = if assessment.is_accepted() {
        let schedule = schedule::Schedule::of(&bj.spec).ok().flatten();
        let plan = plan::plan(&bj, schedule.as_ref(), &runs, &upstreams(&bj, &peers), now);
        apply_plan(&ctx, &bj, &plan, &jobs).await?;
        Some(plan)
    } else {
        None
    };
    remove_legacy_cronjob(&ctx, &bj, &ns).await?;

    // Observe: runs that finished since the last status.
    let before = bj.status.clone().unwrap_or_default();
    let mut known: Vec<String> = before.history.iter().map(|r| r.job_name.clone()).collect();
    known.extend(ctx.reported_runs.take(&ns, &name, &runs));
    for run in runs.iter_mut() {
        match &run.finished {
            Some(f) if !known.contains(&f.job_name) => {}
            _ => continue,
        }
        // First, so that a failed hand-off leaves the run unreported and is tried again.
        hand_off(&ctx, &bj, run, &jobs).await?;
        let Some(finished) = &run.finished else {
            continue;
        };
        ctx.reported_runs.add(&ns, &name, &finished.job_name);
        ctx.metrics.batch_run(&ns, &name, finished);
        if let Some(summary) = &run.summary {
            ctx.metrics.data_quality(&ns, &name, finished, summary);
        }
        let (type_, reason) = match finished.outcome {
            RunOutcome::Succeeded => (EventType::Normal, "RunSucceeded"),
            RunOutcome::Failed => (EventType::Warning, "RunFailed"),
        };
        let mut note = format!(
            "run {} {} after {} attempt(s)",
            finished.job_name,
            finished.outcome.as_str().to_lowercase(),
            finished.attempts
        );
        if let (Some(events), Some(rows)) = (finished.events, finished.rows) {
            note.push_str(&format!("; {events} events read, {rows} rows written"));
        }
        if let Some(v) = &finished.version {
            note.push_str(&format!("; registered version {v}"));
        }
        if !finished.reason.is_empty() {
            note.push_str(&format!(": {}", finished.reason));
        }
        ctx.event(bj.as_ref(), type_, reason, note, "Run").await;
    }

    // Collect finished Jobs beyond the history limit, with their Pods.
    let limit = usize::try_from(bj.spec.history_limit).unwrap_or(10);
    let expired = observe::expired(&runs, limit);
    let background = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    for job in &expired {
        match jobs.delete(job, &background).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(kube_err(e)),
        }
    }
    runs.retain(|r| !expired.contains(&r.job_name));

    // Status.
    let status = status::desired_status(&bj, &assessment, plan.as_ref(), &runs, now);
    write_status(&ctx, bj.as_ref(), &before, &status).await?;
    if let Some(plan) = &plan {
        announce_schedule(&ctx, &bj, &ns, &name, plan).await;
    }

    // Next.
    if !assessment.is_accepted() {
        return Ok(Action::await_change());
    }
    let mut wake = if assessment.ready == recsys_crds::common::ConditionStatus::True {
        RESYNC
    } else {
        WAIT_FOR_DEPENDENCY
    };
    if let Some(w) = plan.as_ref().and_then(|p| p.wake) {
        wake = wake.min(w);
    }
    if runs.iter().any(RunView::running) {
        wake = wake.min(WHILE_RUNNING);
    }
    Ok(Action::requeue(wake))
}

/// Events and counts for due runs that did not start.
async fn announce_schedule(ctx: &Context, bj: &BatchJob, ns: &str, name: &str, plan: &Plan) {
    let due = plan
        .last_schedule_time
        .map(|t| t.to_string())
        .unwrap_or_default();
    if plan.held {
        ctx.metrics
            .batch_held
            .get_or_create(&crate::metrics::BatchJobLabels {
                namespace: ns.to_owned(),
                job_name: name.to_owned(),
            })
            .inc();
        let why = plan
            .gate
            .as_ref()
            .map(|g| status::upstream_condition(g).2)
            .unwrap_or_default();
        let note = format!("run due at {due} held: {why}");
        ctx.event(bj, EventType::Warning, "RunHeld", note, "Schedule")
            .await;
    }
    if plan.missed {
        let note = format!(
            "run due at {due} missed: seen more than {}s late",
            schedule::STARTING_DEADLINE.as_secs()
        );
        ctx.event(bj, EventType::Warning, "RunMissed", note, "Schedule")
            .await;
    }
    if plan.skipped {
        let note = format!(
            "run due at {due} skipped: the previous run still runs (concurrencyPolicy Forbid)"
        );
        ctx.event(bj, EventType::Normal, "RunSkipped", note, "Schedule")
            .await;
    }
}

/// Earlier versions of the operator ran scheduled BatchJobs through a CronJob of the same name;
/// it goes (its Jobs stay for the history).
async fn remove_legacy_cronjob(ctx: &Context, bj: &BatchJob, ns: &str) -> Result<(), Error> {
    let cronjobs: Api<CronJob> = Api::namespaced(ctx.client.clone(), ns);
    let name = bj.name_any();
    match cronjobs.get_opt(&name).await {
        Ok(Some(cj))
            if cj
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == bj.meta().uid.as_ref()) =>
        {
            cronjobs
                .delete(&name, &Default::default())
                .await
                .map_err(kube_err)?;
            Ok(())
        }
        Ok(_) => Ok(()),
        // Without the permission (a chart that no longer grants it) there is nothing to migrate.
        Err(e) if is_status(&e, 403) => Ok(()),
        Err(e) => Err(kube_err(e)),
    }
}

#[cfg(test)]
mod tests;
