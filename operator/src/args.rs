//! Command-line options; every one is also an environment variable.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use clap::Parser;
use k8s_openapi::api::core::v1::Toleration;
use recsys_core::telemetry::TelemetryArgs;

/// Options of `recsys-operator`.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "recsys-operator",
    version,
    about = "Reconciles ModelDeployment, BatchJob and FeatureDefinition resources"
)]
pub struct Args {
    /// Logging.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(
        long,
        env = "RECSYS_METRICS_BIND_ADDRESS",
        default_value = "0.0.0.0:8080"
    )]
    pub metrics_bind_address: SocketAddr,

    /// Address of the `/healthz` and `/readyz` probes.
    #[arg(
        long,
        env = "RECSYS_HEALTH_PROBE_BIND_ADDRESS",
        default_value = "0.0.0.0:8081"
    )]
    pub health_probe_bind_address: SocketAddr,

    /// Elect a leader through a Lease, so that of several replicas only one acts.
    #[arg(long, env = "RECSYS_LEADER_ELECT", default_value_t = false)]
    pub leader_elect: bool,

    /// Name of the Lease used for leader election.
    #[arg(
        long,
        env = "RECSYS_LEADER_ELECTION_ID",
        default_value = "recsys-operator"
    )]
    pub leader_election_id: String,

    /// Namespace of the Lease; the client's default namespace (the pod's own) when unset.
    #[arg(long, env = "RECSYS_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Watch only this namespace; every namespace when unset.
    #[arg(long, env = "RECSYS_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Identity of this replica in leader election and Events; the pod name in a cluster.
    #[arg(long, env = "POD_NAME", default_value_t = default_identity())]
    pub identity: String,

    /// Default container image of trainer Jobs (a BatchJob's `spec.image` overrides it).
    #[arg(long, env = "RECSYS_TRAINER_IMAGE", default_value = concat!("ghcr.io/recsys-io/recsys-trainer:", env!("CARGO_PKG_VERSION")))]
    pub trainer_image: String,

    /// Service account of trainer pods.
    #[arg(long, env = "RECSYS_TRAINER_SERVICE_ACCOUNT")]
    pub trainer_service_account: Option<String>,

    /// ConfigMap (in the BatchJob's namespace) whose keys become the trainer's environment.
    #[arg(
        long,
        env = "RECSYS_TRAINER_CONFIG_MAP",
        default_value = "recsys-config"
    )]
    pub trainer_config_map: Option<String>,

    /// Secret (in the BatchJob's namespace) whose keys become the trainer's environment.
    #[arg(long, env = "RECSYS_TRAINER_SECRET", default_value = "recsys-secrets")]
    pub trainer_secret: Option<String>,

    /// Node selector of trainer pods, as `key=value[,key=value…]`.
    #[arg(long, env = "RECSYS_TRAINER_NODE_SELECTOR", value_parser = parse_node_selector, default_value = "")]
    pub trainer_node_selector: NodeSelector,

    /// Tolerations of trainer pods, as a JSON list of Kubernetes tolerations, for example
    /// `[{"key":"batch","operator":"Exists","effect":"NoSchedule"}]`.
    #[arg(long, env = "RECSYS_TRAINER_TOLERATIONS", value_parser = parse_tolerations, default_value = "[]")]
    pub trainer_tolerations: Tolerations,

    /// Default container image of the scorer pods a ModelDeployment owns (its
    /// `spec.scorer.image` overrides it). They read the same ConfigMap and Secret as the
    /// trainer (`--trainer-config-map`, `--trainer-secret`) for the stores.
    #[arg(long, env = "RECSYS_SCORER_IMAGE", default_value = concat!("ghcr.io/recsys-io/recsys-scorer:", env!("CARGO_PKG_VERSION")))]
    pub scorer_image: String,

    /// Node selector of scorer pods, as `key=value,key=value`.
    #[arg(long, env = "RECSYS_SCORER_NODE_SELECTOR", value_parser = parse_node_selector, default_value = "")]
    pub scorer_node_selector: NodeSelector,

    /// Tolerations of scorer pods, as a JSON list of Kubernetes tolerations.
    #[arg(long, env = "RECSYS_SCORER_TOLERATIONS", value_parser = parse_tolerations, default_value = "[]")]
    pub scorer_tolerations: Tolerations,

    /// Secret (in each ModelDeployment's namespace) of the scorer's client tokens, for
    /// ModelDeployments without `spec.scorer.auth`: one key per client, its bearer token as
    /// the value. Empty leaves those scorers unauthenticated.
    #[arg(long, env = "RECSYS_SCORER_AUTH_SECRET", default_value = "")]
    pub scorer_auth_secret: String,

    /// Postgres URL of the feature registry, for example `postgres://recsys@db:5432/recsys`.
    /// Every valid FeatureDefinition version is recorded there, and its status reports the
    /// registration and freshness. Without it definitions are validated only. The operator
    /// connects on first use and runs the registry's migrations once.
    #[arg(long, env = "RECSYS_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Largest number of pooled feature registry connections.
    #[arg(
        long,
        env = "RECSYS_DATABASE_MAX_CONNECTIONS",
        default_value_t = 4,
        value_parser = clap::value_parser!(u32).range(1..=100)
    )]
    pub database_max_connections: u32,

    /// How often a registered FeatureDefinition's last materialization and freshness are
    /// re-read from the registry (sooner when its values turn stale before then), for example
    /// `5m` or `30s`.
    #[arg(
        long,
        env = "RECSYS_REGISTRY_REFRESH_INTERVAL",
        default_value = "5m",
        value_parser = parse_interval
    )]
    pub registry_refresh_interval: std::time::Duration,
}

/// Labels a pod must be scheduled by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSelector(pub BTreeMap<String, String>);

/// Tolerations of a pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tolerations(pub Vec<Toleration>);

/// Reads `key=value[,key=value…]` (empty: no selector).
fn parse_node_selector(s: &str) -> Result<NodeSelector, String> {
    let mut map = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        if k.is_empty() {
            return Err(format!("{pair:?} has an empty key"));
        }
        map.insert(k.to_owned(), v.to_owned());
    }
    Ok(NodeSelector(map))
}

/// Reads a JSON list of tolerations.
fn parse_tolerations(s: &str) -> Result<Tolerations, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(Tolerations::default());
    }
    serde_json::from_str(s)
        .map(Tolerations)
        .map_err(|e| format!("not a JSON list of tolerations: {e}"))
}

/// Reads a duration such as `30s` or `5m` (the CRDs' format), at least one second.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = recsys_crds::Duration::from(s)
        .to_std()
        .map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!("{s:?} is shorter than one second"));
    }
    Ok(d)
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "recsys-operator".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn kubebuilder_flag_names_parse() {
        let a = Args::try_parse_from([
            "recsys-operator",
            "--metrics-bind-address=127.0.0.1:9090",
            "--health-probe-bind-address=127.0.0.1:9091",
            "--leader-elect",
        ])
        .expect("parse");
        assert!(a.leader_elect);
        assert_eq!(a.metrics_bind_address.port(), 9090);
        assert_eq!(a.registry_refresh_interval.as_secs(), 300);
    }

    #[test]
    fn trainer_placement_parses_and_bad_values_say_why() {
        let a = Args::try_parse_from([
            "recsys-operator",
            "--trainer-node-selector=pool=batch, disk=ssd",
            r#"--trainer-tolerations=[{"key":"batch","operator":"Exists","effect":"NoSchedule"}]"#,
        ])
        .expect("parse");
        assert_eq!(
            a.trainer_node_selector.0,
            BTreeMap::from([
                ("disk".into(), "ssd".into()),
                ("pool".into(), "batch".into())
            ])
        );
        assert_eq!(a.trainer_tolerations.0.len(), 1);
        assert_eq!(a.trainer_tolerations.0[0].key.as_deref(), Some("batch"));
        let d = Args::try_parse_from(["recsys-operator"]).expect("defaults");
        assert!(d.trainer_node_selector.0.is_empty() && d.trainer_tolerations.0.is_empty());
        for (arg, why) in [
            ("--trainer-node-selector=pool", "is not key=value"),
            (
                "--trainer-tolerations={\"key\":1}",
                "not a JSON list of tolerations",
            ),
        ] {
            let err = Args::try_parse_from(["recsys-operator", arg])
                .expect_err("must refuse")
                .to_string();
            assert!(err.contains(why), "{arg}: {err}");
        }
    }

    #[test]
    fn registry_options_parse_and_bad_intervals_say_why() {
        let a = Args::try_parse_from([
            "recsys-operator",
            "--database-url=postgres://recsys:secret@db:5432/recsys",
            "--registry-refresh-interval=1m30s",
        ])
        .expect("parse");
        assert_eq!(
            a.database_url.as_deref(),
            Some("postgres://recsys:secret@db:5432/recsys")
        );
        assert_eq!(a.registry_refresh_interval.as_secs(), 90);
        for (bad, why) in [("5", "expected"), ("500ms", "shorter than one second")] {
            let err = Args::try_parse_from([
                "recsys-operator",
                &format!("--registry-refresh-interval={bad}"),
            ])
            .expect_err("must refuse")
            .to_string();
            assert!(
                err.contains("--registry-refresh-interval") && err.contains(why),
                "{err}"
            );
        }
    }
}
