//! The master's one timer queue: every deadline (start, stop, drain, restart,
//! the periodic samples) is an entry keyed by when it fires, and the master's
//! loop awaits the earliest. No task per timer: a timer is a map entry, and
//! one `Sleep`, reset only when the earliest deadline changes, wakes the loop.
//!
//! Timers are not cancelled: a state machine that no longer wants one ignores
//! it when it fires (each carries the id or key it was armed for).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Deadlines in the order they fire; two at the same instant fire in the
/// order they were armed.
#[derive(Debug)]
pub(crate) struct TimerQueue<T> {
    queue: BTreeMap<(Instant, u64), T>,
    seq: u64,
    sleep: Pin<Box<Sleep>>,
    /// The deadline `sleep` is set to, while it has not fired.
    armed: Option<Instant>,
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        TimerQueue { queue: BTreeMap::new(), seq: 0, sleep: Box::pin(tokio::time::sleep(Duration::ZERO)), armed: None }
    }
}

impl<T> TimerQueue<T> {
    /// Arms `timer` to fire `delay` from now.
    pub(crate) fn after(&mut self, delay: Duration, timer: T) {
        let at = Instant::now().checked_add(delay).unwrap_or_else(far_future);
        self.seq += 1;
        self.queue.insert((at, self.seq), timer);
    }

    /// How many timers are armed.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// The next timer to fire, when it is due. Never resolves while the
    /// queue is empty. Cancel-safe: a timer is removed only when returned.
    pub(crate) async fn next(&mut self) -> T {
        loop {
            let Some((&(at, _), _)) = self.queue.first_key_value() else {
                return std::future::pending().await;
            };
            if self.armed != Some(at) {
                self.sleep.as_mut().reset(at);
                self.armed = Some(at);
            }
            self.sleep.as_mut().await;
            self.armed = None;
            if let Some(entry) = self.queue.first_entry()
                && entry.key().0 <= Instant::now()
            {
                return entry.remove();
            }
        }
    }
}

/// About 30 years ahead: a deadline that does not fire in a process's life.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365 * 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn timers_fire_in_deadline_order_and_ties_in_arming_order() {
        let mut q = TimerQueue::default();
        let start = Instant::now();
        q.after(Duration::from_millis(300), "c");
        q.after(Duration::from_millis(100), "a");
        q.after(Duration::from_millis(200), "b1");
        q.after(Duration::from_millis(200), "b2");
        let mut fired = Vec::new();
        for _ in 0..4 {
            let t = tokio::time::timeout(TEST_TIMEOUT, q.next()).await.unwrap();
            fired.push((t, start.elapsed().as_millis()));
        }
        assert_eq!(fired, vec![("a", 100), ("b1", 200), ("b2", 200), ("c", 300)]);
        assert_eq!(q.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_timer_armed_while_waiting_fires_first() {
        let mut q = TimerQueue::default();
        let start = Instant::now();
        q.after(Duration::from_secs(5), "late");
        // The wait is dropped (the loop handled another input), then an earlier timer comes.
        assert!(tokio::time::timeout(Duration::from_secs(1), q.next()).await.is_err());
        q.after(Duration::from_secs(1), "early");
        assert_eq!(tokio::time::timeout(TEST_TIMEOUT, q.next()).await.unwrap(), "early");
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(tokio::time::timeout(TEST_TIMEOUT, q.next()).await.unwrap(), "late");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_queue_never_fires() {
        let mut q: TimerQueue<()> = TimerQueue::default();
        assert!(tokio::time::timeout(Duration::from_secs(3600), q.next()).await.is_err());
    }
}
