//! The server's counters, as reported to clients.

use serde::{Deserialize, Serialize};

/// A snapshot of the server's counters.
///
/// Serialized (JSON, MessagePack) with exactly these field names; the CLI's
/// `stats` subcommand prints it as one JSON object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Connections open now. Asked over a connection, the asking connection is not counted.
    pub connections: u64,
    /// Connections accepted since the server started, the asking one included.
    pub accepted_total: u64,
    /// Active watches of all connections: key, prefix and service watches.
    pub watches: u64,
    /// Keys in the config center.
    pub keys: u64,
    /// Registered service instances.
    pub instances: u64,
}
