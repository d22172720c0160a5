//! Rolling replacement of workers: `reload` (SIGHUP or [`ClusterControl::reload`])
//! and the memory limit ([`Config::worker_max_memory`](crate::Config::worker_max_memory)).
//!
//! One slot at a time (or [`Config::reload_parallelism`](crate::Config::reload_parallelism)):
//!
//! ```text
//! slot i: old serving ──────────────────────────────┐ Stop{grace} ... drained, exits
//!         new spawned (executable as on disk now) ── ready ─────────────────────────── serving
//!                                                     │ only then is the old one stopped
//! new exits / crashes / not ready in time:
//!         new killed, old stays in the slot (serving), remaining slots untouched,
//!         "reload failed: <reason>"
//! ```
//!
//! The old process waits in [`Slot::previous`](crate::supervisor::Slot) while
//! its successor starts, and drains there after. Both hold the slot's
//! listening sockets (the master's, shared), so the port never stops accepting.
//! The agent is not touched (its own reload is [`agent_reload`](crate::agent_reload)).
//! One replacement run at a time, agent reloads included: a reload asked for
//! while one runs is refused with [`ReloadError::InProgress`].

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::backoff::Restart;
use crate::cluster_control::{ControlCall, ReloadError, ReloadReport, ReplaceReason, ReplacedWorker};
use crate::ipc::ToChild;
use crate::master::{Master, Timer};
use crate::spawn::IPC_MISMATCH_EXIT;
use crate::status::{ProcessState, rss_bytes};
use crate::types::{ProcKey, SlotId};
use crate::{ClusterEvent, ExitReason, WorkerId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The new process is starting; the old one serves.
    Starting { new: ProcKey },
    /// The new one is ready; the old one drains.
    Draining { old: ProcKey },
}

#[derive(Debug)]
struct Active {
    id: WorkerId,
    old_pid: u32,
    new_pid: u32,
    phase: Phase,
}

/// A replacement run in progress.
#[derive(Debug)]
pub(crate) struct Run {
    reason: ReplaceReason,
    pending: VecDeque<WorkerId>,
    active: Vec<Active>,
    replaced: Vec<ReplacedWorker>,
    skipped: Vec<WorkerId>,
    failed: Option<String>,
    reply: Option<oneshot::Sender<Result<ReloadReport, ReloadError>>>,
    started: Instant,
}

/// When a worker over its memory limit may be replaced (crash-loop backoff).
#[derive(Debug, Default)]
pub(crate) struct MemoryHolds {
    due: std::collections::HashMap<WorkerId, Instant>,
}

impl Master {
    pub(crate) fn on_control(&mut self, call: ControlCall) {
        match call {
            ControlCall::Reload { reply } => self.request_reload(reply),
            ControlCall::ReloadAgent { reply } => self.request_agent_reload(reply),
        }
    }

    /// Starts a reload (SIGHUP: no reply; the outcome is an event and a log line).
    pub(crate) fn request_reload(&mut self, reply: Option<oneshot::Sender<Result<ReloadReport, ReloadError>>>) {
        let refuse = |reply: Option<oneshot::Sender<_>>, e: ReloadError| {
            tracing::warn!(error = %e, "reload refused");
            if let Some(reply) = reply {
                let _ = reply.send(Err(e));
            }
        };
        if self.stopping.is_some() {
            return refuse(reply, ReloadError::ShuttingDown);
        }
        if let Some(running) = self.replacement_running() {
            let e = ReloadError::InProgress { running };
            self.emit(ClusterEvent::ReloadFailed { reason: e.to_string() });
            return refuse(reply, e);
        }
        if !self.announced {
            return refuse(reply, ReloadError::NotReady);
        }
        let mut pending = VecDeque::new();
        let mut skipped = Vec::new();
        for w in &self.workers {
            let Some(id) = w.id.worker_id() else { continue };
            if w.state == ProcessState::Ready && w.proc.is_some() && w.previous.is_none() {
                pending.push_back(id);
            } else {
                skipped.push(id);
            }
        }
        tracing::info!(workers = pending.len(), skipped = ?skipped, "reload: replacing workers one slot at a time");
        self.emit(ClusterEvent::ReloadStarted { workers: pending.iter().copied().collect() });
        self.replacing = Some(Run {
            reason: ReplaceReason::Reload,
            pending,
            active: Vec::new(),
            replaced: Vec::new(),
            skipped,
            failed: None,
            reply,
            started: Instant::now(),
        });
        self.advance_run();
    }

    /// What replacement runs now, if any: a run over the workers (reload or
    /// memory limit), or a reload of the agent. One at a time.
    pub(crate) fn replacement_running(&self) -> Option<ReplaceReason> {
        match (&self.replacing, &self.agent_reload) {
            (Some(run), _) => Some(run.reason),
            (None, Some(_)) => Some(ReplaceReason::AgentReload),
            (None, None) => None,
        }
    }

    /// Starts replacements up to the parallelism; finishes the run when all are done.
    fn advance_run(&mut self) {
        loop {
            let Some(run) = self.replacing.as_mut() else { return };
            let parallel = match run.reason {
                ReplaceReason::Reload => self.config.reload_parallelism.max(1),
                _ => 1,
            };
            if run.failed.is_some() {
                run.pending.clear();
            }
            if run.active.len() >= parallel || run.pending.is_empty() {
                break;
            }
            let Some(id) = run.pending.pop_front() else { break };
            self.replace_slot(id);
        }
        let done = self.replacing.as_ref().is_some_and(|run| run.active.is_empty() && run.pending.is_empty());
        if done && let Some(run) = self.replacing.take() {
            self.finish_run(run);
        }
    }

    fn finish_run(&mut self, run: Run) {
        let workers: Vec<Option<u32>> = self.workers.iter().map(|w| w.proc.as_ref().map(|p| p.pid)).collect();
        let result = match run.failed {
            Some(reason) => {
                if run.reason == ReplaceReason::Reload {
                    let kept = self.workers.iter().filter(|w| w.proc.is_some()).count();
                    self.emit(ClusterEvent::ReloadFailed {
                        reason: format!(
                            "{reason}; rolled back ({} slot(s) replaced before, {kept} worker(s) serving)",
                            run.replaced.len()
                        ),
                    });
                } else {
                    tracing::error!(%reason, "memory replacement failed; the old worker keeps serving");
                }
                Err(ReloadError::Failed { reason, replaced: run.replaced })
            }
            None => {
                if run.reason == ReplaceReason::Reload {
                    self.emit(ClusterEvent::ReloadDone { workers: workers.iter().flatten().copied().collect() });
                }
                Ok(ReloadReport { replaced: run.replaced, skipped: run.skipped, workers, took: run.started.elapsed() })
            }
        };
        if let Some(reply) = run.reply {
            let _ = reply.send(result);
        }
    }

    /// Moves slot `id`'s process aside and starts its successor.
    fn replace_slot(&mut self, id: WorkerId) {
        let slot_id = SlotId::Worker(id);
        let Some(slot) = self.slot_mut(slot_id) else { return };
        if slot.state != ProcessState::Ready || slot.previous.is_some() {
            if let Some(run) = self.replacing.as_mut() {
                run.skipped.push(id);
            }
            return;
        }
        let Some(old) = slot.proc.take() else { return };
        let old_pid = old.pid;
        slot.previous = Some(old);
        match self.launch(slot_id) {
            Ok(()) => {
                let Some(slot) = self.slot_mut(slot_id) else { return };
                // The status table's `restarts` counts every new process of the slot.
                slot.restarts += 1;
                let Some(new) = slot.proc.as_ref() else { return };
                let (new_key, new_pid) = (new.key, new.pid);
                tracing::info!(worker.id = id, old = old_pid, new = new_pid, "replacement started");
                if let Some(run) = self.replacing.as_mut() {
                    run.active.push(Active { id, old_pid, new_pid, phase: Phase::Starting { new: new_key } });
                }
            }
            Err(e) => {
                tracing::error!(worker.id = id, error = %e, "could not spawn the replacement; the old worker stays");
                self.restore_previous(slot_id);
                if let Some(run) = self.replacing.as_mut() {
                    run.failed.get_or_insert_with(|| format!("worker {id}: could not spawn: {e}"));
                }
            }
        }
    }

    /// Puts the old process back in its slot as the serving one.
    fn restore_previous(&mut self, slot_id: SlotId) {
        let Some(slot) = self.slot_mut(slot_id) else { return };
        if let Some(old) = slot.previous.take() {
            slot.proc = Some(old);
            slot.state = ProcessState::Ready;
        }
    }

    /// Called when a worker reports ready: if it is a replacement, stop its predecessor.
    /// Returns whether it was one.
    pub(crate) fn replacement_ready(&mut self, key: ProcKey) -> bool {
        let Some(run) = self.replacing.as_mut() else { return false };
        let Some(active) = run.active.iter_mut().find(|a| a.phase == Phase::Starting { new: key }) else {
            return false;
        };
        let reason = run.reason;
        let (id, old_pid, new_pid) = (active.id, active.old_pid, active.new_pid);
        let grace = self.config.worker_stop_timeout;
        let Some(slot) = self.slot_mut(key.slot) else { return true };
        let old_key = match slot.previous.as_mut() {
            Some(old) => {
                old.control(ToChild::Stop { grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX) });
                Some(old.key)
            }
            None => None, // it died while its successor started
        };
        if let (Some(rr), Some(old)) = (&self.round_robin, old_key) {
            rr.notify(crate::round_robin::Cmd::Retire(old));
        }
        self.emit(ClusterEvent::WorkerReplaced { id, old: old_pid, new: new_pid, reason });
        if let Some(run) = self.replacing.as_mut() {
            run.replaced.push(ReplacedWorker { id, old_pid, new_pid });
            match old_key {
                Some(old) => {
                    if let Some(a) = run.active.iter_mut().find(|a| a.id == id) {
                        a.phase = Phase::Draining { old };
                    }
                    self.after(grace, Timer::DrainDeadline(old));
                }
                None => run.active.retain(|a| a.id != id),
            }
        }
        self.advance_run();
        true
    }

    /// The drain deadline of a replaced process, or of a replacement that was
    /// not ready in time: kill it if it is still there.
    pub(crate) fn drain_deadline(&mut self, key: ProcKey) {
        let Some(slot) = self.slot_mut(key.slot) else { return };
        if let Some(p) = slot.proc_mut(key) {
            tracing::warn!(pid = p.pid, "stopped worker did not exit within its grace period; SIGKILL");
            p.kill();
        }
    }

    /// A replacement missed its ready deadline: it may already serve (it took
    /// its listeners), so it is stopped gracefully, not killed; its exit rolls
    /// the slot back. Returns whether `key` was such a replacement.
    pub(crate) fn replacement_timed_out(&mut self, key: ProcKey, timeout: Duration) -> bool {
        let is_replacement = self
            .replacing
            .as_ref()
            .is_some_and(|run| run.active.iter().any(|a| a.phase == Phase::Starting { new: key }));
        if !is_replacement {
            return false;
        }
        let grace = self.config.worker_stop_timeout;
        let Some(proc) = self.slot_mut(key.slot).and_then(|s| s.proc_mut(key)) else { return true };
        proc.timed_out = true;
        proc.control(ToChild::Stop { grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX) });
        let process = proc.process_ref();
        tracing::error!(%process, ?timeout, "replacement not ready in time; stopping it, the old worker stays");
        if let Some(rr) = &self.round_robin {
            rr.notify(crate::round_robin::Cmd::Retire(key));
        }
        self.emit(ClusterEvent::StartFailed { process, reason: crate::StartFailure::TimedOut(timeout) });
        self.after(grace, Timer::DrainDeadline(key));
        true
    }

    /// Handles the exit of a process in a replacement (the old one, or a new
    /// one that was not ready yet). Returns whether it was one.
    pub(crate) fn replacement_exited(&mut self, key: ProcKey, exit: ExitReason) -> bool {
        let Some(slot) = self.slot_mut(key.slot) else { return false };
        // The old process exited (drained, or died while its successor started).
        if let Some(old) = slot.previous.take_if(|p| p.key == key) {
            let process = old.process_ref();
            let uptime = old.spawned_at.elapsed();
            self.process_gone(&old);
            self.emit(ClusterEvent::Exited { process, exit, uptime });
            if let Some(run) = self.replacing.as_mut() {
                run.active.retain(|a| a.phase != Phase::Draining { old: key });
            }
            if self.stopping.is_some() {
                self.advance_stop();
            } else {
                self.advance_run();
            }
            return true;
        }
        // A new process that was not ready yet: roll this slot back.
        let Some(run) = self.replacing.as_mut() else { return false };
        let Some(pos) = run.active.iter().position(|a| a.phase == Phase::Starting { new: key }) else {
            return false;
        };
        let active = run.active.remove(pos);
        let Some(slot) = self.slot_mut(key.slot) else { return true };
        let Some(new) = slot.take_proc(key) else { return true };
        let timed_out = new.timed_out;
        let process = new.process_ref();
        let uptime = new.spawned_at.elapsed();
        self.process_gone(&new);
        self.emit(ClusterEvent::Exited { process, exit, uptime });
        let why = if timed_out {
            format!("was not ready within {:?}", self.config.worker_start_timeout)
        } else if exit == ExitReason::Code(IPC_MISMATCH_EXIT) {
            "the executable on disk speaks another IPC version (refused to join)".to_owned()
        } else {
            format!("{exit} before it was ready")
        };
        let reason = format!("worker {}: new process {} {why}", active.id, active.new_pid);
        tracing::error!(%reason, "replacement failed; rolling back");
        let had_old = self.slot(key.slot).is_some_and(|s| s.previous.is_some());
        self.restore_previous(key.slot);
        if !had_old && self.stopping.is_none() {
            // The old one died meanwhile: the slot is empty, the supervisor restarts it.
            self.schedule_restart(key.slot);
        }
        if let Some(run) = self.replacing.as_mut() {
            if run.failed.is_none() {
                run.failed = Some(reason);
            }
            // Stop the other new workers that are not ready yet (their exits roll them back).
            let starting: Vec<ProcKey> = run
                .active
                .iter()
                .filter_map(|a| match a.phase {
                    Phase::Starting { new } => Some(new),
                    Phase::Draining { .. } => None,
                })
                .collect();
            for k in starting {
                if let Some(p) = self.slot_mut(k.slot).and_then(|s| s.proc_mut(k)) {
                    p.kill();
                }
            }
        }
        if self.stopping.is_some() {
            self.advance_stop();
        } else {
            self.advance_run();
        }
        true
    }

    /// Shutdown began: a run in progress ends (reported as failed).
    pub(crate) fn abort_run(&mut self) {
        if let Some(run) = self.replacing.as_mut() {
            run.failed.get_or_insert_with(|| "the cluster is shutting down".to_owned());
            run.pending.clear();
        }
        if let Some(mut run) = self.replacing.take() {
            run.active.clear();
            if let Some(reply) = run.reply.take() {
                let _ = reply.send(Err(ReloadError::ShuttingDown));
            }
        }
    }

    /// Samples every child's RSS; a worker over its limit is replaced
    /// gracefully (after a backoff delay if it exceeded it soon after start).
    pub(crate) fn check_memory(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        if let (Some(limit), Some(agent)) = (self.config.agent_max_memory, self.agent.proc.as_ref())
            && self.agent.state == ProcessState::Ready
            && !self.agent_memory_stop
            && self.agent_reload.is_none()
            && let Some(rss) = rss_bytes(agent.pid)
            && rss > limit
        {
            tracing::warn!(
                pid = agent.pid,
                rss,
                limit,
                "agent over its memory limit; stopping it (it will be restarted)"
            );
            let grace = self.config.agent_stop_timeout;
            agent.control(ToChild::Stop { grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX) });
            self.agent_memory_stop = true;
            self.emit(ClusterEvent::MemoryLimit {
                role: crate::Role::Agent,
                worker_id: None,
                pid: agent.pid,
                rss,
                limit,
            });
            self.after(grace, Timer::AgentStopDeadline(agent.key));
        }
        let Some(limit) = self.config.worker_max_memory else { return };
        if self.replacement_running().is_some() || !self.announced {
            return;
        }
        let now = Instant::now();
        for i in 0..self.workers.len() {
            let w = &self.workers[i];
            let Some(id) = w.id.worker_id() else { continue };
            let Some(proc) = w.proc.as_ref().filter(|_| w.state == ProcessState::Ready && w.previous.is_none()) else {
                continue;
            };
            let pid = proc.pid;
            let Some(rss) = rss_bytes(pid) else { continue };
            if rss <= limit {
                self.memory_holds.due.remove(&id);
                continue;
            }
            if let Some(due) = self.memory_holds.due.get(&id) {
                if now < *due {
                    continue;
                }
                self.memory_holds.due.remove(&id);
            } else {
                let decision = self.workers[i].backoff.exited();
                let (delay, failures) = match decision {
                    Restart::After { failures, .. } if failures <= 1 => (Duration::ZERO, failures),
                    Restart::After { delay, failures } => (delay, failures),
                    Restart::Failed { retry_after, failures } => (retry_after, failures),
                };
                self.emit(ClusterEvent::MemoryLimit {
                    role: crate::Role::Worker,
                    worker_id: Some(id),
                    pid,
                    rss,
                    limit,
                });
                if !delay.is_zero() {
                    tracing::warn!(
                        worker.id = id,
                        pid,
                        rss,
                        limit,
                        ?delay,
                        "over the memory limit again soon after start; replacing after a backoff delay"
                    );
                    self.emit(ClusterEvent::RestartScheduled {
                        role: crate::Role::Worker,
                        worker_id: Some(id),
                        after: delay,
                        failures,
                    });
                    self.memory_holds.due.insert(id, now + delay);
                    continue;
                }
            }
            tracing::warn!(worker.id = id, pid, rss, limit, "over the memory limit; replacing it gracefully");
            self.replacing = Some(Run {
                reason: ReplaceReason::MaxMemory,
                pending: VecDeque::from([id]),
                active: Vec::new(),
                replaced: Vec::new(),
                skipped: Vec::new(),
                failed: None,
                reply: None,
                started: now,
            });
            self.advance_run();
            return;
        }
    }
}
