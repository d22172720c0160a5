//! The context every child has, which the agent's and the workers' contexts wrap: the child's `Init`, its
//! messenger, its stop token and its side of the IPC channel. The child
//! runtime ([`child`](crate::child)) builds it; the contexts wrap it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ipc::{FromChild, Init, Ready};
use crate::listeners::ReceivedListeners;
use crate::messenger::{ChildShared, Messenger};
use crate::{Error, Promotion};

/// What the agent and worker contexts share.
#[derive(Debug)]
pub(crate) struct ChildContext {
    pub init: Init,
    pub pid: u32,
    pub messenger: Messenger,
    pub stop: CancellationToken,
    pub shared: Arc<ChildShared>,
    pub ready_sent: AtomicBool,
    pub cluster_ready: watch::Receiver<bool>,
    /// The listening sockets the master handed this worker, until taken.
    pub listeners: std::sync::Mutex<ReceivedListeners>,
    /// A standby's promotion, once the master sent it.
    pub promoted: watch::Receiver<Option<Promotion>>,
}

impl ChildContext {
    pub(crate) async fn report_ready(&self, ready: Ready) -> Result<(), Error> {
        if self.ready_sent.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.shared.writer.send(FromChild::Ready(ready)).await.map_err(|_| Error::MasterGone)
    }

    /// A standby tells the master its mirror is synced (it may be promoted).
    pub(crate) async fn report_standby_ready(&self, mirrors: u64) -> Result<(), Error> {
        self.shared.writer.send(FromChild::Ready(Ready::Standby { mirrors })).await.map_err(|_| Error::MasterGone)
    }

    /// The epoch: the promoted one once promoted, else the one in `Init`.
    pub(crate) fn epoch(&self) -> u64 {
        self.promoted.borrow().map_or(self.init.epoch, |p| p.epoch)
    }

    pub(crate) async fn wait_cluster_ready(&self) {
        let mut rx = self.cluster_ready.clone();
        // Err only when the reader is gone, and then the process is exiting.
        let _ = rx.wait_for(|ready| *ready).await;
    }
}
