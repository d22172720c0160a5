//! The processes the coordinator starts: each role connects to the control
//! channel, reports `Ready` once set up, then obeys commands until `Quit` (or
//! until the coordinator disappears).
//!
//! Runtimes are the same on both sides of the comparison: servers (the tandem
//! leader, the floor server, the tonic and tarpc servers, the cluster's master and agent) run tokio's
//! multi-thread runtime with `--server-threads` workers; clients (tandem
//! followers, floor, tonic and tarpc clients, cluster workers) run tokio's current-thread runtime.
//!
//! `cluster-master` is the exception to "connects, then obeys": its process
//! and the cluster processes it starts each connect on their own
//! ([`cluster_master`]).

mod cluster_master;
mod floor_client;
mod floor_server;
mod floor_wire;
mod follower;
mod leader;
mod loops;
mod mass;
mod standalone;
mod tarpc_client;
mod tarpc_server;
mod tarpc_wire;
mod tonic_client;
mod tonic_server;
mod tonic_wire;

use std::future::Future;

use anyhow::Result;

use crate::cli::{ClientArgs, RoleCmd, ServerArgs};
use crate::control::{self, Commands, Report, Reporter};
use crate::procs;

/// Runs a role to its end, then exits the process.
pub fn main(role: RoleCmd) -> ! {
    procs::prepare_role_process();
    tandem::logging::init_with_default("error");
    let result = match role {
        RoleCmd::Leader(ServerArgs { socket, group, threads }) => {
            serve(server_runtime(threads), "server", group, |c, r| leader::run(socket, c, r))
        }
        RoleCmd::Follower { socket, group, calls } => {
            serve(client_runtime(), "client", group, |c, r| follower::run(socket, calls, c, r))
        }
        RoleCmd::FloorServer(ServerArgs { socket, group, threads }) => {
            serve(server_runtime(threads), "server", group, |c, r| floor_server::run(socket, c, r))
        }
        RoleCmd::FloorClient(ClientArgs { socket, group }) => {
            serve(client_runtime(), "client", group, |c, r| floor_client::run(socket, c, r))
        }
        RoleCmd::TonicServer(ServerArgs { socket, group, threads }) => {
            serve(server_runtime(threads), "server", group, |c, r| tonic_server::run(socket, c, r))
        }
        RoleCmd::TonicClient(ClientArgs { socket, group }) => {
            serve(client_runtime(), "client", group, |c, r| tonic_client::run(socket, c, r))
        }
        RoleCmd::TarpcServer(ServerArgs { socket, group, threads }) => {
            serve(server_runtime(threads), "server", group, |c, r| tarpc_server::run(socket, c, r))
        }
        RoleCmd::TarpcClient(ClientArgs { socket, group }) => {
            serve(client_runtime(), "client", group, |c, r| tarpc_client::run(socket, c, r))
        }
        RoleCmd::Standalone { dir, name, group } => {
            serve(client_runtime(), "standalone", group, |c, r| standalone::run(dir, name, c, r))
        }
        RoleCmd::Mass { socket, group, count } => {
            serve(client_runtime(), "mass", group, |c, r| mass::run(socket, count, c, r))
        }
        RoleCmd::ClusterMaster(args) => cluster_master::main(args),
        RoleCmd::PerCall { rounds, calls, in_flight, one_task, payload } => client_runtime()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(follower::per_call(rounds, calls, in_flight, one_task, payload))),
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(error) => {
            eprintln!("bench role failed: {error:#}");
            std::process::exit(1)
        }
    }
}

fn server_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()
}

fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Connects to the coordinator, runs `body`, reports its failure if it fails.
fn serve<F, Fut>(runtime: std::io::Result<tokio::runtime::Runtime>, role: &str, group: u32, body: F) -> Result<()>
where
    F: FnOnce(Commands, Reporter) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    runtime?.block_on(async {
        let (commands, reporter) = control::connect(role, group).await?;
        let result = body(commands, reporter.clone()).await;
        if let Err(error) = &result {
            reporter.send(&Report::Failed { error: format!("{role}: {error:#}") });
        }
        reporter.flush().await;
        result
    })
}
