//! The leader's memory at scale: one leader process, 1,000 follower connections
//! (each a full tandem Connection with its own socket and driver, subscribed
//! to one key) spread over a few processes.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::Result;

use crate::context::Ctx;
use crate::control::{Cmd, Report};
use crate::procs::rss_kib;
use crate::results::LeaderAtScale;

/// Connecting 1,000 followers takes a while on a busy machine.
const CONNECT: Duration = Duration::from_secs(120);
/// Lets heartbeats and allocator caches settle before sampling.
const SETTLE: Duration = Duration::from_millis(500);

pub async fn leader_at_scale(ctx: &mut Ctx) -> Result<LeaderAtScale> {
    let (total, processes) = (ctx.config.mass_followers, ctx.config.mass_processes);
    let group = ctx.next_group();
    let socket: OsString = ctx.path(&format!("g{group}.sock")).into();
    let common: Vec<OsString> = vec!["--socket".into(), socket, "--group".into(), group.to_string().into()];
    let mut leader_args: Vec<OsString> = vec!["leader".into()];
    leader_args.extend(common.iter().cloned());
    leader_args.extend(["--threads".into(), ctx.config.server_threads.to_string().into()]);
    ctx.spawn(leader_args)?;
    let leader = ctx.hellos(group, "server", 1).await?[0];
    let mut all = vec![leader];
    let result = async {
        ctx.ready(&[leader], "the leader").await?;
        tokio::time::sleep(SETTLE).await;
        let leader_rss_idle_kib = rss_kib(leader).unwrap_or(0);
        for i in 0..processes {
            let count = total / processes + usize::from(i < total % processes);
            let mut args: Vec<OsString> = vec!["mass".into()];
            args.extend(common.iter().cloned());
            args.extend(["--count".into(), count.to_string().into()]);
            ctx.spawn(args)?;
        }
        let followers = ctx.hellos(group, "mass", processes).await?;
        all.extend(&followers);
        ctx.control
            .collect(&followers, CONNECT, "1,000 followers", |r| matches!(r, Report::Ready).then_some(()))
            .await?;
        tokio::time::sleep(SETTLE).await;
        ctx.control.send(leader, &Cmd::Stats)?;
        let (connected, subscribers) = ctx
            .control
            .collect(&[leader], Duration::from_secs(10), "leader stats", |r| match r {
                Report::Stats { followers, subscribers, .. } => Some((*followers, *subscribers)),
                _ => None,
            })
            .await?[&leader];
        let leader_rss_kib = rss_kib(leader).unwrap_or(0);
        let follower_rss: Vec<u64> = followers.iter().filter_map(|&pid| rss_kib(pid)).collect();
        let follower_process_rss_kib_mean = follower_rss.iter().sum::<u64>() / follower_rss.len().max(1) as u64;
        anyhow::Ok(LeaderAtScale {
            followers_target: total,
            followers_connected: connected,
            subscribers,
            processes,
            leader_rss_idle_kib,
            leader_rss_kib,
            leader_kib_per_follower: leader_rss_kib.saturating_sub(leader_rss_idle_kib) as f64
                / connected.max(1) as f64,
            follower_process_rss_kib_mean,
            connections_per_process: total as f64 / processes as f64,
            follower_kib_per_connection: None,
        })
    }
    .await;
    let _ = ctx.control.send_all(&all, &Cmd::Quit);
    ctx.procs.reap(&all[1..], Duration::from_secs(5)).await;
    ctx.procs.reap(&all[..1], Duration::from_secs(5)).await;
    ctx.control.forget(&all);
    result
}
