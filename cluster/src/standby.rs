//! The agent's hot standby ([`Config::standby`](crate::Config::standby)): when
//! to start it, when to promote it, when to stop it. I/O-free, like the other
//! lifecycle machines ([`lifecycle`](crate::lifecycle)): it reads the slots
//! and returns actions for the master to carry out.
//!
//! ```text
//! agent ready, no standby ──(SPAWN_DELAY)──> StartStandby ──> (standby: mirror synced) Ready{Standby{mirrors: E}}
//! agent of epoch E dies (crash, hang killed, memory stop)
//!     standby ready ──> Promote: the standby's process becomes the agent's, Promote{E+1, E}
//!                       ──> (it binds, serves its mirror) Ready{Agent} ──> a new standby
//!     no ready standby ──> the agent's cold restart (crash-loop backoff)
//! agent reload (restart --agent) ──> the standby is stopped first (no promotion, never
//!                                    two Leaders); a new one once the new agent is ready
//! standby dies ──> restarted under its own crash-loop policy; the agent is untouched
//! standby over agent_max_memory ──> stopped (`memory`), then as a standby that died
//! stop ──> stopped with the agent, after the workers (`Slots::with_role`)
//! ```
//!
//! The standby holds no upstream connection: it follows the Leader's socket
//! only (`tandem::cluster_glue::start_leader`), so the host keeps one upstream
//! connection at all times.

use std::time::Duration;

use crate::identity::{ProcKey, SlotId};
use crate::lifecycle::{Action, Timer};
use crate::status::ProcessState;
use crate::supervisor::Slots;

/// How long after the agent is ready (at start, after a promotion, after a
/// reload) the standby is spawned. Not at once: the spawn (fork, exec, a new
/// runtime) runs on the master's loop and would hold up the messages that
/// move the workers to the new agent, and the new process would compete with
/// their reconnects for the CPU. A kill within this window finds no ready
/// standby and restarts the agent cold.
pub(crate) const SPAWN_DELAY: Duration = Duration::from_millis(20);

/// What else the master is doing, for [`Standby`] to decide.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Gate {
    /// The cluster is stopping.
    pub stopping: bool,
    /// An agent reload (or `restart --agent`) is running.
    pub agent_reloading: bool,
}

/// The hot standby's machine.
#[derive(Debug, Default)]
pub(crate) struct Standby {
    enabled: bool,
    /// The standby asked to stop for an agent reload: its exit is not a crash.
    retiring: Option<ProcKey>,
}

impl Standby {
    pub(crate) fn new(enabled: bool) -> Self {
        Standby { enabled, retiring: None }
    }

    /// Whether a standby may run now: the cluster keeps one, the agent is
    /// ready (a standby mirrors it) and neither a stop nor an agent reload runs.
    fn may_run(&self, slots: &Slots, gate: Gate) -> bool {
        self.enabled
            && !gate.stopping
            && !gate.agent_reloading
            && slots.agent().is_some_and(|a| a.state == ProcessState::Ready && a.proc.is_some())
    }

    /// Starts a standby when there should be one and none runs or waits for
    /// its crash-loop restart (that timer starts it).
    pub(crate) fn wanted(&self, slots: &Slots, gate: Gate) -> Vec<Action> {
        let Some(standby) = slots.standby() else { return Vec::new() };
        let idle = standby.proc.is_none()
            && matches!(standby.state, ProcessState::Pending | ProcessState::Stopped | ProcessState::Stopping);
        if idle && self.retiring.is_none() && self.may_run(slots, gate) {
            vec![Action::StartStandby]
        } else {
            Vec::new()
        }
    }

    /// The standby's crash-loop restart is due: start it if it may run now;
    /// otherwise it waits (`Pending`) for the agent to be ready again.
    pub(crate) fn on_restart_due(&self, slots: &Slots, gate: Gate) -> Vec<Action> {
        if self.may_run(slots, gate) {
            vec![Action::StartStandby]
        } else {
            vec![Action::SetState(SlotId::Standby, ProcessState::Pending)]
        }
    }

    /// The agent died outside a stop and an agent reload: the ready standby
    /// is promoted. `None`: there is none ready (the agent restarts cold).
    pub(crate) fn on_agent_exited(&self, slots: &Slots, gate: Gate) -> Option<Vec<Action>> {
        if !self.enabled || gate.stopping || gate.agent_reloading {
            return None;
        }
        let standby = slots.standby().filter(|s| s.state == ProcessState::Ready)?;
        let proc = standby.proc.as_ref().filter(|p| Some(p.key) != self.retiring && !p.timed_out)?;
        Some(vec![Action::Promote(proc.key)])
    }

    /// An agent reload begins: the standby is stopped first, so that it is
    /// never promoted while the reload's new agent starts (two Leaders).
    pub(crate) fn on_agent_reload(&mut self, slots: &Slots, grace: Duration) -> Vec<Action> {
        let Some(proc) = slots.standby().and_then(|s| s.proc.as_ref()) else { return Vec::new() };
        self.retiring = Some(proc.key);
        vec![
            Action::Stop { to: proc.key, grace },
            Action::SetState(SlotId::Standby, ProcessState::Stopping),
            Action::After(grace, Timer::StandbyStopDeadline(proc.key)),
        ]
    }

    /// The standby's stop deadline: a retiring standby still there is
    /// killed, and so is one stopped for its memory limit (`Stopping`).
    pub(crate) fn on_stop_deadline(&self, key: ProcKey, slots: &Slots) -> Vec<Action> {
        let stopping = slots
            .standby()
            .is_some_and(|s| s.state == ProcessState::Stopping && s.proc.as_ref().is_some_and(|p| p.key == key));
        if self.retiring == Some(key) || stopping { vec![Action::Kill(key)] } else { Vec::new() }
    }

    /// The standby exited outside a stop: one retired for an agent reload is
    /// replaced once it may run again; any other died, and is restarted under
    /// the crash-loop policy (the agent is untouched).
    pub(crate) fn on_exited(&mut self, key: ProcKey, slots: &Slots, gate: Gate) -> Vec<Action> {
        if self.retiring == Some(key) {
            self.retiring = None;
            let mut actions = vec![Action::SetState(SlotId::Standby, ProcessState::Pending)];
            // The reload may be over already (its agent ready before this exit).
            if self.may_run(slots, gate) {
                actions.push(Action::StartStandby);
            }
            return actions;
        }
        vec![Action::Restart(SlotId::Standby)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RestartPolicy;
    use crate::supervisor::testing::{Fixture, kinds};

    /// The agent and two workers ready, and a standby slot (empty, `Pending`).
    fn fixture() -> Fixture {
        let mut f = Fixture::ready(2);
        assert!(f.slots.add_standby(&RestartPolicy::default()));
        f
    }

    fn ready_standby(f: &mut Fixture) -> ProcKey {
        let key = f.spawn(SlotId::Standby, 8);
        f.slots.get_mut(SlotId::Standby).unwrap().state = ProcessState::Ready;
        key
    }

    const RUNNING: Gate = Gate { stopping: false, agent_reloading: false };

    #[test]
    fn a_standby_starts_once_the_agent_is_ready_and_only_then() {
        let mut f = fixture();
        let machine = Standby::new(true);
        assert_eq!(kinds(&machine.wanted(&f.slots, RUNNING)), ["start standby"]);
        // Not while the agent starts, nor during a stop or an agent reload, nor when off.
        f.slots.get_mut(SlotId::Agent).unwrap().state = ProcessState::Starting;
        assert!(machine.wanted(&f.slots, RUNNING).is_empty());
        f.slots.get_mut(SlotId::Agent).unwrap().state = ProcessState::Ready;
        assert!(machine.wanted(&f.slots, Gate { stopping: true, ..RUNNING }).is_empty());
        assert!(machine.wanted(&f.slots, Gate { agent_reloading: true, ..RUNNING }).is_empty());
        assert!(Standby::new(false).wanted(&f.slots, RUNNING).is_empty());
        // Not a second one, nor over a pending crash-loop restart.
        ready_standby(&mut f);
        assert!(machine.wanted(&f.slots, RUNNING).is_empty());
        let mut f = fixture();
        f.slots.get_mut(SlotId::Standby).unwrap().state = ProcessState::BackingOff;
        assert!(machine.wanted(&f.slots, RUNNING).is_empty());
        // A cluster without a standby slot.
        assert!(machine.wanted(&Fixture::ready(1).slots, RUNNING).is_empty());
    }

    #[test]
    fn the_agent_dying_promotes_a_ready_standby_else_restarts_cold() {
        let mut f = fixture();
        let machine = Standby::new(true);
        let agent = f.key(SlotId::Agent);
        f.exit(agent);
        // No standby yet: the cold restart.
        assert!(machine.on_agent_exited(&f.slots, RUNNING).is_none());
        let standby = f.spawn(SlotId::Standby, 8);
        assert!(machine.on_agent_exited(&f.slots, RUNNING).is_none(), "a standby still starting is not promoted");
        f.slots.get_mut(SlotId::Standby).unwrap().state = ProcessState::Ready;
        let actions = machine.on_agent_exited(&f.slots, RUNNING).unwrap();
        assert_eq!(kinds(&actions), [format!("promote {standby:?}")]);
        // Never during a stop or an agent reload.
        assert!(machine.on_agent_exited(&f.slots, Gate { stopping: true, ..RUNNING }).is_none());
        assert!(machine.on_agent_exited(&f.slots, Gate { agent_reloading: true, ..RUNNING }).is_none());
        assert!(Standby::new(false).on_agent_exited(&f.slots, RUNNING).is_none());
    }

    #[test]
    fn an_agent_reload_stops_the_standby_first_and_replaces_it_after() {
        let mut f = fixture();
        let mut machine = Standby::new(true);
        let standby = ready_standby(&mut f);
        let grace = Duration::from_secs(5);
        assert_eq!(
            kinds(&machine.on_agent_reload(&f.slots, grace)),
            [
                format!("stop {standby:?} {grace:?}"),
                "state standby stopping".to_owned(),
                format!("after {grace:?} StandbyStopDeadline({standby:?})")
            ]
        );
        let reloading = Gate { agent_reloading: true, ..RUNNING };
        // The old agent exits meanwhile: the retiring standby is not promoted.
        f.slots.get_mut(SlotId::Standby).unwrap().state = ProcessState::Ready;
        assert!(machine.on_agent_exited(&f.slots, RUNNING).is_none(), "a retiring standby is never promoted");
        assert_eq!(kinds(&machine.on_stop_deadline(standby, &f.slots)), [format!("kill {standby:?}")]);
        // It exits during the reload: not a crash, and no new one yet.
        f.exit(standby);
        assert_eq!(kinds(&machine.on_exited(standby, &f.slots, reloading)), ["state standby pending"]);
        assert!(machine.on_stop_deadline(standby, &f.slots).is_empty());
        assert!(machine.wanted(&f.slots, reloading).is_empty());
        // The reload's agent is ready: a new standby.
        f.slots.get_mut(SlotId::Standby).unwrap().state = ProcessState::Pending;
        assert_eq!(kinds(&machine.wanted(&f.slots, RUNNING)), ["start standby"]);
    }

    #[test]
    fn a_standby_retired_after_the_reload_is_over_is_replaced_at_once() {
        let mut f = fixture();
        let mut machine = Standby::new(true);
        let standby = ready_standby(&mut f);
        machine.on_agent_reload(&f.slots, Duration::from_secs(1));
        f.exit(standby);
        assert_eq!(kinds(&machine.on_exited(standby, &f.slots, RUNNING)), ["state standby pending", "start standby"]);
    }

    #[test]
    fn a_dead_standby_is_restarted_under_the_crash_loop_and_only_with_a_ready_agent() {
        let mut f = fixture();
        let mut machine = Standby::new(true);
        let standby = ready_standby(&mut f);
        f.exit(standby);
        assert_eq!(kinds(&machine.on_exited(standby, &f.slots, RUNNING)), ["restart standby"]);
        assert_eq!(kinds(&machine.on_restart_due(&f.slots, RUNNING)), ["start standby"]);
        // The agent is down when the restart is due: the standby waits for it.
        f.slots.get_mut(SlotId::Agent).unwrap().state = ProcessState::BackingOff;
        assert_eq!(kinds(&machine.on_restart_due(&f.slots, RUNNING)), ["state standby pending"]);
    }
}
