//! Step 3: the Job of one run, a pure function of the BatchJob, the operator's trainer
//! settings and the run request. Never touches the API.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, Container, EnvFromSource, EnvVar, PodSecurityContext,
    PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, SecretEnvSource,
    SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use recsys_crds::{BatchJob, JobKind};
use recsys_trainer::contract::{self, ContractError, RunOptions};

use super::plan::RunRequest;
use super::{
    CONSUMED_ANNOTATION, CONTAINER, EXIT_GATE_FAILED, EXIT_NOT_RETRYABLE, JOB_LABEL,
    TRIGGER_ANNOTATION, TrainerSettings,
};
use crate::controller::FIELD_MANAGER;

/// Where the trainer writes its run summary, read back from the Pod's status.
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// Labels of every Job and Pod of `bj`.
pub fn labels(bj: &BatchJob) -> BTreeMap<String, String> {
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

/// Resources of a trainer container when the BatchJob sets none: what each job needs on the
/// data sizes the benchmarks use, with room above.
pub fn default_resources(kind: JobKind) -> ResourceRequirements {
    let (cpu, memory, limit) = match kind {
        JobKind::Popularity
        | JobKind::Freshness
        | JobKind::CategoryAffinity
        | JobKind::DataQuality => ("250m", "256Mi", "1Gi"),
        JobKind::Backfill => ("500m", "512Mi", "2Gi"),
        JobKind::CfTrain | JobKind::IndexRebuild => ("1", "1Gi", "4Gi"),
    };
    let q = |s: &str| Quantity(s.to_owned());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), q(cpu)),
            ("memory".into(), q(memory)),
        ])),
        limits: Some(BTreeMap::from([("memory".into(), q(limit))])),
        ..Default::default()
    }
}

/// The shared store settings every recsys pod reads: the ConfigMap and Secret the chart names,
/// both optional (a pod starts without them and its own defaults apply).
pub fn shared_env_from(config_map: Option<&str>, secret: Option<&str>) -> Vec<EnvFromSource> {
    config_map
        .map(|name| EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: name.to_owned(),
                optional: Some(true),
            }),
            ..Default::default()
        })
        .into_iter()
        .chain(secret.map(|name| EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: name.to_owned(),
                optional: Some(true),
            }),
            ..Default::default()
        }))
        .collect()
}

/// The Job spec of one run with trainer arguments `args`.
pub fn job_spec(bj: &BatchJob, settings: &TrainerSettings, args: Vec<String>) -> JobSpec {
    let spec = &bj.spec;
    let env_from = shared_env_from(settings.config_map.as_deref(), settings.secret.as_deref());
    let env = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let container = Container {
        name: CONTAINER.into(),
        image: Some(spec.image.clone().unwrap_or_else(|| settings.image.clone())),
        args: Some(args),
        env: Some(vec![
            env("RECSYS_BATCH_JOB", bj.name_any()),
            env("RECSYS_LOG_FORMAT", "json".into()),
            env(
                recsys_core::runs::SUMMARY_PATH_ENV,
                TERMINATION_MESSAGE_PATH.into(),
            ),
        ]),
        env_from: (!env_from.is_empty()).then_some(env_from),
        resources: Some(
            spec.resources
                .clone()
                .unwrap_or_else(|| default_resources(spec.job)),
        ),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        // A trainer that died before writing its summary leaves the tail of its log instead.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
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
                        values: vec![EXIT_NOT_RETRYABLE, EXIT_GATE_FAILED],
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
                labels: Some(
                    spec.pod_labels
                        .clone()
                        .into_iter()
                        .chain(labels(bj))
                        .collect(),
                ),
                annotations: (!spec.pod_annotations.is_empty())
                    .then(|| spec.pod_annotations.clone()),
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

/// The Job of run `run`: named by it, owned by the BatchJob, annotated with what started it and
/// the upstream runs it consumes.
pub fn run_job(
    bj: &BatchJob,
    settings: &TrainerSettings,
    run: &RunRequest,
    options: &RunOptions,
) -> Result<Job, ContractError> {
    let args = contract::args(&bj.spec, options)?;
    let mut annotations = BTreeMap::from([(
        TRIGGER_ANNOTATION.to_owned(),
        run.trigger.as_str().to_owned(),
    )]);
    if !run.consumed.is_empty() {
        annotations.insert(
            CONSUMED_ANNOTATION.to_owned(),
            serde_json::to_string(&run.consumed).unwrap_or_default(),
        );
    }
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(run.name.clone()),
            namespace: bj.namespace(),
            labels: Some(labels(bj)),
            annotations: Some(annotations),
            owner_references: bj.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        spec: Some(job_spec(bj, settings, args)),
        status: None,
    })
}
