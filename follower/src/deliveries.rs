//! Deliver-to-one subscriptions: each event of a key goes to ONE subscriber
//! of it across the host, which acks it once processed.
//!
//! ```text
//! leader: event of k ──> one subscriber in turn with room ──Delivery{tag}──> driver ──> Deliveries<A>
//!                                                                              │
//!         forgets it <──────────────── Settle{acked} <── batched ── Delivery::ack()
//!         gives it to another, ◄────── Settle{released} ◄─────────── dropped unacked
//!         marked redelivered   ◄────── ack timeout, or this connection / subscription gone
//! ```
//!
//! At-least-once: an event is forgotten by the leader only when acked, so
//! one that was being processed when its subscriber died (or took longer than
//! the ack timeout) is processed again elsewhere, with
//! [`Delivery::redelivered`] true. There is no cached replay: a subscriber
//! gets only events that arrive (or are redelivered) while it is subscribed.

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tandem_protocol::{Api, Position, RequestId};
use tokio::sync::mpsc;

use crate::Connection;
use crate::command::{Command, DeliveriesParts, RawDelivery};

/// How a deliver-to-one subscription asks to be served. `Default` leaves both
/// to the leader.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliverOptions {
    /// The most deliveries this subscription holds unacked at once; the
    /// leader gives it no more until it acks (or releases) some. `0` takes the
    /// leader's `Config::deliver_window` (256 by default); the leader caps it at
    /// its `Config::deliver_max_window` (1024 by default). The default is 0.
    pub window: u32,
    /// How long a delivery may stay unacked before the leader gives it to
    /// another subscriber, marked redelivered. `None` takes the leader's
    /// `Config::deliver_ack_timeout` (30 seconds by default). The default is `None`.
    pub ack_timeout: Option<Duration>,
}

impl DeliverOptions {
    /// At most `window` unacked deliveries at once.
    pub fn window(mut self, window: u32) -> Self {
        self.window = window;
        self
    }

    /// Unacked after `timeout`, a delivery goes to another subscriber.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = Some(timeout);
        self
    }
}

/// Tells the driver how a delivery ended.
#[derive(Debug)]
struct Settler {
    drops: mpsc::UnboundedSender<Command>,
    link: u64,
    sub: RequestId,
    tag: u64,
}

impl Settler {
    fn send(self, ack: bool) {
        let Settler { drops, link, sub, tag } = self;
        let _ = drops.send(Command::Settle { link, sub, tag, ack });
    }
}

/// One event of a deliver-to-one subscription, given to this subscriber only.
///
/// Call [`ack`](Delivery::ack) once it is processed. Dropping it unacked
/// releases it: the leader gives it to another subscriber (or this one again,
/// when it is the only one with room), marked redelivered.
#[derive(Debug)]
#[must_use = "a delivery not acked is redelivered"]
pub struct Delivery<T> {
    value: T,
    position: Position,
    redelivered: bool,
    settler: Option<Settler>,
}

impl<T> Delivery<T> {
    /// The event.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// The event's (epoch, seq) at the leader that first delivered it (kept by a redelivery).
    pub fn position(&self) -> Position {
        self.position
    }

    /// Whether this event was given to a subscriber before (one that died, took
    /// longer than its ack timeout, or released it): it may have been processed already.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Done with: the leader forgets the event. (Acks are batched; one that
    /// reaches the leader after the ack timeout, or after the connection was
    /// lost, is too late: the event was redelivered.)
    pub fn ack(mut self) {
        if let Some(settler) = self.settler.take() {
            settler.send(true);
        }
    }

    /// Not processed: the leader gives the event to another subscriber now, marked redelivered.
    pub fn release(self) {
        drop(self)
    }
}

impl<T> Drop for Delivery<T> {
    fn drop(&mut self) {
        if let Some(settler) = self.settler.take() {
            settler.send(false);
        }
    }
}

/// A deliver-to-one subscription: a `Stream` of [`Delivery`]s. Dropping it
/// unsubscribes; what it was given and had not acked is redelivered to others.
///
/// It survives a change of leader: the driver subscribes again at the new
/// one, and deliveries of the old leader still unread are skipped (the old
/// leader's session ended, so they are redelivered elsewhere). The stream ends
/// when the connection closes, when the leader ends the key's subscription,
/// or when the leader speaks a protocol version without deliver-to-one (1).
#[must_use = "a subscription yields nothing unless polled"]
pub struct Deliveries<A: Api> {
    local: u64,
    rx: mpsc::Receiver<RawDelivery>,
    link: Arc<AtomicU64>,
    drops: mpsc::UnboundedSender<Command>,
    /// Keeps the connection (and its driver) alive while the subscription is.
    _connection: Connection,
    _api: PhantomData<fn() -> A>,
}

impl<A: Api> std::fmt::Debug for Deliveries<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries").field("channel", &A::NAME).field("local", &self.local).finish()
    }
}

impl<A: Api> Deliveries<A> {
    pub(crate) fn new(parts: DeliveriesParts, connection: Connection) -> Self {
        let drops = connection.inner.drops.clone();
        Deliveries {
            local: parts.local,
            rx: parts.rx,
            link: parts.link,
            drops,
            _connection: connection,
            _api: PhantomData,
        }
    }
}

impl<A: Api> Stream for Deliveries<A> {
    type Item = Delivery<A::Event>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            let Some(raw) = std::task::ready!(this.rx.poll_recv(cx)) else { return Poll::Ready(None) };
            if raw.link != this.link.load(Ordering::Acquire) {
                continue; // of a lost link: redelivered elsewhere already
            }
            let settler = Settler { drops: this.drops.clone(), link: raw.link, sub: raw.sub, tag: raw.tag };
            match tandem_protocol::payload::decode::<A::Event>(&raw.payload) {
                Ok(value) => {
                    return Poll::Ready(Some(Delivery {
                        value,
                        position: raw.position,
                        redelivered: raw.redelivered,
                        settler: Some(settler),
                    }));
                }
                Err(error) => {
                    // Nobody can process it: acked, so it does not go round for ever.
                    tracing::error!(channel = A::NAME, %error, "undecodable delivery acked and skipped");
                    settler.send(true);
                }
            }
        }
    }
}

impl<A: Api> Drop for Deliveries<A> {
    fn drop(&mut self) {
        let _ = self.drops.send(Command::UnsubscribeOne { local: self.local });
    }
}
