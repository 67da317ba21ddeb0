//! Command-line options; every one is also an environment variable.

use std::net::SocketAddr;

use clap::Parser;
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
    }
}
