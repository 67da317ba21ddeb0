//! `BatchJob`: a trainer job run on a cron schedule or on demand, with bounded retries.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Duration;

/// A batch job of the trainer, run as a CronJob (with `schedule`) or a Job on demand.
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
    printcolumn(name = "Last Run", type_ = "date", json_path = ".status.lastScheduleTime"),
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
    /// macro such as `@daily`. Without it the job runs only on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = kube::core::Rule::new(r"self.matches('^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|[0-9A-Za-z*/,?-]+( +[0-9A-Za-z*/,?-]+){4})$')").message("schedule must be a five-field cron expression (minute hour day-of-month month day-of-week) or one of @yearly, @monthly, @weekly, @daily, @hourly"))]
    pub schedule: Option<String>,

    /// IANA time zone the schedule is read in, for example `Europe/Berlin`; UTC by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub time_zone: Option<String>,

    /// Suspends scheduling; a run already started goes on.
    #[serde(default)]
    pub suspend: bool,

    /// Retries of a failed run.
    #[serde(default)]
    pub retry: RetryPolicy,

    /// What to do when a run is due while the previous one is still running.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,

    /// Names of BatchJobs in this namespace that must have succeeded since this job's last run
    /// before it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        inner(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))
    )]
    pub after: Vec<String>,

    /// Upper bound on a run's time, all attempts included; the run fails when it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline: Option<Duration>,

    /// Number of finished runs kept in `status.history` (and Jobs kept in the cluster).
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

    /// Compute resources of the trainer container.
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
    /// A ModelDeployment in this namespace that receives each published candidate, which then
    /// starts its rollout (shadow first).
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
    /// Accepted (the spec is valid) and Ready (the job is scheduled, or ready to run on demand).
    #[serde(default)]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// When a run last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// When a run last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<Time>,
    /// Attempts of the current or last run.
    #[serde(default)]
    pub attempts: i32,
    /// Finished runs, newest first, at most `spec.historyLimit`.
    #[serde(default)]
    #[schemars(length(max = 20))]
    pub history: Vec<JobRun>,
}

/// One run of a job.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobRun {
    /// Name of the Kubernetes Job that ran it.
    pub job_name: String,
    /// When it started.
    pub started_at: Time,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// `Succeeded` or `Failed`.
    pub outcome: String,
    /// Attempts it took.
    pub attempts: i32,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}
