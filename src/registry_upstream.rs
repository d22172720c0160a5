//! The bundled registry behind a Leader: the reference [`Upstream`] adapter.
//!
//! Two channels, defined once and shared by every process:
//! - [`ConfigApi`] (`"config"`): get / put / delete keys; subscribe to a key to
//!   receive its value on every change (`None` when deleted).
//! - [`ServiceApi`] (`"services"`): register / deregister / discover instances;
//!   subscribe to a service to receive its full instance list on every change.
//!
//! [`RegistryUpstream`] implements both over ONE [`tandem_registry::Client`]
//! connection. It is the pattern to copy for your own client:
//! - it starts even when the registry is unreachable, and reconnects whenever
//!   the connection drops, with backoff (reporting the channel as `Down(why)`,
//!   and failing calls at once with `Unavailable`, meanwhile);
//! - a subscribe is acknowledged only once the registry accepted the key's
//!   watch: a refusal (such as the registry's watches-per-connection limit) is
//!   the subscriber's error; while the registry is down a subscribe is accepted
//!   and starts flowing when it comes back;
//! - it resumes each key watch from its last revision so no change is missed,
//!   unless the registry restarted with less state (a new incarnation in its
//!   hello, or a lower revision): then it reads every watched key again and
//!   resumes from the new server's revision (a key that is gone is reported as
//!   deleted);
//! - it re-registers the instances it holds.
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
use tandem_registry::{Client, Instance, Registration, ServiceEvent, ServiceWatch, Watch, WatchEvent, WatchSpec};
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
    /// The live client, or `None` while (re)connecting.
    client: watch::Sender<Option<Client>>,
    /// `Ready`, or `Down(why)` while (re)connecting: followers see it as the channel's state.
    health: watch::Sender<UpstreamState>,
    watches: FollowTasks,
    registrations: Mutex<HashMap<(String, String), Held>>,
    /// The incarnation of the last registry connected to, to tell a restart in the log.
    incarnation: Mutex<Option<String>>,
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
        other => RemoteError::unavailable(format!("registry: {}", chain(&other))).with_code("registry"),
    }
}

/// An error and its causes, for logs and the reason followers see.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The longest wait between two connection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// The first wait between two connection attempts (doubled after each failure).
const RECONNECT_MIN: Duration = Duration::from_millis(20);

impl RegistryUpstream {
    /// Starts the adapter for the registry at `addr` (for example `127.0.0.1:7000`).
    ///
    /// Tries to connect once. If the registry is unreachable it still returns
    /// the adapter, logs why at WARN, and keeps reconnecting in the background
    /// (backoff from 20 ms to 2 s): meanwhile the channel's health is
    /// `Down(why)`, calls fail at once with `Unavailable`, and subscriptions are
    /// accepted and start flowing when the registry comes up. Fails only for an
    /// empty address.
    pub async fn connect(addr: impl Into<String>) -> Result<Self, RemoteError> {
        let addr = addr.into();
        if addr.trim().is_empty() {
            return Err(RemoteError::bad_request("the registry address is empty").with_code("bad_address"));
        }
        let (client, health) = match Client::connect(addr.as_str()).await {
            Ok(client) => (Some(client), UpstreamState::Ready),
            Err(error) => {
                tracing::warn!(registry = %addr, error = %chain(&error), "registry unreachable at start; starting without it and reconnecting");
                (None, UpstreamState::Down(down_reason(&addr, &error)))
            }
        };
        let incarnation = client.as_ref().map(|c| c.server_info().incarnation.clone());
        let inner = Arc::new(Inner {
            addr,
            client: watch::Sender::new(client),
            health: watch::Sender::new(health),
            watches: FollowTasks::default(),
            registrations: Mutex::default(),
            incarnation: Mutex::new(incarnation),
            cancel: CancellationToken::new(),
        });
        tokio::spawn(reconnect_loop(Arc::downgrade(&inner), inner.cancel.clone()));
        Ok(RegistryUpstream { inner })
    }

    /// The live registry client; fails at once (with why) while reconnecting.
    fn client(&self) -> Result<Client, RemoteError> {
        if let Some(client) = self.inner.client.borrow().clone() {
            return Ok(client);
        }
        Err(match &*self.inner.health.borrow() {
            UpstreamState::Down(reason) => reason.clone(),
            _ => RemoteError::unavailable(format!("registry at {} unreachable; reconnecting", self.inner.addr))
                .with_code("registry"),
        })
    }

    /// The live registry client, waiting as long as it takes (the caller is a
    /// follow task, aborted when its key is unsubscribed).
    async fn wait_client(&self) -> Option<Client> {
        let mut rx = self.inner.client.subscribe();
        rx.wait_for(Option::is_some).await.ok()?.clone()
    }

    async fn register(&self, instance: Instance, ttl: Duration) -> Result<(), RemoteError> {
        let client = self.client()?;
        let registration = client.register(instance.clone(), ttl).await.map_err(unavailable)?;
        let key = (instance.service.clone(), instance.id.clone());
        let mut registrations = self.inner.registrations.lock().unwrap_or_else(|p| p.into_inner());
        registrations.insert(key, (instance, ttl, Some(registration)));
        Ok(())
    }
}

fn down_reason(addr: &str, error: &tandem_registry::Error) -> RemoteError {
    RemoteError::unavailable(format!("registry at {addr} unreachable ({}); reconnecting", chain(error)))
        .with_code("registry")
}

/// Keeps a client connected: waits for the current one to die, then reconnects
/// with backoff (WARN with the cause the first time) and re-registers instances.
/// How often an idle registry connection sends a request (a `Stats`): well
/// under the registry's idle timeout (`tandem-registry serve --idle-timeout`,
/// default 5 min), which closes connections with no watch and no lease.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);

async fn reconnect_loop(inner: std::sync::Weak<Inner>, cancel: CancellationToken) {
    loop {
        let Some(current) = inner.upgrade().map(|i| i.client.borrow().clone()) else { return };
        if let Some(client) = current {
            let error = loop {
                tokio::select! {
                    error = client.closed() => break error,
                    _ = cancel.cancelled() => return,
                    // A tiny request now and then, so a Leader with no watched key is not
                    // closed by the registry's idle timeout (default 5 min).
                    () = tokio::time::sleep(KEEPALIVE) => {
                        if let Err(error) = client.stats().await {
                            tracing::debug!(error = %chain(&error), "registry keepalive failed");
                        }
                    }
                }
            };
            let Some(strong) = inner.upgrade() else { return };
            tracing::warn!(registry = %strong.addr, error = %chain(&error), "registry connection lost; reconnecting");
            strong.client.send_replace(None);
            strong.health.send_replace(UpstreamState::Down(
                RemoteError::unavailable(format!(
                    "registry at {} unreachable (connection lost: {}); reconnecting",
                    strong.addr,
                    chain(&error)
                ))
                .with_code("registry"),
            ));
        }
        let Some(addr) = inner.upgrade().map(|i| i.addr.clone()) else { return };
        let mut delay = RECONNECT_MIN;
        let mut attempts = 0u64;
        let client = loop {
            let connected = tokio::select! {
                _ = cancel.cancelled() => return,
                connected = Client::connect(addr.as_str()) => connected,
            };
            match connected {
                Ok(client) => break client,
                Err(error) => {
                    attempts += 1;
                    if attempts == 1 {
                        tracing::warn!(registry = %addr, error = %chain(&error), "registry unreachable; retrying with backoff");
                    } else {
                        tracing::debug!(registry = %addr, attempts, error = %chain(&error), "registry still unreachable");
                    }
                    let Some(strong) = inner.upgrade() else { return };
                    // The latest cause, for followers that look at the channel's state.
                    let reason = down_reason(&addr, &error);
                    strong.health.send_if_modified(|state| match state {
                        UpstreamState::Down(old) if old.message == reason.message => false,
                        _ => {
                            *state = UpstreamState::Down(reason);
                            true
                        }
                    });
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RECONNECT_MAX);
        };
        let Some(strong) = inner.upgrade() else { return };
        let info = client.server_info().clone();
        let previous = strong.incarnation.lock().unwrap_or_else(|p| p.into_inner()).replace(info.incarnation.clone());
        match previous {
            Some(previous) if previous != info.incarnation => tracing::warn!(
                registry = %addr,
                previous,
                incarnation = %info.incarnation,
                revision = info.revision,
                "the registry restarted (a new incarnation): every watched key is read again from it"
            ),
            _ => {}
        }
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
                    tracing::warn!(service = %instance.service, id = %instance.id, error = %chain(&error), "re-register failed")
                }
            }
        }
        tracing::info!(registry = %addr, attempts, incarnation = %info.incarnation, revision = info.revision, "registry connection established");
        strong.client.send_replace(Some(client));
        strong.health.send_replace(UpstreamState::Ready);
    }
}

/// Where a key's watch stands: the server incarnation its revisions belong to,
/// and the next revision to receive.
#[derive(Debug, Clone)]
struct Position {
    incarnation: String,
    from: u64,
}

impl Position {
    /// Whether `client`'s server can resume from here: the same incarnation, and
    /// a revision that reached ours (a lower one means the server lost state).
    fn valid_on(&self, client: &Client) -> bool {
        let info = client.server_info();
        info.incarnation == self.incarnation && info.revision + 1 >= self.from
    }
}

fn config_value(kv: Option<tandem_registry::KeyValue>, revision: u64) -> ConfigValue {
    match kv {
        Some(kv) => {
            ConfigValue { value: Some(String::from_utf8_lossy(&kv.value).into_owned()), revision: kv.mod_revision }
        }
        None => ConfigValue { value: None, revision },
    }
}

/// Why a key's watch could not be started.
enum StartError {
    /// The connection is gone: wait for the next one.
    Lost,
    /// The registry refused (a limit, a bad key): retrying the same request will not help soon.
    Refused(RemoteError),
}

/// Reads `key`'s current value and starts its watch right after it, on `client`.
async fn start_key(client: &Client, key: &str) -> Result<(ConfigValue, Watch, Position), StartError> {
    let classify = |error: tandem_registry::Error| match error {
        tandem_registry::Error::Remote(remote) => StartError::Refused(remote),
        other if other.is_connection_lost() => StartError::Lost,
        other => StartError::Refused(unavailable(other)),
    };
    let (current, revision) = client.get_with_revision(key).await.map_err(classify)?;
    let watch = client.watch(WatchSpec::key(key), Some(revision + 1)).await.map_err(classify)?;
    let position = Position { incarnation: client.server_info().incarnation.clone(), from: revision + 1 };
    Ok((config_value(current, revision), watch, position))
}

/// Waits for a connection and starts `key`'s watch on it: from `position` if
/// that server can resume from there, or else from a fresh read of the key.
/// `None` when the adapter is gone.
async fn resume_key(
    upstream: &RegistryUpstream,
    key: &str,
    position: Option<&Position>,
) -> Option<(Client, Result<(Watch, Option<(ConfigValue, Position)>), StartError>)> {
    let client = upstream.wait_client().await?;
    let resumed = match position {
        Some(p) if p.valid_on(&client) => {
            client.watch(WatchSpec::key(key), Some(p.from)).await.map(|watch| (watch, None)).map_err(|e| {
                if e.is_connection_lost() { StartError::Lost } else { StartError::Refused(unavailable(e)) }
            })
        }
        stale => {
            if stale.is_some() {
                tracing::info!(subscription.key = %key, "the registry lost state; reading the key again");
            }
            start_key(&client, key).await.map(|(value, watch, p)| (watch, Some((value, p))))
        }
    };
    Some((client, resumed))
}

/// Feeds one key's changes into `sink`, resuming after reconnects from the last
/// revision, or re-reading the key when the registry restarted with less state.
async fn follow_key(
    upstream: RegistryUpstream,
    key: String,
    sink: EventSink<ConfigApi>,
    mut started: Option<(Client, Watch)>,
    mut position: Option<Position>,
) {
    let mut refusals = 0u32;
    while !sink.is_closed() {
        let (client, mut watch) = match started.take() {
            Some(started) => started,
            None => {
                // Boxed: a Leader holds one of these tasks per key, mostly idle in
                // `watch.next()`; the reconnect path's futures are large and rare.
                let Some((client, resumed)) = Box::pin(resume_key(&upstream, &key, position.as_ref())).await else {
                    return;
                };
                match resumed {
                    Ok((watch, reread)) => {
                        refusals = 0;
                        if let Some((value, p)) = reread {
                            position = Some(p);
                            if !sink.send(value) {
                                return;
                            }
                        }
                        (client, watch)
                    }
                    Err(StartError::Lost) => continue,
                    Err(StartError::Refused(error)) => {
                        // Acknowledged earlier on another connection: say so loudly, retry slowly.
                        refusals += 1;
                        if refusals == 1 {
                            tracing::error!(subscription.key = %key, %error, "the registry refused to watch a subscribed key after a reconnect; retrying");
                        }
                        Box::pin(tokio::time::sleep(RECONNECT_MAX)).await;
                        continue;
                    }
                }
            }
        };
        while let Some(event) = watch.next().await {
            let value = match event {
                Ok(WatchEvent::Put { value, revision, .. }) => {
                    ConfigValue { value: Some(String::from_utf8_lossy(&value).into_owned()), revision }
                }
                Ok(WatchEvent::Delete { revision, .. }) => ConfigValue { value: None, revision },
                Ok(WatchEvent::Compacted { revision, .. }) => {
                    // History was lost (or the server never had ours): a snapshot Put
                    // follows only if the key exists now.
                    if let Some(p) = position.as_mut() {
                        p.from = revision + 1;
                    }
                    match Box::pin(client.get(&key)).await {
                        Ok(Some(_)) => continue,
                        Ok(None) => ConfigValue { value: None, revision },
                        Err(_) => break,
                    }
                }
                Ok(_) => continue,
                Err(error) => {
                    tracing::debug!(%error, subscription.key = %key, "watch ended; resuming");
                    break;
                }
            };
            if let Some(p) = position.as_mut() {
                p.from = p.from.max(value.revision + 1);
            }
            if !sink.send(value) {
                return;
            }
        }
    }
}

/// Feeds one service's instance list into `sink` on every change.
async fn follow_service(
    upstream: RegistryUpstream,
    service: String,
    sink: EventSink<ServiceApi>,
    mut started: Option<(Client, ServiceWatch)>,
) {
    while !sink.is_closed() {
        let (client, mut watch) = match started.take() {
            Some(started) => started,
            None => {
                let Some(client) = upstream.wait_client().await else { return };
                match client.watch_service(&service).await {
                    Ok(watch) => (client, watch),
                    Err(error) => {
                        tracing::warn!(error = %chain(&error), service, "service watch failed; retrying");
                        tokio::select! {
                            _ = client.closed() => {}
                            () = tokio::time::sleep(RECONNECT_MAX) => {}
                        }
                        continue;
                    }
                }
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
    async fn invoke(&self, request: ConfigRequest, _ctx: CallContext) -> Result<ConfigResponse, RemoteError> {
        let client = self.client()?;
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
        let Ok(client) = self.client() else {
            // Down: accepted now, it flows once the registry is reachable (the
            // channel's health tells followers it is down meanwhile).
            self.inner.watches.spawn(ConfigApi::NAME, key.clone(), follow_key(self.clone(), key, sink, None, None));
            return Ok(());
        };
        // The watch exists before the follower is acknowledged: a refusal is its answer.
        let (started, position) = match start_key(&client, &key).await {
            Ok((current, watch, position)) => {
                // Always the current state, absence included: a follower that saw a value
                // before a failover must learn that the key was deleted meanwhile.
                sink.send(current);
                (Some((client, watch)), Some(position))
            }
            Err(StartError::Lost) => (None, None),
            Err(StartError::Refused(error)) => {
                tracing::warn!(subscription.key = %key, %error, "the registry refused to watch the key; the subscribe fails");
                return Err(error);
            }
        };
        self.inner.watches.spawn(ConfigApi::NAME, key.clone(), follow_key(self.clone(), key, sink, started, position));
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
    async fn invoke(&self, request: ServiceRequest, _ctx: CallContext) -> Result<ServiceResponse, RemoteError> {
        match request {
            ServiceRequest::Register { instance, ttl_ms } => {
                self.register(instance, Duration::from_millis(ttl_ms.max(1))).await?;
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
                let client = self.client()?;
                Ok(ServiceResponse::Instances(client.discover(&service).await.map_err(unavailable)?))
            }
        }
    }

    async fn subscribe(&self, service: String, sink: EventSink<ServiceApi>) -> Result<(), RemoteError> {
        let started = match self.client() {
            Err(_) => None,
            Ok(client) => match client.watch_service(&service).await {
                Ok(watch) => Some((client, watch)),
                Err(error) if error.is_connection_lost() => None,
                Err(error) => {
                    let error = unavailable(error);
                    tracing::warn!(service, %error, "the registry refused to watch the service; the subscribe fails");
                    return Err(error);
                }
            },
        };
        self.inner.watches.spawn(
            ServiceApi::NAME,
            service.clone(),
            follow_service(self.clone(), service, sink, started),
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
