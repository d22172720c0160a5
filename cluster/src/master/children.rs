//! The master's children: spawning a slot's process, its ready report, its
//! exit, and the hang detection's pings. Part of the executor
//! ([`master`](crate::master)): what the lifecycle machines decide about a
//! process that starts, is ready or exits is handed to them from here.

use std::process::ExitStatus;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

use super::Master;
use crate::child_io::{read_from_child, send_listeners, wait_for_child, write_to_child};
use crate::identity::{AgentInfo, ProcKey, SlotId};
use crate::ipc::{Init, Ready, ToChild};
use crate::lifecycle::Timer;
use crate::liveness::{Liveness, Verdict};
use crate::process::Ended;
use crate::round_robin::Cmd as RrCmd;
use crate::status::ProcessState;
use crate::supervisor::{Proc, Slot};
use crate::{ClusterEvent, ExitReason, ProcessRef, ProcessRole, StartFailure};

/// Control messages per child: more than `MAX_OUTSTANDING_OPS` outcomes plus
/// lifecycle messages. Full: the child is not reading; a message is dropped
/// and logged ([`Proc::control`]). The data queue (`Config::queue_capacity`)
/// is never found full: the router checks its room first.
const CONTROL_CAPACITY: usize = crate::messenger::MAX_OUTSTANDING_OPS + 64;

impl Master {
    /// Spawns a process for `slot`. A spawn error is returned for the very
    /// first agent; later ones are handled as a failed start (restart with backoff).
    pub(super) fn start(&mut self, slot: SlotId) -> std::io::Result<()> {
        let first = self.progress.next_generation == 1;
        match self.launch(slot) {
            Err(e) if !first => {
                self.spawn_failed(slot, &e);
                Ok(())
            }
            result => result,
        }
    }

    /// Spawns a process into `slot` (replacing `slot.proc`); a spawn error is returned.
    pub(super) fn launch(&mut self, slot: SlotId) -> std::io::Result<()> {
        let generation = self.progress.next_generation;
        self.progress.next_generation += 1;
        let key = ProcKey { slot, generation };
        let epoch = match slot {
            SlotId::Agent => {
                self.progress.epoch += 1;
                self.progress.epoch
            }
            // A standby's: the epoch it mirrors, once ready; the next one once promoted.
            SlotId::Worker(_) | SlotId::Standby => 0,
        };
        let spawned = self.spawn_process(slot)?;
        let pid = spawned.pid;
        let (control_tx, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        let (data_tx, data_rx) = mpsc::channel(self.setup.config.queue_capacity.max(1));
        let (kill_tx, kill_rx) = oneshot::channel();
        let (rd, wr) = spawned.stream;
        let span = match slot {
            SlotId::Agent => tracing::info_span!("child", child.role = "agent", child.pid = pid, epoch),
            SlotId::Worker(id) => tracing::info_span!("child", child.role = "worker", worker.id = id, child.pid = pid),
            SlotId::Standby => tracing::info_span!("child", child.role = "standby", child.pid = pid),
        };
        self.lifetime.tasks.spawn(write_to_child(wr, control_rx, data_rx).instrument(span.clone()));
        self.lifetime.tasks.spawn(
            read_from_child(rd, key, self.inbound.input_tx.clone(), self.router.relay()).instrument(span.clone()),
        );
        let listeners = match slot {
            SlotId::Worker(id) if !self.sockets.listeners.is_empty() => {
                let count = self.sockets.listeners.for_worker(id).len();
                let task = send_listeners(
                    Arc::clone(&self.sockets.listeners),
                    id,
                    spawned.fd_channel,
                    self.sockets.round_robin.clone(),
                    key,
                );
                self.lifetime.tasks.spawn(task.instrument(span.clone()));
                count
            }
            _ => 0,
        };
        self.lifetime
            .tasks
            .spawn(wait_for_child(spawned.child, kill_rx, key, self.inbound.input_tx.clone()).instrument(span));

        let init = Init {
            cluster: self.setup.name.clone(),
            role: slot.spawn_role(),
            worker_id: slot.worker_id(),
            master_pid: self.setup.pid,
            runtime_dir: self.setup.dir.path().to_owned(),
            token: self.setup.token.clone(),
            epoch,
            agent: match slot {
                SlotId::Worker(_) => self.progress.agent_info.clone(),
                SlotId::Agent | SlotId::Standby => None,
            },
            cluster_ready: self.progress.announced,
            standby: slot == SlotId::Standby,
            link_capacity: u32::try_from(self.setup.config.link_window()).unwrap_or(u32::MAX),
            subscription_capacity: u32::try_from(self.setup.config.subscription_capacity).unwrap_or(u32::MAX),
            listeners: u32::try_from(listeners).unwrap_or(u32::MAX),
        };
        let proc = Proc::new(key, pid, control_tx, data_tx, epoch, kill_tx);
        proc.control(ToChild::Init(init));
        let process = proc.process_ref();
        let timeout = match slot {
            SlotId::Agent | SlotId::Standby => self.setup.config.agent_start_timeout,
            SlotId::Worker(_) => self.setup.config.worker_start_timeout,
        };
        if let Some(s) = self.slots.get_mut(slot) {
            s.proc = Some(proc);
            s.state = ProcessState::Starting;
            s.crash_loop.spawned();
            let transient = std::mem::take(&mut s.transient_failures);
            s.transient_backoff.reset();
            if transient > 0 {
                tracing::info!(%slot, pid, failed_attempts = transient, "spawned again: the resources freed");
            }
        }
        self.after(timeout, Timer::StartDeadline(key));
        self.emit(ClusterEvent::Spawned { process, epoch: (slot == SlotId::Agent).then_some(epoch) });
        Ok(())
    }

    /// Spawns a child; when the descriptor table is full, gives back the
    /// reserve and tries once more, then takes the reserve again.
    pub(super) fn spawn_process(&mut self, slot: SlotId) -> std::io::Result<crate::spawn::Spawned> {
        let error = match self.setup.program.spawn(slot.spawn_role(), slot.worker_id()) {
            Err(e) if crate::descriptors::is_fd_exhaustion(&e) && crate::descriptors::master_reserve().held() > 0 => e,
            result => {
                self.refill_reserve();
                return result;
            }
        };
        let mut reserve = crate::descriptors::master_reserve();
        let released = reserve.release();
        let result = self.setup.program.spawn(slot.spawn_role(), slot.worker_id());
        let held = reserve.refill();
        drop(reserve);
        match &result {
            Ok(spawned) => {
                tracing::warn!(%slot, error = %error, released, held, pid = spawned.pid, "descriptor table full: spawned with the reserve")
            }
            Err(e) => tracing::debug!(%slot, error = %e, released, held, "descriptor table full even with the reserve"),
        }
        result
    }

    /// Reopens what of the descriptor reserve is missing (a no-op when it is full).
    pub(super) fn refill_reserve(&self) {
        let mut reserve = crate::descriptors::master_reserve();
        let before = reserve.held();
        if before < crate::descriptors::RESERVE && reserve.refill() == crate::descriptors::RESERVE {
            tracing::info!(reopened = crate::descriptors::RESERVE - before, "descriptor reserve complete again");
        }
    }

    pub(super) fn spawn_failed(&mut self, slot: SlotId, error: &std::io::Error) {
        let process = ProcessRef { role: slot.role(), worker_id: slot.worker_id(), pid: None };
        if crate::descriptors::is_transient(error) {
            self.spawn_failed_transiently(slot, error);
            return;
        }
        // Logged once, as the event.
        self.emit(ClusterEvent::StartFailed { process, reason: StartFailure::Spawn(error.to_string()) });
        self.schedule_restart(slot);
    }

    /// The spawn failed for a lack of resources that frees by itself: retry
    /// with a capped backoff, without counting towards the crash-loop limit
    /// (the slot stays `BackingOff`, never `Failed`). WARN the first time.
    pub(super) fn spawn_failed_transiently(&mut self, slot: SlotId, error: &std::io::Error) {
        let Some(s) = self.slots.get_mut(slot) else { return };
        s.transient_failures = s.transient_failures.saturating_add(1);
        s.state = ProcessState::BackingOff;
        s.timer += 1;
        let (failures, id) = (s.transient_failures, s.timer);
        let delay = s.transient_backoff.next_delay();
        if failures == 1 {
            tracing::warn!(
                %slot,
                error = %error,
                retry_in_ms = delay.as_millis() as u64,
                "could not spawn for a lack of resources; retrying until it frees (not counted as a crash)"
            );
        } else {
            tracing::debug!(%slot, error = %error, failures, "spawn still short of resources");
        }
        self.after(delay, Timer::Retry { slot, id });
    }

    /// The slot's process died outside a stop: its crash-loop machine decides.
    pub(super) fn schedule_restart(&mut self, slot: SlotId) {
        let Some(s) = self.slots.get_mut(slot) else { return };
        let actions = s.on_died();
        let failed = s.state == ProcessState::Failed;
        self.apply(actions);
        if failed {
            self.check_cluster_ready();
        }
    }

    pub(super) fn on_ready(&mut self, key: ProcKey, ready: Ready) {
        let announced = self.progress.announced;
        let watch = self
            .setup
            .config
            .hang_timeout(key.slot)
            .map(|timeout| Liveness::new(timeout, self.setup.config.ping_interval, Instant::now()));
        let Some(slot) = self.slots.get_mut(key.slot) else { return };
        if slot.state != ProcessState::Starting || slot.proc.as_ref().is_none_or(|p| p.key != key || p.timed_out) {
            return; // a second report, one during shutdown, or one after the deadline
        }
        match (key.slot, ready) {
            (SlotId::Agent, Ready::Agent { socket }) => {
                slot.state = ProcessState::Ready;
                slot.crash_loop.ready();
                let restarted = std::mem::replace(&mut slot.ever_ready, true);
                let Some(proc) = slot.proc.as_mut() else { return };
                proc.liveness = watch;
                proc.socket = Some(socket.clone());
                let (pid, epoch) = (proc.pid, proc.epoch);
                if announced {
                    proc.control(ToChild::ClusterReady);
                }
                let info = AgentInfo { pid, epoch, socket: socket.clone(), up: true };
                self.progress.agent_info = Some(info.clone());
                self.emit(ClusterEvent::AgentReady { pid, epoch, socket });
                if restarted {
                    self.emit(ClusterEvent::AgentRestarted { pid, epoch });
                }
                self.tell_workers(&info);
                if !self.progress.workers_started {
                    self.progress.workers_started = true;
                    let workers: Vec<SlotId> = self.slots.workers().map(|w| w.id).collect();
                    for slot in workers {
                        if let Err(e) = self.start(slot) {
                            self.spawn_failed(slot, &e);
                        }
                    }
                }
                self.check_cluster_ready();
                let actions = self.machines.agent_reload.on_ready(key, epoch);
                self.apply(actions);
                // Not now: the spawn would hold up the messages that move the workers.
                self.after(crate::standby::SPAWN_DELAY, Timer::EnsureStandby);
            }
            (SlotId::Standby, Ready::Standby { mirrors }) => {
                slot.state = ProcessState::Ready;
                slot.crash_loop.ready();
                slot.ever_ready = true;
                let Some(proc) = slot.proc.as_mut() else { return };
                proc.liveness = watch;
                proc.epoch = mirrors;
                let pid = proc.pid;
                if announced {
                    proc.control(ToChild::ClusterReady);
                }
                self.emit(ClusterEvent::StandbyReady { pid, mirrors });
            }
            (SlotId::Worker(id), Ready::Worker) => {
                slot.state = ProcessState::Ready;
                slot.crash_loop.ready();
                let replacing = slot.previous.is_some();
                let restarted = std::mem::replace(&mut slot.ever_ready, true) && !replacing;
                let Some(proc) = slot.proc.as_mut() else { return };
                proc.liveness = watch;
                let pid = proc.pid;
                if announced {
                    proc.control(ToChild::ClusterReady);
                }
                self.emit(ClusterEvent::WorkerReady { id, pid });
                if restarted {
                    self.emit(ClusterEvent::WorkerRestarted { id, pid });
                }
                if let Some(rr) = &self.sockets.round_robin {
                    rr.notify(RrCmd::Ready(key));
                }
                let settings = self.reload_settings();
                if let Some(actions) = self.machines.reload.on_ready(&self.slots, key, settings) {
                    self.apply(actions);
                }
                let actions = self.machines.scale.on_ready(key);
                self.apply(actions);
                self.check_cluster_ready();
            }
            (slot, _) => tracing::warn!(%slot, "a readiness report of the wrong role; ignored"),
        }
    }

    /// Announces cluster-ready once: the agent is ready and every worker is
    /// ready or marked failed.
    pub(super) fn check_cluster_ready(&mut self) {
        if self.progress.announced
            || self.machines.stop.is_stopping()
            || !self.progress.workers_started
            || self.slots.agent().is_none_or(|a| a.state != ProcessState::Ready)
            || !self.slots.workers().all(Slot::settled)
        {
            return;
        }
        self.progress.announced = true;
        let agent = self.slots.agent().and_then(|a| a.proc.as_ref()).map_or(0, |p| p.pid);
        let mut workers = Vec::new();
        let mut failed = Vec::new();
        for w in self.slots.workers() {
            match (&w.proc, w.state) {
                (Some(p), ProcessState::Ready) => workers.push(p.pid),
                _ => failed.extend(w.id.worker_id()),
            }
        }
        for p in self.slots.iter().filter_map(|s| s.proc.as_ref()) {
            p.control(ToChild::ClusterReady);
        }
        self.emit(ClusterEvent::ClusterReady { master: self.setup.pid, agent, workers, failed });
    }

    pub(super) fn on_exit(&mut self, key: ProcKey, status: Option<ExitStatus>) {
        let exit = status.as_ref().map_or(ExitReason::Unknown, ExitReason::from_status);
        self.progress.last_exits.insert(key.slot, exit);
        // A predecessor moved aside by a replacement (drained, or died while its successor started).
        if let Some(old) = self.slots.get_mut(key.slot).and_then(|s| s.previous.take_if(|p| p.key == key)) {
            let (process, uptime) = (old.process_ref(), old.spawned_at.elapsed());
            self.process_gone(&old);
            self.emit(ClusterEvent::Exited { process, exit, uptime });
            let actions = self.machines.reload.on_old_exited(key);
            self.apply(actions);
            if self.machines.stop.is_stopping() {
                self.advance_stop();
            }
            return;
        }
        // A replacement that was not ready yet: its reload rolls the slot back.
        if self.machines.reload.is_starting(key) {
            let Some(new) = self.slots.get_mut(key.slot).and_then(|s| s.take_proc(key)) else { return };
            let (process, uptime) = (new.process_ref(), new.spawned_at.elapsed());
            self.process_gone(&new);
            self.emit(ClusterEvent::Exited { process, exit, uptime });
            let (settings, stopping) = (self.reload_settings(), self.machines.stop.is_stopping());
            let ended = Ended { exit, timed_out: new.timed_out, joined: new.joined };
            let actions = self.machines.reload.on_new_exited(&self.slots, key, ended, settings, stopping);
            self.apply(actions);
            if stopping {
                self.advance_stop();
            }
            return;
        }
        if key.slot == SlotId::Agent {
            self.machines.memory.agent_exited();
        }
        let Some(slot) = self.slots.get_mut(key.slot) else { return };
        let was_starting = slot.state == ProcessState::Starting;
        let Some(proc) = slot.take_proc(key) else { return };
        let uptime = proc.spawned_at.elapsed();
        let process = proc.process_ref();
        self.process_gone(&proc);
        self.emit(ClusterEvent::Exited { process: process.clone(), exit, uptime });
        if self.machines.stop.is_stopping() {
            if let Some(slot) = self.slots.get_mut(key.slot) {
                slot.state = ProcessState::Stopped;
            }
            self.advance_stop();
            return;
        }
        // A worker a scale removed (drained), or one it added that failed to start.
        let start_timeout = self.setup.config.worker_start_timeout;
        // Code 111 reads as another IPC version only from a child that never spoke on its channel.
        let ended = Ended { exit, timed_out: proc.timed_out, joined: proc.joined };
        let failure = ended.start_failure(start_timeout);
        if let Some(actions) = self.machines.scale.on_exited(key, ended, start_timeout) {
            if was_starting && !proc.timed_out {
                self.emit(ClusterEvent::StartFailed { process, reason: failure });
            }
            return self.apply(actions);
        }
        if was_starting && !proc.timed_out {
            self.emit(ClusterEvent::StartFailed { process, reason: failure });
        }
        if key.slot == SlotId::Agent
            && let Some(info) = self.progress.agent_info.as_mut()
        {
            info.up = false;
            let info = info.clone();
            self.tell_workers(&info);
        }
        if key.slot == SlotId::Agent {
            let timeout = self.setup.config.agent_start_timeout;
            if let Some(actions) = self.machines.agent_reload.on_exited(key, ended, timeout) {
                // The old agent of a reload: its successor starts now, not after a backoff.
                return self.apply(actions);
            }
            // A crash, a hang killed, a memory stop: the hot standby takes over, if ready.
            if let Some(actions) = self.machines.standby.on_agent_exited(&self.slots, self.standby_gate()) {
                return self.apply(actions);
            }
        }
        if key.slot == SlotId::Standby {
            let actions = self.machines.standby.on_exited(key, &self.slots, self.standby_gate());
            return self.apply(actions);
        }
        self.schedule_restart(key.slot);
    }

    /// Tells every worker where the agent is (or that it is down).
    pub(super) fn tell_workers(&self, info: &AgentInfo) {
        for p in self.slots.workers().filter_map(|w| w.proc.as_ref()) {
            p.control(ToChild::AgentChanged(info.clone()));
        }
    }

    /// A ping tick: pings every ready process watched for hangs, and SIGKILLs
    /// one silent for its hang timeout (its exit is then handled as a crash:
    /// restart with backoff, a new epoch for the agent). Nothing is judged
    /// during shutdown, nor a process being replaced or stopped (those have
    /// their own deadlines).
    pub(super) fn check_liveness(&mut self, now: Instant) {
        if self.machines.stop.is_stopping() {
            return;
        }
        let mut hung = Vec::new();
        // An agent asked to stop for its memory limit has its own deadline.
        let agent_stopping = self.machines.memory.agent_stopping();
        for slot in self.slots.iter_mut() {
            if agent_stopping && slot.id.role() == ProcessRole::Agent {
                continue;
            }
            if slot.state != ProcessState::Ready {
                continue;
            }
            let Some(proc) = slot.proc.as_mut() else { continue };
            let Some(live) = proc.liveness.as_mut() else { continue };
            match live.tick(now) {
                Verdict::Ping(seq) => proc.control(ToChild::Ping { seq }),
                Verdict::Hung { silent_for } => {
                    // Logged once, as the event (at ERROR); its exit is then
                    // handled as a crash: a restart with backoff.
                    proc.liveness = None;
                    proc.kill();
                    hung.push(ClusterEvent::Hung { process: proc.process_ref(), silent_for });
                }
            }
        }
        for event in hung {
            self.emit(event);
        }
    }
}
