//! The online part of the feature store (in progress).
