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
    /// The agent's hot standby (when [`Config::standby`](crate::Config::standby)
    /// is on): an agent process that mirrors the Leader and takes over at the
    /// next epoch when the agent dies. Its `TANDEM_ROLE` is `agent`.
    Standby,
}

impl ProcessRole {
    /// The role's name as used in logs and in the `TANDEM_ROLE` variable.
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessRole::Master => "master",
            ProcessRole::Agent => "agent",
            ProcessRole::Worker => "worker",
            ProcessRole::Standby => "standby",
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

/// Why a process failed to start: in the [`StartFailed`](crate::ClusterEvent::StartFailed)
/// event (the slot is backed off and retried), and as the cause of a failed
/// reload ([`ReloadError::Failed`](crate::ReloadError::Failed),
/// [`ReloadError::AgentFailed`](crate::ReloadError::AgentFailed)).
///
/// On the control socket it is `{"kind":"timed_out","detail":2000}` (the
/// timeout in milliseconds), `{"kind":"exited","detail":{"Code":3}}`,
/// `{"kind":"ipc_mismatch","detail":{"Code":111}}` or
/// `{"kind":"spawn","detail":"No such file or directory (os error 2)"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
#[non_exhaustive]
pub enum StartFailure {
    /// It did not report ready within the start-up timeout (and was stopped).
    #[error("was not ready within {0:?}")]
    TimedOut(#[serde(with = "crate::reload_handle::millis")] Duration),
    /// It ended before reporting ready.
    #[error("{0} before it was ready")]
    Exited(ExitReason),
    /// It exited with code 111 before reporting ready: the code of a child
    /// whose executable (as on disk now) speaks another IPC version than its
    /// master's, and refused to join. A child that sent anything on its IPC
    /// channel joined: its code 111 is its own ([`Exited`](Self::Exited)).
    #[error("{0} before it was ready: the executable on disk speaks another IPC version")]
    IpcMismatch(ExitReason),
    /// The executable could not be spawned.
    #[error("could not be spawned: {0}")]
    Spawn(String),
}

/// How a process that was not ready yet ended, as the master saw it: what
/// names its start failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ended {
    pub(crate) exit: ExitReason,
    /// It was killed at its start deadline.
    pub(crate) timed_out: bool,
    /// It spoke on its IPC channel, so a code 111 is its own (a `tandem run`
    /// program's, say), not the sign of another IPC version.
    pub(crate) joined: bool,
}

impl Ended {
    /// Ended by itself (or a signal) before its deadline, before it spoke.
    #[cfg(test)]
    pub(crate) fn by(exit: ExitReason) -> Self {
        Ended { exit, timed_out: false, joined: false }
    }

    /// Killed at its start deadline.
    #[cfg(test)]
    pub(crate) fn at_deadline(exit: ExitReason) -> Self {
        Ended { exit, timed_out: true, joined: false }
    }

    /// Why it failed to start, given the deadline it had.
    pub(crate) fn start_failure(self, start_timeout: Duration) -> StartFailure {
        match self {
            Ended { timed_out: true, .. } => StartFailure::TimedOut(start_timeout),
            Ended { exit, joined: true, .. } => StartFailure::Exited(exit),
            Ended { exit, .. } => StartFailure::exited(exit),
        }
    }
}

impl StartFailure {
    /// A process that ended (`exit`) before it was ready:
    /// [`IpcMismatch`](Self::IpcMismatch) when it exited with
    /// `IPC_MISMATCH_EXIT` (111), else [`Exited`](Self::Exited).
    pub(crate) fn exited(exit: ExitReason) -> Self {
        if exit == ExitReason::Code(crate::spawn::IPC_MISMATCH_EXIT) {
            StartFailure::IpcMismatch(exit)
        } else {
            StartFailure::Exited(exit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_111_is_another_ipc_version_only_from_a_child_that_never_spoke() {
        let code = ExitReason::Code(crate::spawn::IPC_MISMATCH_EXIT);
        let start = Duration::from_secs(2);
        assert_eq!(Ended::by(code).start_failure(start), StartFailure::IpcMismatch(code));
        let joined = Ended { exit: code, timed_out: false, joined: true };
        assert_eq!(joined.start_failure(start), StartFailure::Exited(code));
        assert_eq!(Ended::at_deadline(ExitReason::Signal(9)).start_failure(start), StartFailure::TimedOut(start));
    }

    #[test]
    fn a_start_failure_reads_as_a_sentence_and_keeps_its_shape_on_the_wire() {
        let cases = [
            (
                StartFailure::TimedOut(Duration::from_secs(2)),
                "was not ready within 2s",
                r#"{"kind":"timed_out","detail":2000}"#,
            ),
            (
                StartFailure::exited(ExitReason::Code(3)),
                "exited with code 3 before it was ready",
                r#"{"kind":"exited","detail":{"Code":3}}"#,
            ),
            (
                StartFailure::exited(ExitReason::Code(crate::spawn::IPC_MISMATCH_EXIT)),
                "exited with code 111 before it was ready: the executable on disk speaks another IPC version",
                r#"{"kind":"ipc_mismatch","detail":{"Code":111}}"#,
            ),
            (
                StartFailure::exited(ExitReason::Signal(9)),
                "was killed by signal 9 (SIGKILL) before it was ready",
                r#"{"kind":"exited","detail":{"Signal":9}}"#,
            ),
            (
                StartFailure::Spawn("Permission denied (os error 13)".into()),
                "could not be spawned: Permission denied (os error 13)",
                r#"{"kind":"spawn","detail":"Permission denied (os error 13)"}"#,
            ),
        ];
        for (failure, text, json) in cases {
            assert_eq!(failure.to_string(), text);
            assert_eq!(serde_json::to_string(&failure).unwrap(), json);
            assert_eq!(serde_json::from_str::<StartFailure>(json).unwrap(), failure);
        }
    }
}
