//! Links: a worker's channel of Leader/Follower [`Frame`]s to the agent, relayed
//! by the master — the Follower's fallback transport when the agent's socket
//! cannot be used.
//!
//! ```text
//! worker                       master                        agent
//!   | Op{OpenLink}               |                             |
//!   |--------------------------->| agent ready? new link id    |
//!   |   Outcome{LinkOpened{id}}  |  IncomingLink{id, worker}   |
//!   |<---------------------------|---------------------------->|  ctx.links() yields it
//!   | LinkFrame{id, bytes}       |  LinkFrame{id, bytes}       |
//!   |--------------------------->|---------------------------->|
//!   |       LinkFrame{id, bytes} |        LinkFrame{id, bytes} |
//!   |<---------------------------|<----------------------------|
//!   |      worker dies: LinkClosed{id} ---------------------->|  rx ends (None)
//!   |<------ LinkClosed{id} : agent dies                      |
//! ```
//!
//! The master relays the frames as opaque bytes; each end encodes and decodes
//! them. Each direction is bounded: the sender waits when the relay is busy,
//! and a receiver that falls more than the capacity behind has its link closed
//! (a Follower then reconnects) rather than stalling the whole IPC channel.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures::Stream;
use tandem_protocol::{Frame, payload};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::WorkerId;
use crate::ipc::{FromChild, LinkId};

/// One relayed link: frames to the other end on `tx`, frames from it on `rx`.
///
/// `rx` ends (`None`) when the other end closes the link or its process dies;
/// then `tx.send` fails too. Dropping `tx` closes the link.
#[derive(Debug)]
pub struct FrameLink {
    /// The link's id, unique within the master's life.
    pub id: u64,
    /// Frames to the other end (bounded: `send` waits while the relay is busy).
    pub tx: mpsc::Sender<Frame>,
    /// Frames from the other end.
    pub rx: mpsc::Receiver<Frame>,
}

/// A link a worker opened, as the agent receives it.
#[derive(Debug)]
pub struct IncomingLink {
    /// The worker's id.
    pub worker_id: WorkerId,
    /// The worker's pid.
    pub pid: u32,
    /// The link.
    pub link: FrameLink,
}

/// The links workers open to the agent, as a `Stream`.
#[derive(Debug)]
pub struct Links {
    rx: mpsc::Receiver<IncomingLink>,
}

impl Links {
    pub(crate) fn new(rx: mpsc::Receiver<IncomingLink>) -> Self {
        Links { rx }
    }

    /// The next link; `None` when this stream was already taken.
    pub async fn recv(&mut self) -> Option<IncomingLink> {
        self.rx.recv().await
    }
}

impl Stream for Links {
    type Item = IncomingLink;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<IncomingLink>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

#[derive(Debug)]
struct Entry {
    inbound: mpsc::Sender<Frame>,
    cancel: CancellationToken,
}

/// The links of one child process.
#[derive(Debug, Clone)]
pub(crate) struct LinkTable {
    entries: Arc<Mutex<HashMap<LinkId, Entry>>>,
    capacity: usize,
    writer: mpsc::Sender<FromChild>,
    tracker: TaskTracker,
    /// In the agent: where incoming links go (bounded; when full the link is closed).
    incoming: Option<mpsc::Sender<IncomingLink>>,
}

impl LinkTable {
    pub(crate) fn new(
        capacity: usize,
        writer: mpsc::Sender<FromChild>,
        tracker: TaskTracker,
        incoming: Option<mpsc::Sender<IncomingLink>>,
    ) -> Self {
        LinkTable { entries: Arc::default(), capacity: capacity.max(1), writer, tracker, incoming }
    }

    /// Registers a link the master opened and returns this end of it.
    pub(crate) fn attach(&self, link: LinkId) -> FrameLink {
        let (in_tx, in_rx) = mpsc::channel(self.capacity);
        let (out_tx, out_rx) = mpsc::channel(self.capacity);
        let cancel = CancellationToken::new();
        self.lock().insert(link, Entry { inbound: in_tx, cancel: cancel.clone() });
        let this = self.clone();
        self.tracker.spawn(this.pump(link, out_rx, cancel).in_current_span());
        FrameLink { id: link, tx: out_tx, rx: in_rx }
    }

    /// In the agent: a worker opened a link.
    pub(crate) fn incoming(&self, link: LinkId, worker_id: WorkerId, pid: u32) {
        let frame_link = self.attach(link);
        let delivered = match &self.incoming {
            Some(tx) => tx.try_send(IncomingLink { worker_id, pid, link: frame_link }).is_ok(),
            None => false,
        };
        if !delivered {
            tracing::warn!(link, worker.id = worker_id, "no room for an incoming link; closing it");
            self.close(link);
        }
    }

    /// A frame for this end of a link. Never waits (the IPC reader calls it).
    pub(crate) fn deliver(&self, link: LinkId, bytes: &[u8]) {
        let frame = match payload::decode::<Frame>(bytes) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(link, error = %e, "undecodable frame on a link; closing it");
                self.close(link);
                return;
            }
        };
        let sent = match self.lock().get(&link) {
            Some(entry) => entry.inbound.try_send(frame),
            None => return, // closed meanwhile
        };
        match sent {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(link, "link receiver fell behind; closing the link");
                self.close(link);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.close(link),
        }
    }

    /// The other end closed the link (or died): `rx` ends, `tx` fails.
    pub(crate) fn peer_closed(&self, link: LinkId, reason: &str) {
        if let Some(entry) = self.lock().remove(&link) {
            tracing::debug!(link, reason, "link closed by the other end");
            entry.cancel.cancel();
        }
    }

    /// This end closes the link and tells the master.
    fn close(&self, link: LinkId) {
        if let Some(entry) = self.lock().remove(&link) {
            entry.cancel.cancel();
            let writer = self.writer.clone();
            self.tracker.spawn(async move {
                // Fails only when the master is gone, and then nothing matters.
                let _ = writer.send(FromChild::LinkClose { link }).await;
            });
        }
    }

    /// Sends this end's frames until the user drops `tx` or the link closes.
    async fn pump(self, link: LinkId, mut out: mpsc::Receiver<Frame>, cancel: CancellationToken) {
        loop {
            let frame = tokio::select! {
                _ = cancel.cancelled() => return,
                frame = out.recv() => frame,
            };
            let Some(frame) = frame else {
                self.close(link);
                return;
            };
            match payload::encode(&frame) {
                Ok(bytes) => {
                    let send = self.writer.send(FromChild::LinkFrame { link, frame: bytes });
                    let sent = tokio::select! {
                        _ = cancel.cancelled() => return,
                        sent = send => sent,
                    };
                    if sent.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(link, kind = frame.kind(), error = %e, "cannot encode a frame; dropped"),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LinkId, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
