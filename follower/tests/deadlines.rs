//! A call's deadline is the follower's own: it holds whether the leader
//! answers late, never answers, stops reading, or was never there.

mod common;

use std::time::{Duration, Instant};

use common::{Kv, KvRequest, TEST_TIMEOUT, follower_with, private_dir, within};
use futures::{SinkExt, StreamExt};
use tandem_follower::{Config, Error};
use tandem_protocol::{Frame, FrameCodec, PROTOCOL_VERSION, Welcome, uuid::Uuid};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Framed;

const DEADLINE: Duration = Duration::from_millis(300);

/// A follower config that would take far longer than any deadline here to
/// give a silent or stalled leader up.
fn patient() -> Config {
    let mut config = common::config();
    config.peer_timeout = Duration::from_secs(120);
    config
}

/// Accepts one follower and completes its handshake, as a leader that then
/// does whatever the test says (or nothing).
async fn accept_one(listener: &UnixListener) -> Framed<UnixStream, FrameCodec> {
    let (stream, _) = listener.accept().await.unwrap();
    let mut link = Framed::new(stream, FrameCodec::new());
    let Some(Ok(Frame::Hello(_))) = link.next().await else { panic!("no Hello") };
    let welcome =
        Welcome { version: PROTOCOL_VERSION, leader_id: Uuid::new_v4(), epoch: 1, pid: 1, heartbeat_ms: 60_000 };
    link.send(Frame::Welcome(welcome)).await.unwrap();
    link
}

fn assert_deadline(error: &Error, budget: Duration) {
    assert!(matches!(error, Error::DeadlineExceeded(d) if *d == budget), "the follower's own deadline: {error:?}");
}

#[tokio::test]
async fn a_leader_that_never_answers_cannot_hold_a_call_past_its_deadline() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let listener = UnixListener::bind(dir.path().join("leader.sock")).unwrap();
        let kv = follower_with(&dir.path().join("leader.sock"), patient()).client::<Kv>();
        let call = tokio::spawn({
            let kv = kv.clone();
            async move {
                let started = Instant::now();
                (kv.invoke_with_deadline(KvRequest::Hang, DEADLINE).await, started.elapsed())
            }
        });
        let mut link = accept_one(&listener).await;
        // The leader reads the call, then says nothing at all.
        let id = loop {
            match link.next().await {
                Some(Ok(Frame::Invoke(invoke))) => break invoke.id,
                Some(Ok(_)) => continue,
                other => panic!("the call never came: {other:?}"),
            }
        };
        let (result, took) = call.await.unwrap();
        assert_deadline(&result.unwrap_err(), DEADLINE);
        assert!(took >= DEADLINE && took < Duration::from_secs(5), "ended after {took:?}");
        // And the follower tells the leader to stop working on it.
        loop {
            match link.next().await {
                Some(Ok(Frame::Cancel(cancelled))) => break assert_eq!(cancelled, id),
                Some(Ok(_)) => continue,
                other => panic!("no Cancel for the expired call: {other:?}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_leader_that_stops_reading_cannot_hold_calls_past_their_deadline() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let listener = UnixListener::bind(dir.path().join("leader.sock")).unwrap();
        let kv = follower_with(&dir.path().join("leader.sock"), patient()).client::<Kv>();
        let accepted = tokio::spawn(async move { (accept_one(&listener).await, listener) });
        // Far more than a socket buffer: the follower's writes stall.
        let big = "x".repeat(1024 * 1024);
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let kv = kv.clone();
                let request = if i < 7 { KvRequest::Put(format!("k{i}"), big.clone()) } else { KvRequest::Hang };
                tokio::spawn(async move {
                    let started = Instant::now();
                    (kv.invoke_with_deadline(request, DEADLINE).await, started.elapsed())
                })
            })
            .collect();
        // The leader is connected (and reads nothing from here on).
        let (_link, _listener) = accepted.await.unwrap();
        for call in calls {
            let (result, took) = call.await.unwrap();
            assert_deadline(&result.unwrap_err(), DEADLINE);
            assert!(took < Duration::from_secs(5), "ended after {took:?}, not at its deadline");
        }
    })
    .await
}

#[tokio::test]
async fn a_call_made_before_any_leader_exists_ends_at_its_deadline() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let kv = follower_with(&dir.path().join("nobody-here.sock"), patient()).client::<Kv>();
        let started = Instant::now();
        let error = kv.invoke_with_deadline(KvRequest::Get("k".into()), DEADLINE).await.unwrap_err();
        assert_deadline(&error, DEADLINE);
        let took = started.elapsed();
        assert!(took >= DEADLINE && took < Duration::from_secs(5), "ended after {took:?}");
    })
    .await
}
