//! Implicit-feedback alternating least squares (Hu, Koren & Volinsky 2008).
//!
//! Minimises `Σ c_ui (p_ui − x_uᵀ y_i)² + λ (Σ‖x_u‖² + Σ‖y_i‖²)` with `p_ui = 1` for observed
//! pairs, where the input matrix holds the confidences `c_ui` (see
//! [`Confidence`](super::interactions::Confidence)); unobserved pairs have `p = 0, c = 1`.
//! Each half-sweep fixes one side and solves every row of the other independently, either by
//! a few warm-started conjugate-gradient steps that never form `YᵀC_uY` (the default, as in
//! `implicit`), or exactly by Cholesky. Rows are solved in parallel on a rayon pool of the
//! requested size, in tasks of a fixed number of rows; the result does not depend on the
//! thread count, only on the seed.
//!
//! The CG solver runs in the eigenbasis of the fixed side's Gram matrix `YᵀY`, where its
//! dense part is diagonal: each CG step then costs O(k) for it instead of O(k²), and the
//! iterates are those of `implicit`'s CG up to rounding (CG is invariant under rotations).
//! Each half-sweep pays for that with dense products over all rows (a Gram matrix, an
//! eigen-decomposition of k × k, two rotations), far cheaper than a k × k product per row
//! and step. The rows a solve touches are gathered once into contiguous memory.

use std::time::{Duration, Instant};

use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2, Axis, Slice};
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
    // A CSR input is used in place (no copy: it would only raise the peak memory).
    let converted;
    let conf = if confidence.is_csr() {
        confidence.view()
    } else {
        converted = confidence.to_csr();
        converted.view()
    };
    let conf_t = conf.transpose_view().to_csr();
    let (n_users, n_items) = conf.shape();
    let k = params.factors;
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let mut init = |rows: usize| aligned_rows(rows, k, || rng.random::<f32>() * 0.01);
    let mut users = init(n_users);
    let mut items = init(n_items);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(params.threads)
        .build()
        .map_err(|e| TrainError::ThreadPool(e.to_string()))?;
    // The CG solver works in the eigenbasis of the fixed side's Gram matrix (see
    // `cg_half_sweep`); `basis` is the product of the rotations applied so far.
    let mut basis = Array2::<f64>::eye(k);
    for iteration in 1..=params.iterations {
        let start = Instant::now();
        pool.install(|| match params.solver {
            Solver::ConjugateGradient { steps } => {
                cg_half_sweep(&mut users, &mut items, conf, params, steps, &mut basis);
                cg_half_sweep(
                    &mut items,
                    &mut users,
                    conf_t.view(),
                    params,
                    steps,
                    &mut basis,
                );
            }
            Solver::Cholesky => {
                half_sweep(&mut users, &items, conf, params);
                half_sweep(&mut items, &users, conf_t.view(), params);
            }
        });
        if !pool.install(|| all_finite(&users) && all_finite(&items)) {
            return Err(TrainError::NonFinite { iteration });
        }
        progress(Progress {
            iteration,
            iterations: params.iterations,
            took: start.elapsed(),
        });
    }
    if let Solver::ConjugateGradient { .. } = params.solver {
        // Back to the basis of the initial factors.
        let back = basis.t().mapv(|v| v as f32);
        pool.install(|| {
            rotate(&mut users, &back);
            rotate(&mut items, &back);
        });
    }
    Ok(AlsModel {
        user_factors: users,
        item_factors: items,
        regularization: params.regularization,
    })
}

/// Whether every value is finite, checked in parallel.
fn all_finite(m: &Array2<f32>) -> bool {
    match m.as_slice() {
        Some(v) => v
            .par_chunks(ROWS_PER_BLOCK * 64)
            .all(|c| c.iter().all(|x| x.is_finite())),
        None => m.iter().all(|x| x.is_finite()),
    }
}

/// A `rows × k` array filled row by row from `f`, whose data starts on a 64-byte boundary: with
/// k a multiple of 16, every row then covers the fewest cache lines, which matters when the
/// solver gathers rows scattered across memory.
fn aligned_rows(rows: usize, k: usize, mut f: impl FnMut() -> f32) -> Array2<f32> {
    const LANES: usize = 64 / size_of::<f32>();
    let mut v: Vec<f32> = Vec::with_capacity(rows * k + LANES);
    let misaligned = (v.as_ptr() as usize / size_of::<f32>()) % LANES;
    let offset = (LANES - misaligned) % LANES;
    v.resize(offset, 0.0);
    v.extend((0..rows * k).map(|_| f()));
    let flat = Array1::from_vec(v).slice_axis_move(Axis(0), Slice::from(offset..));
    // Cannot fail (a contiguous array of rows · k values); were it to, any fresh values would do.
    flat.into_shape_with_order((rows, k))
        .unwrap_or_else(|_| Array2::from_shape_fn((rows, k), |_| f()))
}

/// `YᵀY + λI`, row-major k × k.
pub fn gram(factors: ArrayView2<'_, f32>, regularization: f32) -> Vec<f32> {
    let mut g = factors.t().dot(&factors);
    for d in 0..g.nrows() {
        g[(d, d)] += regularization;
    }
    g.into_raw_vec_and_offset().0
}

/// Rows per parallel task. Fixed, so that no result depends on the number of threads.
const ROWS_PER_TASK: usize = 128;
/// Rows per block of the dense products (Gram matrix, rotations); fixed for the same reason.
const ROWS_PER_BLOCK: usize = 2048;

/// `YᵀY` (no λ), summed over fixed blocks of rows in parallel and added in block order.
fn gram_parallel(y: &Array2<f32>) -> Array2<f32> {
    let k = y.ncols();
    let Some(ys) = y.as_slice() else {
        return y.t().dot(y);
    };
    let partials: Vec<Array2<f32>> = ys
        .par_chunks(ROWS_PER_BLOCK * k)
        .map(
            |block| match ArrayView2::from_shape((block.len() / k, k), block) {
                Ok(b) => b.t().dot(&b),
                Err(_) => Array2::zeros((k, k)),
            },
        )
        .collect();
    partials
        .into_iter()
        .reduce(|a, b| a + b)
        .unwrap_or_else(|| Array2::zeros((k, k)))
}

/// `m ← m q` for a k × k `q`, over fixed blocks of rows in parallel.
fn rotate(m: &mut Array2<f32>, q: &Array2<f32>) {
    let k = m.ncols();
    let Some(ms) = m.as_slice_mut() else {
        let r = m.dot(q);
        m.assign(&r);
        return;
    };
    ms.par_chunks_mut(ROWS_PER_BLOCK * k).for_each(|block| {
        let rows = block.len() / k;
        if let Ok(mut b) = ArrayViewMut2::from_shape((rows, k), block) {
            let r = b.dot(q);
            b.assign(&r);
        }
    });
}

/// One CG half-sweep: solves every row of `x` against the fixed `y` and `conf`.
///
/// CG is invariant under an orthogonal change of variables, so it runs in the eigenbasis
/// `Q` of `G = YᵀY`: with `X ← XQ` and `Y ← YQ` the system of a row becomes
/// `(Λ + λI + Σ (c−1) y yᵀ) x = Σ c y` with `Λ` diagonal. Every CG step then applies the
/// dense part in O(k) instead of the O(k²) of `(YᵀY + λI) p`, which dominates the cost for
/// rows with fewer than about k entries; the iterates are those of the unrotated CG (as in
/// `implicit`) up to rounding. The rotations are dense products over all rows, far cheaper
/// than a k × k product per row and CG step. `basis` accumulates `Q` so that [`train`] can
/// rotate back at the end.
fn cg_half_sweep(
    x: &mut Array2<f32>,
    y: &mut Array2<f32>,
    conf: CsMatView<'_, f32>,
    params: &AlsParams,
    steps: usize,
    basis: &mut Array2<f64>,
) {
    let k = params.factors;
    let g = gram_parallel(y).mapv(f64::from);
    let (values, q) = symmetric_eigen(g);
    let q32 = q.mapv(|v| v as f32);
    rotate(x, &q32);
    rotate(y, &q32);
    *basis = basis.dot(&q);
    let diag: Vec<f32> = values
        .iter()
        .map(|&v| (v.max(0.0) + f64::from(params.regularization)) as f32)
        .collect();
    let dense = Dense::Diagonal(&diag);
    let y = y.as_slice().unwrap_or_default();
    let (indptr, indices, data) = (conf.indptr(), conf.indices(), conf.data());
    let Some(xs) = x.as_slice_mut() else {
        return;
    };
    xs.par_chunks_mut(ROWS_PER_TASK * k)
        .enumerate()
        .for_each_init(
            || Scratch::new(k),
            |scratch, (task, rows)| {
                for (j, row) in rows.chunks_exact_mut(k).enumerate() {
                    let range = indptr.outer_inds_sz(task * ROWS_PER_TASK + j);
                    let (cols, confs) = (&indices[range.clone()], &data[range]);
                    match k {
                        32 => cg_solve::<32>(row, dense, y, cols, confs, steps, scratch),
                        64 => cg_solve::<64>(row, dense, y, cols, confs, steps, scratch),
                        128 => cg_solve::<128>(row, dense, y, cols, confs, steps, scratch),
                        _ => cg_solve::<0>(row, dense, y, cols, confs, steps, scratch),
                    }
                }
            },
        );
}

/// Solves every row of `x` exactly against the fixed `y` and the confidence rows of `conf`.
fn half_sweep(x: &mut Array2<f32>, y: &Array2<f32>, conf: CsMatView<'_, f32>, params: &AlsParams) {
    let k = params.factors;
    let yty = gram(y.view(), params.regularization);
    let y = y.as_slice().unwrap_or_default();
    let (indptr, indices, data) = (conf.indptr(), conf.indices(), conf.data());
    let Some(xs) = x.as_slice_mut() else {
        return;
    };
    xs.par_chunks_mut(ROWS_PER_TASK * k)
        .enumerate()
        .for_each_init(
            || Scratch::new(k),
            |scratch, (task, rows)| {
                for (j, row) in rows.chunks_exact_mut(k).enumerate() {
                    let range = indptr.outer_inds_sz(task * ROWS_PER_TASK + j);
                    let (cols, confs) = (&indices[range.clone()], &data[range]);
                    exact_row(row, &yty, y, cols, confs, scratch);
                }
            },
        );
}

/// Eigen-decomposition of a symmetric matrix: eigenvalues and the orthogonal matrix whose
/// columns are the eigenvectors (`A = Q diag(values) Qᵀ`), by Householder reduction to
/// tridiagonal form and the implicit QL algorithm (`tred2`/`tql2` of EISPACK, as in JAMA).
/// O(k³); non-finite input gives non-finite output, never a hang.
#[inline(never)]
pub fn symmetric_eigen(a: Array2<f64>) -> (Vec<f64>, Array2<f64>) {
    let n = a.nrows();
    let mut v = a;
    let mut d = vec![0.0_f64; n];
    let mut e = vec![0.0_f64; n];
    if n == 0 {
        return (d, v);
    }
    // tred2
    for j in 0..n {
        d[j] = v[(n - 1, j)];
    }
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for dk in &d[..i] {
            scale += dk.abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[(i - 1, j)];
                v[(i, j)] = 0.0;
                v[(j, i)] = 0.0;
            }
        } else {
            for dk in &mut d[..i] {
                *dk /= scale;
                h += *dk * *dk;
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for ej in &mut e[..i] {
                *ej = 0.0;
            }
            for j in 0..i {
                f = d[j];
                v[(j, i)] = f;
                g = e[j] + v[(j, j)] * f;
                for kk in j + 1..i {
                    g += v[(kk, j)] * d[kk];
                    e[kk] += v[(kk, j)] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for kk in j..i {
                    v[(kk, j)] -= f * e[kk] + g * d[kk];
                }
                d[j] = v[(i - 1, j)];
                v[(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    for i in 0..n - 1 {
        v[(n - 1, i)] = v[(i, i)];
        v[(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for kk in 0..=i {
                d[kk] = v[(kk, i + 1)] / h;
            }
            for j in 0..=i {
                let mut g = 0.0;
                for kk in 0..=i {
                    g += v[(kk, i + 1)] * v[(kk, j)];
                }
                for kk in 0..=i {
                    v[(kk, j)] -= g * d[kk];
                }
            }
        }
        for kk in 0..=i {
            v[(kk, i + 1)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[(n - 1, j)];
        v[(n - 1, j)] = 0.0;
    }
    v[(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;

    // tql2
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1 = 0.0_f64;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            for _ in 0..64 {
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in &mut d[l + 2..n] {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0, 1.0, 1.0);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0, 0.0);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    for kk in 0..n {
                        h = v[(kk, i + 1)];
                        v[(kk, i + 1)] = s * v[(kk, i)] + c * h;
                        v[(kk, i)] = c * v[(kk, i)] - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 || e[l].is_nan() {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    (d, v)
}

struct Scratch {
    r: Vec<f32>,
    p: Vec<f32>,
    ap: Vec<f32>,
    a: Vec<f32>,
    /// The rows of the fixed side that one row's solve touches, gathered.
    g: Vec<f32>,
}

impl Scratch {
    fn new(k: usize) -> Self {
        Self {
            r: vec![0.0; k],
            p: vec![0.0; k],
            ap: vec![0.0; k],
            a: vec![0.0; k * k],
            g: Vec::new(),
        }
    }
}

/// Dot product with sixteen independent accumulators (four vectors of four), so it vectorises
/// and the additions do not wait on each other.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_inline(a, b)
}

/// [`dot`], always inlined (the solver's inner loops).
#[inline(always)]
fn dot_inline(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0_f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    // Without this barrier LLVM's SLP vectoriser shapes the main loop after the horizontal sum
    // below and splits it into two-lane pieces, which runs about twice as slow.
    let acc = std::hint::black_box(acc);
    let mut quad = [0.0_f32; 4];
    for j in 0..4 {
        quad[j] = (acc[j] + acc[j + 4]) + (acc[j + 8] + acc[j + 12]);
    }
    let mut sum = (quad[0] + quad[2]) + (quad[1] + quad[3]);
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

#[inline(always)]
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

/// The dense part `YᵀY + λI` of a row's system.
#[derive(Clone, Copy, Debug)]
enum Dense<'a> {
    /// Row-major k × k, already including λ.
    #[cfg_attr(not(test), allow(dead_code))]
    Full(&'a [f32]),
    /// Diagonal (in the eigenbasis), already including λ.
    Diagonal(&'a [f32]),
}

impl Dense<'_> {
    /// `out = D v`.
    #[inline(always)]
    fn apply(self, v: &[f32], out: &mut [f32]) {
        match self {
            Self::Full(m) => matvec(m, v, out),
            Self::Diagonal(d) => {
                for ((o, vi), di) in out.iter_mut().zip(v).zip(d) {
                    *o = di * vi;
                }
            }
        }
    }
}

/// Warm-started conjugate gradient on `(YᵀY + λI + Σ (c−1) y yᵀ) x = Σ c y` (in the full form,
/// as `implicit` runs it; training uses the equivalent diagonal form of `cg_half_sweep`).
#[cfg(test)]
fn cg_row(
    x: &mut [f32],
    yty: &[f32],
    y: &[f32],
    cols: &[usize],
    confs: &[f32],
    steps: usize,
    s: &mut Scratch,
) {
    cg_solve::<0>(x, Dense::Full(yty), y, cols, confs, steps, s);
}

/// `out += Σ_j w(c_j, y_j · v) y_j` over the gathered rows `g` (k values each) with
/// confidences `confs`: the sparse part of every CG pass. Rows go two at a time so that `v`
/// and `out` are loaded once per pair and the two dot products share their reductions.
#[inline(always)]
fn rank_one_pass(
    g: &[f32],
    confs: &[f32],
    v: &[f32],
    out: &mut [f32],
    w: impl Fn(f32, f32) -> f32,
    k: usize,
) {
    let v = &v[..k];
    let out = &mut out[..k];
    let pairs = g.chunks_exact(2 * k).zip(confs.chunks_exact(2));
    let single = (
        g.chunks_exact(2 * k).remainder(),
        confs.chunks_exact(2).remainder(),
    );
    for (yy, cc) in pairs {
        let (y0, y1) = yy.split_at(k);
        let (d0, d1) = dot2(&y0[..k], &y1[..k], v);
        let (t0, t1) = (w(cc[0], d0), w(cc[1], d1));
        for ((o, a), b) in out.iter_mut().zip(&y0[..k]).zip(&y1[..k]) {
            *o += t0 * a + t1 * b;
        }
    }
    if let (y, [c]) = single {
        let y = &y[..k];
        axpy(w(*c, dot_inline(y, v)), y, out);
    }
}

/// `(a · v, b · v)`, each with eight accumulators.
#[inline(always)]
fn dot2(a: &[f32], b: &[f32], v: &[f32]) -> (f32, f32) {
    let mut acc = [[0.0_f32; 8]; 2];
    let chunks = a
        .chunks_exact(8)
        .zip(b.chunks_exact(8))
        .zip(v.chunks_exact(8));
    for ((x, y), z) in chunks {
        for j in 0..8 {
            acc[0][j] += x[j] * z[j];
            acc[1][j] += y[j] * z[j];
        }
    }
    let acc = std::hint::black_box(acc);
    let tail = a.len() - a.len() % 8;
    let mut sums = [0.0_f32; 2];
    for (s, (row, acc)) in sums.iter_mut().zip([a, b].into_iter().zip(acc)) {
        *s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
        for (x, z) in row[tail..].iter().zip(&v[tail..]) {
            *s += x * z;
        }
    }
    (sums[0], sums[1])
}

/// Warm-started conjugate gradient on `(D + Σ (c−1) y yᵀ) x = Σ c y`: at most `steps` steps,
/// stopping early when the squared residual falls below 1e-20 (as `implicit`).
///
/// `K` is the number of factors when it is one of the common sizes, so that the inner loops
/// have a fixed length and unroll; 0 means "read it from `x`".
fn cg_solve<const K: usize>(
    x: &mut [f32],
    dense: Dense<'_>,
    y: &[f32],
    cols: &[usize],
    confs: &[f32],
    steps: usize,
    s: &mut Scratch,
) {
    let k = if K == 0 { x.len() } else { K };
    let x = &mut x[..k];
    // Gather the rows of the fixed side once: the CG steps then stream through contiguous
    // memory instead of chasing scattered rows (that dominates for long rows).
    s.g.clear();
    for &i in cols {
        s.g.extend_from_slice(&y[i * k..(i + 1) * k]);
    }
    let Scratch { r, p, ap, g, .. } = s;
    let (r, p, ap) = (&mut r[..k], &mut p[..k], &mut ap[..k]);
    // r = b − A x
    dense.apply(x, r);
    r.iter_mut().for_each(|v| *v = -*v);
    rank_one_pass(g, confs, x, r, |c, d| c - (c - 1.0) * d, k);
    p.copy_from_slice(r);
    let mut rs_old = dot_inline(r, r);
    if rs_old < 1e-20 {
        return;
    }
    for _ in 0..steps {
        dense.apply(p, ap);
        rank_one_pass(g, confs, p, ap, |c, d| (c - 1.0) * d, k);
        let p_ap = dot_inline(p, ap);
        if p_ap <= 0.0 {
            break;
        }
        let alpha = rs_old / p_ap;
        axpy(alpha, p, x);
        axpy(-alpha, ap, r);
        let rs_new = dot_inline(r, r);
        if rs_new < 1e-20 {
            break;
        }
        let beta = rs_new / rs_old;
        for (pi, ri) in p.iter_mut().zip(r.iter()) {
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
    fn deterministic_across_threads_with_many_tasks_and_blocks() {
        // Enough rows for several parallel tasks and dense blocks, and 32 factors (the
        // unrolled solver).
        let data = crate::cf::synth::generate(&crate::cf::synth::SynthParams::new(
            2 * ROWS_PER_BLOCK + 100,
            400,
            20_000,
            3,
        ));
        let conf = data.weights.map(|&w| 1.0 + w);
        let mut p = AlsParams {
            factors: 32,
            regularization: 0.05,
            iterations: 2,
            solver: Solver::ConjugateGradient { steps: 3 },
            threads: 1,
            seed: 5,
        };
        let one = train(&conf, &p, |_| {}).expect("1 thread");
        p.threads = 3;
        let three = train(&conf, &p, |_| {}).expect("3 threads");
        assert_eq!(one, three);
        assert!(one.user_factors.iter().any(|&v| v != 0.0));
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

    /// A deterministic pseudo-random matrix with entries in [-1, 1).
    fn noise(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((rows, cols), |_| rng.random::<f32>() * 2.0 - 1.0)
    }

    #[test]
    fn symmetric_eigen_diagonalises_with_an_orthogonal_basis() {
        let y = noise(40, 12, 1).mapv(f64::from);
        let mut repeated = Array2::<f64>::eye(5) * 2.0;
        repeated[(4, 4)] = 7.0;
        for a in [
            y.t().dot(&y),
            repeated,
            Array2::from_elem((1, 1), 3.0),
            Array2::zeros((3, 3)),
        ] {
            let n = a.nrows();
            let (values, q) = symmetric_eigen(a.clone());
            let qtq = q.t().dot(&q);
            let qtaq = q.t().dot(&a).dot(&q);
            let scale = 1.0 + a.iter().fold(0.0_f64, |m, v| m.max(v.abs()));
            for i in 0..n {
                for j in 0..n {
                    let eye = if i == j { 1.0 } else { 0.0 };
                    assert!((qtq[(i, j)] - eye).abs() < 1e-12, "QᵀQ at {i},{j}");
                    let want = if i == j { values[i] } else { 0.0 };
                    assert!(
                        (qtaq[(i, j)] - want).abs() < 1e-10 * scale,
                        "QᵀAQ at {i},{j}: {} vs {want}",
                        qtaq[(i, j)]
                    );
                }
            }
        }
        let (values, _) = symmetric_eigen(Array2::from_elem((2, 2), f64::NAN));
        assert!(values.iter().any(|v| !v.is_finite()), "NaN in, NaN out");
    }

    #[test]
    fn cg_in_the_eigenbasis_takes_the_same_steps() {
        // One row's CG in the full form against Y equals CG in the eigenbasis of YᵀY against
        // YQ, rotated back; the unrolled solver for 32 factors equals the general one.
        let k = 32;
        let y = noise(90, k, 2);
        let cols: Vec<usize> = (0..90).step_by(3).collect();
        let confs: Vec<f32> = cols.iter().map(|&i| 1.0 + (i % 7) as f32).collect();
        let x0: Vec<f32> = noise(1, k, 3).iter().map(|v| v * 0.01).collect();
        let yty = gram(y.view(), 0.1);
        let mut s = Scratch::new(k);
        let mut full = x0.clone();
        cg_row(
            &mut full,
            &yty,
            y.as_slice().expect("y"),
            &cols,
            &confs,
            3,
            &mut s,
        );

        let (values, q) = symmetric_eigen(y.t().dot(&y).mapv(f64::from));
        let q32 = q.mapv(|v| v as f32);
        let yq = y.dot(&q32);
        let diag: Vec<f32> = values.iter().map(|&v| (v + 0.1) as f32).collect();
        let dense = Dense::Diagonal(&diag);
        let z0 = Array1::from_vec(x0).dot(&q32).to_vec();
        let yq_rows = yq.as_slice().expect("yq");
        let mut z = z0.clone();
        cg_solve::<0>(&mut z, dense, yq_rows, &cols, &confs, 3, &mut s);
        let mut z32 = z0;
        cg_solve::<32>(&mut z32, dense, yq_rows, &cols, &confs, 3, &mut s);
        assert_eq!(z, z32);
        let back = q32.dot(&Array1::from_vec(z));
        for (a, b) in full.iter().zip(&back) {
            assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "{full:?} vs {back}");
        }
    }

    #[test]
    fn factors_are_aligned_and_filled_in_row_order() {
        let mut n = 0.0;
        let a = aligned_rows(7, 16, || {
            n += 1.0;
            n
        });
        assert_eq!(a.dim(), (7, 16));
        assert_eq!(a.as_ptr() as usize % 64, 0);
        assert_eq!(a[(0, 0)], 1.0);
        assert_eq!(a[(1, 0)], 17.0);
        assert_eq!(a[(6, 15)], 112.0);
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
