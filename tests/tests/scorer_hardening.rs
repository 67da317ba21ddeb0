//! The scorer's ingestion, hardened, against the real Postgres, Redis and S3 of the test
//! environment: bearer tokens (refusals, read-only clients, rotation without a restart),
//! per-client ingestion limits, exactly-once ingestion (retries, conflicting ids, data errors
//! as 400s), and a Postgres outage in the middle of ingestion where every acknowledged event is
//! stored and every other batch succeeds on retry without duplicates.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use recsys_tests::recommend::{Fixture, serve};
use recsys_tests::{TestEnv, http_full, http_json, metric, unique_redis_prefix, wait_for};
use serde_json::{Value, json};

const WRITER: &str = "shop-writer-token-0001";
const READER: &str = "dashboards-token-0001";
const ROTATED: &str = "shop-writer-token-0002";

async fn post_events(
    addr: SocketAddr,
    token: Option<&str>,
    events: Value,
) -> anyhow::Result<(u16, hyper::HeaderMap, Value)> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    http_full(
        addr,
        "POST",
        "/v1/events",
        &headers,
        Some(json!({ "events": events })),
    )
    .await
}

fn event(user: &str, product: &str, ts: i64) -> Value {
    json!({"user_id": user, "product_id": product, "event_type": "click", "timestamp": ts})
}

async fn stored(f: &Fixture, user_prefix: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM events WHERE user_id LIKE $1")
            .bind(format!("{user_prefix}%"))
            .fetch_one(&f.pool)
            .await?,
    )
}

#[tokio::test]
async fn tokens_guard_ingestion_rotate_without_restart_and_limit_each_client() -> anyhow::Result<()>
{
    let env = TestEnv::load()?;
    let f = Fixture::build(&env, "auth").await?;
    let tokens = tempfile::tempdir()?;
    std::fs::write(tokens.path().join("shop"), format!("{WRITER}\n"))?;
    std::fs::write(tokens.path().join("dashboards.read"), READER)?;
    let dir = tokens.path().to_string_lossy().into_owned();
    let args = f.args(
        env.var("RECSYS_TEST_REDIS_URL")?,
        &unique_redis_prefix("hard", "auth"),
        &[
            "--auth-tokens-dir",
            &dir,
            "--ingest-rate",
            "1000",
            "--ingest-burst",
            "1000",
        ],
    )?;
    let (_scorer, addr) = serve(&args).await?;
    let now = recsys_core::features::online::now_ms();

    // Refusals, with a body that says why and nothing stored.
    let (status, headers, body) =
        post_events(addr, None, json!([event("auth-u1", "p1", now)])).await?;
    ensure!(
        status == 401 && body["error"] == "Unauthenticated",
        "{status} {body}"
    );
    ensure!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("needs a bearer token")),
        "{body}"
    );
    ensure!(
        headers
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().is_ok_and(|v| v.starts_with("Bearer"))),
        "{headers:?}"
    );
    let (status, _, body) = post_events(
        addr,
        Some("guessed-token-0000000"),
        json!([event("auth-u1", "p1", now)]),
    )
    .await?;
    ensure!(status == 401, "{status} {body}");
    ensure!(
        !body.to_string().contains("guessed-token"),
        "the answer repeats the token: {body}"
    );
    let (status, _, body) =
        post_events(addr, Some(READER), json!([event("auth-u1", "p1", now)])).await?;
    ensure!(
        status == 403
            && body["error"] == "Forbidden"
            && body["message"]
                .as_str()
                .is_some_and(|m| m.contains("dashboards")),
        "{status} {body}"
    );
    ensure!(
        stored(&f, "auth-u").await? == 0,
        "a refused write was stored"
    );
    // Reads stay open.
    let (status, _) = http_json(addr, "GET", "/v1/recommendations?user_id=u1&k=3", None).await?;
    ensure!(status == 200, "reads are open: {status}");
    // The writer's token works.
    let (status, _, body) =
        post_events(addr, Some(WRITER), json!([event("auth-u1", "p1", now)])).await?;
    ensure!(status == 202 && body["new"] == 1, "{status} {body}");

    // Rotation: the new token next to the old one, clients move, the old one goes; no restart.
    std::fs::write(tokens.path().join("shop-next"), ROTATED)?;
    wait_for(
        Duration::from_secs(15),
        "the new token accepted",
        || async {
            Ok(
                post_events(addr, Some(ROTATED), json!([event("auth-u2", "p1", now)]))
                    .await?
                    .0
                    == 202,
            )
        },
    )
    .await?;
    let (status, _, _) =
        post_events(addr, Some(WRITER), json!([event("auth-u3", "p1", now)])).await?;
    ensure!(
        status == 202,
        "both tokens work during the rotation: {status}"
    );
    std::fs::remove_file(tokens.path().join("shop"))?;
    wait_for(Duration::from_secs(15), "the old token refused", || async {
        Ok(
            post_events(addr, Some(WRITER), json!([event("auth-u4", "p1", now)]))
                .await?
                .0
                == 401,
        )
    })
    .await?;

    // The rate limit: 1,000 events a second per client, bursts of 1,000.
    let batch = |tag: &str, n: usize| -> Value {
        Value::Array(
            (0..n)
                .map(|i| event(&format!("rate-{tag}-{i}"), "p2", now + i as i64))
                .collect(),
        )
    };
    let (status, _, body) = post_events(addr, Some(ROTATED), batch("a", 1000)).await?;
    ensure!(status == 202, "the burst: {status} {body}");
    let (status, headers, body) = post_events(addr, Some(ROTATED), batch("b", 600)).await?;
    ensure!(
        status == 429 && body["error"] == "RateLimited",
        "{status} {body}"
    );
    ensure!(headers.contains_key("retry-after"), "{headers:?}");
    ensure!(
        stored(&f, "rate-b-").await? == 0,
        "a limited batch was stored"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, _, body) = post_events(addr, Some(ROTATED), batch("b", 600)).await?;
    ensure!(status == 202, "the allowance refills: {status} {body}");

    let (_, text) = http_json(addr, "GET", "/metrics", None).await?;
    let text = text.as_str().context("metrics text")?.to_owned();
    for reason in ["unauthenticated", "forbidden", "rate_limited"] {
        let n = metric(
            &text,
            &format!("recsys_scorer_http_rejected_requests_total{{reason=\"{reason}\"}}"),
        );
        ensure!(n >= 1.0, "{reason}: {n}");
    }
    Ok(())
}

#[tokio::test]
async fn retries_store_once_and_bad_batches_are_refused_whole_with_400() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let f = Fixture::build(&env, "once").await?;
    let args = f.args(
        env.var("RECSYS_TEST_REDIS_URL")?,
        &unique_redis_prefix("hard", "once"),
        &[],
    )?;
    let (_scorer, addr) = serve(&args).await?;
    let now = recsys_core::features::online::now_ms();

    // A client retries the same batch five times, seconds apart: stored once.
    let batch: Vec<Value> = (0..20)
        .map(|i| event(&format!("once-{}", i % 4), &format!("p{i}"), now - i))
        .collect();
    let mut new = vec![];
    for attempt in 0..5 {
        let (status, body) =
            http_json(addr, "POST", "/v1/events", Some(json!({"events": batch}))).await?;
        ensure!(status == 202, "attempt {attempt}: {status} {body}");
        new.push(body["new"].as_u64().context("new")?);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ensure!(new == [20, 0, 0, 0, 0], "new per attempt: {new:?}");
    ensure!(stored(&f, "once-").await? == 20, "stored more than once");

    // Refused whole, naming the event and the field; nothing of the batch stored.
    let cases = [
        (
            json!([event("bad-1", "p1", now), {"user_id": "bad-1", "product_id": "p\u{0}x", "event_type": "view", "timestamp": now}]),
            "product_id: contains a NUL",
        ),
        (
            json!([event("bad-2", "p1", now), {"user_id": "bad-2", "product_id": "x".repeat(300), "event_type": "view", "timestamp": now}]),
            "product_id: 300 bytes",
        ),
        (
            json!([
                {"event_id": "same", "user_id": "bad-3", "product_id": "p1", "event_type": "view", "timestamp": now},
                {"event_id": "same", "user_id": "bad-3", "product_id": "p2", "event_type": "view", "timestamp": now}
            ]),
            "event_id: also the id of event 0",
        ),
        (
            json!([{"user_id": "bad-4", "product_id": "p1", "event_type": "view"}]),
            "give a timestamp or an event_id",
        ),
    ];
    for (events, needle) in cases {
        let (status, body) = http_json(
            addr,
            "POST",
            "/v1/events",
            Some(json!({ "events": events })),
        )
        .await?;
        ensure!(
            status == 400 && body["message"].as_str().is_some_and(|m| m.contains(needle)),
            "{needle}: {status} {body}"
        );
    }
    ensure!(
        stored(&f, "bad-").await? == 0,
        "part of a refused batch was stored"
    );
    // The same event twice in a batch is one event.
    let twice = json!([
        {"event_id": "twice", "user_id": "dup-1", "product_id": "p1", "event_type": "view", "timestamp": now},
        {"event_id": "twice", "user_id": "dup-1", "product_id": "p1", "event_type": "view", "timestamp": now}
    ]);
    let (status, body) =
        http_json(addr, "POST", "/v1/events", Some(json!({ "events": twice }))).await?;
    ensure!(status == 202 && body["new"] == 1, "{status} {body}");
    Ok(())
}

/// Cuts the scorer's database off: new connections to it refused, its sessions' server
/// processes terminated (what a Postgres crash does to them), for `down`.
async fn outage(admin: &sqlx::PgPool, db: &str, down: Duration) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {db} ALLOW_CONNECTIONS false"
    )))
    .execute(admin)
    .await?;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(db)
        .execute(admin)
        .await?;
    tokio::time::sleep(down).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {db} ALLOW_CONNECTIONS true"
    )))
    .execute(admin)
    .await?;
    Ok(())
}

#[tokio::test]
async fn acknowledged_events_survive_a_postgres_outage_and_retries_do_not_duplicate()
-> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let f = Fixture::build(&env, "outage").await?;
    let args = f.args(
        env.var("RECSYS_TEST_REDIS_URL")?,
        &unique_redis_prefix("hard", "outage"),
        &["--events-record-timeout", "1s"],
    )?;
    let (_scorer, addr) = serve(&args).await?;
    let admin = recsys_core::stores::postgres(&recsys_core::stores::PostgresArgs {
        url: env.var("RECSYS_TEST_DATABASE_URL")?.to_owned(),
        max_connections: 1,
    })
    .await?;
    let db = f
        .database_url
        .rsplit('/')
        .next()
        .context("database name")?
        .to_owned();
    let now = recsys_core::features::online::now_ms();

    // Two clients post batches of 20 events back to back; a batch that fails is retried until
    // it is acknowledged.
    let started = Instant::now();
    let load = |client: usize| async move {
        let mut acked = BTreeSet::new();
        let (mut failures, mut statuses) = (0usize, BTreeSet::new());
        for b in 0..60 {
            let events: Vec<Value> = (0..20)
                .map(|i| event(&format!("out-{client}-{b}"), &format!("p{i}"), now + i))
                .collect();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match http_json(addr, "POST", "/v1/events", Some(json!({"events": events}))).await {
                    Ok((202, _)) => break,
                    Ok((status, _)) => {
                        statuses.insert(status);
                        failures += 1;
                    }
                    Err(_) => failures += 1,
                }
                anyhow::ensure!(Instant::now() < deadline, "batch {b} never acknowledged");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            acked.insert(format!("out-{client}-{b}"));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<_, anyhow::Error>((acked, failures, statuses))
    };
    let cut = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        outage(&admin, &db, Duration::from_secs(3)).await
    };
    let (a, b, cut) = tokio::join!(load(0), load(1), cut);
    cut?;
    let (mut acked, fa, sa) = a?;
    let (acked_b, fb, sb) = b?;
    acked.extend(acked_b);
    let statuses: BTreeSet<u16> = sa.union(&sb).copied().collect();
    println!(
        "outage: {} batches acknowledged, {} failed attempts (statuses {statuses:?}) in {:.1}s",
        acked.len(),
        fa + fb,
        started.elapsed().as_secs_f64()
    );
    ensure!(fa + fb > 0, "no request failed: the outage did not happen");
    ensure!(
        statuses.iter().all(|s| *s == 503),
        "an outage must answer 503 (retryable), not {statuses:?}"
    );
    // Every acknowledged batch stored, whole, once.
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT user_id, count(*) FROM events WHERE user_id LIKE 'out-%' GROUP BY 1",
    )
    .fetch_all(&f.pool)
    .await?;
    ensure!(
        rows.len() == acked.len() && acked.len() == 120,
        "{} users stored, {} batches acknowledged",
        rows.len(),
        acked.len()
    );
    for (user, n) in rows {
        ensure!(
            acked.contains(&user),
            "{user} stored but never acknowledged"
        );
        ensure!(n == 20, "{user}: {n} events stored, the batch has 20");
    }
    Ok(())
}
