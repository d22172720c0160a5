//! The control socket's limits, its files and the agent's report topic.

use std::time::Duration;

/// The longest answer line, in bytes: 4 MiB (a status of many workers or a
/// leader report with many keys fits). The master answers a larger result
/// with an error instead; the client reads no longer line.
pub const MAX_LINE: usize = 4 * 1024 * 1024;
/// The longest request line the master reads, in bytes: 4 KiB (the longest
/// request, `{"cmd":"reload_agent"}`, is 22). A longer line is answered with
/// an error and the connection is closed.
pub const MAX_REQUEST_LINE: usize = 4 * 1024;
/// How much of a line that is not a request its error answer echoes, in
/// bytes: 64 (with the line's length).
pub const ECHO_PREFIX: usize = 64;
/// Control connections served at once: 16.
pub const MAX_CONNECTIONS: usize = 16;
/// A control connection with no request for this long is closed: 60 seconds.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// An answer not taken by the client (written whole to the socket) within
/// this long closes the connection and frees its slot: 5 seconds.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`list`](super::list) waits for each master's `info` (they are asked at the
/// same time): 2 seconds. One that has not answered by then is listed as
/// `not answering`.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(2);
/// [`Response::code`](super::Response::code) of the refusal a connection over [`MAX_CONNECTIONS`] gets.
pub const CODE_TOO_MANY_CONNECTIONS: &str = "too_many_connections";
/// How long a client whose request could not be sent (the master closed the
/// connection first) still waits for the line the master left: 2 seconds.
pub(crate) const REFUSAL_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The messenger topic on which the master asks the agent for its report
/// (JSON), for `tandem leader`, `tandem status` and the metrics. An agent that
/// does not answer it simply has no report.
pub const AGENT_STATS_TOPIC: &str = "tandem.leader.stats";
/// How long the master waits for the agent's report.
pub(crate) const AGENT_STATS_DEADLINE: Duration = Duration::from_secs(2);
/// The control socket's file name in the cluster's directory.
pub(crate) const SOCKET_FILE: &str = "control.sock";
pub(crate) const LOCK_FILE: &str = "lock";
pub(crate) const PID_FILE: &str = "master.pid";
