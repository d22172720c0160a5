//! The bench's channel and its in-memory upstream: invoke echoes the payload;
//! subscriptions are fed by a publisher task in the leader's process (or, in
//! the failover group, by a ticker standing in for a real store's changing value).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tandem::{Api, CallContext, EventSender, Events, RemoteError, Upstream};

use crate::clock::mono_ns;

pub struct BenchApi;

impl Api for BenchApi {
    const NAME: &'static str = "bench";
    type Key = String;
    type Event = Tick;
    type Request = Bytes;
    type Response = Bytes;
}

/// One event: which key, its index in that key's stream (from 0 in each
/// publishing phase, so a follower sees gaps), when it was published, and padding.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tick {
    pub key: u32,
    pub idx: u64,
    pub sent_ns: u64,
    pub pad: Bytes,
}

pub fn key_name(key: usize) -> String {
    format!("k{key}")
}

/// The key of the deliver-to-one phase (its events are jobs shared by the followers).
pub const ONE_KEY: &str = "jobs";

/// The key the failover group's ticker changes every period.
pub const TICKING_KEY: &str = "tick";

/// Where the publisher sends a key's events: delivered by the Leader as sent.
pub type Sink = EventSender<Tick>;

#[derive(Clone, Default)]
pub struct BenchUpstream {
    sinks: Arc<Mutex<HashMap<String, Sink>>>,
    /// Set in the failover group: the ticking key's period.
    ticking: Option<Duration>,
}

impl BenchUpstream {
    /// An upstream whose [`TICKING_KEY`] changes every `period` (like a store
    /// another writer updates), with a current value handed to each subscriber.
    /// Must be called inside a tokio runtime: the ticker is a task.
    pub fn ticking(period: Duration) -> BenchUpstream {
        let upstream = BenchUpstream { sinks: Arc::default(), ticking: Some(period) };
        let sinks = upstream.sinks.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            loop {
                interval.tick().await;
                let sink = sinks.lock().unwrap_or_else(|p| p.into_inner()).get(TICKING_KEY).cloned();
                if let Some(sink) = sink {
                    sink.send(current_tick(period));
                }
            }
        });
        upstream
    }

    /// The sinks of `k0..k{keys-1}` (every key must have been subscribed).
    pub fn sinks(&self, keys: usize) -> Result<Vec<Sink>> {
        (0..keys).map(|k| self.sink(k).ok_or_else(|| anyhow!("nobody subscribed to {}", key_name(k)))).collect()
    }

    /// The current sink of `k{key}`, if the leader has it subscribed.
    pub fn sink(&self, key: usize) -> Option<Sink> {
        self.sink_named(&key_name(key))
    }

    /// The current sink of `key`, if the leader has it subscribed.
    pub fn sink_named(&self, key: &str) -> Option<Sink> {
        self.sinks.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }
}

/// The ticking key's value now: its index is the period number, the same in every process.
fn current_tick(period: Duration) -> Tick {
    let now = mono_ns();
    Tick { key: 0, idx: now / (period.as_nanos() as u64).max(1), sent_ns: now, pad: Bytes::new() }
}

impl Upstream<BenchApi> for BenchUpstream {
    async fn invoke(&self, request: Bytes, _ctx: CallContext) -> Result<Bytes, RemoteError> {
        Ok(request)
    }

    async fn subscribe(&self, key: String) -> Result<Events<Tick>, RemoteError> {
        let (sink, events) = Events::channel();
        if let Some(period) = self.ticking.filter(|_| key == TICKING_KEY) {
            sink.send(current_tick(period));
        }
        self.sinks.lock().unwrap_or_else(|p| p.into_inner()).insert(key, sink);
        Ok(events)
    }
}
