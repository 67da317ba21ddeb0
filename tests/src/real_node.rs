//! The real node of the test environment (`tests/env/node.sh`): a kubelet with containerd
//! that runs the images `tests/env/images.sh` built. Tests that need real containers ask for it
//! with [`RealNode::placement`]; everything else keeps landing on the kwok node.

use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::{Value, json};

use crate::{TestEnv, wait_for};

/// The real node and what runs on it.
#[derive(Clone, Debug)]
pub struct RealNode {
    /// The node's name.
    pub name: String,
    /// Label (value `"true"`) and NoSchedule taint key of the node.
    pub label: String,
    /// Taint key of the node.
    pub taint: String,
    /// containerd's socket, for `ctr`.
    pub containerd: String,
    /// Image with busybox (`wget`, `nslookup`, `sh`), as `/bin/busybox`.
    pub toolbox: String,
    /// Images of the three binaries, by binary (`operator`, `scorer`, `trainer`).
    pub operator_image: String,
    /// The scorer's image.
    pub scorer_image: String,
    /// The trainer's image.
    pub trainer_image: String,
    /// Postgres, Redis and S3 as Pods reach them (through Services of the environment).
    pub database_url: String,
    /// Redis URL for Pods.
    pub redis_url: String,
    /// S3 endpoint for Pods.
    pub s3_endpoint: String,
}

impl RealNode {
    /// The node from the environment, or an error saying which script to run.
    pub fn from_env(env: &TestEnv) -> anyhow::Result<Self> {
        let var = |k: &str| -> anyhow::Result<String> {
            env.var(k).map(str::to_owned).with_context(|| {
                if k.starts_with("RECSYS_TEST_IMAGE_") {
                    "the images for the real node are not built: run `bash tests/env/images.sh` (tests/run does)"
                } else {
                    "the real node is not up: run `bash tests/env/up.sh` as root without RECSYS_TESTENV_REAL_NODE=0"
                }
            })
        };
        Ok(Self {
            name: var("RECSYS_TEST_REAL_NODE")?,
            label: var("RECSYS_TEST_REAL_NODE_LABEL")?,
            taint: var("RECSYS_TEST_REAL_NODE_TAINT")?,
            containerd: var("RECSYS_TEST_CONTAINERD_ADDRESS")?,
            toolbox: var("RECSYS_TEST_TOOLBOX_IMAGE")?,
            operator_image: var("RECSYS_TEST_IMAGE_OPERATOR")?,
            scorer_image: var("RECSYS_TEST_IMAGE_SCORER")?,
            trainer_image: var("RECSYS_TEST_IMAGE_TRAINER")?,
            database_url: var("RECSYS_TEST_CLUSTER_DATABASE_URL")?,
            redis_url: var("RECSYS_TEST_CLUSTER_REDIS_URL")?,
            s3_endpoint: var("RECSYS_TEST_CLUSTER_S3_ENDPOINT")?,
        })
    }

    /// `nodeSelector` that picks the node.
    pub fn node_selector(&self) -> Value {
        json!({ &self.label: "true" })
    }

    /// Tolerations that let a Pod onto the node.
    pub fn tolerations(&self) -> Value {
        json!([{ "key": self.taint, "operator": "Exists", "effect": "NoSchedule" }])
    }

    /// Sets the node selector and tolerations of a Pod spec (`spec` of a Pod, or
    /// `spec.template.spec` of a workload).
    pub fn place(&self, pod_spec: &mut Value) {
        pod_spec["nodeSelector"] = self.node_selector();
        pod_spec["tolerations"] = self.tolerations();
    }

    /// The URL of database `name` as Pods reach it.
    pub fn database_url_for(&self, name: &str) -> anyhow::Result<String> {
        let (base, _) = self
            .database_url
            .rsplit_once('/')
            .context("cluster database URL without a database")?;
        Ok(format!("{base}/{name}"))
    }

    /// Runs `args` in a toolbox Pod on the node (`/bin/busybox <args>`) and returns its exit
    /// code and output (`kubectl logs`).
    pub async fn toolbox_run(
        &self,
        env: &TestEnv,
        client: &kube::Client,
        ns: &str,
        name: &str,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<(i32, String)> {
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name },
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532 },
                "containers": [{
                    "name": "toolbox",
                    "image": self.toolbox,
                    "imagePullPolicy": "IfNotPresent",
                    "args": args,
                    "securityContext": {
                        "readOnlyRootFilesystem": true,
                        "allowPrivilegeEscalation": false,
                        "capabilities": { "drop": ["ALL"] }
                    }
                }]
            }
        });
        self.place(&mut pod["spec"]);
        let pod: Pod = serde_json::from_value(pod)?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        pods.create(&Default::default(), &pod).await?;
        wait_for(
            timeout,
            &format!("toolbox pod {name} to finish"),
            || async {
                let p = pods.get(name).await?;
                Ok(matches!(
                    p.status.and_then(|s| s.phase).as_deref(),
                    Some("Succeeded" | "Failed")
                ))
            },
        )
        .await?;
        let code = pods
            .get(name)
            .await?
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.into_iter().next())
            .and_then(|c| c.state)
            .and_then(|s| s.terminated)
            .map(|t| t.exit_code)
            .context("toolbox container has no exit code")?;
        let logs = kubectl(env, &["logs", "-n", ns, name])?;
        Ok((code, logs))
    }

    /// The OCI runtime spec containerd runs a container with (`ctr containers info`), from a
    /// Pod status's `containerID` (`containerd://<id>`).
    pub fn runtime_spec(&self, container_id: &str) -> anyhow::Result<Value> {
        let id = container_id
            .strip_prefix("containerd://")
            .with_context(|| format!("{container_id}: not a containerd container"))?;
        let out = std::process::Command::new("ctr")
            .args(["--address", &self.containerd, "--namespace", "k8s.io"])
            .args(["containers", "info", id])
            .output()
            .context("running ctr (Debian package containerd)")?;
        if !out.status.success() {
            bail!(
                "ctr containers info {id}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let info: Value = serde_json::from_slice(&out.stdout)?;
        Ok(info["Spec"].clone())
    }

    /// Kills the running process of a container with SIGKILL (`ctr tasks kill`), as a crash
    /// or the OOM killer would; the kubelet restarts it per the Pod's restart policy.
    pub fn kill_container(&self, container_id: &str) -> anyhow::Result<()> {
        let id = container_id
            .strip_prefix("containerd://")
            .with_context(|| format!("{container_id}: not a containerd container"))?;
        run(std::process::Command::new("ctr")
            .args(["--address", &self.containerd, "--namespace", "k8s.io"])
            .args(["tasks", "kill", "--signal", "SIGKILL", id]))?;
        Ok(())
    }
}

/// `kubectl -n ns create <what> --from-literal=k=v…`: the ConfigMaps and Secrets a user creates.
pub fn create_from_literals(
    env: &TestEnv,
    ns: &str,
    what: &[&str],
    pairs: &[(&str, &str)],
) -> anyhow::Result<()> {
    let literals: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("--from-literal={k}={v}"))
        .collect();
    let mut args = vec!["-n", ns, "create"];
    args.extend_from_slice(what);
    args.extend(literals.iter().map(String::as_str));
    kubectl(env, &args)?;
    Ok(())
}

/// `helm install --wait` of the chart as release `release` in `ns`, watching `ns` only, with
/// the images `tests/env/images.sh` built and every pod (operator, trainers, scorers) on the
/// real node; `extra` are more `helm` arguments (`--set …`).
pub fn helm_install(
    env: &TestEnv,
    node: &RealNode,
    ns: &str,
    release: &str,
    extra: &[&str],
) -> anyhow::Result<()> {
    let mut sets = vec![format!("operator.watchNamespace={ns}")];
    for (binary, image) in [
        ("operator", &node.operator_image),
        ("trainer", &node.trainer_image),
        ("scorer", &node.scorer_image),
    ] {
        let (repository, tag) = image.rsplit_once(':').context("image without a tag")?;
        sets.push(format!("{binary}.image.repository={repository}"));
        sets.push(format!("{binary}.image.tag={tag}"));
    }
    let mut placement = vec![];
    for binary in ["operator", "trainer", "scorer"] {
        placement.push(format!("{binary}.nodeSelector={}", node.node_selector()));
        placement.push(format!("{binary}.tolerations={}", node.tolerations()));
    }
    let chart = crate::repo_root().join("charts/recsys");
    let mut cmd = env.command("helm");
    cmd.args(["install", release]).arg(chart).args([
        "--namespace",
        ns,
        "--wait",
        "--timeout",
        "180s",
    ]);
    for s in &sets {
        cmd.args(["--set", s]);
    }
    for s in &placement {
        cmd.args(["--set-json", s]);
    }
    run(cmd.args(extra))?;
    Ok(())
}

/// Prints what a user would look at first when something failed in namespace `ns`: its pods
/// and `kinds`, its events, the last operator and scorer logs.
pub fn print_diagnostics(env: &TestEnv, ns: &str, kinds: &str) {
    let operator_logs = "app.kubernetes.io/name=recsys-operator";
    let scorer_logs = "app.kubernetes.io/name=recsys-scorer";
    for args in [
        vec!["get", kinds, "-o", "wide"],
        vec!["get", "events", "--sort-by=.lastTimestamp"],
        vec!["logs", "-l", operator_logs, "--tail=60"],
        vec!["logs", "-l", scorer_logs, "--tail=20"],
        vec!["get", "modeldeployments", "-o", "yaml"],
    ] {
        let mut full = vec!["-n", ns];
        full.extend(args.iter().copied());
        eprintln!(
            "$ kubectl {}\n{}",
            full.join(" "),
            kubectl(env, &full).unwrap_or_else(|e| e.to_string())
        );
    }
}

/// Runs `kubectl args` with the environment's kubeconfig; its stdout, or an error with both
/// streams.
pub fn kubectl(env: &TestEnv, args: &[&str]) -> anyhow::Result<String> {
    run(env.command("kubectl").args(args))
}

/// Runs a command; its stdout, or an error with the command, status and both streams.
pub fn run(cmd: &mut std::process::Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}
