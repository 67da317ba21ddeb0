//! End to end on the real node, as a user would run recsys: `helm install` of the chart with
//! the images built by `tests/env/images.sh`, the example FeatureDefinitions and BatchJobs
//! applied, trainer Jobs really running popularity, category-affinity and cf-train against the
//! test Postgres, Redis and S3 (through Services, as in any cluster), a scorer serving the
//! model the operator routed, a recommendation fetched through its Service from inside the
//! cluster, and `helm uninstall` leaving only what the docs say it keeps.
//!
//! Also what the kwok node could not show: trainer exit codes driving retries and the "not
//! retryable" pod failure policy, `kubectl logs`, the security context holding with the real
//! binaries (checked in the runtime spec containerd ran), and the operator working with its own
//! ServiceAccount's RBAC.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use recsys_core::cf::interactions::{Event, EventType};
use recsys_core::events::{self, EventRow, PostgresEvents};
use recsys_core::stores::{self, PostgresArgs};
use recsys_tests::real_node::{
    RealNode, create_from_literals, helm_install, kubectl, print_diagnostics, run,
};
use recsys_tests::{TestEnv, TestNamespace, install_crds, repo_root, wait_for};
use serde_json::{Value, json};

const MODEL: &str = "als";

/// Four weeks of a small shop up to now: 200 users with one or two favourite categories of
/// 6, 120 products, views, clicks, carts and purchases.
fn shop_events() -> Vec<EventRow> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut rows = vec![];
    for u in 0..200_u64 {
        let favourites = [u % 6, (u / 6 + 1) % 6];
        for e in 0..40_u64 {
            let category = if next(10) < 8 {
                favourites[(next(2)) as usize]
            } else {
                next(6)
            };
            let product = category * 20 + next(20);
            let kind = match next(20) {
                0 => EventType::Purchase,
                1 | 2 => EventType::AddToCart,
                3..=7 => EventType::Click,
                _ => EventType::View,
            };
            rows.push(EventRow {
                event_id: format!("e{u}-{e}"),
                event: Event {
                    user: format!("u{u}"),
                    item: format!("p{product}"),
                    kind,
                    ts_ms: Some(now - (next(28 * 24 * 60) as i64 + 1) * 60_000),
                    value: None,
                },
                category: Some(format!("c{category}")),
            });
        }
    }
    rows
}

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("recsys.io", "v1alpha1", kind))
}

/// A manifest of docs/examples moved into `ns`; several documents per file.
fn examples(path: &str, ns: &str) -> anyhow::Result<Vec<Value>> {
    let full = repo_root().join(path);
    let text = std::fs::read_to_string(&full).with_context(|| full.display().to_string())?;
    let mut out = vec![];
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut v: Value = serde::Deserialize::deserialize(doc)?;
        if v.is_null() {
            continue;
        }
        v["metadata"]["namespace"] = json!(ns);
        let subjects = v.get_mut("subjects").and_then(Value::as_array_mut);
        for subject in subjects.into_iter().flatten() {
            subject["namespace"] = json!(ns);
        }
        out.push(v);
    }
    Ok(out)
}

/// `kubectl apply --server-side` of objects.
fn apply(env: &TestEnv, objects: &[Value]) -> anyhow::Result<String> {
    let file = tempfile::NamedTempFile::new()?;
    let docs: Vec<String> = objects
        .iter()
        .map(serde_yaml::to_string)
        .collect::<Result<_, _>>()?;
    std::fs::write(file.path(), docs.join("---\n"))?;
    kubectl(
        env,
        &[
            "apply",
            "--server-side",
            "-f",
            file.path().to_str().unwrap_or_default(),
        ],
    )
}

/// The runs of a BatchJob's status history: `(outcome, reason, attempts)`.
async fn runs(api: &Api<DynamicObject>, name: &str) -> anyhow::Result<Vec<(String, String, i64)>> {
    let bj = api.get(name).await?;
    Ok(bj.data["status"]["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap_or_default().to_owned(),
                r["reason"].as_str().unwrap_or_default().to_owned(),
                r["attempts"].as_i64().unwrap_or_default(),
            )
        })
        .collect())
}

/// Waits for a finished run of BatchJob `name` and returns it.
async fn finished_run(
    api: &Api<DynamicObject>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<(String, String, i64)> {
    wait_for(
        timeout,
        &format!("a finished run of BatchJob {name}"),
        || async { Ok(!runs(api, name).await?.is_empty()) },
    )
    .await?;
    Ok(runs(api, name).await?.remove(0))
}

/// Pods of a Job, or (with `label` `recsys.io/batchjob`) of every Job of a BatchJob.
/// Merges `patch` into BatchJob `name` and asks for a run with request `token`, as a user would
/// with kubectl.
fn rerun(env: &TestEnv, n: &str, name: &str, patch: &Value, token: &str) -> anyhow::Result<()> {
    let patch = patch.to_string();
    kubectl(
        env,
        &[
            "-n",
            n,
            "patch",
            "batchjob",
            name,
            "--type=merge",
            "-p",
            &patch,
        ],
    )?;
    let request = format!("recsys.io/run={token}");
    kubectl(
        env,
        &[
            "-n",
            n,
            "annotate",
            "--overwrite",
            "batchjob",
            name,
            &request,
        ],
    )?;
    Ok(())
}

/// The newest finished run of a BatchJob, as JSON.
async fn latest_run(api: &Api<DynamicObject>, name: &str) -> anyhow::Result<Value> {
    let bj = api.get(name).await?;
    Ok(bj.data["status"]["history"][0].clone())
}

/// Waits for a finished run of BatchJob `name` newer than the run of Job `after`.
async fn next_run(
    api: &Api<DynamicObject>,
    name: &str,
    after: &str,
    timeout: Duration,
) -> anyhow::Result<Value> {
    wait_for(timeout, &format!("a new run of {name}"), || async {
        let run = latest_run(api, name).await?;
        Ok(run["jobName"].as_str().is_some_and(|j| j != after))
    })
    .await?;
    latest_run(api, name).await
}

fn pods_labelled(pods: &[Pod], label: &str, value: &str) -> Vec<Pod> {
    pods.iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(label))
                .is_some_and(|v| v == value)
        })
        .cloned()
        .collect()
}

fn container_id(pod: &Pod) -> anyhow::Result<String> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .with_context(|| format!("pod {:?} has no container id", pod.metadata.name))
}

/// What containerd really ran: non-root, read-only root, no privilege escalation, no
/// capabilities; and whether the ServiceAccount token was mounted.
fn assert_locked_down(node: &RealNode, what: &str, pod: &Pod, token: bool) -> anyhow::Result<()> {
    let spec = node.runtime_spec(&container_id(pod)?)?;
    let user = &spec["process"]["user"];
    assert_eq!(user["uid"], json!(65532), "{what}: runs as {user}");
    assert_eq!(
        spec["root"]["readonly"],
        json!(true),
        "{what}: root not read-only"
    );
    assert_eq!(
        spec["process"]["noNewPrivileges"],
        json!(true),
        "{what}: privilege escalation allowed"
    );
    let caps = &spec["process"]["capabilities"]["effective"];
    assert!(
        caps.as_array().is_none_or(Vec::is_empty),
        "{what}: capabilities {caps}"
    );
    let has_token = spec["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|m| m["destination"] == json!("/var/run/secrets/kubernetes.io/serviceaccount"));
    assert_eq!(has_token, token, "{what}: service account token mounted");
    Ok(())
}

/// The bearer token of the one client allowed to post events in the end-to-end test.
const INGEST_TOKEN: &str = "e2e-shop-frontend-token-0123";

#[tokio::test]
async fn the_chart_runs_for_real_on_the_real_node() -> anyhow::Result<()> {
    let started = Instant::now();
    let env = TestEnv::load()?;
    let node = RealNode::from_env(&env)?;
    let client = env.client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::create(&env, &client, "e2e").await?;
    let result = end_to_end(&env, &node, &client, &ns.name, started).await;
    if result.is_err() {
        print_diagnostics(
            &env,
            &ns.name,
            "pods,jobs,cronjobs,batchjobs,modeldeployments,featuredefinitions",
        );
    }
    result
}

async fn end_to_end(
    env: &TestEnv,
    node: &RealNode,
    client: &kube::Client,
    n: &str,
    started: Instant,
) -> anyhow::Result<()> {
    let (env, node) = (env.clone(), node.clone());

    // ---- the shop's stores: a database of its own with four weeks of events, prefixes in
    // Redis and S3 of its own; Pods reach them through the environment's Services.
    let db = env.fresh_database("e2e").await?;
    let db_name = db.rsplit('/').next().context("database name")?;
    {
        let pool = stores::postgres(&PostgresArgs {
            url: db.clone(),
            max_connections: 2,
        })
        .await?;
        events::migrate(&pool).await?;
        PostgresEvents::new(pool.clone())
            .insert(&shop_events())
            .await?;
        pool.close().await;
    }
    let cluster_db = node.database_url_for(db_name)?;
    let bucket = env.var("RECSYS_TEST_S3_BUCKET")?;
    let store = format!("s3://{bucket}/{n}");
    let s3_region = env.var("RECSYS_TEST_S3_REGION")?.to_owned();
    let prefix = n.replace('-', "_");
    create_from_literals(
        &env,
        n,
        &["configmap", "recsys-config"],
        &[
            ("RECSYS_REDIS_URL", &node.redis_url),
            ("RECSYS_REDIS_PREFIX", &prefix),
            ("RECSYS_ARTIFACTS", &store),
            ("RECSYS_S3_ENDPOINT", &node.s3_endpoint),
            ("RECSYS_S3_FORCE_PATH_STYLE", "true"),
            ("RECSYS_S3_REGION", &s3_region),
            // These events are a historical load, not a live stream: minutes pass between
            // loading them and the jobs' input checks, which would otherwise find them stale.
            ("RECSYS_DQ_FRESHNESS_MAX_AGE", "6h"),
        ],
    )?;
    create_from_literals(
        &env,
        n,
        &["secret", "generic", "recsys-secrets"],
        &[
            ("RECSYS_DATABASE_URL", &cluster_db),
            ("AWS_ACCESS_KEY_ID", env.var("AWS_ACCESS_KEY_ID")?),
            ("AWS_SECRET_ACCESS_KEY", env.var("AWS_SECRET_ACCESS_KEY")?),
        ],
    )?;
    create_from_literals(
        &env,
        n,
        &["secret", "generic", "recsys-registry"],
        &[("database-url", &cluster_db)],
    )?;
    // The clients allowed to post events to the scorer (the chart's default tokens Secret).
    create_from_literals(
        &env,
        n,
        &["secret", "generic", "recsys-scorer-tokens"],
        &[("shop-frontend", INGEST_TOKEN)],
    )?;

    // ---- helm install, with the images built here, everything on the real node.
    let release = format!("recsys-{}", n.rsplit('-').next().unwrap_or("e2e"));
    let install_started = Instant::now();
    helm_install(
        &env,
        &node,
        n,
        &release,
        &[
            "--set",
            "registry.databaseSecret.name=recsys-registry",
            "--set",
            "registry.refreshInterval=5s",
        ],
    )?;
    let operator_ready = install_started.elapsed();
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    let operator_pods = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=recsys-operator"))
        .await?
        .items;
    assert_eq!(operator_pods.len(), 1, "one operator pod");
    let op = &operator_pods[0];
    assert_eq!(
        op.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(node.name.as_str()),
        "the operator runs on the real node"
    );
    assert_locked_down(&node, "operator", op, true)?;

    // ---- the example FeatureDefinitions and BatchJobs, as shipped.
    let mut objects = vec![];
    for f in [
        "features/popularity-score",
        "features/freshness-score",
        "features/user-category-affinity",
        "batchjob",
        "batchjobs/category-affinity",
        "batchjobs/cf-train",
        "batchjobs/data-quality",
    ] {
        objects.extend(examples(&format!("docs/examples/{f}.yaml"), n)?);
    }
    apply(&env, &objects)?;
    let fds: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), n, &resource("FeatureDefinition"));
    for fd in [
        "popularity-score-v1",
        "freshness-score-v1",
        "user-category-affinity-v1",
    ] {
        wait_for(
            Duration::from_secs(90),
            &format!("FeatureDefinition {fd} registered by the operator pod"),
            || async {
                let o = fds.get(fd).await?;
                Ok(o.data["status"]["registeredVersion"].is_string())
            },
        )
        .await?;
    }

    // ---- run the scheduled jobs now, as a user would: the run annotation.
    let bjs: Api<DynamicObject> = Api::namespaced_with(client.clone(), n, &resource("BatchJob"));
    for job in [
        "popularity",
        "category-affinity",
        "cf-train",
        "data-quality",
    ] {
        kubectl(
            &env,
            &["-n", n, "annotate", "batchjob", job, "recsys.io/run=first"],
        )?;
    }

    // ---- exit codes drive retries for real: bad options exit 2 and fail at once; an
    // unreachable database exits 1 and is retried up to maxAttempts.
    let mut failing = examples("docs/examples/batchjob.yaml", n)?;
    let mut not_retryable = failing.remove(0);
    not_retryable["metadata"]["name"] = json!("popularity-bad-window");
    not_retryable["metadata"]["annotations"] = json!({ "recsys.io/run": "1" });
    not_retryable["spec"]["schedule"] = Value::Null;
    not_retryable["spec"]["timeZone"] = Value::Null;
    not_retryable["spec"]["parameters"]["window"] = json!("ninety days");
    let mut retryable = not_retryable.clone();
    retryable["metadata"]["name"] = json!("popularity-no-database");
    retryable["spec"]["parameters"]["window"] = json!("90d");
    retryable["spec"]["retry"]["maxAttempts"] = json!(2);
    // The environment's Postgres Service, on a port nothing listens on.
    let (server, database) = cluster_db.rsplit_once('/').context("database URL")?;
    let (host, _port) = server.rsplit_once(':').context("database URL port")?;
    let unreachable = format!("{host}:1/{database}");
    retryable["spec"]["parameters"]["database-url"] = json!(unreachable);
    // A data-quality gate that holds: the same checks with a freshness no historical load
    // meets exit 3, named as a gate and not retried.
    let mut strict = examples("docs/examples/batchjobs/data-quality.yaml", n)?.remove(0);
    strict["metadata"]["name"] = json!("data-quality-strict");
    strict["metadata"]["annotations"] = json!({ "recsys.io/run": "1" });
    strict["spec"]["schedule"] = Value::Null;
    strict["spec"]["parameters"] = json!({ "freshness-max-age": "1s" });
    apply(&env, &[not_retryable, retryable, strict])?;

    let timeout = Duration::from_secs(300);
    for job in [
        "popularity",
        "category-affinity",
        "cf-train",
        "data-quality",
    ] {
        let (outcome, reason, attempts) = finished_run(&bjs, job, timeout).await?;
        if outcome != "Succeeded" {
            let logs = kubectl(
                &env,
                &["-n", n, "logs", "-l", &format!("recsys.io/batchjob={job}")],
            )
            .unwrap_or_else(|e| e.to_string());
            panic!("{job}: {outcome} ({reason}) after {attempts} attempts; logs:\n{logs}");
        }
    }

    // The run's status names the version it registered, from the trainer's summary; and
    // `kubectl logs` reaches the trainer's own output.
    let first = latest_run(&bjs, "cf-train").await?;
    let version = first["version"]
        .as_str()
        .with_context(|| format!("no version in the cf-train run: {first}"))?
        .to_owned();
    let cf_job = first["jobName"].as_str().unwrap_or_default().to_owned();
    let logs = kubectl(&env, &["-n", n, "logs", &format!("job/{cf_job}")])?;
    assert!(
        logs.contains(&version),
        "the trainer's log names {version}:\n{logs}"
    );
    assert!(first["rows"].as_i64().is_some_and(|r| r > 0), "{first}");

    let all_pods = pods.list(&ListParams::default()).await?.items;
    let trainer = pods_labelled(&all_pods, "job-name", &cf_job);
    assert_eq!(trainer.len(), 1, "cf-train ran once");
    assert_eq!(
        trainer[0]
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref()),
        Some(node.name.as_str())
    );
    assert_locked_down(&node, "trainer", &trainer[0], false)?;

    // Every job checked its input: the runs say so, with the id of their rows in
    // data_quality_results.
    for job in [
        "popularity",
        "category-affinity",
        "cf-train",
        "data-quality",
    ] {
        let run = latest_run(&bjs, job).await?;
        let dq = &run["dataQuality"];
        assert!(
            dq["passed"] == json!(true) && dq["runId"].as_str().is_some_and(|r| !r.is_empty()),
            "{job}: {run}"
        );
    }
    let (outcome, reason, attempts) = finished_run(&bjs, "data-quality-strict", timeout).await?;
    assert_eq!(
        (outcome.as_str(), attempts),
        ("Failed", 1),
        "a held gate is not retried: {reason}"
    );
    assert!(
        reason.starts_with("DataQualityGate: ") && reason.contains("freshness on events"),
        "{reason}"
    );
    let strict_run = latest_run(&bjs, "data-quality-strict").await?;
    assert_eq!(
        strict_run["dataQuality"]["violations"][0],
        json!({"check": "freshness", "checkType": "freshness", "target": "events", "blocking": true}),
        "{strict_run}"
    );

    let (outcome, reason, _) = finished_run(&bjs, "popularity-bad-window", timeout).await?;
    assert_eq!(outcome, "Failed", "bad options: {reason}");
    assert!(
        reason.contains("PodFailurePolicy"),
        "not retryable: {reason}"
    );
    let (outcome, reason, attempts) = finished_run(&bjs, "popularity-no-database", timeout).await?;
    assert_eq!(outcome, "Failed", "unreachable database: {reason}");
    assert!(reason.contains("BackoffLimitExceeded"), "retried: {reason}");
    let jobs: Api<Job> = Api::namespaced(client.clone(), n);
    let all_pods = pods.list(&ListParams::default()).await?.items;
    let attempts_of = |bj: &str| -> Vec<i32> {
        pods_labelled(&all_pods, "recsys.io/batchjob", bj)
            .iter()
            .filter_map(|p| {
                let status = p.status.as_ref()?.container_statuses.as_ref()?.first()?;
                Some(status.state.as_ref()?.terminated.as_ref()?.exit_code)
            })
            .collect()
    };
    assert_eq!(
        attempts_of("popularity-bad-window"),
        [2],
        "exit 2 is not retried"
    );
    assert_eq!(
        (attempts_of("popularity-no-database"), attempts),
        (vec![1, 1], 2),
        "exit 1 is retried up to maxAttempts"
    );
    assert_eq!(
        attempts_of("data-quality-strict"),
        [3],
        "a held gate exits 3 and is not retried"
    );
    let failed_job = jobs
        .list(&ListParams::default().labels("recsys.io/batchjob=popularity-bad-window"))
        .await?
        .items;
    assert_eq!(failed_job.len(), 1);
    let logs = kubectl(
        &env,
        &[
            "-n",
            n,
            "logs",
            &format!(
                "job/{}",
                failed_job[0].metadata.name.as_deref().unwrap_or_default()
            ),
        ],
    )?;
    assert!(
        logs.contains("ninety days"),
        "the trainer says what is wrong:\n{logs}"
    );

    // ---- a ModelDeployment serves the new version: the operator runs its scorer pods, which
    // load the version from the artifact store with credentials from the Secret it names.
    create_from_literals(
        &env,
        n,
        &["secret", "generic", "recsys-s3"],
        &[
            ("AWS_ACCESS_KEY_ID", env.var("AWS_ACCESS_KEY_ID")?),
            ("AWS_SECRET_ACCESS_KEY", env.var("AWS_SECRET_ACCESS_KEY")?),
        ],
    )?;
    let mut md = recsys_tests::example("ModelDeployment", n)?;
    md["spec"]["model"] = json!(MODEL);
    md["spec"]["version"] = json!(version);
    md["spec"]["artifacts"] = json!({
        "uri": store,
        "endpoint": node.s3_endpoint,
        "region": s3_region,
        "forcePathStyle": true,
        "credentialsSecret": "recsys-s3"
    });
    md["spec"]["scorer"] = json!({ "replicas": 2 });
    md["spec"]["strategy"] = json!({
        "steps": [{ "canary": { "weight": 50 } }, { "full": {} }],
        "analysis": { "minOfflineMetricRatio": 0.98 }
    });
    apply(&env, &[md])?;
    let mds: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), n, &resource("ModelDeployment"));
    let scorer_name = format!("{MODEL}-scorer");
    wait_for(
        Duration::from_secs(180),
        "the ModelDeployment Ready: its scorer pods serve the version",
        || async {
            let md = mds.get(MODEL).await?;
            let ready = md.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            Ok(ready && md.data["status"]["stableVersion"] == json!(version))
        },
    )
    .await
    .map_err(|e| {
        let logs = kubectl(
            &env,
            &[
                "-n",
                n,
                "logs",
                &format!("deploy/{scorer_name}"),
                "--tail=30",
            ],
        )
        .unwrap_or_default();
        let status = kubectl(
            &env,
            &["-n", n, "get", "modeldeployment", MODEL, "-o", "yaml"],
        )
        .unwrap_or_default();
        anyhow::anyhow!("{e:#}\nscorer logs:\n{logs}\n{status}")
    })?;
    let md_status = mds.get(MODEL).await?.data["status"].clone();
    assert_eq!(
        md_status["serviceUrl"],
        json!(format!("http://{scorer_name}.{n}.svc")),
        "{md_status}"
    );
    assert_eq!(md_status["scorers"]["withStable"], json!(2), "{md_status}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
    let scorer_deployment = deployments.get(&scorer_name).await?;
    assert_eq!(
        scorer_deployment.status.and_then(|s| s.ready_replicas),
        Some(2)
    );

    // ---- a recommendation through the Service, by its DNS name, from a Pod on the node.
    let url =
        format!("http://{scorer_name}.{n}.svc.cluster.local/v1/recommendations?user_id=u7&k=5");
    let (code, body) = node
        .toolbox_run(
            &env,
            client,
            n,
            "client",
            &["wget", "-q", "-O", "-", &url],
            Duration::from_secs(60),
        )
        .await?;
    let first_recommendation = install_started.elapsed();
    assert_eq!(code, 0, "wget {url}: {body}");
    let answer: Value =
        serde_json::from_str(body.trim()).with_context(|| format!("not JSON: {body}"))?;
    assert_eq!(answer["version"], json!(version), "{answer}");
    assert_eq!(answer["model"], json!(MODEL));
    assert_eq!(answer["path"], json!("cf"), "u7 was trained with: {answer}");
    let items = answer["items"].as_array().context("items")?;
    assert_eq!(items.len(), 5, "{answer}");
    let scorer_pods = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=recsys-scorer"))
        .await?
        .items;
    for p in &scorer_pods {
        assert_locked_down(&node, "scorer", p, true)?;
    }

    // ---- cf-train hands new versions to the ModelDeployment: one below its threshold is
    // registered and kept back, one that reaches it becomes spec.version.
    let hand_off = json!({ "spec": {
        "cfTrain": { "model": MODEL, "handOffTo": MODEL },
        "parameters": { "regularization": "100000", "iterations": "1" }
    }});
    rerun(&env, n, "cf-train", &hand_off, "worse")?;
    let worse = next_run(&bjs, "cf-train", &cf_job, timeout).await?;
    assert_eq!(worse["outcome"], json!("Succeeded"), "{worse}");
    assert_eq!(
        worse["handOff"]["outcome"],
        json!("BelowThreshold"),
        "{worse}"
    );
    assert!(
        worse["handOff"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("ratio") && m.contains(&version)),
        "{worse}"
    );
    assert_eq!(
        mds.get(MODEL).await?.data["spec"]["version"],
        json!(version),
        "kept back"
    );

    let better =
        json!({ "spec": { "parameters": { "regularization": null, "iterations": "15" } } });
    rerun(&env, n, "cf-train", &better, "better")?;
    let worse_job = worse["jobName"].as_str().unwrap_or_default().to_owned();
    let good = next_run(&bjs, "cf-train", &worse_job, timeout).await?;
    assert_eq!(good["handOff"]["outcome"], json!("HandedOff"), "{good}");
    let new_version = good["version"].as_str().context("version")?.to_owned();
    let md = mds.get(MODEL).await?;
    assert_eq!(md.data["spec"]["version"], json!(new_version), "handed off");
    assert!(
        md.metadata
            .managed_fields
            .iter()
            .flatten()
            .any(|f| f.manager.as_deref() == Some("recsys-operator-handoff")),
        "spec.version written by the hand-off's own field manager"
    );

    // ---- the handed-off version rolls out by itself: every scorer pod loads it, its offline
    // NDCG@10 passes the ratio, 50% of users, then everyone; the history keeps both.
    wait_for(
        Duration::from_secs(120),
        &format!("{new_version} promoted"),
        || async {
            let s = mds.get(MODEL).await?.data["status"].clone();
            Ok(s["stableVersion"] == json!(new_version) && s["stage"] == json!("Promoted"))
        },
    )
    .await
    .map_err(|e| {
        let status = kubectl(
            &env,
            &["-n", n, "get", "modeldeployment", MODEL, "-o", "yaml"],
        )
        .unwrap_or_default();
        anyhow::anyhow!("{e:#}\n{status}")
    })?;
    let history = mds.get(MODEL).await?.data["status"]["history"].clone();
    assert_eq!(history[0]["version"], json!(new_version), "{history}");
    assert_eq!(history[1]["version"], json!(version), "{history}");
    // The operator pod recorded every move in the model's registry on S3 too, with the
    // credentials Secret the ModelDeployment names.
    wait_for(
        Duration::from_secs(60),
        "the transitions recorded in the registry",
        || async {
            let queued = mds.get(MODEL).await?.data["status"]["unrecordedTransitions"].clone();
            Ok(queued.as_array().is_none_or(|q| q.is_empty()))
        },
    )
    .await?;
    let registry = recsys_core::artifacts::Registry::new(
        recsys_core::stores::artifact_store(
            &store,
            &env.s3_args(recsys_core::stores::ChecksumMode::WhenSupported)?,
        )
        .await?,
    );
    let events = registry.rollouts(MODEL).await?;
    let moves: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| (e.version.as_str(), e.transition.as_str(), e.by.as_str()))
        .collect();
    // The canary step has no duration: it and the full step pass in one reconciliation, one
    // transition from Pending to promoted.
    assert_eq!(
        moves,
        [
            (new_version.as_str(), "promoted", "recsys-operator"),
            (version.as_str(), "promoted", "recsys-operator")
        ],
        "the registry's rollout history"
    );
    assert_eq!(events[0].stable.as_deref(), Some(new_version.as_str()));
    let (code, body) = node
        .toolbox_run(
            &env,
            client,
            n,
            "client-after",
            &["wget", "-q", "-O", "-", &url],
            Duration::from_secs(60),
        )
        .await?;
    assert_eq!(code, 0, "wget {url}: {body}");
    let answer: Value =
        serde_json::from_str(body.trim()).with_context(|| format!("not JSON: {body}"))?;
    assert_eq!(answer["version"], json!(new_version), "{answer}");

    // ---- the model's input fails its checks: a rollout holds where it is, saying which
    // check, and goes on once a later run passes.
    let strict_job = strict_run["jobName"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    kubectl(
        &env,
        &[
            "-n",
            n,
            "annotate",
            "--overwrite",
            "batchjob",
            "data-quality-strict",
            "recsys.io/run=2",
        ],
    )?;
    let failing = next_run(&bjs, "data-quality-strict", &strict_job, timeout).await?;
    assert_eq!(failing["dataQuality"]["passed"], json!(false), "{failing}");
    kubectl(
        &env,
        &[
            "-n",
            n,
            "patch",
            "modeldeployment",
            MODEL,
            "--type=merge",
            "-p",
            &json!({"spec": {"version": version}}).to_string(),
        ],
    )?;
    wait_for(
        Duration::from_secs(120),
        &format!("the rollout of {version} held by the failing checks"),
        || async {
            let s = mds.get(MODEL).await?.data["status"].clone();
            let held = s["conditions"].as_array().into_iter().flatten().any(|c| {
                c["type"] == "Progressing"
                    && c["reason"] == "DataQualityHeld"
                    && c["message"].as_str().is_some_and(|m| {
                        m.contains("freshness on events") && m.contains("data-quality-strict")
                    })
            });
            Ok(held && s["stableVersion"] == json!(new_version))
        },
    )
    .await?;
    let dq_job = latest_run(&bjs, "data-quality").await?["jobName"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    kubectl(
        &env,
        &[
            "-n",
            n,
            "annotate",
            "--overwrite",
            "batchjob",
            "data-quality",
            "recsys.io/run=second",
        ],
    )?;
    let passing = next_run(&bjs, "data-quality", &dq_job, timeout).await?;
    assert_eq!(passing["dataQuality"]["passed"], json!(true), "{passing}");
    wait_for(
        Duration::from_secs(120),
        &format!("{version} promoted once the checks pass"),
        || async {
            let s = mds.get(MODEL).await?.data["status"].clone();
            Ok(s["stableVersion"] == json!(version) && s["stage"] == json!("Promoted"))
        },
    )
    .await?;

    // ---- event ingestion through the Service: refused without a token, accepted with the
    // one in the tokens Secret the chart names. Last, since the event joins the training data
    // of any later cf-train run.
    let events_url = format!("http://{scorer_name}.{n}.svc.cluster.local/v1/events");
    let event = r#"{"events":[{"user_id":"u7","product_id":"p1","event_type":"click","timestamp":1700000000000}]}"#;
    let post = |auth: Option<String>| {
        let mut args: Vec<String> = [
            "wget",
            "-q",
            "-O",
            "-",
            "--header",
            "Content-Type: application/json",
        ]
        .map(str::to_owned)
        .to_vec();
        if let Some(a) = auth {
            args.extend(["--header".to_owned(), a]);
        }
        args.extend([
            "--post-data".to_owned(),
            event.to_owned(),
            events_url.clone(),
        ]);
        args
    };
    let anonymous = post(None);
    let anonymous: Vec<&str> = anonymous.iter().map(String::as_str).collect();
    let (code, out) = node
        .toolbox_run(
            &env,
            client,
            n,
            "ingest-anonymous",
            &anonymous,
            Duration::from_secs(60),
        )
        .await?;
    assert!(
        code != 0 && out.contains("401"),
        "an anonymous write: {code} {out}"
    );
    let with_token = post(Some(format!("Authorization: Bearer {INGEST_TOKEN}")));
    let with_token: Vec<&str> = with_token.iter().map(String::as_str).collect();
    let (code, out) = node
        .toolbox_run(
            &env,
            client,
            n,
            "ingest-token",
            &with_token,
            Duration::from_secs(60),
        )
        .await?;
    assert_eq!(code, 0, "a write with the token: {out}");
    let accepted: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("not JSON: {out}"))?;
    assert_eq!(accepted["users"], json!(1), "{accepted}");
    eprintln!(
        "figures: helm install → operator ready {:.1}s; → first recommendation through the Service {:.1}s; whole test {:.1}s",
        operator_ready.as_secs_f64(),
        first_recommendation.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // ---- helm uninstall removes the release and keeps what the docs say it keeps: the CRDs,
    // and the resources users created with their children.
    run(env
        .command("helm")
        .args(["uninstall", &release, "--namespace", n, "--wait"]))?;
    let left = kubectl(
        &env,
        &[
            "get",
            "deployments,services,serviceaccounts,roles,rolebindings,configmaps,secrets",
            "-n",
            n,
            "-l",
            &format!("app.kubernetes.io/instance={release}"),
            "-o",
            "name",
        ],
    )?;
    assert_eq!(
        left.trim(),
        "",
        "namespaced objects of the release left: {left}"
    );
    let cluster_left = kubectl(
        &env,
        &["get", "clusterroles,clusterrolebindings", "-o", "name"],
    )?;
    assert!(
        !cluster_left.contains(&release),
        "cluster objects of the release left: {cluster_left}"
    );
    let crds = kubectl(&env, &["get", "crd", "-o", "name"])?;
    for crd in ["batchjobs", "modeldeployments", "featuredefinitions"] {
        assert!(crds.contains(&format!("{crd}.recsys.io")), "CRD {crd} kept");
    }
    assert!(
        bjs.get_opt("cf-train").await?.is_some(),
        "BatchJobs are the user's: kept"
    );
    Ok(())
}

/// Pods on the real node resolve cluster names through CoreDNS, reach the API server and the
/// environment's servers through Services, and cannot reach anything outside the machine: no
/// name outside the cluster resolves, and packets to another address are dropped by the
/// environment's guard before they leave.
#[tokio::test]
async fn real_node_pods_get_cluster_dns_and_services_and_nothing_else() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let node = RealNode::from_env(&env)?;
    let client = env.client().await?;
    let ns = TestNamespace::create(&env, &client, "net").await?;
    // One stream: the kubelet reads stdout and stderr through separate pipes, so a late
    // stderr line from nslookup could otherwise land after `done`.
    let script = format!(
        "exec 2>&1; \
         nslookup kubernetes.default.svc.cluster.local && \
         nslookup postgres.recsys-testenv.svc.cluster.local && \
         echo PING | nc -w 3 {redis} && \
         if nslookup -timeout=2 example.com; then echo OUTSIDE-NAME-RESOLVED; fi; \
         if echo | nc -w 3 198.51.100.1 80; then echo OUTSIDE-REACHED; fi; \
         echo done",
        redis = node
            .redis_url
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .replace(':', " ")
    );
    let (code, out) = node
        .toolbox_run(
            &env,
            &client,
            &ns.name,
            "net",
            &["sh", "-c", &script],
            Duration::from_secs(60),
        )
        .await?;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Address: 10.0.0.1"),
        "kubernetes Service: {out}"
    );
    assert!(out.contains("+PONG"), "Redis through its Service: {out}");
    assert!(!out.contains("OUTSIDE-NAME-RESOLVED"), "{out}");
    assert!(!out.contains("OUTSIDE-REACHED"), "{out}");
    assert!(out.trim_end().ends_with("done"), "{out}");
    Ok(())
}
