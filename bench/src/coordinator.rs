//! The coordinator: sets up the [`Ctx`] (the private directory, the control
//! channel and every child process) and runs the phases in order.
//!
//! ```text
//! for N in --followers, for transport in --transports:
//!     start a group (1 server process + N client processes)
//!     RSS idle -> invoke c=1 -> invoke c=64 (RSS) -> subscribe -> fan-out flat out (RSS) -> fan-out paced
//!     (tarpc: invoke only, it has no server-to-client stream)
//!     stop the group
//! deliver-to-one: one leader, 4 followers on one key, one killed and replaced every second
//! failover: standalone group, kill -9 the leader, repeat;
//!           cluster (master, agent, workers), kill -9 the agent, repeat
//! memory:   one leader, 1,000 follower connections in a few processes
//! ```

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cli::{Config, Phase};
use crate::context::Ctx;
use crate::placement::Placement;
use crate::results::Results;
use crate::transport::Transport;
use crate::{failover, memory, one, phases, plot, runner, table};

/// Runs the whole bench and writes its outputs.
pub async fn run(config: Config) -> Result<()> {
    let started = Instant::now();
    let mut ctx = Ctx::new(config.clone(), started)?;
    let mut results = Results::new(config.clone());
    ctx.progress(format!(
        "tandem bench: N = {:?}, transports {:?}, payload {} B, {} s phases",
        config.followers, config.transports, config.payload_bytes, config.seconds
    ));

    let groups = config.runs(Phase::Invoke) || config.runs(Phase::Fanout);
    for &followers in config.followers.iter().filter(|_| groups) {
        for &transport in &config.transports {
            ctx.progress(match transport {
                Transport::Messenger => {
                    format!("{transport} N={followers}: starting a cluster master, its agent and {followers} workers")
                }
                _ => format!("{transport} N={followers}: starting 1 server + {followers} client processes"),
            });
            let group = runner::start(&mut ctx, transport, followers).await?;
            results.memory.samples.extend(group.rss("idle"));
            if config.runs(Phase::Invoke) {
                let runs = [(1, Placement::Os), (config.in_flight, Placement::Os), (1, Placement::OneCpu)];
                for (concurrency, placement) in runs {
                    let on = if placement == Placement::OneCpu { ", every process on CPU 0" } else { "" };
                    ctx.progress(format!(
                        "{transport} N={followers}: invoke, {concurrency} in flight per follower{on}"
                    ));
                    let (invoke, rss) = phases::invoke(&mut ctx, &group, concurrency, placement).await?;
                    results.invoke.push(invoke);
                    if concurrency > 1 {
                        results.memory.samples.extend(rss);
                    }
                }
            }
            if config.runs(Phase::Fanout) && transport.fans_out() {
                phases::subscribe(&mut ctx, &group).await?;
                ctx.progress(format!("{transport} N={followers}: fan-out, flat out over {} keys", config.fanout_keys));
                let (fanout, rss) = phases::fanout(&mut ctx, &group, None).await?;
                results.fanout.push(fanout);
                results.memory.samples.extend(rss);
                let interval = config.fanout_interval_ms;
                ctx.progress(format!("{transport} N={followers}: fan-out, one event per {interval} ms"));
                let (fanout, _) = phases::fanout(&mut ctx, &group, Some(interval)).await?;
                results.fanout.push(fanout);
            }
            group.stop(&mut ctx).await;
        }
    }

    if config.runs(Phase::One) {
        ctx.progress(format!(
            "deliver-to-one: {} followers, {} events/s offered for {} s, SIGKILL one every {} ms",
            config.one_followers, config.one_rate, config.one_seconds, config.one_kill_ms
        ));
        let one = one::run(&mut ctx).await?;
        ctx.progress(format!(
            "deliver-to-one: {} published, {} lost, {} duplicates ({} unmarked) over {} kills",
            one.published, one.lost, one.duplicates, one.unmarked_duplicates, one.kills
        ));
        results.deliver_one = Some(one);
    }

    if config.runs(Phase::Failover) {
        ctx.progress(format!(
            "failover: {} standalone processes, kill -9 the leader {} times",
            config.failover_processes, config.failover_repeats
        ));
        results.failover.standalone = Some(failover::run(&mut ctx).await?);
        ctx.progress(format!(
            "failover: a cluster with {} workers over the {}, kill -9 the agent {} times",
            config.failover_workers, config.failover_link, config.failover_repeats
        ));
        results.failover.cluster_agent = Some(failover::cluster_agent(&mut ctx).await?);
        ctx.progress(format!(
            "failover: a cluster with a hot standby, {} workers over the {}, kill -9 the agent {} times",
            config.failover_workers,
            config.failover_link,
            failover::standby_kills(config.quick, config.failover_repeats)
        ));
        results.failover.cluster_standby = Some(failover::cluster_standby(&mut ctx).await?);
    }

    if config.runs(Phase::Memory) {
        ctx.progress(format!(
            "memory: one leader, {} follower connections in {} processes",
            config.mass_followers, config.mass_processes
        ));
        results.memory.leader_at_scale = Some(memory::leader_at_scale(&mut ctx).await?);
    }
    drop(ctx);

    results.finish(started.elapsed());
    print!("{}", table::render(&results));
    if let Some(path) = &config.json {
        write_json(path, &results)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &config.plot {
        plot::draw(path, &results)?;
        eprintln!("wrote {}", path.display());
    }
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn write_json(path: &Path, results: &Results) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut text = serde_json::to_string_pretty(results)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}
