//! The scorer workload of a ModelDeployment, built from its spec alone (no client here): a
//! ServiceAccount with a Role to watch the routing ConfigMap, the Deployment, its Service, a
//! PodDisruptionBudget and, when `spec.scorer.autoscaling` is set, a HorizontalPodAutoscaler.
//! Every object is named `<ModelDeployment>-scorer`, labelled for the ModelDeployment and owned
//! by it, and applied with server-side apply under the operator's field manager.
//!
//! The pods run like the operator's own: non-root user 65532, read-only root, no capabilities,
//! the runtime's seccomp profile. Rolling updates add a pod before removing one
//! (`maxUnavailable: 0`), so an image or resource change never takes capacity away.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    HostPathVolumeSource, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Service, ServiceAccount, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use recsys_crds::ModelDeployment;

use super::FIELD_MANAGER;
use super::model_deployment::{ROUTING_KEY, routing_configmap_name};

/// Name of the scorer container.
pub const CONTAINER: &str = "scorer";
/// Port the scorer listens on in its pod.
pub const PORT: i32 = 8080;
/// Name of the scorer port (in the pod and the Service).
pub const PORT_NAME: &str = "http";
/// Label naming the ModelDeployment a scorer object belongs to.
pub const SCORER_LABEL: &str = "recsys.io/scorer-for";

/// How the operator builds scorer pods, from its own configuration.
#[derive(Clone, Debug, Default)]
pub struct ScorerSettings {
    /// Default scorer image (`spec.scorer.image` overrides it).
    pub image: String,
    /// ConfigMap whose keys become the scorer's environment (optional to exist): the stores.
    pub config_map: Option<String>,
    /// Secret whose keys become the scorer's environment (optional to exist).
    pub secret: Option<String>,
    /// Node selector of scorer pods.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of scorer pods.
    pub tolerations: Vec<Toleration>,
    /// Default tokens Secret of scorers whose ModelDeployment has no `spec.scorer.auth`.
    pub auth_secret: Option<String>,
}

/// Where the tokens Secret is mounted in scorer pods.
pub const TOKENS_DIR: &str = "/var/run/secrets/recsys/scorer-tokens";

/// The scorer's authentication as environment and a volume of the tokens Secret (optional to
/// exist: without it the directory is empty and every write is refused, so a missing Secret
/// fails closed without keeping the pods from starting).
fn auth_env(
    md: &ModelDeployment,
    settings: &ScorerSettings,
) -> (Vec<EnvVar>, Option<(Volume, VolumeMount)>) {
    let auth = md.spec.scorer.auth.clone().or_else(|| {
        settings
            .auth_secret
            .clone()
            .map(|tokens_secret| recsys_crds::ScorerAuth {
                tokens_secret,
                protect_reads: false,
                ingest_rate_per_client: None,
            })
    });
    let Some(auth) = auth else {
        return (vec![], None);
    };
    let value = |name: &str, v: String| EnvVar {
        name: name.to_owned(),
        value: Some(v),
        ..Default::default()
    };
    let mut env = vec![value(
        "RECSYS_SCORER_AUTH_TOKENS_DIR",
        TOKENS_DIR.to_owned(),
    )];
    if auth.protect_reads {
        env.push(value("RECSYS_SCORER_AUTH_READS", "token".to_owned()));
    }
    if let Some(rate) = auth.ingest_rate_per_client {
        env.push(value("RECSYS_SCORER_INGEST_RATE", rate.to_string()));
    }
    let volume = Volume {
        name: "scorer-tokens".to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(auth.tokens_secret),
            optional: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mount = VolumeMount {
        name: "scorer-tokens".to_owned(),
        mount_path: TOKENS_DIR.to_owned(),
        read_only: Some(true),
        ..Default::default()
    };
    (env, Some((volume, mount)))
}

/// Name of every scorer object of `md`.
pub fn name(md: &ModelDeployment) -> String {
    format!("{}-scorer", md.name_any())
}

/// In-cluster URL of the scorer Service of `md`.
pub fn service_url(md: &ModelDeployment) -> String {
    format!(
        "http://{}.{}.svc",
        name(md),
        md.namespace().unwrap_or_default()
    )
}

/// Labels that select the scorer pods of `md`.
pub fn selector(md: &ModelDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "recsys-scorer".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), md.name_any()),
    ])
}

fn labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    let mut l = selector(md);
    l.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        FIELD_MANAGER.to_owned(),
    );
    l.insert(
        "app.kubernetes.io/component".to_owned(),
        "scorer".to_owned(),
    );
    l.insert(SCORER_LABEL.to_owned(), md.name_any());
    l.insert("recsys.io/model".to_owned(), md.spec.model.clone());
    l
}

fn meta(md: &ModelDeployment) -> ObjectMeta {
    ObjectMeta {
        name: Some(name(md)),
        namespace: md.namespace(),
        labels: Some(labels(md)),
        owner_references: md.controller_owner_ref(&()).map(|r| vec![r]),
        ..Default::default()
    }
}

/// Default compute resources of a scorer container.
pub fn default_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_owned());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), q("100m")),
            ("memory".to_owned(), q("256Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_owned(), q("1Gi"))])),
        ..Default::default()
    }
}

/// The service account scorer pods run as.
pub fn service_account(md: &ModelDeployment) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(md),
        // The scorer watches its routing ConfigMap through the API.
        automount_service_account_token: Some(true),
        ..Default::default()
    }
}

/// Read access to the routing ConfigMap, and nothing else.
pub fn role(md: &ModelDeployment) -> Role {
    Role {
        metadata: meta(md),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".to_owned()]),
            resource_names: Some(vec![routing_configmap_name(md)]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..Default::default()
        }]),
    }
}

/// Binds [`role`] to [`service_account`].
pub fn role_binding(md: &ModelDeployment) -> RoleBinding {
    RoleBinding {
        metadata: meta(md),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: name(md),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: name(md),
            namespace: md.namespace(),
            ..Default::default()
        }]),
    }
}

/// The artifact store as the scorer's environment (and, for a `file:///` store, the host
/// directory it reads).
fn artifact_env(md: &ModelDeployment) -> (Vec<EnvVar>, Option<(Volume, VolumeMount)>) {
    let a = &md.spec.artifacts;
    let value = |name: &str, v: String| EnvVar {
        name: name.to_owned(),
        value: Some(v),
        ..Default::default()
    };
    let mut env = vec![];
    let mut volume = None;
    match a.uri.strip_prefix("file://") {
        Some(path) => {
            env.push(value("RECSYS_ARTIFACTS", path.to_owned()));
            volume = Some((
                Volume {
                    name: "artifacts".to_owned(),
                    host_path: Some(HostPathVolumeSource {
                        path: path.to_owned(),
                        type_: Some("Directory".to_owned()),
                    }),
                    ..Default::default()
                },
                VolumeMount {
                    name: "artifacts".to_owned(),
                    mount_path: path.to_owned(),
                    read_only: Some(true),
                    ..Default::default()
                },
            ));
        }
        None => env.push(value("RECSYS_ARTIFACTS", a.uri.clone())),
    }
    if let Some(endpoint) = &a.endpoint {
        env.push(value("RECSYS_S3_ENDPOINT", endpoint.clone()));
    }
    if let Some(region) = &a.region {
        env.push(value("RECSYS_S3_REGION", region.clone()));
    }
    if a.force_path_style {
        env.push(value("RECSYS_S3_FORCE_PATH_STYLE", "true".to_owned()));
    }
    if let Some(secret) = &a.credentials_secret {
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            env.push(EnvVar {
                name: key.to_owned(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.clone(),
                        key: key.to_owned(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    (env, volume)
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(PORT_NAME.to_owned()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// The scorer Deployment.
pub fn deployment(md: &ModelDeployment, settings: &ScorerSettings) -> Deployment {
    let spec = &md.spec.scorer;
    let (artifact_env, volume) = artifact_env(md);
    let field = |name: &str, path: &str| EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut env = vec![
        field("POD_NAMESPACE", "metadata.namespace"),
        EnvVar {
            name: "RECSYS_LOG_FORMAT".to_owned(),
            value: Some("json".to_owned()),
            ..Default::default()
        },
    ];
    // After envFrom in precedence: the ModelDeployment's store wins over the shared config.
    env.extend(artifact_env);
    let (auth_env, tokens) = auth_env(md, settings);
    env.extend(auth_env);
    let (volumes, mounts): (Vec<Volume>, Vec<VolumeMount>) =
        volume.into_iter().chain(tokens).unzip();
    let env_from = super::batch_job::build::shared_env_from(
        settings.config_map.as_deref(),
        settings.secret.as_deref(),
    );
    let container = Container {
        name: CONTAINER.to_owned(),
        image: Some(spec.image.clone().unwrap_or_else(|| settings.image.clone())),
        args: Some(vec![
            format!("--bind-address=0.0.0.0:{PORT}"),
            format!("--routing-configmap={}", routing_configmap_name(md)),
            format!("--routing-configmap-key={ROUTING_KEY}"),
            format!("--model={}", md.spec.model),
        ]),
        env: Some(env),
        env_from: (!env_from.is_empty()).then_some(env_from),
        ports: Some(vec![ContainerPort {
            name: Some(PORT_NAME.to_owned()),
            container_port: PORT,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        // Ready once the stable version is loaded and verified; a big model may take a while
        // to load, which readiness (not liveness) waits for.
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 20, 3)),
        resources: Some(spec.resources.clone().unwrap_or_else(default_resources)),
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
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Default::default()
    };
    Deployment {
        metadata: meta(md),
        spec: Some(DeploymentSpec {
            // With an autoscaler the replica count is its to set: left out of the apply, so
            // the operator does not fight it.
            replicas: spec.autoscaling.is_none().then_some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(md)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(md)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name(md)),
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
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    node_selector: (!settings.node_selector.is_empty())
                        .then(|| settings.node_selector.clone()),
                    tolerations: (!settings.tolerations.is_empty())
                        .then(|| settings.tolerations.clone()),
                    // In-flight requests finish within the scorer's shutdown.
                    termination_grace_period_seconds: Some(30),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Service in front of the scorer pods: port 80 → `http`.
pub fn service(md: &ModelDeployment) -> Service {
    Service {
        metadata: meta(md),
        spec: Some(ServiceSpec {
            selector: Some(selector(md)),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.to_owned()),
                port: 80,
                target_port: Some(IntOrString::String(PORT_NAME.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// At most one scorer pod voluntarily disrupted (drained) at a time.
pub fn pod_disruption_budget(md: &ModelDeployment) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(md),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(md)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The autoscaler, when `spec.scorer.autoscaling` asks for one.
pub fn autoscaler(md: &ModelDeployment) -> Option<HorizontalPodAutoscaler> {
    let a = md.spec.scorer.autoscaling.as_ref()?;
    Some(HorizontalPodAutoscaler {
        metadata: meta(md),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".to_owned()),
                kind: "Deployment".to_owned(),
                name: name(md),
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".to_owned(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".to_owned(),
                    target: MetricTarget {
                        type_: "Utilization".to_owned(),
                        average_utilization: Some(a.target_cpu_utilization),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(yaml: &str) -> ModelDeployment {
        let mut m: ModelDeployment = serde_yaml::from_str(yaml).expect("fixture");
        m.metadata.uid = Some("uid-1".into());
        m
    }

    const ALS: &str = r#"
apiVersion: recsys.io/v1alpha1
kind: ModelDeployment
metadata: { name: als, namespace: shop }
spec:
  model: als
  version: v1
  artifacts:
    uri: "s3://models/recsys"
    endpoint: "http://seaweedfs:8333"
    forcePathStyle: true
    credentialsSecret: s3-creds
  scorer: { replicas: 3 }
  strategy: { steps: [ { full: {} } ] }
"#;

    fn settings() -> ScorerSettings {
        ScorerSettings {
            image: "recsys-scorer:test".into(),
            config_map: Some("recsys-config".into()),
            secret: Some("recsys-secrets".into()),
            node_selector: BTreeMap::from([("pool".into(), "serving".into())]),
            tolerations: vec![],
            auth_secret: None,
        }
    }

    fn env_of(d: &Deployment) -> BTreeMap<String, EnvVar> {
        let c = &d
            .spec
            .as_ref()
            .expect("spec")
            .template
            .spec
            .as_ref()
            .expect("pod")
            .containers[0];
        c.env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect()
    }

    #[test]
    fn the_deployment_serves_the_routing_table_from_the_artifact_store() {
        let m = md(ALS);
        let d = deployment(&m, &settings());
        assert_eq!(d.metadata.name.as_deref(), Some("als-scorer"));
        assert_eq!(
            d.metadata
                .owner_references
                .as_ref()
                .map(|o| o[0].uid.as_str()),
            Some("uid-1")
        );
        let spec = d.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(3));
        let strategy = spec
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .expect("rolling");
        assert_eq!(strategy.max_unavailable, Some(IntOrString::Int(0)));
        let pod = spec.template.spec.as_ref().expect("pod");
        assert_eq!(pod.service_account_name.as_deref(), Some("als-scorer"));
        assert_eq!(
            pod.node_selector.as_ref().map(|n| n["pool"].as_str()),
            Some("serving")
        );
        assert_eq!(
            pod.security_context.as_ref().and_then(|s| s.run_as_user),
            Some(65532)
        );
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("recsys-scorer:test"));
        let args = c.args.clone().unwrap_or_default();
        assert!(
            args.contains(&"--routing-configmap=als-routing".to_owned()),
            "{args:?}"
        );
        assert!(args.contains(&"--model=als".to_owned()), "{args:?}");
        let env = env_of(&d);
        assert_eq!(
            env["RECSYS_ARTIFACTS"].value.as_deref(),
            Some("s3://models/recsys")
        );
        assert_eq!(
            env["RECSYS_S3_ENDPOINT"].value.as_deref(),
            Some("http://seaweedfs:8333")
        );
        assert_eq!(
            env["RECSYS_S3_FORCE_PATH_STYLE"].value.as_deref(),
            Some("true")
        );
        let key = env["AWS_SECRET_ACCESS_KEY"]
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .expect("from the Secret");
        assert_eq!(
            (key.name.as_str(), key.key.as_str()),
            ("s3-creds", "AWS_SECRET_ACCESS_KEY")
        );
        assert!(env["POD_NAMESPACE"].value_from.is_some());
        let readiness = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("probe");
        assert_eq!(readiness.path.as_deref(), Some("/readyz"));
        let sc = c.security_context.as_ref().expect("security context");
        assert_eq!(
            (sc.read_only_root_filesystem, sc.allow_privilege_escalation),
            (Some(true), Some(false))
        );
        assert!(autoscaler(&m).is_none());
    }

    #[test]
    fn an_autoscaler_owns_the_replica_count() {
        let mut m = md(ALS);
        m.spec.scorer.autoscaling =
            Some(serde_yaml::from_str("{minReplicas: 2, maxReplicas: 8}").expect("yaml"));
        let d = deployment(&m, &settings());
        assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), None);
        let hpa = autoscaler(&m).expect("hpa");
        let spec = hpa.spec.expect("spec");
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 8));
        assert_eq!(spec.scale_target_ref.name, "als-scorer");
        let target = &spec.metrics.expect("metrics")[0];
        assert_eq!(
            target
                .resource
                .as_ref()
                .and_then(|r| r.target.average_utilization),
            Some(70)
        );
    }

    #[test]
    fn a_local_store_is_mounted_read_only_and_the_role_reads_one_configmap() {
        let mut m = md(ALS);
        m.spec.artifacts =
            serde_yaml::from_str("{uri: 'file:///var/lib/recsys/artifacts'}").expect("yaml");
        let d = deployment(&m, &settings());
        assert_eq!(
            env_of(&d)["RECSYS_ARTIFACTS"].value.as_deref(),
            Some("/var/lib/recsys/artifacts")
        );
        let pod = d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod");
        let mount = &pod.containers[0].volume_mounts.as_ref().expect("mounts")[0];
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/var/lib/recsys/artifacts", Some(true))
        );
        assert!(!env_of(&d).contains_key("AWS_ACCESS_KEY_ID"));

        let r = role(&m);
        let rule = &r.rules.expect("rules")[0];
        assert_eq!(
            rule.resource_names.as_deref(),
            Some(&["als-routing".to_owned()][..])
        );
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        assert_eq!(
            service(&m).spec.and_then(|s| s.selector),
            Some(selector(&m))
        );
        assert_eq!(
            pod_disruption_budget(&m)
                .spec
                .and_then(|s| s.max_unavailable),
            Some(IntOrString::Int(1))
        );
        assert_eq!(service_url(&m), "http://als-scorer.shop.svc");
    }

    #[test]
    fn the_tokens_secret_is_mounted_from_the_spec_or_the_operator_default() {
        let pod_of = |d: &Deployment| {
            d.spec
                .as_ref()
                .and_then(|s| s.template.spec.clone())
                .expect("pod")
        };
        // No auth anywhere: nothing mounted, nothing set.
        let d = deployment(&md(ALS), &settings());
        assert!(!env_of(&d).contains_key("RECSYS_SCORER_AUTH_TOKENS_DIR"));
        assert!(pod_of(&d).volumes.is_none());
        // The operator's default.
        let mut s = settings();
        s.auth_secret = Some("recsys-scorer-tokens".into());
        let d = deployment(&md(ALS), &s);
        assert_eq!(
            env_of(&d)["RECSYS_SCORER_AUTH_TOKENS_DIR"].value.as_deref(),
            Some(TOKENS_DIR)
        );
        let pod = pod_of(&d);
        let v = &pod.volumes.as_ref().expect("volumes")[0];
        let secret = v.secret.as_ref().expect("secret volume");
        assert_eq!(
            (secret.secret_name.as_deref(), secret.optional),
            (Some("recsys-scorer-tokens"), Some(true))
        );
        let m = &pod.containers[0].volume_mounts.as_ref().expect("mounts")[0];
        assert_eq!(
            (m.mount_path.as_str(), m.read_only),
            (TOKENS_DIR, Some(true))
        );
        assert!(!env_of(&d).contains_key("RECSYS_SCORER_AUTH_READS"));
        // The ModelDeployment's own wins, with its read protection and rate.
        let mut m = md(ALS);
        m.spec.scorer.auth = Some(
            serde_yaml::from_str(
                "{tokensSecret: shop-tokens, protectReads: true, ingestRatePerClient: 200}",
            )
            .expect("yaml"),
        );
        let d = deployment(&m, &s);
        let env = env_of(&d);
        assert_eq!(
            env["RECSYS_SCORER_AUTH_READS"].value.as_deref(),
            Some("token")
        );
        assert_eq!(
            env["RECSYS_SCORER_INGEST_RATE"].value.as_deref(),
            Some("200")
        );
        let pod = pod_of(&d);
        assert_eq!(
            pod.volumes.as_ref().expect("volumes")[0]
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref()),
            Some("shop-tokens")
        );
        // With a local artifact store too: both mounted.
        m.spec.artifacts =
            serde_yaml::from_str("{uri: 'file:///var/lib/recsys/artifacts'}").expect("yaml");
        let pod = pod_of(&deployment(&m, &s));
        assert_eq!(pod.volumes.as_ref().map(Vec::len), Some(2));
        assert_eq!(
            pod.containers[0].volume_mounts.as_ref().map(Vec::len),
            Some(2)
        );
    }
}
