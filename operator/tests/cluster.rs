//! The operator as a local process against the real test cluster: conditions and
//! observedGeneration on each kind, recovery after a crash, BatchJob children and runs that
//! complete on a kwok node, lineage and deletion protection, leader election, and
//! FeatureDefinitions recorded in the feature registry of the real Postgres (registration,
//! materializations and freshness in status, refusals, an unreachable database).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use recsys_core::features::FeatureRef;
use recsys_core::features::registry::{
    FeatureRegistry, Lifecycle, PostgresFeatureRegistry, VersionSelector,
};
use recsys_core::serving::routing::{
    RoutingFormat, RoutingMetrics, RoutingSource as _, RoutingTable, bucket,
};
use recsys_crds::batch_job::RunOutcome;
use recsys_crds::common::find_condition;
use recsys_crds::feature_definition::Freshness;
use recsys_crds::{BatchJob, FeatureDefinition, FeatureDefinitionStatus, ModelDeployment, Stage};
use recsys_operator::controller::model_deployment::ROUTING_KEY;
use recsys_scorer::recommend::cluster_routing::{ConfigMapRef, ConfigMapRoutingSource};
use recsys_tests::experiments::{
    now_ms, on_canary_everywhere, post_clicks, scorer_segment, segment_with, serve_and_maybe_click,
};
use recsys_tests::scorers::HostScorers;
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
            // The registry is opted into per test, with --database-url.
            .env_remove("RECSYS_DATABASE_URL")
            .env("RUST_LOG", "info,kube=warn")
            .args([
                &format!("--watch-namespace={ns}"),
                &format!("--metrics-bind-address=127.0.0.1:{m}"),
                &format!("--health-probe-bind-address=127.0.0.1:{p}"),
                "--trainer-image=registry.invalid/recsys-trainer:test",
                "--scorer-image=registry.invalid/recsys-scorer:test",
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

    let fd = wait_conditions(&fds, "popularity-score-v1", "True", "True", "Resolved").await?;
    // Without --database-url nothing is recorded, and the status says so.
    let fd_status = fd.status.unwrap_or_default();
    let registered = find_condition(&fd_status.conditions, "Registered");
    assert_eq!(
        registered.map(|c| (c.status.as_str(), c.reason.as_str())),
        Some(("False", "RegistryNotConfigured")),
        "{fd_status:?}"
    );
    assert_eq!(fd_status.registered_version, None);
    let bj = wait_conditions(&bjs, "popularity", "True", "True", "Scheduled").await?;
    // The scorer workload is the ModelDeployment's: its pods land on the kwok node, which
    // runs nothing, so no pod can say it has the version loaded: nothing is promoted, and Ready
    // says why.
    let md = wait_conditions(&mds, "als", "True", "False", "StableNotLoaded").await?;
    let md_status = md.status.clone().unwrap_or_default();
    assert_eq!(md_status.stable_version, None, "{md_status:?}");
    assert_eq!(md_status.stage, Stage::Pending);
    assert_eq!(
        md_status.service_url.as_deref(),
        Some(format!("http://als-scorer.{}.svc", ns.name).as_str())
    );
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &ns.name);
    let scorer = deployments.get("als-scorer").await?;
    assert_eq!(
        scorer.owner_references()[0].uid,
        md.uid().unwrap_or_default()
    );
    assert_eq!(scorer.spec.as_ref().and_then(|s| s.replicas), Some(3));
    let image = scorer
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers[0].image.clone());
    assert_eq!(
        image.as_deref(),
        Some("registry.invalid/recsys-scorer:test")
    );
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), &ns.name);
    assert!(services.get_opt("als-scorer").await?.is_some());
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        Api::namespaced(client.clone(), &ns.name);
    assert!(pdbs.get_opt("als-scorer").await?.is_some());
    let routed = routing_of(
        &Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
            .get("als-routing")
            .await?,
    )?;
    assert_eq!(
        routed.route("als").map(|r| r.stable().to_owned()),
        Some("20261126-0200".to_owned()),
        "the table names the version so that scorers load it"
    );

    // The operator runs the scheduled BatchJob itself: the next due time is in its status, and
    // no CronJob exists.
    let next = bj
        .status
        .as_ref()
        .and_then(|s| s.next_schedule_time.clone())
        .context("nextScheduleTime")?;
    let ahead = jiff::Timestamp::now().duration_until(next.0);
    assert!(
        ahead.is_positive() && ahead.as_secs() <= 300,
        "every 5 minutes: next in {ahead:?}"
    );
    assert!(cronjobs.get_opt("popularity").await?.is_none());

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
            .is_some_and(|r| r.outcome == RunOutcome::Succeeded)
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
        args.contains(&"--feature=popularity_score".to_owned()),
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

// --- The feature registry ----------------------------------------------------------------

/// A feature name unique to this test run: the registry is global by feature name, and the
/// test database outlives the namespaces.
fn unique_feature(prefix: &str, ns: &str) -> String {
    format!("{prefix}_{}", ns.replace('-', "_"))
}

fn registry_feature(ns: &str, k8s: &str, name: &str, ttl: &str) -> serde_json::Value {
    json!({
        "apiVersion": "recsys.io/v1alpha1", "kind": "FeatureDefinition",
        "metadata": { "name": k8s, "namespace": ns },
        "spec": {
            "name": name, "entity": "product", "version": "1.0.0", "valueType": "float",
            "description": "registry test feature", "owner": "tests", "ttl": ttl,
            "tags": ["test"],
            "computation": { "job": "popularity", "logic": "test", "window": "90d" },
            "lineage": { "tables": ["events"] }
        }
    })
}

async fn test_registry(env: &TestEnv) -> anyhow::Result<PostgresFeatureRegistry> {
    let pool = recsys_core::stores::postgres(&recsys_core::stores::PostgresArgs {
        url: env.var("RECSYS_TEST_DATABASE_URL")?.to_owned(),
        max_connections: 2,
    })
    .await?;
    Ok(PostgresFeatureRegistry::new(pool))
}

fn whole_seconds(ms: i64) -> anyhow::Result<Time> {
    Ok(Time(k8s_openapi::jiff::Timestamp::from_second(
        ms.div_euclid(1000),
    )?))
}

/// Waits until the status satisfies `check`; returns the object.
async fn wait_status(
    api: &Api<FeatureDefinition>,
    name: &str,
    what: &str,
    check: impl Fn(&FeatureDefinitionStatus) -> bool,
) -> anyhow::Result<FeatureDefinition> {
    wait_for(WAIT, &format!("{name}: {what}"), || async {
        let fd = api.get(name).await?;
        Ok(fd.status.as_ref().is_some_and(&check))
    })
    .await?;
    Ok(api.get(name).await?)
}

fn condition_of<'a>(s: &'a FeatureDefinitionStatus, type_: &str) -> Option<(&'a str, &'a str)> {
    find_condition(&s.conditions, type_).map(|c| (c.status.as_str(), c.reason.as_str()))
}

#[tokio::test]
async fn feature_definitions_are_recorded_in_the_registry_with_freshness() -> anyhow::Result<()> {
    let (env, client, ns) = setup("reg").await?;
    let db = env.var("RECSYS_TEST_DATABASE_URL")?.to_owned();
    let op = Operator::start(
        &env,
        &ns.name,
        &[
            &format!("--database-url={db}"),
            "--registry-refresh-interval=1s",
        ],
    )
    .await?;
    let fds: Api<FeatureDefinition> = Api::namespaced(client.clone(), &ns.name);
    let registry = test_registry(&env).await?;
    let name = unique_feature("pop", &ns.name);
    let successor = unique_feature("pop_next", &ns.name);
    let mut body = registry_feature(&ns.name, "pop", &name, "1h");
    apply(&fds, "pop", &body).await?;

    // Recorded: the version, when, and no materialization yet.
    let fd = wait_status(&fds, "pop", "registered, never materialized", |s| {
        s.registered_version.as_deref() == Some("1.0.0")
            && s.freshness == Some(Freshness::NeverMaterialized)
    })
    .await?;
    let status = fd.status.unwrap_or_default();
    assert_eq!(
        condition_of(&status, "Ready"),
        Some(("True", "Resolved")),
        "{status:?}"
    );
    assert_eq!(
        condition_of(&status, "Registered"),
        Some(("True", "Registered")),
        "{status:?}"
    );
    assert_eq!(status.last_materialization, None);

    // The row, through the registry's own reader.
    let row = registry
        .get(&name, &VersionSelector::Exact("1.0.0".into()))
        .await?
        .ok_or_else(|| anyhow::anyhow!("{name} 1.0.0 is not in the registry"))?;
    assert_eq!(row.spec.description, "registry test feature");
    assert_eq!(row.spec.ttl, "1h");
    assert_eq!(row.spec.computation.window.as_deref(), Some("90d"));
    assert_eq!(row.lifecycle(), Lifecycle::Active);
    assert_eq!(
        status.registered_at,
        Some(whole_seconds(row.registered_at_ms)?)
    );

    // A trainer job records an old run: stale against the 1h TTL.
    let feature = FeatureRef::new(name.clone(), 1);
    let old = now_ms() - 2 * 3_600_000;
    registry.record_materialization(&feature, old, 10).await?;
    let want = whole_seconds(old)?;
    wait_status(&fds, "pop", "stale after an old run", |s| {
        s.freshness == Some(Freshness::Stale) && s.last_materialization.as_ref() == Some(&want)
    })
    .await?;
    // A fresh run.
    let recent = now_ms();
    registry
        .record_materialization(&feature, recent, 20)
        .await?;
    let want = whole_seconds(recent)?;
    wait_status(&fds, "pop", "fresh after a new run", |s| {
        s.freshness == Some(Freshness::Fresh) && s.last_materialization.as_ref() == Some(&want)
    })
    .await?;
    let ok = op
        .metric("recsys_operator_registry_operations_total{operation=\"register\",outcome=\"ok\"}")
        .await?;
    assert!(ok.is_some_and(|n| n >= 1.0), "{ok:?}");

    // A different spec under the registered version: refused, with the registry's message,
    // and a Warning Event; the registry keeps the first spec.
    body["spec"]["description"] = json!("changed without a new version");
    apply(&fds, "pop", &body).await?;
    let fd = wait_conditions(&fds, "pop", "True", "False", "RegistryRefused").await?;
    let status = fd.status.unwrap_or_default();
    let ready = find_condition(&status.conditions, "Ready").map(|c| c.message.clone());
    assert!(
        ready
            .as_deref()
            .is_some_and(|m| m.contains("already registered with a different spec")
                && m.contains("description")),
        "{ready:?}"
    );
    assert_eq!(
        condition_of(&status, "Registered"),
        Some(("False", "FeatureVersionConflict"))
    );
    assert_eq!(status.registered_version.as_deref(), Some("1.0.0"));
    wait_for(WAIT, "RegistryRefused warning", || async {
        Ok(events(&client, &ns.name, "pop")
            .await?
            .contains(&("Warning".into(), "RegistryRefused".into())))
    })
    .await?;
    let row = registry
        .get(&name, &VersionSelector::Exact("1.0.0".into()))
        .await?
        .ok_or_else(|| anyhow::anyhow!("row gone"))?;
    assert_eq!(row.spec.description, "registry test feature");

    // Back to the registered spec, now deprecated in favour of a successor: the deprecation
    // reaches the registry.
    apply(
        &fds,
        "pop-next",
        &registry_feature(&ns.name, "pop-next", &successor, "1h"),
    )
    .await?;
    wait_conditions(&fds, "pop-next", "True", "True", "Resolved").await?;
    body["spec"]["description"] = json!("registry test feature");
    body["spec"]["deprecation"] = json!({ "replacedBy": successor, "reason": "superseded" });
    apply(&fds, "pop", &body).await?;
    wait_conditions(&fds, "pop", "True", "True", "Deprecated").await?;
    let row = registry
        .get(&name, &VersionSelector::Exact("1.0.0".into()))
        .await?
        .ok_or_else(|| anyhow::anyhow!("row gone"))?;
    assert_eq!(row.lifecycle(), Lifecycle::Deprecated);
    assert_eq!(row.replaced_by.as_deref(), Some(successor.as_str()));

    // Deleting the definition keeps the registry's history.
    fds.delete("pop", &DeleteParams::default()).await?;
    wait_for(WAIT, "pop deleted", || async {
        Ok(fds.get_opt("pop").await?.is_none())
    })
    .await?;
    assert!(
        registry
            .get(&name, &VersionSelector::Exact("1.0.0".into()))
            .await?
            .is_some()
    );
    assert_eq!(registry.materializations(&feature, 10).await?.len(), 2);
    Ok(())
}

/// Forwards every connection on `listener` to `target` until the test ends.
fn forward(listener: tokio::net::TcpListener, target: String) {
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

#[tokio::test]
async fn an_unreachable_registry_degrades_features_only_and_recovers() -> anyhow::Result<()> {
    let (env, client, ns) = setup("regdown").await?;
    // The operator's database URL points at a port nothing listens on yet; later a proxy to
    // the real Postgres opens there.
    let db = env.var("RECSYS_TEST_DATABASE_URL")?.to_owned();
    let (before, rest) = db
        .rsplit_once('@')
        .ok_or_else(|| anyhow::anyhow!("no @ in {db}"))?;
    let (target, path) = rest
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("no database in {db}"))?;
    let port = free_port()?;
    let proxied = format!("{before}@127.0.0.1:{port}/{path}");
    let op = Operator::start(
        &env,
        &ns.name,
        &[
            &format!("--database-url={proxied}"),
            "--registry-refresh-interval=1s",
        ],
    )
    .await?;
    let fds: Api<FeatureDefinition> = Api::namespaced(client.clone(), &ns.name);
    let bjs: Api<BatchJob> = Api::namespaced(client.clone(), &ns.name);
    let name = unique_feature("down", &ns.name);
    apply(
        &fds,
        "down",
        &registry_feature(&ns.name, "down", &name, "1h"),
    )
    .await?;
    apply(&bjs, "popularity", &example("batchjob", &ns.name)?).await?;

    // The feature is not ready and says why; the BatchJob is unaffected.
    let fd = wait_conditions(&fds, "down", "True", "False", "RegistryUnavailable").await?;
    let status = fd.status.unwrap_or_default();
    let message = find_condition(&status.conditions, "Ready").map(|c| c.message.clone());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("cannot connect") && !m.contains(":recsys@")),
        "the message says what failed, without the password: {message:?}"
    );
    assert_eq!(status.freshness, Some(Freshness::Unknown));
    wait_conditions(&bjs, "popularity", "True", "True", "Scheduled").await?;
    let failed = op
        .metric("recsys_operator_registry_operations_total{operation=\"connect\",outcome=\"RegistryConnect\"}")
        .await?;
    assert!(failed.is_some_and(|n| n >= 1.0), "{failed:?}");
    wait_for(WAIT, "RegistryUnavailable warning", || async {
        Ok(events(&client, &ns.name, "down")
            .await?
            .contains(&("Warning".into(), "RegistryUnavailable".into())))
    })
    .await?;

    // The database comes back: the feature is recorded after the backoff, without a restart.
    forward(
        tokio::net::TcpListener::bind(("127.0.0.1", port)).await?,
        target.to_owned(),
    );
    wait_for(
        Duration::from_secs(90),
        "registered after recovery",
        || async {
            let fd = fds.get("down").await?;
            let s = fd.status.unwrap_or_default();
            Ok(s.registered_version.as_deref() == Some("1.0.0")
                && condition_of(&s, "Ready") == Some(("True", "Resolved")))
        },
    )
    .await?;
    assert!(
        test_registry(&env)
            .await?
            .get(&name, &VersionSelector::Latest)
            .await?
            .is_some()
    );
    Ok(())
}

/// The routing table of a ModelDeployment as the scorer reads it.
fn routing_of(cm: &ConfigMap) -> anyhow::Result<RoutingTable> {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(ROUTING_KEY))
        .context("the ConfigMap has no routing.yaml")?;
    Ok(RoutingTable::parse(text, RoutingFormat::Yaml, "test")?)
}

#[tokio::test]
async fn model_deployments_publish_the_routing_table_scorers_follow() -> anyhow::Result<()> {
    let (env, client, ns) = setup("op-routing").await?;
    let mut op = Operator::start(&env, &ns.name, &[]).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);

    // A scorer's in-cluster source, started before the table exists: it serves nothing.
    let metrics = RoutingMetrics::new();
    let source = ConfigMapRoutingSource::start(
        client.clone(),
        ConfigMapRef {
            namespace: ns.name.clone(),
            name: "als-routing".into(),
            key: ROUTING_KEY.into(),
        },
        metrics.clone(),
    )
    .await?;
    assert!(source.current().is_empty(), "{}", source.current());

    // Scorers behind the ModelDeployment's Service, with both versions in their registry.
    let scorers = HostScorers::start(&env, &client, &ns.name, "als", "als", 2).await?;
    scorers.publish("als", "20261126-0200", 1).await?;
    scorers.publish("als", "20261127-0200", 2).await?;

    // The first version is stable once the scorers serve it, and the table routes every user
    // to it.
    let mut body = example("modeldeployment", &ns.name)?;
    body["spec"]["scorer"]["replicas"] = json!(0);
    apply(&mds, "als", &body).await?;
    let md = wait_conditions(&mds, "als", "True", "True", "Serving").await?;
    let scorers_seen = md
        .status
        .as_ref()
        .and_then(|s| s.scorers.clone())
        .context("scorers")?;
    assert_eq!(
        (scorers_seen.ready, scorers_seen.with_stable),
        (2, 2),
        "{scorers_seen:?}"
    );
    let status = md.status.clone().unwrap_or_default();
    assert_eq!(status.stable_version.as_deref(), Some("20261126-0200"));
    assert_eq!(status.history.len(), 1, "{:?}", status.history);
    let cm = cms.get("als-routing").await?;
    assert_eq!(cm.owner_references()[0].uid, md.uid().unwrap_or_default());
    let table = routing_of(&cm)?;
    let route = table.route("als").context("route als")?;
    assert_eq!((route.stable(), route.salt()), ("20261126-0200", "2026-q4"));

    // The scorer's source follows through the watch.
    wait_for(WAIT, "the scorer's source to load the table", || async {
        Ok(source.current().route("als").map(|r| r.stable().to_owned())
            == Some("20261126-0200".to_owned()))
    })
    .await?;

    // A new version is shadowed first (the example's first step); every user stays on stable.
    body["spec"]["version"] = json!("20261127-0200");
    apply(&mds, "als", &body).await?;
    wait_for(WAIT, "the candidate shadowed", || async {
        let s = mds.get("als").await?.status.unwrap_or_default();
        let progressing = find_condition(&s.conditions, "Progressing")
            .map(|c| (c.status.clone(), c.reason.clone()));
        Ok(s.candidate_version.as_deref() == Some("20261127-0200")
            && progressing == Some(("True".into(), "Shadow".into())))
    })
    .await?;
    let route_now = routing_of(&cms.get("als-routing").await?)?;
    let route = route_now.route("als").context("route als")?;
    assert_eq!(
        (route.stable(), route.shadow(), route.canary()),
        ("20261126-0200", Some("20261127-0200"), None)
    );
    wait_for(WAIT, "the shadow in the scorer's source", || async {
        Ok(source
            .current()
            .route("als")
            .and_then(|r| r.shadow().map(str::to_owned))
            == Some("20261127-0200".to_owned()))
    })
    .await?;

    // A changed salt reaches the scorer's source.
    let loads = |m: &RoutingMetrics| {
        let mut registry = prometheus_client::registry::Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text
    };
    body["spec"]["routingSalt"] = json!("2027-q1");
    apply(&mds, "als", &body).await?;
    wait_for(WAIT, "the new salt in the scorer's source", || async {
        Ok(source.current().route("als").map(|r| r.salt().to_owned()) == Some("2027-q1".into()))
    })
    .await?;

    // A hand-edited or deleted table is put back by the operator; meanwhile the scorer keeps
    // the last good table.
    let serving = source.current();
    let ok_loads = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("routing_table_reloads_total{outcome=\"ok\"} "))
            .map(str::to_owned)
    };
    let loaded_before = ok_loads(&loads(&metrics));
    assert!(loaded_before.is_some(), "{}", loads(&metrics));
    cms.patch(
        "als-routing",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"data": {ROUTING_KEY: "formatVersion: 1\nmodels: {als: {stable: '..'}}\n"}}),
        ),
    )
    .await?;
    wait_for(WAIT, "the operator to restore the edited table", || async {
        Ok(routing_of(&cms.get("als-routing").await?)
            .is_ok_and(|t| t.route("als").is_some_and(|r| r.salt() == "2027-q1")))
    })
    .await?;
    cms.delete("als-routing", &DeleteParams::default()).await?;
    wait_for(
        WAIT,
        "the operator to recreate the deleted table",
        || async { Ok(cms.get_opt("als-routing").await?.is_some()) },
    )
    .await?;
    // The scorer saw both bad states, refused them, and loaded no table since (the restored
    // table is the one it serves, not a new one).
    let refused = wait_for(WAIT, "the scorer to report the refused states", || async {
        let text = loads(&metrics);
        Ok(
            text.contains("routing_table_reload_failures_total{kind=\"Invalid\"} 1")
                // Missing twice: at the start, before the operator wrote it, and deleted.
                && text.contains("routing_table_reload_failures_total{kind=\"Missing\"} 2"),
        )
    })
    .await;
    refused.with_context(|| loads(&metrics))?;
    assert_eq!(
        ok_loads(&loads(&metrics)),
        loaded_before,
        "{}",
        loads(&metrics)
    );
    assert_eq!(source.current(), serving);

    op.kill();
    Ok(())
}

#[tokio::test]
async fn a_rollout_moves_through_its_steps_and_the_table_follows() -> anyhow::Result<()> {
    let (env, client, ns) = setup("op-rollout").await?;
    let mut op = Operator::start(&env, &ns.name, &[]).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let route = || async {
        let t = routing_of(&cms.get("als-routing").await?)?;
        let r = t.route("als").context("route als")?;
        anyhow::Ok((
            r.stable().to_owned(),
            r.shadow().map(str::to_owned),
            r.canary().map(|c| (c.version().to_owned(), c.weight())),
        ))
    };
    let stage_of = |md: &ModelDeployment| {
        let s = md.status.clone().unwrap_or_default();
        let progressing = find_condition(&s.conditions, "Progressing").map(|c| c.reason.clone());
        (s.stage, s.canary_weight, progressing)
    };

    let scorers = HostScorers::start(&env, &client, &ns.name, "als", "als", 2).await?;
    scorers.publish("als", "v1", 1).await?;
    scorers.publish("als", "v2", 2).await?;

    // Timed steps, a manual approval, no analysis thresholds.
    let mut body = example("modeldeployment", &ns.name)?;
    body["spec"]["scorer"]["replicas"] = json!(0);
    body["spec"]["version"] = json!("v1");
    body["spec"]["strategy"] = json!({"steps": [
        {"shadow": {"duration": "2s"}},
        {"canary": {"weight": 50, "duration": "2s"}},
        {"pause": {}},
        {"full": {}}
    ]});
    apply(&mds, "als", &body).await?;
    wait_conditions(&mds, "als", "True", "True", "Serving").await?;
    assert_eq!(route().await?, ("v1".into(), None, None));

    body["spec"]["version"] = json!("v2");
    apply(&mds, "als", &body).await?;
    // Shadow, then the canary (two seconds each; status times have whole seconds), then the
    // pause waiting for approval with the canary's weight held.
    let mut seen = vec![];
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let md = mds.get("als").await?;
        let now = stage_of(&md);
        let table = route().await?;
        if seen.last() != Some(&(now.clone(), table.clone())) {
            seen.push((now.clone(), table));
        }
        if now.2.as_deref() == Some("AwaitingApproval") {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the rollout did not reach the approval: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        route().await?,
        ("v1".into(), None, Some(("v2".into(), 50))),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|((stage, ..), table)| *stage == Stage::Shadow
                && table.1.as_deref() == Some("v2")),
        "the candidate was shadowed first: {seen:?}"
    );

    // Approving the pause (step 2) promotes v2: stable for everyone, recorded in history.
    mds.patch(
        "als",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"recsys.io/approve": "2"}}})),
    )
    .await?;
    wait_for(WAIT, "v2 promoted", || async {
        let s = mds.get("als").await?.status.unwrap_or_default();
        Ok(s.stable_version.as_deref() == Some("v2") && s.stage == Stage::Promoted)
    })
    .await?;
    assert_eq!(route().await?, ("v2".into(), None, None));
    let s = mds.get("als").await?.status.unwrap_or_default();
    let history: Vec<(&str, Stage)> = s
        .history
        .iter()
        .map(|r| (r.version.as_str(), r.outcome))
        .collect();
    assert_eq!(history, [("v2", Stage::Promoted), ("v1", Stage::Promoted)]);

    // Counted and told.
    for (version, to) in [("v1", "promoted"), ("v2", "shadow"), ("v2", "promoted")] {
        let series = format!(
            "model_deployments_total{{model_name=\"als\",version=\"{version}\",status=\"{to}\"}}"
        );
        assert_eq!(op.metric(&series).await?, Some(1.0), "{series}");
    }
    let evs = events(&client, &ns.name, "als").await?;
    for reason in ["RolloutShadow", "Promoted"] {
        assert!(evs.contains(&("Normal".into(), reason.into())), "{evs:?}");
    }

    op.kill();
    Ok(())
}

/// A chain a → b → c: b runs only after a succeeded, c only after b, each once per upstream
/// success, each run recording the upstream run it consumed; a failing upstream holds a
/// scheduled downstream, counted and named in its status, Events and metrics; finished Jobs
/// beyond `historyLimit` are collected.
#[tokio::test]
async fn batch_jobs_run_after_their_upstreams_and_hold_when_one_fails() -> anyhow::Result<()> {
    let (env, client, ns) = setup("chain").await?;
    let op = Operator::start(&env, &ns.name, &[]).await?;
    let bjs: Api<BatchJob> = Api::namespaced(client.clone(), &ns.name);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let body = |name: &str, job: &str, after: &[&str], extra: serde_json::Value| {
        let mut v = json!({
            "apiVersion": "recsys.io/v1alpha1", "kind": "BatchJob",
            "metadata": { "name": name, "namespace": ns.name },
            "spec": { "job": job, "after": after },
        });
        if let (Some(spec), Some(extra)) = (v["spec"].as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        v
    };
    apply(
        &bjs,
        "a",
        &body("a", "popularity", &[], json!({ "historyLimit": 1 })),
    )
    .await?;
    apply(&bjs, "b", &body("b", "freshness", &["a"], json!({}))).await?;
    apply(
        &bjs,
        "c",
        &body("c", "category-affinity", &["b"], json!({})),
    )
    .await?;
    wait_conditions(&bjs, "c", "True", "True", "AfterUpstream").await?;
    let upstream_reason = |bj: &BatchJob| {
        let conditions = bj
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        find_condition(&conditions, "UpstreamReady").map(|c| (c.reason.clone(), c.message.clone()))
    };
    wait_for(WAIT, "b waits for a", || async {
        Ok(upstream_reason(&bjs.get("b").await?)
            .is_some_and(|(r, m)| r == "UpstreamPending" && m.contains("waiting for a")))
    })
    .await?;
    assert!(
        jobs.list(&ListParams::default().labels("recsys.io/batchjob"))
            .await?
            .items
            .is_empty(),
        "nothing runs before a"
    );

    let run = |token: &str| json!({ "metadata": { "annotations": { "recsys.io/run": token } } });
    let history = |name: &'static str| {
        let bjs = bjs.clone();
        async move { anyhow::Ok(bjs.get(name).await?.status.unwrap_or_default().history) }
    };
    bjs.patch("a", &PatchParams::default(), &Patch::Merge(run("1")))
        .await?;
    wait_for(
        Duration::from_secs(90),
        "c succeeded after b after a",
        || async {
            Ok(history("c")
                .await?
                .first()
                .is_some_and(|r| r.outcome == RunOutcome::Succeeded))
        },
    )
    .await?;
    let (a, b, c) = (
        history("a").await?,
        history("b").await?,
        history("c").await?,
    );
    assert_eq!((a.len(), b.len(), c.len()), (1, 1, 1));
    assert_eq!(b[0].trigger, recsys_crds::batch_job::RunTrigger::Upstream);
    assert_eq!(
        b[0].consumed[0].job_name, a[0].job_name,
        "b consumed a's run"
    );
    assert_eq!(
        c[0].consumed[0].job_name, b[0].job_name,
        "c consumed b's run"
    );
    let finished = |r: &recsys_crds::batch_job::JobRun| r.finished_at.clone().map(|t| t.0);
    assert!(
        b[0].started_at.0 >= finished(&a[0]).context("a finished")?,
        "b after a"
    );
    assert!(
        c[0].started_at.0 >= finished(&b[0]).context("b finished")?,
        "c after b"
    );

    // Once per upstream success: a second run of a, one more of b and c.
    bjs.patch("a", &PatchParams::default(), &Patch::Merge(run("2")))
        .await?;
    wait_for(Duration::from_secs(90), "c ran twice", || async {
        Ok(history("c").await?.len() == 2
            && history("c")
                .await?
                .iter()
                .all(|r| r.outcome == RunOutcome::Succeeded))
    })
    .await?;
    assert_eq!(history("b").await?.len(), 2, "b ran once per run of a");
    // a keeps one finished Job (historyLimit 1); the older one is collected.
    wait_for(WAIT, "a's older Job collected", || async {
        Ok(jobs
            .list(&ListParams::default().labels("recsys.io/batchjob=a"))
            .await?
            .items
            .len()
            == 1)
    })
    .await?;
    assert_eq!(history("a").await?.len(), 1);

    // A failing upstream (kwok fails its Pod with exit code 1) holds a scheduled downstream.
    apply(
        &bjs,
        "broken",
        &body(
            "broken",
            "popularity",
            &[],
            json!({
                "retry": { "maxAttempts": 1 },
                "podLabels": { "recsys.io/kwok-exit-code": "1" },
            }),
        ),
    )
    .await?;
    bjs.patch("broken", &PatchParams::default(), &Patch::Merge(run("1")))
        .await?;
    apply(
        &bjs,
        "held",
        &body(
            "held",
            "freshness",
            &["broken"],
            json!({ "schedule": "* * * * *" }),
        ),
    )
    .await?;
    wait_for(Duration::from_secs(30), "broken failed", || async {
        Ok(history("broken")
            .await?
            .first()
            .is_some_and(|r| r.outcome == RunOutcome::Failed))
    })
    .await?;
    let failed = history("broken").await?;
    assert!(
        failed[0].reason.contains("BackoffLimitExceeded"),
        "{:?}",
        failed[0]
    );
    // The next minute's run is held: counted, the upstream named, an Event, a metric.
    wait_for(Duration::from_secs(75), "a held run", || async {
        Ok(bjs.get("held").await?.status.unwrap_or_default().held_runs >= 1)
    })
    .await?;
    let held = bjs.get("held").await?;
    let (reason, message) = upstream_reason(&held).context("UpstreamReady")?;
    assert_eq!(reason, "UpstreamFailed");
    assert!(
        message.contains("broken") && message.contains("BackoffLimitExceeded"),
        "{message}"
    );
    assert!(
        held.status.unwrap_or_default().history.is_empty(),
        "never run on stale input"
    );
    assert!(
        jobs.list(&ListParams::default().labels("recsys.io/batchjob=held"))
            .await?
            .items
            .is_empty()
    );
    let evs = events(&client, &ns.name, "held").await?;
    assert!(
        evs.contains(&("Warning".into(), "RunHeld".into())),
        "{evs:?}"
    );

    // activeDeadline bounds a run: a Pod that never ends (kwok holds it) fails the run.
    apply(
        &bjs,
        "slow",
        &body(
            "slow",
            "popularity",
            &[],
            json!({ "activeDeadline": "3s", "podLabels": { "recsys.io/kwok-hold": "true" } }),
        ),
    )
    .await?;
    bjs.patch("slow", &PatchParams::default(), &Patch::Merge(run("1")))
        .await?;
    wait_for(
        Duration::from_secs(60),
        "slow failed at its deadline",
        || async {
            Ok(history("slow")
                .await?
                .first()
                .is_some_and(|r| r.outcome == RunOutcome::Failed))
        },
    )
    .await?;
    let slow = history("slow").await?;
    assert!(slow[0].reason.contains("DeadlineExceeded"), "{:?}", slow[0]);

    let ns_label = format!("namespace=\"{}\"", ns.name);
    let metric = |name: &str, labels: &str| format!("{name}{{{ns_label},{labels}}}");
    let held_total = op
        .metric(&metric("batch_job_held_runs_total", "job_name=\"held\""))
        .await?;
    assert!(held_total.is_some_and(|n| n >= 1.0), "{held_total:?}");
    let ok = op
        .metric(&metric(
            "batch_job_executions_total",
            "job_name=\"c\",status=\"Succeeded\"",
        ))
        .await?;
    assert_eq!(ok, Some(2.0));
    let failures = op
        .metric(&metric(
            "batch_job_failures_total",
            "job_name=\"broken\",reason=\"BackoffLimitExceeded\"",
        ))
        .await?;
    assert_eq!(failures, Some(1.0));
    let last = op
        .metric(&metric(
            "batch_job_last_success_timestamp_seconds",
            "job_name=\"c\"",
        ))
        .await?;
    assert!(last.is_some_and(|t| t > 1.7e9), "{last:?}");
    Ok(())
}

/// A candidate the scorer pods cannot load (no such version in the registry, or a file whose
/// checksum fails) is never routed: the rollout waits in Pending with the pod's reason, no user
/// is sent to it, and it proceeds by itself once a good version is published under the name.
#[tokio::test]
async fn a_version_the_scorers_refuse_is_never_routed() -> anyhow::Result<()> {
    let (env, client, ns) = setup("op-refuse").await?;
    let _op = Operator::start(&env, &ns.name, &[]).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let scorers = HostScorers::start(&env, &client, &ns.name, "als", "als", 2).await?;
    scorers.publish("als", "v1", 1).await?;
    let mut body = example("modeldeployment", &ns.name)?;
    body["spec"]["scorer"]["replicas"] = json!(0);
    body["spec"]["version"] = json!("v1");
    body["spec"]["strategy"] = json!({"steps": [{"canary": {"weight": 50}}, {"pause": {}}]});
    apply(&mds, "als", &body).await?;
    wait_conditions(&mds, "als", "True", "True", "Serving").await?;
    // The example's store is not reachable from here: the first promotion waits in the
    // status to be recorded in the registry; pointed at a store that works, it is recorded
    // and leaves the queue.
    let queued = md_status(&mds, "als").await?.unrecorded_transitions;
    assert_eq!(
        queued
            .iter()
            .map(|t| (t.version.as_str(), t.transition.as_str()))
            .collect::<Vec<_>>(),
        [("v1", "promoted")]
    );
    body["spec"]["artifacts"] = json!({"uri": scorers.artifacts_uri()});
    apply(&mds, "als", &body).await?;
    wait_for(WAIT, "the queued transition recorded", || async {
        Ok(md_status(&mds, "als")
            .await?
            .unrecorded_transitions
            .is_empty())
    })
    .await?;
    let events = scorers.registry.rollouts("als").await?;
    assert_eq!(
        events
            .first()
            .map(|e| (e.version.as_str(), e.transition.as_str())),
        Some(("v1", "promoted"))
    );

    let progressing = |md: &ModelDeployment| {
        md.status
            .as_ref()
            .and_then(|s| find_condition(&s.conditions, "Progressing").cloned())
            .map(|c| (c.reason, c.message))
            .unwrap_or_default()
    };
    let canary = || async {
        let t = routing_of(&cms.get("als-routing").await?)?;
        anyhow::Ok(
            t.route("als")
                .and_then(|r| r.canary().map(|c| (c.version().to_owned(), c.weight()))),
        )
    };

    // Not in the registry at all.
    body["spec"]["version"] = json!("v2");
    apply(&mds, "als", &body).await?;
    wait_for(WAIT, "v2 refused", || async {
        Ok(progressing(&mds.get("als").await?).0 == "CandidateRefused")
    })
    .await?;
    let md = mds.get("als").await?;
    let (_, message) = progressing(&md);
    assert!(message.contains("no version or alias \"v2\""), "{message}");
    assert_eq!(
        md.status.as_ref().map(|s| (s.stage, s.canary_weight)),
        Some((Stage::Pending, 0))
    );
    assert_eq!(
        canary().await?,
        Some(("v2".into(), 0)),
        "named for loading, no user on it"
    );

    // Another version, published with a corrupt file (before anything names it, so no scorer
    // could have loaded it intact): refused on its checksum.
    scorers.publish("als", "v3", 3).await?;
    let store = scorers.registry.store().clone();
    let key = "models/als/v3/item_factors.f32";
    let good = store.get(key).await?.context("item factors")?;
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    store.put(key, bad).await?;
    body["spec"]["version"] = json!("v3");
    apply(&mds, "als", &body).await?;
    wait_for(WAIT, "v3 refused on its checksum", || async {
        let (reason, message) = progressing(&mds.get("als").await?);
        Ok(reason == "CandidateRefused" && message.contains("sha256"))
    })
    .await?;
    assert_eq!(canary().await?, Some(("v3".into(), 0)));

    // Repaired: the scorers load it and the rollout goes on by itself, to the canary and the
    // pause that waits for approval.
    store.put(key, good).await?;
    wait_for(WAIT, "v3 at 50% once loaded", || async {
        let md = mds.get("als").await?;
        Ok(progressing(&md).0 == "AwaitingApproval")
    })
    .await?;
    assert_eq!(canary().await?, Some(("v3".into(), 50)));
    let s = mds.get("als").await?.status.unwrap_or_default();
    assert_eq!(s.scorers.and_then(|f| f.with_candidate), Some(2));
    Ok(())
}

/// The status of `name`, or the default.
async fn md_status(
    mds: &Api<ModelDeployment>,
    name: &str,
) -> anyhow::Result<recsys_crds::ModelDeploymentStatus> {
    Ok(mds.get(name).await?.status.unwrap_or_default())
}

/// Waits until every user is answered by `version` on every scorer.
async fn every_user_on(scorers: &HostScorers, version: &str) -> anyhow::Result<()> {
    recsys_tests::scorers::every_user_on(&scorers.addrs, version, WAIT).await
}

#[tokio::test]
async fn a_rollout_under_load_loses_no_request_and_ends_with_every_user_on_the_candidate()
-> anyhow::Result<()> {
    let (env, client, ns) = setup("op-load").await?;
    let _op = Operator::start(&env, &ns.name, &[]).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let scorers = HostScorers::start(&env, &client, &ns.name, "als", "als", 2).await?;
    scorers.publish("als", "v1", 1).await?;
    // A retrain that changed little: the same factors (the same seed).
    scorers.publish("als", "v2", 1).await?;
    let mut body = example("modeldeployment", &ns.name)?;
    body["spec"]["scorer"]["replicas"] = json!(0);
    body["spec"]["version"] = json!("v1");
    body["spec"]["strategy"] = json!({
        "steps": [
            {"shadow": {"duration": "3s"}},
            {"canary": {"weight": 10, "duration": "3s"}},
            {"canary": {"weight": 50, "duration": "3s"}},
            {"full": {}}
        ],
        "analysis": {
            "interval": "2s", "failureLimit": 2, "minSamples": 5,
            "maxErrorRate": 0.01, "maxP99LatencyMs": 2000,
            "maxScoreDriftPsi": 0.5, "minTopKOverlap": 0.8
        }
    });
    apply(&mds, "als", &body).await?;
    wait_conditions(&mds, "als", "True", "True", "Serving").await?;

    let load =
        recsys_tests::scorers::RequestLoop::start(scorers.addrs.clone(), Duration::from_millis(4));
    body["spec"]["version"] = json!("v2");
    apply(&mds, "als", &body).await?;
    // Every exposure the rollout went through, as the status showed it.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let s = md_status(&mds, "als").await?;
        if s.stable_version.as_deref() == Some("v2") {
            break;
        }
        if s.candidate_version.as_deref() == Some("v2") {
            seen.insert((format!("{:?}", s.stage), s.canary_weight));
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "v2 not promoted in 120 s; seen {seen:?}; status {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    every_user_on(&scorers, "v2").await?;
    let report = load.stop().await?;
    assert!(
        report.failed.is_empty(),
        "lost requests: {:?}",
        report.failed
    );
    // Enough load that every stage saw requests (a loaded CI machine sends fewer in the same
    // stages).
    assert!(report.sent > 500, "{} requests", report.sent);
    for stage in [("Shadow", 0), ("Canary", 10), ("Canary", 50)] {
        assert!(
            seen.contains(&(stage.0.to_owned(), stage.1)),
            "{stage:?} not seen in {seen:?}"
        );
    }

    // Each exposed step ended on a successful analysis of it, with figures.
    let s = md_status(&mds, "als").await?;
    assert_eq!(
        (s.history[0].version.as_str(), s.history[0].outcome),
        ("v2", Stage::Promoted)
    );
    let runs = s.analysis.context("analysis status")?.runs;
    for step in 0..3 {
        let passed = runs.iter().find(|r| {
            r.step == step && r.verdict == recsys_crds::model_deployment::Verdict::Successful
        });
        let passed =
            passed.with_context(|| format!("no successful run of step {step}: {runs:?}"))?;
        assert!(
            passed.checks.iter().all(|c| c.observed.is_some()),
            "{passed:?}"
        );
        assert!(passed.pods == 2, "{passed:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_candidate_with_skewed_scores_is_rolled_back_within_failure_limit_intervals()
-> anyhow::Result<()> {
    let (env, client, ns) = setup("op-rollback").await?;
    let op = Operator::start(&env, &ns.name, &[]).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let scorers = HostScorers::start(&env, &client, &ns.name, "als", "als", 2).await?;
    scorers.publish("als", "v1", 1).await?;
    // Same rankings, every score 9 times as large: a broken normalisation, say.
    scorers.publish_scaled("als", "v2", 1, 3.0).await?;
    let mut body = example("modeldeployment", &ns.name)?;
    body["spec"]["scorer"]["replicas"] = json!(0);
    body["spec"]["artifacts"] = json!({"uri": scorers.artifacts_uri()});
    body["spec"]["version"] = json!("v1");
    body["spec"]["strategy"] = json!({
        "steps": [{"canary": {"weight": 50, "duration": "10m"}}, {"full": {}}],
        "analysis": {"interval": "2s", "failureLimit": 2, "minSamples": 5, "maxScoreDriftPsi": 0.5}
    });
    apply(&mds, "als", &body).await?;
    wait_conditions(&mds, "als", "True", "True", "Serving").await?;
    let load =
        recsys_tests::scorers::RequestLoop::start(scorers.addrs.clone(), Duration::from_millis(4));
    body["spec"]["version"] = json!("v2");
    apply(&mds, "als", &body).await?;
    wait_for(WAIT, "v2 on 50% of users", || async {
        let s = md_status(&mds, "als").await?;
        Ok(s.stage == Stage::Canary && s.canary_weight == 50)
    })
    .await?;
    let started = md_status(&mds, "als")
        .await?
        .step_started_at
        .context("step start")?
        .0;
    wait_for(WAIT, "v2 rolled back", || async {
        Ok(md_status(&mds, "als").await?.stage == Stage::RolledBack)
    })
    .await?;
    let md = mds.get("als").await?;
    let s = md.status.clone().unwrap_or_default();
    let record = &s.history[0];
    assert_eq!(
        (record.version.as_str(), record.outcome),
        ("v2", Stage::RolledBack)
    );
    // Within failureLimit × interval of the canary's start, plus the baseline's interval
    // and a reconcile's slack.
    let took = record.finished_at.0.duration_since(started).as_secs_f64();
    assert!(
        took <= 2.0 * 2.0 + 2.0 + 3.0,
        "rolled back {took:.1}s after the canary started"
    );
    assert!(
        record.reason.contains("failureLimit 2") && record.reason.contains("ScoreDrift"),
        "{}",
        record.reason
    );
    let degraded = find_condition(&s.conditions, "Degraded").context("Degraded")?;
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "AnalysisFailed")
    );
    assert!(degraded.message.contains("PSI"), "{}", degraded.message);
    let last = &s.analysis.context("analysis")?.runs[0];
    let drift = last.checks.first().context("a check")?;
    assert!(drift.observed.unwrap_or_default() > 0.5, "{last:?}");

    // One routing write sent every user back to stable, and the scorers follow.
    let table = routing_of(&cms.get("als-routing").await?)?;
    let route = table.route("als").context("route")?;
    assert_eq!(
        (route.stable(), route.canary(), route.shadow()),
        ("v1", None, None)
    );
    every_user_on(&scorers, "v1").await?;
    let report = load.stop().await?;
    assert!(
        report.failed.is_empty(),
        "lost requests: {:?}",
        report.failed
    );
    // The history is in the model's registry too, with who, why and the failed run (written
    // just after the status that queued it).
    wait_for(WAIT, "the rollback recorded in the registry", || async {
        Ok(md_status(&mds, "als")
            .await?
            .unrecorded_transitions
            .is_empty())
    })
    .await?;
    let events = scorers.registry.rollouts("als").await?;
    let moves: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.version.as_str(), e.transition.as_str()))
        .collect();
    assert_eq!(
        moves,
        [("v2", "rolled_back"), ("v2", "canary"), ("v1", "promoted")],
        "{events:?}"
    );
    let back = &events[0];
    assert_eq!(
        (
            back.by.as_str(),
            back.stable.as_deref(),
            back.deployment.as_str()
        ),
        (
            "recsys-operator",
            Some("v1"),
            format!("{}/als", ns.name).as_str()
        )
    );
    assert!(back.reason.contains("ScoreDrift"), "{}", back.reason);
    assert_eq!(
        back.analysis.as_ref().map(|a| a["verdict"].clone()),
        Some(json!("Failed"))
    );
    assert_eq!(
        op.metric(
            "model_deployments_total{model_name=\"als\",version=\"v2\",status=\"rolled_back\"}"
        )
        .await?,
        Some(1.0)
    );
    let failed_checks = op
        .metric("model_deployment_analysis_checks_total{model_name=\"als\",check=\"ScoreDrift\",verdict=\"Failed\"}")
        .await?;
    assert!(failed_checks >= Some(2.0), "{failed_checks:?}");
    Ok(())
}

#[tokio::test]
async fn an_operator_killed_mid_canary_resumes_at_the_same_step_with_the_same_users()
-> anyhow::Result<()> {
    let (env, client, ns) = setup("op-resume").await?;
    let mut op = Operator::start(&env, &ns.name, &[]).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let scorers = HostScorers::start(&env, &client, &ns.name, "als", "als", 2).await?;
    scorers.publish("als", "v1", 1).await?;
    scorers.publish("als", "v2", 2).await?;
    let mut body = example("modeldeployment", &ns.name)?;
    body["spec"]["scorer"]["replicas"] = json!(0);
    body["spec"]["version"] = json!("v1");
    body["spec"]["strategy"] = json!({
        "steps": [{"canary": {"weight": 30, "duration": "10m"}}, {"full": {}}],
        "analysis": {"interval": "2s", "minSamples": 5, "maxErrorRate": 0.01}
    });
    apply(&mds, "als", &body).await?;
    wait_conditions(&mds, "als", "True", "True", "Serving").await?;
    let load =
        recsys_tests::scorers::RequestLoop::start(scorers.addrs.clone(), Duration::from_millis(4));
    body["spec"]["version"] = json!("v2");
    apply(&mds, "als", &body).await?;
    wait_for(WAIT, "v2 on 30% with a successful analysis", || async {
        let s = md_status(&mds, "als").await?;
        Ok(s.canary_weight == 30
            && s.analysis.is_some_and(|a| {
                a.runs
                    .iter()
                    .any(|r| r.verdict == recsys_crds::model_deployment::Verdict::Successful)
            }))
    })
    .await?;
    let before = md_status(&mds, "als").await?;
    let table_before = cms.get("als-routing").await?.data;
    op.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _op = Operator::start(&env, &ns.name, &[]).await?;
    // The new operator analyses again (a new baseline, then a run) and keeps the step.
    let runs_before = before.analysis.as_ref().map_or(0, |a| a.runs.len());
    wait_for(WAIT, "an analysis by the new operator", || async {
        let s = md_status(&mds, "als").await?;
        let newest = s
            .analysis
            .as_ref()
            .and_then(|a| a.runs.first().map(|r| r.at.clone()));
        let older = before
            .analysis
            .as_ref()
            .and_then(|a| a.runs.first().map(|r| r.at.clone()));
        Ok(newest.is_some() && newest != older)
    })
    .await?;
    let after = md_status(&mds, "als").await?;
    assert_eq!(
        (
            after.stage,
            after.canary_weight,
            after.current_step,
            after.step_started_at.clone()
        ),
        (
            before.stage,
            before.canary_weight,
            before.current_step,
            before.step_started_at.clone()
        ),
        "runs before: {runs_before}"
    );
    // The same table: the same salt and weight, so the same users on the canary.
    assert_eq!(cms.get("als-routing").await?.data, table_before);
    let report = load.stop().await?;
    assert!(
        report.failed.is_empty(),
        "lost requests: {:?}",
        report.failed
    );
    Ok(())
}

/// Runs `kubectl recsys <args>` in `ns`: (success, stdout, stderr).
fn plugin(env: &TestEnv, ns: &str, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-recsys"))
        .env("KUBECONFIG", env.var("KUBECONFIG")?)
        .env("USER", "tester")
        .args(["-n", ns])
        .args(args)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn abort_retry_promote_and_undo_through_the_kubectl_plugin() -> anyhow::Result<()> {
    let (env, client, ns) = setup("op-plugin").await?;
    let _op = Operator::start(&env, &ns.name, &[]).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let scorers = HostScorers::start(&env, &client, &ns.name, "als", "als", 2).await?;
    for (i, v) in ["v1", "v2"].iter().enumerate() {
        scorers.publish("als", v, i as u64 + 1).await?;
    }
    let mut body = example("modeldeployment", &ns.name)?;
    body["spec"]["scorer"]["replicas"] = json!(0);
    body["spec"]["version"] = json!("v1");
    body["spec"]["artifacts"] = json!({"uri": scorers.artifacts_uri()});
    body["spec"]["strategy"] =
        json!({"steps": [{"canary": {"weight": 40}}, {"pause": {}}, {"full": {}}]});
    apply(&mds, "als", &body).await?;
    wait_conditions(&mds, "als", "True", "True", "Serving").await?;
    let canary = || async {
        let t = routing_of(&cms.get("als-routing").await?)?;
        anyhow::Ok(
            t.route("als")
                .and_then(|r| r.canary().map(|c| (c.version().to_owned(), c.weight()))),
        )
    };
    let stage_is = |want: Stage| {
        let mds = mds.clone();
        async move { Ok(md_status(&mds, "als").await?.stage == want) }
    };

    body["spec"]["version"] = json!("v2");
    apply(&mds, "als", &body).await?;
    wait_for(WAIT, "v2 at the pause", || stage_is(Stage::Paused)).await?;
    let (ok, out, err) = plugin(&env, &ns.name, &["status", "als"])?;
    assert!(ok, "{err}");
    assert!(
        out.contains("Candidate:  v2")
            && out.contains("Step:       1/3 (pause)")
            && out.contains("candidate 40%"),
        "{out}"
    );
    // Not at a pause → refused with what to do instead; here it is at one.
    let (ok, _, err) = plugin(&env, &ns.name, &["retry", "als"])?;
    assert!(
        !ok && err.contains("only an aborted or rolled-back"),
        "{err}"
    );

    // Abort: every user back on stable, the candidate kept registered, the annotation gone.
    let (ok, _, err) = plugin(&env, &ns.name, &["abort", "als"])?;
    assert!(ok, "{err}");
    wait_for(WAIT, "aborted", || stage_is(Stage::Aborted)).await?;
    assert_eq!(canary().await?, None);
    let md = mds.get("als").await?;
    let s = md.status.clone().unwrap_or_default();
    assert_eq!(s.stable_version.as_deref(), Some("v1"));
    assert!(s.history[0].reason.contains("tester"), "{:?}", s.history[0]);
    wait_for(WAIT, "the abort annotation removed", || async {
        let md = mds.get("als").await?;
        Ok(!md.annotations().contains_key("recsys.io/abort"))
    })
    .await?;
    every_user_on(&scorers, "v1").await?;

    // Retry starts over: the canary at 40% again, then the pause.
    let (ok, _, err) = plugin(&env, &ns.name, &["retry", "als"])?;
    assert!(ok, "{err}");
    wait_for(WAIT, "v2 at the pause again", || stage_is(Stage::Paused)).await?;
    assert_eq!(canary().await?, Some(("v2".into(), 40)));

    // Promote (no --full) approves the pause; the full step promotes.
    let (ok, out, err) = plugin(&env, &ns.name, &["promote", "als"])?;
    assert!(ok && out.contains("step 1 approved"), "{out}{err}");
    wait_for(WAIT, "v2 promoted", || async {
        Ok(md_status(&mds, "als").await?.stable_version.as_deref() == Some("v2"))
    })
    .await?;
    every_user_on(&scorers, "v2").await?;
    // The approval ended with its rollout: a later rollout's pause is not approved by it.
    wait_for(WAIT, "the approval removed", || async {
        Ok(!mds
            .get("als")
            .await?
            .annotations()
            .contains_key("recsys.io/approve"))
    })
    .await?;

    // Undo: v1, stable before, is stable again at once, without the steps.
    let (ok, out, err) = plugin(&env, &ns.name, &["undo", "als"])?;
    assert!(ok && out.contains("undo to v1"), "{out}{err}");
    wait_for(WAIT, "v1 stable again", || async {
        Ok(md_status(&mds, "als").await?.stable_version.as_deref() == Some("v1"))
    })
    .await?;
    let s = md_status(&mds, "als").await?;
    assert!(
        s.history[0].reason.contains("undo by hand"),
        "{:?}",
        s.history[0]
    );
    assert_eq!(mds.get("als").await?.spec.version, "v1");
    every_user_on(&scorers, "v1").await?;
    let (ok, out, _) = plugin(&env, &ns.name, &["history", "als"])?;
    assert!(ok);
    let outcomes: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(
        outcomes,
        ["Promoted", "Promoted", "Aborted", "Promoted"],
        "{out}"
    );
    // Who did what is in the registry's history as well.
    wait_for(WAIT, "the transitions recorded in the registry", || async {
        Ok(md_status(&mds, "als")
            .await?
            .unrecorded_transitions
            .is_empty())
    })
    .await?;
    let aborted = scorers
        .registry
        .rollouts("als")
        .await?
        .into_iter()
        .find(|e| e.transition == "aborted")
        .context("the abort in the registry")?;
    assert!(
        aborted.by.starts_with("recsys.io/abort=tester at "),
        "{aborted:?}"
    );
    // An undo to a version never stable is refused by the plugin.
    let (ok, _, err) = plugin(&env, &ns.name, &["undo", "als", "--to-version", "v9"])?;
    assert!(!ok && err.contains("never stable"), "{err}");
    Ok(())
}

#[tokio::test]
async fn the_ab_readout_finds_a_known_ctr_difference_and_a_skewed_split_trips_the_ratio_check()
-> anyhow::Result<()> {
    let (env, client, ns) = setup("op-ab").await?;
    let _op = Operator::start(&env, &ns.name, &[]).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let redis = env.var("RECSYS_TEST_REDIS_URL")?.to_owned();
    let prefix = format!("ab{}", now_ms());
    let scorers = HostScorers::start_with(
        &env,
        &client,
        &ns.name,
        "als",
        "als",
        2,
        &["--redis-url", &redis, "--redis-prefix", &prefix],
    )
    .await?;
    scorers.publish("als", "v1", 1).await?;
    scorers.publish("als", "v2", 2).await?;
    let salt = "ab-readout";
    let mut body = example("modeldeployment", &ns.name)?;
    body["spec"]["scorer"]["replicas"] = json!(0);
    body["spec"]["version"] = json!("v1");
    body["spec"]["routingSalt"] = json!(salt);
    body["spec"]["strategy"] = json!({
        "steps": [
            {"canary": {"weight": 20}}, {"pause": {}},
            {"canary": {"weight": 50}}, {"pause": {}},
            {"full": {}}
        ],
        "analysis": {"interval": "2s"}
    });
    apply(&mds, "als", &body).await?;
    wait_conditions(&mds, "als", "True", "True", "Serving").await?;
    body["spec"]["version"] = json!("v2");
    apply(&mds, "als", &body).await?;
    let paused_at = |weight: i32| {
        let mds = mds.clone();
        async move {
            let s = md_status(&mds, "als").await?;
            Ok(s.stage == Stage::Paused && s.canary_weight == weight)
        }
    };
    wait_for(WAIT, "v2 paused at 20%", || paused_at(20)).await?;
    let users: Vec<String> = (0..recsys_tests::scorers::USERS)
        .map(|u| format!("u{u}"))
        .collect();
    // Every scorer must follow the table before traffic counts.
    on_canary_everywhere(&scorers.addrs, salt, &users, 0..2000, WAIT).await?;
    // The probes were served lists too: they are the baseline of the counts.
    let mut generated = scorer_segment(scorers.addrs[0], "als", 20).await?;

    // Known CTRs: 10% on stable, 30% on the candidate.
    for round in 0..5 {
        for (i, user) in users.iter().enumerate() {
            serve_and_maybe_click(
                &scorers.addrs,
                i + round,
                user,
                round,
                (0.10, 0.30),
                &mut generated,
            )
            .await?;
        }
        // Users click after their lists are shown, before the next round's lists.
        post_clicks(&scorers.addrs, "als", 20, &mut generated, WAIT).await?;
    }
    let counts = (
        generated.stable.0 + generated.canary.0,
        generated.stable.1 + generated.canary.1,
    );
    let seg = segment_with(&mds, "als", 20, counts, WAIT).await?;
    let side = |name: &str| {
        seg.variants
            .iter()
            .find(|v| v.variant == name)
            .map(|v| (v.impressions as u64, v.clicks as u64))
    };
    assert_eq!(side("stable"), Some(generated.stable), "{seg:?}");
    assert_eq!(side("canary"), Some(generated.canary), "{seg:?}");
    println!("20%: {}", seg.summary);
    let ctr = seg.ctr.as_ref().context("a CTR test")?;
    assert!(
        ctr.significant && ctr.z > 0.0 && ctr.p_value < 0.001,
        "a 10% against 30% CTR is found: {seg:?}"
    );
    let rate = |(n, x): (u64, u64)| x as f64 / n as f64;
    let lift = rate(generated.canary) / rate(generated.stable) - 1.0;
    assert!((ctr.lift.context("lift")? - lift).abs() < 1e-9, "{ctr:?}");
    let split = seg.sample_ratio.as_ref().context("a split")?;
    assert!(!split.mismatch, "every user was served: {split:?}");
    assert!(seg.summary.contains("higher by"), "{}", seg.summary);
    // The scorers' own readout agrees, whichever pod is asked.
    let (status, readout) =
        recsys_tests::http_json(scorers.addrs[1], "GET", "/v1/experiments?model=als", None).await?;
    assert_eq!(status, 200, "{readout}");
    assert_eq!(
        readout["segments"][0]["variants"][1]["clicks"],
        json!(generated.canary.1),
        "{readout}"
    );
    let (ok, out, err) = plugin(&env, &ns.name, &["status", "als"])?;
    assert!(
        ok && out.contains("Experiment: v2") && out.contains("20%: CTR v2"),
        "{out}{err}"
    );

    // 50%: four in five candidate users are lost before their list is served (as when the
    // candidate's page fails to load): the split no longer matches the weight.
    mds.patch(
        "als",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"recsys.io/approve": "1"}}})),
    )
    .await?;
    wait_for(WAIT, "v2 paused at 50%", || paused_at(50)).await?;
    // A user in bucket 2000–4999 is on the candidate only at 50%.
    on_canary_everywhere(&scorers.addrs, salt, &users, 2000..5000, WAIT).await?;
    let mut skewed = recsys_tests::experiments::Generated::default();
    for (i, user) in users.iter().enumerate() {
        let on_canary = bucket(salt, user) < 5000;
        if on_canary && i % 5 != 0 {
            continue;
        }
        serve_and_maybe_click(&scorers.addrs, i, user, 99, (0.10, 0.10), &mut skewed).await?;
    }
    post_clicks(&scorers.addrs, "als", 50, &mut skewed, WAIT).await?;
    let counts = (
        skewed.stable.0 + skewed.canary.0,
        skewed.stable.1 + skewed.canary.1,
    );
    let seg = segment_with(&mds, "als", 50, counts, WAIT).await?;
    println!("50%: {}", seg.summary);
    let split = seg.sample_ratio.as_ref().context("a split")?;
    assert!(
        split.mismatch && split.p_value < 0.001 && split.observed_canary_share < 0.3,
        "{seg:?}"
    );
    assert!(
        seg.summary.starts_with("sample ratio mismatch"),
        "{}",
        seg.summary
    );
    wait_for(WAIT, "a SampleRatioMismatch Warning", || async {
        Ok(events(&client, &ns.name, "als")
            .await?
            .iter()
            .any(|(t, r)| t == "Warning" && r == "SampleRatioMismatch"))
    })
    .await?;
    // The 20% segment keeps its readout beside the new one.
    let s = md_status(&mds, "als").await?;
    let x = s.experiment.context("a readout")?;
    assert!(
        x.segments
            .iter()
            .any(|g| g.canary_weight == 20 && !g.sample_ratio.as_ref().is_some_and(|r| r.mismatch)),
        "{x:?}"
    );
    Ok(())
}

/// A Prometheus server (Debian's package, installed by tests/env/up.sh) scraping `targets`
/// every second as job `job`, on a free port of 127.0.0.1.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(job: &str, targets: &[std::net::SocketAddr]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let targets: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let (child, port) = recsys_tests::monitoring::spawn_prometheus(dir.path(), &config)?;
        let me = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        wait_for(WAIT, "Prometheus ready", || async {
            Ok(http_get(&format!("{}/-/ready", me.url))
                .await
                .is_ok_and(|(s, _)| s == 200))
        })
        .await?;
        Ok(me)
    }
}

#[tokio::test]
async fn with_a_prometheus_source_the_analysis_queries_it_holds_without_it_and_rolls_back()
-> anyhow::Result<()> {
    let (env, client, ns) = setup("op-prom").await?;
    let _op = Operator::start(&env, &ns.name, &[]).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let scorers = HostScorers::start(&env, &client, &ns.name, "als", "als", 2).await?;
    scorers.publish("als", "v1", 1).await?;
    scorers.publish_scaled("als", "v2", 1, 3.0).await?;
    let prometheus = Prometheus::start("als-scorer", &scorers.addrs).await?;
    // First a server that is not there.
    let nowhere = format!("http://127.0.0.1:{}", free_port()?);
    let mut body = example("modeldeployment", &ns.name)?;
    body["spec"]["scorer"]["replicas"] = json!(0);
    body["spec"]["version"] = json!("v1");
    body["spec"]["strategy"] = json!({
        "steps": [{"canary": {"weight": 50, "duration": "10m"}}, {"full": {}}],
        "analysis": {"interval": "4s", "failureLimit": 2, "minSamples": 5,
            "maxScoreDriftPsi": 0.5, "maxErrorRate": 0.05,
            "prometheus": {"address": nowhere}}
    });
    apply(&mds, "als", &body).await?;
    wait_conditions(&mds, "als", "True", "True", "Serving").await?;
    let load =
        recsys_tests::scorers::RequestLoop::start(scorers.addrs.clone(), Duration::from_millis(4));
    body["spec"]["version"] = json!("v2");
    apply(&mds, "als", &body).await?;
    wait_for(WAIT, "an inconclusive run without Prometheus", || async {
        let s = md_status(&mds, "als").await?;
        Ok(s.analysis.is_some_and(|a| a.runs.len() >= 2))
    })
    .await?;
    let s = md_status(&mds, "als").await?;
    assert_eq!((s.stage, s.canary_weight), (Stage::Canary, 50), "held");
    let run = &s.analysis.context("analysis")?.runs[0];
    assert_eq!(
        (run.source, run.verdict),
        (
            recsys_crds::model_deployment::AnalysisSource::Prometheus,
            recsys_crds::model_deployment::Verdict::Inconclusive
        )
    );
    assert!(
        run.checks
            .iter()
            .all(|c| c.message.contains("no figures: Prometheus at") && c.observed.is_none()),
        "{run:?}"
    );

    // The real server: the skewed scores fail twice and the candidate is rolled back.
    body["spec"]["strategy"]["analysis"]["prometheus"]["address"] = json!(prometheus.url);
    apply(&mds, "als", &body).await?;
    wait_for(Duration::from_secs(60), "v2 rolled back", || async {
        Ok(md_status(&mds, "als").await?.stage == Stage::RolledBack)
    })
    .await?;
    let s = md_status(&mds, "als").await?;
    let run = s
        .analysis
        .as_ref()
        .and_then(|a| a.runs.first())
        .context("a run")?;
    let check = |kind: recsys_crds::model_deployment::CheckKind| {
        run.checks.iter().find(|c| c.check == kind).cloned()
    };
    let drift = check(recsys_crds::model_deployment::CheckKind::ScoreDrift).context("drift")?;
    let errors = check(recsys_crds::model_deployment::CheckKind::ErrorRate).context("errors")?;
    assert_eq!(
        run.source,
        recsys_crds::model_deployment::AnalysisSource::Prometheus
    );
    assert_eq!(run.pods, 2, "both scorers scraped: {run:?}");
    assert!(drift.observed.unwrap_or_default() > 0.5, "{run:?}");
    assert_eq!(
        (errors.verdict, errors.observed),
        (
            recsys_crds::model_deployment::Verdict::Successful,
            Some(0.0)
        ),
        "{run:?}"
    );
    assert!(
        s.history[0].reason.contains("ScoreDrift"),
        "{:?}",
        s.history[0]
    );
    every_user_on(&scorers, "v1").await?;
    let report = load.stop().await?;
    assert!(
        report.failed.is_empty(),
        "lost requests: {:?}",
        report.failed
    );
    Ok(())
}
