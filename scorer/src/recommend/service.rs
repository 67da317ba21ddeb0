//! The recommendation service: one request from routing to ranked products.
//!
//! 1. **Routing.** The model snapshot names the version that serves the user (stable or
//!    canary, a sticky hash bucket) and the shadow, if any.
//! 2. **The user.** [`UserStates`] gives the user's factors (trained, or folded in from their
//!    history), interaction count and seen products, from the Redis cache or computed.
//! 3. **Candidates.** CF: an exact top-k scan of the item factors (off the async runtime,
//!    at most one scan per core at a time). Popularity: the ranked lists written by the
//!    `popularity` job, narrowed by the user's category affinity. Both when blending.
//! 4. **Ranking.** One feature-store read per entity kind (products × popularity and
//!    freshness; the user × category affinity), then [`rank::score`]. A product the model
//!    does not know is scored through a stand-in vector (the mean factors of the top products
//!    of its category): the `content` path.
//! 5. **Shadow.** The shadow version gets the same request through a bounded queue.
//!
//! Every dependency degrades instead of failing the request: no model → popularity; no
//! rankings → CF only; no features → the signals count as 0; no user cache or history →
//! trained factors or popularity. Only a request that nothing can answer is a 503.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::features::http::ApiError;
use arc_swap::ArcSwapOption;
use recsys_core::artifacts::ArtifactStore;
use recsys_core::cf::interactions::EventType;
use recsys_core::cf::serving::ServingModel;
use recsys_core::features::online::OnlineFeature;
use recsys_core::features::rankings::{Rankings, read_rankings};
use recsys_core::features::{EntityKey, FeatureRef, FeatureValue};
use recsys_core::serving::routing::Variant;
use recsys_core::serving::users::{FactorSource, UserState, UserStates};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::experiments::Experiments;
use super::metrics::RecommendMetrics;
use super::rank::{self, Path, Signals, Weights};
use super::shadow::{Shadow, ShadowJob};
use crate::features::FeatureService;
use crate::models::{ModelManager, Resolved};

/// Options of recommendations and scores.
#[derive(Clone, Debug)]
pub struct RecommendOptions {
    /// The model served when a request names none.
    pub default_model: String,
    /// `k` when a request gives none.
    pub default_k: usize,
    /// Largest `k`.
    pub max_k: usize,
    /// Largest number of candidates of `POST /v1/scores`.
    pub max_candidates: usize,
    /// Candidates fetched per result before re-ranking.
    pub overfetch: usize,
    /// Whether CF is used; off, every request is ranked by the feature-store signals.
    pub cf_enabled: bool,
    /// Ranking weights.
    pub weights: Weights,
    /// The popularity feature (and its rankings).
    pub popularity: FeatureRef,
    /// The freshness feature.
    pub freshness: FeatureRef,
    /// The user-category affinity feature.
    pub affinity: FeatureRef,
    /// Largest scan (items × factors multiply-adds) run on the request's own runtime thread;
    /// larger scans go to the blocking pool. See [`DEFAULT_INLINE_SCAN_MAX`].
    pub inline_scan_max: usize,
}

/// Scans up to 4 million multiply-adds (about 0.6 ms here; 60k products × 64 factors) run
/// inline. Handing a scan to the blocking pool costs two thread switches, which on 2 cores
/// measured 22% of the throughput of `/v1/recommendations` (1,878 against 2,289 requests/s for
/// 30k × 64, p99 4.56 against 4.36 ms); scans are bounded by the scan semaphore (one per core)
/// either way, so a runtime thread is never held longer than one scan.
pub const DEFAULT_INLINE_SCAN_MAX: usize = 4_000_000;

impl Default for RecommendOptions {
    fn default() -> Self {
        Self {
            default_model: "als".into(),
            default_k: 20,
            max_k: 200,
            max_candidates: 500,
            overfetch: 3,
            cf_enabled: true,
            weights: Weights::default(),
            inline_scan_max: DEFAULT_INLINE_SCAN_MAX,
            popularity: FeatureRef::new("popularity_score", 1),
            freshness: FeatureRef::new("freshness_score", 1),
            affinity: FeatureRef::new("user_category_affinity", 1),
        }
    }
}

/// One recommended or scored product.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Item {
    /// Product id.
    pub product_id: String,
    /// The ranking score.
    pub score: f32,
    /// The model's affinity (`user_product_affinity`), when the model could score it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_product_affinity: Option<f32>,
    /// Which path produced it.
    pub path: Path,
    /// The feature-store signals used.
    pub features: ItemFeatures,
}

/// The ranking features of a product, as used.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ItemFeatures {
    /// `popularity_score`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub popularity_score: Option<f64>,
    /// `freshness_score`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freshness_score: Option<f64>,
    /// The user's share of the product's category in `user_category_affinity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category_affinity: Option<f64>,
}

/// The answer of `GET /v1/recommendations` and `POST /v1/scores`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Answer {
    /// This answer's id: a click, cart or purchase on one of its products is attributed to it
    /// in the A/B readout of a rollout.
    pub request_id: String,
    /// The user.
    pub user_id: String,
    /// The model.
    pub model: String,
    /// The model version that produced it (`null` when no model was available).
    pub version: Option<String>,
    /// `stable` or `canary`.
    pub variant: Option<Variant>,
    /// The user's path: `cf`, `fold_in`, `blend` or `popularity`.
    pub path: Path,
    /// Whether CF took part.
    pub cf_enabled: bool,
    /// The user's interactions known to the service (capped by the history limit).
    pub interactions: usize,
    /// Results, best first.
    pub items: Vec<Item>,
}

/// Parameters of a recommendation request.
#[derive(Clone, Debug, Default)]
pub struct RecommendRequest {
    /// The user.
    pub user_id: String,
    /// How many.
    pub k: usize,
    /// Only this category.
    pub category: Option<String>,
    /// Leave out products the user interacted with.
    pub exclude_seen: bool,
    /// The model (default: the service's).
    pub model: Option<String>,
}

/// Recommendations and scores.
pub struct Recommender {
    models: Arc<ModelManager>,
    users: Arc<UserStates>,
    features: Arc<FeatureService>,
    store: Arc<dyn ArtifactStore>,
    rankings: ArcSwapOption<Rankings>,
    shadow: Option<Shadow>,
    scans: Semaphore,
    options: RecommendOptions,
    metrics: RecommendMetrics,
    experiments: Option<Arc<Experiments>>,
}

impl std::fmt::Debug for Recommender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recommender")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Why a recommendation or a score was not given: the domain's errors. The HTTP status of each
/// is decided in one place, [`RecommendError::status_code`].
#[derive(Debug, thiserror::Error)]
pub enum RecommendError {
    /// The request is wrong: the message names the field.
    #[error("{0}")]
    InvalidRequest(String),
    /// The request names a model the routing table does not route.
    #[error("model: no model {model:?} is served (the routing table names {served})")]
    UnknownModel {
        /// The model asked for.
        model: String,
        /// The models the table routes, comma-separated.
        served: String,
    },
    /// No version of the model is loaded and no popularity rankings are available yet.
    #[error("no version of model {model:?} is loaded and no popularity rankings are available yet")]
    NothingToServe {
        /// The model.
        model: String,
    },
    /// The scorer is shutting down.
    #[error("the scorer is shutting down")]
    ShuttingDown,
    /// A bug: the scoring task failed.
    #[error("scoring failed: {0}")]
    Internal(String),
}

impl RecommendError {
    /// Stable label (the `error` of an answer).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "InvalidRequest",
            Self::UnknownModel { .. } => "UnknownModel",
            Self::NothingToServe { .. } => "NothingToServe",
            Self::ShuttingDown => "ShuttingDown",
            Self::Internal(_) => "Internal",
        }
    }

    /// The HTTP status of the error.
    pub fn status_code(&self) -> u16 {
        match self {
            Self::InvalidRequest(_) => 400,
            Self::UnknownModel { .. } => 404,
            Self::NothingToServe { .. } | Self::ShuttingDown => 503,
            Self::Internal(_) => 500,
        }
    }
}

impl From<RecommendError> for ApiError {
    fn from(e: RecommendError) -> Self {
        ApiError::new(e.status_code(), e.kind(), e.to_string())
    }
}

fn bad_request(message: String) -> RecommendError {
    RecommendError::InvalidRequest(message)
}

impl Recommender {
    /// A service over its dependencies.
    pub fn new(
        models: Arc<ModelManager>,
        users: Arc<UserStates>,
        features: Arc<FeatureService>,
        store: Arc<dyn ArtifactStore>,
        shadow: Option<Shadow>,
        options: RecommendOptions,
        metrics: RecommendMetrics,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            models,
            users,
            features,
            store,
            rankings: ArcSwapOption::empty(),
            shadow,
            scans: Semaphore::new(cores),
            options,
            metrics,
            experiments: None,
        }
    }

    /// Records impressions and attributes outcomes for the A/B readout.
    pub fn with_experiments(mut self, experiments: Arc<Experiments>) -> Self {
        self.experiments = Some(experiments);
        self
    }

    /// The A/B readout's impressions and attribution, when on.
    pub fn experiments(&self) -> Option<&Arc<Experiments>> {
        self.experiments.as_ref()
    }

    /// Records an answer as an impression of the experiment its model runs.
    fn served(&self, answer: &Answer, resolved: Option<&Resolved>) {
        if let (Some(x), Some(r)) = (&self.experiments, resolved) {
            x.served(answer, r.segment.as_ref());
        }
    }

    /// The options.
    pub fn options(&self) -> &RecommendOptions {
        &self.options
    }

    /// The metrics.
    pub fn metrics(&self) -> &RecommendMetrics {
        &self.metrics
    }

    /// The model manager.
    pub fn models(&self) -> &Arc<ModelManager> {
        &self.models
    }

    /// The current popularity rankings, if loaded.
    pub fn rankings(&self) -> Option<Arc<Rankings>> {
        self.rankings.load_full()
    }

    /// Reloads the popularity rankings from the artifact store; the last good ones keep
    /// serving when this fails.
    pub async fn refresh_rankings(&self) -> Result<bool, String> {
        match read_rankings(self.store.as_ref(), &self.options.popularity).await {
            Ok(Some(r)) => {
                let changed = self
                    .rankings
                    .load()
                    .as_ref()
                    .is_none_or(|cur| cur.at_ms != r.at_ms);
                self.rankings.store(Some(Arc::new(r)));
                Ok(changed)
            }
            Ok(None) => Ok(false),
            Err(e) => {
                warn!(error = %e, "popularity rankings refused; the last good ones keep serving");
                Err(e.to_string())
            }
        }
    }

    /// Refreshes the rankings every `interval`.
    pub async fn run_rankings(self: Arc<Self>, interval: Duration) {
        loop {
            let _ = self.refresh_rankings().await;
            tokio::time::sleep(interval).await;
        }
    }

    fn check_user(user_id: &str) -> Result<(), RecommendError> {
        recsys_core::serving::users::validate_user_id(user_id)
            .map_err(|e| bad_request(format!("user_id: {e}")))
    }

    fn check_product(field: &str, id: &str) -> Result<(), RecommendError> {
        if id.is_empty() || id.len() > 512 || id.chars().any(char::is_control) {
            return Err(bad_request(format!(
                "{field}: {:?} is not a product id (1–512 characters, no control characters)",
                id.chars().take(64).collect::<String>()
            )));
        }
        Ok(())
    }

    /// Routing and the user's state; `None` for both when no model can serve.
    async fn user(
        &self,
        model: &str,
        user_id: &str,
    ) -> Result<(Option<Resolved>, Option<UserState>), RecommendError> {
        let snapshot = self.models.snapshot();
        let resolved = match snapshot.resolve(model, Some(user_id)) {
            Ok(r) => Some(r),
            Err(crate::models::ResolveError::UnknownModel(m))
                if snapshot.table.as_ref().is_some_and(|t| !t.is_empty()) =>
            {
                let served = snapshot.table.as_ref().map(|t| {
                    t.routes()
                        .map(|r| r.model().to_owned())
                        .collect::<Vec<_>>()
                        .join(", ")
                });
                return Err(RecommendError::UnknownModel {
                    model: m,
                    served: served.unwrap_or_default(),
                });
            }
            Err(e) => {
                debug!(error = %e, "no model: popularity only");
                None
            }
        };
        let state = match &resolved {
            Some(r) => Some(
                self.users
                    .get_or_build(&r.model, user_id)
                    .await
                    .map_err(|e| bad_request(format!("user_id: {e}")))?,
            ),
            None => None,
        };
        Ok((resolved, state))
    }

    /// The CF share and the user's path: a trained user is all CF; a folded-in user's share
    /// grows with their interactions; no factors (or CF off) is popularity.
    fn share_and_path(&self, state: Option<&UserState>) -> (f32, Path) {
        let interactions = state.map_or(0, |s| s.interactions);
        let trained = state.is_some_and(|s| s.source == FactorSource::Trained);
        let share = rank::cf_share(
            if trained {
                rank::CF_FULL_AT
            } else {
                interactions
            },
            self.options.cf_enabled && state.is_some_and(|s| s.factors.is_some()),
        );
        (
            share,
            Self::path_of(state.map(|s| s.source), interactions, share),
        )
    }

    /// One result: its signals, its score, its path.
    #[allow(clippy::too_many_arguments)]
    fn item(
        &self,
        product_id: String,
        cf: Option<f32>,
        item_path: Path,
        share: f32,
        signals: &HashMap<String, (Option<f64>, Option<f64>)>,
        affinity: &BTreeMap<String, f64>,
        rankings: Option<&Rankings>,
    ) -> Item {
        let (pop, fresh) = signals.get(&product_id).copied().unwrap_or((None, None));
        let cat = rankings
            .and_then(|r| r.category_of.get(&product_id))
            .and_then(|c| affinity.get(c))
            .copied();
        let s = Signals {
            cf: cf.filter(|_| share > 0.0),
            popularity: pop,
            freshness: fresh,
            category_affinity: cat,
        };
        Item {
            score: rank::score(&s, &self.options.weights, share),
            user_product_affinity: cf,
            path: if share > 0.0 {
                item_path
            } else {
                Path::Popularity
            },
            features: ItemFeatures {
                popularity_score: pop,
                freshness_score: fresh,
                category_affinity: cat,
            },
            product_id,
        }
    }

    fn path_of(source: Option<FactorSource>, interactions: usize, share: f32) -> Path {
        match source {
            _ if share == 0.0 => Path::Popularity,
            Some(FactorSource::Trained) => Path::Cf,
            Some(FactorSource::FoldIn) if interactions >= rank::CF_FULL_AT => Path::FoldIn,
            Some(FactorSource::FoldIn) => Path::Blend,
            _ => Path::Popularity,
        }
    }

    /// Runs a CPU-bound closure of `cost` multiply-adds, at most one per core at a time:
    /// inline up to [`RecommendOptions::inline_scan_max`], else on the blocking pool.
    async fn cpu<T: Send + 'static>(
        &self,
        cost: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, RecommendError> {
        let _permit = self
            .scans
            .acquire()
            .await
            .map_err(|_| RecommendError::ShuttingDown)?;
        if cost <= self.options.inline_scan_max {
            return Ok(f());
        }
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| RecommendError::Internal(e.to_string()))
    }

    fn resolve(&self, f: &FeatureRef) -> Option<OnlineFeature> {
        self.features
            .resolve(&format!("{}@{}", f.name, f.major))
            .ok()
    }

    /// `popularity_score` and `freshness_score` of `products`, one read; a feature not in the
    /// catalog counts as missing.
    async fn product_signals(
        &self,
        products: &[String],
    ) -> HashMap<String, (Option<f64>, Option<f64>)> {
        let resolved = [&self.options.popularity, &self.options.freshness].map(|f| self.resolve(f));
        if products.is_empty() || resolved.iter().all(Option::is_none) {
            return HashMap::new();
        }
        let features: Vec<OnlineFeature> = resolved
            .iter()
            .zip([&self.options.popularity, &self.options.freshness])
            .map(|(r, f)| {
                r.clone()
                    .unwrap_or_else(|| OnlineFeature::new(f.clone(), Duration::from_secs(1)))
            })
            .collect();
        let entities: Vec<EntityKey> = products
            .iter()
            .map(|p| EntityKey::product(p.clone()))
            .collect();
        let Ok(batch) = self.features.reader().read(&entities, &features).await else {
            return HashMap::new();
        };
        let float = |known: bool, v: &Option<FeatureValue>| match v {
            Some(FeatureValue::Float(x)) if known => Some(*x),
            Some(FeatureValue::Int(x)) if known => Some(*x as f64),
            _ => None,
        };
        products
            .iter()
            .enumerate()
            .map(|(e, p)| {
                let row = batch.row(e);
                let pop = float(resolved[0].is_some(), &row[0].value);
                let fresh = float(resolved[1].is_some(), &row[1].value);
                (p.clone(), (pop, fresh))
            })
            .collect()
    }

    /// The user's `user_category_affinity` shares; none when missing or unreadable.
    async fn user_affinity(&self, user_id: &str) -> BTreeMap<String, f64> {
        let Some(f) = self.resolve(&self.options.affinity) else {
            return BTreeMap::new();
        };
        let user = [EntityKey::user(user_id.to_owned())];
        match self
            .features
            .reader()
            .read(&user, std::slice::from_ref(&f))
            .await
        {
            Ok(b) => match &b.row(0)[0].value {
                Some(FeatureValue::String(s)) => rank::parse_affinity(s),
                _ => BTreeMap::new(),
            },
            Err(_) => BTreeMap::new(),
        }
    }

    /// Product signals and the user's affinity, read concurrently.
    async fn signals(
        &self,
        user_id: &str,
        products: &[String],
    ) -> (
        HashMap<String, (Option<f64>, Option<f64>)>,
        BTreeMap<String, f64>,
    ) {
        tokio::join!(self.product_signals(products), self.user_affinity(user_id))
    }

    /// `GET /v1/recommendations`.
    pub async fn recommend(&self, req: RecommendRequest) -> Result<Answer, RecommendError> {
        let (model, user) = (req.model.clone(), req.user_id.clone());
        let answer = self.recommend_steps(req).await;
        if let Err(e) = &answer {
            self.failed("recommendations", model, &user, e);
        }
        answer
    }

    /// Counts a request that failed on the server's side against the variant its user is
    /// routed to (the rollout analysis compares the variants' error rates).
    fn failed(
        &self,
        endpoint: &'static str,
        model: Option<String>,
        user: &str,
        e: &RecommendError,
    ) {
        if e.status_code() < 500 {
            return;
        }
        let model = model.unwrap_or_else(|| self.options.default_model.clone());
        let variant = self
            .models
            .snapshot()
            .resolve(&model, Some(user))
            .ok()
            .map(|r| r.variant);
        self.metrics.failed(endpoint, variant);
    }

    async fn recommend_steps(&self, req: RecommendRequest) -> Result<Answer, RecommendError> {
        let started = Instant::now();
        Self::check_user(&req.user_id)?;
        if req.k == 0 || req.k > self.options.max_k {
            return Err(bad_request(format!(
                "k: {} is out of range 1–{}",
                req.k, self.options.max_k
            )));
        }
        if let Some(c) = &req.category
            && (c.is_empty() || c.len() > 256)
        {
            return Err(bad_request("category: 1–256 characters".into()));
        }
        let model_name = req
            .model
            .clone()
            .unwrap_or_else(|| self.options.default_model.clone());
        let (resolved, state) = self.user(&model_name, &req.user_id).await?;
        let rankings = self.rankings();
        let interactions = state.as_ref().map_or(0, |s| s.interactions);
        let factors = state.as_ref().and_then(|s| s.factors.clone());
        let (share, path) = self.share_and_path(state.as_ref());
        if resolved.is_none() && rankings.is_none() {
            return Err(RecommendError::NothingToServe { model: model_name });
        }
        let fetch = req.k * self.options.overfetch.max(1);
        let seen_rows: Vec<u32> = state.as_ref().map(|s| s.seen.clone()).unwrap_or_default();
        let seen_ids: HashSet<String> = match &resolved {
            Some(r) if req.exclude_seen => seen_rows
                .iter()
                .filter_map(|row| r.model.item_id(*row).map(str::to_owned))
                .collect(),
            _ => HashSet::new(),
        };

        // Candidates: CF, popularity, or both.
        let mut candidates: Vec<(String, Option<f32>, Path)> = vec![];
        if share > 0.0
            && let (Some(r), Some(f)) = (&resolved, &factors)
        {
            let model = r.model.clone();
            let f = f.clone();
            let exclude = if req.exclude_seen {
                seen_rows.clone()
            } else {
                vec![]
            };
            let category = req.category.clone();
            let categories = rankings.clone();
            let cf_path = path;
            let scan_started = Instant::now();
            let cost = model.items() * model.factors();
            let found = self
                .cpu(cost, move || {
                    let allow = |row: u32| -> bool {
                        match (&category, &categories) {
                            (Some(c), Some(r)) => model
                                .item_id(row)
                                .and_then(|id| r.category_of.get(id))
                                .is_some_and(|pc| pc == c),
                            (Some(_), None) => false,
                            _ => true,
                        }
                    };
                    let filter: Option<&dyn Fn(u32) -> bool> = if category.is_some() {
                        Some(&allow)
                    } else {
                        None
                    };
                    model
                        .top_k(&f, fetch, &exclude, filter)
                        .into_iter()
                        .filter_map(|(row, s)| {
                            Some((model.item_id(row)?.to_owned(), Some(s), cf_path))
                        })
                        .collect::<Vec<_>>()
                })
                .await?;
            self.metrics.prediction(&model_name, scan_started.elapsed());
            candidates.extend(found);
        }
        let (signals, affinity) = if share < 1.0 {
            // The user's affinity first: it narrows the popularity candidates.
            let affinity = self.user_affinity(&req.user_id).await;
            if let Some(r) = &rankings {
                let pop: Vec<(&str, f64)> = match &req.category {
                    Some(c) => r
                        .top(Some(c))
                        .iter()
                        .map(|(p, s)| (p.as_str(), *s))
                        .collect(),
                    None => rank::narrow_by_affinity(
                        &affinity,
                        &r.by_category,
                        &r.overall,
                        fetch + seen_ids.len(),
                    ),
                };
                let have: HashSet<String> = candidates.iter().map(|c| c.0.clone()).collect();
                for (p, _) in pop {
                    if !seen_ids.contains(p) && !have.contains(p) {
                        candidates.push((p.to_owned(), None, Path::Popularity));
                    }
                    if candidates.len() >= 2 * fetch {
                        break;
                    }
                }
            }
            let ids: Vec<String> = candidates.iter().map(|c| c.0.clone()).collect();
            (self.product_signals(&ids).await, affinity)
        } else {
            let ids: Vec<String> = candidates.iter().map(|c| c.0.clone()).collect();
            self.signals(&req.user_id, &ids).await
        };

        // Popularity candidates get their CF score too when the user has factors.
        if let (Some(r), Some(f)) = (&resolved, &factors) {
            for c in candidates.iter_mut().filter(|c| c.1.is_none()) {
                if let Some(row) = r.model.item_index(&c.0) {
                    c.1 = r.model.scores(f, &[row]).first().copied();
                } else if share > 0.0 {
                    c.1 = self.stand_in_score(&r.model, f, &c.0, rankings.as_deref());
                    if c.1.is_some() {
                        c.2 = Path::Content;
                    }
                }
            }
        }
        let mut items: Vec<Item> = candidates
            .into_iter()
            .map(|(p, cf, item_path)| {
                self.item(
                    p,
                    cf,
                    item_path,
                    share,
                    &signals,
                    &affinity,
                    rankings.as_deref(),
                )
            })
            .collect();
        items.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(a.product_id.cmp(&b.product_id))
        });
        items.truncate(req.k);

        if let (Some(r), Some(shadow)) = (&resolved, &self.shadow)
            && let Some(sm) = &r.shadow
            && share > 0.0
        {
            shadow.submit(ShadowJob {
                shadow: sm.clone(),
                user_id: req.user_id.clone(),
                interactions: seen_ids
                    .iter()
                    .map(|p| (p.clone(), EventType::View, None))
                    .collect(),
                exclude: seen_ids.iter().cloned().collect(),
                stable: items
                    .iter()
                    .filter_map(|i| Some((i.product_id.clone(), i.user_product_affinity?)))
                    .collect(),
            });
        }
        let answer = Answer {
            request_id: recsys_core::serving::experiment::new_request_id(),
            user_id: req.user_id,
            model: model_name,
            version: resolved.as_ref().map(|r| r.model.version().to_owned()),
            variant: resolved.as_ref().map(|r| r.variant),
            path,
            cf_enabled: self.options.cf_enabled,
            interactions,
            items,
        };
        self.metrics.answered(
            "recommendations",
            &answer,
            state.as_ref().map(|s| s.source),
            started.elapsed(),
        );
        self.served(&answer, resolved.as_ref());
        debug!(
            user = answer.user_id,
            version = ?answer.version,
            variant = ?answer.variant,
            path = answer.path.as_str(),
            top = ?answer.items.iter().take(3).map(|i| (&i.product_id, i.score)).collect::<Vec<_>>(),
            "recommended"
        );
        Ok(answer)
    }

    /// The CF score of a product the model does not know, through the mean factors of the
    /// top products of its category.
    fn stand_in_score(
        &self,
        model: &ServingModel,
        user: &[f32],
        product: &str,
        rankings: Option<&Rankings>,
    ) -> Option<f32> {
        let r = rankings?;
        let category = r.category_of.get(product)?;
        let peers: Vec<&str> = r
            .top(Some(category))
            .iter()
            .take(20)
            .map(|(p, _)| p.as_str())
            .filter(|p| *p != product)
            .collect();
        let v = model.mean_of_items(&peers)?;
        Some(recsys_core::cf::als::dot(user, &v))
    }

    /// `POST /v1/scores`: the user's affinity to each candidate and the ranking, in one pass.
    pub async fn score(
        &self,
        user_id: String,
        product_ids: Vec<String>,
        model: Option<String>,
    ) -> Result<Answer, RecommendError> {
        let user = user_id.clone();
        let answer = self.score_steps(user_id, product_ids, model.clone()).await;
        if let Err(e) = &answer {
            self.failed("scores", model, &user, e);
        }
        answer
    }

    async fn score_steps(
        &self,
        user_id: String,
        product_ids: Vec<String>,
        model: Option<String>,
    ) -> Result<Answer, RecommendError> {
        let started = Instant::now();
        Self::check_user(&user_id)?;
        if product_ids.is_empty() || product_ids.len() > self.options.max_candidates {
            return Err(bad_request(format!(
                "product_ids: {} candidates; give 1–{}",
                product_ids.len(),
                self.options.max_candidates
            )));
        }
        for (i, p) in product_ids.iter().enumerate() {
            Self::check_product(&format!("product_ids[{i}]"), p)?;
        }
        let model_name = model.unwrap_or_else(|| self.options.default_model.clone());
        let (resolved, state) = self.user(&model_name, &user_id).await?;
        let rankings = self.rankings();
        let interactions = state.as_ref().map_or(0, |s| s.interactions);
        let factors = state.as_ref().and_then(|s| s.factors.clone());
        let (share, path) = self.share_and_path(state.as_ref());
        let (signals, affinity) = self.signals(&user_id, &product_ids).await;
        let mut cf: Vec<(Option<f32>, Path)> = vec![(None, Path::Popularity); product_ids.len()];
        if let (Some(r), Some(f)) = (&resolved, &factors) {
            let rows: Vec<Option<u32>> =
                product_ids.iter().map(|p| r.model.item_index(p)).collect();
            let known: Vec<u32> = rows.iter().flatten().copied().collect();
            let scan_started = Instant::now();
            let scores = r.model.scores(f, &known);
            self.metrics.prediction(&model_name, scan_started.elapsed());
            let mut next = scores.into_iter();
            for (i, row) in rows.iter().enumerate() {
                cf[i] = match row {
                    Some(_) => (next.next(), path),
                    None => {
                        match self.stand_in_score(&r.model, f, &product_ids[i], rankings.as_deref())
                        {
                            Some(s) => (Some(s), Path::Content),
                            None => (None, Path::Popularity),
                        }
                    }
                };
            }
        }
        let items: Vec<Item> = product_ids
            .into_iter()
            .zip(cf)
            .map(|(p, (cf, item_path))| {
                self.item(
                    p,
                    cf,
                    item_path,
                    share,
                    &signals,
                    &affinity,
                    rankings.as_deref(),
                )
            })
            .collect();
        let answer = Answer {
            request_id: recsys_core::serving::experiment::new_request_id(),
            user_id,
            model: model_name,
            version: resolved.as_ref().map(|r| r.model.version().to_owned()),
            variant: resolved.as_ref().map(|r| r.variant),
            path,
            cf_enabled: self.options.cf_enabled,
            interactions,
            items,
        };
        self.metrics.answered(
            "scores",
            &answer,
            state.as_ref().map(|s| s.source),
            started.elapsed(),
        );
        self.served(&answer, resolved.as_ref());
        Ok(answer)
    }
}
