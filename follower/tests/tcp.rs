//! The TCP loopback transport: a Leader serving with `bind_tcp` and Followers
//! reaching it with `TcpConnector`, on 127.0.0.1 and ::1 (ephemeral ports).
//! TCP has no peer uid, so the token is the only gate: a TCP leader without
//! one is refused at bind, a follower with a wrong one (or none) is rejected,
//! and only loopback addresses may be bound.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use common::{Kv, KvRequest, MemUpstream, TEST_TIMEOUT, within};
use futures::StreamExt;
use tandem_follower::{Connection, TcpConnector};
use tandem_leader::Leader;
use tandem_protocol::ErrorKind;

const TOKEN: &str = "tcp-s3cret";

fn leader(upstream: &MemUpstream, token: Option<&str>) -> Leader {
    let up = upstream.clone();
    Leader::builder().token(token.map(str::to_owned)).channel_from::<Kv, _>(async move { Ok(up) }).start()
}

fn tcp_follower(addr: SocketAddr, token: Option<&str>) -> Connection {
    let mut config = common::config();
    config.token = token.map(str::to_owned);
    common::builder().config(config).channel::<Kv>().connect(TcpConnector::new(addr)).spawn()
}

/// Calls, a subscription shared by two followers (one upstream subscription),
/// and the leader's view of them: both are TCP peers.
async fn calls_and_subscriptions_over(ip: std::net::IpAddr) {
    let upstream = MemUpstream::default();
    let leader = leader(&upstream, Some(TOKEN));
    let addr = leader.bind_tcp(SocketAddr::new(ip, 0)).await.expect("bind_tcp");
    assert_eq!(addr.ip(), ip);
    assert_ne!(addr.port(), 0, "an ephemeral port was picked");

    let first = tcp_follower(addr, Some(TOKEN)).client::<Kv>();
    let second = tcp_follower(addr, Some(TOKEN)).client::<Kv>();
    assert_eq!(first.invoke(KvRequest::Put("k".into(), "one".into())).await.unwrap(), None);
    assert_eq!(second.invoke(KvRequest::Get("k".into())).await.unwrap(), Some("one".into()));

    let mut a = first.subscribe("k".into()).await.unwrap();
    let mut b = second.subscribe("k".into()).await.unwrap();
    for sub in [&mut a, &mut b] {
        let update = sub.next().await.expect("the current value");
        assert_eq!((update.value.as_str(), update.epoch), ("one", 1));
    }
    upstream.put("k", "two");
    let (ua, ub) = (a.next().await.expect("a value"), b.next().await.expect("a value"));
    assert_eq!((ua.value.as_str(), ub.value.as_str()), ("two", "two"));
    assert_eq!(ua.position(), ub.position(), "the same value, the same (epoch, seq)");
    assert_eq!(upstream.counters.subscribes.get(), 1, "two TCP subscribers, one upstream subscription");

    // A publish goes through too.
    first.publish(KvRequest::Put("k".into(), "three".into())).await.unwrap();
    assert_eq!(a.next().await.expect("a value").value, "three");

    let stats = leader.stats();
    assert_eq!(stats.followers, 2, "{stats:?}");
    let transports: Vec<&str> = stats.follower_list.iter().map(|f| f.transport.as_str()).collect();
    assert_eq!(transports, ["tcp", "tcp"], "{stats:?}");
    leader.shutdown().await;
}

#[tokio::test]
async fn calls_and_subscriptions_over_tcp_on_127_0_0_1() {
    within(TEST_TIMEOUT, calls_and_subscriptions_over(Ipv4Addr::LOCALHOST.into())).await
}

#[tokio::test]
async fn calls_and_subscriptions_over_tcp_on_ipv6_loopback() {
    // Some hosts (containers) have no ::1: say so rather than fail.
    if let Err(error) = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) {
        eprintln!("SKIPPED: this host has no IPv6 loopback ({error}); the ::1 case did not run");
        return;
    }
    within(TEST_TIMEOUT, calls_and_subscriptions_over(Ipv6Addr::LOCALHOST.into())).await
}

#[tokio::test]
async fn a_tcp_leader_without_a_token_is_refused_at_bind() {
    within(TEST_TIMEOUT, async {
        let leader = leader(&MemUpstream::default(), None);
        let error = leader.bind_tcp((Ipv4Addr::LOCALHOST, 0).into()).await.unwrap_err();
        assert!(matches!(error, tandem_leader::Error::TokenRequired), "{error:?}");
    })
    .await
}

#[tokio::test]
async fn a_wrong_or_missing_token_over_tcp_is_rejected() {
    within(TEST_TIMEOUT, async {
        let upstream = MemUpstream::default();
        let leader = leader(&upstream, Some(TOKEN));
        let addr = leader.bind_tcp((Ipv4Addr::LOCALHOST, 0).into()).await.unwrap();
        for token in [Some("guess"), None] {
            let kv = tcp_follower(addr, token).client::<Kv>();
            let error = kv.invoke(KvRequest::Get("k".into())).await.unwrap_err();
            let remote = error.remote().map(|e| (e.kind, e.code.as_str()));
            assert_eq!(remote, Some((ErrorKind::Rejected, "token")), "token {token:?}: {error:?}");
        }
        assert_eq!(upstream.counters.invokes.get(), 0, "no rejected call reached the upstream");
        assert_eq!(leader.stats().followers, 0);
        // The right token gets in.
        let kv = tcp_follower(addr, Some(TOKEN)).client::<Kv>();
        assert_eq!(kv.invoke(KvRequest::Get("k".into())).await.unwrap(), None);
    })
    .await
}

#[tokio::test]
async fn a_non_loopback_address_is_refused() {
    within(TEST_TIMEOUT, async {
        let leader = leader(&MemUpstream::default(), Some(TOKEN));
        for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:0", "[2001:db8::1]:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let error = leader.bind_tcp(addr).await.unwrap_err();
            assert!(matches!(error, tandem_leader::Error::NotLoopback(a) if a == addr), "{addr}: {error:?}");
        }
    })
    .await
}
