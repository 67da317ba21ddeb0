//! `cf-train` and `evaluate`: events → interactions → (search) → ALS → evaluation against
//! popularity → registry.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use recsys_core::artifacts::{ArtifactError, ArtifactStore, DataInfo, ManifestInput, Registry};
use recsys_core::cf::als::{self, AlsModel, AlsParams, Solver};
use recsys_core::cf::eval::{self, Metrics};
use recsys_core::cf::interactions::{
    self, AggregateOptions, Confidence, DataError, EventType, EventWeights, IdPolicy, Interactions,
};
use recsys_core::cf::search::{self, Grid, SearchResult};
use recsys_core::events::{self, EventsError, FileFormat, PostgresEvents};
use recsys_core::runs::Comparison;
use recsys_core::stores::{self, PostgresArgs, S3Args, StoreError};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sprs::CsMat;
use tracing::{info, warn};

/// Why a CF job failed.
#[derive(Debug, thiserror::Error)]
pub enum CfError {
    /// An option is wrong.
    #[error("invalid option {option}: {reason}")]
    Usage {
        /// The option.
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Events could not be read.
    #[error(transparent)]
    Events(#[from] EventsError),
    /// The interactions cannot be learned from.
    #[error("interaction data refused: {0}")]
    Data(#[from] DataError),
    /// Training failed.
    #[error("training failed: {0}")]
    Train(#[from] als::TrainError),
    /// A store could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The artifact store or registry failed.
    #[error("model registry: {0}")]
    Artifacts(#[from] ArtifactError),
    /// The run report could not be written.
    #[error("writing the report {path}: {source}")]
    Report {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The input checks could not run.
    #[error("input checks: {0}")]
    Quality(Box<crate::quality::QualityJobError>),
    /// The input failed a blocking data-quality check: nothing was trained or published.
    #[error(
        "data-quality gate: the input failed {} blocking check(s), no model was trained or published: {} (run {})",
        .0.failures().count(),
        .0.describe_failures(),
        .0.run_id
    )]
    Gate(Box<recsys_core::quality::QualityReport>),
}

impl CfError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Usage { .. } => "Usage",
            Self::Events(e) => e.kind(),
            Self::Data(e) => e.kind(),
            Self::Train(e) => e.kind(),
            Self::Store(e) => e.kind(),
            Self::Artifacts(e) => e.kind(),
            Self::Report { .. } => "Report",
            Self::Quality(e) => e.kind(),
            Self::Gate(_) => crate::quality::GATE_KIND,
        }
    }

    /// Whether a retry can help.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Quality(e) => e.retryable(),
            Self::Gate(_) => false,
            Self::Events(e) => e.retryable(),
            Self::Store(_) | Self::Report { .. } => true,
            Self::Artifacts(e) => e.retryable(),
            Self::Usage { .. } | Self::Data(_) | Self::Train(_) => false,
        }
    }
}

fn usage(option: &'static str, reason: impl Into<String>) -> CfError {
    CfError::Usage {
        option,
        reason: reason.into(),
    }
}

/// Where events come from.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// Events file (TSV/CSV `user item weight [ts_ms]`, JSON lines, or OTTO sessions). Without
    /// it, events are read from the Postgres `events` table at `--database-url`.
    #[arg(long, env = "RECSYS_EVENTS")]
    pub events: Option<PathBuf>,
    /// Format of `--events`.
    #[arg(long, value_enum, default_value_t = FileFormat::Auto)]
    pub format: FileFormat,
    /// Postgres URL of the `events` table.
    #[arg(long, env = "RECSYS_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Only events at or after this time (RFC 3339), Postgres source.
    #[arg(long)]
    pub from: Option<String>,
    /// Only events before this time (RFC 3339), Postgres source.
    #[arg(long)]
    pub to: Option<String>,
}

/// How events become confidences.
#[derive(Args, Debug, Clone)]
pub struct PrepArgs {
    /// Event-type weight, repeatable: `--weight purchase=3 --weight view=0.5`. Defaults:
    /// purchase 3, add_to_cart 2, click 1, view 1.
    #[arg(long = "weight", value_name = "TYPE=WEIGHT")]
    pub weights: Vec<String>,
    /// Half-life of the time decay, e.g. `30d`; no decay when unset.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub half_life: Option<Duration>,
    /// Confidence scaling of aggregated weights.
    #[arg(long, value_enum, default_value_t = Scaling::Linear)]
    pub confidence: Scaling,
    /// Confidence scale α: `1 + α·w` (linear) or `1 + α·ln(1 + w/ε)` (log).
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f32,
    /// ε of the log scaling.
    #[arg(long, default_value_t = 1.0)]
    pub log_epsilon: f32,
    /// Re-weighting of the interaction matrix before confidences.
    #[arg(long, value_enum, default_value_t = Weighting::None)]
    pub weighting: Weighting,
    /// Fewest (user, item) pairs accepted.
    #[arg(long, default_value_t = 10)]
    pub min_interactions: usize,
    /// Fewest users accepted.
    #[arg(long, default_value_t = 2)]
    pub min_users: usize,
}

/// Confidence scalings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scaling {
    /// `1 + α·w`.
    Linear,
    /// `1 + α·ln(1 + w/ε)`.
    Log,
}

/// Re-weightings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Weighting {
    /// Raw weights.
    None,
    /// BM25 (K1 = 100, B = 0.8, as implicit's lastfm example).
    Bm25,
    /// TF-IDF.
    Tfidf,
}

/// Solvers on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SolverArg {
    /// Conjugate gradient.
    Cg,
    /// Exact Cholesky.
    Cholesky,
}

/// ALS hyper-parameters.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Latent factors.
    #[arg(long, default_value_t = 64)]
    pub factors: usize,
    /// L2 regularisation λ.
    #[arg(long, default_value_t = 0.01)]
    pub regularization: f32,
    /// Sweeps.
    #[arg(long, default_value_t = 15)]
    pub iterations: usize,
    /// Row solver.
    #[arg(long, value_enum, default_value_t = SolverArg::Cg)]
    pub solver: SolverArg,
    /// Conjugate-gradient steps per row.
    #[arg(long, default_value_t = 3)]
    pub cg_steps: usize,
    /// Worker threads; 0 uses every core.
    #[arg(long, env = "RECSYS_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Seed of initialisation and splits.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// K of the ranking metrics.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
}

impl ModelArgs {
    fn params(&self) -> AlsParams {
        AlsParams {
            factors: self.factors,
            regularization: self.regularization,
            iterations: self.iterations,
            solver: match self.solver {
                SolverArg::Cg => Solver::ConjugateGradient {
                    steps: self.cg_steps,
                },
                SolverArg::Cholesky => Solver::Cholesky,
            },
            threads: self.threads,
            seed: self.seed,
        }
    }
}

/// Where models are registered.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Artifact store: a directory, or `s3://bucket[/prefix]`.
    #[arg(long, env = "RECSYS_ARTIFACTS", default_value = ".recsys/artifacts")]
    pub store: String,
    /// S3 connection (with an `s3://` store).
    #[command(flatten)]
    pub s3: S3Args,
}

/// Options of `cf-train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Events.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Preparation.
    #[command(flatten)]
    pub prep: PrepArgs,
    /// Hyper-parameters (the defaults of a search's winner are replaced by it).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Registry.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Model name in the registry.
    #[arg(long, default_value = "als")]
    pub model_name: String,
    /// Version id; generated (`YYYYMMDD-HHMMSS-xxxxxx`) when unset.
    #[arg(long)]
    pub version: Option<String>,
    /// Share of interactions held out for evaluation.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Hold out this many interactions per user instead of a random share.
    #[arg(long)]
    pub leave_out: Option<usize>,
    /// Search hyper-parameters by cross-validation on the training split first.
    #[arg(long)]
    pub search: bool,
    /// Folds of the search.
    #[arg(long, default_value_t = 3)]
    pub folds: usize,
    /// Factors tried by the search.
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    pub grid_factors: Vec<usize>,
    /// Regularisations tried by the search.
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.1")]
    pub grid_regularization: Vec<f32>,
    /// Confidence scales tried by the search.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    pub grid_alpha: Vec<f32>,
    /// Sweeps tried by the search.
    #[arg(long, value_delimiter = ',', default_value = "15")]
    pub grid_iterations: Vec<usize>,
    /// Publish the model trained on the training split only (default: retrain on all data
    /// with the chosen hyper-parameters, so every user has factors).
    #[arg(long)]
    pub publish_split_model: bool,
    /// Make the new version the champion.
    #[arg(long)]
    pub promote: bool,
    /// Compare the new version's offline NDCG@k with this registered version's (the stable
    /// version of the ModelDeployment the run hands off to; the operator sets it). The report
    /// says whether it reaches `--min-metric-ratio` of it; the version is registered either way.
    #[arg(long)]
    pub compare_to: Option<String>,
    /// Least ratio of the new version's NDCG@k to the `--compare-to` version's that passes.
    #[arg(long, default_value_t = 1.0, requires = "compare_to")]
    pub min_metric_ratio: f64,
    /// Write the run report (JSON) here, for the batch-job layer.
    #[arg(long, env = "RECSYS_REPORT_FILE")]
    pub report: Option<PathBuf>,
    /// The checks run on the input before training: a failing blocking check stops the run
    /// (exit code 3) before anything is trained or published.
    #[command(flatten)]
    pub input: crate::quality::InputCheckArgs,
}

/// Options of `evaluate`.
#[derive(Args, Debug, Clone)]
pub struct EvaluateArgs {
    /// Training interactions (`user item weight`, or any events format): trains a model on them
    /// with the hyper-parameters below, unless `--version` names a registered model.
    #[arg(long)]
    pub train: PathBuf,
    /// Held-out interactions, mapped onto the training ids (unknown users and items are
    /// dropped and counted).
    #[arg(long)]
    pub test: PathBuf,
    /// Format of both files.
    #[arg(long, value_enum, default_value_t = FileFormat::Auto)]
    pub format: FileFormat,
    /// Preparation.
    #[command(flatten)]
    pub prep: PrepArgs,
    /// Hyper-parameters.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Evaluate this registered version or alias instead of training.
    #[arg(long)]
    pub version: Option<String>,
    /// Model name in the registry (with `--version`).
    #[arg(long, default_value = "als")]
    pub model_name: String,
    /// Registry (with `--version`).
    #[command(flatten)]
    pub store: StoreArgs,
    /// Print the result as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn event_weights(specs: &[String]) -> Result<EventWeights, CfError> {
    let mut w = EventWeights::default();
    for spec in specs {
        let (kind, value) = spec
            .split_once('=')
            .ok_or_else(|| usage("--weight", format!("{spec:?} is not TYPE=WEIGHT")))?;
        let value: f32 = value
            .parse()
            .ok()
            .filter(|v: &f32| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| usage("--weight", format!("{value:?} is not a finite weight ≥ 0")))?;
        match kind
            .parse::<EventType>()
            .map_err(|e| usage("--weight", e.to_string()))?
        {
            EventType::View => w.view = value,
            EventType::Click => w.click = value,
            EventType::AddToCart => w.add_to_cart = value,
            EventType::Purchase => w.purchase = value,
            EventType::Rating => return Err(usage("--weight", "a rating weighs its own value")),
        }
    }
    Ok(w)
}

impl PrepArgs {
    fn aggregate_options(&self) -> Result<AggregateOptions, CfError> {
        Ok(AggregateOptions {
            weights: event_weights(&self.weights)?,
            half_life_ms: self
                .half_life
                .map(|d| d.as_millis().min(i64::MAX as u128) as i64),
            now_ms: None,
            min_interactions: self.min_interactions,
            min_users: self.min_users,
        })
    }

    fn confidence(&self, alpha: f32) -> Confidence {
        match self.confidence {
            Scaling::Linear => Confidence::Linear { alpha },
            Scaling::Log => Confidence::Log {
                alpha,
                epsilon: self.log_epsilon,
            },
        }
    }

    fn reweight(&self, m: &CsMat<f32>) -> CsMat<f32> {
        match self.weighting {
            Weighting::None => m.clone(),
            Weighting::Bm25 => interactions::bm25(m, 100.0, 0.8),
            Weighting::Tfidf => interactions::tfidf(m),
        }
    }

    fn check(&self) -> Result<(), CfError> {
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(usage("--alpha", "must be a finite number > 0"));
        }
        if !(self.log_epsilon.is_finite() && self.log_epsilon > 0.0) {
            return Err(usage("--log-epsilon", "must be a finite number > 0"));
        }
        Ok(())
    }
}

async fn read_events(src: &SourceArgs) -> Result<Vec<interactions::Event>, CfError> {
    match (&src.events, &src.database_url) {
        (Some(path), _) => Ok(events::read_file(path, src.format)?),
        (None, Some(url)) => {
            let parse = |opt: &'static str, v: &Option<String>| -> Result<_, CfError> {
                v.as_deref()
                    .map(|t| {
                        chrono::DateTime::parse_from_rfc3339(t)
                            .map(|d| d.with_timezone(&chrono::Utc))
                            .map_err(|e| usage(opt, format!("{t:?} is not RFC 3339: {e}")))
                    })
                    .transpose()
            };
            let (from, to) = (parse("--from", &src.from)?, parse("--to", &src.to)?);
            let pool = stores::postgres(&PostgresArgs {
                url: url.clone(),
                max_connections: 2,
            })
            .await?;
            events::migrate(&pool).await?;
            Ok(PostgresEvents::new(pool).read(from, to).await?)
        }
        (None, None) => Err(usage(
            "--events",
            "give an events file, or --database-url (RECSYS_DATABASE_URL) for the events table",
        )),
    }
}

/// Runs the data-quality checks on the training input (judged at `--to`, or now; a file at its
/// newest event) and holds the gate when a blocking check fails.
async fn check_input(args: &TrainArgs) -> Result<recsys_core::quality::QualityReport, CfError> {
    use crate::quality::{self, Input};
    let quality_err = |e| CfError::Quality(Box::new(e));
    let src = &args.source;
    let report = match (&src.events, &src.database_url) {
        (Some(path), _) => quality::check(
            "cf-train",
            Input::File(path, src.format),
            None,
            &args.input.checks,
            None,
            None,
        )
        .await
        .map_err(quality_err)?,
        (None, Some(url)) => {
            let at = src
                .to
                .as_deref()
                .map(|t| {
                    chrono::DateTime::parse_from_rfc3339(t)
                        .map(|d| d.timestamp_millis())
                        .map_err(|e| usage("--to", format!("{t:?} is not RFC 3339: {e}")))
                })
                .transpose()?;
            let pool = stores::postgres(&PostgresArgs {
                url: url.clone(),
                max_connections: 2,
            })
            .await?;
            events::migrate(&pool).await?;
            quality::check(
                "cf-train",
                Input::Table(&pool),
                at,
                &args.input.checks,
                None,
                None,
            )
            .await
            .map_err(quality_err)?
        }
        (None, None) => {
            return Err(usage(
                "--events",
                "give an events file, or --database-url (RECSYS_DATABASE_URL) for the events table",
            ));
        }
    };
    if !report.passed {
        return Err(CfError::Gate(Box::new(report)));
    }
    Ok(report)
}

/// Opens the artifact store named by `--store`; a misconfiguration is a usage error (exit 2).
pub async fn open_store(args: &StoreArgs) -> Result<Arc<dyn ArtifactStore>, CfError> {
    stores::artifact_store(&args.store, &args.s3)
        .await
        .map_err(|e| match e {
            StoreError::S3Config(reason) => usage("--store", reason),
            other => other.into(),
        })
}

/// A training run's outcome, for the summary table and the batch-job layer.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Model name.
    pub model: String,
    /// Registered version.
    pub version: Option<String>,
    /// Where it was registered.
    pub store: String,
    /// Users, items, interactions.
    pub users: usize,
    /// Items.
    pub items: usize,
    /// (user, item) pairs.
    pub interactions: usize,
    /// Seconds spent reading and aggregating events.
    pub prepare_seconds: f64,
    /// Seconds spent in the hyper-parameter search.
    pub search_seconds: f64,
    /// Seconds spent fitting (evaluation model, and final model when retrained).
    pub train_seconds: f64,
    /// Hyper-parameters used.
    pub params: serde_json::Value,
    /// The model's metrics on the held-out split.
    pub metrics: Metrics,
    /// The popularity baseline's on the same split.
    pub baseline: Metrics,
    /// The search, when run.
    pub search: Option<SearchResult>,
    /// Against `--compare-to`, when given.
    pub comparison: Option<Comparison>,
    /// The checks run on the input before training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_checks: Option<recsys_core::quality::QualityReport>,
}

fn digest(x: &Interactions) -> String {
    let mut h = Sha256::new();
    for id in x.users.ids().iter().chain(x.items.ids()) {
        h.update(id.as_bytes());
        h.update([0]);
    }
    for &p in x.matrix.indptr().raw_storage() {
        h.update((p as u64).to_le_bytes());
    }
    for &i in x.matrix.indices() {
        h.update((i as u64).to_le_bytes());
    }
    for &d in x.matrix.data() {
        h.update(d.to_le_bytes());
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn fit(conf: &CsMat<f32>, params: &AlsParams, what: &str) -> Result<AlsModel, CfError> {
    let interactive = std::io::stderr().is_terminal();
    let bar = interactive.then(|| {
        let b = indicatif::ProgressBar::new(params.iterations as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} iterations, {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(what.to_owned());
        b
    });
    let model = als::train(conf, params, |p| match &bar {
        Some(b) => b.inc(1),
        None => info!(
            fit = what,
            iteration = p.iteration,
            of = p.iterations,
            seconds = p.took.as_secs_f64(),
            "als iteration"
        ),
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(model)
}

/// Runs `cf-train`.
pub async fn train(args: &TrainArgs) -> Result<Report, CfError> {
    args.prep.check()?;
    if !(0.0..1.0).contains(&args.test_fraction) {
        return Err(usage("--test-fraction", "must be in [0, 1)"));
    }
    let store = open_store(&args.store).await?;
    let registry = Registry::new(store);
    recsys_core::artifacts::validate_model_name(&args.model_name)?;

    let input_checks = if args.input.skip_input_checks {
        warn!("input checks skipped (--skip-input-checks)");
        None
    } else {
        Some(check_input(args).await?)
    };
    let start = Instant::now();
    let events = read_events(&args.source).await?;
    let x = interactions::aggregate(events, &args.prep.aggregate_options()?)?;
    let weights = args.prep.reweight(&x.matrix);
    let prepare_seconds = start.elapsed().as_secs_f64();
    info!(
        users = x.users.len(),
        items = x.items.len(),
        interactions = x.matrix.nnz(),
        "interactions ready"
    );

    let mut params = args.model.params();
    let (train_w, test_w) = match args.leave_out {
        Some(k) => eval::leave_k_out(&weights, k, params.seed),
        None => eval::random_split(&weights, 1.0 - args.test_fraction, params.seed),
    };

    let search_start = Instant::now();
    let mut alpha = args.prep.alpha;
    let search = if args.search {
        let grid = Grid {
            factors: args.grid_factors.clone(),
            regularization: args.grid_regularization.clone(),
            alpha: args.grid_alpha.clone(),
            iterations: args.grid_iterations.clone(),
        };
        info!(
            combinations = grid.len(),
            folds = args.folds,
            "hyper-parameter search"
        );
        let result = search::grid_search(
            &train_w,
            &grid,
            |a| args.prep.confidence(a),
            &params,
            args.folds,
            args.model.k,
            |t| {
                info!(
                    factors = t.factors,
                    regularization = t.regularization,
                    alpha = t.alpha,
                    iterations = t.iterations,
                    ndcg = t.ndcg,
                    "trial"
                )
            },
        )?;
        if let Some(best) = result.best() {
            params.factors = best.factors;
            params.regularization = best.regularization;
            params.iterations = best.iterations;
            alpha = best.alpha;
        }
        Some(result)
    } else {
        None
    };
    let search_seconds = search_start.elapsed().as_secs_f64();

    let train_start = Instant::now();
    let confidence = args.prep.confidence(alpha);
    let split_model = fit(&confidence.apply(&train_w), &params, "evaluation fit")?;
    let k = args.model.k;
    let metrics: Metrics = search::evaluate_als(&split_model, &train_w, &test_w, k);
    let baseline: Metrics = search::evaluate_popularity(&train_w, &test_w, k);
    let model = if args.publish_split_model {
        split_model
    } else {
        fit(&confidence.apply(&weights), &params, "final fit")?
    };
    let train_seconds = train_start.elapsed().as_secs_f64();

    let params_json = serde_json::json!({
        "factors": params.factors,
        "regularization": params.regularization,
        "iterations": params.iterations,
        "solver": args.model.solver,
        "cg_steps": args.model.cg_steps,
        "seed": params.seed,
        "threads": params.threads,
        "confidence": args.prep.confidence,
        "alpha": alpha,
        "log_epsilon": args.prep.log_epsilon,
        "weighting": args.prep.weighting,
        "event_weights": args.prep.aggregate_options()?.weights_json(),
        "half_life_seconds": args.prep.half_life.map(|d| d.as_secs()),
        "split": match args.leave_out { Some(k) => format!("leave-{k}-out"), None => format!("random {:.2} test", args.test_fraction) },
        "published_model": if args.publish_split_model { "training split" } else { "all data" },
    });
    let metrics_json = serde_json::json!({
        "k": k,
        "model": metrics,
        "baseline_popularity": baseline,
        "search": search,
    });
    let input = ManifestInput {
        version: args.version.clone(),
        params: params_json.clone(),
        metrics: metrics_json,
        data: DataInfo {
            digest: digest(&x),
            interactions: x.matrix.nnz() as u64,
            users: x.users.len() as u64,
            items: x.items.len() as u64,
            time_range: x.time_range,
        },
        trainer_version: env!("CARGO_PKG_VERSION").to_owned(),
        git_sha: option_env!("RECSYS_GIT_SHA").map(str::to_owned),
    };
    let version = registry
        .publish(&args.model_name, &model, &x.users, &x.items, input)
        .await?;
    if args.promote {
        registry.promote(&args.model_name, &version).await?;
    }
    let comparison = match &args.compare_to {
        Some(against) => Some(
            compare(
                &registry,
                &args.model_name,
                against,
                metrics.ndcg,
                k,
                args.min_metric_ratio,
            )
            .await,
        ),
        None => None,
    };

    let report = Report {
        model: args.model_name.clone(),
        version: Some(version),
        store: args.store.store.clone(),
        users: x.users.len(),
        items: x.items.len(),
        interactions: x.matrix.nnz(),
        prepare_seconds,
        search_seconds,
        train_seconds,
        params: params_json,
        metrics,
        baseline,
        search,
        comparison,
        input_checks,
    };
    if let Some(path) = &args.report {
        let body = serde_json::to_vec_pretty(&report).unwrap_or_default();
        std::fs::write(path, body).map_err(|source| CfError::Report {
            path: path.clone(),
            source,
        })?;
    }
    println!("{}", summary(&report));
    Ok(report)
}

/// The new version's NDCG@k against registered version `against`'s, from its manifest. A
/// version that cannot be read, or was evaluated at another k, does not pass, and says why.
async fn compare(
    registry: &Registry,
    model: &str,
    against: &str,
    ndcg: f64,
    k: usize,
    min_ratio: f64,
) -> Comparison {
    let mut c = Comparison {
        against: against.to_owned(),
        metric: format!("ndcg@{k}"),
        value: ndcg,
        against_value: None,
        min_ratio,
        passes: false,
        note: None,
    };
    match registry.get_manifest(model, against).await {
        // A version the registry never had (a placeholder to bootstrap a ModelDeployment) is
        // nothing to be compared with; one it has but cannot read stops the hand-off.
        Err(ArtifactError::VersionNotFound { .. }) => {
            c.passes = true;
            c.note = Some("it is not registered: nothing to compare with".into());
        }
        Err(e) => c.note = Some(format!("cannot read its manifest: {e}")),
        Ok(m) => {
            let their_k = m.metrics["k"].as_u64();
            match (their_k, m.metrics["model"]["ndcg"].as_f64()) {
                (Some(their_k), Some(v)) if their_k as usize == k => {
                    c.against_value = Some(v);
                    c.passes =
                        c.ratio().is_some_and(|r| r >= min_ratio) || (v == 0.0 && ndcg > 0.0);
                }
                (Some(their_k), Some(_)) => {
                    c.note = Some(format!(
                        "it was evaluated at k={their_k}, this run at k={k}"
                    ))
                }
                _ => c.note = Some("its manifest records no NDCG".into()),
            }
        }
    }
    c
}

trait WeightsJson {
    fn weights_json(&self) -> serde_json::Value;
}

impl WeightsJson for AggregateOptions {
    fn weights_json(&self) -> serde_json::Value {
        let w = &self.weights;
        serde_json::json!({"view": w.view, "click": w.click, "add_to_cart": w.add_to_cart, "purchase": w.purchase})
    }
}

/// The summary table printed at the end of `cf-train`.
pub fn summary(r: &Report) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "model       {} {}\n",
        r.model,
        r.version.as_deref().unwrap_or("(not registered)")
    ));
    out.push_str(&format!("store       {}\n", r.store));
    out.push_str(&format!(
        "data        {} users × {} items, {} interactions\n",
        r.users, r.items, r.interactions
    ));
    out.push_str(&format!(
        "time        prepare {:.1}s, search {:.1}s, train {:.1}s\n",
        r.prepare_seconds, r.search_seconds, r.train_seconds
    ));
    out.push_str(&format!(
        "\n{:<16} {:>10} {:>10} {:>8}\n",
        format!("metric @{}", r.metrics.k),
        "als",
        "popularity",
        "ratio"
    ));
    let line = |name: &str, a: f64, b: f64| {
        let ratio = if b > 0.0 {
            format!("{:.2}×", a / b)
        } else {
            "–".into()
        };
        format!("{name:<16} {a:>10.4} {b:>10.4} {ratio:>8}\n")
    };
    let (m, b) = (&r.metrics, &r.baseline);
    out.push_str(&line("precision", m.precision, b.precision));
    out.push_str(&line("recall", m.recall, b.recall));
    out.push_str(&line("map", m.map, b.map));
    out.push_str(&line("ndcg", m.ndcg, b.ndcg));
    out.push_str(&line("auc", m.auc, b.auc));
    out.push_str(&line("coverage", m.coverage, b.coverage));
    out.push_str(&line(
        "personalization",
        m.personalization,
        b.personalization,
    ));
    out.push_str(&line("novelty (bits)", m.novelty, b.novelty));
    out.push_str(&format!("users evaluated  {}\n", m.users));
    if let Some(c) = &r.comparison {
        let verdict = if c.passes { "passes" } else { "does not pass" };
        out.push_str(&format!("\ncompared    {} ({verdict})\n", c.describe()));
    }
    out
}

/// The result of `evaluate`.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// The model's metrics.
    pub model: Metrics,
    /// The popularity baseline's.
    pub baseline: Metrics,
    /// Test events dropped because their user or item is not in the training data.
    pub dropped_test_events: usize,
    /// Seconds spent fitting (0 for a registered model).
    pub fit_seconds: f64,
}

/// Runs `evaluate`.
pub async fn evaluate(args: &EvaluateArgs) -> Result<Evaluation, CfError> {
    args.prep.check()?;
    let opts = args.prep.aggregate_options()?;
    let train_x = interactions::aggregate(events::read_file(&args.train, args.format)?, &opts)?;
    let loose = AggregateOptions {
        min_interactions: 0,
        min_users: 0,
        ..opts.clone()
    };
    let (test_x, dropped) = interactions::aggregate_into(
        events::read_file(&args.test, args.format)?,
        &loose,
        train_x.users.clone(),
        train_x.items.clone(),
        IdPolicy::Known,
    )?;
    let train_w = args.prep.reweight(&train_x.matrix);
    let k = args.model.k;
    let start = Instant::now();
    let model = match &args.version {
        None => fit(
            &args.prep.confidence(args.prep.alpha).apply(&train_w),
            &args.model.params(),
            "fit",
        )?,
        Some(v) => {
            let registry = Registry::new(open_store(&args.store).await?);
            let loaded = registry.load(&args.model_name, v).await?;
            // Re-index the registered factors onto the training files' ids.
            reindex(
                &loaded.model,
                loaded.users.ids(),
                loaded.items.ids(),
                &train_x,
            )
        }
    };
    let fit_seconds = start.elapsed().as_secs_f64();
    let result = Evaluation {
        model: search::evaluate_als(&model, &train_w, &test_x.matrix, k),
        baseline: search::evaluate_popularity(&train_w, &test_x.matrix, k),
        dropped_test_events: dropped,
        fit_seconds,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
    } else {
        let mut out = format!(
            "{:<16} {:>10} {:>10}\n",
            format!("metric @{k}"),
            "als",
            "popularity"
        );
        for (name, a, b) in [
            (
                "precision",
                result.model.precision,
                result.baseline.precision,
            ),
            ("ndcg", result.model.ndcg, result.baseline.ndcg),
            ("map", result.model.map, result.baseline.map),
            ("auc", result.model.auc, result.baseline.auc),
        ] {
            out.push_str(&format!("{name:<16} {a:>10.4} {b:>10.4}\n"));
        }
        out.push_str(&format!(
            "dropped test events (unknown user or item): {dropped}\n"
        ));
        print!("{out}");
    }
    Ok(result)
}

/// Factors of a registered model laid out on another id space: rows of unknown ids are zero.
fn reindex(
    model: &AlsModel,
    users: &[String],
    items: &[String],
    target: &Interactions,
) -> AlsModel {
    let k = model.item_factors.ncols();
    let place = |ids: &[String], factors: &ndarray::Array2<f32>, map: &interactions::IdMap| {
        let mut out = ndarray::Array2::<f32>::zeros((map.len(), k));
        for (row, id) in ids.iter().enumerate() {
            if let Some(t) = map.get(id) {
                out.row_mut(t as usize).assign(&factors.row(row));
            }
        }
        out
    };
    AlsModel {
        user_factors: place(users, &model.user_factors, &target.users),
        item_factors: place(items, &model.item_factors, &target.items),
        regularization: model.regularization,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_and_bad_ones_are_named() {
        let w = event_weights(&["purchase=5".into(), "view=0.5".into()]).expect("weights");
        assert_eq!((w.purchase, w.view, w.add_to_cart), (5.0, 0.5, 2.0));
        let e = event_weights(&["wishlist=1".into()])
            .expect_err("type")
            .to_string();
        assert!(e.contains("--weight") && e.contains("wishlist"), "{e}");
        let e = event_weights(&["view=-1".into()])
            .expect_err("negative")
            .to_string();
        assert!(e.contains("\"-1\""), "{e}");
        assert!(event_weights(&["view".into()]).is_err());
    }

    #[test]
    fn errors_know_whether_retrying_helps() {
        assert!(!CfError::Data(DataError::Empty).retryable());
        assert!(!usage("--alpha", "x").retryable());
        let io = CfError::Events(EventsError::Io {
            path: "/x".into(),
            source: std::io::Error::other("disk"),
        });
        assert!(io.retryable());
    }
}
