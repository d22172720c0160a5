//! CLOCK_MONOTONIC in nanoseconds: one clock shared by every process on the
//! host, so a timestamp taken by the publisher can be compared with one taken
//! by a follower, and every process can agree on a measurement window.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Nanoseconds in a millisecond.
pub const NS_PER_MS: u64 = 1_000_000;

/// Now, in nanoseconds on CLOCK_MONOTONIC.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec owned by this frame, and
    // CLOCK_MONOTONIC exists on every Linux kernel, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Sleeps until the monotonic clock reads `at` (returns at once if it already does).
pub async fn sleep_until_ns(at: u64) {
    let now = mono_ns();
    if at > now {
        tokio::time::sleep(Duration::from_nanos(at - now)).await;
    }
}

/// A measurement window on CLOCK_MONOTONIC, the same for every process of a phase.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Window {
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Window {
    /// A window opening `delay` from now and lasting `length`.
    pub fn starting_in(delay: Duration, length: Duration) -> Window {
        let start_ns = mono_ns() + delay.as_nanos() as u64;
        Window { start_ns, end_ns: start_ns + length.as_nanos() as u64 }
    }

    pub fn contains(&self, t: u64) -> bool {
        (self.start_ns..self.end_ns).contains(&t)
    }

    pub fn seconds(&self) -> f64 {
        (self.end_ns - self.start_ns) as f64 / 1e9
    }

    /// The middle of the window (when memory is sampled under load).
    pub fn middle_ns(&self) -> u64 {
        self.start_ns + (self.end_ns - self.start_ns) / 2
    }
}
