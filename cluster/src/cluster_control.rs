//! [`ClusterControl`], the handle code in the master process uses to ask the
//! running master for a reload, and what a reload answers. The master's side
//! of a reload (the rolling replacement itself) is in [`reload`](crate::reload).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::WorkerId;

/// Control calls queued for the master loop.
pub(crate) const CONTROL_CALLS_CAPACITY: usize = 16;

/// Why a worker was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReplaceReason {
    /// A reload (SIGHUP or [`ClusterControl::reload`]).
    Reload,
    /// Its RSS exceeded the memory limit.
    MaxMemory,
}

impl fmt::Display for ReplaceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplaceReason::Reload => "reload",
            ReplaceReason::MaxMemory => "max-memory",
        })
    }
}

/// One replaced worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplacedWorker {
    /// The slot.
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
    pub skipped: Vec<WorkerId>,
    /// The workers' pids after the reload, by slot (`None`: no process).
    pub workers: Vec<Option<u32>>,
    /// How long it took.
    pub took: Duration,
}

/// Why a reload did not happen or did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReloadError {
    /// Another reload (or a memory replacement) is running; this one was not queued.
    #[error("a {running} is already running; this reload was not started")]
    InProgress {
        /// What is running (`reload`, `max-memory`).
        running: ReplaceReason,
    },
    /// The cluster is shutting down.
    #[error("the cluster is shutting down")]
    ShuttingDown,
    /// The cluster is still starting (not every process was ready yet).
    #[error("the cluster is not ready yet")]
    NotReady,
    /// The master is gone (the call could not reach it).
    #[error("the master is not running")]
    MasterGone,
    /// A new worker failed; the reload was rolled back: the new workers that
    /// were not ready were stopped and the remaining old ones kept serving.
    #[error("{reason} (rolled back; {} slot(s) had already been replaced)", replaced.len())]
    Failed {
        /// What failed (`worker 2: exited with code 1 before it was ready`).
        reason: String,
        /// The slots replaced before the failure (their new workers stay).
        replaced: Vec<ReplacedWorker>,
    },
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
}

/// A call from a [`ClusterControl`] (or SIGHUP, without a reply).
#[derive(Debug)]
pub(crate) enum ControlCall {
    Reload { reply: Option<oneshot::Sender<Result<ReloadReport, ReloadError>>> },
}
