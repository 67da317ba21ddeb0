//! The feature jobs as the operator runs them (the `recsys-trainer` binary, options as
//! `--key=value`), against the real Postgres (events table, offline store, registry) and the
//! real Redis (online store):
//!
//! - values read online, read offline at the same time, and recomputed from the events agree,
//!   exactly;
//! - re-running a window leaves the same rows; backfills recompute history and are idempotent;
//!   a new major version is filled by recomputing or copying;
//! - duplicate computation is gone: N requests through the serving reader compute the feature
//!   N times without the store and not at all with it;
//! - bad options fail with exit code 2 and say what is wrong;
//! - `popularity` writes the rankings of every version it computes (the top products overall
//!   and per category) to the artifact store, a directory or the real S3 server, and they are
//!   the top of the recomputed values.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use recsys_core::artifacts::{ArtifactStore, LocalDirStore, S3Store};
use recsys_core::cf::interactions::{Event, EventType};
use recsys_core::events::{self, EventRow, PostgresEvents};
use recsys_core::features::compute::{self, Computation, ComputeFallback, Inputs, Params};
use recsys_core::features::offline::{OfflineStore, PitOptions, PostgresOfflineStore};
use recsys_core::features::online::{
    FeatureReader, OnlineFeature, OnlineStore, ReaderOptions, RedisOnlineStore,
    RedisOnlineStoreOptions,
};
use recsys_core::features::rankings::{self, Rankings, WriteOutcome};
use recsys_core::features::registry::{FeatureRegistry, PostgresFeatureRegistry};
use recsys_core::features::{EntityKey, EntityKind, FeatureRef, FeatureValue, Freshness, defaults};
use recsys_core::stores::{self, ChecksumMode, PostgresArgs, S3Args};
use recsys_tests::TestEnv;

const DAY_MS: i64 = 86_400_000;
/// The time the tests materialise at: the start of this minute (online values must be within
/// their TTL of now to be stored), the same for every test of the run.
fn at_ms() -> i64 {
    static AT: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *AT.get_or_init(|| chrono::Utc::now().timestamp_millis() / 60_000 * 60_000)
}

/// `at_ms() + offset_ms` in RFC 3339.
fn rfc3339(offset_ms: i64) -> String {
    DateTime::from_timestamp_millis(at_ms() + offset_ms)
        .expect("time")
        .to_rfc3339()
}

/// 3,000 events of 150 users on 60 products in 6 categories over the 100 days before `at_ms()`
/// (so some fall outside the 90-day window), all four event types.
fn synthetic_events() -> Vec<EventRow> {
    let at = at_ms();
    (0..3000_i64)
        .map(|i| {
            let product = (i * i + 3 * i) % 60;
            let kind = match i % 10 {
                0 => EventType::Purchase,
                1 | 2 => EventType::AddToCart,
                3 | 4 => EventType::Click,
                _ => EventType::View,
            };
            EventRow {
                event_id: format!("e{i}"),
                event: Event {
                    user: format!("u{}", (i * 7) % 150),
                    item: format!("p{product}"),
                    kind,
                    ts_ms: Some(at - i * 2_880_000),
                    value: None,
                },
                category: Some(format!("c{}", product % 6)),
            }
        })
        .collect()
}

struct Fixture {
    env: TestEnv,
    db: String,
    redis: String,
    prefix: String,
    pool: sqlx::PgPool,
    /// The artifact store `popularity` writes its rankings to (`RECSYS_ARTIFACTS`).
    artifacts: tempfile::TempDir,
}

impl Fixture {
    /// A fresh database with the events and the three example definitions registered (as the
    /// operator would), and a Redis prefix of its own.
    async fn new(name: &str) -> Self {
        let env = TestEnv::load().expect("test environment");
        let db = env.fresh_database(name).await.expect("database");
        let redis = env.var("RECSYS_TEST_REDIS_URL").expect("redis").to_owned();
        let pool = stores::postgres(&PostgresArgs {
            url: db.clone(),
            max_connections: 4,
        })
        .await
        .expect("postgres");
        events::migrate(&pool).await.expect("migrate");
        PostgresEvents::new(pool.clone())
            .insert(&synthetic_events())
            .await
            .expect("insert events");
        let registry = PostgresFeatureRegistry::new(pool.clone());
        registry.migrate().await.expect("migrate registry");
        for spec in defaults::specs() {
            registry.register(&spec).await.expect("register");
        }
        let prefix = format!("t{}", db.rsplit('_').next().unwrap_or("x"));
        Self {
            env,
            db,
            redis,
            prefix,
            pool,
            artifacts: tempfile::tempdir().expect("artifacts directory"),
        }
    }

    fn trainer(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_recsys-trainer"));
        cmd.args(args)
            .env("RUST_LOG", "warn")
            .env("RECSYS_DATABASE_URL", &self.db)
            .env("RECSYS_REDIS_URL", &self.redis)
            .env("RECSYS_REDIS_PREFIX", &self.prefix)
            .env("RECSYS_ARTIFACTS", self.artifacts.path())
            .env_remove("RECSYS_RANKINGS_TOP_N")
            .env_remove("RECSYS_EVENTS");
        let _ = &self.env;
        cmd.output().expect("spawn recsys-trainer")
    }

    /// The directory store `popularity` writes its rankings to.
    fn artifact_store(&self) -> LocalDirStore {
        LocalDirStore::new(self.artifacts.path())
    }

    /// Runs the trainer, expecting success; returns its JSON report.
    fn ok(&self, args: &[&str]) -> serde_json::Value {
        let out = self.trainer(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("report on stdout")
    }

    /// Runs the trainer, expecting exit code `code`; returns stderr.
    fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.trainer(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        stderr
    }

    fn online(&self) -> RedisOnlineStore {
        RedisOnlineStore::connect_lazy(
            &self.redis,
            RedisOnlineStoreOptions::with_prefix(self.prefix.clone()),
        )
        .expect("redis store")
    }

    async fn events(&self) -> Vec<(Event, Option<String>)> {
        PostgresEvents::new(self.pool.clone())
            .read_with_categories(None, None)
            .await
            .expect("events")
    }
}

/// Offline rows of a product feature.
async fn rows(offline: &PostgresOfflineStore, feature: &FeatureRef) -> u64 {
    offline
        .stats(feature, EntityKind::Product)
        .await
        .expect("stats")
        .rows
}

fn ids(kind: EntityKind, values: &[(String, FeatureValue)]) -> Vec<EntityKey> {
    values
        .iter()
        .map(|(id, _)| EntityKey {
            kind,
            id: id.clone(),
        })
        .collect()
}

#[tokio::test]
async fn online_offline_and_recomputed_values_agree_and_reruns_change_nothing() {
    let fx = Fixture::new("feature_consistency").await;
    let at = at_ms();
    let offline = PostgresOfflineStore::new(fx.pool.clone());
    let online = fx.online();
    let registry = PostgresFeatureRegistry::new(fx.pool.clone());
    let events = fx.events().await;

    // The operator passes the BatchJob's parameters as --key=value; they match the definition.
    let at_s = rfc3339(0);
    let report = fx.ok(&[
        "popularity",
        "--window=90d",
        "--half-life=7d",
        "--at",
        &at_s,
    ]);
    assert_eq!(report["versions"][0]["version"], "1.0.0");
    fx.ok(&["freshness", "--at", &at_s]);
    fx.ok(&["category-affinity", "--at", &at_s]);

    for c in Computation::ALL {
        let spec = defaults::spec(c.default_feature()).expect("embedded definition");
        let feature = FeatureRef::new(c.default_feature(), 1);
        let params = Params::from_spec(c, &spec, at).expect("params");
        let recomputed = compute::compute(
            c,
            Inputs {
                events: &events,
                products: None,
            },
            &params,
        );
        assert!(
            recomputed.len() > 10,
            "{feature}: {} values",
            recomputed.len()
        );

        // Offline, point in time at `at`.
        let queries: Vec<(String, i64)> =
            recomputed.iter().map(|(id, _)| (id.clone(), at)).collect();
        let pit = offline
            .point_in_time(&feature, c.entity(), &queries, &PitOptions::default())
            .await
            .expect("point in time");
        // Online, one batch read.
        let ttl = Duration::from_millis(spec.ttl_ms().expect("ttl"));
        let matrix = online
            .read_batch(
                &ids(c.entity(), &recomputed),
                &[OnlineFeature::new(feature.clone(), ttl)],
            )
            .await
            .expect("online read");
        for (i, (id, value)) in recomputed.iter().enumerate() {
            let off = pit[i]
                .as_ref()
                .unwrap_or_else(|| panic!("{feature} {id}: no offline value"));
            let on = matrix
                .get(i, 0)
                .unwrap_or_else(|| panic!("{feature} {id}: no online value"));
            assert_eq!(&off.value, value, "{feature} {id}: offline ≠ recomputed");
            assert_eq!(&on.value, value, "{feature} {id}: online ≠ recomputed");
            assert_eq!((off.event_time_ms, on.event_time_ms), (at, at));
        }
        // Nothing else was written: one row per entity.
        let stats = offline.stats(&feature, c.entity()).await.expect("stats");
        assert_eq!(stats.rows, recomputed.len() as u64, "{feature}");
        let run = registry
            .last_materialization(&feature)
            .await
            .expect("registry")
            .expect("run recorded");
        assert_eq!((run.at_ms, run.rows), (at, recomputed.len() as u64));
    }

    // Values are what the definitions say, not just self-consistent.
    let affinity = compute::compute(
        Computation::CategoryAffinity,
        Inputs {
            events: &events,
            products: None,
        },
        &Params::from_spec(
            Computation::CategoryAffinity,
            &defaults::spec("user_category_affinity").expect("spec"),
            at,
        )
        .expect("params"),
    );
    for (user, v) in &affinity {
        let FeatureValue::String(json) = v else {
            panic!("{user}: {v:?}")
        };
        let shares: BTreeMap<String, f64> = serde_json::from_str(json).expect("shares");
        let total: f64 = shares.values().sum();
        assert!((total - 1.0).abs() < 1e-9, "{user}: shares sum to {total}");
    }

    // Idempotent: the same window again leaves the same rows, the same values and one run.
    let popularity = FeatureRef::new("popularity_score", 1);
    let before = offline
        .snapshot(&popularity, EntityKind::Product, at, &PitOptions::default())
        .await
        .expect("snapshot");
    let again = fx.ok(&["popularity", "--at", &at_s]);
    assert_eq!(
        again["versions"][0]["offlineDeleted"], again["versions"][0]["offlineWritten"],
        "the rerun replaced its own rows: {again}"
    );
    let after = offline
        .snapshot(&popularity, EntityKind::Product, at, &PitOptions::default())
        .await
        .expect("snapshot");
    let values =
        |s: &[(String, recsys_core::features::StoredValue)]| -> Vec<(String, FeatureValue)> {
            s.iter()
                .map(|(id, v)| (id.clone(), v.value.clone()))
                .collect()
        };
    assert_eq!(values(&before), values(&after));
    assert_eq!(rows(&offline, &popularity).await, before.len() as u64);
    assert_eq!(
        registry
            .materializations(&popularity, 10)
            .await
            .expect("runs")
            .len(),
        1
    );

    // A later run supersedes online; the earlier point stays readable offline.
    let later_ms = at + 60_000;
    fx.ok(&["popularity", "--at", &rfc3339(60_000)]);
    let top = &before[0].0;
    let served = online
        .read_batch(
            &[EntityKey::product(top.clone())],
            &[OnlineFeature::new(
                popularity.clone(),
                Duration::from_secs(1800),
            )],
        )
        .await
        .expect("read");
    assert_eq!(served.get(0, 0).expect("value").event_time_ms, later_ms);
    let pit = offline
        .point_in_time(
            &popularity,
            EntityKind::Product,
            &[(top.clone(), at), (top.clone(), later_ms - 1)],
            &PitOptions::default(),
        )
        .await
        .expect("pit");
    assert_eq!(pit[0].as_ref().expect("at").value, before[0].1.value);
    assert_eq!(pit[1].as_ref().expect("before later").event_time_ms, at);
}

#[tokio::test]
async fn backfills_recompute_history_idempotently_and_fill_new_major_versions() {
    let fx = Fixture::new("feature_backfill").await;
    let at = at_ms();
    let offline = PostgresOfflineStore::new(fx.pool.clone());
    let registry = PostgresFeatureRegistry::new(fx.pool.clone());
    let events = fx.events().await;
    let (from, to) = (rfc3339(-3 * DAY_MS), rfc3339(0));
    let (from, to) = (from.as_str(), to.as_str());
    // As the operator passes a BatchJob's backfill block.
    let args = [
        "backfill",
        "--features=popularity_score,freshness_score",
        "--from",
        from,
        "--to",
        to,
    ];
    let report = fx.ok(&args);
    assert_eq!(report["versions"].as_array().expect("versions").len(), 2);
    assert_eq!(report["versions"][0]["points"], 3);
    let popularity = FeatureRef::new("popularity_score", 1);
    let freshness = FeatureRef::new("freshness_score", 1);
    for (c, feature) in [
        (Computation::Popularity, &popularity),
        (Computation::Freshness, &freshness),
    ] {
        let spec = defaults::spec(&feature.name).expect("spec");
        for day in 1..=3 {
            let t = at - day * DAY_MS;
            let expected = compute::compute(
                c,
                Inputs {
                    events: &events,
                    products: None,
                },
                &Params::from_spec(c, &spec, t).expect("params"),
            );
            let got = offline
                .snapshot(feature, c.entity(), t, &PitOptions::default())
                .await
                .expect("snapshot");
            assert_eq!(got.len(), expected.len(), "{feature} at -{day}d");
            for ((id, v), (eid, ev)) in got.iter().zip(&expected) {
                assert_eq!((id, &v.value), (eid, ev), "{feature} at -{day}d");
                assert_eq!(v.event_time_ms, t);
            }
        }
    }
    let backfilled = rows(&offline, &popularity).await;
    let again = fx.ok(&args);
    assert_eq!(
        again["versions"][0]["offlineDeleted"], backfilled,
        "{again}"
    );
    assert_eq!(
        rows(&offline, &popularity).await,
        backfilled,
        "a rerun leaves the same rows"
    );
    assert_eq!(
        registry
            .materializations(&popularity, 10)
            .await
            .expect("runs")
            .len(),
        3,
        "one run per point"
    );

    // A breaking change: v2 decays faster. Both majors are computed side by side, each with
    // its own definition's parameters.
    let mut v2 = defaults::spec("popularity_score").expect("spec");
    v2.version = "2.0.0".into();
    v2.computation.half_life = Some("1d".into());
    registry.register(&v2).await.expect("register v2");
    let at_s = rfc3339(0);
    let report = fx.ok(&["popularity", "--at", &at_s]);
    let versions: Vec<&str> = report["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["version"].as_str().expect("version"))
        .collect();
    assert_eq!(versions, ["1.0.0", "2.0.0"]);
    assert_eq!(report["versions"][1]["halfLifeMs"], DAY_MS);
    let popularity2 = FeatureRef::new("popularity_score", 2);
    let v1_values = offline
        .snapshot(&popularity, EntityKind::Product, at, &PitOptions::default())
        .await
        .expect("v1");
    let v2_values = offline
        .snapshot(
            &popularity2,
            EntityKind::Product,
            at,
            &PitOptions::default(),
        )
        .await
        .expect("v2");
    assert_eq!(v1_values.len(), v2_values.len());
    assert_ne!(
        v1_values.iter().map(|(_, v)| &v.value).collect::<Vec<_>>(),
        v2_values.iter().map(|(_, v)| &v.value).collect::<Vec<_>>(),
        "a different half-life gives different values"
    );
    // The migration helper: recompute v2's history from the events...
    let r = fx.ok(&[
        "backfill",
        "--feature",
        "popularity_score@2",
        "--from",
        from,
        "--to",
        to,
    ]);
    assert_eq!(r["versions"].as_array().expect("versions").len(), 1);
    assert_eq!(r["versions"][0]["major"], 2);
    // ...or copy v1's rows into a same-typed major.
    let mut v3 = defaults::spec("popularity_score").expect("spec");
    v3.version = "3.0.0".into();
    registry.register(&v3).await.expect("register v3");
    let v1_rows = rows(&offline, &popularity).await;
    let r = fx.ok(&[
        "backfill",
        "--feature",
        "popularity_score@3",
        "--copy-from",
        "1",
    ]);
    assert_eq!(r["versions"][0]["offlineWritten"], v1_rows);
    assert_eq!(
        rows(&offline, &FeatureRef::new("popularity_score", 3)).await,
        v1_rows
    );
}

#[tokio::test]
async fn bad_options_and_definitions_fail_with_exit_code_2_saying_why() {
    let fx = Fixture::new("feature_refusals").await;
    let at_s = rfc3339(0);
    let at = at_s.as_str();
    let cases: [(&[&str], &str); 7] = [
        (&["popularity", "--half-life=3d"], "computation.halfLife"),
        (&["popularity", "--window=banana"], "--window"),
        (&["popularity", "--at", "yesterday"], "RFC 3339"),
        (
            &["freshness", "--feature", "popularity_score"],
            "computed by job popularity",
        ),
        (
            &["popularity", "--feature", "no_such_feature"],
            "not registered",
        ),
        (
            &[
                "backfill",
                "--feature",
                "popularity_score",
                "--from",
                at,
                "--to",
                at,
            ],
            "before --to",
        ),
        (
            &[
                "backfill",
                "--feature",
                "popularity_score@1",
                "--copy-from",
                "1",
            ],
            "into itself",
        ),
    ];
    for (args, needle) in cases {
        let stderr = fx.fails(args, 2);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // Served online but no Redis: refused before anything is written.
    let out = Command::new(env!("CARGO_BIN_EXE_recsys-trainer"))
        .args(["popularity", "--at", at])
        .env("RUST_LOG", "warn")
        .env("RECSYS_DATABASE_URL", &fx.db)
        .env_remove("RECSYS_REDIS_URL")
        .output()
        .expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--redis-url"), "{stderr}");
    let offline = PostgresOfflineStore::new(fx.pool.clone());
    assert_eq!(
        rows(&offline, &FeatureRef::new("popularity_score", 1)).await,
        0
    );
    // An unreachable database is worth a retry (exit code 1).
    let out = Command::new(env!("CARGO_BIN_EXE_recsys-trainer"))
        .args(["popularity", "--at", at])
        .env("RUST_LOG", "warn")
        .env(
            "RECSYS_DATABASE_URL",
            "postgres://recsys:recsys@127.0.0.1:1/recsys?connect_timeout=2",
        )
        .output()
        .expect("spawn");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_store_removes_duplicate_computation() {
    const REQUESTS: u64 = 40;
    let fx = Fixture::new("feature_dedup").await;
    let at = at_ms();
    let events = Arc::new(fx.events().await);
    let spec = defaults::spec("popularity_score").expect("spec");
    let params = Params::from_spec(Computation::Popularity, &spec, at).expect("params");
    let feature = FeatureRef::new("popularity_score", 1);
    let served = [OnlineFeature::new(
        feature.clone(),
        Duration::from_millis(spec.ttl_ms().expect("ttl")),
    )];
    // Every product with events in the window (and one without, which nobody can serve).
    let scored = compute::compute(
        Computation::Popularity,
        Inputs {
            events: &events,
            products: None,
        },
        &params,
    );
    let mut products = ids(EntityKind::Product, &scored);
    products.push(EntityKey::product("never-seen"));
    let known = scored.len();
    let reader = |fallback: Arc<ComputeFallback>| {
        let online: Arc<dyn OnlineStore> = Arc::new(fx.online());
        FeatureReader::new(
            online,
            fallback,
            ReaderOptions {
                budget: Duration::from_secs(2),
                online_timeout: Duration::from_secs(1),
                ..ReaderOptions::default()
            },
        )
    };
    let compute_on_miss = || {
        Arc::new(ComputeFallback::new(events.clone()).with_feature(
            feature.clone(),
            Computation::Popularity,
            params,
        ))
    };

    // Without the store: nothing materialised, every request computes.
    let without = compute_on_miss();
    let r = reader(without.clone());
    let mut first = None;
    for _ in 0..REQUESTS {
        let batch = r.read(&products, &served).await.expect("read");
        assert_eq!(batch.count(Freshness::Fallback), known);
        assert_eq!(batch.count(Freshness::Missing), 1);
        first.get_or_insert_with(|| batch.get(0, 0).value.clone());
    }
    assert_eq!(without.computations(), REQUESTS);

    // With the store: one computation in the job, none on the request path.
    let report = fx.ok(&["popularity", "--at", &rfc3339(0)]);
    assert_eq!(report["versions"][0]["computations"], 1);
    let with = compute_on_miss();
    let r = reader(with.clone());
    for _ in 0..REQUESTS {
        let batch = r.read(&products[..known], &served).await.expect("read");
        assert_eq!(batch.count(Freshness::Fresh), known, "served from Redis");
        assert_eq!(
            batch.get(0, 0).value,
            first.clone().flatten(),
            "same value either way"
        );
    }
    assert_eq!(with.computations(), 0);
    println!(
        "computations for {REQUESTS} requests: {} without the store, 1 (the job) + {} with it",
        without.computations(),
        with.computations()
    );
    // A product the job has no value for is still a miss, and a miss still computes.
    let batch = r.read(&products, &served).await.expect("read");
    assert_eq!(batch.count(Freshness::Missing), 1);
    assert_eq!(with.computations(), 1);
}

/// `popularity_score` recomputed from the events at `at` with `spec`'s parameters, ranked:
/// score descending, then product id ascending.
fn ranked_popularity(
    events: &[(Event, Option<String>)],
    spec: &recsys_core::features::registry::FeatureSpec,
    at: i64,
) -> Vec<(String, f64)> {
    let params = Params::from_spec(Computation::Popularity, spec, at).expect("params");
    let mut scores: Vec<(String, f64)> = compute::compute(
        Computation::Popularity,
        Inputs {
            events,
            products: None,
        },
        &params,
    )
    .into_iter()
    .map(|(id, v)| match v {
        FeatureValue::Float(x) => (id, x),
        other => panic!("{id}: {other:?}"),
    })
    .collect();
    scores.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    scores
}

/// The category of a synthetic product: `p<k>` is in `c<k mod 6>`.
fn synthetic_category(product: &str) -> String {
    let k: i64 = product
        .strip_prefix('p')
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("{product} is not a synthetic product"));
    format!("c{}", k % 6)
}

/// Same products in the same order, same scores (JSON numbers parse to within an ULP).
fn assert_same_list(what: &str, got: &[(String, f64)], expected: &[(String, f64)]) {
    let ids = |l: &[(String, f64)]| l.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(got), ids(expected), "{what}: products");
    for ((id, g), (_, e)) in got.iter().zip(expected) {
        assert!(
            (g - e).abs() <= 1e-12 * e.abs().max(1.0),
            "{what}: {id} scored {g}, recomputed {e}"
        );
    }
}

/// Checks `r` against the recomputation `expected` (ranked): `overall` is its top `n`, every
/// category list holds only products of that category and is that category's top `n`.
fn assert_rankings_match(r: &Rankings, expected: &[(String, f64)], n: usize) {
    assert_eq!(r.n, n);
    assert_same_list("overall", &r.overall, &expected[..n.min(expected.len())]);
    let mut categories: Vec<String> = expected
        .iter()
        .map(|(id, _)| synthetic_category(id))
        .collect();
    categories.sort();
    categories.dedup();
    assert_eq!(
        r.by_category.keys().cloned().collect::<Vec<_>>(),
        categories,
        "one list per category"
    );
    for (category, list) in &r.by_category {
        for (id, _) in list {
            assert_eq!(
                &synthetic_category(id),
                category,
                "{id} listed under {category}"
            );
            assert_eq!(r.category_of.get(id), Some(category), "category_of[{id}]");
        }
        let top: Vec<(String, f64)> = expected
            .iter()
            .filter(|(id, _)| &synthetic_category(id) == category)
            .take(n)
            .cloned()
            .collect();
        assert_same_list(&format!("by_category[{category}]"), list, &top);
    }
}

#[tokio::test]
async fn popularity_writes_the_rankings_of_every_version_it_computes() {
    let fx = Fixture::new("feature_rankings").await;
    let at = at_ms();
    let at_s = rfc3339(0);
    let store = fx.artifact_store();
    let events = fx.events().await;
    let v1 = FeatureRef::new("popularity_score", 1);
    let spec = defaults::spec("popularity_score").expect("spec");
    let expected = ranked_popularity(&events, &spec, at);
    // 12 products in 2 categories (c0 and c4), 6 each.
    assert_eq!(expected.len(), 12, "{expected:?}");

    // Backfills and the other jobs write no rankings.
    fx.ok(&[
        "backfill",
        "--feature=popularity_score",
        "--from",
        &rfc3339(-2 * DAY_MS),
        "--to",
        &at_s,
    ]);
    let report = fx.ok(&["freshness", "--at", &at_s]);
    assert!(report["versions"][0]["rankings"].is_null(), "{report}");
    assert_eq!(
        store.list("rankings/").await.expect("list"),
        Vec::<String>::new()
    );

    // A short list: every list is cut at n, the per-category lists too.
    let report = fx.ok(&["popularity", "--at", &at_s, "--rankings-top-n=4"]);
    let r = &report["versions"][0]["rankings"];
    assert_eq!(
        r["key"], "rankings/popularity_score/v1/latest.json",
        "{report}"
    );
    assert_eq!(r["written"], true, "{report}");
    assert_eq!((r["n"].as_u64(), r["overall"].as_u64()), (Some(4), Some(4)));
    assert_eq!(r["categories"], 2);
    assert!(
        r["error"].is_null() && r["keptNewerAtMs"].is_null(),
        "{report}"
    );
    assert_eq!(
        store.list("rankings/").await.expect("list"),
        ["rankings/popularity_score/v1/latest.json"],
        "latest only"
    );
    let got = rankings::read_rankings(&store, &v1)
        .await
        .expect("read")
        .expect("rankings written");
    assert_eq!(
        (got.feature.as_str(), got.major, got.at_ms),
        ("popularity_score", 1, at)
    );
    assert!(
        got.computed_at_ms >= at,
        "built after the time it describes"
    );
    assert_rankings_match(&got, &expected, 4);

    // The default length holds every product; the same `at` again replaces the rankings.
    let report = fx.ok(&["popularity", "--at", &at_s]);
    assert_eq!(report["versions"][0]["rankings"]["written"], true);
    let got = rankings::read_rankings(&store, &v1)
        .await
        .expect("read")
        .expect("rankings");
    assert_eq!(got.n, 1000);
    assert_eq!(got.overall.len(), expected.len());
    assert_rankings_match(&got, &expected, 1000);
    assert_eq!(
        got.by_category.values().map(Vec::len).sum::<usize>(),
        expected.len(),
        "every product has a category, so every product is in one list"
    );

    // An earlier window does not replace later rankings (a late retry cannot make serving go
    // back in time); its values are still materialised.
    let report = fx.ok(&["popularity", "--at", &rfc3339(-60_000)]);
    let r = &report["versions"][0]["rankings"];
    assert_eq!(
        (r["written"].as_bool(), r["keptNewerAtMs"].as_i64()),
        (Some(false), Some(at))
    );
    assert_eq!(
        rankings::read_rankings(&store, &v1)
            .await
            .expect("read")
            .expect("rankings"),
        got
    );

    // Every major version computed gets its own rankings, from its own parameters.
    let registry = PostgresFeatureRegistry::new(fx.pool.clone());
    let mut v2_spec = spec.clone();
    v2_spec.version = "2.0.0".into();
    v2_spec.computation.half_life = Some("1d".into());
    registry.register(&v2_spec).await.expect("register v2");
    let later = at + 60_000;
    let report = fx.ok(&["popularity", "--at", &rfc3339(60_000)]);
    let keys: Vec<&str> = report["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["rankings"]["key"].as_str().expect("key"))
        .collect();
    assert_eq!(
        keys,
        [
            "rankings/popularity_score/v1/latest.json",
            "rankings/popularity_score/v2/latest.json"
        ]
    );
    for (major, spec) in [(1, &spec), (2, &v2_spec)] {
        let got = rankings::read_rankings(&store, &FeatureRef::new("popularity_score", major))
            .await
            .expect("read")
            .unwrap_or_else(|| panic!("v{major} rankings"));
        assert_eq!(got.at_ms, later);
        assert_rankings_match(&got, &ranked_popularity(&events, spec, later), 1000);
    }
}

#[tokio::test]
async fn a_failing_artifact_store_fails_the_job_after_the_values_are_written() {
    let fx = Fixture::new("feature_rankings_failure").await;
    let at = at_ms();
    // The store's directory is a file: every write fails.
    let blocked = fx.artifacts.path().join("blocked");
    std::fs::write(&blocked, b"not a directory").expect("file");
    let blocked = blocked.to_str().expect("utf-8 path");
    let report_file = fx.artifacts.path().join("report.json");
    let out = fx.trainer(&[
        "popularity",
        "--at",
        &rfc3339(0),
        "--store",
        blocked,
        "--report",
        report_file.to_str().expect("utf-8 path"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Not a directory: retrying cannot help.
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("rankings"), "{stderr}");
    // The report still says what was done, and why the rankings are missing.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_file).expect("report file")).expect("report");
    let r = &report["versions"][0]["rankings"];
    assert_eq!(r["written"], false, "{report}");
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("blocked")),
        "{report}"
    );
    // Values and the run were recorded before the rankings were attempted.
    let feature = FeatureRef::new("popularity_score", 1);
    let offline = PostgresOfflineStore::new(fx.pool.clone());
    assert_eq!(
        rows(&offline, &feature).await,
        report["versions"][0]["values"].as_u64().expect("values")
    );
    let run = PostgresFeatureRegistry::new(fx.pool.clone())
        .last_materialization(&feature)
        .await
        .expect("registry")
        .expect("run recorded");
    assert_eq!(run.at_ms, at);
    // A bad `--store` is refused before anything is written.
    let fx2 = Fixture::new("feature_rankings_bad_store").await;
    let stderr = fx2.fails(&["popularity", "--at", &rfc3339(0), "--store", "s3://"], 2);
    assert!(
        stderr.contains("--store") && stderr.contains("bucket"),
        "{stderr}"
    );
    assert_eq!(
        rows(&PostgresOfflineStore::new(fx2.pool.clone()), &feature).await,
        0
    );
}

/// S3 options of the test environment's server.
fn s3_args(env: &TestEnv) -> S3Args {
    env.s3_args(ChecksumMode::WhenSupported)
        .expect("S3 options of the test environment")
}

#[tokio::test]
async fn rankings_are_written_to_and_read_from_s3() {
    let fx = Fixture::new("feature_rankings_s3").await;
    let at = at_ms();
    let s3 = s3_args(&fx.env);
    let bucket = fx
        .env
        .var("RECSYS_TEST_S3_BUCKET")
        .expect("bucket")
        .to_owned();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let prefix = format!("rankings-test/{}-{nanos:x}", std::process::id());
    let client = stores::s3(&s3).await.expect("s3 client");
    let store = Arc::new(S3Store::new(client, &bucket, &prefix));
    let v1 = FeatureRef::new("popularity_score", 1);

    // The job, as a cluster runs it: `--store s3://…` and the S3 options.
    let report = fx.ok(&[
        "popularity",
        "--at",
        &rfc3339(0),
        "--rankings-top-n=5",
        "--store",
        &format!("s3://{bucket}/{prefix}"),
        "--s3-endpoint",
        s3.endpoint.as_deref().unwrap_or_default(),
        "--s3-region",
        &s3.region,
        "--s3-force-path-style",
        "--s3-access-key-id",
        s3.access_key_id.as_deref().unwrap_or_default(),
        "--s3-secret-access-key",
        s3.secret_access_key.as_deref().unwrap_or_default(),
    ]);
    assert_eq!(
        report["versions"][0]["rankings"]["written"], true,
        "{report}"
    );
    // Nothing went to the directory store.
    assert!(fx.artifact_store().list("").await.expect("list").is_empty());
    let expected = ranked_popularity(
        &fx.events().await,
        &defaults::spec("popularity_score").expect("spec"),
        at,
    );
    let task_store = store.clone();
    let outcome = async move {
        let store = task_store.as_ref();
        let got = rankings::read_rankings(store, &v1)
            .await
            .expect("read from S3")
            .expect("rankings in S3");
        assert_eq!(got.at_ms, at);
        assert_rankings_match(&got, &expected, 5);

        // Through the seam directly: an earlier time is kept out, the same time replaces,
        // and a corrupted object is refused on read, naming its key.
        let mut older = got.clone();
        older.at_ms -= 1;
        assert_eq!(
            rankings::write_rankings(store, &older)
                .await
                .expect("write"),
            WriteOutcome::KeptNewer { at_ms: at }
        );
        let mut rerun = got.clone();
        rerun.computed_at_ms += 1;
        rerun.overall.truncate(2);
        assert_eq!(
            rankings::write_rankings(store, &rerun)
                .await
                .expect("write"),
            WriteOutcome::Written
        );
        assert_eq!(
            rankings::read_rankings(store, &v1).await.expect("read"),
            Some(rerun.clone())
        );
        let key = rankings::rankings_key(&v1);
        let mut future_format = rerun;
        future_format.format_version = 9;
        store.put(&key, future_format.to_json()).await.expect("put");
        let err = rankings::read_rankings(store, &v1)
            .await
            .expect_err("unknown format");
        assert_eq!(
            err.to_string(),
            format!("{key}: format_version 9 is not supported (this build reads 1)")
        );
        assert_eq!(
            rankings::read_rankings(store, &FeatureRef::new("popularity_score", 7))
                .await
                .expect("read"),
            None
        );
    };
    let result = tokio::spawn(outcome).await;
    // Clean up the bucket whatever happened.
    for key in store.list("").await.expect("list") {
        store.delete(&key).await.expect("delete");
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}
