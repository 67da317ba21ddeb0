//! The computations of the first features, in one place: the trainer's jobs call them to
//! materialise values, backfills call them over past windows, and consistency tests call them
//! to recompute what the stores hold. Pure functions over events; no I/O.
//!
//! | feature | entity | value |
//! | --- | --- | --- |
//! | `popularity_score` | product | Σ weight(type)·0.5^(age/half-life) over the window, ÷ the maximum over products: (0, 1] |
//! | `freshness_score` | product | 0.5^((now − max(first seen, last updated)) / half-life): 1 for a product seen just now |
//! | `user_category_affinity` | user | JSON object category → share of the user's decayed weight, shares summing to 1 |

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::online::{Fallback, OnlineError};
use super::registry::{FeatureSpec, ValueType, parse_duration_ms};
use super::{EntityKey, EntityKind, FeatureRef, FeatureValue, StoredValue};
use crate::cf::interactions::{Event, EventWeights};

/// Decay factor of an event `age_ms` old.
pub fn decay(age_ms: i64, half_life_ms: i64) -> f64 {
    if half_life_ms <= 0 {
        return 1.0;
    }
    0.5_f64.powf(age_ms.max(0) as f64 / half_life_ms as f64)
}

/// Options of the popularity computation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PopularityOptions {
    /// The time the score describes (ms since the epoch); events after it are ignored.
    pub now_ms: i64,
    /// Rolling window: events older than `now − window` are ignored (90 days by default).
    pub window_ms: i64,
    /// Half-life of the decay (7 days by default).
    pub half_life_ms: i64,
    /// Event weights (purchase 3, add_to_cart 2, view 1; click counts as a view).
    pub weights: EventWeights,
}

const DAY_MS: i64 = 86_400_000;

impl PopularityOptions {
    /// Defaults at time `now_ms`.
    pub fn at(now_ms: i64) -> Self {
        Self {
            now_ms,
            window_ms: 90 * DAY_MS,
            half_life_ms: 7 * DAY_MS,
            weights: EventWeights::default(),
        }
    }
}

/// `popularity_score` per product, sorted by product id. Products without events in the
/// window have no score.
pub fn popularity<'a>(
    events: impl IntoIterator<Item = &'a Event>,
    opts: &PopularityOptions,
) -> Vec<(String, f64)> {
    let start = opts.now_ms - opts.window_ms;
    let mut raw: HashMap<&str, f64> = HashMap::new();
    for e in events {
        let Some(ts) = e.ts_ms else { continue };
        if ts < start || ts > opts.now_ms {
            continue;
        }
        let w = f64::from(opts.weights.weight(e.kind, e.value));
        *raw.entry(e.item.as_str()).or_default() += w * decay(opts.now_ms - ts, opts.half_life_ms);
    }
    let max = raw.values().copied().fold(0.0_f64, f64::max);
    let mut out: Vec<(String, f64)> = raw
        .into_iter()
        .filter(|(_, v)| *v > 0.0)
        .map(|(k, v)| (k.to_owned(), v / max))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// When a product appeared and last changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductTimes {
    /// Product id.
    pub product: String,
    /// First seen (ms since the epoch).
    pub first_seen_ms: i64,
    /// Last updated in the catalog, when known.
    pub last_updated_ms: Option<i64>,
}

/// First-seen times derived from events (no catalog): each product's first event at or
/// before `now_ms`, sorted by product id.
pub fn first_seen<'a>(
    events: impl IntoIterator<Item = &'a Event>,
    now_ms: i64,
) -> Vec<ProductTimes> {
    let mut first: BTreeMap<&str, i64> = BTreeMap::new();
    for e in events {
        if let Some(ts) = e.ts_ms.filter(|t| *t <= now_ms) {
            let slot = first.entry(e.item.as_str()).or_insert(ts);
            *slot = (*slot).min(ts);
        }
    }
    first
        .into_iter()
        .map(|(p, t)| ProductTimes {
            product: p.to_owned(),
            first_seen_ms: t,
            last_updated_ms: None,
        })
        .collect()
}

/// `freshness_score` per product, sorted by product id.
pub fn freshness(products: &[ProductTimes], now_ms: i64, half_life_ms: i64) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = products
        .iter()
        .filter(|p| p.first_seen_ms <= now_ms)
        .map(|p| {
            let latest = p
                .last_updated_ms
                .unwrap_or(p.first_seen_ms)
                .max(p.first_seen_ms)
                .min(now_ms);
            (p.product.clone(), decay(now_ms - latest, half_life_ms))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `user_category_affinity` per user, sorted by user id: each category's share of the user's
/// decayed, weighted interactions within the window. Events without a category are skipped.
pub fn category_affinity(
    events: &[(Event, Option<String>)],
    opts: &PopularityOptions,
) -> Vec<(String, BTreeMap<String, f64>)> {
    let start = opts.now_ms - opts.window_ms;
    let mut per_user: BTreeMap<&str, BTreeMap<&str, f64>> = BTreeMap::new();
    for (e, category) in events {
        let (Some(ts), Some(category)) = (e.ts_ms, category.as_deref()) else {
            continue;
        };
        if ts < start || ts > opts.now_ms {
            continue;
        }
        let w = f64::from(opts.weights.weight(e.kind, e.value))
            * decay(opts.now_ms - ts, opts.half_life_ms);
        *per_user
            .entry(e.user.as_str())
            .or_default()
            .entry(category)
            .or_default() += w;
    }
    per_user
        .into_iter()
        .filter_map(|(user, cats)| {
            let total: f64 = cats.values().sum();
            (total > 0.0).then(|| {
                let shares = cats
                    .into_iter()
                    .map(|(c, w)| (c.to_owned(), w / total))
                    .collect();
                (user.to_owned(), shares)
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Dispatch: a FeatureDefinition's `computation.job` names one of these.

/// The computations a `FeatureDefinition` can name in `computation.job`: the trainer job
/// that materialises it, the backfill that recomputes it and the fallback that computes it on
/// a miss all dispatch here, so each feature's logic exists once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Computation {
    /// `popularity_score`: [`popularity`].
    Popularity,
    /// `freshness_score`: [`freshness`] over [`first_seen`] times.
    Freshness,
    /// `user_category_affinity`: [`category_affinity`], as a JSON object.
    CategoryAffinity,
}

impl Computation {
    /// Every computation.
    pub const ALL: [Self; 3] = [Self::Popularity, Self::Freshness, Self::CategoryAffinity];

    /// The trainer job (subcommand) name, as in `computation.job`.
    pub fn job(self) -> &'static str {
        match self {
            Self::Popularity => "popularity",
            Self::Freshness => "freshness",
            Self::CategoryAffinity => "category-affinity",
        }
    }

    /// The computation a job name stands for.
    pub fn from_job(job: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.job() == job)
    }

    /// The feature the job computes unless told otherwise.
    pub fn default_feature(self) -> &'static str {
        match self {
            Self::Popularity => "popularity_score",
            Self::Freshness => "freshness_score",
            Self::CategoryAffinity => "user_category_affinity",
        }
    }

    /// What the values describe.
    pub fn entity(self) -> EntityKind {
        match self {
            Self::Popularity | Self::Freshness => EntityKind::Product,
            Self::CategoryAffinity => EntityKind::User,
        }
    }

    /// The value type of the values.
    pub fn value_type(self) -> ValueType {
        match self {
            Self::Popularity | Self::Freshness => ValueType::Float,
            Self::CategoryAffinity => ValueType::String,
        }
    }

    /// Whether `computation.window` applies (freshness looks at the whole history).
    pub fn uses_window(self) -> bool {
        !matches!(self, Self::Freshness)
    }

    /// Half-life when the definition gives none.
    pub fn default_half_life_ms(self) -> i64 {
        match self {
            Self::Popularity => 7 * DAY_MS,
            Self::Freshness | Self::CategoryAffinity => 14 * DAY_MS,
        }
    }

    /// Checks that `spec` can be computed by this computation: entity and value type match.
    pub fn check(self, spec: &FeatureSpec) -> Result<(), String> {
        if spec.entity != self.entity() {
            return Err(format!(
                "{} {}: entity is {}, but job {} computes {} features",
                spec.name,
                spec.version,
                spec.entity,
                self.job(),
                self.entity()
            ));
        }
        if spec.value_type != self.value_type() {
            return Err(format!(
                "{} {}: value type is {}, but job {} produces {}",
                spec.name,
                spec.version,
                spec.value_type.as_str(),
                self.job(),
                self.value_type().as_str()
            ));
        }
        Ok(())
    }
}

/// Parameters of one computation run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// The time the values describe (ms since the epoch); later events are ignored.
    pub at_ms: i64,
    /// Window of events (ignored by freshness).
    pub window_ms: i64,
    /// Half-life of the decay.
    pub half_life_ms: i64,
}

impl Params {
    /// The parameters a registered definition prescribes at `at_ms`: its `computation.window`
    /// (default 90 days) and `computation.halfLife` (default per computation).
    pub fn from_spec(c: Computation, spec: &FeatureSpec, at_ms: i64) -> Result<Self, String> {
        let ms = |field: &str, v: &Option<String>, default: i64| -> Result<i64, String> {
            match v.as_deref() {
                None => Ok(default),
                Some(s) => parse_duration_ms(s)
                    .map_err(|e| {
                        format!("{} {}: computation.{field}: {e}", spec.name, spec.version)
                    })
                    .and_then(|v| {
                        i64::try_from(v).map_err(|_| {
                            format!(
                                "{} {}: computation.{field} is too long",
                                spec.name, spec.version
                            )
                        })
                    }),
            }
        };
        Ok(Self {
            at_ms,
            window_ms: ms("window", &spec.computation.window, 90 * DAY_MS)?,
            half_life_ms: ms(
                "halfLife",
                &spec.computation.half_life,
                c.default_half_life_ms(),
            )?,
        })
    }

    /// The earliest event time the computation reads; `None` for the whole history.
    pub fn events_from_ms(&self, c: Computation) -> Option<i64> {
        c.uses_window()
            .then(|| self.at_ms.saturating_sub(self.window_ms))
    }
}

/// What a computation reads: events with their product categories, and for freshness the
/// products' first-seen times when they come from elsewhere than these events (a query over
/// the whole history, or a catalog).
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// Events, any order.
    pub events: &'a [(Event, Option<String>)],
    /// First-seen and last-updated times; derived from `events` when `None`.
    pub products: Option<&'a [ProductTimes]>,
}

/// Runs a computation: one value per entity, sorted by entity id.
pub fn compute(c: Computation, inputs: Inputs<'_>, params: &Params) -> Vec<(String, FeatureValue)> {
    let opts = PopularityOptions {
        now_ms: params.at_ms,
        window_ms: params.window_ms,
        half_life_ms: params.half_life_ms,
        weights: EventWeights::default(),
    };
    let events = || inputs.events.iter().map(|(e, _)| e);
    match c {
        Computation::Popularity => popularity(events(), &opts)
            .into_iter()
            .map(|(k, v)| (k, FeatureValue::Float(v)))
            .collect(),
        Computation::Freshness => {
            let derived;
            let products = match inputs.products {
                Some(p) => p,
                None => {
                    derived = first_seen(events(), params.at_ms);
                    &derived
                }
            };
            freshness(products, params.at_ms, params.half_life_ms)
                .into_iter()
                .map(|(k, v)| (k, FeatureValue::Float(v)))
                .collect()
        }
        Computation::CategoryAffinity => category_affinity(inputs.events, &opts)
            .into_iter()
            .map(|(k, shares)| {
                // A BTreeMap serializes with sorted keys and shortest round-trip floats: the
                // same shares give the same string.
                let json = serde_json::to_string(&shares).unwrap_or_default();
                (k, FeatureValue::String(json))
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Computing on a miss

/// A [`Fallback`] that computes a feature from an events snapshot when the online store has
/// no value: what serving looks like without a feature store, every request recomputing.
/// It counts its computations, so that a test can show the store removes them.
pub struct ComputeFallback {
    events: Arc<Vec<(Event, Option<String>)>>,
    features: HashMap<FeatureRef, (Computation, Params)>,
    computations: AtomicU64,
}

impl std::fmt::Debug for ComputeFallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeFallback")
            .field("events", &self.events.len())
            .field("features", &self.features.len())
            .finish_non_exhaustive()
    }
}

impl ComputeFallback {
    /// A fallback over `events`, computing nothing until features are added.
    pub fn new(events: Arc<Vec<(Event, Option<String>)>>) -> Self {
        Self {
            events,
            features: HashMap::new(),
            computations: AtomicU64::new(0),
        }
    }

    /// Allows computing `feature` with `computation` and `params` on a miss.
    pub fn with_feature(
        mut self,
        feature: FeatureRef,
        computation: Computation,
        params: Params,
    ) -> Self {
        self.features.insert(feature, (computation, params));
        self
    }

    /// Computations run so far (one per feature per fetch that needed it).
    pub fn computations(&self) -> u64 {
        self.computations.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Fallback for ComputeFallback {
    fn name(&self) -> &'static str {
        "compute"
    }

    async fn fetch(
        &self,
        cells: &[(&EntityKey, &FeatureRef)],
    ) -> Result<Vec<Option<StoredValue>>, OnlineError> {
        let mut computed: HashMap<&FeatureRef, HashMap<String, FeatureValue>> = HashMap::new();
        let mut out = Vec::with_capacity(cells.len());
        for (entity, feature) in cells {
            let Some((c, params)) = self.features.get(*feature) else {
                out.push(None);
                continue;
            };
            if entity.kind != c.entity() {
                out.push(None);
                continue;
            }
            let values = computed.entry(*feature).or_insert_with(|| {
                self.computations.fetch_add(1, Ordering::Relaxed);
                let inputs = Inputs {
                    events: &self.events,
                    products: None,
                };
                compute(*c, inputs, params).into_iter().collect()
            });
            out.push(values.get(&entity.id).map(|v| StoredValue {
                value: v.clone(),
                event_time_ms: params.at_ms,
                written_at_ms: crate::features::online::now_ms(),
            }));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cf::interactions::EventType;

    fn ev(user: &str, item: &str, kind: EventType, ts: i64) -> Event {
        Event {
            user: user.into(),
            item: item.into(),
            kind,
            ts_ms: Some(ts),
            value: None,
        }
    }

    #[test]
    fn popularity_weighs_decays_windows_and_normalises() {
        let now = 100 * DAY_MS;
        let opts = PopularityOptions::at(now);
        let events = vec![
            ev("u", "a", EventType::Purchase, now),               // 3
            ev("u", "b", EventType::View, now),                   // 1
            ev("u", "b", EventType::AddToCart, now - 7 * DAY_MS), // 2 · 0.5
            ev("u", "c", EventType::Purchase, now - 91 * DAY_MS), // outside the window
            ev("u", "d", EventType::Purchase, now + 1),           // in the future
        ];
        let got = popularity(&events, &opts);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], ("a".into(), 1.0));
        assert!((got[1].1 - 2.0 / 3.0).abs() < 1e-12, "{got:?}");
        // Recomputing the same window gives the same values (idempotent jobs).
        assert_eq!(popularity(&events, &opts), got);
    }

    #[test]
    fn freshness_halves_per_half_life_and_updates_refresh() {
        let now = 10 * DAY_MS;
        let products = vec![
            ProductTimes {
                product: "new".into(),
                first_seen_ms: now,
                last_updated_ms: None,
            },
            ProductTimes {
                product: "old".into(),
                first_seen_ms: now - 14 * DAY_MS,
                last_updated_ms: None,
            },
            ProductTimes {
                product: "updated".into(),
                first_seen_ms: now - 14 * DAY_MS,
                last_updated_ms: Some(now - 7 * DAY_MS),
            },
        ];
        let got: BTreeMap<String, f64> =
            freshness(&products, now, 7 * DAY_MS).into_iter().collect();
        assert_eq!(got["new"], 1.0);
        assert!((got["old"] - 0.25).abs() < 1e-12);
        assert!((got["updated"] - 0.5).abs() < 1e-12);
        let derived = first_seen(
            &[
                ev("u", "p", EventType::View, 5),
                ev("v", "p", EventType::View, 3),
            ],
            10,
        );
        assert_eq!(derived[0].first_seen_ms, 3);
    }

    #[test]
    fn category_shares_sum_to_one() {
        let now = 10 * DAY_MS;
        let events = vec![
            (ev("u", "a", EventType::Purchase, now), Some("shoes".into())),
            (ev("u", "b", EventType::View, now), Some("books".into())),
            (ev("u", "c", EventType::View, now), None),
            (ev("w", "d", EventType::View, now), Some("books".into())),
        ];
        let got = category_affinity(&events, &PopularityOptions::at(now));
        assert_eq!(got.len(), 2);
        let u = &got[0].1;
        assert!(
            (u["shoes"] - 0.75).abs() < 1e-12 && (u["books"] - 0.25).abs() < 1e-12,
            "{u:?}"
        );
        assert_eq!(got[1].1["books"], 1.0);
    }
}
