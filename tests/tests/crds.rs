//! The CRDs against the real API server: accepted, examples valid, every CEL rule and schema
//! bound rejecting a bad object with a message naming the field, and `kubectl get recsys`.

use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::core::Status;
use recsys_tests::{TestEnv, TestNamespace, example, install_crds};
use serde_json::{Value, json};

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("recsys.io", "v1alpha1", kind))
}

/// Sets `value` at a slash-separated path such as `spec/strategy/steps`.
fn set(v: &mut Value, path: &str, value: Value) {
    let mut cur = v;
    let parts: Vec<&str> = path.split('/').collect();
    for p in &parts[..parts.len() - 1] {
        cur = &mut cur[*p];
    }
    cur[parts[parts.len() - 1]] = value;
}

async fn create(
    api: &Api<DynamicObject>,
    obj: &Value,
    dry_run: bool,
) -> Result<DynamicObject, kube::Error> {
    let obj: DynamicObject =
        serde_json::from_value(obj.clone()).map_err(kube::Error::SerdeError)?;
    let pp = PostParams {
        dry_run,
        ..Default::default()
    };
    api.create(&pp, &obj).await
}

fn rejection(result: Result<DynamicObject, kube::Error>) -> anyhow::Result<Box<Status>> {
    match result {
        Ok(o) => anyhow::bail!("accepted {:?}, expected a rejection", o.metadata.name),
        Err(kube::Error::Api(status)) => Ok(status),
        Err(e) => anyhow::bail!("unexpected client error: {e}"),
    }
}

/// One bad object: the kind, how to break the example, and what the message must contain.
struct Case {
    kind: &'static str,
    what: &'static str,
    path: &'static str,
    value: Value,
    field: &'static str,
    message: &'static str,
}

fn cases() -> Vec<Case> {
    let c = |kind, what, path, value, field, message| Case {
        kind,
        what,
        path,
        value,
        field,
        message,
    };
    vec![
        c(
            "ModelDeployment",
            "canary weight above 100",
            "spec/strategy/steps",
            json!([{"canary": {"weight": 150}}]),
            "spec.strategy.steps[0].canary.weight",
            "less than or equal to 100",
        ),
        c(
            "ModelDeployment",
            "negative canary weight",
            "spec/strategy/steps",
            json!([{"canary": {"weight": -1}}]),
            "spec.strategy.steps[0].canary.weight",
            "greater than or equal to 0",
        ),
        c(
            "ModelDeployment",
            "no steps",
            "spec/strategy/steps",
            json!([]),
            "spec.strategy.steps",
            "at least 1 items",
        ),
        c(
            "ModelDeployment",
            "a step with two kinds",
            "spec/strategy/steps",
            json!([{"shadow": {"duration": "1m"}, "canary": {"weight": 5}}]),
            "spec.strategy.steps",
            "each step sets exactly one of shadow, canary, pause, full",
        ),
        c(
            "ModelDeployment",
            "canary before shadow",
            "spec/strategy/steps",
            json!([{"canary": {"weight": 10}}, {"shadow": {"duration": "1m"}}]),
            "spec.strategy.steps",
            "steps out of order",
        ),
        c(
            "ModelDeployment",
            "decreasing weights",
            "spec/strategy/steps",
            json!([{"canary": {"weight": 50}}, {"canary": {"weight": 10}}]),
            "spec.strategy.steps",
            "canary weights must strictly increase",
        ),
        c(
            "ModelDeployment",
            "repeated weight",
            "spec/strategy/steps",
            json!([{"canary": {"weight": 10}}, {"pause": {}}, {"canary": {"weight": 10}}]),
            "spec.strategy.steps",
            "canary weights must strictly increase",
        ),
        c(
            "ModelDeployment",
            "full not last",
            "spec/strategy/steps",
            json!([{"canary": {"weight": 10}}, {"full": {}}, {"pause": {}}]),
            "spec.strategy.steps",
            "full may appear once, as the last step",
        ),
        c(
            "ModelDeployment",
            "artifact uri scheme",
            "spec/artifacts/uri",
            json!("http://bucket/x"),
            "spec.artifacts.uri",
            "must be s3://<bucket>[/prefix] or file:///<path>",
        ),
        c(
            "ModelDeployment",
            "model name",
            "spec/model",
            json!("ALS_v2"),
            "spec.model",
            "should match",
        ),
        c(
            "ModelDeployment",
            "duration shape",
            "spec/strategy/steps",
            json!([{"shadow": {"duration": "half an hour"}}]),
            "spec.strategy.steps[0].shadow.duration",
            "should match",
        ),
        c(
            "BatchJob",
            "schedule in words",
            "spec/schedule",
            json!("every day at noon"),
            "spec.schedule",
            "schedule must be a five-field cron expression",
        ),
        c(
            "BatchJob",
            "four-field schedule",
            "spec/schedule",
            json!("*/5 * * *"),
            "spec.schedule",
            "schedule must be a five-field cron expression",
        ),
        c(
            "BatchJob",
            "zero attempts",
            "spec/retry/maxAttempts",
            json!(0),
            "spec.retry.maxAttempts",
            "greater than or equal to 1",
        ),
        c(
            "BatchJob",
            "eleven attempts",
            "spec/retry/maxAttempts",
            json!(11),
            "spec.retry.maxAttempts",
            "less than or equal to 10",
        ),
        c(
            "BatchJob",
            "unknown job",
            "spec/job",
            json!("train-everything"),
            "spec.job",
            "Unsupported value",
        ),
        c(
            "BatchJob",
            "depends on itself",
            "spec/after",
            json!(["popularity"]),
            "<nil>",
            "spec.after must not name the BatchJob itself",
        ),
        c(
            "BatchJob",
            "backfill without a range",
            "spec/job",
            json!("backfill"),
            "spec",
            "job backfill needs spec.backfill",
        ),
        c(
            "BatchJob",
            "backfill range reversed",
            "spec/backfill",
            json!({"features": ["popularity_score"], "from": "2026-11-02T00:00:00Z", "to": "2026-11-01T00:00:00Z"}),
            "spec.backfill",
            "backfill.from must be before backfill.to",
        ),
        c(
            "BatchJob",
            "cf options on another job",
            "spec/cfTrain",
            json!({"model": "als"}),
            "spec",
            "spec.cfTrain is only valid for job cf-train",
        ),
        c(
            "FeatureDefinition",
            "version not semantic",
            "spec/version",
            json!("1.0"),
            "spec.version",
            "should match",
        ),
        c(
            "FeatureDefinition",
            "unknown entity",
            "spec/entity",
            json!("session"),
            "spec.entity",
            "Unsupported value",
        ),
        c(
            "FeatureDefinition",
            "served nowhere",
            "spec/online",
            json!(false),
            "spec",
            "a feature is served online, offline, or both",
        ),
        c(
            "FeatureDefinition",
            "vector without dimension",
            "spec/valueType",
            json!("floatVector"),
            "spec",
            "dimension is required for valueType floatVector",
        ),
        c(
            "FeatureDefinition",
            "dimension on a scalar",
            "spec/dimension",
            json!(8),
            "spec",
            "dimension is required for valueType floatVector and not allowed otherwise",
        ),
        c(
            "FeatureDefinition",
            "replaced by itself",
            "spec/deprecation",
            json!({"replacedBy": "popularity_score"}),
            "spec",
            "deprecation.replacedBy must name another feature",
        ),
        c(
            "FeatureDefinition",
            "lineage on itself",
            "spec/lineage/features",
            json!(["popularity_score"]),
            "spec",
            "lineage.features must not contain the feature itself",
        ),
        c(
            "FeatureDefinition",
            "feature name shape",
            "spec/name",
            json!("Popularity-Score"),
            "spec.name",
            "should match",
        ),
    ]
}

#[tokio::test]
async fn crds_examples_rules_and_columns() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let client = env.client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::create(&env, &client, "crds").await?;

    // Every example is accepted as written.
    for kind in ["ModelDeployment", "BatchJob", "FeatureDefinition"] {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &ns.name, &resource(kind));
        create(&api, &example(kind, &ns.name)?, false)
            .await
            .map_err(|e| anyhow::anyhow!("example {kind} rejected: {e}"))?;
    }

    // So is every shipped feature definition (under a name of its own: the popularity example
    // was created above already), and every BatchJob example of the other jobs.
    for (dir, kind, suffix) in [
        ("docs/examples/features", "FeatureDefinition", "-check"),
        ("docs/examples/batchjobs", "BatchJob", ""),
    ] {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &ns.name, &resource(kind));
        for entry in std::fs::read_dir(recsys_tests::repo_root().join(dir))? {
            let path = entry?.path();
            let rel = path
                .strip_prefix(recsys_tests::repo_root())?
                .to_string_lossy()
                .into_owned();
            let mut v = recsys_tests::manifest(&rel)?;
            v["metadata"]["namespace"] = json!(ns.name);
            let name = format!("{}{suffix}", v["metadata"]["name"].as_str().unwrap_or("x"));
            v["metadata"]["name"] = json!(name);
            create(&api, &v, true)
                .await
                .map_err(|e| anyhow::anyhow!("{rel} rejected: {e}"))?;
        }
    }

    // The seed's pipeline, as shipped: every object of docs/examples/pipeline is accepted by
    // a server-side dry run (the Namespace aside: everything goes into a namespace of its own,
    // since the examples above took some of the names).
    let pipeline = TestNamespace::create(&env, &client, "pipeline").await?;
    let dir = recsys_tests::repo_root().join("docs/examples/pipeline");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let mut accepted = vec![];
    for path in files {
        let text = std::fs::read_to_string(&path)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut v: Value = serde::Deserialize::deserialize(doc)?;
            let kind = v["kind"].as_str().unwrap_or_default().to_owned();
            if kind == "Namespace" || v.is_null() {
                continue;
            }
            v["metadata"]["namespace"] = json!(pipeline.name);
            let name = v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &pipeline.name, &resource(&kind));
            api.create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &serde_json::from_value(v)?,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{} {kind}/{name} rejected: {e}", path.display()))?;
            accepted.push(format!("{kind}/{name}"));
        }
    }
    assert_eq!(
        accepted,
        [
            "BatchJob/popularity",
            "BatchJob/category-affinity",
            "BatchJob/data-quality",
            "BatchJob/cf-train",
            "BatchJob/index-rebuild",
            "BatchJob/index-rebuild-weekly",
            "BatchJob/backfill",
            "ModelDeployment/als"
        ]
    );

    // Every rule rejects its bad object, with its message and the field.
    let offline_only = {
        // "served nowhere" needs offline=false too.
        |case: &Case, obj: &mut Value| {
            if case.what == "served nowhere" {
                set(obj, "spec/offline", json!(false));
            }
            if case.what == "depends on itself" || case.what == "backfill without a range" {
                set(obj, "spec/schedule", Value::Null);
            }
        }
    };
    let mut failures = vec![];
    for case in cases() {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &ns.name, &resource(case.kind));
        let mut obj = example(case.kind, &ns.name)?;
        set(&mut obj, case.path, case.value.clone());
        offline_only(&case, &mut obj);
        match rejection(create(&api, &obj, true).await) {
            Ok(status) => {
                let msg = &status.message;
                if status.code != 422 || !msg.contains(case.message) || !msg.contains(case.field) {
                    failures.push(format!(
                        "{} / {}: code {} message {msg:?}; wanted field {:?} and {:?}",
                        case.kind, case.what, status.code, case.field, case.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{} / {}: {e}", case.kind, case.what)),
        }
    }
    assert!(
        failures.is_empty(),
        "rules that misbehaved:\n{}",
        failures.join("\n")
    );

    // Transition rules: a FeatureDefinition cannot change its type without a new version,
    // nor its name at all.
    let fd_api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns.name, &resource("FeatureDefinition"));
    let pp = PatchParams::apply("recsys-tests").force();
    let mut changed = example("FeatureDefinition", &ns.name)?;
    set(&mut changed, "spec/valueType", json!("int"));
    let status = rejection(
        fd_api
            .patch("popularity-score-v1", &pp, &Patch::Apply(&changed))
            .await,
    )?;
    assert!(
        status
            .message
            .contains("changing entity, valueType or computation needs a new version"),
        "{}",
        status.message
    );
    set(&mut changed, "spec/version", json!("2.0.0"));
    fd_api
        .patch("popularity-score-v1", &pp, &Patch::Apply(&changed))
        .await?;
    let mut renamed = changed.clone();
    set(&mut renamed, "spec/name", json!("popularity"));
    let status = rejection(
        fd_api
            .patch("popularity-score-v1", &pp, &Patch::Apply(&renamed))
            .await,
    )?;
    assert!(
        status.message.contains("spec.name is immutable"),
        "{}",
        status.message
    );

    // `kubectl get recsys` lists all three kinds with their columns. A fresh discovery cache,
    // since the CRDs may be newer than kubectl's cached discovery.
    let cache = std::env::temp_dir().join(format!("recsys-kubectl-cache-{}", ns.name));
    let cache_arg = format!("--cache-dir={}", cache.display());
    let out = env
        .command("kubectl")
        .args(["get", "recsys", "-n", &ns.name, &cache_arg])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "modeldeployment.recsys.io/als",
        "batchjob.recsys.io/popularity",
        "featuredefinition.recsys.io/popularity-score-v1",
        "MODEL",
        "STABLE",
        "CANDIDATE",
        "STAGE",
        "WEIGHT",
        "JOB",
        "SCHEDULE",
        "SUSPEND",
        "LAST RUN",
        "LAST SUCCESS",
        "FEATURE",
        "ENTITY",
        "VERSION",
        "TYPE",
        "READY",
        "AGE",
        "*/5 * * * *",
        "popularity_score",
        "20261126-0200",
    ] {
        assert!(
            text.contains(needle),
            "`kubectl get recsys` lacks {needle:?}:\n{text}"
        );
    }
    // Short names resolve.
    for short in ["mdep", "bjob", "fdef"] {
        let out = env
            .command("kubectl")
            .args(["get", short, "-n", &ns.name, "-o", "name", &cache_arg])
            .output()?;
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "kubectl get {short}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
