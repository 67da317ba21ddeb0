//! The feature registry: every version of every feature definition, its lifecycle (active,
//! deprecated, retired) and its materialization runs, for discovery by the scorer, the trainer
//! and people.
//!
//! - **Versions are immutable.** Registering a version again with the same spec is a no-op;
//!   with a different spec it is refused ([`RegistryError::VersionConflict`]). The deprecation
//!   block is the one exception: it is lifecycle, not content.
//! - **Majors share storage.** Values are stored per major version ([`FeatureRef`]), so the
//!   versions of one major must agree on entity, value type and dimension; a breaking change
//!   is a new major version ([`RegistryError::BreakingChange`]), stored side by side with the
//!   old one until that is deprecated and retired.
//! - **Lifecycle is one way:** active → deprecated ([`FeatureRegistry::deprecate`]) → retired
//!   ([`FeatureRegistry::retire`]).
//!
//! [`FeatureSpec`] mirrors the `FeatureDefinition` custom resource's spec (same JSON field
//! names, so the operator can convert through `serde_json`), without depending on Kubernetes.
//!
//! Two implementations pass one conformance suite (`core/tests/feature_registry_conformance.rs`):
//! [`PostgresFeatureRegistry`] (tables of migration `0003_feature_registry.sql`) and
//! [`InProcessFeatureRegistry`] (the local mode's, optionally persisted to a JSON file).

mod memory;
mod postgres;

use std::cmp::Ordering;
use std::path::PathBuf;
use std::str::FromStr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::offline::{MAX_TIME_MS, MIN_TIME_MS, valid_feature_name};
use super::{EntityKind, FeatureRef, FeatureValue};

pub use memory::InProcessFeatureRegistry;
pub use postgres::PostgresFeatureRegistry;

/// Why the registry refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The spec is not a valid feature definition.
    #[error("feature {name:?}: invalid spec: {reason}")]
    InvalidSpec {
        /// The feature name as given.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The version is registered with a different spec; versions are immutable.
    #[error(
        "feature {name} version {version} is already registered with a different spec (differs in: {}); versions are immutable: register the change under a new version",
        fields.join(", ")
    )]
    VersionConflict {
        /// The feature.
        name: String,
        /// The version.
        version: String,
        /// Top-level spec fields that differ.
        fields: Vec<String>,
    },
    /// The version changes what a stored value is within a major version.
    #[error(
        "feature {name} version {version} changes {field} ({change}) against version {existing}; the versions of a major version share their stored values, so this needs a new major version"
    )]
    BreakingChange {
        /// The feature.
        name: String,
        /// The version being registered.
        version: String,
        /// The registered version of the same major that disagrees.
        existing: String,
        /// `entity`, `valueType` or `dimension`.
        field: &'static str,
        /// The change, `old → new`.
        change: String,
    },
    /// No such feature or version.
    #[error("feature {name} {version} is not registered")]
    NotFound {
        /// The feature.
        name: String,
        /// The version or selector asked for.
        version: String,
    },
    /// Retiring needs a deprecation first.
    #[error("feature {name} version {version} must be deprecated before it is retired")]
    NotDeprecated {
        /// The feature.
        name: String,
        /// The version.
        version: String,
    },
    /// Every version of the major version is retired.
    #[error("feature {feature} is retired")]
    Retired {
        /// The feature version.
        feature: String,
    },
    /// An argument other than a spec is out of bounds.
    #[error("feature registry: {0}")]
    InvalidArgument(String),
    /// Postgres failed.
    #[error("feature registry (postgres): {0}")]
    Postgres(#[from] sqlx::Error),
    /// A migration failed.
    #[error("feature registry migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The file of the in-process registry could not be read or written.
    #[error("feature registry file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Stored data does not decode.
    #[error("feature registry data in {location} is corrupt: {message}")]
    Corrupt {
        /// The file or table.
        location: String,
        /// What does not decode.
        message: String,
    },
}

impl RegistryError {
    /// Stable label for metrics and events.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidSpec { .. } => "FeatureSpecInvalid",
            Self::VersionConflict { .. } => "FeatureVersionConflict",
            Self::BreakingChange { .. } => "FeatureBreakingChange",
            Self::NotFound { .. } => "FeatureNotFound",
            Self::NotDeprecated { .. } => "FeatureNotDeprecated",
            Self::Retired { .. } => "FeatureRetired",
            Self::InvalidArgument(_) => "RegistryInvalidArgument",
            Self::Postgres(_) => "RegistryPostgres",
            Self::Migrate(_) => "RegistryMigrate",
            Self::Io { .. } => "RegistryIo",
            Self::Corrupt { .. } => "RegistryCorrupt",
        }
    }

    /// Whether retrying can help: an unreachable server or a full disk can pass; a refused
    /// spec or a missing feature needs a change first.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Postgres(e) => super::offline::sqlx_retryable(e),
            Self::Io { .. } => true,
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The spec

/// Type of a feature value (the CRD's `valueType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum ValueType {
    /// 64-bit float.
    Float,
    /// 64-bit signed integer.
    Int,
    /// UTF-8 string.
    String,
    /// Vector of 32-bit floats of length `dimension`.
    FloatVector,
}

impl ValueType {
    /// Wire name, as in the CRD.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Float => "float",
            Self::Int => "int",
            Self::String => "string",
            Self::FloatVector => "floatVector",
        }
    }

    /// Whether `value` is of this type (and, for vectors, of length `dimension` when given).
    pub fn accepts(self, value: &FeatureValue, dimension: Option<u32>) -> bool {
        match (self, value) {
            (Self::Float, FeatureValue::Float(_))
            | (Self::Int, FeatureValue::Int(_))
            | (Self::String, FeatureValue::String(_)) => true,
            (Self::FloatVector, FeatureValue::FloatVector(v)) => {
                dimension.is_none_or(|d| usize::try_from(d).is_ok_and(|d| d == v.len()))
            }
            _ => false,
        }
    }
}

/// The entity of a spec, spelled as in the CRD (`user`, `product`, `userProduct`); the
/// snake-case `user_product` is accepted too.
mod entity_wire {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    use crate::features::EntityKind;

    pub fn serialize<S: Serializer>(kind: &EntityKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(super::entity_crd_name(*kind))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EntityKind, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "user" => Ok(EntityKind::User),
            "product" => Ok(EntityKind::Product),
            "userProduct" | "user_product" => Ok(EntityKind::UserProduct),
            other => Err(D::Error::custom(format!(
                "unknown entity {other:?}: expected user, product or userProduct"
            ))),
        }
    }
}

/// The CRD's spelling of an entity kind.
pub fn entity_crd_name(kind: EntityKind) -> &'static str {
    match kind {
        EntityKind::User => "user",
        EntityKind::Product => "product",
        EntityKind::UserProduct => "userProduct",
    }
}

fn default_true() -> bool {
    true
}

/// One version of a feature definition: the registry's record of the `FeatureDefinition`
/// spec. Field names and JSON spelling follow the CRD.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeatureSpec {
    /// Feature name, `[a-z][a-z0-9_]*`, at most 63 characters.
    pub name: String,
    /// What the feature describes.
    #[serde(with = "entity_wire")]
    pub entity: EntityKind,
    /// Served from the online store.
    #[serde(default = "default_true")]
    pub online: bool,
    /// Kept in the offline store.
    #[serde(default = "default_true")]
    pub offline: bool,
    /// Semantic version `MAJOR.MINOR.PATCH[-PRERELEASE]` (no build metadata).
    pub version: String,
    /// Type of the value.
    pub value_type: ValueType,
    /// Length of the vector, for `floatVector` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimension: Option<u32>,
    /// What the feature means.
    pub description: String,
    /// Team or person answerable for it.
    pub owner: String,
    /// Tags for discovery.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// How the values are produced.
    pub computation: Computation,
    /// What the feature is computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
    /// How long an online value stays fresh, `<integer><unit>` pairs (`ms s m h d`), e.g. `1d`.
    pub ttl: String,
    /// Drift thresholds of the data-quality job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftThresholds>,
    /// What a feature job does with this version when its input fails a blocking data-quality
    /// check or its new values drift past `drift`: `block` (the default: keep the values
    /// already served) or `warn` (publish and warn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_quality_failure: Option<QualityPolicy>,
    /// Set when the version is being retired. Lifecycle, not content: it may be added to a
    /// registered version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecation: Option<Deprecation>,
}

/// What a feature job does with a feature whose input or values fail their checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum QualityPolicy {
    /// Keep the values already served; the job fails with the gate's exit code.
    #[default]
    Block,
    /// Publish the new values and report the failure as a warning.
    Warn,
}

/// How a feature is computed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Computation {
    /// The trainer job (subcommand) that produces the values, e.g. `popularity`.
    pub job: String,
    /// The logic, in words or pseudo-code.
    pub logic: String,
    /// Window of events, e.g. `90d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Half-life of the time decay, e.g. `7d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_life: Option<String>,
}

/// Inputs of a feature.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lineage {
    /// Source tables, e.g. `events`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
    /// Names of the features this one is computed from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// Drift thresholds; a check fails when its statistic exceeds the threshold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftThresholds {
    /// Population stability index (0–10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psi: Option<f64>,
    /// Kolmogorov–Smirnov statistic (0–1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ks: Option<f64>,
    /// Jensen–Shannon distance (0–1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jensen_shannon: Option<f64>,
}

/// Retirement of a feature version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deprecation {
    /// The feature that replaces this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
    /// When it stops being served, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sunset: Option<String>,
    /// Why it is retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl FeatureSpec {
    /// The parsed semantic version.
    pub fn semver(&self) -> Result<semver::Version, RegistryError> {
        parse_version(&self.name, &self.version)
    }

    /// The storage address of this version: name and major.
    pub fn feature_ref(&self) -> Result<FeatureRef, RegistryError> {
        Ok(FeatureRef::new(self.name.clone(), self.semver()?.major))
    }

    /// The TTL in milliseconds.
    pub fn ttl_ms(&self) -> Result<u64, RegistryError> {
        parse_duration_ms(&self.ttl).map_err(|reason| self.invalid(format!("ttl: {reason}")))
    }

    fn invalid(&self, reason: String) -> RegistryError {
        RegistryError::InvalidSpec {
            name: self.name.clone(),
            reason,
        }
    }

    /// Checks the spec on its own (the rules of the CRD's schema and CEL validations).
    pub fn validate(&self) -> Result<semver::Version, RegistryError> {
        let err = |reason: &str| Err(self.invalid(reason.to_owned()));
        if !valid_feature_name(&self.name) {
            return err(
                "name must be lower-case letters, digits and `_`, start with a letter, and have at most 63 characters",
            );
        }
        let version = self.semver()?;
        if !self.online && !self.offline {
            return err("a feature is served online, offline, or both: set online or offline");
        }
        match (self.value_type, self.dimension) {
            (ValueType::FloatVector, None) => {
                return err("dimension is required for valueType floatVector");
            }
            (ValueType::FloatVector, Some(d)) if !(1..=4096).contains(&d) => {
                return err("dimension must be between 1 and 4096");
            }
            (ValueType::FloatVector, Some(_)) | (_, None) => {}
            (_, Some(_)) => return err("dimension is only allowed for valueType floatVector"),
        }
        if self.description.trim().is_empty() || self.description.len() > 2048 {
            return err("description must have 1 to 2048 characters");
        }
        if self.owner.trim().is_empty() || self.owner.len() > 128 {
            return err("owner must have 1 to 128 characters");
        }
        if self.tags.len() > 16 {
            return err("at most 16 tags");
        }
        if self.tags.iter().any(|t| t.is_empty() || t.len() > 63) {
            return err("every tag must have 1 to 63 characters");
        }
        if self.computation.job.is_empty() || self.computation.logic.is_empty() {
            return err("computation.job and computation.logic are required");
        }
        self.ttl_ms()?;
        for (what, d) in [
            ("computation.window", &self.computation.window),
            ("computation.halfLife", &self.computation.half_life),
        ] {
            if let Some(d) = d {
                parse_duration_ms(d).map_err(|reason| self.invalid(format!("{what}: {reason}")))?;
            }
        }
        if let Some(lineage) = &self.lineage {
            if lineage.features.iter().any(|f| f == &self.name) {
                return err("lineage.features must not contain the feature itself");
            }
            if let Some(f) = lineage.features.iter().find(|f| !valid_feature_name(f)) {
                return Err(self.invalid(format!("lineage.features: {f:?} is not a feature name")));
            }
        }
        if let Some(drift) = &self.drift {
            for (what, value, max) in [
                ("psi", drift.psi, 10.0),
                ("ks", drift.ks, 1.0),
                ("jensenShannon", drift.jensen_shannon, 1.0),
            ] {
                if let Some(v) = value
                    && !(0.0..=max).contains(&v)
                {
                    return Err(self.invalid(format!("drift.{what} must be between 0 and {max}")));
                }
            }
        }
        if let Some(dep) = &self.deprecation
            && let Some(by) = &dep.replaced_by
            && (by.is_empty() || by == &self.name)
        {
            return err("deprecation.replacedBy must name another feature");
        }
        Ok(version)
    }

    /// The immutable content: the spec without its deprecation block.
    fn content(&self) -> FeatureSpec {
        FeatureSpec {
            deprecation: None,
            ..self.clone()
        }
    }
}

/// Parses a version: semantic, without build metadata, at most 64 characters.
fn parse_version(name: &str, version: &str) -> Result<semver::Version, RegistryError> {
    let invalid = |reason: String| RegistryError::InvalidSpec {
        name: name.to_owned(),
        reason,
    };
    if version.len() > 64 {
        return Err(invalid("version has more than 64 characters".into()));
    }
    let v = semver::Version::parse(version).map_err(|e| {
        invalid(format!(
            "version {version:?} is not a semantic version MAJOR.MINOR.PATCH: {e}"
        ))
    })?;
    if !v.build.is_empty() {
        return Err(invalid(format!(
            "version {version:?} has build metadata, which semantic versioning ignores in ordering; drop it"
        )));
    }
    Ok(v)
}

/// Parses a duration of `<integer><unit>` pairs (units `ms`, `s`, `m`, `h`, `d`), e.g. `1h30m`,
/// into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("{s:?}: expected a number at {rest:?}"));
        }
        let (num, tail) = rest.split_at(digits);
        let letters = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(letters);
        let scale: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?} (expected ms, s, m, h or d)"
                ));
            }
        };
        let n: u64 = num.parse().map_err(|e| format!("{s:?}: {e}"))?;
        total = n
            .checked_mul(scale)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| format!("{s:?} overflows"))?;
        rest = tail;
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// Records

/// Where a registered version is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum Lifecycle {
    /// In use.
    Active,
    /// Still served, but consumers should move to its replacement.
    Deprecated,
    /// No longer served.
    Retired,
}

/// A registered version and its lifecycle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisteredFeature {
    /// The spec as registered; its `deprecation` reflects the registry's deprecation.
    pub spec: FeatureSpec,
    /// Major version of `spec.version`.
    pub major: u64,
    /// When the version was first registered (ms since the epoch).
    pub registered_at_ms: i64,
    /// When it was deprecated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecated_at_ms: Option<i64>,
    /// What replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
    /// When it was retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at_ms: Option<i64>,
}

impl RegisteredFeature {
    /// The storage address: name and major version.
    pub fn feature_ref(&self) -> FeatureRef {
        FeatureRef::new(self.spec.name.clone(), self.major)
    }

    /// Where the version is in its life.
    pub fn lifecycle(&self) -> Lifecycle {
        if self.retired_at_ms.is_some() {
            Lifecycle::Retired
        } else if self.deprecated_at_ms.is_some() {
            Lifecycle::Deprecated
        } else {
            Lifecycle::Active
        }
    }

    /// The parsed version (falls back to 0.0.0 for a record that does not parse, which the
    /// stores never hold).
    fn semver(&self) -> semver::Version {
        semver::Version::parse(&self.spec.version).unwrap_or(semver::Version::new(0, 0, 0))
    }

    /// Records a deprecation; returns whether anything changed. The first deprecation time
    /// is kept; a later deprecation may update the replacement, sunset and reason.
    fn deprecate(&mut self, deprecation: Deprecation, now_ms: i64) -> bool {
        let before = (self.deprecated_at_ms, self.spec.deprecation.clone());
        let merged = match self.spec.deprecation.take() {
            Some(old) => Deprecation {
                replaced_by: deprecation.replaced_by.or(old.replaced_by),
                sunset: deprecation.sunset.or(old.sunset),
                reason: deprecation.reason.or(old.reason),
            },
            None => deprecation,
        };
        self.replaced_by = merged.replaced_by.clone();
        self.spec.deprecation = Some(merged);
        self.deprecated_at_ms.get_or_insert(now_ms);
        before != (self.deprecated_at_ms, self.spec.deprecation.clone())
    }
}

/// Outcome of [`FeatureRegistry::register`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registered {
    /// The version registered.
    pub version: String,
    /// Its major version.
    pub major: u64,
    /// When it was first registered (ms since the epoch).
    pub registered_at_ms: i64,
    /// Whether this call registered it (false: it already was, with the same spec).
    pub created: bool,
}

/// Which version [`FeatureRegistry::get`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionSelector {
    /// The highest usable version: not retired, active before deprecated, releases before
    /// pre-releases, then by semantic-version precedence.
    Latest,
    /// The highest usable version of a major version, by the same rule.
    Major(u64),
    /// Exactly this version, whatever its lifecycle.
    Exact(String),
}

impl FromStr for VersionSelector {
    type Err = RegistryError;

    /// `latest`, `v2` or `2` (a major version), or `1.2.3` (an exact version).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "latest" {
            return Ok(Self::Latest);
        }
        let major = s.strip_prefix('v').unwrap_or(s);
        if !major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()) {
            return major
                .parse()
                .map(Self::Major)
                .map_err(|e| RegistryError::InvalidArgument(format!("major version {s:?}: {e}")));
        }
        semver::Version::parse(s).map_err(|e| {
            RegistryError::InvalidArgument(format!(
                "version selector {s:?}: expected latest, a major version (v2) or a version (1.2.3): {e}"
            ))
        })?;
        Ok(Self::Exact(s.to_owned()))
    }
}

impl std::fmt::Display for VersionSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Latest => f.write_str("latest"),
            Self::Major(m) => write!(f, "v{m}"),
            Self::Exact(v) => f.write_str(v),
        }
    }
}

/// A discovery query; every field set must match. Retired and deprecated versions are left
/// out unless asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Query {
    /// Only features of this entity.
    #[serde(default)]
    pub entity: Option<EntityKind>,
    /// Only features carrying this tag (exact).
    #[serde(default)]
    pub tag: Option<String>,
    /// Only features of this owner (exact).
    #[serde(default)]
    pub owner: Option<String>,
    /// Case-insensitive text in the name, description or tags.
    #[serde(default)]
    pub text: Option<String>,
    /// Include deprecated versions.
    #[serde(default)]
    pub include_deprecated: bool,
    /// Include retired versions.
    #[serde(default)]
    pub include_retired: bool,
}

impl Query {
    /// Whether a registered version matches.
    pub fn matches(&self, f: &RegisteredFeature) -> bool {
        let lifecycle_ok = match f.lifecycle() {
            Lifecycle::Active => true,
            Lifecycle::Deprecated => self.include_deprecated,
            Lifecycle::Retired => self.include_retired,
        };
        let text_ok = self.text.as_deref().is_none_or(|t| {
            let t = t.to_lowercase();
            f.spec.name.to_lowercase().contains(&t)
                || f.spec.description.to_lowercase().contains(&t)
                || f.spec
                    .tags
                    .iter()
                    .any(|tag| tag.to_lowercase().contains(&t))
        });
        lifecycle_ok
            && text_ok
            && self.entity.is_none_or(|e| e == f.spec.entity)
            && self.tag.as_ref().is_none_or(|t| f.spec.tags.contains(t))
            && self.owner.as_ref().is_none_or(|o| &f.spec.owner == o)
    }
}

/// One materialization run of a feature version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Materialization {
    /// The feature version.
    pub feature: FeatureRef,
    /// The time the values describe (ms since the epoch), the run's key.
    pub at_ms: i64,
    /// Rows written.
    pub rows: u64,
    /// When the run was recorded.
    pub recorded_at_ms: i64,
}

// ---------------------------------------------------------------------------------------------
// The seam

/// The feature registry seam.
#[async_trait]
pub trait FeatureRegistry: Send + Sync {
    /// Records a version: idempotent for the same spec, refused for a different spec of a
    /// registered version or a breaking change within a major version. A deprecation block in
    /// the spec deprecates the version.
    async fn register(&self, spec: &FeatureSpec) -> Result<Registered, RegistryError>;

    /// One version of a feature, chosen by `selector`.
    async fn get(
        &self,
        name: &str,
        selector: &VersionSelector,
    ) -> Result<Option<RegisteredFeature>, RegistryError>;

    /// Every version of one feature, oldest version first.
    async fn versions(&self, name: &str) -> Result<Vec<RegisteredFeature>, RegistryError>;

    /// Every version of every feature, whatever its lifecycle, by name then version.
    async fn list(&self) -> Result<Vec<RegisteredFeature>, RegistryError>;

    /// The versions matching `query`, by name then version.
    async fn search(&self, query: &Query) -> Result<Vec<RegisteredFeature>, RegistryError>;

    /// Deprecates a version (idempotent; the first deprecation time is kept).
    async fn deprecate(
        &self,
        name: &str,
        version: &str,
        replaced_by: Option<&str>,
    ) -> Result<RegisteredFeature, RegistryError>;

    /// Retires a deprecated version (idempotent).
    async fn retire(&self, name: &str, version: &str) -> Result<RegisteredFeature, RegistryError>;

    /// Records a materialization run of a registered, not retired, major version; recording
    /// the same `at_ms` again replaces the row count.
    async fn record_materialization(
        &self,
        feature: &FeatureRef,
        at_ms: i64,
        rows: u64,
    ) -> Result<Materialization, RegistryError>;

    /// The run with the latest `at_ms`.
    async fn last_materialization(
        &self,
        feature: &FeatureRef,
    ) -> Result<Option<Materialization>, RegistryError>;

    /// The latest `limit` runs, newest first.
    async fn materializations(
        &self,
        feature: &FeatureRef,
        limit: usize,
    ) -> Result<Vec<Materialization>, RegistryError>;
}

// ---------------------------------------------------------------------------------------------
// Rules shared by the implementations

/// What to do with a registration.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Already registered with the same content and deprecation: nothing to write.
    Unchanged(RegisteredFeature),
    /// Already registered; its deprecation changes.
    Deprecate(RegisteredFeature),
    /// A new version.
    Insert(RegisteredFeature),
}

/// Decides a registration against the registered versions of the same name.
pub(crate) fn plan_registration(
    spec: &FeatureSpec,
    existing: &[RegisteredFeature],
    now_ms: i64,
) -> Result<Plan, RegistryError> {
    let version = spec.validate()?;
    if let Some(old) = existing.iter().find(|r| r.spec.version == spec.version) {
        let fields = differing_fields(&old.spec.content(), &spec.content());
        if !fields.is_empty() {
            return Err(RegistryError::VersionConflict {
                name: spec.name.clone(),
                version: spec.version.clone(),
                fields,
            });
        }
        let mut record = old.clone();
        return Ok(match &spec.deprecation {
            Some(dep) if record.deprecate(dep.clone(), now_ms) => Plan::Deprecate(record),
            _ => Plan::Unchanged(record),
        });
    }
    for other in existing.iter().filter(|r| r.major == version.major) {
        let checks: [(&'static str, String, String); 3] = [
            (
                "entity",
                entity_crd_name(other.spec.entity).to_owned(),
                entity_crd_name(spec.entity).to_owned(),
            ),
            (
                "valueType",
                other.spec.value_type.as_str().to_owned(),
                spec.value_type.as_str().to_owned(),
            ),
            (
                "dimension",
                format!("{:?}", other.spec.dimension),
                format!("{:?}", spec.dimension),
            ),
        ];
        if let Some((field, existing_value, new_value)) =
            checks.into_iter().find(|(_, a, b)| a != b)
        {
            return Err(RegistryError::BreakingChange {
                name: spec.name.clone(),
                version: spec.version.clone(),
                existing: other.spec.version.clone(),
                field,
                change: format!("{existing_value} → {new_value}"),
            });
        }
    }
    let mut record = RegisteredFeature {
        spec: spec.content(),
        major: version.major,
        registered_at_ms: now_ms,
        deprecated_at_ms: None,
        replaced_by: None,
        retired_at_ms: None,
    };
    if let Some(dep) = &spec.deprecation {
        record.deprecate(dep.clone(), now_ms);
    }
    Ok(Plan::Insert(record))
}

/// Top-level fields (CRD spelling) in which two specs differ.
fn differing_fields(a: &FeatureSpec, b: &FeatureSpec) -> Vec<String> {
    if a == b {
        return vec![];
    }
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            let fields: Vec<String> = keys
                .into_iter()
                .filter(|k| a.get(*k) != b.get(*k))
                .cloned()
                .collect();
            if fields.is_empty() {
                // Equal JSON but unequal values: floats that print alike.
                vec!["drift".into()]
            } else {
                fields
            }
        }
        _ => vec!["spec".into()],
    }
}

/// Ranks versions for [`VersionSelector::Latest`] and [`VersionSelector::Major`].
fn usable_order(a: &RegisteredFeature, b: &RegisteredFeature) -> Ordering {
    let key = |r: &RegisteredFeature| {
        let v = r.semver();
        (r.deprecated_at_ms.is_none(), v.pre.is_empty(), v)
    };
    key(a).cmp(&key(b))
}

/// Sorts versions by semantic-version precedence.
pub(crate) fn sort_versions(records: &mut [RegisteredFeature]) {
    records.sort_by(|a, b| {
        a.spec
            .name
            .cmp(&b.spec.name)
            .then_with(|| a.semver().cmp(&b.semver()))
    });
}

/// Picks a version of one feature's records.
pub fn select(
    records: &[RegisteredFeature],
    selector: &VersionSelector,
) -> Option<RegisteredFeature> {
    match selector {
        VersionSelector::Exact(v) => records.iter().find(|r| &r.spec.version == v).cloned(),
        VersionSelector::Latest => records
            .iter()
            .filter(|r| r.retired_at_ms.is_none())
            .max_by(|a, b| usable_order(a, b))
            .cloned(),
        VersionSelector::Major(m) => records
            .iter()
            .filter(|r| r.retired_at_ms.is_none() && r.major == *m)
            .max_by(|a, b| usable_order(a, b))
            .cloned(),
    }
}

/// Applies [`FeatureRegistry::retire`]'s rule to a record; returns whether it changed.
pub(crate) fn retire_record(r: &mut RegisteredFeature, now_ms: i64) -> Result<bool, RegistryError> {
    if r.deprecated_at_ms.is_none() {
        return Err(RegistryError::NotDeprecated {
            name: r.spec.name.clone(),
            version: r.spec.version.clone(),
        });
    }
    if r.retired_at_ms.is_some() {
        return Ok(false);
    }
    r.retired_at_ms = Some(now_ms);
    Ok(true)
}

/// Applies [`FeatureRegistry::deprecate`]'s rule to a record; returns whether it changed.
pub(crate) fn deprecate_record(
    r: &mut RegisteredFeature,
    replaced_by: Option<&str>,
    now_ms: i64,
) -> Result<bool, RegistryError> {
    if let Some(by) = replaced_by
        && (by.is_empty() || by == r.spec.name)
    {
        return Err(RegistryError::InvalidArgument(format!(
            "replaced_by {by:?} must name another feature"
        )));
    }
    Ok(r.deprecate(
        Deprecation {
            replaced_by: replaced_by.map(str::to_owned),
            sunset: None,
            reason: None,
        },
        now_ms,
    ))
}

/// Checks a materialization before it is recorded, against the versions of its name.
pub(crate) fn check_materialization(
    feature: &FeatureRef,
    at_ms: i64,
    rows: u64,
    versions: &[RegisteredFeature],
) -> Result<(i64, i64), RegistryError> {
    if !(MIN_TIME_MS..=MAX_TIME_MS).contains(&at_ms) {
        return Err(RegistryError::InvalidArgument(format!(
            "materialization time {at_ms} ms of {feature} is outside 0001-01-01 .. 9999-12-31"
        )));
    }
    let rows = i64::try_from(rows).map_err(|_| {
        RegistryError::InvalidArgument(format!("row count {rows} of {feature} is too large"))
    })?;
    let major = i64::try_from(feature.major).map_err(|_| {
        RegistryError::InvalidArgument(format!("major version of {feature} is too large"))
    })?;
    let same_major: Vec<&RegisteredFeature> = versions
        .iter()
        .filter(|r| r.major == feature.major)
        .collect();
    if same_major.is_empty() {
        return Err(RegistryError::NotFound {
            name: feature.name.clone(),
            version: format!("v{}", feature.major),
        });
    }
    if same_major.iter().all(|r| r.retired_at_ms.is_some()) {
        return Err(RegistryError::Retired {
            feature: feature.to_string(),
        });
    }
    Ok((major, rows))
}

/// The error for a missing exact version.
pub(crate) fn not_found(name: &str, version: &str) -> RegistryError {
    RegistryError::NotFound {
        name: name.to_owned(),
        version: version.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(name: &str, version: &str) -> FeatureSpec {
        FeatureSpec {
            name: name.into(),
            entity: EntityKind::Product,
            online: true,
            offline: true,
            version: version.into(),
            value_type: ValueType::Float,
            dimension: None,
            description: "Decayed popularity".into(),
            owner: "ranking".into(),
            tags: vec!["popularity".into()],
            computation: Computation {
                job: "popularity".into(),
                logic: "sum of decayed weights".into(),
                window: Some("90d".into()),
                half_life: Some("7d".into()),
            },
            lineage: Some(Lineage {
                tables: vec!["events".into()],
                features: vec![],
            }),
            ttl: "1d".into(),
            drift: Some(DriftThresholds {
                psi: Some(0.2),
                ks: None,
                jensen_shannon: None,
            }),
            on_quality_failure: None,
            deprecation: None,
        }
    }

    #[test]
    fn durations_parse_like_the_crd() {
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("1d250ms"), Ok(86_400_250));
        assert!(parse_duration_ms("").is_err());
        assert!(parse_duration_ms("5").is_err());
        assert!(parse_duration_ms("5w").is_err());
        assert!(parse_duration_ms("h").is_err());
        assert!(parse_duration_ms("99999999999999999999d").is_err());
    }

    #[test]
    fn specs_are_validated() {
        assert!(spec("popularity_score", "1.0.0").validate().is_ok());
        let bad = |f: &dyn Fn(&mut FeatureSpec)| {
            let mut s = spec("popularity_score", "1.0.0");
            f(&mut s);
            s.validate().expect_err("must refuse").to_string()
        };
        assert!(bad(&|s| s.name = "Bad-Name".into()).contains("name"));
        assert!(bad(&|s| s.version = "1.0".into()).contains("semantic"));
        assert!(bad(&|s| s.version = "1.0.0+build".into()).contains("build metadata"));
        assert!(bad(&|s| s.value_type = ValueType::FloatVector).contains("dimension"));
        assert!(bad(&|s| s.dimension = Some(3)).contains("dimension"));
        assert!(
            bad(&|s| {
                s.online = false;
                s.offline = false;
            })
            .contains("online")
        );
        assert!(bad(&|s| s.ttl = "1 day".into()).contains("ttl"));
        assert!(
            bad(&|s| s.lineage = Some(Lineage {
                tables: vec![],
                features: vec!["popularity_score".into()],
            }))
            .contains("itself")
        );
        assert!(
            bad(&|s| s.drift = Some(DriftThresholds {
                ks: Some(2.0),
                ..Default::default()
            }))
            .contains("drift.ks")
        );
        assert!(bad(&|s| s.owner = String::new()).contains("owner"));
        let err = spec("x", "nope").validate().expect_err("invalid");
        assert_eq!(err.kind(), "FeatureSpecInvalid");
        assert!(!err.retryable());
    }

    #[test]
    fn the_crd_json_converts() {
        // The JSON of a FeatureDefinition spec, as the operator serializes it.
        let crd = serde_json::json!({
            "name": "user_category_affinity",
            "entity": "userProduct",
            "version": "2.1.0-rc.1",
            "valueType": "floatVector",
            "dimension": 8,
            "description": "Shares per category",
            "owner": "personalization",
            "computation": {"job": "category-affinity", "logic": "decayed shares", "halfLife": "14d"},
            "ttl": "2d",
            "deprecation": {"replacedBy": "user_affinity", "sunset": "2030-01-01T00:00:00Z"}
        });
        let s: FeatureSpec = serde_json::from_value(crd.clone()).expect("converts");
        assert_eq!(s.entity, EntityKind::UserProduct);
        assert!(s.online && s.offline, "defaults as in the CRD");
        assert_eq!(s.computation.half_life.as_deref(), Some("14d"));
        assert_eq!(
            s.feature_ref().expect("ref"),
            FeatureRef::new("user_category_affinity", 2)
        );
        assert_eq!(s.ttl_ms().expect("ttl"), 2 * 86_400_000);
        let back = serde_json::to_value(&s).expect("serializes");
        assert_eq!(back["entity"], "userProduct");
        assert_eq!(back["deprecation"]["replacedBy"], "user_affinity");
        assert!(
            ValueType::FloatVector.accepts(&FeatureValue::FloatVector(vec![0.0; 8]), s.dimension)
        );
        assert!(
            !ValueType::FloatVector.accepts(&FeatureValue::FloatVector(vec![0.0; 7]), s.dimension)
        );
        assert!(!ValueType::Float.accepts(&FeatureValue::Int(1), None));
    }

    #[test]
    fn selectors_parse() {
        assert_eq!(
            "latest".parse::<VersionSelector>().ok(),
            Some(VersionSelector::Latest)
        );
        assert_eq!(
            "v2".parse::<VersionSelector>().ok(),
            Some(VersionSelector::Major(2))
        );
        assert_eq!(
            "3".parse::<VersionSelector>().ok(),
            Some(VersionSelector::Major(3))
        );
        assert_eq!(
            "1.2.3".parse::<VersionSelector>().ok(),
            Some(VersionSelector::Exact("1.2.3".into()))
        );
        assert!("v1.x".parse::<VersionSelector>().is_err());
        assert_eq!(VersionSelector::Major(2).to_string(), "v2");
    }

    fn record(version: &str) -> RegisteredFeature {
        match plan_registration(&spec("f", version), &[], 1).expect("plan") {
            Plan::Insert(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn latest_prefers_usable_releases() {
        let mut a = record("1.0.0");
        let b = record("1.2.0");
        let c = record("2.0.0-rc.1");
        let mut d = record("3.0.0");
        let pick =
            |rs: &[RegisteredFeature], s: VersionSelector| select(rs, &s).map(|r| r.spec.version);
        let all = vec![a.clone(), b.clone(), c.clone(), d.clone()];
        assert_eq!(
            pick(&all, VersionSelector::Latest).as_deref(),
            Some("3.0.0")
        );
        assert_eq!(
            pick(&all, VersionSelector::Major(1)).as_deref(),
            Some("1.2.0")
        );
        assert_eq!(
            pick(&all, VersionSelector::Major(2)).as_deref(),
            Some("2.0.0-rc.1")
        );
        assert_eq!(pick(&all, VersionSelector::Major(9)), None);
        assert!(deprecate_record(&mut d, None, 5).expect("deprecate"));
        let all = vec![a.clone(), b.clone(), c.clone(), d.clone()];
        assert_eq!(
            pick(&all, VersionSelector::Latest).as_deref(),
            Some("1.2.0"),
            "an active release beats a deprecated one"
        );
        assert!(retire_record(&mut d, 6).expect("retire"));
        assert!(!retire_record(&mut d, 7).expect("idempotent"));
        assert_eq!(
            retire_record(&mut a, 6).map_err(|e| e.kind()),
            Err("FeatureNotDeprecated")
        );
        let all = vec![a, b, c, d];
        assert_eq!(
            pick(&all, VersionSelector::Exact("3.0.0".into())).as_deref(),
            Some("3.0.0"),
            "history stays readable"
        );
        assert_eq!(pick(&all, VersionSelector::Major(3)), None);
    }

    #[test]
    fn registrations_are_planned() {
        let first = record("1.0.0");
        let same = plan_registration(&spec("f", "1.0.0"), std::slice::from_ref(&first), 9)
            .expect("same spec");
        assert!(matches!(same, Plan::Unchanged(ref r) if r.registered_at_ms == 1));

        let mut changed = spec("f", "1.0.0");
        changed.ttl = "2d".into();
        changed.tags.push("x".into());
        let err =
            plan_registration(&changed, std::slice::from_ref(&first), 9).expect_err("immutable");
        assert_eq!(err.kind(), "FeatureVersionConflict");
        assert!(err.to_string().contains("tags, ttl"), "{err}");

        let mut breaking = spec("f", "1.1.0");
        breaking.value_type = ValueType::Int;
        let err =
            plan_registration(&breaking, std::slice::from_ref(&first), 9).expect_err("breaking");
        assert_eq!(err.kind(), "FeatureBreakingChange");
        assert!(err.to_string().contains("valueType"), "{err}");
        breaking.version = "2.0.0".into();
        assert!(matches!(
            plan_registration(&breaking, std::slice::from_ref(&first), 9),
            Ok(Plan::Insert(_))
        ));

        let mut deprecated = spec("f", "1.0.0");
        deprecated.deprecation = Some(Deprecation {
            replaced_by: Some("g".into()),
            sunset: None,
            reason: Some("superseded".into()),
        });
        let plan = plan_registration(&deprecated, std::slice::from_ref(&first), 9).expect("ok");
        let Plan::Deprecate(r) = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(r.deprecated_at_ms, Some(9));
        assert_eq!(r.replaced_by.as_deref(), Some("g"));
        assert_eq!(r.lifecycle(), Lifecycle::Deprecated);
        let again = plan_registration(&deprecated, std::slice::from_ref(&r), 10).expect("ok");
        assert!(matches!(again, Plan::Unchanged(ref x) if x.deprecated_at_ms == Some(9)));
    }

    #[test]
    fn queries_match() {
        let mut r = record("1.0.0");
        assert!(Query::default().matches(&r));
        let q = |f: &dyn Fn(&mut Query)| {
            let mut q = Query::default();
            f(&mut q);
            q
        };
        assert!(q(&|q| q.entity = Some(EntityKind::Product)).matches(&r));
        assert!(!q(&|q| q.entity = Some(EntityKind::User)).matches(&r));
        assert!(q(&|q| q.tag = Some("popularity".into())).matches(&r));
        assert!(!q(&|q| q.tag = Some("pop".into())).matches(&r));
        assert!(q(&|q| q.text = Some("POPULAR".into())).matches(&r));
        assert!(q(&|q| q.owner = Some("ranking".into())).matches(&r));
        assert!(!q(&|q| q.owner = Some("Ranking".into())).matches(&r));
        deprecate_record(&mut r, Some("g"), 2).expect("deprecate");
        assert!(!Query::default().matches(&r));
        assert!(q(&|q| q.include_deprecated = true).matches(&r));
        retire_record(&mut r, 3).expect("retire");
        assert!(!q(&|q| q.include_deprecated = true).matches(&r));
        assert!(q(&|q| q.include_retired = true).matches(&r));
    }
}
