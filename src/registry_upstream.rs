//! The bundled registry behind a Leader: [`ConfigApi`] and [`ServiceApi`] over
//! ONE [`tandem_registry::Reconnecting`] client, which reconnects by itself
//! (backoff from 20 ms to 2 s), resumes each key's watch from its last revision
//! (re-reading the key from a registry that restarted with less state), and
//! registers the instances it holds again after a reconnect.
//!
//! - It starts even when the registry is unreachable: the channels' health is
//!   `Down(why)` and calls fail at once with `Unavailable` meanwhile; a
//!   subscribe is accepted while it is down and flows when it comes back.
//! - A subscribe is acknowledged only once the registry accepted the watch: a
//!   refusal (such as the watches-per-connection limit) is the subscriber's
//!   error, at once.
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

use std::time::Duration;
use tandem_protocol::ErrorCode;

use futures::StreamExt;
use tandem_leader::{CallContext, Events, Upstream, health_from};
use tandem_protocol::internal::error_chain as chain;
use tandem_protocol::{RemoteError, UpstreamState};
use tandem_registry::{ConnectionState, Instance, KeyState, Reconnecting, RegistryClient};
use tokio::sync::watch;

/// The code of the errors this adapter raises when the registry is
/// unreachable or refuses: match with `RemoteError::has_code(CODE)`.
pub const CODE: ErrorCode = ErrorCode::named("registry");
/// The code of the error for an empty registry address.
pub const BAD_ADDRESS: ErrorCode = ErrorCode::named("bad_address");

pub use crate::apis::{
    ConfigApi, ConfigRequest, ConfigResponse, ConfigValue, ServiceApi, ServiceRequest, ServiceResponse,
};

/// One registry connection serving [`ConfigApi`] and [`ServiceApi`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RegistryUpstream {
    registry: Reconnecting,
}

/// Why the registry at `addr` cannot be used now.
fn unreachable(addr: &str, reason: &str) -> RemoteError {
    RemoteError::unavailable(format!("registry at {addr} unreachable ({reason}); reconnecting")).with_code(CODE)
}

fn config_value(state: KeyState) -> ConfigValue {
    let value = state.value.map(|v| String::from_utf8_lossy(&v).into_owned());
    ConfigValue { value, revision: state.revision }
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
            return Err(RemoteError::bad_request("the registry address is empty").with_code(BAD_ADDRESS));
        }
        let registry = Reconnecting::start(addr);
        let _ = registry.state().wait_for(|state| !matches!(state, ConnectionState::Connecting)).await;
        Ok(RegistryUpstream { registry })
    }

    /// The wire error of a registry failure: its refusal as is; while it is
    /// unreachable, why.
    fn remote_error(&self, error: tandem_registry::Error) -> RemoteError {
        if let tandem_registry::Error::Remote(remote) = error {
            return remote;
        }
        match &*self.registry.state().borrow() {
            ConnectionState::Unavailable { reason } => unreachable(self.registry.addr(), reason),
            _ => RemoteError::unavailable(format!("registry: {}", chain(&error))).with_code(CODE),
        }
    }

    /// The live registry client; fails at once (with why) while reconnecting.
    fn client(&self) -> Result<RegistryClient, RemoteError> {
        self.registry.current().map_err(|error| self.remote_error(error))
    }

    /// The channels' health: `Ready` while connected, `Down(why)` while not.
    fn health_watch(&self) -> watch::Receiver<UpstreamState> {
        let addr = self.registry.addr().to_owned();
        health_from(self.registry.state(), move |state| match state {
            ConnectionState::Connected { .. } => Some(UpstreamState::Ready),
            ConnectionState::Unavailable { reason } => Some(UpstreamState::Down(unreachable(&addr, reason))),
            _ => None,
        })
    }
}

impl Upstream<ConfigApi> for RegistryUpstream {
    async fn invoke(&self, request: ConfigRequest, _ctx: CallContext) -> Result<ConfigResponse, RemoteError> {
        let client = self.client()?;
        let error = |error| self.remote_error(error);
        Ok(match request {
            ConfigRequest::Get(key) => {
                let kv = client.get(&key).await.map_err(error)?;
                ConfigResponse::Value(
                    kv.map(|kv| config_value(KeyState { value: Some(kv.value), revision: kv.mod_revision })),
                )
            }
            ConfigRequest::Put(key, value) => ConfigResponse::Revision(client.put(&key, value).await.map_err(error)?),
            ConfigRequest::Delete(key) => ConfigResponse::Deleted(client.delete(&key).await.map_err(error)?),
        })
    }

    async fn subscribe(&self, key: String) -> Result<Events<ConfigValue>, RemoteError> {
        // Always the current state first, absence included: a follower that saw a
        // value before a failover must learn that the key was deleted meanwhile.
        match self.registry.follow_key(key.as_str()).await {
            Ok(values) => Ok(Events::stream(values.map(config_value))),
            Err(error) => {
                let error = self.remote_error(error);
                tracing::warn!(subscription.key = %key, %error, "the registry refused to watch the key; the subscribe fails");
                Err(error)
            }
        }
    }

    /// The value's revision in the registry, the resume point a mirror carries
    /// (PROTOCOL.md §7.2). `subscribe_from` is the default (`subscribe`): the
    /// registry's watch always starts with the key's current state, so a
    /// change made while no leader followed the key is delivered anyway.
    fn revision(&self, event: &ConfigValue) -> Option<u64> {
        Some(event.revision).filter(|r| *r > 0)
    }

    fn health(&self) -> Option<watch::Receiver<UpstreamState>> {
        Some(self.health_watch())
    }
}

impl Upstream<ServiceApi> for RegistryUpstream {
    async fn invoke(&self, request: ServiceRequest, _ctx: CallContext) -> Result<ServiceResponse, RemoteError> {
        let error = |error| self.remote_error(error);
        Ok(match request {
            ServiceRequest::Register { instance, ttl_ms } => {
                let ttl = Duration::from_millis(ttl_ms.max(1));
                self.registry.register(instance, ttl).await.map_err(error)?;
                ServiceResponse::Registered
            }
            ServiceRequest::Deregister { service, id } => {
                ServiceResponse::Deregistered(self.registry.deregister(&service, &id).await.map_err(error)?)
            }
            ServiceRequest::Discover(service) => {
                ServiceResponse::Instances(self.client()?.discover(&service).await.map_err(error)?)
            }
        })
    }

    async fn subscribe(&self, service: String) -> Result<Events<Vec<Instance>>, RemoteError> {
        match self.registry.follow_service(service.as_str()).await {
            Ok(lists) => Ok(Events::stream(lists)),
            Err(error) => {
                let error = self.remote_error(error);
                tracing::warn!(service, %error, "the registry refused to watch the service; the subscribe fails");
                Err(error)
            }
        }
    }

    fn health(&self) -> Option<watch::Receiver<UpstreamState>> {
        Some(self.health_watch())
    }
}
