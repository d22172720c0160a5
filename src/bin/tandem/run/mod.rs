//! `tandem run`: a tandem cluster whose workers run any program.
//!
//! ```text
//! tandem run (master) ── binds the listeners, runs the embedded registry (no upstream flag)
//!   ├── agent: tandem's Leader, with the registry, etcd or Redis adapter
//!   └── worker k: the shim (a normal tandem worker: IPC, ready, stop, reload)
//!         └── the program: listeners as fds 3.. (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES),
//!             TANDEM_LEADER_SOCKET, TANDEM_TOKEN, TANDEM_WORKER_ID,
//!             NOTIFY_SOCKET / TANDEM_NOTIFY_STREAM (READY=1)
//! ```
//!
//! Settings: [`settings`] (`tandem.toml` and the flags); the worker side:
//! [`shim`] and its readiness sockets, [`notify`]; the agent's Leader and the
//! master's own work: [`master`]. The user's guide is `docs/run.md`.

mod master;
mod notify;
mod settings;
mod shim;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tandem::cluster::ProcessRole;

/// The variable that carries the master's resolved [`settings::Spec`] (JSON) to its
/// children (not `TANDEM_*`: those are the cluster's own). The program does
/// not get it.
pub const SPEC_ENV: &str = "TANDEMRUN_SPEC";

/// Exit code 2: a usage error (as clap's).
const EXIT_USAGE: u8 = 2;

/// `tandem run`'s flags; each overrides the same setting of `tandem.toml`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The settings file. The default is ./tandem.toml when it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Add the environment variables of the file's [env.NAME] table.
    #[arg(long, value_name = "NAME")]
    pub env: Option<String>,
    /// The cluster's name for `tandem ls/status/reload/stop`. The default is
    /// the script's file name (`app` for `node app.js`), else the program's.
    #[arg(long)]
    pub name: Option<String>,
    /// Worker processes, each running the program. The default is one per CPU.
    #[arg(long)]
    pub workers: Option<usize>,
    /// A listening socket handed to every program: [NAME=]ADDR, ADDR being
    /// host:port (port 0 picks one) or unix:PATH (repeatable; fds 3, 4, ...
    /// in this order).
    #[arg(long, value_name = "[NAME=]ADDR")]
    pub listen: Vec<String>,
    /// The bundled registry's address (`tandem-registry serve`). Without an
    /// upstream the master runs an embedded registry.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["etcd", "redis"])]
    pub registry: Option<String>,
    /// etcd endpoints, comma-separated (a build with the `etcd` feature).
    #[arg(long, value_name = "ENDPOINTS", conflicts_with = "redis")]
    pub etcd: Option<String>,
    /// A Redis URL (a build with the `redis` feature).
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// With the embedded registry: put KEY=VALUE before the workers start (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub put: Vec<String>,
    /// A config key the program should follow, passed in TANDEM_SUBSCRIBE
    /// (comma-separated; repeatable).
    #[arg(long, value_name = "KEY")]
    pub subscribe: Vec<String>,
    /// When a program is ready: `notify` (the default: when it sends READY=1
    /// on NOTIFY_SOCKET; none within the ready timeout fails its start) or a
    /// delay such as `2s` (ready that long after its start, if it still runs).
    #[arg(long, value_name = "notify|DELAY", value_parser = settings::parse_ready)]
    pub ready: Option<settings::Ready>,
    /// How long a program may take to be ready (`30s`, `500ms`). The default is 30s.
    #[arg(long, value_name = "DURATION", value_parser = settings::parse_duration)]
    pub ready_timeout: Option<Duration>,
    /// How long a program may take to exit after SIGTERM before it is killed. The default is 5s.
    #[arg(long, value_name = "DURATION", value_parser = settings::parse_duration)]
    pub stop_timeout: Option<Duration>,
    /// Replace a worker whose program (with its children) uses more than MIB MiB of RSS.
    #[arg(long, value_name = "MIB")]
    pub max_memory: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Internal: set LISTEN_PID to this process's pid and exec the program.
    #[arg(long, hide = true)]
    pub exec_with_listen_pid: bool,
    /// The program and its arguments.
    #[arg(last = true, value_name = "PROGRAM")]
    pub command: Vec<String>,
}

/// Runs `tandem run` in whichever role this process has.
pub fn main(args: RunArgs) -> ExitCode {
    if args.exec_with_listen_pid {
        return shim::exec_program(&args.command);
    }
    // A supervisor's lifecycle lines (ready, restarted, reloaded) are INFO.
    tandem::logging::init();
    let role = ProcessRole::of_this_process();
    let spec = match role {
        ProcessRole::Master => match master::prepare(&args) {
            Ok(prepared) => prepared,
            Err(master::PrepareError::Usage(e)) => {
                eprintln!("tandem run: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
            Err(master::PrepareError::Failed(e)) => {
                eprintln!("tandem run: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => match std::env::var(SPEC_ENV).ok().and_then(|json| serde_json::from_str(&json).ok()) {
            Some(spec) => master::Prepared { spec, embedded: None },
            None => {
                eprintln!("tandem run: {SPEC_ENV} is missing or invalid: this process was not started by `tandem run`");
                return ExitCode::FAILURE;
            }
        },
    };
    // The master and the shims on one thread (the shim forks the program
    // from it: its PR_SET_PDEATHSIG follows that thread); the agent's Leader
    // on several.
    let runtime = match role {
        ProcessRole::Agent => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        _ => tokio::runtime::Builder::new_current_thread().enable_all().build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tandem run: could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(master::run(spec)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = format!("tandem run: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                line += &format!(": {cause}");
                source = cause.source();
            }
            eprintln!("{line}");
            ExitCode::FAILURE
        }
    }
}
