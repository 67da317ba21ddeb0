//! BatchJob controller: validates the schedule and dependencies, owns a CronJob (scheduled
//! jobs) or one Job per run request (on-demand jobs), and reports runs from the Jobs it sees.
//!
//! Retries use the Job controller: `backoffLimit = maxAttempts − 1` with its exponential
//! backoff, and a pod failure policy that fails the run at once when the trainer exits with
//! [`EXIT_NOT_RETRYABLE`].

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;

use k8s_openapi::api::batch::v1::{
    CronJob, CronJobSpec, Job, JobSpec, JobTemplateSpec, PodFailurePolicy,
    PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyOnPodConditionsPattern,
    PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, Container, EnvFromSource, EnvVar, PodSecurityContext,
    PodSpec, PodTemplateSpec, SeccompProfile, SecretEnvSource, SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use recsys_crds::batch_job::{ConcurrencyPolicy, JobRun};
use recsys_crds::common::ConditionStatus;
use recsys_crds::{BatchJob, BatchJobStatus};
use tracing::instrument;

use super::{
    Assessment, Context, Error, FIELD_MANAGER, Problem, find_cycle, stamped, write_status,
};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "batchjob";
/// Label on every Job and Pod of a BatchJob, with the BatchJob's name.
pub const JOB_LABEL: &str = "recsys.io/batchjob";
/// Annotation that requests a run of an on-demand BatchJob; each new value is one run.
pub const RUN_ANNOTATION: &str = "recsys.io/run";
/// Trainer exit code meaning "retrying cannot help" (bad input, invalid configuration).
pub const EXIT_NOT_RETRYABLE: i32 = recsys_core::exit::NOT_RETRYABLE;
/// Name of the trainer container.
pub const CONTAINER: &str = "trainer";

/// Operator settings the children are built with.
#[derive(Clone, Debug)]
pub struct TrainerSettings {
    /// Default trainer image.
    pub image: String,
    /// Service account of trainer pods.
    pub service_account: Option<String>,
    /// ConfigMap whose keys become the trainer's environment (optional to exist).
    pub config_map: Option<String>,
    /// Secret whose keys become the trainer's environment (optional to exist).
    pub secret: Option<String>,
    /// Node selector of trainer pods (for example a node pool for batch work).
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of trainer pods.
    pub tolerations: Vec<Toleration>,
}

/// Checks of the spec alone, beyond the schema and CEL rules.
pub fn validate(bj: &BatchJob) -> Vec<Problem> {
    let spec = &bj.spec;
    let mut problems = vec![];
    if let Some(schedule) = &spec.schedule
        && let Err(e) = croner::Cron::from_str(schedule)
    {
        problems.push(Problem::new(
            "spec.schedule",
            format!("{schedule:?} is not a valid cron schedule: {e}"),
        ));
    }
    if let Some(tz) = &spec.time_zone {
        if spec.schedule.is_none() {
            problems.push(Problem::new(
                "spec.timeZone",
                "only meaningful with spec.schedule",
            ));
        }
        if jiff::tz::TimeZone::get(tz).is_err() {
            problems.push(Problem::new(
                "spec.timeZone",
                format!("{tz:?} is not a known IANA time zone"),
            ));
        }
    }
    if let Some(d) = &spec.active_deadline {
        match d.to_std() {
            Ok(d) if d.as_secs() == 0 => {
                problems.push(Problem::new("spec.activeDeadline", "must be at least 1s"))
            }
            Ok(_) => {}
            Err(e) => problems.push(Problem::new("spec.activeDeadline", e.to_string())),
        }
    }
    for key in spec.parameters.keys() {
        let ok = key.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            problems.push(Problem::new(
                format!("spec.parameters.{key}"),
                "keys are trainer flag names: lower-case letters, digits and '-', starting with a letter",
            ));
        }
    }
    problems
}

/// Full assessment: spec checks, then `after` against the BatchJobs in the same namespace.
pub fn assess(bj: &BatchJob, others: &[Arc<BatchJob>]) -> Assessment {
    let problems = validate(bj);
    if !problems.is_empty() {
        return Assessment::invalid(problems);
    }
    let ns = bj.namespace();
    let peers: Vec<&BatchJob> = others
        .iter()
        .map(Arc::as_ref)
        .filter(|o| o.namespace() == ns && o.meta().deletion_timestamp.is_none())
        .collect();
    let names: BTreeSet<String> = peers.iter().map(|o| o.name_any()).collect();
    let missing: Vec<&str> = bj
        .spec
        .after
        .iter()
        .map(String::as_str)
        .filter(|a| !names.contains(*a))
        .collect();
    if !missing.is_empty() {
        return Assessment::accepted(
            ConditionStatus::False,
            "UnknownDependency",
            format!(
                "spec.after: no BatchJob named {} in this namespace",
                missing.join(", ")
            ),
        );
    }
    let me = bj.name_any();
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for o in &peers {
        if o.name_any() == me {
            continue;
        }
        if let Some(n) = o.meta().name.as_deref() {
            graph
                .entry(n)
                .or_default()
                .extend(o.spec.after.iter().map(String::as_str));
        }
    }
    graph
        .entry(me.as_str())
        .or_default()
        .extend(bj.spec.after.iter().map(String::as_str));
    if let Some(cycle) = find_cycle(&graph, &me) {
        return Assessment::accepted(
            ConditionStatus::False,
            "DependencyCycle",
            format!("spec.after forms a cycle: {}", cycle.join(" → ")),
        );
    }
    match &bj.spec.schedule {
        Some(s) if bj.spec.suspend => Assessment::accepted(
            ConditionStatus::True,
            "Suspended",
            format!("CronJob {me} exists with schedule {s:?} and is suspended"),
        ),
        Some(s) => Assessment::accepted(
            ConditionStatus::True,
            "Scheduled",
            format!("CronJob {me} runs {} on {s:?}", bj.spec.job.as_str()),
        ),
        None => Assessment::accepted(
            ConditionStatus::True,
            "OnDemand",
            format!("runs when the annotation {RUN_ANNOTATION} gets a new value"),
        ),
    }
}

fn labels(bj: &BatchJob) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "recsys-trainer".into()),
        ("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into()),
        (
            "app.kubernetes.io/component".into(),
            bj.spec.job.as_str().into(),
        ),
        (JOB_LABEL.into(), bj.name_any()),
    ])
}

/// The trainer's arguments: the subcommand, then `--key=value` per parameter (sorted), then
/// the typed options of backfill and cf-train.
pub fn trainer_args(bj: &BatchJob) -> Vec<String> {
    let mut args = vec![bj.spec.job.as_str().to_owned()];
    args.extend(bj.spec.parameters.iter().map(|(k, v)| format!("--{k}={v}")));
    if let Some(b) = &bj.spec.backfill {
        args.push(format!("--features={}", b.features.join(",")));
        args.push(format!("--from={}", b.from.0));
        args.push(format!("--to={}", b.to.0));
    }
    if let Some(cf) = &bj.spec.cf_train {
        // `handOffTo` is the operator's business (it reads what the run published); the
        // trainer only needs the model's name.
        args.push(format!("--model-name={}", cf.model));
    }
    args
}

/// The Job spec every run of `bj` uses.
pub fn job_spec(bj: &BatchJob, settings: &TrainerSettings) -> JobSpec {
    let spec = &bj.spec;
    let env_from: Vec<EnvFromSource> = settings
        .config_map
        .iter()
        .map(|name| EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: name.clone(),
                optional: Some(true),
            }),
            ..Default::default()
        })
        .chain(settings.secret.iter().map(|name| EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: name.clone(),
                optional: Some(true),
            }),
            ..Default::default()
        }))
        .collect();
    let container = Container {
        name: CONTAINER.into(),
        image: Some(spec.image.clone().unwrap_or_else(|| settings.image.clone())),
        args: Some(trainer_args(bj)),
        env: Some(vec![
            EnvVar {
                name: "RECSYS_BATCH_JOB".into(),
                value: Some(bj.name_any()),
                ..Default::default()
            },
            EnvVar {
                name: "RECSYS_LOG_FORMAT".into(),
                value: Some("json".into()),
                ..Default::default()
            },
        ]),
        env_from: (!env_from.is_empty()).then_some(env_from),
        resources: spec.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    JobSpec {
        backoff_limit: Some(spec.retry.max_attempts - 1),
        active_deadline_seconds: spec
            .active_deadline
            .as_ref()
            .and_then(|d| d.to_std().ok())
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        pod_failure_policy: Some(PodFailurePolicy {
            rules: vec![
                PodFailurePolicyRule {
                    action: "FailJob".into(),
                    on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                        container_name: Some(CONTAINER.into()),
                        operator: "In".into(),
                        values: vec![EXIT_NOT_RETRYABLE],
                    }),
                    on_pod_conditions: None,
                },
                PodFailurePolicyRule {
                    action: "Ignore".into(),
                    on_exit_codes: None,
                    on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                        type_: "DisruptionTarget".into(),
                        status: "True".into(),
                    }]),
                },
            ],
        }),
        template: PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels(bj)),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                restart_policy: Some("Never".into()),
                service_account_name: settings.service_account.clone(),
                automount_service_account_token: Some(false),
                security_context: Some(PodSecurityContext {
                    run_as_non_root: Some(true),
                    run_as_user: Some(65532),
                    run_as_group: Some(65532),
                    seccomp_profile: Some(SeccompProfile {
                        type_: "RuntimeDefault".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                containers: vec![container],
                node_selector: (!settings.node_selector.is_empty())
                    .then(|| settings.node_selector.clone()),
                tolerations: (!settings.tolerations.is_empty())
                    .then(|| settings.tolerations.clone()),
                ..Default::default()
            }),
        },
        ..Default::default()
    }
}

fn owned_meta(bj: &BatchJob, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: bj.namespace(),
        labels: Some(labels(bj)),
        owner_references: bj.controller_owner_ref(&()).map(|r| vec![r]),
        ..Default::default()
    }
}

/// The CronJob of a scheduled BatchJob.
pub fn desired_cronjob(bj: &BatchJob, settings: &TrainerSettings) -> Option<CronJob> {
    let schedule = bj.spec.schedule.clone()?;
    let history = bj.spec.history_limit;
    Some(CronJob {
        metadata: owned_meta(bj, bj.name_any()),
        spec: Some(CronJobSpec {
            schedule,
            time_zone: bj.spec.time_zone.clone(),
            suspend: Some(bj.spec.suspend),
            concurrency_policy: Some(
                match bj.spec.concurrency_policy {
                    ConcurrencyPolicy::Allow => "Allow",
                    ConcurrencyPolicy::Forbid => "Forbid",
                    ConcurrencyPolicy::Replace => "Replace",
                }
                .into(),
            ),
            starting_deadline_seconds: Some(300),
            successful_jobs_history_limit: Some(history),
            failed_jobs_history_limit: Some(history),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(bj)),
                    ..Default::default()
                }),
                spec: Some(job_spec(bj, settings)),
            },
        }),
        status: None,
    })
}

/// The Job of an on-demand run request, named after the request so each request runs once.
pub fn desired_run(bj: &BatchJob, settings: &TrainerSettings) -> Option<Job> {
    if bj.spec.schedule.is_some() {
        return None;
    }
    let token = bj.annotations().get(RUN_ANNOTATION)?;
    let name = run_job_name(&bj.name_any(), token);
    Some(Job {
        metadata: owned_meta(bj, name),
        spec: Some(job_spec(bj, settings)),
        status: None,
    })
}

/// `<batchjob>-<fnv1a(token) in hex>`, cut to fit the 63-character label limit Jobs inherit.
pub fn run_job_name(batch_job: &str, token: &str) -> String {
    let hash = token.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let suffix = format!("{:010x}", hash & 0xff_ffff_ffff);
    let stem: String = batch_job.chars().take(63 - 1 - suffix.len()).collect();
    format!("{}-{suffix}", stem.trim_end_matches('-'))
}

/// Runs as the Jobs report them, newest first, at most `limit`.
pub fn runs_from_jobs(jobs: &[Job], limit: usize) -> Vec<JobRun> {
    let mut runs: Vec<JobRun> =
        jobs.iter()
            .filter_map(|job| {
                let status = job.status.as_ref()?;
                let started_at = status.start_time.clone()?;
                let conditions = status.conditions.as_deref().unwrap_or_default();
                let finished = |t: &str| {
                    conditions
                        .iter()
                        .find(|c| c.type_ == t && c.status == "True")
                };
                let (outcome, reason) = match (finished("Complete"), finished("Failed")) {
                    (Some(_), _) => ("Succeeded", String::new()),
                    (None, Some(c)) => (
                        "Failed",
                        format!(
                            "{}: {}",
                            c.reason.as_deref().unwrap_or("Failed"),
                            c.message.as_deref().unwrap_or_default()
                        ),
                    ),
                    _ => ("Running", String::new()),
                };
                Some(JobRun {
                    job_name: job.name_any(),
                    started_at,
                    finished_at: status.completion_time.clone().or_else(|| {
                        finished("Failed").and_then(|c| c.last_transition_time.clone())
                    }),
                    outcome: outcome.into(),
                    attempts: status.succeeded.unwrap_or(0)
                        + status.failed.unwrap_or(0)
                        + status.active.unwrap_or(0),
                    reason,
                })
            })
            .collect();
    runs.sort_by_key(|r| std::cmp::Reverse(r.started_at.0));
    runs.truncate(limit);
    runs
}

/// The status for `assessment` and the runs observed.
pub fn desired_status(
    bj: &BatchJob,
    assessment: &Assessment,
    runs: Vec<JobRun>,
    now: Timestamp,
) -> BatchJobStatus {
    let mut status: BatchJobStatus =
        stamped(bj.status.as_ref(), assessment, bj.metadata.generation, now);
    if let Some(last) = runs.first() {
        status.last_schedule_time = Some(last.started_at.clone());
        status.attempts = last.attempts;
    }
    let last_success: Option<&Time> = runs
        .iter()
        .filter(|r| r.outcome == "Succeeded")
        .filter_map(|r| r.finished_at.as_ref())
        .max_by_key(|t| t.0);
    if let Some(t) = last_success {
        status.last_successful_time = Some(t.clone());
    }
    status.history = runs
        .into_iter()
        .filter(|r| r.outcome != "Running")
        .collect();
    status
}

/// Reconciles one BatchJob.
#[instrument(skip(bj, ctx), fields(name = %bj.name_any(), namespace = bj.namespace().unwrap_or_default()))]
pub async fn reconcile(bj: Arc<BatchJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let ns = bj
        .namespace()
        .ok_or_else(|| Error::NoNamespace(bj.name_any()))?;
    let assessment = assess(&bj, &ctx.jobs.state());
    let pp = PatchParams::apply(FIELD_MANAGER).force();

    if assessment.is_accepted() {
        let cronjobs: Api<CronJob> = Api::namespaced(ctx.client.clone(), &ns);
        match desired_cronjob(&bj, &ctx.trainer) {
            Some(cj) => {
                cronjobs
                    .patch(&bj.name_any(), &pp, &Patch::Apply(&cj))
                    .await
                    .map_err(Error::Kube)?;
            }
            None => {
                // Became on-demand: the CronJob it had goes (its Jobs stay for history).
                if let Some(cj) = cronjobs
                    .get_opt(&bj.name_any())
                    .await
                    .map_err(Error::Kube)?
                    && cj
                        .owner_references()
                        .iter()
                        .any(|o| Some(&o.uid) == bj.meta().uid.as_ref())
                {
                    cronjobs
                        .delete(&bj.name_any(), &Default::default())
                        .await
                        .map_err(Error::Kube)?;
                }
            }
        }
        if let Some(job) = desired_run(&bj, &ctx.trainer) {
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
            let name = job.name_any();
            // A Job's template is immutable: create once, never re-apply.
            if jobs.get_opt(&name).await.map_err(Error::Kube)?.is_none() {
                jobs.create(&Default::default(), &job)
                    .await
                    .map_err(Error::Kube)?;
            }
        }
    }

    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let observed = jobs
        .list(&ListParams::default().labels(&format!("{JOB_LABEL}={}", bj.name_any())))
        .await
        .map_err(Error::Kube)?;
    let limit = usize::try_from(bj.spec.history_limit).unwrap_or(10);
    let runs = runs_from_jobs(&observed.items, limit);
    let running = runs.iter().any(|r| r.outcome == "Running");
    let status = desired_status(&bj, &assessment, runs, Timestamp::now());
    let before = bj.status.clone().unwrap_or_default();
    if write_status(&ctx, bj.as_ref(), &before, &status).await? {
        let previous = before.history.first();
        if let Some(new) = status.history.first()
            && previous.is_none_or(|o| o.job_name != new.job_name)
        {
            let type_ = if new.outcome == "Succeeded" {
                EventType::Normal
            } else {
                EventType::Warning
            };
            let note = format!(
                "run {} {} after {} attempt(s) {}",
                new.job_name,
                new.outcome.to_lowercase(),
                new.attempts,
                new.reason
            );
            let reason = format!("Run{}", new.outcome);
            ctx.event(bj.as_ref(), type_, &reason, note, "Run").await;
        }
    }
    if running {
        return Ok(Action::requeue(std::time::Duration::from_secs(10)));
    }
    Ok(assessment.next_action())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TrainerSettings {
        TrainerSettings {
            image: "ghcr.io/recsys-io/recsys-trainer:0.1.0".into(),
            service_account: Some("recsys-trainer".into()),
            config_map: Some("recsys-config".into()),
            secret: None,
            node_selector: BTreeMap::from([("pool".into(), "batch".into())]),
            tolerations: vec![Toleration {
                key: Some("batch".into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }],
        }
    }

    fn bj(yaml: &str) -> Arc<BatchJob> {
        let mut bj: BatchJob = serde_yaml::from_str(yaml).expect("fixture");
        bj.metadata.namespace = Some("shop".into());
        bj.metadata.uid = Some("uid-1".into());
        Arc::new(bj)
    }

    const POPULARITY: &str = r#"
apiVersion: recsys.io/v1alpha1
kind: BatchJob
metadata: { name: popularity, generation: 2 }
spec:
  job: popularity
  schedule: "*/5 * * * *"
  timeZone: Europe/Berlin
  activeDeadline: 10m
  parameters: { window: 90d, half-life: 7d }
"#;

    #[test]
    fn a_scheduled_job_owns_a_cronjob_with_retries_and_policy() {
        let b = bj(POPULARITY);
        assert_eq!(
            assess(&b, std::slice::from_ref(&b)).ready_reason,
            "Scheduled"
        );
        let cj = desired_cronjob(&b, &settings()).expect("cronjob");
        let spec = cj.spec.expect("spec");
        assert_eq!(spec.schedule, "*/5 * * * *");
        assert_eq!(spec.time_zone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
        let job = spec.job_template.spec.expect("job");
        assert_eq!(job.backoff_limit, Some(2), "3 attempts = 2 retries");
        assert_eq!(job.active_deadline_seconds, Some(600));
        let rules = job.pod_failure_policy.expect("policy").rules;
        assert_eq!(rules[0].action, "FailJob");
        assert_eq!(
            rules[0].on_exit_codes.as_ref().map(|e| e.values.clone()),
            Some(vec![EXIT_NOT_RETRYABLE])
        );
        let pod = job.template.spec.expect("pod");
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.node_selector, Some(settings().node_selector));
        assert_eq!(pod.tolerations, Some(settings().tolerations));
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_deref().expect("args"),
            ["popularity", "--half-life=7d", "--window=90d"]
        );
        let sc = c.security_context.as_ref().expect("security context");
        assert_eq!(
            (sc.read_only_root_filesystem, sc.run_as_non_root),
            (Some(true), Some(true))
        );
        let owner = &cj.metadata.owner_references.expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("BatchJob", Some(true))
        );
        assert!(
            desired_run(&b, &settings()).is_none(),
            "scheduled jobs have no on-demand run"
        );
    }

    #[test]
    fn on_demand_runs_are_one_job_per_request() {
        let mut b = (*bj(POPULARITY)).clone();
        b.spec.schedule = None;
        b.spec.time_zone = None;
        assert!(desired_run(&b, &settings()).is_none(), "no request, no run");
        b.metadata.annotations = Some(BTreeMap::from([(
            RUN_ANNOTATION.into(),
            "2026-11-26T08:00".into(),
        )]));
        let first = desired_run(&b, &settings()).expect("run").name_any();
        assert_eq!(
            first,
            desired_run(&b, &settings()).expect("run").name_any(),
            "stable name"
        );
        b.metadata.annotations = Some(BTreeMap::from([(RUN_ANNOTATION.into(), "again".into())]));
        assert_ne!(first, desired_run(&b, &settings()).expect("run").name_any());
        assert!(first.starts_with("popularity-") && first.len() <= 63);
        assert!(run_job_name(&"x".repeat(80), "t").len() <= 63);
        assert_eq!(assess(&Arc::new(b.clone()), &[]).ready_reason, "OnDemand");
    }

    #[test]
    fn bad_schedules_and_zones_name_their_field() {
        let mut b = (*bj(POPULARITY)).clone();
        b.spec.schedule = Some("61 * * * *".into());
        b.spec.time_zone = Some("Mars/Olympus".into());
        let got = assess(&Arc::new(b), &[]);
        let fields: Vec<&str> = got.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["spec.schedule", "spec.timeZone"]);
        assert!(got.problems[0].message.contains("61 * * * *"));
    }

    #[test]
    fn dependencies_must_exist_and_not_cycle() {
        let a = bj(
            "{apiVersion: recsys.io/v1alpha1, kind: BatchJob, metadata: {name: a}, spec: {job: popularity, after: [b]}}",
        );
        assert_eq!(
            assess(&a, std::slice::from_ref(&a)).ready_reason,
            "UnknownDependency"
        );
        let b = bj(
            "{apiVersion: recsys.io/v1alpha1, kind: BatchJob, metadata: {name: b}, spec: {job: cf-train, after: [a]}}",
        );
        let got = assess(&a, &[a.clone(), b.clone()]);
        assert_eq!(got.ready_reason, "DependencyCycle");
        assert!(
            got.ready_message.contains("a → b → a"),
            "{}",
            got.ready_message
        );
    }

    #[test]
    fn runs_come_from_job_status() {
        let jobs: Vec<Job> = serde_yaml::from_str(
            r#"
- metadata: { name: pop-1 }
  status:
    startTime: "2026-11-26T07:00:00Z"
    completionTime: "2026-11-26T07:01:00Z"
    succeeded: 1
    failed: 1
    conditions: [{ type: Complete, status: "True" }]
- metadata: { name: pop-2 }
  status:
    startTime: "2026-11-26T07:05:00Z"
    failed: 1
    conditions:
      - { type: Failed, status: "True", reason: PodFailurePolicy, message: "exit code 2", lastTransitionTime: "2026-11-26T07:05:30Z" }
- metadata: { name: pop-3 }
  status: { startTime: "2026-11-26T07:10:00Z", active: 1 }
"#,
        )
        .expect("jobs");
        let runs = runs_from_jobs(&jobs, 10);
        let got: Vec<(&str, &str, i32)> = runs
            .iter()
            .map(|r| (r.job_name.as_str(), r.outcome.as_str(), r.attempts))
            .collect();
        assert_eq!(
            got,
            [
                ("pop-3", "Running", 1),
                ("pop-2", "Failed", 1),
                ("pop-1", "Succeeded", 2)
            ]
        );
        assert!(runs[1].reason.contains("PodFailurePolicy"));
        let b = bj(POPULARITY);
        let now: Timestamp = "2026-11-26T08:00:00Z".parse().expect("ts");
        let status = desired_status(&b, &assess(&b, &[]), runs, now);
        assert_eq!(status.history.len(), 2, "running runs are not history yet");
        assert_eq!(
            status.last_successful_time.map(|t| t.0.to_string()),
            Some("2026-11-26T07:01:00Z".into())
        );
        assert_eq!(
            status.last_schedule_time.map(|t| t.0.to_string()),
            Some("2026-11-26T07:10:00Z".into())
        );
        assert_eq!(status.observed_generation, Some(2));
        assert_eq!(runs_from_jobs(&jobs, 1).len(), 1);
    }

    /// `cfTrain.model` reaches the trainer as the model's name in the registry.
    #[test]
    fn cf_train_names_its_model_in_arguments_the_trainer_accepts() {
        use clap::Parser as _;
        let b = bj(
            "{apiVersion: recsys.io/v1alpha1, kind: BatchJob, metadata: {name: cf}, spec: {job: cf-train, cfTrain: {model: shop-als, handOffTo: shop}, parameters: {factors: '32'}}}",
        );
        let args = trainer_args(&b);
        assert_eq!(args, ["cf-train", "--factors=32", "--model-name=shop-als"]);
        let cli = recsys_trainer::Cli::try_parse_from(
            std::iter::once("recsys-trainer".to_owned()).chain(args.clone()),
        )
        .unwrap_or_else(|e| panic!("{args:?} refused by the trainer: {e}"));
        match cli.job {
            recsys_trainer::Job::CfTrain(a) => {
                assert_eq!((a.model_name.as_str(), a.model.factors), ("shop-als", 32))
            }
            other => panic!("parsed as {}", other.name()),
        }
    }

    /// Every shipped BatchJob example becomes a command line the trainer accepts: the
    /// parameters a user copies from the docs do not fail at run time.
    #[test]
    fn example_batch_jobs_give_arguments_the_trainer_accepts() {
        use clap::Parser as _;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
        let mut files = vec![root.join("batchjob.yaml")];
        let mut more: Vec<_> = std::fs::read_dir(root.join("batchjobs"))
            .expect("docs/examples/batchjobs")
            .map(|e| e.expect("entry").path())
            .collect();
        more.sort();
        files.extend(more);
        assert!(files.len() >= 4, "{files:?}");
        for path in files {
            let text = std::fs::read_to_string(&path).expect("read");
            let bj: BatchJob =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let args = trainer_args(&bj);
            let cli = recsys_trainer::Cli::try_parse_from(
                std::iter::once("recsys-trainer".to_owned()).chain(args.clone()),
            )
            .unwrap_or_else(|e| panic!("{}: {args:?} refused by the trainer: {e}", path.display()));
            assert_eq!(cli.job.name(), bj.spec.job.as_str(), "{}", path.display());
        }
    }
}
