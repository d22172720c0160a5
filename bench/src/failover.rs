//! Failover under steady subscriptions: standalone mode ([`run`]) and the
//! cluster's agent ([`cluster_agent`]).
//!
//! Standalone:
//!
//! ```text
//! P processes share a name and a private dir (tandem::Standalone: flock election)
//! the first one leads; its upstream's key changes every 10 ms; every process is subscribed
//! repeat: kill -9 the leader at t0 (CLOCK_MONOTONIC)
//!         each survivor notes when it receives its first value from a newer epoch (t_i)
//!         failover = max(t_i) - t0; a replacement process joins the group
//! ```
//!
//! The new leader's upstream hands each subscriber the key's current value
//! (as a real store does), so the figure covers: the followers noticing the
//! dead socket, the election, the new leader binding and starting its
//! upstream, every survivor reconnecting and resubscribing, and the value
//! arriving.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::Instant;

use crate::cli::ClusterArgs;
use crate::clock::mono_ns;
use crate::context::{Ctx, STARTUP};
use crate::control::{Cmd, Report};
use crate::procs::kill_grandchild;
use crate::results::FailoverResult;

/// How long the group runs steadily before each kill.
const STEADY: Duration = Duration::from_millis(200);
/// How long the survivors may take to get a value from the next leader.
const RECOVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Member {
    leader: bool,
    epoch: u64,
    ready: bool,
    value_epoch: u64,
    value_ns: u64,
}

type Members = HashMap<u32, Member>;

pub async fn run(ctx: &mut Ctx) -> Result<FailoverResult> {
    let processes = ctx.config.failover_processes;
    let repeats = ctx.config.failover_repeats;
    let group = ctx.next_group();
    let argv: Vec<OsString> = vec![
        "standalone".into(),
        "--dir".into(),
        ctx.path("standalone").into(),
        "--name".into(),
        "bench".into(),
        "--group".into(),
        group.to_string().into(),
    ];
    let mut members = Members::new();
    let mut samples_ms = Vec::with_capacity(repeats);
    let result = async {
        // One at a time, so the first one is the leader and the others join it.
        for _ in 0..processes {
            join(ctx, &mut members, &argv, group).await?;
        }
        for repeat in 0..repeats {
            tokio::time::sleep(STEADY).await;
            let (&leader, old) = members
                .iter()
                .filter(|(_, m)| m.leader)
                .max_by_key(|(_, m)| m.epoch)
                .map(|(pid, m)| (pid, m.epoch))
                .context("no leader in the standalone group")?;
            members.remove(&leader);
            ctx.control.forget(&[leader]);
            let killed_ns = mono_ns();
            ctx.procs.kill(leader)?;
            pump(ctx, &mut members, RECOVERY, "the survivors to get a value from the next leader", |members| {
                members.values().all(|m| m.value_epoch > old) && members.values().any(|m| m.leader && m.epoch > old)
            })
            .await?;
            let last = members.values().map(|m| m.value_ns).max().unwrap_or(killed_ns);
            let ms = last.saturating_sub(killed_ns) as f64 / 1e6;
            ctx.progress(format!("failover {}/{repeats}: {ms:.1} ms", repeat + 1));
            samples_ms.push(ms);
            join(ctx, &mut members, &argv, group).await?;
        }
        anyhow::Ok(())
    }
    .await;
    let pids: Vec<u32> = members.keys().copied().collect();
    let _ = ctx.control.send_all(&pids, &Cmd::Quit);
    ctx.procs.reap(&pids, Duration::from_secs(3)).await;
    ctx.control.forget(&pids);
    result?;
    Ok(FailoverResult::new(processes, samples_ms))
}

/// Starts one more standalone process and waits until it holds a value.
async fn join(ctx: &mut Ctx, members: &mut Members, argv: &[OsString], group: u32) -> Result<()> {
    ctx.spawn(argv.to_vec())?;
    let pid = ctx.hellos(group, "standalone", 1).await?[0];
    members.insert(pid, Member::default());
    pump(ctx, members, STARTUP, "a standalone process to be ready", |members| members[&pid].ready).await
}

/// Applies the group's reports to `members` until `done` holds.
async fn pump(
    ctx: &mut Ctx,
    members: &mut Members,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Members) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done(members) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (pid, report) =
            ctx.control.wait(left, what, |m| members.contains_key(&m.pid).then(|| (m.pid, m.report.clone()))).await?;
        let member = members.get_mut(&pid).expect("picked members only");
        match report {
            Report::Role { leader, epoch } => (member.leader, member.epoch) = (leader, epoch),
            Report::Value { epoch, recv_ns, .. } => (member.value_epoch, member.value_ns) = (epoch, recv_ns),
            Report::Ready => member.ready = true,
            Report::Gone => bail!("standalone process {pid} exited on its own"),
            _ => {}
        }
    }
    Ok(())
}

/// The cluster's current agent.
#[derive(Debug, Clone, Copy)]
struct Agent {
    pid: u32,
    epoch: u64,
    serving_ns: u64,
}

/// What the coordinator knows of a failover cluster.
#[derive(Debug, Default)]
struct ClusterState {
    agent: Option<Agent>,
    /// Agents that said hello and have not reported serving yet (a new agent,
    /// and with a standby, the standbys).
    starting: HashSet<u32>,
    /// Every agent process that said hello (to stop them at the end).
    agents: HashSet<u32>,
    workers: Members,
}

pub async fn cluster_agent(ctx: &mut Ctx) -> Result<FailoverResult> {
    let (workers, repeats) = (ctx.config.failover_workers, ctx.config.failover_repeats);
    let args = ClusterArgs {
        group: ctx.next_group(),
        workers,
        threads: ctx.config.server_threads,
        link: ctx.config.failover_link(),
        failover: true,
        restart_ms: ctx.config.agent_restart_ms,
        standby: false,
        upstream: None,
    };
    let group = args.group;
    let master = ctx.spawn(args.argv())?;
    let mut state = ClusterState::default();
    let mut samples_ms = Vec::with_capacity(repeats);
    let mut serving_ms = Vec::with_capacity(repeats);
    let mut agents = Vec::new();
    let result = async {
        cluster_up(ctx, &mut state, group, workers).await?;
        for repeat in 0..repeats {
            tokio::time::sleep(STEADY).await;
            let old = state.agent.take().context("no agent")?;
            agents.push(old.pid);
            ctx.control.forget(&[old.pid]);
            let killed_ns = mono_ns();
            kill_grandchild(old.pid, master)?;
            pump_cluster(ctx, &mut state, group, RECOVERY, "the workers to get a value from the next agent", |s| {
                s.agent.is_some_and(|a| a.epoch > old.epoch) && s.workers.values().all(|m| m.value_epoch > old.epoch)
            })
            .await?;
            let last = state.workers.values().map(|m| m.value_ns).max().unwrap_or(killed_ns);
            let ms = last.saturating_sub(killed_ns) as f64 / 1e6;
            let serving = state.agent.map_or(0, |a| a.serving_ns.saturating_sub(killed_ns)) as f64 / 1e6;
            ctx.progress(format!(
                "agent failover {}/{repeats}: {ms:.1} ms (new Leader serving after {serving:.1} ms)",
                repeat + 1
            ));
            samples_ms.push(ms);
            serving_ms.push(serving);
        }
        anyhow::Ok(())
    }
    .await;
    // The master stops its workers and agent, then exits; or is killed, and they die with it.
    let all: Vec<u32> =
        state.workers.keys().copied().chain(state.agent.map(|a| a.pid)).chain(agents).chain([master]).collect();
    ctx.control.forget(&all);
    let _ = ctx.control.send(master, &Cmd::Quit);
    ctx.procs.reap(&[master], Duration::from_secs(6)).await;
    result?;
    Ok(FailoverResult::cluster_agent(workers, ctx.config.failover_link, args.restart_ms, samples_ms, serving_ms))
}

/// Waits until the cluster's agent serves and its `workers` hold a value.
async fn cluster_up(ctx: &mut Ctx, state: &mut ClusterState, group: u32, workers: usize) -> Result<()> {
    pump_cluster(ctx, state, group, STARTUP, "the cluster's agent to serve", |s| s.agent.is_some()).await?;
    let pids = ctx.hellos(group, "client", workers).await?;
    state.workers.extend(pids.iter().map(|&pid| (pid, Member::default())));
    pump_cluster(ctx, state, group, STARTUP, "the cluster's workers to hold a value", |s| {
        s.workers.values().all(|m| m.ready)
    })
    .await
}

/// Applies the cluster's reports to `state` until `done` holds: hellos of new
/// agents, their `Serving`, and the workers' values.
async fn pump_cluster(
    ctx: &mut Ctx,
    state: &mut ClusterState,
    group: u32,
    timeout: Duration,
    what: &str,
    done: impl Fn(&ClusterState) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done(state) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (pid, report) = ctx
            .control
            .wait(left, what, |m| {
                let new_agent =
                    matches!(&m.report, Report::Hello { group: g, role, .. } if *g == group && role == "server");
                let ours = state.workers.contains_key(&m.pid) || state.starting.contains(&m.pid);
                (new_agent || ours).then(|| (m.pid, m.report.clone()))
            })
            .await?;
        if let Some(member) = state.workers.get_mut(&pid) {
            match report {
                Report::Value { epoch, recv_ns, .. } => (member.value_epoch, member.value_ns) = (epoch, recv_ns),
                Report::Ready => member.ready = true,
                Report::Gone => bail!("cluster worker {pid} exited"),
                _ => {}
            }
            continue;
        }
        match report {
            Report::Hello { .. } => {
                state.starting.insert(pid);
                state.agents.insert(pid);
            }
            Report::Serving { epoch, at_ns } => {
                state.agent = Some(Agent { pid, epoch, serving_ns: at_ns });
                state.starting.remove(&pid);
            }
            Report::Gone => bail!("the cluster's agent {pid} exited on its own"),
            _ => {}
        }
    }
    Ok(())
}

/// The standby row's kills: at least 50 in a full run (the issue's count),
/// `--failover-repeats` with `--quick`.
pub fn standby_kills(quick: bool, repeats: usize) -> usize {
    if quick { repeats } else { repeats.max(50) }
}

/// How long, after a takeover, the coordinator waits for the dead agent's
/// upstream connection to be seen closed (the count back at 1).
const CONNECTIONS_SETTLE: Duration = Duration::from_secs(2);

/// The cluster's agent with a hot standby (`--standby`): kill -9 of the agent
/// once the standby mirrors it, until every worker holds a value of the
/// promoted standby's Leader. The agent's upstream ticks every 5 ms, each
/// Leader opens one TCP connection to the coordinator when it starts (the
/// host's upstream connections, counted after each takeover), and every
/// worker fails the run if an (epoch, seq) comes twice or backwards.
pub async fn cluster_standby(ctx: &mut Ctx) -> Result<FailoverResult> {
    let workers = ctx.config.failover_workers;
    let repeats = standby_kills(ctx.config.quick, ctx.config.failover_repeats);
    let upstream = Upstream::listen().await?;
    let args = ClusterArgs {
        group: ctx.next_group(),
        workers,
        threads: ctx.config.server_threads,
        link: ctx.config.failover_link(),
        failover: true,
        restart_ms: ctx.config.agent_restart_ms,
        standby: true,
        upstream: Some(upstream.addr.clone()),
    };
    let group = args.group;
    let name = format!("bench-g{group}");
    let master = ctx.spawn(args.argv())?;
    let mut state = ClusterState::default();
    let mut run = StandbyRun::default();
    let result = async {
        cluster_up(ctx, &mut state, group, workers).await?;
        let mut control = tandem::cluster::control::ControlClient::connect(&name).await?;
        for repeat in 0..repeats {
            tokio::time::sleep(STEADY).await;
            let old = state.agent.take().context("no agent")?;
            let standby = standby_mirroring(&mut control, old.epoch).await?;
            ctx.control.forget(&[old.pid]);
            let killed_ns = mono_ns();
            kill_grandchild(old.pid, master)?;
            pump_cluster(
                ctx,
                &mut state,
                group,
                RECOVERY,
                "the workers to get a value from the promoted standby",
                |s| {
                    s.agent.is_some_and(|a| a.epoch > old.epoch)
                        && s.workers.values().all(|m| m.value_epoch > old.epoch)
                },
            )
            .await?;
            let last = state.workers.values().map(|m| m.value_ns).max().unwrap_or(killed_ns);
            let ms = last.saturating_sub(killed_ns) as f64 / 1e6;
            let agent = state.agent.context("no agent")?;
            let serving = agent.serving_ns.saturating_sub(killed_ns) as f64 / 1e6;
            run.promotions += usize::from(agent.pid == standby);
            let connections = upstream.settled(1, CONNECTIONS_SETTLE).await;
            ctx.progress(format!(
                "standby failover {}/{repeats}: {ms:.1} ms (promoted Leader serving after {serving:.1} ms; \
                 upstream connections {connections})",
                repeat + 1
            ));
            run.samples_ms.push(ms);
            run.serving_ms.push(serving);
            run.connections_after.push(connections);
        }
        anyhow::Ok(())
    }
    .await;
    let all: Vec<u32> = state.workers.keys().copied().chain(state.agents.iter().copied()).chain([master]).collect();
    ctx.control.forget(&all);
    let _ = ctx.control.send(master, &Cmd::Quit);
    ctx.procs.reap(&[master], Duration::from_secs(6)).await;
    result?;
    Ok(FailoverResult::cluster_standby(
        workers,
        ctx.config.failover_link,
        run.samples_ms,
        run.serving_ms,
        run.connections_after,
        upstream.max(),
        run.promotions,
    ))
}

/// What the standby row measured.
#[derive(Debug, Default)]
struct StandbyRun {
    samples_ms: Vec<f64>,
    serving_ms: Vec<f64>,
    connections_after: Vec<usize>,
    /// Takeovers by the standby that mirrored the killed agent.
    promotions: usize,
}

/// Waits until the cluster's status shows its standby online, mirroring the
/// Leader of `epoch` (so the kill is a promotion); returns its pid.
async fn standby_mirroring(control: &mut tandem::cluster::control::ControlClient, epoch: u64) -> Result<u32> {
    use tandem::cluster::control::{ProcessInfo, Request};
    let deadline = Instant::now() + STARTUP;
    loop {
        let rows: Vec<ProcessInfo> = control.call_as(Request::Status).await?;
        let standby = rows.iter().find(|r| r.role == "standby" && r.state == "online" && r.epoch == Some(epoch));
        if let Some(pid) = standby.and_then(|r| r.pid) {
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            bail!("no standby mirroring epoch {epoch} within {STARTUP:?}: {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The bench's upstream as the coordinator sees it: a TCP listener each
/// Leader connects to when it starts; it counts the connections open now and
/// the most ever open at once.
struct Upstream {
    addr: String,
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn listen() -> Result<Upstream> {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (open, most) = (std::sync::Arc::default(), std::sync::Arc::default());
        let (o, m): (std::sync::Arc<std::sync::atomic::AtomicUsize>, std::sync::Arc<std::sync::atomic::AtomicUsize>) =
            (std::sync::Arc::clone(&open), std::sync::Arc::clone(&most));
        let accept = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                let o = std::sync::Arc::clone(&o);
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    // The Leader never writes: EOF (or an error) is its process gone.
                    let _ = stream.read(&mut [0u8; 1]).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Upstream { addr, open, most, accept })
    }

    /// The open connections once they equal `want`, or after `within` (then whatever they are).
    async fn settled(&self, want: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let now = self.open.load(std::sync::atomic::Ordering::SeqCst);
            if now == want || Instant::now() >= deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn max(&self) -> usize {
        self.most.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
