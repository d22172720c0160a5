//! One channel inside the leader: its upstream (type-erased), its state and its hub.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::time::Instant;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tandem_protocol::payload::{decode, encode};
use tandem_protocol::{Api, RemoteError, UpstreamState};
use tokio::sync::watch;

use crate::hub::{Hub, HubContext};
use crate::upstream::{CallContext, Room, Upstream};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
/// A key's values, encoded.
pub(crate) type ByteEvents = Pin<Box<dyn Stream<Item = Bytes> + Send + 'static>>;
/// The hub's delivery of one key's encoded values, for streams from
/// `Events::channel` (false: the key is no longer wanted), and its answer to
/// `EventSender::ready`.
pub(crate) struct DirectSink {
    pub(crate) deliver: Box<dyn FnMut(Bytes) -> bool + Send>,
    pub(crate) room: Room,
}

/// An upstream seen through bytes: what the leader routes without knowing types.
pub(crate) trait ErasedUpstream: Send + Sync + 'static {
    fn invoke(&self, payload: Bytes, ctx: CallContext) -> BoxFuture<Result<Bytes, RemoteError>>;
    fn publish(&self, payload: Bytes, ctx: CallContext) -> BoxFuture<Result<(), RemoteError>>;
    fn subscribe(&self, key: Bytes, direct: DirectSink) -> BoxFuture<Result<ByteEvents, RemoteError>>;
    fn health(&self) -> Option<watch::Receiver<UpstreamState>>;
}

pub(crate) struct Typed<A, U> {
    upstream: Arc<U>,
    _api: std::marker::PhantomData<fn(A)>,
}

impl<A: Api, U: Upstream<A>> Typed<A, U> {
    pub(crate) fn new(upstream: U) -> Self {
        Typed { upstream: Arc::new(upstream), _api: std::marker::PhantomData }
    }
}

impl<A: Api, U: Upstream<A>> ErasedUpstream for Typed<A, U> {
    fn invoke(&self, payload: Bytes, ctx: CallContext) -> BoxFuture<Result<Bytes, RemoteError>> {
        let upstream = self.upstream.clone();
        Box::pin(async move {
            let request: A::Request = decode(&payload)?;
            let response = upstream.invoke(request, ctx).await?;
            encode(&response)
        })
    }

    fn publish(&self, payload: Bytes, ctx: CallContext) -> BoxFuture<Result<(), RemoteError>> {
        let upstream = self.upstream.clone();
        Box::pin(async move {
            let request: A::Request = decode(&payload)?;
            upstream.publish(request, ctx).await
        })
    }

    fn subscribe(&self, key: Bytes, direct: DirectSink) -> BoxFuture<Result<ByteEvents, RemoteError>> {
        let upstream = self.upstream.clone();
        Box::pin(async move {
            let key: A::Key = decode(&key)?;
            let mut events = upstream.subscribe(key).await?;
            // An `Events::channel` is delivered as it is sent; the stream then only tells its end.
            let DirectSink { mut deliver, room } = direct;
            events.deliver_directly(
                Box::new(move |event| match encode(&event) {
                    Ok(bytes) => deliver(bytes),
                    Err(error) => {
                        tracing::error!(channel = A::NAME, %error, "cannot encode an upstream event; dropped");
                        true
                    }
                }),
                room,
            );
            let encoded = events.filter_map(|event| {
                futures::future::ready(match encode(&event) {
                    Ok(bytes) => Some(bytes),
                    Err(error) => {
                        tracing::error!(channel = A::NAME, %error, "cannot encode an upstream event; dropped");
                        None
                    }
                })
            });
            Ok(Box::pin(encoded) as ByteEvents)
        })
    }

    fn health(&self) -> Option<watch::Receiver<UpstreamState>> {
        self.upstream.health()
    }
}

/// A channel: name, upstream once built, its state, and its subscription hub.
pub(crate) struct Channel {
    pub(crate) name: Arc<str>,
    pub(crate) upstream: std::sync::OnceLock<Arc<dyn ErasedUpstream>>,
    pub(crate) state: watch::Sender<UpstreamState>,
    pub(crate) hub: Arc<Hub>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("name", &self.name).field("state", &*self.state.borrow()).finish()
    }
}

impl Channel {
    pub(crate) fn new(name: &str, ctx: HubContext) -> Self {
        let name: Arc<str> = Arc::from(name);
        let state = watch::Sender::new(UpstreamState::Starting);
        Channel {
            hub: Arc::new(Hub::new(name.clone(), ctx, state.subscribe())),
            name,
            upstream: std::sync::OnceLock::new(),
            state,
        }
    }

    /// The upstream is built: calls and subscriptions go to it from now on.
    pub(crate) fn attach(&self, upstream: Arc<dyn ErasedUpstream>) {
        let _ = self.upstream.set(upstream.clone());
        self.hub.attach(upstream);
    }

    /// The upstream, waiting while it is being built, until `deadline`.
    pub(crate) async fn ready_upstream(&self, deadline: Instant) -> Result<Arc<dyn ErasedUpstream>, RemoteError> {
        let mut state = self.state.subscribe();
        let wait = state.wait_for(|s| !matches!(s, UpstreamState::Starting));
        match tokio::time::timeout_at(deadline, wait).await {
            Err(_) => Err(RemoteError::deadline_exceeded(format!(
                "channel {}: upstream still starting at the deadline",
                self.name
            ))),
            Ok(Err(_)) => Err(RemoteError::unavailable("leader shutting down")),
            Ok(Ok(state)) => {
                match &*state {
                    UpstreamState::Down(e) => Err(e.clone()),
                    _ => self.upstream.get().cloned().ok_or_else(|| {
                        RemoteError::unavailable(format!("channel {}: upstream not available", self.name))
                    }),
                }
            }
        }
    }
}
