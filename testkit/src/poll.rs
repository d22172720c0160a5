//! Polling a condition that no event announces (another process's state).

use std::future::Future;
use std::time::Duration;

/// How often [`eventually`] checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Checks `check` every [`POLL_INTERVAL`] until it holds; panics naming `what`
/// if it still does not after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
