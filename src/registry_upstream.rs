//! The bundled registry behind a Leader: [`ConfigApi`] and [`ServiceApi`] over
//! ONE [`tandem_registry::Client`] connection.
//!
//! - It starts even when the registry is unreachable and reconnects whenever
//!   the connection drops (a [`Health`]: followers see `UpstreamDown(why)` and
//!   calls fail at once with `Unavailable` meanwhile); a subscribe is accepted
//!   while it is down and flows when it comes back.
//! - A subscribe is acknowledged only once the registry accepted the key's
//!   watch: a refusal (such as the watches-per-connection limit) is the
//!   subscriber's error, at once.
//! - Each key's watch resumes from its last revision, so no change is missed,
//!   unless the registry restarted with less state (a new incarnation in its
//!   hello, or a lower revision): then the key is read again and followed from
//!   the new server's revision (a key that is gone is reported as deleted).
//! - It re-registers the instances it holds after a reconnect.
//!
//! ```no_run
//! use tandem::registry_upstream::{ConfigApi, RegistryUpstream, ServiceApi};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let upstream = RegistryUpstream::connect("127.0.0.1:7000").await?;
//! let leader = tandem::Leader::builder()
//!     .channel::<ConfigApi, _>(upstream.clone())
//!     .channel::<ServiceApi, _>(upstream)
//!     .start();
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use tandem_leader::{CallContext, EventSender, Events, Health, Upstream};
use tandem_protocol::{RemoteError, UpstreamState, error_chain as chain};
use tandem_registry::{Client, Instance, Registration, ServiceEvent, ServiceWatch, Watch, WatchEvent, WatchSpec};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use crate::apis::{
    ConfigApi, ConfigRequest, ConfigResponse, ConfigValue, ServiceApi, ServiceRequest, ServiceResponse,
};

/// How often an idle registry connection sends a request (a `Stats`): well
/// under the registry's idle timeout (`tandem-registry serve --idle-timeout`,
/// default 5 min), which closes connections with no watch and no lease.
const KEEPALIVE: Duration = Duration::from_secs(60);
/// The pause before watching again a key the registry refused after a reconnect.
const REFUSED_RETRY: Duration = Duration::from_secs(2);

/// One registry connection serving [`ConfigApi`] and [`ServiceApi`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RegistryUpstream {
    inner: Arc<Inner>,
}

/// By (service, id): what to re-register after a reconnect, and the live registration (none while disconnected).
type Held = HashMap<(String, String), (Instance, Duration, Option<Registration>)>;

#[derive(Debug)]
struct Inner {
    addr: String,
    /// The live client, or `None` while (re)connecting.
    client: watch::Sender<Option<Client>>,
    health: watch::Receiver<UpstreamState>,
    registrations: Mutex<Held>,
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

impl RegistryUpstream {
    /// Starts the adapter for the registry at `addr` (for example `127.0.0.1:7000`)
    /// and returns after the first connection attempt, whatever its outcome:
    /// an unreachable registry is logged at WARN, reported as the channels'
    /// health, and retried in the background (backoff from 20 ms to 2 s).
    /// Fails only for an empty address.
    pub async fn connect(addr: impl Into<String>) -> Result<Self, RemoteError> {
        let addr = addr.into();
        if addr.trim().is_empty() {
            return Err(RemoteError::bad_request("the registry address is empty").with_code("bad_address"));
        }
        let health = Health::new(format!("registry at {addr}"));
        let mut first = health.watch();
        let inner = Arc::new(Inner {
            addr,
            client: watch::Sender::new(None),
            health: health.watch(),
            registrations: Mutex::default(),
            cancel: CancellationToken::new(),
        });
        tokio::spawn(connection_loop(Arc::downgrade(&inner), health, inner.cancel.clone()));
        let _ = first.wait_for(|state| *state != UpstreamState::Starting).await;
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

    /// The live registry client, waiting as long as it takes (a client whose
    /// connection just died is not live: its successor is waited for). `None`
    /// once the adapter is gone.
    async fn wait_client(&self) -> Option<Client> {
        let mut client = self.inner.client.subscribe();
        client.wait_for(|c| c.as_ref().is_some_and(|c| !c.is_closed())).await.ok()?.clone()
    }

    fn registrations(&self) -> std::sync::MutexGuard<'_, Held> {
        self.inner.registrations.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps a client connected: connects (reporting failures and backing off),
/// re-registers the instances held, serves until the connection dies, again.
async fn connection_loop(inner: Weak<Inner>, mut health: Health, cancel: CancellationToken) {
    let Some(addr) = inner.upgrade().map(|i| i.addr.clone()) else { return };
    let mut incarnation: Option<String> = None;
    loop {
        let client = tokio::select! {
            _ = cancel.cancelled() => return,
            connected = Client::connect(addr.as_str()) => connected,
        };
        let client = match client {
            Ok(client) => client,
            Err(error) => {
                let reason = RemoteError::unavailable(format!(
                    "registry at {addr} unreachable ({}); reconnecting",
                    chain(&error)
                ));
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    () = health.failed(reason.with_code("registry")) => continue,
                }
            }
        };
        let info = client.server_info().clone();
        if let Some(previous) = incarnation.replace(info.incarnation.clone()).filter(|p| *p != info.incarnation) {
            tracing::warn!(registry = %addr, previous, incarnation = %info.incarnation, revision = info.revision,
                "the registry restarted (a new incarnation): every watched key is read again from it");
        }
        let Some(upstream) = inner.upgrade().map(|inner| RegistryUpstream { inner }) else { return };
        let held: Vec<(Instance, Duration)> =
            upstream.registrations().values().map(|(i, ttl, _)| (i.clone(), *ttl)).collect();
        for (instance, ttl) in held {
            match client.register(instance.clone(), ttl).await {
                Ok(live) => {
                    if let Some(entry) = upstream.registrations().get_mut(&(instance.service, instance.id)) {
                        entry.2 = Some(live);
                    }
                }
                Err(error) => {
                    tracing::warn!(service = %instance.service, id = %instance.id, error = %chain(&error), "re-register failed")
                }
            }
        }
        tracing::debug!(registry = %addr, incarnation = %info.incarnation, revision = info.revision, "registry connection established");
        upstream.inner.client.send_replace(Some(client.clone()));
        health.ready();
        drop(upstream);
        let error = loop {
            tokio::select! {
                error = client.closed() => break error,
                _ = cancel.cancelled() => return,
                // A tiny request now and then, so a Leader with no watched key is not idle.
                () = tokio::time::sleep(KEEPALIVE) => if let Err(error) = client.stats().await {
                    tracing::debug!(error = %chain(&error), "registry keepalive failed");
                },
            }
        };
        if let Some(inner) = inner.upgrade() {
            inner.client.send_replace(None);
        }
        let reason = format!("registry at {addr} unreachable (connection lost: {}); reconnecting", chain(&error));
        health.lost(RemoteError::unavailable(reason).with_code("registry"));
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

fn config_value(value: Option<tandem_protocol::bytes::Bytes>, revision: u64) -> ConfigValue {
    ConfigValue { value: value.map(|v| String::from_utf8_lossy(&v).into_owned()), revision }
}

/// Why a key's watch could not be started.
enum StartError {
    /// The connection is gone: wait for the next one.
    Lost,
    /// The registry refused (a limit, a bad key): retrying at once will not help.
    Refused(RemoteError),
}

fn classify(error: tandem_registry::Error) -> StartError {
    match error {
        tandem_registry::Error::Remote(remote) => StartError::Refused(remote),
        other if other.is_connection_lost() => StartError::Lost,
        other => StartError::Refused(unavailable(other)),
    }
}

/// A key's watch on `client`: from `position` if that server can resume from
/// there, or else from a fresh read of the key (then also its current value).
async fn start_key(
    client: &Client,
    key: &str,
    position: Option<&Position>,
) -> Result<(Watch, Position, Option<ConfigValue>), StartError> {
    if let Some(p) = position.filter(|p| p.valid_on(client)) {
        let watch = client.watch(WatchSpec::key(key), Some(p.from)).await.map_err(classify)?;
        return Ok((watch, p.clone(), None));
    }
    if position.is_some() {
        // Once per key: the connection's WARN ("the registry restarted") says it for all of them.
        tracing::debug!(subscription.key = %key, "the registry lost state; reading the key again");
    }
    let (current, revision) = client.get_with_revision(key).await.map_err(classify)?;
    let watch = client.watch(WatchSpec::key(key), Some(revision + 1)).await.map_err(classify)?;
    let position = Position { incarnation: client.server_info().incarnation.clone(), from: revision + 1 };
    let current = match current {
        Some(kv) => config_value(Some(kv.value), kv.mod_revision),
        None => config_value(None, revision),
    };
    Ok((watch, position, Some(current)))
}

/// Feeds one key's values into `tx`, resuming after reconnects from the last
/// revision, or re-reading the key when the registry restarted with less state.
async fn follow_key(
    upstream: RegistryUpstream,
    key: String,
    tx: EventSender<ConfigValue>,
    mut started: Option<(Client, Watch, Position)>,
) {
    let mut position: Option<Position> = started.as_ref().map(|(_, _, p)| p.clone());
    let mut refusals = 0u32;
    loop {
        let (client, mut watch) = match started.take() {
            Some((client, watch, _)) => (client, watch),
            None => {
                let Some(client) = upstream.wait_client().await else { return };
                match Box::pin(start_key(&client, &key, position.as_ref())).await {
                    Ok((watch, p, current)) => {
                        refusals = 0;
                        position = Some(p);
                        if current.is_some_and(|value| !tx.send(value)) {
                            return;
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
                        tokio::time::sleep(REFUSED_RETRY).await;
                        continue;
                    }
                }
            }
        };
        while let Some(event) = watch.next().await {
            let value = match event {
                Ok(WatchEvent::Put { value, revision, .. }) => config_value(Some(value), revision),
                Ok(WatchEvent::Delete { revision, .. }) => config_value(None, revision),
                Ok(WatchEvent::Compacted { revision, .. }) => {
                    // History was lost: a snapshot Put follows only if the key exists now.
                    if let Some(p) = position.as_mut() {
                        p.from = revision + 1;
                    }
                    match Box::pin(client.get(&key)).await {
                        Ok(Some(_)) => continue,
                        Ok(None) => config_value(None, revision),
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
            if !tx.send(value) {
                return;
            }
        }
    }
}

/// Feeds one service's instance list into `tx` on every change.
async fn follow_service(
    upstream: RegistryUpstream,
    service: String,
    tx: EventSender<Vec<Instance>>,
    mut started: Option<(Client, ServiceWatch)>,
) {
    loop {
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
                            () = tokio::time::sleep(REFUSED_RETRY) => {}
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
        if !tx.send(instances.values().cloned().collect()) {
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
            if changed && !tx.send(instances.values().cloned().collect()) {
                return;
            }
        }
    }
}

impl Upstream<ConfigApi> for RegistryUpstream {
    async fn invoke(&self, request: ConfigRequest, _ctx: CallContext) -> Result<ConfigResponse, RemoteError> {
        let client = self.client()?;
        Ok(match request {
            ConfigRequest::Get(key) => {
                let value = client.get(&key).await.map_err(unavailable)?;
                ConfigResponse::Value(value.map(|kv| config_value(Some(kv.value), kv.mod_revision)))
            }
            ConfigRequest::Put(key, value) => {
                ConfigResponse::Revision(client.put(&key, value).await.map_err(unavailable)?)
            }
            ConfigRequest::Delete(key) => ConfigResponse::Deleted(client.delete(&key).await.map_err(unavailable)?),
        })
    }

    async fn subscribe(&self, key: String) -> Result<Events<ConfigValue>, RemoteError> {
        // The watch exists before the follower is acknowledged: a refusal is its answer.
        // While the registry is down the key is accepted and flows once it is back.
        let started = match self.client() {
            Err(_) => None,
            Ok(client) => match start_key(&client, &key, None).await {
                Ok((watch, position, current)) => {
                    // Always the current state, absence included: a follower that saw a value
                    // before a failover must learn that the key was deleted meanwhile.
                    Some((client, watch, position, current))
                }
                Err(StartError::Lost) => None,
                Err(StartError::Refused(error)) => {
                    tracing::warn!(subscription.key = %key, %error, "the registry refused to watch the key; the subscribe fails");
                    return Err(error);
                }
            },
        };
        let upstream = self.clone();
        Ok(Events::spawn(|tx| async move {
            let started = started.and_then(|(client, watch, position, current)| {
                current.is_none_or(|value| tx.send(value)).then_some((client, watch, position))
            });
            follow_key(upstream, key, tx, started).await
        }))
    }

    fn health(&self) -> Option<watch::Receiver<UpstreamState>> {
        Some(self.inner.health.clone())
    }

}

impl Upstream<ServiceApi> for RegistryUpstream {
    async fn invoke(&self, request: ServiceRequest, _ctx: CallContext) -> Result<ServiceResponse, RemoteError> {
        match request {
            ServiceRequest::Register { instance, ttl_ms } => {
                let ttl = Duration::from_millis(ttl_ms.max(1));
                let registration = self.client()?.register(instance.clone(), ttl).await.map_err(unavailable)?;
                let key = (instance.service.clone(), instance.id.clone());
                self.registrations().insert(key, (instance, ttl, Some(registration)));
                Ok(ServiceResponse::Registered)
            }
            ServiceRequest::Deregister { service, id } => {
                let held = self.registrations().remove(&(service, id));
                let found = held.is_some();
                if let Some((_, _, Some(registration))) = held {
                    registration.deregister().await.map_err(unavailable)?;
                }
                Ok(ServiceResponse::Deregistered(found))
            }
            ServiceRequest::Discover(service) => {
                Ok(ServiceResponse::Instances(self.client()?.discover(&service).await.map_err(unavailable)?))
            }
        }
    }

    async fn subscribe(&self, service: String) -> Result<Events<Vec<Instance>>, RemoteError> {
        // A refusal from a live registry is the subscriber's answer; a lost connection is retried.
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
        let upstream = self.clone();
        Ok(Events::spawn(|tx| follow_service(upstream, service, tx, started)))
    }

    fn health(&self) -> Option<watch::Receiver<UpstreamState>> {
        Some(self.inner.health.clone())
    }

}
