//! The TCP server: accepts connections, runs a session per connection and the
//! lease reaper, and shuts down gracefully.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::session;
use crate::state::Shared;
use crate::stats::Stats;

/// How long the accept loop pauses after a failed `accept` (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound registry server, ready to [`run`](Server::run) or [`spawn`](Server::spawn).
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds a listener on `addr` (use port 0 for an ephemeral port).
    pub async fn bind(addr: impl ToSocketAddrs, config: Config) -> io::Result<Server> {
        Server::from_listener(TcpListener::bind(addr).await?, config)
    }

    /// Serves on a listener bound elsewhere.
    pub fn from_listener(listener: TcpListener, config: Config) -> io::Result<Server> {
        let local_addr = listener.local_addr()?;
        Ok(Server { listener, local_addr, shared: Arc::new(Shared::new(config)) })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's counters (`connections` counts every open connection).
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, says goodbye to
    /// every client and waits (up to [`Config::shutdown_grace`]) for the connections to close.
    pub async fn run(self, shutdown: CancellationToken) {
        let Server { listener, local_addr, shared } = self;
        tracing::debug!(addr = %local_addr, "registry serving");
        let tracker = TaskTracker::new();
        tracker.spawn(reap_leases(shared.clone(), shutdown.clone()));
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(error = %e, "cannot disable Nagle's algorithm");
                    }
                    let conn = shared.connection_opened();
                    tracker.spawn(session::run(stream, peer, conn, shared.clone(), shutdown.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            }
        }
        drop(listener);
        tracker.close();
        let grace = shared.config.shutdown_grace + Duration::from_secs(1);
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(connections = shared.stats().connections, "connections still open after the shutdown grace period");
        }
        info!(addr = %local_addr, "registry stopped");
    }

    /// Runs the server on a new task; the handle stops it (also when dropped).
    pub fn spawn(self) -> ServerHandle {
        let local_addr = self.local_addr;
        let shared = self.shared.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(self.run(shutdown.clone()));
        ServerHandle { local_addr, shared, shutdown, task: Some(task) }
    }
}

/// Serves the registry on `listener` until `shutdown` is cancelled.
///
/// Shorthand for [`Server::from_listener`] then [`Server::run`].
pub async fn serve(listener: TcpListener, config: Config, shutdown: CancellationToken) -> io::Result<()> {
    Server::from_listener(listener, config)?.run(shutdown).await;
    Ok(())
}

/// A server running on its own task, from [`Server::spawn`]. Dropping it stops the server.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's counters (`connections` counts every open connection).
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops the server and waits until it has stopped.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            warn!(error = %e, "the registry server task failed");
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Ends leases when their deadline passes, sleeping until the earliest one.
async fn reap_leases(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let deadline = shared.next_lease_deadline();
        tokio::select! {
            () = shutdown.cancelled() => return,
            // A new lease may expire before `deadline`.
            () = shared.leases_changed.notified() => continue,
            () = sleep_until(deadline) => {}
        }
        let expired = shared.expire_leases(Instant::now());
        if expired > 0 {
            info!(expired, "leases expired");
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
