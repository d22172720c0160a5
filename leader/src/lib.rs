//! The tandem Leader: the one process on a host that holds the upstream connection.
//!
//! A leader runs one [`Upstream`] per channel (the user's real client, built
//! once) and serves followers over a local socket. N subscribers of one key
//! cost one upstream subscription; a late subscriber gets the cached value at
//! once; every value carries (epoch, seq). Calls run concurrently, each with its
//! caller's deadline, and are cancelled when the caller gives up. A slow
//! follower never stalls the leader or the others: its events are conflated per
//! key and past a hard bound it is disconnected. Bad bytes end only the session
//! that sent them.
//!
//! A channel added with [`LeaderBuilder::channel_with_retry`] starts without its
//! upstream and rebuilds it with backoff (followers see `UpstreamDown`, calls
//! fail fast, subscriptions are pending); with a [`Cache`] the leader keeps the
//! last live value of every subscribed key on disk and serves it, marked
//! `cached`, while the upstream is unreachable.
//!
//! ```text
//! follower 1 ──┐  unix socket (uid checked, token optional)
//! follower 2 ──┼──> sessions ──> hub (per channel) ──> Upstream::subscribe (once per key) -> Events
//! in-process ──┘        │                          <── the key's pump polls Events (seq += 1, cache, fan out)
//!                       └──> call tasks ──> Upstream::invoke (deadline, cancel)
//! ```
//!
//! [`Upstream`] has a complete adapter in its documentation.

mod admission;
mod builder;
mod cache;
mod channel;
mod config;
mod deliver;
mod erased;
mod error;
mod fence;
mod goodbye;
mod health;
mod hub;
mod latency;
mod leader;
mod outbox;
mod peer;
mod session;
mod session_end;
mod session_id;
mod shared;
mod stats;
mod upstream;

/// Whether a frame carrying these variable parts fits in `max` bytes (with a
/// generous allowance for the fixed fields and MessagePack headers).
pub(crate) fn fits_in_frame(max: usize, parts: &[&[u8]]) -> bool {
    const OVERHEAD: usize = 256;
    parts.iter().map(|p| p.len()).sum::<usize>() + OVERHEAD <= max
}

pub use builder::LeaderBuilder;
pub use cache::Cache;
pub use config::Config;
pub use error::Error;
pub use fence::FENCE_CHECK_INTERVAL;
pub use goodbye::LeaderGoodbye;
pub use health::{Health, health_from};
pub use latency::LatencyStats;
pub use leader::Leader;
pub use peer::PeerInfo;
pub use stats::{ChannelStats, FollowerStats, KeyStats, Stats};
pub use upstream::{CallContext, EventSender, Events, Upstream};
