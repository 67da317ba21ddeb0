//! Prometheus metrics of a routing source.
//!
//! | metric | labels | what |
//! | --- | --- | --- |
//! | `routing_table_reloads_total` | `outcome` = `ok` \| `failed` | tables loaded, and changes refused |
//! | `routing_table_reload_failures_total` | `kind` ([`super::RoutingError::kind`]) | changes refused, by why (the previous table keeps serving) |
//! | `routing_table_info` | `revision` | 1 for the table serving (one series at a time) |
//! | `routing_table_loaded_timestamp_seconds` | | when the table serving was loaded |
//! | `routing_table_models` | | models routed |
//! | `routing_canary_weight_percent` | `model` | canary weight per model (0 without a canary) |
//!
//! Labels are bounded: `outcome` and `kind` are fixed sets; `revision` has one series at a
//! time (the previous one is removed on reload); `model` takes the model names of the table
//! serving, which the operator controls (a handful), never anything from a request.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::RoutingTable;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevisionLabels {
    revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

/// The metrics of a [`super::RoutingSource`] (clone-cheap handles; register once).
#[derive(Clone, Debug, Default)]
pub struct RoutingMetrics {
    reloads: Family<OutcomeLabels, Counter>,
    failures: Family<KindLabels, Counter>,
    info: Family<RevisionLabels, Gauge>,
    loaded_at: Gauge,
    models: Gauge,
    canary_weight: Family<ModelLabels, Gauge>,
}

impl RoutingMetrics {
    /// Fresh metrics, not registered anywhere.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every metric (names in the module documentation).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "routing_table_reloads",
            "Routing tables loaded (ok) and changes refused (failed)",
            self.reloads.clone(),
        );
        registry.register(
            "routing_table_reload_failures",
            "Routing table changes refused, by error kind; the previous table keeps serving",
            self.failures.clone(),
        );
        registry.register(
            "routing_table_info",
            "The routing table serving, labelled with its revision",
            self.info.clone(),
        );
        registry.register(
            "routing_table_loaded_timestamp_seconds",
            "When the routing table serving was loaded",
            self.loaded_at.clone(),
        );
        registry.register(
            "routing_table_models",
            "Models in the routing table serving",
            self.models.clone(),
        );
        registry.register(
            "routing_canary_weight_percent",
            "Percentage of users on the canary, per model",
            self.canary_weight.clone(),
        );
    }

    /// Records that `table` was loaded and now serves.
    pub fn record_loaded(&self, table: &RoutingTable) {
        self.reloads
            .get_or_create(&OutcomeLabels { outcome: "ok" })
            .inc();
        self.info.clear();
        self.info
            .get_or_create(&RevisionLabels {
                revision: table.revision().to_owned(),
            })
            .set(1);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.loaded_at.set(now);
        self.models
            .set(i64::try_from(table.len()).unwrap_or(i64::MAX));
        self.canary_weight.clear();
        for route in table.routes() {
            self.canary_weight
                .get_or_create(&ModelLabels {
                    model: route.model().to_owned(),
                })
                .set(i64::from(route.canary_weight()));
        }
    }

    /// Records a table refused for an error of kind `kind` ([`super::RoutingError::kind`]).
    pub fn record_refused(&self, kind: &'static str) {
        self.reloads
            .get_or_create(&OutcomeLabels { outcome: "failed" })
            .inc();
        self.failures.get_or_create(&KindLabels { kind }).inc();
    }
}
