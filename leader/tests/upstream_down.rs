//! The leader on the wire while its upstream cannot be built: pending
//! subscriptions, fast-failing calls, and last-known-good values marked
//! `cached` in the `Event` frame, then live values once the upstream is up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tandem_leader::{CallContext, Events, Leader, Upstream};
use tandem_protocol::payload::{decode, encode};
use tandem_protocol::{
    Ack, Api, ErrorKind, Event, Frame, Hello, Invoke, Link, PROTOCOL_VERSION, RemoteError, Response, Subscribe,
    UpstreamState, uuid::Uuid,
};
use tokio::sync::mpsc;

const E_NET: tandem_protocol::ErrorCode = tandem_protocol::ErrorCode::named("E_NET");

const TIMEOUT: Duration = Duration::from_secs(20);

struct Text;
impl Api for Text {
    const NAME: &'static str = "text";
    type Key = String;
    type Event = String;
    type Request = String;
    type Response = String;
}

/// A test upstream: a value per key, pushed to the live stream on `put`.
#[derive(Clone, Default)]
struct Store {
    values: Arc<Mutex<std::collections::HashMap<String, String>>>,
    sinks: Arc<Mutex<std::collections::HashMap<String, mpsc::UnboundedSender<String>>>>,
}

impl Store {
    fn put(&self, key: &str, value: &str) {
        self.values.lock().unwrap().insert(key.into(), value.into());
        if let Some(sink) = self.sinks.lock().unwrap().get(key) {
            let _ = sink.send(value.into());
        }
    }
}

impl Upstream<Text> for Store {
    async fn invoke(&self, request: String, _ctx: CallContext) -> Result<String, RemoteError> {
        Ok(request)
    }
    async fn subscribe(&self, key: String) -> Result<Events<String>, RemoteError> {
        let (sink, events) = mpsc::unbounded_channel();
        if let Some(value) = self.values.lock().unwrap().get(&key) {
            let _ = sink.send(value.clone());
        }
        self.sinks.lock().unwrap().insert(key, sink);
        Ok(Events::new(events))
    }
}

fn leader(store: &Store, up: &Arc<AtomicBool>, cache: &std::path::Path, epoch: u64) -> Leader {
    let mut config = tandem_leader::Config::default();
    config.upstream_retry_initial = Duration::from_millis(5);
    config.upstream_retry_max = Duration::from_millis(20);
    let (store, up) = (store.clone(), up.clone());
    Leader::builder()
        .epoch(epoch)
        .config(config)
        .cache_dir(cache)
        .unwrap()
        .channel_with_retry::<Text, _, _, _>(move || {
            let (store, up) = (store.clone(), up.load(Ordering::SeqCst));
            async move { if up { Ok(store) } else { Err(RemoteError::unavailable("no route").with_code(E_NET)) } }
        })
        .start()
}

async fn next(link: &mut Link) -> Frame {
    loop {
        match link.rx.next().await.expect("link open").expect("a valid frame") {
            Frame::Ping(_) | Frame::Pong(_) => continue,
            frame => return frame,
        }
    }
}

/// Hello, then Welcome; returns the first Status.
async fn hello(link: &mut Link) -> UpstreamState {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        peer_id: Uuid::new_v4(),
        pid: std::process::id(),
        channels: vec!["text".into()],
        token: None,
    };
    link.tx.send(Frame::Hello(hello)).await.unwrap();
    assert!(matches!(next(link).await, Frame::Welcome(_)));
    match next(link).await {
        Frame::Status(status) => status.state,
        other => panic!("expected Status, got {other:?}"),
    }
}

fn subscribe(id: u64, key: &str) -> Frame {
    Frame::Subscribe(Subscribe { id, channel: "text".into(), key: encode(&key.to_string()).unwrap(), last_seen: None })
}

/// Reads frames until the Ack of `id` and one Event; returns the Event.
async fn ack_and_event(link: &mut Link, id: u64) -> Event {
    let (mut acked, mut event) = (false, None);
    while !acked || event.is_none() {
        match next(link).await {
            Frame::Ack(Ack { id: got, result }) if got == id => {
                result.expect("subscribe acknowledged");
                acked = true;
            }
            Frame::Event(e) => event = Some(e),
            Frame::Status(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    event.unwrap()
}

async fn next_event(link: &mut Link) -> Event {
    loop {
        match next(link).await {
            Frame::Event(event) => return event,
            Frame::Status(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_cached_value_goes_on_the_wire_marked_and_the_live_value_follows_unmarked() {
    tokio::time::timeout(TIMEOUT, async {
        let cache = tempfile::tempdir().unwrap();
        let cache_dir = cache.path().join("lkg");
        let store = Store::default();
        store.put("k", "old");
        // First leader, upstream up: the live value reaches the cache.
        let up = Arc::new(AtomicBool::new(true));
        let first = leader(&store, &up, &cache_dir, 1);
        let mut link = first.connect_local();
        hello(&mut link).await;
        link.tx.send(subscribe(1, "k")).await.unwrap();
        let live = ack_and_event(&mut link, 1).await;
        assert!(!live.cached);
        first.shutdown().await;

        // Second leader, upstream down.
        let down = Arc::new(AtomicBool::new(false));
        let second = leader(&store, &down, &cache_dir, 2);
        let mut link = second.connect_local();
        let mut state = hello(&mut link).await;
        while !matches!(state, UpstreamState::Down(_)) {
            state = match next(&mut link).await {
                Frame::Status(status) => status.state,
                other => panic!("unexpected {other:?}"),
            };
        }
        let UpstreamState::Down(reason) = state else { unreachable!() };
        assert_eq!((reason.kind, reason.code.as_str()), (ErrorKind::Unavailable, "E_NET"));
        // A call fails at once with the build error.
        let invoke = Invoke {
            id: 9,
            channel: "text".into(),
            deadline_ms: 10_000,
            oneway: false,
            payload: encode(&"ping".to_string()).unwrap(),
        };
        link.tx.send(Frame::Invoke(invoke)).await.unwrap();
        match next(&mut link).await {
            Frame::Response(Response { id: 9, result: Err(error) }) => assert_eq!(error.code, "E_NET"),
            other => panic!("expected a failed Response, got {other:?}"),
        }
        // The subscription is acknowledged as pending, with the cached value, marked.
        link.tx.send(subscribe(2, "k")).await.unwrap();
        let cached = ack_and_event(&mut link, 2).await;
        assert!(cached.cached, "{cached:?}");
        assert_eq!((cached.epoch, decode::<String>(&cached.payload).unwrap().as_str()), (2, "old"));
        // A key with no cache file: acknowledged, no value.
        link.tx.send(subscribe(3, "nothing")).await.unwrap();
        match next(&mut link).await {
            Frame::Ack(Ack { id: 3, result: Ok(()) }) => {}
            other => panic!("expected Ack, got {other:?}"),
        }
        // The upstream comes up: live values, unmarked, newer.
        store.put("k", "new");
        store.put("nothing", "now something");
        down.store(true, Ordering::SeqCst);
        let mut got = Vec::new();
        while got.len() < 2 {
            got.push(next_event(&mut link).await);
        }
        let (k, nothing) =
            if got[0].key == encode(&"k".to_string()).unwrap() { (&got[0], &got[1]) } else { (&got[1], &got[0]) };
        assert!(!k.cached && !nothing.cached);
        assert_eq!(decode::<String>(&k.payload).unwrap(), "new");
        assert!(k.position() > cached.position());
        assert_eq!(decode::<String>(&nothing.payload).unwrap(), "now something");
        assert_eq!(second.upstream_state("text"), Some(UpstreamState::Ready));
        second.shutdown().await;
    })
    .await
    .expect("test timed out");
}
