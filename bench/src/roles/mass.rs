//! Many idle follower connections in one process, each its own tandem
//! Connection (own socket, own driver) subscribed to one key: what the leader
//! holds for every follower, measured at 1,000 followers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tandem::{Connection, UnixConnector};

use crate::api::{BenchApi, key_name};
use crate::control::{Cmd, Commands, Report, Reporter};

/// Connections opened at once (the listener's backlog is finite).
const BATCH: usize = 50;

pub async fn run(socket: PathBuf, count: usize, mut commands: Commands, reporter: Reporter) -> Result<()> {
    let mut connections = Vec::with_capacity(count);
    let mut subscriptions = Vec::with_capacity(count);
    while connections.len() < count {
        let batch: Vec<Connection> = (connections.len()..count.min(connections.len() + BATCH))
            .map(|_| Connection::builder().channel::<BenchApi>().connect(UnixConnector::new(&socket)).spawn())
            .collect();
        let subscribed = futures::future::try_join_all(batch.iter().map(|connection| async move {
            let client = connection.client::<BenchApi>();
            client.ready().await?;
            client.subscribe(key_name(0)).await
        }));
        let subscribed = tokio::time::timeout(Duration::from_secs(30), subscribed).await.context("connecting")??;
        subscriptions.extend(subscribed);
        connections.extend(batch);
    }
    reporter.send(&Report::Ready);
    match commands.next().await? {
        None | Some(Cmd::Quit) => {}
        Some(other) => bail!("a mass-follower process cannot {other:?}"),
    }
    drop(subscriptions);
    Ok(())
}
