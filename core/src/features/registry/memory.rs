//! [`InProcessFeatureRegistry`]: the local mode's registry, in memory, optionally persisted to a
//! JSON file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{
    FeatureRegistry, FeatureSpec, Materialization, Plan, Query, Registered, RegisteredFeature,
    RegistryError, VersionSelector, check_materialization, deprecate_record, not_found,
    plan_registration, retire_record, select, sort_versions,
};
use crate::features::FeatureRef;
use crate::features::offline::{now_ms, write_atomically};

#[derive(Clone, Debug, Default)]
struct State {
    /// name → versions, in semantic-version order.
    features: BTreeMap<String, Vec<RegisteredFeature>>,
    /// feature version → at → run.
    runs: BTreeMap<FeatureRef, BTreeMap<i64, Materialization>>,
}

/// The in-process feature registry: the embedded default of the local mode.
///
/// With a file ([`InProcessFeatureRegistry::open`]) every change rewrites the file atomically
/// before it becomes visible.
#[derive(Debug, Default)]
pub struct InProcessFeatureRegistry {
    state: Mutex<State>,
    file: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct FileState {
    format: u32,
    features: Vec<RegisteredFeature>,
    materializations: Vec<Materialization>,
}

const FORMAT: u32 = 1;

impl InProcessFeatureRegistry {
    /// An empty registry in memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry persisted to `path`: loads it when it exists, creates it on the first change.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, RegistryError> {
        let path = path.as_ref().to_owned();
        let state = match std::fs::read(&path) {
            Ok(bytes) => decode_file(&path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(RegistryError::Io { path, source }),
        };
        Ok(Self {
            state: Mutex::new(state),
            file: Some(path),
        })
    }

    /// Applies `change`; with a file, to a copy that replaces the state once it is on disk.
    async fn change<R>(
        &self,
        change: impl FnOnce(&mut State) -> Result<R, RegistryError>,
    ) -> Result<R, RegistryError> {
        let mut state = self.state.lock().await;
        let Some(path) = &self.file else {
            return change(&mut state);
        };
        let mut next = state.clone();
        let out = change(&mut next)?;
        let file = FileState {
            format: FORMAT,
            features: next.features.values().flatten().cloned().collect(),
            materializations: next
                .runs
                .values()
                .flat_map(|r| r.values())
                .cloned()
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| RegistryError::Corrupt {
            location: path.display().to_string(),
            message: format!("cannot encode: {e}"),
        })?;
        let target = path.clone();
        let io = |source| RegistryError::Io {
            path: path.clone(),
            source,
        };
        tokio::task::spawn_blocking(move || write_atomically(&target, &bytes))
            .await
            .map_err(|e| io(std::io::Error::other(e.to_string())))?
            .map_err(io)?;
        *state = next;
        Ok(out)
    }

    /// Applies `f` to one registered version.
    async fn update(
        &self,
        name: &str,
        version: &str,
        f: impl FnOnce(&mut RegisteredFeature) -> Result<bool, RegistryError>,
    ) -> Result<RegisteredFeature, RegistryError> {
        self.change(|s| {
            let record = s
                .features
                .get_mut(name)
                .and_then(|vs| vs.iter_mut().find(|r| r.spec.version == version))
                .ok_or_else(|| not_found(name, version))?;
            f(record)?;
            Ok(record.clone())
        })
        .await
    }
}

fn decode_file(path: &Path, bytes: &[u8]) -> Result<State, RegistryError> {
    let corrupt = |message: String| RegistryError::Corrupt {
        location: path.display().to_string(),
        message,
    };
    let file: FileState = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if file.format != FORMAT {
        return Err(corrupt(format!(
            "format {} is not supported (expected {FORMAT})",
            file.format
        )));
    }
    let mut state = State::default();
    for record in file.features {
        state
            .features
            .entry(record.spec.name.clone())
            .or_default()
            .push(record);
    }
    for versions in state.features.values_mut() {
        sort_versions(versions);
    }
    for run in file.materializations {
        state
            .runs
            .entry(run.feature.clone())
            .or_default()
            .insert(run.at_ms, run);
    }
    Ok(state)
}

#[async_trait]
impl FeatureRegistry for InProcessFeatureRegistry {
    async fn register(&self, spec: &FeatureSpec) -> Result<Registered, RegistryError> {
        let now = now_ms();
        self.change(|s| {
            let plan = plan_registration(
                spec,
                s.features
                    .get(&spec.name)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                now,
            )?;
            let versions = s.features.entry(spec.name.clone()).or_default();
            let (record, created) = match plan {
                Plan::Unchanged(r) => (r, false),
                Plan::Deprecate(r) => {
                    if let Some(slot) = versions
                        .iter_mut()
                        .find(|x| x.spec.version == r.spec.version)
                    {
                        *slot = r.clone();
                    }
                    (r, false)
                }
                Plan::Insert(r) => {
                    versions.push(r.clone());
                    sort_versions(versions);
                    (r, true)
                }
            };
            Ok(Registered {
                version: record.spec.version,
                major: record.major,
                registered_at_ms: record.registered_at_ms,
                created,
            })
        })
        .await
    }

    async fn get(
        &self,
        name: &str,
        selector: &VersionSelector,
    ) -> Result<Option<RegisteredFeature>, RegistryError> {
        let state = self.state.lock().await;
        Ok(state.features.get(name).and_then(|vs| select(vs, selector)))
    }

    async fn versions(&self, name: &str) -> Result<Vec<RegisteredFeature>, RegistryError> {
        let state = self.state.lock().await;
        Ok(state.features.get(name).cloned().unwrap_or_default())
    }

    async fn list(&self) -> Result<Vec<RegisteredFeature>, RegistryError> {
        let state = self.state.lock().await;
        Ok(state.features.values().flatten().cloned().collect())
    }

    async fn search(&self, query: &Query) -> Result<Vec<RegisteredFeature>, RegistryError> {
        let state = self.state.lock().await;
        Ok(state
            .features
            .values()
            .flatten()
            .filter(|r| query.matches(r))
            .cloned()
            .collect())
    }

    async fn deprecate(
        &self,
        name: &str,
        version: &str,
        replaced_by: Option<&str>,
    ) -> Result<RegisteredFeature, RegistryError> {
        let now = now_ms();
        self.update(name, version, |r| deprecate_record(r, replaced_by, now))
            .await
    }

    async fn retire(&self, name: &str, version: &str) -> Result<RegisteredFeature, RegistryError> {
        let now = now_ms();
        self.update(name, version, |r| retire_record(r, now)).await
    }

    async fn record_materialization(
        &self,
        feature: &FeatureRef,
        at_ms: i64,
        rows: u64,
    ) -> Result<Materialization, RegistryError> {
        let now = now_ms();
        self.change(|s| {
            let versions = s
                .features
                .get(&feature.name)
                .map(Vec::as_slice)
                .unwrap_or_default();
            check_materialization(feature, at_ms, rows, versions)?;
            let run = Materialization {
                feature: feature.clone(),
                at_ms,
                rows,
                recorded_at_ms: now,
            };
            s.runs
                .entry(feature.clone())
                .or_default()
                .insert(at_ms, run.clone());
            Ok(run)
        })
        .await
    }

    async fn last_materialization(
        &self,
        feature: &FeatureRef,
    ) -> Result<Option<Materialization>, RegistryError> {
        let state = self.state.lock().await;
        Ok(state
            .runs
            .get(feature)
            .and_then(|runs| runs.last_key_value())
            .map(|(_, run)| run.clone()))
    }

    async fn materializations(
        &self,
        feature: &FeatureRef,
        limit: usize,
    ) -> Result<Vec<Materialization>, RegistryError> {
        let state = self.state.lock().await;
        Ok(state
            .runs
            .get(feature)
            .map(|runs| runs.values().rev().take(limit).cloned().collect())
            .unwrap_or_default())
    }
}
