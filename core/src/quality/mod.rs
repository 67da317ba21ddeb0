//! Data quality: checks over the events (and the features computed from them) that gate what
//! reaches users.
//!
//! A run profiles its input once ([`profile`]: one aggregate pass over the events table, or
//! one read of an events file), judges the profile with every check ([`evaluate`]), adds the
//! drift checks of the features ([`drift`]), and reports one [`CheckResult`] per check: what
//! was checked (`check`, `check_type`, `target`), the observed value, the threshold and the
//! verdict. A failing *blocking* check fails the run's gate: `cf-train` does not publish, a
//! feature job does not overwrite online values, and the `data-quality` job exits with
//! [`crate::exit::GATE_FAILED`].
//!
//! Check types (stable, the `check_type` label of the metrics):
//!
//! | type | checks | observed |
//! |---|---|---|
//! | `schema` | `schema` | columns missing or of another type (file: malformed lines) |
//! | `freshness` | `freshness` | seconds since the newest event |
//! | `completeness` | `completeness.<field>` | worst hour's share of events missing the field |
//! | `validity` | `validity.event_type`, `validity.id_length`, `validity.future_timestamp`, `validity.duplicate`, `validity.unknown_product` | share of invalid events in the window |
//! | `volume` | `volume.total`, `volume.<event type>` | worst hour's `observed / expected` ([`volume`]) |
//! | `drift` | `drift.<statistic>` per feature version | the statistic ([`drift`]) |

pub mod drift;
pub mod profile;
pub mod results;
pub mod volume;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use profile::{Bucket, Column, EventProfile};

use crate::features::registry::parse_duration_ms;

/// The error kind of a run whose data-quality gate held (exit code
/// [`crate::exit::GATE_FAILED`]), in run summaries and BatchJob history.
pub const GATE_KIND: &str = "DataQualityGate";

/// Longest user, product or event id, in bytes, that the checks accept by default.
pub const MAX_ID_BYTES: usize = 256;

/// The family of a check: the `check_type` label of the metrics and the key of alerts,
/// dashboard panels and runbooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckType {
    /// The events table's columns and types (an event file's lines).
    Schema,
    /// The age of the newest event.
    Freshness,
    /// Required fields present.
    Completeness,
    /// Values within their domain: event types, id lengths, timestamps, catalog, duplicates.
    Validity,
    /// Hourly event volume against its seasonal baseline.
    Volume,
    /// Feature distributions against a reference window.
    Drift,
}

impl CheckType {
    /// Every check type.
    pub const ALL: [Self; 6] = [
        Self::Schema,
        Self::Freshness,
        Self::Completeness,
        Self::Validity,
        Self::Volume,
        Self::Drift,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Schema => "schema",
            Self::Freshness => "freshness",
            Self::Completeness => "completeness",
            Self::Validity => "validity",
            Self::Volume => "volume",
            Self::Drift => "drift",
        }
    }
}

/// The verdict of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Within its threshold.
    Pass,
    /// Over its threshold, but the check does not block (reported, alerted, not gated).
    Warn,
    /// Over its threshold, and the check blocks: the gate holds.
    Fail,
    /// Not judged, and why (no catalog configured, too little history, no reference).
    Skipped,
}

impl Verdict {
    /// Every verdict.
    pub const ALL: [Self; 4] = [Self::Pass, Self::Warn, Self::Fail, Self::Skipped];

    /// The wire name: the `status` label of `data_quality_checks_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Warn => "warn",
            Self::Fail => "fail",
            Self::Skipped => "skipped",
        }
    }

    /// Whether the check found a problem (a violation, blocking or not).
    pub fn is_violation(self) -> bool {
        matches!(self, Self::Warn | Self::Fail)
    }
}

/// The result of one check: one row of `data_quality_results`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The check, e.g. `completeness.product_id`.
    pub check: String,
    /// Its family.
    pub check_type: CheckType,
    /// What was checked: `events` (the table), an events file's path, or `feature:<name>@<major>`.
    pub target: String,
    /// The observed value (see the table in the module documentation).
    pub observed: Option<f64>,
    /// The threshold it is judged against.
    pub threshold: Option<f64>,
    /// The verdict.
    pub verdict: Verdict,
    /// Whether a failure holds the gate.
    pub blocking: bool,
    /// The figures in words, naming what is wrong and where.
    pub message: String,
}

impl CheckResult {
    fn new(check: impl Into<String>, check_type: CheckType, target: &str) -> Self {
        Self {
            check: check.into(),
            check_type,
            target: target.to_owned(),
            observed: None,
            threshold: None,
            verdict: Verdict::Pass,
            blocking: true,
            message: String::new(),
        }
    }

    fn figures(mut self, observed: f64, threshold: f64) -> Self {
        self.observed = Some(observed);
        self.threshold = Some(threshold);
        self
    }

    /// Sets the verdict from whether the check is violated, and the message.
    fn judged(mut self, violated: bool, message: String) -> Self {
        self.verdict = match (violated, self.blocking) {
            (false, _) => Verdict::Pass,
            (true, true) => Verdict::Fail,
            (true, false) => Verdict::Warn,
        };
        self.message = message;
        self
    }

    fn skipped(mut self, why: impl Into<String>) -> Self {
        self.verdict = Verdict::Skipped;
        self.message = why.into();
        self
    }

    /// `check on target: message`, for logs, conditions and exit messages.
    pub fn describe(&self) -> String {
        format!("{} on {}: {}", self.check, self.target, self.message)
    }
}

/// Thresholds and parameters of the checks; every option is also an environment variable.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct QualityArgs {
    /// Largest age of the newest event (freshness), e.g. `5m`.
    #[arg(
        long,
        env = "RECSYS_DQ_FRESHNESS_MAX_AGE",
        default_value = "5m",
        value_parser = duration_arg
    )]
    pub freshness_max_age: DurationArg,
    /// Largest share of events in one hour missing a required field (completeness).
    #[arg(long, env = "RECSYS_DQ_MAX_MISSING", default_value_t = 0.001, value_parser = fraction)]
    pub max_missing: f64,
    /// Largest share of invalid events in the window, per validity check.
    #[arg(long, env = "RECSYS_DQ_MAX_INVALID", default_value_t = 0.001, value_parser = fraction)]
    pub max_invalid: f64,
    /// Largest share of events for products missing from `--catalog`.
    #[arg(long, env = "RECSYS_DQ_MAX_UNKNOWN_PRODUCTS", default_value_t = 0.05, value_parser = fraction)]
    pub max_unknown_products: f64,
    /// Longest id (user, product, event) in bytes.
    #[arg(long, env = "RECSYS_DQ_MAX_ID_BYTES", default_value_t = MAX_ID_BYTES)]
    pub max_id_bytes: usize,
    /// How far ahead of now an event's time may be (clock skew) before it counts as in the
    /// future.
    #[arg(long, env = "RECSYS_DQ_FUTURE_SKEW", default_value = "5m", value_parser = duration_arg)]
    pub future_skew: DurationArg,
    /// Window of the completeness and validity checks, back from now.
    #[arg(long, env = "RECSYS_DQ_CHECK_WINDOW", default_value = "24h", value_parser = duration_arg)]
    pub check_window: DurationArg,
    /// Weeks of history behind the volume baseline (at least 2 for the weekly season).
    #[arg(long, env = "RECSYS_DQ_VOLUME_WEEKS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=52))]
    pub volume_weeks: u16,
    /// Complete hours judged by the volume check, besides the current one.
    #[arg(long, env = "RECSYS_DQ_VOLUME_HOURS", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=168))]
    pub volume_hours: u16,
    /// Least |z| of a volume anomaly.
    #[arg(long, env = "RECSYS_DQ_VOLUME_Z", default_value_t = 3.5)]
    pub volume_z: f64,
    /// Least `observed / expected` of a volume spike.
    #[arg(long, env = "RECSYS_DQ_SPIKE_RATIO", default_value_t = 2.0)]
    pub spike_ratio: f64,
    /// Largest `observed / expected` of a volume drop.
    #[arg(long, env = "RECSYS_DQ_DROP_RATIO", default_value_t = 0.5)]
    pub drop_ratio: f64,
    /// Least expected events of an hour the volume check judges.
    #[arg(long, env = "RECSYS_DQ_VOLUME_MIN_EXPECTED", default_value_t = 10.0)]
    pub volume_min_expected: f64,
    /// Reference window of the drift checks: the feature's materializations this far back
    /// before the latest.
    #[arg(long, env = "RECSYS_DQ_DRIFT_REFERENCE", default_value = "7d", value_parser = duration_arg)]
    pub drift_reference: DurationArg,
    /// Fewest values on each side (current and reference) for a drift check to be judged.
    #[arg(long, env = "RECSYS_DQ_DRIFT_MIN_VALUES", default_value_t = 100)]
    pub drift_min_values: usize,
    /// Checks (`validity.unknown_product`) or check types (`volume`) whose failures warn
    /// instead of holding the gate; comma-separated.
    #[arg(
        long,
        env = "RECSYS_DQ_WARN_ONLY",
        value_delimiter = ',',
        default_value = "validity.unknown_product"
    )]
    pub warn_only: Vec<String>,
}

impl Default for QualityArgs {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            q: QualityArgs,
        }
        Wrap::parse_from(["defaults"]).q
    }
}

impl QualityArgs {
    /// Whether a failure of `check` (of `check_type`) blocks.
    pub fn blocks(&self, check: &str, check_type: CheckType) -> bool {
        !self
            .warn_only
            .iter()
            .any(|w| w == check || w == check_type.as_str())
    }

    /// The volume detector's parameters.
    pub fn volume(&self) -> volume::VolumeConfig {
        volume::VolumeConfig {
            weeks: usize::from(self.volume_weeks),
            hours: usize::from(self.volume_hours),
            z_threshold: self.volume_z,
            spike_ratio: self.spike_ratio,
            drop_ratio: self.drop_ratio,
            min_expected: self.volume_min_expected,
            ..volume::VolumeConfig::default()
        }
    }

    /// How far back the volume history reaches: the baseline's weeks and the judged hours.
    pub fn history_ms(&self) -> i64 {
        (i64::from(self.volume_weeks) * 7 * 24 + i64::from(self.volume_hours) + 1) * volume::HOUR_MS
    }
}

/// A duration option, in milliseconds, with its text for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationArg {
    /// As given.
    pub text: String,
    /// In milliseconds.
    pub ms: i64,
}

fn duration_arg(s: &str) -> Result<DurationArg, String> {
    let ms = parse_duration_ms(s)?;
    Ok(DurationArg {
        text: s.to_owned(),
        ms: i64::try_from(ms).map_err(|_| format!("{s:?} is too long"))?,
    })
}

fn fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if (0.0..=1.0).contains(&f) {
        Ok(f)
    } else {
        Err(format!("{s} is not a fraction in [0, 1]"))
    }
}

/// The columns of the events table the code reads and writes, with their Postgres types
/// (`information_schema.columns.data_type`), and whether the checks need them.
pub const EXPECTED_COLUMNS: [(&str, &str, bool); 8] = [
    ("event_id", "text", true),
    ("user_id", "text", true),
    ("product_id", "text", true),
    ("event_type", "text", true),
    ("occurred_at", "timestamp with time zone", true),
    ("value", "real", false),
    ("category", "text", false),
    ("ingested_at", "timestamp with time zone", false),
];

/// The event types the code knows.
pub const EVENT_TYPES: [&str; 5] = ["view", "click", "add_to_cart", "purchase", "rating"];

/// Required fields of an event, in check names.
pub const REQUIRED_FIELDS: [&str; 4] = ["user_id", "product_id", "event_type", "occurred_at"];

fn pct(f: f64) -> String {
    format!("{:.3}%", f * 100.0)
}

fn span_start(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%MZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn hour_text(hour_ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(hour_ms)
        .map(|t| t.format("%Y-%m-%dT%H:00Z").to_string())
        .unwrap_or_else(|| hour_ms.to_string())
}

/// Judges a profile with every event check: schema, freshness, completeness, validity and
/// volume, in that order.
pub fn evaluate(p: &EventProfile, args: &QualityArgs) -> Vec<CheckResult> {
    let target = p.target.as_str();
    let new = |check: &str, t: CheckType| {
        let mut r = CheckResult::new(check, t, target);
        r.blocking = args.blocks(check, t);
        r
    };
    let mut out = vec![schema(p, new("schema", CheckType::Schema))];
    if let Some(missing) = p.missing_required_column() {
        // Without a required column nothing else can be read: say so on every check.
        let why = format!("not checked: the events table has no column {missing} (see schema)");
        out.push(new("freshness", CheckType::Freshness).skipped(why.clone()));
        return out;
    }
    out.push(freshness(p, args, new("freshness", CheckType::Freshness)));
    let from_hour = (p.at_ms - args.check_window.ms).div_euclid(volume::HOUR_MS);
    let to_hour = p.at_ms.div_euclid(volume::HOUR_MS);
    let in_window = |b: &&Bucket| b.hour.is_some_and(|h| (from_hour..=to_hour).contains(&h));
    // Completeness: the worst hour of the window (an hour of nulls is not averaged away by a
    // day of good events), over hours with enough events to judge a share.
    let mut hours: BTreeMap<i64, (u64, [u64; 3])> = BTreeMap::new();
    for b in p.buckets.iter().filter(in_window) {
        let e = hours.entry(b.hour.unwrap_or_default()).or_default();
        e.0 += b.rows;
        e.1[0] += b.missing_user;
        e.1[1] += b.missing_product;
        e.1[2] += if b.event_type.is_none() { b.rows } else { 0 };
    }
    let window_rows: u64 = hours.values().map(|h| h.0).sum();
    for (i, field) in REQUIRED_FIELDS[..3].iter().enumerate() {
        let worst = hours
            .iter()
            .map(|(h, (rows, missing))| (*h, *rows, missing[i]))
            .filter(|(_, rows, _)| *rows > 0)
            .max_by(|a, b| (a.2 as f64 / a.1 as f64).total_cmp(&(b.2 as f64 / b.1 as f64)));
        let name = format!("completeness.{field}");
        let r = new(&name, CheckType::Completeness);
        out.push(match worst {
            None => r.skipped("no events in the window"),
            Some((h, rows, missing)) => {
                let share = missing as f64 / rows as f64;
                r.figures(share, args.max_missing).judged(
                    share > args.max_missing,
                    format!(
                        "{missing} of {rows} events in the hour from {} have no {field} ({}; at most {})",
                        hour_text(h * volume::HOUR_MS),
                        pct(share),
                        pct(args.max_missing)
                    ),
                )
            }
        });
    }
    if p.columns.is_none() {
        out.push(
            new("completeness.occurred_at", CheckType::Completeness).skipped(format!(
                "events files may omit times; {} events have none",
                p.missing_time
            )),
        );
    } else {
        let rows = window_rows + p.missing_time;
        let share = if rows == 0 {
            0.0
        } else {
            p.missing_time as f64 / rows as f64
        };
        out.push(
            new("completeness.occurred_at", CheckType::Completeness)
                .figures(share, args.max_missing)
                .judged(
                    share > args.max_missing,
                    format!(
                        "{} events have no time ({} of the window's; at most {})",
                        p.missing_time,
                        pct(share),
                        pct(args.max_missing)
                    ),
                ),
        );
    }
    out.extend(validity(p, args, window_rows, &new, &in_window));
    out.extend(volume_checks(p, args, &new));
    out
}

fn schema(p: &EventProfile, r: CheckResult) -> CheckResult {
    match &p.columns {
        Some(columns) => {
            let mut problems = vec![];
            for (name, ty, _) in EXPECTED_COLUMNS {
                match columns.iter().find(|c| c.name == name) {
                    None => problems.push(format!("column {name} ({ty}) is missing")),
                    Some(c) if c.data_type != ty => {
                        problems.push(format!("column {name} is {}, expected {ty}", c.data_type))
                    }
                    Some(_) => {}
                }
            }
            let n = problems.len() as f64;
            let msg = if problems.is_empty() {
                format!(
                    "{} expected columns present with their types",
                    EXPECTED_COLUMNS.len()
                )
            } else {
                format!(
                    "{}: a migration was not applied or the table was changed by hand",
                    problems.join("; ")
                )
            };
            r.figures(n, 0.0).judged(n > 0.0, msg)
        }
        None => {
            let lines =
                p.malformed + p.buckets.iter().map(|b| b.rows).sum::<u64>() + p.missing_time;
            let msg = match &p.malformed_example {
                Some(ex) if p.malformed > 0 => format!(
                    "{} of {lines} lines are not event objects; first: {ex}",
                    p.malformed
                ),
                _ => format!("{lines} lines, every one an event object"),
            };
            r.figures(p.malformed as f64, 0.0)
                .judged(p.malformed > 0, msg)
        }
    }
}

fn freshness(p: &EventProfile, args: &QualityArgs, r: CheckResult) -> CheckResult {
    let max = args.freshness_max_age.ms as f64 / 1000.0;
    match p.newest_ms {
        None => r.figures(f64::INFINITY, max).judged(
            true,
            "no events at all: nothing has been ingested".to_owned(),
        ),
        Some(newest) => {
            let age = (p.at_ms - newest).max(0) as f64 / 1000.0;
            r.figures(age, max).judged(
                age > max,
                format!(
                    "newest event at {} is {} old (at most {})",
                    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(newest)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                        .unwrap_or_default(),
                    human(age),
                    args.freshness_max_age.text
                ),
            )
        }
    }
}

fn human(seconds: f64) -> String {
    if seconds < 120.0 {
        format!("{seconds:.0}s")
    } else if seconds < 7200.0 {
        format!("{:.1}m", seconds / 60.0)
    } else if seconds < 172_800.0 {
        format!("{:.1}h", seconds / 3600.0)
    } else {
        format!("{:.1}d", seconds / 86400.0)
    }
}

fn validity(
    p: &EventProfile,
    args: &QualityArgs,
    window_rows: u64,
    new: &dyn Fn(&str, CheckType) -> CheckResult,
    in_window: &dyn Fn(&&Bucket) -> bool,
) -> Vec<CheckResult> {
    let mut out = vec![];
    let share = |n: u64, of: u64| if of == 0 { 0.0 } else { n as f64 / of as f64 };
    let window: Vec<&Bucket> = p.buckets.iter().filter(in_window).collect();
    let unknown: BTreeMap<&str, u64> = window
        .iter()
        .filter_map(|b| b.event_type.as_deref().map(|t| (t, b.rows)))
        .filter(|(t, _)| !EVENT_TYPES.contains(t))
        .fold(BTreeMap::new(), |mut m, (t, n)| {
            *m.entry(t).or_default() += n;
            m
        });
    let n_unknown: u64 = unknown.values().sum();
    let s = share(n_unknown, window_rows);
    // The table counts unknown types together; their names come apart.
    let named: BTreeMap<&str, u64> = match &p.unknown_types {
        Some(names) => names.iter().map(|(t, n)| (t.as_str(), *n)).collect(),
        None => unknown.clone(),
    };
    out.push(
        new("validity.event_type", CheckType::Validity)
            .figures(s, args.max_invalid)
            .judged(
                s > args.max_invalid,
                if unknown.is_empty() {
                    format!("every event type is one of {}", EVENT_TYPES.join(", "))
                } else {
                    format!(
                        "{n_unknown} events ({}) have unknown types: {}",
                        pct(s),
                        named
                            .iter()
                            .take(5)
                            .map(|(t, n)| format!("{t:?} ×{n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
            ),
    );
    let long: u64 = window.iter().map(|b| b.long_ids).sum();
    let s = share(long, window_rows);
    out.push(
        new("validity.id_length", CheckType::Validity)
            .figures(s, args.max_invalid)
            .judged(
                s > args.max_invalid,
                format!(
                    "{long} events ({}) have an id over {} bytes",
                    pct(s),
                    args.max_id_bytes
                ),
            ),
    );
    // Future-dated events are counted wherever they fall (mostly after the window's end).
    let future: u64 = p.buckets.iter().map(|b| b.future).sum();
    let s = share(future, window_rows + future);
    out.push(
        new("validity.future_timestamp", CheckType::Validity)
            .figures(s, args.max_invalid)
            .judged(
                s > args.max_invalid,
                format!(
                    "{future} events ({}) are dated more than {} after they were ingested",
                    pct(s),
                    args.future_skew.text
                ),
            ),
    );
    let r = new("validity.duplicate", CheckType::Validity);
    out.push(match p.duplicates {
        None => r.skipped("duplicates not counted for this source"),
        Some((dups, rows)) => {
            let s = share(dups, rows);
            r.figures(s, args.max_invalid).judged(
                s > args.max_invalid,
                format!(
                    "{dups} of {rows} events in the window repeat another's user, product, type and time under a new id ({})",
                    pct(s)
                ),
            )
        }
    });
    let r = new("validity.unknown_product", CheckType::Validity);
    out.push(match &p.unknown_products {
        None => r.skipped("no catalog given (--catalog)"),
        Some(u) => {
            let s = share(u.unknown, u.rows);
            r.figures(s, args.max_unknown_products).judged(
                s > args.max_unknown_products,
                format!(
                    "{} of {} events in the window are for {} products not in the catalog ({}; at most {}){}",
                    u.unknown,
                    u.rows,
                    u.products,
                    pct(s),
                    pct(args.max_unknown_products),
                    u.example
                        .as_ref()
                        .map(|e| format!(", e.g. {e:?}"))
                        .unwrap_or_default()
                ),
            )
        }
    });
    out
}

fn volume_checks(
    p: &EventProfile,
    args: &QualityArgs,
    new: &dyn Fn(&str, CheckType) -> CheckResult,
) -> Vec<CheckResult> {
    let cfg = args.volume();
    let mut series: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    let known: BTreeSet<&str> = EVENT_TYPES.into_iter().collect();
    for b in &p.buckets {
        let Some(h) = b.hour else { continue };
        *series
            .entry("total".into())
            .or_default()
            .entry(h)
            .or_default() += b.rows as f64;
        if let Some(t) = b.event_type.as_deref().filter(|t| known.contains(t)) {
            *series
                .entry(t.to_owned())
                .or_default()
                .entry(h)
                .or_default() += b.rows as f64;
        }
    }
    if series.is_empty() {
        series.insert("total".into(), BTreeMap::new());
    }
    // Hours before the first event are unknown, not zero: a shop whose events start two weeks
    // ago has no baseline before then (its first hour, maybe partial, is left out too).
    let data_from = p
        .buckets
        .iter()
        .filter_map(|b| b.hour)
        .min()
        .map_or(p.history_from_ms, |h| {
            ((h + 1) * volume::HOUR_MS).max(p.history_from_ms)
        });
    series
        .iter()
        .map(|(name, counts)| {
            let check = format!("volume.{name}");
            let r = new(&check, CheckType::Volume);
            let judged = volume::judge(counts, data_from, p.at_ms, &cfg);
            let Some(worst) = judged
                .iter()
                .max_by(|a, b| {
                    (a.anomaly.is_some(), a.z.abs()).partial_cmp(&(b.anomaly.is_some(), b.z.abs()))
                        .unwrap_or(std::cmp::Ordering::Equal)
                })
            else {
                return r.skipped(format!(
                    "no hour judged: the baseline needs at least two weeks (or three days) of history with at least {} events an hour",
                    cfg.min_expected
                ));
            };
            let threshold = if worst.z >= 0.0 { cfg.spike_ratio } else { cfg.drop_ratio };
            let what = worst.anomaly.map(volume::Anomaly::as_str).unwrap_or("no anomaly");
            r.figures(worst.ratio(), threshold).judged(
                worst.anomaly.is_some(),
                format!(
                    "{what}: {} {} events in the {} from {} where {:.1} were expected ({:.2}×, z {:.1}; {} spans judged)",
                    worst.observed,
                    name,
                    if (worst.hours - 1.0).abs() < 1e-9 {
                        "hour".to_owned()
                    } else {
                        format!("{:.1} hours", worst.hours)
                    },
                    span_start(worst.hour_ms),
                    worst.expected,
                    worst.ratio(),
                    worst.z,
                    judged.len()
                ),
            )
        })
        .collect()
}

/// Why the drift checks could not read a feature.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    /// The registry failed.
    #[error("feature registry: {0}")]
    Registry(#[from] crate::features::registry::RegistryError),
    /// The offline store failed.
    #[error("offline store: {0}")]
    Offline(#[from] crate::features::offline::OfflineError),
}

impl DriftError {
    /// Stable label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Registry(e) => e.kind(),
            Self::Offline(e) => e.kind(),
        }
    }

    /// Whether a retry can help.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Registry(e) => e.retryable(),
            Self::Offline(e) => e.retryable(),
        }
    }
}

/// The drift checks of every registered, not retired, feature version with drift thresholds
/// (or of the named features only): its latest materialization at or before `at_ms` against
/// the ones in the reference window before it.
pub async fn feature_drift(
    registry: &dyn crate::features::registry::FeatureRegistry,
    offline: &dyn crate::features::offline::OfflineStore,
    only: &[String],
    at_ms: i64,
    args: &QualityArgs,
) -> Result<Vec<CheckResult>, DriftError> {
    let mut out = vec![];
    // One check per stored feature (name and major): the latest version of each, which the
    // feature jobs compute (`list` is by name, then version).
    let mut latest: BTreeMap<(String, u64), crate::features::registry::RegisteredFeature> =
        BTreeMap::new();
    for f in registry.list().await? {
        if f.retired_at_ms.is_none() && (only.is_empty() || only.contains(&f.spec.name)) {
            latest.insert((f.spec.name.clone(), f.major), f);
        }
    }
    for f in latest.into_values() {
        let Some(thresholds) = &f.spec.drift else {
            continue;
        };
        let feature = f.feature_ref();
        let target = drift::target(&feature);
        let blocks = args.blocks("drift", CheckType::Drift);
        let times = drift::materialization_times(registry, &feature).await?;
        let latest = times.iter().copied().find(|at| *at <= at_ms);
        let Some(latest) = latest else {
            let mut r = CheckResult::new("drift", CheckType::Drift, &target);
            r.blocking = blocks;
            out.push(r.skipped("never materialized"));
            continue;
        };
        let kind = f.spec.entity;
        let current = drift::Sample::of(&drift::values_at(offline, &feature, kind, latest).await?);
        let reference = drift::reference(
            offline,
            &feature,
            kind,
            &times,
            latest,
            args.drift_reference.ms,
        )
        .await?;
        out.extend(drift::judge(
            &target,
            thresholds,
            &reference,
            &current,
            args.drift_min_values,
            blocks,
        ));
    }
    Ok(out)
}

/// The report of one run of checks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QualityReport {
    /// The run's id (the rows' key in `data_quality_results`).
    pub run_id: String,
    /// The job that ran the checks (`data-quality`, `cf-train`, `popularity`, …).
    pub job: String,
    /// The time the checks were judged at, RFC 3339.
    pub at: String,
    /// One result per check.
    pub results: Vec<CheckResult>,
    /// Whether every blocking check passed.
    pub passed: bool,
    /// Seconds the checks took.
    pub seconds: f64,
}

impl QualityReport {
    /// A report of `results`, judged at `at_ms`.
    pub fn new(job: &str, at_ms: i64, results: Vec<CheckResult>, seconds: f64) -> Self {
        let at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(at_ms).unwrap_or_default();
        let passed = !results.iter().any(|r| r.verdict == Verdict::Fail);
        Self {
            run_id: format!(
                "{job}-{}-{:06x}",
                at.format("%Y%m%dT%H%M%S"),
                rand::random::<u32>() & 0xff_ffff
            ),
            job: job.to_owned(),
            at: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            results,
            passed,
            seconds,
        }
    }

    /// Adds results judged later (a feature job's drift checks of its new values).
    pub fn add(&mut self, results: Vec<CheckResult>) {
        self.passed &= !results.iter().any(|r| r.verdict == Verdict::Fail);
        self.results.extend(results);
    }

    /// The blocking checks that failed.
    pub fn failures(&self) -> impl Iterator<Item = &CheckResult> {
        self.results.iter().filter(|r| r.verdict == Verdict::Fail)
    }

    /// One line naming the failing checks, for errors and conditions.
    pub fn describe_failures(&self) -> String {
        self.failures()
            .map(CheckResult::describe)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The compact form the operator reads (counts per type and verdict, failing checks).
    pub fn summary(&self) -> QualitySummary {
        let mut checks: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for r in &self.results {
            *checks
                .entry(r.check_type.as_str().to_owned())
                .or_default()
                .entry(r.verdict.as_str().to_owned())
                .or_default() += 1;
        }
        let failing = self
            .results
            .iter()
            .filter(|r| r.verdict.is_violation())
            .map(|r| ViolatedCheck {
                check: r.check.clone(),
                check_type: r.check_type,
                target: r.target.clone(),
                blocking: r.verdict == Verdict::Fail,
            })
            .collect();
        QualitySummary {
            run_id: self.run_id.clone(),
            passed: self.passed,
            checks,
            violations: failing,
            event_age_seconds: self
                .results
                .iter()
                .find(|r| r.check == "freshness")
                .and_then(|r| r.observed)
                .filter(|a| a.is_finite()),
        }
    }
}

/// What a run's checks found, in the run summary the operator reads (metrics, conditions).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct QualitySummary {
    /// The run's id in `data_quality_results`.
    pub run_id: String,
    /// Whether every blocking check passed.
    pub passed: bool,
    /// Checks per check type and verdict.
    pub checks: BTreeMap<String, BTreeMap<String, u64>>,
    /// The checks that failed or warned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<ViolatedCheck>,
    /// Seconds since the newest event, when freshness was checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_age_seconds: Option<f64>,
}

/// A check that failed or warned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViolatedCheck {
    /// The check.
    pub check: String,
    /// Its family.
    pub check_type: CheckType,
    /// What it checked.
    pub target: String,
    /// Whether it held the gate.
    pub blocking: bool,
}

#[cfg(test)]
mod tests;
