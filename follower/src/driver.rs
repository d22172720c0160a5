//! The driver: the one task that owns the link to the leader.
//!
//! ```text
//! handles ──Command──> driver ──Frame──> leader
//!    ^                   │  <──Frame───
//!    └── oneshot replies ┤
//!        subscriptions <─┘ (a feed per key: last value kept, a queue per handle)
//! ```
//!
//! The driver connects (with backoff and jitter), says `Hello`, and then turns
//! commands into frames and frames into replies and subscription values. When
//! the link dies it answers every outstanding call with `LeaderLost` at once,
//! keeps every subscription with its last value, reconnects, and resubscribes
//! each key with its last seen (epoch, seq) so the leader sends only newer
//! values. It never delivers a value at or below one already delivered.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use tandem_protocol::{
    Ack, ChannelName, CodecError, Ended, Event, Frame, Hello, Invoke, Link, PROTOCOL_VERSION, Position, Publish,
    RemoteError, RequestId, Response, Subscribe, Unsubscribe, Welcome, WriteEnd, WriteLimits, write_loop,
};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::connector::{Connected, Connector};
use crate::error::StartupFailure;
use crate::feed::{Feed, RawUpdate, Reader};
use crate::in_flight::{InFlight, Pending};
use crate::state::{LinkState, Status};
use crate::{Config, Error, StartupError};
use tandem_protocol::Backoff;

/// How long connecting may keep failing before it is logged at WARN (shorter
/// gaps, such as a failover or a leader still binding, are logged at debug).
const UNREACHABLE_WARN_AFTER: Duration = Duration::from_secs(1);

/// How long to wait before asking again for a subscription the leader refused.
const RESUBSCRIBE_RETRY: Duration = Duration::from_secs(1);

/// What a new subscription handle is made of.
#[derive(Debug)]
pub(crate) struct SubscriptionParts {
    /// The value at the moment the subscription was made; `reader` gets what comes after.
    pub(crate) first: Option<RawUpdate>,
    pub(crate) reader: Reader,
}

type SubscribeReply = oneshot::Sender<Result<SubscriptionParts, Error>>;

/// The most commands, or frames, handled in one wakeup before the frames they
/// produced are flushed.
const MAX_BURST: usize = 256;

/// A request from a handle to the driver.
#[derive(Debug)]
pub(crate) enum Command {
    Invoke {
        id: RequestId,
        channel: &'static str,
        /// When the driver answers the call with [`Error::DeadlineExceeded`]
        /// (carrying `budget`, the time the caller gave it), wherever it is.
        deadline: Instant,
        budget: Duration,
        oneway: bool,
        payload: Bytes,
        reply: Option<oneshot::Sender<Result<Bytes, Error>>>,
    },
    Publish {
        channel: &'static str,
        payload: Bytes,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Subscribe {
        channel: &'static str,
        key: Bytes,
        reply: SubscribeReply,
    },
    /// A subscription handle was dropped (`feed`: the topic it belonged to).
    Unsubscribe {
        channel: &'static str,
        key: Bytes,
        feed: Feed,
    },
    /// An invoke future was dropped before its answer.
    Cancel(RequestId),
    Close(oneshot::Sender<()>),
    /// A client of this channel was made: the connection carries it from now on.
    Open(&'static str),
}

impl Command {
    /// The channel a call, publish or subscribe uses.
    fn channel(&self) -> Option<&'static str> {
        match self {
            Command::Invoke { channel, .. }
            | Command::Publish { channel, .. }
            | Command::Subscribe { channel, .. }
            | Command::Open(channel) => Some(channel),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Remote {
    /// Not subscribed at the current leader (no leader, or its upstream is not ready).
    Unsent,
    /// Subscribe sent with this id, no Ack yet.
    Pending(RequestId),
    /// Acked.
    Active,
}

#[derive(Debug)]
struct Topic {
    last: Option<RawUpdate>,
    /// The newest value and every handle's queue.
    feed: Feed,
    /// Live subscription handles (and callers waiting to get one).
    locals: usize,
    remote: Remote,
    waiters: Vec<SubscribeReply>,
    /// Resubscribed after a reconnect: the leader's first value may be the very
    /// value already delivered, under a new epoch; it is not delivered again.
    resynced: bool,
}

impl Drop for Topic {
    fn drop(&mut self) {
        // Its handles end once they have read what they hold.
        self.feed.close();
    }
}

impl Topic {
    fn parts(&self) -> SubscriptionParts {
        SubscriptionParts { first: self.last.clone(), reader: self.feed.reader() }
    }

    /// Answers the waiters; the ones whose caller gave up release their share.
    fn answer_waiters(&mut self, result: Result<(), Error>) {
        for reply in std::mem::take(&mut self.waiters) {
            let answer = result.clone().map(|()| self.parts());
            let succeeded = answer.is_ok();
            // A refused caller, or one that gave up, holds no share of the topic.
            if reply.send(answer).is_err() || !succeeded {
                self.locals -= 1;
            }
        }
    }
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("cannot reach the leader: {0}")]
    Io(io::Error),
    #[error("{0}")]
    Startup(StartupFailure),
    #[error("the leader rejected this follower: {0}")]
    Rejected(RemoteError),
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("handshake failed: no Welcome within {} ms", .0.as_millis())]
    NoWelcome(Duration),
}

/// The task that owns the connection. Spawn [`Driver::run`] (or use
/// [`NewConnection::spawn`](crate::NewConnection::spawn)); the handles do nothing without it.
#[must_use = "the driver does nothing unless it is run"]
pub struct Driver<C> {
    connector: C,
    commands: mpsc::Receiver<Command>,
    drops: mpsc::UnboundedReceiver<Command>,
    core: Core,
}

impl<C> std::fmt::Debug for Driver<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("peer_id", &self.core.peer_id).finish_non_exhaustive()
    }
}

struct Core {
    config: Config,
    peer_id: Uuid,
    /// The channels this connection carries: first the builder's (named in
    /// every Hello, checked by the leader at the handshake), then those opened
    /// by use (sent as `Open` after each Welcome, so a channel the leader does
    /// not serve is only that channel's error, never a refused Hello).
    channels: Vec<&'static str>,
    /// How many of `channels` came from the builder.
    declared: usize,
    status: watch::Sender<Status>,
    next_id: Arc<AtomicU64>,
    in_flight: InFlight,
    /// Looked up for every event the leader sends: hashed with foldhash
    /// (randomly seeded, several times faster than the default SipHash on a
    /// short key; the keys are this follower's own subscriptions, so a
    /// leader cannot fill it with colliding ones).
    topics: HashMap<(&'static str, Bytes), Topic, foldhash::fast::RandomState>,
    /// Commands that arrived before any leader was reached, or while the
    /// leader was slow to take what was written: they wait, calls until their
    /// deadline.
    queued: Vec<Command>,
    /// The earliest deadline of the calls in `queued`.
    queued_due: Option<Instant>,
    ever_connected: bool,
    max_epoch: u64,
    closed: Option<oneshot::Sender<()>>,
    shut: bool,
    /// Frames to write after the current step.
    out: Vec<Frame>,
    /// When to retry subscriptions the leader refused (its upstream may recover).
    retry_at: Option<Instant>,
    /// The leader of the current (or last) link.
    leader_id: Option<Uuid>,
    /// While set, every call fails at once with this error (a rejection or a
    /// start-up failure) instead of waiting for a leader.
    refusal: Option<Error>,
}

impl<C: Connector> Driver<C> {
    pub(crate) fn new(
        config: Config,
        channels: Vec<&'static str>,
        connector: C,
        commands: mpsc::Receiver<Command>,
        drops: mpsc::UnboundedReceiver<Command>,
        status: watch::Sender<Status>,
        next_id: Arc<AtomicU64>,
    ) -> Self {
        let core = Core {
            config,
            peer_id: Uuid::new_v4(),
            declared: channels.len(),
            channels,
            status,
            next_id,
            in_flight: InFlight::default(),
            topics: HashMap::default(),
            queued: Vec::new(),
            queued_due: None,
            ever_connected: false,
            max_epoch: 0,
            closed: None,
            shut: false,
            out: Vec::new(),
            retry_at: None,
            leader_id: None,
            refusal: None,
        };
        Driver { connector, commands, drops, core }
    }

    /// Runs the connection until it is closed or every handle is dropped.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(self.core.config.reconnect_initial, self.core.config.reconnect_max);
        let mut unreachable_since: Option<Instant> = None;
        let mut warned_unreachable = false;
        let mut last_rejection: Option<RemoteError> = None;
        while !self.core.shut {
            let hello = self.core.hello();
            let named = hello.channels.len();
            let timeout = self.core.config.handshake_timeout;
            let result = {
                let attempt = connect(&mut self.connector, hello, timeout);
                tokio::pin!(attempt);
                loop {
                    tokio::select! {
                        result = &mut attempt => break Some(result),
                        _ = sleep_until(self.core.queued_due) => self.core.expire(Instant::now(), false),
                        command = self.drops.recv() => if let Some(command) = command { self.core.offline(command) },
                        command = self.commands.recv() => match command {
                            Some(command) => self.core.offline(command),
                            None => break None,
                        },
                    }
                    if self.core.shut {
                        break None;
                    }
                }
            };
            let Some(result) = result else { break };
            match result {
                Ok((connected, welcome)) if welcome.epoch >= self.core.max_epoch => {
                    backoff.reset();
                    unreachable_since = None;
                    last_rejection = None;
                    let epoch = welcome.epoch;
                    let reason = self.connected(connected, welcome, named).await;
                    if reason.is_unresponsive() {
                        self.connector.unresponsive(Some(epoch));
                    }
                    self.core.lost(&reason);
                    continue;
                }
                Ok((_, welcome)) => {
                    tracing::warn!(
                        epoch = welcome.epoch,
                        seen = self.core.max_epoch,
                        "refusing a leader older than one already seen"
                    );
                }
                Err(ConnectError::Rejected(error)) => {
                    // PROTOCOL.md: a rejected follower SHOULD NOT retry the same hello.
                    if last_rejection.as_ref() != Some(&error) {
                        tracing::error!(%error, "the leader rejected this follower; not retrying until the leader changes");
                    } else {
                        tracing::debug!(%error, "the leader rejected this follower again");
                    }
                    last_rejection = Some(error.clone());
                    self.core.refuse(Error::Rejected(error.clone()), LinkState::Rejected(error));
                    let Driver { connector, commands, drops, core } = &mut self;
                    idle_until(commands, drops, core, connector.new_leader()).await;
                    self.core.refusal = None;
                    if !self.core.shut {
                        self.core.status.send_modify(|status| status.link = LinkState::Connecting);
                    }
                    continue;
                }
                Err(ConnectError::Startup(failure)) => {
                    tracing::error!(error = %failure, "cannot start: no leader can be reached with these settings");
                    self.core.refuse(Error::Startup(failure.clone()), LinkState::Failed(failure));
                    let Driver { commands, drops, core, .. } = &mut self;
                    idle_until(commands, drops, core, std::future::pending()).await;
                    break;
                }
                Err(error) => {
                    if matches!(error, ConnectError::NoWelcome(_)) {
                        self.connector.unresponsive(None);
                    }
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if !warned_unreachable && since.elapsed() >= UNREACHABLE_WARN_AFTER {
                        warned_unreachable = true;
                        tracing::warn!(error = %error, "connecting to the leader keeps failing; retrying");
                    } else {
                        tracing::debug!(error = %error, "connecting to the leader failed");
                    }
                }
            }
            self.idle(backoff.next_delay()).await;
        }
        self.core.shutdown();
    }

    /// Waits out a backoff delay while still answering commands.
    async fn idle(&mut self, delay: Duration) {
        let Driver { commands, drops, core, .. } = self;
        idle_until(commands, drops, core, tokio::time::sleep(delay)).await;
    }

    /// Serves one link until it dies; returns why. The Hello named the first
    /// `named` channels (the builder's); the others are opened now.
    async fn connected(&mut self, connected: Connected, welcome: Welcome, named: usize) -> LinkEnd {
        let Connected { mut link, is_leader } = connected;
        let core = &mut self.core;
        if welcome.epoch == core.max_epoch && core.leader_id.is_some_and(|id| id != welcome.leader_id) {
            // A different leader with the same epoch: its positions restart, so
            // ordering against the old ones is meaningless. Accept its values.
            tracing::warn!(epoch = welcome.epoch, "a new leader reused the epoch; give each leader a higher epoch");
            for topic in core.topics.values_mut() {
                topic.last = None;
            }
        }
        core.leader_id = Some(welcome.leader_id);
        core.max_epoch = welcome.epoch;
        core.ever_connected = true;
        core.status.send_modify(|status| {
            status.link = LinkState::Connected { epoch: welcome.epoch, leader_pid: welcome.pid, is_leader };
            status.channels.clear();
        });
        tracing::debug!(epoch = welcome.epoch, leader.pid = welcome.pid, is_leader, "connected to the leader");
        if let Some(late) = core.channels.get(named..).filter(|late| !late.is_empty()) {
            core.out.push(Frame::Open(late.iter().map(|c| c.to_string()).collect()));
        }
        core.send_queued();
        let stall = core.config.peer_timeout;
        if let Err(failed) = self.flush(&mut link, stall).await {
            return LinkEnd::Write(failed);
        }
        let heartbeat = Duration::from_millis(u64::from(welcome.heartbeat_ms.max(10)));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_received = Instant::now();
        let mut heard = false;
        let mut nonce = 0u64;
        // The calls' deadlines, one timer for all: armed for the earliest,
        // moved only when a call expires sooner (answered calls leave their
        // deadline behind, so it may fire for nothing once per deadline).
        let far = tokio::time::Instant::now() + FAR;
        let expiry = tokio::time::sleep_until(far);
        tokio::pin!(expiry);
        let mut armed = far;
        loop {
            if let Some(due) = self.core.in_flight.earliest_deadline().filter(|due| *due < armed) {
                armed = due;
                expiry.as_mut().reset(due);
            }
            tokio::select! {
                biased;
                command = self.drops.recv() => if let Some(command) = command { self.core.online(command, Instant::now()) },
                command = self.commands.recv() => match command {
                    Some(command) => {
                        // One clock read for the batch: deadlines are counted from here.
                        let now = Instant::now();
                        self.core.online(command, now);
                        // Batch whatever else is already queued into the same flush.
                        for _ in 0..MAX_BURST {
                            match self.commands.try_recv() {
                                Ok(command) => self.core.online(command, now),
                                Err(_) => break,
                            }
                        }
                    }
                    None => self.core.shut = true,
                },
                frame = link.rx.next() => {
                    // Silence is measured from the tick that saw no frame at
                    // all: no clock read per frame.
                    heard = true;
                    if let Err(reason) = self.core.on_read(frame) {
                        return reason;
                    }
                    // Handle what else already arrived in the same wakeup.
                    for _ in 0..MAX_BURST {
                        let Some(frame) = link.rx.next().now_or_never() else { break };
                        if let Err(reason) = self.core.on_read(frame) {
                            return reason;
                        }
                    }
                }
                _ = sleep_until(self.core.retry_at) => {
                    self.core.retry_at = None;
                    self.core.resubscribe_all();
                }
                () = &mut expiry => {
                    self.core.expire(Instant::now(), true);
                    armed = self.core.in_flight.earliest_deadline().unwrap_or(far);
                    expiry.as_mut().reset(armed);
                }
                _ = ticker.tick() => {
                    if std::mem::take(&mut heard) {
                        last_received = Instant::now();
                    }
                    let silent = last_received.elapsed();
                    if silent > self.core.config.peer_timeout {
                        return LinkEnd::Silent(silent);
                    }
                    nonce += 1;
                    self.core.out.push(Frame::Ping(nonce));
                }
            }
            if self.core.shut {
                self.core.out.push(Frame::Goodbye("follower closing".into()));
                let grace = self.core.config.handshake_timeout;
                let _ = flush(&mut link, &mut self.core.out, grace).await;
                let _ = tokio::time::timeout(grace, SinkExt::<Frame>::close(&mut link.tx)).await;
                return LinkEnd::Closed;
            }
            if let Err(failed) = self.flush(&mut link, stall).await {
                return LinkEnd::Write(failed);
            }
        }
    }

    /// Writes the queued frames, giving up after `stall` without progress,
    /// and keeps every call's deadline meanwhile: a leader slow to take bytes
    /// holds no caller past its deadline. Commands that arrive meanwhile wait
    /// in `queued` (no more than the command queue holds) and are sent next.
    async fn flush(&mut self, link: &mut Link, stall: Duration) -> Result<(), WriteFailed> {
        let capacity = self.core.config.command_queue.max(1);
        while !self.core.out.is_empty() {
            let mut batch = std::mem::take(&mut self.core.out);
            let result = {
                let write = flush(link, &mut batch, stall);
                tokio::pin!(write);
                loop {
                    let due = self.core.next_deadline();
                    let room = !self.core.shut && self.core.queued.len() < capacity;
                    tokio::select! {
                        biased;
                        result = &mut write => break result,
                        _ = sleep_until(due) => self.core.expire(Instant::now(), true),
                        command = self.commands.recv(), if room => match command {
                            Some(command) => self.core.hold(command),
                            None => self.core.shut = true,
                        },
                    }
                }
            };
            result?;
            // Frames made meanwhile (cancels of expired calls) go out next, in
            // the same allocation.
            batch.append(&mut self.core.out);
            self.core.out = batch;
            self.core.send_queued();
        }
        Ok(())
    }
}

/// Beyond any deadline: where the call timer rests with no call in flight.
const FAR: Duration = Duration::from_secs(86_400 * 365);

/// Writes the queued frames, giving up after `stall` without progress (a
/// leader that stopped reading must not stop this driver's heartbeats).
/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn flush(link: &mut Link, out: &mut Vec<Frame>, stall: Duration) -> Result<(), WriteFailed> {
    match write_loop(&mut out.drain(..), &mut link.tx, WriteLimits::default().stall(stall)).await {
        WriteEnd::Finished => Ok(()),
        WriteEnd::Failed(error) => Err(WriteFailed::Write(error)),
        WriteEnd::Stalled(stall) => Err(WriteFailed::Stalled(stall)),
    }
}

/// Why the frames queued for the leader were not all written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteFailed {
    #[error("write to the leader failed: {0}")]
    Write(#[source] CodecError),
    #[error("the leader accepted no bytes for {} ms", .0.as_millis())]
    Stalled(Duration),
}

/// Why a link to the leader ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkEnd {
    #[error("the leader closed the connection")]
    LeaderClosed,
    #[error("bad frame from the leader: {0}")]
    BadFrame(#[source] CodecError),
    #[error("the leader said goodbye: {0}")]
    Goodbye(String),
    #[error("protocol violation: a leader may not send {0} now")]
    Unexpected(&'static str),
    #[error("no frame from the leader for {} ms", .0.as_millis())]
    Silent(Duration),
    #[error(transparent)]
    Write(WriteFailed),
    /// This follower closed the connection on purpose.
    #[error("closed")]
    Closed,
}

impl LinkEnd {
    /// The leader stopped answering (silent, or taking no bytes), as opposed
    /// to closing or misbehaving.
    fn is_unresponsive(&self) -> bool {
        matches!(self, LinkEnd::Silent(_) | LinkEnd::Write(WriteFailed::Stalled(_)))
    }
}

/// Answers commands offline until `until` resolves, the handles are gone or the
/// connection is closed.
async fn idle_until(
    commands: &mut mpsc::Receiver<Command>,
    drops: &mut mpsc::UnboundedReceiver<Command>,
    core: &mut Core,
    until: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => return,
            _ = sleep_until(core.queued_due) => core.expire(Instant::now(), false),
            command = drops.recv() => if let Some(command) = command { core.offline(command) },
            command = commands.recv() => match command {
                Some(command) => core.offline(command),
                None => { core.shut = true; return }
            },
        }
        if core.shut {
            return;
        }
    }
}

/// Establishes a link and performs the handshake.
async fn connect<C: Connector>(
    connector: &mut C,
    hello: Hello,
    timeout: Duration,
) -> Result<(Connected, Welcome), ConnectError> {
    let mut connected = connector.connect().await.map_err(|error| match StartupError::from_io(error) {
        Ok(failure) => ConnectError::Startup(failure),
        Err(error) => ConnectError::Io(error),
    })?;
    let handshake = async {
        connected.link.tx.send(Frame::Hello(hello)).await.map_err(|e| ConnectError::Handshake(e.to_string()))?;
        match connected.link.rx.next().await {
            Some(Ok(Frame::Welcome(welcome))) => Ok(welcome),
            Some(Ok(Frame::Reject(reject))) => Err(ConnectError::Rejected(reject.error)),
            Some(Ok(other)) => Err(ConnectError::Handshake(format!("expected Welcome, got {}", other.kind()))),
            Some(Err(error)) => Err(ConnectError::Handshake(error.to_string())),
            None => Err(ConnectError::Handshake("the leader closed the connection".into())),
        }
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(welcome)) => Ok((connected, welcome)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(ConnectError::NoWelcome(timeout)),
    }
}

impl Core {
    fn hello(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            peer_id: self.peer_id,
            pid: std::process::id(),
            channels: self.channels[..self.declared].iter().map(|c| c.to_string()).collect(),
            token: self.config.token.clone(),
        }
    }

    fn next_id(&self) -> RequestId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether subscriptions of the channel go to the leader now: once it said
    /// how its upstream is (the leader accepts them while the upstream is down,
    /// as pending, and serves its last-known-good values meanwhile).
    fn channel_ready(&self, channel: &str) -> bool {
        self.status.borrow().channels.contains_key(channel)
    }

    /// Makes `channel` part of this connection: opened at once (`Open`, before
    /// the frame that uses it) when connected, and after every later Welcome.
    fn open(&mut self, channel: &'static str, connected: bool) {
        if self.channels.contains(&channel) {
            return;
        }
        tracing::debug!(channel, "channel opened");
        self.channels.push(channel);
        if connected {
            self.out.push(Frame::Open(vec![channel.to_string()]));
        }
    }

    fn static_channel(&self, name: &str) -> Option<&'static str> {
        self.channels.iter().copied().find(|c| *c == name)
    }

    /// A command while no leader is connected.
    fn offline(&mut self, command: Command) {
        if let Some(channel) = command.channel() {
            self.open(channel, false);
        }
        match command {
            Command::Cancel(id) => {
                self.queued.retain(|c| !matches!(c, Command::Invoke { id: queued, .. } if *queued == id));
            }
            Command::Unsubscribe { channel, key, feed } => self.release(channel, key, &feed),
            Command::Close(done) => {
                self.closed = Some(done);
                self.shut = true;
            }
            Command::Open(_) => {}
            command if self.refusal.is_some() => {
                let error = self.refusal.clone().unwrap_or(Error::LeaderLost);
                match command {
                    Command::Invoke { reply: Some(reply), .. } => {
                        let _ = reply.send(Err(error));
                    }
                    Command::Publish { reply, .. } => {
                        let _ = reply.send(Err(error));
                    }
                    Command::Subscribe { reply, .. } => {
                        let _ = reply.send(Err(error));
                    }
                    _ => {}
                }
            }
            command if !self.ever_connected => self.hold(command),
            // The leader was lost: fail fast rather than leave callers waiting.
            Command::Invoke { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(Error::LeaderLost));
                }
            }
            Command::Publish { reply, .. } => {
                let _ = reply.send(Err(Error::LeaderLost));
            }
            Command::Subscribe { reply, .. } => {
                let _ = reply.send(Err(Error::LeaderLost));
            }
        }
    }

    /// No hello will be sent for now: every call fails with `error`.
    fn refuse(&mut self, error: Error, link: LinkState) {
        self.fail_queued(&error);
        self.refusal = Some(error);
        self.status.send_modify(|status| {
            status.link = link;
            status.channels.clear();
        });
    }

    /// Keeps `command` for when a link can take it.
    fn hold(&mut self, command: Command) {
        if let Command::Invoke { deadline, reply: Some(_), .. } = &command {
            self.queued_due = Some(self.queued_due.map_or(*deadline, |due| due.min(*deadline)));
        }
        self.queued.push(command);
    }

    fn take_queued(&mut self) -> Vec<Command> {
        self.queued_due = None;
        std::mem::take(&mut self.queued)
    }

    /// Hands the commands kept for a link to the connected one.
    fn send_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let now = Instant::now();
        for command in self.take_queued() {
            self.online(command, now);
        }
    }

    /// When the next waiting call expires, queued or in flight.
    fn next_deadline(&mut self) -> Option<Instant> {
        match (self.in_flight.earliest_deadline(), self.queued_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Answers the calls whose deadline is at or before `now` with
    /// [`Error::DeadlineExceeded`], queued ones and (cancelled at the leader
    /// when `connected`) those in flight.
    fn expire(&mut self, now: Instant, connected: bool) {
        let mut expired = Vec::new();
        self.in_flight.expire(now, &mut expired);
        if connected {
            self.out.extend(expired.into_iter().map(Frame::Cancel));
        }
        if self.queued_due.is_none_or(|due| due > now) {
            return;
        }
        let late = |command: &mut Command| matches!(command, Command::Invoke { deadline, .. } if *deadline <= now);
        for command in self.queued.extract_if(.., late) {
            if let Command::Invoke { reply: Some(reply), budget, .. } = command {
                let _ = reply.send(Err(Error::DeadlineExceeded(budget)));
            }
        }
        self.queued_due = self
            .queued
            .iter()
            .filter_map(|command| match command {
                Command::Invoke { deadline, reply: Some(_), .. } => Some(*deadline),
                _ => None,
            })
            .min();
    }

    fn fail_queued(&mut self, error: &Error) {
        for command in self.take_queued() {
            match command {
                Command::Invoke { reply: Some(reply), .. } => {
                    let _ = reply.send(Err(error.clone()));
                }
                Command::Publish { reply, .. } => {
                    let _ = reply.send(Err(error.clone()));
                }
                Command::Subscribe { reply, .. } => {
                    let _ = reply.send(Err(error.clone()));
                }
                _ => {}
            }
        }
    }

    /// A command while connected (`now`: when its batch was taken): may queue frames in `out`.
    fn online(&mut self, command: Command, now: Instant) {
        if let Some(channel) = command.channel() {
            self.open(channel, true);
        }
        match command {
            Command::Invoke { id, channel, deadline, budget, oneway, payload, reply } => {
                if reply.as_ref().is_some_and(|r| r.is_closed()) {
                    return; // the caller dropped the call before it was sent
                }
                let Some(left) = deadline.checked_duration_since(now).filter(|d| !d.is_zero()) else {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(Error::DeadlineExceeded(budget)));
                    }
                    return;
                };
                if let Some(reply) = reply {
                    self.in_flight.insert(id, Pending::Invoke { reply, deadline, budget });
                }
                let deadline_ms = u32::try_from(left.as_millis().max(1)).unwrap_or(u32::MAX);
                self.out.push(Frame::Invoke(Invoke {
                    id,
                    channel: ChannelName::from_static(channel),
                    deadline_ms,
                    oneway,
                    payload,
                }));
            }
            Command::Publish { channel, payload, reply } => {
                let id = self.next_id();
                self.in_flight.insert(id, Pending::Publish(reply));
                self.out.push(Frame::Publish(Publish { id, channel: ChannelName::from_static(channel), payload }));
            }
            Command::Subscribe { channel, key, reply } => self.subscribe(channel, key, reply),
            Command::Unsubscribe { channel, key, feed } => self.release(channel, key, &feed),
            Command::Cancel(id) => {
                if self.in_flight.remove(id).is_some() {
                    self.out.push(Frame::Cancel(id));
                }
            }
            Command::Close(done) => {
                self.closed = Some(done);
                self.shut = true;
            }
            Command::Open(_) => {}
        }
    }

    fn subscribe(&mut self, channel: &'static str, key: Bytes, reply: SubscribeReply) {
        let ready = self.channel_ready(channel);
        let capacity = self.config.subscription_buffer.max(1);
        let topic = self.topics.entry((channel, key.clone())).or_insert_with(|| Topic {
            last: None,
            feed: Feed::new(capacity),
            locals: 0,
            remote: Remote::Unsent,
            waiters: Vec::new(),
            resynced: false,
        });
        topic.locals += 1;
        if topic.remote == Remote::Active {
            if reply.send(Ok(topic.parts())).is_err() {
                topic.locals -= 1;
            }
            return;
        }
        topic.waiters.push(reply);
        if topic.remote == Remote::Unsent && ready {
            let last_seen = topic.last.as_ref().map(|u| u.position);
            self.send_subscribe(channel, key, last_seen);
        }
    }

    fn send_subscribe(&mut self, channel: &'static str, key: Bytes, last_seen: Option<Position>) {
        let id = self.next_id();
        if let Some(topic) = self.topics.get_mut(&(channel, key.clone())) {
            topic.remote = Remote::Pending(id);
            topic.resynced = last_seen.is_some();
        }
        self.in_flight.insert(id, Pending::Subscribe { channel, key: key.clone() });
        self.out.push(Frame::Subscribe(Subscribe { id, channel: ChannelName::from_static(channel), key, last_seen }));
    }

    /// One subscription handle let go of a topic (not of one the leader ended:
    /// those handles hold no share of a topic made again for the same key).
    fn release(&mut self, channel: &'static str, key: Bytes, feed: &Feed) {
        let topic_key = (channel, key);
        let Some(topic) = self.topics.get_mut(&topic_key).filter(|topic| topic.feed.same(feed)) else { return };
        topic.locals = topic.locals.saturating_sub(1);
        if topic.locals > 0 {
            return;
        }
        let remote = topic.remote;
        self.topics.remove(&topic_key);
        if remote != Remote::Unsent && matches!(self.status.borrow().link, LinkState::Connected { .. }) {
            let id = self.next_id();
            self.in_flight.insert(id, Pending::Unsubscribe);
            self.out.push(Frame::Unsubscribe(Unsubscribe {
                id,
                channel: ChannelName::from_static(channel),
                key: topic_key.1,
            }));
        }
    }

    /// One read from the link; an error (or its end) ends the link, with why.
    fn on_read(&mut self, frame: Option<Result<Frame, CodecError>>) -> Result<(), LinkEnd> {
        match frame {
            None => Err(LinkEnd::LeaderClosed),
            Some(Err(error)) => Err(LinkEnd::BadFrame(error)),
            Some(Ok(frame)) => self.on_frame(frame),
        }
    }

    /// A frame from the leader; an error ends the link.
    fn on_frame(&mut self, frame: Frame) -> Result<(), LinkEnd> {
        match frame {
            Frame::Response(Response { id, result }) => {
                if let Some(Pending::Invoke { reply, .. }) = self.in_flight.remove(id) {
                    let _ = reply.send(result.map_err(Error::Remote));
                }
            }
            Frame::Ack(Ack { id, result }) => match self.in_flight.remove(id) {
                Some(Pending::Publish(reply)) => {
                    let _ = reply.send(result.map_err(Error::Remote));
                }
                Some(Pending::Subscribe { channel, key }) => self.on_subscribed(id, channel, key, result),
                _ => {}
            },
            Frame::Event(event) => self.on_event(event),
            Frame::Ended(ended) => self.on_ended(ended),
            Frame::Status(status) => {
                let Some(channel) = self.static_channel(&status.channel) else { return Ok(()) };
                let state = status.state;
                tracing::debug!(channel, state = ?state, "upstream state");
                self.status.send_modify(|s| {
                    s.channels.insert(channel.to_string(), state);
                });
                // Any state lets subscriptions through (the leader decides).
                self.resubscribe(channel);
            }
            Frame::Ping(nonce) => self.out.push(Frame::Pong(nonce)),
            Frame::Pong(_) => {}
            Frame::Goodbye(reason) => return Err(LinkEnd::Goodbye(reason)),
            other => return Err(LinkEnd::Unexpected(other.kind())),
        }
        Ok(())
    }

    fn on_subscribed(&mut self, id: RequestId, channel: &'static str, key: Bytes, result: Result<(), RemoteError>) {
        let topic_key = (channel, key);
        let Some(topic) = self.topics.get_mut(&topic_key) else { return };
        if topic.remote != Remote::Pending(id) {
            return;
        }
        match result {
            Ok(()) => {
                topic.remote = Remote::Active;
                topic.answer_waiters(Ok(()));
            }
            Err(error) => {
                tracing::warn!(channel, %error, "subscribe refused by the leader");
                topic.remote = Remote::Unsent;
                topic.answer_waiters(Err(Error::Remote(error)));
                if topic.locals > 0 && self.retry_at.is_none() {
                    // Live subscriptions must not stall: ask again shortly.
                    self.retry_at = Some(Instant::now() + RESUBSCRIBE_RETRY);
                }
            }
        }
        if topic.locals == 0 {
            let remote = topic.remote;
            self.topics.remove(&topic_key);
            if remote == Remote::Active {
                let id = self.next_id();
                self.in_flight.insert(id, Pending::Unsubscribe);
                self.out.push(Frame::Unsubscribe(Unsubscribe {
                    id,
                    channel: ChannelName::from_static(channel),
                    key: topic_key.1,
                }));
            }
        }
    }

    /// The leader ended a subscription: its streams end (after what they
    /// hold), with the reason, and the topic is forgotten (a new `subscribe`
    /// starts afresh). Only an active one: an `Ended` sent before this
    /// follower let go of the key and asked again is for the old subscription.
    fn on_ended(&mut self, ended: Ended) {
        let Some(channel) = self.static_channel(&ended.channel) else { return };
        let topic_key = (channel, ended.key);
        if !self.topics.get(&topic_key).is_some_and(|topic| topic.remote == Remote::Active) {
            return;
        }
        let Some(mut topic) = self.topics.remove(&topic_key) else { return };
        tracing::warn!(channel, error = %ended.error, "the leader ended a subscription");
        topic.feed.end(ended.error.clone());
        topic.answer_waiters(Err(Error::Remote(ended.error)));
        // Dropping the topic closes its feed: every stream of it ends once drained.
    }

    fn on_event(&mut self, event: Event) {
        let Some(channel) = self.static_channel(&event.channel) else { return };
        let position = event.position();
        let Some(topic) = self.topics.get_mut(&(channel, event.key)) else { return };
        // Exactly-once, in order: anything at or below what was delivered is a replay.
        if topic.last.as_ref().is_some_and(|last| last.position >= position) {
            return;
        }
        let resynced = std::mem::take(&mut topic.resynced);
        let update = RawUpdate { position, payload: event.payload, cached: event.cached };
        // (A live value never hides behind a cached copy of itself: it is delivered.)
        if resynced
            && topic.last.as_ref().is_some_and(|last| last.payload == update.payload && (update.cached || !last.cached))
        {
            // The same value, re-announced by a new leader: move the position on, deliver nothing.
            topic.last = Some(update.clone());
            topic.feed.set(update);
            return;
        }
        topic.last = Some(update.clone());
        topic.feed.publish(update);
    }

    fn resubscribe_all(&mut self) {
        for channel in self.channels.clone() {
            if self.channel_ready(channel) {
                self.resubscribe(channel);
            }
        }
    }

    fn resubscribe(&mut self, channel: &'static str) {
        let unsent: Vec<(Bytes, Option<Position>)> = self
            .topics
            .iter()
            .filter(|((c, _), topic)| *c == channel && topic.remote == Remote::Unsent)
            .map(|((_, key), topic)| (key.clone(), topic.last.as_ref().map(|u| u.position)))
            .collect();
        for (key, last_seen) in unsent {
            self.send_subscribe(channel, key, last_seen);
        }
    }

    /// The link died: answer every outstanding call, keep subscriptions for later.
    fn lost(&mut self, reason: &LinkEnd) {
        self.out.clear();
        self.retry_at = None;
        self.in_flight.fail_all(&Error::LeaderLost);
        self.topics.retain(|_, topic| {
            topic.remote = Remote::Unsent;
            topic.answer_waiters(Err(Error::LeaderLost));
            topic.locals > 0
        });
        if self.shut {
            return;
        }
        tracing::warn!(reason = %tandem_protocol::error_chain(reason), "lost the leader; reconnecting");
        self.status.send_modify(|status| {
            status.link = LinkState::LeaderLost;
            status.channels.clear();
        });
    }

    fn shutdown(&mut self) {
        self.shut = true;
        self.fail_queued(&Error::Closed);
        self.in_flight.fail_all(&Error::Closed);
        self.topics.clear();
        self.status.send_modify(|status| {
            status.link = LinkState::Closed;
            status.channels.clear();
        });
        if let Some(done) = self.closed.take() {
            let _ = done.send(());
        }
    }
}
