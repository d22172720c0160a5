//! One client connection: reads requests, applies them to the shared state,
//! replies, and streams the connection's watches; cleans up when it ends.

use crate::code;
use std::collections::HashSet;
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_protocol::{Codec, CodecError, ErrorCode, RemoteError};
use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::conn_id::ConnId;
use super::hub::Target;
use super::limits::Slot;
use super::outbound::{self, EventBounds, Gone, Outbound};
use super::reader::{Read, ReadError, RequestReader};
use super::state::{CatchUp, Shared};
use crate::wire::{CONNECTION_ID, Instance, Op, Request, RequestId, Response, ServerMessage, WatchSpec};

/// How many replayed events a catching-up watch takes from the history per lock.
const REPLAY_CHUNK: usize = 256;

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The client closed the connection.
    Eof,
    /// Reading failed.
    Io(std::io::Error),
    /// The client broke the protocol; it is told why.
    Protocol(RemoteError),
    /// The client ran into a read limit (frame or first-request timeout, partial-frame budget); it is told which.
    Limit(RemoteError),
    /// The connection was idle (no request, watch or lease) for the idle timeout; the client is told.
    Idle(RemoteError),
    /// The server is shutting down; the client is told.
    Shutdown,
    /// The client fell too far behind (already logged) or writing failed.
    Dropped,
}

/// Decrements the open-connections count if the session ends without [`Session::finish`]
/// (its task was dropped).
#[derive(Debug)]
struct Counted(Option<Arc<Shared>>);

impl Counted {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(shared) = &self.0 {
            shared.connection_closed();
        }
    }
}

/// Serves one accepted connection until it closes, breaks the protocol, or `shutdown` fires.
///
/// `slot` is the connection's place under the connection cap: it is given back
/// when this returns, after the socket is closed.
pub(crate) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    conn: ConnId,
    shared: Arc<Shared>,
    slot: Slot,
    shutdown: CancellationToken,
) {
    let span = info_span!("session", conn.id = conn, peer = %peer);
    serve(stream, conn, shared, &slot, shutdown).instrument(span).await;
}

async fn serve(stream: TcpStream, conn: ConnId, shared: Arc<Shared>, slot: &Slot, shutdown: CancellationToken) {
    let counted = Counted(Some(shared.clone()));
    debug!("connection accepted");
    let first_request = shared.config.first_request_timeout;
    // Zero disables it; a timeout too long to add is as good as none.
    let first_deadline = (!first_request.is_zero()).then(|| Instant::now().checked_add(first_request)).flatten();
    let (read, write) = stream.into_split();
    let max_frame = shared.config.max_frame;
    let grace = shared.config.shutdown_grace;
    let budget = slot.limits().budget.clone();
    let mut reader = RequestReader::new(read, max_frame, shared.config.frame_timeout, budget);
    let writer = FramedWrite::new(write, Codec::<Request>::with_max_frame_length(max_frame));
    let closing = CancellationToken::new();
    let bounds = EventBounds { events: shared.config.outbound_queue, bytes: shared.config.outbound_queue_bytes };
    let (outbound, queues) = outbound::channel(conn, bounds, closing.clone());
    // The first message of the connection; the control queue is empty, so it fits.
    outbound.try_send(ServerMessage::Hello(shared.hello()));
    let mut session = Session { conn, shared, outbound, watches: HashSet::new(), counted };

    let write = outbound::write_loop(queues, writer);
    tokio::pin!(write);
    let end = tokio::select! {
        biased;
        () = closing.cancelled() => End::Dropped,
        () = shutdown.cancelled() => End::Shutdown,
        result = &mut write => {
            match result {
                Err(CodecError::Io(e)) => debug!(error = %e, "writing failed"),
                Err(e) => warn!(error = %e, "closing connection: a message could not be framed"),
                Ok(()) => {}
            }
            End::Dropped
        }
        end = session.read_loop(&mut reader, slot, first_deadline) => end,
    };
    let writer_running = !matches!(end, End::Dropped);
    session.finish(end);
    if writer_running {
        // The writer flushes what is queued (a goodbye, say), then closes the socket.
        let flushed = tokio::select! {
            () = closing.cancelled() => false,
            result = tokio::time::timeout(grace, &mut write) => matches!(result, Ok(Ok(()))),
        };
        if !flushed {
            debug!("connection closed without flushing");
        }
    }
}

#[derive(Debug)]
struct Session {
    conn: ConnId,
    shared: Arc<Shared>,
    outbound: Outbound,
    /// The ids of this connection's watches.
    watches: HashSet<RequestId>,
    /// Counts the connection as open until the session finishes (before its last flush).
    counted: Counted,
}

impl Session {
    /// Reads and handles requests until the connection ends. Until the first
    /// request has arrived whole, reading stops at `first_deadline` (the
    /// first-request timeout from the accept), whatever has arrived by then.
    async fn read_loop<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut RequestReader<R>,
        slot: &Slot,
        mut first_deadline: Option<Instant>,
    ) -> End {
        loop {
            let next = reader.next(self.idle_timeout());
            let read = match first_deadline {
                // Cancelling `next` loses nothing that matters: the connection is closed.
                Some(deadline) => match tokio::time::timeout_at(deadline, next).await {
                    Ok(read) => read,
                    Err(_) => return self.no_first_request(slot),
                },
                None => next.await,
            };
            let request = match read {
                Ok(Read::Request(request)) => request,
                Ok(Read::Eof) => return End::Eof,
                // A connection holding a lease is kept, however quiet (its TTL is the limit).
                Ok(Read::Idle) if self.shared.holds_lease(self.conn) => continue,
                Ok(Read::Idle) => {
                    let idle = self.shared.config.idle_timeout;
                    slot.limits().log_idle(idle.as_millis());
                    let error = RemoteError::unavailable(format!(
                        "closing an idle connection: no request, watch or lease for {} ms",
                        idle.as_millis()
                    ));
                    return End::Idle(error.with_code(code::IDLE_TIMEOUT));
                }
                Err(ReadError::Codec(CodecError::Io(e))) => return End::Io(e),
                Err(ReadError::Codec(e)) => return End::Protocol(protocol_error(&e)),
                Err(e @ ReadError::Stalled { .. }) => {
                    slot.limits().log_read_limit(&e);
                    return End::Limit(RemoteError::deadline_exceeded(e.to_string()).with_code(code::FRAME_TIMEOUT));
                }
                Err(e @ ReadError::OverBudget { .. }) => {
                    slot.limits().log_read_limit(&e);
                    return End::Limit(RemoteError::unavailable(e.to_string()).with_code(code::FRAME_BUDGET));
                }
            };
            first_deadline = None;
            if request.id == CONNECTION_ID {
                return End::Protocol(
                    RemoteError::bad_request("request id 0 is reserved for the connection")
                        .with_code(ErrorCode::PROTOCOL),
                );
            }
            if self.handle(request).await.is_err() {
                return End::Dropped;
            }
        }
    }

    /// The end of a connection that sent no complete request within the first-request timeout.
    fn no_first_request(&self, slot: &Slot) -> End {
        let timeout = self.shared.config.first_request_timeout;
        slot.limits().log_first_request(timeout);
        let error = RemoteError::deadline_exceeded(format!(
            "closing a connection that sent no request within {} ms of connecting",
            timeout.as_millis()
        ));
        End::Limit(error.with_code(code::FIRST_REQUEST_TIMEOUT))
    }

    /// How long the next request may keep the client waiting before the
    /// connection counts as idle: only without watches (a watcher may rightly
    /// say nothing for hours), and never with a zero idle timeout.
    fn idle_timeout(&self) -> Option<Duration> {
        let idle = self.shared.config.idle_timeout;
        (self.watches.is_empty() && !idle.is_zero()).then_some(idle)
    }

    /// Forgets the connection's watches and leases, and says goodbye if there is a reason to.
    fn finish(self, end: End) {
        let Session { conn, shared, outbound, watches, counted } = self;
        // One step: whoever sees this connection's instances leave or its watches go also
        // sees it gone from the stats.
        shared.close_connection(conn, &watches);
        counted.disarm();
        match end {
            End::Eof => debug!("connection closed by the client"),
            End::Io(e) => debug!(error = %e, "connection failed"),
            End::Dropped => info!("connection dropped"),
            End::Shutdown => {
                outbound.try_send(ServerMessage::Goodbye(
                    RemoteError::unavailable("the registry is shutting down").with_code(code::SHUTDOWN),
                ));
            }
            End::Protocol(error) => {
                warn!(error = %error, "closing connection: protocol violation");
                outbound.try_send(ServerMessage::Goodbye(error));
            }
            // Logged (rate-limited) where the limit was hit.
            End::Limit(error) | End::Idle(error) => {
                debug!(error = %error, "closing connection: limit reached");
                outbound.try_send(ServerMessage::Goodbye(error));
            }
        }
    }

    async fn handle(&mut self, request: Request) -> Result<(), Gone> {
        let Request { id, op } = request;
        debug!(request.id = id, op = op.name(), "request");
        let result = match op {
            Op::Watch { spec, from_revision } => return self.watch(id, spec, from_revision).await,
            Op::WatchService { service } => return self.watch_service(id, service).await,
            Op::Get { key } => self.check_key(&key).map(|()| {
                let (kv, revision) = self.shared.get(&key);
                Response::Value { kv, revision }
            }),
            Op::Put { key, value } => self.put(key, value),
            Op::Delete { key } => self.check_key(&key).map(|()| Response::Deleted(self.shared.delete(&key))),
            Op::Revision => Ok(Response::Revision(self.shared.revision())),
            Op::CancelWatch { watch_id } => self.cancel_watch(watch_id),
            Op::Register { instance, ttl_ms } => self.register(instance, ttl_ms),
            Op::KeepAlive { lease } => {
                self.shared.keep_alive(self.conn, lease).map(|ttl| Response::KeptAlive { ttl_ms: duration_ms(ttl) })
            }
            Op::Deregister { lease } => self.shared.deregister(self.conn, lease).map(|()| Response::Done),
            Op::Discover { service } => {
                self.check_name("service name", &service).map(|()| Response::Instances(self.shared.discover(&service)))
            }
            Op::Stats => {
                let mut stats = self.shared.stats();
                // The asking connection is not counted.
                stats.connections = stats.connections.saturating_sub(1);
                Ok(Response::Stats(stats))
            }
        };
        if let Err(e) = &result {
            debug!(request.id = id, error = %e, "request refused");
        }
        self.outbound.reply(id, result).await
    }

    fn put(&self, key: String, value: Bytes) -> Result<Response, RemoteError> {
        self.check_key(&key)?;
        let max = self.shared.config.max_value_size;
        if value.len() > max {
            return Err(RemoteError::bad_request(format!(
                "value of {} bytes exceeds the limit of {max} bytes",
                value.len()
            ))
            .with_code(code::VALUE_TOO_LARGE));
        }
        Ok(Response::Revision(self.shared.put(key, value)))
    }

    fn register(&self, instance: Instance, ttl_ms: u64) -> Result<Response, RemoteError> {
        if instance.service.is_empty() || instance.id.is_empty() {
            return Err(RemoteError::bad_request("the service name and the instance id must not be empty")
                .with_code(code::EMPTY_NAME));
        }
        self.check_name("service name", &instance.service)?;
        self.check_name("instance id", &instance.id)?;
        let size = instance.address.len() + instance.metadata.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        let max = self.shared.config.max_value_size;
        if size > max {
            return Err(RemoteError::bad_request(format!(
                "instance address and metadata of {size} bytes exceed the limit of {max} bytes"
            ))
            .with_code(code::INSTANCE_TOO_LARGE));
        }
        let ttl = Duration::from_millis(ttl_ms);
        let (min, max) = (self.shared.config.min_lease_ttl, self.shared.config.max_lease_ttl);
        if ttl < min || ttl > max {
            return Err(RemoteError::bad_request(format!(
                "lease TTL of {ttl_ms} ms is outside the allowed {} ms to {} ms",
                duration_ms(min),
                duration_ms(max)
            ))
            .with_code(code::BAD_TTL));
        }
        debug!(service = %instance.service, instance.id = %instance.id, ttl_ms, "register");
        let lease = self.shared.register(self.conn, instance, ttl);
        Ok(Response::Lease { lease, ttl_ms })
    }

    fn cancel_watch(&mut self, watch_id: RequestId) -> Result<Response, RemoteError> {
        if !self.watches.remove(&watch_id) {
            return Err(RemoteError::bad_request(format!("no watch {watch_id} on this connection"))
                .with_code(code::UNKNOWN_WATCH));
        }
        self.shared.remove_watcher(self.conn, watch_id);
        Ok(Response::Done)
    }

    /// Checks the per-connection limit and the id, then records the watch (not live yet).
    fn admit(&mut self, id: RequestId, target: Target) -> Result<(), RemoteError> {
        let max = self.shared.config.max_watches_per_connection;
        if self.watches.len() >= max {
            return Err(RemoteError::rejected(format!("too many watches: at most {max} per connection"))
                .with_code(code::TOO_MANY_WATCHES));
        }
        if self.watches.contains(&id) {
            return Err(RemoteError::bad_request(format!("watch id {id} is already in use on this connection"))
                .with_code(code::DUPLICATE_WATCH));
        }
        self.shared.add_watcher(self.conn, id, target, self.outbound.events());
        self.watches.insert(id);
        Ok(())
    }

    async fn watch(&mut self, id: RequestId, spec: WatchSpec, from_revision: Option<u64>) -> Result<(), Gone> {
        let admitted = self
            .check_name("watched key or prefix", spec.as_str())
            .and_then(|()| if let WatchSpec::Key(key) = &spec { self.check_key(key) } else { Ok(()) });
        let admitted = admitted.and_then(|()| self.admit(id, Target::Keys(spec)));
        let ok = admitted.is_ok();
        self.outbound.reply(id, admitted.map(|()| Response::Watching)).await?;
        if !ok {
            return Ok(());
        }
        // Replay what the watch missed, chunk by chunk, without holding the lock while
        // waiting for the client; the last step turns it live under the lock.
        let mut from = from_revision.map(|r| r.max(1));
        loop {
            let permit = self.outbound.reserve().await?;
            match self.shared.catch_up(self.conn, id, from, REPLAY_CHUNK, permit) {
                CatchUp::Live => return Ok(()),
                CatchUp::Replay { events, next } => {
                    for event in events {
                        self.outbound.send(ServerMessage::Event { watch_id: id, event }).await?;
                    }
                    from = Some(next);
                }
            }
        }
    }

    async fn watch_service(&mut self, id: RequestId, service: String) -> Result<(), Gone> {
        let admitted =
            self.check_name("service name", &service).and_then(|()| self.admit(id, Target::Service(service)));
        let ok = admitted.is_ok();
        self.outbound.reply(id, admitted.map(|()| Response::Watching)).await?;
        if ok {
            let permit = self.outbound.reserve().await?;
            self.shared.service_live(self.conn, id, permit);
        }
        Ok(())
    }

    fn check_key(&self, key: &str) -> Result<(), RemoteError> {
        if key.is_empty() {
            return Err(RemoteError::bad_request("the key is empty").with_code(code::EMPTY_KEY));
        }
        self.check_name("key", key)
    }

    /// Checks the length of a key-like string (the empty string passes).
    fn check_name(&self, what: &str, name: &str) -> Result<(), RemoteError> {
        let max = self.shared.config.max_key_size;
        if name.len() > max {
            return Err(RemoteError::bad_request(format!(
                "{what} of {} bytes exceeds the limit of {max} bytes",
                name.len()
            ))
            .with_code(code::KEY_TOO_LARGE));
        }
        Ok(())
    }
}

/// The error told to a peer whose bytes could not be read as requests.
fn protocol_error(e: &CodecError) -> RemoteError {
    let message = match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    };
    let code = match e {
        CodecError::TooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
        _ => code::MALFORMED,
    };
    RemoteError::bad_request(message).with_code(code)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The session seen through raw frames, as a misbehaving or minimal peer would see it.
#[cfg(test)]
mod tests {
    use futures::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    use tokio::time::timeout;
    use tokio_util::codec::Framed;

    use super::*;
    use crate::server::{Config, Server, ServerHandle};
    use crate::wire::ServiceEvent;
    use crate::{RegistryClient, Stats};

    const LIMIT: Duration = Duration::from_secs(10);

    type Raw = Framed<TcpStream, Codec<ServerMessage>>;

    async fn start(config: Config) -> ServerHandle {
        Server::bind("127.0.0.1:0", config).await.expect("binds").spawn()
    }

    async fn connect_raw(server: &ServerHandle) -> Raw {
        let stream = TcpStream::connect(server.local_addr()).await.expect("connects");
        let mut raw = Framed::new(stream, Codec::new());
        // Every connection starts with the server's hello.
        let hello = raw.next().await;
        assert!(matches!(hello, Some(Ok(ServerMessage::Hello(_)))), "expected a hello, got {hello:?}");
        raw
    }

    async fn call(raw: &mut Raw, id: RequestId, op: Op) -> Result<Response, RemoteError> {
        raw.send(&Request { id, op }).await.expect("sends");
        match raw.next().await {
            Some(Ok(ServerMessage::Reply(reply))) if reply.id == id => reply.result,
            other => panic!("expected the reply to {id}, got {other:?}"),
        }
    }

    async fn goodbye(raw: &mut Raw) -> RemoteError {
        let message = raw.next().await;
        let Some(Ok(ServerMessage::Goodbye(error))) = message else { panic!("expected a goodbye, got {message:?}") };
        assert!(raw.next().await.is_none(), "the server closes the connection after its goodbye");
        error
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_leaves_when_its_lease_is_not_renewed() {
        timeout(LIMIT * 10, async {
            let server = start(Config::default()).await;
            let watcher = RegistryClient::connect(server.local_addr()).await.expect("connects");
            let mut watch = watcher.watch_service("billing").await.expect("watches");
            let mut raw = connect_raw(&server).await;
            let instance = Instance::new("billing", "b1", "10.0.0.1:80");
            let ttl = Duration::from_secs(3);
            let Ok(Response::Lease { lease, .. }) =
                call(&mut raw, 1, Op::Register { instance: instance.clone(), ttl_ms: 3000 }).await
            else {
                panic!("expected a lease")
            };
            assert_eq!(watch.next().await.expect("event").expect("ok"), ServiceEvent::Join(instance));
            let registered = tokio::time::Instant::now();

            // Renewed once, two seconds in: the lease now ends at 5 s.
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert!(matches!(
                call(&mut raw, 2, Op::KeepAlive { lease }).await,
                Ok(Response::KeptAlive { ttl_ms: 3000 })
            ));

            let leave = watch.next().await.expect("event").expect("ok");
            assert_eq!(leave, ServiceEvent::Leave { service: "billing".into(), id: "b1".into() });
            let elapsed = registered.elapsed();
            assert!(
                elapsed >= Duration::from_secs(2) + ttl && elapsed < Duration::from_secs(6),
                "left after {elapsed:?}"
            );
            assert_eq!(server.stats().instances, 0);
            let renewed = call(&mut raw, 3, Op::KeepAlive { lease }).await;
            assert_eq!(renewed.map_err(|e| e.code), Err(code::UNKNOWN_LEASE));
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn an_oversized_length_prefix_gets_a_goodbye_before_any_allocation() {
        timeout(LIMIT, async {
            let server = start(Config::default()).await;
            let mut raw = connect_raw(&server).await;
            raw.get_mut().write_all(&[0xFF, 0xFF, 0xFF, 0xFF]).await.expect("writes");
            let error = goodbye(&mut raw).await;
            assert_eq!((error.kind, error.code.as_str()), (tandem_protocol::ErrorKind::BadRequest, "frame_too_large"));
            assert!(error.message.contains("4294967295"), "{error}");
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn a_body_that_is_not_a_request_gets_a_goodbye() {
        timeout(LIMIT, async {
            let server = start(Config::default()).await;
            let mut raw = connect_raw(&server).await;
            raw.get_mut().write_all(b"\x00\x00\x00\x03\xc1\xc1\xc1").await.expect("writes");
            let error = goodbye(&mut raw).await;
            assert_eq!((error.kind, error.code.as_str()), (tandem_protocol::ErrorKind::BadRequest, "malformed"));

            let mut raw = connect_raw(&server).await;
            raw.send(&Request { id: CONNECTION_ID, op: Op::Stats }).await.expect("sends");
            assert_eq!(goodbye(&mut raw).await.code, "protocol");

            // The server still serves, and has forgotten both peers.
            let client = RegistryClient::connect(server.local_addr()).await.expect("connects");
            assert_eq!(client.stats().await.expect("stats"), Stats { accepted_total: 3, ..Stats::default() });
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn watch_ids_are_checked_and_cancelled_watches_stay_silent() {
        timeout(LIMIT, async {
            let server = start(Config::default()).await;
            let mut raw = connect_raw(&server).await;
            let watch = Op::Watch { spec: WatchSpec::key("k"), from_revision: None };
            assert_eq!(call(&mut raw, 5, watch.clone()).await, Ok(Response::Watching));
            let progress = raw.next().await.expect("message").expect("decodes");
            assert_eq!(progress, ServerMessage::Progress { watch_id: 5, revision: 1 });
            // Request ids are the client's to choose; reusing a live watch's id is refused.
            assert_eq!(call(&mut raw, 5, watch).await.map_err(|e| e.code), Err(code::DUPLICATE_WATCH));
            assert_eq!(call(&mut raw, 6, Op::CancelWatch { watch_id: 5 }).await, Ok(Response::Done));
            assert_eq!(
                call(&mut raw, 7, Op::CancelWatch { watch_id: 5 }).await.map_err(|e| e.code),
                Err(code::UNKNOWN_WATCH)
            );
            // A put after the cancel: the next message is the put's reply, not an event.
            let put = Op::Put { key: "k".into(), value: Bytes::from_static(b"v") };
            assert_eq!(call(&mut raw, 8, put).await, Ok(Response::Revision(2)));
            assert_eq!(server.stats().watches, 0);
        })
        .await
        .expect("test timed out");
    }
}
