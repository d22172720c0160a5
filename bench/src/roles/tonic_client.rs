//! A tonic client process: one gRPC channel (one HTTP/2 connection) to the
//! server's Unix socket; `concurrency` tasks call `Echo` in a loop on clones
//! of the client, as the tandem follower's tasks do; once asked, one
//! `Subscribe` stream whose events it counts.

use std::path::PathBuf;

use anyhow::{Result, bail};
use bytes::Bytes;

use super::loops::{Echo, Events, calls_in_tasks};
use super::tonic_wire::BenchClient;
use crate::control::{Cmd, Commands, Report, Reporter};

pub async fn run(socket: PathBuf, mut commands: Commands, reporter: Reporter) -> Result<()> {
    let client = BenchClient::connect(socket).await?;
    reporter.send(&Report::Ready);
    let mut events = Events::new();
    while let Some(cmd) = commands.next().await? {
        match cmd {
            Cmd::Invoke { concurrency, payload, window } => {
                let calls = calls_in_tasks(&client, concurrency, payload, window).await?;
                reporter.send(&calls.report());
            }
            Cmd::Subscribe { keys } => {
                let mut stream = client.clone().subscribe(keys as u32).await?;
                events.spawn(|events| async move {
                    while let Ok(Some(event)) = stream.message().await {
                        events.record(event.key, event.idx, event.sent_ns);
                    }
                });
                reporter.send(&Report::Subscribed);
            }
            Cmd::Receive { window } => reporter.send(&events.receive(window).await),
            Cmd::Quit => break,
            other => bail!("a tonic client cannot {other:?}"),
        }
    }
    Ok(())
}

impl Echo for BenchClient {
    async fn call(&mut self, body: Bytes) -> Option<usize> {
        self.echo(body).await.ok().map(|echo| echo.len())
    }
}
