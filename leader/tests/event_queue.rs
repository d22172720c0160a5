//! A follower's event queue on the wire: every value in order while it keeps
//! up, conflation per key only once it is behind (and then without holding
//! anyone else), and `EventSender::ready` pacing an upstream that can wait.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::next;
use futures::{SinkExt, StreamExt};
use tandem_leader::{CallContext, EventSender, Events, Leader, Upstream};
use tandem_protocol::payload::{decode, encode};
use tandem_protocol::{Ack, Api, Event, Frame, Link, RemoteError, Subscribe};
use tokio::sync::Notify;

const TIMEOUT: Duration = Duration::from_secs(30);

struct Counter;
impl Api for Counter {
    const NAME: &'static str = "counter";
    type Key = String;
    type Event = (u64, String);
    type Request = String;
    type Response = String;
}

type Sender = EventSender<(u64, String)>;

/// The upstream: hands out each key's sender, for the test to publish on.
#[derive(Clone, Default)]
struct Feed {
    senders: Arc<Mutex<HashMap<String, Sender>>>,
    subscribed: Arc<Notify>,
}

impl Feed {
    async fn sender(&self, key: &str) -> Sender {
        loop {
            let subscribed = self.subscribed.notified();
            if let Some(sender) = self.senders.lock().unwrap().get(key).cloned() {
                return sender;
            }
            subscribed.await;
        }
    }
}

impl Upstream<Counter> for Feed {
    async fn invoke(&self, request: String, _ctx: CallContext) -> Result<String, RemoteError> {
        Ok(request)
    }
    async fn subscribe(&self, key: String) -> Result<Events<(u64, String)>, RemoteError> {
        let (sender, events) = Events::channel();
        self.senders.lock().unwrap().insert(key, sender);
        self.subscribed.notify_waiters();
        Ok(events)
    }
}

fn leader(feed: &Feed, config: tandem_leader::Config) -> Leader {
    Leader::builder().epoch(1).config(config).channel::<Counter, _>(feed.clone()).start()
}

/// Hello, Welcome, then a subscription to `key`, acknowledged.
async fn follower(leader: &Leader, key: &str) -> Link {
    let mut link = common::connect(leader, Counter::NAME).await;
    let subscribe =
        Subscribe { id: 1, channel: Counter::NAME.into(), key: encode(&key.to_string()).unwrap(), last_seen: None };
    link.tx.send(Frame::Subscribe(subscribe)).await.unwrap();
    match next(&mut link).await {
        Frame::Ack(Ack { id: 1, result }) => result.expect("subscribed"),
        other => panic!("expected the Ack, got {other:?}"),
    }
    link
}

/// The values of the next event.
async fn value(link: &mut Link) -> (Event, u64) {
    match next(link).await {
        Frame::Event(event) => {
            let (n, _): (u64, String) = decode(&event.payload).expect("a counter value");
            (event, n)
        }
        other => panic!("expected an Event, got {other:?}"),
    }
}

/// Reads until value `last`; returns how many values arrived (each newer than the one before).
async fn read_until(link: &mut Link, last: u64) -> u64 {
    let (mut seen, mut previous) = (0, None);
    loop {
        let (event, n) = value(link).await;
        assert!(previous.is_none_or(|(seq, p)| event.seq > seq && n > p), "out of order: {n} after {previous:?}");
        previous = Some((event.seq, n));
        seen += 1;
        if n == last {
            return seen;
        }
    }
}

#[tokio::test]
async fn an_upstream_that_waits_for_ready_reaches_every_reading_follower_with_every_value() {
    tokio::time::timeout(TIMEOUT, async {
        let feed = Feed::default();
        let mut config = tandem_leader::Config::default();
        config.max_queued_events = 8;
        let leader = leader(&feed, config);
        let mut links = vec![follower(&leader, "k").await, follower(&leader, "k").await];
        let sender = feed.sender("k").await;
        const VALUES: u64 = 5_000;
        let publisher = tokio::spawn(async move {
            for n in 0..VALUES {
                sender.ready().await;
                assert!(sender.send((n, "x".repeat(64))));
            }
        });
        let readers: Vec<_> = links
            .drain(..)
            .map(|mut link| {
                tokio::spawn(async move {
                    for expected in 0..VALUES {
                        let (_, n) = value(&mut link).await;
                        assert_eq!(n, expected, "every value, in order, none conflated");
                    }
                })
            })
            .collect();
        publisher.await.unwrap();
        for reader in readers {
            reader.await.unwrap();
        }
        leader.shutdown().await;
        assert_eq!(leader.stats().conflated_events, 0);
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn a_follower_that_stops_reading_is_conflated_and_holds_nobody_else() {
    tokio::time::timeout(TIMEOUT, async {
        let feed = Feed::default();
        let mut config = tandem_leader::Config::default();
        config.max_queued_events = 16;
        let leader = leader(&feed, config);
        let mut reading = follower(&leader, "k").await;
        let mut stalled = follower(&leader, "k").await;
        let sender = feed.sender("k").await;
        // Far more than the stalled link and its queue hold: the publisher never waits.
        const VALUES: u64 = 20_000;
        let reader = tokio::spawn(async move { read_until(&mut reading, VALUES - 1).await });
        for n in 0..VALUES {
            assert!(sender.send((n, "x".repeat(256))));
            if n % 256 == 0 {
                tokio::task::yield_now().await;
            }
        }
        reader.await.unwrap();
        // Reading now, it gets fewer values than were sent, in order, ending with the newest.
        let seen = read_until(&mut stalled, VALUES - 1).await;
        assert!(seen < VALUES, "the stalled follower's events were conflated ({seen} of {VALUES} arrived)");
        drop(stalled);
        leader.shutdown().await;
        assert!(leader.stats().conflated_events > 0);
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn ready_does_not_wait_for_ever_for_a_follower_that_stopped_reading() {
    tokio::time::timeout(TIMEOUT, async {
        let feed = Feed::default();
        let mut config = tandem_leader::Config::default();
        config.max_queued_events = 4;
        config.write_stall_timeout = Duration::from_millis(300);
        let leader = leader(&feed, config);
        let mut stalled = follower(&leader, "k").await;
        let sender = feed.sender("k").await;
        // The link holds 1024 frames and the queue 4: past them the sender
        // waits, until the stalled session ends at its write stall timeout.
        for n in 0..5_000 {
            sender.ready().await;
            sender.send((n, String::new()));
        }
        // The stalled session was ended: what it had buffered, then the end.
        let mut frames = 0;
        while let Some(Ok(_)) = stalled.rx.next().await {
            frames += 1;
        }
        assert!(frames < 5_000, "the stalled follower was disconnected ({frames} frames)");
        leader.shutdown().await;
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn a_socket_follower_that_stops_reading_events_is_ended_at_its_write_stall_timeout() {
    tokio::time::timeout(TIMEOUT, async {
        let feed = Feed::default();
        let mut config = tandem_leader::Config::default();
        config.max_queued_events = 16;
        config.write_stall_timeout = Duration::from_millis(300);
        let leader = leader(&feed, config);
        // A real socket: the events go to it in runs through the codec.
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let (read, write) = theirs.into_split();
        leader.serve_link(
            Link::from_io(read, write, tandem_protocol::FrameCodec::new()),
            tandem_leader::PeerInfo::relayed("unix", None),
        );
        let (read, write) = ours.into_split();
        let mut stalled = Link::from_io(read, write, tandem_protocol::FrameCodec::new());
        let hello = tandem_protocol::Hello {
            version: tandem_protocol::PROTOCOL_VERSION,
            peer_id: tandem_protocol::uuid::Uuid::new_v4(),
            pid: std::process::id(),
            channels: vec![Counter::NAME.into()],
            token: None,
        };
        stalled.tx.send(Frame::Hello(hello)).await.unwrap();
        assert!(matches!(next(&mut stalled).await, Frame::Welcome(_)));
        let key = encode(&"k".to_string()).unwrap();
        let subscribe = Subscribe { id: 1, channel: Counter::NAME.into(), key, last_seen: None };
        stalled.tx.send(Frame::Subscribe(subscribe)).await.unwrap();
        assert!(matches!(next(&mut stalled).await, Frame::Ack(Ack { id: 1, result: Ok(()) })));
        let sender = feed.sender("k").await;
        // Never read: the socket fills, the session waits past its stall bound and ends.
        let mut sent = 0u64;
        while leader.stats().followers > 0 {
            for _ in 0..64 {
                sender.send((sent, "x".repeat(1024)));
                sent += 1;
            }
            tokio::task::yield_now().await;
        }
        // What the socket held, in order, then the end.
        let mut seen = 0u64;
        let mut previous = None;
        while let Some(Ok(frame)) = stalled.rx.next().await {
            if let Frame::Event(event) = frame {
                assert!(previous.is_none_or(|seq| event.seq > seq), "in order");
                previous = Some(event.seq);
                seen += 1;
            }
        }
        assert!(seen < sent, "the stalled follower was cut off ({seen} of {sent} events)");
        leader.shutdown().await;
    })
    .await
    .expect("timed out");
}
