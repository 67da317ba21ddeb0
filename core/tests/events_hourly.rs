//! The `events_hourly` rollup (migration 0006) against the real Postgres of the test
//! environment: the triggers keep it equal to the events under inserts, concurrent inserts,
//! updates, deletes and TRUNCATE; the data-quality profile reads the volume history from it and
//! gets what a scan of the events gets; a rollup that differs, or that could not be kept, is
//! noticed, scanned around and rebuilt, and the writes that broke it still succeed.

use std::collections::BTreeMap;

use recsys_core::cf::interactions::{Event, EventType};
use recsys_core::events::{self, EventRow, PostgresEvents};
use recsys_core::quality::profile::{self, Bucket, HistorySource};
use recsys_core::quality::{self, QualityArgs};
use recsys_core::stores::{self, PostgresArgs};
use recsys_tests::TestEnv;
use sqlx::PgPool;

const HOUR: i64 = 3_600_000;

async fn pool() -> PgPool {
    let env = TestEnv::load().expect("test environment (bash tests/env/up.sh)");
    let url = env.fresh_database("hourly").await.expect("database");
    let pool = stores::postgres(&PostgresArgs {
        url,
        max_connections: 6,
    })
    .await
    .expect("postgres");
    events::migrate(&pool).await.expect("migrations");
    pool
}

fn row(id: String, user: u64, hour_ms: i64, offset_ms: i64, kind: EventType) -> EventRow {
    EventRow {
        event_id: id,
        event: Event {
            user: format!("u{user}"),
            item: format!("p{}", user % 17),
            kind,
            ts_ms: Some(hour_ms + offset_ms),
            value: None,
        },
        category: None,
    }
}

/// Events over `hours` hours ending at `end_ms`, a varying number an hour and type.
fn events(tag: &str, end_ms: i64, hours: i64) -> Vec<EventRow> {
    let kinds = [EventType::View, EventType::Click, EventType::Purchase];
    let mut out = vec![];
    for h in 0..hours {
        let hour_ms = end_ms - (h + 1) * HOUR;
        for i in 0..(5 + (h * 7) % 11) as u64 {
            let kind = kinds[(i as usize + h as usize) % 3];
            out.push(row(
                format!("{tag}-{h}-{i}"),
                i,
                hour_ms,
                (i as i64 * 97_001) % HOUR,
                kind,
            ));
        }
    }
    out
}

/// The rollup and a scan of the events, per (hour, label).
async fn both(pool: &PgPool) -> (BTreeMap<(i64, String), i64>, BTreeMap<(i64, String), i64>) {
    let rollup: Vec<(chrono::DateTime<chrono::Utc>, String, i64)> = sqlx::query_as(
        "SELECT hour, event_type, sum(events)::bigint FROM events_hourly GROUP BY 1, 2 HAVING sum(events) <> 0",
    )
    .fetch_all(pool)
    .await
    .expect("rollup");
    let scan: Vec<(chrono::DateTime<chrono::Utc>, String, i64)> = sqlx::query_as(
        "SELECT date_bin('1 hour', occurred_at, '2000-01-01 00:00:00+00'),
                recsys_events_hour_label(event_type), count(*)
         FROM events GROUP BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .expect("scan");
    let map = |v: Vec<(chrono::DateTime<chrono::Utc>, String, i64)>| {
        v.into_iter()
            .map(|(h, t, n)| ((h.timestamp_millis(), t), n))
            .collect()
    };
    (map(rollup), map(scan))
}

async fn assert_kept(pool: &PgPool, when: &str) {
    let (rollup, scan) = both(pool).await;
    assert!(
        !scan.is_empty() || when.contains("truncate"),
        "{when}: no events"
    );
    assert_eq!(rollup, scan, "{when}: the rollup differs from the events");
    let valid: bool = sqlx::query_scalar("SELECT valid FROM events_hourly_state")
        .fetch_one(pool)
        .await
        .expect("state");
    assert!(valid, "{when}: the rollup was marked invalid");
}

fn sorted(mut b: Vec<Bucket>) -> Vec<Bucket> {
    b.sort_by(|x, y| (x.hour, &x.event_type).cmp(&(y.hour, &y.event_type)));
    b
}

fn now_hour() -> i64 {
    chrono::Utc::now().timestamp_millis() / HOUR * HOUR
}

#[tokio::test]
async fn triggers_keep_the_rollup_equal_to_the_events() {
    let pool = pool().await;
    let store = PostgresEvents::new(pool.clone());
    let end = now_hour();
    store.insert(&events("a", end, 48)).await.expect("insert");
    assert_kept(&pool, "after one insert").await;
    // The same batch again: nothing new, nothing counted twice.
    assert_eq!(store.insert(&events("a", end, 48)).await.expect("again"), 0);
    assert_kept(&pool, "after a repeated batch").await;

    // Four writers at once, each in its own backend (slot), into the same hours.
    let mut tasks = vec![];
    for w in 0..4 {
        let store = PostgresEvents::new(pool.clone());
        tasks.push(tokio::spawn(async move {
            for b in 0..10 {
                store
                    .insert(&events(&format!("w{w}-{b}"), end, 6))
                    .await
                    .expect("concurrent insert");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    assert_kept(&pool, "after concurrent inserts").await;
    let slots: i64 = sqlx::query_scalar("SELECT count(DISTINCT slot) FROM events_hourly")
        .fetch_one(&pool)
        .await
        .expect("slots");
    assert!(slots >= 1, "no slot used");

    // Updates that move events between hours and types, and deletes.
    sqlx::query(
        "UPDATE events SET occurred_at = occurred_at - interval '5 hours', event_type = 'add_to_cart'
         WHERE event_id LIKE 'a-1-%'",
    )
    .execute(&pool)
    .await
    .expect("update");
    assert_kept(&pool, "after an update").await;
    sqlx::query("DELETE FROM events WHERE event_id LIKE 'w1-%' OR event_id LIKE 'a-3%'")
        .execute(&pool)
        .await
        .expect("delete");
    assert_kept(&pool, "after a delete").await;
    // Unknown types are one label, whatever their names (the type's check constraint off, as a
    // hand-made schema change would).
    sqlx::query("ALTER TABLE events DROP CONSTRAINT events_event_type_check")
        .execute(&pool)
        .await
        .expect("drop check");
    sqlx::query(
        "INSERT INTO events (event_id, user_id, product_id, event_type, occurred_at)
         SELECT 'x' || g, 'u', 'p', 'made_up_' || g, now() - interval '2 hours' FROM generate_series(1, 30) g",
    )
    .execute(&pool)
    .await
    .expect("insert unknown types");
    assert_kept(&pool, "after unknown types").await;
    let labels: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT event_type) FROM events_hourly WHERE event_type LIKE '(%'",
    )
    .fetch_one(&pool)
    .await
    .expect("labels");
    assert_eq!(labels, 1, "unknown types are one label");

    sqlx::query("TRUNCATE events")
        .execute(&pool)
        .await
        .expect("truncate");
    assert_kept(&pool, "after truncate").await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM events_hourly")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(left, 0, "TRUNCATE empties the rollup");
}

#[tokio::test]
async fn the_profile_reads_the_rollup_and_rebuilds_it_when_it_differs() {
    let pool = pool().await;
    let store = PostgresEvents::new(pool.clone());
    let end = now_hour();
    // Three weeks of hours, so the history reaches well before the 24-hour check window.
    store
        .insert(&events("h", end, 21 * 24))
        .await
        .expect("insert");
    let args = QualityArgs::default();
    let at = end - 1;

    let from_rollup = profile::postgres(&pool, at, &args, None)
        .await
        .expect("profile");
    assert_eq!(from_rollup.history_source, HistorySource::Rollup);
    // The same profile with the rollup marked invalid: counted from the events.
    sqlx::query("UPDATE events_hourly_state SET valid = false, reason = 'test'")
        .execute(&pool)
        .await
        .expect("invalidate");
    let scanned = profile::postgres(&pool, at, &args, None)
        .await
        .expect("profile");
    match &scanned.history_source {
        HistorySource::Scanned(why) => assert!(why.contains("marked invalid: test"), "{why}"),
        other => panic!("an invalid rollup was used: {other:?}"),
    }
    assert_eq!(
        sorted(from_rollup.buckets.clone()),
        sorted(scanned.buckets.clone()),
        "the rollup and the events give different histories"
    );
    assert!(
        from_rollup
            .buckets
            .iter()
            .any(|b| b.hour.is_some_and(|h| h * HOUR < at - 20 * 24 * HOUR)),
        "the history reaches three weeks back"
    );
    assert_eq!(
        quality::evaluate(&from_rollup, &args),
        quality::evaluate(&scanned, &args),
        "the checks judge the same"
    );
    // The scanning run rebuilt it.
    assert_kept(&pool, "after the rebuild").await;
    let (dups, rows) = from_rollup.duplicates.expect("duplicates counted");
    assert_eq!(dups, 0, "the generated events have no duplicates");
    assert!(rows > 0);
    // Three copies of one event under new ids, and two events that only share a time.
    sqlx::query(
        "INSERT INTO events (event_id, user_id, product_id, event_type, occurred_at)
         SELECT 'copy-' || g, user_id, product_id, event_type, occurred_at
         FROM (SELECT * FROM events WHERE event_id = 'h-2-1') e, generate_series(1, 3) g
         UNION ALL
         SELECT 'same-time-' || g, 'other-' || g, 'p1', 'view', occurred_at
         FROM (SELECT * FROM events WHERE event_id = 'h-2-2') e, generate_series(1, 2) g",
    )
    .execute(&pool)
    .await
    .expect("duplicates");
    let p = profile::postgres(&pool, at, &args, None)
        .await
        .expect("profile");
    assert_eq!(p.duplicates.map(|d| d.0), Some(3), "three duplicates");

    // A rollup that drifted from the events (here: changed by hand, as a restore with triggers
    // off would leave it) is noticed in the check window's hours, and rebuilt.
    sqlx::query(
        "UPDATE events_hourly SET events = events + 5
         WHERE hour = date_trunc('hour', now()) - interval '3 hours' AND event_type = 'view'",
    )
    .execute(&pool)
    .await
    .expect("corrupt");
    let p = profile::postgres(&pool, at, &args, None)
        .await
        .expect("profile");
    match &p.history_source {
        HistorySource::Scanned(why) => assert!(why.contains("differs"), "{why}"),
        other => panic!("a rollup that differs was used: {other:?}"),
    }
    assert_kept(&pool, "after the second rebuild").await;
    let p = profile::postgres(&pool, at, &args, None)
        .await
        .expect("profile");
    assert_eq!(p.history_source, HistorySource::Rollup);

    // A write the rollup cannot follow still succeeds; the rollup is marked invalid, and the
    // next profile scans and rebuilds it.
    sqlx::query("ALTER TABLE events_hourly RENAME TO events_hourly_away")
        .execute(&pool)
        .await
        .expect("rename");
    let n = store
        .insert(&events("late", end, 2))
        .await
        .expect("the write succeeds although the rollup cannot be kept");
    assert!(n > 0);
    let (valid, reason): (bool, Option<String>) =
        sqlx::query_as("SELECT valid, reason FROM events_hourly_state")
            .fetch_one(&pool)
            .await
            .expect("state");
    assert!(!valid, "marked invalid");
    assert!(
        reason.as_deref().unwrap_or("").contains("events_hourly"),
        "{reason:?}"
    );
    sqlx::query("ALTER TABLE events_hourly_away RENAME TO events_hourly")
        .execute(&pool)
        .await
        .expect("rename back");
    let p = profile::postgres(&pool, at, &args, None)
        .await
        .expect("profile");
    assert!(matches!(p.history_source, HistorySource::Scanned(_)));
    assert_kept(
        &pool,
        "after the rebuild of a rollup that could not be kept",
    )
    .await;
}
