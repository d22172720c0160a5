//! Mirrors and warm takeover (protocol version 3, PROTOCOL.md §7.2), in one
//! process over real Unix sockets: a follower mirrors every key its leader
//! follows (snapshot, updates, removals); a leader of version 2 refuses it,
//! typed; a new leader seeded from the mirror serves every value at once at
//! the next epoch, before its upstream answers, resumes the upstream from
//! the mirrored revisions, and nothing a follower sees goes backwards.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::{TEST_TIMEOUT, private_dir, within};
use futures::{SinkExt, StreamExt};
use tandem_follower::{Client, Connection, Error, Mirror, Subscription, UnixConnector, Update};
use tandem_leader::{CallContext, Events, Leader, Upstream};
use tandem_protocol::{
    Api, ChannelStatus, ErrorCode, ErrorKind, Frame, FrameCodec, Mirrored, PROTOCOL_VERSION, Reject, RemoteError,
    UpstreamState, Welcome, uuid::Uuid,
};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

/// A key-value channel whose values carry the upstream's revision.
struct Rev;

impl Api for Rev {
    const NAME: &'static str = "rev";
    type Key = String;
    /// The value and its revision.
    type Event = (String, u64);
    /// Put a value.
    type Request = (String, String);
    type Response = u64;
}

#[derive(Default)]
struct Store {
    revision: u64,
    values: HashMap<String, (String, u64)>,
    /// Every change, in order, for streams resuming from a revision.
    log: Vec<(String, String, u64)>,
    sinks: HashMap<String, Vec<mpsc::UnboundedSender<(String, u64)>>>,
    /// The revisions `subscribe_from` was called with, per key.
    resumed: Vec<(String, u64)>,
    /// `subscribe` (without a revision) calls, per key.
    fresh: Vec<String>,
}

/// An upstream with revisions, resumable: `subscribe_from(key, r)` delivers
/// every change of the key after `r`, then the live ones.
#[derive(Clone, Default)]
struct RevUpstream(Arc<Mutex<Store>>);

impl RevUpstream {
    fn put(&self, key: &str, value: &str) -> u64 {
        let mut store = self.0.lock().unwrap();
        store.revision += 1;
        let revision = store.revision;
        store.values.insert(key.into(), (value.into(), revision));
        store.log.push((key.into(), value.into(), revision));
        if let Some(sinks) = store.sinks.get_mut(key) {
            sinks.retain(|sink| sink.send((value.into(), revision)).is_ok());
        }
        revision
    }

    fn follow(&self, key: String, after: Option<u64>) -> Events<(String, u64)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut store = self.0.lock().unwrap();
        match after {
            None => {
                store.fresh.push(key.clone());
                if let Some(current) = store.values.get(&key) {
                    let _ = tx.send(current.clone());
                }
            }
            Some(after) => {
                store.resumed.push((key.clone(), after));
                for (k, value, revision) in &store.log {
                    if *k == key && *revision > after {
                        let _ = tx.send((value.clone(), *revision));
                    }
                }
            }
        }
        store.sinks.entry(key).or_default().push(tx);
        Events::new(rx)
    }

    fn resumed(&self) -> Vec<(String, u64)> {
        self.0.lock().unwrap().resumed.clone()
    }

    fn fresh(&self) -> Vec<String> {
        self.0.lock().unwrap().fresh.clone()
    }
}

impl Upstream<Rev> for RevUpstream {
    async fn invoke(&self, (key, value): (String, String), _ctx: CallContext) -> Result<u64, RemoteError> {
        Ok(self.put(&key, &value))
    }

    async fn subscribe(&self, key: String) -> Result<Events<(String, u64)>, RemoteError> {
        Ok(self.follow(key, None))
    }

    async fn subscribe_from(&self, key: String, revision: u64) -> Result<Events<(String, u64)>, RemoteError> {
        Ok(self.follow(key, Some(revision)))
    }

    fn revision(&self, event: &(String, u64)) -> Option<u64> {
        Some(event.1)
    }
}

fn connect(path: &std::path::Path) -> Connection {
    common::builder().channel::<Rev>().connect(UnixConnector::new(path)).spawn()
}

/// Waits until the mirror satisfies `done`.
async fn mirror_until(mirror: &Mirror, done: impl Fn(&Mirror) -> bool) {
    let mut status = mirror.watch();
    while !done(mirror) {
        status.changed().await.expect("the mirror's driver is gone");
    }
}

/// The mirrored value of `key`, decoded.
/// A raw follower of `version` on the Leader at `path`, its Hello sent, to see the frames themselves.
async fn raw_follower(path: &std::path::Path, version: u16) -> Framed<tokio::net::UnixStream, FrameCodec> {
    let stream = tokio::net::UnixStream::connect(path).await.unwrap();
    let mut link = Framed::new(stream, FrameCodec::new());
    let hello = tandem_protocol::Hello {
        version,
        peer_id: Uuid::new_v4(),
        pid: std::process::id(),
        channels: vec![],
        token: None,
    };
    link.send(Frame::Hello(hello)).await.unwrap();
    link
}

/// Subscribes `app` to each of `keys` and waits for each one's first value; the subscriptions, kept.
async fn subscribe_all(app: &Client<Rev>, keys: impl Iterator<Item = String>) -> Vec<Subscription<Rev>> {
    let mut subscriptions = Vec::new();
    for key in keys {
        let mut subscription = app.subscribe(key).await.unwrap();
        subscription.next().await.unwrap();
        subscriptions.push(subscription);
    }
    subscriptions
}

fn mirrored(mirror: &Mirror, key: &str) -> Option<String> {
    mirror.value::<Rev>(&key.to_string()).unwrap().map(|((value, _), _)| value)
}

/// Updates as (epoch, seq, value).
fn seen(update: &Update<(String, u64)>) -> (u64, u64, String) {
    (update.epoch, update.seq, update.value.0.clone())
}

#[tokio::test]
async fn a_mirror_gets_the_snapshot_then_updates_then_removals() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = RevUpstream::default();
        let ra = upstream.put("a", "a1");
        upstream.put("b", "b1");
        let leader = Leader::builder().epoch(4).channel::<Rev, _>(upstream.clone()).start();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();

        // A follower subscribes two keys; another follower mirrors the leader.
        let app = connect(&path).client::<Rev>();
        let mut a = app.subscribe("a".into()).await.unwrap();
        let mut b = app.subscribe("b".into()).await.unwrap();
        let first_a = a.next().await.unwrap();
        b.next().await.unwrap();

        let standby = connect(&path);
        let mirror = standby.mirror().await.unwrap();
        mirror.synced().await;
        assert!(mirror.status().synced);
        assert_eq!(mirror.len(), 2, "every followed key: {:?}", mirror.entries());
        let (value, at) = mirror.value::<Rev>(&"a".into()).unwrap().expect("a is mirrored");
        assert_eq!(value, ("a1".to_string(), ra));
        assert_eq!((at.epoch, at.seq), (first_a.epoch, first_a.seq), "the position the followers got");
        assert_eq!(at.revision, Some(ra), "the upstream's resume point");

        // An update.
        let ra2 = upstream.put("a", "a2");
        mirror_until(&mirror, |m| mirrored(m, "a").as_deref() == Some("a2")).await;
        let next_a = a.next().await.unwrap();
        let at = mirror.get("rev", &tandem_protocol::payload::encode(&"a".to_string()).unwrap()).unwrap();
        assert_eq!((at.epoch, at.seq, at.revision), (next_a.epoch, next_a.seq, Some(ra2)));

        // The last subscriber of b leaves: the leader stops following it, the mirror forgets it.
        drop(b);
        mirror_until(&mirror, |m| mirrored(m, "b").is_none()).await;
        assert_eq!(mirror.len(), 1);

        // Asking again gives the same live view.
        let again = standby.mirror().await.unwrap();
        assert_eq!(again.entries(), mirror.entries());

        // Mirroring is not subscribing: the standby's connection holds no subscription.
        let stats = leader.stats();
        assert_eq!(stats.channels[0].subscribers, 1, "{stats:?}");
        // The leader's stats show which follower is its standby.
        let mirrors: Vec<_> = stats.follower_list.iter().filter(|f| f.mirrors).collect();
        assert_eq!(mirrors.len(), 1, "{stats:?}");
        leader.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_mirror_snapshot_of_many_keys_comes_in_bounded_batches() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = RevUpstream::default();
        let keys = tandem_protocol::MIRROR_BATCH_ENTRIES * 2 + 10;
        for n in 0..keys {
            upstream.put(&format!("k{n}"), &format!("v{n}"));
        }
        let leader = Leader::builder().channel::<Rev, _>(upstream.clone()).start();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
        let app = connect(&path).client::<Rev>();
        let _subscriptions = subscribe_all(&app, (0..keys).map(|n| format!("k{n}"))).await;

        // A raw version 3 follower, to see the frames themselves.
        let mut link = raw_follower(&path, PROTOCOL_VERSION).await;
        link.send(Frame::Mirror(7)).await.unwrap();
        let (mut batches, mut entries) = (0, 0);
        loop {
            match link.next().await.expect("the leader closed").unwrap() {
                Frame::Ack(ack) => assert_eq!((ack.id, ack.result), (7, Ok(()))),
                Frame::Mirrored(mirrored) => {
                    assert!(mirrored.entries.len() <= tandem_protocol::MIRROR_BATCH_ENTRIES);
                    entries += mirrored.entries.len();
                    if !mirrored.entries.is_empty() {
                        batches += 1;
                    }
                    if mirrored.synced {
                        break;
                    }
                }
                _ => {}
            }
        }
        assert_eq!(entries, keys);
        assert_eq!(batches, 3, "{keys} keys in batches of {}", tandem_protocol::MIRROR_BATCH_ENTRIES);

        // A second Mirror on the same connection is refused, typed.
        link.send(Frame::Mirror(8)).await.unwrap();
        loop {
            if let Frame::Ack(ack) = link.next().await.expect("the leader closed").unwrap() {
                let error = ack.result.unwrap_err();
                assert_eq!((ack.id, error.kind, error.code), (8, ErrorKind::BadRequest, ErrorCode::MIRROR));
                break;
            }
        }
        leader.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn mirroring_a_version_2_leader_is_refused_typed_and_nothing_is_sent() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let path = dir.path().join("leader.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let connection = connect(&path);

        // A version 2 leader refuses version 3, naming its own; then welcomes version 2.
        let (stream, _) = listener.accept().await.unwrap();
        let mut link = Framed::new(stream, FrameCodec::new());
        let Some(Ok(Frame::Hello(hello))) = link.next().await else { panic!("no Hello") };
        assert_eq!(hello.version, 3);
        let error = RemoteError::rejected("unsupported protocol version 3: this leader speaks versions 1 to 2")
            .with_code(ErrorCode::VERSION);
        link.send(Frame::Reject(Reject { version: 2, error })).await.unwrap();
        drop(link);
        let (stream, _) = listener.accept().await.unwrap();
        let mut link = Framed::new(stream, FrameCodec::new());
        let Some(Ok(Frame::Hello(hello))) = link.next().await else { panic!("no second Hello") };
        assert_eq!(hello.version, 2, "the follower offers the leader's version");
        let welcome = Welcome { version: 2, leader_id: Uuid::new_v4(), epoch: 1, pid: 1, heartbeat_ms: 60_000 };
        link.send(Frame::Welcome(welcome)).await.unwrap();
        link.send(Frame::Status(ChannelStatus { channel: "rev".into(), state: UpstreamState::Ready })).await.unwrap();

        match connection.mirror().await {
            Err(Error::Remote(error)) => {
                assert_eq!((error.kind, &error.code), (ErrorKind::Rejected, &ErrorCode::VERSION), "{error}");
            }
            Err(other) => panic!("expected a Rejected error of code version, got {other:?}"),
            Ok(_) => panic!("a version 2 leader was mirrored"),
        }
        // Nothing of version 3 reached the leader: the next frame it reads is the follower's Goodbye or close.
        connection.close().await;
        while let Some(Ok(frame)) = link.next().await {
            assert!(matches!(frame, Frame::Goodbye(_) | Frame::Ping(_)), "unexpected {frame:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_leader_seeded_from_a_mirror_serves_at_once_at_the_next_epoch_and_resumes_the_upstream() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let path = dir.path().join("leader.sock");
        let upstream = RevUpstream::default();
        upstream.put("a", "a1");
        let rb = upstream.put("b", "b1");
        let old = Leader::builder().epoch(1).channel::<Rev, _>(upstream.clone()).start();
        old.bind_unix(&path).unwrap();

        // An application follower, and a standby mirroring.
        let app = connect(&path);
        let client = app.client::<Rev>();
        let mut a = client.subscribe("a".into()).await.unwrap();
        let mut b = client.subscribe("b".into()).await.unwrap();
        let mut seen_a = vec![seen(&a.next().await.unwrap())];
        let mut seen_b = vec![seen(&b.next().await.unwrap())];
        upstream.put("a", "a2");
        seen_a.push(seen(&a.next().await.unwrap()));
        let standby = connect(&path);
        let mirror = standby.mirror().await.unwrap();
        mirror_until(&mirror, |m| m.status().synced && mirrored(m, "a").as_deref() == Some("a2")).await;
        let ra2 = mirror.value::<Rev>(&"a".into()).unwrap().unwrap().1.revision.unwrap();

        // The old leader dies; a change is made upstream before anyone leads.
        old.shutdown().await;
        std::fs::remove_file(&path).ok();
        let ra3 = upstream.put("a", "a3");

        // The new leader, seeded from the mirror, whose upstream is not built yet.
        let (build, built) = tokio::sync::oneshot::channel::<()>();
        let up = upstream.clone();
        let new = Leader::builder()
            .epoch(2)
            .seed(mirror.entries())
            .channel_from::<Rev, _>(async move {
                let _ = built.await;
                Ok(up)
            })
            .start();
        new.bind_unix(&path).unwrap();

        // A fresh follower gets every seeded value at once, at epoch 2, before the upstream exists.
        let fresh = connect(&path).client::<Rev>();
        let mut fa = fresh.subscribe("a".into()).await.unwrap();
        let mut fb = fresh.subscribe("b".into()).await.unwrap();
        let got_a = fa.next().await.unwrap();
        let got_b = fb.next().await.unwrap();
        assert_eq!((got_a.epoch, got_a.value.0.as_str()), (2, "a2"), "the mirrored value, at the new epoch");
        assert_eq!((got_b.epoch, got_b.value.clone()), (2, ("b1".to_string(), rb)));
        assert!(upstream.resumed().is_empty() && upstream.fresh().len() == 2, "no upstream subscribe yet");

        // The upstream comes: each seeded key is resumed from its revision,
        // and the change made meanwhile arrives; b's value is not sent again.
        build.send(()).unwrap();
        let next_a = fa.next().await.unwrap();
        assert_eq!((next_a.epoch, next_a.value.clone()), (2, ("a3".to_string(), ra3)));
        assert!(next_a.seq > got_a.seq);
        let mut resumed = upstream.resumed();
        resumed.sort();
        assert_eq!(resumed, vec![("a".to_string(), ra2), ("b".to_string(), rb)]);
        assert_eq!(upstream.fresh().len(), 2, "seeded keys are resumed, never subscribed afresh");

        // The application follower moved to the new leader: it gets a3, and
        // nothing older than what it had, nothing twice.
        let moved = a.next().await.unwrap();
        seen_a.push(seen(&moved));
        assert_eq!(moved.value.0, "a3");
        let ra4 = upstream.put("a", "a4");
        let last = a.next().await.unwrap();
        assert_eq!(last.value, ("a4".to_string(), ra4));
        seen_a.push(seen(&last));
        upstream.put("b", "b2");
        seen_b.push(seen(&b.next().await.unwrap()));
        for seen in [&seen_a, &seen_b] {
            for pair in seen.windows(2) {
                assert!((pair[0].0, pair[0].1) < (pair[1].0, pair[1].1), "in order: {seen:?}");
            }
        }
        assert_eq!(seen_b.iter().map(|s| s.2.as_str()).collect::<Vec<_>>(), ["b1", "b2"], "b1 is not repeated");
        let fresh_b = fb.next().await.unwrap();
        assert_eq!(fresh_b.value.0, "b2", "b's seeded value is not sent again");
        assert!(fresh_b.seq > got_b.seq && fresh_b.epoch == 2);

        // The standby's connection moved to the new leader too and mirrors it:
        // the new snapshot replaced the old one.
        mirror_until(&mirror, |m| {
            m.value::<Rev>(&"b".into()).unwrap().is_some_and(|((v, _), at)| v == "b2" && at.epoch == 2)
        })
        .await;
        assert!(mirror.entries().iter().all(|e| e.epoch == 2), "{:?}", mirror.entries());
        new.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn seeded_keys_nobody_resubscribes_are_released_after_the_hold() {
    within(TEST_TIMEOUT, async {
        let upstream = RevUpstream::default();
        let ra = upstream.put("a", "a1");
        let entry = |key: &str, value: &str, revision: u64| tandem_protocol::MirrorEntry {
            channel: "rev".into(),
            key: tandem_protocol::payload::encode(&key.to_string()).unwrap(),
            epoch: 1,
            seq: 3,
            payload: tandem_protocol::payload::encode(&(value.to_string(), revision)).unwrap(),
            revision: Some(revision),
        };
        let mut config = tandem_leader::Config::default();
        config.seed_hold = std::time::Duration::from_millis(300);
        let leader = Leader::builder()
            .epoch(2)
            .config(config)
            .seed([entry("a", "a1", ra), entry("gone", "x", 1)])
            .channel::<Rev, _>(upstream.clone())
            .start();
        // Both keys are followed upstream at once, from their revisions, with no subscriber.
        tandem_testkit::eventually(TEST_TIMEOUT, "both seeded keys resumed", || {
            let resumed = upstream.resumed().len() == 2;
            async move { resumed }
        })
        .await;
        assert_eq!(leader.stats().channels[0].keys.len(), 2);
        // Past the hold, nobody wanted them: released.
        tandem_testkit::eventually(TEST_TIMEOUT, "the seeded keys released", || {
            let released = leader.stats().channels[0].keys.is_empty();
            async move { released }
        })
        .await;
        leader.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_mirror_frame_from_a_version_2_follower_ends_its_session() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let leader = Leader::builder().channel::<Rev, _>(RevUpstream::default()).start();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
        let mut link = raw_follower(&path, 2).await;
        let Some(Ok(Frame::Welcome(welcome))) = link.next().await else { panic!("no Welcome") };
        assert_eq!(welcome.version, 2);
        link.send(Frame::Mirror(1)).await.unwrap();
        let mut goodbye = None;
        while let Some(Ok(frame)) = link.next().await {
            assert!(!matches!(frame, Frame::Ack(_) | Frame::Mirrored(_)), "a version 2 session got {frame:?}");
            if let Frame::Goodbye(reason) = frame {
                goodbye = Some(reason);
            }
        }
        let reason = goodbye.expect("a Goodbye naming the violation");
        assert!(reason.contains("Mirror"), "{reason}");
        leader.shutdown().await;
    })
    .await;
}

/// The mirror lags what the old leader sent: a follower had v5 at (1, s5),
/// the standby only v4 at (1, s4) when the leader died. The new leader seeded
/// with v4 must not send it to that follower (v5, v4, v5), and the upstream's
/// re-announced v5 is not delivered twice.
#[tokio::test]
async fn a_seeded_value_older_than_what_a_follower_has_is_not_sent_to_it() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let path = dir.path().join("leader.sock");
        let upstream = RevUpstream::default();
        upstream.put("a", "v3");
        let old = Leader::builder().epoch(1).channel::<Rev, _>(upstream.clone()).start();
        old.bind_unix(&path).unwrap();
        let app = connect(&path).client::<Rev>();
        let mut a = app.subscribe("a".into()).await.unwrap();
        let mut seen_a = vec![seen(&a.next().await.unwrap())];
        let r4 = upstream.put("a", "v4");
        let v4 = a.next().await.unwrap();
        seen_a.push(seen(&v4));
        upstream.put("a", "v5");
        seen_a.push(seen(&a.next().await.unwrap()));

        // The old leader dies before v5's mirror update reached the standby.
        old.shutdown().await;
        std::fs::remove_file(&path).ok();
        let lagging = tandem_protocol::MirrorEntry {
            channel: "rev".into(),
            key: tandem_protocol::payload::encode(&"a".to_string()).unwrap(),
            epoch: v4.epoch,
            seq: v4.seq,
            payload: tandem_protocol::payload::encode(&v4.value).unwrap(),
            revision: Some(r4),
        };
        let (build, built) = tokio::sync::oneshot::channel::<()>();
        let up = upstream.clone();
        let new = Leader::builder()
            .epoch(2)
            .seed([lagging])
            .channel_from::<Rev, _>(async move {
                let _ = built.await;
                Ok(up)
            })
            .start();
        new.bind_unix(&path).unwrap();

        // A fresh follower gets the seeded v4; the moved one is subscribed again without it.
        let fresh = connect(&path).client::<Rev>();
        let mut fa = fresh.subscribe("a".into()).await.unwrap();
        assert_eq!(fa.next().await.unwrap().value.0, "v4", "a follower with nothing gets the seeded value");
        tandem_testkit::eventually(TEST_TIMEOUT, "the moved follower subscribed again", || {
            let both = new.stats().channels[0].subscribers == 2;
            async move { both }
        })
        .await;

        // The upstream comes and re-announces v5 (after v4's revision); then v6.
        build.send(()).unwrap();
        let v5 = fa.next().await.unwrap();
        assert_eq!(v5.value.0, "v5", "the fresh follower gets the upstream's newer value");
        upstream.put("a", "v6");
        assert_eq!(fa.next().await.unwrap().value.0, "v6");
        let next = a.next().await.unwrap();
        seen_a.push(seen(&next));
        let values: Vec<&str> = seen_a.iter().map(|s| s.2.as_str()).collect();
        assert_eq!(values, ["v3", "v4", "v5", "v6"], "nothing went back, nothing twice: {seen_a:?}");
        for pair in seen_a.windows(2) {
            assert!((pair[0].0, pair[0].1) < (pair[1].0, pair[1].1), "in order: {seen_a:?}");
        }
        new.shutdown().await;
    })
    .await;
}

/// With a frame limit far below `MIRROR_BATCH_BYTES`, the snapshot's batches
/// still fit: every key arrives before `synced`, none dropped by the codec.
#[tokio::test]
async fn a_mirror_snapshot_fits_a_small_frame_limit_and_misses_no_key() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = RevUpstream::default();
        let keys = 300;
        let value = "v".repeat(100);
        for n in 0..keys {
            upstream.put(&format!("key-{n}"), &value);
        }
        let max = 4096;
        let mut config = tandem_leader::Config::default();
        config.max_frame_length = max;
        let leader = Leader::builder().config(config).channel::<Rev, _>(upstream.clone()).start();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
        let app = connect(&path).client::<Rev>();
        let _subscriptions = subscribe_all(&app, (0..keys).map(|n| format!("key-{n}"))).await;

        let mut link = raw_follower(&path, PROTOCOL_VERSION).await;
        link.send(Frame::Mirror(1)).await.unwrap();
        let mut entries = 0;
        loop {
            let frame = link.next().await.expect("the leader closed").unwrap();
            assert!(frame.encode_body().unwrap().len() <= max, "a frame over the limit");
            if let Frame::Mirrored(mirrored) = frame {
                entries += mirrored.entries.len();
                if mirrored.synced {
                    break;
                }
            }
        }
        assert_eq!(entries, keys, "every followed key is in the snapshot");
        leader.shutdown().await;
    })
    .await;
}

/// A standby that stops reading for a while, under a stream of values of one
/// key, is not disconnected: its pending updates of the key are conflated
/// (the latest wins), and it gets that latest value once it reads again.
#[tokio::test]
async fn a_stalled_mirror_under_load_keeps_only_the_latest_update_of_each_key() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = RevUpstream::default();
        upstream.put("a", "start");
        let mut config = tandem_leader::Config::default();
        config.max_queued_frames = 16;
        let leader = Leader::builder().config(config).channel::<Rev, _>(upstream.clone()).start();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
        let app = connect(&path).client::<Rev>();
        let mut a = app.subscribe("a".into()).await.unwrap();
        a.next().await.unwrap();

        let mut link = raw_follower(&path, PROTOCOL_VERSION).await;
        link.send(Frame::Mirror(1)).await.unwrap();
        while !matches!(link.next().await.unwrap().unwrap(), Frame::Mirrored(Mirrored { synced: true, .. })) {}

        // The standby reads nothing while 2000 values of 1 KiB go by: far more
        // than its socket's buffer and 16 frames.
        let filler = "x".repeat(1024);
        let mut last = 0;
        for n in 0..2000 {
            last = upstream.put("a", &format!("{n}{filler}"));
        }
        tandem_testkit::eventually(TEST_TIMEOUT, "the follower got the last value", || {
            let done = a.latest().is_some_and(|u| u.value.1 == last);
            async move { done }
        })
        .await;
        let mirroring = leader.stats().follower_list.iter().filter(|f| f.mirrors).count();
        assert_eq!(mirroring, 1, "the stalled standby is still connected");
        loop {
            match link.next().await.expect("the leader closed the standby's link").unwrap() {
                Frame::Mirrored(mirrored) => {
                    let entry = mirrored.entries.iter().find(|e| e.revision == Some(last));
                    if entry.is_some() {
                        break;
                    }
                }
                Frame::Goodbye(reason) => panic!("the standby was disconnected: {reason}"),
                _ => {}
            }
        }
        leader.shutdown().await;
    })
    .await;
}
