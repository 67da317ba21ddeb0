//! The feature jobs: `popularity`, `freshness` and `category-affinity` materialise a feature
//! at one point in time; `backfill` recomputes features over a date range.
//!
//! A job computes every registered, not retired, major version of its feature (a breaking
//! change lives side by side with the old major until that is retired), each with the window
//! and half-life its own definition prescribes: the definition is the source of truth, and a
//! `--window` or `--half-life` that disagrees with it is refused rather than silently writing
//! values the definition does not describe.
//!
//! For each version, in this order:
//! 1. the offline store: the rows of event time `at` are replaced in one transaction
//!    ([`OfflineStore::replace_range`] over `[at, at + 1 ms)`), so running the job again with
//!    the same `--at` leaves exactly the same rows;
//! 2. the online store (features served online): one pipelined batch per 1,000 values, each
//!    with event time `at`; a value with a newer event time already stored is kept;
//! 3. the registry: the run is recorded under `at` (recording the same `at` again replaces it);
//! 4. `popularity` only: the rankings (the top `--rankings-top-n` products overall and per
//!    category, for cold start; [`recsys_core::features::rankings`]) in the artifact store
//!    named by `--store`, at `rankings/<feature>/v<major>/latest.json`; rankings of a later
//!    `at` already stored are kept.
//!
//! A failure after step 1 fails the job with a retryable exit code; the retry is idempotent.
//! A rankings failure does not stop the other versions: it is reported per version and fails
//! the job at the end (retryable when the store's error is).
//! Entities that drop out of the window keep their last online value until it goes stale (its
//! TTL) and expires (retention); the offline store has no row for them at the new `at`.
//!
//! `backfill` recomputes the features at every `--step` in `[--from, --to)` and replaces the
//! offline rows of that range in one transaction per version: history only, the online store
//! and the rankings hold the latest values and are left alone. It is also the migration
//! helper of a breaking change: `--feature name@2` recomputes into major version 2 from the
//! events, and `--copy-from 1` copies major 1's offline rows instead (same value type only).
//!
//! Stores: with `--database-url` the events table, offline store and registry are in Postgres
//! and the online store is Redis (`--redis-url`). Without it (local mode) events come from
//! `--events`, and the offline store and registry are JSON files under `--data-dir`; the local
//! scorer serves from those. The local mode registers the embedded definitions of the first
//! features (`docs/examples/features/`) when its registry lacks them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use clap::Args;
use clap::builder::TypedValueParser as _;
use recsys_core::artifacts::ArtifactStore;
use recsys_core::cf::interactions::Event;
use recsys_core::events::{self, EventsError, FileFormat, PostgresEvents};
use recsys_core::features::compute::{self, Computation, Inputs, Params, ProductTimes};
use recsys_core::features::offline::{
    InProcessOfflineStore, OfflineError, OfflineRow, OfflineStore, PostgresOfflineStore,
};
use recsys_core::features::online::{
    DEFAULT_PREFIX, OnlineError, OnlineStore, RedisOnlineStore, RedisOnlineStoreOptions,
    WriteReport,
};
use recsys_core::features::rankings::{self, DEFAULT_TOP_N, Rankings, RankingsError, WriteOutcome};
use recsys_core::features::registry::{
    FeatureRegistry, InProcessFeatureRegistry, Lifecycle, PostgresFeatureRegistry, QualityPolicy,
    RegisteredFeature, RegistryError, VersionSelector, parse_duration_ms,
};
use recsys_core::features::{
    self as features, EntityKey, FeatureRef, FeatureValue, StoredValue, defaults,
};
use recsys_core::stores::{self, PostgresArgs, StoreError};
use serde::Serialize;
use tracing::{info, warn};

use crate::cf;

/// Why a feature job failed.
#[derive(Debug, thiserror::Error)]
pub enum FeatureJobError {
    /// An option is wrong.
    #[error("invalid option {option}: {reason}")]
    Usage {
        /// The option.
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The feature's definition is missing or does not fit the job.
    #[error("feature definition: {0}")]
    Definition(String),
    /// Events could not be read.
    #[error(transparent)]
    Events(#[from] EventsError),
    /// A store could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The registry failed or refused.
    #[error("feature registry: {0}")]
    Registry(#[from] RegistryError),
    /// The offline store failed or refused.
    #[error("offline store: {0}")]
    Offline(#[from] OfflineError),
    /// The online store failed or refused.
    #[error("online store: {0}")]
    Online(#[from] OnlineError),
    /// The artifact store named by `--store` could not be opened.
    #[error(transparent)]
    ArtifactStore(cf::CfError),
    /// The rankings could not be built or written.
    #[error("rankings: {0}")]
    Rankings(#[from] RankingsError),
    /// The run report could not be written.
    #[error("writing the report {path}: {source}")]
    Report {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The input checks or drift checks could not run.
    #[error("data-quality checks: {0}")]
    Quality(Box<crate::quality::QualityJobError>),
    /// A version's input or values failed a blocking check and its policy is `block`: its
    /// values were not published (other versions may have been).
    #[error(
        "data-quality gate: {} blocking check(s) failed, the values already served were kept: {} (run {})",
        .0.failures().count(),
        .0.describe_failures(),
        .0.run_id
    )]
    Gate(Box<recsys_core::quality::QualityReport>),
}

impl From<recsys_core::quality::DriftError> for FeatureJobError {
    fn from(e: recsys_core::quality::DriftError) -> Self {
        Self::Quality(Box::new(e.into()))
    }
}

impl FeatureJobError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Usage { .. } => "Usage",
            Self::Definition(_) => "Definition",
            Self::Events(e) => e.kind(),
            Self::Store(e) => e.kind(),
            Self::Registry(e) => e.kind(),
            Self::Offline(e) => e.kind(),
            Self::Online(e) => e.kind(),
            Self::ArtifactStore(e) => e.kind(),
            Self::Rankings(e) => e.kind(),
            Self::Report { .. } => "Report",
            Self::Quality(e) => e.kind(),
            Self::Gate(_) => crate::quality::GATE_KIND,
        }
    }

    /// Whether a retry can help.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Usage { .. } | Self::Definition(_) | Self::Gate(_) => false,
            Self::Quality(e) => e.retryable(),
            Self::Events(e) => e.retryable(),
            Self::Store(_) | Self::Report { .. } => true,
            Self::Registry(e) => e.retryable(),
            Self::Offline(e) => e.retryable(),
            Self::Online(e) => e.is_outage(),
            Self::ArtifactStore(e) => e.retryable(),
            Self::Rankings(e) => e.retryable(),
        }
    }
}

fn usage(option: &'static str, reason: impl Into<String>) -> FeatureJobError {
    FeatureJobError::Usage {
        option,
        reason: reason.into(),
    }
}

/// Where events come from and where features go.
#[derive(Args, Debug, Clone)]
pub struct FeatureStoreArgs {
    /// Events file (JSON lines, whose `category` feeds category affinity; TSV/CSV; OTTO).
    /// Without it, events are read from the Postgres `events` table at `--database-url`.
    #[arg(long, env = "RECSYS_EVENTS")]
    pub events: Option<PathBuf>,
    /// Format of `--events`.
    #[arg(long, value_enum, default_value_t = FileFormat::Auto)]
    pub format: FileFormat,
    /// Postgres: the events table, the offline store and the feature registry. Without it
    /// (local mode), the offline store and registry are files under `--data-dir`.
    #[arg(long, env = "RECSYS_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Redis online store. Required with `--database-url` for features served online; in local
    /// mode the scorer serves from the offline store's latest values.
    #[arg(long, env = "RECSYS_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Key prefix in Redis.
    #[arg(long, env = "RECSYS_REDIS_PREFIX", default_value = DEFAULT_PREFIX)]
    pub redis_prefix: String,
    /// The local mode's directory (offline store and registry files).
    #[arg(long, env = "RECSYS_DATA_DIR", default_value = ".recsys")]
    pub data_dir: PathBuf,
}

/// Options of `popularity`, `freshness` and `category-affinity`.
#[derive(Args, Debug, Clone)]
pub struct MaterializeArgs {
    /// Stores.
    #[command(flatten)]
    pub store: FeatureStoreArgs,
    /// The feature to compute (a definition whose `computation.job` is this job); the job's
    /// own feature by default.
    #[arg(long)]
    pub feature: Option<String>,
    /// The time the values describe, RFC 3339; now by default. The same `--at` gives the
    /// same values.
    #[arg(long)]
    pub at: Option<String>,
    /// Window of events; when given it must equal the definition's `computation.window`.
    #[arg(long)]
    pub window: Option<String>,
    /// Half-life of the decay; when given it must equal the definition's
    /// `computation.halfLife`.
    #[arg(long)]
    pub half_life: Option<String>,
    /// Also write the run report (JSON) to this file.
    #[arg(long, env = "RECSYS_REPORT_FILE")]
    pub report: Option<PathBuf>,
    /// Where `popularity` writes its rankings (the top products overall and per category,
    /// read by the scorer for cold start): the artifact store of the models. Other jobs
    /// ignore it.
    #[command(flatten)]
    pub artifacts: cf::StoreArgs,
    /// Length of every ranked list `popularity` writes (overall and per category).
    #[arg(
        long,
        env = "RECSYS_RANKINGS_TOP_N",
        default_value_t = DEFAULT_TOP_N,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|n| n as usize)
    )]
    pub rankings_top_n: usize,
    /// The checks run on the input events before computing (the drift checks of the new
    /// values, for definitions with `drift`, run even with `--skip-input-checks`). A version
    /// whose input or values fail a blocking check is not published unless its
    /// `onQualityFailure` is `warn`.
    #[command(flatten)]
    pub input: crate::quality::InputCheckArgs,
}

/// Options of `backfill`.
#[derive(Args, Debug, Clone)]
pub struct BackfillArgs {
    /// Stores.
    #[command(flatten)]
    pub store: FeatureStoreArgs,
    /// Features to recompute: `name` (every registered major version) or `name@2` (one);
    /// repeatable or comma-separated.
    #[arg(
        long = "feature",
        visible_alias = "features",
        value_delimiter = ',',
        required = true
    )]
    pub features: Vec<String>,
    /// Start of the range (inclusive), RFC 3339.
    #[arg(long, required_unless_present = "copy_from")]
    pub from: Option<String>,
    /// End of the range (exclusive), RFC 3339.
    #[arg(long, required_unless_present = "copy_from")]
    pub to: Option<String>,
    /// Interval between recomputed points, from `--from`.
    #[arg(long, default_value = "1d")]
    pub step: String,
    /// Copy this major version's offline rows (all times) into the named version instead of
    /// recomputing; the value types must match.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub copy_from: Option<u64>,
    /// Also write the run report (JSON) to this file.
    #[arg(long, env = "RECSYS_REPORT_FILE")]
    pub report: Option<PathBuf>,
}

/// Most points one backfill computes.
pub const MAX_BACKFILL_POINTS: usize = 10_000;

/// The stores a job writes.
pub struct Stores {
    /// The feature registry.
    pub registry: Arc<dyn FeatureRegistry>,
    /// The offline store.
    pub offline: Arc<dyn OfflineStore>,
    /// The online store, when there is one.
    pub online: Option<Arc<dyn OnlineStore>>,
    /// The events table, when events come from Postgres.
    pub events: Option<PostgresEvents>,
    /// Local mode: no Postgres.
    pub local: bool,
}

impl Stores {
    /// Opens the stores `args` name, migrating the Postgres schema.
    pub async fn open(args: &FeatureStoreArgs) -> Result<Self, FeatureJobError> {
        let online: Option<Arc<dyn OnlineStore>> = match &args.redis_url {
            Some(url) => Some(Arc::new(RedisOnlineStore::connect_lazy(
                url,
                RedisOnlineStoreOptions::with_prefix(args.redis_prefix.clone()),
            )?)),
            None => None,
        };
        let Some(url) = &args.database_url else {
            let offline =
                InProcessOfflineStore::open(features::local_offline_path(&args.data_dir))?;
            let registry =
                InProcessFeatureRegistry::open(features::local_registry_path(&args.data_dir))?;
            return Ok(Self {
                registry: Arc::new(registry),
                offline: Arc::new(offline),
                online,
                events: None,
                local: true,
            });
        };
        let pool = stores::postgres(&PostgresArgs {
            url: url.clone(),
            max_connections: 4,
        })
        .await?;
        events::migrate(&pool).await?;
        let offline = PostgresOfflineStore::new(pool.clone());
        offline.migrate().await?;
        let registry = PostgresFeatureRegistry::new(pool.clone());
        registry.migrate().await?;
        Ok(Self {
            registry: Arc::new(registry),
            offline: Arc::new(offline),
            online,
            events: Some(PostgresEvents::new(pool)),
            local: false,
        })
    }

    /// The versions of `name` a job computes: the highest usable version of every major that
    /// is not retired (or of `major` only). The local mode registers the embedded definition
    /// of a first feature its registry lacks.
    pub async fn versions_to_compute(
        &self,
        name: &str,
        major: Option<u64>,
    ) -> Result<Vec<RegisteredFeature>, FeatureJobError> {
        let mut all = self.registry.versions(name).await?;
        if all.is_empty()
            && self.local
            && let Some(spec) = defaults::spec(name)
        {
            let registered = self.registry.register(&spec).await?;
            info!(feature = name, version = %registered.version, "registered the embedded definition");
            all = self.registry.versions(name).await?;
        }
        if all.is_empty() {
            return Err(FeatureJobError::Definition(format!(
                "feature {name} is not registered; apply its FeatureDefinition (see docs/examples/features/)"
            )));
        }
        let mut majors: Vec<u64> = all
            .iter()
            .filter(|f| f.lifecycle() != Lifecycle::Retired)
            .map(|f| f.major)
            .filter(|m| major.is_none_or(|want| want == *m))
            .collect();
        majors.dedup();
        let mut out = vec![];
        for m in majors {
            if let Some(f) = self.registry.get(name, &VersionSelector::Major(m)).await? {
                out.push(f);
            }
        }
        if out.is_empty() {
            let which = major.map_or_else(
                || "any version".to_owned(),
                |m| format!("major version {m}"),
            );
            return Err(FeatureJobError::Definition(format!(
                "feature {name} has no {which} that is not retired"
            )));
        }
        Ok(out)
    }
}

/// What a run did for one feature version.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VersionReport {
    /// Feature name.
    pub feature: String,
    /// The registered version computed.
    pub version: String,
    /// Its major version (the storage address).
    pub major: u64,
    /// The window and half-life used (ms).
    pub window_ms: i64,
    /// Half-life used (ms).
    pub half_life_ms: i64,
    /// Points in time computed (1 for a materialization).
    pub points: usize,
    /// Entities with a value, summed over points.
    pub values: u64,
    /// Offline rows replaced.
    pub offline_deleted: u64,
    /// Offline rows written.
    pub offline_written: u64,
    /// Online values written, when served online.
    pub online_written: Option<u64>,
    /// Online values kept because a newer one was stored.
    pub online_kept_newer: Option<u64>,
    /// Online values not stored because `at` is already past their retention (a rerun of an
    /// old window).
    pub online_expired: Option<u64>,
    /// Times the computation ran.
    pub computations: u64,
    /// The rankings written (`popularity` only).
    pub rankings: Option<RankingsReport>,
    /// Why the values were not published (a data-quality gate held), when they were not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

/// What a `popularity` run did with the rankings of one feature version.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RankingsReport {
    /// The artifact key, `rankings/<feature>/v<major>/latest.json`.
    pub key: String,
    /// Whether these rankings are now the latest; `false` when rankings of a later time were
    /// already stored and kept.
    pub written: bool,
    /// The time of the stored rankings that were kept (ms since the epoch), when not written.
    pub kept_newer_at_ms: Option<i64>,
    /// Length limit of every list.
    pub n: usize,
    /// Products in the overall list.
    pub overall: usize,
    /// Categories with a list.
    pub categories: usize,
    /// Why the rankings were not written, when they were not.
    pub error: Option<String>,
}

impl VersionReport {
    fn new(feature: &RegisteredFeature, params: &Params, points: usize, values: u64) -> Self {
        Self {
            feature: feature.spec.name.clone(),
            version: feature.spec.version.clone(),
            major: feature.major,
            window_ms: params.window_ms,
            half_life_ms: params.half_life_ms,
            points,
            values,
            offline_deleted: 0,
            offline_written: 0,
            online_written: None,
            online_kept_newer: None,
            online_expired: None,
            computations: points as u64,
            rankings: None,
            held: None,
        }
    }
}

/// The report of a run, printed as JSON on stdout.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobReport {
    /// The job.
    pub job: String,
    /// The time the values describe (materializations) or the range (backfills), RFC 3339.
    pub at: String,
    /// Events read.
    pub events: usize,
    /// Per feature version.
    pub versions: Vec<VersionReport>,
    /// Wall time.
    pub seconds: f64,
    /// The data-quality checks of the run: the input events', then each version's drift.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_checks: Option<recsys_core::quality::QualityReport>,
}

fn parse_time(option: &'static str, s: &str) -> Result<DateTime<Utc>, FeatureJobError> {
    DateTime::parse_from_rfc3339(s)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|e| usage(option, format!("{s:?} is not an RFC 3339 time: {e}")))
}

fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Checks an override against what the definition prescribes.
fn check_override(
    option: &'static str,
    given: Option<&str>,
    prescribed_ms: i64,
    f: &RegisteredFeature,
    field: &str,
) -> Result<(), FeatureJobError> {
    let Some(given) = given else { return Ok(()) };
    let ms = parse_duration_ms(given).map_err(|e| usage(option, e))?;
    if i64::try_from(ms).ok() != Some(prescribed_ms) {
        return Err(usage(
            option,
            format!(
                "{given} differs from {} {} computation.{field} ({} ms); change the definition (a new version) instead",
                f.spec.name, f.spec.version, prescribed_ms
            ),
        ));
    }
    Ok(())
}

/// Events and first-seen times a set of computations needs, read once.
struct EventData {
    events: Vec<(Event, Option<String>)>,
    /// First-seen times per point in time (Postgres source and freshness only).
    products: Vec<(i64, Vec<ProductTimes>)>,
}

impl EventData {
    fn inputs(&self, at_ms: i64) -> Inputs<'_> {
        Inputs {
            events: &self.events,
            products: self
                .products
                .iter()
                .find(|(t, _)| *t == at_ms)
                .map(|(_, p)| p.as_slice()),
        }
    }
}

/// Reads what computing `plans` at `points` needs.
async fn read_events(
    args: &FeatureStoreArgs,
    stores: &Stores,
    plans: &[(Computation, Params)],
    points: &[i64],
) -> Result<EventData, FeatureJobError> {
    let last = points.iter().copied().max().unwrap_or_default();
    if let Some(path) = &args.events {
        return Ok(EventData {
            events: events::read_file_with_categories(path, args.format)?,
            products: vec![],
        });
    }
    let Some(table) = &stores.events else {
        return Err(usage(
            "--events",
            "give an events file, or --database-url (RECSYS_DATABASE_URL) for the events table",
        ));
    };
    // Windowed computations read their window before the first point; freshness reads
    // first-seen times aggregated by the database.
    let first = points.iter().copied().min().unwrap_or_default();
    let from = plans
        .iter()
        .filter_map(|(c, p)| Params { at_ms: first, ..*p }.events_from_ms(*c))
        .min();
    let events = if from.is_some() {
        table
            .read_with_categories(from.map(from_ms), Some(from_ms(last.saturating_add(1))))
            .await?
    } else {
        vec![]
    };
    let mut products = vec![];
    if plans.iter().any(|(c, _)| *c == Computation::Freshness) {
        for &t in points {
            products.push((t, table.first_seen(from_ms(t)).await?));
        }
    }
    Ok(EventData { events, products })
}

/// One version to compute.
struct Plan {
    feature: RegisteredFeature,
    computation: Computation,
    params: Params,
}

fn plan(
    f: RegisteredFeature,
    expected_job: Option<Computation>,
    at_ms: i64,
) -> Result<Plan, FeatureJobError> {
    let job = &f.spec.computation.job;
    let computation = Computation::from_job(job).ok_or_else(|| {
        FeatureJobError::Definition(format!(
            "{} {} is computed by job {job:?}, which is not a feature computation of this trainer ({})",
            f.spec.name,
            f.spec.version,
            Computation::ALL.map(Computation::job).join(", ")
        ))
    })?;
    if let Some(expected) = expected_job
        && expected != computation
    {
        return Err(FeatureJobError::Definition(format!(
            "{} {} is computed by job {job}, not {}",
            f.spec.name,
            f.spec.version,
            expected.job()
        )));
    }
    computation
        .check(&f.spec)
        .map_err(FeatureJobError::Definition)?;
    let params =
        Params::from_spec(computation, &f.spec, at_ms).map_err(FeatureJobError::Definition)?;
    Ok(Plan {
        feature: f,
        computation,
        params,
    })
}

fn rows_at(values: &[(String, FeatureValue)], at_ms: i64) -> Vec<OfflineRow> {
    values
        .iter()
        .map(|(id, v)| OfflineRow::new(id.clone(), v.clone(), at_ms))
        .collect()
}

async fn write_online(
    online: &dyn OnlineStore,
    p: &Plan,
    values: Vec<(String, FeatureValue)>,
) -> Result<WriteReport, FeatureJobError> {
    let ttl_ms = p
        .feature
        .spec
        .ttl_ms()
        .map_err(|e| FeatureJobError::Definition(e.to_string()))?;
    let written_at_ms = recsys_core::features::online::now_ms();
    let kind = p.computation.entity();
    let values: Vec<(EntityKey, StoredValue)> = values
        .into_iter()
        .map(|(id, value)| {
            (
                EntityKey { kind, id },
                StoredValue {
                    value,
                    event_time_ms: p.params.at_ms,
                    written_at_ms,
                },
            )
        })
        .collect();
    Ok(online
        .write_batch(
            &p.feature.feature_ref(),
            std::time::Duration::from_millis(ttl_ms),
            &values,
        )
        .await?)
}

fn emit(report: &JobReport, path: Option<&PathBuf>) -> Result<(), FeatureJobError> {
    let json = serde_json::to_string_pretty(report).unwrap_or_default();
    println!("{json}");
    if let Some(path) = path {
        std::fs::write(path, format!("{json}\n")).map_err(|source| FeatureJobError::Report {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Runs `popularity`, `freshness` or `category-affinity`.
pub async fn materialize(
    computation: Computation,
    args: &MaterializeArgs,
) -> Result<JobReport, FeatureJobError> {
    let started = Instant::now();
    let at = match &args.at {
        Some(s) => parse_time("--at", s)?,
        None => Utc::now(),
    };
    let at_ms = at.timestamp_millis();
    let stores = Stores::open(&args.store).await?;
    let name = args
        .feature
        .clone()
        .unwrap_or_else(|| computation.default_feature().to_owned());
    let mut plans = vec![];
    for f in stores.versions_to_compute(&name, None).await? {
        let p = plan(f, Some(computation), at_ms)?;
        if computation.uses_window() {
            check_override(
                "--window",
                args.window.as_deref(),
                p.params.window_ms,
                &p.feature,
                "window",
            )?;
        }
        check_override(
            "--half-life",
            args.half_life.as_deref(),
            p.params.half_life_ms,
            &p.feature,
            "halfLife",
        )?;
        if p.feature.spec.online && stores.online.is_none() && !stores.local {
            return Err(usage(
                "--redis-url",
                format!(
                    "{} {} is served online: give --redis-url (RECSYS_REDIS_URL)",
                    p.feature.spec.name, p.feature.spec.version
                ),
            ));
        }
        plans.push(p);
    }
    // Opened before anything is written, so that a bad `--store` changes nothing.
    let artifacts = match computation {
        Computation::Popularity => Some(
            cf::open_store(&args.artifacts)
                .await
                .map_err(FeatureJobError::ArtifactStore)?,
        ),
        Computation::Freshness | Computation::CategoryAffinity => None,
    };
    let mut checks = if args.input.skip_input_checks {
        warn!("input checks skipped (--skip-input-checks)");
        None
    } else {
        let input = match (&args.store.events, &stores.events) {
            (Some(path), _) => crate::quality::Input::File(path, args.store.format),
            (None, Some(events)) => crate::quality::Input::Table(events.pool()),
            (None, None) => {
                return Err(usage(
                    "--events",
                    "give an events file, or --database-url (RECSYS_DATABASE_URL) for the events table",
                ));
            }
        };
        // A file is a snapshot, judged at its newest event; the table at `at`.
        let at = matches!(input, crate::quality::Input::Table(_)).then_some(at_ms);
        Some(
            crate::quality::check(computation.job(), input, at, &args.input.checks, None, None)
                .await
                .map_err(|e| FeatureJobError::Quality(Box::new(e)))?,
        )
    };
    let input_failed = checks.as_ref().is_some_and(|c| !c.passed);
    let blocks =
        |p: &Plan| p.feature.spec.on_quality_failure.unwrap_or_default() == QualityPolicy::Block;
    if input_failed
        && plans.iter().all(blocks)
        && let Some(c) = checks
    {
        // Nothing would be published: stop before reading input that failed its checks.
        let versions = plans
            .iter()
            .map(|p| {
                let mut r = VersionReport::new(&p.feature, &p.params, 0, 0);
                r.held = Some(format!("input: {}", c.describe_failures()));
                r
            })
            .collect();
        emit(
            &JobReport {
                job: computation.job().to_owned(),
                at: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                events: 0,
                versions,
                seconds: started.elapsed().as_secs_f64(),
                input_checks: Some(c.clone()),
            },
            args.report.as_ref(),
        )?;
        return Err(FeatureJobError::Gate(Box::new(c)));
    }
    let data = read_events(
        &args.store,
        &stores,
        &plans
            .iter()
            .map(|p| (p.computation, p.params))
            .collect::<Vec<_>>(),
        &[at_ms],
    )
    .await?;
    let categories = artifacts
        .as_ref()
        .map(|_| rankings::product_categories(&data.events, at_ms))
        .unwrap_or_default();
    let mut versions = vec![];
    let mut rankings_failure = None;
    let mut held = false;
    for p in &plans {
        let values = compute::compute(p.computation, data.inputs(at_ms), &p.params);
        let feature = p.feature.feature_ref();
        let mut report = VersionReport::new(&p.feature, &p.params, 1, values.len() as u64);
        let blocks = blocks(p);
        let mut problems = vec![];
        if input_failed && let Some(c) = &checks {
            problems.push(format!("input: {}", c.describe_failures()));
        }
        // Drift of the new values against the feature's earlier materializations.
        if let Some(thresholds) = &p.feature.spec.drift {
            let times = recsys_core::quality::drift::materialization_times(
                stores.registry.as_ref(),
                &feature,
            )
            .await?;
            let reference = recsys_core::quality::drift::reference(
                stores.offline.as_ref(),
                &feature,
                p.computation.entity(),
                &times,
                at_ms,
                args.input.checks.drift_reference.ms,
            )
            .await?;
            let current = recsys_core::quality::drift::Sample::of(values.iter().map(|(_, v)| v));
            let results = recsys_core::quality::drift::judge(
                &recsys_core::quality::drift::target(&feature),
                thresholds,
                &reference,
                &current,
                args.input.checks.drift_min_values,
                blocks,
            );
            for r in results.iter().filter(|r| r.verdict.is_violation()) {
                problems.push(r.describe());
            }
            checks
                .get_or_insert_with(|| {
                    recsys_core::quality::QualityReport::new(computation.job(), at_ms, vec![], 0.0)
                })
                .add(results);
        }
        if !problems.is_empty() {
            if blocks {
                warn!(feature = %feature, problems = %problems.join("; "), "data-quality gate: values not published, the values already served are kept");
                report.held = Some(problems.join("; "));
                held = true;
                versions.push(report);
                continue;
            }
            warn!(feature = %feature, problems = %problems.join("; "), "data-quality checks failed; publishing anyway (onQualityFailure: warn)");
        }
        if p.feature.spec.offline {
            let s = stores
                .offline
                .replace_range(
                    &feature,
                    p.computation.entity(),
                    at_ms,
                    at_ms + 1,
                    &rows_at(&values, at_ms),
                )
                .await?;
            report.offline_deleted = s.deleted;
            report.offline_written = s.written;
        }
        if p.feature.spec.online {
            if let Some(online) = &stores.online {
                let w = write_online(online.as_ref(), p, values.clone()).await?;
                report.online_written = Some(w.written);
                report.online_kept_newer = Some(w.kept_newer);
                report.online_expired = Some(w.expired);
                if w.expired > 0 {
                    warn!(feature = %feature, expired = w.expired, "values already past their online retention were not stored online");
                }
            } else {
                info!(feature = %feature, "no online store (local mode): the scorer serves the offline store's latest values");
            }
        }
        stores
            .registry
            .record_materialization(&feature, at_ms, values.len() as u64)
            .await?;
        info!(
            feature = %feature,
            version = %p.feature.spec.version,
            values = values.len(),
            at = %at.to_rfc3339(),
            "materialized"
        );
        // Last, so that the values and their run are recorded whatever happens to the
        // artifact store; a failure is reported and fails the job after every version.
        if let Some(store) = &artifacts {
            let (r, failed) =
                publish_rankings(store.as_ref(), &feature, &values, &categories, at_ms, args).await;
            report.rankings = Some(r);
            if let Some(e) = failed {
                warn!(
                    feature = %feature,
                    kind = e.kind(),
                    error = &e as &dyn std::error::Error,
                    "rankings not written"
                );
                rankings_failure.get_or_insert(e);
            }
        }
        versions.push(report);
    }
    if let (Some(c), Some(events)) = (&checks, &stores.events) {
        // Again with the drift results (the input's rows are replaced by themselves).
        recsys_core::quality::results::store(events.pool(), c)
            .await
            .map_err(|e| {
                FeatureJobError::Quality(Box::new(crate::quality::QualityJobError::Results(e)))
            })?;
    }
    let report = JobReport {
        job: computation.job().to_owned(),
        at: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        events: data.events.len(),
        versions,
        seconds: started.elapsed().as_secs_f64(),
        input_checks: checks.clone(),
    };
    emit(&report, args.report.as_ref())?;
    match (rankings_failure, checks) {
        (Some(e), _) => Err(e.into()),
        (None, Some(c)) if held => Err(FeatureJobError::Gate(Box::new(c))),
        _ => Ok(report),
    }
}

/// Builds and writes the rankings of one version; returns what to report and the error, if
/// any.
async fn publish_rankings(
    store: &dyn ArtifactStore,
    feature: &FeatureRef,
    values: &[(String, FeatureValue)],
    categories: &BTreeMap<String, String>,
    at_ms: i64,
    args: &MaterializeArgs,
) -> (RankingsReport, Option<RankingsError>) {
    let mut report = RankingsReport {
        key: rankings::rankings_key(feature),
        written: false,
        kept_newer_at_ms: None,
        n: args.rankings_top_n,
        overall: 0,
        categories: 0,
        error: None,
    };
    let built = rankings::float_scores(feature, values).and_then(|scores| {
        Rankings::build(
            feature,
            at_ms,
            recsys_core::features::online::now_ms(),
            args.rankings_top_n,
            &scores,
            categories,
        )
    });
    let outcome = match built {
        Ok(r) => {
            report.overall = r.overall.len();
            report.categories = r.by_category.len();
            rankings::write_rankings(store, &r).await
        }
        Err(e) => Err(e),
    };
    match outcome {
        Ok(WriteOutcome::Written) => report.written = true,
        Ok(WriteOutcome::KeptNewer { at_ms: newer }) => {
            // A late retry of an old window: normal, and in the report.
            info!(
                feature = %feature,
                key = %report.key,
                stored_at_ms = newer,
                "rankings of a later time are stored; kept them"
            );
            report.kept_newer_at_ms = Some(newer);
        }
        Err(e) => {
            report.error = Some(e.to_string());
            return (report, Some(e));
        }
    }
    (report, None)
}

/// `name` or `name@major`.
fn parse_feature_arg(s: &str) -> Result<(String, Option<u64>), FeatureJobError> {
    match s.split_once('@') {
        None if !s.is_empty() => Ok((s.to_owned(), None)),
        Some((name, major)) if !name.is_empty() => {
            let major = major.strip_prefix('v').unwrap_or(major);
            let major = major.parse().map_err(|_| {
                usage(
                    "--feature",
                    format!("{s:?}: expected name or name@major (e.g. popularity_score@2)"),
                )
            })?;
            Ok((name.to_owned(), Some(major)))
        }
        _ => Err(usage("--feature", format!("{s:?} is not a feature name"))),
    }
}

/// The points `[from, to)` every `step`.
fn points(from_ms: i64, to_ms: i64, step_ms: i64) -> Result<Vec<i64>, FeatureJobError> {
    if from_ms >= to_ms {
        return Err(usage("--from", "must be before --to"));
    }
    if step_ms <= 0 {
        return Err(usage("--step", "must be longer than zero"));
    }
    let n = usize::try_from((to_ms - from_ms - 1) / step_ms + 1).unwrap_or(usize::MAX);
    if n > MAX_BACKFILL_POINTS {
        return Err(usage(
            "--step",
            format!(
                "{n} points between --from and --to; at most {MAX_BACKFILL_POINTS}: use a longer step or a shorter range"
            ),
        ));
    }
    Ok((0..n as i64).map(|i| from_ms + i * step_ms).collect())
}

/// Runs `backfill`.
pub async fn backfill(args: &BackfillArgs) -> Result<JobReport, FeatureJobError> {
    let started = Instant::now();
    let stores = Stores::open(&args.store).await?;
    let mut targets = vec![];
    for f in &args.features {
        let (name, major) = parse_feature_arg(f)?;
        targets.extend(stores.versions_to_compute(&name, major).await?);
    }
    if let Some(source_major) = args.copy_from {
        return copy_versions(&stores, targets, source_major, args, started).await;
    }
    let (from, to) = match (&args.from, &args.to) {
        (Some(f), Some(t)) => (parse_time("--from", f)?, parse_time("--to", t)?),
        _ => return Err(usage("--from", "--from and --to are required")),
    };
    let step = parse_duration_ms(&args.step).map_err(|e| usage("--step", e))?;
    let points = points(
        from.timestamp_millis(),
        to.timestamp_millis(),
        i64::try_from(step).unwrap_or(i64::MAX),
    )?;
    let plans = targets
        .into_iter()
        .map(|f| plan(f, None, points[0]))
        .collect::<Result<Vec<_>, _>>()?;
    let data = read_events(
        &args.store,
        &stores,
        &plans
            .iter()
            .map(|p| (p.computation, p.params))
            .collect::<Vec<_>>(),
        &points,
    )
    .await?;
    let mut versions = vec![];
    for p in &plans {
        let mut rows = vec![];
        let mut per_point = vec![];
        for &t in &points {
            let params = Params {
                at_ms: t,
                ..p.params
            };
            let values = compute::compute(p.computation, data.inputs(t), &params);
            per_point.push((t, values.len() as u64));
            rows.extend(rows_at(&values, t));
        }
        let feature = p.feature.feature_ref();
        let mut report = VersionReport::new(&p.feature, &p.params, points.len(), rows.len() as u64);
        if p.feature.spec.offline {
            let s = stores
                .offline
                .replace_range(
                    &feature,
                    p.computation.entity(),
                    from.timestamp_millis(),
                    to.timestamp_millis(),
                    &rows,
                )
                .await?;
            report.offline_deleted = s.deleted;
            report.offline_written = s.written;
        } else {
            warn!(feature = %feature, "not kept offline: a backfill has nowhere to write it");
        }
        for (t, n) in per_point {
            stores
                .registry
                .record_materialization(&feature, t, n)
                .await?;
        }
        info!(feature = %feature, points = points.len(), rows = rows.len(), "backfilled");
        versions.push(report);
    }
    let report = JobReport {
        job: "backfill".into(),
        at: format!(
            "{}/{}",
            from.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            to.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ),
        events: data.events.len(),
        versions,
        seconds: started.elapsed().as_secs_f64(),
        input_checks: None,
    };
    emit(&report, args.report.as_ref())?;
    Ok(report)
}

async fn copy_versions(
    stores: &Stores,
    targets: Vec<RegisteredFeature>,
    source_major: u64,
    args: &BackfillArgs,
    started: Instant,
) -> Result<JobReport, FeatureJobError> {
    let mut versions = vec![];
    for target in targets {
        let name = &target.spec.name;
        if target.major == source_major {
            return Err(usage(
                "--copy-from",
                format!(
                    "{name}@{source_major} cannot be copied into itself; name the new major version, e.g. --feature {name}@{}",
                    source_major + 1
                ),
            ));
        }
        let source = stores
            .registry
            .get(name, &VersionSelector::Major(source_major))
            .await?
            .ok_or_else(|| {
                FeatureJobError::Definition(format!(
                    "{name} has no usable major version {source_major} to copy from"
                ))
            })?;
        if source.spec.value_type != target.spec.value_type
            || source.spec.entity != target.spec.entity
            || source.spec.dimension != target.spec.dimension
        {
            return Err(FeatureJobError::Definition(format!(
                "{name} {} ({} {}) and {} ({} {}) differ in entity or value type: recompute with --from/--to instead of copying",
                source.spec.version,
                source.spec.entity,
                source.spec.value_type.as_str(),
                target.spec.version,
                target.spec.entity,
                target.spec.value_type.as_str()
            )));
        }
        let copied = stores
            .offline
            .copy_version(&source.feature_ref(), &target.feature_ref())
            .await?;
        info!(from = %source.feature_ref(), to = %target.feature_ref(), rows = copied, "copied");
        let mut report = VersionReport::new(
            &target,
            &Params {
                at_ms: 0,
                window_ms: 0,
                half_life_ms: 0,
            },
            0,
            copied,
        );
        report.offline_written = copied;
        versions.push(report);
    }
    let report = JobReport {
        job: "backfill".into(),
        at: format!("copy from major {source_major}"),
        events: 0,
        versions,
        seconds: started.elapsed().as_secs_f64(),
        input_checks: None,
    };
    emit(&report, args.report.as_ref())?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_arguments_parse() {
        assert_eq!(
            parse_feature_arg("popularity_score").expect("plain"),
            ("popularity_score".into(), None)
        );
        assert_eq!(
            parse_feature_arg("popularity_score@2").expect("major"),
            ("popularity_score".into(), Some(2))
        );
        assert_eq!(parse_feature_arg("f@v3").expect("v-prefixed").1, Some(3));
        for bad in ["", "@2", "f@", "f@x"] {
            let err = parse_feature_arg(bad).expect_err(bad).to_string();
            assert!(err.contains("--feature"), "{bad}: {err}");
        }
    }

    #[test]
    fn backfill_points_cover_the_range_and_stay_bounded() {
        const DAY: i64 = 86_400_000;
        assert_eq!(points(0, 3 * DAY, DAY).expect("points"), [0, DAY, 2 * DAY]);
        assert_eq!(points(0, 3 * DAY + 1, DAY).expect("points").len(), 4);
        assert_eq!(points(5, 6, DAY).expect("one").len(), 1);
        assert!(points(DAY, DAY, DAY).is_err(), "empty range");
        assert!(points(0, DAY, 0).is_err(), "zero step");
        let err = points(0, 365 * DAY * 100, 1000)
            .expect_err("too many")
            .to_string();
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    fn errors_say_whether_a_retry_helps() {
        assert!(!usage("--at", "bad").retryable());
        assert!(!FeatureJobError::Definition("x".into()).retryable());
        assert_eq!(usage("--at", "bad").kind(), "Usage");
    }

    #[derive(clap::Parser, Debug)]
    struct Materialize {
        #[command(flatten)]
        args: MaterializeArgs,
    }

    fn parse(args: &[&str]) -> Result<MaterializeArgs, clap::Error> {
        use clap::Parser;
        Materialize::try_parse_from(std::iter::once("popularity").chain(args.iter().copied()))
            .map(|m| m.args)
    }

    #[test]
    fn rankings_options_sit_beside_the_feature_store_options() {
        use clap::CommandFactory;
        Materialize::command().debug_assert();
        let a = parse(&[
            "--database-url=postgres://db/recsys",
            "--store=s3://bucket/prefix",
            "--s3-endpoint=http://s3:8333",
            "--rankings-top-n=50",
        ])
        .expect("parse");
        assert_eq!(
            a.store.database_url.as_deref(),
            Some("postgres://db/recsys")
        );
        assert_eq!(a.artifacts.store, "s3://bucket/prefix");
        assert_eq!(a.artifacts.s3.endpoint.as_deref(), Some("http://s3:8333"));
        assert_eq!(a.rankings_top_n, 50);
        let d = parse(&[]).expect("defaults");
        assert_eq!(d.rankings_top_n, DEFAULT_TOP_N);
        for bad in [
            "--rankings-top-n=0",
            "--rankings-top-n=-3",
            "--rankings-top-n=x",
        ] {
            let err = parse(&[bad]).expect_err(bad).to_string();
            assert!(err.contains("--rankings-top-n"), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn a_bad_store_is_refused_without_a_retry() {
        let a = parse(&["--store=s3://"]).expect("parse");
        let err = FeatureJobError::ArtifactStore(
            cf::open_store(&a.artifacts).await.expect_err("no bucket"),
        );
        assert!(!err.retryable());
        assert_eq!(err.kind(), "Usage");
        assert!(err.to_string().contains("--store"), "{err}");
    }
}
