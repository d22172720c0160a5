//! A small in-memory upstream (a key-value store with watches) for in-process tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_follower::{Connection, Standalone};
use tandem_leader::{CallContext, Events, Leader, Upstream};
use tandem_protocol::{Api, RemoteError};
use tokio::sync::mpsc;

pub const E_TEST: tandem_protocol::ErrorCode = tandem_protocol::ErrorCode::named("E_TEST");
pub const E_DENIED: tandem_protocol::ErrorCode = tandem_protocol::ErrorCode::named("E_DENIED");

pub struct Kv;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum KvRequest {
    Get(String),
    Put(String, String),
    /// Never answers (until cancelled).
    Hang,
    Fail(String),
}

impl Api for Kv {
    const NAME: &'static str = "kv";
    type Key = String;
    type Event = String;
    type Request = KvRequest;
    type Response = Option<String>;
}

/// A counter tests can await.
#[derive(Debug)]
pub struct Counter(tokio::sync::watch::Sender<usize>);

impl Default for Counter {
    fn default() -> Self {
        Counter(tokio::sync::watch::Sender::new(0))
    }
}

impl Counter {
    pub fn bump(&self) {
        self.0.send_modify(|n| *n += 1);
    }
    pub fn get(&self) -> usize {
        *self.0.borrow()
    }
    /// Waits until the count reaches `n`.
    pub async fn reaches(&self, n: usize) {
        let mut rx = self.0.subscribe();
        rx.wait_for(|v| *v >= n).await.expect("counter dropped");
    }
}

/// Counters the tests read.
#[derive(Default, Debug)]
pub struct Counters {
    pub subscribes: Counter,
    pub unsubscribes: Counter,
    pub invokes: Counter,
    /// Hung calls whose future was dropped (cancelled).
    pub cancelled: Counter,
}

#[derive(Default)]
struct Store {
    values: HashMap<String, String>,
    sinks: HashMap<String, mpsc::UnboundedSender<String>>,
}

#[derive(Clone)]
pub struct MemUpstream {
    store: Arc<Mutex<Store>>,
    pub counters: Arc<Counters>,
    /// What the upstream reports as its health.
    pub health: Arc<tokio::sync::watch::Sender<tandem_protocol::UpstreamState>>,
}

impl Default for MemUpstream {
    fn default() -> Self {
        MemUpstream {
            store: Arc::default(),
            counters: Arc::default(),
            health: Arc::new(tokio::sync::watch::Sender::new(tandem_protocol::UpstreamState::Ready)),
        }
    }
}

impl MemUpstream {
    /// Writes a value as the real upstream would, notifying the subscription.
    pub fn put(&self, key: &str, value: &str) {
        let mut store = self.store.lock().unwrap();
        store.values.insert(key.to_string(), value.to_string());
        if let Some(sink) = store.sinks.get(key) {
            let _ = sink.send(value.to_string());
        }
    }
}

struct DropCounter(Arc<Counters>);
impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.cancelled.bump();
    }
}

impl Upstream<Kv> for MemUpstream {
    async fn invoke(&self, request: KvRequest, _ctx: CallContext) -> Result<Option<String>, RemoteError> {
        self.counters.invokes.bump();
        match request {
            KvRequest::Get(key) => Ok(self.store.lock().unwrap().values.get(&key).cloned()),
            KvRequest::Put(key, value) => {
                self.put(&key, &value);
                Ok(None)
            }
            KvRequest::Hang => {
                let _guard = DropCounter(self.counters.clone());
                std::future::pending::<()>().await;
                unreachable!()
            }
            KvRequest::Fail(message) => Err(RemoteError::upstream(message).with_code(E_TEST)),
        }
    }

    async fn subscribe(&self, key: String) -> Result<Events<String>, RemoteError> {
        if key.starts_with("denied") {
            return Err(RemoteError::rejected(format!("no access to {key}")).with_code(E_DENIED));
        }
        self.counters.subscribes.bump();
        let (sink, events) = mpsc::unbounded_channel();
        let mut store = self.store.lock().unwrap();
        if let Some(value) = store.values.get(&key) {
            let _ = sink.send(value.clone());
        }
        if key.starts_with("panics") {
            // A stream that panics when polled: the leader treats it as ended.
            return Ok(Events::stream(futures::stream::poll_fn(|_| -> std::task::Poll<Option<String>> {
                panic!("the test upstream's stream panicked")
            })));
        }
        if key.starts_with("once") {
            // A stream that ends after the current value: the upstream lost it.
            return Ok(Events::new(events));
        }
        store.sinks.insert(key.clone(), sink);
        // Dropping the stream is the unsubscribe.
        let (counters, shared) = (self.counters.clone(), self.store.clone());
        Ok(Events::new(events).on_drop(move || {
            counters.unsubscribes.bump();
            shared.lock().unwrap_or_else(|p| p.into_inner()).sinks.remove(&key);
        }))
    }

    fn health(&self) -> Option<tokio::sync::watch::Receiver<tandem_protocol::UpstreamState>> {
        Some(self.health.subscribe())
    }

    async fn publish(&self, request: KvRequest, _ctx: CallContext) -> Result<(), RemoteError> {
        match request {
            KvRequest::Put(key, value) => {
                self.put(&key, &value);
                Ok(())
            }
            other => Err(RemoteError::bad_request(format!("cannot publish {other:?}"))),
        }
    }
}

/// A leader serving `upstream` on a socket in `dir`.
pub fn leader(upstream: &MemUpstream, dir: &std::path::Path, epoch: u64) -> (Leader, std::path::PathBuf) {
    let up = upstream.clone();
    let leader = Leader::builder().epoch(epoch).channel_from::<Kv, _>(async move { Ok(up) }).start();
    let path = leader.bind_unix(dir.join("leader.sock")).expect("bind");
    (leader, path)
}

/// What most tests start from: a private directory, an upstream, and a
/// leader serving it on a socket in that directory.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub upstream: MemUpstream,
    pub leader: Leader,
    pub path: std::path::PathBuf,
}

impl Fixture {
    /// A leader at `epoch` over an empty upstream.
    pub fn start(epoch: u64) -> Fixture {
        Fixture::seeded(epoch, &[])
    }

    /// A leader at `epoch` over an upstream that holds `values` before it starts.
    pub fn seeded(epoch: u64, values: &[(&str, &str)]) -> Fixture {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        for (key, value) in values {
            upstream.put(key, value);
        }
        let (leader, path) = leader(&upstream, dir.path(), epoch);
        Fixture { dir, upstream, leader, path }
    }
}

/// The follower config every test starts from: the default, with the call
/// path named by `TANDEM_TEST_CALLS` (`queue` or `slots`; unset: the
/// default path), so the whole suite can run on either path.
pub fn config() -> tandem_follower::Config {
    let mut config = tandem_follower::Config::default();
    match std::env::var("TANDEM_TEST_CALLS").as_deref() {
        Ok("queue") => config.calls = tandem_follower::CallPath::Queue,
        Ok("slots") => config.calls = tandem_follower::CallPath::Slots,
        Ok(other) => panic!("TANDEM_TEST_CALLS={other}: expected queue or slots"),
        Err(_) => {}
    }
    config
}

/// A connection builder with [`config`].
pub fn builder() -> tandem_follower::ConnectionBuilder {
    Connection::builder().config(config())
}

/// A follower connection to the socket at `path`.
pub fn follower(path: &std::path::Path) -> Connection {
    follower_with(path, config())
}

pub fn follower_with(path: &std::path::Path, config: tandem_follower::Config) -> Connection {
    Connection::builder().config(config).channel::<Kv>().connect(tandem_follower::UnixConnector::new(path)).spawn()
}

/// A standalone (elected) connection.
pub fn standalone(name: &str, dir: &std::path::Path, upstream: &MemUpstream) -> Connection {
    let up = upstream.clone();
    let connector = Standalone::new(name, dir, move |builder| {
        let up = up.clone();
        builder.channel_from::<Kv, _>(async move { Ok(up) })
    });
    builder().channel::<Kv>().connect(connector).spawn()
}

/// The longest any one test here may run.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20);

#[allow(unused_imports)] // each test binary uses some of them
pub use tandem_testkit::{private_dir, within};
