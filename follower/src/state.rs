//! The connection's state, as handles observe it.

use std::collections::HashMap;

use tandem_protocol::{RemoteError, UpstreamState};

use crate::error::StartupFailure;

/// The state of the link to the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkState {
    /// No leader has been reached yet.
    Connecting,
    /// Connected to a leader.
    Connected {
        /// The leader's epoch.
        epoch: u64,
        /// The leader's process id.
        leader_pid: u32,
        /// Whether the leader is this very process.
        is_leader: bool,
    },
    /// The leader was lost, or left on purpose (it handed off or shut down);
    /// reconnecting (re-electing, with [`Standalone`](crate::Standalone)).
    LeaderLost,
    /// The leader refused this follower's hello (token, version or channels).
    /// The same hello is not sent again to that leader; the connector is asked
    /// to report when a different leader may be there.
    Rejected(RemoteError),
    /// No leader can ever be reached with these settings; not retried.
    Failed(StartupFailure),
    /// Closed by the user.
    Closed,
}

/// Everything a handle can observe about its connection.
#[derive(Debug, Clone)]
pub struct Status {
    /// The link.
    pub link: LinkState,
    /// The upstream state of each channel, as the current leader last reported.
    pub channels: HashMap<String, UpstreamState>,
}

impl Status {
    pub(crate) fn new() -> Self {
        Status { link: LinkState::Connecting, channels: HashMap::new() }
    }

    /// The state of one channel as a caller sees it.
    pub fn state_of(&self, channel: &str) -> State {
        match &self.link {
            LinkState::Connecting => State::Connecting,
            LinkState::LeaderLost => State::LeaderLost,
            LinkState::Closed => State::Closed,
            LinkState::Rejected(error) => State::Rejected(error.clone()),
            LinkState::Failed(failure) => State::Failed(failure.clone()),
            LinkState::Connected { .. } => match self.channels.get(channel) {
                Some(UpstreamState::Ready) => State::Ready,
                Some(UpstreamState::Down(error)) => State::UpstreamDown(error.clone()),
                _ => State::Connecting,
            },
        }
    }

    /// The current leader's epoch, when connected.
    pub fn epoch(&self) -> Option<u64> {
        match self.link {
            LinkState::Connected { epoch, .. } => Some(epoch),
            _ => None,
        }
    }

    /// Whether this process is the leader.
    pub fn is_leader(&self) -> bool {
        matches!(self.link, LinkState::Connected { is_leader: true, .. })
    }
}

/// The state of one channel, as a caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Waiting for a leader, or for the leader's upstream to start.
    Connecting,
    /// Calls and subscriptions work.
    Ready,
    /// The leader was lost; calls fail fast with [`Error::LeaderLost`](crate::Error::LeaderLost)
    /// and subscriptions keep their last values until a leader is back.
    LeaderLost,
    /// The leader is there but its upstream is not.
    UpstreamDown(RemoteError),
    /// The leader refused this follower; calls fail with
    /// [`Error::Rejected`](crate::Error::Rejected).
    Rejected(RemoteError),
    /// No leader can be reached with these settings; calls fail with
    /// [`Error::Startup`](crate::Error::Startup).
    Failed(StartupFailure),
    /// Closed by the user.
    Closed,
}
