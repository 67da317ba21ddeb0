//! Feature serving: the feature catalog (from the registry, refreshed in the background), reads
//! through a [`FeatureReader`] (online store, offline fallback, time budget), and discovery.
//! The HTTP routes over it are in [`routes`]; the JSON shapes in
//! `crate::features::http`.
//!
//! - **Catalog.** [`FeatureService::refresh`] lists the registry and keeps, for every major
//!   version not retired, the version the registry picks for it when that is `online`, with
//!   its TTL and entity ([`FeatureCatalog::from_registry`]). A failed refresh is logged (once
//!   per streak of failures), counted, and the last catalog keeps serving. Until a first
//!   catalog is loaded, reads answer 503.
//! - **Warming.** With the in-process online store, each refresh that brings a new catalog
//!   or a reloaded offline store copies the latest offline values into it
//!   ([`warm_from_offline`]), so values a local batch job wrote are served as online values.
//! - **Discovery** asks the registry for each request (within `registry_timeout`); when it
//!   does not answer, the answer comes from the last list of the registry, marked
//!   `"source": "cache"` with a warning.

pub mod http;
pub mod routes;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use crate::features::http::{
    ApiError, BatchResponse, FeatureCatalog, FeatureDetail, FeatureList, FeatureSummary, Source,
    check_entities, check_feature_name,
};
use recsys_core::features::offline::OfflineStore;
use recsys_core::features::online::{
    FeatureReader, OnlineStore, StoreOutcome, now_ms, warm_from_offline,
};
use recsys_core::features::registry::{FeatureRegistry, Query, RegisteredFeature, RegistryError};
use recsys_core::features::{EntityKey, EntityKind, FeatureRef, Freshness};

use crate::metrics::CatalogMetrics;

/// Why a catalog refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The registry did not answer in time.
    #[error("feature registry did not answer within {0:?}")]
    Timeout(Duration),
}

impl RefreshError {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Registry(e) => e.kind(),
            Self::Timeout(_) => "RegistryTimeout",
        }
    }
}

/// Settings of a [`FeatureService`].
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// Longest wait for the registry (a catalog refresh, a discovery request).
    pub registry_timeout: Duration,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            registry_timeout: Duration::from_secs(5),
        }
    }
}

/// The catalog in use and the registry list it was built from.
#[derive(Debug, Default)]
struct Snapshot {
    catalog: FeatureCatalog,
    records: Vec<RegisteredFeature>,
    /// When it was loaded; `None` until the first successful refresh.
    loaded_at_ms: Option<i64>,
}

/// How the catalog's refreshes are going, for `/readyz`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogStatus {
    /// Whether a catalog was ever loaded.
    pub loaded: bool,
    /// Feature versions served.
    pub features: usize,
    /// When the catalog was last loaded (ms since the epoch).
    pub loaded_at_ms: Option<i64>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// The last failure since the last success: `kind: message`.
    pub last_error: Option<String>,
}

/// How the online store's periodic statistics went, for `/readyz`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OnlineStatus {
    /// The last statistics error (`kind: message`), `None` after a success.
    pub last_error: Option<String>,
}

/// Warming of an in-process online store.
struct Warm {
    offline: Arc<dyn OfflineStore>,
    generation: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// The catalog and offline generation last warmed from.
    last: tokio::sync::Mutex<Option<(FeatureCatalog, u64)>>,
}

/// Feature serving and discovery over a reader and a registry.
pub struct FeatureService {
    reader: Arc<FeatureReader>,
    registry: Arc<dyn FeatureRegistry>,
    options: ServiceOptions,
    snapshot: RwLock<Arc<Snapshot>>,
    status: Mutex<CatalogStatus>,
    online_status: Mutex<OnlineStatus>,
    metrics: CatalogMetrics,
    warm: Option<Warm>,
    description: String,
}

impl std::fmt::Debug for FeatureService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureService")
            .field("reader", &self.reader)
            .field("options", &self.options)
            .field("status", &self.catalog_status())
            .finish_non_exhaustive()
    }
}

impl FeatureService {
    /// A service reading through `reader`, its catalog from `registry` (empty until
    /// [`FeatureService::refresh`] succeeds).
    pub fn new(
        reader: Arc<FeatureReader>,
        registry: Arc<dyn FeatureRegistry>,
        options: ServiceOptions,
    ) -> Self {
        Self {
            reader,
            registry,
            options,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            status: Mutex::new(CatalogStatus::default()),
            online_status: Mutex::new(OnlineStatus::default()),
            metrics: CatalogMetrics::default(),
            warm: None,
            description: String::new(),
        }
    }

    /// Warms the (in-process) online store from `offline` after each refresh that brings a
    /// new catalog or a new `generation` of the offline store.
    pub fn with_warming(
        mut self,
        offline: Arc<dyn OfflineStore>,
        generation: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Self {
        self.warm = Some(Warm {
            offline,
            generation,
            last: tokio::sync::Mutex::new(None),
        });
        self
    }

    /// A description of the stores, shown on `/readyz`.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// The description of the stores.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The reader.
    pub fn reader(&self) -> &Arc<FeatureReader> {
        &self.reader
    }

    /// The catalog's metrics (register them once: [`crate::metrics::Metrics::new`]).
    pub fn catalog_metrics(&self) -> &CatalogMetrics {
        &self.metrics
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The catalog in use.
    pub fn catalog(&self) -> FeatureCatalog {
        self.snapshot().catalog.clone()
    }

    /// Resolves a feature (`name`, `name@vN`) against the catalog in use, without copying it
    /// (the request path of recommendations).
    pub fn resolve(
        &self,
        spec: &str,
    ) -> Result<recsys_core::features::online::OnlineFeature, ApiError> {
        self.snapshot().catalog.resolve(spec)
    }

    /// How the catalog's refreshes are going.
    pub fn catalog_status(&self) -> CatalogStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How the online store's statistics went.
    pub fn online_status(&self) -> OnlineStatus {
        self.online_status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Loads the catalog from the registry; on failure the last catalog keeps serving.
    /// Returns the number of feature versions served.
    pub async fn refresh(&self) -> Result<usize, RefreshError> {
        let timeout = self.options.registry_timeout;
        let listed = match tokio::time::timeout(timeout, self.registry.list()).await {
            Ok(Ok(records)) => Ok(records),
            Ok(Err(e)) => Err(RefreshError::Registry(e)),
            Err(_) => Err(RefreshError::Timeout(timeout)),
        };
        let records = match listed {
            Ok(records) => records,
            Err(e) => {
                self.refresh_failed(&e);
                return Err(e);
            }
        };
        let catalog = FeatureCatalog::from_registry(&records);
        let n = catalog.len();
        let now = now_ms();
        let changed = self.snapshot().catalog != catalog;
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(Snapshot {
            catalog: catalog.clone(),
            records,
            loaded_at_ms: Some(now),
        });
        let recovered = {
            let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            let recovered = status.consecutive_failures > 0;
            *status = CatalogStatus {
                loaded: true,
                features: n,
                loaded_at_ms: Some(now),
                consecutive_failures: 0,
                last_error: None,
            };
            recovered
        };
        self.metrics.success(n, now);
        if recovered {
            tracing::info!(
                features = n,
                "feature registry answers again; catalog loaded"
            );
        } else if changed {
            tracing::info!(features = n, "feature catalog loaded");
        }
        self.warm_if_needed(&catalog).await;
        Ok(n)
    }

    fn refresh_failed(&self, e: &RefreshError) {
        self.metrics.failure(e.kind());
        let (first, serving) = {
            let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            status.consecutive_failures += 1;
            status.last_error = Some(format!("{}: {e}", e.kind()));
            (status.consecutive_failures == 1, status.features)
        };
        // Logged once per streak of failures; the metric counts every one.
        if first {
            tracing::warn!(
                error = %e,
                kind = e.kind(),
                serving_features = serving,
                "feature catalog refresh failed; the last catalog keeps serving"
            );
        } else {
            tracing::debug!(error = %e, "feature catalog refresh failed again");
        }
    }

    async fn warm_if_needed(&self, catalog: &FeatureCatalog) {
        let Some(warm) = &self.warm else { return };
        let mut last = warm.last.lock().await;
        let generation = (warm.generation)();
        if last
            .as_ref()
            .is_some_and(|(c, g)| c == catalog && *g == generation)
        {
            return;
        }
        let features: Vec<_> = catalog
            .iter()
            .filter_map(|(f, kind)| Some((f, kind?)))
            .collect();
        let report = warm_from_offline(
            self.reader.store().as_ref(),
            warm.offline.as_ref(),
            &features,
        )
        .await;
        for (feature, kind, message) in &report.failures {
            tracing::warn!(%feature, kind, message, "could not warm the online store");
        }
        tracing::info!(
            features = report.features,
            written = report.written.written,
            kept_newer = report.written.kept_newer,
            expired = report.written.expired,
            "online store warmed from the offline store"
        );
        // A failed feature is tried again at the next refresh.
        *last = report
            .failures
            .is_empty()
            .then(|| (catalog.clone(), generation));
    }

    /// Publishes the online store's keys and bytes (walks the keyspace: call it from a
    /// periodic task) and records whether the store answered.
    pub async fn refresh_online_stats(&self) {
        let result = self.reader.refresh_stats().await;
        let mut status = self
            .online_status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(_) => {
                if status.last_error.take().is_some() {
                    tracing::info!("online store statistics available again");
                }
            }
            Err(e) => {
                if status.last_error.is_none() {
                    tracing::warn!(error = %e, kind = e.kind(), "online store statistics failed");
                }
                status.last_error = Some(format!("{}: {e}", e.kind()));
            }
        }
    }

    /// Reads `features` (specs `name`, `name@vN`; `None`: every online feature of
    /// `default_kind`) for `entities`.
    pub async fn read(
        &self,
        entities: Vec<EntityKey>,
        features: Option<&[String]>,
        default_kind: Option<EntityKind>,
    ) -> Result<BatchResponse, ApiError> {
        check_entities(&entities)?;
        let snapshot = self.snapshot();
        if snapshot.loaded_at_ms.is_none() {
            let why = self
                .catalog_status()
                .last_error
                .unwrap_or_else(|| "not tried yet".into());
            return Err(ApiError::unavailable(
                "CatalogUnavailable",
                format!("the feature catalog has not been loaded from the registry yet ({why})"),
            ));
        }
        let catalog = &snapshot.catalog;
        let features = match (features, default_kind) {
            (Some(specs), _) => catalog.resolve_all(specs)?,
            (None, Some(kind)) => catalog.features_of(kind),
            (None, None) => catalog.resolve_all::<String>(&[])?,
        };
        catalog.check_kinds(&entities, &features)?;
        let batch = self.reader.read(&entities, &features).await?;
        if batch.store != StoreOutcome::Ok
            && batch.features() > 0
            && batch.count(Freshness::Missing) == batch.entities() * batch.features()
        {
            return Err(ApiError::unavailable(
                "FeaturesUnavailable",
                format!(
                    "the online store did not answer ({}) and the fallback had none of the {} values",
                    batch.store.as_str(),
                    batch.entities() * batch.features()
                ),
            ));
        }
        Ok(BatchResponse::new(&features, entities, batch).with_versions(catalog))
    }

    /// Discovery: the registered versions matching `query`.
    pub async fn search(&self, query: &Query) -> Result<FeatureList, ApiError> {
        let timeout = self.options.registry_timeout;
        let answer = tokio::time::timeout(timeout, self.registry.search(query)).await;
        let snapshot = self.snapshot();
        let (records, source, warning) = match answer {
            Ok(Ok(records)) => (records, Source::Registry, None),
            failed => {
                let why = registry_failure(failed.map(|r| r.map(|_| ())), timeout);
                let records = self.cached(&snapshot, &why)?;
                let matching = records
                    .iter()
                    .filter(|r| query.matches(r))
                    .cloned()
                    .collect();
                (
                    matching,
                    Source::Cache,
                    Some(cache_warning(&why, &snapshot)),
                )
            }
        };
        Ok(FeatureList {
            features: records
                .iter()
                .map(|r| FeatureSummary::new(r, &snapshot.catalog))
                .collect(),
            source,
            warning,
        })
    }

    /// Discovery: every version of feature `name`, its lifecycle and the last
    /// materialization of each major version.
    pub async fn describe(&self, name: &str) -> Result<FeatureDetail, ApiError> {
        check_feature_name(name)?;
        let timeout = self.options.registry_timeout;
        let answer = tokio::time::timeout(timeout, self.registry.versions(name)).await;
        let snapshot = self.snapshot();
        let (versions, source, mut warning) = match answer {
            Ok(Ok(versions)) => (versions, Source::Registry, None),
            failed => {
                let why = registry_failure(failed.map(|r| r.map(|_| ())), timeout);
                let records = self.cached(&snapshot, &why)?;
                let versions = records
                    .iter()
                    .filter(|r| r.spec.name == name)
                    .cloned()
                    .collect();
                (
                    versions,
                    Source::Cache,
                    Some(cache_warning(&why, &snapshot)),
                )
            }
        };
        if versions.is_empty() {
            return Err(ApiError::new(
                404,
                "FeatureNotFound",
                format!("no feature {name:?} is registered"),
            ));
        }
        let mut runs = BTreeMap::new();
        if source == Source::Registry {
            let mut majors: Vec<u64> = versions.iter().map(|r| r.major).collect();
            majors.dedup();
            let asks = majors.iter().map(|&m| {
                let f = FeatureRef::new(name, m);
                async move {
                    let got =
                        tokio::time::timeout(timeout, self.registry.last_materialization(&f)).await;
                    (m, got)
                }
            });
            for (major, got) in futures::future::join_all(asks).await {
                match got {
                    Ok(Ok(Some(run))) => {
                        runs.insert(major, run);
                    }
                    Ok(Ok(None)) => {}
                    failed => {
                        let why = registry_failure(failed.map(|r| r.map(|_| ())), timeout);
                        warning.get_or_insert(format!("last materialization unknown: {why}"));
                    }
                }
            }
        }
        Ok(FeatureDetail::new(
            name,
            &versions,
            &snapshot.catalog,
            &runs,
            source,
            warning,
        ))
    }

    /// The last registry list, or 503 when there is none.
    fn cached<'a>(
        &self,
        snapshot: &'a Snapshot,
        why: &str,
    ) -> Result<&'a [RegisteredFeature], ApiError> {
        tracing::debug!(
            error = why,
            "registry unavailable for discovery; answering from the cache"
        );
        if snapshot.loaded_at_ms.is_none() {
            return Err(ApiError::unavailable(
                "RegistryUnavailable",
                format!(
                    "the feature registry did not answer ({why}) and no copy of it is loaded yet"
                ),
            ));
        }
        Ok(&snapshot.records)
    }

    /// The online store.
    pub fn online_store(&self) -> &Arc<dyn OnlineStore> {
        self.reader.store()
    }
}

fn registry_failure(
    failed: Result<Result<(), RegistryError>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> String {
    match failed {
        Ok(Err(e)) => format!("{}: {e}", e.kind()),
        Err(_) => format!("RegistryTimeout: no answer within {timeout:?}"),
        Ok(Ok(())) => "no error".into(),
    }
}

fn cache_warning(why: &str, snapshot: &Snapshot) -> String {
    let age_s = snapshot
        .loaded_at_ms
        .map(|at| (now_ms() - at).max(0) / 1000)
        .unwrap_or_default();
    format!("the feature registry did not answer ({why}); this is its copy from {age_s} s ago")
}
