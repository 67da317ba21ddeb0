//! Rollouts on scorer pods that the test environment's real node runs: the chart installed with
//! `helm`, the operator in its own pod, the scorer Deployment it creates pulling model
//! versions from S3 with the credentials Secret the ModelDeployment names, and traffic through
//! the scorer Service's ClusterIP (kube-proxy) while the rollouts run. The same scenarios as
//! `cluster.rs` runs on scorer processes, here on kubelet-run containers:
//!
//! - shadow → canary 10% → 50% → full under a continuous request loop: no request lost, every
//!   user on the candidate at the end;
//! - a candidate with a skewed score distribution rolled back by itself within
//!   `failureLimit × interval`, users back on stable;
//! - the operator's container killed (SIGKILL) mid-canary: the restarted operator resumes at
//!   the same step with the same users on the canary;
//! - abort, retry, promote and undo through the `kubectl recsys` plugin;
//! - a missing and a corrupt version never routed;
//! - the A/B readout of generated traffic with a known CTR difference, counted by the scorer
//!   pods in the shared Redis (from the trainer's ConfigMap, as the chart documents), and an
//!   artificially skewed split tripping the sample-ratio check.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt as _};
use recsys_core::artifacts::Registry;
use recsys_core::serving::routing::bucket;
use recsys_core::serving::routing::{RoutingFormat, RoutingTable};
use recsys_core::stores::{self, ChecksumMode};
use recsys_crds::common::find_condition;
use recsys_crds::model_deployment::Verdict;
use recsys_crds::{ModelDeployment, ModelDeploymentStatus, Stage};
use recsys_operator::controller::model_deployment::ROUTING_KEY;
use recsys_tests::experiments::{
    Generated, on_canary_everywhere, post_clicks, scorer_segment, segment_with,
    serve_and_maybe_click,
};
use recsys_tests::real_node::{
    RealNode, create_from_literals, helm_install, kubectl, print_diagnostics,
};
use recsys_tests::scorers::{RequestLoop, USERS, every_user_on, publish_synthetic};
use recsys_tests::{TestEnv, TestNamespace, install_crds, wait_for};
use serde_json::{Value, json};

const MODEL: &str = "als";
/// Scorer pods load a version from S3 and the operator polls them: slower than on the host.
const WAIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn rollouts_run_themselves_on_scorer_pods_of_the_real_node() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let node = RealNode::from_env(&env)?;
    let client = env.client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::create(&env, &client, "pods").await?;
    let result = scenarios(&env, &node, &client, &ns.name).await;
    if result.is_err() {
        print_diagnostics(
            &env,
            &ns.name,
            "pods,deployments,endpointslices,modeldeployments",
        );
    }
    result
}

/// The ModelDeployment's status, or the default.
async fn status(mds: &Api<ModelDeployment>) -> anyhow::Result<ModelDeploymentStatus> {
    Ok(mds.get(MODEL).await?.status.unwrap_or_default())
}

/// Server-side apply of the ModelDeployment, as `kubectl apply` would.
async fn apply(mds: &Api<ModelDeployment>, body: &Value) -> anyhow::Result<()> {
    mds.patch(
        MODEL,
        &PatchParams::apply("recsys-tests").force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}

/// The route of the model in the routing ConfigMap: (stable, canary and its weight).
async fn route(cms: &Api<ConfigMap>) -> anyhow::Result<(String, Option<(String, u32)>)> {
    let cm = cms.get(&format!("{MODEL}-routing")).await?;
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(ROUTING_KEY))
        .context("the routing ConfigMap has no table")?;
    let table = RoutingTable::parse(text, RoutingFormat::Yaml, "test")?;
    let route = table.route(MODEL).context("no route for the model")?;
    Ok((
        route.stable().to_owned(),
        route
            .canary()
            .map(|c| (c.version().to_owned(), c.weight().into())),
    ))
}

/// Runs `kubectl recsys <args>` in `ns` as user `tester`: (success, stdout, stderr).
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

/// The one pod with `app.kubernetes.io/name=<name>`.
async fn only_pod(pods: &Api<Pod>, name: &str) -> anyhow::Result<Pod> {
    let mut list = pods
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/name={name}")))
        .await?
        .items;
    anyhow::ensure!(list.len() == 1, "{} pods of {name}", list.len());
    Ok(list.remove(0))
}

async fn scenarios(env: &TestEnv, node: &RealNode, client: &Client, n: &str) -> anyhow::Result<()> {
    // ---- model versions in S3, where the scorer pods load them from: v2 a retrain that
    // changed little (v1's factors), v3 the same rankings with every score 9 times as large (a
    // broken normalisation, say), v4 another good model.
    let s3_bucket = env.var("RECSYS_TEST_S3_BUCKET")?;
    let store_uri = format!("s3://{s3_bucket}/{n}");
    let s3_region = env.var("RECSYS_TEST_S3_REGION")?;
    let registry = Registry::new(
        stores::artifact_store(&store_uri, &env.s3_args(ChecksumMode::WhenSupported)?).await?,
    );
    for (version, seed, scale) in [
        ("v1", 1, 1.0),
        ("v2", 1, 1.0),
        ("v3", 1, 3.0),
        ("v4", 2, 1.0),
    ] {
        publish_synthetic(&registry, MODEL, version, seed, scale).await?;
    }
    create_from_literals(
        env,
        n,
        &["secret", "generic", "recsys-s3"],
        &[
            ("AWS_ACCESS_KEY_ID", env.var("AWS_ACCESS_KEY_ID")?),
            ("AWS_SECRET_ACCESS_KEY", env.var("AWS_SECRET_ACCESS_KEY")?),
        ],
    )?;
    // The stores every recsys pod shares (the chart's trainer ConfigMap): Redis, where the
    // scorer pods count impressions and attributed clicks together.
    let prefix = n.replace('-', "_");
    create_from_literals(
        env,
        n,
        &["configmap", "recsys-config"],
        &[
            ("RECSYS_REDIS_URL", &node.redis_url),
            ("RECSYS_REDIS_PREFIX", &prefix),
        ],
    )?;
    // The one client that posts clicks to the scorer pods (the chart's default tokens Secret).
    create_from_literals(
        env,
        n,
        &["secret", "generic", "recsys-scorer-tokens"],
        &[("experiments", recsys_tests::experiments::CLICKS_TOKEN)],
    )?;
    let release = format!("recsys-{}", n.rsplit('-').next().unwrap_or("pods"));
    helm_install(env, node, n, &release, &[])?;

    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), n);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), n);
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    let mut body = recsys_tests::example("ModelDeployment", n)?;
    body["spec"]["model"] = json!(MODEL);
    body["spec"]["version"] = json!("v1");
    body["spec"]["artifacts"] = json!({
        "uri": store_uri,
        "endpoint": node.s3_endpoint,
        "region": s3_region,
        "forcePathStyle": true,
        "credentialsSecret": "recsys-s3"
    });
    body["spec"]["scorer"] = json!({ "replicas": 2 });
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
    apply(&mds, &body).await?;
    wait_for(WAIT, "v1 served by two scorer pods", || async {
        let s = status(&mds).await?;
        let ready = find_condition(&s.conditions, "Ready").is_some_and(|c| c.status == "True");
        Ok(ready
            && s.stable_version.as_deref() == Some("v1")
            && s.scorers.as_ref().map(|f| f.with_stable) == Some(2))
    })
    .await?;

    // Each scorer pod by its own address, and the Service as clients reach it.
    let scorer_pods: Vec<SocketAddr> = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=recsys-scorer"))
        .await?
        .items
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&node.name))
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse().ok())
        .map(|ip| SocketAddr::new(ip, 8080))
        .collect();
    assert_eq!(scorer_pods.len(), 2, "two scorer pods on the real node");
    let service = Api::<Service>::namespaced(client.clone(), n)
        .get(&format!("{MODEL}-scorer"))
        .await?;
    let cluster_ip: std::net::IpAddr = service
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the scorer Service has no ClusterIP")?
        .parse()?;
    let through_service = vec![SocketAddr::new(cluster_ip, 80)];
    // kube-proxy programs a new Service's rules a moment after its endpoints are ready.
    wait_for(
        WAIT,
        "the scorer Service reachable through kube-proxy",
        || async {
            let path = "/v1/recommendations?user_id=u1&k=5";
            Ok(matches!(
                recsys_tests::http_json(through_service[0], "GET", path, None).await,
                Ok((200, _))
            ))
        },
    )
    .await?;

    // ---- shadow → canary 10% → 50% → full under load, through the Service.
    let load = RequestLoop::start(through_service.clone(), Duration::from_millis(4));
    body["spec"]["version"] = json!("v2");
    apply(&mds, &body).await?;
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(&mds).await?;
        if s.stable_version.as_deref() == Some("v2") {
            break;
        }
        if s.candidate_version.as_deref() == Some("v2") {
            seen.insert((format!("{:?}", s.stage), s.canary_weight));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "v2 not promoted in {WAIT:?}; seen {seen:?}; status {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    every_user_on(&scorer_pods, "v2", WAIT).await?;
    let report = load.stop().await?;
    assert!(report.failed.is_empty(), "lost: {:?}", report.failed);
    assert!(report.sent > 500, "{} requests", report.sent);
    for stage in [("Shadow", 0), ("Canary", 10), ("Canary", 50)] {
        assert!(
            seen.contains(&(stage.0.to_owned(), stage.1)),
            "{stage:?} not seen in {seen:?}"
        );
    }
    let runs = status(&mds).await?.analysis.context("analysis")?.runs;
    for step in 0..3 {
        let passed = runs
            .iter()
            .find(|r| r.step == step && r.verdict == Verdict::Successful)
            .with_context(|| format!("no successful run of step {step}: {runs:?}"))?;
        assert_eq!(passed.pods, 2, "both pods scraped: {passed:?}");
        assert!(
            passed.checks.iter().all(|c| c.observed.is_some()),
            "{passed:?}"
        );
    }

    // ---- a candidate with skewed scores is rolled back by itself.
    body["spec"]["strategy"] = json!({
        "steps": [{"canary": {"weight": 50, "duration": "10m"}}, {"full": {}}],
        "analysis": {"interval": "2s", "failureLimit": 2, "minSamples": 5, "maxScoreDriftPsi": 0.5}
    });
    body["spec"]["version"] = json!("v3");
    let load = RequestLoop::start(through_service.clone(), Duration::from_millis(4));
    apply(&mds, &body).await?;
    wait_for(WAIT, "v3 on 50% of users", || async {
        let s = status(&mds).await?;
        Ok(s.stage == Stage::Canary && s.canary_weight == 50)
    })
    .await?;
    let started = status(&mds).await?.step_started_at.context("step start")?.0;
    wait_for(WAIT, "v3 rolled back", || async {
        Ok(status(&mds).await?.stage == Stage::RolledBack)
    })
    .await?;
    let s = status(&mds).await?;
    let record = &s.history[0];
    assert_eq!(
        (record.version.as_str(), record.outcome),
        ("v3", Stage::RolledBack)
    );
    let took = record.finished_at.0.duration_since(started).as_secs_f64();
    // failureLimit × interval, the baseline's interval and a reconcile's slack.
    assert!(
        took <= 2.0 * 2.0 + 2.0 + 3.0,
        "rolled back {took:.1}s after the canary started"
    );
    assert!(record.reason.contains("ScoreDrift"), "{}", record.reason);
    let degraded = find_condition(&s.conditions, "Degraded").context("Degraded")?;
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "AnalysisFailed")
    );
    assert_eq!(route(&cms).await?, ("v2".to_owned(), None));
    every_user_on(&scorer_pods, "v2", WAIT).await?;
    let report = load.stop().await?;
    assert!(report.failed.is_empty(), "lost: {:?}", report.failed);

    // ---- the operator's container killed mid-canary: the restarted operator keeps the step,
    // its start, and the table (so the same users stay on the canary).
    body["spec"]["strategy"] = json!({
        "steps": [{"canary": {"weight": 30, "duration": "10m"}}, {"full": {}}],
        "analysis": {"interval": "2s", "minSamples": 5, "maxErrorRate": 0.01}
    });
    body["spec"]["version"] = json!("v4");
    let load = RequestLoop::start(through_service.clone(), Duration::from_millis(4));
    apply(&mds, &body).await?;
    wait_for(WAIT, "v4 on 30% with a successful analysis", || async {
        let s = status(&mds).await?;
        Ok(s.canary_weight == 30
            && s.analysis.is_some_and(|a| {
                a.runs
                    .iter()
                    .any(|r| r.step == 0 && r.verdict == Verdict::Successful)
            }))
    })
    .await?;
    let before = status(&mds).await?;
    let table_before = cms.get(&format!("{MODEL}-routing")).await?.data;
    let operator = only_pod(&pods, "recsys-operator").await?;
    let restarts = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .map_or(0, |c| c.restart_count)
    };
    let container = operator
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .context("the operator's container id")?;
    node.kill_container(&container)?;
    let last_run = |s: &ModelDeploymentStatus| {
        s.analysis
            .as_ref()
            .and_then(|a| a.runs.first().map(|r| r.at.clone()))
    };
    wait_for(
        WAIT,
        "the operator restarted and analysing again",
        || async {
            let restarted =
                restarts(&only_pod(&pods, "recsys-operator").await?) > restarts(&operator);
            let newer = last_run(&status(&mds).await?) != last_run(&before);
            Ok(restarted && newer)
        },
    )
    .await?;
    let after = status(&mds).await?;
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
        )
    );
    assert_eq!(
        cms.get(&format!("{MODEL}-routing")).await?.data,
        table_before,
        "the same salt and weight: the same users on the canary"
    );

    // ---- the plugin: status, abort, retry, promote --full, undo.
    let (ok, out, err) = plugin(env, n, &["status", MODEL])?;
    assert!(ok, "{err}");
    assert!(
        out.contains("Candidate:  v4") && out.contains("candidate 30%"),
        "{out}"
    );
    let (ok, _, err) = plugin(env, n, &["abort", MODEL])?;
    assert!(ok, "{err}");
    wait_for(WAIT, "v4 aborted", || async {
        Ok(status(&mds).await?.stage == Stage::Aborted)
    })
    .await?;
    assert_eq!(route(&cms).await?, ("v2".to_owned(), None));
    every_user_on(&scorer_pods, "v2", WAIT).await?;
    let (ok, _, err) = plugin(env, n, &["retry", MODEL])?;
    assert!(ok, "{err}");
    wait_for(WAIT, "v4 on 30% again", || async {
        let s = status(&mds).await?;
        Ok(s.stage == Stage::Canary && s.canary_weight == 30)
    })
    .await?;
    let (ok, out, err) = plugin(env, n, &["promote", MODEL, "--full"])?;
    assert!(ok, "{out}{err}");
    wait_for(WAIT, "v4 promoted", || async {
        Ok(status(&mds).await?.stable_version.as_deref() == Some("v4"))
    })
    .await?;
    every_user_on(&scorer_pods, "v4", WAIT).await?;
    let (ok, out, err) = plugin(env, n, &["undo", MODEL])?;
    assert!(ok && out.contains("undo to v2"), "{out}{err}");
    wait_for(WAIT, "v2 stable again", || async {
        Ok(status(&mds).await?.stable_version.as_deref() == Some("v2"))
    })
    .await?;
    every_user_on(&scorer_pods, "v2", WAIT).await?;
    let report = load.stop().await?;
    assert!(
        report.failed.is_empty(),
        "lost across the kill, abort, retry, promote and undo: {:?}",
        report.failed
    );
    let (ok, out, _) = plugin(env, n, &["history", MODEL])?;
    assert!(ok);
    let outcomes: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(
        outcomes,
        [
            "Promoted",
            "Promoted",
            "Aborted",
            "RolledBack",
            "Promoted",
            "Promoted"
        ],
        "{out}"
    );

    // ---- a version missing from the registry, and one with a corrupt file, are never routed;
    // the condition says why and every user stays on stable.
    let progressing = |s: &ModelDeploymentStatus| {
        find_condition(&s.conditions, "Progressing")
            .map(|c| (c.reason.clone(), c.message.clone()))
            .unwrap_or_default()
    };
    body["spec"]["version"] = json!("v9");
    apply(&mds, &body).await?;
    wait_for(WAIT, "v9 refused", || async {
        let (reason, message) = progressing(&status(&mds).await?);
        Ok(reason == "CandidateRefused" && message.contains("no version or alias \"v9\""))
    })
    .await?;
    publish_synthetic(&registry, MODEL, "v5", 5, 1.0).await?;
    let key = format!("models/{MODEL}/v5/item_factors.f32");
    let mut bytes = registry.store().get(&key).await?.context("v5's factors")?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    registry.store().put(&key, bytes).await?;
    body["spec"]["version"] = json!("v5");
    apply(&mds, &body).await?;
    wait_for(WAIT, "v5 refused on its checksum", || async {
        let (reason, message) = progressing(&status(&mds).await?);
        Ok(reason == "CandidateRefused" && message.contains("sha256"))
    })
    .await?;
    let (stable, canary) = route(&cms).await?;
    assert_eq!(stable, "v2");
    assert!(
        canary.as_ref().is_none_or(|(_, weight)| *weight == 0),
        "no user on a refused version: {canary:?}"
    );
    every_user_on(&scorer_pods, "v2", WAIT).await?;

    // ---- the A/B readout: known CTRs on the candidate's 20%, then a split skewed at 50%.
    let salt = "ab-pods";
    body["spec"]["version"] = json!("v4");
    body["spec"]["routingSalt"] = json!(salt);
    body["spec"]["strategy"] = json!({
        "steps": [
            {"canary": {"weight": 20}}, {"pause": {}},
            {"canary": {"weight": 50}}, {"pause": {}},
            {"full": {}}
        ],
        "analysis": {"interval": "2s"}
    });
    apply(&mds, &body).await?;
    let paused_at = |weight: i32| {
        let mds = mds.clone();
        async move {
            let s = status(&mds).await?;
            Ok(s.stage == Stage::Paused && s.canary_weight == weight)
        }
    };
    wait_for(WAIT, "v4 paused at 20%", || paused_at(20)).await?;
    let users: Vec<String> = (0..USERS).map(|u| format!("u{u}")).collect();
    on_canary_everywhere(&scorer_pods, salt, &users, 0..2000, WAIT).await?;
    // The probes were served lists too: the baseline of the counts.
    let mut generated = scorer_segment(scorer_pods[0], MODEL, 20).await?;
    // Known CTRs: 10% on stable, 30% on the candidate; each click posted to the other pod.
    for round in 0..5 {
        for (i, user) in users.iter().enumerate() {
            serve_and_maybe_click(
                &scorer_pods,
                i + round,
                user,
                round,
                (0.10, 0.30),
                &mut generated,
            )
            .await?;
        }
        // Users click after their lists are shown, before the next round's lists.
        post_clicks(&scorer_pods, MODEL, 20, &mut generated, WAIT).await?;
    }
    let counts = (
        generated.stable.0 + generated.canary.0,
        generated.stable.1 + generated.canary.1,
    );
    let seg = segment_with(&mds, MODEL, 20, counts, WAIT).await?;
    let side = |name: &str| {
        seg.variants
            .iter()
            .find(|v| v.variant == name)
            .map(|v| (v.impressions as u64, v.clicks as u64))
    };
    assert_eq!(side("stable"), Some(generated.stable), "{seg:?}");
    assert_eq!(side("canary"), Some(generated.canary), "{seg:?}");
    let ctr = seg.ctr.as_ref().context("a CTR test")?;
    assert!(
        ctr.significant && ctr.z > 0.0 && ctr.p_value < 0.001,
        "a 10% against 30% CTR is found: {seg:?}"
    );
    assert!(
        !seg.sample_ratio.as_ref().context("a split")?.mismatch,
        "every user was served: {seg:?}"
    );
    eprintln!("20% on scorer pods: {}", seg.summary);
    kubectl(
        env,
        &[
            "-n",
            n,
            "annotate",
            "modeldeployment",
            MODEL,
            "recsys.io/approve=1",
        ],
    )?;
    wait_for(WAIT, "v4 paused at 50%", || paused_at(50)).await?;
    on_canary_everywhere(&scorer_pods, salt, &users, 2000..5000, WAIT).await?;
    // Four in five candidate users lost before their list is served.
    let mut skewed = Generated::default();
    for (i, user) in users.iter().enumerate() {
        if bucket(salt, user) < 5000 && i % 5 != 0 {
            continue;
        }
        serve_and_maybe_click(&scorer_pods, i, user, 99, (0.10, 0.10), &mut skewed).await?;
    }
    post_clicks(&scorer_pods, MODEL, 50, &mut skewed, WAIT).await?;
    let counts = (
        skewed.stable.0 + skewed.canary.0,
        skewed.stable.1 + skewed.canary.1,
    );
    let seg = segment_with(&mds, MODEL, 50, counts, WAIT).await?;
    let split = seg.sample_ratio.as_ref().context("a split")?;
    assert!(
        split.mismatch && split.p_value < 0.001 && split.observed_canary_share < 0.3,
        "{seg:?}"
    );
    eprintln!("50% on scorer pods: {}", seg.summary);
    wait_for(WAIT, "a SampleRatioMismatch Warning", || async {
        let events = kubectl(
            env,
            &[
                "-n",
                n,
                "get",
                "events",
                "--field-selector",
                "type=Warning,reason=SampleRatioMismatch",
                "-o",
                "name",
            ],
        )?;
        Ok(!events.trim().is_empty())
    })
    .await?;

    // ---- every transition is in the model's registry on S3, written by the operator pod.
    wait_for(WAIT, "the transitions recorded in the registry", || async {
        Ok(status(&mds).await?.unrecorded_transitions.is_empty())
    })
    .await?;
    let moves: Vec<(String, String)> = registry
        .rollouts(MODEL)
        .await?
        .into_iter()
        .map(|e| (e.version, e.transition))
        .collect();
    for (version, transition) in [
        ("v3", "rolled_back"),
        ("v4", "aborted"),
        ("v4", "promoted"),
        ("v2", "promoted"),
    ] {
        assert!(
            moves.contains(&(version.to_owned(), transition.to_owned())),
            "{version} {transition} not in {moves:?}"
        );
    }
    eprintln!(
        "operator pod {} restarted once; scorer pods {scorer_pods:?}",
        operator.name_any()
    );
    Ok(())
}
