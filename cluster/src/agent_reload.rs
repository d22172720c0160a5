//! Reloading the agent ([`ClusterControl::reload_agent`](crate::ClusterControl::reload_agent),
//! `tandem reload NAME --agent`): the usual leader failover, asked for.
//!
//! ```text
//! master                      old agent (epoch n)       new agent (epoch n+1)     workers
//!   | Stop{agent_stop_timeout} ->|                                                  |
//!   |                            | Leader closes, exits                             |
//!   |<------------------ exited -|                                                  |
//!   | AgentChanged{up: false} --------------------------------------------------->| Leader gone
//!   | spawn (executable as on disk now), Init{epoch n+1} ----->|                    |
//!   |<---------------------------------- Ready{Agent{socket}} -|                    |
//!   | AgentChanged{pid, epoch n+1, socket} ------------------------------------->| reconnect, resubscribe
//!   | answer: old pid, new pid, epoch n+1
//! ```
//!
//! The old agent goes first: there is one Leader, and one upstream connection,
//! at any time (and every agent's Leader listens on the same socket path). So
//! there is no rollback: when the new agent exits (an executable speaking
//! another IPC version exits [`IPC_MISMATCH_EXIT`]), crashes, or is not ready
//! within [`Config::agent_start_timeout`](crate::Config::agent_start_timeout),
//! the reload answers [`ReloadError::AgentFailed`] and the supervisor restarts
//! the agent with backoff, exactly as after a crash. What can be checked
//! before anything is stopped is: the executable is there and executable
//! ([`ReloadError::ExecutableMissing`]).
//!
//! The old agent has [`Config::agent_stop_timeout`](crate::Config::agent_stop_timeout)
//! to exit, then it is SIGKILLed. Its successor starts as soon as it has
//! exited (no backoff delay: this exit was asked for) and counts in the slot's
//! `restarts`, as a reloaded worker does. The workers are not restarted. One
//! reload at a time, the workers' and the agent's together: a request while
//! one runs is refused with [`ReloadError::InProgress`].

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::cluster_control::{AgentReloadReport, ReloadError, ReplaceReason};
use crate::ipc::ToChild;
use crate::master::{Master, Timer};
use crate::spawn::IPC_MISMATCH_EXIT;
use crate::status::ProcessState;
use crate::supervisor::Proc;
use crate::types::{ProcKey, SlotId};
use crate::{ClusterEvent, ExitReason};

type Reply = oneshot::Sender<Result<AgentReloadReport, ReloadError>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The old agent was asked to stop; the new one starts when it has exited.
    Stopping { old: ProcKey },
    /// The new agent is starting.
    Starting { new: ProcKey, new_pid: u32 },
}

/// A reload of the agent in progress.
#[derive(Debug)]
pub(crate) struct AgentReload {
    phase: Phase,
    old_pid: u32,
    old_epoch: u64,
    reply: Reply,
    started: Instant,
}

/// Whether `path` is a file the master can start children from.
fn executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Master {
    /// Starts a reload of the agent, or refuses it (answered at once).
    pub(crate) fn request_agent_reload(&mut self, reply: Reply) {
        if let Err(e) = self.agent_reload_allowed() {
            tracing::warn!(error = %e, "agent reload refused");
            if matches!(e, ReloadError::InProgress { .. } | ReloadError::ExecutableMissing { .. }) {
                self.emit(ClusterEvent::ReloadFailed { reason: e.to_string() });
            }
            let _ = reply.send(Err(e));
            return;
        }
        let Some(old) = self.agent.proc.as_ref() else { return };
        let (key, pid, epoch) = (old.key, old.pid, old.epoch);
        let grace = self.config.agent_stop_timeout;
        old.control(ToChild::Stop { grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX) });
        // Requests to the agent are still routed while it stops; new links are refused.
        self.agent.state = ProcessState::Stopping;
        self.agent_reload = Some(AgentReload {
            phase: Phase::Stopping { old: key },
            old_pid: pid,
            old_epoch: epoch,
            reply,
            started: Instant::now(),
        });
        tracing::info!(pid, epoch, "agent reload: stopping the agent; its successor starts once it has exited");
        self.emit(ClusterEvent::AgentReloadStarted { pid, epoch });
        self.after(grace, Timer::AgentStopDeadline(key));
    }

    fn agent_reload_allowed(&self) -> Result<(), ReloadError> {
        if self.stopping.is_some() {
            return Err(ReloadError::ShuttingDown);
        }
        if let Some(running) = self.replacement_running() {
            return Err(ReloadError::InProgress { running });
        }
        if self.agent_memory_stop {
            return Err(ReloadError::InProgress { running: ReplaceReason::MaxMemory });
        }
        if !self.announced {
            return Err(ReloadError::NotReady);
        }
        if self.agent.state != ProcessState::Ready || self.agent.proc.is_none() {
            return Err(ReloadError::AgentNotReady);
        }
        if !executable(&self.program.exe) {
            return Err(ReloadError::ExecutableMissing { path: self.program.exe.clone() });
        }
        Ok(())
    }

    /// An agent exited (and is out of its slot). If it is the old agent of a
    /// reload, its successor is started now and this returns true. If it is
    /// the successor, not ready yet, the reload fails and this returns false:
    /// the caller restarts the slot with backoff, as after any crash.
    pub(crate) fn agent_reload_exited(&mut self, proc: &Proc, exit: ExitReason) -> bool {
        let Some(reload) = self.agent_reload.as_ref() else { return false };
        match reload.phase {
            Phase::Stopping { old } if old == proc.key => match self.launch(SlotId::Agent) {
                Ok(()) => {
                    // The status table's `restarts` counts every new process of the slot.
                    self.agent.restarts += 1;
                    let Some(new) = self.agent.proc.as_ref() else { return true };
                    let (new_key, new_pid, epoch) = (new.key, new.pid, new.epoch);
                    tracing::info!(old = proc.pid, new = new_pid, epoch, "agent reload: new agent started");
                    if let Some(reload) = self.agent_reload.as_mut() {
                        reload.phase = Phase::Starting { new: new_key, new_pid };
                    }
                    true
                }
                Err(e) => {
                    self.fail_agent_reload(format!("could not spawn the new agent: {e}"));
                    false
                }
            },
            Phase::Starting { new, new_pid } if new == proc.key => {
                let why = if proc.timed_out {
                    format!("was not ready within {:?}", self.config.agent_start_timeout)
                } else if exit == ExitReason::Code(IPC_MISMATCH_EXIT) {
                    format!("{exit} before it was ready: the executable on disk speaks another IPC version")
                } else {
                    format!("{exit} before it was ready")
                };
                self.fail_agent_reload(format!("new agent {new_pid} {why}"));
                false
            }
            _ => false,
        }
    }

    /// An agent reported ready: if it is a reload's new agent, the reload is done.
    pub(crate) fn agent_reload_ready(&mut self, key: ProcKey) {
        let Some(reload) = self.agent_reload.take_if(|r| matches!(r.phase, Phase::Starting { new, .. } if new == key))
        else {
            return;
        };
        let Phase::Starting { new_pid, .. } = reload.phase else { return };
        let epoch = self.agent.proc.as_ref().map_or(0, |p| p.epoch);
        let took = reload.started.elapsed();
        tracing::info!(old = reload.old_pid, new = new_pid, epoch, ?took, "agent reloaded");
        self.emit(ClusterEvent::AgentReloaded { old: reload.old_pid, new: new_pid, epoch });
        let report = AgentReloadReport { old_pid: reload.old_pid, old_epoch: reload.old_epoch, new_pid, epoch, took };
        // Err: the caller gave up waiting.
        let _ = reload.reply.send(Ok(report));
    }

    fn fail_agent_reload(&mut self, reason: String) {
        let Some(reload) = self.agent_reload.take() else { return };
        let e = ReloadError::AgentFailed { reason, old_pid: reload.old_pid };
        tracing::error!(error = %e, "agent reload failed");
        self.emit(ClusterEvent::ReloadFailed { reason: e.to_string() });
        let _ = reload.reply.send(Err(e));
    }

    /// Shutdown began: a reload of the agent in progress ends there.
    pub(crate) fn abort_agent_reload(&mut self) {
        if let Some(reload) = self.agent_reload.take() {
            let _ = reload.reply.send(Err(ReloadError::ShuttingDown));
        }
    }
}
