//! Scoring benchmark: `GET /v1/recommendations` (k = 20) and `POST /v1/scores` (100
//! candidates) of a real `recsys-scorer` (started in this process exactly as its binary starts
//! it) under `oha`, a load generator from crates.io, on loopback, against the compute floor:
//! the same top-k scans and dot products in-process, with no HTTP, no routing, no user state
//! and no features.
//!
//! The model (random factors, `--items` × `--factors`, `--users` trained users) is published
//! to a temporary model registry; user states and features live in the real Redis of the test
//! environment, the feature registry and user histories in a fresh Postgres database.
//!
//! A program that prints figures, not a timed test. Build it with `--release`:
//! `cargo run --release -p recsys-tests --bin bench_scoring`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use ndarray::Array2;
use rand::{RngExt as _, SeedableRng as _};
use recsys_core::artifacts::{LocalDirStore, ManifestInput, Registry};
use recsys_core::cf::als::AlsModel;
use recsys_core::cf::interactions::IdMap;
use recsys_core::cf::serving::ServingModel;
use recsys_core::features::online::{OnlineStore, RedisOnlineStore, RedisOnlineStoreOptions};
use recsys_core::features::rankings::{Rankings, write_rankings};
use recsys_core::features::registry::{FeatureRegistry, PostgresFeatureRegistry};
use recsys_core::features::{EntityKey, FeatureRef, FeatureValue, StoredValue, defaults};
use recsys_core::stores::{self, PostgresArgs};
use recsys_tests::TestEnv;

/// Benchmark the scorer against the compute floor.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Products in the model.
    #[arg(long, default_value_t = 30_000)]
    items: usize,
    /// Factors per vector.
    #[arg(long, default_value_t = 64)]
    factors: usize,
    /// Trained users (requests sample them).
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    /// Timed requests per endpoint.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Results per recommendation.
    #[arg(long, default_value_t = 20)]
    k: usize,
    /// Candidates per score request.
    #[arg(long, default_value_t = 100)]
    candidates: usize,
    /// The `oha` binary; installed with `cargo install oha` into the cache when unset.
    #[arg(long, env = "RECSYS_BENCH_OHA")]
    oha: Option<PathBuf>,
    /// oha version installed when `--oha` is unset.
    #[arg(long, default_value = "1.16.0")]
    oha_version: String,
}

/// What oha measured.
#[derive(Debug, Clone)]
struct Figures {
    what: String,
    requests: usize,
    p50_ms: f64,
    p99_ms: f64,
    per_second: f64,
    errors: usize,
}

fn oha_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.oha {
        return Ok(p.clone());
    }
    let home = std::env::var("HOME").context("HOME")?;
    let root = PathBuf::from(home).join(format!(".cache/recsys-bench/oha-{}", args.oha_version));
    let bin = root.join("bin/oha");
    if !bin.exists() {
        eprintln!(
            "installing oha {} into {} (once)",
            args.oha_version,
            root.display()
        );
        let status = Command::new("cargo")
            .args([
                "install",
                "oha",
                "--locked",
                "--version",
                &args.oha_version,
                "--root",
            ])
            .arg(&root)
            .status()?;
        ensure!(status.success(), "cargo install oha failed");
    }
    Ok(bin)
}

/// Runs oha and reads its JSON summary.
fn oha(
    bin: &PathBuf,
    what: &str,
    requests: usize,
    concurrency: usize,
    extra: &[String],
) -> anyhow::Result<Figures> {
    let out = Command::new(bin)
        .args(["--no-tui", "--output-format", "json", "-n"])
        .arg(requests.to_string())
        .arg("-c")
        .arg(concurrency.to_string())
        .args(extra)
        .output()?;
    ensure!(
        out.status.success(),
        "oha failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("oha output: {}", String::from_utf8_lossy(&out.stdout)))?;
    let pct = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let ok = v["statusCodeDistribution"]["200"].as_u64().unwrap_or(0) as usize;
    Ok(Figures {
        what: what.to_owned(),
        requests,
        p50_ms: pct("p50"),
        p99_ms: pct("p99"),
        per_second: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        errors: requests.saturating_sub(ok),
    })
}

/// The compute floor: `work` for every request, on `threads` threads; per-request latency
/// quantiles and throughput.
fn floor(
    what: &str,
    requests: usize,
    threads: usize,
    work: impl Fn(usize) -> f32 + Sync,
) -> Figures {
    let started = Instant::now();
    let mut times: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let work = &work;
                s.spawn(move || {
                    let mut times = vec![];
                    let mut sink = 0.0_f32;
                    for i in (t..requests).step_by(threads) {
                        let at = Instant::now();
                        sink += work(i);
                        times.push(at.elapsed().as_secs_f64() * 1000.0);
                    }
                    std::hint::black_box(sink);
                    times
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let q = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    Figures {
        what: what.to_owned(),
        requests,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        per_second: requests as f64 / elapsed,
        errors: 0,
    }
}

fn print(rows: &[Figures]) {
    println!();
    println!("| run | requests | p50 ms | p99 ms | requests/s | errors |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.0} | {} |",
            r.what, r.requests, r.p50_ms, r.p99_ms, r.per_second, r.errors
        );
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let oha_bin = oha_binary(&args)?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "bench_scoring: {cores} cores, model {} items × {} factors, {} users, k={}, {} candidates, {} requests per run at {} connections (oha)",
        args.items,
        args.factors,
        args.users,
        args.k,
        args.candidates,
        args.requests,
        args.concurrency
    );

    // The model: random factors, published and promoted.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut random = |rows: usize| -> Array2<f32> {
        Array2::from_shape_fn((rows, args.factors), |_| rng.random_range(-0.2..0.2_f32))
    };
    let model = AlsModel {
        user_factors: random(args.users),
        item_factors: random(args.items),
        regularization: 0.05,
    };
    let dir = tempfile::tempdir()?;
    let store = Arc::new(LocalDirStore::new(dir.path().join("artifacts")));
    let registry = Registry::new(store.clone());
    let users = IdMap::from_ids((0..args.users).map(|u| format!("u{u}")).collect());
    let items = IdMap::from_ids((0..args.items).map(|i| format!("p{i}")).collect());
    let version = registry
        .publish("als", &model, &users, &items, ManifestInput::default())
        .await?;
    registry.promote("als", &version).await?;
    let loaded = registry.load("als", &version).await?;
    let serving = ServingModel::new("als", loaded)?;

    // Features: the three first features registered, popularity and freshness of every
    // product and the users' category affinity in Redis; popularity rankings in the store.
    let db = env.fresh_database("bench_scoring").await?;
    let pool = stores::postgres(&PostgresArgs {
        url: db.clone(),
        max_connections: 2,
    })
    .await?;
    recsys_core::events::migrate(&pool).await?;
    let feature_registry = PostgresFeatureRegistry::new(pool.clone());
    feature_registry.migrate().await?;
    for spec in defaults::specs() {
        feature_registry.register(&spec).await?;
    }
    let redis_url = env.var("RECSYS_TEST_REDIS_URL")?.to_owned();
    let prefix = format!("bs{}", std::process::id());
    let online = RedisOnlineStore::connect_lazy(
        &redis_url,
        RedisOnlineStoreOptions::with_prefix(prefix.clone()),
    )?;
    let now = recsys_core::features::online::now_ms();
    let stored = |v: FeatureValue| StoredValue {
        value: v,
        event_time_ms: now,
        written_at_ms: now,
    };
    let categories: BTreeMap<String, String> = (0..args.items)
        .map(|i| (format!("p{i}"), format!("c{}", i % 50)))
        .collect();
    let popularity: Vec<(String, f64)> = (0..args.items)
        .map(|i| (format!("p{i}"), 1.0 / (1.0 + i as f64).sqrt()))
        .collect();
    for (name, value) in [("popularity_score", 0), ("freshness_score", 1)] {
        let values: Vec<(EntityKey, StoredValue)> = popularity
            .iter()
            .map(|(p, s)| {
                let v = if value == 0 { *s } else { 0.5 };
                (
                    EntityKey::product(p.clone()),
                    stored(FeatureValue::Float(v)),
                )
            })
            .collect();
        online
            .write_batch(
                &FeatureRef::new(name, 1),
                Duration::from_secs(3600),
                &values,
            )
            .await?;
    }
    let affinity: Vec<(EntityKey, StoredValue)> = (0..args.users)
        .map(|u| {
            (
                EntityKey::user(format!("u{u}")),
                stored(FeatureValue::String(format!(
                    "{{\"c{}\":0.7,\"c{}\":0.3}}",
                    u % 50,
                    (u + 1) % 50
                ))),
            )
        })
        .collect();
    online
        .write_batch(
            &FeatureRef::new("user_category_affinity", 1),
            Duration::from_secs(36 * 3600),
            &affinity,
        )
        .await?;
    let rankings = Rankings::build(
        &FeatureRef::new("popularity_score", 1),
        now,
        now,
        1000,
        &popularity,
        &categories,
    )?;
    write_rankings(store.as_ref(), &rankings).await?;

    // The scorer, as its binary starts it.
    let scorer_args = recsys_scorer::Args::try_parse_from([
        "recsys-scorer",
        "--database-url",
        &db,
        "--database-migrate",
        "--redis-url",
        &redis_url,
        "--redis-prefix",
        &prefix,
        "--artifacts",
        &dir.path().join("artifacts").to_string_lossy(),
        "--log-filter",
        "warn",
    ])?;
    let scorer = recsys_scorer::start_all(&scorer_args).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = scorer.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = recsys_tests::http_json(addr, "GET", "/readyz", None).await?;
        if status == 200 {
            break;
        }
        if Instant::now() > deadline {
            bail!("scorer not ready: {v}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, sample) = recsys_tests::http_json(
        addr,
        "GET",
        &format!("/v1/recommendations?user_id=u1&k={}", args.k),
        None,
    )
    .await?;
    ensure!(
        sample["path"] == "cf" && sample["items"].as_array().map_or(0, Vec::len) == args.k,
        "{sample}"
    );

    // Requests: users sampled uniformly; candidates a fixed random sample.
    let urls_file = dir.path().join("urls.txt");
    let urls: String = (0..args.requests)
        .map(|i| {
            let u = (i * 7919) % args.users;
            format!(
                "http://{addr}/v1/recommendations?user_id=u{u}&k={}\n",
                args.k
            )
        })
        .collect();
    std::fs::write(&urls_file, urls)?;
    let candidates: Vec<String> = (0..args.candidates)
        .map(|i| format!("p{}", (i * 104_729) % args.items))
        .collect();
    let body = serde_json::json!({"user_id": "u42", "product_ids": candidates}).to_string();

    let mut rows = vec![];
    let rec_args = vec![
        "--urls-from-file".to_owned(),
        urls_file.to_string_lossy().into_owned(),
    ];
    // Warm-up: user states into Redis, code paths hot.
    oha(
        &oha_bin,
        "warm-up",
        args.requests.min(args.users),
        args.concurrency,
        &rec_args,
    )?;
    rows.push(oha(
        &oha_bin,
        "recommendations k=20, scorer over HTTP",
        args.requests,
        args.concurrency,
        &rec_args,
    )?);
    let score_args = vec![
        "-m".to_owned(),
        "POST".to_owned(),
        "-H".to_owned(),
        "content-type: application/json".to_owned(),
        "-d".to_owned(),
        body,
        format!("http://{addr}/v1/scores"),
    ];
    rows.push(oha(
        &oha_bin,
        "scores 100 candidates, scorer over HTTP",
        args.requests,
        args.concurrency,
        &score_args,
    )?);
    drop(scorer);

    // The compute floor, with the same shapes, on every core.
    let rows_of: Vec<u32> = candidates
        .iter()
        .filter_map(|p| serving.item_index(p))
        .collect();
    let users_f = &model.user_factors;
    rows.push(floor(
        "recommendations k=20, compute floor (top-k scan)",
        args.requests,
        cores,
        |i| {
            let u = (i * 7919) % args.users;
            let v = users_f.row(u);
            let v = v.as_slice().unwrap_or_default();
            serving
                .top_k(v, args.k, &[], None)
                .first()
                .map_or(0.0, |t| t.1)
        },
    ));
    rows.push(floor(
        "scores 100 candidates, compute floor (dot products)",
        args.requests,
        cores,
        |_| {
            let v = users_f.row(42);
            serving
                .scores(v.as_slice().unwrap_or_default(), &rows_of)
                .iter()
                .sum()
        },
    ));
    print(&rows);
    println!();
    for (service, compute) in [(0, 2), (1, 3)] {
        let (s, c) = (&rows[service], &rows[compute]);
        println!(
            "{}: throughput {:.2}× the compute floor's, p99 {:.1}× ({:.3} vs {:.3} ms)",
            s.what,
            s.per_second / c.per_second,
            s.p99_ms / c.p99_ms,
            s.p99_ms,
            c.p99_ms
        );
    }
    let rec = &rows[0];
    println!(
        "target p99 ≤ 5 ms at ≥ 2,000 requests/s for recommendations: p99 {:.3} ms at {:.0}/s: {}",
        rec.p99_ms,
        rec.per_second,
        if rec.p99_ms <= 5.0 && rec.per_second >= 2000.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "target within 3× of the compute floor (throughput): {:.2}×: {}",
        rows[2].per_second / rec.per_second,
        if rows[2].per_second / rec.per_second <= 3.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    let _ = online.clear().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn args_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn floor_measures_every_request() {
        let f = floor("noop", 100, 2, |i| i as f32);
        assert_eq!(f.requests, 100);
        assert!(f.per_second > 0.0 && f.p50_ms <= f.p99_ms);
    }
}
