//! The pipeline's pure steps, from YAML fixtures: validation, plans (schedules, requests,
//! dependencies), the Jobs built, runs observed from Jobs and Pods, and the status.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Toleration};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use recsys_crds::BatchJob;
use recsys_crds::batch_job::{ConsumedRun, RunOutcome, RunTrigger};

use super::observe::{self, UpstreamState};
use super::plan::{self, Gate, RunRequest, Since};
use super::schedule::Schedule;
use super::*;

fn settings() -> TrainerSettings {
    TrainerSettings {
        image: "ghcr.io/recsys-io/recsys-trainer:0.1.0".into(),
        service_account: Some("recsys-trainer".into()),
        config_map: Some("recsys-config".into()),
        secret: None,
        node_selector: BTreeMap::from([("pool".into(), "batch".into())]),
        tolerations: vec![Toleration {
            key: Some("batch".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }],
    }
}

fn bj(yaml: &str) -> Arc<BatchJob> {
    let mut bj: BatchJob = serde_yaml::from_str(yaml).expect("fixture");
    bj.metadata.namespace = Some("shop".into());
    bj.metadata.uid = Some("uid-1".into());
    Arc::new(bj)
}

fn ts(s: &str) -> Timestamp {
    s.parse().expect("timestamp")
}

const POPULARITY: &str = r#"
apiVersion: recsys.io/v1alpha1
kind: BatchJob
metadata: { name: popularity, generation: 2, creationTimestamp: "2026-11-01T00:00:00Z" }
spec:
  job: popularity
  schedule: "*/5 * * * *"
  timeZone: Europe/Berlin
  activeDeadline: 10m
  parameters: { window: 90d, half-life: 7d }
"#;

fn schedule(b: &BatchJob) -> Option<Schedule> {
    Schedule::of(&b.spec).expect("valid")
}

#[test]
fn a_run_is_a_job_with_retries_policy_placement_and_a_locked_down_pod() {
    let b = bj(POPULARITY);
    assert_eq!(
        assess(&b, std::slice::from_ref(&b)).ready_reason,
        "Scheduled"
    );
    let run = RunRequest {
        name: "popularity-29000000".into(),
        trigger: RunTrigger::Schedule,
        consumed: vec![],
    };
    let job = build::run_job(&b, &settings(), &run, &Default::default()).expect("job");
    assert_eq!(job.name_any(), "popularity-29000000");
    assert_eq!(job.annotations()[TRIGGER_ANNOTATION], "Schedule");
    assert_eq!(job.labels()[JOB_LABEL], "popularity");
    let owner = &job.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("BatchJob", Some(true))
    );
    let spec = job.spec.expect("spec");
    assert_eq!(spec.backoff_limit, Some(2), "3 attempts = 2 retries");
    assert_eq!(spec.active_deadline_seconds, Some(600));
    let rules = spec.pod_failure_policy.expect("policy").rules;
    assert_eq!(rules[0].action, "FailJob");
    assert_eq!(
        rules[0].on_exit_codes.as_ref().map(|e| e.values.clone()),
        Some(vec![EXIT_NOT_RETRYABLE, EXIT_GATE_FAILED])
    );
    let pod = spec.template.spec.expect("pod");
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.node_selector, Some(settings().node_selector));
    assert_eq!(pod.tolerations, Some(settings().tolerations));
    let c = &pod.containers[0];
    assert_eq!(
        c.args.as_deref().expect("args"),
        ["popularity", "--half-life=7d", "--window=90d"]
    );
    let sc = c.security_context.as_ref().expect("security context");
    assert_eq!(
        (sc.read_only_root_filesystem, sc.run_as_non_root),
        (Some(true), Some(true))
    );
    // The run summary comes back through the termination message.
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some(build::TERMINATION_MESSAGE_PATH)
    );
    assert!(
        c.env
            .as_ref()
            .expect("env")
            .iter()
            .any(|e| e.name == recsys_core::runs::SUMMARY_PATH_ENV
                && e.value.as_deref() == Some(build::TERMINATION_MESSAGE_PATH))
    );
    // Resources by job kind unless the spec sets them.
    let requests = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .expect("requests");
    assert_eq!(requests["cpu"].0, "250m");
    let mut cf = (*bj(POPULARITY)).clone();
    cf.spec.job = JobKind::CfTrain;
    cf.spec.parameters.clear();
    let c = build::job_spec(&cf, &settings(), vec![])
        .template
        .spec
        .expect("pod")
        .containers;
    assert_eq!(
        c[0].resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .expect("limits")["memory"]
            .0,
        "4Gi"
    );
}

use recsys_crds::JobKind;

#[test]
fn a_due_schedule_starts_one_run_named_by_its_due_time() {
    let b = bj(POPULARITY);
    let s = schedule(&b);
    let now = ts("2026-12-04T12:01:30Z");
    let p = plan::plan(&b, s.as_ref(), &[], &[], now);
    let start = p.start.expect("due at 12:00");
    assert_eq!(start.trigger, RunTrigger::Schedule);
    assert_eq!(
        start.name,
        format!("popularity-{}", ts("2026-12-04T12:00:00Z").as_second() / 60)
    );
    assert_eq!(p.last_schedule_time, Some(ts("2026-12-04T12:00:00Z")));
    assert_eq!(p.next_schedule_time, Some(ts("2026-12-04T12:05:00Z")));
    assert_eq!(p.wake, Some(std::time::Duration::from_secs(211)));

    // Handled: nothing more until the next due time.
    let mut handled = (*b).clone();
    handled.status = Some(recsys_crds::BatchJobStatus {
        last_schedule_time: p
            .last_schedule_time
            .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
        ..Default::default()
    });
    assert_eq!(plan::plan(&handled, s.as_ref(), &[], &[], now).start, None);

    // An hourly run seen six minutes late: missed, not started, and handled.
    let mut hourly = handled.clone();
    hourly.spec.schedule = Some("0 * * * *".into());
    let late = plan::plan(
        &hourly,
        schedule(&hourly).as_ref(),
        &[],
        &[],
        ts("2026-12-04T13:06:00Z"),
    );
    assert!(late.missed && late.start.is_none(), "{late:?}");
    assert_eq!(late.last_schedule_time, Some(ts("2026-12-04T13:00:00Z")));

    // Suspended: nothing runs, nothing is handled.
    let mut suspended = (*b).clone();
    suspended.spec.suspend = true;
    let p = plan::plan(&suspended, s.as_ref(), &[], &[], now);
    assert_eq!((p.start, p.last_schedule_time), (None, None));

    // A due time before the BatchJob existed does not run.
    let mut young = (*b).clone();
    young.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        ts("2026-12-04T12:01:00Z"),
    ));
    assert_eq!(plan::plan(&young, s.as_ref(), &[], &[], now).start, None);
}

#[test]
fn requests_start_one_run_each_and_are_remembered() {
    let mut b = (*bj(POPULARITY)).clone();
    b.spec.schedule = None;
    b.spec.time_zone = None;
    let now = ts("2026-12-04T12:00:00Z");
    assert!(
        plan::plan(&b, None, &[], &[], now).start.is_none(),
        "no request, no run"
    );
    b.metadata.annotations = Some(BTreeMap::from([(
        RUN_ANNOTATION.into(),
        "2026-11-26T08:00".into(),
    )]));
    let p = plan::plan(&b, None, &[], &[], now);
    let first = p.start.expect("run");
    assert_eq!(first.trigger, RunTrigger::Manual);
    assert_eq!(p.last_run_request.as_deref(), Some("2026-11-26T08:00"));
    assert!(first.name.starts_with("popularity-") && first.name.len() <= 63);
    assert!(run_job_name(&"x".repeat(80), "t").len() <= 63);
    // Handled once: its Job collected later, the same request does not run again.
    let mut handled = b.clone();
    handled.status = Some(recsys_crds::BatchJobStatus {
        last_run_request: p.last_run_request.clone(),
        ..Default::default()
    });
    assert_eq!(plan::plan(&handled, None, &[], &[], now).start, None);
    handled.metadata.annotations = Some(BTreeMap::from([(RUN_ANNOTATION.into(), "again".into())]));
    let again = plan::plan(&handled, None, &[], &[], now)
        .start
        .expect("new request");
    assert_ne!(again.name, first.name);
    assert_eq!(assess(&Arc::new(b.clone()), &[]).ready_reason, "OnDemand");
}

fn upstream(
    name: &str,
    success: Option<(&str, &str)>,
    failure: Option<(&str, &str)>,
) -> UpstreamState {
    UpstreamState {
        name: name.into(),
        last_success: success.map(|(j, t)| (j.into(), ts(t))),
        last_failure: failure
            .map(|(j, t)| (j.into(), ts(t), "BackoffLimitExceeded: exit 1".into())),
    }
}

#[test]
fn the_gate_opens_when_every_upstream_succeeded_since_the_last_run() {
    let after = vec!["a".to_owned(), "b".to_owned()];
    let since = Since {
        at: Some(ts("2026-12-04T10:00:00Z")),
        consumed: &[],
    };
    let a = upstream("a", Some(("a-1", "2026-12-04T11:00:00Z")), None);
    let b_old = upstream("b", Some(("b-0", "2026-12-04T09:00:00Z")), None);
    assert_eq!(
        plan::gate(&after, &[a.clone(), b_old.clone()], since),
        Gate::Waiting {
            upstream: "b".into(),
            failure: None
        }
    );
    let b_failed = upstream(
        "b",
        Some(("b-0", "2026-12-04T09:00:00Z")),
        Some(("b-1", "2026-12-04T11:30:00Z")),
    );
    assert_eq!(
        plan::gate(&after, &[a.clone(), b_failed], since),
        Gate::Waiting {
            upstream: "b".into(),
            failure: Some(("b-1".into(), "BackoffLimitExceeded: exit 1".into()))
        }
    );
    let b_new = upstream("b", Some(("b-2", "2026-12-04T11:45:00Z")), None);
    assert_eq!(
        plan::gate(&after, &[a.clone(), b_new.clone()], since),
        Gate::Open(vec![
            ConsumedRun {
                batch_job: "a".into(),
                job_name: "a-1".into()
            },
            ConsumedRun {
                batch_job: "b".into(),
                job_name: "b-2".into()
            },
        ])
    );
    // Never ran: any success counts.
    assert!(matches!(
        plan::gate(&after, &[a.clone(), b_old], Since::default()),
        Gate::Open(_)
    ));
    // Whole seconds: a success in the second the last run was created counts once, unless
    // that run consumed it.
    let same_second = upstream("b", Some(("b-3", "2026-12-04T10:00:00Z")), None);
    assert!(matches!(
        plan::gate(&after, &[a.clone(), same_second.clone()], since),
        Gate::Open(_)
    ));
    let consumed = [ConsumedRun {
        batch_job: "b".into(),
        job_name: "b-3".into(),
    }];
    let after_it = Since {
        consumed: &consumed,
        ..since
    };
    assert!(matches!(
        plan::gate(&after, &[a, same_second], after_it),
        Gate::Waiting { .. }
    ));
}

const DOWNSTREAM: &str = r#"
apiVersion: recsys.io/v1alpha1
kind: BatchJob
metadata: { name: train, creationTimestamp: "2026-11-01T00:00:00Z" }
spec:
  job: cf-train
  cfTrain: { model: als }
  after: [quality]
"#;

fn job(yaml: &str) -> Job {
    serde_yaml::from_str(yaml).expect("job fixture")
}

#[test]
fn upstream_triggered_jobs_run_once_per_upstream_success() {
    let b = bj(DOWNSTREAM);
    let now = ts("2026-12-04T12:00:00Z");
    let ok = upstream("quality", Some(("quality-7", "2026-12-04T11:00:00Z")), None);
    let p = plan::plan(&b, None, &[], std::slice::from_ref(&ok), now);
    let start = p.start.clone().expect("upstream succeeded");
    assert_eq!(start.trigger, RunTrigger::Upstream);
    assert_eq!(
        start.consumed,
        vec![ConsumedRun {
            batch_job: "quality".into(),
            job_name: "quality-7".into()
        }]
    );
    // Its Job exists (it ran): the same upstream run does not start another.
    let ran = job(&format!(
        "{{metadata: {{name: {}, creationTimestamp: '2026-12-04T11:10:00Z'}}, status: {{succeeded: 1, conditions: [{{type: Complete, status: 'True'}}]}}}}",
        start.name
    ));
    let runs = observe::runs(&[ran], &[]);
    assert_eq!(
        plan::plan(&b, None, &runs, std::slice::from_ref(&ok), now).start,
        None
    );
    // A newer upstream success starts the next.
    let newer = upstream("quality", Some(("quality-8", "2026-12-04T11:50:00Z")), None);
    let next = plan::plan(&b, None, &runs, &[newer], now)
        .start
        .expect("next");
    assert_ne!(next.name, start.name);
}

#[test]
fn a_scheduled_run_waiting_for_an_upstream_is_held_and_counted() {
    let mut b = (*bj(DOWNSTREAM)).clone();
    b.spec.schedule = Some("0 * * * *".into());
    let s = schedule(&b);
    let now = ts("2026-12-04T12:00:30Z");
    let failed = upstream("quality", None, Some(("quality-9", "2026-12-04T11:58:00Z")));
    let p = plan::plan(&b, s.as_ref(), &[], &[failed], now);
    assert!(p.held && p.start.is_none(), "{p:?}");
    let status = status::desired_status(&b, &assess(&Arc::new(b.clone()), &[]), Some(&p), &[], now);
    assert_eq!(status.held_runs, 1);
    let cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == status::UPSTREAM_READY)
        .expect("condition");
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("False", "UpstreamFailed")
    );
    assert!(
        cond.message.contains("quality") && cond.message.contains("quality-9"),
        "{}",
        cond.message
    );
}

/// A Pod of Job `job` whose trainer container ended with `exit_code` and termination `message`.
fn trainer_pod(
    name: &str,
    job: &str,
    exit_code: i32,
    finished: Option<&str>,
    message: &str,
) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "labels": { "job-name": job } },
        "status": { "containerStatuses": [{
            "name": CONTAINER, "image": "x", "imageID": "x", "ready": false, "restartCount": 0,
            "state": { "terminated": { "exitCode": exit_code, "finishedAt": finished, "message": message } }
        }]}
    }))
    .expect("pod fixture")
}

#[test]
fn runs_come_from_jobs_with_the_trainers_figures() {
    let jobs: Vec<Job> = serde_yaml::from_str(
        r#"
- metadata:
    name: pop-1
    creationTimestamp: "2026-11-26T07:00:00Z"
    annotations: { recsys.io/trigger: Upstream, recsys.io/consumed: '[{"batchJob":"quality","jobName":"quality-1"}]' }
  status:
    startTime: "2026-11-26T07:00:00Z"
    completionTime: "2026-11-26T07:01:00Z"
    succeeded: 1
    failed: 1
    conditions: [{ type: Complete, status: "True" }]
- metadata: { name: pop-2, creationTimestamp: "2026-11-26T07:05:00Z" }
  status:
    startTime: "2026-11-26T07:05:00Z"
    failed: 1
    conditions:
      - { type: Failed, status: "True", reason: PodFailurePolicy, message: "exit code 2", lastTransitionTime: "2026-11-26T07:05:30Z" }
- metadata: { name: pop-3, creationTimestamp: "2026-11-26T07:10:00Z" }
  status: { startTime: "2026-11-26T07:10:00Z", active: 1 }
"#,
    )
    .expect("jobs");
    let pods = vec![
        trainer_pod(
            "pop-1-a",
            "pop-1",
            1,
            Some("2026-11-26T07:00:20Z"),
            r#"{"job":"popularity","succeeded":false,"seconds":1.0}"#,
        ),
        trainer_pod(
            "pop-1-b",
            "pop-1",
            0,
            Some("2026-11-26T07:00:59Z"),
            r#"{"job":"popularity","succeeded":true,"seconds":12.4,"events":3000,"rows":60}"#,
        ),
        trainer_pod(
            "pop-2-a",
            "pop-2",
            2,
            None,
            r#"{"job":"popularity","succeeded":false,"seconds":0.1,"errorKind":"Usage","message":"invalid option --window: \"ninety days\""}"#,
        ),
    ];
    let runs = observe::runs(&jobs, &pods);
    let names: Vec<(&str, bool)> = runs
        .iter()
        .map(|r| (r.job_name.as_str(), r.running()))
        .collect();
    assert_eq!(names, [("pop-3", true), ("pop-2", false), ("pop-1", false)]);
    let pop1 = runs[2].finished.clone().expect("finished");
    assert_eq!(
        (pop1.outcome, pop1.attempts, pop1.trigger),
        (RunOutcome::Succeeded, 2, RunTrigger::Upstream)
    );
    assert_eq!(
        (pop1.rows, pop1.events, pop1.duration_seconds),
        (Some(60), Some(3000), Some(12))
    );
    assert_eq!(
        pop1.consumed,
        vec![ConsumedRun {
            batch_job: "quality".into(),
            job_name: "quality-1".into()
        }]
    );
    let pop2 = runs[1].finished.clone().expect("finished");
    assert_eq!(pop2.outcome, RunOutcome::Failed);
    assert!(
        pop2.reason.starts_with("PodFailurePolicy: exit code 2"),
        "{}",
        pop2.reason
    );
    assert!(
        pop2.reason.contains("ninety days"),
        "the trainer's words: {}",
        pop2.reason
    );

    let b = bj(POPULARITY);
    let now = ts("2026-11-26T08:00:00Z");
    let status = status::desired_status(&b, &assess(&b, &[]), None, &runs, now);
    assert_eq!(status.history.len(), 2, "running runs are not history yet");
    assert_eq!(status.active, ["pop-3"]);
    assert_eq!(
        status.last_successful_time.map(|t| t.0),
        Some(ts("2026-11-26T07:01:00Z"))
    );
    assert_eq!(status.observed_generation, Some(2));
    // Upstream view of this history.
    let u = UpstreamState::from_history("popularity", &status.history);
    assert_eq!(u.last_success.map(|s| s.0), Some("pop-1".into()));
    assert_eq!(u.last_failure.map(|f| f.0), Some("pop-2".into()));
    // Garbage: finished runs beyond the limit, oldest first; running ones never.
    assert_eq!(observe::expired(&runs, 1), ["pop-1"]);
    assert_eq!(observe::expired(&runs, 5), Vec::<String>::new());
}

#[test]
fn bad_specs_name_their_field() {
    let mut b = (*bj(POPULARITY)).clone();
    b.spec.schedule = Some("61 * * * *".into());
    b.spec.time_zone = Some("Mars/Olympus".into());
    let got = assess(&Arc::new(b), &[]);
    let fields: Vec<&str> = got.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["spec.schedule", "spec.timeZone"]);
    // The trainer's parser refuses a parameter: so does validation, before any run.
    let mut typo = (*bj(POPULARITY)).clone();
    typo.spec.parameters.insert("windw".into(), "90d".into());
    let got = assess(&Arc::new(typo), &[]);
    assert_eq!(got.problems[0].field, "spec.parameters");
    assert!(
        got.problems[0].message.contains("--windw"),
        "{}",
        got.problems[0].message
    );
    let mut owned = (*bj(DOWNSTREAM)).clone();
    owned
        .spec
        .parameters
        .insert("model-name".into(), "x".into());
    let got = validate(&owned);
    assert_eq!(got[0].field, "spec.parameters.model-name");
}

#[test]
fn dependencies_must_exist_and_not_cycle() {
    let a = bj(
        "{apiVersion: recsys.io/v1alpha1, kind: BatchJob, metadata: {name: a}, spec: {job: popularity, after: [b]}}",
    );
    assert_eq!(
        assess(&a, std::slice::from_ref(&a)).ready_reason,
        "UnknownDependency"
    );
    let b = bj(
        "{apiVersion: recsys.io/v1alpha1, kind: BatchJob, metadata: {name: b}, spec: {job: freshness, after: [a]}}",
    );
    let got = assess(&a, &[a.clone(), b.clone()]);
    assert_eq!(got.ready_reason, "DependencyCycle");
    assert!(
        got.ready_message.contains("a → b → a"),
        "{}",
        got.ready_message
    );
}

/// Every shipped BatchJob example becomes a command line the trainer accepts: the
/// parameters a user copies from the docs do not fail at run time.
#[test]
fn example_batch_jobs_give_arguments_the_trainer_accepts() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
    let mut files = vec![root.join("batchjob.yaml")];
    for dir in ["batchjobs", "pipeline"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        let mut more: Vec<_> = entries.map(|e| e.expect("entry").path()).collect();
        more.sort();
        files.extend(more);
    }
    assert!(files.len() >= 5, "{files:?}");
    let mut seen = 0;
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("yaml");
            if v.get("kind").and_then(|k| k.as_str()) != Some("BatchJob") {
                continue;
            }
            let bj: BatchJob =
                serde_yaml::from_value(v).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let problems = validate(&bj);
            assert!(problems.is_empty(), "{}: {problems:?}", path.display());
            let options = recsys_trainer::contract::RunOptions {
                compare_to: bj
                    .spec
                    .cf_train
                    .as_ref()
                    .and_then(|c| c.hand_off_to.as_ref())
                    .map(|_| ("v1".into(), 0.98)),
            };
            let args = recsys_trainer::contract::check(&bj.spec, &options)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(args[0], bj.spec.job.as_str());
            seen += 1;
        }
    }
    assert!(seen >= 8, "{seen} BatchJobs in the examples");
}
