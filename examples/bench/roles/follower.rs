//! A tandem follower process: one Connection to the leader's socket; calls
//! with N in flight; subscribes and counts what the fan-out delivers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};
use bytes::Bytes;
use futures::StreamExt;
use tandem::{Client, Connection, UnixConnector};

use crate::api::{BenchApi, key_name};
use crate::clock::{Window, mono_ns, sleep_until_ns};
use crate::control::{Cmd, Commands, Report, Reporter};
use crate::tally::{Calls, DRAIN, Events};

pub async fn run(socket: PathBuf, mut commands: Commands, reporter: Reporter) -> Result<()> {
    let connection = Connection::builder().channel::<BenchApi>().connect(UnixConnector::new(socket)).spawn();
    let client = connection.client::<BenchApi>();
    client.ready().await?;
    reporter.send(&Report::Ready);
    let events = Arc::new(Mutex::new(Events::new()));
    let mut receiver = None;
    while let Some(cmd) = commands.next().await? {
        match cmd {
            Cmd::Invoke { concurrency, payload, window } => {
                let calls = invoke(&client, concurrency, payload, window).await?;
                reporter.send(&calls.report());
            }
            Cmd::Subscribe { keys } => {
                let mut subscriptions = Vec::with_capacity(keys);
                for key in 0..keys {
                    subscriptions.push(client.subscribe(key_name(key)).await?);
                }
                let events = events.clone();
                receiver = Some(tokio::spawn(async move {
                    let mut all = futures::stream::select_all(subscriptions);
                    while let Some(update) = all.next().await {
                        let tick = update.value;
                        lock(&events).record(tick.key, tick.idx, tick.sent_ns, mono_ns());
                    }
                }));
                reporter.send(&Report::Subscribed);
            }
            Cmd::Receive { window } => {
                lock(&events).start(window);
                sleep_until_ns(window.end_ns + DRAIN.as_nanos() as u64).await;
                let report = lock(&events).finish();
                reporter.send(&report);
            }
            Cmd::Quit => break,
            other => bail!("a follower cannot {other:?}"),
        }
    }
    if let Some(receiver) = receiver {
        receiver.abort();
    }
    connection.close().await;
    Ok(())
}

fn lock(events: &Mutex<Events>) -> std::sync::MutexGuard<'_, Events> {
    events.lock().unwrap_or_else(|p| p.into_inner())
}

/// `concurrency` tasks call in a loop until the window closes, counting into
/// one shared tally (as the floor client's single loop does: one histogram
/// per process, so the memory figures compare like with like).
async fn invoke(client: &Client<BenchApi>, concurrency: usize, payload: usize, window: Window) -> Result<Calls> {
    let body = Bytes::from(vec![0x5A; payload]);
    let total = Arc::new(Mutex::new(Calls::new()));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, body, total) = (client.clone(), body.clone(), total.clone());
            tokio::spawn(async move {
                // Two clock reads per call, as in the floor client.
                let mut started = mono_ns();
                while started < window.end_ns {
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
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    let total = Arc::into_inner(total).expect("every task has ended");
    Ok(total.into_inner().unwrap_or_else(|p| p.into_inner()))
}
