//! A tonic client process: one gRPC channel (one HTTP/2 connection) to the
//! server's Unix socket; `concurrency` tasks call `Echo` in a loop on clones
//! of the client, as the tandem follower's tasks do; once asked, one
//! `Subscribe` stream whose events it counts.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};
use bytes::Bytes;

use super::tonic_wire::BenchClient;
use crate::clock::{Window, mono_ns, sleep_until_ns};
use crate::control::{Cmd, Commands, Report, Reporter};
use crate::tally::{Calls, DRAIN, EventTally};

pub async fn run(socket: PathBuf, mut commands: Commands, reporter: Reporter) -> Result<()> {
    let client = BenchClient::connect(socket).await?;
    reporter.send(&Report::Ready);
    let events = Arc::new(Mutex::new(EventTally::new()));
    let mut receiver = None;
    while let Some(cmd) = commands.next().await? {
        match cmd {
            Cmd::Invoke { concurrency, payload, window } => {
                let calls = invoke(&client, concurrency, payload, window).await?;
                reporter.send(&calls.report());
            }
            Cmd::Subscribe { keys } => {
                let mut stream = client.clone().subscribe(keys as u32).await?;
                let events = events.clone();
                receiver = Some(tokio::spawn(async move {
                    while let Ok(Some(event)) = stream.message().await {
                        lock(&events).record(event.key, event.idx, event.sent_ns, mono_ns());
                    }
                }));
                reporter.send(&Report::Subscribed);
            }
            Cmd::Receive { window } => {
                lock(&events).start(window);
                sleep_until_ns(window.end_ns + DRAIN.as_nanos() as u64).await;
                let report = lock(&events).finish(0);
                reporter.send(&report);
            }
            Cmd::Quit => break,
            other => bail!("a tonic client cannot {other:?}"),
        }
    }
    if let Some(receiver) = receiver {
        receiver.abort();
    }
    Ok(())
}

fn lock(events: &Mutex<EventTally>) -> std::sync::MutexGuard<'_, EventTally> {
    events.lock().unwrap_or_else(|p| p.into_inner())
}

/// `concurrency` tasks call in a loop until the window closes, counting into
/// one shared tally (the tandem follower's loop, with a tonic client).
async fn invoke(client: &BenchClient, concurrency: usize, payload: usize, window: Window) -> Result<Calls> {
    let body = Bytes::from(vec![0x5A; payload]);
    let total = Arc::new(Mutex::new(Calls::new()));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut client, body, total) = (client.clone(), body.clone(), total.clone());
            tokio::spawn(async move {
                let mut started = mono_ns();
                while started < window.end_ns {
                    let result = client.echo(body.clone()).await;
                    let done = mono_ns();
                    let mut total = total.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Ok(echo) if echo.len() == body.len() => total.record(&window, done, done - started),
                        _ => total.errors += 1,
                    }
                    drop(total);
                    started = mono_ns();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    let total = Arc::into_inner(total).expect("every task has ended");
    Ok(total.into_inner().unwrap_or_else(|p| p.into_inner()))
}
