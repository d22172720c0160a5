//! One follower's connection: handshake, then frames in, frames out.
//!
//! ```text
//!  link.rx --> reader loop (this task) --+--> hub (subscribe / unsubscribe)
//!                                       +--> call tasks (one per Invoke / Publish)
//!                                       |        |
//!                      Outbox <---------+--------+   (replies, acks, pings, events)
//!                        |
//!  link.tx <-- writer (batches, flushes once per batch, gives up on a stall)
//! ```
//!
//! The writer is a future polled by this same task, next to the reads: after
//! each burst of frames read, the answers it queued are written at once (write
//! through), with no wake-up of another task. Frames pushed by other tasks
//! (call tasks, the hub's events, status changes) wake this task through the
//! outbox. A follower that stops reading leaves the writer pending on its full
//! socket, under the stall bound, while the reads go on. (As a task of its
//! own, the writer cost a wake-up and a task poll per burst. An earlier inline
//! writer that woke itself through the outbox was slower: a task that wakes
//! itself is requeued, and tokio then wakes the runtime's other worker, three
//! context switches per ping-pong call instead of two.)
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

use futures::{FutureExt, StreamExt};
use tandem_protocol::{
    Ack, ChannelStatus, CodecError, DELIVER_ONE_VERSION, Frame, Invoke, Link, MIRROR_VERSION, Mirrored, Publish,
    RemoteError, RequestId, Response, SubscribeOne, UpstreamState,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admission::Admission;
use crate::channel::Channel;
use crate::erased::BoxFuture;
use crate::outbox::Outbox;
use crate::peer::PeerInfo;
use crate::session_end::{SessionEnd, Violation};
use crate::session_id::SessionId;
use crate::shared::Shared;
use crate::upstream::CallContext;

mod calls;
mod handshake;
mod writer;

use handshake::handshake;
use writer::{forward_status, write_loop};

/// The most frames handled from one read burst before the writer is polled.
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
        let mut writer = std::pin::pin!(writer);
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
                    writer_done = true;
                    break session.outbox.closed_reason().unwrap_or(SessionEnd::OutboxClosed);
                }
                // Polled after every burst of frames read below (the loop
                // comes back here): it writes what the burst queued.
                reason = &mut writer => {
                    writer_done = true;
                    break reason;
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
                    // Handle what else already arrived before the writer is polled.
                    for _ in 0..MAX_BURST {
                        if ended.is_some() {
                            break;
                        }
                        match link.rx.next().now_or_never() {
                            Some(frame) => ended = session.on_read(frame),
                            None => break,
                        }
                    }
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
            let _ = tokio::time::timeout(grace, &mut writer).await;
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

    /// Queues a frame without a wake-up: this task polls the writer once the
    /// burst of frames it handled is done (so one write carries many answers).
    fn push(&mut self, frame: Frame) {
        self.outbox.push_quiet(frame);
    }
}
