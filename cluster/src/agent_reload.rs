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
//! another IPC version exits
//! [`IPC_MISMATCH_EXIT`](crate::spawn::IPC_MISMATCH_EXIT)), crashes, or is
//! not ready within
//! [`Config::agent_start_timeout`](crate::Config::agent_start_timeout), the
//! reload answers [`ReloadError::AgentFailed`] (with the cause, a
//! [`StartFailure`]) and the supervisor restarts
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
//!
//! A state machine without I/O: the master tells it what happened (a request,
//! the old agent's exit, the new one's spawn, ready report or exit) and
//! carries out the [`Action`]s it returns.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::identity::{ProcKey, SlotId};
use crate::lifecycle::{Action, AgentReloadReply, Reply, Timer};
use crate::process::Ended;
use crate::reload_handle::{AgentReloadReport, ReloadError, ReplaceReason};
use crate::status::ProcessState;
use crate::supervisor::Slot;
use crate::{ClusterEvent, StartFailure};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The old agent was asked to stop; the new one starts when it has exited.
    Stopping { old: ProcKey },
    /// The new agent is being spawned.
    Launching,
    /// The new agent is starting.
    Starting { new: ProcKey, new_pid: u32 },
}

#[derive(Debug)]
struct Running {
    phase: Phase,
    old_pid: u32,
    old_epoch: u64,
    reply: AgentReloadReply,
    started: Instant,
}

/// What an agent reload needs to know of the rest of the master when asked for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gate {
    pub stopping: bool,
    pub announced: bool,
    /// A replacement of the workers running.
    pub running: Option<ReplaceReason>,
    /// The agent was asked to stop for its memory limit.
    pub memory_stop: bool,
    /// The executable children start from.
    pub exe: PathBuf,
    /// Whether it is there and executable.
    pub executable: bool,
}

/// The agent's reload: idle, or one in progress.
#[derive(Debug, Default)]
pub(crate) struct AgentReload {
    running: Option<Running>,
}

/// Whether `path` is a file the master can start children from.
pub(crate) fn executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl AgentReload {
    pub(crate) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// A reload of the agent asked for: stop the agent (its successor starts
    /// once it has exited), or refuse (answered at once).
    pub(crate) fn request(
        &mut self,
        agent: &Slot,
        gate: Gate,
        grace: Duration,
        reply: AgentReloadReply,
    ) -> Vec<Action> {
        let allowed = if gate.stopping {
            Err(ReloadError::ShuttingDown)
        } else if let Some(running) = gate.running.or(self.running.as_ref().map(|_| ReplaceReason::AgentReload)) {
            Err(ReloadError::InProgress { running })
        } else if gate.memory_stop {
            Err(ReloadError::InProgress { running: ReplaceReason::MaxMemory })
        } else if !gate.announced {
            Err(ReloadError::NotReady)
        } else if agent.state != ProcessState::Ready || agent.proc.is_none() {
            Err(ReloadError::AgentNotReady)
        } else if !gate.executable {
            Err(ReloadError::ExecutableMissing { path: gate.exe })
        } else {
            Ok(())
        };
        let mut actions = Vec::new();
        if let Err(e) = allowed {
            if matches!(e, ReloadError::InProgress { .. } | ReloadError::ExecutableMissing { .. }) {
                tracing::debug!(error = %e, "agent reload refused");
                actions.push(Action::Emit(ClusterEvent::ReloadFailed { reason: e.to_string() }));
            } else {
                tracing::warn!(error = %e, "agent reload refused");
            }
            actions.push(Action::Reply(Reply::AgentReload(reply, Err(e))));
            return actions;
        }
        let Some(old) = agent.proc.as_ref() else { return actions };
        let (key, pid, epoch) = (old.key, old.pid, old.epoch);
        actions.push(Action::Stop { to: key, grace });
        // Requests to the agent are still routed while it stops; new links are refused.
        actions.push(Action::SetState(agent.id, ProcessState::Stopping));
        self.running = Some(Running {
            phase: Phase::Stopping { old: key },
            old_pid: pid,
            old_epoch: epoch,
            reply,
            started: Instant::now(),
        });
        tracing::debug!(pid, epoch, "agent reload: stopping the agent; its successor starts once it has exited");
        actions.push(Action::Emit(ClusterEvent::AgentReloadStarted { pid, epoch }));
        actions.push(Action::After(grace, Timer::AgentStopDeadline(key)));
        actions
    }

    /// An agent exited (the master took it out of its slot). The old agent of
    /// a reload: its successor is spawned now. Its successor, not ready yet:
    /// the reload fails and the slot restarts with backoff, as after any crash.
    /// `None`: neither (the master restarts the slot as usual).
    pub(crate) fn on_exited(&mut self, key: ProcKey, ended: Ended, start_timeout: Duration) -> Option<Vec<Action>> {
        let running = self.running.as_mut()?;
        match running.phase {
            Phase::Stopping { old } if old == key => {
                running.phase = Phase::Launching;
                Some(vec![Action::Relaunch(key.slot)])
            }
            Phase::Starting { new, new_pid } if new == key => {
                let mut actions = self.fail(Some(new_pid), ended.start_failure(start_timeout));
                actions.push(Action::Restart(key.slot));
                Some(actions)
            }
            _ => None,
        }
    }

    /// The outcome of an [`Action::Relaunch`]: the new agent's key and pid, or
    /// why it could not be spawned (the slot then restarts with backoff).
    pub(crate) fn on_launched(&mut self, outcome: Result<(ProcKey, u32), String>, slot: SlotId) -> Vec<Action> {
        let Some(running) = self.running.as_mut().filter(|r| r.phase == Phase::Launching) else { return Vec::new() };
        match outcome {
            Ok((new, new_pid)) => {
                tracing::info!(old = running.old_pid, new = new_pid, "agent reload: new agent started");
                running.phase = Phase::Starting { new, new_pid };
                Vec::new()
            }
            Err(e) => {
                let mut actions = self.fail(None, StartFailure::Spawn(e));
                actions.push(Action::Restart(slot));
                actions
            }
        }
    }

    /// An agent reported ready: if it is the reload's new agent, the reload is done.
    pub(crate) fn on_ready(&mut self, key: ProcKey, epoch: u64) -> Vec<Action> {
        let Some(running) = self.running.take_if(|r| matches!(r.phase, Phase::Starting { new, .. } if new == key))
        else {
            return Vec::new();
        };
        let Phase::Starting { new_pid, .. } = running.phase else { return Vec::new() };
        let took = running.started.elapsed();
        tracing::debug!(old = running.old_pid, new = new_pid, epoch, ?took, "agent reloaded");
        let report = AgentReloadReport { old_pid: running.old_pid, old_epoch: running.old_epoch, new_pid, epoch, took };
        vec![
            Action::Emit(ClusterEvent::AgentReloaded { old: running.old_pid, new: new_pid, epoch }),
            Action::Reply(Reply::AgentReload(running.reply, Ok(report))),
        ]
    }

    /// The new agent (`new_pid`; `None`: not spawned) failed to start: the
    /// reload is over, answered with why.
    fn fail(&mut self, new_pid: Option<u32>, cause: StartFailure) -> Vec<Action> {
        let Some(running) = self.running.take() else { return Vec::new() };
        let e = ReloadError::AgentFailed { old_pid: running.old_pid, new_pid, cause };
        tracing::debug!(error = %e, "agent reload failed");
        vec![
            Action::Emit(ClusterEvent::ReloadFailed { reason: e.to_string() }),
            Action::Reply(Reply::AgentReload(running.reply, Err(e))),
        ]
    }

    /// Shutdown began: a reload of the agent in progress ends there.
    pub(crate) fn abort(&mut self) -> Vec<Action> {
        match self.running.take() {
            Some(r) => vec![Action::Reply(Reply::AgentReload(r.reply, Err(ReloadError::ShuttingDown)))],
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;
    use crate::ExitReason;
    use crate::spawn::IPC_MISMATCH_EXIT;
    use crate::supervisor::testing::{Fixture, kinds};

    const GRACE: Duration = Duration::from_secs(5);

    fn open() -> Gate {
        Gate {
            stopping: false,
            announced: true,
            running: None,
            memory_stop: false,
            exe: PathBuf::from("/bin/app"),
            executable: true,
        }
    }

    fn reply_of(actions: &mut Vec<Action>) -> Result<AgentReloadReport, ReloadError> {
        let pos = actions.iter().position(|a| matches!(a, Action::Reply(_))).expect("a reply");
        match actions.remove(pos) {
            Action::Reply(Reply::AgentReload(_, result)) => result,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_old_agent_stops_first_then_its_successor_starts_and_the_reload_answers_when_it_is_ready() {
        let mut f = Fixture::ready(1);
        let mut reload = AgentReload::default();
        let old = f.key(SlotId::Agent);
        let old_pid = f.pid(old);
        let (tx, _rx) = oneshot::channel();
        let agent = f.slots.agent().unwrap();
        assert_eq!(
            kinds(&reload.request(agent, open(), GRACE, tx)),
            [
                format!("stop {old:?} 5s"),
                "state agent stopping".into(),
                "emit AgentReloadStarted".into(),
                format!("after 5s AgentStopDeadline({old:?})"),
            ]
        );
        f.exit(old);
        let timeout = Duration::from_secs(10);
        assert_eq!(kinds(&reload.on_exited(old, Ended::by(ExitReason::Code(0)), timeout).unwrap()), ["relaunch agent"]);
        let new = f.spawn(SlotId::Agent, 8);
        assert!(reload.on_launched(Ok((new, f.pid(new))), SlotId::Agent).is_empty());
        assert!(reload.on_ready(old, 1).is_empty(), "not the new agent");
        let mut done = reload.on_ready(new, 7);
        let report = reply_of(&mut done).unwrap();
        assert_eq!(kinds(&done), ["emit AgentReloaded"]);
        assert_eq!((report.old_pid, report.new_pid, report.epoch), (old_pid, f.pid(new), 7));
        assert!(!reload.is_running());
    }

    #[tokio::test(start_paused = true)]
    async fn a_successor_that_exits_before_ready_fails_the_reload_and_the_slot_restarts_with_backoff() {
        let mut f = Fixture::ready(1);
        let mut reload = AgentReload::default();
        let old = f.key(SlotId::Agent);
        let old_pid = f.pid(old);
        let (tx, _rx) = oneshot::channel();
        let _ = reload.request(f.slots.agent().unwrap(), open(), GRACE, tx);
        f.exit(old);
        let timeout = Duration::from_secs(10);
        let _ = reload.on_exited(old, Ended::by(ExitReason::Code(0)), timeout);
        let new = f.spawn(SlotId::Agent, 8);
        let new_pid = f.pid(new);
        let _ = reload.on_launched(Ok((new, new_pid)), SlotId::Agent);
        let mut failed = reload.on_exited(new, Ended::by(ExitReason::Code(IPC_MISMATCH_EXIT)), timeout).unwrap();
        let e = reply_of(&mut failed).unwrap_err();
        assert_eq!(
            e,
            ReloadError::AgentFailed {
                old_pid,
                new_pid: Some(new_pid),
                cause: StartFailure::IpcMismatch(ExitReason::Code(IPC_MISMATCH_EXIT)),
            }
        );
        let text = format!(
            "new agent {new_pid} exited with code 111 before it was ready: the executable on disk speaks another IPC \
             version (the old agent {old_pid} is stopped; the agent is restarted with backoff as after a crash)"
        );
        assert_eq!(e.to_string(), text);
        assert!(matches!(&failed[0], Action::Emit(ClusterEvent::ReloadFailed { reason }) if *reason == text));
        assert_eq!(kinds(&failed), ["emit ReloadFailed", "restart agent"]);
        assert!(reload.on_exited(new, Ended::by(ExitReason::Code(1)), timeout).is_none(), "over: a crash as usual");
    }

    #[tokio::test(start_paused = true)]
    async fn a_successor_not_ready_in_time_or_not_spawned_fails_the_reload_with_that_cause() {
        let mut f = Fixture::ready(1);
        let timeout = Duration::from_secs(10);
        // Not ready in time: the master killed it (`timed_out`), then it exited.
        let mut reload = AgentReload::default();
        let old = f.key(SlotId::Agent);
        let old_pid = f.pid(old);
        let (tx, _rx) = oneshot::channel();
        let _ = reload.request(f.slots.agent().unwrap(), open(), GRACE, tx);
        f.exit(old);
        let _ = reload.on_exited(old, Ended::by(ExitReason::Code(0)), timeout);
        let new = f.spawn(SlotId::Agent, 8);
        let new_pid = f.pid(new);
        let _ = reload.on_launched(Ok((new, new_pid)), SlotId::Agent);
        let mut failed = reload.on_exited(new, Ended::at_deadline(ExitReason::Signal(9)), timeout).unwrap();
        let e = reply_of(&mut failed).unwrap_err();
        assert_eq!(
            e,
            ReloadError::AgentFailed { old_pid, new_pid: Some(new_pid), cause: StartFailure::TimedOut(timeout) }
        );
        assert!(e.to_string().starts_with(&format!("new agent {new_pid} was not ready within 10s (the old agent ")));

        // Not spawned at all.
        let old = f.spawn(SlotId::Agent, 9);
        let old_pid = f.pid(old);
        f.slots.get_mut(SlotId::Agent).unwrap().state = ProcessState::Ready;
        let (tx, _rx) = oneshot::channel();
        let _ = reload.request(f.slots.agent().unwrap(), open(), GRACE, tx);
        f.exit(old);
        let _ = reload.on_exited(old, Ended::by(ExitReason::Code(0)), timeout);
        let mut failed = reload.on_launched(Err("Permission denied (os error 13)".into()), SlotId::Agent);
        let e = reply_of(&mut failed).unwrap_err();
        assert_eq!(
            e,
            ReloadError::AgentFailed {
                old_pid,
                new_pid: None,
                cause: StartFailure::Spawn("Permission denied (os error 13)".into())
            }
        );
        assert!(
            e.to_string()
                .starts_with("the new agent could not be spawned: Permission denied (os error 13) (the old agent "),
            "{e}"
        );
        assert_eq!(kinds(&failed), ["emit ReloadFailed", "restart agent"]);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_answered_at_once_and_change_nothing() {
        let mut f = Fixture::ready(1);
        let mut reload = AgentReload::default();
        let mut refusal = |f: &Fixture, gate: Gate| {
            let (tx, _rx) = oneshot::channel();
            let mut actions = reload.request(f.slots.agent().unwrap(), gate, GRACE, tx);
            reply_of(&mut actions).unwrap_err()
        };
        assert_eq!(refusal(&f, Gate { stopping: true, ..open() }), ReloadError::ShuttingDown);
        assert_eq!(
            refusal(&f, Gate { running: Some(ReplaceReason::Reload), ..open() }),
            ReloadError::InProgress { running: ReplaceReason::Reload }
        );
        assert_eq!(
            refusal(&f, Gate { memory_stop: true, ..open() }),
            ReloadError::InProgress { running: ReplaceReason::MaxMemory }
        );
        assert_eq!(refusal(&f, Gate { announced: false, ..open() }), ReloadError::NotReady);
        assert!(matches!(refusal(&f, Gate { executable: false, ..open() }), ReloadError::ExecutableMissing { .. }));
        f.slots.get_mut(SlotId::Agent).unwrap().state = ProcessState::Starting;
        assert_eq!(refusal(&f, open()), ReloadError::AgentNotReady);
    }
}
