//! `recsys-scorer`: the HTTP service users call for recommendations, scores and features.
//!
//! It serves the feature API ([`features`]: reads by user, product and batch, discovery),
//! recommendations, scores and event ingestion ([`recommend`]: routing between model
//! versions, cold start, ranking with the feature store, shadow scoring), `/metrics`,
//! `/healthz` and `/readyz`. The router is built by [`router`] so tests and benchmarks drive it
//! in-process; [`start`] builds feature serving from its options and [`start_all`] adds the
//! models, with their background tasks (catalog refresh, online-store statistics, model sync,
//! rankings refresh).
//!
//! # Readiness
//!
//! `/readyz` answers 200 when the scorer can serve: a feature catalog was loaded from the
//! registry at least once (later refresh failures keep the last catalog serving and do not
//! make the scorer unready) and, when recommendations are served, every model of the routing
//! table has its stable version loaded. It reports, without failing on it, the online store
//! (circuit open, statistics failing: reads degrade to the offline fallback). `/healthz`
//! answers 200 while the process runs.
//!
//! # Dependencies down at start
//!
//! Nothing connects at start: Redis and Postgres connect on first use. A registry that does
//! not answer leaves the catalog unloaded (feature reads answer 503 `CatalogUnavailable`,
//! `/readyz` 503 naming the error) and the background refresh keeps trying; Redis down makes
//! reads serve from the offline store, marked `fallback`.

pub mod auth;
pub mod features;
pub mod metrics;
pub mod models;
pub mod recommend;
pub mod serve;
pub mod stores;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::features::http::ApiError;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use clap::Parser;
use recsys_core::features::offline::PostgresOfflineStore;
use recsys_core::features::online::{
    FeatureReader, NearCacheOptions, OfflineFallback, ReaderOptions, now_ms,
};
use recsys_core::telemetry::TelemetryArgs;
use serde::Serialize;
use tokio::task::JoinHandle;
use tower_http::LatencyUnit;
use tower_http::trace::{DefaultMakeSpan, DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::features::routes::HttpError;
use crate::features::{FeatureService, ServiceOptions};
use crate::metrics::Metrics;
use crate::stores::{StoreSettings, Stores, StoresError};

/// A duration option: `<integer><unit>` pairs (`ms s m h d`), as feature TTLs, e.g. `30s`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    recsys_core::features::registry::parse_duration_ms(s).map(Duration::from_millis)
}

/// Options of `recsys-scorer`.
#[derive(Parser, Debug, Clone)]
#[command(name = "recsys-scorer", version, about = "recsys scoring service")]
pub struct Args {
    /// Logging.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Address the HTTP API, probes and metrics listen on.
    #[arg(
        long,
        env = "RECSYS_SCORER_BIND_ADDRESS",
        default_value = "0.0.0.0:8080"
    )]
    pub bind_address: SocketAddr,
    /// Feature serving.
    #[command(flatten)]
    pub features: FeatureArgs,
    /// Recommendations and scores.
    #[command(flatten)]
    pub models: recommend::setup::ModelArgs,
    /// Overload protection and shutdown.
    #[command(flatten)]
    pub serve: serve::ServeArgs,
    /// Authentication and ingestion limits.
    #[command(flatten)]
    pub auth: auth::AuthArgs,
}

/// Options of feature serving.
#[derive(clap::Args, Debug, Clone)]
pub struct FeatureArgs {
    /// Redis URL of the online store, for example `redis://cache:6379/0`. Without it, the
    /// online store is in-process, warmed from the offline store.
    #[arg(long, env = "RECSYS_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Key prefix of the online store in Redis (`[A-Za-z0-9_.-]{1,64}`).
    #[arg(long, env = "RECSYS_REDIS_PREFIX", default_value = "rs")]
    pub redis_prefix: String,
    /// Postgres URL of the feature registry and the offline store. Without it (and without
    /// `--redis-url`: local mode), both are files under `--data-dir`.
    #[arg(long, env = "RECSYS_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Largest number of pooled Postgres connections.
    #[arg(long, env = "RECSYS_DATABASE_MAX_CONNECTIONS", default_value_t = 8)]
    pub database_max_connections: u32,
    /// Bring the Postgres schema up to date at start (retried until it succeeds).
    #[arg(long, env = "RECSYS_DATABASE_MIGRATE")]
    pub database_migrate: bool,
    /// Directory of local mode: `features/offline.json` and `features/registry.json`,
    /// reloaded when they change.
    #[arg(long, env = "RECSYS_DATA_DIR", default_value = ".recsys")]
    pub data_dir: PathBuf,
    /// How often the feature catalog is reloaded from the registry.
    #[arg(long, env = "RECSYS_FEATURE_CATALOG_REFRESH", default_value = "30s", value_parser = parse_duration)]
    pub catalog_refresh: Duration,
    /// Longest wait for the registry (a catalog refresh, a discovery request).
    #[arg(long, env = "RECSYS_REGISTRY_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub registry_timeout: Duration,
    /// Time budget of a feature read, fallback included.
    #[arg(long, env = "RECSYS_FEATURE_BUDGET", default_value = "50ms", value_parser = parse_duration)]
    pub feature_budget: Duration,
    /// The online store's share of the budget; the rest is left to the fallback.
    #[arg(long, env = "RECSYS_FEATURE_ONLINE_TIMEOUT", default_value = "25ms", value_parser = parse_duration)]
    pub online_timeout: Duration,
    /// How often the online store's keys and bytes are measured (walks the keyspace).
    #[arg(long, env = "RECSYS_FEATURE_STATS_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub stats_interval: Duration,
    /// Entities kept in an in-process near cache in front of Redis, invalidated by Redis
    /// itself (RESP3 client tracking, Redis 6 or later); 0 turns it off. Used with
    /// `--redis-url` only.
    #[arg(long, env = "RECSYS_ONLINE_CACHE_ENTRIES", default_value_t = 100_000)]
    pub online_cache_entries: u64,
    /// Estimated bytes the near cache may hold (an entity above the average share counts as
    /// several entries).
    #[arg(long, env = "RECSYS_ONLINE_CACHE_BYTES", default_value_t = 256 << 20)]
    pub online_cache_bytes: u64,
}

/// Why the scorer could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum ScorerError {
    /// An option is out of bounds.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option.
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A store cannot be set up.
    #[error(transparent)]
    Stores(#[from] StoresError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server failed.
    #[error("serving: {0}")]
    Serve(std::io::Error),
}

impl ScorerError {
    /// Stable label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidOption { .. } => "InvalidOption",
            Self::Stores(e) => e.kind(),
            Self::Bind { .. } => "BindFailed",
            Self::Serve(_) => "ServeFailed",
        }
    }
}

/// State shared by the handlers.
#[derive(Clone)]
pub struct AppState {
    features: Arc<FeatureService>,
    metrics: Arc<Metrics>,
    recommend: Option<recommend::routes::RecommendState>,
    serve: serve::ServeArgs,
    draining: serve::Draining,
    auth: Arc<auth::Auth>,
}

impl AppState {
    /// The state of a scorer serving `features`; its metrics registered for `/metrics`.
    pub fn new(features: Arc<FeatureService>) -> Self {
        let metrics = Metrics::new(features.reader().metrics(), features.catalog_metrics());
        let metrics_http = metrics.http.clone();
        Self {
            features,
            metrics: Arc::new(metrics),
            recommend: None,
            serve: serve::ServeArgs::default(),
            draining: serve::Draining::default(),
            auth: Arc::new(auth::Auth::disabled(metrics_http.clone())),
        }
    }

    /// Checks callers with `auth` (nothing is checked otherwise).
    pub fn with_auth(mut self, auth: Arc<auth::Auth>) -> Self {
        self.auth = auth;
        self
    }

    /// Serves with these overload options (the defaults otherwise).
    pub fn with_serve(mut self, args: &serve::ServeArgs) -> Self {
        self.serve = args.clone();
        self
    }

    /// Whether the scorer is shutting down (readiness fails once it is).
    pub fn draining(&self) -> &serve::Draining {
        &self.draining
    }

    /// Feature serving.
    pub fn features(&self) -> &Arc<FeatureService> {
        &self.features
    }

    /// Adds recommendations and scores, their metrics registered for `/metrics`.
    pub fn with_recommend(mut self, started: &recommend::setup::Started) -> Self {
        // A registry of its own: the feature families are shared handles, so the new
        // registry reports the same series, plus the recommendation families.
        let mut metrics = Metrics::new(
            self.features.reader().metrics(),
            self.features.catalog_metrics(),
        );
        metrics.register_more(&started.register);
        self.metrics = Arc::new(metrics);
        self.recommend = Some(started.state.clone());
        self
    }

    /// Recommendations and scores, when served.
    pub fn recommend(&self) -> Option<&recommend::routes::RecommendState> {
        self.recommend.as_ref()
    }

    /// What `/readyz` reports.
    pub fn readiness(&self) -> Readiness {
        let mut checks = BTreeMap::new();
        let catalog = self.features.catalog_status();
        let age = |at: Option<i64>| at.map(|at| (now_ms() - at).max(0) / 1000).unwrap_or(0);
        let catalog_check = match (&catalog.last_error, catalog.loaded) {
            (None, true) => Check::ok(format!(
                "{} feature versions, loaded {} s ago",
                catalog.features,
                age(catalog.loaded_at_ms)
            )),
            (Some(e), true) => Check::ok(format!(
                "{} feature versions from {} s ago; the last {} refreshes failed: {e}",
                catalog.features,
                age(catalog.loaded_at_ms),
                catalog.consecutive_failures
            )),
            (e, false) => Check::failed(format!(
                "not loaded from the registry yet: {}",
                e.as_deref().unwrap_or("not tried yet")
            )),
        };
        checks.insert("feature_catalog", catalog_check);
        let reader = self.features.reader();
        let backend = reader.store().backend();
        let online = if reader.circuit_open() {
            Check::failed(format!(
                "{backend}: failing, skipped for a cool-down; reads are served from the offline fallback"
            ))
        } else if let Some(e) = self.features.online_status().last_error {
            Check::failed(format!("{backend}: statistics failed: {e}"))
        } else {
            Check::ok(format!("{backend}: answering"))
        };
        checks.insert("online_store", online.optional());
        let model = match &self.recommend {
            None => {
                Check::failed("recommendations are not served by this scorer".into()).optional()
            }
            Some(r) => {
                let snapshot = r.recommender.models().snapshot();
                let loaded = snapshot
                    .loaded()
                    .iter()
                    .map(|(m, v)| format!("{m}@{v}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let default_model = &r.recommender.options().default_model;
                match &snapshot.table {
                    None => Check::failed("no routing table loaded yet".into()),
                    Some(t) if t.route(default_model).is_none() => Check::failed(format!(
                        "routing table {} has no route for the default model {default_model}",
                        t.revision()
                    )),
                    Some(_) if snapshot.is_ready() => Check::ok(format!("loaded: {loaded}")),
                    Some(_) => {
                        let missing = snapshot
                            .missing
                            .iter()
                            .map(|(m, why)| format!("{m}: {why}"))
                            .collect::<Vec<_>>()
                            .join("; ");
                        Check::failed(format!("not loaded: {missing}"))
                    }
                }
            }
        };
        checks.insert("model", model);
        if self.draining.is_draining() {
            checks.insert(
                "shutdown",
                Check::failed("shutting down: finishing in-flight requests".into()),
            );
        }
        Readiness {
            ready: checks.values().all(|c| c.ok || !c.required),
            stores: self.features.description().to_owned(),
            checks,
        }
    }
}

/// One readiness check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Check {
    /// Whether it passes.
    pub ok: bool,
    /// Whether readiness depends on it.
    pub required: bool,
    /// What was found.
    pub message: String,
}

impl Check {
    fn ok(message: String) -> Self {
        Self {
            ok: true,
            required: true,
            message,
        }
    }

    fn failed(message: String) -> Self {
        Self {
            ok: false,
            required: true,
            message,
        }
    }

    fn optional(self) -> Self {
        Self {
            required: false,
            ..self
        }
    }
}

/// What `/readyz` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// Whether every required check passes.
    pub ready: bool,
    /// The stores in use.
    pub stores: String,
    /// Checks by name: `feature_catalog` (required), `online_store`, `model`, and `shutdown`
    /// (failing) once the scorer is shutting down.
    pub checks: BTreeMap<&'static str, Check>,
}

/// The OpenAPI document of the scorer's API, served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi as _;
    #[derive(utoipa::OpenApi)]
    #[openapi(
        info(title = "recsys-scorer", description = "Recommendations, scores and features over HTTP; see docs/http-api.md"),
        paths(readyz),
        tags((name = "recommendations"), (name = "features"), (name = "probes"))
    )]
    struct Probes;
    let mut doc = Probes::openapi();
    doc.merge(recommend::routes::RecommendApi::openapi());
    doc.merge(features::routes::FeatureApi::openapi());
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// The service's router: the feature API (with debug-level access logs and request metrics),
/// `/healthz`, `/readyz` and `/metrics` (outside the access logs).
pub fn router(state: AppState) -> Router {
    let mut api = features::routes::router(state.features.clone());
    if let Some(r) = &state.recommend {
        api = api.merge(recommend::routes::router(r.clone()));
    }
    let api = api
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    let api = serve::protect(api, &state.serve, state.metrics.http.clone())
        .layer(axum::middleware::from_fn_with_state(
            state.auth.clone(),
            auth::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            track,
        ))
        .layer(
            // One debug line per request (the span carries method and URI); 5xx answers are
            // degradations already logged once by the reader or the catalog, not per request.
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::DEBUG))
                .on_request(())
                .on_eos(())
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG))
                .on_response(
                    DefaultOnResponse::new()
                        .level(Level::DEBUG)
                        .latency_unit(LatencyUnit::Micros),
                ),
        );
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(scorer_status))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .route("/metrics", get(metrics_text))
        .with_state(state)
        .merge(api)
}

/// The versions this scorer holds (`GET /v1/status`): what the operator reads from every pod
/// before it moves traffic. Empty when recommendations are not served.
async fn scorer_status(
    State(state): State<AppState>,
) -> Json<recsys_core::serving::fleet::ScorerStatus> {
    Json(
        state
            .recommend
            .as_ref()
            .map(|r| r.recommender.models().snapshot().report())
            .unwrap_or_default(),
    )
}

async fn not_found(request: Request) -> HttpError {
    HttpError(ApiError::new(
        404,
        "NotFound",
        format!("no route {} {}", request.method(), request.uri().path()),
    ))
}

async fn method_not_allowed(request: Request) -> HttpError {
    HttpError(ApiError::new(
        405,
        "MethodNotAllowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    ))
}

/// Counts every API request by route template, method and status.
async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    // Known methods by name, anything else as one label: a made-up method must not add a
    // series.
    let method = match *request.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::HEAD => "HEAD",
        axum::http::Method::OPTIONS => "OPTIONS",
        axum::http::Method::PATCH => "PATCH",
        _ => "other",
    };
    let response = next.run(request).await;
    metrics
        .http
        .observe(&route, method, response.status().as_u16(), started);
    response
}

/// Ready when the feature catalog and every model of the routing table are loaded.
#[utoipa::path(get, path = "/readyz", tag = "probes",
    responses((status = 200, body = Readiness), (status = 503, body = ApiError)))]
async fn readyz(State(state): State<AppState>) -> Response {
    let r = state.readiness();
    if r.ready {
        (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready", "stores": r.stores, "checks": r.checks })),
        )
            .into_response()
    } else {
        let failing: Vec<String> = r
            .checks
            .iter()
            .filter(|(_, c)| c.required && !c.ok)
            .map(|(name, c)| format!("{name}: {}", c.message))
            .collect();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "error": "NotReady",
                "message": failing.join("; "),
                "stores": r.stores,
                "checks": r.checks,
            })),
        )
            .into_response()
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    match state.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => HttpError(ApiError::new(500, "MetricsEncoding", e.to_string())).into_response(),
    }
}

/// A started scorer: its state and background tasks (stopped when dropped).
pub struct Scorer {
    state: AppState,
    tasks: Vec<JoinHandle<()>>,
    pool: Option<sqlx::PgPool>,
}

impl Scorer {
    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The router over the state.
    pub fn router(&self) -> Router {
        router(self.state.clone())
    }
}

impl Drop for Scorer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn positive(option: &'static str, d: Duration) -> Result<(), ScorerError> {
    if d.is_zero() {
        return Err(ScorerError::InvalidOption {
            option,
            reason: "must be positive".into(),
        });
    }
    Ok(())
}

/// Brings the Postgres schema up to date; logs the first failure of a streak.
async fn migrate(pool: &sqlx::PgPool, failures: &mut u32) -> bool {
    let store = PostgresOfflineStore::new(pool.clone());
    match tokio::time::timeout(Duration::from_secs(60), store.migrate()).await {
        Ok(Ok(())) => {
            tracing::info!("postgres schema up to date");
            *failures = 0;
            true
        }
        failed => {
            *failures += 1;
            let message = match failed {
                Ok(Err(e)) => format!("{} ({})", e, e.kind()),
                _ => "timed out after 60 s".to_owned(),
            };
            if *failures == 1 {
                tracing::warn!(error = %message, "postgres migration failed; retrying");
            }
            false
        }
    }
}

/// Builds the stores, the reader and the feature service from `args`, loads the catalog
/// once (a failure is logged and retried in the background) and starts the background
/// tasks. Fails only for options that can never work.
pub async fn start(args: &FeatureArgs) -> Result<Scorer, ScorerError> {
    positive("--catalog-refresh", args.catalog_refresh)?;
    positive("--stats-interval", args.stats_interval)?;
    positive("--feature-budget", args.feature_budget)?;
    positive("--online-timeout", args.online_timeout)?;
    positive("--registry-timeout", args.registry_timeout)?;
    if args.online_cache_entries > 0 && args.online_cache_bytes == 0 {
        return Err(ScorerError::InvalidOption {
            option: "--online-cache-bytes",
            reason: "must be positive while --online-cache-entries is (0 entries turns the near cache off)".into(),
        });
    }
    let stores = Stores::open(&StoreSettings {
        redis_url: args.redis_url.clone(),
        redis_prefix: args.redis_prefix.clone(),
        online_cache: (args.online_cache_entries > 0).then(|| NearCacheOptions {
            max_entries: args.online_cache_entries,
            max_bytes: args.online_cache_bytes,
            ..NearCacheOptions::default()
        }),
        database_url: args.database_url.clone(),
        database_max_connections: args.database_max_connections,
        data_dir: args.data_dir.clone(),
    })?;
    tracing::info!(stores = %stores.description, "feature stores");
    let reader = FeatureReader::new(
        stores.online.clone(),
        Arc::new(OfflineFallback::new(stores.offline.clone())),
        ReaderOptions {
            budget: args.feature_budget,
            online_timeout: args.online_timeout.min(args.feature_budget),
            ..ReaderOptions::default()
        },
    );
    let mut service = FeatureService::new(
        Arc::new(reader),
        stores.registry.clone(),
        ServiceOptions {
            registry_timeout: args.registry_timeout,
        },
    )
    .with_description(stores.description.clone());
    if stores.online_in_process {
        service = service.with_warming(stores.offline.clone(), stores.offline_generation.clone());
    }
    let service = Arc::new(service);

    let mut pending_migration = stores.pool.clone().filter(|_| args.database_migrate);
    let mut migration_failures = 0;
    if let Some(pool) = &pending_migration
        && migrate(pool, &mut migration_failures).await
    {
        pending_migration = None;
    }
    // A failure is logged and counted by the service; the loop below retries.
    let _ = service.refresh().await;

    let refresh = {
        let service = service.clone();
        let every = args.catalog_refresh;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Some(pool) = &pending_migration
                    && migrate(pool, &mut migration_failures).await
                {
                    pending_migration = None;
                }
                let _ = service.refresh().await;
            }
        })
    };
    let stats = {
        let service = service.clone();
        let mut tick = tokio::time::interval(args.stats_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::spawn(async move {
            loop {
                tick.tick().await;
                service.refresh_online_stats().await;
            }
        })
    };
    Ok(Scorer {
        state: AppState::new(service),
        tasks: vec![refresh, stats],
        pool: stores.pool.clone(),
    })
}

/// Starts feature serving and recommendations: [`start`], then the model manager, user
/// states, rankings and shadow scoring ([`recommend::setup`]), with authentication and
/// overload protection as `args` say.
pub async fn start_all(args: &Args) -> Result<Scorer, ScorerError> {
    args.serve.validate()?;
    let mut scorer = start(&args.features).await?;
    let started = recommend::setup::start(
        &args.models,
        &args.features,
        scorer.state.features.clone(),
        scorer.pool.clone(),
    )
    .await?;
    scorer.state = scorer.state.clone().with_recommend(&started);
    scorer.tasks.extend(started.tasks);
    let auth = Arc::new(auth::Auth::new(
        &args.auth,
        scorer.state.metrics.http.clone(),
    )?);
    scorer.tasks.push(auth.spawn_reload());
    scorer.state = scorer.state.clone().with_serve(&args.serve).with_auth(auth);
    Ok(scorer)
}

/// Serves until SIGTERM or SIGINT, then shuts down gracefully ([`serve`]).
pub async fn run(args: Args) -> Result<(), ScorerError> {
    let scorer = start_all(&args).await?;
    let listener = tokio::net::TcpListener::bind(args.bind_address)
        .await
        .map_err(|source| ScorerError::Bind {
            address: args.bind_address,
            source,
        })?;
    tracing::info!(address = %args.bind_address, "serving");
    serve::serve(listener, scorer, &args.serve, serve::shutdown_signal()).await
}

#[cfg(test)]
mod tests;
