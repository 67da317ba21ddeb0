//! The routing table: the distribution and stability of user assignment, and the file source
//! picking up replacements (atomic rename, ConfigMap symlink swap) while refusing bad edits.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use prometheus_client::registry::Registry;
use recsys_core::serving::routing::{
    FileRoutingOptions, FileRoutingSource, RoutingError, RoutingFormat, RoutingMetrics,
    RoutingSource, RoutingTable, Variant, bucket,
};

const USERS: usize = 100_000;
/// Poll interval of the file sources under test.
const POLL: Duration = Duration::from_millis(50);
/// Bound on how long a change may take to serve (many polls, for a loaded CI machine).
const WITHIN: Duration = Duration::from_secs(10);

fn table(text: &str) -> RoutingTable {
    match RoutingTable::parse(text, RoutingFormat::Yaml, "test") {
        Ok(t) => t,
        Err(e) => panic!("test table is invalid: {e}"),
    }
}

/// A table routing `als` to canary `v2` at `weight` percent, with an optional salt.
fn split(weight: u8, salt: Option<&str>) -> RoutingTable {
    let salt = salt.map(|s| format!(", salt: {s}")).unwrap_or_default();
    table(&format!(
        "formatVersion: 1\nmodels: {{als: {{stable: v1, canary: {{version: v2, weight: {weight}}}{salt}}}}}"
    ))
}

fn user_ids() -> impl Iterator<Item = String> {
    (0..USERS).map(|i| format!("user-{i}"))
}

fn canary_share(t: &RoutingTable, ids: impl Iterator<Item = String>) -> f64 {
    let route = t.route("als").expect("als is routed");
    let (mut canary, mut all) = (0usize, 0usize);
    for id in ids {
        all += 1;
        if route.assign(Some(&id)).variant == Variant::Canary {
            canary += 1;
        }
    }
    canary as f64 / all as f64
}

#[test]
fn canary_share_is_within_one_percent_of_the_weight() {
    for weight in [1u8, 5, 10, 25, 50, 90] {
        let t = split(weight, None);
        // Two id shapes: prefixed strings and bare integers (the usual database ids).
        for (shape, share) in [
            ("user-<n>", canary_share(&t, user_ids())),
            ("<n>", canary_share(&t, (0..USERS).map(|i| i.to_string()))),
        ] {
            let expected = f64::from(weight) / 100.0;
            assert!(
                (share - expected).abs() <= 0.01,
                "weight {weight}%, ids {shape}: {:.3}% of {USERS} users on the canary",
                share * 100.0
            );
        }
    }
}

#[test]
fn growing_the_weight_only_moves_users_from_stable_to_canary() {
    let tables: Vec<RoutingTable> = (0..=100).map(|w| split(w, None)).collect();
    for id in user_ids().take(10_000) {
        let b = bucket("als", &id);
        let mut was_canary = false;
        for (weight, t) in tables.iter().enumerate() {
            let a = t.assign("als", Some(&id)).expect("routed");
            let canary = a.variant == Variant::Canary;
            assert!(
                !was_canary || canary,
                "{id} went back to stable at weight {weight}"
            );
            // Exactly the users below the threshold are on the canary.
            assert_eq!(
                canary,
                u32::from(b) < weight as u32 * 100,
                "{id} at {weight}"
            );
            assert_eq!(a.version, if canary { "v2" } else { "v1" });
            was_canary = canary;
        }
        assert!(was_canary, "{id} is on the canary at weight 100");
    }
}

#[test]
fn a_user_keeps_their_variant_across_calls_and_tables() {
    let yaml = split(37, None);
    let json = RoutingTable::parse(
        r#"{"formatVersion": 1, "revision": "other", "models": {"als": {"stable": "v1",
            "canary": {"version": "v2", "weight": 37}, "salt": "als"}}}"#,
        RoutingFormat::Json,
        "test.json",
    )
    .expect("valid");
    let route = yaml.route("als").expect("als");
    for id in user_ids().take(20_000) {
        let first = route.assign(Some(&id));
        assert_eq!(route.assign(Some(&id)), first, "{id} changed between calls");
        assert_eq!(
            json.assign("als", Some(&id)),
            Some(first),
            "{id} differs between two tables with the same salt and weight"
        );
    }
    // Pinned: `bucket("als", "user-1") == 7255` (see the unit tests), so user-1 joins the
    // canary at weight 73 and not before, in every process on every platform.
    assert_eq!(bucket("als", "user-1"), 7255);
    let at = |w| {
        let a = split(w, None)
            .assign("als", Some("user-1"))
            .map(|a| (a.variant, a.bucket));
        a.expect("routed")
    };
    assert_eq!(at(72), (Variant::Stable, Some(7255)));
    assert_eq!(at(73), (Variant::Canary, Some(7255)));
}

#[test]
fn a_different_salt_reshuffles_users() {
    let a = split(50, Some("als-a"));
    let b = split(50, Some("als-b"));
    let (ra, rb) = (a.route("als").expect("als"), b.route("als").expect("als"));
    let mut same = 0usize;
    let mut same_bucket = 0usize;
    for id in user_ids() {
        let (x, y) = (ra.assign(Some(&id)), rb.assign(Some(&id)));
        same += usize::from(x.variant == y.variant);
        same_bucket += usize::from(x.bucket == y.bucket);
    }
    // Independent halves agree for about half of the users.
    let agreement = same as f64 / USERS as f64;
    assert!(
        (agreement - 0.5).abs() <= 0.02,
        "{:.2}% keep their variant under a new salt; expected about 50%",
        agreement * 100.0
    );
    // About 1 in 10 000 keep their bucket by chance.
    assert!(same_bucket < 50, "{same_bucket} users kept their bucket");
}

// ------------------------------------------------------------------------------------------
// The file source

fn metrics() -> (RoutingMetrics, Registry) {
    let metrics = RoutingMetrics::new();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    (metrics, registry)
}

fn scrape(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode metrics");
    text
}

fn options(metrics: &RoutingMetrics) -> FileRoutingOptions {
    FileRoutingOptions {
        poll_interval: POLL,
        metrics: metrics.clone(),
    }
}

fn doc(revision: &str, weight: u8) -> String {
    format!(
        "formatVersion: 1\nrevision: {revision}\nmodels:\n  als:\n    stable: v1\n    canary: {{version: v2, weight: {weight}}}\n"
    )
}

/// Writes `text` to a temporary file next to `path` and renames it over `path`.
fn replace_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

async fn within<F: Future<Output = Result<()>>>(what: &str, f: F) -> Result<()> {
    tokio::time::timeout(WITHIN, f)
        .await
        .with_context(|| format!("{what}: not within {WITHIN:?}"))?
}

/// Waits until the source serves the table of `revision`, seen through a subscription.
/// A file source over `<a new temporary directory>/<name>`, which holds `doc("r1", 10)`.
async fn watched(name: &str) -> Result<(tempfile::TempDir, PathBuf, FileRoutingSource, Registry)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(name);
    std::fs::write(&path, doc("r1", 10))?;
    let (m, registry) = metrics();
    let source = FileRoutingSource::start(&path, options(&m)).await?;
    Ok((dir, path, source, registry))
}

async fn serves(source: &FileRoutingSource, revision: &str) -> Result<()> {
    let mut changes = source.subscribe();
    within(&format!("serving {revision}"), async {
        loop {
            if changes.borrow_and_update().revision() == revision {
                ensure!(source.current().revision() == revision, "current() lags");
                return Ok(());
            }
            changes.changed().await?;
        }
    })
    .await
}

/// Waits until `registry` shows `line`.
async fn shows(registry: &Registry, line: &str) -> Result<()> {
    within(&format!("metrics showing {line}"), async {
        loop {
            if scrape(registry).contains(line) {
                return Ok(());
            }
            tokio::time::sleep(POLL / 2).await;
        }
    })
    .await
}

#[tokio::test]
async fn a_missing_or_invalid_file_at_start_is_an_error_naming_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (m, registry) = metrics();

    let missing = dir.path().join("nope.yaml");
    let Err(e) = FileRoutingSource::start(&missing, options(&m)).await else {
        bail!("a missing file started");
    };
    assert_eq!(e.kind(), "Unreadable");
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );

    let invalid = dir.path().join("routing.yaml");
    std::fs::write(&invalid, doc("r1", 120))?;
    let Err(e) = FileRoutingSource::start(&invalid, options(&m)).await else {
        bail!("an invalid file started");
    };
    assert!(matches!(e, RoutingError::Invalid { .. }), "{e:?}");
    let message = e.to_string();
    assert!(
        message.contains(&invalid.display().to_string()),
        "{message}"
    );
    assert!(
        message.contains("models.als.canary.weight: 120 is above 100"),
        "{message}"
    );

    let typo = dir.path().join("routing.json");
    std::fs::write(&typo, r#"{"formatVersion": 1, "modles": {}}"#)?;
    let Err(e) = FileRoutingSource::start(&typo, options(&m)).await else {
        bail!("a file with an unknown field started");
    };
    assert_eq!(e.kind(), "Unparsable");
    assert!(e.to_string().contains("unknown field `modles`"), "{e}");

    let huge = dir.path().join("huge.yaml");
    std::fs::write(&huge, " ".repeat(2 << 20))?;
    let Err(e) = FileRoutingSource::start(&huge, options(&m)).await else {
        bail!("a 2 MiB file started");
    };
    assert_eq!(e.kind(), "TooLarge");

    let text = scrape(&registry);
    assert!(
        text.contains("routing_table_reload_failures_total{kind=\"Invalid\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("routing_table_reloads_total{outcome=\"failed\"} 4"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn an_atomic_rename_is_picked_up() -> Result<()> {
    let (_dir, path, source, registry) = watched("routing.yaml").await?;
    assert_eq!(source.current().revision(), "r1");
    assert_eq!(source.path(), path);

    replace_atomically(&path, &doc("r2", 20))?;
    serves(&source, "r2").await?;
    assert_eq!(
        source.current().route("als").expect("als").canary_weight(),
        20
    );
    let text = scrape(&registry);
    assert!(
        text.contains("routing_table_info{revision=\"r2\"} 1"),
        "{text}"
    );
    assert!(!text.contains("revision=\"r1\""), "{text}");
    assert!(
        text.contains("routing_table_reloads_total{outcome=\"ok\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("routing_canary_weight_percent{model=\"als\"} 20"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn an_in_place_edit_of_the_same_length_is_picked_up() -> Result<()> {
    // Same length, written within the same second: metadata alone would not tell them apart.
    let (_dir, path, source, _registry) = watched("routing").await?;
    std::fs::write(&path, doc("r2", 20))?;
    serves(&source, "r2").await?;
    assert_eq!(
        source.current().route("als").expect("als").canary_weight(),
        20
    );
    Ok(())
}

/// Lays out a directory like a ConfigMap volume: `routing.yaml -> ..data/routing.yaml`,
/// `..data -> ..<timestamp>/`.
#[cfg(unix)]
fn configmap_version(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let version = dir.join(name);
    std::fs::create_dir(&version)?;
    std::fs::write(version.join("routing.yaml"), text)?;
    Ok(version)
}

#[cfg(unix)]
#[tokio::test]
async fn a_configmap_symlink_swap_is_picked_up() -> Result<()> {
    use std::os::unix::fs::symlink;

    let dir = tempfile::tempdir()?;
    let first = configmap_version(
        dir.path(),
        "..2025_01_01_00_00_00.000000001",
        &doc("r1", 10),
    )?;
    symlink(
        first.file_name().context("name")?,
        dir.path().join("..data"),
    )?;
    symlink("..data/routing.yaml", dir.path().join("routing.yaml"))?;
    let path = dir.path().join("routing.yaml");
    let (m, _registry) = metrics();
    let source = FileRoutingSource::start(&path, options(&m)).await?;
    assert_eq!(source.current().revision(), "r1");

    // What the kubelet does: a new timestamped directory, a new `..data_tmp` symlink renamed
    // over `..data`, then the old directory removed.
    let second = configmap_version(
        dir.path(),
        "..2025_01_01_00_01_00.000000002",
        &doc("r2", 50),
    )?;
    symlink(
        second.file_name().context("name")?,
        dir.path().join("..data_tmp"),
    )?;
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data"))?;
    std::fs::remove_dir_all(&first)?;

    serves(&source, "r2").await?;
    assert_eq!(
        source.current().route("als").expect("als").canary_weight(),
        50
    );
    Ok(())
}

#[tokio::test]
async fn a_bad_edit_keeps_the_previous_table_until_fixed() -> Result<()> {
    let (_dir, path, source, registry) = watched("routing.yaml").await?;
    let mut changes = source.subscribe();
    changes.borrow_and_update();

    // An invalid value: refused, counted once, the old table serves.
    replace_atomically(&path, &doc("r2", 120))?;
    shows(
        &registry,
        "routing_table_reload_failures_total{kind=\"Invalid\"} 1",
    )
    .await?;
    // A typo: refused too.
    replace_atomically(&path, &doc("r3", 10).replace("weight", "wieght"))?;
    shows(
        &registry,
        "routing_table_reload_failures_total{kind=\"Unparsable\"} 1",
    )
    .await?;
    // The file gone: refused.
    std::fs::remove_file(&path)?;
    shows(
        &registry,
        "routing_table_reload_failures_total{kind=\"Unreadable\"} 1",
    )
    .await?;

    assert_eq!(source.current().revision(), "r1");
    assert!(!changes.has_changed()?, "a refused table was announced");
    // Each bad state was reported once, not at every poll.
    tokio::time::sleep(POLL * 4).await;
    let text = scrape(&registry);
    assert!(
        text.contains("routing_table_reloads_total{outcome=\"failed\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("routing_table_info{revision=\"r1\"} 1"),
        "{text}"
    );

    // Fixed: served.
    replace_atomically(&path, &doc("r4", 30))?;
    serves(&source, "r4").await?;
    assert_eq!(
        source.current().route("als").expect("als").canary_weight(),
        30
    );
    let text = scrape(&registry);
    assert!(
        text.contains("routing_table_reloads_total{outcome=\"ok\"} 2"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_file_restored_to_the_serving_table_is_not_a_new_load() -> Result<()> {
    let (_dir, path, source, registry) = watched("routing.yaml").await?;
    let mut changes = source.subscribe();
    changes.borrow_and_update();

    replace_atomically(&path, &doc("r2", 120))?;
    shows(
        &registry,
        "routing_table_reload_failures_total{kind=\"Invalid\"} 1",
    )
    .await?;
    replace_atomically(&path, &doc("r1", 10))?;
    // Give the watcher a few polls to (wrongly) publish.
    tokio::time::sleep(POLL * 6).await;
    assert!(
        !changes.has_changed()?,
        "the same table was announced again"
    );
    let text = scrape(&registry);
    assert!(
        text.contains("routing_table_reloads_total{outcome=\"ok\"} 1"),
        "{text}"
    );
    Ok(())
}
