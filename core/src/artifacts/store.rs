//! The artifact store seam.

use std::fmt::Debug;

use async_trait::async_trait;

use super::ArtifactError;

/// Opaque revision of a stored object: the ETag on S3, the content's sha256 in a directory.
/// Only meaningful to the store that returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision(pub String);

/// An object's bytes together with its revision, for a later [`ArtifactStore::put_if`].
#[derive(Clone, Debug)]
pub struct Versioned {
    /// The content.
    pub bytes: Vec<u8>,
    /// The revision the content was read at.
    pub revision: Revision,
}

/// A flat map from `/`-separated keys to bytes: a directory or an S3 bucket.
///
/// Keys are checked by [`validate_key`]. A reader never sees a partially written object.
#[async_trait]
pub trait ArtifactStore: Debug + Send + Sync {
    /// Stores `bytes` under `key`, replacing any previous object.
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArtifactError>;

    /// The object under `key`, or `None` when there is none.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ArtifactError>;

    /// Every key starting with `prefix` (a plain string prefix, as in S3), sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, ArtifactError>;

    /// Removes the object under `key`; removing an absent object succeeds.
    async fn delete(&self, key: &str) -> Result<(), ArtifactError>;

    /// The object under `key` with its revision, or `None` when there is none.
    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, ArtifactError>;

    /// Stores `bytes` under `key` only if the object is absent (`expected` is `None`) or still
    /// at revision `expected`; fails with [`ArtifactError::Conflict`] otherwise.
    async fn put_if(
        &self,
        key: &str,
        bytes: Vec<u8>,
        expected: Option<&Revision>,
    ) -> Result<(), ArtifactError>;
}

/// Checks a store key: non-empty, at most 1024 bytes, `/`-separated segments that are
/// non-empty, do not start with `.` (so no `..` and no hidden files) and contain no `\` or
/// control characters.
pub fn validate_key(key: &str) -> Result<(), ArtifactError> {
    let bad = |reason| {
        Err(ArtifactError::InvalidKey {
            key: key.to_owned(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    for segment in key.split('/') {
        if segment.is_empty() {
            return bad("empty path segment (leading, trailing or double `/`)");
        }
        if segment.starts_with('.') {
            return bad("a path segment starts with `.`");
        }
        if segment.chars().any(|c| c == '\\' || c.is_control()) {
            return bad("contains `\\` or a control character");
        }
    }
    Ok(())
}

/// Checks a list prefix: empty, or a valid key, optionally ending with `/`.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), ArtifactError> {
    match prefix.strip_suffix('/').unwrap_or(prefix) {
        "" if prefix.is_empty() => Ok(()),
        trimmed => validate_key(trimmed).map_err(|_| ArtifactError::InvalidKey {
            key: prefix.to_owned(),
            reason: "not a valid list prefix",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        for ok in ["a", "models/m/v1/manifest.json", "a/b-c_d.e"] {
            assert!(validate_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/a", "a/", "a//b", "a/../b", "..", ".hidden", "a/.b", "a\\b", "a\nb",
        ] {
            let err = validate_key(bad).expect_err(bad);
            assert_eq!(err.kind(), "InvalidKey");
        }
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("models/").is_ok());
        assert!(validate_prefix("models/m").is_ok());
        assert!(validate_prefix("/").is_err());
        assert!(validate_prefix("a/../").is_err());
    }
}
