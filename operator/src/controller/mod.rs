//! The three controllers and what they share: context, errors, status writes and Events.

pub mod analysis;
pub mod batch_job;
pub mod experiment;
pub mod feature_definition;
pub mod fleet;
pub mod history;
pub mod model_deployment;
pub mod prometheus;
pub mod rollout;
pub mod scorer;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use recsys_crds::common::{self, ACCEPTED, ConditionStatus, READY};
use recsys_crds::{BatchJob, FeatureDefinition, ModelDeployment};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::metrics::Metrics;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "recsys-operator";

/// Requeue interval of a healthy object (periodic resync).
pub(crate) const RESYNC: Duration = Duration::from_secs(300);
/// Requeue interval while waiting for another object (a dependency, a referenced feature).
pub(crate) const WAIT_FOR_DEPENDENCY: Duration = Duration::from_secs(15);

/// Errors of a reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// Adding or removing a finalizer, or the cleanup it guards, failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The object lacks a namespace (the kinds are namespaced; this should not happen).
    #[error("object {0} has no namespace")]
    NoNamespace(String),
    /// A status could not be serialised.
    #[error("serialising status: {0}")]
    Serialize(#[source] serde_json::Error),
    /// Deletion waits: other objects still depend on this one.
    #[error("{0}")]
    InUse(String),
    /// A child cannot be built from the spec (validation should have refused it).
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
}

impl Error {
    /// Stable label for metrics and Event reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(_)) => "KubeApi",
            Self::Kube(_) => "KubeClient",
            Self::Finalizer(_) => "Finalizer",
            Self::NoNamespace(_) => "NoNamespace",
            Self::Serialize(_) => "Serialize",
            Self::InUse(_) => "InUse",
            Self::InvalidSpec(_) => "InvalidSpec",
        }
    }
}

/// A problem with a spec that the schema cannot catch, with the field it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// JSON path of the field, for example `spec.schedule`.
    pub field: String,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl Problem {
    /// A problem at `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Joins problems into one condition message: `field: message; field: message`.
pub fn describe(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What validation and readiness checks concluded about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    /// Problems that make the spec unacceptable; empty when accepted.
    pub problems: Vec<Problem>,
    /// Whether the object does what it declares.
    pub ready: ConditionStatus,
    /// Reason of the Ready condition (PascalCase).
    pub ready_reason: &'static str,
    /// Message of the Ready condition.
    pub ready_message: String,
}

impl Assessment {
    /// A rejected spec: not accepted, not ready.
    pub fn invalid(problems: Vec<Problem>) -> Self {
        let message = describe(&problems);
        Self {
            problems,
            ready: ConditionStatus::False,
            ready_reason: "InvalidSpec",
            ready_message: message,
        }
    }

    /// An accepted spec with the given readiness.
    pub fn accepted(
        ready: ConditionStatus,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            problems: vec![],
            ready,
            ready_reason: reason,
            ready_message: message.into(),
        }
    }

    /// Whether the spec was accepted.
    pub fn is_accepted(&self) -> bool {
        self.problems.is_empty()
    }

    /// The Accepted and Ready conditions, merged into `conditions`.
    pub fn apply_conditions(
        &self,
        conditions: &mut Vec<Condition>,
        generation: Option<i64>,
        now: Timestamp,
    ) {
        let accepted = if self.is_accepted() {
            common::condition(
                ACCEPTED,
                ConditionStatus::True,
                "Valid",
                "spec is valid",
                generation,
                now,
            )
        } else {
            common::condition(
                ACCEPTED,
                ConditionStatus::False,
                "InvalidSpec",
                describe(&self.problems),
                generation,
                now,
            )
        };
        common::set_condition(conditions, accepted);
        common::set_condition(
            conditions,
            common::condition(
                READY,
                self.ready,
                self.ready_reason,
                self.ready_message.clone(),
                generation,
                now,
            ),
        );
    }

    /// What the controller does next.
    pub fn next_action(&self) -> Action {
        if !self.is_accepted() {
            Action::await_change()
        } else if self.ready == ConditionStatus::True {
            Action::requeue(RESYNC)
        } else {
            Action::requeue(WAIT_FOR_DEPENDENCY)
        }
    }
}

/// Which namespaces the controllers watch.
#[derive(Clone, Debug)]
pub struct Scope {
    namespace: Option<String>,
}

impl Scope {
    /// One namespace, or all of them.
    pub fn new(namespace: Option<String>) -> Self {
        Self { namespace }
    }

    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
}

/// Shared by every reconciliation.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Cache of every FeatureDefinition in scope (lineage and deprecation checks).
    pub features: Store<FeatureDefinition>,
    /// Cache of every BatchJob in scope (`after` checks).
    pub jobs: Store<BatchJob>,
    /// How trainer Jobs are built.
    pub trainer: batch_job::TrainerSettings,
    /// How scorer workloads are built.
    pub scorer: scorer::ScorerSettings,
    /// Baselines of the rollout analyses under way.
    pub analyses: analysis::Analyses,
    /// Finished BatchJob runs already reported.
    pub reported_runs: batch_job::ReportedRuns,
    /// The feature registry FeatureDefinitions are recorded in, if any.
    pub registry: feature_definition::RegistrySettings,
}

impl Context {
    /// Publishes an Event about `obj`; failures are logged, not fatal.
    pub async fn event<K>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let ev = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(truncate(note, 1000)),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            warn!(
                error = &e as &dyn std::error::Error,
                reason, "could not publish event"
            );
        }
    }
}

/// A path from `start` back to itself in a directed graph, if one exists.
pub fn find_cycle<'a>(
    graph: &std::collections::BTreeMap<&'a str, std::collections::BTreeSet<&'a str>>,
    start: &'a str,
) -> Option<Vec<&'a str>> {
    use std::collections::{BTreeMap, BTreeSet};
    fn dfs<'a>(
        graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        node: &'a str,
        start: &'a str,
        path: &mut Vec<&'a str>,
        visited: &mut BTreeSet<&'a str>,
    ) -> bool {
        for &next in graph.get(node).into_iter().flatten() {
            if next == start {
                path.push(next);
                return true;
            }
            if visited.insert(next) {
                path.push(next);
                if dfs(graph, next, start, path, visited) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start];
    let mut visited = BTreeSet::from([start]);
    dfs(graph, start, start, &mut path, &mut visited).then_some(path)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// A status with conditions and an observed generation: what every kind's status shares.
pub trait ConditionedStatus: Serialize + PartialEq + Clone + Default {
    /// The conditions.
    fn conditions(&self) -> &[Condition];
    /// The conditions, to update.
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    /// Sets `observedGeneration`.
    fn set_observed_generation(&mut self, generation: Option<i64>);
}

macro_rules! conditioned_status {
    ($($t:ty),*) => {$(
        impl ConditionedStatus for $t {
            fn conditions(&self) -> &[Condition] {
                &self.conditions
            }
            fn conditions_mut(&mut self) -> &mut Vec<Condition> {
                &mut self.conditions
            }
            fn set_observed_generation(&mut self, generation: Option<i64>) {
                self.observed_generation = generation;
            }
        }
    )*};
}
conditioned_status!(
    recsys_crds::BatchJobStatus,
    recsys_crds::FeatureDefinitionStatus,
    recsys_crds::ModelDeploymentStatus
);

/// The previous status with the assessment's conditions merged in and `observedGeneration`
/// set to `generation`: the part of every desired status that does not depend on the kind.
pub fn stamped<S: ConditionedStatus>(
    previous: Option<&S>,
    assessment: &Assessment,
    generation: Option<i64>,
    now: Timestamp,
) -> S {
    let mut status = previous.cloned().unwrap_or_default();
    assessment.apply_conditions(status.conditions_mut(), generation, now);
    status.set_observed_generation(generation);
    status
}

/// Writes `after` when it differs from `before` and announces condition transitions.
/// Returns whether anything was written.
pub async fn write_status<K, S>(
    ctx: &Context,
    obj: &K,
    before: &S,
    after: &S,
) -> Result<bool, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + Debug,
    S: ConditionedStatus,
{
    if before == after {
        return Ok(false);
    }
    apply_status(&ctx.client, obj, after).await?;
    announce_transitions(ctx, obj, before.conditions(), after.conditions()).await;
    Ok(true)
}

/// Writes `status` with server-side apply under [`FIELD_MANAGER`].
async fn apply_status<K, S>(client: &Client, obj: &K, status: &S) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + Debug,
    S: Serialize,
{
    let ns = obj
        .namespace()
        .ok_or_else(|| Error::NoNamespace(obj.name_any()))?;
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": serde_json::to_value(status).map_err(Error::Serialize)?,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// Publishes Events for condition transitions between `before` and `after`: a Warning when the
/// spec is rejected, Normal when it becomes accepted or ready, Warning when it stops being ready
/// or is not ready for a reason that needs attention ([`needs_attention`]).
async fn announce_transitions<K>(ctx: &Context, obj: &K, before: &[Condition], after: &[Condition])
where
    K: Resource<DynamicType = ()>,
{
    for type_ in [ACCEPTED, READY] {
        let Some(now) = common::find_condition(after, type_) else {
            continue;
        };
        let prev = common::find_condition(before, type_);
        let changed = prev.is_none_or(|p| p.status != now.status || p.reason != now.reason);
        if !changed {
            continue;
        }
        let warning = now.status != "True"
            && (type_ == ACCEPTED
                || prev.is_some_and(|p| p.status == "True")
                || needs_attention(&now.reason));
        let (ev_type, reason) = match (type_, now.status.as_str()) {
            (ACCEPTED, "True") => (EventType::Normal, "Accepted".to_owned()),
            (ACCEPTED, _) => (EventType::Warning, "InvalidSpec".to_owned()),
            (_, "True") => (EventType::Normal, now.reason.clone()),
            _ if warning => (EventType::Warning, now.reason.clone()),
            _ => (EventType::Normal, now.reason.clone()),
        };
        ctx.event(obj, ev_type, &reason, now.message.clone(), type_)
            .await;
    }
}

/// Whether a not-ready condition with `reason` calls for a Warning even on first sight: the
/// spec is rejected, or the feature registry refused or cannot be reached (waiting for another
/// object, by contrast, is Normal).
pub fn needs_attention(reason: &str) -> bool {
    reason == "InvalidSpec" || feature_definition::is_registry_problem(reason)
}

/// The error policy of every controller: count, log once with the source chain, requeue with
/// a short delay (the controller's own backoff spreads repeated failures).
pub fn error_policy<K>(controller: &'static str) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action
where
    K: ResourceExt,
{
    move |obj, err, ctx| {
        ctx.metrics.failure(controller, err.kind());
        warn!(
            controller,
            name = %obj.name_any(),
            namespace = obj.namespace().unwrap_or_default(),
            kind = err.kind(),
            error = err as &dyn std::error::Error,
            "reconcile failed"
        );
        Action::requeue(Duration::from_secs(10))
    }
}

/// Fails early with a clear message when the CRDs are missing.
pub async fn check_crds_installed(client: &Client) -> Result<(), anyhow::Error> {
    let lp = kube::api::ListParams::default().limit(1);
    let checks = [
        (
            "modeldeployments.recsys.io",
            Api::<ModelDeployment>::all(client.clone())
                .list(&lp)
                .await
                .err(),
        ),
        (
            "batchjobs.recsys.io",
            Api::<BatchJob>::all(client.clone()).list(&lp).await.err(),
        ),
        (
            "featuredefinitions.recsys.io",
            Api::<FeatureDefinition>::all(client.clone())
                .list(&lp)
                .await
                .err(),
        ),
    ];
    for (crd, err) in checks {
        if let Some(e) = err {
            anyhow::bail!(
                "cannot list {crd}: {e}. Is the CRD installed? Install with `kubectl apply --server-side -f charts/recsys/crds/`"
            );
        }
    }
    Ok(())
}

/// Runs the three controllers until `stop` flips to true.
pub async fn run_all(
    client: Client,
    scope: Scope,
    trainer: batch_job::TrainerSettings,
    scorer_settings: scorer::ScorerSettings,
    registry: feature_definition::RegistrySettings,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let config = watcher::Config::default().any_semantic();

    let fd_controller = Controller::new(scope.api::<FeatureDefinition>(&client), config.clone());
    let bj_controller = Controller::new(scope.api::<BatchJob>(&client), config.clone());
    // A BatchJob's runs change with its Jobs; a job with `after` wakes when an upstream's
    // status (its last run) changes.
    let peers = bj_controller.store();
    let bj_controller = bj_controller
        .watches(
            scope.api::<Job>(&client),
            watcher::Config::default().labels(batch_job::JOB_LABEL),
            |job| {
                let owner = job.labels().get(batch_job::JOB_LABEL)?;
                Some(ObjectRef::new(owner).within(&job.namespace()?))
            },
        )
        .watches(
            scope.api::<BatchJob>(&client),
            config.clone(),
            move |upstream| {
                let (ns, name) = (upstream.namespace(), upstream.name_any());
                peers
                    .state()
                    .into_iter()
                    .filter(|d| d.namespace() == ns && d.spec.after.contains(&name))
                    .map(|d| ObjectRef::from_obj(d.as_ref()))
                    .collect::<Vec<_>>()
            },
        );
    // A ModelDeployment looks again when its routing table is edited, when its scorer
    // Deployment changes, and when its Service's endpoints do: the EndpointSlices (which carry
    // the Service's labels) change after the Deployment's status when pods become ready or
    // not, and the scorer pods they list are what the rollout reads.
    // And when a BatchJob's history changes: the latest data-quality verdict on the events
    // decides whether its rollout may advance.
    let md_controller = Controller::new(scope.api::<ModelDeployment>(&client), config.clone());
    let deployments = md_controller.store();
    let md_controller = md_controller
        .watches(scope.api::<BatchJob>(&client), config, move |bj| {
            let ns = bj.namespace();
            let has_checks = bj
                .status
                .as_ref()
                .is_some_and(|s| s.history.first().is_some_and(|r| r.data_quality.is_some()));
            deployments
                .state()
                .into_iter()
                .filter(|d| has_checks && d.namespace() == ns)
                .map(|d| ObjectRef::from_obj(d.as_ref()))
                .collect::<Vec<_>>()
        })
        .owns(
            scope.api::<ConfigMap>(&client),
            watcher::Config::default().labels(model_deployment::ROUTING_LABEL),
        )
        .owns(
            scope.api::<k8s_openapi::api::apps::v1::Deployment>(&client),
            watcher::Config::default().labels(scorer::SCORER_LABEL),
        )
        .watches(
            scope.api::<k8s_openapi::api::discovery::v1::EndpointSlice>(&client),
            watcher::Config::default().labels(scorer::SCORER_LABEL),
            |slice| {
                let owner = slice.labels().get(scorer::SCORER_LABEL)?;
                Some(ObjectRef::new(owner).within(&slice.namespace()?))
            },
        );

    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        features: fd_controller.store(),
        jobs: bj_controller.store(),
        trainer,
        scorer: scorer_settings,
        analyses: analysis::Analyses::default(),
        reported_runs: Default::default(),
        registry,
    });

    info!("starting controllers");
    let fd = fd_controller
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(
            feature_definition::reconcile,
            error_policy(feature_definition::CONTROLLER),
            ctx.clone(),
        )
        .for_each(|r| log_result(feature_definition::CONTROLLER, r));
    let bj = bj_controller
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(
            batch_job::reconcile,
            error_policy(batch_job::CONTROLLER),
            ctx.clone(),
        )
        .for_each(|r| log_result(batch_job::CONTROLLER, r));
    let md = md_controller
        .graceful_shutdown_on(stopped(stop))
        .run(
            model_deployment::reconcile,
            error_policy(model_deployment::CONTROLLER),
            ctx,
        )
        .for_each(|r| log_result(model_deployment::CONTROLLER, r));
    tokio::join!(fd, bj, md);
    info!("controllers stopped");
}

async fn log_result<K, QErr>(
    controller: &'static str,
    result: Result<(ObjectRef<K>, Action), kube::runtime::controller::Error<Error, QErr>>,
) where
    K: Resource,
    QErr: std::error::Error + 'static,
{
    use kube::runtime::controller::Error as CtrlError;
    match result {
        Ok((obj, _)) => tracing::debug!(controller, object = %obj, "reconciled"),
        // Logged once already, with its source chain, by the error policy.
        Err(CtrlError::ReconcilerFailed(..)) => {}
        Err(e) => error!(
            controller,
            error = &e as &dyn std::error::Error,
            "controller error"
        ),
    }
}
