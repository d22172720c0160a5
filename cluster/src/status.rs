//! The status table: one row per process (role, slot, pid, state, restarts,
//! uptime, CPU, RSS, last exit), printed by the master on SIGUSR1 and at exit,
//! shown by `tandem status`, and available to every process through
//! [`Messenger::status`](crate::Messenger::status).
//!
//! [`ProcessInfo::table`] is the one text form of it: the master's table (on
//! SIGUSR1 and at every stop) and `tandem status` print the same columns
//! under the same headings.
//!
//! ```text
//! ROLE   SLOT      PID STATE           RESTARTS  UPTIME  CPU%     RSS LAST EXIT
//! master    -    16893 stopping               0      7s   0.4   16.8M -
//! agent     -        - stopped                1       -     -       - code 0
//! worker    1        - stopped                2       -     -       - code 0
//! ```

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::ProcessInfo;
use crate::{ExitReason, ProcessRole, WorkerId};

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
    /// How the slot's last process ended (at a stop: how this one did).
    #[serde(default)]
    pub last_exit: Option<ExitReason>,
}

/// The cluster's status, master first, then the agent, then workers by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusTable {
    /// The rows.
    pub rows: Vec<StatusRow>,
}

/// The master's table (SIGUSR1, every stop), in the one text form
/// `tandem status` prints too: [`ProcessInfo::table`].
impl fmt::Display for StatusTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        ProcessInfo::table(&self.processes()).fmt(f)
    }
}

/// The resident set size of a child with its descendants (see
/// [`proc_tree`](crate::proc_tree)), the master's of itself.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    crate::proc_tree::sum(pid, own_rss_bytes)
}

/// The CPU time of a child with its descendants, the master's of itself.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    crate::proc_tree::sum(pid, own_cpu_seconds)
}

/// The resident set size of a process: the second field of `/proc/<pid>/statm`
/// (in pages) times the page size. `None` when it cannot be read.
fn own_rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten()?;
    Some(pages * u64::try_from(page).ok()?)
}

/// The CPU time (user + system) a process has used, in seconds: fields 14
/// and 15 of `/proc/<pid>/stat` (in clock ticks) over `sysconf(_SC_CLK_TCK)`.
/// `None` when it cannot be read.
fn own_cpu_seconds(pid: u32) -> Option<f64> {
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

/// How long a process has existed, in seconds: `/proc/uptime` minus its start
/// time (field 22 of `/proc/<pid>/stat`, in clock ticks after boot). `None`
/// when it cannot be read.
pub(crate) fn process_age(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 22 is the 20th after the command name (field 3 is the first).
    let start: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse().ok()?;
    (tick > 0).then(|| (uptime - start as f64 / tick as f64).max(0.0))
}

/// The most CPU % a process can use: every CPU this machine lets it run on.
pub(crate) fn max_cpu_percent() -> f64 {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64 * 100.0
}

/// A process's CPU use averaged over its life: its CPU time over its own age
/// (not its slot's uptime, which starts later than its CPU time), at most
/// [`max_cpu_percent`].
pub(crate) fn lifetime_cpu_percent(pid: u32, cpu_seconds: f64) -> Option<f64> {
    let age = process_age(pid).filter(|age| *age > 0.0)?;
    Some((cpu_seconds / age * 100.0).min(max_cpu_percent()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_age_is_read_and_grows() {
        let age = process_age(std::process::id()).expect("own stat");
        assert!((0.0..86_400.0 * 365.0).contains(&age), "{age}");
        assert!(process_age(u32::MAX).is_none());
    }

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

    fn row(role: ProcessRole, worker_id: Option<WorkerId>, state: ProcessState) -> StatusRow {
        StatusRow {
            role,
            worker_id,
            pid: None,
            state,
            restarts: 0,
            uptime: None,
            rss_bytes: None,
            epoch: None,
            last_exit: None,
        }
    }

    #[test]
    fn the_table_has_one_heading_and_one_aligned_line_per_process_within_80_columns() {
        let master = StatusRow {
            pid: Some(4_194_303),
            uptime: Some(Duration::from_secs(3 * 86400 + 5 * 3600)),
            rss_bytes: Some(16 * 1_048_576 + 838_861),
            ..row(ProcessRole::Master, None, ProcessState::Stopping)
        };
        let agent = StatusRow {
            restarts: 1,
            last_exit: Some(ExitReason::Code(0)),
            ..row(ProcessRole::Agent, None, ProcessState::Stopped)
        };
        let worker = StatusRow {
            restarts: 12,
            last_exit: Some(ExitReason::Signal(9)),
            ..row(ProcessRole::Worker, Some(2), ProcessState::BackingOff)
        };
        let table = StatusTable { rows: vec![master, agent, worker] };
        let text = table.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "ROLE   SLOT      PID STATE           RESTARTS  UPTIME  CPU%     RSS LAST EXIT",
                "master    -  4194303 stopping               0   3d05h     -   16.8M -",
                "agent     -        - stopped                1       -     -       - code 0",
                "worker    2        - waiting-restart       12       -     -       - SIGKILL",
            ]
        );
        assert_eq!(lines[0], ProcessInfo::TABLE_HEADER);
        assert!(lines.iter().all(|l| l.len() <= 80), "{text}");
        // The state column starts where its heading does on every line.
        let at = ProcessInfo::TABLE_HEADER.find("STATE").unwrap();
        assert_eq!(&lines[3][at..at + 15], "waiting-restart");
    }

    #[test]
    fn the_standby_row_keeps_the_columns_aligned_and_shows_the_epoch_it_mirrors() {
        let standby = StatusRow {
            pid: Some(24470),
            restarts: 1,
            epoch: Some(2),
            ..row(ProcessRole::Standby, None, ProcessState::Ready)
        };
        let starting = row(ProcessRole::Standby, None, ProcessState::Starting);
        let agent =
            StatusRow { pid: Some(24211), epoch: Some(2), ..row(ProcessRole::Agent, None, ProcessState::Ready) };
        let text = StatusTable { rows: vec![agent, standby, starting] }.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1..],
            [
                "agent     -    24211 online                 0       -     -       - -",
                "standby   -    24470 online e2              1       -     -       - -",
                "standby   -        - starting               0       -     -       - -",
            ]
        );
        let at = ProcessInfo::TABLE_HEADER.find("PID").unwrap();
        assert_eq!(&lines[2][at - 2..at + 3], "24470");
    }

    #[test]
    fn the_status_answer_and_the_masters_table_render_alike() {
        let table = StatusTable {
            rows: vec![StatusRow {
                pid: Some(12),
                restarts: 3,
                uptime: Some(Duration::from_millis(187_000)),
                rss_bytes: Some(3500),
                last_exit: Some(ExitReason::Signal(64)),
                ..row(ProcessRole::Worker, Some(1), ProcessState::Ready)
            }],
        };
        let info = table.processes();
        assert_eq!(info[0].state, "online");
        assert_eq!(info[0].last_exit.as_deref(), Some("signal 64"));
        // The pid does not exist: no CPU to read, as `status` would show it.
        assert_eq!(ProcessInfo::table(&info).to_string(), table.to_string());
        assert_eq!(
            table.to_string().lines().nth(1),
            Some("worker    1       12 online                 3   3m07s     -    3.4K signal 64")
        );
    }
}
