//! Every rollout transition of a ModelDeployment, recorded in its model's artifact registry
//! ([`recsys_core::artifacts::RolloutEvent`]) next to the versions, so the history outlives
//! the cluster. The operator reaches the store named in `spec.artifacts` with the credentials
//! of `spec.artifacts.credentialsSecret` (it reads that one Secret, nothing else).
//!
//! A transition is first queued in `status.unrecordedTransitions`, in the same status write
//! that makes it, then written to the registry and taken off the queue: a store that is down
//! (or an operator that stops in between) delays the record, never loses it. Writing the same
//! transition twice is harmless (the registry keeps it once).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use recsys_core::artifacts::{Registry, RolloutEvent};
use recsys_core::stores::{ChecksumMode, S3Args, artifact_store};
use recsys_crds::model_deployment::Transition;
use recsys_crds::{ModelDeployment, ModelDeploymentStatus};

/// Who moved a rollout that no person did.
pub const OPERATOR: &str = "recsys-operator";

/// The transition from `before` to `after` (`transition` as counted in
/// `model_deployments_total`) of `version`.
pub fn transition(
    before: &ModelDeploymentStatus,
    after: &ModelDeploymentStatus,
    version: &str,
    transition: &str,
    reason: &str,
    now: Timestamp,
) -> Transition {
    let by = match &after.last_action {
        Some(action) if after.last_action != before.last_action => action.clone(),
        _ => OPERATOR.to_owned(),
    };
    // Whole seconds, as the status keeps them: a transition recorded from memory and again
    // from the status (a retry racing the dequeue) has one key in the registry.
    let at = Timestamp::from_second(now.as_second()).unwrap_or(now);
    Transition {
        at: Time(at),
        version: version.to_owned(),
        transition: transition.to_owned(),
        stable: after.stable_version.clone(),
        weight: after.canary_weight,
        step: after.current_step,
        by,
        reason: reason.to_owned(),
        analysis: after
            .analysis
            .as_ref()
            .and_then(|a| a.runs.first().cloned()),
    }
}

/// The registry's record of transition `t` of `md`.
pub fn event(md: &ModelDeployment, t: &Transition) -> RolloutEvent {
    RolloutEvent {
        at: chrono::DateTime::from_timestamp_millis(t.at.0.as_millisecond()).unwrap_or_default(),
        model: md.spec.model.clone(),
        version: t.version.clone(),
        stable: t.stable.clone(),
        transition: t.transition.clone(),
        weight: t.weight,
        step: t.step,
        by: t.by.clone(),
        reason: t.reason.clone(),
        deployment: format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any()),
        analysis: t
            .analysis
            .as_ref()
            .and_then(|r| serde_json::to_value(r).ok()),
    }
}

/// The registry of `md`'s artifact store.
pub async fn registry(client: &kube::Client, md: &ModelDeployment) -> Result<Registry, String> {
    let a = &md.spec.artifacts;
    let mut s3 = S3Args {
        endpoint: a.endpoint.clone(),
        region: a.region.clone().unwrap_or_else(|| "us-east-1".into()),
        force_path_style: a.force_path_style,
        checksums: ChecksumMode::WhenSupported,
        access_key_id: None,
        secret_access_key: None,
    };
    if let Some(name) = &a.credentials_secret {
        let ns = md.namespace().unwrap_or_default();
        let secret = Api::<Secret>::namespaced(client.clone(), &ns)
            .get(name)
            .await
            .map_err(|e| format!("Secret {ns}/{name} (spec.artifacts.credentialsSecret): {e}"))?;
        let data = secret.data.unwrap_or_default();
        let key = |k: &str, data: &BTreeMap<String, ByteString>| {
            data.get(k)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .ok_or_else(|| format!("Secret {ns}/{name} has no {k}"))
        };
        s3.access_key_id = Some(key("AWS_ACCESS_KEY_ID", &data)?);
        s3.secret_access_key = Some(key("AWS_SECRET_ACCESS_KEY", &data)?);
    }
    let spec = a.uri.strip_prefix("file://").unwrap_or(&a.uri);
    let store = artifact_store(spec, &s3).await.map_err(|e| e.to_string())?;
    Ok(Registry::new(store))
}

/// Records the queued transitions of `md` in its registry, oldest first, and says how many
/// were recorded before the first failure (and that failure).
pub async fn record(
    client: &kube::Client,
    md: &ModelDeployment,
    queued: &[Transition],
) -> (usize, Option<String>) {
    if queued.is_empty() {
        return (0, None);
    }
    let registry = match registry(client, md).await {
        Ok(r) => r,
        Err(e) => return (0, Some(e)),
    };
    for (i, t) in queued.iter().enumerate() {
        if let Err(e) = registry.record_rollout(&event(md, t)).await {
            return (i, Some(format!("{}: {e}", md.spec.artifacts.uri)));
        }
    }
    (queued.len(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_names_who_moved_the_rollout() {
        let md: ModelDeployment = serde_yaml::from_str(
            r#"
apiVersion: recsys.io/v1alpha1
kind: ModelDeployment
metadata: { name: als, namespace: shop }
spec: { model: als, version: v2, artifacts: { uri: "s3://models/recsys" }, strategy: { steps: [{ full: {} }] } }
"#,
        )
        .expect("fixture");
        let before = ModelDeploymentStatus::default();
        let mut after = ModelDeploymentStatus {
            stable_version: Some("v1".into()),
            canary_weight: 10,
            current_step: Some(1),
            ..Default::default()
        };
        let now: Timestamp = "2026-12-05T09:00:00.123Z".parse().expect("ts");
        let t = transition(&before, &after, "v2", "canary", "step 1", now);
        let e = event(&md, &t);
        assert_eq!(
            (e.by.as_str(), e.deployment.as_str(), e.weight, e.step),
            (OPERATOR, "shop/als", 10, Some(1))
        );
        assert_eq!(e.at.to_rfc3339(), "2026-12-05T09:00:00+00:00");
        after.last_action = Some("recsys.io/abort=alice".into());
        let t = transition(&before, &after, "v2", "aborted", "by hand", now);
        assert_eq!(event(&md, &t).by, "recsys.io/abort=alice");
    }
}
