//! The tandem Leader process: the bench upstream on a Unix socket, and the
//! publisher that feeds the fan-out phases. The cluster's agent runs the same
//! Leader ([`builder`]) and the same command loop ([`serve`]).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::FutureExt;
use tandem::Leader;
use tandem::leader::LeaderBuilder;

use crate::api::{BenchApi, BenchUpstream, Sink, Tick};
use crate::cli::MAX_ONE_EVENTS;
use crate::clock::NS_PER_MS;
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
            Cmd::PublishOne { key, rate, payload, window } => {
                let published = tokio::spawn(publish_one(upstream.clone(), key, rate, payload, window)).await??;
                reporter.send(&published);
            }
            Cmd::Stats => {
                let stats = leader.stats();
                let subscribers = stats.channels.iter().map(|c| c.subscribers).sum();
                reporter.send(&Report::Stats {
                    followers: stats.followers,
                    subscribers,
                    undelivered_dropped: stats.undelivered_dropped,
                });
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

/// The most a paced publisher catches up in one burst after it waited
/// (for `ready`, or for a late timer): 100 ms of its rate. Past that it lets
/// the schedule go rather than offer a burst the pacing never meant.
const MAX_CATCH_UP_MS: u64 = 100;

/// A paced publisher still waiting for room this long after its window gives
/// up on the events due (they count as not offered).
const STOP_AFTER_MS: u64 = 10;

/// Deliver-to-one: publishes on `key` during `window`, `rate` events per
/// second, one burst per millisecond (what the schedule says is due by then;
/// the last burst, at the window's end, completes the window's share), numbered
/// 0, 1, 2… in `Tick::idx`. Before each event it awaits [`Sink::ready`], so an
/// event finds room in the leader's queue for the key (`deliver_queue`)
/// instead of being dropped; the time it actually waited is reported. Events
/// still waiting for room [`STOP_AFTER_MS`] after the window are not sent.
async fn publish_one(
    upstream: BenchUpstream,
    key: String,
    rate: u64,
    payload: usize,
    window: Window,
) -> Result<Report> {
    let mut sink = upstream.sink_named(&key).with_context(|| format!("nobody subscribed to {key}"))?;
    let pad = Bytes::from(vec![0xA5; payload]);
    if rate == 0 {
        return Ok(flat_out_one(upstream, key, sink, pad, window).await);
    }
    let (mut seq, mut refused, mut waited_ns, mut skipped) = (0u64, 0u64, 0u64, 0u64);
    let max_behind = rate.saturating_mul(MAX_CATCH_UP_MS) / 1000;
    let stop_ns = window.end_ns + STOP_AFTER_MS * NS_PER_MS;
    let mut tick = window.start_ns;
    'window: loop {
        sleep_until_ns(tick).await;
        let now = mono_ns().min(window.end_ns);
        // Due by now: rate × elapsed, in integers (no drift over a long window).
        let due = u128::from(now - window.start_ns) * u128::from(rate) / 1_000_000_000;
        let mut due = u64::try_from(due).unwrap_or(u64::MAX).saturating_sub(skipped);
        if due.saturating_sub(seq) > max_behind {
            // Behind the schedule by more than the catch-up allowance: the
            // excess is never offered (the offered rate falls short, and the
            // report shows it); the numbers stay dense.
            skipped += due - seq - max_behind;
            due = seq + max_behind;
        }
        while seq < due {
            {
                let ready = sink.ready();
                tokio::pin!(ready);
                if ready.as_mut().now_or_never().is_none() {
                    let before = mono_ns();
                    ready.await;
                    let after = mono_ns();
                    waited_ns += after - before;
                    if after >= stop_ns {
                        break 'window;
                    }
                }
            }
            let event = Tick { key: 0, idx: seq, sent_ns: mono_ns(), pad: pad.clone() };
            if !sink.send(event) {
                // The leader dropped the key (every subscriber gone at once):
                // that event is lost; send to the key's next subscription.
                refused += 1;
                if let Some(next) = upstream.sink_named(&key) {
                    sink = next;
                }
            }
            seq += 1;
        }
        if now >= window.end_ns {
            break;
        }
        tick = ((now / NS_PER_MS + 1) * NS_PER_MS).min(window.end_ns);
    }
    Ok(Report::PublishedOne { events: seq, waited_ms: waited_ns as f64 / 1e6, refused })
}

/// Deliver-to-one flat out (`--one-rate 0`): from the window's start, bursts
/// of [`FLAT_OUT_BURST`] events as fast as [`Sink::ready`] allows, until the
/// window ends (or [`MAX_ONE_EVENTS`] were sent).
async fn flat_out_one(upstream: BenchUpstream, key: String, mut sink: Sink, pad: Bytes, window: Window) -> Report {
    let (mut seq, mut refused, mut waited_ns) = (0u64, 0u64, 0u64);
    sleep_until_ns(window.start_ns).await;
    'window: while seq < MAX_ONE_EVENTS {
        for _ in 0..FLAT_OUT_BURST {
            {
                let ready = sink.ready();
                tokio::pin!(ready);
                if ready.as_mut().now_or_never().is_none() {
                    let before = mono_ns();
                    ready.await;
                    waited_ns += mono_ns() - before;
                }
            }
            let now = mono_ns();
            if now >= window.end_ns {
                break 'window;
            }
            if !sink.send(Tick { key: 0, idx: seq, sent_ns: now, pad: pad.clone() }) {
                refused += 1;
                if let Some(next) = upstream.sink_named(&key) {
                    sink = next;
                }
            }
            seq += 1;
        }
        tokio::task::yield_now().await;
    }
    Report::PublishedOne { events: seq, waited_ms: waited_ns as f64 / 1e6, refused }
}

/// Events the flat-out publisher sends between two yields to the runtime.
const FLAT_OUT_BURST: usize = 64;
