//! Offline evaluation: seeded splits and ranking metrics at K, always next to a popularity
//! baseline on the same split.
//!
//! Definitions follow `implicit.evaluation.ranking_metrics_at_k`, so figures compare one to one
//! with that library; all but precision are means over users:
//! - every user with at least one test item counts once; training items are never recommended;
//! - **precision@K** = Σ hits in the top K ÷ Σ min(K, |test_u|) over users (pooled, a capped
//!   recall, exactly as implicit computes it);
//! - **recall@K** = hits ÷ |test_u|;
//! - **MAP@K** = Σ over hits at rank r of (hits so far ÷ r), ÷ min(K, |test_u|);
//! - **NDCG@K** = Σ over hits of 1/log2(r+1), ÷ the ideal over min(K, |test_u|) hits;
//! - **AUC** is estimated from the top K alone, exactly as implicit does: misses before each hit
//!   are counted, and every item past K is assumed ranked below the positives found and mixed
//!   evenly with those not found;
//! - **catalog coverage** = distinct items in all top-K lists ÷ items;
//! - **personalization** = 1 − mean over pairs of users of |top-K(u) ∩ top-K(v)| ÷ K;
//! - **novelty** = mean over recommended items of −log2(share of training users who had it).

use std::collections::HashSet;

use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sprs::{CsMat, TriMat};

/// Splits every stored entry into train (probability `train_fraction`) or test, seeded.
pub fn random_split(m: &CsMat<f32>, train_fraction: f64, seed: u64) -> (CsMat<f32>, CsMat<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut train = TriMat::new(m.shape());
    let mut test = TriMat::new(m.shape());
    for (u, row) in m.outer_iterator().enumerate() {
        for (i, &w) in row.iter() {
            if rng.random::<f64>() < train_fraction {
                train.add_triplet(u, i, w);
            } else {
                test.add_triplet(u, i, w);
            }
        }
    }
    (train.to_csr(), test.to_csr())
}

/// Holds out `k` random entries of every user with more than `k + 1` entries, seeded; other
/// users stay whole in train (as implicit's `leave_k_out_split`).
pub fn leave_k_out(m: &CsMat<f32>, k: usize, seed: u64) -> (CsMat<f32>, CsMat<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut train = TriMat::new(m.shape());
    let mut test = TriMat::new(m.shape());
    for (u, row) in m.outer_iterator().enumerate() {
        let mut entries: Vec<(usize, f32)> = row.iter().map(|(i, &w)| (i, w)).collect();
        let held = if entries.len() > k + 1 { k } else { 0 };
        entries.shuffle(&mut rng);
        for (n, (i, w)) in entries.into_iter().enumerate() {
            if n < held {
                test.add_triplet(u, i, w);
            } else {
                train.add_triplet(u, i, w);
            }
        }
    }
    (train.to_csr(), test.to_csr())
}

/// Ranking metrics at K, averaged over the users that have test items.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Metrics {
    /// K.
    pub k: usize,
    /// Users evaluated.
    pub users: usize,
    /// precision@K (implicit's pooled definition).
    pub precision: f64,
    /// recall@K.
    pub recall: f64,
    /// MAP@K.
    pub map: f64,
    /// NDCG@K.
    pub ndcg: f64,
    /// AUC from the top K.
    pub auc: f64,
    /// Catalog coverage of the top-K lists.
    pub coverage: f64,
    /// 1 − mean pairwise top-K overlap.
    pub personalization: f64,
    /// Mean self-information of recommended items, in bits.
    pub novelty: f64,
}

/// Evaluates `recommend(user, K) -> items` (best first, training items excluded) on `test`.
/// `train` supplies item popularity for novelty.
pub fn evaluate<F>(train: &CsMat<f32>, test: &CsMat<f32>, k: usize, mut recommend: F) -> Metrics
where
    F: FnMut(usize, usize) -> Vec<usize>,
{
    let (n_users, n_items) = test.shape();
    let discount: Vec<f64> = (0..k).map(|r| 1.0 / ((r + 2) as f64).log2()).collect();
    let ideal: Vec<f64> = discount
        .iter()
        .scan(0.0, |acc, d| {
            *acc += d;
            Some(*acc)
        })
        .collect();
    let mut item_users = vec![0_u32; n_items];
    for &i in train.indices() {
        item_users[i] += 1;
    }
    let train_users = train
        .outer_iterator()
        .filter(|r| r.nnz() > 0)
        .count()
        .max(1) as f64;

    let mut m = Metrics {
        k,
        ..Default::default()
    };
    let mut shown = vec![0_u64; n_items];
    let (mut pooled_hits, mut pooled_cap) = (0.0_f64, 0.0_f64);
    let (mut novelty_sum, mut novelty_n) = (0.0, 0_u64);
    for u in 0..n_users {
        let Some(row) = test.outer_view(u) else {
            continue;
        };
        if row.nnz() == 0 || k == 0 {
            continue;
        }
        let likes: HashSet<usize> = row.indices().iter().copied().collect();
        let recs = recommend(u, k);
        let positives = likes.len() as f64;
        let negatives = (n_items - likes.len()) as f64;
        let (mut hits, mut ap, mut dcg, mut auc, mut misses) = (0.0_f64, 0.0, 0.0, 0.0, 0.0);
        for (rank, &item) in recs.iter().take(k).enumerate() {
            shown[item] += 1;
            let share = (f64::from(item_users[item]) / train_users).max(1.0 / train_users);
            novelty_sum -= share.log2();
            novelty_n += 1;
            if likes.contains(&item) {
                hits += 1.0;
                ap += hits / (rank + 1) as f64;
                dcg += discount[rank];
            } else {
                misses += 1.0;
                auc += hits;
            }
        }
        auc += (hits + positives) / 2.0 * (negatives - misses);
        let cap = k.min(likes.len());
        pooled_hits += hits;
        pooled_cap += cap as f64;
        m.recall += hits / positives;
        m.map += ap / cap as f64;
        m.ndcg += dcg / ideal[cap - 1];
        m.auc += if negatives > 0.0 {
            auc / (positives * negatives)
        } else {
            1.0
        };
        m.users += 1;
    }
    if m.users > 0 {
        let n = m.users as f64;
        m.precision = pooled_hits / pooled_cap;
        m.recall /= n;
        m.map /= n;
        m.ndcg /= n;
        m.auc /= n;
        m.coverage = shown.iter().filter(|&&c| c > 0).count() as f64 / n_items.max(1) as f64;
        // Σ over pairs of |A ∩ B| = Σ over items of C(shown_i, 2): exact, linear in the lists.
        let pairs = n * (n - 1.0) / 2.0;
        let shared: f64 = shown
            .iter()
            .map(|&c| (c as f64) * (c as f64 - 1.0) / 2.0)
            .sum();
        m.personalization = if pairs > 0.0 {
            1.0 - shared / (pairs * k as f64)
        } else {
            0.0
        };
        m.novelty = if novelty_n > 0 {
            novelty_sum / novelty_n as f64
        } else {
            0.0
        };
    }
    m
}

/// The popularity baseline: items ranked by how many training users had them.
#[derive(Clone, Debug)]
pub struct Popularity {
    ranked: Vec<usize>,
}

impl Popularity {
    /// Counts users per item in `train`.
    pub fn fit(train: &CsMat<f32>) -> Self {
        let mut counts = vec![0_u32; train.cols()];
        for &i in train.indices() {
            counts[i] += 1;
        }
        let mut ranked: Vec<usize> = (0..counts.len()).collect();
        ranked.sort_by_key(|&i| (std::cmp::Reverse(counts[i]), i));
        Self { ranked }
    }

    /// The `n` most popular items not in `exclude`.
    pub fn recommend(&self, n: usize, exclude: &[usize]) -> Vec<usize> {
        self.ranked
            .iter()
            .copied()
            .filter(|i| !exclude.contains(i))
            .take(n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: &[&[usize]], cols: usize) -> CsMat<f32> {
        let mut t = TriMat::new((rows.len(), cols));
        for (u, items) in rows.iter().enumerate() {
            for &i in *items {
                t.add_triplet(u, i, 1.0);
            }
        }
        t.to_csr()
    }

    #[test]
    fn metrics_match_hand_computed_values() {
        // One user, test items {1, 3}, 10 items, K = 3, recommended [1, 0, 3].
        let train = matrix(&[&[5]], 10);
        let test = matrix(&[&[1, 3]], 10);
        let m = evaluate(&train, &test, 3, |_, _| vec![1, 0, 3]);
        assert_eq!(m.users, 1);
        assert!((m.precision - 1.0).abs() < 1e-12, "2 hits / min(3, 2)");
        assert!((m.recall - 1.0).abs() < 1e-12);
        assert!((m.map - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        let dcg = 1.0 + 1.0 / 4_f64.log2();
        let idcg = 1.0 + 1.0 / 3_f64.log2();
        assert!((m.ndcg - dcg / idcg).abs() < 1e-12);
        // implicit's AUC: one miss after one hit → auc = 1; tail: (2+2)/2 * (8-1) = 14 → 15/16.
        assert!((m.auc - 15.0 / 16.0).abs() < 1e-12, "{}", m.auc);
        assert!((m.coverage - 0.3).abs() < 1e-12);
    }

    #[test]
    fn precision_is_pooled_over_users_like_implicit() {
        // User 0: 1 hit of min(2, 1) = 1; user 1: 0 hits of min(2, 2) = 2 → 1/3, not (1 + 0)/2.
        let train = matrix(&[&[5], &[5]], 8);
        let test = matrix(&[&[1], &[2, 3]], 8);
        let m = evaluate(&train, &test, 2, |_, _| vec![1, 0]);
        assert!((m.precision - 1.0 / 3.0).abs() < 1e-12, "{}", m.precision);
        assert!(
            (m.recall - 0.5).abs() < 1e-12,
            "recall is a mean: (1 + 0) / 2"
        );
    }

    #[test]
    fn personalization_is_one_for_disjoint_lists_and_zero_for_identical() {
        let train = matrix(&[&[0], &[0]], 6);
        let test = matrix(&[&[1], &[2]], 6);
        let disjoint = evaluate(&train, &test, 2, |u, _| {
            if u == 0 { vec![1, 2] } else { vec![3, 4] }
        });
        assert!((disjoint.personalization - 1.0).abs() < 1e-12);
        let same = evaluate(&train, &test, 2, |_, _| vec![1, 2]);
        assert!(same.personalization.abs() < 1e-12);
    }

    #[test]
    fn splits_are_seeded_and_partition_the_data() {
        let m = matrix(&[&[0, 1, 2, 3, 4], &[1, 2], &[0, 2, 4, 5]], 6);
        let (a_train, a_test) = random_split(&m, 0.6, 1);
        let (b_train, b_test) = random_split(&m, 0.6, 1);
        assert_eq!((a_train.clone(), a_test.clone()), (b_train, b_test));
        assert_eq!(a_train.nnz() + a_test.nnz(), m.nnz());
        let (train, test) = leave_k_out(&m, 1, 3);
        assert_eq!(test.outer_view(0).map(|r| r.nnz()), Some(1));
        assert_eq!(
            test.outer_view(1).map(|r| r.nnz()),
            Some(0),
            "2 entries is not more than k+1"
        );
        assert_eq!(train.nnz() + test.nnz(), m.nnz());
    }

    #[test]
    fn popularity_ranks_by_users_and_skips_seen() {
        let train = matrix(&[&[0, 1], &[1], &[1, 2]], 4);
        let p = Popularity::fit(&train);
        assert_eq!(p.recommend(3, &[]), [1, 0, 2]);
        assert_eq!(p.recommend(2, &[1]), [0, 2]);
    }
}
