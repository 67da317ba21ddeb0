//! ModelDeployment controller, first version: validates the spec beyond the schema and keeps
//! status (conditions, observedGeneration, the candidate). The rollout itself (scorer
//! Deployment, routing table, step progression, analysis) is not in this version: Ready stays
//! False with reason `RolloutNotImplemented`, said plainly rather than pretending.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use recsys_crds::common::ConditionStatus;
use recsys_crds::{ModelDeployment, ModelDeploymentStatus};
use tracing::instrument;

use super::{Assessment, Context, Error, Problem, stamped, write_status};

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
        Ok(d) if d.as_secs() < 5 => problems.push(Problem::new(
            "spec.strategy.analysis.interval",
            "must be at least 5s: shorter intervals see too few requests to judge",
        )),
        Ok(_) => {}
        Err(e) => problems.push(Problem::new(
            "spec.strategy.analysis.interval",
            e.to_string(),
        )),
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

/// Assessment of a ModelDeployment.
pub fn assess(md: &ModelDeployment) -> Assessment {
    let problems = validate(md);
    if !problems.is_empty() {
        return Assessment::invalid(problems);
    }
    Assessment::accepted(
        ConditionStatus::False,
        "RolloutNotImplemented",
        format!(
            "spec accepted; this operator version does not deploy scorers or move traffic yet, so {} {} is not served",
            md.spec.model, md.spec.version
        ),
    )
}

/// The status for `assessment`.
pub fn desired_status(
    md: &ModelDeployment,
    assessment: &Assessment,
    now: Timestamp,
) -> ModelDeploymentStatus {
    let mut status: ModelDeploymentStatus =
        stamped(md.status.as_ref(), assessment, md.metadata.generation, now);
    if assessment.is_accepted()
        && status.stable_version.as_deref() != Some(md.spec.version.as_str())
    {
        status.candidate_version = Some(md.spec.version.clone());
    }
    status
}

/// Reconciles one ModelDeployment.
#[instrument(skip(md, ctx), fields(name = %md.name_any(), namespace = md.namespace().unwrap_or_default()))]
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let assessment = assess(&md);
    let status = desired_status(&md, &assessment, Timestamp::now());
    write_status(
        &ctx,
        md.as_ref(),
        &md.status.clone().unwrap_or_default(),
        &status,
    )
    .await?;
    Ok(assessment.next_action())
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
  strategy:
    steps:
      - shadow: { duration: 30m }
      - canary: { weight: 10, duration: 1h }
      - pause: {}
      - canary: { weight: 50, duration: 1h }
      - full: {}
    analysis: { interval: 1m, maxErrorRate: 0.01, minTopKOverlap: 0.3 }
"#;

    #[test]
    fn a_valid_spec_is_accepted_but_not_ready_yet() {
        let m = md(ALS);
        let got = assess(&m);
        assert!(got.is_accepted(), "{:?}", got.problems);
        assert_eq!(
            (got.ready, got.ready_reason),
            (ConditionStatus::False, "RolloutNotImplemented")
        );
        let now: Timestamp = "2026-11-26T00:00:00Z".parse().expect("ts");
        let s = desired_status(&m, &got, now);
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(s.candidate_version.as_deref(), Some("20261126-0700"));
        assert_eq!(s.stage, Stage::Pending);
    }

    #[test]
    fn problems_name_the_step() {
        let mut m = md(ALS);
        m.spec.strategy.steps[0].shadow = Some(serde_yaml::from_str("duration: 5w").expect("yaml"));
        m.spec.strategy.analysis.interval = "1s".into();
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
    fn local_stores_cannot_back_several_replicas() {
        let mut m = md(ALS);
        m.spec.artifacts.uri = "file:///var/lib/recsys".into();
        assert_eq!(validate(&m)[0].field, "spec.artifacts.uri");
        m.spec.scorer.replicas = 1;
        assert!(validate(&m).is_empty());
    }
}
