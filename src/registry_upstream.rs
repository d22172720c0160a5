//! The bundled registry behind a Leader: the reference [`Upstream`] adapter.
//!
//! Two channels, defined once and shared by every process:
//! - [`ConfigApi`] (`"config"`): get / put / delete keys; subscribe to a key to
//!   receive its value on every change (`None` when deleted).
//! - [`ServiceApi`] (`"services"`): register / deregister / discover instances;
//!   subscribe to a service to receive its full instance list on every change.
//!
//! [`RegistryUpstream`] implements both over ONE [`tandem_registry::Client`]
//! connection. It is the pattern to copy for your own client: it reconnects when
//! the registry connection drops (reporting the channel as down, and calls as
//! `Unavailable`, meanwhile),
//! resumes each key watch from its last revision so no change is missed, and
//! re-registers the instances it holds.
//!
//! ```no_run
//! use tandem::registry_upstream::{ConfigApi, RegistryUpstream, ServiceApi};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let upstream = RegistryUpstream::connect("127.0.0.1:7000").await?;
//! let leader = tandem::Leader::builder()
//!     .channel::<ConfigApi, _>({ let u = upstream.clone(); async move { Ok(u) } })
//!     .channel::<ServiceApi, _>(async move { Ok(upstream) })
//!     .start();
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tandem_leader::{CallContext, EventSink, Upstream};
use tandem_protocol::{Api, RemoteError, UpstreamState};
use tandem_registry::{Client, Instance, Registration, ServiceEvent, WatchEvent, WatchSpec};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::follow_tasks::FollowTasks;

/// The config-center channel.
#[derive(Debug)]
pub struct ConfigApi;

/// A call on [`ConfigApi`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ConfigRequest {
    /// Read a key.
    Get(String),
    /// Write a key.
    Put(String, String),
    /// Delete a key.
    Delete(String),
}

/// The answer to a [`ConfigRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ConfigResponse {
    /// For `Get`: the value, if the key exists.
    Value(Option<ConfigValue>),
    /// For `Put`: the revision of the write.
    Revision(u64),
    /// For `Delete`: the revision of the deletion, if the key existed.
    Deleted(Option<u64>),
}

/// A key's value at some revision; `value` is `None` once the key is deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigValue {
    /// The value (UTF-8; invalid bytes are replaced).
    pub value: Option<String>,
    /// The registry revision that produced it.
    pub revision: u64,
}

impl Api for ConfigApi {
    const NAME: &'static str = "config";
    type Key = String;
    type Event = ConfigValue;
    type Request = ConfigRequest;
    type Response = ConfigResponse;
}

/// The service-registry channel.
#[derive(Debug)]
pub struct ServiceApi;

/// A call on [`ServiceApi`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ServiceRequest {
    /// Register an instance, kept alive by the leader's registry connection.
    Register {
        /// The instance.
        instance: Instance,
        /// Its lease, in milliseconds.
        ttl_ms: u64,
    },
    /// Remove an instance registered through this leader.
    Deregister {
        /// The service.
        service: String,
        /// The instance id.
        id: String,
    },
    /// List a service's instances.
    Discover(String),
}

/// The answer to a [`ServiceRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ServiceResponse {
    /// For `Register`.
    Registered,
    /// For `Deregister`: whether the instance was registered here.
    Deregistered(bool),
    /// For `Discover`.
    Instances(Vec<Instance>),
}

impl Api for ServiceApi {
    const NAME: &'static str = "services";
    type Key = String;
    /// Every instance of the service, sorted by id.
    type Event = Vec<Instance>;
    type Request = ServiceRequest;
    type Response = ServiceResponse;
}

/// One registry connection serving [`ConfigApi`] and [`ServiceApi`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RegistryUpstream {
    inner: Arc<Inner>,
}

/// An instance registered through this upstream: what to re-register after a
/// reconnect, and the live registration (none while disconnected).
type Held = (Instance, Duration, Option<Registration>);

#[derive(Debug)]
struct Inner {
    addr: String,
    /// The live client, or `None` while reconnecting.
    client: watch::Sender<Option<Client>>,
    /// `Ready`, or `Down` while reconnecting: followers see it as the channel's state.
    health: watch::Sender<UpstreamState>,
    watches: FollowTasks,
    registrations: Mutex<HashMap<(String, String), Held>>,
    cancel: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn unavailable(error: tandem_registry::Error) -> RemoteError {
    match error {
        tandem_registry::Error::Remote(remote) => remote,
        other => RemoteError::unavailable(format!("registry: {other}")).with_code("registry"),
    }
}

const RECONNECT_MAX: Duration = Duration::from_secs(2);

impl RegistryUpstream {
    /// Connects to the registry at `addr` (for example `127.0.0.1:7000`).
    pub async fn connect(addr: impl Into<String>) -> Result<Self, RemoteError> {
        let addr = addr.into();
        let client = Client::connect(addr.as_str()).await.map_err(unavailable)?;
        let inner = Arc::new(Inner {
            addr,
            client: watch::Sender::new(Some(client)),
            health: watch::Sender::new(UpstreamState::Ready),
            watches: FollowTasks::default(),
            registrations: Mutex::default(),
            cancel: CancellationToken::new(),
        });
        tokio::spawn(reconnect_loop(Arc::downgrade(&inner), inner.cancel.clone()));
        Ok(RegistryUpstream { inner })
    }

    /// The live registry client, waiting (until `deadline`) while reconnecting.
    async fn client(&self, deadline: tokio::time::Instant) -> Result<Client, RemoteError> {
        let mut rx = self.inner.client.subscribe();
        match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(client)) => client.clone().ok_or_else(|| RemoteError::internal("client vanished")),
            _ => Err(RemoteError::unavailable(format!("registry at {} unreachable", self.inner.addr))),
        }
    }

    async fn register(
        &self,
        instance: Instance,
        ttl: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<(), RemoteError> {
        let client = self.client(deadline).await?;
        let registration = client.register(instance.clone(), ttl).await.map_err(unavailable)?;
        let key = (instance.service.clone(), instance.id.clone());
        let mut registrations = self.inner.registrations.lock().unwrap_or_else(|p| p.into_inner());
        registrations.insert(key, (instance, ttl, Some(registration)));
        Ok(())
    }
}

/// Replaces the client when its connection dies, with backoff; re-registers instances.
async fn reconnect_loop(inner: std::sync::Weak<Inner>, cancel: CancellationToken) {
    loop {
        let Some(client) = inner.upgrade().and_then(|i| i.client.borrow().clone()) else { return };
        let error = tokio::select! {
            error = client.closed() => error,
            _ = cancel.cancelled() => return,
        };
        let Some(strong) = inner.upgrade() else { return };
        tracing::warn!(registry = %strong.addr, %error, "registry connection lost; reconnecting");
        strong.client.send_replace(None);
        strong.health.send_replace(UpstreamState::Down(
            RemoteError::unavailable(format!("registry at {} unreachable; reconnecting", strong.addr))
                .with_code("registry"),
        ));
        let addr = strong.addr.clone();
        drop(strong);
        let mut delay = Duration::from_millis(20);
        let client = loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                connected = Client::connect(addr.as_str()) => match connected {
                    Ok(client) => break client,
                    Err(error) => tracing::debug!(%error, "registry still unreachable"),
                },
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RECONNECT_MAX);
        };
        let Some(strong) = inner.upgrade() else { return };
        let held: Vec<(Instance, Duration)> = strong
            .registrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(instance, ttl, _)| (instance.clone(), *ttl))
            .collect();
        for (instance, ttl) in held {
            match client.register(instance.clone(), ttl).await {
                Ok(registration) => {
                    let mut registrations = strong.registrations.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(entry) = registrations.get_mut(&(instance.service.clone(), instance.id.clone())) {
                        entry.2 = Some(registration);
                    }
                }
                Err(error) => {
                    tracing::warn!(service = %instance.service, id = %instance.id, %error, "re-register failed")
                }
            }
        }
        tracing::info!(registry = %addr, "registry connection restored");
        strong.client.send_replace(Some(client));
        strong.health.send_replace(UpstreamState::Ready);
    }
}

/// Feeds one key's changes into `sink`, resuming after reconnects from the last revision.
async fn follow_key(upstream: RegistryUpstream, key: String, sink: EventSink<ConfigApi>, mut from: u64) {
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    while !sink.is_closed() {
        let Ok(client) = upstream.client(far()).await else { continue };
        let mut watch = match client.watch(WatchSpec::key(key.clone()), Some(from)).await {
            Ok(watch) => watch,
            Err(error) => {
                tracing::debug!(%error, key, "watch failed; retrying");
                let _ = client.closed().await;
                continue;
            }
        };
        while let Some(event) = watch.next().await {
            let value = match event {
                Ok(WatchEvent::Put { value, revision, .. }) => {
                    ConfigValue { value: Some(String::from_utf8_lossy(&value).into_owned()), revision }
                }
                Ok(WatchEvent::Delete { revision, .. }) => ConfigValue { value: None, revision },
                Ok(WatchEvent::Compacted { revision, .. }) => {
                    // History was lost: a snapshot Put follows only if the key exists now.
                    match client.get(&key).await {
                        Ok(Some(_)) => continue,
                        Ok(None) => ConfigValue { value: None, revision },
                        Err(_) => break,
                    }
                }
                Ok(_) => continue,
                Err(error) => {
                    tracing::debug!(%error, key, "watch ended; resuming from revision {from}");
                    break;
                }
            };
            from = value.revision + 1;
            if !sink.send(value) {
                return;
            }
        }
    }
}

/// Feeds one service's instance list into `sink` on every change.
async fn follow_service(upstream: RegistryUpstream, service: String, sink: EventSink<ServiceApi>) {
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    while !sink.is_closed() {
        let Ok(client) = upstream.client(far()).await else { continue };
        let mut watch = match client.watch_service(&service).await {
            Ok(watch) => watch,
            Err(error) => {
                tracing::debug!(%error, service, "service watch failed; retrying");
                let _ = client.closed().await;
                continue;
            }
        };
        let mut instances: BTreeMap<String, Instance> = match client.discover(&service).await {
            Ok(list) => list.into_iter().map(|i| (i.id.clone(), i)).collect(),
            Err(_) => continue,
        };
        if !sink.send(instances.values().cloned().collect()) {
            return;
        }
        // The watch opens with one Join per current instance: those change nothing.
        while let Some(event) = watch.next().await {
            let changed = match event {
                Ok(ServiceEvent::Join(instance)) => {
                    instances.insert(instance.id.clone(), instance.clone()).as_ref() != Some(&instance)
                }
                Ok(ServiceEvent::Leave { id, .. }) => instances.remove(&id).is_some(),
                Ok(_) => false,
                Err(_) => break,
            };
            if changed && !sink.send(instances.values().cloned().collect()) {
                return;
            }
        }
    }
}

impl Upstream<ConfigApi> for RegistryUpstream {
    async fn invoke(&self, request: ConfigRequest, ctx: CallContext) -> Result<ConfigResponse, RemoteError> {
        let client = self.client(ctx.deadline()).await?;
        match request {
            ConfigRequest::Get(key) => {
                let value = client.get(&key).await.map_err(unavailable)?;
                Ok(ConfigResponse::Value(value.map(|kv| ConfigValue {
                    value: Some(String::from_utf8_lossy(&kv.value).into_owned()),
                    revision: kv.mod_revision,
                })))
            }
            ConfigRequest::Put(key, value) => {
                Ok(ConfigResponse::Revision(client.put(&key, value.into_bytes()).await.map_err(unavailable)?))
            }
            ConfigRequest::Delete(key) => Ok(ConfigResponse::Deleted(client.delete(&key).await.map_err(unavailable)?)),
        }
    }

    async fn subscribe(&self, key: String, sink: EventSink<ConfigApi>) -> Result<(), RemoteError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let client = self.client(deadline).await?;
        let (current, revision) = client.get_with_revision(&key).await.map_err(unavailable)?;
        // Always the current state, absence included: a follower that saw a value
        // before a failover must learn that the key was deleted meanwhile.
        sink.send(match current {
            Some(kv) => {
                ConfigValue { value: Some(String::from_utf8_lossy(&kv.value).into_owned()), revision: kv.mod_revision }
            }
            None => ConfigValue { value: None, revision },
        });
        self.inner.watches.spawn(
            ConfigApi::NAME,
            key.clone(),
            follow_key(self.clone(), key.clone(), sink, revision + 1),
        );
        Ok(())
    }

    async fn unsubscribe(&self, key: String) -> Result<(), RemoteError> {
        self.inner.watches.stop(ConfigApi::NAME, key);
        Ok(())
    }

    fn health(&self) -> Option<watch::Receiver<UpstreamState>> {
        Some(self.inner.health.subscribe())
    }

    async fn publish(&self, request: ConfigRequest) -> Result<(), RemoteError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        <Self as Upstream<ConfigApi>>::invoke(self, request, CallContext::until(deadline)).await.map(|_| ())
    }
}

impl Upstream<ServiceApi> for RegistryUpstream {
    async fn invoke(&self, request: ServiceRequest, ctx: CallContext) -> Result<ServiceResponse, RemoteError> {
        match request {
            ServiceRequest::Register { instance, ttl_ms } => {
                self.register(instance, Duration::from_millis(ttl_ms.max(1)), ctx.deadline()).await?;
                Ok(ServiceResponse::Registered)
            }
            ServiceRequest::Deregister { service, id } => {
                let held = self.inner.registrations.lock().unwrap_or_else(|p| p.into_inner()).remove(&(service, id));
                match held {
                    Some((_, _, Some(registration))) => {
                        registration.deregister().await.map_err(unavailable)?;
                        Ok(ServiceResponse::Deregistered(true))
                    }
                    Some(_) => Ok(ServiceResponse::Deregistered(true)),
                    None => Ok(ServiceResponse::Deregistered(false)),
                }
            }
            ServiceRequest::Discover(service) => {
                let client = self.client(ctx.deadline()).await?;
                Ok(ServiceResponse::Instances(client.discover(&service).await.map_err(unavailable)?))
            }
        }
    }

    async fn subscribe(&self, service: String, sink: EventSink<ServiceApi>) -> Result<(), RemoteError> {
        self.inner.watches.spawn(
            ServiceApi::NAME,
            service.clone(),
            follow_service(self.clone(), service.clone(), sink),
        );
        Ok(())
    }

    async fn unsubscribe(&self, service: String) -> Result<(), RemoteError> {
        self.inner.watches.stop(ServiceApi::NAME, service);
        Ok(())
    }

    fn health(&self) -> Option<watch::Receiver<UpstreamState>> {
        Some(self.inner.health.subscribe())
    }

    async fn publish(&self, request: ServiceRequest) -> Result<(), RemoteError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        <Self as Upstream<ServiceApi>>::invoke(self, request, CallContext::until(deadline)).await.map(|_| ())
    }
}
