//! Conformance of the feature registry: one suite, run against the in-process registry (in
//! memory and persisted to a file) and against the real Postgres server of the test
//! environment (`bash tests/run` or `tests/env/up.sh` starts it; the Postgres test fails
//! without it).
//!
//! Tests share one database and run in parallel: every case registers features of its own
//! (unique names, owners and tags) and only looks at those.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use recsys_core::features::registry::{
    Computation, Deprecation, DriftThresholds, FeatureRegistry, FeatureSpec,
    InProcessFeatureRegistry, Lifecycle, Lineage, PostgresFeatureRegistry, Query,
    RegisteredFeature, RegistryError, ValueType, VersionSelector,
};
use recsys_core::features::{EntityKind, FeatureRef};
use recsys_core::stores::{self, PostgresArgs};
use recsys_tests::TestEnv;

// ---------------------------------------------------------------------------------------------
// Harness

/// A token no other test (or run) uses, usable in feature names.
fn token() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:x}_{:x}_{}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn spec(name: &str, version: &str) -> FeatureSpec {
    FeatureSpec {
        name: name.into(),
        entity: EntityKind::Product,
        online: true,
        offline: true,
        version: version.into(),
        value_type: ValueType::Float,
        dimension: None,
        description: "Time-decayed popularity of a product over 90 days".into(),
        owner: "ranking".into(),
        tags: vec!["popularity".into(), "product".into()],
        computation: Computation {
            job: "popularity".into(),
            logic: "sum of purchase 3 / add_to_cart 2 / view 1, halved every 7 days".into(),
            window: Some("90d".into()),
            half_life: Some("7d".into()),
        },
        lineage: Some(Lineage {
            tables: vec!["events".into()],
            features: vec!["freshness_score".into()],
        }),
        ttl: "1d".into(),
        drift: Some(DriftThresholds {
            psi: Some(0.2),
            ks: Some(0.1),
            jensen_shannon: None,
        }),
        on_quality_failure: None,
        deprecation: None,
    }
}

fn kind<T: std::fmt::Debug>(result: Result<T, RegistryError>) -> &'static str {
    result.expect_err("must fail").kind()
}

fn versions(records: &[RegisteredFeature]) -> Vec<&str> {
    records.iter().map(|r| r.spec.version.as_str()).collect()
}

fn exact(v: &str) -> VersionSelector {
    VersionSelector::Exact(v.into())
}

async fn postgres_registry() -> anyhow::Result<PostgresFeatureRegistry> {
    let env = TestEnv::load()?;
    let pool = stores::postgres(&PostgresArgs {
        url: env.var("RECSYS_TEST_DATABASE_URL")?.to_owned(),
        max_connections: 4,
    })
    .await
    .context("connecting to the test database")?;
    let registry = PostgresFeatureRegistry::new(pool);
    registry.migrate().await.context("migrating")?;
    Ok(registry)
}

// ---------------------------------------------------------------------------------------------
// The suite

async fn suite(registry: &dyn FeatureRegistry) -> anyhow::Result<()> {
    versions_are_idempotent_and_immutable(registry)
        .await
        .context("immutability")?;
    breaking_changes_need_a_new_major(registry)
        .await
        .context("majors")?;
    lifecycle_runs_one_way(registry)
        .await
        .context("lifecycle")?;
    discovery_by_entity_tag_owner_and_text(registry)
        .await
        .context("search")?;
    materializations_are_recorded_per_major(registry)
        .await
        .context("materializations")?;
    invalid_specs_are_refused(registry)
        .await
        .context("invalid specs")?;
    concurrent_registrations_are_decided_once(registry)
        .await
        .context("concurrency")?;
    Ok(())
}

async fn versions_are_idempotent_and_immutable(
    registry: &dyn FeatureRegistry,
) -> anyhow::Result<()> {
    let name = format!("r_immut_{}", token());
    let s = spec(&name, "1.0.0");
    let first = registry.register(&s).await?;
    assert!(first.created);
    assert_eq!((first.version.as_str(), first.major), ("1.0.0", 1));
    let again = registry.register(&s).await?;
    assert!(!again.created, "registering the same spec again is a no-op");
    assert_eq!(again.registered_at_ms, first.registered_at_ms);

    // Every field survives the store.
    let got = registry
        .get(&name, &exact("1.0.0"))
        .await?
        .context("registered version")?;
    assert_eq!(got.spec, s);
    assert_eq!(got.major, 1);
    assert_eq!(got.registered_at_ms, first.registered_at_ms);
    assert_eq!(got.lifecycle(), Lifecycle::Active);
    assert_eq!(got.feature_ref(), FeatureRef::new(name.clone(), 1));

    // A different spec under the same version is refused, naming what differs.
    let mut changed = s.clone();
    changed.description = "something else".into();
    changed.ttl = "2d".into();
    let err = registry.register(&changed).await.expect_err("immutable");
    assert_eq!(err.kind(), "FeatureVersionConflict");
    assert!(!err.retryable());
    let message = err.to_string();
    assert!(
        message.contains("description")
            && message.contains("ttl")
            && message.contains("new version"),
        "{message}"
    );
    assert_eq!(
        registry.get(&name, &exact("1.0.0")).await?.map(|r| r.spec),
        Some(s.clone()),
        "the refused spec did not replace the registered one"
    );
    // Under a new version the change is fine.
    changed.version = "1.0.1".into();
    assert!(registry.register(&changed).await?.created);

    assert_eq!(
        versions(&registry.versions(&name).await?),
        vec!["1.0.0", "1.0.1"]
    );
    let listed: Vec<RegisteredFeature> = registry
        .list()
        .await?
        .into_iter()
        .filter(|r| r.spec.name == name)
        .collect();
    assert_eq!(versions(&listed), vec!["1.0.0", "1.0.1"]);
    assert_eq!(
        registry
            .get("r_never_registered", &VersionSelector::Latest)
            .await?,
        None
    );
    assert_eq!(registry.get(&name, &exact("9.9.9")).await?, None);
    assert_eq!(registry.versions("r_never_registered").await?, vec![]);
    Ok(())
}

async fn breaking_changes_need_a_new_major(registry: &dyn FeatureRegistry) -> anyhow::Result<()> {
    let name = format!("r_major_{}", token());
    registry.register(&spec(&name, "1.0.0")).await?;

    let mut int = spec(&name, "1.1.0");
    int.value_type = ValueType::Int;
    let err = registry.register(&int).await.expect_err("breaking");
    assert_eq!(err.kind(), "FeatureBreakingChange");
    assert!(
        err.to_string().contains("valueType") && err.to_string().contains("new major"),
        "{err}"
    );
    let mut entity = spec(&name, "1.1.0");
    entity.entity = EntityKind::User;
    assert_eq!(
        kind(registry.register(&entity).await),
        "FeatureBreakingChange"
    );

    // A new computation within the major is allowed (it is a new version).
    let mut logic = spec(&name, "1.9.0");
    logic.computation.logic = "a better decay".into();
    registry.register(&logic).await?;
    registry.register(&spec(&name, "1.10.0")).await?;
    // The breaking change under a new major lives side by side.
    int.version = "2.0.0".into();
    let v2 = registry.register(&int).await?;
    assert_eq!(v2.major, 2);
    let mut rc = int.clone();
    rc.version = "3.0.0-rc.1".into();
    rc.value_type = ValueType::FloatVector;
    rc.dimension = Some(16);
    registry.register(&rc).await?;

    let name_ref = name.as_str();
    let get = |s: VersionSelector| async move {
        anyhow::Ok(registry.get(name_ref, &s).await?.map(|r| r.spec.version))
    };
    assert_eq!(
        get(VersionSelector::Major(1)).await?.as_deref(),
        Some("1.10.0"),
        "semver order, not text"
    );
    assert_eq!(
        get(VersionSelector::Major(2)).await?.as_deref(),
        Some("2.0.0")
    );
    assert_eq!(
        get(VersionSelector::Major(3)).await?.as_deref(),
        Some("3.0.0-rc.1")
    );
    assert_eq!(
        get(VersionSelector::Latest).await?.as_deref(),
        Some("2.0.0"),
        "a release before a pre-release"
    );
    assert_eq!(get(VersionSelector::Major(4)).await?, None);
    assert_eq!(
        versions(&registry.versions(&name).await?),
        vec!["1.0.0", "1.9.0", "1.10.0", "2.0.0", "3.0.0-rc.1"]
    );
    let v3 = registry
        .get(&name, &exact("3.0.0-rc.1"))
        .await?
        .context("rc")?;
    assert_eq!((v3.major, v3.spec.dimension), (3, Some(16)));
    Ok(())
}

async fn lifecycle_runs_one_way(registry: &dyn FeatureRegistry) -> anyhow::Result<()> {
    let name = format!("r_life_{}", token());
    let replacement = format!("r_next_{}", token());
    registry.register(&spec(&name, "1.0.0")).await?;
    let mut v2 = spec(&name, "2.0.0");
    v2.value_type = ValueType::Int;
    registry.register(&v2).await?;

    assert_eq!(
        kind(registry.retire(&name, "1.0.0").await),
        "FeatureNotDeprecated"
    );
    assert_eq!(
        kind(registry.deprecate(&name, "7.0.0", None).await),
        "FeatureNotFound"
    );
    assert_eq!(
        kind(registry.retire("r_nobody", "1.0.0").await),
        "FeatureNotFound"
    );
    assert_eq!(
        kind(
            registry
                .deprecate(&name, "1.0.0", Some(name.as_str()))
                .await
        ),
        "RegistryInvalidArgument"
    );

    let deprecated = registry
        .deprecate(&name, "1.0.0", Some(&replacement))
        .await?;
    assert_eq!(deprecated.lifecycle(), Lifecycle::Deprecated);
    assert_eq!(
        deprecated.replaced_by.as_deref(),
        Some(replacement.as_str())
    );
    assert_eq!(
        deprecated
            .spec
            .deprecation
            .as_ref()
            .and_then(|d| d.replaced_by.as_deref()),
        Some(replacement.as_str())
    );
    let since = deprecated.deprecated_at_ms.context("deprecation time")?;
    let again = registry.deprecate(&name, "1.0.0", None).await?;
    assert_eq!(
        again.deprecated_at_ms,
        Some(since),
        "the first deprecation time is kept"
    );
    assert_eq!(again.replaced_by.as_deref(), Some(replacement.as_str()));
    // Registering the spec without a deprecation does not undo it.
    assert!(!registry.register(&spec(&name, "1.0.0")).await?.created);
    assert_eq!(
        registry
            .get(&name, &exact("1.0.0"))
            .await?
            .map(|r| r.lifecycle()),
        Some(Lifecycle::Deprecated)
    );
    // Still served until retired.
    assert_eq!(
        registry
            .get(&name, &VersionSelector::Major(1))
            .await?
            .map(|r| r.spec.version),
        Some("1.0.0".into())
    );

    let retired = registry.retire(&name, "1.0.0").await?;
    assert_eq!(retired.lifecycle(), Lifecycle::Retired);
    let at = retired.retired_at_ms;
    assert_eq!(
        registry.retire(&name, "1.0.0").await?.retired_at_ms,
        at,
        "idempotent"
    );
    assert_eq!(registry.get(&name, &VersionSelector::Major(1)).await?, None);
    assert_eq!(
        registry
            .get(&name, &VersionSelector::Latest)
            .await?
            .map(|r| r.spec.version),
        Some("2.0.0".into())
    );
    let history = registry
        .get(&name, &exact("1.0.0"))
        .await?
        .context("history")?;
    assert_eq!(history.lifecycle(), Lifecycle::Retired);

    // A deprecation block in the spec deprecates through register, keeping its details.
    let mut dep = v2.clone();
    dep.deprecation = Some(Deprecation {
        replaced_by: Some(replacement.clone()),
        sunset: Some("2030-01-01T00:00:00Z".into()),
        reason: Some("merged into the new feature".into()),
    });
    let registered = registry.register(&dep).await?;
    assert!(!registered.created);
    let v2_now = registry.get(&name, &exact("2.0.0")).await?.context("v2")?;
    assert_eq!(v2_now.lifecycle(), Lifecycle::Deprecated);
    assert_eq!(v2_now.spec.deprecation, dep.deprecation);
    assert_eq!(v2_now.replaced_by.as_deref(), Some(replacement.as_str()));
    // Only deprecated versions left: latest is the deprecated one, still served.
    assert_eq!(
        registry
            .get(&name, &VersionSelector::Latest)
            .await?
            .map(|r| r.spec.version),
        Some("2.0.0".into())
    );
    // A new version registered already deprecated.
    let mut v3 = dep.clone();
    v3.version = "2.1.0".into();
    assert!(registry.register(&v3).await?.created);
    assert_eq!(
        registry
            .get(&name, &exact("2.1.0"))
            .await?
            .map(|r| r.lifecycle()),
        Some(Lifecycle::Deprecated)
    );
    Ok(())
}

async fn discovery_by_entity_tag_owner_and_text(
    registry: &dyn FeatureRegistry,
) -> anyhow::Result<()> {
    let t = token();
    let owner = format!("team_{t}");
    let tag = format!("tag_{t}");
    let mk = |suffix: &str, entity: EntityKind, tags: Vec<String>, description: &str| {
        let mut s = spec(&format!("r_find_{suffix}_{t}"), "1.0.0");
        s.entity = entity;
        s.owner = owner.clone();
        s.tags = tags;
        s.description = description.into();
        s
    };
    let pop = mk(
        "pop",
        EntityKind::Product,
        vec![tag.clone(), "ranking".into()],
        "Popularity of a product",
    );
    let aff = mk(
        "aff",
        EntityKind::User,
        vec![tag.clone()],
        "Category AFFINITY of a user",
    );
    let pair = mk(
        "pair",
        EntityKind::UserProduct,
        vec!["pairs".into()],
        "Affinity of a user for a product",
    );
    for s in [&pop, &aff, &pair] {
        registry.register(s).await?;
    }
    let names = |rs: Vec<RegisteredFeature>| -> Vec<String> {
        rs.into_iter()
            .filter(|r| r.spec.owner == owner)
            .map(|r| r.spec.name)
            .collect()
    };
    let by_owner = Query {
        owner: Some(owner.clone()),
        ..Default::default()
    };
    assert_eq!(
        names(registry.search(&by_owner).await?),
        vec![aff.name.clone(), pair.name.clone(), pop.name.clone()],
        "by name"
    );
    let q = |f: &dyn Fn(&mut Query)| {
        let mut q = by_owner.clone();
        f(&mut q);
        q
    };
    assert_eq!(
        names(
            registry
                .search(&q(&|q| q.entity = Some(EntityKind::User)))
                .await?
        ),
        vec![aff.name.clone()]
    );
    assert_eq!(
        names(
            registry
                .search(&q(&|q| q.entity = Some(EntityKind::UserProduct)))
                .await?
        ),
        vec![pair.name.clone()]
    );
    // Tag alone, without the owner: only ours carry it.
    let by_tag = Query {
        tag: Some(tag.clone()),
        ..Default::default()
    };
    assert_eq!(
        names(registry.search(&by_tag).await?),
        vec![aff.name.clone(), pop.name.clone()]
    );
    assert_eq!(registry.search(&by_tag).await?.len(), 2);
    // Text: case-insensitive, in the name, description or tags.
    assert_eq!(
        names(
            registry
                .search(&q(&|q| q.text = Some("affinity".into())))
                .await?
        ),
        vec![aff.name.clone(), pair.name.clone()]
    );
    assert_eq!(
        names(
            registry
                .search(&q(&|q| q.text = Some("FIND_POP".into())))
                .await?
        ),
        vec![pop.name.clone()]
    );
    assert_eq!(
        names(
            registry
                .search(&q(&|q| q.text = Some("PAIRS".into())))
                .await?
        ),
        vec![pair.name.clone()]
    );
    assert_eq!(
        names(
            registry
                .search(&q(&|q| q.text = Some("nothing like it".into())))
                .await?
        ),
        Vec::<String>::new()
    );
    // Owner is exact.
    let other_owner = Query {
        owner: Some(owner.to_uppercase()),
        ..Default::default()
    };
    assert_eq!(registry.search(&other_owner).await?, vec![]);

    // Deprecated and retired versions are left out unless asked for.
    registry.deprecate(&pop.name, "1.0.0", None).await?;
    registry.deprecate(&aff.name, "1.0.0", None).await?;
    registry.retire(&aff.name, "1.0.0").await?;
    assert_eq!(
        names(registry.search(&by_owner).await?),
        vec![pair.name.clone()]
    );
    assert_eq!(
        names(
            registry
                .search(&q(&|q| q.include_deprecated = true))
                .await?
        ),
        vec![pair.name.clone(), pop.name.clone()]
    );
    assert_eq!(
        names(
            registry
                .search(&q(&|q| {
                    q.include_deprecated = true;
                    q.include_retired = true;
                }))
                .await?
        ),
        vec![aff.name.clone(), pair.name.clone(), pop.name.clone()]
    );
    // list shows everything.
    assert_eq!(names(registry.list().await?).len(), 3);
    Ok(())
}

async fn materializations_are_recorded_per_major(
    registry: &dyn FeatureRegistry,
) -> anyhow::Result<()> {
    let name = format!("r_mat_{}", token());
    registry.register(&spec(&name, "1.0.0")).await?;
    let v1 = FeatureRef::new(name.clone(), 1);
    let v2 = FeatureRef::new(name.clone(), 2);
    assert_eq!(registry.last_materialization(&v1).await?, None);

    let t1 = 1_700_000_000_000;
    let t2 = t1 + 3_600_000;
    registry.record_materialization(&v1, t1, 10).await?;
    let second = registry.record_materialization(&v1, t2, 20).await?;
    assert_eq!((second.at_ms, second.rows, &second.feature), (t2, 20, &v1));
    // Recording the same run again replaces its count (an idempotent retry).
    registry.record_materialization(&v1, t1, 11).await?;
    let last = registry
        .last_materialization(&v1)
        .await?
        .context("last run")?;
    assert_eq!((last.at_ms, last.rows), (t2, 20));
    let runs = registry.materializations(&v1, 10).await?;
    assert_eq!(
        runs.iter().map(|r| (r.at_ms, r.rows)).collect::<Vec<_>>(),
        vec![(t2, 20), (t1, 11)],
        "newest first"
    );
    assert_eq!(registry.materializations(&v1, 1).await?.len(), 1);

    assert_eq!(
        kind(registry.record_materialization(&v2, t1, 1).await),
        "FeatureNotFound"
    );
    assert_eq!(
        kind(
            registry
                .record_materialization(&FeatureRef::new("r_nobody", 1), t1, 1)
                .await
        ),
        "FeatureNotFound"
    );
    assert_eq!(
        kind(registry.record_materialization(&v1, i64::MAX, 1).await),
        "RegistryInvalidArgument"
    );
    assert_eq!(registry.last_materialization(&v2).await?, None);

    registry.deprecate(&name, "1.0.0", None).await?;
    registry.record_materialization(&v1, t2 + 1, 5).await?;
    registry.retire(&name, "1.0.0").await?;
    assert_eq!(
        kind(registry.record_materialization(&v1, t2 + 2, 5).await),
        "FeatureRetired"
    );
    assert_eq!(
        registry.last_materialization(&v1).await?.map(|r| r.at_ms),
        Some(t2 + 1),
        "the history stays"
    );
    Ok(())
}

async fn invalid_specs_are_refused(registry: &dyn FeatureRegistry) -> anyhow::Result<()> {
    let name = format!("r_invalid_{}", token());
    type Change = Box<dyn Fn(&mut FeatureSpec)>;
    let cases: Vec<(&str, Change)> = vec![
        ("version", Box::new(|s| s.version = "1.0".into())),
        (
            "build metadata",
            Box::new(|s| s.version = "1.0.0+abc".into()),
        ),
        (
            "dimension",
            Box::new(|s| s.value_type = ValueType::FloatVector),
        ),
        ("ttl", Box::new(|s| s.ttl = "forever".into())),
        ("owner", Box::new(|s| s.owner = " ".into())),
        (
            "replacedBy",
            Box::new(|s| {
                s.deprecation = Some(Deprecation {
                    replaced_by: Some(s.name.clone()),
                    ..Default::default()
                })
            }),
        ),
    ];
    for (what, change) in cases {
        let mut s = spec(&name, "1.0.0");
        change(&mut s);
        let err = registry.register(&s).await.expect_err(what);
        assert_eq!(err.kind(), "FeatureSpecInvalid", "{what}: {err}");
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    let bad_name = spec("Bad-Name", "1.0.0");
    assert_eq!(
        kind(registry.register(&bad_name).await),
        "FeatureSpecInvalid"
    );
    assert_eq!(
        registry.versions(&name).await?,
        vec![],
        "nothing was stored"
    );
    Ok(())
}

async fn concurrent_registrations_are_decided_once(
    registry: &dyn FeatureRegistry,
) -> anyhow::Result<()> {
    let name = format!("r_race_{}", token());
    let same = spec(&name, "1.0.0");
    let outcomes = futures::future::join_all((0..6).map(|_| registry.register(&same))).await;
    let created = outcomes
        .into_iter()
        .map(|r| r.map(|r| r.created))
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");

    // Two incompatible versions of one major: exactly one wins.
    let mut a = spec(&name, "1.1.0");
    a.value_type = ValueType::Int;
    a.dimension = None;
    let other = format!("r_race2_{}", token());
    let mut b1 = spec(&other, "1.0.0");
    b1.value_type = ValueType::Int;
    let b2 = spec(&other, "1.1.0");
    let (r1, r2) = futures::join!(registry.register(&b1), registry.register(&b2));
    assert!(r1.is_ok() != r2.is_ok(), "{r1:?} {r2:?}");
    let loser = if r1.is_err() { r1 } else { r2 };
    assert_eq!(kind(loser), "FeatureBreakingChange");
    assert_eq!(kind(registry.register(&a).await), "FeatureBreakingChange");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The runs

#[tokio::test]
async fn in_process_registry_conforms() -> anyhow::Result<()> {
    suite(&InProcessFeatureRegistry::new()).await
}

#[tokio::test]
async fn file_backed_in_process_registry_conforms_and_persists() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("registry.json");
    let name = format!("r_file_{}", token());
    {
        let registry = InProcessFeatureRegistry::open(&path)?;
        suite(&registry).await?;
        registry.register(&spec(&name, "1.0.0")).await?;
        registry.deprecate(&name, "1.0.0", Some("r_other")).await?;
        registry
            .record_materialization(&FeatureRef::new(name.clone(), 1), 42, 7)
            .await?;
    }
    let reopened = InProcessFeatureRegistry::open(&path)?;
    let record = reopened
        .get(&name, &exact("1.0.0"))
        .await?
        .context("persisted")?;
    assert_eq!(record.lifecycle(), Lifecycle::Deprecated);
    assert_eq!(record.replaced_by.as_deref(), Some("r_other"));
    let mut expected = spec(&name, "1.0.0");
    expected.deprecation = record.spec.deprecation.clone();
    assert_eq!(record.spec, expected);
    assert_eq!(
        reopened
            .last_materialization(&FeatureRef::new(name.clone(), 1))
            .await?
            .map(|m| (m.at_ms, m.rows)),
        Some((42, 7))
    );
    assert!(
        reopened.list().await?.len() > 10,
        "the suite's features persisted too"
    );

    std::fs::write(&path, b"[]")?;
    assert_eq!(
        InProcessFeatureRegistry::open(&path)
            .expect_err("corrupt")
            .kind(),
        "RegistryCorrupt"
    );
    Ok(())
}

#[tokio::test]
async fn postgres_registry_conforms() -> anyhow::Result<()> {
    let registry = postgres_registry().await?;
    suite(&registry).await
}
