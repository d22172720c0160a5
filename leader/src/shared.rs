//! What the leader handle, its listeners and its sessions share: one `Arc`
//! per leader.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::Config;
use crate::admission::Handshakes;
use crate::channel::Channel;
use crate::fence::Fence;

/// State shared by the leader handle, its listeners and its sessions.
pub(crate) struct Shared {
    pub(crate) id: Uuid,
    pub(crate) epoch: u64,
    pub(crate) config: Config,
    pub(crate) token: Option<String>,
    pub(crate) channels: HashMap<String, Arc<Channel>>,
    pub(crate) tracker: TaskTracker,
    pub(crate) cancel: CancellationToken,
    pub(crate) next_session: AtomicU64,
    pub(crate) followers: AtomicUsize,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) conflated: AtomicU64,
    /// What peers may cost before their `Hello` is accepted.
    pub(crate) handshakes: Handshakes,
    /// Refused handshakes are logged at WARN at most once per period (with the count held back).
    pub(crate) refusals: std::sync::Mutex<tandem_protocol::internal::Throttle>,
    /// The followers connected now, by session.
    pub(crate) peers: std::sync::Mutex<HashMap<u64, crate::FollowerStats>>,
    pub(crate) call_latency: crate::latency::CallLatency,
    /// Set when another process may replace this leader (standalone mode):
    /// nothing is served once it says the place is lost.
    pub(crate) fence: Option<Arc<Fence>>,
    /// Why the leader stops, once it was asked to: the reason of the
    /// `Goodbye` every session sends (the first call to stop wins).
    pub(crate) leaving: std::sync::OnceLock<crate::LeaderGoodbye>,
}
