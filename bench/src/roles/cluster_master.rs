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
//! With `--standby` the master keeps a hot standby: a second agent process
//! (it says hello as a "server" too) that `start_leader` keeps mirroring until
//! the master promotes it; its upstream ticks every [`STANDBY_TICK`] (puts
//! every 5 ms), its workers check that no (epoch, seq) comes twice or
//! backwards, and with `--upstream` each Leader opens one TCP connection to
//! the coordinator when it starts (the host's upstream connections, counted).
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

/// The ticking key's period with `--standby`: the issue's "puts every 5 ms".
pub const STANDBY_TICK: Duration = Duration::from_millis(5);

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
    config.standby = args.standby;
    if args.standby {
        // The coordinator asks its control socket whether the standby is ready.
        config.name = Some(format!("bench-g{}", args.group));
    }
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
        let tick = if args.standby { STANDBY_TICK } else { standalone::TICK };
        let upstream = if args.failover { BenchUpstream::ticking(tick) } else { BenchUpstream::default() };
        let builder = match &args.upstream {
            Some(addr) => counted_upstream(&upstream, addr.clone()),
            None => leader::builder(&upstream),
        };
        let leader = match start_leader(&ctx, builder).await {
            Ok(leader) => leader,
            // A standby stopped before its promotion (the run is over): it never led.
            Err(e) if matches!(e.downcast_ref(), Some(tandem::cluster::Error::StandbyStopped)) => return Ok(()),
            Err(e) => return Err(anyhow!(e)),
        };
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
            if args.failover && args.standby {
                watch_in_order(&connection, commands, &reporter).await
            } else if args.failover {
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

/// The bench Leader whose upstream, when the Leader starts (not before: a
/// standby starts it only once promoted), opens one TCP connection to `addr`
/// and holds it for the process's life: the coordinator counts the host's
/// upstream connections on its end.
fn counted_upstream(upstream: &BenchUpstream, addr: String) -> tandem::leader::LeaderBuilder {
    let served = upstream.clone();
    tandem::leader::Leader::builder().channel_from::<BenchApi, _>(async move {
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| tandem::RemoteError::unavailable(format!("the bench's upstream at {addr}: {e}")))?;
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut stream = stream;
            // Held until the coordinator closes it (or this process dies).
            let _ = stream.read(&mut [0u8; 1]).await;
        });
        Ok(served)
    })
}

/// [`follower::watch`] that also checks every update: a worker fails (and so
/// the run) when an (epoch, seq) comes twice or goes backwards.
async fn watch_in_order(connection: &Connection, mut commands: control::Commands, reporter: &Reporter) -> Result<()> {
    use futures::StreamExt;
    let client = connection.client::<BenchApi>();
    client.ready().await?;
    let mut subscription = client.subscribe(crate::api::TICKING_KEY.to_string()).await?;
    let first = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .context("no first value within 10 s")?
        .context("subscription ended")?;
    let mut last = (first.epoch, first.seq);
    reporter.send(&Report::Value { epoch: first.epoch, seq: first.seq, recv_ns: mono_ns() });
    reporter.send(&Report::Ready);
    loop {
        tokio::select! {
            cmd = commands.next() => match cmd? {
                None | Some(Cmd::Quit) => return Ok(()),
                Some(other) => anyhow::bail!("a watching worker cannot {other:?}"),
            },
            update = subscription.next() => {
                let update = update.context("subscription ended")?;
                let at = (update.epoch, update.seq);
                anyhow::ensure!(at > last, "(epoch, seq) {at:?} delivered after {last:?}: twice or backwards");
                if at.0 != last.0 {
                    reporter.send(&Report::Value { epoch: at.0, seq: at.1, recv_ns: mono_ns() });
                }
                last = at;
            }
        }
    }
}

/// Reports a failure to the coordinator, and waits until the reports are written.
async fn finish(reporter: &Reporter, role: &str, result: Result<()>) -> Result<(), BoxError> {
    if let Err(error) = &result {
        reporter.send(&Report::Failed { error: format!("cluster {role}: {error:#}") });
    }
    reporter.flush().await;
    result.map_err(Into::into)
}
