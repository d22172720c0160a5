//! The server's shared state: the store, the service registry and the watchers
//! behind one lock, so every change reaches every watcher in revision order.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tandem_protocol::RemoteError;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::config::Config;
use super::conn_id::ConnId;
use super::hub::{Target, Watchers};
use super::outbound::EventSender;
use super::services::Services;
use super::store::{Replay, Store};
use crate::wire::{Instance, KeyValue, LeaseId, RequestId, ServerInfo, ServerMessage, ServiceEvent, Stats, WatchEvent};

#[derive(Debug)]
struct State {
    store: Store,
    services: Services,
    watchers: Watchers,
}

/// Everything the sessions share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// This server's incarnation (a UUID v4 drawn at start), announced in every hello.
    incarnation: String,
    state: Mutex<State>,
    connections: AtomicU64,
    accepted_total: AtomicU64,
    /// Wakes the lease reaper when a lease may expire earlier than it planned.
    pub(crate) leases_changed: Notify,
}

/// How far a watch got in catching up.
#[derive(Debug)]
pub(crate) enum CatchUp {
    /// The watch is live (or was cancelled meanwhile): nothing more to send.
    Live,
    /// Send these, then continue from `next`.
    Replay { events: Vec<WatchEvent>, next: u64 },
}

impl Shared {
    pub(crate) fn new(config: Config) -> Self {
        let state =
            State { store: Store::new(config.history), services: Services::default(), watchers: Watchers::default() };
        Shared {
            config,
            incarnation: uuid::Uuid::new_v4().to_string(),
            state: Mutex::new(state),
            connections: AtomicU64::new(0),
            accepted_total: AtomicU64::new(0),
            leases_changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the state is still consistent
        // (every mutation completes before the events it causes are pushed).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a new connection and returns its id.
    pub(crate) fn connection_opened(&self) -> ConnId {
        // Under the lock, like every other change the stats see.
        let _state = self.lock();
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.accepted_total.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// The counters; `connections` counts every open connection.
    pub(crate) fn stats(&self) -> Stats {
        let state = self.lock();
        Stats {
            connections: self.connections.load(Ordering::Relaxed),
            accepted_total: self.accepted_total.load(Ordering::Relaxed),
            watches: state.watchers.len() as u64,
            keys: state.store.len() as u64,
            instances: state.services.len() as u64,
        }
    }

    pub(crate) fn get(&self, key: &str) -> (Option<KeyValue>, u64) {
        let state = self.lock();
        (state.store.get(key), state.store.revision())
    }

    /// What a new connection is told first.
    pub(crate) fn hello(&self) -> ServerInfo {
        ServerInfo { incarnation: self.incarnation.clone(), revision: self.revision() }
    }

    pub(crate) fn revision(&self) -> u64 {
        self.lock().store.revision()
    }

    pub(crate) fn put(&self, key: String, value: Bytes) -> u64 {
        let mut state = self.lock();
        let event = state.store.put(key, value);
        state.watchers.publish_change(&event);
        event.revision()
    }

    pub(crate) fn delete(&self, key: &str) -> Option<u64> {
        let mut state = self.lock();
        let event = state.store.delete(key)?;
        state.watchers.publish_change(&event);
        Some(event.revision())
    }

    /// Adds a watcher that stays silent until [`Shared::catch_up`] or [`Shared::service_live`] makes it live.
    pub(crate) fn add_watcher(&self, conn: ConnId, id: RequestId, target: Target, events: EventSender) {
        self.lock().watchers.insert(conn, id, target, events);
    }

    pub(crate) fn remove_watcher(&self, conn: ConnId, id: RequestId) -> bool {
        self.lock().watchers.remove(conn, id)
    }

    /// The next step of a key watch that must see every change from revision `from`
    /// (`None`: only changes from now on). When nothing is left to replay, the watch
    /// turns live and `Progress` goes into `permit`, atomically with respect to changes.
    pub(crate) fn catch_up(
        &self,
        conn: ConnId,
        id: RequestId,
        from: Option<u64>,
        max: usize,
        permit: mpsc::Permit<'_, ServerMessage>,
    ) -> CatchUp {
        let mut state = self.lock();
        let State { store, watchers, .. } = &mut *state;
        let Some(watcher) = watchers.get_mut(conn, id) else { return CatchUp::Live };
        let Target::Keys(spec) = &watcher.target else { return CatchUp::Live };
        let replay = match from {
            Some(from) => store.replay(spec, from, max),
            None => Replay::CaughtUp,
        };
        match replay {
            Replay::CaughtUp => {
                let from = from.unwrap_or(0);
                watcher.live = true;
                watcher.from_revision = from;
                // `from` is at most the next revision here (a later start is a snapshot).
                let revision = store.revision();
                permit.send(ServerMessage::Progress { watch_id: id, revision });
                CatchUp::Live
            }
            Replay::Events { events, next } => CatchUp::Replay { events, next },
            Replay::Snapshot { compact_revision, revision, values } => {
                let mut events = Vec::with_capacity(values.len() + 1);
                events.push(WatchEvent::Compacted { compact_revision, revision });
                events.extend(values.into_iter().map(|kv| WatchEvent::Put {
                    key: kv.key,
                    value: kv.value,
                    revision: kv.mod_revision,
                }));
                CatchUp::Replay { events, next: revision + 1 }
            }
        }
    }

    /// Makes a service watcher live, sending the service's current instances into `permit`.
    pub(crate) fn service_live(&self, conn: ConnId, id: RequestId, permit: mpsc::Permit<'_, ServerMessage>) {
        let mut state = self.lock();
        let State { services, watchers, .. } = &mut *state;
        let Some(watcher) = watchers.get_mut(conn, id) else { return };
        let Target::Service(service) = &watcher.target else { return };
        let instances = services.discover(service);
        watcher.live = true;
        permit.send(ServerMessage::ServiceSnapshot { watch_id: id, instances });
    }

    pub(crate) fn register(&self, conn: ConnId, instance: Instance, ttl: Duration) -> LeaseId {
        let mut state = self.lock();
        let event = ServiceEvent::Join(instance.clone());
        let lease = state.services.register(conn, instance, ttl, Instant::now());
        state.watchers.publish_service(&event);
        drop(state);
        self.leases_changed.notify_one();
        lease
    }

    pub(crate) fn keep_alive(&self, conn: ConnId, lease: LeaseId) -> Result<Duration, RemoteError> {
        self.lock().services.keep_alive(conn, lease, Instant::now())
    }

    pub(crate) fn deregister(&self, conn: ConnId, lease: LeaseId) -> Result<(), RemoteError> {
        let mut state = self.lock();
        let event = state.services.deregister(conn, lease)?;
        state.watchers.publish_service(&event);
        Ok(())
    }

    pub(crate) fn discover(&self, service: &str) -> Vec<Instance> {
        self.lock().services.discover(service)
    }

    /// Ends the leases whose deadline passed; returns how many.
    pub(crate) fn expire_leases(&self, now: Instant) -> usize {
        let mut state = self.lock();
        let left = state.services.expire(now);
        for event in &left {
            state.watchers.publish_service(event);
        }
        left.len()
    }

    /// Whether connection `conn` holds a lease (it is not idle then, however quiet).
    pub(crate) fn holds_lease(&self, conn: ConnId) -> bool {
        self.lock().services.holds_lease(conn)
    }

    pub(crate) fn next_lease_deadline(&self) -> Option<Instant> {
        self.lock().services.next_deadline()
    }

    /// Forgets a closing connection: its watches, its leases (their instances leave) and
    /// its place in the open-connections count, atomically with respect to [`Shared::stats`].
    pub(crate) fn close_connection(&self, conn: ConnId, watches: &HashSet<RequestId>) {
        let mut state = self.lock();
        self.connections.fetch_sub(1, Ordering::Relaxed);
        for id in watches {
            state.watchers.remove(conn, *id);
        }
        let left = state.services.remove_connection(conn);
        for event in &left {
            state.watchers.publish_service(event);
        }
    }
}
