//! The driver: the one task that owns the link to the leader.
//!
//! ```text
//! handles ──Command──> driver ──Frame──> leader
//! calls ────slots────>   │  <──Frame───
//!    ^                   │
//!    └── slot answers, ──┤
//!        oneshot replies │
//!        subscriptions <─┘ (a feed per key: last value kept, a queue per handle)
//! ```
//!
//! Calls reach the driver through the slab of slots (`slots.rs`, the
//! default, [`CallPath::Slots`](crate::CallPath::Slots)) or as commands
//! ([`CallPath::Queue`](crate::CallPath::Queue)); everything else is a command.
//!
//! The driver connects (with backoff and jitter), says `Hello`, and then turns
//! commands into frames and frames into replies and subscription values. When
//! the link dies it answers every outstanding call with `LeaderLost` at once,
//! keeps every subscription with its last value, reconnects, and resubscribes
//! each key with its last seen (epoch, seq) so the leader sends only newer
//! values. It never delivers a value at or below one already delivered.

use std::time::Duration;

use futures::{FutureExt, SinkExt, StreamExt};
use tandem_leader::LeaderGoodbye;
use tandem_protocol::internal::Backoff;
use tandem_protocol::internal::{WriteEnd, WriteLimits, write_loop};
use tandem_protocol::{Frame, Link, RemoteError, Welcome};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::command::Command;
use crate::connector::{Connected, Connector};
use crate::core::Core;
use crate::handshake::{ConnectError, connect};
use crate::link_end::{LinkEnd, WriteFailed};
use crate::shared::Shared;
use crate::state::LinkState;
use crate::{Config, Error};

/// How long connecting may keep failing before it is logged at WARN (shorter
/// gaps, such as a failover or a leader still binding, are logged at debug).
const UNREACHABLE_WARN_AFTER: Duration = Duration::from_secs(1);

/// How long a link whose leader closed it (a write failed) is still read for
/// the `Goodbye` it may have sent first: the bytes are in this end's socket
/// already, the end of the stream right behind them.
const GOODBYE_GRACE: Duration = Duration::from_millis(200);

/// The most commands, or frames, handled in one wakeup before the frames they
/// produced are flushed.
const MAX_BURST: usize = 256;

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

impl<C: Connector> Driver<C> {
    pub(crate) fn new(
        config: Config,
        channels: Vec<&'static str>,
        connector: C,
        commands: mpsc::Receiver<Command>,
        drops: mpsc::UnboundedReceiver<Command>,
        shared: Shared,
    ) -> Self {
        let core = Core::new(config, channels, shared);
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
                        _ = sleep_until(self.core.offline_due()) => self.core.expire(Instant::now(), false),
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
                    self.core.unrefuse();
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
        // Closed (or every handle dropped) while leading: hand off, so that the
        // followers re-elect at once and log no fault.
        if self.connector.step_down().await {
            tracing::debug!("this process handed off its leadership as its connection closed");
        }
        self.core.shutdown();
    }

    /// This process became the hot standby while following: the leader is
    /// mirrored on the current link from now on, for the connector.
    fn mirror_for_standby(&mut self) {
        let mirror = self.core.mirror.get_or_insert_with(crate::mirror::MirrorLink::new);
        let asked = mirror.wanted();
        let view = mirror.adopt();
        self.connector.mirroring(view);
        if !asked {
            self.core.send_mirror();
        }
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
        if let Some((previous, goodbye)) = core.left.take() {
            tracing::info!(
                epoch.previous = previous,
                epoch = welcome.epoch,
                leader.pid = welcome.pid,
                is_leader,
                reason = %goodbye,
                "following the new leader after the hand-off"
            );
        }
        core.leader_id = Some(welcome.leader_id);
        core.max_epoch = welcome.epoch;
        core.version = welcome.version;
        core.ever_connected = true;
        core.slots.open();
        core.status.send_modify(|status| {
            status.link = LinkState::Connected { epoch: welcome.epoch, leader_pid: welcome.pid, is_leader };
            status.channels.clear();
        });
        tracing::debug!(epoch = welcome.epoch, leader.pid = welcome.pid, is_leader, "connected to the leader");
        if let Some(late) = core.channels.get(named..).filter(|late| !late.is_empty()) {
            core.out.push(Frame::Open(late.iter().map(|c| c.to_string()).collect()));
        }
        if !is_leader && self.connector.is_standby() {
            // A hot standby: this link mirrors the leader, for the connector to take over warm.
            let view = core.mirror.get_or_insert_with(crate::mirror::MirrorLink::new).adopt();
            self.connector.mirroring(view);
        }
        let core = &mut self.core;
        // A process that leads does not mirror itself.
        if !is_leader {
            core.remirror();
        }
        core.send_queued();
        let stall = core.config.peer_timeout;
        if let Err(failed) = self.flush(&mut link, stall).await {
            return self.write_failed(&mut link, failed).await;
        }
        let heartbeat = Duration::from_millis(u64::from(welcome.heartbeat_ms.max(10)));
        // Silence is checked at least four times per peer timeout, whatever
        // heartbeat the leader announced; a ping goes out once per heartbeat.
        let tick = heartbeat.min(self.core.config.peer_timeout / 4).max(Duration::from_millis(10));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
        let mut next_ping = Instant::now() + heartbeat;
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
        let slots = self.core.slots.clone();
        loop {
            if let Some(due) = self.core.in_flight_due().filter(|due| *due < armed) {
                armed = due;
                expiry.as_mut().reset(due);
            }
            tokio::select! {
                biased;
                command = self.drops.recv() => if let Some(command) = command {
                    let now = Instant::now();
                    self.core.online(command, now);
                    // Acks come in bursts: one Settle frame for all of them.
                    for _ in 0..MAX_BURST {
                        match self.drops.try_recv() {
                            Ok(command) => self.core.online(command, now),
                            Err(_) => break,
                        }
                    }
                },
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
                () = std::future::poll_fn(|cx| slots.poll_outgoing(cx)) => {
                    // The slots path's calls (and cancels) of this wakeup, in one batch.
                    self.core.take_slots(Instant::now());
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
                    armed = self.core.in_flight_due().unwrap_or(far);
                    expiry.as_mut().reset(armed);
                }
                _ = ticker.tick() => {
                    let now = Instant::now();
                    if std::mem::take(&mut heard) {
                        last_received = now;
                    }
                    let silent = now.saturating_duration_since(last_received);
                    if silent > self.core.config.peer_timeout {
                        return LinkEnd::Silent(silent);
                    }
                    if now >= next_ping {
                        next_ping = now + heartbeat;
                        nonce += 1;
                        self.core.out.push(Frame::Ping(nonce));
                        // Once per heartbeat: the standby's place may be free (it died, or it leads now).
                        if !is_leader && self.connector.became_standby() {
                            self.mirror_for_standby();
                        }
                    }
                }
            }
            if !self.core.stepping_down.is_empty() {
                // Only the leader's own process can: its leader is at the
                // other end of this (in-memory) link.
                let handed_off = is_leader && self.connector.step_down().await;
                let result = if handed_off { Ok(()) } else { Err(Error::NotLeader) };
                for reply in self.core.stepping_down.drain(..) {
                    let _ = reply.send(result.clone());
                }
                if handed_off {
                    // That leader has stopped: take what it sent up to its
                    // hand-off Goodbye (here already), write nothing more; the
                    // link ends like any follower's, and this process follows
                    // the next leader.
                    self.core.out.clear();
                    return self.read_rest(&mut link).await.unwrap_or(LinkEnd::LeaderLeft(LeaderGoodbye::HandOff));
                }
            }
            if self.core.shut {
                self.core.out.push(Frame::Goodbye("follower closing".into()));
                let grace = self.core.config.handshake_timeout;
                let _ = write_frames(&mut link, &mut self.core.out, grace).await;
                let _ = tokio::time::timeout(grace, SinkExt::<Frame>::close(&mut link.tx)).await;
                return LinkEnd::Closed;
            }
            self.core.flush_settles();
            if let Err(failed) = self.flush(&mut link, stall).await {
                return self.write_failed(&mut link, failed).await;
            }
        }
    }

    /// Why the link ended when a write to it failed: a leader that left on
    /// purpose may have closed its end right after its Goodbye, which is then
    /// waiting to be read; otherwise the write's failure.
    async fn write_failed(&mut self, link: &mut Link, failed: WriteFailed) -> LinkEnd {
        // A leader that takes no bytes (stalled) is no closed one: nothing to wait for.
        if let WriteFailed::Write(_) = failed
            && let Some(left @ LinkEnd::LeaderLeft(_)) = self.read_rest(link).await
        {
            return left;
        }
        LinkEnd::Write(failed)
    }

    /// Handles what the leader sent before its end of the link closed (for
    /// at most [`GOODBYE_GRACE`]); returns why the link ended, if it ended.
    async fn read_rest(&mut self, link: &mut Link) -> Option<LinkEnd> {
        let core = &mut self.core;
        let rest = async {
            loop {
                if let Err(reason) = core.on_read(link.rx.next().await) {
                    return reason;
                }
            }
        };
        tokio::time::timeout(GOODBYE_GRACE, rest).await.ok()
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
                let write = write_frames(link, &mut batch, stall);
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

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes the queued frames, giving up after `stall` without progress (a
/// leader that stopped reading must not stop this driver's heartbeats).
async fn write_frames(link: &mut Link, out: &mut Vec<Frame>, stall: Duration) -> Result<(), WriteFailed> {
    match write_loop(&mut out.drain(..), &mut link.tx, WriteLimits::default().stall(stall)).await {
        WriteEnd::Finished => Ok(()),
        WriteEnd::Failed(error) => Err(WriteFailed::Write(error)),
        WriteEnd::Stalled(stall) => Err(WriteFailed::Stalled(stall)),
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
            _ = sleep_until(core.offline_due()) => core.expire(Instant::now(), false),
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
