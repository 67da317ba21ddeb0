//! The profile of an event source: everything the event checks judge, gathered in one pass.
//!
//! - The Postgres `events` table: the columns from `information_schema`, then **one** grouped
//!   pass over the check window through the `occurred_at` index (rows, missing fields,
//!   over-long ids, future times per hour and type), the duplicates among the window's events
//!   that share a time, and the volume history's counts
//!   per hour and type from the `events_hourly` rollup the database keeps (migration 0006),
//!   checked against the window's events; index lookups for the newest event, rows without a
//!   time and, when a catalog is named, products missing from it.
//! - An events file: read once, leniently: a line that is not an event is counted (the file's
//!   schema check), a missing field is counted (completeness), and reading goes on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::path::Path;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::QualityArgs;
use super::volume::HOUR_MS;
use crate::events::{EventsError, FileFormat};

/// A column of the events table as the database has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// `information_schema.columns.data_type`.
    pub data_type: String,
}

/// Events of one hour and one event type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// The hour's index (`ms / 3,600,000`); `None` for events without a time (files).
    pub hour: Option<i64>,
    /// The event type as stored; `None` when missing.
    pub event_type: Option<String>,
    /// Events.
    pub rows: u64,
    /// Events without a user id (null or empty).
    pub missing_user: u64,
    /// Events without a product id (null or empty).
    pub missing_product: u64,
    /// Events with an id over the length limit.
    pub long_ids: u64,
    /// Events dated more than the allowed skew after they were ingested (a file's: after the
    /// real now).
    pub future: u64,
}

/// The bucket label of a table's events of unknown types (their names are in
/// [`EventProfile::unknown_types`]).
pub const OTHER_TYPES: &str = "(unknown types)";

/// Events for products not in the catalog, over the check window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnknownProducts {
    /// Such events.
    pub unknown: u64,
    /// Events in the window.
    pub rows: u64,
    /// Distinct such products.
    pub products: u64,
    /// One of them.
    pub example: Option<String>,
}

/// What the event checks judge.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventProfile {
    /// `events`, or the file's path.
    pub target: String,
    /// The time judged at (now, or `--at`), ms.
    pub at_ms: i64,
    /// Start of the history read (volume baseline), ms.
    pub history_from_ms: i64,
    /// The table's columns; `None` for a file.
    pub columns: Option<Vec<Column>>,
    /// Events by hour and type since `history_from_ms` (hours after `at_ms` too: the checks
    /// judge hours up to `at_ms` only).
    pub buckets: Vec<Bucket>,
    /// Events without a time.
    pub missing_time: u64,
    /// The newest event time up to `at_ms` plus the skew, future-dated events aside.
    pub newest_ms: Option<i64>,
    /// `(duplicates, events)` in the check window: events repeating another's user, product,
    /// type and time.
    pub duplicates: Option<(u64, u64)>,
    /// Events for products missing from the catalog, when a catalog was given.
    pub unknown_products: Option<UnknownProducts>,
    /// The unknown event types in the check window and their events, when counted apart
    /// (the table: the buckets then hold them under [`OTHER_TYPES`]).
    pub unknown_types: Option<Vec<(String, u64)>>,
    /// Where the volume history was read from.
    pub history_source: HistorySource,
    /// File lines that are not events.
    pub malformed: u64,
    /// The first such line's problem, with its line number.
    pub malformed_example: Option<String>,
}

impl EventProfile {
    /// A required column the table lacks, if any.
    pub fn missing_required_column(&self) -> Option<&'static str> {
        let columns = self.columns.as_ref()?;
        super::EXPECTED_COLUMNS
            .iter()
            .filter(|(_, _, required)| *required)
            .map(|(name, _, _)| *name)
            .find(|name| !columns.iter().any(|c| c.name == *name))
    }
}

/// Why a profile could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The events could not be read.
    #[error(transparent)]
    Events(#[from] EventsError),
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The catalog could not be used.
    #[error("catalog {name}: {reason}")]
    Catalog {
        /// The table or file.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

impl ProfileError {
    /// Stable label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Events(e) => e.kind(),
            Self::Postgres(_) => "QualityPostgres",
            Self::Catalog { .. } => "QualityCatalog",
        }
    }

    /// Whether a retry can help.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Events(e) => e.retryable(),
            Self::Postgres(e) => !matches!(e, sqlx::Error::Database(_)),
            Self::Catalog { .. } => false,
        }
    }
}

fn ts(ms: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default()
}

/// A table name: `name` or `schema.name`, lower-case identifiers; quoted for SQL.
fn catalog_table(name: &str) -> Result<String, ProfileError> {
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|p| ok(p)) {
        return Err(ProfileError::Catalog {
            name: name.to_owned(),
            reason: "not a table name (lower-case letters, digits and _, optionally schema.table)"
                .into(),
        });
    }
    Ok(parts
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join("."))
}

/// Where the volume history (the hours before the check window) was read from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HistorySource {
    /// Not read (a file, or a table without its required columns).
    #[default]
    None,
    /// The `events_hourly` rollup, checked against the events of the check window.
    Rollup,
    /// The events themselves, because the rollup could not be used (why).
    Scanned(String),
}

type WindowRow = (DateTime<Utc>, Option<String>, i64, i64, i64, i64, i64);

/// Counts per `(hour index, type label)`; the label as [`Bucket::event_type`] has it.
type HourCounts = BTreeMap<(i64, Option<String>), u64>;

/// The rollup's (or the scan's) label of a stored type: `None` when missing.
fn label(stored: String) -> Option<String> {
    (!stored.is_empty()).then_some(stored)
}

/// Profiles the Postgres `events` table at `at_ms`; `catalog` names a table with a
/// `product_id` column.
///
/// The check window (rounded down to its first whole hour) is read event by event, in one
/// grouped pass through the `occurred_at` index (every per-event figure), and its duplicates
/// are counted among the events that share a time. The
/// hours before it only need their counts per event type (the volume baseline); they come from
/// the `events_hourly` rollup that triggers keep (migration 0006), after its hours inside the
/// window have been found equal to the events'. When the rollup is marked invalid or differs,
/// the history is counted from the events and the rollup rebuilt.
pub async fn postgres(
    pool: &PgPool,
    at_ms: i64,
    args: &QualityArgs,
    catalog: Option<&str>,
) -> Result<EventProfile, ProfileError> {
    let history_from_ms = at_ms - args.history_ms();
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = 'events'
         ORDER BY ordinal_position",
    )
    .fetch_all(pool)
    .await?;
    let mut p = EventProfile {
        target: "events".into(),
        at_ms,
        history_from_ms,
        columns: Some(
            columns
                .into_iter()
                .map(|(name, data_type)| Column { name, data_type })
                .collect(),
        ),
        ..Default::default()
    };
    if p.missing_required_column().is_some() {
        return Ok(p);
    }
    // As of `at`: events up to `at` are seen (a later one has not happened yet). An event
    // dated more than the skew after the time it was ingested (or after the real now) is
    // future-dated.
    let seen_until = ts(at_ms);
    let now = Utc::now();
    let has_ingested = p
        .columns
        .as_ref()
        .is_some_and(|c| c.iter().any(|c| c.name == "ingested_at"));
    let ingested = if has_ingested {
        "LEAST(ingested_at, $4)"
    } else {
        "$4"
    };
    let future = format!("occurred_at > {ingested} + $5 * interval '1 millisecond'");
    let known = super::EVENT_TYPES
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    // The same labels as the rollup's `recsys_events_hour_label` (spelled out here, so that a
    // table without migration 0006 can still be profiled).
    let label_sql = format!(
        "CASE WHEN event_type IS NULL OR event_type = '' THEN ''
              WHEN event_type IN ({known}) THEN event_type ELSE '{OTHER_TYPES}' END"
    );
    let window_from_ms = (at_ms - args.check_window.ms).div_euclid(HOUR_MS) * HOUR_MS;
    let history_from = history_from_ms.div_euclid(HOUR_MS) * HOUR_MS;
    let at_hour_ms = at_ms.div_euclid(HOUR_MS) * HOUR_MS;
    // One snapshot for the window, the rollup and the history: a batch committed meanwhile is
    // in all of them or in none (the triggers keep the rollup in the writer's transaction).
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
    sqlx::query("SET LOCAL work_mem = '64MB'")
        .execute(&mut *tx)
        .await?;
    // The window, event by event, in one grouped pass (parallel, through the index). The SQL
    // is built from fixed spellings; every value is bound.
    let rows: Vec<WindowRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT date_bin('1 hour', occurred_at, '2000-01-01 00:00:00+00'),
                {label_sql},
                count(*),
                count(*) FILTER (WHERE user_id IS NULL OR user_id = ''),
                count(*) FILTER (WHERE product_id IS NULL OR product_id = ''),
                count(*) FILTER (WHERE octet_length(event_id) > $3 OR octet_length(user_id) > $3
                                    OR octet_length(product_id) > $3),
                count(*) FILTER (WHERE {future})
         FROM events WHERE occurred_at >= $1 AND occurred_at <= $2
         GROUP BY 1, 2"
    )))
    .bind(ts(window_from_ms))
    .bind(seen_until)
    .bind(i32::try_from(args.max_id_bytes).unwrap_or(i32::MAX))
    .bind(now)
    .bind(args.future_skew.ms as f64)
    .fetch_all(&mut *tx)
    .await?;
    // Duplicates share their time: only the times two events share (found by a streaming
    // group over the index) are grouped by everything a duplicate shares. Grouping every event
    // of the window that way would cost more than the rest of the profile together.
    let duplicates: i64 = sqlx::query_scalar(
        "WITH shared AS MATERIALIZED (
             SELECT occurred_at FROM events WHERE occurred_at >= $1 AND occurred_at <= $2
             GROUP BY occurred_at HAVING count(*) > 1)
         SELECT coalesce(sum(n - 1), 0)::bigint FROM (
             SELECT count(*) AS n FROM events e JOIN shared s ON s.occurred_at = e.occurred_at
             GROUP BY e.occurred_at, e.user_id, e.product_id, e.event_type) d",
    )
    .bind(ts(window_from_ms))
    .bind(seen_until)
    .fetch_one(&mut *tx)
    .await?;
    // Events dated after `at` that are future-dated: normally none, found through the index.
    let later_future: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM events WHERE occurred_at > $1 AND {future}",
        future = future.replace("$4", "$2").replace("$5", "$3")
    )))
    .bind(seen_until)
    .bind(now)
    .bind(args.future_skew.ms as f64)
    .fetch_one(&mut *tx)
    .await?;
    let mut window = HourCounts::new();
    let mut window_rows = 0u64;
    for (hour, stored, n, mu, mp, long, fut) in rows {
        let hour = hour.timestamp_millis().div_euclid(HOUR_MS);
        let event_type = label(stored.unwrap_or_default());
        *window.entry((hour, event_type.clone())).or_default() += n as u64;
        window_rows += n as u64;
        p.buckets.push(Bucket {
            hour: Some(hour),
            event_type,
            rows: n as u64,
            missing_user: mu as u64,
            missing_product: mp as u64,
            long_ids: long as u64,
            future: fut as u64,
        });
    }
    p.duplicates = Some((duplicates.max(0) as u64, window_rows));
    if later_future > 0 {
        p.buckets.push(Bucket {
            future: later_future as u64,
            ..Default::default()
        });
    }
    // The history: the rollup's hours before the window, once its whole hours inside the
    // window match the events.
    let rollup = rollup_counts(&mut tx, history_from, at_hour_ms).await?;
    let (history, source) = match rollup {
        Err(why) => (None, HistorySource::Scanned(why)),
        Ok(counts) => {
            let inside = |h: i64| (window_from_ms / HOUR_MS..at_hour_ms / HOUR_MS).contains(&h);
            let theirs: HourCounts = counts
                .iter()
                .filter(|((h, _), n)| inside(*h) && **n != 0)
                .map(|(k, n)| (k.clone(), *n))
                .collect();
            let ours: HourCounts = window
                .iter()
                .filter(|((h, _), _)| inside(*h))
                .map(|(k, n)| (k.clone(), *n))
                .collect();
            if theirs == ours {
                (Some(counts), HistorySource::Rollup)
            } else {
                let diff = theirs
                    .keys()
                    .chain(ours.keys())
                    .find(|k| theirs.get(*k) != ours.get(*k))
                    .map(|k| {
                        format!(
                            "{} {} events in the hour from {} where the events have {}",
                            theirs.get(k).copied().unwrap_or(0),
                            k.1.as_deref().unwrap_or("untyped"),
                            ts(k.0 * HOUR_MS).to_rfc3339(),
                            ours.get(k).copied().unwrap_or(0)
                        )
                    })
                    .unwrap_or_default();
                (
                    None,
                    HistorySource::Scanned(format!("the rollup differs from the events: {diff}")),
                )
            }
        }
    };
    let history = match history {
        Some(h) => h,
        None => {
            let scanned: Vec<(DateTime<Utc>, String, i64)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT date_bin('1 hour', occurred_at, '2000-01-01 00:00:00+00'),
                            {label_sql}, count(*)
                     FROM events WHERE occurred_at >= $1 AND occurred_at < $2 GROUP BY 1, 2"
                )))
                .bind(ts(history_from))
                .bind(ts(window_from_ms))
                .fetch_all(&mut *tx)
                .await?;
            scanned
                .into_iter()
                .map(|(h, t, n)| {
                    (
                        (h.timestamp_millis().div_euclid(HOUR_MS), label(t)),
                        n as u64,
                    )
                })
                .collect()
        }
    };
    let unknown_in_window = window
        .keys()
        .any(|(_, t)| t.as_deref() == Some(OTHER_TYPES));
    if unknown_in_window {
        // Their names, over the check window only (through the index).
        let unknown: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT event_type, count(*) FROM events
             WHERE occurred_at >= $1 AND occurred_at <= $2 AND event_type <> ''
               AND event_type NOT IN ({known})
             GROUP BY 1 ORDER BY 2 DESC LIMIT 20"
        )))
        .bind(ts(window_from_ms))
        .bind(seen_until)
        .fetch_all(&mut *tx)
        .await?;
        p.unknown_types = Some(unknown.into_iter().map(|(t, n)| (t, n as u64)).collect());
    } else {
        p.unknown_types = Some(vec![]);
    }
    tx.commit().await?;
    for ((hour, event_type), rows) in history {
        if rows > 0 && hour * HOUR_MS < window_from_ms && hour * HOUR_MS >= history_from {
            p.buckets.push(Bucket {
                hour: Some(hour),
                event_type,
                rows,
                ..Default::default()
            });
        }
    }
    if let HistorySource::Scanned(why) = &source {
        tracing::warn!(reason = %why, "volume history counted from the events; rebuilding the events_hourly rollup");
        rebuild_rollup(pool).await;
    }
    p.history_source = source;
    // The newest event up to now plus the clock skew (one index lookup): an event a few
    // seconds after `--at` is on time, not late.
    let newest: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(occurred_at) FROM events WHERE occurred_at <= $1")
            .bind(ts(at_ms + args.future_skew.ms))
            .fetch_one(pool)
            .await?;
    p.newest_ms = newest.map(|t| t.timestamp_millis());
    p.missing_time =
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE occurred_at IS NULL")
            .fetch_one(pool)
            .await? as u64;
    if let Some(name) = catalog {
        let table = catalog_table(name)?;
        let (unknown, products, example): (i64, i64, Option<String>) =
            // The table name is validated and quoted by `catalog_table`; values are bound.
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT count(*), count(DISTINCT e.product_id), min(e.product_id) FROM events e
                 WHERE e.occurred_at >= $1 AND e.occurred_at <= $2
                   AND NOT EXISTS (SELECT 1 FROM {table} c WHERE c.product_id = e.product_id)"
            )))
        .bind(ts(window_from_ms))
        .bind(seen_until)
        .fetch_one(pool)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) => ProfileError::Catalog {
                name: name.to_owned(),
                reason: d.message().to_owned(),
            },
            other => other.into(),
        })?;
        p.unknown_products = Some(UnknownProducts {
            unknown: unknown as u64,
            rows: window_rows,
            products: products as u64,
            example,
        });
    }
    Ok(p)
}

/// The rollup's counts per hour and type label over `[from, to)` (ms), or why it cannot be
/// used.
async fn rollup_counts(
    tx: &mut sqlx::PgConnection,
    from: i64,
    to: i64,
) -> Result<Result<HourCounts, String>, sqlx::Error> {
    // Asked first, not caught: an error would abort the snapshot's transaction.
    let exists: bool = sqlx::query_scalar(
        "SELECT to_regclass('events_hourly') IS NOT NULL
                AND to_regclass('events_hourly_state') IS NOT NULL",
    )
    .fetch_one(&mut *tx)
    .await?;
    let state: Option<(bool, Option<String>)> = if exists {
        sqlx::query_as("SELECT valid, reason FROM events_hourly_state")
            .fetch_optional(&mut *tx)
            .await?
    } else {
        None
    };
    match state {
        None => return Ok(Err("no events_hourly rollup (migration 0006)".into())),
        Some((false, reason)) => {
            return Ok(Err(format!(
                "the rollup was marked invalid: {}",
                reason.unwrap_or_default()
            )));
        }
        Some((true, _)) => {}
    }
    let rows: Vec<(DateTime<Utc>, String, i64)> = sqlx::query_as(
        "SELECT hour, event_type, sum(events)::bigint FROM events_hourly
         WHERE hour >= $1 AND hour < $2 GROUP BY 1, 2",
    )
    .bind(ts(from))
    .bind(ts(to))
    .fetch_all(&mut *tx)
    .await?;
    Ok(Ok(rows
        .into_iter()
        .map(|(h, t, n)| {
            (
                (h.timestamp_millis().div_euclid(HOUR_MS), label(t)),
                n.max(0) as u64,
            )
        })
        .collect()))
}

/// Rebuilds the rollup (holding writers off for one pass), waiting at most 5 s for the lock; a
/// failure is logged, and the next run scans again.
async fn rebuild_rollup(pool: &PgPool) {
    let run = async {
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '5s'")
            .execute(&mut *tx)
            .await?;
        let hours: i64 = sqlx::query_scalar("SELECT recsys_events_hourly_rebuild()")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(hours)
    };
    match run.await {
        Ok(rows) => tracing::info!(rows, "events_hourly rollup rebuilt"),
        Err(e) => {
            tracing::warn!(error = %e, "events_hourly rollup not rebuilt; the next run counts the history from the events again")
        }
    }
}

/// Reads a catalog file: one product id a line, or JSON lines with a `product_id` (or `id`).
pub fn read_catalog_file(path: &Path) -> Result<HashSet<String>, ProfileError> {
    let err = |reason: String| ProfileError::Catalog {
        name: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut out = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if t.starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(t).map_err(|e| err(format!("line {}: {e}", n + 1)))?;
            let id = v
                .get("product_id")
                .or_else(|| v.get("id"))
                .and_then(|x| match x {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .ok_or_else(|| err(format!("line {}: no product_id", n + 1)))?;
            out.insert(id);
        } else {
            out.insert(t.to_owned());
        }
    }
    Ok(out)
}

/// One event as read leniently from a file.
#[derive(Default)]
struct RawEvent {
    id: Option<String>,
    user: Option<String>,
    product: Option<String>,
    kind: Option<String>,
    ts_ms: Option<i64>,
}

fn text_field(v: &serde_json::Value, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| v.get(*k)).and_then(|x| match x {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

fn raw_json(line: &str) -> Result<RawEvent, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_object() {
        return Err("not an event object".into());
    }
    let ts_ms = match v.get("timestamp").or_else(|| v.get("ts")) {
        Some(serde_json::Value::Number(n)) => n.as_i64(),
        Some(serde_json::Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.timestamp_millis()),
        _ => None,
    };
    Ok(RawEvent {
        id: text_field(&v, &["event_id", "id"]),
        user: text_field(&v, &["user_id", "user"]),
        product: text_field(&v, &["product_id", "item", "item_id"]),
        kind: v
            .get("event_type")
            .or_else(|| v.get("type"))
            .and_then(|x| x.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        ts_ms,
    })
}

/// Profiles an events file at `at_ms`, or at its newest event when `None` (a snapshot).
/// JSON lines are read leniently (the checks count what
/// is wrong); other formats through their strict readers, a parse error counting as the file's
/// schema failure.
pub fn file(
    path: &Path,
    format: FileFormat,
    at_ms: Option<i64>,
    args: &QualityArgs,
    catalog: Option<&HashSet<String>>,
) -> Result<EventProfile, ProfileError> {
    let mut p = EventProfile {
        target: path.display().to_string(),
        ..Default::default()
    };
    let jsonl = match format {
        FileFormat::Jsonl => true,
        FileFormat::Auto => {
            let first = std::fs::File::open(path)
                .map(std::io::BufReader::new)
                .and_then(|mut r| {
                    let mut s = String::new();
                    r.read_line(&mut s).map(|_| s)
                })
                .map_err(|source| EventsError::Io {
                    path: path.to_owned(),
                    source,
                })?;
            let t = first.trim_start();
            t.starts_with('{') && !(t.contains("\"session\"") && t.contains("\"events\""))
        }
        _ => false,
    };
    let mut raws = vec![];
    if jsonl {
        let f = std::fs::File::open(path).map_err(|source| EventsError::Io {
            path: path.to_owned(),
            source,
        })?;
        for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|source| EventsError::Io {
                path: path.to_owned(),
                source,
            })?;
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            match raw_json(t) {
                Ok(r) => raws.push(r),
                Err(e) => {
                    p.malformed += 1;
                    p.malformed_example
                        .get_or_insert_with(|| format!("line {}: {e}", n + 1));
                }
            }
        }
    } else {
        match crate::events::read_file(path, format) {
            Ok(events) => raws.extend(events.into_iter().map(|e| RawEvent {
                id: None,
                user: Some(e.user),
                product: Some(e.item),
                kind: Some(e.kind.as_str().to_owned()),
                ts_ms: e.ts_ms,
            })),
            Err(EventsError::Parse { line, message, .. }) => {
                p.malformed = 1;
                p.malformed_example = Some(format!("line {line}: {message}"));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let at_ms = at_ms
        .or_else(|| raws.iter().filter_map(|r| r.ts_ms).max())
        .unwrap_or_else(|| Utc::now().timestamp_millis());
    p.at_ms = at_ms;
    p.history_from_ms = at_ms - args.history_ms();
    let seen_until = at_ms;
    // Files carry no ingestion time: an event after the real now (plus the skew) is
    // future-dated.
    let future_from = Utc::now().timestamp_millis() + args.future_skew.ms;
    let window_from = at_ms - args.check_window.ms;
    let mut buckets: BTreeMap<(Option<i64>, Option<String>), Bucket> = BTreeMap::new();
    let mut seen: HashMap<(String, String, String, i64), u64> = HashMap::new();
    let mut window_rows = 0u64;
    let mut unknown = UnknownProducts::default();
    let mut unknown_set = HashSet::new();
    let long = |s: &Option<String>| s.as_ref().is_some_and(|x| x.len() > args.max_id_bytes);
    for r in &raws {
        let Some(t) = r.ts_ms else {
            p.missing_time += 1;
            continue;
        };
        if t <= seen_until && t <= future_from {
            p.newest_ms = p.newest_ms.max(Some(t));
        }
        if t < p.history_from_ms || (t > seen_until && t <= future_from) {
            continue;
        }
        let b = buckets
            .entry((Some(t.div_euclid(HOUR_MS)), r.kind.clone()))
            .or_default();
        b.rows += 1;
        b.missing_user += u64::from(r.user.is_none());
        b.missing_product += u64::from(r.product.is_none());
        b.long_ids += u64::from(long(&r.id) || long(&r.user) || long(&r.product));
        b.future += u64::from(t > future_from);
        if (window_from..=at_ms).contains(&t) {
            window_rows += 1;
            if let (Some(u), Some(i), Some(k)) = (&r.user, &r.product, &r.kind) {
                *seen
                    .entry((u.clone(), i.clone(), k.clone(), t))
                    .or_default() += 1;
            }
            if let (Some(c), Some(i)) = (catalog, &r.product)
                && !c.contains(i)
            {
                unknown.unknown += 1;
                if unknown_set.insert(i.clone()) {
                    unknown.example.get_or_insert_with(|| i.clone());
                }
            }
        }
    }
    p.buckets = buckets
        .into_iter()
        .map(|((hour, event_type), b)| Bucket {
            hour,
            event_type,
            ..b
        })
        .collect();
    p.duplicates = Some((seen.values().map(|n| n - 1).sum(), window_rows));
    if catalog.is_some() {
        unknown.rows = window_rows;
        unknown.products = unknown_set.len() as u64;
        p.unknown_products = Some(unknown);
    }
    Ok(p)
}
