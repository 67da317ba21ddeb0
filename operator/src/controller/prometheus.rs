//! The rollout analysis's Prometheus source (`spec.strategy.analysis.prometheus`).
//!
//! Instead of reading the scorer pods' `/metrics` at both ends of a window, a run asks the
//! Prometheus server that scrapes them for the window's increase of the same series, summed
//! over the scorer instances the selector picks, as Flagger's and Argo Rollouts' Prometheus
//! providers do:
//!
//! | figure | query (`W`: the run's window in seconds, `S`: the selector) |
//! | --- | --- |
//! | requests, errors per variant | `sum by (variant) (increase(recommend_requests_total{S}[W]))`, `… recommend_errors_total …` |
//! | latency per variant | `sum by (variant, le) (increase(recommend_request_duration_seconds_bucket{S}[W]))` |
//! | scores per variant | `sum by (variant, le) (increase(model_score_distribution_bucket{S,model_name="M"}[W]))` |
//! | shadow overlap, scores | `… shadow_topk_overlap_bucket{S,model="M"} …` (and `_sum`), `… shadow_score_distribution_bucket …` |
//! | instances | `count(count by (instance) (last_over_time(recommend_requests_total{S}[W])))` |
//!
//! The counters become the same [`Counters`] the pods' readings give, and the same
//! [`recsys_core::serving::analysis::judge`] decides; p99 is interpolated in its bucket as
//! `histogram_quantile` does. Prometheus' `increase` does not count a series' first sample, so
//! a window needs at least two scrapes of each series: keep the interval at least twice the
//! scrape interval.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use recsys_core::serving::analysis::{Counters, Histogram, VariantCounters};
use recsys_crds::model_deployment::PrometheusSource;
use serde::Deserialize;

use super::fleet;

/// Longest wait for one query.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// One sample of an instant vector: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<VectorSample>,
}

#[derive(Deserialize)]
struct VectorSample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

/// The instant vector of a `/api/v1/query` answer.
pub fn parse_vector(body: &[u8]) -> Result<Vec<Sample>, String> {
    let a: Answer =
        serde_json::from_slice(body).map_err(|e| format!("not a Prometheus answer: {e}"))?;
    if a.status != "success" {
        return Err(a.error.unwrap_or_else(|| format!("status {}", a.status)));
    }
    let data = a.data.ok_or("an answer without data")?;
    if data.result_type != "vector" {
        return Err(format!(
            "a {} where a vector was expected",
            data.result_type
        ));
    }
    data.result
        .into_iter()
        .map(|s| {
            let v = match s.value.1.as_str() {
                "NaN" => 0.0,
                x => x
                    .parse::<f64>()
                    .map_err(|_| format!("value {x:?} is not a number"))?,
            };
            Ok((s.metric, if v.is_finite() { v } else { 0.0 }))
        })
        .collect()
}

/// `host:port` of an `http://` address.
pub fn authority(address: &str) -> Result<String, String> {
    let uri: hyper::Uri = address
        .parse()
        .map_err(|e| format!("address {address:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "address {address:?}: only http:// is supported, not {other}://"
            ));
        }
        None => return Err(format!("address {address:?} has no http:// scheme")),
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("address {address:?} has no host"))?;
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(80)))
}

/// The selector of `source` for ModelDeployment `name`.
pub fn selector(source: &PrometheusSource, name: &str) -> String {
    source
        .selector
        .clone()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| format!("job=\"{name}-scorer\""))
}

fn quoted(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The queries of one run: (what, PromQL).
pub fn queries(selector: &str, model: &str, window_s: u64) -> Vec<(&'static str, String)> {
    let m = quoted(model);
    let w = window_s.max(1);
    // `{selector,extra}`, leaving out what is empty.
    let series = |name: &str, extra: &str| {
        let matchers: Vec<&str> = [selector, extra]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        format!("{name}{{{}}}[{w}s]", matchers.join(","))
    };
    let inc = |name: &str, extra: &str, by: &str| {
        format!("sum by ({by}) (increase({}))", series(name, extra))
    };
    let model_name = format!("model_name=\"{m}\"");
    let shadow_model = format!("model=\"{m}\"");
    vec![
        ("answered", inc("recommend_requests_total", "", "variant")),
        ("errors", inc("recommend_errors_total", "", "variant")),
        (
            "latency",
            inc(
                "recommend_request_duration_seconds_bucket",
                "",
                "variant, le",
            ),
        ),
        (
            "scores",
            inc(
                "model_score_distribution_bucket",
                &model_name,
                "variant, le",
            ),
        ),
        (
            "overlap",
            inc("shadow_topk_overlap_bucket", &shadow_model, "le"),
        ),
        (
            "overlap_sum",
            format!(
                "sum(increase({}))",
                series("shadow_topk_overlap_sum", &shadow_model)
            ),
        ),
        (
            "shadow_scores",
            inc(
                "shadow_score_distribution_bucket",
                &shadow_model,
                "variant, le",
            ),
        ),
        (
            "instances",
            format!(
                "count(count by (instance) (last_over_time({})))",
                series("recommend_requests_total", "")
            ),
        ),
    ]
}

fn le(labels: &BTreeMap<String, String>) -> Option<f64> {
    match labels.get("le")?.as_str() {
        "+Inf" => Some(f64::INFINITY),
        x => x.parse().ok(),
    }
}

fn histogram(samples: &[&Sample], sum: f64) -> Histogram {
    Histogram::new(
        samples
            .iter()
            .filter_map(|(l, v)| Some((le(l)?, *v)))
            .collect(),
        sum,
    )
}

/// The window's counters from the answers of [`queries`] (by their names), and the number of
/// instances.
pub fn counters(answers: &BTreeMap<&str, Vec<Sample>>) -> (Counters, usize) {
    let get = |what: &str| answers.get(what).map(Vec::as_slice).unwrap_or_default();
    let of_variant = |what: &str, variant: &str| -> Vec<&Sample> {
        get(what)
            .iter()
            .filter(|(l, _)| l.get("variant").map(String::as_str) == Some(variant))
            .collect()
    };
    let total = |samples: Vec<&Sample>| samples.iter().map(|(_, v)| v).sum::<f64>();
    let side = |variant: &str| VariantCounters {
        answered: total(of_variant("answered", variant)),
        errors: total(of_variant("errors", variant)),
        latency: histogram(&of_variant("latency", variant), 0.0),
        scores: histogram(&of_variant("scores", variant), 0.0),
    };
    let mut c = Counters {
        stable: side("stable"),
        canary: side("canary"),
        ..Counters::default()
    };
    let overlap: Vec<&Sample> = get("overlap").iter().collect();
    c.shadow.overlap = histogram(&overlap, total(get("overlap_sum").iter().collect()));
    c.shadow.stable_scores = histogram(&of_variant("shadow_scores", "stable"), 0.0);
    c.shadow.shadow_scores = histogram(&of_variant("shadow_scores", "shadow"), 0.0);
    let instances = get("instances").first().map_or(0, |(_, v)| *v as usize);
    (c, instances)
}

/// One instant query at `at`.
pub async fn query(authority: &str, promql: &str, at: Timestamp) -> Result<Vec<Sample>, String> {
    let path = format!(
        "/api/v1/query?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .append_pair(
                "time",
                &format!("{:.3}", at.as_millisecond() as f64 / 1000.0)
            )
            .finish()
    );
    let body = fleet::get_from(authority, &path, QUERY_TIMEOUT).await?;
    parse_vector(&body)
}

/// The counters of the `window` ending `at`, from `source`, for ModelDeployment `name` of
/// `model`; an error names the server and what failed.
pub async fn window(
    source: &PrometheusSource,
    name: &str,
    model: &str,
    window: Duration,
    at: Timestamp,
) -> Result<(Counters, usize), String> {
    let authority = authority(&source.address)?;
    let selector = selector(source, name);
    let qs = queries(&selector, model, window.as_secs());
    let answers = futures::future::join_all(qs.iter().map(|(what, q)| {
        let authority = authority.clone();
        async move { (*what, query(&authority, q, at).await) }
    }))
    .await;
    let mut by_name = BTreeMap::new();
    for (what, answer) in answers {
        let samples =
            answer.map_err(|e| format!("Prometheus at {}: {what}: {e}", source.address))?;
        by_name.insert(what, samples);
    }
    Ok(counters(&by_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(samples: &[(&[(&str, &str)], &str)]) -> Vec<u8> {
        let result: Vec<serde_json::Value> = samples
            .iter()
            .map(|(labels, v)| {
                let metric: BTreeMap<&str, &str> = labels.iter().copied().collect();
                serde_json::json!({"metric": metric, "value": [1.0, v]})
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "status": "success", "data": {"resultType": "vector", "result": result}
        }))
        .expect("json")
    }

    #[test]
    fn queries_select_the_deployment_and_the_model_over_the_window() {
        let source = PrometheusSource {
            address: "http://prom:9090".into(),
            selector: None,
        };
        let q = queries(&selector(&source, "als"), "als", 30);
        let scores = &q.iter().find(|(w, _)| *w == "scores").expect("scores").1;
        assert_eq!(
            scores,
            "sum by (variant, le) (increase(model_score_distribution_bucket{job=\"als-scorer\",model_name=\"als\"}[30s]))"
        );
        let answered = &q[0].1;
        assert_eq!(
            answered,
            "sum by (variant) (increase(recommend_requests_total{job=\"als-scorer\"}[30s]))"
        );
        let custom = PrometheusSource {
            selector: Some("namespace=\"shop\",service=\"als-scorer\"".into()),
            ..source
        };
        assert_eq!(
            selector(&custom, "als"),
            "namespace=\"shop\",service=\"als-scorer\""
        );
    }

    #[test]
    fn answers_become_the_counters_the_checks_read() {
        let mut answers = BTreeMap::new();
        answers.insert(
            "answered",
            parse_vector(&vector(&[
                (&[("variant", "stable")], "900"),
                (&[("variant", "canary")], "100"),
            ]))
            .expect("parse"),
        );
        answers.insert(
            "errors",
            parse_vector(&vector(&[(&[("variant", "canary")], "5")])).expect("parse"),
        );
        answers.insert(
            "latency",
            parse_vector(&vector(&[
                (&[("variant", "canary"), ("le", "0.01")], "90"),
                (&[("variant", "canary"), ("le", "0.1")], "100"),
                (&[("variant", "canary"), ("le", "+Inf")], "100"),
            ]))
            .expect("parse"),
        );
        answers.insert(
            "instances",
            parse_vector(&vector(&[(&[], "2")])).expect("parse"),
        );
        let (c, instances) = counters(&answers);
        assert_eq!(instances, 2);
        assert_eq!(
            (c.stable.answered, c.canary.answered, c.canary.errors),
            (900.0, 100.0, 5.0)
        );
        assert_eq!(c.canary.latency.count(), 100.0);
        let p99 = c.canary.latency.quantile(0.99).expect("p99");
        assert!(p99 > 0.01 && p99 <= 0.1, "{p99}");
        assert_eq!(c.stable.latency.count(), 0.0);
    }

    #[test]
    fn errors_and_odd_addresses_are_named() {
        let e = parse_vector(
            br#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#,
        )
        .expect_err("an error");
        assert!(e.contains("parse error"), "{e}");
        assert!(parse_vector(b"<html>").is_err());
        assert_eq!(
            authority("http://prometheus.monitoring.svc:9090").expect("ok"),
            "prometheus.monitoring.svc:9090"
        );
        assert_eq!(authority("http://prom").expect("ok"), "prom:80");
        assert!(
            authority("https://prom:9090")
                .expect_err("tls")
                .contains("only http://")
        );
        assert!(authority("prom:9090").is_err());
    }
}
