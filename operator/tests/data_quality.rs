//! Data quality against real data: four weeks of seasonal events (hour of day, day of week) in
//! the test Postgres, then the seed's known issues injected one at a time into a copy of them:
//! a dropped column, a stale stream, a burst of null product ids, a 5× volume spike, an 80% drop
//! of purchases, and a shifted feature distribution. For each: the checks of the `data-quality`
//! job fire (judged every few minutes after the fault starts, "as of" that time), the gates hold
//! (cf-train publishes no model, the feature job writes no values), and the alert rules fire on
//! the metrics the operator records from the run. The clean weeks, judged every six hours,
//! raise no alarm. The detection table is printed.

use std::time::Instant;

use chrono::{DateTime, Datelike, Timelike, Utc};
use clap::Parser;
use rand::{RngExt as _, SeedableRng as _};
use recsys_core::artifacts::{ArtifactStore, LocalDirStore};
use recsys_core::features::offline::{OfflineStore, PitOptions, PostgresOfflineStore};
use recsys_core::features::registry::{FeatureRegistry, PostgresFeatureRegistry, QualityPolicy};
use recsys_core::features::{EntityKind, FeatureRef, defaults};
use recsys_core::quality::{QualitySummary, ViolatedCheck};
use recsys_core::runs::RunSummary;
use recsys_tests::TestEnv;
use recsys_trainer::Cli;
use sqlx::PgPool;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
const TYPES: [&str; 4] = ["view", "click", "add_to_cart", "purchase"];

/// When the faults start: the latest Tuesday 13:00 UTC at least two days ago (a busy hour, and
/// every simulated check time is in the past, so nothing counts as future-dated).
fn t0() -> i64 {
    let mut t = Utc::now() - chrono::Duration::days(2);
    while t.weekday() != chrono::Weekday::Tue {
        t -= chrono::Duration::days(1);
    }
    let t = t
        .with_hour(13)
        .and_then(|t| t.with_minute(0))
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_nanosecond(0))
        .expect("13:00");
    t.timestamp_millis()
}

fn rfc(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .expect("time")
        .to_rfc3339()
}

/// Mean events an hour of each type: a daily curve (quiet nights, an evening peak), busier
/// weekends.
fn rates(hour_ms: i64) -> [f64; 4] {
    let t = DateTime::<Utc>::from_timestamp_millis(hour_ms).expect("time");
    let h = f64::from(t.hour());
    let daily = 0.15 + 0.85 * (((h - 4.0) / 24.0 * std::f64::consts::TAU - 1.9).sin() * 0.5 + 0.5);
    let weekly = if t.weekday().number_from_monday() >= 6 {
        1.3
    } else {
        1.0
    };
    let base = [300.0, 120.0, 40.0, 30.0];
    base.map(|b| b * daily * weekly)
}

fn poisson(rng: &mut rand_chacha::ChaCha8Rng, lambda: f64) -> u64 {
    if lambda > 50.0 {
        // Normal approximation.
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        return (lambda + z * lambda.sqrt()).round().max(0.0) as u64;
    }
    let l = (-lambda).exp();
    let (mut k, mut p) = (0, 1.0);
    loop {
        p *= rng.random::<f64>();
        if p <= l {
            return k;
        }
        k += 1;
    }
}

/// One event as inserted (`product` `None`: a null product id).
struct Row {
    id: String,
    user: String,
    product: Option<String>,
    kind: &'static str,
    at_ms: i64,
    category: String,
}

/// Events of `[from, to)`, each hour's rates multiplied by `scale(hour, type)`; `tag` keeps ids
/// unique across calls.
fn stream(
    from_ms: i64,
    to_ms: i64,
    seed: u64,
    tag: &str,
    scale: impl Fn(i64, &str) -> f64,
) -> Vec<Row> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = vec![];
    let mut hour = from_ms;
    while hour < to_ms {
        let end = (hour + HOUR).min(to_ms);
        let part = (end - hour) as f64 / HOUR as f64;
        for (kind, rate) in TYPES.iter().zip(rates(hour)) {
            let n = poisson(&mut rng, rate * part * scale(hour, kind));
            for _ in 0..n {
                // Popularity is heavy-tailed, as in any shop: a few products take most events.
                let product = (500.0 * rng.random::<f64>().powf(2.5)) as u32;
                out.push(Row {
                    id: format!("{tag}-{}", out.len()),
                    user: format!("u{}", rng.random_range(0..3000_u32)),
                    product: Some(format!("p{product}")),
                    kind,
                    at_ms: hour + rng.random_range(0..(end - hour)),
                    category: format!("c{}", product % 12),
                });
            }
        }
        hour = end;
    }
    out
}

/// Inserts rows as an ingestion pipeline would: received a second after they happened.
async fn insert(pool: &PgPool, rows: &[Row]) {
    for chunk in rows.chunks(20_000) {
        let col = |f: &dyn Fn(&Row) -> String| chunk.iter().map(f).collect::<Vec<_>>();
        let at: Vec<DateTime<Utc>> = chunk
            .iter()
            .map(|r| DateTime::from_timestamp_millis(r.at_ms).expect("time"))
            .collect();
        let ingested: Vec<DateTime<Utc>> = chunk
            .iter()
            .map(|r| DateTime::from_timestamp_millis(r.at_ms + 1000).expect("time"))
            .collect();
        sqlx::query(
            "INSERT INTO events (event_id, user_id, product_id, event_type, occurred_at, category, ingested_at)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::timestamptz[])",
        )
        .bind(col(&|r| r.id.clone()))
        .bind(col(&|r| r.user.clone()))
        .bind(chunk.iter().map(|r| r.product.clone()).collect::<Vec<_>>())
        .bind(col(&|r| r.kind.to_owned()))
        .bind(at)
        .bind(col(&|r| r.category.clone()))
        .bind(ingested)
        .execute(pool)
        .await
        .expect("insert events");
    }
}

async fn pool(url: &str) -> PgPool {
    recsys_core::stores::postgres(&recsys_core::stores::PostgresArgs {
        url: url.to_owned(),
        max_connections: 2,
    })
    .await
    .expect("postgres")
}

/// A copy of the database `template` (Postgres `CREATE DATABASE … TEMPLATE`).
async fn copy_of(env: &TestEnv, template: &str, name: &str) -> String {
    use sqlx::Connection as _;
    let admin = env.var("RECSYS_TEST_DATABASE_URL").expect("url");
    let mut conn = sqlx::PgConnection::connect(admin).await.expect("connect");
    let db = format!("{template}_{name}");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {db} TEMPLATE {template}"
    )))
    .execute(&mut conn)
    .await
    .expect("copy database");
    let (base, _) = admin.rsplit_once('/').expect("url");
    format!("{base}/{db}")
}

/// Runs a trainer job as its pod would; the run summary, and the exit code.
async fn trainer(args: &[&str]) -> (RunSummary, i32) {
    let cli = Cli::try_parse_from(std::iter::once("recsys-trainer").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    match recsys_trainer::run(&cli.job).await {
        Ok(s) => (s, 0),
        Err(e) => (
            recsys_trainer::failure_summary(&cli.job, &e, 0.0),
            e.exit_code(),
        ),
    }
}

fn violations(s: &RunSummary) -> Vec<ViolatedCheck> {
    s.quality
        .as_ref()
        .map(|q| q.violations.clone())
        .unwrap_or_default()
}

fn blocking(s: &RunSummary) -> Vec<String> {
    violations(s)
        .into_iter()
        .filter(|v| v.blocking)
        .map(|v| v.check)
        .collect()
}

/// The data-quality job on `db` as of `at_ms`.
async fn data_quality(db: &str, at_ms: i64, extra: &[&str]) -> (RunSummary, i32) {
    let at = rfc(at_ms);
    let mut args = vec![
        "data-quality",
        "--database-url",
        db,
        "--at",
        &at,
        "--no-drift",
    ];
    args.extend_from_slice(extra);
    trainer(&args).await
}

/// The alerts the shipped rules fire on the metrics the operator records from `summary`.
async fn alerts(summary: &RunSummary, at_ms: i64) -> Vec<String> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let metrics = recsys_operator::metrics::Metrics::default();
    let t = |ms: i64| Time(k8s_openapi::jiff::Timestamp::from_millisecond(ms).expect("time"));
    let run = recsys_crds::batch_job::JobRun {
        job_name: "data-quality-1".into(),
        trigger: Default::default(),
        started_at: t(at_ms),
        // Finished now: the rules' staleness alert judges real time.
        finished_at: Some(t(Utc::now().timestamp_millis())),
        outcome: if summary.succeeded {
            recsys_crds::batch_job::RunOutcome::Succeeded
        } else {
            recsys_crds::batch_job::RunOutcome::Failed
        },
        attempts: 1,
        reason: String::new(),
        duration_seconds: None,
        events: None,
        rows: None,
        version: None,
        consumed: vec![],
        hand_off: None,
        data_quality: None,
    };
    metrics.data_quality("shop", "data-quality", &run, summary);
    let text = metrics.encode().expect("encode");
    let rules =
        recsys_tests::repo_root().join("charts/recsys/files/alerts/data-quality.rules.yaml");
    recsys_tests::monitoring::firing_alerts(&rules, text, std::time::Duration::from_secs(30))
        .await
        .expect("prometheus")
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// One fault: how it is injected, and when it starts.
struct Fault {
    name: &'static str,
    /// The checks expected to fire.
    expect: &'static [&'static str],
    /// The alert expected to fire.
    alert: &'static str,
}

/// Minutes after the fault's start at which the checks are run.
const CHECK_AFTER_MIN: [i64; 7] = [5, 10, 15, 30, 45, 60, 90];

#[tokio::test]
async fn faults_injected_into_real_events_are_caught_and_held() {
    let env = TestEnv::load().expect("test environment");
    let started = Instant::now();
    let t0 = t0();
    // ---- four clean weeks, once, as the template of every scenario.
    let base_url = env.fresh_database("dq").await.expect("database");
    let base = base_url.rsplit('/').next().expect("name").to_owned();
    {
        let p = pool(&base_url).await;
        recsys_core::events::migrate(&p).await.expect("migrate");
        let history = stream(t0 - 28 * DAY, t0, 1, "h", |_, _| 1.0);
        let n = history.len();
        insert(&p, &history).await;
        let registry = PostgresFeatureRegistry::new(p.clone());
        for spec in defaults::specs() {
            registry.register(&spec).await.expect("register");
        }
        p.close().await;
        println!(
            "four weeks of seasonal events: {n} rows in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }

    // ---- the clean weeks raise no alarm: judged every 6 hours over the last two weeks
    // (the volume baseline needs two), and after t0 on the clean continuation.
    let clean = copy_of(&env, &base, "clean").await;
    {
        let p = pool(&clean).await;
        insert(&p, &stream(t0, t0 + 2 * HOUR, 2, "c", |_, _| 1.0)).await;
        p.close().await;
    }
    let mut false_alarms = vec![];
    let mut judged = 0;
    let mut times: Vec<i64> = (0..56)
        .map(|i| t0 - 14 * DAY + i * 6 * HOUR + 17 * MIN)
        .collect();
    times.extend(CHECK_AFTER_MIN.iter().map(|m| t0 + m * MIN));
    let mut clean_summary = None;
    for at in times {
        let (s, code) = data_quality(&clean, at, &[]).await;
        judged += 1;
        if code != 0 || !violations(&s).is_empty() {
            false_alarms.push(format!("{}: {:?}", rfc(at), violations(&s)));
        }
        clean_summary = Some(s);
    }
    let clean_summary = clean_summary.expect("a clean run");
    // Every check was judged, none skipped for want of data (volume included).
    let q: &QualitySummary = clean_summary.quality.as_ref().expect("quality");
    assert!(
        q.checks["volume"].get("pass").copied().unwrap_or(0) >= 5,
        "{q:?}"
    );
    let clean_alerts = alerts(&clean_summary, t0 + 90 * MIN).await;

    // ---- the faults.
    let faults = [
        Fault {
            name: "dropped column",
            expect: &["schema"],
            alert: "DataQualitySchemaMismatch",
        },
        Fault {
            name: "stale stream (no events for 30 min)",
            expect: &["freshness"],
            alert: "DataQualityEventsStale",
        },
        Fault {
            name: "burst of null product ids",
            expect: &["completeness.product_id"],
            alert: "DataQualityIncompleteEvents",
        },
        Fault {
            name: "5× volume spike",
            expect: &["volume.total"],
            alert: "DataQualityVolumeAnomaly",
        },
        Fault {
            name: "80% drop of purchases",
            expect: &["volume.purchase"],
            alert: "DataQualityVolumeAnomaly",
        },
    ];
    let mut table = vec![];
    for (i, fault) in faults.iter().enumerate() {
        let db = copy_of(&env, &base, &format!("f{i}")).await;
        let p = pool(&db).await;
        // A clean materialization before the fault: the values a held job must not replace.
        let artifacts = tempfile::tempdir().expect("dir");
        let store = artifacts.path().to_str().expect("path").to_owned();
        let redis = env.var("RECSYS_TEST_REDIS_URL").expect("redis").to_owned();
        let prefix = format!("dq{}{i}", std::process::id());
        let feature_job = |at: i64| {
            let (db, store, redis, prefix) =
                (db.clone(), store.clone(), redis.clone(), prefix.clone());
            async move {
                let at = rfc(at);
                trainer(&[
                    "popularity",
                    "--database-url",
                    &db,
                    "--redis-url",
                    &redis,
                    "--redis-prefix",
                    &prefix,
                    "--store",
                    &store,
                    "--at",
                    &at,
                ])
                .await
            }
        };
        let (before, code) = feature_job(t0 - HOUR).await;
        assert_eq!(
            code, 0,
            "{}: the clean run before the fault: {before:?}",
            fault.name
        );
        // The fault, from t0.
        let normal = |seed| stream(t0, t0 + 2 * HOUR, seed, "a", |_, _| 1.0);
        match i {
            0 => {
                // The stream goes on; a column is dropped by hand.
                insert(&p, &normal(3)).await;
                sqlx::query("ALTER TABLE events DROP COLUMN category")
                    .execute(&p)
                    .await
                    .expect("drop column");
            }
            // Nothing after t0.
            1 => {}
            2 => {
                sqlx::query("ALTER TABLE events ALTER COLUMN product_id DROP NOT NULL")
                    .execute(&p)
                    .await
                    .expect("drop not null");
                let mut rows = normal(4);
                // A client release logs 30% of its events without a product for 20 minutes.
                for (j, r) in rows.iter_mut().enumerate() {
                    if r.at_ms < t0 + 20 * MIN && j % 10 < 3 {
                        r.product = None;
                    }
                }
                insert(&p, &rows).await;
            }
            3 => insert(&p, &stream(t0, t0 + 2 * HOUR, 5, "s", |_, _| 5.0)).await,
            _ => {
                let rows = stream(t0, t0 + 2 * HOUR, 6, "d", |_, k| {
                    if k == "purchase" { 0.2 } else { 1.0 }
                });
                insert(&p, &rows).await;
            }
        }
        // Judged every few minutes after t0, as the hourly job would at those times.
        let mut detected = None;
        for m in CHECK_AFTER_MIN {
            let (s, code) = data_quality(&db, t0 + m * MIN, &[]).await;
            let fired = blocking(&s);
            if fault.expect.iter().all(|e| fired.iter().any(|f| f == e)) {
                assert_eq!(
                    code,
                    recsys_core::exit::GATE_FAILED,
                    "{}: {s:?}",
                    fault.name
                );
                detected = Some((m, fired, s));
                break;
            }
        }
        let Some((minutes, fired, summary)) = detected else {
            panic!(
                "{}: not detected within {} minutes",
                fault.name, CHECK_AFTER_MIN[6]
            );
        };
        let at = t0 + minutes * MIN;
        // The gates hold: cf-train trains nothing, the feature job writes nothing.
        let models = tempfile::tempdir().expect("dir");
        let to = rfc(at);
        let (cf, cf_code) = trainer(&[
            "cf-train",
            "--database-url",
            &db,
            "--to",
            &to,
            "--store",
            models.path().to_str().expect("path"),
            "--factors",
            "8",
            "--iterations",
            "3",
        ])
        .await;
        assert_eq!(
            cf_code,
            recsys_core::exit::GATE_FAILED,
            "{}: {cf:?}",
            fault.name
        );
        assert_eq!(cf.error_kind.as_deref(), Some("DataQualityGate"));
        assert!(
            LocalDirStore::new(models.path())
                .list("")
                .await
                .expect("list")
                .is_empty(),
            "{}: cf-train published nothing",
            fault.name
        );
        let (pop, pop_code) = feature_job(at).await;
        assert_eq!(
            pop_code,
            recsys_core::exit::GATE_FAILED,
            "{}: {pop:?}",
            fault.name
        );
        let offline = PostgresOfflineStore::new(p.clone());
        let feature = FeatureRef::new("popularity_score", 1);
        let written = offline
            .snapshot(
                &feature,
                EntityKind::Product,
                at,
                &PitOptions {
                    max_age_ms: Some(0),
                    ..Default::default()
                },
            )
            .await
            .expect("snapshot");
        assert!(
            written.is_empty(),
            "{}: no values at the held time",
            fault.name
        );
        let registry = PostgresFeatureRegistry::new(p.clone());
        let last = registry
            .last_materialization(&feature)
            .await
            .expect("registry")
            .expect("the clean run");
        assert_eq!(
            last.at_ms,
            t0 - HOUR,
            "{}: the last run is the clean one",
            fault.name
        );
        let fired_alerts = alerts(&summary, at).await;
        assert!(
            fired_alerts.iter().any(|a| a == fault.alert),
            "{}: {} did not fire; fired {fired_alerts:?}",
            fault.name,
            fault.alert
        );
        table.push((
            fault.name,
            fired.join(", "),
            minutes,
            fired_alerts.join(", "),
        ));
        p.close().await;
    }

    // ---- a shifted feature distribution: for the last five days a tracking bug logs most
    // events against one placeholder product. The events pass their checks (volume, types and
    // fields are as usual); popularity_score, scaled by its maximum, does not.
    let db = copy_of(&env, &base, "drift").await;
    let p = pool(&db).await;
    let artifacts = tempfile::tempdir().expect("dir");
    let store = artifacts.path().to_str().expect("path").to_owned();
    let popularity = |at: i64, extra: &'static [&'static str]| {
        let (db, store) = (db.clone(), store.clone());
        async move {
            let at = rfc(at);
            let mut args = vec![
                "popularity",
                "--database-url",
                &db,
                "--store",
                &store,
                "--at",
                &at,
                "--drift-reference",
                "21d",
            ];
            args.extend_from_slice(extra);
            let redis = env_redis();
            let prefix = format!("dqdrift{}", std::process::id());
            args.extend(["--redis-url", leak(redis), "--redis-prefix", leak(prefix)]);
            trainer(&args).await
        }
    };
    for d in [10, 8, 6] {
        let (s, code) = popularity(t0 - d * DAY, &[]).await;
        assert_eq!(code, 0, "reference run {d} days before: {s:?}");
    }
    sqlx::query(
        "UPDATE events SET product_id = 'p499'
         WHERE occurred_at >= $1 AND abs(hashtext(event_id)) % 10 < 8",
    )
    .bind(DateTime::<Utc>::from_timestamp_millis(t0 - 5 * DAY).expect("time"))
    .execute(&p)
    .await
    .expect("relabel");
    let (held, code) = popularity(t0, &[]).await;
    assert_eq!(
        code,
        recsys_core::exit::GATE_FAILED,
        "drift holds the feature job: {held:?}"
    );
    let fired = blocking(&held);
    assert!(fired.iter().any(|c| c.starts_with("drift.")), "{held:?}");
    let registry = PostgresFeatureRegistry::new(p.clone());
    let feature = FeatureRef::new("popularity_score", 1);
    assert_eq!(
        registry
            .last_materialization(&feature)
            .await
            .expect("registry")
            .expect("runs")
            .at_ms,
        t0 - 6 * DAY,
        "the held values were not recorded"
    );
    // With `onQualityFailure: warn` (a new patch version), the values are published and the
    // data-quality job's drift check reports them.
    let mut spec = registry
        .get(
            "popularity_score",
            &recsys_core::features::registry::VersionSelector::Latest,
        )
        .await
        .expect("registry")
        .expect("registered")
        .spec;
    spec.version = "1.0.1".into();
    spec.on_quality_failure = Some(QualityPolicy::Warn);
    registry.register(&spec).await.expect("register 1.0.1");
    let (published, code) = popularity(t0, &[]).await;
    assert_eq!(code, 0, "warn publishes: {published:?}");
    let (dq, code) = trainer(&[
        "data-quality",
        "--database-url",
        &db,
        "--at",
        &rfc(t0),
        "--drift-reference",
        "11d",
        "--feature",
        "popularity_score",
    ])
    .await;
    let drift_fired = blocking(&dq);
    assert_eq!(code, recsys_core::exit::GATE_FAILED, "{dq:?}");
    assert!(
        drift_fired.iter().any(|c| c.starts_with("drift.")),
        "{dq:?}"
    );
    let drift_alerts = alerts(&dq, t0).await;
    assert!(
        drift_alerts.iter().any(|a| a == "DataQualityFeatureDrift"),
        "{drift_alerts:?}"
    );
    table.push((
        "shifted feature distribution",
        format!(
            "{} (feature job held); {}",
            fired.join(", "),
            drift_fired.join(", ")
        ),
        0,
        drift_alerts.join(", "),
    ));
    p.close().await;

    println!(
        "\nfault                                  | checks fired (blocking)              | detected after | alerts"
    );
    println!("{}", "-".repeat(120));
    for (name, fired, minutes, alerts) in &table {
        println!("{name:38} | {fired:36} | {minutes:>11} min | {alerts}");
    }
    println!(
        "clean data: {judged} runs of every check, {} false alarm(s); alerts on clean metrics: {clean_alerts:?}",
        false_alarms.len()
    );
    println!("(in {:.0}s)", started.elapsed().as_secs_f64());
    assert!(
        false_alarms.is_empty(),
        "false alarms on clean data: {false_alarms:#?}"
    );
    let check_alerts: Vec<&String> = clean_alerts
        .iter()
        .filter(|a| a.as_str() != "DataQualityChecksNotRunning")
        .collect();
    assert!(
        check_alerts.is_empty(),
        "alerts on clean data: {check_alerts:?}"
    );
}

fn env_redis() -> String {
    TestEnv::load()
        .and_then(|e| e.var("RECSYS_TEST_REDIS_URL").map(str::to_owned))
        .expect("redis")
}

/// A string that lives for the test (argument lists of `&str`).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}
