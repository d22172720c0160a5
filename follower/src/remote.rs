//! Where a subscription (a subscribed key, a deliver-to-one key, or the
//! mirror) stands at the current leader.

use tandem_protocol::RequestId;

/// Where a subscription stands at the current leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Remote {
    /// Not subscribed at the current leader (no leader, or its upstream is not ready).
    Unsent,
    /// Subscribe sent with this id, no Ack yet.
    Pending(RequestId),
    /// Acked.
    Active,
}
