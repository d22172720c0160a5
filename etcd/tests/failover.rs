//! Endpoint failover and total outages against real etcd processes.

mod support;

use std::time::Duration;

use futures::StreamExt;
use support::{Etcd, eventually, within};
use tandem_etcd::{Config, ConnectionState, EtcdClient, Keys, Start, WatchEvent};
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(60);

/// Puts `value`, retrying while the cluster elects a new leader.
async fn put_retrying(client: &EtcdClient, key: &str, value: String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.put(key, value.clone()).await {
            Ok(_) => return,
            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("put {key}={value}: {}", error.chain()),
        }
    }
}

/// Makes member `target` the raft leader (etcd's move-leader, sent to the current leader).
async fn make_raft_leader(etcd: &Etcd, target: usize) {
    let member_id = |status: &etcd_client::StatusResponse| status.header().unwrap().member_id();
    let mut admin = etcd_client::Client::connect([etcd.endpoint(target)], None).await.unwrap();
    let status = admin.status().await.unwrap();
    let target_id = member_id(&status);
    if status.leader() != target_id {
        for endpoint in etcd.endpoints() {
            let mut member = etcd_client::Client::connect([endpoint], None).await.unwrap();
            if member_id(&member.status().await.unwrap()) == status.leader() {
                member.move_leader(target_id).await.unwrap();
            }
        }
    }
    eventually(Duration::from_secs(10), "the raft leader to move", || {
        let mut admin = admin.clone();
        async move { admin.status().await.is_ok_and(|s| s.leader() == target_id) }
    })
    .await;
}

/// The harshest case: the member in use is also the raft leader, so the
/// survivors first elect a new one (calls fail as unavailable meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn killing_the_member_in_use_moves_on_without_missing_an_event() {
    within(LIMIT, async {
        let mut etcd = Etcd::cluster(3).await;
        make_raft_leader(&etcd, 0).await;
        let client = EtcdClient::connect(Config::new(etcd.endpoints())).await.unwrap();
        let in_use = client.endpoint().unwrap();
        assert_eq!(in_use, etcd.endpoint(0), "the first endpoint is tried first");
        // The writer talks to the two members that survive.
        let writer = EtcdClient::connect(Config::new([etcd.endpoint(1), etcd.endpoint(2)])).await.unwrap();
        let start = writer.put("f/k", "0").await.unwrap() + 1;
        let mut watch = client.watch(Keys::exact("f/k"), Start::Revision(start));

        const LAST: u32 = 60;
        const BEFORE_KILL: u32 = 20;
        // The writer pauses after the first values until the member in use is
        // dead, so the rest can only reach the watch through another member.
        let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
        let writing = tokio::spawn(async move {
            for n in 1..=BEFORE_KILL {
                put_retrying(&writer, "f/k", n.to_string()).await;
            }
            let _ = killed_rx.await;
            for n in BEFORE_KILL + 1..=LAST {
                put_retrying(&writer, "f/k", n.to_string()).await;
            }
        });
        let mut killed_tx = Some(killed_tx);
        let mut seen: Vec<(u32, i64)> = Vec::new();
        let mut killed = false;
        while seen.last().map(|(n, _)| *n) != Some(LAST) {
            let event = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.expect("stalled").unwrap();
            let WatchEvent::Put(kv) = event else { panic!("{event:?}") };
            seen.push((kv.value_str().parse().unwrap(), kv.mod_revision));
            if !killed && seen.last().map(|(n, _)| *n) == Some(BEFORE_KILL) {
                etcd.kill(etcd.index_of(&in_use));
                killed = true;
                if let Some(go) = killed_tx.take() {
                    let _ = go.send(());
                }
            }
        }
        writing.await.unwrap();
        assert!(killed);
        let moved = client.endpoint().unwrap();
        assert_ne!(moved, in_use, "the client moved to a live member");
        // Every value once (a put retried after an ambiguous failure may repeat
        // one value at a new revision), in revision order.
        assert!(seen.windows(2).all(|w| w[0].1 < w[1].1), "revisions out of order: {seen:?}");
        let mut values: Vec<u32> = seen.iter().map(|(n, _)| *n).collect();
        values.dedup();
        assert_eq!(values, (1..=LAST).collect::<Vec<_>>());
        // Calls work through the new member.
        client.put("f/after", "yes").await.unwrap();
        assert_eq!(client.get("f/after").await.unwrap().unwrap().value_str(), "yes");
        // Exactly one connection, to the new member.
        let addrs = tandem_etcd::endpoint_addrs(&[moved]).unwrap();
        let others: Vec<_> = tandem_etcd::endpoint_addrs(&etcd.endpoints()).unwrap();
        let pid = std::process::id();
        assert!(tandem_etcd::established_connections(&[pid], &addrs).unwrap() >= 1);
        // The writer holds one connection too (to member 1 or 2): at most two in all.
        assert!(tandem_etcd::established_connections(&[pid], &others).unwrap() <= 2);
    })
    .await
}

#[tokio::test]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn a_total_outage_fails_calls_as_unavailable_then_everything_resumes() {
    within(LIMIT, async {
        let mut etcd = Etcd::single().await;
        let client = EtcdClient::connect(Config::new(etcd.endpoints())).await.unwrap();
        let start = client.put("o/k", "before").await.unwrap();
        let mut watch = client.watch(Keys::exact("o/k"), Start::Revision(start));
        let first = watch.next().await.unwrap();
        assert!(matches!(&first, WatchEvent::Put(kv) if kv.value_str() == "before"), "{first:?}");

        etcd.kill(0);
        // The first call after the loss notices it; within its deadline either way.
        let began = Instant::now();
        let error = client.until(Instant::now() + Duration::from_secs(2)).get("o/k").await.unwrap_err();
        assert!(error.is_unavailable(), "{}", error.chain());
        assert!(began.elapsed() < Duration::from_secs(2), "took {:?}", began.elapsed());
        let mut state = client.state();
        tokio::time::timeout(
            Duration::from_secs(5),
            state.wait_for(|s| matches!(s, ConnectionState::Unavailable { .. })),
        )
        .await
        .expect("the client did not notice the outage")
        .unwrap();
        // While down, calls fail at once with the typed error.
        for _ in 0..3 {
            let began = Instant::now();
            let error = client.put("o/k", "lost").await.unwrap_err();
            assert!(error.is_unavailable() && error.is_retryable(), "{}", error.chain());
            assert!(began.elapsed() < Duration::from_millis(500), "took {:?}", began.elapsed());
        }
        assert!(tokio::time::timeout(Duration::from_millis(200), watch.next()).await.is_err(), "no event while down");

        etcd.restart(0).await;
        tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|s| matches!(s, ConnectionState::Connected { .. })),
        )
        .await
        .expect("the client did not reconnect")
        .unwrap();
        let after = client.put("o/k", "after").await.unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap();
        assert_eq!(event.revision(), after, "the watch resumed with the next change, nothing repeated: {event:?}");
        eventually(Duration::from_secs(5), "a get after the outage", || async {
            client.get("o/k").await.ok().flatten().is_some_and(|kv| kv.value_str() == "after")
        })
        .await;
    })
    .await
}
