//! FeatureDefinition controller: validates a definition against the others in its namespace
//! (lineage resolves, no cycles, breaking changes bump the major version, deprecations name an
//! existing successor) and protects features that others still read from deletion.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use recsys_crds::common::ConditionStatus;
use recsys_crds::feature_definition::FeatureDefinitionSpec;
use recsys_crds::{FeatureDefinition, FeatureDefinitionStatus};
use tracing::instrument;

use super::{Assessment, Context, Error, Problem, find_cycle, stamped, write_status};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "featuredefinition";
/// Finalizer that keeps a feature while other features' lineage still reads it.
pub const FINALIZER: &str = "featuredefinitions.recsys.io/in-use-protection";

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

/// The status for `assessment`, keeping what the previous status knew.
pub fn desired_status(
    fd: &FeatureDefinition,
    assessment: &Assessment,
    now: Timestamp,
) -> FeatureDefinitionStatus {
    stamped(fd.status.as_ref(), assessment, fd.metadata.generation, now)
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
    let assessment = assess(fd, &ctx.features.state());
    let status = desired_status(fd, &assessment, Timestamp::now());
    write_status(ctx, fd, &fd.status.clone().unwrap_or_default(), &status).await?;
    Ok(assessment.next_action())
}

async fn cleanup(fd: &FeatureDefinition, ctx: &Context) -> Result<Action, Error> {
    let users = dependents(
        &fd.spec.name,
        fd.namespace().as_deref(),
        &ctx.features.state(),
    );
    if users.is_empty() {
        ctx.event(
            fd,
            EventType::Normal,
            "Retired",
            format!("{} {} removed", fd.spec.name, fd.spec.version),
            "Delete",
        )
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
        let s = desired_status(&a, &assess(&a, &[]), now);
        assert_eq!(s.observed_generation, Some(3));
        let types: Vec<(&str, &str)> = s
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect();
        assert_eq!(types, [("Accepted", "True"), ("Ready", "True")]);
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
    }

    #[test]
    fn dependents_are_found_for_deletion_protection() {
        let base = feature("base", "base", "1.0.0", &[]);
        let user = feature("user", "derived", "1.0.0", &["base"]);
        assert_eq!(dependents("base", Some("shop"), &[base, user]), ["user"]);
    }
}
