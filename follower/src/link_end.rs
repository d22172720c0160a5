//! Why a link to the leader ended, and why writing to it failed.

use std::time::Duration;

use tandem_protocol::CodecError;

/// Why the frames queued for the leader were not all written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteFailed {
    #[error("write to the leader failed: {0}")]
    Write(#[source] CodecError),
    #[error("the leader accepted no bytes for {} ms", .0.as_millis())]
    Stalled(Duration),
}

/// Why a link to the leader ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkEnd {
    #[error("the leader closed the connection")]
    LeaderClosed,
    #[error("bad frame from the leader: {0}")]
    BadFrame(#[source] CodecError),
    #[error("the leader said goodbye: {0}")]
    Goodbye(String),
    /// The leader left on purpose (it handed off, or shut down): not a fault.
    #[error("the leader left on purpose: {0}")]
    LeaderLeft(tandem_leader::LeaderGoodbye),
    #[error("protocol violation: a leader may not send {0} now")]
    Unexpected(&'static str),
    #[error("no frame from the leader for {} ms", .0.as_millis())]
    Silent(Duration),
    #[error(transparent)]
    Write(WriteFailed),
    /// This follower closed the connection on purpose.
    #[error("closed")]
    Closed,
}

impl LinkEnd {
    /// The leader stopped answering (silent, or taking no bytes), as opposed
    /// to closing or misbehaving.
    pub(crate) fn is_unresponsive(&self) -> bool {
        matches!(self, LinkEnd::Silent(_) | LinkEnd::Write(WriteFailed::Stalled(_)))
    }
}
