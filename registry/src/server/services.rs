//! The service registry: instances of services, each held by a lease that its
//! registering connection keeps alive.

use crate::code;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tandem_protocol::RemoteError;
use tokio::time::Instant;

use super::conn_id::ConnId;
use crate::wire::{Instance, LeaseId, ServiceEvent};

#[derive(Debug)]
struct Lease {
    conn: ConnId,
    ttl: Duration,
    deadline: Instant,
    service: String,
    id: String,
}

#[derive(Debug)]
struct Registered {
    instance: Instance,
    lease: LeaseId,
}

/// Instances by service and id, and the leases that hold them.
#[derive(Debug, Default)]
pub(crate) struct Services {
    services: BTreeMap<String, BTreeMap<String, Registered>>,
    leases: HashMap<LeaseId, Lease>,
    last_lease: LeaseId,
}

impl Services {
    /// How many instances are registered.
    pub(crate) fn len(&self) -> usize {
        self.leases.len()
    }

    /// The instances of `service`, ordered by id.
    pub(crate) fn discover(&self, service: &str) -> Vec<Instance> {
        self.services.get(service).map(|m| m.values().map(|r| r.instance.clone()).collect()).unwrap_or_default()
    }

    /// Registers `instance` under a new lease held by `conn`, replacing any
    /// instance with the same service and id (whose lease ends).
    pub(crate) fn register(&mut self, conn: ConnId, instance: Instance, ttl: Duration, now: Instant) -> LeaseId {
        self.last_lease += 1;
        let lease = self.last_lease;
        self.leases.insert(
            lease,
            Lease { conn, ttl, deadline: now + ttl, service: instance.service.clone(), id: instance.id.clone() },
        );
        let replaced = self
            .services
            .entry(instance.service.clone())
            .or_default()
            .insert(instance.id.clone(), Registered { instance, lease });
        if let Some(old) = replaced {
            self.leases.remove(&old.lease);
        }
        lease
    }

    /// Pushes a lease's deadline one TTL into the future; returns the TTL.
    pub(crate) fn keep_alive(&mut self, conn: ConnId, lease: LeaseId, now: Instant) -> Result<Duration, RemoteError> {
        let held = self.leases.get_mut(&lease).filter(|l| l.conn == conn).ok_or_else(|| unknown_lease(lease))?;
        held.deadline = now + held.ttl;
        Ok(held.ttl)
    }

    /// Ends a lease held by `conn` and returns the `Leave` of its instance.
    pub(crate) fn deregister(&mut self, conn: ConnId, lease: LeaseId) -> Result<ServiceEvent, RemoteError> {
        if self.leases.get(&lease).is_none_or(|l| l.conn != conn) {
            return Err(unknown_lease(lease));
        }
        self.end(lease).ok_or_else(|| unknown_lease(lease))
    }

    /// Ends every lease whose deadline is at or before `now`.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<ServiceEvent> {
        let expired: Vec<LeaseId> = self.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        expired.into_iter().filter_map(|lease| self.end(lease)).collect()
    }

    /// Ends every lease held by a closing connection.
    pub(crate) fn remove_connection(&mut self, conn: ConnId) -> Vec<ServiceEvent> {
        let held: Vec<LeaseId> = self.leases.iter().filter(|(_, l)| l.conn == conn).map(|(id, _)| *id).collect();
        held.into_iter().filter_map(|lease| self.end(lease)).collect()
    }

    /// Whether `conn` holds at least one lease.
    pub(crate) fn holds_lease(&self, conn: ConnId) -> bool {
        self.leases.values().any(|l| l.conn == conn)
    }

    /// The earliest lease deadline, if any lease exists.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }

    fn end(&mut self, lease: LeaseId) -> Option<ServiceEvent> {
        let Lease { service, id, .. } = self.leases.remove(&lease)?;
        let instances = self.services.get_mut(&service)?;
        instances.remove(&id)?;
        if instances.is_empty() {
            self.services.remove(&service);
        }
        Some(ServiceEvent::Leave { service, id })
    }
}

fn unknown_lease(lease: LeaseId) -> RemoteError {
    RemoteError::bad_request(format!("lease {lease} is not held by this connection (expired or never granted)"))
        .with_code(code::UNKNOWN_LEASE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    #[test]
    fn a_lease_expires_unless_kept_alive() {
        let mut services = Services::default();
        let t0 = Instant::now();
        let a = services.register(1, Instance::new("svc", "a", "127.0.0.1:1"), TTL, t0);
        services.register(1, Instance::new("svc", "b", "127.0.0.1:2"), TTL, t0);
        assert_eq!(services.next_deadline(), Some(t0 + TTL));
        assert_eq!(services.keep_alive(1, a, t0 + Duration::from_secs(2)), Ok(TTL));
        assert!(services.keep_alive(2, a, t0).is_err(), "another connection cannot keep a lease alive");
        let left = services.expire(t0 + TTL);
        assert_eq!(left, vec![ServiceEvent::Leave { service: "svc".into(), id: "b".into() }]);
        assert_eq!(services.discover("svc").iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), vec!["a"]);
        assert!(services.expire(t0 + Duration::from_secs(4)).is_empty());
        assert_eq!(services.expire(t0 + Duration::from_secs(5)).len(), 1);
        assert_eq!(services.len(), 0);
        assert!(services.keep_alive(1, a, t0).is_err());
    }

    #[test]
    fn re_registering_an_id_replaces_the_old_lease() {
        let mut services = Services::default();
        let t0 = Instant::now();
        let old = services.register(1, Instance::new("svc", "a", "old"), TTL, t0);
        let new = services.register(2, Instance::new("svc", "a", "new"), TTL, t0);
        assert_eq!(services.len(), 1);
        assert_eq!(services.discover("svc")[0].address, "new");
        assert!(services.deregister(1, old).is_err());
        assert!(services.remove_connection(1).is_empty());
        assert_eq!(services.remove_connection(2), vec![ServiceEvent::Leave { service: "svc".into(), id: "a".into() }]);
        assert!(services.deregister(2, new).is_err());
        assert!(services.discover("svc").is_empty());
    }
}
