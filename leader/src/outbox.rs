//! One follower's outbound queue: bounded for replies, conflating for events
//! only once the follower is behind.
//!
//! The leader never waits for a follower. Replies, acks and control frames go
//! in a FIFO bounded by `Config::max_queued_frames`; when it is full the
//! follower is too slow, and its session is closed with that reason. Events go
//! in a second FIFO, in publish order, up to `Config::max_queued_events`: a
//! follower that keeps up gets every value. Past that the follower is behind,
//! and further events go in a third queue holding at most one entry per
//! (channel, key): a newer value replaces a pending older one in place
//! (conflation), so a slow follower costs memory bounded by the budget plus
//! its keys, not by the event rate. Each key's values stay in order (the FIFO
//! is written before the conflated queue, and nothing joins the FIFO while
//! the conflated queue holds anything).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Sink;
use tandem_protocol::internal::{Refused, WriteSource};
use tandem_protocol::{CodecError, Frame, LinkSink, SharedFrame};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::fence::Fence;
use crate::session_end::SessionEnd;

type EventKey = (Arc<str>, Bytes);

/// What the writer sends: a frame of this session, or a run of events, each
/// encoded once for every subscriber of its key. A run goes into the sink in
/// one step (one readiness check, one reservation; a socket copies the bytes
/// of each), not event by event.
#[derive(Debug, PartialEq)]
pub(crate) enum Outgoing {
    Frame(Frame),
    Events(Vec<SharedFrame>),
}

impl Outgoing {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Outgoing::Frame(frame) => frame.kind(),
            Outgoing::Events(_) => "Event",
        }
    }
}

/// The most wire bytes of events in one run: past it a new run starts, so the
/// socket's write buffer takes at most this much past its flush threshold
/// before the writer checks for room (and flushes) again.
const MAX_RUN_BYTES: usize = 64 * 1024;

/// Appends `events` to `batch` as runs of at most [`MAX_RUN_BYTES`] (and at
/// least one event each), in order.
fn push_runs(batch: &mut VecDeque<Outgoing>, count: usize, events: impl Iterator<Item = SharedFrame>) {
    let mut run = Vec::with_capacity(count);
    let mut bytes = 0;
    for event in events {
        bytes += event.wire().len();
        run.push(event);
        if bytes >= MAX_RUN_BYTES {
            bytes = 0;
            batch.push_back(Outgoing::Events(std::mem::take(&mut run)));
        }
    }
    if !run.is_empty() {
        batch.push_back(Outgoing::Events(run));
    }
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Frame>,
    /// Events in publish order, up to the budget.
    events: VecDeque<SharedFrame>,
    /// Past the budget: the newest pending event of each key, and the order
    /// in which the keys became pending.
    behind: HashMap<EventKey, SharedFrame>,
    behind_order: VecDeque<EventKey>,
    /// The index in `frames` of each mirrored key's pending update (a
    /// `Mirrored` of that key alone): a newer update replaces it in place.
    mirror_slots: HashMap<EventKey, usize>,
    closed: Option<SessionEnd>,
    conflated: u64,
    /// The writer found nothing to send and waits for a wake-up. Pushes wake
    /// it only then: a busy writer takes what was queued on its next round, so
    /// a burst of pushes costs one wake-up, not one each.
    writer_idle: bool,
}

/// The queue between the leader's tasks and one follower's writer task.
#[derive(Debug)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    max_frames: usize,
    max_events: usize,
    /// Cancelled when the outbox closes, so the session notices an overflow at once.
    closed: CancellationToken,
    /// Notified (every waiter) when the writer takes the events of a full
    /// queue: an upstream waiting for room ([`Outbox::room`]) may send again.
    room: Arc<Notify>,
}

impl Outbox {
    pub(crate) fn new(max_frames: usize, max_events: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            max_frames: max_frames.max(1),
            max_events: max_events.max(1),
            closed: CancellationToken::new(),
            room: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queues inconsistent
        // (every mutation is a single push/pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a frame and wakes the writer; false if the outbox is closed or
    /// just overflowed (then closed).
    pub(crate) fn push(&self, frame: Frame) -> bool {
        self.enqueue(frame, true)
    }

    /// Queues a frame without waking the writer: for the session's own task,
    /// which polls the writer itself after each burst. False if the outbox is
    /// closed or just overflowed.
    pub(crate) fn push_quiet(&self, frame: Frame) -> bool {
        self.enqueue(frame, false)
    }

    fn enqueue(&self, frame: Frame, wake: bool) -> bool {
        let state = self.lock();
        self.enqueue_locked(state, frame, wake)
    }

    fn enqueue_locked(&self, mut state: std::sync::MutexGuard<'_, State>, frame: Frame, wake: bool) -> bool {
        if state.closed.is_some() {
            return false;
        }
        if state.frames.len() >= self.max_frames {
            state.closed = Some(SessionEnd::OutboxOverflow { max_frames: self.max_frames });
            drop(state);
            self.closed.cancel();
            self.notify.notify_one();
            self.room.notify_waiters();
            return false;
        }
        state.frames.push_back(frame);
        if wake && std::mem::take(&mut state.writer_idle) {
            self.notify.notify_one();
        }
        true
    }

    /// Queues a mirror update of the key `channel`/`key` (a `Mirrored` of
    /// that key alone, PROTOCOL.md §7.2): it replaces the key's pending update
    /// in place if one is still queued (the mirror needs the latest state of
    /// each key, not every value), keeping that frame's `synced`, true at its
    /// place in the queue. So a standby that briefly stops reading costs at
    /// most one queued frame per key. False if the outbox is closed or just
    /// overflowed.
    pub(crate) fn push_mirror(&self, channel: &Arc<str>, key: &Bytes, mut update: tandem_protocol::Mirrored) -> bool {
        let mut state = self.lock();
        if state.closed.is_some() {
            return false;
        }
        let slot = (channel.clone(), key.clone());
        if let Some(&at) = state.mirror_slots.get(&slot)
            && let Some(Frame::Mirrored(pending)) = state.frames.get_mut(at)
        {
            update.synced = pending.synced;
            *pending = update;
            return true;
        }
        let at = state.frames.len();
        state.mirror_slots.insert(slot, at);
        self.enqueue_locked(state, Frame::Mirrored(update), true)
    }

    /// Queues an event (of the key `channel`/`key`): in publish order while
    /// the follower keeps up, replacing a pending older event of the same key
    /// once it is behind (more than `max_events` queued).
    pub(crate) fn push_event(&self, channel: &Arc<str>, key: &Bytes, event: &SharedFrame) {
        let mut state = self.lock();
        if state.closed.is_some() {
            return;
        }
        let state = &mut *state;
        if state.behind.is_empty() && state.events.len() < self.max_events {
            state.events.push_back(event.clone());
        } else {
            match state.behind.entry((channel.clone(), key.clone())) {
                Entry::Occupied(mut pending) => {
                    *pending.get_mut() = event.clone();
                    state.conflated += 1;
                    return;
                }
                Entry::Vacant(slot) => {
                    state.behind_order.push_back(slot.key().clone());
                    slot.insert(event.clone());
                }
            }
        }
        if std::mem::take(&mut state.writer_idle) {
            self.notify.notify_one();
        }
    }

    /// Whether the follower is behind: its event queue is at the budget.
    fn full(state: &State, max_events: usize) -> bool {
        !state.behind.is_empty() || state.events.len() >= max_events
    }

    /// `None` if the event queue has room (or the outbox is closed), else a
    /// future that resolves once the writer has taken the queued events.
    pub(crate) fn room(&self) -> Option<impl Future<Output = ()> + Send + 'static> {
        let has_room = |state: &State| state.closed.is_some() || !Self::full(state, self.max_events);
        if has_room(&self.lock()) {
            return None;
        }
        // Registered before the second look, so a take in between is not missed.
        let mut taken = Box::pin(self.room.clone().notified_owned());
        taken.as_mut().enable();
        if has_room(&self.lock()) {
            return None;
        }
        Some(taken)
    }

    /// Drops any pending event of a key (the follower unsubscribed it).
    pub(crate) fn forget_key(&self, channel: &Arc<str>, key: &Bytes) {
        let mut state = self.lock();
        if state.closed.is_some() {
            // The session is ending (and lets go of every key): not worth a
            // pass over the queue per key.
            return;
        }
        let event_key = (channel.clone(), key.clone());
        if state.behind.remove(&event_key).is_some() {
            state.behind_order.retain(|k| k != &event_key);
        }
        state.events.retain(|event| match event.frame() {
            Frame::Event(event) => event.channel != **channel || event.key != *key,
            _ => true,
        });
    }

    /// Closes the outbox: later pushes are dropped, the writer ends after what is queued.
    pub(crate) fn close(&self, reason: SessionEnd) {
        let mut state = self.lock();
        if state.closed.is_none() {
            state.closed = Some(reason);
        }
        drop(state);
        self.closed.cancel();
        self.notify.notify_one();
        self.room.notify_waiters();
    }

    /// Resolves once the outbox is closed.
    pub(crate) async fn wait_closed(&self) {
        self.closed.cancelled().await
    }

    /// The reason the outbox was closed, if it was.
    pub(crate) fn closed_reason(&self) -> Option<SessionEnd> {
        self.lock().closed.clone()
    }

    /// How many events were replaced before a slow follower read them.
    pub(crate) fn conflated(&self) -> u64 {
        self.lock().conflated
    }

    /// Moves everything queued into `batch` (frames first, then events in the
    /// order their keys first became pending). Waits while there is nothing.
    /// Returns the close reason once the outbox is closed and drained.
    pub(crate) async fn next_batch(&self, batch: &mut VecDeque<Outgoing>) -> Result<(), SessionEnd> {
        // The queue is looked at on every poll, not only once notified: a
        // writer polled by the task that queued the frames finds them without
        // a wake-up.
        let mut notified = std::pin::pin!(self.notify.notified());
        std::future::poll_fn(|cx| {
            loop {
                if let Some(taken) = self.take(batch) {
                    return Poll::Ready(taken);
                }
                match notified.as_mut().poll(cx) {
                    Poll::Ready(()) => notified.set(self.notify.notified()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }

    /// Takes everything queued into `batch`; `None` if there is nothing (the
    /// writer is then marked idle, so the next push wakes it).
    fn take(&self, batch: &mut VecDeque<Outgoing>) -> Option<Result<(), SessionEnd>> {
        let mut state = self.lock();
        let state = &mut *state;
        let was_full = Self::full(state, self.max_events);
        batch.extend(state.frames.drain(..).map(Outgoing::Frame));
        state.mirror_slots.clear();
        let queued = state.events.len();
        push_runs(batch, queued, state.events.drain(..));
        let behind = state.behind_order.len();
        let (order, pending) = (&mut state.behind_order, &mut state.behind);
        push_runs(batch, behind, order.drain(..).filter_map(|key| pending.remove(&key)));
        if !batch.is_empty() {
            state.writer_idle = false;
            if was_full {
                self.room.notify_waiters();
            }
            return Some(Ok(()));
        }
        if let Some(reason) = &state.closed {
            return Some(Err(reason.clone()));
        }
        // Set under the lock, before waiting: a push after this point sees it
        // and notifies (a notification before the wait is kept).
        state.writer_idle = true;
        None
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // Nobody will take the queue now: an upstream waiting for room goes on.
        self.room.notify_waiters();
    }
}

/// The writer's view of an outbox: each wait takes everything queued (one
/// lock), and that batch is written before the outbox is looked at again.
#[derive(Debug)]
pub(crate) struct Batches {
    outbox: Arc<Outbox>,
    batch: VecDeque<Outgoing>,
    /// The leader's fence and epoch, when it has one: each batch is written
    /// only if the fence admits it (nothing goes out at an epoch another
    /// leader replaced).
    fence: Option<(Arc<Fence>, u64)>,
}

impl Batches {
    pub(crate) fn new(outbox: Arc<Outbox>, fence: Option<(Arc<Fence>, u64)>) -> Self {
        Batches { outbox, batch: VecDeque::with_capacity(64), fence }
    }
}

impl WriteSource for Batches {
    type Item = Outgoing;
    type Tag = &'static str;

    /// `None` once the outbox is closed and drained.
    async fn next(&mut self) -> Option<Outgoing> {
        if self.batch.is_empty() {
            self.outbox.next_batch(&mut self.batch).await.ok()?;
            if let Some((fence, epoch)) = &self.fence
                && !fence.admits(*epoch)
            {
                self.batch.clear();
                return None;
            }
        }
        self.batch.pop_front()
    }

    fn try_next(&mut self) -> Option<Outgoing> {
        self.batch.pop_front()
    }

    fn tag(outgoing: &Outgoing) -> &'static str {
        outgoing.kind()
    }

    fn refused(&mut self, kind: &'static str, error: CodecError) -> Refused<Outgoing> {
        if kind == "Mirrored" {
            // A mirror missing a frame would be wrong, silently (a snapshot
            // marked complete without some keys): the session ends instead,
            // and the standby mirrors again on its next connection.
            tracing::error!(%error, frame = kind, "mirror frame not sent; ending the mirroring session");
            return Refused::Fatal(error);
        }
        // Nothing was written: the connection is intact; drop this frame only.
        tracing::error!(%error, frame = kind, "frame not sent");
        Refused::Skip
    }
}

/// A link's sink taking each [`Outgoing`] as the frame or shared frame it holds.
pub(crate) struct OutgoingSink<'a>(pub(crate) &'a mut LinkSink);

impl Sink<Outgoing> for OutgoingSink<'_> {
    type Error = CodecError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Sink::<Frame>::poll_ready(self.0.as_mut(), cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Outgoing) -> Result<(), CodecError> {
        match item {
            Outgoing::Frame(frame) => self.0.as_mut().start_send(frame),
            Outgoing::Events(events) => self.0.as_mut().start_send(events),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Sink::<Frame>::poll_flush(self.0.as_mut(), cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Sink::<Frame>::poll_close(self.0.as_mut(), cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn event(key: &Bytes, seq: u64) -> SharedFrame {
        let payload = Bytes::from(format!("{}{seq}", String::from_utf8_lossy(key)));
        let event =
            tandem_protocol::Event { channel: "c".into(), key: key.clone(), epoch: 1, seq, payload, cached: false };
        SharedFrame::encode(Frame::Event(event), 1 << 20).unwrap()
    }

    fn seqs(batch: VecDeque<Outgoing>) -> Vec<(Bytes, u64)> {
        batch
            .into_iter()
            .flat_map(|f| match f {
                Outgoing::Events(events) => events,
                other => panic!("unexpected {other:?}"),
            })
            .map(|e| match e.frame() {
                Frame::Event(e) => (e.key.clone(), e.seq),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn mirrored(key: &str, value: &str, synced: bool) -> tandem_protocol::Mirrored {
        let entry = tandem_protocol::MirrorEntry {
            channel: "c".into(),
            key: Bytes::copy_from_slice(key.as_bytes()),
            epoch: 1,
            seq: 1,
            payload: Bytes::copy_from_slice(value.as_bytes()),
            revision: None,
        };
        tandem_protocol::Mirrored { entries: vec![entry], removed: vec![], synced }
    }

    #[tokio::test]
    async fn mirror_updates_of_a_key_replace_its_pending_one_in_place() {
        let outbox = Outbox::new(4, 4);
        let ch: Arc<str> = Arc::from("c");
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        assert!(outbox.push_mirror(&ch, &a, mirrored("a", "a1", false)));
        assert!(outbox.push(Frame::Mirrored(tandem_protocol::Mirrored {
            entries: vec![],
            removed: vec![],
            synced: true
        })));
        for n in 2..100 {
            assert!(outbox.push_mirror(&ch, &a, mirrored("a", &format!("a{n}"), true)));
            assert!(outbox.push_mirror(&ch, &b, mirrored("b", &format!("b{n}"), true)));
        }
        let mut batch = VecDeque::new();
        outbox.next_batch(&mut batch).await.unwrap();
        // Three frames, not 199 (and no overflow of 4): a's latest at a's first
        // place, keeping its `synced` false there; the closing frame; b's latest.
        let batch: Vec<Outgoing> = batch.into();
        assert_eq!(
            batch,
            vec![
                Outgoing::Frame(Frame::Mirrored(mirrored("a", "a99", false))),
                Outgoing::Frame(Frame::Mirrored(tandem_protocol::Mirrored {
                    entries: vec![],
                    removed: vec![],
                    synced: true
                })),
                Outgoing::Frame(Frame::Mirrored(mirrored("b", "b99", true))),
            ]
        );
        // Once taken, a new update queues afresh.
        assert!(outbox.push_mirror(&ch, &a, mirrored("a", "a100", true)));
        let mut batch = VecDeque::new();
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(batch, [Outgoing::Frame(Frame::Mirrored(mirrored("a", "a100", true)))]);
    }

    #[test]
    fn a_mirror_frame_the_codec_refuses_ends_the_session_and_others_are_skipped() {
        let mut batches = Batches::new(Arc::new(Outbox::new(8, 4)), None);
        let too_large = || CodecError::TooLarge { len: 2000, max: 1000 };
        assert!(matches!(batches.refused("Mirrored", too_large()), Refused::Fatal(CodecError::TooLarge { .. })));
        assert!(matches!(batches.refused("Response", too_large()), Refused::Skip));
    }

    #[tokio::test]
    async fn a_follower_that_keeps_up_gets_every_event_in_order() {
        let outbox = Outbox::new(8, 4);
        let ch: Arc<str> = Arc::from("c");
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        for (key, seq) in [(&a, 1), (&a, 2), (&b, 3), (&a, 4)] {
            outbox.push_event(&ch, key, &event(key, seq));
        }
        let mut batch = VecDeque::new();
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(seqs(batch), vec![(a.clone(), 1), (a.clone(), 2), (b.clone(), 3), (a, 4)]);
        assert_eq!(outbox.conflated(), 0);
    }

    #[tokio::test]
    async fn frames_come_before_events_and_events_go_in_runs_in_publish_order() {
        let outbox = Outbox::new(8, 10_000);
        let ch: Arc<str> = Arc::from("c");
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        // Enough events for more than one run (each event is under 40 bytes).
        let count = MAX_RUN_BYTES / 40 * 2 + 7;
        for seq in 1..=count as u64 {
            let key = if seq % 3 == 0 { &b } else { &a };
            outbox.push_event(&ch, key, &event(key, seq));
            if seq == 5 {
                assert!(outbox.push(Frame::Ping(1)));
            }
        }
        assert!(outbox.push(Frame::Ping(2)));
        let mut batch = VecDeque::new();
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(batch.pop_front(), Some(Outgoing::Frame(Frame::Ping(1))));
        assert_eq!(batch.pop_front(), Some(Outgoing::Frame(Frame::Ping(2))));
        let runs: Vec<usize> = batch
            .iter()
            .map(|run| match run {
                Outgoing::Events(events) => {
                    let bytes: usize = events.iter().map(|e| e.wire().len()).sum();
                    let last = events.last().map_or(0, |e| e.wire().len());
                    assert!(bytes - last < MAX_RUN_BYTES, "a run goes on only while under the bound");
                    events.len()
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert!(runs.len() >= 2, "{runs:?}");
        let seqs: Vec<u64> = seqs(batch).into_iter().map(|(_, seq)| seq).collect();
        assert_eq!(seqs, (1..=count as u64).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn past_the_budget_events_are_conflated_per_key_in_order() {
        let outbox = Outbox::new(8, 1);
        let ch: Arc<str> = Arc::from("c");
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        // a1 fills the budget; then one pending event per key, the newest.
        for (key, seq) in [(&a, 1), (&b, 2), (&a, 3), (&a, 4), (&b, 5)] {
            outbox.push_event(&ch, key, &event(key, seq));
        }
        let mut batch = VecDeque::new();
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(seqs(batch), vec![(a.clone(), 1), (b.clone(), 5), (a.clone(), 4)]);
        assert_eq!(outbox.conflated(), 2);
        // Taken: the next one is queued in order again.
        outbox.push_event(&ch, &b, &event(&b, 6));
        let mut batch = VecDeque::new();
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(seqs(batch), vec![(b, 6)]);
    }

    #[tokio::test]
    async fn an_unsubscribed_key_leaves_both_event_queues() {
        let outbox = Outbox::new(8, 2);
        let ch: Arc<str> = Arc::from("c");
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        for (key, seq) in [(&a, 1), (&b, 2), (&a, 3), (&b, 4)] {
            outbox.push_event(&ch, key, &event(key, seq));
        }
        outbox.forget_key(&ch, &a);
        let mut batch = VecDeque::new();
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(seqs(batch), vec![(b.clone(), 2), (b, 4)]);
    }

    #[tokio::test]
    async fn room_waits_for_the_writer_to_take_a_full_queue() {
        let outbox = Arc::new(Outbox::new(8, 2));
        let ch: Arc<str> = Arc::from("c");
        let a = Bytes::from_static(b"a");
        outbox.push_event(&ch, &a, &event(&a, 1));
        assert!(outbox.room().is_none(), "room for one more");
        outbox.push_event(&ch, &a, &event(&a, 2));
        let taken = outbox.room().expect("full: the sender waits");
        let mut taken = std::pin::pin!(taken);
        assert!(futures::poll!(taken.as_mut()).is_pending());
        let mut batch = VecDeque::new();
        outbox.next_batch(&mut batch).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), taken).await.expect("taking the queue makes room");
        assert!(outbox.room().is_none());
        // A closed outbox never holds a sender.
        outbox.push_event(&ch, &a, &event(&a, 3));
        outbox.push_event(&ch, &a, &event(&a, 4));
        let taken = outbox.room().expect("full again");
        outbox.close(SessionEnd::LeaderLeaving(crate::LeaderGoodbye::ShuttingDown));
        tokio::time::timeout(Duration::from_secs(1), taken).await.expect("closing releases the sender");
        assert!(outbox.room().is_none());
    }

    #[test]
    fn a_waiting_writer_polled_again_finds_frames_queued_quietly() {
        let outbox = Outbox::new(8, 4);
        let mut batch = VecDeque::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut next = Box::pin(outbox.next_batch(&mut batch));
        assert!(next.as_mut().poll(&mut cx).is_pending());
        // No wake-up: the session's task polls its writer after its burst.
        assert!(outbox.push_quiet(Frame::Ping(1)));
        assert!(matches!(next.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
        drop(next);
        assert_eq!(batch, [Outgoing::Frame(Frame::Ping(1))]);
    }

    #[tokio::test]
    async fn overflow_closes_with_a_reason() {
        let outbox = Outbox::new(2, 16);
        assert!(outbox.push(Frame::Ping(1)));
        assert!(outbox.push(Frame::Ping(2)));
        assert!(!outbox.push(Frame::Ping(3)));
        let reason = outbox.closed_reason().unwrap();
        assert!(matches!(reason, SessionEnd::OutboxOverflow { max_frames: 2 }), "{reason}");
        assert!(reason.to_string().contains("too slow"), "{reason}");
        let mut batch = VecDeque::new();
        outbox.next_batch(&mut batch).await.unwrap();
        assert_eq!(batch, vec![Outgoing::Frame(Frame::Ping(1)), Outgoing::Frame(Frame::Ping(2))]);
        batch.clear();
        assert!(matches!(outbox.next_batch(&mut batch).await, Err(SessionEnd::OutboxOverflow { .. })));
    }
}
