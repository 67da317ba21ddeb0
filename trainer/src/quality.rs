//! The `data-quality` job, and the checks `cf-train` and the feature jobs run on their own
//! input before they publish anything ([`recsys_core::quality`] has the checks).
//!
//! A run profiles the events once, judges every check, adds the drift checks of the features
//! with drift thresholds, stores one row per check in `data_quality_results` (with
//! `--database-url`), and prints the report as JSON on stdout. When a blocking check fails the
//! process exits with [`recsys_core::exit::GATE_FAILED`] (3): distinct from a crash (1) and
//! from bad options (2), and never retried by the operator, since the same data fails the same
//! way. The run summary the operator reads carries the counts per check type and verdict,
//! which it exports as `data_quality_checks_total` and `data_quality_violations_total`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Utc};
use clap::Args;
use recsys_core::events::FileFormat;
use recsys_core::quality::profile::{self, ProfileError};
use recsys_core::quality::{self, CheckType, DriftError, QualityArgs, QualityReport, Verdict};
use sqlx::PgPool;
use tracing::{info, warn};

use crate::features::{self, FeatureStoreArgs, Stores};

/// Options of `data-quality`.
#[derive(Args, Debug, Clone)]
pub struct DataQualityArgs {
    /// Where the events are (`--events` file or the `events` table at `--database-url`) and
    /// the feature registry and offline store the drift checks read.
    #[command(flatten)]
    pub store: FeatureStoreArgs,
    /// The time the checks judge at, RFC 3339; now by default.
    #[arg(long)]
    pub at: Option<String>,
    /// The product catalog of `validity.unknown_product`: a table with a `product_id` column
    /// (with `--database-url`), or a file of product ids, one a line (or JSON lines with
    /// `product_id`).
    #[arg(long, env = "RECSYS_DQ_CATALOG")]
    pub catalog: Option<String>,
    /// Features whose drift is checked, comma-separated; every feature with drift thresholds
    /// by default.
    #[arg(long = "feature", value_delimiter = ',')]
    pub features: Vec<String>,
    /// Skip the drift checks (`--no-drift` or `--no-drift=true`, as a BatchJob parameter).
    #[arg(
        long,
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub no_drift: bool,
    /// Thresholds.
    #[command(flatten)]
    pub checks: QualityArgs,
    /// Also write the report (JSON) to this file.
    #[arg(long, env = "RECSYS_REPORT_FILE")]
    pub report: Option<PathBuf>,
}

/// The checks a job runs on its own input (`cf-train`, the feature jobs).
#[derive(Args, Debug, Clone)]
pub struct InputCheckArgs {
    /// Thresholds.
    #[command(flatten)]
    pub checks: QualityArgs,
    /// Run without checking the input first: an escape hatch for a known, accepted anomaly
    /// (the report then has no `inputChecks`). `--skip-input-checks`, or `=true` as a BatchJob
    /// parameter.
    #[arg(
        long,
        env = "RECSYS_SKIP_INPUT_CHECKS",
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub skip_input_checks: bool,
}

/// Why a data-quality run failed.
#[derive(Debug, thiserror::Error)]
pub enum QualityJobError {
    /// An option is invalid.
    #[error("{option}: {reason}")]
    Usage {
        /// The option.
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The events could not be profiled.
    #[error("profiling the events: {0}")]
    Profile(#[from] ProfileError),
    /// The feature stores could not be read.
    #[error("drift checks: {0}")]
    Drift(#[from] DriftError),
    /// The stores could not be opened.
    #[error(transparent)]
    Stores(Box<features::FeatureJobError>),
    /// The results could not be stored.
    #[error("storing the results in data_quality_results: {0}")]
    Results(sqlx::Error),
    /// The report file could not be written.
    #[error("{path}: {source}")]
    Report {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A blocking check failed: the gate held.
    #[error(
        "data-quality gate: {} blocking check(s) failed: {} (run {})",
        .0.failures().count(),
        .0.describe_failures(),
        .0.run_id
    )]
    Gate(Box<QualityReport>),
}

impl QualityJobError {
    /// Stable label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Usage { .. } => "Usage",
            Self::Profile(e) => e.kind(),
            Self::Drift(e) => e.kind(),
            Self::Stores(e) => e.kind(),
            Self::Results(_) => "QualityResults",
            Self::Report { .. } => "Report",
            Self::Gate(_) => GATE_KIND,
        }
    }

    /// Whether a retry can help.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Usage { .. } | Self::Report { .. } | Self::Gate(_) => false,
            Self::Profile(e) => e.retryable(),
            Self::Drift(e) => e.retryable(),
            Self::Stores(e) => e.retryable(),
            Self::Results(e) => !matches!(e, sqlx::Error::Database(_)),
        }
    }
}

pub use recsys_core::quality::GATE_KIND;

/// Where a job's events come from.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    /// The Postgres `events` table.
    Table(&'a PgPool),
    /// An events file. Inside a pipeline a file is a snapshot: judged at its newest event,
    /// without freshness.
    File(&'a Path, FileFormat),
}

/// Profiles `input` at `at_ms`, judges every event check and, with `drift`, adds the drift
/// checks; stores the results when the events are in Postgres. Logs every violation.
pub async fn check(
    job: &str,
    input: Input<'_>,
    at_ms: Option<i64>,
    args: &QualityArgs,
    catalog: Option<&str>,
    drift: Option<(&Stores, &[String])>,
) -> Result<QualityReport, QualityJobError> {
    let started = Instant::now();
    let now = Utc::now().timestamp_millis();
    let (profile, snapshot) = match input {
        Input::Table(pool) => (
            profile::postgres(pool, at_ms.unwrap_or(now), args, catalog).await?,
            false,
        ),
        Input::File(path, format) => {
            let catalog = catalog
                .map(|c| profile::read_catalog_file(Path::new(c)))
                .transpose()?;
            // A data-quality run over a file judges now (a live append log, as the local
            // scorer keeps); a job's input file is a snapshot judged at its newest event.
            let snapshot = job != "data-quality" && at_ms.is_none();
            let at = if snapshot {
                None
            } else {
                Some(at_ms.unwrap_or(now))
            };
            (
                profile::file(path, format, at, args, catalog.as_ref())?,
                snapshot,
            )
        }
    };
    if snapshot
        && profile.malformed > 0
        && let Input::File(path, format) = input
        && let Err(e) = recsys_core::events::read_file(path, format)
    {
        // A job's input file that does not parse is bad input (exit 2, naming the line), as
        // the job's own reader would say, not a gate.
        return Err(ProfileError::Events(e).into());
    }
    let mut results = quality::evaluate(&profile, args);
    if snapshot {
        for r in results
            .iter_mut()
            .filter(|r| r.check_type == CheckType::Freshness)
        {
            r.verdict = Verdict::Skipped;
            r.message = format!(
                "an events file is a snapshot (judged at its newest event); freshness is checked on the events table. {}",
                r.message
            );
        }
    }
    if let Some((stores, only)) = drift {
        results.extend(
            quality::feature_drift(
                stores.registry.as_ref(),
                stores.offline.as_ref(),
                only,
                profile.at_ms,
                args,
            )
            .await?,
        );
    }
    let report = QualityReport::new(job, profile.at_ms, results, started.elapsed().as_secs_f64());
    if let Input::Table(pool) = input {
        quality::results::store(pool, &report)
            .await
            .map_err(QualityJobError::Results)?;
    }
    log(&report);
    Ok(report)
}

/// Logs a report: one line per violation, one summary line.
pub fn log(report: &QualityReport) {
    for r in report.results.iter().filter(|r| r.verdict.is_violation()) {
        warn!(
            run = %report.run_id,
            check = %r.check,
            check_type = r.check_type.as_str(),
            target = %r.target,
            verdict = r.verdict.as_str(),
            observed = r.observed,
            threshold = r.threshold,
            "{}",
            r.message
        );
    }
    let count = |v: Verdict| report.results.iter().filter(|r| r.verdict == v).count();
    info!(
        run = %report.run_id,
        job = %report.job,
        passed = report.passed,
        pass = count(Verdict::Pass),
        warn = count(Verdict::Warn),
        fail = count(Verdict::Fail),
        skipped = count(Verdict::Skipped),
        seconds = report.seconds,
        "data-quality checks"
    );
}

/// `Err(Gate)` when a blocking check of `report` failed.
pub fn gate(report: &QualityReport) -> Result<(), QualityJobError> {
    if report.passed {
        Ok(())
    } else {
        Err(QualityJobError::Gate(Box::new(report.clone())))
    }
}

fn parse_at(s: &Option<String>) -> Result<Option<i64>, QualityJobError> {
    s.as_deref()
        .map(|t| {
            DateTime::parse_from_rfc3339(t)
                .map(|d| d.timestamp_millis())
                .map_err(|e| QualityJobError::Usage {
                    option: "--at",
                    reason: format!("{t:?} is not an RFC 3339 time: {e}"),
                })
        })
        .transpose()
}

/// Runs `data-quality`: prints the report, stores it, and fails with [`QualityJobError::Gate`]
/// when a blocking check failed.
pub async fn data_quality(args: &DataQualityArgs) -> Result<QualityReport, QualityJobError> {
    let at = parse_at(&args.at)?;
    if args.store.events.is_none() && args.store.database_url.is_none() {
        return Err(QualityJobError::Usage {
            option: "--events",
            reason:
                "give an events file, or --database-url (RECSYS_DATABASE_URL) for the events table"
                    .into(),
        });
    }
    let stores = Stores::open(&args.store)
        .await
        .map_err(|e| QualityJobError::Stores(Box::new(e)))?;
    let input = match (&args.store.events, &stores.events) {
        (Some(path), _) => Input::File(path, args.store.format),
        (None, Some(events)) => Input::Table(events.pool()),
        (None, None) => unreachable!("checked above: a file or a database"),
    };
    let drift = (!args.no_drift).then_some((&stores, args.features.as_slice()));
    let report = check(
        "data-quality",
        input,
        at,
        &args.checks,
        args.catalog.as_deref(),
        drift,
    )
    .await?;
    let json = serde_json::to_string_pretty(&report).unwrap_or_default();
    println!("{json}");
    if let Some(path) = &args.report {
        std::fs::write(path, format!("{json}\n")).map_err(|source| QualityJobError::Report {
            path: path.clone(),
            source,
        })?;
    }
    gate(&report)?;
    Ok(report)
}
