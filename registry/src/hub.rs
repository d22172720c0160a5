//! The server's watchers, and the fan-out of changes to them.

use std::collections::HashMap;

use crate::outbound::EventSender;
use crate::services::ServiceEvent;
use crate::session::ConnId;
use crate::watch::{WatchEvent, WatchSpec};
use crate::wire::{RequestId, ServerMessage};

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
    /// Changes older than this are not pushed (a watch may start from a future revision).
    pub(crate) from_revision: u64,
    events: EventSender,
}

/// Every watch of every connection, keyed by connection and watch id.
#[derive(Debug, Default)]
pub(crate) struct Watchers {
    map: HashMap<(ConnId, RequestId), Watcher>,
}

impl Watchers {
    /// How many watches exist, live or catching up.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Adds a watcher that is not live yet.
    pub(crate) fn insert(&mut self, conn: ConnId, id: RequestId, target: Target, events: EventSender) {
        self.map.insert((conn, id), Watcher { target, live: false, from_revision: 0, events });
    }

    pub(crate) fn get_mut(&mut self, conn: ConnId, id: RequestId) -> Option<&mut Watcher> {
        self.map.get_mut(&(conn, id))
    }

    pub(crate) fn remove(&mut self, conn: ConnId, id: RequestId) -> bool {
        self.map.remove(&(conn, id)).is_some()
    }

    /// Pushes a key change to every live watcher it matches.
    pub(crate) fn publish_change(&self, event: &WatchEvent) {
        for ((_, watch_id), watcher) in &self.map {
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
        for ((_, watch_id), watcher) in &self.map {
            if let Target::Service(service) = &watcher.target
                && watcher.live
                && service == event.service()
            {
                watcher.events.push(ServerMessage::ServiceEvent { watch_id: *watch_id, event: event.clone() });
            }
        }
    }
}
