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
//! fails with [`Error::NameInUse`]; without an explicit name, a taken default
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
//! <- {"ok":false,"error":"worker 2 did not become ready: ..."}
//! -> {"cmd":"reload_agent"}
//! <- {"ok":true,"result":{"old_pid":4246,"old_epoch":1,"new_pid":4311,"epoch":2,"took_ms":212}}
//! ```
//!
//! Commands: `info` ([`ClusterInfo`]), `status` (a [`ProcessInfo`] per
//! process), `leader` (the agent's own report, as JSON; see
//! [`AGENT_STATS_TOPIC`]), `reload` ([`ReloadReport`]), `reload_agent`
//! ([`AgentReloadReport`]), `stop` ([`StopReport`];
//! the master starts a graceful stop and answers at once with the pids to
//! wait for).
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

use std::collections::HashMap;
use std::fs::{DirBuilder, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use tandem_protocol::internal::Throttle;

use crate::status::{ProcessState, StatusTable, cpu_seconds};
use crate::{Error, Messenger, Role, Target, WorkerId};

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
/// How long [`list`] waits for each master's `info` (they are asked at the
/// same time): 2 seconds. One that has not answered by then is listed as
/// `not answering`.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(2);
/// [`Response::code`] of the refusal a connection over [`MAX_CONNECTIONS`] gets.
pub const CODE_TOO_MANY_CONNECTIONS: &str = "too_many_connections";
/// How long a client whose request could not be sent (the master closed the
/// connection first) still waits for the line the master left: 2 seconds.
const REFUSAL_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The messenger topic on which the master asks the agent for its report
/// (JSON), for `tandem leader`, `tandem status` and the metrics. An agent that
/// does not answer it simply has no report.
pub const AGENT_STATS_TOPIC: &str = "tandem.leader.stats";
/// How long the master waits for the agent's report.
const AGENT_STATS_DEADLINE: Duration = Duration::from_secs(2);
/// The control socket's file name in the cluster's directory.
const SOCKET_FILE: &str = "control.sock";
const LOCK_FILE: &str = "lock";
const PID_FILE: &str = "master.pid";

// ---- names and paths -------------------------------------------------------

/// Checks that `name` can name a cluster: 1 to 64 characters among ASCII
/// letters, digits, `.`, `_` and `-`, not starting with `.`.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let invalid = |reason| Err(Error::InvalidName { name: name.to_owned(), reason });
    if name.is_empty() || name.len() > 64 {
        return invalid("it must have 1 to 64 characters");
    }
    if name.starts_with('.') {
        return invalid("it must not start with '.'");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return invalid("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// The default cluster name: the executable's file name.
pub fn default_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|n| {
            n.chars()
                .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
                .collect::<String>()
        })
        .map(|n| n.trim_start_matches('.').chars().take(64).collect::<String>())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "tandem".to_owned())
}

/// The directory holding one sub-directory per cluster of this user:
/// `$XDG_RUNTIME_DIR/tandem` or `<temp dir>/tandem-<uid>`.
pub fn clusters_dir() -> PathBuf {
    let base = crate::runtime_dir::base_dir();
    if base == std::env::temp_dir() {
        base.join(format!("tandem-{}", nix::unistd::getuid().as_raw()))
    } else {
        base.join("tandem")
    }
}

/// The control socket of the cluster `name`.
pub fn socket_path(name: &str) -> PathBuf {
    clusters_dir().join(name).join(SOCKET_FILE)
}

/// Creates `path` with mode 0700 if missing, then checks it is a directory
/// (not a symlink) owned by this user and closed to group and others.
fn private_dir(path: &Path) -> io::Result<()> {
    match DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!("{} is not a directory", path.display())));
    }
    if meta.uid() != nix::unistd::getuid().as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} belongs to uid {}, not to this user", path.display(), meta.uid()),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is open to other users (mode {:o})", path.display(), meta.mode() & 0o777),
        ));
    }
    Ok(())
}

// ---- the protocol ------------------------------------------------------------

/// A request on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// The cluster in one line: [`ClusterInfo`].
    Info,
    /// One [`ProcessInfo`] per process.
    Status,
    /// The agent's report (for a tandem agent, the Leader's introspection).
    Leader,
    /// Replace the workers one by one, each after its successor is ready: [`ReloadReport`].
    Reload,
    /// Replace the agent (stop it, start a new one with a higher epoch; the
    /// workers fail over to its Leader): [`AgentReloadReport`].
    ReloadAgent,
    /// Stop gracefully: [`StopReport`].
    Stop,
}

/// One response line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the command succeeded.
    pub ok: bool,
    /// Its result, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A stable code for failures a client handles on its own: only
    /// [`CODE_TOO_MANY_CONNECTIONS`] so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl Response {
    fn ok(result: impl Serialize) -> Self {
        match serde_json::to_value(result) {
            Ok(value) => Response { ok: true, result: Some(value), error: None, code: None },
            Err(e) => Response::err(format!("could not encode the result: {e}")),
        }
    }

    fn err(error: impl Into<String>) -> Self {
        Response { ok: false, result: None, error: Some(error.into()), code: None }
    }

    /// The refusal a connection over [`MAX_CONNECTIONS`] gets.
    fn too_many_connections() -> Self {
        Response {
            code: Some(CODE_TOO_MANY_CONNECTIONS.to_owned()),
            ..Response::err(format!(
                "the master is serving its limit of {MAX_CONNECTIONS} control connections; try again"
            ))
        }
    }

    /// The answer to a line that is not a request: its length, its first
    /// [`ECHO_PREFIX`] bytes and the parser's complaint (cut short too, as it
    /// may quote the line), so that it stays small whatever the line.
    fn bad_request(line: &str, error: &serde_json::Error) -> Self {
        let why = error.to_string();
        Response::err(format!(
            "bad request ({} bytes, starting {:?}{}): {}{}; expected {{\"cmd\":\"info|status|leader|reload|reload_agent|stop\"}}",
            line.len(),
            cut(line, ECHO_PREFIX),
            if line.len() > ECHO_PREFIX { "..." } else { "" },
            cut(&why, 2 * ECHO_PREFIX),
            if why.len() > 2 * ECHO_PREFIX { "..." } else { "" },
        ))
    }

    /// The answer to a request line over [`MAX_REQUEST_LINE`]: `start` is
    /// what was read of it.
    fn line_too_long(start: &[u8]) -> Self {
        let start = String::from_utf8_lossy(&start[..start.len().min(ECHO_PREFIX)]);
        Response::err(format!(
            "bad request: the line is longer than {MAX_REQUEST_LINE} bytes (the limit), starting {:?}...",
            cut(&start, ECHO_PREFIX)
        ))
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A [`Write`] that keeps at most `limit` bytes and counts the rest: an
/// answer over the limit is measured without being held.
#[derive(Debug)]
struct Capped {
    kept: Vec<u8>,
    limit: usize,
    len: usize,
}

impl Write for Capped {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.len += bytes.len();
        if self.len <= self.limit {
            self.kept.extend_from_slice(bytes);
        } else {
            self.kept = Vec::new();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One answer line of at most `limit` bytes: `response`, or an error saying
/// how large it was.
fn encode_reply(response: &Response, limit: usize) -> String {
    const FALLBACK: &str = r#"{"ok":false,"error":"the master could not encode its answer"}"#;
    let mut out = Capped { kept: Vec::new(), limit, len: 0 };
    if let Err(e) = serde_json::to_writer(&mut out, response) {
        tracing::warn!(error = %e, "could not encode a control answer");
        return FALLBACK.to_owned();
    }
    if out.len <= limit {
        // serde_json writes UTF-8.
        return String::from_utf8(out.kept).unwrap_or_else(|_| FALLBACK.to_owned());
    }
    tracing::warn!(bytes = out.len, limit, "a control answer is over the line limit; answered with an error instead");
    let error = Response::err(format!("the answer is {} bytes, over the control socket's limit of {limit}", out.len));
    serde_json::to_string(&error).unwrap_or_else(|_| FALLBACK.to_owned())
}

/// The answer to `info`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The cluster's name.
    pub name: String,
    /// The master's pid.
    pub pid: u32,
    /// How long the master has run, in milliseconds.
    pub uptime_ms: u64,
    /// Worker slots.
    pub workers: usize,
    /// Workers ready now.
    pub workers_online: usize,
    /// `starting` (until the first cluster-ready), `online` or `stopping`.
    pub state: String,
}

/// One process in the answer to `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// `master`, `agent` or `worker`.
    pub role: String,
    /// The worker id, for workers.
    pub slot: Option<WorkerId>,
    /// The current process's pid, when one runs.
    pub pid: Option<u32>,
    /// `starting`, `online`, `stopping`, `waiting-restart`, `failed`, `pending` or `stopped`.
    pub state: String,
    /// Processes started in this slot after the first one (crashes and reloads).
    pub restarts: u32,
    /// How long the current process has run, in milliseconds.
    pub uptime_ms: Option<u64>,
    /// CPU use in percent of one core: since the previous `status` or scrape
    /// (at least 100 ms before), else averaged over the process's life.
    pub cpu_percent: Option<f64>,
    /// CPU time used (user + system), in seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, in bytes.
    pub rss_bytes: Option<u64>,
    /// The agent's epoch.
    pub epoch: Option<u64>,
    /// On the agent's row: its report (for a tandem agent, the Leader's
    /// `Stats`), when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<serde_json::Value>,
}

/// One replaced worker in a [`ReloadReport`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replaced {
    /// The worker id.
    pub worker: WorkerId,
    /// The pid that was stopped.
    pub old_pid: u32,
    /// The pid of its ready successor.
    pub new_pid: u32,
}

/// The answer to a successful `reload`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The workers replaced, in order.
    pub replaced: Vec<Replaced>,
}

/// The answer to a successful `reload_agent`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentReloadReport {
    /// The agent that was stopped.
    pub old_pid: u32,
    /// Its epoch.
    pub old_epoch: u64,
    /// The new agent, ready.
    pub new_pid: u32,
    /// The new agent's epoch.
    pub epoch: u64,
    /// From the request to the new agent's ready report, in milliseconds.
    pub took_ms: u64,
}

/// The answer to `stop`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StopReport {
    /// Every process of the cluster (master included) at the time of the request.
    pub pids: Vec<u32>,
}

/// The state names the control socket and the metrics use.
pub(crate) fn state_name(state: ProcessState) -> &'static str {
    match state {
        ProcessState::Pending => "pending",
        ProcessState::Starting => "starting",
        ProcessState::Ready => "online",
        ProcessState::BackingOff => "waiting-restart",
        ProcessState::Failed => "failed",
        ProcessState::Stopping => "stopping",
        ProcessState::Stopped => "stopped",
    }
}

// ---- the client side ---------------------------------------------------------

/// Why a control request failed, from the CLI's point of view.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No cluster of this user has that name.
    #[error("no running cluster named {name:?}{}", known_list(.known))]
    NotRunning {
        /// The name asked for.
        name: String,
        /// The names of the clusters that answer.
        known: Vec<String>,
    },
    /// The socket exists but its master does not answer.
    #[error("cluster {name:?} is not answering on {}", .path.display())]
    NotAnswering {
        /// The name.
        name: String,
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socket belongs to another user.
    #[error("permission denied on {}: the cluster belongs to another user", .path.display())]
    PermissionDenied {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The master answered something that is not a response line.
    #[error("bad answer from the cluster's master: {0}")]
    Protocol(String),
    /// The master closed the connection without an answer.
    #[error("the cluster's master closed the connection without answering")]
    Closed {
        /// What failed: sending the request or reading the answer.
        #[source]
        source: io::Error,
    },
    /// The master is serving its limit of control connections
    /// ([`MAX_CONNECTIONS`]) and refused this one: try again.
    #[error("{0}")]
    Busy(String),
    /// The master refused or failed the command.
    #[error("{0}")]
    Failed(String),
}

impl ControlError {
    /// Whether the same request may succeed if tried again later: the master
    /// was busy or did not answer.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ControlError::Busy(_) | ControlError::NotAnswering { .. })
    }
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() { "; no cluster is running".to_owned() } else { format!("; running: {}", known.join(", ")) }
}

/// A connection to one cluster's master.
#[derive(Debug)]
pub struct Client {
    framed: Framed<UnixStream, LinesCodec>,
}

impl Client {
    /// Connects to the cluster `name` of this user.
    pub async fn connect(name: &str) -> Result<Client, ControlError> {
        Self::connect_to(&socket_path(name), name).await
    }

    /// Connects to the control socket at `path` (of the cluster `name`, for errors).
    pub async fn connect_to(path: &Path, name: &str) -> Result<Client, ControlError> {
        let path = path.to_owned();
        match UnixStream::connect(&path).await {
            Ok(stream) => {
                // The master drops a connection from another user without a
                // word (see `spawn`): say why here, not "connection closed".
                let (master, me) = (stream.peer_cred().map(|c| c.uid()), nix::unistd::getuid().as_raw());
                if let Ok(master) = master
                    && master != me
                {
                    let why = format!("the master runs as uid {master}, this is uid {me}");
                    return Err(ControlError::PermissionDenied {
                        path,
                        source: io::Error::new(io::ErrorKind::PermissionDenied, why),
                    });
                }
                Ok(Client { framed: Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE)) })
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                Err(ControlError::PermissionDenied { path, source: e })
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound) || validate_name(name).is_err() => {
                Err(ControlError::NotRunning { name: name.to_owned(), known: running().await })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // A socket file without a master: a master that died.
                Err(ControlError::NotRunning { name: name.to_owned(), known: running().await })
            }
            Err(source) => Err(ControlError::NotAnswering { name: name.to_owned(), path, source }),
        }
    }

    /// Sends one request and returns its result.
    ///
    /// A master at its connection limit writes its refusal and closes the
    /// connection, possibly before the request is sent: then sending fails
    /// (`EPIPE`, `ECONNRESET`) and the refusal is still read, for
    /// [`ControlError::Busy`] rather than the broken pipe.
    pub async fn call(&mut self, request: Request) -> Result<serde_json::Value, ControlError> {
        let line = serde_json::to_string(&request).map_err(|e| ControlError::Protocol(e.to_string()))?;
        if let Err(e) = self.framed.send(line).await {
            let sent = io_error(e);
            return match tokio::time::timeout(REFUSAL_READ_TIMEOUT, self.framed.next()).await {
                Ok(Some(Ok(line))) => response_result(&line),
                _ => Err(ControlError::Closed { source: sent }),
            };
        }
        match self.framed.next().await {
            Some(Ok(line)) => response_result(&line),
            Some(Err(LinesCodecError::Io(e))) => Err(ControlError::Closed { source: e }),
            Some(Err(e)) => Err(ControlError::Protocol(e.to_string())),
            None => Err(ControlError::Closed { source: io::ErrorKind::UnexpectedEof.into() }),
        }
    }

    /// [`call`](Self::call), failing with [`ControlError::NotAnswering`] after `timeout`.
    pub async fn call_within(
        &mut self,
        name: &str,
        request: Request,
        timeout: Duration,
    ) -> Result<serde_json::Value, ControlError> {
        match tokio::time::timeout(timeout, self.call(request)).await {
            Ok(result) => result,
            Err(_) => Err(ControlError::NotAnswering {
                name: name.to_owned(),
                path: socket_path(name),
                source: io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")),
            }),
        }
    }

    /// [`call`](Self::call), decoding the result as `T`.
    pub async fn call_as<T: serde::de::DeserializeOwned>(&mut self, request: Request) -> Result<T, ControlError> {
        let value = self.call(request).await?;
        serde_json::from_value(value).map_err(|e| ControlError::Protocol(e.to_string()))
    }
}

fn io_error(e: LinesCodecError) -> io::Error {
    match e {
        LinesCodecError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// The result in one answer line.
fn response_result(line: &str) -> Result<serde_json::Value, ControlError> {
    let response: Response = serde_json::from_str(line).map_err(|e| ControlError::Protocol(e.to_string()))?;
    match (response.ok, response.result, response.error) {
        (true, Some(result), _) => Ok(result),
        (true, None, _) => Ok(serde_json::Value::Null),
        (false, _, error) => {
            let error = error.unwrap_or_else(|| "failed".into());
            if response.code.as_deref() == Some(CODE_TOO_MANY_CONNECTIONS) {
                Err(ControlError::Busy(error))
            } else {
                Err(ControlError::Failed(error))
            }
        }
    }
}

/// The names of this user's running clusters (answering or not), sorted.
pub async fn running() -> Vec<String> {
    list().await.into_iter().map(|listed| listed.name().to_owned()).collect()
}

/// One cluster in [`list`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Listed {
    /// Its master answered `info`.
    Answering(ClusterInfo),
    /// Its master holds the socket but gave no `info`.
    Silent(Silent),
}

impl Listed {
    /// The cluster's name.
    pub fn name(&self) -> &str {
        match self {
            Listed::Answering(info) => &info.name,
            Listed::Silent(silent) => &silent.name,
        }
    }
}

/// A cluster whose master gave no `info` to [`list`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Silent {
    /// The cluster's name.
    pub name: String,
    /// The master's pid, from its pid file.
    pub pid: Option<u32>,
    /// `not answering` (no answer within [`LIST_TIMEOUT`], or the connection
    /// failed) or `busy` (serving its limit of control connections).
    pub state: String,
    /// Why, in words.
    pub error: String,
}

/// Every running cluster of this user, sorted by name: `info` from each
/// master, asked at the same time, or why it gave none within
/// [`LIST_TIMEOUT`]. A socket nobody listens on (a master that died) is not
/// listed.
pub async fn list() -> Vec<Listed> {
    let dir = clusters_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join(SOCKET_FILE).exists())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|name| validate_name(name).is_ok())
        .collect();
    names.sort();
    let asks = names.into_iter().map(|name| {
        let dir = dir.join(&name);
        async move { list_one(name, &dir).await }
    });
    futures::future::join_all(asks).await.into_iter().flatten().collect()
}

/// `info` from the master in `dir`; `None` when nobody listens there.
async fn list_one(name: String, dir: &Path) -> Option<Listed> {
    let ask = async {
        let stream = match UnixStream::connect(dir.join(SOCKET_FILE)).await {
            Ok(stream) => stream,
            // A socket file left by a master that died.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => return None,
            Err(e) => return Some(Err(("not answering", e.to_string()))),
        };
        let mut client = Client { framed: Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE)) };
        Some(match client.call_as::<ClusterInfo>(Request::Info).await {
            Ok(info) => Ok(info),
            Err(e @ ControlError::Busy(_)) => Err(("busy", e.to_string())),
            Err(e) => Err(("not answering", error_chain(&e))),
        })
    };
    let (state, error) = match tokio::time::timeout(LIST_TIMEOUT, ask).await {
        Ok(None) => return None,
        Ok(Some(Ok(info))) => return Some(Listed::Answering(info)),
        Ok(Some(Err(why))) => why,
        Err(_) => ("not answering", format!("no answer within {LIST_TIMEOUT:?}")),
    };
    let pid = std::fs::read_to_string(dir.join(PID_FILE)).ok().and_then(|s| s.trim().parse().ok());
    Some(Listed::Silent(Silent { name, pid, state: state.to_owned(), error }))
}

/// `error` and its causes, `: `-separated.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line += &format!(": {cause}");
        source = cause.source();
    }
    line
}

// ---- the master side ---------------------------------------------------------

/// What the control socket and the metrics ask of the master's loop.
#[derive(Debug)]
pub(crate) enum OpsCall {
    Snapshot(oneshot::Sender<Snapshot>),
    /// Start a graceful stop; answer with every pid.
    Stop(oneshot::Sender<Vec<u32>>),
}

/// The master's state, as the control socket and the metrics see it.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub name: String,
    pub pid: u32,
    pub uptime: Duration,
    pub stopping: bool,
    pub announced: bool,
    pub table: StatusTable,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))] // read by `/metrics`
    pub messages: crate::router::MessageCounts,
}

/// Counters kept outside the master's loop.
#[derive(Debug, Default)]
pub(crate) struct ControlStats {
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// The previous CPU sample per pid, for CPU % between samples.
    cpu_samples: std::sync::Mutex<HashMap<u32, (f64, Instant)>>,
}

/// How the control socket and the metrics endpoint reach the master.
#[derive(Debug, Clone)]
pub(crate) struct MasterHandle {
    pub calls: mpsc::Sender<OpsCall>,
    /// The master's rolling reload (SIGHUP does the same).
    pub reload: crate::cluster_control::ClusterControl,
    pub messenger: Messenger,
    pub stats: Arc<ControlStats>,
}

const MASTER_GONE: &str = "the master is stopping";

impl MasterHandle {
    pub(crate) async fn snapshot(&self) -> Result<Snapshot, String> {
        let (tx, rx) = oneshot::channel();
        self.calls.send(OpsCall::Snapshot(tx)).await.map_err(|_| MASTER_GONE.to_owned())?;
        rx.await.map_err(|_| MASTER_GONE.to_owned())
    }

    /// The agent's report, `None` when it does not answer.
    pub(crate) async fn agent_stats(&self) -> Option<serde_json::Value> {
        match self.messenger.request(Target::Agent, AGENT_STATS_TOPIC, "", AGENT_STATS_DEADLINE).await {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(value) => Some(value),
                Err(e) => {
                    tracing::debug!(error = %e, "the agent's report is not JSON");
                    None
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "no report from the agent");
                None
            }
        }
    }

    pub(crate) fn info(snapshot: &Snapshot) -> ClusterInfo {
        let workers: Vec<_> = snapshot.table.rows.iter().filter(|r| r.role == Role::Worker).collect();
        ClusterInfo {
            name: snapshot.name.clone(),
            pid: snapshot.pid,
            uptime_ms: millis(snapshot.uptime),
            workers: workers.len(),
            workers_online: workers.iter().filter(|r| r.state == ProcessState::Ready).count(),
            state: if snapshot.stopping {
                "stopping"
            } else if snapshot.announced {
                "online"
            } else {
                "starting"
            }
            .to_owned(),
        }
    }

    /// One [`ProcessInfo`] per row, with CPU use since the previous sample.
    pub(crate) fn processes(&self, snapshot: &Snapshot, leader: Option<serde_json::Value>) -> Vec<ProcessInfo> {
        let now = Instant::now();
        let mut samples = self.stats.cpu_samples.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = Vec::new();
        let mut leader = leader;
        let rows = snapshot
            .table
            .rows
            .iter()
            .map(|row| {
                let cpu = row.pid.and_then(cpu_seconds);
                let cpu_percent = match (row.pid, cpu) {
                    (Some(pid), Some(cpu)) => {
                        seen.push(pid);
                        let percent = match samples.get(&pid) {
                            Some(&(before, at)) if now.duration_since(at) >= Duration::from_millis(100) => {
                                Some((cpu - before).max(0.0) / now.duration_since(at).as_secs_f64() * 100.0)
                            }
                            _ => row.uptime.filter(|u| !u.is_zero()).map(|u| cpu / u.as_secs_f64() * 100.0),
                        };
                        if samples.get(&pid).is_none_or(|&(_, at)| now.duration_since(at) >= Duration::from_millis(100))
                        {
                            samples.insert(pid, (cpu, now));
                        }
                        percent
                    }
                    _ => None,
                };
                ProcessInfo {
                    role: row.role.to_string(),
                    slot: row.worker_id,
                    pid: row.pid,
                    state: state_name(row.state).to_owned(),
                    restarts: row.restarts,
                    uptime_ms: row.uptime.map(millis),
                    cpu_percent: cpu_percent.map(|p| (p * 10.0).round() / 10.0),
                    cpu_seconds: cpu,
                    rss_bytes: row.rss_bytes,
                    epoch: row.epoch,
                    leader: if row.role == Role::Agent { leader.take() } else { None },
                }
            })
            .collect();
        samples.retain(|pid, _| seen.contains(pid));
        rows
    }
}

/// The rolling reload, as SIGHUP runs it (`ClusterControl::reload`): each
/// worker slot is replaced by a successor that must be ready before its
/// predecessor drains; a failure rolls back and keeps the old workers. One
/// reload at a time: a second request is refused, not queued.
pub(crate) async fn reload_workers(handle: &MasterHandle) -> Result<ReloadReport, String> {
    match handle.reload.reload().await {
        // The master counts reloads (`reloads_ok`/`reloads_failed`) as they end.
        Ok(report) => {
            let replaced = report
                .replaced
                .into_iter()
                .map(|r| Replaced { worker: r.id, old_pid: r.old_pid, new_pid: r.new_pid })
                .collect();
            Ok(ReloadReport { replaced })
        }
        Err(error) => Err(error.to_string()),
    }
}

/// The agent's reload (`ClusterControl::reload_agent`): the old agent stops,
/// a new one starts with a higher epoch, the workers fail over to it.
pub(crate) async fn reload_agent(handle: &MasterHandle) -> Result<AgentReloadReport, String> {
    match handle.reload.reload_agent().await {
        Ok(r) => Ok(AgentReloadReport {
            old_pid: r.old_pid,
            old_epoch: r.old_epoch,
            new_pid: r.new_pid,
            epoch: r.epoch,
            took_ms: millis(r.took),
        }),
        Err(error) => Err(error.to_string()),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The bound control socket, its directory lock and pid file.
#[derive(Debug)]
pub(crate) struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    pid_file: PathBuf,
    /// The name's directory, removed with the lock file at drop.
    dir: PathBuf,
    lock: Option<nix::fcntl::Flock<File>>,
}

impl ControlServer {
    /// Takes the name (or fails with [`Error::NameInUse`]) and binds the socket.
    pub(crate) fn bind(name: &str) -> Result<Self, Error> {
        Self::bind_in(&clusters_dir(), name)
    }

    fn bind_in(clusters: &Path, name: &str) -> Result<Self, Error> {
        validate_name(name)?;
        let dir = clusters.join(name);
        let setup = |source| Error::Control { what: "control socket", path: dir.display().to_string(), source };
        let pid_file = dir.join(PID_FILE);
        // The name's directory goes when its master stops: (re)made under the lock's retry.
        let prepare = || private_dir(clusters).and_then(|()| private_dir(&dir));
        let lock = match crate::runtime_dir::lock_name_dir(&dir, LOCK_FILE, prepare).map_err(setup)? {
            Some(lock) => lock,
            None => {
                let pid = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
                return Err(Error::NameInUse { name: name.to_owned(), pid });
            }
        };
        let path = dir.join(SOCKET_FILE);
        // We hold the lock: a socket file here is a dead master's.
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed the control socket of a master that died"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(setup(e)),
        }
        let listener = UnixListener::bind(&path).map_err(setup)?;
        let mut file = File::create(&pid_file).map_err(setup)?;
        writeln!(file, "{}", std::process::id()).map_err(setup)?;
        tracing::debug!(path = %path.display(), "control socket");
        Ok(ControlServer { listener, path, pid_file, dir, lock: Some(lock) })
    }

    /// Binds the default name (the executable's file name); when a live
    /// cluster has it, the first free one of `<name>-2`, `<name>-3`, ... (up
    /// to `-100`), said at INFO. Returns the name taken.
    pub(crate) fn bind_default() -> Result<(String, Self), Error> {
        let base = default_name();
        let mut last = None;
        for n in 1..=100 {
            let name = if n == 1 { base.clone() } else { format!("{base}-{n}") };
            match Self::bind(&name) {
                Ok(server) => {
                    if n > 1 {
                        tracing::info!(
                            name,
                            taken = base,
                            "a cluster named {base:?} is running; this one is named {name:?}"
                        );
                    }
                    return Ok((name, server));
                }
                Err(e @ Error::NameInUse { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(Error::NameInUse { name: base, pid: 0 }))
    }

    /// Serves connections until `cancel`.
    pub(crate) fn spawn(self, handle: MasterHandle, tracker: &TaskTracker, cancel: CancellationToken) {
        let tasks = tracker.clone();
        tracker.spawn(
            async move {
                let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
                let uid = nix::unistd::getuid().as_raw();
                let mut errors = tandem_protocol::internal::AcceptErrors::new("control");
                let mut refusals = Throttle::default();
                let warnings = Arc::new(Warnings::default());
                loop {
                    let stream = tokio::select! {
                        accepted = self.listener.accept() => match accepted {
                            Ok((stream, _)) => {
                                errors.succeeded();
                                stream
                            }
                            Err(e) => {
                                // Out of descriptors: one of the master's reserve for this accept.
                                if crate::descriptors::release_one_for(&e) {
                                    continue;
                                }
                                tokio::time::sleep(errors.failed(&e)).await;
                                continue;
                            }
                        },
                        _ = cancel.cancelled() => break,
                    };
                    match stream.peer_cred() {
                        Ok(cred) if cred.uid() == uid => {}
                        Ok(cred) => {
                            tracing::warn!(peer.uid = cred.uid(), "control connection from another user refused");
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control connection without credentials refused");
                            continue;
                        }
                    }
                    let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                        refuse(stream);
                        if let Some(suppressed) = refusals.hit() {
                            tracing::warn!(
                                limit = MAX_CONNECTIONS,
                                suppressed,
                                "control connection refused: serving the limit of control connections"
                            );
                        }
                        continue;
                    };
                    let framed = Framed::new(stream, LinesCodec::new_with_max_length(MAX_REQUEST_LINE));
                    let (handle, cancel, warnings) = (handle.clone(), cancel.clone(), Arc::clone(&warnings));
                    tasks.spawn(
                        async move {
                            serve_connection(framed, handle, cancel, &warnings).await;
                            drop(permit);
                        }
                        .in_current_span(),
                    );
                }
                drop(self);
            }
            .in_current_span(),
        );
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // The lock is still ours: these files are ours to remove.
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.pid_file);
        if let Some(lock) = self.lock.take() {
            crate::runtime_dir::remove_name_dir(&self.dir, LOCK_FILE, lock);
        }
    }
}

/// Writes the refusal to a connection over [`MAX_CONNECTIONS`] and closes
/// it, without a task: the line (about 150 bytes) goes into the new socket's
/// empty send buffer at once. A request the client sent first stays unread;
/// its client reads the refusal, then the reset.
fn refuse(stream: UnixStream) {
    let mut line = encode_reply(&Response::too_many_connections(), MAX_LINE);
    line.push('\n');
    let written = stream.into_std().and_then(|mut stream| stream.write(line.as_bytes()));
    match written {
        Ok(n) if n == line.len() => {}
        Ok(n) => tracing::debug!(written = n, bytes = line.len(), "control refusal cut short"),
        Err(e) => tracing::debug!(error = %e, "control refusal not written"),
    }
}

/// The rate limits of the warnings that a flood of connections can repeat.
#[derive(Debug, Default)]
struct Warnings {
    bad_requests: std::sync::Mutex<Throttle>,
    slow_readers: std::sync::Mutex<Throttle>,
}

impl Warnings {
    /// Whether to log one more `which` now: `Some(held back since the last one)`.
    fn hit(which: &std::sync::Mutex<Throttle>) -> Option<u64> {
        which.lock().unwrap_or_else(|p| p.into_inner()).hit()
    }
}

/// Writes one answer, whole, within [`WRITE_TIMEOUT`]. `false` when the
/// connection is to be closed: the client went away, or did not read.
async fn send(framed: &mut Framed<UnixStream, LinesCodec>, response: &Response, warnings: &Warnings) -> bool {
    let line = encode_reply(response, MAX_LINE);
    let bytes = line.len();
    match tokio::time::timeout(WRITE_TIMEOUT, framed.send(line)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "control client gone before its answer was written");
            false
        }
        Err(_) => {
            if let Some(suppressed) = Warnings::hit(&warnings.slow_readers) {
                tracing::warn!(
                    bytes,
                    timeout_ms = millis(WRITE_TIMEOUT),
                    suppressed,
                    "control client did not read its answer in time; connection closed and its slot freed"
                );
            }
            false
        }
    }
}

async fn serve_connection(
    mut framed: Framed<UnixStream, LinesCodec>,
    handle: MasterHandle,
    cancel: CancellationToken,
    warnings: &Warnings,
) {
    loop {
        let line = tokio::select! {
            line = tokio::time::timeout(IDLE_TIMEOUT, framed.next()) => line,
            _ = cancel.cancelled() => return,
        };
        let line = match line {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(LinesCodecError::MaxLineLengthExceeded))) => {
                // The codec leaves what it read of the line in the buffer.
                let response = Response::line_too_long(framed.read_buffer());
                if let Some(suppressed) = Warnings::hit(&warnings.bad_requests) {
                    tracing::warn!(
                        limit = MAX_REQUEST_LINE,
                        suppressed,
                        "control request line too long; connection closed"
                    );
                }
                let _ = send(&mut framed, &response, warnings).await;
                return;
            }
            Ok(Some(Err(LinesCodecError::Io(e)))) if e.kind() != io::ErrorKind::InvalidData => {
                tracing::debug!(error = %e, "control connection failed");
                return;
            }
            Ok(Some(Err(LinesCodecError::Io(e)))) => {
                // A line that is not UTF-8.
                let response = Response::err(format!("bad request line: {e}"));
                if let Some(suppressed) = Warnings::hit(&warnings.bad_requests) {
                    tracing::warn!(error = %e, suppressed, "unreadable control request; connection closed");
                }
                let _ = send(&mut framed, &response, warnings).await;
                return;
            }
            Ok(None) | Err(_) => return,
        };
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                tracing::debug!(?request, "control request");
                answer(request, &handle).await
            }
            Err(e) => {
                if let Some(suppressed) = Warnings::hit(&warnings.bad_requests) {
                    tracing::warn!(bytes = line.len(), error = %cut(&e.to_string(), 2 * ECHO_PREFIX), suppressed, "bad control request");
                }
                Response::bad_request(&line, &e)
            }
        };
        if !send(&mut framed, &response, warnings).await {
            return;
        }
    }
}

async fn answer(request: Request, handle: &MasterHandle) -> Response {
    match request {
        Request::Info => match handle.snapshot().await {
            Ok(s) => Response::ok(MasterHandle::info(&s)),
            Err(e) => Response::err(e),
        },
        Request::Status => {
            let leader = handle.agent_stats().await;
            match handle.snapshot().await {
                Ok(s) => Response::ok(handle.processes(&s, leader)),
                Err(e) => Response::err(e),
            }
        }
        Request::Leader => match handle.agent_stats().await {
            Some(stats) => Response::ok(stats),
            None => Response::err("the agent did not answer (not running, or it serves no report)"),
        },
        Request::Reload => match reload_workers(handle).await {
            Ok(report) => Response::ok(report),
            Err(e) => Response::err(e),
        },
        Request::ReloadAgent => match reload_agent(handle).await {
            Ok(report) => Response::ok(report),
            Err(e) => Response::err(e),
        },
        Request::Stop => {
            let (tx, rx) = oneshot::channel();
            if handle.calls.send(OpsCall::Stop(tx)).await.is_err() {
                return Response::err(MASTER_GONE);
            }
            match rx.await {
                Ok(pids) => Response::ok(StopReport { pids }),
                Err(_) => Response::err(MASTER_GONE),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("config_center").is_ok());
        assert!(validate_name("a.b-c_1").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "x y", &"n".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn requests_are_json_lines() {
        assert_eq!(serde_json::to_string(&Request::Status).unwrap(), r#"{"cmd":"status"}"#);
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"reload"}"#).unwrap(), Request::Reload);
        assert_eq!(serde_json::to_string(&Request::ReloadAgent).unwrap(), r#"{"cmd":"reload_agent"}"#);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"rm -rf"}"#).is_err());
    }

    #[test]
    fn the_refusal_line_is_pinned() {
        assert_eq!(
            encode_reply(&Response::too_many_connections(), MAX_LINE),
            r#"{"ok":false,"error":"the master is serving its limit of 16 control connections; try again","code":"too_many_connections"}"#
        );
        let refused = response_result(&encode_reply(&Response::too_many_connections(), MAX_LINE));
        assert!(matches!(&refused, Err(e @ ControlError::Busy(_)) if e.is_retryable()), "{refused:?}");
        let failed = response_result(r#"{"ok":false,"error":"reload already running"}"#);
        assert!(matches!(&failed, Err(ControlError::Failed(e)) if e == "reload already running"), "{failed:?}");
    }

    #[test]
    fn a_bad_request_is_echoed_cut_short_with_its_length() {
        let why = |line: &str| {
            let e = serde_json::from_str::<Request>(line).unwrap_err();
            Response::bad_request(line, &e)
        };
        assert_eq!(
            why("status").error.as_deref(),
            Some(
                r#"bad request (6 bytes, starting "status"): expected value at line 1 column 1; expected {"cmd":"info|status|leader|reload|reload_agent|stop"}"#
            )
        );
        // The repro of issue 23: 4 MiB of \x01 (Debug-escaped, each is 5 bytes).
        let flood = "\u{1}".repeat(4 * 1024 * 1024);
        let line = encode_reply(&why(&flood), MAX_LINE);
        assert!(line.len() < 1024, "{} bytes: {line}", line.len());
        let prefix = r"\\u{1}".repeat(ECHO_PREFIX);
        assert!(line.contains(&format!(r#"(4194304 bytes, starting \"{prefix}\"...): "#)), "{line}");
        // The parser quotes an unknown command: cut short too.
        let long = format!(r#"{{"cmd":"{}"}}"#, "é".repeat(2000));
        let line = encode_reply(&why(&long), MAX_LINE);
        assert!(line.len() < 1024, "{} bytes: {line}", line.len());
        assert!(line.contains("(4010 bytes, starting ") && line.contains("unknown variant"), "{line}");
        let too_long = encode_reply(&Response::line_too_long(&[b'x'; MAX_REQUEST_LINE + 1]), MAX_LINE);
        assert!(too_long.len() < 1024, "{too_long}");
        assert!(
            too_long.contains(&format!("longer than 4096 bytes (the limit), starting \\\"{}\\\"...", "x".repeat(64)))
        );
    }

    #[test]
    fn cut_stops_at_a_character_boundary() {
        assert_eq!(cut("abc", 10), "abc");
        assert_eq!(cut("abc", 2), "ab");
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("", 0), "");
    }

    #[test]
    fn an_answer_over_the_line_limit_is_replaced_by_an_error() {
        let small = Response::ok("x".repeat(20));
        assert_eq!(encode_reply(&small, 64), serde_json::to_string(&small).unwrap());
        let big = Response::ok("x".repeat(100));
        let line = encode_reply(&big, 64);
        assert_eq!(line, r#"{"ok":false,"error":"the answer is 123 bytes, over the control socket's limit of 64"}"#);
        assert_eq!(serde_json::to_string(&big).unwrap().len(), 123);
    }

    /// A client that never reads: its answer (larger than the socket's
    /// buffers) is abandoned after `WRITE_TIMEOUT`, the connection to be
    /// closed; one that reads gets it.
    #[tokio::test(start_paused = true)]
    async fn an_answer_not_read_is_abandoned_after_the_write_timeout() {
        let answer = Response::ok("x".repeat(MAX_LINE - 100));
        let (master, _client) = UnixStream::pair().unwrap();
        let mut framed = Framed::new(master, LinesCodec::new_with_max_length(MAX_REQUEST_LINE));
        let started = tokio::time::Instant::now();
        assert!(!send(&mut framed, &answer, &Warnings::default()).await);
        assert_eq!(started.elapsed(), WRITE_TIMEOUT);

        let (master, client) = UnixStream::pair().unwrap();
        let mut framed = Framed::new(master, LinesCodec::new_with_max_length(MAX_REQUEST_LINE));
        let reader = tokio::spawn(async move {
            let mut client = Framed::new(client, LinesCodec::new_with_max_length(MAX_LINE));
            client.next().await.map(|line| line.map(|l| l.len()))
        });
        let started = tokio::time::Instant::now();
        assert!(send(&mut framed, &answer, &Warnings::default()).await);
        assert!(started.elapsed() < WRITE_TIMEOUT);
        assert_eq!(reader.await.unwrap().unwrap().unwrap(), MAX_LINE - 100 + r#"{"ok":true,"result":""}"#.len());
    }

    /// The master refuses a connection over its limit (`refuse`) and closes
    /// it: whether that happens before the client sent its request (which
    /// then fails with EPIPE) or after, the client reads the refusal.
    #[tokio::test]
    async fn a_refused_client_reads_the_refusal_even_when_its_request_was_not_sent() {
        let base = tempfile_dir();
        let path = base.join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let busy = "the master is serving its limit of 16 control connections; try again";

        // Refused (and closed) before the request is sent.
        let mut client = Client::connect_to(&path, "app").await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        refuse(stream);
        match client.call(Request::Status).await {
            Err(ControlError::Busy(why)) => assert_eq!(why, busy),
            other => panic!("expected Busy, got {other:?}"),
        }

        // Refused after the request arrived (it stays unread).
        let mut client = Client::connect_to(&path, "app").await.unwrap();
        let call = tokio::spawn(async move { client.call(Request::Status).await });
        let (stream, _) = listener.accept().await.unwrap();
        stream.readable().await.unwrap();
        refuse(stream);
        match call.await.unwrap() {
            Err(ControlError::Busy(why)) => assert_eq!(why, busy),
            other => panic!("expected Busy, got {other:?}"),
        }

        // Closed without a word: the cause is said, not "bad answer".
        let mut client = Client::connect_to(&path, "app").await.unwrap();
        drop(listener.accept().await.unwrap());
        let closed = client.call(Request::Status).await;
        assert!(matches!(closed, Err(ControlError::Closed { .. })), "{closed:?}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn private_dir_refuses_open_directories() {
        let base = tempfile_dir();
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(private_dir(&open).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        let fresh = base.join("fresh");
        private_dir(&fresh).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[tokio::test]
    async fn one_master_per_name_and_a_dead_masters_socket_is_taken_over() {
        let base = tempfile_dir();
        let clusters = base.join("tandem");
        let first = ControlServer::bind_in(&clusters, "app").unwrap();
        match ControlServer::bind_in(&clusters, "app") {
            Err(Error::NameInUse { name, pid }) => assert_eq!((name.as_str(), pid), ("app", std::process::id())),
            other => panic!("expected NameInUse, got {other:?}"),
        }
        assert_eq!(std::fs::metadata(&clusters).unwrap().mode() & 0o777, 0o700);
        assert!(ControlServer::bind_in(&clusters, "other").is_ok());
        drop(first);
        assert!(!clusters.join("app").exists(), "a stopped master removes its name's directory");
        // A master that died leaves its directory and socket file behind (and no lock holder).
        private_dir(&clusters.join("app")).unwrap();
        let stale = clusters.join("app").join(SOCKET_FILE);
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let second = ControlServer::bind_in(&clusters, "app").unwrap();
        assert!(UnixStream::connect(&stale).await.is_ok(), "the new master listens on the path");
        drop(second);
        assert!(!stale.exists(), "the socket is removed with its master");
        assert!(matches!(ControlServer::bind_in(&clusters, "../x"), Err(Error::InvalidName { .. })));
        std::fs::remove_dir_all(&base).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("tandem-control-test-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
