//! The leader against peers that misbehave: garbage, oversized frames, protocol
//! violations, slow readers, silence.

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{Kv, KvRequest, MemUpstream, TEST_TIMEOUT, follower, leader, private_dir, within};
use futures::{SinkExt, StreamExt};
use tandem_leader::{Leader, PeerInfo};
use tandem_protocol::{Frame, FrameCodec, Hello, Invoke, Link, PROTOCOL_VERSION, Subscribe, uuid::Uuid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;
use tokio_util::codec::Encoder;

fn hello() -> Frame {
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        peer_id: Uuid::new_v4(),
        pid: std::process::id(),
        channels: vec!["kv".into()],
        token: None,
    })
}

fn encode(frame: Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::new().encode(frame, &mut buf).unwrap();
    buf
}

/// Reads until the leader closes the connection; returns everything it sent.
async fn read_to_close(stream: &mut UnixStream) -> Vec<u8> {
    let mut all = Vec::new();
    timeout(TEST_TIMEOUT, stream.read_to_end(&mut all)).await.expect("leader never closed").ok();
    all
}

async fn healthy(path: &std::path::Path) {
    let kv = follower(path).client::<Kv>();
    kv.invoke(KvRequest::Put("alive".into(), "yes".into())).await.unwrap();
    assert_eq!(kv.invoke(KvRequest::Get("alive".into())).await.unwrap(), Some("yes".into()));
}

#[tokio::test]
async fn garbage_and_oversized_frames_end_only_their_own_session() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        let (leader, path) = leader(&upstream, dir.path(), 1);
        let bystander = follower(&path).client::<Kv>();
        let mut sub = bystander.subscribe("k".into()).await.unwrap();

        // Random bytes before any handshake.
        let mut garbage = UnixStream::connect(&path).await.unwrap();
        garbage.write_all(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1 GET / HTTP/1.1\r\n").await.unwrap();
        read_to_close(&mut garbage).await;

        // A 4 GiB length prefix: refused before any allocation.
        let mut huge = UnixStream::connect(&path).await.unwrap();
        huge.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
        read_to_close(&mut huge).await;

        // Garbage after a good handshake: the leader says why, then closes.
        let mut late = UnixStream::connect(&path).await.unwrap();
        late.write_all(&encode(hello())).await.unwrap();
        late.write_all(b"\x00\x00\x00\x03\x92\xc1\xc1").await.unwrap();
        let sent = read_to_close(&mut late).await;
        assert!(
            String::from_utf8_lossy(&sent).contains("bad frame from follower"),
            "the Goodbye names the reason: {:?}",
            String::from_utf8_lossy(&sent)
        );

        // A protocol violation: a follower may not send Welcome-side frames.
        let mut rude = UnixStream::connect(&path).await.unwrap();
        rude.write_all(&encode(hello())).await.unwrap();
        rude.write_all(&encode(Frame::Event(tandem_protocol::Event {
            channel: "kv".into(),
            key: Bytes::new(),
            epoch: 1,
            seq: 1,
            payload: Bytes::new(),
            cached: false,
        })))
        .await
        .unwrap();
        let sent = read_to_close(&mut rude).await;
        assert!(String::from_utf8_lossy(&sent).contains("protocol violation"));

        // Everyone else is unaffected.
        healthy(&path).await;
        upstream.put("k", "still here");
        assert_eq!(sub.next().await.unwrap().value, "still here");
        assert_eq!(leader.stats().followers, 2, "the bystander and the health check's connection");
    })
    .await
}

#[tokio::test]
async fn a_follower_that_stops_reading_does_not_delay_the_others() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        let big = "x".repeat(256 * 1024);
        upstream.put("big", &big);
        let up = upstream.clone();
        let mut config = tandem_leader::Config::default();
        config.max_queued_frames = 16;
        config.write_stall_timeout = Duration::from_secs(60);
        let leader = Leader::builder().config(config).channel_from::<Kv, _>(async move { Ok(up) }).start();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();

        // The slow one subscribes to a key, then asks for a large value over and
        // over without ever reading: its socket buffer fills, then its queue.
        let mut slow = UnixStream::connect(&path).await.unwrap();
        slow.write_all(&encode(hello())).await.unwrap();
        let key = tandem_protocol::payload::encode(&"k".to_string()).unwrap();
        slow.write_all(&encode(Frame::Subscribe(Subscribe { id: 1, channel: "kv".into(), key, last_seen: None })))
            .await
            .unwrap();
        let get = tandem_protocol::payload::encode(&KvRequest::Get("big".into())).unwrap();
        for id in 2..200u64 {
            let frame = Frame::Invoke(Invoke {
                id,
                channel: "kv".into(),
                deadline_ms: 60_000,
                oneway: false,
                payload: get.clone(),
            });
            if slow.write_all(&encode(frame)).await.is_err() {
                break; // already disconnected
            }
        }

        // Meanwhile a healthy follower sees every change promptly.
        let fast = follower(&path).client::<Kv>();
        let mut sub = fast.subscribe("k".into()).await.unwrap();
        for i in 0..200 {
            upstream.put("k", &i.to_string());
        }
        let mut last = None;
        while last.as_deref() != Some("199") {
            last = Some(sub.next().await.unwrap().value);
        }

        // The slow one was cut off once its queue overflowed, without the
        // leader ever waiting for it: its socket simply ends.
        read_to_close(&mut slow).await;
        assert_eq!(leader.stats().followers, 1);
        assert_eq!(fast.invoke(KvRequest::Get("k".into())).await.unwrap(), Some("199".into()));
    })
    .await
}

async fn handshake_over_pair(leader: &Leader) -> Link {
    let (mut ours, theirs) = Link::pair(64);
    leader.serve_link(theirs, PeerInfo::relayed("test", None));
    ours.tx.send(hello()).await.unwrap();
    match ours.rx.next().await {
        Some(Ok(Frame::Welcome(_))) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    ours
}

/// Next frame that is not a heartbeat or status from the leader.
async fn next_reply(link: &mut Link) -> Option<Frame> {
    loop {
        match link.rx.next().await {
            Some(Ok(Frame::Ping(_) | Frame::Status(_))) => continue,
            Some(Ok(frame)) => return Some(frame),
            Some(Err(e)) => panic!("link error {e}"),
            None => return None,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeats_spare_a_stalled_peer_and_reap_a_dead_one() {
    let upstream = MemUpstream::default();
    let up = upstream.clone();
    let leader = Leader::builder().channel_from::<Kv, _>(async move { Ok(up) }).start();
    let mut link = handshake_over_pair(&leader).await;

    // Stalled for 5 s (a debugger, a CPU spike), then alive again: not dropped.
    tokio::time::advance(Duration::from_secs(5)).await;
    link.tx.send(Frame::Ping(42)).await.unwrap();
    assert_eq!(next_reply(&mut link).await, Some(Frame::Pong(42)));

    // A long call does not count against the peer either, as long as it pings.
    let payload = tandem_protocol::payload::encode(&KvRequest::Hang).unwrap();
    let invoke = Invoke { id: 9, channel: "kv".into(), deadline_ms: 60_000, oneway: false, payload };
    link.tx.send(Frame::Invoke(invoke)).await.unwrap();
    for n in 0..30 {
        tokio::time::advance(Duration::from_secs(1)).await;
        link.tx.send(Frame::Ping(n)).await.unwrap();
        assert_eq!(next_reply(&mut link).await, Some(Frame::Pong(n)));
    }
    assert_eq!(leader.stats().followers, 1);

    // Silent past the peer timeout (15 s by default): reaped, and the call cancelled.
    let silent_from = tokio::time::Instant::now();
    let end = next_reply(&mut link).await;
    assert!(matches!(end, None | Some(Frame::Goodbye(_))), "{end:?}");
    let waited = silent_from.elapsed();
    assert!(waited >= Duration::from_secs(15) && waited <= Duration::from_secs(17), "{waited:?}");
    upstream.counters.cancelled.reaches(1).await;
    assert_eq!(leader.stats().followers, 0);
}
