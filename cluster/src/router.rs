//! Routing in the master: user messages, requests and their replies, and link
//! frames and credits. Every message is stamped with the sender of the channel
//! it came in on; every queue is bounded and written with `try_send`, so a
//! slow child gets [`Error::QueueFull`](crate::Error::QueueFull) errors for its
//! senders but never stalls the master. Links are flow-controlled end to end
//! (see `link.rs`): a link's frames in a child's queue never exceed its credit
//! window (at most half the queue), and a link whose relay queue is full anyway
//! is closed.
//!
//! The [`Router`] is a state machine: it owns the pending requests, the link
//! routes and the counters, reads the supervised processes through [`Peers`]
//! (their states and the room in their queues), and answers each input with
//! the [`Action`]s the master carries out, in order. It never writes to a
//! queue itself, so it is tested without processes.
//!
//! Link frames and credits mostly skip the loop: the task that reads a
//! child's channel hands them to the [`Relay`] (`router/relay.rs`), the
//! router's fast path, which the router keeps in step with its links.
//!
//! ```text
//! master loop                      Router                        master loop
//!   child message / local call --> on_op, on_reply, on_link_* --> Vec<Action>
//!   prune tick                 --> on_tick(now)               --> Data / Control
//!   a child exited             --> on_gone(key)               --> Answer / Deliver / Status
//! ```

use std::collections::HashMap;

use bytes::Bytes;
use rand::seq::SliceRandom;
use tandem_protocol::RemoteError;
use tandem_protocol::internal::{Expires, PendingTable};
use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};

use crate::identity::{LinkId, Origin, ProcKey, SlotId, Target};
use crate::ipc::{Delivery, Op, Outcome, Refusal, ToChild};
use crate::status::ProcessState;
use crate::supervisor::{Proc, Slot, Slots};
use crate::{ProcessRole, WorkerId};

mod relay;

pub(crate) use relay::Relay;

/// Where the answer to an operation goes.
#[derive(Debug)]
pub(crate) enum Responder {
    /// The master's own messenger.
    Local(oneshot::Sender<Outcome>),
    /// A child: `Outcome{id}` on its control queue.
    Remote { key: ProcKey, id: u64 },
}

impl Responder {
    /// The action that answers with `outcome`.
    pub(crate) fn answer(self, outcome: Outcome) -> Action {
        match self {
            Responder::Local(reply) => Action::Answer { reply, outcome },
            Responder::Remote { key, id } => Action::Control { to: key, msg: ToChild::Outcome { id, outcome } },
        }
    }
}

/// What the master carries out for the router, in the order given.
#[derive(Debug)]
pub(crate) enum Action {
    /// Queue `msg` on the data queue of process `to`. The router checked the
    /// room, so this `try_send` only fails if the process went away meanwhile.
    Data { to: ProcKey, msg: ToChild },
    /// Queue `msg` on the control queue of process `to`, as
    /// [`Proc::control`] does (dropped and logged when full). Skipped when the
    /// process is gone.
    Control { to: ProcKey, msg: ToChild },
    /// Answer the master's own messenger (Err: the caller gave up).
    Answer { reply: oneshot::Sender<Outcome>, outcome: Outcome },
    /// Hand a message to the master's own subscribers.
    Deliver(Delivery),
    /// Answer with the cluster's status table, which the master builds.
    Status(Responder),
}

/// What the router sees of the supervised processes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peers<'a> {
    /// Every supervised slot, agent and workers (the master's list).
    pub slots: &'a Slots,
    /// The cluster is shutting down: no new links.
    pub stopping: bool,
}

impl<'a> Peers<'a> {
    fn slot(&self, id: SlotId) -> Option<&'a Slot> {
        self.slots.get(id)
    }

    /// The live process named by `key` (the slot's, or its predecessor still draining).
    fn proc(&self, key: ProcKey) -> Option<&'a Proc> {
        self.slots.proc(key)
    }

    /// A process that can take user messages now (ready, or draining during shutdown).
    fn deliverable(&self, slot: SlotId) -> Result<&'a Proc, Refusal> {
        let s = self.slot(slot).ok_or(Refusal::NoSuchWorker { id: slot.worker_id().unwrap_or(0), workers: 0 })?;
        match (&s.proc, s.state) {
            (Some(p), ProcessState::Ready | ProcessState::Stopping) => Ok(p),
            _ => Err(Refusal::NotRunning { target: slot.to_string(), state: s.state.to_string() }),
        }
    }
}

/// Who may answer a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replier {
    Master,
    Proc(ProcKey),
}

#[derive(Debug)]
struct Pending {
    responder: Responder,
    replier: Replier,
    target: String,
    deadline: Instant,
    deadline_ms: u64,
}

impl Expires for Pending {
    fn deadline(&self) -> Option<Instant> {
        Some(self.deadline)
    }
}

#[derive(Debug, Clone, Copy)]
struct LinkRoute {
    worker: ProcKey,
    agent: ProcKey,
}

/// Messages the master routed, by kind, over its life (for the metrics).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct MessageCounts {
    pub send: u64,
    pub request: u64,
    pub reply: u64,
    pub link_frame: u64,
}

/// The router's state.
#[derive(Debug, Default)]
pub(crate) struct Router {
    counts: MessageCounts,
    /// Answered by a reply, by `on_tick` once their deadline passed, or by `on_gone`.
    requests: PendingTable<Pending>,
    next_request: u64,
    links: HashMap<LinkId, LinkRoute>,
    next_link: LinkId,
    /// The buffers of the last step, kept for the next (a step per relayed
    /// frame: no allocation per message).
    spare: (Vec<Action>, Vec<Taken>),
    /// The links' fast path (see [`Relay`]): a route per open link.
    relay: Relay,
}

/// The room a step took on one queue of one process.
type Taken = ((ProcKey, Queue), usize);

/// A single destination.
#[derive(Debug, Clone, Copy)]
enum Dest {
    Master,
    Slot(SlotId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Queue {
    Data,
    Control,
}

/// Why a queue does not take a message (`try_send`'s errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoRoom {
    Full,
    Closed,
}

/// The actions of one input, and the queue room they take: a queue that
/// has room for one more message is full for the next one planned on it.
struct Plan {
    actions: Vec<Action>,
    /// Room taken per queue (a step touches a few queues: a list beats a map).
    taken: Vec<Taken>,
}

impl Plan {
    fn taken(&mut self, key: (ProcKey, Queue)) -> &mut usize {
        let at = match self.taken.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                self.taken.push((key, 0));
                self.taken.len() - 1
            }
        };
        &mut self.taken[at].1
    }

    /// Plans `msg` on a queue of `proc` with the semantics of `try_send`
    /// (`msg` is dropped when it does not fit).
    fn try_queue(&mut self, proc: &Proc, queue: Queue, msg: ToChild) -> Result<(), NoRoom> {
        let tx = match queue {
            Queue::Data => &proc.data,
            Queue::Control => &proc.control,
        };
        if tx.is_closed() {
            return Err(NoRoom::Closed);
        }
        let taken = self.taken((proc.key, queue));
        if tx.capacity() <= *taken {
            return Err(NoRoom::Full);
        }
        *taken += 1;
        let to = proc.key;
        self.actions.push(match queue {
            Queue::Data => Action::Data { to, msg },
            Queue::Control => Action::Control { to, msg },
        });
        Ok(())
    }

    /// A user message or link message on the data queue; the refusal the sender gets otherwise.
    fn enqueue(&mut self, proc: &Proc, msg: ToChild) -> Result<(), Refusal> {
        self.try_queue(proc, Queue::Data, msg).map_err(|e| match e {
            NoRoom::Full => Refusal::QueueFull { target: proc.key.slot.to_string() },
            NoRoom::Closed => Refusal::NotRunning { target: proc.key.slot.to_string(), state: "exiting".into() },
        })
    }

    /// A control message, queued as [`Proc::control`] does.
    fn control(&mut self, to: ProcKey, msg: ToChild) {
        *self.taken((to, Queue::Control)) += 1;
        self.actions.push(Action::Control { to, msg });
    }

    fn respond(&mut self, responder: Responder, outcome: Outcome) {
        match responder.answer(outcome) {
            Action::Control { to, msg } => self.control(to, msg),
            action => self.actions.push(action),
        }
    }
}

impl Router {
    /// A plan on the spare buffers.
    fn plan(&mut self) -> Plan {
        let (actions, taken) = std::mem::take(&mut self.spare);
        Plan { actions, taken }
    }

    /// The plan's actions; its room table goes back to the spares.
    fn finish(&mut self, plan: Plan) -> Vec<Action> {
        let Plan { actions, mut taken } = plan;
        taken.clear();
        self.spare.1 = taken;
        actions
    }

    /// Gives back a step's (carried out) actions, for the next step to reuse.
    pub(crate) fn recycle(&mut self, mut actions: Vec<Action>) {
        actions.clear();
        self.spare.0 = actions;
    }

    /// The messages routed so far (by the router and the relay's fast path).
    pub(crate) fn counts(&self) -> MessageCounts {
        MessageCounts { link_frame: self.counts.link_frame + self.relay.frames(), ..self.counts }
    }

    /// The links' fast path, for the tasks that read the children's channels.
    pub(crate) fn relay(&self) -> Relay {
        self.relay.clone()
    }

    /// An operation from `origin` (`key`: the child it came from; `None`: the
    /// master's own messenger), answered through `responder`.
    pub(crate) fn on_op(
        &mut self,
        peers: Peers<'_>,
        now: Instant,
        origin: Origin,
        key: Option<ProcKey>,
        op: Op,
        responder: Responder,
    ) -> Vec<Action> {
        let mut plan = self.plan();
        match op {
            Op::Send { to, topic, payload } => {
                self.counts.send += 1;
                let outcome = Self::route_send(&mut plan, peers, origin, key, to, topic, payload)
                    .unwrap_or_else(Outcome::Refused);
                plan.respond(responder, outcome);
            }
            Op::Request { to, topic, payload, deadline_ms } => {
                self.counts.request += 1;
                self.route_request(&mut plan, peers, now, origin, key, to, topic, payload, deadline_ms, responder)
            }
            Op::Status => plan.actions.push(Action::Status(responder)),
            Op::OpenLink => {
                let outcome = self.open_link(&mut plan, peers, key).unwrap_or_else(Outcome::Refused);
                plan.respond(responder, outcome);
            }
        }
        self.finish(plan)
    }

    fn resolve(peers: Peers<'_>, origin: Option<ProcKey>, to: Target) -> Result<(Dest, Option<WorkerId>), Refusal> {
        match to {
            Target::Master => Ok((Dest::Master, None)),
            Target::Agent => Ok((Dest::Slot(SlotId::Agent), None)),
            Target::Worker(id) => match peers.slot(SlotId::Worker(id)) {
                Some(_) => Ok((Dest::Slot(SlotId::Worker(id)), None)),
                None => Err(Refusal::NoSuchWorker { id, workers: peers.slots.worker_count() }),
            },
            Target::RandomWorker => {
                let ready: Vec<WorkerId> = peers
                    .slots
                    .workers()
                    .filter(|w| w.state == ProcessState::Ready && w.proc.is_some())
                    .filter(|w| origin.is_none_or(|k| k.slot != w.id))
                    .filter_map(|w| w.id.worker_id())
                    .collect();
                let id = *ready.choose(&mut rand::thread_rng()).ok_or(Refusal::NoReadyWorker)?;
                Ok((Dest::Slot(SlotId::Worker(id)), Some(id)))
            }
            Target::Workers | Target::All => Err(Refusal::InvalidTarget { target: to.to_string() }),
        }
    }

    fn route_send(
        plan: &mut Plan,
        peers: Peers<'_>,
        from: Origin,
        origin: Option<ProcKey>,
        to: Target,
        topic: String,
        payload: Bytes,
    ) -> Result<Outcome, Refusal> {
        if matches!(to, Target::Workers | Target::All) {
            let mut count = 0u32;
            if to == Target::All && origin.is_some() {
                let delivery =
                    Delivery { topic: topic.clone(), payload: payload.clone(), from: from.clone(), request: None };
                plan.actions.push(Action::Deliver(delivery));
                count += 1;
            }
            for slot in peers.slots.iter() {
                if to == Target::Workers && slot.id.role() != ProcessRole::Worker {
                    continue;
                }
                // The hot standby runs no user code until it is the agent.
                if slot.id == SlotId::Standby {
                    continue;
                }
                if origin.is_some_and(|k| k.slot == slot.id) {
                    continue;
                }
                let Ok(proc) = peers.deliverable(slot.id) else { continue };
                let delivery =
                    Delivery { topic: topic.clone(), payload: payload.clone(), from: from.clone(), request: None };
                match plan.enqueue(proc, ToChild::Deliver(delivery)) {
                    Ok(()) => count += 1,
                    Err(refusal) => tracing::warn!(?refusal, topic, "fan-out message not queued for one target"),
                }
            }
            return Ok(Outcome::Sent { count, worker: None });
        }
        let (dest, picked) = Self::resolve(peers, origin, to)?;
        let delivery = Delivery { topic, payload, from, request: None };
        match dest {
            Dest::Master => plan.actions.push(Action::Deliver(delivery)),
            Dest::Slot(slot) => plan.enqueue(peers.deliverable(slot)?, ToChild::Deliver(delivery))?,
        }
        Ok(Outcome::Sent { count: 1, worker: picked })
    }

    #[allow(clippy::too_many_arguments)]
    fn route_request(
        &mut self,
        plan: &mut Plan,
        peers: Peers<'_>,
        now: Instant,
        from: Origin,
        origin: Option<ProcKey>,
        to: Target,
        topic: String,
        payload: Bytes,
        deadline_ms: u64,
        responder: Responder,
    ) {
        let (dest, _) = match Self::resolve(peers, origin, to) {
            Ok(dest) => dest,
            Err(refusal) => return plan.respond(responder, Outcome::Refused(refusal)),
        };
        self.next_request += 1;
        let request = self.next_request;
        let delivery = Delivery { topic, payload, from, request: Some(request) };
        let (replier, target) = match dest {
            Dest::Master => (Replier::Master, "master".to_owned()),
            Dest::Slot(slot) => {
                let queued = peers.deliverable(slot).and_then(|p| {
                    let key = p.key;
                    plan.enqueue(p, ToChild::Deliver(delivery.clone())).map(|()| key)
                });
                match queued {
                    Ok(key) => (Replier::Proc(key), slot.to_string()),
                    Err(refusal) => return plan.respond(responder, Outcome::Refused(refusal)),
                }
            }
        };
        let deadline = now + Duration::from_millis(deadline_ms.min(u64::from(u32::MAX)));
        let pending = Pending { responder, replier, target, deadline, deadline_ms };
        if let Err(refused) = self.requests.insert_expiring(request, pending) {
            // Never: the ids come from one counter and the table is never closed.
            tracing::error!(request, error = %refused, "request not tracked; refused");
            let state = refused.to_string();
            let Pending { responder, target, .. } = refused.into_value();
            return plan.respond(responder, Outcome::Refused(Refusal::NotRunning { target, state }));
        }
        if let Dest::Master = dest {
            plan.actions.push(Action::Deliver(delivery));
        }
    }

    /// A reply from `from` (`None`: the master itself). Only the asked process may answer.
    pub(crate) fn on_reply(
        &mut self,
        from: Option<ProcKey>,
        request: u64,
        result: Result<Bytes, RemoteError>,
    ) -> Vec<Action> {
        self.counts.reply += 1;
        let replier = from.map_or(Replier::Master, Replier::Proc);
        match self.requests.get(request) {
            Some(p) if p.replier == replier => {}
            Some(_) => {
                tracing::warn!(request, "a reply from a process that was not asked; ignored");
                return Vec::new();
            }
            None => return Vec::new(), // expired, or the requester is gone
        }
        let mut plan = self.plan();
        if let Some(pending) = self.requests.remove(request) {
            plan.respond(pending.responder, Outcome::Reply(result));
        }
        self.finish(plan)
    }

    /// Fails requests whose deadline passed by `now` (their requesters have given up too).
    pub(crate) fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        let mut plan = self.plan();
        for (_, p) in self.requests.take_expired(now) {
            let refusal = Refusal::DeadlineExceeded { target: p.target, deadline_ms: p.deadline_ms };
            plan.respond(p.responder, Outcome::Refused(refusal));
        }
        self.finish(plan)
    }

    /// Process `key` exited (it is no longer among `peers`): fail the requests
    /// it was asked, forget the ones it made, and close its links (the other
    /// end's `rx` ends).
    pub(crate) fn on_gone(&mut self, peers: Peers<'_>, key: ProcKey) -> Vec<Action> {
        let mut plan = self.plan();
        for (_, p) in self.requests.take_if(|_, p| p.replier == Replier::Proc(key)) {
            plan.respond(p.responder, Outcome::Refused(Refusal::TargetExited { target: p.target }));
        }
        self.requests.retain(|_, p| !matches!(p.responder, Responder::Remote { key: k, .. } if k == key));
        let links: Vec<LinkId> =
            self.links.iter().filter(|(_, r)| r.worker == key || r.agent == key).map(|(id, _)| *id).collect();
        let reason = format!("{} exited", key.slot);
        for link in links {
            self.close_link(&mut plan, peers, link, &reason);
        }
        self.finish(plan)
    }

    fn open_link(&mut self, plan: &mut Plan, peers: Peers<'_>, origin: Option<ProcKey>) -> Result<Outcome, Refusal> {
        let Some(key @ ProcKey { slot: SlotId::Worker(worker_id), .. }) = origin else {
            return Err(Refusal::NotAWorker);
        };
        if peers.stopping {
            return Err(Refusal::ShuttingDown);
        }
        let pid = peers.proc(key).map(|p| p.pid).ok_or(Refusal::NotAWorker)?;
        let agent = peers.slot(SlotId::Agent).ok_or(Refusal::AgentUnavailable { state: "absent".to_owned() })?;
        let agent = match (&agent.proc, agent.state) {
            (Some(p), ProcessState::Ready) => p,
            _ => return Err(Refusal::AgentUnavailable { state: agent.state.to_string() }),
        };
        self.next_link += 1;
        let link = self.next_link;
        plan.enqueue(agent, ToChild::IncomingLink { link, worker_id, pid })?;
        self.links.insert(link, LinkRoute { worker: key, agent: agent.key });
        if let Some(worker) = peers.proc(key) {
            self.relay.insert(link, worker, agent);
        }
        tracing::debug!(link, worker.id = worker_id, "link opened");
        Ok(Outcome::LinkOpened { link })
    }

    /// The end of `link` that `from` is not; `None` if the link is gone (closed
    /// meanwhile) or `from` is not one of its ends (logged).
    fn other_end(&self, from: ProcKey, link: LinkId, what: &str) -> Option<ProcKey> {
        let route = self.links.get(&link).copied()?;
        if route.worker == from {
            Some(route.agent)
        } else if route.agent == from {
            Some(route.worker)
        } else {
            tracing::warn!(link, what, "relayed for a link this process is not an end of; ignored");
            None
        }
    }

    /// A frame from one end of a link, relayed to the other; a link whose
    /// relay queue is full is closed.
    pub(crate) fn on_link_frame(&mut self, peers: Peers<'_>, from: ProcKey, link: LinkId, frame: Bytes) -> Vec<Action> {
        self.counts.link_frame += 1;
        let mut plan = self.plan();
        let Some(other) = self.other_end(from, link, "frame") else { return self.finish(plan) };
        let result = match peers.proc(other) {
            Some(p) => plan.try_queue(p, Queue::Data, ToChild::LinkFrame { link, frame }).map_err(|e| match e {
                NoRoom::Full => "relay queue full",
                NoRoom::Closed => "the other end is gone",
            }),
            None => Err("the other end is gone"),
        };
        if let Err(reason) = result {
            tracing::warn!(link, reason, "closing a link");
            self.close_link(&mut plan, peers, link, reason);
        }
        self.finish(plan)
    }

    /// Credit from one end of a link, relayed to the other like a frame. Never
    /// dropped: when the data queue is full it goes on the control queue (a
    /// lost credit would stall the link), and when both are full the link is
    /// closed.
    pub(crate) fn on_link_credit(&mut self, peers: Peers<'_>, from: ProcKey, link: LinkId, credit: u32) -> Vec<Action> {
        let mut plan = self.plan();
        let Some(other) = self.other_end(from, link, "credit") else { return self.finish(plan) };
        let result = match peers.proc(other) {
            Some(p) => match plan.try_queue(p, Queue::Data, ToChild::LinkCredit { link, credit }) {
                Ok(()) => Ok(()),
                Err(NoRoom::Full) => {
                    plan.try_queue(p, Queue::Control, ToChild::LinkCredit { link, credit }).map_err(|e| match e {
                        NoRoom::Full => "relay queues full",
                        NoRoom::Closed => "the other end is gone",
                    })
                }
                Err(NoRoom::Closed) => Err("the other end is gone"),
            },
            None => Err("the other end is gone"),
        };
        if let Err(reason) = result {
            tracing::warn!(link, reason, "closing a link");
            self.close_link(&mut plan, peers, link, reason);
        }
        self.finish(plan)
    }

    /// One end closed `link`.
    pub(crate) fn on_link_close(&mut self, peers: Peers<'_>, from: ProcKey, link: LinkId) -> Vec<Action> {
        let mut plan = self.plan();
        match self.links.get(&link) {
            Some(r) if r.worker == from || r.agent == from => {
                self.close_link(&mut plan, peers, link, "closed by the other end")
            }
            _ => {}
        }
        self.finish(plan)
    }

    /// Forgets a link and tells both ends (an end that is gone is skipped).
    fn close_link(&mut self, plan: &mut Plan, peers: Peers<'_>, link: LinkId, reason: &str) {
        let Some(route) = self.links.remove(&link) else { return };
        self.relay.remove(link);
        for end in [route.worker, route.agent] {
            if let Some(p) = peers.proc(end) {
                let closed = || ToChild::LinkClosed { link, reason: reason.to_owned() };
                // Behind the link's frames when possible; else ahead of them.
                if plan.try_queue(p, Queue::Data, closed()) == Err(NoRoom::Full) {
                    plan.control(end, closed());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
