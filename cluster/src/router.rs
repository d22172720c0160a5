//! Routing in the master: user messages, requests and their replies, and link
//! frames and credits. Every message is stamped with the sender of the channel
//! it came in on; every queue is bounded and written with `try_send`, so a
//! slow child gets [`Error::QueueFull`](crate::Error::QueueFull) errors for its
//! senders but never stalls the master. Links are flow-controlled end to end
//! (see `link.rs`): a link's frames in a child's queue never exceed its credit
//! window (at most half the queue), and a link whose relay queue is full anyway
//! is closed.

use std::collections::HashMap;

use bytes::Bytes;
use rand::seq::SliceRandom;
use tandem_protocol::RemoteError;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Duration, Instant};

use crate::WorkerId;
use crate::ipc::{Delivery, Op, Outcome, Refusal, ToChild};
use crate::master::Master;
use crate::status::ProcessState;
use crate::supervisor::Proc;
use crate::types::{LinkId, ProcKey, Sender, SlotId, Target};

/// Where the answer to an operation goes.
#[derive(Debug)]
pub(crate) enum Responder {
    /// The master's own messenger.
    Local(oneshot::Sender<Outcome>),
    /// A child: `Outcome{id}` on its control queue.
    Remote { key: ProcKey, id: u64 },
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
    pub(crate) counts: MessageCounts,
    requests: HashMap<u64, Pending>,
    next_request: u64,
    links: HashMap<LinkId, LinkRoute>,
    next_link: LinkId,
}

/// A single destination.
#[derive(Debug, Clone, Copy)]
enum Dest {
    Master,
    Slot(SlotId),
}

fn enqueue(proc: &Proc, msg: ToChild) -> Result<(), Refusal> {
    proc.data.try_send(msg).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => Refusal::QueueFull { target: proc.key.slot.to_string() },
        mpsc::error::TrySendError::Closed(_) => {
            Refusal::NotRunning { target: proc.key.slot.to_string(), state: "exiting".into() }
        }
    })
}

impl Master {
    pub(crate) fn respond(&self, responder: Responder, outcome: Outcome) {
        match responder {
            // Err: the caller gave up.
            Responder::Local(tx) => drop(tx.send(outcome)),
            Responder::Remote { key, id } => {
                if let Some(proc) = self.proc(key) {
                    proc.control(ToChild::Outcome { id, outcome });
                }
            }
        }
    }

    pub(crate) fn on_op(&mut self, origin: Sender, key: Option<ProcKey>, op: Op, responder: Responder) {
        match &op {
            Op::Send { .. } => self.router.counts.send += 1,
            Op::Request { .. } => self.router.counts.request += 1,
            Op::Status | Op::OpenLink => {}
        }
        match op {
            Op::Send { to, topic, payload } => {
                let outcome = self.route_send(origin, key, to, topic, payload).unwrap_or_else(Outcome::Refused);
                self.respond(responder, outcome);
            }
            Op::Request { to, topic, payload, deadline_ms } => {
                self.route_request(origin, key, to, topic, payload, deadline_ms, responder)
            }
            Op::Status => {
                let table = self.status_table();
                self.respond(responder, Outcome::Status(table));
            }
            Op::OpenLink => {
                let outcome = self.open_link(key).unwrap_or_else(Outcome::Refused);
                self.respond(responder, outcome);
            }
        }
    }

    /// A process that can take user messages now (ready, or draining during shutdown).
    fn deliverable(&self, slot: SlotId) -> Result<&Proc, Refusal> {
        let s = self.slot(slot).ok_or(Refusal::NoSuchWorker { id: slot.worker_id().unwrap_or(0), workers: 0 })?;
        match (&s.proc, s.state) {
            (Some(p), ProcessState::Ready | ProcessState::Stopping) => Ok(p),
            _ => Err(Refusal::NotRunning { target: slot.to_string(), state: s.state.to_string() }),
        }
    }

    fn resolve(&self, origin: Option<ProcKey>, to: Target) -> Result<(Dest, Option<WorkerId>), Refusal> {
        let workers = u32::try_from(self.workers.len()).unwrap_or(u32::MAX);
        match to {
            Target::Master => Ok((Dest::Master, None)),
            Target::Agent => Ok((Dest::Slot(SlotId::Agent), None)),
            Target::Worker(id) if id == 0 || id > workers => Err(Refusal::NoSuchWorker { id, workers }),
            Target::Worker(id) => Ok((Dest::Slot(SlotId::Worker(id)), None)),
            Target::RandomWorker => {
                let ready: Vec<WorkerId> = self
                    .workers
                    .iter()
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
        &mut self,
        from: Sender,
        origin: Option<ProcKey>,
        to: Target,
        topic: String,
        payload: Bytes,
    ) -> Result<Outcome, Refusal> {
        if matches!(to, Target::Workers | Target::All) {
            let mut count = 0u32;
            if to == Target::All && origin.is_some() {
                self.port.deliver(topic.clone(), from.clone(), payload.clone(), None);
                count += 1;
            }
            let agent = (to == Target::All).then_some(&self.agent);
            for slot in agent.into_iter().chain(&self.workers) {
                if origin.is_some_and(|k| k.slot == slot.id) {
                    continue;
                }
                let Ok(proc) = self.deliverable(slot.id) else { continue };
                let delivery =
                    Delivery { topic: topic.clone(), payload: payload.clone(), from: from.clone(), request: None };
                match enqueue(proc, ToChild::Deliver(delivery)) {
                    Ok(()) => count += 1,
                    Err(refusal) => tracing::warn!(?refusal, topic, "fan-out message not queued for one target"),
                }
            }
            return Ok(Outcome::Sent { count, worker: None });
        }
        let (dest, picked) = self.resolve(origin, to)?;
        match dest {
            Dest::Master => self.port.deliver(topic, from, payload, None),
            Dest::Slot(slot) => {
                let proc = self.deliverable(slot)?;
                enqueue(proc, ToChild::Deliver(Delivery { topic, payload, from, request: None }))?;
            }
        }
        Ok(Outcome::Sent { count: 1, worker: picked })
    }

    #[allow(clippy::too_many_arguments)]
    fn route_request(
        &mut self,
        from: Sender,
        origin: Option<ProcKey>,
        to: Target,
        topic: String,
        payload: Bytes,
        deadline_ms: u64,
        responder: Responder,
    ) {
        let (dest, _) = match self.resolve(origin, to) {
            Ok(dest) => dest,
            Err(refusal) => return self.respond(responder, Outcome::Refused(refusal)),
        };
        self.router.next_request += 1;
        let request = self.router.next_request;
        let delivery = Delivery { topic, payload, from, request: Some(request) };
        let (replier, target) = match dest {
            Dest::Master => (Replier::Master, "master".to_owned()),
            Dest::Slot(slot) => {
                let queued = self.deliverable(slot).and_then(|p| {
                    let key = p.key;
                    enqueue(p, ToChild::Deliver(delivery.clone())).map(|()| key)
                });
                match queued {
                    Ok(key) => (Replier::Proc(key), slot.to_string()),
                    Err(refusal) => return self.respond(responder, Outcome::Refused(refusal)),
                }
            }
        };
        let deadline = Instant::now() + Duration::from_millis(deadline_ms.min(u64::from(u32::MAX)));
        self.router.requests.insert(request, Pending { responder, replier, target, deadline, deadline_ms });
        if let Dest::Master = dest {
            self.port.deliver(delivery.topic, delivery.from, delivery.payload, Some(request));
        }
    }

    /// A reply from `from` (`None`: the master itself). Only the asked process may answer.
    pub(crate) fn on_reply(&mut self, from: Option<ProcKey>, request: u64, result: Result<Bytes, RemoteError>) {
        self.router.counts.reply += 1;
        let replier = from.map_or(Replier::Master, Replier::Proc);
        match self.router.requests.get(&request) {
            Some(p) if p.replier == replier => {}
            Some(_) => {
                tracing::warn!(request, "a reply from a process that was not asked; ignored");
                return;
            }
            None => return, // expired, or the requester is gone
        }
        if let Some(pending) = self.router.requests.remove(&request) {
            self.respond(pending.responder, Outcome::Reply(result));
        }
    }

    /// Fails requests whose deadline passed (their requesters have given up too).
    pub(crate) fn prune_requests(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> =
            self.router.requests.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(p) = self.router.requests.remove(&id) {
                let refusal = Refusal::DeadlineExceeded { target: p.target, deadline_ms: p.deadline_ms };
                self.respond(p.responder, Outcome::Refused(refusal));
            }
        }
    }

    /// A process exited: fail the requests it was asked, forget the ones it
    /// made, and close its links (the other end's `rx` ends).
    pub(crate) fn process_gone(&mut self, proc: &Proc) {
        let key = proc.key;
        if let Some(rr) = &self.round_robin {
            rr.notify(crate::round_robin::Cmd::Remove(key));
        }
        let asked: Vec<u64> =
            self.router.requests.iter().filter(|(_, p)| p.replier == Replier::Proc(key)).map(|(id, _)| *id).collect();
        for id in asked {
            if let Some(p) = self.router.requests.remove(&id) {
                self.respond(p.responder, Outcome::Refused(Refusal::TargetExited { target: p.target }));
            }
        }
        self.router.requests.retain(|_, p| !matches!(p.responder, Responder::Remote { key: k, .. } if k == key));
        let links: Vec<LinkId> =
            self.router.links.iter().filter(|(_, r)| r.worker == key || r.agent == key).map(|(id, _)| *id).collect();
        let reason = format!("{} exited", key.slot);
        for link in links {
            self.close_link(link, &reason);
        }
    }

    fn open_link(&mut self, origin: Option<ProcKey>) -> Result<Outcome, Refusal> {
        let Some(key @ ProcKey { slot: SlotId::Worker(worker_id), .. }) = origin else {
            return Err(Refusal::NotAWorker);
        };
        if self.stopping.is_some() {
            return Err(Refusal::ShuttingDown);
        }
        let pid = self.proc(key).map(|p| p.pid).ok_or(Refusal::NotAWorker)?;
        let agent = match (&self.agent.proc, self.agent.state) {
            (Some(p), ProcessState::Ready) => p,
            _ => return Err(Refusal::AgentUnavailable { state: self.agent.state.to_string() }),
        };
        self.router.next_link += 1;
        let link = self.router.next_link;
        enqueue(agent, ToChild::IncomingLink { link, worker_id, pid })?;
        self.router.links.insert(link, LinkRoute { worker: key, agent: agent.key });
        tracing::debug!(link, worker.id = worker_id, "link opened");
        Ok(Outcome::LinkOpened { link })
    }

    /// The end of `link` that `from` is not; `None` if the link is gone (closed
    /// meanwhile) or `from` is not one of its ends (logged).
    fn other_end(&self, from: ProcKey, link: LinkId, what: &str) -> Option<ProcKey> {
        let route = self.router.links.get(&link).copied()?;
        if route.worker == from {
            Some(route.agent)
        } else if route.agent == from {
            Some(route.worker)
        } else {
            tracing::warn!(link, what, "relayed for a link this process is not an end of; ignored");
            None
        }
    }

    pub(crate) fn on_link_frame(&mut self, from: ProcKey, link: LinkId, frame: Bytes) {
        self.router.counts.link_frame += 1;
        let Some(other) = self.other_end(from, link, "frame") else { return };
        let result = match self.proc(other) {
            Some(p) => p.data.try_send(ToChild::LinkFrame { link, frame }).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => "relay queue full",
                mpsc::error::TrySendError::Closed(_) => "the other end is gone",
            }),
            None => Err("the other end is gone"),
        };
        if let Err(reason) = result {
            tracing::warn!(link, reason, "closing a link");
            self.close_link(link, reason);
        }
    }

    /// Credit from one end of a link, relayed to the other like a frame. Never
    /// dropped: when the data queue is full it goes on the control queue (a
    /// lost credit would stall the link), and when both are full the link is
    /// closed.
    pub(crate) fn on_link_credit(&mut self, from: ProcKey, link: LinkId, credit: u32) {
        let Some(other) = self.other_end(from, link, "credit") else { return };
        let result = match self.proc(other) {
            Some(p) => match p.data.try_send(ToChild::LinkCredit { link, credit }) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(msg)) => p.control.try_send(msg).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => "relay queues full",
                    mpsc::error::TrySendError::Closed(_) => "the other end is gone",
                }),
                Err(mpsc::error::TrySendError::Closed(_)) => Err("the other end is gone"),
            },
            None => Err("the other end is gone"),
        };
        if let Err(reason) = result {
            tracing::warn!(link, reason, "closing a link");
            self.close_link(link, reason);
        }
    }

    pub(crate) fn on_link_close(&mut self, from: ProcKey, link: LinkId) {
        match self.router.links.get(&link) {
            Some(r) if r.worker == from || r.agent == from => self.close_link(link, "closed by the other end"),
            _ => {}
        }
    }

    /// Forgets a link and tells both ends (an end that is gone is skipped).
    fn close_link(&mut self, link: LinkId, reason: &str) {
        let Some(route) = self.router.links.remove(&link) else { return };
        for end in [route.worker, route.agent] {
            if let Some(p) = self.proc(end) {
                let msg = ToChild::LinkClosed { link, reason: reason.to_owned() };
                // Behind the link's frames when possible; else ahead of them.
                if let Err(mpsc::error::TrySendError::Full(msg)) = p.data.try_send(msg) {
                    p.control(msg);
                }
            }
        }
    }
}
