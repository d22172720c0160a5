//! Leader introspection.

use serde::Serialize;
use tandem_protocol::UpstreamState;
use uuid::Uuid;

/// A snapshot of what a leader is doing.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// The leader's id.
    pub leader_id: Uuid,
    /// The leader's epoch.
    pub epoch: u64,
    /// Followers connected now (including in-process handles).
    pub followers: usize,
    /// Calls running now, all channels.
    pub in_flight: usize,
    /// Events replaced before a slow follower read them, over the leader's life
    /// (counted when a session ends).
    pub conflated_events: u64,
    /// One entry per channel.
    pub channels: Vec<ChannelStats>,
}

/// A snapshot of one channel.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct ChannelStats {
    /// The channel name.
    pub name: String,
    /// Its upstream's state.
    pub upstream: UpstreamState,
    /// Keys with at least one subscriber (= upstream subscriptions).
    pub subscriptions: usize,
    /// Subscribers over all keys.
    pub subscribers: usize,
}
