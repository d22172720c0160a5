//! The measured phases on a group, identical for every transport: the same
//! commands go to the same kinds of processes, which count the same way.

use std::time::Duration;

use anyhow::Result;

use crate::clock::{Window, sleep_until_ns};
use crate::context::{Ctx, STARTUP};
use crate::control::{Cmd, Report};
use crate::hist::{self, Hist};
use crate::placement::Placement;
use crate::results::{FanoutResult, InvokeResult, RssSample};
use crate::runner::Group;

/// Slack on top of a phase's length before the coordinator gives up on its results.
const RESULTS_GRACE: Duration = Duration::from_secs(60);

/// Every client calls with `concurrency` in flight: warm-up, then one window.
pub async fn invoke(
    ctx: &mut Ctx,
    group: &Group,
    concurrency: usize,
    placement: Placement,
) -> Result<(InvokeResult, Vec<RssSample>)> {
    group.place(placement)?;
    let payload = ctx.config.payload_bytes;
    let window = Window::starting_in(ctx.config.warmup(), ctx.config.phase());
    ctx.control.send_all(&group.clients, &Cmd::Invoke { concurrency, payload, window })?;
    sleep_until_ns(window.middle_ns()).await;
    let rss = group.rss("invoke_load");
    let reports = ctx
        .control
        .collect(&group.clients, ctx.config.phase() + RESULTS_GRACE, "invoke results", |r| match r {
            Report::Invoked { calls, errors, links_lost, hist } => Some((*calls, *errors, *links_lost, hist.clone())),
            _ => None,
        })
        .await;
    group.place(Placement::Os)?;
    let reports = reports?;
    let mut latency = hist::new();
    let (mut calls, mut errors, mut links_lost) = (0, 0, 0);
    for (c, e, l, wire) in reports.values() {
        calls += c;
        errors += e;
        links_lost += l;
        hist::add_wire(&mut latency, wire);
    }
    let seconds = window.seconds();
    let result = InvokeResult {
        transport: group.transport,
        followers: group.clients.len(),
        concurrency,
        placement,
        payload_bytes: payload,
        seconds,
        calls,
        errors,
        links_lost,
        calls_per_sec: calls as f64 / seconds,
        p50_us: hist::quantile_us(&latency, 0.50),
        p99_us: hist::quantile_us(&latency, 0.99),
        p999_us: hist::quantile_us(&latency, 0.999),
        max_us: latency.max() as f64 / 1e3,
    };
    Ok((result, rss))
}

/// Every client subscribes to the fan-out keys.
pub async fn subscribe(ctx: &mut Ctx, group: &Group) -> Result<()> {
    ctx.control.send_all(&group.clients, &Cmd::Subscribe { keys: ctx.config.fanout_keys })?;
    ctx.control
        .collect(&group.clients, STARTUP, "subscriptions", |r| matches!(r, Report::Subscribed).then_some(()))
        .await?;
    Ok(())
}

/// The server publishes one stream of events to every client: flat out
/// (`interval_ms` None) or paced; each client counts what it receives.
pub async fn fanout(ctx: &mut Ctx, group: &Group, interval_ms: Option<u64>) -> Result<(FanoutResult, Vec<RssSample>)> {
    let config = &ctx.config;
    let (keys, payload) = (config.fanout_keys, config.payload_bytes);
    let window = Window::starting_in(Duration::from_millis(100), config.phase());
    let interval_us = interval_ms.map_or(0, |ms| ms * 1000);
    let grace = config.phase() + RESULTS_GRACE;
    ctx.control.send(group.server, &Cmd::Publish { keys, interval_us, payload, window })?;
    ctx.control.send_all(&group.clients, &Cmd::Receive { window })?;
    sleep_until_ns(window.middle_ns()).await;
    let rss = group.rss("fanout_load");
    let published = ctx
        .control
        .collect(&[group.server], grace, "the publisher's count", |r| match r {
            Report::Published { events } => Some(*events),
            _ => None,
        })
        .await?[&group.server];
    let received = ctx
        .control
        .collect(&group.clients, grace, "fan-out counts", |r| match r {
            Report::Received { events, gaps, links_lost, hist } => Some((*events, *gaps, *links_lost, hist.clone())),
            _ => None,
        })
        .await?;
    let seconds = window.seconds();
    let mut latency: Hist = hist::new();
    let (mut delivered, mut gaps, mut links_lost, mut min) = (0u64, 0u64, 0u64, u64::MAX);
    for (events, g, l, wire) in received.values() {
        delivered += events;
        gaps += g;
        links_lost += l;
        min = min.min(*events);
        hist::add_wire(&mut latency, wire);
    }
    let followers = group.clients.len();
    let expected = published * followers as u64;
    let result = FanoutResult {
        transport: group.transport,
        followers,
        mode: if interval_ms.is_some() { "paced" } else { "max_rate" },
        interval_ms,
        keys,
        payload_bytes: payload,
        seconds,
        published,
        published_per_sec: published as f64 / seconds,
        delivered_per_sec_min: min as f64 / seconds,
        delivered_per_sec_mean: delivered as f64 / followers as f64 / seconds,
        delivered_total: delivered,
        missed_total: expected.saturating_sub(delivered),
        missed_ratio: if expected == 0 { 0.0 } else { expected.saturating_sub(delivered) as f64 / expected as f64 },
        gaps_total: gaps,
        links_lost,
        p50_us: hist::quantile_us(&latency, 0.50),
        p99_us: hist::quantile_us(&latency, 0.99),
        p999_us: hist::quantile_us(&latency, 0.999),
    };
    Ok((result, rss))
}
