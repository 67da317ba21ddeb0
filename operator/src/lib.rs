//! The recsys operator: kube-runtime controllers for `ModelDeployment`, `BatchJob` and
//! `FeatureDefinition`, a probe and metrics server, leader election through a Lease, and the
//! feature registry (Postgres, optional) in which FeatureDefinitions are recorded.
//!
//! Each controller is a pipeline: read → validate (pure) → compute status (pure) → apply
//! status with server-side apply → publish Events for transitions. Only the first and the last
//! steps touch the API server, so the logic is unit-tested from YAML fixtures.

pub mod args;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod plugin;
pub mod registry;
pub mod server;

use std::sync::Arc;

pub use args::Args;
use kube::Client;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::server::Health;

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let Args {
        telemetry: _,
        metrics_bind_address,
        health_probe_bind_address,
        leader_elect,
        leader_election_id,
        leader_election_namespace,
        watch_namespace,
        identity,
        trainer_image,
        trainer_service_account,
        trainer_config_map,
        trainer_secret,
        trainer_node_selector,
        trainer_tolerations,
        scorer_image,
        scorer_node_selector,
        scorer_tolerations,
        scorer_auth_secret,
        database_url,
        database_max_connections,
        registry_refresh_interval,
    } = args;
    let scorer = controller::scorer::ScorerSettings {
        image: scorer_image,
        config_map: trainer_config_map.clone(),
        secret: trainer_secret.clone(),
        node_selector: scorer_node_selector.0,
        tolerations: scorer_tolerations.0,
        auth_secret: (!scorer_auth_secret.is_empty()).then_some(scorer_auth_secret),
    };
    let trainer = controller::batch_job::TrainerSettings {
        image: trainer_image,
        service_account: trainer_service_account,
        config_map: trainer_config_map,
        secret: trainer_secret,
        node_selector: trainer_node_selector.0,
        tolerations: trainer_tolerations.0,
    };

    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let health = Health::default();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let servers = tokio::spawn(server::serve(
        metrics_bind_address,
        health_probe_bind_address,
        metrics.clone(),
        health.clone(),
        shutdown_rx.clone(),
    ));

    controller::check_crds_installed(&client).await?;
    health.set_ready(true);

    let registry = match database_url {
        Some(url) => {
            let client = registry::RegistryClient::postgres(
                recsys_core::stores::PostgresArgs {
                    url,
                    max_connections: database_max_connections,
                },
                metrics.clone(),
            );
            info!(registry = %client.description(), "FeatureDefinitions are recorded in the feature registry (connected on first use)");
            Some(Arc::new(client))
        }
        None => {
            info!(
                "no --database-url: FeatureDefinitions are validated but not recorded in a feature registry"
            );
            None
        }
    };
    let features = controller::feature_definition::RegistrySettings {
        client: registry,
        refresh: registry_refresh_interval,
    };

    let scope = controller::Scope::new(watch_namespace);
    let work = async {
        if leader_elect {
            let namespace = match leader_election_namespace {
                Some(ns) => ns,
                None => client.default_namespace().to_owned(),
            };
            leader::run_when_leader(
                client.clone(),
                leader::LeaseConfig {
                    name: leader_election_id,
                    namespace,
                    identity,
                },
                metrics.clone(),
                shutdown_rx.clone(),
                |stop| {
                    controller::run_all(
                        client.clone(),
                        scope.clone(),
                        trainer.clone(),
                        scorer.clone(),
                        features.clone(),
                        metrics.clone(),
                        stop,
                    )
                },
            )
            .await
        } else {
            metrics.leader.set(1);
            controller::run_all(
                client.clone(),
                scope.clone(),
                trainer.clone(),
                scorer.clone(),
                features.clone(),
                metrics.clone(),
                shutdown_rx.clone(),
            )
            .await;
            Ok(())
        }
    };

    let shutdown_tx = Arc::new(shutdown_tx);
    let on_signal = {
        let tx = shutdown_tx.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            info!("shutdown requested");
            let _ = tx.send(true);
        })
    };
    // Controllers stop gracefully once the shutdown channel flips (in-flight reconciles finish).
    let result = work.await;
    let _ = shutdown_tx.send(true);
    on_signal.abort();
    health.set_ready(false);
    match servers.await {
        Ok(result) => result?,
        Err(e) => warn!(error = %e, "probe server task failed"),
    }
    Ok(result?)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
