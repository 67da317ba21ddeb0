//! SIGTERM under load, on the real `recsys-scorer` binary (model in S3, histories in Postgres,
//! user states in Redis, all of the test environment): readiness fails first, requests keep
//! being served through the shutdown delay, the process exits 0 within the grace period, and
//! not one request fails. With debug logs on, the bearer token used throughout appears nowhere
//! in the logs.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use recsys_tests::recommend::Fixture;
use recsys_tests::{OwnRedis, TestEnv, http_full, http_json, unique_redis_prefix, wait_for};
use serde_json::json;

const TOKEN: &str = "sigterm-test-token-0123456789";

#[tokio::test]
async fn sigterm_under_load_fails_no_request_and_logs_no_token() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let f = Fixture::build(&env, "sigterm").await?;
    let tokens = tempfile::tempdir()?;
    std::fs::write(tokens.path().join("shop"), TOKEN)?;
    let logs = tempfile::NamedTempFile::new()?;
    let port = OwnRedis::free_port()?;
    let bind = format!("127.0.0.1:{port}");
    let dir = tokens.path().to_string_lossy().into_owned();
    let argv = f.argv(
        env.var("RECSYS_TEST_REDIS_URL")?,
        &unique_redis_prefix("hard", "sigterm"),
        &[
            "--bind-address",
            &bind,
            "--auth-tokens-dir",
            &dir,
            "--shutdown-delay",
            "2s",
            "--shutdown-grace",
            "10s",
        ],
    )?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_recsys-scorer"))
        .args(&argv[1..])
        .env("RUST_LOG", "debug,h2=info,hyper=info,aws=info,rustls=info")
        .stdout(Stdio::null())
        .stderr(logs.reopen()?)
        .kill_on_drop(true)
        .spawn()?;
    let addr = bind.parse()?;
    wait_for(Duration::from_secs(180), "scorer ready", || async {
        Ok(http_json(addr, "GET", "/readyz", None)
            .await
            .is_ok_and(|(s, _)| s == 200))
    })
    .await?;

    // Four clients; a watcher plays the endpoints controller: once /readyz fails, no new
    // request is sent to this scorer.
    let removed = Arc::new(AtomicBool::new(false));
    let signalled = Arc::new(AtomicBool::new(false));
    let (sent, after_signal) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = vec![];
    for c in 0..4 {
        let (removed, signalled) = (removed.clone(), signalled.clone());
        let (sent, after_signal) = (sent.clone(), after_signal.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = vec![];
            let mut i = 0i64;
            while !removed.load(Ordering::SeqCst) {
                i += 1;
                let late = signalled.load(Ordering::SeqCst);
                let result = if i % 5 == 0 {
                    let body = json!({"events": [{"user_id": format!("term-{c}"), "product_id": "p1",
                        "event_type": "click", "timestamp": 1_700_000_000_000i64 + i}]});
                    let auth = format!("Bearer {TOKEN}");
                    http_full(addr, "POST", "/v1/events", &[("authorization", &auth)], Some(body))
                        .await
                        .map(|(s, _, v)| (s, v))
                } else {
                    http_json(addr, "GET", &format!("/v1/recommendations?user_id=u{}&k=5", i % 50), None).await
                };
                sent.fetch_add(1, Ordering::SeqCst);
                if late {
                    after_signal.fetch_add(1, Ordering::SeqCst);
                }
                match result {
                    Ok((200 | 202, _)) => {}
                    Ok((s, v)) => failures.push(format!("{s} {v}")),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        }));
    }
    let watcher = {
        let removed = removed.clone();
        tokio::spawn(async move {
            loop {
                match http_json(addr, "GET", "/readyz", None).await {
                    Ok((200, _)) => {}
                    _ => {
                        removed.store(true, Ordering::SeqCst);
                        return Instant::now();
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = child.id().context("scorer pid")?;
    let t0 = Instant::now();
    signalled.store(true, Ordering::SeqCst);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -TERM");
    let not_ready_at = watcher.await?;
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .context("the scorer did not exit within delay + grace")??;
    let exited = t0.elapsed();
    let mut failures = vec![];
    for c in clients {
        failures.extend(c.await?);
    }
    let log = std::fs::read_to_string(logs.path())?;
    println!(
        "SIGTERM: {} requests, {} sent after the signal, not ready after {:?}, exited after {:?} ({exit}), {} failed",
        sent.load(Ordering::SeqCst),
        after_signal.load(Ordering::SeqCst),
        not_ready_at.duration_since(t0),
        exited,
        failures.len()
    );
    ensure!(
        failures.is_empty(),
        "failed requests: {:?}",
        &failures[..failures.len().min(5)]
    );
    ensure!(exit.success(), "exit status {exit}");
    ensure!(
        not_ready_at.duration_since(t0) < Duration::from_secs(1),
        "readiness did not fail promptly"
    );
    ensure!(
        exited >= Duration::from_secs(2),
        "exited before the shutdown delay: {exited:?}"
    );
    ensure!(
        after_signal.load(Ordering::SeqCst) > 0,
        "no request was sent after the signal"
    );
    ensure!(
        log.contains("SIGTERM received"),
        "no SIGTERM line in the log"
    );
    ensure!(
        log.contains("in-flight requests finished"),
        "no drain line in the log"
    );
    ensure!(
        log.contains("/v1/events"),
        "the debug log does not show requests: {} bytes",
        log.len()
    );
    ensure!(!log.contains(TOKEN), "the token appears in the log");
    Ok(())
}
