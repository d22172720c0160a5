//! etcd behind a Leader: the [`Upstream`] adapter of [`ConfigApi`] and
//! [`ServiceApi`] over [`tandem_etcd::EtcdClient`] (feature `etcd`).
//!
//! The same two channels as [`crate::registry_upstream`], so followers cannot
//! tell which upstream their Leader holds:
//! - `config`: get / put / delete keys; a subscription follows one key with an
//!   etcd watch that resumes from its last revision after any member failure or
//!   outage (a compacted gap is re-read: the follower gets the current value; so
//!   is a cluster that changed under the watch: another cluster id, or a
//!   revision that went backwards after a restore);
//! - `services`: an instance is stored as JSON under
//!   `/tandem/services/<service>/<id>` on a lease the Leader keeps alive, so it
//!   vanishes when the Leader dies; a subscription streams the instance list.
//!
//! ```text
//! worker ──Register──> Leader ── EtcdUpstream ── lease + key ──> etcd   (one TCP connection)
//! worker <──values──── Leader <─ watch (resumes from last rev) ── etcd
//!         Leader dies: its lease expires, the instance vanishes;
//!         the next Leader (higher epoch): stay_registered() in the worker registers it again
//! ```
//!
//! **Registrations follow the Leader, not the worker.** The lease belongs to
//! the Leader's process, and a new Leader knows nothing of its predecessor's
//! registrations (nothing is persisted). A worker that wants to stay
//! registered uses [`stay_registered`], which registers again whenever a Leader
//! with a new epoch takes over.
//!
//! ```no_run
//! use tandem::apis::{ConfigApi, ServiceApi};
//! use tandem::etcd_upstream::EtcdUpstream;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = tandem::etcd_upstream::etcd::Config::from_list("http://127.0.0.1:2379,http://127.0.0.1:22379");
//! let upstream = EtcdUpstream::connect(config).await?;
//! let leader = tandem::Leader::builder()
//!     .channel::<ConfigApi, _>(upstream.clone())
//!     .channel::<ServiceApi, _>(upstream)
//!     .start();
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_protocol::ErrorCode;

use futures::StreamExt;
use tandem_etcd::{Keys, Registration, Start, WatchEvent};
use tandem_leader::{CallContext, EventSender, Events, Upstream, health_from};
use tandem_protocol::{Api, RemoteError, UpstreamState};
use tandem_registry::Instance;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::apis::{ConfigApi, ConfigRequest, ConfigResponse, ConfigValue};
use crate::apis::{ServiceApi, ServiceRequest, ServiceResponse};

/// The code of every error this adapter raises itself (an unreachable or
/// refusing etcd): match with `RemoteError::has_code(CODE)`.
pub const CODE: ErrorCode = ErrorCode::named("etcd");
pub use crate::presence::{Presence, stay_registered};

/// The etcd client crate this adapter wraps (its `Config`, `EtcdClient`, ...).
pub use tandem_etcd as etcd;

/// One etcd client serving [`ConfigApi`] and [`ServiceApi`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EtcdUpstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: tandem_etcd::EtcdClient,
    /// Instances registered through this Leader, by (service, id).
    registrations: Mutex<HashMap<(String, String), Registration>>,
}

/// How long a subscription's first read may take (the leader gives it no deadline).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The wire error of an etcd failure; an outage is `Unavailable`.
pub fn remote_error(error: tandem_etcd::Error) -> RemoteError {
    let message = format!("etcd: {}", error.chain());
    let error = match error {
        tandem_etcd::Error::Unavailable { .. } => RemoteError::unavailable(message),
        tandem_etcd::Error::DeadlineExceeded(_) => RemoteError::deadline_exceeded(message),
        tandem_etcd::Error::Refused(_) => RemoteError::upstream(message),
        tandem_etcd::Error::Unauthenticated { .. } | tandem_etcd::Error::Config(_) => RemoteError::rejected(message),
        _ => RemoteError::internal(message),
    };
    error.with_code(CODE)
}

/// A little before the caller's deadline, so an upstream failure reaches the
/// caller as itself rather than as the leader's deadline error.
fn answer_by(deadline: Instant) -> Instant {
    let left = deadline.saturating_duration_since(Instant::now());
    deadline - (left / 10).min(Duration::from_millis(100))
}

fn config_value(kv: &tandem_etcd::KeyValue) -> ConfigValue {
    ConfigValue { value: Some(kv.value_str()), revision: revision(kv.mod_revision) }
}

fn revision(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

impl EtcdUpstream {
    /// Connects to etcd (see [`tandem_etcd::EtcdClient::start`]) and waits for the
    /// first round over the endpoints. If no member answers it still returns
    /// the adapter, logs why at WARN, and the client keeps reconnecting in the
    /// background: meanwhile the channels' health is `Down(why)`, calls fail at
    /// once with `Unavailable`, and subscriptions are accepted and start flowing
    /// (the current value first) once a member answers. Fails (`Rejected`)
    /// only where retrying cannot help: a bad configuration (no endpoint, a
    /// TLS setting that contradicts an endpoint's scheme), or credentials etcd
    /// refused.
    pub async fn connect(config: tandem_etcd::Config) -> Result<Self, RemoteError> {
        let client = tandem_etcd::EtcdClient::start(config).map_err(remote_error)?;
        let mut state = client.state();
        let first = state.wait_for(|s| !matches!(s, tandem_etcd::ConnectionState::Connecting)).await.map(|s| s.clone());
        match first {
            Ok(tandem_etcd::ConnectionState::Unavailable { reason }) => {
                tracing::warn!(endpoints = ?client.endpoints(), reason, "etcd unreachable at start; starting without it and reconnecting");
            }
            Ok(tandem_etcd::ConnectionState::Refused { reason }) => {
                return Err(remote_error(tandem_etcd::Error::Unauthenticated { reason }));
            }
            _ => {}
        }
        Ok(EtcdUpstream::new(client))
    }

    /// Serves over an existing client.
    pub fn new(client: tandem_etcd::EtcdClient) -> Self {
        EtcdUpstream { inner: Arc::new(Inner { client, registrations: Mutex::default() }) }
    }

    /// The channels' health from the client's connection state: `Down` while no
    /// member answers, `Ready` once one does (a switch between members is not
    /// an outage).
    fn health_watch(&self) -> watch::Receiver<UpstreamState> {
        health_from(self.inner.client.state(), |state| match state {
            tandem_etcd::ConnectionState::Connected { .. } => Some(UpstreamState::Ready),
            tandem_etcd::ConnectionState::Unavailable { reason } => Some(UpstreamState::Down(
                RemoteError::unavailable(format!("etcd unreachable: {reason}")).with_code(CODE),
            )),
            tandem_etcd::ConnectionState::Refused { reason } => Some(UpstreamState::Down(
                RemoteError::rejected(format!("etcd refused the credentials: {reason}")).with_code(CODE),
            )),
            _ => None,
        })
    }

    /// The etcd client (its connection state, the member in use).
    pub fn client(&self) -> &tandem_etcd::EtcdClient {
        &self.inner.client
    }

    async fn register(&self, instance: Instance, ttl: Duration, deadline: Instant) -> Result<(), RemoteError> {
        let client = self.inner.client.until(answer_by(deadline));
        let registration =
            client.register(&instance.service, &instance.id, &instance, ttl).await.map_err(remote_error)?;
        tracing::info!(channel = ServiceApi::NAME, service = %instance.service, id = %instance.id,
            lease = registration.lease(), "instance registered");
        let replaced = self
            .inner
            .registrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((instance.service, instance.id), registration);
        if let Some(old) = replaced {
            // The key now hangs on the new lease: revoking the old one leaves it be.
            tokio::spawn(async move {
                if let Err(error) = old.deregister().await {
                    tracing::debug!(error = %error.chain(), "revoking a replaced lease failed; it will expire");
                }
            });
        }
        Ok(())
    }
}

/// Feeds `current` (when etcd answered the first read) and then one key's
/// changes into `tx`, never an older revision after a newer one.
async fn follow_key(
    mut watch: tandem_etcd::Watch,
    key: String,
    tx: EventSender<ConfigValue>,
    current: Option<ConfigValue>,
    resumed: Option<u64>,
) {
    // The revision of the value already sent (or already served by the leader,
    // when resumed), and whether it was a value (not an absence).
    let (mut last, mut present) = (resumed.map_or(0, |r| i64::try_from(r).unwrap_or(i64::MAX)), resumed.is_some());
    if let Some(current) = current {
        (last, present) = (i64::try_from(current.revision).unwrap_or(0), current.value.is_some());
        if !tx.send(current) {
            return;
        }
    }
    while let Some(event) = watch.next().await {
        let value = match event {
            WatchEvent::Put(kv) => config_value(&kv),
            WatchEvent::Delete { revision: at, .. } => ConfigValue { value: None, revision: revision(at) },
            WatchEvent::Reset { snapshot, .. } => {
                // Another cluster (restored or replaced): its revisions are not
                // comparable with ours, so its current state is delivered as is.
                tracing::warn!(channel = ConfigApi::NAME, subscription.key = %key, revision = snapshot.revision,
                    "the etcd cluster changed; delivering its current value");
                let value = match snapshot.kvs.first() {
                    Some(kv) => config_value(kv),
                    None => ConfigValue { value: None, revision: revision(snapshot.revision) },
                };
                last = i64::try_from(value.revision).unwrap_or(0).min(snapshot.revision);
                present = value.value.is_some();
                if !tx.send(value) {
                    return;
                }
                continue;
            }
            WatchEvent::Snapshot(snapshot) | WatchEvent::Compacted { snapshot, .. } => {
                tracing::warn!(channel = ConfigApi::NAME, subscription.key = %key, revision = snapshot.revision,
                    "changes were compacted away; delivering the current value");
                match snapshot.kvs.first() {
                    Some(kv) if kv.mod_revision > last => config_value(kv),
                    None if present => ConfigValue { value: None, revision: revision(snapshot.revision) },
                    _ => continue,
                }
            }
            _ => continue,
        };
        let at = i64::try_from(value.revision).unwrap_or(i64::MAX);
        if at <= last {
            continue;
        }
        last = at;
        present = value.value.is_some();
        if !tx.send(value) {
            return;
        }
    }
}

impl Upstream<ConfigApi> for EtcdUpstream {
    fn health(&self) -> Option<watch::Receiver<UpstreamState>> {
        Some(self.health_watch())
    }

    async fn invoke(&self, request: ConfigRequest, ctx: CallContext) -> Result<ConfigResponse, RemoteError> {
        let client = self.inner.client.until(answer_by(ctx.deadline()));
        match request {
            ConfigRequest::Get(key) => {
                let kv = client.get(&key).await.map_err(remote_error)?;
                Ok(ConfigResponse::Value(kv.as_ref().map(config_value)))
            }
            ConfigRequest::Put(key, value) => {
                Ok(ConfigResponse::Revision(revision(client.put(&key, value).await.map_err(remote_error)?)))
            }
            ConfigRequest::Delete(key) => {
                Ok(ConfigResponse::Deleted(client.delete(&key).await.map_err(remote_error)?.map(revision)))
            }
        }
    }

    async fn subscribe(&self, key: String) -> Result<Events<ConfigValue>, RemoteError> {
        self.follow(key, None).await
    }

    /// As `subscribe`, but while etcd is unreachable the watch starts right
    /// after `revision` (the value a new leader seeded from a mirror already
    /// serves), so every change made meanwhile is delivered once etcd answers.
    async fn subscribe_from(&self, key: String, revision: u64) -> Result<Events<ConfigValue>, RemoteError> {
        self.follow(key, Some(revision)).await
    }

    fn revision(&self, event: &ConfigValue) -> Option<u64> {
        Some(event.revision).filter(|r| *r > 0)
    }
}

impl EtcdUpstream {
    /// Follows one key: its current value, then its changes; `resumed`: the
    /// revision whose value the leader serves already.
    async fn follow(&self, key: String, resumed: Option<u64>) -> Result<Events<ConfigValue>, RemoteError> {
        let client = self.inner.client.until(Instant::now() + SUBSCRIBE_TIMEOUT);
        let (start, current) = match client.get_range(&Keys::exact(key.as_str())).await {
            // Always the current state, absence included (as the registry adapter
            // does): a follower that saw a value before a failover learns that the
            // key was deleted meanwhile.
            Ok(snapshot) => {
                let current = match snapshot.kvs.first() {
                    Some(kv) => config_value(kv),
                    None => ConfigValue { value: None, revision: revision(snapshot.revision) },
                };
                (Start::Revision(snapshot.revision + 1), Some(current))
            }
            // etcd is down: accepted now; the watch delivers the current value
            // (a snapshot) once a member answers.
            Err(error) if error.is_unavailable() => {
                tracing::debug!(subscription.key = %key, error = %error.chain(), "etcd unreachable; the key follows when it is back");
                match resumed.and_then(|r| i64::try_from(r).ok()) {
                    // Every change after the served value (compacted away: a snapshot, which follow_key handles).
                    Some(revision) => (Start::Revision(revision + 1), None),
                    None => (Start::Snapshot, None),
                }
            }
            Err(error) => return Err(remote_error(error)),
        };
        let watch = self.inner.client.watch(Keys::exact(key.as_str()), start);
        // With the current value read, `last` starts from it; otherwise from the resumed revision.
        let resumed = if current.is_some() { None } else { resumed };
        Ok(Events::spawn(move |tx| follow_key(watch, key, tx, current, resumed)))
    }
}

impl Upstream<ServiceApi> for EtcdUpstream {
    fn health(&self) -> Option<watch::Receiver<UpstreamState>> {
        Some(self.health_watch())
    }

    async fn invoke(&self, request: ServiceRequest, ctx: CallContext) -> Result<ServiceResponse, RemoteError> {
        match request {
            ServiceRequest::Register { instance, ttl_ms } => {
                self.register(instance, Duration::from_millis(ttl_ms.max(1)), ctx.deadline()).await?;
                Ok(ServiceResponse::Registered)
            }
            ServiceRequest::Deregister { service, id } => {
                let held = self
                    .inner
                    .registrations
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(service.clone(), id.clone()));
                match held {
                    Some(registration) => {
                        registration.deregister().await.map_err(remote_error)?;
                        Ok(ServiceResponse::Deregistered(true))
                    }
                    // Registered through an earlier Leader, perhaps: remove the key itself.
                    None => {
                        let client = self.inner.client.until(answer_by(ctx.deadline()));
                        Ok(ServiceResponse::Deregistered(
                            client.remove_instance(&service, &id).await.map_err(remote_error)?,
                        ))
                    }
                }
            }
            ServiceRequest::Discover(service) => {
                let client = self.inner.client.until(answer_by(ctx.deadline()));
                Ok(ServiceResponse::Instances(client.discover(&service).await.map_err(remote_error)?))
            }
        }
    }

    async fn subscribe(&self, service: String) -> Result<Events<Vec<Instance>>, RemoteError> {
        Ok(Events::stream(self.inner.client.watch_service::<Instance>(&service)))
    }
}
