//! Router tests: every endpoint and every error, over in-process stores (and, for dependencies
//! that are down, addresses where nothing listens).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use clap::CommandFactory;
use http::Request;
use recsys_core::features::offline::{InProcessOfflineStore, OfflineRow, OfflineStore};
use recsys_core::features::online::{
    InProcessOnlineStore, OnlineStore, RedisOnlineStore, RedisOnlineStoreOptions,
};
use recsys_core::features::registry::{
    FeatureRegistry, FeatureSpec, InProcessFeatureRegistry, Materialization, Query, Registered,
    RegisteredFeature, RegistryError, VersionSelector,
};
use recsys_core::features::{EntityKey, EntityKind, FeatureRef, FeatureValue, StoredValue};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;

#[test]
fn cli_is_well_formed() {
    Args::command().debug_assert();
    let a = Args::try_parse_from([
        "recsys-scorer",
        "--catalog-refresh",
        "1m",
        "--feature-budget",
        "80ms",
    ])
    .expect("parses");
    assert_eq!(a.features.catalog_refresh, Duration::from_secs(60));
    assert_eq!(a.features.feature_budget, Duration::from_millis(80));
    assert_eq!(a.features.data_dir, PathBuf::from(".recsys"));
    assert!(a.features.redis_url.is_none() && a.features.database_url.is_none());
    let err = Args::try_parse_from(["recsys-scorer", "--feature-budget", "fast"])
        .expect_err("bad duration");
    assert!(err.to_string().contains("--feature-budget"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Fixture

fn spec(name: &str, version: &str, entity: &str, ttl: &str) -> FeatureSpec {
    serde_json::from_value(json!({
        "name": name,
        "entity": entity,
        "version": version,
        "valueType": "float",
        "description": format!("{name} for tests"),
        "owner": "ranking",
        "tags": ["popularity"],
        "computation": {"job": "popularity", "logic": "decayed counts"},
        "ttl": ttl
    }))
    .expect("spec")
}

/// A registry that can be taken down.
#[derive(Default)]
struct Flaky {
    inner: InProcessFeatureRegistry,
    down: AtomicBool,
}

impl Flaky {
    fn check(&self) -> Result<(), RegistryError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(RegistryError::Io {
                path: "flaky".into(),
                source: std::io::Error::other("registry down for the test"),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl FeatureRegistry for Flaky {
    async fn register(&self, spec: &FeatureSpec) -> Result<Registered, RegistryError> {
        self.check()?;
        self.inner.register(spec).await
    }
    async fn get(
        &self,
        name: &str,
        selector: &VersionSelector,
    ) -> Result<Option<RegisteredFeature>, RegistryError> {
        self.check()?;
        self.inner.get(name, selector).await
    }
    async fn versions(&self, name: &str) -> Result<Vec<RegisteredFeature>, RegistryError> {
        self.check()?;
        self.inner.versions(name).await
    }
    async fn list(&self) -> Result<Vec<RegisteredFeature>, RegistryError> {
        self.check()?;
        self.inner.list().await
    }
    async fn search(&self, query: &Query) -> Result<Vec<RegisteredFeature>, RegistryError> {
        self.check()?;
        self.inner.search(query).await
    }
    async fn deprecate(
        &self,
        name: &str,
        version: &str,
        replaced_by: Option<&str>,
    ) -> Result<RegisteredFeature, RegistryError> {
        self.check()?;
        self.inner.deprecate(name, version, replaced_by).await
    }
    async fn retire(&self, name: &str, version: &str) -> Result<RegisteredFeature, RegistryError> {
        self.check()?;
        self.inner.retire(name, version).await
    }
    async fn record_materialization(
        &self,
        feature: &FeatureRef,
        at_ms: i64,
        rows: u64,
    ) -> Result<Materialization, RegistryError> {
        self.check()?;
        self.inner
            .record_materialization(feature, at_ms, rows)
            .await
    }
    async fn last_materialization(
        &self,
        feature: &FeatureRef,
    ) -> Result<Option<Materialization>, RegistryError> {
        self.check()?;
        self.inner.last_materialization(feature).await
    }
    async fn materializations(
        &self,
        feature: &FeatureRef,
        limit: usize,
    ) -> Result<Vec<Materialization>, RegistryError> {
        self.check()?;
        self.inner.materializations(feature, limit).await
    }
}

struct Fixture {
    app: Router,
    state: AppState,
    registry: Arc<Flaky>,
    now: i64,
}

async fn register_all(registry: &dyn FeatureRegistry) {
    for s in [
        spec("pop", "1.0.0", "product", "1h"),
        spec("pop", "2.0.0", "product", "10s"),
        spec("gone", "1.0.0", "product", "1h"),
        spec("offline_only", "1.0.0", "product", "1h"),
    ] {
        let mut s = s;
        if s.name == "offline_only" {
            s.online = false;
            s.tags = vec!["batch".into()];
        }
        registry.register(&s).await.expect("register");
    }
    let mut emb = spec("emb", "1.0.0", "user", "1h");
    emb.value_type = recsys_core::features::registry::ValueType::FloatVector;
    emb.dimension = Some(2);
    emb.owner = "personalization".into();
    emb.tags = vec!["embedding".into()];
    registry.register(&emb).await.expect("register");
    registry
        .deprecate("gone", "1.0.0", Some("pop"))
        .await
        .expect("deprecate");
    registry.retire("gone", "1.0.0").await.expect("retire");
}

fn value(v: FeatureValue, event_time_ms: i64) -> StoredValue {
    StoredValue {
        value: v,
        event_time_ms,
        written_at_ms: event_time_ms,
    }
}

/// Registry: pop v1 (1 h), pop v2 (10 s), emb v1 (user vector), gone (retired), offline_only.
/// Online: pop@v1 p1 fresh, pop@v2 p1 stale, emb u1. Offline: pop@v1 p2 (served as fallback).
async fn fixture_with(online: Arc<dyn OnlineStore>, options: ReaderOptions) -> Fixture {
    let registry = Arc::new(Flaky::default());
    register_all(registry.as_ref()).await;
    let now = now_ms();
    registry
        .record_materialization(&FeatureRef::new("pop", 1), now - 60_000, 3)
        .await
        .expect("materialization");
    let h = Duration::from_secs(3600);
    let (pop1, pop2, emb) = (
        FeatureRef::new("pop", 1),
        FeatureRef::new("pop", 2),
        FeatureRef::new("emb", 1),
    );
    // Ignored when the store is down.
    let _ = online
        .write_batch(
            &pop1,
            h,
            &[(
                EntityKey::product("p1"),
                value(FeatureValue::Float(0.5), now - 1_000),
            )],
        )
        .await;
    let _ = online
        .write_batch(
            &pop2,
            Duration::from_secs(10),
            &[(
                EntityKey::product("p1"),
                value(FeatureValue::Float(0.7), now - 15_000),
            )],
        )
        .await;
    let _ = online
        .write_batch(
            &emb,
            h,
            &[(
                EntityKey::user("u1"),
                value(FeatureValue::FloatVector(vec![1.0, 2.5]), now - 2_000),
            )],
        )
        .await;
    let offline = Arc::new(InProcessOfflineStore::new());
    offline
        .write(
            &pop1,
            EntityKind::Product,
            &[OfflineRow::new(
                "p2",
                FeatureValue::Float(0.25),
                now - 5_000,
            )],
        )
        .await
        .expect("offline write");
    let reader = FeatureReader::new(online, Arc::new(OfflineFallback::new(offline)), options);
    let service = Arc::new(
        FeatureService::new(
            Arc::new(reader),
            registry.clone(),
            ServiceOptions::default(),
        )
        .with_description("in-process stores"),
    );
    service.refresh().await.expect("catalog");
    let state = AppState::new(service);
    Fixture {
        app: router(state.clone()),
        state,
        registry,
        now,
    }
}

fn generous() -> ReaderOptions {
    // Far above any in-process latency, so that a loaded test machine does not cut reads.
    ReaderOptions {
        budget: Duration::from_secs(2),
        online_timeout: Duration::from_secs(1),
        ..ReaderOptions::default()
    }
}

async fn fixture() -> Fixture {
    fixture_with(Arc::new(InProcessOnlineStore::new()), generous()).await
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let r = app.clone().oneshot(req).await.expect("call");
    let status = r.status();
    let body = axum::body::to_bytes(r.into_body(), 1 << 22)
        .await
        .expect("body");
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, v)
}

async fn get(app: &Router, uri: &str) -> (StatusCode, Value) {
    send(app, Request::get(uri).body(Body::empty()).expect("request")).await
}

async fn post(app: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    send(
        app,
        Request::post(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request"),
    )
    .await
}

/// Asserts an error answer: status, kind, and words of its message.
fn assert_error(answer: &(StatusCode, Value), status: u16, kind: &str, words: &[&str]) {
    let (s, v) = answer;
    assert_eq!(s.as_u16(), status, "{v}");
    assert_eq!(v["error"], kind, "{v}");
    let message = v["message"].as_str().unwrap_or_default();
    for w in words {
        assert!(message.contains(w), "{w:?} not in {message:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Reads

#[tokio::test]
async fn product_features_with_versions_ages_and_freshness() {
    let f = fixture().await;
    let (s, v) = get(&f.app, "/v1/features/products/p1?features=pop@1,pop").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["entities"], json!([{"kind": "product", "id": "p1"}]));
    assert_eq!(
        v["features"][0],
        json!({"name": "pop", "major": 1, "version": "1.0.0", "ttl_ms": 3_600_000})
    );
    assert_eq!(
        v["features"][1],
        json!({"name": "pop", "major": 2, "version": "2.0.0", "ttl_ms": 10_000})
    );
    assert_eq!(v["rows"][0]["values"], json!([0.5, 0.7]));
    assert_eq!(v["rows"][0]["freshness"], json!(["fresh", "stale"]));
    let ages: Vec<i64> = serde_json::from_value(v["rows"][0]["age_ms"].clone()).expect("ages");
    assert!((1_000..60_000).contains(&ages[0]), "{ages:?}");
    assert!((15_000..60_000).contains(&ages[1]), "{ages:?}");
    assert_eq!(v["store"], "ok");

    // `@v2`, `@2` and the bare name (highest major) are the same column.
    for spec in ["pop@v2", "pop@2", "pop"] {
        let (_, v) = get(&f.app, &format!("/v1/features/products/p1?features={spec}")).await;
        assert_eq!(v["features"][0]["major"], 2, "{spec}: {v}");
    }
}

#[tokio::test]
async fn missing_online_values_come_from_the_offline_store_marked_fallback() {
    let f = fixture().await;
    let (s, v) = get(&f.app, "/v1/features/products/p2?features=pop@v1").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rows"][0]["values"], json!([0.25]));
    assert_eq!(v["rows"][0]["freshness"], json!(["fallback"]));
    assert!(
        v["rows"][0]["age_ms"][0]
            .as_i64()
            .is_some_and(|a| a >= 5_000),
        "{v}"
    );
    // Nowhere: missing, and still 200 (the online store answered).
    let (s, v) = get(&f.app, "/v1/features/products/p3?features=pop@v1").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rows"][0]["values"], json!([null]));
    assert_eq!(v["rows"][0]["freshness"], json!(["missing"]));
    assert_eq!(v["rows"][0]["age_ms"], json!([null]));
}

#[tokio::test]
async fn without_features_every_online_feature_of_the_kind_is_served() {
    let f = fixture().await;
    let (s, v) = get(&f.app, "/v1/features/users/u1").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["features"],
        json!([{"name": "emb", "major": 1, "version": "1.0.0", "ttl_ms": 3_600_000}])
    );
    assert_eq!(v["rows"][0]["values"], json!([[1.0, 2.5]]));
    let (_, v) = get(&f.app, "/v1/features/products/p1").await;
    let names: Vec<String> = v["features"]
        .as_array()
        .expect("features")
        .iter()
        .map(|c| format!("{}@v{}", c["name"].as_str().unwrap_or(""), c["major"]))
        .collect();
    // Highest major of each online, non-retired product feature.
    assert_eq!(names, ["pop@v2"]);
    // An id with characters that need escaping in a path.
    let (s, v) = get(&f.app, "/v1/features/users/a%2Fb%20c").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["entities"][0]["id"], "a/b c");
}

#[tokio::test]
async fn batch_reads_entities_by_features() {
    let f = fixture().await;
    let (s, v) = post(
        &f.app,
        "/v1/features/batch",
        json!({
            "entities": [{"kind": "product", "id": "p1"}, {"kind": "product", "id": "p2"}],
            "features": ["pop@v1", "pop"]
        }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rows"][0]["values"], json!([0.5, 0.7]));
    assert_eq!(v["rows"][1]["values"], json!([0.25, null]));
    assert_eq!(v["rows"][1]["freshness"], json!(["fallback", "missing"]));
    assert!(v["elapsed_us"].as_u64().is_some(), "{v}");
}

#[tokio::test]
async fn bad_reads_are_4xx_naming_what_is_wrong() {
    let f = fixture().await;
    let app = &f.app;
    assert_error(
        &get(app, "/v1/features/products/p1?features=pop,nope").await,
        404,
        "UnknownFeature",
        &["features[1]", "\"nope\""],
    );
    assert_error(
        &get(app, "/v1/features/products/p1?features=pop@v7").await,
        404,
        "UnknownFeature",
        &["pop@v7", "served: v1, v2"],
    );
    assert_error(
        &get(app, "/v1/features/products/p1?features=gone").await,
        404,
        "UnknownFeature",
        &["\"gone\""],
    );
    assert_error(
        &get(app, "/v1/features/products/p1?features=pop@latest").await,
        400,
        "InvalidFeature",
        &["features[0]", "pop@latest"],
    );
    assert_error(
        &get(app, "/v1/features/users/u1?features=pop").await,
        400,
        "EntityMismatch",
        &["pop@v2 describes products", "entities[0] is a user"],
    );
    assert_error(
        &get(app, "/v1/features/products/p1?feature=pop").await,
        400,
        "InvalidQuery",
        &["\"feature\""],
    );
    assert_error(
        &get(app, "/v1/features/products/p1?features=").await,
        400,
        "InvalidQuery",
        &["features"],
    );
    // Batch bodies.
    let batch = |body: Value| post(app, "/v1/features/batch", body);
    assert_error(
        &batch(json!({"entities": [{"kind": "users", "id": "u1"}], "features": ["emb"]})).await,
        400,
        "InvalidRequest",
        &["entities[0].kind", "users"],
    );
    assert_error(
        &batch(json!({"entities": [{"kind": "user", "id": "u1"}]})).await,
        400,
        "InvalidRequest",
        &["features"],
    );
    assert_error(
        &batch(json!({"entities": [], "features": ["emb"]})).await,
        400,
        "InvalidRequest",
        &["entities"],
    );
    assert_error(
        &batch(json!({"entities": [{"kind": "user", "id": "u1"}], "features": []})).await,
        400,
        "InvalidRequest",
        &["features"],
    );
    assert_error(
        &batch(json!({"entities": [{"kind": "user", "id": "u1"}, {"kind": "user", "id": ""}], "features": ["emb"]})).await,
        400,
        "InvalidEntity",
        &["entities[1]"],
    );
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"kind": "user", "id": format!("u{i}")}))
        .collect();
    assert_error(
        &batch(json!({"entities": many, "features": ["emb"]})).await,
        413,
        "RequestTooLarge",
        &["1001 entities"],
    );
    assert_error(
        &batch(json!({
            "entities": [{"kind": "user", "id": "u1"}, {"kind": "product", "id": "p1"}],
            "features": ["emb"]
        }))
        .await,
        400,
        "EntityMismatch",
        &["entities[1] is a product"],
    );
    let not_json = send(
        app,
        Request::post("/v1/features/batch")
            .header("content-type", "application/json")
            .body(Body::from("{"))
            .expect("request"),
    )
    .await;
    assert_error(&not_json, 400, "InvalidRequest", &["request body"]);
    let no_type = send(
        app,
        Request::post("/v1/features/batch")
            .body(Body::from("{}"))
            .expect("request"),
    )
    .await;
    assert_error(&no_type, 415, "UnsupportedMediaType", &["Content-Type"]);
    // Routes.
    assert_error(
        &get(app, "/v2/nothing").await,
        404,
        "NotFound",
        &["GET /v2/nothing"],
    );
    assert_error(
        &get(app, "/v1/features/batch").await,
        405,
        "MethodNotAllowed",
        &["GET"],
    );
}

#[tokio::test]
async fn reads_answer_503_only_when_nothing_can_be_served() {
    // A catalog never loaded: 503 naming the registry's error.
    let registry = Arc::new(Flaky::default());
    registry.down.store(true, Ordering::SeqCst);
    let reader = FeatureReader::new(
        Arc::new(InProcessOnlineStore::new()),
        Arc::new(OfflineFallback::new(Arc::new(InProcessOfflineStore::new()))),
        generous(),
    );
    let service = Arc::new(FeatureService::new(
        Arc::new(reader),
        registry.clone(),
        ServiceOptions::default(),
    ));
    let err = service.refresh().await.expect_err("down");
    assert_eq!(err.kind(), "RegistryIo");
    let app = router(AppState::new(service.clone()));
    assert_error(
        &get(&app, "/v1/features/users/u1").await,
        503,
        "CatalogUnavailable",
        &["registry down for the test"],
    );
    assert_error(
        &get(&app, "/readyz").await,
        503,
        "NotReady",
        &["feature_catalog", "registry down for the test"],
    );
    assert_error(
        &get(&app, "/v1/features").await,
        503,
        "RegistryUnavailable",
        &[],
    );
    // Up again: the next refresh loads it.
    registry.down.store(false, Ordering::SeqCst);
    register_all(registry.as_ref()).await;
    assert_eq!(service.refresh().await.expect("up"), 3);
    let (s, _) = get(&app, "/readyz").await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = get(&app, "/v1/features/users/u1").await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn redis_down_serves_the_offline_fallback_and_503_when_it_has_nothing() {
    // Nothing listens on port 1: every online read fails at once.
    let down = RedisOnlineStore::connect_lazy(
        "redis://127.0.0.1:1/",
        RedisOnlineStoreOptions::with_prefix("down"),
    )
    .expect("lazy");
    let options = ReaderOptions {
        budget: Duration::from_secs(2),
        online_timeout: Duration::from_millis(300),
        ..ReaderOptions::default()
    };
    let f = fixture_with(Arc::new(down), options).await;
    let (s, v) = get(&f.app, "/v1/features/products/p2?features=pop@v1").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rows"][0]["values"], json!([0.25]));
    assert_eq!(v["rows"][0]["freshness"], json!(["fallback"]));
    assert_ne!(v["store"], "ok", "{v}");
    assert_error(
        &get(&f.app, "/v1/features/products/p9?features=pop@v1").await,
        503,
        "FeaturesUnavailable",
        &["fallback had none of the 1 values"],
    );
    // Still ready (degraded), and /readyz says what is failing.
    for _ in 0..3 {
        let _ = get(&f.app, "/v1/features/products/p2?features=pop@v1").await;
    }
    let (s, v) = get(&f.app, "/readyz").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["checks"]["online_store"]["ok"], false, "{v}");
    assert_eq!(v["checks"]["online_store"]["required"], false, "{v}");
    let (_, metrics) = get(&f.app, "/metrics").await;
    let text = metrics.as_str().unwrap_or_default();
    assert!(
        text.contains("feature_store_fallback_requests_total{outcome=\"ok\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn the_last_catalog_keeps_serving_when_the_registry_fails() {
    let f = fixture().await;
    f.registry.down.store(true, Ordering::SeqCst);
    assert!(f.state.features().refresh().await.is_err());
    assert!(f.state.features().refresh().await.is_err());
    let (s, v) = get(&f.app, "/v1/features/products/p1?features=pop@v1").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let status = f.state.features().catalog_status();
    assert_eq!(status.consecutive_failures, 2);
    assert_eq!(status.features, 3);
    let (s, v) = get(&f.app, "/readyz").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let message = v["checks"]["feature_catalog"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("the last 2 refreshes failed"), "{message}");
    let (_, metrics) = get(&f.app, "/metrics").await;
    let text = metrics.as_str().unwrap_or_default();
    assert!(
        text.contains(
            "recsys_scorer_feature_catalog_refresh_failures_total{kind=\"RegistryIo\"} 2"
        ),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Discovery

fn names(v: &Value) -> Vec<String> {
    v["features"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    format!(
                        "{}@{}",
                        f["name"].as_str().unwrap_or(""),
                        f["version"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn discovery_by_entity_tag_owner_and_text() {
    let f = fixture().await;
    let app = &f.app;
    let (s, v) = get(app, "/v1/features").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["source"], "registry");
    assert_eq!(
        names(&v),
        ["emb@1.0.0", "offline_only@1.0.0", "pop@1.0.0", "pop@2.0.0"],
        "retired versions are left out unless asked for"
    );
    let pop2 = &v["features"][3];
    assert_eq!(pop2["entity"], "product");
    assert_eq!(pop2["ttl"], "10s");
    assert_eq!(pop2["lifecycle"], "active");
    assert_eq!(pop2["served"], true);
    assert_eq!(v["features"][1]["served"], false, "offline only");
    let (_, v) = get(app, "/v1/features?entity=user").await;
    assert_eq!(names(&v), ["emb@1.0.0"]);
    let (_, v) = get(app, "/v1/features?tag=embedding").await;
    assert_eq!(names(&v), ["emb@1.0.0"]);
    let (_, v) = get(app, "/v1/features?owner=ranking&entity=product&q=POP").await;
    assert_eq!(names(&v), ["pop@1.0.0", "pop@2.0.0"]);
    let (_, v) = get(app, "/v1/features?include_retired=true&q=gone").await;
    assert_eq!(names(&v), ["gone@1.0.0"]);
    assert_eq!(v["features"][0]["lifecycle"], "retired");
    assert_eq!(v["features"][0]["replaced_by"], "pop");
    assert_error(
        &get(app, "/v1/features?entity=users").await,
        400,
        "InvalidQuery",
        &["entity", "\"users\""],
    );
    assert_error(
        &get(app, "/v1/features?team=x").await,
        400,
        "InvalidQuery",
        &["\"team\""],
    );

    // The registry down: the last list answers, marked as such.
    f.registry.down.store(true, Ordering::SeqCst);
    let (s, v) = get(app, "/v1/features?entity=user").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["source"], "cache");
    assert_eq!(names(&v), ["emb@1.0.0"]);
    assert!(
        v["warning"]
            .as_str()
            .is_some_and(|w| w.contains("registry down")),
        "{v}"
    );
}

#[tokio::test]
async fn a_feature_shows_its_versions_lifecycle_and_last_materialization() {
    let f = fixture().await;
    let app = &f.app;
    let (s, v) = get(app, "/v1/features/pop").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "pop");
    assert_eq!(v["versions"][0]["version"], "1.0.0");
    assert_eq!(v["versions"][0]["lifecycle"], "active");
    assert_eq!(v["versions"][0]["spec"]["ttl"], "1h");
    assert_eq!(v["versions"][1]["served"], true);
    assert_eq!(v["majors"][0]["major"], 1);
    assert_eq!(v["majors"][0]["served_version"], "1.0.0");
    assert_eq!(v["majors"][0]["ttl_ms"], 3_600_000);
    assert_eq!(v["majors"][0]["last_materialization"]["rows"], 3);
    assert_eq!(
        v["majors"][0]["last_materialization"]["at_ms"],
        f.now - 60_000
    );
    assert_eq!(v["majors"][1]["last_materialization"], Value::Null);
    let (_, v) = get(app, "/v1/features/gone").await;
    assert_eq!(v["versions"][0]["lifecycle"], "retired");
    assert_eq!(v["majors"][0]["served_version"], Value::Null);
    assert_error(
        &get(app, "/v1/features/nope").await,
        404,
        "FeatureNotFound",
        &["\"nope\""],
    );
    assert_error(
        &get(app, "/v1/features/No-Such").await,
        400,
        "InvalidFeature",
        &["No-Such"],
    );
    f.registry.down.store(true, Ordering::SeqCst);
    let (s, v) = get(app, "/v1/features/pop").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["source"], "cache");
    assert_eq!(v["versions"].as_array().map(Vec::len), Some(2));
}

// ---------------------------------------------------------------------------------------------
// Probes and metrics

#[tokio::test]
async fn probes_and_metrics() {
    let f = fixture().await;
    let (s, v) = get(&f.app, "/readyz").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "ready");
    assert_eq!(v["checks"]["feature_catalog"]["ok"], true);
    assert_eq!(v["checks"]["feature_catalog"]["required"], true);
    assert_eq!(
        v["checks"]["model"]["required"], false,
        "no model needed yet"
    );
    assert_eq!(v["checks"]["online_store"]["ok"], true);
    assert_eq!(v["stores"], "in-process stores");
    let (s, _) = get(&f.app, "/healthz").await;
    assert_eq!(s, StatusCode::OK);
    let _ = get(&f.app, "/v1/features/products/p1?features=pop").await;
    let _ = get(&f.app, "/v1/features/products/p1?features=nope").await;
    f.state.features().refresh_online_stats().await;
    let r = f
        .app
        .clone()
        .oneshot(
            Request::get("/metrics")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("call");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()[header::CONTENT_TYPE]
            .to_str()
            .is_ok_and(|t| t.starts_with("application/openmetrics-text"))
    );
    let body = axum::body::to_bytes(r.into_body(), 1 << 22)
        .await
        .expect("body");
    let text = String::from_utf8_lossy(&body);
    for needle in [
        "feature_store_requests_total{outcome=\"ok\"} 1",
        "feature_store_values_total{feature=\"pop\",major=\"2\",freshness=\"stale\"} 1",
        "feature_store_fetch_duration_seconds_count{stage=\"total\"} 1",
        "feature_store_keys{feature=\"pop\",major=\"1\"} 1",
        "recsys_scorer_feature_catalog_features 3",
        "recsys_scorer_http_requests_total{route=\"/v1/features/products/{id}\",method=\"GET\",status=\"200\"} 1",
        "recsys_scorer_http_requests_total{route=\"/v1/features/products/{id}\",method=\"GET\",status=\"404\"} 1",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    assert!(
        !text.contains("route=\"/readyz\""),
        "probes are not counted"
    );
}

// ---------------------------------------------------------------------------------------------
// Start-up from the options

fn local_args(dir: &std::path::Path) -> FeatureArgs {
    Args::try_parse_from([
        "recsys-scorer",
        "--data-dir",
        dir.to_str().expect("utf-8 path"),
    ])
    .expect("args")
    .features
}

#[tokio::test]
async fn local_mode_serves_what_a_local_job_wrote_and_picks_up_new_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = stores::LocalPaths::new(dir.path());
    // "The trainer": the registry and offline files of local mode.
    let registry = InProcessFeatureRegistry::open(&paths.registry).expect("registry");
    registry
        .register(&spec("pop", "1.0.0", "product", "1h"))
        .await
        .expect("register");
    let offline = InProcessOfflineStore::open(&paths.offline).expect("offline");
    let now = now_ms();
    offline
        .write(
            &FeatureRef::new("pop", 1),
            EntityKind::Product,
            &[OfflineRow::new("p1", FeatureValue::Float(0.9), now - 1_000)],
        )
        .await
        .expect("write");

    let scorer = start(&local_args(dir.path())).await.expect("start");
    let app = scorer.router();
    let (s, v) = get(&app, "/readyz").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v["stores"]
            .as_str()
            .is_some_and(|d| d.contains("local mode")),
        "{v}"
    );
    // Warmed into the in-process online store: fresh, not a fallback.
    let (s, v) = get(&app, "/v1/features/products/p1").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rows"][0]["values"], json!([0.9]));
    assert_eq!(v["rows"][0]["freshness"], json!(["fresh"]));

    // A new feature and value written while the scorer runs: served after a refresh.
    registry
        .register(&spec("trend", "1.0.0", "product", "1h"))
        .await
        .expect("register");
    offline
        .write(
            &FeatureRef::new("trend", 1),
            EntityKind::Product,
            &[OfflineRow::new("p1", FeatureValue::Float(0.1), now)],
        )
        .await
        .expect("write");
    scorer.state().features().refresh().await.expect("refresh");
    let (s, v) = get(&app, "/v1/features/products/p1?features=trend").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rows"][0]["values"], json!([0.1]));
    assert_eq!(v["rows"][0]["freshness"], json!(["fresh"]));
}

#[tokio::test]
async fn dependencies_down_at_start_do_not_stop_the_scorer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = local_args(dir.path());
    // Nothing listens on port 1.
    args.database_url = Some("postgres://recsys:secret@127.0.0.1:1/recsys".into());
    args.redis_url = Some("redis://127.0.0.1:1/".into());
    args.registry_timeout = Duration::from_secs(3);
    let scorer = start(&args).await.expect("starts anyway");
    let app = scorer.router();
    let (s, v) = get(&app, "/readyz").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "NotReady");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(message.contains("feature_catalog"), "{message}");
    assert!(!v.to_string().contains("secret"), "password leaked: {v}");
    assert_error(
        &get(&app, "/v1/features/users/u1").await,
        503,
        "CatalogUnavailable",
        &[],
    );
    let (s, _) = get(&app, "/healthz").await;
    assert_eq!(s, StatusCode::OK);

    let mut bad = local_args(dir.path());
    bad.catalog_refresh = Duration::ZERO;
    let err = start(&bad).await.err().expect("zero interval");
    assert_eq!(err.kind(), "InvalidOption");
    assert!(err.to_string().contains("--catalog-refresh"), "{err}");
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let f = fixture().await;
    let (s, v) = get(&f.app, "/openapi.json").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v["openapi"].as_str().is_some_and(|o| o.starts_with("3.")),
        "{v}"
    );
    assert_eq!(v["info"]["version"], env!("CARGO_PKG_VERSION"));
    for (path, method) in [
        ("/v1/recommendations", "get"),
        ("/v1/scores", "post"),
        ("/v1/events", "post"),
        ("/v1/features", "get"),
        ("/v1/features/batch", "post"),
        ("/v1/features/users/{id}", "get"),
        ("/v1/features/products/{id}", "get"),
        ("/v1/features/{name}", "get"),
        ("/readyz", "get"),
    ] {
        assert!(
            v["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    for schema in [
        "Answer",
        "Item",
        "ScoresRequest",
        "BatchRequest",
        "BatchResponse",
        "FeatureList",
        "ApiError",
        "PlainValue",
    ] {
        assert!(
            v["components"]["schemas"][schema].is_object(),
            "schema {schema} missing"
        );
    }
    // The recommendation path names its closed set of values.
    let paths = &v["components"]["schemas"]["Path"]["enum"];
    assert_eq!(
        paths,
        &json!(["cf", "fold_in", "blend", "popularity", "content"]),
        "{paths}"
    );
}
