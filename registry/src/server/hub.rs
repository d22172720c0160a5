//! The server's watchers, and the fan-out of changes to them.

use std::collections::{HashMap, HashSet};

use super::conn_id::ConnId;
use super::outbound::EventSender;
use crate::wire::{RequestId, ServerMessage, ServiceEvent, WatchEvent, WatchSpec};

/// What a watcher follows.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// Changes of keys.
    Keys(WatchSpec),
    /// Joins and leaves of one service.
    Service(String),
}

#[derive(Debug)]
pub(crate) struct Watcher {
    pub(crate) target: Target,
    /// False while the watch catches up on history: live changes are not pushed yet.
    pub(crate) live: bool,
    /// Changes older than this are not pushed (the revision after the one the watch caught up to).
    pub(crate) from_revision: u64,
    events: EventSender,
}

/// Every watch of every connection, keyed by connection and watch id, with an
/// index by watched key so a change costs the watchers of its key plus the
/// prefix watchers, not one look at every watch (a Leader may hold 100 000).
#[derive(Debug, Default)]
pub(crate) struct Watchers {
    map: HashMap<(ConnId, RequestId), Watcher>,
    /// The exact-key watchers of each key.
    by_key: HashMap<String, HashSet<(ConnId, RequestId)>>,
    /// Prefix and service watchers (looked at on every change of their kind).
    others: HashSet<(ConnId, RequestId)>,
}

impl Watchers {
    /// How many watches exist, live or catching up.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Adds a watcher that is not live yet (replacing one with the same ids, which
    /// the session refuses before it gets here).
    pub(crate) fn insert(&mut self, conn: ConnId, id: RequestId, target: Target, events: EventSender) {
        self.remove(conn, id);
        self.map.insert((conn, id), Watcher { target, live: false, from_revision: 0, events });
        self.index(conn, id);
    }

    fn index(&mut self, conn: ConnId, id: RequestId) {
        if let Some(watcher) = self.map.get(&(conn, id)) {
            match &watcher.target {
                Target::Keys(WatchSpec::Key(key)) => {
                    self.by_key.entry(key.clone()).or_default().insert((conn, id));
                }
                _ => {
                    self.others.insert((conn, id));
                }
            }
        }
    }

    fn unindex(&mut self, conn: ConnId, id: RequestId, target: &Target) {
        match target {
            Target::Keys(WatchSpec::Key(key)) => {
                if let Some(set) = self.by_key.get_mut(key) {
                    set.remove(&(conn, id));
                    if set.is_empty() {
                        self.by_key.remove(key);
                    }
                }
            }
            _ => {
                self.others.remove(&(conn, id));
            }
        }
    }

    pub(crate) fn get_mut(&mut self, conn: ConnId, id: RequestId) -> Option<&mut Watcher> {
        self.map.get_mut(&(conn, id))
    }

    pub(crate) fn remove(&mut self, conn: ConnId, id: RequestId) -> bool {
        match self.map.remove(&(conn, id)) {
            Some(watcher) => {
                self.unindex(conn, id, &watcher.target);
                true
            }
            None => false,
        }
    }

    /// Pushes a key change to every live watcher it matches.
    pub(crate) fn publish_change(&self, event: &WatchEvent) {
        let exact = self.by_key.get(event.key()).into_iter().flatten();
        for (conn, watch_id) in exact.chain(&self.others) {
            let Some(watcher) = self.map.get(&(*conn, *watch_id)) else { continue };
            if let Target::Keys(spec) = &watcher.target
                && watcher.live
                && event.revision() >= watcher.from_revision
                && spec.matches(event.key())
            {
                watcher.events.push(ServerMessage::Event { watch_id: *watch_id, event: event.clone() });
            }
        }
    }

    /// Pushes a join or leave to every live watcher of its service.
    pub(crate) fn publish_service(&self, event: &ServiceEvent) {
        for (conn, watch_id) in &self.others {
            let Some(watcher) = self.map.get(&(*conn, *watch_id)) else { continue };
            if let Target::Service(service) = &watcher.target
                && watcher.live
                && service == event.service()
            {
                watcher.events.push(ServerMessage::ServiceEvent { watch_id: *watch_id, event: event.clone() });
            }
        }
    }
}
