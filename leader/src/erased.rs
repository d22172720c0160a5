//! A channel's upstream with its types erased: calls and subscriptions as
//! bytes in and bytes out, so the hub and the sessions need not be generic
//! over each channel's [`Api`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tandem_protocol::payload::{decode, encode};
use tandem_protocol::{Api, RemoteError, UpstreamState};
use tokio::sync::watch;

use crate::upstream::{CallContext, Room, Upstream};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
/// A key's values, encoded, each with its resume point (`Upstream::revision`).
pub(crate) type ByteEvents = Pin<Box<dyn Stream<Item = (Bytes, Option<u64>)> + Send + 'static>>;
/// The hub's delivery of one key's encoded values, for streams from
/// `Events::channel` (false: the key is no longer wanted), and its answer to
/// `EventSender::ready`.
pub(crate) struct DirectSink {
    pub(crate) deliver: Box<dyn FnMut(Bytes, Option<u64>) -> bool + Send>,
    pub(crate) room: Room,
}

/// An upstream seen through bytes: what the leader routes without knowing types.
pub(crate) trait ErasedUpstream: Send + Sync + 'static {
    fn invoke(&self, payload: Bytes, ctx: CallContext) -> BoxFuture<Result<Bytes, RemoteError>>;
    fn publish(&self, payload: Bytes, ctx: CallContext) -> BoxFuture<Result<(), RemoteError>>;
    /// Subscribes `key`, from `resume` (a revision) when given (`Upstream::subscribe_from`).
    fn subscribe(
        &self,
        key: Bytes,
        resume: Option<u64>,
        direct: DirectSink,
    ) -> BoxFuture<Result<ByteEvents, RemoteError>>;
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

    fn subscribe(
        &self,
        key: Bytes,
        resume: Option<u64>,
        direct: DirectSink,
    ) -> BoxFuture<Result<ByteEvents, RemoteError>> {
        let upstream = self.upstream.clone();
        Box::pin(async move {
            let key: A::Key = decode(&key)?;
            let mut events = match resume {
                Some(revision) => upstream.subscribe_from(key, revision).await?,
                None => upstream.subscribe(key).await?,
            };
            // An `Events::channel` is delivered as it is sent; the stream then only tells its end.
            let DirectSink { mut deliver, room } = direct;
            let direct_upstream = upstream.clone();
            events.deliver_directly(
                Box::new(move |event| match encode(&event) {
                    Ok(bytes) => deliver(bytes, direct_upstream.revision(&event)),
                    Err(error) => {
                        tracing::error!(channel = A::NAME, %error, "cannot encode an upstream event; dropped");
                        true
                    }
                }),
                room,
            );
            let encoded = events.filter_map(move |event| {
                futures::future::ready(match encode(&event) {
                    Ok(bytes) => Some((bytes, upstream.revision(&event))),
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
