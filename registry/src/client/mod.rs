//! The client: a cheap, cloneable handle over one TCP connection to the registry.
//!
//! The handle queues requests for the `driver` task, which owns the socket and
//! hands replies and watch events to the callers and streams waiting in the
//! `in_flight` table. Each watch's events wait in its own `queue` until its
//! `watch` stream takes them; a `registration` keeps its lease alive.
//! `reconnecting` is the client that outlives its connections.

mod driver;
mod error;
mod in_flight;
mod queue;
mod reconnecting;
mod registration;
mod watch;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};

pub use error::Error;
pub use queue::WATCH_BUFFER;
pub use reconnecting::{ConnectionState, FollowedKey, FollowedService, KeyState, Reconnecting};
pub use registration::Registration;
pub use watch::{ServiceWatch, Watch};

use driver::Inputs;
use in_flight::{InFlight, WatchSink};

use crate::wire::{Instance, KeyValue, Op, Request, RequestId, Response, ServerInfo, Stats, WatchSpec};

/// Requests waiting for the connection task. When full, callers wait their turn.
const OUTGOING_QUEUE: usize = 256;

/// How long [`RegistryClient::connect`] waits for the server's hello once connected.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A handle to the registry over one TCP connection, shared by every clone.
///
/// A background task owns the connection; calls may run concurrently and are
/// multiplexed by request id. When the connection is lost every in-flight call
/// fails at once with [`Error::ConnectionLost`], watches end with that error, and
/// later calls fail immediately: connect a new client to carry on (or use
/// [`Reconnecting`], which does). The connection closes when the last clone
/// (and the last watch and registration made through it) is dropped.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    outgoing: mpsc::Sender<Request>,
    /// Unbounded, but only `Drop`s use it, once per watch or registration, so it holds
    /// at most one message per live handle.
    detached: mpsc::UnboundedSender<Op>,
    in_flight: Arc<InFlight>,
    local_addr: SocketAddr,
    peer_addr: SocketAddr,
    server: ServerInfo,
}

impl RegistryClient {
    /// Connects to the registry at `addr` and waits (at most [`HELLO_TIMEOUT`]) for
    /// its hello: see [`RegistryClient::server_info`]. It then sends a `Revision` request
    /// without waiting for the reply, so that the connection is never closed by
    /// the server's [`first_request_timeout`](crate::Config::first_request_timeout),
    /// however long the first call waits.
    pub async fn connect(addr: impl ToSocketAddrs + fmt::Display) -> Result<RegistryClient, Error> {
        let connect_error = |e| Error::Connect { addr: addr.to_string(), source: Arc::new(e) };
        let stream = TcpStream::connect(&addr).await.map_err(connect_error)?;
        let (local_addr, peer_addr) = match (stream.local_addr(), stream.peer_addr()) {
            (Ok(local), Ok(peer)) => (local, peer),
            (Err(e), _) | (_, Err(e)) => return Err(connect_error(e)),
        };
        // Only lowers latency; a failure changes nothing else.
        let _ = stream.set_nodelay(true);
        let in_flight = Arc::new(InFlight::new());
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_QUEUE);
        let (detached, detached_rx) = mpsc::unbounded_channel();
        let (hello, hello_rx) = oneshot::channel();
        let inputs = Inputs { outgoing: outgoing_rx, detached: detached_rx, detached_tx: detached.clone(), hello };
        driver::spawn(stream, tandem_protocol::DEFAULT_MAX_FRAME_LENGTH, in_flight.clone(), inputs);
        let server = match tokio::time::timeout(HELLO_TIMEOUT, hello_rx).await {
            Ok(Ok(server)) => server,
            Ok(Err(_)) => {
                // The driver dropped the hello's sender on its way out: wait for it
                // to record why (a Goodbye's reason, such as `too_many_connections`).
                let _ = tokio::time::timeout(HELLO_TIMEOUT, in_flight.lost().cancelled()).await;
                return Err(connect_error(io::Error::other(in_flight.lost_error())));
            }
            Err(_) => {
                let error = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no hello from the registry within {} ms", HELLO_TIMEOUT.as_millis()),
                );
                in_flight.close(Error::lost(io::Error::new(error.kind(), error.to_string())));
                return Err(connect_error(error));
            }
        };
        // A first request at once (its reply is not waited for), so that the server's
        // first-request timeout never closes a client that makes its first call later.
        let _ = detached.send(Op::Revision);
        Ok(RegistryClient { inner: Arc::new(Inner { outgoing, detached, in_flight, local_addr, peer_addr, server }) })
    }

    /// What the registry announced when this connection opened: its incarnation
    /// and its revision then. A client that reconnects and sees another
    /// incarnation, or a lower revision than it has seen, is talking to a server
    /// that lost state: revisions from before mean nothing there (re-read what
    /// you follow; a watch started beyond the server's revision gets a
    /// [`WatchEvent::Compacted`](crate::WatchEvent::Compacted) snapshot).
    pub fn server_info(&self) -> &ServerInfo {
        &self.inner.server
    }

    /// The registry's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer_addr
    }

    /// This end's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.inner.in_flight.lost().is_cancelled()
    }

    /// Closes the connection now, for every clone: in-flight calls fail and watches
    /// end with [`Error::ConnectionLost`], and the registry drops this connection's
    /// watches and instances.
    pub fn close(&self) {
        let closed = std::io::Error::other("the client closed the connection");
        self.inner.in_flight.close(Error::lost(closed));
    }

    /// Waits until the connection is lost, and returns why.
    pub async fn closed(&self) -> Error {
        self.inner.in_flight.lost().cancelled().await;
        self.inner.in_flight.lost_error()
    }

    /// The value of `key`, or `None` if it is not set.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        Ok(self.get_with_revision(key).await?.0)
    }

    /// The value of `key` and the store's revision when it was read.
    pub async fn get_with_revision(&self, key: &str) -> Result<(Option<KeyValue>, u64), Error> {
        match self.call(Op::Get { key: key.to_owned() }).await? {
            Response::Value { kv, revision } => Ok((kv, revision)),
            _ => Err(Error::UnexpectedReply { op: "get" }),
        }
    }

    /// The store's current revision: 1 when empty, plus one per mutation.
    pub async fn revision(&self) -> Result<u64, Error> {
        match self.call(Op::Revision).await? {
            Response::Revision(revision) => Ok(revision),
            _ => Err(Error::UnexpectedReply { op: "revision" }),
        }
    }

    /// Sets `key` to `value`; returns the revision of this change.
    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<u64, Error> {
        match self.call(Op::Put { key: key.to_owned(), value: value.into() }).await? {
            Response::Revision(revision) => Ok(revision),
            _ => Err(Error::UnexpectedReply { op: "put" }),
        }
    }

    /// Deletes `key`; returns the revision of the deletion, or `None` if it was not set.
    pub async fn delete(&self, key: &str) -> Result<Option<u64>, Error> {
        match self.call(Op::Delete { key: key.to_owned() }).await? {
            Response::Deleted(revision) => Ok(revision),
            _ => Err(Error::UnexpectedReply { op: "delete" }),
        }
    }

    /// Watches a key or a prefix.
    ///
    /// With `from_revision: Some(r)` the watch first yields every matching change
    /// with a revision `>= r` (or, if the server's history no longer reaches back
    /// to `r`, a [`WatchEvent::Compacted`](crate::WatchEvent::Compacted) and the
    /// current values), then the live changes. With `None`, only changes from now on.
    pub async fn watch(&self, spec: WatchSpec, from_revision: Option<u64>) -> Result<Watch, Error> {
        let (feed, rx, end) = queue::channel();
        let id = self.start_watch(WatchSink::Keys(feed), Op::Watch { spec, from_revision }).await?;
        Ok(Watch::new(self.clone(), id, rx, end, from_revision))
    }

    /// Registers `instance` under a lease of `ttl`, kept alive (every `ttl / 3`) by a
    /// background task until the [`Registration`] is dropped or deregistered. The
    /// instance also disappears when this client's connection closes.
    pub async fn register(&self, instance: Instance, ttl: Duration) -> Result<Registration, Error> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        match self.call(Op::Register { instance: instance.clone(), ttl_ms }).await? {
            Response::Lease { lease, ttl_ms } => {
                Ok(Registration::start(self.clone(), lease, instance, Duration::from_millis(ttl_ms)))
            }
            _ => Err(Error::UnexpectedReply { op: "register" }),
        }
    }

    /// The instances of `service`, ordered by id.
    pub async fn discover(&self, service: &str) -> Result<Vec<Instance>, Error> {
        match self.call(Op::Discover { service: service.to_owned() }).await? {
            Response::Instances(instances) => Ok(instances),
            _ => Err(Error::UnexpectedReply { op: "discover" }),
        }
    }

    /// Watches the instances of `service`: one `Join` per current instance, then joins and leaves.
    pub async fn watch_service(&self, service: &str) -> Result<ServiceWatch, Error> {
        let (feed, rx, end) = queue::channel();
        let service = service.to_owned();
        let id = self.start_watch(WatchSink::Service(feed), Op::WatchService { service }).await?;
        Ok(ServiceWatch::new(self.clone(), id, rx, end))
    }

    /// The server's counters; `connections` does not count this client's connection.
    pub async fn stats(&self) -> Result<Stats, Error> {
        match self.call(Op::Stats).await? {
            Response::Stats(stats) => Ok(stats),
            _ => Err(Error::UnexpectedReply { op: "stats" }),
        }
    }

    pub(crate) async fn keep_alive(&self, lease: u64) -> Result<Duration, Error> {
        match self.call(Op::KeepAlive { lease }).await? {
            Response::KeptAlive { ttl_ms } => Ok(Duration::from_millis(ttl_ms)),
            _ => Err(Error::UnexpectedReply { op: "keep_alive" }),
        }
    }

    pub(crate) async fn deregister(&self, lease: u64) -> Result<(), Error> {
        match self.call(Op::Deregister { lease }).await? {
            Response::Done => Ok(()),
            _ => Err(Error::UnexpectedReply { op: "deregister" }),
        }
    }

    /// Sends `op` without waiting for (or caring about) the reply; for `Drop`s.
    pub(crate) fn detach(&self, op: Op) {
        if !self.is_closed() {
            let _ = self.inner.detached.send(op);
        }
    }

    /// Stops delivering watch `id` and cancels it on the server.
    pub(crate) fn end_watch(&self, id: RequestId) {
        if self.inner.in_flight.forget_watch(id) {
            self.detach(Op::CancelWatch { watch_id: id });
        }
    }

    async fn call(&self, op: Op) -> Result<Response, Error> {
        let id = self.inner.in_flight.next_id();
        self.send(id, op, None).await
    }

    /// Starts a watch; its id is the id of the request that started it.
    async fn start_watch(&self, sink: WatchSink, op: Op) -> Result<RequestId, Error> {
        let id = self.inner.in_flight.next_id();
        let mut guard = WatchGuard { client: self, id, armed: true };
        match self.send(id, op, Some(sink)).await? {
            Response::Watching => {
                guard.armed = false;
                Ok(id)
            }
            _ => Err(Error::UnexpectedReply { op: "watch" }),
        }
    }

    /// Registers call `id`, queues it and waits for its reply.
    async fn send(&self, id: RequestId, op: Op, sink: Option<WatchSink>) -> Result<Response, Error> {
        let in_flight = &self.inner.in_flight;
        let reply = in_flight.start(id, sink)?;
        let _guard = CallGuard { in_flight, id };
        if self.inner.outgoing.send(Request { id, op }).await.is_err() {
            return Err(in_flight.lost_error());
        }
        match reply.await {
            Ok(result) => result,
            Err(_) => Err(in_flight.lost_error()),
        }
    }
}

/// Forgets a call whose caller stopped waiting (or that completed: then it is a no-op).
struct CallGuard<'a> {
    in_flight: &'a InFlight,
    id: RequestId,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.in_flight.forget_call(self.id);
    }
}

/// Ends a watch that failed to start, or whose caller stopped waiting for it to start.
struct WatchGuard<'a> {
    client: &'a RegistryClient,
    id: RequestId,
    armed: bool,
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.client.end_watch(self.id);
        }
    }
}
