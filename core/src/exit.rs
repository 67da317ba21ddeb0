//! Exit codes of batch jobs: the operator's pod failure policy reads them to decide whether a
//! retry can help.

/// The job succeeded.
pub const SUCCESS: i32 = 0;
/// The job failed in a way a retry may fix (a dependency was down, a timeout).
pub const RETRYABLE: i32 = 1;
/// The job failed in a way a retry cannot fix (invalid input or configuration); the run stops
/// at once instead of burning its remaining attempts.
pub const NOT_RETRYABLE: i32 = 2;
/// The job's input failed a blocking data-quality check: nothing was published (no model
/// version, no online values). Distinct from a crash (1) and from bad options (2) so that
/// alerts and the operator can tell a gate that held from a job that broke; not retried, since
/// the same input fails the same way until the data is fixed.
pub const GATE_FAILED: i32 = 3;
