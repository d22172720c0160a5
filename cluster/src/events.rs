//! The master's lifecycle events, for the user's master code.

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::{ExitReason, ProcessRef, ProcessRole, StartFailure, WorkerId};

/// The `tracing` target of the master's one log line per event: filter the
/// lifecycle events alone with `RUST_LOG=warn,tandem_cluster::events=info`.
pub(crate) const LOG_TARGET: &str = "tandem_cluster::events";

/// Something that happened to the cluster.
///
/// The master logs each event once, on stderr through `tracing` (target
/// `tandem_cluster::events`), with the event's `Display` as the message: one
/// line per event (`cluster ready: master=<pid> agent=<pid> workers=<pid>,...`).
/// The routine start-up steps ([`Spawned`](Self::Spawned),
/// [`AgentReady`](Self::AgentReady), [`WorkerReady`](Self::WorkerReady)) and
/// the exits of a stop or a replacement are logged at DEBUG; an unexpected
/// exit, a restart scheduled, a memory limit and a failed reload or scale at WARN; a
/// failed start, a crash loop and a hang at ERROR; the rest at INFO.
/// [`MasterContext::events`](crate::MasterContext::events) hands the same
/// events to the master function, for it to act on (not to log them again).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClusterEvent {
    /// A process was spawned (not ready yet). `epoch` is set for the agent.
    Spawned {
        /// The process.
        process: ProcessRef,
        /// The agent's epoch.
        epoch: Option<u64>,
    },
    /// The agent reported ready.
    AgentReady {
        /// Its pid.
        pid: u32,
        /// Its epoch.
        epoch: u64,
        /// Its Leader's socket.
        socket: PathBuf,
    },
    /// A worker reported ready.
    WorkerReady {
        /// Its id.
        id: WorkerId,
        /// Its pid.
        pid: u32,
    },
    /// Every process is ready (or, for a crash-looping worker, marked failed).
    /// Sent once.
    ClusterReady {
        /// The master's pid.
        master: u32,
        /// The agent's pid.
        agent: u32,
        /// The ready workers' pids, by worker id.
        workers: Vec<u32>,
        /// The workers marked failed instead.
        failed: Vec<WorkerId>,
    },
    /// A restarted agent is ready.
    AgentRestarted {
        /// Its pid.
        pid: u32,
        /// Its epoch, higher than every earlier agent's.
        epoch: u64,
    },
    /// A restarted worker is ready.
    WorkerRestarted {
        /// Its id (the slot's).
        id: WorkerId,
        /// Its pid.
        pid: u32,
    },
    /// A process ended.
    Exited {
        /// The process.
        process: ProcessRef,
        /// How.
        exit: ExitReason,
        /// How long it had run.
        uptime: Duration,
    },
    /// A process failed to start.
    StartFailed {
        /// The process.
        process: ProcessRef,
        /// Why.
        reason: StartFailure,
    },
    /// A dead process's slot will be restarted after a delay.
    RestartScheduled {
        /// The role.
        role: ProcessRole,
        /// The worker id, for workers.
        worker_id: Option<WorkerId>,
        /// The delay.
        after: Duration,
        /// Consecutive unstable exits so far.
        failures: u32,
    },
    /// A crash-looping slot was marked failed; it is retried after `retry_after`.
    SlotFailed {
        /// The role.
        role: ProcessRole,
        /// The worker id, for workers.
        worker_id: Option<WorkerId>,
        /// Consecutive unstable exits.
        failures: u32,
        /// When the next attempt is made.
        retry_after: Duration,
    },
    /// Shutdown began (`forced`: a second signal skipped the grace periods).
    ShutdownStarted {
        /// Whether the grace periods are skipped.
        forced: bool,
    },
    /// A worker's successor is ready; the old one is draining.
    WorkerReplaced {
        /// The slot.
        id: WorkerId,
        /// The old process.
        old: u32,
        /// The new one.
        new: u32,
        /// Why.
        reason: crate::ReplaceReason,
    },
    /// A scale ([`ClusterControl::scale`](crate::ClusterControl::scale))
    /// is over: every new worker ready, every removed one exited.
    Scaled {
        /// The worker count before.
        from: u32,
        /// The worker count now.
        to: u32,
        /// The workers' pids now, by worker id.
        workers: Vec<u32>,
    },
    /// A scale failed: a new worker did not start (its slot was removed again).
    ScaleFailed {
        /// Why, in words.
        reason: String,
    },
    /// A reload began.
    ReloadStarted {
        /// The slots it will replace (ready workers), by worker id.
        workers: Vec<WorkerId>,
    },
    /// A reload replaced every ready worker.
    ReloadDone {
        /// The workers' pids after it, by worker id.
        workers: Vec<u32>,
    },
    /// A reload of the agent began: the agent `pid` is asked to stop.
    AgentReloadStarted {
        /// The agent being stopped.
        pid: u32,
        /// Its epoch.
        epoch: u64,
    },
    /// A reload of the agent is done: the new agent is ready (the workers are
    /// told of it and their Followers reconnect to its Leader).
    AgentReloaded {
        /// The agent that was stopped.
        old: u32,
        /// The new agent.
        new: u32,
        /// The new agent's epoch.
        epoch: u64,
    },
    /// A reload (of the workers or the agent) was refused, or failed (a
    /// workers' reload is then rolled back).
    ReloadFailed {
        /// Why.
        reason: String,
    },
    /// A ready process answered no ping for its hang timeout
    /// ([`Config::agent_hang_timeout`](crate::Config::agent_hang_timeout)): it
    /// was SIGKILLed, and is restarted as after a crash.
    Hung {
        /// The process.
        process: ProcessRef,
        /// How long it had not answered.
        silent_for: Duration,
    },
    /// A process's RSS exceeded its memory limit.
    MemoryLimit {
        /// The role.
        role: ProcessRole,
        /// The worker id, for workers.
        worker_id: Option<WorkerId>,
        /// The process.
        pid: u32,
        /// Its RSS in bytes.
        rss: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The hot standby ([`Config::standby`](crate::Config::standby)) mirrors
    /// the Leader: it can take over.
    StandbyReady {
        /// Its pid.
        pid: u32,
        /// The epoch of the Leader it mirrors.
        mirrors: u64,
    },
    /// The agent died (or hung and was killed): the hot standby was promoted
    /// at the next epoch instead of a cold restart. It is the agent once it
    /// reports ready ([`AgentRestarted`](Self::AgentRestarted)); a new standby
    /// is started then.
    StandbyPromoted {
        /// The standby, now the agent.
        pid: u32,
        /// The epoch it leads at.
        epoch: u64,
        /// The agent it replaces.
        replaces: u32,
    },
}

fn slot(role: ProcessRole, worker_id: Option<WorkerId>) -> String {
    match worker_id {
        Some(id) => format!("worker={id}"),
        None => role.to_string(),
    }
}

fn pids(list: &[u32]) -> String {
    list.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

impl fmt::Display for ClusterEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterEvent::Spawned { process, epoch: Some(epoch) } => write!(f, "spawned: {process} epoch={epoch}"),
            ClusterEvent::Spawned { process, epoch: None } => write!(f, "spawned: {process}"),
            ClusterEvent::AgentReady { pid, epoch, socket } => {
                write!(f, "agent ready: pid={pid} epoch={epoch} socket={}", socket.display())
            }
            ClusterEvent::WorkerReady { id, pid } => write!(f, "worker ready: worker={id} pid={pid}"),
            ClusterEvent::ClusterReady { master, agent, workers, failed } => {
                write!(f, "cluster ready: master={master} agent={agent} workers={}", pids(workers))?;
                if !failed.is_empty() {
                    write!(f, " failed={}", pids(failed))?;
                }
                Ok(())
            }
            ClusterEvent::AgentRestarted { pid, epoch } => write!(f, "agent restarted: pid={pid} epoch={epoch}"),
            ClusterEvent::WorkerRestarted { id, pid } => write!(f, "worker restarted: worker={id} pid={pid}"),
            ClusterEvent::Exited { process, exit, uptime } => {
                write!(f, "exited: {process} {exit} after {}ms", uptime.as_millis())
            }
            ClusterEvent::StartFailed { process, reason } => write!(f, "start failed: {process}: {reason}"),
            ClusterEvent::RestartScheduled { role, worker_id, after, failures } => write!(
                f,
                "restart scheduled: {} in_ms={} failures={failures}",
                slot(*role, *worker_id),
                after.as_millis()
            ),
            ClusterEvent::SlotFailed { role, worker_id, failures, retry_after } => write!(
                f,
                "slot failed: {} failures={failures} retry_in_ms={}",
                slot(*role, *worker_id),
                retry_after.as_millis()
            ),
            ClusterEvent::ShutdownStarted { forced } => write!(f, "shutdown started: forced={forced}"),
            ClusterEvent::WorkerReplaced { id, old, new, reason } => {
                write!(f, "worker replaced: worker={id} old={old} new={new} reason={reason}")
            }
            ClusterEvent::Scaled { from, to, workers } => {
                write!(f, "scaled: from={from} to={to} workers={}", pids(workers))
            }
            ClusterEvent::ScaleFailed { reason } => write!(f, "scale failed: {reason}"),
            ClusterEvent::ReloadStarted { workers } => write!(f, "reload started: slots={}", pids(workers)),
            ClusterEvent::ReloadDone { workers } => write!(f, "reload done: workers={}", pids(workers)),
            ClusterEvent::AgentReloadStarted { pid, epoch } => {
                write!(f, "agent reload started: pid={pid} epoch={epoch}")
            }
            ClusterEvent::AgentReloaded { old, new, epoch } => {
                write!(f, "agent reloaded: old={old} new={new} epoch={epoch}")
            }
            ClusterEvent::ReloadFailed { reason } => write!(f, "reload failed: {reason}"),
            ClusterEvent::Hung { process, silent_for } => {
                write!(f, "hung: {process} silent_ms={}; killed", silent_for.as_millis())
            }
            ClusterEvent::MemoryLimit { role, worker_id, pid, rss, limit } => write!(
                f,
                "memory limit: {} pid={pid} rss_mib={:.1} limit_mib={:.1}",
                slot(*role, *worker_id),
                *rss as f64 / 1_048_576.0,
                *limit as f64 / 1_048_576.0
            ),
            ClusterEvent::StandbyReady { pid, mirrors } => write!(f, "standby ready: pid={pid} mirrors={mirrors}"),
            ClusterEvent::StandbyPromoted { pid, epoch, replaces } => {
                write!(f, "standby promoted: pid={pid} epoch={epoch} replaces={replaces}")
            }
        }
    }
}

/// The cluster's events as a `Stream`. A reader that falls more than the
/// buffer (1024 events) behind misses the oldest ones (logged).
#[derive(Debug)]
pub struct ClusterEvents {
    inner: BroadcastStream<ClusterEvent>,
}

impl ClusterEvents {
    pub(crate) fn new(rx: broadcast::Receiver<ClusterEvent>) -> Self {
        ClusterEvents { inner: BroadcastStream::new(rx) }
    }

    /// The next event; `None` once the master has stopped.
    pub async fn recv(&mut self) -> Option<ClusterEvent> {
        futures::StreamExt::next(self).await
    }
}

impl Stream for ClusterEvents {
    type Item = ClusterEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClusterEvent>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(n)))) => {
                    tracing::warn!(missed = n, "cluster events reader fell behind");
                }
                Poll::Ready(Some(Ok(event))) => return Poll::Ready(Some(event)),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
