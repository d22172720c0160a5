//! Exponential backoff with jitter, for every reconnect loop in tandem.

use std::time::Duration;

use rand::Rng;

/// Delays for successive reconnect attempts: a random delay in `[cap/2, cap]` where
/// `cap` doubles from `initial` to `max` (jittered, so processes that lost the
/// same peer do not retry in lock step).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Backoff { initial, max: max.max(initial), cap: initial }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap;
        self.cap = (self.cap * 2).min(self.max);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::thread_rng().gen_range(nanos / 2..=nanos))
    }

    /// Back to the first delay (after a successful connection).
    pub fn reset(&mut self) {
        self.cap = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let caps = [10, 20, 40, 80, 80, 80];
        for cap in caps {
            let delay = backoff.next_delay();
            assert!(delay <= Duration::from_millis(cap), "{delay:?} > {cap} ms");
            assert!(delay >= Duration::from_millis(cap) / 2, "{delay:?} < half of {cap} ms");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(10));
    }
}
