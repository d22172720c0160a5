//! A tarpc client process: one tarpc client (one connection, tarpc's default
//! config) on the server's Unix socket; `concurrency` tasks call `echo` in a
//! loop on clones of it, as the tandem follower's tasks do.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use tarpc::tokio_serde::formats::Bincode;

use super::loops::{Echo, calls_in_tasks};
use super::tarpc_wire::BenchClient;
use crate::control::{Cmd, Commands, Report, Reporter};

pub async fn run(socket: PathBuf, mut commands: Commands, reporter: Reporter) -> Result<()> {
    let transport = tarpc::serde_transport::unix::connect(&socket, Bincode::default)
        .await
        .context("connect to the tarpc server")?;
    let client = BenchClient::new(tarpc::client::Config::default(), transport).spawn();
    reporter.send(&Report::Ready);
    while let Some(cmd) = commands.next().await? {
        match cmd {
            Cmd::Invoke { concurrency, payload, window } => {
                let calls = calls_in_tasks(&client, concurrency, payload, window).await?;
                reporter.send(&calls.report());
            }
            Cmd::Quit => break,
            other => bail!("a tarpc client cannot {other:?}"),
        }
    }
    Ok(())
}

impl Echo for BenchClient {
    async fn call(&mut self, body: Bytes) -> Option<usize> {
        self.echo(tarpc::context::current(), body).await.ok().map(|echo| echo.len())
    }
}
