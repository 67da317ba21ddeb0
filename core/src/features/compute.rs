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
pub fn popularity(events: &[Event], opts: &PopularityOptions) -> Vec<(String, f64)> {
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
/// before `now_ms`.
pub fn first_seen(events: &[Event], now_ms: i64) -> Vec<ProductTimes> {
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
