//! The operator's connection to the feature registry (`--database-url`).
//!
//! - **Lazy.** Nothing connects at start: a Postgres that is down then delays nothing but the
//!   recording of FeatureDefinitions; the other kinds reconcile as usual.
//! - **Migrated once.** The first successful connection runs the registry's migrations
//!   ([`PostgresFeatureRegistry::migrate`]); later calls reuse its pool, which reconnects by
//!   itself after an outage.
//! - **Backoff.** A failed connection attempt answers for the next ones for a moment, so that
//!   many definitions reconciled at once do not each wait out a connection timeout, and each
//!   definition retries with its own exponential backoff while the registry stays unavailable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use recsys_core::features::registry::{FeatureRegistry, PostgresFeatureRegistry, RegistryError};
use recsys_core::stores::{self, PostgresArgs, StoreError};
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tracing::info;

use crate::metrics::Metrics;

/// First retry delay of a definition while the registry is unavailable; doubled per failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How long a failed connection attempt answers for the following ones.
const FAILURE_WINDOW: Duration = Duration::from_secs(2);

/// Why the registry could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// Postgres could not be reached.
    #[error("cannot connect to the feature registry: {0}")]
    Connect(#[source] StoreError),
    /// The registry failed, or refused the request.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The registry did not answer in time.
    #[error("the feature registry did not answer within {0:?}")]
    Timeout(Duration),
    /// A connection attempt failed moments ago and is not retried yet; the message is that
    /// attempt's (so conditions quoting it do not change from one reconcile to the next).
    #[error("{message}")]
    RecentFailure {
        /// What the attempt failed with.
        message: String,
    },
}

impl AccessError {
    /// Stable label for metrics and condition reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) | Self::RecentFailure { .. } => "RegistryConnect",
            Self::Timeout(_) => "RegistryTimeout",
            Self::Registry(e) => e.kind(),
        }
    }
}

/// Opens a registry: connects and migrates.
pub type Connector = Box<
    dyn Fn() -> BoxFuture<'static, Result<Arc<dyn FeatureRegistry>, AccessError>> + Send + Sync,
>;

/// A feature registry connected on first use, with per-object retry backoff.
pub struct RegistryClient {
    description: String,
    connect: Connector,
    metrics: Arc<Metrics>,
    registry: OnceCell<Arc<dyn FeatureRegistry>>,
    failure_window: Duration,
    last_failure: Mutex<Option<(Instant, String)>>,
    failures: Mutex<HashMap<String, u32>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent even if a holder panicked: every update is one insert.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RegistryClient {
    /// The Postgres registry at `args.url`; nothing connects until [`RegistryClient::get`].
    pub fn postgres(args: PostgresArgs, metrics: Arc<Metrics>) -> Self {
        let description = stores::redact_url(&args.url);
        let args = Arc::new(args);
        Self::new(
            description,
            metrics,
            Box::new(move || {
                let args = args.clone();
                Box::pin(async move {
                    let pool = stores::postgres(&args)
                        .await
                        .map_err(AccessError::Connect)?;
                    let registry = PostgresFeatureRegistry::new(pool);
                    registry.migrate().await?;
                    Ok(Arc::new(registry) as Arc<dyn FeatureRegistry>)
                })
            }),
        )
    }

    /// A registry opened by `connect` on first use; `description` names it in logs (no secrets).
    pub fn new(description: impl Into<String>, metrics: Arc<Metrics>, connect: Connector) -> Self {
        Self {
            description: description.into(),
            connect,
            metrics,
            registry: OnceCell::new(),
            failure_window: FAILURE_WINDOW,
            last_failure: Mutex::new(None),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Sets how long a failed connection attempt answers for the following ones.
    pub fn with_failure_window(mut self, window: Duration) -> Self {
        self.failure_window = window;
        self
    }

    /// Where the registry is, without credentials.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The registry, connected and migrated on the first call that succeeds.
    pub async fn get(&self) -> Result<Arc<dyn FeatureRegistry>, AccessError> {
        let registry = self
            .registry
            .get_or_try_init(|| async {
                let recent = lock(&self.last_failure).clone();
                if let Some((at, message)) = recent
                    && at.elapsed() < self.failure_window
                {
                    return Err(AccessError::RecentFailure { message });
                }
                match (self.connect)().await {
                    Ok(registry) => {
                        self.metrics.registry("connect", "ok");
                        *lock(&self.last_failure) = None;
                        info!(registry = %self.description, "feature registry connected and migrated");
                        Ok(registry)
                    }
                    Err(e) => {
                        // Logged once, by the caller that reports it in a status.
                        self.metrics.registry("connect", e.kind());
                        *lock(&self.last_failure) = Some((Instant::now(), e.to_string()));
                        Err(e)
                    }
                }
            })
            .await?;
        Ok(registry.clone())
    }

    /// Records a failure for `key` (an object) and returns how long it waits before retrying:
    /// [`BACKOFF_BASE`] doubled per consecutive failure, at most [`BACKOFF_MAX`].
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = lock(&self.failures);
        let n = failures.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        backoff_delay(*n)
    }

    /// Forgets the failures of `key` after a success (or its deletion).
    pub fn reset(&self, key: &str) {
        lock(&self.failures).remove(key);
    }
}

/// The delay after `failures` consecutive failures.
pub fn backoff_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << doublings).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use recsys_core::features::registry::InProcessFeatureRegistry;

    use super::*;

    /// A connector that fails `fail_first` times, then opens an in-process registry.
    fn flaky(fail_first: usize, calls: Arc<AtomicUsize>) -> Connector {
        Box::new(move || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n < fail_first {
                    Err(AccessError::Registry(RegistryError::Io {
                        path: "/unreachable".into(),
                        source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                    }))
                } else {
                    Ok(Arc::new(InProcessFeatureRegistry::new()) as Arc<dyn FeatureRegistry>)
                }
            })
        })
    }

    #[tokio::test]
    async fn connects_lazily_and_retries_after_a_failure() {
        let calls = Arc::new(AtomicUsize::new(0));
        let metrics = Arc::new(Metrics::default());
        let client = RegistryClient::new("test", metrics.clone(), flaky(1, calls.clone()));
        assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing connects up front");

        let err = client.get().await.err().expect("first attempt fails");
        assert_eq!(err.kind(), "RegistryIo");
        // Moments later the failure answers without another attempt.
        let err = client.get().await.err().expect("remembered");
        assert!(matches!(err, AccessError::RecentFailure { .. }), "{err}");
        assert!(err.to_string().contains("refused"), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let client = client.with_failure_window(Duration::ZERO);
        let first = client.get().await.expect("second attempt connects");
        let again = client.get().await.expect("cached");
        assert!(Arc::ptr_eq(&first, &again), "connected once");
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let text = metrics.encode().expect("encode");
        assert!(
            text.contains("operation=\"connect\",outcome=\"RegistryIo\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("operation=\"connect\",outcome=\"ok\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn backoff_doubles_per_object_and_resets() {
        let client = RegistryClient::new(
            "test",
            Arc::new(Metrics::default()),
            flaky(0, Arc::default()),
        );
        let delays: Vec<u64> = (0..10).map(|_| client.backoff("a").as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(client.backoff("b"), BACKOFF_BASE, "per object");
        client.reset("a");
        assert_eq!(client.backoff("a"), BACKOFF_BASE);
        assert_eq!(backoff_delay(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn postgres_urls_are_described_without_passwords() {
        let client = RegistryClient::postgres(
            PostgresArgs {
                url: "postgres://recsys:secret@db:5432/recsys".into(),
                max_connections: 2,
            },
            Arc::new(Metrics::default()),
        );
        assert_eq!(client.description(), "postgres://recsys:***@db:5432/recsys");
    }
}
