//! The executor's side of the lifecycle machines: carrying out their
//! actions in order, feeding back what an action gives (a spawn's outcome, a
//! machine run again), and handing them the master's inputs (timers, reload
//! requests, memory samples, stop signals).

use std::collections::VecDeque;

use tokio::time::Instant;

use super::{MEMORY_SAMPLE_EVERY, Master, PRUNE_EVERY};
use crate::identity::{ProcKey, SlotId};
use crate::ipc::ToChild;
use crate::lifecycle::{Action, AgentReloadReply, Machine, ReloadReply, ScaleReply, Timer, grace_ms};
use crate::reload_handle::{ReplaceReason, ScaleTo};
use crate::round_robin::Cmd as RrCmd;
use crate::status::{ProcessState, rss_bytes};
use crate::{ClusterEvent, StartFailure, WorkerId};

impl Master {
    // ---- carrying out the lifecycle machines' actions ------------------------

    /// Carries out `actions` in order. What an action gives back (a spawn's
    /// outcome, a machine run again) is carried out next, before the rest.
    pub(super) fn apply(&mut self, actions: Vec<Action>) {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            let more = self.carry_out_step(action);
            for a in more.into_iter().rev() {
                queue.push_front(a);
            }
        }
    }

    pub(super) fn carry_out_step(&mut self, action: Action) -> Vec<Action> {
        match action {
            Action::Stop { to, grace } => {
                if let Some(p) = self.slots.proc(to) {
                    p.control(ToChild::Stop { grace_ms: grace_ms(grace) });
                }
            }
            Action::Kill(key) => {
                if let Some(p) = self.slots.proc_mut(key) {
                    p.kill();
                }
            }
            Action::TimedOut(key) => {
                if let Some(p) = self.slots.proc_mut(key) {
                    p.timed_out = true;
                }
            }
            Action::Retire(key) => {
                if let Some(rr) = &self.sockets.round_robin {
                    rr.notify(RrCmd::Retire(key));
                }
            }
            Action::SetState(id, state) => {
                if let Some(s) = self.slots.get_mut(id) {
                    s.state = state;
                }
            }
            Action::After(delay, timer) => self.after(delay, timer),
            Action::Emit(event) => self.emit(event),
            Action::Abandon(id) => {
                if let Some(s) = self.slots.get_mut(id)
                    && (s.proc.take().is_some() | s.previous.take().is_some())
                {
                    s.state = ProcessState::Stopped;
                }
            }
            Action::Replace(id) => return self.replace(id),
            Action::Restore(id) => {
                if let Some(s) = self.slots.get_mut(id)
                    && let Some(old) = s.previous.take()
                {
                    s.proc = Some(old);
                    s.state = ProcessState::Ready;
                }
            }
            Action::Relaunch(id) => {
                let outcome = self.launch(id).map_err(|e| e.to_string()).and_then(|()| self.count_new_process(id));
                return self.machines.agent_reload.on_launched(outcome, id);
            }
            Action::Restart(id) => self.schedule_restart(id),
            Action::ReplaceOverMemory(id) => return self.machines.reload.replace_over_memory(id),
            Action::AddWorker(id) => return self.add_worker(id),
            Action::RemoveSlot(id) => {
                if let Some(mut slot) = self.slots.remove(id) {
                    // Emptied first by the scale: a process still there is killed, not left behind.
                    for p in slot.proc.iter_mut().chain(slot.previous.iter_mut()) {
                        tracing::warn!(pid = p.pid, %id, "a removed slot still had a process; killed");
                        p.kill();
                    }
                }
                self.progress.last_exits.remove(&id);
            }
            Action::Promote(key) => return self.promote(key),
            Action::StartStandby => self.start_standby(),
            Action::Reply(reply) => reply.send(),
            Action::Advance(Machine::Stop) => return self.machines.stop.on_advance(&self.slots, self.graces()),
            Action::Advance(Machine::Scale) => return self.machines.scale.on_advance(&self.slots),
            Action::Advance(Machine::Reload) => {
                let settings = self.reload_settings();
                return self.machines.reload.on_advance(&self.slots, settings);
            }
        }
        Vec::new()
    }

    /// Moves worker `id`'s process aside (it serves on) and spawns its successor.
    pub(super) fn replace(&mut self, id: WorkerId) -> Vec<Action> {
        let slot = SlotId::Worker(id);
        if let Some(s) = self.slots.get_mut(slot)
            && let Some(old) = s.proc.take()
        {
            s.previous = Some(old);
        }
        let outcome = self.launch(slot).map_err(|e| e.to_string()).and_then(|()| self.count_new_process(slot));
        self.machines.reload.on_launched(id, outcome)
    }

    /// Adds worker slot `id` (a scale) and spawns its process.
    pub(super) fn add_worker(&mut self, id: WorkerId) -> Vec<Action> {
        let slot = SlotId::Worker(id);
        let outcome = if self.slots.add_worker(id, &self.setup.config.restart) {
            self.launch(slot).map_err(|e| e.to_string()).and_then(|()| {
                let p = self.slots.get(slot).and_then(|s| s.proc.as_ref()).ok_or("the new process is gone")?;
                Ok((p.key, p.pid))
            })
        } else {
            Err(format!("a slot {slot} exists already"))
        };
        self.machines.scale.on_launched(id, outcome)
    }

    /// A replacement's process was spawned: the status table's `restarts`
    /// counts every new process of the slot. Its key and pid.
    pub(super) fn count_new_process(&mut self, slot: SlotId) -> Result<(ProcKey, u32), String> {
        let s = self.slots.get_mut(slot).ok_or("no such slot")?;
        s.restarts += 1;
        s.proc.as_ref().map(|p| (p.key, p.pid)).ok_or_else(|| "the new process is gone".to_owned())
    }

    // ---- timers ------------------------------------------------------------

    pub(super) fn on_timer(&mut self, timer: Timer) {
        match timer {
            Timer::StartDeadline(key) => self.start_deadline(key),
            Timer::Restart { slot, id } => {
                if self.machines.stop.is_stopping() {
                    return;
                }
                let Some(s) = self.slots.get_mut(slot) else { return };
                if s.timer != id || !matches!(s.state, ProcessState::BackingOff | ProcessState::Failed) {
                    return;
                }
                if slot == SlotId::Standby {
                    // Only with a ready agent to mirror (else it waits for one).
                    let actions = self.machines.standby.on_restart_due(&self.slots, self.standby_gate());
                    return self.apply(actions);
                }
                s.restarts += 1;
                if let Err(e) = self.start(slot) {
                    self.spawn_failed(slot, &e);
                }
            }
            Timer::Retry { slot, id } => {
                if self.machines.stop.is_stopping() {
                    return;
                }
                let Some(s) = self.slots.get_mut(slot) else { return };
                if s.timer != id || s.state != ProcessState::BackingOff {
                    return;
                }
                if let Err(e) = self.start(slot) {
                    self.spawn_failed(slot, &e);
                }
            }
            Timer::StopDeadline(id) => {
                let actions = self.machines.stop.on_deadline(id, &self.slots);
                self.apply(actions);
            }
            Timer::ReapDeadline(id) => {
                let actions = self.machines.stop.on_reap_deadline(id, &self.slots);
                self.apply(actions);
            }
            Timer::DrainDeadline(key) => {
                if let Some(p) = self.slots.proc_mut(key) {
                    tracing::warn!(pid = p.pid, "stopped worker did not exit within its grace period; SIGKILL");
                    p.kill();
                }
            }
            Timer::AgentStopDeadline(key) => {
                if let Some(agent) = self.slots.get_mut(key.slot).and_then(|s| s.proc_mut(key)) {
                    tracing::warn!(pid = agent.pid, "stopped agent did not exit within its grace period; SIGKILL");
                    agent.kill();
                }
            }
            Timer::EnsureStandby => self.ensure_standby(),
            Timer::StandbyStopDeadline(key) => {
                let actions = self.machines.standby.on_stop_deadline(key, &self.slots);
                self.apply(actions);
            }
            Timer::EofKill(key) => {
                if let Some(proc) = self.slots.proc_mut(key) {
                    tracing::warn!(pid = proc.pid, "IPC channel closed but the process lives on; killing it");
                    proc.kill();
                }
            }
            Timer::Prune => {
                self.route(|router, _| router.on_tick(Instant::now()));
                self.refill_reserve();
                self.after(PRUNE_EVERY, Timer::Prune);
            }
            Timer::MemorySample => {
                self.check_memory();
                self.after(MEMORY_SAMPLE_EVERY, Timer::MemorySample);
            }
            Timer::Ping => {
                self.check_liveness(Instant::now());
                self.after(self.setup.config.ping_interval, Timer::Ping);
            }
        }
    }

    /// A process's start deadline: a replacement is stopped (its reload rolls
    /// back); any other process still starting is killed.
    pub(super) fn start_deadline(&mut self, key: ProcKey) {
        let settings = self.reload_settings();
        if let Some(actions) = self.machines.reload.on_start_timeout(&self.slots, key, settings) {
            return self.apply(actions);
        }
        let timeout = match key.slot {
            SlotId::Agent | SlotId::Standby => self.setup.config.agent_start_timeout,
            SlotId::Worker(_) => self.setup.config.worker_start_timeout,
        };
        let Some(slot) = self.slots.get_mut(key.slot) else { return };
        if slot.state != ProcessState::Starting {
            return;
        }
        // The slot's starting process only: a predecessor being
        // replaced (`previous`) was ready long ago.
        let Some(proc) = slot.proc.as_mut().filter(|p| p.key == key) else { return };
        proc.timed_out = true;
        proc.kill();
        let process = proc.process_ref();
        // Logged once, as the event (at ERROR).
        self.emit(ClusterEvent::StartFailed { process, reason: StartFailure::TimedOut(timeout) });
    }

    // ---- reloads, memory, stop ---------------------------------------------

    /// Starts a reload of the workers (SIGHUP: no reply; the outcome is an event and a log line).
    pub(super) fn request_reload(&mut self, reply: Option<ReloadReply>) {
        let gate = crate::reload::Gate {
            stopping: self.machines.stop.is_stopping(),
            announced: self.progress.announced,
            running: self.other_than_reload(),
        };
        let actions = self.machines.reload.request(&self.slots, gate, reply);
        self.apply(actions);
    }

    /// What runs besides the workers' replacement: the agent's reload or a scale.
    fn other_than_reload(&self) -> Option<ReplaceReason> {
        if self.machines.agent_reload.is_running() {
            Some(ReplaceReason::AgentReload)
        } else if self.machines.scale.is_running() {
            Some(ReplaceReason::Scale)
        } else {
            None
        }
    }

    /// Restarts worker `id` gracefully (a replacement of one slot), or refuses (answered at once).
    pub(super) fn request_restart(&mut self, id: WorkerId, reply: ReloadReply) {
        let gate = crate::reload::Gate {
            stopping: self.machines.stop.is_stopping(),
            announced: self.progress.announced,
            running: self.other_than_reload(),
        };
        let actions = self.machines.reload.restart(&self.slots, gate, id, reply);
        self.apply(actions);
    }

    /// Changes the worker count, or refuses (answered at once).
    pub(super) fn request_scale(&mut self, to: ScaleTo, reply: ScaleReply) {
        let running = self.machines.reload.running().or_else(|| {
            if self.machines.agent_reload.is_running() {
                Some(ReplaceReason::AgentReload)
            } else if self.machines.memory.agent_stopping() {
                Some(ReplaceReason::MaxMemory)
            } else {
                None
            }
        });
        let gate = crate::scale::Gate {
            stopping: self.machines.stop.is_stopping(),
            announced: self.progress.announced,
            running,
            reuseport: self.sockets.listeners.reuseport(),
            grace: self.setup.config.worker_stop_timeout,
        };
        let (actions, direction) = self.machines.scale.request(&self.slots, gate, to, reply);
        if let Some(direction) = direction {
            self.outbound.stats.count_scale(direction);
        }
        self.apply(actions);
    }

    /// Starts a reload of the agent, or refuses it (answered at once).
    pub(super) fn request_agent_reload(&mut self, reply: AgentReloadReply) {
        let exe = self.setup.program.exe.clone();
        let gate = crate::agent_reload::Gate {
            stopping: self.machines.stop.is_stopping(),
            announced: self.progress.announced,
            running: self.machines.reload.running().or(self
                .machines
                .scale
                .is_running()
                .then_some(ReplaceReason::Scale)),
            memory_stop: self.machines.memory.agent_stopping(),
            executable: crate::agent_reload::executable(&exe),
            exe,
        };
        let Some(agent) = self.slots.agent() else { return };
        let grace = self.setup.config.agent_stop_timeout;
        let actions = self.machines.agent_reload.request(agent, gate, grace, reply);
        self.apply(actions);
        if self.machines.agent_reload.is_running() {
            // The standby first: never promoted while the reload's agent starts.
            let actions = self.machines.standby.on_agent_reload(&self.slots, grace);
            self.apply(actions);
        }
    }

    /// Samples every child's RSS against its memory limit.
    pub(super) fn check_memory(&mut self) {
        let config = &self.setup.config;
        let sample = crate::memory::Sample {
            now: Instant::now(),
            agent_limit: config.agent_max_memory,
            worker_limit: config.worker_max_memory,
            agent_grace: config.agent_stop_timeout,
            stopping: self.machines.stop.is_stopping(),
            announced: self.progress.announced,
            // A scale too: a memory replacement waits for it to end.
            replacing: self.machines.reload.running().is_some() || self.machines.scale.is_running(),
            agent_reloading: self.machines.agent_reload.is_running(),
        };
        let actions = self.machines.memory.on_sample(&mut self.slots, sample, rss_bytes);
        self.apply(actions);
    }

    /// The first call starts a graceful stop; a second one skips the grace.
    pub(super) fn begin_stop(&mut self) {
        let first = !self.machines.stop.is_stopping();
        let mut actions = self.machines.stop.begin(&self.slots, self.graces());
        if first {
            // In this order: the `ShutdownStarted` event, the stop token, the
            // reloads in progress ended (answered), then the workers stopped.
            let rest = actions.split_off(actions.len().min(1));
            self.apply(actions);
            self.lifetime.stopping.cancel();
            let mut aborted = self.machines.reload.abort();
            aborted.extend(self.machines.agent_reload.abort());
            aborted.extend(self.machines.scale.abort());
            self.apply(aborted);
            actions = rest;
        }
        self.apply(actions);
    }

    pub(super) fn advance_stop(&mut self) {
        let actions = self.machines.stop.on_advance(&self.slots, self.graces());
        self.apply(actions);
    }
}
