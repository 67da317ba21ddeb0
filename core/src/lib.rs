//! Domain types and storage seams shared by the recsys binaries.
//!
//! Nothing here knows about Kubernetes or HTTP. Each seam has an embedded default that needs
//! no server and a production implementation; this first version carries the production
//! clients' connection settings (Postgres, Redis, S3) and the telemetry every binary shares.

pub mod artifacts;
pub(crate) mod breaker;
pub mod cf;
pub mod events;
pub mod exit;
pub mod features;
pub mod quality;
pub mod runs;
pub mod serving;
pub mod stats;
pub mod stores;
pub mod telemetry;
