//! ModelDeployment controller, in steps:
//!
//! 1. **validate** the spec beyond the schema ([`validate`]);
//! 2. **apply the scorer workload** it owns ([`super::scorer`]): ServiceAccount, Role,
//!    RoleBinding, Deployment, Service, PodDisruptionBudget and the optional autoscaler;
//! 3. **observe** the scorer pods behind the Service ([`super::fleet`]): which versions each has
//!    loaded and verified, or refused and why;
//! 4. **decide** the status, a pure function of the spec, the old status, the pods and the time
//!    ([`desired_status`], [`super::rollout::advance`]);
//! 5. **publish** the routing table the scorer pods watch (`<name>-routing`), then the status.
//!
//! - A version is routed only once the scorer pods have it loaded: the first version becomes
//!   stable when every ready pod serves it (`InitialVersion`); a version a pod refused (missing
//!   manifest, failed checksum) is never promoted and the conditions quote the pod's reason.
//! - `Ready` means at least one ready scorer pod serves the stable version; its message gives
//!   the Service URL.
//! - While the candidate is shadowed or takes users, its live analysis reads the pods'
//!   `/metrics` every interval ([`super::analysis`]); `failureLimit` failed runs in a row roll
//!   it back (`Degraded=True`, with the failed check and its figures).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use recsys_core::serving::fleet::{Fleet, VersionState};
use recsys_core::serving::routing::{
    CanaryDocument, FORMAT_VERSION, RouteDocument, RoutingDocument, RoutingTable,
};
use recsys_crds::common::READY;
use recsys_crds::common::{self, ConditionStatus};
use recsys_crds::model_deployment::{AnalysisRun, ExperimentStatus, ScorersStatus};
use recsys_crds::{ModelDeployment, ModelDeploymentStatus, Stage};
use tracing::instrument;

use super::{
    Assessment, Context, Error, FIELD_MANAGER, Problem, experiment, fleet, history, rollout,
    scorer, stamped, write_status,
};

/// Key of the routing table in its ConfigMap (what `scorer --routing-configmap-key` defaults to).
pub const ROUTING_KEY: &str = "routing.yaml";
/// Label on every ConfigMap holding a routing table; its value is the ModelDeployment's name.
pub const ROUTING_LABEL: &str = "recsys.io/routing-for";
/// Condition: a rollout is under way (or waiting to be).
pub const PROGRESSING: &str = "Progressing";
/// How soon to retry recording transitions in the registry.
const HISTORY_RETRY: std::time::Duration = std::time::Duration::from_secs(30);
/// Condition: the last rollout failed its analysis and was rolled back.
pub const DEGRADED: &str = "Degraded";

/// Name of the ConfigMap holding the routing table of `md`.
pub fn routing_configmap_name(md: &ModelDeployment) -> String {
    format!("{}-routing", md.name_any())
}

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "modeldeployment";

/// Checks of the spec alone, beyond the schema and CEL rules.
pub fn validate(md: &ModelDeployment) -> Vec<Problem> {
    let spec = &md.spec;
    let mut problems = vec![];
    for (i, step) in spec.strategy.steps.iter().enumerate() {
        let durations = [
            ("shadow.duration", step.shadow.as_ref().map(|s| &s.duration)),
            (
                "canary.duration",
                step.canary.as_ref().and_then(|c| c.duration.as_ref()),
            ),
            (
                "pause.duration",
                step.pause.as_ref().and_then(|p| p.duration.as_ref()),
            ),
        ];
        for (field, d) in durations {
            if let Some(Err(e)) = d.map(|d| d.to_std()) {
                problems.push(Problem::new(
                    format!("spec.strategy.steps[{i}].{field}"),
                    e.to_string(),
                ));
            }
        }
    }
    match spec.strategy.analysis.interval.to_std() {
        Ok(d) if d.as_secs() < 1 => problems.push(Problem::new(
            "spec.strategy.analysis.interval",
            "must be at least 1s: every run reads every scorer pod's metrics (minSamples decides whether a window saw enough)",
        )),
        Ok(_) => {}
        Err(e) => problems.push(Problem::new(
            "spec.strategy.analysis.interval",
            e.to_string(),
        )),
    }
    if let Some(source) = &spec.strategy.analysis.prometheus
        && let Err(e) = super::prometheus::authority(&source.address)
    {
        problems.push(Problem::new("spec.strategy.analysis.prometheus.address", e));
    }
    if let Some(endpoint) = &spec.artifacts.endpoint
        && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
    {
        problems.push(Problem::new(
            "spec.artifacts.endpoint",
            format!("{endpoint:?} must be an http:// or https:// URL"),
        ));
    }
    if spec.artifacts.uri.starts_with("file:///") && spec.scorer.replicas > 1 {
        problems.push(Problem::new(
            "spec.artifacts.uri",
            "a file:/// store is local to one machine; use s3:// with more than one scorer replica",
        ));
    }
    problems
}

/// Assessment of a ModelDeployment's spec. Readiness depends on the scorer pods and is
/// decided by [`desired_status`].
pub fn assess(md: &ModelDeployment) -> Assessment {
    let problems = validate(md);
    if !problems.is_empty() {
        return Assessment::invalid(problems);
    }
    Assessment::accepted(ConditionStatus::Unknown, "Observing", String::new())
}

/// What the routing table of `md` says, for the Ready condition.
fn routing_message(md: &ModelDeployment, status: &ModelDeploymentStatus) -> String {
    let stable = status.stable_version.as_deref().unwrap_or(&md.spec.version);
    let candidate = match status {
        s if s.candidate_version.is_some() && s.stage == Stage::Shadow => {
            format!(", candidate {} shadowed", md.spec.version)
        }
        s if s.candidate_version.is_some() && s.canary_weight > 0 => format!(
            ", candidate {} for {}% of users",
            md.spec.version, s.canary_weight
        ),
        _ => String::new(),
    };
    let pods = status.scorers.as_ref().map_or(0, |s| s.with_stable);
    format!(
        "{pods} scorer pods serve model {model} at {url}: stable {stable}{candidate} (routing table in ConfigMap {name})",
        name = routing_configmap_name(md),
        model = md.spec.model,
        url = scorer::service_url(md),
    )
}

/// Reason of the `Ready` condition of a ModelDeployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
pub enum ReadyReason {
    /// Ready scorer pods serve the stable version.
    Serving,
    /// No ready scorer pod has the stable version loaded yet.
    StableNotLoaded,
    /// A scorer pod refused the stable version.
    VersionRefused,
    /// No scorer pod is ready.
    ScorersNotReady,
}

/// Reason of the `Degraded` condition of a ModelDeployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
pub enum DegradedReason {
    /// The last rollout was rolled back by its analysis.
    AnalysisFailed,
    /// No analysis has failed.
    AsExpected,
}

impl ReadyReason {
    /// The condition's `reason`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl DegradedReason {
    /// The condition's `reason`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The Ready condition's status, reason and message from where the stable version stands.
fn readiness(
    md: &ModelDeployment,
    status: &ModelDeploymentStatus,
    stable: &VersionState,
) -> (ConditionStatus, ReadyReason, String) {
    let version = status.stable_version.as_deref().unwrap_or(&md.spec.version);
    match stable {
        VersionState::Loaded { .. } => (
            ConditionStatus::True,
            ReadyReason::Serving,
            routing_message(md, status),
        ),
        VersionState::Loading { have, .. } if *have > 0 => (
            ConditionStatus::True,
            ReadyReason::Serving,
            format!(
                "{}; {}",
                routing_message(md, status),
                stable.describe(version)
            ),
        ),
        VersionState::Loading { .. } => (
            ConditionStatus::False,
            ReadyReason::StableNotLoaded,
            stable.describe(version),
        ),
        VersionState::Refused { .. } => (
            ConditionStatus::False,
            ReadyReason::VersionRefused,
            stable.describe(version),
        ),
        VersionState::NoReadyPods { .. } => (
            ConditionStatus::False,
            ReadyReason::ScorersNotReady,
            stable.describe(version),
        ),
    }
}

/// What one reconcile saw of the scorer pods.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The versions each pod has loaded or refused.
    pub fleet: Fleet,
    /// The analysis run an interval just closed, if any ([`super::analysis`]).
    pub analysis: Option<AnalysisRun>,
    /// A fresh A/B readout of the candidate, if one was read ([`super::experiment`]).
    pub experiment: Option<ExperimentStatus>,
    /// Why the model's input fails its data-quality checks, if it does ([`input_quality`]).
    pub input_quality: Option<String>,
}

impl From<Fleet> for Observed {
    fn from(fleet: Fleet) -> Self {
        Self {
            fleet,
            analysis: None,
            experiment: None,
            input_quality: None,
        }
    }
}

/// Whether the model's input, the events, fails a blocking data-quality check, and which: the
/// latest finished run with checks among the BatchJobs of `namespace` (a `data-quality` run,
/// or the input checks of a `cf-train` or feature run) decides. Drift of a feature is not the
/// model's input and does not hold it. `None` when no run checked the events or the latest
/// passed.
pub fn input_quality(namespace: &str, jobs: &[Arc<recsys_crds::BatchJob>]) -> Option<String> {
    let (bj, run, dq) = jobs
        .iter()
        .filter(|j| j.namespace().as_deref() == Some(namespace))
        .filter_map(|j| {
            let run = j.status.as_ref()?.history.first()?;
            Some((j, run, run.data_quality.as_ref()?))
        })
        .max_by_key(|(_, run, _)| run.finished_at.as_ref().map(|t| t.0))?;
    let failing: Vec<String> = dq
        .violations
        .iter()
        .filter(|v| v.blocking && !v.target.starts_with("feature:"))
        .map(|v| format!("{} on {}", v.check, v.target))
        .collect();
    if failing.is_empty() {
        return None;
    }
    Some(format!(
        "the model's input fails data-quality checks: {} (BatchJob {} run {}, checks {}); it moves on once a later run passes",
        failing.join(", "),
        bj.name_any(),
        run.job_name,
        dq.run_id
    ))
}

/// The status for `assessment` and what was `observed` of the scorer pods, and when to look
/// again: the first version becomes stable once the scorer pods serve it; a later one is
/// rolled out through the steps ([`rollout::advance`]).
pub fn desired_status(
    md: &ModelDeployment,
    assessment: &Assessment,
    observed: &Observed,
    now: Timestamp,
) -> (ModelDeploymentStatus, Option<std::time::Duration>) {
    let fleet = &observed.fleet;
    let generation = md.metadata.generation;
    let mut status: ModelDeploymentStatus =
        stamped(md.status.as_ref(), assessment, generation, now);
    if !assessment.is_accepted() {
        return (status, None);
    }
    // Readiness is decided below, from the pods: the previous condition stays the reference,
    // so that its transition time moves only when its status does.
    if let Some(previous) = md
        .status
        .as_ref()
        .and_then(|s| common::find_condition(&s.conditions, READY))
    {
        common::set_condition(&mut status.conditions, previous.clone());
    }
    let version = &md.spec.version;
    let model = &md.spec.model;
    let mut requeue = None;
    let progressing = match status.stable_version.clone() {
        None if !fleet.version(model, version).is_loaded() => {
            // Nothing is routed to a version the scorers have not verified; the table names it
            // so that they try.
            let state = fleet.version(model, version);
            status.stage = Stage::Pending;
            let refused = matches!(state, VersionState::Refused { .. });
            requeue = Some(if refused {
                rollout::REFUSED_RECHECK
            } else {
                rollout::LOADING_RECHECK
            });
            Some(common::condition(
                PROGRESSING,
                ConditionStatus::from(!refused),
                if refused {
                    rollout::Reason::VersionRefused
                } else {
                    rollout::Reason::LoadingStable
                }
                .as_str(),
                state.describe(version),
                generation,
                now,
            ))
        }
        None => {
            status.stable_version = Some(version.clone());
            status.candidate_version = None;
            status.stage = Stage::Promoted;
            status.canary_weight = 0;
            status.current_step = None;
            rollout::record(
                &mut status,
                version,
                Stage::Promoted,
                "InitialVersion: the model had no stable version to compare with".to_owned(),
                now,
            );
            Some(common::condition(
                PROGRESSING,
                ConditionStatus::False,
                rollout::Reason::InitialVersion.as_str(),
                format!(
                    "{version} is the first version of {}: stable at once",
                    md.spec.model
                ),
                generation,
                now,
            ))
        }
        Some(stable) if &stable == version => {
            // Nothing is rolling out: an action annotation has nothing to act on.
            if let Some((action, value)) = rollout::pending_action(md, &status) {
                status.last_action = Some(rollout::action_record(action, &value));
            }
            status.candidate_version = None;
            status.stage = Stage::Promoted;
            status.canary_weight = 0;
            status.current_step = None;
            status.step_started_at = None;
            // A condition saying how it became stable stays.
            let settled =
                common::find_condition(&status.conditions, PROGRESSING).is_some_and(|c| {
                    c.status == "False"
                        && [rollout::Reason::InitialVersion, rollout::Reason::Promoted]
                            .iter()
                            .any(|r| r.as_str() == c.reason)
                });
            (!settled).then(|| {
                common::condition(
                    PROGRESSING,
                    ConditionStatus::False,
                    rollout::Reason::NothingToRollOut.as_str(),
                    format!("{version} is the stable version"),
                    generation,
                    now,
                )
            })
        }
        Some(stable) => {
            let evidence = rollout::Evidence {
                candidate: fleet.version(model, version),
                stable: fleet.version(model, &stable),
                analysis: observed.analysis.clone(),
                input_quality: observed.input_quality.clone(),
            };
            let progress = rollout::advance(md, &mut status, &evidence, now);
            requeue = progress.requeue;
            Some(common::condition(
                PROGRESSING,
                ConditionStatus::from(progress.reason.is_progressing()),
                progress.reason.as_str(),
                progress.message,
                generation,
                now,
            ))
        }
    };
    if let Some(c) = progressing {
        common::set_condition(&mut status.conditions, c);
    }
    if let Some(x) = &observed.experiment {
        status.experiment = Some(x.clone());
    }
    if status.stable_version.is_some() {
        let degraded = if status.stage == Stage::RolledBack {
            let why = status
                .history
                .first()
                .map(|r| r.reason.clone())
                .unwrap_or_default();
            common::condition(
                DEGRADED,
                ConditionStatus::True,
                DegradedReason::AnalysisFailed.as_str(),
                format!("{version} was rolled back: {why}"),
                generation,
                now,
            )
        } else {
            common::condition(
                DEGRADED,
                ConditionStatus::False,
                DegradedReason::AsExpected.as_str(),
                "no analysis has failed",
                generation,
                now,
            )
        };
        common::set_condition(&mut status.conditions, degraded);
    }
    let stable_version = status
        .stable_version
        .clone()
        .unwrap_or_else(|| version.clone());
    status.scorers = Some(ScorersStatus {
        pods: i32::try_from(fleet.pods.len()).unwrap_or(i32::MAX),
        ready: i32::try_from(fleet.ready()).unwrap_or(i32::MAX),
        with_stable: i32::try_from(fleet.loaded_on(model, &stable_version)).unwrap_or(i32::MAX),
        with_candidate: status
            .candidate_version
            .as_ref()
            .map(|c| i32::try_from(fleet.loaded_on(model, c)).unwrap_or(i32::MAX)),
    });
    status.service_url = Some(scorer::service_url(md));
    let (ready, reason, message) = readiness(md, &status, &fleet.version(model, &stable_version));
    common::set_condition(
        &mut status.conditions,
        common::condition(READY, ready, reason.as_str(), message, generation, now),
    );
    if ready != ConditionStatus::True && requeue.is_none() {
        requeue = Some(rollout::LOADING_RECHECK);
    }
    (status, requeue)
}

/// The routing table `status` calls for: stable for everyone, the candidate shadowed during a
/// shadow stage and taking `canaryWeight`% of users during a canary stage.
pub fn routing_document(md: &ModelDeployment, status: &ModelDeploymentStatus) -> RoutingDocument {
    let stable = status
        .stable_version
        .clone()
        .unwrap_or_else(|| md.spec.version.clone());
    let candidate = status.candidate_version.clone().filter(|c| *c != stable);
    let (canary, shadow) = match (status.stage, candidate) {
        (Stage::Shadow, Some(c)) => (None, Some(c)),
        // Pending: named with weight 0, so that every scorer pod loads and verifies it before
        // it takes a user; it stays loaded through pauses at weight 0.
        (Stage::Pending | Stage::Canary | Stage::Paused, Some(c)) => (
            Some(CanaryDocument {
                version: c,
                weight: i64::from(status.canary_weight),
            }),
            None,
        ),
        _ => (None, None),
    };
    RoutingDocument {
        format_version: FORMAT_VERSION,
        // The content hash: a table whose routes did not change is the same table, and the
        // scorers do not reload it.
        revision: None,
        models: BTreeMap::from([(
            md.spec.model.clone(),
            RouteDocument {
                stable,
                canary,
                shadow,
                salt: md.spec.routing_salt.clone(),
            },
        )]),
    }
}

/// The ConfigMap holding `document`, owned by `md`. The document is validated first, with the
/// scorer's own rules, so that the operator never publishes a table the scorers would refuse.
pub fn routing_configmap(
    md: &ModelDeployment,
    document: RoutingDocument,
) -> Result<ConfigMap, Problem> {
    let table = RoutingTable::from_document(document)
        .map_err(|e| Problem::new("spec", format!("the routing table would be invalid: {e}")))?;
    let yaml = serde_yaml::to_string(&table.to_document())
        .map_err(|e| Problem::new("spec", format!("the routing table cannot be written: {e}")))?;
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(routing_configmap_name(md)),
            namespace: md.namespace(),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    FIELD_MANAGER.to_owned(),
                ),
                (
                    "app.kubernetes.io/component".to_owned(),
                    "routing".to_owned(),
                ),
                (ROUTING_LABEL.to_owned(), md.name_any()),
                ("recsys.io/model".to_owned(), md.spec.model.clone()),
            ])),
            owner_references: md.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(ROUTING_KEY.to_owned(), yaml)])),
        ..Default::default()
    })
}

/// The transition from `before` to `after`, if the rollout moved: (version, where to).
pub fn transition(
    before: &ModelDeploymentStatus,
    after: &ModelDeploymentStatus,
) -> Option<(String, &'static str)> {
    if after.stable_version != before.stable_version {
        return after.stable_version.clone().map(|v| (v, "promoted"));
    }
    let candidate = after.candidate_version.clone()?;
    let moved = after.stage != before.stage
        || after.canary_weight != before.canary_weight
        || before.candidate_version.as_ref() != Some(&candidate);
    let to = match after.stage {
        Stage::Shadow => "shadow",
        Stage::Canary => "canary",
        Stage::Paused => "paused",
        Stage::RolledBack => "rolled_back",
        Stage::Aborted => "aborted",
        Stage::Pending | Stage::Promoted => return None,
    };
    moved.then_some((candidate, to))
}

/// Counts a rollout transition in `model_deployments_total` and tells it in an Event.
async fn announce_rollout(
    ctx: &Context,
    md: &ModelDeployment,
    before: &ModelDeploymentStatus,
    after: &ModelDeploymentStatus,
) {
    let Some((version, to)) = transition(before, after) else {
        return;
    };
    ctx.metrics
        .deployments
        .get_or_create(&crate::metrics::DeploymentLabels {
            model_name: md.spec.model.clone(),
            version: version.clone(),
            status: to,
        })
        .inc();
    let message = common::find_condition(&after.conditions, PROGRESSING)
        .map_or_else(|| format!("{version}: {to}"), |c| c.message.clone());
    let reason = match to {
        "shadow" => "RolloutShadow",
        "canary" => "RolloutCanary",
        "paused" => "RolloutPaused",
        "promoted" => "Promoted",
        "aborted" => "Aborted",
        _ => "RolledBack",
    };
    // A rollback is what on-call wants to hear about.
    let type_ = if to == "rolled_back" {
        kube::runtime::events::EventType::Warning
    } else {
        kube::runtime::events::EventType::Normal
    };
    ctx.event(md, type_, reason, message, "Rollout").await;
}

/// Queues the transition from `before` to `status`, if any, for the registry's history.
fn queue_transition(before: &ModelDeploymentStatus, status: &mut ModelDeploymentStatus) {
    let Some((version, to)) = transition(before, status) else {
        return;
    };
    let reason = common::find_condition(&status.conditions, PROGRESSING)
        .map_or_else(String::new, |c| c.message.clone());
    let t = history::transition(before, status, &version, to, &reason, Timestamp::now());
    status.unrecorded_transitions.push(t);
    let over = status
        .unrecorded_transitions
        .len()
        .saturating_sub(rollout::HISTORY_LIMIT);
    status.unrecorded_transitions.drain(..over);
}

/// Writes the queued transitions to the registry and takes the recorded ones off the queue;
/// a failure is a Warning Event and the rest wait for the next reconciliation.
async fn record_transitions(
    ctx: &Context,
    md: &ModelDeployment,
    status: &ModelDeploymentStatus,
) -> Result<(), Error> {
    let queued = &status.unrecorded_transitions;
    let (recorded, failure) = history::record(&ctx.client, md, queued).await;
    // Told once per transition that cannot be recorded, not at every retry.
    let new = md
        .status
        .as_ref()
        .is_none_or(|s| s.unrecorded_transitions.len() < queued.len());
    if let Some(e) = failure.filter(|_| new) {
        tracing::warn!(error = %e, queued = queued.len(), "rollout history not recorded in the registry yet");
        ctx.event(
            md,
            kube::runtime::events::EventType::Warning,
            "HistoryNotRecorded",
            format!(
                "{} rollout transitions wait to be recorded in the registry: {e}",
                queued.len() - recorded
            ),
            "Rollout",
        )
        .await;
    }
    if recorded > 0 {
        let mut after = status.clone();
        after.unrecorded_transitions.drain(..recorded);
        write_status(ctx, md, status, &after).await?;
    }
    Ok(())
}

/// Removes the annotation of the manual action `status` records as handled (after the status
/// that records it is written, so a crash in between cannot act on it twice), and an approval
/// left from a rollout that has ended.
async fn clear_handled_action(
    ctx: &Context,
    md: &ModelDeployment,
    ns: &str,
    status: &ModelDeploymentStatus,
) -> Result<(), Error> {
    let Some(annotations) = md.metadata.annotations.as_ref() else {
        return Ok(());
    };
    let handled = rollout::Action::ALL.into_iter().find(|a| {
        annotations.get(a.annotation()).is_some_and(|v| {
            status.last_action.as_deref() == Some(rollout::action_record(*a, v).as_str())
        })
    });
    // An approval belongs to one rollout: once it has ended, a later rollout must not find
    // its pause approved.
    let ended = status.candidate_version.is_none()
        || matches!(status.stage, Stage::Aborted | Stage::RolledBack);
    let stale_approval = ended && annotations.contains_key(rollout::APPROVE_ANNOTATION);
    let mut remove = serde_json::Map::new();
    if let Some(action) = handled {
        remove.insert(action.annotation().to_owned(), serde_json::Value::Null);
    }
    if stale_approval {
        remove.insert(
            rollout::APPROVE_ANNOTATION.to_owned(),
            serde_json::Value::Null,
        );
    }
    if remove.is_empty() {
        return Ok(());
    }
    let patch = serde_json::json!({"metadata": {"annotations": remove}});
    Api::<ModelDeployment>::namespaced(ctx.client.clone(), ns)
        .patch(
            &md.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(Error::Kube)?;
    Ok(())
}

/// Applies one child object with server-side apply under the operator's field manager.
async fn apply<K>(ctx: &Context, ns: &str, obj: &K) -> Result<(), Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + serde::Serialize
        + serde::de::DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    Api::<K>::namespaced(ctx.client.clone(), ns)
        .patch(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .map_err(Error::Kube)?;
    Ok(())
}

/// Applies the scorer workload of `md` ([`scorer`]); removes an autoscaler no longer asked for.
async fn apply_workload(ctx: &Context, ns: &str, md: &ModelDeployment) -> Result<(), Error> {
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    apply(ctx, ns, &scorer::service_account(md)).await?;
    apply(ctx, ns, &scorer::role(md)).await?;
    apply(ctx, ns, &scorer::role_binding(md)).await?;
    apply(ctx, ns, &scorer::deployment(md, &ctx.scorer)).await?;
    apply(ctx, ns, &scorer::service(md)).await?;
    apply(ctx, ns, &scorer::pod_disruption_budget(md)).await?;
    match scorer::autoscaler(md) {
        Some(hpa) => apply(ctx, ns, &hpa).await?,
        None => {
            let api = Api::<HorizontalPodAutoscaler>::namespaced(ctx.client.clone(), ns);
            match api.delete(&scorer::name(md), &Default::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(Error::Kube(e)),
            }
        }
    }
    Ok(())
}

/// The A/B readout of the candidate, read at most once per analysis interval while one is
/// rolling out (a status write wakes the controller again, so reading at every reconciliation
/// would spin under traffic).
async fn read_experiment(
    md: &ModelDeployment,
    endpoints: &[fleet::Endpoint],
) -> Option<ExperimentStatus> {
    let status = md.status.as_ref()?;
    let (stable, candidate) = (
        status.stable_version.as_ref()?,
        status.candidate_version.as_ref()?,
    );
    let interval = super::analysis::interval(&md.spec.strategy.analysis);
    let due = status.experiment.as_ref().is_none_or(|x| {
        &x.candidate_version != candidate
            || x.read_at.0
                + k8s_openapi::jiff::SignedDuration::try_from(interval).unwrap_or_default()
                <= Timestamp::now()
    });
    if !due {
        return None;
    }
    experiment::observe(endpoints, &md.spec.model, stable, candidate).await
}

/// Reconciles one ModelDeployment: its scorer workload, the pods' view of the versions, the
/// routing table, then the status.
#[instrument(skip(md, ctx), fields(name = %md.name_any(), namespace = md.namespace().unwrap_or_default()))]
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let ns = md
        .namespace()
        .ok_or_else(|| Error::NoNamespace(md.name_any()))?;
    let mut assessment = assess(&md);
    let mut observed = Observed::default();
    if assessment.is_accepted() {
        apply_workload(&ctx, &ns, &md).await?;
        let endpoints =
            fleet::endpoints(&ctx.client, &ns, &scorer::name(&md), scorer::PORT_NAME).await?;
        observed = Observed {
            fleet: fleet::observe(&endpoints).await,
            analysis: ctx
                .analyses
                .observe(&md, &endpoints, Timestamp::now())
                .await,
            experiment: read_experiment(&md, &endpoints).await,
            input_quality: input_quality(&ns, &ctx.jobs.state()),
        };
        for check in observed.analysis.iter().flat_map(|r| &r.checks) {
            ctx.metrics
                .analysis_checks
                .get_or_create(&crate::metrics::AnalysisLabels {
                    model_name: md.spec.model.clone(),
                    check: check.check.as_str(),
                    verdict: check.verdict.as_str(),
                })
                .inc();
        }
    }
    let (mut status, mut requeue) = desired_status(&md, &assessment, &observed, Timestamp::now());
    if assessment.is_accepted() {
        match routing_configmap(&md, routing_document(&md, &status)) {
            // Published before the status that describes it, so the status never claims a
            // table the scorers cannot see.
            Ok(cm) => apply(&ctx, &ns, &cm).await?,
            Err(problem) => {
                assessment = Assessment::invalid(vec![problem]);
                (status, requeue) = desired_status(&md, &assessment, &observed, Timestamp::now());
            }
        }
    }
    let before = md.status.clone().unwrap_or_default();
    queue_transition(&before, &mut status);
    if write_status(&ctx, md.as_ref(), &before, &status).await? {
        announce_rollout(&ctx, &md, &before, &status).await;
        if let Some(x) = &observed.experiment {
            experiment::export(&ctx.metrics, &md.spec.model, x);
            if let Some((weight, summary)) = experiment::new_mismatch(before.experiment.as_ref(), x)
            {
                ctx.event(
                    md.as_ref(),
                    kube::runtime::events::EventType::Warning,
                    "SampleRatioMismatch",
                    format!("{} at {weight}%: {summary}", x.candidate_version),
                    "Experiment",
                )
                .await;
            }
        }
    }
    record_transitions(&ctx, &md, &status).await?;
    if !status.unrecorded_transitions.is_empty() {
        requeue = Some(requeue.map_or(HISTORY_RETRY, |r| r.min(HISTORY_RETRY)));
    }
    clear_handled_action(&ctx, &md, &ns, &status).await?;
    // A timed step ends, or scorer pods finish loading, before the periodic resync: look
    // again then.
    Ok(match requeue {
        Some(d) if assessment.is_accepted() => Action::requeue(d.min(super::RESYNC)),
        _ if assessment.is_accepted() => Action::requeue(super::RESYNC),
        _ => assessment.next_action(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use recsys_crds::Stage;

    fn md(yaml: &str) -> ModelDeployment {
        serde_yaml::from_str(yaml).expect("fixture")
    }

    const ALS: &str = r#"
apiVersion: recsys.io/v1alpha1
kind: ModelDeployment
metadata: { name: als, namespace: shop, generation: 4 }
spec:
  model: als
  version: "20261126-0700"
  artifacts: { uri: "s3://models/recsys", endpoint: "http://seaweedfs:8333", forcePathStyle: true }
  routingSalt: "2026-q4"
  strategy:
    steps:
      - shadow: { duration: 30m }
      - canary: { weight: 10, duration: 1h }
      - pause: {}
      - canary: { weight: 50, duration: 1h }
      - full: {}
    analysis: { interval: 1m, maxErrorRate: 0.01, minTopKOverlap: 0.3 }
"#;

    /// Two ready scorer pods with `versions` of `als` loaded.
    fn pods(versions: &[&str]) -> Observed {
        use recsys_core::serving::fleet::{LoadedVersion, PodReport, ScorerStatus};
        let status = ScorerStatus {
            routing_revision: Some("sha256:t".into()),
            loaded: versions
                .iter()
                .map(|v| LoadedVersion {
                    model: "als".into(),
                    name: (*v).into(),
                    version: (*v).into(),
                    offline_ndcg: None,
                })
                .collect(),
            ..Default::default()
        };
        Fleet {
            pods: (1..=2)
                .map(|i| PodReport {
                    address: format!("10.88.0.{i}:8080"),
                    pod: Some(format!("als-scorer-{i}")),
                    ready: true,
                    status: Ok(status.clone()),
                })
                .collect(),
        }
        .into()
    }

    #[test]
    fn the_latest_run_with_checks_on_the_events_decides_the_input_quality() {
        let job = |name: &str, ns: &str, finished: &str, dq: &str| -> Arc<recsys_crds::BatchJob> {
            Arc::new(
                serde_yaml::from_str(&format!(
                    r#"
apiVersion: recsys.io/v1alpha1
kind: BatchJob
metadata: {{ name: {name}, namespace: {ns} }}
spec: {{ job: data-quality }}
status:
  history:
    - jobName: {name}-1
      startedAt: "{finished}"
      finishedAt: "{finished}"
      outcome: Failed
      attempts: 1
      dataQuality: {dq}
"#
                ))
                .expect("fixture"),
            )
        };
        let failing = r#"{ runId: dq-1, passed: false, violations: [
            { check: freshness, checkType: freshness, target: events, blocking: true },
            { check: validity.unknown_product, checkType: validity, target: events, blocking: false } ] }"#;
        let drift = r#"{ runId: dq-3, passed: false, violations: [
            { check: drift.psi, checkType: drift, target: "feature:popularity_score@v1", blocking: true } ] }"#;
        let passing = "{ runId: dq-2, passed: true }";
        let a = job("dq", "shop", "2026-12-05T10:00:00Z", failing);
        let why = input_quality("shop", std::slice::from_ref(&a)).expect("held");
        assert!(
            why.contains("freshness on events")
                && why.contains("BatchJob dq run dq-1")
                && !why.contains("unknown_product"),
            "{why}"
        );
        // A later passing run (of another job) releases it; another namespace's does not.
        let later = job("cf", "shop", "2026-12-05T11:00:00Z", passing);
        assert_eq!(input_quality("shop", &[a.clone(), later]), None);
        let elsewhere = job("cf", "other", "2026-12-05T11:00:00Z", passing);
        assert!(input_quality("shop", &[a.clone(), elsewhere]).is_some());
        // Feature drift is not the model's input.
        let d = job("pop", "shop", "2026-12-05T12:00:00Z", drift);
        assert_eq!(input_quality("shop", &[a, d]), None);
        assert_eq!(input_quality("shop", &[]), None);
    }

    fn table(md: &ModelDeployment, status: &ModelDeploymentStatus) -> RoutingTable {
        let cm = routing_configmap(md, routing_document(md, status)).expect("valid");
        let text = &cm.data.expect("data")[ROUTING_KEY];
        RoutingTable::parse(
            text,
            recsys_core::serving::routing::RoutingFormat::Yaml,
            "test",
        )
        .expect("the scorer accepts what the operator writes")
    }

    #[test]
    fn the_first_version_becomes_stable_and_routes_every_user() {
        let m = md(ALS);
        let got = assess(&m);
        assert!(got.is_accepted(), "{:?}", got.problems);
        let now: Timestamp = "2026-11-26T00:00:00Z".parse().expect("ts");
        let loaded = pods(&["20261126-0700"]);
        let (s, requeue) = desired_status(&m, &got, &loaded, now);
        assert_eq!(requeue, None);
        let ready = common::find_condition(&s.conditions, READY).expect("ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Serving")
        );
        assert!(
            ready.message.contains("http://als-scorer.shop.svc"),
            "{}",
            ready.message
        );
        assert_eq!(s.service_url.as_deref(), Some("http://als-scorer.shop.svc"));
        assert_eq!(
            s.scorers,
            Some(ScorersStatus {
                pods: 2,
                ready: 2,
                with_stable: 2,
                with_candidate: None
            })
        );
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(s.stable_version.as_deref(), Some("20261126-0700"));
        assert_eq!(s.candidate_version, None);
        assert_eq!(s.stage, Stage::Promoted);
        assert_eq!(s.history.len(), 1);
        assert_eq!(s.history[0].outcome, Stage::Promoted);
        let progressing = common::find_condition(&s.conditions, PROGRESSING).expect("cond");
        assert_eq!(progressing.reason, "InitialVersion");

        let t = table(&m, &s);
        let route = t.route("als").expect("als");
        assert_eq!(route.stable(), "20261126-0700");
        assert_eq!((route.canary(), route.shadow()), (None, None));
        assert!(t.revision().starts_with("sha256:"), "{}", t.revision());

        // Reconciling again changes nothing: no second history record.
        let mut again = m.clone();
        again.status = Some(s.clone());
        let (s2, _) = desired_status(&again, &assess(&again), &loaded, now);
        assert_eq!(s2, s);
    }

    #[test]
    fn a_first_version_the_scorers_refuse_is_never_promoted() {
        use recsys_core::serving::fleet::{MissingModel, PodReport, ScorerStatus};
        let m = md(ALS);
        let now: Timestamp = "2026-11-26T00:00:00Z".parse().expect("ts");
        // No pods yet: waiting, not ready, looked at again soon.
        let (s, requeue) = desired_status(&m, &assess(&m), &Observed::default(), now);
        assert_eq!((s.stage, s.stable_version.clone()), (Stage::Pending, None));
        assert_eq!(requeue, Some(rollout::LOADING_RECHECK));
        let ready = common::find_condition(&s.conditions, READY).expect("ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ScorersNotReady")
        );

        // A pod that cannot load it says why, and the conditions quote it.
        let fleet = Fleet {
            pods: vec![PodReport {
                address: "10.88.0.5:8080".into(),
                pod: Some("als-scorer-x".into()),
                ready: false,
                status: Ok(ScorerStatus {
                    missing: vec![MissingModel {
                        model: "als".into(),
                        reason:
                            "model als has no version or alias \"20261126-0700\" in its registry"
                                .into(),
                    }],
                    ..Default::default()
                }),
            }],
        };
        let (s, requeue) = desired_status(&m, &assess(&m), &fleet.into(), now);
        assert_eq!((s.stage, s.stable_version.clone()), (Stage::Pending, None));
        assert_eq!(requeue, Some(rollout::REFUSED_RECHECK));
        assert!(s.history.is_empty(), "{:?}", s.history);
        let progressing = common::find_condition(&s.conditions, PROGRESSING).expect("cond");
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("False", "VersionRefused")
        );
        assert!(
            progressing.message.contains("no version or alias"),
            "{}",
            progressing.message
        );
        let ready = common::find_condition(&s.conditions, READY).expect("ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "VersionRefused")
        );
        // The table names it (the scorers keep trying); no user is served by anything else.
        assert_eq!(
            table(&m, &s).route("als").map(|r| r.stable().to_owned()),
            Some("20261126-0700".into())
        );
    }

    #[test]
    fn a_later_version_is_shadowed_then_held_until_its_analysis_succeeds() {
        let mut m = md(ALS);
        let now: Timestamp = "2026-11-26T00:00:00Z".parse().expect("ts");
        let both = pods(&["20261126-0700", "20261127-0700"]);
        let (first, _) = desired_status(&m, &assess(&m), &both, now);
        m.status = Some(first);
        m.spec.version = "20261127-0700".into();
        m.metadata.generation = Some(5);
        let (s, requeue) = desired_status(&m, &assess(&m), &both, now);
        assert_eq!(s.stable_version.as_deref(), Some("20261126-0700"));
        assert_eq!(s.candidate_version.as_deref(), Some("20261127-0700"));
        assert_eq!(s.stage, Stage::Shadow);
        // The fixture analyses every minute while the candidate is shadowed.
        assert_eq!(requeue, Some(std::time::Duration::from_secs(60)));
        let progressing = common::find_condition(&s.conditions, PROGRESSING).expect("cond");
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("True", "Shadow")
        );
        let ready = common::find_condition(&s.conditions, READY).expect("ready");
        assert!(
            ready.message.contains("candidate 20261127-0700 shadowed"),
            "{}",
            ready.message
        );
        let t = table(&m, &s);
        let route = t.route("als").expect("als");
        assert_eq!(route.stable(), "20261126-0700");
        assert_eq!(route.shadow(), Some("20261127-0700"));
        assert_eq!(route.canary(), None);
        assert_eq!(route.salt(), "2026-q4");

        // After the shadow step it holds until an analysis of the shadow succeeds, and says
        // so; the scorer pods' analysis runs arrive in `Observed`.
        m.status = Some(s);
        let later: Timestamp = "2026-11-26T00:31:00Z".parse().expect("ts");
        let (held, requeue) = desired_status(&m, &assess(&m), &both, later);
        assert_eq!(
            (held.stage, held.canary_weight, requeue),
            (Stage::Shadow, 0, Some(std::time::Duration::from_secs(60)))
        );
        let progressing = common::find_condition(&held.conditions, PROGRESSING).expect("cond");
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("True", "Analyzing")
        );

        // Set back to the stable version: nothing to roll out.
        m.status = Some(held);
        m.spec.version = "20261126-0700".into();
        let (back, _) = desired_status(&m, &assess(&m), &both, later);
        assert_eq!(back.candidate_version, None);
        assert_eq!(back.stage, Stage::Promoted);
        assert!(
            table(&m, &back)
                .route("als")
                .is_some_and(|r| r.shadow().is_none())
        );
    }

    #[test]
    fn canary_and_shadow_stages_write_their_routes() {
        let m = md(ALS);
        let mut s = ModelDeploymentStatus {
            stable_version: Some("v1".into()),
            candidate_version: Some("v2".into()),
            stage: Stage::Shadow,
            ..Default::default()
        };
        let route = |s: &ModelDeploymentStatus| table(&m, s).route("als").cloned().expect("als");
        assert_eq!(route(&s).shadow(), Some("v2"));
        s.stage = Stage::Canary;
        s.canary_weight = 10;
        let r = route(&s);
        assert_eq!(
            (r.shadow(), r.canary().map(|c| (c.version(), c.weight()))),
            (None, Some(("v2", 10)))
        );
        s.stage = Stage::RolledBack;
        let r = route(&s);
        assert_eq!((r.stable(), r.canary(), r.shadow()), ("v1", None, None));
    }

    #[test]
    fn transitions_are_the_moves_of_a_rollout() {
        let stable = ModelDeploymentStatus {
            stable_version: Some("v1".into()),
            stage: Stage::Promoted,
            ..Default::default()
        };
        let shadow = ModelDeploymentStatus {
            candidate_version: Some("v2".into()),
            stage: Stage::Shadow,
            ..stable.clone()
        };
        let canary = ModelDeploymentStatus {
            stage: Stage::Canary,
            canary_weight: 10,
            ..shadow.clone()
        };
        let wider = ModelDeploymentStatus {
            canary_weight: 50,
            ..canary.clone()
        };
        let promoted = ModelDeploymentStatus {
            stable_version: Some("v2".into()),
            ..stable.clone()
        };
        let nothing = ModelDeploymentStatus::default();
        let t = |a, b| transition(a, b).map(|(v, to)| format!("{v} {to}"));
        assert_eq!(t(&nothing, &stable).as_deref(), Some("v1 promoted"));
        assert_eq!(t(&stable, &shadow).as_deref(), Some("v2 shadow"));
        assert_eq!(t(&shadow, &canary).as_deref(), Some("v2 canary"));
        assert_eq!(t(&canary, &wider).as_deref(), Some("v2 canary"));
        assert_eq!(t(&wider, &promoted).as_deref(), Some("v2 promoted"));
        assert_eq!(t(&canary, &canary), None, "no move, nothing counted");
        assert_eq!(t(&promoted, &promoted), None);
    }

    #[test]
    fn problems_name_the_step() {
        let mut m = md(ALS);
        m.spec.strategy.steps[0].shadow = Some(serde_yaml::from_str("duration: 5w").expect("yaml"));
        m.spec.strategy.analysis.interval = "500ms".into();
        m.spec.artifacts.endpoint = Some("seaweedfs:8333".into());
        let got = assess(&m);
        let fields: Vec<&str> = got.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.strategy.steps[0].shadow.duration",
                "spec.strategy.analysis.interval",
                "spec.artifacts.endpoint"
            ]
        );
        assert_eq!(got.ready_reason, "InvalidSpec");
    }

    #[test]
    fn a_prometheus_source_must_be_an_http_url() {
        let mut m = md(ALS);
        m.spec.strategy.analysis.prometheus =
            Some(recsys_crds::model_deployment::PrometheusSource {
                address: "prometheus:9090".into(),
                selector: None,
            });
        let problems = validate(&m);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].field,
            "spec.strategy.analysis.prometheus.address"
        );
        assert!(
            problems[0].message.contains("no http:// scheme"),
            "{problems:?}"
        );
    }

    #[test]
    fn local_stores_cannot_back_several_replicas() {
        let mut m = md(ALS);
        m.spec.artifacts.uri = "file:///var/lib/recsys".into();
        assert_eq!(validate(&m)[0].field, "spec.artifacts.uri");
        m.spec.scorer.replicas = 1;
        assert!(validate(&m).is_empty());
    }
}
