//! Conformance of the artifact-store seam and of the registry built on it: one suite per
//! layer, run against a local directory and against the real S3 server of the test
//! environment (`bash tests/run` or `tests/env/up.sh` starts it; these tests fail without it).

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use ndarray::Array2;
use recsys_core::artifacts::{
    ArtifactError, ArtifactStore, CHAMPION, DataInfo, LocalDirStore, Manifest, ManifestInput,
    PREVIOUS, Registry, RegistryIndex, S3Store, decode_factors, encode_factors, sha256_hex,
};
use recsys_core::cf::als::AlsModel;
use recsys_core::cf::interactions::IdMap;
use recsys_core::stores::{self, ChecksumMode};
use recsys_tests::TestEnv;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Harness

/// A store in a fresh temporary directory (removed when the guard drops).
fn local_store() -> anyhow::Result<(Arc<dyn ArtifactStore>, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    Ok((Arc::new(LocalDirStore::new(dir.path())), dir))
}

/// A store under a key prefix of its own in the test environment's bucket.
async fn s3_store(tag: &str, checksums: ChecksumMode) -> anyhow::Result<Arc<dyn ArtifactStore>> {
    let env = TestEnv::load()?;
    let client = stores::s3(&env.s3_args(checksums)?).await?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let prefix = format!(
        "artifacts-conformance/{tag}-{}-{nanos:x}",
        std::process::id()
    );
    Ok(Arc::new(S3Store::new(
        client,
        env.var("RECSYS_TEST_S3_BUCKET")?,
        &prefix,
    )))
}

/// Runs `suite` on `store` in its own task, then deletes everything the suite left, even when
/// it failed an assertion, and reports the suite's outcome.
async fn run<F, Fut>(store: Arc<dyn ArtifactStore>, suite: F) -> anyhow::Result<()>
where
    F: FnOnce(Arc<dyn ArtifactStore>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let outcome = tokio::spawn(suite(store.clone())).await;
    for key in store.list("").await.context("listing for clean-up")? {
        store.delete(&key).await.context("clean-up")?;
    }
    assert_eq!(store.list("").await?, Vec::<String>::new(), "clean-up");
    match outcome {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(e.into()),
    }
}

fn kind<T: std::fmt::Debug>(result: Result<T, ArtifactError>) -> (&'static str, String) {
    let err = result.expect_err("must fail");
    (err.kind(), err.to_string())
}

// ---------------------------------------------------------------------------------------------
// The store suite

async fn store_suite(s: Arc<dyn ArtifactStore>) -> anyhow::Result<()> {
    // Absent objects.
    assert_eq!(s.get("a/missing").await?, None);
    assert!(s.get_versioned("a/missing").await?.is_none());
    assert_eq!(s.list("").await?, Vec::<String>::new());
    s.delete("a/missing").await?;

    // Put, get, replace; empty and large objects.
    s.put("a/b/one", b"1".to_vec()).await?;
    assert_eq!(s.get("a/b/one").await?, Some(b"1".to_vec()));
    s.put("a/b/one", b"one".to_vec()).await?;
    assert_eq!(s.get("a/b/one").await?, Some(b"one".to_vec()));
    s.put("a/empty", Vec::new()).await?;
    assert_eq!(s.get("a/empty").await?, Some(Vec::new()));
    // 3 MiB: the S3 SDK streams it with a trailing checksum.
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    s.put("big/blob", big.clone()).await?;
    assert!(s.get("big/blob").await?.as_deref() == Some(big.as_slice()));

    // Listing: plain string prefixes, sorted, recursive.
    s.put("a/bc", b"x".to_vec()).await?;
    s.put("a/b/c/deep", b"x".to_vec()).await?;
    s.put("b/x", b"x".to_vec()).await?;
    assert_eq!(
        s.list("").await?,
        [
            "a/b/c/deep",
            "a/b/one",
            "a/bc",
            "a/empty",
            "b/x",
            "big/blob"
        ]
    );
    assert_eq!(s.list("a/b").await?, ["a/b/c/deep", "a/b/one", "a/bc"]);
    assert_eq!(s.list("a/b/").await?, ["a/b/c/deep", "a/b/one"]);
    assert_eq!(s.list("a/b/c/deep").await?, ["a/b/c/deep"]);
    assert_eq!(s.list("nothing/").await?, Vec::<String>::new());
    // A "directory" of other keys is not an object.
    assert_eq!(s.get("a/b").await?, None);

    // Delete is idempotent.
    s.delete("a/bc").await?;
    assert_eq!(s.get("a/bc").await?, None);
    s.delete("a/bc").await?;
    assert_eq!(s.list("a/b").await?, ["a/b/c/deep", "a/b/one"]);

    // Create-only writes.
    s.put_if("c/new", b"v1".to_vec(), None).await?;
    let err = s
        .put_if("c/new", b"v2".to_vec(), None)
        .await
        .expect_err("exists");
    assert_eq!(err.kind(), "Conflict", "{err}");
    assert!(err.retryable());
    assert!(err.to_string().contains("c/new"), "{err}");
    assert_eq!(s.get("c/new").await?, Some(b"v1".to_vec()));

    // Compare-and-swap.
    let first = s.get_versioned("c/new").await?.context("present")?;
    assert_eq!(first.bytes, b"v1");
    s.put_if("c/new", b"v2".to_vec(), Some(&first.revision))
        .await?;
    assert_eq!(s.get("c/new").await?, Some(b"v2".to_vec()));
    let (k, _) = kind(
        s.put_if("c/new", b"v3".to_vec(), Some(&first.revision))
            .await,
    );
    assert_eq!(k, "Conflict");
    assert_eq!(s.get("c/new").await?, Some(b"v2".to_vec()));
    let (k, _) = kind(
        s.put_if("c/gone", b"x".to_vec(), Some(&first.revision))
            .await,
    );
    assert_eq!(k, "Conflict");
    assert_eq!(s.get("c/gone").await?, None);
    let second = s.get_versioned("c/new").await?.context("present")?;
    assert_ne!(second.revision, first.revision);

    // Keys that are not plain relative paths are refused by every operation.
    for bad in ["", "/a", "a/", "a//b", "../x", "a/../b", ".hidden", "a/.b"] {
        assert_eq!(
            kind(s.put(bad, Vec::new()).await).0,
            "InvalidKey",
            "{bad:?}"
        );
        assert_eq!(kind(s.get(bad).await).0, "InvalidKey", "{bad:?}");
        assert_eq!(kind(s.delete(bad).await).0, "InvalidKey", "{bad:?}");
        assert_eq!(
            kind(s.put_if(bad, Vec::new(), None).await).0,
            "InvalidKey",
            "{bad:?}"
        );
    }
    assert_eq!(kind(s.list("../").await).0, "InvalidKey");

    // Racing creators: exactly one wins.
    let creators: Vec<_> = (0..6u8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.put_if("race/create", vec![i], None).await })
        })
        .collect();
    let mut won = 0;
    for task in creators {
        match task.await? {
            Ok(()) => won += 1,
            Err(e) => assert_eq!(e.kind(), "Conflict", "{e}"),
        }
    }
    assert_eq!(won, 1, "exactly one create-only write wins");

    // Racing read-modify-write loops: no increment is lost.
    s.put_if("race/counter", b"0".to_vec(), None).await?;
    let (writers, increments) = (6, 3);
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                for _ in 0..increments {
                    loop {
                        let current = s.get_versioned("race/counter").await?.context("counter")?;
                        let n: u32 = String::from_utf8(current.bytes)?.parse()?;
                        match s
                            .put_if(
                                "race/counter",
                                (n + 1).to_string().into_bytes(),
                                Some(&current.revision),
                            )
                            .await
                        {
                            Ok(()) => break,
                            Err(ArtifactError::Conflict { .. }) => continue,
                            Err(e) => return Err(anyhow::Error::from(e)),
                        }
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    assert_eq!(
        s.get("race/counter").await?,
        Some((writers * increments).to_string().into_bytes())
    );
    Ok(())
}

#[tokio::test]
async fn local_dir_store_conforms() -> anyhow::Result<()> {
    let (store, _dir) = local_store()?;
    run(store, store_suite).await
}

#[tokio::test]
async fn s3_store_conforms() -> anyhow::Result<()> {
    run(
        s3_store("store", ChecksumMode::WhenSupported).await?,
        store_suite,
    )
    .await
}

#[tokio::test]
async fn s3_store_conforms_with_checksums_when_required() -> anyhow::Result<()> {
    run(
        s3_store("store-wr", ChecksumMode::WhenRequired).await?,
        store_suite,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// The registry suite

/// A small deterministic model whose values depend on `seed`.
fn toy(users: usize, items: usize, k: usize, seed: f32) -> (AlsModel, IdMap, IdMap) {
    let model = AlsModel {
        user_factors: Array2::from_shape_fn((users, k), |(u, f)| {
            seed + u as f32 * 0.5 - f as f32 * 0.25
        }),
        item_factors: Array2::from_shape_fn((items, k), |(i, f)| {
            seed - i as f32 * 0.125 + f as f32
        }),
        regularization: 0.05,
    };
    let users = IdMap::from_ids((0..users).map(|u| format!("user-{u}")).collect());
    let items = IdMap::from_ids((0..items).map(|i| format!("sku/{i}\n\"q\"")).collect());
    (model, users, items)
}

fn input(version: Option<&str>) -> ManifestInput {
    ManifestInput {
        version: version.map(str::to_owned),
        params: json!({"factors": 3, "regularization": 0.05, "alpha": 40.0, "iterations": 15}),
        metrics: json!({
            "model": {"ndcg@10": 0.3125, "recall@10": 0.25},
            "baseline": {"ndcg@10": 0.125, "recall@10": 0.1},
        }),
        data: DataInfo {
            digest: "sha256:feed".into(),
            interactions: 20,
            users: 5,
            items: 7,
            time_range: Some((1_700_000_000_000, 1_700_086_400_000)),
        },
        trainer_version: "0.1.0".into(),
        git_sha: Some("64b7687".into()),
    }
}

fn key(version: &str, file: &str) -> String {
    format!("models/shop/{version}/{file}")
}

/// Replaces a file of a published version and rewrites the manifest and the registry entry
/// to match it, as a buggy writer would: every checksum agrees, so only the deeper checks can
/// catch what is wrong with the content.
async fn forge(
    s: &dyn ArtifactStore,
    version: &str,
    file: &str,
    bytes: Vec<u8>,
) -> anyhow::Result<()> {
    let mut manifest: Manifest = serde_json::from_slice(
        &s.get(&key(version, "manifest.json"))
            .await?
            .context("manifest")?,
    )?;
    let entry = manifest
        .files
        .iter_mut()
        .find(|f| f.path == file)
        .context("file entry")?;
    entry.sha256 = sha256_hex(&bytes);
    entry.bytes = bytes.len() as u64;
    if entry.shape.is_some() && bytes.len() >= 32 {
        let rows = u64::from_le_bytes(bytes[8..16].try_into()?);
        let cols = u64::from_le_bytes(bytes[16..24].try_into()?);
        entry.shape = Some([rows, cols]);
    }
    s.put(&key(version, file), bytes).await?;
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)?;
    let manifest_sha = sha256_hex(&manifest_bytes);
    s.put(&key(version, "manifest.json"), manifest_bytes)
        .await?;
    let mut index: RegistryIndex = serde_json::from_slice(
        &s.get("models/shop/registry.json")
            .await?
            .context("registry")?,
    )?;
    index
        .versions
        .iter_mut()
        .find(|v| v.version == version)
        .context("entry")?
        .manifest_sha256 = manifest_sha;
    s.put(
        "models/shop/registry.json",
        serde_json::to_vec_pretty(&index)?,
    )
    .await?;
    Ok(())
}

async fn registry_suite(s: Arc<dyn ArtifactStore>) -> anyhow::Result<()> {
    let reg = Registry::new(s.clone());
    let (model, users, items) = toy(5, 7, 3, 0.0);

    // Nothing published yet.
    assert_eq!(kind(reg.list("shop").await).0, "ModelNotFound");
    assert_eq!(kind(reg.load("shop", CHAMPION).await).0, "ModelNotFound");
    assert_eq!(reg.models().await?, Vec::<String>::new());

    // Publish with a generated, sortable id; load it back bit for bit.
    let v1 = reg
        .publish("shop", &model, &users, &items, input(None))
        .await?;
    let parts: Vec<&str> = v1.split('-').collect();
    assert!(
        parts.len() == 3
            && parts[0].len() == 8
            && parts[1].len() == 6
            && parts[2].len() == 6
            && parts[2].chars().all(|c| c.is_ascii_hexdigit()),
        "{v1}"
    );
    let loaded = reg.load("shop", &v1).await?;
    assert_eq!(loaded.model, model);
    assert_eq!(loaded.users, users);
    assert_eq!(loaded.items, items);
    let m = &loaded.manifest;
    assert_eq!((m.format_version, m.model.as_str()), (1, "shop"));
    assert_eq!(m.version, v1);
    assert_eq!(m.trainer_version, "0.1.0");
    assert_eq!(m.git_sha.as_deref(), Some("64b7687"));
    assert_eq!(m.metrics["baseline"]["ndcg@10"], json!(0.125));
    assert_eq!(m.params["alpha"], json!(40.0));
    assert_eq!(m.data, input(None).data);
    assert_eq!(
        m.file("user_factors.f32").and_then(|f| f.shape),
        Some([5, 3])
    );
    assert_eq!(
        m.file("item_factors.f32").and_then(|f| f.shape),
        Some([7, 3])
    );
    let ids = m.file("item_ids.json").context("item ids")?;
    let stored = s.get(&key(&v1, "item_ids.json")).await?.context("ids")?;
    assert_eq!(
        (ids.sha256.clone(), ids.bytes),
        (sha256_hex(&stored), stored.len() as u64)
    );
    assert_eq!(reg.get_manifest("shop", &v1).await?, loaded.manifest);
    // The files are exactly the documented layout, and the factor files decode on their own.
    assert_eq!(
        s.list("models/shop/").await?,
        [
            key(&v1, "item_factors.f32"),
            key(&v1, "item_ids.json"),
            key(&v1, "manifest.json"),
            key(&v1, "user_factors.f32"),
            key(&v1, "user_ids.json"),
            "models/shop/registry.json".to_owned(),
        ]
    );
    let raw = s
        .get(&key(&v1, "user_factors.f32"))
        .await?
        .context("factors")?;
    assert_eq!(decode_factors("f", &raw)?, model.user_factors);
    assert_eq!(reg.models().await?, ["shop"]);
    let listed = reg.list("shop").await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].version, v1);
    assert_eq!(
        listed[0].summary,
        "baseline.ndcg@10=0.125 baseline.recall@10=0.1 model.ndcg@10=0.3125 model.recall@10=0.25"
    );

    // A version is never overwritten.
    let (k, msg) = kind(
        reg.publish("shop", &model, &users, &items, input(Some(&v1)))
            .await,
    );
    assert_eq!(k, "VersionExists", "{msg}");

    // Promote and roll back.
    let (model2, users2, items2) = toy(4, 6, 3, 1.0);
    let v2 = reg
        .publish("shop", &model2, &users2, &items2, input(Some("v2")))
        .await?;
    assert_eq!(v2, "v2");
    assert_eq!(kind(reg.load("shop", CHAMPION).await).0, "VersionNotFound");
    assert_eq!(reg.promote("shop", &v1).await?, v1);
    assert_eq!(kind(reg.rollback("shop").await).0, "NoPreviousVersion");
    reg.promote("shop", "v2").await?;
    assert_eq!(reg.resolve("shop", CHAMPION).await?, "v2");
    assert_eq!(reg.resolve("shop", PREVIOUS).await?, v1);
    assert_eq!(reg.load("shop", CHAMPION).await?.model, model2);
    reg.promote("shop", "v2").await?;
    assert_eq!(
        reg.resolve("shop", PREVIOUS).await?,
        v1,
        "re-promoting keeps previous"
    );
    assert_eq!(reg.rollback("shop").await?, v1);
    assert_eq!(reg.resolve("shop", CHAMPION).await?, v1);
    assert_eq!(
        kind(reg.resolve("shop", PREVIOUS).await).0,
        "VersionNotFound"
    );
    assert_eq!(kind(reg.rollback("shop").await).0, "NoPreviousVersion");
    assert_eq!(reg.load("shop", CHAMPION).await?.model, model);

    // Other aliases.
    reg.set_alias("shop", "canary", "v2").await?;
    assert_eq!(reg.resolve("shop", "canary").await?, "v2");
    assert_eq!(reg.promote("shop", "canary").await?, "v2");
    assert_eq!(reg.resolve("shop", PREVIOUS).await?, v1);
    assert_eq!(
        kind(reg.set_alias("shop", "v2", &v1).await).0,
        "InvalidName"
    );
    assert_eq!(
        kind(reg.set_alias("shop", "x", "v9").await).0,
        "VersionNotFound"
    );
    assert_eq!(
        kind(reg.set_alias("shop", "Bad", "v2").await).0,
        "InvalidName"
    );
    reg.remove_alias("shop", "canary").await?;
    assert_eq!(
        kind(reg.resolve("shop", "canary").await).0,
        "VersionNotFound"
    );
    assert_eq!(
        kind(
            reg.publish("shop", &model, &users, &items, input(Some(CHAMPION)))
                .await
        )
        .0,
        "InvalidName",
        "a version id may not shadow an alias"
    );

    // Invalid names and models are refused before anything is written.
    let before = s.list("").await?;
    for (name, version) in [
        ("Shop", None),
        ("-shop", None),
        ("shop", Some("../x")),
        ("shop", Some("a/b")),
    ] {
        let (k, msg) = kind(
            reg.publish(name, &model, &users, &items, input(version))
                .await,
        );
        assert_eq!(k, "InvalidName", "{name} {version:?}: {msg}");
    }
    let mut nan = model.clone();
    nan.item_factors[[2, 1]] = f32::NAN;
    let (k, msg) = kind(
        reg.publish("shop", &nan, &users, &items, input(Some("nan")))
            .await,
    );
    assert_eq!(k, "InvalidModel");
    assert!(msg.contains("row 2, column 1"), "{msg}");
    let (k, _) = kind(
        reg.publish("shop", &model, &users2, &items, input(Some("ids")))
            .await,
    );
    assert_eq!(k, "InvalidModel");
    let dup = IdMap::from_ids(vec![
        "a".into(),
        "b".into(),
        "a".into(),
        "c".into(),
        "d".into(),
    ]);
    let (k, msg) = kind(
        reg.publish("shop", &model, &dup, &items, input(Some("dup")))
            .await,
    );
    assert_eq!(k, "InvalidModel");
    assert!(msg.contains("duplicate user id \"a\""), "{msg}");
    assert_eq!(s.list("").await?, before);

    // Loading refuses every kind of damage, naming the file.
    let champion = reg.resolve("shop", CHAMPION).await?;
    let damaged = |name: &str| {
        let reg = reg.clone();
        let name = name.to_owned();
        async move {
            let (m, u, i) = toy(5, 7, 3, 2.0);
            reg.publish("shop", &m, &u, &i, input(Some(&name))).await
        }
    };

    let v = damaged("corrupt").await?;
    let mut bytes = s.get(&key(&v, "item_factors.f32")).await?.context("file")?;
    bytes[40] ^= 0x01;
    s.put(&key(&v, "item_factors.f32"), bytes).await?;
    let (k, msg) = kind(reg.load("shop", &v).await);
    assert_eq!(k, "ChecksumMismatch");
    assert!(
        msg.contains("models/shop/corrupt/item_factors.f32"),
        "{msg}"
    );

    let v = damaged("truncated").await?;
    let mut bytes = s.get(&key(&v, "user_factors.f32")).await?.context("file")?;
    bytes.truncate(bytes.len() - 3);
    s.put(&key(&v, "user_factors.f32"), bytes).await?;
    let (k, msg) = kind(reg.load("shop", &v).await);
    assert_eq!(k, "SizeMismatch");
    assert!(
        msg.contains("user_factors.f32") && msg.contains("truncated"),
        "{msg}"
    );

    let v = damaged("missing").await?;
    s.delete(&key(&v, "user_ids.json")).await?;
    let (k, msg) = kind(reg.load("shop", &v).await);
    assert_eq!(k, "MissingFile");
    assert!(msg.contains("user_ids.json"), "{msg}");

    let v = damaged("manifest").await?;
    let mut bytes = s.get(&key(&v, "manifest.json")).await?.context("file")?;
    let text = String::from_utf8(bytes.clone())?.replace("0.1.0", "9.9.9");
    bytes = text.into_bytes();
    s.put(&key(&v, "manifest.json"), bytes).await?;
    let (k, msg) = kind(reg.get_manifest("shop", &v).await);
    assert_eq!(k, "ChecksumMismatch");
    assert!(msg.contains("manifest.json"), "{msg}");

    let v = damaged("shape").await?;
    let wider = Array2::<f32>::ones((7, 4));
    forge(&*s, &v, "item_factors.f32", encode_factors(wider.view())).await?;
    let (k, msg) = kind(reg.load("shop", &v).await);
    assert_eq!(k, "ShapeMismatch");
    assert!(
        msg.contains("item_factors.f32") && msg.contains("4 columns"),
        "{msg}"
    );

    let v = damaged("rows").await?;
    let taller = Array2::<f32>::ones((6, 3));
    forge(&*s, &v, "user_factors.f32", encode_factors(taller.view())).await?;
    let (k, msg) = kind(reg.load("shop", &v).await);
    assert_eq!(k, "ShapeMismatch");
    assert!(
        msg.contains("user_factors.f32") && msg.contains("5 ids"),
        "{msg}"
    );

    let v = damaged("nan").await?;
    let mut poisoned = Array2::<f32>::ones((5, 3));
    poisoned[[4, 0]] = f32::INFINITY;
    forge(&*s, &v, "user_factors.f32", encode_factors(poisoned.view())).await?;
    let (k, msg) = kind(reg.load("shop", &v).await);
    assert_eq!(k, "NonFinite");
    assert!(
        msg.contains("user_factors.f32") && msg.contains("row 4, column 0"),
        "{msg}"
    );

    let v = damaged("magic").await?;
    let mut bytes = encode_factors(Array2::<f32>::ones((7, 3)).view());
    bytes[..4].copy_from_slice(b"NOPE");
    forge(&*s, &v, "item_factors.f32", bytes).await?;
    let (k, msg) = kind(reg.load("shop", &v).await);
    assert_eq!(k, "BadFormat");
    assert!(
        msg.contains("item_factors.f32") && msg.contains("magic"),
        "{msg}"
    );

    // None of it disturbed the champion.
    assert_eq!(reg.resolve("shop", CHAMPION).await?, champion);
    reg.load("shop", CHAMPION).await?;

    // Concurrent publishes of distinct versions all land; of one version, exactly one does.
    let tasks: Vec<_> = (0..5)
        .map(|i| {
            let reg = reg.clone();
            tokio::spawn(async move {
                let (m, u, i2) = toy(3, 4, 2, i as f32);
                reg.publish("shop", &m, &u, &i2, input(Some(&format!("par-{i}"))))
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let versions: Vec<String> = reg
        .list("shop")
        .await?
        .into_iter()
        .map(|v| v.version)
        .collect();
    for i in 0..5 {
        assert!(versions.contains(&format!("par-{i}")), "{versions:?}");
    }
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let reg = reg.clone();
            tokio::spawn(async move {
                let (m, u, i2) = toy(3, 4, 2, 10.0 + i as f32);
                let result = reg.publish("shop", &m, &u, &i2, input(Some("same"))).await;
                (m, result)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await? {
            (m, Ok(_)) => winners.push(m),
            (_, Err(e)) => assert_eq!(e.kind(), "VersionExists", "{e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one publisher of `same` wins");
    assert_eq!(
        reg.load("shop", "same").await?.model,
        winners[0],
        "and its files are intact"
    );
    Ok(())
}

#[tokio::test]
async fn registry_on_local_dir() -> anyhow::Result<()> {
    let (store, _dir) = local_store()?;
    run(store, registry_suite).await
}

#[tokio::test]
async fn registry_on_s3() -> anyhow::Result<()> {
    run(
        s3_store("registry", ChecksumMode::WhenSupported).await?,
        registry_suite,
    )
    .await
}
