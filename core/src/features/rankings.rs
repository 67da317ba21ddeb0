//! Rankings: the top products of a product feature (`popularity_score`), overall and per
//! product category, as one artifact the scorer loads whole. Cold-start recommendations
//! ("popularity, narrowed by category affinity when known") need ranked lists, not
//! per-product lookups; the `popularity` job writes them next to the values it materialises.
//!
//! # Storage
//!
//! Rankings are artifacts, kept in the same [`ArtifactStore`] as models (a directory in local
//! mode, `.recsys/artifacts` by default; an S3 bucket in a cluster), at
//!
//! ```text
//! rankings/<feature>/v<major>/latest.json
//! ```
//!
//! Only the latest rankings are kept (no history: the offline store keeps the values of every
//! point in time, from which past rankings can be rebuilt). [`write_rankings`] replaces the
//! object with a conditional write and never replaces rankings of a later `at_ms` with
//! earlier ones, so a late retry of an old window cannot make serving go back in time (the
//! online store's rule). A reader sees the old or the new document, never a mix.
//!
//! # Format (version 1)
//!
//! One JSON object, snake_case fields:
//!
//! | field | type | meaning |
//! | --- | --- | --- |
//! | `format_version` | integer | `1`; a reader refuses versions it does not know |
//! | `feature` | string | feature name, `[a-z][a-z0-9_]*` |
//! | `major` | integer | the feature's major version |
//! | `at_ms` | integer | the time the scores describe (ms since the Unix epoch) |
//! | `computed_at_ms` | integer | when the rankings were built |
//! | `n` | integer ≥ 1 | the length limit of every list |
//! | `overall` | `[[product, score], …]` | the top `n` products |
//! | `by_category` | `{category: [[product, score], …]}` | the top `n` products of each category |
//! | `category_of` | `{product: category}` | the category of every listed product that has one |
//!
//! Every list is sorted by score, descending (equal scores by product id, ascending), has no
//! duplicate product, non-empty ids and finite scores. A product is listed under the most
//! recent category seen for it in the events (at or before `at_ms`); products without a known
//! category appear in `overall` only. Scores are JSON numbers in their shortest round-trip
//! form; readers may parse them to within one ULP. Fields added later within format 1 are
//! ignored by older readers; anything incompatible gets a new `format_version`.
//!
//! ```json
//! {"format_version": 1, "feature": "popularity_score", "major": 1,
//!  "at_ms": 1764151200000, "computed_at_ms": 1764151203512, "n": 1000,
//!  "overall": [["P-1", 1.0], ["P-7", 0.42]],
//!  "by_category": {"shoes": [["P-1", 1.0]], "books": [["P-7", 0.42]]},
//!  "category_of": {"P-1": "shoes", "P-7": "books"}}
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::offline::valid_feature_name;
use super::{FeatureRef, FeatureValue};
use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::cf::interactions::Event;

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Default length of every list.
pub const DEFAULT_TOP_N: usize = 1000;

/// Conditional-write attempts of [`write_rankings`] before it gives up on a busy object.
const WRITE_ATTEMPTS: usize = 5;

/// Why rankings could not be built, stored or trusted.
#[derive(Debug, thiserror::Error)]
pub enum RankingsError {
    /// The rankings (or the values they are built from) break a rule of the format.
    #[error("{location}: {reason}")]
    Invalid {
        /// The object key, or `rankings of <feature>` when building.
        location: String,
        /// What is wrong, naming the list, position and product.
        reason: String,
    },
    /// The document is not JSON of the expected shape.
    #[error("{key}: {source}")]
    Json {
        /// The object key.
        key: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The artifact store failed.
    #[error("artifact store: {0}")]
    Artifact(#[from] ArtifactError),
}

impl RankingsError {
    /// Stable label for metrics and events.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "InvalidRankings",
            Self::Json { .. } => "BadJson",
            Self::Artifact(e) => e.kind(),
        }
    }

    /// Whether trying again may succeed (a transient store failure or a lost race).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Artifact(e) => e.retryable(),
            Self::Invalid { .. } | Self::Json { .. } => false,
        }
    }
}

/// The top products of a product feature at one point in time, overall and per category.
/// See the [module documentation](self) for the format and its rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rankings {
    /// Format version, [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Feature name.
    pub feature: String,
    /// Major version of the feature.
    pub major: u64,
    /// The time the scores describe (ms since the Unix epoch).
    pub at_ms: i64,
    /// When the rankings were built (ms since the Unix epoch).
    pub computed_at_ms: i64,
    /// Length limit of every list.
    pub n: usize,
    /// The top `n` products: `(product id, score)`, by score descending.
    pub overall: Vec<(String, f64)>,
    /// The top `n` products of each category, by score descending.
    pub by_category: BTreeMap<String, Vec<(String, f64)>>,
    /// The category of every listed product that has one.
    pub category_of: BTreeMap<String, String>,
}

/// The key of the latest rankings of `feature`: `rankings/<name>/v<major>/latest.json`.
pub fn rankings_key(feature: &FeatureRef) -> String {
    format!("rankings/{}/v{}/latest.json", feature.name, feature.major)
}

/// Each product's most recent category in `events`, ignoring events after `at_ms` and
/// events without a category. Events without a time count as older than any timed one; of
/// two categories seen at the same time the greater name wins, so the input order does not
/// matter.
pub fn product_categories<'a>(
    events: impl IntoIterator<Item = &'a (Event, Option<String>)>,
    at_ms: i64,
) -> BTreeMap<String, String> {
    let mut latest: HashMap<&str, (Option<i64>, &str)> = HashMap::new();
    for (e, category) in events {
        let Some(category) = category.as_deref().filter(|c| !c.is_empty()) else {
            continue;
        };
        if e.ts_ms.is_some_and(|t| t > at_ms) {
            continue;
        }
        let seen = (e.ts_ms, category);
        latest
            .entry(e.item.as_str())
            .and_modify(|slot| *slot = (*slot).max(seen))
            .or_insert(seen);
    }
    latest
        .into_iter()
        .map(|(p, (_, c))| (p.to_owned(), c.to_owned()))
        .collect()
}

/// The scores of a numeric feature's values (floats, or integers as floats), for
/// [`Rankings::build`]; any other value type is refused, naming the product.
pub fn float_scores(
    feature: &FeatureRef,
    values: &[(String, FeatureValue)],
) -> Result<Vec<(String, f64)>, RankingsError> {
    values
        .iter()
        .map(|(id, v)| match v {
            FeatureValue::Float(x) => Ok((id.clone(), *x)),
            FeatureValue::Int(x) => Ok((id.clone(), *x as f64)),
            other => Err(RankingsError::Invalid {
                location: format!("rankings of {feature}"),
                reason: format!("product {id:?} has a non-numeric value {other:?}"),
            }),
        })
        .collect()
}

/// Orders `(id, score)` pairs by score descending, then id ascending. Scores must be finite.
fn by_rank(a: &(String, f64), b: &(String, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0))
}

impl Rankings {
    /// Builds the rankings of `feature` at `at_ms` from its per-product `scores` (any order)
    /// and the products' categories (see [`product_categories`]): the top `n` overall and the
    /// top `n` of each category. Refuses `n = 0`, an invalid feature name, an empty product
    /// id, a non-finite score and a product scored twice, naming it.
    pub fn build(
        feature: &FeatureRef,
        at_ms: i64,
        computed_at_ms: i64,
        n: usize,
        scores: &[(String, f64)],
        categories: &BTreeMap<String, String>,
    ) -> Result<Self, RankingsError> {
        let invalid = |reason: String| RankingsError::Invalid {
            location: format!("rankings of {feature}"),
            reason,
        };
        if !valid_feature_name(&feature.name) {
            return Err(invalid(format!(
                "{:?} is not a feature name ([a-z][a-z0-9_]*, at most 63 characters)",
                feature.name
            )));
        }
        if n == 0 {
            return Err(invalid("n must be at least 1".into()));
        }
        let mut seen = HashSet::with_capacity(scores.len());
        for (id, score) in scores {
            if id.is_empty() {
                return Err(invalid("a product id is empty".into()));
            }
            if !score.is_finite() {
                return Err(invalid(format!(
                    "product {id:?} has score {score}, which is not finite"
                )));
            }
            if !seen.insert(id.as_str()) {
                return Err(invalid(format!("product {id:?} is scored twice")));
            }
        }
        let mut sorted = scores.to_vec();
        sorted.sort_by(by_rank);
        let mut by_category: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
        let mut category_of = BTreeMap::new();
        for (id, score) in &sorted {
            let category = categories.get(id).filter(|c| !c.is_empty());
            if let Some(c) = category {
                // A product in the top n overall is in the top n of its category too, so
                // `category_of` covers every listed product that has a category.
                let list = by_category.entry(c.clone()).or_default();
                if list.len() < n {
                    list.push((id.clone(), *score));
                    category_of.insert(id.clone(), c.clone());
                }
            }
        }
        sorted.truncate(n);
        Ok(Self {
            format_version: FORMAT_VERSION,
            feature: feature.name.clone(),
            major: feature.major,
            at_ms,
            computed_at_ms,
            n,
            overall: sorted,
            by_category,
            category_of,
        })
    }

    /// The feature the rankings rank by.
    pub fn feature_ref(&self) -> FeatureRef {
        FeatureRef::new(self.feature.clone(), self.major)
    }

    /// The top products of `category`, or overall when `category` is `None`; an unknown
    /// category has none.
    pub fn top(&self, category: Option<&str>) -> &[(String, f64)] {
        match category {
            None => &self.overall,
            Some(c) => self.by_category.get(c).map_or(&[], Vec::as_slice),
        }
    }

    /// Checks every rule of the format; the error names `location`, the list, the position
    /// and the product.
    pub fn validate(&self, location: &str) -> Result<(), RankingsError> {
        let invalid = |reason: String| {
            Err(RankingsError::Invalid {
                location: location.to_owned(),
                reason,
            })
        };
        if self.format_version != FORMAT_VERSION {
            return invalid(format!(
                "format_version {} is not supported (this build reads {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if !valid_feature_name(&self.feature) {
            return invalid(format!(
                "feature {:?} is not a feature name ([a-z][a-z0-9_]*, at most 63 characters)",
                self.feature
            ));
        }
        if self.n == 0 {
            return invalid("n is 0; it must be at least 1".into());
        }
        check_list("overall", &self.overall, self.n).or_else(invalid)?;
        for (category, list) in &self.by_category {
            let name = format!("by_category[{category:?}]");
            if category.is_empty() {
                return invalid("by_category has an empty category name".into());
            }
            check_list(&name, list, self.n).or_else(invalid)?;
            for (i, (id, _)) in list.iter().enumerate() {
                match self.category_of.get(id) {
                    Some(c) if c == category => {}
                    Some(c) => {
                        return invalid(format!(
                            "{name}[{i}]: product {id:?} is in category {c:?} according to category_of"
                        ));
                    }
                    None => {
                        return invalid(format!(
                            "{name}[{i}]: product {id:?} has no entry in category_of"
                        ));
                    }
                }
            }
        }
        if let Some((id, _)) = self
            .category_of
            .iter()
            .find(|(id, c)| id.is_empty() || c.is_empty())
        {
            return invalid(format!(
                "category_of: product {id:?} has an empty id or category"
            ));
        }
        Ok(())
    }

    /// The document, as stored.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings, integers and finite floats cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and validates a stored document; `key` names it in errors.
    pub fn from_json(key: &str, bytes: &[u8]) -> Result<Self, RankingsError> {
        let r: Self = serde_json::from_slice(bytes).map_err(|source| RankingsError::Json {
            key: key.to_owned(),
            source,
        })?;
        r.validate(key)?;
        Ok(r)
    }
}

/// Checks one list: at most `n` entries, non-empty ids, finite scores, no duplicates, sorted
/// by score descending.
fn check_list(name: &str, list: &[(String, f64)], n: usize) -> Result<(), String> {
    if list.len() > n {
        return Err(format!(
            "{name} has {} entries, more than n = {n}",
            list.len()
        ));
    }
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(list.len());
    let mut previous = f64::INFINITY;
    for (i, (id, score)) in list.iter().enumerate() {
        if id.is_empty() {
            return Err(format!("{name}[{i}]: the product id is empty"));
        }
        if !score.is_finite() {
            return Err(format!(
                "{name}[{i}]: product {id:?} has score {score}, which is not finite"
            ));
        }
        if let Some(first) = seen.insert(id.as_str(), i) {
            return Err(format!(
                "{name}[{i}]: product {id:?} is listed twice (also at {first})"
            ));
        }
        // Equal scores may come back in either order: a reader parses scores to within one
        // ULP, which can make two close scores equal.
        if *score > previous {
            return Err(format!(
                "{name}[{i}]: product {id:?} has score {score}, above the previous {previous}: lists are sorted by score, descending"
            ));
        }
        previous = *score;
    }
    Ok(())
}

/// What [`write_rankings`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The rankings are now the latest.
    Written,
    /// Rankings of a later time were already stored and were kept.
    KeptNewer {
        /// The `at_ms` of the stored rankings.
        at_ms: i64,
    },
}

/// Stores `rankings` as the latest of their feature ([`rankings_key`]), unless rankings of a
/// later `at_ms` are already stored (equal times are replaced, so a rerun is idempotent). The
/// write is conditional on the object read, so two writers cannot interleave; stored
/// rankings that fail to parse are replaced, with a warning.
pub async fn write_rankings(
    store: &dyn ArtifactStore,
    rankings: &Rankings,
) -> Result<WriteOutcome, RankingsError> {
    let feature = rankings.feature_ref();
    rankings.validate(&format!("rankings of {feature}"))?;
    let key = rankings_key(&feature);
    let bytes = rankings.to_json();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let current = store.get_versioned(&key).await?;
        if let Some(current) = &current {
            match Rankings::from_json(&key, &current.bytes) {
                Ok(stored) if stored.at_ms > rankings.at_ms => {
                    return Ok(WriteOutcome::KeptNewer {
                        at_ms: stored.at_ms,
                    });
                }
                Ok(_) => {}
                Err(e) => warn!(
                    key = %key,
                    error = &e as &dyn std::error::Error,
                    "replacing stored rankings that cannot be read"
                ),
            }
        }
        match store
            .put_if(&key, bytes.clone(), current.as_ref().map(|c| &c.revision))
            .await
        {
            Ok(()) => return Ok(WriteOutcome::Written),
            // Another writer got in between: read again and decide again.
            Err(ArtifactError::Conflict { .. }) if attempt < WRITE_ATTEMPTS => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The latest rankings of `feature`, or `None` when none were written. Stored rankings that
/// fail validation, or that describe another feature or major version than their key says,
/// are refused with an error naming the key.
pub async fn read_rankings(
    store: &dyn ArtifactStore,
    feature: &FeatureRef,
) -> Result<Option<Rankings>, RankingsError> {
    let key = rankings_key(feature);
    let Some(bytes) = store.get(&key).await? else {
        return Ok(None);
    };
    let rankings = Rankings::from_json(&key, &bytes)?;
    if rankings.feature != feature.name || rankings.major != feature.major {
        return Err(RankingsError::Invalid {
            location: key,
            reason: format!(
                "holds the rankings of {}, not {feature}",
                rankings.feature_ref()
            ),
        });
    }
    Ok(Some(rankings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::LocalDirStore;
    use crate::cf::interactions::EventType;

    fn feature() -> FeatureRef {
        FeatureRef::new("popularity_score", 1)
    }

    fn scores(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(p, s)| ((*p).to_owned(), *s)).collect()
    }

    fn categories(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(p, c)| ((*p).to_owned(), (*c).to_owned()))
            .collect()
    }

    fn ev(item: &str, ts: Option<i64>, category: Option<&str>) -> (Event, Option<String>) {
        (
            Event {
                user: "u".into(),
                item: item.into(),
                kind: EventType::View,
                ts_ms: ts,
                value: None,
            },
            category.map(str::to_owned),
        )
    }

    fn sample() -> Rankings {
        let s = scores(&[
            ("a", 0.5),
            ("b", 1.0),
            ("c", 0.5),
            ("d", 0.25),
            ("e", 0.75),
            ("f", 0.1),
        ]);
        let cats = categories(&[
            ("a", "shoes"),
            ("b", "books"),
            ("c", "shoes"),
            ("d", "shoes"),
            ("f", "books"),
        ]);
        Rankings::build(&feature(), 1_000, 2_000, 2, &s, &cats).expect("build")
    }

    #[test]
    fn build_ranks_by_score_then_id_and_cuts_every_list_at_n() {
        let r = sample();
        // "e" has no category: overall only.
        assert_eq!(r.overall, scores(&[("b", 1.0), ("e", 0.75)]));
        assert_eq!(
            r.by_category["shoes"],
            scores(&[("a", 0.5), ("c", 0.5)]),
            "ties by id; d is cut"
        );
        assert_eq!(r.by_category["books"], scores(&[("b", 1.0), ("f", 0.1)]));
        assert_eq!(
            r.category_of,
            categories(&[
                ("a", "shoes"),
                ("b", "books"),
                ("c", "shoes"),
                ("f", "books")
            ])
        );
        assert_eq!(r.top(None), r.overall.as_slice());
        assert_eq!(r.top(Some("books")), r.by_category["books"].as_slice());
        assert!(r.top(Some("toys")).is_empty());
        assert_eq!(
            (r.format_version, r.n, r.at_ms, r.computed_at_ms),
            (1, 2, 1_000, 2_000)
        );
        r.validate("sample").expect("built rankings are valid");
        // Input order does not matter.
        let mut reversed = scores(&[("f", 0.1), ("e", 0.75), ("d", 0.25)]);
        reversed.extend(scores(&[("c", 0.5), ("b", 1.0), ("a", 0.5)]));
        let again = Rankings::build(
            &feature(),
            1_000,
            2_000,
            2,
            &reversed,
            &r.category_of.clone().into_iter().collect(),
        )
        .expect("build");
        assert_eq!(again, r);
    }

    #[test]
    fn build_refuses_bad_values_naming_them() {
        let cats = BTreeMap::new();
        let cases = [
            (scores(&[("a", f64::NAN)]), 10, "\"a\" has score NaN"),
            (scores(&[("", 1.0)]), 10, "product id is empty"),
            (
                scores(&[("a", 1.0), ("a", 0.5)]),
                10,
                "\"a\" is scored twice",
            ),
            (scores(&[("a", 1.0)]), 0, "n must be at least 1"),
        ];
        for (s, n, needle) in cases {
            let err = Rankings::build(&feature(), 0, 0, n, &s, &cats).expect_err(needle);
            assert_eq!(err.kind(), "InvalidRankings");
            let msg = err.to_string();
            assert!(msg.contains(needle), "{msg}");
            assert!(msg.contains("popularity_score@v1"), "{msg}");
        }
        let err = Rankings::build(&FeatureRef::new("Bad-Name", 1), 0, 0, 1, &[], &cats)
            .expect_err("bad name");
        assert!(err.to_string().contains("not a feature name"), "{err}");
        let values = vec![("p".to_owned(), FeatureValue::String("x".into()))];
        let err = float_scores(&feature(), &values).expect_err("string value");
        assert!(err.to_string().contains("non-numeric"), "{err}");
    }

    #[test]
    fn no_products_give_empty_but_valid_rankings() {
        let r = Rankings::build(&feature(), 5, 6, 10, &[], &BTreeMap::new()).expect("build");
        assert!(r.overall.is_empty() && r.by_category.is_empty());
        let back = Rankings::from_json("k", &r.to_json()).expect("round trip");
        assert_eq!(back, r);
    }

    #[test]
    fn the_json_format_is_the_documented_one_and_round_trips() {
        let r = sample();
        let json: serde_json::Value = serde_json::from_slice(&r.to_json()).expect("json");
        assert_eq!(json["format_version"], 1);
        assert_eq!(json["feature"], "popularity_score");
        assert_eq!(json["major"], 1);
        assert_eq!(json["at_ms"], 1_000);
        assert_eq!(json["computed_at_ms"], 2_000);
        assert_eq!(json["n"], 2);
        assert_eq!(
            json["overall"],
            serde_json::json!([["b", 1.0], ["e", 0.75]])
        );
        assert_eq!(
            json["by_category"]["books"][1],
            serde_json::json!(["f", 0.1])
        );
        assert_eq!(json["category_of"]["a"], "shoes");
        let back = Rankings::from_json("k", &r.to_json()).expect("parse");
        assert_eq!(back, r);
        // Fields added later within format 1 are ignored.
        let mut extended = json.clone();
        extended["generator"] = "a newer trainer".into();
        let bytes = serde_json::to_vec(&extended).expect("json");
        assert_eq!(Rankings::from_json("k", &bytes).expect("parse"), r);
    }

    #[test]
    fn loading_refuses_broken_documents_naming_the_problem() {
        let base: serde_json::Value = serde_json::from_slice(&sample().to_json()).expect("json");
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            (
                "format_version",
                2.into(),
                "format_version 2 is not supported",
            ),
            ("feature", "".into(), "is not a feature name"),
            ("n", 0.into(), "n is 0"),
            (
                "overall",
                serde_json::json!([["e", 0.75], ["b", 1.0]]),
                "overall[1]: product \"b\" has score 1, above the previous 0.75",
            ),
            (
                "overall",
                serde_json::json!([["b", 1.0], ["b", 0.5]]),
                "overall[1]: product \"b\" is listed twice (also at 0)",
            ),
            (
                "overall",
                serde_json::json!([["", 1.0]]),
                "overall[0]: the product id is empty",
            ),
            (
                "overall",
                serde_json::json!([["a", 1.0], ["b", 0.9], ["c", 0.8]]),
                "overall has 3 entries, more than n = 2",
            ),
            (
                "by_category",
                serde_json::json!({"books": [["b", 1.0], ["a", 0.5]]}),
                "by_category[\"books\"][1]: product \"a\" is in category \"shoes\"",
            ),
            (
                "by_category",
                serde_json::json!({"books": [["zz", 1.0]]}),
                "product \"zz\" has no entry in category_of",
            ),
            (
                "by_category",
                serde_json::json!({"": []}),
                "empty category name",
            ),
        ];
        for (field, value, needle) in cases {
            let mut doc = base.clone();
            doc[field] = value;
            let bytes = serde_json::to_vec(&doc).expect("json");
            let err = Rankings::from_json("rankings/x/v1/latest.json", &bytes).expect_err(needle);
            let msg = err.to_string();
            assert!(msg.starts_with("rankings/x/v1/latest.json: "), "{msg}");
            assert!(msg.contains(needle), "{field}: {msg}");
            assert!(!err.retryable());
        }
        // A score that is not a number, and a document that is not JSON.
        let mut doc = base.clone();
        doc["overall"] = serde_json::json!([["b", null]]);
        let err = Rankings::from_json("k", &serde_json::to_vec(&doc).expect("json"))
            .expect_err("null score");
        assert_eq!(err.kind(), "BadJson");
        let err = Rankings::from_json("k", b"{").expect_err("truncated");
        assert_eq!(err.kind(), "BadJson");
        assert!(err.to_string().starts_with("k: "), "{err}");
    }

    #[test]
    fn categories_are_the_most_recent_seen_up_to_at() {
        let events = vec![
            ev("p", Some(10), Some("old")),
            ev("p", Some(20), Some("new")),
            ev("p", Some(30), None),           // no category: ignored
            ev("p", Some(99), Some("future")), // after `at`: ignored
            ev("q", None, Some("untimed")),
            ev("q", Some(5), Some("timed")), // a timed event beats an untimed one
            ev("r", Some(7), Some("b")),
            ev("r", Some(7), Some("a")), // a tie: the greater name, whatever the order
            ev("s", Some(1), Some("")),  // empty: ignored
        ];
        let got = product_categories(&events, 50);
        assert_eq!(got, categories(&[("p", "new"), ("q", "timed"), ("r", "b")]));
        let mut reversed = events.clone();
        reversed.reverse();
        assert_eq!(product_categories(&reversed, 50), got);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_leave_the_latest_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(LocalDirStore::new(dir.path()));
        // Each writer loses a race at most once per other writer (4), within its 5 attempts.
        let writers: Vec<_> = [3_i64, 5, 1, 4, 2]
            .into_iter()
            .map(|at| {
                let store = store.clone();
                let mut r = sample();
                r.at_ms = at;
                tokio::spawn(async move { write_rankings(store.as_ref(), &r).await })
            })
            .collect();
        for w in writers {
            w.await.expect("join").expect("write");
        }
        let stored = read_rankings(store.as_ref(), &feature())
            .await
            .expect("read")
            .expect("stored");
        assert_eq!(stored.at_ms, 5);
    }

    #[tokio::test]
    async fn stores_latest_and_never_goes_back_in_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalDirStore::new(dir.path());
        assert_eq!(read_rankings(&store, &feature()).await.expect("read"), None);

        let r = sample();
        assert_eq!(
            write_rankings(&store, &r).await.expect("write"),
            WriteOutcome::Written
        );
        assert_eq!(
            store.list("rankings/").await.expect("list"),
            ["rankings/popularity_score/v1/latest.json"]
        );
        assert_eq!(
            read_rankings(&store, &feature()).await.expect("read"),
            Some(r.clone())
        );

        // An earlier window does not replace a later one; the same window does.
        let mut older = r.clone();
        older.at_ms -= 1;
        older.overall.truncate(1);
        assert_eq!(
            write_rankings(&store, &older).await.expect("write"),
            WriteOutcome::KeptNewer { at_ms: r.at_ms }
        );
        let mut rerun = r.clone();
        rerun.computed_at_ms += 5;
        assert_eq!(
            write_rankings(&store, &rerun).await.expect("write"),
            WriteOutcome::Written
        );
        assert_eq!(
            read_rankings(&store, &feature()).await.expect("read"),
            Some(rerun.clone())
        );
        // Other majors live side by side.
        assert_eq!(
            read_rankings(&store, &FeatureRef::new("popularity_score", 2))
                .await
                .expect("read"),
            None
        );

        // Invalid rankings are refused before anything is written.
        let mut bad = rerun.clone();
        bad.at_ms += 10;
        bad.overall.reverse();
        let err = write_rankings(&store, &bad).await.expect_err("unsorted");
        assert!(err.to_string().contains("sorted by score"), "{err}");
        assert_eq!(
            read_rankings(&store, &feature()).await.expect("read"),
            Some(rerun.clone())
        );

        // A corrupted object is refused on read, naming the key, and replaced by a writer.
        let key = rankings_key(&feature());
        store
            .put(&key, b"{\"format_version\":1".to_vec())
            .await
            .expect("put");
        let err = read_rankings(&store, &feature())
            .await
            .expect_err("corrupt");
        assert!(err.to_string().contains(&key), "{err}");
        assert_eq!(
            write_rankings(&store, &r).await.expect("repair"),
            WriteOutcome::Written
        );
        // Rankings stored under another feature's key are refused.
        let mut misplaced = r.clone();
        misplaced.major = 3;
        store.put(&key, misplaced.to_json()).await.expect("put");
        let err = read_rankings(&store, &feature())
            .await
            .expect_err("misplaced");
        assert!(err.to_string().contains("popularity_score@v3"), "{err}");
    }
}
