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
    /// tandem followers on the leader's Unix socket.
    Direct,
    /// tandem followers in cluster workers, relayed by the cluster master to the agent's Leader.
    Messenger,
    /// gRPC with tonic over a Unix socket (HTTP/2, prost messages): one channel per client process.
    Tonic,
    /// tarpc over a Unix socket (length-delimited frames, bincode): one client per client process.
    Tarpc,
}

/// Every transport, in the order the bench runs and prints them.
pub const ALL: [Transport; 5] =
    [Transport::Floor, Transport::Direct, Transport::Messenger, Transport::Tonic, Transport::Tarpc];

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Floor => "floor",
            Transport::Direct => "direct",
            Transport::Messenger => "messenger",
            Transport::Tonic => "tonic",
            Transport::Tarpc => "tarpc",
        })
    }
}

impl Transport {
    /// What its (server, client) processes are called in the memory figures.
    pub fn process_names(self) -> (&'static str, &'static str) {
        match self {
            Transport::Floor => ("floor_server", "floor_client"),
            Transport::Direct => ("leader", "follower"),
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
