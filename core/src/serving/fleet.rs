//! What a scorer reports about the versions it holds (`GET /v1/status`), and what the operator
//! concludes from the reports of every scorer pod behind a model's Service.
//!
//! The operator moves traffic only on evidence from the pods that would serve it: a candidate
//! takes users only when every ready scorer pod has it loaded, and a version that any pod
//! refused (missing manifest, failed checksum, unusable factors) is never routed. The scorer
//! verifies a version with the same code that serves it, so "loaded" here means "verified".

use serde::{Deserialize, Serialize};

/// The body of a scorer's `GET /v1/status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScorerStatus {
    /// Revision of the routing table the scorer serves (`sha256:…`); `None` before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_revision: Option<String>,
    /// Versions loaded and verified, as the routing table names them.
    #[serde(default)]
    pub loaded: Vec<LoadedVersion>,
    /// Versions the table names that could not be loaded, with the reason.
    #[serde(default)]
    pub refused: Vec<RefusedVersion>,
    /// Models of the table with no stable version loaded, with the reason.
    #[serde(default)]
    pub missing: Vec<MissingModel>,
}

/// One loaded version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadedVersion {
    /// The model.
    pub model: String,
    /// The name the routing table gives (a version, or an alias such as `champion`).
    pub name: String,
    /// The version it resolved to.
    pub version: String,
    /// NDCG@10 on the version's held-out split, from its manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_ndcg: Option<f64>,
}

/// One refused version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefusedVersion {
    /// The model.
    pub model: String,
    /// The name the routing table gives.
    pub name: String,
    /// Why it was refused.
    pub reason: String,
}

/// A model without a stable version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MissingModel {
    /// The model.
    pub model: String,
    /// Why.
    pub reason: String,
}

impl ScorerStatus {
    /// Whether `version` of `model` is loaded.
    pub fn has(&self, model: &str, version: &str) -> bool {
        self.loaded
            .iter()
            .any(|l| l.model == model && (l.name == version || l.version == version))
    }

    /// The loaded entry of `version` of `model`.
    pub fn get(&self, model: &str, version: &str) -> Option<&LoadedVersion> {
        self.loaded
            .iter()
            .find(|l| l.model == model && (l.name == version || l.version == version))
    }

    /// Why `version` of `model` was refused, if it was.
    pub fn refusal(&self, model: &str, version: &str) -> Option<&str> {
        self.refused
            .iter()
            .find(|r| r.model == model && r.name == version)
            .map(|r| r.reason.as_str())
    }
}

/// One scorer pod behind the Service, and what it answered.
#[derive(Clone, Debug, PartialEq)]
pub struct PodReport {
    /// `ip:port` of the endpoint.
    pub address: String,
    /// Name of the pod, when the endpoint names it.
    pub pod: Option<String>,
    /// Whether the endpoint is ready (passes its readiness probe).
    pub ready: bool,
    /// The pod's status, or why it could not be read.
    pub status: Result<ScorerStatus, String>,
}

impl PodReport {
    fn label(&self) -> &str {
        self.pod.as_deref().unwrap_or(&self.address)
    }
}

/// Every scorer pod of a model's Service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fleet {
    /// One report per endpoint.
    pub pods: Vec<PodReport>,
}

/// Where one version stands across the fleet.
#[derive(Clone, Debug, PartialEq)]
pub enum VersionState {
    /// Loaded on every ready pod, and there is at least one.
    Loaded {
        /// Ready pods.
        pods: usize,
        /// NDCG@10 from the version's manifest, as the pods report it.
        offline_ndcg: Option<f64>,
    },
    /// Some ready pods do not have it yet.
    Loading {
        /// Ready pods that have it.
        have: usize,
        /// Ready pods.
        of: usize,
    },
    /// A pod refused it: it must not be routed.
    Refused {
        /// The pod that refused it.
        pod: String,
        /// Why.
        reason: String,
    },
    /// No pod is ready.
    NoReadyPods {
        /// Pods known but not ready, or not answering.
        pods: usize,
        /// The first error reading a pod's status, if any.
        error: Option<String>,
    },
}

impl VersionState {
    /// Whether every ready pod has the version.
    pub fn is_loaded(&self) -> bool {
        matches!(self, Self::Loaded { .. })
    }

    /// A sentence about the state of `version`.
    pub fn describe(&self, version: &str) -> String {
        match self {
            Self::Loaded { pods, .. } => {
                format!("{version} is loaded on all {pods} ready scorer pods")
            }
            Self::Loading { have, of } => {
                format!("{version} is loaded on {have} of {of} ready scorer pods")
            }
            Self::Refused { pod, reason } => {
                format!("scorer pod {pod} refused {version}: {reason}")
            }
            Self::NoReadyPods { pods: 0, .. } => "no scorer pod is running".to_owned(),
            Self::NoReadyPods { pods, error } => format!(
                "none of {pods} scorer pods is ready{}",
                error
                    .as_deref()
                    .map(|e| format!(" (status: {e})"))
                    .unwrap_or_default()
            ),
        }
    }
}

impl Fleet {
    /// Ready pods.
    pub fn ready(&self) -> usize {
        self.pods.iter().filter(|p| p.ready).count()
    }

    /// Ready pods that have `version` of `model` loaded.
    pub fn loaded_on(&self, model: &str, version: &str) -> usize {
        self.pods
            .iter()
            .filter(|p| p.ready && p.status.as_ref().is_ok_and(|s| s.has(model, version)))
            .count()
    }

    /// Where `version` of `model` stands: refused by any pod that answered (ready or not), else
    /// loaded when every ready pod has it. A ready pod that does not answer counts as not
    /// having it.
    pub fn version(&self, model: &str, version: &str) -> VersionState {
        for p in &self.pods {
            if let Ok(s) = &p.status
                && let Some(reason) = s.refusal(model, version)
            {
                return VersionState::Refused {
                    pod: p.label().to_owned(),
                    reason: reason.to_owned(),
                };
            }
        }
        let ready: Vec<&PodReport> = self.pods.iter().filter(|p| p.ready).collect();
        if ready.is_empty() {
            let error = self
                .pods
                .iter()
                .find_map(|p| p.status.as_ref().err().cloned());
            // A pod that is not ready because its stable version is missing says why.
            let missing = self.pods.iter().find_map(|p| {
                let s = p.status.as_ref().ok()?;
                let m = s.missing.iter().find(|m| m.model == model)?;
                Some((p.label().to_owned(), m.reason.clone()))
            });
            if let Some((pod, reason)) = missing {
                return VersionState::Refused { pod, reason };
            }
            return VersionState::NoReadyPods {
                pods: self.pods.len(),
                error,
            };
        }
        let have: Vec<&LoadedVersion> = ready
            .iter()
            .filter_map(|p| p.status.as_ref().ok()?.get(model, version))
            .collect();
        if have.len() == ready.len() {
            VersionState::Loaded {
                pods: ready.len(),
                offline_ndcg: have.iter().find_map(|l| l.offline_ndcg),
            }
        } else {
            VersionState::Loading {
                have: have.len(),
                of: ready.len(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, loaded: &[&str], refused: &[(&str, &str)]) -> PodReport {
        PodReport {
            address: format!("10.0.0.{}:8080", name.len()),
            pod: Some(name.into()),
            ready,
            status: Ok(ScorerStatus {
                routing_revision: Some("sha256:x".into()),
                loaded: loaded
                    .iter()
                    .map(|v| LoadedVersion {
                        model: "als".into(),
                        name: (*v).into(),
                        version: (*v).into(),
                        offline_ndcg: Some(0.3),
                    })
                    .collect(),
                refused: refused
                    .iter()
                    .map(|(v, r)| RefusedVersion {
                        model: "als".into(),
                        name: (*v).into(),
                        reason: (*r).into(),
                    })
                    .collect(),
                missing: vec![],
            }),
        }
    }

    #[test]
    fn loaded_means_every_ready_pod() {
        let fleet = Fleet {
            pods: vec![
                pod("a", true, &["v1", "v2"], &[]),
                pod("b", true, &["v1"], &[]),
                pod("c", false, &[], &[]),
            ],
        };
        assert!(fleet.version("als", "v1").is_loaded());
        assert_eq!(
            fleet.version("als", "v2"),
            VersionState::Loading { have: 1, of: 2 }
        );
        assert_eq!(
            fleet.version("other", "v1"),
            VersionState::Loading { have: 0, of: 2 }
        );
    }

    #[test]
    fn a_refusal_anywhere_wins_and_a_silent_ready_pod_does_not_count() {
        let mut fleet = Fleet {
            pods: vec![
                pod("a", true, &["v1"], &[]),
                pod("b", false, &[], &[("v2", "manifest.json: not found")]),
            ],
        };
        let got = fleet.version("als", "v2");
        assert_eq!(
            got,
            VersionState::Refused {
                pod: "b".into(),
                reason: "manifest.json: not found".into()
            }
        );
        assert!(
            got.describe("v2").contains("not found"),
            "{}",
            got.describe("v2")
        );
        fleet.pods.push(PodReport {
            address: "10.0.0.9:8080".into(),
            pod: None,
            ready: true,
            status: Err("connection refused".into()),
        });
        assert_eq!(
            fleet.version("als", "v1"),
            VersionState::Loading { have: 1, of: 2 }
        );
    }

    #[test]
    fn without_ready_pods_the_missing_stable_is_the_reason() {
        let mut p = pod("a", false, &[], &[]);
        if let Ok(s) = &mut p.status {
            s.missing.push(MissingModel {
                model: "als".into(),
                reason: "checksum mismatch in factors.npy".into(),
            });
        }
        let fleet = Fleet { pods: vec![p] };
        assert!(
            matches!(fleet.version("als", "v1"), VersionState::Refused { reason, .. } if reason.contains("checksum"))
        );
        assert_eq!(
            Fleet::default().version("als", "v1"),
            VersionState::NoReadyPods {
                pods: 0,
                error: None
            }
        );
    }
}
