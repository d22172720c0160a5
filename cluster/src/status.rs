//! The status table: one row per process (pid, role, state, restarts, uptime,
//! RSS), printed by the master on SIGUSR1 and at exit, and available to every
//! process through [`Messenger::status`](crate::Messenger::status).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ProcessRole, WorkerId};

/// The state of a process slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ProcessState {
    /// Not started yet (workers wait for the agent).
    Pending,
    /// Spawned, not ready yet.
    Starting,
    /// Ready (for the master: running).
    Ready,
    /// Dead, waiting for its restart delay.
    BackingOff,
    /// Crash loop: waiting for a later retry.
    Failed,
    /// Asked to stop, not exited yet.
    Stopping,
    /// Exited during shutdown.
    Stopped,
}

impl ProcessState {
    /// The state's name, as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessState::Pending => "pending",
            ProcessState::Starting => "starting",
            ProcessState::Ready => "ready",
            ProcessState::BackingOff => "backing off",
            ProcessState::Failed => "failed",
            ProcessState::Stopping => "stopping",
            ProcessState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for ProcessState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the status table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRow {
    /// The role.
    pub role: ProcessRole,
    /// The worker id, for workers.
    pub worker_id: Option<WorkerId>,
    /// The current process's pid, when one is running.
    pub pid: Option<u32>,
    /// The slot's state.
    pub state: ProcessState,
    /// How many times the slot was restarted.
    pub restarts: u32,
    /// How long the current process has been running.
    pub uptime: Option<Duration>,
    /// Its resident set size in bytes, from `/proc/<pid>/statm`.
    pub rss_bytes: Option<u64>,
    /// The agent's epoch.
    pub epoch: Option<u64>,
}

/// The cluster's status, master first, then the agent, then workers by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusTable {
    /// The rows.
    pub rows: Vec<StatusRow>,
}

impl fmt::Display for StatusTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<10} {:>8} {:<12} {:>8} {:>10} {:>10} {:>5}",
            "process", "pid", "state", "restarts", "uptime", "rss", "epoch"
        )?;
        for row in &self.rows {
            let name = match row.worker_id {
                Some(id) => format!("worker {id}"),
                None => row.role.to_string(),
            };
            let pid = row.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
            let uptime = row.uptime.map_or_else(|| "-".to_owned(), |u| format!("{:.1}s", u.as_secs_f64()));
            let rss = row.rss_bytes.map_or_else(|| "-".to_owned(), |b| format!("{:.1}MiB", b as f64 / 1_048_576.0));
            let epoch = row.epoch.map_or_else(|| "-".to_owned(), |e| e.to_string());
            writeln!(
                f,
                "{name:<10} {pid:>8} {:<12} {:>8} {uptime:>10} {rss:>10} {epoch:>5}",
                row.state.as_str(),
                row.restarts
            )?;
        }
        Ok(())
    }
}

/// The resident set size of a process: the second field of `/proc/<pid>/statm`
/// (in pages) times the page size. `None` when it cannot be read.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten()?;
    Some(pages * u64::try_from(page).ok()?)
}

/// The CPU time (user + system) a process has used, in seconds: fields 14
/// and 15 of `/proc/<pid>/stat` (in clock ticks) over `sysconf(_SC_CLK_TCK)`.
/// `None` when it cannot be read.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count
    // the fields after its closing parenthesis (field 3, the state, is first).
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten()?;
    if tick <= 0 {
        return None;
    }
    Some((utime + stime) as f64 / tick as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_cpu_time() {
        let before = cpu_seconds(std::process::id()).expect("own stat");
        // Burn some CPU: the counter must move (clock ticks are 10 ms).
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = cpu_seconds(std::process::id()).expect("own stat");
        assert!(after > before, "{before} -> {after}");
        assert!(cpu_seconds(u32::MAX).is_none());
    }

    #[test]
    fn reads_this_process_rss() {
        let rss = rss_bytes(std::process::id()).expect("own statm");
        assert!(rss > 100 * 1024, "{rss}");
    }

    #[test]
    fn prints_one_line_per_process() {
        let table = StatusTable {
            rows: vec![
                StatusRow {
                    role: ProcessRole::Master,
                    worker_id: None,
                    pid: Some(10),
                    state: ProcessState::Ready,
                    restarts: 0,
                    uptime: Some(Duration::from_secs(3)),
                    rss_bytes: Some(2 * 1_048_576),
                    epoch: None,
                },
                StatusRow {
                    role: ProcessRole::Worker,
                    worker_id: Some(2),
                    pid: None,
                    state: ProcessState::BackingOff,
                    restarts: 4,
                    uptime: None,
                    rss_bytes: None,
                    epoch: None,
                },
            ],
        };
        let text = table.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("master") && lines[1].contains("ready") && lines[1].contains("2.0MiB"));
        assert!(lines[2].starts_with("worker 2") && lines[2].contains("backing off") && lines[2].contains(" 4 "));
    }
}
