//! A lock-free circuit breaker on monotonic time: after `threshold` consecutive failures a
//! dependency is skipped for a cool-down; then one call probes it while the others keep
//! skipping; a failed probe doubles the cool-down (up to a maximum), a success closes it.
//!
//! Used by the online store's reader (`features/online/reader.rs`) and by user states
//! (`serving/users`).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::features::online::duration_ms;

/// What a call may do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// The circuit is closed: call.
    Closed,
    /// The cool-down is over and this call is the probe.
    Probe,
    /// The circuit is open: do not call.
    Skip,
}

/// The breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    epoch: Instant,
    threshold: u32,
    cooldown_ms: i64,
    max_cooldown_ms: i64,
    failures: AtomicU32,
    /// 0 while closed; otherwise the monotonic ms until which the dependency is skipped.
    open_until_ms: AtomicI64,
    probing: AtomicBool,
}

/// Clears the probing flag however the probe ends (cancellation included).
pub(crate) struct ProbeGuard<'a>(Option<&'a AtomicBool>);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.store(false, Ordering::Release);
        }
    }
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration, max_cooldown: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            threshold: threshold.max(1),
            cooldown_ms: duration_ms(cooldown).max(1),
            max_cooldown_ms: duration_ms(max_cooldown).max(duration_ms(cooldown)).max(1),
            failures: AtomicU32::new(0),
            open_until_ms: AtomicI64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now(&self) -> i64 {
        // +1 so that 0 always means "closed".
        duration_ms(self.epoch.elapsed()) + 1
    }

    /// Whether to call, and a guard to hold for the duration of a probe.
    pub(crate) fn gate(&self) -> (Gate, ProbeGuard<'_>) {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return (Gate::Closed, ProbeGuard(None));
        }
        if self.now() < until {
            return (Gate::Skip, ProbeGuard(None));
        }
        match self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => (Gate::Probe, ProbeGuard(Some(&self.probing))),
            Err(_) => (Gate::Skip, ProbeGuard(None)),
        }
    }

    /// Records a success; returns whether the circuit was open (and is now closed).
    pub(crate) fn success(&self) -> bool {
        self.failures.store(0, Ordering::Release);
        self.open_until_ms.swap(0, Ordering::AcqRel) != 0
    }

    /// Records a failure; returns the cool-down when the circuit opens (or a failed probe
    /// keeps it open). A call let through while the circuit was closed that fails once it is
    /// open changes nothing: under load many calls are in flight when a dependency goes down,
    /// and their failures must neither double nor extend the cool-down.
    pub(crate) fn failure(&self, probe: bool) -> Option<Duration> {
        if !probe && self.is_open() {
            return None;
        }
        let n = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if !probe {
            if n < self.threshold {
                return None;
            }
            // Of concurrent failures past the threshold, one opens the circuit.
            let until = self.now() + self.cooldown_ms;
            self.open_until_ms
                .compare_exchange(0, until, Ordering::AcqRel, Ordering::Acquire)
                .ok()?;
            self.failures.store(self.threshold, Ordering::Release);
            return Some(Duration::from_millis(self.cooldown_ms as u64));
        }
        let doublings = n.saturating_sub(self.threshold).min(16);
        let cooldown = self
            .cooldown_ms
            .saturating_mul(1i64 << doublings)
            .min(self.max_cooldown_ms);
        self.open_until_ms
            .store(self.now() + cooldown, Ordering::Release);
        Some(Duration::from_millis(cooldown as u64))
    }

    /// Whether the dependency is being skipped (or about to be probed).
    pub(crate) fn is_open(&self) -> bool {
        self.open_until_ms.load(Ordering::Acquire) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(2, Duration::from_millis(40), Duration::from_millis(100))
    }

    #[test]
    fn opens_after_threshold_probes_once_and_closes() {
        let b = breaker();
        assert_eq!(b.gate().0, Gate::Closed);
        assert_eq!(b.failure(false), None);
        assert_eq!(b.gate().0, Gate::Closed);
        assert_eq!(b.failure(false), Some(Duration::from_millis(40)));
        assert_eq!(b.gate().0, Gate::Skip);
        std::thread::sleep(Duration::from_millis(45));
        let (gate, guard) = b.gate();
        assert_eq!(gate, Gate::Probe);
        // One probe at a time; the others keep skipping.
        assert_eq!(b.gate().0, Gate::Skip);
        // A failed probe doubles the cool-down, capped.
        assert_eq!(b.failure(true), Some(Duration::from_millis(80)));
        drop(guard);
        assert_eq!(b.gate().0, Gate::Skip);
        assert_eq!(b.failure(true), Some(Duration::from_millis(100)));
        std::thread::sleep(Duration::from_millis(105));
        let (gate, guard) = b.gate();
        assert_eq!(gate, Gate::Probe);
        assert!(b.success());
        drop(guard);
        assert_eq!(b.gate().0, Gate::Closed);
        assert!(!b.is_open());
        assert!(!b.success(), "already closed");
    }

    #[test]
    fn calls_in_flight_when_it_opens_neither_double_nor_extend_the_cool_down() {
        let b = breaker();
        b.failure(false);
        assert_eq!(b.failure(false), Some(Duration::from_millis(40)));
        // Five more calls let through before it opened fail now.
        for _ in 0..5 {
            assert_eq!(b.failure(false), None);
        }
        std::thread::sleep(Duration::from_millis(45));
        let (gate, guard) = b.gate();
        assert_eq!(gate, Gate::Probe);
        // The first failed probe doubles the base cool-down once.
        assert_eq!(b.failure(true), Some(Duration::from_millis(80)));
        drop(guard);
    }

    #[test]
    fn a_cancelled_probe_does_not_wedge_the_circuit() {
        let b = breaker();
        b.failure(false);
        b.failure(false);
        std::thread::sleep(Duration::from_millis(45));
        let (gate, guard) = b.gate();
        assert_eq!(gate, Gate::Probe);
        drop(guard);
        assert_eq!(b.gate().0, Gate::Probe);
    }
}
