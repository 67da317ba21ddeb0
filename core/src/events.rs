//! The events seam: interaction events from files (embedded default) or from the Postgres
//! `events` table (production).
//!
//! File formats, chosen by [`FileFormat`] (or sniffed from the extension and first line):
//! - **TSV / CSV** `user item weight`, optionally a fourth column with a Unix time in
//!   milliseconds, optionally a header line; the weight replaces the event-type weight;
//! - **JSON lines**, one event an object: `{"user_id", "product_id", "event_type", "timestamp"
//!   (ms since the epoch or RFC 3339), "value"?}`;
//! - **OTTO sessions**, one session a line: `{"session": N, "events": [{"aid", "ts", "type"}]}`
//!   with types `clicks`, `carts`, `orders` (the OTTO Recommender Systems Dataset).
//!
//! Every error names the file, the line and what is wrong with it.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::PgPool;

use crate::cf::interactions::{Event, EventType};

/// Why events could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line does not parse.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The format could not be recognised.
    #[error(
        "{path}: cannot tell the format ({reason}); pass it explicitly (tsv, csv, jsonl, otto)"
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// Why sniffing failed.
        reason: String,
    },
    /// Postgres failed.
    #[error("postgres events table: {0}")]
    Postgres(#[from] sqlx::Error),
    /// A migration failed.
    #[error("postgres migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Postgres refused the data itself (a data exception or a constraint, SQLSTATE classes 22
    /// and 23): sending it again cannot succeed.
    #[error("postgres refused the events: {message}")]
    Rejected {
        /// Postgres's message, with its SQLSTATE.
        message: String,
    },
    /// An event id is already stored for a different event.
    #[error(
        "event id {event_id:?} is already stored for a different event; event ids must be unique"
    )]
    ConflictingEventId {
        /// The id.
        event_id: String,
    },
}

impl EventsError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "EventsIo",
            Self::Parse { .. } => "EventsParse",
            Self::UnknownFormat { .. } => "EventsFormat",
            Self::Postgres(_) => "EventsPostgres",
            Self::Migrate(_) => "EventsMigrate",
            Self::ConflictingEventId { .. } => "ConflictingEventId",
            Self::Rejected { .. } => "EventsRejected",
        }
    }

    /// Whether retrying can help: a server or disk hiccup can pass, bad data does not.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Io { .. } | Self::Postgres(_))
    }
}

/// A format of event files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FileFormat {
    /// Decide from the extension and the first line.
    Auto,
    /// Tab- or whitespace-separated `user item weight [ts_ms]`.
    Tsv,
    /// Comma-separated `user,item,weight[,ts_ms]`.
    Csv,
    /// One JSON event a line.
    Jsonl,
    /// OTTO sessions, one JSON session a line.
    Otto,
}

/// Reads every event of a file.
pub fn read_file(path: &Path, format: FileFormat) -> Result<Vec<Event>, EventsError> {
    Ok(read_file_with_categories(path, format)?
        .into_iter()
        .map(|(e, _)| e)
        .collect())
}

/// Reads every event of a file with its product category, when the format carries one
/// (JSON lines' `category`).
pub fn read_file_with_categories(
    path: &Path,
    format: FileFormat,
) -> Result<Vec<(Event, Option<String>)>, EventsError> {
    let io = |source| EventsError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let reader = std::io::BufReader::new(file);
    let mut lines = reader.lines().enumerate().peekable();
    let format = match format {
        FileFormat::Auto => {
            let first = match lines.peek() {
                Some((_, Ok(l))) => l.clone(),
                _ => String::new(),
            };
            sniff(path, &first)?
        }
        FileFormat::Tsv => Layout::Delimited { csv: false },
        FileFormat::Csv => Layout::Delimited { csv: true },
        FileFormat::Jsonl => Layout::Jsonl,
        FileFormat::Otto => Layout::Otto,
    };
    let mut events = vec![];
    let mut seen_ids: std::collections::HashMap<String, (usize, Event)> =
        std::collections::HashMap::new();
    for (n, line) in lines {
        let line = line.map_err(io)?;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let parse = |message: String| EventsError::Parse {
            path: path.to_owned(),
            line: n + 1,
            message,
        };
        match format {
            Layout::Delimited { csv } => {
                if let Some(e) = parse_delimited(trimmed, csv, n == 0).map_err(parse)? {
                    events.push((e, None));
                }
            }
            Layout::Jsonl => {
                let (event, id, category) = parse_json_event(trimmed).map_err(parse)?;
                if let Some(id) = id {
                    match seen_ids.get(&id) {
                        Some((first_line, first)) if first != &event => {
                            return Err(parse(format!(
                                "event id {id:?} was already used on line {first_line} for a different event ({} of {} by {}); ids must be unique",
                                first.kind, first.item, first.user
                            )));
                        }
                        // The same event twice: ingestion is idempotent, keep one.
                        Some(_) => continue,
                        None => {
                            seen_ids.insert(id, (n + 1, event.clone()));
                        }
                    }
                }
                events.push((event, category));
            }
            Layout::Otto => events.extend(
                parse_otto_session(trimmed)
                    .map_err(parse)?
                    .into_iter()
                    .map(|e| (e, None)),
            ),
        }
    }
    Ok(events)
}

/// A format once decided.
#[derive(Clone, Copy)]
enum Layout {
    Delimited { csv: bool },
    Jsonl,
    Otto,
}

fn sniff(path: &Path, first: &str) -> Result<Layout, EventsError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    match ext {
        "tsv" | "txt" | "dat" | "data" => return Ok(Layout::Delimited { csv: false }),
        "csv" => return Ok(Layout::Delimited { csv: true }),
        _ => {}
    }
    let t = first.trim_start();
    if t.starts_with('{') {
        return Ok(if t.contains("\"session\"") && t.contains("\"events\"") {
            Layout::Otto
        } else {
            Layout::Jsonl
        });
    }
    if t.contains('\t') {
        return Ok(Layout::Delimited { csv: false });
    }
    if t.contains(',') {
        return Ok(Layout::Delimited { csv: true });
    }
    Err(EventsError::UnknownFormat {
        path: path.to_owned(),
        reason: format!(
            "extension {ext:?} and first line {:?}",
            t.chars().take(40).collect::<String>()
        ),
    })
}

fn parse_delimited(line: &str, csv: bool, first_line: bool) -> Result<Option<Event>, String> {
    let fields: Vec<&str> = if csv {
        line.split(',').map(str::trim).collect()
    } else {
        line.split_whitespace().collect()
    };
    if fields.len() < 3 {
        return Err(format!(
            "expected `user item weight [ts_ms]`, found {} field(s)",
            fields.len()
        ));
    }
    let weight = match fields[2].parse::<f32>() {
        Ok(w) => w,
        // A header line (`user item weight`) is allowed once, at the top.
        Err(_) if first_line => return Ok(None),
        Err(e) => return Err(format!("weight {:?} is not a number: {e}", fields[2])),
    };
    if !weight.is_finite() {
        return Err(format!("weight {:?} is not finite", fields[2]));
    }
    let ts_ms = match fields.get(3) {
        Some(t) => Some(
            t.parse::<i64>()
                .map_err(|e| format!("timestamp {t:?} is not milliseconds: {e}"))?,
        ),
        None => None,
    };
    Ok(Some(Event {
        user: fields[0].to_owned(),
        item: fields[1].to_owned(),
        kind: EventType::Click,
        ts_ms,
        value: Some(weight),
    }))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Timestamp {
    Millis(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvent {
    #[serde(alias = "user")]
    user_id: serde_json::Value,
    #[serde(alias = "item", alias = "item_id")]
    product_id: serde_json::Value,
    #[serde(alias = "type")]
    event_type: String,
    #[serde(alias = "ts")]
    timestamp: Option<Timestamp>,
    value: Option<f32>,
    #[serde(default, alias = "event_id")]
    id: Option<serde_json::Value>,
    #[serde(default)]
    category: Option<String>,
}

fn id_text(v: &serde_json::Value, what: &str) -> Result<String, String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Ok(s.clone()),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(format!(
            "{what} must be a non-empty string or a number, found {other}"
        )),
    }
}

/// Parses one event object as the JSON-lines format (and the scorer's `POST /v1/events`)
/// writes it: `user_id`, `product_id`, `event_type`, `timestamp` (ms or RFC 3339),
/// optional `value`, `event_id` and `category`; unknown fields are refused. Returns the event,
/// its id and its category, or what is wrong.
pub fn parse_json_event(line: &str) -> Result<(Event, Option<String>, Option<String>), String> {
    let e: JsonEvent =
        serde_json::from_str(line).map_err(|e| format!("not an event object: {e}"))?;
    let kind: EventType = e
        .event_type
        .parse()
        .map_err(|err: crate::cf::interactions::DataError| err.to_string())?;
    let ts_ms = match e.timestamp {
        None => None,
        Some(Timestamp::Millis(ms)) => Some(ms),
        Some(Timestamp::Text(t)) => Some(
            DateTime::parse_from_rfc3339(&t)
                .map_err(|err| format!("timestamp {t:?} is not RFC 3339: {err}"))?
                .timestamp_millis(),
        ),
    };
    if kind == EventType::Rating && e.value.is_none() {
        return Err("a rating needs a value".into());
    }
    let id = e.id.as_ref().map(|v| id_text(v, "event_id")).transpose()?;
    Ok((
        Event {
            user: id_text(&e.user_id, "user_id")?,
            item: id_text(&e.product_id, "product_id")?,
            kind,
            ts_ms,
            value: e.value,
        },
        id,
        e.category,
    ))
}

#[derive(Deserialize)]
struct OttoSession {
    session: u64,
    events: Vec<OttoEvent>,
}

#[derive(Deserialize)]
struct OttoEvent {
    aid: u64,
    ts: i64,
    #[serde(rename = "type")]
    kind: String,
}

fn parse_otto_session(line: &str) -> Result<Vec<Event>, String> {
    let s: OttoSession =
        serde_json::from_str(line).map_err(|e| format!("not an OTTO session: {e}"))?;
    s.events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let kind = e
                .kind
                .parse()
                .map_err(|err: crate::cf::interactions::DataError| format!("event {i}: {err}"))?;
            Ok(Event {
                user: s.session.to_string(),
                item: e.aid.to_string(),
                kind,
                ts_ms: Some(e.ts),
                value: None,
            })
        })
        .collect()
}

/// The embedded migrations of the events table.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Brings the schema up to date (idempotent).
pub async fn migrate(pool: &PgPool) -> Result<(), EventsError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// A Postgres error, as [`EventsError::Rejected`] when it is the data's fault (SQLSTATE class 22,
/// data exception, or 23, integrity constraint): a retry of the same events cannot succeed.
fn refused(e: sqlx::Error) -> EventsError {
    if let sqlx::Error::Database(d) = &e
        && let Some(code) = d.code()
        && (code.starts_with("22") || code.starts_with("23"))
    {
        return EventsError::Rejected {
            message: format!("{} (SQLSTATE {code})", d.message()),
        };
    }
    e.into()
}

/// A row of the `events` table.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    /// Unique id of the event, for idempotent ingestion.
    pub event_id: String,
    /// The event.
    pub event: Event,
    /// Product category, when known.
    pub category: Option<String>,
}

/// `(user_id, product_id, event_type, occurred_at, value, category)` as read.
type ReadRow = (
    String,
    String,
    String,
    DateTime<Utc>,
    Option<f32>,
    Option<String>,
);

/// `(event_id, user_id, product_id, event_type, occurred_at, value)` as read back.
type StoredRow = (String, String, String, String, DateTime<Utc>, Option<f32>);

/// The production events seam: the Postgres `events` table.
#[derive(Clone, Debug)]
pub struct PostgresEvents {
    pool: PgPool,
}

impl PostgresEvents {
    /// Wraps a pool whose schema is migrated ([`migrate`]).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool, for queries over the whole table (the data-quality profile).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Inserts events in one statement; an event id already stored is skipped (idempotent
    /// re-ingestion). Returns how many rows were new.
    pub async fn insert(&self, rows: &[EventRow]) -> Result<u64, EventsError> {
        let mut ids = Vec::with_capacity(rows.len());
        let mut users = Vec::with_capacity(rows.len());
        let mut items = Vec::with_capacity(rows.len());
        let mut kinds = Vec::with_capacity(rows.len());
        let mut times = Vec::with_capacity(rows.len());
        let mut values: Vec<Option<f32>> = Vec::with_capacity(rows.len());
        let mut categories: Vec<Option<String>> = Vec::with_capacity(rows.len());
        for r in rows {
            ids.push(r.event_id.clone());
            users.push(r.event.user.clone());
            items.push(r.event.item.clone());
            kinds.push(r.event.kind.as_str().to_owned());
            times.push(
                DateTime::<Utc>::from_timestamp_millis(r.event.ts_ms.unwrap_or(0))
                    .unwrap_or_default(),
            );
            values.push(r.event.value);
            categories.push(r.category.clone());
        }
        let mut tx = self.pool.begin().await?;
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO events (event_id, user_id, product_id, event_type, occurred_at, value, category)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::real[], $7::text[])
             ON CONFLICT (event_id) DO NOTHING
             RETURNING event_id",
        )
        .bind(&ids)
        .bind(&users)
        .bind(&items)
        .bind(&kinds)
        .bind(&times)
        .bind(&values)
        .bind(&categories)
        .fetch_all(&mut *tx)
        .await
        .map_err(refused)?;
        // Ids that were already stored must describe the same event; anything else is a
        // collision that would silently drop data, so the whole batch is refused.
        if inserted.len() < rows.len() {
            let new: std::collections::HashSet<&str> =
                inserted.iter().map(String::as_str).collect();
            let old_ids: Vec<String> = ids
                .iter()
                .filter(|id| !new.contains(id.as_str()))
                .cloned()
                .collect();
            let stored: Vec<StoredRow> = sqlx::query_as(
                "SELECT event_id, user_id, product_id, event_type, occurred_at, value FROM events WHERE event_id = ANY($1)",
            )
            .bind(&old_ids)
            .fetch_all(&mut *tx)
            .await?;
            let by_id: std::collections::HashMap<&str, usize> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| (id.as_str(), i))
                .collect();
            for (id, user, item, kind, at, value) in stored {
                let Some(&i) = by_id.get(id.as_str()) else {
                    continue;
                };
                if users[i] != user
                    || items[i] != item
                    || kinds[i] != kind
                    || times[i] != at
                    || values[i] != value
                {
                    return Err(EventsError::ConflictingEventId { event_id: id });
                }
            }
        }
        tx.commit().await?;
        Ok(inserted.len() as u64)
    }

    /// Events that happened in `[from, to)`, oldest first.
    pub async fn read(
        &self,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<Event>, EventsError> {
        Ok(self
            .read_with_categories(from, to)
            .await?
            .into_iter()
            .map(|(e, _)| e)
            .collect())
    }

    /// A user's `limit` most recent events, newest first (ties by event id, descending): one
    /// query on the `(user_id, occurred_at)` index, for the scorer's per-user history.
    pub async fn recent_by_user(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<Event>, EventsError> {
        if limit == 0 {
            return Ok(vec![]);
        }
        let rows: Vec<(String, String, DateTime<Utc>, Option<f32>)> = sqlx::query_as(
            "SELECT product_id, event_type, occurred_at, value FROM events
             WHERE user_id = $1 ORDER BY occurred_at DESC, event_id DESC LIMIT $2",
        )
        .bind(user_id)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(item, kind, at, value)| Event {
                user: user_id.to_owned(),
                item,
                // The table's CHECK constraint admits only known types.
                kind: kind.parse().unwrap_or(EventType::View),
                ts_ms: Some(at.timestamp_millis()),
                value,
            })
            .collect())
    }

    /// Each product's first event at or before `at`, sorted by product id: the input of
    /// `freshness_score`, aggregated in the database instead of read event by event.
    pub async fn first_seen(
        &self,
        at: DateTime<Utc>,
    ) -> Result<Vec<crate::features::compute::ProductTimes>, EventsError> {
        let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT product_id, min(occurred_at) FROM events WHERE occurred_at <= $1
             GROUP BY product_id ORDER BY product_id COLLATE \"C\"",
        )
        .bind(at)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(product, first)| crate::features::compute::ProductTimes {
                product,
                first_seen_ms: first.timestamp_millis(),
                last_updated_ms: None,
            })
            .collect())
    }

    /// Events that happened in `[from, to)` with their product categories, oldest first.
    pub async fn read_with_categories(
        &self,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<(Event, Option<String>)>, EventsError> {
        use futures::TryStreamExt;
        let mut stream = sqlx::query_as::<_, ReadRow>(
            "SELECT user_id, product_id, event_type, occurred_at, value, category FROM events
             WHERE ($1::timestamptz IS NULL OR occurred_at >= $1)
               AND ($2::timestamptz IS NULL OR occurred_at < $2)
             ORDER BY occurred_at, event_id",
        )
        .bind(from)
        .bind(to)
        .fetch(&self.pool);
        let mut out = vec![];
        while let Some((user, item, kind, at, value, category)) = stream.try_next().await? {
            // The table's CHECK constraint admits only known types.
            let kind = kind.parse().unwrap_or(EventType::View);
            let event = Event {
                user,
                item,
                kind,
                ts_ms: Some(at.timestamp_millis()),
                value,
            };
            out.push((event, category));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(name: &str, body: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(body.as_bytes()))
            .expect("write");
        (dir, path)
    }

    #[test]
    fn weight_files_with_and_without_header() {
        let (_d, p) = file(
            "x.tsv",
            "user\titem\tweight\nu1\ti1\t3\nu1 i2 0.5 1700000000000\n",
        );
        let ev = read_file(&p, FileFormat::Auto).expect("read");
        assert_eq!(ev.len(), 2);
        assert_eq!(
            (ev[0].user.as_str(), ev[0].item.as_str(), ev[0].value),
            ("u1", "i1", Some(3.0))
        );
        assert_eq!(ev[1].ts_ms, Some(1_700_000_000_000));
        let (_d, p) = file("x.csv", "u1,i1,2\n");
        assert_eq!(
            read_file(&p, FileFormat::Auto).expect("csv")[0].value,
            Some(2.0)
        );
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let (_d, p) = file("x.tsv", "u1\ti1\t3\nu2\ti2\tmany\n");
        let e = read_file(&p, FileFormat::Auto)
            .expect_err("bad weight")
            .to_string();
        assert!(e.contains("x.tsv:2:") && e.contains("\"many\""), "{e}");
        let (_d, p) = file(
            "e.jsonl",
            "{\"user_id\":\"u\",\"product_id\":\"p\",\"event_type\":\"wishlist\"}\n",
        );
        let e = read_file(&p, FileFormat::Auto)
            .expect_err("type")
            .to_string();
        assert!(e.contains("e.jsonl:1:") && e.contains("wishlist"), "{e}");
        let e = read_file(Path::new("/nonexistent/events.tsv"), FileFormat::Auto).expect_err("io");
        assert!(e.retryable() && e.to_string().contains("/nonexistent/events.tsv"));
    }

    #[test]
    fn an_event_id_names_one_event() {
        let same = "{\"event_id\":\"e1\",\"user_id\":\"u\",\"product_id\":\"p\",\"event_type\":\"view\",\"timestamp\":1}\n";
        let (_d, p) = file("e.jsonl", &format!("{same}{same}"));
        assert_eq!(
            read_file(&p, FileFormat::Auto)
                .expect("duplicate of the same event")
                .len(),
            1
        );
        let other = "{\"event_id\":\"e1\",\"user_id\":\"u\",\"product_id\":\"p\",\"event_type\":\"purchase\",\"timestamp\":1}\n";
        let (_d, p) = file("e.jsonl", &format!("{same}{other}"));
        let e = read_file(&p, FileFormat::Auto)
            .expect_err("conflict")
            .to_string();
        assert!(e.contains("e.jsonl:2:") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn json_lines_accept_numbers_and_rfc3339() {
        let (_d, p) = file(
            "e.jsonl",
            concat!(
                "{\"user_id\":7,\"product_id\":\"p1\",\"event_type\":\"purchase\",\"timestamp\":1700000000000}\n",
                "{\"user_id\":\"u\",\"product_id\":9,\"event_type\":\"add_to_cart\",\"timestamp\":\"2026-11-26T08:00:00Z\",\"category\":\"shoes\"}\n",
            ),
        );
        let ev = read_file(&p, FileFormat::Auto).expect("read");
        assert_eq!(
            (ev[0].user.as_str(), ev[0].kind),
            ("7", EventType::Purchase)
        );
        assert_eq!(ev[1].ts_ms, Some(1_795_680_000_000));
        let with = read_file_with_categories(&p, FileFormat::Auto).expect("categories");
        assert_eq!(
            (with[0].1.as_deref(), with[1].1.as_deref()),
            (None, Some("shoes"))
        );
    }

    #[test]
    fn the_otto_sample_reads_with_real_semantics() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/otto-sample/train.jsonl");
        let ev = read_file(&path, FileFormat::Auto).expect("otto sample");
        assert_eq!(ev.len(), 862);
        let count = |k| ev.iter().filter(|e| e.kind == k).count();
        assert_eq!(
            (
                count(EventType::Click),
                count(EventType::AddToCart),
                count(EventType::Purchase)
            ),
            (800, 52, 10)
        );
        let sessions: std::collections::HashSet<&str> =
            ev.iter().map(|e| e.user.as_str()).collect();
        assert_eq!(sessions.len(), 20);
    }
}
