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

use std::collections::HashSet;

use anyhow::{Context as _, ensure};
use recsys_tests::TestEnv;
use recsys_tests::http_json as http;
use recsys_tests::recommend::{Fixture, ITEMS, USERS, ids, serve};
use serde_json::{Value, json};

const K: usize = 10;

#[tokio::test]
async fn recommendations_are_personal_beat_popularity_and_start_cold_users() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let fx = Fixture::build(&env, "recommend_http").await?;
    let (data, test, model, version, rankings) =
        (&fx.data, &fx.test, &fx.model, &fx.version, &fx.rankings);
    let args = fx.args(
        env.var("RECSYS_TEST_REDIS_URL")?,
        &format!("rh{}", fx.tag),
        &[],
    )?;
    let (scorer, addr) = serve(&args).await?;

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
        let seen: HashSet<String> = fx.seen(u).into_iter().collect();
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
    let event = |i: usize| json!({"user_id": "newcomer", "product_id": format!("p{}", topic0[i]), "event_type": "purchase", "timestamp": chrono::Utc::now().timestamp_millis() + i as i64});
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
