//! Hyper-parameter search by k-fold cross-validation, choosing by NDCG@K, and the evaluation
//! glue that scores an ALS model and the popularity baseline on one split.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use sprs::{CsMat, TriMat};

use super::als::{self, AlsModel, AlsParams, TrainError};
use super::eval::{self, Metrics, Popularity};
use super::interactions::Confidence;

/// Scores `model` on `test`, never recommending what a user had in `train`.
pub fn evaluate_als(model: &AlsModel, train: &CsMat<f32>, test: &CsMat<f32>, k: usize) -> Metrics {
    let items = model.item_factors.view();
    eval::evaluate(train, test, k, |u, n| {
        let seen: Vec<usize> = train
            .outer_view(u)
            .map(|r| r.indices().to_vec())
            .unwrap_or_default();
        let Some(user) = model.user_factors.row(u).to_slice() else {
            return vec![];
        };
        als::recommend(user, items, n, &seen)
            .into_iter()
            .map(|(i, _)| i)
            .collect()
    })
}

/// Scores the popularity baseline fitted on `train` on `test`.
pub fn evaluate_popularity(train: &CsMat<f32>, test: &CsMat<f32>, k: usize) -> Metrics {
    let pop = Popularity::fit(train);
    eval::evaluate(train, test, k, |u, n| {
        let seen: Vec<usize> = train
            .outer_view(u)
            .map(|r| r.indices().to_vec())
            .unwrap_or_default();
        pop.recommend(n, &seen)
    })
}

/// Values tried for each hyper-parameter; the search tries every combination.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Grid {
    /// Latent dimensions.
    pub factors: Vec<usize>,
    /// L2 regularisation.
    pub regularization: Vec<f32>,
    /// Confidence scale.
    pub alpha: Vec<f32>,
    /// Sweeps.
    pub iterations: Vec<usize>,
}

impl Grid {
    /// Number of combinations.
    pub fn len(&self) -> usize {
        self.factors.len() * self.regularization.len() * self.alpha.len() * self.iterations.len()
    }

    /// Whether there is nothing to try.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One combination and how it scored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trial {
    /// Latent dimensions.
    pub factors: usize,
    /// L2 regularisation.
    pub regularization: f32,
    /// Confidence scale.
    pub alpha: f32,
    /// Sweeps.
    pub iterations: usize,
    /// Mean NDCG@K over the folds.
    pub ndcg: f64,
    /// NDCG@K of each fold.
    pub ndcg_per_fold: Vec<f64>,
    /// Mean precision@K over the folds.
    pub precision: f64,
}

/// The outcome of a search, kept in the model's metadata.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SearchResult {
    /// Folds.
    pub folds: usize,
    /// K of the metrics.
    pub k: usize,
    /// Every trial, in grid order.
    pub trials: Vec<Trial>,
    /// Index of the best trial in `trials`.
    pub best: usize,
}

impl SearchResult {
    /// The winning trial.
    pub fn best(&self) -> Option<&Trial> {
        self.trials.get(self.best)
    }
}

/// Splits the entries of `m` into `folds` seeded folds: pair `f` is (everything else, fold `f`).
pub fn k_fold(m: &CsMat<f32>, folds: usize, seed: u64) -> Vec<(CsMat<f32>, CsMat<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let assignment: Vec<usize> = (0..m.nnz())
        .map(|_| rng.random_range(0..folds.max(1)))
        .collect();
    (0..folds)
        .map(|f| {
            let mut train = TriMat::new(m.shape());
            let mut test = TriMat::new(m.shape());
            let mut n = 0;
            for (u, row) in m.outer_iterator().enumerate() {
                for (i, &w) in row.iter() {
                    if assignment[n] == f {
                        test.add_triplet(u, i, w);
                    } else {
                        train.add_triplet(u, i, w);
                    }
                    n += 1;
                }
            }
            (train.to_csr(), test.to_csr())
        })
        .collect()
}

/// Tries every combination of `grid` by `folds`-fold cross-validation on the raw weights
/// `weights`, turning weights into confidences with `confidence(alpha)`, and picks the best
/// mean NDCG@`k`. `base` supplies the solver, threads and seed. `progress` hears each trial.
pub fn grid_search(
    weights: &CsMat<f32>,
    grid: &Grid,
    confidence: impl Fn(f32) -> Confidence,
    base: &AlsParams,
    folds: usize,
    k: usize,
    mut progress: impl FnMut(&Trial),
) -> Result<SearchResult, TrainError> {
    if grid.is_empty() {
        return Err(TrainError::InvalidParameter {
            name: "grid",
            reason: "every hyper-parameter needs at least one value".into(),
        });
    }
    if folds < 2 {
        return Err(TrainError::InvalidParameter {
            name: "folds",
            reason: "cross-validation needs at least 2 folds".into(),
        });
    }
    let splits = k_fold(weights, folds, base.seed);
    let mut trials = vec![];
    for &factors in &grid.factors {
        for &regularization in &grid.regularization {
            for &alpha in &grid.alpha {
                for &iterations in &grid.iterations {
                    let params = AlsParams {
                        factors,
                        regularization,
                        iterations,
                        ..*base
                    };
                    let scale = confidence(alpha);
                    let mut ndcg_per_fold = vec![];
                    let mut precision = 0.0;
                    for (train, test) in &splits {
                        let model = als::train(&scale.apply(train), &params, |_| {})?;
                        let m = evaluate_als(&model, train, test, k);
                        ndcg_per_fold.push(m.ndcg);
                        precision += m.precision / folds as f64;
                    }
                    let trial = Trial {
                        factors,
                        regularization,
                        alpha,
                        iterations,
                        ndcg: ndcg_per_fold.iter().sum::<f64>() / folds as f64,
                        ndcg_per_fold,
                        precision,
                    };
                    progress(&trial);
                    trials.push(trial);
                }
            }
        }
    }
    let best = trials
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.ndcg.total_cmp(&b.1.ndcg).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i)
        .unwrap_or(0);
    Ok(SearchResult {
        folds,
        k,
        trials,
        best,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cf::als::Solver;

    /// Users in two taste groups, each group sharing most of its items.
    fn tastes() -> CsMat<f32> {
        let mut t = TriMat::new((40, 20));
        for u in 0..40 {
            let base = if u < 20 { 0 } else { 10 };
            for j in 0..10 {
                if (u + j) % 3 != 0 {
                    t.add_triplet(u, base + j, 1.0 + (j % 2) as f32);
                }
            }
        }
        t.to_csr()
    }

    #[test]
    fn folds_partition_the_entries() {
        let m = tastes();
        let splits = k_fold(&m, 3, 1);
        assert_eq!(splits.len(), 3);
        let held: usize = splits.iter().map(|(_, test)| test.nnz()).sum();
        assert_eq!(held, m.nnz());
        for (train, test) in &splits {
            assert_eq!(train.nnz() + test.nnz(), m.nnz());
        }
    }

    #[test]
    fn search_prefers_what_generalises_and_records_every_trial() {
        let grid = Grid {
            factors: vec![2, 4],
            regularization: vec![0.05, 500.0],
            alpha: vec![2.0],
            iterations: vec![8],
        };
        let base = AlsParams {
            solver: Solver::ConjugateGradient { steps: 3 },
            threads: 2,
            seed: 3,
            ..AlsParams::default()
        };
        let mut seen = 0;
        let r = grid_search(
            &tastes(),
            &grid,
            |alpha| Confidence::Linear { alpha },
            &base,
            3,
            5,
            |_| seen += 1,
        )
        .expect("search");
        assert_eq!((r.trials.len(), seen), (4, 4));
        let best = r.best().expect("best");
        assert!(
            best.regularization < 1.0,
            "a huge λ flattens every score: {best:?}"
        );
        assert!(r.trials.iter().all(|t| t.ndcg_per_fold.len() == 3));
        assert!(r.trials.iter().all(|t| best.ndcg >= t.ndcg));
    }

    #[test]
    fn empty_grids_and_single_folds_are_refused() {
        let base = AlsParams::default();
        let empty = Grid {
            factors: vec![],
            regularization: vec![0.1],
            alpha: vec![1.0],
            iterations: vec![1],
        };
        let conf = |alpha| Confidence::Linear { alpha };
        assert!(grid_search(&tastes(), &empty, conf, &base, 3, 10, |_| {}).is_err());
        let one = Grid {
            factors: vec![2],
            ..empty
        };
        let e = grid_search(&tastes(), &one, conf, &base, 1, 10, |_| {}).expect_err("folds");
        assert!(e.to_string().contains("folds"), "{e}");
    }

    #[test]
    fn als_beats_popularity_when_tastes_differ() {
        let (train, test) = eval::random_split(&tastes(), 0.7, 5);
        let params = AlsParams {
            factors: 4,
            regularization: 0.05,
            iterations: 10,
            threads: 2,
            ..AlsParams::default()
        };
        let model = als::train(
            &Confidence::Linear { alpha: 2.0 }.apply(&train),
            &params,
            |_| {},
        )
        .expect("train");
        let cf = evaluate_als(&model, &train, &test, 5);
        let pop = evaluate_popularity(&train, &test, 5);
        assert!(
            cf.ndcg > pop.ndcg,
            "cf {} vs popularity {}",
            cf.ndcg,
            pop.ndcg
        );
        assert!(cf.personalization > pop.personalization);
    }
}
