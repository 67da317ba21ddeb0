//! Collaborative filtering: interactions → confidence matrix → implicit ALS → evaluation.
//!
//! Everything here is pure computation over plain data; reading events and storing artifacts
//! sit behind the seams elsewhere in this crate.

pub mod als;
pub mod eval;
pub mod interactions;
pub mod search;
pub mod serving;
pub mod synth;
