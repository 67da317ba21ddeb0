//! Metrics of recommendations and scores.
//!
//! | metric | labels | what |
//! | --- | --- | --- |
//! | `recommend_requests_total` | endpoint, variant, path | answers, by the user's path (`cf`, `fold_in`, `blend`, `popularity`) |
//! | `recommend_request_duration_seconds` | endpoint, variant | time to answer |
//! | `recommend_errors_total` | endpoint, variant | requests that failed on the server's side (5xx); `variant` is the one the user is routed to, `none` without a model |
//! | `model_prediction_latency_seconds` | model_name | the CF part: the top-k scan or the candidate scores |
//! | `model_score_distribution` | model_name, variant | the CF scores (`user_product_affinity`) of returned products |
//!
//! The operator's rollout analysis reads the `variant` series of the scorer pods: error rate
//! and p99 latency of `canary` against its thresholds, and the score distribution of `canary`
//! against `stable` (PSI).
//! | `cf_requests_total` | model_name | answers in which CF took part |
//! | `cold_start_total` | kind | `new_user` (no trained factors: folded in or popularity), `new_product` (a returned product scored through a stand-in vector) |

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use recsys_core::serving::routing::Variant;
use recsys_core::serving::users::FactorSource;

use super::rank::Path;
use super::service::Answer;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    variant: &'static str,
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VariantLabels {
    endpoint: &'static str,
    variant: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScoreLabels {
    model_name: String,
    variant: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ColdLabels {
    kind: &'static str,
}

/// Metrics of the recommendation service.
#[derive(Clone, Debug)]
pub struct RecommendMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<VariantLabels, Histogram>,
    errors: Family<VariantLabels, Counter>,
    prediction: Family<ModelLabels, Histogram>,
    scores: Family<ScoreLabels, Histogram>,
    cf: Family<ModelLabels, Counter>,
    cold: Family<ColdLabels, Counter>,
}

impl Default for RecommendMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
            }),
            errors: Family::default(),
            prediction: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 14))
            }),
            scores: Family::new_with_constructor(|| {
                Histogram::new([-0.5, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5])
            }),
            cf: Family::default(),
            cold: Family::default(),
        }
    }
}

impl RecommendMetrics {
    /// Registers the metrics (prefix added by the caller).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "recommend_requests",
            "Recommendation and score answers by endpoint, variant and the user's path",
            self.requests.clone(),
        );
        registry.register(
            "recommend_request_duration_seconds",
            "Time to answer a recommendation or score request",
            self.duration.clone(),
        );
        registry.register(
            "recommend_errors",
            "Recommendation and score requests that failed on the server's side, by endpoint and the user's variant",
            self.errors.clone(),
        );
        registry.register(
            "model_prediction_latency_seconds",
            "Time of the CF part of a request: the top-k scan or the candidate scores",
            self.prediction.clone(),
        );
        registry.register(
            "model_score_distribution",
            "CF scores (user_product_affinity) of returned products, by model and variant",
            self.scores.clone(),
        );
        registry.register(
            "cf_requests",
            "Answers in which collaborative filtering took part",
            self.cf.clone(),
        );
        registry.register(
            "cold_start",
            "Cold starts: new_user (no trained factors), new_product (scored through a stand-in vector)",
            self.cold.clone(),
        );
    }

    /// Records the CF part of a request.
    pub fn prediction(&self, model: &str, took: Duration) {
        self.prediction
            .get_or_create(&ModelLabels {
                model_name: model.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records a request that failed on the server's side; `variant`: the one the user is
    /// routed to, if any.
    pub fn failed(&self, endpoint: &'static str, variant: Option<Variant>) {
        self.errors
            .get_or_create(&VariantLabels {
                endpoint,
                variant: variant.map_or("none", |v| v.as_str()),
            })
            .inc();
    }

    /// Records an answer.
    pub fn answered(
        &self,
        endpoint: &'static str,
        answer: &Answer,
        source: Option<FactorSource>,
        took: Duration,
    ) {
        let variant = answer.variant.map_or("none", |v| v.as_str());
        self.requests
            .get_or_create(&RequestLabels {
                endpoint,
                variant,
                path: answer.path.as_str(),
            })
            .inc();
        self.duration
            .get_or_create(&VariantLabels { endpoint, variant })
            .observe(took.as_secs_f64());
        let model = ModelLabels {
            model_name: answer.model.clone(),
        };
        if answer.path != Path::Popularity {
            self.cf.get_or_create(&model).inc();
            let h = self.scores.get_or_create(&ScoreLabels {
                model_name: answer.model.clone(),
                variant,
            });
            for s in answer.items.iter().filter_map(|i| i.user_product_affinity) {
                h.observe(f64::from(s));
            }
        }
        if source != Some(FactorSource::Trained) {
            self.cold
                .get_or_create(&ColdLabels { kind: "new_user" })
                .inc();
        }
        let new_products = answer
            .items
            .iter()
            .filter(|i| i.path == Path::Content)
            .count();
        if new_products > 0 {
            self.cold
                .get_or_create(&ColdLabels {
                    kind: "new_product",
                })
                .inc_by(new_products as u64);
        }
    }
}
