//! `ModelDeployment`: one model version rolled out shadow → canary → full, with analysis
//! gates and instant rollback to the warm stable version.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Duration;

/// A model version to roll out to the scorer, and how.
///
/// The operator owns the scorer Deployment, Service, PodDisruptionBudget and routing table of
/// this model. It moves through `strategy.steps` in order, checks `strategy.analysis` at every
/// step, promotes the candidate to stable at the end, or rolls back at once to the stable version
/// (which stays loaded in every scorer pod) when an analysis fails.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "recsys.io",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    singular = "modeldeployment",
    shortname = "mdep",
    category = "recsys",
    namespaced,
    status = "ModelDeploymentStatus",
    doc = "A model version rolled out shadow → canary → full with analysis and rollback.",
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model"),
    printcolumn(name = "Stable", type_ = "string", json_path = ".status.stableVersion"),
    printcolumn(name = "Candidate", type_ = "string", json_path = ".spec.version"),
    printcolumn(name = "Stage", type_ = "string", json_path = ".status.stage"),
    printcolumn(name = "Weight", type_ = "integer", json_path = ".status.canaryWeight"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.currentStep"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Progressing\")].message"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// Name of the model in the registry (`models/<model>/` in the artifact store), for
    /// example `als`. Lower-case letters, digits and `-`, at most 63 characters.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub model: String,

    /// The version to roll out, as registered by the trainer (`models/<model>/<version>/`).
    /// When it equals the stable version there is nothing to roll out.
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9._]*[A-Za-z0-9])?$"),
        length(min = 1, max = 128)
    )]
    pub version: String,

    /// Where the model artifacts and registry live.
    pub artifacts: ArtifactStore,

    /// The scorer pods that serve this model.
    #[serde(default)]
    pub scorer: ScorerSpec,

    /// How the candidate is rolled out.
    pub strategy: RolloutStrategy,

    /// Salt of the hash that assigns each user to a variant. A user keeps their variant as long
    /// as the salt is unchanged; changing it reshuffles every user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub routing_salt: Option<String>,

    /// Stops the rollout where it is: weights stay, no step advances. Rollback still happens
    /// when an analysis fails.
    #[serde(default)]
    pub paused: bool,
}

/// Where the artifacts of a model live.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactStore {
    /// `s3://bucket/prefix` for an S3-compatible object store, or `file:///path` for a local
    /// directory (single-node installs).
    #[x_kube(validation = kube::core::Rule::new("self.matches('^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$') || self.startsWith('file:///')").message("must be s3://<bucket>[/prefix] or file:///<path>"))]
    #[schemars(length(min = 8, max = 1024))]
    pub uri: String,

    /// Endpoint of a non-AWS S3 server, for example `http://seaweedfs.storage:8333`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub endpoint: Option<String>,

    /// Region of the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub region: Option<String>,

    /// Use path-style addressing (`endpoint/bucket/key`), which most non-AWS servers need.
    #[serde(default)]
    pub force_path_style: bool,

    /// Name of a Secret in this namespace with `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`. Without it the pods use their ambient credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub credentials_secret: Option<String>,
}

/// The scorer pods of a model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScorerSpec {
    /// Number of scorer pods.
    #[schemars(range(min = 0, max = 1000))]
    #[serde(default = "default_replicas")]
    pub replicas: i32,

    /// Container image of the scorer; defaults to the operator's configured scorer image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,

    /// Compute resources of the scorer container. Default: requests 100m CPU and 256Mi,
    /// limit 1Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Scale the scorer pods on CPU with a HorizontalPodAutoscaler; `replicas` is then only
    /// the starting point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<ScorerAutoscaling>,

    /// Who may call the scorer. Without it, the operator's default tokens Secret applies
    /// (the chart's `scorer.auth.tokensSecret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<ScorerAuth>,
}

/// Authentication of the scorer's API (docs/http-api.md#authentication).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScorerAuth {
    /// Secret in this namespace with one key per client: the key is the client's name, the
    /// value its bearer token (at least 16 bytes). A key ending in `.read` is a read-only
    /// client. Writes (`POST /v1/events`) need a token. Change the Secret to rotate: the
    /// scorer picks it up without a restart. A missing Secret refuses every write.
    #[schemars(length(min = 1, max = 253))]
    pub tokens_secret: String,
    /// Whether reads need a token too.
    #[serde(default)]
    pub protect_reads: bool,
    /// Events each client may post per second, sustained (default 5,000; 0 turns the limit
    /// off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10_000_000))]
    pub ingest_rate_per_client: Option<u32>,
}

/// Autoscaling of the scorer pods on CPU.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas"))]
pub struct ScorerAutoscaling {
    /// Fewest scorer pods.
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most scorer pods.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU use, in percent of the requested CPU, that the autoscaler aims at.
    #[serde(default = "default_target_cpu")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: i32,
}

fn default_target_cpu() -> i32 {
    70
}

fn default_replicas() -> i32 {
    2
}

impl Default for ScorerSpec {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            image: None,
            resources: None,
            autoscaling: None,
            auth: None,
        }
    }
}

/// Steps of the rollout and the analysis that gates them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// Steps run in order. Shadow steps come first, then canary steps with strictly increasing
    /// weights (pauses may sit anywhere), and `full`, if present, is the last step.
    #[schemars(length(min = 1, max = 20))]
    #[x_kube(
        validation = kube::core::Rule::new("self.all(s, [has(s.shadow), has(s.canary), has(s.pause), has(s.full)].filter(x, x).size() == 1)").message("each step sets exactly one of shadow, canary, pause, full"),
        validation = kube::core::Rule::new("self.filter(s, !has(s.pause)).map(s, has(s.shadow) ? 0 : (has(s.canary) ? 1 : 2)).isSorted()").message("steps out of order: shadow steps come before canary steps, and full comes last"),
        validation = kube::core::Rule::new("self.filter(s, has(s.canary)).map(s, s.canary.weight).isSorted() && self.all(a, !has(a.canary) || self.filter(b, has(b.canary) && b.canary.weight == a.canary.weight).size() == 1)").message("canary weights must strictly increase from step to step"),
        validation = kube::core::Rule::new("!self.exists(s, has(s.full)) || (has(self[self.size() - 1].full) && self.filter(s, has(s.full)).size() == 1)").message("full may appear once, as the last step")
    )]
    pub steps: Vec<RolloutStep>,

    /// Thresholds checked while the candidate takes traffic. A failed check rolls back.
    #[serde(default)]
    pub analysis: AnalysisSpec,
}

/// One step of a rollout: exactly one of its fields is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStep {
    /// Score every request with the candidate too, off the request path, and compare it with
    /// stable; users never see shadow results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStep>,
    /// Send a share of users to the candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStep>,
    /// Hold the current weights: for a duration, or until approved when no duration is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseStep>,
    /// Promote the candidate to stable for every user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<FullStep>,
}

/// Shadow the candidate for a while.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShadowStep {
    /// How long to shadow before the next step.
    pub duration: Duration,
}

/// Route a share of users to the candidate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStep {
    /// Percentage of users (0–100) routed to the candidate.
    #[schemars(range(min = 0, max = 100))]
    pub weight: i32,
    /// How long to hold this weight, with analysis running, before the next step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
}

/// Hold the rollout.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PauseStep {
    /// How long to hold. Without it the rollout waits for manual approval: the annotation
    /// `recsys.io/approve` set to the step's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
}

/// Promote to every user.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct FullStep {}

/// Analysis thresholds; every unset threshold is not checked.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisSpec {
    /// How often the analysis runs while the candidate takes traffic.
    #[serde(default = "default_interval")]
    pub interval: Duration,
    /// Consecutive failed analyses tolerated before rolling back.
    #[serde(default = "default_failure_limit")]
    #[schemars(range(min = 1, max = 10))]
    pub failure_limit: i32,
    /// Highest share (0–1) of candidate requests that may fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: Option<f64>,
    /// Highest p99 latency of candidate requests, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 60000.0))]
    pub max_p99_latency_ms: Option<f64>,
    /// Highest population stability index between candidate and stable score distributions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub max_score_drift_psi: Option<f64>,
    /// Lowest mean top-k overlap (0–1) between candidate and stable lists for the same users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_top_k_overlap: Option<f64>,
    /// Lowest ratio of the candidate's offline NDCG@10 to the champion's (e.g. 0.98).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub min_offline_metric_ratio: Option<f64>,
    /// Fewest observations (requests, scores, comparisons) on each side of a check in one
    /// interval for its figure to count; with fewer the check is inconclusive and holds.
    #[serde(default = "default_min_samples")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_samples: i64,
    /// Where the figures come from: unset, the scorer pods' own `/metrics`, read through the
    /// Service's endpoints; set, a Prometheus server that scrapes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSource>,
}

/// A Prometheus server as the analysis source: each run queries the scorers' series over the
/// run's window (`increase(…[window])`), the way Flagger and Argo Rollouts do.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSource {
    /// The server's URL, for example `http://prometheus-operated.monitoring.svc:9090`.
    #[schemars(length(min = 1, max = 2048))]
    pub address: String,
    /// Label matchers that select this deployment's scorer series, without braces, for
    /// example `namespace="shop",service="als-scorer"` (the default: `job="<name>-scorer"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub selector: Option<String>,
}

fn default_min_samples() -> i64 {
    20
}

fn default_interval() -> Duration {
    Duration::from("1m")
}

fn default_failure_limit() -> i32 {
    1
}

impl Default for AnalysisSpec {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            failure_limit: default_failure_limit(),
            max_error_rate: None,
            max_p99_latency_ms: None,
            max_score_drift_psi: None,
            min_top_k_overlap: None,
            min_offline_metric_ratio: None,
            min_samples: default_min_samples(),
            prometheus: None,
        }
    }
}

/// Where a rollout stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum Stage {
    /// Not started yet.
    #[default]
    Pending,
    /// The candidate is shadowed.
    Shadow,
    /// The candidate takes a share of users.
    Canary,
    /// Held at a pause step.
    Paused,
    /// The candidate is stable for every user.
    Promoted,
    /// An analysis failed and stable serves every user again.
    RolledBack,
    /// Stopped by hand (`recsys.io/abort`): stable serves every user again; the candidate stays
    /// registered and `recsys.io/retry` rolls it out again.
    Aborted,
}

/// Observed state of a ModelDeployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Accepted (the spec is valid), Ready (the scorer serves the stable version), Progressing
    /// (a rollout is under way) and Degraded (an analysis failed).
    #[serde(default)]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Where the rollout stands.
    #[serde(default)]
    pub stage: Stage,
    /// The version every user not routed elsewhere gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_version: Option<String>,
    /// The candidate version while it takes traffic or is shadowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_version: Option<String>,
    /// Percentage of users routed to the candidate.
    #[serde(default)]
    pub canary_weight: i32,
    /// Index of the current step in `spec.strategy.steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<i32>,
    /// When the current step started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<Time>,
    /// In-cluster URL of the scorer Service (`http://<name>-scorer.<namespace>.svc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_url: Option<String>,
    /// The scorer pods as the operator last saw them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scorers: Option<ScorersStatus>,
    /// The last manual action handled, as `<annotation>=<value>`: an action annotation is acted
    /// on once, then removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<String>,
    /// The live analysis of the current (or last) rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisStatus>,
    /// The A/B readout of the current (or last) rollout: impressions, click-through and
    /// conversion of canary against stable, read from the scorers (`GET /v1/experiments`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<ExperimentStatus>,
    /// Past rollouts, newest first, at most 20.
    #[serde(default)]
    #[schemars(length(max = 20))]
    pub history: Vec<RolloutRecord>,
    /// Rollout transitions not yet recorded in the model's artifact registry (its store could
    /// not be written), oldest first, at most 20; retried at every reconciliation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub unrecorded_transitions: Vec<Transition>,
}

/// One transition of a rollout, as recorded in the model's artifact registry.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    /// When it happened.
    pub at: Time,
    /// The version that moved.
    pub version: String,
    /// Where it moved: `shadow`, `canary`, `paused`, `promoted`, `rolled_back`, `aborted`.
    pub transition: String,
    /// The stable version after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<String>,
    /// Percentage of users on the candidate after it.
    pub weight: i32,
    /// The step, while a rollout is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i32>,
    /// Who or what moved it: `recsys-operator`, or the manual action and who asked.
    pub by: String,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// The last analysis run at the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisRun>,
}

/// The live analysis of a rollout: one run every `spec.strategy.analysis.interval` while the
/// candidate is shadowed or takes users.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisStatus {
    /// Failed runs in a row; a successful run resets it, an inconclusive one leaves it. At
    /// `failureLimit` the candidate is rolled back.
    #[serde(default)]
    pub consecutive_failures: i32,
    /// The latest runs, newest first, at most 10.
    #[serde(default)]
    #[schemars(length(max = 10))]
    pub runs: Vec<AnalysisRun>,
}

/// One analysis over one interval of the scorers' counters.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisRun {
    /// When the window ended.
    pub at: Time,
    /// Length of the window, seconds.
    pub window_seconds: i64,
    /// The step analysed.
    pub step: i32,
    /// How the candidate met users: `Shadow` or `Canary`.
    pub exposure: Exposure,
    /// Percentage of users on the candidate.
    pub weight: i32,
    /// Scorer pods read at both ends of the window (with Prometheus: scorer instances with
    /// series in the window).
    pub pods: i32,
    /// Where the figures came from: `Pods` (their `/metrics`) or `Prometheus`.
    #[serde(default)]
    pub source: AnalysisSource,
    /// The run's verdict: `Failed` if any check failed, else `Inconclusive` if any was.
    pub verdict: Verdict,
    /// Each check with its figure.
    #[serde(default)]
    pub checks: Vec<AnalysisCheck>,
}

/// Where an analysis run's figures came from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum AnalysisSource {
    /// The scorer pods' own `/metrics`, through the Service's endpoints.
    #[default]
    Pods,
    /// A Prometheus server (`spec.strategy.analysis.prometheus`).
    Prometheus,
}

/// How the candidate meets users while analysed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Exposure {
    /// Scored off the request path against stable on the same requests.
    Shadow,
    /// Serving a share of users.
    Canary,
}

/// The verdict of an analysis or one of its checks.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, strum::IntoStaticStr,
)]
pub enum Verdict {
    /// Within the threshold.
    Successful,
    /// Past the threshold.
    Failed,
    /// Too few observations to tell; holds the rollout, never passes it.
    Inconclusive,
}

/// A check of the live analysis.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, strum::IntoStaticStr,
)]
pub enum CheckKind {
    /// Share of canary requests that failed (`maxErrorRate`).
    ErrorRate,
    /// p99 latency of canary requests in ms (`maxP99LatencyMs`).
    P99Latency,
    /// PSI of the candidate's scores against stable's (`maxScoreDriftPsi`).
    ScoreDrift,
    /// Mean top-k overlap of the shadow with stable (`minTopKOverlap`).
    TopKOverlap,
}

impl CheckKind {
    /// The name in status, messages and metric labels.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl Verdict {
    /// The name in status and metric labels.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// One check of an analysis run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisCheck {
    /// Which check.
    pub check: CheckKind,
    /// The figure, when there were enough observations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<f64>,
    /// The threshold it is held to.
    pub threshold: f64,
    /// The check's verdict.
    pub verdict: Verdict,
    /// The figure, threshold and sample sizes in words.
    #[serde(default)]
    pub message: String,
}

/// The A/B readout of a rollout: one segment per canary weight the candidate took users at.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentStatus {
    /// When the scorers were read.
    pub read_at: Time,
    /// The candidate compared with stable.
    pub candidate_version: String,
    /// How long after a served list a click, cart or purchase is attributed to it.
    pub attribution_window_seconds: i64,
    /// Newest first, at most 10.
    #[serde(default)]
    #[schemars(length(max = 10))]
    pub segments: Vec<ExperimentSegment>,
}

/// The readout of one canary weight.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentSegment {
    /// Percentage of users routed to the candidate.
    pub canary_weight: i32,
    /// The first impression.
    pub since: Time,
    /// Stable, then canary.
    #[serde(default)]
    pub variants: Vec<ExperimentVariant>,
    /// Click-through rate of canary against stable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctr: Option<ExperimentComparison>,
    /// Conversion (impressions followed by a purchase) of canary against stable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversion: Option<ExperimentComparison>,
    /// The split of users against the canary weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_ratio: Option<ExperimentSampleRatio>,
    /// The readout in one sentence.
    #[serde(default)]
    pub summary: String,
}

/// One variant's figures in a segment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentVariant {
    /// `stable` or `canary`.
    pub variant: String,
    /// The version it served.
    pub version: String,
    /// Distinct users served.
    pub users: i64,
    /// Lists served.
    pub impressions: i64,
    /// Impressions followed by a click.
    pub clicks: i64,
    /// Impressions followed by an add to cart.
    pub add_to_carts: i64,
    /// Impressions followed by a purchase.
    pub purchases: i64,
    /// `clicks / impressions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctr: Option<f64>,
    /// `purchases / impressions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversion: Option<f64>,
}

/// A rate of canary against stable's: the pooled two-proportion z-test.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentComparison {
    /// Canary's rate ÷ stable's − 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lift: Option<f64>,
    /// The z statistic (positive: canary is higher).
    pub z: f64,
    /// Two-sided p-value.
    pub p_value: f64,
    /// `pValue < 0.05` with at least 100 impressions on each side.
    pub significant: bool,
}

/// The sample-ratio check: distinct users per variant against the canary weight (χ²).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentSampleRatio {
    /// The canary weight as a share.
    pub expected_canary_share: f64,
    /// The canary's share of the users.
    pub observed_canary_share: f64,
    /// χ² goodness of fit.
    pub p_value: f64,
    /// `pValue < 0.001` with at least 100 users: the split is not what routing promised, and
    /// the segment's other figures are suspect.
    pub mismatch: bool,
}

/// The scorer pods behind the Service, as their `/v1/status` reports them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ScorersStatus {
    /// Pods behind the Service (ready or not).
    pub pods: i32,
    /// Ready pods.
    pub ready: i32,
    /// Ready pods with the stable version loaded.
    pub with_stable: i32,
    /// Ready pods with the candidate loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with_candidate: Option<i32>,
}

/// One finished rollout.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRecord {
    /// The version rolled out.
    pub version: String,
    /// How it ended.
    pub outcome: Stage,
    /// Why it ended that way.
    #[serde(default)]
    pub reason: String,
    /// When it ended.
    pub finished_at: Time,
}
