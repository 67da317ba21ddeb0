//! What the scorer needs to serve several versions of a model at once, independent of HTTP.
//!
//! - [`routing`]: the routing table (stable, canary with a weight, shadow, per model), the
//!   deterministic assignment of users to variants, and the sources the table comes from (a
//!   watched file in local mode, a fixed table for tests and embedded defaults; the in-cluster
//!   source written by the operator implements the same [`routing::RoutingSource`] trait).

//! - [`fleet`]: what a scorer reports about the versions it holds (`GET /v1/status`), and
//!   what the operator concludes from every scorer pod's report.

pub mod analysis;
pub mod experiment;
pub mod fleet;
pub mod routing;
pub mod users;
