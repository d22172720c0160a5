//! The control protocol: JSON lines, the requests, the answers and their limits.

use std::fmt;
use std::io::{self, Write};

use serde::{Deserialize, Deserializer, Serialize};

use super::limits::{CODE_TOO_MANY_CONNECTIONS, ECHO_PREFIX, MAX_CONNECTIONS, MAX_REQUEST_LINE};
use crate::status::{ProcessState, StatusRow, StatusTable, cpu_seconds};
use crate::{ExitReason, ReloadError, ScaleTo, WorkerId};

// ---- the protocol ------------------------------------------------------------

/// A request on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// The cluster in one line: [`ClusterInfo`].
    Info,
    /// One [`ProcessInfo`] per process.
    Status,
    /// The agent's report (for a tandem agent, the Leader's introspection).
    Leader,
    /// Replace the workers one by one, each after its successor is ready: [`ReloadReport`](crate::ReloadReport).
    Reload,
    /// Replace the agent (stop it, start a new one with a higher epoch; the
    /// workers fail over to its Leader): [`AgentReloadReport`](crate::AgentReloadReport).
    ReloadAgent,
    /// Stop gracefully: [`StopReport`].
    Stop,
    /// Change the worker count (`{"cmd":"scale","workers":{"to":4}}`,
    /// `{"add":2}`, `{"remove":2}`): [`ScaleReport`](crate::ScaleReport).
    Scale {
        /// The change.
        workers: ScaleTo,
    },
    /// Restart one worker gracefully, its successor ready before it drains
    /// (`{"cmd":"restart","worker":2}`): [`ReloadReport`](crate::ReloadReport).
    Restart {
        /// The worker id.
        worker: WorkerId,
    },
    /// Restart the agent gracefully (as [`ReloadAgent`](Self::ReloadAgent),
    /// counted as a restart asked for): [`AgentReloadReport`](crate::AgentReloadReport).
    RestartAgent,
}

/// One response line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the command succeeded.
    pub ok: bool,
    /// Its result, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A stable code for failures a client handles on its own: only
    /// [`CODE_TOO_MANY_CONNECTIONS`] so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Why a `reload`, `reload_agent`, `scale`, `restart` or `restart_agent` failed, typed ([`error`](Self::error)
    /// holds the same in words, for clients that read only that). `None`
    /// otherwise, and when the error is one this client does not know (a
    /// newer master's): it then reads [`error`](Self::error) alone.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "known_reload_error")]
    pub reload_error: Option<ReloadError>,
}

/// A `reload_error` this client knows, or `None` (a newer master's kind, or
/// a shape that does not read): the answer is still read, with its `error` text.
fn known_reload_error<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ReloadError>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(value.and_then(|v| match serde_json::from_value(v) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::debug!(error = %e, "a reload error of a kind this client does not know; read as text");
            None
        }
    }))
}

impl Response {
    pub(crate) fn ok(result: impl Serialize) -> Self {
        match serde_json::to_value(result) {
            Ok(value) => Response { ok: true, result: Some(value), error: None, code: None, reload_error: None },
            Err(e) => Response::err(format!("could not encode the result: {e}")),
        }
    }

    pub(crate) fn err(error: impl Into<String>) -> Self {
        Response { ok: false, result: None, error: Some(error.into()), code: None, reload_error: None }
    }

    /// The answer to a failed `reload` or `reload_agent`: the error in words,
    /// and typed. An error that cannot be written as JSON (an executable path
    /// that is not UTF-8) goes in words only.
    pub(crate) fn reload_failed(e: ReloadError) -> Self {
        let error = e.to_string();
        let reload_error = match serde_json::to_value(&e) {
            Ok(_) => Some(e),
            Err(why) => {
                tracing::warn!(error = %why, reload.error = %error, "a reload error could not be encoded; answered in words only");
                None
            }
        };
        Response { reload_error, ..Response::err(error) }
    }

    /// The refusal a connection over [`MAX_CONNECTIONS`] gets.
    pub(crate) fn too_many_connections() -> Self {
        Response {
            code: Some(CODE_TOO_MANY_CONNECTIONS.to_owned()),
            ..Response::err(format!(
                "the master is serving its limit of {MAX_CONNECTIONS} control connections; try again"
            ))
        }
    }

    /// The answer to a line that is not a request: its length, its first
    /// [`ECHO_PREFIX`] bytes and the parser's complaint (cut short too, as it
    /// may quote the line), so that it stays small whatever the line.
    pub(crate) fn bad_request(line: &str, error: &serde_json::Error) -> Self {
        let why = error.to_string();
        Response::err(format!(
            "bad request ({} bytes, starting {:?}{}): {}{}; expected {{\"cmd\":\"info|status|leader|reload|reload_agent|scale|restart|restart_agent|stop\"}}",
            line.len(),
            cut(line, ECHO_PREFIX),
            if line.len() > ECHO_PREFIX { "..." } else { "" },
            cut(&why, 2 * ECHO_PREFIX),
            if why.len() > 2 * ECHO_PREFIX { "..." } else { "" },
        ))
    }

    /// The answer to a request line over [`MAX_REQUEST_LINE`]: `start` is
    /// what was read of it.
    pub(crate) fn line_too_long(start: &[u8]) -> Self {
        let start = String::from_utf8_lossy(&start[..start.len().min(ECHO_PREFIX)]);
        Response::err(format!(
            "bad request: the line is longer than {MAX_REQUEST_LINE} bytes (the limit), starting {:?}...",
            cut(&start, ECHO_PREFIX)
        ))
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub(crate) fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A [`Write`] that keeps at most `limit` bytes and counts the rest: an
/// answer over the limit is measured without being held.
#[derive(Debug)]
pub(crate) struct Capped {
    kept: Vec<u8>,
    limit: usize,
    len: usize,
}

impl Write for Capped {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.len += bytes.len();
        if self.len <= self.limit {
            self.kept.extend_from_slice(bytes);
        } else {
            self.kept = Vec::new();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One answer line of at most `limit` bytes: `response`, or an error saying
/// how large it was.
pub(crate) fn encode_reply(response: &Response, limit: usize) -> String {
    const FALLBACK: &str = r#"{"ok":false,"error":"the master could not encode its answer"}"#;
    let mut out = Capped { kept: Vec::new(), limit, len: 0 };
    if let Err(e) = serde_json::to_writer(&mut out, response) {
        tracing::warn!(error = %e, "could not encode a control answer");
        return FALLBACK.to_owned();
    }
    if out.len <= limit {
        // serde_json writes UTF-8.
        return String::from_utf8(out.kept).unwrap_or_else(|_| FALLBACK.to_owned());
    }
    tracing::warn!(bytes = out.len, limit, "a control answer is over the line limit; answered with an error instead");
    let error = Response::err(format!("the answer is {} bytes, over the control socket's limit of {limit}", out.len));
    serde_json::to_string(&error).unwrap_or_else(|_| FALLBACK.to_owned())
}

/// The answer to `info`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The cluster's name.
    pub name: String,
    /// The master's pid.
    pub pid: u32,
    /// How long the master has run, in milliseconds.
    pub uptime_ms: u64,
    /// Worker slots.
    pub workers: usize,
    /// Workers ready now.
    pub workers_online: usize,
    /// `starting` (until the first cluster-ready), `online` or `stopping`.
    pub state: String,
    /// Where the children's log files are (`<log_dir>/<name>`), when the
    /// cluster captures them (`Config::log_dir`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_dir: Option<std::path::PathBuf>,
}

/// One process in the answer to `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// `master`, `agent`, `worker` or `standby` (the agent's hot standby).
    pub role: String,
    /// The worker id, for workers.
    pub slot: Option<WorkerId>,
    /// The current process's pid, when one runs.
    pub pid: Option<u32>,
    /// `starting`, `online`, `stopping`, `waiting-restart`, `failed`, `pending` or `stopped`.
    pub state: String,
    /// Processes started in this slot after the first one (crashes and reloads).
    pub restarts: u32,
    /// How long the current process has run, in milliseconds.
    pub uptime_ms: Option<u64>,
    /// CPU use in percent of one core: since the previous `status` or scrape
    /// (at least 100 ms before), else averaged over the process's life.
    pub cpu_percent: Option<f64>,
    /// CPU time used (user + system), in seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, in bytes.
    pub rss_bytes: Option<u64>,
    /// The agent's epoch; on the standby's row, the epoch of the Leader it mirrors (once ready).
    pub epoch: Option<u64>,
    /// How the slot's last process ended: `code <n>`, a signal's name
    /// (`SIGKILL`; `signal <n>` when it has none) or `unknown`. `None` while
    /// no process of the slot has ended.
    #[serde(default)]
    pub last_exit: Option<String>,
    /// On the agent's row: its report (for a tandem agent, the Leader's
    /// `Stats`), when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<serde_json::Value>,
}

impl ProcessInfo {
    /// The heading line of [`table`](Self::table), without its newline.
    pub const TABLE_HEADER: &'static str =
        "ROLE   SLOT      PID STATE           RESTARTS  UPTIME  CPU%     RSS LAST EXIT";

    /// The one text form of the status table, at most 80 columns wide: the
    /// [heading](Self::TABLE_HEADER), then one line per process. The master
    /// prints it on SIGUSR1 and at every stop
    /// ([`StatusTable`]'s `Display`); `tandem status NAME` prints it from the
    /// control socket's answer.
    ///
    /// | column | what |
    /// |---|---|
    /// | `ROLE` | `master`, `agent` or `worker` |
    /// | `SLOT` | the worker id (`-` for the others) |
    /// | `PID` | the running process (`-`: none) |
    /// | `STATE` | as [`state`](Self::state) |
    /// | `RESTARTS` | processes started in the slot after the first (crashes and reloads) |
    /// | `UPTIME` | of the running process: `42s`, `3m07s`, `5h02m`, `2d04h` |
    /// | `CPU%` | of one core |
    /// | `RSS` | resident memory: `512B`, `3.4K`, `16.8M`, `1.25G` |
    /// | `LAST EXIT` | as [`last_exit`](Self::last_exit); `-` when no process of the slot has ended |
    ///
    /// ```text
    /// ROLE   SLOT      PID STATE           RESTARTS  UPTIME  CPU%     RSS LAST EXIT
    /// master    -    16893 stopping               0      7s   0.4   16.8M -
    /// agent     -        - stopped                1       -     -       - code 0
    /// worker    1        - stopped                2       -     -       - code 0
    /// ```
    ///
    /// A hot standby (`Config::standby`) shows as role `standby`, its state
    /// followed by the epoch of the Leader it mirrors (`online e3`).
    pub fn table(rows: &[ProcessInfo]) -> impl fmt::Display + '_ {
        ProcessTable(rows)
    }
}

/// [`ProcessInfo::table`].
struct ProcessTable<'a>(&'a [ProcessInfo]);

impl fmt::Display for ProcessTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", ProcessInfo::TABLE_HEADER)?;
        let dash = || "-".to_owned();
        for r in self.0 {
            let slot = r.slot.map_or_else(dash, |s| s.to_string());
            // `standby` is one letter wider than the role column: its slot column gives it back.
            let role_slot = match r.role.len() {
                ..=6 => format!("{:<6} {slot:>4}", r.role),
                _ => format!("{} {slot:>3}", r.role),
            };
            // The standby's state says which Leader's epoch it mirrors: `online e3`.
            let state = match r.epoch {
                Some(epoch) if r.role == crate::ProcessRole::Standby.as_str() => format!("{} e{epoch}", r.state),
                _ => r.state.clone(),
            };
            writeln!(
                f,
                "{} {:>8} {:<15} {:>8} {:>7} {:>5} {:>7} {}",
                role_slot,
                r.pid.map_or_else(dash, |p| p.to_string()),
                state,
                r.restarts,
                r.uptime_ms.map_or_else(dash, duration),
                r.cpu_percent.map_or_else(dash, |c| format!("{c:.1}")),
                r.rss_bytes.map_or_else(dash, bytes),
                r.last_exit.as_deref().unwrap_or("-"),
            )?;
        }
        Ok(())
    }
}

impl StatusTable {
    /// The rows as the control socket's `status` gives them, with each
    /// process's CPU use averaged over its life (read from `/proc` now).
    pub fn processes(&self) -> Vec<ProcessInfo> {
        self.rows.iter().map(StatusRow::process_info).collect()
    }
}

impl StatusRow {
    /// This row as the control socket's `status` gives it, with the CPU use
    /// averaged over the process's life (read from `/proc` now).
    pub fn process_info(&self) -> ProcessInfo {
        let cpu = self.pid.and_then(cpu_seconds);
        let cpu_percent = self.pid.zip(cpu).and_then(|(pid, cpu)| crate::status::lifetime_cpu_percent(pid, cpu));
        ProcessInfo {
            role: self.role.to_string(),
            slot: self.worker_id,
            pid: self.pid,
            state: state_name(self.state).to_owned(),
            restarts: self.restarts,
            uptime_ms: self.uptime.map(|u| u64::try_from(u.as_millis()).unwrap_or(u64::MAX)),
            cpu_percent: cpu_percent.map(|p| (p * 10.0).round() / 10.0),
            cpu_seconds: cpu,
            rss_bytes: self.rss_bytes,
            epoch: self.epoch,
            last_exit: self.last_exit.map(short_exit),
            leader: None,
        }
    }
}

/// An exit, short: `code 0`, `SIGKILL` (`signal 64` when the signal has no name), `unknown`.
pub(crate) fn short_exit(exit: ExitReason) -> String {
    match exit {
        ExitReason::Code(code) => format!("code {code}"),
        ExitReason::Signal(sig) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(name) => name.to_string(),
            Err(_) => format!("signal {sig}"),
        },
        _ => "unknown".to_owned(),
    }
}

/// A duration in milliseconds, in two units at most: `42s`, `3m07s`, `5h02m`, `2d04h`.
fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// A size in bytes, in one unit: `512B`, `3.4K`, `16.8M`, `1.25G`.
fn bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n}B"),
        1024..1_048_576 => format!("{:.1}K", n as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1}M", n as f64 / 1_048_576.0),
        _ => format!("{:.2}G", n as f64 / 1_073_741_824.0),
    }
}

/// The answer to `stop`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StopReport {
    /// Every process of the cluster (master included) at the time of the request.
    pub pids: Vec<u32>,
}

/// The state names the control socket and the metrics use.
pub(crate) fn state_name(state: ProcessState) -> &'static str {
    match state {
        ProcessState::Pending => "pending",
        ProcessState::Starting => "starting",
        ProcessState::Ready => "online",
        ProcessState::BackingOff => "waiting-restart",
        ProcessState::Failed => "failed",
        ProcessState::Stopping => "stopping",
        ProcessState::Stopped => "stopped",
    }
}

#[cfg(test)]
mod table_tests {
    use super::*;

    #[test]
    fn exits_sizes_and_durations_are_short() {
        assert_eq!(short_exit(ExitReason::Code(3)), "code 3");
        assert_eq!(short_exit(ExitReason::Signal(15)), "SIGTERM");
        assert_eq!(short_exit(ExitReason::Signal(64)), "signal 64");
        assert_eq!(short_exit(ExitReason::Unknown), "unknown");
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(5 * 1_073_741_824 / 4), "1.25G");
        assert_eq!(duration(59_999), "59s");
        assert_eq!(duration(5 * 3_600_000 + 120_000), "5h02m");
    }
}
