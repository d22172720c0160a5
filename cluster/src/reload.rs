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
//!
//! A state machine without I/O: it reads the slots, takes the master's inputs
//! (a request, a spawn's outcome, a ready report, an exit, a start deadline)
//! and returns [`Action`]s for the master to carry out.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::identity::{ProcKey, SlotId};
use crate::lifecycle::{Action, Machine, ReloadReply, Reply, Timer};
use crate::reload_handle::{ReloadError, ReloadReport, ReplaceReason, ReplacedWorker, worker_failure};
use crate::status::ProcessState;
use crate::supervisor::Slots;
use crate::{ClusterEvent, StartFailure, WorkerId, process::Ended};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The old process was moved aside; its successor is being spawned.
    Launching,
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
struct Run {
    reason: ReplaceReason,
    pending: VecDeque<WorkerId>,
    active: Vec<Active>,
    replaced: Vec<ReplacedWorker>,
    skipped: Vec<WorkerId>,
    /// The first replacement that failed: the run stops there.
    failed: Option<Failure>,
    reply: Option<ReloadReply>,
    started: Instant,
}

/// A replacement that failed: the slot, its new process (`None`: not
/// spawned) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    worker: WorkerId,
    new_pid: Option<u32>,
    cause: StartFailure,
}

/// What the reload needs to know of the rest of the master when asked for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gate {
    pub stopping: bool,
    pub announced: bool,
    /// Another replacement running (the agent's reload).
    pub running: Option<ReplaceReason>,
}

/// The settings a reload follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    /// Slots replaced at once by a reload (a memory replacement does one).
    pub parallelism: usize,
    /// How long a new worker has to report ready.
    pub start_timeout: Duration,
    /// How long an old worker has to drain.
    pub stop_timeout: Duration,
}

/// The workers' replacement: idle, or one run (a reload, or a memory replacement).
#[derive(Debug, Default)]
pub(crate) struct Reload {
    run: Option<Run>,
}

impl Reload {
    /// What runs now, if anything.
    pub(crate) fn running(&self) -> Option<ReplaceReason> {
        self.run.as_ref().map(|r| r.reason)
    }

    /// A reload asked for (SIGHUP: no reply; the outcome is an event and a log line).
    pub(crate) fn request(&mut self, slots: &Slots, gate: Gate, reply: Option<ReloadReply>) -> Vec<Action> {
        let mut actions = Vec::new();
        let refused = if gate.stopping {
            Some(ReloadError::ShuttingDown)
        } else if let Some(running) = self.running().or(gate.running) {
            let e = ReloadError::InProgress { running };
            actions.push(Action::Emit(ClusterEvent::ReloadFailed { reason: e.to_string() }));
            Some(e)
        } else if !gate.announced {
            Some(ReloadError::NotReady)
        } else {
            None
        };
        if let Some(e) = refused {
            tracing::warn!(error = %e, "reload refused");
            if let Some(reply) = reply {
                actions.push(Action::Reply(Reply::Reload(reply, Err(e))));
            }
            return actions;
        }
        let mut pending = VecDeque::new();
        let mut skipped = Vec::new();
        for w in slots.workers() {
            let Some(id) = w.id.worker_id() else { continue };
            if w.state == ProcessState::Ready && w.proc.is_some() && w.previous.is_none() {
                pending.push_back(id);
            } else {
                skipped.push(id);
            }
        }
        tracing::debug!(workers = pending.len(), skipped = ?skipped, "reload: replacing workers one slot at a time");
        actions.push(Action::Emit(ClusterEvent::ReloadStarted { workers: pending.iter().copied().collect() }));
        self.run = Some(Run::new(ReplaceReason::Reload, pending, skipped, reply));
        actions.push(Action::Advance(Machine::Reload));
        actions
    }

    /// A restart of worker `id` asked for (`tandem restart NAME --worker K`):
    /// a run of one slot, as a memory replacement, answered as a reload.
    pub(crate) fn restart(&mut self, slots: &Slots, gate: Gate, id: WorkerId, reply: ReloadReply) -> Vec<Action> {
        let slot = slots.get(SlotId::Worker(id));
        let refused = if gate.stopping {
            Some(ReloadError::ShuttingDown)
        } else if let Some(running) = self.running().or(gate.running) {
            Some(ReloadError::InProgress { running })
        } else if !gate.announced {
            Some(ReloadError::NotReady)
        } else if slot.is_none() {
            Some(ReloadError::UnknownWorker { worker: id, workers: slots.worker_count() })
        } else if slot.is_some_and(|s| s.state != ProcessState::Ready || s.proc.is_none() || s.previous.is_some()) {
            Some(ReloadError::WorkerNotReady { worker: id })
        } else {
            None
        };
        if let Some(e) = refused {
            tracing::warn!(error = %e, "restart refused");
            return vec![Action::Reply(Reply::Reload(reply, Err(e)))];
        }
        tracing::info!(worker.id = id, "restarting the worker gracefully: its successor first, then it drains");
        self.run = Some(Run::new(ReplaceReason::Restart, VecDeque::from([id]), Vec::new(), Some(reply)));
        vec![Action::Advance(Machine::Reload)]
    }

    /// Worker `id` is over its memory limit: replace it (a run of one slot).
    /// The caller checked that nothing else is replaced.
    pub(crate) fn replace_over_memory(&mut self, id: WorkerId) -> Vec<Action> {
        tracing::info!(worker.id = id, "replacing it gracefully for its memory limit");
        self.run = Some(Run::new(ReplaceReason::MaxMemory, VecDeque::from([id]), Vec::new(), None));
        vec![Action::Advance(Machine::Reload)]
    }

    /// Starts the next replacement, up to the parallelism; finishes the run when all are done.
    pub(crate) fn on_advance(&mut self, slots: &Slots, settings: Settings) -> Vec<Action> {
        let mut actions = Vec::new();
        loop {
            let Some(run) = self.run.as_mut() else { return actions };
            let parallel = match run.reason {
                ReplaceReason::Reload => settings.parallelism.max(1),
                _ => 1,
            };
            if run.failed.is_some() {
                run.pending.clear();
            }
            if run.active.iter().any(|a| a.phase == Phase::Launching)
                || run.active.len() >= parallel
                || run.pending.is_empty()
            {
                break;
            }
            let Some(id) = run.pending.pop_front() else { break };
            let slot = slots.get(SlotId::Worker(id));
            match slot.filter(|s| s.state == ProcessState::Ready && s.previous.is_none()).and_then(|s| s.proc.as_ref())
            {
                Some(old) => {
                    run.active.push(Active { id, old_pid: old.pid, new_pid: 0, phase: Phase::Launching });
                    // One at a time: the outcome comes back to `on_launched`, which advances again.
                    actions.push(Action::Replace(id));
                    return actions;
                }
                None => run.skipped.push(id),
            }
        }
        let done = self.run.as_ref().is_some_and(|run| run.active.is_empty() && run.pending.is_empty());
        if done && let Some(run) = self.run.take() {
            finish(run, slots, &mut actions);
        }
        actions
    }

    /// The outcome of an [`Action::Replace`]: the successor's key and pid, or
    /// why it could not be spawned (the old process is then put back).
    pub(crate) fn on_launched(&mut self, id: WorkerId, outcome: Result<(ProcKey, u32), String>) -> Vec<Action> {
        let Some(run) = self.run.as_mut() else { return Vec::new() };
        let Some(pos) = run.active.iter().position(|a| a.id == id && a.phase == Phase::Launching) else {
            return Vec::new();
        };
        match outcome {
            Ok((new, new_pid)) => {
                let active = &mut run.active[pos];
                tracing::debug!(worker.id = id, old = active.old_pid, new = new_pid, "replacement started");
                active.new_pid = new_pid;
                active.phase = Phase::Starting { new };
                vec![Action::Advance(Machine::Reload)]
            }
            Err(e) => {
                tracing::error!(worker.id = id, error = %e, "could not spawn the replacement; the old worker stays");
                run.active.remove(pos);
                run.failed.get_or_insert(Failure { worker: id, new_pid: None, cause: StartFailure::Spawn(e) });
                vec![Action::Restore(SlotId::Worker(id)), Action::Advance(Machine::Reload)]
            }
        }
    }

    /// A worker reported ready: if it is a replacement, its predecessor is
    /// stopped and drains. `None`: it is not one.
    pub(crate) fn on_ready(&mut self, slots: &Slots, key: ProcKey, settings: Settings) -> Option<Vec<Action>> {
        let run = self.run.as_mut()?;
        let active = run.active.iter_mut().find(|a| a.phase == Phase::Starting { new: key })?;
        let (id, old_pid, new_pid) = (active.id, active.old_pid, active.new_pid);
        let grace = settings.stop_timeout;
        let mut actions = Vec::new();
        // None: it died while its successor started.
        let old = slots.get(key.slot).and_then(|s| s.previous.as_ref()).map(|p| p.key);
        if let Some(old) = old {
            actions.push(Action::Stop { to: old, grace });
            actions.push(Action::Retire(old));
        }
        actions.push(Action::Emit(ClusterEvent::WorkerReplaced { id, old: old_pid, new: new_pid, reason: run.reason }));
        run.replaced.push(ReplacedWorker { id, old_pid, new_pid });
        match old {
            Some(old) => {
                active.phase = Phase::Draining { old };
                actions.push(Action::After(grace, Timer::DrainDeadline(old)));
            }
            None => run.active.retain(|a| a.id != id),
        }
        actions.push(Action::Advance(Machine::Reload));
        Some(actions)
    }

    /// A replacement missed its ready deadline: it may already serve (it took
    /// its listeners), so it is stopped gracefully, not killed; its exit rolls
    /// the slot back. `None`: `key` is no replacement.
    pub(crate) fn on_start_timeout(&mut self, slots: &Slots, key: ProcKey, settings: Settings) -> Option<Vec<Action>> {
        let run = self.run.as_ref()?;
        if !run.active.iter().any(|a| a.phase == Phase::Starting { new: key }) {
            return None;
        }
        let Some(proc) = slots.proc(key) else { return Some(Vec::new()) };
        let process = proc.process_ref();
        let timeout = settings.start_timeout;
        tracing::error!(%process, ?timeout, "replacement not ready in time; stopping it, the old worker stays");
        Some(vec![
            Action::TimedOut(key),
            Action::Stop { to: key, grace: settings.stop_timeout },
            Action::Retire(key),
            Action::Emit(ClusterEvent::StartFailed { process, reason: StartFailure::TimedOut(timeout) }),
            Action::After(settings.stop_timeout, Timer::DrainDeadline(key)),
        ])
    }

    /// Whether `key` is a replacement not ready yet.
    pub(crate) fn is_starting(&self, key: ProcKey) -> bool {
        self.run.as_ref().is_some_and(|run| run.active.iter().any(|a| a.phase == Phase::Starting { new: key }))
    }

    /// A replaced process exited (drained, or died while its successor
    /// started); the master took it out of its slot.
    pub(crate) fn on_old_exited(&mut self, key: ProcKey) -> Vec<Action> {
        if let Some(run) = self.run.as_mut() {
            run.active.retain(|a| a.phase != Phase::Draining { old: key });
        }
        vec![Action::Advance(Machine::Reload)]
    }

    /// A new process exited before it was ready (the master took it out of
    /// its slot; `timed_out`: it missed its deadline): roll the slot back.
    pub(crate) fn on_new_exited(
        &mut self,
        slots: &Slots,
        key: ProcKey,
        ended: Ended,
        settings: Settings,
        stopping: bool,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(run) = self.run.as_mut() else { return actions };
        let Some(pos) = run.active.iter().position(|a| a.phase == Phase::Starting { new: key }) else {
            return actions;
        };
        let active = run.active.remove(pos);
        let cause = ended.start_failure(settings.start_timeout);
        let failure = Failure { worker: active.id, new_pid: Some(active.new_pid), cause };
        // The `reload failed` event (WARN, with this reason) is the log line.
        tracing::debug!(reason = %failure.text(), "replacement failed; rolling back");
        let had_old = slots.get(key.slot).is_some_and(|s| s.previous.is_some());
        actions.push(Action::Restore(key.slot));
        if !had_old && !stopping {
            // The old one died meanwhile: the slot is empty, the supervisor restarts it.
            actions.push(Action::Restart(key.slot));
        }
        run.failed.get_or_insert(failure);
        // Stop the other new workers that are not ready yet (their exits roll them back).
        for a in &run.active {
            if let Phase::Starting { new } = a.phase {
                actions.push(Action::Kill(new));
            }
        }
        if !stopping {
            actions.push(Action::Advance(Machine::Reload));
        }
        actions
    }

    /// Shutdown began: a run in progress ends (reported as failed).
    pub(crate) fn abort(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(run) = self.run.take()
            && let Some(reply) = run.reply
        {
            actions.push(Action::Reply(Reply::Reload(reply, Err(ReloadError::ShuttingDown))));
        }
        actions
    }
}

impl Failure {
    /// `worker 2: new process 4242 exited with code 3 before it was ready`.
    fn text(&self) -> String {
        worker_failure(self.worker, self.new_pid, &self.cause)
    }
}

impl Run {
    fn new(
        reason: ReplaceReason,
        pending: VecDeque<WorkerId>,
        skipped: Vec<WorkerId>,
        reply: Option<ReloadReply>,
    ) -> Self {
        Run {
            reason,
            pending,
            active: Vec::new(),
            replaced: Vec::new(),
            skipped,
            failed: None,
            reply,
            started: Instant::now(),
        }
    }
}

/// The run is over: its event, and its answer.
fn finish(run: Run, slots: &Slots, actions: &mut Vec<Action>) {
    let workers: Vec<Option<u32>> = slots.workers().map(|w| w.proc.as_ref().map(|p| p.pid)).collect();
    let result = match run.failed {
        Some(failure) => {
            if run.reason == ReplaceReason::Reload {
                let kept = slots.workers().filter(|w| w.proc.is_some()).count();
                actions.push(Action::Emit(ClusterEvent::ReloadFailed {
                    reason: format!(
                        "{}; rolled back ({} slot(s) replaced before, {kept} worker(s) serving)",
                        failure.text(),
                        run.replaced.len()
                    ),
                }));
            } else {
                tracing::error!(reason = %failure.text(), replacement = %run.reason, "replacement failed; the old worker keeps serving");
            }
            let Failure { worker, new_pid, cause } = failure;
            Err(ReloadError::Failed { worker, new_pid, cause, replaced: run.replaced })
        }
        None => {
            if run.reason == ReplaceReason::Reload {
                actions.push(Action::Emit(ClusterEvent::ReloadDone {
                    workers: workers.iter().flatten().copied().collect(),
                }));
            }
            Ok(ReloadReport { replaced: run.replaced, skipped: run.skipped, workers, took: run.started.elapsed() })
        }
    };
    if let Some(reply) = run.reply {
        actions.push(Action::Reply(Reply::Reload(reply, result)));
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;
    use crate::supervisor::testing::{Fixture, kinds};
    use crate::{ExitReason, spawn::IPC_MISMATCH_EXIT};

    const SETTINGS: Settings =
        Settings { parallelism: 1, start_timeout: Duration::from_secs(10), stop_timeout: Duration::from_secs(3) };
    const OPEN: Gate = Gate { stopping: false, announced: true, running: None };

    /// Carries out an `Action::Replace(id)` as the master does: the old
    /// process aside, a new one starting.
    fn replace(f: &mut Fixture, id: WorkerId) -> (ProcKey, u32) {
        let slot = f.slots.get_mut(SlotId::Worker(id)).unwrap();
        slot.previous = slot.proc.take();
        let key = f.spawn(SlotId::Worker(id), 8);
        (key, f.pid(key))
    }

    /// The reason of the `ReloadFailed` event among `actions`.
    fn failed_event(actions: &[Action]) -> String {
        for a in actions {
            if let Action::Emit(ClusterEvent::ReloadFailed { reason }) = a {
                return reason.clone();
            }
        }
        panic!("no ReloadFailed event")
    }

    fn reply_of(actions: Vec<Action>) -> Result<ReloadReport, ReloadError> {
        for a in actions {
            if let Action::Reply(Reply::Reload(_, result)) = a {
                return result;
            }
        }
        panic!("no reply")
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_replaced_one_by_one_and_each_old_worker_stops_only_once_its_successor_is_ready() {
        let mut f = Fixture::ready(2);
        let mut reload = Reload::default();
        let (tx, _rx) = oneshot::channel();
        assert_eq!(kinds(&reload.request(&f.slots, OPEN, Some(tx))), ["emit ReloadStarted", "advance Reload"]);
        let mut replaced = Vec::new();
        for id in 1..=2 {
            assert_eq!(kinds(&reload.on_advance(&f.slots, SETTINGS)), [format!("replace {id}")]);
            let old = f.key(SlotId::Worker(id));
            let (new, pid) = replace(&mut f, id);
            assert_eq!(kinds(&reload.on_launched(id, Ok((new, pid)))), ["advance Reload"]);
            assert!(reload.on_advance(&f.slots, SETTINGS).is_empty(), "one slot at a time");
            assert!(reload.is_starting(new));
            let ready = reload.on_ready(&f.slots, new, SETTINGS).unwrap();
            assert_eq!(
                kinds(&ready),
                [
                    format!("stop {old:?} 3s"),
                    format!("retire {old:?}"),
                    "emit WorkerReplaced".into(),
                    format!("after 3s DrainDeadline({old:?})"),
                    "advance Reload".into(),
                ]
            );
            f.slots.get_mut(SlotId::Worker(id)).unwrap().state = ProcessState::Ready;
            assert!(reload.on_advance(&f.slots, SETTINGS).is_empty(), "the old one drains first");
            f.exit(old);
            assert_eq!(kinds(&reload.on_old_exited(old)), ["advance Reload"]);
            replaced.push(pid);
        }
        let end = reload.on_advance(&f.slots, SETTINGS);
        assert_eq!(kinds(&end), ["emit ReloadDone", "reply reload true"]);
        let report = reply_of(end).unwrap();
        assert_eq!(report.replaced.iter().map(|r| r.new_pid).collect::<Vec<_>>(), replaced);
        assert_eq!(report.workers, replaced.iter().map(|p| Some(*p)).collect::<Vec<_>>());
        assert!(reload.running().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_successor_exiting_before_it_is_ready_rolls_its_slot_back_and_fails_the_reload() {
        let mut f = Fixture::ready(2);
        let mut reload = Reload::default();
        let (tx, _rx) = oneshot::channel();
        let _ = reload.request(&f.slots, OPEN, Some(tx));
        let _ = reload.on_advance(&f.slots, SETTINGS);
        let (new, pid) = replace(&mut f, 1);
        let _ = reload.on_launched(1, Ok((new, pid)));
        f.exit(new);
        let exit = ExitReason::Code(IPC_MISMATCH_EXIT);
        let actions = reload.on_new_exited(&f.slots, new, Ended::by(exit), SETTINGS, false);
        assert_eq!(kinds(&actions), ["restore worker 1", "advance Reload"], "the old one is still there: no restart");
        let slot = f.slots.get_mut(SlotId::Worker(1)).unwrap();
        slot.proc = slot.previous.take();
        let end = reload.on_advance(&f.slots, SETTINGS);
        assert_eq!(kinds(&end), ["emit ReloadFailed", "reply reload false"], "worker 2 is left alone");
        assert_eq!(
            failed_event(&end),
            format!(
                "worker 1: new process {pid} exited with code 111 before it was ready: the executable on disk \
                 speaks another IPC version; rolled back (0 slot(s) replaced before, 2 worker(s) serving)"
            )
        );
        let e = reply_of(end).unwrap_err();
        assert_eq!(
            e,
            ReloadError::Failed {
                worker: 1,
                new_pid: Some(pid),
                cause: StartFailure::IpcMismatch(ExitReason::Code(IPC_MISMATCH_EXIT)),
                replaced: Vec::new(),
            }
        );
        assert_eq!(
            e.to_string(),
            format!(
                "worker 1: new process {pid} exited with code 111 before it was ready: the executable on disk \
                 speaks another IPC version (rolled back; 0 slot(s) had already been replaced)"
            )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_successor_missing_its_deadline_fails_the_reload_with_the_slots_replaced_before_it() {
        let mut f = Fixture::ready(2);
        let mut reload = Reload::default();
        let (tx, _rx) = oneshot::channel();
        let _ = reload.request(&f.slots, OPEN, Some(tx));
        // Worker 1 is replaced...
        let _ = reload.on_advance(&f.slots, SETTINGS);
        let old = f.key(SlotId::Worker(1));
        let old_pid = f.pid(old);
        let (new, first) = replace(&mut f, 1);
        let _ = reload.on_launched(1, Ok((new, first)));
        let _ = reload.on_ready(&f.slots, new, SETTINGS).unwrap();
        f.slots.get_mut(SlotId::Worker(1)).unwrap().state = ProcessState::Ready;
        f.exit(old);
        let _ = reload.on_old_exited(old);
        // ... worker 2's successor misses its deadline, is stopped and exits.
        assert_eq!(kinds(&reload.on_advance(&f.slots, SETTINGS)), ["replace 2"]);
        let (new, second) = replace(&mut f, 2);
        let _ = reload.on_launched(2, Ok((new, second)));
        assert!(reload.on_start_timeout(&f.slots, new, SETTINGS).is_some());
        f.exit(new);
        let _ = reload.on_new_exited(&f.slots, new, Ended::at_deadline(ExitReason::Signal(15)), SETTINGS, false);
        let slot = f.slots.get_mut(SlotId::Worker(2)).unwrap();
        slot.proc = slot.previous.take();
        let end = reload.on_advance(&f.slots, SETTINGS);
        let e = reply_of(end).unwrap_err();
        assert_eq!(
            e,
            ReloadError::Failed {
                worker: 2,
                new_pid: Some(second),
                cause: StartFailure::TimedOut(SETTINGS.start_timeout),
                replaced: vec![ReplacedWorker { id: 1, old_pid, new_pid: first }],
            }
        );
        assert_eq!(
            e.to_string(),
            format!(
                "worker 2: new process {second} was not ready within 10s (rolled back; 1 slot(s) had already been replaced)"
            )
        );
        assert_eq!(e.start_failure(), Some(&StartFailure::TimedOut(Duration::from_secs(10))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_spawn_puts_the_old_worker_back() {
        let f = Fixture::ready(1);
        let mut reload = Reload::default();
        let _ = reload.request(&f.slots, OPEN, None);
        let _ = reload.on_advance(&f.slots, SETTINGS);
        let actions = reload.on_launched(1, Err("no memory".into()));
        assert_eq!(kinds(&actions), ["restore worker 1", "advance Reload"]);
        assert_eq!(kinds(&reload.on_advance(&f.slots, SETTINGS)), ["emit ReloadFailed"], "SIGHUP: no one to answer");

        let (tx, _rx) = oneshot::channel();
        let _ = reload.request(&f.slots, OPEN, Some(tx));
        let _ = reload.on_advance(&f.slots, SETTINGS);
        let _ = reload.on_launched(1, Err("no memory".into()));
        let end = reload.on_advance(&f.slots, SETTINGS);
        assert_eq!(
            failed_event(&end),
            "worker 1: new process could not be spawned: no memory; rolled back (0 slot(s) replaced before, 1 worker(s) serving)"
        );
        let e = reply_of(end).unwrap_err();
        assert_eq!(
            e,
            ReloadError::Failed {
                worker: 1,
                new_pid: None,
                cause: StartFailure::Spawn("no memory".into()),
                replaced: Vec::new()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_replacement_missing_its_deadline_is_stopped_gracefully_not_killed() {
        let mut f = Fixture::ready(1);
        let mut reload = Reload::default();
        let _ = reload.request(&f.slots, OPEN, None);
        let _ = reload.on_advance(&f.slots, SETTINGS);
        let (new, pid) = replace(&mut f, 1);
        let _ = reload.on_launched(1, Ok((new, pid)));
        let old = f.slots.get(SlotId::Worker(1)).unwrap().previous.as_ref().unwrap().key;
        assert!(reload.on_start_timeout(&f.slots, old, SETTINGS).is_none(), "not a replacement");
        assert_eq!(
            kinds(&reload.on_start_timeout(&f.slots, new, SETTINGS).unwrap()),
            [
                format!("timed out {new:?}"),
                format!("stop {new:?} 3s"),
                format!("retire {new:?}"),
                "emit StartFailed".into(),
                format!("after 3s DrainDeadline({new:?})"),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_is_refused_while_stopping_while_another_runs_and_before_cluster_ready() {
        let f = Fixture::ready(1);
        let mut reload = Reload::default();
        let refusal = |reload: &mut Reload, gate| {
            let (tx, _rx) = oneshot::channel();
            reply_of(reload.request(&f.slots, gate, Some(tx))).unwrap_err()
        };
        assert_eq!(refusal(&mut reload, Gate { stopping: true, ..OPEN }), ReloadError::ShuttingDown);
        assert_eq!(refusal(&mut reload, Gate { announced: false, ..OPEN }), ReloadError::NotReady);
        let agent = Gate { running: Some(ReplaceReason::AgentReload), ..OPEN };
        assert_eq!(refusal(&mut reload, agent), ReloadError::InProgress { running: ReplaceReason::AgentReload });
        let _ = reload.replace_over_memory(1);
        assert_eq!(refusal(&mut reload, OPEN), ReloadError::InProgress { running: ReplaceReason::MaxMemory });
        assert!(reload.abort().is_empty(), "a memory replacement has no one to answer");
        assert!(reload.running().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_replaces_one_worker_gracefully_and_answers() {
        let mut f = Fixture::ready(2);
        let mut reload = Reload::default();
        let (tx, _rx) = oneshot::channel();
        assert_eq!(kinds(&reload.restart(&f.slots, OPEN, 2, tx)), ["advance Reload"]);
        assert_eq!(reload.running(), Some(ReplaceReason::Restart));
        assert_eq!(kinds(&reload.on_advance(&f.slots, SETTINGS)), ["replace 2"]);
        let old = f.key(SlotId::Worker(2));
        let old_pid = f.pid(old);
        let (new, pid) = replace(&mut f, 2);
        let _ = reload.on_launched(2, Ok((new, pid)));
        let ready = reload.on_ready(&f.slots, new, SETTINGS).unwrap();
        assert_eq!(kinds(&ready)[..2], [format!("stop {old:?} 3s"), format!("retire {old:?}")]);
        f.slots.get_mut(SlotId::Worker(2)).unwrap().state = ProcessState::Ready;
        assert!(reload.on_advance(&f.slots, SETTINGS).is_empty(), "answered once the old one is gone");
        f.exit(old);
        let _ = reload.on_old_exited(old);
        let end = reload.on_advance(&f.slots, SETTINGS);
        assert_eq!(kinds(&end), ["reply reload true"], "no reload event: it is a restart");
        let report = reply_of(end).unwrap();
        assert_eq!(report.replaced, vec![ReplacedWorker { id: 2, old_pid, new_pid: pid }]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_of_an_unknown_or_unready_worker_or_during_a_scale_is_refused() {
        let mut f = Fixture::ready(2);
        let mut reload = Reload::default();
        let mut refusal = |f: &Fixture, gate, id| {
            let (tx, _rx) = oneshot::channel();
            reply_of(reload.restart(&f.slots, gate, id, tx)).unwrap_err()
        };
        let e = refusal(&f, OPEN, 7);
        assert_eq!(e, ReloadError::UnknownWorker { worker: 7, workers: 2 });
        assert_eq!(e.to_string(), "no worker 7: the cluster runs 2 worker(s), ids 1 to 2");
        assert_eq!(refusal(&f, OPEN, 0), ReloadError::UnknownWorker { worker: 0, workers: 2 });
        let scale = Gate { running: Some(ReplaceReason::Scale), ..OPEN };
        assert_eq!(refusal(&f, scale, 1), ReloadError::InProgress { running: ReplaceReason::Scale });
        f.slots.get_mut(SlotId::Worker(1)).unwrap().state = ProcessState::BackingOff;
        assert_eq!(refusal(&f, OPEN, 1), ReloadError::WorkerNotReady { worker: 1 });
        assert!(reload.running().is_none());
    }
}
