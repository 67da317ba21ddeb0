//! `BatchJob`: a trainer job run on a cron schedule or on demand, with bounded retries.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Duration;

/// A batch job of the trainer, run as a Job on its schedule, on request, or after the BatchJobs it
/// depends on.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "recsys.io",
    version = "v1alpha1",
    kind = "BatchJob",
    plural = "batchjobs",
    singular = "batchjob",
    shortname = "bjob",
    category = "recsys",
    namespaced,
    status = "BatchJobStatus",
    doc = "A trainer batch job run on a schedule or on demand, with retries and history.",
    validation = kube::core::Rule::new("!has(self.spec.after) || !self.spec.after.exists(a, a == self.metadata.name)").message("spec.after must not name the BatchJob itself"),
    printcolumn(name = "Job", type_ = "string", json_path = ".spec.job"),
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Suspend", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(name = "Last Run", type_ = "date", json_path = ".status.history[0].finishedAt"),
    printcolumn(name = "Outcome", type_ = "string", json_path = ".status.history[0].outcome"),
    printcolumn(name = "Next Run", type_ = "string", json_path = ".status.nextScheduleTime"),
    printcolumn(name = "Last Success", type_ = "date", json_path = ".status.lastSuccessfulTime"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("self.job != 'backfill' || has(self.backfill)").message("job backfill needs spec.backfill (features, from, to)"),
    validation = kube::core::Rule::new("!has(self.backfill) || self.job == 'backfill'").message("spec.backfill is only valid for job backfill"),
    validation = kube::core::Rule::new("!has(self.cfTrain) || self.job == 'cf-train'").message("spec.cfTrain is only valid for job cf-train")
)]
pub struct BatchJobSpec {
    /// Which trainer job to run.
    pub job: JobKind,

    /// Cron schedule in the five-field form `minute hour day-of-month month day-of-week`, or a
    /// macro such as `@daily`; the operator starts a Job when it is due. Without it the job
    /// runs on demand (the annotation `recsys.io/run`) or after its upstreams (`after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = kube::core::Rule::new(r"self.matches('^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|[0-9A-Za-z*/,?-]+( +[0-9A-Za-z*/,?-]+){4})$')").message("schedule must be a five-field cron expression (minute hour day-of-month month day-of-week) or one of @yearly, @monthly, @weekly, @daily, @hourly"))]
    pub schedule: Option<String>,

    /// IANA time zone the schedule is read in, for example `Europe/Berlin`; UTC by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub time_zone: Option<String>,

    /// Suspends scheduled and upstream-triggered runs; a run already started goes on, and
    /// `recsys.io/run` still starts one.
    #[serde(default)]
    pub suspend: bool,

    /// Retries of a failed run.
    #[serde(default)]
    pub retry: RetryPolicy,

    /// What to do when a run is due while the previous one is still running.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,

    /// BatchJobs in this namespace whose output this job reads. With a schedule, a due run
    /// starts only if every one of them has succeeded since this job's last run; otherwise it
    /// is held (counted in `status.heldRuns`, with the upstream named in the UpstreamReady
    /// condition). Without a schedule, the job runs each time all of them have succeeded since
    /// its last run. Each run records the upstream runs it consumed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        inner(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))
    )]
    pub after: Vec<String>,

    /// Upper bound on a run's time, all attempts included; the run fails when it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline: Option<Duration>,

    /// Number of finished runs kept in `status.history`, and of finished Jobs kept in the
    /// cluster (older ones are deleted with their Pods).
    #[serde(default = "default_history_limit")]
    #[schemars(range(min = 1, max = 20))]
    pub history_limit: i32,

    /// Job-specific options passed to the trainer as `--<key>=<value>`, for example
    /// `window: 90d` for `popularity`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub parameters: BTreeMap<String, String>,

    /// Options of the `backfill` job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<BackfillSpec>,

    /// Options of the `cf-train` job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cf_train: Option<CfTrainSpec>,

    /// Container image of the trainer; defaults to the operator's configured trainer image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,

    /// Labels added to the Pods of every run (cost allocation, policy selectors); the
    /// operator's own labels take precedence.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub pod_labels: BTreeMap<String, String>,

    /// Annotations added to the Pods of every run (for example a sidecar injector's opt-out).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub pod_annotations: BTreeMap<String, String>,

    /// Compute resources of the trainer container; by default, per job: 250m CPU and 256Mi
    /// requested (1Gi limit) for the feature jobs and data-quality, 500m and 512Mi (2Gi) for
    /// backfill, 1 CPU and 1Gi (4Gi) for cf-train and index-rebuild.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn default_history_limit() -> i32 {
    10
}

/// The trainer's jobs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// `popularity_score` per product over a rolling window with time decay.
    Popularity,
    /// `freshness_score` per product from first-seen and last-updated times.
    Freshness,
    /// `user_category_affinity`: time-decayed share of a user's interactions per category.
    CategoryAffinity,
    /// Rebuilds the approximate-nearest-neighbour index over product embeddings.
    IndexRebuild,
    /// Trains a collaborative-filtering model and registers it as a candidate.
    CfTrain,
    /// Recomputes features over a date range.
    Backfill,
    /// Checks events and features: schema, freshness, completeness, volume, drift.
    DataQuality,
}

impl JobKind {
    /// Every job, in declaration order.
    pub const ALL: [JobKind; 7] = [
        Self::Popularity,
        Self::Freshness,
        Self::CategoryAffinity,
        Self::IndexRebuild,
        Self::CfTrain,
        Self::Backfill,
        Self::DataQuality,
    ];

    /// The trainer subcommand, which is also the wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Popularity => "popularity",
            Self::Freshness => "freshness",
            Self::CategoryAffinity => "category-affinity",
            Self::IndexRebuild => "index-rebuild",
            Self::CfTrain => "cf-train",
            Self::Backfill => "backfill",
            Self::DataQuality => "data-quality",
        }
    }
}

/// How failed runs are retried. Attempts back off exponentially (10 s, 20 s, 40 s, … capped
/// at 6 minutes, the Kubernetes Job controller's schedule).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts per run, the first included (1–10). A failure the trainer reports as not
    /// retryable (exit code 2) stops the run at once.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: i32,
}

fn default_max_attempts() -> i32 {
    3
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
        }
    }
}

/// Whether runs may overlap.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum ConcurrencyPolicy {
    /// Runs may overlap.
    Allow,
    /// A due run is skipped while the previous one runs.
    #[default]
    Forbid,
    /// A due run replaces the one still running.
    Replace,
}

/// The range and features of a backfill.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.from < self.to").message("backfill.from must be before backfill.to"))]
pub struct BackfillSpec {
    /// Names of the features to recompute (FeatureDefinition `spec.name`).
    #[schemars(
        length(min = 1, max = 64),
        inner(regex(pattern = r"^[a-z][a-z0-9_]*$"))
    )]
    pub features: Vec<String>,
    /// Start of the range (inclusive), RFC 3339.
    pub from: Time,
    /// End of the range (exclusive), RFC 3339.
    pub to: Time,
}

/// Options of collaborative-filtering training.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CfTrainSpec {
    /// Model name in the registry.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub model: String,
    /// A ModelDeployment in this namespace that receives each registered version: when its
    /// offline NDCG reaches `strategy.analysis.minOfflineMetricRatio` of the ModelDeployment's
    /// stable version's (or there is no stable version or threshold yet), the operator sets the
    /// ModelDeployment's `spec.version` to it, which starts the rollout. A version below the
    /// threshold stays registered; the run's `handOff` says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub hand_off_to: Option<String>,
}

/// Observed state of a BatchJob.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BatchJobStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Accepted (the spec is valid), Ready (the job is scheduled, or ready to run on demand)
    /// and, with `spec.after`, UpstreamReady (every upstream succeeded since this job's last
    /// run, or which one it waits for).
    #[serde(default)]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The scheduled time most recently due: run, held or missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// When the schedule is next due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    /// When a run last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<Time>,
    /// Attempts of the current or last run.
    #[serde(default)]
    pub attempts: i32,
    /// Scheduled runs not started because an upstream (`spec.after`) had not succeeded since
    /// this job's last run, in total.
    #[serde(default)]
    pub held_runs: i32,
    /// Scheduled runs not started because the operator saw them too late (more than five
    /// minutes after they were due), in total.
    #[serde(default)]
    pub missed_runs: i32,
    /// The value of the `recsys.io/run` annotation last acted on: each new value is one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_request: Option<String>,
    /// Runs in progress (their Job names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub active: Vec<String>,
    /// Finished runs, newest first, at most `spec.historyLimit`.
    #[serde(default)]
    #[schemars(length(max = 20))]
    pub history: Vec<JobRun>,
}

/// One finished run of a job.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobRun {
    /// Name of the Kubernetes Job that ran it.
    pub job_name: String,
    /// What started it.
    #[serde(default)]
    pub trigger: RunTrigger,
    /// When it started.
    pub started_at: Time,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// How it ended.
    pub outcome: RunOutcome,
    /// Attempts it took.
    pub attempts: i32,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Wall time of the trainer's work, in seconds, from its report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<i64>,
    /// Events read, from the trainer's report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<i64>,
    /// Rows or values written (feature values, interactions learned from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<i64>,
    /// The model version a `cf-train` run registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The upstream runs (`spec.after`) whose output this run read: its lineage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub consumed: Vec<ConsumedRun>,
    /// What became of the registered version (`spec.cfTrain.handOffTo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hand_off: Option<HandOff>,
    /// What the run's data-quality checks found: the `data-quality` job's, and the checks
    /// `cf-train` and the feature jobs run on their input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_quality: Option<DataQualityRun>,
}

/// The data-quality checks of one run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataQualityRun {
    /// The run's id in the `data_quality_results` table (one row per check).
    pub run_id: String,
    /// Whether every blocking check passed.
    pub passed: bool,
    /// The checks that failed (blocking) or warned, at most 16.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub violations: Vec<CheckViolation>,
}

/// A data-quality check that failed or warned.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CheckViolation {
    /// The check, for example `freshness` or `volume.purchase`.
    pub check: String,
    /// Its family: `schema`, `freshness`, `completeness`, `validity`, `volume` or `drift`.
    pub check_type: String,
    /// What it checked: `events`, an events file, or `feature:<name>@v<major>`.
    pub target: String,
    /// Whether it held the gate (a warning does not).
    pub blocking: bool,
}

/// How a run ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunOutcome {
    /// Every step succeeded.
    Succeeded,
    /// The run failed: attempts used up, a failure retrying cannot fix, or the deadline passed.
    Failed,
}

impl RunOutcome {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }
}

/// What started a run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum RunTrigger {
    /// `spec.schedule` was due (and every upstream had succeeded).
    #[default]
    Schedule,
    /// The annotation `recsys.io/run` got a new value.
    Manual,
    /// Every upstream succeeded since the last run (`spec.after` without a schedule).
    Upstream,
}

impl RunTrigger {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Schedule => "Schedule",
            Self::Manual => "Manual",
            Self::Upstream => "Upstream",
        }
    }
}

/// An upstream run a run consumed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct ConsumedRun {
    /// The upstream BatchJob.
    pub batch_job: String,
    /// The Job of its run.
    pub job_name: String,
}

/// The hand-off of a registered version to a ModelDeployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HandOff {
    /// The ModelDeployment.
    pub model_deployment: String,
    /// What happened.
    pub outcome: HandOffOutcome,
    /// Why, with the figures compared.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// What became of a registered version.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum HandOffOutcome {
    /// `spec.version` of the ModelDeployment was set to it: its rollout starts.
    HandedOff,
    /// Registered, not handed off: its offline metrics fell short of the stable version's.
    BelowThreshold,
    /// Not handed off: the ModelDeployment is missing, or the comparison could not be made.
    NotHandedOff,
}

impl HandOffOutcome {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HandedOff => "HandedOff",
            Self::BelowThreshold => "BelowThreshold",
            Self::NotHandedOff => "NotHandedOff",
        }
    }
}
