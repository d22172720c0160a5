//! The tarpc peer's server: the echo service ([`tarpc_wire`](super::tarpc_wire))
//! on a Unix socket, each connection a `BaseChannel` with tarpc's defaults,
//! each request run on a task of its own (tarpc's documented way).

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use futures::{Future, StreamExt};
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::Bincode;

use super::tarpc_wire::Bench;
use crate::control::{Cmd, Commands, Report, Reporter};

#[derive(Clone)]
struct EchoServer;

impl Bench for EchoServer {
    async fn echo(self, _: tarpc::context::Context, body: Bytes) -> Bytes {
        body
    }
}

pub async fn run(socket: PathBuf, mut commands: Commands, reporter: Reporter) -> Result<()> {
    let mut listener = tarpc::serde_transport::unix::listen(&socket, Bincode::default)
        .await
        .with_context(|| format!("listen on {}", socket.display()))?;
    let server = tokio::spawn(async move {
        while let Some(transport) = listener.next().await {
            let Ok(transport) = transport else { continue };
            tokio::spawn(BaseChannel::with_defaults(transport).execute(EchoServer.serve()).for_each(spawn));
        }
    });
    reporter.send(&Report::Ready);
    while let Some(cmd) = commands.next().await? {
        match cmd {
            Cmd::Quit => break,
            other => bail!("the tarpc server cannot {other:?}"),
        }
    }
    server.abort();
    Ok(())
}

async fn spawn(request: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(request);
}
