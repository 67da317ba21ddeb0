//! Leader election through a `coordination.k8s.io/v1` Lease: of several replicas only the
//! holder runs the controllers; the others wait, and take over within the lease duration when
//! the holder goes away.

use std::future::Future;
use std::sync::Arc;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Seconds a lease stays valid after its last renewal.
const LEASE_DURATION_SECONDS: u64 = 15;
/// Seconds before expiry at which the holder renews.
const LEASE_GRACE_SECONDS: u64 = 5;

/// Where the Lease lives and who we are.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (holderIdentity).
    pub identity: String,
}

/// Why leader election stopped.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The lease manager could not be built or failed.
    #[error("lease {name} in {namespace}: {source}")]
    Lease {
        /// Lease name.
        name: String,
        /// Lease namespace.
        namespace: String,
        /// The lease manager's error.
        source: kube_lease_manager::LeaseManagerError,
    },
}

/// Runs `work` while this replica holds the Lease; `work` gets a receiver that flips to true
/// when leadership is lost or shutdown is requested, and must return soon after.
pub async fn run_when_leader<F, Fut>(
    client: Client,
    config: LeaseConfig,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    work: F,
) -> Result<(), LeaderError>
where
    F: Fn(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()>,
{
    let err = |source| LeaderError::Lease {
        name: config.name.clone(),
        namespace: config.namespace.clone(),
        source,
    };
    let manager = LeaseManagerBuilder::new(client, &config.name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(LEASE_DURATION_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .build()
        .await
        .map_err(err)?;
    let (mut leading, task) = manager.watch().await;
    info!(lease = %config.name, identity = %config.identity, "waiting for leadership");
    loop {
        tokio::select! {
            changed = leading.wait_for(|l| *l) => {
                if changed.is_err() { break; }
            }
            _ = shutdown.wait_for(|s| *s) => break,
        }
        info!(identity = %config.identity, "acquired leadership; starting controllers");
        metrics.leader.set(1);
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopper = {
            let mut leading = leading.clone();
            let mut shutdown = shutdown.clone();
            async move {
                tokio::select! {
                    _ = leading.wait_for(|l| !*l) => warn!("lost leadership; stopping controllers"),
                    _ = shutdown.wait_for(|s| *s) => {},
                }
                let _ = stop_tx.send(true);
            }
        };
        tokio::join!(work(stop_rx), stopper);
        metrics.leader.set(0);
        if *shutdown.borrow() {
            break;
        }
    }
    // Dropping the receiver ends the lease task, which releases the lease.
    drop(leading);
    match task.await {
        Ok(Ok(manager)) => {
            if let Err(e) = manager.release().await {
                warn!(error = %e, "could not release the lease");
            }
        }
        Ok(Err(e)) => return Err(err(e)),
        Err(e) => warn!(error = %e, "lease task panicked"),
    }
    Ok(())
}
