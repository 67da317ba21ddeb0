//! A model version in memory, ready to answer requests: exact top-k retrieval over the item
//! factors, scores for given candidates, fold-in of users the model has not seen, and stand-in
//! vectors for products added since training.
//!
//! Everything here is synchronous CPU work on immutable data (one [`ServingModel`] is shared
//! by every request through an `Arc`); the scorer runs it off the async runtime.
//!
//! Retrieval is an exact scan: 30k items × 64 factors is about 2M multiply-adds, well under a
//! millisecond with the vectorised [`als::dot`], and a scan has no recall to tune. The scan
//! keeps the running top-k in a small sorted buffer and only consults the exclusion list for
//! scores that would enter it, so excluding a user's history costs almost nothing.

use std::cmp::Ordering;

use ndarray::{Array2, ArrayView1};
use serde::Serialize;

use super::als::{self, AlsModel};
use super::interactions::{Confidence, EventType, EventWeights, IdMap};
use crate::artifacts::LoadedModel;

/// Why a loaded model cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// The model has no items or no factors.
    #[error("model {model} {version}: {reason}")]
    Unusable {
        /// Model name.
        model: String,
        /// Version.
        version: String,
        /// What is wrong.
        reason: String,
    },
}

/// How a user vector came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UserSource {
    /// Learned in training.
    Trained,
    /// Solved at request time from the user's interactions.
    FoldIn,
}

/// A user's factors from their interactions.
#[derive(Clone, Debug, PartialEq)]
pub struct FoldIn {
    /// The factors (zeros when no interaction is with a known item).
    pub factors: Vec<f32>,
    /// Interactions with items the model knows.
    pub known: usize,
    /// Interactions with items it does not (ignored).
    pub unknown: usize,
}

/// One interaction as fold-in reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interaction<'a> {
    /// Product id.
    pub item: &'a str,
    /// Event type.
    pub kind: EventType,
    /// Explicit weight (ratings), if any.
    pub value: Option<f32>,
}

/// A model version ready to serve.
#[derive(Debug)]
pub struct ServingModel {
    name: String,
    version: String,
    users: IdMap,
    items: IdMap,
    user_factors: Array2<f32>,
    item_factors: Array2<f32>,
    /// `YᵀY + λI`, for fold-ins.
    yty: Vec<f32>,
    /// `XᵀX + λI`, for item fold-ins.
    xtx: Vec<f32>,
    confidence: Confidence,
    weights: EventWeights,
    /// NDCG@10 on the version's held-out split, from its manifest ([`offline_ndcg_at_10`]).
    offline_ndcg: Option<f64>,
}

/// Reads the confidence and event weights the model was trained with from its manifest
/// parameters (as `cf-train` writes them), with the trainer's defaults for what is missing.
fn training_prep(params: &serde_json::Value) -> (Confidence, EventWeights) {
    let f = |key: &str, default: f32| {
        params
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .map_or(default, |v| v as f32)
    };
    let alpha = f("alpha", 1.0);
    let confidence = match params.get("confidence").and_then(|c| c.as_str()) {
        Some("log") => Confidence::Log {
            alpha,
            epsilon: f("log_epsilon", 1.0),
        },
        _ => Confidence::Linear { alpha },
    };
    let d = EventWeights::default();
    let w = params.get("event_weights").cloned().unwrap_or_default();
    let g = |key: &str, default: f32| {
        w.get(key)
            .and_then(serde_json::Value::as_f64)
            .map_or(default, |v| v as f32)
    };
    let weights = EventWeights {
        view: g("view", d.view),
        click: g("click", d.click),
        add_to_cart: g("add_to_cart", d.add_to_cart),
        purchase: g("purchase", d.purchase),
    };
    (confidence, weights)
}

impl ServingModel {
    /// Prepares a verified model (see [`crate::artifacts::Registry::load`]) for serving.
    pub fn new(name: impl Into<String>, loaded: LoadedModel) -> Result<Self, ServingError> {
        let name = name.into();
        let version = loaded.manifest.version.clone();
        let LoadedModel {
            model:
                AlsModel {
                    user_factors,
                    item_factors,
                    regularization,
                },
            users,
            items,
            manifest,
        } = loaded;
        let unusable = |reason: String| ServingError::Unusable {
            model: name.clone(),
            version: version.clone(),
            reason,
        };
        if item_factors.nrows() == 0 || item_factors.ncols() == 0 {
            return Err(unusable(format!(
                "{} items × {} factors: nothing to recommend",
                item_factors.nrows(),
                item_factors.ncols()
            )));
        }
        if item_factors.nrows() != items.len() || user_factors.nrows() != users.len() {
            return Err(unusable(format!(
                "{} item rows for {} item ids, {} user rows for {} user ids",
                item_factors.nrows(),
                items.len(),
                user_factors.nrows(),
                users.len()
            )));
        }
        if user_factors.ncols() != item_factors.ncols() {
            return Err(unusable(format!(
                "{} user factors but {} item factors",
                user_factors.ncols(),
                item_factors.ncols()
            )));
        }
        let item_factors = item_factors.as_standard_layout().into_owned();
        let user_factors = user_factors.as_standard_layout().into_owned();
        let yty = als::gram(item_factors.view(), regularization);
        let xtx = als::gram(user_factors.view(), regularization);
        let (confidence, weights) = training_prep(&manifest.params);
        let offline_ndcg = offline_ndcg_at_10(&manifest.metrics);
        Ok(Self {
            name,
            version,
            users,
            items,
            user_factors,
            item_factors,
            yty,
            xtx,
            confidence,
            weights,
            offline_ndcg,
        })
    }

    /// NDCG@10 on the version's held-out split as its manifest records it, if it does.
    pub fn offline_ndcg(&self) -> Option<f64> {
        self.offline_ndcg
    }

    /// Model name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Number of factors.
    pub fn factors(&self) -> usize {
        self.item_factors.ncols()
    }

    /// Number of items.
    pub fn items(&self) -> usize {
        self.item_factors.nrows()
    }

    /// Number of trained users.
    pub fn users(&self) -> usize {
        self.user_factors.nrows()
    }

    /// Row of a product id.
    pub fn item_index(&self, id: &str) -> Option<u32> {
        self.items.get(id)
    }

    /// Product id of a row.
    pub fn item_id(&self, index: u32) -> Option<&str> {
        self.items.id(index)
    }

    /// Factors of an item row.
    pub fn item_factors(&self, index: u32) -> Option<&[f32]> {
        row(&self.item_factors, index)
    }

    /// Trained factors of a user.
    pub fn user_factors(&self, user_id: &str) -> Option<&[f32]> {
        row(&self.user_factors, self.users.get(user_id)?)
    }

    /// Factors of a user from interactions, by one exact solve against the item factors
    /// (the same weights and confidence scaling as training); interactions with unknown items
    /// are ignored and counted.
    pub fn fold_in(&self, interactions: &[Interaction<'_>]) -> FoldIn {
        let mut per_item: Vec<(usize, f32)> = vec![];
        let mut unknown = 0;
        for i in interactions {
            match self.items.get(i.item) {
                Some(idx) => per_item.push((idx as usize, self.weights.weight(i.kind, i.value))),
                None => unknown += 1,
            }
        }
        let known = per_item.len();
        per_item.sort_unstable_by_key(|&(i, _)| i);
        let mut merged: Vec<(usize, f32)> = Vec::with_capacity(per_item.len());
        for (i, w) in per_item {
            match merged.last_mut() {
                Some((j, acc)) if *j == i => *acc += w,
                _ => merged.push((i, w)),
            }
        }
        let confs: Vec<(usize, f32)> = merged
            .into_iter()
            .filter(|&(_, w)| w > 0.0)
            .map(|(i, w)| (i, self.confidence.of(w)))
            .collect();
        FoldIn {
            factors: als::fold_in(self.item_factors.view(), &self.yty, &confs),
            known,
            unknown,
        }
    }

    /// Factors of a product added since training, from the trained users who interacted with
    /// it (the item-side fold-in); `None` when none of them is known.
    pub fn fold_in_item(&self, users: &[(&str, EventType, Option<f32>)]) -> Option<Vec<f32>> {
        let mut rows: Vec<(usize, f32)> = users
            .iter()
            .filter_map(|(u, kind, value)| {
                let idx = self.users.get(u)? as usize;
                Some((idx, self.weights.weight(*kind, *value)))
            })
            .collect();
        if rows.is_empty() {
            return None;
        }
        rows.sort_unstable_by_key(|&(i, _)| i);
        rows.dedup_by(|b, a| {
            if a.0 == b.0 {
                a.1 += b.1;
                true
            } else {
                false
            }
        });
        let confs: Vec<(usize, f32)> = rows
            .into_iter()
            .filter(|&(_, w)| w > 0.0)
            .map(|(i, w)| (i, self.confidence.of(w)))
            .collect();
        (!confs.is_empty()).then(|| als::fold_in(self.user_factors.view(), &self.xtx, &confs))
    }

    /// A stand-in vector for a product without factors or interactions: the mean of the
    /// factors of related products that have them (same category, same brand, content
    /// neighbours). `None` when none of them is known.
    pub fn mean_of_items(&self, related: &[&str]) -> Option<Vec<f32>> {
        let mut sum = vec![0.0_f32; self.factors()];
        let mut n = 0_u32;
        for id in related {
            if let Some(v) = self.items.get(id).and_then(|i| self.item_factors(i)) {
                for (s, x) in sum.iter_mut().zip(v) {
                    *s += x;
                }
                n += 1;
            }
        }
        (n > 0).then(|| {
            sum.iter_mut().for_each(|s| *s /= n as f32);
            sum
        })
    }

    /// The `k` best items for `user`, highest score first (ties by lower row), skipping the
    /// rows in `exclude` (sorted ascending) and those `allow` refuses.
    pub fn top_k(
        &self,
        user: &[f32],
        k: usize,
        exclude: &[u32],
        allow: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<(u32, f32)> {
        let Some(y) = self.item_factors.as_slice() else {
            return vec![];
        };
        let f = self.factors();
        if k == 0 || user.len() != f {
            return vec![];
        }
        let mut top = TopK::new(k);
        for (i, item) in y.chunks_exact(f).enumerate() {
            let s = als::dot(user, item);
            if !top.admits(s) {
                continue;
            }
            let i = i as u32;
            if exclude.binary_search(&i).is_ok() || allow.is_some_and(|a| !a(i)) {
                continue;
            }
            top.push(i, s);
        }
        top.into_sorted()
    }

    /// Scores of `candidates` (rows) for `user`, in order.
    pub fn scores(&self, user: &[f32], candidates: &[u32]) -> Vec<f32> {
        candidates
            .iter()
            .map(|&c| self.item_factors(c).map_or(f32::NAN, |v| als::dot(user, v)))
            .collect()
    }

    /// Products most similar to `item` by cosine of their factors, best first, without itself.
    pub fn similar_items(&self, item: u32, k: usize) -> Vec<(u32, f32)> {
        let Some(q) = self.item_factors(item) else {
            return vec![];
        };
        let norm = |v: ArrayView1<'_, f32>| v.dot(&v).sqrt();
        let qn = norm(ArrayView1::from(q));
        if qn == 0.0 {
            return vec![];
        }
        let mut top = TopK::new(k);
        for (i, v) in self.item_factors.outer_iter().enumerate() {
            let i = i as u32;
            if i == item {
                continue;
            }
            let vn = norm(v);
            if vn == 0.0 {
                continue;
            }
            let s = v.as_slice().map_or(0.0, |v| als::dot(q, v)) / (qn * vn);
            if top.admits(s) {
                top.push(i, s);
            }
        }
        top.into_sorted()
    }
}

fn row(m: &Array2<f32>, index: u32) -> Option<&[f32]> {
    let f = m.ncols();
    let start = (index as usize).checked_mul(f)?;
    m.as_slice()?.get(start..start + f)
}

/// The running `k` best `(row, score)`, sorted descending by score then ascending row.
struct TopK {
    k: usize,
    items: Vec<(u32, f32)>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            items: Vec::with_capacity(k + 1),
        }
    }

    fn order(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
        b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
    }

    /// Whether a score could enter (rows arrive in ascending order, so an equal score to the
    /// current last one loses the tie).
    #[inline]
    fn admits(&self, score: f32) -> bool {
        !score.is_nan()
            && (self.items.len() < self.k
                || self.items.last().is_some_and(|&(_, last)| score > last))
    }

    fn push(&mut self, row: u32, score: f32) {
        let entry = (row, score);
        let at = self
            .items
            .partition_point(|e| Self::order(e, &entry) == Ordering::Less);
        self.items.insert(at, entry);
        self.items.truncate(self.k);
    }

    fn into_sorted(self) -> Vec<(u32, f32)> {
        self.items
    }
}

/// A small serving model for unit tests across the crate.
/// NDCG@10 of a manifest's `metrics`: `model.ndcg` of a cf-train run evaluated at `k: 10`
/// (the trainer's default), or `model["ndcg@10"]` as other publishers write it. `None` for a
/// run evaluated at another k: its NDCG is not comparable.
pub fn offline_ndcg_at_10(metrics: &serde_json::Value) -> Option<f64> {
    let model = &metrics["model"];
    model["ndcg@10"].as_f64().or_else(|| {
        (metrics["k"].as_u64() == Some(10))
            .then(|| model["ndcg"].as_f64())
            .flatten()
    })
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::artifacts::{DataInfo, Dtype, Manifest};
    use ndarray::array;

    /// A manifest of model `als` version `v1` with the given training parameters.
    fn manifest(params: serde_json::Value) -> Manifest {
        Manifest {
            format_version: 1,
            model: "als".into(),
            version: "v1".into(),
            created_at: chrono::Utc::now(),
            trainer_version: "test".into(),
            git_sha: None,
            dtype: Dtype::F32,
            regularization: 0.1,
            files: vec![],
            params,
            metrics: serde_json::Value::Null,
            data: DataInfo::default(),
        }
    }

    /// Seven products on two factors, trained users `a` and `b`.
    pub(crate) fn model() -> ServingModel {
        // Items 0..3 point along axis 0, items 3..6 along axis 1; item 6 is in between.
        let item_factors = array![
            [1.0, 0.0],
            [0.9, 0.1],
            [0.8, 0.0],
            [0.0, 1.0],
            [0.1, 0.9],
            [0.0, 0.8],
            [0.5, 0.5]
        ];
        let user_factors = array![[1.0, 0.0], [0.0, 1.0]];
        ServingModel::new(
            "als",
            LoadedModel {
                model: AlsModel {
                    user_factors,
                    item_factors,
                    regularization: 0.1,
                },
                users: IdMap::from_ids(vec!["a".into(), "b".into()]),
                items: IdMap::from_ids((0..7).map(|i| format!("p{i}")).collect()),
                manifest: manifest(serde_json::json!({"alpha": 10.0, "confidence": "linear"})),
            },
        )
        .expect("serving model")
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::model;
    use super::*;

    #[test]
    fn top_k_is_the_exact_ranking_minus_exclusions() {
        let m = model();
        let a = m.user_factors("a").expect("a").to_vec();
        let top = m.top_k(&a, 3, &[], None);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 1, 2]);
        let top = m.top_k(&a, 3, &[0, 2], None);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 6, 4]);
        let only_b_side = |i: u32| i >= 3;
        let top = m.top_k(&a, 2, &[], Some(&only_b_side));
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [6, 4]);
        // Against a full sort, on every k.
        let scores = m.scores(&a, &(0..7).collect::<Vec<_>>());
        let mut all: Vec<(u32, f32)> = scores
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u32, *s))
            .collect();
        all.sort_by(TopK::order);
        for k in 0..=8 {
            assert_eq!(m.top_k(&a, k, &[], None), all[..k.min(7)].to_vec(), "k={k}");
        }
        assert!(m.top_k(&[1.0], 3, &[], None).is_empty(), "wrong dimension");
    }

    #[test]
    fn fold_in_places_a_new_user_near_what_they_touched() {
        let m = model();
        let f = m.fold_in(&[
            Interaction {
                item: "p3",
                kind: EventType::Purchase,
                value: None,
            },
            Interaction {
                item: "p4",
                kind: EventType::View,
                value: None,
            },
            Interaction {
                item: "unknown",
                kind: EventType::View,
                value: None,
            },
        ]);
        assert_eq!((f.known, f.unknown), (2, 1));
        assert!(f.factors[1] > f.factors[0].abs() * 3.0, "{:?}", f.factors);
        let top = m.top_k(&f.factors, 1, &[], None);
        assert!(top[0].0 >= 3 && top[0].0 < 6, "{top:?}");
        let none = m.fold_in(&[]);
        assert_eq!(none.factors, vec![0.0, 0.0]);
    }

    #[test]
    fn new_products_get_stand_in_vectors() {
        let m = model();
        let v = m
            .fold_in_item(&[("b", EventType::Purchase, None)])
            .expect("known user");
        assert!(v[1] > v[0].abs(), "{v:?}");
        assert!(
            m.fold_in_item(&[("stranger", EventType::View, None)])
                .is_none()
        );
        let mean = m.mean_of_items(&["p0", "p3", "nope"]).expect("mean");
        assert_eq!(mean, vec![0.5, 0.5]);
        assert!(m.mean_of_items(&["nope"]).is_none());
        let similar = m.similar_items(0, 2);
        assert_eq!(similar.iter().map(|t| t.0).collect::<Vec<_>>(), [2, 1]);
    }

    #[test]
    fn training_prep_is_read_from_the_manifest() {
        let (c, w) = training_prep(&serde_json::json!({
            "confidence": "log", "alpha": 4.0, "log_epsilon": 2.0,
            "event_weights": {"view": 0.5, "click": 1, "add_to_cart": 2, "purchase": 5}
        }));
        assert_eq!(
            c,
            Confidence::Log {
                alpha: 4.0,
                epsilon: 2.0
            }
        );
        assert_eq!(w.purchase, 5.0);
        assert_eq!(w.view, 0.5);
        let (c, w) = training_prep(&serde_json::Value::Null);
        assert_eq!(c, Confidence::Linear { alpha: 1.0 });
        assert_eq!(w, EventWeights::default());
    }

    #[test]
    fn offline_ndcg_is_read_from_a_cf_train_manifest_at_k_10_only() {
        use serde_json::json;
        let at = |k: u64| json!({"k": k, "model": {"ndcg": 0.31}});
        assert_eq!(super::offline_ndcg_at_10(&at(10)), Some(0.31));
        assert_eq!(super::offline_ndcg_at_10(&at(20)), None);
        assert_eq!(
            super::offline_ndcg_at_10(&json!({"model": {"ndcg@10": 0.2}})),
            Some(0.2)
        );
        assert_eq!(super::offline_ndcg_at_10(&json!({})), None);
    }
}
