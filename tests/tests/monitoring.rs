//! The monitoring kit of the data-quality checks (docs/monitoring.md): the alert rules pass
//! `promtool` and their unit tests, every metric and label the rules and the dashboard use is
//! one the operator exports, and a real Prometheus scraping the operator's exposition fires the
//! alerts of a failing run and none for a clean one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::jiff::Timestamp;
use recsys_core::quality::{CheckResult, CheckType, GATE_KIND, QualityReport, Verdict};
use recsys_core::runs::RunSummary;
use recsys_operator::metrics::Metrics;
use recsys_tests::monitoring::{Prometheus, firing_alerts};
use recsys_tests::repo_root;
use serde_json::{Value, json};

const RULES: &str = "charts/recsys/files/alerts/data-quality.rules.yaml";
const RULE_TESTS: &str = "tests/monitoring/data-quality.test.yaml";
const DASHBOARD: &str = "charts/recsys/files/dashboards/data-quality.json";
const RUNBOOKS: &str = "https://github.com/recsys-io/recsys/blob/main/";
/// Prefixes of the metrics recsys exports.
const PREFIXES: [&str; 4] = ["data_quality_", "batch_job_", "model_deployment", "recsys_"];
const WAIT: Duration = Duration::from_secs(60);

fn path(p: &str) -> PathBuf {
    repo_root().join(p)
}

/// Runs `promtool` (Debian's `prometheus` package, which tests/env/up.sh installs); a missing
/// promtool fails the test.
fn promtool(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo_root())
        .output()
        .context(
            "promtool is missing: install Debian's prometheus package (tests/env/up.sh does)",
        )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() -> anyhow::Result<()> {
    let checked = promtool(&["check", "rules", RULES])?;
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", RULE_TESTS])?;
    assert!(tested.contains("SUCCESS"), "{tested}");
    Ok(())
}

/// A check's result as the trainer reports it.
fn check(name: &str, check_type: CheckType, verdict: Verdict, observed: f64) -> CheckResult {
    CheckResult {
        check: name.to_owned(),
        check_type,
        target: "events".to_owned(),
        observed: Some(observed),
        threshold: Some(0.0),
        verdict,
        blocking: verdict != Verdict::Warn,
        message: format!("{name}: {observed}"),
    }
}

/// A run's checks: one of each type, all passing but `failing` (name, verdict, observed).
fn checks(failing: &[(&str, Verdict, f64)]) -> Vec<CheckResult> {
    let passing = [
        ("schema", CheckType::Schema, 0.0),
        ("freshness", CheckType::Freshness, 12.0),
        ("completeness.product_id", CheckType::Completeness, 0.0),
        ("validity.event_type", CheckType::Validity, 0.0),
        ("validity.unknown_product", CheckType::Validity, 0.01),
        ("volume.total", CheckType::Volume, 1.02),
        ("volume.purchase", CheckType::Volume, 0.97),
        ("drift.psi", CheckType::Drift, 0.02),
    ];
    passing
        .iter()
        .map(
            |(name, t, observed)| match failing.iter().find(|(f, _, _)| f == name) {
                Some((_, verdict, observed)) => check(name, *t, *verdict, *observed),
                None => check(name, *t, Verdict::Pass, *observed),
            },
        )
        .collect()
}

/// Records a finished run of BatchJob shop/`job` with `results`, as the operator does with the
/// summary it reads from the trainer's Pod.
fn record(metrics: &Metrics, job: &str, results: Vec<CheckResult>) -> anyhow::Result<()> {
    let now = Timestamp::from_second(Timestamp::now().as_second())?;
    let report = QualityReport::new("data-quality", now.as_millisecond(), results, 1.5);
    let summary = RunSummary {
        job: "data-quality".to_owned(),
        succeeded: report.passed,
        error_kind: (!report.passed).then(|| GATE_KIND.to_owned()),
        message: (!report.passed).then(|| report.describe_failures()),
        seconds: 1.5,
        quality: Some(report.summary()),
        ..Default::default()
    };
    let run = serde_json::from_value(json!({
        "jobName": format!("{job}-29939880"),
        "trigger": "Schedule",
        "startedAt": (now - k8s_openapi::jiff::SignedDuration::from_secs(2)).to_string(),
        "finishedAt": now.to_string(),
        "outcome": if report.passed { "Succeeded" } else { "Failed" },
        "attempts": 1,
        "reason": if report.passed { String::new() } else {
            format!("{GATE_KIND}: {}", report.describe_failures())
        },
    }))?;
    metrics.batch_run("shop", job, &run);
    metrics.data_quality("shop", job, &run, &summary);
    Ok(())
}

/// The exposition of an operator that saw a run fail its freshness and volume checks.
fn failing_exposition() -> anyhow::Result<String> {
    let metrics = Metrics::default();
    record(
        &metrics,
        "data-quality",
        // An hour-old newest event; purchases at a fifth of their baseline.
        checks(&[
            ("freshness", Verdict::Fail, 3600.0),
            ("volume.purchase", Verdict::Fail, 0.2),
        ]),
    )?;
    Ok(metrics.encode()?)
}

/// Every PromQL expression of a rules file or a dashboard: the strings under `expr`, `query`
/// and `definition`, wherever they are.
fn expressions(v: &Value, key: Option<&str>, out: &mut Vec<String>) {
    match v {
        Value::String(s) if matches!(key, Some("expr" | "query" | "definition")) => {
            out.push(s.clone())
        }
        Value::Array(items) => items.iter().for_each(|i| expressions(i, key, out)),
        Value::Object(map) => map
            .iter()
            .for_each(|(k, v)| expressions(v, Some(k.as_str()), out)),
        _ => {}
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The end of the string literal opening at `i` (its closing quote).
fn skip_string(chars: &[char], i: usize) -> usize {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() && chars[j] != quote {
        j += if chars[j] == '\\' { 2 } else { 1 };
    }
    j
}

/// The recsys metrics an expression selects, with the label names its matchers use.
fn metric_refs(expr: &str) -> Vec<(String, BTreeSet<String>)> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i) + 1;
            continue;
        }
        if !is_ident(c) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        if !PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let mut labels = BTreeSet::new();
        let mut j = i;
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        if j < chars.len() && chars[j] == '{' {
            j += 1;
            let mut label = String::new();
            while j < chars.len() && chars[j] != '}' {
                match chars[j] {
                    '"' | '\'' | '`' => j = skip_string(&chars, j),
                    c if is_ident(c) => label.push(c),
                    '=' | '!' | '~' => {
                        if !label.is_empty() {
                            labels.insert(std::mem::take(&mut label));
                        }
                    }
                    _ => label.clear(),
                }
                j += 1;
            }
            i = j;
        }
        out.push((name, labels));
    }
    out
}

/// The samples of an exposition: name → the label names of each of its series.
fn samples(exposition: &str) -> BTreeMap<String, Vec<BTreeSet<String>>> {
    let mut out: BTreeMap<String, Vec<BTreeSet<String>>> = BTreeMap::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let chars: Vec<char> = line.chars().collect();
        let end = chars
            .iter()
            .position(|c| !is_ident(*c))
            .unwrap_or(chars.len());
        let name: String = chars[..end].iter().collect();
        let mut labels = BTreeSet::new();
        if chars.get(end) == Some(&'{') {
            let (mut j, mut label) = (end + 1, String::new());
            while j < chars.len() && chars[j] != '}' {
                match chars[j] {
                    '"' => j = skip_string(&chars, j),
                    '=' => {
                        labels.insert(std::mem::take(&mut label));
                    }
                    c if is_ident(c) => label.push(c),
                    _ => label.clear(),
                }
                j += 1;
            }
        }
        out.entry(name).or_default().push(labels);
    }
    out
}

/// The sample names each family of an exposition may have (`# TYPE` lines): a counter's
/// `_total`, a histogram's `_bucket`, `_sum` and `_count`, a gauge's own name.
fn family_samples(exposition: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in exposition.lines() {
        let mut words = line.split_whitespace();
        if (words.next(), words.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "summary" => &["", "_sum", "_count"],
            _ => &[""],
        };
        out.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    out
}

/// A file of the repository.
fn read(p: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path(p)).with_context(|| p.to_owned())
}

fn rules() -> anyhow::Result<Value> {
    serde_yaml::from_str(&read(RULES)?).context(RULES)
}

fn dashboard() -> anyhow::Result<Value> {
    serde_json::from_str(&read(DASHBOARD)?).context(DASHBOARD)
}

#[test]
fn every_metric_and_label_the_rules_and_the_dashboard_use_is_exported() -> anyhow::Result<()> {
    let exposition = failing_exposition()?;
    let families = family_samples(&exposition);
    let series = samples(&exposition);
    for (file, doc) in [(RULES, rules()?), (DASHBOARD, dashboard()?)] {
        let mut exprs = vec![];
        expressions(&doc, None, &mut exprs);
        ensure!(!exprs.is_empty(), "{file}: no expressions found");
        let mut used = 0;
        for expr in &exprs {
            for (name, labels) in metric_refs(expr) {
                used += 1;
                ensure!(
                    families.contains(&name),
                    "{file}: {name} (in {expr:?}) is not a metric the operator exports:\n{exposition}"
                );
                let Some(found) = series.get(&name) else {
                    bail!("{file}: {name} has no series after a recorded run:\n{exposition}");
                };
                ensure!(
                    found.iter().any(|l| labels.is_subset(l)),
                    "{file}: {name} has no series with labels {labels:?} (in {expr:?}); it has {found:?}"
                );
            }
        }
        ensure!(used > 0, "{file}: no recsys metric found in {exprs:?}");
    }
    // The scan sees what it should: a renamed metric or label is caught.
    let refs = metric_refs(
        r#"sum by (status) (rate(data_quality_checks_total{check_type=~"schema|drift", status!="pass"}[5m])) > 0"#,
    );
    assert_eq!(
        refs,
        vec![(
            "data_quality_checks_total".to_owned(),
            BTreeSet::from(["check_type".to_owned(), "status".to_owned()])
        )]
    );
    assert!(
        !families.contains("data_quality_checks"),
        "a counter is selected by its _total"
    );
    Ok(())
}

/// The alert names the rules file must have, and whether they judge a check (`for: 0m`).
const ALERTS: [(&str, bool); 8] = [
    ("DataQualitySchemaMismatch", true),
    ("DataQualityEventsStale", true),
    ("DataQualityIncompleteEvents", true),
    ("DataQualityInvalidEvents", true),
    ("DataQualityVolumeAnomaly", true),
    ("DataQualityFeatureDrift", true),
    ("DataQualityChecksNotRunning", false),
    ("DataQualityGateHeld", true),
];

#[test]
fn every_alert_has_severity_annotations_and_a_runbook_and_the_dashboard_its_variables()
-> anyhow::Result<()> {
    let rules = rules()?;
    let groups = rules["groups"].as_array().context("groups")?;
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["name"], "recsys-data-quality");
    let mut names = BTreeSet::new();
    let index = read("docs/runbooks/README.md")?;
    for rule in groups[0]["rules"].as_array().context("rules")? {
        let name = rule["alert"].as_str().context("only alerting rules")?;
        names.insert(name);
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: {severity:?}"
        );
        let a = &rule["annotations"];
        for key in ["summary", "description"] {
            let text = a[key].as_str().unwrap_or_default();
            assert!(
                text.contains("{{ $labels.namespace }}/{{ $labels.job_name }}"),
                "{name}: {key} does not name the BatchJob: {text:?}"
            );
        }
        let url = a["runbook_url"].as_str().unwrap_or_default();
        let file = url
            .strip_prefix(RUNBOOKS)
            .with_context(|| format!("{name}: runbook_url {url:?}"))?;
        assert!(path(file).is_file(), "{name}: {file} does not exist");
        let base = file.rsplit('/').next().unwrap_or_default();
        assert!(
            index.contains(&format!("({base})")),
            "docs/runbooks/README.md does not link {base}"
        );
        let checks = ALERTS.iter().any(|(n, zero)| *n == name && *zero);
        assert_eq!(rule["for"] == "0m", checks, "{name}: for {}", rule["for"]);
    }
    assert_eq!(
        names,
        ALERTS.iter().map(|(n, _)| *n).collect::<BTreeSet<_>>()
    );

    let d = dashboard()?;
    assert!(d["schemaVersion"].as_i64().unwrap_or(0) >= 36);
    let vars = d["templating"]["list"].as_array().context("variables")?;
    let var = |n: &str| vars.iter().find(|v| v["name"] == n);
    let ds = var("datasource").context("a datasource variable")?;
    assert_eq!(
        (&ds["type"], &ds["query"]),
        (&json!("datasource"), &json!("prometheus"))
    );
    for n in ["namespace", "job_name"] {
        assert_eq!(var(n).context(n)?["datasource"]["uid"], "${datasource}");
    }
    let panels = d["panels"].as_array().context("panels")?;
    let expr_of = |p: &Value| {
        p["targets"]
            .as_array()
            .map(|t| {
                t.iter()
                    .map(|t| t["expr"].as_str().unwrap_or_default().to_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().context("targets")? {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
    for t in CheckType::ALL {
        let selector = format!("check_type=\"{}\"", t.as_str());
        assert!(
            panels.iter().any(|p| p["type"] == "stat"
                && expr_of(p)
                    .iter()
                    .all(|e| e.contains("data_quality_failing_checks") && e.contains(&selector))
                && !expr_of(p).is_empty()),
            "no stat panel of failing {} checks",
            t.as_str()
        );
    }
    assert!(
        panels.iter().any(|p| p["type"] == "timeseries"
            && expr_of(p)
                .iter()
                .any(|e| e.contains("data_quality_event_age_seconds"))
            && p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line"
            && p["fieldConfig"]["defaults"]["thresholds"]["steps"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["value"] == 300))),
        "no event age panel with a 300 s threshold line"
    );
    Ok(())
}

/// The names of firing alerts, each with the BatchJob and severity it names.
fn names(alerts: &[recsys_tests::monitoring::Alert]) -> BTreeSet<(String, String, String)> {
    alerts
        .iter()
        .map(|(name, l)| {
            let get = |k: &str| l.get(k).cloned().unwrap_or_default();
            (
                name.clone(),
                format!("{}/{}", get("namespace"), get("job_name")),
                get("severity"),
            )
        })
        .collect()
}

#[tokio::test]
async fn prometheus_fires_the_alerts_of_a_failing_run_and_none_for_a_clean_one()
-> anyhow::Result<()> {
    let rules = path(RULES);
    let clean = Metrics::default();
    record(&clean, "data-quality", checks(&[]))?;
    let (failing, clean) = tokio::join!(
        Prometheus::start(&rules, failing_exposition()?, WAIT),
        firing_alerts(&rules, clean.encode()?, WAIT),
    );
    let failing = failing?;
    let fired = names(&failing.firing_alerts(WAIT).await?);
    let job = || "shop/data-quality".to_owned();
    let critical = || "critical".to_owned();
    assert_eq!(
        fired,
        BTreeSet::from([
            ("DataQualityEventsStale".to_owned(), job(), critical()),
            // The first hold of the BatchJob: its counter's series appears at 1.
            ("DataQualityGateHeld".to_owned(), job(), critical()),
            ("DataQualityVolumeAnomaly".to_owned(), job(), critical()),
        ]),
        "{}",
        failing.log()?
    );
    assert!(
        !fired
            .iter()
            .any(|(n, _, _)| n == "DataQualitySchemaMismatch")
    );
    assert_eq!(clean?, vec![], "a clean run fires nothing");

    // Every query of the dashboard is one Prometheus accepts, with its variables as Grafana
    // substitutes them.
    let mut exprs = vec![];
    expressions(&dashboard()?, None, &mut exprs);
    for expr in exprs.iter().filter(|e| e.contains('(') || e.contains('{')) {
        let q = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$namespace", ".*")
            .replace("$job_name", ".*");
        if q.starts_with("label_values(") {
            continue;
        }
        failing.query(&q).await?;
    }
    let stale = failing
        .query(r#"data_quality_failing_checks{check_type="freshness",verdict="fail"}"#)
        .await?;
    assert_eq!(stale["result"][0]["value"][1], "1", "{stale}");
    Ok(())
}
