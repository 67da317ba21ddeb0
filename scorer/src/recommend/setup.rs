//! Options of recommendations and scores, and the wiring of their parts: the artifact store
//! and model manager, the routing source, user states, shadow scoring.
//!
//! | option | default | what |
//! | --- | --- | --- |
//! | `--artifacts` | `.recsys/artifacts` | the model registry: a directory or `s3://bucket/prefix` (with the `--s3-*` options) |
//! | `--routing-file` | none | a routing table (YAML or JSON, watched); without it the `champion` of `--model` |
//! | `--routing-configmap` | none | in a cluster: the ConfigMap the operator writes the table into, watched through the API |
//! | `--routing-configmap-key`, `--routing-namespace` | `routing.yaml`, the pod's | its key and namespace |
//! | `--model` | `als` | the model served when a request names none |
//! | `--events` | none | local mode: the events file of user histories (appended to by `POST /v1/events`) |
//! | `--cf` | `true` | collaborative filtering on or off (off: the feature-store ranking, same answers' shape) |
//! | `--weight-*` | 1, 0.2, 0.05, 0.1 | ranking weights of CF, popularity, freshness, category affinity |
//! | `--shadow-queue`, `--shadow-workers` | 1024, 1 | shadow scoring queue and threads |
//! | `--inline-scan-max` | 4,000,000 | largest top-k scan (products × factors) run inline; larger ones go to the blocking pool |
//! | `--model-sync-interval`, `--rankings-refresh` | 30s, 60s | re-resolve aliases and retry failed loads; reload popularity rankings |
//! | `--attribution-window`, `--impression-queue` | 1h, 4096 | A/B readout: how long after a list an outcome is attributed to it; impressions queued for the store |
//!
//! User histories come from the Postgres `events` table with `--database-url`, else from
//! `--events`; user states are cached in Redis with `--redis-url`, else in process; so are the
//! A/B readout's impressions and counts ([`super::experiments`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use recsys_core::artifacts::Registry;
use recsys_core::events::{FileFormat, PostgresEvents};
use recsys_core::serving::experiment::{
    ExperimentStore, InProcessExperimentStore, RedisExperimentStore,
};
use recsys_core::serving::routing::{
    FileRoutingOptions, FileRoutingSource, RoutingMetrics, RoutingSource, StaticRoutingSource,
};
use recsys_core::serving::users::{
    DEFAULT_MAX_USERS, InProcessUserHistory, InProcessUserStateCache, PostgresUserHistory,
    RedisUserStateCache, RedisUserStateCacheOptions, UserHistory, UserStateArgs, UserStateCache,
    UserStateMetrics, UserStates,
};
use recsys_core::stores::S3Args;
use tokio::task::JoinHandle;

use super::cluster_routing::{self, ConfigMapRef, ConfigMapRoutingSource};
use super::experiments::{ExperimentMetrics, Experiments};
use super::metrics::RecommendMetrics;
use super::rank::Weights;
use super::routes::RecommendState;
use super::service::{RecommendOptions, Recommender};
use super::shadow::{Shadow, ShadowMetrics};
use crate::features::FeatureService;
use crate::models::{ModelManager, ModelMetrics};
use crate::{FeatureArgs, ScorerError};

fn parse_duration(s: &str) -> Result<Duration, String> {
    recsys_core::features::registry::parse_duration_ms(s).map(Duration::from_millis)
}

/// Options of recommendations and scores.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model registry: a directory, or `s3://bucket[/prefix]`.
    #[arg(long, env = "RECSYS_ARTIFACTS", default_value = ".recsys/artifacts")]
    pub artifacts: String,
    /// S3 connection (with an `s3://` registry).
    #[command(flatten)]
    pub s3: S3Args,
    /// A routing table file (YAML or JSON), watched for changes. Without it, every request
    /// is served by the `champion` of `--model`.
    #[arg(
        long,
        env = "RECSYS_ROUTING_FILE",
        conflicts_with = "routing_configmap"
    )]
    pub routing_file: Option<PathBuf>,
    /// In a cluster: the ConfigMap holding the routing table (the operator writes
    /// `<ModelDeployment>-routing`), watched through the Kubernetes API.
    #[arg(long, env = "RECSYS_ROUTING_CONFIGMAP")]
    pub routing_configmap: Option<String>,
    /// The key of the table in the ConfigMap; `.json` keys are read as JSON, others as YAML.
    #[arg(long, env = "RECSYS_ROUTING_CONFIGMAP_KEY", default_value = cluster_routing::DEFAULT_KEY)]
    pub routing_configmap_key: String,
    /// Namespace of the ConfigMap; default: the pod's (`POD_NAMESPACE`), else the kubeconfig's.
    #[arg(long, env = "POD_NAMESPACE")]
    pub routing_namespace: Option<String>,
    /// The model served when a request names none.
    #[arg(long, env = "RECSYS_MODEL", default_value = "als")]
    pub model: String,
    /// Local mode: the events file of user histories (JSON lines are appended to by
    /// `POST /v1/events`). Ignored with `--database-url`, where the `events` table is used.
    #[arg(long, env = "RECSYS_EVENTS")]
    pub events: Option<PathBuf>,
    /// Collaborative filtering on or off; off, answers keep their shape and are ranked by the
    /// feature-store signals.
    #[arg(long, env = "RECSYS_CF", default_value_t = true, action = clap::ArgAction::Set)]
    pub cf: bool,
    /// Ranking weight of the CF affinity.
    #[arg(long, env = "RECSYS_WEIGHT_CF", default_value_t = 1.0)]
    pub weight_cf: f32,
    /// Ranking weight of popularity_score.
    #[arg(long, env = "RECSYS_WEIGHT_POPULARITY", default_value_t = 0.2)]
    pub weight_popularity: f32,
    /// Ranking weight of freshness_score.
    #[arg(long, env = "RECSYS_WEIGHT_FRESHNESS", default_value_t = 0.05)]
    pub weight_freshness: f32,
    /// Ranking weight of the user's category affinity.
    #[arg(long, env = "RECSYS_WEIGHT_CATEGORY", default_value_t = 0.1)]
    pub weight_category: f32,
    /// Largest `k` of a recommendation.
    #[arg(long, env = "RECSYS_MAX_K", default_value_t = 200)]
    pub max_k: usize,
    /// Largest number of candidates of `POST /v1/scores`.
    #[arg(long, env = "RECSYS_MAX_CANDIDATES", default_value_t = 500)]
    pub max_candidates: usize,
    /// Shadow comparisons queued at most; more are dropped (and counted).
    #[arg(long, env = "RECSYS_SHADOW_QUEUE", default_value_t = 1024)]
    pub shadow_queue: usize,
    /// Threads scoring the shadow version.
    #[arg(long, env = "RECSYS_SHADOW_WORKERS", default_value_t = 1)]
    pub shadow_workers: usize,
    /// How often aliases are re-resolved and failed loads retried.
    #[arg(long, env = "RECSYS_MODEL_SYNC_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub model_sync_interval: Duration,
    /// Largest top-k scan (products × factors) run on the request's runtime thread; larger
    /// scans go to the blocking pool.
    #[arg(long, env = "RECSYS_INLINE_SCAN_MAX", default_value_t = super::service::DEFAULT_INLINE_SCAN_MAX)]
    pub inline_scan_max: usize,
    /// How often the popularity rankings are reloaded.
    #[arg(long, env = "RECSYS_RANKINGS_REFRESH", default_value = "60s", value_parser = parse_duration)]
    pub rankings_refresh: Duration,
    /// How long after a served list a click, cart or purchase of one of its products is
    /// attributed to it in the A/B readout of a rollout.
    #[arg(long, env = "RECSYS_ATTRIBUTION_WINDOW", default_value = "1h", value_parser = parse_duration)]
    pub attribution_window: Duration,
    /// Impressions queued at most for the experiment store; more are dropped (and counted).
    #[arg(long, env = "RECSYS_IMPRESSION_QUEUE", default_value_t = 4096)]
    pub impression_queue: usize,
    /// User states.
    #[command(flatten)]
    pub users: UserStateArgs,
}

/// The recommendation side of a started scorer.
pub struct Started {
    /// Route state.
    pub state: RecommendState,
    /// Metric registrations: (with the `recsys_scorer` prefix, without).
    pub register: Box<dyn Fn(&mut prometheus_client::registry::Registry) + Send + Sync>,
    /// Background tasks.
    pub tasks: Vec<JoinHandle<()>>,
}

fn invalid(option: &'static str, reason: impl std::fmt::Display) -> ScorerError {
    ScorerError::InvalidOption {
        option,
        reason: reason.to_string(),
    }
}

/// The routing source the options name: a ConfigMap, a file, or the `champion` of `--model`.
async fn routing_source(
    args: &ModelArgs,
    metrics: &RoutingMetrics,
) -> Result<Arc<dyn RoutingSource>, ScorerError> {
    if let Some(name) = &args.routing_configmap {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| invalid("--routing-configmap", format!("no Kubernetes client: {e}")))?;
        let namespace = args
            .routing_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let target = ConfigMapRef {
            namespace,
            name: name.clone(),
            key: args.routing_configmap_key.clone(),
        };
        let source = ConfigMapRoutingSource::start(client, target, metrics.clone())
            .await
            .map_err(|e| invalid("--routing-configmap", e))?;
        return Ok(Arc::new(source));
    }
    Ok(match &args.routing_file {
        Some(path) => Arc::new(
            FileRoutingSource::start(
                path.clone(),
                FileRoutingOptions {
                    metrics: metrics.clone(),
                    ..FileRoutingOptions::default()
                },
            )
            .await
            .map_err(|e| invalid("--routing-file", e))?,
        ),
        None => Arc::new(
            StaticRoutingSource::champion(&args.model)
                .map_err(|e| invalid("--model", e))?
                .with_metrics(metrics.clone()),
        ),
    })
}

/// Builds the recommendation service and starts its background tasks (model sync, rankings
/// refresh). Nothing waits for a dependency: models load in the background.
pub async fn start(
    args: &ModelArgs,
    features_args: &FeatureArgs,
    features: Arc<FeatureService>,
    pool: Option<sqlx::PgPool>,
) -> Result<Started, ScorerError> {
    for (option, w) in [
        ("--weight-cf", args.weight_cf),
        ("--weight-popularity", args.weight_popularity),
        ("--weight-freshness", args.weight_freshness),
        ("--weight-category", args.weight_category),
    ] {
        if !w.is_finite() || w < 0.0 {
            return Err(invalid(option, format!("{w} is not a finite weight ≥ 0")));
        }
    }
    if args.max_k == 0 || args.max_candidates == 0 {
        return Err(invalid(
            "--max-k",
            "--max-k and --max-candidates must be positive",
        ));
    }
    let store = recsys_core::stores::artifact_store(&args.artifacts, &args.s3)
        .await
        .map_err(|e| invalid("--artifacts", e))?;
    let routing_metrics = RoutingMetrics::new();
    let routing = routing_source(args, &routing_metrics).await?;
    let model_metrics = ModelMetrics::default();
    let models = Arc::new(ModelManager::new(
        Registry::new(store.clone()),
        routing,
        model_metrics.clone(),
    ));

    let history: Arc<dyn UserHistory> = match (&pool, &args.events) {
        (Some(pool), _) => Arc::new(PostgresUserHistory::new(PostgresEvents::new(pool.clone()))),
        (None, Some(path)) => {
            let h = if path.exists() {
                InProcessUserHistory::from_file(path, FileFormat::Auto, args.users.history_limit)
                    .map_err(|e| invalid("--events", e))?
            } else {
                InProcessUserHistory::new(args.users.history_limit)
            };
            Arc::new(h.append_to(path).map_err(|e| invalid("--events", e))?)
        }
        (None, None) => Arc::new(InProcessUserHistory::new(args.users.history_limit)),
    };
    let cache: Arc<dyn UserStateCache> = match &features_args.redis_url {
        Some(url) => Arc::new(
            RedisUserStateCache::connect_lazy(
                url,
                RedisUserStateCacheOptions {
                    prefix: features_args.redis_prefix.clone(),
                    cache: args.users.cache_options(),
                },
            )
            .map_err(|e| invalid("--redis-url", e))?,
        ),
        None => Arc::new(
            InProcessUserStateCache::new(args.users.cache_options(), DEFAULT_MAX_USERS)
                .map_err(|e| invalid("--user-state-ttl", e))?,
        ),
    };
    if args.attribution_window.is_zero() {
        return Err(invalid("--attribution-window", "must be longer than 0"));
    }
    let experiment_store: Arc<dyn ExperimentStore> = match &features_args.redis_url {
        Some(url) => Arc::new(RedisExperimentStore::new(
            recsys_core::stores::redis_lazy(url).map_err(|e| invalid("--redis-url", e))?,
            features_args.redis_prefix.clone(),
            args.attribution_window,
        )),
        None => Arc::new(InProcessExperimentStore::new(
            args.attribution_window,
            DEFAULT_MAX_USERS,
        )),
    };
    let experiment_metrics = ExperimentMetrics::default();
    let (experiments, impression_writer) = Experiments::start(
        experiment_store,
        args.attribution_window,
        args.impression_queue,
        experiment_metrics.clone(),
    );
    let user_metrics = UserStateMetrics::new();
    let users = Arc::new(
        UserStates::new(history, cache, args.users.options())
            .map_err(|e| invalid("--user-history-limit", e))?
            .with_metrics(user_metrics.clone()),
    );

    let shadow_metrics = ShadowMetrics::default();
    let shadow = Shadow::start(
        args.shadow_queue,
        args.shadow_workers,
        shadow_metrics.clone(),
    );
    let recommend_metrics = RecommendMetrics::default();
    let recommender = Arc::new(
        Recommender::new(
            models.clone(),
            users.clone(),
            features,
            store,
            Some(shadow),
            RecommendOptions {
                default_model: args.model.clone(),
                max_k: args.max_k,
                max_candidates: args.max_candidates,
                cf_enabled: args.cf,
                inline_scan_max: args.inline_scan_max,
                weights: Weights {
                    cf: args.weight_cf,
                    popularity: args.weight_popularity,
                    freshness: args.weight_freshness,
                    category: args.weight_category,
                },
                ..RecommendOptions::default()
            },
            recommend_metrics.clone(),
        )
        .with_experiments(experiments),
    );
    let tasks = vec![
        impression_writer,
        // Invalidations that could not reach the cache (Redis down) are retried.
        users.spawn_flusher(Duration::from_secs(1)),
        tokio::spawn(models.clone().run(args.model_sync_interval)),
        tokio::spawn(recommender.clone().run_rankings(args.rankings_refresh)),
    ];
    let register = Box::new(
        move |registry: &mut prometheus_client::registry::Registry| {
            recommend_metrics.register(registry);
            experiment_metrics.register(registry);
            shadow_metrics.register(registry);
            routing_metrics.register(registry);
            user_metrics.register(registry);
            model_metrics.register(registry.sub_registry_with_prefix("recsys_scorer"));
        },
    );
    Ok(Started {
        state: RecommendState { recommender, users },
        register,
        tasks,
    })
}
