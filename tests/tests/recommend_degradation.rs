//! Redis down under load, over HTTP: the scorer of `recommend_http` (model in S3, histories in
//! Postgres), with its user states and online features in a redis-server of this test's own
//! ([`OwnRedis`]: killing it disturbs no other test). Five tasks call
//! `GET /v1/recommendations` for trained and folded-in users and `POST /v1/scores` for the
//! whole test while Redis is killed, restarted empty, frozen (SIGSTOP: connections hang
//! instead of being refused) and thawed.
//!
//! - Every answer, in every phase, is a 200 and the same as before the outage: the same
//!   products, scores and affinities (for trained users, the model's dot products), the same
//!   path (`fold_in` for users the model does not know, computed from their history without
//!   the cache). Feature values come from the offline store meanwhile; they are the same
//!   values, so the ranking is too.
//! - While Redis is frozen every answer takes under [`FROZEN_BOUND`]: a user-state cache call
//!   gives up after 20 ms (`--user-cache-timeout`) and an online read after 25 ms
//!   (`--online-timeout`), and after three such failures the circuit breakers skip Redis.
//! - Once Redis is back the scorer uses it again: user states are written and read from it
//!   (cache hits rise), feature values are served from it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use recsys_core::cf::interactions::{Event, EventType};
use recsys_core::events::{EventRow, PostgresEvents};
use recsys_core::features::defaults;
use recsys_core::features::offline::{OfflineStore as _, PostgresOfflineStore};
use recsys_core::features::online::{OnlineStore as _, RedisOnlineStore, RedisOnlineStoreOptions};
use recsys_core::features::registry::{FeatureRegistry as _, PostgresFeatureRegistry};
use recsys_core::features::{EntityKey, EntityKind, FeatureRef, FeatureValue, StoredValue};
use recsys_core::serving::users::user_key;
use recsys_tests::recommend::{Fixture, ITEMS, USERS, ids, serve};
use recsys_tests::{OwnRedis, TestEnv, http_json, metric, wait_for};
use serde_json::{Value, json};

const K: usize = 10;
/// Trained users of the load: every 25th of the 400.
const TRAINED: usize = USERS / 25;
/// Users the model does not know, each with six purchases in one topic: folded in.
const FOLD_INS: usize = 6;
/// Concurrent callers.
const TASKS: usize = 5;
/// Longest answer while Redis is frozen. What Redis can cost a request is bounded by the
/// timeouts (20 ms per user-state cache call, 25 ms per online read) and then by the open
/// circuits; the rest is headroom for a loaded 2-core machine.
const FROZEN_BOUND: Duration = Duration::from_secs(1);
/// Any request taking this long is a failure (a hang), whatever the phase.
const HANG: Duration = Duration::from_secs(10);
/// How long each outage lasts.
const OUTAGE: Duration = Duration::from_secs(3);

const PHASES: [&str; 5] = ["healthy", "killed", "restarted", "frozen", "thawed"];
const HEALTHY: usize = 0;
const KILLED: usize = 1;
const RESTARTED: usize = 2;
const FROZEN: usize = 3;
const THAWED: usize = 4;

/// One request of the load and the answer it must get.
struct Probe {
    method: &'static str,
    path: String,
    body: Option<Value>,
    expected: Value,
}

/// Outcomes of one phase.
#[derive(Default)]
struct Tally {
    requests: usize,
    latencies: Vec<Duration>,
    failures: usize,
    first_failures: Vec<String>,
}

impl Tally {
    fn fail(&mut self, what: String) {
        self.failures += 1;
        if self.first_failures.len() < 5 {
            self.first_failures.push(what);
        }
    }

    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.latencies.extend(other.latencies);
        self.failures += other.failures;
        for f in other.first_failures {
            if self.first_failures.len() < 5 {
                self.first_failures.push(f);
            }
        }
    }

    fn quantile(&self, q: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort_unstable();
        l.get(((l.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// Why `got` is not `want`: the same path, version, interactions, products in order, scores
/// and affinities.
fn differs(got: &Value, want: &Value) -> Option<String> {
    for field in ["path", "version", "variant", "interactions"] {
        if got[field] != want[field] {
            return Some(format!(
                "{field}: {} instead of {}",
                got[field], want[field]
            ));
        }
    }
    if ids(got) != ids(want) {
        return Some(format!(
            "products {:?} instead of {:?}",
            ids(got),
            ids(want)
        ));
    }
    let items = |v: &Value| v["items"].as_array().cloned().unwrap_or_default();
    for (g, w) in items(got).iter().zip(items(want).iter()) {
        for field in ["score", "user_product_affinity"] {
            let close = match (g[field].as_f64(), w[field].as_f64()) {
                (Some(a), Some(b)) => (a - b).abs() <= 1e-5,
                (a, b) => a == b,
            };
            if !close {
                return Some(format!(
                    "{} {field}: {} instead of {}",
                    w["product_id"], g[field], w[field]
                ));
            }
        }
    }
    None
}

async fn metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, v) = http_json(addr, "GET", "/metrics", None).await?;
    ensure!(status == 200, "/metrics: {status}");
    Ok(v.as_str().context("/metrics is text")?.to_owned())
}

/// The load: each task goes round the probes from its own offset until `stop`, tallying by
/// the phase a request started in.
fn load(
    addr: SocketAddr,
    probes: Arc<Vec<Probe>>,
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Tally>>> {
    (0..TASKS)
        .map(|t| {
            let (probes, phase, stop) = (probes.clone(), phase.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tallies: Vec<Tally> = PHASES.iter().map(|_| Tally::default()).collect();
                let mut i = t * 7;
                while !stop.load(Ordering::Relaxed) {
                    let p = &probes[i % probes.len()];
                    i += 1;
                    let at = phase.load(Ordering::Relaxed);
                    let started = Instant::now();
                    let result = tokio::time::timeout(
                        HANG,
                        http_json(addr, p.method, &p.path, p.body.clone()),
                    )
                    .await;
                    let took = started.elapsed();
                    let tally = &mut tallies[at];
                    tally.requests += 1;
                    tally.latencies.push(took);
                    let what = format!("{} {} ({} ms)", p.method, p.path, took.as_millis());
                    match result {
                        Err(_) => tally.fail(format!("{what}: no answer")),
                        Ok(Err(e)) => tally.fail(format!("{what}: {e:#}")),
                        Ok(Ok((status, _))) if status != 200 => {
                            tally.fail(format!("{what}: status {status}"))
                        }
                        Ok(Ok((_, v))) => {
                            if let Some(d) = differs(&v, &p.expected) {
                                tally.fail(format!("{what}: {d}"));
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tallies
            })
        })
        .collect()
}

/// The three shipped features: registered in the fresh database's registry, with the same
/// values in the offline store and (by [`write_online`]) in Redis.
type Values = Vec<(FeatureRef, Duration, Vec<(EntityKey, StoredValue)>)>;

fn feature_values(fx: &Fixture, users: &[String]) -> anyhow::Result<Values> {
    let at = |value| StoredValue {
        value,
        event_time_ms: fx.now_ms - 60_000,
        written_at_ms: fx.now_ms - 30_000,
    };
    let ttl = |name: &str| -> anyhow::Result<Duration> {
        let spec = defaults::spec(name).with_context(|| format!("no spec {name}"))?;
        Ok(Duration::from_millis(spec.ttl_ms()?))
    };
    let popularity: Vec<_> = fx
        .rankings
        .overall
        .iter()
        .map(|(p, s)| (EntityKey::product(p.clone()), at(FeatureValue::Float(*s))))
        .collect();
    let freshness: Vec<_> = (0..ITEMS)
        .map(|i| {
            let v = 0.5_f64.powf((i % 13) as f64 / 4.0);
            (
                EntityKey::product(format!("p{i}")),
                at(FeatureValue::Float(v)),
            )
        })
        .collect();
    // Each user's share of their history by category.
    let affinity: Vec<_> = users
        .iter()
        .filter_map(|u| {
            let products: Vec<String> = match u.strip_prefix('u') {
                Some(n) => fx.seen(n.parse().ok()?),
                None => fold_in_products(fx, u)?,
            };
            let mut shares: BTreeMap<&str, f64> = BTreeMap::new();
            for p in &products {
                *shares.entry(fx.categories.get(p)?.as_str()).or_default() +=
                    1.0 / products.len() as f64;
            }
            let json = serde_json::to_string(&shares).ok()?;
            Some((EntityKey::user(u.clone()), at(FeatureValue::String(json))))
        })
        .collect();
    Ok(vec![
        (
            FeatureRef::new("popularity_score", 1),
            ttl("popularity_score")?,
            popularity,
        ),
        (
            FeatureRef::new("freshness_score", 1),
            ttl("freshness_score")?,
            freshness,
        ),
        (
            FeatureRef::new("user_category_affinity", 1),
            ttl("user_category_affinity")?,
            affinity,
        ),
    ])
}

/// Six products of one topic for fold-in user `fold<j>`.
fn fold_in_products(fx: &Fixture, user: &str) -> Option<Vec<String>> {
    let j: usize = user.strip_prefix("fold")?.parse().ok()?;
    let topic = fx.data.item_topic[j * 37 % ITEMS];
    Some(
        (0..ITEMS)
            .filter(|i| fx.data.item_topic[*i] == topic)
            .take(6)
            .map(|i| format!("p{i}"))
            .collect(),
    )
}

async fn write_online(url: &str, prefix: &str, values: &Values) -> anyhow::Result<()> {
    let store = RedisOnlineStore::connect_lazy(url, RedisOnlineStoreOptions::with_prefix(prefix))?;
    for (feature, ttl, rows) in values {
        store.write_batch(feature, *ttl, rows).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_stay_right_and_prompt_while_redis_dies_and_freezes_under_load()
-> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let fx = Fixture::build(&env, "recommend_degradation").await?;
    let port = OwnRedis::free_port()?;
    let mut redis = OwnRedis::start(port).await?;
    let redis_url = redis.url();
    let prefix = format!("rd{}", fx.tag);

    // Users the model does not know, with histories to fold in.
    let fold_ins: Vec<String> = (0..FOLD_INS).map(|j| format!("fold{j}")).collect();
    let mut rows = vec![];
    for u in &fold_ins {
        for p in fold_in_products(&fx, u).context("fold-in products")? {
            rows.push(EventRow {
                event_id: format!("{u}-{p}"),
                event: Event {
                    user: u.clone(),
                    item: p.clone(),
                    kind: EventType::Purchase,
                    ts_ms: Some(fx.now_ms - 30_000),
                    value: None,
                },
                category: fx.categories.get(&p).cloned(),
            });
        }
    }
    PostgresEvents::new(fx.pool.clone()).insert(&rows).await?;
    let trained: Vec<String> = (0..TRAINED).map(|i| format!("u{}", i * 25)).collect();
    let everyone: Vec<String> = trained.iter().chain(&fold_ins).cloned().collect();

    // Features: registered, offline and online.
    let registry = PostgresFeatureRegistry::new(fx.pool.clone());
    for spec in defaults::specs() {
        registry.register(&spec).await?;
    }
    let values = feature_values(&fx, &everyone)?;
    let offline = PostgresOfflineStore::new(fx.pool.clone());
    for (feature, _, rows) in &values {
        let kind = rows.first().map_or(EntityKind::Product, |(e, _)| e.kind);
        let rows: Vec<(String, StoredValue)> = rows
            .iter()
            .map(|(e, v)| (e.id.clone(), v.clone()))
            .collect();
        offline.write_stored(feature, kind, &rows).await?;
    }
    write_online(&redis_url, &prefix, &values).await?;

    // The scorer on the test's Redis, with the defaults for Redis (20 ms per user-state cache
    // call, 25 ms per online read). Postgres gets 2 s for a history read and for the offline
    // fallback: a loaded 2-core machine running a debug build must not turn the history or
    // the offline values into missing ones, which would change the answers for reasons that
    // are not Redis's.
    let args = fx.args(
        &redis_url,
        &prefix,
        &["--feature-budget", "2s", "--user-history-timeout", "2s"],
    )?;
    let (scorer, addr) = serve(&args).await?;

    // What every answer must be: recorded with Redis healthy, checked against the model and
    // against a second call (a cache hit).
    let candidates: Vec<String> = (0..40).map(|i| format!("p{}", (i * 7) % ITEMS)).collect();
    let mut probes = vec![];
    for (n, u) in everyone.iter().enumerate() {
        probes.push((
            "GET",
            format!("/v1/recommendations?user_id={u}&k={K}"),
            None,
        ));
        if n % 2 == 0 {
            probes.push((
                "POST",
                "/v1/scores".to_owned(),
                Some(json!({"user_id": u, "product_ids": candidates})),
            ));
        }
    }
    let mut checked = vec![];
    for (method, path, body) in probes {
        let (status, first) = http_json(addr, method, &path, body.clone()).await?;
        ensure!(status == 200, "{method} {path}: {status} {first}");
        let (status, second) = http_json(addr, method, &path, body.clone()).await?;
        ensure!(status == 200, "{method} {path}: {status} {second}");
        if let Some(d) = differs(&second, &first) {
            anyhow::bail!("{method} {path}: the cached answer differs: {d}");
        }
        let user = first["user_id"].as_str().context("user_id")?.to_owned();
        let items = first["items"].as_array().context("items")?.clone();
        ensure!(!items.is_empty(), "{path}: {first}");
        ensure!(first["version"] == json!(fx.version), "{path}: {first}");
        ensure!(
            items
                .iter()
                .all(|i| i["features"]["popularity_score"].is_f64()
                    && i["features"]["freshness_score"].is_f64()),
            "the features take part in the ranking: {first}"
        );
        ensure!(
            items
                .iter()
                .any(|i| i["features"]["category_affinity"].is_f64()),
            "{first}"
        );
        match user.strip_prefix('u') {
            Some(row) => {
                ensure!(first["path"] == "cf", "{path}: {first}");
                let row: usize = row.parse()?;
                let factors = fx.model.user_factors.row(row);
                for item in &items {
                    let p: usize = item["product_id"].as_str().context("id")?[1..].parse()?;
                    let want = factors.dot(&fx.model.item_factors.row(p));
                    let got = item["user_product_affinity"].as_f64().context("affinity")? as f32;
                    ensure!(
                        (got - want).abs() < 1e-4,
                        "{user} p{p}: served {got}, model {want}"
                    );
                }
            }
            None => ensure!(
                first["path"] == "fold_in" && first["interactions"] == 6,
                "{path}: {first}"
            ),
        }
        checked.push(Probe {
            method,
            path,
            body,
            expected: first,
        });
    }
    let probes = Arc::new(checked);
    let state_keys: Vec<String> = everyone.iter().map(|u| user_key(&prefix, u)).collect();
    let cached = cached_states(&redis_url, &state_keys).await?;
    ensure!(cached == everyone.len(), "{cached} user states in Redis");

    // The load, for the whole test.
    let phase = Arc::new(AtomicUsize::new(HEALTHY));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(addr, probes.clone(), phase.clone(), stop.clone());
    const HITS: &str = r#"user_state_requests_total{cache="hit"}"#;
    const BYPASSED: &str = r#"user_state_requests_total{cache="bypassed"}"#;
    const FOLDED: &str = r#"user_state_builds_total{source="fold_in"}"#;
    const GET_TIMEOUTS: &str = r#"user_state_cache_operations_total{op="get",outcome="timeout"}"#;
    const FRESH: &str =
        r#"feature_store_values_total{feature="popularity_score",major="1",freshness="fresh"}"#;
    const FALLBACK: &str =
        r#"feature_store_values_total{feature="popularity_score",major="1",freshness="fallback"}"#;
    let outcome = async {
        tokio::time::sleep(Duration::from_millis(1_500)).await;

        // Killed: connections refused.
        let before = metrics(addr).await?;
        redis.kill()?;
        phase.store(KILLED, Ordering::Relaxed);
        tokio::time::sleep(OUTAGE).await;
        let (status, v) = http_json(addr, "GET", "/readyz", None).await?;
        ensure!(status == 200, "degraded, not unready: {v}");
        let killed = metrics(addr).await?;
        for s in [
            r#"user_state_circuit_open{dependency="cache"}"#,
            "feature_store_circuit_open",
        ] {
            ensure!(
                metric(&killed, s) == 1.0,
                "{s}: the circuit is closed while Redis is down"
            );
        }
        for s in [BYPASSED, FOLDED, FALLBACK] {
            ensure!(
                metric(&killed, s) > metric(&before, s),
                "{s} did not rise while Redis was down"
            );
        }

        // Back, empty (no persistence); the features are materialized again.
        redis = OwnRedis::start(port).await?;
        phase.store(RESTARTED, Ordering::Relaxed);
        wait_for(
            Duration::from_secs(10),
            "online features rewritten",
            || async { Ok(write_online(&redis_url, &prefix, &values).await.is_ok()) },
        )
        .await?;
        let back = metrics(addr).await?;
        wait_for(
            Duration::from_secs(20),
            "user states cached and read from Redis again",
            || async {
                let cached = cached_states(&redis_url, &state_keys).await?;
                let now = metrics(addr).await?;
                Ok(cached == everyone.len()
                    && metric(&now, HITS) > metric(&back, HITS)
                    && metric(&now, FRESH) > metric(&back, FRESH))
            },
        )
        .await?;

        // Frozen: connections hang.
        let before = metrics(addr).await?;
        redis.signal("-STOP")?;
        phase.store(FROZEN, Ordering::Relaxed);
        tokio::time::sleep(OUTAGE).await;
        let (status, v) = http_json(addr, "GET", "/readyz", None).await?;
        ensure!(status == 200, "degraded, not unready: {v}");
        let frozen = metrics(addr).await?;
        redis.signal("-CONT")?;
        phase.store(THAWED, Ordering::Relaxed);
        for s in [GET_TIMEOUTS, BYPASSED] {
            ensure!(
                metric(&frozen, s) > metric(&before, s),
                "{s} did not rise while Redis was frozen"
            );
        }
        wait_for(
            Duration::from_secs(20),
            "user states read from Redis after the thaw",
            || async {
                let now = metrics(addr).await?;
                Ok(metric(&now, HITS) > metric(&frozen, HITS))
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        anyhow::Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut tallies: Vec<Tally> = PHASES.iter().map(|_| Tally::default()).collect();
    for t in tasks {
        for (i, tally) in t.await?.into_iter().enumerate() {
            tallies[i].merge(tally);
        }
    }
    for (name, t) in PHASES.iter().zip(&tallies) {
        println!(
            "{name:>9}: {:>5} requests, {} failed; latency p50 {:?}, p99 {:?}, max {:?}",
            t.requests,
            t.failures,
            t.quantile(0.5),
            t.quantile(0.99),
            t.quantile(1.0),
        );
    }
    for (name, t) in PHASES.iter().zip(&tallies) {
        for f in &t.first_failures {
            println!("{name}: {f}");
        }
    }
    let text = metrics(addr).await?;
    for s in [HITS, BYPASSED, FOLDED, GET_TIMEOUTS, FRESH, FALLBACK] {
        println!("{s} {}", metric(&text, s));
    }
    outcome?;

    for (name, t) in PHASES.iter().zip(&tallies) {
        ensure!(
            t.failures == 0,
            "{name}: {} of {} requests failed or were wrong, first: {:#?}",
            t.failures,
            t.requests,
            t.first_failures
        );
    }
    for p in [KILLED, FROZEN] {
        ensure!(
            tallies[p].requests >= 50,
            "only {} requests while Redis was {}",
            tallies[p].requests,
            PHASES[p]
        );
    }
    let slowest = tallies[FROZEN].quantile(1.0);
    ensure!(
        slowest < FROZEN_BOUND,
        "an answer took {slowest:?} while Redis was frozen (bound {FROZEN_BOUND:?})"
    );
    drop(scorer);
    Ok(())
}

/// How many of `keys` exist in the Redis at `url`.
async fn cached_states(url: &str, keys: &[String]) -> anyhow::Result<usize> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    Ok(redis::cmd("EXISTS")
        .arg(keys)
        .query_async(&mut conn)
        .await?)
}
