//! The handle: key-value calls, watches and service registration over one
//! member at a time.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Config;
use crate::error::Error;
use crate::failover::ConnectionState;
use crate::handle::Handle;
use crate::kv::{KeyValue, Keys, Snapshot};
use crate::registration::Registration;
use crate::services::{self, ServiceWatch};
use crate::watch::{Start, Watch};

/// A typed etcd client that talks to one member at a time and moves on when it
/// fails. Cheap to clone; every clone shares the one connection. The
/// connection, and every watch and registration, ends when the last clone (and
/// the last [`Watch`] / [`Registration`] made from it) is dropped.
#[derive(Clone, Debug)]
pub struct EtcdClient {
    /// The shared connection, and the deadline of this handle's calls.
    handle: Handle,
}

impl EtcdClient {
    /// Starts a client and waits for the first round over the endpoints: it
    /// returns once a member answers, or fails with [`Error::Unavailable`] if none
    /// does (or [`Error::Config`] for an empty list).
    pub async fn connect(config: Config) -> Result<EtcdClient, Error> {
        let client = EtcdClient::start(config)?;
        let mut state = client.state();
        let state = state.wait_for(|state| !matches!(state, ConnectionState::Connecting)).await;
        match state.as_deref() {
            Ok(ConnectionState::Connected { .. }) => Ok(client),
            Ok(ConnectionState::Unavailable { reason }) => Err(Error::unavailable(reason.clone(), None)),
            Ok(ConnectionState::Refused { reason }) => Err(Error::Unauthenticated { reason: reason.clone() }),
            _ => Err(Error::unavailable(client.endpoints().join(","), None)),
        }
    }

    /// Starts a client without waiting for any member: it connects (and keeps
    /// reconnecting, with backoff) in the background; calls fail with
    /// [`Error::Unavailable`] while no member answers, and watches start
    /// flowing once one does. Fails only with [`Error::Config`] (no endpoint).
    pub fn start(config: Config) -> Result<EtcdClient, Error> {
        Ok(EtcdClient { handle: Handle::start(config)? })
    }

    /// The connection's state, to read or to await a transition.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.handle.failover().state()
    }

    /// The member in use, if any.
    pub fn endpoint(&self) -> Option<String> {
        match &*self.state().borrow() {
            ConnectionState::Connected { endpoint } => Some(endpoint.clone()),
            _ => None,
        }
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.config().endpoints
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        self.handle.config()
    }

    /// A handle whose calls end by `deadline` (or by the request timeout, if
    /// earlier) with their answer or an error.
    pub fn until(&self, deadline: Instant) -> EtcdClient {
        EtcdClient { handle: self.handle.until(deadline) }
    }

    /// Reads one key.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        let snapshot = self.get_range(&Keys::exact(key)).await?;
        Ok(snapshot.kvs.into_iter().next())
    }

    /// Reads a key or every key under a prefix, with the revision it was read at.
    pub async fn get_range(&self, keys: &Keys) -> Result<Snapshot, Error> {
        let response = self.handle.call(|mut c| async move { c.get(keys.key(), keys.get_options()).await }).await?;
        Ok(Snapshot {
            revision: response.header().map_or(0, |h| h.revision()),
            kvs: response.kvs().iter().map(KeyValue::from_etcd).collect(),
        })
    }

    /// Writes a key; returns the revision of the write.
    pub async fn put(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<i64, Error> {
        let value = value.into();
        let response = self.handle.call(|mut c| async move { c.put(key, value, None).await }).await?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    /// Deletes a key; returns the revision of the deletion if the key existed.
    pub async fn delete(&self, key: &str) -> Result<Option<i64>, Error> {
        let response = self.handle.call(|mut c| async move { c.delete(key, None).await }).await?;
        Ok((response.deleted() > 0).then(|| response.header().map_or(0, |h| h.revision())))
    }

    /// Watches a key or a prefix. The watch outlives member failures and
    /// outages: it resumes from the revision after the last event it delivered,
    /// and when etcd no longer has that revision it re-reads the range and says
    /// so with a [`WatchEvent::Compacted`](crate::WatchEvent::Compacted).
    pub fn watch(&self, keys: Keys, start: Start) -> Watch {
        Watch::spawn(self.handle.clone(), keys, start)
    }

    /// Registers `value` (as JSON) under `<services_prefix><service>/<id>`,
    /// attached to a lease of `ttl` (whole seconds, at least 1; etcd may raise
    /// it to its minimum) that a background task keeps alive, re-granting it and
    /// re-writing the key if etcd let it expire (after an outage longer than
    /// `ttl`). If this process dies, the lease expires and the key vanishes.
    pub async fn register(
        &self,
        service: &str,
        id: &str,
        value: &impl Serialize,
        ttl: Duration,
    ) -> Result<Registration, Error> {
        let key = services::instance_key(self.config(), service, id);
        let value = serde_json::to_vec(value).map_err(|source| Error::Json { key: key.clone(), source })?;
        Registration::start(self.handle.clone(), key, value, ttl).await
    }

    /// Removes an instance whoever registered it (its lease, if any, stays
    /// until it expires); whether it existed.
    pub async fn remove_instance(&self, service: &str, id: &str) -> Result<bool, Error> {
        Ok(self.delete(&services::instance_key(self.config(), service, id)).await?.is_some())
    }

    /// The instances of a service, decoded from JSON (entries that do not
    /// decode are skipped and logged), sorted by id.
    pub async fn discover<T: DeserializeOwned>(&self, service: &str) -> Result<Vec<T>, Error> {
        let keys = Keys::prefix(services::service_prefix(self.config(), service));
        let snapshot = self.get_range(&keys).await?;
        Ok(snapshot.kvs.iter().filter_map(|kv| services::decode(kv)).collect())
    }

    /// A stream of a service's instance list: the current list first, then the
    /// whole list again after every change.
    pub fn watch_service<T: DeserializeOwned>(&self, service: &str) -> ServiceWatch<T> {
        let prefix = services::service_prefix(self.config(), service);
        ServiceWatch::new(self.watch(Keys::prefix(prefix), Start::Snapshot))
    }
}
