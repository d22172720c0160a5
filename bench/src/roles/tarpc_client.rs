//! A tarpc client process: one tarpc client (one connection, tarpc's default
//! config) on the server's Unix socket; `concurrency` tasks call `echo` in a
//! loop on clones of it, as the tandem follower's tasks do.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use tarpc::tokio_serde::formats::Bincode;

use super::tarpc_wire::BenchClient;
use crate::clock::{Window, mono_ns};
use crate::control::{Cmd, Commands, Report, Reporter};
use crate::tally::Calls;

pub async fn run(socket: PathBuf, mut commands: Commands, reporter: Reporter) -> Result<()> {
    let transport = tarpc::serde_transport::unix::connect(&socket, Bincode::default)
        .await
        .context("connect to the tarpc server")?;
    let client = BenchClient::new(tarpc::client::Config::default(), transport).spawn();
    reporter.send(&Report::Ready);
    while let Some(cmd) = commands.next().await? {
        match cmd {
            Cmd::Invoke { concurrency, payload, window } => {
                let calls = invoke(&client, concurrency, payload, window).await?;
                reporter.send(&calls.report());
            }
            Cmd::Quit => break,
            other => bail!("a tarpc client cannot {other:?}"),
        }
    }
    Ok(())
}

/// `concurrency` tasks call in a loop until the window closes, counting into
/// one shared tally (the tandem follower's loop, with a tarpc client).
async fn invoke(client: &BenchClient, concurrency: usize, payload: usize, window: Window) -> Result<Calls> {
    let body = Bytes::from(vec![0x5A; payload]);
    let total = Arc::new(Mutex::new(Calls::new()));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, body, total) = (client.clone(), body.clone(), total.clone());
            tokio::spawn(async move {
                let mut started = mono_ns();
                while started < window.end_ns {
                    let result = client.echo(tarpc::context::current(), body.clone()).await;
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
