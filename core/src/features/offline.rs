//! The offline store: every value a feature version ever had, keyed by feature version, entity,
//! event time and write time, for point-in-time-correct training sets, snapshots and
//! backfills.
//!
//! - **Point in time.** For an entity and a time `at`, the value is the row with the latest
//!   event time `≤ at` (never a later one); among rows with the same event time the latest
//!   write wins. [`PitOptions::as_of_written_ms`] ignores rows written after a cutoff, so a
//!   late backfill cannot leak into a training set built before it (Feast's
//!   `filter_by_created_timestamp`), and [`PitOptions::max_age_ms`] ignores rows older than a
//!   lookback (Feast's TTL window).
//! - **Backfill.** [`OfflineStore::replace_range`] replaces the rows of an event-time range in
//!   one transaction: running it again with the same input gives the same values.
//! - **Versions.** A feature is addressed by name and major version; a new major version
//!   starts empty or from [`OfflineStore::copy_version`].
//!
//! Two implementations pass one conformance suite (`core/tests/offline_conformance.rs`):
//! [`PostgresOfflineStore`] (production, the `feature_values` table of migration
//! `0002_feature_values.sql`) and [`InProcessOfflineStore`] (the embedded default of the local
//! mode, optionally persisted to a JSON file).
//!
//! Times are milliseconds since the Unix epoch, between [`MIN_TIME_MS`] and [`MAX_TIME_MS`].
//! Non-finite floats are refused: a NaN feature value is a bug in its computation.

mod memory;
mod postgres;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{EntityKind, FeatureRef, FeatureValue, StoredValue};

pub use memory::InProcessOfflineStore;
pub use postgres::PostgresOfflineStore;

/// Earliest event or write time accepted: 0001-01-01T00:00:00Z.
pub const MIN_TIME_MS: i64 = -62_135_596_800_000;
/// Latest event or write time accepted: 9999-12-31T23:59:59.999Z.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// Why the offline store refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The feature reference cannot be stored (bad name, major version too large).
    #[error("invalid feature {feature}: {reason}")]
    InvalidFeature {
        /// The reference as given.
        feature: String,
        /// What is wrong.
        reason: String,
    },
    /// A row cannot be stored (empty entity id, time out of range, non-finite float, event
    /// time outside the range being replaced).
    #[error("{feature}, entity {entity_id:?}: {reason}")]
    InvalidRow {
        /// The feature.
        feature: String,
        /// The entity of the row.
        entity_id: String,
        /// What is wrong.
        reason: String,
    },
    /// An argument other than a row is out of bounds (a time, a range, an option).
    #[error("{feature}: {reason}")]
    InvalidArgument {
        /// The feature.
        feature: String,
        /// What is wrong.
        reason: String,
    },
    /// Postgres failed.
    #[error("offline store (postgres): {0}")]
    Postgres(#[from] sqlx::Error),
    /// A migration failed.
    #[error("offline store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The file of the in-process store could not be read or written.
    #[error("offline store file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Stored data does not decode (a damaged file, a row written by something else).
    #[error("offline store data in {location} is corrupt: {message}")]
    Corrupt {
        /// The file or table.
        location: String,
        /// What does not decode.
        message: String,
    },
}

impl OfflineError {
    /// Stable label for metrics and events.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidFeature { .. } => "OfflineInvalidFeature",
            Self::InvalidRow { .. } => "OfflineInvalidRow",
            Self::InvalidArgument { .. } => "OfflineInvalidArgument",
            Self::Postgres(_) => "OfflinePostgres",
            Self::Migrate(_) => "OfflineMigrate",
            Self::Io { .. } => "OfflineIo",
            Self::Corrupt { .. } => "OfflineCorrupt",
        }
    }

    /// Whether retrying can help: an unreachable server or a full disk can pass, invalid input
    /// and corrupt data do not.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Postgres(e) => sqlx_retryable(e),
            Self::Io { .. } => true,
            _ => false,
        }
    }
}

/// Whether a driver error is transient: connection trouble, pool exhaustion, serialization
/// failures and deadlocks, a server shutting down or out of resources.
pub(crate) fn sqlx_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception, 40: transaction rollback (serialization, deadlock),
            // 53: insufficient resources, 57P: operator intervention (shutdown).
            code.starts_with("08")
                || code.starts_with("40")
                || code.starts_with("53")
                || code.starts_with("57P")
        }),
        _ => false,
    }
}

/// A row to write: a value of one entity at one event time.
#[derive(Clone, Debug, PartialEq)]
pub struct OfflineRow {
    /// The entity (`<user>|<product>` for a pair).
    pub entity_id: String,
    /// The value.
    pub value: FeatureValue,
    /// The time the value describes (ms since the epoch).
    pub event_time_ms: i64,
    /// When it was written; the time of the call when `None` (the usual case: a value written
    /// late must look late to [`PitOptions::as_of_written_ms`]).
    pub written_at_ms: Option<i64>,
}

impl OfflineRow {
    /// A row stamped with the time of the write.
    pub fn new(entity_id: impl Into<String>, value: FeatureValue, event_time_ms: i64) -> Self {
        Self {
            entity_id: entity_id.into(),
            value,
            event_time_ms,
            written_at_ms: None,
        }
    }

    /// The same row with an explicit write time (imports, tests).
    pub fn written_at(mut self, written_at_ms: i64) -> Self {
        self.written_at_ms = Some(written_at_ms);
        self
    }
}

impl From<(String, StoredValue)> for OfflineRow {
    /// Keeps the stored write time.
    fn from((entity_id, stored): (String, StoredValue)) -> Self {
        Self {
            entity_id,
            value: stored.value,
            event_time_ms: stored.event_time_ms,
            written_at_ms: Some(stored.written_at_ms),
        }
    }
}

/// Options of point-in-time reads and snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PitOptions {
    /// Ignore rows written after this time (ms): the store as it was then. Set it to the time a
    /// training set was first built to rebuild the same set after later backfills.
    pub as_of_written_ms: Option<i64>,
    /// Ignore rows whose event time is more than this many ms before the requested time (the
    /// feature's TTL as a lookback window). `None` looks back without limit.
    pub max_age_ms: Option<i64>,
}

/// Outcome of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteSummary {
    /// Rows stored (a row with the key of an earlier one replaces it).
    pub rows: u64,
    /// The write time given to rows without one.
    pub written_at_ms: i64,
}

/// Outcome of [`OfflineStore::replace_range`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplaceSummary {
    /// Rows of the range deleted.
    pub deleted: u64,
    /// Rows written.
    pub written: u64,
    /// The write time given to rows without one.
    pub written_at_ms: i64,
}

/// Figures of one feature version and entity kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OfflineStats {
    /// Rows stored (every event time and write of every entity).
    pub rows: u64,
    /// Distinct entities.
    pub entities: u64,
    /// Earliest event time.
    pub min_event_time_ms: Option<i64>,
    /// Latest event time.
    pub max_event_time_ms: Option<i64>,
    /// Latest write time.
    pub last_written_at_ms: Option<i64>,
}

/// The offline store seam.
#[async_trait]
pub trait OfflineStore: Send + Sync {
    /// Stores rows. A row with the same entity, event time and write time as a stored one
    /// replaces it; within one call the last such row wins.
    async fn write(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        rows: &[OfflineRow],
    ) -> Result<WriteSummary, OfflineError>;

    /// Stores `(entity_id, value)` pairs with their own write times.
    async fn write_stored(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        rows: &[(String, StoredValue)],
    ) -> Result<WriteSummary, OfflineError> {
        let rows: Vec<OfflineRow> = rows.iter().cloned().map(OfflineRow::from).collect();
        self.write(feature, kind, &rows).await
    }

    /// For each `(entity_id, at_ms)`, the value known at `at_ms`: the latest event time
    /// `≤ at_ms`, ties broken by the latest write, filtered by `options`. One answer per
    /// query, in order; `None` when there is none.
    async fn point_in_time(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        queries: &[(String, i64)],
        options: &PitOptions,
    ) -> Result<Vec<Option<StoredValue>>, OfflineError>;

    /// The latest value of each entity (latest event time, then latest write), in order; the
    /// online store's fallback.
    async fn latest(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        entity_ids: &[String],
    ) -> Result<Vec<Option<StoredValue>>, OfflineError>;

    /// Every entity's value as of `at_ms` (the point-in-time rule), sorted by entity id.
    async fn snapshot(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        at_ms: i64,
        options: &PitOptions,
    ) -> Result<Vec<(String, StoredValue)>, OfflineError>;

    /// Backfill: deletes every row with an event time in `[from_ms, to_ms)` and writes `rows`,
    /// in one transaction. Rows outside the range are refused, so running it again with the
    /// same input gives the same values; rows outside the range are left alone. The deleted
    /// rows are gone, also for [`PitOptions::as_of_written_ms`] reads: a correction that must
    /// keep the history readable is a [`OfflineStore::write`] instead.
    async fn replace_range(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        from_ms: i64,
        to_ms: i64,
        rows: &[OfflineRow],
    ) -> Result<ReplaceSummary, OfflineError>;

    /// Copies every row of `from` (all entity kinds, times kept) to `to`, when a new major
    /// version reuses the old values. Rows already in `to` with the same key are kept.
    /// Returns the number of rows copied.
    async fn copy_version(&self, from: &FeatureRef, to: &FeatureRef) -> Result<u64, OfflineError>;

    /// Figures of one feature version and entity kind.
    async fn stats(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
    ) -> Result<OfflineStats, OfflineError>;

    /// Deletes every row of a feature version (all entity kinds), once it is retired. Returns
    /// the number of rows deleted.
    async fn delete_version(&self, feature: &FeatureRef) -> Result<u64, OfflineError>;
}

// ---------------------------------------------------------------------------------------------
// Validation shared by the implementations, so that they refuse the same input.

/// The current time in ms since the epoch.
pub(crate) fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// Whether `name` is a feature name: `[a-z][a-z0-9_]*`, at most 63 bytes.
pub fn valid_feature_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z'))
        && name.len() <= 63
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

/// The major version as a database integer, after checking the name.
pub(crate) fn check_feature(feature: &FeatureRef) -> Result<i64, OfflineError> {
    let invalid = |reason: &str| OfflineError::InvalidFeature {
        feature: feature.to_string(),
        reason: reason.to_owned(),
    };
    if !valid_feature_name(&feature.name) {
        return Err(invalid(
            "the name must be lower-case letters, digits and `_`, start with a letter, and have at most 63 characters",
        ));
    }
    i64::try_from(feature.major).map_err(|_| invalid("the major version exceeds 2^63 - 1"))
}

fn time_in_range(ms: i64) -> bool {
    (MIN_TIME_MS..=MAX_TIME_MS).contains(&ms)
}

/// Checks a time argument other than a row's.
pub(crate) fn check_time(feature: &FeatureRef, what: &str, ms: i64) -> Result<(), OfflineError> {
    if time_in_range(ms) {
        Ok(())
    } else {
        Err(OfflineError::InvalidArgument {
            feature: feature.to_string(),
            reason: format!(
                "{what} {ms} ms is outside 0001-01-01 .. 9999-12-31 ({MIN_TIME_MS} .. {MAX_TIME_MS} ms)"
            ),
        })
    }
}

/// Checks the entity ids of a read: Postgres text cannot hold NUL, so no stored id has one.
pub(crate) fn check_entity_ids<'a>(
    feature: &FeatureRef,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<(), OfflineError> {
    match ids.into_iter().find(|id| id.contains('\0')) {
        Some(id) => Err(OfflineError::InvalidArgument {
            feature: feature.to_string(),
            reason: format!("entity id {id:?} contains a NUL character"),
        }),
        None => Ok(()),
    }
}

/// Checks read options.
pub(crate) fn check_options(
    feature: &FeatureRef,
    options: &PitOptions,
) -> Result<(), OfflineError> {
    if let Some(cutoff) = options.as_of_written_ms {
        check_time(feature, "as_of_written", cutoff)?;
    }
    match options.max_age_ms {
        Some(age) if age < 0 => Err(OfflineError::InvalidArgument {
            feature: feature.to_string(),
            reason: format!("max_age {age} ms is negative"),
        }),
        _ => Ok(()),
    }
}

/// Earliest event time a read at `at_ms` may return under `options`.
pub(crate) fn lower_bound(at_ms: i64, options: &PitOptions) -> Option<i64> {
    options
        .max_age_ms
        .map(|age| at_ms.saturating_sub(age).max(MIN_TIME_MS))
}

/// A checked row, with its write time decided.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Prepared {
    pub entity_id: String,
    pub event_time_ms: i64,
    pub written_at_ms: i64,
    pub value: FeatureValue,
}

/// Checks rows, stamps those without a write time with `now`, and keeps the last of rows with
/// the same key (entity, event time, write time), in first-seen key order.
pub(crate) fn prepare(
    feature: &FeatureRef,
    rows: &[OfflineRow],
    now: i64,
    range: Option<(i64, i64)>,
) -> Result<Vec<Prepared>, OfflineError> {
    let mut out: Vec<Prepared> = Vec::with_capacity(rows.len());
    let mut index: std::collections::HashMap<(&str, i64, i64), usize> =
        std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        let invalid = |reason: String| OfflineError::InvalidRow {
            feature: feature.to_string(),
            entity_id: row.entity_id.clone(),
            reason,
        };
        if row.entity_id.is_empty() {
            return Err(invalid("the entity id is empty".into()));
        }
        // Postgres text cannot hold NUL; refusing it everywhere keeps the stores alike.
        if row.entity_id.contains('\0') {
            return Err(invalid("the entity id contains a NUL character".into()));
        }
        let written = row.written_at_ms.unwrap_or(now);
        for (what, ms) in [("event time", row.event_time_ms), ("write time", written)] {
            if !time_in_range(ms) {
                return Err(invalid(format!(
                    "{what} {ms} ms is outside 0001-01-01 .. 9999-12-31"
                )));
            }
        }
        if let Some((from, to)) = range
            && !(from..to).contains(&row.event_time_ms)
        {
            return Err(invalid(format!(
                "event time {} ms is outside the range [{from}, {to}) being replaced",
                row.event_time_ms
            )));
        }
        match &row.value {
            FeatureValue::Float(v) if !v.is_finite() => {
                return Err(invalid(format!("float value {v} is not finite")));
            }
            FeatureValue::String(s) if s.contains('\0') => {
                return Err(invalid("string value contains a NUL character".into()));
            }
            FeatureValue::FloatVector(v) => {
                if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                    return Err(invalid(format!("vector element {i} ({x}) is not finite")));
                }
            }
            _ => {}
        }
        let prepared = Prepared {
            entity_id: row.entity_id.clone(),
            event_time_ms: row.event_time_ms,
            written_at_ms: written,
            value: row.value.clone(),
        };
        match index.get(&(row.entity_id.as_str(), row.event_time_ms, written)) {
            Some(&i) => out[i] = prepared,
            None => {
                index.insert(
                    (row.entity_id.as_str(), row.event_time_ms, written),
                    out.len(),
                );
                out.push(prepared);
            }
        }
    }
    Ok(out)
}

/// Checks a replacement range.
pub(crate) fn check_range(
    feature: &FeatureRef,
    from_ms: i64,
    to_ms: i64,
) -> Result<(), OfflineError> {
    check_time(feature, "range start", from_ms)?;
    check_time(feature, "range end", to_ms)?;
    if from_ms >= to_ms {
        return Err(OfflineError::InvalidArgument {
            feature: feature.to_string(),
            reason: format!("the range [{from_ms}, {to_ms}) is empty"),
        });
    }
    Ok(())
}

/// Checks the two versions of a copy.
pub(crate) fn check_copy(from: &FeatureRef, to: &FeatureRef) -> Result<(i64, i64), OfflineError> {
    let a = check_feature(from)?;
    let b = check_feature(to)?;
    if from == to {
        return Err(OfflineError::InvalidArgument {
            feature: from.to_string(),
            reason: "cannot copy a feature version onto itself".into(),
        });
    }
    Ok((a, b))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed, then
/// renamed over the target. Used by the in-process stores' persistence.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "store".into());
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f() -> FeatureRef {
        FeatureRef::new("popularity_score", 1)
    }

    #[test]
    fn feature_names_follow_the_crd_pattern() {
        assert!(valid_feature_name("popularity_score"));
        assert!(valid_feature_name("a1_"));
        assert!(!valid_feature_name(""));
        assert!(!valid_feature_name("1a"));
        assert!(!valid_feature_name("Popularity"));
        assert!(!valid_feature_name("a-b"));
        assert!(!valid_feature_name(&"a".repeat(64)));
        assert_eq!(check_feature(&FeatureRef::new("x", 3)).ok(), Some(3));
        let err = check_feature(&FeatureRef::new("x", u64::MAX)).expect_err("too large");
        assert_eq!(err.kind(), "OfflineInvalidFeature");
    }

    #[test]
    fn prepare_stamps_dedups_and_checks() {
        let rows = vec![
            OfflineRow::new("u1", FeatureValue::Int(1), 10),
            OfflineRow::new("u2", FeatureValue::Int(2), 10).written_at(5),
            OfflineRow::new("u1", FeatureValue::Int(3), 10),
        ];
        let p = prepare(&f(), &rows, 100, None).expect("valid");
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].entity_id, "u1");
        assert_eq!(p[0].value, FeatureValue::Int(3), "the last duplicate wins");
        assert_eq!(p[0].written_at_ms, 100);
        assert_eq!(p[1].written_at_ms, 5);

        let bad = |row: OfflineRow, range| {
            prepare(&f(), &[row], 100, range)
                .expect_err("must refuse")
                .kind()
        };
        assert_eq!(
            bad(OfflineRow::new("", FeatureValue::Int(1), 0), None),
            "OfflineInvalidRow"
        );
        assert_eq!(
            bad(OfflineRow::new("u", FeatureValue::Float(f64::NAN), 0), None),
            "OfflineInvalidRow"
        );
        assert_eq!(
            bad(
                OfflineRow::new("u", FeatureValue::FloatVector(vec![1.0, f32::INFINITY]), 0),
                None
            ),
            "OfflineInvalidRow"
        );
        assert_eq!(
            bad(
                OfflineRow::new("u", FeatureValue::Int(1), MAX_TIME_MS + 1),
                None
            ),
            "OfflineInvalidRow"
        );
        assert_eq!(
            bad(
                OfflineRow::new("u", FeatureValue::Int(1), 20),
                Some((0, 20))
            ),
            "OfflineInvalidRow",
            "the range is half-open"
        );
        assert!(
            prepare(
                &f(),
                &[OfflineRow::new("u", FeatureValue::Int(1), 0)],
                1,
                Some((0, 20))
            )
            .is_ok()
        );
    }

    #[test]
    fn options_and_ranges_are_checked() {
        assert!(check_options(&f(), &PitOptions::default()).is_ok());
        let neg = PitOptions {
            max_age_ms: Some(-1),
            ..Default::default()
        };
        assert_eq!(
            check_options(&f(), &neg).map_err(|e| e.kind()),
            Err("OfflineInvalidArgument")
        );
        assert!(check_range(&f(), 5, 5).is_err());
        assert!(check_range(&f(), 5, 6).is_ok());
        assert!(check_copy(&f(), &f()).is_err());
        assert_eq!(
            lower_bound(
                100,
                &PitOptions {
                    max_age_ms: Some(30),
                    ..Default::default()
                }
            ),
            Some(70)
        );
        assert_eq!(
            lower_bound(
                MIN_TIME_MS,
                &PitOptions {
                    max_age_ms: Some(i64::MAX),
                    ..Default::default()
                }
            ),
            Some(MIN_TIME_MS)
        );
    }

    #[test]
    fn errors_have_stable_kinds() {
        let io = OfflineError::Io {
            path: "x".into(),
            source: std::io::Error::other("disk"),
        };
        assert_eq!(io.kind(), "OfflineIo");
        assert!(io.retryable());
        assert!(OfflineError::Postgres(sqlx::Error::PoolTimedOut).retryable());
        assert!(!OfflineError::Postgres(sqlx::Error::RowNotFound).retryable());
        let corrupt = OfflineError::Corrupt {
            location: "f".into(),
            message: "m".into(),
        };
        assert!(!corrupt.retryable());
    }

    #[test]
    fn atomic_writes_replace_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/store.json");
        write_atomically(&path, b"one").expect("write");
        write_atomically(&path, b"two").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }
}
