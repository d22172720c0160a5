//! A Leader over etcd, followers over its Unix socket, real etcd processes:
//! member failover while values change, and a total outage and its end.
#![cfg(feature = "etcd")]

#[path = "../etcd/tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use support::{Etcd, eventually, within};
use tandem::etcd_upstream::EtcdUpstream;
use tandem::etcd_upstream::etcd::{self, ConnectionState};
use tandem::registry_upstream::{ConfigApi, ConfigRequest, ServiceApi};
use tandem::{Client, Connection, ErrorKind, Leader, Subscription, UnixConnector};
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(60);

struct Host {
    leader: Leader,
    upstream: EtcdUpstream,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

async fn host(endpoints: Vec<String>) -> Host {
    let upstream = EtcdUpstream::connect(etcd::Config::new(endpoints)).await.unwrap();
    let leader = Leader::builder()
        .channel_from::<ConfigApi, _>({
            let upstream = upstream.clone();
            async move { Ok(upstream) }
        })
        .channel_from::<ServiceApi, _>({
            let upstream = upstream.clone();
            async move { Ok(upstream) }
        })
        .start();
    let dir = tempfile::Builder::new().prefix("tandem-etcd-it").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
    Host { leader, upstream, path, _dir: dir }
}

async fn follower(host: &Host) -> Client<ConfigApi> {
    let connection = Connection::builder().channel::<ConfigApi>().connect(UnixConnector::new(&host.path)).spawn();
    let client = connection.client::<ConfigApi>();
    client.ready().await.unwrap();
    client
}

fn value(update: &tandem::Update<tandem::registry_upstream::ConfigValue>) -> String {
    update.value.value.clone().unwrap_or_else(|| "<none>".into())
}

async fn next_value(sub: &mut Subscription<ConfigApi>) -> String {
    let update = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("no value in 10 s").unwrap();
    value(&update)
}

/// Puts through an etcd client of its own, retrying while the cluster elects a leader.
async fn put_retrying(writer: &etcd::EtcdClient, key: &str, value: String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match writer.put(key, value.clone()).await {
            Ok(_) => return,
            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("put {key}={value}: {}", error.chain()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn a_member_killed_while_values_change_every_follower_ends_with_the_final_value_in_order() {
    within(LIMIT, async {
        let mut etcd = Etcd::cluster(3).await;
        let host = host(etcd.endpoints()).await;
        let writer = etcd::EtcdClient::connect(etcd::Config::new([etcd.endpoint(1), etcd.endpoint(2)])).await.unwrap();
        writer.put("k", "0").await.unwrap();

        const FOLLOWERS: usize = 3;
        const LAST: u32 = 40;
        let mut collectors = Vec::new();
        for _ in 0..FOLLOWERS {
            let client = follower(&host).await;
            let mut sub = client.subscribe("k".to_string()).await.unwrap();
            assert_eq!(next_value(&mut sub).await, "0", "a new subscriber gets the current value");
            collectors.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let update = tokio::time::timeout(Duration::from_secs(15), sub.next())
                        .await
                        .expect("a follower stalled")
                        .unwrap();
                    let n: u32 = value(&update).parse().unwrap();
                    seen.push(((update.epoch, update.seq), n));
                    if n == LAST {
                        drop(client);
                        return seen;
                    }
                }
            }));
        }

        let in_use = host.upstream.client().endpoint().unwrap();
        for n in 1..=LAST {
            if n == 15 {
                etcd.kill(etcd.index_of(&in_use));
            }
            put_retrying(&writer, "k", n.to_string()).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for collector in collectors {
            let seen = collector.await.unwrap();
            assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "(epoch, seq) not increasing: {seen:?}");
            assert!(seen.windows(2).all(|w| w[0].1 <= w[1].1), "an older value after a newer one: {seen:?}");
            assert_eq!(seen.last().unwrap().1, LAST);
        }
        let now = host.upstream.client().endpoint().unwrap();
        assert_ne!(now, in_use, "the Leader's client moved to a live member");
        assert_eq!(host.leader.epoch(), 1, "no restart");
    })
    .await
}

#[tokio::test]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn etcd_stopped_then_restarted_calls_fail_as_unavailable_then_everything_resumes() {
    within(LIMIT, async {
        let mut etcd = Etcd::single().await;
        let host = host(etcd.endpoints()).await;
        let (a, b) = (follower(&host).await, follower(&host).await);
        let mut sub_a = a.subscribe("k".to_string()).await.unwrap();
        assert_eq!(next_value(&mut sub_a).await, "<none>", "the current state, absence included");
        a.invoke(ConfigRequest::Put("k".into(), "before".into())).await.unwrap();
        assert_eq!(next_value(&mut sub_a).await, "before");
        let mut sub_b = b.subscribe("k".to_string()).await.unwrap();
        assert_eq!(next_value(&mut sub_b).await, "before", "a late subscriber gets the current value");
        // Two followers, their subscriptions and calls: one connection to etcd.
        let addrs = etcd::endpoint_addrs(&etcd.endpoints()).unwrap();
        assert_eq!(etcd::established_connections(&[std::process::id()], &addrs).unwrap(), 1);

        etcd.kill(0);
        let deadline = Duration::from_secs(2);
        let began = Instant::now();
        let error = a.invoke_with_deadline(ConfigRequest::Get("k".into()), deadline).await.unwrap_err();
        assert_eq!(error.remote().map(|e| e.kind), Some(ErrorKind::Unavailable), "{error:?}");
        assert!(began.elapsed() < deadline, "took {:?}", began.elapsed());
        let mut state = host.upstream.client().state();
        tokio::time::timeout(
            Duration::from_secs(5),
            state.wait_for(|s| matches!(s, ConnectionState::Unavailable { .. })),
        )
        .await
        .unwrap()
        .unwrap();
        for client in [&a, &b] {
            let began = Instant::now();
            let request = ConfigRequest::Put("k".into(), "lost".into());
            let error = client.invoke_with_deadline(request, deadline).await.unwrap_err();
            assert_eq!(error.remote().map(|e| e.kind), Some(ErrorKind::Unavailable), "{error:?}");
            assert!(began.elapsed() < Duration::from_millis(500), "took {:?}", began.elapsed());
        }
        // Subscriptions keep their last values meanwhile.
        for sub in [&sub_a, &sub_b] {
            assert_eq!(sub.latest().map(|u| value(&u)).as_deref(), Some("before"));
        }
        assert!(tokio::time::timeout(Duration::from_millis(200), sub_a.next()).await.is_err(), "no value while down");

        etcd.restart(0).await;
        eventually(Duration::from_secs(10), "a put once etcd is back", || async {
            a.invoke(ConfigRequest::Put("k".into(), "after".into())).await.is_ok()
        })
        .await;
        assert_eq!((next_value(&mut sub_a).await, next_value(&mut sub_b).await), ("after".into(), "after".into()));
        assert_eq!(host.leader.epoch(), 1, "the same Leader, never restarted");
        let epochs: BTreeSet<u64> = [sub_a.latest().unwrap().epoch, sub_b.latest().unwrap().epoch].into();
        assert_eq!(epochs, BTreeSet::from([1]));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn an_etcd_replaced_by_an_empty_one_strands_no_follower() {
    within(LIMIT, async {
        let mut etcd = Etcd::single().await;
        let host = host(etcd.endpoints()).await;
        let writer = etcd::EtcdClient::connect(etcd::Config::new(etcd.endpoints())).await.unwrap();
        let a = follower(&host).await;
        let mut sub = a.subscribe("k".to_string()).await.unwrap();
        assert_eq!(next_value(&mut sub).await, "<none>");
        for i in 1..=30 {
            put_retrying(&writer, "k", format!("v{i}")).await;
        }
        loop {
            if next_value(&mut sub).await == "v30" {
                break;
            }
        }

        // The same endpoint, an empty etcd: revisions start again from 1.
        etcd.replace_empty(0).await;
        put_retrying(&writer, "k", "after-restart".into()).await;
        let mut after = Vec::new();
        let mut positions = Vec::new();
        while after.last().map(String::as_str) != Some("after-restart") {
            let update = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("no value").unwrap();
            positions.push((update.epoch, update.seq));
            after.push(value(&update));
        }
        assert!(after.iter().all(|v| v == "<none>" || v == "after-restart"), "{after:?}");
        // No (epoch, seq) twice or backwards.
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        let late = follower(&host).await;
        let mut late_sub = late.subscribe("k".to_string()).await.unwrap();
        assert_eq!(next_value(&mut late_sub).await, "after-restart");
        put_retrying(&writer, "k", "later".into()).await;
        let update = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("no value").unwrap();
        assert_eq!(value(&update), "later");
        assert!((update.epoch, update.seq) > *positions.last().unwrap());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn a_leader_starts_with_etcd_down_and_flows_once_it_is_up() {
    within(LIMIT, async {
        let mut etcd = Etcd::single().await;
        etcd.kill(0);
        // Nothing answers: the adapter starts anyway, Down with the reason.
        let host = host(etcd.endpoints()).await;
        let connection = Connection::builder().channel::<ConfigApi>().connect(UnixConnector::new(&host.path)).spawn();
        let a = connection.client::<ConfigApi>();
        let error = a.ready().await.unwrap_err();
        assert_eq!(error.remote().map(|e| e.kind), Some(ErrorKind::Unavailable), "{error:?}");
        let began = Instant::now();
        let error = a.invoke(ConfigRequest::Get("k".into())).await.unwrap_err();
        assert_eq!(error.remote().map(|e| e.kind), Some(ErrorKind::Unavailable), "{error:?}");
        assert!(began.elapsed() < Duration::from_secs(2), "fails fast: {:?}", began.elapsed());
        // A subscribe is accepted while down, and flows once etcd is up.
        let mut sub = a.subscribe("k".to_string()).await.unwrap();

        etcd.restart(0).await;
        let writer = etcd::EtcdClient::connect(etcd::Config::new(etcd.endpoints())).await.unwrap();
        put_retrying(&writer, "k", "up-at-last".into()).await;
        assert_eq!(next_value(&mut sub).await, "up-at-last");
        a.ready().await.unwrap();
        assert_eq!(host.leader.epoch(), 1, "the same Leader, never restarted");
    })
    .await
}
