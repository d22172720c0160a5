//! One runner per [`Transport`]: how its processes are started.
//!
//! A runner starts a [`Group`]: one server-side process and N client
//! processes, all connected to the control channel. The phases then drive any
//! group the same way (the same commands, the same counting), so adding a
//! transport is adding a runner:
//!
//! - `floor`: `floor-server` + N `floor-client` (plain tokio, no tandem code);
//! - `direct`: `leader` + N `follower` (tandem over the leader's Unix socket);
//! - `tonic`: `tonic-server` + N `tonic-client` (gRPC over a Unix socket);
//! - `tarpc`: `tarpc-server` + N `tarpc-client` (tarpc over a Unix socket);
//! - `messenger`: one `cluster-master` (tandem-cluster), whose agent runs the
//!   bench Leader and says hello as `server`, and whose N workers run the
//!   follower role over `WorkerConnector` with `Transport::Messenger` (every
//!   frame relayed by the master) and say hello as `client`. Agent and workers
//!   are the coordinator's grandchildren, which the control channel handles (it
//!   identifies processes by hello, not by spawn); the master is in the group
//!   too, since it is on the path of every call.

use std::ffi::{OsStr, OsString};
use std::time::Duration;

use anyhow::Result;

use crate::cli::ClusterArgs;
use crate::context::Ctx;
use crate::control::Cmd;
use crate::placement::Placement;
use crate::procs::{rss_kib, set_affinity};
use crate::results::RssSample;
use crate::transport::Transport;

/// How long a cluster may take to stop in order (workers, then agent, each
/// given 2 s) before its master is killed, and its children with it.
const CLUSTER_STOP: Duration = Duration::from_secs(6);

/// The processes of one transport at one N, ready for commands.
pub struct Group {
    pub transport: Transport,
    pub server: u32,
    pub clients: Vec<u32>,
    /// The cluster master (messenger only): the coordinator's child, parent of the others.
    pub master: Option<u32>,
}

/// Starts `followers` client processes and their server for `transport`.
pub async fn start(ctx: &mut Ctx, transport: Transport, followers: usize) -> Result<Group> {
    let group = ctx.next_group();
    let socket = ctx.path(&format!("g{group}.sock"));
    let threads = ctx.config.server_threads.to_string();
    let (server_role, client_role) = match transport {
        Transport::Floor => ("floor-server", "floor-client"),
        Transport::Direct | Transport::DirectQueue | Transport::DirectSlots => ("leader", "follower"),
        Transport::Tonic => ("tonic-server", "tonic-client"),
        Transport::Tarpc => ("tarpc-server", "tarpc-client"),
        Transport::Messenger => return start_cluster(ctx, group, followers).await,
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
    let calls = transport.calls().map(|calls| calls.to_string());
    let client_extra: Vec<&OsStr> = match &calls {
        Some(calls) => vec![OsStr::new("--calls"), OsStr::new(calls)],
        None => Vec::new(),
    };
    for _ in 0..followers {
        ctx.spawn(argv(client_role, &client_extra))?;
    }
    let clients = ctx.hellos(group, "client", followers).await?;
    ctx.ready(&clients, &format!("the {transport} clients")).await?;
    Ok(Group { transport, server, clients, master: None })
}

/// The messenger transport: a cluster master, its agent (the server) and its
/// `followers` workers (the clients), which reach the agent through the master.
async fn start_cluster(ctx: &mut Ctx, group: u32, followers: usize) -> Result<Group> {
    let args = ClusterArgs {
        group,
        workers: followers,
        threads: ctx.config.server_threads,
        link: tandem::cluster_glue::Transport::Messenger,
        failover: false,
        restart_ms: ctx.config.agent_restart_ms,
        standby: false,
        upstream: None,
    };
    let master = ctx.spawn(args.argv())?;
    let group = Group { transport: Transport::Messenger, server: 0, clients: Vec::new(), master: Some(master) };
    // On error, the caller's Ctx kills the master, and its children die with it.
    let server = ctx.hellos(args.group, "server", 1).await?[0];
    ctx.ready(&[server], "the cluster agent").await?;
    let clients = ctx.hellos(args.group, "client", followers).await?;
    ctx.ready(&clients, "the cluster workers").await?;
    Ok(Group { server, clients, ..group })
}

impl Group {
    /// RSS of the server, the clients (and the cluster master) now, labelled with `state`.
    pub fn rss(&self, state: &'static str) -> Vec<RssSample> {
        let (server_name, client_name) = self.transport.process_names();
        let followers = self.clients.len();
        let mut samples = Vec::new();
        if let Some(kib) = self.master.and_then(rss_kib) {
            samples.push(RssSample::of(self.transport, followers, "master", state, &[kib]));
        }
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
        self.clients.iter().chain([&self.server]).chain(&self.master).try_for_each(|&pid| set_affinity(pid, cpu))
    }

    /// Tells every process to quit, and reaps them (killing stragglers).
    pub async fn stop(self, ctx: &mut Ctx) {
        let all: Vec<u32> = self.clients.iter().copied().chain([self.server]).chain(self.master).collect();
        if let Some(master) = self.master {
            // The master stops its workers, then its agent, then exits; a
            // worker told to quit on its own would be restarted.
            ctx.control.forget(&all);
            let _ = ctx.control.send(master, &Cmd::Quit);
            ctx.procs.reap(&[master], CLUSTER_STOP).await;
            return;
        }
        let _ = ctx.control.send_all(&self.clients, &Cmd::Quit);
        ctx.procs.reap(&self.clients, Duration::from_secs(3)).await;
        let _ = ctx.control.send(self.server, &Cmd::Quit);
        ctx.procs.reap(&[self.server], Duration::from_secs(3)).await;
        ctx.control.forget(&all);
    }
}
