//! Harness of the integration tests: finds the test environment started by
//! `tests/env/up.sh` (through its `env` file or the variables it exports), connects clients,
//! and gives each test its own namespace.
//!
//! Integration tests fail, never skip, when the environment is missing: run them through
//! `bash tests/run`, which starts it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, Config};
use tokio::sync::OnceCell;

pub mod experiments;
pub mod monitoring;
pub mod real_node;
pub mod recommend;
pub mod scorers;
pub mod venv;

pub use venv::Venv;

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Endpoints of the test environment.
#[derive(Clone, Debug)]
pub struct TestEnv {
    vars: BTreeMap<String, String>,
}

impl TestEnv {
    /// Reads the environment: process variables first, then the `env` file of the state dir
    /// (`$RECSYS_TESTENV_DIR` or `target/testenv`).
    pub fn load() -> anyhow::Result<Self> {
        let dir = std::env::var("RECSYS_TESTENV_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join("target/testenv"));
        let file = dir.join("env");
        let mut vars = BTreeMap::new();
        // `env` from up.sh; `images.env` from images.sh (the images built for the real node).
        let text = ["env", "images.env"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
            .collect::<Vec<_>>()
            .join("\n");
        if !text.is_empty() {
            for line in text.lines() {
                let Some(rest) = line.trim().strip_prefix("export ") else {
                    continue;
                };
                if let Some((k, v)) = rest.split_once('=') {
                    vars.insert(
                        k.to_owned(),
                        v.trim_matches('"').trim_matches('\'').to_owned(),
                    );
                }
            }
        }
        for (k, v) in std::env::vars() {
            if k.starts_with("RECSYS_TEST") || k == "KUBECONFIG" || k.starts_with("AWS_") {
                vars.insert(k, v);
            }
        }
        if !vars.contains_key("KUBECONFIG") {
            bail!(
                "no test environment: {} is missing and RECSYS_TEST_* / KUBECONFIG are unset. \
                 Start it with `bash tests/env/up.sh` or run everything with `bash tests/run`",
                file.display()
            );
        }
        Ok(Self { vars })
    }

    /// A variable of the environment, or an error naming it.
    pub fn var(&self, name: &str) -> anyhow::Result<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .with_context(|| format!("{name} is not set by the test environment (tests/env/up.sh)"))
    }

    /// The S3 options of the environment's server (path-style, its credentials).
    pub fn s3_args(
        &self,
        checksums: recsys_core::stores::ChecksumMode,
    ) -> anyhow::Result<recsys_core::stores::S3Args> {
        Ok(recsys_core::stores::S3Args {
            endpoint: Some(self.var("RECSYS_TEST_S3_ENDPOINT")?.to_owned()),
            region: self.var("RECSYS_TEST_S3_REGION")?.to_owned(),
            force_path_style: true,
            checksums,
            access_key_id: Some(self.var("AWS_ACCESS_KEY_ID")?.to_owned()),
            secret_access_key: Some(self.var("AWS_SECRET_ACCESS_KEY")?.to_owned()),
        })
    }

    /// Creates an empty Postgres database `t_<prefix>_<random>` and returns its URL: for tests
    /// whose jobs read whole tables (the events table), which other tests also write.
    /// Databases are left behind (the environment is disposable); they are small.
    pub async fn fresh_database(&self, prefix: &str) -> anyhow::Result<String> {
        use sqlx::Connection as _;
        anyhow::ensure!(
            prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "database prefix {prefix:?}: use [a-z0-9_]"
        );
        let url = self.var("RECSYS_TEST_DATABASE_URL")?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let name = format!(
            "t_{prefix}_{:x}_{:x}",
            std::process::id(),
            nanos & 0xff_ffff_ffff
        );
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
        conn.close().await?;
        let (base, _db) = url
            .rsplit_once('/')
            .with_context(|| format!("{url}: no database name"))?;
        Ok(format!("{base}/{name}"))
    }

    /// A Kubernetes client with the admin kubeconfig.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.var("KUBECONFIG")?)?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// Path of the `kubectl` and `helm` binaries directory, prepended to `PATH` for commands.
    pub fn path_with_tools(&self) -> String {
        let base = std::env::var("PATH").unwrap_or_default();
        match self.vars.get("RECSYS_TESTENV_DIR") {
            Some(dir) => format!("{dir}/bin:{base}"),
            None => base,
        }
    }

    /// A `Command` with the environment's variables and tools on `PATH`.
    pub fn command(&self, program: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new(program);
        cmd.env("PATH", self.path_with_tools());
        for (k, v) in &self.vars {
            if k != "PATH" {
                cmd.env(k, v);
            }
        }
        cmd
    }
}

static CRDS: OnceCell<()> = OnceCell::const_new();

/// Installs the CRDs (server-side apply, as a user would upgrade them) once per test
/// process and waits until they are Established.
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    CRDS.get_or_try_init(|| async {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in recsys_crds::crds() {
            let name = crd.metadata.name.clone().context("crd name")?;
            api.patch(
                &name,
                &PatchParams::apply("recsys-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .with_context(|| format!("applying CRD {name}"))?;
        }
        for crd in recsys_crds::crds() {
            let name = crd.metadata.name.clone().context("crd name")?;
            wait_for(
                Duration::from_secs(30),
                &format!("CRD {name} Established"),
                || async {
                    let c = api.get(&name).await?;
                    Ok(c.status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True"))
                },
            )
            .await?;
        }
        anyhow::Ok(())
    })
    .await?;
    Ok(())
}

/// A namespace of one test, deleted when dropped (in the background).
pub struct TestNamespace {
    /// Its name.
    pub name: String,
    env: TestEnv,
}

impl TestNamespace {
    /// Creates `recsys-test-<prefix>-<random>`.
    pub async fn create(env: &TestEnv, client: &Client, prefix: &str) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let name = format!(
            "rt-{prefix}-{:x}{:x}",
            std::process::id() & 0xfff,
            nanos & 0xfffff
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "recsys.io/test": "true" } }
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        // The ServiceAccount controller creates `default`; pods need it.
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), &name);
        wait_for(
            Duration::from_secs(30),
            "default ServiceAccount",
            || async { Ok(sa.get_opt("default").await?.is_some()) },
        )
        .await?;
        Ok(Self {
            name,
            env: env.clone(),
        })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // The test's runtime is shutting down here, so ask kubectl. The operator of the test
        // is gone by now, so the finalizers it put on recsys objects (a FeatureDefinition's
        // in-use protection) are cleared first, or the namespace would stay Terminating and
        // keep the namespace controller busy. Deletion finishes in the background.
        let script = r#"
ns="$1"
kubectl get -n "$ns" featuredefinitions.recsys.io,batchjobs.recsys.io,modeldeployments.recsys.io -o name 2>/dev/null |
while read -r obj; do
  kubectl patch -n "$ns" "$obj" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1
done
kubectl delete namespace "$ns" --wait=false --ignore-not-found >/dev/null 2>&1
"#;
        let _ = self
            .env
            .command("bash")
            .args(["-c", script, "bash", &self.name])
            .output();
    }
}

/// Polls `check` every 200 ms until it returns true, failing after `timeout` with `what`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The example manifest of a kind under `docs/examples/`, moved into namespace `ns`.
/// FeatureDefinition's example is `popularity_score`, one of the shipped features.
pub fn example(kind: &str, ns: &str) -> anyhow::Result<serde_json::Value> {
    let file = match kind.to_lowercase().as_str() {
        "featuredefinition" => "features/popularity-score".to_owned(),
        other => other.to_owned(),
    };
    let mut v = manifest(&format!("docs/examples/{file}.yaml"))?;
    v["metadata"]["namespace"] = serde_json::json!(ns);
    Ok(v)
}

/// Reads a YAML manifest under the repository root.
pub fn manifest(path: &str) -> anyhow::Result<serde_json::Value> {
    let full = repo_root().join(path);
    let text = std::fs::read_to_string(&full).with_context(|| full.display().to_string())?;
    Ok(serde_yaml::from_str(&text)?)
}

/// One HTTP/1 request to a server under test: `(status, body as JSON)`; a body that is not
/// JSON comes back as a JSON string.
pub async fn http_json(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let (status, _, v) = http_full(addr, method, path, &[], body).await?;
    Ok((status, v))
}

/// [`http_json`] with request headers; also returns the answer's headers.
pub async fn http_full(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, hyper::HeaderMap, serde_json::Value)> {
    use http_body_util::BodyExt as _;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            hyper::body::Bytes::from(b.to_string())
        }
        None => hyper::body::Bytes::new(),
    };
    let resp = sender
        .send_request(req.body(http_body_util::Full::new(body))?)
        .await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    Ok((status, headers, v))
}

/// The value of the first line of a Prometheus text exposition that starts with
/// `line_start` (a series with its labels, e.g. `user_state_requests_total{cache="hit"}`);
/// 0 when there is none.
pub fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A redis-server of one test (to kill, freeze and restart under load without disturbing the
/// environment's shared one), killed when dropped. Needs `redis-server` on `PATH`, which
/// `tests/env/up.sh` installs.
pub struct OwnRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    /// A free port on 127.0.0.1.
    pub fn free_port() -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    }

    /// Starts a server on `port` and waits until it answers.
    pub async fn start(port: u16) -> anyhow::Result<Self> {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting redis-server (is it installed? tests/env/up.sh needs it too)")?;
        let me = Self {
            port,
            child: Some(child),
        };
        let url = me.url();
        wait_for(
            Duration::from_secs(10),
            "own redis-server answering",
            || async {
                let client = redis::Client::open(url.as_str())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
                Ok(pong == "PONG")
            },
        )
        .await?;
        Ok(me)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Its process id.
    pub fn pid(&self) -> anyhow::Result<u32> {
        Ok(self.child.as_ref().context("not running")?.id())
    }

    /// Sends `sig` (`-STOP`, `-CONT`, ...) to it.
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args([sig, &self.pid()?.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {sig} failed");
        Ok(())
    }

    /// Kills it and waits for it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A frozen server must be thawed to die cleanly.
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        let _ = self.kill();
    }
}

/// A Redis key prefix unique to one test run, `rt-<area>-<tag>-<pid>-<time>` (at most 64
/// characters, the stores' limit), so tests sharing the environment's Redis never meet.
pub fn unique_redis_prefix(area: &str, tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let tag: String = tag.replace('_', "-").chars().take(32).collect();
    format!(
        "rt-{area}-{tag}-{:x}-{:x}",
        std::process::id(),
        nanos & 0xffff_ffff
    )
}

/// Every Redis key under `prefix` (`{prefix}:*`), by `SCAN`.
pub async fn redis_keys_under<T: redis::FromRedisValue>(
    conn: &mut redis::aio::ConnectionManager,
    prefix: &str,
) -> anyhow::Result<Vec<T>> {
    let mut cursor = 0u64;
    let mut all = Vec::new();
    loop {
        let (next, keys): (u64, Vec<T>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        all.extend(keys);
        if next == 0 {
            return Ok(all);
        }
        cursor = next;
    }
}
