//! The two channels every bundled adapter serves, defined once and shared by
//! every process: [`ConfigApi`] (`"config"`: get / put / delete keys, and
//! subscribe to a key's value) and [`ServiceApi`] (`"services"`: register /
//! deregister / discover instances, and subscribe to a service's instance list).
//! [`crate::registry_upstream`], `tandem::etcd_upstream` (feature `etcd`) and
//! `tandem::redis_upstream` (feature `redis`, config only) serve them, so
//! workers do not change when the upstream does.

use serde::{Deserialize, Serialize};
use tandem_protocol::Api;
use tandem_registry::Instance;

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
    /// The revision that produced it (the registry's or etcd's; 0 from Redis, which keeps none).
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
