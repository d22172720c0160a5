//! The trait a user implements once around the real upstream client.

use std::future::Future;
use tokio::time::Instant;

use tandem_protocol::{Api, RemoteError, UpstreamState};
use tokio_util::sync::CancellationToken;

use crate::hub::TopicSink;

/// What the leader knows about one call while it runs.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub(crate) deadline: Instant,
    pub(crate) cancelled: CancellationToken,
}

impl CallContext {
    /// A context with this deadline (for calls an upstream makes on itself, and tests).
    pub fn until(deadline: Instant) -> Self {
        CallContext { deadline, cancelled: CancellationToken::new() }
    }

    /// When the caller stops waiting (on tokio's clock). The leader drops the call's future at this
    /// instant; an upstream that talks to a server with its own timeout can pass it on.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Cancelled when the caller gave up (Cancel frame, disconnect or deadline).
    /// The call's future is dropped at the same moment, so most upstreams need
    /// not look at this; it is there for work handed off to other tasks.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancelled
    }
}

/// Where an upstream delivers the values of one subscribed key.
///
/// Given to [`Upstream::subscribe`]; keep it (or a clone) and call
/// [`send`](EventSink::send) for every new value. Sending never waits. After the
/// leader unsubscribes the key, sends are ignored and [`is_closed`](EventSink::is_closed)
/// turns true.
#[derive(Debug)]
pub struct EventSink<A: Api> {
    inner: TopicSink,
    _api: std::marker::PhantomData<fn(A)>,
}

impl<A: Api> Clone for EventSink<A> {
    fn clone(&self) -> Self {
        EventSink { inner: self.inner.clone(), _api: std::marker::PhantomData }
    }
}

impl<A: Api> EventSink<A> {
    pub(crate) fn new(inner: TopicSink) -> Self {
        EventSink { inner, _api: std::marker::PhantomData }
    }

    /// Delivers a new value to every subscriber of the key: it gets the next
    /// sequence number, becomes the key's cached value, and is queued to each
    /// subscriber (conflated for slow ones). Returns false if the subscription
    /// is gone (or the value could not be encoded, which is logged).
    pub fn send(&self, event: A::Event) -> bool {
        match tandem_protocol::payload::encode(&event) {
            Ok(bytes) => self.inner.send(bytes),
            Err(error) => {
                tracing::error!(channel = A::NAME, %error, "cannot encode an upstream event; dropped");
                false
            }
        }
    }

    /// Whether the leader has unsubscribed this key (sends are ignored).
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

/// The real upstream client of one channel, as the leader runs it.
///
/// Only the leader's process builds and calls it. Every method may be called
/// concurrently; the leader guarantees that `subscribe` and `unsubscribe` of one
/// key never overlap and alternate (subscribe, unsubscribe, subscribe, ...).
pub trait Upstream<A: Api>: Send + Sync + 'static {
    /// Performs one call. The leader drops the future at the caller's deadline,
    /// on a Cancel, or when the caller disconnects.
    fn invoke(
        &self,
        request: A::Request,
        ctx: CallContext,
    ) -> impl Future<Output = Result<A::Response, RemoteError>> + Send;

    /// Starts delivering the values of `key` into `sink` (the current value
    /// first, if there is one). Called once per key however many subscribers it has.
    fn subscribe(&self, key: A::Key, sink: EventSink<A>) -> impl Future<Output = Result<(), RemoteError>> + Send;

    /// Stops delivering `key`: its last subscriber left.
    fn unsubscribe(&self, key: A::Key) -> impl Future<Output = Result<(), RemoteError>> + Send;

    /// The upstream's health, when it can tell: the leader forwards every change
    /// (`Ready`, `Down(error)`) to the followers, whose `Client::state()` then
    /// shows `UpstreamDown` during an outage. The default is `None` (the channel
    /// is `Ready` once built).
    fn health(&self) -> Option<tokio::sync::watch::Receiver<UpstreamState>> {
        None
    }

    /// Publishes something through the upstream. The default refuses.
    fn publish(&self, request: A::Request) -> impl Future<Output = Result<(), RemoteError>> + Send {
        let _ = request;
        async { Err(RemoteError::bad_request(format!("channel {} does not support publish", A::NAME))) }
    }
}
