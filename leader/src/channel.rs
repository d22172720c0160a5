//! One channel inside the leader: its upstream (type-erased), its state and its hub.

use std::sync::Arc;
use tokio::time::Instant;

use tandem_protocol::{RemoteError, UpstreamState};
use tokio::sync::watch;

use crate::erased::ErasedUpstream;
use crate::hub::{Hub, HubContext};

/// A channel: name, upstream once built, its state, and its subscription hub.
pub(crate) struct Channel {
    pub(crate) name: Arc<str>,
    pub(crate) upstream: std::sync::OnceLock<Arc<dyn ErasedUpstream>>,
    pub(crate) state: watch::Sender<UpstreamState>,
    pub(crate) hub: Arc<Hub>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("name", &self.name).field("state", &*self.state.borrow()).finish()
    }
}

impl Channel {
    pub(crate) fn new(name: &str, ctx: HubContext) -> Self {
        let name: Arc<str> = Arc::from(name);
        let state = watch::Sender::new(UpstreamState::Starting);
        Channel {
            hub: Arc::new(Hub::new(name.clone(), ctx, state.subscribe())),
            name,
            upstream: std::sync::OnceLock::new(),
            state,
        }
    }

    /// The upstream is built: calls and subscriptions go to it from now on.
    pub(crate) fn attach(&self, upstream: Arc<dyn ErasedUpstream>) {
        let _ = self.upstream.set(upstream.clone());
        self.hub.attach(upstream);
    }

    /// The upstream, waiting while it is being built, until `deadline`.
    pub(crate) async fn ready_upstream(&self, deadline: Instant) -> Result<Arc<dyn ErasedUpstream>, RemoteError> {
        let mut state = self.state.subscribe();
        let wait = state.wait_for(|s| !matches!(s, UpstreamState::Starting));
        match tokio::time::timeout_at(deadline, wait).await {
            Err(_) => Err(RemoteError::deadline_exceeded(format!(
                "channel {}: upstream still starting at the deadline",
                self.name
            ))),
            Ok(Err(_)) => Err(RemoteError::unavailable("leader shutting down")),
            Ok(Ok(state)) => {
                match &*state {
                    UpstreamState::Down(e) => Err(e.clone()),
                    _ => self.upstream.get().cloned().ok_or_else(|| {
                        RemoteError::unavailable(format!("channel {}: upstream not available", self.name))
                    }),
                }
            }
        }
    }
}
