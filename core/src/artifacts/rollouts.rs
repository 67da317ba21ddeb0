//! The rollout history of a model, kept in the artifact store next to its versions
//! (`models/<model>/rollouts/`), so that what happened to each version outlives the cluster
//! that rolled it out: one JSON object per transition, written once, never changed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ArtifactError;
use super::registry::{Registry, validate_model_name};

/// One transition of a rollout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RolloutEvent {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// The model.
    pub model: String,
    /// The version that moved.
    pub version: String,
    /// The stable version after the transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<String>,
    /// Where it moved: `shadow`, `canary`, `paused`, `promoted`, `rolled_back`, `aborted`.
    pub transition: String,
    /// Percentage of users on the candidate after it.
    pub weight: i32,
    /// The step, while a rollout is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i32>,
    /// Who or what moved it: `recsys-operator`, or the manual action and who asked.
    pub by: String,
    /// Why, with the figures (the failed checks of a rollback).
    pub reason: String,
    /// The ModelDeployment, as `<namespace>/<name>`.
    pub deployment: String,
    /// The last analysis run, as the ModelDeployment's status had it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<serde_json::Value>,
}

fn prefix(model: &str) -> String {
    format!("models/{model}/rollouts/")
}

impl RolloutEvent {
    /// Its key: time first, so a listing is in time order.
    pub fn key(&self) -> String {
        format!(
            "{}{}-{}-{}.json",
            prefix(&self.model),
            self.at.format("%Y%m%dT%H%M%S%.3fZ"),
            self.version,
            self.transition
        )
    }
}

impl Registry {
    /// Records `event`; recording the same event again (same time, version and transition)
    /// changes nothing.
    pub async fn record_rollout(&self, event: &RolloutEvent) -> Result<(), ArtifactError> {
        validate_model_name(&event.model)?;
        let bytes = serde_json::to_vec_pretty(event).map_err(|source| ArtifactError::Json {
            key: event.key(),
            source,
        })?;
        match self.store().put_if(&event.key(), bytes, None).await {
            Ok(()) | Err(ArtifactError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The rollout history of `model`, newest first.
    pub async fn rollouts(&self, model: &str) -> Result<Vec<RolloutEvent>, ArtifactError> {
        validate_model_name(model)?;
        let mut out = vec![];
        for key in self.store().list(&prefix(model)).await? {
            let Some(bytes) = self.store().get(&key).await? else {
                continue;
            };
            out.push(
                serde_json::from_slice(&bytes)
                    .map_err(|source| ArtifactError::Json { key, source })?,
            );
        }
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::artifacts::LocalDirStore;

    fn event(at: &str, version: &str, transition: &str) -> RolloutEvent {
        RolloutEvent {
            at: at.parse().expect("time"),
            model: "als".into(),
            version: version.into(),
            stable: Some("v1".into()),
            transition: transition.into(),
            weight: 0,
            step: None,
            by: "recsys-operator".into(),
            reason: "test".into(),
            deployment: "shop/als".into(),
            analysis: None,
        }
    }

    #[tokio::test]
    async fn rollouts_are_kept_once_each_newest_first() {
        let dir = tempfile::tempdir().expect("dir");
        let registry = Registry::new(Arc::new(LocalDirStore::new(dir.path())));
        let first = event("2026-12-05T09:00:00Z", "v2", "canary");
        let second = event("2026-12-05T09:10:00.250Z", "v2", "rolled_back");
        registry.record_rollout(&first).await.expect("record");
        registry.record_rollout(&second).await.expect("record");
        // Once: the same event again is not a second record, and does not fail.
        registry.record_rollout(&first).await.expect("again");
        let got = registry.rollouts("als").await.expect("list");
        assert_eq!(got, vec![second.clone(), first]);
        assert_eq!(
            second.key(),
            "models/als/rollouts/20261205T091000.250Z-v2-rolled_back.json"
        );
        assert!(registry.rollouts("Not A Model").await.is_err());
    }
}
