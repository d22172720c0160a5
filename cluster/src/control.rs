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
//! Limits: a line is at most [`MAX_LINE`] bytes (a longer one gets an error
//! and the connection is closed); at most [`MAX_CONNECTIONS`] connections at
//! once (one more gets an error line and is closed); a connection idle for
//! [`IDLE_TIMEOUT`] is closed. Only processes of the master's own user may
//! connect: the peer's uid is checked with `SO_PEERCRED` on every connection.

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
use tokio_util::codec::{Framed, LinesCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::status::{ProcessState, StatusTable, cpu_seconds};
use crate::{Error, Messenger, Role, Target, WorkerId};

/// The longest request or response line, in bytes: 4 MiB (a status of many
/// workers or a leader report with many keys fits).
pub const MAX_LINE: usize = 4 * 1024 * 1024;
/// Control connections served at once. The default is 16.
pub const MAX_CONNECTIONS: usize = 16;
/// A control connection with no request for this long is closed: 60 seconds.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
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
}

impl Response {
    fn ok(result: impl Serialize) -> Self {
        match serde_json::to_value(result) {
            Ok(value) => Response { ok: true, result: Some(value), error: None },
            Err(e) => Response::err(format!("could not encode the result: {e}")),
        }
    }

    fn err(error: impl Into<String>) -> Self {
        Response { ok: false, result: None, error: Some(error.into()) }
    }
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
    /// The master refused or failed the command.
    #[error("{0}")]
    Failed(String),
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
    pub async fn call(&mut self, request: Request) -> Result<serde_json::Value, ControlError> {
        let line = serde_json::to_string(&request).map_err(|e| ControlError::Protocol(e.to_string()))?;
        self.framed.send(line).await.map_err(|e| ControlError::Protocol(e.to_string()))?;
        let line = match self.framed.next().await {
            Some(Ok(line)) => line,
            Some(Err(e)) => return Err(ControlError::Protocol(e.to_string())),
            None => return Err(ControlError::Protocol("the master closed the connection".into())),
        };
        let response: Response = serde_json::from_str(&line).map_err(|e| ControlError::Protocol(e.to_string()))?;
        match (response.ok, response.result, response.error) {
            (true, Some(result), _) => Ok(result),
            (true, None, _) => Ok(serde_json::Value::Null),
            (false, _, error) => Err(ControlError::Failed(error.unwrap_or_else(|| "failed".into()))),
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

/// The names of this user's clusters whose master answers `info`, sorted.
pub async fn running() -> Vec<String> {
    list().await.into_iter().map(|info| info.name).collect()
}

/// `info` from every cluster of this user whose master answers, sorted by name.
pub async fn list() -> Vec<ClusterInfo> {
    let Ok(entries) = std::fs::read_dir(clusters_dir()) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join(SOCKET_FILE).exists())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let path = socket_path(&name);
        let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(&path)).await else {
            continue;
        };
        let mut client = Client { framed: Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE)) };
        if let Ok(Ok(info)) =
            tokio::time::timeout(Duration::from_secs(2), client.call_as::<ClusterInfo>(Request::Info)).await
        {
            out.push(info);
        }
    }
    out
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
                let mut errors = tandem_protocol::AcceptErrors::new("control");
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
                    let mut framed = Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE));
                    let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                        let refusal = Response::err(format!("too many control connections (limit {MAX_CONNECTIONS})"));
                        tasks.spawn(async move { send(&mut framed, &refusal).await }.in_current_span());
                        continue;
                    };
                    let (handle, cancel) = (handle.clone(), cancel.clone());
                    tasks.spawn(
                        async move {
                            serve_connection(framed, handle, cancel).await;
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

async fn send(framed: &mut Framed<UnixStream, LinesCodec>, response: &Response) -> bool {
    match serde_json::to_string(response) {
        Ok(line) => framed.send(line).await.is_ok(),
        Err(_) => false,
    }
}

async fn serve_connection(mut framed: Framed<UnixStream, LinesCodec>, handle: MasterHandle, cancel: CancellationToken) {
    loop {
        let line = tokio::select! {
            line = tokio::time::timeout(IDLE_TIMEOUT, framed.next()) => line,
            _ = cancel.cancelled() => return,
        };
        let line = match line {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(e))) => {
                let _ = send(&mut framed, &Response::err(format!("bad request line: {e}"))).await;
                return;
            }
            Ok(None) | Err(_) => return,
        };
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                tracing::debug!(?request, "control request");
                answer(request, &handle).await
            }
            Err(e) => Response::err(format!(
                "bad request {line:?}: {e}; expected {{\"cmd\":\"info|status|leader|reload|reload_agent|stop\"}}"
            )),
        };
        if !send(&mut framed, &response).await {
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
