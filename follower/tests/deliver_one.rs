//! Deliver-to-one over real sockets: each event of a key reaches exactly one
//! subscriber across the followers; a follower that dies holding unacked
//! events has them redelivered to the others, marked; a late subscriber gets
//! no cached replay.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Counter, Fixture, Kv, TEST_TIMEOUT, follower, within};
use futures::{SinkExt, StreamExt};
use tandem_follower::{DeliverOptions, LocalConnector};
use tandem_protocol::{Frame, FrameCodec, Hello, Link, PROTOCOL_VERSION, SubscribeOne, payload, uuid::Uuid};

/// What the subscribers received: (subscriber, value, redelivered), in arrival order.
type Log = Arc<Mutex<Vec<(usize, String, bool)>>>;

/// Reads a deliver-to-one stream in a task, acking each delivery after logging it.
fn consume(who: usize, mut deliveries: tandem_follower::Deliveries<Kv>, log: Log, count: Arc<Counter>) {
    tokio::spawn(async move {
        while let Some(delivery) = deliveries.next().await {
            log.lock().unwrap().push((who, delivery.value().clone(), delivery.redelivered()));
            delivery.ack();
            count.bump();
        }
    });
}

#[tokio::test]
async fn each_event_reaches_exactly_one_subscriber_in_turn() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir: _dir, upstream, leader, path } = Fixture::start(1);
        let (log, count) = (Log::default(), Arc::new(Counter::default()));
        let mut connections = Vec::new();
        // Four followers over the socket and the leader's own process, through memory: five subscribers.
        for who in 0..5 {
            let connection = if who == 4 {
                common::builder().channel::<Kv>().connect(LocalConnector::new(leader.clone())).spawn()
            } else {
                follower(&path)
            };
            let deliveries = connection.client::<Kv>().subscribe_one("jobs".into()).await.unwrap();
            consume(who, deliveries, log.clone(), count.clone());
            connections.push(connection);
        }
        // A broadcast subscriber of the same key still sees every event.
        let mut everything = connections[0].client::<Kv>().subscribe("jobs".into()).await.unwrap();
        assert_eq!(upstream.counters.subscribes.get(), 1, "one upstream subscription for both modes");
        for i in 0..500 {
            upstream.put("jobs", &i.to_string());
        }
        count.reaches(500).await;
        // (It read nothing meanwhile: it skipped the oldest, and ends on the newest.)
        let mut newest = String::new();
        while newest != "499" {
            newest = everything.next().await.unwrap().value;
        }
        let log = log.lock().unwrap().clone();
        let values: BTreeSet<&str> = log.iter().map(|(_, v, _)| v.as_str()).collect();
        assert_eq!(log.len(), 500, "no event twice");
        assert_eq!(values.len(), 500, "every event once");
        assert!(log.iter().all(|(_, _, redelivered)| !redelivered), "nobody died: nothing redelivered");
        let mut per: BTreeMap<usize, usize> = BTreeMap::new();
        for (who, _, _) in &log {
            *per.entry(*who).or_default() += 1;
        }
        assert_eq!(per.values().copied().collect::<Vec<_>>(), vec![100; 5], "round-robin: {per:?}");
        assert_eq!(leader.stats().undelivered_dropped, 0);
    })
    .await
}

/// A raw peer that subscribes in deliver-to-one mode and never acks.
async fn raw_subscriber(path: &std::path::Path) -> Link {
    let stream = tokio::net::UnixStream::connect(path).await.unwrap();
    let (read, write) = tandem_protocol::unix::split(stream).unwrap();
    let mut link = Link::from_io(read, write, FrameCodec::new());
    let hello = Hello {
        version: PROTOCOL_VERSION,
        peer_id: Uuid::new_v4(),
        pid: std::process::id(),
        channels: vec!["kv".into()],
        token: None,
    };
    link.tx.send(Frame::Hello(hello)).await.unwrap();
    let key = payload::encode(&"jobs".to_string()).unwrap();
    let subscribe = SubscribeOne { id: 1, channel: "kv".into(), key, window: 0, ack_timeout_ms: 0 };
    link.tx.send(Frame::SubscribeOne(subscribe)).await.unwrap();
    loop {
        match link.rx.next().await.unwrap().unwrap() {
            Frame::Ack(ack) => {
                assert_eq!((ack.id, ack.result), (1, Ok(())));
                return link;
            }
            Frame::Welcome(_) | Frame::Status(_) | Frame::Ping(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_follower_killed_holding_unacked_events_has_them_redelivered_to_the_others_marked() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir: _dir, upstream, leader: _leader, path } = Fixture::start(1);
        let (log, count) = (Log::default(), Arc::new(Counter::default()));
        let mut victim = raw_subscriber(&path).await;
        let mut connections = Vec::new();
        for who in 0..2 {
            let connection = follower(&path);
            let deliveries = connection.client::<Kv>().subscribe_one("jobs".into()).await.unwrap();
            consume(who, deliveries, log.clone(), count.clone());
            connections.push(connection);
        }
        for i in 0..90 {
            upstream.put("jobs", &i.to_string());
        }
        // The victim gets a third of them, in turn, and acks none.
        let mut held = BTreeSet::new();
        while held.len() < 30 {
            match victim.rx.next().await.unwrap().unwrap() {
                Frame::Delivery(delivery) => {
                    assert!(!delivery.redelivered);
                    held.insert(payload::decode::<String>(&delivery.payload).unwrap());
                }
                Frame::Ping(_) | Frame::Status(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        count.reaches(60).await;
        // Killed: its socket closes with no Goodbye and no Settle.
        drop(victim);
        count.reaches(90).await;
        let log = log.lock().unwrap().clone();
        let received: BTreeSet<String> = log.iter().map(|(_, v, _)| v.clone()).collect();
        assert_eq!(received, (0..90).map(|i| i.to_string()).collect(), "0 lost");
        assert_eq!(log.len(), 90, "each received once by the survivors");
        let redelivered: BTreeSet<String> = log.iter().filter(|(_, _, r)| *r).map(|(_, v, _)| v.clone()).collect();
        assert_eq!(redelivered, held, "exactly the victim's events come again, each marked redelivered");
    })
    .await
}

#[tokio::test]
async fn an_event_unacked_past_its_ack_timeout_goes_to_another_marked() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir: _dir, upstream, leader: _leader, path } = Fixture::start(1);
        let slow = follower(&path);
        let options = DeliverOptions::default().ack_timeout(Duration::from_millis(200));
        let mut slow_jobs = slow.client::<Kv>().subscribe_one_with("jobs".into(), options).await.unwrap();
        let fast = follower(&path);
        let mut fast_jobs = fast.client::<Kv>().subscribe_one("jobs".into()).await.unwrap();
        upstream.put("jobs", "first");
        // Held, never acked: after 200 ms the leader gives it to the other subscriber.
        let kept = slow_jobs.next().await.unwrap();
        assert_eq!((kept.value().as_str(), kept.redelivered()), ("first", false));
        let again = fast_jobs.next().await.unwrap();
        assert_eq!((again.value().as_str(), again.redelivered()), ("first", true));
        assert_eq!(again.position(), kept.position(), "a redelivery keeps the event's position");
        again.ack();
        kept.ack(); // too late: ignored
    })
    .await
}

#[tokio::test]
async fn a_late_subscriber_gets_no_cached_replay() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir: _dir, upstream, leader: _leader, path } = Fixture::start(1);
        let early = follower(&path);
        let mut early_jobs = early.client::<Kv>().subscribe_one("jobs".into()).await.unwrap();
        for i in 0..5 {
            upstream.put("jobs", &i.to_string());
            early_jobs.next().await.unwrap().ack();
        }
        let late = follower(&path);
        // A broadcast subscriber would get the cached value "4" at once...
        let cached = late.client::<Kv>().subscribe("jobs".into()).await.unwrap().next().await.unwrap();
        assert_eq!(cached.value, "4");
        // ...a deliver-to-one subscriber gets only what comes after it subscribed
        // (in turn with the early one: one each).
        let mut late_jobs = late.client::<Kv>().subscribe_one("jobs".into()).await.unwrap();
        upstream.put("jobs", "after1");
        upstream.put("jobs", "after2");
        let first = late_jobs.next().await.unwrap();
        assert_eq!((first.value().as_str(), first.redelivered()), ("after2", false));
        first.ack();
        let other = early_jobs.next().await.unwrap();
        assert_eq!((other.value().as_str(), other.redelivered()), ("after1", false));
        other.ack();
    })
    .await
}
