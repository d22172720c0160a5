//! The transports the bench measures: the raw floor, tandem over the leader's
//! Unix socket, tandem relayed by a cluster's messenger, and the peers a Rust
//! user would reach for instead, gRPC (tonic) and tarpc, each over a Unix
//! socket (how each one's processes are started is in `runner`).

use std::fmt;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The raw Unix-socket floor: what any framed protocol costs at least.
    Floor,
    /// tandem followers on the leader's Unix socket, on the follower's default per-call path.
    Direct,
    /// As `direct`, every call on the command-queue path (`CallPath::Queue`):
    /// a command to the driver task, answered through a oneshot.
    #[serde(rename = "direct-queue")]
    DirectQueue,
    /// As `direct`, every call on the slots path (`CallPath::Slots`):
    /// appended to the driver's batch, answered through a slab of waker slots.
    #[serde(rename = "direct-slots")]
    DirectSlots,
    /// tandem followers in cluster workers, relayed by the cluster master to the agent's Leader.
    Messenger,
    /// gRPC with tonic over a Unix socket (HTTP/2, prost messages): one channel per client process.
    Tonic,
    /// tarpc over a Unix socket (length-delimited frames, bincode): one client per client process.
    Tarpc,
}

/// A follower's per-call path, as its role's `--calls` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Calls {
    Queue,
    Slots,
}

impl Calls {
    pub fn path(self) -> tandem::follower::CallPath {
        match self {
            Calls::Queue => tandem::follower::CallPath::Queue,
            Calls::Slots => tandem::follower::CallPath::Slots,
        }
    }
}

impl fmt::Display for Calls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Calls::Queue => "queue",
            Calls::Slots => "slots",
        })
    }
}

/// Every transport, in the order the bench runs and prints them.
pub const ALL: [Transport; 5] =
    [Transport::Floor, Transport::Direct, Transport::Messenger, Transport::Tonic, Transport::Tarpc];

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Floor => "floor",
            Transport::Direct => "direct",
            Transport::DirectQueue => "direct-queue",
            Transport::DirectSlots => "direct-slots",
            Transport::Messenger => "messenger",
            Transport::Tonic => "tonic",
            Transport::Tarpc => "tarpc",
        })
    }
}

impl Transport {
    /// The per-call path its followers are told to use (`None`: the default).
    pub fn calls(self) -> Option<Calls> {
        match self {
            Transport::DirectQueue => Some(Calls::Queue),
            Transport::DirectSlots => Some(Calls::Slots),
            _ => None,
        }
    }

    /// What its (server, client) processes are called in the memory figures.
    pub fn process_names(self) -> (&'static str, &'static str) {
        match self {
            Transport::Floor => ("floor_server", "floor_client"),
            Transport::Direct | Transport::DirectQueue | Transport::DirectSlots => ("leader", "follower"),
            Transport::Messenger => ("agent", "worker"),
            Transport::Tonic => ("tonic_server", "tonic_client"),
            Transport::Tarpc => ("tarpc_server", "tarpc_client"),
        }
    }

    /// Whether it has a fan-out phase: tarpc has no server-to-client stream
    /// (a call has one answer), so it is measured on invoke only.
    pub fn fans_out(self) -> bool {
        self != Transport::Tarpc
    }

    /// A peer measured for comparison with tandem (its rows compare with direct).
    pub fn is_peer(self) -> bool {
        matches!(self, Transport::Tonic | Transport::Tarpc)
    }
}
