//! Prometheus metrics of the scorer, exposed on `/metrics` (OpenMetrics text).
//!
//! | metric | labels | what |
//! | --- | --- | --- |
//! | `feature_store_*` | | feature reads: requests, latency, values by freshness (cache hit rate), online reads, fallbacks, errors, circuit, stored keys and bytes; see `recsys_core::features::online::OnlineMetrics` |
//! | `recsys_scorer_http_requests_total` | `route`, `method`, `status` | HTTP requests answered |
//! | `recsys_scorer_http_request_duration_seconds` | `route` | HTTP latency histogram |
//! | `recsys_scorer_feature_catalog_refreshes_total` | `outcome` = `ok` \| `failed` | loads of the feature catalog from the registry |
//! | `recsys_scorer_feature_catalog_refresh_failures_total` | `kind` | failed loads, by error kind (the last catalog keeps serving) |
//! | `recsys_scorer_feature_catalog_features` | | feature versions served |
//! | `recsys_scorer_feature_catalog_last_success_timestamp_seconds` | | when the catalog was last loaded |
//!
//! Labels are bounded: `route` is the matched route template (`/v1/features/users/{id}`, or
//! `unmatched`), never a raw path; `kind` is an error's stable kind.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
    ])
}

/// Metrics of the HTTP layer (clone-cheap handles).
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    rejected: Family<ReasonLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            rejected: Family::default(),
        }
    }
}

impl HttpMetrics {
    /// Registers the metrics under `registry` (prefixed `recsys_scorer`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            self.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency, by route template",
            self.duration.clone(),
        );
        registry.register(
            "http_rejected_requests",
            "API requests refused before a handler ran, by reason: overloaded, timeout, \
             unauthenticated, forbidden, rate_limited",
            self.rejected.clone(),
        );
    }

    /// Counts a request refused for `reason` (one of a fixed set).
    pub fn rejected(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Records one answered request.
    pub fn observe(&self, route: &str, method: &str, status: u16, started: Instant) {
        self.requests
            .get_or_create(&HttpLabels {
                route: route.to_owned(),
                method: method.to_owned(),
                status,
            })
            .inc();
        self.duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Metrics of the feature catalog's refreshes (clone-cheap handles).
#[derive(Clone, Debug, Default)]
pub struct CatalogMetrics {
    refreshes: Family<OutcomeLabels, Counter>,
    failures: Family<KindLabels, Counter>,
    features: Gauge,
    last_success: Gauge,
}

impl CatalogMetrics {
    /// Registers the metrics under `registry` (prefixed `recsys_scorer`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "feature_catalog_refreshes",
            "Loads of the feature catalog from the registry, by outcome",
            self.refreshes.clone(),
        );
        registry.register(
            "feature_catalog_refresh_failures",
            "Failed loads of the feature catalog, by error kind; the last catalog keeps serving",
            self.failures.clone(),
        );
        registry.register(
            "feature_catalog_features",
            "Feature versions served",
            self.features.clone(),
        );
        registry.register(
            "feature_catalog_last_success_timestamp_seconds",
            "When the feature catalog was last loaded (Unix seconds)",
            self.last_success.clone(),
        );
    }

    pub(crate) fn success(&self, features: usize, now_ms: i64) {
        self.refreshes
            .get_or_create(&OutcomeLabels { outcome: "ok" })
            .inc();
        self.features
            .set(i64::try_from(features).unwrap_or(i64::MAX));
        self.last_success.set(now_ms / 1000);
    }

    pub(crate) fn failure(&self, kind: &'static str) {
        self.refreshes
            .get_or_create(&OutcomeLabels { outcome: "failed" })
            .inc();
        self.failures.get_or_create(&KindLabels { kind }).inc();
    }
}

/// The registry behind `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// HTTP layer.
    pub http: HttpMetrics,
}

impl Metrics {
    /// A registry holding `http`, `catalog` (prefixed `recsys_scorer`) and the feature
    /// reader's metrics (`feature_store_*`, as documented in core).
    pub fn new(
        online: &recsys_core::features::online::OnlineMetrics,
        catalog: &CatalogMetrics,
    ) -> Self {
        let mut registry = Registry::default();
        online.register(&mut registry);
        let http = HttpMetrics::default();
        let scorer = registry.sub_registry_with_prefix("recsys_scorer");
        http.register(scorer);
        catalog.register(scorer);
        Self { registry, http }
    }

    /// Registers more families: `register` gets the root registry.
    pub fn register_more(&mut self, register: &dyn Fn(&mut Registry)) {
        register(&mut self.registry);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recsys_core::features::online::OnlineMetrics;

    #[test]
    fn every_family_is_exposed_with_its_prefix() {
        let catalog = CatalogMetrics::default();
        let m = Metrics::new(&OnlineMetrics::new(), &catalog);
        catalog.success(3, 1_700_000_000_000);
        catalog.failure("RegistryPostgres");
        m.http
            .observe("/v1/features/batch", "POST", 200, Instant::now());
        let text = m.encode().expect("encode");
        for needle in [
            "recsys_scorer_feature_catalog_features 3",
            "recsys_scorer_feature_catalog_last_success_timestamp_seconds 1700000000",
            "recsys_scorer_feature_catalog_refresh_failures_total{kind=\"RegistryPostgres\"} 1",
            "recsys_scorer_feature_catalog_refreshes_total{outcome=\"ok\"} 1",
            "recsys_scorer_http_requests_total{route=\"/v1/features/batch\",method=\"POST\",status=\"200\"} 1",
            "recsys_scorer_http_request_duration_seconds_count{route=\"/v1/features/batch\"} 1",
            "feature_store_circuit_open 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
