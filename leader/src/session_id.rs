//! The id the leader gives each follower session: what the hub and the
//! deliver-to-one dispatch key their subscribers by.

/// Identifies one follower session within the leader.
pub(crate) type SessionId = u64;
