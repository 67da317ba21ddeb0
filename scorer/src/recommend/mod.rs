//! Recommendations and scores: the paths (CF, fold-in, blend, popularity, content), the
//! ranking that combines CF with the feature store, and the HTTP handlers.

pub mod cluster_routing;
pub mod experiments;
pub mod metrics;
pub mod rank;
pub mod routes;
pub mod service;
pub mod setup;
pub mod shadow;
