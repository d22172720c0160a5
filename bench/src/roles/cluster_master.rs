//! A bench cluster (tandem-cluster): the master the coordinator starts, and the
//! agent and workers the master starts by re-running this same command line.
//!
//! ```text
//! coordinator ─spawn─> bench cluster-master --group G --workers N --link L ...
//!   master: hello "master" ──re-exec, same argv + TANDEM_ROLE=agent──> agent
//!   agent:  hello "server", start_leader (the bench Leader) ─> Serving{epoch}, Ready
//!   master ──re-exec, same argv + TANDEM_ROLE=worker (x N)───────────> workers
//!   worker: hello "client", Follower over L (the messenger relay, or the socket) ─> Ready
//! ```
//!
//! All of them hold the coordinator's control socket path (inherited from the
//! environment) and say hello to it themselves: the coordinator tells them
//! apart by their hello, not by who spawned them. The agent obeys the same
//! commands as the direct transport's Leader and the workers the same as its
//! followers, so the phases drive a cluster like any other group. With
//! `--failover` the agent's upstream ticks and the workers [`watch`] it.
//!
//! A `Quit` to the master shuts the cluster down in order (workers, then the
//! agent); workers and agent also stop when the master asks. Children die
//! with the master (tandem-cluster sets `PR_SET_PDEATHSIG`), and the master
//! with the coordinator.
//!
//! [`watch`]: super::follower::watch

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tandem::Connection;
use tandem::cluster::{
    AgentContext, BoxError, Cluster, Config, MasterContext, ProcessRole, RestartPolicy, WorkerContext,
};
use tandem::cluster_glue::{WorkerConnector, start_leader};

use super::{follower, leader, standalone};
use crate::api::{BenchApi, BenchUpstream};
use crate::cli::{AGENT_STABLE_AFTER, ClusterArgs};
use crate::clock::mono_ns;
use crate::context::STARTUP;
use crate::control::{self, Cmd, Report, Reporter};

/// How long workers, then the agent, may take to stop before the master kills them.
const STOP: Duration = Duration::from_secs(2);

/// Runs this process's part of the cluster: the master, the agent or a worker.
pub fn main(args: ClusterArgs) -> Result<()> {
    // As `Cluster::run_blocking` runs them: the master (it relays every
    // frame, latency-bound) on one thread; the agent (it hosts the Leader,
    // like the other transports' servers) multi-threaded; workers (followers,
    // like the other transports' clients) on one thread.
    let runtime = match ProcessRole::of_this_process() {
        ProcessRole::Worker | ProcessRole::Master => super::client_runtime(),
        _ => super::server_runtime(args.threads),
    }?;
    let mut config = Config::default();
    config.workers = Some(args.workers);
    config.worker_stop_timeout = STOP;
    config.agent_stop_timeout = STOP;
    config.status_at_exit = false;
    let mut restart = RestartPolicy::default();
    restart.initial_delay = Duration::from_millis(args.restart_ms);
    restart.stable_after = AGENT_STABLE_AFTER;
    config.restart = restart;
    let (agent_args, worker_args, group) = (args.clone(), args.clone(), args.group);
    let cluster = Cluster::builder(format!("bench-g{group}"))
        .config(config)
        .agent(move |ctx| agent(ctx, agent_args))
        .worker(move |ctx| worker(ctx, worker_args))
        .master(move |ctx| master(ctx, group));
    // In the agent and the workers, `run` exits the process when they are done.
    runtime.block_on(cluster.run())?;
    Ok(())
}

/// The master's own work: say hello, then shut the cluster down on `Quit`
/// (or when the coordinator has gone).
async fn master(ctx: MasterContext, group: u32) -> Result<(), BoxError> {
    let (mut commands, reporter) = control::connect("master", group).await?;
    reporter.send(&Report::Ready);
    let result = match commands.next().await {
        Ok(None | Some(Cmd::Quit)) => Ok(()),
        Ok(Some(other)) => Err(anyhow!("a cluster master cannot {other:?}")),
        Err(error) => Err(error),
    };
    ctx.shutdown();
    finish(&reporter, "master", result).await
}

/// The agent: the bench Leader, started by tandem's cluster glue (the agent's
/// epoch and the cluster token; the runtime directory's socket and the relayed
/// links), obeying the coordinator like the direct transport's Leader.
async fn agent(ctx: AgentContext, args: ClusterArgs) -> Result<(), BoxError> {
    let (commands, reporter) = control::connect("server", args.group).await?;
    let result = async {
        let upstream = if args.failover { BenchUpstream::ticking(standalone::TICK) } else { BenchUpstream::default() };
        let leader = start_leader(&ctx, leader::builder(&upstream)).await.map_err(|e| anyhow!(e))?;
        reporter.send(&Report::Serving { epoch: ctx.epoch(), at_ns: mono_ns() });
        let served = tokio::select! {
            served = leader::serve(&leader, &upstream, commands, reporter.clone()) => served,
            _ = ctx.stopped() => Ok(()),
        };
        leader.shutdown().await;
        served
    }
    .await;
    finish(&reporter, "agent", result).await
}

/// A worker: one follower reaching the agent over `--link`, obeying the
/// coordinator like the direct transport's followers (or, with `--failover`,
/// watching the ticking key).
async fn worker(ctx: WorkerContext, args: ClusterArgs) -> Result<(), BoxError> {
    let (commands, reporter) = control::connect("client", args.group).await?;
    let result = async {
        let mut config = tandem::follower::Config::default();
        config.token = Some(ctx.token().to_string());
        let connection = Connection::builder()
            .config(config)
            .channel::<BenchApi>()
            .connect(WorkerConnector::new(&ctx, args.link))
            .spawn();
        let body = async {
            tokio::time::timeout(STARTUP, connection.client::<BenchApi>().ready())
                .await
                .context("the follower did not connect")??;
            ctx.ready().await?;
            if args.failover {
                follower::watch(&connection, commands, &reporter).await
            } else {
                follower::serve(&connection, commands, &reporter).await
            }
        };
        let result = tokio::select! {
            result = body => result,
            _ = ctx.stopped() => Ok(()),
        };
        connection.close().await;
        result
    }
    .await;
    finish(&reporter, "worker", result).await
}

/// Reports a failure to the coordinator, and waits until the reports are written.
async fn finish(reporter: &Reporter, role: &str, result: Result<()>) -> Result<(), BoxError> {
    if let Err(error) = &result {
        reporter.send(&Report::Failed { error: format!("cluster {role}: {error:#}") });
    }
    reporter.flush().await;
    result.map_err(Into::into)
}
