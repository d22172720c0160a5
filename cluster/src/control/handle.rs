//! How the control socket and the metrics endpoint reach the master's
//! loop ([`MasterHandle`]), and what they read of it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::limits::{AGENT_STATS_DEADLINE, AGENT_STATS_TOPIC};
use super::wire::{ClusterInfo, ProcessInfo, state_name};
use crate::reload_handle::{AgentReloadReport, ReloadError, ReloadReport, ScaleReport, ScaleTo};
use crate::status::{ProcessState, StatusTable, cpu_seconds};
use crate::{Messenger, ProcessRole, Target};

// ---- the master side ---------------------------------------------------------

/// What the control socket and the metrics ask of the master's loop.
#[derive(Debug)]
pub(crate) enum OpsCall {
    Snapshot(oneshot::Sender<Snapshot>),
    /// Start a graceful stop; answer with every pid.
    Stop(oneshot::Sender<Vec<u32>>),
}

/// The master's state, as the control socket and the metrics see it.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub name: String,
    pub pid: u32,
    pub uptime: Duration,
    pub stopping: bool,
    pub announced: bool,
    pub table: StatusTable,
    /// The worker count asked for last (by the configuration, or a scale).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))] // read by `/metrics`
    pub workers_desired: u32,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))] // read by `/metrics`
    pub messages: crate::router::MessageCounts,
}

/// Counters kept outside the master's loop.
#[derive(Debug, Default)]
pub(crate) struct ControlStats {
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Scales that changed the worker count, up and down.
    pub scales_up: AtomicU64,
    pub scales_down: AtomicU64,
    /// Restarts asked for (`tandem restart`), of a worker and of the agent.
    pub restarts_worker: AtomicU64,
    pub restarts_agent: AtomicU64,
    /// The capture of the children's output, when the cluster has a log directory.
    pub logs: Option<crate::logs::Logs>,
    /// Hot standbys promoted to agent (see `standby`).
    pub standby_promotions: AtomicU64,
    /// The previous CPU sample per pid, for CPU % between samples.
    cpu_samples: std::sync::Mutex<HashMap<u32, (f64, Instant)>>,
}

impl ControlStats {
    pub(crate) fn with_logs(logs: Option<crate::logs::Logs>) -> ControlStats {
        ControlStats { logs, ..ControlStats::default() }
    }

    pub(crate) fn count_scale(&self, direction: crate::scale::Direction) {
        let counter = match direction {
            crate::scale::Direction::Up => &self.scales_up,
            crate::scale::Direction::Down => &self.scales_down,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn count_restart(&self, role: ProcessRole) {
        let counter = if role == ProcessRole::Agent { &self.restarts_agent } else { &self.restarts_worker };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How the control socket and the metrics endpoint reach the master.
#[derive(Debug, Clone)]
pub(crate) struct MasterHandle {
    pub calls: mpsc::Sender<OpsCall>,
    /// The master's rolling reload (SIGHUP does the same).
    pub reload: crate::reload_handle::ClusterControl,
    pub messenger: Messenger,
    pub stats: Arc<ControlStats>,
}

pub(crate) const MASTER_GONE: &str = "the master is stopping";

impl MasterHandle {
    pub(crate) async fn snapshot(&self) -> Result<Snapshot, String> {
        let (tx, rx) = oneshot::channel();
        self.calls.send(OpsCall::Snapshot(tx)).await.map_err(|_| MASTER_GONE.to_owned())?;
        rx.await.map_err(|_| MASTER_GONE.to_owned())
    }

    /// The agent's report, `None` when it does not answer.
    pub(crate) async fn agent_stats(&self) -> Option<serde_json::Value> {
        match self.messenger.request(Target::Agent, AGENT_STATS_TOPIC, "", AGENT_STATS_DEADLINE).await {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(value) => Some(value),
                Err(e) => {
                    tracing::debug!(error = %e, "the agent's report is not JSON");
                    None
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "no report from the agent");
                None
            }
        }
    }

    pub(crate) fn info(snapshot: &Snapshot) -> ClusterInfo {
        let workers: Vec<_> = snapshot.table.rows.iter().filter(|r| r.role == ProcessRole::Worker).collect();
        ClusterInfo {
            name: snapshot.name.clone(),
            pid: snapshot.pid,
            uptime_ms: millis(snapshot.uptime),
            workers: workers.len(),
            workers_online: workers.iter().filter(|r| r.state == ProcessState::Ready).count(),
            state: if snapshot.stopping {
                "stopping"
            } else if snapshot.announced {
                "online"
            } else {
                "starting"
            }
            .to_owned(),
            log_dir: None,
        }
    }

    /// One [`ProcessInfo`] per row, with CPU use since the previous sample.
    pub(crate) fn processes(&self, snapshot: &Snapshot, leader: Option<serde_json::Value>) -> Vec<ProcessInfo> {
        let now = Instant::now();
        let max_percent = crate::status::max_cpu_percent();
        let mut samples = self.stats.cpu_samples.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = Vec::new();
        let mut leader = leader;
        let rows = snapshot
            .table
            .rows
            .iter()
            .map(|row| {
                let cpu = row.pid.and_then(cpu_seconds);
                let cpu_percent = match (row.pid, cpu) {
                    (Some(pid), Some(cpu)) => {
                        seen.push(pid);
                        let percent = match samples.get(&pid) {
                            Some(&(before, at)) if now.duration_since(at) >= Duration::from_millis(100) => {
                                Some((cpu - before).max(0.0) / now.duration_since(at).as_secs_f64() * 100.0)
                            }
                            _ => crate::status::lifetime_cpu_percent(pid, cpu),
                        };
                        let percent = percent.map(|p| p.min(max_percent));
                        if samples.get(&pid).is_none_or(|&(_, at)| now.duration_since(at) >= Duration::from_millis(100))
                        {
                            samples.insert(pid, (cpu, now));
                        }
                        percent
                    }
                    _ => None,
                };
                ProcessInfo {
                    role: row.role.to_string(),
                    slot: row.worker_id,
                    pid: row.pid,
                    state: state_name(row.state).to_owned(),
                    restarts: row.restarts,
                    uptime_ms: row.uptime.map(millis),
                    cpu_percent: cpu_percent.map(|p| (p * 10.0).round() / 10.0),
                    cpu_seconds: cpu,
                    rss_bytes: row.rss_bytes,
                    epoch: row.epoch,
                    last_exit: row.last_exit.map(super::wire::short_exit),
                    leader: if row.role == ProcessRole::Agent { leader.take() } else { None },
                }
            })
            .collect();
        samples.retain(|pid, _| seen.contains(pid));
        rows
    }
}

/// The rolling reload, as SIGHUP runs it (`ClusterControl::reload`): each
/// worker slot is replaced by a successor that must be ready before its
/// predecessor drains; a failure rolls back and keeps the old workers. One
/// reload at a time: a second request is refused, not queued.
pub(crate) async fn reload_workers(handle: &MasterHandle) -> Result<ReloadReport, ReloadError> {
    // The master counts reloads (`reloads_ok`/`reloads_failed`) as they end.
    handle.reload.reload().await
}

/// The agent's reload (`ClusterControl::reload_agent`): the old agent stops,
/// a new one starts with a higher epoch, the workers fail over to it.
pub(crate) async fn reload_agent(handle: &MasterHandle) -> Result<AgentReloadReport, ReloadError> {
    handle.reload.reload_agent().await
}

/// A change of the worker count (`ClusterControl::scale`).
pub(crate) async fn scale(handle: &MasterHandle, to: ScaleTo) -> Result<ScaleReport, ReloadError> {
    handle.reload.scale(to).await
}

/// A graceful restart of one worker (`ClusterControl::restart_worker`).
pub(crate) async fn restart_worker(handle: &MasterHandle, id: crate::WorkerId) -> Result<ReloadReport, ReloadError> {
    handle.reload.restart_worker(id).await
}

/// A graceful restart of the agent (`ClusterControl::restart_agent`).
pub(crate) async fn restart_agent(handle: &MasterHandle) -> Result<AgentReloadReport, ReloadError> {
    handle.reload.restart_agent().await
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
