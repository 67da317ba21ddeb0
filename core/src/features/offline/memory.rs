//! [`InProcessOfflineStore`]: the embedded default of the local mode, in ordered maps, optionally
//! persisted to a JSON file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{
    OfflineError, OfflineRow, OfflineStats, OfflineStore, PitOptions, Prepared, ReplaceSummary,
    WriteSummary, check_copy, check_entity_ids, check_feature, check_options, check_range,
    check_time, lower_bound, now_ms, prepare, write_atomically,
};
use crate::features::{EntityKind, FeatureRef, FeatureValue, StoredValue};

/// One entity's rows: (event time, write time) → value.
type Series = BTreeMap<(i64, i64), FeatureValue>;
/// One feature version and entity kind: entity id → rows.
type Table = BTreeMap<String, Series>;

/// Everything stored: (name, major, entity kind) → table.
#[derive(Clone, Debug, Default)]
struct State {
    tables: BTreeMap<(String, u64, EntityKind), Table>,
}

impl State {
    fn table(&self, feature: &FeatureRef, kind: EntityKind) -> Option<&Table> {
        self.tables
            .get(&(feature.name.clone(), feature.major, kind))
    }

    fn table_mut(&mut self, feature: &FeatureRef, kind: EntityKind) -> &mut Table {
        self.tables
            .entry((feature.name.clone(), feature.major, kind))
            .or_default()
    }

    fn insert(&mut self, feature: &FeatureRef, kind: EntityKind, rows: Vec<Prepared>) -> u64 {
        let table = self.table_mut(feature, kind);
        let n = rows.len() as u64;
        for row in rows {
            table
                .entry(row.entity_id)
                .or_default()
                .insert((row.event_time_ms, row.written_at_ms), row.value);
        }
        n
    }
}

/// The point-in-time rule over one entity's rows.
fn pick(series: &Series, at_ms: i64, options: &PitOptions) -> Option<StoredValue> {
    let low = lower_bound(at_ms, options).unwrap_or(i64::MIN);
    let cutoff = options.as_of_written_ms.unwrap_or(i64::MAX);
    series
        .range(..=(at_ms, i64::MAX))
        .rev()
        .take_while(|((event, _), _)| *event >= low)
        .find(|((_, written), _)| *written <= cutoff)
        .map(|(&(event, written), value)| StoredValue {
            value: value.clone(),
            event_time_ms: event,
            written_at_ms: written,
        })
}

/// The in-process offline store: the embedded default of the local mode.
///
/// With a file ([`InProcessOfflineStore::open`]) every change rewrites the whole file
/// atomically before it becomes visible, so it suits local data sets, not production volumes.
#[derive(Debug, Default)]
pub struct InProcessOfflineStore {
    state: Mutex<State>,
    file: Option<PathBuf>,
}

impl InProcessOfflineStore {
    /// An empty store in memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store persisted to `path`: loads it when it exists, creates it on the first change.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OfflineError> {
        let path = path.as_ref().to_owned();
        let state = match std::fs::read(&path) {
            Ok(bytes) => decode_file(&path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(OfflineError::Io { path, source }),
        };
        Ok(Self {
            state: Mutex::new(state),
            file: Some(path),
        })
    }

    /// The file the store is persisted to, if any.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Applies `change` to the state; with a file, to a copy that replaces the state only once
    /// it is on disk, so a failed write changes nothing.
    async fn change<R>(&self, change: impl FnOnce(&mut State) -> R) -> Result<R, OfflineError> {
        let mut state = self.state.lock().await;
        let Some(path) = &self.file else {
            return Ok(change(&mut state));
        };
        let mut next = state.clone();
        let out = change(&mut next);
        let bytes = encode_file(&next, path)?;
        let target = path.clone();
        tokio::task::spawn_blocking(move || write_atomically(&target, &bytes))
            .await
            .map_err(|e| OfflineError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|source| OfflineError::Io {
                path: path.clone(),
                source,
            })?;
        *state = next;
        Ok(out)
    }
}

#[async_trait]
impl OfflineStore for InProcessOfflineStore {
    async fn write(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        rows: &[OfflineRow],
    ) -> Result<WriteSummary, OfflineError> {
        check_feature(feature)?;
        let now = now_ms();
        let rows = prepare(feature, rows, now, None)?;
        let stored = self.change(|s| s.insert(feature, kind, rows)).await?;
        Ok(WriteSummary {
            rows: stored,
            written_at_ms: now,
        })
    }

    async fn point_in_time(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        queries: &[(String, i64)],
        options: &PitOptions,
    ) -> Result<Vec<Option<StoredValue>>, OfflineError> {
        check_feature(feature)?;
        check_options(feature, options)?;
        for (_, at) in queries {
            check_time(feature, "query time", *at)?;
        }
        check_entity_ids(feature, queries.iter().map(|(e, _)| e.as_str()))?;
        let state = self.state.lock().await;
        let Some(table) = state.table(feature, kind) else {
            return Ok(vec![None; queries.len()]);
        };
        Ok(queries
            .iter()
            .map(|(entity, at)| table.get(entity).and_then(|s| pick(s, *at, options)))
            .collect())
    }

    async fn latest(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        entity_ids: &[String],
    ) -> Result<Vec<Option<StoredValue>>, OfflineError> {
        check_feature(feature)?;
        check_entity_ids(feature, entity_ids.iter().map(String::as_str))?;
        let state = self.state.lock().await;
        let Some(table) = state.table(feature, kind) else {
            return Ok(vec![None; entity_ids.len()]);
        };
        Ok(entity_ids
            .iter()
            .map(|entity| {
                let (&(event, written), value) = table.get(entity)?.last_key_value()?;
                Some(StoredValue {
                    value: value.clone(),
                    event_time_ms: event,
                    written_at_ms: written,
                })
            })
            .collect())
    }

    async fn snapshot(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        at_ms: i64,
        options: &PitOptions,
    ) -> Result<Vec<(String, StoredValue)>, OfflineError> {
        check_feature(feature)?;
        check_options(feature, options)?;
        check_time(feature, "snapshot time", at_ms)?;
        let state = self.state.lock().await;
        let Some(table) = state.table(feature, kind) else {
            return Ok(vec![]);
        };
        Ok(table
            .iter()
            .filter_map(|(entity, series)| {
                pick(series, at_ms, options).map(|v| (entity.clone(), v))
            })
            .collect())
    }

    async fn replace_range(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        from_ms: i64,
        to_ms: i64,
        rows: &[OfflineRow],
    ) -> Result<ReplaceSummary, OfflineError> {
        check_feature(feature)?;
        check_range(feature, from_ms, to_ms)?;
        let now = now_ms();
        let rows = prepare(feature, rows, now, Some((from_ms, to_ms)))?;
        let (deleted, written) = self
            .change(|s| {
                let table = s.table_mut(feature, kind);
                let mut deleted = 0u64;
                for series in table.values_mut() {
                    let doomed: Vec<(i64, i64)> = series
                        .range((from_ms, i64::MIN)..(to_ms, i64::MIN))
                        .map(|(k, _)| *k)
                        .collect();
                    deleted += doomed.len() as u64;
                    for key in doomed {
                        series.remove(&key);
                    }
                }
                table.retain(|_, series| !series.is_empty());
                let written = s.insert(feature, kind, rows);
                (deleted, written)
            })
            .await?;
        Ok(ReplaceSummary {
            deleted,
            written,
            written_at_ms: now,
        })
    }

    async fn copy_version(&self, from: &FeatureRef, to: &FeatureRef) -> Result<u64, OfflineError> {
        check_copy(from, to)?;
        self.change(|s| {
            let sources: Vec<(EntityKind, Table)> = s
                .tables
                .iter()
                .filter(|((name, major, _), _)| *name == from.name && *major == from.major)
                .map(|((_, _, kind), table)| (*kind, table.clone()))
                .collect();
            let mut copied = 0u64;
            for (kind, table) in sources {
                let target = s.table_mut(to, kind);
                for (entity, series) in table {
                    let dest = target.entry(entity).or_default();
                    for (key, value) in series {
                        if let std::collections::btree_map::Entry::Vacant(slot) = dest.entry(key) {
                            slot.insert(value);
                            copied += 1;
                        }
                    }
                }
            }
            copied
        })
        .await
    }

    async fn stats(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
    ) -> Result<OfflineStats, OfflineError> {
        check_feature(feature)?;
        let state = self.state.lock().await;
        let mut stats = OfflineStats::default();
        let Some(table) = state.table(feature, kind) else {
            return Ok(stats);
        };
        for series in table.values().filter(|s| !s.is_empty()) {
            stats.entities += 1;
            stats.rows += series.len() as u64;
            for &(event, written) in series.keys() {
                stats.min_event_time_ms =
                    Some(stats.min_event_time_ms.map_or(event, |m| m.min(event)));
                stats.max_event_time_ms =
                    Some(stats.max_event_time_ms.map_or(event, |m| m.max(event)));
                stats.last_written_at_ms =
                    Some(stats.last_written_at_ms.map_or(written, |m| m.max(written)));
            }
        }
        Ok(stats)
    }

    async fn delete_version(&self, feature: &FeatureRef) -> Result<u64, OfflineError> {
        check_feature(feature)?;
        self.change(|s| {
            let mut deleted = 0u64;
            s.tables.retain(|(name, major, _), table| {
                let doomed = *name == feature.name && *major == feature.major;
                if doomed {
                    deleted += table
                        .values()
                        .map(|series| series.len() as u64)
                        .sum::<u64>();
                }
                !doomed
            });
            deleted
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// File format: `{"format": 1, "rows": [...]}`, one object a row. Floats are written as decimal
// strings that Rust parses back to the same bits (a JSON number read back by serde_json may be
// off by one unit in the last place).

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct FileState {
    format: u32,
    rows: Vec<FileRow>,
}

#[derive(Serialize, Deserialize)]
struct FileRow {
    feature: String,
    major: u64,
    entity_kind: EntityKind,
    entity_id: String,
    event_time_ms: i64,
    written_at_ms: i64,
    value: FileValue,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
enum FileValue {
    Float(String),
    Int(i64),
    String(String),
    FloatVector(Vec<String>),
}

fn encode_file(state: &State, path: &Path) -> Result<Vec<u8>, OfflineError> {
    let mut rows = vec![];
    for ((feature, major, kind), table) in &state.tables {
        for (entity, series) in table {
            for (&(event, written), value) in series {
                let value = match value {
                    FeatureValue::Float(v) => FileValue::Float(format!("{v:?}")),
                    FeatureValue::Int(v) => FileValue::Int(*v),
                    FeatureValue::String(v) => FileValue::String(v.clone()),
                    FeatureValue::FloatVector(v) => {
                        FileValue::FloatVector(v.iter().map(|x| format!("{x:?}")).collect())
                    }
                };
                rows.push(FileRow {
                    feature: feature.clone(),
                    major: *major,
                    entity_kind: *kind,
                    entity_id: entity.clone(),
                    event_time_ms: event,
                    written_at_ms: written,
                    value,
                });
            }
        }
    }
    serde_json::to_vec(&FileState {
        format: FORMAT,
        rows,
    })
    .map_err(|e| OfflineError::Corrupt {
        location: path.display().to_string(),
        message: format!("cannot encode: {e}"),
    })
}

fn decode_file(path: &Path, bytes: &[u8]) -> Result<State, OfflineError> {
    let corrupt = |message: String| OfflineError::Corrupt {
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
    for row in file.rows {
        let value = match row.value {
            FileValue::Float(s) => FeatureValue::Float(
                s.parse()
                    .map_err(|e| corrupt(format!("float {s:?}: {e}")))?,
            ),
            FileValue::Int(v) => FeatureValue::Int(v),
            FileValue::String(v) => FeatureValue::String(v),
            FileValue::FloatVector(v) => FeatureValue::FloatVector(
                v.iter()
                    .map(|s| s.parse().map_err(|e| corrupt(format!("float {s:?}: {e}"))))
                    .collect::<Result<_, _>>()?,
            ),
        };
        state
            .tables
            .entry((row.feature, row.major, row.entity_kind))
            .or_default()
            .entry(row.entity_id)
            .or_default()
            .insert((row.event_time_ms, row.written_at_ms), value);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_survive_the_file_bit_for_bit() {
        let mut state = State::default();
        let f = FeatureRef::new("x", 1);
        let values = [
            0.1,
            0.300_000_000_000_000_04,
            1e-300,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
            -0.0,
            std::f64::consts::PI,
        ];
        let rows = values
            .iter()
            .enumerate()
            .map(|(i, v)| Prepared {
                entity_id: format!("e{i}"),
                event_time_ms: 1,
                written_at_ms: 2,
                value: FeatureValue::Float(*v),
            })
            .chain(std::iter::once(Prepared {
                entity_id: "vec".into(),
                event_time_ms: 1,
                written_at_ms: 2,
                value: FeatureValue::FloatVector(vec![
                    0.1,
                    f32::MAX,
                    f32::MIN_POSITIVE,
                    1e-45,
                    -0.0,
                ]),
            }))
            .collect();
        state.insert(&f, EntityKind::Product, rows);
        let path = Path::new("mem.json");
        let bytes = encode_file(&state, path).expect("encode");
        let back = decode_file(path, &bytes).expect("decode");
        let a = state.table(&f, EntityKind::Product).expect("table");
        let b = back.table(&f, EntityKind::Product).expect("table");
        for (entity, series) in a {
            for (key, value) in series {
                let other = &b[entity][key];
                match (value, other) {
                    (FeatureValue::Float(x), FeatureValue::Float(y)) => {
                        assert_eq!(x.to_bits(), y.to_bits(), "{x} vs {y}");
                    }
                    (FeatureValue::FloatVector(x), FeatureValue::FloatVector(y)) => {
                        let xb: Vec<u32> = x.iter().map(|v| v.to_bits()).collect();
                        let yb: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(xb, yb);
                    }
                    _ => panic!("type changed"),
                }
            }
        }
    }

    #[test]
    fn damaged_files_are_reported() {
        let err = decode_file(Path::new("f.json"), b"{not json").expect_err("corrupt");
        assert_eq!(err.kind(), "OfflineCorrupt");
        let err =
            decode_file(Path::new("f.json"), br#"{"format": 9, "rows": []}"#).expect_err("format");
        assert!(err.to_string().contains("format 9"), "{err}");
    }
}
