//! Alerting rules judged by a real Prometheus: a metrics exposition is served on 127.0.0.1,
//! the `prometheus` binary (Debian's package, which `tests/env/up.sh` installs) scrapes it
//! every second and evaluates the rules every second, and the test reads which alerts fire.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::{OwnRedis, http_json, wait_for};

/// An alert: its name and its labels (`alertname` included).
pub type Alert = (String, BTreeMap<String, String>);

/// The alerts firing once Prometheus has evaluated `rules` on a scrape of `exposition`
/// (for rules with `for: 0m`; longer ones are pending at most). Fails when Prometheus does not
/// get there within `wait`.
pub async fn firing_alerts(
    rules: &Path,
    exposition: String,
    wait: Duration,
) -> anyhow::Result<Vec<Alert>> {
    let prometheus = Prometheus::start(rules, exposition, wait).await?;
    prometheus.firing_alerts(wait).await
}

/// A Prometheus server of one test, on a free port of 127.0.0.1, scraping a fixed exposition
/// as job `recsys` and evaluating a rules file; killed (with the exposition's server) when
/// dropped.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    target: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.target.abort();
    }
}

impl Prometheus {
    /// Serves `exposition` at `/metrics` (as the operator does: OpenMetrics text), starts
    /// Prometheus with `rules` and waits until it is ready.
    pub async fn start(rules: &Path, exposition: String, wait: Duration) -> anyhow::Result<Self> {
        let rules = std::fs::canonicalize(rules).with_context(|| rules.display().to_string())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let target_addr = listener.local_addr()?;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let body = exposition.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        );
        let target = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });

        let dir = tempfile::tempdir()?;
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{rules:?}]\n\
             scrape_configs:\n  - job_name: recsys\n    static_configs:\n      - targets: [\"{target_addr}\"]\n"
        );
        let (child, port) = spawn_prometheus(dir.path(), &config)?;
        let mut me = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            target,
            dir,
        };
        // Not `wait_for`: a Prometheus that refused the rules exits, and says why.
        let start = Instant::now();
        loop {
            me.exited()?;
            if http_json(me.addr, "GET", "/-/ready", None)
                .await
                .is_ok_and(|(s, _)| s == 200)
            {
                return Ok(me);
            }
            if start.elapsed() > wait {
                bail!("Prometheus not ready after {wait:?}:\n{}", me.log()?);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Prometheus's log so far (warnings and errors).
    pub fn log(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(
            self.dir.path().join("prometheus.log"),
        )?)
    }

    fn exited(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("prometheus exited ({status}):\n{}", self.log()?);
        }
        Ok(())
    }

    /// An instant query: the `data` of the answer; an error with Prometheus's own message when
    /// the query is refused.
    pub async fn query(&self, promql: &str) -> anyhow::Result<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) = http_json(self.addr, "GET", &path, None).await?;
        if status != 200 || body["status"] != "success" {
            bail!("query {promql:?}: {status} {body}");
        }
        Ok(body["data"].clone())
    }

    /// The alerts firing once every rule group has been evaluated after the exposition was
    /// scraped (and stored): rules with `for: 0m` have fired by then, longer ones are pending.
    pub async fn firing_alerts(&self, wait: Duration) -> anyhow::Result<Vec<Alert>> {
        // `up` is stored with the scraped samples, in the same commit.
        wait_for(wait, "the exposition scraped", || async {
            let data = self.query("up == 1").await?;
            Ok(data["result"].as_array().is_some_and(|r| !r.is_empty()))
        })
        .await?;
        // An evaluation started a full interval later sees the samples (its timestamp is
        // aligned down to the interval).
        let after = Timestamp::now() + SignedDuration::from_secs(1);
        wait_for(
            wait,
            "every rule group evaluated after the scrape",
            || async {
                let (status, body) = http_json(self.addr, "GET", "/api/v1/rules", None).await?;
                anyhow::ensure!(status == 200, "rules: {status} {body}");
                let groups = body["data"]["groups"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                anyhow::ensure!(!groups.is_empty(), "no rule group loaded: {body}");
                Ok(groups.iter().all(|g| {
                    g["lastEvaluation"]
                        .as_str()
                        .and_then(|t| t.parse::<Timestamp>().ok())
                        .is_some_and(|t| t > after)
                }))
            },
        )
        .await?;
        let (status, body) = http_json(self.addr, "GET", "/api/v1/alerts", None).await?;
        anyhow::ensure!(status == 200, "alerts: {status} {body}");
        let mut firing = vec![];
        for a in body["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            if a["state"] != "firing" {
                continue;
            }
            let labels: BTreeMap<String, String> = serde_json::from_value(a["labels"].clone())?;
            let name = labels.get("alertname").cloned().unwrap_or_default();
            firing.push((name, labels));
        }
        firing.sort();
        Ok(firing)
    }
}

/// `s` percent-encoded for a query string (every byte but the unreserved ones).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Starts the `prometheus` binary (Debian's package, which `tests/env/up.sh` installs) with
/// `config` as its configuration, its data and log (`prometheus.log`) under `dir`, on a free
/// port of 127.0.0.1; returns the process and the port.
pub fn spawn_prometheus(dir: &Path, config: &str) -> anyhow::Result<(Child, u16)> {
    std::fs::write(dir.join("prometheus.yml"), config)?;
    let port = OwnRedis::free_port()?;
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting prometheus (tests/env/up.sh installs Debian's package)")?;
    Ok((child, port))
}
