//! [`UserStates`]: the cache and the history put together for the scorer, with timeouts,
//! circuit breakers and metrics; [`build_state`]: the pure computation of a state.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cf::serving::ServingModel;
use crate::events::EventRow;

use super::{
    CacheOptions, CachedState, FactorSource, Generation, Interaction, StateKey, UserHistory,
    UserStateCache, UserStateError, UserStateMetrics, now_ms, validate_events, validate_user_id,
};
use crate::breaker::{Breaker, Gate};

/// Histories longer than this are folded in with `block_in_place` on a multi-threaded
/// runtime, so that a long solve does not hold up the other tasks of its worker.
const INLINE_FOLD_IN: usize = 100;

/// A build that took longer than this (from its cache lookup) does not write the cache:
/// an invalidation's tombstone ([`CacheOptions::tombstone_ttl`], default 60 s) may be gone by
/// then, and with it the proof that nothing changed.
const WRITE_WINDOW: Duration = Duration::from_secs(10);

/// Users whose pending invalidations one [`UserStates::flush_pending`] call retries.
const FLUSH_BATCH: usize = 1_000;

/// Invalidations in flight at once.
const INVALIDATE_CHUNK: usize = 256;

/// What the cache did for one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheOutcome {
    /// Served from the cache.
    Hit,
    /// Not cached: computed, then written.
    Miss,
    /// The cache was not used (down, slow, circuit open, or an invalidation of the user is
    /// pending): computed directly, not written.
    Bypassed,
}

impl CacheOutcome {
    /// Wire name: `hit`, `miss`, `bypassed` (responses and metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypassed => "bypassed",
        }
    }
}

/// A user's state for one model version, as the scorer uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct UserState {
    /// The user's factors; `None` when the model cannot place the user (then
    /// [`Self::source`] is [`FactorSource::None`]).
    pub factors: Option<Vec<f32>>,
    /// How the factors came about.
    pub source: FactorSource,
    /// Interactions in the user's history, up to the history limit (the scorer blends
    /// fold-ins with popularity below 5).
    pub interactions: usize,
    /// Of those, interactions with items this model version knows.
    pub known: usize,
    /// Rows of this model version the user already interacted with, ascending and distinct:
    /// the exclusion list of [`ServingModel::top_k`].
    pub seen: Vec<u32>,
    /// What the cache did.
    pub cache: CacheOutcome,
    /// Why the history could not be read ([`UserStateError::kind`], or `CircuitOpen`), if it
    /// could not: then `interactions`, `known` and `seen` are empty, only trained factors
    /// are available, and the state is not cached.
    pub history_error: Option<&'static str>,
}

/// A state computed from a history: [`build_state`]'s answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Built {
    /// How the factors came about.
    pub source: FactorSource,
    /// The factors (`None` for [`FactorSource::None`]).
    pub factors: Option<Vec<f32>>,
    /// Interactions in the history.
    pub interactions: usize,
    /// Of those, with items the model knows.
    pub known: usize,
    /// Rows of the most recent `max_seen` distinct products, ascending.
    pub seen: Vec<u32>,
}

/// Computes a user's state from their history (most recent first): the trained factors if
/// the model knows the user, else a fold-in of the history if any of it is with an item the
/// model knows (a fold-in that comes out all zeros, e.g. from zero ratings, places nobody and
/// counts as none); the rows of the `max_seen` most recent distinct products.
pub fn build_state(
    model: &ServingModel,
    user_id: &str,
    history: &[Interaction],
    max_seen: usize,
) -> Built {
    let known = history
        .iter()
        .filter(|i| model.item_index(&i.product_id).is_some())
        .count();
    let (source, factors) = match model.user_factors(user_id) {
        Some(f) => (FactorSource::Trained, Some(f.to_vec())),
        None if known > 0 => {
            let interactions: Vec<_> = history.iter().map(Interaction::as_fold_in).collect();
            let f = model.fold_in(&interactions).factors;
            if f.iter().all(|x| x.is_finite()) && f.iter().any(|x| *x != 0.0) {
                (FactorSource::FoldIn, Some(f))
            } else {
                (FactorSource::None, None)
            }
        }
        None => (FactorSource::None, None),
    };
    let mut distinct: HashSet<&str> = HashSet::new();
    let mut seen = Vec::new();
    for i in history {
        if distinct.len() >= max_seen {
            break;
        }
        if distinct.insert(&i.product_id)
            && let Some(row) = model.item_index(&i.product_id)
        {
            seen.push(row);
        }
    }
    seen.sort_unstable();
    seen.dedup();
    Built {
        source,
        factors,
        interactions: history.len(),
        known,
        seen,
    }
}

/// Settings of [`UserStates`].
#[derive(Clone, Debug, PartialEq)]
pub struct UserStatesOptions {
    /// Interactions read per user on a miss, newest first (default 500); counts saturate here.
    pub history_limit: usize,
    /// Most recent distinct products kept as seen (default 500).
    pub max_seen: usize,
    /// Longest wait for one cache call (default 20 ms); beyond it the state is computed
    /// directly.
    pub cache_timeout: Duration,
    /// Longest wait for a history read (default 250 ms); beyond it the state has no history.
    pub history_timeout: Duration,
    /// Longest wait for the invalidations of one batch of recorded events (default 500 ms).
    pub invalidation_timeout: Duration,
    /// Longest wait for the history to record a batch of events (default 2 s); beyond it the
    /// batch fails as an outage (whether it was stored is then unknown: a retry under the same
    /// ids stores it once).
    pub record_timeout: Duration,
    /// Consecutive failures (errors or timeouts) of the cache, or of the history, that open
    /// its circuit (default 3).
    pub failure_threshold: u32,
    /// How long an open circuit skips its dependency (default 500 ms); doubled after each
    /// failed probe, up to `max_cooldown` (default 5 s).
    pub cooldown: Duration,
    /// Longest cool-down.
    pub max_cooldown: Duration,
    /// Most users whose failed invalidations are remembered for retry (default 100,000).
    pub max_pending_invalidations: usize,
}

impl Default for UserStatesOptions {
    fn default() -> Self {
        Self {
            history_limit: 500,
            max_seen: 500,
            cache_timeout: Duration::from_millis(20),
            history_timeout: Duration::from_millis(250),
            invalidation_timeout: Duration::from_millis(500),
            record_timeout: Duration::from_secs(2),
            failure_threshold: 3,
            cooldown: Duration::from_millis(500),
            max_cooldown: Duration::from_secs(5),
            max_pending_invalidations: 100_000,
        }
    }
}

impl UserStatesOptions {
    /// Checks the options.
    pub fn validate(&self) -> Result<(), UserStateError> {
        let bad = |m: String| Err(UserStateError::InvalidArgument(m));
        if self.history_limit == 0 || self.history_limit > 100_000 {
            return bad(format!(
                "history_limit is {}; it must be between 1 and 100000",
                self.history_limit
            ));
        }
        if self.max_seen > 100_000 {
            return bad(format!(
                "max_seen is {}; it must be at most 100000",
                self.max_seen
            ));
        }
        for (name, d) in [
            ("cache_timeout", self.cache_timeout),
            ("history_timeout", self.history_timeout),
            ("invalidation_timeout", self.invalidation_timeout),
            ("record_timeout", self.record_timeout),
            ("cooldown", self.cooldown),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be positive"));
            }
        }
        Ok(())
    }
}

/// What [`UserStates::record`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RecordReport {
    /// Events stored (the others were already stored).
    pub new: u64,
    /// Distinct users of the batch.
    pub users: usize,
    /// Users whose cached states were invalidated.
    pub invalidated: usize,
    /// Users whose invalidation could not reach the cache; retried by
    /// [`UserStates::flush_pending`], and this process does not read their cached states
    /// meanwhile.
    pub pending: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dependency {
    Cache,
    History,
}

impl Dependency {
    fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::History => "history",
        }
    }
}

/// A call through a breaker and a timeout.
enum Guarded<T> {
    Done(T),
    Skipped,
    Failed(UserStateError),
}

enum Looked {
    Hit(UserState),
    Miss(Generation),
    Bypassed,
}

/// Per-user state for the scorer: the cache in front, the history behind, the model in
/// memory for the rest. Never fails because a dependency does; fails only on a bad user id
/// (and, in [`Self::record`], on bad events or a history that cannot store them).
pub struct UserStates {
    history: Arc<dyn UserHistory>,
    cache: Arc<dyn UserStateCache>,
    options: UserStatesOptions,
    cache_breaker: Breaker,
    history_breaker: Breaker,
    metrics: UserStateMetrics,
    pending: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for UserStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserStates")
            .field("history", &self.history.backend())
            .field("cache", &self.cache.backend())
            .field("options", &self.options)
            .field("pending", &self.pending_invalidations())
            .finish()
    }
}

impl UserStates {
    /// User states over `history` and `cache`.
    pub fn new(
        history: Arc<dyn UserHistory>,
        cache: Arc<dyn UserStateCache>,
        options: UserStatesOptions,
    ) -> Result<Self, UserStateError> {
        options.validate()?;
        let breaker = || {
            Breaker::new(
                options.failure_threshold,
                options.cooldown,
                options.max_cooldown,
            )
        };
        Ok(Self {
            cache_breaker: breaker(),
            history_breaker: breaker(),
            history,
            cache,
            options,
            metrics: UserStateMetrics::new(),
            pending: Mutex::new(HashSet::new()),
        })
    }

    /// Uses `metrics` (already registered, or to be) instead of private ones.
    pub fn with_metrics(mut self, metrics: UserStateMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The metrics this service updates.
    pub fn metrics(&self) -> &UserStateMetrics {
        &self.metrics
    }

    /// The settings.
    pub fn options(&self) -> &UserStatesOptions {
        &self.options
    }

    /// The history.
    pub fn history(&self) -> &Arc<dyn UserHistory> {
        &self.history
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<dyn UserStateCache> {
        &self.cache
    }

    /// Whether the cache is currently being skipped.
    pub fn cache_circuit_open(&self) -> bool {
        self.cache_breaker.is_open()
    }

    /// Whether the history is currently being skipped.
    pub fn history_circuit_open(&self) -> bool {
        self.history_breaker.is_open()
    }

    /// Users whose invalidation has not reached the cache yet.
    pub fn pending_invalidations(&self) -> usize {
        self.lock_pending().len()
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state of `user_id` for `model`: from the cache, or computed (trained factors, or a
    /// fold-in of the history) and cached. Errors only for a user id that cannot be a key.
    #[tracing::instrument(
        level = "trace",
        skip_all,
        fields(model = model.name(), version = model.version())
    )]
    pub async fn get_or_build(
        &self,
        model: &ServingModel,
        user_id: &str,
    ) -> Result<UserState, UserStateError> {
        if let Err(e) = validate_user_id(user_id) {
            self.metrics.error(e.kind());
            return Err(e);
        }
        let start = Instant::now();
        let key = StateKey {
            model: model.name(),
            version: model.version(),
            user_id,
        };

        // 1. The cache.
        let (outcome, generation) = match self.lookup(model, &key).await {
            Looked::Hit(state) => {
                self.metrics.request(CacheOutcome::Hit.as_str());
                self.metrics
                    .duration("total", start.elapsed().as_secs_f64());
                return Ok(state);
            }
            Looked::Miss(g) => (CacheOutcome::Miss, Some(g)),
            Looked::Bypassed => (CacheOutcome::Bypassed, None),
        };
        let looked_up = Instant::now();

        // 2. The history.
        let history = self.read_history(user_id).await;

        // 3. The state.
        let built_at = Instant::now();
        let built = match &history {
            Ok(h) => self.build(model, user_id, h),
            Err(_) => build_state(model, user_id, &[], 0),
        };
        self.metrics
            .duration("build", built_at.elapsed().as_secs_f64());
        self.metrics.build(built.source.as_str());

        // 4. The cache write: only a complete state, only with the generation it saw.
        if let (Some(generation), Ok(_)) = (generation, &history)
            && looked_up.elapsed() < WRITE_WINDOW
        {
            self.write(&key, generation, &built).await;
        }

        self.metrics.request(outcome.as_str());
        self.metrics
            .duration("total", start.elapsed().as_secs_f64());
        Ok(UserState {
            factors: built.factors,
            source: built.source,
            interactions: built.interactions,
            known: built.known,
            seen: built.seen,
            cache: outcome,
            history_error: history.err(),
        })
    }

    /// Stores events in the history, then invalidates the cached states of their users
    /// (after the history, so that a build that sees the new generation reads the new
    /// history). Fails on bad events or when the history cannot store them; a cache that
    /// cannot be reached leaves the invalidations pending ([`Self::flush_pending`]).
    pub async fn record(&self, events: &[EventRow]) -> Result<RecordReport, UserStateError> {
        if let Err(e) = validate_events(events) {
            self.metrics.error(e.kind());
            return Err(e);
        }
        let recorded =
            tokio::time::timeout(self.options.record_timeout, self.history.record(events))
                .await
                .unwrap_or(Err(UserStateError::Timeout {
                    op: "events record",
                    after: self.options.record_timeout,
                }));
        let new = match recorded {
            Ok(n) => n,
            Err(e) => {
                self.metrics.error(e.kind());
                return Err(e);
            }
        };
        self.metrics.recorded(new);
        let mut users: Vec<&str> = events.iter().map(|e| e.event.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        let failed = self
            .invalidate(&users, self.options.invalidation_timeout)
            .await;
        Ok(RecordReport {
            new,
            users: users.len(),
            invalidated: users.len() - failed,
            pending: failed,
        })
    }

    /// Retries up to 1,000 pending invalidations; returns how many remain pending.
    pub async fn flush_pending(&self) -> usize {
        let batch: Vec<String> = self
            .lock_pending()
            .iter()
            .take(FLUSH_BATCH)
            .cloned()
            .collect();
        if !batch.is_empty() {
            let users: Vec<&str> = batch.iter().map(String::as_str).collect();
            self.invalidate(&users, self.options.invalidation_timeout)
                .await;
        }
        self.pending_invalidations()
    }

    /// Retries pending invalidations every `every` until `self` is dropped (the task holds a
    /// weak reference). The scorer runs one next to its request handlers.
    pub fn spawn_flusher(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                if me.pending_invalidations() > 0 {
                    me.flush_pending().await;
                }
            }
        })
    }

    // -----------------------------------------------------------------------------------------

    async fn lookup(&self, model: &ServingModel, key: &StateKey<'_>) -> Looked {
        // A user whose invalidation is pending: the cache may hold their old state.
        let pending = self.lock_pending().contains(key.user_id);
        if pending
            && self
                .invalidate(&[key.user_id], self.options.cache_timeout)
                .await
                > 0
        {
            return Looked::Bypassed;
        }
        let started = Instant::now();
        let result = self
            .guarded(
                Dependency::Cache,
                "get",
                self.options.cache_timeout,
                self.cache.get(key),
            )
            .await;
        self.metrics
            .duration("cache", started.elapsed().as_secs_f64());
        let lookup = match result {
            Guarded::Done(l) => l,
            Guarded::Skipped | Guarded::Failed(_) => return Looked::Bypassed,
        };
        self.metrics.cache_op("get", "ok");
        if let Some(e) = &lookup.corrupt {
            self.metrics.error(e.kind());
            tracing::warn!(error = %e, "corrupt cached user state; recomputing");
        }
        match lookup.state {
            Some(state) => match self.check_cached(model, key.user_id, state) {
                Some(s) => Looked::Hit(s),
                None => Looked::Miss(lookup.generation),
            },
            None => Looked::Miss(lookup.generation),
        }
    }

    /// A cached state checked against the model it is for.
    fn check_cached(
        &self,
        model: &ServingModel,
        user_id: &str,
        s: CachedState,
    ) -> Option<UserState> {
        let items = model.items();
        let factors = match s.source {
            FactorSource::Trained => model.user_factors(user_id).map(<[f32]>::to_vec),
            FactorSource::FoldIn => (s.factors.len() == model.factors()).then_some(s.factors),
            FactorSource::None => None,
        };
        let valid = (factors.is_some() || s.source == FactorSource::None)
            && s.seen.iter().all(|&r| (r as usize) < items)
            && s.known <= s.interactions;
        if !valid {
            self.metrics.error("CorruptUserState");
            tracing::warn!(
                model = model.name(),
                version = model.version(),
                source = s.source.as_str(),
                "cached user state does not fit its model version; recomputing"
            );
            return None;
        }
        Some(UserState {
            factors,
            source: s.source,
            interactions: s.interactions as usize,
            known: s.known as usize,
            seen: s.seen,
            cache: CacheOutcome::Hit,
            history_error: None,
        })
    }

    async fn read_history(&self, user_id: &str) -> Result<Vec<Interaction>, &'static str> {
        let started = Instant::now();
        let result = self
            .guarded(
                Dependency::History,
                "read",
                self.options.history_timeout,
                self.history.history(user_id, self.options.history_limit),
            )
            .await;
        self.metrics
            .duration("history", started.elapsed().as_secs_f64());
        match result {
            Guarded::Done(h) => {
                self.metrics.history_read("ok");
                Ok(h)
            }
            Guarded::Skipped => Err("CircuitOpen"),
            Guarded::Failed(e) => Err(e.kind()),
        }
    }

    fn build(&self, model: &ServingModel, user_id: &str, history: &[Interaction]) -> Built {
        let max_seen = self.options.max_seen;
        let heavy = history.len() > INLINE_FOLD_IN && model.user_factors(user_id).is_none();
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if heavy && multi_thread {
            tokio::task::block_in_place(|| build_state(model, user_id, history, max_seen))
        } else {
            build_state(model, user_id, history, max_seen)
        }
    }

    async fn write(&self, key: &StateKey<'_>, generation: Generation, built: &Built) {
        let state = CachedState {
            source: built.source,
            factors: match built.source {
                FactorSource::FoldIn => built.factors.clone().unwrap_or_default(),
                _ => vec![],
            },
            interactions: u32::try_from(built.interactions).unwrap_or(u32::MAX),
            known: u32::try_from(built.known).unwrap_or(u32::MAX),
            seen: built.seen.clone(),
            written_at_ms: now_ms(),
        };
        let started = Instant::now();
        let result = self
            .guarded(
                Dependency::Cache,
                "put",
                self.options.cache_timeout,
                self.cache.put(key, generation, &state),
            )
            .await;
        self.metrics
            .duration("cache", started.elapsed().as_secs_f64());
        match result {
            Guarded::Done(true) => self.metrics.cache_op("put", "ok"),
            Guarded::Done(false) => {
                self.metrics.cache_op("put", "superseded");
                tracing::debug!("user invalidated during the build; state not cached");
            }
            Guarded::Skipped | Guarded::Failed(_) => {}
        }
    }

    /// Invalidates `users` in chunks, each within `timeout`; the ones that fail are added to
    /// the pending set (and the ones that succeed removed from it). Returns how many failed.
    async fn invalidate(&self, users: &[&str], timeout: Duration) -> usize {
        let mut failed: Vec<&str> = Vec::new();
        let mut done: Vec<&str> = Vec::new();
        for chunk in users.chunks(INVALIDATE_CHUNK) {
            let all = async {
                let mut results =
                    futures::future::join_all(chunk.iter().map(|u| self.cache.invalidate_user(u)))
                        .await;
                // An outage fails the chunk (and counts against the breaker) once.
                if let Some(i) = results
                    .iter()
                    .position(|r| r.as_ref().is_err_and(UserStateError::is_outage))
                    && let Err(e) = results.swap_remove(i)
                {
                    return Err(e);
                }
                Ok(results)
            };
            match self
                .guarded(Dependency::Cache, "invalidate", timeout, all)
                .await
            {
                Guarded::Done(results) => {
                    for (u, r) in chunk.iter().zip(results) {
                        match r {
                            Ok(()) => {
                                self.metrics.cache_op("invalidate", "ok");
                                done.push(u);
                            }
                            Err(e) => {
                                self.metrics.cache_op("invalidate", "error");
                                self.metrics.error(e.kind());
                                failed.push(u);
                            }
                        }
                    }
                }
                Guarded::Skipped | Guarded::Failed(_) => failed.extend_from_slice(chunk),
            }
        }
        let mut pending = self.lock_pending();
        let was_empty = pending.is_empty();
        for u in &done {
            pending.remove(*u);
        }
        let mut dropped = 0usize;
        for u in &failed {
            if pending.contains(*u) {
                continue;
            }
            if pending.len() < self.options.max_pending_invalidations {
                pending.insert((*u).to_owned());
            } else {
                dropped += 1;
            }
        }
        let n = pending.len();
        drop(pending);
        self.metrics.pending(n);
        if dropped > 0 {
            self.metrics.error("PendingInvalidationsFull");
            tracing::error!(
                dropped,
                limit = self.options.max_pending_invalidations,
                "too many pending user-state invalidations; some users may be served \
                 cached states older than their latest interactions until the cache TTL"
            );
        }
        // Logged once per outage (when the first invalidation is kept), not per batch.
        if !failed.is_empty() && was_empty {
            tracing::warn!(
                users = failed.len(),
                pending = n,
                "user-state invalidations could not reach the cache; kept for retry"
            );
        } else if !failed.is_empty() {
            tracing::debug!(
                users = failed.len(),
                pending = n,
                "invalidations kept for retry"
            );
        }
        failed.len()
    }

    /// Runs `call` unless `dependency`'s circuit is open, within `timeout`; records the
    /// outcome in its breaker and metrics (not the success: the caller labels it).
    async fn guarded<T>(
        &self,
        dependency: Dependency,
        op: &'static str,
        timeout: Duration,
        call: impl Future<Output = Result<T, UserStateError>>,
    ) -> Guarded<T> {
        let breaker = match dependency {
            Dependency::Cache => &self.cache_breaker,
            Dependency::History => &self.history_breaker,
        };
        let outcome = |o: &'static str| match dependency {
            Dependency::Cache => self.metrics.cache_op(op, o),
            Dependency::History => self.metrics.history_read(o),
        };
        let (gate, _probe) = breaker.gate();
        if gate == Gate::Skip {
            outcome("skipped");
            return Guarded::Skipped;
        }
        let err = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => {
                if breaker.success() {
                    self.metrics.circuit(dependency.as_str(), false);
                    tracing::info!(
                        dependency = dependency.as_str(),
                        "user-state {} answers again; circuit closed",
                        dependency.as_str()
                    );
                }
                return Guarded::Done(v);
            }
            Ok(Err(e)) => {
                outcome("error");
                e
            }
            Err(_) => {
                outcome("timeout");
                UserStateError::Timeout {
                    op: match dependency {
                        Dependency::Cache => "cache call",
                        Dependency::History => "history read",
                    },
                    after: timeout,
                }
            }
        };
        self.metrics.error(err.kind());
        if !err.is_outage() {
            tracing::warn!(dependency = dependency.as_str(), op, error = %err, "user-state call failed");
            return Guarded::Failed(err);
        }
        match breaker.failure(gate == Gate::Probe) {
            Some(cooldown) => {
                self.metrics.circuit(dependency.as_str(), true);
                tracing::warn!(
                    dependency = dependency.as_str(),
                    op,
                    error = %err,
                    cooldown_ms = cooldown.as_millis() as u64,
                    "user-state dependency failing; skipping it for the cool-down"
                );
            }
            None => {
                tracing::debug!(dependency = dependency.as_str(), op, error = %err, "user-state call failed")
            }
        }
        Guarded::Failed(err)
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::features::registry::parse_duration_ms(s).map(Duration::from_millis)
}

/// Command-line options of user states, for a binary to flatten (`#[command(flatten)]`).
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct UserStateArgs {
    /// How long a user's cached state (factors, interaction count, seen products) is served.
    #[arg(
        long = "user-state-ttl",
        env = "RECSYS_USER_STATE_TTL",
        default_value = "24h",
        value_parser = parse_duration
    )]
    pub ttl: Duration,
    /// Interactions read per user on a cache miss, newest first.
    #[arg(
        long = "user-history-limit",
        env = "RECSYS_USER_HISTORY_LIMIT",
        default_value_t = 500
    )]
    pub history_limit: usize,
    /// Most recent distinct products excluded as already seen.
    #[arg(
        long = "user-seen-limit",
        env = "RECSYS_USER_SEEN_LIMIT",
        default_value_t = 500
    )]
    pub seen_limit: usize,
    /// Longest wait for one call to the user-state cache; beyond it the state is computed
    /// directly.
    #[arg(
        long = "user-cache-timeout",
        env = "RECSYS_USER_CACHE_TIMEOUT",
        default_value = "20ms",
        value_parser = parse_duration
    )]
    pub cache_timeout: Duration,
    /// Longest wait for a user's history; beyond it only trained factors are served.
    #[arg(
        long = "user-history-timeout",
        env = "RECSYS_USER_HISTORY_TIMEOUT",
        default_value = "250ms",
        value_parser = parse_duration
    )]
    pub history_timeout: Duration,
    /// Longest wait for the store to record a batch of events; beyond it the request fails
    /// with a retryable 503 (a retry is safe: event ids make it idempotent).
    #[arg(
        long = "events-record-timeout",
        env = "RECSYS_EVENTS_RECORD_TIMEOUT",
        default_value = "2s",
        value_parser = parse_duration
    )]
    pub record_timeout: Duration,
}

impl UserStateArgs {
    /// The service options these arguments give (the rest at their defaults).
    pub fn options(&self) -> UserStatesOptions {
        UserStatesOptions {
            history_limit: self.history_limit,
            max_seen: self.seen_limit,
            cache_timeout: self.cache_timeout,
            history_timeout: self.history_timeout,
            record_timeout: self.record_timeout,
            ..UserStatesOptions::default()
        }
    }

    /// The cache options these arguments give (the rest at their defaults).
    pub fn cache_options(&self) -> CacheOptions {
        CacheOptions {
            ttl: self.ttl,
            ..CacheOptions::default()
        }
    }
}

#[cfg(test)]
mod tests;
