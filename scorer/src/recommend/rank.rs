//! How candidates are ranked: pure functions, so the rules are testable and documented in one
//! place.
//!
//! ```text
//! score = s · w_cf · cf  +  (1 − s) · popularity            the CF ↔ popularity blend
//!       + w_pop · popularity + w_fresh · freshness + w_cat · affinity(user, category)
//! ```
//!
//! - `cf` is the model's affinity `xᵤ · yᵢ` clamped to `[0, 1]` (implicit ALS fits
//!   preferences in {0, 1}, so its dot products live around that range);
//! - `s`, the CF share, grows with the user's interactions: 0 with none (popularity only),
//!   `n / 5` below five, 1 from five on ([`cf_share`]); 0 when CF is switched off, which keeps
//!   the response shape and ranks by the feature-store signals alone;
//! - `popularity_score`, `freshness_score` and the user's `user_category_affinity` share of the
//!   product's category come from the feature store; a missing value counts as 0.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Interactions from which CF is trusted alone.
pub const CF_FULL_AT: usize = 5;

/// Which path produced a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// Trained user factors.
    Cf,
    /// Factors folded in from the user's interactions (five or more).
    FoldIn,
    /// Fewer than five interactions: folded-in CF blended with popularity.
    Blend,
    /// No usable history (or CF off): popularity, narrowed by category affinity.
    Popularity,
    /// A product without trained factors, scored through a stand-in vector.
    Content,
}

impl Path {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cf => "cf",
            Self::FoldIn => "fold_in",
            Self::Blend => "blend",
            Self::Popularity => "popularity",
            Self::Content => "content",
        }
    }
}

/// Weights of the ranking (scorer options).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    /// Weight of the CF affinity.
    pub cf: f32,
    /// Weight of `popularity_score`.
    pub popularity: f32,
    /// Weight of `freshness_score`.
    pub freshness: f32,
    /// Weight of the user's affinity to the product's category.
    pub category: f32,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            cf: 1.0,
            popularity: 0.2,
            freshness: 0.05,
            category: 0.1,
        }
    }
}

/// The CF share `s` for a user with `interactions` interactions.
pub fn cf_share(interactions: usize, cf_enabled: bool) -> f32 {
    if !cf_enabled {
        return 0.0;
    }
    (interactions.min(CF_FULL_AT) as f32) / CF_FULL_AT as f32
}

/// The signals of one candidate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Signals {
    /// The model's affinity, when the product has (stand-in) factors and CF is on.
    pub cf: Option<f32>,
    /// `popularity_score`.
    pub popularity: Option<f64>,
    /// `freshness_score`.
    pub freshness: Option<f64>,
    /// The user's affinity share of the product's category.
    pub category_affinity: Option<f64>,
}

/// The ranking score of a candidate.
pub fn score(signals: &Signals, weights: &Weights, share: f32) -> f32 {
    let cf = signals.cf.map_or(0.0, |c| c.clamp(0.0, 1.0));
    let pop = signals.popularity.unwrap_or(0.0) as f32;
    let fresh = signals.freshness.unwrap_or(0.0) as f32;
    let cat = signals.category_affinity.unwrap_or(0.0) as f32;
    share * weights.cf * cf
        + (1.0 - share) * pop
        + weights.popularity * pop
        + weights.freshness * fresh
        + weights.category * cat
}

/// Parses a `user_category_affinity` value (a JSON object category → share); an unreadable
/// value counts as no affinity.
pub fn parse_affinity(json: &str) -> BTreeMap<String, f64> {
    serde_json::from_str::<BTreeMap<String, f64>>(json)
        .map(|m| {
            m.into_iter()
                .filter(|(_, v)| v.is_finite() && *v > 0.0)
                .collect()
        })
        .unwrap_or_default()
}

/// Popularity narrowed by category affinity: `k` products drawn from per-category ranked
/// lists in proportion to the user's shares (largest remainder), best first within each
/// category, topped up from `overall` when the categories run short. No product twice.
pub fn narrow_by_affinity<'a>(
    affinity: &BTreeMap<String, f64>,
    by_category: &'a BTreeMap<String, Vec<(String, f64)>>,
    overall: &'a [(String, f64)],
    k: usize,
) -> Vec<(&'a str, f64)> {
    let total: f64 = affinity
        .iter()
        .filter(|(c, _)| by_category.contains_key(*c))
        .map(|(_, v)| v)
        .sum();
    let mut quotas: Vec<(&str, usize, f64)> = vec![];
    if total > 0.0 {
        let mut assigned = 0;
        for (c, v) in affinity {
            if by_category.contains_key(c) {
                let exact = k as f64 * v / total;
                let floor = exact.floor() as usize;
                assigned += floor;
                quotas.push((c.as_str(), floor, exact - floor as f64));
            }
        }
        // Largest remainders get the rest, ties to the larger share then the name.
        let mut order: Vec<usize> = (0..quotas.len()).collect();
        order.sort_by(|&a, &b| {
            quotas[b]
                .2
                .total_cmp(&quotas[a].2)
                .then(quotas[a].0.cmp(quotas[b].0))
        });
        for &i in order.iter().take(k.saturating_sub(assigned)) {
            quotas[i].1 += 1;
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<(&str, f64)> = Vec::with_capacity(k);
    for (c, quota, _) in &quotas {
        let list = &by_category[*c];
        let mut taken = 0;
        for (p, s) in list {
            if taken == *quota {
                break;
            }
            if seen.insert(p.as_str()) {
                out.push((p.as_str(), *s));
                taken += 1;
            }
        }
    }
    for (p, s) in overall {
        if out.len() >= k {
            break;
        }
        if seen.insert(p.as_str()) {
            out.push((p.as_str(), *s));
        }
    }
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    out.truncate(k);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cf_share_grows_with_interactions_and_stops_at_five() {
        let shares: Vec<f32> = (0..8).map(|n| cf_share(n, true)).collect();
        assert_eq!(shares, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0]);
        assert_eq!(cf_share(100, false), 0.0, "CF off");
    }

    #[test]
    fn scores_blend_cf_and_popularity_then_add_the_features() {
        let w = Weights::default();
        let s = Signals {
            cf: Some(0.8),
            popularity: Some(0.5),
            freshness: Some(1.0),
            category_affinity: Some(0.5),
        };
        // Full CF: 0.8 + 0.2·0.5 + 0.05·1 + 0.1·0.5
        assert!((score(&s, &w, 1.0) - 1.0).abs() < 1e-6);
        // No CF: the popularity term takes the CF term's place.
        assert!((score(&s, &w, 0.0) - 0.7).abs() < 1e-6);
        // A CF score outside [0, 1] is clamped; missing signals count as 0.
        let wild = Signals {
            cf: Some(7.0),
            ..Signals::default()
        };
        assert!((score(&wild, &w, 1.0) - 1.0).abs() < 1e-6);
        assert_eq!(score(&Signals::default(), &w, 0.5), 0.0);
    }

    #[test]
    fn affinity_values_parse_or_count_as_none() {
        let a = parse_affinity(r#"{"shoes": 0.75, "books": 0.25, "bad": -1}"#);
        assert_eq!(a.len(), 2);
        assert!(parse_affinity("not json").is_empty());
    }

    #[test]
    fn popularity_is_narrowed_in_proportion_to_affinity() {
        let list = |prefix: &str, n: usize| -> Vec<(String, f64)> {
            (0..n)
                .map(|i| (format!("{prefix}{i}"), 1.0 - i as f64 / 100.0))
                .collect()
        };
        let by_category = BTreeMap::from([
            ("shoes".to_owned(), list("s", 10)),
            ("books".to_owned(), list("b", 10)),
            ("toys".to_owned(), list("t", 10)),
        ]);
        let overall = list("o", 10);
        let affinity = BTreeMap::from([("shoes".to_owned(), 0.75), ("books".to_owned(), 0.25)]);
        let got = narrow_by_affinity(&affinity, &by_category, &overall, 8);
        assert_eq!(got.len(), 8);
        let shoes = got.iter().filter(|(p, _)| p.starts_with('s')).count();
        let books = got.iter().filter(|(p, _)| p.starts_with('b')).count();
        assert_eq!((shoes, books), (6, 2), "{got:?}");
        assert!(got.windows(2).all(|w| w[0].1 >= w[1].1), "sorted: {got:?}");
        // Unknown categories and no affinity fall back to the overall list.
        let none = narrow_by_affinity(&BTreeMap::new(), &by_category, &overall, 3);
        assert_eq!(
            none.iter().map(|p| p.0).collect::<Vec<_>>(),
            ["o0", "o1", "o2"]
        );
        // A short category is topped up from overall, without duplicates.
        let short = BTreeMap::from([("tiny".to_owned(), vec![("o0".to_owned(), 0.99)])]);
        let got = narrow_by_affinity(
            &BTreeMap::from([("tiny".to_owned(), 1.0)]),
            &short,
            &overall,
            3,
        );
        assert_eq!(
            got.iter().map(|p| p.0).collect::<Vec<_>>(),
            ["o0", "o1", "o2"]
        );
    }
}
