//! User states against the real servers of the test environment (`bash tests/run` or
//! `tests/env/up.sh` starts them; these tests fail without them):
//!
//! - one conformance suite for both user-state caches: in-process, and the environment's Redis
//!   (a key prefix of its own per test, every key under it removed afterwards);
//! - Redis specifics: the key schema, expiry and tombstones as stored, corrupt values;
//! - `PostgresUserHistory` against a fresh database of the environment's Postgres, and the
//!   whole service over Postgres and Redis;
//! - degradation: a redis-server of the test's own is frozen, killed and restarted under a
//!   loop of `get_or_build` calls, and every call still answers what the model and history
//!   say. Needs `redis-server` on `PATH` (the test environment installs it).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use ndarray::Array2;
use recsys_core::artifacts::{DataInfo, Dtype, LoadedModel, Manifest};
use recsys_core::cf::als::AlsModel;
use recsys_core::cf::interactions::{Event, EventType, IdMap};
use recsys_core::cf::serving::ServingModel;
use recsys_core::events::{EventRow, PostgresEvents};
use recsys_core::serving::users::{
    CacheOptions, CacheOutcome, CachedState, FactorSource, Generation, InProcessUserHistory,
    InProcessUserStateCache, PostgresUserHistory, RedisUserStateCache, RedisUserStateCacheOptions,
    StateKey, UserHistory, UserState, UserStateCache, UserStateMetrics, UserStates,
    UserStatesOptions, build_state, decode,
};
use recsys_core::stores::{self, RedisArgs};
use recsys_tests::{TestEnv, metric, wait_for};

// ---------------------------------------------------------------------------------------------
// Harness

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn redis_conn() -> anyhow::Result<redis::aio::ConnectionManager> {
    let env = TestEnv::load()?;
    let url = env.var("RECSYS_TEST_REDIS_URL")?.to_owned();
    Ok(stores::redis(&RedisArgs { url }).await?)
}

fn unique_prefix(tag: &str) -> String {
    recsys_tests::unique_redis_prefix("users", tag)
}

async fn keys_under(
    conn: &mut redis::aio::ConnectionManager,
    prefix: &str,
) -> anyhow::Result<Vec<String>> {
    recsys_tests::redis_keys_under(conn, prefix).await
}

/// Which cache a suite runs against; it makes caches with the options a test needs.
#[derive(Clone, Debug)]
enum Backend {
    InProcess,
    Redis { prefix: String },
}

impl Backend {
    async fn cache(&self, options: CacheOptions) -> anyhow::Result<Arc<dyn UserStateCache>> {
        Ok(match self {
            Self::InProcess => Arc::new(InProcessUserStateCache::new(options, 10_000)?),
            Self::Redis { prefix } => Arc::new(RedisUserStateCache::new(
                redis_conn().await?,
                RedisUserStateCacheOptions {
                    prefix: prefix.clone(),
                    cache: options,
                },
            )?),
        })
    }
}

/// Runs `suite` in its own task, then (for Redis) removes every key under the run's prefix,
/// even when the suite failed, and reports the suite's outcome.
async fn run<F, Fut>(backend: Backend, suite: F) -> anyhow::Result<()>
where
    F: FnOnce(Backend) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let outcome = tokio::spawn(suite(backend.clone())).await;
    if let Backend::Redis { prefix } = &backend {
        let mut conn = redis_conn().await?;
        let keys = keys_under(&mut conn, prefix).await?;
        if !keys.is_empty() {
            let _: u64 = redis::cmd("UNLINK")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .context("clean-up")?;
        }
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
                    super::run(super::Backend::InProcess, super::$suite).await
                }
            )*
        }
        mod redis_cache {
            $(
                #[tokio::test]
                async fn $suite() -> anyhow::Result<()> {
                    let prefix = super::unique_prefix(stringify!($suite));
                    super::run(super::Backend::Redis { prefix }, super::$suite).await
                }
            )*
        }
    };
}

conformance!(
    states_round_trip_per_model_version_and_user,
    writes_need_the_generation_their_lookup_saw,
    invalidation_forgets_every_version_of_one_user_only,
    states_older_than_the_ttl_are_not_served,
    entries_and_tombstones_expire,
    versions_beyond_the_limit_drop_the_oldest,
    names_that_cannot_be_keys_are_refused,
    the_service_caches_and_invalidates,
);

fn key<'a>(model: &'a str, version: &'a str, user_id: &'a str) -> StateKey<'a> {
    StateKey {
        model,
        version,
        user_id,
    }
}

fn fold_in_state(seed: u32, written_at_ms: i64) -> CachedState {
    CachedState {
        source: FactorSource::FoldIn,
        factors: (0..64)
            .map(|i| ((i * 7 + seed) as f32).sin() * 1e-3)
            .collect(),
        interactions: 500,
        known: 480 - seed,
        seen: (0..500).map(|i| i * 3 + seed).collect(),
        written_at_ms,
    }
}

fn small_state(source: FactorSource, seen: &[u32], written_at_ms: i64) -> CachedState {
    CachedState {
        source,
        factors: if source == FactorSource::FoldIn {
            vec![0.25, -0.5]
        } else {
            vec![]
        },
        interactions: seen.len() as u32,
        known: seen.len() as u32,
        seen: seen.to_vec(),
        written_at_ms,
    }
}

fn hour() -> CacheOptions {
    CacheOptions {
        ttl: Duration::from_secs(3600),
        tombstone_ttl: Duration::from_secs(60),
        max_versions: 8,
    }
}

// ---------------------------------------------------------------------------------------------
// The suite

async fn states_round_trip_per_model_version_and_user(b: Backend) -> anyhow::Result<()> {
    let cache = b.cache(hour()).await?;
    let now = now_ms();
    let cases = [
        (key("als", "v1", "u:1/ü"), fold_in_state(1, now)),
        (key("als", "v2", "u:1/ü"), fold_in_state(2, now)),
        (
            key("bpr", "20250101-120000-a1b2c3", "u:1/ü"),
            small_state(FactorSource::Trained, &[3, 9], now),
        ),
        (
            key("als", "v1", "u2"),
            small_state(FactorSource::None, &[], now),
        ),
    ];
    for (k, s) in &cases {
        let l = cache.get(k).await?;
        ensure!(
            l.state.is_none() && l.corrupt.is_none(),
            "{k:?} before: {l:?}"
        );
        ensure!(cache.put(k, l.generation, s).await?, "{k:?} not written");
    }
    for (k, s) in &cases {
        let l = cache.get(k).await?;
        // Bit-exact factors, 500 seen rows, counts, time.
        assert_eq!(l.state.as_ref(), Some(s), "{k:?}");
        assert_eq!(l.generation, Generation(None), "never invalidated");
    }
    ensure!(cache.get(&key("als", "v3", "u2")).await?.state.is_none());
    ensure!(
        cache
            .get(&key("als", "v1", "nobody"))
            .await?
            .state
            .is_none()
    );
    // An overwrite replaces.
    let newer = small_state(FactorSource::Trained, &[1], now + 1);
    cache.put(&cases[3].0, Generation(None), &newer).await?;
    assert_eq!(cache.get(&cases[3].0).await?.state, Some(newer));
    Ok(())
}

async fn writes_need_the_generation_their_lookup_saw(b: Backend) -> anyhow::Result<()> {
    let cache = b.cache(hour()).await?;
    let k = key("als", "v1", "u1");
    let s = small_state(FactorSource::FoldIn, &[1, 2], now_ms());
    // A build looks the user up, then an event is recorded (invalidation) before it writes.
    let before = cache.get(&k).await?;
    cache.invalidate_user("u1").await?;
    ensure!(
        !cache.put(&k, before.generation, &s).await?,
        "a write with the generation from before the invalidation was accepted"
    );
    ensure!(cache.get(&k).await?.state.is_none());
    // A build that started after the invalidation writes.
    let after = cache.get(&k).await?;
    ensure!(after.generation != before.generation && after.generation.0.is_some());
    ensure!(cache.put(&k, after.generation, &s).await?);
    assert_eq!(cache.get(&k).await?.state, Some(s.clone()));
    // Every invalidation is a new generation, also for a user never cached.
    cache.invalidate_user("u1").await?;
    let again = cache.get(&k).await?;
    ensure!(again.generation != after.generation && again.state.is_none());
    ensure!(!cache.put(&k, after.generation, &s).await?);
    ensure!(!cache.put(&k, Generation(None), &s).await?);
    cache.invalidate_user("fresh").await?;
    let fresh = cache.get(&key("als", "v1", "fresh")).await?;
    ensure!(fresh.generation.0.is_some());
    Ok(())
}

async fn invalidation_forgets_every_version_of_one_user_only(b: Backend) -> anyhow::Result<()> {
    let cache = b.cache(hour()).await?;
    let now = now_ms();
    let keys = [
        key("als", "v1", "u1"),
        key("als", "v2", "u1"),
        key("bpr", "v1", "u1"),
        key("als", "v1", "u10"),
        key("als", "v1", "u"),
    ];
    for (i, k) in keys.iter().enumerate() {
        cache
            .put(
                k,
                Generation(None),
                &small_state(FactorSource::Trained, &[i as u32], now),
            )
            .await?;
    }
    cache.invalidate_user("u1").await?;
    for (i, k) in keys.iter().enumerate() {
        let present = cache.get(k).await?.state.is_some();
        ensure!(present == (i >= 3), "{k:?}: present {present}");
    }
    Ok(())
}

async fn states_older_than_the_ttl_are_not_served(b: Backend) -> anyhow::Result<()> {
    let options = hour();
    let ttl = options.ttl.as_millis() as i64;
    let cache = b.cache(options).await?;
    let now = now_ms();
    // v1 written over a TTL ago, v2 just now: the key lives on, v1 is not served.
    cache
        .put(
            &key("als", "v1", "u1"),
            Generation(None),
            &small_state(FactorSource::Trained, &[1], now - ttl - 1_000),
        )
        .await?;
    cache
        .put(
            &key("als", "v2", "u1"),
            Generation(None),
            &small_state(FactorSource::Trained, &[2], now),
        )
        .await?;
    ensure!(cache.get(&key("als", "v1", "u1")).await?.state.is_none());
    ensure!(cache.get(&key("als", "v2", "u1")).await?.state.is_some());
    Ok(())
}

async fn entries_and_tombstones_expire(b: Backend) -> anyhow::Result<()> {
    let cache = b
        .cache(CacheOptions {
            ttl: Duration::from_millis(1_500),
            tombstone_ttl: Duration::from_millis(800),
            max_versions: 8,
        })
        .await?;
    let k = key("als", "v1", "u1");
    cache
        .put(
            &k,
            Generation(None),
            &small_state(FactorSource::None, &[], now_ms()),
        )
        .await?;
    ensure!(cache.get(&k).await?.state.is_some());
    cache.invalidate_user("u2").await?;
    let started = Instant::now();
    wait_for(Duration::from_secs(10), "tombstone gone", || async {
        Ok(cache
            .get(&key("als", "v1", "u2"))
            .await?
            .generation
            .0
            .is_none())
    })
    .await?;
    wait_for(Duration::from_secs(10), "state expired", || async {
        Ok(cache.get(&k).await?.state.is_none())
    })
    .await?;
    ensure!(
        started.elapsed() >= Duration::from_millis(1_000),
        "expired too early: {:?}",
        started.elapsed()
    );
    Ok(())
}

async fn versions_beyond_the_limit_drop_the_oldest(b: Backend) -> anyhow::Result<()> {
    let cache = b
        .cache(CacheOptions {
            max_versions: 3,
            ..hour()
        })
        .await?;
    let now = now_ms();
    let versions = ["v1", "v2", "v3", "v4"];
    // Written in the order v2, v1, v3 (by time), then v4.
    for (v, age) in [("v2", 3_000), ("v1", 2_000), ("v3", 1_000), ("v4", 0)] {
        cache
            .put(
                &key("als", v, "u1"),
                Generation(None),
                &small_state(FactorSource::Trained, &[1], now - age),
            )
            .await?;
    }
    let mut present = vec![];
    for v in versions {
        if cache.get(&key("als", v, "u1")).await?.state.is_some() {
            present.push(v);
        }
    }
    assert_eq!(present, ["v1", "v3", "v4"], "the oldest written goes");
    // The limit counts versions, not the generation field.
    cache.invalidate_user("u1").await?;
    let g = cache.get(&key("als", "v1", "u1")).await?.generation;
    for (i, v) in versions.iter().enumerate() {
        ensure!(
            cache
                .put(
                    &key("als", v, "u1"),
                    g,
                    &small_state(FactorSource::Trained, &[1], now + i as i64),
                )
                .await?
        );
    }
    let mut present = vec![];
    for v in versions {
        let l = cache.get(&key("als", v, "u1")).await?;
        ensure!(l.generation == g, "the generation survives the pruning");
        if l.state.is_some() {
            present.push(v);
        }
    }
    assert_eq!(present, ["v2", "v3", "v4"]);
    Ok(())
}

async fn names_that_cannot_be_keys_are_refused(b: Backend) -> anyhow::Result<()> {
    let cache = b.cache(hour()).await?;
    let s = small_state(FactorSource::None, &[], now_ms());
    let long = "u".repeat(513);
    for (k, kind) in [
        (key("als", "v1", ""), "InvalidUserId"),
        (key("als", "v1", &long), "InvalidUserId"),
        (key("als", "v1", "a\u{0}b"), "InvalidUserId"),
        (key("a:b", "v1", "u"), "InvalidArgument"),
        (key("als", "~gen", "u"), "InvalidArgument"),
    ] {
        let e = cache.get(&k).await.expect_err("get");
        assert_eq!(e.kind(), kind, "{k:?}: {e}");
        let e = cache.put(&k, Generation(None), &s).await.expect_err("put");
        assert_eq!(e.kind(), kind, "{k:?}: {e}");
    }
    let e = cache.invalidate_user("").await.expect_err("invalidate");
    assert_eq!(e.kind(), "InvalidUserId");
    Ok(())
}

async fn the_service_caches_and_invalidates(b: Backend) -> anyhow::Result<()> {
    let (v1, v2) = (model("v1", 7), model("v2", 7));
    let history = Arc::new(InProcessUserHistory::new(100));
    let states = UserStates::new(history.clone(), b.cache(hour()).await?, lenient())?;
    states
        .record(&[row("e1", "n1", "p3", 1), row("e2", "t1", "p0", 1)])
        .await?;
    for m in [&v1, &v2] {
        for user in ["n1", "t1", "stranger"] {
            let first = states.get_or_build(m, user).await?;
            ensure!(first.cache == CacheOutcome::Miss, "{user}: {first:?}");
            ensure!(
                first == expected(m, &*history, user).await?,
                "{user}: {first:?}"
            );
            let second = states.get_or_build(m, user).await?;
            ensure!(second.cache == CacheOutcome::Hit, "{user}: {second:?}");
            ensure!(
                second == expected(m, &*history, user).await?.hit(),
                "{user}"
            );
        }
    }
    let n1 = states.get_or_build(&v1, "n1").await?;
    ensure!(
        n1.source == FactorSource::FoldIn && n1.seen == [3],
        "{n1:?}"
    );
    // n1 buys p5: both versions forget n1; the others stay cached.
    let report = states.record(&[row("e3", "n1", "p5", 2)]).await?;
    ensure!(report.invalidated == 1 && report.pending == 0, "{report:?}");
    for m in [&v1, &v2] {
        let n1 = states.get_or_build(m, "n1").await?;
        ensure!(
            n1.cache == CacheOutcome::Miss && n1.seen == [3, 5],
            "{n1:?}"
        );
        ensure!(n1.interactions == 2);
        ensure!(states.get_or_build(m, "t1").await?.cache == CacheOutcome::Hit);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Models, events and expected states

/// A model of `items` products `p0…` with 4 factors and trained users `t0…t9`; versions
/// differ in their factors.
fn model(version: &str, items: usize) -> ServingModel {
    let salt = version.bytes().map(f32::from).sum::<f32>();
    let factor = |r: usize, c: usize, s: f32| ((r * 4 + c) as f32 * 0.7 + s).sin();
    let item_factors = Array2::from_shape_fn((items, 4), |(r, c)| factor(r, c, salt));
    let user_factors = Array2::from_shape_fn((10, 4), |(r, c)| factor(r + 100, c, salt));
    ServingModel::new(
        "als",
        LoadedModel {
            model: AlsModel {
                user_factors,
                item_factors,
                regularization: 0.1,
            },
            users: IdMap::from_ids((0..10).map(|i| format!("t{i}")).collect()),
            items: IdMap::from_ids((0..items).map(|i| format!("p{i}")).collect()),
            manifest: Manifest {
                format_version: 1,
                model: "als".into(),
                version: version.into(),
                created_at: chrono::Utc::now(),
                trainer_version: "test".into(),
                git_sha: None,
                dtype: Dtype::F32,
                regularization: 0.1,
                files: vec![],
                params: serde_json::json!({"alpha": 5.0}),
                metrics: serde_json::Value::Null,
                data: DataInfo::default(),
            },
        },
    )
    .expect("model")
}

fn row(id: &str, user: &str, item: &str, ts_ms: i64) -> EventRow {
    EventRow {
        event_id: id.into(),
        event: Event {
            user: user.into(),
            item: item.into(),
            kind: EventType::Purchase,
            ts_ms: Some(ts_ms),
            value: None,
        },
        category: None,
    }
}

/// The state computed directly from the model and the history, as a miss answers it.
async fn expected(
    m: &ServingModel,
    history: &dyn UserHistory,
    user: &str,
) -> anyhow::Result<UserState> {
    let o = UserStatesOptions::default();
    let h = history.history(user, o.history_limit).await?;
    let b = build_state(m, user, &h, o.max_seen);
    Ok(UserState {
        factors: b.factors,
        source: b.source,
        interactions: b.interactions,
        known: b.known,
        seen: b.seen,
        cache: CacheOutcome::Miss,
        history_error: None,
    })
}

trait Hit {
    fn hit(self) -> Self;
}

impl Hit for UserState {
    fn hit(self) -> Self {
        UserState {
            cache: CacheOutcome::Hit,
            ..self
        }
    }
}

/// Generous timeouts: the suite checks semantics, not speed, on a loaded machine.
fn lenient() -> UserStatesOptions {
    UserStatesOptions {
        cache_timeout: Duration::from_secs(2),
        history_timeout: Duration::from_secs(5),
        invalidation_timeout: Duration::from_secs(5),
        ..UserStatesOptions::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Redis specifics

#[tokio::test]
async fn redis_stores_one_hash_per_user_with_expiry_and_tombstone() -> anyhow::Result<()> {
    let prefix = unique_prefix("schema");
    run(
        Backend::Redis {
            prefix: prefix.clone(),
        },
        |_| async move {
            let mut conn = redis_conn().await?;
            let options = RedisUserStateCacheOptions {
                prefix: prefix.clone(),
                cache: CacheOptions {
                    ttl: Duration::from_secs(600),
                    tombstone_ttl: Duration::from_secs(30),
                    max_versions: 8,
                },
            };
            let cache = RedisUserStateCache::new(conn.clone(), options)?;
            let user = "u:42";
            let redis_key = format!("{prefix}:u:{user}");
            let s1 = fold_in_state(1, now_ms());
            cache
                .put(&key("als", "v1", user), Generation(None), &s1)
                .await?;
            cache
                .put(
                    &key("als", "v2", user),
                    Generation(None),
                    &small_state(FactorSource::Trained, &[4], now_ms()),
                )
                .await?;
            let kind: String = redis::cmd("TYPE")
                .arg(&redis_key)
                .query_async(&mut conn)
                .await?;
            ensure!(kind == "hash", "{redis_key} is a {kind}");
            let mut fields: Vec<String> = redis::cmd("HKEYS")
                .arg(&redis_key)
                .query_async(&mut conn)
                .await?;
            fields.sort();
            assert_eq!(fields, ["als:v1", "als:v2"]);
            let bytes: Vec<u8> = redis::cmd("HGET")
                .arg(&redis_key)
                .arg("als:v1")
                .query_async(&mut conn)
                .await?;
            assert_eq!(bytes.len(), 24 + 4 * (64 + 500), "compact binary");
            assert_eq!(decode(&bytes, String::new)?, s1);
            let pttl: i64 = redis::cmd("PTTL")
                .arg(&redis_key)
                .query_async(&mut conn)
                .await?;
            ensure!((590_000..=600_000).contains(&pttl), "PTTL {pttl}");
            ensure!(keys_under(&mut conn, &prefix).await? == std::slice::from_ref(&redis_key));

            // Invalidation: only the generation is left, for the tombstone TTL.
            cache.invalidate_user(user).await?;
            let left: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(&redis_key)
                .query_async(&mut conn)
                .await?;
            ensure!(
                left.len() == 1 && left.get("~gen").is_some_and(|g| g.parse::<u64>().is_ok()),
                "{left:?}"
            );
            let pttl: i64 = redis::cmd("PTTL")
                .arg(&redis_key)
                .query_async(&mut conn)
                .await?;
            ensure!((20_000..=30_000).contains(&pttl), "tombstone PTTL {pttl}");
            // A write refreshes the expiry to the TTL.
            let g = cache.get(&key("als", "v1", user)).await?.generation;
            ensure!(cache.put(&key("als", "v1", user), g, &s1).await?);
            let pttl: i64 = redis::cmd("PTTL")
                .arg(&redis_key)
                .query_async(&mut conn)
                .await?;
            ensure!(pttl > 590_000, "PTTL after a write {pttl}");
            Ok(())
        },
    )
    .await
}

#[tokio::test]
async fn redis_corrupt_values_are_reported_and_recomputed() -> anyhow::Result<()> {
    let prefix = unique_prefix("corrupt");
    run(
        Backend::Redis {
            prefix: prefix.clone(),
        },
        |b| async move {
            let mut conn = redis_conn().await?;
            let m = model("v1", 7);
            let redis_key = format!("{prefix}:u:t1");
            let _: () = redis::cmd("HSET")
                .arg(&redis_key)
                .arg("als:v1")
                .arg(b"\x07garbage".as_slice())
                .query_async(&mut conn)
                .await?;
            let cache = b.cache(hour()).await?;
            let l = cache.get(&key("als", "v1", "t1")).await?;
            let corrupt = l.corrupt.context("corrupt value not reported")?;
            ensure!(l.state.is_none());
            assert_eq!(corrupt.kind(), "CorruptUserState");
            ensure!(corrupt.to_string().contains(&redis_key), "{corrupt}");
            // The service recomputes and overwrites it.
            let metrics = UserStateMetrics::new();
            let mut registry = prometheus_client::registry::Registry::default();
            metrics.register(&mut registry);
            let states = UserStates::new(
                Arc::new(InProcessUserHistory::new(10)),
                cache.clone(),
                lenient(),
            )?
            .with_metrics(metrics);
            let s = states.get_or_build(&m, "t1").await?;
            ensure!(s.cache == CacheOutcome::Miss && s.source == FactorSource::Trained);
            ensure!(states.get_or_build(&m, "t1").await?.cache == CacheOutcome::Hit);
            let text = encode(&registry)?;
            ensure!(
                metric(&text, r#"user_state_errors_total{kind="CorruptUserState"}"#) == 1.0,
                "{text}"
            );
            Ok(())
        },
    )
    .await
}

#[tokio::test]
async fn redis_down_at_start_fails_fast_as_an_outage() -> anyhow::Result<()> {
    let port = OwnRedis::free_port()?;
    let cache = RedisUserStateCache::connect_lazy(
        &format!("redis://127.0.0.1:{port}/"),
        RedisUserStateCacheOptions::default(),
    )?;
    let started = Instant::now();
    let e = cache
        .get(&key("als", "v1", "u"))
        .await
        .expect_err("nothing listens");
    ensure!(e.is_outage(), "{e}");
    ensure!(started.elapsed() < Duration::from_secs(5));
    // The service answers anyway.
    let states = UserStates::new(
        Arc::new(InProcessUserHistory::new(10)),
        Arc::new(cache),
        UserStatesOptions::default(),
    )?;
    let s = states.get_or_build(&model("v1", 7), "t2").await?;
    ensure!(s.cache == CacheOutcome::Bypassed && s.source == FactorSource::Trained);
    let e = RedisUserStateCache::connect_lazy(
        "redis://127.0.0.1:1/",
        RedisUserStateCacheOptions::with_prefix("a:b"),
    )
    .expect_err("bad prefix");
    ensure!(e.to_string().contains("prefix"), "{e}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Postgres history

/// The events table of a fresh database, and its pool.
async fn postgres_events(tag: &str) -> anyhow::Result<(PostgresEvents, sqlx::PgPool)> {
    let env = TestEnv::load()?;
    let url = env.fresh_database(tag).await?;
    let pool = stores::postgres(&stores::PostgresArgs {
        url,
        max_connections: 4,
    })
    .await?;
    recsys_core::events::migrate(&pool).await?;
    Ok((PostgresEvents::new(pool.clone()), pool))
}

#[tokio::test]
async fn postgres_history_is_newest_first_per_user_and_idempotent() -> anyhow::Result<()> {
    let (events, _) = postgres_events("user_history").await?;
    let history = PostgresUserHistory::new(events);
    let mut rating = row("e4", "u1", "p4", 4_000);
    rating.event.kind = EventType::Rating;
    rating.event.value = Some(4.5);
    let batch = vec![
        row("e1", "u1", "p1", 1_000),
        row("e2", "u1", "p2", 3_000),
        // Same time as e2: ties go by event id, descending.
        row("e3", "u1", "p3", 3_000),
        rating,
        row("e5", "u2", "p9", 9_000),
    ];
    ensure!(history.record(&batch).await? == 5);
    ensure!(history.record(&batch).await? == 0, "idempotent by event id");
    let h = history.history("u1", 10).await?;
    let ids: Vec<&str> = h.iter().map(|i| i.product_id.as_str()).collect();
    assert_eq!(ids, ["p4", "p3", "p2", "p1"]);
    assert_eq!(
        (h[0].kind, h[0].value, h[0].at_ms),
        (EventType::Rating, Some(4.5), Some(4_000))
    );
    assert_eq!(h[1].kind, EventType::Purchase);
    let ids: Vec<String> = history
        .history("u1", 2)
        .await?
        .into_iter()
        .map(|i| i.product_id)
        .collect();
    assert_eq!(ids, ["p4", "p3"]);
    ensure!(history.history("u1", 0).await?.is_empty());
    ensure!(history.history("nobody", 10).await?.is_empty());
    // The same id for another event refuses the batch; bad events say which.
    let e = history
        .record(&[row("e6", "u1", "p6", 5_000), row("e1", "u1", "p1", 2_000)])
        .await
        .expect_err("conflict");
    assert_eq!(e.kind(), "ConflictingEventId");
    ensure!(
        history.history("u1", 10).await?.len() == 4,
        "nothing of the batch kept"
    );
    let mut no_time = row("e7", "u1", "p7", 0);
    no_time.event.ts_ms = None;
    let e = history.record(&[no_time]).await.expect_err("no time");
    ensure!(
        e.kind() == "InvalidEvent" && e.to_string().contains("e7"),
        "{e}"
    );
    Ok(())
}

#[tokio::test]
async fn postgres_history_is_one_query_on_the_user_index() -> anyhow::Result<()> {
    let (events, pool) = postgres_events("user_history_plan").await?;
    let rows: Vec<EventRow> = (0..5_000)
        .map(|i| {
            row(
                &format!("e{i}"),
                &format!("u{}", i % 500),
                &format!("p{}", i % 97),
                i,
            )
        })
        .collect();
    PostgresUserHistory::new(events).record(&rows).await?;
    sqlx::query("ANALYZE events").execute(&pool).await?;
    let plan: Vec<(String,)> = sqlx::query_as(
        "EXPLAIN SELECT product_id, event_type, occurred_at, value FROM events
         WHERE user_id = $1 ORDER BY occurred_at DESC, event_id DESC LIMIT $2",
    )
    .bind("u7")
    .bind(500i64)
    .fetch_all(&pool)
    .await?;
    let plan: String = plan.into_iter().map(|(l,)| l + "\n").collect();
    ensure!(
        plan.contains("events_user_id"),
        "not on the (user_id, occurred_at) index:\n{plan}"
    );
    ensure!(!plan.contains("Seq Scan"), "{plan}");
    Ok(())
}

#[tokio::test]
async fn the_service_over_postgres_and_redis() -> anyhow::Result<()> {
    let prefix = unique_prefix("service-pg");
    run(Backend::Redis { prefix }, |b| async move {
        let history = Arc::new(PostgresUserHistory::new(
            postgres_events("user_states").await?.0,
        ));
        let states = UserStates::new(history.clone(), b.cache(hour()).await?, lenient())?;
        let m = model("v1", 20);
        states
            .record(&[
                row("a1", "n1", "p3", 1_000),
                row("a2", "n1", "p11", 2_000),
                row("a3", "t4", "p0", 1_000),
            ])
            .await?;
        for user in ["n1", "t4", "stranger"] {
            let miss = states.get_or_build(&m, user).await?;
            ensure!(
                miss == expected(&m, &*history, user).await?,
                "{user}: {miss:?}"
            );
            let hit = states.get_or_build(&m, user).await?;
            ensure!(
                hit == expected(&m, &*history, user).await?.hit(),
                "{user}: {hit:?}"
            );
        }
        let report = states.record(&[row("a4", "n1", "p12", 3_000)]).await?;
        ensure!(report.new == 1 && report.invalidated == 1, "{report:?}");
        let n1 = states.get_or_build(&m, "n1").await?;
        ensure!(
            n1.cache == CacheOutcome::Miss && n1.seen == [3, 11, 12],
            "{n1:?}"
        );
        ensure!(n1 == expected(&m, &*history, "n1").await?);
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Degradation: a redis-server of the test's own

use recsys_tests::OwnRedis;

fn encode(registry: &prometheus_client::registry::Registry) -> anyhow::Result<String> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// Users of the degradation test: trained `t0…t9` and new `n0…n29`, each with interactions.
fn users() -> Vec<String> {
    (0..10)
        .map(|i| format!("t{i}"))
        .chain((0..30).map(|i| format!("n{i}")))
        .collect()
}

fn seeded_history() -> Arc<InProcessUserHistory> {
    let events = users().into_iter().enumerate().flat_map(|(u, user)| {
        (0..(u % 7 + 1)).map(move |k| Event {
            user: user.clone(),
            item: format!("p{}", (u * 3 + k * 5) % 40),
            kind: if k % 3 == 0 {
                EventType::AddToCart
            } else {
                EventType::Click
            },
            ts_ms: Some((u * 100 + k) as i64),
            value: None,
        })
    });
    Arc::new(InProcessUserHistory::from_events(events, 500))
}

/// Outcomes and the slowest call of a load loop.
#[derive(Debug, Default)]
struct Load {
    calls: usize,
    by_outcome: HashMap<&'static str, usize>,
    slowest_bypass: Duration,
}

/// Calls `get_or_build` for every user in a loop from `tasks` tasks until `stop`, checking
/// every answer against the state computed directly.
fn load(
    states: Arc<UserStates>,
    m: Arc<ServingModel>,
    truth: Arc<HashMap<String, UserState>>,
    stop: Arc<AtomicBool>,
    tasks: usize,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<Load>>> {
    (0..tasks)
        .map(|t| {
            let (states, m, truth, stop) = (states.clone(), m.clone(), truth.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Load::default();
                let users = users();
                let mut i = t * 7;
                while !stop.load(Ordering::Relaxed) {
                    let user = &users[i % users.len()];
                    i += 1;
                    let started = Instant::now();
                    let s = states.get_or_build(&m, user).await?;
                    let took = started.elapsed();
                    let want = truth.get(user).context("user")?;
                    ensure!(
                        UserState {
                            cache: CacheOutcome::Miss,
                            ..s.clone()
                        } == *want,
                        "wrong answer for {user} ({:?}): {s:?} instead of {want:?}",
                        s.cache
                    );
                    seen.calls += 1;
                    *seen.by_outcome.entry(s.cache.as_str()).or_default() += 1;
                    if s.cache == CacheOutcome::Bypassed {
                        seen.slowest_bypass = seen.slowest_bypass.max(took);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Ok(seen)
            })
        })
        .collect()
}

async fn finish(
    stop: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Load>>>,
) -> anyhow::Result<Load> {
    stop.store(true, Ordering::Relaxed);
    let mut all = Load::default();
    for t in tasks {
        let l = t.await??;
        all.calls += l.calls;
        for (k, v) in l.by_outcome {
            *all.by_outcome.entry(k).or_default() += v;
        }
        all.slowest_bypass = all.slowest_bypass.max(l.slowest_bypass);
    }
    Ok(all)
}

async fn truth(
    m: &ServingModel,
    history: &InProcessUserHistory,
) -> anyhow::Result<Arc<HashMap<String, UserState>>> {
    let mut map = HashMap::new();
    for u in users() {
        map.insert(u.clone(), expected(m, history, &u).await?);
    }
    Ok(Arc::new(map))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_answers_correctly_while_redis_freezes_dies_and_returns() -> anyhow::Result<()> {
    let port = OwnRedis::free_port()?;
    let mut server = OwnRedis::start(port).await?;
    let options = UserStatesOptions {
        cache_timeout: Duration::from_millis(40),
        failure_threshold: 3,
        cooldown: Duration::from_millis(200),
        max_cooldown: Duration::from_secs(1),
        ..UserStatesOptions::default()
    };
    let redis = || -> anyhow::Result<Arc<dyn UserStateCache>> {
        Ok(Arc::new(RedisUserStateCache::connect_lazy(
            &format!("redis://127.0.0.1:{port}/"),
            RedisUserStateCacheOptions::with_prefix("deg"),
        )?))
    };
    let history = seeded_history();
    let m = Arc::new(model("v1", 40));
    let metrics = UserStateMetrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    // Two scorer replicas sharing one Redis.
    let a = Arc::new(
        UserStates::new(history.clone(), redis()?, options.clone())?.with_metrics(metrics),
    );
    let b = Arc::new(UserStates::new(history.clone(), redis()?, options)?);
    let mut truth_now = truth(&m, &history).await?;
    ensure!(
        truth_now.values().any(|s| s.source == FactorSource::FoldIn)
            && truth_now
                .values()
                .any(|s| s.source == FactorSource::Trained),
        "both kinds of users"
    );

    // Healthy: everything cached after one round. `w0` and `w1` (outside the load loops)
    // are the users whose interactions change while Redis cannot hear about it.
    a.record(&[row("w-0", "w0", "p2", 1), row("w-1", "w1", "p3", 1)])
        .await?;
    let mut everyone = users();
    everyone.extend(["w0".to_owned(), "w1".to_owned()]);
    for u in &everyone {
        a.get_or_build(&m, u).await?;
    }
    for u in &everyone {
        let s = b.get_or_build(&m, u).await?;
        ensure!(s.cache == CacheOutcome::Hit, "{u}: {s:?}");
    }

    // One round trip per hit, two per miss, one per invalidation.
    let mut conn = redis::Client::open(server.url().as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let calls = |info: &str, cmd: &str| -> u64 {
        info.lines()
            .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await?;
    a.get_or_build(&m, "t1").await?;
    a.record(&[row("x1", "t2", "p1", 10_000)]).await?;
    a.get_or_build(&m, "t2").await?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    ensure!(
        calls(&info, "hmget") == 2 && calls(&info, "eval") == 2,
        "{info}"
    );
    truth_now = truth(&m, &history).await?;

    // Frozen (SIGSTOP): calls time out, then skip Redis; answers stay right.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(a.clone(), m.clone(), truth_now.clone(), stop.clone(), 3);
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.signal("-STOP")?;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    // Events during the freeze: their invalidations cannot reach Redis.
    let report = a
        .record(&[
            row("x2", "w0", "p39", 20_000),
            row("x3", "w1", "p38", 20_000),
        ])
        .await?;
    ensure!(report.pending == 2, "{report:?}");
    let frozen = finish(&stop, tasks).await;
    server.signal("-CONT")?;
    let frozen = frozen?;
    ensure!(
        frozen.by_outcome.get("bypassed").copied().unwrap_or(0) > 10,
        "{frozen:?}"
    );
    let mut now_true = HashMap::new();
    for (u, p) in [("w0", 39), ("w1", 38)] {
        let s = expected(&m, &*history, u).await?;
        ensure!(s.seen.contains(&p));
        now_true.insert(u, s);
    }
    let right = |u: &str, s: &UserState| {
        Some(&UserState {
            cache: CacheOutcome::Miss,
            ..s.clone()
        }) == now_true.get(u)
    };
    // Redis answers A again (its circuit closes) while both invalidations are still pending.
    wait_for(
        Duration::from_secs(15),
        "A hits again after thawing",
        || async { Ok(a.get_or_build(&m, "t5").await?.cache == CacheOutcome::Hit) },
    )
    .await?;
    ensure!(a.pending_invalidations() == 2);
    // A does not read w0's old state: it retries the invalidation first.
    let w0 = a.get_or_build(&m, "w0").await?;
    ensure!(right("w0", &w0), "A served w0's old state: {w0:?}");
    // Once A has flushed the rest, replica B (which had w1 cached) cannot read it either.
    wait_for(
        Duration::from_secs(10),
        "pending invalidations flushed",
        || async { Ok(a.flush_pending().await == 0) },
    )
    .await?;
    wait_for(
        Duration::from_secs(10),
        "B reads w1 through Redis",
        || async {
            let s = b.get_or_build(&m, "w1").await?;
            ensure!(right("w1", &s), "B served w1's old state: {s:?}");
            Ok(s.cache != CacheOutcome::Bypassed)
        },
    )
    .await?;

    // Killed: connections refused; the circuit opens and calls skip Redis quickly.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(a.clone(), m.clone(), truth_now.clone(), stop.clone(), 3);
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill()?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    ensure!(
        a.cache_circuit_open(),
        "circuit should be open while Redis is down"
    );
    let down = finish(&stop, tasks).await?;
    ensure!(
        down.by_outcome.get("bypassed").copied().unwrap_or(0) > 10,
        "{down:?}"
    );

    // Back (empty: no persistence): misses, then hits again.
    let _server = OwnRedis::start(port).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(a.clone(), m.clone(), truth_now.clone(), stop.clone(), 2);
    wait_for(
        Duration::from_secs(15),
        "hits after Redis is back",
        || async { Ok(a.get_or_build(&m, "t5").await?.cache == CacheOutcome::Hit) },
    )
    .await?;
    let back = finish(&stop, tasks).await?;
    ensure!(!a.cache_circuit_open());
    ensure!(back.calls > 0, "{back:?}");

    let text = encode(&registry)?;
    for (line, at_least) in [
        (
            r#"user_state_cache_operations_total{op="get",outcome="skipped"}"#,
            1.0,
        ),
        (
            r#"user_state_cache_operations_total{op="get",outcome="timeout"}"#,
            1.0,
        ),
        (
            r#"user_state_cache_operations_total{op="get",outcome="error"}"#,
            1.0,
        ),
        (r#"user_state_requests_total{cache="bypassed"}"#, 20.0),
        (r#"user_state_requests_total{cache="hit"}"#, 1.0),
        (r#"user_state_builds_total{source="fold_in"}"#, 1.0),
        (r#"user_state_history_reads_total{outcome="ok"}"#, 20.0),
    ] {
        let v = metric(&text, line);
        ensure!(v >= at_least, "{line} = {v}, expected ≥ {at_least}\n{text}");
    }
    ensure!(
        metric(&text, "user_state_pending_invalidations") == 0.0,
        "{text}"
    );
    ensure!(
        metric(&text, r#"user_state_circuit_open{dependency="cache"}"#) == 0.0,
        "{text}"
    );
    Ok(())
}
