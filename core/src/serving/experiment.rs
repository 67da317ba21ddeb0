//! The A/B readout of a rollout: which list each user was shown (an impression), which
//! clicks, carts and purchases followed it, and what that says about the candidate against
//! stable.
//!
//! # Impressions and attribution
//!
//! While a model has a canary, every list the scorer serves from it is an [`Impression`]: a
//! request id, the user, the variant and version that produced it and the products in it.
//! A later `click`, `add_to_cart` or `purchase` event of that user on one of those products,
//! within the attribution window ([`DEFAULT_ATTRIBUTION_WINDOW`], 1 hour), is attributed to
//! the newest such impression. Each impression counts at most once per outcome, so the
//! click-through rate is *impressions with a click ÷ impressions* and a user clicking twice
//! on one list is one click; a click on a product the user found elsewhere is not attributed
//! at all. Events a minute older than the impression (client clocks) still count.
//!
//! # Segments
//!
//! Counts are kept per [`Segment`]: the model, its stable and candidate versions and the
//! canary weight. A step of the rollout (10 %, then 50 %) is a segment of its own, because the
//! sample-ratio check needs the split that was promised, and because users who joined the
//! canary at 50 % saw a different experiment from those at 10 %.
//!
//! # The readout
//!
//! [`readout`] compares the canary with stable in one segment:
//! - **CTR** and **conversion** (impressions with a purchase ÷ impressions) per variant, with a
//!   pooled two-proportion z-test of canary against stable ([`crate::stats::two_proportion_test`]);
//!   a difference is called at p < [`SIGNIFICANCE`] (0.05), with both sides at least
//!   [`MIN_IMPRESSIONS`] impressions. Impressions of one user are not independent, so read the
//!   p-value as a guide rather than an exact error rate, and decide on a sample size before
//!   looking (one look per step is what the operator's status shows).
//! - **Sample ratio**: distinct users per variant against the canary weight, Pearson's χ²
//!   ([`crate::stats::sample_ratio_p`]); below p [`SAMPLE_RATIO_ALARM`] (0.001, the usual
//!   alarm) the split is not the one routing promised: users lost before their impression is
//!   recorded, bots, a pod with a stale table. A mismatch makes every other figure of the
//!   segment suspect.
//!
//! # Stores
//!
//! [`RedisExperimentStore`] (every scorer pod shares the counts and the impressions, so a
//! click posted to one pod is attributed to a list another pod served) and
//! [`InProcessExperimentStore`] (one process, local mode). Key schema (Redis), next to the
//! online store's and the user states':
//!
//! ```text
//! {prefix}:x:imp:{user_id}                           list   the user's newest impressions (JSON), TTL the window
//! {prefix}:x:att:{request_id}                        hash   outcomes attributed to the impression, TTL the window
//! {prefix}:x:{model}:segments                        zset   segment keys by first impression time
//! {prefix}:x:{model}:s:{segment}                     hash   {variant}:{impressions|click|add_to_cart|purchase}
//! {prefix}:x:{model}:s:{segment}:users:{variant}     HyperLogLog of the variant's users (±0.81 %)
//! ```
//!
//! Segment keys expire [`SEGMENT_TTL`] (30 days) after their last impression.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use super::routing::{ModelRoute, Variant};
use crate::cf::interactions::EventType;
use crate::events::EventRow;

/// How long after an impression an outcome is attributed to it.
pub const DEFAULT_ATTRIBUTION_WINDOW: Duration = Duration::from_secs(3600);
/// How much earlier than the impression an event may be stamped (client clocks) and still be
/// attributed to it.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Impressions kept per user.
pub const IMPRESSIONS_PER_USER: usize = 20;
/// How long a segment's counts are kept after its last impression.
pub const SEGMENT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Significance level of the CTR and conversion tests.
pub const SIGNIFICANCE: f64 = 0.05;
/// Below this p-value the split does not match the weight.
pub const SAMPLE_RATIO_ALARM: f64 = 0.001;
/// Impressions each variant needs before a difference is called.
pub const MIN_IMPRESSIONS: u64 = 100;
/// Users a segment needs before its split is judged.
pub const MIN_USERS: u64 = 100;

/// A new request id: 128 random bits in hex.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// What followed an impression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A click on a recommended product.
    Click,
    /// A recommended product put in the cart.
    AddToCart,
    /// A recommended product bought.
    Purchase,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 3] = [Self::Click, Self::AddToCart, Self::Purchase];

    /// The outcome of an event type; views and ratings are none.
    pub fn of(kind: EventType) -> Option<Self> {
        match kind {
            EventType::Click => Some(Self::Click),
            EventType::AddToCart => Some(Self::AddToCart),
            EventType::Purchase => Some(Self::Purchase),
            EventType::View | EventType::Rating => None,
        }
    }

    /// The event type's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Click => "click",
            Self::AddToCart => "add_to_cart",
            Self::Purchase => "purchase",
        }
    }
}

/// One experiment: a model's stable and candidate versions at one canary weight.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Segment {
    /// The model.
    pub model: String,
    /// The stable version.
    pub stable: String,
    /// The candidate (canary) version.
    pub candidate: String,
    /// Percentage of users on the candidate.
    pub canary_weight: u8,
}

impl Segment {
    /// The segment a route is running, if it has a canary taking users.
    pub fn of_route(route: &ModelRoute) -> Option<Self> {
        let canary = route.canary().filter(|c| c.weight() > 0)?;
        Some(Self {
            model: route.model().to_owned(),
            stable: route.stable().to_owned(),
            candidate: canary.version().to_owned(),
            canary_weight: canary.weight(),
        })
    }

    /// `{stable}/{candidate}/{weight}`: versions are path segments, so `/` separates them.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.stable, self.candidate, self.canary_weight)
    }

    /// The segment of `model` with key `key`.
    pub fn parse(model: &str, key: &str) -> Option<Self> {
        let mut parts = key.rsplitn(3, '/');
        let weight = parts.next()?.parse().ok()?;
        let candidate = parts.next()?;
        let stable = parts.next()?;
        Some(Self {
            model: model.to_owned(),
            stable: stable.to_owned(),
            candidate: candidate.to_owned(),
            canary_weight: weight,
        })
    }

    /// The version a variant serves in this segment.
    pub fn version(&self, variant: Variant) -> &str {
        match variant {
            Variant::Canary => &self.candidate,
            Variant::Stable => &self.stable,
        }
    }
}

/// A served list while an experiment runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Impression {
    /// The answer's request id.
    pub request_id: String,
    /// The user.
    pub user_id: String,
    /// The experiment.
    pub segment: Segment,
    /// Which side of it served the list.
    pub variant: Variant,
    /// The products shown, best first.
    pub products: Vec<String>,
    /// When it was served, ms since the epoch.
    pub at_ms: i64,
}

/// The newest of `impressions` (any order) that an outcome on `product` at `at_ms` belongs to:
/// it showed the product, no more than `window` before the event and no more than
/// [`CLOCK_SKEW`] after it.
pub fn attribution<'a>(
    impressions: &'a [Impression],
    product: &str,
    at_ms: i64,
    window: Duration,
) -> Option<&'a Impression> {
    let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    let skew = i64::try_from(CLOCK_SKEW.as_millis()).unwrap_or(0);
    impressions
        .iter()
        .filter(|i| {
            i.at_ms <= at_ms.saturating_add(skew)
                && at_ms.saturating_sub(i.at_ms) <= window
                && i.products.iter().any(|p| p == product)
        })
        .max_by_key(|i| i.at_ms)
}

/// Counts of one variant in one segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariantCounts {
    /// Distinct users who were served a list (approximate in Redis: ±0.81 %).
    pub users: u64,
    /// Lists served.
    pub impressions: u64,
    /// Impressions followed by a click.
    pub clicked: u64,
    /// Impressions followed by an add to cart.
    pub carted: u64,
    /// Impressions followed by a purchase.
    pub purchased: u64,
}

impl VariantCounts {
    fn outcome_mut(&mut self, o: Outcome) -> &mut u64 {
        match o {
            Outcome::Click => &mut self.clicked,
            Outcome::AddToCart => &mut self.carted,
            Outcome::Purchase => &mut self.purchased,
        }
    }

    fn field(variant: Variant, what: &str) -> String {
        format!("{}:{what}", variant.as_str())
    }
}

/// The counts of one segment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentCounts {
    /// The experiment.
    pub segment: Segment,
    /// The first impression, ms since the epoch.
    pub since_ms: i64,
    /// Stable's counts.
    pub stable: VariantCounts,
    /// The canary's counts.
    pub canary: VariantCounts,
}

/// A rate of one variant.
fn rate(x: u64, n: u64) -> Option<f64> {
    (n > 0).then(|| x as f64 / n as f64)
}

/// One variant's side of a readout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VariantReadout {
    /// `stable` or `canary`.
    pub variant: String,
    /// The version it served.
    pub version: String,
    /// Distinct users served.
    pub users: u64,
    /// Lists served.
    pub impressions: u64,
    /// Impressions followed by a click.
    pub clicks: u64,
    /// Impressions followed by an add to cart.
    pub add_to_carts: u64,
    /// Impressions followed by a purchase.
    pub purchases: u64,
    /// `clicks / impressions`.
    pub ctr: Option<f64>,
    /// `purchases / impressions`.
    pub conversion: Option<f64>,
}

impl VariantReadout {
    fn new(variant: Variant, version: &str, c: &VariantCounts) -> Self {
        Self {
            variant: variant.as_str().to_owned(),
            version: version.to_owned(),
            users: c.users,
            impressions: c.impressions,
            clicks: c.clicked,
            add_to_carts: c.carted,
            purchases: c.purchased,
            ctr: rate(c.clicked, c.impressions),
            conversion: rate(c.purchased, c.impressions),
        }
    }
}

/// A rate of the canary against stable's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Comparison {
    /// Canary's rate ÷ stable's − 1.
    pub lift: Option<f64>,
    /// The pooled two-proportion z statistic (positive: the canary is higher).
    pub z: f64,
    /// Its two-sided p-value.
    pub p_value: f64,
    /// `p_value < 0.05` with at least 100 impressions on each side.
    pub significant: bool,
}

/// The split of users against the canary weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SampleRatio {
    /// The canary weight as a share.
    pub expected_canary_share: f64,
    /// The canary's share of the distinct users.
    pub observed_canary_share: f64,
    /// χ² goodness of fit.
    pub p_value: f64,
    /// `p_value < 0.001` with at least 100 users: the split is not what routing promised.
    pub mismatch: bool,
}

/// The readout of one segment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Readout {
    /// The stable version.
    pub stable_version: String,
    /// The candidate version.
    pub candidate_version: String,
    /// Percentage of users routed to the candidate.
    pub canary_weight: u8,
    /// The first impression of the segment, ms since the epoch.
    pub since_ms: i64,
    /// Stable, then canary.
    pub variants: Vec<VariantReadout>,
    /// CTR of canary against stable; `null` until both sides have impressions and clicks vary.
    pub ctr: Option<Comparison>,
    /// Conversion of canary against stable, likewise.
    pub conversion: Option<Comparison>,
    /// The split; `null` until both sides have users.
    pub sample_ratio: Option<SampleRatio>,
    /// The readout in one sentence.
    pub summary: String,
}

/// The answer of `GET /v1/experiments`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExperimentsAnswer {
    /// The model.
    pub model: String,
    /// How long after an impression a click, cart or purchase is attributed to it.
    pub attribution_window_seconds: u64,
    /// One readout per segment (stable, candidate, canary weight), newest first.
    pub segments: Vec<Readout>,
}

/// The comparison of canary with stable in one segment.
pub fn readout(counts: &SegmentCounts) -> Readout {
    let (s, c) = (&counts.stable, &counts.canary);
    let enough = s.impressions >= MIN_IMPRESSIONS && c.impressions >= MIN_IMPRESSIONS;
    let compare = |xs: u64, xc: u64| {
        crate::stats::two_proportion_test(
            xs as f64,
            s.impressions as f64,
            xc as f64,
            c.impressions as f64,
        )
        .map(|t| Comparison {
            lift: t.lift,
            z: t.z,
            p_value: t.p_value,
            significant: enough && t.p_value < SIGNIFICANCE,
        })
    };
    let ctr = compare(s.clicked, c.clicked);
    let conversion = compare(s.purchased, c.purchased);
    let share = f64::from(counts.segment.canary_weight) / 100.0;
    let sample_ratio = (s.users > 0 && c.users > 0 && share > 0.0 && share < 1.0)
        .then(|| {
            let p = crate::stats::sample_ratio_p(
                &[s.users as f64, c.users as f64],
                &[1.0 - share, share],
            )?;
            Some(SampleRatio {
                expected_canary_share: share,
                observed_canary_share: c.users as f64 / (s.users + c.users) as f64,
                p_value: p,
                mismatch: s.users + c.users >= MIN_USERS && p < SAMPLE_RATIO_ALARM,
            })
        })
        .flatten();
    let seg = &counts.segment;
    let summary = summarize(seg, s, c, ctr.as_ref(), sample_ratio.as_ref());
    Readout {
        stable_version: seg.stable.clone(),
        candidate_version: seg.candidate.clone(),
        canary_weight: seg.canary_weight,
        since_ms: counts.since_ms,
        variants: vec![
            VariantReadout::new(Variant::Stable, &seg.stable, s),
            VariantReadout::new(Variant::Canary, &seg.candidate, c),
        ],
        ctr,
        conversion,
        sample_ratio,
        summary,
    }
}

fn summarize(
    seg: &Segment,
    s: &VariantCounts,
    c: &VariantCounts,
    ctr: Option<&Comparison>,
    split: Option<&SampleRatio>,
) -> String {
    if let Some(r) = split.filter(|r| r.mismatch) {
        return format!(
            "sample ratio mismatch: {:.1}% of users on {} where {}% were routed (p {:.2e}); the other figures are suspect",
            r.observed_canary_share * 100.0,
            seg.candidate,
            seg.canary_weight,
            r.p_value
        );
    }
    let pct =
        |x: u64, n: u64| rate(x, n).map_or("n/a".to_owned(), |r| format!("{:.2}%", r * 100.0));
    let rates = format!(
        "CTR {} {} ({} impressions) against {} {} ({})",
        seg.candidate,
        pct(c.clicked, c.impressions),
        c.impressions,
        seg.stable,
        pct(s.clicked, s.impressions),
        s.impressions
    );
    match ctr {
        Some(t) if t.significant => format!(
            "{rates}: {} by {:+.1}% (p {:.3})",
            if t.z > 0.0 { "higher" } else { "lower" },
            t.lift.unwrap_or(0.0) * 100.0,
            t.p_value
        ),
        Some(t) if s.impressions >= MIN_IMPRESSIONS && c.impressions >= MIN_IMPRESSIONS => {
            format!("{rates}: no significant difference (p {:.3})", t.p_value)
        }
        _ => format!("{rates}: too few impressions or clicks to compare yet"),
    }
}

/// A store of impressions and attributions failed.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// Redis refused or could not be reached.
    #[error("experiment store: {op}: {source}")]
    Redis {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// A stored impression could not be read.
    #[error("experiment store: impression of {user:?} is unreadable: {reason}")]
    Corrupt {
        /// Whose.
        user: String,
        /// Why.
        reason: String,
    },
}

/// Where impressions, attributions and counts are kept.
#[async_trait]
pub trait ExperimentStore: Send + Sync + std::fmt::Debug {
    /// Which store, for logs.
    fn backend(&self) -> &'static str;

    /// Records a served list and counts it.
    async fn record(&self, impression: &Impression) -> Result<(), ExperimentError>;

    /// The user's impressions of the last window.
    async fn impressions(&self, user_id: &str) -> Result<Vec<Impression>, ExperimentError>;

    /// Counts `outcome` for `impression`, once: `false` when it was already counted.
    async fn attribute(
        &self,
        impression: &Impression,
        outcome: Outcome,
    ) -> Result<bool, ExperimentError>;

    /// The counts of `model`'s segments, newest first.
    async fn segments(&self, model: &str) -> Result<Vec<SegmentCounts>, ExperimentError>;
}

/// What one batch of events was attributed to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attributed {
    /// `(model, variant, outcome)` of each attribution counted.
    pub counted: Vec<(String, Variant, Outcome)>,
}

/// Attributes the outcomes among `rows` to the impressions they followed (within `window`).
/// Each user's impressions are read once.
pub async fn attribute_events(
    store: &dyn ExperimentStore,
    rows: &[EventRow],
    window: Duration,
    now_ms: i64,
) -> Result<Attributed, ExperimentError> {
    let mut by_user: BTreeMap<&str, Vec<(&EventRow, Outcome)>> = BTreeMap::new();
    for r in rows {
        if let Some(o) = Outcome::of(r.event.kind) {
            by_user.entry(&r.event.user).or_default().push((r, o));
        }
    }
    let mut out = Attributed::default();
    for (user, events) in by_user {
        let impressions = store.impressions(user).await?;
        if impressions.is_empty() {
            continue;
        }
        for (row, outcome) in events {
            let at = row.event.ts_ms.unwrap_or(now_ms);
            if let Some(imp) = attribution(&impressions, &row.event.item, at, window)
                && store.attribute(imp, outcome).await?
            {
                out.counted
                    .push((imp.segment.model.clone(), imp.variant, outcome));
            }
        }
    }
    Ok(out)
}

fn window_ms(window: Duration) -> i64 {
    i64::try_from(window.saturating_add(CLOCK_SKEW).as_millis()).unwrap_or(i64::MAX)
}

/// Impressions and counts in one process (local mode and tests). Users' impressions are
/// dropped after the window; at most `max_users` users are kept (the oldest impressions go
/// first).
#[derive(Debug)]
pub struct InProcessExperimentStore {
    window: Duration,
    max_users: usize,
    inner: Mutex<Memory>,
}

#[derive(Debug, Default)]
struct Memory {
    impressions: HashMap<String, Vec<Impression>>,
    /// Outcomes counted, with the time of their impression (dropped after the window).
    attributed: HashMap<(String, Outcome), i64>,
    segments: HashMap<String, BTreeMap<Segment, SegmentCounts>>,
    users: HashMap<(Segment, Variant), HashSet<String>>,
}

impl SegmentCounts {
    fn side(&mut self, variant: Variant) -> &mut VariantCounts {
        match variant {
            Variant::Canary => &mut self.canary,
            Variant::Stable => &mut self.stable,
        }
    }
}

impl Memory {
    fn counts(&mut self, segment: &Segment) -> Option<&mut SegmentCounts> {
        self.segments.get_mut(&segment.model)?.get_mut(segment)
    }

    /// Drops what is older than `horizon` once the store holds more than `max_users` users.
    fn prune(&mut self, horizon: i64, max_users: usize, incoming: &str) {
        if self.impressions.len() >= max_users && !self.impressions.contains_key(incoming) {
            self.impressions
                .retain(|_, list| list.iter().any(|i| i.at_ms >= horizon));
            if self.impressions.len() >= max_users
                && let Some(oldest) = self
                    .impressions
                    .iter()
                    .min_by_key(|(_, l)| l.iter().map(|i| i.at_ms).max())
                    .map(|(u, _)| u.clone())
            {
                self.impressions.remove(&oldest);
            }
        }
        if self.attributed.len() > max_users.saturating_mul(IMPRESSIONS_PER_USER) {
            self.attributed.retain(|_, at| *at >= horizon);
        }
    }
}

impl InProcessExperimentStore {
    /// A store attributing within `window`.
    pub fn new(window: Duration, max_users: usize) -> Self {
        Self {
            window,
            max_users: max_users.max(1),
            inner: Mutex::new(Memory::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ExperimentStore for InProcessExperimentStore {
    fn backend(&self) -> &'static str {
        "in-process"
    }

    async fn record(&self, imp: &Impression) -> Result<(), ExperimentError> {
        let mut m = self.lock();
        let horizon = imp.at_ms.saturating_sub(window_ms(self.window));
        m.prune(horizon, self.max_users, &imp.user_id);
        let list = m.impressions.entry(imp.user_id.clone()).or_default();
        list.retain(|i| i.at_ms >= horizon);
        list.push(imp.clone());
        if list.len() > IMPRESSIONS_PER_USER {
            list.remove(0);
        }
        let new_user = m
            .users
            .entry((imp.segment.clone(), imp.variant))
            .or_default()
            .insert(imp.user_id.clone());
        let side = m
            .segments
            .entry(imp.segment.model.clone())
            .or_default()
            .entry(imp.segment.clone())
            .or_insert_with(|| SegmentCounts {
                segment: imp.segment.clone(),
                since_ms: imp.at_ms,
                stable: VariantCounts::default(),
                canary: VariantCounts::default(),
            })
            .side(imp.variant);
        side.impressions += 1;
        side.users += u64::from(new_user);
        Ok(())
    }

    async fn impressions(&self, user_id: &str) -> Result<Vec<Impression>, ExperimentError> {
        Ok(self
            .lock()
            .impressions
            .get(user_id)
            .cloned()
            .unwrap_or_default())
    }

    async fn attribute(&self, imp: &Impression, outcome: Outcome) -> Result<bool, ExperimentError> {
        let mut m = self.lock();
        let key = (imp.request_id.clone(), outcome);
        if m.attributed.contains_key(&key) {
            return Ok(false);
        }
        m.attributed.insert(key, imp.at_ms);
        if let Some(c) = m.counts(&imp.segment) {
            *c.side(imp.variant).outcome_mut(outcome) += 1;
        }
        Ok(true)
    }

    async fn segments(&self, model: &str) -> Result<Vec<SegmentCounts>, ExperimentError> {
        let m = self.lock();
        let mut out: Vec<SegmentCounts> = m
            .segments
            .get(model)
            .into_iter()
            .flat_map(BTreeMap::values)
            .cloned()
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.since_ms));
        Ok(out)
    }
}

/// Impressions and counts in Redis, shared by every scorer pod (key schema in the module
/// docs).
#[derive(Clone)]
pub struct RedisExperimentStore {
    conn: ConnectionManager,
    prefix: String,
    window: Duration,
}

impl std::fmt::Debug for RedisExperimentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisExperimentStore")
            .field("prefix", &self.prefix)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl RedisExperimentStore {
    /// A store over `conn`, with the online store's `prefix`.
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>, window: Duration) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            window,
        }
    }

    fn user_key(&self, user: &str) -> String {
        format!("{}:x:imp:{user}", self.prefix)
    }

    fn segment_key(&self, seg: &Segment) -> String {
        format!("{}:x:{}:s:{}", self.prefix, seg.model, seg.key())
    }

    fn index_key(&self, model: &str) -> String {
        format!("{}:x:{model}:segments", self.prefix)
    }
}

fn redis_err(op: &'static str) -> impl Fn(redis::RedisError) -> ExperimentError {
    move |source| ExperimentError::Redis { op, source }
}

#[async_trait]
impl ExperimentStore for RedisExperimentStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn record(&self, imp: &Impression) -> Result<(), ExperimentError> {
        let json = serde_json::to_string(imp).map_err(|e| ExperimentError::Corrupt {
            user: imp.user_id.clone(),
            reason: e.to_string(),
        })?;
        let user_key = self.user_key(&imp.user_id);
        let seg_key = self.segment_key(&imp.segment);
        let users_key = format!("{seg_key}:users:{}", imp.variant.as_str());
        let index = self.index_key(&imp.segment.model);
        let ttl = i64::try_from(SEGMENT_TTL.as_millis()).unwrap_or(i64::MAX);
        let mut pipe = redis::pipe();
        pipe.cmd("LPUSH")
            .arg(&user_key)
            .arg(json)
            .ignore()
            .cmd("LTRIM")
            .arg(&user_key)
            .arg(0)
            .arg(IMPRESSIONS_PER_USER - 1)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&user_key)
            .arg(window_ms(self.window))
            .ignore()
            .cmd("ZADD")
            .arg(&index)
            .arg("NX")
            .arg(imp.at_ms)
            .arg(imp.segment.key())
            .ignore()
            .cmd("PEXPIRE")
            .arg(&index)
            .arg(ttl)
            .ignore()
            .cmd("HINCRBY")
            .arg(&seg_key)
            .arg(VariantCounts::field(imp.variant, "impressions"))
            .arg(1)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&seg_key)
            .arg(ttl)
            .ignore()
            .cmd("PFADD")
            .arg(&users_key)
            .arg(&imp.user_id)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&users_key)
            .arg(ttl)
            .ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(redis_err("record"))
    }

    async fn impressions(&self, user_id: &str) -> Result<Vec<Impression>, ExperimentError> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = redis::cmd("LRANGE")
            .arg(self.user_key(user_id))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("impressions"))?;
        raw.iter()
            .map(|s| {
                serde_json::from_str(s).map_err(|e| ExperimentError::Corrupt {
                    user: user_id.to_owned(),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    async fn attribute(&self, imp: &Impression, outcome: Outcome) -> Result<bool, ExperimentError> {
        let key = format!("{}:x:att:{}", self.prefix, imp.request_id);
        let mut conn = self.conn.clone();
        let (new, _): (i64, i64) = redis::pipe()
            .cmd("HSETNX")
            .arg(&key)
            .arg(outcome.as_str())
            .arg(1)
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(window_ms(self.window))
            .query_async(&mut conn)
            .await
            .map_err(redis_err("attribute"))?;
        if new == 1 {
            let _: i64 = redis::cmd("HINCRBY")
                .arg(self.segment_key(&imp.segment))
                .arg(VariantCounts::field(imp.variant, outcome.as_str()))
                .arg(1)
                .query_async(&mut conn)
                .await
                .map_err(redis_err("attribute"))?;
        }
        Ok(new == 1)
    }

    async fn segments(&self, model: &str) -> Result<Vec<SegmentCounts>, ExperimentError> {
        let mut conn = self.conn.clone();
        let index: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.index_key(model))
            .arg(0)
            .arg(-1)
            .arg("REV")
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(redis_err("segments"))?;
        let mut out = vec![];
        for (key, since) in index {
            let Some(segment) = Segment::parse(model, &key) else {
                continue;
            };
            let seg_key = self.segment_key(&segment);
            let (fields, stable_users, canary_users): (HashMap<String, u64>, u64, u64) =
                redis::pipe()
                    .cmd("HGETALL")
                    .arg(&seg_key)
                    .cmd("PFCOUNT")
                    .arg(format!("{seg_key}:users:stable"))
                    .cmd("PFCOUNT")
                    .arg(format!("{seg_key}:users:canary"))
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_err("segments"))?;
            let counts = |v: Variant, users: u64| {
                let get = |what: &str| {
                    fields
                        .get(&VariantCounts::field(v, what))
                        .copied()
                        .unwrap_or(0)
                };
                VariantCounts {
                    users,
                    impressions: get("impressions"),
                    clicked: get("click"),
                    carted: get("add_to_cart"),
                    purchased: get("purchase"),
                }
            };
            out.push(SegmentCounts {
                since_ms: since as i64,
                stable: counts(Variant::Stable, stable_users),
                canary: counts(Variant::Canary, canary_users),
                segment,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cf::interactions::Event;

    fn seg(weight: u8) -> Segment {
        Segment {
            model: "als".into(),
            stable: "v1".into(),
            candidate: "v2".into(),
            canary_weight: weight,
        }
    }

    fn imp(id: &str, user: &str, variant: Variant, products: &[&str], at_ms: i64) -> Impression {
        Impression {
            request_id: id.into(),
            user_id: user.into(),
            segment: seg(50),
            variant,
            products: products.iter().map(|p| (*p).to_owned()).collect(),
            at_ms,
        }
    }

    fn event(user: &str, item: &str, kind: EventType, ts: i64) -> EventRow {
        EventRow {
            event_id: format!("{user}-{item}-{ts}"),
            event: Event {
                user: user.into(),
                item: item.into(),
                kind,
                ts_ms: Some(ts),
                value: None,
            },
            category: None,
        }
    }

    #[test]
    fn segment_keys_round_trip_with_slashes_in_the_versions() {
        let s = Segment {
            stable: "2026/12/01".into(),
            ..seg(10)
        };
        assert_eq!(Segment::parse("als", &s.key()), Some(s));
        assert_eq!(Segment::parse("als", "v1/v2/ten"), None);
    }

    #[test]
    fn an_outcome_goes_to_the_newest_impression_that_showed_the_product_within_the_window() {
        let hour = Duration::from_secs(3600);
        let list = [
            imp("a", "u", Variant::Stable, &["p1", "p2"], 1_000_000),
            imp("b", "u", Variant::Stable, &["p2"], 2_000_000),
            imp("c", "u", Variant::Stable, &["p3"], 3_000_000),
        ];
        let id = |p, at| attribution(&list, p, at, hour).map(|i| i.request_id.as_str());
        assert_eq!(id("p2", 3_000_500), Some("b"), "newest that showed it");
        assert_eq!(id("p1", 2_500_000), Some("a"));
        assert_eq!(id("p4", 3_000_500), None, "not shown");
        assert_eq!(id("p1", 1_000_000 + 3_600_001), None, "after the window");
        assert_eq!(id("p3", 3_000_000 - 30_000), Some("c"), "within the skew");
        assert_eq!(id("p3", 3_000_000 - 61_000), None, "before the impression");
    }

    #[tokio::test]
    async fn each_impression_counts_an_outcome_once_and_views_are_not_outcomes() {
        let store = InProcessExperimentStore::new(Duration::from_secs(3600), 100);
        for (i, (user, variant)) in [("u1", Variant::Stable), ("u2", Variant::Canary)]
            .into_iter()
            .enumerate()
        {
            store
                .record(&imp(&format!("r{i}"), user, variant, &["p1", "p2"], 1000))
                .await
                .expect("record");
        }
        store
            .record(&imp("r2", "u1", Variant::Stable, &["p3"], 2000))
            .await
            .expect("record");
        let rows = [
            event("u1", "p1", EventType::Click, 1500),
            event("u1", "p2", EventType::Click, 1600),
            event("u1", "p1", EventType::View, 1500),
            event("u2", "p2", EventType::Purchase, 3000),
            event("u3", "p1", EventType::Click, 1500),
        ];
        let a = attribute_events(&store, &rows, Duration::from_secs(3600), 0)
            .await
            .expect("attribute");
        assert_eq!(
            a.counted,
            vec![
                ("als".to_owned(), Variant::Stable, Outcome::Click),
                ("als".to_owned(), Variant::Canary, Outcome::Purchase),
            ],
            "the second click on r0 is not counted; a view and an unknown user are not"
        );
        let segs = store.segments("als").await.expect("segments");
        assert_eq!(segs.len(), 1);
        let s = &segs[0];
        assert_eq!(
            (s.stable.users, s.stable.impressions, s.stable.clicked),
            (1, 2, 1)
        );
        assert_eq!(
            (s.canary.users, s.canary.impressions, s.canary.purchased),
            (1, 1, 1)
        );
    }

    fn counts(users: u64, impressions: u64, clicked: u64) -> VariantCounts {
        VariantCounts {
            users,
            impressions,
            clicked,
            carted: 0,
            purchased: clicked / 10,
        }
    }

    #[test]
    fn the_readout_finds_a_real_ctr_difference_and_not_a_noise_one() {
        let r = readout(&SegmentCounts {
            segment: seg(50),
            since_ms: 0,
            stable: counts(1000, 2000, 200),
            canary: counts(1010, 2000, 300),
        });
        let ctr = r.ctr.as_ref().expect("a test");
        assert!(ctr.significant && ctr.z > 0.0, "{ctr:?}");
        assert!((ctr.lift.expect("lift") - 0.5).abs() < 1e-9);
        assert!(r.summary.contains("higher by +50.0%"), "{}", r.summary);
        assert!(!r.sample_ratio.as_ref().expect("split").mismatch);

        let noise = readout(&SegmentCounts {
            segment: seg(50),
            since_ms: 0,
            stable: counts(1000, 2000, 200),
            canary: counts(1000, 2000, 210),
        });
        assert!(!noise.ctr.expect("a test").significant);
        assert!(noise.summary.contains("no significant difference"));

        let few = readout(&SegmentCounts {
            segment: seg(50),
            since_ms: 0,
            stable: counts(20, 40, 2),
            canary: counts(20, 40, 20),
        });
        assert!(
            !few.ctr.expect("a test").significant,
            "below 100 impressions"
        );
    }

    #[test]
    fn a_split_unlike_the_weight_is_a_sample_ratio_mismatch() {
        // 10% routed, 15% observed over 4000 users: χ² ≈ 111.
        let r = readout(&SegmentCounts {
            segment: seg(10),
            since_ms: 0,
            stable: counts(3400, 3400, 300),
            canary: counts(600, 600, 60),
        });
        let split = r.sample_ratio.expect("split");
        assert!(split.mismatch && split.p_value < 1e-6, "{split:?}");
        assert!(
            r.summary.starts_with("sample ratio mismatch"),
            "{}",
            r.summary
        );
        let fine = readout(&SegmentCounts {
            segment: seg(10),
            since_ms: 0,
            stable: counts(3610, 3610, 300),
            canary: counts(390, 390, 60),
        });
        assert!(!fine.sample_ratio.expect("split").mismatch);
    }
}
