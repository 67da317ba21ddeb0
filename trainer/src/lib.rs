//! `recsys-trainer`: the batch jobs of recsys, one subcommand per job.
//!
//! Exit codes: 0 success, 1 a failure retrying may fix (a store or database was unreachable),
//! 2 a failure retrying cannot fix (bad data, bad options). The operator's pod failure policy
//! stops a run at once on 2.
//!
//! Exit code 3 means a data-quality gate held: a blocking check failed on the job's input,
//! and nothing was published ([`quality`]).
//!
//! Implemented: `cf-train` and `evaluate` ([`cf`]); `popularity`, `freshness`,
//! `category-affinity` and `backfill` ([`features`]); `data-quality` ([`quality`]).
//! `index-rebuild` exists in the command line the operator calls and fails with exit code 2
//! saying it is not available yet.
//!
//! When `RECSYS_TERMINATION_MESSAGE_PATH` names a file (the operator sets the container's
//! termination message path), a run ends by writing its [`RunSummary`] there: outcome, figures
//! and the version a `cf-train` run registered, which the operator reads from the Pod status.

pub mod cf;
pub mod contract;
pub mod features;
pub mod quality;

use std::collections::BTreeMap;

use clap::{Parser, Subcommand};
use recsys_core::features::compute::Computation;
use recsys_core::runs::{self, RunSummary};
use recsys_core::telemetry::TelemetryArgs;

/// Options of `recsys-trainer`.
#[derive(Parser, Debug)]
#[command(
    name = "recsys-trainer",
    version,
    about = "recsys batch jobs: features, models, indexes and data-quality checks"
)]
pub struct Cli {
    /// Logging.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// The job to run.
    #[command(subcommand)]
    pub job: Job,
}

/// The trainer's jobs; each BatchJob `spec.job` names one.
#[derive(Subcommand, Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Job {
    /// popularity_score per product: rolling window, event weights, time decay.
    Popularity(features::MaterializeArgs),
    /// freshness_score per product from first-seen and last-updated times.
    Freshness(features::MaterializeArgs),
    /// user_category_affinity: time-decayed share of each user's interactions per category.
    CategoryAffinity(features::MaterializeArgs),
    /// Rebuild the approximate-nearest-neighbour index over product embeddings.
    IndexRebuild(PassThrough),
    /// Train an implicit-feedback ALS model, evaluate it against popularity, and register it.
    CfTrain(cf::TrainArgs),
    /// Recompute features over a date range (offline), or copy a major version into a new one.
    Backfill(features::BackfillArgs),
    /// Check events and features: schema, freshness, completeness, validity, volume, drift.
    DataQuality(quality::DataQualityArgs),
    /// Evaluate a registered model, or train and evaluate on given train and test files.
    Evaluate(cf::EvaluateArgs),
}

/// Options of the jobs not available yet, accepted so the operator's Jobs parse.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct PassThrough {
    /// Job options as `--key=value`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub options: Vec<String>,
}

impl Job {
    /// The subcommand name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Popularity(_) => "popularity",
            Self::Freshness(_) => "freshness",
            Self::CategoryAffinity(_) => "category-affinity",
            Self::IndexRebuild(_) => "index-rebuild",
            Self::CfTrain(_) => "cf-train",
            Self::Backfill(_) => "backfill",
            Self::DataQuality(_) => "data-quality",
            Self::Evaluate(_) => "evaluate",
        }
    }
}

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job exists in the command line but not yet in this version.
    #[error("job {0} is not available in recsys-trainer {version}", version = env!("CARGO_PKG_VERSION"))]
    NotAvailable(&'static str),
    /// Collaborative-filtering training or evaluation failed.
    #[error(transparent)]
    Cf(#[from] cf::CfError),
    /// A feature job failed.
    #[error(transparent)]
    Features(#[from] features::FeatureJobError),
    /// The data-quality job failed, or its gate held.
    #[error(transparent)]
    Quality(#[from] quality::QualityJobError),
}

impl JobError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotAvailable(_) => "NotAvailable",
            Self::Cf(e) => e.kind(),
            Self::Features(e) => e.kind(),
            Self::Quality(e) => e.kind(),
        }
    }

    /// The data-quality report of a gate that held, whichever job ran the checks.
    pub fn gate_report(&self) -> Option<&recsys_core::quality::QualityReport> {
        match self {
            Self::Quality(quality::QualityJobError::Gate(r))
            | Self::Cf(cf::CfError::Gate(r))
            | Self::Features(features::FeatureJobError::Gate(r)) => Some(r),
            _ => None,
        }
    }

    /// The process exit code: whether a retry can help.
    pub fn exit_code(&self) -> i32 {
        if self.gate_report().is_some() {
            return recsys_core::exit::GATE_FAILED;
        }
        let retryable = match self {
            Self::NotAvailable(_) => false,
            Self::Cf(e) => e.retryable(),
            Self::Features(e) => e.retryable(),
            Self::Quality(e) => e.retryable(),
        };
        if retryable {
            recsys_core::exit::RETRYABLE
        } else {
            recsys_core::exit::NOT_RETRYABLE
        }
    }
}

impl From<&cf::Report> for RunSummary {
    fn from(r: &cf::Report) -> Self {
        let mut metrics = BTreeMap::new();
        for (prefix, m) in [("", &r.metrics), ("baseline.", &r.baseline)] {
            let k = m.k;
            for (name, value) in [
                ("ndcg", m.ndcg),
                ("precision", m.precision),
                ("recall", m.recall),
                ("map", m.map),
                ("coverage", m.coverage),
            ] {
                metrics.insert(format!("{prefix}{name}@{k}"), value);
            }
        }
        Self {
            job: "cf-train".into(),
            succeeded: true,
            seconds: r.prepare_seconds + r.search_seconds + r.train_seconds,
            rows: Some(r.interactions as u64),
            model: Some(r.model.clone()),
            version: r.version.clone(),
            metrics,
            comparison: r.comparison.clone(),
            quality: r.input_checks.as_ref().map(|q| q.summary()),
            ..Default::default()
        }
    }
}

impl From<&features::JobReport> for RunSummary {
    fn from(r: &features::JobReport) -> Self {
        Self {
            job: r.job.clone(),
            succeeded: true,
            seconds: r.seconds,
            events: Some(r.events as u64),
            rows: Some(r.versions.iter().map(|v| v.values).sum()),
            quality: r.input_checks.as_ref().map(|q| q.summary()),
            ..Default::default()
        }
    }
}

/// Runs one job; what it did, for the batch-job layer.
pub async fn run(job: &Job) -> Result<RunSummary, JobError> {
    Ok(match job {
        Job::CfTrain(args) => (&cf::train(args).await?).into(),
        Job::Evaluate(args) => {
            cf::evaluate(args).await?;
            RunSummary {
                job: job.name().into(),
                succeeded: true,
                ..Default::default()
            }
        }
        Job::Popularity(args) => {
            (&features::materialize(Computation::Popularity, args).await?).into()
        }
        Job::Freshness(args) => {
            (&features::materialize(Computation::Freshness, args).await?).into()
        }
        Job::CategoryAffinity(args) => {
            (&features::materialize(Computation::CategoryAffinity, args).await?).into()
        }
        Job::Backfill(args) => (&features::backfill(args).await?).into(),
        Job::DataQuality(args) => {
            let report = quality::data_quality(args).await?;
            RunSummary {
                job: job.name().into(),
                succeeded: true,
                seconds: report.seconds,
                quality: Some(report.summary()),
                ..Default::default()
            }
        }
        other => return Err(JobError::NotAvailable(other.name())),
    })
}

/// The summary of a failed run.
pub fn failure_summary(job: &Job, error: &JobError, seconds: f64) -> RunSummary {
    RunSummary {
        job: job.name().into(),
        succeeded: false,
        error_kind: Some(error.kind().into()),
        message: Some(error.to_string()),
        seconds,
        quality: error.gate_report().map(|r| r.summary()),
        ..Default::default()
    }
}

/// Writes `summary` where the operator reads it (the container's termination message, named by
/// [`runs::SUMMARY_PATH_ENV`]); nothing when that is unset. A failure to write is logged: the
/// run's outcome stands, the operator then sees the log's tail instead.
pub fn write_summary(summary: &RunSummary) {
    let Some(path) = std::env::var_os(runs::SUMMARY_PATH_ENV) else {
        return;
    };
    if let Err(e) = std::fs::write(&path, summary.to_message()) {
        tracing::warn!(path = %std::path::Path::new(&path).display(), error = %e, "could not write the run summary");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_batch_job_kind_is_a_subcommand() {
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .collect();
        for kind in recsys_crds::JobKind::ALL {
            assert!(
                names.iter().any(|n| n == kind.as_str()),
                "no subcommand {}",
                kind.as_str()
            );
        }
    }

    #[tokio::test]
    async fn operator_arguments_parse_and_unavailable_jobs_say_so() {
        // What the operator passes (crds example BatchJobs): parameters as --key=value.
        let cli = Cli::try_parse_from([
            "recsys-trainer",
            "popularity",
            "--half-life=7d",
            "--window=90d",
        ])
        .expect("parse");
        let Job::Popularity(p) = &cli.job else {
            panic!("parsed as {:?}", cli.job);
        };
        assert_eq!(
            (p.window.as_deref(), p.half_life.as_deref()),
            (Some("90d"), Some("7d"))
        );
        let cli = Cli::try_parse_from([
            "recsys-trainer",
            "backfill",
            "--features=popularity_score,freshness_score@2",
            "--from=2026-01-01T00:00:00Z",
            "--to=2026-02-01T00:00:00Z",
        ])
        .expect("parse");
        let Job::Backfill(b) = &cli.job else {
            panic!("parsed as {:?}", cli.job);
        };
        assert_eq!(b.features, ["popularity_score", "freshness_score@2"]);
        // Boolean options work as flags and as BatchJob parameters (`--key=value`).
        for (args, skip) in [
            (&["cf-train", "--events=x.tsv"][..], false),
            (
                &["cf-train", "--events=x.tsv", "--skip-input-checks"][..],
                true,
            ),
            (
                &["cf-train", "--events=x.tsv", "--skip-input-checks=true"][..],
                true,
            ),
            (&["popularity", "--skip-input-checks=false"][..], false),
            (&["popularity", "--skip-input-checks=true"][..], true),
            (&["data-quality", "--no-drift=true"][..], true),
        ] {
            let cli =
                Cli::try_parse_from(std::iter::once("recsys-trainer").chain(args.iter().copied()))
                    .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let got = match &cli.job {
                Job::CfTrain(a) => a.input.skip_input_checks,
                Job::Popularity(a) => a.input.skip_input_checks,
                Job::DataQuality(a) => a.no_drift,
                other => panic!("{other:?}"),
            };
            assert_eq!(got, skip, "{args:?}");
        }
        let cli =
            Cli::try_parse_from(["recsys-trainer", "index-rebuild", "--model=als"]).expect("parse");
        let err = run(&cli.job).await.expect_err("not available yet");
        assert_eq!(err.exit_code(), recsys_core::exit::NOT_RETRYABLE);
        assert!(
            Cli::try_parse_from(["recsys-trainer", "popularity", "--no-such-option=1"]).is_err(),
            "unknown options are refused"
        );
    }
}
