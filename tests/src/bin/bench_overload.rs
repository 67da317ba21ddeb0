//! Overload benchmark: a real scorer (the recommendation test fixture: model in S3, histories in
//! Postgres, user states in Redis, all of the test environment; started in this process as its
//! binary starts it) loaded by `oha` with `GET /v1/recommendations`, in four phases:
//!
//! 1. **unloaded**: one connection, back to back: the latency floor;
//! 2. **capacity**: `--connections` connections, back to back: answered requests per second;
//! 3. **overload**: twice that capacity, offered at a fixed rate (open loop) over 256
//!    connections: how many are shed (503 with `Retry-After`), the latency of the answered
//!    ones against the unloaded p99, and the process's resident memory before and after;
//! 4. **recovery**: half the capacity: nothing should be shed any more.
//!
//! Each `--max-concurrency` in `--limits` gets its own scorer and all four phases, so the
//! default can be chosen by measurement. A program that prints figures, not a timed test:
//! `cargo run --release -p recsys-tests --bin bench_overload`. See
//! `tests/bench/overload/README.md`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, ensure};
use clap::Parser;
use recsys_tests::recommend::{Fixture, serve};
use recsys_tests::{TestEnv, unique_redis_prefix};

/// Benchmark the scorer's load shedding.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// `--max-concurrency` values to measure, one scorer each.
    #[arg(long, value_delimiter = ',', default_values_t = [8, 64])]
    limits: Vec<usize>,
    /// Connections of the capacity phase.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Seconds of each phase (the overload phase runs twice as long).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// The `oha` binary; `~/.cache/recsys-bench/oha-1.16.0/bin/oha` when unset (install it
    /// with `cargo install oha --locked --version 1.16.0 --root ~/.cache/recsys-bench/oha-1.16.0`).
    #[arg(long, env = "RECSYS_BENCH_OHA")]
    oha: Option<PathBuf>,
}

/// What one oha run measured.
#[derive(Debug, Default, Clone)]
struct Phase {
    ok_per_second: f64,
    ok: u64,
    shed: u64,
    other: u64,
    p50_ms: f64,
    p99_ms: f64,
}

fn oha(bin: &PathBuf, url: &str, extra: &[String]) -> anyhow::Result<Phase> {
    let out = Command::new(bin)
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "--stats-success-breakdown",
            "--rand-regex-url",
        ])
        .args(extra)
        .arg(url)
        .output()?;
    ensure!(
        out.status.success(),
        "oha failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("oha output: {}", String::from_utf8_lossy(&out.stdout)))?;
    let codes = &v["statusCodeDistribution"];
    let count = |c: &str| codes[c].as_u64().unwrap_or(0);
    let all: u64 = codes
        .as_object()
        .map(|o| o.values().filter_map(serde_json::Value::as_u64).sum())
        .unwrap_or(0);
    let ok = count("200");
    let shed = count("503");
    let pct = |k: &str| {
        v["latencyPercentilesSuccessful"][k]
            .as_f64()
            .unwrap_or(f64::NAN)
            * 1000.0
    };
    let seconds = v["summary"]["total"].as_f64().unwrap_or(f64::NAN);
    Ok(Phase {
        ok_per_second: ok as f64 / seconds,
        ok,
        shed,
        other: all - ok - shed,
        p50_ms: pct("p50"),
        p99_ms: pct("p99"),
    })
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = TestEnv::load().context("source the test environment (target/testenv/env)")?;
    let bin = match &args.oha {
        Some(b) => b.clone(),
        None => {
            PathBuf::from(std::env::var("HOME")?).join(".cache/recsys-bench/oha-1.16.0/bin/oha")
        }
    };
    ensure!(bin.exists(), "{} not found (see --help)", bin.display());
    let fixture = Fixture::build(&env, "overload").await?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let secs = args.seconds;
    println!(
        "bench_overload: {cores} cores; GET /v1/recommendations (k 10, trained users) on the test fixture; {secs} s phases"
    );
    println!(
        "{:>7} | {:>21} | {:>9} | {:>33} | {:>15} | {:>20}",
        "limit",
        "unloaded p50/p99 ms",
        "capacity",
        "overload (2x): shed / p99 ms / ×",
        "RSS MiB",
        "recovery: shed / p99"
    );
    for limit in &args.limits {
        let limit_arg = limit.to_string();
        let scorer_args = fixture.args(
            env.var("RECSYS_TEST_REDIS_URL")?,
            &unique_redis_prefix("bench", "overload"),
            &["--max-concurrency", &limit_arg, "--request-timeout", "5s"],
        )?;
        let (_scorer, addr) = serve(&scorer_args).await?;
        let url = format!(r"http://{addr}/v1/recommendations\?user_id=u[1-3][0-9][0-9]&k=10");
        let d = |s: u64| format!("{s}s");
        // Warm-up: user states built and cached.
        let run = |extra: Vec<String>| {
            let (bin, url) = (bin.clone(), url.clone());
            tokio::task::spawn_blocking(move || oha(&bin, &url, &extra))
        };
        run(vec!["-z".into(), d(2), "-c".into(), "4".into()]).await??;
        let unloaded = run(vec!["-z".into(), d(secs), "-c".into(), "1".into()]).await??;
        let capacity = run(vec![
            "-z".into(),
            d(secs),
            "-c".into(),
            args.connections.to_string(),
        ])
        .await??;
        ensure!(
            unloaded.ok > 0 && capacity.ok > 0,
            "no request was answered 200 ({} other answers): is the URL right? {url}",
            capacity.other
        );
        let rate = capacity.ok_per_second;
        let before = rss_mib();
        let overload = run(vec![
            "-z".into(),
            d(2 * secs),
            "-c".into(),
            "256".into(),
            "-q".into(),
            format!("{:.0}", 2.0 * rate),
            "--latency-correction".into(),
        ])
        .await??;
        let after = rss_mib();
        let recovery = run(vec![
            "-z".into(),
            d(secs),
            "-c".into(),
            "8".into(),
            "-q".into(),
            format!("{:.0}", 0.5 * rate),
        ])
        .await??;
        println!(
            "{:>7} | {:>9.2} / {:>9.2} | {:>7.0}/s | {:>7} of {:>7} / {:>7.2} / {:>5.1}× | {:>6.0} → {:>6.0} | {:>5} / {:>7.2} ms",
            limit,
            unloaded.p50_ms,
            unloaded.p99_ms,
            rate,
            overload.shed,
            overload.ok + overload.shed + overload.other,
            overload.p99_ms,
            overload.p99_ms / unloaded.p99_ms,
            before,
            after,
            recovery.shed,
            recovery.p99_ms
        );
        if overload.other + recovery.other + capacity.other > 0 {
            println!(
                "        other answers (neither 200 nor 503): capacity {}, overload {}, recovery {}",
                capacity.other, overload.other, recovery.other
            );
        }
    }
    Ok(())
}
