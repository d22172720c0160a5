//! Service instances in etcd: one JSON value per instance under
//! `<services_prefix><service>/<id>`, and a stream of a service's instance list.
//!
//! ```text
//! /tandem/services/billing/a  {"service":"billing","id":"a","address":"10.0.0.7:8080",...}   lease 0x51
//! /tandem/services/billing/b  {...}                                                          lease 0x77
//!            prefix watch ──> ServiceWatch ──> [a, b] ── b's lease expires ──> [a]
//! ```

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use serde::de::DeserializeOwned;

use crate::config::Config;
use crate::kv::KeyValue;
use crate::watch::{Watch, WatchEvent};

/// The prefix of a service's instances (with the trailing `/`, so `web` does
/// not match `web2`).
pub(crate) fn service_prefix(config: &Config, service: &str) -> String {
    format!("{}{service}/", config.services_prefix)
}

/// The key of one instance.
pub(crate) fn instance_key(config: &Config, service: &str, id: &str) -> String {
    format!("{}{id}", service_prefix(config, service))
}

/// Decodes one instance; logs and skips what is not the expected JSON.
pub(crate) fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Option<T> {
    match serde_json::from_slice(&kv.value) {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::warn!(key = kv.key, %error, "skipping a service instance that is not the expected JSON");
            None
        }
    }
}

/// A service's instance list, sorted by id: the current list first, then the
/// whole list again after every change (a list equal to the previous one is
/// not repeated). Like the [`Watch`] under it, it survives member failures and
/// outages. Dropping it cancels the watch.
#[derive(Debug)]
pub struct ServiceWatch<T> {
    watch: Watch,
    /// key -> raw value, to tell a real change from a rewrite of the same bytes.
    instances: BTreeMap<String, Vec<u8>>,
    started: bool,
    _item: PhantomData<fn() -> T>,
}

impl<T> ServiceWatch<T> {
    pub(crate) fn new(watch: Watch) -> Self {
        ServiceWatch { watch, instances: BTreeMap::new(), started: false, _item: PhantomData }
    }

    /// Applies one event; whether the list changed.
    fn apply(&mut self, event: WatchEvent) -> bool {
        match event {
            WatchEvent::Put(kv) => self.instances.insert(kv.key, kv.value.clone()).as_ref() != Some(&kv.value),
            WatchEvent::Delete { key, .. } => self.instances.remove(&key).is_some(),
            WatchEvent::Snapshot(snapshot)
            | WatchEvent::Compacted { snapshot, .. }
            | WatchEvent::Reset { snapshot, .. } => {
                let fresh: BTreeMap<String, Vec<u8>> = snapshot.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
                let changed = fresh != self.instances;
                self.instances = fresh;
                changed
            }
        }
    }
}

impl<T: DeserializeOwned> ServiceWatch<T> {
    fn list(&self) -> Vec<T> {
        self.instances
            .iter()
            .filter_map(|(key, value)| {
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    mod_revision: 0,
                    create_revision: 0,
                    version: 0,
                    lease: 0,
                };
                decode(&kv)
            })
            .collect()
    }
}

impl<T: DeserializeOwned> Stream for ServiceWatch<T> {
    type Item = Vec<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Vec<T>>> {
        loop {
            match Pin::new(&mut self.watch).poll_next(cx) {
                Poll::Ready(Some(event)) => {
                    let first = !self.started && matches!(event, WatchEvent::Snapshot(_));
                    let changed = self.apply(event);
                    if first || changed {
                        self.started = true;
                        return Poll::Ready(Some(self.list()));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
