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

use std::collections::HashMap;
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
    /// A new agent that said hello and has not reported serving yet.
    starting: Option<u32>,
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
    };
    let group = args.group;
    let master = ctx.spawn(args.argv())?;
    let mut state = ClusterState::default();
    let mut samples_ms = Vec::with_capacity(repeats);
    let mut serving_ms = Vec::with_capacity(repeats);
    let mut agents = Vec::new();
    let result = async {
        pump_cluster(ctx, &mut state, group, STARTUP, "the cluster's agent to serve", |s| s.agent.is_some()).await?;
        let pids = ctx.hellos(group, "client", workers).await?;
        state.workers.extend(pids.iter().map(|&pid| (pid, Member::default())));
        pump_cluster(ctx, &mut state, group, STARTUP, "the cluster's workers to hold a value", |s| {
            s.workers.values().all(|m| m.ready)
        })
        .await?;
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
                let ours = state.workers.contains_key(&m.pid) || state.starting == Some(m.pid);
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
            Report::Hello { .. } => state.starting = Some(pid),
            Report::Serving { epoch, at_ns } => {
                state.agent = Some(Agent { pid, epoch, serving_ns: at_ns });
                state.starting = None;
            }
            Report::Gone => bail!("the cluster's agent {pid} exited on its own"),
            _ => {}
        }
    }
    Ok(())
}
