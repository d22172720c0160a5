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
    /// Upstream events the leader received and fanned out, all channels.
    pub events_sent: u64,
    /// Deliver-to-one events dropped undelivered, all channels, over the
    /// leader's life: a key's queue was full (`Config::deliver_queue`), or the
    /// key's last subscriber left with events queued or unsettled.
    pub undelivered_dropped: u64,
    /// The followers connected now.
    pub follower_list: Vec<FollowerStats>,
    /// How long calls took from arrival to answer.
    pub call_latency: crate::LatencyStats,
}

/// One connected follower.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct FollowerStats {
    /// The session id (the `follower.id` of the leader's logs).
    pub id: u64,
    /// The follower's pid, as its transport or its Hello tells.
    pub pid: Option<i32>,
    /// `unix`, `tcp`, `local` or `messenger`.
    pub transport: String,
    /// The channels it named in Hello.
    pub channels: Vec<String>,
    /// It mirrors this leader (a hot standby, PROTOCOL.md §7.2).
    pub mirrors: bool,
}

/// One subscribed key.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct KeyStats {
    /// The key: its MessagePack string, or the bytes in hex when it is not a string.
    pub key: String,
    /// Followers subscribed to it.
    pub subscribers: usize,
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
    /// The subscribed keys.
    pub keys: Vec<KeyStats>,
}
