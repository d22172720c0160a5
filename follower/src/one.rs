//! The driver's side of deliver-to-one subscriptions (no I/O): each one's
//! state at the current leader, the deliveries routed to its stream, and the
//! acks batched into `Settle` frames.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tandem_protocol::{
    ChannelName, DELIVER_ONE_VERSION, Delivery, ErrorCode, Frame, RemoteError, RequestId, Settle, SubscribeOne,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::Error;
use crate::command::{DeliveriesParts, RawDelivery, SubscribeOneReply};
use crate::deliveries::DeliverOptions;
use crate::in_flight::{InFlight, Pending};
use crate::remote::Remote;
use crate::state::{LinkState, Status};

/// How long to wait before asking again for a subscription the leader refused.
const RESUBSCRIBE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The stream's queue when the subscription leaves the window to the leader
/// (the leader's largest window by default): a delivery that finds it full is
/// released at once.
const DEFAULT_QUEUE: usize = 1024;

/// One deliver-to-one subscription handle, as the driver keeps it.
#[derive(Debug)]
pub(crate) struct One {
    channel: &'static str,
    key: Bytes,
    options: DeliverOptions,
    tx: mpsc::Sender<RawDelivery>,
    link: Arc<AtomicU64>,
    remote: Remote,
    /// Its id at the current leader (the `SubscribeOne` id), once sent.
    sub: Option<RequestId>,
    /// The caller waiting for its first acknowledgement, with the parts it gets.
    waiting: Option<(SubscribeOneReply, DeliveriesParts)>,
}

/// The deliver-to-one subscriptions of a connection.
#[derive(Debug, Default)]
pub(crate) struct Ones {
    by_local: HashMap<u64, One>,
    by_sub: HashMap<RequestId, u64>,
    /// Acked and released tags per subscription, sent as one `Settle` each after the step.
    settles: HashMap<RequestId, (Vec<u64>, Vec<u64>)>,
    /// Counts links: deliveries and acks of an earlier link are void.
    link: u64,
}

/// What the deliver-to-one subscriptions use of the driver's core in one step.
pub(crate) struct Step<'a> {
    /// Frames to write after the step.
    pub(crate) out: &'a mut Vec<Frame>,
    pub(crate) in_flight: &'a mut InFlight,
    /// The connection's request ids (shared with the handles).
    pub(crate) next_id: &'a AtomicU64,
    /// The protocol version of the current link.
    pub(crate) version: u16,
    pub(crate) status: &'a watch::Sender<Status>,
    /// When to retry refused subscriptions.
    pub(crate) retry_at: &'a mut Option<Instant>,
}

impl Step<'_> {
    fn next_id(&self) -> RequestId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn channel_ready(&self, channel: &str) -> bool {
        self.status.borrow().channels.contains_key(channel)
    }
}

impl Ones {
    /// A new deliver-to-one subscription: sent once the channel is ready.
    pub(crate) fn subscribe(
        &mut self,
        step: &mut Step<'_>,
        channel: &'static str,
        key: Bytes,
        options: DeliverOptions,
        reply: SubscribeOneReply,
    ) {
        let local = step.next_id();
        let capacity = match options.window {
            0 => DEFAULT_QUEUE,
            n => usize::try_from(n).unwrap_or(DEFAULT_QUEUE),
        };
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let link = Arc::new(AtomicU64::new(self.link));
        let parts = DeliveriesParts { local, rx, link: link.clone() };
        let one =
            One { channel, key, options, tx, link, remote: Remote::Unsent, sub: None, waiting: Some((reply, parts)) };
        self.by_local.insert(local, one);
        if step.channel_ready(channel) {
            self.send_subscribe(step, local);
        }
    }

    fn send_subscribe(&mut self, step: &mut Step<'_>, local: u64) {
        if step.version < DELIVER_ONE_VERSION {
            let error = RemoteError::rejected(format!(
                "the leader speaks protocol version {}; deliver-to-one needs version {DELIVER_ONE_VERSION}",
                step.version
            ))
            .with_code(ErrorCode::VERSION);
            if let Some(mut one) = self.by_local.remove(&local) {
                tracing::warn!(channel = one.channel, %error, "deliver-to-one subscription ended");
                if let Some((reply, _)) = one.waiting.take() {
                    let _ = reply.send(Err(Error::Remote(error)));
                }
            }
            return;
        }
        let id = step.next_id();
        let Some(one) = self.by_local.get_mut(&local) else { return };
        one.remote = Remote::Pending(id);
        one.sub = Some(id);
        self.by_sub.insert(id, local);
        step.in_flight.insert(id, Pending::SubscribeOne { local });
        let ack_timeout_ms =
            one.options.ack_timeout.map_or(0, |t| u32::try_from(t.as_millis().max(1)).unwrap_or(u32::MAX));
        step.out.push(Frame::SubscribeOne(SubscribeOne {
            id,
            channel: ChannelName::from_static(one.channel),
            key: one.key.clone(),
            window: one.options.window,
            ack_timeout_ms,
        }));
    }

    /// The leader answered a `SubscribeOne`.
    pub(crate) fn on_subscribed(
        &mut self,
        step: &mut Step<'_>,
        id: RequestId,
        local: u64,
        result: Result<(), RemoteError>,
    ) {
        let Some(one) = self.by_local.get_mut(&local).filter(|one| one.remote == Remote::Pending(id)) else {
            return;
        };
        match result {
            Ok(()) => {
                one.remote = Remote::Active;
                if let Some((reply, parts)) = one.waiting.take()
                    && reply.send(Ok(parts)).is_err()
                {
                    // The caller gave up: nobody reads it.
                    self.unsubscribe(step, local);
                }
            }
            Err(error) => {
                tracing::warn!(channel = one.channel, %error, "deliver-to-one subscribe refused by the leader");
                self.by_sub.remove(&id);
                one.remote = Remote::Unsent;
                one.sub = None;
                if let Some((reply, _)) = one.waiting.take() {
                    let _ = reply.send(Err(Error::Remote(error)));
                    self.by_local.remove(&local);
                } else if step.retry_at.is_none() {
                    *step.retry_at = Some(Instant::now() + RESUBSCRIBE_RETRY);
                }
            }
        }
    }

    /// A delivery from the leader: to its subscription's stream, or released
    /// at once when nobody can take it.
    pub(crate) fn on_delivery(&mut self, delivery: Delivery) {
        let Delivery { sub, tag, epoch, seq, payload, redelivered } = delivery;
        let taken = self.by_sub.get(&sub).and_then(|local| self.by_local.get(local)).is_some_and(|one| {
            let raw = RawDelivery {
                link: self.link,
                sub,
                tag,
                position: tandem_protocol::Position { epoch, seq },
                payload,
                redelivered,
            };
            one.tx.try_send(raw).is_ok()
        });
        if !taken {
            self.settles.entry(sub).or_default().1.push(tag);
        }
    }

    /// A handle acked (or released) a delivery of link `link`.
    pub(crate) fn settle(&mut self, sub: RequestId, link: u64, tag: u64, ack: bool) {
        if link != self.link || !self.by_sub.contains_key(&sub) {
            return; // of a lost link, or a subscription ended: the leader redelivered it already
        }
        let (acked, released) = self.settles.entry(sub).or_default();
        if ack { acked.push(tag) } else { released.push(tag) }
    }

    /// The settles of this step, one frame per subscription.
    pub(crate) fn flush_settles(&mut self, out: &mut Vec<Frame>) {
        for (sub, (acked, released)) in self.settles.drain() {
            out.push(Frame::Settle(Settle { sub, acked, released }));
        }
    }

    /// A deliver-to-one handle was dropped: the leader hands what it held to others.
    pub(crate) fn unsubscribe(&mut self, step: &mut Step<'_>, local: u64) {
        let Some(one) = self.by_local.remove(&local) else { return };
        let Some(sub) = one.sub else { return };
        self.by_sub.remove(&sub);
        self.settles.remove(&sub);
        if one.remote != Remote::Unsent && matches!(step.status.borrow().link, LinkState::Connected { .. }) {
            step.in_flight.remove(sub);
            step.out.push(Frame::Cancel(sub));
        }
    }

    /// Subscriptions of `channel` not at the current leader are sent.
    pub(crate) fn resubscribe(&mut self, step: &mut Step<'_>, channel: &'static str) {
        let unsent: Vec<u64> = self
            .by_local
            .iter()
            .filter(|(_, one)| one.channel == channel && one.remote == Remote::Unsent)
            .map(|(local, _)| *local)
            .collect();
        for local in unsent {
            self.send_subscribe(step, local);
        }
    }

    /// The leader ended the key's subscriptions: their streams end.
    pub(crate) fn end(&mut self, channel: &str, key: &Bytes, error: &RemoteError) {
        let ended: Vec<u64> =
            self.by_local.iter().filter(|(_, o)| o.channel == channel && o.key == *key).map(|(l, _)| *l).collect();
        for local in ended {
            if let Some(mut one) = self.by_local.remove(&local) {
                if let Some(sub) = one.sub {
                    self.by_sub.remove(&sub);
                }
                if let Some((reply, _)) = one.waiting.take() {
                    let _ = reply.send(Err(Error::Remote(error.clone())));
                }
            }
        }
    }

    /// The link died: what the streams hold of it is void; the subscriptions
    /// wait for the next leader (a caller still waiting gets `LeaderLost`).
    pub(crate) fn lost(&mut self) {
        self.link += 1;
        self.by_sub.clear();
        self.settles.clear();
        let link = self.link;
        self.by_local.retain(|_, one| {
            one.link.store(link, Ordering::Release);
            one.remote = Remote::Unsent;
            one.sub = None;
            match one.waiting.take() {
                Some((reply, _)) => {
                    let _ = reply.send(Err(Error::LeaderLost));
                    false
                }
                None => true,
            }
        });
    }

    /// The connection closed: every stream ends.
    pub(crate) fn close(&mut self) {
        self.by_local.clear();
        self.by_sub.clear();
    }
}
