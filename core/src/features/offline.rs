//! The offline part of the feature store (in progress).
