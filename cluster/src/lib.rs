//! The tandem process runtime: one master supervising one agent (which hosts
//! the Leader) and N workers (each with a Follower), in the shape of
//! egg-cluster, without its silent message drops, lost worker slots and
//! orphaned children.
//!
//! It is a library called from your own `main`: the master re-runs the same
//! executable for the agent and each worker, with the role in the environment
//! (`TANDEM_ROLE`, `TANDEM_WORKER_ID`) and one end of a socketpair as the IPC
//! channel (`TANDEM_IPC_FD`); [`Builder::run`] dispatches on it. Secrets (the
//! token) travel over IPC, never on the command line.
//!
//! Start-up, in order:
//!
//! ```text
//! master                         agent                           worker i (1..=N)
//!   | runtime dir (0700) + 256-bit token
//!   | spawn (TANDEM_ROLE=agent)    |
//!   |----------------------------->|
//!   | Init{dir, token, epoch}       |
//!   |----------------------------->| start fn: Leader listens on a socket
//!   |       Ready{Agent{socket}}    |
//!   |<-----------------------------|
//!   | spawn (TANDEM_ROLE=worker, TANDEM_WORKER_ID=i)                  |
//!   |--------------------------------------------------------------->|
//!   | Init{dir, token, agent{pid, epoch, socket}}                     |
//!   |--------------------------------------------------------------->| start fn: Follower connects
//!   |                                                  Ready{Worker}  |
//!   |<---------------------------------------------------------------|
//!   | ClusterReady (to all)        |                                  |
//!   |----------------------------->|--------------------------------->|
//!   | ClusterEvent::ClusterReady to the master function
//! ```
//!
//! After start-up the master restarts dead processes with backoff
//! ([`RestartPolicy`]; a restarted agent gets a higher [`AgentContext::epoch`]
//! and workers see it through [`WorkerContext::agent`]), relays the
//! [`Messenger`]'s messages and the workers' relayed Leader/Follower links to
//! the agent (the Follower's fallback transport, see `tandem::cluster_glue`), and
//! on SIGTERM/SIGINT stops the workers, then the agent, then exits 0. Children
//! die with the master (`PR_SET_PDEATHSIG` and EOF of their IPC channel).
//! SIGUSR1 prints the [`StatusTable`] to stderr.
//!
//! Serving a port: listeners declared with [`Builder::listen`] are bound by the
//! master before any child starts and handed to every worker
//! ([`WorkerContext::listener`]) in one of three [`ShareMode`]s. SIGHUP (or
//! [`ClusterControl::reload`]) replaces the workers one slot at a time, each new
//! one ready before its predecessor drains, and rolls back on failure; workers
//! (and the agent) above their memory limit are replaced the same way.
//! [`ClusterControl::reload_agent`] reloads the agent instead: the old one
//! stops, a new one (higher epoch) starts, and the workers' Followers fail
//! over to its Leader as after an agent crash.
//! Operators reach a running cluster by its name ([`Builder::name`]) through
//! the master's [`control`] socket, with the `tandem` CLI (`tandem ls`,
//! `status`, `leader`, `reload [--agent]`, `stop`), and scrape `/metrics` when
//! [`Builder::metrics`] is set.
//!
//! ```no_run
//! use tandem_cluster::{AgentReady, BoxError, Cluster, ClusterEvent, Target};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), BoxError> {
//!     tandem_cluster::init_tracing();
//!     Cluster::builder("demo")
//!         .workers(4)
//!         .agent(|ctx| async move {
//!             // Start the Leader here, listening on this socket with `ctx.token()`.
//!             let socket = ctx.default_socket_path();
//!             let mut hello = ctx.messenger().subscribe("hello");
//!             ctx.ready(AgentReady { socket }).await?;
//!             loop {
//!                 tokio::select! {
//!                     Some(msg) = hello.recv() => msg.reply(format!("hi, {}", msg.from)).await?,
//!                     _ = ctx.stopped() => return Ok(()),
//!                 }
//!             }
//!         })
//!         .worker(|ctx| async move {
//!             // Connect the Follower to `ctx.agent_socket()` here.
//!             ctx.ready().await?;
//!             ctx.cluster_ready().await;
//!             let deadline = std::time::Duration::from_secs(1);
//!             let reply = ctx.messenger().request(Target::Agent, "hello", "", deadline).await?;
//!             println!("worker {}: {}", ctx.id(), String::from_utf8_lossy(&reply));
//!             ctx.stopped().await;
//!             Ok(())
//!         })
//!         .master(|ctx| async move {
//!             // The cluster logs each event itself (stderr); the master
//!             // function acts on the ones it cares about.
//!             let mut events = ctx.events();
//!             while let Some(event) = events.recv().await {
//!                 if let ClusterEvent::ClusterReady { workers, .. } = event {
//!                     println!("serving with {} workers", workers.len());
//!                 }
//!             }
//!             Ok(())
//!         })
//!         .run()
//!         .await?;
//!     Ok(())
//! }
//! ```

mod agent;
mod agent_reload;
mod app;
mod builder;
mod child;
mod child_context;
mod child_io;
mod config;
pub mod control;
mod descriptors;
mod error;
mod events;
mod fdpass;
mod identity;
mod ipc;
mod lifecycle;
mod link;
mod listeners;
mod liveness;
mod logs;
mod master;
mod master_context;
mod memory;
mod messenger;
#[cfg(feature = "metrics")]
mod metrics;
#[cfg(feature = "metrics")]
mod metrics_endpoint;
mod proc_tree;
mod process;
mod reaper;
mod reload;
mod reload_handle;
mod restart;
mod round_robin;
mod router;
mod runtime_dir;
mod scale;
mod signals;
mod spawn;
mod standby;
mod status;
mod stop;
mod supervisor;
mod systemd;
mod timers;
mod trace;
mod worker;

pub use agent::{AgentContext, AgentReady, Promotion};
pub use builder::{Builder, Cluster};
pub use config::{Config, default_workers};
pub use error::{BoxError, Error};
pub use events::{ClusterEvent, ClusterEvents};
pub use identity::{AgentInfo, Origin, Target};
pub use listeners::{LISTEN_BACKLOG, ListenAddr, Listener, ListenerInfo, ListenerSpec, ShareMode};
pub use logs::{MAX_LOG_LINE, MIN_LOG_FILE_SIZE};
pub use master_context::MasterContext;
pub use messenger::{Envelope, Messenger, TopicStream, decode, encode};
pub use process::{ExitReason, ProcessRef, ProcessRole, StartFailure, WorkerId};
pub use reload_handle::{
    AddedWorker, AgentReloadReport, BadScale, ClusterControl, MAX_WORKERS, ReloadError, ReloadReport, RemovedWorker,
    ReplaceReason, ReplacedWorker, ScaleReport, ScaleTo,
};
pub use restart::RestartPolicy;
pub use round_robin::{BACKLOG as ROUND_ROBIN_BACKLOG, MAX_UNACKED, RoundRobinListener};
pub use status::{ProcessState, StatusRow, StatusTable};
pub use trace::{init_tracing, init_tracing_with_default};
pub use worker::WorkerContext;

/// Machinery tandem's own crates share: the relayed Leader/Follower links
/// that `tandem::cluster_glue` serves in the agent and opens in the workers
/// ([`AgentContext::links`], [`WorkerContext::open_link`]). **Not part of the
/// API**: a program joins its Leader and Followers to the cluster with
/// `tandem::cluster_glue`, and these may change in any release.
#[doc(hidden)]
pub mod internal {
    pub use crate::link::{FrameLink, IncomingLink, LinkReceiver, LinkSender, Links};
}
