//! A/B traffic with known click-through rates against scorers, and reading back what the
//! scorers and the ModelDeployment's status make of it (`status.experiment`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use kube::Api;
use recsys_core::serving::routing::bucket;
use recsys_crds::ModelDeployment;
use recsys_crds::model_deployment::ExperimentSegment;
use serde_json::json;

use crate::{http_full, http_json, wait_for};

/// The bearer token clicks are posted with: the one client of the tokens Secret a test creates
/// for scorer pods (a scorer without authentication ignores it).
pub const CLICKS_TOKEN: &str = "experiments-clicks-token-0001";

/// What the traffic generator did, per variant: (impressions, impressions clicked).
#[derive(Debug, Default)]
pub struct Generated {
    /// Lists served by the stable version, and how many of them were clicked.
    pub stable: (u64, u64),
    /// Lists served by the candidate, and how many of them were clicked.
    pub canary: (u64, u64),
    /// The variant that last served each user.
    pub users: std::collections::BTreeMap<String, String>,
    /// Clicks decided but not posted yet: (scorer index, user, product).
    pub pending: Vec<(usize, String, String)>,
}

/// Now, in milliseconds since the epoch (an event's timestamp).
pub fn now_ms() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond()
}

/// One list for `user` from scorer `addrs[from]`, and a click on its first product with
/// probability `click.0` on stable and `click.1` on the candidate (decided by a hash, so the
/// run is reproducible), to be posted by [`post_clicks`] to the *next* scorer, so the
/// attribution crosses scorers through their shared Redis. Clicks come after the lists are
/// recorded, as a user's click comes after the page: impressions are written off the request
/// path, and a click posted in the same millisecond could find none yet.
pub async fn serve_and_maybe_click(
    addrs: &[SocketAddr],
    from: usize,
    user: &str,
    round: usize,
    click: (f64, f64),
    generated: &mut Generated,
) -> anyhow::Result<()> {
    let addr = addrs[from % addrs.len()];
    let (status, body) = http_json(
        addr,
        "GET",
        &format!("/v1/recommendations?user_id={user}&k=5"),
        None,
    )
    .await?;
    anyhow::ensure!(status == 200, "{status}: {body}");
    anyhow::ensure!(
        body["request_id"].as_str().is_some_and(|r| r.len() == 32),
        "{body}"
    );
    let variant = body["variant"].as_str().context("a variant")?.to_owned();
    let first = body["items"][0]["product_id"]
        .as_str()
        .context("a product")?
        .to_owned();
    let (p, side) = if variant == "canary" {
        (click.1, &mut generated.canary)
    } else {
        (click.0, &mut generated.stable)
    };
    side.0 += 1;
    generated.users.insert(user.to_owned(), variant);
    let draw = f64::from(bucket("clicks", &format!("{user}/{round}"))) / 10_000.0;
    if draw < p {
        side.1 += 1;
        generated.pending.push((from + 1, user.to_owned(), first));
    }
    Ok(())
}

/// Posts the clicks [`serve_and_maybe_click`] decided, each twice (a second click on the same
/// list counts once), once scorer `addrs[0]` counts every list served at `weight` so far (a
/// click goes to the newest list that showed the product: post a round's clicks before the
/// next round's lists).
pub async fn post_clicks(
    addrs: &[SocketAddr],
    model: &str,
    weight: u64,
    generated: &mut Generated,
    timeout: Duration,
) -> anyhow::Result<()> {
    let served = generated.stable.0 + generated.canary.0;
    wait_for(timeout, "every list served recorded", || async {
        let seen = scorer_segment(addrs[0], model, weight).await?;
        Ok(seen.stable.0 + seen.canary.0 >= served)
    })
    .await?;
    for (to, user, product) in std::mem::take(&mut generated.pending) {
        let event = json!({"events": [
            {"user_id": user, "product_id": product, "event_type": "click", "timestamp": now_ms()},
            {"user_id": user, "product_id": product, "event_type": "click", "timestamp": now_ms() + 1}
        ]});
        let addr = addrs[to % addrs.len()];
        let auth = format!("Bearer {CLICKS_TOKEN}");
        let (status, _, body) = http_full(
            addr,
            "POST",
            "/v1/events",
            &[("authorization", &auth)],
            Some(event),
        )
        .await?;
        anyhow::ensure!(status == 202, "{status}: {body}");
    }
    Ok(())
}

/// Waits until every scorer serves a user whose bucket (under `salt`) is in `buckets` from
/// the candidate: every scorer follows the new table. Each probe is one impression.
pub async fn on_canary_everywhere(
    addrs: &[SocketAddr],
    salt: &str,
    users: &[String],
    buckets: std::ops::Range<u16>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let user = users
        .iter()
        .find(|u| buckets.contains(&bucket(salt, u)))
        .context("a user in the buckets")?;
    wait_for(timeout, "every scorer on the new table", || async {
        for addr in addrs {
            let (_, b) = http_json(
                *addr,
                "POST",
                "/v1/scores",
                Some(json!({"user_id": user, "product_ids": ["p1"]})),
            )
            .await?;
            if b["variant"] != "canary" {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await
}

/// The (impressions, clicks) per variant of `model`'s segment at `weight` as scorer `addr`
/// reads it (`GET /v1/experiments`), zero if none yet.
pub async fn scorer_segment(
    addr: SocketAddr,
    model: &str,
    weight: u64,
) -> anyhow::Result<Generated> {
    // Impressions are written off the request path: let the queue drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) =
        http_json(addr, "GET", &format!("/v1/experiments?model={model}"), None).await?;
    anyhow::ensure!(status == 200, "{status}: {body}");
    let mut out = Generated::default();
    let segments = body["segments"].as_array().cloned().unwrap_or_default();
    for seg in segments
        .iter()
        .filter(|g| g["canary_weight"] == json!(weight))
    {
        for v in seg["variants"].as_array().into_iter().flatten() {
            let counts = (
                v["impressions"].as_u64().unwrap_or(0),
                v["clicks"].as_u64().unwrap_or(0),
            );
            if v["variant"] == "canary" {
                out.canary = counts;
            } else {
                out.stable = counts;
            }
        }
    }
    Ok(out)
}

/// The segment at `weight` of ModelDeployment `name`'s `status.experiment`, once its
/// impressions and clicks reach `counts`.
pub async fn segment_with(
    mds: &Api<ModelDeployment>,
    name: &str,
    weight: i32,
    counts: (u64, u64),
    timeout: Duration,
) -> anyhow::Result<ExperimentSegment> {
    let (impressions, clicks) = counts;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let s = mds.get(name).await?.status.unwrap_or_default();
        let seg = s
            .experiment
            .and_then(|x| x.segments.into_iter().find(|g| g.canary_weight == weight));
        match seg {
            Some(g)
                if g.variants.iter().map(|v| v.impressions).sum::<i64>() >= impressions as i64
                    && g.variants.iter().map(|v| v.clicks).sum::<i64>() >= clicks as i64 =>
            {
                return Ok(g);
            }
            other if tokio::time::Instant::now() > deadline => anyhow::bail!(
                "no readout at {weight}% with {impressions} impressions and {clicks} clicks: {other:?}"
            ),
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}
