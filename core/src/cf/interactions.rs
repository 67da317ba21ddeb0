//! Interaction events → a user × item matrix of aggregated weights (CSR, sprs), with dense
//! id maps and the validation that refuses data a model cannot learn from.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use sprs::CsMat;

/// What a user did to a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    /// Saw the product page or a tile.
    View,
    /// Clicked the product.
    Click,
    /// Put the product in the cart.
    AddToCart,
    /// Bought the product.
    Purchase,
    /// Rated the product explicitly; the event's value is the rating.
    Rating,
}

impl EventType {
    /// Canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::View => "view",
            Self::Click => "click",
            Self::AddToCart => "add_to_cart",
            Self::Purchase => "purchase",
            Self::Rating => "rating",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = DataError;

    /// Accepts the canonical names and the OTTO data set's `clicks`, `carts`, `orders`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "view" | "views" | "page_view" => Self::View,
            "click" | "clicks" => Self::Click,
            "add_to_cart" | "cart" | "carts" | "addtocart" => Self::AddToCart,
            "purchase" | "purchases" | "order" | "orders" | "transaction" => Self::Purchase,
            "rating" | "ratings" => Self::Rating,
            other => return Err(DataError::UnknownEventType(other.to_owned())),
        })
    }
}

/// Weight of each event type in the aggregated interaction strength.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EventWeights {
    /// Weight of a view (default 1).
    pub view: f32,
    /// Weight of a click (default 1).
    pub click: f32,
    /// Weight of an add-to-cart (default 2).
    pub add_to_cart: f32,
    /// Weight of a purchase (default 3).
    pub purchase: f32,
}

impl Default for EventWeights {
    fn default() -> Self {
        Self {
            view: 1.0,
            click: 1.0,
            add_to_cart: 2.0,
            purchase: 3.0,
        }
    }
}

impl EventWeights {
    /// The weight of one event; a rating weighs its value.
    pub fn weight(&self, kind: EventType, value: Option<f32>) -> f32 {
        match kind {
            EventType::View => self.view,
            EventType::Click => self.click,
            EventType::AddToCart => self.add_to_cart,
            EventType::Purchase => self.purchase,
            EventType::Rating => value.unwrap_or(0.0),
        }
    }
}

/// One interaction event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// User id.
    pub user: String,
    /// Product id.
    pub item: String,
    /// What happened.
    pub kind: EventType,
    /// When, in milliseconds since the Unix epoch.
    pub ts_ms: Option<i64>,
    /// An explicit weight that replaces the event type's: the rating of a `Rating`, or the
    /// weight of a `user item weight` line.
    pub value: Option<f32>,
}

/// How events become one weight per (user, item).
#[derive(Clone, Debug, PartialEq)]
pub struct AggregateOptions {
    /// Event-type weights.
    pub weights: EventWeights,
    /// Half-life of the time decay in milliseconds: an event `h` old weighs half. None: no decay.
    pub half_life_ms: Option<i64>,
    /// The time decay is measured to; the newest event's time when None.
    pub now_ms: Option<i64>,
    /// Fewest (user, item) pairs accepted.
    pub min_interactions: usize,
    /// Fewest distinct users accepted.
    pub min_users: usize,
}

impl Default for AggregateOptions {
    fn default() -> Self {
        Self {
            weights: EventWeights::default(),
            half_life_ms: None,
            now_ms: None,
            min_interactions: 10,
            min_users: 2,
        }
    }
}

/// Why interaction data was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DataError {
    /// No event at all.
    #[error("no interactions: the matrix is empty")]
    Empty,
    /// Too few (user, item) pairs to learn from.
    #[error("too few interactions: {found} (user, item) pairs, at least {required} needed")]
    TooFewInteractions {
        /// Pairs found.
        found: usize,
        /// Pairs required.
        required: usize,
    },
    /// Too few users to learn from.
    #[error("too few users: {found}, at least {required} needed")]
    TooFewUsers {
        /// Users found.
        found: usize,
        /// Users required.
        required: usize,
    },
    /// An event type nobody defined.
    #[error("unknown event type {0:?} (expected view, click, add_to_cart, purchase or rating)")]
    UnknownEventType(String),
    /// A weight that is NaN or infinite.
    #[error("non-finite weight {weight} for user {user:?} and item {item:?}")]
    NonFiniteWeight {
        /// The user.
        user: String,
        /// The item.
        item: String,
        /// The weight.
        weight: f32,
    },
    /// A negative aggregated weight (implicit feedback is never negative).
    #[error("negative weight {weight} for user {user:?} and item {item:?}")]
    NegativeWeight {
        /// The user.
        user: String,
        /// The item.
        item: String,
        /// The weight.
        weight: f32,
    },
    /// More distinct ids than a 32-bit index holds.
    #[error("too many distinct {what}: more than {max}")]
    TooManyIds {
        /// `users` or `items`.
        what: &'static str,
        /// The limit.
        max: u64,
    },
}

impl DataError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty => "EmptyMatrix",
            Self::TooFewInteractions { .. } => "TooFewInteractions",
            Self::TooFewUsers { .. } => "TooFewUsers",
            Self::UnknownEventType(_) => "UnknownEventType",
            Self::NonFiniteWeight { .. } => "NonFiniteWeight",
            Self::NegativeWeight { .. } => "NegativeWeight",
            Self::TooManyIds { .. } => "TooManyIds",
        }
    }
}

/// Dense indices for string ids, in first-seen order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IdMap {
    ids: Vec<String>,
    index: HashMap<String, u32>,
}

impl IdMap {
    /// Index of `id`, adding it when new.
    pub fn intern(&mut self, id: &str, what: &'static str) -> Result<u32, DataError> {
        if let Some(&i) = self.index.get(id) {
            return Ok(i);
        }
        let i = u32::try_from(self.ids.len()).map_err(|_| DataError::TooManyIds {
            what,
            max: u64::from(u32::MAX),
        })?;
        self.ids.push(id.to_owned());
        self.index.insert(id.to_owned(), i);
        Ok(i)
    }

    /// Index of `id`, if known.
    pub fn get(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// The id at `index`.
    pub fn id(&self, index: u32) -> Option<&str> {
        self.ids.get(index as usize).map(String::as_str)
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// All ids in index order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Builds a map from ids in index order.
    pub fn from_ids(ids: Vec<String>) -> Self {
        let index = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i as u32))
            .collect();
        Self { ids, index }
    }
}

/// Aggregated interactions: `matrix[u, i]` is the summed (decayed) weight of user `u` on item
/// `i`; rows follow `users`, columns follow `items`.
#[derive(Clone, Debug, PartialEq)]
pub struct Interactions {
    /// Row ids.
    pub users: IdMap,
    /// Column ids.
    pub items: IdMap,
    /// users × items, CSR, sorted indices, no explicit zeros.
    pub matrix: CsMat<f32>,
    /// Time range of the events (ms since the epoch), when they carried times.
    pub time_range: Option<(i64, i64)>,
}

/// Aggregates events per (user, item).
pub fn aggregate<I>(events: I, opts: &AggregateOptions) -> Result<Interactions, DataError>
where
    I: IntoIterator<Item = Event>,
{
    aggregate_into(
        events,
        opts,
        IdMap::default(),
        IdMap::default(),
        IdPolicy::Grow,
    )
    .map(|(x, _)| x)
}

/// Whether aggregation may add ids to the maps it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdPolicy {
    /// New users and items get new indices.
    Grow,
    /// Only known ids count; events of unknown users or items are dropped and counted (a test
    /// set mapped onto a training set's ids).
    Known,
}

/// Aggregates events per (user, item) onto existing id maps. Returns the interactions and the
/// number of events dropped under [`IdPolicy::Known`].
pub fn aggregate_into<I>(
    events: I,
    opts: &AggregateOptions,
    mut users: IdMap,
    mut items: IdMap,
    policy: IdPolicy,
) -> Result<(Interactions, usize), DataError>
where
    I: IntoIterator<Item = Event>,
{
    let mut dropped = 0;
    let mut raw: Vec<(u32, u32, f32, Option<i64>)> = vec![];
    let (mut t_min, mut t_max) = (i64::MAX, i64::MIN);
    for e in events {
        let (u, i) = match policy {
            IdPolicy::Grow => (
                users.intern(&e.user, "users")?,
                items.intern(&e.item, "items")?,
            ),
            IdPolicy::Known => match (users.get(&e.user), items.get(&e.item)) {
                (Some(u), Some(i)) => (u, i),
                _ => {
                    dropped += 1;
                    continue;
                }
            },
        };
        // A rating weighs its value; any other event weighs its type's weight unless it
        // carries its own (`user item weight` files).
        let w = match e.value {
            Some(v) => v,
            None => opts.weights.weight(e.kind, None),
        };
        if !w.is_finite() {
            return Err(DataError::NonFiniteWeight {
                user: e.user,
                item: e.item,
                weight: w,
            });
        }
        if let Some(t) = e.ts_ms {
            t_min = t_min.min(t);
            t_max = t_max.max(t);
        }
        raw.push((u, i, w, e.ts_ms));
    }
    if raw.is_empty() {
        return Err(DataError::Empty);
    }
    let time_range = (t_min <= t_max).then_some((t_min, t_max));
    if let Some(half_life) = opts.half_life_ms.filter(|h| *h > 0) {
        let now = opts.now_ms.or(time_range.map(|r| r.1)).unwrap_or(0);
        for (_, _, w, ts) in &mut raw {
            if let Some(t) = ts {
                let age = (now - *t).max(0) as f64;
                *w *= 0.5_f64.powf(age / half_life as f64) as f32;
            }
        }
    }
    raw.sort_unstable_by_key(|&(u, i, _, _)| (u, i));
    let mut indptr = Vec::with_capacity(users.len() + 1);
    let mut indices = Vec::with_capacity(raw.len());
    let mut data: Vec<f32> = Vec::with_capacity(raw.len());
    indptr.push(0);
    let mut row = 0_u32;
    let mut last: Option<(u32, u32)> = None;
    for (u, i, w, _) in raw {
        while row < u {
            indptr.push(indices.len());
            row += 1;
        }
        if last == Some((u, i)) {
            if let Some(d) = data.last_mut() {
                *d += w;
            }
        } else {
            indices.push(i as usize);
            data.push(w);
            last = Some((u, i));
        }
    }
    while indptr.len() <= users.len() {
        indptr.push(indices.len());
    }
    // Negative aggregates would mean "disliked"; implicit feedback has none.
    for (row, pair) in indptr.windows(2).enumerate() {
        for k in pair[0]..pair[1] {
            if data[k] < 0.0 {
                return Err(DataError::NegativeWeight {
                    user: users.id(row as u32).unwrap_or_default().to_owned(),
                    item: items.id(indices[k] as u32).unwrap_or_default().to_owned(),
                    weight: data[k],
                });
            }
        }
    }
    let nnz = indices.len();
    if nnz < opts.min_interactions {
        return Err(DataError::TooFewInteractions {
            found: nnz,
            required: opts.min_interactions,
        });
    }
    if users.len() < opts.min_users {
        return Err(DataError::TooFewUsers {
            found: users.len(),
            required: opts.min_users,
        });
    }
    let matrix = CsMat::new((users.len(), items.len()), indptr, indices, data);
    Ok((
        Interactions {
            users,
            items,
            matrix,
            time_range,
        },
        dropped,
    ))
}

/// How an aggregated weight becomes an ALS confidence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Confidence {
    /// `1 + alpha * w` (Hu, Koren & Volinsky).
    Linear {
        /// Scale.
        alpha: f32,
    },
    /// `1 + alpha * ln(1 + w / epsilon)`, for heavy-tailed counts.
    Log {
        /// Scale.
        alpha: f32,
        /// Count that doubles the log's argument.
        epsilon: f32,
    },
}

impl Confidence {
    /// The confidence of weight `w`.
    pub fn of(self, w: f32) -> f32 {
        match self {
            Self::Linear { alpha } => 1.0 + alpha * w,
            Self::Log { alpha, epsilon } => 1.0 + alpha * (w / epsilon).ln_1p(),
        }
    }

    /// A copy of `weights` holding confidences instead.
    pub fn apply(self, weights: &CsMat<f32>) -> CsMat<f32> {
        weights.map(|&w| self.of(w))
    }
}

/// Rescales each entry by BM25 (`K1`, `B`), the weighting `implicit` offers before ALS:
/// `w · (K1 + 1) / (K1 · len_norm + w) · idf`, with `len_norm = (1 − B) + B · rowsum / avg`.
pub fn bm25(weights: &CsMat<f32>, k1: f32, b: f32) -> CsMat<f32> {
    let (n_rows, n_cols) = weights.shape();
    let mut df = vec![0_u32; n_cols];
    for &c in weights.indices() {
        df[c] += 1;
    }
    let n = n_rows.max(1) as f32;
    let idf: Vec<f32> = df.iter().map(|&d| n.ln() - (d as f32).ln_1p()).collect();
    let row_sums: Vec<f32> = weights
        .outer_iterator()
        .map(|r| r.data().iter().sum())
        .collect();
    let avg = row_sums.iter().sum::<f32>() / n;
    let mut out = weights.clone();
    for (r, mut row) in out.outer_iterator_mut().enumerate() {
        let len_norm = (1.0 - b) + b * row_sums[r] / avg.max(f32::MIN_POSITIVE);
        for (c, v) in row.iter_mut() {
            *v = *v * (k1 + 1.0) / (k1 * len_norm + *v) * idf[c];
        }
    }
    out
}

/// Rescales each entry by TF-IDF: `sqrt(w) · idf`, with `idf = ln N − ln(1 + df)`.
pub fn tfidf(weights: &CsMat<f32>) -> CsMat<f32> {
    let (n_rows, n_cols) = weights.shape();
    let mut df = vec![0_u32; n_cols];
    for &c in weights.indices() {
        df[c] += 1;
    }
    let n = n_rows.max(1) as f32;
    let mut out = weights.clone();
    for mut row in out.outer_iterator_mut() {
        for (c, v) in row.iter_mut() {
            *v = v.sqrt() * (n.ln() - (df[c] as f32).ln_1p());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(user: &str, item: &str, kind: EventType, ts: i64) -> Event {
        Event {
            user: user.into(),
            item: item.into(),
            kind,
            ts_ms: Some(ts),
            value: None,
        }
    }

    fn loose() -> AggregateOptions {
        AggregateOptions {
            min_interactions: 1,
            min_users: 1,
            ..Default::default()
        }
    }

    #[test]
    fn weights_sum_per_pair_into_sorted_csr() {
        let events = vec![
            ev("u2", "b", EventType::View, 1),
            ev("u1", "b", EventType::Purchase, 2),
            ev("u1", "a", EventType::Click, 3),
            ev("u1", "b", EventType::AddToCart, 4),
            ev("u2", "b", EventType::View, 5),
        ];
        let x = aggregate(events, &loose()).expect("aggregate");
        assert_eq!(x.users.ids(), ["u2", "u1"]);
        assert_eq!(x.items.ids(), ["b", "a"]);
        assert_eq!(x.matrix.shape(), (2, 2));
        assert_eq!(x.matrix.get(0, 0), Some(&2.0), "two views");
        assert_eq!(x.matrix.get(1, 0), Some(&5.0), "purchase 3 + cart 2");
        assert_eq!(x.matrix.get(1, 1), Some(&1.0), "click");
        assert_eq!(x.matrix.nnz(), 3);
        assert_eq!(x.time_range, Some((1, 5)));
        assert!(x.matrix.is_csr());
    }

    #[test]
    fn a_test_set_maps_onto_training_ids_and_counts_the_rest() {
        let train = aggregate(
            vec![
                ev("u1", "a", EventType::View, 1),
                ev("u2", "b", EventType::View, 1),
            ],
            &loose(),
        )
        .expect("train");
        let (test, dropped) = aggregate_into(
            vec![
                ev("u2", "a", EventType::Purchase, 2),
                ev("u3", "a", EventType::View, 2),
                ev("u1", "z", EventType::View, 2),
            ],
            &loose(),
            train.users.clone(),
            train.items.clone(),
            IdPolicy::Known,
        )
        .expect("test");
        assert_eq!(dropped, 2);
        assert_eq!(test.matrix.shape(), train.matrix.shape());
        assert_eq!(test.matrix.get(1, 0), Some(&3.0));
    }

    #[test]
    fn decay_halves_at_the_half_life() {
        let opts = AggregateOptions {
            half_life_ms: Some(1000),
            now_ms: Some(2000),
            ..loose()
        };
        let x = aggregate(
            vec![
                ev("u", "old", EventType::Purchase, 1000),
                ev("u", "new", EventType::Purchase, 2000),
            ],
            &opts,
        )
        .expect("aggregate");
        let old = *x.matrix.get(0, 0).expect("old");
        let new = *x.matrix.get(0, 1).expect("new");
        assert!((old - 1.5).abs() < 1e-6, "{old}");
        assert!((new - 3.0).abs() < 1e-6, "{new}");
    }

    #[test]
    fn otto_and_canonical_names_parse_and_unknown_ones_are_named() {
        assert_eq!("orders".parse::<EventType>(), Ok(EventType::Purchase));
        assert_eq!("carts".parse::<EventType>(), Ok(EventType::AddToCart));
        assert_eq!("clicks".parse::<EventType>(), Ok(EventType::Click));
        let e = "wishlist".parse::<EventType>().expect_err("unknown");
        assert!(e.to_string().contains("\"wishlist\""), "{e}");
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        assert_eq!(aggregate(vec![], &loose()), Err(DataError::Empty));
        let few = aggregate(
            vec![ev("u", "a", EventType::View, 1)],
            &AggregateOptions::default(),
        );
        assert_eq!(
            few,
            Err(DataError::TooFewInteractions {
                found: 1,
                required: 10
            })
        );
        let mut nan = ev("u", "a", EventType::Rating, 1);
        nan.value = Some(f32::NAN);
        let e = aggregate(vec![nan], &loose()).expect_err("nan");
        assert_eq!(e.kind(), "NonFiniteWeight");
        let mut neg = ev("u", "a", EventType::Rating, 1);
        neg.value = Some(-2.0);
        assert_eq!(
            aggregate(vec![neg], &loose()).expect_err("neg").kind(),
            "NegativeWeight"
        );
        let users = aggregate(
            vec![
                ev("u", "a", EventType::View, 1),
                ev("u", "b", EventType::View, 1),
            ],
            &AggregateOptions {
                min_interactions: 1,
                ..Default::default()
            },
        );
        assert_eq!(
            users,
            Err(DataError::TooFewUsers {
                found: 1,
                required: 2
            })
        );
    }

    #[test]
    fn explicit_ratings_and_weight_files_keep_their_values() {
        let mut r = ev("u", "a", EventType::Rating, 1);
        r.value = Some(4.5);
        let w = Event {
            user: "u".into(),
            item: "b".into(),
            kind: EventType::Click,
            ts_ms: None,
            value: Some(7.0),
        };
        let x = aggregate(vec![r, w], &loose()).expect("aggregate");
        assert_eq!(x.matrix.get(0, 0), Some(&4.5));
        assert_eq!(x.matrix.get(0, 1), Some(&7.0));
    }

    #[test]
    fn confidence_scalings() {
        assert_eq!(Confidence::Linear { alpha: 2.0 }.of(3.0), 7.0);
        let log = Confidence::Log {
            alpha: 1.0,
            epsilon: 1.0,
        }
        .of(std::f32::consts::E - 1.0);
        assert!((log - 2.0).abs() < 1e-6);
    }

    #[test]
    fn bm25_and_tfidf_down_weight_common_items() {
        let m = CsMat::new(
            (3, 2),
            vec![0, 2, 3, 4],
            vec![0, 1, 0, 0],
            vec![1.0_f32, 1.0, 1.0, 1.0],
        );
        for weighted in [bm25(&m, 100.0, 0.8), tfidf(&m)] {
            let common = *weighted.get(0, 0).expect("common");
            let rare = *weighted.get(0, 1).expect("rare");
            assert!(rare > common, "rare {rare} common {common}");
        }
    }
}
