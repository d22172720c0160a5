//! Deliver-to-one under follower kills: is every event delivered, and is
//! every duplicate marked?
//!
//! ```text
//! coordinator: 1 leader + F followers (F = --one-followers, 4), each `subscribe_one("jobs")`
//! leader:      publishes seq 0, 1, 2… on "jobs" at --one-rate (per-ms bursts, awaiting EventSender::ready)
//! follower:    per batch read: Delivered{seqs, positions, redelivered} ──written to the socket──> then ack
//! every --one-kill-ms: SIGKILL the next follower (round-robin; from a timer thread, at a moment
//!                      independent of the reports), start a replacement at once
//! window over: the publisher reports its count; wait until every seq is received (at most DRAIN),
//!              then until the reports go quiet (QUIET); count
//! ```
//!
//! The order report-then-ack makes the count exact across kills: a seq is
//! counted once its report is in the coordinator's socket buffer, which a
//! SIGKILL does not empty; a delivery not acked is redelivered by the leader.
//! So a seq never reported was lost by tandem, and a seq reported twice is a
//! duplicate, which the leader must have marked `redelivered`.

use std::collections::HashSet;
use std::ffi::OsString;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::api::ONE_KEY;
use crate::cli::MAX_ONE_EVENTS;
use crate::clock::{NS_PER_MS, Window, mono_ns};
use crate::context::Ctx;
use crate::control::{Cmd, Incoming, Report};
use crate::procs::kill_at;
use crate::results::DeliverOneResult;

/// How long after the window the followers may take to receive every published seq.
const DRAIN: Duration = Duration::from_secs(10);
/// Once every seq is in: the reports must stop for this long (redeliveries of
/// the last kill still on their way are counted as duplicates).
const QUIET: Duration = Duration::from_millis(300);
/// How long the publisher may take to report its count after the window.
const PUBLISHER_REPORT: Duration = Duration::from_secs(30);
/// How late a kill may come after its time before the phase gives up.
const KILL_LATE: Duration = Duration::from_secs(5);
/// How long the group may take to start and subscribe.
const STARTUP: Duration = crate::context::STARTUP;

/// What the coordinator has heard, per publisher seq.
#[derive(Debug, Default)]
pub struct Received {
    /// Copies received of each seq (saturating).
    copies: Vec<u16>,
    /// Copies not marked redelivered (saturating): more than one is an unmarked duplicate.
    unmarked: Vec<u16>,
    /// The leader's position seq + 1 of the first copy (0: none yet).
    position: Vec<u64>,
    /// The most seqs accepted: a report naming a higher one is a bad report.
    limit: u64,
    pub total: u64,
    pub unique: u64,
    pub marked: u64,
    /// Copies whose position differs from the first copy's (a redelivery must keep it).
    pub moved: u64,
}

impl Received {
    pub fn new(limit: u64) -> Received {
        Received { limit, ..Received::default() }
    }

    /// One follower's batch.
    pub fn add(&mut self, seqs: &[u64], positions: &[u64], redelivered: &[u32]) -> Result<()> {
        anyhow::ensure!(
            seqs.len() == positions.len(),
            "a report with {} seqs and {} positions",
            seqs.len(),
            positions.len()
        );
        let marked: HashSet<u32> = redelivered.iter().copied().collect();
        for (i, (&seq, &position)) in seqs.iter().zip(positions).enumerate() {
            anyhow::ensure!(
                seq < self.limit,
                "a delivery of seq {seq}, past the {} the publisher may send",
                self.limit
            );
            let at = usize::try_from(seq)?;
            if at >= self.copies.len() {
                let len = (at + 1).max(self.copies.len() * 2).min(usize::try_from(self.limit)?);
                self.copies.resize(len, 0);
                self.unmarked.resize(len, 0);
                self.position.resize(len, 0);
            }
            self.total += 1;
            if self.copies[at] == 0 {
                self.unique += 1;
                self.position[at] = position + 1;
            } else if self.position[at] != position + 1 {
                self.moved += 1;
            }
            self.copies[at] = self.copies[at].saturating_add(1);
            if marked.contains(&(i as u32)) {
                self.marked += 1;
            } else {
                self.unmarked[at] = self.unmarked[at].saturating_add(1);
            }
        }
        Ok(())
    }

    /// Seqs below `published` never received.
    pub fn missing(&self, published: u64) -> Vec<u64> {
        (0..published).filter(|&s| self.copies.get(s as usize).is_none_or(|&c| c == 0)).collect()
    }

    /// Copies beyond the one unmarked copy a seq may have.
    pub fn unmarked_duplicates(&self) -> u64 {
        self.unmarked.iter().map(|&u| u64::from(u.saturating_sub(1))).sum()
    }
}

/// The phase's processes, as the coordinator tracks them.
struct Group {
    leader: u32,
    /// The live follower in each slot (kills go round the slots).
    slots: Vec<u32>,
    /// Every follower started, killed ones included (their last reports still arrive).
    all: HashSet<u32>,
    killed: HashSet<u32>,
    /// Followers that have reported their subscription.
    subscribed: HashSet<u32>,
    published: Option<(u64, f64, u64)>,
    received: Received,
    /// The kill armed and not yet seen done: its victim must not be reaped before.
    armed: Option<oneshot::Receiver<std::io::Result<()>>>,
}

impl Group {
    /// Live followers subscribed now.
    fn live_subscribed(&self) -> usize {
        self.slots.iter().filter(|pid| self.subscribed.contains(pid)).count()
    }

    /// Applies one report of the phase's processes.
    fn apply(&mut self, ctx: &Ctx, pid: u32, report: Report) -> Result<()> {
        match report {
            Report::Ready if self.all.contains(&pid) => {
                ctx.control.send(pid, &Cmd::SubscribeOne { key: ONE_KEY.to_string() })?
            }
            Report::Subscribed => {
                self.subscribed.insert(pid);
            }
            Report::Delivered { seqs, positions, redelivered } => {
                self.received.add(&seqs, &positions, &redelivered).with_context(|| format!("follower {pid}"))?
            }
            Report::PublishedOne { events, waited_ms, refused } => self.published = Some((events, waited_ms, refused)),
            Report::Gone if pid == self.leader => bail!("the leader {pid} exited"),
            Report::Gone if !self.killed.contains(&pid) => bail!("follower {pid} exited on its own"),
            _ => {}
        }
        Ok(())
    }
}

pub async fn run(ctx: &mut Ctx) -> Result<DeliverOneResult> {
    let config = ctx.config.clone();
    let group = ctx.next_group();
    let socket: OsString = ctx.path(&format!("g{group}.sock")).into();
    let common: Vec<OsString> = vec!["--socket".into(), socket, "--group".into(), group.to_string().into()];
    let mut leader_args: Vec<OsString> = vec!["leader".into()];
    leader_args.extend(common.iter().cloned());
    leader_args.extend(["--threads".into(), config.server_threads.to_string().into()]);
    let mut follower_args: Vec<OsString> = vec!["follower".into()];
    follower_args.extend(common);

    let leader = ctx.spawn(leader_args)?;
    let limit = match config.one_rate {
        0 => MAX_ONE_EVENTS,
        rate => (rate as f64 * config.one_seconds).ceil() as u64 + 1,
    };
    let mut g = Group {
        leader,
        slots: Vec::new(),
        all: HashSet::new(),
        killed: HashSet::new(),
        subscribed: HashSet::new(),
        published: None,
        received: Received::new(limit),
        armed: None,
    };
    let result = measure(ctx, &mut g, follower_args).await;
    if let Some(fired) = g.armed.take() {
        // Failed with a kill armed: let it fire before its victim can be reaped.
        let _ = tokio::time::timeout(Duration::from_millis(config.one_kill_ms) + KILL_LATE, fired).await;
    }
    let live: Vec<u32> = g.slots.clone();
    let _ = ctx.control.send_all(&live, &Cmd::Quit);
    ctx.procs.reap(&live, Duration::from_secs(3)).await;
    let _ = ctx.control.send(leader, &Cmd::Quit);
    ctx.procs.reap(&[leader], Duration::from_secs(3)).await;
    let everyone: Vec<u32> = g.all.iter().copied().chain([leader]).collect();
    ctx.control.forget(&everyone);
    result
}

async fn measure(ctx: &mut Ctx, g: &mut Group, follower_args: Vec<OsString>) -> Result<DeliverOneResult> {
    let config = ctx.config.clone();
    let followers = config.one_followers;
    ctx.ready(&[g.leader], "the deliver-to-one leader").await?;
    for _ in 0..followers {
        let pid = ctx.spawn(follower_args.clone())?;
        g.slots.push(pid);
        g.all.insert(pid);
    }
    pump(ctx, g, Instant::now() + STARTUP, |g| g.live_subscribed() >= followers).await?;
    if g.live_subscribed() < followers {
        bail!("timed out after {STARTUP:?} waiting for {followers} deliver-to-one subscriptions");
    }

    let window = Window::starting_in(Duration::from_millis(100), config.one_window());
    let key = ONE_KEY.to_string();
    ctx.control
        .send(g.leader, &Cmd::PublishOne { key, rate: config.one_rate, payload: config.payload_bytes, window })?;
    // Kills at half a period, then every period, all inside the window.
    let period_ns = config.one_kill_ms * NS_PER_MS;
    let kills = (window.end_ns - window.start_ns) / period_ns;
    let mut kill_times = (0..kills).map(|i| window.start_ns + period_ns / 2 + i * period_ns).peekable();
    let mut killed = 0usize;
    let mut subscribed_at_kills = usize::MAX;
    while let Some(&at) = kill_times.peek() {
        let slot = killed % followers;
        let victim = g.slots[slot];
        // Armed ahead, fired by the clock (see `kill_at`): its end is no surprise from now on.
        g.killed.insert(victim);
        g.armed = Some(kill_at(victim, at)?);
        pump(ctx, g, at_instant(at), |_| false).await?;
        kill_times.next();
        // A replacement may still be starting: how many were subscribed when one was killed.
        subscribed_at_kills = subscribed_at_kills.min(g.live_subscribed());
        let fired = g.armed.take().expect("armed above");
        tokio::time::timeout(KILL_LATE, fired)
            .await
            .with_context(|| format!("follower {victim} was not killed within {KILL_LATE:?} of its time"))?
            .context("the killer thread ended")?
            .with_context(|| format!("kill follower {victim}"))?;
        // Reaps it (the second SIGKILL finds it dead).
        ctx.procs.kill(victim).with_context(|| format!("reap follower {victim}"))?;
        let pid = ctx.spawn(follower_args.clone())?;
        g.slots[slot] = pid;
        g.all.insert(pid);
        killed += 1;
    }
    pump(ctx, g, at_instant(window.end_ns) + PUBLISHER_REPORT, |g| g.published.is_some()).await?;
    let Some((published, waited_ms, refused)) = g.published else {
        bail!("the publisher did not report its count within {PUBLISHER_REPORT:?} of the window's end");
    };
    let all_in = |g: &Group| g.received.unique >= published;
    let drain_end = at_instant(window.end_ns) + DRAIN;
    pump(ctx, g, drain_end, all_in).await?;
    let drained_ms = (mono_ns().saturating_sub(window.end_ns)) as f64 / 1e6;
    // Redeliveries of the last kill may still be on their way: counted until
    // the reports stop for QUIET (within the drain's bound).
    while all_in(g) && Instant::now() < drain_end {
        let heard = g.received.total;
        pump(ctx, g, (Instant::now() + QUIET).min(drain_end), |g| g.received.total != heard).await?;
        if g.received.total == heard {
            break;
        }
    }
    ctx.control.send(g.leader, &Cmd::Stats)?;
    let leader = g.leader;
    let dropped = ctx
        .control
        .collect(&[leader], Duration::from_secs(10), "the leader's stats", |r| match r {
            Report::Stats { undelivered_dropped, .. } => Some(*undelivered_dropped),
            _ => None,
        })
        .await?[&leader];

    let r = &g.received;
    let missing = r.missing(published);
    let seconds = window.seconds();
    let duplicates = r.total - r.unique;
    Ok(DeliverOneResult {
        followers,
        payload_bytes: config.payload_bytes,
        seconds,
        offered_rate: config.one_rate,
        published,
        published_per_sec: published as f64 / seconds,
        publisher_waited_ms: waited_ms,
        publisher_refused: refused,
        received_total: r.total,
        received_unique: r.unique,
        lost: missing.len() as u64,
        lost_first: missing.iter().take(20).copied().collect(),
        duplicates,
        duplicates_ratio: if published == 0 { 0.0 } else { duplicates as f64 / published as f64 },
        marked_redelivered: r.marked,
        unmarked_duplicates: r.unmarked_duplicates(),
        position_changed: r.moved,
        kills: killed,
        kill_interval_ms: config.one_kill_ms,
        min_subscribed_at_kill: if killed == 0 { followers } else { subscribed_at_kills },
        drained_after_window_ms: drained_ms,
        leader_undelivered_dropped: dropped,
        throughput_per_sec: r.unique.min(published) as f64 / seconds,
        measures: "a publisher numbers every event; each follower reports every delivery (written to the \
                   coordinator's socket) before acking it; lost = published seqs never reported, duplicates = \
                   reports beyond one per seq, unmarked = copies beyond the first not marked redelivered",
    })
}

/// The coordinator's `Instant` at monotonic time `at_ns`.
fn at_instant(at_ns: u64) -> Instant {
    let now = mono_ns();
    if at_ns > now { Instant::now() + Duration::from_nanos(at_ns - now) } else { Instant::now() }
}

/// Applies the phase's reports until `done` holds or `deadline` passes (no error: the caller looks).
async fn pump(ctx: &mut Ctx, g: &mut Group, deadline: Instant, done: impl Fn(&Group) -> bool) -> Result<()> {
    while !done(g) {
        let ours = |m: &Incoming| (m.pid == g.leader || g.all.contains(&m.pid)).then(|| (m.pid, m.report.clone()));
        let Some((pid, report)) = ctx.control.wait_until(deadline, ours).await? else { return Ok(()) };
        g.apply(ctx, pid, report)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_losses_duplicates_and_unmarked_copies_in_any_order() {
        let mut r = Received::new(10);
        // Seq 2's marked copy arrives before its first (unmarked) one: not an unmarked duplicate.
        r.add(&[0, 2], &[100, 102], &[1]).unwrap();
        r.add(&[1, 2, 4], &[101, 102, 104], &[]).unwrap();
        // Seq 4 twice unmarked: one unmarked duplicate; with a moved position.
        r.add(&[4], &[105], &[]).unwrap();
        assert_eq!((r.total, r.unique, r.marked), (6, 4, 1));
        assert_eq!(r.missing(6), vec![3, 5]);
        assert_eq!(r.unmarked_duplicates(), 1);
        assert_eq!(r.moved, 1);
    }

    #[test]
    fn a_seq_past_the_limit_or_a_short_report_is_an_error() {
        let mut r = Received::new(10);
        assert!(r.add(&[10], &[1], &[]).is_err());
        assert!(r.add(&[1, 2], &[1], &[]).is_err());
        assert_eq!(r.total, 0);
    }
}
