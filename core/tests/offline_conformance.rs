//! Conformance of the offline feature store: one suite, run against the in-process store (in
//! memory and persisted to a file) and against the real Postgres server of the test
//! environment (`bash tests/run` or `tests/env/up.sh` starts it; the Postgres test fails
//! without it).
//!
//! Tests share one database and run in parallel: every case writes features of its own
//! (unique names) and deletes them when it passes; no table is truncated.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use recsys_core::features::offline::{
    InProcessOfflineStore, MAX_TIME_MS, OfflineError, OfflineRow, OfflineStore, PitOptions,
    PostgresOfflineStore,
};
use recsys_core::features::{EntityKind, FeatureRef, FeatureValue, StoredValue};
use recsys_core::stores::{self, PostgresArgs};
use recsys_tests::TestEnv;

// ---------------------------------------------------------------------------------------------
// Harness

/// A feature name no other test (or run) uses.
fn unique(tag: &str, major: u64) -> FeatureRef {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let name = format!(
        "t_{tag}_{:x}_{:x}_{}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff,
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    FeatureRef::new(name, major)
}

fn row(entity: &str, value: FeatureValue, event: i64, written: i64) -> OfflineRow {
    OfflineRow::new(entity, value, event).written_at(written)
}

fn sv(value: FeatureValue, event: i64, written: i64) -> StoredValue {
    StoredValue {
        value,
        event_time_ms: event,
        written_at_ms: written,
    }
}

fn int(v: i64) -> FeatureValue {
    FeatureValue::Int(v)
}

fn queries(q: &[(&str, i64)]) -> Vec<(String, i64)> {
    q.iter().map(|(e, t)| ((*e).to_owned(), *t)).collect()
}

fn ids(q: &[&str]) -> Vec<String> {
    q.iter().map(|e| (*e).to_owned()).collect()
}

const NONE: PitOptions = PitOptions {
    as_of_written_ms: None,
    max_age_ms: None,
};

fn kind<T: std::fmt::Debug>(result: Result<T, OfflineError>) -> &'static str {
    result.expect_err("must fail").kind()
}

async fn postgres_store() -> anyhow::Result<PostgresOfflineStore> {
    let env = TestEnv::load()?;
    let pool = stores::postgres(&PostgresArgs {
        url: env.var("RECSYS_TEST_DATABASE_URL")?.to_owned(),
        max_connections: 4,
    })
    .await
    .context("connecting to the test database")?;
    let store = PostgresOfflineStore::new(pool);
    store.migrate().await.context("migrating")?;
    Ok(store)
}

// ---------------------------------------------------------------------------------------------
// The suite

/// Every case, in turn, against one store.
async fn suite(store: &dyn OfflineStore) -> anyhow::Result<()> {
    point_in_time_never_returns_a_later_value(store)
        .await
        .context("point in time")?;
    ties_go_to_the_latest_write(store).await.context("ties")?;
    as_of_written_hides_a_late_backfill(store)
        .await
        .context("as of written")?;
    max_age_bounds_the_lookback(store)
        .await
        .context("max age")?;
    snapshots_take_every_entity_as_of_a_time(store)
        .await
        .context("snapshot")?;
    replace_range_is_idempotent_and_local(store)
        .await
        .context("replace range")?;
    copy_version_carries_values_to_a_new_major(store)
        .await
        .context("copy version")?;
    every_value_type_round_trips_exactly(store)
        .await
        .context("value types")?;
    many_entities_in_one_call(store)
        .await
        .context("many entities")?;
    invalid_input_is_refused_and_changes_nothing(store)
        .await
        .context("invalid input")?;
    Ok(())
}

async fn point_in_time_never_returns_a_later_value(store: &dyn OfflineStore) -> anyhow::Result<()> {
    let f = unique("pit", 1);
    let k = EntityKind::Product;
    store
        .write(
            &f,
            k,
            &[
                row("a", int(1), 100, 1000),
                row("a", int(2), 200, 1001),
                row("a", int(3), 300, 1002),
                row("b", int(10), 150, 1000),
                row("neg", int(-1), -5_000, 1000),
            ],
        )
        .await?;
    // Written later, describing an earlier time: still ordered by event time.
    store.write(&f, k, &[row("a", int(25), 250, 2000)]).await?;

    let q = queries(&[
        ("a", 99),
        ("a", 100),
        ("a", 199),
        ("a", 200),
        ("a", 240),
        ("a", 250),
        ("a", 260),
        ("a", 100_000),
        ("b", 149),
        ("b", 150),
        ("unknown", 500),
        ("a", 100),
        ("neg", -5_001),
        ("neg", -5_000),
    ]);
    let got = store.point_in_time(&f, k, &q, &NONE).await?;
    let expected = vec![
        None,
        Some(sv(int(1), 100, 1000)),
        Some(sv(int(1), 100, 1000)),
        Some(sv(int(2), 200, 1001)),
        Some(sv(int(2), 200, 1001)),
        Some(sv(int(25), 250, 2000)),
        Some(sv(int(25), 250, 2000)),
        Some(sv(int(3), 300, 1002)),
        None,
        Some(sv(int(10), 150, 1000)),
        None,
        Some(sv(int(1), 100, 1000)),
        None,
        Some(sv(int(-1), -5_000, 1000)),
    ];
    assert_eq!(got, expected);
    for (answer, (_, at)) in got.iter().zip(&q) {
        if let Some(v) = answer {
            assert!(v.event_time_ms <= *at, "{v:?} is later than {at}");
        }
    }

    // Other kinds and majors are other tables.
    let other_kind = store.point_in_time(&f, EntityKind::User, &q, &NONE).await?;
    assert!(other_kind.iter().all(Option::is_none));
    let other_major = FeatureRef::new(f.name.clone(), 2);
    assert!(
        store
            .point_in_time(&other_major, k, &q, &NONE)
            .await?
            .iter()
            .all(Option::is_none)
    );

    assert_eq!(
        store.latest(&f, k, &ids(&["b", "a", "unknown"])).await?,
        vec![
            Some(sv(int(10), 150, 1000)),
            Some(sv(int(3), 300, 1002)),
            None
        ]
    );
    assert_eq!(store.point_in_time(&f, k, &[], &NONE).await?, vec![]);
    assert_eq!(store.latest(&f, k, &[]).await?, vec![]);

    let stats = store.stats(&f, k).await?;
    assert_eq!(stats.rows, 6);
    assert_eq!(stats.entities, 3);
    assert_eq!(stats.min_event_time_ms, Some(-5_000));
    assert_eq!(stats.max_event_time_ms, Some(300));
    assert_eq!(stats.last_written_at_ms, Some(2000));
    assert_eq!(store.stats(&f, EntityKind::User).await?, Default::default());

    assert_eq!(store.delete_version(&f).await?, 6);
    assert_eq!(store.stats(&f, k).await?.rows, 0);
    Ok(())
}

async fn ties_go_to_the_latest_write(store: &dyn OfflineStore) -> anyhow::Result<()> {
    let f = unique("tie", 1);
    let k = EntityKind::User;
    // Written out of order: the latest write time wins, not the latest call.
    store.write(&f, k, &[row("t", int(1), 100, 1)]).await?;
    store.write(&f, k, &[row("t", int(3), 100, 3)]).await?;
    store.write(&f, k, &[row("t", int(2), 100, 2)]).await?;
    let at = queries(&[("t", 100), ("t", 150)]);
    assert_eq!(
        store.point_in_time(&f, k, &at, &NONE).await?,
        vec![Some(sv(int(3), 100, 3)), Some(sv(int(3), 100, 3))]
    );
    assert_eq!(
        store.latest(&f, k, &ids(&["t"])).await?,
        vec![Some(sv(int(3), 100, 3))]
    );

    // The same full key again replaces the value; within one call the last row wins.
    let summary = store
        .write(
            &f,
            k,
            &[row("t", int(30), 100, 3), row("t", int(33), 100, 3)],
        )
        .await?;
    assert_eq!(summary.rows, 1);
    assert_eq!(
        store.point_in_time(&f, k, &at[..1], &NONE).await?,
        vec![Some(sv(int(33), 100, 3))]
    );
    assert_eq!(store.stats(&f, k).await?.rows, 3);

    // A write without a write time is stamped with the time of the call, and wins a tie
    // against older writes.
    let before = now_ms();
    let summary = store
        .write(&f, k, &[OfflineRow::new("t", int(4), 100)])
        .await?;
    assert!(summary.written_at_ms >= before, "{summary:?}");
    assert_eq!(
        store.point_in_time(&f, k, &at[..1], &NONE).await?,
        vec![Some(sv(int(4), 100, summary.written_at_ms))]
    );
    store.delete_version(&f).await?;
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

async fn as_of_written_hides_a_late_backfill(store: &dyn OfflineStore) -> anyhow::Result<()> {
    let f = unique("asof", 1);
    let k = EntityKind::User;
    store.write(&f, k, &[row("e", int(1), 100, 1000)]).await?;
    // A training set is built at write time 1500. Later a backfill corrects e and adds f.
    let built = PitOptions {
        as_of_written_ms: Some(1500),
        ..NONE
    };
    store
        .write(
            &f,
            k,
            &[row("e", int(2), 100, 2000), row("g", int(7), 50, 2000)],
        )
        .await?;
    let q = queries(&[("e", 100), ("g", 100)]);
    assert_eq!(
        store.point_in_time(&f, k, &q, &built).await?,
        vec![Some(sv(int(1), 100, 1000)), None],
        "the training set as built"
    );
    assert_eq!(
        store.point_in_time(&f, k, &q, &NONE).await?,
        vec![Some(sv(int(2), 100, 2000)), Some(sv(int(7), 50, 2000))],
        "today's view"
    );
    assert_eq!(
        store.snapshot(&f, k, 100, &built).await?,
        vec![("e".to_owned(), sv(int(1), 100, 1000))]
    );
    // The cutoff is inclusive.
    let at_backfill = PitOptions {
        as_of_written_ms: Some(2000),
        ..NONE
    };
    assert_eq!(
        store.point_in_time(&f, k, &q, &at_backfill).await?,
        vec![Some(sv(int(2), 100, 2000)), Some(sv(int(7), 50, 2000))]
    );
    // Before any write: nothing.
    let before_all = PitOptions {
        as_of_written_ms: Some(999),
        ..NONE
    };
    assert_eq!(
        store.point_in_time(&f, k, &q, &before_all).await?,
        vec![None, None]
    );
    store.delete_version(&f).await?;
    Ok(())
}

async fn max_age_bounds_the_lookback(store: &dyn OfflineStore) -> anyhow::Result<()> {
    let f = unique("age", 1);
    let k = EntityKind::Product;
    store
        .write(&f, k, &[row("m", int(1), 100, 1), row("m", int(2), 50, 1)])
        .await?;
    let q = queries(&[("m", 200)]);
    let age = |ms| PitOptions {
        max_age_ms: Some(ms),
        ..NONE
    };
    assert_eq!(
        store.point_in_time(&f, k, &q, &age(100)).await?,
        vec![Some(sv(int(1), 100, 1))],
        "inclusive bound"
    );
    assert_eq!(store.point_in_time(&f, k, &q, &age(99)).await?, vec![None]);
    assert_eq!(store.snapshot(&f, k, 200, &age(99)).await?, vec![]);
    assert_eq!(store.snapshot(&f, k, 200, &age(100)).await?.len(), 1);
    assert_eq!(
        store.point_in_time(&f, k, &q, &age(i64::MAX)).await?,
        vec![Some(sv(int(1), 100, 1))],
        "a huge lookback saturates"
    );
    store.delete_version(&f).await?;
    Ok(())
}

async fn snapshots_take_every_entity_as_of_a_time(store: &dyn OfflineStore) -> anyhow::Result<()> {
    let f = unique("snap", 1);
    let k = EntityKind::UserProduct;
    store
        .write(
            &f,
            k,
            &[
                row("c|1", int(1), 100, 1),
                row("c|1", int(2), 300, 1),
                row("B|2", int(3), 200, 1),
                row("a|3", int(4), 400, 1),
                row("a|3", int(5), 150, 1),
                row("a|3", int(6), 150, 2),
            ],
        )
        .await?;
    let snap = store.snapshot(&f, k, 250, &NONE).await?;
    assert_eq!(
        snap,
        vec![
            ("B|2".to_owned(), sv(int(3), 200, 1)),
            ("a|3".to_owned(), sv(int(6), 150, 2)),
            ("c|1".to_owned(), sv(int(1), 100, 1)),
        ],
        "sorted by entity id bytes, latest event ≤ t, latest write"
    );
    assert_eq!(store.snapshot(&f, k, 99, &NONE).await?, vec![]);
    let all = store.snapshot(&f, k, MAX_TIME_MS, &NONE).await?;
    assert_eq!(
        all.iter()
            .map(|(e, v)| (e.as_str(), v.event_time_ms))
            .collect::<Vec<_>>(),
        vec![("B|2", 200), ("a|3", 400), ("c|1", 300)]
    );
    // A snapshot equals point-in-time reads of every entity.
    let q = queries(&[("B|2", 250), ("a|3", 250), ("c|1", 250)]);
    let pit: Vec<StoredValue> = store
        .point_in_time(&f, k, &q, &NONE)
        .await?
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(pit, snap.into_iter().map(|(_, v)| v).collect::<Vec<_>>());
    store.delete_version(&f).await?;
    Ok(())
}

/// What a range holds, whatever the write times: (entity, event time, value) at every event
/// time of interest, plus the row count.
async fn contents(
    store: &dyn OfflineStore,
    f: &FeatureRef,
    k: EntityKind,
    entities: &[&str],
    times: &[i64],
) -> anyhow::Result<(u64, Vec<Option<(i64, FeatureValue)>>)> {
    let q: Vec<(String, i64)> = entities
        .iter()
        .flat_map(|e| times.iter().map(move |t| ((*e).to_owned(), *t)))
        .collect();
    let answers = store.point_in_time(f, k, &q, &NONE).await?;
    Ok((
        store.stats(f, k).await?.rows,
        answers
            .into_iter()
            .map(|a| a.map(|v| (v.event_time_ms, v.value)))
            .collect(),
    ))
}

async fn replace_range_is_idempotent_and_local(store: &dyn OfflineStore) -> anyhow::Result<()> {
    let f = unique("backfill", 1);
    let k = EntityKind::Product;
    store
        .write(
            &f,
            k,
            &[
                row("x", int(-50), 50, 1),   // before the range
                row("x", int(-100), 100, 1), // in the range (start is inclusive)
                row("y", int(-150), 150, 1), // in the range
                row("y", int(-200), 200, 1), // after the range (end is exclusive)
            ],
        )
        .await?;
    // The same feature with another entity kind and another major: untouched.
    store
        .write(&f, EntityKind::User, &[row("x", int(0), 150, 1)])
        .await?;
    let v2 = FeatureRef::new(f.name.clone(), 2);
    store.write(&v2, k, &[row("x", int(0), 150, 1)]).await?;

    let backfill = vec![
        OfflineRow::new("x", int(100), 100),
        OfflineRow::new("x", int(120), 120),
        OfflineRow::new("y", int(150), 150),
        OfflineRow::new("z", int(199), 199),
    ];
    let first = store.replace_range(&f, k, 100, 200, &backfill).await?;
    assert_eq!((first.deleted, first.written), (2, 4), "{first:?}");
    let entities = ["x", "y", "z"];
    let times = [49, 50, 99, 100, 119, 120, 150, 199, 200, 1000];
    let after_first = contents(store, &f, k, &entities, &times).await?;
    assert_eq!(after_first.0, 6);
    let expected_x = vec![
        None,
        Some((50, int(-50))),
        Some((50, int(-50))),
        Some((100, int(100))),
        Some((100, int(100))),
        Some((120, int(120))),
        Some((120, int(120))),
        Some((120, int(120))),
        Some((120, int(120))),
        Some((120, int(120))),
    ];
    assert_eq!(after_first.1[..10], expected_x[..]);
    assert_eq!(
        after_first.1[10..20].last(),
        Some(&Some((200, int(-200)))),
        "the row at the exclusive end stays"
    );
    assert_eq!(after_first.1[16], Some((150, int(150))), "y replaced");

    let second = store.replace_range(&f, k, 100, 200, &backfill).await?;
    assert_eq!((second.deleted, second.written), (4, 4), "{second:?}");
    let after_second = contents(store, &f, k, &entities, &times).await?;
    assert_eq!(
        after_second, after_first,
        "re-running a backfill changes nothing"
    );

    // Other kinds and majors were left alone.
    assert_eq!(store.stats(&f, EntityKind::User).await?.rows, 1);
    assert_eq!(store.stats(&v2, k).await?.rows, 1);

    // A row outside the range is refused, and nothing changes.
    let err = store
        .replace_range(&f, k, 100, 200, &[OfflineRow::new("x", int(0), 200)])
        .await;
    assert_eq!(kind(err), "OfflineInvalidRow");
    assert_eq!(
        contents(store, &f, k, &entities, &times).await?,
        after_first
    );
    assert_eq!(
        kind(store.replace_range(&f, k, 200, 200, &[]).await),
        "OfflineInvalidArgument"
    );

    // An empty backfill clears the range.
    let cleared = store.replace_range(&f, k, 100, 200, &[]).await?;
    assert_eq!((cleared.deleted, cleared.written), (4, 0));
    assert_eq!(store.stats(&f, k).await?.rows, 2);

    store.delete_version(&f).await?;
    store.delete_version(&v2).await?;
    Ok(())
}

async fn copy_version_carries_values_to_a_new_major(
    store: &dyn OfflineStore,
) -> anyhow::Result<()> {
    let v1 = unique("copy", 1);
    let v2 = FeatureRef::new(v1.name.clone(), 2);
    store
        .write(
            &v1,
            EntityKind::Product,
            &[
                row("p", int(1), 100, 10),
                row("p", int(2), 200, 20),
                row("q", int(3), 100, 10),
            ],
        )
        .await?;
    store
        .write(
            &v1,
            EntityKind::User,
            &[row("u", FeatureValue::String("s".into()), 5, 6)],
        )
        .await?;
    assert_eq!(store.copy_version(&v1, &v2).await?, 4);
    let q = queries(&[("p", 150), ("p", 250), ("q", 100)]);
    assert_eq!(
        store
            .point_in_time(&v2, EntityKind::Product, &q, &NONE)
            .await?,
        store
            .point_in_time(&v1, EntityKind::Product, &q, &NONE)
            .await?,
        "times and values carried over"
    );
    assert_eq!(
        store.latest(&v2, EntityKind::User, &ids(&["u"])).await?,
        vec![Some(sv(FeatureValue::String("s".into()), 5, 6))]
    );
    assert_eq!(
        store.copy_version(&v1, &v2).await?,
        0,
        "copying again adds nothing"
    );

    // The versions are independent afterwards.
    store
        .write(&v2, EntityKind::Product, &[row("p", int(9), 300, 30)])
        .await?;
    assert_eq!(store.stats(&v1, EntityKind::Product).await?.rows, 3);
    assert_eq!(store.stats(&v2, EntityKind::Product).await?.rows, 4);
    assert_eq!(
        kind(store.copy_version(&v1, &v1).await),
        "OfflineInvalidArgument"
    );
    // Copying an empty version copies nothing.
    assert_eq!(
        store
            .copy_version(&unique("empty", 1), &unique("empty", 2))
            .await?,
        0
    );

    store.delete_version(&v1).await?;
    store.delete_version(&v2).await?;
    Ok(())
}

fn float_bits(v: &FeatureValue) -> Vec<u64> {
    match v {
        FeatureValue::Float(x) => vec![x.to_bits()],
        FeatureValue::FloatVector(xs) => xs.iter().map(|x| u64::from(x.to_bits())).collect(),
        _ => vec![],
    }
}

async fn every_value_type_round_trips_exactly(store: &dyn OfflineStore) -> anyhow::Result<()> {
    let f = unique("types", 1);
    let k = EntityKind::User;
    let mut vector: Vec<f32> = (0..768u32)
        .map(|i| f32::from_bits(0x3f80_0000 ^ i.wrapping_mul(2_654_435_761) >> 9))
        .collect();
    vector.extend([f32::MIN_POSITIVE, 1e-45, -0.0, f32::MAX, f32::MIN, 0.1]);
    let values = vec![
        FeatureValue::Float(0.1),
        FeatureValue::Float(0.300_000_000_000_000_04),
        FeatureValue::Float(-0.0),
        FeatureValue::Float(f64::MIN_POSITIVE),
        FeatureValue::Float(5e-324),
        FeatureValue::Float(f64::MAX),
        FeatureValue::Float(-1e300),
        FeatureValue::Float(std::f64::consts::PI),
        FeatureValue::Int(i64::MIN),
        FeatureValue::Int(i64::MAX),
        FeatureValue::Int(0),
        FeatureValue::String(String::new()),
        FeatureValue::String("héllo ✓ \"quoted\" \\ back\nslash\t{\"json\": [1]}".into()),
        FeatureValue::String(r#"{"electronics":0.75,"books":0.25}"#.into()),
        FeatureValue::FloatVector(vec![]),
        FeatureValue::FloatVector(vec![1.5]),
        FeatureValue::FloatVector(vector),
        FeatureValue::FloatVector(vec![0.25, -3.5, 1e-7]),
    ];
    // Every type in one batch, and every type for one entity at successive times.
    let mut rows: Vec<OfflineRow> = values
        .iter()
        .enumerate()
        .map(|(i, v)| row(&format!("e{i:02}"), v.clone(), 1, 2))
        .collect();
    rows.extend(
        values
            .iter()
            .enumerate()
            .map(|(i, v)| row("mixed", v.clone(), 10 + i as i64, 2)),
    );
    store.write(&f, k, &rows).await?;

    let q: Vec<(String, i64)> = (0..values.len()).map(|i| (format!("e{i:02}"), 1)).collect();
    let got = store.point_in_time(&f, k, &q, &NONE).await?;
    for (i, (expected, answer)) in values.iter().zip(&got).enumerate() {
        let answer = answer
            .as_ref()
            .with_context(|| format!("value {i} missing"))?;
        assert_eq!(&answer.value, expected, "value {i}");
        assert_eq!(
            float_bits(&answer.value),
            float_bits(expected),
            "bits of value {i}"
        );
    }
    let mixed: Vec<(String, i64)> = (0..values.len())
        .map(|i| ("mixed".to_owned(), 10 + i as i64))
        .collect();
    let got = store.point_in_time(&f, k, &mixed, &NONE).await?;
    let got_values: Vec<FeatureValue> = got.into_iter().flatten().map(|v| v.value).collect();
    assert_eq!(got_values, values);
    let snapshot = store.snapshot(&f, k, 1, &NONE).await?;
    assert_eq!(snapshot.len(), values.len());
    for ((_, v), expected) in snapshot.iter().zip(&values) {
        assert_eq!(float_bits(&v.value), float_bits(expected));
    }
    store.delete_version(&f).await?;
    Ok(())
}

async fn many_entities_in_one_call(store: &dyn OfflineStore) -> anyhow::Result<()> {
    let f = unique("many", 1);
    let k = EntityKind::Product;
    let n = 5_000i64;
    let rows: Vec<OfflineRow> = (0..n)
        .flat_map(|i| {
            (0..3).map(move |j| {
                row(
                    &format!("p{i}"),
                    FeatureValue::Float(i as f64 + j as f64 / 4.0),
                    1_000 * j + i % 7,
                    5,
                )
            })
        })
        .collect();
    assert_eq!(store.write(&f, k, &rows).await?.rows, 3 * n as u64);
    // For each entity: before everything, between the 2nd and 3rd value, after everything.
    let q: Vec<(String, i64)> = (0..n)
        .flat_map(|i| {
            [
                (format!("p{i}"), i % 7 - 1),
                (format!("p{i}"), 1_500),
                (format!("p{i}"), 10_000),
            ]
        })
        .collect();
    let got = store.point_in_time(&f, k, &q, &NONE).await?;
    assert_eq!(got.len(), q.len());
    for i in 0..n {
        let at = |j: usize| got[(3 * i) as usize + j].as_ref().map(|v| v.value.clone());
        assert_eq!(at(0), None, "p{i} before its first value");
        assert_eq!(at(1), Some(FeatureValue::Float(i as f64 + 0.25)), "p{i}");
        assert_eq!(at(2), Some(FeatureValue::Float(i as f64 + 0.5)), "p{i}");
    }
    let mut wanted: Vec<String> = (0..n).rev().map(|i| format!("p{i}")).collect();
    wanted.push("nobody".into());
    let latest = store.latest(&f, k, &wanted).await?;
    assert_eq!(latest.len(), wanted.len());
    assert_eq!(
        latest[0].as_ref().map(|v| v.event_time_ms),
        Some(2_000 + (n - 1) % 7)
    );
    assert!(latest[..n as usize].iter().all(Option::is_some));
    assert_eq!(latest[n as usize], None);
    assert_eq!(store.snapshot(&f, k, 1_500, &NONE).await?.len(), n as usize);
    let stats = store.stats(&f, k).await?;
    assert_eq!((stats.rows, stats.entities), (3 * n as u64, n as u64));
    store.delete_version(&f).await?;
    Ok(())
}

async fn invalid_input_is_refused_and_changes_nothing(
    store: &dyn OfflineStore,
) -> anyhow::Result<()> {
    let f = unique("invalid", 1);
    let k = EntityKind::User;
    let bad_name = FeatureRef::new("Not-A-Name", 1);
    assert_eq!(
        kind(store.write(&bad_name, k, &[]).await),
        "OfflineInvalidFeature"
    );
    assert_eq!(
        kind(
            store
                .point_in_time(&FeatureRef::new("x", u64::MAX), k, &[], &NONE)
                .await
        ),
        "OfflineInvalidFeature"
    );
    let refused = [
        row("ok", int(1), 1, 1),
        row("nan", FeatureValue::Float(f64::NAN), 1, 1),
    ];
    assert_eq!(
        kind(store.write(&f, k, &refused).await),
        "OfflineInvalidRow"
    );
    for bad in [
        row("", int(1), 1, 1),
        row("nul\0", int(1), 1, 1),
        row("s", FeatureValue::String("nul\0".into()), 1, 1),
        row("inf", FeatureValue::Float(f64::INFINITY), 1, 1),
        row("vec", FeatureValue::FloatVector(vec![1.0, f32::NAN]), 1, 1),
        row("late", int(1), MAX_TIME_MS + 1, 1),
        row("early", int(1), 1, i64::MIN),
    ] {
        assert_eq!(
            kind(store.write(&f, k, std::slice::from_ref(&bad)).await),
            "OfflineInvalidRow",
            "{bad:?}"
        );
    }
    assert_eq!(
        store.stats(&f, k).await?.rows,
        0,
        "a refused batch writes nothing"
    );
    assert_eq!(
        kind(
            store
                .point_in_time(&f, k, &queries(&[("a", i64::MAX)]), &NONE)
                .await
        ),
        "OfflineInvalidArgument"
    );
    assert_eq!(
        kind(
            store
                .point_in_time(&f, k, &queries(&[("a\0", 1)]), &NONE)
                .await
        ),
        "OfflineInvalidArgument"
    );
    let negative = PitOptions {
        max_age_ms: Some(-1),
        ..NONE
    };
    assert_eq!(
        kind(store.snapshot(&f, k, 1, &negative).await),
        "OfflineInvalidArgument"
    );
    assert_eq!(
        kind(store.snapshot(&f, k, i64::MIN, &NONE).await),
        "OfflineInvalidArgument"
    );
    assert!(
        !store
            .write(&f, k, &refused)
            .await
            .expect_err("refused")
            .retryable()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The runs

#[tokio::test]
async fn in_process_store_conforms() -> anyhow::Result<()> {
    suite(&InProcessOfflineStore::new()).await
}

#[tokio::test]
async fn file_backed_in_process_store_conforms_and_persists() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("offline.json");
    suite(&InProcessOfflineStore::open(&path)?).await?;

    let f = unique("file", 1);
    let k = EntityKind::Product;
    let rows = vec![
        row("a", FeatureValue::Float(0.300_000_000_000_000_04), 100, 1),
        row("a", FeatureValue::FloatVector(vec![0.1, 1e-45]), 200, 2),
        row("b", FeatureValue::String("s".into()), 100, 3),
    ];
    {
        let store = InProcessOfflineStore::open(&path)?;
        store.write(&f, k, &rows).await?;
    }
    let reopened = InProcessOfflineStore::open(&path)?;
    assert_eq!(reopened.path(), Some(path.as_path()));
    let q = queries(&[("a", 150), ("a", 250), ("b", 100)]);
    assert_eq!(
        reopened.point_in_time(&f, k, &q, &NONE).await?,
        vec![
            Some(sv(FeatureValue::Float(0.300_000_000_000_000_04), 100, 1)),
            Some(sv(FeatureValue::FloatVector(vec![0.1, 1e-45]), 200, 2)),
            Some(sv(FeatureValue::String("s".into()), 100, 3)),
        ]
    );

    // A damaged file is reported, not silently replaced.
    std::fs::write(&path, b"{\"format\": 1, \"rows\": [")?;
    let err = InProcessOfflineStore::open(&path).expect_err("corrupt");
    assert_eq!(err.kind(), "OfflineCorrupt");
    Ok(())
}

#[tokio::test]
async fn postgres_store_conforms() -> anyhow::Result<()> {
    let store = postgres_store().await?;
    suite(&store).await
}

#[tokio::test]
async fn postgres_backfills_of_one_range_do_not_interleave() -> anyhow::Result<()> {
    let store = postgres_store().await?;
    let f = unique("concurrent", 1);
    let k = EntityKind::Product;
    // Each run stamps its own write time, so interleaved runs would leave more rows.
    let runs: Vec<Vec<OfflineRow>> = (0..6)
        .map(|run| {
            (0..200)
                .map(|i| OfflineRow::new(format!("p{i}"), int(i), 100 + i).written_at(run))
                .collect()
        })
        .collect();
    let calls = runs
        .iter()
        .map(|rows| store.replace_range(&f, k, 100, 400, rows));
    for result in futures::future::join_all(calls).await {
        result?;
    }
    // Whatever the order, the range holds exactly one backfill's rows.
    assert_eq!(store.stats(&f, k).await?.rows, 200);
    store.delete_version(&f).await?;
    Ok(())
}
