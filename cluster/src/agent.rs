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

/// A hot standby's promotion ([`AgentContext::promoted`]): lead at `epoch`,
/// succeeding the agent of epoch `succeeded`, which died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Promotion {
    /// The epoch to lead at (the dead agent's plus one, or higher).
    pub epoch: u64,
    /// The epoch of the agent that died: a mirror seeds the new Leader only
    /// when it is of that agent's Leader (an older one missed its updates).
    pub succeeded: u64,
}

/// The agent's view of the cluster, given to its start function.
///
/// The function starts the Leader (listening on a socket, typically
/// [`default_socket_path`](Self::default_socket_path), accepting the
/// [`token`](Self::token) and announcing [`epoch`](Self::epoch)), serves the
/// relayed [`links`](Self::links), calls [`ready`](Self::ready), runs until
/// [`stop_token`](Self::stop_token) is cancelled, and returns.
///
/// With [`Config::standby`](crate::Config::standby), the same function also
/// runs in the hot standby: there [`is_standby`](Self::is_standby) is true,
/// and it must hold no upstream connection until [`promoted`](Self::promoted)
/// resolves. `tandem::cluster_glue::start_leader` does all of it: it mirrors
/// the Leader, reports [`standby_ready`](Self::standby_ready), waits for the
/// promotion, then starts the Leader seeded from the mirror at the promoted
/// epoch.
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
    /// Leader after a restart). A standby's is 0 until it is promoted, then
    /// the promoted epoch.
    pub fn epoch(&self) -> u64 {
        self.core.epoch()
    }

    /// Whether this process was started as the hot standby
    /// ([`Config::standby`](crate::Config::standby)). It stays true after the
    /// promotion; [`promotion`](Self::promotion) tells whether it came.
    pub fn is_standby(&self) -> bool {
        self.core.init.standby
    }

    /// The promotion, once the master sent it (a standby only).
    pub fn promotion(&self) -> Option<Promotion> {
        *self.core.promoted.borrow()
    }

    /// A standby: resolves when the master promotes it (the agent died), with
    /// the epoch to lead at; fails with [`Error::StandbyStopped`] when it is
    /// asked to stop first (return that error from the start function: the
    /// process exits with code 0). An agent that is not a standby is never
    /// promoted: it fails with [`Error::StandbyStopped`] at its stop.
    pub async fn promoted(&self) -> Result<Promotion, Error> {
        let mut promoted = self.core.promoted.clone();
        tokio::select! {
            biased;
            p = promoted.wait_for(Option::is_some) => match p.map(|p| *p) {
                Ok(Some(p)) => Ok(p),
                // The reader is gone: the process is exiting.
                _ => Err(Error::MasterGone),
            },
            _ = self.core.stop.cancelled() => Err(Error::StandbyStopped),
        }
    }

    /// A standby reports that it mirrors the Leader of epoch `mirrors` (its
    /// snapshot is complete): the master may promote it from now on. Until
    /// then an agent that dies is restarted cold.
    pub async fn standby_ready(&self, mirrors: u64) -> Result<(), Error> {
        self.core.report_standby_ready(mirrors).await
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
    /// the workers. Later calls do nothing. A standby may call it only once
    /// promoted: before, it fails with [`Error::StandbyNotPromoted`].
    pub async fn ready(&self, ready: AgentReady) -> Result<(), Error> {
        if self.is_standby() && self.promotion().is_none() {
            return Err(Error::StandbyNotPromoted);
        }
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
