//! The service registry's data as it crosses the wire: instances, their joins
//! and leaves, and the leases that hold them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One running instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The service's name, for example `"billing"`.
    pub service: String,
    /// The instance's id, unique within the service (a later registration with the same id replaces it).
    pub id: String,
    /// Where to reach the instance, for example `"10.0.0.7:8080"`.
    pub address: String,
    /// Free-form labels (zone, version, weight, ...).
    pub metadata: BTreeMap<String, String>,
}

impl Instance {
    /// An instance without metadata.
    pub fn new(service: impl Into<String>, id: impl Into<String>, address: impl Into<String>) -> Self {
        Instance { service: service.into(), id: id.into(), address: address.into(), metadata: BTreeMap::new() }
    }

    /// Adds one metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// A change in the instances of a watched service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ServiceEvent {
    /// An instance registered (or re-registered with new details: it replaces the
    /// one with the same id). A service watch starts with one `Join` per current instance.
    Join(Instance),
    /// An instance left: deregistered, its lease expired or its connection closed.
    Leave {
        /// The service.
        service: String,
        /// The instance's id.
        id: String,
    },
}

impl ServiceEvent {
    /// The service the event belongs to.
    pub fn service(&self) -> &str {
        match self {
            ServiceEvent::Join(instance) => &instance.service,
            ServiceEvent::Leave { service, .. } => service,
        }
    }
}

/// A lease's id, unique for the server's lifetime.
pub(crate) type LeaseId = u64;
