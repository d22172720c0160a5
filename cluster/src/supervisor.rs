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

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backoff::{Backoff, Restart};
use crate::ipc::ToChild;
use crate::liveness::Liveness;
use crate::status::{ProcessState, StatusRow, rss_bytes};
use crate::types::{ProcKey, Sender, SlotId};
use crate::{ProcessRef, RestartPolicy};

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
    pub(crate) fn sender(&self) -> Sender {
        match self.key.slot {
            SlotId::Agent => Sender::Agent { pid: self.pid, epoch: self.epoch },
            SlotId::Worker(id) => Sender::Worker { id, pid: self.pid },
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
    pub backoff: Backoff,
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
}

impl Slot {
    pub(crate) fn new(id: SlotId, policy: RestartPolicy) -> Self {
        Slot {
            id,
            state: ProcessState::Pending,
            backoff: Backoff::new(policy),
            restarts: 0,
            proc: None,
            ever_ready: false,
            timer: 0,
            previous: None,
            transient_failures: 0,
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
        let decision = self.backoff.exited();
        self.state = match decision {
            Restart::After { .. } => ProcessState::BackingOff,
            Restart::Failed { .. } => ProcessState::Failed,
        };
        self.timer += 1;
        (decision, self.timer)
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
            epoch: proc.filter(|p| p.key.slot == SlotId::Agent).map(|p| p.epoch),
        }
    }
}
