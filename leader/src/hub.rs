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
}

impl Topic {
    /// Nobody wants the key: no subscriber of either kind.
    fn idle(&self) -> bool {
        self.subscribers.is_empty() && self.one.as_ref().is_none_or(|one| one.dispatch.is_empty())
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
        state.topics.retain(|_, topic| {
            for waiter in std::mem::take(&mut topic.waiters) {
                if let Some(outbox) = self.drop_waiter(topic, &waiter) {
                    Self::ack(&outbox, waiter.request, Err(error.clone()));
                }
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
        if (topic.upstream_subscribed && !topic.op_running) || (!attached && self.accept_pending) {
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
            } else {
                state.topics.remove(key);
            }
        }
    }

    /// Reads a key's last-known-good value off the hub's path and serves it,
    /// unless a live value (or a new lookup) came first.
    async fn lookup(self: Arc<Self>, key: Bytes, token: u64) {
        let Some(cache) = self.cache.clone() else { return };
        let (channel, file_key) = (self.channel.clone(), key.clone());
        let Ok(Some(payload)) = tokio::task::spawn_blocking(move || cache.load(&channel, &file_key)).await else {
            return;
        };
        if !crate::fits_in_frame(self.max_frame_length, &[self.channel.as_bytes(), &key, &payload]) {
            tracing::warn!(channel = %self.channel, bytes = payload.len(), "cached value too large for a frame; ignored");
            return;
        }
        let mut state = self.lock();
        let state = &mut *state;
        let Some(topic) = state.topics.get_mut(&key) else { return };
        if topic.lookup != token || topic.last.is_some() {
            return;
        }
        topic.lookup = 0;
        state.next_seq += 1;
        let seq = state.next_seq;
        let event = Event {
            channel: self.channel.clone().into(),
            key: key.clone(),
            epoch: self.epoch,
            seq,
            payload,
            cached: true,
        };
        let Ok(event) = SharedFrame::encode(Frame::Event(event), self.max_frame_length) else { return };
        tracing::debug!(channel = %self.channel, seq, "serving a last-known-good value");
        for outbox in topic.subscribers.values() {
            outbox.push_event(&self.channel, &key, &event);
        }
        topic.last = Some((seq, event));
    }

    /// Retries the upstream subscribe of a key whose acknowledged subscribers wait, after `delay`.
    /// (Boxed: it and `drive` spawn each other.)
    fn retry_later(self: Arc<Self>, key: Bytes, delay: Duration) -> BoxFuture<()> {
        Box::pin(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.cancel.cancelled() => return,
            }
            {
                let mut state = self.lock();
                let Some(topic) = state.topics.get_mut(&key) else { return };
                if topic.op_running || topic.upstream_subscribed || topic.idle() {
                    return;
                }
                topic.op_running = true;
            }
            self.drive(key).await
        })
    }

    /// Drives one key's upstream subscription until it matches its subscribers.
    async fn drive(self: Arc<Self>, key: Bytes) {
        let Some(upstream) = self.upstream.get().cloned() else {
            let mut state = self.lock();
            if let Some(topic) = state.topics.get_mut(&key) {
                topic.op_running = false;
            }
            return;
        };
        enum Step {
            Subscribe(u64, Option<tokio::time::Instant>),
            Unsubscribe,
        }
        loop {
            let step = {
                let mut state = self.lock();
                let state = &mut *state;
                let Some(topic) = state.topics.get_mut(&key) else { return };
                if !topic.idle() && !topic.upstream_subscribed {
                    state.next_generation += 1;
                    topic.generation = state.next_generation;
                    Step::Subscribe(topic.generation, topic.resubscribe_at.take())
                } else if topic.idle() && topic.upstream_subscribed {
                    topic.generation = 0;
                    topic.last = None;
                    Step::Unsubscribe
                } else {
                    // Stable: answer whoever waited, then stop (or forget the key).
                    for waiter in std::mem::take(&mut topic.waiters) {
                        if let Some(outbox) = topic.outbox_of(&waiter) {
                            Self::ack(outbox, waiter.request, Ok(()));
                            if !waiter.one {
                                self.send_cached(topic, outbox, &key, waiter.last_seen);
                            }
                        }
                    }
                    topic.op_running = false;
                    if topic.idle() {
                        state.topics.remove(&key);
                    }
                    return;
                }
            };
            match step {
                Step::Subscribe(generation, not_before) => {
                    if let Some(at) = not_before {
                        tokio::select! {
                            () = tokio::time::sleep_until(at) => {}
                            _ = self.cancel.cancelled() => return,
                        }
                    }
                    let direct = {
                        let (hub, topic) = (Arc::downgrade(&self), key.clone());
                        let deliver = Box::new(move |payload| {
                            hub.upgrade().is_some_and(|hub| {
                                hub.deliver(&topic, generation, payload) || hub.is_live(&topic, generation)
                            })
                        });
                        let (hub, topic) = (Arc::downgrade(&self), key.clone());
                        let room: Room = Arc::new(move || hub.upgrade().and_then(|hub| hub.room(&topic)));
                        DirectSink { deliver, room }
                    };
                    let result = tokio::time::timeout(self.op_timeout, upstream.subscribe(key.clone(), direct))
                        .await
                        .unwrap_or_else(|_| {
                            Err(RemoteError::unavailable(format!(
                                "upstream subscribe took longer than {} ms",
                                self.op_timeout.as_millis()
                            )))
                        });
                    let mut state = self.lock();
                    let Some(topic) = state.topics.get_mut(&key) else { return };
                    match result {
                        Ok(events) => {
                            topic.upstream_subscribed = true;
                            // Spawned without the hub's lock: a runtime shutting down drops
                            // the future in `spawn`, and dropping a stream may take its lock.
                            drop(state);
                            let done = self.tracker.spawn(self.clone().pump(key.clone(), generation, events));
                            let mut state = self.lock();
                            match state.topics.get_mut(&key) {
                                Some(topic) if topic.generation == generation => topic.pump = Some(Pump { done }),
                                // Ended already (it said so) or superseded.
                                _ => done.abort(),
                            }
                        }
                        Err(error) => {
                            // Those waiting for this answer get the error.
                            for waiter in std::mem::take(&mut topic.waiters) {
                                if let Some(outbox) = self.drop_waiter(topic, &waiter) {
                                    Self::ack(&outbox, waiter.request, Err(error.clone()));
                                }
                            }
                            topic.generation = 0;
                            if topic.idle() {
                                tracing::warn!(channel = %self.channel, key = %display_key(&key), %error, "upstream subscribe failed");
                                topic.last = None;
                            } else if !error.is_retryable() {
                                // Acknowledged as pending, now refused for good: every
                                // subscriber is told, at once, and the key is forgotten.
                                tracing::warn!(channel = %self.channel, key = %display_key(&key), %error,
                                    subscribers = topic.subscribers.len(),
                                    "the upstream refused a pending subscription; ending it for its subscribers");
                                for outbox in topic.subscribers.values() {
                                    outbox.forget_key(&self.channel, &key);
                                }
                                let ones = topic.one.iter().flat_map(|one| one.outboxes.values().map(|(o, _)| o));
                                for outbox in topic.subscribers.values().chain(ones) {
                                    let channel = self.channel.clone().into();
                                    outbox.push(Frame::Ended(Ended {
                                        channel,
                                        key: key.clone(),
                                        error: error.clone(),
                                    }));
                                }
                                state.topics.remove(&key);
                                return;
                            } else {
                                // Subscribers acknowledged as pending stay: an
                                // acknowledged subscription is never left dead.
                                topic.op_running = false;
                                let delay = self.backoff(topic, &key, &error, "upstream subscribe failed");
                                drop(state);
                                self.tracker.spawn(self.clone().retry_later(key, delay));
                                return;
                            }
                        }
                    }
                }
                Step::Unsubscribe => {
                    let pump = {
                        let mut state = self.lock();
                        state.topics.get_mut(&key).and_then(|topic| topic.pump.take())
                    };
                    if let Some(pump) = pump {
                        // The pump drops the stream (the upstream's unsubscribe) and ends.
                        pump.done.abort();
                        match pump.done.await {
                            Err(error) if error.is_panic() => {
                                tracing::warn!(channel = %self.channel, %error, "a subscription's pump task failed")
                            }
                            // Ended or aborted: either way its stream is dropped now.
                            _ => {}
                        }
                    }
                    let mut state = self.lock();
                    let Some(topic) = state.topics.get_mut(&key) else { return };
                    topic.upstream_subscribed = false;
                }
            }
        }
    }

    /// The next pause before subscribing `key` again for its acknowledged
    /// subscribers (doubling); WARN the first time, with why.
    fn backoff(&self, topic: &mut Topic, key: &Bytes, error: &RemoteError, what: &str) -> Duration {
        let first = topic.retry.is_none();
        let delay = topic.retry.get_or_insert_with(|| Backoff::new(self.retry_initial, self.retry_max)).next_delay();
        if first {
            tracing::warn!(channel = %self.channel, key = %display_key(key), %error, retry_ms = delay.as_millis() as u64, "{what}; retrying for the pending subscribers");
        } else {
            tracing::debug!(channel = %self.channel, key = %display_key(key), %error, retry_ms = delay.as_millis() as u64, "{what} again");
        }
        delay
    }

    /// Polls one key's stream into the hub until it is stopped (the stream is
    /// dropped here: the unsubscribe) or ends (the upstream lost it).
    async fn pump(self: Arc<Self>, key: Bytes, generation: u64, mut events: ByteEvents) {
        // An adapter's stream that panics is treated as one that ended (and logged).
        let mut delivered = false;
        let why = 'pump: loop {
            let next = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                next = AssertUnwindSafe(events.next()).catch_unwind() => next,
            };
            let mut next = Some(next);
            // What else is ready goes out in the same wakeup.
            while let Some(polled) = next.take() {
                match polled {
                    Ok(Some(payload)) => {
                        if self.deliver(&key, generation, payload) {
                            if !delivered {
                                delivered = true;
                                self.delivered(&key, generation);
                            }
                        } else if !self.is_live(&key, generation) {
                            return;
                        }
                    }
                    Ok(None) => break 'pump "the upstream ended the key's stream",
                    Err(panic) => {
                        let why = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!(channel = %self.channel, key = %display_key(&key), panic = %why, "the upstream's stream for a key panicked; subscribing the key again");
                        break 'pump "the upstream's stream panicked";
                    }
                }
                next = AssertUnwindSafe(events.next()).catch_unwind().now_or_never();
            }
        };
        drop(events);
        let mut state = self.lock();
        let Some(topic) = state.topics.get_mut(&key) else { return };
        if topic.generation != generation || generation == 0 {
            return;
        }
        topic.generation = 0;
        topic.upstream_subscribed = false;
        topic.pump = None;
        if topic.idle() {
            return;
        }
        let error = RemoteError::unavailable(why);
        let delay = self.backoff(topic, &key, &error, "the upstream ended a subscription");
        topic.resubscribe_at = Some(tokio::time::Instant::now() + delay);
        // With a drive running, it sees the key unsubscribed and subscribes it again, not before then.
        if !topic.op_running {
            drop(state);
            self.tracker.spawn(self.clone().retry_later(key, delay));
        }
    }

    /// A stream delivered a value: its key's retry delay starts over.
    fn delivered(&self, key: &Bytes, generation: u64) {
        let mut state = self.lock();
        if let Some(topic) = state.topics.get_mut(key).filter(|t| t.generation == generation) {
            topic.retry = None;
        }
    }

    fn deliver(&self, key: &Bytes, generation: u64, payload: Bytes) -> bool {
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
        topic.last = Some((seq, event));
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

    /// Adds a deliver-to-one subscriber (`sub`: its `SubscribeOne` id) of a
    /// key: acknowledged like [`Hub::subscribe`], never sent a cached value;
    /// events queued for the key go to it at once.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn subscribe_one(
        self: &Arc<Self>,
        session: SessionId,
        outbox: &Arc<Outbox>,
        sub: RequestId,
        key: Bytes,
        window: u32,
        ack_timeout_ms: u32,
    ) {
        if let Some(error) = self.failed.get() {
            Self::ack(outbox, sub, Err(error.clone()));
            return;
        }
        let limits = self.deliver;
        let window = match window {
            0 => limits.default_window,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        }
        .clamp(1, limits.max_window.max(1));
        let ack_timeout = match ack_timeout_ms {
            0 => limits.ack_timeout,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let now = tokio::time::Instant::now();
        let mut state = self.lock();
        let topic = state.topics.entry(key.clone()).or_default();
        let one = topic.one.get_or_insert_with(|| {
            let timer = Arc::new(Notify::new());
            self.tracker.spawn(self.clone().expiry(key.clone(), timer.clone()));
            Box::new(OneTopic {
                dispatch: Dispatch::new(limits.max_queue),
                outboxes: HashMap::new(),
                timer,
                room: Arc::new(Notify::new()),
                dropped: self.undelivered_dropped.clone(),
                armed: None,
            })
        });
        one.outboxes.entry(session).or_insert_with(|| (outbox.clone(), 0)).1 += 1;
        let sends = one.dispatch.join((session, sub), window, ack_timeout, now);
        let attached = self.upstream.get().is_some();
        if (topic.upstream_subscribed && !topic.op_running) || (!attached && self.accept_pending) {
            Self::ack(outbox, sub, Ok(()));
        } else {
            topic.waiters.push(Waiter { session, request: sub, last_seen: None, one: true });
            if attached && !topic.op_running {
                topic.op_running = true;
                self.tracker.spawn(self.clone().drive(key));
            }
        }
        if let Some(one) = topic.one.as_deref_mut() {
            self.send_all(one, sends);
        }
    }

    /// Removes a deliver-to-one subscriber: what it held goes to the others,
    /// marked redelivered (or waits in the key's queue).
    pub(crate) fn unsubscribe_one(self: &Arc<Self>, session: SessionId, sub: RequestId, key: &Bytes) {
        let mut state = self.lock();
        let Some(topic) = state.topics.get_mut(key) else { return };
        topic.waiters.retain(|w| !(w.one && w.session == session && w.request == sub));
        if let Some(one) = topic.one.as_deref_mut() {
            let sends = one.dispatch.leave((session, sub), tokio::time::Instant::now());
            Self::forget_member(one, session);
            self.send_all(one, sends);
        }
        self.release_if_idle(state, key);
    }

    /// A deliver-to-one subscriber acked or released deliveries.
    pub(crate) fn settle(&self, session: SessionId, sub: RequestId, key: &Bytes, acked: &[u64], released: &[u64]) {
        let mut state = self.lock();
        let Some(one) = state.topics.get_mut(key).and_then(|topic| topic.one.as_deref_mut()) else { return };
        let sends = one.dispatch.settle((session, sub), acked, released, tokio::time::Instant::now());
        self.send_all(one, sends);
        if !one.dispatch.full() {
            one.room.notify_waiters();
        }
    }

    /// One member of `session` left: the session's outbox is kept while it has others.
    fn forget_member(one: &mut OneTopic, session: SessionId) {
        if let Some((_, members)) = one.outboxes.get_mut(&session) {
            *members -= 1;
            if *members == 0 {
                one.outboxes.remove(&session);
            }
        }
    }

    /// A waiter whose subscription failed leaves; its session's outbox, for the answer.
    fn drop_waiter(&self, topic: &mut Topic, waiter: &Waiter) -> Option<Arc<Outbox>> {
        if !waiter.one {
            return topic.subscribers.remove(&waiter.session);
        }
        let one = topic.one.as_deref_mut()?;
        let outbox = one.outboxes.get(&waiter.session).map(|(outbox, _)| outbox.clone());
        let sends = one.dispatch.leave((waiter.session, waiter.request), tokio::time::Instant::now());
        Self::forget_member(one, waiter.session);
        self.send_all(one, sends);
        outbox
    }

    /// A new event of a key with a deliver-to-one side: to one subscriber, or
    /// queued, or (the queue full) dropped, logged and counted.
    fn offer_one(&self, one: &mut OneTopic, key: &Bytes, seq: u64, payload: Bytes) {
        match one.dispatch.offer(seq, payload, tokio::time::Instant::now()) {
            Ok(sends) => self.send_all(one, sends),
            Err(full) => {
                let dropped = self.undelivered_dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Logged once per power of two, so a flood does not flood the log.
                if dropped.is_power_of_two() {
                    tracing::warn!(channel = %self.channel, key = %display_key(key), error = %full, dropped_total = dropped,
                        "deliver-to-one event dropped: its queue is full");
                }
            }
        }
    }

    /// Sends deliveries to their members' sessions, and wakes the key's
    /// deadline task if the earliest deadline moved earlier.
    fn send_all(&self, one: &mut OneTopic, sends: Vec<Send>) {
        if sends.is_empty() {
            return;
        }
        for Send { member: (session, sub), tag, item } in sends {
            if let Some((outbox, _)) = one.outboxes.get(&session) {
                // A closed outbox: its session is ending, and its leave puts the event back.
                outbox.push(Frame::Delivery(Delivery {
                    sub,
                    tag,
                    epoch: self.epoch,
                    seq: item.seq,
                    payload: item.payload,
                    redelivered: item.redelivered,
                }));
            }
        }
        let next = one.dispatch.next_deadline();
        if next.is_some() && one.armed.is_none_or(|armed| next < Some(armed)) {
            one.armed = next;
            one.timer.notify_one();
        }
    }

    /// Redelivers a key's deliveries whose ack deadline passed, until the key's
    /// deliver-to-one side is gone.
    async fn expiry(self: Arc<Self>, key: Bytes, timer: Arc<Notify>) {
        let far = Duration::from_secs(86_400 * 365);
        loop {
            let at = {
                let mut state = self.lock();
                let Some(one) = state.topics.get_mut(&key).and_then(|t| t.one.as_deref_mut()) else { return };
                if !Arc::ptr_eq(&one.timer, &timer) {
                    return;
                }
                one.armed = one.dispatch.next_deadline();
                one.armed.unwrap_or_else(|| tokio::time::Instant::now() + far)
            };
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = timer.notified() => {}
                () = self.cancel.cancelled() => return,
            }
            let mut state = self.lock();
            let Some(one) = state.topics.get_mut(&key).and_then(|t| t.one.as_deref_mut()) else { return };
            if !Arc::ptr_eq(&one.timer, &timer) {
                return;
            }
            let now = tokio::time::Instant::now();
            if one.dispatch.next_deadline().is_some_and(|due| due <= now) {
                let sends = one.dispatch.expire(now);
                tracing::debug!(channel = %self.channel, key = %display_key(&key), redelivered = sends.len(), "deliver-to-one ack deadline passed");
                self.send_all(one, sends);
                if !one.dispatch.full() {
                    one.room.notify_waiters();
                }
            }
        }
    }

    fn is_live(&self, key: &Bytes, generation: u64) -> bool {
        let state = self.lock();
        state.topics.get(key).is_some_and(|t| t.generation == generation && generation != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_display_as_strings_or_hex() {
        assert_eq!(display_key(b"\xa5hello"), "hello");
        assert_eq!(display_key(&[0xd9, 2, b'h', b'i']), "hi");
        assert_eq!(display_key(&[0x01, 0xff]), "01ff");
        // A string header that does not match the length is not a string.
        assert_eq!(display_key(&[0xa5, b'h']), "a568");
    }
}
