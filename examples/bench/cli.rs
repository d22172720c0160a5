//! The command line: what the user asks for, the hidden role subcommands the
//! bench re-executes itself with, and the resolved configuration.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::runner::Transport;

/// Measures tandem (direct transport) beside the raw Unix-socket floor, in one run.
#[derive(Debug, Parser)]
#[command(name = "bench", about, long_about = None)]
pub struct Args {
    /// A role this process plays for a coordinating bench (internal).
    #[command(subcommand)]
    pub role: Option<RoleCmd>,

    /// Numbers of follower processes to measure, comma-separated. Default 1,2,4,8 (1,4 with --quick).
    #[arg(long, value_delimiter = ',')]
    pub followers: Option<Vec<usize>>,

    /// Transports to measure, comma-separated. Default floor,direct.
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

    /// Leader kills to time. Default 10 (3 with --quick).
    #[arg(long)]
    pub failover_repeats: Option<usize>,

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
    /// kill -9 of the standalone leader.
    Failover,
    /// A leader with 1,000 follower connections.
    Memory,
}

/// The roles a bench process can play. Every role connects to the coordinator's
/// control socket (its path is in the environment), says hello, and obeys.
#[derive(Debug, Clone, Subcommand)]
pub enum RoleCmd {
    /// A tandem Leader serving the bench upstream on a Unix socket.
    #[command(hide = true)]
    Leader {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        group: u32,
        #[arg(long)]
        threads: usize,
    },
    /// One tandem follower process (one Connection over the direct Unix socket).
    #[command(hide = true)]
    Follower {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        group: u32,
    },
    /// The floor's server: plain tokio, u32 BE length + bytes, echo and fan-out.
    #[command(hide = true)]
    FloorServer {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        group: u32,
        #[arg(long)]
        threads: usize,
    },
    /// One floor client process.
    #[command(hide = true)]
    FloorClient {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        group: u32,
    },
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
}

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
        let transports = args.transports.clone().unwrap_or_else(|| vec![Transport::Floor, Transport::Direct]);
        let seconds = args.seconds.unwrap_or(if quick { 1.0 } else { 3.0 });
        anyhow::ensure!((0.1..=600.0).contains(&seconds), "--seconds: between 0.1 and 600");
        anyhow::ensure!((1..=4096).contains(&args.in_flight), "--in-flight: 1..=4096");
        anyhow::ensure!((1..=1024).contains(&args.fanout_keys), "--fanout-keys: 1..=1024");
        anyhow::ensure!(args.payload <= 1 << 20, "--payload: at most 1 MiB");
        anyhow::ensure!(args.failover_processes >= 2, "--failover-processes: at least 2");
        anyhow::ensure!(args.mass_processes >= 1 && args.mass_followers >= args.mass_processes, "--mass-*");
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Config {
            quick,
            followers,
            transports,
            phases: args
                .phases
                .clone()
                .unwrap_or_else(|| vec![Phase::Invoke, Phase::Fanout, Phase::Failover, Phase::Memory]),
            payload_bytes: args.payload,
            seconds,
            warmup_seconds: if quick { 0.2 } else { 0.5 },
            in_flight: args.in_flight,
            fanout_keys: args.fanout_keys,
            fanout_interval_ms: args.fanout_interval_ms.max(1),
            failover_processes: args.failover_processes,
            failover_repeats: args.failover_repeats.unwrap_or(if quick { 3 } else { 10 }).max(1),
            mass_followers: args.mass_followers,
            mass_processes: args.mass_processes,
            server_threads: args.server_threads.unwrap_or(cores).max(1),
            follower_runtime: "tokio current_thread",
            server_runtime: "tokio multi_thread (server_threads workers)",
            json: args.json.clone(),
            plot: args.plot.clone(),
        })
    }

    pub fn runs(&self, phase: Phase) -> bool {
        self.phases.contains(&phase)
    }

    pub fn phase(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }

    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_seconds)
    }
}
