//! Supervision state: one slot per supervised process (the agent, each worker
//! id), the process currently filling it, and what to do when it dies.
//!
//! ```text
//!  Pending --spawn--> Starting --ready--> Ready
//!                        |                  |
//!                        +------ dies ------+--> BackingOff --delay--> Starting ...
//!                                           |
//!                                 crash loop +--> Failed --retry_after--> Starting ...
//!  (shutdown) any --> Stopping --exits--> Stopped
//! ```
//!
//! A slot is never abandoned: a failed slot is retried later, and the status
//! table and [`ClusterEvent::SlotFailed`](crate::ClusterEvent::SlotFailed)
//! make the failure visible.

use std::path::PathBuf;

use tandem_protocol::internal::Backoff;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::identity::{Origin, ProcKey, SlotId};
use crate::ipc::ToChild;
use crate::lifecycle::{Action, Timer};
use crate::liveness::Liveness;
use crate::restart::{CrashLoop, Restart};
use crate::status::{ProcessState, StatusRow, rss_bytes};
use crate::{ClusterEvent, ProcessRef, ProcessRole, RestartPolicy, WorkerId};

/// A running child process, as the master holds it.
#[derive(Debug)]
pub(crate) struct Proc {
    pub key: ProcKey,
    pub pid: u32,
    pub spawned_at: Instant,
    /// Control messages (Init, Stop, outcomes...): written before data.
    pub control: mpsc::Sender<ToChild>,
    /// User messages, link frames and credits (bounded by `Config::queue_capacity`).
    pub data: mpsc::Sender<ToChild>,
    /// The agent's epoch.
    pub epoch: u64,
    /// The agent's Leader socket, once ready.
    pub socket: Option<PathBuf>,
    /// Killed for missing its start-up deadline (already reported).
    pub timed_out: bool,
    /// Its pings, once ready, when the master watches it for hangs.
    pub liveness: Option<Liveness>,
    /// It sent a message on its IPC channel: it speaks this master's IPC
    /// version, so an exit with code 111 is its own, not a refusal to join.
    pub joined: bool,
    kill: Option<oneshot::Sender<()>>,
}

impl Proc {
    pub(crate) fn new(
        key: ProcKey,
        pid: u32,
        control: mpsc::Sender<ToChild>,
        data: mpsc::Sender<ToChild>,
        epoch: u64,
        kill: oneshot::Sender<()>,
    ) -> Self {
        Proc {
            key,
            pid,
            spawned_at: Instant::now(),
            control,
            data,
            epoch,
            socket: None,
            timed_out: false,
            liveness: None,
            joined: false,
            kill: Some(kill),
        }
    }

    /// SIGKILLs the process; its waiter task then reaps it (waitpid) and reports the exit.
    pub(crate) fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            // Err: the waiter already reaped it.
            let _ = kill.send(());
        }
    }

    pub(crate) fn process_ref(&self) -> ProcessRef {
        ProcessRef { role: self.key.slot.role(), worker_id: self.key.slot.worker_id(), pid: Some(self.pid) }
    }

    /// How receivers see messages from this process.
    pub(crate) fn sender(&self) -> Origin {
        match self.key.slot {
            // A standby is an agent process (of the epoch it mirrors until promoted).
            SlotId::Agent | SlotId::Standby => Origin::Agent { pid: self.pid, epoch: self.epoch },
            SlotId::Worker(id) => Origin::Worker { id, pid: self.pid },
        }
    }

    /// Queues a control message. The control queue holds more than a child can
    /// have outstanding (see `MAX_OUTSTANDING_OPS`); if it is full anyway the
    /// child is not reading its channel and the message is dropped (logged).
    pub(crate) fn control(&self, msg: ToChild) {
        if let Err(e) = self.control.try_send(msg) {
            tracing::warn!(pid = self.pid, slot = %self.key.slot, error = %e, "control message not queued");
        }
    }
}

/// A supervised slot.
#[derive(Debug)]
pub(crate) struct Slot {
    pub id: SlotId,
    pub state: ProcessState,
    pub crash_loop: CrashLoop,
    /// Processes started after the first one.
    pub restarts: u32,
    pub proc: Option<Proc>,
    /// Whether a process of this slot was ever ready (a later ready is a restart).
    pub ever_ready: bool,
    /// The id of the pending restart timer (older timers are ignored).
    pub timer: u64,
    /// The process being replaced (reload, memory limit): it serves while
    /// `proc` starts, then drains. See [`reload`](crate::reload).
    pub previous: Option<Proc>,
    /// Consecutive spawns that failed for a transient lack of resources
    /// (descriptors, processes, memory): retried, never counted as crashes.
    pub transient_failures: u32,
    /// The pauses between those retries.
    pub transient_backoff: Backoff,
}

impl Slot {
    pub(crate) fn new(id: SlotId, policy: RestartPolicy) -> Self {
        Slot {
            id,
            state: ProcessState::Pending,
            crash_loop: CrashLoop::new(policy),
            restarts: 0,
            proc: None,
            ever_ready: false,
            timer: 0,
            previous: None,
            transient_failures: 0,
            transient_backoff: crate::descriptors::transient_backoff(),
        }
    }

    /// Takes the slot's process if it is the one named by `key`.
    pub(crate) fn take_proc(&mut self, key: ProcKey) -> Option<Proc> {
        match &self.proc {
            Some(p) if p.key == key => self.proc.take(),
            _ => None,
        }
    }

    /// The slot's process (or the one it replaces) if it is the one named by `key`.
    pub(crate) fn proc_mut(&mut self, key: ProcKey) -> Option<&mut Proc> {
        self.proc.iter_mut().chain(self.previous.iter_mut()).find(|p| p.key == key)
    }

    /// The process died (outside shutdown): decide its restart and move to
    /// `BackingOff` or `Failed`. Returns the decision and the timer id to arm.
    pub(crate) fn died(&mut self) -> (Restart, u64) {
        let decision = self.crash_loop.exited();
        self.state = match decision {
            Restart::After { .. } => ProcessState::BackingOff,
            Restart::Failed { .. } => ProcessState::Failed,
        };
        self.timer += 1;
        (decision, self.timer)
    }

    /// The process died (outside shutdown): the crash-loop decision, as the
    /// master's actions: a restart after the backoff delay, or, in a crash
    /// loop, the slot marked failed and retried after `failed_retry`.
    pub(crate) fn on_died(&mut self) -> Vec<Action> {
        let slot = self.id;
        let (decision, id) = self.died();
        let (role, worker_id) = (slot.role(), slot.worker_id());
        match decision {
            Restart::After { delay, failures } => vec![
                Action::Emit(ClusterEvent::RestartScheduled { role, worker_id, after: delay, failures }),
                Action::After(delay, Timer::Restart { slot, id }),
            ],
            Restart::Failed { retry_after, failures } => {
                tracing::debug!(slot = %slot, failures, "crash loop: slot marked failed");
                vec![
                    Action::Emit(ClusterEvent::SlotFailed { role, worker_id, failures, retry_after }),
                    Action::After(retry_after, Timer::Restart { slot, id }),
                ]
            }
        }
    }

    /// Whether this slot counts as settled for the first cluster-ready announcement.
    pub(crate) fn settled(&self) -> bool {
        matches!(self.state, ProcessState::Ready | ProcessState::Failed)
    }

    pub(crate) fn status_row(&self) -> StatusRow {
        let proc = self.proc.as_ref();
        StatusRow {
            role: self.id.role(),
            worker_id: self.id.worker_id(),
            pid: proc.map(|p| p.pid),
            state: self.state,
            restarts: self.restarts,
            uptime: proc.map(|p| p.spawned_at.elapsed()),
            rss_bytes: proc.and_then(|p| rss_bytes(p.pid)),
            // The agent's epoch; the standby's: the epoch of the Leader it mirrors (once ready).
            epoch: proc.and_then(|p| match p.key.slot {
                SlotId::Agent => Some(p.epoch),
                SlotId::Standby => (p.epoch > 0).then_some(p.epoch),
                SlotId::Worker(_) => None,
            }),
            // The master fills it in (`Master::status_table`).
            last_exit: None,
        }
    }
}

/// The supervised slots, in the order the status table shows them: the agent,
/// then the workers by id. Routing, status, metrics and the lifecycle state
/// machines read this list; a slot added at run time (a standby agent, a
/// worker added by `scale`) is one more entry.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    list: Vec<Slot>,
}

impl Slots {
    /// The agent's slot and `workers` worker slots, each under `policy`.
    pub(crate) fn new(workers: WorkerId, policy: &RestartPolicy) -> Self {
        let list = std::iter::once(SlotId::Agent)
            .chain((1..=workers).map(SlotId::Worker))
            .map(|id| Slot::new(id, policy.clone()))
            .collect();
        Slots { list }
    }

    /// Where slot `id` is usually found in the list (the agent first, then
    /// the workers by id): a hint checked before searching, so that routing a
    /// message costs one index, not a scan, while the list keeps that order.
    fn hint(id: SlotId) -> usize {
        match id {
            SlotId::Agent => 0,
            SlotId::Worker(n) => n as usize,
            // After the workers: found by a scan (it is not routed to).
            SlotId::Standby => usize::MAX,
        }
    }

    fn position(&self, id: SlotId) -> Option<usize> {
        let hint = Self::hint(id);
        match self.list.get(hint) {
            Some(s) if s.id == id => Some(hint),
            _ => self.list.iter().position(|s| s.id == id),
        }
    }

    pub(crate) fn get(&self, id: SlotId) -> Option<&Slot> {
        self.position(id).map(|i| &self.list[i])
    }

    pub(crate) fn get_mut(&mut self, id: SlotId) -> Option<&mut Slot> {
        self.position(id).map(|i| &mut self.list[i])
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, Slot> {
        self.list.iter()
    }

    pub(crate) fn iter_mut(&mut self) -> std::slice::IterMut<'_, Slot> {
        self.list.iter_mut()
    }

    /// The slots of `role`, in list order. The agent's role includes its hot
    /// standby (an agent process): a stop stops and kills them together,
    /// after the workers.
    pub(crate) fn with_role(&self, role: ProcessRole) -> impl Iterator<Item = &Slot> {
        self.list.iter().filter(move |s| s.id.role() == role || (role == ProcessRole::Agent && s.id == SlotId::Standby))
    }

    /// Adds the hot standby's slot (`Pending`), after the others. `false`: there is one.
    pub(crate) fn add_standby(&mut self, policy: &RestartPolicy) -> bool {
        if self.get(SlotId::Standby).is_some() {
            return false;
        }
        self.list.push(Slot::new(SlotId::Standby, policy.clone()));
        true
    }

    /// The hot standby's slot, when the cluster keeps one.
    pub(crate) fn standby(&self) -> Option<&Slot> {
        self.get(SlotId::Standby)
    }

    /// The agent's slot.
    pub(crate) fn agent(&self) -> Option<&Slot> {
        self.get(SlotId::Agent)
    }

    /// The workers' slots, by id.
    pub(crate) fn workers(&self) -> impl Iterator<Item = &Slot> {
        self.with_role(ProcessRole::Worker)
    }

    /// How many worker slots there are.
    pub(crate) fn worker_count(&self) -> u32 {
        u32::try_from(self.workers().count()).unwrap_or(u32::MAX)
    }

    /// Adds worker slot `id` (a scale), `Pending`, after the others: the
    /// workers stay in id order as long as new ids are above the others.
    /// `false`: a slot of that id exists.
    pub(crate) fn add_worker(&mut self, id: WorkerId, policy: &RestartPolicy) -> bool {
        if self.get(SlotId::Worker(id)).is_some() {
            return false;
        }
        self.list.push(Slot::new(SlotId::Worker(id), policy.clone()));
        true
    }

    /// Takes slot `id` out of the list (a scale removed it).
    pub(crate) fn remove(&mut self, id: SlotId) -> Option<Slot> {
        let i = self.position(id)?;
        Some(self.list.remove(i))
    }

    /// The highest worker id (0: none).
    pub(crate) fn highest_worker(&self) -> WorkerId {
        self.workers().filter_map(|s| s.id.worker_id()).max().unwrap_or(0)
    }

    /// The live process named by `key` (the slot's, or its predecessor still draining).
    pub(crate) fn proc(&self, key: ProcKey) -> Option<&Proc> {
        let slot = self.get(key.slot)?;
        slot.proc.iter().chain(slot.previous.iter()).find(|p| p.key == key)
    }

    /// The same, to change it (kill it, record its pings).
    pub(crate) fn proc_mut(&mut self, key: ProcKey) -> Option<&mut Proc> {
        self.get_mut(key.slot)?.proc_mut(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_found_by_id_in_order_and_after_a_change_of_order() {
        let mut slots = Slots::new(3, &RestartPolicy::default());
        let ids: Vec<SlotId> = slots.iter().map(|s| s.id).collect();
        assert_eq!(ids, [SlotId::Agent, SlotId::Worker(1), SlotId::Worker(2), SlotId::Worker(3)]);
        assert_eq!(slots.worker_count(), 3);
        assert_eq!(slots.get(SlotId::Worker(2)).map(|s| s.id), Some(SlotId::Worker(2)));
        assert!(slots.get(SlotId::Worker(4)).is_none());
        // A slot removed at run time: the others are still found.
        slots.list.remove(1);
        assert_eq!(slots.get(SlotId::Worker(3)).map(|s| s.id), Some(SlotId::Worker(3)));
        assert!(slots.get(SlotId::Worker(1)).is_none());
        assert_eq!(slots.agent().map(|s| s.id), Some(SlotId::Agent));
        assert_eq!(slots.worker_count(), 2);
        // Added and removed through the API: found, in id order.
        assert!(slots.add_worker(4, &RestartPolicy::default()));
        assert!(!slots.add_worker(4, &RestartPolicy::default()), "a second slot 4");
        assert_eq!(slots.highest_worker(), 4);
        assert_eq!(slots.get(SlotId::Worker(4)).map(|s| s.state), Some(ProcessState::Pending));
        assert_eq!(slots.remove(SlotId::Worker(3)).map(|s| s.id), Some(SlotId::Worker(3)));
        assert!(slots.remove(SlotId::Worker(3)).is_none());
        let ids: Vec<SlotId> = slots.iter().map(|s| s.id).collect();
        assert_eq!(ids, [SlotId::Agent, SlotId::Worker(2), SlotId::Worker(4)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dying_slot_backs_off_then_is_marked_failed_in_a_crash_loop() {
        let policy = RestartPolicy { crash_loop_limit: 2, jitter: 0.0, ..RestartPolicy::default() };
        let mut slot = Slot::new(SlotId::Worker(1), policy);
        let mut seen = Vec::new();
        for _ in 0..3 {
            slot.crash_loop.spawned();
            seen.push(testing::kinds(&slot.on_died()));
            seen.push(vec![slot.state.to_string()]);
        }
        assert_eq!(seen[0], ["emit RestartScheduled", "after 100ms Restart { slot: Worker(1), id: 1 }"]);
        assert_eq!(seen[1], ["backing off"]);
        assert_eq!(seen[2], ["emit RestartScheduled", "after 200ms Restart { slot: Worker(1), id: 2 }"]);
        assert_eq!(seen[4], ["emit SlotFailed", "after 60s Restart { slot: Worker(1), id: 3 }"]);
        assert_eq!(seen[5], ["failed"]);
    }
}

/// Slots filled with processes that are only queues (no process runs), for
/// the unit tests of the router and the lifecycle machines.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::lifecycle::Action;

    type Queues = (mpsc::Receiver<ToChild>, mpsc::Receiver<ToChild>, oneshot::Receiver<()>);

    #[derive(Debug)]
    pub(crate) struct Fixture {
        pub slots: Slots,
        /// The receiving ends of each process's queues, kept open.
        pub queues: Vec<Queues>,
        next_generation: u64,
    }

    impl Fixture {
        /// The agent and `workers` workers, all ready; data queues of `capacity` messages.
        pub(crate) fn with_capacity(workers: WorkerId, capacity: usize) -> Self {
            let mut f = Fixture {
                slots: Slots::new(workers, &RestartPolicy::default()),
                queues: Vec::new(),
                next_generation: 1,
            };
            let ids: Vec<SlotId> = f.slots.iter().map(|s| s.id).collect();
            for id in ids {
                f.spawn(id, capacity);
                if let Some(s) = f.slots.get_mut(id) {
                    s.state = ProcessState::Ready;
                    s.ever_ready = true;
                }
            }
            f
        }

        pub(crate) fn ready(workers: WorkerId) -> Self {
            Self::with_capacity(workers, 8)
        }

        /// A new process in slot `id` (the old one, if any, is dropped): `Starting`.
        pub(crate) fn spawn(&mut self, id: SlotId, capacity: usize) -> ProcKey {
            let (control_tx, control_rx) = mpsc::channel(8);
            let (data_tx, data_rx) = mpsc::channel(capacity);
            let (kill_tx, kill_rx) = oneshot::channel();
            self.queues.push((control_rx, data_rx, kill_rx));
            let generation = self.next_generation;
            self.next_generation += 1;
            let key = ProcKey { slot: id, generation };
            let pid = 1000 + u32::try_from(generation).unwrap_or(0);
            if let Some(slot) = self.slots.get_mut(id) {
                slot.proc = Some(Proc::new(key, pid, control_tx, data_tx, generation, kill_tx));
                slot.state = ProcessState::Starting;
            }
            key
        }

        /// The key of slot `id`'s process.
        pub(crate) fn key(&self, id: SlotId) -> ProcKey {
            self.slots.get(id).and_then(|s| s.proc.as_ref()).map(|p| p.key).unwrap()
        }

        pub(crate) fn pid(&self, key: ProcKey) -> u32 {
            self.slots.proc(key).map(|p| p.pid).unwrap()
        }

        /// The process exited: out of its slot (the master takes it out first).
        pub(crate) fn exit(&mut self, key: ProcKey) {
            let slot = self.slots.get_mut(key.slot).unwrap();
            if slot.take_proc(key).is_none() {
                slot.previous.take_if(|p| p.key == key);
            }
        }
    }

    /// Each action in a few words, to compare sequences in tests.
    pub(crate) fn kinds(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Stop { to, grace } => format!("stop {to:?} {grace:?}"),
                Action::Kill(key) => format!("kill {key:?}"),
                Action::TimedOut(key) => format!("timed out {key:?}"),
                Action::Retire(key) => format!("retire {key:?}"),
                Action::SetState(id, state) => format!("state {id} {state}"),
                Action::After(delay, timer) => format!("after {delay:?} {timer:?}"),
                Action::Emit(event) => {
                    let debug = format!("{event:?}");
                    format!("emit {}", debug.split([' ', '{', '(']).next().unwrap_or_default())
                }
                Action::Abandon(id) => format!("abandon {id}"),
                Action::Replace(id) => format!("replace {id}"),
                Action::Restore(id) => format!("restore {id}"),
                Action::Relaunch(id) => format!("relaunch {id}"),
                Action::Restart(id) => format!("restart {id}"),
                Action::ReplaceOverMemory(id) => format!("replace over memory {id}"),
                Action::Reply(crate::lifecycle::Reply::Reload(_, r)) => format!("reply reload {}", r.is_ok()),
                Action::Reply(crate::lifecycle::Reply::AgentReload(_, r)) => {
                    format!("reply agent reload {}", r.is_ok())
                }
                Action::Reply(crate::lifecycle::Reply::Scale(_, r)) => format!("reply scale {}", r.is_ok()),
                Action::AddWorker(id) => format!("add worker {id}"),
                Action::RemoveSlot(id) => format!("remove {id}"),
                Action::Advance(m) => format!("advance {m:?}"),
                Action::Promote(key) => format!("promote {key:?}"),
                Action::StartStandby => "start standby".to_owned(),
            })
            .collect()
    }
}
