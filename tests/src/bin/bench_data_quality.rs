//! Data-quality benchmark: every event check of the `data-quality` job over a large events table
//! in the real Postgres of the test environment, against the anchor of one `SELECT count(*)`
//! of the same table, in the same run. Target: the checks within 1.5× the count (one pass
//! over the table, not one query per check). See `tests/bench/data-quality/README.md`.
//!
//! A program that prints figures, not a timed test. Build it with `--release`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use recsys_core::quality::{self, QualityArgs};
use sqlx::{Connection as _, PgPool};

/// Benchmark the data-quality checks against a count of the events table.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Postgres server URL (a database `bench_dq_<events>` is created on it, and reused by
    /// later runs); the test environment's (`RECSYS_TEST_DATABASE_URL`) when unset.
    #[arg(long, env = "RECSYS_BENCH_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Events in the table: four weeks of them, ending now.
    #[arg(long, env = "RECSYS_BENCH_EVENTS", default_value_t = 10_000_000)]
    events: u64,
    /// Timed runs of each side; the fastest counts.
    #[arg(long, env = "RECSYS_BENCH_REPEAT", default_value_t = 3)]
    repeat: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = match &args.database_url {
        Some(u) => u.clone(),
        None => std::env::var("RECSYS_TEST_DATABASE_URL")
            .context("give --database-url, or source the test environment (target/testenv/env)")?,
    };
    let name = format!("bench_dq_{}", args.events);
    let (base, _) = server.rsplit_once('/').context("database URL")?;
    let url = format!("{base}/{name}");
    {
        let mut admin = sqlx::PgConnection::connect(&server).await?;
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(&name)
                .fetch_optional(&mut admin)
                .await?;
        if exists.is_none() {
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await?;
        }
    }
    let pool = recsys_core::stores::postgres(&recsys_core::stores::PostgresArgs {
        url: url.clone(),
        max_connections: 2,
    })
    .await?;
    recsys_core::events::migrate(&pool).await?;
    let have: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;
    let now = chrono::Utc::now();
    if have as u64 != args.events {
        load(&pool, args.events, now).await?;
    }
    // Fresh statistics, as autovacuum keeps them (migration 0005's on the hour included).
    sqlx::query("ANALYZE events").execute(&pool).await?;
    let at_ms: i64 = sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
        "SELECT max(occurred_at) FROM events",
    )
    .fetch_one(&pool)
    .await?
    .timestamp_millis();

    let checks = QualityArgs::default();
    let mut count = Duration::MAX;
    let mut profile = Duration::MAX;
    let mut rows = 0;
    let mut results = vec![];
    for _ in 0..args.repeat {
        let t = Instant::now();
        rows = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
            .fetch_one(&pool)
            .await?;
        count = count.min(t.elapsed());
        let t = Instant::now();
        let p = quality::profile::postgres(&pool, at_ms, &checks, None).await?;
        results = quality::evaluate(&p, &checks);
        profile = profile.min(t.elapsed());
    }
    let ratio = profile.as_secs_f64() / count.as_secs_f64();
    anyhow::ensure!(
        quality::profile::postgres(&pool, at_ms, &checks, None)
            .await?
            .history_source
            == quality::profile::HistorySource::Rollup,
        "the timed runs did not read the rollup"
    );
    println!(
        "events table: {rows} rows over four weeks, {} checks",
        results.len()
    );
    println!(
        "SELECT count(*) (anchor)       {:>8.3} s",
        count.as_secs_f64()
    );
    println!(
        "every event check (rollup)     {:>8.3} s",
        profile.as_secs_f64()
    );
    println!(
        "checks / count                 {ratio:>8.2}×   target ≤ 1.5×: {}",
        if ratio <= 1.5 { "met" } else { "NOT met" }
    );
    // Without the rollup (the first run after it was marked invalid): the history is counted
    // from the events, and the rollup rebuilt by the same run.
    sqlx::query("UPDATE events_hourly_state SET valid = false, reason = 'bench'")
        .execute(&pool)
        .await?;
    let t = Instant::now();
    let p = quality::profile::postgres(&pool, at_ms, &checks, None).await?;
    let cold = t.elapsed();
    anyhow::ensure!(
        matches!(
            p.history_source,
            quality::profile::HistorySource::Scanned(_)
        ),
        "the invalid rollup was used: {:?}",
        p.history_source
    );
    let p = quality::profile::postgres(&pool, at_ms, &checks, None).await?;
    anyhow::ensure!(
        p.history_source == quality::profile::HistorySource::Rollup,
        "the rollup was not rebuilt: {:?}",
        p.history_source
    );
    println!(
        "  rollup invalid: history counted from the events and the rollup rebuilt  {:>8.3} s ({:.2}×)",
        cold.as_secs_f64(),
        cold.as_secs_f64() / count.as_secs_f64()
    );
    ingestion_cost(&pool, now).await?;
    let failing: Vec<String> = results
        .iter()
        .filter(|r| r.verdict.is_violation())
        .map(|r| r.describe())
        .collect();
    println!("violations on the generated data: {}", failing.len());
    for f in failing {
        println!("  {f}");
    }
    Ok(())
}

/// Replaces the table's rows with `n` events over the four weeks before `now`, generated by the
/// server (a daily curve, heavy-tailed products), then analyses the table.
async fn load(pool: &PgPool, n: u64, now: chrono::DateTime<chrono::Utc>) -> anyhow::Result<()> {
    let started = Instant::now();
    println!("loading {n} events (once; later runs reuse them)…");
    sqlx::query("TRUNCATE events").execute(pool).await?;
    let chunk = 1_000_000_u64;
    let mut from = 0;
    while from < n {
        let to = (from + chunk).min(n);
        sqlx::query(
            "INSERT INTO events (event_id, user_id, product_id, event_type, occurred_at, category, ingested_at)
             SELECT 'e' || g, 'u' || (g * 7919 % 200000),
                    'p' || floor(30000 * power(random(), 2.5))::int,
                    (ARRAY['view','view','view','view','click','click','add_to_cart','purchase'])[1 + (g % 8)::int],
                    t, 'c' || (g % 40), t + interval '1 second'
             FROM generate_series($1::bigint, $2::bigint - 1) g,
                  LATERAL (SELECT $3::timestamptz - interval '28 days' * (1 - g::float8 / $4::float8) AS t) x",
        )
        .bind(from as i64)
        .bind(to as i64)
        .bind(now)
        .bind(n as f64)
        .execute(pool)
        .await?;
        from = to;
        println!("  {to} rows ({:.0}s)", started.elapsed().as_secs_f64());
    }
    sqlx::query("VACUUM ANALYZE events").execute(pool).await?;
    println!("loaded in {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// What keeping the rollup costs ingestion: batches of 1,000 events through the scorer's insert
/// (`PostgresEvents::insert`), with the rollup's triggers and without, alternated, fastest of
/// three each. The events are deleted again the same way they were inserted, so the rollup
/// stays exact.
async fn ingestion_cost(pool: &PgPool, now: chrono::DateTime<chrono::Utc>) -> anyhow::Result<()> {
    use recsys_core::cf::interactions::{Event, EventType};
    use recsys_core::events::{EventRow, PostgresEvents};
    let store = PostgresEvents::new(pool.clone());
    let (batches, size) = (100usize, 1_000usize);
    let mut best = [Duration::MAX; 2];
    for round in 0..3 {
        for (side, triggers) in [(0, true), (1, false)] {
            if !triggers {
                sqlx::query("ALTER TABLE events DISABLE TRIGGER USER")
                    .execute(pool)
                    .await?;
            }
            let t = Instant::now();
            for b in 0..batches {
                let rows: Vec<EventRow> = (0..size)
                    .map(|i| {
                        let n = b * size + i;
                        EventRow {
                            event_id: format!("bench-ingest-{round}-{n}"),
                            event: Event {
                                user: format!("u{}", n % 5000),
                                item: format!("p{}", n % 30000),
                                kind: EventType::View,
                                ts_ms: Some(now.timestamp_millis() - (n as i64 % 3_600_000)),
                                value: None,
                            },
                            category: None,
                        }
                    })
                    .collect();
                store.insert(&rows).await?;
            }
            best[side] = best[side].min(t.elapsed());
            sqlx::query("DELETE FROM events WHERE event_id LIKE 'bench-ingest-%'")
                .execute(pool)
                .await?;
            if !triggers {
                sqlx::query("ALTER TABLE events ENABLE TRIGGER USER")
                    .execute(pool)
                    .await?;
            }
        }
    }
    let rate = |d: Duration| (batches * size) as f64 / d.as_secs_f64();
    println!(
        "ingestion, batches of {size}: {:.0} events/s with the rollup's triggers, {:.0} without ({:.2}× the time)",
        rate(best[0]),
        rate(best[1]),
        best[0].as_secs_f64() / best[1].as_secs_f64()
    );
    Ok(())
}
