//! The scorer in cluster mode: started with `--routing-configmap`, it reads its routing table
//! from a ConfigMap through the real API server of the test environment and follows it.
//!
//! - Before the ConfigMap exists the scorer runs but is not ready, and says why.
//! - A table naming a version makes it ready and serving that version.
//! - A canary at 100% moves every user to the candidate; a bad edit and a deletion leave the
//!   last good table serving.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use clap::Parser as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use ndarray::Array2;
use rand::{RngExt as _, SeedableRng as _};
use recsys_core::artifacts::{LocalDirStore, ManifestInput, Registry};
use recsys_core::cf::als::AlsModel;
use recsys_core::cf::interactions::IdMap;
use recsys_tests::{TestEnv, TestNamespace, http_json as http, wait_for};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn table(yaml: &str) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("als-routing".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "routing.yaml".to_owned(),
            yaml.to_owned(),
        )])),
        ..Default::default()
    }
}

async fn recommend(addr: SocketAddr, user: &str) -> anyhow::Result<Value> {
    let (status, body) = http(
        addr,
        "GET",
        &format!("/v1/recommendations?user_id={user}&k=5"),
        None,
    )
    .await?;
    ensure!(status == 200, "recommendations for {user}: {status} {body}");
    // Every answer has an id of its own; the rest is what routing decides.
    let mut body = body;
    let text = body.to_string();
    let id = body
        .as_object_mut()
        .and_then(|o| o.remove("request_id"))
        .with_context(|| format!("no request_id: {text}"))?;
    ensure!(
        id.as_str().is_some_and(|i| i.len() == 32),
        "request_id {id}"
    );
    Ok(body)
}

#[tokio::test]
async fn the_scorer_follows_the_routing_configmap() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    // The scorer builds its Kubernetes client the way a pod does, from the environment.
    ensure!(
        std::env::var("KUBECONFIG").ok().as_deref() == Some(env.var("KUBECONFIG")?),
        "KUBECONFIG must name the test cluster: source target/testenv/env first"
    );
    let client = env.client().await?;
    let ns = TestNamespace::create(&env, &client, "scorer-routing").await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);

    // Two versions of a small model, different factors.
    let dir = tempfile::tempdir()?;
    let registry = Registry::new(std::sync::Arc::new(LocalDirStore::new(dir.path())));
    let users = IdMap::from_ids((0..30).map(|u| format!("u{u}")).collect());
    let items = IdMap::from_ids((0..40).map(|i| format!("p{i}")).collect());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut versions = vec![];
    for name in ["v1", "v2"] {
        let mut random =
            |rows: usize| Array2::from_shape_fn((rows, 8), |_| rng.random_range(-0.5..0.5_f32));
        let model = AlsModel {
            user_factors: random(30),
            item_factors: random(40),
            regularization: 0.05,
        };
        let input = ManifestInput {
            version: Some(name.to_owned()),
            ..ManifestInput::default()
        };
        versions.push(
            registry
                .publish("als", &model, &users, &items, input)
                .await?,
        );
    }
    ensure!(versions == ["v1", "v2"], "{versions:?}");

    let args = recsys_scorer::Args::try_parse_from([
        "recsys-scorer",
        "--artifacts",
        dir.path().to_str().context("utf-8 path")?,
        "--routing-configmap",
        "als-routing",
        "--routing-namespace",
        &ns.name,
        "--model-sync-interval",
        "1s",
    ])?;
    let scorer = recsys_scorer::start_all(&args).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = scorer.router();
    tokio::spawn(async move { axum::serve(listener, router).await });

    // No table yet: alive, not ready, and the reason names the default model.
    let (status, _) = http(addr, "GET", "/healthz", None).await?;
    ensure!(status == 200, "healthz {status}");
    let (status, body) = http(addr, "GET", "/readyz", None).await?;
    ensure!(status == 503, "readyz before the table: {status} {body}");
    ensure!(
        body.to_string()
            .contains("has no route for the default model als"),
        "{body}"
    );

    // The table arrives: ready, serving v1 to everyone.
    cms.create(
        &PostParams::default(),
        &table("formatVersion: 1\nmodels:\n  als: {stable: v1}\n"),
    )
    .await?;
    wait_for(WAIT, "scorer ready on v1", || async {
        Ok(http(addr, "GET", "/readyz", None).await?.0 == 200)
    })
    .await?;
    for u in ["u1", "u2", "u3"] {
        let v = recommend(addr, u).await?;
        ensure!(v["version"] == "v1" && v["variant"] == "stable", "{v}");
    }

    // A canary at 100%: every user moves to v2 once it is loaded.
    cms.patch(
        "als-routing",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"routing.yaml":
            "formatVersion: 1\nmodels:\n  als: {stable: v1, canary: {version: v2, weight: 100}}\n"}})),
    )
    .await?;
    wait_for(WAIT, "every user on the v2 canary", || async {
        for u in ["u1", "u2", "u3"] {
            let v = recommend(addr, u).await?;
            if v["version"] != "v2" || v["variant"] != "canary" {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    let before = recommend(addr, "u4").await?;

    // A bad edit and a deletion: the last good table keeps serving, and the refusals show.
    cms.patch(
        "als-routing",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"routing.yaml": "formatVersion: 1\nmodels: {als: {stable: v9, salt: ''}}\n"}})),
    )
    .await?;
    cms.delete("als-routing", &DeleteParams::default()).await?;
    wait_for(WAIT, "the refusals in /metrics", || async {
        let (_, body) = http(addr, "GET", "/metrics", None).await?;
        let text = body.as_str().unwrap_or_default();
        Ok(recsys_tests::metric(
            text,
            "routing_table_reload_failures_total{kind=\"Invalid\"}",
        ) >= 1.0
            && recsys_tests::metric(
                text,
                "routing_table_reload_failures_total{kind=\"Missing\"}",
            ) >= 2.0)
    })
    .await?;
    let after = recommend(addr, "u4").await?;
    ensure!(after == before, "before {before}\nafter {after}");
    let (status, body) = http(addr, "GET", "/readyz", None).await?;
    ensure!(status == 200, "readyz after the bad edits: {status} {body}");
    Ok(())
}
