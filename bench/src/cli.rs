//! The command line: what the user asks for, the hidden role subcommands the
//! bench re-executes itself with, and the resolved configuration.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;
use tandem::cluster_glue::Transport as Link;

use crate::transport::Transport;

/// Measures tandem (direct and messenger transports) beside the raw Unix-socket floor
/// and its peers (tonic, tarpc), in one run.
#[derive(Debug, Parser)]
#[command(name = "bench", about, long_about = None)]
pub struct Args {
    /// A role this process plays for a coordinating bench (internal).
    #[command(subcommand)]
    pub role: Option<RoleCmd>,

    /// Numbers of follower processes to measure, comma-separated. Default 1,2,4,8 (1,4 with --quick).
    #[arg(long, value_delimiter = ',')]
    pub followers: Option<Vec<usize>>,

    /// Transports to measure, comma-separated. Default floor,direct,messenger,tonic,tarpc.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub transports: Option<Vec<Transport>>,

    /// Phases to run, comma-separated. Default: all of them.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub phases: Option<Vec<Phase>>,

    /// Bytes of payload in every call and event.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,

    /// Length of each measured phase, in seconds. Default 3 (1 with --quick).
    #[arg(long)]
    pub seconds: Option<f64>,

    /// A reduced set for smoke checks: N = 1 and 4, short phases, 3 failovers. Under 60 s.
    #[arg(long)]
    pub quick: bool,

    /// Calls in flight per follower in the pipelined phase.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,

    /// Keys the fan-out stream is spread over (the leader conflates per key).
    #[arg(long, default_value_t = 16)]
    pub fanout_keys: usize,

    /// Period of the paced fan-out phase, in milliseconds.
    #[arg(long, default_value_t = 10)]
    pub fanout_interval_ms: u64,

    /// Standalone processes in the failover group.
    #[arg(long, default_value_t = 4)]
    pub failover_processes: usize,

    /// Leader kills to time, in each failover mode. Default 10 (3 with --quick).
    #[arg(long)]
    pub failover_repeats: Option<usize>,

    /// Workers subscribed in the cluster-agent failover.
    #[arg(long, default_value_t = 4)]
    pub failover_workers: usize,

    /// How the cluster-agent failover's workers reach the agent: messenger or direct.
    #[arg(long, default_value = "messenger")]
    pub failover_link: Link,

    /// The cluster master's delay before restarting a dead agent, in milliseconds.
    /// Default: tandem-cluster's own default (`RestartPolicy::initial_delay`, 100 ms).
    #[arg(long)]
    pub agent_restart_ms: Option<u64>,

    /// Deliver-to-one: events per second the publisher offers on one key (paced in
    /// per-millisecond bursts; it waits with `EventSender::ready` when the leader's queue is full).
    /// 0: flat out (as fast as `ready` lets it).
    #[arg(long, default_value_t = 50_000)]
    pub one_rate: u64,

    /// Deliver-to-one: length of the window, in seconds. Default 30 (5 with --quick).
    #[arg(long)]
    pub one_seconds: Option<f64>,

    /// Deliver-to-one: follower processes subscribed to the key.
    #[arg(long, default_value_t = 4)]
    pub one_followers: usize,

    /// Deliver-to-one: period of the follower kills (one SIGKILL, round-robin, then a replacement), in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub one_kill_ms: u64,

    /// Follower connections held open for the leader-memory measurement.
    #[arg(long, default_value_t = 1000)]
    pub mass_followers: usize,

    /// Processes those connections are spread over.
    #[arg(long, default_value_t = 4)]
    pub mass_processes: usize,

    /// Worker threads of the leader's and the floor server's runtimes. Default: the number of cores.
    #[arg(long)]
    pub server_threads: Option<usize>,

    /// Writes every figure, the machine and the configuration as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Draws calls/s and p50 by N, per transport, as an SVG chart.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// The parts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Calls at 1 and at 64 in flight per follower.
    Invoke,
    /// One event stream to every follower, flat out and paced.
    Fanout,
    /// kill -9 of the standalone leader, then of the cluster's agent.
    Failover,
    /// Deliver-to-one on one key to a few followers, one of them killed (and replaced) every second.
    One,
    /// A leader with 1,000 follower connections.
    Memory,
}

/// The roles a bench process can play. Every role connects to the coordinator's
/// control socket (its path is in the environment), says hello, and obeys.
#[derive(Debug, Clone, Subcommand)]
pub enum RoleCmd {
    /// A tandem Leader serving the bench upstream on a Unix socket.
    #[command(hide = true)]
    Leader(ServerArgs),
    /// The follower's two per-call paths (queue, slots) side by side in ONE
    /// process on ONE thread (a Leader and a follower on a Unix socket): the
    /// CPU time per call of each, in alternating rounds. One thread, so the
    /// batching does not depend on how the OS shares the cores.
    PerCall {
        /// Rounds; each measures both paths, the first path alternating.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Calls per path and round.
        #[arg(long, default_value_t = 200_000)]
        calls: u64,
        /// Calls in flight (each in its own task, as the bench follower makes them).
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Keep the calls in flight from one task (a `FuturesUnordered`), not a task each.
        #[arg(long)]
        one_task: bool,
        /// Bytes of payload per call.
        #[arg(long, default_value_t = 64)]
        payload: usize,
    },
    /// One tandem follower process (one Connection over the direct Unix socket).
    #[command(hide = true)]
    Follower {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        group: u32,
        /// The per-call path; the follower's default if not given.
        #[arg(long, value_enum)]
        calls: Option<crate::transport::Calls>,
    },
    /// The floor's server: plain tokio, u32 BE length + bytes, echo and fan-out.
    #[command(hide = true)]
    FloorServer(ServerArgs),
    /// One floor client process.
    #[command(hide = true)]
    FloorClient(ClientArgs),
    /// The tonic (gRPC) echo and streaming server.
    #[command(hide = true)]
    TonicServer(ServerArgs),
    /// One tonic client process.
    #[command(hide = true)]
    TonicClient(ClientArgs),
    /// The tarpc echo server.
    #[command(hide = true)]
    TarpcServer(ServerArgs),
    /// One tarpc client process.
    #[command(hide = true)]
    TarpcClient(ClientArgs),
    /// One process of a standalone (elected) group, subscribed to a ticking key.
    #[command(hide = true)]
    Standalone {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        group: u32,
    },
    /// Many idle follower connections in one process.
    #[command(hide = true)]
    Mass {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        group: u32,
        #[arg(long)]
        count: usize,
    },
    /// A tandem cluster: master, agent (the bench Leader) and workers (followers).
    /// The master re-runs this same command line for the agent and each worker
    /// (tandem-cluster tells them apart by `TANDEM_ROLE`), so every argument here
    /// means the same in all of them.
    #[command(hide = true)]
    ClusterMaster(ClusterArgs),
}

/// A server role's arguments: its socket, its group, its runtime's threads.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    #[arg(long)]
    pub socket: PathBuf,
    #[arg(long)]
    pub group: u32,
    #[arg(long)]
    pub threads: usize,
}

/// A client role's arguments: the server's socket and its group.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    pub socket: PathBuf,
    #[arg(long)]
    pub group: u32,
}

/// One bench cluster, as every one of its processes reads it.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// The group its processes say hello in.
    #[arg(long)]
    pub group: u32,
    /// Worker processes (each one follower).
    #[arg(long)]
    pub workers: usize,
    /// Worker threads of the master's and the agent's runtimes.
    #[arg(long)]
    pub threads: usize,
    /// How the workers reach the agent's Leader.
    #[arg(long)]
    pub link: Link,
    /// The failover group: the agent's upstream ticks and workers watch the
    /// ticking key, instead of obeying the invoke and fan-out commands.
    #[arg(long)]
    pub failover: bool,
    /// The master's delay before restarting a dead agent, in milliseconds.
    #[arg(long)]
    pub restart_ms: u64,
    /// Keep a hot standby next to the agent (`tandem_cluster::Config::standby`):
    /// a dead agent is replaced by promoting it rather than by a restart.
    #[arg(long)]
    pub standby: bool,
    /// The failover agent's upstream connects to this TCP address (the
    /// coordinator's) when its Leader starts, so that the coordinator counts
    /// the host's upstream connections. The default is none.
    #[arg(long)]
    pub upstream: Option<String>,
}

impl ClusterArgs {
    /// The command line that starts this cluster's master (and, re-run, its children).
    pub fn argv(&self) -> Vec<OsString> {
        let link = match self.link {
            Link::Messenger => "messenger",
            _ => "direct",
        };
        let mut argv: Vec<OsString> = vec![
            "cluster-master".into(),
            "--group".into(),
            self.group.to_string().into(),
            "--workers".into(),
            self.workers.to_string().into(),
            "--threads".into(),
            self.threads.to_string().into(),
            "--link".into(),
            link.into(),
            "--restart-ms".into(),
            self.restart_ms.to_string().into(),
        ];
        if self.failover {
            argv.push("--failover".into());
        }
        if self.standby {
            argv.push("--standby".into());
        }
        if let Some(addr) = &self.upstream {
            argv.extend(["--upstream".into(), addr.into()]);
        }
        argv
    }
}

/// How long a bench cluster's agent must have been ready for its death to
/// count as a first crash (tandem-cluster's `RestartPolicy::stable_after`;
/// its default, 30 s, would make the repeated kills of the failover phase a
/// crash loop with a doubling delay). Below the steady period between kills.
pub const AGENT_STABLE_AFTER: Duration = Duration::from_millis(100);

/// The most events a deliver-to-one window may publish (`--one-rate` × `--one-seconds`):
/// the coordinator keeps a few bytes per event to find losses and duplicates.
pub const MAX_ONE_EVENTS: u64 = 100_000_000;

/// The configuration of one bench run, as recorded in the JSON output.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub quick: bool,
    pub followers: Vec<usize>,
    pub transports: Vec<Transport>,
    pub phases: Vec<Phase>,
    pub payload_bytes: usize,
    pub seconds: f64,
    pub warmup_seconds: f64,
    pub in_flight: usize,
    pub fanout_keys: usize,
    pub fanout_interval_ms: u64,
    pub failover_processes: usize,
    pub failover_repeats: usize,
    pub failover_workers: usize,
    /// `messenger` or `direct`: how the cluster-agent failover's workers reach the agent.
    pub failover_link: &'static str,
    pub agent_restart_ms: u64,
    /// A cluster agent ready this long counts as stable, so each kill is
    /// restarted after `agent_restart_ms` rather than a growing backoff.
    pub agent_stable_after_ms: u64,
    /// Deliver-to-one: the offered rate (events/s), window, followers and kill period.
    pub one_rate: u64,
    pub one_seconds: f64,
    pub one_followers: usize,
    pub one_kill_ms: u64,
    pub mass_followers: usize,
    pub mass_processes: usize,
    pub server_threads: usize,
    pub follower_runtime: &'static str,
    pub server_runtime: &'static str,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
}

impl Config {
    pub fn resolve(args: &Args) -> anyhow::Result<Config> {
        let quick = args.quick;
        let followers = args.followers.clone().unwrap_or_else(|| if quick { vec![1, 4] } else { vec![1, 2, 4, 8] });
        anyhow::ensure!(
            !followers.is_empty() && followers.iter().all(|&n| (1..=64).contains(&n)),
            "--followers: 1..=64 each"
        );
        let transports = args.transports.clone().unwrap_or_else(|| crate::transport::ALL.to_vec());
        let seconds = args.seconds.unwrap_or(if quick { 1.0 } else { 3.0 });
        anyhow::ensure!((0.1..=600.0).contains(&seconds), "--seconds: between 0.1 and 600");
        anyhow::ensure!((1..=4096).contains(&args.in_flight), "--in-flight: 1..=4096");
        anyhow::ensure!((1..=1024).contains(&args.fanout_keys), "--fanout-keys: 1..=1024");
        anyhow::ensure!(args.payload <= 1 << 20, "--payload: at most 1 MiB");
        anyhow::ensure!(args.failover_processes >= 2, "--failover-processes: at least 2");
        anyhow::ensure!((1..=64).contains(&args.failover_workers), "--failover-workers: 1..=64");
        anyhow::ensure!(
            matches!(args.failover_link, Link::Messenger | Link::Direct),
            "--failover-link: messenger or direct"
        );
        let default_restart = tandem::cluster::RestartPolicy::default().initial_delay;
        anyhow::ensure!(args.mass_processes >= 1 && args.mass_followers >= args.mass_processes, "--mass-*");
        let one_seconds = args.one_seconds.unwrap_or(if quick { 5.0 } else { 30.0 });
        anyhow::ensure!((1.0..=600.0).contains(&one_seconds), "--one-seconds: between 1 and 600");
        anyhow::ensure!(args.one_rate <= 1_000_000, "--one-rate: at most 1000000 events/s (0: flat out)");
        anyhow::ensure!(
            args.one_rate as f64 * one_seconds <= MAX_ONE_EVENTS as f64,
            "--one-rate x --one-seconds: at most {MAX_ONE_EVENTS} events (the coordinator keeps a count per event)"
        );
        anyhow::ensure!(
            (2..=64).contains(&args.one_followers),
            "--one-followers: 2..=64 (one is always being replaced)"
        );
        anyhow::ensure!((100..=60_000).contains(&args.one_kill_ms), "--one-kill-ms: 100..=60000");
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Config {
            quick,
            followers,
            transports,
            phases: args
                .phases
                .clone()
                .unwrap_or_else(|| vec![Phase::Invoke, Phase::Fanout, Phase::One, Phase::Failover, Phase::Memory]),
            payload_bytes: args.payload,
            seconds,
            warmup_seconds: if quick { 0.2 } else { 0.5 },
            in_flight: args.in_flight,
            fanout_keys: args.fanout_keys,
            fanout_interval_ms: args.fanout_interval_ms.max(1),
            failover_processes: args.failover_processes,
            failover_repeats: args.failover_repeats.unwrap_or(if quick { 3 } else { 10 }).max(1),
            failover_workers: args.failover_workers,
            failover_link: if args.failover_link == Link::Messenger { "messenger" } else { "direct" },
            agent_restart_ms: args.agent_restart_ms.unwrap_or(default_restart.as_millis() as u64),
            agent_stable_after_ms: AGENT_STABLE_AFTER.as_millis() as u64,
            one_rate: args.one_rate,
            one_seconds,
            one_followers: args.one_followers,
            one_kill_ms: args.one_kill_ms,
            mass_followers: args.mass_followers,
            mass_processes: args.mass_processes,
            server_threads: args.server_threads.unwrap_or(cores).max(1),
            follower_runtime: "tokio current_thread",
            server_runtime: "tokio multi_thread (server_threads workers)",
            json: args.json.clone(),
            plot: args.plot.clone(),
        })
    }

    /// The cluster-agent failover's worker link.
    pub fn failover_link(&self) -> Link {
        if self.failover_link == "messenger" { Link::Messenger } else { Link::Direct }
    }

    pub fn runs(&self, phase: Phase) -> bool {
        self.phases.contains(&phase)
    }

    pub fn phase(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }

    /// The deliver-to-one window.
    pub fn one_window(&self) -> Duration {
        Duration::from_secs_f64(self.one_seconds)
    }

    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_seconds)
    }
}
