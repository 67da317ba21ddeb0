//! `FeatureDefinition`: the registry entry of one version of a feature.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::batch_job::JobKind;
use crate::common::Duration;

/// Semantic version pattern (semver.org 2.0.0, without build metadata).
pub const SEMVER_PATTERN: &str =
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$";

/// One feature: what it describes, how it is computed, where it is served, how fresh it must
/// be. The operator validates it against the other definitions (lineage, versioning) and records
/// each version in the feature registry, from which the scorer and trainer discover features.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "recsys.io",
    version = "v1alpha1",
    kind = "FeatureDefinition",
    plural = "featuredefinitions",
    singular = "featuredefinition",
    shortname = "fdef",
    category = "recsys",
    namespaced,
    status = "FeatureDefinitionStatus",
    doc = "A feature's registry entry: entity, value type, semantic version, computation, lineage, TTL.",
    printcolumn(name = "Feature", type_ = "string", json_path = ".spec.name"),
    printcolumn(name = "Entity", type_ = "string", json_path = ".spec.entity"),
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.valueType"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Freshness", type_ = "string", json_path = ".status.freshness"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("self.online || self.offline").message("a feature is served online, offline, or both: set online or offline"),
    validation = kube::core::Rule::new("self.valueType == 'floatVector' ? has(self.dimension) : !has(self.dimension)").message("dimension is required for valueType floatVector and not allowed otherwise"),
    validation = kube::core::Rule::new("!has(self.deprecation) || self.deprecation.replacedBy != self.name").message("deprecation.replacedBy must name another feature"),
    validation = kube::core::Rule::new("!has(self.lineage) || !has(self.lineage.features) || !self.lineage.features.exists(f, f == self.name)").message("lineage.features must not contain the feature itself"),
    validation = kube::core::Rule::new("self.version != oldSelf.version || (self.valueType == oldSelf.valueType && self.computation == oldSelf.computation && self.entity == oldSelf.entity)").message("changing entity, valueType or computation needs a new version: bump spec.version"),
    validation = kube::core::Rule::new("self.name == oldSelf.name").message("spec.name is immutable; create a new FeatureDefinition instead")
)]
pub struct FeatureDefinitionSpec {
    /// Feature name used by stores and consumers, for example `popularity_score`: lower-case
    /// letters, digits and `_`, starting with a letter.
    #[schemars(regex(pattern = r"^[a-z][a-z0-9_]*$"), length(min = 1, max = 63))]
    pub name: String,

    /// What the feature describes: a `user`, a `product`, or a `userProduct` pair.
    pub entity: Entity,

    /// Served from the online store (Redis) to the scorer.
    #[serde(default = "default_true")]
    pub online: bool,

    /// Kept in the offline store (Postgres) for training sets and backfills.
    #[serde(default = "default_true")]
    pub offline: bool,

    /// Semantic version `MAJOR.MINOR.PATCH`. A new major version is stored side by side with
    /// the old one; changing entity, value type or computation requires a new version.
    #[schemars(
        regex(
            pattern = r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$"
        ),
        length(max = 64)
    )]
    pub version: String,

    /// Type of the value.
    pub value_type: ValueType,

    /// Length of the vector, for `floatVector` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub dimension: Option<i32>,

    /// What the feature means, in a sentence or two.
    #[schemars(length(min = 1, max = 2048))]
    pub description: String,

    /// Team or person answerable for the feature.
    #[schemars(length(min = 1, max = 128))]
    pub owner: String,

    /// Free-form tags for discovery.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 63)))]
    pub tags: Vec<String>,

    /// How the values are produced.
    pub computation: Computation,

    /// What the feature is computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,

    /// How long an online value stays fresh; older values are reported stale, never as fresh.
    pub ttl: Duration,

    /// Thresholds of the drift checks run by the `data-quality` job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftThresholds>,

    /// What a feature job does with this feature when its input events fail a blocking
    /// data-quality check, or its new values drift past `drift`: `block` (the default: the
    /// values already served stay, the run fails with the gate's exit code 3) or `warn`
    /// (publish the new values and report the failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_quality_failure: Option<QualityPolicy>,

    /// Set when the feature is being retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecation: Option<Deprecation>,
}

/// What a feature job does with a feature whose input or values fail their checks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum QualityPolicy {
    /// Keep the values already served; the run fails.
    Block,
    /// Publish the new values and report the failure as a warning.
    Warn,
}

fn default_true() -> bool {
    true
}

/// What a feature describes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Entity {
    /// A user (key: user id).
    User,
    /// A product (key: product id).
    Product,
    /// A user and a product (key: user id and product id).
    UserProduct,
}

/// Type of a feature value.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
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

/// How a feature is computed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Computation {
    /// The trainer job that produces the values.
    pub job: JobKind,
    /// The logic, in words or pseudo-code, for readers of the registry.
    #[schemars(length(min = 1, max = 4096))]
    pub logic: String,
    /// Window of events the value is computed over, for example `90d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
    /// Half-life of the time decay applied to events, for example `7d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_life: Option<Duration>,
}

/// Inputs of a feature.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Lineage {
    /// Source tables, for example `events` or `products`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 128)))]
    pub tables: Vec<String>,
    /// Names of features this one is computed from; each must have a FeatureDefinition in the
    /// same namespace, and the graph must have no cycle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = r"^[a-z][a-z0-9_]*$")))]
    pub features: Vec<String>,
}

/// Drift thresholds; a check fails when its statistic exceeds the threshold.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DriftThresholds {
    /// Population stability index over reference deciles (numeric features).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub psi: Option<f64>,
    /// Kolmogorov–Smirnov statistic (numeric features).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ks: Option<f64>,
    /// Jensen–Shannon distance (categorical features).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub jensen_shannon: Option<f64>,
}

/// Retirement of a feature.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Deprecation {
    /// The feature that replaces this one; it must exist in the same namespace.
    #[schemars(regex(pattern = r"^[a-z][a-z0-9_]*$"), length(min = 1, max = 63))]
    pub replaced_by: String,
    /// When the feature stops being served, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sunset: Option<Time>,
    /// Why it is retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
}

/// Whether a feature's values are recent enough: `Fresh` while `lastMaterialization` is within
/// `spec.ttl`, `Stale` after, `NeverMaterialized` before the first run, `Unknown` without a
/// reachable feature registry.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Freshness {
    /// The last materialization is no older than `spec.ttl`.
    Fresh,
    /// The last materialization is older than `spec.ttl`: readers get stale values.
    Stale,
    /// The registry records no materialization of this major version yet.
    NeverMaterialized,
    /// Not known: the operator has no feature registry configured, or cannot reach it.
    Unknown,
}

/// Observed state of a FeatureDefinition.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FeatureDefinitionStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Accepted (the spec is valid on its own), Registered (the version is recorded in the
    /// feature registry, or why not) and Ready (lineage resolved against the other definitions
    /// and, with a registry configured, the version recorded).
    #[serde(default)]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The version last recorded in the feature registry. Registry history outlives the
    /// FeatureDefinition: deleting it does not remove the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_version: Option<String>,
    /// When the registry first recorded that version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<Time>,
    /// The time described by the latest values the computing job wrote for this major
    /// version, as recorded in the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_materialization: Option<Time>,
    /// Whether the values are recent enough: `Fresh` while `lastMaterialization` is within
    /// `spec.ttl`, `Stale` after, `NeverMaterialized` before the first run, `Unknown` without a
    /// reachable feature registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness: Option<Freshness>,
}
