//! The restart policy: exponential backoff, reset after a stable uptime, and a
//! crash-loop limit after which a slot is marked failed and retried later —
//! never given up for good (unlike cfork's refork limit, eggjs/egg#4538).
//!
//! [`CrashLoop`] counts a slot's unstable exits and turns them into delays.
//! Its delays follow [`RestartPolicy`]'s multiplier and symmetric jitter
//! fraction (both public settings), which `tandem_protocol::internal::Backoff` (×2, a
//! delay drawn in [cap/2, cap]) does not offer; so the delay formula stays here.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// How a dead agent or worker is restarted.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RestartPolicy {
    /// The delay before the first restart after a crash. The default is 100 ms.
    pub initial_delay: Duration,
    /// Each further consecutive crash multiplies the delay by this. The default is 2.
    pub multiplier: f64,
    /// The longest delay. The default is 15 seconds.
    pub max_delay: Duration,
    /// A process ready for this long counts as stable: its next crash starts
    /// the backoff afresh. The default is 30 seconds.
    pub stable_after: Duration,
    /// After this many consecutive unstable exits (crashes at start-up count)
    /// the slot is marked failed. The default is 10.
    pub crash_loop_limit: u32,
    /// How long a failed slot waits before one more attempt; a crash then
    /// marks it failed again, a stable run resets it. The default is 60 seconds.
    pub failed_retry: Duration,
    /// Random spread of each delay, as a fraction (0.1 = ±10 %). The default is 0.1.
    pub jitter: f64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(15),
            stable_after: Duration::from_secs(30),
            crash_loop_limit: 10,
            failed_retry: Duration::from_secs(60),
            jitter: 0.1,
        }
    }
}

/// What to do after a process died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Restart {
    /// Restart after this delay; `failures` consecutive unstable exits so far.
    After { delay: Duration, failures: u32 },
    /// Crash loop: mark the slot failed and try again after `retry_after`.
    Failed { retry_after: Duration, failures: u32 },
}

/// One slot's crash-loop state: its consecutive unstable exits, and when its
/// process became ready (a stable run resets the count).
#[derive(Debug, Clone)]
pub(crate) struct CrashLoop {
    policy: RestartPolicy,
    failures: u32,
    ready_at: Option<Instant>,
}

impl CrashLoop {
    pub(crate) fn new(policy: RestartPolicy) -> Self {
        CrashLoop { policy, failures: 0, ready_at: None }
    }

    /// A new process of the slot was spawned.
    pub(crate) fn spawned(&mut self) {
        self.ready_at = None;
    }

    /// The slot's process reported ready.
    pub(crate) fn ready(&mut self) {
        self.ready_at = Some(Instant::now());
    }

    /// Consecutive unstable exits so far.
    #[cfg(test)]
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// The slot's process died: when to restart it.
    pub(crate) fn exited(&mut self) -> Restart {
        let stable = self.ready_at.take().is_some_and(|t| t.elapsed() >= self.policy.stable_after);
        if stable {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures > self.policy.crash_loop_limit {
            let failures = self.failures;
            // Half-open: one crash after the retry marks it failed again at once.
            self.failures = self.policy.crash_loop_limit;
            return Restart::Failed { retry_after: self.policy.failed_retry, failures };
        }
        Restart::After { delay: self.delay(self.failures), failures: self.failures }
    }

    fn delay(&self, failures: u32) -> Duration {
        let p = &self.policy;
        let exp = i32::try_from(failures.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = p.initial_delay.as_secs_f64() * p.multiplier.max(1.0).powi(exp);
        let capped = base.min(p.max_delay.as_secs_f64());
        let jitter = p.jitter.clamp(0.0, 1.0);
        let factor = if jitter > 0.0 { rand::thread_rng().gen_range(1.0 - jitter..=1.0 + jitter) } else { 1.0 };
        Duration::try_from_secs_f64(capped * factor).unwrap_or(p.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_millis(1000),
            stable_after: Duration::from_secs(30),
            crash_loop_limit: 6,
            failed_retry: Duration::from_secs(60),
            jitter: 0.0,
        }
    }

    fn delay(r: Restart) -> Duration {
        match r {
            Restart::After { delay, .. } => delay,
            Restart::Failed { .. } => panic!("unexpected {r:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delays_grow_exponentially_up_to_the_cap() {
        let mut b = CrashLoop::new(policy());
        let mut delays = Vec::new();
        for _ in 0..6 {
            b.spawned();
            b.ready();
            advance(Duration::from_secs(1)).await; // short of stable
            delays.push(delay(b.exited()).as_millis());
        }
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_at_start_up_counts_as_unstable() {
        let mut b = CrashLoop::new(policy());
        b.spawned();
        advance(Duration::from_secs(3600)).await; // a long time, but never ready
        assert_eq!(delay(b.exited()), Duration::from_millis(100));
        b.spawned();
        advance(Duration::from_secs(3600)).await;
        assert_eq!(delay(b.exited()), Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stable_run_resets_the_backoff() {
        let mut b = CrashLoop::new(policy());
        for _ in 0..3 {
            b.spawned();
            b.ready();
            let _ = b.exited();
        }
        assert_eq!(b.failures(), 3);
        b.spawned();
        b.ready();
        advance(Duration::from_secs(29)).await;
        assert_eq!(delay(b.exited()), Duration::from_millis(800), "29 s is not stable yet");
        b.spawned();
        b.ready();
        advance(Duration::from_secs(30)).await;
        assert_eq!(delay(b.exited()), Duration::from_millis(100), "30 s ready is stable: back to the first delay");
        assert_eq!(b.failures(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_loop_marks_the_slot_failed_and_the_retry_is_half_open() {
        let mut b = CrashLoop::new(policy());
        for _ in 0..6 {
            b.spawned();
            assert!(matches!(b.exited(), Restart::After { .. }));
        }
        b.spawned();
        assert_eq!(b.exited(), Restart::Failed { retry_after: Duration::from_secs(60), failures: 7 });
        // The retry crashes again: failed again at once, no new round of fast restarts.
        b.spawned();
        assert_eq!(b.exited(), Restart::Failed { retry_after: Duration::from_secs(60), failures: 7 });
        // The retry runs stably: the slot is healthy again.
        b.spawned();
        b.ready();
        advance(Duration::from_secs(30)).await;
        assert_eq!(delay(b.exited()), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_stays_within_its_fraction() {
        let mut p = policy();
        p.jitter = 0.1;
        let mut b = CrashLoop::new(p);
        for _ in 0..50 {
            b.failures = 0;
            let d = delay(b.exited()).as_secs_f64();
            assert!((0.09..=0.11).contains(&d), "{d}");
        }
    }
}
