//! What tandem's servers (the Leader's socket, the bundled registry) do when
//! `accept` fails, and how they keep repeated warnings from flooding the log.
//!
//! Out of file descriptors (`EMFILE`, `ENFILE`) or kernel memory (`ENOBUFS`,
//! `ENOMEM`), `accept` fails at once for as long as the condition lasts, while
//! the pending connection stays in the listen backlog: a loop that retries at
//! once spins, and one that logs every failure floods the log. [`AcceptErrors`]
//! logs the first failure at WARN, then at most one line every
//! [`WARN_EVERY`] (with the count of failures in between), and asks the loop to
//! pause with a backoff that grows from [`ACCEPT_BACKOFF_MIN`] to
//! [`ACCEPT_BACKOFF_MAX`]; existing connections keep being served meanwhile.
//! A failure that concerns only the connection being accepted (the peer reset
//! it before `accept` returned, say) is logged at DEBUG and costs no pause.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::{Backoff, Jitter};

/// How often a repeated warning is logged at most (the first one always is).
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// The first pause after an `accept` that failed for lack of resources.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// The longest pause between two `accept` attempts while resources lack.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Rate-limits a repeated log line: the first occurrence passes, then at most
/// one per period, which reports how many were held back.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// A throttle letting one occurrence through per `every`.
    pub fn new(every: Duration) -> Self {
        Throttle { every, last: None, suppressed: 0 }
    }

    /// Records one occurrence. `Some(n)` means: log it now, and say that `n`
    /// more occurred (and were not logged) since the last line.
    pub fn hit(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

impl Default for Throttle {
    /// One line per [`WARN_EVERY`].
    fn default() -> Self {
        Throttle::new(WARN_EVERY)
    }
}

/// Tracks a listener's failed `accept`s: logs them (rate-limited) and says how
/// long to pause before the next attempt.
///
/// ```no_run
/// # async fn demo(listener: tokio::net::TcpListener) {
/// let mut errors = tandem_protocol::internal::AcceptErrors::new("registry");
/// loop {
///     match listener.accept().await {
///         Ok((stream, _)) => {
///             errors.succeeded();
///             // serve `stream`
///         }
///         Err(error) => tokio::time::sleep(errors.failed(&error)).await,
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct AcceptErrors {
    listener: &'static str,
    throttle: Throttle,
    /// Exact doubling from the minimum to the maximum (no jitter: one listener's pauses).
    backoff: Backoff,
    /// Failures since the last successful accept.
    failures: u64,
}

impl AcceptErrors {
    /// Tracks the accept errors of `listener` (a name for the log).
    pub fn new(listener: &'static str) -> Self {
        let backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX).jitter(Jitter::Symmetric(0.0));
        AcceptErrors { listener, throttle: Throttle::default(), backoff, failures: 0 }
    }

    /// Logs a failed `accept` and returns how long to wait before the next one:
    /// zero when the error concerns only the connection being accepted, a
    /// growing backoff otherwise.
    pub fn failed(&mut self, error: &io::Error) -> Duration {
        if is_connection_error(error) {
            tracing::debug!(listener = self.listener, %error, "a connection failed before it was accepted");
            return Duration::ZERO;
        }
        self.failures += 1;
        let pause = self.backoff.next_delay();
        if let Some(suppressed) = self.throttle.hit() {
            let cause = if is_resource_exhaustion(error) {
                "out of file descriptors or kernel memory: new connections wait in the backlog; existing ones are still served"
            } else {
                "new connections wait in the backlog; existing ones are still served"
            };
            tracing::warn!(
                listener = self.listener,
                %error,
                failures = self.failures,
                suppressed,
                backoff_ms = pause.as_millis() as u64,
                "accept failed: {cause}"
            );
        }
        pause
    }

    /// Records a successful `accept`: the backoff starts over, and if accepts
    /// had been failing, the recovery is logged.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(listener = self.listener, failures = self.failures, "accepting connections again");
            self.failures = 0;
            self.backoff.reset();
        }
    }
}

/// Whether `error` means the process or the system ran out of file
/// descriptors or kernel memory (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`).
pub fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Whether `error` concerns only the connection being accepted: the listener
/// itself is fine and the next `accept` may succeed at once.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || matches!(error.raw_os_error(), Some(libc::EPROTO | libc::EPERM | libc::ENONET | libc::EHOSTUNREACH))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_lets_one_through_per_period_and_counts_the_rest() {
        let mut throttle = Throttle::new(Duration::from_secs(10));
        assert_eq!(throttle.hit(), Some(0));
        assert_eq!(throttle.hit(), None);
        assert_eq!(throttle.hit(), None);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(throttle.hit(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(throttle.hit(), Some(3));
        assert_eq!(throttle.hit(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn resource_exhaustion_backs_off_up_to_the_maximum_and_resets_on_success() {
        let mut errors = AcceptErrors::new("test");
        let pauses: Vec<Duration> = (0..10).map(|_| errors.failed(&emfile())).collect();
        assert_eq!(pauses[0], ACCEPT_BACKOFF_MIN);
        assert_eq!(pauses[1], ACCEPT_BACKOFF_MIN * 2);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        assert_eq!(pauses[9], ACCEPT_BACKOFF_MAX);
        assert_eq!(errors.failures, 10);
        errors.succeeded();
        assert_eq!(errors.failures, 0);
        assert_eq!(errors.failed(&emfile()), ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn errors_of_one_connection_cost_no_pause() {
        let mut errors = AcceptErrors::new("test");
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(errors.failed(&aborted), Duration::ZERO);
        assert_eq!(errors.failed(&io::Error::from_raw_os_error(libc::EPROTO)), Duration::ZERO);
        assert_eq!(errors.failures, 0);
        assert!(is_resource_exhaustion(&emfile()));
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(libc::ENOBUFS)));
        assert!(!is_resource_exhaustion(&aborted));
    }
}
