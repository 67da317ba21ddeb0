//! The scorer's feature API over real servers: features registered in the Postgres registry,
//! values in Redis (online) and Postgres (offline), the scorer built from its command line
//! and served on a real socket. Values carry their versions and ages, a stale value says so, a
//! value missing from Redis comes from the offline store marked `fallback` (and so does every
//! value when Redis is down), and discovery finds features by entity, tag and owner.
//!
//! Feature names carry a random suffix: the test database persists across runs.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use clap::Parser as _;
use recsys_core::features::offline::{OfflineRow, OfflineStore, PostgresOfflineStore};
use recsys_core::features::online::{
    OnlineStore, RedisOnlineStore, RedisOnlineStoreOptions, now_ms,
};
use recsys_core::features::registry::{FeatureRegistry, FeatureSpec, PostgresFeatureRegistry};
use recsys_core::features::{EntityKey, EntityKind, FeatureRef, FeatureValue, StoredValue};
use recsys_core::stores::{self, PostgresArgs};
use recsys_tests::{TestEnv, wait_for};
use serde_json::{Value, json};

fn suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{:x}{:x}", std::process::id() & 0xffff, nanos & 0xffffff)
}

fn spec(name: &str, version: &str, entity: &str, ttl: &str, owner: &str, tag: &str) -> FeatureSpec {
    let value_type = if entity == "user" {
        json!({"valueType": "floatVector", "dimension": 2})
    } else {
        json!({"valueType": "float"})
    };
    let mut v = json!({
        "name": name,
        "entity": entity,
        "version": version,
        "description": "feature of the HTTP integration test",
        "owner": owner,
        "tags": [tag, "http-test"],
        "computation": {"job": "popularity", "logic": "test values"},
        "ttl": ttl
    });
    if let (Some(v), Some(t)) = (v.as_object_mut(), value_type.as_object()) {
        v.extend(t.clone());
    }
    serde_json::from_value(v).expect("spec")
}

/// One HTTP/1.1 request: status and JSON body (a string when not JSON).
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    recsys_tests::http_json(addr, method, path, body).await
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let (status, v) = call(addr, "GET", path, None).await?;
    ensure!(status == 200, "GET {path}: {status} {v}");
    Ok(v)
}

/// Starts a scorer from its command line and serves it on 127.0.0.1:0.
async fn serve(args: &[&str]) -> anyhow::Result<(recsys_scorer::Scorer, SocketAddr)> {
    let mut argv = vec!["recsys-scorer"];
    argv.extend_from_slice(args);
    let args = recsys_scorer::Args::try_parse_from(argv)?;
    let scorer = recsys_scorer::start(&args.features).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = scorer.router();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((scorer, addr))
}

fn names(v: &Value) -> Vec<String> {
    v["features"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    format!(
                        "{}@{}",
                        f["name"].as_str().unwrap_or_default(),
                        f["version"].as_str().unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn features_over_http_against_redis_and_postgres() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let db_url = env.var("RECSYS_TEST_DATABASE_URL")?.to_owned();
    let redis_url = env.var("RECSYS_TEST_REDIS_URL")?.to_owned();
    let pool = stores::postgres(&PostgresArgs {
        url: db_url.clone(),
        max_connections: 4,
    })
    .await?;
    let registry = PostgresFeatureRegistry::new(pool.clone());
    registry.migrate().await.context("migrating")?;
    let offline = PostgresOfflineStore::new(pool.clone());

    let sfx = suffix();
    let (pop, emb, gone) = (
        format!("http_pop_{sfx}"),
        format!("http_emb_{sfx}"),
        format!("http_gone_{sfx}"),
    );
    let (team, other_team, tag) = (
        format!("team-{sfx}"),
        format!("other-{sfx}"),
        format!("tag-{sfx}"),
    );
    for s in [
        spec(&pop, "1.0.0", "product", "1h", &team, &tag),
        spec(&pop, "2.0.0", "product", "30s", &team, &tag),
        spec(&emb, "1.0.0", "user", "1h", &other_team, &tag),
        spec(&gone, "1.0.0", "product", "1h", &team, &tag),
    ] {
        registry.register(&s).await?;
    }
    registry.deprecate(&gone, "1.0.0", Some(&pop)).await?;
    registry.retire(&gone, "1.0.0").await?;
    let now = now_ms();
    let (pop1, pop2, emb1) = (
        FeatureRef::new(&pop, 1),
        FeatureRef::new(&pop, 2),
        FeatureRef::new(&emb, 1),
    );
    registry
        .record_materialization(&pop1, now - 60_000, 2)
        .await?;

    // Online: pop v1 fresh and pop v2 stale (35 s old, TTL 30 s, kept until 60 s) for p1, emb for u1. Offline: pop v1 for p1 (older)
    // and p2 (only offline).
    let prefix = format!("fh-{sfx}");
    let redis =
        RedisOnlineStore::connect_lazy(&redis_url, RedisOnlineStoreOptions::with_prefix(&prefix))?;
    let stored = |v, event_time_ms| StoredValue {
        value: v,
        event_time_ms,
        written_at_ms: now,
    };
    let hour = Duration::from_secs(3600);
    redis
        .write_batch(
            &pop1,
            hour,
            &[(
                EntityKey::product("p1"),
                stored(FeatureValue::Float(0.5), now - 1_000),
            )],
        )
        .await?;
    redis
        .write_batch(
            &pop2,
            Duration::from_secs(30),
            &[(
                EntityKey::product("p1"),
                stored(FeatureValue::Float(0.7), now - 35_000),
            )],
        )
        .await?;
    redis
        .write_batch(
            &emb1,
            hour,
            &[(
                EntityKey::user("u1"),
                stored(FeatureValue::FloatVector(vec![1.0, 2.5]), now - 2_000),
            )],
        )
        .await?;
    offline
        .write(
            &pop1,
            EntityKind::Product,
            &[
                OfflineRow::new("p1", FeatureValue::Float(0.4), now - 10_000),
                OfflineRow::new("p2", FeatureValue::Float(0.25), now - 5_000),
            ],
        )
        .await?;

    let outcome = async {
        // Generous budgets: a loaded test machine must not turn reads into fallbacks.
        let common = ["--database-url", &db_url, "--feature-budget", "3s", "--online-timeout", "2s"];
        let mut args = vec!["--redis-url", &redis_url, "--redis-prefix", &prefix];
        args.extend_from_slice(&common);
        let (_scorer, addr) = serve(&args).await?;
        wait_for(Duration::from_secs(20), "scorer ready", || async {
            Ok(call(addr, "GET", "/readyz", None).await?.0 == 200)
        })
        .await?;

        // Values with versions, ages and freshness.
        let v = get(addr, &format!("/v1/features/products/p1?features={pop}@1,{pop}")).await?;
        assert_eq!(v["features"][0], json!({"name": pop, "major": 1, "version": "1.0.0", "ttl_ms": 3_600_000}));
        assert_eq!(v["features"][1], json!({"name": pop, "major": 2, "version": "2.0.0", "ttl_ms": 30_000}));
        assert_eq!(v["rows"][0]["values"], json!([0.5, 0.7]));
        assert_eq!(v["rows"][0]["freshness"], json!(["fresh", "stale"]), "{v}");
        let ages: Vec<i64> = serde_json::from_value(v["rows"][0]["age_ms"].clone())?;
        assert!((1_000..120_000).contains(&ages[0]), "{ages:?}");
        assert!((35_000..60_000).contains(&ages[1]), "{ages:?}");
        assert_eq!(v["store"], "ok");

        // Missing from Redis: the offline value, marked fallback.
        let v = get(addr, &format!("/v1/features/products/p2?features={pop}@v1")).await?;
        assert_eq!(v["rows"][0]["values"], json!([0.25]), "{v}");
        assert_eq!(v["rows"][0]["freshness"], json!(["fallback"]));
        assert!(v["rows"][0]["age_ms"][0].as_i64().is_some_and(|a| a >= 5_000), "{v}");

        // Batch, and a user's features by default.
        let (status, v) = call(
            addr,
            "POST",
            "/v1/features/batch",
            Some(json!({
                "entities": [{"kind": "product", "id": "p1"}, {"kind": "product", "id": "p2"}, {"kind": "product", "id": "p3"}],
                "features": [format!("{pop}@v1")]
            })),
        )
        .await?;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["rows"][0]["values"], json!([0.5]));
        assert_eq!(v["rows"][1]["freshness"], json!(["fallback"]));
        assert_eq!(v["rows"][2]["freshness"], json!(["missing"]));
        let v = get(addr, &format!("/v1/features/users/u1?features={emb}")).await?;
        assert_eq!(v["rows"][0]["values"], json!([[1.0, 2.5]]));

        // Errors name what is wrong.
        let (status, v) = call(addr, "GET", &format!("/v1/features/users/u1?features={pop}"), None).await?;
        assert_eq!((status, v["error"].as_str()), (400, Some("EntityMismatch")), "{v}");
        let (status, v) = call(addr, "GET", &format!("/v1/features/products/p1?features={gone}"), None).await?;
        assert_eq!((status, v["error"].as_str()), (404, Some("UnknownFeature")), "{v}");
        assert!(v["message"].as_str().is_some_and(|m| m.contains(&gone)), "{v}");

        // Discovery by tag, owner and entity; details with the last materialization.
        let v = get(addr, &format!("/v1/features?tag={tag}")).await?;
        assert_eq!(names(&v), [format!("{emb}@1.0.0"), format!("{pop}@1.0.0"), format!("{pop}@2.0.0")]);
        assert_eq!(v["source"], "registry");
        let v = get(addr, &format!("/v1/features?owner={team}")).await?;
        assert_eq!(names(&v), [format!("{pop}@1.0.0"), format!("{pop}@2.0.0")]);
        let v = get(addr, &format!("/v1/features?entity=user&tag={tag}")).await?;
        assert_eq!(names(&v), [format!("{emb}@1.0.0")]);
        let v = get(addr, &format!("/v1/features?owner={team}&include_retired=true&include_deprecated=true&q=gone")).await?;
        assert_eq!(names(&v), [format!("{gone}@1.0.0")]);
        assert_eq!(v["features"][0]["lifecycle"], "retired");
        let v = get(addr, &format!("/v1/features/{pop}")).await?;
        assert_eq!(v["versions"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["majors"][0]["last_materialization"]["rows"], 2);
        assert_eq!(v["majors"][0]["last_materialization"]["at_ms"], now - 60_000);
        assert_eq!(v["majors"][1]["served_version"], "2.0.0");

        // Metrics of what was served.
        let (status, metrics) = call(addr, "GET", "/metrics", None).await?;
        assert_eq!(status, 200);
        let text = metrics.as_str().unwrap_or_default();
        let stale = format!("feature_store_values_total{{feature=\"{pop}\",major=\"2\",freshness=\"stale\"}} 1");
        assert!(text.contains(&stale), "{stale} missing:\n{text}");

        // Redis down: a scorer on the same Postgres serves every value from the offline store.
        let mut down = vec!["--redis-url", "redis://127.0.0.1:1/"];
        down.extend_from_slice(&common);
        let (_down, addr) = serve(&down).await?;
        let v = get(addr, &format!("/v1/features/products/p1?features={pop}@v1")).await?;
        assert_eq!(v["rows"][0]["values"], json!([0.4]), "the latest offline value: {v}");
        assert_eq!(v["rows"][0]["freshness"], json!(["fallback"]));
        assert_ne!(v["store"], "ok");
        let (status, v) = call(addr, "GET", "/readyz", None).await?;
        assert_eq!(status, 200, "degraded, not down: {v}");
        anyhow::Ok(())
    }
    .await;

    redis.clear().await?;
    offline.delete_version(&pop1).await?;
    outcome
}
