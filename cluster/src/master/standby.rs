//! The executor's side of the hot standby ([`standby`](crate::standby)):
//! starting it, promoting it into the agent's slot, and the keys a promoted
//! standby's I/O tasks still report under.

use super::Master;
use crate::ClusterEvent;
use crate::child_io::Input;
use crate::identity::{ProcKey, SlotId};
use crate::ipc::ToChild;
use crate::lifecycle::{Action, Timer};
use crate::standby::Gate;
use crate::status::ProcessState;

impl Master {
    /// A promoted standby's reader and waiter tasks report under its standby
    /// key: the input is renamed to the key it has in the agent's slot.
    pub(super) fn promoted_key(&mut self, input: Input) -> Input {
        if self.progress.promoted.is_empty() {
            return input;
        }
        let rename = |promoted: &std::collections::HashMap<ProcKey, ProcKey>, key: ProcKey| {
            promoted.get(&key).copied().unwrap_or(key)
        };
        match input {
            Input::FromChild(key, msg) => Input::FromChild(rename(&self.progress.promoted, key), msg),
            Input::BadFrame(key, e) => Input::BadFrame(rename(&self.progress.promoted, key), e),
            Input::Eof(key, e) => Input::Eof(rename(&self.progress.promoted, key), e),
            Input::Exited(key, status) => Input::Exited(self.progress.promoted.remove(&key).unwrap_or(key), status),
            other => other,
        }
    }

    pub(super) fn standby_gate(&self) -> Gate {
        Gate { stopping: self.machines.stop.is_stopping(), agent_reloading: self.machines.agent_reload.is_running() }
    }

    /// Starts the standby when there should be one and there is none.
    pub(super) fn ensure_standby(&mut self) {
        let actions = self.machines.standby.wanted(&self.slots, self.standby_gate());
        self.apply(actions);
    }

    /// Spawns the standby (a spawn error: a failed start, restarted with backoff).
    pub(super) fn start_standby(&mut self) {
        if let Some(s) = self.slots.get_mut(SlotId::Standby)
            && s.ever_ready
        {
            s.restarts += 1;
        }
        if let Err(e) = self.start(SlotId::Standby) {
            self.spawn_failed(SlotId::Standby, &e);
        }
    }

    /// The agent died and the standby `key` is ready: it becomes the agent's
    /// process at the next epoch. It reports `Ready::Agent` once its Leader
    /// serves (then the workers are told, and a new standby starts).
    pub(super) fn promote(&mut self, key: ProcKey) -> Vec<Action> {
        let dead = self.progress.agent_info.as_ref().map_or((0, 0), |info| (info.pid, info.epoch));
        let Some(standby) = self.slots.get_mut(SlotId::Standby) else { return vec![Action::Restart(SlotId::Agent)] };
        let Some(mut proc) = standby.take_proc(key) else { return vec![Action::Restart(SlotId::Agent)] };
        standby.state = ProcessState::Pending;
        let agent_key = ProcKey { slot: SlotId::Agent, generation: key.generation };
        self.progress.promoted.insert(key, agent_key);
        self.progress.epoch += 1;
        let epoch = self.progress.epoch;
        // The epoch it must succeed: the dead agent's (its mirror is warm only if of that one).
        let succeeded = if dead.1 > 0 { dead.1 } else { proc.epoch };
        proc.key = agent_key;
        proc.epoch = epoch;
        proc.socket = None;
        proc.control(ToChild::Promote { epoch, succeeded });
        let pid = proc.pid;
        tracing::debug!(pid, epoch, succeeded, "promote sent to the standby");
        if let Some(agent) = self.slots.get_mut(SlotId::Agent) {
            agent.proc = Some(proc);
            agent.state = ProcessState::Starting;
            agent.restarts += 1;
            agent.crash_loop.spawned();
        }
        self.after(self.setup.config.agent_start_timeout, Timer::StartDeadline(agent_key));
        self.outbound.stats.standby_promotions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.emit(ClusterEvent::StandbyPromoted { pid, epoch, replaces: dead.0 });
        Vec::new()
    }
}
