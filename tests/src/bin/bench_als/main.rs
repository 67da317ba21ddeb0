//! ALS benchmark: recsys against the `implicit` Python library, side by side in one run, on
//! the same split with the same settings. See `tests/bench/README.md`.
//!
//! A program that prints figures, not a timed test: the ratios it prints (recsys ÷ implicit)
//! are measured within the same run.

mod data;
mod report;
mod sides;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use recsys_core::cf::eval;
use recsys_core::cf::synth::{self, SynthParams};

use crate::sides::{Matrices, Params};
use recsys_tests::Venv;

/// How the one seeded split is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Split {
    /// Every interaction goes to train with probability `--train-fraction`.
    Random,
    /// One interaction of every user with more than two goes to test.
    LeaveOneOut,
}

/// Which side a child process runs (internal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Side {
    /// recsys ALS.
    Recsys,
}

/// Benchmark recsys ALS against implicit's.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// A `user item weight` file (tabs, commas or spaces) instead of generated data.
    #[arg(long, env = "RECSYS_BENCH_DATA")]
    data: Option<PathBuf>,
    /// Generated data: users.
    #[arg(long, env = "RECSYS_BENCH_USERS", default_value_t = 100_000)]
    users: usize,
    /// Generated data: items.
    #[arg(long, env = "RECSYS_BENCH_ITEMS", default_value_t = 30_000)]
    items: usize,
    /// Generated data: interactions (distinct user–item pairs).
    #[arg(long, env = "RECSYS_BENCH_INTERACTIONS", default_value_t = 2_100_000)]
    interactions: usize,
    /// Generated data: latent topics.
    #[arg(long, env = "RECSYS_BENCH_TOPICS", default_value_t = 40)]
    topics: usize,
    /// Smoke-test size: 10,000 users, 3,000 items, 200,000 interactions.
    #[arg(long, env = "RECSYS_BENCH_QUICK")]
    quick: bool,
    /// Seed of the generator, the split and the initial factors.
    #[arg(long, env = "RECSYS_BENCH_SEED", default_value_t = 42)]
    seed: u64,
    /// Split of the data.
    #[arg(long, env = "RECSYS_BENCH_SPLIT", value_enum, default_value_t = Split::Random)]
    split: Split,
    /// Share of interactions in train (random split).
    #[arg(long, env = "RECSYS_BENCH_TRAIN_FRACTION", default_value_t = 0.8)]
    train_fraction: f64,
    /// Latent factors.
    #[arg(long, env = "RECSYS_BENCH_FACTORS", default_value_t = 64)]
    factors: usize,
    /// ALS iterations.
    #[arg(long, env = "RECSYS_BENCH_ITERATIONS", default_value_t = 15)]
    iterations: usize,
    /// Conjugate-gradient steps per row.
    #[arg(long, env = "RECSYS_BENCH_CG_STEPS", default_value_t = 3)]
    cg_steps: usize,
    /// L2 regularisation λ.
    #[arg(long, env = "RECSYS_BENCH_REGULARIZATION", default_value_t = 0.05)]
    regularization: f32,
    /// Confidence = 1 + alpha · weight.
    #[arg(long, env = "RECSYS_BENCH_ALPHA", default_value_t = 1.0)]
    alpha: f32,
    /// Threads of each side.
    #[arg(long, env = "RECSYS_BENCH_THREADS", default_value_t = 2)]
    threads: usize,
    /// Cut-off of NDCG and precision.
    #[arg(long, env = "RECSYS_BENCH_K", default_value_t = 10)]
    k: usize,
    /// Runs of each side (alternating which goes first); the fastest fit of each is compared.
    #[arg(long, env = "RECSYS_BENCH_REPEAT", default_value_t = 1)]
    repeat: usize,
    /// Run recsys only (no Python), e.g. while profiling.
    #[arg(long, env = "RECSYS_BENCH_RECSYS_ONLY")]
    recsys_only: bool,
    /// implicit version installed into the venv.
    #[arg(long, env = "RECSYS_BENCH_IMPLICIT_VERSION", default_value = "0.7.3")]
    implicit_version: String,
    /// Extra pinned requirements of the venv.
    #[arg(
        long,
        env = "RECSYS_BENCH_PIP_EXTRA",
        default_value = "numpy==2.4.6 scipy==1.17.1 threadpoolctl==3.8.0"
    )]
    pip_extra: String,
    /// Interpreter that creates the venv (CPython 3.9–3.13, for which implicit has wheels).
    #[arg(long, env = "RECSYS_BENCH_PYTHON", default_value = "python3")]
    python: String,
    /// Parent of the venvs [default: ~/.cache/recsys/bench-venv].
    #[arg(long, env = "RECSYS_BENCH_VENV_DIR")]
    venv_dir: Option<PathBuf>,
    /// Directory for the split [default: a fresh one in the temp dir, removed afterwards].
    #[arg(long, env = "RECSYS_BENCH_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Also write the (generated or read) weights as `user item weight` TSV here.
    #[arg(long, env = "RECSYS_BENCH_WRITE_DATA")]
    write_data: Option<PathBuf>,
    /// Also write the result as JSON here.
    #[arg(long, env = "RECSYS_BENCH_JSON")]
    json: Option<PathBuf>,
    /// Internal: run one side in this process (the parent starts it).
    #[arg(long, value_enum, hide = true)]
    side: Option<Side>,
    /// With `--side recsys`: stop after the fit (for profilers).
    #[arg(long, hide = true)]
    fit_only: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.side {
        Some(Side::Recsys) => {
            let work = args.work_dir.context("--side needs --work-dir")?;
            sides::run_recsys(&work, args.fit_only)
        }
        None => run(args),
    }
}

fn run(mut args: Args) -> anyhow::Result<()> {
    if args.quick {
        (args.users, args.items, args.interactions) = (10_000, 3_000, 200_000);
    }
    let (weights, source) = match &args.data {
        Some(path) => {
            let loaded = data::read_weights(path)?;
            if loaded.skipped > 0 {
                eprintln!("skipped {} entries with weight ≤ 0", loaded.skipped);
            }
            (loaded.weights, path.display().to_string())
        }
        None => {
            let p = SynthParams {
                topics: args.topics,
                ..SynthParams::new(args.users, args.items, args.interactions, args.seed)
            };
            eprintln!("generating {p:?}");
            (synth::generate(&p).weights, format!("synthetic {p:?}"))
        }
    };
    if let Some(path) = &args.write_data {
        data::write_weights(&weights, path)?;
    }
    let (train, test) = match args.split {
        Split::Random => eval::random_split(&weights, args.train_fraction, args.seed),
        Split::LeaveOneOut => eval::leave_k_out(&weights, 1, args.seed),
    };
    let popularity = {
        let pop = eval::Popularity::fit(&train);
        eval::evaluate(&train, &test, args.k, |u, k| {
            pop.recommend(k, sides::row_indices(&train, u))
        })
    };
    let summary = report::DataSummary::of(&source, &weights, &train, &test, &popularity);
    drop(weights);
    eprintln!("{summary}");

    let (work, temporary) = match &args.work_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("recsys-bench-als-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let params = Params {
        factors: args.factors,
        regularization: args.regularization,
        iterations: args.iterations,
        cg_steps: args.cg_steps,
        threads: args.threads,
        alpha: args.alpha,
        seed: args.seed,
        k: args.k,
        matrices: Matrices {
            train: data::write_csr(&train, &work, "train")?,
            test: data::write_csr(&test, &work, "test")?,
        },
    };
    drop((train, test));
    std::fs::write(work.join("params.json"), serde_json::to_string(&params)?)?;

    let python = if args.recsys_only {
        None
    } else {
        let root = match &args.venv_dir {
            Some(dir) => dir.clone(),
            None => std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .context("no HOME for the venv cache; pass --venv-dir")?
                .join("recsys/bench-venv"),
        };
        let mut requirements = vec![format!("implicit=={}", args.implicit_version)];
        requirements.extend(args.pip_extra.split_whitespace().map(str::to_owned));
        let venv = Venv {
            dir: root.join(format!("implicit-{}", args.implicit_version)),
            python: args.python.clone(),
            requirements,
        };
        Some(venv.ensure()?)
    };

    let mut runs = report::Runs::default();
    for rep in 0..args.repeat.max(1) {
        let order = if rep % 2 == 0 {
            ["recsys", "implicit"]
        } else {
            ["implicit", "recsys"]
        };
        for side in order {
            if side == "recsys" {
                eprintln!("run {}: recsys …", rep + 1);
                runs.recsys.push(sides::spawn_recsys(&work)?);
            } else if let Some(python) = &python {
                eprintln!("run {}: implicit …", rep + 1);
                runs.implicit.push(sides::spawn_implicit(&work, python)?);
            }
        }
    }
    if temporary {
        std::fs::remove_dir_all(&work).ok();
    }
    let result = report::Result::new(summary, params, runs);
    println!("{result}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn args_are_consistent() {
        Args::command().debug_assert();
    }
}
