//! The two sides of the benchmark, each run in a child process of its own so that its peak
//! resident memory is its own: recsys (this binary again, with `--side recsys`) and implicit
//! (a Python script in a cached virtual environment).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail};
use ndarray::Axis;
use rayon::prelude::*;
use recsys_core::cf::als::{self, AlsModel, AlsParams, Solver};
use recsys_core::cf::eval;
use recsys_core::cf::interactions::Confidence;
use serde::{Deserialize, Serialize};
use sprs::CsMat;

use crate::data::{self, Shape};

/// Everything a side needs, written once to `params.json` in the work dir.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Params {
    /// Latent factors.
    pub factors: usize,
    /// λ.
    pub regularization: f32,
    /// Full sweeps.
    pub iterations: usize,
    /// CG steps per row.
    pub cg_steps: usize,
    /// Worker threads of each side.
    pub threads: usize,
    /// Confidence = 1 + alpha · weight.
    pub alpha: f32,
    /// Seed of the initial factors.
    pub seed: u64,
    /// Cut-off of the ranking metrics.
    pub k: usize,
    /// Shapes of `train` and `test`.
    pub matrices: Matrices,
}

/// Shapes of the split.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Matrices {
    /// Training weights.
    pub train: Shape,
    /// Held-out weights.
    pub test: Shape,
}

/// What a side reports (one JSON line on its stdout).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SideReport {
    /// `recsys` or `implicit`.
    pub side: String,
    /// Library version.
    #[serde(default)]
    pub version: String,
    /// Wall-clock seconds of the fit alone.
    pub fit_seconds: f64,
    /// CPU seconds (user + system, all threads) of the fit alone: less sensitive than the
    /// wall clock to other load on the machine.
    #[serde(default)]
    pub fit_cpu_seconds: f64,
    /// NDCG@k on the test split.
    pub ndcg10: f64,
    /// Precision@k (implicit's pooled definition).
    pub precision10: f64,
    /// Peak RSS of the process when the fit had finished, MiB.
    pub fit_peak_rss_mb: f64,
    /// Peak RSS of the whole run (load, fit, evaluation), MiB.
    pub peak_rss_mb: f64,
    /// BLAS the Python side runs on (from threadpoolctl).
    #[serde(default)]
    pub blas: String,
    /// Seconds of each iteration (recsys only).
    #[serde(default)]
    pub iteration_seconds: Vec<f64>,
    /// Load average (1 min) just before the side started.
    #[serde(default)]
    pub load_before: f64,
}

/// Peak resident set size of this process so far, in MiB (`VmHWM`).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU time (user + system, all threads) of this process so far, in seconds, from
/// `/proc/self/stat` (in ticks of `USER_HZ`, which is 100 on Linux).
pub fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are the 14th and
            // 15th fields of the line, the 12th and 13th after it.
            let rest = &s[s.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(f64::NAN)
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Reads `params.json` of a work dir.
pub fn read_params(work: &Path) -> anyhow::Result<Params> {
    let text = std::fs::read_to_string(work.join("params.json")).context("reading params.json")?;
    serde_json::from_str(&text).context("parsing params.json")
}

/// The `n` best items per user of `users` (training items excluded), scored in blocks by one
/// matrix product each, in parallel. Same ranking as [`als::recommend`]: highest score first,
/// ties by lower item index.
pub fn recommend_all(
    model: &AlsModel,
    train: &CsMat<f32>,
    users: &[usize],
    n: usize,
) -> Vec<Vec<usize>> {
    const BLOCK: usize = 128;
    let items_t = model.item_factors.t();
    users
        .par_chunks(BLOCK)
        .flat_map_iter(|block| {
            let rows = model.user_factors.select(Axis(0), block);
            let scores = rows.dot(&items_t);
            block
                .iter()
                .zip(scores.outer_iter())
                .map(|(&u, s)| top_unseen(s.as_slice().unwrap_or(&[]), row_indices(train, u), n))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Column indices of row `u` of a CSR matrix (empty past the last row).
pub fn row_indices(m: &CsMat<f32>, u: usize) -> &[usize] {
    if u < m.rows() {
        &m.indices()[m.indptr().outer_inds_sz(u)]
    } else {
        &[]
    }
}

/// The `n` highest of `scores` whose index is not in `seen` (sorted), best first, ties by lower
/// index, by one pass with a small sorted buffer.
fn top_unseen(scores: &[f32], seen: &[usize], n: usize) -> Vec<usize> {
    let mut best: Vec<(usize, f32)> = Vec::with_capacity(n + 1);
    let mut skip = seen.iter().peekable();
    for (i, &s) in scores.iter().enumerate() {
        while skip.next_if(|&&j| j < i).is_some() {}
        if skip.next_if_eq(&&i).is_some() || n == 0 {
            continue;
        }
        if best.len() == n && best[n - 1].1.total_cmp(&s).is_ge() {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b.total_cmp(&s).is_ge());
        best.insert(at, (i, s));
        best.truncate(n);
    }
    best.into_iter().map(|(i, _)| i).collect()
}

/// `--side recsys`: fits and (unless `fit_only`) evaluates recsys ALS on the work dir's split, prints the report.
pub fn run_recsys(work: &Path, fit_only: bool) -> anyhow::Result<()> {
    let p = read_params(work)?;
    // Weights become confidences in place; evaluation needs only the pattern of train, which
    // is the same (the Python side does the same with its one copy).
    let mut train = data::read_csr(work, "train", p.matrices.train)?;
    let test = data::read_csr(work, "test", p.matrices.test)?;
    let confidence = Confidence::Linear { alpha: p.alpha };
    train.map_inplace(|&w| confidence.of(w));
    let params = AlsParams {
        factors: p.factors,
        regularization: p.regularization,
        iterations: p.iterations,
        solver: Solver::ConjugateGradient { steps: p.cg_steps },
        threads: p.threads,
        seed: p.seed,
    };
    let mut iteration_seconds = Vec::new();
    let cpu_start = cpu_seconds();
    let start = Instant::now();
    let model = als::train(&train, &params, |pr| {
        iteration_seconds.push(pr.took.as_secs_f64());
    })?;
    let fit_seconds = start.elapsed().as_secs_f64();
    let fit_cpu_seconds = cpu_seconds() - cpu_start;
    let fit_peak_rss_mb = peak_rss_mb();
    if fit_only {
        eprintln!(
            "fit {fit_seconds:.3} s ({fit_cpu_seconds:.2} s CPU), iterations \
             {iteration_seconds:.3?}"
        );
        return Ok(());
    }

    let users: Vec<usize> = (0..test.rows())
        .filter(|&u| test.outer_view(u).is_some_and(|r| r.nnz() > 0))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(p.threads)
        .build()?;
    let recs = pool.install(|| recommend_all(&model, &train, &users, p.k));
    let mut by_user = vec![Vec::new(); test.rows()];
    for (u, r) in users.iter().zip(recs) {
        by_user[*u] = r;
    }
    let m = eval::evaluate(&train, &test, p.k, |u, _| std::mem::take(&mut by_user[u]));
    let report = SideReport {
        side: "recsys".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        fit_seconds,
        fit_cpu_seconds,
        ndcg10: m.ndcg,
        precision10: m.precision,
        fit_peak_rss_mb,
        peak_rss_mb: peak_rss_mb(),
        iteration_seconds,
        ..Default::default()
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn run_child(mut cmd: Command, side: &str) -> anyhow::Result<SideReport> {
    let load_before = load_average();
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting the {side} side"))?;
    if !out.status.success() {
        bail!("the {side} side failed: {}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("the {side} side printed no report: {stdout}"))?;
    let mut report: SideReport =
        serde_json::from_str(line).with_context(|| format!("{side} report {line:?}"))?;
    report.load_before = load_before;
    Ok(report)
}

/// Runs `--side recsys` in a child process.
pub fn spawn_recsys(work: &Path) -> anyhow::Result<SideReport> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--side").arg("recsys").arg("--work-dir").arg(work);
    run_child(cmd, "recsys")
}

/// The Python side, shipped inside the binary.
const IMPLICIT_SIDE: &str = include_str!("../../../bench/implicit_side.py");

/// Runs the implicit side in a child process with single-threaded BLAS (implicit's own advice)
/// and without this machine's OpenBLAS core-type overrides, which slow a current numpy.
pub fn spawn_implicit(work: &Path, python: &Path) -> anyhow::Result<SideReport> {
    let script = work.join("implicit_side.py");
    std::fs::write(&script, IMPLICIT_SIDE)?;
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .arg(work)
        .env_remove("OPENBLAS_CORETYPE")
        .env_remove("OPENBLAS_L2_SIZE")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .env("PYTHONWARNINGS", "ignore");
    run_child(cmd, "implicit")
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::*;

    #[test]
    fn blocked_recommendations_match_the_library() {
        let users = Array2::from_shape_fn((300, 8), |(u, d)| ((u * 7 + d * 13) % 11) as f32 - 5.0);
        let items = Array2::from_shape_fn((50, 8), |(i, d)| ((i * 5 + d * 3) % 7) as f32 - 3.0);
        let m = AlsModel {
            user_factors: users,
            item_factors: items,
            regularization: 0.1,
        };
        let mut tri = sprs::TriMat::new((300, 50));
        for u in 0..300 {
            tri.add_triplet(u, (u * 3) % 50, 1.0_f32);
            tri.add_triplet(u, (u * 11 + 1) % 50, 1.0);
        }
        let train: CsMat<f32> = tri.to_csr();
        let all: Vec<usize> = (0..300).collect();
        let fast = recommend_all(&m, &train, &all, 10);
        for u in all {
            let seen = train.outer_view(u).expect("row").indices().to_vec();
            let slow: Vec<usize> = als::recommend(
                m.user_factors.row(u).as_slice().expect("row"),
                m.item_factors.view(),
                10,
                &seen,
            )
            .into_iter()
            .map(|(i, _)| i)
            .collect();
            assert_eq!(fast[u], slow, "user {u}");
        }
    }

    #[test]
    fn top_unseen_skips_seen_and_breaks_ties_by_index() {
        let scores = [1.0, 5.0, 3.0, 5.0, 4.0, 0.0];
        assert_eq!(top_unseen(&scores, &[], 3), [1, 3, 4]);
        assert_eq!(top_unseen(&scores, &[1, 4], 3), [3, 2, 0]);
        assert_eq!(top_unseen(&scores, &[], 0), Vec::<usize>::new());
        assert_eq!(top_unseen(&scores, &[0, 1, 2, 3, 4], 3), [5]);
    }

    #[test]
    fn reads_its_own_peak_memory_and_cpu_time() {
        let mb = peak_rss_mb();
        assert!(mb > 0.0 && mb.is_finite(), "{mb}");
        let before = cpu_seconds();
        let mut x = 0_u64;
        let start = Instant::now();
        while start.elapsed().as_millis() < 50 {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let spent = cpu_seconds() - before;
        assert!(spent.is_finite() && spent >= 0.0, "{spent}");
    }
}
