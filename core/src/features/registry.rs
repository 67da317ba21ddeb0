//! The registry part of the feature store (in progress).
