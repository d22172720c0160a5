//! The subscription hub of one channel: N subscribers of a key, one upstream subscription.
//!
//! ```text
//! follower A --Subscribe(k)--> hub: first subscriber of k --> upstream.subscribe(k) -> stream of k
//! follower B --Subscribe(k)--> hub: cached value of k, at once (if newer than B's last seen)
//! k's pump   --next value----> hub: seq += 1, cache v, queue Event(k, epoch, seq, v) to A and B
//! A, B leave (or disconnect)-> hub: last subscriber gone --> stream dropped (the unsubscribe), cache dropped
//! ```
//!
//! One task per key at a time drives the upstream towards "subscribed iff
//! anyone is subscribed", so a key's stream is always dropped before the key is
//! subscribed again. Each subscribed key has a pump task polling its stream; a
//! stream that ends means the upstream lost the subscription, and the key is
//! subscribed again with backoff while anyone wants it. Sequence numbers come
//! from one counter per channel, so any value the hub emits is newer than
//! every value emitted before it in this epoch, even across a key being
//! released and subscribed again.
//!
//! Before the upstream is built (or while it is being rebuilt), a channel made
//! with `channel_with_retry` accepts subscriptions at once as pending: they are
//! acknowledged, get the key's last-known-good value from the cache (marked
//! `cached`) if there is one, and are subscribed upstream when the upstream is
//! attached. A channel built once waits (unacknowledged) for its upstream, and
//! its subscribers get the build error if it fails.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use std::sync::atomic::{AtomicU64, Ordering};
use tandem_protocol::internal::Backoff;
use tandem_protocol::{
    Ack, Delivery, Ended, Event, Frame, Position, RemoteError, RequestId, SharedFrame, UpstreamState,
};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::Cache;
use crate::deliver::{Dispatch, Send};
use crate::erased::{BoxFuture, ByteEvents, DirectSink, ErasedUpstream};
use crate::outbox::Outbox;
use crate::session_id::SessionId;
use crate::upstream::Room;

mod deliver_one;
mod mirror;
mod upstream;

/// A key as people read it: the MessagePack string it encodes (fixstr, str8,
/// str16, str32), else its bytes in hex.
fn display_key(key: &[u8]) -> String {
    let (len, at) = match key.first() {
        Some(&b) if (0xa0..=0xbf).contains(&b) => (usize::from(b & 0x1f), 1),
        Some(0xd9) if key.len() >= 2 => (usize::from(key[1]), 2),
        Some(0xda) if key.len() >= 3 => (usize::from(u16::from_be_bytes([key[1], key[2]])), 3),
        Some(0xdb) if key.len() >= 5 => (u32::from_be_bytes([key[1], key[2], key[3], key[4]]) as usize, 5),
        _ => (usize::MAX, 0),
    };
    match key.get(at..).filter(|rest| rest.len() == len).map(std::str::from_utf8) {
        Some(Ok(s)) => s.to_owned(),
        _ => key.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

#[derive(Debug)]
struct Waiter {
    session: SessionId,
    request: RequestId,
    last_seen: Option<Position>,
    /// A deliver-to-one subscriber (its `request` is the subscription's id).
    one: bool,
}

/// A key's deliver-to-one side: who takes its events, and the sessions they
/// are on. Made by the key's first deliver-to-one subscriber, kept while the
/// key is subscribed (events that find no subscriber queue up meanwhile).
#[derive(Debug)]
struct OneTopic {
    dispatch: Dispatch,
    /// The sessions of the members, with how many members each has.
    outboxes: HashMap<SessionId, (Arc<Outbox>, usize)>,
    /// Wakes the key's deadline task: a new earliest deadline, or the end.
    timer: Arc<Notify>,
    /// Notified when the queue has room again (an upstream waiting in `ready`).
    room: Arc<Notify>,
    /// The hub's count of undelivered events dropped.
    dropped: Arc<AtomicU64>,
    /// The deadline the key's deadline task sleeps until.
    armed: Option<tokio::time::Instant>,
}

impl Drop for OneTopic {
    fn drop(&mut self) {
        let queued = self.dispatch.queued() + self.dispatch.held();
        if queued > 0 {
            self.dropped.fetch_add(queued as u64, Ordering::Relaxed);
            tracing::warn!(
                dropped = queued,
                "a deliver-to-one key lost its last subscriber: its undelivered events are dropped"
            );
        }
        self.timer.notify_one();
        self.room.notify_waiters();
    }
}

#[derive(Debug, Default)]
struct Topic {
    subscribers: HashMap<SessionId, Arc<Outbox>>,
    /// Deliver-to-one subscribers, if the key ever had one (boxed: most keys have none).
    one: Option<Box<OneTopic>>,
    /// Subscribers whose Ack waits for the upstream subscription.
    waiters: Vec<Waiter>,
    /// The cached value: its seq, and its Event frame encoded once.
    last: Option<(u64, SharedFrame)>,
    upstream_subscribed: bool,
    op_running: bool,
    /// The generation of the live stream; 0 when no stream may deliver.
    generation: u64,
    /// The task polling the live stream: stopped (and awaited) to unsubscribe.
    pump: Option<Pump>,
    /// The cache lookup whose answer this topic still wants (0: none).
    lookup: u64,
    /// The delays before retrying a failed upstream subscribe of acknowledged
    /// subscribers, while it fails (none once a stream delivers a value).
    retry: Option<Backoff>,
    /// Not before this instant is the key subscribed upstream again (its last stream ended).
    resubscribe_at: Option<tokio::time::Instant>,
    /// The upstream's resume point of the last live value (`Upstream::revision`).
    revision: Option<u64>,
    /// The key was seeded from a mirror: subscribers are acknowledged at once
    /// (its value is there; the upstream subscription runs or is retried).
    seeded: bool,
    /// Seeded and still within `Config::seed_hold`: followed with no subscriber.
    held: bool,
    /// The seeded value: the upstream's first value, if byte for byte this, is dropped.
    absorb: Option<Bytes>,
    /// The revision to resume from on the next upstream subscribe (seeded keys).
    resume: Option<u64>,
    /// A seeded key's position at the leader it was mirrored from, until the
    /// upstream gives a fresh value: a subscriber that saw that position or a
    /// later one already has this value or a newer one, and is not sent it.
    origin: Option<Position>,
}

impl Topic {
    /// Nobody wants the key: no subscriber of either kind, and no seed hold.
    fn idle(&self) -> bool {
        !self.held && self.subscribers.is_empty() && self.one.as_ref().is_none_or(|one| one.dispatch.is_empty())
    }

    /// The last value, if it is live (not from the last-known-good cache).
    fn live_value(&self) -> Option<&Event> {
        match self.last.as_ref().map(|(_, event)| event.frame()) {
            Some(Frame::Event(event)) if !event.cached => Some(event),
            _ => None,
        }
    }

    /// The outbox of a waiter's session, for its answer.
    fn outbox_of(&self, waiter: &Waiter) -> Option<&Arc<Outbox>> {
        if waiter.one {
            self.one.as_ref()?.outboxes.get(&waiter.session).map(|(outbox, _)| outbox)
        } else {
            self.subscribers.get(&waiter.session)
        }
    }
}

#[derive(Debug)]
struct Pump {
    /// Aborted to unsubscribe: the stream is dropped with the task's future.
    done: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct State {
    topics: HashMap<Bytes, Topic>,
    next_seq: u64,
    next_generation: u64,
}

/// Counts for introspection.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HubCounts {
    pub(crate) keys: usize,
    pub(crate) subscribers: usize,
}

/// What a hub needs from its leader besides its channel name.
#[derive(Debug, Clone)]
pub(crate) struct HubContext {
    pub(crate) epoch: u64,
    pub(crate) config: crate::Config,
    pub(crate) tracker: TaskTracker,
    pub(crate) cancel: CancellationToken,
    pub(crate) cache: Option<Cache>,
    /// Subscriptions are acknowledged before the upstream exists (it is rebuilt until it comes up).
    pub(crate) accept_pending: bool,
}

pub(crate) struct Hub {
    channel: Arc<str>,
    epoch: u64,
    /// The largest frame a follower accepts: events that would not fit are dropped.
    max_frame_length: usize,
    /// How long an upstream subscribe or unsubscribe may take.
    op_timeout: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    tracker: TaskTracker,
    cancel: CancellationToken,
    cache: Option<Cache>,
    accept_pending: bool,
    /// The channel's upstream state (cached values are served while it is not Ready).
    upstream_state: watch::Receiver<UpstreamState>,
    upstream: OnceLock<Arc<dyn ErasedUpstream>>,
    /// Why the upstream will never come (a one-shot build failed).
    failed: OnceLock<RemoteError>,
    state: Mutex<State>,
    /// Upstream events accepted (and fanned out) over the hub's life.
    pub(crate) events: std::sync::atomic::AtomicU64,
    /// Deliver-to-one events dropped undelivered (a full queue, a key released with events queued).
    pub(crate) undelivered_dropped: Arc<AtomicU64>,
    /// Deliver-to-one settings.
    deliver: DeliverLimits,
    /// The sessions mirroring this leader (version 3), locked inside `state`
    /// (never the other way round), so updates keep the order of the values.
    mirrors: Mutex<HashMap<SessionId, mirror::MirrorSink>>,
    /// How long seeded keys are held with no subscriber.
    seed_hold: Duration,
}

/// The leader's deliver-to-one settings, from its [`Config`](crate::Config).
#[derive(Debug, Clone, Copy)]
struct DeliverLimits {
    max_queue: usize,
    default_window: usize,
    max_window: usize,
    ack_timeout: Duration,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("channel", &self.channel).field("attached", &self.upstream.get().is_some()).finish()
    }
}

impl Hub {
    pub(crate) fn new(channel: Arc<str>, ctx: HubContext, upstream_state: watch::Receiver<UpstreamState>) -> Self {
        Hub {
            channel,
            epoch: ctx.epoch,
            max_frame_length: ctx.config.max_frame_length,
            op_timeout: ctx.config.upstream_timeout,
            retry_initial: ctx.config.upstream_retry_initial,
            retry_max: ctx.config.upstream_retry_max,
            tracker: ctx.tracker,
            cancel: ctx.cancel,
            cache: ctx.cache,
            accept_pending: ctx.accept_pending,
            upstream_state,
            upstream: OnceLock::new(),
            failed: OnceLock::new(),
            state: Mutex::new(State::default()),
            events: Default::default(),
            undelivered_dropped: Default::default(),
            deliver: DeliverLimits {
                max_queue: ctx.config.deliver_queue,
                default_window: ctx.config.deliver_window,
                max_window: ctx.config.deliver_max_window,
                ack_timeout: ctx.config.deliver_ack_timeout,
            },
            mirrors: Mutex::default(),
            seed_hold: ctx.config.seed_hold,
        }
    }

    /// The upstream is built: pending subscriptions are subscribed upstream now.
    pub(crate) fn attach(self: &Arc<Self>, upstream: Arc<dyn ErasedUpstream>) {
        if self.upstream.set(upstream).is_err() {
            return;
        }
        let keys: Vec<Bytes> = {
            let mut state = self.lock();
            state
                .topics
                .iter_mut()
                .filter(|(_, topic)| !topic.idle() && !topic.op_running)
                .map(|(key, topic)| {
                    topic.op_running = true;
                    key.clone()
                })
                .collect()
        };
        if !keys.is_empty() {
            tracing::info!(channel = %self.channel, keys = keys.len(), "subscribing pending keys upstream");
        }
        for key in keys {
            self.tracker.spawn(self.clone().drive(key));
        }
    }

    /// The upstream will never be built: whoever waits for it gets `error`.
    pub(crate) fn fail(&self, error: RemoteError) {
        let _ = self.failed.set(error.clone());
        let mut state = self.lock();
        state.topics.retain(|key, topic| {
            for waiter in std::mem::take(&mut topic.waiters) {
                if let Some(outbox) = self.drop_waiter(topic, &waiter) {
                    Self::ack(&outbox, waiter.request, Err(error.clone()));
                }
            }
            if topic.idle() {
                self.forget_value(topic, key);
            }
            !topic.idle()
        });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent before it can panic.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn counts(&self) -> HubCounts {
        let state = self.lock();
        let members = |t: &Topic| t.one.as_ref().map_or(0, |one| one.dispatch.members());
        HubCounts {
            keys: state.topics.len(),
            subscribers: state.topics.values().map(|t| t.subscribers.len() + members(t)).sum(),
        }
    }

    /// The subscribed keys and their subscriber counts, sorted.
    pub(crate) fn keys(&self) -> Vec<crate::KeyStats> {
        let state = self.lock();
        let mut keys: Vec<crate::KeyStats> = state
            .topics
            .iter()
            .filter(|(_, t)| !t.idle())
            .map(|(key, t)| crate::KeyStats {
                key: display_key(key),
                subscribers: t.subscribers.len() + t.one.as_ref().map_or(0, |one| one.dispatch.members()),
            })
            .collect();
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        keys
    }

    fn ack(outbox: &Outbox, request: RequestId, result: Result<(), RemoteError>) {
        outbox.push(Frame::Ack(Ack { id: request, result }));
    }

    fn send_cached(&self, topic: &Topic, outbox: &Outbox, key: &Bytes, last_seen: Option<Position>) {
        if topic.origin.is_some_and(|origin| last_seen.is_some_and(|seen| seen >= origin)) {
            // A seeded value the subscriber had, or older than what it has:
            // the mirror can lag what the old leader sent (PROTOCOL.md §7.2).
            return;
        }
        if let Some((seq, event)) = &topic.last {
            let position = Position { epoch: self.epoch, seq: *seq };
            if last_seen.is_none_or(|seen| position > seen) {
                outbox.push_event(&self.channel, key, event);
            }
        }
    }

    /// Adds a subscriber. Acks at once (with the cached value, if newer than
    /// `last_seen`) when the upstream subscription exists, or as pending while
    /// a rebuilt upstream is not there yet; otherwise the ack follows the
    /// upstream's answer.
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        session: SessionId,
        outbox: &Arc<Outbox>,
        request: RequestId,
        key: Bytes,
        last_seen: Option<Position>,
    ) {
        if let Some(error) = self.failed.get() {
            Self::ack(outbox, request, Err(error.clone()));
            return;
        }
        let mut state = self.lock();
        let state = &mut *state;
        let created = !state.topics.contains_key(&key);
        let topic = state.topics.entry(key.clone()).or_default();
        topic.subscribers.insert(session, outbox.clone());
        if created && self.cache.is_some() && !matches!(*self.upstream_state.borrow(), UpstreamState::Ready) {
            state.next_generation += 1;
            topic.lookup = state.next_generation;
            self.tracker.spawn(self.clone().lookup(key.clone(), topic.lookup));
        }
        let attached = self.upstream.get().is_some();
        if (topic.upstream_subscribed && !topic.op_running) || (!attached && self.accept_pending) || topic.seeded {
            Self::ack(outbox, request, Ok(()));
            self.send_cached(topic, outbox, &key, last_seen);
            return;
        }
        topic.waiters.push(Waiter { session, request, last_seen, one: false });
        if attached && !topic.op_running {
            topic.op_running = true;
            self.tracker.spawn(self.clone().drive(key));
        }
    }

    /// Removes a subscriber; the last one out releases the upstream subscription.
    pub(crate) fn unsubscribe(self: &Arc<Self>, session: SessionId, key: &Bytes) {
        let mut state = self.lock();
        let Some(topic) = state.topics.get_mut(key) else { return };
        if let Some(outbox) = topic.subscribers.remove(&session) {
            outbox.forget_key(&self.channel, key);
        }
        topic.waiters.retain(|w| w.session != session || w.one);
        self.release_if_idle(state, key);
    }

    /// Starts releasing a key nobody wants any more.
    fn release_if_idle(self: &Arc<Self>, mut state: MutexGuard<'_, State>, key: &Bytes) {
        let Some(topic) = state.topics.get_mut(key) else { return };
        if topic.idle() && !topic.op_running {
            if self.upstream.get().is_some() {
                topic.op_running = true;
                drop(state);
                self.tracker.spawn(self.clone().drive(key.clone()));
            } else if let Some(mut topic) = state.topics.remove(key) {
                self.forget_value(&mut topic, key);
            }
        }
    }

    /// A stream delivered a value: its key's retry delay starts over.
    fn delivered(&self, key: &Bytes, generation: u64) {
        let mut state = self.lock();
        if let Some(topic) = state.topics.get_mut(key).filter(|t| t.generation == generation) {
            topic.retry = None;
        }
    }

    fn deliver(&self, key: &Bytes, generation: u64, payload: Bytes, revision: Option<u64>) -> bool {
        if !crate::fits_in_frame(self.max_frame_length, &[self.channel.as_bytes(), key, &payload]) {
            tracing::error!(
                channel = %self.channel,
                bytes = payload.len(),
                max = self.max_frame_length,
                "upstream event too large for a frame; dropped"
            );
            return false;
        }
        let mut state = self.lock();
        let state = &mut *state;
        let Some(topic) = state.topics.get_mut(key) else { return false };
        if topic.generation != generation || generation == 0 {
            return false;
        }
        if topic.absorb.take().is_some_and(|seeded| seeded == payload) {
            // The seeded value, re-announced by the upstream: already served at this epoch.
            topic.revision = revision.or(topic.revision);
            return true;
        }
        state.next_seq += 1;
        let seq = state.next_seq;
        self.events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Encoded once here, copied as bytes into each subscriber's socket.
        let event = Event {
            channel: self.channel.clone().into(),
            key: key.clone(),
            epoch: self.epoch,
            seq,
            payload,
            cached: false,
        };
        let event = match SharedFrame::encode(Frame::Event(event), self.max_frame_length) {
            Ok(event) => event,
            Err(error) => {
                tracing::error!(channel = %self.channel, %error, "upstream event not encodable; dropped");
                return false;
            }
        };
        for outbox in topic.subscribers.values() {
            outbox.push_event(&self.channel, key, &event);
        }
        if let (Some(one), Frame::Event(value)) = (topic.one.as_deref_mut(), event.frame()) {
            self.offer_one(one, key, seq, value.payload.clone());
        }
        // Under the hub's lock, so saves keep the order of the values (it only queues).
        if let (Some(cache), Frame::Event(value)) = (&self.cache, event.frame()) {
            cache.save(&self.channel, key, value.payload.clone());
        }
        topic.revision = revision;
        if let Frame::Event(value) = event.frame() {
            self.mirror_value(key, seq, &value.payload, revision);
        }
        topic.last = Some((seq, event));
        topic.origin = None;
        topic.lookup = 0;
        true
    }

    /// `None` when every subscriber of `key` has room for an event, else a
    /// future that resolves when the first one without has been taken.
    fn room(&self, key: &Bytes) -> Option<BoxFuture<()>> {
        let state = self.lock();
        let topic = state.topics.get(key)?;
        if let Some(one) = topic.one.as_ref().filter(|one| one.dispatch.full()) {
            // Registered before the look under the same lock: a drain after it is not missed.
            let mut drained = Box::pin(one.room.clone().notified_owned());
            drained.as_mut().enable();
            return Some(drained);
        }
        topic.subscribers.values().find_map(|outbox| outbox.room()).map(|taken| Box::pin(taken) as BoxFuture<()>)
    }

    fn is_live(&self, key: &Bytes, generation: u64) -> bool {
        let state = self.lock();
        state.topics.get(key).is_some_and(|t| t.generation == generation && generation != 0)
    }
}

#[cfg(test)]
mod tests;
