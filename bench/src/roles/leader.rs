//! The tandem Leader process: the bench upstream on a Unix socket, and the
//! publisher that feeds the fan-out phases. The cluster's agent runs the same
//! Leader ([`builder`]) and the same command loop ([`serve`]).

use std::path::PathBuf;

use anyhow::{Result, bail};
use bytes::Bytes;
use tandem::Leader;
use tandem::leader::LeaderBuilder;

use crate::api::{BenchApi, BenchUpstream, Sink, Tick};
use crate::clock::{Window, mono_ns, sleep_until_ns};
use crate::control::{Cmd, Commands, Report, Reporter};

pub async fn run(socket: PathBuf, commands: Commands, reporter: Reporter) -> Result<()> {
    let upstream = BenchUpstream::default();
    let leader = builder(&upstream).epoch(1).start();
    leader.bind_unix(&socket)?;
    serve(&leader, &upstream, commands, reporter).await
}

/// A Leader serving `upstream` on the bench channel.
pub fn builder(upstream: &BenchUpstream) -> LeaderBuilder {
    let served = upstream.clone();
    Leader::builder().channel::<BenchApi, _>(served)
}

/// Reports ready, then obeys the coordinator until `Quit` (or until it has gone).
pub async fn serve(
    leader: &Leader,
    upstream: &BenchUpstream,
    mut commands: Commands,
    reporter: Reporter,
) -> Result<()> {
    reporter.send(&Report::Ready);
    while let Some(cmd) = commands.next().await? {
        match cmd {
            Cmd::Publish { keys, interval_us, payload, window } => {
                let sinks = upstream.sinks(keys)?;
                // On a runtime worker, like a real upstream client's event callback.
                let events = tokio::spawn(publish(upstream.clone(), sinks, interval_us, payload, window)).await?;
                reporter.send(&Report::Published { events });
            }
            Cmd::Stats => {
                let stats = leader.stats();
                let subscribers = stats.channels.iter().map(|c| c.subscribers).sum();
                reporter.send(&Report::Stats { followers: stats.followers, subscribers });
            }
            Cmd::Quit => break,
            other => bail!("the leader cannot {other:?}"),
        }
    }
    Ok(())
}

/// Publishes during `window`: bursts of one event per key, flat out (as fast
/// as the followers take them: like the floor's publisher, it waits while a
/// follower's queue is full, with [`Sink::ready`]), or one event every
/// `interval_us` round the keys.
async fn publish(
    upstream: BenchUpstream,
    mut sinks: Vec<Sink>,
    interval_us: u64,
    payload: usize,
    window: Window,
) -> u64 {
    let pad = Bytes::from(vec![0xA5; payload]);
    let keys = sinks.len();
    let mut idx = vec![0u64; keys];
    let mut published = 0u64;
    let mut emit = |sinks: &mut Vec<Sink>, key: usize, now: u64| {
        let tick = Tick { key: key as u32, idx: idx[key], sent_ns: now, pad: pad.clone() };
        if !sinks[key].send(tick) {
            // The leader dropped the key (its only subscriber lost its link)
            // and may have subscribed it again since: like a real upstream,
            // deliver to the current subscription from the next event on.
            if let Some(sink) = upstream.sink(key) {
                sinks[key] = sink;
            }
        }
        idx[key] += 1;
        published += 1;
    };
    sleep_until_ns(window.start_ns).await;
    if interval_us == 0 {
        loop {
            // Every key has the same subscribers (each follower takes them
            // all), and a follower's queue is shared by its keys: one look
            // per burst is a look for each key.
            sinks[0].ready().await;
            let now = mono_ns();
            if now >= window.end_ns {
                break;
            }
            for key in 0..keys {
                emit(&mut sinks, key, now);
            }
            tokio::task::yield_now().await;
        }
    } else {
        for i in 0u64.. {
            let at = window.start_ns + i * interval_us * 1000;
            if at >= window.end_ns {
                break;
            }
            sleep_until_ns(at).await;
            emit(&mut sinks, i as usize % keys, mono_ns());
        }
    }
    published
}
