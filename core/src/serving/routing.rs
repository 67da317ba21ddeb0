//! The routing table: which versions of each model serve, and which users get which.
//!
//! A [`RoutingTable`] names, per model, a **stable** version, an optional **canary** version
//! with a weight (integer percent, 0–100) and an optional **shadow** version, plus the **salt**
//! of the hash that assigns users. The operator is to write it (one entry per `ModelDeployment`);
//! in local mode it is a file (see [`FileRoutingSource`]); tests and the embedded default use a
//! [`StaticRoutingSource`]. Every source implements [`RoutingSource`]: a lock-free
//! [`RoutingSource::current`] for the request path and a [`tokio::sync::watch`] channel for
//! whoever loads models when the table changes.
//!
//! # File format (`formatVersion: 1`)
//!
//! YAML or JSON (by extension: `.json` is JSON, `.yaml`/`.yml` YAML, anything else is sniffed:
//! `{` first means JSON), field names in camelCase as in the `ModelDeployment` CRD. Unknown
//! fields are refused so that a typo (`wieght`) never silently routes.
//!
//! ```yaml
//! formatVersion: 1                 # required; this reader knows 1
//! revision: shop/als@7             # optional, for logs and the info metric (default: content hash)
//! models:
//!   als:                           # model name, as in the artifact registry
//!     stable: 20250101-120000-a1b2c3
//!     canary:                      # optional
//!       version: 20250108-093000-d4e5f6
//!       weight: 10                 # percent of users, 0-100
//!     shadow: 20250110-170000-0a0b0c   # optional: scored off the request path, never returned
//!     salt: als-2025               # optional, 1-64 characters; default: the model name
//! ```
//!
//! Versions follow the artifact registry's rule ([`validate_version`]) and may be aliases
//! (`champion`), resolved when the scorer loads them. A canary or shadow must differ from the
//! stable version. Errors name the field: `models.als.canary.weight: 120 is above 100`.
//!
//! # Assignment
//!
//! [`bucket`]`(salt, user_id)` maps a user to one of [`BUCKETS`] (10 000, basis points) buckets
//! with SHA-256; a user is on the canary iff `bucket < weight × 100`. So:
//! - the same salt and user always give the same variant, in any process on any platform;
//! - as the weight grows, users only move stable → canary (never back), and at weight `w`
//!   exactly the users with bucket below `100·w` are on the canary;
//! - a different salt reshuffles users independently;
//! - users without an id (anonymous) get stable.
//!
//! [`validate_version`]: crate::artifacts::validate_version

mod document;
mod metrics;
mod source;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

pub use document::{CanaryDocument, FORMAT_VERSION, RouteDocument, RoutingDocument, RoutingFormat};
pub use metrics::RoutingMetrics;
pub use source::{
    DEFAULT_POLL_INTERVAL, FileRoutingOptions, FileRoutingSource, MAX_FILE_BYTES, RoutingPublisher,
    RoutingSource, StaticRoutingSource,
};

/// Number of hash buckets: weights are compared in basis points (`weight × 100`), so shares
/// finer than a percent can be supported later without moving anyone.
pub const BUCKETS: u16 = 10_000;

/// The bucket (`0..BUCKETS`) of `user_id` under `salt`.
///
/// `SHA-256(len(salt) as u64 big-endian ‖ salt ‖ user_id)`, the first 8 bytes of the digest
/// read as a big-endian `u64`, modulo [`BUCKETS`]. The length prefix keeps `("ab", "c")` and
/// `("a", "bc")` apart; the modulo bias is below 10⁻¹⁵.
///
/// **This function must never change.** Every user's variant depends on it: a different hash
/// would move users between stable and canary in the middle of a rollout, and break the
/// comparison of variants. Tests pin known values. If it ever has to change, it needs a new
/// `formatVersion` and is in effect a new salt for everyone.
pub fn bucket(salt: &str, user_id: &str) -> u16 {
    let mut hasher = Sha256::new();
    hasher.update((salt.len() as u64).to_be_bytes());
    hasher.update(salt.as_bytes());
    hasher.update(user_id.as_bytes());
    let digest = hasher.finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    // The remainder is below 10 000, so it always fits a u16.
    (u64::from_be_bytes(head) % u64::from(BUCKETS)) as u16
}

/// Which side of a model's split a request is served from.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// The stable version.
    Stable,
    /// The canary version.
    Canary,
}

impl Variant {
    /// `stable` or `canary`: the wire name, for responses, exposure logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stable => "stable",
            Self::Canary => "canary",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The variant and version a user is served by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment<'a> {
    /// Stable or canary.
    pub variant: Variant,
    /// The version (or alias) of that variant.
    pub version: &'a str,
    /// The user's bucket (`0..BUCKETS`), for exposure logs; `None` for anonymous users.
    pub bucket: Option<u16>,
}

/// The canary of a model: a version and the share of users it gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Canary {
    version: String,
    weight: u8,
}

impl Canary {
    /// The canary version (or alias).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Percentage of users (0–100) on the canary.
    pub fn weight(&self) -> u8 {
        self.weight
    }

    /// Buckets below this are on the canary (`weight × 100`).
    pub fn threshold(&self) -> u16 {
        u16::from(self.weight) * 100
    }
}

/// How one model is served: a validated entry of a [`RoutingTable`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRoute {
    model: String,
    stable: String,
    canary: Option<Canary>,
    shadow: Option<String>,
    salt: String,
}

impl ModelRoute {
    /// The model name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The stable version (or alias): every user not on the canary.
    pub fn stable(&self) -> &str {
        &self.stable
    }

    /// The canary, if any.
    pub fn canary(&self) -> Option<&Canary> {
        self.canary.as_ref()
    }

    /// Percentage of users on the canary; 0 without one.
    pub fn canary_weight(&self) -> u8 {
        self.canary.as_ref().map_or(0, Canary::weight)
    }

    /// The shadow version, scored off the request path and never returned, if any.
    pub fn shadow(&self) -> Option<&str> {
        self.shadow.as_deref()
    }

    /// The salt of the assignment hash (the model name unless the table sets one).
    pub fn salt(&self) -> &str {
        &self.salt
    }

    /// Every version this model needs loaded: stable, then canary and shadow if set, each once.
    pub fn versions(&self) -> Vec<&str> {
        let mut out = vec![self.stable.as_str()];
        for v in [self.canary.as_ref().map(Canary::version), self.shadow()]
            .into_iter()
            .flatten()
        {
            if !out.contains(&v) {
                out.push(v);
            }
        }
        out
    }

    /// The variant of a bucket: canary iff `bucket < weight × 100`.
    pub fn variant_of(&self, bucket: u16) -> Variant {
        match &self.canary {
            Some(c) if bucket < c.threshold() => Variant::Canary,
            _ => Variant::Stable,
        }
    }

    /// The variant and version serving `user_id`. `None` or an empty id (an anonymous user)
    /// gets stable.
    pub fn assign(&self, user_id: Option<&str>) -> Assignment<'_> {
        let Some(user) = user_id.filter(|u| !u.is_empty()) else {
            return Assignment {
                variant: Variant::Stable,
                version: &self.stable,
                bucket: None,
            };
        };
        let b = bucket(&self.salt, user);
        let variant = self.variant_of(b);
        let version = match (&self.canary, variant) {
            (Some(c), Variant::Canary) => c.version.as_str(),
            _ => self.stable.as_str(),
        };
        Assignment {
            variant,
            version,
            bucket: Some(b),
        }
    }
}

impl fmt::Display for ModelRoute {
    /// `als: stable v1, canary v2 at 10%, shadow v3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: stable {}", self.model, self.stable)?;
        if let Some(c) = &self.canary {
            write!(f, ", canary {} at {}%", c.version, c.weight)?;
        }
        if let Some(s) = &self.shadow {
            write!(f, ", shadow {s}")?;
        }
        Ok(())
    }
}

/// A validated routing table: every model's route, and a revision for logs and metrics.
///
/// Built only by validation ([`RoutingTable::parse`], [`RoutingTable::from_document`]), so a
/// table in hand is always servable. [`RoutingTable::to_document`] gives the file form back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingTable {
    revision: String,
    models: BTreeMap<String, ModelRoute>,
}

impl RoutingTable {
    /// Parses and validates a table read from `origin` (a path or another name for messages).
    pub fn parse(text: &str, format: RoutingFormat, origin: &str) -> Result<Self, RoutingError> {
        let parse_error = |message: String| RoutingError::Parse {
            origin: origin.to_owned(),
            format,
            message,
        };
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Err(parse_error("the document is empty".to_owned()));
        }
        let document: RoutingDocument = match format {
            RoutingFormat::Yaml => serde_yaml::from_str(text).map_err(|e| e.to_string()),
            RoutingFormat::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
        }
        .map_err(parse_error)?;
        Self::from_document(document).map_err(|source| RoutingError::Invalid {
            origin: origin.to_owned(),
            source,
        })
    }

    /// Validates a document: every problem is reported, each naming its field.
    pub fn from_document(document: RoutingDocument) -> Result<Self, ValidationError> {
        document::validate(document)
    }

    /// A table serving `model` at its `champion` alias to everyone: the embedded default when
    /// no table is configured.
    pub fn champion(model: &str) -> Result<Self, ValidationError> {
        Self::from_document(RoutingDocument {
            format_version: FORMAT_VERSION,
            revision: Some("embedded-champion".to_owned()),
            models: BTreeMap::from([(
                model.to_owned(),
                RouteDocument {
                    stable: crate::artifacts::CHAMPION.to_owned(),
                    canary: None,
                    shadow: None,
                    salt: None,
                },
            )]),
        })
    }

    /// A table routing no model, with `revision`: what a source serves before its first
    /// table arrives (every request for a model is then refused, and the scorer is not ready).
    pub fn empty(revision: &str) -> Result<Self, ValidationError> {
        Self::from_document(RoutingDocument {
            format_version: FORMAT_VERSION,
            revision: Some(revision.to_owned()),
            models: BTreeMap::new(),
        })
    }

    /// The file form of this table, with the salts and the revision written out (so the same
    /// table parses back identical).
    pub fn to_document(&self) -> RoutingDocument {
        RoutingDocument {
            format_version: FORMAT_VERSION,
            revision: Some(self.revision.clone()),
            models: self
                .models
                .iter()
                .map(|(name, r)| (name.clone(), document::route_document(r)))
                .collect(),
        }
    }

    /// The revision: the table's own `revision`, or `sha256:<12 hex>` of its content.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// The route of `model`, if the table has one.
    pub fn route(&self, model: &str) -> Option<&ModelRoute> {
        self.models.get(model)
    }

    /// Every route, by model name.
    pub fn routes(&self) -> impl ExactSizeIterator<Item = &ModelRoute> {
        self.models.values()
    }

    /// Number of models.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether the table routes no model.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The assignment of `user_id` for `model`; `None` if the table does not route `model`.
    pub fn assign(&self, model: &str, user_id: Option<&str>) -> Option<Assignment<'_>> {
        self.route(model).map(|r| r.assign(user_id))
    }
}

impl fmt::Display for RoutingTable {
    /// `revision r1: als: stable v1, canary v2 at 10%; bpr: stable v7`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "revision {}: ", self.revision)?;
        if self.models.is_empty() {
            return f.write_str("no models");
        }
        for (i, r) in self.models.values().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// One thing wrong in a routing table, at a field path such as `models.als.canary.weight`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field (`formatVersion`, `models.als.stable`, …).
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a routing document (at least one).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// The problems, in field order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Why a routing table could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// The file could not be read (missing, unreadable, a directory, …).
    #[error("cannot read routing table {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_BYTES`] (probably not a routing table).
    #[error("routing table {origin} is larger than the {limit}-byte limit")]
    TooLarge {
        /// Where the table came from.
        origin: String,
        /// The limit.
        limit: u64,
    },
    /// Not UTF-8, not YAML/JSON, an unknown or missing field, or a value of the wrong type.
    #[error("routing table {origin} is not a valid {format} routing document: {message}")]
    Parse {
        /// Where the table came from.
        origin: String,
        /// The format it was read as.
        format: RoutingFormat,
        /// The parser's message, with the field path (YAML) or line and column.
        message: String,
    },
    /// The table is not there: its ConfigMap, or the key in it, does not exist.
    #[error("routing table {origin} is missing: {message}")]
    Missing {
        /// Where the table was looked for.
        origin: String,
        /// What is missing.
        message: String,
    },
    /// Well-formed, but a value breaks a rule.
    #[error("routing table {origin} is invalid: {source}")]
    Invalid {
        /// Where the table came from.
        origin: String,
        /// Every problem found.
        source: ValidationError,
    },
}

impl RoutingError {
    /// Stable name of the error, for metric labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Read { .. } => "Unreadable",
            Self::TooLarge { .. } => "TooLarge",
            Self::Parse { .. } => "Unparsable",
            Self::Missing { .. } => "Missing",
            Self::Invalid { .. } => "Invalid",
        }
    }
}

#[cfg(test)]
mod tests;
