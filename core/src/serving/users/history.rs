//! The implementations of [`UserHistory`]: the Postgres `events` table (production) and an
//! in-process history loaded from an events file (local mode).

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};

use async_trait::async_trait;

use crate::cf::interactions::{Event, EventType};
use crate::events::{EventRow, EventsError, FileFormat, PostgresEvents};

use super::{Interaction, UserHistory, UserStateError, validate_user_id};

/// Default number of interactions [`InProcessUserHistory`] keeps per user.
pub const DEFAULT_PER_USER: usize = 500;

/// Checks events before they are recorded: an event id, a valid user id, a product id, a
/// time (history is ordered by it), a finite value, a value for a rating, ids and category
/// within [`crate::quality::MAX_ID_BYTES`] without NUL characters, and no event id given twice
/// in the batch with different content (the same event twice is one event). The error names
/// the event's position, its id and the field, and is the same whichever store records the
/// batch.
pub fn validate_events(events: &[EventRow]) -> Result<(), UserStateError> {
    let mut first: HashMap<&str, usize> = HashMap::with_capacity(events.len());
    for (index, row) in events.iter().enumerate() {
        let bad = |reason: String| UserStateError::InvalidEvent {
            index,
            event_id: row.event_id.chars().take(64).collect(),
            reason,
        };
        let e = &row.event;
        if row.event_id.is_empty() {
            return Err(bad("event_id: empty".into()));
        }
        if let Err(err) = validate_user_id(&e.user) {
            return Err(bad(format!("user_id: {err}")));
        }
        if e.item.is_empty() {
            return Err(bad("product_id: empty".into()));
        }
        let limit = crate::quality::MAX_ID_BYTES;
        for (field, text) in [
            ("event_id", Some(row.event_id.as_str())),
            ("product_id", Some(e.item.as_str())),
            ("category", row.category.as_deref()),
        ] {
            let Some(text) = text else { continue };
            if text.len() > limit {
                return Err(bad(format!(
                    "{field}: {} bytes, at most {limit}",
                    text.len()
                )));
            }
            if text.contains('\0') {
                return Err(bad(format!("{field}: contains a NUL character")));
            }
        }
        match e.ts_ms {
            None => {
                return Err(bad(
                    "timestamp: missing; a user's history is ordered by time".into(),
                ));
            }
            Some(ms) if chrono::DateTime::from_timestamp_millis(ms).is_none() => {
                return Err(bad(format!("timestamp: {ms} ms is out of range")));
            }
            Some(_) => {}
        }
        if e.value.is_some_and(|v| !v.is_finite()) {
            return Err(bad("value: not finite".into()));
        }
        if e.kind == EventType::Rating && e.value.is_none() {
            return Err(bad("value: a rating needs one".into()));
        }
        if let Some(&j) = first.get(row.event_id.as_str()) {
            let other = &events[j];
            if other.event != row.event || other.category != row.category {
                return Err(bad(format!(
                    "event_id: also the id of event {j}, a different event; an id names one event"
                )));
            }
        } else {
            first.insert(&row.event_id, index);
        }
    }
    Ok(())
}

fn interaction(e: Event) -> Interaction {
    Interaction {
        product_id: e.item,
        kind: e.kind,
        at_ms: e.ts_ms,
        value: e.value,
    }
}

// ---------------------------------------------------------------------------------------------
// Postgres

/// The production history: the `events` table, one indexed query per read
/// (`WHERE user_id = $1 ORDER BY occurred_at DESC LIMIT $2`, on `(user_id, occurred_at)`).
#[derive(Clone, Debug)]
pub struct PostgresUserHistory {
    events: PostgresEvents,
}

impl PostgresUserHistory {
    /// A history over the events table (schema migrated with [`crate::events::migrate`]).
    pub fn new(events: PostgresEvents) -> Self {
        Self { events }
    }
}

#[async_trait]
impl UserHistory for PostgresUserHistory {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn history(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<Interaction>, UserStateError> {
        validate_user_id(user_id)?;
        Ok(self
            .events
            .recent_by_user(user_id, limit)
            .await?
            .into_iter()
            .map(interaction)
            .collect())
    }

    async fn record(&self, events: &[EventRow]) -> Result<u64, UserStateError> {
        validate_events(events)?;
        if events.is_empty() {
            return Ok(0);
        }
        Ok(self.events.insert(events).await?)
    }
}

// ---------------------------------------------------------------------------------------------
// In process

#[derive(Clone, Debug, PartialEq)]
struct Entry {
    product_id: String,
    kind: EventType,
    at_ms: Option<i64>,
    value: Option<f32>,
    event_id: Option<String>,
    /// Arrival order, breaking ties of time (and ordering events without one).
    seq: u64,
}

impl Entry {
    fn order(&self) -> (i64, u64) {
        (self.at_ms.unwrap_or(i64::MIN), self.seq)
    }

    fn same_event(&self, e: &Event) -> bool {
        self.product_id == e.item
            && self.kind == e.kind
            && self.at_ms == e.ts_ms
            && self.value == e.value
    }
}

#[derive(Debug, Default)]
struct State {
    /// Per user, oldest first, at most `per_user`.
    users: HashMap<String, VecDeque<Entry>>,
    seq: u64,
}

impl State {
    fn insert(&mut self, per_user: usize, user: &str, mut entry: Entry) {
        self.seq += 1;
        entry.seq = self.seq;
        let list = match self.users.get_mut(user) {
            Some(list) => list,
            None => self.users.entry(user.to_owned()).or_default(),
        };
        let key = entry.order();
        let at = list.partition_point(|e| e.order() <= key);
        list.insert(at, entry);
        while list.len() > per_user {
            list.pop_front();
        }
    }
}

/// The history of local mode: per user, the `per_user` most recent interactions in memory,
/// loaded from an events file and, when [`Self::append_to`] names a file, appended to it as
/// JSON lines so that a restart reads them back.
///
/// Idempotent by event id within what it keeps: an id recorded again for the same event is
/// skipped, for a different event the batch is refused. (Ids are not kept across restarts:
/// the file reader drops them, keeping one of each repeated event.)
#[derive(Debug)]
pub struct InProcessUserHistory {
    per_user: usize,
    state: RwLock<State>,
    append: Option<Mutex<(PathBuf, std::fs::File)>>,
}

impl InProcessUserHistory {
    /// An empty history keeping `per_user` interactions per user (at least 1).
    pub fn new(per_user: usize) -> Self {
        Self {
            per_user: per_user.max(1),
            state: RwLock::new(State::default()),
            append: None,
        }
    }

    /// A history of `events` (file events, without ids).
    pub fn from_events(events: impl IntoIterator<Item = Event>, per_user: usize) -> Self {
        let me = Self::new(per_user);
        {
            let mut state = me.state.write().unwrap_or_else(PoisonError::into_inner);
            for e in events {
                let entry = Entry {
                    product_id: e.item,
                    kind: e.kind,
                    at_ms: e.ts_ms,
                    value: e.value,
                    event_id: None,
                    seq: 0,
                };
                state.insert(me.per_user, &e.user, entry);
            }
        }
        me
    }

    /// A history of the events of a file (any format [`crate::events::read_file`] reads).
    pub fn from_file(
        path: &Path,
        format: FileFormat,
        per_user: usize,
    ) -> Result<Self, UserStateError> {
        let events = crate::events::read_file(path, format)?;
        Ok(Self::from_events(events, per_user))
    }

    /// Appends recorded events to `path` as JSON lines (created if missing). Refuses a file
    /// that holds another format, which the appended lines would make unreadable.
    pub fn append_to(mut self, path: &Path) -> Result<Self, UserStateError> {
        let io = |source| {
            UserStateError::History(EventsError::Io {
                path: path.to_owned(),
                source,
            })
        };
        if let Ok(file) = std::fs::File::open(path) {
            let first = std::io::BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
            if let Some(line) = first {
                let t = line.trim_start();
                if !t.starts_with('{') || (t.contains("\"session\"") && t.contains("\"events\"")) {
                    return Err(UserStateError::InvalidArgument(format!(
                        "{}: recorded events are appended as JSON lines, but the file holds \
                         another format (first line {:?}); name a .jsonl file",
                        path.display(),
                        t.chars().take(40).collect::<String>()
                    )));
                }
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        self.append = Some(Mutex::new((path.to_owned(), file)));
        Ok(self)
    }

    /// Users with at least one interaction.
    pub fn users(&self) -> usize {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .users
            .len()
    }

    fn append(&self, rows: &[&EventRow]) -> Result<(), UserStateError> {
        let Some(append) = &self.append else {
            return Ok(());
        };
        let mut guard = append.lock().unwrap_or_else(PoisonError::into_inner);
        let (path, file) = &mut *guard;
        let mut buf = Vec::new();
        for row in rows {
            let e = &row.event;
            let mut line = serde_json::json!({
                "event_id": row.event_id,
                "user_id": e.user,
                "product_id": e.item,
                "event_type": e.kind.as_str(),
                "timestamp": e.ts_ms,
            });
            if let Some(v) = e.value {
                line["value"] = serde_json::json!(v);
            }
            if let Some(c) = &row.category {
                line["category"] = serde_json::json!(c);
            }
            buf.extend_from_slice(line.to_string().as_bytes());
            buf.push(b'\n');
        }
        file.write_all(&buf)
            .and_then(|()| file.flush())
            .map_err(|source| {
                UserStateError::History(EventsError::Io {
                    path: path.clone(),
                    source,
                })
            })
    }
}

#[async_trait]
impl UserHistory for InProcessUserHistory {
    fn backend(&self) -> &'static str {
        "in_process"
    }

    async fn history(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<Interaction>, UserStateError> {
        validate_user_id(user_id)?;
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        Ok(state
            .users
            .get(user_id)
            .map(|list| {
                list.iter()
                    .rev()
                    .take(limit)
                    .map(|e| Interaction {
                        product_id: e.product_id.clone(),
                        kind: e.kind,
                        at_ms: e.at_ms,
                        value: e.value,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn record(&self, events: &[EventRow]) -> Result<u64, UserStateError> {
        validate_events(events)?;
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        // Decide everything before changing anything: a conflict refuses the whole batch.
        let mut batch: HashMap<&str, &EventRow> = HashMap::new();
        let mut new = Vec::new();
        for row in events {
            let id = row.event_id.as_str();
            let conflict = || {
                UserStateError::History(EventsError::ConflictingEventId {
                    event_id: id.to_owned(),
                })
            };
            if let Some(first) = batch.get(id) {
                if first.event != row.event {
                    return Err(conflict());
                }
                continue;
            }
            batch.insert(id, row);
            let stored = state
                .users
                .get(&row.event.user)
                .and_then(|list| list.iter().find(|e| e.event_id.as_deref() == Some(id)));
            match stored {
                Some(e) if e.same_event(&row.event) => {}
                Some(_) => return Err(conflict()),
                None => new.push(row),
            }
        }
        self.append(&new)?;
        for row in &new {
            let e = &row.event;
            let entry = Entry {
                product_id: e.item.clone(),
                kind: e.kind,
                at_ms: e.ts_ms,
                value: e.value,
                event_id: Some(row.event_id.clone()),
                seq: 0,
            };
            state.insert(self.per_user, &e.user, entry);
        }
        Ok(new.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, user: &str, item: &str, kind: EventType, ts: i64) -> EventRow {
        EventRow {
            event_id: id.into(),
            event: Event {
                user: user.into(),
                item: item.into(),
                kind,
                ts_ms: Some(ts),
                value: None,
            },
            category: None,
        }
    }

    fn ids(h: &[Interaction]) -> Vec<&str> {
        h.iter().map(|i| i.product_id.as_str()).collect()
    }

    #[tokio::test]
    async fn newest_first_bounded_per_user_and_idempotent() -> Result<(), UserStateError> {
        let h = InProcessUserHistory::new(3);
        let n = h
            .record(&[
                row("e1", "u", "p1", EventType::View, 10),
                row("e2", "u", "p2", EventType::Click, 30),
                // Out of order: lands between.
                row("e3", "u", "p3", EventType::Purchase, 20),
                row("e4", "v", "p9", EventType::View, 5),
            ])
            .await?;
        assert_eq!(n, 4);
        assert_eq!(ids(&h.history("u", 10).await?), ["p2", "p3", "p1"]);
        assert_eq!(ids(&h.history("u", 2).await?), ["p2", "p3"]);
        assert_eq!(ids(&h.history("v", 10).await?), ["p9"]);
        assert!(h.history("nobody", 10).await?.is_empty());
        // Bounded: the oldest goes.
        h.record(&[row("e5", "u", "p5", EventType::View, 40)])
            .await?;
        assert_eq!(ids(&h.history("u", 10).await?), ["p5", "p2", "p3"]);
        // An event older than everything kept is not kept.
        h.record(&[row("e6", "u", "p6", EventType::View, 1)])
            .await?;
        assert_eq!(ids(&h.history("u", 10).await?), ["p5", "p2", "p3"]);
        // The same batch again: nothing new.
        assert_eq!(
            h.record(&[row("e5", "u", "p5", EventType::View, 40)])
                .await?,
            0
        );
        // The same id for another event: the whole batch is refused.
        let e = h
            .record(&[
                row("e7", "u", "p7", EventType::View, 50),
                row("e5", "u", "p5", EventType::Purchase, 40),
            ])
            .await
            .expect_err("conflict");
        assert_eq!(e.kind(), "ConflictingEventId");
        assert_eq!(ids(&h.history("u", 10).await?), ["p5", "p2", "p3"]);
        Ok(())
    }

    #[tokio::test]
    async fn bad_events_are_refused_naming_the_event() {
        let h = InProcessUserHistory::new(10);
        let mut no_time = row("e2", "u", "p", EventType::View, 1);
        no_time.event.ts_ms = None;
        let mut rating = row("e3", "u", "p", EventType::Rating, 1);
        rating.event.value = None;
        let mut nan = row("e4", "u", "p", EventType::Rating, 1);
        nan.event.value = Some(f32::NAN);
        let mut long_category = row("e5", "u", "p", EventType::View, 1);
        long_category.category = Some("c".repeat(300));
        let other = row("ok", "u", "p2", EventType::View, 1);
        for (bad, reason) in [
            (row("", "u", "p", EventType::View, 1), "event_id: empty"),
            (row("e1", "", "p", EventType::View, 1), "user_id: "),
            (row("e1", "u", "", EventType::View, 1), "product_id: empty"),
            (no_time, "timestamp: missing"),
            (rating, "value: a rating needs one"),
            (nan, "value: not finite"),
            (
                row("e1", "u", "p\0", EventType::View, 1),
                "product_id: contains a NUL",
            ),
            (
                row(&"e".repeat(257), "u", "p", EventType::View, 1),
                "event_id: 257 bytes, at most 256",
            ),
            (long_category, "category: 300 bytes"),
            // The same id as event 0, another event.
            (other, "event_id: also the id of event 0"),
        ] {
            let good = row("ok", "u", "p", EventType::View, 1);
            let e = h.record(&[good, bad]).await.expect_err(reason);
            let text = e.to_string();
            assert_eq!(e.kind(), "InvalidEvent");
            assert!(
                text.starts_with("event 1 ") && text.contains(reason),
                "{text}"
            );
        }
        assert_eq!(h.users(), 0, "nothing of a refused batch is kept");
    }

    #[tokio::test]
    async fn appended_events_read_back_from_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("events.jsonl");
        std::fs::write(
            &path,
            "{\"user_id\":\"u\",\"product_id\":\"p0\",\"event_type\":\"view\",\"timestamp\":5}\n",
        )?;
        let h = InProcessUserHistory::from_file(&path, FileFormat::Auto, 10)?.append_to(&path)?;
        let mut rated = row("e2", "u", "p2", EventType::Rating, 20);
        rated.event.value = Some(4.5);
        rated.category = Some("shoes".into());
        h.record(&[row("e1", "u", "p1", EventType::AddToCart, 10), rated])
            .await?;
        let again = InProcessUserHistory::from_file(&path, FileFormat::Auto, 10)?;
        let read = again.history("u", 10).await?;
        assert_eq!(read, h.history("u", 10).await?);
        assert_eq!(ids(&read), ["p2", "p1", "p0"]);
        assert_eq!(read[0].value, Some(4.5));
        assert_eq!(read[1].kind, EventType::AddToCart);

        // A file of another format is refused, with the reason.
        let tsv = dir.path().join("events.tsv");
        std::fs::write(&tsv, "u\tp\t1\n")?;
        let e = InProcessUserHistory::new(10)
            .append_to(&tsv)
            .expect_err("tsv");
        assert!(e.to_string().contains("JSON lines"), "{e}");
        Ok(())
    }

    #[test]
    fn file_events_without_time_are_the_oldest_in_file_order() {
        let ev = |item: &str, ts: Option<i64>| Event {
            user: "u".into(),
            item: item.into(),
            kind: EventType::View,
            ts_ms: ts,
            value: None,
        };
        let h =
            InProcessUserHistory::from_events([ev("a", None), ev("b", Some(7)), ev("c", None)], 10);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let got = rt.block_on(h.history("u", 10)).expect("history");
        assert_eq!(ids(&got), ["b", "c", "a"]);
    }
}
