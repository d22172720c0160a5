//! What a worker's start function gets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::child_context::ChildContext;
use crate::identity::AgentInfo;
use crate::ipc::Ready;
use crate::link::FrameLink;
use crate::{Error, Listener, Messenger, WorkerId};

/// A worker's view of the cluster, given to its start function.
///
/// The function connects its Follower (to [`agent_socket`](Self::agent_socket)
/// with [`token`](Self::token), or over a link the master relays, which
/// `tandem::cluster_glue::WorkerConnector` opens), calls
/// [`ready`](Self::ready), works until [`stop_token`](Self::stop_token) is
/// cancelled, and returns.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    core: Arc<ChildContext>,
    id: WorkerId,
    agent: watch::Receiver<AgentInfo>,
}

impl WorkerContext {
    pub(crate) fn new(core: Arc<ChildContext>, id: WorkerId, agent: watch::Receiver<AgentInfo>) -> Self {
        WorkerContext { core, id, agent }
    }

    /// This worker's id (`1..=N`, the same across restarts of the slot).
    pub fn id(&self) -> WorkerId {
        self.id
    }

    /// This process's pid.
    pub fn pid(&self) -> u32 {
        self.core.pid
    }

    /// The cluster's name.
    pub fn cluster_name(&self) -> &str {
        &self.core.init.cluster
    }

    /// The master's private runtime directory (0700).
    pub fn runtime_dir(&self) -> &Path {
        &self.core.init.runtime_dir
    }

    /// The cluster's secret token, to present to the Leader.
    pub fn token(&self) -> &str {
        &self.core.init.token
    }

    /// The current agent's Leader socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.agent.borrow().socket.clone()
    }

    /// The current agent; changes when it dies and when a new one is ready.
    pub fn agent(&self) -> watch::Receiver<AgentInfo> {
        self.agent.clone()
    }

    /// The messenger.
    pub fn messenger(&self) -> &Messenger {
        &self.core.messenger
    }

    /// Opens a link to the agent relayed by the master (same as
    /// `self.messenger().open_link()`); tandem's own glue uses it.
    #[doc(hidden)]
    pub async fn open_link(&self) -> Result<FrameLink, Error> {
        self.core.messenger.open_link().await
    }

    /// Takes the listening socket the master bound for listener `name` (see
    /// [`Builder::listen`](crate::Builder::listen)), ready for `axum::serve` or
    /// hyper. Each listener can be taken once per worker process. Take and
    /// serve every declared listener before [`ready`](Self::ready): a reload
    /// stops the old worker as soon as its successor is ready.
    pub fn listener(&self, name: &str) -> Result<Listener, Error> {
        self.core.listeners.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take(name, &self.core.stop)
    }

    /// [`listener`](Self::listener), for a TCP listener.
    pub fn tcp_listener(&self, name: &str) -> Result<tokio::net::TcpListener, Error> {
        match self.listener(name)? {
            Listener::Tcp(l) => Ok(l),
            _ => Err(Error::WrongListenerKind { name: name.to_owned(), expected: "TCP (reuseport or shared)" }),
        }
    }

    /// [`listener`](Self::listener), for a Unix socket listener.
    pub fn unix_listener(&self, name: &str) -> Result<tokio::net::UnixListener, Error> {
        match self.listener(name)? {
            Listener::Unix(l) => Ok(l),
            _ => Err(Error::WrongListenerKind { name: name.to_owned(), expected: "Unix" }),
        }
    }

    /// A future that resolves when the worker is asked to stop (cluster
    /// shutdown, a reload or memory replacement of this worker, SIGTERM), for
    /// `axum::serve(..).with_graceful_shutdown(..)`.
    ///
    /// Mind hyper's graceful shutdown: it closes at once a connection that has
    /// not delivered its first request bytes yet, as idle, so a client that
    /// connected just before gets no answer. Stop accepting first and let
    /// open connections finish before shutting them down, as
    /// `examples/http_config.rs` does (`StopAccepting`, `serve`).
    pub fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let token = self.core.stop.clone();
        async move { token.cancelled().await }
    }

    /// Reports this worker ready (call it once its Follower is connected).
    /// Later calls do nothing.
    pub async fn ready(&self) -> Result<(), Error> {
        self.core.report_ready(Ready::Worker).await
    }

    /// Cancelled when the worker must stop (cluster shutdown or SIGTERM); the
    /// start function should then finish its work and return.
    pub fn stop_token(&self) -> CancellationToken {
        self.core.stop.clone()
    }

    /// Resolves when the worker must stop.
    pub async fn stopped(&self) {
        self.core.stop.cancelled().await
    }

    /// Resolves once the whole cluster is ready.
    pub async fn cluster_ready(&self) {
        self.core.wait_cluster_ready().await
    }
}
