//! A deterministic generator of implicit-feedback data with the shape of real logs, for
//! benchmarks and tests that need millions of interactions without shipping a data set.
//!
//! - **Item popularity** follows a Zipf law: the item of popularity rank `r` (ranks are a
//!   seeded shuffle of the items) has weight `(r + 1)^-ITEM_EXPONENT`.
//! - **User activity** follows a Pareto law (shape `USER_SHAPE`): most users have a handful of
//!   interactions, a few have thousands. Counts are scaled so that the total is the requested
//!   number, with at least `MIN_PER_USER` and at most a tenth of the catalogue per user.
//! - **Latent structure**: every item belongs to one of `topics` topics, every user has a
//!   primary and a secondary topic (primary topics are themselves Zipf-distributed, so some
//!   communities are larger). A user's interaction comes from the primary topic with
//!   probability `PRIMARY`, the secondary with `SECONDARY`, and otherwise from global
//!   popularity (noise); within a topic, items are drawn by popularity. Collaborative filtering
//!   therefore has signal to find beyond popularity.
//! - **Weights** are play-count-like integers `1 + ⌊Exp · m⌋`, larger on average inside the
//!   primary topic, so the weights carry signal too.
//!
//! The same parameters and seed always give the same matrix, on every platform.

use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sprs::{CsMat, TriMat};

/// Zipf exponent of item popularity.
pub const ITEM_EXPONENT: f64 = 0.9;
/// Pareto shape of user activity (smaller is more skewed).
pub const USER_SHAPE: f64 = 1.4;
/// Fewest interactions a user gets (when the catalogue allows it).
pub const MIN_PER_USER: usize = 2;
/// Share of a user's interactions drawn from their primary topic.
pub const PRIMARY: f64 = 0.65;
/// Share drawn from their secondary topic; the rest follows global popularity.
pub const SECONDARY: f64 = 0.2;

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthParams {
    /// Rows of the matrix.
    pub users: usize,
    /// Columns of the matrix.
    pub items: usize,
    /// Distinct (user, item) pairs wanted; the result is within a few percent of it.
    pub interactions: usize,
    /// Latent topics (clusters) of users and items.
    pub topics: usize,
    /// Seed; everything is a function of it and the sizes.
    pub seed: u64,
}

impl SynthParams {
    /// Sizes and seed with 40 topics.
    pub fn new(users: usize, items: usize, interactions: usize, seed: u64) -> Self {
        Self {
            users,
            items,
            interactions,
            topics: 40,
            seed,
        }
    }
}

/// A generated data set: the weights and the hidden topics behind them.
#[derive(Clone, Debug, PartialEq)]
pub struct Synthetic {
    /// users × items weights (CSR), each stored entry ≥ 1.
    pub weights: CsMat<f32>,
    /// Primary topic of each user.
    pub user_topic: Vec<u32>,
    /// Topic of each item.
    pub item_topic: Vec<u32>,
}

impl Synthetic {
    /// The stored entries as `(user, item, weight)` triples in row order.
    pub fn triples(&self) -> impl Iterator<Item = (usize, usize, f32)> + '_ {
        self.weights
            .outer_iterator()
            .enumerate()
            .flat_map(|(u, row)| row.iter().map(move |(i, &w)| (u, i, w)).collect::<Vec<_>>())
    }
}

/// Draws an index with probability proportional to its weight, by binary search over the
/// running sums `cum` (non-decreasing, last element the total).
fn draw(cum: &[f64], rng: &mut ChaCha8Rng) -> usize {
    let total = cum.last().copied().unwrap_or(0.0);
    let target = rng.random::<f64>() * total;
    cum.partition_point(|&c| c <= target).min(cum.len() - 1)
}

fn running_sums(weights: impl Iterator<Item = f64>) -> Vec<f64> {
    weights
        .scan(0.0, |acc, w| {
            *acc += w;
            Some(*acc)
        })
        .collect()
}

/// Per-user counts: Pareto draws scaled (by bisection) so that their clamped sum is `total`.
fn activity(users: usize, total: usize, cap: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let raw: Vec<f64> = (0..users)
        .map(|_| (1.0 - rng.random::<f64>()).powf(-1.0 / USER_SHAPE))
        .collect();
    let floor = MIN_PER_USER.min(cap);
    let counts = |scale: f64| -> Vec<usize> {
        raw.iter()
            .map(|&r| ((r * scale).round() as usize).clamp(floor, cap))
            .collect()
    };
    let sum = |scale: f64| counts(scale).iter().sum::<usize>();
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while sum(hi) < total && hi < 1e12 {
        hi *= 2.0;
    }
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if sum(mid) < total {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    counts(hi)
}

/// Generates the data set described by `p`. Sizes of zero give an empty matrix.
pub fn generate(p: &SynthParams) -> Synthetic {
    let (users, items) = (p.users, p.items);
    let topics = p.topics.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    if users == 0 || items == 0 {
        return Synthetic {
            weights: CsMat::zero((users, items)),
            user_topic: vec![0; users],
            item_topic: vec![0; items],
        };
    }

    // Items: a popularity rank and a topic each.
    let mut rank: Vec<usize> = (0..items).collect();
    rank.shuffle(&mut rng);
    let popularity: Vec<f64> = rank
        .iter()
        .map(|&r| ((r + 1) as f64).powf(-ITEM_EXPONENT))
        .collect();
    let item_topic: Vec<u32> = (0..items)
        .map(|_| rng.random_range(0..topics) as u32)
        .collect();
    let global = running_sums(popularity.iter().copied());
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); topics];
    for (i, &t) in item_topic.iter().enumerate() {
        members[t as usize].push(i);
    }
    let within: Vec<Vec<f64>> = members
        .iter()
        .map(|m| running_sums(m.iter().map(|&i| popularity[i])))
        .collect();
    // Topic sizes among users follow a mild Zipf law too.
    let topic_share = running_sums((0..topics).map(|t| ((t + 1) as f64).powf(-0.5)));

    let cap = (items / 10).max(1);
    let counts = activity(users, p.interactions, cap, &mut rng);
    let mut tri = TriMat::with_capacity((users, items), counts.iter().sum());
    let mut user_topic = Vec::with_capacity(users);
    // last_user[i] == u + 1 when user u already has item i: O(1) de-duplication.
    let mut last_user = vec![0_usize; items];
    for (u, &n) in counts.iter().enumerate() {
        let primary = draw(&topic_share, &mut rng);
        let secondary = rng.random_range(0..topics);
        user_topic.push(primary as u32);
        let mut got = 0;
        let mut attempts = 0;
        while got < n && attempts < 40 * n {
            attempts += 1;
            let roll = rng.random::<f64>();
            // After many collisions the user's topics are exhausted: fall back to popularity.
            let from_topic = attempts <= 8 * n;
            let (topic, mean) = if from_topic && roll < PRIMARY {
                (Some(primary), 4.0)
            } else if from_topic && roll < PRIMARY + SECONDARY {
                (Some(secondary), 2.0)
            } else {
                (None, 1.0)
            };
            let item = match topic {
                Some(t) if !members[t].is_empty() => members[t][draw(&within[t], &mut rng)],
                _ => draw(&global, &mut rng),
            };
            if last_user[item] == u + 1 {
                continue;
            }
            last_user[item] = u + 1;
            let plays = 1.0 + (-(1.0 - rng.random::<f64>()).ln() * mean).floor();
            tri.add_triplet(u, item, plays as f32);
            got += 1;
        }
    }
    Synthetic {
        weights: tri.to_csr(),
        user_topic,
        item_topic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> Synthetic {
        generate(&SynthParams::new(4_000, 2_000, 60_000, seed))
    }

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let a = small(1);
        assert_eq!(a, small(1));
        assert_ne!(a.weights, small(2).weights);
    }

    #[test]
    fn size_is_within_a_few_percent_of_the_request() {
        for (users, items, n) in [(4_000, 2_000, 60_000), (1_000, 5_000, 30_000)] {
            let s = generate(&SynthParams::new(users, items, n, 3));
            assert_eq!(s.weights.shape(), (users, items));
            let got = s.weights.nnz() as f64;
            assert!(
                (got / n as f64 - 1.0).abs() < 0.03,
                "{got} interactions for {n} requested"
            );
            assert!(
                s.weights
                    .data()
                    .iter()
                    .all(|&w| w >= 1.0 && w.fract() == 0.0)
            );
            assert!(
                s.weights.outer_iterator().all(|r| r.nnz() >= MIN_PER_USER),
                "every user has a few interactions"
            );
        }
    }

    #[test]
    fn popularity_and_activity_are_skewed() {
        let s = small(4);
        let (users, items) = s.weights.shape();
        let mut per_item = vec![0_usize; items];
        for &i in s.weights.indices() {
            per_item[i] += 1;
        }
        per_item.sort_unstable_by(|a, b| b.cmp(a));
        let total = s.weights.nnz() as f64;
        let top_items: usize = per_item[..items / 100].iter().sum();
        // Uniform popularity would give the top 1% of items about 1% of the interactions.
        assert!(
            top_items as f64 / total > 0.10,
            "top 1% of items: {top_items} of {total}"
        );
        let mut per_user: Vec<usize> = s.weights.outer_iterator().map(|r| r.nnz()).collect();
        per_user.sort_unstable_by(|a, b| b.cmp(a));
        let top_users: usize = per_user[..users / 100].iter().sum();
        assert!(
            top_users as f64 / total > 0.05,
            "top 1% of users: {top_users} of {total}"
        );
        let (median, mean) = (per_user[users / 2] as f64, total / users as f64);
        assert!(
            median < 0.7 * mean,
            "the median user ({median}) is well below the mean ({mean})"
        );
    }

    #[test]
    fn users_concentrate_on_their_topic() {
        let s = small(5);
        let (mut inside, mut total) = (0_usize, 0_usize);
        for (u, row) in s.weights.outer_iterator().enumerate() {
            for &i in row.indices() {
                total += 1;
                inside += usize::from(s.item_topic[i] == s.user_topic[u]);
            }
        }
        // By chance alone a user would meet their topic 1/40 of the time.
        let share = inside as f64 / total as f64;
        assert!(share > 0.4, "share in the primary topic: {share}");
    }

    #[test]
    fn triples_match_the_matrix_and_empty_sizes_work() {
        let s = generate(&SynthParams::new(50, 40, 300, 6));
        let triples: Vec<_> = s.triples().collect();
        assert_eq!(triples.len(), s.weights.nnz());
        for (u, i, w) in triples {
            assert_eq!(s.weights.get(u, i), Some(&w));
        }
        let empty = generate(&SynthParams::new(0, 10, 100, 1));
        assert_eq!(empty.weights.nnz(), 0);
    }
}
