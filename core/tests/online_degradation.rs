//! Serving with Redis down or slow: a redis-server of the test's own (the shared one of the
//! test environment keeps running for the other tests) is killed, restarted, frozen and
//! thawed under a reader. Reads keep answering within their budget with fallback values, say
//! so value by value, and recover when Redis does. With the near cache on, a restarted Redis
//! never leaves a stale cached value behind, and a read sends Redis only the entities not
//! cached. Needs `redis-server` on `PATH` (the test environment installs it) and fails
//! without it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use recsys_core::features::online::{
    FeatureBatch, FeatureReader, MemoryFallback, NearCacheOptions, OnlineFeature, OnlineMetrics,
    OnlineStore, ReaderOptions, RedisOnlineStore, RedisOnlineStoreOptions, StoreOutcome, now_ms,
};
use recsys_core::features::{EntityKey, FeatureRef, FeatureValue, Freshness, StoredValue};
use recsys_tests::{metric, wait_for};

use recsys_tests::OwnRedis;

const ENTITIES: usize = 10;
const FEATURES: usize = 5;

fn entities() -> Vec<EntityKey> {
    (0..ENTITIES)
        .map(|i| EntityKey::user(format!("u{i}")))
        .collect()
}

fn features() -> Vec<OnlineFeature> {
    (0..FEATURES)
        .map(|j| {
            OnlineFeature::new(
                FeatureRef::new(format!("f{j}"), 1),
                Duration::from_secs(3600),
            )
        })
        .collect()
}

async fn load(store: &dyn OnlineStore) -> anyhow::Result<()> {
    load_shifted(store, 0.0).await
}

/// Writes every cell as `i * 10 + j + shift`.
async fn load_shifted(store: &dyn OnlineStore, shift: f64) -> anyhow::Result<()> {
    let now = now_ms();
    for (j, f) in features().iter().enumerate() {
        let values: Vec<_> = entities()
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    e,
                    StoredValue {
                        value: FeatureValue::Float((i * 10 + j) as f64 + shift),
                        event_time_ms: now,
                        written_at_ms: now,
                    },
                )
            })
            .collect();
        store.write_batch(&f.feature, f.ttl, &values).await?;
    }
    Ok(())
}

/// The fallback knows every cell, with negative values to tell them apart.
fn fallback() -> Arc<MemoryFallback> {
    let fb = MemoryFallback::new();
    let now = now_ms();
    for (j, f) in features().iter().enumerate() {
        for (i, e) in entities().into_iter().enumerate() {
            fb.insert(
                f.feature.clone(),
                e,
                StoredValue {
                    value: FeatureValue::Float(-((i * 10 + j) as f64)),
                    event_time_ms: now - 60_000,
                    written_at_ms: now - 60_000,
                },
            );
        }
    }
    Arc::new(fb)
}

fn options() -> ReaderOptions {
    ReaderOptions {
        budget: Duration::from_millis(150),
        online_timeout: Duration::from_millis(60),
        failure_threshold: 2,
        cooldown: Duration::from_millis(200),
        max_cooldown: Duration::from_secs(1),
        ..ReaderOptions::default()
    }
}

/// Slack over the budget for scheduling on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(100);

fn all_from_store(b: &FeatureBatch) -> anyhow::Result<()> {
    ensure!(b.store == StoreOutcome::Ok, "store outcome {:?}", b.store);
    for e in 0..ENTITIES {
        for f in 0..FEATURES {
            let v = b.get(e, f);
            ensure!(
                v.freshness == Freshness::Fresh
                    && v.value == Some(FeatureValue::Float((e * 10 + f) as f64)),
                "cell {e},{f}: {v:?}"
            );
        }
    }
    Ok(())
}

fn all_from_fallback(b: &FeatureBatch) -> anyhow::Result<()> {
    ensure!(
        b.store != StoreOutcome::Ok,
        "store answered during the outage"
    );
    for e in 0..ENTITIES {
        for f in 0..FEATURES {
            let v = b.get(e, f);
            ensure!(
                v.freshness == Freshness::Fallback
                    && v.value == Some(FeatureValue::Float(-((e * 10 + f) as f64)))
                    && v.age_ms.is_some_and(|a| a >= 60_000)
                    && v.major == 1,
                "cell {e},{f}: {v:?}"
            );
        }
    }
    Ok(())
}

/// Reads `n` times during an outage; every read within budget + slack, all values fallbacks.
async fn reads_during_outage(
    reader: &FeatureReader,
    n: usize,
) -> anyhow::Result<Vec<(StoreOutcome, Duration)>> {
    let (es, fs) = (entities(), features());
    let budget = reader.options().budget;
    let mut seen = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        let b = reader.read(&es, &fs).await?;
        let took = started.elapsed();
        ensure!(
            took < budget + SLACK,
            "a read took {took:?}, budget {budget:?}"
        );
        all_from_fallback(&b)?;
        seen.push((b.store, took));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_degrade_to_the_fallback_within_budget_and_recover() -> anyhow::Result<()> {
    let port = OwnRedis::free_port()?;
    let mut server = OwnRedis::start(port).await?;
    let store = Arc::new(RedisOnlineStore::connect_lazy(
        &server.url(),
        RedisOnlineStoreOptions::with_prefix("deg"),
    )?);
    load(store.as_ref()).await?;
    let fb = fallback();
    let metrics = OnlineMetrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let reader = FeatureReader::new(store.clone(), fb.clone(), options()).with_metrics(metrics);
    let (es, fs) = (entities(), features());

    // Healthy: everything from Redis, the fallback untouched.
    all_from_store(&reader.read(&es, &fs).await?)?;
    assert_eq!(fb.calls(), 0);

    // Down: killed mid-run.
    server.kill()?;
    let seen = reads_during_outage(&reader, 25).await?;
    ensure!(
        seen.iter().any(|(o, _)| *o == StoreOutcome::CircuitOpen),
        "the circuit never opened: {seen:?}"
    );
    ensure!(reader.circuit_open(), "circuit should be open while down");
    // With the circuit open, a read costs the fallback only, not the online timeout.
    let skipped: Vec<_> = seen
        .iter()
        .filter(|(o, _)| *o == StoreOutcome::CircuitOpen)
        .map(|(_, t)| *t)
        .collect();
    let fastest = skipped.iter().min().copied().unwrap_or_default();
    ensure!(
        fastest < Duration::from_millis(30),
        "skipped reads still slow: {skipped:?}"
    );

    // Back on the same port (empty: no persistence). Writes and reads recover.
    let server = OwnRedis::start(port).await?;
    wait_for(Duration::from_secs(15), "writes after restart", || async {
        Ok(load(store.as_ref()).await.is_ok())
    })
    .await?;
    wait_for(
        Duration::from_secs(15),
        "reads served by Redis again",
        || async {
            let b = reader.read(&es, &fs).await?;
            Ok(all_from_store(&b).is_ok())
        },
    )
    .await?;
    ensure!(!reader.circuit_open());

    // One pipeline per read, one HMGET per entity, never a command per value.
    let mut conn = redis::Client::open(server.url().as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await?;
    all_from_store(&reader.read(&es, &fs).await?)?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    let calls = |cmd: &str| -> u64 {
        info.lines()
            .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(calls("hmget"), ENTITIES as u64, "{info}");
    for cmd in ["get", "hget", "mget", "hgetall"] {
        assert_eq!(calls(cmd), 0, "{cmd}: {info}");
    }

    // Slow: frozen (SIGSTOP) — the online read times out within its share of the budget.
    server.signal("-STOP")?;
    let seen = reads_during_outage(&reader, 10).await;
    server.signal("-CONT")?;
    let seen = seen?;
    ensure!(
        seen.iter().any(|(o, _)| *o == StoreOutcome::Timeout),
        "no read timed out: {seen:?}"
    );
    wait_for(
        Duration::from_secs(15),
        "reads served after thawing",
        || async {
            let b = reader.read(&es, &fs).await?;
            Ok(all_from_store(&b).is_ok())
        },
    )
    .await?;

    // What the metrics say.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    for (line, at_least) in [
        (
            r#"feature_store_online_reads_total{outcome="skipped"}"#,
            1.0,
        ),
        (r#"feature_store_online_reads_total{outcome="error"}"#, 1.0),
        (
            r#"feature_store_online_reads_total{outcome="timeout"}"#,
            1.0,
        ),
        (r#"feature_store_requests_total{outcome="degraded"}"#, 35.0),
        (
            r#"feature_store_fallback_requests_total{outcome="ok"}"#,
            35.0,
        ),
        (
            r#"feature_store_values_total{feature="f0",major="1",freshness="fallback"}"#,
            350.0,
        ),
        (r#"feature_store_errors_total{kind="Timeout"}"#, 1.0),
    ] {
        let v = metric(&text, line);
        ensure!(v >= at_least, "{line} = {v}, expected ≥ {at_least}\n{text}");
    }
    ensure!(metric(&text, "feature_store_circuit_open") == 0.0, "{text}");
    Ok(())
}

#[tokio::test]
async fn a_store_down_at_start_serves_from_the_fallback() -> anyhow::Result<()> {
    // Nothing listens on this port: the lazy connection never succeeds.
    let port = OwnRedis::free_port()?;
    let store = RedisOnlineStore::connect_lazy(
        &format!("redis://127.0.0.1:{port}/"),
        RedisOnlineStoreOptions::default(),
    )?;
    let reader = FeatureReader::new(Arc::new(store), fallback(), options());
    let seen = reads_during_outage(&reader, 5).await?;
    if !seen.iter().all(|(o, _)| *o != StoreOutcome::Ok) {
        bail!("{seen:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_slow_fallback_is_cut_at_the_budget() -> anyhow::Result<()> {
    let port = OwnRedis::free_port()?;
    let store = RedisOnlineStore::connect_lazy(
        &format!("redis://127.0.0.1:{port}/"),
        RedisOnlineStoreOptions::default(),
    )?;
    let slow = Arc::new(MemoryFallback::new().with_delay(Duration::from_secs(5)));
    let reader = FeatureReader::new(Arc::new(store), slow, options());
    let started = Instant::now();
    let b = reader.read(&entities(), &features()).await?;
    ensure!(started.elapsed() < options().budget + SLACK);
    ensure!(b.count(Freshness::Missing) == ENTITIES * FEATURES);
    // A failing fallback: missing values, no error.
    let failing = Arc::new(MemoryFallback::new().failing());
    let store = RedisOnlineStore::connect_lazy(
        &format!("redis://127.0.0.1:{port}/"),
        RedisOnlineStoreOptions::default(),
    )?;
    let reader = FeatureReader::new(Arc::new(store), failing, options());
    let b = reader.read(&entities(), &features()).await?;
    ensure!(b.count(Freshness::Missing) == ENTITIES * FEATURES);
    Ok(())
}

/// `INFO commandstats` calls of `cmd` (`hmget`, `client|tracking`) since the last reset.
async fn calls(conn: &mut redis::aio::MultiplexedConnection, cmd: &str) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    Ok(info
        .lines()
        .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

fn cached_options(prefix: &str) -> RedisOnlineStoreOptions {
    RedisOnlineStoreOptions {
        near_cache: Some(NearCacheOptions::default()),
        ..RedisOnlineStoreOptions::with_prefix(prefix)
    }
}

fn values_shifted(b: &FeatureBatch, shift: f64) -> anyhow::Result<()> {
    ensure!(b.store == StoreOutcome::Ok, "store outcome {:?}", b.store);
    for e in 0..b.entities() {
        for f in 0..b.features() {
            let v = b.get(e, f);
            ensure!(
                v.freshness == Freshness::Fresh
                    && v.value == Some(FeatureValue::Float((e * 10 + f) as f64 + shift)),
                "cell {e},{f}: {v:?}, expected {}",
                (e * 10 + f) as f64 + shift
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_cache_sends_only_uncached_entities_in_one_pipeline() -> anyhow::Result<()> {
    let server = OwnRedis::start(OwnRedis::free_port()?).await?;
    let store = Arc::new(RedisOnlineStore::connect_lazy(
        &server.url(),
        cached_options("partial"),
    )?);
    load(store.as_ref()).await?;
    let reader = FeatureReader::new(store.clone(), fallback(), options());
    let (es, fs) = (entities(), features());
    let mut conn = redis::Client::open(server.url().as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let reset = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async(&mut conn)
                .await?;
            anyhow::Ok(())
        }
    };

    // Half the entities first: 5 HMGETs after one CLIENT TRACKING ON, in one pipeline.
    reset(&mut conn).await?;
    let half = reader.read(&es[..5], &fs).await?;
    values_shifted(&half, 0.0)?;
    assert_eq!(calls(&mut conn, "hmget").await?, 5);
    assert_eq!(calls(&mut conn, "client|tracking").await?, 1);

    // All of them: only the 5 not cached go to Redis; the answer merges both halves in order.
    reset(&mut conn).await?;
    let all = reader.read(&es, &fs).await?;
    all_from_store(&all)?;
    assert_eq!(calls(&mut conn, "hmget").await?, 5);
    assert_eq!(calls(&mut conn, "client|tracking").await?, 1);

    // Everything cached: no round trip at all.
    reset(&mut conn).await?;
    all_from_store(&reader.read(&es, &fs).await?)?;
    assert_eq!(calls(&mut conn, "hmget").await?, 0);
    assert_eq!(calls(&mut conn, "client|tracking").await?, 0);
    let stats = store.near_cache_stats().context("cache on")?;
    assert_eq!((stats.hits, stats.misses), (15, 10), "{stats:?}");

    // A feature not cached yet makes its entities misses, read again with every feature.
    let mut more = fs.clone();
    more.push(OnlineFeature::new(
        FeatureRef::new("f_new", 1),
        Duration::from_secs(3600),
    ));
    reset(&mut conn).await?;
    let b = reader.read(&es[..2], &more).await?;
    assert_eq!(calls(&mut conn, "hmget").await?, 2);
    // Nobody has it (the fallback neither); the other features still come from Redis.
    ensure!(b.get(0, FEATURES).freshness == Freshness::Missing);
    ensure!(b.get(1, 0).value == Some(FeatureValue::Float(10.0)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_cache_serves_nothing_stale_after_redis_restarts() -> anyhow::Result<()> {
    let port = OwnRedis::free_port()?;
    let mut server = OwnRedis::start(port).await?;
    let store = Arc::new(RedisOnlineStore::connect_lazy(
        &server.url(),
        cached_options("restart"),
    )?);
    // Another process's writes, on a connection of its own (no near cache).
    let writer = RedisOnlineStore::connect_lazy(
        &server.url(),
        RedisOnlineStoreOptions::with_prefix("restart"),
    )?;
    load_shifted(&writer, 0.0).await?;
    let metrics = OnlineMetrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let reader = FeatureReader::new(store.clone(), fallback(), options()).with_metrics(metrics);
    let (es, fs) = (entities(), features());
    all_from_store(&reader.read(&es, &fs).await?)?;
    all_from_store(&reader.read(&es, &fs).await?)?;
    let before = store.near_cache_stats().context("cache on")?;
    assert_eq!(
        (before.hits, before.entries),
        (ENTITIES as u64, ENTITIES as u64)
    );

    // Redis restarts empty while nothing reads, and another process writes new values before
    // this one reads again: no invalidation can reach the cache (its connection is gone), so
    // only the flush on disconnection keeps the old values from being served.
    server.kill()?;
    let _server = OwnRedis::start(port).await?;
    wait_for(Duration::from_secs(15), "writer after restart", || async {
        Ok(load_shifted(&writer, 1000.0).await.is_ok())
    })
    .await?;
    let stats = store.near_cache_stats().context("cache on")?;
    ensure!(stats.flushes >= 1 && stats.entries == 0, "{stats:?}");
    wait_for(Duration::from_secs(15), "reads after restart", || async {
        let b = reader.read(&es, &fs).await?;
        // Never an old value: fallbacks while reconnecting, then the new values.
        for e in 0..ENTITIES {
            for f in 0..FEATURES {
                let v = b.get(e, f);
                ensure!(
                    v.value != Some(FeatureValue::Float((e * 10 + f) as f64)),
                    "stale value served after the restart: cell {e},{f}: {v:?}"
                );
            }
        }
        Ok(values_shifted(&b, 1000.0).is_ok())
    })
    .await?;
    // Cached again, and invalidated again, on the new connection.
    values_shifted(&reader.read(&es, &fs).await?, 1000.0)?;
    load_shifted(&writer, 2000.0).await?;
    wait_for(
        Duration::from_secs(5),
        "invalidation on the new connection",
        || async { Ok(values_shifted(&reader.read(&es, &fs).await?, 2000.0).is_ok()) },
    )
    .await?;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    let flushes = metric(
        &text,
        r#"feature_store_near_cache_flushes_total{reason="disconnect"}"#,
    );
    ensure!(flushes >= 1.0, "{text}");
    ensure!(
        metric(
            &text,
            r#"feature_store_near_cache_invalidations_total{source="push"}"#
        ) >= 1.0,
        "{text}"
    );
    Ok(())
}
