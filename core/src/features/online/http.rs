//! The HTTP shapes of online-feature reads, without a server (core has no axum): the scorer
//! (and the benchmark) mount three routes over these types and a [`super::FeatureReader`].
//!
//! - `POST /v1/features/batch` with [`BatchRequest`] → [`BatchResponse`]
//! - `GET /v1/features/user/{id}?features=a,b@v2` → [`BatchResponse`] of one row
//! - `GET /v1/features/product/{id}?features=…` → likewise
//!
//! A feature is named `name` (its highest major version known to the catalog) or
//! `name@vN`. The answer is columnar: one entry per feature, one row per entity, and in each
//! row parallel arrays of values, ages and freshness; values are plain JSON (a number, a
//! string or an array of numbers, `null` when missing). Errors are
//! `{"error": kind, "message": …}` with the status of [`ApiError::status`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::features::{EntityKey, EntityKind, FeatureRef, FeatureValue, Freshness};

use super::{FeatureBatch, OnlineError, OnlineFeature};

/// Most entities in one request.
pub const MAX_ENTITIES: usize = 1_000;
/// Most features in one request.
pub const MAX_FEATURES: usize = 500;

/// Body of `POST /v1/features/batch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRequest {
    /// Entities, each `{"kind": "user"|"product"|"user_product", "id": …}`.
    pub entities: Vec<EntityKey>,
    /// Features, `name` or `name@vN`.
    pub features: Vec<String>,
}

/// One feature column of an answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureColumn {
    /// Name.
    pub name: String,
    /// Major version served.
    pub major: u64,
    /// Its TTL in milliseconds (values older than this are `stale`).
    pub ttl_ms: u64,
}

/// A value as plain JSON: a number, a string or an array of numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct PlainValue(pub FeatureValue);

impl Serialize for PlainValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            FeatureValue::Float(x) => s.serialize_f64(*x),
            FeatureValue::Int(x) => s.serialize_i64(*x),
            FeatureValue::String(x) => s.serialize_str(x),
            FeatureValue::FloatVector(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for PlainValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Int(i64),
            Float(f64),
            String(String),
            Vector(Vec<f32>),
        }
        Ok(Self(match Wire::deserialize(d)? {
            Wire::Int(x) => FeatureValue::Int(x),
            Wire::Float(x) => FeatureValue::Float(x),
            Wire::String(x) => FeatureValue::String(x),
            Wire::Vector(x) => FeatureValue::FloatVector(x),
        }))
    }
}

/// The features of one entity, as parallel arrays (one entry per feature column).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Values; `null` when missing.
    pub values: Vec<Option<PlainValue>>,
    /// Ages in milliseconds (`now − event_time`); `null` when missing.
    pub age_ms: Vec<Option<i64>>,
    /// `fresh`, `stale`, `fallback` or `missing`.
    pub freshness: Vec<Freshness>,
}

/// Answer of the three routes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchResponse {
    /// Feature columns, in request order.
    pub features: Vec<FeatureColumn>,
    /// Entities, in request order.
    pub entities: Vec<EntityKey>,
    /// One row per entity.
    pub rows: Vec<Row>,
    /// What the online store did: `ok`, `timeout`, `error`, `circuit_open`.
    pub store: String,
    /// Time the read took, in microseconds.
    pub elapsed_us: u64,
}

impl BatchResponse {
    /// The answer for `batch`, read for `entities` × `features`.
    pub fn new(features: &[OnlineFeature], entities: Vec<EntityKey>, batch: FeatureBatch) -> Self {
        let width = batch.features();
        let store = batch.store.as_str().to_owned();
        let elapsed_us = batch.elapsed.as_micros() as u64;
        let mut rows = Vec::with_capacity(entities.len());
        let mut values = batch.into_values().into_iter();
        for _ in 0..entities.len() {
            let mut row = Row {
                values: Vec::with_capacity(width),
                age_ms: Vec::with_capacity(width),
                freshness: Vec::with_capacity(width),
            };
            for v in values.by_ref().take(width) {
                row.values.push(v.value.map(PlainValue));
                row.age_ms.push(v.age_ms);
                row.freshness.push(v.freshness);
            }
            rows.push(row);
        }
        Self {
            features: features
                .iter()
                .map(|f| FeatureColumn {
                    name: f.feature.name.clone(),
                    major: f.feature.major,
                    ttl_ms: f.ttl.as_millis() as u64,
                })
                .collect(),
            entities,
            rows,
            store,
            elapsed_us,
        }
    }
}

/// An error answer: `{"error": kind, "message": …}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable kind.
    pub error: String,
    /// What went wrong.
    pub message: String,
    /// HTTP status.
    #[serde(skip)]
    pub status: u16,
}

impl ApiError {
    fn new(status: u16, error: &str, message: String) -> Self {
        Self {
            error: error.to_owned(),
            message,
            status,
        }
    }

    /// HTTP status of the answer.
    pub fn status(&self) -> u16 {
        self.status
    }
}

impl From<OnlineError> for ApiError {
    fn from(e: OnlineError) -> Self {
        let status = match &e {
            OnlineError::TooLarge { .. } => 413,
            OnlineError::InvalidName { .. } | OnlineError::InvalidArgument(_) => 400,
            _ => 503,
        };
        Self::new(status, e.kind(), e.to_string())
    }
}

/// The online features known to a server, by name and major version, with their TTLs (from
/// the registry).
#[derive(Clone, Debug, Default)]
pub struct FeatureCatalog {
    by_name: BTreeMap<String, BTreeMap<u64, Duration>>,
}

impl FeatureCatalog {
    /// A catalog of `features`.
    pub fn new(features: impl IntoIterator<Item = OnlineFeature>) -> Self {
        let mut by_name: BTreeMap<String, BTreeMap<u64, Duration>> = BTreeMap::new();
        for f in features {
            by_name
                .entry(f.feature.name)
                .or_default()
                .insert(f.feature.major, f.ttl);
        }
        Self { by_name }
    }

    /// `name` (highest major) or `name@vN`.
    pub fn resolve(&self, spec: &str) -> Result<OnlineFeature, ApiError> {
        let unknown =
            || ApiError::new(404, "UnknownFeature", format!("no online feature {spec:?}"));
        let (name, major) = match spec.split_once('@') {
            Some((name, v)) => {
                let major = v.strip_prefix('v').and_then(|m| m.parse::<u64>().ok());
                let Some(major) = major else {
                    return Err(ApiError::new(
                        400,
                        "InvalidFeature",
                        format!("{spec:?}: expected name or name@vN"),
                    ));
                };
                (name, Some(major))
            }
            None => (spec, None),
        };
        let versions = self.by_name.get(name).ok_or_else(unknown)?;
        let (major, ttl) = match major {
            Some(m) => (m, *versions.get(&m).ok_or_else(unknown)?),
            None => versions
                .iter()
                .next_back()
                .map(|(m, t)| (*m, *t))
                .ok_or_else(unknown)?,
        };
        Ok(OnlineFeature::new(FeatureRef::new(name, major), ttl))
    }

    /// Resolves every spec, checking the request's bounds.
    pub fn resolve_all<S: AsRef<str>>(&self, specs: &[S]) -> Result<Vec<OnlineFeature>, ApiError> {
        if specs.is_empty() {
            return Err(ApiError::new(
                400,
                "InvalidRequest",
                "no features requested".into(),
            ));
        }
        if specs.len() > MAX_FEATURES {
            return Err(ApiError::new(
                413,
                "RequestTooLarge",
                format!("{} features, at most {MAX_FEATURES}", specs.len()),
            ));
        }
        specs.iter().map(|s| self.resolve(s.as_ref())).collect()
    }
}

/// Checks the entities of a request.
pub fn check_entities(entities: &[EntityKey]) -> Result<(), ApiError> {
    if entities.is_empty() {
        return Err(ApiError::new(
            400,
            "InvalidRequest",
            "no entities requested".into(),
        ));
    }
    if entities.len() > MAX_ENTITIES {
        return Err(ApiError::new(
            413,
            "RequestTooLarge",
            format!("{} entities, at most {MAX_ENTITIES}", entities.len()),
        ));
    }
    Ok(())
}

/// Splits a `features=a,b@v2` query value.
pub fn split_features(query: &str) -> Vec<&str> {
    query
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The entity of `GET /v1/features/{kind}/{id}`.
pub fn path_entity(kind: EntityKind, id: &str) -> EntityKey {
    EntityKey {
        kind,
        id: id.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::online::{ServedValue, StoreOutcome};

    fn catalog() -> FeatureCatalog {
        FeatureCatalog::new([
            OnlineFeature::new(FeatureRef::new("pop", 1), Duration::from_secs(60)),
            OnlineFeature::new(FeatureRef::new("pop", 2), Duration::from_secs(30)),
            OnlineFeature::new(FeatureRef::new("emb", 1), Duration::from_secs(5)),
        ])
    }

    #[test]
    fn names_resolve_to_the_highest_major_unless_pinned() {
        let c = catalog();
        assert_eq!(c.resolve("pop").expect("pop").feature.major, 2);
        let pinned = c.resolve("pop@v1").expect("pop@v1");
        assert_eq!(pinned.feature.major, 1);
        assert_eq!(pinned.ttl, Duration::from_secs(60));
        assert_eq!(c.resolve("pop@v3").expect_err("v3").status(), 404);
        assert_eq!(c.resolve("nope").expect_err("nope").error, "UnknownFeature");
        assert_eq!(c.resolve("pop@2").expect_err("bad").status(), 400);
        assert_eq!(split_features("pop, emb@v1,,"), vec!["pop", "emb@v1"]);
        let many: Vec<String> = (0..=MAX_FEATURES).map(|_| "pop".to_owned()).collect();
        assert_eq!(c.resolve_all(&many).expect_err("too many").status(), 413);
        assert!(check_entities(&[]).is_err());
    }

    #[test]
    fn answers_are_columnar_plain_json_and_round_trip() {
        let features = vec![
            OnlineFeature::new(FeatureRef::new("pop", 2), Duration::from_secs(30)),
            OnlineFeature::new(FeatureRef::new("emb", 1), Duration::from_secs(5)),
        ];
        let v = |value, freshness, age| ServedValue {
            value,
            major: 1,
            age_ms: age,
            freshness,
        };
        let batch = FeatureBatch::new(
            2,
            vec![
                v(Some(FeatureValue::Float(0.5)), Freshness::Fresh, Some(10)),
                v(
                    Some(FeatureValue::FloatVector(vec![1.0, 2.5])),
                    Freshness::Stale,
                    Some(9000),
                ),
                v(Some(FeatureValue::Int(3)), Freshness::Fallback, Some(1)),
                v(None, Freshness::Missing, None),
            ],
            StoreOutcome::Ok,
            Duration::from_micros(250),
        );
        let resp = BatchResponse::new(
            &features,
            vec![EntityKey::user("u1"), EntityKey::product("p1")],
            batch,
        );
        let json = serde_json::to_value(&resp).expect("serialises");
        assert_eq!(
            json["rows"][0]["values"],
            serde_json::json!([0.5, [1.0, 2.5]])
        );
        assert_eq!(
            json["rows"][0]["freshness"],
            serde_json::json!(["fresh", "stale"])
        );
        assert_eq!(json["rows"][1]["values"], serde_json::json!([3, null]));
        assert_eq!(json["features"][0]["ttl_ms"], 30_000);
        assert_eq!(json["entities"][1]["kind"], "product");
        assert_eq!(json["store"], "ok");
        let back: BatchResponse = serde_json::from_value(json).expect("parses");
        assert_eq!(back, resp);
        let err = ApiError::from(OnlineError::TooLarge { cells: 9, limit: 1 });
        assert_eq!(err.status(), 413);
        let body = serde_json::to_value(&err).expect("serialises");
        assert_eq!(body["error"], "RequestTooLarge");
        assert!(body.get("status").is_none());
    }
}
