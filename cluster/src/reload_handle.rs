//! [`ClusterControl`], the handle code in the master process uses to ask the
//! running master for a reload (of the workers, or of the agent), a scale or
//! a restart of one process, and what they answer: the same report and error
//! types the control socket sends the `tandem` CLI (`took` is `took_ms` on the
//! wire). The master's side of a reload is in [`reload`](crate::reload) (the
//! workers' rolling replacement, and a worker's restart: a run of one slot),
//! [`agent_reload`](crate::agent_reload) (the agent's failover onto a new
//! process) and [`scale`](crate::scale) (the worker count).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::{StartFailure, WorkerId};

/// Control calls queued for the master loop.
pub(crate) const CONTROL_CALLS_CAPACITY: usize = 16;

/// Why a process was replaced (a worker's in
/// [`ClusterEvent::WorkerReplaced`](crate::ClusterEvent::WorkerReplaced)), or
/// what replacement is running (in [`ReloadError::InProgress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReplaceReason {
    /// A reload of the workers (SIGHUP or [`ClusterControl::reload`]).
    Reload,
    /// Its RSS exceeded the memory limit.
    MaxMemory,
    /// A reload of the agent ([`ClusterControl::reload_agent`]).
    AgentReload,
    /// A change of the worker count ([`ClusterControl::scale`]).
    Scale,
    /// A restart of one worker asked for ([`ClusterControl::restart_worker`]).
    Restart,
}

impl fmt::Display for ReplaceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplaceReason::Reload => "reload",
            ReplaceReason::MaxMemory => "max-memory",
            ReplaceReason::AgentReload => "reload of the agent",
            ReplaceReason::Scale => "scale",
            ReplaceReason::Restart => "restart",
        })
    }
}

/// One replaced worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplacedWorker {
    /// The slot (`worker` on the wire).
    #[serde(rename = "worker")]
    pub id: WorkerId,
    /// The old process.
    pub old_pid: u32,
    /// Its successor.
    pub new_pid: u32,
}

/// The outcome of a successful reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The replaced workers, by slot.
    pub replaced: Vec<ReplacedWorker>,
    /// Slots with no ready process when the reload began (starting, backing
    /// off, failed): left to the supervisor, not replaced.
    #[serde(default)]
    pub skipped: Vec<WorkerId>,
    /// The workers' pids after the reload, by slot (`None`: no process).
    #[serde(default)]
    pub workers: Vec<Option<u32>>,
    /// How long it took (`took_ms` on the wire).
    #[serde(rename = "took_ms", with = "millis", default)]
    pub took: Duration,
}

/// The outcome of a successful [`ClusterControl::reload_agent`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReloadReport {
    /// The agent that was stopped.
    pub old_pid: u32,
    /// Its epoch.
    pub old_epoch: u64,
    /// The new agent, ready (its Leader listening).
    pub new_pid: u32,
    /// The new agent's epoch, higher than every earlier agent's.
    pub epoch: u64,
    /// How long it took, from the stop request to the new agent's ready report
    /// (`took_ms` on the wire).
    #[serde(rename = "took_ms", with = "millis")]
    pub took: Duration,
}

/// Why a reload, a scale or a restart did not happen or did not complete
/// (one error for all the operations on a running cluster: they exclude one
/// another, and a refusal of one may name another as running).
///
/// The control socket carries it whole (in [`Response::reload_error`](crate::control::Response::reload_error)),
/// tagged by `kind`: `{"kind":"in_progress","running":"Reload"}`,
/// `{"kind":"failed","worker":2,"new_pid":4242,"cause":{"kind":"exited","detail":{"Code":3}},"replaced":[]}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReloadError {
    /// Another reload (or a memory replacement) is running; this one was not queued.
    #[error("a {running} is already running; this request was not started")]
    InProgress {
        /// What is running (`reload`, `max-memory`, `scale`, ...).
        running: ReplaceReason,
    },
    /// The cluster is shutting down.
    #[error("the cluster is shutting down")]
    ShuttingDown,
    /// The cluster is still starting (not every process was ready yet).
    #[error("the cluster is not ready yet")]
    NotReady,
    /// An agent reload was asked for while no agent is ready (it is starting,
    /// or restarting after a crash); nothing was changed.
    #[error("the agent is not ready (it is starting or restarting); nothing to reload")]
    AgentNotReady,
    /// The executable to start the new agent from is missing or not
    /// executable; the running agent was left alone.
    #[error("the executable {} is missing or not executable; the agent was not stopped", .path.display())]
    ExecutableMissing {
        /// The path the master starts its children from.
        path: PathBuf,
    },
    /// The master is gone (the call could not reach it).
    #[error("the master is not running")]
    MasterGone,
    /// A new worker failed; the reload was rolled back: the new workers that
    /// were not ready were stopped and the remaining old ones kept serving.
    /// Reads `worker 2: new process 4242 exited with code 3 before it was
    /// ready (rolled back; 1 slot(s) had already been replaced)`.
    #[error("{} (rolled back; {} slot(s) had already been replaced)", worker_failure(*.worker, *.new_pid, .cause), .replaced.len())]
    Failed {
        /// The slot whose new worker failed (the first to fail).
        worker: WorkerId,
        /// The new worker's pid; `None` when it could not be spawned.
        new_pid: Option<u32>,
        /// Why it failed.
        cause: StartFailure,
        /// The slots replaced before the failure (their new workers stay).
        replaced: Vec<ReplacedWorker>,
    },
    /// The old agent was stopped but the new one failed to start (it exited,
    /// crashed, refused the IPC version or was not ready in time). There is no
    /// rollback (the old Leader and its upstream connection are gone): the
    /// supervisor restarts the agent with backoff, as after a crash. Reads
    /// `new agent 4242 exited with code 111 before it was ready: the
    /// executable on disk speaks another IPC version (the old agent 4200 is
    /// stopped; ...)`.
    #[error("{} (the old agent {old_pid} is stopped; the agent is restarted with backoff as after a crash)", agent_failure(*.new_pid, .cause))]
    AgentFailed {
        /// The agent that was stopped.
        old_pid: u32,
        /// The new agent's pid; `None` when it could not be spawned.
        new_pid: Option<u32>,
        /// Why it failed.
        cause: StartFailure,
    },
    /// A scale that would leave fewer than one worker (`scale NAME 0`, or
    /// `-K` with K at least the worker count); nothing was changed.
    #[error(
        "scaling {current} worker(s) {asked} would leave {result}; a cluster keeps at least 1 worker (`tandem stop` stops it)"
    )]
    TooFewWorkers {
        /// The workers when asked.
        current: u32,
        /// What was asked.
        asked: ScaleTo,
        /// The count it would give.
        result: i64,
    },
    /// A scale over [`MAX_WORKERS`]; nothing was changed.
    #[error("scaling {current} worker(s) {asked} would make {result}, over the limit of {max} workers")]
    TooManyWorkers {
        /// The workers when asked.
        current: u32,
        /// What was asked.
        asked: ScaleTo,
        /// The count it would give.
        result: i64,
        /// The limit ([`MAX_WORKERS`]).
        max: u32,
    },
    /// A listener shares its port with `reuseport`: one socket per worker,
    /// bound when the master started. Its worker count is fixed (a socket
    /// left without a worker would take connections nobody accepts, and
    /// closing one resets the connections in its queue); nothing was changed.
    #[error(
        "listener {listener:?} uses reuseport (one socket per worker, bound at start for {workers} workers): the worker count is fixed; listen with mode shared or round-robin to scale"
    )]
    ReusePortFixed {
        /// The listener's name.
        listener: String,
        /// The sockets it bound (the workers at start).
        workers: u32,
    },
    /// A restart of a worker id the cluster does not have.
    #[error("no worker {worker}: the cluster runs {workers} worker(s), ids 1 to {workers}")]
    UnknownWorker {
        /// The id asked for.
        worker: WorkerId,
        /// The worker count.
        workers: u32,
    },
    /// A restart of a worker that is not ready (starting, restarting after
    /// a crash, or being removed); nothing was changed.
    #[error("worker {worker} is not ready (starting, restarting or stopping); nothing to restart")]
    WorkerNotReady {
        /// The id asked for.
        worker: WorkerId,
    },
    /// A worker added by a scale failed to start; its slot was removed (the
    /// workers added before it and ready stay). Reads `worker 5: new process
    /// 4242 was not ready within 10s (removed; the cluster runs 4 worker(s))`.
    #[error("{} (removed; the cluster runs {workers} worker(s))", worker_failure(*.worker, *.new_pid, .cause))]
    ScaleFailed {
        /// The slot whose new worker failed (the first to fail).
        worker: WorkerId,
        /// Its pid; `None` when it could not be spawned.
        new_pid: Option<u32>,
        /// Why it failed.
        cause: StartFailure,
        /// The worker count after the scale.
        workers: u32,
    },
}

/// The most workers a cluster runs ([`ClusterControl::scale`], `tandem
/// scale`): 1024. Each worker costs the master about 6 descriptors (its IPC
/// and descriptor channels, its pipes) and a process.
pub const MAX_WORKERS: u32 = 1024;

/// A change of the worker count: `4` (to 4 workers), `+2` (2 more), `-2` (2
/// fewer). `{"to":4}`, `{"add":2}`, `{"remove":2}` on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ScaleTo {
    /// To this many workers.
    To(u32),
    /// This many more.
    Add(u32),
    /// This many fewer (the highest worker ids first).
    Remove(u32),
}

impl ScaleTo {
    /// The worker count this gives from `current` (negative when it removes more than there are).
    pub fn result(self, current: u32) -> i64 {
        match self {
            ScaleTo::To(n) => i64::from(n),
            ScaleTo::Add(k) => i64::from(current) + i64::from(k),
            ScaleTo::Remove(k) => i64::from(current) - i64::from(k),
        }
    }
}

impl fmt::Display for ScaleTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScaleTo::To(n) => write!(f, "to {n}"),
            ScaleTo::Add(k) => write!(f, "by +{k}"),
            ScaleTo::Remove(k) => write!(f, "by -{k}"),
        }
    }
}

/// A [`ScaleTo`] that does not read: not `N`, `+K` or `-K` with whole numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a worker count: expected N (to N workers), +K (K more) or -K (K fewer)")]
pub struct BadScale {
    input: String,
}

impl std::str::FromStr for ScaleTo {
    type Err = BadScale;

    fn from_str(s: &str) -> Result<Self, BadScale> {
        let bad = || BadScale { input: s.to_owned() };
        let digits = |d: &str| {
            if d.is_empty() || !d.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            // Over u32: as far out of range as the limit says.
            Ok(d.parse::<u32>().unwrap_or(u32::MAX))
        };
        match s.as_bytes().first() {
            Some(b'+') => digits(&s[1..]).map(ScaleTo::Add),
            Some(b'-') => digits(&s[1..]).map(ScaleTo::Remove),
            _ => digits(s).map(ScaleTo::To),
        }
    }
}

/// A worker a scale started, ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedWorker {
    /// Its id.
    pub worker: WorkerId,
    /// Its pid.
    pub pid: u32,
}

/// A worker a scale removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedWorker {
    /// Its id.
    pub worker: WorkerId,
    /// Its process when it was asked to stop (`None`: the slot had none: it
    /// was restarting).
    pub pid: Option<u32>,
    /// How it ended (`Code(0)` for a graceful drain; `Signal(9)` when it
    /// overran its grace period).
    pub exit: Option<crate::ExitReason>,
}

/// The outcome of a successful [`ClusterControl::scale`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleReport {
    /// The worker count before.
    pub from: u32,
    /// The worker count now.
    pub to: u32,
    /// The workers started, all ready.
    pub added: Vec<AddedWorker>,
    /// The workers stopped, all exited.
    pub removed: Vec<RemovedWorker>,
    /// How long it took (`took_ms` on the wire).
    #[serde(rename = "took_ms", with = "millis")]
    pub took: Duration,
}

impl ReloadError {
    /// Why the new process failed to start, for [`Failed`](Self::Failed) and
    /// [`AgentFailed`](Self::AgentFailed).
    pub fn start_failure(&self) -> Option<&StartFailure> {
        match self {
            ReloadError::Failed { cause, .. }
            | ReloadError::AgentFailed { cause, .. }
            | ReloadError::ScaleFailed { cause, .. } => Some(cause),
            _ => None,
        }
    }

    /// Whether the same reload may succeed if asked for again later without
    /// changing anything: another one was running, or the cluster (or its
    /// agent) was not ready yet.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ReloadError::InProgress { .. }
                | ReloadError::NotReady
                | ReloadError::AgentNotReady
                | ReloadError::WorkerNotReady { .. }
        )
    }
}

/// What failed in a workers' reload: `worker 2: new process 4242 exited with
/// code 3 before it was ready`, `worker 2: new process could not be spawned: ...`.
pub(crate) fn worker_failure(worker: WorkerId, new_pid: Option<u32>, cause: &StartFailure) -> String {
    match new_pid {
        Some(pid) => format!("worker {worker}: new process {pid} {cause}"),
        None => format!("worker {worker}: new process {cause}"),
    }
}

/// What failed in an agent's reload: `new agent 4242 was not ready within
/// 10s`, `the new agent could not be spawned: ...`.
fn agent_failure(new_pid: Option<u32>, cause: &StartFailure) -> String {
    match new_pid {
        Some(pid) => format!("new agent {pid} {cause}"),
        None => format!("the new agent {cause}"),
    }
}

/// A handle on the running master, for code in the master process (the master
/// function, a control socket). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ClusterControl {
    tx: mpsc::Sender<ControlCall>,
}

impl ClusterControl {
    pub(crate) fn new(tx: mpsc::Sender<ControlCall>) -> Self {
        ClusterControl { tx }
    }

    /// Replaces every ready worker, slot by slot, with a new process of the
    /// executable as it is on disk now; each new worker must be ready (within
    /// [`Config::worker_start_timeout`](crate::Config::worker_start_timeout))
    /// before its predecessor is stopped and drained (within
    /// [`Config::worker_stop_timeout`](crate::Config::worker_stop_timeout)).
    /// Resolves when the reload is over: `Ok` with what was replaced, or the
    /// reason it failed and was rolled back. Same as SIGHUP to the master.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(ControlCall::Reload { reply: Some(reply) }).await.map_err(|_| ReloadError::MasterGone)?;
        rx.await.map_err(|_| ReloadError::MasterGone)?
    }

    /// Reloads the agent: the master stops it gracefully (its Leader and
    /// upstream connection close within
    /// [`Config::agent_stop_timeout`](crate::Config::agent_stop_timeout); then
    /// SIGKILL), then starts a new agent from the executable as it is on disk
    /// now, with a higher epoch. The workers keep running: their Followers
    /// reconnect and resubscribe to the new Leader, as after an agent crash.
    ///
    /// Resolves once the new agent is ready (within
    /// [`Config::agent_start_timeout`](crate::Config::agent_start_timeout)) with
    /// its pid and epoch, or with why it did not happen: another reload (of the
    /// workers or the agent) or a memory replacement is running
    /// ([`ReloadError::InProgress`]), no agent is ready, or the new agent
    /// failed to start ([`ReloadError::AgentFailed`]). The workers' reload
    /// ([`reload`](Self::reload), SIGHUP) never touches the agent.
    pub async fn reload_agent(&self) -> Result<AgentReloadReport, ReloadError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(ControlCall::ReloadAgent { reply }).await.map_err(|_| ReloadError::MasterGone)?;
        rx.await.map_err(|_| ReloadError::MasterGone)?
    }

    /// Changes the worker count. New workers (ids after the highest) start
    /// at once and count once they report ready (within
    /// [`Config::worker_start_timeout`](crate::Config::worker_start_timeout));
    /// one that fails is removed again ([`ReloadError::ScaleFailed`]).
    /// Removed workers, the highest ids first, are stopped gracefully (a stop
    /// notice, [`Config::worker_stop_timeout`](crate::Config::worker_stop_timeout),
    /// then SIGKILL), as a stop does. Resolves when every new worker is ready
    /// and every removed one has exited.
    ///
    /// Refused, with nothing changed: a count under 1 or over
    /// [`MAX_WORKERS`], a listener in `reuseport` mode
    /// ([`ReloadError::ReusePortFixed`]), while a reload, a restart, a memory
    /// replacement or another scale runs ([`ReloadError::InProgress`]), before
    /// the cluster is ready or while it stops.
    pub async fn scale(&self, to: ScaleTo) -> Result<ScaleReport, ReloadError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(ControlCall::Scale { to, reply }).await.map_err(|_| ReloadError::MasterGone)?;
        rx.await.map_err(|_| ReloadError::MasterGone)?
    }

    /// Restarts worker `id` gracefully: a new process starts, and once it is
    /// ready the old one is stopped and drains, as one slot of a
    /// [`reload`](Self::reload). Refused for an unknown id
    /// ([`ReloadError::UnknownWorker`]), a worker not ready, or while another
    /// replacement or a scale runs.
    pub async fn restart_worker(&self, id: WorkerId) -> Result<ReloadReport, ReloadError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(ControlCall::RestartWorker { id, reply }).await.map_err(|_| ReloadError::MasterGone)?;
        rx.await.map_err(|_| ReloadError::MasterGone)?
    }

    /// Restarts the agent gracefully: the same as
    /// [`reload_agent`](Self::reload_agent), counted as a restart asked for
    /// in the metrics (`tandem_restarts_requested_total{role="agent"}`).
    pub async fn restart_agent(&self) -> Result<AgentReloadReport, ReloadError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(ControlCall::RestartAgent { reply }).await.map_err(|_| ReloadError::MasterGone)?;
        rx.await.map_err(|_| ReloadError::MasterGone)?
    }
}

/// A call from a [`ClusterControl`] (or SIGHUP, without a reply).
#[derive(Debug)]
pub(crate) enum ControlCall {
    Reload { reply: Option<oneshot::Sender<Result<ReloadReport, ReloadError>>> },
    ReloadAgent { reply: oneshot::Sender<Result<AgentReloadReport, ReloadError>> },
    RestartAgent { reply: oneshot::Sender<Result<AgentReloadReport, ReloadError>> },
    RestartWorker { id: WorkerId, reply: oneshot::Sender<Result<ReloadReport, ReloadError>> },
    Scale { to: ScaleTo, reply: oneshot::Sender<Result<ScaleReport, ReloadError>> },
}

/// A duration as whole milliseconds, as the control protocol writes durations.
pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reports_keep_the_control_protocol_s_field_names() {
        let report = ReloadReport {
            replaced: vec![ReplacedWorker { id: 2, old_pid: 10, new_pid: 11 }],
            skipped: vec![3],
            workers: vec![Some(9), Some(11), None],
            took: Duration::from_millis(1500),
        };
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(
            json,
            r#"{"replaced":[{"worker":2,"old_pid":10,"new_pid":11}],"skipped":[3],"workers":[9,11,null],"took_ms":1500}"#
        );
        assert_eq!(serde_json::from_str::<ReloadReport>(&json).unwrap(), report);
        // An answer with only the replaced workers (an older master's) still reads.
        let old: ReloadReport = serde_json::from_str(r#"{"replaced":[{"worker":1,"old_pid":4,"new_pid":5}]}"#).unwrap();
        assert_eq!(old.replaced, vec![ReplacedWorker { id: 1, old_pid: 4, new_pid: 5 }]);
        let agent =
            AgentReloadReport { old_pid: 4, old_epoch: 1, new_pid: 5, epoch: 2, took: Duration::from_millis(212) };
        let json = serde_json::to_string(&agent).unwrap();
        assert_eq!(json, r#"{"old_pid":4,"old_epoch":1,"new_pid":5,"epoch":2,"took_ms":212}"#);
        assert_eq!(serde_json::from_str::<AgentReloadReport>(&json).unwrap(), agent);
    }
}
