//! The stores behind the feature API, chosen by the options:
//!
//! | options | online store | offline store and registry |
//! | --- | --- | --- |
//! | neither `--redis-url` nor `--database-url` (local mode) | in-process, warmed from the offline store | in-process, persisted under `--data-dir` ([`LocalPaths`]) and reloaded when the files change |
//! | `--database-url` | in-process, warmed from Postgres | Postgres (`feature_values`, `feature_registry`) |
//! | `--redis-url` | Redis (`--redis-prefix`) | as above, by `--database-url` or local |
//!
//! Nothing here connects at start: Redis and Postgres connect on first use, so a scorer whose
//! dependencies are down starts, says so on `/readyz`, and serves what it can. Only settings
//! that can never work (a URL that does not parse, a bad prefix) fail the start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use recsys_core::features::offline::{
    InProcessOfflineStore, OfflineError, OfflineRow, OfflineStats, OfflineStore, PitOptions,
    PostgresOfflineStore, ReplaceSummary, WriteSummary,
};
use recsys_core::features::online::{
    InProcessOnlineStore, NearCacheOptions, OnlineError, OnlineStore, RedisOnlineStore,
    RedisOnlineStoreOptions,
};
use recsys_core::features::registry::{
    FeatureRegistry, FeatureSpec, InProcessFeatureRegistry, Materialization,
    PostgresFeatureRegistry, Query, Registered, RegisteredFeature, RegistryError, VersionSelector,
};
use recsys_core::features::{EntityKind, FeatureRef, StoredValue};
use recsys_core::stores::redact_url;

/// Where local mode keeps its files, under `--data-dir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPaths {
    /// The in-process offline store: `<data-dir>/features/offline.json`.
    pub offline: PathBuf,
    /// The in-process feature registry: `<data-dir>/features/registry.json`.
    pub registry: PathBuf,
}

impl LocalPaths {
    /// The files under `data_dir`. The trainer's local mode writes the same files.
    pub fn new(data_dir: &Path) -> Self {
        let dir = data_dir.join("features");
        Self {
            offline: dir.join("offline.json"),
            registry: dir.join("registry.json"),
        }
    }
}

/// Why the stores could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StoresError {
    /// `--database-url` is not a Postgres URL.
    #[error("--database-url {url}: {reason}")]
    DatabaseUrl {
        /// The URL, password removed.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// `--redis-url` or `--redis-prefix` is not usable.
    #[error("--redis-url {url} / --redis-prefix: {source}")]
    Redis {
        /// The URL, password removed.
        url: String,
        /// The client's error.
        source: OnlineError,
    },
}

impl StoresError {
    /// Stable label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::DatabaseUrl { .. } => "InvalidDatabaseUrl",
            Self::Redis { .. } => "InvalidRedisSettings",
        }
    }
}

/// A value that changes when a store's content changes.
pub type Generation = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The stores of one scorer.
pub struct Stores {
    /// Online store.
    pub online: Arc<dyn OnlineStore>,
    /// Whether the online store is the in-process one (so it is warmed from `offline`).
    pub online_in_process: bool,
    /// Offline store (the online store's fallback).
    pub offline: Arc<dyn OfflineStore>,
    /// Feature registry.
    pub registry: Arc<dyn FeatureRegistry>,
    /// Changes whenever the offline store's file changes (local mode); constant otherwise.
    pub offline_generation: Generation,
    /// The Postgres pool, when `--database-url` is set (for migrations).
    pub pool: Option<sqlx::PgPool>,
    /// One line per store, for the start-up log and `/readyz`.
    pub description: String,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// Settings of [`Stores::open`] (a subset of the scorer's options).
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// Redis URL.
    pub redis_url: Option<String>,
    /// Redis key prefix.
    pub redis_prefix: String,
    /// The online store's near cache (with `redis_url`); `None`: off.
    pub online_cache: Option<NearCacheOptions>,
    /// Postgres URL.
    pub database_url: Option<String>,
    /// Pool size.
    pub database_max_connections: u32,
    /// Local mode's directory.
    pub data_dir: PathBuf,
}

impl Stores {
    /// The stores of `settings`, without connecting to anything (within a Tokio runtime).
    pub fn open(settings: &StoreSettings) -> Result<Self, StoresError> {
        let mut description = Vec::new();
        type Offline = Arc<dyn OfflineStore>;
        type Registry = Arc<dyn FeatureRegistry>;
        let (offline, registry, generation, pool): (Offline, Registry, Generation, _) =
            match &settings.database_url {
                Some(url) => {
                    let invalid = |reason: String| StoresError::DatabaseUrl {
                        url: redact_url(url),
                        reason,
                    };
                    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                        return Err(invalid(
                            "expected postgres://user:password@host:port/database".into(),
                        ));
                    }
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(settings.database_max_connections.max(1))
                        .acquire_timeout(Duration::from_secs(2))
                        .connect_lazy(url)
                        .map_err(|e| invalid(e.to_string()))?;
                    description.push(format!(
                        "offline store and registry: postgres {}",
                        redact_url(url)
                    ));
                    (
                        Arc::new(PostgresOfflineStore::new(pool.clone())),
                        Arc::new(PostgresFeatureRegistry::new(pool.clone())),
                        Arc::new(|| 0),
                        Some(pool),
                    )
                }
                None => {
                    let paths = LocalPaths::new(&settings.data_dir);
                    description.push(format!(
                        "offline store: {}; registry: {} (local mode)",
                        paths.offline.display(),
                        paths.registry.display()
                    ));
                    let offline = Arc::new(LocalOffline(LocalFile::new(
                        paths.offline,
                        "offline store",
                        |p: &Path| InProcessOfflineStore::open(p),
                    )));
                    let registry = Arc::new(LocalRegistry(LocalFile::new(
                        paths.registry,
                        "feature registry",
                        |p: &Path| InProcessFeatureRegistry::open(p),
                    )));
                    let watched = offline.clone();
                    (
                        offline,
                        registry,
                        Arc::new(move || watched.0.generation()),
                        None,
                    )
                }
            };
        let (online, online_in_process): (Arc<dyn OnlineStore>, bool) = match &settings.redis_url {
            Some(url) => {
                let store = RedisOnlineStore::connect_lazy(
                    url,
                    RedisOnlineStoreOptions {
                        near_cache: settings.online_cache.clone(),
                        ..RedisOnlineStoreOptions::with_prefix(settings.redis_prefix.clone())
                    },
                )
                .map_err(|source| StoresError::Redis {
                    url: redact_url(url),
                    source,
                })?;
                description.push(format!(
                    "online store: redis {} prefix {}{}",
                    redact_url(url),
                    settings.redis_prefix,
                    match &settings.online_cache {
                        Some(c) => format!(", near cache of {} entities", c.max_entries),
                        None => String::new(),
                    }
                ));
                (Arc::new(store), false)
            }
            None => {
                description.push("online store: in-process, warmed from the offline store".into());
                (Arc::new(InProcessOnlineStore::new()), true)
            }
        };
        Ok(Self {
            online,
            online_in_process,
            offline,
            registry,
            offline_generation: generation,
            pool,
            description: description.join("; "),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Local files, reloaded when they change

type Opener<T, E> = fn(&Path) -> Result<T, E>;

/// An in-process store persisted to a file that another process (the trainer's local mode)
/// rewrites: reopened when the file's modification time or length changes. A file that fails to load
/// is reported once and the last good content keeps serving.
struct LocalFile<T, E> {
    path: PathBuf,
    what: &'static str,
    open: Opener<T, E>,
    state: Mutex<Loaded<T>>,
    generation: AtomicU64,
}

struct Loaded<T> {
    /// Stamp of the file last looked at (`None` inside: no file), and whether it loaded.
    seen: Option<(Option<Stamp>, bool)>,
    current: Arc<T>,
}

/// What tells a file's versions apart: modification time and length.
type Stamp = (SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl<T: Default + Send + Sync + 'static, E: std::fmt::Display + Send + 'static> LocalFile<T, E> {
    fn new(path: PathBuf, what: &'static str, open: Opener<T, E>) -> Self {
        Self {
            path,
            what,
            open,
            state: Mutex::new(Loaded {
                seen: None,
                current: Arc::new(T::default()),
            }),
            generation: AtomicU64::new(0),
        }
    }

    /// Changes when the file changes (before the content is reloaded) or is reloaded.
    fn generation(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        stamp(&self.path).hash(&mut h);
        self.generation.load(Ordering::Acquire).hash(&mut h);
        h.finish()
    }

    /// The current content, reloaded first when the file changed since last looked at.
    async fn get(&self) -> Arc<T> {
        let now = stamp(&self.path);
        {
            let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if matches!(state.seen, Some((seen, _)) if seen == now) {
                return state.current.clone();
            }
        }
        let (path, open) = (self.path.clone(), self.open);
        let loaded = tokio::task::spawn_blocking(move || open(&path)).await;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(state.seen, Some((seen, _)) if seen == now) {
            // Another caller reloaded it meanwhile.
            return state.current.clone();
        }
        match loaded {
            Ok(Ok(store)) => {
                state.current = Arc::new(store);
                state.seen = Some((now, true));
                self.generation.fetch_add(1, Ordering::AcqRel);
                if now.is_some() {
                    tracing::info!(path = %self.path.display(), what = self.what, "loaded");
                } else {
                    tracing::info!(path = %self.path.display(), what = self.what, "no file yet; empty");
                }
            }
            Ok(Err(e)) => {
                state.seen = Some((now, false));
                tracing::error!(
                    path = %self.path.display(),
                    what = self.what,
                    error = %e,
                    "cannot load; serving the last content loaded until the file changes"
                );
            }
            Err(e) => {
                tracing::error!(what = self.what, error = %e, "loading task failed");
            }
        }
        state.current.clone()
    }
}

/// The local offline store: [`InProcessOfflineStore`] over `offline.json`, reloaded on change.
struct LocalOffline(LocalFile<InProcessOfflineStore, OfflineError>);

#[async_trait]
impl OfflineStore for LocalOffline {
    async fn write(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        rows: &[OfflineRow],
    ) -> Result<WriteSummary, OfflineError> {
        self.0.get().await.write(feature, kind, rows).await
    }

    async fn point_in_time(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        queries: &[(String, i64)],
        options: &PitOptions,
    ) -> Result<Vec<Option<StoredValue>>, OfflineError> {
        self.0
            .get()
            .await
            .point_in_time(feature, kind, queries, options)
            .await
    }

    async fn latest(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        entity_ids: &[String],
    ) -> Result<Vec<Option<StoredValue>>, OfflineError> {
        self.0.get().await.latest(feature, kind, entity_ids).await
    }

    async fn snapshot(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        at_ms: i64,
        options: &PitOptions,
    ) -> Result<Vec<(String, StoredValue)>, OfflineError> {
        self.0
            .get()
            .await
            .snapshot(feature, kind, at_ms, options)
            .await
    }

    async fn replace_range(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
        from_ms: i64,
        to_ms: i64,
        rows: &[OfflineRow],
    ) -> Result<ReplaceSummary, OfflineError> {
        self.0
            .get()
            .await
            .replace_range(feature, kind, from_ms, to_ms, rows)
            .await
    }

    async fn copy_version(&self, from: &FeatureRef, to: &FeatureRef) -> Result<u64, OfflineError> {
        self.0.get().await.copy_version(from, to).await
    }

    async fn stats(
        &self,
        feature: &FeatureRef,
        kind: EntityKind,
    ) -> Result<OfflineStats, OfflineError> {
        self.0.get().await.stats(feature, kind).await
    }

    async fn delete_version(&self, feature: &FeatureRef) -> Result<u64, OfflineError> {
        self.0.get().await.delete_version(feature).await
    }
}

/// The local registry: [`InProcessFeatureRegistry`] over `registry.json`, reloaded on change.
struct LocalRegistry(LocalFile<InProcessFeatureRegistry, RegistryError>);

#[async_trait]
impl FeatureRegistry for LocalRegistry {
    async fn register(&self, spec: &FeatureSpec) -> Result<Registered, RegistryError> {
        self.0.get().await.register(spec).await
    }

    async fn get(
        &self,
        name: &str,
        selector: &VersionSelector,
    ) -> Result<Option<RegisteredFeature>, RegistryError> {
        self.0.get().await.get(name, selector).await
    }

    async fn versions(&self, name: &str) -> Result<Vec<RegisteredFeature>, RegistryError> {
        self.0.get().await.versions(name).await
    }

    async fn list(&self) -> Result<Vec<RegisteredFeature>, RegistryError> {
        self.0.get().await.list().await
    }

    async fn search(&self, query: &Query) -> Result<Vec<RegisteredFeature>, RegistryError> {
        self.0.get().await.search(query).await
    }

    async fn deprecate(
        &self,
        name: &str,
        version: &str,
        replaced_by: Option<&str>,
    ) -> Result<RegisteredFeature, RegistryError> {
        self.0
            .get()
            .await
            .deprecate(name, version, replaced_by)
            .await
    }

    async fn retire(&self, name: &str, version: &str) -> Result<RegisteredFeature, RegistryError> {
        self.0.get().await.retire(name, version).await
    }

    async fn record_materialization(
        &self,
        feature: &FeatureRef,
        at_ms: i64,
        rows: u64,
    ) -> Result<Materialization, RegistryError> {
        self.0
            .get()
            .await
            .record_materialization(feature, at_ms, rows)
            .await
    }

    async fn last_materialization(
        &self,
        feature: &FeatureRef,
    ) -> Result<Option<Materialization>, RegistryError> {
        self.0.get().await.last_materialization(feature).await
    }

    async fn materializations(
        &self,
        feature: &FeatureRef,
        limit: usize,
    ) -> Result<Vec<Materialization>, RegistryError> {
        self.0.get().await.materializations(feature, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recsys_core::features::FeatureValue;

    fn settings(dir: &Path) -> StoreSettings {
        StoreSettings {
            redis_url: None,
            redis_prefix: "rs".into(),
            online_cache: None,
            database_url: None,
            database_max_connections: 2,
            data_dir: dir.to_owned(),
        }
    }

    #[tokio::test]
    async fn local_files_are_reloaded_when_another_process_rewrites_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stores = Stores::open(&settings(dir.path())).expect("local stores");
        assert!(stores.online_in_process);
        assert!(
            stores.description.contains("local mode"),
            "{}",
            stores.description
        );
        let pop = FeatureRef::new("pop", 1);
        let ids = ["p1".to_owned()];
        // No file yet: empty.
        let got = stores.offline.latest(&pop, EntityKind::Product, &ids).await;
        assert_eq!(got.expect("latest"), vec![None]);
        let before = (stores.offline_generation)();

        // "The trainer" writes the file through its own store.
        let paths = LocalPaths::new(dir.path());
        let writer = InProcessOfflineStore::open(&paths.offline).expect("open");
        writer
            .write(
                &pop,
                EntityKind::Product,
                &[OfflineRow::new("p1", FeatureValue::Float(0.5), 1_000)],
            )
            .await
            .expect("write");
        let got = stores
            .offline
            .latest(&pop, EntityKind::Product, &ids)
            .await
            .expect("latest");
        assert_eq!(
            got[0].as_ref().map(|v| v.value.clone()),
            Some(FeatureValue::Float(0.5))
        );
        assert_ne!((stores.offline_generation)(), before);

        // A damaged file: the last content keeps serving.
        std::fs::write(&paths.offline, b"{ not json").expect("damage");
        let got = stores
            .offline
            .latest(&pop, EntityKind::Product, &ids)
            .await
            .expect("latest");
        assert!(got[0].is_some(), "the last good content serves");

        // The registry file likewise.
        assert!(stores.registry.list().await.expect("list").is_empty());
        std::fs::write(&paths.registry, b"garbage").expect("damage");
        assert!(stores.registry.list().await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn bad_urls_fail_the_start_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = settings(dir.path());
        s.database_url = Some("mysql://user:secret@db/x".into());
        let err = Stores::open(&s).expect_err("not postgres");
        assert_eq!(err.kind(), "InvalidDatabaseUrl");
        assert!(err.to_string().contains("expected postgres://"), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
        s.database_url = Some("postgres://user:secret@db:port/x".into());
        let err = Stores::open(&s).expect_err("bad port");
        assert_eq!(err.kind(), "InvalidDatabaseUrl");
        assert!(!err.to_string().contains("secret"), "{err}");
        let mut s = settings(dir.path());
        s.redis_url = Some("redis://127.0.0.1:1/".into());
        s.redis_prefix = "bad prefix*".into();
        let err = Stores::open(&s).expect_err("bad prefix");
        assert_eq!(err.kind(), "InvalidRedisSettings");
        // Unreachable servers are not an error at start.
        let mut s = settings(dir.path());
        s.redis_url = Some("redis://127.0.0.1:1/".into());
        s.database_url = Some("postgres://recsys:pw@127.0.0.1:1/recsys".into());
        let stores = Stores::open(&s).expect("lazy");
        assert!(!stores.online_in_process);
        assert!(stores.pool.is_some());
        assert!(!stores.description.contains("pw"), "{}", stores.description);
    }
}
