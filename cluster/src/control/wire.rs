//! The control protocol: JSON lines, the requests, the answers and their limits.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};

use super::limits::{CODE_TOO_MANY_CONNECTIONS, ECHO_PREFIX, MAX_CONNECTIONS, MAX_REQUEST_LINE};
use crate::WorkerId;
use crate::status::ProcessState;

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
}

impl Response {
    pub(crate) fn ok(result: impl Serialize) -> Self {
        match serde_json::to_value(result) {
            Ok(value) => Response { ok: true, result: Some(value), error: None, code: None },
            Err(e) => Response::err(format!("could not encode the result: {e}")),
        }
    }

    pub(crate) fn err(error: impl Into<String>) -> Self {
        Response { ok: false, result: None, error: Some(error.into()), code: None }
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
            "bad request ({} bytes, starting {:?}{}): {}{}; expected {{\"cmd\":\"info|status|leader|reload|reload_agent|stop\"}}",
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
}

/// One process in the answer to `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// `master`, `agent` or `worker`.
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
    /// The agent's epoch.
    pub epoch: Option<u64>,
    /// On the agent's row: its report (for a tandem agent, the Leader's
    /// `Stats`), when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<serde_json::Value>,
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
