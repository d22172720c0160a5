//! Transports, and one runner per transport: how its processes are started.
//!
//! A runner starts a [`Group`]: one server-side process and N client
//! processes, all connected to the control channel. The phases then drive any
//! group the same way (the same commands, the same counting), so adding a
//! transport is adding a runner:
//!
//! - `floor`: `floor-server` + N `floor-client` (plain tokio, no tandem code);
//! - `direct`: `leader` + N `follower` (tandem over the leader's Unix socket);
//! - `messenger` (needs tandem-cluster's messenger): a runner that starts a
//!   cluster master whose agent runs the bench Leader and says hello as
//!   `server`, and whose N workers run `roles::follower` over the messenger
//!   connector and say hello as `client` — they are grandchildren, which the
//!   control channel handles (it identifies processes by hello, not by spawn).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::time::Duration;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::control::Cmd;
use crate::coordinator::Ctx;
use crate::procs::{rss_kib, set_affinity};
use crate::results::RssSample;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The raw Unix-socket floor: what any framed protocol costs at least.
    Floor,
    /// tandem followers on the leader's Unix socket.
    Direct,
    /// tandem followers relayed by the cluster master (not yet measured).
    Messenger,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Floor => "floor",
            Transport::Direct => "direct",
            Transport::Messenger => "messenger",
        })
    }
}

impl Transport {
    /// What its (server, client) processes are called in the memory figures.
    pub fn process_names(self) -> (&'static str, &'static str) {
        match self {
            Transport::Floor => ("floor_server", "floor_client"),
            Transport::Direct => ("leader", "follower"),
            Transport::Messenger => ("agent", "worker"),
        }
    }
}

/// Where the scheduler may run a group's processes during a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Wherever the OS puts them (the usual figures).
    Os,
    /// Every thread of every process of the group on CPU 0: no cross-CPU
    /// wake-ups, which on a VM can cost more than the software being measured.
    OneCpu,
}

/// The processes of one transport at one N, ready for commands.
pub struct Group {
    pub transport: Transport,
    pub server: u32,
    pub clients: Vec<u32>,
}

/// Starts `followers` client processes and their server for `transport`.
pub async fn start(ctx: &mut Ctx, transport: Transport, followers: usize) -> Result<Group> {
    let group = ctx.next_group();
    let socket = ctx.path(&format!("g{group}.sock"));
    let threads = ctx.config.server_threads.to_string();
    let (server_role, client_role) = match transport {
        Transport::Floor => ("floor-server", "floor-client"),
        Transport::Direct => ("leader", "follower"),
        Transport::Messenger => {
            bail!("the messenger transport needs tandem-cluster's messenger; its runner is not written yet")
        }
    };
    let group_arg = group.to_string();
    let argv = |role: &str, extra: &[&OsStr]| -> Vec<OsString> {
        let common = [
            OsStr::new(role),
            OsStr::new("--socket"),
            socket.as_os_str(),
            OsStr::new("--group"),
            OsStr::new(&group_arg),
        ];
        common.iter().chain(extra).map(|s| s.to_os_string()).collect()
    };
    ctx.spawn(argv(server_role, &[OsStr::new("--threads"), OsStr::new(&threads)]))?;
    let server = ctx.hellos(group, "server", 1).await?[0];
    ctx.ready(&[server], &format!("the {transport} server")).await?;
    for _ in 0..followers {
        ctx.spawn(argv(client_role, &[]))?;
    }
    let clients = ctx.hellos(group, "client", followers).await?;
    ctx.ready(&clients, &format!("the {transport} clients")).await?;
    Ok(Group { transport, server, clients })
}

impl Group {
    /// RSS of the server and the clients now, labelled with `state`.
    pub fn rss(&self, state: &'static str) -> Vec<RssSample> {
        let (server_name, client_name) = self.transport.process_names();
        let followers = self.clients.len();
        let mut samples = Vec::new();
        if let Some(kib) = rss_kib(self.server) {
            samples.push(RssSample::of(self.transport, followers, server_name, state, &[kib]));
        }
        let clients: Vec<u64> = self.clients.iter().filter_map(|&pid| rss_kib(pid)).collect();
        if !clients.is_empty() {
            samples.push(RssSample::of(self.transport, followers, client_name, state, &clients));
        }
        samples
    }

    /// Moves every process of the group to `placement`.
    pub fn place(&self, placement: Placement) -> Result<()> {
        let cpu = match placement {
            Placement::Os => None,
            Placement::OneCpu => Some(0),
        };
        self.clients.iter().chain([&self.server]).try_for_each(|&pid| set_affinity(pid, cpu))
    }

    /// Tells every process to quit, and reaps them (killing stragglers).
    pub async fn stop(self, ctx: &mut Ctx) {
        let all: Vec<u32> = self.clients.iter().copied().chain([self.server]).collect();
        let _ = ctx.control.send_all(&self.clients, &Cmd::Quit);
        ctx.procs.reap(&self.clients, Duration::from_secs(3)).await;
        let _ = ctx.control.send(self.server, &Cmd::Quit);
        ctx.procs.reap(&[self.server], Duration::from_secs(3)).await;
        ctx.control.forget(&all);
    }
}
