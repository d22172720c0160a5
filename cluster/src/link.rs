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
//!   | LinkCredit{id, n}          |  LinkCredit{id, n}          |  (and the other way)
//!   |--------------------------->|---------------------------->|
//!   |      worker dies: LinkClosed{id} ---------------------->|  rx ends (None)
//!   |<------ LinkClosed{id} : agent dies                      |
//! ```
//!
//! The master relays the frames as opaque bytes; each end encodes and decodes
//! them.
//!
//! # Flow control
//!
//! Each direction of a link has a credit window of `W` frames
//! ([`Config::link_capacity`](crate::Config::link_capacity)): the sending end
//! may have at most `W` frames the receiving end has not acknowledged. The
//! receiving end acknowledges frames as its application side takes them: a
//! per-link task moves received frames into the user's `rx` (waiting while it
//! is full) and, every `W/2` frames moved, sends a `LinkCredit` back, which the
//! master relays like a frame. With no credit left, the sending end's pump
//! stops draining the user's `tx`, whose `send().await` then waits: a slow
//! reader slows its writer down instead of losing the link. Nothing in the
//! master or on either end's IPC reader ever waits for a link: the master
//! relays frames and credits with `try_send`, and a received frame is queued
//! with `try_send` into a buffer of `W` frames, which a sender that honours its
//! credit can never overflow. A peer that does not (the hard bound) has its
//! link closed, as has a link whose relay queue in the master is full.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures::Stream;
use tandem_protocol::{Frame, error_chain};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::WorkerId;
use crate::ipc::FromChild;
use crate::types::LinkId;

/// One relayed link: frames to the other end on `tx`, frames from it on `rx`.
///
/// `rx` ends (`None`) when the other end closes the link or its process dies;
/// then `tx.send` fails too. Dropping `tx` closes the link.
#[derive(Debug)]
pub struct FrameLink {
    /// The link's id, unique within the master's life.
    pub id: u64,
    /// Frames to the other end (bounded: `send` waits while the relay is busy
    /// or the other end has not taken enough of the frames already sent).
    pub tx: mpsc::Sender<Frame>,
    /// Frames from the other end. Taking them out is what lets the other end
    /// send more: each direction has a window of
    /// [`Config::link_capacity`](crate::Config::link_capacity) frames.
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
    /// Received frames, before they move into the user's `rx` (at most the window).
    inbound: mpsc::Sender<Frame>,
    /// This end's send credit: frames it may still send unacknowledged.
    credit: Arc<Semaphore>,
    cancel: CancellationToken,
}

/// The links of one child process.
#[derive(Debug, Clone)]
pub(crate) struct LinkTable {
    entries: Arc<Mutex<HashMap<LinkId, Entry>>>,
    /// The credit window `W`, per link and direction.
    window: usize,
    writer: mpsc::Sender<FromChild>,
    tracker: TaskTracker,
    /// In the agent: where incoming links go (bounded; when full the link is closed).
    incoming: Option<mpsc::Sender<IncomingLink>>,
}

impl LinkTable {
    pub(crate) fn new(
        window: usize,
        writer: mpsc::Sender<FromChild>,
        tracker: TaskTracker,
        incoming: Option<mpsc::Sender<IncomingLink>>,
    ) -> Self {
        LinkTable { entries: Arc::default(), window: window.max(1), writer, tracker, incoming }
    }

    /// Frames acknowledged per `LinkCredit`.
    fn credit_batch(&self) -> usize {
        (self.window / 2).max(1)
    }

    /// Registers a link the master opened and returns this end of it.
    pub(crate) fn attach(&self, link: LinkId) -> FrameLink {
        let (in_tx, in_rx) = mpsc::channel(self.window);
        let (user_in_tx, user_in_rx) = mpsc::channel(self.window);
        let (out_tx, out_rx) = mpsc::channel(self.window);
        let credit = Arc::new(Semaphore::new(self.window));
        let cancel = CancellationToken::new();
        let entry = Entry { inbound: in_tx, credit: Arc::clone(&credit), cancel: cancel.clone() };
        self.lock().insert(link, entry);
        self.tracker.spawn(self.clone().pump(link, out_rx, credit, cancel).in_current_span());
        self.tracker.spawn(self.clone().forward(link, in_rx, user_in_tx).in_current_span());
        FrameLink { id: link, tx: out_tx, rx: user_in_rx }
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
        let frame = match Frame::decode_body(bytes) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(link, error = %error_chain(&e), "undecodable frame on a link; closing it");
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
                // The other end sent more than its credit allows.
                tracing::warn!(
                    link,
                    window = self.window,
                    "the other end of a link exceeded its credit; closing the link"
                );
                self.close(link);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.close(link),
        }
    }

    /// The other end took `credit` more of this end's frames: that many more may
    /// be sent. Never waits (the IPC reader calls it).
    pub(crate) fn credit(&self, link: LinkId, credit: u32) {
        let entries = self.lock();
        let Some(entry) = entries.get(&link) else { return };
        // At most what is outstanding: the window never grows past `W`.
        let outstanding = self.window.saturating_sub(entry.credit.available_permits());
        let credit = usize::try_from(credit).unwrap_or(usize::MAX);
        if credit > outstanding {
            tracing::warn!(link, credit, outstanding, "a link credit for more frames than were sent; capped");
        }
        entry.credit.add_permits(credit.min(outstanding));
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

    /// Sends this end's frames, one credit each, until the user drops `tx` or
    /// the link closes. With no credit left it stops taking frames from `tx`,
    /// so the user's `send` waits.
    async fn pump(
        self,
        link: LinkId,
        mut out: mpsc::Receiver<Frame>,
        credit: Arc<Semaphore>,
        cancel: CancellationToken,
    ) {
        loop {
            let frame = tokio::select! {
                _ = cancel.cancelled() => return,
                frame = out.recv() => frame,
            };
            let Some(frame) = frame else {
                self.close(link);
                return;
            };
            let bytes = match frame.encode_body() {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(link, kind = frame.kind(), error = %error_chain(&e), "cannot encode a frame; dropped");
                    continue;
                }
            };
            // A credit at hand is taken without a future (the common case).
            let permit = match credit.try_acquire() {
                Ok(permit) => Ok(permit),
                Err(_) => tokio::select! {
                    _ = cancel.cancelled() => return,
                    permit = credit.acquire() => permit,
                },
            };
            match permit {
                Ok(permit) => permit.forget(), // given back by the other end's LinkCredit
                Err(_) => return,              // never closed
            }
            let message = match self.writer.try_send(FromChild::LinkFrame { link, frame: bytes }) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(message)) => message,
            };
            let sent = tokio::select! {
                _ = cancel.cancelled() => return,
                sent = self.writer.send(message) => sent,
            };
            if sent.is_err() {
                return;
            }
        }
    }

    /// Moves received frames into the user's `rx`, waiting while it is full,
    /// and grants the other end credit for them every `W/2` frames. Ends when
    /// the link closes (after the frames already received) or the user drops
    /// `rx` (which closes the link).
    async fn forward(self, link: LinkId, mut received: mpsc::Receiver<Frame>, user: mpsc::Sender<Frame>) {
        let batch = self.credit_batch();
        let mut taken = 0usize;
        while let Some(frame) = received.recv().await {
            let delivered = match user.try_send(frame) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(frame)) => user.send(frame).await.map_err(drop),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
            };
            if delivered.is_err() {
                self.close(link);
                return;
            }
            taken += 1;
            if taken >= batch {
                let credit = u32::try_from(taken).unwrap_or(u32::MAX);
                taken = 0;
                if self.writer.send(FromChild::LinkCredit { link, credit }).await.is_err() {
                    return; // the master is gone
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LinkId, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
