//! What the user's master function gets: the events, the messenger, and a way
//! to stop the cluster.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::{
    AgentReloadReport, ClusterControl, ClusterEvent, ClusterEvents, Error, ListenerInfo, Messenger, ReloadError,
    ReloadReport, StatusTable,
};

/// The master's view of the cluster, given to the function set with
/// [`Builder::master`](crate::Builder::master). It runs alongside the
/// supervisor, from before the agent starts until shutdown.
#[derive(Debug)]
pub struct MasterContext {
    pid: u32,
    runtime_dir: PathBuf,
    token: String,
    messenger: Messenger,
    first_events: Mutex<Option<ClusterEvents>>,
    later_events: broadcast::Receiver<ClusterEvent>,
    shutdown: CancellationToken,
    stopping: CancellationToken,
    control: ClusterControl,
    listeners: Vec<ListenerInfo>,
    name: String,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl MasterContext {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pid: u32,
        runtime_dir: PathBuf,
        token: String,
        messenger: Messenger,
        first_events: Option<ClusterEvents>,
        later_events: broadcast::Receiver<ClusterEvent>,
        shutdown: CancellationToken,
        stopping: CancellationToken,
        control: ClusterControl,
        listeners: Vec<ListenerInfo>,
    ) -> Self {
        MasterContext {
            pid,
            runtime_dir,
            token,
            messenger,
            first_events: Mutex::new(first_events),
            later_events,
            shutdown,
            stopping,
            control,
            listeners,
            name: String::new(),
            metrics_addr: None,
        }
    }

    pub(crate) fn with_operations(mut self, name: String, metrics_addr: Option<std::net::SocketAddr>) -> Self {
        self.name = name;
        self.metrics_addr = metrics_addr;
        self
    }

    /// The cluster's name, as `tandem ls` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address `/metrics` is served on, when [`Builder::metrics`](crate::Builder::metrics) asked for it.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The private runtime directory (0700), removed at exit.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// The cluster's secret token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The master's messenger.
    pub fn messenger(&self) -> &Messenger {
        &self.messenger
    }

    /// The cluster's events. The first call gets every event since the master
    /// started; later calls get the events from then on. The stream ends when
    /// the master exits.
    pub fn events(&self) -> ClusterEvents {
        let first = self.first_events.lock().unwrap_or_else(PoisonError::into_inner).take();
        first.unwrap_or_else(|| ClusterEvents::new(self.later_events.resubscribe()))
    }

    /// Asks for a graceful shutdown, as SIGTERM does.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Cancelled when shutdown begins (by a signal, [`shutdown`](Self::shutdown)
    /// or a failure of this function).
    pub fn stopping(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// The listeners the master bound, in declaration order, with their real
    /// addresses (the port the kernel picked for port 0).
    pub fn listeners(&self) -> &[ListenerInfo] {
        &self.listeners
    }

    /// A handle to reload the workers or the agent, for other tasks (a control socket).
    pub fn control(&self) -> ClusterControl {
        self.control.clone()
    }

    /// Reloads the workers, slot by slot, with rollback on failure (see
    /// [`ClusterControl::reload`]). Same as SIGHUP to the master.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.control.reload().await
    }

    /// Reloads the agent: the old one stops, a new one starts from the
    /// executable on disk with a higher epoch, and the workers' Followers fail
    /// over to its Leader (see [`ClusterControl::reload_agent`]).
    pub async fn reload_agent(&self) -> Result<AgentReloadReport, ReloadError> {
        self.control.reload_agent().await
    }

    /// The status table.
    pub async fn status(&self) -> Result<StatusTable, Error> {
        self.messenger.status().await
    }
}
