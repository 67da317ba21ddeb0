//! The Helm chart: lints, renders, is accepted by the real API server, and once installed its
//! operator Deployment gets Pods Running on the kwok node (the control plane really works).

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use recsys_tests::real_node::run;
use recsys_tests::{TestEnv, TestNamespace, install_crds, repo_root, wait_for};

#[tokio::test]
async fn chart_lints_renders_applies_and_runs() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let client = env.client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::create(&env, &client, "chart").await?;
    let chart = repo_root().join("charts/recsys");
    let chart = chart.to_str().unwrap_or("charts/recsys");

    let lint = run(env.command("helm").args(["lint", "--strict", chart]))?;
    assert!(lint.contains("0 chart(s) failed"), "{lint}");

    // Leader election with two replicas, every optional template on: all must be accepted.
    let rendered = run(env.command("helm").args([
        "template",
        "recsys",
        chart,
        "--namespace",
        &ns.name,
        "--include-crds",
        "--set",
        "operator.replicas=2",
        "--set",
        "networkPolicy.enabled=true",
    ]))?;
    for kind in [
        "CustomResourceDefinition",
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "NetworkPolicy",
    ] {
        assert!(
            rendered.contains(&format!("kind: {kind}\n")),
            "no {kind} rendered"
        );
    }
    let manifest = std::env::temp_dir().join(format!("{}-rendered.yaml", ns.name));
    std::fs::write(&manifest, &rendered)?;
    let path = manifest.to_str().unwrap_or_default();
    let applied = run(env.command("kubectl").args([
        "apply",
        "--dry-run=server",
        "--server-side",
        "--force-conflicts",
        "-f",
        path,
    ]))?;
    assert!(
        applied.contains("deployment.apps/recsys-operator serverside-applied (server dry run)"),
        "{applied}"
    );

    // Two replicas without leader election would both act: the chart refuses to render.
    let refused = env
        .command("helm")
        .args([
            "template",
            "recsys",
            chart,
            "--set",
            "operator.replicas=2",
            "--set",
            "operator.leaderElection.enabled=false",
        ])
        .output()?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("leaderElection"));

    // A real install: the Deployment's Pods are scheduled onto the kwok node and run.
    run(env.command("helm").args([
        "install",
        "recsys",
        chart,
        "--namespace",
        &ns.name,
        "--skip-crds",
        "--wait",
        "--timeout",
        "60s",
    ]))?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let node = env.var("RECSYS_TEST_KWOK_NODE")?.to_owned();
    wait_for(
        Duration::from_secs(60),
        "operator Deployment available with a Running pod on the kwok node",
        || async {
            let d = deployments.get("recsys-operator").await?;
            let available = d.status.and_then(|s| s.available_replicas).unwrap_or(0);
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/name=recsys-operator"))
                .await?;
            let running_on_kwok = list.items.iter().any(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            });
            Ok(available >= 1 && running_on_kwok)
        },
    )
    .await?;
    let pod = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=recsys-operator"))
        .await?
        .items
        .remove(0);
    let container = &pod.spec.unwrap_or_default().containers[0];
    let sc = container.security_context.clone().unwrap_or_default();
    assert_eq!(
        (sc.read_only_root_filesystem, sc.run_as_non_root),
        (Some(true), Some(true))
    );
    run(env
        .command("helm")
        .args(["uninstall", "recsys", "--namespace", &ns.name]))?;
    Ok(())
}

/// The monitoring kit, on request only: a PrometheusRule holding the alert rules file as it is,
/// and the dashboards' ConfigMap labelled for the Grafana sidecar, which the API server accepts.
/// The PrometheusRule is not applied: the test cluster has no Prometheus Operator CRDs.
#[tokio::test]
async fn chart_renders_alert_rules_and_dashboards_when_asked() -> anyhow::Result<()> {
    use serde::Deserialize as _;
    let env = TestEnv::load()?;
    let client = env.client().await?;
    let ns = TestNamespace::create(&env, &client, "chart-mon").await?;
    let chart = repo_root().join("charts/recsys");
    let chart = chart.to_str().unwrap_or("charts/recsys");
    let on = [
        "--set",
        "monitoring.prometheusRule.enabled=true",
        "--set",
        "monitoring.prometheusRule.labels.release=kube-prometheus-stack",
        "--set",
        "monitoring.dashboards.enabled=true",
        "--set",
        "monitoring.dashboards.annotations.grafana_folder=recsys",
    ];
    let lint = run(env
        .command("helm")
        .args(["lint", "--strict", chart])
        .args(on))?;
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    let documents = |text: &str| -> anyhow::Result<Vec<serde_json::Value>> {
        let mut out = vec![];
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v = serde_json::Value::deserialize(doc)?;
            if !v.is_null() {
                out.push(v);
            }
        }
        Ok(out)
    };
    let of_kind = |docs: &[serde_json::Value], kind: &str| {
        docs.iter()
            .filter(|d| d["kind"] == kind)
            .cloned()
            .collect::<Vec<_>>()
    };

    let default = documents(&run(env
        .command("helm")
        .args(["template", "recsys", chart]))?)?;
    assert!(of_kind(&default, "PrometheusRule").is_empty());
    assert!(of_kind(&default, "ConfigMap").is_empty());

    let rendered = run(env
        .command("helm")
        .args(["template", "recsys", chart, "--namespace", &ns.name])
        .args(on))?;
    let docs = documents(&rendered)?;
    let rules = of_kind(&docs, "PrometheusRule");
    assert_eq!(rules.len(), 1, "{rendered}");
    let rule = &rules[0];
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["metadata"]["name"], "recsys-data-quality");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let file: serde_json::Value = serde_yaml::from_str(&std::fs::read_to_string(
        repo_root().join("charts/recsys/files/alerts/data-quality.rules.yaml"),
    )?)?;
    assert_eq!(
        rule["spec"], file,
        "the PrometheusRule's spec is the rules file"
    );

    let maps = of_kind(&docs, "ConfigMap");
    assert_eq!(maps.len(), 1, "{rendered}");
    let map = &maps[0];
    assert_eq!(map["metadata"]["name"], "recsys-dashboards");
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(map["metadata"]["annotations"]["grafana_folder"], "recsys");
    let dashboard: serde_json::Value = serde_json::from_str(
        map["data"]["recsys-data-quality.json"]
            .as_str()
            .unwrap_or_default(),
    )?;
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        repo_root().join("charts/recsys/files/dashboards/data-quality.json"),
    )?)?;
    assert_eq!(dashboard, file);

    let manifest = std::env::temp_dir().join(format!("{}-dashboards.yaml", ns.name));
    std::fs::write(&manifest, serde_yaml::to_string(map)?)?;
    let applied = run(env.command("kubectl").args([
        "apply",
        "--dry-run=server",
        "--server-side",
        "-f",
        manifest.to_str().unwrap_or_default(),
    ]));
    let _ = std::fs::remove_file(&manifest);
    let applied = applied?;
    assert!(
        applied.contains("configmap/recsys-dashboards serverside-applied (server dry run)"),
        "{applied}"
    );
    Ok(())
}
