//! [`Health`]: an adapter's reconnect loop, reported and paced; and
//! [`health_from`], for a client that reconnects by itself.

use std::time::Duration;

use tandem_protocol::internal::Backoff;
use tandem_protocol::{RemoteError, UpstreamState};
use tokio::sync::watch;

/// What an [`Upstream`](crate::Upstream) adapter knows of its connection, in
/// one value: it publishes the state the leader forwards to followers (return
/// [`watch`](Self::watch) from `Upstream::health`), logs an outage once at WARN
/// with its cause and then once per failed attempt at DEBUG, logs the recovery
/// at INFO, and spaces attempts with a jittered backoff that doubles from
/// `min` to `max` (defaults 20 ms and 2 s).
///
/// ```
/// # use tandem_leader::Health;
/// # use tandem_protocol::RemoteError;
/// # async fn connect() -> Result<(), RemoteError> { Ok(()) }
/// # async fn run() {
/// let mut health = Health::new("my-config-server");
/// loop {
///     match connect().await {
///         Ok(connection) => {
///             health.ready();
///             // ... serve until the connection is lost, then:
///             health.lost(RemoteError::unavailable("connection reset"));
///             # return;
///         }
///         Err(error) => health.failed(error).await, // reports, then waits
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Health {
    upstream: String,
    state: watch::Sender<UpstreamState>,
    backoff: Backoff,
    failures: u64,
}

impl Health {
    /// The health of `upstream` (a name for the logs, such as `redis://host:6379`),
    /// `Starting` until the first [`ready`](Self::ready) or failure.
    pub fn new(upstream: impl Into<String>) -> Self {
        Health::with_backoff(upstream, Duration::from_millis(20), Duration::from_secs(2))
    }

    /// The same, with the first and the longest pause between attempts.
    pub fn with_backoff(upstream: impl Into<String>, min: Duration, max: Duration) -> Self {
        Health {
            upstream: upstream.into(),
            state: watch::Sender::new(UpstreamState::Starting),
            backoff: Backoff::new(min, max),
            failures: 0,
        }
    }

    /// The state, for `Upstream::health`.
    pub fn watch(&self) -> watch::Receiver<UpstreamState> {
        self.state.subscribe()
    }

    /// Whether the upstream is reachable now.
    pub fn is_ready(&self) -> bool {
        *self.state.borrow() == UpstreamState::Ready
    }

    /// Attempts that failed since the upstream was last reachable.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// The upstream is reachable (again).
    pub fn ready(&mut self) {
        if self.failures > 0 {
            tracing::info!(upstream = %self.upstream, failures = self.failures, "upstream reachable again");
        }
        self.failures = 0;
        self.backoff.reset();
        self.state.send_replace(UpstreamState::Ready);
    }

    /// The connection was lost: WARN with why, and `Down` until [`ready`](Self::ready).
    pub fn lost(&mut self, error: RemoteError) {
        tracing::warn!(upstream = %self.upstream, %error, "upstream connection lost; reconnecting");
        self.failures = self.failures.max(1);
        self.state.send_replace(UpstreamState::Down(error));
    }

    /// The upstream refused us for a reason no retry fixes (credentials,
    /// configuration): ERROR with why, and `Down(error)` for good. The caller
    /// stops trying.
    pub fn gave_up(&mut self, error: RemoteError) {
        tracing::error!(upstream = %self.upstream, %error, "the upstream refused us and retrying cannot help; giving up");
        self.failures += 1;
        self.state.send_replace(UpstreamState::Down(error));
    }

    /// An attempt failed: reports it (WARN the first time, DEBUG after), shows
    /// `Down(error)` to followers, and waits before the next attempt.
    pub async fn failed(&mut self, error: RemoteError) {
        self.failures += 1;
        let pause = self.backoff.next_delay();
        if self.failures == 1 {
            tracing::warn!(upstream = %self.upstream, %error, "upstream unreachable; retrying with backoff");
        } else {
            tracing::debug!(upstream = %self.upstream, %error, failures = self.failures, "upstream still unreachable");
        }
        self.state.send_if_modified(|state| match state {
            UpstreamState::Down(old) if old.message == error.message => false,
            _ => {
                *state = UpstreamState::Down(error);
                true
            }
        });
        tokio::time::sleep(pause).await;
    }
}

/// The health of an upstream whose client reconnects by itself and publishes
/// its connection state in a watch (return it from `Upstream::health`): `map`
/// turns each state into the health to report, or `None` to keep the last one
/// (for a passing state, such as a switch between members). It starts as `map`
/// of the current state, or `Starting`. A task follows `state` until its sender,
/// or every receiver of the health, is gone.
///
/// ```
/// # use tandem_leader::health_from;
/// # use tandem_protocol::{RemoteError, UpstreamState};
/// # use tokio::sync::watch;
/// enum Link { Connecting, Up, Down(String) }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (link, state) = watch::channel(Link::Connecting);
/// let mut health = health_from(state, |link| match link {
///     Link::Connecting => None,
///     Link::Up => Some(UpstreamState::Ready),
///     Link::Down(why) => Some(UpstreamState::Down(RemoteError::unavailable(why.clone()))),
/// });
/// assert_eq!(*health.borrow(), UpstreamState::Starting);
/// link.send_replace(Link::Down("connection refused".into()));
/// health.wait_for(|h| matches!(h, UpstreamState::Down(e) if e.message == "connection refused")).await.unwrap();
/// link.send_replace(Link::Connecting); // changes nothing
/// link.send_replace(Link::Up);
/// health.wait_for(|h| *h == UpstreamState::Ready).await.unwrap();
/// # }
/// ```
pub fn health_from<S>(
    mut state: watch::Receiver<S>,
    map: impl Fn(&S) -> Option<UpstreamState> + Send + 'static,
) -> watch::Receiver<UpstreamState>
where
    S: Send + Sync + 'static,
{
    let first = map(&state.borrow_and_update());
    let (health, receiver) = watch::channel(first.unwrap_or(UpstreamState::Starting));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                () = health.closed() => return,
            }
            let Some(next) = map(&state.borrow_and_update()) else { continue };
            health.send_if_modified(|current| {
                let changed = *current != next;
                *current = next;
                changed
            });
        }
    });
    receiver
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outages_show_as_down_with_why_and_recovery_as_ready() {
        let mut health = Health::with_backoff("test", Duration::from_millis(1), Duration::from_millis(2));
        let state = health.watch();
        assert_eq!(*state.borrow(), UpstreamState::Starting);
        health.failed(RemoteError::unavailable("refused")).await;
        health.failed(RemoteError::unavailable("refused")).await;
        assert_eq!(health.failures(), 2);
        assert!(matches!(&*state.borrow(), UpstreamState::Down(e) if e.message == "refused"));
        health.ready();
        assert!(health.is_ready() && health.failures() == 0);
        health.lost(RemoteError::unavailable("reset"));
        assert!(matches!(&*state.borrow(), UpstreamState::Down(e) if e.message == "reset"));
    }

    #[tokio::test]
    async fn a_mapped_health_keeps_its_state_on_none_and_ends_with_its_source() {
        let (source, state) = watch::channel(0u8);
        let mut health = health_from(state, |n| match n {
            0 => None,
            1 => Some(UpstreamState::Ready),
            _ => Some(UpstreamState::Down(RemoteError::unavailable(format!("state {n}")))),
        });
        assert_eq!(*health.borrow_and_update(), UpstreamState::Starting);
        source.send_replace(2);
        health.changed().await.unwrap();
        assert!(matches!(&*health.borrow_and_update(), UpstreamState::Down(e) if e.message == "state 2"));
        source.send_replace(0);
        source.send_replace(1);
        health.changed().await.unwrap();
        assert_eq!(*health.borrow_and_update(), UpstreamState::Ready);
        source.send_replace(1);
        drop(source);
        assert!(health.changed().await.is_err(), "no change for the same state, then the end with the source");
        assert_eq!(*health.borrow(), UpstreamState::Ready);
    }
}
