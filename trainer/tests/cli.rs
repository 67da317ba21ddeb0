//! `recsys-trainer cf-train` and `evaluate` as a user runs them: files and the real Postgres
//! events table in, a registered model in a local directory and in the real S3 server out;
//! bad input refused with exit code 2 and a message naming the problem.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use recsys_core::artifacts::{LocalDirStore, Registry, S3Store};
use recsys_core::cf::interactions::{Event, EventType};
use recsys_core::events::{EventRow, PostgresEvents};
use recsys_core::stores::{self, ChecksumMode, PostgresArgs, S3Args};
use recsys_tests::TestEnv;

/// Two taste groups of 60 users over 40 items, with a popular item both groups like: CF has
/// structure to find that popularity cannot.
fn write_tastes(path: &Path) {
    let mut f = std::fs::File::create(path).expect("create");
    writeln!(f, "user\titem\tweight").expect("header");
    for u in 0..120 {
        let base = if u < 60 { 0 } else { 20 };
        writeln!(f, "u{u}\tpopular\t1").expect("line");
        for j in 0..20 {
            if (u * 7 + j * 3) % 4 != 0 {
                writeln!(f, "u{u}\ti{}\t{}", base + j, 1 + (u + j) % 3).expect("line");
            }
        }
    }
}

fn trainer() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_recsys-trainer"));
    c.env("RUST_LOG", "warn");
    c
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawn recsys-trainer")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("report")).expect("json")
}

#[tokio::test]
async fn cf_train_registers_a_model_that_beats_popularity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = dir.path().join("events.tsv");
    write_tastes(&events);
    let store = dir.path().join("store");
    let report_path = dir.path().join("report.json");
    let out = run(trainer()
        .args([
            "cf-train",
            "--factors",
            "8",
            "--iterations",
            "10",
            "--alpha",
            "5",
            "--regularization",
            "0.05",
            "--threads",
            "2",
            "--promote",
        ])
        .arg("--events")
        .arg(&events)
        .arg("--store")
        .arg(&store)
        .arg("--report")
        .arg(&report_path));
    assert!(out.status.success(), "{}", text(&out));
    let summary = text(&out);
    assert!(
        summary.contains("metric @10") && summary.contains("popularity"),
        "{summary}"
    );

    let r = report(&report_path);
    assert_eq!(
        (r["users"].as_u64(), r["items"].as_u64()),
        (Some(120), Some(41))
    );
    let (cf, pop) = (
        r["metrics"]["ndcg"].as_f64().unwrap_or(0.0),
        r["baseline"]["ndcg"].as_f64().unwrap_or(1.0),
    );
    assert!(cf > pop, "ALS NDCG@10 {cf} must beat popularity {pop}");

    // The registered champion loads, verified, and personalises.
    let registry = Registry::new(Arc::new(LocalDirStore::new(&store)));
    let loaded = registry
        .load("als", "champion")
        .await
        .expect("load champion");
    assert_eq!(
        Some(loaded.manifest.version.as_str()),
        r["version"].as_str()
    );
    assert_eq!(loaded.model.user_factors.dim(), (120, 8));
    assert!(loaded.manifest.metrics["baseline_popularity"]["ndcg"].is_number());
}

#[tokio::test]
async fn search_records_its_trials_and_uses_the_winner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = dir.path().join("events.tsv");
    write_tastes(&events);
    let report_path = dir.path().join("report.json");
    let out = run(trainer()
        .args([
            "cf-train",
            "--search",
            "--folds",
            "2",
            "--grid-factors",
            "4,8",
            "--grid-regularization",
            "0.05",
            "--grid-alpha",
            "5",
            "--grid-iterations",
            "6",
            "--threads",
            "2",
        ])
        .arg("--events")
        .arg(&events)
        .arg("--store")
        .arg(dir.path().join("store"))
        .arg("--report")
        .arg(&report_path));
    assert!(out.status.success(), "{}", text(&out));
    let r = report(&report_path);
    let trials = r["search"]["trials"].as_array().expect("trials");
    assert_eq!(trials.len(), 2);
    let best = &trials[r["search"]["best"].as_u64().expect("best") as usize];
    assert_eq!(r["params"]["factors"], best["factors"]);
}

#[test]
fn bad_input_exits_2_and_names_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = dir.path().join("events.tsv");
    std::fs::write(&events, "u1\ti1\t1\nu2\ti2\tlots\n").expect("write");
    let store = dir.path().join("store");
    let out = run(trainer()
        .arg("cf-train")
        .arg("--events")
        .arg(&events)
        .arg("--store")
        .arg(&store));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("events.tsv:2:") && text(&out).contains("\"lots\""),
        "{}",
        text(&out)
    );
    assert!(
        !store.join("models").exists(),
        "a failed run leaves nothing that looks like a model"
    );

    std::fs::write(&events, "u1\ti1\t1\n").expect("write");
    let out = run(trainer()
        .arg("cf-train")
        .arg("--events")
        .arg(&events)
        .arg("--store")
        .arg(&store));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("too few interactions"),
        "{}",
        text(&out)
    );
}

#[test]
fn evaluate_on_given_train_and_test_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let train = dir.path().join("train.tsv");
    write_tastes(&train);
    let test = dir.path().join("test.tsv");
    std::fs::write(&test, "u1\ti0\t1\nu70\ti20\t1\nstranger\ti1\t1\n").expect("write");
    let out = run(trainer()
        .args([
            "evaluate",
            "--json",
            "--factors",
            "8",
            "--iterations",
            "10",
            "--alpha",
            "5",
            "--threads",
            "2",
        ])
        .arg("--train")
        .arg(&train)
        .arg("--test")
        .arg(&test));
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["dropped_test_events"], 1);
    assert_eq!(v["model"]["users"], 2);
}

fn s3_args(env: &TestEnv) -> S3Args {
    env.s3_args(ChecksumMode::WhenSupported)
        .expect("S3 options of the test environment")
}

#[tokio::test]
async fn postgres_events_in_s3_registry_out() {
    let env = TestEnv::load().expect("test environment");
    let url = env.var("RECSYS_TEST_DATABASE_URL").expect("db").to_owned();
    let pool = stores::postgres(&PostgresArgs {
        url: url.clone(),
        max_connections: 2,
    })
    .await
    .expect("postgres");
    recsys_core::events::migrate(&pool).await.expect("migrate");
    // A time window of our own keeps other tests' events out.
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_micros()
    );
    let base_ms = 1_500_000_000_000 + (chrono::Utc::now().timestamp_micros() % 1_000_000_000);
    let mut rows = vec![];
    for u in 0..40 {
        for j in 0..8 {
            let item = if u < 20 { j } else { 10 + j };
            let kind = if j % 4 == 0 {
                EventType::Purchase
            } else {
                EventType::View
            };
            rows.push(EventRow {
                event_id: format!("{run_id}-{u}-{j}"),
                event: Event {
                    user: format!("pg-u{u}"),
                    item: format!("pg-i{item}"),
                    kind,
                    ts_ms: Some(base_ms + (u * 10 + j) as i64),
                    value: None,
                },
                category: Some("shoes".into()),
            });
        }
    }
    let events = PostgresEvents::new(pool);
    assert_eq!(
        events.insert(&rows).await.expect("insert"),
        rows.len() as u64
    );
    assert_eq!(
        events.insert(&rows).await.expect("re-insert"),
        0,
        "ingestion is idempotent"
    );

    let from = chrono::DateTime::from_timestamp_millis(base_ms)
        .expect("from")
        .to_rfc3339();
    let to = chrono::DateTime::from_timestamp_millis(base_ms + 1_000)
        .expect("to")
        .to_rfc3339();
    let bucket = env.var("RECSYS_TEST_S3_BUCKET").expect("bucket").to_owned();
    let prefix = format!("trainer-test-{run_id}");
    let s3 = s3_args(&env);
    let dir = tempfile::tempdir().expect("tempdir");
    let report_path: PathBuf = dir.path().join("report.json");
    let out = run(trainer()
        .args([
            "cf-train",
            "--factors",
            "4",
            "--iterations",
            "5",
            "--threads",
            "2",
            "--promote",
            "--s3-force-path-style",
        ])
        .args(["--database-url", &url, "--from", &from, "--to", &to])
        .args(["--store", &format!("s3://{bucket}/{prefix}")])
        .args([
            "--s3-endpoint",
            s3.endpoint.as_deref().unwrap_or_default(),
            "--s3-region",
            &s3.region,
        ])
        .env(
            "AWS_ACCESS_KEY_ID",
            s3.access_key_id.as_deref().unwrap_or_default(),
        )
        .env(
            "AWS_SECRET_ACCESS_KEY",
            s3.secret_access_key.as_deref().unwrap_or_default(),
        )
        .arg("--report")
        .arg(&report_path));
    assert!(out.status.success(), "{}", text(&out));
    let r = report(&report_path);
    assert_eq!(
        (r["users"].as_u64(), r["interactions"].as_u64()),
        (Some(40), Some(320))
    );

    let client = stores::s3(&s3).await.expect("s3");
    let registry = Registry::new(Arc::new(S3Store::new(client.clone(), &bucket, &prefix)));
    let loaded = registry
        .load("als", "champion")
        .await
        .expect("load from S3");
    assert_eq!(loaded.users.len(), 40);
    assert_eq!(
        loaded.manifest.data.time_range.map(|(a, _)| a),
        Some(base_ms)
    );
    // Clean up the bucket.
    let listed = client
        .list_objects_v2()
        .bucket(&bucket)
        .prefix(&prefix)
        .send()
        .await
        .expect("list");
    for o in listed.contents() {
        if let Some(k) = o.key() {
            client
                .delete_object()
                .bucket(&bucket)
                .key(k)
                .send()
                .await
                .expect("delete");
        }
    }
}

/// `--compare-to`: a second version compared with the first on NDCG@10, passing or not by
/// `--min-metric-ratio`; a version the registry never had is nothing to compare with. The run
/// summary (the Pod's termination message) carries the comparison and the version.
#[test]
fn versions_compare_with_a_registered_one_and_the_summary_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = dir.path().join("events.tsv");
    write_tastes(&events);
    let store = dir.path().join("store");
    let train = |extra: &[&str], name: &str| {
        let report_path = dir.path().join(format!("{name}.json"));
        let summary_path = dir.path().join(format!("{name}.summary"));
        let out = run(trainer()
            .args([
                "cf-train",
                "--factors",
                "8",
                "--iterations",
                "10",
                "--alpha",
                "5",
                "--threads",
                "2",
            ])
            .args(extra)
            .arg("--events")
            .arg(&events)
            .arg("--store")
            .arg(&store)
            .arg("--report")
            .arg(&report_path)
            .env(recsys_core::runs::SUMMARY_PATH_ENV, &summary_path));
        assert!(out.status.success(), "{}", text(&out));
        let summary = std::fs::read_to_string(&summary_path).expect("summary written");
        assert!(summary.len() <= recsys_core::runs::MAX_BYTES);
        let summary = recsys_core::runs::RunSummary::parse(&summary).expect("a summary");
        (report(&report_path), summary, text(&out))
    };
    let (first, s1, _) = train(&[], "first");
    let v1 = first["version"].as_str().expect("version").to_owned();
    assert_eq!(s1.version.as_deref(), Some(v1.as_str()));
    assert!(s1.succeeded && s1.metrics["ndcg@10"] > 0.0, "{s1:?}");
    assert_eq!(s1.comparison, None);

    // The same data and settings: the same NDCG, ratio 1.
    let (_, same, printed) = train(&["--compare-to", &v1, "--min-metric-ratio", "0.98"], "same");
    let c = same.comparison.expect("compared");
    assert_eq!(
        (c.against.as_str(), c.metric.as_str()),
        (v1.as_str(), "ndcg@10")
    );
    assert_eq!(c.against_value, Some(s1.metrics["ndcg@10"]));
    assert!(
        c.passes && (c.ratio().expect("ratio") - 1.0).abs() < 1e-9,
        "{c:?}"
    );
    assert!(
        printed.contains("compared") && printed.contains("(passes)"),
        "{printed}"
    );

    // A much worse model does not pass; it is registered all the same.
    let (worse, w, _) = train(
        &[
            "--regularization",
            "100000",
            "--compare-to",
            &v1,
            "--min-metric-ratio",
            "0.98",
        ],
        "worse",
    );
    let c = w.comparison.expect("compared");
    assert!(!c.passes && c.ratio().expect("ratio") < 0.98, "{c:?}");
    assert!(worse["version"].is_string(), "registered anyway");

    // A placeholder version: nothing to compare with, passes, says why.
    let (_, p, _) = train(
        &["--compare-to", "bootstrap", "--min-metric-ratio", "0.98"],
        "placeholder",
    );
    let c = p.comparison.expect("compared");
    assert!(
        c.passes
            && c.note
                .as_deref()
                .is_some_and(|n| n.contains("not registered")),
        "{c:?}"
    );
}

#[test]
fn help_never_shows_a_credential_from_the_environment() {
    for job in [
        "popularity",
        "cf-train",
        "backfill",
        "data-quality",
        "evaluate",
    ] {
        let out = run(trainer()
            .args([job, "--help"])
            .env(
                "RECSYS_DATABASE_URL",
                "postgres://recsys:hunter22@db/recsys",
            )
            .env("RECSYS_REDIS_URL", "redis://:hunter22@cache:6379/0")
            .env("AWS_SECRET_ACCESS_KEY", "hunter22"));
        let t = text(&out);
        assert!(out.status.success(), "{job} --help: {t}");
        assert!(
            job == "evaluate" || t.contains("RECSYS_DATABASE_URL"),
            "{job}: the option is documented: {t}"
        );
        assert!(
            !t.contains("hunter22"),
            "{job} --help shows a credential:\n{t}"
        );
    }
}
