//! Online-feature benchmark: batch reads through the library and over HTTP against the real
//! Redis of the test environment, without and with the near cache (one run per
//! `--cache-entries` size: by default one that holds every user and one that holds a quarter),
//! and (with `--feast`) Feast's SDK and `feast serve` on the same shapes, same values, same
//! Redis, same HTTP client, in the same run. See `tests/bench/features/README.md`.
//!
//! A program that prints figures, not a timed test. Build it with `--release`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use recsys_core::features::online::{
    FeatureReader, NearCacheOptions, NoFallback, OnlineFeature, OnlineStore, ReaderOptions,
    RedisOnlineStore, RedisOnlineStoreOptions, StoreOutcome, now_ms,
};
use recsys_core::features::registry::{FeatureRegistry, FeatureSpec, InProcessFeatureRegistry};
use recsys_core::features::{EntityKey, FeatureRef, FeatureValue, StoredValue};
use recsys_scorer::AppState;
use recsys_scorer::features::http::{BatchRequest, BatchResponse};
use recsys_scorer::features::{FeatureService, ServiceOptions};

/// Benchmark online-feature reads (recsys, optionally against Feast).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Redis URL; the test environment's (`RECSYS_TEST_REDIS_URL`) when unset.
    #[arg(long, env = "RECSYS_BENCH_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Timed requests per shape and path.
    #[arg(long, env = "RECSYS_BENCH_REQUESTS", default_value_t = 2000)]
    requests: usize,
    /// Untimed requests before each measurement.
    #[arg(long, env = "RECSYS_BENCH_WARMUP", default_value_t = 200)]
    warmup: usize,
    /// Users loaded (each request samples its entities from them).
    #[arg(long, env = "RECSYS_BENCH_ENTITIES", default_value_t = 2000)]
    entities: usize,
    /// Concurrent connections (and library tasks) of the concurrent runs.
    #[arg(long, env = "RECSYS_BENCH_CONCURRENCY", default_value_t = 8)]
    concurrency: usize,
    /// Near-cache sizes (entities) to measure, comma-separated; each gets its own store,
    /// reader and HTTP server. Default: `--entities` (every user fits) and a quarter of it
    /// (requests sample users uniformly, so about a quarter of the entities hit). 0: none.
    #[arg(long, env = "RECSYS_BENCH_CACHE_ENTRIES", value_delimiter = ',')]
    cache_entries: Vec<u64>,
    /// Also install Feast into a venv and measure its SDK and `feast serve`.
    #[arg(long, env = "RECSYS_BENCH_FEAST")]
    feast: bool,
    /// Feast version from PyPI.
    #[arg(long, env = "RECSYS_BENCH_FEAST_VERSION", default_value = "0.67.0")]
    feast_version: String,
    /// Timed requests per shape and path on the Feast side (it is slow).
    #[arg(long, env = "RECSYS_BENCH_FEAST_REQUESTS", default_value_t = 300)]
    feast_requests: usize,
    /// Where the Feast venv lives.
    #[arg(long, env = "RECSYS_BENCH_FEAST_VENV")]
    feast_venv: Option<PathBuf>,
    /// Leave the values in Redis afterwards.
    #[arg(long)]
    keep: bool,
}

/// One request shape.
#[derive(Clone, Copy, Debug)]
struct Shape {
    entities: usize,
    features: usize,
}

impl Shape {
    fn label(self) -> String {
        format!("{} × {}", self.entities, self.features)
    }
}

const SHAPES: [Shape; 2] = [
    Shape {
        entities: 100,
        features: 50,
    },
    Shape {
        entities: 1,
        features: 250,
    },
];
const FEATURES: usize = 250;
const TTL: Duration = Duration::from_secs(86_400);

fn value(i: usize, j: usize) -> f64 {
    (i * 1000 + j) as f64 / 7.0
}

fn feature_name(j: usize) -> String {
    format!("f{j:03}")
}

// ---------------------------------------------------------------------------------------------
// Figures

/// Latencies of one run.
#[derive(Clone, Debug)]
struct Run {
    side: String,
    path: &'static str,
    shape: Shape,
    concurrency: usize,
    latencies_ms: Vec<f64>,
    wall: Duration,
    degraded: usize,
    reconnects: usize,
    /// Near-cache hits over lookups during the timed requests.
    hit_rate: Option<f64>,
}

impl Run {
    fn quantile(&self, q: f64) -> f64 {
        let mut v = self.latencies_ms.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        let idx = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        v[idx]
    }

    fn throughput(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.wall.as_secs_f64()
    }
}

fn find<'a>(
    runs: &'a [Run],
    side: &str,
    path: &str,
    shape: Shape,
    concurrency: usize,
) -> Option<&'a Run> {
    runs.iter().find(|r| {
        r.side == side
            && r.path == path
            && r.shape.entities == shape.entities
            && r.shape.features == shape.features
            && r.concurrency == concurrency
    })
}

fn print_table(runs: &[Run]) {
    println!();
    println!(
        "| shape | side | path | connections | requests | p50 ms | p99 ms | requests/s | values/s | degraded | reconnects | cache hits |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        println!(
            "| {} | {} | {} | {} | {} | {:.3} | {:.3} | {:.0} | {:.0} | {} | {} | {} |",
            r.shape.label(),
            r.side,
            r.path,
            r.concurrency,
            r.latencies_ms.len(),
            r.quantile(0.5),
            r.quantile(0.99),
            r.throughput(),
            r.throughput() * (r.shape.entities * r.shape.features) as f64,
            r.degraded,
            r.reconnects,
            r.hit_rate
                .map_or_else(|| "–".to_owned(), |h| format!("{:.1} %", h * 100.0)),
        );
    }
}

fn print_ratios_and_targets(runs: &[Run], concurrency: usize) {
    println!();
    for shape in SHAPES {
        let lib = find(runs, "recsys", "library", shape, 1);
        let http1 = find(runs, "recsys", "HTTP", shape, 1);
        let httpn = find(runs, "recsys", "HTTP", shape, concurrency);
        let sdk = find(runs, "Feast", "SDK", shape, 1);
        let fhttpn = find(runs, "Feast", "HTTP", shape, concurrency);
        let fhttp1 = find(runs, "Feast", "HTTP", shape, 1);
        if let (Some(l), Some(s)) = (lib, sdk) {
            println!(
                "{}: library vs Feast SDK: p50 {:.1}× faster, p99 {:.1}× faster",
                shape.label(),
                s.quantile(0.5) / l.quantile(0.5),
                s.quantile(0.99) / l.quantile(0.99),
            );
        }
        if let (Some(h), Some(f)) = (http1, fhttp1) {
            println!(
                "{}: HTTP sequential vs feast serve: p50 {:.1}× faster, p99 {:.1}× faster",
                shape.label(),
                f.quantile(0.5) / h.quantile(0.5),
                f.quantile(0.99) / h.quantile(0.99),
            );
        }
        if let (Some(h), Some(f)) = (httpn, fhttpn) {
            let ratio = h.throughput() / f.throughput();
            println!(
                "{}: HTTP throughput at {concurrency} connections vs feast serve: {ratio:.1}× (target ≥ 20×: {})",
                shape.label(),
                if ratio >= 20.0 { "met" } else { "NOT met" },
            );
        }
    }
    let a = SHAPES[0];
    if let Some(l) = find(runs, "recsys", "library", a, 1) {
        let p99 = l.quantile(0.99);
        println!(
            "target p99 ≤ 2 ms for {} through the library: {p99:.3} ms, {}",
            a.label(),
            if p99 <= 2.0 { "met" } else { "NOT met" }
        );
    }
    if let Some(h) = find(runs, "recsys", "HTTP", a, 1) {
        let p99 = h.quantile(0.99);
        println!(
            "target p99 ≤ 3 ms for {} through HTTP (sequential): {p99:.3} ms, {}",
            a.label(),
            if p99 <= 3.0 { "met" } else { "NOT met" }
        );
    }
    for r in runs.iter().filter(|r| {
        r.hit_rate.is_some()
            && r.concurrency == 1
            && r.shape.entities == a.entities
            && r.shape.features == a.features
    }) {
        let (p99, limit) = (r.quantile(0.99), if r.path == "HTTP" { 3.0 } else { 2.0 });
        let uncached = find(runs, "recsys", r.path, a, 1).map(|u| u.quantile(0.99));
        println!(
            "target p99 ≤ {limit} ms for {} through {} with {}: {p99:.3} ms at {:.1} % hits, {}{}",
            a.label(),
            r.path,
            r.side,
            r.hit_rate.unwrap_or(0.0) * 100.0,
            if p99 <= limit { "met" } else { "NOT met" },
            uncached.map_or_else(String::new, |u| format!(
                " ({:.1}× the uncached p99)",
                p99 / u
            )),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Request generation (deterministic, outside the timed loops)

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `k` distinct indices below `n`.
    fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut picked = Vec::with_capacity(k);
        while picked.len() < k {
            let i = (self.next() % n as u64) as usize;
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        picked
    }
}

fn requests(shape: Shape, pool: usize, n: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = SplitMix(seed);
    (0..n).map(|_| rng.sample(pool, shape.entities)).collect()
}

fn user(i: usize) -> EntityKey {
    EntityKey::user(format!("u{i}"))
}

// ---------------------------------------------------------------------------------------------
// The HTTP server: the scorer's router, over the benchmark's reader and a registry of its
// features

/// The registry's record of benchmark feature `j`: a float feature of users, 1-day TTL.
fn feature_spec(j: usize) -> anyhow::Result<FeatureSpec> {
    Ok(serde_json::from_value(serde_json::json!({
        "name": feature_name(j),
        "entity": "user",
        "version": "1.0.0",
        "valueType": "float",
        "description": "bench_features value",
        "owner": "bench",
        "computation": {"job": "bench", "logic": "(i * 1000 + j) / 7"},
        "ttl": "1d"
    }))?)
}

/// The scorer's router (feature routes, access-log and metrics layers) serving `reader`.
async fn scorer_router(reader: Arc<FeatureReader>) -> anyhow::Result<axum::Router> {
    let registry = Arc::new(InProcessFeatureRegistry::new());
    for j in 0..FEATURES {
        registry.register(&feature_spec(j)?).await?;
    }
    let service = FeatureService::new(reader, registry, ServiceOptions::default());
    let served = service.refresh().await?;
    ensure!(served == FEATURES, "the catalog has {served} features");
    Ok(recsys_scorer::router(AppState::new(Arc::new(service))))
}

// ---------------------------------------------------------------------------------------------
// Load generation

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A keep-alive HTTP/1.1 connection.
async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One POST on `sender`: status and body.
async fn post_once(
    sender: &mut Sender,
    addr: SocketAddr,
    path: &str,
    body: Bytes,
) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
    sender.ready().await?;
    let req = hyper::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

/// Runs `bodies` against `addr` + `path` over `concurrency` keep-alive HTTP/1.1 connections.
/// A connection the server closes (gunicorn restarts a worker every 1,000 requests) is
/// reopened and the request sent again, the time of both attempts counted, as a client in
/// production would; the number of reconnections is returned.
async fn http_load(
    addr: SocketAddr,
    path: &'static str,
    bodies: Arc<Vec<Bytes>>,
    concurrency: usize,
) -> anyhow::Result<(Vec<f64>, Duration, usize)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, bodies) = (next.clone(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await?;
            let mut lat = Vec::new();
            let mut reconnects = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let t = Instant::now();
                let (status, bytes) = match post_once(&mut sender, addr, path, body.clone()).await {
                    Ok(answer) => answer,
                    Err(_) if reconnects < 100 => {
                        reconnects += 1;
                        sender = connect(addr).await?;
                        post_once(&mut sender, addr, path, body.clone()).await?
                    }
                    Err(e) => return Err(e),
                };
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                ensure!(
                    status.is_success(),
                    "{path}: HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                );
            }
            anyhow::Ok((lat, reconnects))
        }));
    }
    let (mut all, mut reconnects) = (Vec::new(), 0);
    for t in tasks {
        let (lat, r) = t.await??;
        all.extend(lat);
        reconnects += r;
    }
    Ok((all, started.elapsed(), reconnects))
}

/// One HTTP request, its body parsed.
async fn http_once<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
) -> anyhow::Result<T> {
    let mut sender = connect(addr).await?;
    let (status, bytes) = post_once(&mut sender, addr, path, body).await?;
    ensure!(
        status.is_success(),
        "{path}: HTTP {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    Ok(serde_json::from_slice(&bytes)?)
}

async fn library_load(
    reader: Arc<FeatureReader>,
    reqs: Arc<Vec<Vec<EntityKey>>>,
    features: Arc<Vec<OnlineFeature>>,
    concurrency: usize,
) -> anyhow::Result<(Vec<f64>, Duration, usize)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (reader, reqs, features, next) =
            (reader.clone(), reqs.clone(), features.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut degraded = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(entities) = reqs.get(i) else { break };
                let t = Instant::now();
                let b = reader.read(entities, &features).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                if b.store != StoreOutcome::Ok {
                    degraded += 1;
                }
            }
            anyhow::Ok((lat, degraded))
        }));
    }
    let (mut all, mut degraded) = (Vec::new(), 0);
    for t in tasks {
        let (lat, d) = t.await??;
        all.extend(lat);
        degraded += d;
    }
    Ok((all, started.elapsed(), degraded))
}

/// The floor under the library: the same values fetched with a hand-built pipeline of one
/// `HMGET` per entity (as the store does), bytes not decoded, no freshness, no metrics.
async fn raw_hmget_load(
    conn: redis::aio::ConnectionManager,
    prefix: String,
    reqs: Arc<Vec<Vec<usize>>>,
    features: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<f64>, Duration)> {
    let fields: Arc<Vec<String>> = Arc::new(
        (0..features)
            .map(|j| format!("{}:v1", feature_name(j)))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (mut conn, reqs, next, prefix, fields) = (
            conn.clone(),
            reqs.clone(),
            next.clone(),
            prefix.clone(),
            fields.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(ids) = reqs.get(i) else { break };
                let t = Instant::now();
                let mut pipe = redis::pipe();
                for id in ids {
                    pipe.cmd("HMGET")
                        .arg(format!("{prefix}:e:user:u{id}"))
                        .arg(&fields[..]);
                }
                let got: Vec<Vec<Option<Vec<u8>>>> = pipe.query_async(&mut conn).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                ensure!(
                    got.iter().flatten().all(Option::is_some),
                    "raw HMGET: missing values"
                );
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all, started.elapsed()))
}

// ---------------------------------------------------------------------------------------------
// recsys side

struct Recsys {
    store: Arc<RedisOnlineStore>,
    raw: redis::aio::ConnectionManager,
    reader: Arc<FeatureReader>,
    addr: SocketAddr,
    features: Vec<OnlineFeature>,
    cached: Vec<Cached>,
}

/// The same reads through a store with a near cache of `entries` entities, its own reader
/// and its own scorer router.
struct Cached {
    side: String,
    store: Arc<RedisOnlineStore>,
    reader: Arc<FeatureReader>,
    addr: SocketAddr,
}

impl Cached {
    /// Hits and lookups so far.
    fn lookups(&self) -> (u64, u64) {
        self.store
            .near_cache_stats()
            .map_or((0, 0), |s| (s.hits, s.hits + s.misses))
    }
}

/// A reader that never cuts a read short, served by the scorer's router on a port of its own.
async fn serve(store: Arc<RedisOnlineStore>) -> anyhow::Result<(Arc<FeatureReader>, SocketAddr)> {
    // A budget far above any latency measured, so that no read is cut short (a degraded
    // read would be fast and wrong); the `degraded` column must stay 0.
    let options = ReaderOptions {
        budget: Duration::from_secs(5),
        online_timeout: Duration::from_secs(4),
        ..ReaderOptions::default()
    };
    let reader = Arc::new(FeatureReader::new(store, Arc::new(NoFallback), options));
    // The same reader (and Redis connection) behind the scorer's HTTP routes.
    let app = scorer_router(reader.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("server: {e}");
        }
    });
    Ok((reader, addr))
}

async fn recsys_setup(args: &Args, url: &str) -> anyhow::Result<Recsys> {
    let prefix = format!("bench-{:x}", std::process::id());
    let store = Arc::new(RedisOnlineStore::connect_lazy(
        url,
        RedisOnlineStoreOptions::with_prefix(prefix.clone()),
    )?);
    let features: Vec<OnlineFeature> = (0..FEATURES)
        .map(|j| OnlineFeature::new(FeatureRef::new(feature_name(j), 1), TTL))
        .collect();
    let now = now_ms();
    let started = Instant::now();
    for (j, f) in features.iter().enumerate() {
        let values: Vec<_> = (0..args.entities)
            .map(|i| {
                (
                    user(i),
                    StoredValue {
                        value: FeatureValue::Float(value(i, j)),
                        event_time_ms: now,
                        written_at_ms: now,
                    },
                )
            })
            .collect();
        let r = store.write_batch(&f.feature, TTL, &values).await?;
        ensure!(r.written == args.entities as u64, "{f:?}: {r:?}");
    }
    let took = started.elapsed();
    let n = args.entities * FEATURES;
    println!(
        "recsys: wrote {n} values in {:.2} s ({:.0} values/s, compare-and-set script, 1,000 per call)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    let stats = store.stats().await?;
    println!(
        "recsys: {} values, ~{:.1} MB in Redis (~{} bytes per value, MEMORY USAGE sample)",
        stats.keys(),
        stats.bytes() as f64 / 1e6,
        stats.bytes() / stats.keys().max(1)
    );
    let (reader, addr) = serve(store.clone()).await?;
    let sizes = if args.cache_entries.is_empty() {
        vec![args.entities as u64, (args.entities as u64 / 4).max(1)]
    } else {
        args.cache_entries
            .iter()
            .copied()
            .filter(|&n| n > 0)
            .collect()
    };
    let mut cached = Vec::new();
    for entries in sizes {
        let store = Arc::new(RedisOnlineStore::connect_lazy(
            url,
            RedisOnlineStoreOptions {
                near_cache: Some(NearCacheOptions::with_entries(entries)),
                ..RedisOnlineStoreOptions::with_prefix(prefix.clone())
            },
        )?);
        let (reader, addr) = serve(store.clone()).await?;
        cached.push(Cached {
            side: format!("recsys + near cache of {entries}"),
            store,
            reader,
            addr,
        });
    }
    let raw = recsys_core::stores::redis(&recsys_core::stores::RedisArgs {
        url: url.to_owned(),
    })
    .await?;
    Ok(Recsys {
        store,
        raw,
        reader,
        addr,
        features,
        cached,
    })
}

async fn recsys_check(r: &Recsys) -> anyhow::Result<()> {
    // The library and the HTTP routes return what was written, with and without the near
    // cache (twice for the cache: filled, then served from it).
    let paths = std::iter::once(("recsys", &r.reader, r.addr)).chain(
        r.cached
            .iter()
            .map(|c| (c.side.as_str(), &c.reader, c.addr)),
    );
    for (side, reader, addr) in paths {
        for _ in 0..2 {
            let b = reader
                .read(&[user(7)], &r.features[..3])
                .await
                .with_context(|| format!("{side}: library read"))?;
            ensure!(
                b.get(0, 2).value == Some(FeatureValue::Float(value(7, 2))),
                "{side}: {:?}",
                b.get(0, 2)
            );
            let body = serde_json::to_vec(&BatchRequest {
                entities: vec![user(7), user(8)],
                features: vec![feature_name(0), format!("{}@v1", feature_name(249))],
            })?;
            let resp: BatchResponse = http_once(addr, "/v1/features/batch", body.into()).await?;
            let got = serde_json::to_value(&resp.rows[1].values[1])?;
            ensure!(
                // serde_json parses floats to within an ulp (no `float_roundtrip`).
                got.as_f64()
                    .is_some_and(|g| (g - value(8, 249)).abs() < 1e-9),
                "{side}: HTTP returned {got} for u8/f249"
            );
        }
    }
    Ok(())
}

/// One reader (and its HTTP server) to measure.
struct Target<'a> {
    side: String,
    reader: Arc<FeatureReader>,
    addr: SocketAddr,
    cache: Option<&'a Cached>,
}

impl Target<'_> {
    fn lookups(&self) -> Option<(u64, u64)> {
        self.cache.map(Cached::lookups)
    }
}

fn hit_rate(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((h0, n0), (h1, n1)) = (before?, after?);
    Some((h1 - h0) as f64 / (n1 - n0).max(1) as f64)
}

async fn recsys_runs(args: &Args, r: &Recsys) -> anyhow::Result<Vec<Run>> {
    let targets: Vec<Target> = std::iter::once(Target {
        side: "recsys".into(),
        reader: r.reader.clone(),
        addr: r.addr,
        cache: None,
    })
    .chain(r.cached.iter().map(|c| Target {
        side: c.side.clone(),
        reader: c.reader.clone(),
        addr: c.addr,
        cache: Some(c),
    }))
    .collect();
    let mut runs = Vec::new();
    for (s, shape) in SHAPES.into_iter().enumerate() {
        let features = Arc::new(r.features[..shape.features].to_vec());
        let all = requests(
            shape,
            args.entities,
            args.warmup + args.requests,
            42 + s as u64,
        );
        let keys: Vec<Vec<EntityKey>> = all
            .iter()
            .map(|ids| ids.iter().map(|&i| user(i)).collect())
            .collect();
        let (warm_ids, timed_ids) = all.split_at(args.warmup);
        for conc in [1, args.concurrency] {
            let floor = |reqs: &[Vec<usize>]| {
                raw_hmget_load(
                    r.raw.clone(),
                    r.store.prefix().to_owned(),
                    Arc::new(reqs.to_vec()),
                    shape.features,
                    conc,
                )
            };
            floor(warm_ids).await?;
            let (lat, wall) = floor(timed_ids).await?;
            runs.push(Run {
                side: "Redis floor".into(),
                path: "raw HMGET",
                shape,
                concurrency: conc,
                latencies_ms: lat,
                wall,
                degraded: 0,
                reconnects: 0,
                hit_rate: None,
            });
        }
        let (warm, timed) = keys.split_at(args.warmup);
        for t in &targets {
            for conc in [1, args.concurrency] {
                library_load(
                    t.reader.clone(),
                    Arc::new(warm.to_vec()),
                    features.clone(),
                    conc,
                )
                .await?;
                let before = t.lookups();
                let (lat, wall, degraded) = library_load(
                    t.reader.clone(),
                    Arc::new(timed.to_vec()),
                    features.clone(),
                    conc,
                )
                .await?;
                runs.push(Run {
                    side: t.side.clone(),
                    path: "library",
                    shape,
                    concurrency: conc,
                    latencies_ms: lat,
                    wall,
                    degraded,
                    reconnects: 0,
                    hit_rate: hit_rate(before, t.lookups()),
                });
            }
        }
        let names: Vec<String> = features.iter().map(|f| f.feature.name.clone()).collect();
        let bodies: Vec<Bytes> = keys
            .iter()
            .map(|entities| {
                serde_json::to_vec(&BatchRequest {
                    entities: entities.clone(),
                    features: names.clone(),
                })
                .map(Bytes::from)
            })
            .collect::<Result<_, _>>()?;
        let (warm, timed) = bodies.split_at(args.warmup);
        for t in &targets {
            for conc in [1, args.concurrency] {
                http_load(t.addr, "/v1/features/batch", Arc::new(warm.to_vec()), conc).await?;
                let before = t.lookups();
                let (lat, wall, reconnects) =
                    http_load(t.addr, "/v1/features/batch", Arc::new(timed.to_vec()), conc).await?;
                runs.push(Run {
                    side: t.side.clone(),
                    path: "HTTP",
                    shape,
                    concurrency: conc,
                    latencies_ms: lat,
                    wall,
                    degraded: 0,
                    reconnects,
                    hit_rate: hit_rate(before, t.lookups()),
                });
            }
        }
    }
    for c in &r.cached {
        if let Some(st) = c.store.near_cache_stats() {
            println!(
                "{}: {} entities held (~{:.1} MB), {} evictions, {} invalidations, hit rate {:.1} % overall",
                c.side,
                st.entries,
                st.bytes as f64 / 1e6,
                st.evictions,
                st.push_invalidations + st.local_invalidations,
                st.hit_rate() * 100.0
            );
        }
    }
    Ok(runs)
}

// ---------------------------------------------------------------------------------------------
// Feast side

struct Feast {
    venv: PathBuf,
    script: PathBuf,
    repo: PathBuf,
}

/// A `feast serve` process group, ended when dropped.
struct FeastServer {
    child: Child,
}

impl Drop for FeastServer {
    fn drop(&mut self) {
        // gunicorn forks workers: end the process group this program started.
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

fn run_checked(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn last_json(stdout: &str) -> anyhow::Result<serde_json::Value> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON line in the output")?;
    Ok(serde_json::from_str(line)?)
}

/// `redis://host:port/db` → Feast's `host:port[,db=N]`.
fn feast_connection_string(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("redis://")
        .context("only redis:// URLs are supported for Feast")?;
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let (host, db) = rest.split_once('/').unwrap_or((rest, ""));
    Ok(match db.trim_matches('/') {
        "" | "0" => host.to_owned(),
        db => format!("{host},db={db}"),
    })
}

impl Feast {
    fn venv_dir(args: &Args) -> anyhow::Result<PathBuf> {
        if let Some(v) = &args.feast_venv {
            return Ok(v.clone());
        }
        let home = std::env::var("HOME").context("HOME")?;
        Ok(Path::new(&home).join(".cache/recsys/feast-venv"))
    }

    fn install(args: &Args) -> anyhow::Result<PathBuf> {
        let venv = Self::venv_dir(args)?;
        let feast = venv.join("bin/feast");
        let installed = Command::new(&feast)
            .arg("version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(&args.feast_version))
            .unwrap_or(false);
        if !installed {
            println!(
                "feast: installing feast[redis]=={} into {} ...",
                args.feast_version,
                venv.display()
            );
            if !venv.join("bin/python").exists() {
                run_checked(
                    Command::new("python3").arg("-m").arg("venv").arg(&venv),
                    "python3 -m venv",
                )?;
            }
            run_checked(
                Command::new(venv.join("bin/pip")).args([
                    "install",
                    "--quiet",
                    &format!("feast[redis]=={}", args.feast_version),
                ]),
                "pip install feast",
            )?;
        }
        let version = run_checked(Command::new(&feast).arg("version"), "feast version")?;
        println!("feast: {}", version.trim());
        Ok(venv)
    }

    fn setup(args: &Args, url: &str) -> anyhow::Result<Self> {
        let venv = Self::install(args)?;
        let script = recsys_tests::repo_root().join("tests/bench/features/feast_side.py");
        let repo = std::env::temp_dir().join(format!("recsys-bench-feast-{}", std::process::id()));
        let project = format!("rsbench{}", std::process::id());
        let out = run_checked(
            Command::new(venv.join("bin/python"))
                .arg(&script)
                .args(["setup", "--repo"])
                .arg(&repo)
                .args(["--redis", &feast_connection_string(url)?])
                .args(["--project", &project])
                .args(["--entities", &args.entities.to_string()])
                .args(["--features", &FEATURES.to_string()]),
            "feast setup",
        )?;
        let info = last_json(&out)?;
        println!(
            "feast: wrote {} values through write_to_online_store in {:.2} s",
            info["loaded_values"],
            info["seconds"].as_f64().unwrap_or(f64::NAN)
        );
        Ok(Self { venv, script, repo })
    }

    fn sdk(&self, args: &Args, shape: Shape) -> anyhow::Result<Run> {
        let out = run_checked(
            Command::new(self.venv.join("bin/python"))
                .arg(&self.script)
                .args(["sdk", "--repo"])
                .arg(&self.repo)
                .args(["--entities", &args.entities.to_string()])
                .args(["--n-entities", &shape.entities.to_string()])
                .args(["--n-features", &shape.features.to_string()])
                .args(["--requests", &args.feast_requests.to_string()])
                .args(["--warmup", "20"]),
            "feast sdk",
        )?;
        let lat: Vec<f64> = serde_json::from_value(last_json(&out)?["latencies_ms"].clone())?;
        // Sequential: the wall time is the sum of the latencies.
        let wall = Duration::from_secs_f64(lat.iter().sum::<f64>() / 1000.0);
        Ok(Run {
            side: "Feast".into(),
            path: "SDK",
            shape,
            concurrency: 1,
            latencies_ms: lat,
            wall,
            degraded: 0,
            reconnects: 0,
            hit_rate: None,
        })
    }

    async fn serve(&self) -> anyhow::Result<(FeastServer, SocketAddr)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let log = std::fs::File::create(self.repo.join("serve.log"))?;
        use std::os::unix::process::CommandExt as _;
        let child = Command::new(self.venv.join("bin/feast"))
            .arg("-c")
            .arg(&self.repo)
            .args(["serve", "-h", "127.0.0.1", "-p", &port.to_string()])
            .arg("--no-access-log")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting feast serve")?;
        let server = FeastServer { child };
        recsys_tests::wait_for(Duration::from_secs(120), "feast serve", || async {
            Ok(tokio::net::TcpStream::connect(addr).await.is_ok())
        })
        .await
        .with_context(|| format!("see {}", self.repo.join("serve.log").display()))?;
        Ok((server, addr))
    }

    fn bodies(reqs: &[Vec<usize>], shape: Shape) -> anyhow::Result<Vec<Bytes>> {
        let feats: Vec<String> = (0..shape.features)
            .map(|j| format!("bench_fv:{}", feature_name(j)))
            .collect();
        reqs.iter()
            .map(|ids| {
                let users: Vec<String> = ids.iter().map(|i| format!("u{i}")).collect();
                serde_json::to_vec(&serde_json::json!({
                    "features": feats,
                    "entities": { "user_id": users },
                }))
                .map(Bytes::from)
                .map_err(Into::into)
            })
            .collect()
    }

    async fn http_runs(&self, args: &Args) -> anyhow::Result<Vec<Run>> {
        let (_server, addr) = self.serve().await?;
        let mut runs = Vec::new();
        for (s, shape) in SHAPES.into_iter().enumerate() {
            let reqs = requests(
                shape,
                args.entities,
                20 + args.feast_requests,
                99 + s as u64,
            );
            let bodies = Self::bodies(&reqs, shape)?;
            // Correctness once.
            let resp: serde_json::Value =
                http_once(addr, "/get-online-features", bodies[0].clone()).await?;
            let names = resp["metadata"]["feature_names"]
                .as_array()
                .context("feast answer")?;
            let last = feature_name(shape.features - 1);
            let col = names
                .iter()
                .position(|n| n.as_str() == Some(last.as_str()))
                .context("feature column")?;
            let got = resp["results"][col]["values"][0].as_f64();
            ensure!(
                got.is_some_and(|g| (g - value(reqs[0][0], shape.features - 1)).abs() < 1e-9),
                "feast serve returned {got:?}"
            );
            let (warm, timed) = bodies.split_at(20);
            for conc in [1, args.concurrency] {
                http_load(addr, "/get-online-features", Arc::new(warm.to_vec()), conc).await?;
                let (lat, wall, reconnects) =
                    http_load(addr, "/get-online-features", Arc::new(timed.to_vec()), conc).await?;
                runs.push(Run {
                    side: "Feast".into(),
                    path: "HTTP",
                    shape,
                    concurrency: conc,
                    latencies_ms: lat,
                    wall,
                    degraded: 0,
                    reconnects,
                    hit_rate: None,
                });
            }
        }
        Ok(runs)
    }

    fn teardown(&self) {
        let result = run_checked(
            Command::new(self.venv.join("bin/python"))
                .arg(&self.script)
                .args(["teardown", "--repo"])
                .arg(&self.repo),
            "feast teardown",
        );
        if let Err(e) = result {
            eprintln!("feast: teardown failed: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&self.repo);
    }
}

// ---------------------------------------------------------------------------------------------

async fn run(args: Args) -> anyhow::Result<()> {
    let url = match &args.redis_url {
        Some(u) => u.clone(),
        None => recsys_tests::TestEnv::load()?
            .var("RECSYS_TEST_REDIS_URL")?
            .to_owned(),
    };
    if cfg!(debug_assertions) {
        println!("WARNING: a debug build; figures are meaningless. Use --release.");
    }
    println!(
        "bench_features: {} cores, redis {}, {} users × {FEATURES} float features, {} requests per run ({} warm-up), {} connections",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        recsys_core::stores::redact_url(&url),
        args.entities,
        args.requests,
        args.warmup,
        args.concurrency
    );
    let r = recsys_setup(&args, &url).await?;
    let outcome = async {
        recsys_check(&r).await?;
        let mut runs = recsys_runs(&args, &r).await?;
        print_table(&runs);
        if args.feast {
            match Feast::setup(&args, &url) {
                Ok(feast) => {
                    let result = async {
                        for shape in SHAPES {
                            runs.push(feast.sdk(&args, shape)?);
                        }
                        runs.extend(feast.http_runs(&args).await?);
                        anyhow::Ok(())
                    }
                    .await;
                    feast.teardown();
                    if let Err(e) = result {
                        println!("\nFeast side failed: {e:#}");
                    }
                }
                Err(e) => println!("\nFeast side failed: {e:#}"),
            }
            print_table(&runs);
        }
        print_ratios_and_targets(&runs, args.concurrency);
        anyhow::Ok(())
    }
    .await;
    if !args.keep {
        let removed = r.store.clear().await?;
        println!("recsys: removed {removed} keys");
    }
    outcome
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
    fn feast_connection_strings() {
        assert_eq!(
            feast_connection_string("redis://127.0.0.1:56379/").expect("ok"),
            "127.0.0.1:56379"
        );
        assert_eq!(
            feast_connection_string("redis://h:1/3").expect("ok"),
            "h:1,db=3"
        );
    }

    #[tokio::test]
    async fn the_scorer_serves_the_benchmark_features() {
        for j in [0, FEATURES - 1] {
            feature_spec(j).expect("spec").validate().expect("valid");
        }
        let store = Arc::new(recsys_core::features::online::InProcessOnlineStore::new());
        let now = now_ms();
        let stored = StoredValue {
            value: FeatureValue::Float(value(3, 249)),
            event_time_ms: now,
            written_at_ms: now,
        };
        store
            .write_batch(
                &FeatureRef::new(feature_name(249), 1),
                TTL,
                &[(user(3), stored)],
            )
            .await
            .expect("write");
        let reader = Arc::new(FeatureReader::new(
            store,
            Arc::new(NoFallback),
            ReaderOptions::default(),
        ));
        let app = scorer_router(reader)
            .await
            .expect("router over 250 features");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let body = serde_json::to_vec(&BatchRequest {
            entities: vec![user(3)],
            features: vec![feature_name(249), feature_name(0)],
        })
        .expect("body");
        let resp: BatchResponse = http_once(addr, "/v1/features/batch", body.into())
            .await
            .expect("HTTP");
        let got = serde_json::to_value(&resp.rows[0].values).expect("json");
        assert!(
            got[0]
                .as_f64()
                .is_some_and(|g| (g - value(3, 249)).abs() < 1e-9),
            "{got}"
        );
        assert_eq!(got[1], serde_json::Value::Null);
    }

    #[test]
    fn quantiles_and_samples() {
        let run = Run {
            side: "x".into(),
            path: "y",
            shape: SHAPES[0],
            concurrency: 1,
            latencies_ms: (1..=100).map(f64::from).collect(),
            wall: Duration::from_secs(1),
            degraded: 0,
            reconnects: 0,
            hit_rate: None,
        };
        assert_eq!(run.quantile(0.5), 50.0);
        assert_eq!(run.quantile(0.99), 99.0);
        let mut rng = SplitMix(1);
        let s = rng.sample(10, 10);
        let mut sorted = s.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    }
}
