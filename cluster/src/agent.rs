//! What the agent's start function gets.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::child_context::ChildContext;
use crate::ipc::Ready;
use crate::link::{IncomingLink, Links};
use crate::{Error, Messenger};

/// What the agent reports once its Leader is listening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReady {
    /// The Leader's socket, handed to every worker.
    pub socket: PathBuf,
}

/// The agent's view of the cluster, given to its start function.
///
/// The function starts the Leader (listening on a socket, typically
/// [`default_socket_path`](Self::default_socket_path), accepting the
/// [`token`](Self::token) and announcing [`epoch`](Self::epoch)), serves the
/// relayed [`links`](Self::links), calls [`ready`](Self::ready), runs until
/// [`stop_token`](Self::stop_token) is cancelled, and returns.
#[derive(Debug, Clone)]
pub struct AgentContext {
    core: Arc<ChildContext>,
    links: Arc<Mutex<Option<mpsc::Receiver<IncomingLink>>>>,
}

impl AgentContext {
    pub(crate) fn new(core: Arc<ChildContext>, links: mpsc::Receiver<IncomingLink>) -> Self {
        AgentContext { core, links: Arc::new(Mutex::new(Some(links))) }
    }

    /// The agent's epoch: 1 for the first agent, then strictly higher for every
    /// agent the master starts (hand it to the Leader, so Followers see a newer
    /// Leader after a restart).
    pub fn epoch(&self) -> u64 {
        self.core.init.epoch
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

    /// A socket path inside the runtime directory: `<runtime dir>/leader.sock`.
    pub fn default_socket_path(&self) -> PathBuf {
        self.core.init.runtime_dir.join("leader.sock")
    }

    /// The cluster's secret token: the Leader should accept only Followers presenting it.
    pub fn token(&self) -> &str {
        &self.core.init.token
    }

    /// The messenger.
    pub fn messenger(&self) -> &Messenger {
        &self.core.messenger
    }

    /// The links workers open to this agent (the Followers' relayed transport).
    /// The first call gets the stream; later calls get one that ends at once.
    #[doc(hidden)]
    pub fn links(&self) -> Links {
        let taken = self.links.lock().unwrap_or_else(PoisonError::into_inner).take();
        match taken {
            Some(rx) => Links::new(rx),
            None => {
                tracing::warn!("AgentContext::links called twice; the second stream is empty");
                let (_, rx) = mpsc::channel(1);
                Links::new(rx)
            }
        }
    }

    /// Reports the agent ready, with its Leader's socket: the master then starts
    /// the workers. Later calls do nothing.
    pub async fn ready(&self, ready: AgentReady) -> Result<(), Error> {
        self.core.report_ready(Ready::Agent { socket: ready.socket }).await
    }

    /// Cancelled when the agent must stop; the start function should then stop
    /// the Leader and return.
    pub fn stop_token(&self) -> CancellationToken {
        self.core.stop.clone()
    }

    /// Resolves when the agent must stop.
    pub async fn stopped(&self) {
        self.core.stop.cancelled().await
    }

    /// Resolves once the whole cluster is ready.
    pub async fn cluster_ready(&self) {
        self.core.wait_cluster_ready().await
    }
}
