//! The order of a graceful stop, as a state machine (no I/O: it reads the
//! slots and returns [`Action`]s for the master to carry out).
//!
//! ```text
//! begin:  Stop{worker grace} to every worker (and a predecessor still draining)
//!         ... workers exit ... (grace over: SIGKILL what is left; not reaped
//!         within REAP_TIMEOUT: given up on)
//!   ->    Stop{agent grace} to the agent ... agent exits (or SIGKILL, reap)
//!   ->    Done: the master's loop ends
//! begin again (a second signal): skip what is left of the grace: SIGKILL all
//! ```
//!
//! Workers go before the agent so their Followers never lose the Leader while
//! they drain (eggjs/cluster#76).

use std::time::Duration;

use crate::identity::SlotId;
use crate::lifecycle::{Action, Timer};
use crate::status::ProcessState;
use crate::supervisor::{Slot, Slots};
use crate::{ClusterEvent, ProcessRole};

/// How long the master waits for SIGKILLed processes to be reaped before giving up on them.
pub(crate) const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a stop is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Waiting for the workers to exit.
    Workers,
    /// Waiting for the agent to exit.
    Agent,
    /// Everything has exited.
    Done,
}

impl Stage {
    /// The role whose processes this stage waits for.
    fn role(self) -> Option<ProcessRole> {
        match self {
            Stage::Workers => Some(ProcessRole::Worker),
            Stage::Agent => Some(ProcessRole::Agent),
            Stage::Done => None,
        }
    }
}

/// The grace periods of a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Graces {
    pub workers: Duration,
    pub agent: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Stopping {
    stage: Stage,
    /// A second signal: no more grace.
    forced: bool,
    /// Tells this stage's deadline timer from an earlier stage's.
    deadline_id: u64,
}

/// The stop sequence: not started, in a stage, or done.
#[derive(Debug, Default)]
pub(crate) struct StopSequence {
    stopping: Option<Stopping>,
    next_deadline: u64,
}

impl StopSequence {
    /// Whether a stop has begun.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// Whether every process has exited.
    pub(crate) fn is_done(&self) -> bool {
        self.stage() == Some(Stage::Done)
    }

    pub(crate) fn stage(&self) -> Option<Stage> {
        self.stopping.map(|s| s.stage)
    }

    /// A stop signal: the first starts a graceful stop (workers first); a
    /// second one skips the grace (SIGKILL everything); later ones do nothing.
    pub(crate) fn begin(&mut self, slots: &Slots, graces: Graces) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(stopping) = self.stopping.as_mut() {
            if !stopping.forced {
                stopping.forced = true;
                tracing::warn!("second stop signal: skipping the grace period");
                actions.push(Action::Emit(ClusterEvent::ShutdownStarted { forced: true }));
                kill_role(slots, ProcessRole::Worker, &mut actions);
                kill_role(slots, ProcessRole::Agent, &mut actions);
            }
            return actions;
        }
        tracing::debug!("stopping: workers first, then the agent");
        actions.push(Action::Emit(ClusterEvent::ShutdownStarted { forced: false }));
        self.next_deadline += 1;
        self.stopping = Some(Stopping { stage: Stage::Workers, forced: false, deadline_id: self.next_deadline });
        for w in slots.with_role(ProcessRole::Worker) {
            for p in w.proc.iter().chain(w.previous.iter()) {
                actions.push(Action::Retire(p.key));
            }
            if let Some(p) = &w.previous {
                actions.push(Action::Stop { to: p.key, grace: graces.workers });
            }
            match &w.proc {
                Some(p) => {
                    actions.push(Action::Stop { to: p.key, grace: graces.workers });
                    actions.push(Action::SetState(w.id, ProcessState::Stopping));
                }
                None if w.previous.is_some() => actions.push(Action::SetState(w.id, ProcessState::Stopping)),
                None => actions.push(Action::SetState(w.id, ProcessState::Stopped)),
            }
        }
        for a in slots.with_role(ProcessRole::Agent).filter(|a| a.proc.is_none()) {
            actions.push(Action::SetState(a.id, ProcessState::Stopped));
        }
        actions.push(Action::After(graces.workers, Timer::StopDeadline(self.next_deadline)));
        self.advance(slots, graces, &mut actions);
        actions
    }

    /// Moves on when the stage's processes have all left their slots.
    pub(crate) fn on_advance(&mut self, slots: &Slots, graces: Graces) -> Vec<Action> {
        let mut actions = Vec::new();
        self.advance(slots, graces, &mut actions);
        actions
    }

    fn advance(&mut self, slots: &Slots, graces: Graces, actions: &mut Vec<Action>) {
        loop {
            let Some(stopping) = self.stopping else { return };
            match stopping.stage {
                Stage::Workers => {
                    if slots.with_role(ProcessRole::Worker).any(occupied) {
                        return;
                    }
                    self.next_deadline += 1;
                    let id = self.next_deadline;
                    self.stopping = Some(Stopping { stage: Stage::Agent, deadline_id: id, ..stopping });
                    let mut any = false;
                    for p in slots.with_role(ProcessRole::Agent).filter_map(|a| a.proc.as_ref()) {
                        tracing::debug!("workers stopped; stopping the agent");
                        actions.push(Action::Stop { to: p.key, grace: graces.agent });
                        actions.push(Action::SetState(p.key.slot, ProcessState::Stopping));
                        any = true;
                    }
                    if any {
                        actions.push(Action::After(graces.agent, Timer::StopDeadline(id)));
                        if stopping.forced {
                            kill_role(slots, ProcessRole::Agent, actions);
                        }
                    }
                }
                Stage::Agent => {
                    if slots.with_role(ProcessRole::Agent).any(|a| a.proc.is_some()) {
                        return;
                    }
                    for a in slots.with_role(ProcessRole::Agent) {
                        actions.push(Action::SetState(a.id, ProcessState::Stopped));
                    }
                    self.stopping = Some(Stopping { stage: Stage::Done, ..stopping });
                }
                Stage::Done => return,
            }
        }
    }

    /// A stage's grace is over: SIGKILL what is left of it, and wait
    /// `REAP_TIMEOUT` for the kills to be reaped.
    pub(crate) fn on_deadline(&mut self, id: u64, slots: &Slots) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(stopping) = self.stopping.filter(|s| s.deadline_id == id) else { return actions };
        tracing::warn!(stage = ?stopping.stage, "grace period over; killing what is left");
        if let Some(role) = stopping.stage.role() {
            kill_role(slots, role, &mut actions);
        }
        actions.push(Action::After(REAP_TIMEOUT, Timer::ReapDeadline(id)));
        actions
    }

    /// Killed processes were not reaped in time: give up on them and move on.
    pub(crate) fn on_reap_deadline(&mut self, id: u64, slots: &Slots) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(stopping) = self.stopping.filter(|s| s.deadline_id == id) else { return actions };
        tracing::error!(stage = ?stopping.stage, "killed processes were not reaped in time; giving up on them");
        if let Some(role) = stopping.stage.role() {
            let abandoned: Vec<SlotId> = slots.with_role(role).filter(|s| occupied(s)).map(|s| s.id).collect();
            actions.extend(abandoned.into_iter().map(Action::Abandon));
        }
        actions.push(Action::Advance(crate::lifecycle::Machine::Stop));
        actions
    }
}

/// Whether a process (or a predecessor still draining) is in the slot.
fn occupied(slot: &Slot) -> bool {
    slot.proc.is_some() || slot.previous.is_some()
}

fn kill_role(slots: &Slots, role: ProcessRole, actions: &mut Vec<Action>) {
    for slot in slots.with_role(role) {
        for p in slot.proc.iter().chain(slot.previous.iter()) {
            tracing::warn!(pid = p.pid, slot = %slot.id, "SIGKILL");
            actions.push(Action::Kill(p.key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::testing::{Fixture, kinds};

    const GRACES: Graces = Graces { workers: Duration::from_secs(3), agent: Duration::from_secs(5) };

    #[test]
    fn workers_stop_first_then_the_agent_then_done() {
        let mut f = Fixture::ready(2);
        let mut stop = StopSequence::default();
        let actions = stop.begin(&f.slots, GRACES);
        let (w1, w2, agent) = (f.key(SlotId::Worker(1)), f.key(SlotId::Worker(2)), f.key(SlotId::Agent));
        assert_eq!(
            kinds(&actions),
            [
                "emit ShutdownStarted".to_owned(),
                format!("retire {w1:?}"),
                format!("stop {w1:?} 3s"),
                "state worker 1 stopping".into(),
                format!("retire {w2:?}"),
                format!("stop {w2:?} 3s"),
                "state worker 2 stopping".into(),
                "after 3s StopDeadline(1)".into(),
            ]
        );
        assert_eq!(stop.stage(), Some(Stage::Workers));
        f.exit(w1);
        assert!(stop.on_advance(&f.slots, GRACES).is_empty(), "worker 2 still runs");
        f.exit(w2);
        let actions = stop.on_advance(&f.slots, GRACES);
        assert_eq!(
            kinds(&actions),
            [format!("stop {agent:?} 5s"), "state agent stopping".into(), "after 5s StopDeadline(2)".into()]
        );
        assert_eq!(stop.stage(), Some(Stage::Agent));
        f.exit(agent);
        assert_eq!(kinds(&stop.on_advance(&f.slots, GRACES)), ["state agent stopped"]);
        assert!(stop.is_done());
    }

    #[test]
    fn a_second_signal_kills_everything_once() {
        let f = Fixture::ready(1);
        let mut stop = StopSequence::default();
        let _ = stop.begin(&f.slots, GRACES);
        let (w1, agent) = (f.key(SlotId::Worker(1)), f.key(SlotId::Agent));
        assert_eq!(
            kinds(&stop.begin(&f.slots, GRACES)),
            ["emit ShutdownStarted".to_owned(), format!("kill {w1:?}"), format!("kill {agent:?}")]
        );
        assert!(stop.begin(&f.slots, GRACES).is_empty(), "a third signal changes nothing");
    }

    #[test]
    fn a_stage_deadline_kills_its_processes_then_gives_up_on_them_after_the_reap_timeout() {
        let f = Fixture::ready(2);
        let mut stop = StopSequence::default();
        let _ = stop.begin(&f.slots, GRACES);
        assert!(stop.on_deadline(7, &f.slots).is_empty(), "another stage's deadline is ignored");
        let (w1, w2) = (f.key(SlotId::Worker(1)), f.key(SlotId::Worker(2)));
        assert_eq!(
            kinds(&stop.on_deadline(1, &f.slots)),
            [format!("kill {w1:?}"), format!("kill {w2:?}"), "after 5s ReapDeadline(1)".into()]
        );
        assert_eq!(
            kinds(&stop.on_reap_deadline(1, &f.slots)),
            ["abandon worker 1", "abandon worker 2", "advance Stop"]
        );
    }

    #[test]
    fn with_no_workers_running_the_agent_is_stopped_at_once() {
        let mut f = Fixture::ready(1);
        f.exit(f.key(SlotId::Worker(1)));
        let mut stop = StopSequence::default();
        let actions = stop.begin(&f.slots, GRACES);
        let agent = f.key(SlotId::Agent);
        assert!(kinds(&actions).contains(&"state worker 1 stopped".to_owned()));
        assert!(kinds(&actions).contains(&format!("stop {agent:?} 5s")));
        assert_eq!(stop.stage(), Some(Stage::Agent));
    }
}
