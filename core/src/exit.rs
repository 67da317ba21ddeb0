//! Exit codes of batch jobs: the operator's pod failure policy reads them to decide whether a
//! retry can help.

/// The job succeeded.
pub const SUCCESS: i32 = 0;
/// The job failed in a way a retry may fix (a dependency was down, a timeout).
pub const RETRYABLE: i32 = 1;
/// The job failed in a way a retry cannot fix (invalid input or configuration); the run stops
/// at once instead of burning its remaining attempts.
pub const NOT_RETRYABLE: i32 = 2;
