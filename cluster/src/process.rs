//! Who a process is (its role, worker id and pid) and how it ended.

use std::fmt;
use std::process::ExitStatus;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A worker's id: `1..=N`, stable per slot across restarts.
pub type WorkerId = u32;

/// The role of a process in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProcessRole {
    /// The supervisor: spawns, routes, stops.
    Master,
    /// The single agent: hosts the Leader.
    Agent,
    /// One of the N workers: hosts a Follower and the user's work.
    Worker,
}

impl ProcessRole {
    /// The role's name as used in logs and in the `TANDEM_ROLE` variable.
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessRole::Master => "master",
            ProcessRole::Agent => "agent",
            ProcessRole::Worker => "worker",
        }
    }
}

impl ProcessRole {
    /// The role this process was started in: `Agent` or `Worker` when the
    /// master spawned it, `Master` otherwise. Code in `main` before the
    /// builder runs in every process; use this to do master-only work there
    /// (for example binding a listener whose address the children inherit).
    pub fn of_this_process() -> ProcessRole {
        match std::env::var(crate::spawn::ENV_ROLE).as_deref() {
            Ok("agent") => ProcessRole::Agent,
            Ok("worker") => ProcessRole::Worker,
            _ => ProcessRole::Master,
        }
    }
}

impl fmt::Display for ProcessRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one process: its role, its worker id (workers only) and its pid
/// (absent when it could not be spawned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// The role.
    pub role: ProcessRole,
    /// The worker id, for workers.
    pub worker_id: Option<WorkerId>,
    /// The process id, once spawned.
    pub pid: Option<u32>,
}

impl ProcessRef {
    /// The slot's name without the pid: `agent`, `worker 3`, `master`.
    pub fn slot_name(&self) -> String {
        match self.worker_id {
            Some(id) => format!("{} {id}", self.role),
            None => self.role.to_string(),
        }
    }
}

impl fmt::Display for ProcessRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "{} (pid {pid})", self.slot_name()),
            None => write!(f, "{} (not spawned)", self.slot_name()),
        }
    }
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ExitReason {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// Its status could not be read.
    Unknown,
}

impl ExitReason {
    pub(crate) fn from_status(status: &ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitReason::Code(code),
            (None, Some(sig)) => ExitReason::Signal(sig),
            (None, None) => ExitReason::Unknown,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitReason::Code(code) => write!(f, "exited with code {code}"),
            ExitReason::Signal(sig) => match nix::sys::signal::Signal::try_from(sig) {
                Ok(name) => write!(f, "was killed by signal {sig} ({name})"),
                Err(_) => write!(f, "was killed by signal {sig}"),
            },
            ExitReason::Unknown => f.write_str("ended with an unreadable status"),
        }
    }
}

/// Why a process failed to start (it is backed off and retried).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartFailure {
    /// It did not report ready within the start-up timeout and was killed.
    #[error("did not report ready within {0:?}")]
    TimedOut(Duration),
    /// It ended before reporting ready.
    #[error("{0} before reporting ready")]
    Exited(ExitReason),
    /// The executable could not be spawned.
    #[error("could not be spawned: {0}")]
    Spawn(String),
}
