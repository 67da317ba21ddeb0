//! Recommendations and scores over HTTP, end to end against the real stores: a model trained
//! on structured synthetic data and published to the real S3 server, popularity rankings in
//! the same bucket, user histories in a fresh Postgres database, user states in the real Redis.
//! The scorer is started as `recsys-scorer` starts (`Args` → `start_all`) and called over a
//! real socket.
//!
//! - Personalisation is real: users get different lists, and on held-out interactions the CF
//!   lists hit more than popularity does.
//! - Every answer names the model version and variant; `exclude_seen` leaves out the history.
//! - Cold start: no history → popularity; two interactions → blend; six → fold-in.
//! - `/v1/scores` returns the model's affinities in request order.
//! - Bad requests are 4xx naming what is wrong.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use clap::Parser as _;
use recsys_core::artifacts::{ManifestInput, Registry, S3Store};
use recsys_core::cf::als::{self, AlsParams, Solver};
use recsys_core::cf::eval;
use recsys_core::cf::interactions::{Confidence, Event, EventType, IdMap};
use recsys_core::cf::synth::{self, SynthParams};
use recsys_core::events::{self, EventRow, PostgresEvents};
use recsys_core::features::FeatureRef;
use recsys_core::features::rankings::{Rankings, write_rankings};
use recsys_core::stores::{self, ChecksumMode, PostgresArgs, S3Args};
use recsys_tests::{TestEnv, wait_for};
use serde_json::{Value, json};

const USERS: usize = 400;
const ITEMS: usize = 300;
const K: usize = 10;

use recsys_tests::http_json as http;

fn ids(v: &Value) -> Vec<String> {
    v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["product_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn recommendations_are_personal_beat_popularity_and_start_cold_users() -> anyhow::Result<()> {
    let env = TestEnv::load()?;

    // Data with structure: users and items in topics; two interactions per user held out.
    let data = synth::generate(&SynthParams {
        topics: 8,
        ..SynthParams::new(USERS, ITEMS, 9_000, 11)
    });
    let (train, test) = eval::leave_k_out(&data.weights, 2, 3);
    let model = als::train(
        &Confidence::Linear { alpha: 10.0 }.apply(&train),
        &AlsParams {
            factors: 16,
            regularization: 0.05,
            iterations: 12,
            solver: Solver::ConjugateGradient { steps: 3 },
            threads: 2,
            seed: 5,
        },
        |_| {},
    )?;
    let users = IdMap::from_ids((0..USERS).map(|u| format!("u{u}")).collect());
    let items = IdMap::from_ids((0..ITEMS).map(|i| format!("p{i}")).collect());

    // The model and the rankings, in the real S3 server under a prefix of this run.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let prefix = format!("recommend-http/{}-{nanos:x}", std::process::id());
    let s3 = S3Args {
        endpoint: Some(env.var("RECSYS_TEST_S3_ENDPOINT")?.to_owned()),
        region: env.var("RECSYS_TEST_S3_REGION")?.to_owned(),
        force_path_style: true,
        checksums: ChecksumMode::WhenSupported,
        access_key_id: Some(env.var("AWS_ACCESS_KEY_ID")?.to_owned()),
        secret_access_key: Some(env.var("AWS_SECRET_ACCESS_KEY")?.to_owned()),
    };
    let bucket = env.var("RECSYS_TEST_S3_BUCKET")?.to_owned();
    let store = Arc::new(S3Store::new(stores::s3(&s3).await?, &bucket, &prefix));
    let registry = Registry::new(store.clone());
    let version = registry
        .publish(
            "als",
            &model,
            &users,
            &items,
            ManifestInput {
                params: json!({"alpha": 10.0, "confidence": "linear"}),
                ..ManifestInput::default()
            },
        )
        .await?;
    registry.promote("als", &version).await?;
    let mut counts = vec![0.0_f64; ITEMS];
    for (_, i, _) in sprs_triples(&train) {
        counts[i] += 1.0;
    }
    let max = counts.iter().copied().fold(0.0, f64::max);
    let scores: Vec<(String, f64)> = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0.0)
        .map(|(i, c)| (format!("p{i}"), c / max))
        .collect();
    let categories: BTreeMap<String, String> = (0..ITEMS)
        .map(|i| (format!("p{i}"), format!("topic{}", data.item_topic[i])))
        .collect();
    let now = recsys_core::features::online::now_ms();
    let rankings = Rankings::build(
        &FeatureRef::new("popularity_score", 1),
        now,
        now,
        1000,
        &scores,
        &categories,
    )?;
    write_rankings(store.as_ref(), &rankings).await?;

    // Histories: the training interactions in a fresh events table.
    let db = env.fresh_database("recommend_http").await?;
    let pool = stores::postgres(&PostgresArgs {
        url: db.clone(),
        max_connections: 2,
    })
    .await?;
    events::migrate(&pool).await?;
    let rows: Vec<EventRow> = sprs_triples(&train)
        .map(|(u, i, _)| EventRow {
            event_id: format!("e{u}-{i}"),
            event: Event {
                user: format!("u{u}"),
                item: format!("p{i}"),
                kind: EventType::Purchase,
                ts_ms: Some(now - 60_000),
                value: None,
            },
            category: Some(format!("topic{}", data.item_topic[i])),
        })
        .collect();
    PostgresEvents::new(pool.clone()).insert(&rows).await?;

    // The scorer, as its binary starts it.
    let redis_prefix = format!("rh{nanos:x}");
    let args = recsys_scorer::Args::try_parse_from([
        "recsys-scorer",
        "--database-url",
        &db,
        "--database-migrate",
        "--redis-url",
        env.var("RECSYS_TEST_REDIS_URL")?,
        "--redis-prefix",
        &redis_prefix,
        "--artifacts",
        &format!("s3://{bucket}/{prefix}"),
        "--s3-endpoint",
        env.var("RECSYS_TEST_S3_ENDPOINT")?,
        "--s3-force-path-style",
        "--s3-region",
        env.var("RECSYS_TEST_S3_REGION")?,
    ])?;
    let scorer = recsys_scorer::start_all(&args).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = scorer.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    wait_for(
        Duration::from_secs(30),
        "scorer ready with the model",
        || async { Ok(http(addr, "GET", "/readyz", None).await?.0 == 200) },
    )
    .await?;

    // Personalised CF lists, with the version and variant, never what the user has seen.
    let mut cf_hits = 0;
    let mut pop_hits = 0;
    let mut lists = vec![];
    for u in 0..USERS {
        let (status, v) = http(
            addr,
            "GET",
            &format!("/v1/recommendations?user_id=u{u}&k={K}"),
            None,
        )
        .await?;
        ensure!(status == 200, "u{u}: {status} {v}");
        ensure!(
            v["version"] == json!(version) && v["variant"] == "stable",
            "{v}"
        );
        ensure!(v["path"] == "cf", "u{u}: {v}");
        let got = ids(&v);
        ensure!(got.len() == K, "u{u}: {v}");
        let seen: HashSet<String> = train
            .outer_view(u)
            .map(|r| r.indices().iter().map(|i| format!("p{i}")).collect())
            .unwrap_or_default();
        ensure!(
            got.iter().all(|p| !seen.contains(p)),
            "u{u} was recommended a product it has seen: {got:?}"
        );
        let held: HashSet<String> = test
            .outer_view(u)
            .map(|r| r.indices().iter().map(|i| format!("p{i}")).collect())
            .unwrap_or_default();
        cf_hits += got.iter().filter(|p| held.contains(*p)).count();
        let popular: Vec<&String> = rankings
            .overall
            .iter()
            .map(|(p, _)| p)
            .filter(|p| !seen.contains(*p))
            .take(K)
            .collect();
        pop_hits += popular.iter().filter(|p| held.contains(**p)).count();
        lists.push(got);
    }
    println!("held-out hits at {K} over {USERS} users: CF {cf_hits}, popularity {pop_hits}");
    ensure!(
        cf_hits as f64 > 1.5 * pop_hits as f64,
        "CF {cf_hits} vs popularity {pop_hits}"
    );
    let distinct: HashSet<&Vec<String>> = lists.iter().collect();
    ensure!(
        distinct.len() > USERS * 9 / 10,
        "only {} distinct lists for {USERS} users",
        distinct.len()
    );

    // Scores: the model's affinity, in request order.
    let candidates: Vec<String> = (0..100).map(|i| format!("p{}", (i * 7) % ITEMS)).collect();
    let (status, v) = http(
        addr,
        "POST",
        "/v1/scores",
        Some(json!({"user_id": "u3", "product_ids": candidates})),
    )
    .await?;
    ensure!(status == 200, "{v}");
    let got = ids(&v);
    ensure!(got == candidates, "scores come back in request order");
    let u3 = model.user_factors.row(3);
    for (i, item) in v["items"].as_array().context("items")?.iter().enumerate() {
        let row = (i * 7) % ITEMS;
        let expected = u3.dot(&model.item_factors.row(row));
        let served = item["user_product_affinity"].as_f64().context("affinity")? as f32;
        ensure!(
            (served - expected).abs() < 1e-4,
            "p{row}: served {served}, model {expected}"
        );
    }

    // Cold start: nothing → popularity; two events → blend; six → fold-in.
    let (_, v) = http(
        addr,
        "GET",
        "/v1/recommendations?user_id=newcomer&k=5",
        None,
    )
    .await?;
    ensure!(v["path"] == "popularity" && ids(&v).len() == 5, "{v}");
    let topic0: Vec<usize> = (0..ITEMS)
        .filter(|i| data.item_topic[*i] == data.item_topic[0])
        .collect();
    let event = |i: usize| json!({"user_id": "newcomer", "product_id": format!("p{}", topic0[i]), "event_type": "purchase"});
    let (status, v) = http(
        addr,
        "POST",
        "/v1/events",
        Some(json!({"events": [event(0), event(1)]})),
    )
    .await?;
    ensure!(
        status == 202 && v["new"] == 2 && v["invalidated"] == 1,
        "{status} {v}"
    );
    let (_, v) = http(
        addr,
        "GET",
        "/v1/recommendations?user_id=newcomer&k=5",
        None,
    )
    .await?;
    ensure!(v["path"] == "blend" && v["interactions"] == 2, "{v}");
    let more: Vec<Value> = (2..6).map(event).collect();
    http(addr, "POST", "/v1/events", Some(json!({"events": more}))).await?;
    let (_, v) = http(
        addr,
        "GET",
        "/v1/recommendations?user_id=newcomer&k=5",
        None,
    )
    .await?;
    ensure!(v["path"] == "fold_in" && v["interactions"] == 6, "{v}");
    let topic_hits = ids(&v)
        .iter()
        .filter(|p| {
            p[1..]
                .parse::<usize>()
                .is_ok_and(|i| data.item_topic[i] == data.item_topic[0])
        })
        .count();
    ensure!(topic_hits >= 3, "a folded-in user gets their topic: {v}");

    // Bad requests.
    for (method, path, body, needle) in [
        ("GET", "/v1/recommendations?user_id=u1&k=0", None, "k:"),
        ("GET", "/v1/recommendations?k=3", None, "user_id"),
        (
            "GET",
            "/v1/recommendations?user_id=u1&model=nope",
            None,
            "nope",
        ),
        (
            "POST",
            "/v1/scores",
            Some(
                json!({"user_id": "u1", "product_ids": (0..501).map(|i| format!("p{i}")).collect::<Vec<_>>()}),
            ),
            "product_ids",
        ),
        (
            "POST",
            "/v1/scores",
            Some(json!({"user_id": "u1", "product_ids": ["p1"], "extra": 1})),
            "extra",
        ),
    ] {
        let (status, v) = http(addr, method, path, body).await?;
        ensure!((400..500).contains(&status), "{path}: {status} {v}");
        ensure!(
            v["message"].as_str().is_some_and(|m| m.contains(needle)),
            "{path}: {v}"
        );
    }
    drop(scorer);
    Ok(())
}

/// `(row, column, value)` of a CSR matrix.
fn sprs_triples(m: &sprs::CsMat<f32>) -> impl Iterator<Item = (usize, usize, f32)> + '_ {
    m.outer_iterator()
        .enumerate()
        .flat_map(|(u, row)| row.iter().map(move |(i, v)| (u, i, *v)).collect::<Vec<_>>())
}
