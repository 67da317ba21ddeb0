//! [`PostgresFeatureRegistry`]: the `feature_registry` and `feature_materializations` tables
//! (migration `0003_feature_registry.sql`).
//!
//! Changes to one feature's versions run in a transaction holding an advisory lock on the
//! feature name, so concurrent registrations (two operator replicas, a retry) are decided one
//! after the other by the same rules as the in-process registry.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool, Postgres, Transaction};

use super::{
    FeatureRegistry, FeatureSpec, Materialization, Plan, Query, Registered, RegisteredFeature,
    RegistryError, VersionSelector, check_materialization, deprecate_record, not_found,
    plan_registration, retire_record, select, sort_versions,
};
use crate::features::FeatureRef;
use crate::features::offline::now_ms;

/// The production feature registry, in Postgres.
#[derive(Clone, Debug)]
pub struct PostgresFeatureRegistry {
    pool: PgPool,
}

/// Columns of a registry row: name, version, major, spec, registered, deprecated, replaced by,
/// retired.
type RegistryRow = (
    String,
    String,
    i64,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<DateTime<Utc>>,
);

/// Columns of a materialization row: name, major, at, rows, recorded at.
type RunRow = (String, i64, DateTime<Utc>, i64, DateTime<Utc>);

fn ts(ms: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default()
}

fn decode(row: RegistryRow) -> Result<RegisteredFeature, RegistryError> {
    let (name, version, major, spec, registered, deprecated, replaced_by, retired) = row;
    let corrupt = |message: String| RegistryError::Corrupt {
        location: format!("table feature_registry ({name} {version})"),
        message,
    };
    let spec: FeatureSpec =
        serde_json::from_str(&spec).map_err(|e| corrupt(format!("spec: {e}")))?;
    if spec.name != name || spec.version != version {
        return Err(corrupt(format!(
            "the spec names {} {}",
            spec.name, spec.version
        )));
    }
    Ok(RegisteredFeature {
        spec,
        major: u64::try_from(major).map_err(|_| corrupt(format!("major {major}")))?,
        registered_at_ms: registered.timestamp_millis(),
        deprecated_at_ms: deprecated.map(|t| t.timestamp_millis()),
        replaced_by,
        retired_at_ms: retired.map(|t| t.timestamp_millis()),
    })
}

fn decode_run(row: RunRow) -> Materialization {
    let (name, major, at, rows, recorded) = row;
    Materialization {
        feature: FeatureRef::new(name, u64::try_from(major).unwrap_or_default()),
        at_ms: at.timestamp_millis(),
        rows: u64::try_from(rows).unwrap_or_default(),
        recorded_at_ms: recorded.timestamp_millis(),
    }
}

fn spec_json(spec: &FeatureSpec) -> Result<String, RegistryError> {
    serde_json::to_string(spec).map_err(|e| RegistryError::Corrupt {
        location: format!("spec of {} {}", spec.name, spec.version),
        message: format!("cannot encode: {e}"),
    })
}

/// Every version of one feature, in semantic-version order.
async fn load<'e>(
    exec: impl PgExecutor<'e>,
    name: &str,
) -> Result<Vec<RegisteredFeature>, RegistryError> {
    let rows: Vec<RegistryRow> = sqlx::query_as(
        "SELECT name, version, major, spec::text, registered_at, deprecated_at, replaced_by, retired_at
         FROM feature_registry WHERE name = $1",
    )
    .bind(name)
    .fetch_all(exec)
    .await?;
    let mut records = rows
        .into_iter()
        .map(decode)
        .collect::<Result<Vec<_>, _>>()?;
    sort_versions(&mut records);
    Ok(records)
}

/// Serializes changes to one feature's versions until the transaction ends.
async fn lock(tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<(), RegistryError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("recsys.feature_registry:{name}"))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Writes the lifecycle (and the deprecation block of the spec) of a record.
async fn save_lifecycle(
    tx: &mut Transaction<'_, Postgres>,
    r: &RegisteredFeature,
) -> Result<(), RegistryError> {
    sqlx::query(
        "UPDATE feature_registry
         SET spec = $3::jsonb, deprecated_at = $4, replaced_by = $5, retired_at = $6
         WHERE name = $1 AND version = $2",
    )
    .bind(&r.spec.name)
    .bind(&r.spec.version)
    .bind(spec_json(&r.spec)?)
    .bind(r.deprecated_at_ms.map(ts))
    .bind(&r.replaced_by)
    .bind(r.retired_at_ms.map(ts))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl PostgresFeatureRegistry {
    /// Wraps a pool; run [`PostgresFeatureRegistry::migrate`] once before use.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Brings the schema up to date with the crate's one migrator
    /// ([`crate::events::MIGRATOR`]); idempotent.
    pub async fn migrate(&self) -> Result<(), RegistryError> {
        crate::events::MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies `f` to one version under the feature's lock and saves it when it changed.
    async fn update(
        &self,
        name: &str,
        version: &str,
        f: impl FnOnce(&mut RegisteredFeature) -> Result<bool, RegistryError> + Send,
    ) -> Result<RegisteredFeature, RegistryError> {
        let mut tx = self.pool.begin().await?;
        lock(&mut tx, name).await?;
        let mut record = load(&mut *tx, name)
            .await?
            .into_iter()
            .find(|r| r.spec.version == version)
            .ok_or_else(|| not_found(name, version))?;
        if f(&mut record)? {
            save_lifecycle(&mut tx, &record).await?;
        }
        tx.commit().await?;
        Ok(record)
    }
}

#[async_trait]
impl FeatureRegistry for PostgresFeatureRegistry {
    async fn register(&self, spec: &FeatureSpec) -> Result<Registered, RegistryError> {
        spec.validate()?;
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        lock(&mut tx, &spec.name).await?;
        let existing = load(&mut *tx, &spec.name).await?;
        let (record, created) = match plan_registration(spec, &existing, now)? {
            Plan::Unchanged(r) => (r, false),
            Plan::Deprecate(r) => {
                save_lifecycle(&mut tx, &r).await?;
                (r, false)
            }
            Plan::Insert(r) => {
                let major = i64::try_from(r.major).map_err(|_| RegistryError::InvalidSpec {
                    name: r.spec.name.clone(),
                    reason: "the major version exceeds 2^63 - 1".into(),
                })?;
                sqlx::query(
                    "INSERT INTO feature_registry (name, version, major, entity, value_type, owner, tags,
                                                   spec, registered_at, deprecated_at, replaced_by, retired_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, NULL)",
                )
                .bind(&r.spec.name)
                .bind(&r.spec.version)
                .bind(major)
                .bind(r.spec.entity.as_str())
                .bind(r.spec.value_type.as_str())
                .bind(&r.spec.owner)
                .bind(&r.spec.tags)
                .bind(spec_json(&r.spec)?)
                .bind(ts(r.registered_at_ms))
                .bind(r.deprecated_at_ms.map(ts))
                .bind(&r.replaced_by)
                .execute(&mut *tx)
                .await?;
                (r, true)
            }
        };
        tx.commit().await?;
        Ok(Registered {
            version: record.spec.version,
            major: record.major,
            registered_at_ms: record.registered_at_ms,
            created,
        })
    }

    async fn get(
        &self,
        name: &str,
        selector: &VersionSelector,
    ) -> Result<Option<RegisteredFeature>, RegistryError> {
        Ok(select(&load(&self.pool, name).await?, selector))
    }

    async fn versions(&self, name: &str) -> Result<Vec<RegisteredFeature>, RegistryError> {
        load(&self.pool, name).await
    }

    async fn list(&self) -> Result<Vec<RegisteredFeature>, RegistryError> {
        let rows: Vec<RegistryRow> = sqlx::query_as(
            "SELECT name, version, major, spec::text, registered_at, deprecated_at, replaced_by, retired_at
             FROM feature_registry",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut records = rows
            .into_iter()
            .map(decode)
            .collect::<Result<Vec<_>, _>>()?;
        sort_versions(&mut records);
        Ok(records)
    }

    async fn search(&self, query: &Query) -> Result<Vec<RegisteredFeature>, RegistryError> {
        // The indexed columns narrow the rows; the shared matcher decides, as in memory.
        let rows: Vec<RegistryRow> = sqlx::query_as(
            "SELECT name, version, major, spec::text, registered_at, deprecated_at, replaced_by, retired_at
             FROM feature_registry
             WHERE ($1::text IS NULL OR entity = $1)
               AND ($2::text IS NULL OR owner = $2)
               AND ($3::text IS NULL OR tags @> ARRAY[$3::text])
               AND ($4 OR retired_at IS NULL)
               AND ($5 OR deprecated_at IS NULL OR retired_at IS NOT NULL)",
        )
        .bind(query.entity.map(|e| e.as_str()))
        .bind(&query.owner)
        .bind(&query.tag)
        .bind(query.include_retired)
        .bind(query.include_deprecated)
        .fetch_all(&self.pool)
        .await?;
        let mut records = rows
            .into_iter()
            .map(decode)
            .filter(|r| r.as_ref().map_or(true, |r| query.matches(r)))
            .collect::<Result<Vec<_>, _>>()?;
        sort_versions(&mut records);
        Ok(records)
    }

    async fn deprecate(
        &self,
        name: &str,
        version: &str,
        replaced_by: Option<&str>,
    ) -> Result<RegisteredFeature, RegistryError> {
        let now = now_ms();
        self.update(name, version, |r| deprecate_record(r, replaced_by, now))
            .await
    }

    async fn retire(&self, name: &str, version: &str) -> Result<RegisteredFeature, RegistryError> {
        let now = now_ms();
        self.update(name, version, |r| retire_record(r, now)).await
    }

    async fn record_materialization(
        &self,
        feature: &FeatureRef,
        at_ms: i64,
        rows: u64,
    ) -> Result<Materialization, RegistryError> {
        let versions = load(&self.pool, &feature.name).await?;
        let (major, row_count) = check_materialization(feature, at_ms, rows, &versions)?;
        let now = now_ms();
        sqlx::query(
            "INSERT INTO feature_materializations (name, major, at, row_count, recorded_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name, major, at) DO UPDATE SET
                 row_count = EXCLUDED.row_count, recorded_at = EXCLUDED.recorded_at",
        )
        .bind(&feature.name)
        .bind(major)
        .bind(ts(at_ms))
        .bind(row_count)
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(Materialization {
            feature: feature.clone(),
            at_ms,
            rows,
            recorded_at_ms: now,
        })
    }

    async fn last_materialization(
        &self,
        feature: &FeatureRef,
    ) -> Result<Option<Materialization>, RegistryError> {
        Ok(self.materializations(feature, 1).await?.into_iter().next())
    }

    async fn materializations(
        &self,
        feature: &FeatureRef,
        limit: usize,
    ) -> Result<Vec<Materialization>, RegistryError> {
        let Ok(major) = i64::try_from(feature.major) else {
            return Ok(vec![]);
        };
        let rows: Vec<RunRow> = sqlx::query_as(
            "SELECT name, major, at, row_count, recorded_at
             FROM feature_materializations
             WHERE name = $1 AND major = $2
             ORDER BY at DESC
             LIMIT $3",
        )
        .bind(&feature.name)
        .bind(major)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(decode_run).collect())
    }
}
