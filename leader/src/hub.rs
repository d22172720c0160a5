//! The subscription hub of one channel: N subscribers of a key, one upstream subscription.
//!
//! ```text
//! follower A --Subscribe(k)--> hub: first subscriber of k --> upstream.subscribe(k, sink)
//! follower B --Subscribe(k)--> hub: cached value of k, at once (if newer than B's last seen)
//! upstream   --sink.send(v)--> hub: seq += 1, cache v, queue Event(k, epoch, seq, v) to A and B
//! A, B leave (or disconnect)-> hub: last subscriber gone --> upstream.unsubscribe(k), cache dropped
//! ```
//!
//! Upstream subscribe and unsubscribe of one key never overlap: one task per key
//! at a time drives the upstream towards "subscribed iff anyone is subscribed".
//! Sequence numbers come from one counter per channel, so any value the hub
//! emits is newer than every value emitted before it in this epoch, even across
//! a key being released and subscribed again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use tandem_protocol::{Ack, Event, Frame, Position, RemoteError, RequestId, SharedFrame};
use tokio_util::task::TaskTracker;

use crate::channel::ErasedUpstream;
use crate::outbox::Outbox;

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

/// Identifies one follower session within the leader.
pub(crate) type SessionId = u64;

#[derive(Debug)]
struct Waiter {
    session: SessionId,
    request: RequestId,
    last_seen: Option<Position>,
}

#[derive(Debug, Default)]
struct Topic {
    subscribers: HashMap<SessionId, Arc<Outbox>>,
    /// Subscribers whose Ack waits for the upstream subscription.
    waiters: Vec<Waiter>,
    /// The cached value: its seq, and its Event frame encoded once.
    last: Option<(u64, SharedFrame)>,
    upstream_subscribed: bool,
    op_running: bool,
    /// The generation of the live sink; 0 when no sink may deliver.
    generation: u64,
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

#[derive(Debug)]
pub(crate) struct Hub {
    channel: Arc<str>,
    epoch: u64,
    /// The largest frame a follower accepts: events that would not fit are dropped.
    max_frame_length: usize,
    /// How long an upstream subscribe or unsubscribe may take.
    op_timeout: Duration,
    state: Mutex<State>,
    /// Upstream events accepted (and fanned out) over the hub's life.
    pub(crate) events: std::sync::atomic::AtomicU64,
}

impl Hub {
    pub(crate) fn new(channel: Arc<str>, epoch: u64, max_frame_length: usize, op_timeout: Duration) -> Self {
        Hub {
            channel,
            epoch,
            max_frame_length,
            op_timeout,
            state: Mutex::new(State::default()),
            events: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent before it can panic.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn counts(&self) -> HubCounts {
        let state = self.lock();
        HubCounts { keys: state.topics.len(), subscribers: state.topics.values().map(|t| t.subscribers.len()).sum() }
    }

    /// The subscribed keys and their subscriber counts, sorted.
    pub(crate) fn keys(&self) -> Vec<crate::KeyStats> {
        let state = self.lock();
        let mut keys: Vec<crate::KeyStats> = state
            .topics
            .iter()
            .filter(|(_, t)| !t.subscribers.is_empty())
            .map(|(key, t)| crate::KeyStats { key: display_key(key), subscribers: t.subscribers.len() })
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
    /// `last_seen`) when the upstream subscription exists; otherwise the ack
    /// follows the upstream's answer.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        upstream: &Arc<dyn ErasedUpstream>,
        tracker: &TaskTracker,
        session: SessionId,
        outbox: &Arc<Outbox>,
        request: RequestId,
        key: Bytes,
        last_seen: Option<Position>,
    ) {
        let mut state = self.lock();
        let topic = state.topics.entry(key.clone()).or_default();
        topic.subscribers.insert(session, outbox.clone());
        if topic.upstream_subscribed && !topic.op_running {
            Self::ack(outbox, request, Ok(()));
            self.send_cached(topic, outbox, &key, last_seen);
            return;
        }
        topic.waiters.push(Waiter { session, request, last_seen });
        if !topic.op_running {
            topic.op_running = true;
            drop(state);
            tracker.spawn(self.clone().drive(upstream.clone(), key));
        }
    }

    /// Removes a subscriber; the last one out releases the upstream subscription.
    pub(crate) fn unsubscribe(
        self: &Arc<Self>,
        upstream: &Arc<dyn ErasedUpstream>,
        tracker: &TaskTracker,
        session: SessionId,
        key: &Bytes,
    ) {
        let mut state = self.lock();
        let Some(topic) = state.topics.get_mut(key) else { return };
        if let Some(outbox) = topic.subscribers.remove(&session) {
            outbox.forget_key(&self.channel, key);
        }
        topic.waiters.retain(|w| w.session != session);
        if topic.subscribers.is_empty() && !topic.op_running {
            topic.op_running = true;
            drop(state);
            tracker.spawn(self.clone().drive(upstream.clone(), key.clone()));
        }
    }

    /// Drives one key's upstream subscription until it matches its subscribers.
    async fn drive(self: Arc<Self>, upstream: Arc<dyn ErasedUpstream>, key: Bytes) {
        enum Step {
            Subscribe(u64),
            Unsubscribe,
        }
        loop {
            let step = {
                let mut state = self.lock();
                let state = &mut *state;
                let Some(topic) = state.topics.get_mut(&key) else { return };
                if !topic.subscribers.is_empty() && !topic.upstream_subscribed {
                    state.next_generation += 1;
                    topic.generation = state.next_generation;
                    Step::Subscribe(topic.generation)
                } else if topic.subscribers.is_empty() && topic.upstream_subscribed {
                    topic.generation = 0;
                    topic.last = None;
                    Step::Unsubscribe
                } else {
                    // Stable: answer whoever waited, then stop (or forget the key).
                    for waiter in std::mem::take(&mut topic.waiters) {
                        if let Some(outbox) = topic.subscribers.get(&waiter.session) {
                            Self::ack(outbox, waiter.request, Ok(()));
                            self.send_cached(topic, outbox, &key, waiter.last_seen);
                        }
                    }
                    topic.op_running = false;
                    if topic.subscribers.is_empty() {
                        state.topics.remove(&key);
                    }
                    return;
                }
            };
            match step {
                Step::Subscribe(generation) => {
                    let sink = TopicSink { hub: Arc::downgrade(&self), key: key.clone(), generation };
                    let result = tokio::time::timeout(self.op_timeout, upstream.subscribe(key.clone(), sink))
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
                        Ok(()) => topic.upstream_subscribed = true,
                        Err(error) => {
                            tracing::warn!(channel = %self.channel, %error, "upstream subscribe failed");
                            // Everyone subscribed so far was waiting for this answer.
                            for waiter in std::mem::take(&mut topic.waiters) {
                                if let Some(outbox) = topic.subscribers.remove(&waiter.session) {
                                    Self::ack(&outbox, waiter.request, Err(error.clone()));
                                }
                            }
                            topic.subscribers.clear();
                            topic.generation = 0;
                            topic.last = None;
                        }
                    }
                }
                Step::Unsubscribe => {
                    match tokio::time::timeout(self.op_timeout, upstream.unsubscribe(key.clone())).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            tracing::warn!(channel = %self.channel, %error, "upstream unsubscribe failed")
                        }
                        Err(_) => tracing::warn!(channel = %self.channel, "upstream unsubscribe timed out"),
                    }
                    let mut state = self.lock();
                    let Some(topic) = state.topics.get_mut(&key) else { return };
                    topic.upstream_subscribed = false;
                }
            }
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
        let event = Event { channel: self.channel.to_string(), key: key.clone(), epoch: self.epoch, seq, payload };
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
        topic.last = Some((seq, event));
        true
    }

    fn is_live(&self, key: &Bytes, generation: u64) -> bool {
        let state = self.lock();
        state.topics.get(key).is_some_and(|t| t.generation == generation && generation != 0)
    }
}

/// The untyped sink behind an `EventSink`: delivers into one topic of one hub
/// while that topic's upstream subscription is the one it was made for.
#[derive(Debug, Clone)]
pub(crate) struct TopicSink {
    hub: Weak<Hub>,
    key: Bytes,
    generation: u64,
}

impl TopicSink {
    pub(crate) fn send(&self, payload: Bytes) -> bool {
        self.hub.upgrade().is_some_and(|hub| hub.deliver(&self.key, self.generation, payload))
    }

    pub(crate) fn is_closed(&self) -> bool {
        !self.hub.upgrade().is_some_and(|hub| hub.is_live(&self.key, self.generation))
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
