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
//! # No task of its own
//!
//! A link end runs no task: [`LinkSender`] encodes a frame in the sender's
//! task and queues it for the process's IPC writer, and the IPC reader puts a
//! received frame straight into the link's buffer and wakes the task waiting
//! in [`LinkReceiver::recv`]. A frame crosses no task on either end but the
//! IPC writer and reader.
//!
//! # Flow control
//!
//! Each direction of a link has a credit window of `W` frames
//! ([`Config::link_capacity`](crate::Config::link_capacity)): the sending end
//! may have at most `W` frames the receiving end has not acknowledged. The
//! receiving end acknowledges frames as its application side takes them from
//! `rx`: every `W/2` frames taken it sends a `LinkCredit` back, which the
//! master relays like a frame. With no credit left, the sending end's
//! `tx.send().await` waits: a slow reader slows its writer down instead of
//! losing the link. Nothing in the master or on either end's IPC reader ever
//! waits for a link: the master relays frames and credits with `try_send`, and
//! a received frame goes into a buffer of `W` frames, which a sender that
//! honours its credit can never overflow. A peer that does not (the hard
//! bound) has its link closed, as has a link whose relay queue in the master
//! is full. A process's queue of link messages to the master is bounded by
//! the credits: at most `W` frames per link, and a credit per `W/2` frames
//! taken.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};

use futures::{Sink, Stream, StreamExt};
use tandem_protocol::internal::error_chain;
use tandem_protocol::{CodecError, Frame, FrameCodec, Link};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{SendError, TrySendError};

use crate::WorkerId;
use crate::identity::LinkId;
use crate::ipc::FromChild;

/// One relayed link: frames to the other end on `tx`, frames from it on `rx`.
///
/// `rx` ends (`None`) when the other end closes the link or its process dies;
/// then `tx.send` fails too. Dropping `tx` or `rx` closes the link.
#[derive(Debug)]
pub struct FrameLink {
    /// The link's id, unique within the master's life.
    pub id: u64,
    /// Frames to the other end (`send` waits while the other end has not
    /// taken enough of the frames already sent).
    pub tx: LinkSender,
    /// Frames from the other end. Taking them out is what lets the other end
    /// send more: each direction has a window of
    /// [`Config::link_capacity`](crate::Config::link_capacity) frames.
    pub rx: LinkReceiver,
}

impl From<FrameLink> for Link {
    /// The link as the Leader and the Follower talk over it.
    fn from(link: FrameLink) -> Link {
        Link::new(link.rx.map(Ok), link.tx)
    }
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

type Entries = Mutex<HashMap<LinkId, Arc<LinkEnd>>>;

/// This process's end of one link, shared by its sender, its receiver and the
/// IPC reader.
struct LinkEnd {
    id: LinkId,
    /// The credit window `W`.
    window: usize,
    state: Mutex<EndState>,
    /// Link messages to the master (bounded by the credits, see the module docs).
    out: mpsc::UnboundedSender<FromChild>,
    /// The table the end is registered in, until it closes.
    table: Weak<Entries>,
}

#[derive(Default)]
struct EndState {
    /// Received frames the user has not taken (at most the window).
    inbound: VecDeque<Frame>,
    /// The task waiting for a received frame.
    rx_waker: Option<Waker>,
    /// Frames taken since the last credit granted to the other end.
    taken: usize,
    /// This end's send credit: frames it may still send unacknowledged.
    credit: usize,
    /// The tasks waiting for credit.
    tx_wakers: Vec<Waker>,
    /// The link ended (closed by either end or by a process's death).
    closed: bool,
    /// Decodes the received bytes (its chunks hold the events' keys and payloads).
    decoder: FrameCodec,
}

impl fmt::Debug for LinkEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkEnd").field("id", &self.id).field("window", &self.window).finish_non_exhaustive()
    }
}

impl LinkEnd {
    fn lock(&self) -> MutexGuard<'_, EndState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Frames acknowledged per `LinkCredit`.
    fn credit_batch(&self) -> usize {
        (self.window / 2).max(1)
    }

    /// Ends the link on this end: `rx` ends after what it holds, `tx` fails.
    /// When this end is the first to close it, and `tell` is set, the master
    /// hears of it. Idempotent.
    fn close(&self, tell: bool) {
        let registered = self
            .table
            .upgrade()
            .is_some_and(|table| table.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id).is_some());
        let (rx_waker, tx_wakers) = {
            let mut state = self.lock();
            state.closed = true;
            (state.rx_waker.take(), std::mem::take(&mut state.tx_wakers))
        };
        rx_waker.into_iter().chain(tx_wakers).for_each(Waker::wake);
        if registered && tell {
            // Fails only when the IPC writer is gone, and then so is the master.
            let _ = self.out.send(FromChild::LinkClose { link: self.id });
        }
    }

    /// Takes one credit, or registers `cx` to be woken when there is one.
    fn poll_credit(&self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        let mut state = self.lock();
        if state.closed {
            return Poll::Ready(Err(()));
        }
        if state.credit > 0 {
            state.credit -= 1;
            return Poll::Ready(Ok(()));
        }
        if !state.tx_wakers.iter().any(|w| w.will_wake(cx.waker())) {
            state.tx_wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Takes one credit if there is one: `Err(true)` when the link is closed.
    fn try_credit(&self) -> Result<(), bool> {
        let mut state = self.lock();
        if state.closed {
            return Err(true);
        }
        if state.credit == 0 {
            return Err(false);
        }
        state.credit -= 1;
        Ok(())
    }

    /// Queues a frame for which a credit was taken.
    fn transmit(&self, frame: &Frame) -> Result<(), ()> {
        match frame.encode_body() {
            Ok(bytes) => self.out.send(FromChild::LinkFrame { link: self.id, frame: bytes }).map_err(drop),
            Err(e) => {
                // Nothing was sent: the credit goes back.
                tracing::warn!(link = self.id, kind = frame.kind(), error = %error_chain(&e), "cannot encode a frame; dropped");
                self.give_back_credit();
                Ok(())
            }
        }
    }

    fn give_back_credit(&self) {
        let wakers = {
            let mut state = self.lock();
            state.credit = (state.credit + 1).min(self.window);
            std::mem::take(&mut state.tx_wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Frame>> {
        let mut state = self.lock();
        let Some(frame) = state.inbound.pop_front() else {
            if state.closed {
                return Poll::Ready(None);
            }
            match &state.rx_waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => state.rx_waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        };
        state.taken += 1;
        if state.taken >= self.credit_batch() && !state.closed {
            let credit = u32::try_from(state.taken).unwrap_or(u32::MAX);
            state.taken = 0;
            drop(state);
            // Fails only when the IPC writer is gone, and then so is the master.
            let _ = self.out.send(FromChild::LinkCredit { link: self.id, credit });
        }
        Poll::Ready(Some(frame))
    }
}

/// The sending half of a [`FrameLink`]. Dropping it closes the link.
pub struct LinkSender {
    end: Arc<LinkEnd>,
    /// A credit taken by `poll_ready`, for the next `start_send`.
    reserved: bool,
}

impl fmt::Debug for LinkSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkSender").field("link", &self.end.id).finish_non_exhaustive()
    }
}

impl LinkSender {
    /// Sends a frame, waiting for credit; fails (giving the frame back) once
    /// the link is closed.
    pub async fn send(&self, frame: Frame) -> Result<(), SendError<Frame>> {
        if std::future::poll_fn(|cx| self.end.poll_credit(cx)).await.is_err() {
            return Err(SendError(frame));
        }
        self.end.transmit(&frame).map_err(|()| SendError(frame))
    }

    /// Sends a frame if there is credit for it now.
    #[allow(clippy::result_large_err, reason = "gives the frame back, as tokio's mpsc::Sender::try_send")]
    pub fn try_send(&self, frame: Frame) -> Result<(), TrySendError<Frame>> {
        match self.end.try_credit() {
            Ok(()) => self.end.transmit(&frame).map_err(|()| TrySendError::Closed(frame)),
            Err(true) => Err(TrySendError::Closed(frame)),
            Err(false) => Err(TrySendError::Full(frame)),
        }
    }

    /// Whether the link is closed.
    pub fn is_closed(&self) -> bool {
        self.end.lock().closed
    }
}

fn closed_error() -> CodecError {
    CodecError::Io(io::Error::new(io::ErrorKind::BrokenPipe, "the relayed link is closed"))
}

impl Sink<Frame> for LinkSender {
    type Error = CodecError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        let this = self.get_mut();
        if this.reserved {
            return Poll::Ready(Ok(()));
        }
        match this.end.poll_credit(cx) {
            Poll::Ready(Ok(())) => {
                this.reserved = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(())) => Poll::Ready(Err(closed_error())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn start_send(self: Pin<&mut Self>, frame: Frame) -> Result<(), CodecError> {
        let this = self.get_mut();
        if !std::mem::take(&mut this.reserved) && this.end.try_credit().is_err() {
            // `poll_ready` was not called first, or the link closed.
            return Err(closed_error());
        }
        this.end.transmit(&frame).map_err(|()| closed_error())
    }

    /// Frames go to the IPC writer as they are sent: nothing to flush.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Poll::Ready(Ok(()))
    }

    /// Closes the link (after the frames already sent).
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        self.end.close(true);
        Poll::Ready(Ok(()))
    }
}

impl Drop for LinkSender {
    fn drop(&mut self) {
        self.end.close(true);
    }
}

/// The receiving half of a [`FrameLink`]. Dropping it closes the link.
pub struct LinkReceiver {
    end: Arc<LinkEnd>,
}

impl fmt::Debug for LinkReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkReceiver").field("link", &self.end.id).finish_non_exhaustive()
    }
}

impl LinkReceiver {
    /// The next frame from the other end; `None` once the link is closed and
    /// every frame received before is taken.
    pub async fn recv(&mut self) -> Option<Frame> {
        std::future::poll_fn(|cx| self.end.poll_recv(cx)).await
    }

    /// Polls for the next frame (see [`recv`](Self::recv)).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame>> {
        self.end.poll_recv(cx)
    }
}

impl Stream for LinkReceiver {
    type Item = Frame;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Frame>> {
        self.end.poll_recv(cx)
    }
}

impl Drop for LinkReceiver {
    fn drop(&mut self) {
        self.end.close(true);
    }
}

/// The links of one child process.
#[derive(Debug, Clone)]
pub(crate) struct LinkTable {
    entries: Arc<Entries>,
    /// The credit window `W`, per link and direction.
    window: usize,
    /// Link messages to the master (see [`LinkEnd::out`]).
    out: mpsc::UnboundedSender<FromChild>,
    /// In the agent: where incoming links go (bounded; when full the link is closed).
    incoming: Option<mpsc::Sender<IncomingLink>>,
}

impl LinkTable {
    pub(crate) fn new(
        window: usize,
        out: mpsc::UnboundedSender<FromChild>,
        incoming: Option<mpsc::Sender<IncomingLink>>,
    ) -> Self {
        LinkTable { entries: Arc::default(), window: window.max(1), out, incoming }
    }

    /// Registers a link the master opened and returns this end of it.
    pub(crate) fn attach(&self, link: LinkId) -> FrameLink {
        let end = Arc::new(LinkEnd {
            id: link,
            window: self.window,
            state: Mutex::new(EndState { credit: self.window, ..EndState::default() }),
            out: self.out.clone(),
            table: Arc::downgrade(&self.entries),
        });
        self.lock().insert(link, Arc::clone(&end));
        FrameLink { id: link, tx: LinkSender { end: Arc::clone(&end), reserved: false }, rx: LinkReceiver { end } }
    }

    /// In the agent: a worker opened a link.
    pub(crate) fn incoming(&self, link: LinkId, worker_id: WorkerId, pid: u32) {
        let frame_link = self.attach(link);
        let delivered = match &self.incoming {
            Some(tx) => tx.try_send(IncomingLink { worker_id, pid, link: frame_link }).is_ok(),
            None => false,
        };
        if !delivered {
            // Dropping the link (in the refused message) closed it.
            tracing::warn!(link, worker.id = worker_id, "no room for an incoming link; closed it");
        }
    }

    fn get(&self, link: LinkId) -> Option<Arc<LinkEnd>> {
        self.lock().get(&link).cloned()
    }

    /// A frame for this end of a link. Never waits (the IPC reader calls it).
    pub(crate) fn deliver(&self, link: LinkId, bytes: &[u8]) {
        let Some(end) = self.get(link) else { return }; // closed meanwhile
        let mut state = end.lock();
        if state.closed {
            return;
        }
        let frame = match state.decoder.decode_body(bytes) {
            Ok(frame) => frame,
            Err(e) => {
                drop(state);
                tracing::warn!(link, error = %error_chain(&e), "undecodable frame on a link; closing it");
                end.close(true);
                return;
            }
        };
        if state.inbound.len() >= self.window {
            drop(state);
            // The other end sent more than its credit allows.
            tracing::warn!(link, window = self.window, "the other end of a link exceeded its credit; closing the link");
            end.close(true);
            return;
        }
        state.inbound.push_back(frame);
        let waker = state.rx_waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The other end took `credit` more of this end's frames: that many more may
    /// be sent. Never waits (the IPC reader calls it).
    pub(crate) fn credit(&self, link: LinkId, credit: u32) {
        let Some(end) = self.get(link) else { return };
        let wakers = {
            let mut state = end.lock();
            // At most what is outstanding: the window never grows past `W`.
            let outstanding = self.window.saturating_sub(state.credit);
            let credit = usize::try_from(credit).unwrap_or(usize::MAX);
            if credit > outstanding {
                tracing::warn!(link, credit, outstanding, "a link credit for more frames than were sent; capped");
            }
            state.credit += credit.min(outstanding);
            std::mem::take(&mut state.tx_wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// The other end closed the link (or died): `rx` ends, `tx` fails.
    pub(crate) fn peer_closed(&self, link: LinkId, reason: &str) {
        let end = self.lock().remove(&link);
        if let Some(end) = end {
            tracing::debug!(link, reason, "link closed by the other end");
            end.close(false);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<LinkId, Arc<LinkEnd>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::SinkExt;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn table(window: usize) -> (LinkTable, mpsc::UnboundedReceiver<FromChild>) {
        let (out, rx) = mpsc::unbounded_channel();
        (LinkTable::new(window, out, None), rx)
    }

    fn body(frame: &Frame) -> Vec<u8> {
        frame.encode_body().unwrap().to_vec()
    }

    #[tokio::test]
    async fn a_sender_waits_for_credit_and_a_credit_lets_it_go_on() {
        tokio::time::timeout(TIMEOUT, async {
            let (table, mut out) = table(2);
            let link = table.attach(7);
            link.tx.send(Frame::Ping(1)).await.unwrap();
            link.tx.try_send(Frame::Ping(2)).unwrap();
            assert!(matches!(link.tx.try_send(Frame::Ping(3)), Err(TrySendError::Full(_))));
            for n in 1..=2 {
                match out.recv().await {
                    Some(FromChild::LinkFrame { link: 7, frame }) => {
                        assert!(matches!(Frame::decode_body(&frame), Ok(Frame::Ping(m)) if m == n))
                    }
                    other => panic!("{other:?}"),
                }
            }
            let tx = link.tx;
            let waiting = tokio::spawn(async move {
                tx.send(Frame::Ping(3)).await.unwrap();
                tx
            });
            tokio::task::yield_now().await;
            assert!(!waiting.is_finished());
            table.credit(7, 5); // capped at the two outstanding
            let tx = waiting.await.unwrap();
            tx.try_send(Frame::Ping(4)).unwrap();
            assert!(matches!(tx.try_send(Frame::Ping(5)), Err(TrySendError::Full(_))));
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn taking_frames_grants_credit_every_half_window() {
        tokio::time::timeout(TIMEOUT, async {
            let (table, mut out) = table(4);
            let mut link = table.attach(1);
            for n in 0..4 {
                table.deliver(1, &body(&Frame::Ping(n)));
            }
            for n in 0..4 {
                assert!(matches!(link.rx.recv().await, Some(Frame::Ping(m)) if m == n));
            }
            for _ in 0..2 {
                assert!(matches!(out.recv().await, Some(FromChild::LinkCredit { link: 1, credit: 2 })));
            }
            assert!(out.try_recv().is_err());
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_peer_over_its_credit_has_its_link_closed_after_what_it_sent() {
        tokio::time::timeout(TIMEOUT, async {
            let (table, mut out) = table(2);
            let mut link = table.attach(3);
            for n in 0..3 {
                table.deliver(3, &body(&Frame::Ping(n)));
            }
            assert!(matches!(out.recv().await, Some(FromChild::LinkClose { link: 3 })));
            assert!(matches!(link.rx.recv().await, Some(Frame::Ping(0))));
            assert!(matches!(link.rx.recv().await, Some(Frame::Ping(1))));
            assert!(link.rx.recv().await.is_none());
            assert!(link.tx.send(Frame::Ping(9)).await.is_err());
            table.deliver(3, &body(&Frame::Ping(4))); // ignored: the link is gone
            drop(link);
            assert!(out.try_recv().is_err(), "closed once");
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn undecodable_bytes_close_the_link() {
        tokio::time::timeout(TIMEOUT, async {
            let (table, mut out) = table(2);
            let mut link = table.attach(4);
            table.deliver(4, &[0xc1]);
            assert!(matches!(out.recv().await, Some(FromChild::LinkClose { link: 4 })));
            assert!(link.rx.recv().await.is_none());
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn the_peer_closing_ends_rx_and_fails_a_waiting_send_without_telling_the_master() {
        tokio::time::timeout(TIMEOUT, async {
            let (table, mut out) = table(1);
            let link = table.attach(5);
            let FrameLink { tx, mut rx, .. } = link;
            tx.send(Frame::Ping(1)).await.unwrap();
            let waiting = tokio::spawn(async move { tx.send(Frame::Ping(2)).await.is_err() });
            table.deliver(5, &body(&Frame::Pong(1)));
            table.peer_closed(5, "test");
            assert!(waiting.await.unwrap(), "the waiting send fails");
            assert!(matches!(rx.recv().await, Some(Frame::Pong(1))));
            assert!(rx.recv().await.is_none());
            drop(rx);
            assert!(matches!(out.recv().await, Some(FromChild::LinkFrame { link: 5, .. })));
            assert!(out.try_recv().is_err(), "no LinkClose for a link the peer closed");
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn dropping_either_half_or_closing_the_sink_closes_the_link_once() {
        tokio::time::timeout(TIMEOUT, async {
            let (table, mut out) = table(2);
            let link = table.attach(6);
            drop(link.rx);
            assert!(matches!(out.recv().await, Some(FromChild::LinkClose { link: 6 })));
            assert!(link.tx.is_closed());
            drop(link.tx);
            let mut link = Link::from(table.attach(8));
            link.tx.send(Frame::Ping(1)).await.unwrap();
            SinkExt::<Frame>::close(&mut link.tx).await.unwrap();
            assert!(matches!(out.recv().await, Some(FromChild::LinkFrame { link: 8, .. })));
            assert!(matches!(out.recv().await, Some(FromChild::LinkClose { link: 8 })));
            drop(link);
            assert!(out.try_recv().is_err(), "closed once");
        })
        .await
        .unwrap();
    }
}
