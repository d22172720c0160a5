//! The transports the bench measures: the raw floor, tandem over the leader's
//! Unix socket, and tandem relayed by a cluster's messenger (how each one's
//! processes are started is in `runner`).

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
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Floor => "floor",
            Transport::Direct => "direct",
            Transport::Messenger => "messenger",
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
        }
    }
}
