//! Exponential backoff with jitter, for every retry loop in tandem: the
//! reconnect loops, the leader's upstream retries, etcd failover, presence,
//! and the cluster's crash-loop restarts.

use std::time::Duration;

use rand::Rng;

/// How a [`Backoff`] spreads each delay around its current cap, so that
/// processes that lost the same peer do not retry in lock step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    /// A delay drawn in `[cap/2, cap]`: never above the cap. The default.
    Half,
    /// A delay drawn in `[cap·(1−f), cap·(1+f)]`, `f` a fraction clamped to
    /// `[0, 1]` (0.1 = ±10 %; 0 = no jitter, the delay is the cap). The
    /// delay may exceed the cap (and `max`) by `f`.
    Symmetric(f64),
}

/// Delays for successive attempts: a delay around `cap` (see [`Jitter`]),
/// where `cap` starts at `initial` and is multiplied by the multiplier after
/// each delay, up to `max`.
///
/// `Backoff::new(initial, max)` doubles with [`Jitter::Half`]; the cluster's
/// restart policy sets its own multiplier and a [`Jitter::Symmetric`] spread:
///
/// ```
/// # use std::time::Duration;
/// # use tandem_protocol::internal::{Backoff, Jitter};
/// let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(15))
///     .multiplier(3.0)
///     .jitter(Jitter::Symmetric(0.0));
/// assert_eq!(backoff.next_delay(), Duration::from_millis(100));
/// assert_eq!(backoff.next_delay(), Duration::from_millis(300));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    cap: Duration,
    multiplier: f64,
    jitter: Jitter,
}

impl Backoff {
    /// Doubling from `initial` (at least 1 ms) to `max` (at least `initial`),
    /// each delay drawn in `[cap/2, cap]`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Backoff { initial, max: max.max(initial), cap: initial, multiplier: 2.0, jitter: Jitter::Half }
    }

    /// Multiplies the cap by `multiplier` after each delay instead of 2. Below
    /// 1 (or not a number) it is 1: the delays stay at `initial`.
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier.max(1.0);
        self
    }

    /// Spreads each delay this way instead of [`Jitter::Half`].
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = match jitter {
            Jitter::Symmetric(f) if f.is_nan() => Jitter::Symmetric(0.0),
            Jitter::Symmetric(f) => Jitter::Symmetric(f.clamp(0.0, 1.0)),
            Jitter::Half => Jitter::Half,
        };
        self
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap;
        self.cap = scale(cap, self.multiplier).min(self.max);
        match self.jitter {
            Jitter::Half => {
                let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
                Duration::from_nanos(rand::thread_rng().gen_range(nanos / 2..=nanos))
            }
            Jitter::Symmetric(f) if f > 0.0 => scale(cap, rand::thread_rng().gen_range(1.0 - f..=1.0 + f)),
            Jitter::Symmetric(_) => cap,
        }
    }

    /// Back to the first delay (after a successful connection, a stable run).
    pub fn reset(&mut self) {
        self.cap = self.initial;
    }
}

/// `d × factor` to the nearest nanosecond, saturating at `Duration::MAX`;
/// a negative or NaN product is zero. Exact for the whole factors of the
/// delays used (below 2^53 ns, 104 days), so a doubling backoff never drifts
/// by a nanosecond.
fn scale(d: Duration, factor: f64) -> Duration {
    let nanos = (d.as_nanos() as f64 * factor).round();
    if nanos.is_nan() || nanos <= 0.0 {
        Duration::ZERO
    } else if nanos < u64::MAX as f64 {
        Duration::from_nanos(nanos as u64)
    } else {
        Duration::try_from_secs_f64(nanos / 1e9).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

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

    #[test]
    fn half_jitter_draws_over_the_whole_lower_half() {
        // 200 draws in [50, 100] ms: both ends of the range are reached
        // within 10 % (the chance of missing one is below 1e-9).
        let delays: Vec<Duration> = (0..200)
            .map(|_| Backoff::new(100 * MS, 100 * MS).next_delay())
            .inspect(|d| assert!((50 * MS..=100 * MS).contains(d), "{d:?}"))
            .collect();
        assert!(delays.iter().any(|d| *d < 55 * MS), "no delay near cap/2");
        assert!(delays.iter().any(|d| *d > 95 * MS), "no delay near the cap");
    }

    #[test]
    fn a_multiplier_without_jitter_gives_exact_delays_up_to_max() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS).multiplier(2.0).jitter(Jitter::Symmetric(0.0));
        let delays: Vec<u128> = (0..6).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);

        let mut backoff = Backoff::new(100 * MS, 10_000 * MS).multiplier(1.5).jitter(Jitter::Symmetric(0.0));
        let delays: Vec<Duration> = (0..4).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays, [100 * MS, 150 * MS, 225 * MS, Duration::from_micros(337_500)]);
    }

    #[test]
    fn a_multiplier_below_one_or_not_a_number_keeps_the_first_delay() {
        for m in [0.5, 0.0, -3.0, f64::NAN] {
            let mut backoff = Backoff::new(100 * MS, 1000 * MS).multiplier(m).jitter(Jitter::Symmetric(0.0));
            let delays: Vec<Duration> = (0..4).map(|_| backoff.next_delay()).collect();
            assert_eq!(delays, [100 * MS; 4], "multiplier {m}");
        }
    }

    #[test]
    fn symmetric_jitter_stays_within_its_fraction_of_the_cap() {
        let mut backoff = Backoff::new(100 * MS, 400 * MS).jitter(Jitter::Symmetric(0.1));
        for cap in [100, 200, 400, 400, 400] {
            let d = backoff.next_delay();
            let (low, high) = (cap * 9 / 10, cap * 11 / 10);
            assert!((low * MS..=high * MS).contains(&d), "{d:?} outside [{low}, {high}] ms");
        }
        // Spread: 200 draws around 100 ms do not all land on one value.
        let draws: Vec<Duration> =
            (0..200).map(|_| Backoff::new(100 * MS, 100 * MS).jitter(Jitter::Symmetric(0.1)).next_delay()).collect();
        assert!(draws.iter().any(|d| *d < 98 * MS) && draws.iter().any(|d| *d > 102 * MS), "no spread");
    }

    #[test]
    fn symmetric_jitter_is_clamped_to_a_whole_cap() {
        for f in [5.0, f64::INFINITY] {
            for _ in 0..50 {
                let d = Backoff::new(100 * MS, 100 * MS).jitter(Jitter::Symmetric(f)).next_delay();
                assert!(d <= 200 * MS, "fraction {f}: {d:?} above twice the cap");
            }
        }
        for f in [-1.0, f64::NAN] {
            let d = Backoff::new(100 * MS, 100 * MS).jitter(Jitter::Symmetric(f)).next_delay();
            assert_eq!(d, 100 * MS, "fraction {f} is no jitter");
        }
    }

    #[test]
    fn reset_returns_to_the_first_delay_whatever_the_multiplier() {
        let mut backoff = Backoff::new(10 * MS, 10_000 * MS).multiplier(10.0).jitter(Jitter::Symmetric(0.0));
        assert_eq!([backoff.next_delay(), backoff.next_delay(), backoff.next_delay()], [10 * MS, 100 * MS, 1000 * MS]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), 10 * MS);
        assert_eq!(backoff.next_delay(), 100 * MS);
    }

    #[test]
    fn huge_caps_saturate_instead_of_overflowing() {
        let max = Duration::from_secs(u64::MAX);
        let mut backoff =
            Backoff::new(Duration::from_secs(1 << 40), max).multiplier(1e12).jitter(Jitter::Symmetric(0.5));
        for _ in 0..5 {
            let d = backoff.next_delay();
            assert!(d >= Duration::from_secs(1 << 39), "{d:?}");
        }
        let mut doubling = Backoff::new(Duration::from_secs(1 << 40), max);
        for _ in 0..100 {
            doubling.next_delay();
        }
    }

    #[test]
    fn the_first_delay_is_at_least_a_millisecond_and_max_at_least_the_first() {
        let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO).jitter(Jitter::Symmetric(0.0));
        assert_eq!([backoff.next_delay(), backoff.next_delay()], [MS, MS]);
        let mut backoff = Backoff::new(50 * MS, 10 * MS).jitter(Jitter::Symmetric(0.0));
        assert_eq!([backoff.next_delay(), backoff.next_delay()], [50 * MS, 50 * MS]);
    }
}
