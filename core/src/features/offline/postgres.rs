//! [`PostgresOfflineStore`]: the `feature_values` table (migration `0002_feature_values.sql`).
//!
//! Batches travel as arrays: rows are inserted from `UNNEST` of parallel arrays (vectors as one
//! flat `real[]` sliced per row), and point-in-time reads join `UNNEST` of the queries with a
//! `LATERAL … ORDER BY event_time DESC, written_at DESC LIMIT 1` lookup each, served by the
//! primary key: one statement per batch, never one per entity.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};

use super::{
    OfflineError, OfflineRow, OfflineStats, OfflineStore, PitOptions, Prepared, ReplaceSummary,
    WriteSummary, check_copy, check_entity_ids, check_feature, check_options, check_range,
    check_time, lower_bound, now_ms, prepare,
};
use crate::features::{EntityKind, FeatureRef, FeatureValue, StoredValue};

/// Rows per `INSERT` statement; larger batches are split, inside one transaction.
const INSERT_CHUNK: usize = 20_000;
/// Queries per point-in-time statement.
const READ_CHUNK: usize = 50_000;

/// The production offline store, in Postgres.
#[derive(Clone, Debug)]
pub struct PostgresOfflineStore {
    pool: PgPool,
}

impl PostgresOfflineStore {
    /// Wraps a pool; run [`PostgresOfflineStore::migrate`] once before use.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Brings the schema up to date with the crate's one migrator
    /// ([`crate::events::MIGRATOR`]); idempotent.
    pub async fn migrate(&self) -> Result<(), OfflineError> {
        crate::events::MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn ts(ms: i64) -> DateTime<Utc> {
    // Callers check the range first; the fallback is never reached for checked times.
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default()
}

/// A row read back: a key (the query's ordinal or the entity id), event time, write time and
/// the value columns.
type ValueRow<K> = (
    K,
    DateTime<Utc>,
    DateTime<Utc>,
    String,
    Option<f64>,
    Option<i64>,
    Option<String>,
    Option<Vec<f32>>,
);

/// The columns of a value read back: type, float, int, string, vector.
type ValueColumns = (
    String,
    Option<f64>,
    Option<i64>,
    Option<String>,
    Option<Vec<f32>>,
);

/// Puts rows answering a query `UNNEST … WITH ORDINALITY` (1-based `ord`) into their slots.
fn place(
    feature: &FeatureRef,
    rows: Vec<ValueRow<i64>>,
    out: &mut [Option<StoredValue>],
) -> Result<(), OfflineError> {
    for (ord, event, written, t, f, i, s, v) in rows {
        if let Some(slot) = usize::try_from(ord - 1).ok().and_then(|o| out.get_mut(o)) {
            *slot = Some(decode(feature, event, written, (t, f, i, s, v))?);
        }
    }
    Ok(())
}

fn decode(
    feature: &FeatureRef,
    event_time: DateTime<Utc>,
    written_at: DateTime<Utc>,
    (value_type, f, i, s, v): ValueColumns,
) -> Result<StoredValue, OfflineError> {
    let value = match (value_type.as_str(), f, i, s, v) {
        ("float", Some(f), _, _, _) => FeatureValue::Float(f),
        ("int", _, Some(i), _, _) => FeatureValue::Int(i),
        ("string", _, _, Some(s), _) => FeatureValue::String(s),
        ("float_vector", _, _, _, Some(v)) => FeatureValue::FloatVector(v),
        (other, ..) => {
            return Err(OfflineError::Corrupt {
                location: format!("table feature_values ({feature})"),
                message: format!("value type {other:?} without its value column"),
            });
        }
    };
    Ok(StoredValue {
        value,
        event_time_ms: event_time.timestamp_millis(),
        written_at_ms: written_at.timestamp_millis(),
    })
}

/// Inserts checked rows (upserting on the full key) inside a transaction.
async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    feature: &FeatureRef,
    major: i64,
    kind: EntityKind,
    rows: &[Prepared],
) -> Result<u64, OfflineError> {
    let mut stored = 0;
    for chunk in rows.chunks(INSERT_CHUNK) {
        let n = chunk.len();
        let mut entities = Vec::with_capacity(n);
        let mut events = Vec::with_capacity(n);
        let mut writes = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut floats: Vec<Option<f64>> = Vec::with_capacity(n);
        let mut ints: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut strings: Vec<Option<String>> = Vec::with_capacity(n);
        let mut vec_from: Vec<i32> = Vec::with_capacity(n);
        let mut vec_to: Vec<i32> = Vec::with_capacity(n);
        let mut flat: Vec<f32> = vec![];
        for row in chunk {
            entities.push(row.entity_id.clone());
            events.push(ts(row.event_time_ms));
            writes.push(ts(row.written_at_ms));
            let (mut f, mut i, mut s) = (None, None, None);
            // Postgres array subscripts are 1-based and inclusive: [from, to].
            let start = flat.len() + 1;
            let type_name = match &row.value {
                FeatureValue::Float(v) => {
                    f = Some(*v);
                    "float"
                }
                FeatureValue::Int(v) => {
                    i = Some(*v);
                    "int"
                }
                FeatureValue::String(v) => {
                    s = Some(v.clone());
                    "string"
                }
                FeatureValue::FloatVector(v) => {
                    flat.extend_from_slice(v);
                    "float_vector"
                }
            };
            let bound = |x: usize| {
                i32::try_from(x).map_err(|_| OfflineError::InvalidArgument {
                    feature: feature.to_string(),
                    reason: "too many vector elements in one batch (more than 2^31 - 1)".into(),
                })
            };
            vec_from.push(bound(start)?);
            vec_to.push(bound(flat.len())?);
            types.push(type_name);
            floats.push(f);
            ints.push(i);
            strings.push(s);
        }
        let result = sqlx::query(
            "INSERT INTO feature_values (feature, major, entity_kind, entity_id, event_time, written_at,
                                         value_type, float_value, int_value, string_value, vector_value)
             SELECT $1, $2, $3, r.entity_id, r.event_time, r.written_at, r.value_type,
                    r.float_value, r.int_value, r.string_value,
                    CASE WHEN r.value_type = 'float_vector' THEN ($12::real[])[r.vec_from : r.vec_to] END
             FROM UNNEST($4::text[], $5::timestamptz[], $6::timestamptz[], $7::text[],
                         $8::float8[], $9::int8[], $10::text[], $11::int4[], $13::int4[])
                  AS r(entity_id, event_time, written_at, value_type,
                       float_value, int_value, string_value, vec_from, vec_to)
             ON CONFLICT (feature, major, entity_kind, entity_id, event_time, written_at) DO UPDATE SET
                 value_type = EXCLUDED.value_type,
                 float_value = EXCLUDED.float_value,
                 int_value = EXCLUDED.int_value,
                 string_value = EXCLUDED.string_value,
                 vector_value = EXCLUDED.vector_value",
        )
        .bind(&feature.name)
        .bind(major)
        .bind(kind.as_str())
        .bind(&entities)
        .bind(&events)
        .bind(&writes)
        .bind(&types)
        .bind(&floats)
        .bind(&ints)
        .bind(&strings)
        .bind(&vec_from)
        .bind(&flat)
        .bind(&vec_to)
        .execute(&mut **tx)
        .await?;
        stored += result.rows_affected();
    }
    Ok(stored)
}

#[async_trait]
impl OfflineStore for PostgresOfflineStore {
    async fn write(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        rows: &[OfflineRow],
    ) -> Result<WriteSummary, OfflineError> {
        let major = check_feature(feature)?;
        let now = now_ms();
        let rows = prepare(feature, rows, now, None)?;
        let mut tx = self.pool.begin().await?;
        let stored = insert(&mut tx, feature, major, kind, &rows).await?;
        tx.commit().await?;
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
        let major = check_feature(feature)?;
        check_options(feature, options)?;
        for (_, at) in queries {
            check_time(feature, "query time", *at)?;
        }
        check_entity_ids(feature, queries.iter().map(|(e, _)| e.as_str()))?;
        let cutoff = options.as_of_written_ms.map(ts);
        let mut out: Vec<Option<StoredValue>> = vec![None; queries.len()];
        for (c, chunk) in queries.chunks(READ_CHUNK).enumerate() {
            let base = c * READ_CHUNK;
            let entities: Vec<&str> = chunk.iter().map(|(e, _)| e.as_str()).collect();
            let ats: Vec<DateTime<Utc>> = chunk.iter().map(|(_, at)| ts(*at)).collect();
            let lows: Vec<Option<DateTime<Utc>>> = chunk
                .iter()
                .map(|(_, at)| lower_bound(*at, options).map(ts))
                .collect();
            let rows: Vec<ValueRow<i64>> = sqlx::query_as(
                "SELECT q.ord, v.event_time, v.written_at, v.value_type,
                            v.float_value, v.int_value, v.string_value, v.vector_value
                     FROM UNNEST($4::text[], $5::timestamptz[], $6::timestamptz[])
                          WITH ORDINALITY AS q(entity_id, at, low, ord)
                     CROSS JOIN LATERAL (
                         SELECT f.event_time, f.written_at, f.value_type,
                                f.float_value, f.int_value, f.string_value, f.vector_value
                         FROM feature_values f
                         WHERE f.feature = $1 AND f.major = $2 AND f.entity_kind = $3
                           AND f.entity_id = q.entity_id
                           AND f.event_time <= q.at
                           AND (q.low IS NULL OR f.event_time >= q.low)
                           AND ($7::timestamptz IS NULL OR f.written_at <= $7)
                         ORDER BY f.event_time DESC, f.written_at DESC
                         LIMIT 1
                     ) v",
            )
            .bind(&feature.name)
            .bind(major)
            .bind(kind.as_str())
            .bind(&entities)
            .bind(&ats)
            .bind(&lows)
            .bind(cutoff)
            .fetch_all(&self.pool)
            .await?;
            place(feature, rows, &mut out[base..])?;
        }
        Ok(out)
    }

    async fn latest(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        entity_ids: &[String],
    ) -> Result<Vec<Option<StoredValue>>, OfflineError> {
        let major = check_feature(feature)?;
        check_entity_ids(feature, entity_ids.iter().map(String::as_str))?;
        let mut out: Vec<Option<StoredValue>> = vec![None; entity_ids.len()];
        for (c, chunk) in entity_ids.chunks(READ_CHUNK).enumerate() {
            let base = c * READ_CHUNK;
            let rows: Vec<ValueRow<i64>> = sqlx::query_as(
                "SELECT q.ord, v.event_time, v.written_at, v.value_type,
                            v.float_value, v.int_value, v.string_value, v.vector_value
                     FROM UNNEST($4::text[]) WITH ORDINALITY AS q(entity_id, ord)
                     CROSS JOIN LATERAL (
                         SELECT f.event_time, f.written_at, f.value_type,
                                f.float_value, f.int_value, f.string_value, f.vector_value
                         FROM feature_values f
                         WHERE f.feature = $1 AND f.major = $2 AND f.entity_kind = $3
                           AND f.entity_id = q.entity_id
                         ORDER BY f.event_time DESC, f.written_at DESC
                         LIMIT 1
                     ) v",
            )
            .bind(&feature.name)
            .bind(major)
            .bind(kind.as_str())
            .bind(chunk)
            .fetch_all(&self.pool)
            .await?;
            place(feature, rows, &mut out[base..])?;
        }
        Ok(out)
    }

    async fn snapshot(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        at_ms: i64,
        options: &PitOptions,
    ) -> Result<Vec<(String, StoredValue)>, OfflineError> {
        let major = check_feature(feature)?;
        check_options(feature, options)?;
        check_time(feature, "snapshot time", at_ms)?;
        let rows: Vec<ValueRow<String>> = sqlx::query_as(
            "SELECT DISTINCT ON (entity_id) entity_id, event_time, written_at, value_type,
                        float_value, int_value, string_value, vector_value
                 FROM feature_values
                 WHERE feature = $1 AND major = $2 AND entity_kind = $3
                   AND event_time <= $4
                   AND ($5::timestamptz IS NULL OR event_time >= $5)
                   AND ($6::timestamptz IS NULL OR written_at <= $6)
                 ORDER BY entity_id, event_time DESC, written_at DESC",
        )
        .bind(&feature.name)
        .bind(major)
        .bind(kind.as_str())
        .bind(ts(at_ms))
        .bind(lower_bound(at_ms, options).map(ts))
        .bind(options.as_of_written_ms.map(ts))
        .fetch_all(&self.pool)
        .await?;
        let mut out = rows
            .into_iter()
            .map(|(entity, event, written, t, f, i, s, v)| {
                Ok((entity, decode(feature, event, written, (t, f, i, s, v))?))
            })
            .collect::<Result<Vec<_>, OfflineError>>()?;
        // The database collation may order text differently; the contract is byte order.
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn replace_range(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        from_ms: i64,
        to_ms: i64,
        rows: &[OfflineRow],
    ) -> Result<ReplaceSummary, OfflineError> {
        let major = check_feature(feature)?;
        check_range(feature, from_ms, to_ms)?;
        let now = now_ms();
        let rows = prepare(feature, rows, now, Some((from_ms, to_ms)))?;
        let mut tx = self.pool.begin().await?;
        // Two backfills of the same version must not interleave their deletes and inserts.
        let lock_key = format!("recsys.feature_values:{feature}:{kind}");
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(&lock_key)
            .execute(&mut *tx)
            .await?;
        let deleted = sqlx::query(
            "DELETE FROM feature_values
             WHERE feature = $1 AND major = $2 AND entity_kind = $3
               AND event_time >= $4 AND event_time < $5",
        )
        .bind(&feature.name)
        .bind(major)
        .bind(kind.as_str())
        .bind(ts(from_ms))
        .bind(ts(to_ms))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let written = insert(&mut tx, feature, major, kind, &rows).await?;
        tx.commit().await?;
        Ok(ReplaceSummary {
            deleted,
            written,
            written_at_ms: now,
        })
    }

    async fn copy_version(&self, from: &FeatureRef, to: &FeatureRef) -> Result<u64, OfflineError> {
        let (from_major, to_major) = check_copy(from, to)?;
        let copied = sqlx::query(
            "INSERT INTO feature_values (feature, major, entity_kind, entity_id, event_time, written_at,
                                         value_type, float_value, int_value, string_value, vector_value)
             SELECT $3, $4, entity_kind, entity_id, event_time, written_at,
                    value_type, float_value, int_value, string_value, vector_value
             FROM feature_values
             WHERE feature = $1 AND major = $2
             ON CONFLICT DO NOTHING",
        )
        .bind(&from.name)
        .bind(from_major)
        .bind(&to.name)
        .bind(to_major)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(copied)
    }

    async fn stats(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
    ) -> Result<OfflineStats, OfflineError> {
        let major = check_feature(feature)?;
        let (rows, entities, min_event, max_event, last_written): (
            i64,
            i64,
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
        ) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT entity_id), min(event_time), max(event_time), max(written_at)
             FROM feature_values
             WHERE feature = $1 AND major = $2 AND entity_kind = $3",
        )
        .bind(&feature.name)
        .bind(major)
        .bind(kind.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(OfflineStats {
            rows: u64::try_from(rows).unwrap_or_default(),
            entities: u64::try_from(entities).unwrap_or_default(),
            min_event_time_ms: min_event.map(|t| t.timestamp_millis()),
            max_event_time_ms: max_event.map(|t| t.timestamp_millis()),
            last_written_at_ms: last_written.map(|t| t.timestamp_millis()),
        })
    }

    async fn delete_version(&self, feature: &FeatureRef) -> Result<u64, OfflineError> {
        let major = check_feature(feature)?;
        let deleted = sqlx::query("DELETE FROM feature_values WHERE feature = $1 AND major = $2")
            .bind(&feature.name)
            .bind(major)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted)
    }
}
