//! The tarpc peer's server: the echo service ([`tarpc_wire`](super::tarpc_wire))
//! on a Unix socket, each connection a `BaseChannel` with tarpc's defaults,
//! each request run on a task of its own (tarpc's documented way).

use std::path::PathBuf;

use anyhow::{Context as _, Result, anyhow};
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
    // It only serves: the first command is Quit (or the coordinator has gone).
    let result = match commands.next().await? {
        None | Some(Cmd::Quit) => Ok(()),
        Some(other) => Err(anyhow!("the tarpc server cannot {other:?}")),
    };
    server.abort();
    result
}

async fn spawn(request: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(request);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::roles::tarpc_wire::BenchClient;

    /// The echo service answers a tarpc client over a Unix socket with the body it was sent.
    #[tokio::test]
    async fn echo_over_a_unix_socket() {
        let outcome = tokio::time::timeout(Duration::from_secs(20), async {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("tarpc.sock");
            let mut listener = tarpc::serde_transport::unix::listen(&socket, Bincode::default).await.unwrap();
            let server = tokio::spawn(async move {
                let transport = listener.next().await.unwrap().unwrap();
                BaseChannel::with_defaults(transport).execute(EchoServer.serve()).for_each(spawn).await;
            });
            let transport = tarpc::serde_transport::unix::connect(&socket, Bincode::default).await.unwrap();
            let client = BenchClient::new(tarpc::client::Config::default(), transport).spawn();
            let body = Bytes::from(vec![0x5A; 64]);
            let echo = client.echo(tarpc::context::current(), body.clone()).await.unwrap();
            assert_eq!(echo, body);
            server.abort();
        })
        .await;
        outcome.expect("the tarpc round trip took over 20 s");
    }
}
