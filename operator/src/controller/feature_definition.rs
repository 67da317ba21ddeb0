//! FeatureDefinition controller: validates a definition against the others in its namespace
//! (lineage resolves, no cycles, breaking changes bump the major version, deprecations name an
//! existing successor), records each valid version in the feature registry, reports the
//! registration and the freshness of the values in status, and protects features that others
//! still read from deletion.
//!
//! The pipeline: [`assess`] (pure) → [`record`] (the registry, when `--database-url` is set
//! and the definition is valid with its lineage resolved) → [`with_registry`] and
//! [`desired_status`] (pure) → server-side apply of the status → [`next_action`] (pure).
//!
//! Registry outcomes:
//! - **Recorded** (or already recorded with the same spec): `Registered=True`;
//!   `registeredVersion`, `registeredAt`, `lastMaterialization` (the registry's latest run of
//!   the major version, recorded by the trainer jobs) and `freshness` (against `spec.ttl`) are
//!   refreshed every `--registry-refresh-interval`, and when the values are due to turn stale.
//! - **Refused** (a different spec under a registered version, a breaking change within a
//!   major version, a retired major): `Ready=False` reason `RegistryRefused` with the
//!   registry's message, `Registered=False` with the registry's error kind, a Warning Event on
//!   the transition, and only the slow periodic resync: the spec has to change. A spec the
//!   registry finds invalid is rejected like any invalid spec (`Accepted=False`).
//! - **Unavailable** (Postgres down, a failed migration): `Ready=False` reason
//!   `RegistryUnavailable`, `freshness: Unknown`, retried with a per-object exponential
//!   backoff; other definitions and the other kinds keep reconciling.
//! - **Not configured**: the definition is validated only; `Ready` says what validation found
//!   and `Registered=False` reason `RegistryNotConfigured` says that nothing is recorded.
//!
//! A deprecation block in the spec is passed to the registry, which deprecates the version
//! (lifecycle, not content, so a registered version may gain one); once its `sunset` has
//! passed, the version is retired in the registry (jobs stop computing it, scorers stop
//! serving it). Deleting a FeatureDefinition does **not** delete or retire anything in the
//! registry: the registry is
//! the history of every version that was served, which consumers and old training sets may
//! still refer to, and one feature name may be declared in several namespaces or clusters.
//! Retiring otherwise is an explicit registry operation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use recsys_core::features::FeatureRef;
use recsys_core::features::registry::{FeatureSpec, Materialization, Registered, RegistryError};
use recsys_crds::common::{self, ConditionStatus};
use recsys_crds::feature_definition::{FeatureDefinitionSpec, Freshness};
use recsys_crds::{FeatureDefinition, FeatureDefinitionStatus};
use tracing::{info, instrument, warn};

use super::{Assessment, Context, Error, Problem, RESYNC, find_cycle, stamped, write_status};
use crate::metrics::Metrics;
use crate::registry::{AccessError, BACKOFF_BASE, RegistryClient};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "featuredefinition";
/// Finalizer that keeps a feature while other features' lineage still reads it.
pub const FINALIZER: &str = "featuredefinitions.recsys.io/in-use-protection";
/// Condition type: the version is recorded in the feature registry (or why it is not).
pub const REGISTERED: &str = "Registered";
/// Ready reason: the registry refused the version.
pub const REGISTRY_REFUSED: &str = "RegistryRefused";
/// Ready and Registered reason: the registry cannot be reached or failed.
pub const REGISTRY_UNAVAILABLE: &str = "RegistryUnavailable";
/// Registered reason: the operator runs without a registry.
pub const REGISTRY_NOT_CONFIGURED: &str = "RegistryNotConfigured";
/// Shortest re-check of freshness derived from a (very short) TTL.
const MIN_TTL_RECHECK: Duration = Duration::from_secs(10);
/// Longest a reconcile waits for the registry (connection, registration and reads), so that a
/// hung database cannot hold a reconcile forever.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where FeatureDefinitions are recorded, and how often their status is refreshed.
#[derive(Clone)]
pub struct RegistrySettings {
    /// The registry; without one, definitions are validated only.
    pub client: Option<Arc<RegistryClient>>,
    /// How often a registered definition's last materialization and freshness are re-read.
    pub refresh: Duration,
}

/// Whether a Ready reason is a registry problem that needs attention (a Warning Event).
pub fn is_registry_problem(reason: &str) -> bool {
    reason == REGISTRY_REFUSED || reason == REGISTRY_UNAVAILABLE
}

/// Checks of the spec alone, beyond what the schema and CEL rules enforce.
pub fn validate(spec: &FeatureDefinitionSpec) -> Vec<Problem> {
    let mut problems = vec![];
    if let Err(e) = semver::Version::parse(&spec.version) {
        problems.push(Problem::new(
            "spec.version",
            format!("not a semantic version: {e}"),
        ));
    }
    match spec.ttl.to_std() {
        Ok(d) if d.is_zero() => problems.push(Problem::new("spec.ttl", "must be longer than zero")),
        Ok(_) => {}
        Err(e) => problems.push(Problem::new("spec.ttl", e.to_string())),
    }
    for (field, d) in [
        ("spec.computation.window", &spec.computation.window),
        ("spec.computation.halfLife", &spec.computation.half_life),
    ] {
        if let Some(Err(e)) = d.as_ref().map(|d| d.to_std()) {
            problems.push(Problem::new(field, e.to_string()));
        }
    }
    if let Some(lineage) = &spec.lineage {
        let mut seen = BTreeSet::new();
        for f in &lineage.features {
            if !seen.insert(f) {
                problems.push(Problem::new(
                    "spec.lineage.features",
                    format!("{f} is listed twice"),
                ));
            }
        }
    }
    problems
}

/// Full assessment: the spec's own checks, then its relation to `others`, the definitions in
/// the same namespace (may include `fd` itself; it is skipped by name).
pub fn assess(fd: &FeatureDefinition, others: &[Arc<FeatureDefinition>]) -> Assessment {
    let problems = validate(&fd.spec);
    if !problems.is_empty() {
        return Assessment::invalid(problems);
    }
    let me = fd.name_any();
    let peers: Vec<&FeatureDefinition> = others
        .iter()
        .map(Arc::as_ref)
        .filter(|o| {
            o.name_any() != me
                && o.namespace() == fd.namespace()
                && o.meta().deletion_timestamp.is_none()
        })
        .collect();

    // Same feature name and version declared twice.
    if let Some(dup) = peers
        .iter()
        .find(|o| o.spec.name == fd.spec.name && o.spec.version == fd.spec.version)
    {
        return Assessment::accepted(
            ConditionStatus::False,
            "DuplicateVersion",
            format!(
                "{} version {} is also declared by FeatureDefinition {}",
                fd.spec.name,
                fd.spec.version,
                dup.name_any()
            ),
        );
    }

    // A breaking change (entity or value type) within one major version.
    let my_version = semver::Version::parse(&fd.spec.version).ok();
    for o in peers.iter().filter(|o| o.spec.name == fd.spec.name) {
        let Ok(theirs) = semver::Version::parse(&o.spec.version) else {
            continue;
        };
        let Some(mine) = &my_version else { continue };
        let breaking = o.spec.entity != fd.spec.entity
            || o.spec.value_type != fd.spec.value_type
            || o.spec.dimension != fd.spec.dimension;
        if breaking && theirs.major == mine.major && mine > &theirs {
            return Assessment::accepted(
                ConditionStatus::False,
                "BreakingChangeNeedsMajorVersion",
                format!(
                    "{} {} changes entity or value type of {} {}: a breaking change needs a new major version ({}.0.0)",
                    fd.spec.name,
                    mine,
                    o.spec.name,
                    theirs,
                    mine.major + 1
                ),
            );
        }
    }

    let known: BTreeSet<&str> = peers.iter().map(|o| o.spec.name.as_str()).collect();
    let inputs = fd
        .spec
        .lineage
        .as_ref()
        .map(|l| l.features.as_slice())
        .unwrap_or_default();
    let missing: Vec<&str> = inputs
        .iter()
        .map(String::as_str)
        .filter(|f| !known.contains(f))
        .collect();
    if !missing.is_empty() {
        return Assessment::accepted(
            ConditionStatus::False,
            "UnresolvedLineage",
            format!(
                "spec.lineage.features: no FeatureDefinition in this namespace defines {}",
                missing.join(", ")
            ),
        );
    }

    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for o in peers.iter().copied().chain(std::iter::once(fd)) {
        let entry = graph.entry(o.spec.name.as_str()).or_default();
        if let Some(l) = &o.spec.lineage {
            entry.extend(l.features.iter().map(String::as_str));
        }
    }
    if let Some(cycle) = find_cycle(&graph, &fd.spec.name) {
        return Assessment::accepted(
            ConditionStatus::False,
            "LineageCycle",
            format!(
                "spec.lineage.features: lineage forms a cycle: {}",
                cycle.join(" → ")
            ),
        );
    }

    if let Some(dep) = &fd.spec.deprecation
        && !known.contains(dep.replaced_by.as_str())
    {
        return Assessment::accepted(
            ConditionStatus::False,
            "UnresolvedReplacement",
            format!(
                "spec.deprecation.replacedBy: no FeatureDefinition in this namespace defines {}",
                dep.replaced_by
            ),
        );
    }

    let (reason, message) = match &fd.spec.deprecation {
        Some(d) => (
            "Deprecated",
            format!("deprecated in favour of {}", d.replaced_by),
        ),
        None => (
            "Resolved",
            format!(
                "{} {} is valid and its lineage resolves",
                fd.spec.name, fd.spec.version
            ),
        ),
    };
    Assessment::accepted(ConditionStatus::True, reason, message)
}

/// Names of the features whose lineage reads `name`, among `others`.
pub fn dependents(
    name: &str,
    namespace: Option<&str>,
    others: &[Arc<FeatureDefinition>],
) -> Vec<String> {
    let mut out: Vec<String> = others
        .iter()
        .filter(|o| o.namespace().as_deref() == namespace && o.meta().deletion_timestamp.is_none())
        .filter(|o| {
            o.spec
                .lineage
                .as_ref()
                .is_some_and(|l| l.features.iter().any(|f| f == name))
        })
        .map(|o| o.name_any())
        .collect();
    out.sort();
    out
}

/// The registry's form of a spec: the CRD spec's JSON read as a [`FeatureSpec`] (the two
/// share their field names and spellings).
pub fn registry_spec(spec: &FeatureDefinitionSpec) -> Result<FeatureSpec, serde_json::Error> {
    serde_json::from_value(serde_json::to_value(spec)?)
}

/// What the feature registry made of one definition.
#[derive(Clone, Debug, PartialEq)]
pub enum RegistryOutcome {
    /// The operator runs without a registry.
    NotConfigured,
    /// Not recorded: the definition is invalid or its lineage does not resolve yet.
    NotAttempted,
    /// Recorded now, or before with the same spec.
    Registered {
        /// The version and when it was first recorded.
        registered: Registered,
        /// The latest materialization run of its major version.
        last_materialization: Option<Materialization>,
    },
    /// The registry finds the spec invalid.
    Rejected {
        /// The registry's message.
        message: String,
    },
    /// The registry refused the version; only a spec change can help.
    Refused {
        /// The registry's error kind, for example `FeatureVersionConflict`.
        kind: &'static str,
        /// The registry's message.
        message: String,
    },
    /// The registry cannot be reached or failed; retried with backoff.
    Unavailable {
        /// The error's kind, for example `RegistryConnect`.
        kind: &'static str,
        /// What failed.
        message: String,
    },
}

fn outcome_label<T>(result: &Result<T, RegistryError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => e.kind(),
    }
}

/// Records `spec` in the registry and reads the last materialization of its major version.
/// Never fails: every error becomes an outcome (and is logged here, once).
pub async fn record(
    client: &RegistryClient,
    metrics: &Metrics,
    spec: &FeatureDefinitionSpec,
) -> RegistryOutcome {
    let crd_spec = spec;
    let spec = match registry_spec(spec) {
        Ok(spec) => spec,
        Err(e) => {
            return RegistryOutcome::Rejected {
                message: format!("the spec does not convert into the registry's form: {e}"),
            };
        }
    };
    let work = async {
        let registry = client.get().await?;
        let registered = registry.register(&spec).await;
        metrics.registry("register", outcome_label(&registered));
        let registered = registered?;
        // A deprecated version whose sunset has passed stops being served: retired in the
        // registry (idempotent), so jobs stop computing it and scorers stop serving it.
        if sunset_passed(crd_spec, Timestamp::now()) {
            let retired = registry.retire(&spec.name, &spec.version).await;
            metrics.registry("retire", outcome_label(&retired));
            if retired?.retired_at_ms.is_some() {
                info!(feature = %spec.name, version = %spec.version, "sunset passed: retired");
            }
        }
        let feature = FeatureRef::new(spec.name.clone(), registered.major);
        let last = registry.last_materialization(&feature).await;
        metrics.registry("last_materialization", outcome_label(&last));
        Ok::<_, AccessError>((registered, last?))
    };
    let result = tokio::time::timeout(REGISTRY_TIMEOUT, work)
        .await
        .unwrap_or(Err(AccessError::Timeout(REGISTRY_TIMEOUT)));
    match result {
        Ok((registered, last_materialization)) => RegistryOutcome::Registered {
            registered,
            last_materialization,
        },
        Err(e) => classify(&spec, &e),
    }
}

/// Whether `spec` is deprecated with a sunset at or before `now`.
pub fn sunset_passed(spec: &FeatureDefinitionSpec, now: Timestamp) -> bool {
    spec.deprecation
        .as_ref()
        .and_then(|d| d.sunset.as_ref())
        .is_some_and(|t| t.0 <= now)
}

/// Sorts a registry error into a refusal of the spec or an unavailable registry.
fn classify(spec: &FeatureSpec, e: &AccessError) -> RegistryOutcome {
    let log_refusal = || {
        info!(
            feature = %spec.name,
            version = %spec.version,
            kind = e.kind(),
            error = e as &dyn std::error::Error,
            "the feature registry refused the version"
        );
    };
    match e {
        AccessError::Registry(RegistryError::InvalidSpec { .. }) => {
            log_refusal();
            RegistryOutcome::Rejected {
                message: e.to_string(),
            }
        }
        AccessError::Registry(
            RegistryError::VersionConflict { .. }
            | RegistryError::BreakingChange { .. }
            | RegistryError::Retired { .. }
            | RegistryError::NotFound { .. }
            | RegistryError::NotDeprecated { .. }
            | RegistryError::InvalidArgument(_),
        ) => {
            log_refusal();
            RegistryOutcome::Refused {
                kind: e.kind(),
                message: e.to_string(),
            }
        }
        _ => {
            warn!(
                feature = %spec.name,
                version = %spec.version,
                kind = e.kind(),
                error = e as &dyn std::error::Error,
                "feature registry unavailable"
            );
            RegistryOutcome::Unavailable {
                kind: e.kind(),
                message: e.to_string(),
            }
        }
    }
}

/// The assessment after the registry: a refusal or an unavailable registry makes the
/// definition not ready, a spec the registry finds invalid is rejected.
pub fn with_registry(assessment: Assessment, outcome: &RegistryOutcome) -> Assessment {
    match outcome {
        RegistryOutcome::NotConfigured | RegistryOutcome::NotAttempted => assessment,
        RegistryOutcome::Registered { .. } => Assessment {
            ready_message: format!(
                "{}; recorded in the feature registry",
                assessment.ready_message
            ),
            ..assessment
        },
        RegistryOutcome::Rejected { message } => {
            Assessment::invalid(vec![Problem::new("spec", message.clone())])
        }
        RegistryOutcome::Refused { message, .. } => {
            Assessment::accepted(ConditionStatus::False, REGISTRY_REFUSED, message.clone())
        }
        RegistryOutcome::Unavailable { message, .. } => Assessment::accepted(
            ConditionStatus::False,
            REGISTRY_UNAVAILABLE,
            format!("the feature registry is unavailable, retrying with backoff: {message}"),
        ),
    }
}

/// The `Registered` condition's status, reason and message for `outcome`.
pub fn registered_condition(
    spec: &FeatureDefinitionSpec,
    outcome: &RegistryOutcome,
) -> (ConditionStatus, &'static str, String) {
    match outcome {
        RegistryOutcome::NotConfigured => (
            ConditionStatus::False,
            REGISTRY_NOT_CONFIGURED,
            "no feature registry is configured: the operator records versions when started with --database-url (RECSYS_DATABASE_URL)".into(),
        ),
        RegistryOutcome::NotAttempted => (
            ConditionStatus::Unknown,
            "NotAttempted",
            "the version is recorded once the definition is valid and its lineage resolves (see Ready)".into(),
        ),
        RegistryOutcome::Registered { registered, .. } => (
            ConditionStatus::True,
            "Registered",
            format!(
                "{} {} is recorded in the feature registry (values stored under major version {})",
                spec.name, registered.version, registered.major
            ),
        ),
        RegistryOutcome::Rejected { message } => (
            ConditionStatus::False,
            "FeatureSpecInvalid",
            message.clone(),
        ),
        RegistryOutcome::Refused { kind, message } => {
            (ConditionStatus::False, kind, message.clone())
        }
        RegistryOutcome::Unavailable { message, .. } => (
            ConditionStatus::Unknown,
            REGISTRY_UNAVAILABLE,
            message.clone(),
        ),
    }
}

/// Freshness of values last materialized at `last_at_ms` (ms since the epoch), judged at
/// `now` against `ttl`: fresh while no older than the TTL.
pub fn freshness(last_at_ms: Option<i64>, ttl: Duration, now: Timestamp) -> Freshness {
    let Some(at) = last_at_ms else {
        return Freshness::NeverMaterialized;
    };
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    if now.as_millisecond().saturating_sub(at) <= ttl_ms {
        Freshness::Fresh
    } else {
        Freshness::Stale
    }
}

/// A registry time (ms since the epoch) as a status time; status times have whole seconds.
fn status_time(ms: i64) -> Option<Time> {
    Timestamp::from_second(ms.div_euclid(1000)).ok().map(Time)
}

/// The status for `assessment` and `outcome`, keeping what the previous status knew when the
/// registry did not answer.
pub fn desired_status(
    fd: &FeatureDefinition,
    assessment: &Assessment,
    outcome: &RegistryOutcome,
    now: Timestamp,
) -> FeatureDefinitionStatus {
    let generation = fd.metadata.generation;
    let mut status = stamped(fd.status.as_ref(), assessment, generation, now);
    let (registered, reason, message) = registered_condition(&fd.spec, outcome);
    common::set_condition(
        &mut status.conditions,
        common::condition(REGISTERED, registered, reason, message, generation, now),
    );
    match outcome {
        RegistryOutcome::Registered {
            registered,
            last_materialization,
        } => {
            let last = last_materialization.as_ref().map(|m| m.at_ms);
            status.registered_version = Some(registered.version.clone());
            status.registered_at = status_time(registered.registered_at_ms);
            status.last_materialization = last.and_then(status_time);
            status.freshness = Some(match fd.spec.ttl.to_std() {
                Ok(ttl) => freshness(last, ttl, now),
                Err(_) => Freshness::Unknown,
            });
        }
        RegistryOutcome::NotConfigured | RegistryOutcome::Unavailable { .. } => {
            status.freshness = Some(Freshness::Unknown);
        }
        RegistryOutcome::NotAttempted
        | RegistryOutcome::Rejected { .. }
        | RegistryOutcome::Refused { .. } => {}
    }
    status
}

/// When to look again at a registered definition: every `refresh`, and just after its values
/// turn stale when that comes first.
pub fn refresh_after(
    last_at_ms: Option<i64>,
    ttl: Duration,
    refresh: Duration,
    now: Timestamp,
) -> Duration {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let now_ms = now.as_millisecond();
    let until_stale = last_at_ms
        .map(|at| at.saturating_add(ttl_ms))
        .filter(|stale_at| *stale_at >= now_ms)
        .map(|stale_at| {
            Duration::from_millis(u64::try_from(stale_at - now_ms).unwrap_or(u64::MAX))
                .saturating_add(Duration::from_secs(1))
        });
    match until_stale {
        Some(d) => refresh.min(d),
        None => refresh.min(ttl.max(MIN_TTL_RECHECK)),
    }
}

/// What the controller does next: wait for a change of an invalid spec, back off while the
/// registry is unavailable (`retry`), resync slowly after a refusal, refresh a registered
/// definition's freshness ([`refresh_after`]), or what the assessment says.
pub fn next_action(
    spec: &FeatureDefinitionSpec,
    assessment: &Assessment,
    outcome: &RegistryOutcome,
    retry: Option<Duration>,
    refresh: Duration,
    now: Timestamp,
) -> Action {
    if !assessment.is_accepted() {
        return Action::await_change();
    }
    match outcome {
        RegistryOutcome::Unavailable { .. } => Action::requeue(retry.unwrap_or(BACKOFF_BASE)),
        RegistryOutcome::Refused { .. } => Action::requeue(RESYNC),
        RegistryOutcome::Registered {
            last_materialization,
            ..
        } => Action::requeue(match spec.ttl.to_std() {
            Ok(ttl) => refresh_after(
                last_materialization.as_ref().map(|m| m.at_ms),
                ttl,
                refresh,
                now,
            ),
            Err(_) => refresh,
        }),
        RegistryOutcome::NotConfigured
        | RegistryOutcome::NotAttempted
        | RegistryOutcome::Rejected { .. } => assessment.next_action(),
    }
}

fn object_key(fd: &FeatureDefinition) -> String {
    format!("{}/{}", fd.namespace().unwrap_or_default(), fd.name_any())
}

/// Reconciles one FeatureDefinition.
#[instrument(skip(fd, ctx), fields(name = %fd.name_any(), namespace = fd.namespace().unwrap_or_default()))]
pub async fn reconcile(fd: Arc<FeatureDefinition>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let ns = fd
        .namespace()
        .ok_or_else(|| Error::NoNamespace(fd.name_any()))?;
    let api: Api<FeatureDefinition> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, fd, |event| async {
        match event {
            Finalizer::Apply(fd) => apply(&fd, &ctx).await,
            Finalizer::Cleanup(fd) => cleanup(&fd, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply(fd: &FeatureDefinition, ctx: &Context) -> Result<Action, Error> {
    let lineage = assess(fd, &ctx.features.state());
    let outcome = match &ctx.registry.client {
        None => RegistryOutcome::NotConfigured,
        Some(_) if lineage.ready != ConditionStatus::True => RegistryOutcome::NotAttempted,
        Some(client) => record(client, &ctx.metrics, &fd.spec).await,
    };
    let retry = ctx.registry.client.as_ref().and_then(|client| {
        let key = object_key(fd);
        if matches!(outcome, RegistryOutcome::Unavailable { .. }) {
            Some(client.backoff(&key))
        } else {
            client.reset(&key);
            None
        }
    });
    let now = Timestamp::now();
    let assessment = with_registry(lineage, &outcome);
    let status = desired_status(fd, &assessment, &outcome, now);
    write_status(ctx, fd, &fd.status.clone().unwrap_or_default(), &status).await?;
    Ok(next_action(
        &fd.spec,
        &assessment,
        &outcome,
        retry,
        ctx.registry.refresh,
        now,
    ))
}

async fn cleanup(fd: &FeatureDefinition, ctx: &Context) -> Result<Action, Error> {
    let users = dependents(
        &fd.spec.name,
        fd.namespace().as_deref(),
        &ctx.features.state(),
    );
    if users.is_empty() {
        if let Some(client) = &ctx.registry.client {
            client.reset(&object_key(fd));
        }
        let note = match &ctx.registry.client {
            Some(_) => format!(
                "{} {} removed; its feature registry record and materialization history are kept",
                fd.spec.name, fd.spec.version
            ),
            None => format!("{} {} removed", fd.spec.name, fd.spec.version),
        };
        ctx.event(fd, EventType::Normal, "Retired", note, "Delete")
            .await;
        return Ok(Action::await_change());
    }
    let message = format!(
        "{} is still read by the lineage of {}; deletion waits until they stop reading it",
        fd.spec.name,
        users.join(", ")
    );
    ctx.event(
        fd,
        EventType::Warning,
        "FeatureInUse",
        message.clone(),
        "Delete",
    )
    .await;
    Err(Error::InUse(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd(yaml: &str) -> Arc<FeatureDefinition> {
        let mut fd: FeatureDefinition = serde_yaml::from_str(yaml).expect("fixture");
        fd.metadata.namespace = Some("shop".into());
        Arc::new(fd)
    }

    fn feature(
        k8s_name: &str,
        name: &str,
        version: &str,
        inputs: &[&str],
    ) -> Arc<FeatureDefinition> {
        fd(&format!(
            r#"
apiVersion: recsys.io/v1alpha1
kind: FeatureDefinition
metadata: {{ name: {k8s_name}, generation: 3 }}
spec:
  name: {name}
  entity: product
  version: {version}
  valueType: float
  description: test feature
  owner: ranking
  ttl: 24h
  computation: {{ job: popularity, logic: weighted counts, window: 90d, halfLife: 7d }}
  lineage: {{ tables: [events], features: [{}] }}
"#,
            inputs.join(", ")
        ))
    }

    #[test]
    fn a_standalone_feature_is_ready() {
        let a = feature("pop", "popularity_score", "1.0.0", &[]);
        let got = assess(&a, std::slice::from_ref(&a));
        assert!(got.is_accepted());
        assert_eq!(got.ready, ConditionStatus::True);
        assert_eq!(got.ready_reason, "Resolved");
    }

    #[test]
    fn unknown_lineage_is_not_ready_and_names_the_feature() {
        let a = feature("ctr", "ctr", "1.0.0", &["clicks", "views"]);
        let views = feature("views", "views", "1.0.0", &[]);
        let got = assess(&a, &[a.clone(), views]);
        assert_eq!(got.ready, ConditionStatus::False);
        assert_eq!(got.ready_reason, "UnresolvedLineage");
        assert!(
            got.ready_message.contains("clicks"),
            "{}",
            got.ready_message
        );
        assert!(
            !got.ready_message.contains("views"),
            "{}",
            got.ready_message
        );
    }

    #[test]
    fn cycles_are_found_with_their_path() {
        let a = feature("a", "a", "1.0.0", &["b"]);
        let b = feature("b", "b", "1.0.0", &["c"]);
        let c = feature("c", "c", "1.0.0", &["a"]);
        let got = assess(&a, &[a.clone(), b, c]);
        assert_eq!(got.ready_reason, "LineageCycle");
        assert!(
            got.ready_message.contains("a → b → c → a"),
            "{}",
            got.ready_message
        );
    }

    #[test]
    fn a_diamond_is_not_a_cycle() {
        let top = feature("top", "top", "1.0.0", &["l", "r"]);
        let l = feature("l", "l", "1.0.0", &["base"]);
        let r = feature("r", "r", "1.0.0", &["base"]);
        let base = feature("base", "base", "1.0.0", &[]);
        let got = assess(&top, &[top.clone(), l, r, base]);
        assert_eq!(got.ready, ConditionStatus::True, "{}", got.ready_message);
    }

    #[test]
    fn duplicate_versions_conflict() {
        let a = feature("a1", "pop", "1.2.0", &[]);
        let b = feature("a2", "pop", "1.2.0", &[]);
        let got = assess(&a, &[a.clone(), b]);
        assert_eq!(got.ready_reason, "DuplicateVersion");
        assert!(got.ready_message.contains("a2"));
    }

    #[test]
    fn breaking_change_within_a_major_is_refused() {
        let old = feature("pop-v1", "pop", "1.0.0", &[]);
        let mut new = (*feature("pop-v1-1", "pop", "1.1.0", &[])).clone();
        new.spec.value_type = recsys_crds::ValueType::Int;
        let new = Arc::new(new);
        let got = assess(&new, &[old.clone(), new.clone()]);
        assert_eq!(got.ready_reason, "BreakingChangeNeedsMajorVersion");
        assert!(got.ready_message.contains("2.0.0"), "{}", got.ready_message);
        // A new major version side by side is fine.
        let mut v2 = (*new).clone();
        v2.metadata.name = Some("pop-v2".into());
        v2.spec.version = "2.0.0".into();
        let v2 = Arc::new(v2);
        assert_eq!(assess(&v2, &[old, v2.clone()]).ready, ConditionStatus::True);
    }

    #[test]
    fn deprecation_needs_an_existing_successor() {
        let mut old = (*feature("pop", "pop", "1.0.0", &[])).clone();
        old.spec.deprecation = Some(serde_yaml::from_str("replacedBy: pop_v2").expect("yaml"));
        let old = Arc::new(old);
        assert_eq!(
            assess(&old, std::slice::from_ref(&old)).ready_reason,
            "UnresolvedReplacement"
        );
        let succ = feature("pop-v2", "pop_v2", "1.0.0", &[]);
        let got = assess(&old, &[old.clone(), succ]);
        assert_eq!(
            (got.ready, got.ready_reason),
            (ConditionStatus::True, "Deprecated")
        );
    }

    #[test]
    fn spec_problems_name_their_field() {
        let mut bad = (*feature("x", "x", "1.0.0", &["y", "y"])).clone();
        bad.spec.ttl = "0s".into();
        bad.spec.computation.window = Some("10".into());
        let got = assess(&bad, &[]);
        assert!(!got.is_accepted());
        let fields: Vec<&str> = got.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.ttl",
                "spec.computation.window",
                "spec.lineage.features"
            ]
        );
        assert_eq!(got.next_action(), Action::await_change());
    }

    #[test]
    fn status_carries_generation_and_conditions() {
        let a = feature("pop", "popularity_score", "1.0.0", &[]);
        let now: Timestamp = "2026-11-26T00:00:00Z".parse().expect("ts");
        let s = desired_status(&a, &assess(&a, &[]), &RegistryOutcome::NotConfigured, now);
        assert_eq!(s.observed_generation, Some(3));
        let types: Vec<(&str, &str, &str)> = s
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
            .collect();
        assert_eq!(
            types,
            [
                ("Accepted", "True", "Valid"),
                ("Ready", "True", "Resolved"),
                ("Registered", "False", "RegistryNotConfigured")
            ],
            "without a registry the definition stays ready and says nothing is recorded"
        );
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
        assert_eq!(s.freshness, Some(Freshness::Unknown));
        assert_eq!(s.registered_version, None);
    }

    // --- The registry ------------------------------------------------------------------

    fn examples() -> Vec<(String, FeatureDefinition)> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/features");
        let mut out = vec![];
        for entry in std::fs::read_dir(&dir).expect("examples dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).expect("read");
                let fd: FeatureDefinition = serde_yaml::from_str(&text).expect("example parses");
                out.push((path.display().to_string(), fd));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        assert!(out.len() >= 3, "{out:?}");
        out
    }

    #[test]
    fn the_examples_convert_into_valid_registry_specs_losslessly() {
        for (file, fd) in examples() {
            let spec = registry_spec(&fd.spec).unwrap_or_else(|e| panic!("{file}: {e}"));
            spec.validate()
                .unwrap_or_else(|e| panic!("{file}: the registry refuses it: {e}"));
            assert_eq!(spec.name, fd.spec.name, "{file}");
            assert_eq!(spec.version, fd.spec.version, "{file}");
            assert_eq!(spec.ttl, fd.spec.ttl.0, "{file}");
            assert_eq!(
                spec.ttl_ms().expect("ttl"),
                u64::try_from(fd.spec.ttl.to_std().expect("ttl").as_millis()).expect("ms"),
                "{file}: both sides read the TTL alike"
            );
            // Same JSON both ways: nothing is lost or renamed in the conversion.
            assert_eq!(
                serde_json::to_value(&spec).expect("json"),
                serde_json::to_value(&fd.spec).expect("json"),
                "{file}"
            );
        }
    }

    #[test]
    fn vectors_pairs_and_deprecations_convert() {
        let fd = fd(r#"
apiVersion: recsys.io/v1alpha1
kind: FeatureDefinition
metadata: { name: emb }
spec:
  name: user_product_embedding
  entity: userProduct
  version: 2.1.0-rc.1
  valueType: floatVector
  dimension: 8
  online: true
  offline: false
  description: embedding
  owner: ranking
  computation: { job: cf-train, logic: als factors }
  ttl: 1d12h
  deprecation: { replacedBy: user_product_embedding_v3, sunset: "2030-01-01T00:00:00Z", reason: superseded }
"#);
        let spec = registry_spec(&fd.spec).expect("converts");
        spec.validate().expect("valid");
        assert_eq!(spec.entity, recsys_core::features::EntityKind::UserProduct);
        assert_eq!(spec.dimension, Some(8));
        assert!(spec.online && !spec.offline);
        assert_eq!(spec.computation.job, "cf-train");
        assert_eq!(
            spec.feature_ref().expect("ref"),
            FeatureRef::new("user_product_embedding", 2)
        );
        let dep = spec.deprecation.expect("deprecation passed on");
        assert_eq!(
            dep.replaced_by.as_deref(),
            Some("user_product_embedding_v3")
        );
        assert_eq!(dep.sunset.as_deref(), Some("2030-01-01T00:00:00Z"));
        assert_eq!(dep.reason.as_deref(), Some("superseded"));
    }

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn freshness_is_judged_against_the_ttl() {
        let now = at("2026-11-26T12:00:00Z");
        let ttl = Duration::from_secs(1800);
        let ms = |s: &str| at(s).as_millisecond();
        assert_eq!(freshness(None, ttl, now), Freshness::NeverMaterialized);
        assert_eq!(
            freshness(Some(ms("2026-11-26T11:45:00Z")), ttl, now),
            Freshness::Fresh
        );
        assert_eq!(
            freshness(Some(ms("2026-11-26T11:30:00Z")), ttl, now),
            Freshness::Fresh,
            "exactly the TTL old is still fresh"
        );
        assert_eq!(
            freshness(Some(ms("2026-11-26T11:29:59Z")), ttl, now),
            Freshness::Stale
        );
        assert_eq!(
            freshness(Some(ms("2026-11-26T13:00:00Z")), ttl, now),
            Freshness::Fresh,
            "values describing a later time are not stale"
        );
    }

    fn registered(at_ms: i64, last: Option<i64>) -> RegistryOutcome {
        RegistryOutcome::Registered {
            registered: Registered {
                version: "1.0.0".into(),
                major: 1,
                registered_at_ms: at_ms,
                created: true,
            },
            last_materialization: last.map(|at_ms| Materialization {
                feature: FeatureRef::new("popularity_score", 1),
                at_ms,
                rows: 10,
                recorded_at_ms: at_ms,
            }),
        }
    }

    fn condition<'a>(s: &'a FeatureDefinitionStatus, type_: &str) -> (&'a str, &'a str, &'a str) {
        let c = common::find_condition(&s.conditions, type_).expect(type_);
        (c.status.as_str(), c.reason.as_str(), c.message.as_str())
    }

    #[test]
    fn a_registered_version_reports_registration_and_freshness() {
        let a = feature("pop", "popularity_score", "1.0.0", &[]); // ttl 24h
        let now = at("2026-11-26T12:00:00Z");
        let reg_ms = at("2026-11-20T08:00:00.750Z").as_millisecond();
        let last_ms = at("2026-11-26T02:00:00Z").as_millisecond();
        let outcome = registered(reg_ms, Some(last_ms));
        let assessment = with_registry(assess(&a, &[]), &outcome);
        let s = desired_status(&a, &assessment, &outcome, now);
        assert_eq!(s.registered_version.as_deref(), Some("1.0.0"));
        assert_eq!(
            s.registered_at,
            Some(Time(at("2026-11-20T08:00:00Z"))),
            "whole seconds, as the API server stores them"
        );
        assert_eq!(
            s.last_materialization,
            Some(Time(at("2026-11-26T02:00:00Z")))
        );
        assert_eq!(s.freshness, Some(Freshness::Fresh));
        let (status, reason, message) = condition(&s, "Ready");
        assert_eq!((status, reason), ("True", "Resolved"));
        assert!(
            message.ends_with("recorded in the feature registry"),
            "{message}"
        );
        let (status, reason, message) = condition(&s, "Registered");
        assert_eq!((status, reason), ("True", "Registered"));
        assert!(message.contains("popularity_score 1.0.0"), "{message}");

        // A day later without a new run: stale.
        let later = at("2026-11-27T03:00:00Z");
        let s = desired_status(&a, &assessment, &outcome, later);
        assert_eq!(s.freshness, Some(Freshness::Stale));
        // Never materialized.
        let none = registered(reg_ms, None);
        let s = desired_status(&a, &with_registry(assess(&a, &[]), &none), &none, now);
        assert_eq!(s.freshness, Some(Freshness::NeverMaterialized));
        assert_eq!(s.last_materialization, None);
    }

    #[test]
    fn a_refusal_is_not_ready_with_the_registry_message_and_keeps_the_record() {
        let mut a = (*feature("pop", "popularity_score", "1.0.0", &[])).clone();
        let now = at("2026-11-26T12:00:00Z");
        let ok = registered(at("2026-11-20T08:00:00Z").as_millisecond(), None);
        a.status = Some(desired_status(
            &a,
            &with_registry(assess(&a, &[]), &ok),
            &ok,
            now,
        ));
        let message = "feature popularity_score version 1.0.0 is already registered with a different spec (differs in: description); versions are immutable: register the change under a new version";
        let refused = RegistryOutcome::Refused {
            kind: "FeatureVersionConflict",
            message: message.into(),
        };
        let assessment = with_registry(assess(&a, &[]), &refused);
        assert!(assessment.is_accepted());
        let s = desired_status(&a, &assessment, &refused, now);
        assert_eq!(
            condition(&s, "Ready"),
            ("False", "RegistryRefused", message)
        );
        assert_eq!(
            condition(&s, "Registered"),
            ("False", "FeatureVersionConflict", message)
        );
        assert_eq!(
            s.registered_version.as_deref(),
            Some("1.0.0"),
            "what the registry holds is still reported"
        );
        assert!(super::super::needs_attention("RegistryRefused"));
        assert!(super::super::needs_attention("RegistryUnavailable"));
        assert!(!super::super::needs_attention("UnresolvedLineage"));
        // No hot loop: the slow resync only.
        assert_eq!(
            next_action(&a.spec, &assessment, &refused, None, RESYNC, now),
            Action::requeue(RESYNC)
        );
    }

    #[test]
    fn an_unavailable_registry_degrades_and_backs_off() {
        let a = feature("pop", "popularity_score", "1.0.0", &[]);
        let now = at("2026-11-26T12:00:00Z");
        let down = RegistryOutcome::Unavailable {
            kind: "RegistryConnect",
            message: "cannot connect to the feature registry: connection refused".into(),
        };
        let assessment = with_registry(assess(&a, &[]), &down);
        let s = desired_status(&a, &assessment, &down, now);
        let (status, reason, message) = condition(&s, "Ready");
        assert_eq!((status, reason), ("False", "RegistryUnavailable"));
        assert!(message.contains("connection refused"), "{message}");
        assert_eq!(condition(&s, "Registered").0, "Unknown");
        assert_eq!(s.freshness, Some(Freshness::Unknown));
        assert_eq!(
            next_action(
                &a.spec,
                &assessment,
                &down,
                Some(Duration::from_secs(8)),
                RESYNC,
                now
            ),
            Action::requeue(Duration::from_secs(8))
        );
    }

    #[test]
    fn a_spec_the_registry_finds_invalid_is_rejected() {
        let a = feature("pop", "popularity_score", "1.0.0", &[]);
        let bad = RegistryOutcome::Rejected {
            message:
                "feature \"popularity_score\": invalid spec: every tag must have 1 to 63 characters"
                    .into(),
        };
        let assessment = with_registry(assess(&a, &[]), &bad);
        assert!(!assessment.is_accepted());
        let s = desired_status(&a, &assessment, &bad, at("2026-11-26T12:00:00Z"));
        let (status, _, message) = condition(&s, "Accepted");
        assert_eq!(status, "False");
        assert!(
            message.starts_with("spec: ") && message.contains("tag"),
            "{message}"
        );
        assert_eq!(condition(&s, "Registered").1, "FeatureSpecInvalid");
    }

    #[test]
    fn freshness_is_refreshed_periodically_and_when_values_turn_stale() {
        let now = at("2026-11-26T12:00:00Z");
        let ms = |s: &str| at(s).as_millisecond();
        let ttl = Duration::from_secs(1800);
        let five = Duration::from_secs(300);
        // Fresh until 12:10: the refresh interval comes first.
        assert_eq!(
            refresh_after(Some(ms("2026-11-26T11:40:00Z")), ttl, five, now),
            five
        );
        // Fresh until 12:02: look again just after.
        assert_eq!(
            refresh_after(Some(ms("2026-11-26T11:32:00Z")), ttl, five, now),
            Duration::from_secs(121)
        );
        // Stale or never materialized: the TTL or the interval, whichever is shorter.
        assert_eq!(refresh_after(None, ttl, five, now), five);
        assert_eq!(
            refresh_after(None, Duration::from_secs(60), five, now),
            Duration::from_secs(60)
        );
        assert_eq!(
            refresh_after(None, Duration::from_secs(1), five, now),
            Duration::from_secs(10),
            "a tiny TTL does not make a hot loop"
        );
        let a = feature("pop", "popularity_score", "1.0.0", &[]); // ttl 24h
        let outcome = registered(ms("2026-11-20T00:00:00Z"), Some(ms("2026-11-26T11:00:00Z")));
        let assessment = with_registry(assess(&a, &[]), &outcome);
        assert_eq!(
            next_action(&a.spec, &assessment, &outcome, None, five, now),
            Action::requeue(five)
        );
    }

    fn in_process(
        registry: Arc<recsys_core::features::registry::InProcessFeatureRegistry>,
        metrics: Arc<Metrics>,
    ) -> RegistryClient {
        RegistryClient::new(
            "in-process",
            metrics,
            Box::new(move || {
                let registry = registry.clone();
                Box::pin(async move {
                    Ok(registry as Arc<dyn recsys_core::features::registry::FeatureRegistry>)
                })
            }),
        )
    }

    #[tokio::test]
    async fn record_registers_reads_materializations_and_reports_refusals() {
        use recsys_core::features::registry::{
            FeatureRegistry, InProcessFeatureRegistry, Lifecycle, VersionSelector,
        };
        let registry = Arc::new(InProcessFeatureRegistry::new());
        let metrics = Arc::new(Metrics::default());
        let client = in_process(registry.clone(), metrics.clone());
        let a = feature("pop", "popularity_score", "1.0.0", &[]);

        let first = record(&client, &metrics, &a.spec).await;
        let RegistryOutcome::Registered {
            registered,
            last_materialization: None,
        } = &first
        else {
            panic!("{first:?}")
        };
        assert!(registered.created);
        assert_eq!(
            (registered.version.as_str(), registered.major),
            ("1.0.0", 1)
        );

        // The trainer records a run of the major version; the next reconcile sees it.
        registry
            .record_materialization(&FeatureRef::new("popularity_score", 1), 1_000_000, 42)
            .await
            .expect("materialization");
        let again = record(&client, &metrics, &a.spec).await;
        let RegistryOutcome::Registered {
            registered: again_registered,
            last_materialization: Some(run),
        } = &again
        else {
            panic!("{again:?}")
        };
        assert!(!again_registered.created, "idempotent");
        assert_eq!(
            again_registered.registered_at_ms,
            registered.registered_at_ms
        );
        assert_eq!((run.at_ms, run.rows), (1_000_000, 42));

        // A different spec under the same version is refused with the registry's words.
        let mut changed = (*a).clone();
        changed.spec.description = "something else".into();
        let refused = record(&client, &metrics, &changed.spec).await;
        let RegistryOutcome::Refused { kind, message } = &refused else {
            panic!("{refused:?}")
        };
        assert_eq!(*kind, "FeatureVersionConflict");
        assert!(message.contains("description"), "{message}");

        // A breaking change within the major version too.
        let mut breaking = (*feature("pop2", "popularity_score", "1.1.0", &[])).clone();
        breaking.spec.value_type = recsys_crds::ValueType::Int;
        let refused = record(&client, &metrics, &breaking.spec).await;
        assert!(
            matches!(
                refused,
                RegistryOutcome::Refused {
                    kind: "FeatureBreakingChange",
                    ..
                }
            ),
            "{refused:?}"
        );

        // A deprecation block deprecates the registered version.
        let mut deprecated = (*a).clone();
        deprecated.spec.deprecation = Some(
            serde_yaml::from_str("{replacedBy: popularity_v2, reason: superseded}").expect("yaml"),
        );
        let outcome = record(&client, &metrics, &deprecated.spec).await;
        assert!(
            matches!(outcome, RegistryOutcome::Registered { .. }),
            "{outcome:?}"
        );
        let stored = registry
            .get("popularity_score", &VersionSelector::Exact("1.0.0".into()))
            .await
            .expect("get")
            .expect("registered");
        assert_eq!(stored.lifecycle(), Lifecycle::Deprecated);
        assert_eq!(stored.replaced_by.as_deref(), Some("popularity_v2"));

        let text = metrics.encode().expect("metrics");
        assert!(
            text.contains("operation=\"register\",outcome=\"ok\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("operation=\"register\",outcome=\"FeatureVersionConflict\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("operation=\"last_materialization\",outcome=\"ok\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn dependents_are_found_for_deletion_protection() {
        let base = feature("base", "base", "1.0.0", &[]);
        let user = feature("user", "derived", "1.0.0", &["base"]);
        assert_eq!(dependents("base", Some("shop"), &[base, user]), ["user"]);
    }

    #[tokio::test]
    async fn a_version_is_retired_once_its_sunset_passes() {
        use recsys_core::features::registry::{
            FeatureRegistry, InProcessFeatureRegistry, Lifecycle, VersionSelector,
        };
        use recsys_crds::feature_definition::Deprecation;
        let registry = Arc::new(InProcessFeatureRegistry::new());
        let metrics = Arc::new(Metrics::default());
        let client = in_process(registry.clone(), metrics.clone());
        let lifecycle = |version: &'static str| {
            let registry = registry.clone();
            async move {
                registry
                    .get("popularity_score", &VersionSelector::Exact(version.into()))
                    .await
                    .expect("get")
                    .expect("registered")
                    .lifecycle()
            }
        };
        let now = Timestamp::now();
        let deprecated = |sunset_seconds: i64| {
            let mut f = (*feature("pop", "popularity_score", "1.0.0", &[])).clone();
            f.spec.deprecation = Some(Deprecation {
                replaced_by: "popularity_v2".into(),
                sunset: Some(Time(
                    now.checked_add(jiff::SignedDuration::from_secs(sunset_seconds))
                        .expect("time"),
                )),
                reason: None,
            });
            f
        };
        // Sunset ahead: deprecated, still served.
        let ahead = deprecated(3600);
        assert!(!sunset_passed(&ahead.spec, now));
        let out = record(&client, &metrics, &ahead.spec).await;
        assert!(matches!(out, RegistryOutcome::Registered { .. }), "{out:?}");
        assert_eq!(lifecycle("1.0.0").await, Lifecycle::Deprecated);
        // Sunset passed: retired, and recording it again stays quiet.
        let passed = deprecated(-60);
        assert!(sunset_passed(&passed.spec, now));
        for _ in 0..2 {
            let out = record(&client, &metrics, &passed.spec).await;
            assert!(matches!(out, RegistryOutcome::Registered { .. }), "{out:?}");
        }
        assert_eq!(lifecycle("1.0.0").await, Lifecycle::Retired);
        // No deprecation, no retirement.
        assert!(!sunset_passed(&feature("x", "x", "1.0.0", &[]).spec, now));
    }
}
