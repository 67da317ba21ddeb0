//! Scoring benchmark: `GET /v1/recommendations` (k = 20) and `POST /v1/scores` (100
//! candidates) of a real `recsys-scorer` (started in this process exactly as its binary starts
//! it) under `oha`, a load generator from crates.io, on loopback, against the compute floor:
//! the same top-k scans and dot products in-process, with no HTTP, no routing, no user state
//! and no features.
//!
//! The model (random factors, `--items` × `--factors`, `--users` trained users) is published
//! to a temporary model registry; user states and features live in the real Redis of the test
//! environment, the feature registry and user histories (`--history` products per user, left
//! out of the answers) in a fresh Postgres database.
//!
//! With `--implicit`, the same model is also served the way a team would serve it without
//! recsys: the `implicit` library's `recommend()` behind FastAPI under uvicorn
//! (`tests/bench/scoring/implicit_side.py`, in a venv cached under `~/.cache/recsys-bench`),
//! loaded with the same factors and histories and under the same load; the ratios are
//! printed. See `tests/bench/scoring/README.md`.
//!
//! A program that prints figures, not a timed test. Build it with `--release`:
//! `cargo run --release -p recsys-tests --bin bench_scoring`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use ndarray::Array2;
use rand::{RngExt as _, SeedableRng as _};
use recsys_core::artifacts::{LocalDirStore, ManifestInput, Registry};
use recsys_core::cf::als::AlsModel;
use recsys_core::cf::interactions::{Event, EventType, IdMap};
use recsys_core::cf::serving::ServingModel;
use recsys_core::events::{EventRow, PostgresEvents};
use recsys_core::features::online::{OnlineStore, RedisOnlineStore, RedisOnlineStoreOptions};
use recsys_core::features::rankings::{Rankings, write_rankings};
use recsys_core::features::registry::{FeatureRegistry, PostgresFeatureRegistry};
use recsys_core::features::{EntityKey, FeatureRef, FeatureValue, StoredValue, defaults};
use recsys_core::stores::{self, PostgresArgs};
use recsys_tests::TestEnv;

/// Benchmark the scorer against the compute floor (and, with `--implicit`, against the
/// `implicit` library behind FastAPI).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Products in the model.
    #[arg(long, env = "RECSYS_BENCH_ITEMS", default_value_t = 30_000)]
    items: usize,
    /// Factors per vector.
    #[arg(long, env = "RECSYS_BENCH_FACTORS", default_value_t = 64)]
    factors: usize,
    /// Trained users (requests sample them).
    #[arg(long, env = "RECSYS_BENCH_USERS", default_value_t = 20_000)]
    users: usize,
    /// Products in each user's history; the answers leave them out.
    #[arg(long, env = "RECSYS_BENCH_HISTORY", default_value_t = 10)]
    history: usize,
    /// Timed requests per endpoint.
    #[arg(long, env = "RECSYS_BENCH_REQUESTS", default_value_t = 20_000)]
    requests: usize,
    /// Concurrent connections of the load generator.
    #[arg(long, env = "RECSYS_BENCH_CONCURRENCY", default_value_t = 8)]
    concurrency: usize,
    /// Results per recommendation.
    #[arg(long, env = "RECSYS_BENCH_K", default_value_t = 20)]
    k: usize,
    /// Candidates per score request.
    #[arg(long, env = "RECSYS_BENCH_CANDIDATES", default_value_t = 100)]
    candidates: usize,
    /// The `oha` binary; installed with `cargo install oha` into the cache when unset.
    #[arg(long, env = "RECSYS_BENCH_OHA")]
    oha: Option<PathBuf>,
    /// oha version installed when `--oha` is unset.
    #[arg(long, env = "RECSYS_BENCH_OHA_VERSION", default_value = "1.16.0")]
    oha_version: String,
    /// Also serve the same model with the `implicit` library behind FastAPI under uvicorn
    /// (installed from PyPI into a cached venv) and load it the same way.
    #[arg(long, env = "RECSYS_BENCH_IMPLICIT")]
    implicit: bool,
    /// implicit version from PyPI.
    #[arg(long, env = "RECSYS_BENCH_IMPLICIT_VERSION", default_value = "0.7.3")]
    implicit_version: String,
    /// The implicit venv; `~/.cache/recsys-bench/implicit-venv-<version>` when unset.
    #[arg(long, env = "RECSYS_BENCH_IMPLICIT_VENV")]
    implicit_venv: Option<PathBuf>,
    /// uvicorn worker processes of the implicit service. 2 (one per core here) gives implicit
    /// its best figure: one worker reached 60 % of it.
    #[arg(long, env = "RECSYS_BENCH_IMPLICIT_WORKERS", default_value_t = 2)]
    implicit_workers: usize,
    /// Timed requests against the implicit service; `--requests` when unset.
    #[arg(long, env = "RECSYS_BENCH_IMPLICIT_REQUESTS")]
    implicit_requests: Option<usize>,
    /// The Python (3.9–3.13) that creates the implicit venv.
    #[arg(long, env = "RECSYS_BENCH_PYTHON", default_value = "python3")]
    python: String,
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
    bin: &Path,
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

// ---------------------------------------------------------------------------------------------
// The implicit side: what a team would write without recsys

/// Pinned next to `implicit==<version>`: the versions measured.
const IMPLICIT_REQUIREMENTS: [&str; 4] = [
    "fastapi==0.165.0",
    "uvicorn[standard]==0.54.0",
    "numpy==2.4.6",
    "scipy==1.17.1",
];

/// The implicit venv, installed.
struct Implicit {
    python: PathBuf,
    version: String,
    workers: usize,
}

/// A uvicorn process group, ended when dropped.
struct ImplicitServer {
    child: Child,
    log: PathBuf,
}

impl ImplicitServer {
    /// The last lines of the server's log.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ImplicitServer {
    fn drop(&mut self) {
        // uvicorn forks its workers: end the process group this program started.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

impl Implicit {
    fn requirements(version: &str) -> Vec<String> {
        std::iter::once(format!("implicit=={version}"))
            .chain(IMPLICIT_REQUIREMENTS.iter().map(|r| (*r).to_owned()))
            .collect()
    }

    /// Creates the venv and installs the pinned requirements unless a previous run did.
    fn install(args: &Args) -> anyhow::Result<Self> {
        let venv = match &args.implicit_venv {
            Some(v) => v.clone(),
            None => PathBuf::from(std::env::var("HOME").context("HOME")?).join(format!(
                ".cache/recsys-bench/implicit-venv-{}",
                args.implicit_version
            )),
        };
        let python = recsys_tests::Venv {
            dir: venv,
            python: args.python.clone(),
            requirements: Self::requirements(&args.implicit_version),
        }
        .ensure()?;
        ensure!(
            args.implicit_workers > 0,
            "--implicit-workers must be at least 1"
        );
        Ok(Self {
            python,
            version: args.implicit_version.clone(),
            workers: args.implicit_workers,
        })
    }

    fn label(&self) -> String {
        format!(
            "recommendations k=20, implicit {} + FastAPI (uvicorn, {} worker{})",
            self.version,
            self.workers,
            if self.workers == 1 { "" } else { "s" }
        )
    }

    /// Writes the model, the histories and the id maps in the layout `implicit_side.py`
    /// reads: raw little-endian arrays, exact.
    fn write_model(dir: &Path, model: &AlsModel, seen: &[Vec<u32>]) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let (users, factors) = model.user_factors.dim();
        let items = model.item_factors.nrows();
        std::fs::write(
            dir.join("params.json"),
            serde_json::json!({"users": users, "items": items, "factors": factors}).to_string(),
        )?;
        let f32s =
            |m: &Array2<f32>| -> Vec<u8> { m.iter().flat_map(|x| x.to_le_bytes()).collect() };
        std::fs::write(dir.join("user_factors.f32"), f32s(&model.user_factors))?;
        std::fs::write(dir.join("item_factors.f32"), f32s(&model.item_factors))?;
        let mut indptr = vec![0_i32];
        let mut indices = vec![];
        for rows in seen {
            indices.extend(rows.iter().map(|&r| r as i32));
            indptr.push(i32::try_from(indices.len()).context("too many interactions")?);
        }
        let i32s = |v: &[i32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        std::fs::write(dir.join("seen_indptr.i32"), i32s(&indptr))?;
        std::fs::write(dir.join("seen_indices.i32"), i32s(&indices))?;
        let ids = |prefix: &str, n: usize| -> String {
            (0..n).map(|i| format!("{prefix}{i}\n")).collect()
        };
        std::fs::write(dir.join("user_ids.txt"), ids("u", users))?;
        std::fs::write(dir.join("item_ids.txt"), ids("p", items))?;
        Ok(())
    }

    /// Starts `uvicorn implicit_side:app` over the model in `data` and waits until it answers.
    async fn serve(&self, data: &Path) -> anyhow::Result<(ImplicitServer, SocketAddr)> {
        use std::os::unix::process::CommandExt as _;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let log = data.join("uvicorn.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&self.python)
            .args(["-m", "uvicorn", "implicit_side:app", "--app-dir"])
            .arg(recsys_tests::repo_root().join("tests/bench/scoring"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--workers", &self.workers.to_string()])
            .args(["--no-access-log", "--log-level", "warning"])
            .env("RECSYS_BENCH_IMPLICIT_DATA", data)
            // uvicorn imports the script from the repository: no __pycache__ there.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            // One BLAS thread per worker (implicit's own advice), and without this machine's
            // OpenBLAS core-type overrides, which slow a current numpy.
            .env("OPENBLAS_NUM_THREADS", "1")
            .env("MKL_NUM_THREADS", "1")
            .env_remove("OPENBLAS_CORETYPE")
            .env_remove("OPENBLAS_L2_SIZE")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .context("starting uvicorn")?;
        let mut server = ImplicitServer { child, log };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("uvicorn exited ({status}):\n{}", server.log_tail());
            }
            if let Ok((200, _)) = recsys_tests::http_json(addr, "GET", "/healthz", None).await {
                // Every worker has loaded the model once the first answers; wait for the rest.
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Ok((server, addr));
            }
            if Instant::now() > deadline {
                bail!("uvicorn not ready after 120 s:\n{}", server.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `(product id, score)` of an answer's items; the score under `score_field`.
fn answer_items(answer: &serde_json::Value, score_field: &str) -> Vec<(String, f64)> {
    answer["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    (
                        i["product_id"].as_str().unwrap_or_default().to_owned(),
                        i[score_field].as_f64().unwrap_or(f64::NAN),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How well the two services agree for a few users.
#[derive(Debug, Default)]
struct Agreement {
    users: usize,
    /// Users whose top-k from implicit is the scorer's CF scan, in order.
    same_top: usize,
    /// Largest score difference over those lists.
    max_score_diff: f64,
    /// Products in the scorer's answers.
    answered: usize,
    /// Of those, products in implicit's top `k × overfetch` with the same score.
    matched: usize,
    /// Products of the user's history in either answer.
    seen_returned: usize,
    /// The first difference, described.
    first_difference: Option<String>,
}

/// Compares, for `users`, implicit's answers with the scorer's CF scan (the same top-k scan
/// the scorer runs for its candidates, with the user's history left out) and with the
/// scorer's own answers (re-ranked with the feature-store signals, so only their CF scores
/// can be compared: each must be in implicit's top `k × overfetch`, with the same score).
async fn compare(
    implicit: SocketAddr,
    scorer: SocketAddr,
    serving: &ServingModel,
    model: &AlsModel,
    seen: &[Vec<u32>],
    users: &[usize],
    k: usize,
) -> anyhow::Result<Agreement> {
    let overfetch = recsys_scorer::recommend::service::RecommendOptions::default()
        .overfetch
        .max(1);
    let get = |addr: SocketAddr, path: String| async move {
        let (status, v) = recsys_tests::http_json(addr, "GET", &path, None).await?;
        ensure!(status == 200, "GET {path}: HTTP {status}: {v}");
        anyhow::Ok(v)
    };
    let mut a = Agreement::default();
    for &u in users {
        a.users += 1;
        let query = |k: usize| format!("/v1/recommendations?user_id=u{u}&k={k}");
        let theirs = answer_items(&get(implicit, query(k)).await?, "score");
        let wide: HashMap<String, f64> =
            answer_items(&get(implicit, query(k * overfetch)).await?, "score")
                .into_iter()
                .collect();
        let ours_answer = answer_items(&get(scorer, query(k)).await?, "user_product_affinity");
        let user = model.user_factors.row(u);
        let scan: Vec<(String, f64)> = serving
            .top_k(user.as_slice().unwrap_or_default(), k, &seen[u], None)
            .into_iter()
            .map(|(row, s)| {
                (
                    serving.item_id(row).unwrap_or_default().to_owned(),
                    f64::from(s),
                )
            })
            .collect();
        let seen_ids: Vec<String> = seen[u].iter().map(|r| format!("p{r}")).collect();
        a.seen_returned += theirs
            .iter()
            .chain(&ours_answer)
            .filter(|(p, _)| seen_ids.contains(p))
            .count();
        let ids = |v: &[(String, f64)]| v.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
        if ids(&theirs) == ids(&scan) {
            a.same_top += 1;
            for ((_, x), (_, y)) in theirs.iter().zip(&scan) {
                a.max_score_diff = a.max_score_diff.max((x - y).abs());
            }
        } else if a.first_difference.is_none() {
            a.first_difference = Some(format!(
                "u{u}: implicit {:?}, scorer's scan {:?}",
                ids(&theirs),
                ids(&scan)
            ));
        }
        for (p, s) in &ours_answer {
            a.answered += 1;
            if wide.get(p).is_some_and(|t| (t - s).abs() < 1e-4) {
                a.matched += 1;
            } else if a.first_difference.is_none() {
                a.first_difference = Some(format!(
                    "u{u}: the scorer answered {p} (CF score {s}), implicit's top {} has {:?}",
                    k * overfetch,
                    wide.get(p)
                ));
            }
        }
    }
    Ok(a)
}

/// Serves the model with implicit, checks the answers against the scorer's, and loads it
/// with the same URLs (the scorer's address swapped for implicit's) as the scorer.
#[allow(clippy::too_many_arguments)]
async fn implicit_run(
    implicit: &Implicit,
    args: &Args,
    oha_bin: &Path,
    data: &Path,
    scorer: SocketAddr,
    serving: &ServingModel,
    model: &AlsModel,
    seen: &[Vec<u32>],
) -> anyhow::Result<Figures> {
    Implicit::write_model(data, model, seen)?;
    let (server, addr) = implicit.serve(data).await?;
    let check_users: Vec<usize> = [0, 1, 42, 7919, 12_345, args.users - 1]
        .into_iter()
        .map(|u| u % args.users)
        .collect();
    let a = compare(addr, scorer, serving, model, seen, &check_users, args.k).await?;
    println!(
        "agreement: implicit's top {} = the scorer's CF scan for {}/{} users (same factors, \
         history left out; largest score difference {:.1e}); {}/{} products of the scorer's \
         answers are in implicit's top {} with the same CF score; {} products of a user's \
         history returned",
        args.k,
        a.same_top,
        a.users,
        a.max_score_diff,
        a.matched,
        a.answered,
        args.k * recsys_scorer::recommend::service::RecommendOptions::default().overfetch,
        a.seen_returned
    );
    if let Some(d) = &a.first_difference {
        println!("agreement: FIRST DIFFERENCE {d}");
    }
    let requests = args.implicit_requests.unwrap_or(args.requests);
    let urls_file = data.join("urls.txt");
    std::fs::write(&urls_file, urls(addr, requests, args))?;
    let url_args = vec![
        "--urls-from-file".to_owned(),
        urls_file.to_string_lossy().into_owned(),
    ];
    oha(
        oha_bin,
        "implicit warm-up",
        requests.min(2000),
        args.concurrency,
        &url_args,
    )?;
    let figures = oha(
        oha_bin,
        &implicit.label(),
        requests,
        args.concurrency,
        &url_args,
    )?;
    if figures.errors > 0 {
        println!(
            "implicit: {} requests failed; uvicorn's log:\n{}",
            figures.errors,
            server.log_tail()
        );
    }
    drop(server);
    Ok(figures)
}

/// The recommendation URLs of the timed runs: users sampled uniformly, the same sequence for
/// every service.
fn urls(addr: SocketAddr, requests: usize, args: &Args) -> String {
    (0..requests)
        .map(|i| {
            let u = (i * 7919) % args.users;
            format!(
                "http://{addr}/v1/recommendations?user_id=u{u}&k={}\n",
                args.k
            )
        })
        .collect()
}

/// `--history` distinct products per user, ascending rows, drawn with a fixed seed.
fn histories(users: usize, items: usize, per_user: usize) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let per_user = per_user.min(items);
    (0..users)
        .map(|_| {
            let mut rows: Vec<u32> = Vec::with_capacity(per_user);
            while rows.len() < per_user {
                let r = rng.random_range(0..items as u32);
                if !rows.contains(&r) {
                    rows.push(r);
                }
            }
            rows.sort_unstable();
            rows
        })
        .collect()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let oha_bin = oha_binary(&args)?;
    // Installed first, so that nothing runs pip between the measurements.
    let implicit = if args.implicit {
        Some(Implicit::install(&args)?)
    } else {
        None
    };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    if cfg!(debug_assertions) {
        println!("WARNING: a debug build; figures are meaningless. Use --release.");
    }
    println!(
        "bench_scoring: {cores} cores, model {} items × {} factors, {} users with {} products of history each, k={}, {} candidates, {} requests per run at {} connections (oha)",
        args.items,
        args.factors,
        args.users,
        args.history,
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
    // User histories: `--history` products each, in the events table the scorer reads.
    let seen = histories(args.users, args.items, args.history);
    let now_ms = recsys_core::features::online::now_ms();
    let events: Vec<EventRow> = seen
        .iter()
        .enumerate()
        .flat_map(|(u, rows)| {
            rows.iter().enumerate().map(move |(j, &r)| EventRow {
                event_id: format!("bs-{u}-{j}"),
                event: Event {
                    user: format!("u{u}"),
                    item: format!("p{r}"),
                    kind: EventType::View,
                    ts_ms: Some(now_ms - 1000 * j as i64),
                    value: None,
                },
                category: Some(format!("c{}", r % 50)),
            })
        })
        .collect();
    let events_table = PostgresEvents::new(pool.clone());
    for chunk in events.chunks(5000) {
        events_table.insert(chunk).await?;
    }
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
        sample["path"] == "cf"
            && sample["items"].as_array().map_or(0, Vec::len) == args.k
            && sample["interactions"] == args.history,
        "{sample}"
    );

    // Requests: users sampled uniformly; candidates a fixed random sample.
    let urls_file = dir.path().join("urls.txt");
    std::fs::write(&urls_file, urls(addr, args.requests, &args))?;
    let candidates: Vec<String> = (0..args.candidates)
        .map(|i| format!("p{}", (i * 104_729) % args.items))
        .collect();
    let body = serde_json::json!({"user_id": "u42", "product_ids": candidates}).to_string();

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
    let rec = oha(
        &oha_bin,
        "recommendations k=20, scorer over HTTP",
        args.requests,
        args.concurrency,
        &rec_args,
    )?;
    // implicit right after, so that both see the same machine; the scorer stays up (idle)
    // for the agreement check.
    let implicit_figures = match &implicit {
        Some(i) => {
            let run = implicit_run(
                i,
                &args,
                &oha_bin,
                &dir.path().join("implicit"),
                addr,
                &serving,
                &model,
                &seen,
            )
            .await;
            match run {
                Ok(f) => Some(f),
                Err(e) => {
                    println!("\nimplicit side failed: {e:#}");
                    None
                }
            }
        }
        None => None,
    };
    let score_args = vec![
        "-m".to_owned(),
        "POST".to_owned(),
        "-H".to_owned(),
        "content-type: application/json".to_owned(),
        "-d".to_owned(),
        body,
        format!("http://{addr}/v1/scores"),
    ];
    let scores = oha(
        &oha_bin,
        "scores 100 candidates, scorer over HTTP",
        args.requests,
        args.concurrency,
        &score_args,
    )?;
    drop(scorer);

    // The compute floor, with the same shapes (and the same history left out), on every core.
    let rows_of: Vec<u32> = candidates
        .iter()
        .filter_map(|p| serving.item_index(p))
        .collect();
    let users_f = &model.user_factors;
    let rec_floor = floor(
        "recommendations k=20, compute floor (top-k scan)",
        args.requests,
        cores,
        |i| {
            let u = (i * 7919) % args.users;
            let v = users_f.row(u);
            let v = v.as_slice().unwrap_or_default();
            serving
                .top_k(v, args.k, &seen[u], None)
                .first()
                .map_or(0.0, |t| t.1)
        },
    );
    let scores_floor = floor(
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
    );
    let mut rows = vec![rec.clone()];
    rows.extend(implicit_figures.clone());
    rows.extend([scores.clone(), rec_floor.clone(), scores_floor.clone()]);
    print(&rows);
    println!();
    for (s, c) in [(&rec, &rec_floor), (&scores, &scores_floor)] {
        println!(
            "{}: throughput {:.2}× the compute floor's, p99 {:.1}× ({:.3} vs {:.3} ms)",
            s.what,
            s.per_second / c.per_second,
            s.p99_ms / c.p99_ms,
            s.p99_ms,
            c.p99_ms
        );
    }
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "target p99 ≤ 5 ms at ≥ 2,000 requests/s for recommendations: p99 {:.3} ms at {:.0}/s: {}",
        rec.p99_ms,
        rec.per_second,
        met(rec.p99_ms <= 5.0 && rec.per_second >= 2000.0)
    );
    let to_floor = rec_floor.per_second / rec.per_second;
    println!(
        "target within 3× of the compute floor (throughput): {to_floor:.2}×: {}",
        met(to_floor <= 3.0)
    );
    if let Some(i) = &implicit_figures {
        let throughput = rec.per_second / i.per_second;
        let p99 = i.p99_ms / rec.p99_ms;
        println!(
            "versus {}: throughput {throughput:.2}× theirs ({:.0} vs {:.0}/s; target ≥ 10×: {}); \
             their p99 {p99:.2}× ours ({:.3} vs {:.3} ms; lower p99: {})",
            i.what,
            rec.per_second,
            i.per_second,
            met(throughput >= 10.0),
            i.p99_ms,
            rec.p99_ms,
            met(rec.p99_ms < i.p99_ms)
        );
    }
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
    fn histories_are_distinct_sorted_and_seeded() {
        let h = histories(50, 30, 10);
        assert_eq!(h.len(), 50);
        for rows in &h {
            assert_eq!(rows.len(), 10);
            assert!(rows.windows(2).all(|w| w[0] < w[1]), "{rows:?}");
            assert!(rows.iter().all(|&r| r < 30));
        }
        assert_eq!(h, histories(50, 30, 10));
        assert_eq!(histories(2, 3, 10)[0], [0, 1, 2]);
    }

    #[test]
    fn the_implicit_side_reads_the_model_exactly() {
        let model = AlsModel {
            user_factors: Array2::from_shape_fn((3, 2), |(u, f)| u as f32 + f as f32 / 10.0),
            item_factors: Array2::from_shape_fn((4, 2), |(i, f)| -(i as f32) - f as f32 / 3.0),
            regularization: 0.1,
        };
        let seen = vec![vec![1, 3], vec![], vec![0]];
        let dir = tempfile::tempdir().expect("tempdir");
        Implicit::write_model(dir.path(), &model, &seen).expect("written");
        let read = |name: &str| std::fs::read(dir.path().join(name)).expect(name);
        let f32s: Vec<f32> = read("item_factors.f32")
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(f32s, model.item_factors.iter().copied().collect::<Vec<_>>());
        let i32s = |name: &str| -> Vec<i32> {
            read(name)
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        assert_eq!(i32s("seen_indptr.i32"), [0, 2, 2, 3]);
        assert_eq!(i32s("seen_indices.i32"), [1, 3, 0]);
        assert_eq!(read("user_factors.f32").len(), 3 * 2 * 4);
        assert_eq!(
            String::from_utf8(read("item_ids.txt")).expect("utf-8"),
            "p0\np1\np2\np3\n"
        );
        let params: serde_json::Value = serde_json::from_slice(&read("params.json")).expect("json");
        assert_eq!(
            params,
            serde_json::json!({"users": 3, "items": 4, "factors": 2})
        );
    }

    #[test]
    fn answers_parse_into_ids_and_scores() {
        let v = serde_json::json!({"items": [
            {"product_id": "p1", "score": 0.5, "user_product_affinity": 0.25},
            {"product_id": "p2", "score": 0.4}
        ]});
        assert_eq!(
            answer_items(&v, "score"),
            [("p1".to_owned(), 0.5), ("p2".to_owned(), 0.4)]
        );
        let cf = answer_items(&v, "user_product_affinity");
        assert_eq!(cf[0], ("p1".to_owned(), 0.25));
        assert!(cf[1].1.is_nan());
    }

    #[test]
    fn floor_measures_every_request() {
        let f = floor("noop", 100, 2, |i| i as f32);
        assert_eq!(f.requests, 100);
        assert!(f.per_second > 0.0 && f.p50_ms <= f.p99_ms);
    }
}
