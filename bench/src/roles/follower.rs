//! A tandem follower process: one Connection to the leader (its Unix socket,
//! or in a cluster worker whatever connector the worker was given); calls
//! with N in flight; subscribes and counts what the fan-out delivers. In the
//! cluster-agent failover, a worker [`watch`]es the ticking key instead.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tandem::follower::LinkState;
use tandem::{Client, Connection, Subscription, UnixConnector};

use crate::api::{BenchApi, TICKING_KEY, key_name};
use crate::clock::{Window, mono_ns, sleep_until_ns};
use crate::control::{Cmd, Commands, Report, Reporter};
use crate::tally::{Calls as Tally, DRAIN, EventTally};
use crate::transport::Calls;

pub async fn run(socket: PathBuf, calls: Option<Calls>, commands: Commands, reporter: Reporter) -> Result<()> {
    let mut config = tandem::follower::Config::default();
    if let Some(calls) = calls {
        config.calls = calls.path();
    }
    let connection =
        Connection::builder().config(config).channel::<BenchApi>().connect(UnixConnector::new(socket)).spawn();
    let result = serve(&connection, commands, &reporter).await;
    connection.close().await;
    result
}

/// Reports ready once connected, then obeys the coordinator until `Quit` (or until it has gone).
pub async fn serve(connection: &Connection, mut commands: Commands, reporter: &Reporter) -> Result<()> {
    let client = connection.client::<BenchApi>();
    client.ready().await?;
    let losses = LinkLosses::watch(connection);
    reporter.send(&Report::Ready);
    let events = Arc::new(Mutex::new(EventTally::new()));
    let mut receivers = Vec::new();
    while let Some(cmd) = commands.next().await? {
        match cmd {
            Cmd::Invoke { concurrency, payload, window } => {
                let before = losses.count();
                let cpu = cpu_time();
                let (mut calls, made) = invoke(&client, concurrency, payload, window).await?;
                if std::env::var_os(CPU_PER_CALL).is_some() {
                    let used = cpu_time().saturating_sub(cpu);
                    let per_call = used.as_secs_f64() * 1e6 / made.max(1) as f64;
                    eprintln!(
                        "{CPU_PER_CALL}: follower pid {} in flight {concurrency}: {made} calls, {per_call:.2} us of CPU per call",
                        std::process::id()
                    );
                }
                calls.links_lost = losses.count() - before;
                reporter.send(&calls.report());
            }
            Cmd::Subscribe { keys } => {
                let mut subscriptions = Vec::with_capacity(keys);
                for key in 0..keys {
                    subscriptions.push(client.subscribe(key_name(key)).await?);
                }
                // One task per subscription, as a service reading several
                // keys would have (merging them with `futures`' `select_all`
                // instead allocates a task node per event it yields).
                receivers.extend(subscriptions.into_iter().map(|mut subscription| {
                    let events = events.clone();
                    tokio::spawn(async move {
                        while let Some(update) = subscription.next().await {
                            let tick = update.value;
                            lock(&events).record(tick.key, tick.idx, tick.sent_ns, mono_ns());
                        }
                    })
                }));
                reporter.send(&Report::Subscribed);
            }
            Cmd::Receive { window } => {
                let before = losses.count();
                lock(&events).start(window);
                sleep_until_ns(window.end_ns + DRAIN.as_nanos() as u64).await;
                let report = lock(&events).finish(losses.count() - before);
                reporter.send(&report);
            }
            Cmd::SubscribeOne { key } => {
                // From now on this process only takes deliveries (the deliver-to-one phase's own followers).
                for receiver in receivers.drain(..) {
                    receiver.abort();
                }
                losses.task.abort();
                return take_one(&client, key, commands, reporter).await;
            }
            Cmd::Quit => break,
            other => bail!("a follower cannot {other:?}"),
        }
    }
    for receiver in receivers {
        receiver.abort();
    }
    losses.task.abort();
    Ok(())
}

/// Counts the times the connection lost its leader: at least that many (a
/// loss and a reconnect between two looks at the status count once, or not at all).
struct LinkLosses {
    lost: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkLosses {
    fn watch(connection: &Connection) -> LinkLosses {
        let mut status = connection.status();
        let lost = Arc::new(AtomicU64::new(0));
        let counter = lost.clone();
        let task = tokio::spawn(async move {
            let mut was_lost = false;
            // Ends when the connection's status sender is dropped.
            while status.changed().await.is_ok() {
                let is_lost = status.borrow_and_update().link == LinkState::LeaderLost;
                if is_lost && !was_lost {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                was_lost = is_lost;
            }
        });
        LinkLosses { lost, task }
    }

    fn count(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// Waits (10 s at most) for the ticking key's first value, reports it and
/// `Ready`; returns its epoch.
pub async fn first_value(subscription: &mut Subscription<BenchApi>, reporter: &Reporter) -> Result<u64> {
    let first = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .context("no first value within 10 s")?
        .context("subscription ended")?;
    reporter.send(&Report::Value { epoch: first.epoch, seq: first.seq, recv_ns: mono_ns() });
    reporter.send(&Report::Ready);
    Ok(first.epoch)
}

/// The cluster-agent failover's worker: subscribes to the ticking key, reports
/// ready once it holds a value, then reports the first value it receives from
/// each newer Leader (epoch), until `Quit`.
pub async fn watch(connection: &Connection, mut commands: Commands, reporter: &Reporter) -> Result<()> {
    let client = connection.client::<BenchApi>();
    client.ready().await?;
    let mut subscription = client.subscribe(TICKING_KEY.to_string()).await?;
    let mut epoch = first_value(&mut subscription, reporter).await?;
    loop {
        tokio::select! {
            cmd = commands.next() => match cmd? {
                None | Some(Cmd::Quit) => return Ok(()),
                Some(other) => bail!("a watching worker cannot {other:?}"),
            },
            update = subscription.next() => {
                let update = update.context("subscription ended")?;
                if update.epoch != epoch {
                    epoch = update.epoch;
                    reporter.send(&Report::Value { epoch, seq: update.seq, recv_ns: mono_ns() });
                }
            }
        }
    }
}

/// The most deliveries one `Delivered` report carries.
const MAX_BATCH: usize = 1024;

/// How long a report may take to reach the coordinator's socket before the
/// follower gives up (it does not ack what it could not report).
const REPORT_WRITTEN: Duration = Duration::from_secs(30);

/// The deliver-to-one phase's follower: `subscribe_one` to `key`; for each
/// batch of deliveries ready at once, report them (publisher seq, position,
/// redelivered), wait until the report is written to the control socket, and
/// only then ack them. So whatever this process acked, the coordinator counts
/// even if the process is killed the next instant (the kernel keeps the bytes
/// queued for the coordinator), and whatever it did not ack, the leader
/// redelivers: a seq the coordinator never hears of was lost by tandem.
async fn take_one(client: &Client<BenchApi>, key: String, mut commands: Commands, reporter: &Reporter) -> Result<()> {
    let mut deliveries = client.subscribe_one(key.clone()).await.with_context(|| format!("subscribe_one {key}"))?;
    reporter.send(&Report::Subscribed);
    loop {
        tokio::select! {
            cmd = commands.next() => match cmd? {
                None | Some(Cmd::Quit) => return Ok(()),
                Some(other) => bail!("a deliver-to-one follower cannot {other:?}"),
            },
            first = deliveries.next() => {
                let first = first.context("the deliver-to-one subscription ended")?;
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH
                    && let Some(Some(next)) = deliveries.next().now_or_never()
                {
                    batch.push(next);
                }
                let seqs = batch.iter().map(|d| d.value().idx).collect();
                let positions = batch.iter().map(|d| d.position().seq).collect();
                let redelivered = (0u32..).zip(&batch).filter(|(_, d)| d.redelivered()).map(|(i, _)| i).collect();
                reporter.send(&Report::Delivered { seqs, positions, redelivered });
                reporter.sync(REPORT_WRITTEN).await?;
                for delivery in batch {
                    delivery.ack();
                }
            }
        }
    }
}

fn lock(events: &Mutex<EventTally>) -> std::sync::MutexGuard<'_, EventTally> {
    events.lock().unwrap_or_else(|p| p.into_inner())
}

/// Set in the bench's environment, each follower prints the CPU time (user +
/// system, its whole process) it spent per call in each invoke phase, on stderr.
const CPU_PER_CALL: &str = "BENCH_CPU_PER_CALL";

/// The CPU time this process has used so far (user + system).
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given; zeroed is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF and a valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// `concurrency` tasks call in a loop until the window closes, counting into
/// one shared tally (as the floor client's single loop does: one histogram
/// per process, so the memory figures compare like with like).
/// Returns the tally of the window and how many calls were made in all.
async fn invoke(client: &Client<BenchApi>, concurrency: usize, payload: usize, window: Window) -> Result<(Tally, u64)> {
    let body = Bytes::from(vec![0x5A; payload]);
    let total = Arc::new(Mutex::new(Tally::new()));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, body, total) = (client.clone(), body.clone(), total.clone());
            tokio::spawn(async move {
                // Two clock reads per call, as in the floor client.
                let mut started = mono_ns();
                let mut made = 0u64;
                while started < window.end_ns {
                    made += 1;
                    let result = client.invoke(body.clone()).await;
                    let done = mono_ns();
                    let mut total = total.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Ok(echo) if echo.len() == body.len() => total.record(&window, done, done - started),
                        _ => total.errors += 1,
                    }
                    drop(total);
                    started = mono_ns();
                }
                made
            })
        })
        .collect();
    let mut made = 0;
    for task in tasks {
        made += task.await?;
    }
    let total = Arc::into_inner(total).expect("every task has ended");
    Ok((total.into_inner().unwrap_or_else(|p| p.into_inner()), made))
}

/// `bench per-call`: both per-call paths against one Leader, in this process
/// and on this (current-thread) runtime; prints the CPU time (the whole
/// process: leader and follower) and the wall time per call of each.
pub async fn per_call(rounds: usize, calls: u64, in_flight: usize, one_task: bool, payload: usize) -> Result<()> {
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o700);
    let dir = tempfile::Builder::new().prefix("tandem-per-call").permissions(private).tempdir()?;
    let upstream = crate::api::BenchUpstream::default();
    let leader = super::leader::builder(&upstream).epoch(1).start();
    let socket = leader.bind_unix(dir.path().join("leader.sock"))?;
    let body = Bytes::from(vec![0x5A; payload]);
    let in_flight = in_flight.max(1);
    let from = if one_task { "one task" } else { "a task each" };
    println!("per-call: {calls} calls per path and round, {in_flight} in flight ({from}), {payload} B, one thread");
    let mut totals = [(Calls::Queue, Duration::ZERO), (Calls::Slots, Duration::ZERO)];
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let path = totals[i].0;
            let mut config = tandem::follower::Config::default();
            config.calls = path.path();
            let connection =
                Connection::builder().config(config).channel::<BenchApi>().connect(UnixConnector::new(&socket)).spawn();
            let client = connection.client::<BenchApi>();
            client.ready().await?;
            call_loop(&client, &body, in_flight, one_task, 1_000).await?; // warm-up
            let (cpu, wall) = (cpu_time(), std::time::Instant::now());
            call_loop(&client, &body, in_flight, one_task, calls).await?;
            let (cpu, wall) = (cpu_time().saturating_sub(cpu), wall.elapsed());
            totals[i].1 += cpu;
            let us = |d: Duration| d.as_secs_f64() * 1e6 / calls.max(1) as f64;
            println!(
                "  round {round} {path:<5}: {:.2} us of CPU per call, {:.2} us of wall time ({:.0} calls/s)",
                us(cpu),
                us(wall),
                calls as f64 / wall.as_secs_f64()
            );
            connection.close().await;
        }
    }
    for (path, cpu) in totals {
        let mean = cpu.as_secs_f64() * 1e6 / (calls.max(1) * rounds.max(1) as u64) as f64;
        println!("mean {path:<5}: {mean:.2} us of CPU per call");
    }
    leader.shutdown().await;
    Ok(())
}

/// `calls` calls, `in_flight` at a time, from a task each or all from this
/// one; fails on the first error.
async fn call_loop(
    client: &Client<BenchApi>,
    body: &Bytes,
    in_flight: usize,
    one_task: bool,
    calls: u64,
) -> Result<()> {
    if one_task {
        let call = || async {
            let echo = client.invoke(body.clone()).await?;
            anyhow::ensure!(echo.len() == body.len(), "a wrong answer");
            anyhow::Ok(())
        };
        let mut pending = futures::stream::FuturesUnordered::new();
        let mut started = 0;
        while started < calls.min(in_flight as u64) {
            pending.push(call());
            started += 1;
        }
        while let Some(done) = pending.next().await {
            done?;
            if started < calls {
                pending.push(call());
                started += 1;
            }
        }
        return Ok(());
    }
    let per_task = calls.div_ceil(in_flight as u64);
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let (client, body) = (client.clone(), body.clone());
            tokio::spawn(async move {
                for _ in 0..per_task {
                    let echo = client.invoke(body.clone()).await?;
                    anyhow::ensure!(echo.len() == body.len(), "a wrong answer");
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}
