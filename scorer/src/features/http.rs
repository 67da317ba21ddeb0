//! The HTTP shapes of online-feature reads and feature discovery: the scorer's routes
//! ([`super::routes`]) over these types, a [`FeatureReader`](recsys_core::features::online::FeatureReader)
//! and a [`FeatureRegistry`](recsys_core::features::registry::FeatureRegistry). Core knows
//! nothing of HTTP; status codes are decided here ([`ApiError::status`]).
//!
//! - `POST /v1/features/batch` with [`BatchRequest`] → [`BatchResponse`]
//! - `GET /v1/features/users/{id}?features=a,b@v2` → [`BatchResponse`] of one row
//! - `GET /v1/features/products/{id}?features=…` → likewise
//! - `GET /v1/features?entity=&tag=&owner=&q=` → [`FeatureList`] ([`parse_discovery_query`])
//! - `GET /v1/features/{name}` → [`FeatureDetail`]
//!
//! A feature is named `name` (its highest major version known to the catalog), `name@vN` or
//! `name@N`. The [`FeatureCatalog`] comes from the registry ([`FeatureCatalog::from_registry`]):
//! for every major version with a version that is not retired, the version the registry would
//! pick for it ([`VersionSelector::Major`]),
//! when that version is `online`, with its TTL. The answer is columnar: one entry per
//! feature, one row per entity, and in each row parallel arrays of values, ages and freshness;
//! values are plain JSON (a number, a string or an array of numbers, `null` when missing).
//! Errors are `{"error": kind, "message": …}` with the status of [`ApiError::status`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use recsys_core::features::offline::valid_feature_name;
use recsys_core::features::online::{FeatureBatch, MAX_ENTITY_ID_LEN, OnlineError, OnlineFeature};
use recsys_core::features::registry::{
    FeatureSpec, Lifecycle, Materialization, Query, RegisteredFeature, RegistryError, ValueType,
    VersionSelector, select,
};
use recsys_core::features::{EntityKey, EntityKind, FeatureRef, FeatureValue, Freshness};

/// Most entities in one request.
pub const MAX_ENTITIES: usize = 1_000;
/// Most features in one request.
pub const MAX_FEATURES: usize = 500;

/// Body of `POST /v1/features/batch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchRequest {
    /// Entities, each `{"kind": "user"|"product"|"user_product", "id": …}`.
    pub entities: Vec<EntityKey>,
    /// Features, `name` or `name@vN`.
    pub features: Vec<String>,
}

/// One feature column of an answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeatureColumn {
    /// Name.
    pub name: String,
    /// Major version served.
    pub major: u64,
    /// The registered version whose definition is served for that major (`1.2.0`), when the
    /// catalog comes from the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Its TTL in milliseconds (values older than this are `stale`).
    pub ttl_ms: u64,
}

/// A value as plain JSON: a number, a string or an array of numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct PlainValue(pub FeatureValue);

impl utoipa::PartialSchema for PlainValue {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Number))
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::Number)))
            .description(Some(
                "A feature value: a number (float or int), a string, or an array of numbers",
            ))
            .into()
    }
}

impl utoipa::ToSchema for PlainValue {}

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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Row {
    /// Values; `null` when missing.
    pub values: Vec<Option<PlainValue>>,
    /// Ages in milliseconds (`now − event_time`); `null` when missing.
    pub age_ms: Vec<Option<i64>>,
    /// `fresh`, `stale`, `fallback` or `missing`.
    pub freshness: Vec<Freshness>,
}

/// Answer of the three routes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// Names each column's registered version from `catalog`.
    pub fn with_versions(mut self, catalog: &FeatureCatalog) -> Self {
        for c in &mut self.features {
            c.version = catalog
                .version(&FeatureRef::new(c.name.clone(), c.major))
                .map(str::to_owned);
        }
        self
    }

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
                    version: None,
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// An error answer with `status`, stable `error` kind and `message`.
    pub fn new(status: u16, error: &str, message: impl Into<String>) -> Self {
        Self {
            error: error.to_owned(),
            message: message.into(),
            status,
        }
    }

    /// A 400 answer.
    pub fn bad_request(error: &str, message: impl Into<String>) -> Self {
        Self::new(400, error, message)
    }

    /// A 503 answer: nothing at all could be served.
    pub fn unavailable(error: &str, message: impl Into<String>) -> Self {
        Self::new(503, error, message)
    }

    /// HTTP status of the answer.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The same error with `context` (the field it is about) before its message.
    pub fn context(mut self, context: impl std::fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
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

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match &e {
            RegistryError::NotFound { .. } => 404,
            RegistryError::InvalidArgument(_) | RegistryError::InvalidSpec { .. } => 400,
            _ => 503,
        };
        Self::new(status, e.kind(), e.to_string())
    }
}

/// One feature version of a [`FeatureCatalog`].
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    ttl: Duration,
    entity: Option<EntityKind>,
    version: Option<String>,
}

/// The online features known to a server, by name and major version, with their TTLs and
/// entities (from the registry: [`FeatureCatalog::from_registry`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeatureCatalog {
    by_name: BTreeMap<String, BTreeMap<u64, Entry>>,
}

/// One feature version served: what [`online_features`] makes of the registry's records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogFeature {
    /// Name, major version and TTL.
    pub feature: OnlineFeature,
    /// What it describes.
    pub entity: EntityKind,
    /// The registered version whose spec is served for this major version (`1.2.0`).
    pub version: String,
}

/// The online feature versions of the registry's `records` (every version of every feature,
/// as [`FeatureRegistry::list`](recsys_core::features::registry::FeatureRegistry::list) returns
/// them): for each name and major version with a version that is not retired, the version
/// the registry picks for that major ([`VersionSelector::Major`]: active before deprecated,
/// releases before pre-releases, then the highest), when its spec is `online`, with the TTL
/// of its spec. A major whose picked version is offline-only, or whose TTL is zero (a read
/// needs a positive TTL), is left out.
pub fn online_features(records: &[RegisteredFeature]) -> Vec<CatalogFeature> {
    let mut by_major: BTreeMap<(&str, u64), Vec<RegisteredFeature>> = BTreeMap::new();
    for r in records {
        by_major
            .entry((r.spec.name.as_str(), r.major))
            .or_default()
            .push(r.clone());
    }
    by_major
        .into_iter()
        .filter_map(|((_, major), versions)| {
            let picked = select(&versions, &VersionSelector::Major(major))?;
            let ttl_ms = picked.spec.ttl_ms().ok().filter(|ms| *ms > 0)?;
            picked.spec.online.then(|| CatalogFeature {
                feature: OnlineFeature::new(picked.feature_ref(), Duration::from_millis(ttl_ms)),
                entity: picked.spec.entity,
                version: picked.spec.version.clone(),
            })
        })
        .collect()
}

/// Plural of an entity kind, for messages.
fn entity_plural(kind: EntityKind) -> &'static str {
    match kind {
        EntityKind::User => "users",
        EntityKind::Product => "products",
        EntityKind::UserProduct => "user × product pairs",
    }
}

impl FeatureCatalog {
    /// A catalog of `features`, their entities unknown (no entity checks).
    pub fn new(features: impl IntoIterator<Item = OnlineFeature>) -> Self {
        let mut catalog = Self::default();
        for f in features {
            catalog.insert(f, None, None);
        }
        catalog
    }

    /// A catalog of feature versions with their entities and registered versions.
    pub fn with_entities(features: impl IntoIterator<Item = CatalogFeature>) -> Self {
        let mut catalog = Self::default();
        for f in features {
            catalog.insert(f.feature, Some(f.entity), Some(f.version));
        }
        catalog
    }

    /// The catalog of the registry's records ([`online_features`]).
    pub fn from_registry(records: &[RegisteredFeature]) -> Self {
        Self::with_entities(online_features(records))
    }

    fn insert(&mut self, f: OnlineFeature, entity: Option<EntityKind>, version: Option<String>) {
        self.by_name.entry(f.feature.name).or_default().insert(
            f.feature.major,
            Entry {
                ttl: f.ttl,
                entity,
                version,
            },
        );
    }

    fn entry(&self, feature: &FeatureRef) -> Option<&Entry> {
        self.by_name.get(&feature.name)?.get(&feature.major)
    }

    /// Number of feature versions.
    pub fn len(&self) -> usize {
        self.by_name.values().map(BTreeMap::len).sum()
    }

    /// Whether no feature is served.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Whether `feature` is served.
    pub fn contains(&self, feature: &FeatureRef) -> bool {
        self.entry(feature).is_some()
    }

    /// The entity `feature` describes, when known.
    pub fn entity(&self, feature: &FeatureRef) -> Option<EntityKind> {
        self.entry(feature)?.entity
    }

    /// The TTL of `feature`.
    pub fn ttl(&self, feature: &FeatureRef) -> Option<Duration> {
        Some(self.entry(feature)?.ttl)
    }

    /// The registered version served for `feature`'s major version, when known.
    pub fn version(&self, feature: &FeatureRef) -> Option<&str> {
        self.entry(feature)?.version.as_deref()
    }

    /// Every feature version with its entity, by name then major.
    pub fn iter(&self) -> impl Iterator<Item = (OnlineFeature, Option<EntityKind>)> + '_ {
        self.by_name.iter().flat_map(|(name, majors)| {
            majors.iter().map(|(major, e)| {
                (
                    OnlineFeature::new(FeatureRef::new(name.clone(), *major), e.ttl),
                    e.entity,
                )
            })
        })
    }

    /// Every feature of entity `kind`, each at its highest major version with that entity,
    /// by name: what `GET /v1/features/{users,products}/{id}` serves without `features=`.
    pub fn features_of(&self, kind: EntityKind) -> Vec<OnlineFeature> {
        self.by_name
            .iter()
            .filter_map(|(name, majors)| {
                let (major, e) = majors.iter().rev().find(|(_, e)| e.entity == Some(kind))?;
                Some(OnlineFeature::new(
                    FeatureRef::new(name.clone(), *major),
                    e.ttl,
                ))
            })
            .collect()
    }

    /// `name` (highest major), `name@vN` or `name@N`.
    pub fn resolve(&self, spec: &str) -> Result<OnlineFeature, ApiError> {
        let (name, major) = match spec.split_once('@') {
            Some((name, v)) => {
                let digits = v.strip_prefix('v').unwrap_or(v);
                let major = (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| digits.parse::<u64>().ok())
                    .flatten();
                let Some(major) = major else {
                    return Err(ApiError::bad_request(
                        "InvalidFeature",
                        format!(
                            "{spec:?}: expected a feature as name, name@vN or name@N (N a major version)"
                        ),
                    ));
                };
                (name, Some(major))
            }
            None => (spec, None),
        };
        if !valid_feature_name(name) {
            return Err(ApiError::bad_request(
                "InvalidFeature",
                format!(
                    "{spec:?}: a feature name is lower-case letters, digits and `_`, starting with a letter"
                ),
            ));
        }
        let Some(versions) = self.by_name.get(name) else {
            return Err(ApiError::new(
                404,
                "UnknownFeature",
                format!(
                    "no online feature {name:?} is registered (GET /v1/features lists the features)"
                ),
            ));
        };
        let (major, entry) = match major {
            Some(m) => match versions.get(&m) {
                Some(e) => (m, e),
                None => {
                    let served: Vec<String> = versions.keys().map(|m| format!("v{m}")).collect();
                    return Err(ApiError::new(
                        404,
                        "UnknownFeature",
                        format!(
                            "{spec:?}: {name} has no online major version {m} (served: {})",
                            served.join(", ")
                        ),
                    ));
                }
            },
            None => match versions.iter().next_back() {
                Some((m, e)) => (*m, e),
                None => {
                    return Err(ApiError::new(
                        404,
                        "UnknownFeature",
                        format!("no online feature {name:?}"),
                    ));
                }
            },
        };
        Ok(OnlineFeature::new(FeatureRef::new(name, major), entry.ttl))
    }

    /// Resolves every spec, checking the request's bounds; an error names the position of
    /// the bad spec (`features[2]`).
    pub fn resolve_all<S: AsRef<str>>(&self, specs: &[S]) -> Result<Vec<OnlineFeature>, ApiError> {
        if specs.is_empty() {
            return Err(ApiError::bad_request(
                "InvalidRequest",
                "features: no features requested",
            ));
        }
        if specs.len() > MAX_FEATURES {
            return Err(ApiError::new(
                413,
                "RequestTooLarge",
                format!("features: {} features, at most {MAX_FEATURES}", specs.len()),
            ));
        }
        specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                self.resolve(s.as_ref())
                    .map_err(|e| e.context(format_args!("features[{i}]")))
            })
            .collect()
    }

    /// Checks that each feature whose entity is known describes the kind of every entity: a
    /// product feature is not read for a user.
    pub fn check_kinds(
        &self,
        entities: &[EntityKey],
        features: &[OnlineFeature],
    ) -> Result<(), ApiError> {
        let mut first_of_kind: BTreeMap<EntityKind, usize> = BTreeMap::new();
        for (i, e) in entities.iter().enumerate() {
            first_of_kind.entry(e.kind).or_insert(i);
        }
        for (j, f) in features.iter().enumerate() {
            let Some(kind) = self.entity(&f.feature) else {
                continue;
            };
            if let Some((other, &i)) = first_of_kind.iter().find(|(k, _)| **k != kind) {
                return Err(ApiError::bad_request(
                    "EntityMismatch",
                    format!(
                        "features[{j}]: {} describes {}, but entities[{i}] is a {}; ask for the features of each entity kind separately",
                        f.feature,
                        entity_plural(kind),
                        other
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks the entities of a request: how many, and each id (1 to 512 bytes).
pub fn check_entities(entities: &[EntityKey]) -> Result<(), ApiError> {
    if entities.is_empty() {
        return Err(ApiError::bad_request(
            "InvalidRequest",
            "entities: no entities requested",
        ));
    }
    if entities.len() > MAX_ENTITIES {
        return Err(ApiError::new(
            413,
            "RequestTooLarge",
            format!(
                "entities: {} entities, at most {MAX_ENTITIES}",
                entities.len()
            ),
        ));
    }
    for (i, e) in entities.iter().enumerate() {
        if e.id.is_empty() || e.id.len() > MAX_ENTITY_ID_LEN {
            return Err(ApiError::bad_request(
                "InvalidEntity",
                format!(
                    "entities[{i}]: an entity id has 1 to {MAX_ENTITY_ID_LEN} bytes, this one {}",
                    e.id.len()
                ),
            ));
        }
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

/// Checks that each query parameter is known and given once; returns them by name.
fn query_params<'a>(
    pairs: &'a [(String, String)],
    known: &[&str],
) -> Result<BTreeMap<&'a str, &'a str>, ApiError> {
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        if !known.contains(&k.as_str()) {
            return Err(ApiError::bad_request(
                "InvalidQuery",
                format!(
                    "unknown query parameter {k:?} (expected {})",
                    known.join(", ")
                ),
            ));
        }
        if out.insert(k.as_str(), v.as_str()).is_some() {
            return Err(ApiError::bad_request(
                "InvalidQuery",
                format!("query parameter {k:?} is given more than once"),
            ));
        }
    }
    Ok(out)
}

/// The feature specs of `GET /v1/features/{users,products}/{id}`: `None` without a
/// `features` parameter (every online feature of the kind), an error for an unknown parameter
/// or an empty list.
pub fn parse_features_query(pairs: &[(String, String)]) -> Result<Option<Vec<String>>, ApiError> {
    let params = query_params(pairs, &["features"])?;
    let Some(list) = params.get("features") else {
        return Ok(None);
    };
    let specs: Vec<String> = split_features(list)
        .into_iter()
        .map(str::to_owned)
        .collect();
    if specs.is_empty() {
        return Err(ApiError::bad_request(
            "InvalidQuery",
            "features: the list is empty; leave the parameter out to get every feature of the entity",
        ));
    }
    Ok(Some(specs))
}

/// Parses an entity kind as the API and the CRD spell it.
pub fn parse_entity_kind(s: &str) -> Option<EntityKind> {
    match s {
        "user" => Some(EntityKind::User),
        "product" => Some(EntityKind::Product),
        "user_product" | "userProduct" => Some(EntityKind::UserProduct),
        _ => None,
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(ApiError::bad_request(
            "InvalidQuery",
            format!("{name}: expected true or false, got {other:?}"),
        )),
    }
}

/// The registry query of `GET /v1/features?entity=&tag=&owner=&q=&include_deprecated=&include_retired=`.
/// Empty values are ignored; unknown parameters are refused.
pub fn parse_discovery_query(pairs: &[(String, String)]) -> Result<Query, ApiError> {
    let params = query_params(
        pairs,
        &[
            "entity",
            "tag",
            "owner",
            "q",
            "include_deprecated",
            "include_retired",
        ],
    )?;
    let text = |k: &str| {
        params
            .get(k)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let entity = match text("entity") {
        None => None,
        Some(e) => Some(parse_entity_kind(&e).ok_or_else(|| {
            ApiError::bad_request(
                "InvalidQuery",
                format!(
                    "entity: {e:?} is not an entity kind (expected user, product or user_product)"
                ),
            )
        })?),
    };
    Ok(Query {
        entity,
        tag: text("tag"),
        owner: text("owner"),
        text: text("q"),
        include_deprecated: params
            .get("include_deprecated")
            .map(|v| parse_bool("include_deprecated", v))
            .transpose()?
            .unwrap_or(false),
        include_retired: params
            .get("include_retired")
            .map(|v| parse_bool("include_retired", v))
            .transpose()?
            .unwrap_or(false),
    })
}

/// Checks the `{name}` of `GET /v1/features/{name}`.
pub fn check_feature_name(name: &str) -> Result<(), ApiError> {
    if valid_feature_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "InvalidFeature",
            format!(
                "{name:?} is not a feature name (lower-case letters, digits and `_`, starting with a letter, at most 63 characters)"
            ),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Discovery

/// Where a discovery answer comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The registry, asked for this request.
    Registry,
    /// The server's last copy of the registry, because the registry did not answer (see
    /// `warning`).
    Cache,
}

/// One registered feature version, as discovery lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeatureSummary {
    /// Name.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// Major version (the storage address with the name).
    pub major: u64,
    /// What it describes: `user`, `product` or `user_product`.
    pub entity: EntityKind,
    /// Value type: `float`, `int`, `string` or `floatVector`.
    pub value_type: ValueType,
    /// Vector length, for `floatVector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimension: Option<u32>,
    /// What it means.
    pub description: String,
    /// Who answers for it.
    pub owner: String,
    /// Tags.
    pub tags: Vec<String>,
    /// TTL as in the definition (`1d`).
    pub ttl: String,
    /// Served from the online store.
    pub online: bool,
    /// Kept in the offline store.
    pub offline: bool,
    /// `active`, `deprecated` or `retired`.
    pub lifecycle: Lifecycle,
    /// What replaces it, when deprecated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
    /// Whether this server serves this version for its major version (`name@vMAJOR`).
    pub served: bool,
}

impl FeatureSummary {
    /// The summary of `r`; `served` from `catalog`.
    pub fn new(r: &RegisteredFeature, catalog: &FeatureCatalog) -> Self {
        let s = &r.spec;
        Self {
            name: s.name.clone(),
            version: s.version.clone(),
            major: r.major,
            entity: s.entity,
            value_type: s.value_type,
            dimension: s.dimension,
            description: s.description.clone(),
            owner: s.owner.clone(),
            tags: s.tags.clone(),
            ttl: s.ttl.clone(),
            online: s.online,
            offline: s.offline,
            lifecycle: r.lifecycle(),
            replaced_by: r.replaced_by.clone(),
            served: catalog.version(&r.feature_ref()) == Some(s.version.as_str()),
        }
    }
}

/// Answer of `GET /v1/features`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeatureList {
    /// Matching versions, by name then version.
    pub features: Vec<FeatureSummary>,
    /// Where the answer comes from.
    pub source: Source,
    /// Why the answer is not from the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// A materialization run, as discovery shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MaterializationInfo {
    /// The time the values describe (ms since the epoch).
    pub at_ms: i64,
    /// Rows written.
    pub rows: u64,
    /// When the run was recorded (ms since the epoch).
    pub recorded_at_ms: i64,
}

impl From<&Materialization> for MaterializationInfo {
    fn from(m: &Materialization) -> Self {
        Self {
            at_ms: m.at_ms,
            rows: m.rows,
            recorded_at_ms: m.recorded_at_ms,
        }
    }
}

/// One registered version of a feature, in [`FeatureDetail`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionDetail {
    /// Semantic version.
    pub version: String,
    /// Major version.
    pub major: u64,
    /// `active`, `deprecated` or `retired`.
    pub lifecycle: Lifecycle,
    /// When it was registered (ms since the epoch).
    pub registered_at_ms: i64,
    /// When it was deprecated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecated_at_ms: Option<i64>,
    /// When it was retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at_ms: Option<i64>,
    /// What replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
    /// Whether this server serves this version for its major version.
    pub served: bool,
    /// The definition as registered (the `FeatureDefinition` spec, in its camelCase spelling).
    #[schema(value_type = Object)]
    pub spec: FeatureSpec,
}

/// One major version of a feature, in [`FeatureDetail`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MajorDetail {
    /// Major version.
    pub major: u64,
    /// The version served for it (`null`: not served: retired or offline only).
    pub served_version: Option<String>,
    /// TTL of the served version, in milliseconds.
    pub ttl_ms: Option<u64>,
    /// The latest materialization run (`null`: none recorded, or unknown while the registry
    /// does not answer).
    pub last_materialization: Option<MaterializationInfo>,
}

/// Answer of `GET /v1/features/{name}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeatureDetail {
    /// Name.
    pub name: String,
    /// Every registered version, oldest first.
    pub versions: Vec<VersionDetail>,
    /// Every major version, lowest first.
    pub majors: Vec<MajorDetail>,
    /// Where the answer comes from.
    pub source: Source,
    /// Why the answer is not from the registry, or is incomplete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl FeatureDetail {
    /// The detail of one feature's `versions`, with the last materialization of each major
    /// version from `runs`.
    pub fn new(
        name: &str,
        versions: &[RegisteredFeature],
        catalog: &FeatureCatalog,
        runs: &BTreeMap<u64, Materialization>,
        source: Source,
        warning: Option<String>,
    ) -> Self {
        let majors: BTreeSet<u64> = versions.iter().map(|r| r.major).collect();
        Self {
            name: name.to_owned(),
            versions: versions
                .iter()
                .map(|r| VersionDetail {
                    version: r.spec.version.clone(),
                    major: r.major,
                    lifecycle: r.lifecycle(),
                    registered_at_ms: r.registered_at_ms,
                    deprecated_at_ms: r.deprecated_at_ms,
                    retired_at_ms: r.retired_at_ms,
                    replaced_by: r.replaced_by.clone(),
                    served: catalog.version(&r.feature_ref()) == Some(r.spec.version.as_str()),
                    spec: r.spec.clone(),
                })
                .collect(),
            majors: majors
                .into_iter()
                .map(|major| {
                    let f = FeatureRef::new(name, major);
                    MajorDetail {
                        major,
                        served_version: catalog.version(&f).map(str::to_owned),
                        ttl_ms: catalog.ttl(&f).map(|t| t.as_millis() as u64),
                        last_materialization: runs.get(&major).map(MaterializationInfo::from),
                    }
                })
                .collect(),
            source,
            warning,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recsys_core::features::online::{ServedValue, StoreOutcome};

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
        assert_eq!(c.resolve("pop@1").expect("pop@1").feature.major, 1);
        for bad in [
            "pop@",
            "pop@v",
            "pop@x",
            "pop@1.2.0",
            "pop@-1",
            "Pop",
            "a-b",
        ] {
            let err = c.resolve(bad).expect_err(bad);
            assert_eq!(
                (err.status(), err.error.as_str()),
                (400, "InvalidFeature"),
                "{bad}"
            );
            assert!(err.message.contains(bad), "{bad}: {}", err.message);
        }
        let err = c.resolve("pop@v9").expect_err("v9");
        assert!(err.message.contains("served: v1, v2"), "{}", err.message);
        assert_eq!(split_features("pop, emb@v1,,"), vec!["pop", "emb@v1"]);
        let many: Vec<String> = (0..=MAX_FEATURES).map(|_| "pop".to_owned()).collect();
        assert_eq!(c.resolve_all(&many).expect_err("too many").status(), 413);
        let err = c.resolve_all(&["pop", "emb", "nope"]).expect_err("unknown");
        assert_eq!(err.status(), 404);
        assert!(err.message.starts_with("features[2]: "), "{}", err.message);
        assert!(err.message.contains("\"nope\""), "{}", err.message);
        assert!(check_entities(&[]).is_err());
        let err = check_entities(&[EntityKey::user("u"), EntityKey::user("")]).expect_err("empty");
        assert_eq!(err.error, "InvalidEntity");
        assert!(err.message.starts_with("entities[1]"), "{}", err.message);
        let long = EntityKey::user("x".repeat(MAX_ENTITY_ID_LEN + 1));
        assert_eq!(check_entities(&[long]).expect_err("long").status(), 400);
    }

    fn registered(
        name: &str,
        version: &str,
        f: impl FnOnce(&mut FeatureSpec),
    ) -> RegisteredFeature {
        let mut spec: FeatureSpec = serde_json::from_value(serde_json::json!({
            "name": name,
            "entity": "product",
            "version": version,
            "valueType": "float",
            "description": "d",
            "owner": "ranking",
            "tags": ["popularity"],
            "computation": {"job": "popularity", "logic": "l"},
            "ttl": "1h"
        }))
        .expect("spec");
        f(&mut spec);
        RegisteredFeature {
            major: spec.feature_ref().expect("ref").major,
            spec,
            registered_at_ms: 1,
            deprecated_at_ms: None,
            replaced_by: None,
            retired_at_ms: None,
        }
    }

    #[test]
    fn the_catalog_comes_from_the_registry() {
        let retired = |mut r: RegisteredFeature| {
            r.deprecated_at_ms = Some(2);
            r.retired_at_ms = Some(3);
            r
        };
        let deprecated = |mut r: RegisteredFeature| {
            r.deprecated_at_ms = Some(2);
            r.replaced_by = Some("pop".into());
            r
        };
        let records = vec![
            registered("pop", "1.0.0", |_| {}),
            // Same major, newer minor with a longer TTL: it is the one served.
            registered("pop", "1.1.0", |s| s.ttl = "2h".into()),
            registered("pop", "2.0.0", |s| s.ttl = "30m".into()),
            retired(registered("pop", "3.0.0", |_| {})),
            registered("emb", "1.0.0", |s| {
                s.entity = EntityKind::User;
                s.value_type = ValueType::FloatVector;
                s.dimension = Some(4);
            }),
            registered("offline_only", "1.0.0", |s| s.online = false),
            deprecated(registered("old", "1.0.0", |_| {})),
            // An active pre-release beats a deprecated release of the same major.
            deprecated(registered("mixed", "1.0.0", |_| {})),
            registered("mixed", "1.1.0-rc.1", |s| s.ttl = "5m".into()),
        ];
        let c = FeatureCatalog::from_registry(&records);
        let got: Vec<(String, u64, u64)> = c
            .iter()
            .map(|(f, _)| (f.feature.name, f.feature.major, f.ttl.as_secs()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("emb".into(), 1, 3600),
                ("mixed".into(), 1, 300),
                ("old".into(), 1, 3600),
                ("pop".into(), 1, 7200),
                ("pop".into(), 2, 1800),
            ]
        );
        assert_eq!(c.len(), 5);
        assert_eq!(c.version(&FeatureRef::new("pop", 1)), Some("1.1.0"));
        assert_eq!(c.entity(&FeatureRef::new("emb", 1)), Some(EntityKind::User));
        assert!(!c.contains(&FeatureRef::new("pop", 3)), "retired");
        assert!(!c.contains(&FeatureRef::new("offline_only", 1)));
        assert_eq!(c.resolve("pop").expect("pop").feature.major, 2);

        let names = |kind| -> Vec<String> {
            c.features_of(kind)
                .into_iter()
                .map(|f| f.feature.to_string())
                .collect()
        };
        assert_eq!(names(EntityKind::User), vec!["emb@v1"]);
        assert_eq!(
            names(EntityKind::Product),
            vec!["mixed@v1", "old@v1", "pop@v2"]
        );
        assert!(names(EntityKind::UserProduct).is_empty());

        // Entity checks: a product feature is not read for a user.
        let pop = c.resolve("pop").expect("pop");
        let emb = c.resolve("emb").expect("emb");
        assert!(
            c.check_kinds(&[EntityKey::product("p")], std::slice::from_ref(&pop))
                .is_ok()
        );
        let err = c
            .check_kinds(
                &[EntityKey::product("p"), EntityKey::user("u")],
                &[pop.clone(), emb],
            )
            .expect_err("mismatch");
        assert_eq!((err.status(), err.error.as_str()), (400, "EntityMismatch"));
        assert!(
            err.message
                .contains("features[0]: pop@v2 describes products"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("entities[1] is a user"),
            "{}",
            err.message
        );
        // A catalog without entities does not check.
        let plain = FeatureCatalog::new([pop.clone()]);
        assert!(plain.check_kinds(&[EntityKey::user("u")], &[pop]).is_ok());

        // Discovery shapes.
        let summary = FeatureSummary::new(&records[1], &c);
        assert!(summary.served);
        assert!(
            !FeatureSummary::new(&records[0], &c).served,
            "1.1.0 is served for v1"
        );
        let json = serde_json::to_value(&summary).expect("json");
        assert_eq!(json["entity"], "product");
        assert_eq!(json["value_type"], "float");
        assert_eq!(json["lifecycle"], "active");
        let runs = BTreeMap::from([(
            1,
            Materialization {
                feature: FeatureRef::new("pop", 1),
                at_ms: 100,
                rows: 7,
                recorded_at_ms: 101,
            },
        )]);
        let pops: Vec<RegisteredFeature> = records[..4].to_vec();
        let d = FeatureDetail::new("pop", &pops, &c, &runs, Source::Registry, None);
        assert_eq!(d.versions.len(), 4);
        assert_eq!(d.versions[3].lifecycle, Lifecycle::Retired);
        let majors: Vec<(u64, Option<&str>, Option<u64>)> = d
            .majors
            .iter()
            .map(|m| {
                (
                    m.major,
                    m.served_version.as_deref(),
                    m.last_materialization.as_ref().map(|r| r.rows),
                )
            })
            .collect();
        assert_eq!(
            majors,
            vec![
                (1, Some("1.1.0"), Some(7)),
                (2, Some("2.0.0"), None),
                (3, None, None)
            ]
        );
        let json = serde_json::to_value(&d).expect("json");
        assert_eq!(json["source"], "registry");
        assert_eq!(json["versions"][0]["spec"]["valueType"], "float");
        assert!(json.get("warning").is_none());
        let back: FeatureDetail = serde_json::from_value(json).expect("parses");
        assert_eq!(back, d);
    }

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn query_parameters_are_checked() {
        assert_eq!(parse_features_query(&[]).expect("none"), None);
        assert_eq!(
            parse_features_query(&pairs(&[("features", "a, b@2")])).expect("list"),
            Some(vec!["a".to_owned(), "b@2".to_owned()])
        );
        let err = parse_features_query(&pairs(&[("features", " , ")])).expect_err("empty");
        assert!(err.message.starts_with("features:"), "{}", err.message);
        let err = parse_features_query(&pairs(&[("feature", "a")])).expect_err("typo");
        assert_eq!(err.error, "InvalidQuery");
        assert!(err.message.contains("\"feature\""), "{}", err.message);
        let err = parse_features_query(&pairs(&[("features", "a"), ("features", "b")]))
            .expect_err("twice");
        assert!(err.message.contains("more than once"), "{}", err.message);

        let q = parse_discovery_query(&pairs(&[
            ("entity", "user_product"),
            ("tag", "t"),
            ("owner", ""),
            ("q", " Pop "),
            ("include_deprecated", "true"),
        ]))
        .expect("query");
        assert_eq!(q.entity, Some(EntityKind::UserProduct));
        assert_eq!(q.tag.as_deref(), Some("t"));
        assert_eq!(q.owner, None, "empty values are ignored");
        assert_eq!(q.text.as_deref(), Some("Pop"));
        assert!(q.include_deprecated && !q.include_retired);
        assert_eq!(parse_discovery_query(&[]).expect("all"), Query::default());
        let err = parse_discovery_query(&pairs(&[("entity", "users")])).expect_err("kind");
        assert!(
            err.message.starts_with("entity: \"users\""),
            "{}",
            err.message
        );
        let err = parse_discovery_query(&pairs(&[("include_retired", "yes")])).expect_err("bool");
        assert!(
            err.message.starts_with("include_retired"),
            "{}",
            err.message
        );
        assert!(parse_discovery_query(&pairs(&[("name", "x")])).is_err());
        assert!(check_feature_name("pop_1").is_ok());
        assert_eq!(check_feature_name("Pop").expect_err("bad").status(), 400);
        let err = ApiError::from(RegistryError::NotFound {
            name: "x".into(),
            version: "latest".into(),
        });
        assert_eq!(err.status(), 404);
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
