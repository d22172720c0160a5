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
    /// The most connections served at once. One more is accepted, sent a
    /// `Goodbye` (`Unavailable`, code `too_many_connections`) and closed at once;
    /// the refusals are logged at WARN, at most once every 10 seconds.
    /// The default is 10 000, or the process's open-file limit (`ulimit -n`)
    /// minus [`RESERVED_FDS`] when that is lower: a server out of file
    /// descriptors cannot even refuse (its `accept` fails with `EMFILE`).
    pub max_connections: usize,
    /// How long a frame may take to arrive once its first byte has: a client
    /// that starts a request and stalls (a few bytes of a length prefix, say)
    /// is sent a `Goodbye` (`DeadlineExceeded`, code `frame_timeout`) and
    /// disconnected. The default is 10 seconds.
    pub frame_timeout: Duration,
    /// How long a new connection may take, from its accept, to deliver its
    /// first complete request: one that sends nothing (or only part of a
    /// frame) for that long is sent a `Goodbye` (`DeadlineExceeded`, code
    /// `first_request_timeout`) and closed, so silent clients cannot hold
    /// places under [`max_connections`](Config::max_connections) for the whole
    /// [`idle_timeout`](Config::idle_timeout). The registry protocol has no
    /// client hello (the server speaks first), so this stands in for a hello
    /// timeout; [`RegistryClient::connect`](crate::RegistryClient::connect) sends a request as
    /// soon as the server's hello arrives. Once a request has arrived it no
    /// longer applies. The closes are logged at DEBUG, and at WARN at most once
    /// every 10 seconds with the count held back. Zero disables the timeout.
    /// The default is 10 seconds.
    pub first_request_timeout: Duration,
    /// How long a connection with no watch and no lease may go without sending
    /// a request before it is sent a `Goodbye` (`Unavailable`, code
    /// `idle_timeout`) and closed. A connection that has sent no request yet
    /// is closed sooner, by [`first_request_timeout`](Config::first_request_timeout),
    /// when that is shorter. Zero disables the timeout. The default is 5 minutes.
    pub idle_timeout: Duration,
    /// The most bytes buffered at once, across all connections, for requests
    /// that have not fully arrived. A frame longer than
    /// [`SMALL_FRAME`] is counted in full, before its body is read,
    /// as soon as its length prefix is; one that does not fit ends its
    /// connection with a `Goodbye` (`Unavailable`, code `frame_budget`).
    /// Frames up to [`SMALL_FRAME`] are not counted: each connection may buffer
    /// one, so they are bounded by `max_connections` × 64 KiB.
    /// The default is 64 MiB.
    pub partial_frame_budget: usize,
}

/// File descriptors kept free under the open-file limit when the default
/// [`Config::max_connections`] is derived from it (for the listener, logs and
/// the runtime's own descriptors, and to refuse the connection past the cap).
pub const RESERVED_FDS: usize = 32;

/// Frames up to this many bytes are read without counting against
/// [`Config::partial_frame_budget`]: 64 KiB.
pub const SMALL_FRAME: usize = 64 * 1024;

/// The default of [`Config::max_connections`]: 10 000, or the open-file limit
/// minus [`RESERVED_FDS`] when that is lower (but at least 1).
pub fn default_max_connections() -> usize {
    const MAX: usize = 10_000;
    match open_file_limit() {
        Some(limit) => usize::try_from(limit).unwrap_or(usize::MAX).saturating_sub(RESERVED_FDS).clamp(1, MAX),
        None => MAX,
    }
}

/// The process's soft limit on open file descriptors, if it has one.
pub(crate) fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `getrlimit` only writes the `rlimit` it is given a valid pointer to.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(limit.rlim_cur)
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
            max_connections: default_max_connections(),
            frame_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5 * 60),
            partial_frame_budget: 64 * 1024 * 1024,
        }
    }
}
