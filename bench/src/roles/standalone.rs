//! One process of the failover group: tandem's Standalone election among
//! processes sharing a name and a private directory. Whoever holds the lock
//! leads, with a ticking upstream; every process (the leader too) subscribes
//! to the ticking key and reports its role changes and the first value it
//! receives from each new leader.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use tandem::{Connection, Standalone};

use crate::api::{BenchApi, BenchUpstream, TICKING_KEY};
use crate::clock::mono_ns;
use crate::control::{Cmd, Commands, Report, Reporter};

/// How often the ticking key changes.
pub const TICK: Duration = Duration::from_millis(10);

pub async fn run(dir: PathBuf, name: String, mut commands: Commands, reporter: Reporter) -> Result<()> {
    let connector = Standalone::new(name, dir, |leader| {
        leader.channel_from::<BenchApi, _>(async { Ok(BenchUpstream::ticking(TICK)) })
    });
    let connection = Connection::builder().channel::<BenchApi>().connect(connector).spawn();
    let client = connection.client::<BenchApi>();
    let mut status = connection.status();
    client.ready().await?;
    let mut subscription = client.subscribe(TICKING_KEY.to_string()).await?;
    let mut role = None;
    let mut report_role = |status: &tandem::Status| {
        let now = (status.is_leader(), status.epoch());
        if let (leader, Some(epoch)) = now
            && role != Some(now)
        {
            role = Some(now);
            reporter.send(&Report::Role { leader, epoch });
        }
    };
    report_role(&status.borrow_and_update());
    let mut epoch = super::follower::first_value(&mut subscription, &reporter).await?;
    loop {
        tokio::select! {
            cmd = commands.next() => match cmd? {
                None | Some(Cmd::Quit) => break,
                Some(other) => bail!("a standalone process cannot {other:?}"),
            },
            changed = status.changed() => {
                if changed.is_err() {
                    bail!("the connection closed");
                }
                report_role(&status.borrow_and_update());
            }
            update = subscription.next() => {
                let update = update.context("subscription ended")?;
                if update.epoch != epoch {
                    epoch = update.epoch;
                    reporter.send(&Report::Value { epoch, seq: update.seq, recv_ns: mono_ns() });
                }
            }
        }
    }
    Ok(())
}
