//! `manifest.json` of a version and `registry.json` of a model.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Version of the manifest and registry documents this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Element type of the factor matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE-754 single precision, little-endian.
    F32,
}

/// One file of a version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the version directory, for example `user_factors.f32`.
    pub path: String,
    /// Lower-case hex sha256 of the whole file.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
    /// `[rows, cols]` of a factor matrix; `None` for id lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<[u64; 2]>,
}

/// The training data a version was fitted on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    /// Digest of the training snapshot (for example a sha256 of the aggregated interactions),
    /// so evaluations can be pinned to the same data.
    pub digest: String,
    /// Interactions (non-zero user × item pairs) trained on.
    pub interactions: u64,
    /// Users in the data.
    pub users: u64,
    /// Items in the data.
    pub items: u64,
    /// First and last event time, milliseconds since the Unix epoch, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_range: Option<(i64, i64)>,
}

/// What the caller of [`Registry::publish`](super::Registry::publish) says about a version;
/// the registry adds names, time, checksums and shapes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ManifestInput {
    /// Version id to publish under; a sortable `YYYYMMDD-HHMMSS-<6 hex>` id when `None`.
    pub version: Option<String>,
    /// Hyper-parameters of the run (factors, regularization, alpha, iterations, …).
    pub params: serde_json::Value,
    /// Offline metrics of the model AND of the baseline it was compared with, for example
    /// `{"model": {"ndcg@10": 0.31}, "baseline": {"ndcg@10": 0.22}}`.
    pub metrics: serde_json::Value,
    /// The training data.
    pub data: DataInfo,
    /// Version of the trainer that produced the model.
    pub trainer_version: String,
    /// Git commit of the trainer, when known.
    pub git_sha: Option<String>,
}

/// `models/<model>/<version>/manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`]; other values are refused on load.
    pub format_version: u32,
    /// Model name.
    pub model: String,
    /// Version id.
    pub version: String,
    /// When the version was published.
    pub created_at: DateTime<Utc>,
    /// Version of the trainer that produced it.
    pub trainer_version: String,
    /// Git commit of the trainer, when known.
    #[serde(default)]
    pub git_sha: Option<String>,
    /// Element type of the factor files.
    pub dtype: Dtype,
    /// Regularisation λ the factors were trained with (fold-in of new users uses it).
    pub regularization: f32,
    /// Every data file of the version (not the manifest itself).
    pub files: Vec<FileEntry>,
    /// Hyper-parameters, as given by the trainer.
    pub params: serde_json::Value,
    /// Offline metrics of the model and of its baseline, as given by the trainer.
    pub metrics: serde_json::Value,
    /// The training data.
    pub data: DataInfo,
}

impl Manifest {
    /// The entry of file `path`, if listed.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// One published version in `registry.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionEntry {
    /// Version id.
    pub version: String,
    /// When it was published.
    pub created_at: DateTime<Utc>,
    /// sha256 of its `manifest.json`, checked on every load.
    pub manifest_sha256: String,
    /// One line of its metrics, for listings (`model.ndcg@10=0.31 baseline.ndcg@10=0.22`).
    pub summary: String,
}

/// `models/<model>/registry.json`: the versions that are visible, and the aliases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegistryIndex {
    /// Always [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Model name.
    pub model: String,
    /// Published versions, in publish order.
    pub versions: Vec<VersionEntry>,
    /// Alias → version id (`champion`, `previous`, …).
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
}

impl RegistryIndex {
    /// An index with no versions.
    pub fn empty(model: &str) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            model: model.to_owned(),
            versions: Vec::new(),
            aliases: BTreeMap::new(),
        }
    }

    /// The entry of `version`, if published.
    pub fn version(&self, version: &str) -> Option<&VersionEntry> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// The version an alias or version id designates, aliases first.
    pub fn resolve(&self, version_or_alias: &str) -> Option<&VersionEntry> {
        let version = self
            .aliases
            .get(version_or_alias)
            .map_or(version_or_alias, String::as_str);
        self.version(version)
    }
}

/// A one-line summary of a metrics document: its numeric leaves as `path=value`, sorted by
/// path, at most 200 characters.
pub(crate) fn summarize_metrics(metrics: &serde_json::Value) -> String {
    fn walk(path: &str, value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(&p, v, out);
                }
            }
            serde_json::Value::Number(n) => {
                let shown = match (n.as_i64(), n.as_f64()) {
                    (Some(i), _) => i.to_string(),
                    (None, Some(f)) => format!("{f:.4}")
                        .trim_end_matches('0')
                        .trim_end_matches('.')
                        .to_owned(),
                    _ => n.to_string(),
                };
                let name = if path.is_empty() { "value" } else { path };
                out.push(format!("{name}={shown}"));
            }
            _ => {}
        }
    }
    let mut parts = Vec::new();
    walk("", metrics, &mut parts);
    let mut line = String::new();
    for part in parts {
        let extra = usize::from(!line.is_empty()) + part.len();
        if line.len() + extra > 200 {
            line.push_str(" …");
            break;
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&part);
    }
    line
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn summary_is_one_sorted_line() {
        let m = json!({
            "model": {"ndcg@10": 0.312_345_6, "users": 120},
            "baseline": {"ndcg@10": 0.2},
            "note": "ignored"
        });
        assert_eq!(
            summarize_metrics(&m),
            "baseline.ndcg@10=0.2 model.ndcg@10=0.3123 model.users=120"
        );
        assert_eq!(summarize_metrics(&json!(null)), "");
        let many: serde_json::Map<_, _> = (0..100)
            .map(|i| (format!("metric{i:03}"), json!(i)))
            .collect();
        let line = summarize_metrics(&serde_json::Value::Object(many));
        assert!(line.len() <= 205 && line.ends_with('…'), "{line}");
    }

    #[test]
    fn aliases_resolve_before_versions() {
        let mut index = RegistryIndex::empty("m");
        for v in ["v1", "v2"] {
            index.versions.push(VersionEntry {
                version: v.into(),
                created_at: Utc::now(),
                manifest_sha256: String::new(),
                summary: String::new(),
            });
        }
        index.aliases.insert("champion".into(), "v2".into());
        assert_eq!(
            index.resolve("champion").map(|v| v.version.as_str()),
            Some("v2")
        );
        assert_eq!(index.resolve("v1").map(|v| v.version.as_str()), Some("v1"));
        assert!(index.resolve("v3").is_none());
    }
}
