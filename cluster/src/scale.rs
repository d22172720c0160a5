//! Changing the worker count while running ([`ClusterControl::scale`](crate::ClusterControl::scale),
//! `tandem scale NAME N|+K|-K`).
//!
//! ```text
//! up (2 -> 4):   slot 3, slot 4 added ── spawned ── ready ──> answered (both ready)
//!                a new worker that exits or misses its start deadline: its slot is
//!                removed again, the answer is ScaleFailed (the others stay)
//! down (4 -> 2): slot 4, slot 3 (highest ids first): Stop{grace} ── drained, exit ──> slot removed
//!                not exited within the grace: SIGKILL (as a stop does)     ──> answered (both gone)
//! ```
//!
//! One scale at a time, and never with a reload, a restart or a memory
//! replacement: a request while one runs is refused with
//! [`ReloadError::InProgress`]. A listener in `reuseport` mode has one socket
//! per worker, bound at start: with one, the count is fixed
//! ([`ReloadError::ReusePortFixed`]).
//!
//! A state machine without I/O: it reads the slots, takes the master's inputs
//! (a request, a spawn's outcome, a ready report, an exit) and returns
//! [`Action`]s for the master to carry out.

use std::time::Duration;

use tokio::time::Instant;

use crate::identity::{ProcKey, SlotId};
use crate::lifecycle::{Action, Machine, Reply, ScaleReply, Timer};
use crate::process::Ended;
use crate::reload_handle::{AddedWorker, MAX_WORKERS, ReloadError, RemovedWorker, ReplaceReason, ScaleReport, ScaleTo};
use crate::status::ProcessState;
use crate::supervisor::Slots;
use crate::{ClusterEvent, StartFailure, WorkerId};

/// A worker being added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Adding {
    id: WorkerId,
    /// `None` while it is being spawned.
    new: Option<(ProcKey, u32)>,
}

/// A scale in progress.
#[derive(Debug)]
struct Run {
    from: u32,
    adding: Vec<Adding>,
    /// Workers asked to stop, not exited yet: (id, process, pid).
    draining: Vec<(WorkerId, ProcKey, u32)>,
    added: Vec<AddedWorker>,
    removed: Vec<RemovedWorker>,
    /// The first new worker that failed.
    failed: Option<(WorkerId, Option<u32>, StartFailure)>,
    reply: ScaleReply,
    started: Instant,
}

/// What a scale needs to know of the rest of the master when asked for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gate {
    pub stopping: bool,
    pub announced: bool,
    /// A replacement running (a reload, a restart, the agent's reload, a memory replacement).
    pub running: Option<ReplaceReason>,
    /// A listener in `reuseport` mode: its name and its sockets.
    pub reuseport: Option<(String, u32)>,
    /// How long a removed worker has to drain.
    pub grace: Duration,
}

/// The direction of a scale that changes the count, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Up,
    Down,
}

/// The worker count: idle, or one scale in progress.
#[derive(Debug)]
pub(crate) struct Scale {
    run: Option<Run>,
    /// The worker count asked for last (at start: the configured count).
    desired: u32,
}

impl Scale {
    /// Idle, with `workers` desired (the configured count).
    pub(crate) fn new(workers: u32) -> Self {
        Scale { run: None, desired: workers }
    }

    pub(crate) fn is_running(&self) -> bool {
        self.run.is_some()
    }

    /// The worker count asked for last (the `tandem_workers_desired` gauge).
    pub(crate) fn desired(&self) -> u32 {
        self.desired
    }

    /// A scale asked for: the slots to add and the workers to stop, or a
    /// refusal (answered at once). `Some(direction)` with the actions when it
    /// changes the count.
    pub(crate) fn request(
        &mut self,
        slots: &Slots,
        gate: Gate,
        to: ScaleTo,
        reply: ScaleReply,
    ) -> (Vec<Action>, Option<Direction>) {
        let current = slots.worker_count();
        let result = to.result(current);
        let refused = if gate.stopping {
            Some(ReloadError::ShuttingDown)
        } else if let Some(running) = gate.running.or(self.run.as_ref().map(|_| ReplaceReason::Scale)) {
            Some(ReloadError::InProgress { running })
        } else if !gate.announced {
            Some(ReloadError::NotReady)
        } else if result < 1 {
            Some(ReloadError::TooFewWorkers { current, asked: to, result })
        } else if result > i64::from(MAX_WORKERS) {
            Some(ReloadError::TooManyWorkers { current, asked: to, result, max: MAX_WORKERS })
        } else if let Some((listener, workers)) = gate.reuseport.filter(|_| result != i64::from(current)) {
            Some(ReloadError::ReusePortFixed { listener, workers })
        } else {
            None
        };
        if let Some(e) = refused {
            tracing::warn!(error = %e, "scale refused");
            return (vec![Action::Reply(Reply::Scale(reply, Err(e)))], None);
        }
        let target = u32::try_from(result).unwrap_or(current);
        self.desired = target;
        let mut run = Run {
            from: current,
            adding: Vec::new(),
            draining: Vec::new(),
            added: Vec::new(),
            removed: Vec::new(),
            failed: None,
            reply,
            started: Instant::now(),
        };
        let mut actions = Vec::new();
        let direction = match target.cmp(&current) {
            std::cmp::Ordering::Equal => None,
            std::cmp::Ordering::Greater => {
                let first = slots.highest_worker() + 1;
                tracing::info!(from = current, to = target, "scaling up: new workers start, ready-gated");
                for id in first..first + (target - current) {
                    run.adding.push(Adding { id, new: None });
                    actions.push(Action::AddWorker(id));
                }
                Some(Direction::Up)
            }
            std::cmp::Ordering::Less => {
                tracing::info!(from = current, to = target, "scaling down: the highest worker ids drain and stop");
                let mut ids: Vec<WorkerId> = slots.workers().filter_map(|s| s.id.worker_id()).collect();
                ids.sort_unstable_by(|a, b| b.cmp(a));
                for id in ids.into_iter().take((current - target) as usize) {
                    let slot = SlotId::Worker(id);
                    match slots.get(slot).and_then(|s| s.proc.as_ref()) {
                        Some(p) => {
                            let (key, pid) = (p.key, p.pid);
                            actions.push(Action::Stop { to: key, grace: gate.grace });
                            actions.push(Action::Retire(key));
                            actions.push(Action::SetState(slot, ProcessState::Stopping));
                            actions.push(Action::After(gate.grace, Timer::DrainDeadline(key)));
                            run.draining.push((id, key, pid));
                        }
                        // Backing off or failed: nothing runs, the slot goes now.
                        None => {
                            actions.push(Action::RemoveSlot(slot));
                            run.removed.push(RemovedWorker { worker: id, pid: None, exit: None });
                        }
                    }
                }
                Some(Direction::Down)
            }
        };
        self.run = Some(run);
        actions.push(Action::Advance(Machine::Scale));
        (actions, direction)
    }

    /// The outcome of an [`Action::AddWorker`]: the new worker's key and pid,
    /// or why it could not be spawned (its slot is removed).
    pub(crate) fn on_launched(&mut self, id: WorkerId, outcome: Result<(ProcKey, u32), String>) -> Vec<Action> {
        let Some(run) = self.run.as_mut() else { return Vec::new() };
        let Some(pos) = run.adding.iter().position(|a| a.id == id && a.new.is_none()) else { return Vec::new() };
        match outcome {
            Ok(new) => {
                run.adding[pos].new = Some(new);
                Vec::new()
            }
            Err(e) => {
                tracing::error!(worker.id = id, error = %e, "could not spawn a new worker; its slot is removed");
                run.adding.remove(pos);
                run.failed.get_or_insert((id, None, StartFailure::Spawn(e)));
                vec![Action::RemoveSlot(SlotId::Worker(id)), Action::Advance(Machine::Scale)]
            }
        }
    }

    /// A worker reported ready: a new one counts now.
    pub(crate) fn on_ready(&mut self, key: ProcKey) -> Vec<Action> {
        let Some(run) = self.run.as_mut() else { return Vec::new() };
        let Some(pos) = run.adding.iter().position(|a| a.new.is_some_and(|(k, _)| k == key)) else {
            return Vec::new();
        };
        let Adding { id, new } = run.adding.remove(pos);
        let pid = new.map_or(0, |(_, pid)| pid);
        run.added.push(AddedWorker { worker: id, pid });
        vec![Action::Advance(Machine::Scale)]
    }

    /// A process exited (the master took it out of its slot). A removed
    /// worker: its slot goes. A new worker not ready yet (it exited, or was
    /// killed at its start deadline: `timed_out`): its slot goes and the
    /// scale fails. `None`: neither (the supervisor handles it as usual).
    pub(crate) fn on_exited(&mut self, key: ProcKey, ended: Ended, start_timeout: Duration) -> Option<Vec<Action>> {
        let run = self.run.as_mut()?;
        if let Some(pos) = run.draining.iter().position(|&(_, k, _)| k == key) {
            let (id, _, pid) = run.draining.remove(pos);
            run.removed.push(RemovedWorker { worker: id, pid: Some(pid), exit: Some(ended.exit) });
            return Some(vec![Action::RemoveSlot(key.slot), Action::Advance(Machine::Scale)]);
        }
        let pos = run.adding.iter().position(|a| a.new.is_some_and(|(k, _)| k == key))?;
        let Adding { id, new } = run.adding.remove(pos);
        let cause = ended.start_failure(start_timeout);
        run.failed.get_or_insert((id, new.map(|(_, pid)| pid), cause));
        Some(vec![Action::RemoveSlot(key.slot), Action::Advance(Machine::Scale)])
    }

    /// Answers when every new worker is ready (or failed) and every removed one is gone.
    pub(crate) fn on_advance(&mut self, slots: &Slots) -> Vec<Action> {
        let done = self.run.as_ref().is_some_and(|r| r.adding.is_empty() && r.draining.is_empty());
        if !done {
            return Vec::new();
        }
        let Some(mut run) = self.run.take() else { return Vec::new() };
        // In the order they were asked for: added by id, removed from the highest id.
        run.added.sort_by_key(|a| a.worker);
        run.removed.sort_by_key(|r| std::cmp::Reverse(r.worker));
        let to = slots.worker_count();
        self.desired = to;
        let mut actions = Vec::new();
        let result = match run.failed {
            Some((worker, new_pid, cause)) => {
                let e = ReloadError::ScaleFailed { worker, new_pid, cause, workers: to };
                // The `scale failed` event (WARN) is the log line.
                actions.push(Action::Emit(ClusterEvent::ScaleFailed { reason: e.to_string() }));
                Err(e)
            }
            None => {
                let workers = slots.workers().filter_map(|w| w.proc.as_ref()).map(|p| p.pid).collect();
                actions.push(Action::Emit(ClusterEvent::Scaled { from: run.from, to, workers }));
                let took = run.started.elapsed();
                Ok(ScaleReport { from: run.from, to, added: run.added, removed: run.removed, took })
            }
        };
        actions.push(Action::Reply(Reply::Scale(run.reply, result)));
        actions
    }

    /// Shutdown began: a scale in progress ends (answered `ShuttingDown`);
    /// the stop takes every process, new and draining alike.
    pub(crate) fn abort(&mut self) -> Vec<Action> {
        match self.run.take() {
            Some(run) => vec![Action::Reply(Reply::Scale(run.reply, Err(ReloadError::ShuttingDown)))],
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;
    use crate::supervisor::testing::{Fixture, kinds};
    use crate::{ExitReason, RestartPolicy};

    const GRACE: Duration = Duration::from_secs(3);
    const START: Duration = Duration::from_secs(10);

    fn open() -> Gate {
        Gate { stopping: false, announced: true, running: None, reuseport: None, grace: GRACE }
    }

    fn reply_of(actions: Vec<Action>) -> Result<ScaleReport, ReloadError> {
        for a in actions {
            if let Action::Reply(Reply::Scale(_, result)) = a {
                return result;
            }
        }
        panic!("no reply")
    }

    /// Carries out `AddWorker(id)` as the master does: a slot, a process starting.
    fn add(f: &mut Fixture, id: WorkerId) -> (ProcKey, u32) {
        assert!(f.slots.add_worker(id, &RestartPolicy::default()));
        let key = f.spawn(SlotId::Worker(id), 8);
        (key, f.pid(key))
    }

    #[tokio::test(start_paused = true)]
    async fn scaling_up_adds_slots_above_the_highest_id_and_answers_once_all_are_ready() {
        let mut f = Fixture::ready(2);
        let mut scale = Scale::new(2);
        let (tx, _rx) = oneshot::channel();
        let (actions, direction) = scale.request(&f.slots, open(), ScaleTo::Add(2), tx);
        assert_eq!(kinds(&actions), ["add worker 3", "add worker 4", "advance Scale"]);
        assert_eq!(direction, Some(Direction::Up));
        assert_eq!(scale.desired(), 4);
        let (k3, p3) = add(&mut f, 3);
        let (k4, p4) = add(&mut f, 4);
        assert!(scale.on_launched(3, Ok((k3, p3))).is_empty());
        assert!(scale.on_launched(4, Ok((k4, p4))).is_empty());
        assert!(scale.on_advance(&f.slots).is_empty(), "not ready yet");
        assert_eq!(kinds(&scale.on_ready(k4)), ["advance Scale"]);
        assert!(scale.on_advance(&f.slots).is_empty(), "worker 3 is not ready yet");
        let _ = scale.on_ready(k3);
        let end = scale.on_advance(&f.slots);
        assert_eq!(kinds(&end), ["emit Scaled", "reply scale true"]);
        let pids: Vec<u32> = [1, 2].iter().map(|&id| f.pid(f.key(SlotId::Worker(id)))).chain([p3, p4]).collect();
        assert!(
            matches!(&end[0], Action::Emit(ClusterEvent::Scaled { from: 2, to: 4, workers }) if *workers == pids),
            "{end:?}"
        );
        let report = reply_of(end).unwrap();
        assert_eq!((report.from, report.to), (2, 4));
        assert_eq!(report.added, [AddedWorker { worker: 3, pid: p3 }, AddedWorker { worker: 4, pid: p4 }]);
        assert!(!scale.is_running());
    }

    #[tokio::test(start_paused = true)]
    async fn scaling_down_drains_the_highest_ids_and_answers_once_they_exited() {
        let mut f = Fixture::ready(4);
        let mut scale = Scale::new(4);
        let (k3, k4) = (f.key(SlotId::Worker(3)), f.key(SlotId::Worker(4)));
        let (tx, _rx) = oneshot::channel();
        let (actions, direction) = scale.request(&f.slots, open(), ScaleTo::To(2), tx);
        assert_eq!(direction, Some(Direction::Down));
        assert_eq!(
            kinds(&actions),
            [
                format!("stop {k4:?} 3s"),
                format!("retire {k4:?}"),
                "state worker 4 stopping".into(),
                format!("after 3s DrainDeadline({k4:?})"),
                format!("stop {k3:?} 3s"),
                format!("retire {k3:?}"),
                "state worker 3 stopping".into(),
                format!("after 3s DrainDeadline({k3:?})"),
                "advance Scale".into(),
            ]
        );
        assert!(scale.on_advance(&f.slots).is_empty());
        let (p3, p4) = (f.pid(k3), f.pid(k4));
        f.exit(k4);
        let on_exit = scale.on_exited(k4, Ended::by(ExitReason::Code(0)), START).unwrap();
        assert_eq!(kinds(&on_exit), ["remove worker 4", "advance Scale"]);
        f.slots.remove(SlotId::Worker(4));
        assert!(scale.on_advance(&f.slots).is_empty(), "worker 3 still drains");
        f.exit(k3);
        let _ = scale.on_exited(k3, Ended::by(ExitReason::Signal(9)), START).unwrap();
        f.slots.remove(SlotId::Worker(3));
        let report = reply_of(scale.on_advance(&f.slots)).unwrap();
        assert_eq!((report.from, report.to), (4, 2));
        assert_eq!(
            report.removed,
            [
                RemovedWorker { worker: 4, pid: Some(p4), exit: Some(ExitReason::Code(0)) },
                RemovedWorker { worker: 3, pid: Some(p3), exit: Some(ExitReason::Signal(9)) },
            ]
        );
        // Another process's exit is not the scale's.
        assert!(scale.on_exited(f.key(SlotId::Worker(1)), Ended::by(ExitReason::Code(1)), START).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_worker_failing_is_removed_and_fails_the_scale_while_the_ready_ones_stay() {
        let mut f = Fixture::ready(1);
        let mut scale = Scale::new(1);
        let (tx, _rx) = oneshot::channel();
        let _ = scale.request(&f.slots, open(), ScaleTo::To(3), tx);
        let (k2, p2) = add(&mut f, 2);
        let _ = scale.on_launched(2, Ok((k2, p2)));
        assert_eq!(kinds(&scale.on_launched(3, Err("no memory".into()))), ["remove worker 3", "advance Scale"]);
        let _ = scale.on_ready(k2);
        let end = scale.on_advance(&f.slots);
        assert_eq!(kinds(&end), ["emit ScaleFailed", "reply scale false"]);
        let report = reply_of(end);
        let e = report.unwrap_err();
        assert_eq!(
            e,
            ReloadError::ScaleFailed {
                worker: 3,
                new_pid: None,
                cause: StartFailure::Spawn("no memory".into()),
                workers: 2
            }
        );
        assert_eq!(
            e.to_string(),
            "worker 3: new process could not be spawned: no memory (removed; the cluster runs 2 worker(s))"
        );

        // One killed at its start deadline.
        let (tx, _rx) = oneshot::channel();
        let _ = scale.request(&f.slots, open(), ScaleTo::Add(1), tx);
        let (k3, p3) = add(&mut f, 3);
        let _ = scale.on_launched(3, Ok((k3, p3)));
        f.exit(k3);
        let actions = scale.on_exited(k3, Ended::at_deadline(ExitReason::Signal(9)), START).unwrap();
        assert_eq!(kinds(&actions), ["remove worker 3", "advance Scale"]);
        f.slots.remove(SlotId::Worker(3));
        let e = reply_of(scale.on_advance(&f.slots)).unwrap_err();
        assert_eq!(e.start_failure(), Some(&StartFailure::TimedOut(START)));
        assert_eq!(scale.desired(), 2, "the count that runs");
    }

    #[tokio::test(start_paused = true)]
    async fn bad_counts_and_busy_clusters_are_refused_and_nothing_changes() {
        let f = Fixture::ready(2);
        let mut scale = Scale::new(2);
        let mut refusal = |gate: Gate, to: ScaleTo| {
            let (tx, _rx) = oneshot::channel();
            let (actions, direction) = scale.request(&f.slots, gate, to, tx);
            assert_eq!(direction, None);
            reply_of(actions).unwrap_err()
        };
        assert_eq!(
            refusal(open(), ScaleTo::To(0)),
            ReloadError::TooFewWorkers { current: 2, asked: ScaleTo::To(0), result: 0 }
        );
        assert_eq!(
            refusal(open(), ScaleTo::Remove(5)),
            ReloadError::TooFewWorkers { current: 2, asked: ScaleTo::Remove(5), result: -3 }
        );
        assert_eq!(
            refusal(open(), ScaleTo::Remove(5)).to_string(),
            "scaling 2 worker(s) by -5 would leave -3; a cluster keeps at least 1 worker (`tandem stop` stops it)"
        );
        assert_eq!(
            refusal(open(), ScaleTo::Add(1023)),
            ReloadError::TooManyWorkers { current: 2, asked: ScaleTo::Add(1023), result: 1025, max: MAX_WORKERS }
        );
        assert_eq!(
            refusal(Gate { running: Some(ReplaceReason::Reload), ..open() }, ScaleTo::To(3)),
            ReloadError::InProgress { running: ReplaceReason::Reload }
        );
        assert_eq!(refusal(Gate { stopping: true, ..open() }, ScaleTo::To(3)), ReloadError::ShuttingDown);
        assert_eq!(refusal(Gate { announced: false, ..open() }, ScaleTo::To(3)), ReloadError::NotReady);
        let reuseport = Gate { reuseport: Some(("http".into(), 2)), ..open() };
        assert_eq!(
            refusal(reuseport.clone(), ScaleTo::To(3)),
            ReloadError::ReusePortFixed { listener: "http".into(), workers: 2 }
        );
        assert_eq!(
            refusal(reuseport, ScaleTo::Remove(1)),
            ReloadError::ReusePortFixed { listener: "http".into(), workers: 2 }
        );
        assert_eq!(scale.desired(), 2);
        // A scale runs: another is refused.
        let (tx, _rx) = oneshot::channel();
        let _ = scale.request(&f.slots, open(), ScaleTo::To(3), tx);
        let (tx, _rx) = oneshot::channel();
        let (actions, _) = scale.request(&f.slots, open(), ScaleTo::To(1), tx);
        assert_eq!(reply_of(actions).unwrap_err(), ReloadError::InProgress { running: ReplaceReason::Scale });
        assert_eq!(kinds(&scale.abort()), ["reply scale false"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_removed_slot_with_no_process_goes_at_once() {
        let mut f = Fixture::ready(3);
        let k3 = f.key(SlotId::Worker(3));
        f.exit(k3);
        f.slots.get_mut(SlotId::Worker(3)).unwrap().state = ProcessState::BackingOff;
        let k2 = f.key(SlotId::Worker(2));
        let p2 = f.pid(k2);
        let mut scale = Scale::new(3);
        let (tx, _rx) = oneshot::channel();
        let (actions, _) = scale.request(&f.slots, open(), ScaleTo::Remove(2), tx);
        assert_eq!(
            kinds(&actions),
            [
                "remove worker 3".to_owned(),
                format!("stop {k2:?} 3s"),
                format!("retire {k2:?}"),
                "state worker 2 stopping".into(),
                format!("after 3s DrainDeadline({k2:?})"),
                "advance Scale".into(),
            ]
        );
        f.slots.remove(SlotId::Worker(3));
        assert!(scale.on_advance(&f.slots).is_empty(), "worker 2 drains");
        f.exit(k2);
        let _ = scale.on_exited(k2, Ended::by(ExitReason::Code(0)), START);
        f.slots.remove(SlotId::Worker(2));
        let report = reply_of(scale.on_advance(&f.slots)).unwrap();
        assert_eq!(report.removed[1], RemovedWorker { worker: 2, pid: Some(p2), exit: Some(ExitReason::Code(0)) });
        assert_eq!(report.removed[0], RemovedWorker { worker: 3, pid: None, exit: None });
        assert_eq!(report.to, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_count_answers_at_once() {
        let f = Fixture::ready(2);
        let mut scale = Scale::new(2);
        let (tx, _rx) = oneshot::channel();
        let (actions, direction) = scale.request(&f.slots, open(), ScaleTo::To(2), tx);
        assert_eq!(direction, None);
        assert_eq!(kinds(&actions), ["advance Scale"]);
        let report = reply_of(scale.on_advance(&f.slots)).unwrap();
        assert_eq!((report.from, report.to, report.added.len(), report.removed.len()), (2, 2, 0, 0));
    }

    #[test]
    fn counts_read_as_n_plus_k_and_minus_k() {
        assert_eq!("4".parse::<ScaleTo>(), Ok(ScaleTo::To(4)));
        assert_eq!("+2".parse::<ScaleTo>(), Ok(ScaleTo::Add(2)));
        assert_eq!("-2".parse::<ScaleTo>(), Ok(ScaleTo::Remove(2)));
        assert_eq!("99999999999".parse::<ScaleTo>(), Ok(ScaleTo::To(u32::MAX)));
        for bad in ["", "+", "-", "x", "2.5", "+-1", " 3", "--1"] {
            let e = bad.parse::<ScaleTo>().unwrap_err();
            assert!(e.to_string().contains("expected N"), "{bad:?}: {e}");
        }
        assert_eq!(serde_json::to_string(&ScaleTo::Add(2)).unwrap(), r#"{"add":2}"#);
        assert_eq!(serde_json::from_str::<ScaleTo>(r#"{"to":4}"#).unwrap(), ScaleTo::To(4));
    }
}
