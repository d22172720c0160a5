//! `tandem`: find, inspect and act on the running tandem clusters of this user,
//! through each master's control socket (see `tandem_cluster::control`).
//!
//! ```text
//! tandem ls                    # name, master pid, uptime, workers, state (or not answering)
//! tandem status NAME [--json]  # one row per process, like `pm2 ls`
//! tandem leader NAME [--json]  # the Leader's channels, keys, followers
//! tandem reload NAME           # replace the workers one by one (exit 1 on failure)
//! tandem reload NAME --agent   # replace the agent: its Leader fails over to a new one
//! tandem scale NAME 4|+2|-2     # change the worker count: new ones ready, removed ones drained
//! tandem restart NAME --worker 2  # replace one worker: its successor ready first, then it drains
//! tandem restart NAME --agent     # replace the agent (as `reload --agent`)
//! tandem stop NAME             # graceful stop; returns when every process is gone
//! tandem monit NAME            # a live view: processes, the Leader's rates; reload keys
//! tandem logs NAME [--worker K|--agent] [--lines N] [--follow]  # the children's log files
//! tandem run [OPTIONS] -- PROGRAM [ARGS]   # any program as the workers (docs/run.md)
//! ```
//!
//! Exit codes: see [`EXIT_CODES`].

#[path = "tandem/logs.rs"]
mod logs;
#[path = "tandem/monit.rs"]
mod monit;
#[path = "tandem/run/mod.rs"]
mod run;

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::Value;
use tandem::cluster::control::{
    self, AgentReloadReport, ControlClient, ControlError, Listed, ProcessInfo, ReloadReport, Request, StopReport,
};
use tandem::cluster::{ScaleReport, ScaleTo};

/// `print!` that ignores a closed stdout (`tandem status X | head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

macro_rules! outln {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// The exit codes, as `tandem --help` shows them.
const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  failed: no such cluster, its master not answering, another user's
     cluster, a reload, scale or restart refused or failed (a workers'
     reload is rolled back; a new worker of a scale that fails is removed),
     a stop timed out
  2  bad command line
  3  the master is serving its limit of control connections: try again";

/// Exit code 3: the master refused the connection at its limit.
const EXIT_BUSY: u8 = 3;

#[derive(Parser, Debug)]
#[command(name = "tandem", about = "Operate the tandem clusters of this user", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The running clusters: name, master pid, uptime, workers, state.
    ///
    /// Every master is asked at once; one that gives no answer within 2 s is
    /// listed as `not answering` (`busy` when it is serving its limit of
    /// control connections), with the pid from its pid file.
    Ls {
        /// JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One row per process: role, slot, pid, state, restarts, uptime, CPU, RSS,
    /// last exit (the table the master prints at every stop).
    Status {
        /// The cluster's name (see `tandem ls`).
        name: String,
        /// JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The Leader's introspection: channels, keys, subscribers, followers.
    Leader {
        /// The cluster's name.
        name: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replace the workers one at a time, each after its successor is ready
    /// (with --agent: replace the agent instead).
    Reload {
        /// The cluster's name.
        name: String,
        /// Reload the agent, not the workers: it is stopped, a new one starts
        /// with a higher epoch, and the workers' Followers fail over to its
        /// Leader. The workers keep running.
        #[arg(long)]
        agent: bool,
    },
    /// Change the worker count while running: new workers (ids after the
    /// highest) count once ready; removed ones, the highest ids first, are
    /// stopped gracefully (their grace period, then SIGKILL). Returns when
    /// all are ready or gone. From 1 to 1024 workers.
    Scale {
        /// The cluster's name.
        name: String,
        /// N (to N workers), +K (K more) or -K (K fewer).
        #[arg(allow_hyphen_values = true, value_name = "N|+K|-K")]
        count: ScaleTo,
    },
    /// Restart one process gracefully: a worker's successor is ready before
    /// it drains; the agent is replaced as `reload --agent` does.
    #[command(group = clap::ArgGroup::new("which").required(true).args(["worker", "agent"]))]
    Restart {
        /// The cluster's name.
        name: String,
        /// The worker id (the SLOT column of `tandem status`).
        #[arg(long, value_name = "K")]
        worker: Option<u32>,
        /// The agent.
        #[arg(long)]
        agent: bool,
    },
    /// A live view of the cluster, refreshed every second: per process CPU %,
    /// RSS, restarts, uptime and state; the Leader's followers, keys,
    /// events/s, calls/s, calls in flight, upstreams and epoch. Keys: ↑/↓
    /// select, r reload the workers, a reload the agent (each after y), q quit.
    Monit {
        /// The cluster's name.
        name: String,
    },
    /// The last lines of the children's log files (a cluster started with a
    /// log directory), then with --follow the new ones as they come, across
    /// rotations. Every process's by default, each line prefixed with it.
    #[command(group = clap::ArgGroup::new("process").args(["worker", "agent"]))]
    Logs {
        /// The cluster's name.
        name: String,
        /// Only this worker's (the SLOT column of `tandem status`).
        #[arg(long, value_name = "K")]
        worker: Option<u32>,
        /// Only the agent's.
        #[arg(long)]
        agent: bool,
        /// How many of the last lines to print, per process.
        #[arg(long, value_name = "N", default_value_t = 20)]
        lines: usize,
        /// Keep printing new lines until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Run any program as the workers of a new cluster: each gets the
    /// listeners as fds 3.. (LISTEN_FDS), the Leader's socket and token
    /// (TANDEM_LEADER_SOCKET, TANDEM_TOKEN) and NOTIFY_SOCKET; settings from
    /// ./tandem.toml and the flags. See docs/run.md.
    Run(Box<run::RunArgs>),
    /// Stop the cluster gracefully and wait until every process is gone.
    Stop {
        /// The cluster's name.
        name: String,
        /// How long to wait for the processes to exit, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Run(args) = cli.command {
        return run::main(*args);
    }
    tandem::logging::init_with_default("warn");
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tandem: could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = format!("tandem: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                line += &format!(": {cause}");
                source = cause.source();
            }
            eprintln!("{line}");
            match e {
                ControlError::Busy(_) => ExitCode::from(EXIT_BUSY),
                // Every other failure, a reload refused or failed included
                // (`ControlError::Reload`, printed above as the master's
                // text, or `Failed` from an older master): 1.
                _ => ExitCode::FAILURE,
            }
        }
    }
}

async fn run(command: Command) -> Result<(), ControlError> {
    match command {
        Command::Ls { json } => {
            let clusters = control::list().await;
            if json {
                outln!("{}", serde_json::to_string_pretty(&clusters).unwrap_or_default());
            } else {
                out!("{}", ls_table(&clusters));
            }
            Ok(())
        }
        Command::Status { name, json } => {
            let rows: Vec<ProcessInfo> = decode(ask(&name, Request::Status).await?)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
            } else {
                out!("{}", status_table(&rows));
            }
            Ok(())
        }
        Command::Leader { name, json } => {
            let stats = ask(&name, Request::Leader).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&stats).unwrap_or_default());
            } else {
                out!("{}", leader_text(&stats));
            }
            Ok(())
        }
        Command::Reload { name, agent: true } => {
            let r: AgentReloadReport = ControlClient::connect(&name).await?.call_as(Request::ReloadAgent).await?;
            outln!(
                "agent reloaded: old={} new={} epoch={} old_epoch={} took_ms={}",
                r.old_pid,
                r.new_pid,
                r.epoch,
                r.old_epoch,
                r.took.as_millis()
            );
            Ok(())
        }
        Command::Reload { name, agent: false } => {
            let report: ReloadReport = connect_answering(&name).await?.call_as(Request::Reload).await?;
            for r in &report.replaced {
                outln!("worker {}: pid {} -> {} (ready)", r.id, r.old_pid, r.new_pid);
            }
            outln!("reloaded {} workers", report.replaced.len());
            Ok(())
        }
        Command::Scale { name, count } => {
            let report: ScaleReport =
                connect_answering(&name).await?.call_as(Request::Scale { workers: count }).await?;
            out!("{}", scale_text(&report));
            Ok(())
        }
        Command::Restart { name, worker: Some(worker), .. } => {
            let report: ReloadReport = connect_answering(&name).await?.call_as(Request::Restart { worker }).await?;
            for r in &report.replaced {
                outln!("worker {}: pid {} -> {} (ready; the old one drained)", r.id, r.old_pid, r.new_pid);
            }
            Ok(())
        }
        Command::Restart { name, .. } => {
            let r: AgentReloadReport = connect_answering(&name).await?.call_as(Request::RestartAgent).await?;
            outln!(
                "agent restarted: old={} new={} epoch={} old_epoch={} took_ms={}",
                r.old_pid,
                r.new_pid,
                r.epoch,
                r.old_epoch,
                r.took.as_millis()
            );
            Ok(())
        }
        Command::Monit { name } => Ok(monit::run(name).await?),
        Command::Logs { name, worker, agent, lines, follow } => {
            let which = match (worker, agent) {
                (Some(k), _) => logs::Which::Worker(k),
                (None, true) => logs::Which::Agent,
                (None, false) => logs::Which::All,
            };
            logs::run(&name, which, lines, follow).await
        }
        // Dispatched in `main`, before this runtime exists.
        Command::Run(_) => Err(ControlError::Failed("`tandem run` runs from main".into())),
        Command::Stop { name, timeout } => {
            let report: StopReport = decode(ask(&name, Request::Stop).await?)?;
            outln!("stopping {name}: {} processes", report.pids.len());
            let deadline = Instant::now() + Duration::from_secs(timeout);
            loop {
                let alive: Vec<u32> = report.pids.iter().copied().filter(|&pid| alive(pid)).collect();
                if alive.is_empty() {
                    outln!("stopped");
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(ControlError::Failed(format!(
                        "still running after {timeout}s: pids {}",
                        alive.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long `status`, `leader` and `stop` wait for the master's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// One request with [`ANSWER_TIMEOUT`] (a reload is bounded by the master instead).
async fn ask(name: &str, request: Request) -> Result<Value, ControlError> {
    ControlClient::connect(name).await?.call_within(name, request, ANSWER_TIMEOUT).await
}

/// Connects and checks that the master answers (`info` within
/// [`ANSWER_TIMEOUT`]), for a request with no deadline of ours: a stopped
/// master is reported as not answering instead of waited for forever.
async fn connect_answering(name: &str) -> Result<ControlClient, ControlError> {
    let mut client = ControlClient::connect(name).await?;
    client.call_within(name, Request::Info, ANSWER_TIMEOUT).await?;
    Ok(client)
}

fn decode<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ControlError> {
    serde_json::from_value(value).map_err(|e| ControlError::Protocol(e.to_string()))
}

/// Whether `pid` is a live process (a zombie waiting to be reaped counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()), Some("Z" | "X")),
        Err(_) => false,
    }
}

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `worker 3: started, pid 4242, ready`, `worker 4: stopped, pid 4200, exited
/// with code 0`, then `scaled from 2 to 3 workers in 812 ms`.
fn scale_text(report: &ScaleReport) -> String {
    let mut out = String::new();
    for a in &report.added {
        out += &format!("worker {}: started, pid {}, ready\n", a.worker, a.pid);
    }
    for r in &report.removed {
        match (r.pid, r.exit) {
            (Some(pid), Some(exit)) => out += &format!("worker {}: stopped, pid {pid}, {exit}\n", r.worker),
            _ => out += &format!("worker {}: removed (no process was running)\n", r.worker),
        }
    }
    out += &format!("scaled from {} to {} workers in {} ms\n", report.from, report.to, report.took.as_millis());
    out
}

fn ls_table(clusters: &[Listed]) -> String {
    if clusters.is_empty() {
        return "no running clusters\n".to_owned();
    }
    let mut out = format!("{:<24} {:>8} {:>8} {:>8} {}\n", "NAME", "PID", "UPTIME", "WORKERS", "STATE");
    for listed in clusters {
        let row = |name: &str, pid: String, uptime: String, workers: String, state: &str| {
            format!("{name:<24} {pid:>8} {uptime:>8} {workers:>8} {state}\n")
        };
        out += &match listed {
            Listed::Answering(c) => row(
                &c.name,
                c.pid.to_string(),
                duration(c.uptime_ms),
                format!("{}/{}", c.workers_online, c.workers),
                &c.state,
            ),
            Listed::Silent(s) => {
                let pid = s.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
                row(&s.name, pid, "-".to_owned(), "-".to_owned(), &format!("{} ({})", s.state, s.error))
            }
            // A kind of entry this CLI does not know: its name at least.
            other => row(other.name(), "-".to_owned(), "-".to_owned(), "-".to_owned(), "?"),
        };
    }
    out
}

/// The status table, in the one form the master prints at every stop too
/// ([`ProcessInfo::table`]); the agent's Leader below it.
fn status_table(rows: &[ProcessInfo]) -> String {
    let mut out = ProcessInfo::table(rows).to_string();
    if let Some(stats) = rows.iter().find_map(|r| r.leader.as_ref()) {
        let n = |field: &str| stats.get(field).and_then(Value::as_u64).unwrap_or(0);
        let channels = stats.get("channels").and_then(Value::as_array).cloned().unwrap_or_default();
        let subscriptions: u64 = channels.iter().filter_map(|c| c.get("subscriptions").and_then(Value::as_u64)).sum();
        out += &format!(
            "leader: epoch {}, {} followers, {} subscriptions, {} calls in flight\n",
            n("epoch"),
            n("followers"),
            subscriptions,
            n("in_flight")
        );
        let upstream: Vec<String> = channels
            .iter()
            .map(|c| format!("{}={}", c.get("name").and_then(Value::as_str).unwrap_or("?"), upstream_state(c)))
            .collect();
        out += &format!("upstream: {}\n", upstream.join(" "));
    } else if rows.iter().any(|r| r.role == "agent") {
        out += "leader: no report from the agent\n";
    }
    out
}

fn upstream_state(channel: &Value) -> String {
    match channel.get("upstream") {
        Some(Value::String(s)) => s.to_lowercase(),
        Some(Value::Object(o)) if o.contains_key("Down") => {
            // Keep the status table within 80 columns: the reason is cut short.
            let why: String = o["Down"].get("message").and_then(Value::as_str).unwrap_or("").chars().take(32).collect();
            format!("down({why})")
        }
        Some(other) => other.to_string(),
        None => "?".to_owned(),
    }
}

fn leader_text(stats: &Value) -> String {
    let n = |field: &str| stats.get(field).and_then(Value::as_u64).unwrap_or(0);
    let mut out = format!(
        "leader epoch {}: {} followers, {} calls in flight, {} events, {} conflated\n",
        n("epoch"),
        n("followers"),
        n("in_flight"),
        n("events_sent"),
        n("conflated_events")
    );
    for c in stats.get("channels").and_then(Value::as_array).into_iter().flatten() {
        let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
        let count = |field: &str| c.get(field).and_then(Value::as_u64).unwrap_or(0);
        out += &format!(
            "channel {name}: upstream {}, {} keys, {} subscribers\n",
            upstream_state(c),
            count("subscriptions"),
            count("subscribers")
        );
        for k in c.get("keys").and_then(Value::as_array).into_iter().flatten() {
            let key = k.get("key").and_then(Value::as_str).unwrap_or("?");
            let subs = k.get("subscribers").and_then(Value::as_u64).unwrap_or(0);
            out += &format!("  {key:<40} {subs:>4} subscribers\n");
        }
    }
    out += "followers:\n";
    for f in stats.get("follower_list").and_then(Value::as_array).into_iter().flatten() {
        let pid = f.get("pid").and_then(Value::as_i64).map_or_else(|| "-".to_owned(), |p| p.to_string());
        let transport = f.get("transport").and_then(Value::as_str).unwrap_or("?");
        let channels: Vec<&str> =
            f.get("channels").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        out += &format!(
            "  #{:<4} pid {pid:>8} {transport:<10} {}\n",
            f.get("id").and_then(Value::as_u64).unwrap_or(0),
            channels.join(",")
        );
    }
    out
}
