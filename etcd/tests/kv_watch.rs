//! Key-value calls and watches against a real etcd: round trips, watch order,
//! compaction reported in the stream, one TCP connection for everything.

mod support;

use std::time::Duration;

use futures::StreamExt;
use support::{Etcd, within};
use tandem_etcd::{Config, EtcdClient, Keys, Start, Watch, WatchEvent};

const LIMIT: Duration = Duration::from_secs(30);

async fn next(watch: &mut Watch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), watch.next()).await.expect("no event within 5 s").expect("watch ended")
}

#[tokio::test]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn get_put_delete_round_trip() {
    within(LIMIT, async {
        let etcd = Etcd::single().await;
        let client = EtcdClient::connect(Config::new(etcd.endpoints())).await.unwrap();
        assert_eq!(client.get("a").await.unwrap(), None);
        let written = client.put("a", "1").await.unwrap();
        let kv = client.get("a").await.unwrap().unwrap();
        assert_eq!((kv.key.as_str(), kv.value_str().as_str(), kv.mod_revision, kv.version), ("a", "1", written, 1));
        client.put("a/x", "2").await.unwrap();
        client.put("a/y", "3").await.unwrap();
        let range = client.get_range(&Keys::prefix("a/")).await.unwrap();
        let keys: Vec<&str> = range.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["a/x", "a/y"]);
        assert!(range.revision > written);
        let deleted = client.delete("a").await.unwrap();
        assert!(deleted.unwrap() > range.revision);
        assert_eq!(client.delete("a").await.unwrap(), None, "a second delete finds nothing");
        assert_eq!(client.get("a").await.unwrap(), None);
    })
    .await
}

#[tokio::test]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn watches_of_a_key_and_a_prefix_see_every_change_in_order_on_one_connection() {
    within(LIMIT, async {
        let etcd = Etcd::single().await;
        let client = EtcdClient::connect(Config::new(etcd.endpoints())).await.unwrap();
        let start = client.put("p/seed", "0").await.unwrap() + 1;
        let mut key = client.watch(Keys::exact("p/k"), Start::Revision(start));
        let mut prefix = client.watch(Keys::prefix("p/"), Start::Revision(start));
        let mut snapshot = client.watch(Keys::prefix("p/"), Start::Snapshot);
        let first = next(&mut snapshot).await;
        let WatchEvent::Snapshot(state) = &first else { panic!("{first:?}") };
        assert_eq!(state.kvs.len(), 1);

        for n in 1..=5 {
            client.put("p/k", n.to_string()).await.unwrap();
        }
        client.put("p/other", "x").await.unwrap();
        let gone = client.delete("p/k").await.unwrap().unwrap();

        let mut values = Vec::new();
        for _ in 0..5 {
            match next(&mut key).await {
                WatchEvent::Put(kv) => values.push(kv.value_str()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(values, ["1", "2", "3", "4", "5"]);
        assert_eq!(next(&mut key).await, WatchEvent::Delete { key: "p/k".into(), revision: gone });

        let mut revisions = Vec::new();
        for _ in 0..7 {
            revisions.push(next(&mut prefix).await.revision());
        }
        assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
        assert_eq!(*revisions.last().unwrap(), gone);
        assert_eq!(next(&mut snapshot).await.revision(), revisions[0], "the snapshot watch continues after it");

        // Three watches and the calls above share one TCP connection.
        let addrs = tandem_etcd::endpoint_addrs(&etcd.endpoints()).unwrap();
        assert_eq!(tandem_etcd::established_connections(&[std::process::id()], &addrs).unwrap(), 1);
    })
    .await
}

#[tokio::test]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn a_watch_from_a_compacted_revision_rereads_the_state_and_says_so() {
    within(LIMIT, async {
        let etcd = Etcd::single().await;
        let client = EtcdClient::connect(Config::new(etcd.endpoints())).await.unwrap();
        let first = client.put("c", "v1").await.unwrap();
        client.put("c", "v2").await.unwrap();
        let last = client.put("c", "v3").await.unwrap();
        let mut admin = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
        admin.compact(last, None).await.unwrap();

        let mut watch = client.watch(Keys::exact("c"), Start::Revision(first + 1));
        match next(&mut watch).await {
            WatchEvent::Compacted { compact_revision, snapshot } => {
                assert_eq!(compact_revision, last);
                assert_eq!(snapshot.kvs.len(), 1);
                assert_eq!(snapshot.kvs[0].value_str(), "v3");
                assert!(snapshot.revision >= last);
            }
            other => panic!("expected Compacted, got {other:?}"),
        }
        let after = client.put("c", "v4").await.unwrap();
        match next(&mut watch).await {
            WatchEvent::Put(kv) => assert_eq!((kv.value_str().as_str(), kv.mod_revision), ("v4", after)),
            other => panic!("{other:?}"),
        }
    })
    .await
}
