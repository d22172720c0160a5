//! Fencing: a leader that another process may replace while it cannot run.
//!
//! A leader stopped by `SIGSTOP`, a debugger or a frozen VM still holds its
//! election lock and its upstream connection; its followers give it up after
//! their `peer_timeout` and one of them takes its place at a higher epoch.
//! When the old leader runs again it must not serve a single frame at its old
//! epoch: it steps down at once, and its upstream connection goes with it.
//!
//! ```text
//! watch task: every FENCE_CHECK_INTERVAL: still_leader()? ── no ──> fenced: cancel the leader
//! each follower's writer, before each batch ──┐
//! each follower's reader, before each burst ──┴─> admits(now): the watch ran within
//!                                                  FENCE_PAUSE? yes: serve. no (this process
//!                                                  was paused): still_leader() now, before serving
//! ```
//!
//! The check itself is the caller's (the standalone election compares its lock
//! file and stored epoch); a leader built without one serves unconditionally
//! and pays nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often a fenced leader checks that it still holds its place. The
/// check is a `stat` or two; 100 ms bounds how long a leader replaced while it
/// kept running (a false verdict of its followers) serves on.
pub const FENCE_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// A gap this long since the last check means this process did not run for a
/// while (or was starved): the next frame waits for a check of its own.
const FENCE_PAUSE: Duration = Duration::from_millis(500);

/// Whether a leader may still serve, checked by its watch task and, after a
/// pause, before anything is read from or written to a follower.
pub(crate) struct Fence {
    still_leader: Box<dyn Fn() -> bool + Send + Sync>,
    origin: Instant,
    /// When the last check passed, in microseconds since `origin`.
    checked_us: AtomicU64,
    fenced: AtomicBool,
    /// The leader's own token: cancelled once fenced.
    cancel: CancellationToken,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence").field("fenced", &self.fenced.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Fence {
    pub(crate) fn new(still_leader: Box<dyn Fn() -> bool + Send + Sync>, cancel: CancellationToken) -> Self {
        Fence {
            still_leader,
            origin: Instant::now(),
            checked_us: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            cancel,
        }
    }

    fn since_origin(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_micros()).unwrap_or(u64::MAX)
    }

    /// Whether the leader was fenced.
    pub(crate) fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Runs the check now; on failure the leader is fenced (and cancelled).
    pub(crate) fn check(&self, epoch: u64) -> bool {
        if self.is_fenced() {
            return false;
        }
        let now = Instant::now();
        if (self.still_leader)() {
            self.checked_us.fetch_max(self.since_origin(now), Ordering::AcqRel);
            return true;
        }
        if !self.fenced.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                epoch,
                "another process took over this leader's place (it was given up for hung); \
                 stepping down: no frame is served at this epoch, the upstream connection is closed"
            );
            self.cancel.cancel();
        }
        false
    }

    /// Whether a frame may be served now: at once when the watch task
    /// checked recently, else (this process was paused or starved) after a
    /// check of its own.
    pub(crate) fn admits(&self, epoch: u64) -> bool {
        self.admits_at(Instant::now(), epoch)
    }

    fn admits_at(&self, now: Instant, epoch: u64) -> bool {
        if self.is_fenced() {
            return false;
        }
        let checked = self.checked_us.load(Ordering::Acquire);
        let pause = u64::try_from(FENCE_PAUSE.as_micros()).unwrap_or(u64::MAX);
        if self.since_origin(now).saturating_sub(checked) < pause {
            return true;
        }
        self.check(epoch)
    }

    /// Checks every [`FENCE_CHECK_INTERVAL`] until fenced or the leader stops.
    pub(crate) async fn watch(&self, epoch: u64) {
        let mut ticker = tokio::time::interval(FENCE_CHECK_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = ticker.tick() => {
                    if !self.check(epoch) {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn fence(holds: Arc<AtomicBool>) -> (Fence, CancellationToken) {
        let cancel = CancellationToken::new();
        (Fence::new(Box::new(move || holds.load(Ordering::SeqCst)), cancel.clone()), cancel)
    }

    #[test]
    fn a_recent_check_admits_without_checking_again() {
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let fence = Fence::new(
            Box::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                true
            }),
            CancellationToken::new(),
        );
        assert!(fence.check(1));
        let now = Instant::now();
        for _ in 0..100 {
            assert!(fence.admits_at(now, 1));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no check while the last one is recent");
        // Past the pause bound, the next frame checks first.
        assert!(fence.admits_at(now + FENCE_PAUSE + Duration::from_millis(1), 1));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn after_a_pause_a_lost_place_fences_before_anything_is_served() {
        let holds = Arc::new(AtomicBool::new(true));
        let (fence, cancel) = fence(holds.clone());
        assert!(fence.check(7));
        let now = Instant::now();
        holds.store(false, Ordering::SeqCst);
        // Within the pause bound the watch task is trusted to catch it...
        assert!(fence.admits_at(now, 7));
        // ...after it, the frame itself finds out, and nothing more is admitted.
        assert!(!fence.admits_at(now + FENCE_PAUSE * 2, 7));
        assert!(fence.is_fenced() && cancel.is_cancelled());
        holds.store(true, Ordering::SeqCst);
        assert!(!fence.admits_at(now, 7), "fenced for good");
        assert!(!fence.check(7));
    }

    #[tokio::test(start_paused = true)]
    async fn the_watch_fences_a_leader_that_lost_its_place_while_running() {
        let holds = Arc::new(AtomicBool::new(true));
        let (fence, cancel) = fence(holds.clone());
        let fence = Arc::new(fence);
        let watch = tokio::spawn({
            let fence = fence.clone();
            async move { fence.watch(3).await }
        });
        tokio::time::sleep(FENCE_CHECK_INTERVAL * 5).await;
        assert!(!fence.is_fenced());
        holds.store(false, Ordering::SeqCst);
        tokio::time::timeout(FENCE_CHECK_INTERVAL * 2, watch).await.unwrap().unwrap();
        assert!(fence.is_fenced() && cancel.is_cancelled());
    }
}
