//! Leader and followers in one process, over real Unix sockets and in-memory links.

mod common;

use std::time::Duration;

use common::{
    Fixture, Kv, KvRequest, MemUpstream, TEST_TIMEOUT, follower, follower_with, leader, private_dir, standalone, within,
};
use futures::StreamExt;
use tandem_follower::{Error, LocalConnector, State};
use tandem_protocol::ErrorKind;
use tokio::time::timeout;

const E_INIT: tandem_protocol::ErrorCode = tandem_protocol::ErrorCode::named("E_INIT");

#[tokio::test]
async fn invoke_round_trips_and_remote_errors_are_typed() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir: _dir, upstream: _, leader: _leader, path } = Fixture::start(1);
        let kv = follower(&path).client::<Kv>();
        kv.ready().await.unwrap();
        assert!(!kv.is_leader());
        assert_eq!(kv.invoke(KvRequest::Put("a".into(), "1".into())).await.unwrap(), None);
        assert_eq!(kv.invoke(KvRequest::Get("a".into())).await.unwrap(), Some("1".into()));
        let error = kv.invoke(KvRequest::Fail("boom".into())).await.unwrap_err();
        let remote = error.remote().expect("a remote error");
        assert_eq!(
            (remote.kind, remote.code.as_str(), remote.message.as_str()),
            (ErrorKind::Upstream, "E_TEST", "boom")
        );
        kv.publish(KvRequest::Put("b".into(), "2".into())).await.unwrap();
        assert_eq!(kv.invoke(KvRequest::Get("b".into())).await.unwrap(), Some("2".into()));
        kv.invoke_oneway(KvRequest::Put("c".into(), "3".into())).await.unwrap();
        // The one-way call and this one travel in order on one connection.
        assert_eq!(kv.invoke(KvRequest::Get("c".into())).await.unwrap(), Some("3".into()));
    })
    .await
}

#[tokio::test]
async fn the_leaders_own_process_uses_the_same_handle_through_memory() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir: _dir, upstream, leader, path } = Fixture::start(7);
        let local = common::builder().channel::<Kv>().connect(LocalConnector::new(leader.clone())).spawn();
        let here = local.client::<Kv>();
        here.ready().await.unwrap();
        assert!(here.is_leader());
        let there = follower(&path).client::<Kv>();
        there.ready().await.unwrap();

        let mut sub_here = here.subscribe("k".into()).await.unwrap();
        let mut sub_there = there.subscribe("k".into()).await.unwrap();
        assert_eq!(upstream.counters.subscribes.get(), 1, "two subscribers, one upstream subscription");
        here.invoke(KvRequest::Put("k".into(), "v".into())).await.unwrap();
        let a = sub_here.next().await.unwrap();
        let b = sub_there.next().await.unwrap();
        assert_eq!((a.value.as_str(), a.epoch), ("v", 7));
        assert_eq!(a.position(), b.position());
        assert_eq!(leader.stats().followers, 2);
    })
    .await
}

#[tokio::test]
async fn many_subscribers_share_one_upstream_subscription_and_the_last_releases_it() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir: _dir, upstream, leader, path } = Fixture::seeded(1, &[("flag", "on")]);
        let clients: Vec<_> = (0..4).map(|_| follower(&path).client::<Kv>()).collect();
        let mut subs = Vec::new();
        for client in &clients {
            let mut sub = client.subscribe("flag".into()).await.unwrap();
            // Every subscriber, early or late, gets the current value at once.
            let first = sub.next().await.unwrap();
            assert_eq!(first.value, "on");
            subs.push(sub);
        }
        assert_eq!(upstream.counters.subscribes.get(), 1);
        let stats = leader.stats();
        assert_eq!((stats.channels[0].subscriptions, stats.channels[0].subscribers), (1, 4));

        upstream.put("flag", "off");
        let mut positions = Vec::new();
        for sub in &mut subs {
            let update = sub.next().await.unwrap();
            assert_eq!(update.value, "off");
            positions.push(update.position());
        }
        assert!(positions.windows(2).all(|w| w[0] == w[1]), "one event, one position: {positions:?}");

        // A second subscription in the same process shares the process's topic too.
        let mut again = clients[0].subscribe("flag".into()).await.unwrap();
        assert_eq!(again.next().await.unwrap().value, "off");
        drop(again);
        subs.truncate(1);
        assert_eq!(upstream.counters.unsubscribes.get(), 0, "one subscriber is left");
        subs.clear();
        upstream.counters.unsubscribes.reaches(1).await;
        assert_eq!(upstream.counters.subscribes.get(), 1);
    })
    .await
}

#[tokio::test]
async fn a_stream_the_upstream_ends_is_subscribed_again_while_anyone_wants_it() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir: _dir, upstream, leader: _leader, path } = Fixture::seeded(1, &[("once-a", "1")]);
        let kv = follower(&path).client::<Kv>();
        let mut sub = kv.subscribe("once-a".into()).await.unwrap();
        let first = sub.next().await.unwrap();
        assert_eq!(first.value, "1");
        // Its stream ended after that value: the leader subscribes the key again.
        upstream.counters.subscribes.reaches(2).await;
        upstream.put("once-a", "2");
        let mut last = (first.epoch, first.seq);
        loop {
            let update = sub.next().await.unwrap();
            assert!((update.epoch, update.seq) > last, "positions only grow");
            last = (update.epoch, update.seq);
            if update.value == "2" {
                break;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_stream_that_panics_is_subscribed_again_not_left_dead() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir: _dir, upstream, leader: _leader, path } = Fixture::start(1);
        let kv = follower(&path).client::<Kv>();
        let _sub = kv.subscribe("panics-a".into()).await.unwrap();
        // The pump caught the panic and asked the upstream again (with backoff).
        upstream.counters.subscribes.reaches(3).await;
        // The leader goes on serving.
        assert_eq!(kv.invoke(KvRequest::Put("x".into(), "1".into())).await.unwrap(), None);
    })
    .await
}

#[tokio::test]
async fn a_call_past_its_deadline_fails_typed_and_is_cancelled_upstream() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir: _dir, upstream, leader, path } = Fixture::start(1);
        let kv = follower(&path).client::<Kv>();
        kv.ready().await.unwrap();
        let started = std::time::Instant::now();
        let error = kv.invoke_with_deadline(KvRequest::Hang, Duration::from_millis(200)).await.unwrap_err();
        assert!(error.is_timeout(), "{error:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        upstream.counters.cancelled.reaches(1).await;

        // Dropping a call future cancels it at the leader as well.
        let call = kv.invoke_with_deadline(KvRequest::Hang, Duration::from_secs(60));
        let _ = timeout(Duration::from_millis(50), call).await;
        upstream.counters.cancelled.reaches(2).await;
        assert_eq!(leader.stats().in_flight, 0);
    })
    .await
}

#[tokio::test]
async fn losing_the_leader_fails_calls_at_once_and_a_new_leader_resumes_subscriptions() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir, upstream, leader: old, path } = Fixture::seeded(1, &[("k", "1")]);
        let connection = follower(&path);
        let kv = connection.client::<Kv>();
        let mut sub = kv.subscribe("k".into()).await.unwrap();
        let first = sub.next().await.unwrap();
        assert_eq!((first.value.as_str(), first.epoch), ("1", 1));

        let hung = tokio::spawn({
            let kv = kv.clone();
            async move { kv.invoke_with_deadline(KvRequest::Hang, Duration::from_secs(60)).await }
        });
        upstream.counters.invokes.reaches(1).await;
        old.shutdown().await;
        let error = hung.await.unwrap().unwrap_err();
        assert!(matches!(error, Error::LeaderLost), "{error:?}");
        let mut status = connection.status();
        status.wait_for(|s| s.state_of("kv") == State::LeaderLost).await.unwrap();
        assert!(matches!(kv.invoke(KvRequest::Get("k".into())).await, Err(Error::LeaderLost)));
        // The subscription keeps its last value meanwhile.
        assert_eq!(sub.latest().unwrap().value, "1");

        upstream.put("k", "2");
        let (_new, _) = leader(&upstream, dir.path(), 2);
        let update = sub.next().await.unwrap();
        assert_eq!((update.value.as_str(), update.epoch), ("2", 2));
        upstream.put("k", "3");
        let update = sub.next().await.unwrap();
        assert_eq!((update.value.as_str(), update.epoch), ("3", 2));
        assert!(update.seq > 0);
    })
    .await
}

#[tokio::test]
async fn a_follower_started_before_the_leader_waits_and_then_works() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let path = dir.path().join("leader.sock");
        let kv = follower(&path).client::<Kv>();
        let call = tokio::spawn({
            let kv = kv.clone();
            async move { kv.invoke(KvRequest::Get("x".into())).await }
        });
        assert_eq!(kv.state(), State::Connecting);
        let upstream = MemUpstream::default();
        upstream.put("x", "early");
        let (_leader, _) = leader(&upstream, dir.path(), 1);
        kv.ready().await.unwrap();
        assert_eq!(call.await.unwrap().unwrap(), Some("early".into()));
    })
    .await
}

#[tokio::test]
async fn an_upstream_that_fails_to_start_fails_waiting_followers_with_its_error() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let leader = tandem_leader::Leader::builder()
            .channel_from::<Kv, MemUpstream>(async {
                Err(tandem_protocol::RemoteError::unavailable("registry unreachable").with_code(E_INIT))
            })
            .start();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
        let kv = follower(&path).client::<Kv>();
        let error = kv.ready().await.unwrap_err();
        assert_eq!(error.remote().map(|e| e.code.as_str()), Some("E_INIT"));
        let error = kv.subscribe("k".into()).await.unwrap_err();
        assert_eq!(error.remote().map(|e| e.code.as_str()), Some("E_INIT"));
        assert!(matches!(kv.state(), State::UpstreamDown(_)));
    })
    .await
}

#[tokio::test]
async fn a_wrong_token_is_rejected() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        let leader = tandem_leader::Leader::builder()
            .token(Some("s3cret".into()))
            .channel_from::<Kv, _>(async move { Ok(upstream) })
            .start();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
        let mut config = common::config();
        config.token = Some("guess".into());
        let kv = follower_with(&path, config).client::<Kv>();
        let error = kv.invoke(KvRequest::Get("k".into())).await.unwrap_err();
        assert_eq!(error.remote().map(|e| (e.kind, e.code.as_str())), Some((ErrorKind::Rejected, "token")));
        let mut config = common::config();
        config.token = Some("s3cret".into());
        let kv = follower_with(&path, config).client::<Kv>();
        assert_eq!(kv.invoke(KvRequest::Get("k".into())).await.unwrap(), None);
    })
    .await
}

#[tokio::test]
async fn standalone_processes_elect_one_leader() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        let first = standalone("svc", dir.path(), &upstream).client::<Kv>();
        first.ready().await.unwrap();
        let second = standalone("svc", dir.path(), &upstream).client::<Kv>();
        second.ready().await.unwrap();
        assert!(first.is_leader());
        assert!(!second.is_leader());
        let epoch = std::fs::read_to_string(dir.path().join("svc.epoch")).unwrap();
        assert_eq!(epoch.trim(), "1");

        // The leader steps down (closing its connection does not release the
        // lock: only process death does, which the multi-process tests cover).
        second.invoke(KvRequest::Put("a".into(), "b".into())).await.unwrap();
        assert_eq!(first.invoke(KvRequest::Get("a".into())).await.unwrap(), Some("b".into()));
    })
    .await
}

/// A second API, to show several channels sharing one connection.
struct Echo;

impl tandem_protocol::Api for Echo {
    const NAME: &'static str = "echo";
    type Key = u32;
    type Event = u32;
    type Request = String;
    type Response = String;
}

struct EchoUpstream;

impl tandem_leader::Upstream<Echo> for EchoUpstream {
    async fn invoke(
        &self,
        request: String,
        _: tandem_leader::CallContext,
    ) -> Result<String, tandem_protocol::RemoteError> {
        Ok(format!("echo: {request}"))
    }
    async fn subscribe(&self, key: u32) -> Result<tandem_leader::Events<u32>, tandem_protocol::RemoteError> {
        Ok(tandem_leader::Events::stream(futures::stream::iter([key * 10]).chain(futures::stream::pending())))
    }
}

#[tokio::test]
async fn several_channels_share_one_connection() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        let up = upstream.clone();
        let leader = tandem_leader::Leader::builder()
            .channel_from::<Kv, _>(async move { Ok(up) })
            .channel_from::<Echo, _>(async { Ok(EchoUpstream) })
            .start();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
        let connection = common::builder()
            .channel::<Kv>()
            .channel::<Echo>()
            .connect(tandem_follower::UnixConnector::new(&path))
            .spawn();
        let (kv, echo) = (connection.client::<Kv>(), connection.client::<Echo>());
        kv.ready().await.unwrap();
        echo.ready().await.unwrap();
        assert_eq!(echo.invoke("hi".into()).await.unwrap(), "echo: hi");
        kv.invoke(KvRequest::Put("a".into(), "1".into())).await.unwrap();
        let mut sub = echo.subscribe(4).await.unwrap();
        assert_eq!(sub.next().await.unwrap().value, 40);
        assert_eq!(leader.stats().followers, 1, "two channels, one connection");
    })
    .await
}

struct Unserved;

impl tandem_protocol::Api for Unserved {
    const NAME: &'static str = "unserved";
    type Key = String;
    type Event = String;
    type Request = String;
    type Response = String;
}

#[tokio::test]
async fn asking_for_a_client_opens_its_channel_with_no_builder_step() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        let leader = tandem_leader::Leader::builder().channel(upstream.clone()).channel(EchoUpstream).start();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
        // No channel named to the builder: the client opens its own, before the link is up ...
        let connection = common::builder().connect(tandem_follower::UnixConnector::new(&path)).spawn();
        let kv = connection.client::<Kv>();
        kv.ready().await.unwrap();
        kv.invoke(KvRequest::Put("a".into(), "1".into())).await.unwrap();
        // ... or on a live connection, used at once (the Open goes before the call).
        let echo = connection.client::<Echo>();
        assert_eq!(echo.invoke("hi".into()).await.unwrap(), "echo: hi");
        let mut sub = echo.subscribe(4).await.unwrap();
        assert_eq!(sub.next().await.unwrap().value, 40);
        echo.ready().await.unwrap();
        assert_eq!(leader.stats().followers, 1, "two channels, one connection");
        // A channel the leader does not serve is down for good, and says why.
        let unserved = connection.client::<Unserved>();
        let error = unserved.ready().await.unwrap_err();
        assert!(error.remote().is_some_and(|e| e.has_code(tandem_protocol::ErrorCode::CHANNEL)), "{error}");
        let error = unserved.invoke("x".into()).await.unwrap_err();
        assert!(error.remote().is_some_and(|e| e.has_code(tandem_protocol::ErrorCode::CHANNEL)), "{error}");
        assert_eq!(kv.invoke(KvRequest::Get("a".into())).await.unwrap(), Some("1".into()));
        // An unserved channel opened before the link is up is only its own
        // error: the Hello names the builder's channels, the rest are opened after it.
        let fresh = common::builder().connect(tandem_follower::UnixConnector::new(&path)).spawn();
        let unserved = fresh.client::<Unserved>();
        let kv = fresh.client::<Kv>();
        kv.ready().await.unwrap();
        assert_eq!(kv.invoke(KvRequest::Get("a".into())).await.unwrap(), Some("1".into()));
        assert!(unserved.ready().await.is_err());
    })
    .await
}

#[tokio::test]
async fn a_follower_never_goes_back_to_an_older_epoch() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir, upstream, leader: second, path } = Fixture::start(2);
        let connection = follower(&path);
        let kv = connection.client::<Kv>();
        kv.ready().await.unwrap();
        assert_eq!(connection.status().borrow().epoch(), Some(2));
        second.shutdown().await;
        let mut status = connection.status();
        status.wait_for(|s| s.state_of("kv") == State::LeaderLost).await.unwrap();

        // A stale leader (epoch 1) appears on the socket: refused.
        let (stale, _) = leader(&upstream, dir.path(), 1);
        let refused = timeout(Duration::from_millis(300), status.wait_for(|s| s.epoch().is_some())).await.is_err();
        assert!(refused, "connected to a stale leader: {:?}", connection.status().borrow());
        stale.shutdown().await;

        let (_third, _) = leader(&upstream, dir.path(), 3);
        status.wait_for(|s| s.epoch() == Some(3)).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn forced_roles_are_respected() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        let make = |role| {
            let up = upstream.clone();
            let connector = tandem_follower::Standalone::new("roles", dir.path(), move |builder| {
                let up = up.clone();
                builder.channel_from::<Kv, _>(async move { Ok(up) })
            })
            .role(role);
            common::builder().channel::<Kv>().connect(connector).spawn()
        };
        // A follower-only process never takes the lock, even with no leader around.
        let follower_only = make(tandem_follower::Role::FollowerOnly).client::<Kv>();
        let mut status = follower_only.watch();
        let waited = timeout(Duration::from_millis(300), status.wait_for(|s| s.epoch().is_some())).await.is_err();
        assert!(waited);
        // A leader-only process takes it; the follower-only one then connects.
        let leader_only = make(tandem_follower::Role::LeaderOnly).client::<Kv>();
        leader_only.ready().await.unwrap();
        assert!(leader_only.is_leader());
        follower_only.ready().await.unwrap();
        assert!(!follower_only.is_leader());
        // A second leader-only process cannot lead while the first lives.
        let usurper = make(tandem_follower::Role::LeaderOnly).client::<Kv>();
        let mut status = usurper.watch();
        let waited = timeout(Duration::from_millis(300), status.wait_for(|s| s.epoch().is_some())).await.is_err();
        assert!(waited);
    })
    .await
}

#[tokio::test]
async fn a_new_leader_re_announcing_the_same_value_does_not_deliver_it_twice() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir, upstream, leader: old, path } = Fixture::seeded(1, &[("k", "same")]);
        let connection = follower(&path);
        let kv = connection.client::<Kv>();
        let mut sub = kv.subscribe("k".into()).await.unwrap();
        assert_eq!(sub.next().await.unwrap().value, "same");
        old.shutdown().await;
        let (_new, _) = leader(&upstream, dir.path(), 2);
        let mut status = connection.status();
        status.wait_for(|s| s.epoch() == Some(2)).await.unwrap();
        // The new leader's first value of `k` is "same" again: absorbed, but the position moves on.
        let mut latest = sub.latest().unwrap();
        while latest.epoch != 2 {
            tokio::task::yield_now().await;
            latest = sub.latest().unwrap();
        }
        assert_eq!((latest.value.as_str(), latest.epoch), ("same", 2));
        upstream.put("k", "next");
        let update = sub.next().await.unwrap();
        assert_eq!((update.value.as_str(), update.epoch), ("next", 2), "no repeat of \"same\" before it");
    })
    .await
}

#[tokio::test]
async fn a_refused_subscription_reports_the_upstreams_error() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir: _dir, upstream, leader: _leader, path } = Fixture::start(1);
        let kv = follower(&path).client::<Kv>();
        let error = kv.subscribe("denied.key".into()).await.unwrap_err();
        assert_eq!(error.remote().map(|e| e.code.as_str()), Some("E_DENIED"), "{error:?}");
        // The connection is fine, and an allowed key still works.
        upstream.put("ok", "yes");
        let mut sub = kv.subscribe("ok".into()).await.unwrap();
        assert_eq!(sub.next().await.unwrap().value, "yes");
    })
    .await
}

#[tokio::test]
async fn an_oversized_answer_fails_that_call_only() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        upstream.put("big", &"x".repeat(4096));
        upstream.put("small", "s");
        let up = upstream.clone();
        let mut config = tandem_leader::Config::default();
        config.max_frame_length = 1024;
        let leader =
            tandem_leader::Leader::builder().config(config).channel_from::<Kv, _>(async move { Ok(up) }).start();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
        let connection = follower(&path);
        let kv = connection.client::<Kv>();
        let error = kv.invoke(KvRequest::Get("big".into())).await.unwrap_err();
        assert_eq!(error.remote().map(|e| e.code.as_str()), Some("too_large"), "{error:?}");
        assert_eq!(kv.invoke(KvRequest::Get("small".into())).await.unwrap(), Some("s".into()));
        assert_eq!(connection.status().borrow().epoch(), Some(1), "still on the first link");
    })
    .await
}

#[tokio::test]
async fn a_channel_that_becomes_ready_after_the_handshake_is_seen_ready() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let up = upstream.clone();
        let leader = tandem_leader::Leader::builder()
            .channel_from::<Kv, _>(async move {
                let _ = released.await;
                Ok(up)
            })
            .start();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
        let connection = follower(&path);
        let mut status = connection.status();
        status.wait_for(|s| s.epoch().is_some()).await.unwrap();
        assert_eq!(connection.client::<Kv>().state(), State::Connecting, "upstream still starting");
        release.send(()).unwrap();
        connection.client::<Kv>().ready().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn a_new_leader_reusing_the_epoch_still_delivers_its_values() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir, upstream, leader: first, path } = Fixture::seeded(1, &[("k", "old")]);
        let connection = follower(&path);
        let kv = connection.client::<Kv>();
        let mut sub = kv.subscribe("k".into()).await.unwrap();
        assert_eq!(sub.next().await.unwrap().value, "old");
        for n in 0..5 {
            upstream.put("k", &format!("old-{n}"));
            sub.next().await.unwrap();
        }
        first.shutdown().await;
        upstream.put("k", "new");
        let (_second, _) = leader(&upstream, dir.path(), 1);
        let update = sub.next().await.unwrap();
        assert_eq!((update.value.as_str(), update.epoch), ("new", 1));
    })
    .await
}

#[tokio::test]
async fn an_upstream_outage_shows_in_every_followers_state_and_ends() {
    within(TEST_TIMEOUT, async {
        let Fixture { dir: _dir, upstream, leader: _leader, path } = Fixture::start(1);
        let kv = follower(&path).client::<Kv>();
        kv.ready().await.unwrap();
        let mut status = kv.watch();
        upstream.health.send_replace(tandem_protocol::UpstreamState::Down(tandem_protocol::RemoteError::unavailable(
            "registry gone",
        )));
        status.wait_for(|s| matches!(s.state_of("kv"), State::UpstreamDown(_))).await.unwrap();
        upstream.health.send_replace(tandem_protocol::UpstreamState::Ready);
        status.wait_for(|s| s.state_of("kv") == State::Ready).await.unwrap();
        assert_eq!(kv.invoke(KvRequest::Get("x".into())).await.unwrap(), None);
    })
    .await
}
