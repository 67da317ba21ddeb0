//! Real scorers started in the test process and put behind a ModelDeployment's Service the way
//! pods are: each listens on the real node's address (the host side of its bridge) and has an
//! EndpointSlice of its own, labelled for the Service, whose `ready` condition follows the
//! scorer's `/readyz` as the endpoints controller follows a pod's readiness. The operator finds
//! them exactly as it finds pods. The ModelDeployment runs 0 replicas of its own.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use ndarray::Array2;
use rand::{RngExt as _, SeedableRng as _};
use recsys_core::artifacts::{LocalDirStore, ManifestInput, Registry};
use recsys_core::cf::als::AlsModel;
use recsys_core::cf::interactions::IdMap;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::{TestEnv, http_json};

/// Users of the published models (enough that a 10% canary has a sample of them).
pub const USERS: usize = 200;

/// Scorers of one model, with a local model registry they load from.
pub struct HostScorers {
    _dir: tempfile::TempDir,
    /// The registry the scorers load from.
    pub registry: Registry,
    /// The scorers' addresses.
    pub addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    _scorers: Vec<recsys_scorer::Scorer>,
}

impl Drop for HostScorers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The real node's address (its InternalIP, the host side of the Pod bridge).
pub async fn node_ip(env: &TestEnv, client: &kube::Client) -> anyhow::Result<IpAddr> {
    let name = env
        .var("RECSYS_TEST_REAL_NODE")
        .context("the real node is not up: run tests/env/up.sh as root")?;
    let node = Api::<Node>::all(client.clone()).get(name).await?;
    let ip = node
        .status
        .and_then(|s| s.addresses)
        .into_iter()
        .flatten()
        .find(|a| a.type_ == "InternalIP")
        .context("the real node has no InternalIP")?;
    Ok(ip.address.parse()?)
}

impl HostScorers {
    /// An empty registry in a temporary directory.
    pub fn registry() -> anyhow::Result<(tempfile::TempDir, Registry)> {
        let dir = tempfile::tempdir()?;
        let registry = Registry::new(Arc::new(LocalDirStore::new(dir.path())));
        Ok((dir, registry))
    }

    /// The scorers' registry as a ModelDeployment names it (`file:///…`), so that the operator
    /// records the rollout history where the scorers load from.
    pub fn artifacts_uri(&self) -> String {
        format!("file://{}", self._dir.path().display())
    }

    /// Publishes version `version` of model `model`: [`USERS`] users `u0`, `u1`, …, 40
    /// products, 8 random factors from `seed`.
    pub async fn publish(&self, model: &str, version: &str, seed: u64) -> anyhow::Result<()> {
        self.publish_scaled(model, version, seed, 1.0).await
    }

    /// Like [`Self::publish`], with every factor multiplied by `scale` (see [`publish_synthetic`]).
    pub async fn publish_scaled(
        &self,
        model: &str,
        version: &str,
        seed: u64,
        scale: f32,
    ) -> anyhow::Result<()> {
        publish_synthetic(&self.registry, model, version, seed, scale).await
    }

    /// Starts `n` scorers of `model` in namespace `ns`, following ConfigMap
    /// `<deployment>-routing`, behind Service `<deployment>-scorer`.
    pub async fn start(
        env: &TestEnv,
        client: &kube::Client,
        ns: &str,
        deployment: &str,
        model: &str,
        n: usize,
    ) -> anyhow::Result<Self> {
        Self::start_with(env, client, ns, deployment, model, n, &[]).await
    }

    /// Like [`Self::start`], with `extra` scorer options (for example a shared Redis).
    pub async fn start_with(
        env: &TestEnv,
        client: &kube::Client,
        ns: &str,
        deployment: &str,
        model: &str,
        n: usize,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let (dir, registry) = Self::registry()?;
        let ip = node_ip(env, client).await?;
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
        let mut addrs = vec![];
        let mut tasks = vec![];
        let mut scorers = vec![];
        for i in 0..n {
            let data = dir.path().join(format!("data-{i}"));
            let args = recsys_scorer::Args::try_parse_from(
                [
                    "recsys-scorer",
                    "--artifacts",
                    dir.path().to_str().context("utf-8 path")?,
                    "--data-dir",
                    data.to_str().context("utf-8 path")?,
                    "--routing-configmap",
                    &format!("{deployment}-routing"),
                    "--routing-namespace",
                    ns,
                    "--model",
                    model,
                    "--model-sync-interval",
                    "1s",
                ]
                .into_iter()
                .chain(extra.iter().copied()),
            )?;
            let scorer = recsys_scorer::start_all(&args).await?;
            let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)).await?;
            let addr = listener.local_addr()?;
            let router = scorer.router();
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, router).await;
            }));
            scorers.push(scorer);
            addrs.push(addr);
            // The slice's ready condition follows /readyz, as a pod's readiness would.
            let name = format!("{deployment}-scorer-host-{i}");
            let service = format!("{deployment}-scorer");
            let owner = deployment.to_owned();
            let slices = slices.clone();
            let slice = move |ready: bool| {
                json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": name,
                        // The Service's labels, as the EndpointSlice controller copies them.
                        "labels": {
                            "recsys.io/scorer-for": owner,
                            "kubernetes.io/service-name": service,
                            "endpointslice.kubernetes.io/managed-by": "recsys-tests"
                        }
                    },
                    "addressType": "IPv4",
                    "ports": [{ "name": "http", "port": addr.port(), "protocol": "TCP" }],
                    "endpoints": [{
                        "addresses": [addr.ip().to_string()],
                        "conditions": { "ready": ready, "serving": ready, "terminating": false },
                        "targetRef": { "kind": "Pod", "name": format!("host-scorer-{i}") }
                    }]
                })
            };
            let name = format!("{deployment}-scorer-host-{i}");
            slices
                .patch(
                    &name,
                    &PatchParams::apply("recsys-tests").force(),
                    &Patch::Apply(slice(false)),
                )
                .await?;
            tasks.push(tokio::spawn(async move {
                let mut last = Some(false);
                loop {
                    let ready =
                        matches!(http_json(addr, "GET", "/readyz", None).await, Ok((200, _)));
                    if last != Some(ready) {
                        let applied = slices
                            .patch(
                                &name,
                                &PatchParams::apply("recsys-tests").force(),
                                &Patch::Apply(slice(ready)),
                            )
                            .await;
                        last = applied.ok().map(|_| ready);
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }));
        }
        Ok(Self {
            _dir: dir,
            registry,
            addrs,
            tasks,
            _scorers: scorers,
        })
    }
}

/// Publishes version `version` of model `model` into `registry`: [`USERS`] users `u0`, `u1`,
/// …, 40 products `p0`, …, 8 random factors from `seed`, each multiplied by `scale` (a `scale`
/// other than 1 gives the same rankings with scores `scale²` times as large: a skewed score
/// distribution).
pub async fn publish_synthetic(
    registry: &Registry,
    model: &str,
    version: &str,
    seed: u64,
    scale: f32,
) -> anyhow::Result<()> {
    let users = IdMap::from_ids((0..USERS).map(|u| format!("u{u}")).collect());
    let items = IdMap::from_ids((0..40).map(|i| format!("p{i}")).collect());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut random =
        |rows: usize| Array2::from_shape_fn((rows, 8), |_| rng.random_range(-0.5..0.5_f32) * scale);
    let factors = AlsModel {
        user_factors: random(USERS),
        item_factors: random(40),
        regularization: 0.05,
    };
    let input = ManifestInput {
        version: Some(version.to_owned()),
        ..ManifestInput::default()
    };
    registry
        .publish(model, &factors, &users, &items, input)
        .await?;
    Ok(())
}

/// Waits up to `timeout` until every scorer at `addrs` answers every seventh of the [`USERS`]
/// with `version`.
pub async fn every_user_on(
    addrs: &[SocketAddr],
    version: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    crate::wait_for(
        timeout,
        &format!("every user answered by {version}"),
        || async {
            for addr in addrs {
                for u in (0..USERS).step_by(7) {
                    let path = format!("/v1/recommendations?user_id=u{u}&k=5");
                    let (status, body) = http_json(*addr, "GET", &path, None).await?;
                    if status != 200 || body["version"] != json!(version) {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        },
    )
    .await
}

/// A bounded request loop over scorers: one `GET /v1/recommendations` at a time, round robin
/// over the scorers and the [`USERS`], until stopped.
pub struct RequestLoop {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<LoopReport>,
}

/// What a [`RequestLoop`] saw.
#[derive(Clone, Debug, Default)]
pub struct LoopReport {
    /// Requests sent.
    pub sent: usize,
    /// Requests not answered 200: (status or transport error, body).
    pub failed: Vec<String>,
    /// The version that last answered each user.
    pub last_version: std::collections::BTreeMap<String, String>,
}

impl RequestLoop {
    /// Starts the loop over `addrs`, a request every `pause` at most.
    pub fn start(addrs: Vec<SocketAddr>, pause: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut report = LoopReport::default();
            let mut i = 0usize;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let addr = addrs[i % addrs.len()];
                let user = format!("u{}", i % USERS);
                i += 1;
                report.sent += 1;
                let path = format!("/v1/recommendations?user_id={user}&k=5");
                match http_json(addr, "GET", &path, None).await {
                    Ok((200, body)) => {
                        let version = body["version"].as_str().unwrap_or("none").to_owned();
                        report.last_version.insert(user, version);
                    }
                    Ok((status, body)) => report.failed.push(format!("{status}: {body}")),
                    Err(e) => report.failed.push(format!("{addr}: {e:#}")),
                }
                tokio::time::sleep(pause).await;
            }
            report
        });
        Self { stop, task }
    }

    /// Stops the loop and reports.
    pub async fn stop(self) -> anyhow::Result<LoopReport> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(self.task.await?)
    }
}
