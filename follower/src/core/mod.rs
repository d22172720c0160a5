//! The driver's core: everything the driver knows and decides, with no I/O.
//! Commands from the handles and frames from the leader go in; frames to
//! write (`out`), replies, and subscription values come out.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tandem_leader::LeaderGoodbye;
use tandem_protocol::{
    Ack, ChannelName, CodecError, Ended, Event, Frame, Hello, Invoke, PROTOCOL_VERSION, Position, Publish, RemoteError,
    RequestId, Response, Subscribe, Unsubscribe,
};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use uuid::Uuid;

use crate::command::{Command, SubscribeReply};
use crate::feed::{Feed, RawUpdate};
use crate::in_flight::{InFlight, Pending};
use crate::link_end::LinkEnd;
use crate::mirror::MirrorLink;
use crate::one::{Ones, Step};
use crate::remote::Remote;
use crate::shared::Shared;
use crate::slots::{Mode, Slots, is_slot_id};
use crate::state::{LinkState, Status};
use crate::topic::Topic;
use crate::{Config, Error};

mod subscriptions;

/// How long to wait before asking again for a subscription the leader refused.
const RESUBSCRIBE_RETRY: Duration = Duration::from_secs(1);

pub(crate) struct Core {
    pub(crate) config: Config,
    pub(crate) peer_id: Uuid,
    /// The channels this connection carries: first the builder's (named in
    /// every Hello, checked by the leader at the handshake), then those opened
    /// by use (sent as `Open` after each Welcome, so a channel the leader does
    /// not serve is only that channel's error, never a refused Hello).
    pub(crate) channels: Vec<&'static str>,
    /// How many of `channels` came from the builder.
    pub(crate) declared: usize,
    pub(crate) status: watch::Sender<Status>,
    pub(crate) next_id: Arc<AtomicU64>,
    pub(crate) in_flight: InFlight,
    /// The calls of the slots path: their slots, deadlines and answers.
    pub(crate) slots: Arc<Slots>,
    /// Looked up for every event the leader sends: hashed with foldhash
    /// (randomly seeded, several times faster than the default SipHash on a
    /// short key; the keys are this follower's own subscriptions, so a
    /// leader cannot fill it with colliding ones).
    pub(crate) topics: HashMap<(&'static str, Bytes), Topic, foldhash::fast::RandomState>,
    /// Commands that arrived before any leader was reached, or while the
    /// leader was slow to take what was written: they wait, calls until their
    /// deadline.
    pub(crate) queued: Vec<Command>,
    /// The earliest deadline of the calls in `queued`.
    pub(crate) queued_due: Option<Instant>,
    pub(crate) ever_connected: bool,
    pub(crate) max_epoch: u64,
    pub(crate) closed: Option<oneshot::Sender<()>>,
    pub(crate) shut: bool,
    /// Frames to write after the current step.
    pub(crate) out: Vec<Frame>,
    /// When to retry subscriptions the leader refused (its upstream may recover).
    pub(crate) retry_at: Option<Instant>,
    /// The leader of the current (or last) link.
    pub(crate) leader_id: Option<Uuid>,
    /// While set, every call fails at once with this error (a rejection or a
    /// start-up failure) instead of waiting for a leader.
    pub(crate) refusal: Option<Error>,
    /// The protocol version of the current (or last) link.
    pub(crate) version: u16,
    /// Deliver-to-one subscriptions.
    pub(crate) ones: Ones,
    /// Callers waiting for this process to step down (the driver asks its connector).
    pub(crate) stepping_down: Vec<oneshot::Sender<Result<(), Error>>>,
    /// The last leader left on purpose: its epoch and why. Logged with the
    /// next leader's epoch once connected to it.
    pub(crate) left: Option<(u64, LeaderGoodbye)>,
    /// The connection's mirror of the leader, once asked for.
    pub(crate) mirror: Option<MirrorLink>,
}

impl Core {
    pub(crate) fn new(config: Config, channels: Vec<&'static str>, shared: Shared) -> Self {
        let Shared { status, next_id, slots } = shared;
        Core {
            slots,
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
            version: PROTOCOL_VERSION,
            ones: Default::default(),
            stepping_down: Vec::new(),
            left: None,
            mirror: None,
        }
    }
}

impl Core {
    pub(crate) fn hello(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            peer_id: self.peer_id,
            pid: std::process::id(),
            channels: self.channels[..self.declared].iter().map(|c| c.to_string()).collect(),
            token: self.config.token.clone(),
        }
    }

    /// Runs a step of the deliver-to-one subscriptions with what they use of the core.
    fn with_ones<T>(&mut self, f: impl FnOnce(&mut Ones, &mut Step<'_>) -> T) -> T {
        let mut step = Step {
            out: &mut self.out,
            in_flight: &mut self.in_flight,
            next_id: &self.next_id,
            version: self.version,
            status: &self.status,
            retry_at: &mut self.retry_at,
        };
        f(&mut self.ones, &mut step)
    }

    /// The settles of this step, one frame per subscription.
    pub(crate) fn flush_settles(&mut self) {
        self.ones.flush_settles(&mut self.out);
    }

    pub(crate) fn next_id(&self) -> RequestId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether subscriptions of the channel go to the leader now: once it said
    /// how its upstream is (the leader accepts them while the upstream is down,
    /// as pending, and serves its last-known-good values meanwhile).
    pub(crate) fn channel_ready(&self, channel: &str) -> bool {
        self.status.borrow().channels.contains_key(channel)
    }

    /// Makes `channel` part of this connection: opened at once (`Open`, before
    /// the frame that uses it) when connected, and after every later Welcome.
    pub(crate) fn open(&mut self, channel: &'static str, connected: bool) {
        let out = connected.then_some(&mut self.out);
        open_channel(&mut self.channels, channel, out);
    }

    /// The slots path's waiting calls (and cancels) into `out`, each behind
    /// the `Open` of its channel if this is the channel's first use: the
    /// client's `Open` command travels apart from its calls and may come later.
    pub(crate) fn take_slots(&mut self, now: Instant) {
        let Core { slots, channels, out, .. } = self;
        slots.take(now, out, |channel, out| open_channel(channels, channel, Some(out)));
    }

    pub(crate) fn static_channel(&self, name: &str) -> Option<&'static str> {
        self.channels.iter().copied().find(|c| *c == name)
    }

    /// A command while no leader is connected.
    pub(crate) fn offline(&mut self, command: Command) {
        if let Some(channel) = command.channel() {
            self.open(channel, false);
        }
        match command {
            Command::Cancel(id) => {
                self.queued.retain(|c| !matches!(c, Command::Invoke { id: queued, .. } if *queued == id));
            }
            Command::Unsubscribe { channel, key, feed } => self.release(channel, key, &feed),
            Command::UnsubscribeOne { local } => self.with_ones(|ones, step| ones.unsubscribe(step, local)),
            // Of a lost link: that leader redelivered it already.
            Command::Settle { .. } => {}
            Command::Close(done) => {
                self.closed = Some(done);
                self.shut = true;
            }
            Command::Open(_) => {}
            // No link: whatever this process led, it leads no more (a leader
            // reaches itself through memory, and is connected while it leads).
            Command::StepDown(reply) => {
                let _ = reply.send(Err(Error::NotLeader));
            }
            // Once given, a mirror lives on across leaders: the handle at once.
            Command::Mirror(reply) if self.mirror.as_ref().is_some_and(MirrorLink::wanted) => {
                if let Some(mirror) = self.mirror.as_mut() {
                    mirror.want(reply);
                }
            }
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
                    Command::SubscribeOne { reply, .. } => {
                        let _ = reply.send(Err(error));
                    }
                    Command::Mirror(reply) => {
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
            Command::SubscribeOne { reply, .. } => {
                let _ = reply.send(Err(Error::LeaderLost));
            }
            Command::Mirror(reply) => {
                let _ = reply.send(Err(Error::LeaderLost));
            }
        }
    }

    /// No hello will be sent for now: every call fails with `error`.
    pub(crate) fn refuse(&mut self, error: Error, link: LinkState) {
        self.fail_queued(&error);
        self.slots.fail_all(&error, Mode::Fail(error.clone()));
        self.refusal = Some(error);
        self.status.send_modify(|status| {
            status.link = link;
            status.channels.clear();
        });
    }

    /// Keeps `command` for when a link can take it.
    pub(crate) fn hold(&mut self, command: Command) {
        if let Command::Invoke { deadline, reply: Some(_), .. } = &command {
            self.queued_due = Some(self.queued_due.map_or(*deadline, |due| due.min(*deadline)));
        }
        self.queued.push(command);
    }

    pub(crate) fn take_queued(&mut self) -> Vec<Command> {
        self.queued_due = None;
        std::mem::take(&mut self.queued)
    }

    /// Hands the commands kept for a link to the connected one.
    pub(crate) fn send_queued(&mut self) {
        let now = Instant::now();
        for command in self.take_queued() {
            self.online(command, now);
        }
        self.take_slots(now);
    }

    /// A refusal is over: calls wait for a leader again, or fail at once
    /// (with `LeaderLost`, as commands do) once one was reached before.
    pub(crate) fn unrefuse(&mut self) {
        self.refusal = None;
        if self.ever_connected {
            self.slots.fail_all(&Error::LeaderLost, Mode::Fail(Error::LeaderLost));
        } else {
            self.slots.hold();
        }
    }

    /// When the next waiting call expires while no leader is connected.
    pub(crate) fn offline_due(&self) -> Option<Instant> {
        match (self.queued_due, self.slots.earliest()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the next waiting call expires, queued or in flight.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        [self.in_flight.earliest_deadline(), self.queued_due, self.slots.earliest()].into_iter().flatten().min()
    }

    /// When the next call in flight (queued calls aside) expires.
    pub(crate) fn in_flight_due(&mut self) -> Option<Instant> {
        match (self.in_flight.earliest_deadline(), self.slots.earliest()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Answers the calls whose deadline is at or before `now` with
    /// [`Error::DeadlineExceeded`], queued ones and (cancelled at the leader
    /// when `connected`) those in flight.
    pub(crate) fn expire(&mut self, now: Instant, connected: bool) {
        let mut expired = Vec::new();
        self.in_flight.expire(now, &mut expired);
        if connected {
            self.out.extend(expired.into_iter().map(Frame::Cancel));
        }
        self.slots.expire(now, connected, &mut self.out);
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

    pub(crate) fn fail_queued(&mut self, error: &Error) {
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
                Command::SubscribeOne { reply, .. } => {
                    let _ = reply.send(Err(error.clone()));
                }
                Command::Mirror(reply) => {
                    let _ = reply.send(Err(error.clone()));
                }
                _ => {}
            }
        }
    }

    /// A command while connected (`now`: when its batch was taken): may queue frames in `out`.
    pub(crate) fn online(&mut self, command: Command, now: Instant) {
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
            Command::SubscribeOne { channel, key, options, reply } => {
                self.with_ones(|ones, step| ones.subscribe(step, channel, key, options, reply))
            }
            Command::UnsubscribeOne { local } => self.with_ones(|ones, step| ones.unsubscribe(step, local)),
            Command::Settle { link, sub, tag, ack, .. } => self.ones.settle(sub, link, tag, ack),
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
            Command::StepDown(reply) => self.stepping_down.push(reply),
            Command::Mirror(reply) => {
                let mirror = self.mirror.get_or_insert_with(MirrorLink::new);
                if mirror.want(reply) {
                    self.send_mirror();
                }
            }
        }
    }

    /// Asks the current leader for the mirror (after `Connection::mirror`, and on each new link).
    pub(crate) fn send_mirror(&mut self) {
        let id = self.next_id();
        if let Some(mirror) = self.mirror.as_mut() {
            mirror.send(self.version, self.max_epoch, id, &mut self.in_flight, &mut self.out);
        }
    }

    /// A new link: the mirror, if one is wanted, is asked for again.
    pub(crate) fn remirror(&mut self) {
        if self.mirror.as_ref().is_some_and(MirrorLink::wanted) {
            self.send_mirror();
        }
    }

    /// One read from the link; an error (or its end) ends the link, with why.
    pub(crate) fn on_read(&mut self, frame: Option<Result<Frame, CodecError>>) -> Result<(), LinkEnd> {
        match frame {
            None => Err(LinkEnd::LeaderClosed),
            Some(Err(error)) => Err(LinkEnd::BadFrame(error)),
            Some(Ok(frame)) => self.on_frame(frame),
        }
    }

    /// A frame from the leader; an error ends the link.
    pub(crate) fn on_frame(&mut self, frame: Frame) -> Result<(), LinkEnd> {
        match frame {
            Frame::Response(Response { id, result }) if is_slot_id(id) => {
                self.slots.complete(id, result.map_err(Error::Remote));
            }
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
                Some(Pending::SubscribeOne { local }) => {
                    self.with_ones(|ones, step| ones.on_subscribed(step, id, local, result))
                }
                Some(Pending::Mirror) => {
                    if let Some(mirror) = self.mirror.as_mut() {
                        mirror.on_ack(id, result);
                    }
                }
                _ => {}
            },
            Frame::Mirrored(mirrored) => {
                if let Some(mirror) = self.mirror.as_mut() {
                    mirror.on_mirrored(mirrored);
                }
            }
            Frame::Event(event) => self.on_event(event),
            Frame::Delivery(delivery) => self.ones.on_delivery(delivery),
            Frame::Ended(ended) => {
                self.ones.end(&ended.channel, &ended.key, &ended.error);
                self.on_ended(ended)
            }
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
            Frame::Goodbye(reason) => {
                return Err(match LeaderGoodbye::from_reason(&reason) {
                    Some(goodbye) => LinkEnd::LeaderLeft(goodbye),
                    None => LinkEnd::Goodbye(reason),
                });
            }
            other => return Err(LinkEnd::Unexpected(other.kind())),
        }
        Ok(())
    }

    /// The link died: answer every outstanding call, keep subscriptions for later.
    pub(crate) fn lost(&mut self, reason: &LinkEnd) {
        self.out.clear();
        self.retry_at = None;
        self.in_flight.fail_all(&Error::LeaderLost);
        let error = if self.shut { Error::Closed } else { Error::LeaderLost };
        self.slots.fail_all(&Error::LeaderLost, Mode::Fail(error));
        self.ones.lost();
        if let Some(mirror) = self.mirror.as_mut() {
            mirror.lost(&Error::LeaderLost);
        }
        self.topics.retain(|_, topic| {
            topic.remote = Remote::Unsent;
            topic.answer_waiters(Err(Error::LeaderLost));
            topic.locals > 0
        });
        if self.shut {
            return;
        }
        match reason {
            // On purpose: INFO, with the epoch that ends; the next one is logged once connected.
            LinkEnd::LeaderLeft(goodbye) => {
                self.left = Some((self.max_epoch, *goodbye));
                match goodbye {
                    LeaderGoodbye::HandOff => {
                        tracing::info!(epoch = self.max_epoch, "the leader handed off; following the next leader")
                    }
                    _ => {
                        tracing::info!(epoch = self.max_epoch, reason = %goodbye, "the leader stopped; following the next leader")
                    }
                }
            }
            _ => {
                tracing::warn!(reason = %tandem_protocol::internal::error_chain(reason), "lost the leader; reconnecting")
            }
        }
        self.status.send_modify(|status| {
            status.link = LinkState::LeaderLost;
            status.channels.clear();
        });
    }

    pub(crate) fn shutdown(&mut self) {
        self.shut = true;
        for reply in self.stepping_down.drain(..) {
            let _ = reply.send(Err(Error::Closed));
        }
        self.fail_queued(&Error::Closed);
        self.in_flight.fail_all(&Error::Closed);
        self.slots.fail_all(&Error::Closed, Mode::Fail(Error::Closed));
        self.topics.clear();
        self.ones.close();
        if let Some(mirror) = self.mirror.as_mut() {
            mirror.lost(&Error::Closed);
        }
        self.status.send_modify(|status| {
            status.link = LinkState::Closed;
            status.channels.clear();
        });
        if let Some(done) = self.closed.take() {
            let _ = done.send(());
        }
    }
}

impl Drop for Core {
    /// A driver dropped without running to its end (its runtime shut down)
    /// leaves no caller waiting: they get [`Error::Closed`], as the old path's
    /// callers do when their oneshot's sender is dropped.
    fn drop(&mut self) {
        self.slots.fail_all(&Error::Closed, Mode::Fail(Error::Closed));
    }
}

/// Adds `channel` to the open ones; with a link (`out`), its `Open` frame too.
fn open_channel(channels: &mut Vec<&'static str>, channel: &'static str, out: Option<&mut Vec<Frame>>) {
    if channels.contains(&channel) {
        return;
    }
    tracing::debug!(channel, "channel opened");
    channels.push(channel);
    if let Some(out) = out {
        out.push(Frame::Open(vec![channel.to_string()]));
    }
}
