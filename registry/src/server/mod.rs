//! The TCP server: accepts connections, runs a session per connection and the
//! lease reaper, and shuts down gracefully.
//!
//! Each connection is a `session` applying requests to the `state` every
//! session shares: the config center's `store`, the `services` registry and
//! the `hub` of watchers. A session reads with the `reader` and writes through
//! its `outbound` queues, under the server-wide `limits`.

mod config;
mod conn_id;
mod hub;
mod limits;
mod outbound;
mod reader;
mod services;
mod session;
mod state;
mod store;

use crate::code;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tandem_protocol::internal::AcceptErrors;
use tandem_protocol::{Codec, RemoteError};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use config::{Config, RESERVED_FDS, SMALL_FRAME, default_max_connections};

use config::open_file_limit;
use limits::Limits;
use state::Shared;

use crate::wire::{Request, ServerMessage, Stats};

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
    ///
    /// Past [`Config::max_connections`], a new connection is sent a `Goodbye`
    /// (code `too_many_connections`) and closed. When `accept` itself fails (out
    /// of file descriptors, say), the loop logs it (rate-limited), pauses with a
    /// backoff and tries again; the open connections are served all along.
    pub async fn run(self, shutdown: CancellationToken) {
        let Server { listener, local_addr, shared } = self;
        let config = &shared.config;
        tracing::debug!(
            addr = %local_addr,
            max_connections = config.max_connections,
            frame_timeout_ms = config.frame_timeout.as_millis() as u64,
            first_request_timeout_ms = config.first_request_timeout.as_millis() as u64,
            idle_timeout_ms = config.idle_timeout.as_millis() as u64,
            partial_frame_budget = config.partial_frame_budget,
            max_frame = config.max_frame,
            "registry serving"
        );
        warn_if_over_file_limit(config.max_connections);
        let limits = Limits::new(config);
        let mut errors = AcceptErrors::new("registry");
        let tracker = TaskTracker::new();
        tracker.spawn(reap_leases(shared.clone(), shutdown.clone()));
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    errors.succeeded();
                    let Some(slot) = limits.try_open() else {
                        limits.log_refused(peer);
                        refuse(stream, limits.max_connections);
                        continue;
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(error = %e, "cannot disable Nagle's algorithm");
                    }
                    let conn = shared.connection_opened();
                    tracker.spawn(session::run(stream, peer, conn, shared.clone(), slot, shutdown.clone()));
                }
                Err(e) => {
                    let pause = errors.failed(&e);
                    if pause.is_zero() {
                        continue;
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
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

/// Tells a connection past the cap why it is closed, without waiting for it:
/// the goodbye is written only if the fresh socket takes it at once (it does,
/// its buffer is empty), then the socket is closed.
fn refuse(stream: TcpStream, max_connections: usize) {
    let error = RemoteError::unavailable(format!(
        "the registry is serving its limit of {max_connections} connections; try again later"
    ))
    .with_code(code::TOO_MANY_CONNECTIONS);
    let mut goodbye = BytesMut::new();
    if let Err(e) = Codec::<Request>::new().encode(ServerMessage::Goodbye(error), &mut goodbye) {
        debug!(error = %e, "cannot encode the refusal");
        return;
    }
    // A std socket writes without waiting for the reactor to report it writable.
    match stream.into_std() {
        Ok(stream) => {
            if let Err(e) = std::io::Write::write(&mut &stream, &goodbye) {
                debug!(error = %e, "cannot tell a refused connection why");
            }
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        Err(e) => debug!(error = %e, "cannot tell a refused connection why"),
    }
}

/// Warns when the open-file limit would stop `accept` (with `EMFILE`) before
/// the connection cap does: then clients wait in the backlog instead of being refused.
fn warn_if_over_file_limit(max_connections: usize) {
    if let Some(limit) = open_file_limit() {
        let room = usize::try_from(limit).unwrap_or(usize::MAX).saturating_sub(RESERVED_FDS);
        if max_connections > room {
            warn!(
                max_connections,
                open_file_limit = limit,
                "the connection limit is above what the open-file limit allows (minus {RESERVED_FDS} reserved): \
                 accept will fail with EMFILE before it is reached; raise `ulimit -n` or lower --max-connections"
            );
        }
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
