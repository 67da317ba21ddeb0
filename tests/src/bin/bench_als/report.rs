//! The printed result: the data, each side's figures, the ratios and the targets.

use std::fmt;

use recsys_core::cf::eval::Metrics;
use serde::Serialize;
use sprs::CsMat;

use crate::sides::{Params, SideReport};

/// The targets, as ratios recsys ÷ implicit.
pub const FIT_TIME_TARGET: f64 = 0.5;
/// NDCG@10 at least this share of implicit's.
pub const NDCG_TARGET: f64 = 0.98;
/// Peak memory at most implicit's.
pub const PEAK_MEMORY_TARGET: f64 = 1.0;

/// What the data looked like.
#[derive(Clone, Debug, Serialize)]
pub struct DataSummary {
    /// Where it came from.
    pub source: String,
    /// Rows.
    pub users: usize,
    /// Columns.
    pub items: usize,
    /// Interactions.
    pub interactions: usize,
    /// Interactions in train.
    pub train: usize,
    /// Interactions in test.
    pub test: usize,
    /// Users with test items (the evaluated users).
    pub test_users: usize,
    /// Share of interactions on the 1% most popular items.
    pub top_1pct_items_share: f64,
    /// The popularity baseline on the same split.
    pub popularity_ndcg: f64,
    /// The popularity baseline on the same split.
    pub popularity_precision: f64,
}

impl DataSummary {
    /// Summarises the data and its split.
    pub fn of(
        source: &str,
        all: &CsMat<f32>,
        train: &CsMat<f32>,
        test: &CsMat<f32>,
        popularity: &Metrics,
    ) -> Self {
        let mut per_item = vec![0_usize; all.cols()];
        for &i in all.indices() {
            per_item[i] += 1;
        }
        per_item.sort_unstable_by(|a, b| b.cmp(a));
        let top: usize = per_item[..all.cols().div_ceil(100)].iter().sum();
        Self {
            source: source.to_owned(),
            users: all.rows(),
            items: all.cols(),
            interactions: all.nnz(),
            train: train.nnz(),
            test: test.nnz(),
            test_users: popularity.users,
            top_1pct_items_share: top as f64 / all.nnz().max(1) as f64,
            popularity_ndcg: popularity.ndcg,
            popularity_precision: popularity.precision,
        }
    }
}

impl fmt::Display for DataSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "data: {}", self.source)?;
        write!(
            f,
            "  {} users × {} items, {} interactions ({} train / {} test, {} test users); \
             top 1% of items hold {:.1}% of interactions; popularity baseline NDCG@10 {:.4}, \
             P@10 {:.4}",
            self.users,
            self.items,
            self.interactions,
            self.train,
            self.test,
            self.test_users,
            100.0 * self.top_1pct_items_share,
            self.popularity_ndcg,
            self.popularity_precision
        )
    }
}

/// Every run of each side.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Runs {
    /// recsys runs in order.
    pub recsys: Vec<SideReport>,
    /// implicit runs in order.
    pub implicit: Vec<SideReport>,
}

/// recsys ÷ implicit.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Ratios {
    /// Fit time.
    pub fit_time: f64,
    /// CPU time of the fit (all threads).
    pub fit_cpu_time: f64,
    /// NDCG@10.
    pub ndcg10: f64,
    /// Precision@10.
    pub precision10: f64,
    /// Peak RSS at the end of the fit.
    pub fit_peak_rss: f64,
    /// Peak RSS of the whole side.
    pub peak_rss: f64,
}

/// The whole result.
#[derive(Clone, Debug, Serialize)]
pub struct Result {
    /// The data.
    pub data: DataSummary,
    /// The settings both sides ran with.
    pub params: Params,
    /// Every run.
    pub runs: Runs,
    /// Fastest recsys run.
    pub recsys: Option<SideReport>,
    /// Fastest implicit run.
    pub implicit: Option<SideReport>,
    /// Ratios of the fastest runs.
    pub ratios: Option<Ratios>,
}

fn fastest(runs: &[SideReport]) -> Option<SideReport> {
    runs.iter()
        .min_by(|a, b| a.fit_seconds.total_cmp(&b.fit_seconds))
        .cloned()
}

impl Result {
    /// Picks the fastest run of each side and computes the ratios.
    pub fn new(data: DataSummary, params: Params, runs: Runs) -> Self {
        let recsys = fastest(&runs.recsys);
        let implicit = fastest(&runs.implicit);
        let ratios = recsys.as_ref().zip(implicit.as_ref()).map(|(r, i)| Ratios {
            fit_time: r.fit_seconds / i.fit_seconds,
            fit_cpu_time: r.fit_cpu_seconds / i.fit_cpu_seconds,
            ndcg10: r.ndcg10 / i.ndcg10,
            precision10: r.precision10 / i.precision10,
            fit_peak_rss: r.fit_peak_rss_mb / i.fit_peak_rss_mb,
            peak_rss: r.peak_rss_mb / i.peak_rss_mb,
        });
        Self {
            data,
            params,
            runs,
            recsys,
            implicit,
            ratios,
        }
    }
}

fn row(f: &mut fmt::Formatter<'_>, name: &str, r: &SideReport) -> fmt::Result {
    writeln!(
        f,
        "{name:<10} {:>9.2} {:>9.2} {:>9.4} {:>9.4} {:>12.0} {:>12.0} {:>6.2}",
        r.fit_seconds,
        r.fit_cpu_seconds,
        r.ndcg10,
        r.precision10,
        r.fit_peak_rss_mb,
        r.peak_rss_mb,
        r.load_before
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

impl fmt::Display for Result {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        writeln!(f, "{}", self.data)?;
        writeln!(
            f,
            "settings: factors {}, iterations {}, CG steps {}, regularization {}, \
             confidence 1 + {}·w, {} threads, K {}",
            p.factors, p.iterations, p.cg_steps, p.regularization, p.alpha, p.threads, p.k
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<10} {:>9} {:>9} {:>9} {:>9} {:>12} {:>12} {:>6}",
            "side", "fit s", "fit CPU s", "NDCG@10", "P@10", "fit peak MB", "peak MB", "load"
        )?;
        for (name, runs) in [
            ("recsys", &self.runs.recsys),
            ("implicit", &self.runs.implicit),
        ] {
            for r in runs.iter() {
                row(f, name, r)?;
            }
        }
        if let Some(i) = &self.implicit
            && !i.blas.is_empty()
        {
            writeln!(f, "implicit {} on {}", i.version, i.blas)?;
        }
        if let Some(r) = &self.recsys
            && !r.iteration_seconds.is_empty()
        {
            let secs: Vec<String> = r
                .iteration_seconds
                .iter()
                .map(|s| format!("{s:.2}"))
                .collect();
            writeln!(f, "recsys seconds per iteration: {}", secs.join(" "))?;
        }
        let Some(q) = &self.ratios else {
            return writeln!(f, "(implicit not run: no ratios)");
        };
        writeln!(f)?;
        writeln!(
            f,
            "ratios recsys / implicit (fastest run of each):\n  \
             fit time    {:.3}  target ≤ {FIT_TIME_TARGET}: {} ({:.2}× faster)\n  \
             fit CPU     {:.3}  (CPU seconds of all threads, less sensitive to other load)\n  \
             NDCG@10     {:.3}  target ≥ {NDCG_TARGET}: {}\n  \
             P@10        {:.3}\n  \
             peak memory {:.3}  target ≤ {PEAK_MEMORY_TARGET}: {} (at the end of the fit: {:.3})",
            q.fit_time,
            verdict(q.fit_time <= FIT_TIME_TARGET),
            1.0 / q.fit_time,
            q.fit_cpu_time,
            q.ndcg10,
            verdict(q.ndcg10 >= NDCG_TARGET),
            q.precision10,
            q.peak_rss,
            verdict(q.peak_rss <= PEAK_MEMORY_TARGET),
            q.fit_peak_rss
        )
    }
}
