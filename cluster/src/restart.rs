//! The restart policy: exponential backoff, reset after a stable uptime, and a
//! crash-loop limit after which a slot is marked failed and retried later —
//! never given up for good (unlike cfork's refork limit, eggjs/egg#4538).
//!
//! [`CrashLoop`] counts a slot's unstable exits and turns them into delays
//! with tandem's one backoff (`tandem_protocol::internal::Backoff`), set to
//! [`RestartPolicy`]'s multiplier and symmetric jitter fraction.

use std::time::Duration;

use tandem_protocol::internal::{Backoff, Jitter};
use tokio::time::Instant;

/// How a dead agent or worker is restarted.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RestartPolicy {
    /// The delay before the first restart after a crash (at least 1 ms). The
    /// default is 100 ms.
    pub initial_delay: Duration,
    /// Each further consecutive crash multiplies the delay by this. The default is 2.
    pub multiplier: f64,
    /// The longest delay (before jitter). The default is 15 seconds.
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

/// One slot's crash-loop state: its consecutive unstable exits, their
/// backoff, and when its process became ready (a stable run resets both).
#[derive(Debug, Clone)]
pub(crate) struct CrashLoop {
    policy: RestartPolicy,
    backoff: Backoff,
    failures: u32,
    ready_at: Option<Instant>,
}

impl CrashLoop {
    pub(crate) fn new(policy: RestartPolicy) -> Self {
        // The first delay is capped by `max_delay` too, as each later one is.
        let backoff = Backoff::new(policy.initial_delay.min(policy.max_delay), policy.max_delay)
            .multiplier(policy.multiplier)
            .jitter(Jitter::Symmetric(policy.jitter));
        CrashLoop { policy, backoff, failures: 0, ready_at: None }
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
            self.backoff.reset();
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures > self.policy.crash_loop_limit {
            let failures = self.failures;
            // Half-open: one crash after the retry marks it failed again at once.
            self.failures = self.policy.crash_loop_limit;
            return Restart::Failed { retry_after: self.policy.failed_retry, failures };
        }
        // The n-th consecutive unstable exit gets the backoff's n-th delay: a
        // Failed slot only leaves that state by a stable run, which resets it.
        Restart::After { delay: self.backoff.next_delay(), failures: self.failures }
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
        for _ in 0..50 {
            let mut b = CrashLoop::new(p.clone());
            let d = delay(b.exited()).as_secs_f64();
            assert!((0.09..=0.11).contains(&d), "{d}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_spreads_every_delay_of_the_growth_around_its_cap() {
        let p = RestartPolicy { jitter: 0.1, ..policy() };
        let mut spread = false;
        for _ in 0..20 {
            let mut b = CrashLoop::new(p.clone());
            for cap in [100.0, 200.0, 400.0, 800.0, 1000.0, 1000.0] {
                let d = delay(b.exited()).as_secs_f64() * 1000.0;
                assert!((cap * 0.9..=cap * 1.1).contains(&d), "{d} ms outside ±10 % of {cap} ms");
                spread |= (d - cap).abs() > 1.0;
            }
        }
        assert!(spread, "120 jittered delays all within 1 ms of their cap");
    }

    #[tokio::test(start_paused = true)]
    async fn the_policy_multiplier_sets_the_growth() {
        let p = RestartPolicy { multiplier: 3.0, max_delay: Duration::from_secs(5), ..policy() };
        let mut b = CrashLoop::new(p);
        let delays: Vec<u128> = (0..5).map(|_| delay(b.exited()).as_millis()).collect();
        assert_eq!(delays, vec![100, 300, 900, 2700, 5000]);

        // Below 1 the delay stays at the first one (as it always did).
        let mut b = CrashLoop::new(RestartPolicy { multiplier: 0.5, ..policy() });
        let delays: Vec<u128> = (0..3).map(|_| delay(b.exited()).as_millis()).collect();
        assert_eq!(delays, vec![100, 100, 100]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_max_delay_below_the_first_delay_caps_it() {
        let p = RestartPolicy {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_millis(200),
            ..policy()
        };
        let mut b = CrashLoop::new(p);
        assert_eq!(delay(b.exited()), Duration::from_millis(200));
        assert_eq!(delay(b.exited()), Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_crash_loop_a_stable_run_starts_the_growth_afresh() {
        let mut b = CrashLoop::new(policy());
        for _ in 0..7 {
            b.spawned();
            let _ = b.exited();
        }
        b.spawned();
        b.ready();
        advance(Duration::from_secs(30)).await;
        let mut delays = vec![delay(b.exited()).as_millis()];
        for _ in 0..2 {
            b.spawned();
            delays.push(delay(b.exited()).as_millis());
        }
        assert_eq!(delays, vec![100, 200, 400]);
    }
}
