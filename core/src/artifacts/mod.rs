//! Model artifacts and the registry: where trained models are kept, how they are published
//! atomically, and how they are loaded back only after every check passes.
//!
//! # Stores
//!
//! An [`ArtifactStore`] is a flat key → bytes map with `/`-separated keys, implemented by
//! [`LocalDirStore`] (a directory; the embedded default) and [`S3Store`] (an S3-compatible
//! bucket). Besides plain `put`/`get`/`list`/`delete` it has one conditional write,
//! [`ArtifactStore::put_if`], which creates an object only if it is absent or replaces it only if
//! it is still at the [`Revision`] read before. The registry uses it so that two writers (the
//! trainer publishing, the operator promoting) never lose each other's update and so that a
//! version is never overwritten.
//!
//! # Layout
//!
//! ```text
//! models/<model>/registry.json                 versions (publish order) and aliases
//! models/<model>/<version>/user_factors.f32    users × factors, factor file (below)
//! models/<model>/<version>/item_factors.f32    items × factors, factor file
//! models/<model>/<version>/user_ids.json       JSON array of user ids, in row order
//! models/<model>/<version>/item_ids.json       JSON array of item ids, in row order
//! models/<model>/<version>/manifest.json       Manifest: sha256, size and shape of every file
//! ```
//!
//! Model names match `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$` (at most 63 characters, so they fit a
//! Kubernetes label). Version ids are generated as `YYYYMMDD-HHMMSS-<6 hex>` (UTC, so they sort
//! by time) or chosen by the caller from `[A-Za-z0-9._-]`, not starting with `.`, at most 128
//! characters. Aliases (`champion`, `previous`, …) follow the model-name rule.
//!
//! # Factor files
//!
//! A fixed little-endian layout that a reader may memory-map (the data starts 32 bytes in, so
//! every `f32` is aligned):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `RSF1` |
//! | 4 | 4 | format version, `u32` LE, `1` |
//! | 8 | 8 | rows, `u64` LE |
//! | 16 | 8 | columns, `u64` LE |
//! | 24 | 4 | dtype code, `u32` LE: `1` = IEEE-754 `f32` LE |
//! | 28 | 4 | reserved, zero |
//! | 32 | rows × cols × 4 | the values, row-major |
//!
//! The file is exactly `32 + rows × cols × 4` bytes long; anything shorter or longer is refused.
//!
//! # Publishing and loading
//!
//! [`Registry::publish`] writes every data file (create-only), then `manifest.json`
//! (create-only), then adds the version to `registry.json` (a compare-and-swap loop). A version
//! is visible only once it is listed in `registry.json`, so a crash at any point leaves either
//! nothing visible or the complete version. The registry entry pins the manifest's sha256 and
//! the manifest pins every file's sha256, size and shape; [`Registry::load`] checks all of them,
//! the header of each factor file, the agreement of shapes with the id lists, and that every
//! value is finite, and refuses the model with an error naming the file otherwise.

mod format;
mod local;
mod manifest;
mod registry;
mod rollouts;
mod s3;
mod store;

pub use format::{FACTOR_HEADER_LEN, FACTOR_MAGIC, decode_factors, encode_factors, sha256_hex};
pub use local::LocalDirStore;
pub use manifest::{
    DataInfo, Dtype, FORMAT_VERSION, FileEntry, Manifest, ManifestInput, RegistryIndex,
    VersionEntry,
};
pub use registry::{
    CHAMPION, LoadedModel, PREVIOUS, Registry, generate_version, validate_alias,
    validate_model_name, validate_version,
};
pub use rollouts::RolloutEvent;
pub use s3::S3Store;
pub use store::{ArtifactStore, Revision, Versioned, validate_key};

/// Why an artifact could not be stored, found or trusted.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A store key is malformed.
    #[error("invalid artifact key {key:?}: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A model name, version id or alias is malformed.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// `model name`, `version` or `alias`.
        what: &'static str,
        /// The value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file of a [`LocalDirStore`] could not be read or written.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`reading`, `writing`, …).
        op: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A request to the S3 server failed.
    #[error("s3 {op} of {location}: {message}")]
    S3 {
        /// The operation (`GetObject`, …).
        op: &'static str,
        /// `s3://bucket/key`.
        location: String,
        /// The SDK's error with its whole context.
        message: String,
        /// Whether the failure looks transient (timeouts, 5xx, throttling).
        retryable: bool,
    },
    /// A conditional write found the object absent, present or changed, unlike expected.
    #[error("conditional write of {key} refused: {reason}")]
    Conflict {
        /// The key.
        key: String,
        /// What was found.
        reason: &'static str,
    },
    /// The version already exists (files, manifest or registry entry).
    #[error("model {model} version {version} already exists; versions are never overwritten")]
    VersionExists {
        /// Model name.
        model: String,
        /// Version id.
        version: String,
    },
    /// The model has no `registry.json`: nothing was ever published under that name.
    #[error("model {model} not found (no models/{model}/registry.json)")]
    ModelNotFound {
        /// Model name.
        model: String,
    },
    /// Neither a version nor an alias of the model has this name.
    #[error("model {model} has no version or alias {version}")]
    VersionNotFound {
        /// Model name.
        model: String,
        /// The version id or alias asked for.
        version: String,
    },
    /// Rollback was asked for but no `previous` alias exists.
    #[error("model {model} has no previous champion to roll back to")]
    NoPrevious {
        /// Model name.
        model: String,
    },
    /// A file the manifest or registry refers to is missing.
    #[error("{key} is missing")]
    MissingFile {
        /// The key of the file.
        key: String,
    },
    /// A file's size differs from the manifest (usually a truncated upload).
    #[error("{key} has {actual} bytes, the manifest says {expected} (truncated or replaced)")]
    SizeMismatch {
        /// The key of the file.
        key: String,
        /// Size recorded in the manifest.
        expected: u64,
        /// Size found.
        actual: u64,
    },
    /// A file's sha256 differs from the manifest (or the manifest's from the registry).
    #[error("{key} is corrupted: sha256 {actual}, expected {expected}")]
    ChecksumMismatch {
        /// The key of the file.
        key: String,
        /// Checksum recorded.
        expected: String,
        /// Checksum computed.
        actual: String,
    },
    /// A file does not follow its format (bad magic, dtype, length, duplicate ids, …).
    #[error("{key}: {reason}")]
    BadFormat {
        /// The key of the file.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Shapes disagree with the manifest or with each other.
    #[error("{key}: wrong shape: {reason}")]
    ShapeMismatch {
        /// The key of the file.
        key: String,
        /// Which shapes disagree.
        reason: String,
    },
    /// A factor is NaN or infinite.
    #[error("{key}: value {value} at row {row}, column {col} is not finite")]
    NonFinite {
        /// The key of the file.
        key: String,
        /// Row of the value.
        row: u64,
        /// Column of the value.
        col: u64,
        /// The value.
        value: f32,
    },
    /// A JSON document could not be parsed or written.
    #[error("{key}: {source}")]
    Json {
        /// The key of the document.
        key: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The model handed to `publish` is inconsistent; nothing was written.
    #[error("refusing to publish model {model}: {reason}")]
    InvalidModel {
        /// Model name.
        model: String,
        /// What is wrong.
        reason: String,
    },
}

impl ArtifactError {
    /// Stable label for metrics and events.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidKey { .. } => "InvalidKey",
            Self::InvalidName { .. } => "InvalidName",
            Self::Io { .. } => "StorageIo",
            Self::S3 { .. } => "S3Request",
            Self::Conflict { .. } => "Conflict",
            Self::VersionExists { .. } => "VersionExists",
            Self::ModelNotFound { .. } => "ModelNotFound",
            Self::VersionNotFound { .. } => "VersionNotFound",
            Self::NoPrevious { .. } => "NoPreviousVersion",
            Self::MissingFile { .. } => "MissingFile",
            Self::SizeMismatch { .. } => "SizeMismatch",
            Self::ChecksumMismatch { .. } => "ChecksumMismatch",
            Self::BadFormat { .. } => "BadFormat",
            Self::ShapeMismatch { .. } => "ShapeMismatch",
            Self::NonFinite { .. } => "NonFinite",
            Self::Json { .. } => "BadJson",
            Self::InvalidModel { .. } => "InvalidModel",
        }
    }

    /// Whether trying the same operation again may succeed: transient I/O and network
    /// failures and lost compare-and-swap races. Corrupted or invalid artifacts never heal.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::ResourceBusy
            ),
            Self::S3 { retryable, .. } => *retryable,
            Self::Conflict { .. } => true,
            _ => false,
        }
    }
}
