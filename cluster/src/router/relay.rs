//! The relay's fast path: a link's frames and credits go from the task that
//! reads one end's channel straight onto the other end's data queue, without
//! a hop through the master's loop (and the router's step) per frame.
//!
//! ```text
//! worker ── IPC ──> reader task ──try_send──> agent's data queue ──> writer task ── IPC ──> agent
//!                       │ not a routed link, not an end of it, queue full or closed
//!                       └──> master loop ──> Router::on_link_* (relays, or closes the link)
//! ```
//!
//! The [`Router`](super::Router) stays the owner of the links: it adds a
//! route when it opens a link and removes it when the link closes, and
//! everything the fast path does not take goes to it as before. The fast
//! path only ever `try_send`s (the master never waits for a child). When the
//! other end's data queue is full, the route is dropped from the fast path
//! before the frame is handed to the loop: every later message of the link
//! then goes through the loop too, behind that frame, so a link's frames keep
//! their order (and the loop closes the link when the queue is still full).
//!
//! Only a master on a current-thread runtime (as `Cluster::run_blocking` runs
//! it) takes the fast path: there the readers and the loop never run at the
//! same time, so the room the router counted on a data queue within one of
//! its steps cannot be taken by a reader meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::identity::{LinkId, ProcKey};
use crate::ipc::{FromChild, ToChild};
use crate::supervisor::Proc;

/// The links the fast path relays; cheap to clone (one per reader task).
#[derive(Debug, Clone, Default)]
pub(crate) struct Relay {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    routes: Mutex<HashMap<LinkId, Route>>,
    /// Frames relayed by the fast path (the router counts the others).
    frames: AtomicU64,
}

/// Both ends of one link, with their data queues.
#[derive(Debug)]
struct Route {
    worker: ProcKey,
    agent: ProcKey,
    to_worker: mpsc::Sender<ToChild>,
    to_agent: mpsc::Sender<ToChild>,
}

/// A link message as it travels from one end to the other.
enum Relayed {
    Frame(Bytes),
    Credit(u32),
}

impl Relayed {
    fn from_child(msg: FromChild) -> Result<(LinkId, Relayed), FromChild> {
        match msg {
            FromChild::LinkFrame { link, frame } => Ok((link, Relayed::Frame(frame))),
            FromChild::LinkCredit { link, credit } => Ok((link, Relayed::Credit(credit))),
            other => Err(other),
        }
    }

    fn into_to_child(self, link: LinkId) -> ToChild {
        match self {
            Relayed::Frame(frame) => ToChild::LinkFrame { link, frame },
            Relayed::Credit(credit) => ToChild::LinkCredit { link, credit },
        }
    }

    fn into_from_child(self, link: LinkId) -> FromChild {
        match self {
            Relayed::Frame(frame) => FromChild::LinkFrame { link, frame },
            Relayed::Credit(credit) => FromChild::LinkCredit { link, credit },
        }
    }
}

impl Relay {
    /// Relays `link` between `worker` and `agent` from now on.
    pub(crate) fn insert(&self, link: LinkId, worker: &Proc, agent: &Proc) {
        let route = Route {
            worker: worker.key,
            agent: agent.key,
            to_worker: worker.data.clone(),
            to_agent: agent.data.clone(),
        };
        self.lock().insert(link, route);
    }

    /// `link` is closed (or leaves the fast path).
    pub(crate) fn remove(&self, link: LinkId) {
        self.lock().remove(&link);
    }

    /// The frames the fast path relayed so far.
    pub(crate) fn frames(&self) -> u64 {
        self.shared.frames.load(Ordering::Relaxed)
    }

    /// Relays `msg` from process `from` when it is a frame or a credit of a
    /// link `from` is an end of and the other end's data queue has room;
    /// otherwise gives it back, for the master's loop. Never waits.
    pub(crate) fn forward(&self, from: ProcKey, msg: FromChild) -> Result<(), FromChild> {
        let (link, relayed) = Relayed::from_child(msg)?;
        let mut routes = self.lock();
        let Some(route) = routes.get(&link) else { return Err(relayed.into_from_child(link)) };
        let tx = if route.worker == from {
            &route.to_agent
        } else if route.agent == from {
            &route.to_worker
        } else {
            return Err(relayed.into_from_child(link));
        };
        if tx.is_closed() {
            return Err(relayed.into_from_child(link));
        }
        if tx.capacity() == 0 {
            // This frame and every later one of the link go through the loop, in order.
            routes.remove(&link);
            return Err(relayed.into_from_child(link));
        }
        let frame = matches!(relayed, Relayed::Frame(_));
        match tx.try_send(relayed.into_to_child(link)) {
            Ok(()) => {
                if frame {
                    self.shared.frames.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            // Room was checked under the lock, and no other task runs meanwhile
            // (a current-thread master): never. The loop then decides.
            Err(e) => {
                routes.remove(&link);
                Err(match e.into_inner() {
                    ToChild::LinkFrame { link, frame } => FromChild::LinkFrame { link, frame },
                    ToChild::LinkCredit { link, credit } => FromChild::LinkCredit { link, credit },
                    _ => FromChild::LinkClose { link },
                })
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<LinkId, Route>> {
        self.shared.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
