//! One follower's connection: handshake, then frames in, frames out.
//!
//! ```text
//!  link.rx --> reader loop (this task) --+--> hub (subscribe / unsubscribe)
//!                                       +--> call tasks (one per Invoke / Publish)
//!                                       |        |
//!                      Outbox <---------+--------+   (replies, acks, pings, events)
//!                        |
//!  link.tx <-- writer task (batches, flushes once per batch, gives up on a stall)
//! ```
//!
//! (Polling the writer inside the session's task instead was tried: no more
//! calls/s, and a slower ping-pong when every process shares one CPU.)
//!
//! Anything wrong with the peer (bad bytes, a protocol violation, silence past
//! the peer timeout, a full outbox) ends this session only, with a log line
//! naming the reason; the leader and the other sessions carry on.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_protocol::ErrorCode;

use tokio::time::Instant;

use bytes::Bytes;
use std::task::{Context, Poll, Waker};

use futures::{FutureExt, SinkExt, StreamExt};
use tandem_protocol::internal::{WriteEnd, WriteLimits, check_hello};
use tandem_protocol::{
    Ack, ChannelStatus, CodecError, DELIVER_ONE_VERSION, Frame, Hello, Invoke, Link, LinkSink, MIRROR_VERSION,
    Mirrored, PROTOCOL_VERSION, Publish, Reject, RemoteError, RequestId, Response, SubscribeOne, UpstreamState,
    Welcome,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admission::{Admission, HelloTooLong};
use crate::channel::Channel;
use crate::erased::BoxFuture;
use crate::fence::Fence;
use crate::outbox::{Batches, Outbox, OutgoingSink};
use crate::session_end::{SessionEnd, Violation};
use crate::session_id::SessionId;
use crate::shared::Shared;
use crate::upstream::CallContext;

/// Who is on the other end of a link, as established by the transport.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The peer's process id, when the transport knows it.
    pub pid: Option<i32>,
    /// The peer's user id, when the transport knows it.
    pub uid: Option<u32>,
    /// How the peer is connected: `unix`, `tcp`, `local` or `messenger`.
    pub transport: &'static str,
    /// Whether the transport already authenticated the peer (in-process links,
    /// links relayed by the cluster master); a trusted peer skips the token check.
    pub trusted: bool,
}

impl PeerInfo {
    /// A peer relayed by a trusted party (the cluster master), with the pid it vouches for.
    pub fn relayed(transport: &'static str, pid: Option<i32>) -> Self {
        PeerInfo { pid, uid: None, transport, trusted: true }
    }
}

/// The most frames handled from one read burst before the writer is woken.
const MAX_BURST: usize = 256;

type InFlight = Arc<Mutex<HashMap<RequestId, CancellationToken>>>;

fn lock_in_flight(in_flight: &InFlight) -> std::sync::MutexGuard<'_, HashMap<RequestId, CancellationToken>> {
    in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs one session to its end. `admission` holds the peer's handshake slot
/// and pre-`Hello` byte limit until its `Hello` is accepted.
pub(crate) async fn run(shared: Arc<Shared>, link: Link, peer: PeerInfo, admission: Admission) {
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!(
        "session",
        follower.id = id,
        pid = peer.pid,
        transport = peer.transport,
        epoch = shared.epoch
    );
    Session::run(shared, id, link, peer, admission).instrument(span).await
}

struct Session {
    shared: Arc<Shared>,
    id: SessionId,
    outbox: Arc<Outbox>,
    /// Looked up for every call and publish; hashed with foldhash (faster
    /// than SipHash on a short name; only names this leader serves are in it).
    channels: HashMap<String, Arc<Channel>, foldhash::fast::RandomState>,
    in_flight: InFlight,
    subscribed: HashSet<(Arc<str>, Bytes)>,
    /// Deliver-to-one subscriptions, by their `SubscribeOne` id.
    ones: HashMap<RequestId, (Arc<Channel>, Bytes)>,
    /// The protocol version spoken on this connection.
    version: u16,
    /// The connection mirrors the leader (version 3).
    mirroring: bool,
    cancel: CancellationToken,
    /// Frames were queued quietly since the writer was last woken.
    wake_writer: bool,
    /// When the current burst of frames was read: the clock is read once per
    /// burst, not per call.
    burst_at: Instant,
    /// Calls of the current burst answered inline, not yet in the latency histogram.
    answered_inline: u64,
}

impl Session {
    async fn run(shared: Arc<Shared>, id: SessionId, mut link: Link, peer: PeerInfo, mut admission: Admission) {
        let (hello, states) = match handshake(&shared, &mut link, &peer).await {
            Ok(accepted) => accepted,
            Err(reason) => {
                let logged = shared.refusals.lock().unwrap_or_else(|p| p.into_inner()).hit();
                match logged {
                    Some(suppressed) => tracing::warn!(reason = %reason, suppressed, "follower refused at handshake"),
                    None => tracing::debug!(reason = %reason, "follower refused at handshake"),
                }
                return;
            }
        };
        admission.admit();
        tracing::debug!(peer.id = %hello.peer_id, hello.pid = hello.pid, channels = ?hello.channels, "follower connected");
        let channels: HashMap<String, Arc<Channel>, _> =
            hello.channels.iter().filter_map(|name| Some((name.clone(), shared.channels.get(name)?.clone()))).collect();
        let outbox = Arc::new(Outbox::new(shared.config.max_queued_frames, shared.config.max_queued_events));
        let cancel = shared.cancel.child_token();
        let fence = shared.fence.clone().map(|fence| (fence, shared.epoch));
        let writer = write_loop(link.tx, outbox.clone(), shared.config.write_stall_timeout, fence);
        let mut writer = tokio::spawn(writer.in_current_span());
        for (channel, state) in states {
            shared.tracker.spawn(forward_status(channel, state, outbox.clone(), cancel.clone()));
        }
        shared.followers.fetch_add(1, Ordering::Relaxed);
        shared.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            crate::FollowerStats {
                id,
                pid: peer.pid.or(i32::try_from(hello.pid).ok()),
                transport: peer.transport.to_owned(),
                channels: hello.channels.clone(),
                mirrors: false,
            },
        );
        let mut session = Session {
            shared,
            id,
            outbox,
            channels,
            in_flight: InFlight::default(),
            subscribed: HashSet::new(),
            ones: HashMap::new(),
            mirroring: false,
            version: hello.version,
            cancel,
            wake_writer: false,
            burst_at: Instant::now(),
            answered_inline: 0,
        };

        let config = &session.shared.config;
        let (heartbeat, peer_timeout) = (config.heartbeat_interval, config.peer_timeout);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_received = Instant::now();
        let mut nonce = 0u64;
        let mut writer_done = false;
        let reason = loop {
            tokio::select! {
                biased;
                _ = session.cancel.cancelled() => {
                    // A fenced leader sends nothing more (its writer checks the fence too).
                    if session.shared.fence.as_ref().is_some_and(|fence| fence.is_fenced()) {
                        break SessionEnd::Fenced;
                    }
                    let goodbye = session.shared.leaving.get().copied().unwrap_or(crate::LeaderGoodbye::ShuttingDown);
                    session.outbox.push(Frame::Goodbye(goodbye.reason().to_string()));
                    break SessionEnd::LeaderLeaving(goodbye);
                }
                _ = session.outbox.wait_closed() => {
                    // Overflow: the follower is not reading; stop writing to it now.
                    writer.abort();
                    writer_done = true;
                    break session.outbox.closed_reason().unwrap_or(SessionEnd::OutboxClosed);
                }
                reason = &mut writer => {
                    writer_done = true;
                    break reason.unwrap_or_else(|e| SessionEnd::WriterFailed(Arc::new(e)));
                }
                frame = link.rx.next() => {
                    if let Some(fence) = &session.shared.fence
                        && !fence.admits(session.shared.epoch)
                    {
                        break SessionEnd::Fenced;
                    }
                    last_received = Instant::now();
                    session.burst_at = last_received;
                    let mut ended = session.on_read(frame);
                    // Handle what else already arrived before waking the writer once.
                    for _ in 0..MAX_BURST {
                        if ended.is_some() {
                            break;
                        }
                        match link.rx.next().now_or_never() {
                            Some(frame) => ended = session.on_read(frame),
                            None => break,
                        }
                    }
                    session.flush_wake();
                    session.record_inline();
                    if let Some(reason) = ended {
                        break reason;
                    }
                }
                _ = ticker.tick() => {
                    let silent = last_received.elapsed();
                    if silent > peer_timeout {
                        break SessionEnd::PeerTimeout { silent, timeout: peer_timeout };
                    }
                    nonce += 1;
                    session.outbox.push(Frame::Ping(nonce));
                }
            }
        };
        session.finish(&reason);
        if !writer_done {
            // Let the writer flush what is queued (a Goodbye, usually), briefly.
            let grace = session.shared.config.shutdown_grace;
            if tokio::time::timeout(grace, &mut writer).await.is_err() {
                writer.abort();
            }
        }
        if reason.is_normal() {
            tracing::debug!(reason = %reason, "follower disconnected");
        } else {
            tracing::warn!(reason = %reason, "follower session ended");
        }
    }

    /// Releases everything the session held.
    fn finish(&mut self, reason: &SessionEnd) {
        self.cancel.cancel();
        let calls = std::mem::take(&mut *lock_in_flight(&self.in_flight));
        self.shared.in_flight.fetch_sub(calls.len(), Ordering::Relaxed);
        for token in calls.into_values() {
            token.cancel();
        }
        // Closed first: the hub's unsubscribes then skip its queue.
        self.outbox.close(reason.clone());
        for (channel, key) in std::mem::take(&mut self.subscribed) {
            if let Some(channel) = self.channels.get(&*channel) {
                channel.hub.unsubscribe(self.id, &key);
            }
        }
        if std::mem::take(&mut self.mirroring) {
            for channel in self.shared.channels.values() {
                channel.hub.unmirror(self.id);
            }
        }
        // What its deliver-to-one subscriptions held goes to the others.
        for (sub, (channel, key)) in std::mem::take(&mut self.ones) {
            channel.hub.unsubscribe_one(self.id, sub, &key);
        }
        self.shared.conflated.fetch_add(self.outbox.conflated(), Ordering::Relaxed);
        self.shared.followers.fetch_sub(1, Ordering::Relaxed);
        self.shared.peers.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }

    /// Channels named after the handshake: each gets its `Status` (a channel
    /// this leader does not serve: `Down` for good, with why).
    fn open(&mut self, names: Vec<String>) {
        for name in names {
            if self.channels.contains_key(&name) {
                continue;
            }
            let Some(channel) = self.shared.channels.get(&name).cloned() else {
                let error = RemoteError::rejected(format!("this leader does not serve channel {name:?}"))
                    .with_code(ErrorCode::CHANNEL);
                let logged = self.shared.refusals.lock().unwrap_or_else(|p| p.into_inner()).hit();
                match logged {
                    Some(suppressed) => {
                        tracing::warn!(channel = %name, suppressed, "a follower opened a channel this leader does not serve")
                    }
                    None => tracing::debug!(channel = %name, "a follower opened a channel this leader does not serve"),
                }
                self.push(Frame::Status(ChannelStatus { channel: name.into(), state: UpstreamState::Down(error) }));
                continue;
            };
            let mut state = channel.state.subscribe();
            let current = state.borrow_and_update().clone();
            self.push(Frame::Status(ChannelStatus { channel: name.clone().into(), state: current }));
            self.shared.tracker.spawn(forward_status(channel.clone(), state, self.outbox.clone(), self.cancel.clone()));
            if let Some(stats) = self.shared.peers.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&self.id) {
                stats.channels.push(name.clone());
            }
            self.channels.insert(name, channel);
        }
    }

    fn channel(&self, name: &str) -> Result<&Arc<Channel>, RemoteError> {
        self.channels.get(name).ok_or_else(|| {
            RemoteError::bad_request(format!("channel {name:?} was not named in Hello or is not served by this leader"))
                .with_code(ErrorCode::CHANNEL)
        })
    }

    /// One read from the link; returns why the session must end, if it must.
    fn on_read(&mut self, frame: Option<Result<Frame, CodecError>>) -> Option<SessionEnd> {
        let reason = match frame {
            None => return Some(SessionEnd::FollowerClosed),
            Some(Err(error)) => SessionEnd::BadFrame(Arc::new(error)),
            Some(Ok(frame)) => self.handle(frame).err()?,
        };
        self.push(Frame::Goodbye(reason.to_string()));
        Some(reason)
    }

    /// Counts the calls the burst answered inline, each as taking the whole
    /// burst (an upper bound: one clock read for all of them).
    fn record_inline(&mut self) {
        let answered = std::mem::take(&mut self.answered_inline);
        if answered > 0 {
            self.shared.call_latency.record_many(self.burst_at.elapsed(), answered);
        }
    }

    /// Wakes the writer if frames were queued quietly.
    fn flush_wake(&mut self) {
        if std::mem::take(&mut self.wake_writer) {
            self.outbox.wake();
        }
    }

    /// Handles one frame; an error ends the session with that reason.
    fn handle(&mut self, frame: Frame) -> Result<(), SessionEnd> {
        match frame {
            Frame::Invoke(invoke) => return self.invoke(invoke),
            Frame::Cancel(id) => {
                if let Some(token) = lock_in_flight(&self.in_flight).remove(&id) {
                    self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                    token.cancel();
                } else if let Some((channel, key)) = self.ones.remove(&id) {
                    // The end of a deliver-to-one subscription (no answer).
                    channel.hub.unsubscribe_one(self.id, id, &key);
                }
            }
            Frame::SubscribeOne(subscribe) if self.version >= DELIVER_ONE_VERSION => {
                let SubscribeOne { id, channel, key, window, ack_timeout_ms } = subscribe;
                match self.channel(&channel).cloned() {
                    Ok(channel) => {
                        if self.ones.contains_key(&id) || lock_in_flight(&self.in_flight).contains_key(&id) {
                            return Err(SessionEnd::ProtocolViolation(Violation::DuplicateRequest(id)));
                        }
                        self.ones.insert(id, (channel.clone(), key.clone()));
                        channel.hub.subscribe_one(self.id, &self.outbox, id, key, window, ack_timeout_ms);
                    }
                    Err(error) => {
                        self.outbox.push(Frame::Ack(Ack { id, result: Err(error) }));
                    }
                }
            }
            Frame::Settle(settle) if self.version >= DELIVER_ONE_VERSION => {
                // A subscription cancelled meanwhile: its deliveries went back already.
                if let Some((channel, key)) = self.ones.get(&settle.sub) {
                    channel.hub.settle(self.id, settle.sub, key, &settle.acked, &settle.released);
                }
            }
            Frame::Mirror(id) if self.version >= MIRROR_VERSION => self.mirror(id),
            Frame::Subscribe(subscribe) => {
                // The hub answers: at once, as pending while the upstream is
                // being (re)built, or with the upstream's own answer.
                match self.channel(&subscribe.channel).cloned() {
                    Ok(channel) => {
                        self.subscribed.insert((channel.name.clone(), subscribe.key.clone()));
                        channel.hub.subscribe(self.id, &self.outbox, subscribe.id, subscribe.key, subscribe.last_seen);
                    }
                    Err(error) => {
                        self.outbox.push(Frame::Ack(Ack { id: subscribe.id, result: Err(error) }));
                    }
                }
            }
            Frame::Unsubscribe(unsubscribe) => {
                let result = self.channel(&unsubscribe.channel).cloned().map(|channel| {
                    self.subscribed.remove(&(channel.name.clone(), unsubscribe.key.clone()));
                    channel.hub.unsubscribe(self.id, &unsubscribe.key);
                });
                self.push(Frame::Ack(Ack { id: unsubscribe.id, result }));
            }
            Frame::Publish(publish) => self.publish(publish),
            Frame::Open(names) => self.open(names),
            Frame::Ping(nonce) => self.push(Frame::Pong(nonce)),
            Frame::Pong(_) => {}
            Frame::Goodbye(reason) => return Err(SessionEnd::FollowerGoodbye(reason)),
            other => return Err(SessionEnd::ProtocolViolation(Violation::Forbidden(other.kind()))),
        }
        Ok(())
    }

    /// Starts mirroring every channel of the leader (PROTOCOL.md §7.2): the
    /// `Ack`, each channel's snapshot, the closing `synced` frame; updates follow.
    fn mirror(&mut self, id: RequestId) {
        if self.mirroring {
            let error =
                RemoteError::bad_request("this connection mirrors the leader already").with_code(ErrorCode::MIRROR);
            self.push(Frame::Ack(Ack { id, result: Err(error) }));
            return;
        }
        self.mirroring = true;
        if let Some(stats) = self.shared.peers.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&self.id) {
            stats.mirrors = true;
        }
        self.push(Frame::Ack(Ack { id, result: Ok(()) }));
        let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for channel in self.shared.channels.values() {
            if !channel.hub.mirror(self.id, &self.outbox, &synced) {
                return;
            }
        }
        // Every snapshot is queued: updates from now on are `synced`.
        synced.store(true, Ordering::Relaxed);
        self.push(Frame::Mirrored(Mirrored { entries: vec![], removed: vec![], synced: true }));
        tracing::info!("a follower mirrors this leader (a standby)");
    }

    /// Queues a frame without waking the writer: the reader wakes it once per
    /// burst of frames it handled (so one write carries many answers).
    fn push(&mut self, frame: Frame) {
        self.outbox.push_quiet(frame);
        self.wake_writer = true;
    }

    /// Answers a call inline (see [`answer`] for what is sent).
    fn respond(&mut self, id: RequestId, oneway: bool, result: Result<Bytes, RemoteError>) {
        if let Some(frame) = answer(self.shared.config.max_frame_length, id, oneway, result) {
            self.push(frame);
        }
    }

    fn invoke(&mut self, invoke: Invoke) -> Result<(), SessionEnd> {
        let Invoke { id, channel, deadline_ms, oneway, payload } = invoke;
        let arrived = self.burst_at;
        let channel = match self.channel(&channel) {
            Ok(channel) => channel.clone(),
            Err(error) => {
                self.respond(id, oneway, Err(error));
                return Ok(());
            }
        };
        let deadline = arrived + Duration::from_millis(u64::from(deadline_ms));
        let ctx = CallContext::until(deadline);
        let context = ctx.clone();
        let mut call: BoxFuture<Result<Bytes, RemoteError>> = match channel.upstream.get() {
            Some(upstream) => upstream.invoke(payload, ctx),
            None => Box::pin(async move {
                let upstream = channel.ready_upstream(deadline).await?;
                upstream.invoke(payload, ctx).await
            }),
        };
        // Fast path: an upstream that answers without waiting (a cache, a local
        // computation) is answered inline, with no task, timer or table entry.
        // Polling with a no-op waker is sound: a pending future re-registers the
        // real waker when the task below polls it again.
        if let Poll::Ready(result) = call.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            self.answered_inline += 1;
            self.respond(id, oneway, result);
            return Ok(());
        }
        // It waits: its cancellation token is needed now (by the table, and by
        // the upstream through `ctx`, which shares it).
        let token = context.cancelled().clone();
        drop(context);
        {
            let mut in_flight = lock_in_flight(&self.in_flight);
            if in_flight.len() >= self.shared.config.max_in_flight {
                drop(in_flight);
                let limit = self.shared.config.max_in_flight;
                self.respond(id, oneway, Err(RemoteError::rejected(format!("more than {limit} calls in flight"))));
                return Ok(());
            }
            if in_flight.contains_key(&id) {
                return Err(SessionEnd::ProtocolViolation(Violation::DuplicateRequest(id)));
            }
            in_flight.insert(id, token.clone());
        }
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let (outbox, in_flight, shared) = (self.outbox.clone(), self.in_flight.clone(), self.shared.clone());
        let session = self.cancel.clone();
        self.shared.tracker.spawn(
            async move {
                let result = tokio::select! {
                    result = tokio::time::timeout_at(deadline, call) => result.unwrap_or_else(|_| {
                        // The caller stops waiting now: so does work the upstream handed off.
                        token.cancel();
                        Err(RemoteError::deadline_exceeded(format!("call took longer than its {deadline_ms} ms deadline")))
                    }),
                    // Cancelled by the follower or its disconnect: nobody waits for an answer.
                    _ = token.cancelled() => return,
                    _ = session.cancelled() => return,
                };
                if lock_in_flight(&in_flight).remove(&id).is_some() {
                    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                    shared.call_latency.record(arrived.elapsed());
                    if let Some(frame) = answer(shared.config.max_frame_length, id, oneway, result) {
                        outbox.push(frame);
                    }
                }
            }
            .in_current_span(),
        );
        Ok(())
    }

    fn publish(&mut self, publish: Publish) {
        let Publish { id, channel, payload } = publish;
        let channel = match self.channel(&channel) {
            Ok(channel) => channel.clone(),
            Err(error) => {
                self.outbox.push(Frame::Ack(Ack { id, result: Err(error) }));
                return;
            }
        };
        // Publishes are bounded too: globally, at 4x the per-follower call limit.
        let in_flight = self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        if in_flight >= self.shared.config.max_in_flight.saturating_mul(4) {
            self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            let error = RemoteError::rejected("too many calls and publishes in flight");
            self.outbox.push(Frame::Ack(Ack { id, result: Err(error) }));
            return;
        }
        let (outbox, cancel, shared) = (self.outbox.clone(), self.cancel.clone(), self.shared.clone());
        let limit = self.shared.config.upstream_timeout;
        self.shared.tracker.spawn(
            async move {
                let deadline = Instant::now() + limit;
                let token = cancel.child_token();
                let ctx = CallContext::with_token(deadline, token.clone());
                let publish = async {
                    let upstream = channel.ready_upstream(deadline).await?;
                    upstream.publish(payload, ctx).await
                };
                tokio::select! {
                    result = tokio::time::timeout_at(deadline, publish) => {
                        let result = result.unwrap_or_else(|_| {
                            token.cancel();
                            Err(RemoteError::deadline_exceeded(format!("publish took longer than {} ms", limit.as_millis())))
                        });
                        outbox.push(Frame::Ack(Ack { id, result }));
                    }
                    _ = cancel.cancelled() => {}
                }
                shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            .in_current_span(),
        );
    }
}

/// The one way a call is answered, inline or from its task: the `Response`
/// (the answer, or a typed error when it would not fit in one frame); for a
/// one-way call nothing, and a failure is logged instead.
fn answer(max_frame: usize, id: RequestId, oneway: bool, result: Result<Bytes, RemoteError>) -> Option<Frame> {
    let result = result.and_then(|bytes| fit_response(max_frame, bytes));
    if !oneway {
        return Some(Frame::Response(Response { id, result }));
    }
    if let Err(error) = result {
        tracing::warn!(request.id = id, %error, "one-way call failed");
    }
    None
}

/// The answer itself, or a typed error if it would not fit in one frame.
fn fit_response(max: usize, bytes: Bytes) -> Result<Bytes, RemoteError> {
    if crate::fits_in_frame(max, &[&bytes]) {
        Ok(bytes)
    } else {
        Err(RemoteError::internal(format!("response of {} bytes exceeds the {max}-byte frame limit", bytes.len()))
            .with_code(ErrorCode::TOO_LARGE))
    }
}

/// The channels a follower named, each with a watch of its upstream state
/// positioned at the state the follower was told.
type ChannelStates = Vec<(Arc<Channel>, watch::Receiver<UpstreamState>)>;

/// Reads and checks the `Hello`; answers `Welcome` and each channel's status, or `Reject`.
async fn handshake(shared: &Shared, link: &mut Link, peer: &PeerInfo) -> Result<(Hello, ChannelStates), SessionEnd> {
    let config = &shared.config;
    let first = match tokio::time::timeout(config.handshake_timeout, link.rx.next()).await {
        Err(_) => return Err(SessionEnd::NoHello(config.handshake_timeout)),
        Ok(None) => return Err(SessionEnd::ClosedBeforeHello),
        Ok(Some(Err(CodecError::Io(error)))) if HelloTooLong::find(&error).is_some() => {
            let error = RemoteError::bad_request(error.to_string()).with_code(ErrorCode::FRAME_TOO_LARGE);
            return Err(reject(link, config.write_stall_timeout, Reject { version: PROTOCOL_VERSION, error }).await);
        }
        Ok(Some(Err(error))) => return Err(SessionEnd::BadHello(Arc::new(error))),
        Ok(Some(Ok(frame))) => frame,
    };
    let hello = match first {
        Frame::Hello(hello) => hello,
        other => {
            let error =
                RemoteError::rejected(format!("expected Hello, got {}", other.kind())).with_code(ErrorCode::PROTOCOL);
            return Err(reject(link, config.write_stall_timeout, Reject { version: PROTOCOL_VERSION, error }).await);
        }
    };
    let token = if peer.trusted { None } else { shared.token.as_deref() };
    let checked = check_hello(&hello, token).and_then(|version| {
        match hello.channels.iter().find(|name| !shared.channels.contains_key(*name)) {
            Some(unknown) => Err(Reject {
                version: PROTOCOL_VERSION,
                error: RemoteError::rejected(format!("this leader does not serve channel {unknown:?}"))
                    .with_code(ErrorCode::CHANNEL),
            }),
            None => Ok(version),
        }
    });
    let version = match checked {
        Ok(version) => version,
        Err(rejection) => return Err(reject(link, config.write_stall_timeout, rejection).await),
    };
    let welcome = Frame::Welcome(Welcome {
        version,
        leader_id: shared.id,
        epoch: shared.epoch,
        pid: std::process::id(),
        heartbeat_ms: u32::try_from(config.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
    });
    // Watch each state BEFORE reading it: a change after this point is seen by
    // `forward_status`, so the follower never misses a transition to Ready.
    let mut states: ChannelStates = Vec::new();
    let mut statuses = Vec::new();
    for name in &hello.channels {
        if let Some(channel) = shared.channels.get(name) {
            let mut state = channel.state.subscribe();
            let current = state.borrow_and_update().clone();
            statuses.push(Frame::Status(ChannelStatus { channel: name.clone().into(), state: current }));
            states.push((channel.clone(), state));
        }
    }
    let send = async {
        link.tx.feed(welcome).await?;
        for status in statuses {
            link.tx.feed(status).await?;
        }
        SinkExt::<Frame>::flush(&mut link.tx).await
    };
    match tokio::time::timeout(config.write_stall_timeout, send).await {
        Ok(Ok(())) => Ok((hello, states)),
        Ok(Err(error)) => Err(SessionEnd::WelcomeFailed(Arc::new(error))),
        Err(_) => Err(SessionEnd::WelcomeStalled),
    }
}

/// Sends a `Reject` (best effort) and returns the reason to log.
async fn reject(link: &mut Link, stall: Duration, rejection: Reject) -> SessionEnd {
    let reason = SessionEnd::Rejected(rejection.error.clone());
    let _ = tokio::time::timeout(stall, link.tx.send(Frame::Reject(rejection))).await;
    reason
}

/// Tells the follower about every change of a channel's upstream state.
async fn forward_status(
    channel: Arc<Channel>,
    mut state: watch::Receiver<UpstreamState>,
    outbox: Arc<Outbox>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = state.borrow_and_update().clone();
                if !outbox.push(Frame::Status(ChannelStatus { channel: channel.name.clone().into(), state: current })) {
                    return;
                }
            }
        }
    }
}

/// Writes batches from the outbox until it closes or the follower stops reading.
async fn write_loop(
    mut tx: LinkSink,
    outbox: Arc<Outbox>,
    stall: Duration,
    fence: Option<(Arc<Fence>, u64)>,
) -> SessionEnd {
    // The stall bound applies to each step, so a big batch to a reader that
    // is slow but still reading is not mistaken for a stalled one.
    let limits = WriteLimits::default().stall(stall);
    let mut batches = Batches::new(outbox.clone(), fence);
    let reason = match tandem_protocol::internal::write_loop(&mut batches, &mut OutgoingSink(&mut tx), limits).await {
        WriteEnd::Finished => {
            let _ = tokio::time::timeout(stall, SinkExt::<Frame>::close(&mut tx)).await;
            return outbox.closed_reason().unwrap_or(SessionEnd::OutboxClosed);
        }
        WriteEnd::Stalled(stall) => SessionEnd::TooSlow(stall),
        WriteEnd::Failed(error) => SessionEnd::WriteFailed(Arc::new(error)),
    };
    outbox.close(reason.clone());
    reason
}
