//! What the master's lifecycle state machines ask it to do, and the timers
//! they arm. The machines ([`stop`](crate::stop), [`reload`](crate::reload),
//! [`agent_reload`](crate::agent_reload), [`memory`](crate::memory), [`scale`](crate::scale),
//! [`standby`](crate::standby) and the
//! slot's crash-loop backoff in [`supervisor`](crate::supervisor)) do no I/O:
//! they read the slots, take inputs (a request, a ready report, an exit, a
//! timer) and return [`Action`]s, which the master (the executor: processes,
//! channels, sockets, one timer queue) carries out in order. The router
//! ([`router`](crate::router)) does the same for messages, with its own actions.
//!
//! ```text
//! input ──> machine.on_x(&slots, ..) ──> [Action] ──> Master::apply ──> processes, sockets, timers
//!                  ^                                        │
//!                  └──── Action::Advance / outcome of a spawn ┘
//! ```

use std::time::Duration;

use tokio::sync::oneshot;

use crate::identity::{ProcKey, SlotId};
use crate::reload_handle::{AgentReloadReport, ReloadError, ReloadReport, ScaleReport};
use crate::status::ProcessState;
use crate::{ClusterEvent, WorkerId};

/// Something a lifecycle machine asks the master to do.
#[derive(Debug)]
pub(crate) enum Action {
    /// Ask process `to` to stop within `grace` (skipped when it is gone).
    Stop { to: ProcKey, grace: Duration },
    /// SIGKILL process `to` (skipped when it is gone); its exit comes back as usual.
    Kill(ProcKey),
    /// Mark process `to` as having missed its start deadline (its exit is then
    /// not reported as a second start failure).
    TimedOut(ProcKey),
    /// The round-robin dispatcher hands process `to` no more connections.
    Retire(ProcKey),
    /// Set the slot's state (for the status table and routing).
    SetState(SlotId, ProcessState),
    /// Arm a timer.
    After(Duration, Timer),
    /// Send an event to the master function's stream (and log it).
    Emit(ClusterEvent),
    /// Give up on the slot's processes (killed and never reaped): empty it, `Stopped`.
    Abandon(SlotId),
    /// Move worker slot `id`'s ready process aside (it keeps serving) and
    /// spawn its successor; the outcome goes back to
    /// [`Reload::on_launched`](crate::reload::Reload::on_launched).
    Replace(WorkerId),
    /// Put the process moved aside back as the slot's serving one (`Ready`).
    Restore(SlotId),
    /// Spawn the agent's successor now; the outcome goes back to
    /// [`AgentReload::on_launched`](crate::agent_reload::AgentReload::on_launched).
    Relaunch(SlotId),
    /// The slot's process died outside a stop: restart it with the crash-loop backoff.
    Restart(SlotId),
    /// Replace worker `id`, over its memory limit, gracefully (a reload run of one slot).
    ReplaceOverMemory(WorkerId),
    /// Add worker slot `id` (a scale) and spawn its process; the outcome goes
    /// back to [`Scale::on_launched`](crate::scale::Scale::on_launched).
    AddWorker(WorkerId),
    /// Take slot `id` out of the list (a scale removed it; its process exited).
    RemoveSlot(SlotId),
    /// Move the ready standby `key` into the agent's slot and tell it to
    /// lead at the next epoch (see [`standby`](crate::standby)).
    Promote(ProcKey),
    /// Spawn the hot standby.
    StartStandby,
    /// Answer whoever asked for a reload.
    Reply(Reply),
    /// Run `machine` again against the slots as they are now (after the
    /// actions before this one were carried out).
    Advance(Machine),
}

/// Which machine an [`Action::Advance`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Machine {
    Stop,
    Reload,
    Scale,
}

/// An answer to a reload request.
#[derive(Debug)]
pub(crate) enum Reply {
    Reload(ReloadReply, Result<ReloadReport, ReloadError>),
    AgentReload(AgentReloadReply, Result<AgentReloadReport, ReloadError>),
    Scale(ScaleReply, Result<ScaleReport, ReloadError>),
}

pub(crate) type ReloadReply = oneshot::Sender<Result<ReloadReport, ReloadError>>;
pub(crate) type AgentReloadReply = oneshot::Sender<Result<AgentReloadReport, ReloadError>>;
pub(crate) type ScaleReply = oneshot::Sender<Result<ScaleReport, ReloadError>>;

impl Reply {
    /// Sends the answer (Err: the caller gave up waiting).
    pub(crate) fn send(self) {
        match self {
            Reply::Reload(reply, result) => drop(reply.send(result)),
            Reply::AgentReload(reply, result) => drop(reply.send(result)),
            Reply::Scale(reply, result) => drop(reply.send(result)),
        }
    }
}

/// A deadline in the master's timer queue. Each names what it was armed for
/// (a process, a stop stage, a restart): a machine that moved on ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    StartDeadline(ProcKey),
    Restart {
        slot: SlotId,
        id: u64,
    },
    /// Another attempt after a spawn failed for a transient lack of resources
    /// (not a restart: not counted in the slot's restarts).
    Retry {
        slot: SlotId,
        id: u64,
    },
    StopDeadline(u64),
    /// A replaced worker's grace period is over.
    DrainDeadline(ProcKey),
    /// The agent stopped (for its memory limit, or for a reload) did not exit in time.
    AgentStopDeadline(ProcKey),
    /// The standby stopped for an agent reload did not exit in time.
    StandbyStopDeadline(ProcKey),
    /// Start the hot standby if there should be one and there is none.
    EnsureStandby,
    ReapDeadline(u64),
    EofKill(ProcKey),
    /// Prune expired requests and refill the descriptor reserve.
    Prune,
    /// Sample the children's RSS against their memory limits.
    MemorySample,
    /// Ping the processes watched for hangs.
    Ping,
}

/// A stop request's grace, in the child's `Stop` message.
pub(crate) fn grace_ms(grace: Duration) -> u64 {
    u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)
}
