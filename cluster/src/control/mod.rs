//! The control socket: how the `tandem` CLI finds a running cluster of this
//! user and talks to its master.
//!
//! **Where.** Every cluster has a name ([`Builder::name`](crate::Builder::name);
//! the default is the executable's file name). Its master listens on
//! `$XDG_RUNTIME_DIR/tandem/<name>/control.sock` when `XDG_RUNTIME_DIR` is a
//! directory owned by this user, else on `<temp dir>/tandem-<uid>/<name>/control.sock`.
//! Each directory on the way is created with mode 0700 and checked: owned by
//! this user and closed to group and others, or the master refuses to start.
//!
//! **One master per name.** The master holds an exclusive `flock` on
//! `<name>/lock` for its whole life and writes its pid to `<name>/master.pid`.
//! A second master given the same name ([`Builder::name`](crate::Builder::name))
//! fails with [`Error::NameInUse`](crate::Error::NameInUse); without an explicit name, a taken default
//! becomes `<name>-2`, `<name>-3`, ... (logged at INFO). A
//! `control.sock` left behind by a master that died (the lock is free) is
//! removed and taken over.
//!
//! **Protocol.** JSON lines over the Unix socket: the client writes one request
//! per line, the master answers each with one line, in order.
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"result":[{"role":"master","slot":null,"pid":4242,...},...]}
//! -> {"cmd":"reload"}
//! <- {"ok":false,"error":"worker 2: new process 4250 exited with code 3 before it was ready (rolled back; 1 slot(s) had already been replaced)","reload_error":{"kind":"failed","worker":2,"new_pid":4250,"cause":{"kind":"exited","detail":{"Code":3}},"replaced":[{"worker":1,"old_pid":4247,"new_pid":4249}]}}
//! -> {"cmd":"reload_agent"}
//! <- {"ok":true,"result":{"old_pid":4246,"old_epoch":1,"new_pid":4311,"epoch":2,"took_ms":212}}
//! -> {"cmd":"scale","workers":{"remove":1}}
//! <- {"ok":true,"result":{"from":2,"to":1,"added":[],"removed":[{"worker":2,"pid":4249,"exit":{"Code":0}}],"took_ms":14}}
//! -> {"cmd":"scale","workers":{"to":0}}
//! <- {"ok":false,"error":"scaling 1 worker(s) to 0 would leave 0; a cluster keeps at least 1 worker (`tandem stop` stops it)","reload_error":{"kind":"too_few_workers","current":1,"asked":{"to":0},"result":0}}
//! ```
//!
//! Commands: `info` ([`ClusterInfo`]), `status` (a [`ProcessInfo`] per
//! process), `leader` (the agent's own report, as JSON; see
//! [`AGENT_STATS_TOPIC`]), `reload` ([`ReloadReport`]), `reload_agent`
//! ([`AgentReloadReport`]), `scale` ([`ScaleReport`](crate::ScaleReport);
//! `workers` is a [`ScaleTo`](crate::ScaleTo)), `restart` (one worker, by
//! `worker` id: a [`ReloadReport`] of one slot), `restart_agent`
//! ([`AgentReloadReport`]), `stop` ([`StopReport`];
//! the master starts a graceful stop and answers at once with the pids to
//! wait for). A failed `reload`, `reload_agent`, `scale`, `restart` or
//! `restart_agent` carries, besides the
//! `error` text, the [`ReloadError`] itself in `reload_error`
//! ([`Response::reload_error`]); [`ControlClient`] returns it as
//! [`ControlError::Reload`].
//!
//! **Limits.** Only processes of the master's own user may connect: the
//! peer's uid is checked with `SO_PEERCRED` on every connection. Beyond that,
//! nothing a client sends or fails to read makes the master hold more than a
//! bounded amount per connection:
//!
//! - a request line is at most [`MAX_REQUEST_LINE`] bytes (4 KiB; a request
//!   is a few dozen): a longer one gets an error naming the limit and the
//!   connection is closed, after at most about 16 KiB was read;
//! - an answer is at most [`MAX_LINE`] bytes (4 MiB): a larger one is
//!   replaced by an error saying so. The error for a line that is not a
//!   request echoes at most its first [`ECHO_PREFIX`] bytes, with its length,
//!   so it stays under 1 KiB whatever was sent;
//! - every answer must be written within [`WRITE_TIMEOUT`] (5 s): a client
//!   that does not read its answers loses its connection, and its slot;
//! - at most [`MAX_CONNECTIONS`] connections are served at once. One more
//!   gets a refusal line with [`Response::code`] [`CODE_TOO_MANY_CONNECTIONS`]
//!   ("the master is serving its limit of 16 control connections; try
//!   again") and is closed; a connection with no request for
//!   [`IDLE_TIMEOUT`] is closed.
//!
//! So the control socket holds at most `MAX_CONNECTIONS` × (16 KiB of read
//! buffer + one answer of at most `MAX_LINE`), each answer for at most
//! `WRITE_TIMEOUT`; in practice an answer is a few KiB (a `status` row is
//! about 300 bytes).

mod client;
mod handle;
mod limits;
mod names;
mod server;
#[cfg(test)]
mod tests;
mod wire;

/// The reports of `reload` and `reload_agent` and their error: the crate's
/// own, with `took` as `took_ms`.
pub use crate::reload_handle::{AgentReloadReport, ReloadError, ReloadReport, ReplacedWorker};
pub use client::{ControlClient, ControlError, Listed, Silent, list, running};
pub(crate) use handle::{ControlStats, MasterHandle, OpsCall, Snapshot};
pub use limits::{
    AGENT_STATS_TOPIC, CODE_TOO_MANY_CONNECTIONS, ECHO_PREFIX, IDLE_TIMEOUT, LIST_TIMEOUT, MAX_CONNECTIONS, MAX_LINE,
    MAX_REQUEST_LINE, WRITE_TIMEOUT,
};
pub use names::{clusters_dir, default_name, socket_path, validate_name};
pub(crate) use server::ControlServer;
pub use wire::{ClusterInfo, ProcessInfo, Request, Response, StopReport};
