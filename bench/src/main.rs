//! The tandem benchmark: invoke, fan-out, failover and memory, measured in one
//! run beside the raw Unix-socket floor of this machine, so noise cancels out
//! in the ratios.
//!
//! ```text
//! cargo run --release -p tandem-bench -- --quick --json out.json     # smoke run, about 65 s
//! cargo run --release -p tandem-bench -- --json docs/bench.json --plot docs/bench.svg
//! cargo run --release -p tandem-bench -- --followers 1,2,4,8 --payload 64 --seconds 3
//! cargo run --release -p tandem-bench -- --transports direct,messenger --followers 4 --phases invoke
//! cargo run --release -p tandem-bench -- --transports direct,tonic,tarpc --followers 4 --phases invoke,fanout
//! cargo run --release -p tandem-bench -- --phases failover --agent-restart-ms 0 --failover-link direct
//! cargo run --release -p tandem-bench -- --phases one --one-rate 50000 --one-seconds 30
//! ```
//!
//! Every process is this binary: the coordinator re-executes itself with a
//! hidden role subcommand for each server and each follower (each follower is
//! its own process), drives them over a control socket in a private 0700 temp
//! dir (one JSON object per line), and kills (SIGKILL) whatever it started, on
//! error too; children also die with it (PR_SET_PDEATHSIG). A cluster's master
//! (`cluster-master`) re-executes the same command line again for its agent and
//! workers (tandem-cluster's `TANDEM_ROLE`); they die with the master.
//!
//! Transports (the `transport` field of every result):
//! - `floor`: plain tokio, u32 BE length + bytes, one server process and N client
//!   processes: what any framed protocol costs at least on this machine;
//! - `direct`: a tandem Leader process (in-memory echo upstream; subscriptions
//!   fed by a publisher task in the leader's process) and N tandem follower
//!   processes on its Unix socket;
//! - `messenger`: a tandem cluster: a master, its agent hosting the same Leader
//!   (`tandem::cluster_glue::start_leader`) and N workers whose followers use
//!   `WorkerConnector` with `Transport::Messenger`, every frame relayed by the
//!   master. Its rows also compare with direct (`vs direct`);
//! - `tonic`: the peer a Rust user would reach for first: a gRPC service over a
//!   Unix socket (tonic's server on a `UnixListenerStream`, a channel per
//!   client process through `Endpoint::connect_with_connector`), written as
//!   tonic's generated code is (hand-derived prost messages, `tonic_prost`'s
//!   codec; no protoc): a unary `Echo` for the invoke phases and a
//!   server-streaming `Subscribe` (one stream, every key) for fan-out;
//! - `tarpc`: tarpc over a Unix socket (`serde_transport::unix`, bincode, the
//!   faster of its two codecs), an `echo` method; invoke phases only (a tarpc
//!   call has one answer: no server-to-client stream to fan out on).
//!
//! The peers' rows compare with direct (`vs direct`), and the TARGETS hold
//! direct against them: calls/s at N=4 × 64, ping-pong p50, and (tonic) fan-out.
//!
//! Phases, for each N in `--followers` (default 1,2,4,8; `--quick`: 1,4) and a
//! fixed `--payload` (default 64 bytes):
//! - invoke, 1 call in flight per follower: calls/s, p50/p99/p999 (HDR histograms
//!   merged across processes); again with every process on CPU 0 (`cpus = cpu 0`),
//!   because on a VM a cross-CPU wake-up can cost more than the software measured;
//! - invoke, 64 in flight per follower (`--in-flight`): calls/s, p50/p99;
//! - fan-out: one event stream over 16 keys (`--fanout-keys`) to every follower,
//!   flat out (events/s delivered to every follower; what the leader conflated is
//!   counted as missed, with per-key index gaps; tandem's publisher waits with
//!   `EventSender::ready` while a follower's queue is full, as the floor's
//!   publisher waits for its slowest client) and paced at one event per 10 ms
//!   (publish-to-receipt p50/p99 from CLOCK_MONOTONIC stamps);
//! - deliver-to-one (`one`): a Leader process publishes numbered events on one
//!   key at `--one-rate` (default 50,000/s, in per-millisecond bursts, awaiting
//!   `EventSender::ready`) for `--one-seconds` (default 30; `--quick`: 5) to 4
//!   follower processes (`--one-followers`) that `subscribe_one` it; every
//!   `--one-kill-ms` (1,000) one follower is SIGKILLed, round-robin, and a
//!   replacement started. Each follower reports every batch it reads (written
//!   to the control socket) before acking it, so the count is exact across
//!   kills: lost (published seqs never received), duplicates (and those not
//!   marked redelivered), the achieved offered rate and the processed rate,
//!   printed beside the direct fan-out's when both ran. JSON: `deliver_one`;
//! - failover: 4 processes elect a leader with `tandem::Standalone`; kill -9 the
//!   leader; time until every survivor holds a value from the next leader; p50
//!   and max over 10 kills (`--quick`: 3). Then a cluster with 4 workers
//!   (`--failover-workers`) over the messenger (`--failover-link`): kill -9 the
//!   agent; time until every worker holds a value from the agent the master
//!   restarts (after its restart delay, `--agent-restart-ms`, default
//!   tandem-cluster's 100 ms), and when the new Leader served; same repeats.
//!   JSON: `failover.standalone` (the fields of the former `failover` object)
//!   and `failover.cluster_agent`;
//! - memory: RSS of leaders and followers idle and under load beside the floor's
//!   processes, and of a leader with 1,000 follower connections in 4 processes.
//!
//! Followers count the times they lose their link to the leader (`lost`,
//! `links_lost`): the messenger relay closes a link whose receiver falls behind.
//!
//! Output: a table on stdout (progress on stderr); `--json FILE`: every figure,
//! the targets, the machine (cores, kernel, CPU model) and the configuration;
//! `--plot FILE.svg`: calls/s and p50 by N for each transport. `--phases` runs
//! a subset (invoke, fanout, one, failover, memory); `--seconds` sets phase length.

mod api;
mod cli;
mod clock;
mod context;
mod control;
mod coordinator;
mod failover;
mod hist;
mod memory;
mod one;
mod phases;
mod placement;
mod plot;
mod procs;
mod results;
mod roles;
mod runner;
mod standby_results;
mod table;
mod tally;
mod targets;
mod transport;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = cli::Args::parse();
    if let Some(role) = args.role.clone() {
        roles::main(role);
    }
    tandem::logging::init_with_default("error");
    procs::raise_fd_limit();
    let config = cli::Config::resolve(&args)?;
    // One thread: every child is spawned from it, so their parent-death signal
    // fires when the coordinator exits, not when some worker thread does.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(coordinator::run(config))
}
