//! The feature store: values of registered features for users, products and user × product
//! pairs, online (Redis, or in-process) for serving and offline (Postgres, or in-process) for
//! training sets and backfills.
//!
//! Every value carries the time it describes (`event_time`) and the time it was written
//! (`written_at`); a feature is addressed by name and *major* version, so a breaking change
//! (a new major version) lives side by side with the old one until that is retired.

pub mod compute;
pub mod defaults;
pub mod offline;
pub mod online;
pub mod rankings;
pub mod registry;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the local mode (no Postgres) keeps the offline store under its data directory
/// (`--data-dir`, default `.recsys`): the trainer writes it, the scorer reads it.
pub fn local_offline_path(data_dir: &Path) -> PathBuf {
    data_dir.join("features").join("offline.json")
}

/// Where the local mode keeps the feature registry under its data directory.
pub fn local_registry_path(data_dir: &Path) -> PathBuf {
    data_dir.join("features").join("registry.json")
}

/// What a feature describes.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum EntityKind {
    /// A user.
    User,
    /// A product.
    Product,
    /// A user and a product.
    UserProduct,
}

impl EntityKind {
    /// Wire name, used in keys and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Product => "product",
            Self::UserProduct => "user_product",
        }
    }
}

impl fmt::Display for EntityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entity: its kind and id. A user × product pair's id is `<user>|<product>`.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct EntityKey {
    /// Kind.
    pub kind: EntityKind,
    /// Id within the kind.
    pub id: String,
}

impl EntityKey {
    /// A user.
    pub fn user(id: impl Into<String>) -> Self {
        Self {
            kind: EntityKind::User,
            id: id.into(),
        }
    }

    /// A product.
    pub fn product(id: impl Into<String>) -> Self {
        Self {
            kind: EntityKind::Product,
            id: id.into(),
        }
    }

    /// A user × product pair.
    pub fn user_product(user: &str, product: &str) -> Self {
        Self {
            kind: EntityKind::UserProduct,
            id: format!("{user}|{product}"),
        }
    }
}

/// A feature addressed for storage: name and major version (`popularity_score` v1).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FeatureRef {
    /// Feature name (`[a-z][a-z0-9_]*`).
    pub name: String,
    /// Major version.
    pub major: u64,
}

impl FeatureRef {
    /// `name` at major version `major`.
    pub fn new(name: impl Into<String>, major: u64) -> Self {
        Self {
            name: name.into(),
            major,
        }
    }
}

impl fmt::Display for FeatureRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@v{}", self.name, self.major)
    }
}

/// A feature value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum FeatureValue {
    /// 64-bit float.
    Float(f64),
    /// 64-bit signed integer.
    Int(i64),
    /// UTF-8 string.
    String(String),
    /// Vector of 32-bit floats.
    FloatVector(Vec<f32>),
}

/// A value as stored: the value, the time it describes, and when it was written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredValue {
    /// The value.
    pub value: FeatureValue,
    /// The time the value describes (ms since the Unix epoch).
    pub event_time_ms: i64,
    /// When it was written (ms since the Unix epoch).
    pub written_at_ms: i64,
}

/// How a value read for serving came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Freshness {
    /// Written within the feature's TTL.
    Fresh,
    /// Present but older than the TTL: returned for information, never as fresh.
    Stale,
    /// Not in the online store; served from a fallback (offline store or computation).
    Fallback,
    /// Nowhere to be found.
    Missing,
}
