//! Failover in standalone mode, under steady subscriptions.
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

use crate::clock::mono_ns;
use crate::control::{Cmd, Report};
use crate::coordinator::{Ctx, STARTUP};
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
