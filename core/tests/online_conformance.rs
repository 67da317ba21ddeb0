//! Conformance of the online-store seam: one suite, run against the in-process store, against
//! the real Redis of the test environment, and against Redis with the near cache on (`bash
//! tests/run` or `tests/env/up.sh` starts it; the Redis runs fail without it). Each Redis run
//! uses a key prefix of its own and removes every key under it afterwards. After the suite,
//! the near cache's own guarantees against the real Redis: a value written by another
//! connection is seen within a bounded time (the invalidation push), one written through the
//! same store at once, and concurrent writers never leave a stale value cached.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use recsys_core::features::online::{
    FeatureReader, InProcessOnlineStore, MemoryFallback, NearCacheOptions, NoFallback,
    OnlineFeature, OnlineMetrics, OnlineStore, ReaderOptions, RedisOnlineStore,
    RedisOnlineStoreOptions, StoreOutcome, now_ms,
};
use recsys_core::features::{EntityKey, FeatureRef, FeatureValue, Freshness, StoredValue};
use recsys_core::stores::{self, RedisArgs};
use recsys_tests::{TestEnv, wait_for};

// ---------------------------------------------------------------------------------------------
// Harness

const HOUR: Duration = Duration::from_secs(3600);

fn in_process() -> Arc<dyn OnlineStore> {
    Arc::new(InProcessOnlineStore::new())
}

/// A raw connection to the test environment's Redis.
async fn redis_conn() -> anyhow::Result<redis::aio::ConnectionManager> {
    let env = TestEnv::load()?;
    let url = env.var("RECSYS_TEST_REDIS_URL")?.to_owned();
    Ok(stores::redis(&RedisArgs { url }).await?)
}

/// The test environment's Redis URL.
fn redis_url() -> anyhow::Result<String> {
    Ok(TestEnv::load()?.var("RECSYS_TEST_REDIS_URL")?.to_owned())
}

/// A Redis store with a near cache, on a connection of its own.
fn cached_store(prefix: &str, cache: NearCacheOptions) -> anyhow::Result<RedisOnlineStore> {
    Ok(RedisOnlineStore::connect_lazy(
        &redis_url()?,
        RedisOnlineStoreOptions {
            near_cache: Some(cache),
            ..RedisOnlineStoreOptions::with_prefix(prefix)
        },
    )?)
}

fn unique_prefix(tag: &str) -> String {
    recsys_tests::unique_redis_prefix("online", tag)
}

async fn keys_under(
    conn: &mut redis::aio::ConnectionManager,
    prefix: &str,
) -> anyhow::Result<Vec<Vec<u8>>> {
    recsys_tests::redis_keys_under(conn, prefix).await
}

/// Runs `suite` against `store` in its own task, then (for Redis) deletes every key under the
/// run's prefix, even when the suite failed, and reports the suite's outcome.
async fn run<F, Fut>(
    store: Arc<dyn OnlineStore>,
    redis_prefix: Option<&str>,
    suite: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Arc<dyn OnlineStore>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let outcome = tokio::spawn(suite(store)).await;
    if let Some(prefix) = redis_prefix {
        let mut conn = redis_conn().await?;
        let keys = keys_under(&mut conn, prefix).await?;
        if !keys.is_empty() {
            let _: u64 = redis::cmd("UNLINK")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .context("clean-up")?;
        }
        ensure!(
            keys_under(&mut conn, prefix).await?.is_empty(),
            "clean-up left keys"
        );
    }
    match outcome {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(e.into()),
    }
}

macro_rules! conformance {
    ($($suite:ident),* $(,)?) => {
        mod in_process {
            $(
                #[tokio::test]
                async fn $suite() -> anyhow::Result<()> {
                    super::run(super::in_process(), None, super::$suite).await
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test]
                async fn $suite() -> anyhow::Result<()> {
                    let prefix = super::unique_prefix(stringify!($suite));
                    let conn = super::redis_conn().await?;
                    let store = super::RedisOnlineStore::new(
                        conn,
                        super::RedisOnlineStoreOptions::with_prefix(prefix.clone()),
                    )?;
                    super::run(std::sync::Arc::new(store), Some(&prefix), super::$suite).await
                }
            )*
        }
        mod redis_near_cache {
            $(
                #[tokio::test]
                async fn $suite() -> anyhow::Result<()> {
                    let prefix = super::unique_prefix(concat!("nc-", stringify!($suite)));
                    let store = super::cached_store(&prefix, super::NearCacheOptions::default())?;
                    super::run(std::sync::Arc::new(store), Some(&prefix), super::$suite).await
                }
            )*
        }
    };
}

conformance!(
    round_trip_of_every_value_type,
    missing_values_are_none,
    stale_within_retention_then_gone,
    values_past_retention_are_not_written,
    batch_of_100_entities_by_50_features,
    invalidation_per_entity_and_per_feature_version,
    major_versions_side_by_side,
    overwrites_follow_event_time_then_write_time,
    stats_count_keys_and_bytes,
    names_that_cannot_be_keys_are_refused,
    reader_marks_freshness_and_fills_gaps_from_the_fallback,
);

fn at(value: FeatureValue, event_time_ms: i64, written_at_ms: i64) -> StoredValue {
    StoredValue {
        value,
        event_time_ms,
        written_at_ms,
    }
}

/// The features with a TTL of an hour.
fn of(features: &[FeatureRef]) -> Vec<OnlineFeature> {
    features
        .iter()
        .map(|f| OnlineFeature::new(f.clone(), HOUR))
        .collect()
}

fn fresh(value: FeatureValue) -> StoredValue {
    let now = now_ms();
    at(value, now, now)
}

// ---------------------------------------------------------------------------------------------
// The suite

async fn round_trip_of_every_value_type(store: Arc<dyn OnlineStore>) -> anyhow::Result<()> {
    let entities = vec![
        EntityKey::user("u-1"),
        EntityKey::product("P:42/ü"),
        EntityKey::user_product("u-1", "P:42"),
    ];
    let features = [
        (FeatureRef::new("f_float", 1), FeatureValue::Float(0.125)),
        (FeatureRef::new("f_int", 1), FeatureValue::Int(-7)),
        (
            FeatureRef::new("f_string", 1),
            FeatureValue::String("électroménager".into()),
        ),
        (
            FeatureRef::new("f_vector", 1),
            FeatureValue::FloatVector(vec![0.5, -1.25, 3.0e-3]),
        ),
    ];
    let mut expected = Vec::new();
    for (i, (f, v)) in features.iter().enumerate() {
        let values: Vec<_> = entities
            .iter()
            .enumerate()
            .map(|(e, entity)| {
                let now = now_ms();
                (
                    entity.clone(),
                    at(v.clone(), now - (i * 10 + e) as i64, now),
                )
            })
            .collect();
        let report = store.write_batch(f, HOUR, &values).await?;
        ensure!(report.written == 3, "{f}: {report:?}");
        expected.push(values);
    }
    let refs: Vec<_> = features.iter().map(|(f, _)| f.clone()).collect();
    let m = store.read_batch(&entities, &of(&refs)).await?;
    ensure!(m.entities() == 3 && m.features() == 4);
    ensure!(m.corrupt.is_empty());
    for (f, values) in expected.iter().enumerate() {
        for (e, (_, v)) in values.iter().enumerate() {
            assert_eq!(m.get(e, f), Some(v), "entity {e} feature {f}");
        }
    }
    Ok(())
}

async fn missing_values_are_none(store: Arc<dyn OnlineStore>) -> anyhow::Result<()> {
    let f = FeatureRef::new("sparse", 1);
    store
        .write_batch(
            &f,
            HOUR,
            &[(EntityKey::user("a"), fresh(FeatureValue::Int(1)))],
        )
        .await?;
    let entities = [
        EntityKey::user("a"),
        EntityKey::user("b"),
        EntityKey::product("a"),
    ];
    let features = [
        f.clone(),
        FeatureRef::new("never_written", 1),
        FeatureRef::new("sparse", 2),
    ];
    let m = store.read_batch(&entities, &of(&features)).await?;
    for e in 0..3 {
        for g in 0..3 {
            assert_eq!(m.get(e, g).is_some(), e == 0 && g == 0, "cell {e},{g}");
        }
    }
    // Empty requests are fine.
    ensure!(store.read_batch(&[], &of(&features)).await?.entities() == 0);
    ensure!(store.read_batch(&entities, &[]).await?.features() == 0);
    Ok(())
}

async fn stale_within_retention_then_gone(store: Arc<dyn OnlineStore>) -> anyhow::Result<()> {
    let ttl = Duration::from_millis(600);
    let f = FeatureRef::new("short_lived", 1);
    let spec = [OnlineFeature::new(f.clone(), ttl)];
    let now = now_ms();
    let young = EntityKey::user("young");
    let old = EntityKey::user("old");
    store
        .write_batch(
            &f,
            ttl,
            &[
                (young.clone(), at(FeatureValue::Float(1.0), now, now)),
                // Older than the TTL, within retention (2 × TTL): stale at once.
                (old.clone(), at(FeatureValue::Float(2.0), now - 900, now)),
            ],
        )
        .await?;
    let reader = FeatureReader::new(
        store.clone(),
        Arc::new(NoFallback),
        ReaderOptions::default(),
    );
    let b = reader.read(&[young.clone(), old.clone()], &spec).await?;
    assert_eq!(b.store, StoreOutcome::Ok);
    assert_eq!(b.get(0, 0).freshness, Freshness::Fresh, "{:?}", b.get(0, 0));
    assert_eq!(b.get(1, 0).freshness, Freshness::Stale, "{:?}", b.get(1, 0));
    assert_eq!(b.get(1, 0).value, Some(FeatureValue::Float(2.0)));
    ensure!(b.get(1, 0).age_ms.context("age")? >= 900);
    assert_eq!(b.get(1, 0).major, 1);
    // The young value turns stale (never silently missing at the TTL) ...
    let started = Instant::now();
    wait_for(Duration::from_secs(5), "young value stale", || async {
        let b = reader.read(std::slice::from_ref(&young), &spec).await?;
        let v = b.get(0, 0);
        ensure!(
            v.freshness != Freshness::Missing || started.elapsed() > ttl,
            "missing at the TTL"
        );
        Ok(v.freshness == Freshness::Stale)
    })
    .await?;
    // ... and both are eventually gone (retention = 2 × TTL).
    wait_for(
        Duration::from_secs(10),
        "values removed after retention",
        || async {
            let m = store
                .read_batch(&[young.clone(), old.clone()], &spec)
                .await?;
            Ok(m.get(0, 0).is_none() && m.get(1, 0).is_none())
        },
    )
    .await?;
    let b = reader.read(&[young, old], &spec).await?;
    ensure!(b.count(Freshness::Missing) == 2);
    Ok(())
}

async fn values_past_retention_are_not_written(store: Arc<dyn OnlineStore>) -> anyhow::Result<()> {
    let f = FeatureRef::new("backfilled", 1);
    let now = now_ms();
    let report = store
        .write_batch(
            &f,
            Duration::from_secs(10),
            &[
                (
                    EntityKey::product("p1"),
                    at(FeatureValue::Int(1), now - 25_000, now),
                ),
                (
                    EntityKey::product("p2"),
                    at(FeatureValue::Int(2), now - 15_000, now),
                ),
            ],
        )
        .await?;
    assert_eq!((report.written, report.expired), (1, 1), "{report:?}");
    let m = store
        .read_batch(
            &[EntityKey::product("p1"), EntityKey::product("p2")],
            &[OnlineFeature::new(f, Duration::from_secs(10))],
        )
        .await?;
    ensure!(m.get(0, 0).is_none() && m.get(1, 0).is_some());
    // A TTL of zero makes no sense.
    let err = store
        .write_batch(&FeatureRef::new("x", 1), Duration::ZERO, &[])
        .await
        .expect_err("zero TTL");
    assert_eq!(err.kind(), "InvalidArgument");
    Ok(())
}

async fn batch_of_100_entities_by_50_features(store: Arc<dyn OnlineStore>) -> anyhow::Result<()> {
    let entities: Vec<_> = (0..100).map(|i| EntityKey::user(format!("u{i}"))).collect();
    let features: Vec<_> = (0..50)
        .map(|j| FeatureRef::new(format!("f{j:02}"), 1))
        .collect();
    let now = now_ms();
    for (j, f) in features.iter().enumerate() {
        let values: Vec<_> = entities
            .iter()
            .enumerate()
            // Every fifth entity lacks every seventh feature.
            .filter(|(i, _)| !(i % 5 == 0 && j % 7 == 0))
            .map(|(i, e)| {
                (
                    e.clone(),
                    at(FeatureValue::Float((i * 1000 + j) as f64), now, now),
                )
            })
            .collect();
        store.write_batch(f, HOUR, &values).await?;
    }
    let m = store.read_batch(&entities, &of(&features)).await?;
    ensure!(m.entities() == 100 && m.features() == 50);
    for i in 0..100 {
        for j in 0..50 {
            let got = m.get(i, j).map(|v| v.value.clone());
            let want =
                (!(i % 5 == 0 && j % 7 == 0)).then(|| FeatureValue::Float((i * 1000 + j) as f64));
            assert_eq!(got, want, "entity {i} feature {j}");
        }
    }
    Ok(())
}

async fn invalidation_per_entity_and_per_feature_version(
    store: Arc<dyn OnlineStore>,
) -> anyhow::Result<()> {
    let a1 = FeatureRef::new("a", 1);
    let a2 = FeatureRef::new("a", 2);
    let b1 = FeatureRef::new("b", 1);
    let few: Vec<_> = (0..3).map(|i| EntityKey::user(format!("e{i}"))).collect();
    for f in [&a1, &a2, &b1] {
        let values: Vec<_> = few
            .iter()
            .map(|e| (e.clone(), fresh(FeatureValue::Int(1))))
            .collect();
        store.write_batch(f, HOUR, &values).await?;
    }
    let all = [a1.clone(), a2.clone(), b1.clone()];
    // Per entity: only the features named, only that entity.
    let n = store
        .invalidate_entity(
            &few[0],
            &[a1.clone(), b1.clone(), FeatureRef::new("zzz", 1)],
        )
        .await?;
    assert_eq!(n, 2);
    let m = store.read_batch(&few, &of(&all)).await?;
    let present = |e: usize, f: usize| m.get(e, f).is_some();
    ensure!(
        !present(0, 0) && present(0, 1) && !present(0, 2),
        "entity 0"
    );
    ensure!(
        (1..3).all(|e| (0..3).all(|f| present(e, f))),
        "others untouched"
    );
    // Per feature version: a@v1 goes, a@v2 and b@v1 stay.
    assert_eq!(store.invalidate_feature(&a1).await?, 2);
    let m = store.read_batch(&few, &of(&all)).await?;
    ensure!((0..3).all(|e| m.get(e, 0).is_none() && m.get(e, 1).is_some()));
    ensure!((1..3).all(|e| m.get(e, 2).is_some()));
    assert_eq!(store.invalidate_feature(&a1).await?, 0);
    // Many keys: Redis pages through SCAN.
    let many: Vec<_> = (0..2500)
        .map(|i| {
            (
                EntityKey::product(format!("p{i}")),
                fresh(FeatureValue::Float(i as f64)),
            )
        })
        .collect();
    let big = FeatureRef::new("big", 3);
    assert_eq!(store.write_batch(&big, HOUR, &many).await?.written, 2500);
    assert_eq!(store.invalidate_feature(&big).await?, 2500);
    let m = store
        .read_batch(&[EntityKey::product("p7")], &of(&[big, a2]))
        .await?;
    ensure!(m.get(0, 0).is_none());
    Ok(())
}

async fn major_versions_side_by_side(store: Arc<dyn OnlineStore>) -> anyhow::Result<()> {
    let e = EntityKey::product("p1");
    let v1 = FeatureRef::new("popularity_score", 1);
    let v2 = FeatureRef::new("popularity_score", 2);
    store
        .write_batch(&v1, HOUR, &[(e.clone(), fresh(FeatureValue::Int(10)))])
        .await?;
    store
        .write_batch(
            &v2,
            Duration::from_secs(60),
            &[(e.clone(), fresh(FeatureValue::Float(0.1)))],
        )
        .await?;
    let reader = FeatureReader::new(
        store.clone(),
        Arc::new(NoFallback),
        ReaderOptions::default(),
    );
    let b = reader
        .read(
            std::slice::from_ref(&e),
            &[
                OnlineFeature::new(v1, HOUR),
                OnlineFeature::new(v2, Duration::from_secs(60)),
            ],
        )
        .await?;
    assert_eq!((b.get(0, 0).major, b.get(0, 1).major), (1, 2));
    assert_eq!(b.get(0, 0).value, Some(FeatureValue::Int(10)));
    assert_eq!(b.get(0, 1).value, Some(FeatureValue::Float(0.1)));
    ensure!(b.count(Freshness::Fresh) == 2);
    Ok(())
}

async fn overwrites_follow_event_time_then_write_time(
    store: Arc<dyn OnlineStore>,
) -> anyhow::Result<()> {
    let f = FeatureRef::new("overwritten", 1);
    let e = EntityKey::user("u");
    let t = now_ms() - 60_000;
    let read = || async {
        let m = store
            .read_batch(std::slice::from_ref(&e), &of(std::slice::from_ref(&f)))
            .await?;
        anyhow::Ok(m.get(0, 0).cloned().context("value present")?)
    };
    let write = |v: StoredValue| {
        let store = store.clone();
        let (f, e) = (f.clone(), e.clone());
        async move { store.write_batch(&f, HOUR, &[(e, v)]).await }
    };
    write(at(FeatureValue::Int(1), t, t + 1)).await?;
    // Same event time, newer write: replaces (a recomputation).
    let r = write(at(FeatureValue::Int(2), t, t + 2)).await?;
    assert_eq!((r.written, r.kept_newer), (1, 0));
    assert_eq!(read().await?.value, FeatureValue::Int(2));
    // Same event time, older write: ignored.
    let r = write(at(FeatureValue::Int(3), t, t + 1)).await?;
    assert_eq!((r.written, r.kept_newer), (0, 1));
    // Older event time, however new the write: ignored (a late backfill cannot go back in time).
    let r = write(at(FeatureValue::Int(4), t - 1000, t + 999_999)).await?;
    assert_eq!((r.written, r.kept_newer), (0, 1));
    assert_eq!(read().await?, at(FeatureValue::Int(2), t, t + 2));
    // Newer event time: replaces, whatever the write time.
    write(at(FeatureValue::Int(5), t + 10, t)).await?;
    assert_eq!(read().await?.value, FeatureValue::Int(5));
    // An identical rewrite is accepted (idempotent jobs).
    let r = write(at(FeatureValue::Int(5), t + 10, t)).await?;
    assert_eq!(r.written, 1);
    // On purpose: invalidate, then an older value may be written.
    store
        .invalidate_entity(&e, std::slice::from_ref(&f))
        .await?;
    write(at(FeatureValue::Int(6), t - 1000, t)).await?;
    assert_eq!(read().await?.value, FeatureValue::Int(6));
    Ok(())
}

async fn stats_count_keys_and_bytes(store: Arc<dyn OnlineStore>) -> anyhow::Result<()> {
    let f = FeatureRef::new("counted", 1);
    let g = FeatureRef::new("embedding", 2);
    let values: Vec<_> = (0..120)
        .map(|i| {
            (
                EntityKey::user(format!("u{i}")),
                fresh(FeatureValue::Float(i as f64)),
            )
        })
        .collect();
    store.write_batch(&f, HOUR, &values).await?;
    let vectors: Vec<_> = (0..30)
        .map(|i| {
            (
                EntityKey::product(format!("p{i}")),
                fresh(FeatureValue::FloatVector(vec![0.5; 64])),
            )
        })
        .collect();
    store.write_batch(&g, HOUR, &vectors).await?;
    let stats = store.stats().await?;
    let sf = stats.feature(&f).context("stats of f")?;
    let sg = stats.feature(&g).context("stats of g")?;
    assert_eq!((sf.keys, sg.keys), (120, 30));
    assert_eq!(stats.keys(), 150);
    // A value is at least its encoding; a 64-float vector is bigger than a float.
    ensure!(sf.bytes >= 120 * 26, "{sf:?}");
    ensure!(sg.bytes / 30 > sf.bytes / 120 + 200, "{sg:?} vs {sf:?}");
    // Published as gauges through a reader.
    let metrics = OnlineMetrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let reader = FeatureReader::new(
        store.clone(),
        Arc::new(NoFallback),
        ReaderOptions::default(),
    )
    .with_metrics(metrics);
    reader.refresh_stats().await?;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    ensure!(
        text.contains(r#"feature_store_keys{feature="counted",major="1"} 120"#),
        "{text}"
    );
    store.invalidate_feature(&f).await?;
    store.invalidate_feature(&g).await?;
    ensure!(store.stats().await?.keys() == 0);
    Ok(())
}

async fn names_that_cannot_be_keys_are_refused(store: Arc<dyn OnlineStore>) -> anyhow::Result<()> {
    let bad = FeatureRef::new("Bad*Name", 1);
    let e = EntityKey::user("u");
    let write = store
        .write_batch(&bad, HOUR, &[(e.clone(), fresh(FeatureValue::Int(1)))])
        .await;
    assert_eq!(write.expect_err("write").kind(), "InvalidName");
    let read = store
        .read_batch(std::slice::from_ref(&e), &of(std::slice::from_ref(&bad)))
        .await;
    assert_eq!(read.expect_err("read").kind(), "InvalidName");
    assert_eq!(
        store
            .invalidate_feature(&bad)
            .await
            .expect_err("inv")
            .kind(),
        "InvalidName"
    );
    let empty_id = store
        .write_batch(
            &FeatureRef::new("ok", 1),
            HOUR,
            &[(EntityKey::user(""), fresh(FeatureValue::Int(1)))],
        )
        .await;
    assert_eq!(empty_id.expect_err("empty id").kind(), "InvalidName");
    Ok(())
}

async fn reader_marks_freshness_and_fills_gaps_from_the_fallback(
    store: Arc<dyn OnlineStore>,
) -> anyhow::Result<()> {
    let ttl = Duration::from_secs(60);
    let f = FeatureRef::new("user_category_affinity", 1);
    let g = FeatureRef::new("freshness_score", 1);
    let now = now_ms();
    let (u1, u2, u3) = (
        EntityKey::user("1"),
        EntityKey::user("2"),
        EntityKey::user("3"),
    );
    store
        .write_batch(
            &f,
            ttl,
            &[
                (u1.clone(), at(FeatureValue::Float(0.9), now, now)),
                (u2.clone(), at(FeatureValue::Float(0.8), now - 90_000, now)),
            ],
        )
        .await?;
    let fallback = Arc::new(MemoryFallback::new());
    fallback.insert(
        f.clone(),
        u3.clone(),
        at(FeatureValue::Float(0.1), now - 5_000, now),
    );
    // The fallback is not asked for what the store has.
    fallback.insert(
        f.clone(),
        u1.clone(),
        at(FeatureValue::Float(-1.0), now, now),
    );
    let metrics = OnlineMetrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let reader = FeatureReader::new(store.clone(), fallback.clone(), ReaderOptions::default())
        .with_metrics(metrics);
    let spec = [
        OnlineFeature::new(f.clone(), ttl),
        OnlineFeature::new(g.clone(), ttl),
    ];
    let b = reader.read(&[u1, u2, u3], &spec).await?;
    assert_eq!(b.store, StoreOutcome::Ok);
    let cell = |e, f| (b.get(e, f).freshness, b.get(e, f).value.clone());
    assert_eq!(
        cell(0, 0),
        (Freshness::Fresh, Some(FeatureValue::Float(0.9)))
    );
    assert_eq!(
        cell(1, 0),
        (Freshness::Stale, Some(FeatureValue::Float(0.8)))
    );
    assert_eq!(
        cell(2, 0),
        (Freshness::Fallback, Some(FeatureValue::Float(0.1)))
    );
    ensure!(b.get(2, 0).age_ms.context("age")? >= 5_000);
    for e in 0..3 {
        assert_eq!(cell(e, 1), (Freshness::Missing, None));
    }
    assert_eq!(fallback.calls(), 1);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    for line in [
        r#"feature_store_values_total{feature="user_category_affinity",major="1",freshness="fresh"} 1"#,
        r#"feature_store_values_total{feature="user_category_affinity",major="1",freshness="stale"} 1"#,
        r#"feature_store_values_total{feature="user_category_affinity",major="1",freshness="fallback"} 1"#,
        r#"feature_store_values_total{feature="freshness_score",major="1",freshness="missing"} 3"#,
        r#"feature_store_requests_total{outcome="ok"} 1"#,
        r#"feature_store_fallback_requests_total{outcome="ok"} 1"#,
        r#"feature_store_online_reads_total{outcome="ok"} 1"#,
    ] {
        ensure!(text.contains(line), "missing {line} in\n{text}");
    }
    // Bounds.
    let too_many: Vec<_> = (0..1001).map(|i| EntityKey::user(format!("{i}"))).collect();
    let spec100: Vec<_> = (0..100)
        .map(|j| OnlineFeature::new(FeatureRef::new(format!("x{j}"), 1), ttl))
        .collect();
    let err = reader
        .read(&too_many, &spec100)
        .await
        .expect_err("too large");
    assert_eq!(err.kind(), "RequestTooLarge");
    Ok(())
}

#[tokio::test]
async fn redis_clear_removes_everything_under_the_prefix_only() -> anyhow::Result<()> {
    let prefix = unique_prefix("clear");
    let other = unique_prefix("clear-other");
    let mk = |p: &str, stats_sample: usize| {
        let p = p.to_owned();
        async move {
            anyhow::Ok(RedisOnlineStore::new(
                redis_conn().await?,
                RedisOnlineStoreOptions {
                    stats_sample,
                    ..RedisOnlineStoreOptions::with_prefix(p)
                },
            )?)
        }
    };
    let (a, b) = (mk(&prefix, 1000).await?, mk(&other, 1000).await?);
    let b_exact = mk(&other, 10_000).await?;
    let values: Vec<_> = (0..1500)
        .map(|i| {
            (
                EntityKey::user(format!("u{i}")),
                fresh(FeatureValue::Int(i)),
            )
        })
        .collect();
    let outcome = async {
        for s in [&a, &b] {
            s.write_batch(&FeatureRef::new("x", 1), HOUR, &values)
                .await?;
            s.write_batch(&FeatureRef::new("y", 2), HOUR, &values[..10])
                .await?;
        }
        // 1,500 entity hashes holding 1,510 values.
        let cleared = a.clear().await?;
        let left_in_a = a.stats().await?.keys();
        let exact = b_exact.stats().await?;
        // Beyond `stats_sample` hashes per kind, figures are scaled from the sample.
        let estimated = b.stats().await?;
        anyhow::Ok((cleared, left_in_a, exact, estimated))
    }
    .await;
    let cleared_b = b.clear().await?;
    a.clear().await?;
    let (cleared, left_in_a, exact, estimated) = outcome?;
    assert_eq!((cleared, left_in_a, cleared_b), (1500, 0, 1500));
    assert_eq!(exact.keys(), 1510);
    let x = exact.feature(&FeatureRef::new("x", 1)).context("x")?;
    assert_eq!(x.keys, 1500);
    let est = estimated.feature(&FeatureRef::new("x", 1)).context("x")?;
    assert_eq!(est.keys, 1500, "every sampled hash has x");
    ensure!(
        est.bytes.abs_diff(x.bytes) * 10 < x.bytes,
        "estimate {est:?} vs {x:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The near cache against the real Redis

/// Polls `read` every millisecond until `done` holds for what it returns; how long it took.
async fn poll_until<T, E, F, Fut>(
    limit: Duration,
    what: &str,
    mut read: F,
    done: impl Fn(&T) -> bool,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    anyhow::Error: From<E>,
{
    let started = Instant::now();
    loop {
        if done(&read().await?) {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < limit,
            "{what}: not seen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn cell(
    m: &recsys_core::features::online::ValueMatrix,
    e: usize,
    f: usize,
) -> Option<FeatureValue> {
    m.get(e, f).map(|v| v.value.clone())
}

#[tokio::test]
async fn near_cache_sees_another_writer_within_bounded_time_and_its_own_writes_at_once()
-> anyhow::Result<()> {
    let prefix = unique_prefix("nc-writers");
    let cached = Arc::new(cached_store(&prefix, NearCacheOptions::default())?);
    // Another connection, as a trainer job in another process writes.
    let other = RedisOnlineStore::new(
        redis_conn().await?,
        RedisOnlineStoreOptions::with_prefix(prefix.clone()),
    )?;
    let c = cached.clone();
    run(cached.clone(), Some(&prefix), move |_| async move {
        let (f, g) = (FeatureRef::new("score", 1), FeatureRef::new("rank", 1));
        let (u1, u2) = (EntityKey::user("u1"), EntityKey::user("u2"));
        let spec = of(&[f.clone(), g.clone()]);
        let t = now_ms();
        other
            .write_batch(
                &f,
                HOUR,
                &[(u1.clone(), at(FeatureValue::Float(1.0), t, t))],
            )
            .await?;
        let entities = [u1.clone(), u2.clone()];
        let read = || c.read_batch(&entities, &spec);
        let m = read().await?;
        assert_eq!(cell(&m, 0, 0), Some(FeatureValue::Float(1.0)));
        ensure!(cell(&m, 0, 1).is_none() && cell(&m, 1, 0).is_none());
        // Served from memory the second time: two hits, no new miss.
        let m = read().await?;
        assert_eq!(cell(&m, 0, 0), Some(FeatureValue::Float(1.0)));
        let stats = c.near_cache_stats().context("cache on")?;
        assert_eq!(
            (stats.hits, stats.misses, stats.entries),
            (2, 2, 2),
            "{stats:?}"
        );

        // Another connection overwrites a cached value: Redis pushes an invalidation.
        other
            .write_batch(
                &f,
                HOUR,
                &[(u1.clone(), at(FeatureValue::Float(2.0), t + 1, t + 1))],
            )
            .await?;
        let overwrite = poll_until(
            Duration::from_secs(2),
            "overwrite by another connection",
            read,
            |m| cell(m, 0, 0) == Some(FeatureValue::Float(2.0)),
        )
        .await?;
        // A value absent when cached (an entity never written at all, too) appears.
        other
            .write_batch(&g, HOUR, &[(u2.clone(), at(FeatureValue::Int(7), t, t))])
            .await?;
        let new_key = poll_until(
            Duration::from_secs(2),
            "value of a key absent when cached",
            read,
            |m| cell(m, 1, 1) == Some(FeatureValue::Int(7)),
        )
        .await?;
        // Deletion by another connection.
        other
            .invalidate_entity(&u1, std::slice::from_ref(&f))
            .await?;
        poll_until(
            Duration::from_secs(2),
            "deletion by another connection",
            read,
            |m| cell(m, 0, 0).is_none(),
        )
        .await?;
        let stats = c.near_cache_stats().context("cache on")?;
        ensure!(stats.push_invalidations >= 3, "{stats:?}");
        println!("near cache: overwrite seen after {overwrite:?}, new key after {new_key:?}");

        // Through the same store: visible on the very next read.
        read().await?;
        c.write_batch(
            &f,
            HOUR,
            &[(u1.clone(), at(FeatureValue::Float(3.0), t + 2, t + 2))],
        )
        .await?;
        assert_eq!(cell(&read().await?, 0, 0), Some(FeatureValue::Float(3.0)));
        c.invalidate_entity(&u2, std::slice::from_ref(&g)).await?;
        assert_eq!(cell(&read().await?, 1, 1), None);
        read().await?;
        c.invalidate_feature(&f).await?;
        let m = read().await?;
        ensure!(cell(&m, 0, 0).is_none() && cell(&m, 1, 0).is_none());
        let stats = c.near_cache_stats().context("cache on")?;
        ensure!(
            stats.local_invalidations >= 2 && stats.flushes >= 1,
            "{stats:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_cache_never_keeps_a_stale_value_under_concurrent_writes() -> anyhow::Result<()> {
    let prefix = unique_prefix("nc-race");
    let cached = Arc::new(cached_store(&prefix, NearCacheOptions::default())?);
    let other = Arc::new(RedisOnlineStore::new(
        redis_conn().await?,
        RedisOnlineStoreOptions::with_prefix(prefix.clone()),
    )?);
    let c = cached.clone();
    run(cached.clone(), Some(&prefix), move |_| async move {
        let f = FeatureRef::new("counter", 1);
        let entities: Vec<_> = (0..20).map(|i| EntityKey::user(format!("u{i}"))).collect();
        let spec = of(std::slice::from_ref(&f));
        let base = now_ms() - 10_000;
        // A writer on another connection bumps every entity 200 times while two readers read
        // through the cache (one all entities, one a sliding half: partial hits) until it is
        // done.
        let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let writer = {
            let (other, f, entities, writing) =
                (other.clone(), f.clone(), entities.clone(), writing.clone());
            tokio::spawn(async move {
                for n in 1..=200i64 {
                    let values: Vec<_> = entities
                        .iter()
                        .map(|e| (e.clone(), at(FeatureValue::Int(n), base + n, base + n)))
                        .collect();
                    other.write_batch(&f, HOUR, &values).await?;
                }
                writing.store(false, std::sync::atomic::Ordering::Release);
                anyhow::Ok(())
            })
        };
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let (c, entities, spec, writing) =
                    (c.clone(), entities.clone(), spec.clone(), writing.clone());
                tokio::spawn(async move {
                    let mut reads = 0usize;
                    let mut seen_values = std::collections::BTreeSet::new();
                    let mut last = vec![0i64; entities.len()];
                    while writing.load(std::sync::atomic::Ordering::Acquire) {
                        let (from, to) = if r == 0 {
                            (0, entities.len())
                        } else {
                            let from = reads % (entities.len() / 2);
                            (from, from + entities.len() / 2)
                        };
                        let m = c.read_batch(&entities[from..to], &spec).await?;
                        for (i, seen) in last[from..to].iter_mut().enumerate() {
                            if let Some(FeatureValue::Int(n)) = cell(&m, i, 0) {
                                // One reader never goes back in time.
                                ensure!(n >= *seen, "entity {}: {n} after {seen}", from + i);
                                *seen = n;
                                seen_values.insert(n);
                            }
                        }
                        reads += 1;
                        // Cached reads complete without waiting: let the writer run.
                        tokio::task::yield_now().await;
                    }
                    anyhow::Ok((reads, seen_values.len()))
                })
            })
            .collect();
        writer.await??;
        let mut reads = 0;
        for r in readers {
            let (n, distinct) = r.await??;
            // The readers ran alongside the writer and saw it progress.
            ensure!(
                distinct > 1,
                "a reader saw only {distinct} distinct values in {n} reads"
            );
            reads += n;
        }
        // Once the writer is done, the last value is served everywhere, and stays.
        let took = poll_until(
            Duration::from_secs(2),
            "last write",
            || c.read_batch(&entities, &spec),
            |m| (0..entities.len()).all(|e| cell(m, e, 0) == Some(FeatureValue::Int(200))),
        )
        .await?;
        for _ in 0..20 {
            let m = c.read_batch(&entities, &spec).await?;
            ensure!((0..entities.len()).all(|e| cell(&m, e, 0) == Some(FeatureValue::Int(200))));
        }
        let stats = c.near_cache_stats().context("cache on")?;
        ensure!(stats.hits > 0 && stats.push_invalidations > 0, "{stats:?}");
        println!("{reads} concurrent reads; last write seen after {took:?}; {stats:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn near_cache_is_bounded_counted_and_published() -> anyhow::Result<()> {
    let prefix = unique_prefix("nc-bounds");
    let cached = Arc::new(cached_store(
        &prefix,
        NearCacheOptions {
            max_entries: 10,
            ..NearCacheOptions::default()
        },
    )?);
    let c = cached.clone();
    run(cached.clone(), Some(&prefix), move |store| async move {
        let f = FeatureRef::new("bounded", 1);
        let entities: Vec<_> = (0..50)
            .map(|i| EntityKey::product(format!("p{i}")))
            .collect();
        let values: Vec<_> = entities
            .iter()
            .enumerate()
            .map(|(i, e)| (e.clone(), fresh(FeatureValue::Int(i as i64))))
            .collect();
        store.write_batch(&f, HOUR, &values).await?;
        let metrics = OnlineMetrics::new();
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let reader = FeatureReader::new(
            store.clone(),
            Arc::new(NoFallback),
            ReaderOptions::default(),
        )
        .with_metrics(metrics);
        let spec = of(std::slice::from_ref(&f));
        for _ in 0..3 {
            let b = reader.read(&entities, &spec).await?;
            for (i, row) in b.rows().enumerate() {
                assert_eq!(
                    row[0].value,
                    Some(FeatureValue::Int(i as i64)),
                    "entity {i}"
                );
                assert_eq!(row[0].freshness, Freshness::Fresh);
            }
        }
        // Twice the same 5 entities: hits.
        for _ in 0..2 {
            reader.read(&entities[..5], &spec).await?;
        }
        let stats = c.near_cache_stats().context("cache on")?;
        ensure!(stats.entries <= 10 && stats.evictions >= 40, "{stats:?}");
        ensure!(
            stats.hits >= 5 && stats.hits + stats.misses == 160,
            "{stats:?}"
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        for line in [
            format!(
                r#"feature_store_near_cache_lookups_total{{result="hit"}} {}"#,
                stats.hits
            ),
            format!(
                r#"feature_store_near_cache_lookups_total{{result="miss"}} {}"#,
                stats.misses
            ),
            format!("feature_store_near_cache_entries {}", stats.entries),
            r#"feature_store_near_cache_evictions_total{reason="capacity"}"#.to_owned(),
        ] {
            ensure!(text.contains(&line), "missing {line} in\n{text}");
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_near_cache_needs_its_own_connection_and_sane_bounds() -> anyhow::Result<()> {
    let err = RedisOnlineStore::new(
        redis_conn().await?,
        RedisOnlineStoreOptions {
            near_cache: Some(NearCacheOptions::default()),
            ..RedisOnlineStoreOptions::default()
        },
    )
    .expect_err("refused");
    assert_eq!(err.kind(), "InvalidArgument");
    ensure!(err.to_string().contains("connect_lazy"), "{err}");
    let err = RedisOnlineStore::connect_lazy(
        &redis_url()?,
        RedisOnlineStoreOptions {
            near_cache: Some(NearCacheOptions::with_entries(0)),
            ..RedisOnlineStoreOptions::default()
        },
    )
    .expect_err("refused");
    assert_eq!(err.kind(), "InvalidArgument");
    ensure!(err.to_string().contains("max_entries (0)"), "{err}");
    Ok(())
}
