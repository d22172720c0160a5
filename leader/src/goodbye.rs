//! Why a leader leaves on purpose: the reasons of the `Goodbye` it sends every
//! follower when it stops, which followers tell apart from a fault.
//!
//! ```text
//! Leader::hand_off()  ──Goodbye("leader handing off")───> follower: INFO, re-elect / reconnect now
//! Leader::shutdown()  ──Goodbye("leader shutting down")─> follower: INFO, reconnect
//! process dies, link breaks, Goodbye for a fault ───────> follower: WARN "lost the leader"
//! ```
//!
//! The wire is unchanged: the reason is the `Goodbye` frame's string, and these
//! are its two exact values that carry a meaning (PROTOCOL.md §9). Any other
//! reason (a follower too slow, a bad frame) ends the session for a fault.

/// A leader's reason for ending every session on purpose, as sent in its
/// `Goodbye`. A follower reads it back with [`LeaderGoodbye::from_reason`].
///
/// ```
/// use tandem_leader::LeaderGoodbye;
///
/// assert_eq!(LeaderGoodbye::HandOff.reason(), "leader handing off");
/// assert_eq!(LeaderGoodbye::from_reason("leader shutting down"), Some(LeaderGoodbye::ShuttingDown));
/// assert_eq!(LeaderGoodbye::from_reason("outbound queue over 8 frames: follower too slow"), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeaderGoodbye {
    /// The leader steps down so that another process leads at the next epoch
    /// ([`Leader::hand_off`](crate::Leader::hand_off)). On the wire: `"leader handing off"`.
    HandOff,
    /// The leader stops ([`Leader::shutdown`](crate::Leader::shutdown)); whoever
    /// leads next (a restarted agent, another process) takes over. On the
    /// wire: `"leader shutting down"`.
    ShuttingDown,
}

impl LeaderGoodbye {
    /// The `Goodbye` reason on the wire.
    pub const fn reason(self) -> &'static str {
        match self {
            LeaderGoodbye::HandOff => "leader handing off",
            LeaderGoodbye::ShuttingDown => "leader shutting down",
        }
    }

    /// The planned departure a `Goodbye` reason names; `None` for any other
    /// reason (the session ended for a fault). The match is exact.
    pub fn from_reason(reason: &str) -> Option<Self> {
        [LeaderGoodbye::HandOff, LeaderGoodbye::ShuttingDown].into_iter().find(|g| g.reason() == reason)
    }
}

impl std::fmt::Display for LeaderGoodbye {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reasons_on_the_wire_are_pinned_and_read_back_exactly() {
        // These strings are the wire contract (PROTOCOL.md §9): never change them.
        assert_eq!(LeaderGoodbye::HandOff.reason(), "leader handing off");
        assert_eq!(LeaderGoodbye::ShuttingDown.reason(), "leader shutting down");
        for goodbye in [LeaderGoodbye::HandOff, LeaderGoodbye::ShuttingDown] {
            assert_eq!(LeaderGoodbye::from_reason(goodbye.reason()), Some(goodbye));
            assert_eq!(goodbye.to_string(), goodbye.reason());
        }
        for other in ["", "leader handing off now", "Leader handing off", "leader shutting", "follower closing"] {
            assert_eq!(LeaderGoodbye::from_reason(other), None, "{other:?}");
        }
    }
}
