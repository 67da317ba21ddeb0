//! The A/B readout on the scorer's side ([`recsys_core::serving::experiment`] has the model):
//!
//! - every answer of a model with a canary is an impression, queued and written to the
//!   experiment store off the request path (a full queue drops it and counts the drop, so a
//!   slow Redis never slows a recommendation);
//! - `POST /v1/events` attributes clicks, carts and purchases to the impressions they followed,
//!   after the events are stored; an unreachable store is logged and counted, never an error of
//!   the ingestion;
//! - `GET /v1/experiments?model=` gives each segment's readout, newest first. The operator
//!   reads it into the ModelDeployment's status.
//!
//! | metric | labels | what |
//! | --- | --- | --- |
//! | `recommend_impressions_total` | model_name, variant | lists served while a canary took users |
//! | `recommend_attributions_total` | model_name, variant, event_type | outcomes attributed to an impression (each impression once per type) |
//! | `recommend_impressions_dropped_total` | reason | impressions not recorded: `queue_full`, `store_error` |
//! | `recommend_attribution_errors_total` | | ingestion batches whose attribution failed (the store was unreachable) |

use std::sync::Arc;
use std::time::Duration;

use crate::features::http::ApiError;
use axum::Json;
use axum::extract::{RawQuery, State};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use recsys_core::events::EventRow;
use recsys_core::serving::experiment::{
    ExperimentStore, ExperimentsAnswer, Impression, Readout, Segment, attribute_events, readout,
};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use super::routes::RecommendState;
use super::service::Answer;
use crate::features::routes::HttpError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VariantLabels {
    model_name: String,
    variant: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    model_name: String,
    variant: &'static str,
    event_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// Metrics of impressions and attribution.
#[derive(Clone, Debug, Default)]
pub struct ExperimentMetrics {
    impressions: Family<VariantLabels, Counter>,
    attributions: Family<OutcomeLabels, Counter>,
    dropped: Family<DropLabels, Counter>,
    attribution_errors: Counter,
}

impl ExperimentMetrics {
    /// Registers the metrics.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "recommend_impressions",
            "Lists served while a canary took users, by model and variant",
            self.impressions.clone(),
        );
        registry.register(
            "recommend_attributions",
            "Clicks, carts and purchases attributed to a served list, by model, variant and event type",
            self.attributions.clone(),
        );
        registry.register(
            "recommend_impressions_dropped",
            "Impressions not recorded, by reason",
            self.dropped.clone(),
        );
        registry.register(
            "recommend_attribution_errors",
            "Event batches whose attribution failed because the experiment store was unreachable",
            self.attribution_errors.clone(),
        );
    }

    fn dropped(&self, reason: &'static str) {
        self.dropped.get_or_create(&DropLabels { reason }).inc();
    }
}

/// Impressions, attribution and readouts of a scorer.
#[derive(Debug)]
pub struct Experiments {
    store: Arc<dyn ExperimentStore>,
    window: Duration,
    queue: mpsc::Sender<Impression>,
    metrics: ExperimentMetrics,
}

impl Experiments {
    /// Starts the writer of impressions (`queue` of them at most in flight).
    pub fn start(
        store: Arc<dyn ExperimentStore>,
        window: Duration,
        queue: usize,
        metrics: ExperimentMetrics,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Impression>(queue.max(1));
        let writer = {
            let (store, metrics) = (store.clone(), metrics.clone());
            tokio::spawn(async move {
                let mut failing = false;
                while let Some(imp) = rx.recv().await {
                    match store.record(&imp).await {
                        Ok(()) => failing = false,
                        Err(e) => {
                            metrics.dropped("store_error");
                            if !failing {
                                warn!(error = %e, backend = store.backend(), "impressions are not being recorded; the A/B readout will miss them");
                            }
                            failing = true;
                        }
                    }
                }
            })
        };
        (
            Arc::new(Self {
                store,
                window,
                queue: tx,
                metrics,
            }),
            writer,
        )
    }

    /// The attribution window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Records `answer` as an impression of `segment` (when the model runs one).
    pub fn served(&self, answer: &Answer, segment: Option<&Segment>) {
        let (Some(segment), Some(variant)) = (segment, answer.variant) else {
            return;
        };
        if answer.items.is_empty() {
            return;
        }
        let imp = Impression {
            request_id: answer.request_id.clone(),
            user_id: answer.user_id.clone(),
            segment: segment.clone(),
            variant,
            products: answer.items.iter().map(|i| i.product_id.clone()).collect(),
            at_ms: recsys_core::features::online::now_ms(),
        };
        match self.queue.try_send(imp) {
            Ok(()) => {
                self.metrics
                    .impressions
                    .get_or_create(&VariantLabels {
                        model_name: segment.model.clone(),
                        variant: variant.as_str(),
                    })
                    .inc();
            }
            Err(_) => self.metrics.dropped("queue_full"),
        }
    }

    /// Attributes the outcomes among stored `rows`; a failure is logged and counted.
    pub async fn attribute(&self, rows: &[EventRow]) {
        let now = recsys_core::features::online::now_ms();
        match attribute_events(self.store.as_ref(), rows, self.window, now).await {
            Ok(a) => {
                for (model, variant, outcome) in a.counted {
                    self.metrics
                        .attributions
                        .get_or_create(&OutcomeLabels {
                            model_name: model,
                            variant: variant.as_str(),
                            event_type: outcome.as_str(),
                        })
                        .inc();
                }
            }
            Err(e) => {
                self.metrics.attribution_errors.inc();
                warn!(error = %e, "events stored but not attributed to impressions");
            }
        }
    }

    /// The readouts of `model`'s segments, newest first.
    pub async fn readouts(&self, model: &str) -> Result<Vec<Readout>, ApiError> {
        let segments = self
            .store
            .segments(model)
            .await
            .map_err(|e| ApiError::unavailable("ExperimentStoreUnavailable", e.to_string()))?;
        Ok(segments.iter().map(readout).collect())
    }
}

/// The A/B readout of each segment of a model: impressions, CTR and conversion per variant,
/// the two-proportion tests and the sample-ratio check.
#[utoipa::path(get, path = "/v1/experiments", tag = "recommendations",
    params(("model" = Option<String>, Query, description = "the model (default the scorer's)")),
    responses((status = 200, body = ExperimentsAnswer), (status = 400, body = ApiError),
        (status = 503, body = ApiError)))]
pub async fn experiments(
    State(s): State<RecommendState>,
    RawQuery(query): RawQuery,
) -> Result<Json<ExperimentsAnswer>, HttpError> {
    let mut model = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "model" if model.is_none() => model = Some(v.into_owned()),
            "model" => {
                return Err(ApiError::bad_request(
                    "InvalidQuery",
                    "parameter \"model\" is given twice",
                )
                .into());
            }
            other => {
                return Err(ApiError::bad_request(
                    "InvalidQuery",
                    format!("unknown parameter {other:?}; the only parameter is model"),
                )
                .into());
            }
        }
    }
    let Some(x) = s.recommender.experiments() else {
        return Err(ApiError::new(
            404,
            "ExperimentsOff",
            "this scorer records no impressions, so it has no A/B readout",
        )
        .into());
    };
    let model = model.unwrap_or_else(|| s.recommender.options().default_model.clone());
    let segments = x.readouts(&model).await?;
    Ok(Json(ExperimentsAnswer {
        model,
        attribution_window_seconds: x.window().as_secs(),
        segments,
    }))
}
