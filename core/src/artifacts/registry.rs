//! [`Registry`]: publishing, listing, aliasing and loading model versions.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ndarray::Array2;

use super::ArtifactError;
use super::format::{decode_factors, encode_factors, sha256_hex};
use super::manifest::{
    Dtype, FORMAT_VERSION, FileEntry, Manifest, ManifestInput, RegistryIndex, VersionEntry,
    summarize_metrics,
};
use super::store::ArtifactStore;
use crate::cf::als::AlsModel;
use crate::cf::interactions::IdMap;

/// Alias of the version that serves.
pub const CHAMPION: &str = "champion";
/// Alias of the champion before the last [`Registry::promote`], the target of
/// [`Registry::rollback`].
pub const PREVIOUS: &str = "previous";

const USER_FACTORS: &str = "user_factors.f32";
const ITEM_FACTORS: &str = "item_factors.f32";
const USER_IDS: &str = "user_ids.json";
const ITEM_IDS: &str = "item_ids.json";
const MANIFEST: &str = "manifest.json";
/// Compare-and-swap attempts on `registry.json` before giving up.
const UPDATE_ATTEMPTS: u32 = 20;

fn registry_key(model: &str) -> String {
    format!("models/{model}/registry.json")
}

fn file_key(model: &str, version: &str, file: &str) -> String {
    format!("models/{model}/{version}/{file}")
}

fn invalid(what: &'static str, value: &str, reason: &'static str) -> ArtifactError {
    ArtifactError::InvalidName {
        what,
        value: value.to_owned(),
        reason,
    }
}

fn validate_label(what: &'static str, value: &str) -> Result<(), ArtifactError> {
    if value.is_empty() || value.len() > 63 {
        return Err(invalid(what, value, "must have 1 to 63 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(what, value, "may only contain a-z, 0-9 and `-`"));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(invalid(what, value, "must start and end with a-z or 0-9"));
    }
    Ok(())
}

/// Checks a model name against `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, at most 63 characters.
pub fn validate_model_name(name: &str) -> Result<(), ArtifactError> {
    validate_label("model name", name)
}

/// Checks an alias: the same rule as model names.
pub fn validate_alias(alias: &str) -> Result<(), ArtifactError> {
    validate_label("alias", alias)
}

/// Checks a version id: 1 to 128 characters of `[A-Za-z0-9._-]`, not starting with `.` and
/// without `..` (so never a path).
pub fn validate_version(version: &str) -> Result<(), ArtifactError> {
    if version.is_empty() || version.len() > 128 {
        return Err(invalid("version", version, "must have 1 to 128 characters"));
    }
    if !version
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            "version",
            version,
            "may only contain A-Z, a-z, 0-9, `.`, `_` and `-`",
        ));
    }
    if version.starts_with('.') || version.contains("..") {
        return Err(invalid(
            "version",
            version,
            "must not start with `.` or contain `..`",
        ));
    }
    Ok(())
}

/// A new version id `YYYYMMDD-HHMMSS-<6 hex>` for `now` (UTC): ids sort by time, and the random
/// suffix keeps two publishes in the same second apart.
pub fn generate_version(now: DateTime<Utc>) -> String {
    format!(
        "{}-{:06x}",
        now.format("%Y%m%d-%H%M%S"),
        rand::random::<u32>() & 0x00ff_ffff
    )
}

/// A version read back and verified.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedModel {
    /// The factors and λ.
    pub model: AlsModel,
    /// User ids, one per row of `model.user_factors`.
    pub users: IdMap,
    /// Item ids, one per row of `model.item_factors`.
    pub items: IdMap,
    /// The version's manifest.
    pub manifest: Manifest,
}

/// Model versions and their aliases, kept in an [`ArtifactStore`] (layout in the
/// [module docs](super)).
///
/// Several processes may use the same store at once: files are created only if absent and
/// `registry.json` is changed by compare-and-swap, so no publish or alias change is lost and no
/// version is overwritten.
#[derive(Clone, Debug)]
pub struct Registry {
    store: Arc<dyn ArtifactStore>,
}

impl Registry {
    /// A registry over `store`.
    pub fn new(store: Arc<dyn ArtifactStore>) -> Self {
        Self { store }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn ArtifactStore> {
        &self.store
    }

    /// Names of the models that have a registry, sorted.
    pub async fn models(&self) -> Result<Vec<String>, ArtifactError> {
        let keys = self.store.list("models/").await?;
        Ok(keys
            .iter()
            .filter_map(|k| k.strip_prefix("models/")?.strip_suffix("/registry.json"))
            .filter(|name| validate_model_name(name).is_ok())
            .map(str::to_owned)
            .collect())
    }

    /// Publishes a trained model as a new version and returns its id.
    ///
    /// Refuses an inconsistent model (shapes that disagree with the id lists, non-finite
    /// values, duplicate ids) and an existing version before writing anything. Writes every
    /// data file, then the manifest, then the registry entry; the version is visible only after
    /// the last step, so a failure at any point leaves nothing half-published.
    pub async fn publish(
        &self,
        model: &str,
        als: &AlsModel,
        users: &IdMap,
        items: &IdMap,
        input: ManifestInput,
    ) -> Result<String, ArtifactError> {
        validate_model_name(model)?;
        let version = match input.version {
            Some(v) => v,
            None => generate_version(Utc::now()),
        };
        validate_version(&version)?;
        check_model(model, als, users, items)?;

        let exists = || ArtifactError::VersionExists {
            model: model.to_owned(),
            version: version.clone(),
        };
        match self.read_index(model).await {
            Ok(index) => check_new_version(&index, &version)?,
            Err(ArtifactError::ModelNotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        if self
            .store
            .get(&file_key(model, &version, MANIFEST))
            .await?
            .is_some()
        {
            return Err(exists());
        }

        let ids = |what: &str, ids: &IdMap| {
            serde_json::to_vec(ids.ids()).map_err(|source| ArtifactError::Json {
                key: file_key(model, &version, what),
                source,
            })
        };
        let files = [
            (
                USER_FACTORS,
                encode_factors(als.user_factors.view()),
                Some(shape(&als.user_factors)),
            ),
            (
                ITEM_FACTORS,
                encode_factors(als.item_factors.view()),
                Some(shape(&als.item_factors)),
            ),
            (USER_IDS, ids(USER_IDS, users)?, None),
            (ITEM_IDS, ids(ITEM_IDS, items)?, None),
        ];
        let mut entries = Vec::with_capacity(files.len());
        for (name, bytes, shape) in files {
            entries.push(FileEntry {
                path: name.to_owned(),
                sha256: sha256_hex(&bytes),
                bytes: bytes.len() as u64,
                shape,
            });
            // Create-only: of two publishers racing for one version id, the second stops at
            // its first file instead of overwriting the winner's.
            self.create(&file_key(model, &version, name), bytes)
                .await
                .map_err(|e| conflict_means(e, exists))?;
        }

        let created_at = Utc::now();
        let summary = summarize_metrics(&input.metrics);
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            model: model.to_owned(),
            version: version.clone(),
            created_at,
            trainer_version: input.trainer_version,
            git_sha: input.git_sha,
            dtype: Dtype::F32,
            regularization: als.regularization,
            files: entries,
            params: input.params,
            metrics: input.metrics,
            data: input.data,
        };
        let manifest_key = file_key(model, &version, MANIFEST);
        let manifest_bytes =
            serde_json::to_vec_pretty(&manifest).map_err(|source| ArtifactError::Json {
                key: manifest_key.clone(),
                source,
            })?;
        let manifest_sha256 = sha256_hex(&manifest_bytes);
        self.create(&manifest_key, manifest_bytes)
            .await
            .map_err(|e| conflict_means(e, exists))?;

        let entry = VersionEntry {
            version: version.clone(),
            created_at,
            manifest_sha256,
            summary,
        };
        self.update(model, true, |index| {
            check_new_version(index, &entry.version)?;
            index.versions.push(entry.clone());
            Ok(())
        })
        .await?;
        tracing::info!(model, version, summary = %entry.summary, "published model version");
        Ok(version)
    }

    /// The model's `registry.json`.
    pub async fn index(&self, model: &str) -> Result<RegistryIndex, ArtifactError> {
        validate_model_name(model)?;
        self.read_index(model).await
    }

    /// The published versions, in publish order.
    pub async fn list(&self, model: &str) -> Result<Vec<VersionEntry>, ArtifactError> {
        Ok(self.index(model).await?.versions)
    }

    /// The version id an alias or version id designates.
    pub async fn resolve(
        &self,
        model: &str,
        version_or_alias: &str,
    ) -> Result<String, ArtifactError> {
        let index = self.index(model).await?;
        Ok(resolve(&index, version_or_alias)?.version.clone())
    }

    /// The manifest of a published version (or alias), checked against the registry entry.
    pub async fn get_manifest(
        &self,
        model: &str,
        version_or_alias: &str,
    ) -> Result<Manifest, ArtifactError> {
        let index = self.index(model).await?;
        let entry = resolve(&index, version_or_alias)?;
        self.read_manifest(model, entry).await
    }

    /// Loads a published version (or alias) and verifies it: the manifest against the
    /// registry, every file's size and sha256 against the manifest, the factor headers, the
    /// shapes against the manifest and the id lists, and that every value is finite. Any
    /// failure refuses the whole model with an error naming the file.
    pub async fn load(
        &self,
        model: &str,
        version_or_alias: &str,
    ) -> Result<LoadedModel, ArtifactError> {
        let index = self.index(model).await?;
        let entry = resolve(&index, version_or_alias)?;
        let manifest = self.read_manifest(model, entry).await?;
        let version = entry.version.as_str();
        let (user_factors, item_factors, user_ids, item_ids) = tokio::try_join!(
            self.read_file(model, version, &manifest, USER_FACTORS),
            self.read_file(model, version, &manifest, ITEM_FACTORS),
            self.read_file(model, version, &manifest, USER_IDS),
            self.read_file(model, version, &manifest, ITEM_IDS),
        )?;
        let user_factors = factors(model, version, &manifest, USER_FACTORS, &user_factors)?;
        let item_factors = factors(model, version, &manifest, ITEM_FACTORS, &item_factors)?;
        let users = id_map(model, version, USER_IDS, &user_ids)?;
        let items = id_map(model, version, ITEM_IDS, &item_ids)?;

        let mismatch = |file: &str, reason: String| ArtifactError::ShapeMismatch {
            key: file_key(model, version, file),
            reason,
        };
        if user_factors.nrows() != users.len() {
            return Err(mismatch(
                USER_FACTORS,
                format!(
                    "{} rows but {USER_IDS} has {} ids",
                    user_factors.nrows(),
                    users.len()
                ),
            ));
        }
        if item_factors.nrows() != items.len() {
            return Err(mismatch(
                ITEM_FACTORS,
                format!(
                    "{} rows but {ITEM_IDS} has {} ids",
                    item_factors.nrows(),
                    items.len()
                ),
            ));
        }
        if item_factors.ncols() != user_factors.ncols() {
            return Err(mismatch(
                ITEM_FACTORS,
                format!(
                    "{} columns but {USER_FACTORS} has {}",
                    item_factors.ncols(),
                    user_factors.ncols()
                ),
            ));
        }
        if !manifest.regularization.is_finite() || manifest.regularization < 0.0 {
            return Err(ArtifactError::BadFormat {
                key: file_key(model, version, MANIFEST),
                reason: format!(
                    "regularization {} is not a finite number ≥ 0",
                    manifest.regularization
                ),
            });
        }
        Ok(LoadedModel {
            model: AlsModel {
                user_factors,
                item_factors,
                regularization: manifest.regularization,
            },
            users,
            items,
            manifest,
        })
    }

    /// Points `alias` at a published version (or at what another alias designates).
    pub async fn set_alias(
        &self,
        model: &str,
        alias: &str,
        version_or_alias: &str,
    ) -> Result<(), ArtifactError> {
        validate_model_name(model)?;
        validate_alias(alias)?;
        let version = self
            .update(model, false, |index| {
                if index.version(alias).is_some() {
                    return Err(invalid("alias", alias, "is a version id of this model"));
                }
                let version = resolve(index, version_or_alias)?.version.clone();
                index.aliases.insert(alias.to_owned(), version.clone());
                Ok(version)
            })
            .await?;
        tracing::info!(model, alias, version, "set model alias");
        Ok(())
    }

    /// Removes `alias`; removing an absent alias succeeds.
    pub async fn remove_alias(&self, model: &str, alias: &str) -> Result<(), ArtifactError> {
        validate_model_name(model)?;
        validate_alias(alias)?;
        self.update(model, false, |index| {
            index.aliases.remove(alias);
            Ok(())
        })
        .await
    }

    /// Makes a version (or what an alias designates) the `champion`; the champion it replaces
    /// becomes `previous`. Promoting the champion again changes nothing. Returns the version.
    pub async fn promote(
        &self,
        model: &str,
        version_or_alias: &str,
    ) -> Result<String, ArtifactError> {
        validate_model_name(model)?;
        let version = self
            .update(model, false, |index| promote(index, version_or_alias))
            .await?;
        tracing::info!(model, version, "promoted model version to champion");
        Ok(version)
    }

    /// Makes `previous` the `champion` again and removes `previous` (so a second rollback
    /// does not bring the faulty version back). Returns the new champion.
    pub async fn rollback(&self, model: &str) -> Result<String, ArtifactError> {
        validate_model_name(model)?;
        let version = self.update(model, false, rollback).await?;
        tracing::warn!(model, version, "rolled back model champion");
        Ok(version)
    }

    async fn create(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArtifactError> {
        self.store.put_if(key, bytes, None).await
    }

    async fn read_index(&self, model: &str) -> Result<RegistryIndex, ArtifactError> {
        let key = registry_key(model);
        match self.store.get(&key).await? {
            Some(bytes) => parse_index(&key, model, &bytes),
            None => Err(ArtifactError::ModelNotFound {
                model: model.to_owned(),
            }),
        }
    }

    /// Reads, changes and writes back `registry.json` by compare-and-swap, retrying when
    /// another writer got in between. `change` returning an error aborts without writing.
    async fn update<T>(
        &self,
        model: &str,
        create: bool,
        mut change: impl FnMut(&mut RegistryIndex) -> Result<T, ArtifactError> + Send,
    ) -> Result<T, ArtifactError> {
        let key = registry_key(model);
        let mut attempt = 0;
        loop {
            let (mut index, revision) = match self.store.get_versioned(&key).await? {
                Some(current) => (
                    parse_index(&key, model, &current.bytes)?,
                    Some(current.revision),
                ),
                None if create => (RegistryIndex::empty(model), None),
                None => {
                    return Err(ArtifactError::ModelNotFound {
                        model: model.to_owned(),
                    });
                }
            };
            let out = change(&mut index)?;
            let bytes =
                serde_json::to_vec_pretty(&index).map_err(|source| ArtifactError::Json {
                    key: key.clone(),
                    source,
                })?;
            match self.store.put_if(&key, bytes, revision.as_ref()).await {
                Ok(()) => return Ok(out),
                Err(e @ ArtifactError::Conflict { .. }) => {
                    attempt += 1;
                    if attempt >= UPDATE_ATTEMPTS {
                        return Err(e);
                    }
                    tracing::debug!(model, attempt, "registry changed underneath, retrying");
                    // Jitter keeps racing writers from colliding in lockstep.
                    let ms = 5 * u64::from(attempt.min(10)) + rand::random_range(0..20u64);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn read_manifest(
        &self,
        model: &str,
        entry: &VersionEntry,
    ) -> Result<Manifest, ArtifactError> {
        let version = entry.version.as_str();
        let key = file_key(model, version, MANIFEST);
        let bytes = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| ArtifactError::MissingFile { key: key.clone() })?;
        let actual = sha256_hex(&bytes);
        if actual != entry.manifest_sha256 {
            return Err(ArtifactError::ChecksumMismatch {
                key,
                expected: entry.manifest_sha256.clone(),
                actual,
            });
        }
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| ArtifactError::Json {
                key: key.clone(),
                source,
            })?;
        let bad = |reason: String| ArtifactError::BadFormat {
            key: key.clone(),
            reason,
        };
        if manifest.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {}, this build reads {FORMAT_VERSION}",
                manifest.format_version
            )));
        }
        if manifest.model != model || manifest.version != version {
            return Err(bad(format!(
                "describes {} version {}",
                manifest.model, manifest.version
            )));
        }
        Ok(manifest)
    }

    /// A file of the version, checked for presence, size and sha256 against the manifest.
    async fn read_file(
        &self,
        model: &str,
        version: &str,
        manifest: &Manifest,
        name: &str,
    ) -> Result<Vec<u8>, ArtifactError> {
        let key = file_key(model, version, name);
        let entry = manifest
            .file(name)
            .ok_or_else(|| ArtifactError::BadFormat {
                key: file_key(model, version, MANIFEST),
                reason: format!("lists no {name}"),
            })?;
        let bytes = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| ArtifactError::MissingFile { key: key.clone() })?;
        if bytes.len() as u64 != entry.bytes {
            return Err(ArtifactError::SizeMismatch {
                key,
                expected: entry.bytes,
                actual: bytes.len() as u64,
            });
        }
        let actual = sha256_hex(&bytes);
        if actual != entry.sha256 {
            return Err(ArtifactError::ChecksumMismatch {
                key,
                expected: entry.sha256.clone(),
                actual,
            });
        }
        Ok(bytes)
    }
}

fn shape(m: &Array2<f32>) -> [u64; 2] {
    [m.nrows() as u64, m.ncols() as u64]
}

fn conflict_means(e: ArtifactError, exists: impl FnOnce() -> ArtifactError) -> ArtifactError {
    match e {
        ArtifactError::Conflict { .. } => exists(),
        e => e,
    }
}

fn parse_index(key: &str, model: &str, bytes: &[u8]) -> Result<RegistryIndex, ArtifactError> {
    let index: RegistryIndex =
        serde_json::from_slice(bytes).map_err(|source| ArtifactError::Json {
            key: key.to_owned(),
            source,
        })?;
    let bad = |reason: String| ArtifactError::BadFormat {
        key: key.to_owned(),
        reason,
    };
    if index.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "format_version {}, this build reads {FORMAT_VERSION}",
            index.format_version
        )));
    }
    if index.model != model {
        return Err(bad(format!("describes model {}", index.model)));
    }
    Ok(index)
}

fn resolve<'a>(
    index: &'a RegistryIndex,
    version_or_alias: &str,
) -> Result<&'a VersionEntry, ArtifactError> {
    index
        .resolve(version_or_alias)
        .ok_or_else(|| ArtifactError::VersionNotFound {
            model: index.model.clone(),
            version: version_or_alias.to_owned(),
        })
}

fn check_new_version(index: &RegistryIndex, version: &str) -> Result<(), ArtifactError> {
    if index.version(version).is_some() {
        return Err(ArtifactError::VersionExists {
            model: index.model.clone(),
            version: version.to_owned(),
        });
    }
    if index.aliases.contains_key(version) {
        return Err(invalid("version", version, "is an alias of this model"));
    }
    Ok(())
}

fn promote(index: &mut RegistryIndex, version_or_alias: &str) -> Result<String, ArtifactError> {
    let version = resolve(index, version_or_alias)?.version.clone();
    if let Some(old) = index.aliases.insert(CHAMPION.to_owned(), version.clone())
        && old != version
    {
        index.aliases.insert(PREVIOUS.to_owned(), old);
    }
    Ok(version)
}

fn rollback(index: &mut RegistryIndex) -> Result<String, ArtifactError> {
    let previous =
        index
            .aliases
            .get(PREVIOUS)
            .cloned()
            .ok_or_else(|| ArtifactError::NoPrevious {
                model: index.model.clone(),
            })?;
    resolve(index, &previous)?;
    index.aliases.remove(PREVIOUS);
    index.aliases.insert(CHAMPION.to_owned(), previous.clone());
    Ok(previous)
}

/// Refuses a model whose parts disagree, before anything is written.
fn check_model(
    model: &str,
    als: &AlsModel,
    users: &IdMap,
    items: &IdMap,
) -> Result<(), ArtifactError> {
    let refuse = |reason: String| {
        Err(ArtifactError::InvalidModel {
            model: model.to_owned(),
            reason,
        })
    };
    let (u, i) = (&als.user_factors, &als.item_factors);
    if u.nrows() != users.len() || i.nrows() != items.len() {
        return refuse(format!(
            "{} user rows for {} user ids, {} item rows for {} item ids",
            u.nrows(),
            users.len(),
            i.nrows(),
            items.len()
        ));
    }
    if u.nrows() == 0 || i.nrows() == 0 {
        return refuse("no users or no items".into());
    }
    if u.ncols() == 0 || u.ncols() != i.ncols() {
        return refuse(format!(
            "{} user factors but {} item factors",
            u.ncols(),
            i.ncols()
        ));
    }
    if !als.regularization.is_finite() || als.regularization < 0.0 {
        return refuse(format!(
            "regularization {} is not a finite number ≥ 0",
            als.regularization
        ));
    }
    for (what, m) in [("user", u), ("item", i)] {
        if let Some(((row, col), value)) = m.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return refuse(format!(
                "{what} factor at row {row}, column {col} is {value}"
            ));
        }
    }
    for (what, ids) in [("user", users), ("item", items)] {
        let mut seen = HashSet::with_capacity(ids.len());
        if let Some(dup) = ids.ids().iter().find(|id| !seen.insert(id.as_str())) {
            return refuse(format!("duplicate {what} id {dup:?}"));
        }
    }
    Ok(())
}

fn factors(
    model: &str,
    version: &str,
    manifest: &Manifest,
    name: &str,
    bytes: &[u8],
) -> Result<Array2<f32>, ArtifactError> {
    let key = file_key(model, version, name);
    let matrix = decode_factors(&key, bytes)?;
    let found = shape(&matrix);
    match manifest.file(name).and_then(|f| f.shape) {
        Some(expected) if expected == found => Ok(matrix),
        expected => Err(ArtifactError::ShapeMismatch {
            key,
            reason: format!(
                "the file is {} × {}, the manifest says {}",
                found[0],
                found[1],
                expected.map_or("nothing".to_owned(), |[r, c]| format!("{r} × {c}"))
            ),
        }),
    }
}

fn id_map(model: &str, version: &str, name: &str, bytes: &[u8]) -> Result<IdMap, ArtifactError> {
    let key = file_key(model, version, name);
    let ids: Vec<String> = serde_json::from_slice(bytes).map_err(|source| ArtifactError::Json {
        key: key.clone(),
        source,
    })?;
    let mut seen = HashSet::with_capacity(ids.len());
    if let Some(dup) = ids.iter().find(|id| !seen.insert(id.as_str())) {
        return Err(ArtifactError::BadFormat {
            key,
            reason: format!("duplicate id {dup:?}"),
        });
    }
    Ok(IdMap::from_ids(ids))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    fn index(versions: &[&str]) -> RegistryIndex {
        let mut index = RegistryIndex::empty("m");
        for v in versions {
            index.versions.push(VersionEntry {
                version: (*v).to_owned(),
                created_at: Utc::now(),
                manifest_sha256: String::new(),
                summary: String::new(),
            });
        }
        index
    }

    fn alias<'a>(index: &'a RegistryIndex, name: &str) -> Option<&'a str> {
        index.aliases.get(name).map(String::as_str)
    }

    #[test]
    fn promote_moves_the_champion_to_previous() {
        let mut ix = index(&["v1", "v2", "v3"]);
        assert_eq!(promote(&mut ix, "v1").expect("promote"), "v1");
        assert_eq!(
            (alias(&ix, CHAMPION), alias(&ix, PREVIOUS)),
            (Some("v1"), None)
        );
        promote(&mut ix, "v2").expect("promote");
        assert_eq!(
            (alias(&ix, CHAMPION), alias(&ix, PREVIOUS)),
            (Some("v2"), Some("v1"))
        );
        // Promoting the champion again keeps `previous`.
        promote(&mut ix, CHAMPION).expect("promote");
        assert_eq!(
            (alias(&ix, CHAMPION), alias(&ix, PREVIOUS)),
            (Some("v2"), Some("v1"))
        );
        promote(&mut ix, "v3").expect("promote");
        assert_eq!(
            (alias(&ix, CHAMPION), alias(&ix, PREVIOUS)),
            (Some("v3"), Some("v2"))
        );
        assert_eq!(
            promote(&mut ix, "v9").expect_err("unknown").kind(),
            "VersionNotFound"
        );
        assert_eq!(
            alias(&ix, CHAMPION),
            Some("v3"),
            "a failed promote changes nothing"
        );
    }

    #[test]
    fn rollback_restores_previous_once() {
        let mut ix = index(&["v1", "v2"]);
        assert_eq!(
            rollback(&mut ix).expect_err("empty").kind(),
            "NoPreviousVersion"
        );
        promote(&mut ix, "v1").expect("promote");
        promote(&mut ix, "v2").expect("promote");
        assert_eq!(rollback(&mut ix).expect("rollback"), "v1");
        assert_eq!(
            (alias(&ix, CHAMPION), alias(&ix, PREVIOUS)),
            (Some("v1"), None)
        );
        assert_eq!(
            rollback(&mut ix).expect_err("twice").kind(),
            "NoPreviousVersion"
        );
        // `previous` pointing at a version that is not listed is refused, not followed.
        ix.aliases.insert(PREVIOUS.into(), "gone".into());
        assert_eq!(
            rollback(&mut ix).expect_err("dangling").kind(),
            "VersionNotFound"
        );
        assert_eq!(alias(&ix, CHAMPION), Some("v1"));
    }

    #[test]
    fn names_are_validated() {
        for ok in ["m", "shop-cf", "a1-b2", &"a".repeat(63)] {
            assert!(validate_model_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a/b", &"a".repeat(64)] {
            assert_eq!(
                validate_model_name(bad).expect_err(bad).kind(),
                "InvalidName"
            );
        }
        for ok in ["v1", "20250101-120000-abcdef", "A.b_c-1", "1.2.3"] {
            assert!(validate_version(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".v",
            "a..b",
            "a/b",
            "a\\b",
            "a b",
            &"v".repeat(129),
        ] {
            assert_eq!(validate_version(bad).expect_err(bad).kind(), "InvalidName");
        }
    }

    #[test]
    fn generated_versions_sort_by_time() {
        let at = |s| Utc.timestamp_opt(s, 0).single().expect("time");
        let a = generate_version(at(1_700_000_000));
        let b = generate_version(at(1_700_000_001));
        assert!(a.starts_with("20231114-221320-"), "{a}");
        assert_eq!(a.len(), 22);
        assert!(validate_version(&a).is_ok());
        assert!(a < b, "{a} < {b}");
    }

    #[test]
    fn inconsistent_models_are_refused() {
        let ids = |n: usize| IdMap::from_ids((0..n).map(|i| i.to_string()).collect());
        let model = |u, i, k| AlsModel {
            user_factors: Array2::zeros((u, k)),
            item_factors: Array2::zeros((i, k)),
            regularization: 0.1,
        };
        assert!(check_model("m", &model(2, 3, 4), &ids(2), &ids(3)).is_ok());
        let refused = |m: &AlsModel, u: usize, i: usize| {
            check_model("m", m, &ids(u), &ids(i))
                .expect_err("refused")
                .to_string()
        };
        assert!(refused(&model(2, 3, 4), 3, 3).contains("2 user rows for 3 user ids"));
        assert!(refused(&model(0, 0, 4), 0, 0).contains("no users"));
        let mut m = model(2, 3, 4);
        m.item_factors = Array2::zeros((3, 5));
        assert!(refused(&m, 2, 3).contains("4 user factors but 5 item factors"));
        let mut m = model(2, 3, 4);
        m.regularization = f32::NAN;
        assert!(refused(&m, 2, 3).contains("regularization"));
        let mut m = model(2, 3, 4);
        m.user_factors[[1, 3]] = f32::NEG_INFINITY;
        assert!(refused(&m, 2, 3).contains("user factor at row 1, column 3 is -inf"));
    }
}
