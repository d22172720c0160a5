//! The server's limits and sizes.

use std::time::Duration;

/// How a [`Server`](crate::Server) bounds what clients may ask of it.
///
/// Build it from `Config::default()` and change the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The longest key, watch prefix, service name or instance id, in bytes.
    /// The default is 4 KiB.
    pub max_key_size: usize,
    /// The largest value, in bytes; also bounds an instance's address plus metadata.
    /// The default is 1 MiB.
    pub max_value_size: usize,
    /// How many watches (key, prefix and service) one connection may hold at once;
    /// one more is refused with a `Rejected` error (code `too_many_watches`).
    /// A tandem Leader holds one watch per subscribed key of its whole host on ONE
    /// connection, so this is also the most keys one Leader can follow. Each watch
    /// costs the server a few hundred bytes. The default is 262 144 (2^18).
    pub max_watches_per_connection: usize,
    /// The largest frame body read or written, in bytes (the codec's limit).
    /// The default is 16 MiB ([`tandem_protocol::DEFAULT_MAX_FRAME_LENGTH`]).
    pub max_frame: usize,
    /// How many changes the server remembers for watches that start from an older
    /// revision; older starts get a snapshot instead. The default is 10 000.
    pub history: usize,
    /// How many watch events may wait to be written to one connection. A client that
    /// reads too slowly to stay under this bound is disconnected. The default is 1024.
    pub outbound_queue: usize,
    /// How many bytes of watch events (keys and values, roughly) may wait to be written
    /// to one connection; past it the client is disconnected, as for
    /// [`outbound_queue`](Config::outbound_queue). The default is 16 MiB.
    pub outbound_queue_bytes: usize,
    /// The shortest lease TTL a registration may ask for. The default is 100 milliseconds.
    pub min_lease_ttl: Duration,
    /// The longest lease TTL a registration may ask for. The default is 1 day.
    pub max_lease_ttl: Duration,
    /// How long shutdown waits for connections to flush their last messages.
    /// The default is 5 seconds.
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_key_size: 4 * 1024,
            max_value_size: 1024 * 1024,
            max_watches_per_connection: 262_144,
            max_frame: tandem_protocol::DEFAULT_MAX_FRAME_LENGTH,
            history: 10_000,
            outbound_queue: 1024,
            outbound_queue_bytes: 16 * 1024 * 1024,
            min_lease_ttl: Duration::from_millis(100),
            max_lease_ttl: Duration::from_secs(24 * 60 * 60),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}
