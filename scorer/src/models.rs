//! The model versions the routing table names, loaded, verified and swapped in without
//! dropping a request.
//!
//! A [`ModelSnapshot`] is one immutable view: a routing table and every version it names,
//! loaded. Requests take the current snapshot (one atomic load) and keep it for their whole
//! life, so a swap never changes a model under a request. [`ModelManager::sync`] builds the
//! next snapshot off the request path:
//!
//! - every name in the table (a version or an alias such as `champion`) is resolved in the
//!   artifact registry; a version already loaded is reused, a new one is loaded with
//!   [`Registry::load`] (checksums, shapes, finite values) and prepared for serving;
//! - a version that fails to load is refused with its reason (logged, counted in
//!   `recsys_scorer_model_loads_total{outcome}`), and what served before keeps serving: a
//!   failed stable keeps the previous snapshot's stable of that model; a failed canary or
//!   shadow is dropped from the snapshot (its users are served by stable) until it loads;
//! - only then is the new snapshot published.
//!
//! [`ModelManager::run`] syncs when the routing table changes and every `interval` (aliases
//! move when a model is promoted or rolled back; failed loads are retried).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use recsys_core::artifacts::Registry;
use recsys_core::cf::serving::ServingModel;
use recsys_core::serving::experiment::Segment;
use recsys_core::serving::routing::{RoutingSource, RoutingTable, Variant};
use serde::Serialize;
use tracing::{info, warn};

/// Labels of load outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadLabels {
    model: String,
    outcome: String,
}

/// Metrics of model loading.
#[derive(Clone, Debug, Default)]
pub struct ModelMetrics {
    loads: Family<LoadLabels, Counter>,
    loaded: Gauge,
    missing: Gauge,
}

impl ModelMetrics {
    /// Registers the metrics under `registry` (prefix added by the caller).
    pub fn register(&self, registry: &mut MetricsRegistry) {
        registry.register(
            "model_loads",
            "Model version loads by model and outcome (ok, or the error kind)",
            self.loads.clone(),
        );
        registry.register(
            "models_loaded",
            "Model versions loaded in memory",
            self.loaded.clone(),
        );
        registry.register(
            "models_missing",
            "Models of the routing table with no stable version loaded",
            self.missing.clone(),
        );
    }
}

/// The versions a request can use: one routing table and its models.
#[derive(Debug, Default)]
pub struct ModelSnapshot {
    /// The routing table; `None` before the first sync.
    pub table: Option<Arc<RoutingTable>>,
    /// `(model, name as the table gives it)` → the loaded version.
    models: HashMap<(String, String), Arc<ServingModel>>,
    /// Models whose stable version is not available, with the reason.
    pub missing: Vec<(String, String)>,
    /// Versions refused in the last sync: `(model, name, reason)`.
    pub refused: Vec<(String, String, String)>,
}

/// What serves one request.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The model version.
    pub model: Arc<ServingModel>,
    /// The variant the user is on (canary users fall back to stable while the canary is not
    /// loaded).
    pub variant: Variant,
    /// The user's bucket (0–9,999); `None` for anonymous requests.
    pub bucket: Option<u16>,
    /// The shadow version, when there is one and it is loaded.
    pub shadow: Option<Arc<ServingModel>>,
    /// The experiment the model's route runs (a canary taking users), if any.
    pub segment: Option<Segment>,
}

/// Why a model cannot serve a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The routing table does not name the model.
    #[error("no model {0:?} in the routing table")]
    UnknownModel(String),
    /// The model's stable version is not loaded.
    #[error("model {model:?} is not loaded: {reason}")]
    NotLoaded {
        /// The model.
        model: String,
        /// Why.
        reason: String,
    },
}

impl ModelSnapshot {
    /// The version that serves `user_id` for `model`.
    pub fn resolve(&self, model: &str, user_id: Option<&str>) -> Result<Resolved, ResolveError> {
        let table = self.table.as_ref().ok_or_else(|| ResolveError::NotLoaded {
            model: model.to_owned(),
            reason: "no routing table is loaded yet".into(),
        })?;
        let route = table
            .route(model)
            .ok_or_else(|| ResolveError::UnknownModel(model.to_owned()))?;
        let a = route.assign(user_id);
        let get = |name: &str| self.models.get(&(model.to_owned(), name.to_owned()));
        let stable = get(route.stable()).ok_or_else(|| ResolveError::NotLoaded {
            model: model.to_owned(),
            reason: self
                .missing
                .iter()
                .find(|(m, _)| m == model)
                .map_or_else(|| "not loaded yet".to_owned(), |(_, r)| r.clone()),
        })?;
        let (model_version, variant) = match (a.variant, get(a.version)) {
            (Variant::Canary, Some(canary)) => (canary.clone(), Variant::Canary),
            _ => (stable.clone(), Variant::Stable),
        };
        Ok(Resolved {
            model: model_version,
            variant,
            bucket: a.bucket,
            shadow: route.shadow().and_then(get).cloned(),
            segment: Segment::of_route(route),
        })
    }

    /// Whether every model of the table has its stable version loaded.
    pub fn is_ready(&self) -> bool {
        self.table.is_some() && self.missing.is_empty()
    }

    /// What `GET /v1/status` reports: the table's revision, every loaded name, refusals and
    /// models without a stable version.
    pub fn report(&self) -> recsys_core::serving::fleet::ScorerStatus {
        use recsys_core::serving::fleet::{
            LoadedVersion, MissingModel, RefusedVersion, ScorerStatus,
        };
        let mut loaded: Vec<LoadedVersion> = self
            .models
            .iter()
            .map(|((model, name), m)| LoadedVersion {
                model: model.clone(),
                name: name.clone(),
                version: m.version().to_owned(),
                offline_ndcg: m.offline_ndcg(),
            })
            .collect();
        loaded.sort_by(|a, b| (&a.model, &a.name).cmp(&(&b.model, &b.name)));
        ScorerStatus {
            routing_revision: self.table.as_ref().map(|t| t.revision().to_owned()),
            loaded,
            refused: self
                .refused
                .iter()
                .map(|(model, name, reason)| RefusedVersion {
                    model: model.clone(),
                    name: name.clone(),
                    reason: reason.clone(),
                })
                .collect(),
            missing: self
                .missing
                .iter()
                .map(|(model, reason)| MissingModel {
                    model: model.clone(),
                    reason: reason.clone(),
                })
                .collect(),
        }
    }

    /// Loaded versions, deduplicated, as `(model, version)`.
    pub fn loaded(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .models
            .values()
            .map(|m| (m.name().to_owned(), m.version().to_owned()))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// What a sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    /// Versions loaded from the store.
    pub loaded: Vec<String>,
    /// Versions reused from the previous snapshot.
    pub reused: usize,
    /// Versions refused, with the reason.
    pub refused: Vec<String>,
    /// Whether a new snapshot was published.
    pub published: bool,
}

/// Loads the versions the routing table names and publishes snapshots.
pub struct ModelManager {
    registry: Registry,
    routing: Arc<dyn RoutingSource>,
    current: ArcSwap<ModelSnapshot>,
    metrics: ModelMetrics,
}

impl std::fmt::Debug for ModelManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelManager")
            .field("routing", &self.routing)
            .finish_non_exhaustive()
    }
}

impl ModelManager {
    /// A manager with nothing loaded yet.
    pub fn new(registry: Registry, routing: Arc<dyn RoutingSource>, metrics: ModelMetrics) -> Self {
        Self {
            registry,
            routing,
            current: ArcSwap::from_pointee(ModelSnapshot::default()),
            metrics,
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<ModelSnapshot> {
        self.current.load_full()
    }

    async fn load(&self, model: &str, name: &str) -> Result<Arc<ServingModel>, String> {
        let started = Instant::now();
        let loaded = self
            .registry
            .load(model, name)
            .await
            .map_err(|e| (e.kind(), e.to_string()));
        let result = loaded.and_then(|l| {
            ServingModel::new(model, l)
                .map(Arc::new)
                .map_err(|e| ("Unusable", e.to_string()))
        });
        let outcome = match &result {
            Ok(_) => "ok",
            Err((kind, _)) => kind,
        };
        self.metrics
            .loads
            .get_or_create(&LoadLabels {
                model: model.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        match result {
            Ok(m) => {
                info!(
                    model,
                    name,
                    version = m.version(),
                    items = m.items(),
                    users = m.users(),
                    factors = m.factors(),
                    seconds = started.elapsed().as_secs_f64(),
                    "model loaded"
                );
                Ok(m)
            }
            Err((_, reason)) => {
                warn!(model, name, %reason, "model refused; what served before keeps serving");
                Err(reason)
            }
        }
    }

    /// Builds and publishes the snapshot of the current routing table.
    pub async fn sync(&self) -> SyncReport {
        let table = self.routing.current();
        let previous = self.current.load_full();
        let mut by_version: HashMap<(String, String), Arc<ServingModel>> = previous
            .models
            .values()
            .map(|m| ((m.name().to_owned(), m.version().to_owned()), m.clone()))
            .collect();
        let mut report = SyncReport::default();
        let mut models = HashMap::new();
        let mut missing = vec![];
        let mut refused = vec![];
        for route in table.routes() {
            let model = route.model();
            // One read of the model's index resolves every name the route gives.
            let index = self.registry.index(model).await.map_err(|e| e.to_string());
            for name in route.versions() {
                let resolved = index.as_ref().map_err(Clone::clone).and_then(|index| {
                    index
                        .resolve(name)
                        .map(|entry| entry.version.clone())
                        .ok_or_else(|| {
                            format!(
                                "model {model} has no version or alias {name:?} in its registry"
                            )
                        })
                });
                let got = match resolved {
                    Ok(version) => match by_version.get(&(model.to_owned(), version.clone())) {
                        Some(m) => {
                            report.reused += 1;
                            Ok(m.clone())
                        }
                        None => match self.load(model, &version).await {
                            Ok(m) => {
                                report.loaded.push(format!("{model}@{version}"));
                                by_version.insert((model.to_owned(), version), m.clone());
                                Ok(m)
                            }
                            Err(reason) => Err(reason),
                        },
                    },
                    Err(reason) => Err(reason),
                };
                match got {
                    Ok(m) => {
                        models.insert((model.to_owned(), name.to_owned()), m);
                    }
                    Err(reason) => {
                        report.refused.push(format!("{model}@{name}: {reason}"));
                        refused.push((model.to_owned(), name.to_owned(), reason.clone()));
                        if name == route.stable() {
                            // Keep serving what served this model before, if anything.
                            let before = previous.table.as_ref().and_then(|t| {
                                let r = t.route(model)?;
                                previous
                                    .models
                                    .get(&(model.to_owned(), r.stable().to_owned()))
                            });
                            match before {
                                Some(m) => {
                                    warn!(
                                        model,
                                        name,
                                        kept = m.version(),
                                        "stable refused; the previous stable keeps serving"
                                    );
                                    models.insert((model.to_owned(), name.to_owned()), m.clone());
                                }
                                None => missing.push((model.to_owned(), reason)),
                            }
                        }
                    }
                }
            }
        }
        let snapshot = ModelSnapshot {
            table: Some(table),
            models,
            missing,
            refused,
        };
        self.metrics.loaded.set(snapshot.loaded().len() as i64);
        self.metrics.missing.set(snapshot.missing.len() as i64);
        self.current.store(Arc::new(snapshot));
        report.published = true;
        report
    }

    /// Syncs now, then whenever the routing table changes and every `interval`.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut changes = self.routing.subscribe();
        loop {
            let report = self.sync().await;
            if !report.loaded.is_empty() || !report.refused.is_empty() {
                info!(loaded = ?report.loaded, refused = ?report.refused, reused = report.reused, "models synced");
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The source is gone: keep what is loaded, retry on the interval.
                        tokio::time::sleep(interval).await;
                    }
                }
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use recsys_core::artifacts::{LocalDirStore, ManifestInput};
    use recsys_core::cf::als::AlsModel;
    use recsys_core::cf::interactions::IdMap;
    use recsys_core::serving::routing::{RoutingFormat, StaticRoutingSource};

    /// A model whose items all score `level` for every user, so a test can tell versions
    /// apart by score.
    fn factors(level: f32) -> AlsModel {
        AlsModel {
            user_factors: Array2::from_elem((20, 4), 0.5),
            item_factors: Array2::from_elem((10, 4), level / 2.0),
            regularization: 0.1,
        }
    }

    async fn publish(registry: &Registry, version: &str, level: f32) {
        let users = IdMap::from_ids((0..20).map(|u| format!("u{u}")).collect());
        let items = IdMap::from_ids((0..10).map(|i| format!("p{i}")).collect());
        registry
            .publish(
                "als",
                &factors(level),
                &users,
                &items,
                ManifestInput {
                    version: Some(version.into()),
                    ..ManifestInput::default()
                },
            )
            .await
            .expect("publish");
    }

    fn table(yaml: &str) -> RoutingTable {
        RoutingTable::parse(yaml, RoutingFormat::Yaml, "test").expect("table")
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        registry: Registry,
        source: Arc<StaticRoutingSource>,
        manager: Arc<ModelManager>,
        metrics: ModelMetrics,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::new(Arc::new(LocalDirStore::new(dir.path())));
        publish(&registry, "v1", 1.0).await;
        publish(&registry, "v2", 2.0).await;
        registry.promote("als", "v1").await.expect("promote");
        let source = Arc::new(StaticRoutingSource::champion("als").expect("source"));
        let metrics = ModelMetrics::default();
        let manager = Arc::new(ModelManager::new(
            registry.clone(),
            source.clone(),
            metrics.clone(),
        ));
        Fixture {
            _dir: dir,
            registry,
            source,
            manager,
            metrics,
        }
    }

    fn score(r: &Resolved) -> f32 {
        let u = r.model.user_factors("u1").expect("user");
        r.model.scores(u, &[0])[0]
    }

    #[tokio::test]
    async fn the_champion_serves_and_a_canary_takes_its_share() {
        let f = fixture().await;
        assert!(
            !f.manager.snapshot().is_ready(),
            "nothing before the first sync"
        );
        let report = f.manager.sync().await;
        assert_eq!(report.loaded, ["als@v1"]);
        let snap = f.manager.snapshot();
        assert!(snap.is_ready());
        let r = snap.resolve("als", Some("u1")).expect("resolve");
        assert_eq!((r.model.version(), r.variant), ("v1", Variant::Stable));
        assert_eq!(
            snap.resolve("nope", Some("u1")).expect_err("unknown"),
            ResolveError::UnknownModel("nope".into())
        );

        f.source.replace(table(
            "formatVersion: 1\nmodels:\n  als:\n    stable: champion\n    canary: {version: v2, weight: 50}\n    shadow: v2\n",
        ));
        let report = f.manager.sync().await;
        assert_eq!((report.loaded.len(), report.reused), (1, 1), "{report:?}");
        let snap = f.manager.snapshot();
        let mut canary = 0;
        for u in 0..1000 {
            let r = snap
                .resolve("als", Some(&format!("user-{u}")))
                .expect("resolve");
            assert_eq!(r.shadow.as_ref().map(|s| s.version()), Some("v2"));
            if r.variant == Variant::Canary {
                canary += 1;
                assert_eq!(r.model.version(), "v2");
            }
            // Sticky: the same user gets the same answer again.
            let again = snap
                .resolve("als", Some(&format!("user-{u}")))
                .expect("again");
            assert_eq!(again.variant, r.variant);
        }
        assert!(
            (400..600).contains(&canary),
            "{canary} of 1000 on a 50% canary"
        );
        // Anonymous requests go to stable.
        let anon = snap.resolve("als", None).expect("anonymous");
        assert_eq!(anon.variant, Variant::Stable);
    }

    #[tokio::test]
    async fn the_status_report_names_what_is_loaded_and_what_was_refused() {
        let f = fixture().await;
        assert_eq!(
            f.manager.snapshot().report(),
            Default::default(),
            "nothing before the first sync"
        );
        f.source.replace(table(
            "formatVersion: 1\nmodels:\n  als:\n    stable: v1\n    canary: {version: v2, weight: 0}\n    shadow: v9\n",
        ));
        f.manager.sync().await;
        let report = f.manager.snapshot().report();
        assert!(
            report
                .routing_revision
                .as_deref()
                .is_some_and(|r| r.starts_with("sha256:"))
        );
        let loaded: Vec<(&str, &str)> = report
            .loaded
            .iter()
            .map(|l| (l.name.as_str(), l.version.as_str()))
            .collect();
        assert_eq!(loaded, [("v1", "v1"), ("v2", "v2")], "{report:?}");
        assert!(
            report.has("als", "v2"),
            "a weight-0 canary is loaded ahead of traffic"
        );
        let why = report.refusal("als", "v9").expect("v9 refused");
        assert!(why.contains("v9"), "{why}");
        assert!(report.missing.is_empty());
    }

    #[tokio::test]
    async fn a_corrupt_version_is_refused_and_the_previous_stable_keeps_serving() {
        let f = fixture().await;
        f.manager.sync().await;
        publish(&f.registry, "v3", 3.0).await;
        // Corrupt v3's item factors after publishing: the checksum no longer matches.
        let store = f.registry.store().clone();
        let key = "models/als/v3/item_factors.f32";
        let mut bad = store.get(key).await.expect("get").expect("exists");
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        store.put(key, bad).await.expect("put");
        f.registry.promote("als", "v3").await.expect("promote");

        let report = f.manager.sync().await;
        assert_eq!(report.refused.len(), 1, "{report:?}");
        assert!(
            report.refused[0].contains("v3") || report.refused[0].contains("champion"),
            "{report:?}"
        );
        let snap = f.manager.snapshot();
        let r = snap.resolve("als", Some("u1")).expect("still serving");
        assert_eq!(
            r.model.version(),
            "v1",
            "the previous champion keeps serving"
        );
        assert!((score(&r) - 1.0).abs() < 1e-6);
        let mut text = String::new();
        let mut reg = MetricsRegistry::default();
        f.metrics.register(&mut reg);
        prometheus_client::encoding::text::encode(&mut text, &reg).expect("encode");
        assert!(
            text.contains("model_loads_total{model=\"als\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.lines().any(
                |l| l.starts_with("model_loads_total{model=\"als\",outcome=\"")
                    && !l.contains("\"ok\"")
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn swapping_models_under_load_loses_no_request() {
        let f = fixture().await;
        f.manager.sync().await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = vec![];
        for t in 0..4 {
            let manager = f.manager.clone();
            let stop = stop.clone();
            readers.push(tokio::spawn(async move {
                let mut served = 0_u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let snap = manager.snapshot();
                    let r = snap
                        .resolve("als", Some(&format!("u{}", served % 20 + t)))
                        .expect("every request is served");
                    let s = score(&r);
                    assert!(s == 1.0 || s == 2.0, "{s}");
                    served += 1;
                    tokio::task::yield_now().await;
                }
                served
            }));
        }
        for i in 0..10 {
            let v = if i % 2 == 0 { "v2" } else { "v1" };
            f.registry.promote("als", v).await.expect("promote");
            f.manager.sync().await;
            assert_eq!(
                f.manager
                    .snapshot()
                    .resolve("als", Some("u1"))
                    .expect("resolve")
                    .model
                    .version(),
                v
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = 0;
        for r in readers {
            total += r.await.expect("reader");
        }
        assert!(total > 0);
    }
}
