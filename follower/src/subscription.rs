//! A subscription: a stream of one key's values that unsubscribes on drop.

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use tandem_protocol::{Api, Position};
use tokio::sync::mpsc;

use crate::Connection;
use crate::command::{Command, SubscriptionParts};
use crate::feed::{RawUpdate, Reader};

/// Where a value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// From the upstream, live.
    Live,
    /// From the leader's last-known-good cache on disk, served because the
    /// upstream is unreachable: the key's last value the leader saw live, maybe
    /// stale. A live value follows as a newer update once the upstream is back.
    Cache,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Live => "live",
            Source::Cache => "cache",
        })
    }
}

/// One value of a subscription, with where it sits in the key's history.
#[derive(Debug, Clone, PartialEq)]
pub struct Update<T> {
    /// The value.
    pub value: T,
    /// The epoch of the leader that delivered it.
    pub epoch: u64,
    /// Its sequence number within that epoch.
    pub seq: u64,
    /// Live, or from the leader's last-known-good cache.
    pub source: Source,
}

impl<T> Update<T> {
    /// The value's (epoch, seq).
    pub fn position(&self) -> Position {
        Position { epoch: self.epoch, seq: self.seq }
    }

    /// Whether the value came from the leader's last-known-good cache rather than live.
    pub fn is_cached(&self) -> bool {
        self.source == Source::Cache
    }
}

/// The values of one key, as a `Stream`, starting with the current value (if
/// the key has one). Values arrive in order and never twice, across leader
/// changes too. A reader that falls more than `Config::subscription_buffer`
/// values behind skips the oldest; the newest is never lost.
/// Dropping the subscription unsubscribes (the last one in the host releases
/// the upstream subscription).
#[must_use = "a subscription yields nothing unless polled"]
pub struct Subscription<A: Api> {
    channel: &'static str,
    key: Bytes,
    first: Option<RawUpdate>,
    reader: Reader,
    /// Keeps the connection (and its driver) alive while the subscription is.
    _connection: Connection,
    drops: mpsc::UnboundedSender<Command>,
    _api: PhantomData<fn() -> A>,
}

impl<A: Api> std::fmt::Debug for Subscription<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("channel", &self.channel).field("skipped", &self.skipped()).finish()
    }
}

fn decode<A: Api>(update: &RawUpdate) -> Option<Update<A::Event>> {
    match tandem_protocol::payload::decode::<A::Event>(&update.payload) {
        Ok(value) => Some(Update {
            value,
            epoch: update.position.epoch,
            seq: update.position.seq,
            source: if update.cached { Source::Cache } else { Source::Live },
        }),
        Err(error) => {
            tracing::error!(channel = A::NAME, %error, "undecodable event skipped");
            None
        }
    }
}

impl<A: Api> Subscription<A> {
    pub(crate) fn new(channel: &'static str, key: Bytes, parts: SubscriptionParts, connection: Connection) -> Self {
        let drops = connection.inner.drops.clone();
        Subscription {
            channel,
            key,
            first: parts.first,
            reader: parts.reader,
            _connection: connection,
            drops,
            _api: PhantomData,
        }
    }

    /// The key's newest value known to this process (it may not have been yielded yet).
    pub fn latest(&self) -> Option<Update<A::Event>> {
        self.reader.feed().latest().as_ref().and_then(decode::<A>)
    }

    /// How many values this subscription skipped because its reader fell behind.
    pub fn skipped(&self) -> u64 {
        self.reader.skipped()
    }

    /// Why the stream ended, when the leader ended it: the upstream refused
    /// the key after the subscription had been acknowledged as pending (while
    /// the upstream was down). `None` while it runs.
    pub fn ended(&self) -> Option<crate::Error> {
        self.reader.feed().ended().map(crate::Error::Remote)
    }
}

impl<A: Api> Stream for Subscription<A> {
    type Item = Update<A::Event>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            let raw = match this.first.take() {
                Some(first) => first,
                None => match this.reader.poll_next(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Ready(Some(update)) => update,
                },
            };
            if let Some(update) = decode::<A>(&raw) {
                return Poll::Ready(Some(update));
            }
        }
    }
}

impl<A: Api> Drop for Subscription<A> {
    fn drop(&mut self) {
        let feed = self.reader.feed().clone();
        let _ = self.drops.send(Command::Unsubscribe { channel: self.channel, key: self.key.clone(), feed });
    }
}
