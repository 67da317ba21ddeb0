//! Implicit-feedback alternating least squares (Hu, Koren & Volinsky 2008).
//!
//! Minimises `Σ c_ui (p_ui − x_uᵀ y_i)² + λ (Σ‖x_u‖² + Σ‖y_i‖²)` with `p_ui = 1` for observed
//! pairs, where the input matrix holds the confidences `c_ui` (see
//! [`Confidence`](super::interactions::Confidence)); unobserved pairs have `p = 0, c = 1`.
//! Each half-sweep fixes one side and solves every row of the other independently, either by
//! a few warm-started conjugate-gradient steps that never form `YᵀC_uY` (the default, as in
//! `implicit`), or exactly by Cholesky. Rows are solved in parallel on a rayon pool of the
//! requested size; the result does not depend on the thread count, only on the seed.

use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView2};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sprs::{CsMat, CsMatView};

/// How each row's least-squares problem is solved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Solver {
    /// Warm-started conjugate gradient with this many steps (3 by default).
    ConjugateGradient {
        /// Steps per row per half-sweep.
        steps: usize,
    },
    /// Exact solve by Cholesky decomposition of `YᵀC_uY + λI`.
    Cholesky,
}

/// Hyper-parameters of a training run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlsParams {
    /// Latent dimensions.
    pub factors: usize,
    /// L2 regularisation λ.
    pub regularization: f32,
    /// Full sweeps (users, then items).
    pub iterations: usize,
    /// Row solver.
    pub solver: Solver,
    /// Worker threads; 0 uses every core.
    pub threads: usize,
    /// Seed of the initial factors.
    pub seed: u64,
}

impl Default for AlsParams {
    fn default() -> Self {
        Self {
            factors: 64,
            regularization: 0.01,
            iterations: 15,
            solver: Solver::ConjugateGradient { steps: 3 },
            threads: 0,
            seed: 42,
        }
    }
}

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A parameter is out of range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// Which parameter.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The confidence matrix has no rows, no columns or no entries.
    #[error("empty confidence matrix {rows} × {cols} with {nnz} entries")]
    EmptyMatrix {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Stored entries.
        nnz: usize,
    },
    /// A confidence is below 1, NaN or infinite.
    #[error(
        "confidence {value} at row {row} is not a finite number ≥ 1; confidences are 1 + alpha·w"
    )]
    BadConfidence {
        /// Row of the entry.
        row: usize,
        /// The value.
        value: f32,
    },
    /// The factors diverged (usually: regularisation too small for the confidences).
    #[error(
        "factors became non-finite at iteration {iteration}; raise the regularization or lower alpha"
    )]
    NonFinite {
        /// The iteration that produced them.
        iteration: usize,
    },
    /// The thread pool could not start.
    #[error("thread pool: {0}")]
    ThreadPool(String),
}

impl TrainError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidParameter { .. } => "InvalidParameter",
            Self::EmptyMatrix { .. } => "EmptyMatrix",
            Self::BadConfidence { .. } => "BadConfidence",
            Self::NonFinite { .. } => "NonFinite",
            Self::ThreadPool(_) => "ThreadPool",
        }
    }
}

/// Progress after one full sweep.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// 1-based iteration just finished.
    pub iteration: usize,
    /// Of how many.
    pub iterations: usize,
    /// Time the iteration took.
    pub took: Duration,
}

/// A trained model: one row of factors per user and per item.
#[derive(Clone, Debug, PartialEq)]
pub struct AlsModel {
    /// users × factors.
    pub user_factors: Array2<f32>,
    /// items × factors.
    pub item_factors: Array2<f32>,
    /// λ the model was trained with (fold-in uses the same).
    pub regularization: f32,
}

fn check(params: &AlsParams, conf: &CsMat<f32>) -> Result<(), TrainError> {
    let bad = |name, reason: &str| {
        Err(TrainError::InvalidParameter {
            name,
            reason: reason.to_owned(),
        })
    };
    if params.factors == 0 || params.factors > 4096 {
        return bad("factors", "must be between 1 and 4096");
    }
    if !params.regularization.is_finite() || params.regularization < 0.0 {
        return bad("regularization", "must be a finite number ≥ 0");
    }
    if params.iterations == 0 {
        return bad("iterations", "must be at least 1");
    }
    if let Solver::ConjugateGradient { steps: 0 } = params.solver {
        return bad("cg_steps", "must be at least 1");
    }
    let (rows, cols) = conf.shape();
    if rows == 0 || cols == 0 || conf.nnz() == 0 {
        return Err(TrainError::EmptyMatrix {
            rows,
            cols,
            nnz: conf.nnz(),
        });
    }
    for (row, vec) in conf.outer_iterator().enumerate() {
        if let Some(&value) = vec.data().iter().find(|c| !c.is_finite() || **c < 1.0) {
            return Err(TrainError::BadConfidence { row, value });
        }
    }
    Ok(())
}

/// Trains a model on `confidence` (users × items, CSR), calling `progress` after every sweep.
pub fn train(
    confidence: &CsMat<f32>,
    params: &AlsParams,
    mut progress: impl FnMut(Progress),
) -> Result<AlsModel, TrainError> {
    check(params, confidence)?;
    let conf = if confidence.is_csr() {
        confidence.clone()
    } else {
        confidence.to_csr()
    };
    let conf_t = conf.transpose_view().to_csr();
    let (n_users, n_items) = conf.shape();
    let k = params.factors;
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let mut init = |rows: usize| Array2::from_shape_fn((rows, k), |_| rng.random::<f32>() * 0.01);
    let mut users = init(n_users);
    let mut items = init(n_items);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(params.threads)
        .build()
        .map_err(|e| TrainError::ThreadPool(e.to_string()))?;
    for iteration in 1..=params.iterations {
        let start = Instant::now();
        pool.install(|| {
            half_sweep(&mut users, &items, conf.view(), params);
            half_sweep(&mut items, &users, conf_t.view(), params);
        });
        if !(users.iter().all(|v| v.is_finite()) && items.iter().all(|v| v.is_finite())) {
            return Err(TrainError::NonFinite { iteration });
        }
        progress(Progress {
            iteration,
            iterations: params.iterations,
            took: start.elapsed(),
        });
    }
    Ok(AlsModel {
        user_factors: users,
        item_factors: items,
        regularization: params.regularization,
    })
}

/// `YᵀY + λI`, row-major k × k.
pub fn gram(factors: ArrayView2<'_, f32>, regularization: f32) -> Vec<f32> {
    let mut g = factors.t().dot(&factors);
    for d in 0..g.nrows() {
        g[(d, d)] += regularization;
    }
    g.into_raw_vec_and_offset().0
}

/// Solves every row of `x` against the fixed `y` and the confidence rows of `conf`.
fn half_sweep(x: &mut Array2<f32>, y: &Array2<f32>, conf: CsMatView<'_, f32>, params: &AlsParams) {
    let k = params.factors;
    let yty = gram(y.view(), params.regularization);
    let y = y.as_slice().unwrap_or_default();
    let Some(xs) = x.as_slice_mut() else {
        return;
    };
    xs.par_chunks_mut(k)
        .zip(conf.outer_iterator().collect::<Vec<_>>().into_par_iter())
        .for_each_init(
            || Scratch::new(k),
            |scratch, (row, c)| {
                let (cols, confs) = (c.indices(), c.data());
                match params.solver {
                    Solver::ConjugateGradient { steps } => {
                        cg_row(row, &yty, y, cols, confs, steps, scratch)
                    }
                    Solver::Cholesky => exact_row(row, &yty, y, cols, confs, scratch),
                }
            },
        );
}

struct Scratch {
    r: Vec<f32>,
    p: Vec<f32>,
    ap: Vec<f32>,
    a: Vec<f32>,
}

impl Scratch {
    fn new(k: usize) -> Self {
        Self {
            r: vec![0.0; k],
            p: vec![0.0; k],
            ap: vec![0.0; k],
            a: vec![0.0; k * k],
        }
    }
}

/// Dot product with eight independent accumulators, so it vectorises.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0_f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut sum = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// `out = M v` for a row-major k × k `m`.
#[inline]
fn matvec(m: &[f32], v: &[f32], out: &mut [f32]) {
    let k = v.len();
    for (o, row) in out.iter_mut().zip(m.chunks_exact(k)) {
        *o = dot(row, v);
    }
}

/// Warm-started conjugate gradient on `(YᵀY + λI + Σ (c−1) y yᵀ) x = Σ c y`.
fn cg_row(
    x: &mut [f32],
    yty: &[f32],
    y: &[f32],
    cols: &[usize],
    confs: &[f32],
    steps: usize,
    s: &mut Scratch,
) {
    let k = x.len();
    // r = b − A x
    matvec(yty, x, &mut s.r);
    s.r.iter_mut().for_each(|v| *v = -*v);
    for (&i, &c) in cols.iter().zip(confs) {
        let yi = &y[i * k..(i + 1) * k];
        let t = (c - 1.0) * dot(yi, x);
        axpy(c - t, yi, &mut s.r);
    }
    s.p.copy_from_slice(&s.r);
    let mut rs_old = dot(&s.r, &s.r);
    if rs_old < 1e-20 {
        return;
    }
    for _ in 0..steps {
        matvec(yty, &s.p, &mut s.ap);
        for (&i, &c) in cols.iter().zip(confs) {
            let yi = &y[i * k..(i + 1) * k];
            let t = (c - 1.0) * dot(yi, &s.p);
            axpy(t, yi, &mut s.ap);
        }
        let p_ap = dot(&s.p, &s.ap);
        if p_ap <= 0.0 {
            break;
        }
        let alpha = rs_old / p_ap;
        axpy(alpha, &s.p, x);
        axpy(-alpha, &s.ap, &mut s.r);
        let rs_new = dot(&s.r, &s.r);
        if rs_new < 1e-20 {
            break;
        }
        let beta = rs_new / rs_old;
        for (pi, ri) in s.p.iter_mut().zip(&s.r) {
            *pi = ri + beta * *pi;
        }
        rs_old = rs_new;
    }
}

/// Exact solve of one row.
fn exact_row(
    x: &mut [f32],
    yty: &[f32],
    y: &[f32],
    cols: &[usize],
    confs: &[f32],
    s: &mut Scratch,
) {
    let k = x.len();
    s.a.copy_from_slice(yty);
    s.r.iter_mut().for_each(|v| *v = 0.0);
    for (&i, &c) in cols.iter().zip(confs) {
        let yi = &y[i * k..(i + 1) * k];
        for (row, &yr) in yi.iter().enumerate() {
            axpy((c - 1.0) * yr, yi, &mut s.a[row * k..(row + 1) * k]);
        }
        axpy(c, yi, &mut s.r);
    }
    if cholesky_solve(&mut s.a, &mut s.r, k) {
        x.copy_from_slice(&s.r);
    }
}

/// Solves `A x = b` in place for a symmetric positive-definite row-major `a` (k × k): `a` is
/// overwritten by its Cholesky factor, `b` by `x`. Returns false when `a` is not positive
/// definite (then `b` is left unspecified).
pub fn cholesky_solve(a: &mut [f32], b: &mut [f32], k: usize) -> bool {
    for j in 0..k {
        let mut d = a[j * k + j] - dot(&a[j * k..j * k + j], &a[j * k..j * k + j]);
        if d <= 0.0 || !d.is_finite() {
            return false;
        }
        d = d.sqrt();
        a[j * k + j] = d;
        for i in j + 1..k {
            let s = dot(&a[i * k..i * k + j], &a[j * k..j * k + j]);
            a[i * k + j] = (a[i * k + j] - s) / d;
        }
    }
    // L z = b
    for i in 0..k {
        let s = dot(&a[i * k..i * k + i], &b[..i]);
        b[i] = (b[i] - s) / a[i * k + i];
    }
    // Lᵀ x = z
    for i in (0..k).rev() {
        let mut s = 0.0;
        for j in i + 1..k {
            s += a[j * k + i] * b[j];
        }
        b[i] = (b[i] - s) / a[i * k + i];
    }
    true
}

/// Factors of a user from their interactions alone, by one exact least-squares solve against
/// fixed item factors: `(YᵀY + λI + Σ (c−1) y yᵀ) x = Σ c y`. `yty` is [`gram`] of the item
/// factors with the model's λ, computed once and reused for every fold-in. Interactions with
/// items outside the model are ignored. Returns zeros when there is nothing to solve.
pub fn fold_in(
    item_factors: ArrayView2<'_, f32>,
    yty: &[f32],
    interactions: &[(usize, f32)],
) -> Vec<f32> {
    let k = item_factors.ncols();
    let n_items = item_factors.nrows();
    let mut x = vec![0.0; k];
    let known: Vec<(usize, f32)> = interactions
        .iter()
        .copied()
        .filter(|&(i, _)| i < n_items)
        .collect();
    if known.is_empty() {
        return x;
    }
    let (cols, confs): (Vec<usize>, Vec<f32>) = known.into_iter().unzip();
    let Some(y) = item_factors.as_slice() else {
        return x;
    };
    let mut scratch = Scratch::new(k);
    exact_row(&mut x, yty, y, &cols, &confs, &mut scratch);
    x
}

/// The `n` best items for a user vector, highest score first, skipping `exclude` (sorted).
pub fn recommend(
    user: &[f32],
    item_factors: ArrayView2<'_, f32>,
    n: usize,
    exclude: &[usize],
) -> Vec<(usize, f32)> {
    let Some(y) = item_factors.as_slice() else {
        return vec![];
    };
    let k = user.len();
    let mut scored: Vec<(usize, f32)> = y
        .chunks_exact(k)
        .enumerate()
        .filter(|(i, _)| exclude.binary_search(i).is_err())
        .map(|(i, row)| (i, dot(user, row)))
        .collect();
    top_n(&mut scored, n);
    scored
}

/// Keeps the `n` highest scores, sorted descending (ties by lower index).
pub fn top_n(scored: &mut Vec<(usize, f32)>, n: usize) {
    let cmp = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if scored.len() > n && n > 0 {
        scored.select_nth_unstable_by(n - 1, cmp);
        scored.truncate(n);
    }
    if n == 0 {
        scored.clear();
    }
    scored.sort_unstable_by(cmp);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two clusters of users and items: users 0..6 use items 0..4, users 6..12 use 4..8.
    fn clustered() -> CsMat<f32> {
        let mut tri = sprs::TriMat::new((12, 8));
        for u in 0..12 {
            let base = if u < 6 { 0 } else { 4 };
            for j in 0..4 {
                // Leave one item out per user so there is something to recommend.
                if j != u % 4 {
                    tri.add_triplet(u, base + j, 1.0 + 4.0 * 1.0);
                }
            }
        }
        tri.to_csr()
    }

    fn params(solver: Solver) -> AlsParams {
        AlsParams {
            factors: 4,
            regularization: 0.1,
            iterations: 15,
            solver,
            threads: 2,
            seed: 7,
        }
    }

    #[test]
    fn learns_the_clusters_with_either_solver() {
        for solver in [Solver::ConjugateGradient { steps: 3 }, Solver::Cholesky] {
            let m = train(&clustered(), &params(solver), |_| {}).expect("train");
            for u in 0..12 {
                let seen: Vec<usize> = clustered()
                    .outer_view(u)
                    .map(|r| r.indices().to_vec())
                    .unwrap_or_default();
                let top = recommend(
                    m.user_factors.row(u).as_slice().expect("row"),
                    m.item_factors.view(),
                    1,
                    &seen,
                );
                let own = if u < 6 { 0..4 } else { 4..8 };
                assert!(
                    own.contains(&top[0].0),
                    "{solver:?}: user {u} got item {}",
                    top[0].0
                );
                assert_eq!(
                    top[0].0 % 4,
                    u % 4,
                    "{solver:?}: the held-out item of user {u}"
                );
            }
        }
    }

    #[test]
    fn deterministic_for_a_seed_whatever_the_threads() {
        let conf = clustered();
        let mut p = params(Solver::ConjugateGradient { steps: 3 });
        let a = train(&conf, &p, |_| {}).expect("a");
        p.threads = 1;
        let b = train(&conf, &p, |_| {}).expect("b");
        assert_eq!(a, b);
        p.seed = 8;
        let c = train(&conf, &p, |_| {}).expect("c");
        assert_ne!(a, c);
    }

    #[test]
    fn cg_approaches_the_exact_solution() {
        let conf = clustered();
        let exact = train(&conf, &params(Solver::Cholesky), |_| {}).expect("exact");
        let yty = gram(exact.item_factors.view(), 0.1);
        // Many CG steps from zero on one row equal the exact solve against the same items.
        let row = conf.outer_view(0).expect("row");
        let mut x = vec![0.0; 4];
        let mut s = Scratch::new(4);
        let y = exact.item_factors.as_slice().expect("slice");
        cg_row(&mut x, &yty, y, row.indices(), row.data(), 20, &mut s);
        let mut z = vec![0.0; 4];
        exact_row(&mut z, &yty, y, row.indices(), row.data(), &mut s);
        for (a, b) in x.iter().zip(&z) {
            assert!((a - b).abs() < 1e-3, "{x:?} vs {z:?}");
        }
    }

    #[test]
    fn fold_in_reproduces_a_trained_user() {
        let conf = clustered();
        let m = train(&conf, &params(Solver::Cholesky), |_| {}).expect("train");
        let yty = gram(m.item_factors.view(), m.regularization);
        let row = conf.outer_view(3).expect("row");
        let pairs: Vec<(usize, f32)> = row.iter().map(|(i, &c)| (i, c)).collect();
        let x = fold_in(m.item_factors.view(), &yty, &pairs);
        // The last half-sweep fixed the items; the user's exact solve against them is the
        // trained user row up to the final item update, so their rankings agree.
        let seen: Vec<usize> = row.indices().to_vec();
        let folded = recommend(&x, m.item_factors.view(), 3, &seen);
        let trained = recommend(
            m.user_factors.row(3).as_slice().expect("row"),
            m.item_factors.view(),
            3,
            &seen,
        );
        assert_eq!(folded[0].0, trained[0].0);
        assert!(
            fold_in(m.item_factors.view(), &yty, &[])
                .iter()
                .all(|v| *v == 0.0)
        );
        assert!(
            fold_in(m.item_factors.view(), &yty, &[(999, 5.0)])
                .iter()
                .all(|v| *v == 0.0)
        );
    }

    #[test]
    fn cholesky_solves_a_known_system() {
        // A = [[4, 2], [2, 3]], b = [2, 1] → x = [0.5, 0]
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        let mut b = vec![2.0, 1.0];
        assert!(cholesky_solve(&mut a, &mut b, 2));
        assert!((b[0] - 0.5).abs() < 1e-6 && b[1].abs() < 1e-6, "{b:?}");
        let mut not_pd = vec![1.0, 2.0, 2.0, 1.0];
        assert!(!cholesky_solve(&mut not_pd, &mut [1.0, 1.0], 2));
    }

    #[test]
    fn bad_inputs_are_refused_with_reasons() {
        let empty = CsMat::<f32>::zero((3, 3));
        assert_eq!(
            train(&empty, &AlsParams::default(), |_| {})
                .expect_err("empty")
                .kind(),
            "EmptyMatrix"
        );
        let p = AlsParams {
            factors: 0,
            ..Default::default()
        };
        let e = train(&clustered(), &p, |_| {}).expect_err("factors");
        assert!(e.to_string().contains("factors"), "{e}");
        let below_one = CsMat::new((1, 1), vec![0, 1], vec![0], vec![0.5_f32]);
        let e = train(&below_one, &AlsParams::default(), |_| {}).expect_err("confidence");
        assert_eq!(e.kind(), "BadConfidence");
    }

    #[test]
    fn dot_matches_the_naive_sum() {
        let a: Vec<f32> = (0..67).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..67).map(|i| 1.0 - i as f32 * 0.01).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-2 * naive.abs().max(1.0));
    }

    #[test]
    fn top_n_orders_and_breaks_ties_by_index() {
        let mut v = vec![(0, 1.0), (1, 3.0), (2, 3.0), (3, 2.0)];
        top_n(&mut v, 3);
        assert_eq!(v, [(1, 3.0), (2, 3.0), (3, 2.0)]);
    }
}
