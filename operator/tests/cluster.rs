//! The operator as a local process against the real test cluster: conditions and
//! observedGeneration on each kind, recovery after a crash, BatchJob children and runs that
//! complete on a kwok node, lineage and deletion protection, and leader election.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use recsys_crds::common::find_condition;
use recsys_crds::{BatchJob, FeatureDefinition, ModelDeployment};
use recsys_tests::{TestEnv, TestNamespace, example, install_crds, wait_for};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(45);

/// A running `recsys-operator` process, killed when dropped.
struct Operator {
    child: Child,
    metrics: String,
    probes: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Operator {
    async fn start(env: &TestEnv, ns: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let (m, p) = (free_port()?, free_port()?);
        let log_dir = std::env::temp_dir().join("recsys-operator-tests");
        std::fs::create_dir_all(&log_dir)?;
        let log = std::fs::File::create(log_dir.join(format!("{ns}-{m}.log")))?;
        let child = Command::new(env!("CARGO_BIN_EXE_recsys-operator"))
            .env("KUBECONFIG", env.var("KUBECONFIG")?)
            .env("RUST_LOG", "info,kube=warn")
            .args([
                &format!("--watch-namespace={ns}"),
                &format!("--metrics-bind-address=127.0.0.1:{m}"),
                &format!("--health-probe-bind-address=127.0.0.1:{p}"),
                "--trainer-image=registry.invalid/recsys-trainer:test",
            ])
            .args(extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()?;
        let op = Self {
            child,
            metrics: format!("http://127.0.0.1:{m}/metrics"),
            probes: format!("http://127.0.0.1:{p}"),
        };
        let ready = format!("{}/readyz", op.probes);
        wait_for(WAIT, "operator /readyz", || async {
            Ok(http_get(&ready).await?.0 == 200)
        })
        .await?;
        Ok(op)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn metric(&self, name: &str) -> anyhow::Result<Option<f64>> {
        let (_, body) = http_get(&self.metrics).await?;
        Ok(body
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok()))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.1 GET over loopback: (status, body).
async fn http_get(url: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("not http: {url}"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(
            format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut buf = String::new();
    stream.read_to_string(&mut buf).await?;
    let status = buf
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

async fn apply<K>(api: &Api<K>, name: &str, body: &serde_json::Value) -> anyhow::Result<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api
        .patch(
            name,
            &PatchParams::apply("recsys-tests").force(),
            &Patch::Apply(body),
        )
        .await?)
}

/// Waits until `Accepted` and `Ready` have the given statuses (and Ready the reason), and
/// `status.observedGeneration` equals `metadata.generation`.
async fn wait_conditions<K>(
    api: &Api<K>,
    name: &str,
    accepted: &str,
    ready: &str,
    reason: &str,
) -> anyhow::Result<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    let what =
        format!("{name}: Accepted={accepted} Ready={ready}/{reason} at the current generation");
    wait_for(WAIT, &what, || async {
        let obj = api.get(name).await?;
        let v = serde_json::to_value(&obj)?;
        let status = &v["status"];
        let conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> =
            serde_json::from_value(status["conditions"].clone()).unwrap_or_default();
        let generation = obj.meta().generation;
        let ok = status["observedGeneration"].as_i64() == generation
            && find_condition(&conditions, "Accepted")
                .is_some_and(|c| c.status == accepted && c.observed_generation == generation)
            && find_condition(&conditions, "Ready")
                .is_some_and(|c| c.status == ready && c.reason == reason);
        Ok(ok)
    })
    .await?;
    Ok(api.get(name).await?)
}

async fn events(client: &Client, ns: &str, name: &str) -> anyhow::Result<Vec<(String, String)>> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = api.list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
        .collect())
}

async fn setup(prefix: &str) -> anyhow::Result<(TestEnv, Client, TestNamespace)> {
    let env = TestEnv::load()?;
    let client = env.client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::create(&env, &client, prefix).await?;
    Ok((env, client, ns))
}

#[tokio::test]
async fn conditions_generation_children_and_recovery_after_a_crash() -> anyhow::Result<()> {
    let (env, client, ns) = setup("op").await?;
    let mut op = Operator::start(&env, &ns.name, &[]).await?;
    let fds: Api<FeatureDefinition> = Api::namespaced(client.clone(), &ns.name);
    let bjs: Api<BatchJob> = Api::namespaced(client.clone(), &ns.name);
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cronjobs: Api<CronJob> = Api::namespaced(client.clone(), &ns.name);

    let mut fd_body = example("featuredefinition", &ns.name)?;
    let mut bj_body = example("batchjob", &ns.name)?;
    apply(&fds, "popularity-score-v1", &fd_body).await?;
    apply(&bjs, "popularity", &bj_body).await?;
    apply(&mds, "als", &example("modeldeployment", &ns.name)?).await?;

    wait_conditions(&fds, "popularity-score-v1", "True", "True", "Resolved").await?;
    let bj = wait_conditions(&bjs, "popularity", "True", "True", "Scheduled").await?;
    let md = wait_conditions(&mds, "als", "True", "False", "RolloutNotImplemented").await?;
    assert_eq!(
        md.status.and_then(|s| s.candidate_version).as_deref(),
        Some("20261126-0200")
    );

    // The scheduled BatchJob owns a CronJob running the trainer subcommand.
    let cj = cronjobs.get("popularity").await?;
    assert_eq!(cj.owner_references()[0].uid, bj.uid().unwrap_or_default());
    let spec = cj.spec.clone().unwrap_or_default();
    assert_eq!(spec.schedule, "*/5 * * * *");
    let job = spec.job_template.spec.unwrap_or_default();
    assert_eq!(job.backoff_limit, Some(2));
    let args = job.template.spec.unwrap_or_default().containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert_eq!(args, ["popularity", "--half-life=7d", "--window=90d"]);

    // Events tell the story.
    let evs = events(&client, &ns.name, "popularity-score-v1").await?;
    assert!(
        evs.contains(&("Normal".into(), "Accepted".into())),
        "{evs:?}"
    );

    // Metrics count reconciliations per controller.
    let n = op
        .metric("recsys_operator_reconciles_total{controller=\"featuredefinition\"}")
        .await?;
    assert!(n.is_some_and(|n| n >= 1.0), "{n:?}");

    // Crash; change specs while no operator runs; a new process catches up.
    op.kill();
    fd_body["spec"]["description"] = json!("Popularity, decayed, over 90 days.");
    bj_body["spec"]["suspend"] = json!(true);
    let fd = apply(&fds, "popularity-score-v1", &fd_body).await?;
    let bj = apply(&bjs, "popularity", &bj_body).await?;
    assert_eq!(
        (fd.meta().generation, bj.meta().generation),
        (Some(2), Some(2))
    );
    let _op = Operator::start(&env, &ns.name, &[]).await?;
    wait_conditions(&fds, "popularity-score-v1", "True", "True", "Resolved").await?;
    wait_conditions(&bjs, "popularity", "True", "True", "Suspended").await?;
    wait_for(WAIT, "CronJob suspended", || async {
        Ok(cronjobs
            .get("popularity")
            .await?
            .spec
            .and_then(|s| s.suspend)
            == Some(true))
    })
    .await?;

    // A spec the schema accepts but the operator cannot: minute 61. Rejected with the field,
    // and a Warning Event.
    bj_body["spec"]["schedule"] = json!("61 * * * *");
    bj_body["spec"]["suspend"] = json!(false);
    apply(&bjs, "popularity", &bj_body).await?;
    let bj = wait_conditions(&bjs, "popularity", "False", "False", "InvalidSpec").await?;
    let accepted = bj
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Accepted");
    let message = accepted.map(|c| c.message).unwrap_or_default();
    assert!(
        message.contains("spec.schedule") && message.contains("61 * * * *"),
        "{message}"
    );
    let evs = events(&client, &ns.name, "popularity").await?;
    assert!(
        evs.contains(&("Warning".into(), "InvalidSpec".into())),
        "{evs:?}"
    );
    Ok(())
}

#[tokio::test]
async fn on_demand_run_completes_on_a_kwok_node() -> anyhow::Result<()> {
    let (env, client, ns) = setup("run").await?;
    let _op = Operator::start(&env, &ns.name, &[]).await?;
    let bjs: Api<BatchJob> = Api::namespaced(client.clone(), &ns.name);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let body = json!({
        "apiVersion": "recsys.io/v1alpha1", "kind": "BatchJob",
        "metadata": { "name": "backfill", "namespace": ns.name, "annotations": { "recsys.io/run": "first" } },
        "spec": {
            "job": "backfill",
            "backfill": { "features": ["popularity_score"], "from": "2026-11-01T00:00:00Z", "to": "2026-11-08T00:00:00Z" }
        }
    });
    apply(&bjs, "backfill", &body).await?;
    wait_conditions(&bjs, "backfill", "True", "True", "OnDemand").await?;
    // The Job runs on the fake node (scheduler + kwok) and completes (Job controller).
    wait_for(WAIT, "backfill run recorded as Succeeded", || async {
        let bj = bjs.get("backfill").await?;
        let status = bj.status.unwrap_or_default();
        Ok(status
            .history
            .first()
            .is_some_and(|r| r.outcome == "Succeeded")
            && status.last_successful_time.is_some())
    })
    .await?;
    let list = jobs
        .list(&ListParams::default().labels("recsys.io/batchjob=backfill"))
        .await?;
    assert_eq!(list.items.len(), 1, "one request, one Job");
    let job = &list.items[0];
    let args = job
        .spec
        .clone()
        .unwrap_or_default()
        .template
        .spec
        .unwrap_or_default()
        .containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert_eq!(args[0], "backfill");
    assert!(
        args.contains(&"--features=popularity_score".to_owned()),
        "{args:?}"
    );
    let evs = events(&client, &ns.name, "backfill").await?;
    assert!(
        evs.contains(&("Normal".into(), "RunSucceeded".into())),
        "{evs:?}"
    );
    Ok(())
}

#[tokio::test]
async fn lineage_resolves_and_features_in_use_are_protected() -> anyhow::Result<()> {
    let (env, client, ns) = setup("fd").await?;
    let _op = Operator::start(&env, &ns.name, &[]).await?;
    let fds: Api<FeatureDefinition> = Api::namespaced(client.clone(), &ns.name);
    let feature = |k8s: &str, name: &str, inputs: &[&str]| {
        json!({
            "apiVersion": "recsys.io/v1alpha1", "kind": "FeatureDefinition",
            "metadata": { "name": k8s, "namespace": ns.name },
            "spec": {
                "name": name, "entity": "product", "version": "1.0.0", "valueType": "float",
                "description": "test", "owner": "tests", "ttl": "1h",
                "computation": { "job": "popularity", "logic": "test" },
                "lineage": { "features": inputs }
            }
        })
    };
    apply(&fds, "ctr", &feature("ctr", "ctr", &["clicks"])).await?;
    let ctr = wait_conditions(&fds, "ctr", "True", "False", "UnresolvedLineage").await?;
    let ready = ctr
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready");
    assert!(ready.is_some_and(|c| c.message.contains("clicks")));

    apply(&fds, "clicks", &feature("clicks", "clicks", &[])).await?;
    wait_conditions(&fds, "clicks", "True", "True", "Resolved").await?;
    wait_conditions(&fds, "ctr", "True", "True", "Resolved").await?;

    // `clicks` is read by `ctr`: deleting it waits.
    fds.delete("clicks", &DeleteParams::default()).await?;
    wait_for(WAIT, "FeatureInUse warning", || async {
        Ok(events(&client, &ns.name, "clicks")
            .await?
            .contains(&("Warning".into(), "FeatureInUse".into())))
    })
    .await?;
    let clicks = fds.get("clicks").await?;
    assert!(clicks.meta().deletion_timestamp.is_some());
    assert!(
        clicks
            .finalizers()
            .iter()
            .any(|f| f == "featuredefinitions.recsys.io/in-use-protection")
    );

    // Once nothing reads it, it goes.
    fds.delete("ctr", &DeleteParams::default()).await?;
    wait_for(WAIT, "both features deleted", || async {
        Ok(fds.get_opt("clicks").await?.is_none() && fds.get_opt("ctr").await?.is_none())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn one_leader_acts_and_a_standby_takes_over() -> anyhow::Result<()> {
    let (env, client, ns) = setup("lease").await?;
    let lease_args = [
        "--leader-elect",
        &format!("--leader-election-namespace={}", ns.name),
    ];
    let mut a = Operator::start(&env, &ns.name, &lease_args).await?;
    let mut b = Operator::start(&env, &ns.name, &lease_args).await?;

    let leaders = |a: &Operator, b: &Operator| {
        let (ma, mb) = (a.metrics.clone(), b.metrics.clone());
        async move {
            let get = |url: String| async move {
                let (_, body) = http_get(&url).await?;
                anyhow::Ok(body.lines().any(|l| l == "recsys_operator_leader 1"))
            };
            anyhow::Ok((get(ma).await?, get(mb).await?))
        }
    };
    wait_for(WAIT, "exactly one leader", || async {
        let (la, lb) = leaders(&a, &b).await?;
        Ok(la ^ lb)
    })
    .await?;
    // Hold a little longer: still exactly one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (la, lb) = leaders(&a, &b).await?;
    assert!(la ^ lb, "leaders: a={la} b={lb}");

    let fds: Api<FeatureDefinition> = Api::namespaced(client.clone(), &ns.name);
    let mut body = example("featuredefinition", &ns.name)?;
    apply(&fds, "popularity-score-v1", &body).await?;
    wait_conditions(&fds, "popularity-score-v1", "True", "True", "Resolved").await?;

    // The leader dies without releasing; the standby takes over once the lease expires.
    let standby = if la {
        a.kill();
        &b
    } else {
        b.kill();
        &a
    };
    wait_for(
        Duration::from_secs(60),
        "standby becomes leader",
        || async { Ok(standby.metric("recsys_operator_leader").await? == Some(1.0)) },
    )
    .await?;
    body["spec"]["description"] = json!("changed after failover");
    apply(&fds, "popularity-score-v1", &body).await?;
    let fd = wait_conditions(&fds, "popularity-score-v1", "True", "True", "Resolved").await?;
    assert_eq!(fd.meta().generation, Some(2));
    Ok(())
}
